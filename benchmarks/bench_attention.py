"""Gated prompt attention, provider against provider: fused kernels vs what users run today.

Providers (all compute o = softmax_causal(s q k^T) v + g * softmax(s q ak^T) av, docs/design.md §1):
  fused               ours: llama_adapter.ops, words and prompt in one pass
  fused_noprompt      ours with no prompt (Ka = 0): the floor the prompt's cost is measured against
  sdpa_adapter        torch SDPA on its default backend for the words + a second SDPA for the prompt (PEFT, litgpt)
  sdpa_flash_adapter  the same, SDPA forced to its FlashAttention-2 backend
  eager               the official LLaMA-Adapter math: N^2 scores, fp32 softmax
  flex                FlexAttention (compiled) for the words + the prompt as matmuls in the same compiled graph;
                      the two softmaxes are separate, so the outputs merge as a gated sum (no LSE merge needed)

Modes fwd (no autograd), bwd (backward from a kept graph), fwd+bwd. Shapes: B * N = --tokens at every N, so each
size does the same projections' worth of work, and H = --hidden / D. TFLOP/s = 4*B*H*N^2*D (x0.5 causal; bwd
2.5x, fwd+bwd 3.5x), the prompt's 4*B*H*N*Ka*D not counted. Median of do_bench; inputs rotate over enough
sets to exceed twice the L2 cache. Peak memory is one call's, inputs included.

    python -m benchmarks.bench_attention --quick          # gpu_suite: bf16, D=128, N 512..16384
    python -m benchmarks.bench_attention --providers fused,sdpa_adapter --modes fwd --seqlens 1024,4096
    python -m benchmarks.bench_attention --quick --print-autotune    # also print each shape's autotune winner
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from benchmarks.attention_providers import PROVIDERS, Unavailable, make_provider, reference_for, sdpa_choice
from benchmarks.common import (
    DTYPES,
    HAS_CUDA,
    Budget,
    Results,
    add_common_args,
    attention_flops,
    describe_error,
    free_memory,
    int_list,
    is_fatal,
    is_oom,
    log,
    peak_memory_mb,
    reset_peak_memory,
    significant,
    str_list,
    time_ms,
)
from benchmarks.plot import maybe_plot
from llama_adapter.validation import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE_INT

MODES = ("fwd", "bwd", "fwd+bwd")


def make_inputs(seed, *, B, H, Hkv, N, D, Ka, dtype, grad, device):
    """(q, k, v, ak, av, g, do): prompt shared by the batch, gate per head, nonzero everywhere."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, scale=1.0):
        t = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale
        return t.to(dtype).requires_grad_(grad)

    q, k, v = rand(B, H, N, D), rand(B, Hkv, N, D), rand(B, Hkv, N, D)
    ak, av = rand(Hkv, Ka, D), rand(Hkv, Ka, D)
    g = rand(H, scale=0.5)
    return q, k, v, ak, av, g, rand(B, H, N, D).detach()


def measure(fn, mode: str, make_set, *, l2_bytes: int, warmup_ms: float, rep_ms: float, reference=None) -> dict:
    """ms (median) and peak_mem_mb for one provider/mode/shape. Input sets rotate to defeat the L2 cache.

    In fwd mode with a `reference` provider, also rel_err = ||out - ref|| / ||ref|| on the first input set:
    a fast wrong kernel must not pass unnoticed."""

    def fwd_bwd(s):
        return torch.autograd.grad(fn(*s[:6]), s[:6], s[6], allow_unused=True)

    def fwd(s, fn=fn):
        with torch.no_grad():
            return fn(*s[:6])

    step = fwd if mode == "fwd" else fwd_bwd
    first = make_set(0)
    reset_peak_memory()
    out = step(first)  # also the warm-up that compiles / autotunes
    peak = peak_memory_mb()
    checked = {}
    if reference is not None and mode == "fwd":
        want = fwd(first, reference).float()
        checked["rel_err"] = float((out.float() - want).norm() / want.norm())
        del want
    del out
    set_bytes = sum(t.numel() * t.element_size() for t in first) * (1 if mode == "fwd" else 2)
    n_sets = min(4, max(1, math.ceil(2 * l2_bytes / set_bytes))) if l2_bytes else 1
    sets = [first] + [make_set(i) for i in range(1, n_sets)]
    order = itertools.cycle(range(n_sets))
    if mode == "bwd":
        outs = [fn(*s[:6]) for s in sets]

        def call():
            i = next(order)
            torch.autograd.grad(outs[i], sets[i][:6], sets[i][6], retain_graph=True, allow_unused=True)

    else:

        def call():
            step(sets[next(order)])

    ms = time_ms(call, warmup_ms=warmup_ms, rep_ms=rep_ms)
    return {"ms": ms, "peak_mem_mb": peak, "input_sets": n_sets, **checked}


