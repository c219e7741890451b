"""Where the tokens of one forward sit: one value from `data.collate` through `Transformer.forward` to the op.

- dense: rows (B, N), each one sequence from position 0 (training, evaluation; no cache).
- packed: one row (1, T) holding several sequences back to back, `cu_seqlens` (S+1,) int32 their boundaries
  (FlashAttention's varlen contract); RoPE positions restart at 0 in each, and each attends only within itself.
- cached: row b continues at position input_pos[b] in a `KVCache` and attends to its `kv_lens[b]` keys.

`KVCache` holds the keys and values a cached layout's layers write and read.

A layout is checked when it is built (a packed one on the CPU, where `collate` builds it, at no device sync)
and then only moved; the model reads the RoPE positions from it and each layer hands `op_kwargs()` to the op.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from llama_adapter.attention import packed_max_seqlen


@dataclass(frozen=True)
class Layout:
    positions: torch.Tensor  # (B|1, N) RoPE position of each token
    kv_lens: torch.Tensor | None = None  # cached: (B,) int32 keys each row attends to (cached and new)
    cu_seqlens: torch.Tensor | None = None  # packed: (S+1,) int32 sequence boundaries in the row
    max_seqlen: int | None = None  # packed: the longest sequence
    cache: KVCache | None = None  # cached: the KVCache the layers write their keys and values to

    @classmethod
    def dense(cls, n: int, device=None) -> Layout:
        return cls(torch.arange(n, device=device)[None])

    @classmethod
    def packed(cls, cu_seqlens: torch.Tensor, max_seqlen: int | None = None, total: int | None = None) -> Layout:
        """Sequences cu_seqlens[s] .. cu_seqlens[s+1] - 1 of one row of `total` tokens (None: cu_seqlens[-1]). A
        CPU cu_seqlens (what collate makes) is checked here for free. On a device it is checked only when
        max_seqlen must be read from it (the op checks it otherwise), and with max_seqlen and total both given
        building the layout costs no device sync."""
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            got = getattr(cu_seqlens, "shape", type(cu_seqlens).__name__)
            raise ValueError(f"cu_seqlens must be a tensor (S+1,) of sequence boundaries, got {got}")
        total = int(cu_seqlens[-1]) if total is None else total
        if max_seqlen is None or cu_seqlens.device.type == "cpu":
            longest = packed_max_seqlen(cu_seqlens, total)
            if max_seqlen is not None and max_seqlen < longest:
                raise ValueError(f"max_seqlen must be at least the longest sequence ({longest}), got {max_seqlen}")
            max_seqlen = longest if max_seqlen is None else max_seqlen
        cu = cu_seqlens.to(torch.int32)
        tokens = torch.arange(total, device=cu.device)
        seq = torch.searchsorted(cu[1:].long(), tokens, right=True)  # (T,) the sequence of each token
        return cls((tokens - cu.long()[seq])[None], cu_seqlens=cu, max_seqlen=max_seqlen)

    @classmethod
    def cached(cls, cache, input_pos, batch: int, n: int, device) -> Layout:
        """n new tokens per row at input_pos (int or (B,)) onwards. A dynamic cache learns here (one host sync)
        how many keys this step reads; a static one never syncs: the caller keeps positions below its max_len."""
        if input_pos is None or cache.batch != batch:
            want = f"input_pos of shape ({batch},) and tokens batch {batch}"
            raise ValueError(f"cache (batch {cache.batch}) needs {want}")
        input_pos = torch.as_tensor(input_pos, device=device, dtype=torch.long).expand(batch)
        positions = input_pos[:, None] + torch.arange(n, device=device)  # (B, N)
        if not cache.static:
            cache.length = int(positions.max()) + 1
            if cache.length > cache.max_len:
                raise ValueError(f"positions up to {cache.length - 1} exceed the cache's max_len={cache.max_len}")
        return cls(positions, kv_lens=(input_pos + n).to(torch.int32), cache=cache)

    def to(self, device) -> Layout:
        def move(t):
            return None if t is None else t.to(device)

        return replace(
            self, positions=move(self.positions), kv_lens=move(self.kv_lens), cu_seqlens=move(self.cu_seqlens)
        )

    def check(self, batch: int, n: int, max_seq_len: int) -> None:
        """ValueError unless this layout fits tokens (batch, n) of a model with max_seq_len positions."""
        if self.cu_seqlens is not None and self.positions.shape[-1] != n:
            raise ValueError(f"cu_seqlens must end at T={n} (the tokens), got {self.positions.shape[-1]}")
        if self.positions.shape[-1] != n or self.positions.shape[0] not in (1, batch):
            raise ValueError(f"the layout's positions {tuple(self.positions.shape)} do not fit tokens ({batch}, {n})")
        if self.cu_seqlens is not None:
            if batch != 1:
                raise ValueError(f"cu_seqlens packs sequences into one row, tokens (1, T); got a batch of {batch}")
            if self.max_seqlen > max_seq_len:
                raise ValueError(f"a packed sequence has {self.max_seqlen} positions, more than max_seq_len")
        elif self.cache is None and n > max_seq_len:
            raise ValueError(f"tokens has {n} positions, more than max_seq_len={max_seq_len}")

    def op_kwargs(self) -> dict:
        """`adapter_attention`'s layout keywords."""
        return dict(kv_lens=self.kv_lens, cu_seqlens=self.cu_seqlens, max_seqlen=self.max_seqlen)


class KVCache:
    """Preallocated static keys/values, one (B, Hkv, max_len, D) pair per layer (gpt-fast style).

    static=False: attention reads the first `length` keys (the longest row's), which costs one host sync per
    forward to learn that length. static=True: attention always reads all max_len keys and `kv_lens` masks the
    unwritten ones, so shapes never change and a decode step compiles into one graph (CUDA graphs replay it).
    """

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, *, dtype, device, static=False):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.batch, self.max_len, self.static = batch, max_len, static
        self.length = 0  # keys in use this step (the longest row's): set once per forward, unless static

    def write(self, layer: int, k, v, positions):
        """Store k, v (B, Hkv, N, D) at per-row positions (B, N); return the first `length` cached keys/values."""
        index = positions[:, None, :, None].expand_as(k)
        self.k[layer].scatter_(2, index, k)
        self.v[layer].scatter_(2, index, v)
        if self.static:
            return self.k[layer], self.v[layer]
        return self.k[layer][:, :, : self.length], self.v[layer][:, :, : self.length]
