"""Batched generation with a static KV cache (the `llama-adapter generate` command is llama_adapter.cli.generate).

Prompts of different lengths share one batch: they are right-padded for a single prefill (causal masking
keeps every real token away from the pads), then each row decodes at its own position and attends to its
own number of cached keys (`kv_lens`), which overwrite the pads as they come. A row therefore gets exactly
what it gets alone. The adapter's prompt keys/values are computed once per call from the current
parameters, never kept across calls, so a model that trains in between is never served stale ones.

`adapters=[...]` gives each row its own adapter (llama_adapter.multi_adapter). `compile=True` runs each decode
step through torch.compile(fullgraph=True) over a static cache (`KVCache(static=True)`: fixed shapes, no host
sync inside the step), with CUDA graphs (mode="reduce-overhead") on a GPU, gpt-fast style; the prefill stays
eager.
"""

from __future__ import annotations

import sys
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from llama_adapter.validation import (
    NON_NEGATIVE,
    POSITIVE_INT,
    Number,
    check_arg,
)

TOP_P = Number(float, min=0, max=1, min_open=True)


@dataclass
class Step:
    """One decoding step: the new token of each row (None once the row has stopped) and the logits it came from."""

    tokens: list[int | None]
    logits: torch.Tensor  # (B, vocab), the model's dtype


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator=None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, vocab): argmax at temperature 0, else nucleus sampling (Meta's rule:
    keep the most probable tokens whose preceding cumulative probability is below top_p)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        sorted_probs[sorted_probs.cumsum(-1) - sorted_probs > top_p] = 0.0
        choice = torch.multinomial(sorted_probs, 1, generator=generator)  # multinomial renormalises
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_request(model, prompts, max_new_tokens, temperature, top_p, eos_id=None, seed=None) -> list[int]:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise TypeError(f"prompts must be a non-empty list of token-id lists, got {type(prompts).__name__}")
    vocab, max_seq_len = model.params.vocab_size, model.params.max_seq_len
    for b, p in enumerate(prompts):
        if not isinstance(p, (list, tuple)) or not p or not all(isinstance(t, int) for t in p):
            raise TypeError(f"prompts[{b}] must be a non-empty list of ints, got {p!r:.60}")
        if not all(0 <= t < vocab for t in p):
            raise ValueError(f"prompts[{b}] has token ids outside [0, vocab_size={vocab})")
    check_arg("max_new_tokens", max_new_tokens, POSITIVE_INT)
    check_arg("temperature", temperature, NON_NEGATIVE)
    check_arg("top_p", top_p, TOP_P)
    check_arg("eos_id", eos_id, Number(int, min=0, max=vocab - 1, optional=True))
    check_arg("seed", seed, Number(int, optional=True))
    lengths = [len(p) for p in prompts]
    if max(lengths) + max_new_tokens > max_seq_len:
        raise ValueError(
            f"prompt length {max(lengths)} + max_new_tokens {max_new_tokens} exceeds the model's "
            f"max_seq_len={max_seq_len}"
        )
    return lengths


