"""Sweep block configs of the fused attention kernels on one GPU: forward, dK/dV and dQ timed separately.

    python -m benchmarks.tune_attention [--seqlens 1024,4096] [--budget 150] [--out results/tune.json]

Default problem: bf16, D = 128, H = 32, causal, Ka = 10, B * N = 16384 tokens. Each kernel is launched with an
explicit config (the autotuner bypassed) from a wide candidate list: the current tables (kernels/attention_*.py,
FWD_CONFIGS / DKDV_CONFIGS / DQ_CONFIGS) first, then a grid of others, every one filtered by the kernels' own
shared-memory estimate for this chip. Times are triton.testing.do_bench medians; a config that fails to
compile or launch becomes a row with its error. Kernels take turns so each gets its share of the budget, and
every row is written to the JSON at once (a kill keeps what was measured).

TFLOP/s per kernel count the matmuls it runs: forward 2 (qk, pv) = 4·B·H·N²·D·½; dK/dV 4 (qk, dv, dp, dk) =
2x that; dQ 3 (qk, dp, dq) = 1.5x. FlashAttention's convention for the whole backward (2.5x the forward)
is their time sum over 2.5x.

On a machine without CUDA it runs a dry path under the interpreter (fp32, tiny shapes, two candidates per
kernel) so the test suite keeps this script from rotting; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import torch

from benchmarks.common import BUDGET, HAS_CUDA, Budget, default_results_dir, describe_error, device_info, log, time_ms

# Importing the kernels must follow benchmarks.common, which sets TRITON_INTERPRET=1 on a CPU-only machine.
from llama_adapter.kernels import _common  # noqa: E402
from llama_adapter.kernels.attention_bwd import (  # noqa: E402
    DKDV_CONFIGS,
    DQ_CONFIGS,
    bwd_dkdv,
    bwd_dq,
    bwd_preprocess,
    dkdv_smem_bytes,
    dq_smem_bytes,
)
from llama_adapter.kernels.attention_fwd import FWD_CONFIGS, adapter_attention_fwd, fwd_smem_bytes  # noqa: E402
from llama_adapter.validation import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE_INT

KERNELS = ("fwd", "dkdv", "dq")
# matmuls each kernel runs, in units of the forward's two
FLOP_FACTOR = {"fwd": 1.0, "dkdv": 2.0, "dq": 1.5}
TABLES = {"fwd": FWD_CONFIGS, "dkdv": DKDV_CONFIGS, "dq": DQ_CONFIGS}
SMEM = {"fwd": fwd_smem_bytes, "dkdv": dkdv_smem_bytes, "dq": dq_smem_bytes}
TABLE_NAMES = {"fwd": "FWD_CONFIGS", "dkdv": "DKDV_CONFIGS", "dq": "DQ_CONFIGS"}
# (BLOCK_M, BLOCK_N) grids: the forward and dQ tile queries (BLOCK_M) against streamed keys; dK/dV the reverse
GRIDS = {
    "fwd": ((64, 128), (32, 64, 128)),
    "dkdv": ((16, 32, 64), (32, 64, 128)),
    "dq": ((32, 64, 128), (16, 32, 64)),
}


def candidates(kernel: str, head_dim: int, arch: int, smem_bytes: int) -> list[tuple]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): the table's configs, then the grid's, those that fit the chip."""
    table = list(TABLES[kernel].get(arch, {}).get(head_dim, []))
    block_ms, block_ns = GRIDS[kernel]
    grid = [(m, n, w, s) for m, n in itertools.product(block_ms, block_ns) for w in (4, 8) for s in (2, 3, 4)]
    seen, out = set(), []
    for cfg in table + grid:
        if cfg not in seen and SMEM[kernel](cfg[0], cfg[1], head_dim, cfg[3]) <= smem_bytes:
            seen.add(cfg)
            out.append(cfg)
    return out


