"""Split-KV decode kernel (flash-decoding) for zero-init gated prompt attention.

For a few query tokens (Nq ~ 1..16) over a long KV cache the forward kernel has almost no parallelism
(one query block per head), so the key axis is split instead. For batch b and kv head hk the queries of the
GROUP = Hq/Hkv heads of the group are packed into the M dimension of one program, row r = j * Nq + i for
query i of head hk * GROUP + j, so each K/V block is read once per group (GQA/MQA). Scores are kept in log2
units as in the forward: the row max is taken on the raw scores q k^T and c = sm_scale * log2(e) enters once per
score, in exp2(x c - max) (one FFMA), so every log-sum-exp below is in base 2.

1. `adapter_attention_decode_split_kernel`, grid (B * Hkv, splits, M blocks): split s covers keys
   [s * chunk, min((s + 1) * chunk, L)) with L = kv_lens[b] (Nk without kv_lens) and writes the
   normalised partial output O_s and its lse_s = m_s + log2(l_s) (fp32; -inf when the split shows a row
   no key). Causal: query i sees keys j <= i + L - Nq.
2. `adapter_attention_decode_merge_kernel`, grid (B * Hkv, 16-row blocks): combines the splits that hold keys,
   O_w = sum_s 2^(lse_s - lse_w) O_s with lse_w = log2 sum_s 2^lse_s (O_w = 0 for a row with no visible word
   key), computes the prompt's own softmax O_a = softmax(s q ak^T) av over all Ka prompt keys, and stores
   o = O_w + g * O_a in q's dtype.

Inference only: no autograd, no lse returned. fp32 accumulation throughout; fp32 inputs use TF32 dots
when torch.backends.cuda.matmul.allow_tf32 is set (on a GPU), IEEE otherwise.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (
    LOG2E,
    NEG_BIG,
    SMEM_BYTES,
    cdiv,
    compile_spec,
    dot_precision,
    gate_strides,
    interpreting,
    key_length,
    load_tile,
    load_tile_t,
    prompt_block,
    prompt_strides,
    sm90_mma,
)

_MIN_BLOCK = 16  # tl.dot needs M, N, K >= 16 on the GPU
_MAX_BLOCK_M = 64
_WAVES = 2  # aim for about two waves of split programs over the SMs
# The merge holds three (rows, D) fp32 tiles (words, one split, prompt): 16 rows keep D = 256 within registers.
# Its work is tiny next to the split pass, so it forgoes wgmma (which needs 64 rows) on sm90.
MERGE_BLOCK_M = 16


def _merge_block_a(ka: int) -> int:
    """Prompt keys per step of the merge: at least 32, so the 16-row tile's mma.sync n8 columns give each of the
    4 warps its own (16 x 16 at 4 warps computes every score twice: kernel_report's duplicated-work check)."""
    return max(prompt_block(ka), 32)


# (BLOCK_N, num_warps, num_stages) tried by the autotuner on sm80 / sm90; one small config under the interpreter.
SPLIT_CONFIGS = ((64, 4, 2), (64, 4, 3), (128, 4, 2), (64, 8, 2), (128, 8, 3))
INTERPRETER_CONFIG = (32, 4, 1)
_SMEM_BUDGET = min(SMEM_BYTES.values())  # the smallest chip's, so every kept config fits both
_FP32_PER_THREAD = 64  # accumulator + score tile per thread beyond which registers spill


def _cost(config: tuple[int, int, int], head_dim: int, block_m: int, elem_bytes: int) -> tuple[int, int]:
    block_n, warps, stages = config
    smem = max(stages, 1) * 2 * block_n * head_dim * elem_bytes  # pipelined K and V tiles
    per_thread = block_m * (head_dim + block_n) // (32 * warps)  # fp32 accumulator and scores
    return smem, per_thread


def split_configs(head_dim: int, block_m: int, elem_bytes: int = 2) -> list[tuple[int, int, int]]:
    """The (BLOCK_N, num_warps, num_stages) configs the split kernel may run with for this tile.

    8 warps only for 16-row tiles, where they split the key columns: on a 64-row tile they compute every score
    twice (sm90: both warpgroups take the same 64 rows; sm80: twice the exp2 at BLOCK_N = 128), which
    kernel_report's duplicated-work check measures from the SASS."""
    costs = {c: _cost(c, head_dim, block_m, elem_bytes) for c in SPLIT_CONFIGS if c[1] == 4 or block_m <= _MIN_BLOCK}
    kept = [c for c, (smem, regs) in costs.items() if smem <= _SMEM_BUDGET and regs <= _FP32_PER_THREAD]
    return kept or [min(costs, key=lambda c: costs[c][::-1])]


def _prune(configs, named_args, **kwargs):
    def arg(name):
        return kwargs[name] if name in kwargs else named_args[name]

    allowed = set(split_configs(arg("HEAD_DIM"), arg("BLOCK_M"), named_args["K"].element_size()))
    return [c for c in configs if (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]


def _autotune_configs():
    chosen = (INTERPRETER_CONFIG,) if interpreting() else SPLIT_CONFIGS
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in chosen]


@triton.jit
def _group_tile(base, stride_b, stride_h, stride_m, stride_d, b, hk, offs_m, offs_d, GROUP, Nq):
    """Pointers to the (BLOCK_M, D) tile of packed rows offs_m of a (B, Hq, Nq, D) tensor: row r = j * Nq + i is
    query i of head hk * GROUP + j, so one tile holds every query of kv head hk's group."""
    j = offs_m // Nq
    i = offs_m % Nq
    rows = base + b * stride_b + (hk * GROUP + j)[:, None] * stride_h + i[:, None] * stride_m
    return rows + offs_d[None, :] * stride_d


@triton.jit
def adapter_attention_decode_split_kernel(
    Q,
    K,
    V,
    KVLens,
    OPart,
    LsePart,
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
    Hkv,
    GROUP,
    Nq,
    Nk,
    chunk,
    n_splits,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KVLENS: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # packed rows (`_group_tile`)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < GROUP * Nq
    q_ptrs = _group_tile(Q, stride_qb, stride_qh, stride_qm, stride_qd, b, hk, offs_m, offs_d, GROUP, Nq)
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

    L = key_length(KVLens, b, Nk, HAS_KVLENS)
    start = split * chunk
    stop = tl.minimum(start + chunk, L)  # L <= Nk: key_length clamps
    last_key = offs_m % Nq + L - Nq  # causal: query i sees keys j <= i + L - Nq

    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)  # finite: a row with no key yet gets p = 0, alpha = 1
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t = load_tile_t(k_base, offs_n, offs_d, stride_kn, stride_kd, stop, True)  # (D, BLOCK_N)
        s = tl.dot(q, k_t, input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N), unscaled
        visible = offs_n[None, :] < stop
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= last_key[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(v_base, offs_n, offs_d, stride_vn, stride_vd, stop, True)  # (BLOCK_N, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(has_key, m_i + tl.math.log2(l_safe), float("-inf"))
    m_pad = tl.num_programs(2) * BLOCK_M
    part = (pid_bh * n_splits + split) * m_pad + offs_m  # (BLOCK_M,) row index into the partial buffers
    # splits past L write nothing: the merge reads only the splits that hold keys
    store_ok = row_ok & (start + 0 * offs_m < stop)  # a row vector: the interpreter rejects scalar-bool masks
    tl.store(LsePart + part, lse, mask=store_ok)
    tl.store(OPart + part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=store_ok[:, None])


@triton.jit
def adapter_attention_decode_merge_kernel(
    Q,
    AK,
    AV,
    Gate,
    KVLens,
    OPart,
    LsePart,
    Out,
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
    Hkv,
    GROUP,
    Nq,
    Nk,
    Ka,
    chunk,
    n_splits,
    m_pad,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_A: tl.constexpr,
    HAS_PROMPT: tl.constexpr,
    HAS_KVLENS: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # packed rows (`_group_tile`)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < GROUP * Nq

    L = key_length(KVLens, b, Nk, HAS_KVLENS)
    m_w = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_w = tl.zeros([BLOCK_M], tl.float32)
    o_w = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for split in range(0, tl.cdiv(L, chunk)):
        part = (pid_bh * n_splits + split) * m_pad + offs_m
        lse = tl.load(LsePart + part, mask=row_ok, other=float("-inf"))
        o_s = tl.load(OPart + part[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        m_new = tl.maximum(m_w, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.math.exp2(lse - m_safe)
        alpha = tl.math.exp2(m_w - m_safe)
        o_w = o_w * alpha[:, None] + w[:, None] * o_s
        l_w = l_w * alpha + w
        m_w = m_new
    o = o_w / tl.where(l_w > 0.0, l_w, 1.0)[:, None]

    if HAS_PROMPT:
        q_ptrs = _group_tile(Q, stride_qb, stride_qh, stride_qm, stride_qd, b, hk, offs_m, offs_d, GROUP, Nq)
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        ak_base = AK + b * stride_akb + hk * stride_akh
        av_base = AV + b * stride_avb + hk * stride_avh
        m_a = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_a = tl.zeros([BLOCK_M], tl.float32)
        o_a = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start_a in range(0, Ka, BLOCK_A):
            offs_a = start_a + tl.arange(0, BLOCK_A)
            ak_t = load_tile_t(ak_base, offs_a, offs_d, stride_akn, stride_akd, Ka, True)  # (D, BLOCK_A)
            s = tl.dot(q, ak_t, input_precision=DOT_PREC)  # unscaled
            s = tl.where(offs_a[None, :] < Ka, s, float("-inf"))
            m_new = tl.maximum(m_a, tl.max(s, 1) * qk_scale)  # finite: every block holds at least one prompt key
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_a - m_new)
            l_a = l_a * alpha + tl.sum(p, 1)
            av = load_tile(av_base, offs_a, offs_d, stride_avn, stride_avd, Ka, True)  # (BLOCK_A, D)
            o_a = o_a * alpha[:, None] + tl.dot(p.to(av.dtype), av, input_precision=DOT_PREC)
            m_a = m_new
        heads = hk * GROUP + offs_m // Nq
        g = tl.load(Gate + b * stride_gb + heads * stride_gh, mask=row_ok, other=0.0).to(tl.float32)
        o += g[:, None] * (o_a / l_a[:, None])

    out_ptrs = _group_tile(Out, stride_ob, stride_oh, stride_om, stride_od, b, hk, offs_m, offs_d, GROUP, Nq)
    tl.store(out_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None])


_split_tuned = triton.autotune(
    configs=_autotune_configs(),
    key=["HEAD_DIM", "BLOCK_M", "CAUSAL"],
    prune_configs_by={"early_config_prune": _prune},
)(adapter_attention_decode_split_kernel)


def _block_m(rows: int, head_dim: int) -> int:
    """Query rows per split program: 16 (mma.sync's minimum) when they fit, else 64 (wgmma's), or 32 at D = 256,
    where a 64-row tile spills at 4 warps on sm80 and 8 warps on 64 rows compute every score twice (see
    split_configs). (32 rows at D = 128, 4 warps, 2 stages spills on sm90: kernel_report.)"""
    if rows <= _MIN_BLOCK:
        return _MIN_BLOCK
    return _MAX_BLOCK_M if head_dim < 256 else 32


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one after another: splitting only adds work


def _split_granule() -> int:
    # chunks are whole blocks of every config the autotuner may pick, so the split count does not depend on it
    return max(c.kwargs["BLOCK_N"] for c in _split_tuned.configs)


def choose_splits(nk: int, programs: int, n_sms: int, granule: int, num_splits: int | None = None) -> tuple[int, int]:
    """(splits, chunk): split Nk keys into chunks of whole `granule` blocks.

    Without `num_splits`, enough splits that `programs` (B * Hkv * M blocks) times splits fills about
    two waves of `n_sms`, never more than the key blocks available.
    """
    blocks = cdiv(nk, granule)
    if num_splits is None:
        num_splits = cdiv(_WAVES * n_sms, programs)
    elif num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    chunk = cdiv(blocks, max(1, min(num_splits, blocks))) * granule
    return cdiv(nk, chunk), chunk


def decode_attention(
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
    num_splits=None,
    out=None,
):
    """Flash-decoding forward of `adapter_attention` (docs/design.md §3) for few queries over a long KV cache.

    q (B, Hq, Nq, D); k, v (B, Hkv, Nk, D) with any strides (e.g. a slice of a preallocated cache);
    adapter_k, adapter_v (Hkv, Ka, D) or (B, Hkv, Ka, D); gate (Hq,) or (B, Hq); kv_lens (B,) int or None.
    Inputs are assumed checked (`llama_adapter.attention.check_inputs`). num_splits overrides the split
    heuristic; out, a (B, Hq, Nq, D) tensor of q's dtype, receives the result. Returns o (B, Hq, Nq, D).
    """
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"decode_attention takes float16, bfloat16 or float32 q, got {q.dtype}")
    if out is None:
        out = _common.new_output(q.shape, q.dtype, q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}, got {out.shape}")
    has_prompt = adapter_k is not None
    ka = adapter_k.shape[-2] if has_prompt else 1
    precision = dot_precision(q.dtype)
    key = (q.shape, k.shape, q.dtype, q.device, ka, kv_lens is not None, bool(causal), num_splits, precision)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _LaunchPlan(q, k, ka, num_splits)
    scale = plan.default_scale if sm_scale is None else float(sm_scale)
    qk_scale = scale * LOG2E

    o_part = _common.new_output(plan.part_shape, torch.float32, q.device)
    lse_part = _common.new_output(plan.part_shape[:3], torch.float32, q.device)
    has_kvlens = kv_lens is not None
    if has_kvlens and kv_lens.dtype != torch.int32:
        kv_lens = kv_lens.to(torch.int32)
    lens = kv_lens if has_kvlens else o_part  # placeholder pointer, never read
    args = (
        q,
        k,
        v,
        lens,
        o_part,
        lse_part,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        plan.Hkv,
        plan.group,
        plan.Nq,
        plan.Nk,
        plan.chunk,
        plan.splits,
        qk_scale,
    )
    consts = dict(HEAD_DIM=plan.D, BLOCK_M=plan.block_m, CAUSAL=bool(causal), HAS_KVLENS=has_kvlens, DOT_PREC=precision)
    if plan.config is None:
        _split_tuned[plan.split_grid](*args, **consts)
        plan.config = _split_tuned.best_config.all_kwargs()  # the autotuner's pick, reused from now on
    else:
        adapter_attention_decode_split_kernel[plan.split_grid](*args, **consts, **plan.config)

    placeholder = q  # pointers of an absent prompt and gate are never read
    adapter_attention_decode_merge_kernel[plan.merge_grid](
        q,
        adapter_k if has_prompt else placeholder,
        adapter_v if has_prompt else placeholder,
        gate if has_prompt else placeholder,
        lens,
        o_part,
        lse_part,
        out,
        *q.stride(),
        *prompt_strides(adapter_k),
        *prompt_strides(adapter_v),
        *gate_strides(gate),
        *out.stride(),
        plan.Hkv,
        plan.group,
        plan.Nq,
        plan.Nk,
        ka,
        plan.chunk,
        plan.splits,
        plan.part_shape[2],
        qk_scale,
        HEAD_DIM=plan.D,
        BLOCK_M=MERGE_BLOCK_M,
        BLOCK_A=plan.block_a,
        HAS_PROMPT=has_prompt,
        HAS_KVLENS=has_kvlens,
        DOT_PREC=precision,
        num_warps=4,
        num_stages=1,
    )
    return out


class _LaunchPlan:
    """What a decode call of one shape launches with, worked out once: block and split sizes, grids, the
    partial buffers' shape, and (after the first launch) the autotuner's config, so later calls skip its
    look-up and launch the kernel directly."""

    def __init__(self, q, k, ka, num_splits):
        B, Hq, self.Nq, self.D = q.shape
        self.Hkv, self.Nk = k.shape[1], k.shape[2]
        self.group = Hq // self.Hkv
        self.default_scale = 1.0 / math.sqrt(self.D)
        self.block_m = _block_m(self.group * self.Nq, self.D)
        m_blocks = cdiv(self.group * self.Nq, self.block_m)
        programs = B * self.Hkv * m_blocks
        self.splits, self.chunk = choose_splits(self.Nk, programs, _sm_count(q.device), _split_granule(), num_splits)
        self.part_shape = (B * self.Hkv, self.splits, m_blocks * self.block_m, self.D)
        self.split_grid = (B * self.Hkv, self.splits, m_blocks)
        self.merge_grid = (B * self.Hkv, cdiv(self.group * self.Nq, MERGE_BLOCK_M))
        self.block_a = _merge_block_a(ka)
        self.config = None  # the split kernel's launch kwargs (BLOCK_N, num_warps, ...) once tuned


# (q.shape, k.shape, dtype, device, Ka, has kv_lens, causal, num_splits, dot precision) -> _LaunchPlan. A model
# decodes at a handful of shapes (one per batch size and cache length bucket); entries are a few hundred bytes.
_PLANS: dict[tuple, _LaunchPlan] = {}


def compile_specs() -> list[dict]:
    """What the GPU may run, for the compile checks (`llama_adapter.kernel_report`).

    Every split config at D = 64, 128, 256 for each tile `_block_m` picks (16 and 64 rows; 16 and 32 at D = 256),
    fp16, plus bf16 at D = 128; the merge at each (dtype, D). Tiles under 64 rows cannot use wgmma (64 rows per
    warpgroup), so sm90 runs them on HMMA.
    """
    specs = []
    for dtype, head_dim in [("fp16", 64), ("fp16", 128), ("fp16", 256), ("bf16", 128)]:
        ptr = "*" + dtype
        pointers = dict(Q=ptr, K=ptr, V=ptr, KVLens="*i32", OPart="*fp32", LsePart="*fp32")
        for block_m in sorted({_block_m(rows, head_dim) for rows in (1, 64)}):
            for block_n, warps, stages in split_configs(head_dim, block_m):
                consts = dict(
                    HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=True, HAS_KVLENS=True, DOT_PREC="ieee"
                )
                name = f"decode_split[{dtype},D{head_dim},M{block_m},N{block_n},w{warps},s{stages}]"
                spec = compile_spec(
                    name, adapter_attention_decode_split_kernel, pointers, ("qk_scale",), consts, warps, stages
                )
                specs.append(dict(spec, sm90_mma=sm90_mma(block_m)))
        pointers = dict(Q=ptr, AK=ptr, AV=ptr, Gate="*fp32", KVLens="*i32", OPart="*fp32", LsePart="*fp32", Out=ptr)
        consts = dict(
            HEAD_DIM=head_dim,
            BLOCK_M=MERGE_BLOCK_M,
            BLOCK_A=_merge_block_a(10),
            HAS_PROMPT=True,
            HAS_KVLENS=True,
            DOT_PREC="ieee",
        )
        name = f"decode_merge[{dtype},D{head_dim},M{MERGE_BLOCK_M}]"
        spec = compile_spec(name, adapter_attention_decode_merge_kernel, pointers, ("qk_scale",), consts, 4, 1)
        specs.append(dict(spec, sm90_mma=sm90_mma(MERGE_BLOCK_M)))
    return specs
