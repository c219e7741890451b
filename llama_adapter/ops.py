"""The fused op: Triton launchers wrapped as torch custom ops with autograd, so torch.compile traces them whole.

    llama_adapter::adapter_attention_fwd     (q, k, v, adapter_k?, adapter_v?, gate?, kv_lens?, causal, sm_scale,
                                              cu_seqlens? = None, max_seqlen = 0)
                                             -> (o, lse_w, lse_a)   lse in log2 units; lse_a empty without prompt
    llama_adapter::adapter_attention_bwd     -> (dq, dk, dv, dadapter_k, dadapter_v, dgate)   (empty if no prompt)
    llama_adapter::adapter_attention_decode  inference with few queries (flash-decoding kernel, kernels/decode.py)

`fused_adapter_attention` is what `llama_adapter.attention.adapter_attention` calls on the "triton" backend,
after `check_inputs`. Gradients flow to q, k, v, adapter_k, adapter_v and the effective gate (gate_act' is
the model's business). Shared prompts and GQA groups reduce their gradients deterministically (see
kernels/attention_bwd.py).
"""

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from llama_adapter.kernels._common import zeroed_outputs
from llama_adapter.kernels.attention_bwd import adapter_attention_bwd
from llama_adapter.kernels.attention_fwd import adapter_attention_fwd
from llama_adapter.kernels.decode import decode_attention

DECODE_MAX_QUERIES = 16


@torch.library.custom_op("llama_adapter::adapter_attention_fwd", mutates_args=())
def _fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    adapter_k: Tensor | None,
    adapter_v: Tensor | None,
    gate: Tensor | None,
    kv_lens: Tensor | None,
    causal: bool,
    sm_scale: float,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    o, lse_w, lse_a = _forward(q, k, v, adapter_k, adapter_v, gate, kv_lens, causal, sm_scale, cu_seqlens, max_seqlen)
    return o, lse_w, lse_a if lse_a is not None else lse_w.new_empty(0)


