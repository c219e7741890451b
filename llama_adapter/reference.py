"""Plain PyTorch zero-init gated prompt attention: the test oracle and the CPU path.

Same signature as `llama_adapter.adapter_attention` (inputs are assumed checked). Low precision inputs
compute in float32, float32 and float64 in their own dtype. GQA groups query heads as (Hkv, G) so K/V are
never repeated. Rows that see no word key get zero word output (no NaN, in values or gradients).
"""

from __future__ import annotations

import math

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def word_mask(Nq: int, Nk: int, device, causal: bool = True, kv_lens=None, cu_seqlens=None) -> torch.Tensor:
    """Visible word keys: (Nq, Nk), or (B, 1, 1, Nq, Nk) with kv_lens. Causal aligns bottom-right. With
    cu_seqlens (packed sequences, Nq = Nk = cu_seqlens[-1]) the mask is block diagonal: a token sees only
    its own sequence's tokens (those before it, if causal)."""
    i = torch.arange(Nq, device=device)[:, None]
    j = torch.arange(Nk, device=device)[None, :]
    if cu_seqlens is not None:
        seq = torch.searchsorted(
            cu_seqlens[1:].to(device=device, dtype=torch.long), torch.arange(Nq, device=device), right=True
        )  # (T,) sequence id of each token
        same = seq[:, None] == seq[None, :]
        return same & (j <= i) if causal else same
    if kv_lens is None:
        return (j <= i + (Nk - Nq)) if causal else torch.ones(Nq, Nk, dtype=torch.bool, device=device)
    lens = kv_lens.to(device=device, dtype=torch.long).view(-1, 1, 1)  # (B, 1, 1)
    mask = j < lens
    if causal:
        mask = mask & (j <= i + lens - Nq)
    return mask[:, None, None]  # (B, 1, 1, Nq, Nk)


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
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    cdt = compute_dtype(q.dtype)
    qg = q.to(cdt).reshape(B, Hkv, G, Nq, D)  # (B, Hkv, G, Nq, D)

    scores = torch.einsum("bhgnd,bhmd->bhgnm", qg, k.to(cdt)) * scale  # (B, Hkv, G, Nq, Nk)
    mask = word_mask(Nq, Nk, q.device, causal, kv_lens, cu_seqlens)
    if not (causal or kv_lens is not None or cu_seqlens is not None):
        probs = torch.softmax(scores, dim=-1)
    else:
        seen = mask.any(dim=-1, keepdim=True)  # rows with at least one visible key
        scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~seen, 0.0)
        probs = torch.softmax(scores, dim=-1) * mask
    out = torch.einsum("bhgnm,bhmd->bhgnd", probs, v.to(cdt))

    if adapter_k is not None:
        ak, av = adapter_k.to(cdt), adapter_v.to(cdt)
        if ak.dim() == 3:  # shared by the batch
            ak, av = ak.unsqueeze(0), av.unsqueeze(0)  # (1, Hkv, Ka, D)
        a_scores = torch.einsum("bhgnd,bhmd->bhgnm", qg, ak.expand(B, -1, -1, -1)) * scale
        a_out = torch.einsum("bhgnm,bhmd->bhgnd", torch.softmax(a_scores, dim=-1), av.expand(B, -1, -1, -1))
        g = gate.to(cdt)
        g = g.view(1, Hkv, G, 1, 1) if g.dim() == 1 else g.view(B, Hkv, G, 1, 1)
        out = out + g * a_out
    return out.reshape(B, Hq, Nq, D).to(q.dtype)