def fill_defaults(args: argparse.Namespace) -> None:
    """CPU (with or without --quick): a tiny fp32 smoke (interpreter); GPU: --quick is gpu_suite's subset, else the
    full sweep. Explicit --dtypes/--seqlens/... still win, so GPU sizes can be asked for on a CPU."""
    if args.quick and HAS_CUDA:
        # the sizes the targets name come first, in case the time budget runs out
        sweep = dict(dtypes="bf16", head_dims="128", seqlens="1024,4096,16384,2048,512,8192", rep_ms=50, warmup_ms=10)
    elif HAS_CUDA:
        sweep = dict(dtypes="bf16,fp16", head_dims="64,128", seqlens="256,512,1024,2048,4096,8192,16384")
    else:
        sweep = dict(dtypes="fp32", head_dims="16", seqlens="16,32", tokens=32, hidden=32, rep_ms=1, warmup_ms=0)
    for key, value in {"tokens": 16384, "hidden": 4096, "rep_ms": 100, "warmup_ms": 25, **sweep}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


@dataclass
class Sweep:
    """What one run carries from row to row: the providers made so far, the time each used, the sizes that ran
    out of memory, and a CUDA error after which nothing more can run."""

    budget: Budget
    provider_budget: dict[str, float]  # provider -> seconds it may use
    causal: bool
    spent: defaultdict = field(default_factory=lambda: defaultdict(float))  # provider -> seconds used
    oom_at: dict = field(default_factory=dict)  # (provider, mode, dtype, D) -> smallest N that ran out of memory
    providers: dict = field(default_factory=dict)  # (provider, D) -> (fn, label), or why it cannot run
    fatal: str | None = None

    def provider(self, name: str, D: int):
        """(fn, label) for `name` at head dim D (sm_scale depends on D), or the reason it cannot run."""
        if (name, D) not in self.providers:
            try:
                self.providers[name, D] = make_provider(name, causal=self.causal, scale=D**-0.5)
            except Exception as exc:  # Unavailable, or the fused ops not importable
                self.providers[name, D] = str(exc) if isinstance(exc, Unavailable) else describe_error(exc)
        return self.providers[name, D]

    def skip_reason(self, row: dict) -> str | None:
        """Why `row` is not measured, or None to measure it."""
        provider, N = row["provider"], row["N"]
        made = self.provider(provider, row["D"])
        key = oom_key(row)
        if self.fatal:
            return f"skipped: CUDA context lost earlier ({self.fatal})"
        if isinstance(made, str):
            return made
        if self.budget.expired():
            return "skipped: time budget"
        if self.spent[provider] > self.provider_budget.get(provider, math.inf):
            return f"skipped: provider time budget ({self.provider_budget[provider]:.0f} s) used"
        if key in self.oom_at and N > self.oom_at[key]:
            return f"skipped: OOM at N={self.oom_at[key]}"
        if row["dtype"] == "bf16" and not HAS_CUDA and provider.startswith("fused"):
            return "skipped: the interpreter has no bf16 arithmetic"
        return None

    def record(self, row: dict, seconds: float) -> None:
        self.spent[row["provider"]] += seconds
        if is_oom(row["error"]):
            key = oom_key(row)
            self.oom_at[key] = min(row["N"], self.oom_at.get(key, row["N"]))
        if is_fatal(row["error"]):
            self.fatal = row["error"][:120]


def oom_key(row: dict) -> tuple:
    """Rows that share this key and have a larger N are skipped after an OOM."""
    return row["provider"], row["mode"], row["dtype"], row["D"]


def measure_row(row: dict, sweep: Sweep, args: argparse.Namespace, l2_bytes: int, device: str) -> None:
    """Time one provider/mode/shape into `row`; an exception becomes the row's error."""
    provider, mode, D = row["provider"], row["mode"], row["D"]
    fn, row["backend"] = sweep.provider(provider, D)
    started = time.monotonic()
    shape = dict(
        B=row["B"], H=row["H"], Hkv=row["Hkv"], N=row["N"], D=D, Ka=args.ka, dtype=DTYPES[row["dtype"]], device=device
    )

    def make_set(seed):
        return make_inputs(seed, **shape, grad=mode != "fwd")

    try:
        if provider == "sdpa_adapter":
            q, k, v = make_set(0)[:3]
            row["backend"] = f"sdpa:{sdpa_choice(q, k, v, sweep.causal)}"
            del q, k, v
        reference = None if provider == "sdpa_adapter" else reference_for(provider, sweep.causal, D**-0.5)
        row.update(
            measure(
                fn, mode, make_set, l2_bytes=l2_bytes, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, reference=reference
            )
        )
    except Exception as exc:
        row["error"] = describe_error(exc)
    free_memory()
    sweep.record(row, time.monotonic() - started)


