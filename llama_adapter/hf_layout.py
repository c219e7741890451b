"""How the transformers drop-in (`llama_adapter.hf`) turns transformers' masks and packing into the fused op's
layouts: per-row kv_lens, packed sequences (cu_seqlens), or unpadding a padded batch.

Masks. The mask function registered with the attention (`padding_mask`) hands the attention one of four things
(once per model forward), all of which run the fused op:
- None: no padding; every key the layer sees is visible, causal aligned bottom-right (training, prefill, decoding
  with a DynamicCache).
- a (B,) int32 tensor: valid lengths of a static cache without padding (kv_lens; no device sync to build it).
- a (B, L) bool padding mask (1 = token), as transformers' FlashAttention-2 path gets. Without a past (training,
  prefill: L = the number of queries) the batch is unpadded into packed sequences (cu_seqlens, max_seqlen) for the
  varlen kernel and the output padded back. Pads before a row's first token get the gated prompt attention (no
  word is visible to them: what SDPA + PEFT give, and the shifted LM loss reads that pad's logits); other pads
  get zero, as in FA2. With a past (decoding), each row's valid keys are gathered to the front (what FA2's
  unpadding copies too) and attended with per-row kv_lens. Any 0/1 pattern works, left or right padding alike,
  except that the tokens fed with a cache must not be padding.
- PackedSequences (below).
Rows packed without a mask (position_ids restarting at each sequence, found once per forward outside torch.compile,
or FA2's cu_seq_lens_q keywords, as transformers' DataCollatorWithFlattening gives) take the varlen kernel too.
A 4D mask, a sliding window shorter than the keys, or padding among the new tokens of a cached step raise
ValueError: there is no unfused fallback.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def padding_mask(
    batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None, **kwargs
):
    """transformers mask interface for "llama_adapter": None, (B,) int32 valid lengths, a (B, L) bool mask, or
    PackedSequences.

    Called once per model forward (not per layer). Device syncs: `all()` on a given 2D mask, as in transformers'
    FlashAttention-2 mask, and reading the packing probe where transformers built a packed mask function."""
    # A new forward: its mask and FA2 keywords are read afresh (their tensors may be buffers refilled in place).
    _last_packing[0] = _last_plan[0] = None
    if attention_mask is not None:
        if attention_mask.dim() == 1:  # already ours: generate builds a static cache's mask ahead, then again
            return attention_mask
        if attention_mask.dim() != 2:
            return attention_mask  # a 4D mask: the attention says what it supports
        mask = attention_mask[:, -kv_length:].bool()
        if isinstance(q_offset, int) and kv_length == q_offset + q_length and mask.shape[1] < kv_length:
            # a growing cache (a static one's kv_length is its capacity): the mask must cover every key, else its
            # columns cannot be matched to keys (SDPA would silently misread it too)
            raise ValueError(
                f"attention_mask covers {mask.shape[1]} positions, but the attention sees {kv_length} keys ("
                f"{q_offset} cached, {q_length} new): pass the mask of every token so far, as generate() does"
            )
        if not bool(mask.all()):
            return mask
        if mask.shape[1] == kv_length:
            return None
        return torch.full((batch_size,), mask.shape[1], dtype=torch.int32, device=mask.device)
    packing_possible = kv_length == q_length > 1 and isinstance(q_offset, int) and q_offset == 0  # no cache
    if packing_possible and not kwargs.get("allow_is_causal_skip", True):
        packed = _packed_sequences(batch_size, q_length, mask_function, kwargs.get("device", "cpu"))
        if packed is not None:
            return packed
    if isinstance(q_offset, torch.Tensor):  # a static cache: kv_length is its capacity, q_offset what it holds
        filled = (q_offset + q_length).to(torch.int32).reshape(1)
        return filled.expand(batch_size).contiguous()  # the kernels index kv_lens with stride 1
    if kv_length != q_offset + q_length:  # a static cache before its first write reports q_offset as the int 0
        device = kwargs.get("device", "cpu")
        return torch.full((batch_size,), q_offset + q_length, dtype=torch.int32, device=device)
    return None


def check_window(sliding_window, n_keys: int) -> None:
    # A window reaching every key changes nothing (Mistral v0.2+ has none; v0.1's 4096 covers shorter inputs).
    if sliding_window is not None and n_keys > sliding_window:
        raise ValueError(
            f"the llama_adapter attention has no sliding window: sliding_window={sliding_window} must cover all "
            f"{n_keys} keys (use inputs and caches of at most {sliding_window} tokens)"
        )


class PackedSequences(NamedTuple):
    """Rows holding several sequences each, laid end to end: FlashAttention-varlen's cu_seqlens and max_seqlen."""

    cu_seqlens: torch.Tensor  # (S+1,) int32 over the B*N flattened tokens
    max_seqlen: int