def make_problem(N: int, B: int, H: int, D: int, Ka: int, dtype, device, seed: int = 0, fwd_config=None) -> dict:
    """Random inputs, plus the forward's outputs and the backward's deltas that dK/dV and dQ consume.
    `fwd_config` (BLOCK_M, BLOCK_N, num_warps, num_stages) skips autotuning that forward (its compiles would
    eat the budget)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    p = dict(
        q=rand(B, H, N, D),
        k=rand(B, H, N, D),
        v=rand(B, H, N, D),
        adapter_k=rand(H, Ka, D),
        adapter_v=rand(H, Ka, D),
        gate=torch.full((H,), 0.5, device=device),
        do=rand(B, H, N, D),
    )
    p["sm_scale"] = D**-0.5
    config = None if fwd_config is None else dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), fwd_config))
    o, p["lse_w"], p["lse_a"] = adapter_attention_fwd(
        p["q"],
        p["k"],
        p["v"],
        p["adapter_k"],
        p["adapter_v"],
        p["gate"],
        causal=True,
        sm_scale=p["sm_scale"],
        config=config,
    )
    p["delta_w"], p["delta_a"] = bwd_preprocess(
        p["do"], p["q"], p["adapter_k"], p["adapter_v"], p["gate"], o, p["lse_a"], sm_scale=p["sm_scale"]
    )
    return p


def launcher(kernel: str, p: dict, cfg: tuple):
    config = dict(BLOCK_M=cfg[0], BLOCK_N=cfg[1], num_warps=cfg[2], num_stages=cfg[3])
    q, k, v, ak, av, g, scale = p["q"], p["k"], p["v"], p["adapter_k"], p["adapter_v"], p["gate"], p["sm_scale"]
    if kernel == "fwd":
        return lambda: adapter_attention_fwd(q, k, v, ak, av, g, causal=True, sm_scale=scale, config=config)
    if kernel == "dkdv":
        return lambda: bwd_dkdv(
            q,
            k,
            v,
            p["do"],
            p["lse_w"],
            p["delta_w"],
            adapter_k=ak,
            adapter_v=av,
            gate=g,
            lse_a=p["lse_a"],
            delta_a=p["delta_a"],
            causal=True,
            sm_scale=scale,
            config=config,
        )
    return lambda: bwd_dq(
        q,
        k,
        v,
        ak,
        av,
        g,
        p["do"],
        p["lse_w"],
        p["lse_a"],
        p["delta_w"],
        p["delta_a"],
        causal=True,
        sm_scale=scale,
        config=config,
    )


def kernel_flops(kernel: str, B: int, H: int, N: int, D: int) -> float:
    return 4.0 * B * H * N * N * D * 0.5 * FLOP_FACTOR[kernel]


def best_configs(rows: list[dict], kernel: str, top: int = 3) -> list[tuple[tuple, float]]:
    """(config, geometric-mean TFLOP/s) of the `top` configs measured at every N, best first."""
    ns = {r["N"] for r in rows if r["kernel"] == kernel}
    by_cfg: dict[tuple, dict[int, float]] = {}
    for r in rows:
        if r["kernel"] == kernel and r["tflops"]:
            by_cfg.setdefault(tuple(r["config"]), {})[r["N"]] = r["tflops"]
    full = [
        (cfg, math.exp(sum(math.log(t) for t in per_n.values()) / len(per_n)))
        for cfg, per_n in by_cfg.items()
        if set(per_n) == ns
    ]
    return sorted(full, key=lambda x: -x[1])[:top]


def recommendation(rows: list[dict], arch: int, head_dim: int, device_name: str) -> str:
    lines = [f"# measured by benchmarks/tune_attention.py on {device_name}: best first (geometric mean over N)"]
    for kernel in KERNELS:
        best = best_configs(rows, kernel)
        if best:
            entries = ", ".join(str(cfg) for cfg, _ in best)
            lines.append(f"{TABLE_NAMES[kernel]}[{arch}][{head_dim}] = [{entries}]")
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    head = f"{'kernel':<6} {'N':>6} {'best config (M, N, warps, stages)':<34} {'ms':>8} {'TFLOP/s':>8} {'tried':>6}"
    lines = [head, "-" * len(head)]
    for kernel in KERNELS:
        for N in sorted({r["N"] for r in rows if r["kernel"] == kernel}):
            mine = [r for r in rows if r["kernel"] == kernel and r["N"] == N]
            ok = [r for r in mine if r["ms"] is not None]
            if not ok:
                lines.append(f"{kernel:<6} {N:>6} {'(every config failed)':<34} {'':>8} {'':>8} {len(mine):>6}")
                continue
            r = min(ok, key=lambda r: r["ms"])
            cfg = str(tuple(r["config"]))
            lines.append(f"{kernel:<6} {N:>6} {cfg:<34} {r['ms']:>8.3f} {r['tflops']:>8.1f} {len(mine):>6}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    dev = device_info()
    device, arch, dtype, lists = plan(args)
    out = Path(args.out) if args.out else default_results_dir() / f"tune_attention-{dev.slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    import triton

    result = dict(
        device=dev.slug,
        device_name=dev.name,
        torch=torch.__version__,
        triton=triton.__version__,
        arch=arch,
        dtype=str(dtype).removeprefix("torch."),
        D=args.head_dim,
        H=args.heads,
        Ka=args.ka,
        tokens=args.tokens,
        causal=True,
        candidates={k: [list(c) for c in v] for k, v in lists.items()},
        rows=[],
        recommendation="",
    )

    def write():
        out.write_text(json.dumps(result, indent=1) + "\n")

    budget = Budget(args.budget)
    problems = make_problems(args, dtype, device, lists["fwd"])
    sweep(problems, lists, args, budget, result["rows"], write)
    result["recommendation"] = recommendation(result["rows"], arch, args.head_dim, dev.name)
    write()
    log(format_table(result["rows"]))
    log(result["recommendation"])
    log(f"wrote {out}")
    return result


def plan(args) -> tuple[torch.device, int, torch.dtype, dict[str, list[tuple]]]:
    """(device, arch, dtype, {kernel: configs to try}) for this machine."""
    if HAS_CUDA:
        device = torch.device("cuda")
        arch, smem = _common.device_arch(device)
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
        return device, arch, dtype, {k: candidates(k, args.head_dim, arch, smem)[: args.max_configs] for k in KERNELS}
    # interpreter dry run: fp32 (no bf16 arithmetic there), blocks the tiny problem still splits
    return torch.device("cpu"), 80, torch.float32, {k: [(16, 16, 4, 1), (32, 16, 4, 1)] for k in KERNELS}


def make_problems(args, dtype, device, fwd_candidates: list[tuple]) -> dict[int, dict]:
    """{N: problem} for every --seqlens length whose inputs could be built (B * N = --tokens); the forward that
    makes them runs at the first forward candidate."""
    problems = {}
    for N in args.seqlens:
        try:
            B, H = max(1, args.tokens // N), args.heads
            problems[N] = make_problem(N, B, H, args.head_dim, args.ka, dtype, device, fwd_config=fwd_candidates[0])
        except Exception as exc:
            log(f"N={N}: could not build the problem: {describe_error(exc)}")
    return problems


def sweep(problems: dict[int, dict], lists: dict[str, list[tuple]], args, budget: Budget, rows: list, write) -> None:
    """Time the configs in `lists` at every problem into `rows`, calling `write` after each row.

    Kernels take turns, one config each (measured at every N: it compiles once), so a short budget still tunes
    all three at every length."""
    queues = {k: list(lists[k]) for k in KERNELS}
    while problems and any(queues.values()) and not budget.expired():
        for kernel in KERNELS:
            if not queues[kernel]:
                continue
            cfg = queues[kernel].pop(0)
            for N, problem in problems.items():
                if budget.expired():
                    break
                rows.append(measure_config(kernel, cfg, N, problem, args))
                write()
    if budget.expired():
        log(f"budget of {args.budget:.0f} s spent; untried: {sum(map(len, queues.values()))} configs")


def measure_config(kernel: str, cfg: tuple, N: int, problem: dict, args) -> dict:
    """The row of one kernel at one config and length; a config that fails to compile or launch gets its error."""
    B = problem["q"].shape[0]
    row = dict(kernel=kernel, N=N, B=B, config=list(cfg), ms=None, tflops=None, error=None)
    start = time.perf_counter()
    try:
        row["ms"] = time_ms(launcher(kernel, problem, cfg), warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
        row["tflops"] = kernel_flops(kernel, B, args.heads, N, args.head_dim) / row["ms"] / 1e9
    except Exception as exc:  # a config that cannot compile or launch is a finding, not a crash
        row["error"] = describe_error(exc)
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqlens", default=None, help="comma list (default 1024,4096; 32 without CUDA)")
    p.add_argument("--tokens", type=POSITIVE_INT, default=None, help="B * N (default 16384; 32 without CUDA)")
    p.add_argument("--heads", type=POSITIVE_INT, default=None, help="H (default 32; 2 without CUDA)")
    p.add_argument("--head-dim", type=POSITIVE_INT, default=None, help="D (default 128; 16 without CUDA)")
    p.add_argument("--ka", type=NON_NEGATIVE_INT, default=10, help="prompt length")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--max-configs", type=POSITIVE_INT, default=60, help="candidates per kernel, table configs first")
    p.add_argument("--budget", type=BUDGET, default=150.0, help="seconds; untried configs are skipped after it")
    p.add_argument("--warmup-ms", type=NON_NEGATIVE, default=None)
    p.add_argument("--rep-ms", type=NON_NEGATIVE, default=None)
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/tune_attention-<device>.json)")
    args = p.parse_args(argv)
    gpu = HAS_CUDA
    args.seqlens = [int(x) for x in args.seqlens.split(",")] if args.seqlens else ([1024, 4096] if gpu else [32])
    args.tokens = args.tokens or (16384 if gpu else 32)
    args.heads = args.heads or (32 if gpu else 2)
    args.head_dim = args.head_dim or (128 if gpu else 16)
    args.warmup_ms = args.warmup_ms if args.warmup_ms is not None else (10 if gpu else 0)
    args.rep_ms = args.rep_ms if args.rep_ms is not None else (40 if gpu else 0)
    return args


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
