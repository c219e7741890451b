"""Backward kernels for gated prompt attention (forward in `attention_fwd`; docs/design.md §1 has the math).

With P, A the word and prompt probabilities (recomputed from the saved log2 log-sum-exps), s = sm_scale:

    preprocess (per query block):  delta_a = do . O_a = rowsum(A * (do av^T)), A recomputed (Ka is tiny),
                                   D_w = rowsum(do * o) - g delta_a       (= do . O_w, NOT do . o)
    dK/dV (per key tile):          dv = sum P^T do,  dk = s sum dS^T q,  dS = P (do v^T - D_w); the loop runs
                                   over the query heads of the GQA group and the query blocks that see the keys
    dK/dV (per prompt tile):       the prompt's keys are one more, non-causal key tile with P -> g A and
                                   D_w -> delta_a: dav = sum g A^T do, dak = s sum dA^T q, dA = g A (do av^T -
                                   delta_a); one program per (sequence, kv head, BLOCK_A prompt keys)
    dQ (per query block):          dq = s (dS k + dA ak)
    torch afterwards:              a shared prompt's (sequence, kv head) slots summed over the batch;
                                   dgate = sum over rows of delta_a.

Deterministic: every gradient element is summed by one program in a fixed loop order (group heads, then query
blocks), and the cross-program sums (prompt over the batch, dgate over rows) are torch reductions of fixed
shape. No atomics, so two runs give bitwise equal gradients. The prompt programs come first in the dK/dV grid:
each loops over all Nq rows of the group, as long as the longest causal key tile, so they start early and
overlap the word tiles; their fp32 slots are (sequences, Hkv, Ka, D), not one per query block.

Tiles and warps: Triton may lay a chain of dots (S -> P -> dv, dS -> dk) out with every warp along the rows of
the first dot (warpsPerCTA [num_warps, 1], 16 rows each): seen on sm90 (wgmma) for both kernels and on sm80 for
dK/dV's S^T. A tile with fewer such rows than 16 x num_warps then computes S, P and dP in duplicate. The tables
hold only configs whose SASS shows one exp2 per score: BLOCK_M x BLOCK_N / (32 x num_warps) MUFU.EX2 per thread
per iteration of the hot loop (benchmarks/NOTES.md has the counts).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (
    INTERPRETER_BLOCK,
    LOG2E,
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

PREPROCESS_BLOCK_M = 64  # launched with Triton's defaults: 4 warps, 3 stages
PROMPT_BLOCK_M = 64  # query rows per step of the dK/dV kernel's prompt programs (tile BLOCK_A keys x 64 rows)


@triton.jit
def adapter_attention_bwd_preprocess_kernel(
    Q,
    AK,
    AV,
    Gate,
    Out,
    DO,
    LseA,
    DeltaW,
    DeltaA,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
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
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    Hq,
    GROUP,
    Nq,
    Ka,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_A: tl.constexpr,
    HAS_PROMPT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hq
    h = pid_bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Nq
    o = load_tile(Out + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_om, stride_od, Nq, True)
    do = load_tile(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dom, stride_dod, Nq, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_PROMPT:
        hk = h // GROUP
        g = tl.load(Gate + b * stride_gb + h * stride_gh).to(tl.float32)
        q = load_tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, Nq, True)
        lse_a = tl.load(LseA + pid_bh * Nq + offs_m, mask=row_ok, other=0.0)
        ak_base = AK + b * stride_akb + hk * stride_akh
        av_base = AV + b * stride_avb + hk * stride_avh
        # delta_a = do . O_a = sum_j A_ij (do_i . av_j): the dot is on the inputs' dtype with fp32 accumulation,
        # and A never gets rounded (dgate sums delta_a over every row, so a per-row fp16 rounding would show).
        delta_a = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_a in range(0, Ka, BLOCK_A):
            offs_a = start_a + tl.arange(0, BLOCK_A)
            ak_t = load_tile_t(ak_base, offs_a, offs_d, stride_akn, stride_akd, Ka, True)  # (D, BLOCK_A)
            av_t = load_tile_t(av_base, offs_a, offs_d, stride_avn, stride_avd, Ka, True)
            a = tl.math.exp2(tl.dot(q, ak_t, input_precision=DOT_PREC) * qk_scale - lse_a[:, None])
            a = tl.where(offs_a[None, :] < Ka, a, 0.0)
            delta_a += tl.sum(a * tl.dot(do, av_t, input_precision=DOT_PREC), 1)
        delta -= g * delta_a
        tl.store(DeltaA + pid_bh * Nq + offs_m, delta_a, mask=row_ok)
    tl.store(DeltaW + pid_bh * Nq + offs_m, delta, mask=row_ok)


@triton.jit
def _dkdv_blocks(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    dw_base,
    stride_qm,
    stride_qd,
    stride_dom,
    stride_dod,
    keys,
    offs_d,
    start,
    end,
    jump_at,
    jump,
    n_q,
    L,
    shift,
    gain,
    qk_scale,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    GAINED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Accumulate one key tile's dk (unscaled), dv over query blocks start .. end of one query head; MASKED blocks at
    or past `jump_at` are moved on by `jump` (the masked blocks are the diagonal ones and the partial last one).
    Only MASKED blocks mask anything: rows >= n_q read as zero (q = do = 0, so they add nothing), keys past L or
    after the causal diagonal get P = 0. GAINED (the prompt) scales P by the head's gate: dS and dv follow it.
    `keys`, L and shift count from the tile's first key: absolute key offsets stay out of the loops (with them
    live across the loops, ptxas spilled at 32 x 128 on sm90)."""
    for it in tl.range(start, end, BLOCK_M, num_stages=1 if MASKED else None):
        start_m = it
        if MASKED:
            start_m += tl.where(it >= jump_at, jump, 0)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_t = load_tile_t(q_base, offs_m, offs_d, stride_qm, stride_qd, n_q, MASKED)  # (D, BLOCK_M)
        do = load_tile(do_base, offs_m, offs_d, stride_dom, stride_dod, n_q, MASKED)  # (BLOCK_M, D)
        if MASKED:
            lse = tl.load(lse_base + offs_m, mask=offs_m < n_q, other=0.0)
            dw = tl.load(dw_base + offs_m, mask=offs_m < n_q, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            dw = tl.load(dw_base + offs_m)
        # the scale sits in the exp2 argument: one FFMA per score
        p_t = tl.math.exp2(tl.dot(k, q_t, input_precision=DOT_PREC) * qk_scale - lse[None, :])  # (keys, BLOCK_M)
        if MASKED:
            visible = keys[:, None] < L
            if CAUSAL:
                visible = visible & (keys[:, None] <= offs_m[None, :] + shift)
            p_t = tl.where(visible, p_t, 0.0)
        if GAINED:
            p_t = p_t * gain
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        ds_t = p_t * (tl.dot(v, tl.trans(do), input_precision=DOT_PREC) - dw[None, :])
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _dkdv_key_tile(
    k,
    v,
    keys,
    lo,
    mid,
    Q,
    DO,
    Lse,
    Delta,
    Gate,
    b,
    hk,
    row0,
    n_q,
    L,
    shift,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_gb,
    stride_gh,
    Hq,
    GROUP,
    Nq,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    GAINED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """(dk unscaled, dv) of one key tile, summed over the GQA group's query heads. Query blocks [lo, mid) need the
    key mask (diagonal, keys past L), so does the partial last block; the ones between run unmasked."""
    offs_d = tl.arange(0, HEAD_DIM)
    n_rows = (n_q + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    tail = tl.maximum(mid, n_q // BLOCK_M * BLOCK_M)  # first block after the unmasked run
    masked_end = lo + (mid - lo) + (n_rows - tail)
    dk = tl.zeros([k.shape[0], HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([k.shape[0], HEAD_DIM], dtype=tl.float32)
    for j in range(0, GROUP):
        h = hk * GROUP + j
        q_base = Q + b * stride_qb + h * stride_qh + row0 * stride_qm
        do_base = DO + b * stride_dob + h * stride_doh + row0 * stride_dom
        rows = (b * Hq + h) * Nq + row0
        gain = 1.0
        if GAINED:
            gain = tl.load(Gate + b * stride_gb + h * stride_gh).to(tl.float32)
        dk, dv = _dkdv_blocks(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            Lse + rows,
            Delta + rows,
            stride_qm,
            stride_qd,
            stride_dom,
            stride_dod,
            keys,
            offs_d,
            lo,
            masked_end,
            mid,
            tail - mid,
            n_q,
            L,
            shift,
            gain,
            qk_scale,
            True,
            CAUSAL,
            GAINED,
            BLOCK_M,
            DOT_PREC,
        )
        dk, dv = _dkdv_blocks(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            Lse + rows,
            Delta + rows,
            stride_qm,
            stride_qd,
            stride_dom,
            stride_dod,
            keys,
            offs_d,
            mid,
            tail,
            0,
            0,
            n_q,
            L,
            shift,
            gain,
            qk_scale,
            False,
            CAUSAL,
            GAINED,
            BLOCK_M,
            DOT_PREC,
        )
    return dk, dv


@triton.jit
def adapter_attention_bwd_dkdv_kernel(
    Q,
    K,
    V,
    AK,
    AV,
    Gate,
    DO,
    LseW,
    LseA,
    DeltaW,
    DeltaA,
    KVLens,
    CuSeqlens,
    DK,
    DV,
    DAK,
    DAV,
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
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_dvd,
    Hq,
    Hkv,
    GROUP,
    Nq,
    Nk,
    Ka,
    qk_scale,
    sm_scale,
    NQ_KEY,
    NK_KEY,  # autotune buckets only
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_A: tl.constexpr,
    PROMPT_BLOCK_M: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PROMPT: tl.constexpr,
    HAS_KVLENS: tl.constexpr,
    VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    hk = pid_bh % Hkv
    b, row0, n_q, n_k = sequence_of(CuSeqlens, pid_bh, Hkv, Nq, Nk, VARLEN)
    offs_d = tl.arange(0, HEAD_DIM)
    n_prompt_tiles = (Ka + BLOCK_A - 1) // BLOCK_A if HAS_PROMPT else 0
    if pid_n < n_prompt_tiles:
        # The prompt's keys are one more (non-causal, gated) key tile of this head: its program writes this
        # (sequence, kv head)'s dak, dav into its own slot, summed over the group here in a fixed order. Tile
        # rows past Ka (zero keys) are not masked in the unmasked run: each row's sums are its own, and those
        # rows are never stored.
        offs_a = pid_n * BLOCK_A + tl.arange(0, BLOCK_A)
        ak = load_tile(AK + b * stride_akb + hk * stride_akh, offs_a, offs_d, stride_akn, stride_akd, Ka, True)
        av = load_tile(AV + b * stride_avb + hk * stride_avh, offs_a, offs_d, stride_avn, stride_avd, Ka, True)
        dak, dav = _dkdv_key_tile(
            ak,
            av,
            tl.arange(0, BLOCK_A),
            0,
            0,
            Q,
            DO,
            LseA,
            DeltaA,
            Gate,
            b,
            hk,
            row0,
            n_q,
            Ka - pid_n * BLOCK_A,
            0,
            stride_qb,
            stride_qh,
            stride_qm,
            stride_qd,
            stride_dob,
            stride_doh,
            stride_dom,
            stride_dod,
            stride_gb,
            stride_gh,
            Hq,
            GROUP,
            Nq,
            qk_scale,
            HEAD_DIM,
            False,
            True,
            PROMPT_BLOCK_M,
            DOT_PREC,
        )
        part = pid_bh * Ka * HEAD_DIM + offs_a[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(DAK + part, dak * sm_scale, mask=offs_a[:, None] < Ka)
        tl.store(DAV + part, dav, mask=offs_a[:, None] < Ka)
    else:
        start_n = (pid_n - n_prompt_tiles) * BLOCK_N  # past n_k (the grid covers the longest sequence): no work
        # rows relative to the tile's first key (see _dkdv_blocks): per-thread offsets are tl.arange only
        keys = tl.arange(0, BLOCK_N)
        first = row0 + start_n
        n_keys = n_k - start_n
        k = load_tile(
            K + b * stride_kb + hk * stride_kh + first * stride_kn, keys, offs_d, stride_kn, stride_kd, n_keys, True
        )
        v = load_tile(
            V + b * stride_vb + hk * stride_vh + first * stride_vn, keys, offs_d, stride_vn, stride_vd, n_keys, True
        )
        L = key_length(KVLens, b, n_k, HAS_KVLENS)
        shift = L - n_q
        # Query blocks [lo, mid) need the key mask; every later one sees all keys of this tile.
        n_rows = (n_q + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        if CAUSAL:
            lo = tl.minimum(tl.maximum(start_n - shift, 0), n_q) // BLOCK_M * BLOCK_M
            mid = (tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), n_q) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        else:
            lo = 0
            mid = 0
        mid = tl.where(start_n + BLOCK_N > L, n_rows, mid)  # keys past L in this tile: mask everywhere
        lo = tl.where(start_n >= L, n_rows, lo)  # no valid key at all: dk = dv = 0 (or nothing to store)
        mid = tl.maximum(mid, lo)
        dk, dv = _dkdv_key_tile(
            k,
            v,
            keys,
            lo,
            mid,
            Q,
            DO,
            LseW,
            DeltaW,
            Gate,
            b,
            hk,
            row0,
            n_q,
            L - start_n,
            shift - start_n,
            stride_qb,
            stride_qh,
            stride_qm,
            stride_qd,
            stride_dob,
            stride_doh,
            stride_dom,
            stride_dod,
            stride_gb,
            stride_gh,
            Hq,
            GROUP,
            Nq,
            qk_scale,
            HEAD_DIM,
            CAUSAL,
            False,
            BLOCK_M,
            DOT_PREC,
        )
        dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + first * stride_dkn
        dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + first * stride_dvn
        dk_ptrs += keys[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
        dv_ptrs += keys[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
        tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=keys[:, None] < n_keys)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=keys[:, None] < n_keys)


@triton.jit
def _dq_blocks(
    dq,
    q,
    do,
    lse,
    dw,
    k_base,
    v_base,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
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
    DOT_PREC: tl.constexpr,
):
    """Accumulate dS k (unscaled) of one query block over key blocks lo .. hi."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t = load_tile_t(k_base, offs_n, offs_d, stride_kn, stride_kd, L, MASKED)  # (D, BLOCK_N)
        v_t = load_tile_t(v_base, offs_n, offs_d, stride_vn, stride_vd, L, MASKED)  # (D, BLOCK_N)
        p = tl.math.exp2(tl.dot(q, k_t, input_precision=DOT_PREC) * qk_scale - lse[:, None])
        if MASKED:
            visible = offs_n[None, :] < L
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + shift)
            p = tl.where(visible, p, 0.0)
        ds = p * (tl.dot(do, v_t, input_precision=DOT_PREC) - dw[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PREC)
    return dq


@triton.jit
def _dq_prompt(
    dq,
    q,
    do,
    gate_ptr,
    lse_a_base,
    delta_a_base,
    ak_base,
    av_base,
    stride_akn,
    stride_akd,
    stride_avn,
    stride_avd,
    offs_m,
    offs_d,
    row_ok,
    Ka,
    qk_scale,
    BLOCK_A: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Add dA ak (unscaled, like the word part) to dq. The prompt's own gradients come from the dK/dV kernel."""
    g = tl.load(gate_ptr).to(tl.float32)
    lse_a = tl.load(lse_a_base + offs_m, mask=row_ok, other=0.0)
    delta_a = tl.load(delta_a_base + offs_m, mask=row_ok, other=0.0)
    for start_a in range(0, Ka, BLOCK_A):
        offs_a = start_a + tl.arange(0, BLOCK_A)
        ak_t = load_tile_t(ak_base, offs_a, offs_d, stride_akn, stride_akd, Ka, True)  # (D, BLOCK_A)
        av_t = load_tile_t(av_base, offs_a, offs_d, stride_avn, stride_avd, Ka, True)
        a = tl.math.exp2(tl.dot(q, ak_t, input_precision=DOT_PREC) * qk_scale - lse_a[:, None])
        a = tl.where(offs_a[None, :] < Ka, a, 0.0)  # (BLOCK_M, BLOCK_A)
        da = g * a * (tl.dot(do, av_t, input_precision=DOT_PREC) - delta_a[:, None])
        dq = tl.dot(da.to(ak_t.dtype), tl.trans(ak_t), acc=dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def adapter_attention_bwd_dq_kernel(
    Q,
    K,
    V,
    AK,
    AV,
    Gate,
    DO,
    LseW,
    LseA,
    DeltaW,
    DeltaA,
    KVLens,
    CuSeqlens,
    DQ,
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
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_dqd,
    Hq,
    GROUP,
    Nq,
    Nk,
    Ka,
    qk_scale,
    sm_scale,
    NQ_KEY,
    NK_KEY,  # autotune buckets only
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_A: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PROMPT: tl.constexpr,
    HAS_KVLENS: tl.constexpr,
    VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr,
    PROMPT_FIRST: tl.constexpr,
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
    row_ok = offs_m < n_q
    q = load_tile(Q + b * stride_qb + h * stride_qh + row0 * stride_qm, offs_m, offs_d, stride_qm, stride_qd, n_q, True)
    do = load_tile(
        DO + b * stride_dob + h * stride_doh + row0 * stride_dom, offs_m, offs_d, stride_dom, stride_dod, n_q, True
    )
    row_base = (b * Hq + h) * Nq + row0  # lse / delta rows, absolute
    lse = tl.load(LseW + row_base + offs_m, mask=row_ok, other=0.0)
    dw = tl.load(DeltaW + row_base + offs_m, mask=row_ok, other=0.0)
    L = key_length(KVLens, b, n_k, HAS_KVLENS)
    shift = L - n_q
    full, hi = visible_key_range(start_m, n_q, L, CAUSAL, BLOCK_M, BLOCK_N)
    k_base = K + b * stride_kb + hk * stride_kh + row0 * stride_kn
    v_base = V + b * stride_vb + hk * stride_vh + row0 * stride_vn
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # the prompt's part goes before the word loop or after it, whichever compiles without spills (PROMPT_FIRST)
    if HAS_PROMPT and PROMPT_FIRST:
        dq = _dq_prompt(
            dq,
            q,
            do,
            Gate + b * stride_gb + h * stride_gh,
            LseA + row_base,
            DeltaA + row_base,
            AK + b * stride_akb + hk * stride_akh,
            AV + b * stride_avb + hk * stride_avh,
            stride_akn,
            stride_akd,
            stride_avn,
            stride_avd,
            offs_m,
            offs_d,
            row_ok,
            Ka,
            qk_scale,
            BLOCK_A,
            DOT_PREC,
        )
    dq = _dq_blocks(
        dq,
        q,
        do,
        lse,
        dw,
        k_base,
        v_base,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
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
        DOT_PREC,
    )
    dq = _dq_blocks(
        dq,
        q,
        do,
        lse,
        dw,
        k_base,
        v_base,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
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
        DOT_PREC,
    )
    if HAS_PROMPT and not PROMPT_FIRST:
        dq = _dq_prompt(
            dq,
            q,
            do,
            Gate + b * stride_gb + h * stride_gh,
            LseA + row_base,
            DeltaA + row_base,
            AK + b * stride_akb + hk * stride_akh,
            AV + b * stride_avb + hk * stride_avh,
            stride_akn,
            stride_akd,
            stride_avn,
            stride_avd,
            offs_m,
            offs_d,
            row_ok,
            Ka,
            qk_scale,
            BLOCK_A,
            DOT_PREC,
        )
    dq = dq * sm_scale  # word and prompt parts alike: dq = s (dS k + dA ak)

    rows_m = row0 + offs_m[:, None]
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + rows_m * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim; BLOCK_M is the query block, BLOCK_N the key block.
# D 64/128/256: spill-free under triton 3.6 and 3.9, one exp2 per score (module docstring), fewest hot-loop
# instructions per FLOP first (benchmarks/NOTES.md, backward section). D 16/32 are not in the compile specs.
DKDV_CONFIGS = {
    80: {
        16: [(32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3)],
        32: [(32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3)],
        64: [(32, 128, 8, 2), (32, 64, 4, 3), (16, 128, 8, 2)],
        128: [(128, 32, 8, 2), (64, 32, 4, 1), (64, 16, 4, 2)],
        256: [(64, 32, 8, 1), (64, 16, 8, 2)],
    },
    90: {
        16: [(32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3)],
        32: [(32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3)],
        64: [(32, 128, 8, 3), (32, 64, 4, 3), (16, 128, 8, 3)],
        128: [(16, 128, 8, 2)],  # 32x128 w8 s3: 616 instr/MFLOP, spill-free on 3.9, 18 spills on 3.6
        256: [(64, 32, 8, 2), (64, 16, 8, 2)],
    },
}
DQ_CONFIGS = {
    80: {
        16: [(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)],
        32: [(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)],
        64: [(128, 32, 8, 3), (64, 32, 4, 3), (128, 32, 8, 2)],
        128: [(64, 64, 4, 3), (64, 32, 4, 3)],  # 128x32 w8: 2 spills on 3.6 (s2) or 3.9 (s3)
        256: [(16, 64, 8, 2), (16, 32, 4, 2)],  # 32 x 64 w8 compiles (102 KB) but the estimate says 164 KB
    },
    90: {
        16: [(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)],
        32: [(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)],
        64: [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3)],
        128: [(128, 64, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3)],
        256: [(32, 64, 8, 2), (16, 64, 8, 2)],
    },
}


def dkdv_smem_bytes(block_m: int, block_n: int, head_dim: int, num_stages: int) -> int:
    """k, v tiles, pipelined q and do tiles, and P^T / dS^T staged for their dots (2-byte elements)."""
    return 2 * (2 * block_n * head_dim + num_stages * 2 * block_m * head_dim + 2 * block_m * block_n)


def dq_smem_bytes(block_m: int, block_n: int, head_dim: int, num_stages: int) -> int:
    """q, do tiles, pipelined k and v tiles, and dS staged for its dot (2-byte elements)."""
    return 2 * (2 * block_m * head_dim + num_stages * 2 * block_n * head_dim + block_m * block_n)


@functools.cache
def _tuned(which: str, head_dim: int, arch: int, smem: int):
    table, smem_of = (DKDV_CONFIGS, dkdv_smem_bytes) if which == "dkdv" else (DQ_CONFIGS, dq_smem_bytes)
    configs = select_configs(table, head_dim, arch, smem, smem_of)
    key = ["NQ_KEY", "NK_KEY", "HEAD_DIM", "CAUSAL", "HAS_PROMPT", "VARLEN"]
    kernel = adapter_attention_bwd_dkdv_kernel if which == "dkdv" else adapter_attention_bwd_dq_kernel
    return triton.autotune(configs, key=key)(kernel)


def _launch(which, kernel, args, consts, grid_of, config, head_dim, device):
    if config is not None:
        kernel[grid_of(config)](*args, **consts, **config)
    else:
        tuned = _tuned(which, head_dim, *(device_arch(device) if not interpreting() else (80, 0)))
        tuned[grid_of](*args, **consts)


def adapter_attention_bwd(
    do,
    q,
    k,
    v,
    adapter_k,
    adapter_v,
    gate,
    o,
    lse_w,
    lse_a,
    *,
    causal,
    sm_scale,
    kv_lens=None,
    cu_seqlens=None,
    max_seqlen=None,
    config=None,
):
    """Gradients (dq, dk, dv, dadapter_k, dadapter_v, dgate) of `adapter_attention_fwd`'s output (packed
    sequences: cu_seqlens and max_seqlen as there; the preprocess is row-wise and needs neither).

    o, lse_w, lse_a are the forward's outputs. Grads come back in their inputs' dtypes and shapes (prompt ones
    None without a prompt; dgate is d(effective gate)). `config` = {"BLOCK_M", "BLOCK_N", "num_warps",
    "num_stages"} bypasses autotuning for both the dK/dV and the dQ kernel.
    """
    delta_w, delta_a = bwd_preprocess(do, q, adapter_k, adapter_v, gate, o, lse_a, sm_scale=sm_scale)
    common = dict(
        causal=causal, sm_scale=sm_scale, kv_lens=kv_lens, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, config=config
    )
    dk, dv, dak, dav = bwd_dkdv(
        q,
        k,
        v,
        do,
        lse_w,
        delta_w,
        adapter_k=adapter_k,
        adapter_v=adapter_v,
        gate=gate,
        lse_a=lse_a,
        delta_a=delta_a,
        **common,
    )
    dq = bwd_dq(q, k, v, adapter_k, adapter_v, gate, do, lse_w, lse_a, delta_w, delta_a, **common)
    if adapter_k is None:
        return dq, dk, dv, None, None, None
    dgate = delta_a.sum(2)  # (B, Hq)
    dgate = (dgate.sum(0) if gate.dim() == 1 else dgate).to(gate.dtype)
    return dq, dk, dv, dak, dav, dgate


def bwd_preprocess(do, q, adapter_k, adapter_v, gate, o, lse_a, *, sm_scale):
    """(delta_w, delta_a), each (B, Hq, Nq) fp32: do . O_w and do . O_a (delta_a is delta_w without a prompt)."""
    B, Hq, Nq, D = q.shape
    has_prompt = adapter_k is not None
    Ka = adapter_k.shape[-2] if has_prompt else 0
    group = Hq // (adapter_k.shape[-3] if has_prompt else 1)
    delta_w = _common.new_output((B, Hq, Nq), torch.float32, q.device)
    delta_a = _common.new_output((B, Hq, Nq), torch.float32, q.device) if has_prompt else delta_w
    block = 16 if interpreting() else PREPROCESS_BLOCK_M
    adapter_attention_bwd_preprocess_kernel[(-(-Nq // block), B * Hq)](
        q,
        adapter_k if has_prompt else q,
        adapter_v if has_prompt else q,
        gate if has_prompt else q,
        o,
        do,
        lse_a if has_prompt else delta_w,
        delta_w,
        delta_a,
        *q.stride(),
        *prompt_strides(adapter_k),
        *prompt_strides(adapter_v),
        *gate_strides(gate),
        *o.stride(),
        *do.stride(),
        Hq,
        group,
        Nq,
        Ka,
        sm_scale * LOG2E,
        HEAD_DIM=D,
        BLOCK_M=block,
        BLOCK_A=prompt_block(Ka) if has_prompt else 16,
        HAS_PROMPT=has_prompt,
        DOT_PREC=dot_precision(q.dtype),
    )
    return delta_w, delta_a


def bwd_dkdv(
    q,
    k,
    v,
    do,
    lse_w,
    delta_w,
    *,
    adapter_k=None,
    adapter_v=None,
    gate=None,
    lse_a=None,
    delta_a=None,
    causal,
    sm_scale,
    kv_lens=None,
    cu_seqlens=None,
    max_seqlen=None,
    config=None,
):
    """(dk, dv, dadapter_k, dadapter_v): the word keys' and values' gradients and, given a prompt (adapter_k,
    adapter_v, gate, lse_a and delta_a together), the prompt's in their dtypes (else None). `config` as in
    `adapter_attention_bwd` (None: autotune)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    has_prompt = adapter_k is not None
    Ka = adapter_k.shape[-2] if has_prompt else 0
    varlen = cu_seqlens is not None
    rows, batches = (max_seqlen, cu_seqlens.shape[0] - 1) if varlen else (Nk, B)
    dk = _common.new_output(k.shape, k.dtype, k.device)
    dv = _common.new_output(v.shape, v.dtype, v.device)
    # (batches, Hkv, Ka, D) fp32: each (sequence, kv head) program writes its own slot; a shared prompt sums them
    # over the batch below. No atomics, no per-query-block partials.
    part_shape = (batches, Hkv, Ka, D) if has_prompt else (0,)
    dak = _common.new_output(part_shape, torch.float32, q.device)
    dav = _common.new_output(part_shape, torch.float32, q.device)
    args = (
        q,
        k,
        v,
        adapter_k if has_prompt else q,
        adapter_v if has_prompt else q,
        gate if has_prompt else q,
        do,
        lse_w,
        lse_a if has_prompt else lse_w,
        delta_w,
        delta_a if has_prompt else delta_w,
        kv_lens if kv_lens is not None else q,
        cu_seqlens if varlen else q,
        dk,
        dv,
        dak,
        dav,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *prompt_strides(adapter_k),
        *prompt_strides(adapter_v),
        *gate_strides(gate),
        *do.stride(),
        *dk.stride(),
        *dv.stride(),
        Hq,
        Hkv,
        Hq // Hkv,
        Nq,
        Nk,
        Ka,
        sm_scale * LOG2E,
        sm_scale,
        size_bucket(max_seqlen if varlen else Nq),
        size_bucket(rows),
    )
    block_a = prompt_block(Ka) if has_prompt else 16
    consts = dict(
        HEAD_DIM=D,
        BLOCK_A=block_a,
        PROMPT_BLOCK_M=INTERPRETER_BLOCK if interpreting() else PROMPT_BLOCK_M,
        CAUSAL=causal,
        HAS_PROMPT=has_prompt,
        HAS_KVLENS=kv_lens is not None,
        VARLEN=varlen,
        DOT_PREC=dot_precision(q.dtype),
    )
    prompt_tiles = -(-Ka // block_a)
    grid_of = lambda meta: (prompt_tiles + -(-rows // meta["BLOCK_N"]), batches * Hkv)  # noqa: E731
    _launch("dkdv", adapter_attention_bwd_dkdv_kernel, args, consts, grid_of, config, D, q.device)
    if not has_prompt:
        return dk, dv, None, None
    if adapter_k.dim() == 3:  # shared by the batch: sum the (sequence, kv head) slots, batch order fixed
        dak, dav = dak.sum(0), dav.sum(0)
    return dk, dv, dak.to(adapter_k.dtype), dav.to(adapter_v.dtype)


def bwd_dq(
    q,
    k,
    v,
    adapter_k,
    adapter_v,
    gate,
    do,
    lse_w,
    lse_a,
    delta_w,
    delta_a,
    *,
    causal,
    sm_scale,
    kv_lens=None,
    cu_seqlens=None,
    max_seqlen=None,
    config=None,
    prompt_first=None,
):
    """dq, word and prompt parts. `config` as in `adapter_attention_bwd` (None: autotune).

    prompt_first: the prompt's part before the word loop (True) or after it; None picks what compiled without
    spills (kernel_report): before on sm90, where it keeps the loop's register peak down, after on sm80 (and
    under the interpreter, where it does not matter), where the same move made ptxas spill."""
    if prompt_first is None:
        prompt_first = not interpreting() and q.is_cuda and device_arch(q.device)[0] >= 90
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    has_prompt = adapter_k is not None
    Ka = adapter_k.shape[-2] if has_prompt else 0
    varlen = cu_seqlens is not None
    rows, batches = (max_seqlen, cu_seqlens.shape[0] - 1) if varlen else (Nq, B)
    dq = _common.new_output(q.shape, q.dtype, q.device)
    args = (
        q,
        k,
        v,
        adapter_k if has_prompt else q,
        adapter_v if has_prompt else q,
        gate if has_prompt else q,
        do,
        lse_w,
        lse_a if has_prompt else lse_w,
        delta_w,
        delta_a,
        kv_lens if kv_lens is not None else q,
        cu_seqlens if varlen else q,
        dq,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *prompt_strides(adapter_k),
        *prompt_strides(adapter_v),
        *gate_strides(gate),
        *do.stride(),
        *dq.stride(),
        Hq,
        Hq // Hkv,
        Nq,
        Nk,
        Ka,
        sm_scale * LOG2E,
        sm_scale,
        size_bucket(rows),
        size_bucket(max_seqlen if varlen else Nk),
    )
    consts = dict(
        HEAD_DIM=D,
        BLOCK_A=prompt_block(Ka) if has_prompt else 16,
        CAUSAL=causal,
        HAS_PROMPT=has_prompt,
        HAS_KVLENS=kv_lens is not None,
        VARLEN=varlen,
        DOT_PREC=dot_precision(q.dtype),
        PROMPT_FIRST=prompt_first,
    )
    grid_of = lambda meta: (-(-rows // meta["BLOCK_M"]), batches * Hq)  # noqa: E731
    _launch("dq", adapter_attention_bwd_dq_kernel, args, consts, grid_of, config, D, q.device)
    return dq


def compile_spec_for(kind: str, arch: int, dname: str, head_dim: int, config: tuple) -> dict:
    """The `compile_specs()` entry of one kernel ("pre", "dkdv" or "dq") at one (BLOCK_M, BLOCK_N, num_warps,
    num_stages) config: representative switches (causal, a prompt of 10), specialised as a contiguous launch."""
    fns = {
        "pre": adapter_attention_bwd_preprocess_kernel,
        "dkdv": adapter_attention_bwd_dkdv_kernel,
        "dq": adapter_attention_bwd_dq_kernel,
    }
    switches = {
        "pre": dict(BLOCK_A=prompt_block(10), HAS_PROMPT=True),
        "dkdv": dict(
            BLOCK_A=prompt_block(10),
            PROMPT_BLOCK_M=PROMPT_BLOCK_M,
            CAUSAL=True,
            HAS_PROMPT=True,
            HAS_KVLENS=False,
            VARLEN=False,
        ),
        "dq": dict(
            BLOCK_A=prompt_block(10),
            CAUSAL=True,
            HAS_PROMPT=True,
            HAS_KVLENS=False,
            VARLEN=False,
            PROMPT_FIRST=arch >= 90,
        ),
    }
    fn = fns[kind]
    elem = "*" + dname
    types = dict.fromkeys(("Q", "K", "V", "AK", "AV", "DO", "Out", "DQ", "DK", "DV"), elem)
    types.update(dict.fromkeys(("Gate", "LseW", "LseA", "DeltaW", "DeltaA", "DAK", "DAV"), "*fp32"))
    types.update(KVLens="*i32", CuSeqlens="*i32")
    pointers = {n: t for n, t in types.items() if n in fn.arg_names}
    bm, bn, warps, stages = config
    blocks = dict(BLOCK_M=bm) if kind == "pre" else dict(BLOCK_M=bm, BLOCK_N=bn)
    constexprs = dict(HEAD_DIM=head_dim, DOT_PREC="ieee", **switches[kind], **blocks)
    name = f"bwd_{kind}_sm{arch}_{dname}_d{head_dim}_m{bm}_n{bn}_w{warps}_s{stages}"
    spec = compile_spec(name, fn, pointers, ("qk_scale", "sm_scale"), constexprs, warps, stages)
    # wgmma's rows: the query block in dQ, the key block in dK/dV (dk = dS^T q)
    return dict(spec, arch=arch, sm90_mma=sm90_mma(bn if kind == "dkdv" else bm))


def compile_specs() -> list[dict]:
    """Every config of the three backward kernels, for sm80 and sm90, fp16 and bf16, D in 64/128/256 (see
    `_common.compile_spec`); each dict also names its "arch"."""
    specs = []
    for arch in (80, 90):
        for dname in SPEC_DTYPES:
            for D in SPEC_HEAD_DIMS:
                kernels = [
                    ("pre", [(PREPROCESS_BLOCK_M, 0, 4, 3)]),
                    ("dkdv", fitting_configs(DKDV_CONFIGS, D, arch, dkdv_smem_bytes)),
                    ("dq", fitting_configs(DQ_CONFIGS, D, arch, dq_smem_bytes)),
                ]
                specs += [compile_spec_for(kind, arch, dname, D, c) for kind, configs in kernels for c in configs]
    return specs