@torch.inference_mode()
def generate_stream(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    prompt_offset: torch.Tensor | None = None,
    adapters: list | None = None,
    adapter_bank=None,
    compile: bool = False,
    compile_options: dict | None = None,
    stop_ids=None,
) -> Iterator[Step]:
    """Yield a `Step` per decoding step until every row has produced a stop id or max_new_tokens tokens. These
    options are also `generate`'s (and `LLaMA.generate`'s).

    temperature: 0 is greedy, else sampling, from the smallest set of tokens holding top_p of the probability
    (`sample`); seed (or a torch generator) makes it repeatable. eos_id, stop_ids: ids that end a row (a
    tokenizer's `stop_ids`: eos and, for instruct models, end-of-turn). prompt_offset (B, 1 or K, dim): added to
    every adapted layer's prompt per row (image features, llama_adapter.multimodal).
    adapters: one choice per prompt (None for the base model, an adapter path, an `Adapter`, or a name in
    `adapter_bank`), so one batch serves several adapters (llama_adapter.multi_adapter); the model's own
    adapter is not used then. compile: decode steps run torch.compile'd (fullgraph, CUDA graphs on a GPU) over
    a static KV cache; compile_options override the torch.compile arguments (default: mode="reduce-overhead"
    on CUDA, inductor's default elsewhere).
    """
    lengths = _check_request(model, prompts, max_new_tokens, temperature, top_p, eos_id, seed)
    stops = _stop_set(eos_id, stop_ids, model.params.vocab_size)
    device = model.tok_embeddings.weight.device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    B, longest = len(prompts), max(lengths)
    adapter_kv = _adapter_kv(model, B, prompt_offset, adapters, adapter_bank)
    step_fn, cache = _decoder(model, B, longest + max_new_tokens, compile, compile_options)
    try:
        padded = torch.zeros(B, longest, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            padded[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        pos = torch.tensor(lengths, dtype=torch.long, device=device)
        zero = torch.zeros(B, dtype=torch.long, device=device)
        logits = model(padded, cache=cache, input_pos=zero, adapter_kv=adapter_kv, logits_pos=pos - 1)[:, -1]
        stopped = [False] * B
        for step in range(max_new_tokens):
            next_tokens = sample(logits, temperature, top_p, generator)
            out: list[int | None] = []
            for b, t in enumerate(next_tokens.tolist()):
                stopped[b] = stopped[b] or t in stops
                out.append(None if stopped[b] else t)
            yield Step(out, logits)
            if all(stopped) or step == max_new_tokens - 1:
                return
            logits = step_fn(model, next_tokens[:, None], cache, pos + step, adapter_kv)
    finally:
        if compile:
            _STATIC_CACHES[model] = cache


def _stop_set(eos_id, stop_ids, vocab_size: int) -> frozenset:
    if stop_ids is not None and not isinstance(stop_ids, (list, tuple, set, frozenset)):
        raise TypeError(f"stop_ids must be a list or set of token ids, got {type(stop_ids).__name__}")
    stops = set() if stop_ids is None else set(stop_ids)
    if eos_id is not None:
        stops.add(eos_id)
    bad = [t for t in stops if isinstance(t, bool) or not isinstance(t, int)]
    if bad:
        raise TypeError(f"eos_id and stop_ids must be ints, got {bad[:3]}")
    outside = sorted(t for t in stops if not 0 <= t < vocab_size)  # eos_id was checked with the request
    if outside:
        raise ValueError(f"stop_ids {outside[:3]} are outside the vocabulary [0, {vocab_size})")
    return frozenset(stops)


def _adapter_kv(model, batch: int, prompt_offset, adapters, adapter_bank) -> list:
    if adapters is None:
        if adapter_bank is not None:
            raise ValueError("adapter_bank was given without adapters= (one choice per prompt)")
        return model.adapter_kv(prompt_offset, batch)
    from llama_adapter.multi_adapter import AdapterBank

    if prompt_offset is not None:
        raise ValueError("prompt_offset cannot be combined with adapters= (per-row adapters)")
    if not isinstance(adapters, (list, tuple)) or len(adapters) != batch:
        got = len(adapters) if isinstance(adapters, (list, tuple)) else type(adapters).__name__
        raise ValueError(f"adapters must be a list with one entry per prompt ({batch}), got {got}")
    bank = AdapterBank(model) if adapter_bank is None else adapter_bank
    if bank.model is not model:
        raise ValueError("adapter_bank was built for another model")
    return bank.adapter_kv(adapters)


def _decoder(model, batch: int, length: int, compile: bool, compile_options: dict | None):
    """(decode step, KV cache for `length` positions): eager over a fresh cache, or compiled over the model's
    static one (`_take_static_cache`; the caller puts it back when done)."""
    if compile:
        device = model.tok_embeddings.weight.device
        return compiled_decode_step(device, compile_options), _take_static_cache(model, batch, length)
    return decode_step, model.new_cache(batch, max_len=length)


def decode_step(model, tokens, cache, input_pos, adapter_kv) -> torch.Tensor:
    """Logits (B, vocab) of one new token per row (tokens (B, 1)) at positions input_pos (B,)."""
    return model(tokens, cache=cache, input_pos=input_pos, adapter_kv=adapter_kv)[:, -1]


_COMPILED_STEPS: dict = {}


def compiled_decode_step(device: torch.device, options: dict | None = None) -> Callable:
    """`decode_step` under torch.compile(fullgraph=True), one per set of options (dynamo guards tell models apart).

    The step's logits are cloned out: a CUDA-graph replay overwrites its outputs at the next step.
    """
    if options is None:
        options = {"mode": "reduce-overhead"} if device.type == "cuda" else {}
    key = repr(sorted(options.items()))
    if key not in _COMPILED_STEPS:
        compiled = torch.compile(decode_step, fullgraph=True, **options)
        first = [True]

        def step(*args):
            torch.compiler.cudagraph_mark_step_begin()
            if not first[0]:
                return compiled(*args).clone()
            # the first call compiles: seconds to minutes with nothing else on screen, so say what is happening
            print(
                f"generate: compiling the decode step (torch.compile fullgraph, {options or 'default options'}); "
                "once per process",
                file=sys.stderr,
                flush=True,
            )
            start = time.perf_counter()
            out = compiled(*args).clone()
            first[0] = False
            print(f"generate: decode step compiled in {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
            return out

        _COMPILED_STEPS[key] = step
    return _COMPILED_STEPS[key]


# One static cache per model, kept between calls (gpt-fast's setup_caches): CUDA graphs replay on its fixed
# addresses. A call takes it out while it runs, so a second generation at the same time gets its own.
_STATIC_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _take_static_cache(model, batch: int, length: int):
    """A static cache for `length` positions, rounded up so that calls of similar lengths share one graph.

    Reuse is safe without zeroing: a call rewrites every position below each row's kv_lens before reading it.
    """
    max_len = min(model.params.max_seq_len, -(-length // 256) * 256)
    w = model.tok_embeddings.weight
    wanted = (batch, max_len, w.dtype, w.device)
    cache = _STATIC_CACHES.pop(model, None)
    if cache is None or (cache.batch, cache.max_len, cache.k[0].dtype, cache.k[0].device) != wanted:
        del cache  # free it before allocating the next one
        cache = model.new_cache(batch, max_len, static=True)
        for t in (*cache.k, *cache.v):
            # written in place by every step: CUDA graphs need them at fixed addresses; guard=False lets a new
            # cache re-record the graph rather than recompile it
            torch._dynamo.mark_static_address(t, guard=False)
    return cache


def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    *args,
    callback: Callable[[Step], None] | None = None,
    **options,
) -> list[list[int]]:
    """The new tokens of each prompt (the stop token itself not included); `callback(step)` sees every step as it
    comes. The other arguments (temperature, top_p, eos_id, seed, adapters, compile, stop_ids, ...) are
    `generate_stream`'s, documented there."""
    results: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(model, prompts, max_new_tokens, *args, **options):
        if callback is not None:
            callback(step)
        for row, t in zip(results, step.tokens):
            if t is not None:
                row.append(t)
    return results
