"""Test helpers: tiny random HF Llama models, the same weights as Meta and HF checkpoint dirs, a tiny tokenizer.

`float64_upcasts()` makes transformers' Llama (and PEFT's adaption prompt) compute in float64 throughout:
their RMSNorm, RoPE tables and softmaxes upcast to `torch.float32` / `torch.float`, which would round a
float64 model's activations to float32 (docs/design.md §7). Inside the context those names mean float64 in the
modules that use them, so it is their own code that runs, just without the rounding.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os

import torch

from llama_adapter.checkpoint_hf import hf_to_meta_name, unpermute_rotate_half

_UPCASTING_MODULES = (
    "transformers.models.llama.modeling_llama",
    "transformers.modeling_rope_utils",
    "peft.tuners.adaption_prompt.layer",
)


class _Float64Torch:
    """`torch`, except that `float` and `float32` name float64."""

    float = float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def float64_upcasts():
    """Build and run transformers' Llama / PEFT models inside this to get float64 norms, RoPE and softmax."""
    modules = [importlib.import_module(name) for name in _UPCASTING_MODULES]
    saved = [m.torch for m in modules]
    try:
        for m in modules:
            m.torch = _Float64Torch()
        yield
    finally:
        for m, t in zip(modules, saved):
            m.torch = t


def tiny_hf_config(**overrides):
    """A 3-layer GQA Llama (dim 64, 4 query / 2 kv heads, head_dim 16) with rope_theta != 10000.

    intermediate_size 192 is Meta's SwiGLU rule for dim 64 with multiple_of=32, so the Meta dir can express it.
    rope_scaling="llama3" swaps in LLaMA-3.1 scaling with Meta's constants (wavelengths of head_dim 16 at theta
    5e5 span all three of its bands).
    """
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if overrides.pop("rope_scaling", None) == "llama3":
        rope = dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        )
    kwargs = dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters=rope,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def random_hf_model(config=None, seed: int = 0, dtype: torch.dtype = torch.float64):
    """LlamaForCausalLM with O(1) activations (HF's 0.02-std init makes every logit nearly equal). Build float64
    models inside `float64_upcasts()` so their RoPE frequencies are computed in float64 too."""
    from transformers import LlamaForCausalLM

    config = config or tiny_hf_config()
    model = LlamaForCausalLM(config).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)
    return model


def meta_state_dict(hf_model) -> dict[str, torch.Tensor]:
    """The HF model's weights in Meta's names and interleaved q/k layout."""
    cfg = hf_model.config
    out = {}
    for name, t in hf_model.state_dict().items():
        meta = hf_to_meta_name(name)
        if meta is None:
            continue
        if meta.endswith("attention.wq.weight"):
            t = unpermute_rotate_half(t, cfg.num_attention_heads)
        elif meta.endswith("attention.wk.weight"):
            t = unpermute_rotate_half(t, cfg.num_key_value_heads)
        out[meta] = t.detach().clone()
    if "output.weight" not in out:  # tied
        out["output.weight"] = out["tok_embeddings.weight"].clone()
    return out


def _shard_dim(name: str, vocab_parallel_embedding: bool) -> int | None:
    if name == "tok_embeddings.weight":
        return 0 if vocab_parallel_embedding else 1
    if name == "output.weight" or name.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")):
        return 0
    if name.endswith(("wo.weight", "w2.weight")):
        return 1
    return None


def write_meta_dir(
    hf_model,
    path,
    n_shards: int = 1,
    *,
    multiple_of: int = 32,
    vocab_size: int | None = None,
    vocab_parallel_embedding: bool = False,
    dtype: torch.dtype | None = None,
) -> str:
    """Write the HF model's weights as Meta's params.json + consolidated.NN.pth (n_shards model-parallel files).

    Embeddings split by model dim (LLaMA-1/2) or by vocab (LLaMA-3, vocab_parallel_embedding=True);
    vocab_size=-1 writes Meta's "take it from the tokenizer" marker.
    """
    cfg = hf_model.config
    hidden = multiple_of * ((int(2 * 4 * cfg.hidden_size / 3) + multiple_of - 1) // multiple_of)
    if hidden != cfg.intermediate_size:
        raise ValueError(
            f"multiple_of={multiple_of} gives hidden_dim {hidden}, not intermediate_size {cfg.intermediate_size}"
        )
    os.makedirs(path, exist_ok=True)
    rope = cfg.rope_parameters
    params = dict(
        dim=cfg.hidden_size,
        n_layers=cfg.num_hidden_layers,
        n_heads=cfg.num_attention_heads,
        n_kv_heads=cfg.num_key_value_heads,
        vocab_size=cfg.vocab_size if vocab_size is None else vocab_size,
        multiple_of=multiple_of,
        ffn_dim_multiplier=None,
        norm_eps=cfg.rms_norm_eps,
        rope_theta=rope["rope_theta"],
    )
    if rope.get("rope_type") == "llama3":
        params["use_scaled_rope"] = True
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(params, f)
    state = meta_state_dict(hf_model)
    shards = [{} for _ in range(n_shards)]
    for name, t in state.items():
        t = t if dtype is None else t.to(dtype)
        split = _shard_dim(name, vocab_parallel_embedding)
        pieces = [t] * n_shards if split is None else t.chunk(n_shards, dim=split)
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, os.path.join(path, f"consolidated.{i:02d}.pth"))
    return str(path)


TOKENIZER_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: Tell me about alpacas. ### Response: Alpacas are small camelids from South America.",
    "The quick brown fox jumps over the lazy dog while the llama watches.",
    "Hello world! Numbers like 12, 345 and 6789 appear too.",
]


def train_sentencepiece(directory, vocab_size: int = 100, filename: str = "tokenizer.model") -> str:
    """Train a tiny BPE SentencePiece model (LLaMA's ids: unk 0, bos 1, eos 2, no pad) in-process."""
    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_CORPUS * 20),
        model_writer=proto,
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, filename)
    with open(path, "wb") as f:
        f.write(proto.getvalue())
    return path