def _packed_sequences(batch_size, q_length, mask_function, device) -> PackedSequences | None:
    """The packing transformers found in position_ids (restarting at each sequence), read off its mask function.

    transformers builds a packed mask function only without a mask and a cache. Probing it on the sub-diagonal
    (query i, key i - 1) is O(B*N): key i - 1 is hidden from query i exactly where a new sequence starts. Reading the
    result is one device sync per forward; under torch.compile that would break the graph, so packing is then only
    taken from FA2's cu_seq_lens_q keyword (transformers' DataCollatorWithFlattening gives it)."""
    if mask_function is None or torch.compiler.is_compiling():
        return None
    rows = torch.arange(batch_size, device=device)[:, None]
    queries = torch.arange(1, q_length, device=device)[None, :]
    starts = torch.ones(batch_size, q_length, dtype=torch.bool, device=device)
    starts[:, 1:] = ~mask_function(rows, 0, queries, queries - 1)
    if not bool(starts[:, 1:].any()):
        return None
    bounds = torch.nonzero(starts.reshape(-1)).reshape(-1)
    cu_seqlens = torch.cat([bounds, bounds.new_tensor([batch_size * q_length])]).to(torch.int32)
    return PackedSequences(cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))


def kwarg_packing(query, key, cu_seq_lens_q, cu_seq_lens_k, max_length_q) -> PackedSequences | None:
    """FA2's padding-free keywords (cu_seq_lens_q/_k, max_length_q) as PackedSequences, or None without them."""
    if cu_seq_lens_q is None:
        return None
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"cu_seq_lens_q packs {query.shape[2]} queries, but the layer has {key.shape[2]} keys")
    keywords = (cu_seq_lens_q, cu_seq_lens_k, max_length_q)
    last = _last_packing[0]
    if last is not None and all(a is b for a, b in zip(last[0], keywords)):
        return last[1]  # every layer of a forward gets these very objects: check and convert them once (syncs)
    if cu_seq_lens_k is not None and not torch.equal(cu_seq_lens_k, cu_seq_lens_q):
        raise ValueError("the llama_adapter attention needs cu_seq_lens_k equal to cu_seq_lens_q (self-attention)")
    cu_seqlens = cu_seq_lens_q.to(torch.int32)
    max_seqlen = int(max_length_q) if max_length_q is not None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    _last_packing[0] = (keywords, PackedSequences(cu_seqlens, max_seqlen))
    return _last_packing[0][1]


_last_packing: list[tuple | None] = [None]  # the current forward's keywords and their PackedSequences


class _PaddingPlan(NamedTuple):
    """What a (B, L) padding mask means for the op, worked out (with its device syncs) once per model forward."""

    mask: torch.Tensor  # the mask it was made for: every layer of one forward gets this very tensor
    n_queries: int
    lengths: torch.Tensor  # (B,) int32 real tokens per row
    tokens: torch.Tensor | None  # no past: (T,) flat indices of real tokens, packed by cu_seqlens
    cu_seqlens: torch.Tensor | None
    max_seqlen: int
    leading: torch.Tensor | None  # no past: flat indices of pads before a row's first token
    order: torch.Tensor | None  # with a past: (B, longest) cache slots, real tokens first; None if no pad in reach


