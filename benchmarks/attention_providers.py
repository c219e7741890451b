"""The attention providers bench_attention compares (its docstring describes each), and the reference each one's
output is checked against. A provider is fn(q, k, v, ak, av, g) -> out: prompt shared by the batch, gate per head.
"""

from __future__ import annotations

import torch

from benchmarks.common import HAS_CUDA

PROVIDERS = ("fused", "fused_noprompt", "sdpa_adapter", "sdpa_flash_adapter", "eager", "flex")


class Unavailable(Exception):
    """This provider cannot run here (no CUDA, torch too old); the message becomes the rows' error."""


def sdpa_choice(q, k, v, causal: bool) -> str:
    """The backend torch SDPA picks for these inputs, read from its dispatcher (private API: best effort)."""
    try:
        from torch.nn.attention import SDPBackend

        return SDPBackend(torch._fused_sdp_choice(q, k, v, is_causal=causal)).name
    except Exception:
        return "default"


def make_provider(name: str, *, causal: bool, scale: float):
    """fn(q, k, v, ak, av, g) -> out, and a label for the row's `backend`."""
    kw = dict(causal=causal, sm_scale=scale, kv_lens=None)
    if name in ("fused", "fused_noprompt"):
        from llama_adapter.ops import fused_adapter_attention

        if name == "fused":
            return (lambda q, k, v, ak, av, g: fused_adapter_attention(q, k, v, ak, av, g, **kw)), "triton"
        return (lambda q, k, v, ak, av, g: fused_adapter_attention(q, k, v, None, None, None, **kw)), "triton"
    if name == "eager":
        from llama_adapter.baselines import eager_adapter_attention

        return (lambda q, k, v, ak, av, g: eager_adapter_attention(q, k, v, ak, av, g, **kw)), "eager"
    if name == "sdpa_adapter":
        from llama_adapter.baselines import sdpa_adapter_attention

        return (lambda q, k, v, ak, av, g: sdpa_adapter_attention(q, k, v, ak, av, g, **kw)), "sdpa"
    if name == "sdpa_flash_adapter":
        if not HAS_CUDA:
            raise Unavailable("skipped: SDPA's FlashAttention backend needs CUDA")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from llama_adapter.baselines import sdpa_adapter_attention

        def flash(q, k, v, ak, av, g):
            # the backward kernel is fixed by the forward's choice, so the context need not cover backward
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return sdpa_adapter_attention(q, k, v, ak, av, g, **kw)

        return flash, "sdpa:FLASH_ATTENTION"
    if name == "flex":
        return make_flex(causal=causal, scale=scale), "flex(compiled)"
    raise ValueError(f"unknown provider {name!r}; known: {PROVIDERS}")


def reference_for(provider: str, causal: bool, scale: float):
    """What a provider's output is checked against: SDPA + separate prompt (without the prompt for the floor)."""
    from llama_adapter.baselines import sdpa_adapter_attention

    if provider == "fused_noprompt":
        return lambda q, k, v, ak, av, g: sdpa_adapter_attention(q, k, v, causal=causal, sm_scale=scale)
    return lambda q, k, v, ak, av, g: sdpa_adapter_attention(q, k, v, ak, av, g, causal=causal, sm_scale=scale)


def make_flex(*, causal: bool, scale: float):
    """The flex provider: compiled FlexAttention for the words, the prompt and the gated sum compiled beside it."""
    if not HAS_CUDA:
        raise Unavailable("skipped: FlexAttention is only compiled on CUDA here (CPU inductor too slow for a smoke)")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        raise Unavailable(f"skipped: torch {torch.__version__} has no FlexAttention") from None

    def prompt_and_merge(words, q, ak, av, g):
        # Ka ~ 10 keys would be padded to a 128-key block in flex: plain matmuls, fused by inductor instead.
        groups = q.shape[1] // ak.shape[0]
        ak, av = ak.repeat_interleave(groups, 0), av.repeat_interleave(groups, 0)  # (Hq, Ka, D)
        probs = torch.softmax((q @ ak.transpose(-1, -2)).float() * scale, dim=-1).to(q.dtype)
        return words + g.to(q.dtype).view(1, -1, 1, 1) * (probs @ av)

    # one graph per (N, grad): past dynamo's recompile limit (8) flex would silently run uncompiled and slow
    from torch._dynamo import config as dynamo_config

    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, limit):
            setattr(dynamo_config, limit, max(64, getattr(dynamo_config, limit)))
    # two graphs: inductor's CPU flex template cannot take the merge as an epilogue, and on the GPU this is
    # the usual way flex is used (compiled on its own)
    words = torch.compile(flex_attention, dynamic=False)
    prompt = torch.compile(prompt_and_merge, dynamic=False)
    masks = {}

    def flex(q, k, v, ak, av, g):
        Nq, Nk = q.shape[2], k.shape[2]
        if causal and (Nq, Nk) not in masks:

            def bottom_right(b, h, q_idx, kv_idx):
                return kv_idx <= q_idx + (Nk - Nq)

            masks[Nq, Nk] = create_block_mask(bottom_right, None, None, Nq, Nk, device=q.device)
        out = words(q, k, v, block_mask=masks.get((Nq, Nk)), scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        return prompt(out, q, ak, av, g)

    return flex
