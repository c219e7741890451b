"""What the attention launchers share: interpreter detection, dot precision, block sizes and autotune tables.

Autotune configs are (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples chosen per head dim and GPU generation
(sm80 = A100, sm90 = H100) and filtered by an estimate of the kernel's shared memory, so a config that cannot
launch on the chip never reaches the autotuner. Under TRITON_INTERPRET=1 there is one small config (16 x 16):
the interpreter runs each program in numpy, and small blocks still exercise the multi-block code paths.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

# Hardware facts, one table: shared memory per block (the opt-in maximum, cudaDevAttrMaxSharedMemoryPerBlockOptin)
# by compute capability. A100: 163 KiB = 166,912 B; H100: 227 KiB = 232,448 B. Other chips ask the driver.
SMEM_BYTES = {80: 163 * 1024, 90: 227 * 1024}
# Kernels keep scores in log2 units: sm_scale * LOG2E is folded into one multiply, then exp2 (docs/design.md §4).
LOG2E = 1.4426950408889634
# Finite "minus infinity" for the running max: exp2(-inf - this) = 0 and exp2(this - real max) = 0, never NaN.
NEG_BIG = tl.constexpr(-1.0e30)
INTERPRETER_BLOCK = 16
# Tests set this so every launcher output starts as NaN and an element a kernel forgets to write shows up.
POISON_OUTPUTS = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_zero_outputs = False


@contextlib.contextmanager
def zeroed_outputs(active: bool = True):
    """Within: `new_output` buffers start as zeros. For launches whose index inputs were not checked on the host
    (cu_seqlens on a GPU): a packing that skips rows, or a max_seqlen too small for the grid, leaves rows no
    program writes; they read 0 instead of whatever memory held."""
    global _zero_outputs
    previous, _zero_outputs = _zero_outputs, active or _zero_outputs
    try:
        yield
    finally:
        _zero_outputs = previous


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A kernel output buffer: uninitialised, zeros within `zeroed_outputs`, or NaN-filled under POISON_OUTPUTS."""
    if _zero_outputs:
        return torch.zeros(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's TF32 switch on the GPU; the interpreter (numpy) only does IEEE."""
    if dtype == torch.float32 and not interpreting() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# Host-side integer helpers: triton.cdiv and triton.next_power_of_2 are @jit functions, ~5 us a call from Python
# (benchmarks/bench_host_overhead.py); launchers run these per call, so plain integer math.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def prompt_block(n_prompt: int) -> int:
    """Prompt keys handled per inner step. Ka = 10 (the paper) fits one 16-wide block; longer prompts loop."""
    cap = INTERPRETER_BLOCK if interpreting() else 64
    return min(max(16, next_power_of_2(n_prompt)), cap)


def size_bucket(n: int) -> int:
    """Autotune key for a sequence length: the next power of two, so nearby lengths reuse one tuning."""
    return max(16, next_power_of_2(n))


@functools.cache
def device_arch(device: torch.device) -> tuple[int, int]:
    """(config table: 80 or 90, shared memory bytes) for a CUDA device."""
    major, minor = torch.cuda.get_device_capability(device)
    arch = 90 if major >= 9 else 80
    smem = SMEM_BYTES.get(10 * major + minor)
    if smem is None:
        smem = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    return arch, smem


def fitting_configs(table, head_dim: int, arch: int, smem_estimate, smem_bytes: int | None = None) -> list[tuple]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) tuples of `table[arch][head_dim]` whose estimated shared memory
    (`smem_estimate(block_m, block_n, head_dim, num_stages)`, 2-byte elements) fits the chip; never empty."""
    limit = SMEM_BYTES[arch] if smem_bytes is None else smem_bytes
    entries = table[arch][head_dim]
    return [c for c in entries if smem_estimate(c[0], c[1], head_dim, c[3]) <= limit] or [min(entries)]


def select_configs(table, head_dim: int, arch: int, smem_bytes: int, smem_estimate) -> list[triton.Config]:
    """The autotune list: the fitting configs on a GPU, one small config under the interpreter."""
    if interpreting():
        return [triton.Config({"BLOCK_M": INTERPRETER_BLOCK, "BLOCK_N": INTERPRETER_BLOCK}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in fitting_configs(table, head_dim, arch, smem_estimate, smem_bytes)
    ]


def divisibility_attrs(fn, divisible) -> dict:
    """`attrs` for triton.compiler.ASTSource(fn, signature, constexprs, attrs): arguments `divisible` (names) marked
    divisible by 16, as the JIT marks 16-byte aligned pointers and integers that are multiples of 16 at launch
    (what lets loads become 16-byte vectors). Triton >= 3.3 (3.6 on the GPU, 3.9 here) keys them by (index,)
    with the backend's own attribute list for a "D" specialisation; older releases used AttrsDescriptor."""
    try:
        from triton.backends.compiler import BaseBackend

        attr = BaseBackend.parse_attr("D")
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(f"triton {triton.__version__} predates ASTSource attrs dicts (needs >= 3.3)") from exc
    unknown = set(divisible) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"divisibility_attrs: {sorted(unknown)} are not arguments of {fn.__name__}")
    return {(fn.arg_names.index(name),): attr for name in divisible}


