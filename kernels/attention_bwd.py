"""Backward kernels for gated prompt attention (forward in `attention_fwd`; DESIGN §1 has the math).

With P, A the word and prompt probabilities (recomputed from the saved log2 log-sum-exps), s = sm_scale:

    preprocess (per query block):  delta_a = do . O_a = rowsum(A * (do av^T)), A recomputed (Ka is tiny),
                                   D_w = rowsum(do * o) - g delta_a       (= do . O_w, NOT do . o)
    dK/dV (per key block):         dv = sum P^T do,  dk = s sum dS^T q,  dS = P (do v^T - D_w); the loop runs
                                   over the query heads of the GQA group and the query blocks that see the keys
    dQ (per query block):          dq = s (dS k + dA ak),  dA = g A (do av^T - delta_a); the same program
                                   writes its partial prompt gradients dak = s dA^T q, dav = g A^T do
                                   into its own slot of an fp32 buffer
    torch afterwards:              partials summed over query blocks, the GQA group and (shared prompt) the
                                   batch; dgate = sum over rows of delta_a. No atomics: two runs give bitwise
                                   equal gradients.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (
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

LOG2E = 1.4426950408889634
PREPROCESS_BLOCK_M = 64  # launched with Triton's defaults: 4 warps, 3 stages


@triton.jit
def adapter_attention_bwd_preprocess_kernel(
    Q, AK, AV, Gate, Out, DO, LseA, DeltaW, DeltaA,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_akb, stride_akh, stride_akn, stride_akd,
    stride_avb, stride_avh, stride_avn, stride_avd,
    stride_gb, stride_gh,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    Hq, GROUP, Nq, Ka, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr,
    HAS_PROMPT: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
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
    dk, dv, k, v, q_base, do_base, lse_base, dw_base, stride_qm, stride_qd, stride_dom, stride_dod,
    offs_n, offs_d, lo, hi, Nq, L, shift, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """Accumulate one key block's dk, dv over query blocks lo .. hi of one query head. Query rows >= Nq read as
    zero (q = do = 0) and so add nothing."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Nq
        q_t = load_tile_t(q_base, offs_m, offs_d, stride_qm, stride_qd, Nq, True)  # (D, BLOCK_M)
        do = load_tile(do_base, offs_m, offs_d, stride_dom, stride_dod, Nq, True)  # (BLOCK_M, D)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
        dw = tl.load(dw_base + offs_m, mask=row_ok, other=0.0)
        p_t = tl.math.exp2(tl.dot(k, q_t, input_precision=DOT_PREC) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
        if MASKED:
            visible = offs_n[:, None] < L
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :] + shift)
            p_t = tl.where(visible, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        ds_t = p_t * (tl.dot(v, tl.trans(do), input_precision=DOT_PREC) - dw[None, :])
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def adapter_attention_bwd_dkdv_kernel(
    Q, K, V, DO, LseW, DeltaW, KVLens, CuSeqlens, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    Hq, Hkv, GROUP, Nq, Nk, qk_scale, sm_scale,
    NQ_KEY, NK_KEY,  # autotune buckets only
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KVLENS: tl.constexpr, VARLEN: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    hk = pid_bh % Hkv
    b, row0, n_q, n_k = sequence_of(CuSeqlens, pid_bh, Hkv, Nq, Nk, VARLEN)
    start_n = pid_n * BLOCK_N
    if VARLEN:
        if start_n >= n_k:  # the grid covers the longest sequence
            return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_base = K + b * stride_kb + hk * stride_kh + row0 * stride_kn
    v_base = V + b * stride_vb + hk * stride_vh + row0 * stride_vn
    k = load_tile(k_base, offs_n, offs_d, stride_kn, stride_kd, n_k, True)
    v = load_tile(v_base, offs_n, offs_d, stride_vn, stride_vd, n_k, True)
    L = key_length(KVLens, b, n_k, HAS_KVLENS)
    shift = L - n_q
    # Query blocks [lo, mid) need the mask, [mid, n_q) see every key of this block.
    n_rows = tl.cdiv(n_q, BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = tl.minimum(tl.maximum(start_n - shift, 0), n_q) // BLOCK_M * BLOCK_M
        mid = tl.cdiv(tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), n_q), BLOCK_M) * BLOCK_M
    else:
        lo = 0
        mid = 0
    mid = tl.where(start_n + BLOCK_N > L, n_rows, mid)  # keys past L in this block: mask everywhere
    lo = tl.where(start_n >= L, n_rows, lo)  # no valid key at all: dk = dv = 0
    mid = tl.maximum(mid, lo)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for j in range(0, GROUP):
        h = hk * GROUP + j
        q_base = Q + b * stride_qb + h * stride_qh + row0 * stride_qm
        do_base = DO + b * stride_dob + h * stride_doh + row0 * stride_dom
        lse_base = LseW + (b * Hq + h) * Nq + row0
        dw_base = DeltaW + (b * Hq + h) * Nq + row0
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, q_base, do_base, lse_base, dw_base, stride_qm, stride_qd, stride_dom, stride_dod,
            offs_n, offs_d, lo, mid, n_q, L, shift, qk_scale, True, CAUSAL, BLOCK_M, DOT_PREC,
        )  # fmt: skip
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, q_base, do_base, lse_base, dw_base, stride_qm, stride_qd, stride_dom, stride_dod,
            offs_n, offs_d, mid, n_q, n_q, L, shift, qk_scale, False, CAUSAL, BLOCK_M, DOT_PREC,
        )  # fmt: skip
    col_ok = offs_n[:, None] < n_k
    rows_n = row0 + offs_n[:, None]
    dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + rows_n * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + rows_n * stride_dvn + offs_d[None, :] * stride_dvd
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok)