def add_rates(row: dict, dev) -> None:
    """TFLOP/s of a measured row, and its share of the device's datasheet and measured peaks."""
    tflops = (
        attention_flops(row["B"], row["H"], row["N"], row["N"], row["D"], causal=row["causal"], mode=row["mode"])
        / (row["ms"] * 1e-3)
        / 1e12
    )
    row["tflops"] = significant(tflops)
    if dev.peak_tflops:
        row["pct_peak"] = round(100 * tflops / dev.peak_tflops, 1)
    if dev.measured_tflops:
        row["pct_measured"] = round(100 * tflops / dev.measured_tflops, 1)


def run(args: argparse.Namespace) -> Results:
    fill_defaults(args)
    if getattr(args, "print_autotune", False):
        os.environ["TRITON_PRINT_AUTOTUNING"] = "1"  # read by triton's autotuner at each tuning
    results = Results("attention", args.out, args)
    dev = results.device
    device = "cuda" if HAS_CUDA else "cpu"
    causal = not args.non_causal
    provider_budget = {name: float(s) for name, s in (item.split("=") for item in str_list(args.provider_budget))}
    sweep = Sweep(Budget(args.budget), provider_budget, causal)
    log(f"attention on {dev.name}: torch {torch.__version__}, results -> {results.path}")
    for dtype_name, D, N in itertools.product(str_list(args.dtypes), int_list(args.head_dims), int_list(args.seqlens)):
        H = args.heads or max(1, args.hidden // D)
        Hkv = max(1, H // args.kv_groups)
        B = max(1, args.tokens // N)
        for provider, mode in itertools.product(str_list(args.providers), str_list(args.modes)):
            Ka = 0 if provider == "fused_noprompt" else args.ka
            row = dict(provider=provider, mode=mode, dtype=dtype_name, B=B, H=H, Hkv=Hkv, N=N, D=D, Ka=Ka)
            row.update(causal=causal, ms=None, tflops=None, peak_mem_mb=None, backend=None, error=None)
            row["error"] = sweep.skip_reason(row)
            if row["error"] is None:
                measure_row(row, sweep, args, dev.l2_bytes, device)
            if row["ms"]:
                add_rates(row, dev)
            results.add(row)
            log(format_row(row))
    maybe_plot(results, args)
    return results


def format_row(row: dict) -> str:
    head = f"{row['provider']:>18} {row['mode']:>7} {row['dtype']} D={row['D']} N={row['N']:>5} B={row['B']:>3}"
    if row["error"]:
        return f"{head}: {row['error']}"
    mem = f" peak {row['peak_mem_mb']:.0f} MiB" if row["peak_mem_mb"] is not None else ""
    err = f" rel_err {row['rel_err']:.1e}" if "rel_err" in row else ""
    return f"{head}: {row['ms']:8.3f} ms {row['tflops']:7.1f} TFLOP/s{mem}{err} [{row['backend']}]"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--dtypes", default=None, help="bf16,fp16,fp32")
    p.add_argument("--head-dims", default=None, help="e.g. 64,128")
    p.add_argument("--seqlens", default=None, help="e.g. 256,1024,4096,16384")
    p.add_argument("--tokens", type=POSITIVE_INT, default=None, help="B * N at every N (default 16384)")
    p.add_argument("--hidden", type=POSITIVE_INT, default=None, help="H = hidden / D (default 4096, LLaMA-7B)")
    p.add_argument("--heads", type=POSITIVE_INT, default=None, help="query heads (overrides --hidden)")
    p.add_argument("--kv-groups", type=POSITIVE_INT, default=1, help="query heads per KV head (GQA); 1 = MHA")
    p.add_argument("--ka", type=NON_NEGATIVE_INT, default=10, help="prompt length")
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--quick", action="store_true", help="bf16, D=128, N 512..16384 (gpu_suite.sh)")
    p.add_argument(
        "--print-autotune",
        action="store_true",
        help="print the config the kernels' autotuners pick for each new shape (TRITON_PRINT_AUTOTUNING=1)",
    )
    p.add_argument("--warmup-ms", type=NON_NEGATIVE, default=None)
    p.add_argument("--rep-ms", type=NON_NEGATIVE, default=None)
    p.add_argument(
        "--provider-budget",
        default="flex=40,eager=40",
        help="seconds a provider may use before its remaining rows are skipped (compiles, slow baselines)",
    )
    add_common_args(p, budget=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