def compile_spec(
    name, fn, pointers: dict, floats: tuple, constexprs: dict, num_warps: int, num_stages: int, *, score_tile=None
) -> dict:
    """One entry of a kernel module's `compile_specs()`: enough for triton.compile(ASTSource(...)) without a GPU.

    Pointer arguments get `pointers[name]` ("*fp16", ...), `floats` are fp32 scalars, constexprs "constexpr"
    (their values in `constexprs`, keyed by name), every other argument an i32. Specialised as a launch with
    contiguous tensors would be: the head-dim strides (`stride_*d`) and a (Hq,) gate's head stride are the
    constant 1 (Triton turns integer arguments equal to 1 into constants), and every pointer and every other
    stride is divisible by 16 ("divisible": names; "attrs": the same for ASTSource, see `divisibility_attrs`).
    Without that the compiler must assume unaligned, scalar loads: more instructions and registers than the GPU
    runs. Sizes (Nq, Nk, Ka, ...) stay generic.

    score_tile: the two constexpr names whose product is the score tile one iteration of the kernel's main loop
    exponentiates (kernel_report checks one exp2 per element); None keeps kernel_report's default, BLOCK_M by
    the first of BLOCK_N, BLOCK_A present.
    """
    unit = [a for a in fn.arg_names if a.startswith("stride_") and (a.endswith("d") or a == "stride_gh")]
    constexprs = {**dict.fromkeys(unit, 1), **constexprs}
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in pointers:
            signature[arg] = pointers[arg]
        else:
            signature[arg] = "fp32" if arg in floats else "i32"
    missing = set(pointers) - set(fn.arg_names)
    if missing:
        raise ValueError(f"compile_spec for {name}: {sorted(missing)} are not arguments of {fn.__name__}")
    divisible = tuple(a for a, t in signature.items() if t.startswith("*") or (t == "i32" and a.startswith("stride_")))
    spec = dict(
        name=name,
        fn=fn,
        signature=signature,
        constexprs=dict(constexprs),
        divisible=divisible,
        attrs=divisibility_attrs(fn, divisible),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if score_tile is not None:
        unknown = set(score_tile) - set(constexprs)
        if len(score_tile) != 2 or unknown:
            raise ValueError(f"compile_spec for {name}: score_tile must name two constexprs, got {score_tile!r}")
        spec["score_tile"] = tuple(score_tile)
    return spec


def sm90_mma(block_rows: int) -> str:
    """The tensor-core instruction kernel_report expects on sm90 for dots over `block_rows` rows: wgmma (HGMMA)
    needs 64 rows per warpgroup, smaller tiles stay on mma.sync (HMMA)."""
    return "HGMMA" if block_rows >= 64 else "HMMA"


SPEC_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SPEC_HEAD_DIMS = (64, 128, 256)


def prompt_strides(adapter: torch.Tensor | None) -> tuple[int, int, int, int]:
    """(batch, head, key, dim) strides of a (Hkv, Ka, D) or (B, Hkv, Ka, D) prompt; batch stride 0 when shared."""
    if adapter is None:
        return 0, 0, 0, 0
    if adapter.dim() == 3:
        return (0, *adapter.stride())
    return tuple(adapter.stride())


def gate_strides(gate: torch.Tensor | None) -> tuple[int, int]:
    """(batch, head) strides of a (Hq,) or (B, Hq) gate; batch stride 0 when shared."""
    if gate is None:
        return 0, 0
    if gate.dim() == 1:
        return 0, gate.stride(0)
    return gate.stride(0), gate.stride(1)


# ---- device helpers shared by the forward and backward kernels (inlined by Triton) ----


@triton.jit
def visible_key_range(start_m, Nq, L, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For query rows start_m .. start_m + BLOCK_M - 1 over L valid keys: (end of the key blocks every row sees
    whole, end of the keys any row sees). Causal rows see j <= i + L - Nq (bottom-right); the first bound is
    rounded down to a block so the blocks before it need no mask."""
    if CAUSAL:
        shift = L - Nq
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + shift, 0), L)
        full = tl.minimum(tl.maximum(start_m + shift + 1, 0), L)
    else:
        hi = L
        full = L
    return full // BLOCK_N * BLOCK_N, hi


@triton.jit
def load_tile(base, offs_rows, offs_cols, stride_rows, stride_cols, n_rows, ROW_MASK: tl.constexpr):
    """A (rows, cols) tile; rows >= n_rows read as zero when ROW_MASK (zeros contribute nothing downstream)."""
    ptrs = base + offs_rows[:, None] * stride_rows + offs_cols[None, :] * stride_cols
    if ROW_MASK:
        return tl.load(ptrs, mask=offs_rows[:, None] < n_rows, other=0.0)
    return tl.load(ptrs)


@triton.jit
def load_tile_t(base, offs_rows, offs_cols, stride_rows, stride_cols, n_rows, ROW_MASK: tl.constexpr):
    """The transposed (cols, rows) tile of `load_tile`, read straight from memory (no register transpose)."""
    ptrs = base + offs_rows[None, :] * stride_rows + offs_cols[:, None] * stride_cols
    if ROW_MASK:
        return tl.load(ptrs, mask=offs_rows[None, :] < n_rows, other=0.0)
    return tl.load(ptrs)


@triton.jit
def sequence_of(CuSeqlens, pid_bh, H, Nq, Nk, VARLEN: tl.constexpr):
    """(batch index, first row, query rows, key rows) of program row `pid_bh` = batch (or sequence) x H heads.
    VARLEN: sequence s = pid_bh // H of a packed (1, H, T, D) batch holds rows cu[s] .. cu[s+1] - 1, so batch 0,
    its rows offset by cu[s] and Nq = Nk = its length; lse / delta buffers stay indexed by absolute row."""
    if VARLEN:
        # Clamped to [0, T] (T = Nq = Nk): cu_seqlens on a GPU is not checked on the host (that costs a sync), so
        # whatever values arrive, no program reads or writes past the packed rows.
        seq = pid_bh // H
        row0 = tl.minimum(tl.maximum(tl.load(CuSeqlens + seq), 0), Nq)
        end = tl.minimum(tl.maximum(tl.load(CuSeqlens + seq + 1), row0), Nq)
        n_q = (end - row0).to(tl.int32)
        row0 = row0.to(tl.int64)
        n_k = n_q
        b = pid_bh * 0
    else:
        b = pid_bh // H
        row0 = pid_bh * 0
        n_q = Nq
        n_k = Nk
    return b, row0, n_q, n_k


@triton.jit
def key_length(KVLens, b, n_k, HAS_KVLENS: tl.constexpr):
    """Valid keys of batch row b: kv_lens[b] clamped to [0, n_k] (unchecked on a GPU: no host sync), else n_k."""
    if HAS_KVLENS:
        return tl.minimum(tl.maximum(tl.load(KVLens + b).to(tl.int32), 0), n_k)
    return n_k