@triton.jit
def _dq_blocks(
    dq, q, do, lse, dw, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, lo, hi, L, shift, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
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
    dq, q, do, gate_ptr, lse_a_base, delta_a_base, ak_base, av_base, stride_akn, stride_akd, stride_avn, stride_avd,
    DAK, DAV, slot, offs_m, offs_d, row_ok, Ka, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_A: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """Add dA ak (unscaled, like the word part) to dq, and store this block's prompt partials dak = s dA^T q and
    dav = g A^T do into its (Ka, D) slot."""
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
        dak = sm_scale * tl.dot(tl.trans(da).to(q.dtype), q, input_precision=DOT_PREC)  # (BLOCK_A, D)
        dav = g * tl.dot(tl.trans(a).to(do.dtype), do, input_precision=DOT_PREC)
        part = slot + offs_a[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(DAK + part, dak, mask=offs_a[:, None] < Ka)
        tl.store(DAV + part, dav, mask=offs_a[:, None] < Ka)
    return dq


@triton.jit
def adapter_attention_bwd_dq_kernel(
    Q, K, V, AK, AV, Gate, DO, LseW, LseA, DeltaW, DeltaA, KVLens, CuSeqlens, DQ, DAK, DAV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_akb, stride_akh, stride_akn, stride_akd,
    stride_avb, stride_avh, stride_avn, stride_avd,
    stride_gb, stride_gh,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    Hq, GROUP, Nq, Nk, Ka, N_SLOTS, qk_scale, sm_scale,
    NQ_KEY, NK_KEY,  # autotune buckets only
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PROMPT: tl.constexpr, HAS_KVLENS: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr, PROMPT_FIRST: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    h = pid_bh % Hq
    hk = h // GROUP
    b, row0, n_q, n_k = sequence_of(CuSeqlens, pid_bh, Hq, Nq, Nk, VARLEN)
    start_m = pid_m * BLOCK_M
    if VARLEN:
        if start_m >= n_q:  # the grid covers the longest sequence; this block's partial slots stay zero
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
            dq, q, do, Gate + b * stride_gb + h * stride_gh, LseA + row_base, DeltaA + row_base,
            AK + b * stride_akb + hk * stride_akh, AV + b * stride_avb + hk * stride_avh,
            stride_akn, stride_akd, stride_avn, stride_avd, DAK, DAV, (pid_bh * N_SLOTS + pid_m) * Ka * HEAD_DIM,
            offs_m, offs_d, row_ok, Ka, qk_scale, sm_scale, HEAD_DIM, BLOCK_A, DOT_PREC,
        )  # fmt: skip
    dq = _dq_blocks(
        dq, q, do, lse, dw, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, 0, full, L, shift, qk_scale, False, CAUSAL, BLOCK_N, DOT_PREC,
    )  # fmt: skip
    dq = _dq_blocks(
        dq, q, do, lse, dw, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, full, hi, L, shift, qk_scale, True, CAUSAL, BLOCK_N, DOT_PREC,
    )  # fmt: skip
    if HAS_PROMPT and not PROMPT_FIRST:
        dq = _dq_prompt(
            dq, q, do, Gate + b * stride_gb + h * stride_gh, LseA + row_base, DeltaA + row_base,
            AK + b * stride_akb + hk * stride_akh, AV + b * stride_avb + hk * stride_avh,
            stride_akn, stride_akd, stride_avn, stride_avd, DAK, DAV, (pid_bh * N_SLOTS + pid_m) * Ka * HEAD_DIM,
            offs_m, offs_d, row_ok, Ka, qk_scale, sm_scale, HEAD_DIM, BLOCK_A, DOT_PREC,
        )  # fmt: skip
    dq = dq * sm_scale  # word and prompt parts alike: dq = s (dS k + dA ak)

    rows_m = row0 + offs_m[:, None]
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + rows_m * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim; BLOCK_M is the query block, BLOCK_N the key block.
# D 64/128/256: the spill-free ones of a ptxas sweep (benchmarks/NOTES.md, kernel tuning log), 8 warps mostly:
# dK/dV holds two (BLOCK_N, D) fp32 accumulators plus k and v, which 4 warps cannot keep in registers.
DKDV_CONFIGS = {
    80: {
        16: [(32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3)],
        32: [(32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3)],
        64: [(32, 64, 8, 3), (16, 64, 8, 2), (32, 32, 4, 2)],
        128: [(32, 64, 8, 3), (32, 64, 8, 2), (16, 64, 8, 2)],
        256: [(16, 32, 8, 2), (32, 32, 8, 2), (32, 32, 8, 1)],
    },
    90: {
        16: [(32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3)],
        32: [(32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3)],
        64: [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 8, 3)],
        128: [(32, 64, 8, 2), (16, 128, 8, 3), (16, 64, 8, 2)],
        256: [(16, 32, 8, 2), (32, 32, 8, 2), (32, 32, 8, 1)],
    },
}
DQ_CONFIGS = {
    80: {
        16: [(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)],
        32: [(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)],
        64: [(128, 32, 8, 3), (64, 32, 4, 3), (64, 32, 8, 2)],
        128: [(128, 32, 8, 3), (64, 32, 8, 2), (64, 64, 8, 3)],
        256: [(64, 32, 8, 2), (64, 64, 8, 3), (32, 64, 8, 2)],
    },
    90: {
        16: [(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)],
        32: [(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)],
        64: [(128, 32, 8, 3), (64, 64, 8, 3), (128, 64, 8, 2)],
        128: [(128, 32, 8, 3), (64, 32, 8, 2), (64, 64, 8, 3)],
        256: [(32, 64, 8, 2), (32, 32, 8, 2)],  # 64-row blocks spill at D = 256 (kernel_report)
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
    if which == "dkdv":
        configs = select_configs(DKDV_CONFIGS, head_dim, arch, smem, dkdv_smem_bytes)
        return triton.autotune(configs, key=["NQ_KEY", "NK_KEY", "HEAD_DIM", "CAUSAL", "VARLEN"])(
            adapter_attention_bwd_dkdv_kernel
        )
    configs = select_configs(DQ_CONFIGS, head_dim, arch, smem, dq_smem_bytes)
    # Autotuning tries several BLOCK_M, each filling a different number of partial slots: zero between tries.
    return triton.autotune(
        configs, key=["NQ_KEY", "NK_KEY", "HEAD_DIM", "CAUSAL", "HAS_PROMPT", "VARLEN"], reset_to_zero=["DAK", "DAV"]
    )(adapter_attention_bwd_dq_kernel)


def _launch(which, kernel, args, consts, grid_of, config, head_dim, device):
    if config is not None:
        kernel[grid_of(config)](*args, **consts, **config)
    else:
        tuned = _tuned(which, head_dim, *(device_arch(device) if not interpreting() else (80, 0)))
        tuned[grid_of](*args, **consts)


def adapter_attention_bwd(
    do, q, k, v, adapter_k, adapter_v, gate, o, lse_w, lse_a, *, causal, sm_scale, kv_lens=None, cu_seqlens=None,
    max_seqlen=None, config=None
):  # fmt: skip
    """Gradients (dq, dk, dv, dadapter_k, dadapter_v, dgate) of `adapter_attention_fwd`'s output (packed
    sequences: cu_seqlens and max_seqlen as there; the preprocess is row-wise and needs neither).

    o, lse_w, lse_a are the forward's outputs. Grads come back in their inputs' dtypes and shapes (prompt ones
    None without a prompt; dgate is d(effective gate)). `config` = {"BLOCK_M", "BLOCK_N", "num_warps",
    "num_stages"} bypasses autotuning for both the dK/dV and the dQ kernel.
    """
    delta_w, delta_a = bwd_preprocess(do, q, adapter_k, adapter_v, gate, o, lse_a, sm_scale=sm_scale)
    varlen = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    dk, dv = bwd_dkdv(
        q, k, v, do, lse_w, delta_w, causal=causal, sm_scale=sm_scale, kv_lens=kv_lens, **varlen, config=config
    )
    dq, dak_part, dav_part = bwd_dq(
        q, k, v, adapter_k, adapter_v, gate, do, lse_w, lse_a, delta_w, delta_a,
        causal=causal, sm_scale=sm_scale, kv_lens=kv_lens, **varlen, config=config,
    )  # fmt: skip
    if adapter_k is None:
        return dq, dk, dv, None, None, None
    Hq, D = q.shape[1], q.shape[3]
    B = dak_part.shape[0] // Hq  # batch rows, or sequences when packed (their prompt is shared)
    Hkv, Ka = k.shape[1], adapter_k.shape[-2]

    def reduce(part, like):  # (B*Hq, slots, Ka, D) -> like's shape, fixed summation order
        total = part.sum(1).view(B, Hkv, Hq // Hkv, Ka, D).sum(2)  # (B, Hkv, Ka, D)
        return (total.sum(0) if like.dim() == 3 else total).to(like.dtype)

    dgate = delta_a.sum(2)  # (B, Hq)
    dgate = (dgate.sum(0) if gate.dim() == 1 else dgate).to(gate.dtype)
    return dq, dk, dv, reduce(dak_part, adapter_k), reduce(dav_part, adapter_v), dgate


def bwd_preprocess(do, q, adapter_k, adapter_v, gate, o, lse_a, *, sm_scale):
    """(delta_w, delta_a), each (B, Hq, Nq) fp32: do . O_w and do . O_a (delta_a is delta_w without a prompt)."""
    B, Hq, Nq, D = q.shape
    has_prompt = adapter_k is not None
    Ka = adapter_k.shape[-2] if has_prompt else 0
    group = Hq // (adapter_k.shape[-3] if has_prompt else 1)
    delta_w = _common.new_output((B, Hq, Nq), torch.float32, q.device)
    delta_a = _common.new_output((B, Hq, Nq), torch.float32, q.device) if has_prompt else delta_w
    block = 16 if interpreting() else PREPROCESS_BLOCK_M
    adapter_attention_bwd_preprocess_kernel[(triton.cdiv(Nq, block), B * Hq)](
        q, adapter_k if has_prompt else q, adapter_v if has_prompt else q, gate if has_prompt else q, o, do,
        lse_a if has_prompt else delta_w, delta_w, delta_a,
        *q.stride(), *prompt_strides(adapter_k), *prompt_strides(adapter_v), *gate_strides(gate), *o.stride(),
        *do.stride(), Hq, group, Nq, Ka, sm_scale * LOG2E,
        HEAD_DIM=D, BLOCK_M=block, BLOCK_A=prompt_block(Ka) if has_prompt else 16, HAS_PROMPT=has_prompt,
        DOT_PREC=dot_precision(q.dtype),
    )  # fmt: skip
    return delta_w, delta_a


def bwd_dkdv(q, k, v, do, lse_w, delta_w, *, causal, sm_scale, kv_lens=None, cu_seqlens=None, max_seqlen=None,
             config=None):  # fmt: skip
    """(dk, dv) of the word keys and values; `config` as in `adapter_attention_bwd` (None: autotune)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    varlen = cu_seqlens is not None
    rows, batches = (max_seqlen, cu_seqlens.shape[0] - 1) if varlen else (Nk, B)
    dk = _common.new_output(k.shape, k.dtype, k.device)
    dv = _common.new_output(v.shape, v.dtype, v.device)
    args = (
        q, k, v, do, lse_w, delta_w, kv_lens if kv_lens is not None else q, cu_seqlens if varlen else q, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        Hq, Hkv, Hq // Hkv, Nq, Nk, sm_scale * LOG2E, sm_scale,
        size_bucket(max_seqlen if varlen else Nq), size_bucket(rows),
    )  # fmt: skip
    consts = dict(
        HEAD_DIM=D, CAUSAL=causal, HAS_KVLENS=kv_lens is not None, VARLEN=varlen, DOT_PREC=dot_precision(q.dtype)
    )
    grid_of = lambda meta: (triton.cdiv(rows, meta["BLOCK_N"]), batches * Hkv)  # noqa: E731
    _launch("dkdv", adapter_attention_bwd_dkdv_kernel, args, consts, grid_of, config, D, q.device)
    return dk, dv


def bwd_dq(
    q, k, v, adapter_k, adapter_v, gate, do, lse_w, lse_a, delta_w, delta_a, *, causal, sm_scale, kv_lens=None,
    cu_seqlens=None, max_seqlen=None, config=None, prompt_first=None,
):  # fmt: skip
    """(dq, dak_part, dav_part): dq, and the prompt's per-query-block partial gradients (B*Hq, slots, Ka, D) fp32
    (None without a prompt) that `adapter_attention_bwd` reduces. `config` as there (None: autotune).

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
    # One (Ka, D) slot per query block of the smallest BLOCK_M any config may pick; unused slots stay zero.
    n_slots = triton.cdiv(rows, _min_block_m(D, q.device, config)) if has_prompt else 0
    part_shape = (batches * Hq, n_slots, Ka, D)
    dak_part = torch.zeros(part_shape, dtype=torch.float32, device=q.device) if has_prompt else None
    dav_part = torch.zeros(part_shape, dtype=torch.float32, device=q.device) if has_prompt else None
    args = (
        q, k, v, adapter_k if has_prompt else q, adapter_v if has_prompt else q, gate if has_prompt else q, do,
        lse_w, lse_a if has_prompt else lse_w, delta_w, delta_a, kv_lens if kv_lens is not None else q,
        cu_seqlens if varlen else q, dq,
        dak_part if has_prompt else lse_w, dav_part if has_prompt else lse_w,
        *q.stride(), *k.stride(), *v.stride(), *prompt_strides(adapter_k), *prompt_strides(adapter_v),
        *gate_strides(gate), *do.stride(), *dq.stride(),
        Hq, Hq // Hkv, Nq, Nk, Ka, n_slots, sm_scale * LOG2E, sm_scale,
        size_bucket(rows), size_bucket(max_seqlen if varlen else Nk),
    )  # fmt: skip
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
    grid_of = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), batches * Hq)  # noqa: E731
    _launch("dq", adapter_attention_bwd_dq_kernel, args, consts, grid_of, config, D, q.device)
    return dq, dak_part, dav_part


def _min_block_m(head_dim: int, device: torch.device, config) -> int:
    if config is not None:
        return config["BLOCK_M"]
    if interpreting():
        return 16
    return min(c.kwargs["BLOCK_M"] for c in _tuned("dq", head_dim, *device_arch(device)).configs)


def compile_specs() -> list[dict]:
    """Every config of the three backward kernels, for sm80 and sm90, fp16 and bf16, D in 64/128/256 (see
    `_common.compile_spec`); each dict also names its "arch". Representative switches: causal, prompt of 10."""
    specs = []
    for arch in (80, 90):
        for dname in SPEC_DTYPES:
            elem = "*" + dname
            f32 = "*fp32"
            common = dict.fromkeys(("Q", "K", "V", "AK", "AV", "DO", "Out", "DQ", "DK", "DV"), elem)
            common.update(
                dict.fromkeys(("Gate", "LseW", "LseA", "DeltaW", "DeltaA", "DAK", "DAV"), f32),
                KVLens="*i32",
                CuSeqlens="*i32",
            )
            for D in SPEC_HEAD_DIMS:
                flags = dict(HEAD_DIM=D, DOT_PREC="ieee")
                kernels = [
                    ("pre", adapter_attention_bwd_preprocess_kernel, [(PREPROCESS_BLOCK_M, 0, 4, 3)],
                     dict(BLOCK_A=prompt_block(10), HAS_PROMPT=True)),
                    ("dkdv", adapter_attention_bwd_dkdv_kernel, fitting_configs(DKDV_CONFIGS, D, arch, dkdv_smem_bytes),
                     dict(CAUSAL=True, HAS_KVLENS=False, VARLEN=False)),
                    ("dq", adapter_attention_bwd_dq_kernel, fitting_configs(DQ_CONFIGS, D, arch, dq_smem_bytes),
                     dict(BLOCK_A=prompt_block(10), CAUSAL=True, HAS_PROMPT=True, HAS_KVLENS=False, VARLEN=False,
                          PROMPT_FIRST=arch >= 90)),
                ]  # fmt: skip
                for kind, fn, configs, switches in kernels:
                    pointers = {n: t for n, t in common.items() if n in fn.arg_names}
                    for bm, bn, warps, stages in configs:
                        blocks = dict(BLOCK_M=bm) if kind == "pre" else dict(BLOCK_M=bm, BLOCK_N=bn)
                        name = f"bwd_{kind}_sm{arch}_{dname}_d{D}_m{bm}_n{bn}_w{warps}_s{stages}"
                        floats = ("qk_scale", "sm_scale")
                        spec = compile_spec(name, fn, pointers, floats, {**flags, **switches, **blocks}, warps, stages)
                        # wgmma's rows: the query block in dQ, the key block in dK/dV (dk = dS^T q)
                        specs.append(dict(spec, arch=arch, sm90_mma=sm90_mma(bn if kind == "dkdv" else bm)))
    return specs
