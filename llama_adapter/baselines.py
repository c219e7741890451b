"""What other implementations compute for the gated prompt attention: the baselines the kernels must beat.

Both take `adapter_attention`'s signature (inputs already checked) and compute, per docs/design.md §1,

    o = softmax_causal(s q k^T) v + g * softmax(s q ak^T) av

- `sdpa_adapter_attention`: torch's scaled_dot_product_attention for the words and a second SDPA call for
  the prompt, summed with the gate: what PEFT's AdaptionPrompt and litgpt's adapter do. The word call uses
  `is_causal=True` where top-left and bottom-right alignment agree (Nq == Nk, no kv_lens), so SDPA can pick
  its flash / cuDNN / efficient kernels; otherwise it needs an explicit boolean mask.
- `eager_adapter_attention`: the official LLaMA-Adapter code's math: the (Nq, Nk) scores materialised with
  an additive -inf mask, softmax in float32 (or float64 for float64 inputs), probabilities cast back, and the
  prompt's probabilities scaled by the gate before their product with av.

A query that sees no word key gets zero word output, as in the reference: SDPA and an additive -inf mask
would give NaN there, so such rows are unmasked for the softmax and their word output zeroed afterwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama_adapter.reference import compute_dtype, word_mask

# enable_gqa arrived in torch 2.5; older versions get K/V repeated per query head.
_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _repeat_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, N, D) -> (B, Hkv * groups, N, D), query head h reading KV head h // groups (Meta's repeat_kv)."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _batched_prompt(t: torch.Tensor, B: int) -> torch.Tensor:
    return t.unsqueeze(0).expand(B, -1, -1, -1) if t.dim() == 3 else t  # (B, Hkv, Ka, D)


def _gate(gate: torch.Tensor, B: int, Hq: int, dtype: torch.dtype) -> torch.Tensor:
    return gate.to(dtype).view(1 if gate.dim() == 1 else B, Hq, 1, 1)


def _visible(Nq: int, Nk: int, device, causal: bool, kv_lens):
    """(mask, seen): mask (Nq, Nk) or (B, 1, Nq, Nk) with blind rows opened up; seen marks rows with a key.

    None, None where no mask is needed (non-causal without kv_lens)."""
    if not causal and kv_lens is None:
        return None, None
    mask = word_mask(Nq, Nk, device, causal, kv_lens)
    if mask.dim() == 5:
        mask = mask[:, 0]  # (B, 1, Nq, Nk)
    seen = mask.any(dim=-1, keepdim=True)  # (..., Nq, 1)
    return mask | ~seen, seen


def _sdpa(q, k, v, *, mask=None, is_causal=False, scale):
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True
        )
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


def sdpa_adapter_attention(q, k, v, adapter_k=None, adapter_v=None, gate=None, *, causal=True, sm_scale, kv_lens=None):
    """Words through torch SDPA, then a separate SDPA over the prompt, times the gate, added (PEFT / litgpt)."""
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    if causal and kv_lens is None and Nq == Nk:
        out = _sdpa(q, k, v, is_causal=True, scale=sm_scale)
    else:
        mask, seen = _visible(Nq, Nk, q.device, causal, kv_lens)
        out = _sdpa(q, k, v, mask=mask, scale=sm_scale)
        if seen is not None:  # multiply rather than test seen.all(): no host sync on the GPU
            out = out * seen.to(out.dtype)
    if adapter_k is not None:
        ak, av = _batched_prompt(adapter_k, B), _batched_prompt(adapter_v, B)
        out = out + _gate(gate, B, Hq, q.dtype) * _sdpa(q, ak, av, scale=sm_scale)
    return out


def eager_adapter_attention(q, k, v, adapter_k=None, adapter_v=None, gate=None, *, causal=True, sm_scale, kv_lens=None):
    """The official LLaMA-Adapter attention: N^2 scores, additive mask, upcast softmax, gated prompt probs."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    groups = Hq // Hkv
    sdt = compute_dtype(q.dtype)
    keys, values = _repeat_kv(k, groups), _repeat_kv(v, groups)  # (B, Hq, Nk, D)
    scores = torch.matmul(q, keys.transpose(2, 3)) * sm_scale  # (B, Hq, Nq, Nk)
    mask, seen = _visible(Nq, Nk, q.device, causal, kv_lens)
    if mask is not None:
        additive = torch.zeros(mask.shape, dtype=scores.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        scores = scores + additive
    probs = F.softmax(scores.to(sdt), dim=-1).type_as(q)
    out = torch.matmul(probs, values)
    if seen is not None:
        out = out * seen.to(out.dtype)
    if adapter_k is not None:
        ak = _repeat_kv(_batched_prompt(adapter_k, B), groups)  # (B, Hq, Ka, D)
        av = _repeat_kv(_batched_prompt(adapter_v, B), groups)
        a_scores = torch.matmul(q, ak.transpose(2, 3)) * sm_scale  # (B, Hq, Nq, Ka)
        a_probs = _gate(gate, B, Hq, q.dtype) * F.softmax(a_scores.to(sdt), dim=-1).type_as(q)
        out = out + torch.matmul(a_probs, av)
    return out