_last_plan: list[_PaddingPlan | None] = [None]  # the current forward's; holding its mask keeps its id unique


def _padding_plan(mask: torch.Tensor, n_queries: int) -> _PaddingPlan:
    plan = _last_plan[0]
    if plan is not None and plan.mask is mask and plan.n_queries == n_queries:
        return plan
    B, L = mask.shape
    lengths = mask.sum(dim=1, dtype=torch.int32)
    tokens = cu_seqlens = leading = order = None
    max_seqlen = int(lengths.max())
    if L == n_queries:  # no past: FA2-style unpadding into the varlen kernel
        tokens = torch.nonzero(mask.reshape(-1)).reshape(-1)
        cu_seqlens = torch.zeros(B + 1, dtype=torch.int32, device=mask.device)
        cu_seqlens[1:] = torch.cumsum(lengths, 0)
        leading = torch.nonzero((mask.cumsum(dim=1) == 0).reshape(-1)).reshape(-1)
    else:
        if not bool(mask[:, L - n_queries :].all()):
            raise ValueError(
                "with a KV cache the new tokens must not be padding: the llama_adapter attention supports padding "
                "(left, right or anywhere) in the tokens of a step without a past, and any padding already in the cache"
            )
        if int(lengths.min()) < L:  # the pads' cache slots must leave: real tokens to the front, in order
            order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :max_seqlen]
    plan = _PaddingPlan(mask, n_queries, lengths, tokens, cu_seqlens, max_seqlen, leading, order)
    _last_plan[0] = plan
    return plan


def attend_padded(attend, query, key, value, mask, has_prompt):
    """`attend` under a (B, L) bool padding mask: unpad into packed sequences without a past, compact keys with one.

    Padded query positions get what SDPA with transformers' mask gives them where the loss can read it: a pad
    before a row's first token sees no word (output = the gated prompt attention; the shifted LM loss reads its
    logits, predicting the row's first token). Other pads (after the last token, or between tokens) get zero, as
    in FA2."""
    B, Hq, Nq, D = query.shape
    L = mask.shape[1]
    if not Nq <= L <= key.shape[2]:
        raise ValueError(
            f"attention_mask covers {L} positions; it must cover the {Nq} queries and at most the {key.shape[2]} keys"
        )
    plan = _padding_plan(mask, Nq)
    key, value = key[:, :, :L], value[:, :, :L]  # a static cache holds its capacity; the mask says what is filled
    if plan.tokens is None:  # a past: per-row cache lengths over its real tokens
        if plan.order is not None:
            index = plan.order[:, None, :, None].expand(B, key.shape[1], plan.order.shape[1], D)
            key, value = key.gather(2, index), value.gather(2, index)  # (B, Hkv, longest, D)
        return attend(query, key, value, kv_lens=plan.lengths).transpose(1, 2)

    def packed(t, rows):  # (B, H, L, D) -> (1, H, len(rows), D)
        return t.transpose(1, 2).reshape(B * L, t.shape[1], D).index_select(0, rows).transpose(0, 1)[None]

    out = query.new_zeros(B * L, Hq, D)
    if plan.tokens.numel():
        o = attend(
            *(packed(t, plan.tokens) for t in (query, key, value)),
            cu_seqlens=plan.cu_seqlens,
            max_seqlen=plan.max_seqlen,
        )
        out = out.index_copy(0, plan.tokens, o[0].transpose(0, 1))
    if has_prompt and plan.leading.numel():
        no_words = key.new_zeros(1, key.shape[1], 1, D)  # kv_lens = 0: the op's word output is 0
        o = attend(packed(query, plan.leading), no_words, no_words, kv_lens=plan.lengths.new_zeros(1))
        out = out.index_copy(0, plan.leading, o[0].transpose(0, 1))
    return out.view(B, L, Hq, D)