def _forward(q, k, v, adapter_k, adapter_v, gate, kv_lens, causal, sm_scale, cu_seqlens, max_seqlen):
    with zeroed_outputs(_unchecked_packing(cu_seqlens)):
        return adapter_attention_fwd(
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


def _unchecked_packing(cu_seqlens) -> bool:
    """cu_seqlens on a GPU was not read on the host (that costs a sync per call; `attention.check_inputs`): the
    kernels clamp it, and outputs start zeroed so rows that no sequence (or no grid row) covers read 0."""
    return cu_seqlens is not None and cu_seqlens.is_cuda


@_fwd_op.register_fake
def _(q, k, v, adapter_k, adapter_v, gate, kv_lens, causal, sm_scale, cu_seqlens=None, max_seqlen=0):
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    return q.new_empty(q.shape), lse, q.new_empty(q.shape[:3] if adapter_k is not None else 0, dtype=torch.float32)


@torch.library.custom_op("llama_adapter::adapter_attention_bwd", mutates_args=())
def _bwd_op(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    adapter_k: Tensor | None,
    adapter_v: Tensor | None,
    gate: Tensor | None,
    kv_lens: Tensor | None,
    o: Tensor,
    lse_w: Tensor,
    lse_a: Tensor,
    causal: bool,
    sm_scale: float,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    has_prompt = adapter_k is not None
    with zeroed_outputs(_unchecked_packing(cu_seqlens)):
        grads = adapter_attention_bwd(
            do,
            q,
            k,
            v,
            adapter_k,
            adapter_v,
            gate,
            o,
            lse_w,
            lse_a if has_prompt else None,
            causal=causal,
            sm_scale=sm_scale,
            kv_lens=kv_lens,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
        )
    if has_prompt:
        return grads
    empty = q.new_empty(0)
    return (*grads[:3], empty, empty.clone(), empty.clone())


@_bwd_op.register_fake
def _(
    do, q, k, v, adapter_k, adapter_v, gate, kv_lens, o, lse_w, lse_a, causal, sm_scale, cu_seqlens=None, max_seqlen=0
):
    def like(t):  # real grads are fresh contiguous tensors
        return q.new_empty(0) if t is None else t.new_empty(t.shape)

    return like(q), like(k), like(v), like(adapter_k), like(adapter_v), like(gate)


def _setup_context(ctx, inputs, output):
    q, k, v, adapter_k, adapter_v, gate, kv_lens, causal, sm_scale, *varlen = inputs
    o, lse_w, lse_a = output
    cu_seqlens, max_seqlen = varlen if varlen else (None, 0)
    ctx.save_for_backward(q, k, v, adapter_k, adapter_v, gate, kv_lens, cu_seqlens, o, lse_w, lse_a)
    ctx.causal, ctx.sm_scale, ctx.max_seqlen = causal, sm_scale, max_seqlen
    ctx.mark_non_differentiable(lse_w, lse_a)


def _backward(ctx, do, _dlse_w, _dlse_a):
    q, k, v, adapter_k, adapter_v, gate, kv_lens, cu_seqlens, o, lse_w, lse_a = ctx.saved_tensors
    dq, dk, dv, dak, dav, dgate = _bwd_op(
        do,
        q,
        k,
        v,
        adapter_k,
        adapter_v,
        gate,
        kv_lens,
        o,
        lse_w,
        lse_a,
        ctx.causal,
        ctx.sm_scale,
        cu_seqlens,
        ctx.max_seqlen,
    )
    if adapter_k is None:
        dak = dav = dgate = None
    return dq, dk, dv, dak, dav, dgate, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _decode_launcher():
    """The decode kernel's launcher; a function so that tests can count its launches."""
    return decode_attention


@torch.library.custom_op("llama_adapter::adapter_attention_decode", mutates_args=())
def _decode_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    adapter_k: Tensor | None,
    adapter_v: Tensor | None,
    gate: Tensor | None,
    kv_lens: Tensor | None,
    causal: bool,
    sm_scale: float,
) -> Tensor:
    o = _decode_launcher()(q, k, v, adapter_k, adapter_v, gate, causal=causal, sm_scale=sm_scale, kv_lens=kv_lens)
    return o.contiguous()


@_decode_op.register_fake
def _(q, k, v, adapter_k, adapter_v, gate, kv_lens, causal, sm_scale):
    return q.new_empty(q.shape)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def fused_adapter_attention(
    q,
    k,
    v,
    adapter_k=None,
    adapter_v=None,
    gate=None,
    *,
    causal=True,
    sm_scale,
    kv_lens=None,
    cu_seqlens=None,
    max_seqlen=None,
) -> Tensor:
    """Fused gated prompt attention on the Triton kernels (inputs checked by `attention.check_inputs`).

    Few queries without autograd (decode) go to the split-KV decode kernel when it is installed; everything
    else, packed sequences (cu_seqlens, max_seqlen: the longest one) always, runs the FlashAttention-style
    forward, differentiable in q, k, v, adapter_k, adapter_v and gate.

    Without autograd, outside torch.compile and on real tensors, the launchers are called directly: the custom
    ops exist for autograd and for tracing, and their dispatch (schema binding, the dynamo-disabled wrapper)
    cost a decode step more host time than the launcher itself (benchmarks/bench_host_overhead.py).
    """
    sm_scale = float(sm_scale)
    grad = _needs_grad(q, k, v, adapter_k, adapter_v, gate)
    packed = {} if cu_seqlens is None else dict(cu_seqlens=cu_seqlens, max_seqlen=int(max_seqlen))
    max_seqlen = packed.get("max_seqlen", 0)
    decode = not packed and not grad and q.shape[2] <= DECODE_MAX_QUERIES
    if not grad and not torch.compiler.is_compiling() and not isinstance(q, FakeTensor):
        if decode:
            return _decode_launcher()(
                q, k, v, adapter_k, adapter_v, gate, causal=causal, sm_scale=sm_scale, kv_lens=kv_lens
            )
        return _forward(q, k, v, adapter_k, adapter_v, gate, kv_lens, causal, sm_scale, cu_seqlens, max_seqlen)[0]
    args = (q, k, v, adapter_k, adapter_v, gate, kv_lens, causal, sm_scale)
    if decode:
        return _decode_op(*args)
    return _fwd_op(*args, *packed.values())[0]
