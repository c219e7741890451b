"""Forward kernel: causal word attention and gated prompt attention in one FlashAttention-2 style pass.

Per (query block, batch x query head) program, with s = sm_scale and scores kept in log2 units (c = s * log2 e;
the row max is taken on the raw scores q k^T and c enters once per score, in exp2(x c - max), one FFMA):

    O_w = softmax_causal(s q k^T) v      online softmax over key blocks: unmasked blocks first, then the
                                         few blocks that straddle the diagonal or the end of the keys (masked)
    O_a = softmax(s q ak^T) av           the Ka prompt keys' own softmax, exact in one pass when Ka fits one
                                         tile (Ka <= 64: the paper's 10); else its log-sum-exp in a first pass
                                         and g A av in a second. With TMA (sm90) the softmax runs before the
                                         key loop (its loads overlap the first key tiles'), else after it
                                         (pointer loads hold more registers across the loop)
    o   = O_w + g_h O_a                  g A / l_a meets av in one dot on the output's accumulator

Saved for the backward, both in log2 units (`lse = max + log2(sum)` of the scaled scores times log2 e):
lse_w (B, Hq, Nq) and lse_a (B, Hq, Nq). A row that sees no word key (causal with Nq > Nk, or kv_lens[b] = 0)
gets O_w = 0 and lse_w = +inf, so its recomputed probabilities are 0.

Causal aligns bottom-right over L = kv_lens[b] (or Nk) keys: query i sees key j iff j <= i + L - Nq and j < L.
VARLEN (packed sequences, FlashAttention's cu_seqlens): B = 1 and grid row pid = s * Hq + h runs sequence s, whose
rows cu[s] .. cu[s+1] - 1 are its queries and its keys (Nq = Nk = its length); blocks past its end exit at once.
GQA/MQA: query head h reads key/value head h // (Hq / Hkv). A prompt shared by the batch has batch stride 0;
a gate (Hq,) likewise. Accumulation is fp32; probabilities meet V in V's dtype, as in FlashAttention.
On sm90, k and v arrive as TMA tensor descriptors when their layout allows (the launcher; `_kv_tiles`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (
    LOG2E,
    NEG_BIG,
    SPEC_DTYPES,
    SPEC_HEAD_DIMS,
    compile_spec,
    device_arch,
    dot_precision,
    fitting_configs,
    gate_strides,
    interpreting,
    key_length,
    load_tile,
    load_tile_t,
    prompt_block,
    prompt_strides,
    select_configs,
    sequence_of,
    size_bucket,
    sm90_mma,
    visible_key_range,
)


@triton.jit
def _kv_tiles(
    k_src,
    v_src,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    b,
    hk,
    row0,
    start_n,
    offs_n,
    offs_d,
    L,
    MASKED: tl.constexpr,
    KV_TMA: tl.constexpr,
    ZERO_V_PAST_L: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """(k^T (D, BLOCK_N), v (BLOCK_N, D)) for keys start_n .. start_n + BLOCK_N of one head.

    Pointer path: k_src / v_src point at the head's first key; MASKED tiles read keys >= L as zero.
    KV_TMA: k_src / v_src are (B, Hkv, Nk, D) tensor descriptors, read by the TMA engine into shared memory;
    keys past Nk come back zero, but keys L .. Nk - 1 (kv_lens, or the next packed sequence) are real memory,
    possibly never written (a KV cache): their scores are masked to -inf, and ZERO_V_PAST_L zeroes their values,
    since 0 * NaN would still reach the output."""
    if KV_TMA:
        k = k_src.load([b, hk, row0 + start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = v_src.load([b, hk, row0 + start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        if MASKED and ZERO_V_PAST_L:
            v = tl.where(offs_n[:, None] < L, v, 0.0)
        return tl.trans(k), v
    else:
        k_t = load_tile_t(k_src, offs_n, offs_d, stride_kn, stride_kd, L, MASKED)
        v = load_tile(v_src, offs_n, offs_d, stride_vn, stride_vd, L, MASKED)
        return k_t, v


@triton.jit
def _attend_blocks(
    acc,
    m_i,
    l_i,
    q,
    k_src,
    v_src,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    b,
    hk,
    row0,
    offs_m,
    offs_d,
    lo,
    hi,
    L,
    shift,
    qk_scale,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PREC: tl.constexpr,
    PIPELINE_DIAGONAL: tl.constexpr,
    KV_TMA: tl.constexpr,
    ZERO_V_PAST_L: tl.constexpr,
):
    """Online softmax of q against keys lo .. hi (step BLOCK_N); MASKED blocks hide keys >= L and, if CAUSAL,
    keys past the row's diagonal (j > i + shift). The row max is taken on the raw scores (qk_scale > 0), so the
    scale costs one FFMA per score inside the exp2 argument instead of a multiply per score before the max.
    PIPELINE_DIAGONAL software-pipelines the masked loop too (with TMA: fewer instructions and registers);
    with pointer loads its prologue's registers next to the unmasked loop's brought spills (sm80), so not there."""
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=1 if MASKED and not PIPELINE_DIAGONAL else None):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t, v = _kv_tiles(
            k_src,
            v_src,
            stride_kn,
            stride_kd,
            stride_vn,
            stride_vd,
            b,
            hk,
            row0,
            start_n,
            offs_n,
            offs_d,
            L,
            MASKED,
            KV_TMA,
            ZERO_V_PAST_L,
            BLOCK_N,
            HEAD_DIM,
        )
        s = tl.dot(q, k_t, input_precision=DOT_PREC)
        if MASKED:
            visible = offs_n[None, :] < L
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + shift)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc=acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prompt_scores(
    q, ak_base, stride_akn, stride_akd, start_a, offs_d, Ka, BLOCK_A: tl.constexpr, DOT_PREC: tl.constexpr
):
    """Raw (unscaled) scores of q against prompt keys start_a .. start_a + BLOCK_A; -inf past Ka."""
    offs_a = start_a + tl.arange(0, BLOCK_A)
    ak_t = load_tile_t(ak_base, offs_a, offs_d, stride_akn, stride_akd, Ka, True)  # (D, BLOCK_A)
    s = tl.dot(q, ak_t, input_precision=DOT_PREC)
    return tl.where(offs_a[None, :] < Ka, s, float("-inf"))


@triton.jit
def _prompt_softmax(
    q,
    ak_base,
    stride_akn,
    stride_akd,
    offs_d,
    Ka,
    g,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_A: tl.constexpr,
    ONE_PROMPT_TILE: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """The prompt's own softmax: (g A / l_a in q's dtype, lse_a) when Ka fits one tile (Ka = 10, the paper:
    exact, one pass, so g O_a is one more dot with the av tile); for longer prompts (q, lse_a) from an online
    pass over the tiles, g A av then taking a second pass after the key loop."""
    if ONE_PROMPT_TILE:
        s_a = _prompt_scores(q, ak_base, stride_akn, stride_akd, 0, offs_d, Ka, BLOCK_A, DOT_PREC)
        m_a = tl.max(s_a, 1) * qk_scale
        p_a = tl.math.exp2(s_a * qk_scale - m_a[:, None])
        l_a = tl.sum(p_a, 1)
        return (p_a * (g / l_a)[:, None]).to(q.dtype), m_a + tl.math.log2(l_a)
    else:
        m_a = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
        l_a = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_a in tl.range(0, Ka, BLOCK_A, num_stages=1):
            s_a = _prompt_scores(q, ak_base, stride_akn, stride_akd, start_a, offs_d, Ka, BLOCK_A, DOT_PREC)
            m_new = tl.maximum(m_a, tl.max(s_a, 1) * qk_scale)
            l_a = l_a * tl.math.exp2(m_a - m_new) + tl.sum(tl.math.exp2(s_a * qk_scale - m_new[:, None]), 1)
            m_a = m_new
        return q, m_a + tl.math.log2(l_a)


@triton.jit
def adapter_attention_fwd_kernel(
    Q,
    K,
    V,
    AK,
    AV,
    Gate,
    KVLens,
    CuSeqlens,
    Out,
    LseW,
    LseA,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_akb,
    stride_akh,
    stride_akn,
    stride_akd,
    stride_avb,
    stride_avh,
    stride_avn,
    stride_avd,
    stride_gb,
    stride_gh,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    Hq,
    GROUP,
    Nq,
    Nk,
    Ka,
    qk_scale,
    NQ_KEY,
    NK_KEY,  # autotune buckets only
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_A: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PROMPT: tl.constexpr,
    ONE_PROMPT_TILE: tl.constexpr,
    HAS_KVLENS: tl.constexpr,
    VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr,
    PIPELINE_DIAGONAL: tl.constexpr = False,
    KV_TMA: tl.constexpr = False,
    PROMPT_FIRST: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    h = pid_bh % Hq
    hk = h // GROUP
    b, row0, n_q, n_k = sequence_of(CuSeqlens, pid_bh, Hq, Nq, Nk, VARLEN)
    start_m = pid_m * BLOCK_M
    if VARLEN:
        if start_m >= n_q:  # the grid covers the longest sequence
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = load_tile(Q + b * stride_qb + h * stride_qh + row0 * stride_qm, offs_m, offs_d, stride_qm, stride_qd, n_q, True)
    row_ok = offs_m < n_q
    lse_offs = (b * Hq + h) * Nq + row0 + offs_m

    if HAS_PROMPT:
        ak_base = AK + b * stride_akb + hk * stride_akh
        av_base = AV + b * stride_avb + hk * stride_avh
        g = tl.load(Gate + b * stride_gb + h * stride_gh).to(tl.float32)
        if PROMPT_FIRST:
            p_a, lse_a = _prompt_softmax(
                q, ak_base, stride_akn, stride_akd, offs_d, Ka, g, qk_scale, BLOCK_M, BLOCK_A, ONE_PROMPT_TILE, DOT_PREC
            )
            tl.store(LseA + lse_offs, lse_a, mask=row_ok)

    L = key_length(KVLens, b, n_k, HAS_KVLENS)
    shift = L - n_q
    full, hi = visible_key_range(start_m, n_q, L, CAUSAL, BLOCK_M, BLOCK_N)
    if KV_TMA:
        k_src = K
        v_src = V
    else:
        k_src = K + b * stride_kb + hk * stride_kh + row0 * stride_kn
        v_src = V + b * stride_vb + hk * stride_vh + row0 * stride_vn
    b32 = b.to(tl.int32)
    hk32 = hk.to(tl.int32)
    row32 = row0.to(tl.int32)
    zero_v = HAS_KVLENS or VARLEN
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attend_blocks(
        acc,
        m_i,
        l_i,
        q,
        k_src,
        v_src,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        b32,
        hk32,
        row32,
        offs_m,
        offs_d,
        0,
        full,
        L,
        shift,
        qk_scale,
        False,
        CAUSAL,
        BLOCK_N,
        HEAD_DIM,
        DOT_PREC,
        PIPELINE_DIAGONAL,
        KV_TMA,
        zero_v,
    )
    acc, m_i, l_i = _attend_blocks(
        acc,
        m_i,
        l_i,
        q,
        k_src,
        v_src,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        b32,
        hk32,
        row32,
        offs_m,
        offs_d,
        full,
        hi,
        L,
        shift,
        qk_scale,
        True,
        CAUSAL,
        BLOCK_N,
        HEAD_DIM,
        DOT_PREC,
        PIPELINE_DIAGONAL,
        KV_TMA,
        zero_v,
    )
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(LseW + lse_offs, tl.where(has_key, m_i + tl.math.log2(l_safe), float("inf")), mask=row_ok)

    if HAS_PROMPT:
        if not PROMPT_FIRST:
            p_a, lse_a = _prompt_softmax(
                q, ak_base, stride_akn, stride_akd, offs_d, Ka, g, qk_scale, BLOCK_M, BLOCK_A, ONE_PROMPT_TILE, DOT_PREC
            )
            tl.store(LseA + lse_offs, lse_a, mask=row_ok)
        if ONE_PROMPT_TILE:
            av = load_tile(av_base, tl.arange(0, BLOCK_A), offs_d, stride_avn, stride_avd, Ka, True)
            o = tl.dot(p_a.to(av.dtype), av, acc=o, input_precision=DOT_PREC)
        else:
            for start_a in tl.range(0, Ka, BLOCK_A, num_stages=1):
                s_a = _prompt_scores(q, ak_base, stride_akn, stride_akd, start_a, offs_d, Ka, BLOCK_A, DOT_PREC)
                av = load_tile(av_base, start_a + tl.arange(0, BLOCK_A), offs_d, stride_avn, stride_avd, Ka, True)
                a = g * tl.math.exp2(s_a * qk_scale - lse_a[:, None])
                o = tl.dot(a.to(av.dtype), av, acc=o, input_precision=DOT_PREC)

    out_ptrs = Out + b * stride_ob + h * stride_oh + (row0 + offs_m[:, None]) * stride_om + offs_d[None, :] * stride_od
    tl.store(out_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None])


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim; D 64/128/256 compile without spills for sm80/sm90 under
# triton 3.6 and 3.9 (kernel_report; benchmarks/NOTES.md, "Forward kernel at the instruction level"). sm80 at
# D = 256 needs 16-row blocks: 32-row ones spill (triton 3.6, 32x32 w8 s2: 84 LDL/STL), as does 64x64 w8 at
# D = 128 (104). On sm90 a 64-row tile takes 4 warps (one warpgroup): at 8 both warpgroups would compute the same
# 64 rows (twice the MUFU.EX2 and HGMMA); at D = 256, 128x64 w8 and 64x64 w4 spill, so the key tile is 32 wide.
FWD_CONFIGS = {
    80: {
        16: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
        32: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
        64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
        128: [(128, 64, 8, 3), (128, 32, 8, 3)],
        256: [(16, 64, 4, 2)],
    },
    90: {
        16: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
        32: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
        64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
        128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (64, 64, 4, 3), (128, 32, 8, 3)],
        256: [(128, 32, 8, 2), (64, 32, 4, 2), (64, 32, 4, 3)],
    },
}


try:  # host-side TMA descriptors: triton >= 3.4 (3.6 on the GPU machines, 3.9 here)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: pointer loads only
    TensorDescriptor = None


def fwd_smem_bytes(block_m: int, block_n: int, head_dim: int, num_stages: int) -> int:
    """The q tile and num_stages buffers of k and v tiles (2-byte elements), plus 1 KB for the TMA mbarriers
    and their alignment: what triton 3.6 and 3.9 allocate for the forward on sm90 (kernel_report's `shared`,
    exact for most configs, at most 1000 bytes over; the prompt's tiles and p reuse that space). sm80 allocates
    less (one k/v stage fewer, q not always staged)."""
    return 2 * head_dim * (block_m + 2 * num_stages * block_n) + 1024


def _set_kv_block(nargs):
    """Autotune pre-hook: a TMA descriptor's box is the launched config's (BLOCK_N, D) tile."""
    for name in ("K", "V"):
        if TensorDescriptor is not None and isinstance(nargs[name], TensorDescriptor):
            nargs[name].block_shape = [1, 1, nargs["BLOCK_N"], nargs["HEAD_DIM"]]


@functools.cache
def _tuned(head_dim: int, arch: int, smem: int):
    configs = [
        triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_set_kv_block)
        for c in select_configs(FWD_CONFIGS, head_dim, arch, smem, fwd_smem_bytes)
    ]
    return triton.autotune(configs, key=["NQ_KEY", "NK_KEY", "HEAD_DIM", "CAUSAL", "HAS_PROMPT", "VARLEN"])(
        adapter_attention_fwd_kernel
    )


def _tma_ready(t: torch.Tensor) -> bool:
    """A (B, H, N, D) tensor TMA can read: 2-byte elements, unit last stride, 16-byte aligned base and strides
    (positive: an expanded, stride-0 view stays on the pointer path)."""
    if t.element_size() != 2 or t.stride(3) != 1 or t.data_ptr() % 16:
        return False
    return all(stride > 0 and stride * 2 % 16 == 0 for stride in t.stride()[:3])


def _kv_descriptors(k, v, block_n: int):
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, t.shape[3]]) for t in (k, v))


def adapter_attention_fwd(
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
    out=None,
    config=None,
):
    """Launch the forward. Inputs as `llama_adapter.adapter_attention` (checked by the caller; with cu_seqlens,
    max_seqlen is required: the grid covers max_seqlen rows per sequence).

    Returns (o, lse_w, lse_a): o (B, Hq, Nq, D) in q's dtype (written into `out` if given), lse_w and lse_a
    (B, Hq, Nq) fp32 in log2 units (lse_a None without a prompt). `config` = {"BLOCK_M", "BLOCK_N",
    "num_warps", "num_stages"} bypasses autotuning (tests use it to vary the block shapes); its optional keys
    "KV_TMA" (tensor-descriptor or pointer loads of k and v) and "PROMPT_FIRST" (the prompt's softmax before or
    after the key loop) override what the device would get (both True on sm90 when k and v suit TMA, else False).
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    has_prompt = adapter_k is not None
    n_prompt = adapter_k.shape[-2] if has_prompt else 0
    block_a = prompt_block(n_prompt) if has_prompt else 16
    varlen = cu_seqlens is not None
    rows, batches = (max_seqlen, cu_seqlens.shape[0] - 1) if varlen else (Nq, B)
    if out is None:
        out = _common.new_output(q.shape, q.dtype, q.device)
    lse_w = _common.new_output((B, Hq, Nq), torch.float32, q.device)
    lse_a = _common.new_output((B, Hq, Nq), torch.float32, q.device) if has_prompt else None
    arch, smem = device_arch(q.device) if not interpreting() else (80, 0)
    kv_tma = arch == 90 and TensorDescriptor is not None and _tma_ready(k) and _tma_ready(v)
    prompt_first = kv_tma  # pointer loads keep more registers live: the prompt goes after the loop (sm80 too)
    if config is not None:
        config = dict(config)
        kv_tma = config.pop("KV_TMA", kv_tma)
        prompt_first = config.pop("PROMPT_FIRST", prompt_first)
    k_arg, v_arg = _kv_descriptors(k, v, config["BLOCK_N"] if config else 16) if kv_tma else (k, v)
    args = (
        q,
        k_arg,
        v_arg,
        adapter_k if has_prompt else q,
        adapter_v if has_prompt else q,
        gate if has_prompt else q,
        kv_lens if kv_lens is not None else q,
        cu_seqlens if varlen else q,
        out,
        lse_w,
        lse_a if has_prompt else lse_w,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *prompt_strides(adapter_k),
        *prompt_strides(adapter_v),
        *gate_strides(gate),
        *out.stride(),
        Hq,
        Hq // Hkv,
        Nq,
        Nk,
        n_prompt,
        sm_scale * LOG2E,
        size_bucket(rows),
        size_bucket(rows if varlen else Nk),
    )
    consts = dict(
        HEAD_DIM=D,
        BLOCK_A=block_a,
        CAUSAL=causal,
        HAS_PROMPT=has_prompt,
        ONE_PROMPT_TILE=n_prompt <= block_a,
        HAS_KVLENS=kv_lens is not None,
        VARLEN=varlen,
        DOT_PREC=dot_precision(q.dtype),
        PIPELINE_DIAGONAL=kv_tma,
        KV_TMA=kv_tma,
        PROMPT_FIRST=prompt_first,
    )
    heads = batches * Hq
    if config is not None:
        grid = ((rows + config["BLOCK_M"] - 1) // config["BLOCK_M"], heads)
        adapter_attention_fwd_kernel[grid](*args, **consts, **config)
    else:
        _tuned(D, arch, smem)[lambda meta: ((rows + meta["BLOCK_M"] - 1) // meta["BLOCK_M"], heads)](*args, **consts)
    return out, lse_w, lse_a


def compile_specs(kv_tma: bool = True, prompt_first: bool | None = None) -> list[dict]:
    """Every autotune config of the forward, for sm80 and sm90, fp16 and bf16, D in 64/128/256 (see
    `_common.compile_spec`); each dict also names its "arch". Representative switches: causal, prompt of 10.
    On sm90 k and v are TMA descriptors, as the launcher passes contiguous tensors there (`kv_tma=False`: the
    pointer fallback); the prompt goes before the key loop with TMA, after it otherwise (`prompt_first` forces
    either)."""
    specs = []
    for arch in (80, 90):
        tma = kv_tma and arch == 90
        first = tma if prompt_first is None else prompt_first
        for dname in SPEC_DTYPES:
            elem = "*" + dname
            for D in SPEC_HEAD_DIMS:
                for bm, bn, warps, stages in fitting_configs(FWD_CONFIGS, D, arch, fwd_smem_bytes):
                    kv = f"tensordesc<{dname}[1, 1, {bn}, {D}]>" if tma else elem
                    pointers = dict(
                        Q=elem,
                        K=kv,
                        V=kv,
                        AK=elem,
                        AV=elem,
                        Gate="*fp32",
                        KVLens="*i32",
                        CuSeqlens="*i32",
                        Out=elem,
                        LseW="*fp32",
                        LseA="*fp32",
                    )
                    consts = dict(
                        HEAD_DIM=D,
                        BLOCK_M=bm,
                        BLOCK_N=bn,
                        BLOCK_A=prompt_block(10),
                        CAUSAL=True,
                        HAS_PROMPT=True,
                        ONE_PROMPT_TILE=True,
                        HAS_KVLENS=False,
                        VARLEN=False,
                        DOT_PREC="ieee",
                        PIPELINE_DIAGONAL=tma,
                        KV_TMA=tma,
                        PROMPT_FIRST=first,
                    )
                    name = f"fwd_sm{arch}_{dname}_d{D}_m{bm}_n{bn}_w{warps}_s{stages}"
                    spec = compile_spec(
                        name, adapter_attention_fwd_kernel, pointers, ("qk_scale",), consts, warps, stages
                    )
                    specs.append(dict(spec, arch=arch, sm90_mma=sm90_mma(bm)))
    return specs
