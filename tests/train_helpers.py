"""Shared fixtures-as-functions for the data, training and distributed tests (tiny, CPU, deterministic)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from llama_adapter import AdapterConfig, LLaMA, ModelArgs


class CharTokenizer:
    """One id per character (bos 1, eos 2, no pad piece): masks and truncation can be checked by counting."""

    bos_id, eos_id, pad_id, n_words = 1, 2, -1, 128

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        return [self.bos_id] * bos + [3 + ord(c) % (self.n_words - 3) for c in s] + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return "".join(chr(i - 3) for i in ids if i >= 3)


class WordTokenizer(CharTokenizer):
    """One id per whitespace-separated word: ~6x shorter sequences than characters, for fast training tests."""

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        words = [3 + sum(map(ord, w)) % (self.n_words - 3) for w in s.split()]
        return [self.bos_id] * bos + words + [self.eos_id] * eos


def make_examples(n: int) -> list[dict]:
    """n instruction records of varied lengths (some with input)."""
    words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
    out = []
    for i in range(n):
        a, b = words[i % len(words)], words[(3 * i + 1) % len(words)]
        if i % 3 == 0:
            out.append({"instruction": "Join the words.", "input": f"{a} {b}", "output": a + b})
        else:
            out.append({"instruction": f"Repeat {a} {i % 4 + 1} times.", "output": " ".join([a] * (i % 4 + 1))})
    return out


def tiny_model(seed: int = 0, adapter_len: int = 3, adapter_layers: int = 1, dtype=torch.float32) -> LLaMA:
    """The "tiny" config (dim 64, 2 layers, GQA 4/2, vocab 128) with random base weights and a fresh adapter."""
    torch.manual_seed(seed)
    model = LLaMA(ModelArgs.from_name("tiny", max_seq_len=320), dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():  # default inits leave norms at 1: fine; scale weights to keep logits tame
            if p.dim() == 2:
                p.normal_(0, 0.3 if p.shape[0] == model.params.vocab_size else 0.1)
    model.attach_adapter(AdapterConfig(adapter_len=adapter_len, adapter_layers=adapter_layers))
    return model


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: on a shared 2-core box, two spinning OpenMP threads per process made these tiny
    models 5-10x slower (measured: 14 s vs 4.7 s for two tests under load 7)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _gloo_entry(rank: int, world: int, init_file: str, fn, args: tuple):
    import torch.distributed as dist

    from llama_adapter.attention import set_attention_backend
    from llama_adapter.distributed import init_distributed

    torch.set_num_threads(1)
    set_attention_backend("reference")  # as conftest does for the parent process
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # what torchrun sets
    info = init_distributed("cpu", init_method=Path(init_file).as_uri())
    try:
        fn(info, *args)
    finally:
        dist.destroy_process_group()


def spawn_gloo(fn, world: int, tmp_dir, *args) -> None:
    """Runs fn(dist_info, *args) in `world` gloo processes on the CPU, going through `init_distributed`.

    They meet through a file rendezvous in tmp_dir: picking a free TCP port (bind port 0, close, hand it to the
    workers) races with every other process on a shared machine. fn must be a module-level function."""
    import torch.multiprocessing as mp

    init_file = Path(tmp_dir) / "gloo_rendezvous"
    assert not init_file.exists(), "a stale rendezvous file would join the workers to a finished group"
    mp.spawn(_gloo_entry, args=(world, str(init_file), fn, args), nprocs=world, join=True)
