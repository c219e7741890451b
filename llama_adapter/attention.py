"""`adapter_attention`: the public op (docs/design.md §3), its input checks and backend dispatch.

    o = softmax_causal(s q k^T) v + g * softmax(s q ak^T) av

Backends: "triton" (fused kernels, `llama_adapter.ops`), "reference" (plain PyTorch, `llama_adapter.reference`),
and "auto" (Triton for CUDA tensors and under TRITON_INTERPRET=1, else the reference). "sdpa" and "eager"
(`llama_adapter.baselines`) are what other implementations do; benchmarks compare against them.
"""

from __future__ import annotations

import importlib
import math
import os
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensor

BACKENDS = ("auto", "triton", "reference", "sdpa", "eager")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_backend = "auto"


def set_attention_backend(name: str) -> None:
    """Choose how `adapter_attention` computes: "auto", "triton", "reference", "sdpa" or "eager"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_attention_backend() -> str:
    return _backend


def resolve_backend(device: torch.device) -> str:
    """The backend a call on `device` runs on now ("auto" resolved)."""
    if _backend != "auto":
        return _backend
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "reference"


# Packed sequences (cu_seqlens) by backend: the fused kernels skip the blocks between sequences, so packing saves
# the work padding costs; the reference builds a T x T mask (right, but slower than padding); the baselines
# (what other implementations do) take no cu_seqlens.
_PACKING = {"triton": "saves work", "reference": "costs work", "sdpa": None, "eager": None}


def supports_packing(device: torch.device, *, saves_work: bool = False) -> bool:
    """Whether a call on `device` takes packed sequences (cu_seqlens) on the backend it runs on now; with
    `saves_work`, whether packing there also costs less than padding (a trainer's question)."""
    packing = _PACKING[resolve_backend(device)]
    return packing == "saves work" if saves_work else packing is not None


def _shape(t) -> str:
    return "None" if t is None else str(tuple(t.shape))


def _layout(t):
    """What the structural checks read from one input: type, shape, dtype, device (None stays None)."""
    return None if t is None else (type(t), t.shape, t.dtype, t.device)


# Layout keys (`_layout` of every tensor input, causal's type, whether max_seqlen was given) that passed
# `_check_layout`: its verdict depends on nothing else, so a repeated call (every layer of every decode step)
# skips it. Bounded: a pathological caller with ever-new shapes resets it.
_CHECKED_LAYOUTS: set = set()
_CHECKED_LAYOUTS_MAX = 4096


def _layout_key(q, k, v, adapter_k, adapter_v, gate, causal, kv_lens, cu_seqlens, max_seqlen):
    """The `_CHECKED_LAYOUTS` key of a call, or None: not tensors (the full checks say which argument), or
    while torch.compile traces (a lookup in a module-level set would become a guard that cannot hold; the
    compiled graph runs the checks once per trace anyway)."""
    if torch.compiler.is_compiling():
        return None
    try:
        return (
            _layout(q),
            _layout(k),
            _layout(v),
            _layout(adapter_k),
            _layout(adapter_v),
            _layout(gate),
            _layout(kv_lens),
            _layout(cu_seqlens),
            type(causal),
            max_seqlen is None,
        )
    except AttributeError:
        return None


def _values_readable(t) -> bool:
    """Whether t's values can be read on the host without a device sync or breaking a trace: a real CPU tensor,
    outside torch.compile. (CUDA tensors are not read: that would sync every call; see README, "What is
    validated where".)"""
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and not isinstance(t, FakeTensor)


def check_inputs(
    q,
    k,
    v,
    adapter_k=None,
    adapter_v=None,
    gate=None,
    *,
    causal=True,
    sm_scale=None,
    kv_lens=None,
    cu_seqlens=None,
    max_seqlen=None,
):
    """Validate the op's inputs (docs/design.md §3) and return sm_scale as a float. Raises TypeError / ValueError.

    Types, shapes, dtypes and devices always; the values of the index-like inputs where they are readable on
    the host (`_values_readable`): kv_lens in [0, Nk]; cu_seqlens starting at 0, never decreasing, ending at
    T; max_seqlen at least the longest sequence. On a GPU those values are the caller's promise (as in
    FlashAttention), except that `adapter_attention` derives a missing max_seqlen from cu_seqlens and checks
    it then; the kernels clamp whatever arrives (`kernels/_common.py` key_length, sequence_of)."""
    key = _layout_key(q, k, v, adapter_k, adapter_v, gate, causal, kv_lens, cu_seqlens, max_seqlen)
    if key is None or key not in _CHECKED_LAYOUTS:
        _check_layout(q, k, v, adapter_k, adapter_v, gate, causal, kv_lens, cu_seqlens, max_seqlen)
        if key is not None:
            if len(_CHECKED_LAYOUTS) >= _CHECKED_LAYOUTS_MAX:
                _CHECKED_LAYOUTS.clear()
            _CHECKED_LAYOUTS.add(key)
    if kv_lens is not None and _values_readable(kv_lens):
        lens = kv_lens.tolist()
        if min(lens) < 0 or max(lens) > k.shape[2]:
            raise ValueError(f"kv_lens must lie in [0, Nk={k.shape[2]}] (valid keys per row), got {lens}")
    if cu_seqlens is not None and max_seqlen is not None:
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1:
            raise ValueError(f"max_seqlen must be a positive int (the longest sequence), got {max_seqlen!r}")
        if _values_readable(cu_seqlens):
            longest = packed_max_seqlen(cu_seqlens, q.shape[2])
            if max_seqlen < longest:
                raise ValueError(f"max_seqlen must be at least the longest sequence ({longest}), got {max_seqlen}")
    if sm_scale is None:
        return 1.0 / math.sqrt(q.shape[3])
    try:
        sm_scale = float(sm_scale)
    except (TypeError, ValueError):
        raise TypeError(f"sm_scale must be a number, got {sm_scale!r}") from None
    if not math.isfinite(sm_scale) or sm_scale <= 0:
        raise ValueError(f"sm_scale must be a positive finite number, got {sm_scale}")
    return sm_scale


def _check_layout(q, k, v, adapter_k, adapter_v, gate, causal, kv_lens, cu_seqlens, max_seqlen):
    B, Hq, Hkv, D = _check_words(q, k, v)
    if (adapter_k is None) != (adapter_v is None):
        raise ValueError("adapter_k and adapter_v must be given together (or both None)")
    if adapter_k is not None:
        _check_prompt(q, adapter_k, adapter_v, gate, Hkv)
    if gate is not None:
        _check_gate(q, gate, adapter_k)
    if kv_lens is not None:
        _check_kv_lens(q, kv_lens)
    if cu_seqlens is not None:
        _check_packed(q, k, adapter_k, gate, kv_lens, cu_seqlens, max_seqlen)
    elif max_seqlen is not None:
        raise ValueError("max_seqlen was given without cu_seqlens")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")


def _check_like_q(name, t, q):
    if t.dtype != q.dtype:
        raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")


def _check_words(q, k, v) -> tuple[int, int, int, int]:
    """q, k, v's types, shapes, dtypes and devices; returns (B, Hq, Hkv, D)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if q.dim() != 4:
        raise ValueError(f"q must have shape (B, Hq, Nq, D), got {_shape(q)}")
    B, Hq, Nq, D = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or t.shape[0] != B or t.shape[3] != D:
            raise ValueError(f"{name} must have shape (B={B}, Hkv, Nk, D={D}), got {_shape(t)}")
    if k.shape != v.shape:
        raise ValueError(f"v must have the shape of k {_shape(k)}, got {_shape(v)}")
    Hkv, Nk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"k heads must divide q heads (Hq={Hq}), got Hkv={Hkv}")
    if Nq < 1 or Nk < 1 or B < 1:
        raise ValueError(f"q and k need B, Nq, Nk >= 1, got q {_shape(q)}, k {_shape(k)}")
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"head dim D must be a power of two from 16 to 256, got D={D} (q {_shape(q)})")
    for name, t in (("k", k), ("v", v)):
        _check_like_q(name, t, q)
    return B, Hq, Hkv, D


def _check_prompt(q, adapter_k, adapter_v, gate, Hkv):
    B, Hq, _, D = q.shape
    if gate is None:
        raise ValueError(f"gate of shape ({Hq},) or ({B}, {Hq}) is required with adapter_k / adapter_v")
    for name, t in (("adapter_k", adapter_k), ("adapter_v", adapter_v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() == 3:
            ok = t.shape[0] == Hkv and t.shape[2] == D
        elif t.dim() == 4:
            ok = t.shape[0] == B and t.shape[1] == Hkv and t.shape[3] == D
        else:
            ok = False
        if not ok or t.shape[-2] < 1:
            raise ValueError(
                f"{name} must have shape (Hkv={Hkv}, Ka, D={D}) or (B={B}, Hkv={Hkv}, Ka, D={D}), got {_shape(t)}"
            )
        _check_like_q(name, t, q)
    if adapter_k.shape != adapter_v.shape:
        raise ValueError(f"adapter_v must have the shape of adapter_k {_shape(adapter_k)}, got {_shape(adapter_v)}")


def _check_gate(q, gate, adapter_k):
    B, Hq = q.shape[:2]
    if adapter_k is None:
        raise ValueError("gate was given without adapter_k / adapter_v")
    if not isinstance(gate, torch.Tensor):
        raise TypeError(f"gate must be a torch.Tensor, got {type(gate).__name__}")
    if not gate.is_floating_point():
        raise TypeError(f"gate must be a floating point tensor, got {gate.dtype}")
    if tuple(gate.shape) not in ((Hq,), (B, Hq)):
        raise ValueError(f"gate must have shape (Hq={Hq},) or (B={B}, Hq={Hq}), got {_shape(gate)}")
    if gate.device != q.device:
        raise ValueError(f"gate must be on q's device {q.device}, got {gate.device}")


def _check_kv_lens(q, kv_lens):
    B = q.shape[0]
    if not isinstance(kv_lens, torch.Tensor):
        raise TypeError(f"kv_lens must be a torch.Tensor of shape ({B},), got {type(kv_lens).__name__}")
    if kv_lens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"kv_lens must be int32 (or int64) of shape ({B},), got {kv_lens.dtype}")
    if tuple(kv_lens.shape) != (B,):
        raise ValueError(f"kv_lens must have shape (B={B},), got {_shape(kv_lens)}")
    if kv_lens.device != q.device:
        raise ValueError(f"kv_lens must be on q's device {q.device}, got {kv_lens.device}")


def _check_packed(q, k, adapter_k, gate, kv_lens, cu_seqlens, max_seqlen):
    T = q.shape[2]
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor of shape (S+1,), got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must have shape (S+1,) with S >= 1 sequences, got {_shape(cu_seqlens)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be on q's device {q.device}, got {cu_seqlens.device}")
    if kv_lens is not None:
        raise ValueError("cu_seqlens (packed sequences) and kv_lens (a padded KV cache) cannot be combined")
    if q.shape[0] != 1 or k.shape[2] != T:
        raise ValueError(
            f"with cu_seqlens, q must be (1, Hq, T, D) and k, v (1, Hkv, T, D) packed rows, "
            f"got q {_shape(q)}, k {_shape(k)}"
        )
    if adapter_k is not None and (adapter_k.dim() != 3 or gate.dim() != 1):
        raise ValueError(
            f"with cu_seqlens every sequence sees the shared prompt: adapter_k/adapter_v (Hkv, Ka, D) and gate (Hq,), "
            f"got adapter_k {_shape(adapter_k)}, gate {_shape(gate)}"
        )


def packed_max_seqlen(cu_seqlens: torch.Tensor, total: int) -> int:
    """The longest sequence of a packing, after checking that cu_seqlens runs from 0 up to `total` (one sync)."""
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != total or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0, never decrease and end at T={total}, got {cu}")
    return max(max(b - a for a, b in zip(cu, cu[1:])), 1)


def adapter_attention(
    q,
    k,
    v,
    adapter_k=None,
    adapter_v=None,
    gate=None,
    *,
    causal=True,
    sm_scale=None,
    kv_lens=None,
    cu_seqlens=None,
    max_seqlen=None,
):
    """Causal softmax attention over words plus a separately softmaxed, gated prompt attention.

    q (B, Hq, Nq, D); k, v (B, Hkv, Nk, D); adapter_k, adapter_v (Hkv, Ka, D) or (B, Hkv, Ka, D);
    gate (Hq,) or (B, Hq), effective values (gate_act already applied). causal aligns bottom-right: query i
    sees keys j <= i + Nk - Nq (with kv_lens, Nk is kv_lens[b] and keys j >= kv_lens[b] are ignored).
    A query that sees no word key gets zero word output. Returns (B, Hq, Nq, D) in q's dtype.

    Packed sequences (FlashAttention's varlen): cu_seqlens (S+1,) int32 with q (1, Hq, T, D), k, v (1, Hkv, T, D)
    and T = cu_seqlens[-1]; sequence s holds tokens cu_seqlens[s] .. cu_seqlens[s+1] - 1 and attends only within
    itself (causally if causal), every sequence seeing the shared prompt. max_seqlen (the longest sequence) sizes
    the kernels' grid; None computes it from cu_seqlens (a device sync) and checks cu_seqlens on the way.
    """
    scale = check_inputs(
        q,
        k,
        v,
        adapter_k,
        adapter_v,
        gate,
        causal=causal,
        sm_scale=sm_scale,
        kv_lens=kv_lens,
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
    )
    backend = resolve_backend(q.device)
    packed = {}
    if cu_seqlens is not None:
        if _PACKING[backend] is None:
            raise NotImplementedError(f"the {backend!r} attention backend does not take cu_seqlens (packed sequences)")
        if max_seqlen is None:
            max_seqlen = packed_max_seqlen(cu_seqlens, q.shape[2])
        packed = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    if backend == "triton":
        if q.dtype == torch.float64:
            raise TypeError("float64 inputs run on the reference backend only; the Triton kernels take fp16/bf16/fp32")
        if q.dtype == torch.bfloat16 and q.device.type == "cpu" and not isinstance(q, FakeTensor):
            # Triton's CPU interpreter computes in numpy, which has no bfloat16: results would be garbage.
            raise TypeError(
                "q is bfloat16, which the Triton interpreter (TRITON_INTERPRET=1, CPU) cannot compute: use float16 "
                "or float32 there, or the reference backend"
            )
    module, name = _IMPLS[backend]
    impl = getattr(sys.modules.get(module) or importlib.import_module(module), name)
    return impl(q, k, v, adapter_k, adapter_v, gate, causal=causal, sm_scale=scale, kv_lens=kv_lens, **packed)


# backend -> (module, function): imported on first use (the kernels' modules import triton), looked up per call
_IMPLS = {
    "triton": ("llama_adapter.ops", "fused_adapter_attention"),
    "reference": ("llama_adapter.reference", "adapter_attention"),
    "sdpa": ("llama_adapter.baselines", "sdpa_adapter_attention"),
    "eager": ("llama_adapter.baselines", "eager_adapter_attention"),
}
