"""What the benchmark scripts share: device facts, timing, error capture, time budgets and the results file.

Every row is written to the JSON as soon as it is measured, so a crash or a `timeout` kill keeps what was
done. A failing provider or size becomes a row with `error` set (OOM included) instead of ending the run.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # The fused kernels run on the CPU under Triton's interpreter, which is read when @triton.jit runs:
    # set it before llama_adapter's kernels are first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llama_adapter.validation import Number  # noqa: E402  (no kernel import: safe after the line above)

BUDGET = Number(float)  # seconds; <= 0 means no limit
RESULTS_DIR = Path(__file__).resolve().parent / "results"  # committed GPU results only
# CPU timings mean nothing for the kernels' speed: they go to a git-ignored place, never beside the GPU results.
CPU_RESULTS_DIR = Path(__file__).resolve().parent.parent / "runs" / "bench"


def default_results_dir() -> Path:
    return RESULTS_DIR if HAS_CUDA else CPU_RESULTS_DIR


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class DeviceInfo:
    slug: str  # short name for file names: "h100", "a100", "cpu"
    name: str
    peak_tflops: float | None  # dense bf16 datasheet
    measured_tflops: float | None  # a large bf16 matmul measured on this workplace's machines
    bandwidth_gbs: float | None  # datasheet memory bandwidth
    l2_bytes: int


# (dense bf16 TFLOP/s, measured bf16 matmul TFLOP/s, GB/s). H100/H200 measured: 8192^3 bf16 matmul, ~790.
_SPECS = {
    "h100-pcie": (756.0, None, 2000.0),
    "h100": (989.0, 790.0, 3350.0),
    "h200": (989.0, 790.0, 4800.0),
    "a100": (312.0, None, 2039.0),
}


def device_slug(name: str) -> str:
    low = name.lower()
    for key in ("h200", "h100", "a100"):
        if key in low:
            return key
    return re.sub(r"[^a-z0-9]+", "-", low).strip("-")[:32] or "unknown"


def device_info() -> DeviceInfo:
    if not HAS_CUDA:
        return DeviceInfo("cpu", "cpu", None, None, None, 0)
    name = torch.cuda.get_device_name()
    slug = device_slug(name)
    spec_key = "h100-pcie" if slug == "h100" and "pcie" in name.lower() else slug
    peak, measured, bandwidth = _SPECS.get(spec_key, (None, None, None))
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    return DeviceInfo(slug, name, peak, measured, bandwidth, l2)


def log(msg: str) -> None:
    print(msg, flush=True)


def time_ms(fn, *, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds per call. CUDA: triton's do_bench (events, L2 flushed between calls)."""
    if HAS_CUDA:
        import triton.testing

        try:
            return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        except TypeError:  # a triton without return_mode
            return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5])[0])
    if warmup_ms > 0:
        fn()
    times = []
    while not times or (sum(times) < rep_ms and len(times) < 5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


SIGNIFICANT_DIGITS = 4
RELATIVE_ROUNDING = 5 * 10.0**-SIGNIFICANT_DIGITS  # the most `significant` changes a value, relatively


def significant(x: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """`x` to a fixed number of significant digits: a timing or rate keeps the same relative precision however
    fast or slow the machine is (rounding to fixed decimals turned a slow run's 0.04 tokens/s into 0.0, and a
    fast run's 0.0004 ms into 0)."""
    return float(f"{x:.{digits}g}")


def synchronize() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def reset_peak_memory() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb() -> float | None:
    """Peak allocated since the last reset_peak_memory(), MiB (None on the CPU, where torch does not track it)."""
    if not HAS_CUDA:
        return None
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def free_memory() -> None:
    gc.collect()
    if HAS_CUDA:
        torch.cuda.empty_cache()


_FATAL = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address")


def describe_error(exc: BaseException) -> str:
    """One line for a row's `error`: "OOM: ..." for out-of-memory, else "Type: message"."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError) or "out of memory" in first.lower():
        return f"OOM: {first}"
    return f"{type(exc).__name__}: {first}"


def is_oom(error: str | None) -> bool:
    return bool(error) and error.startswith("OOM")


def is_fatal(error: str | None) -> bool:
    """The CUDA context is gone after these: every later launch in the process fails."""
    return bool(error) and any(s in error.lower() for s in _FATAL)


class Budget:
    """A wall-clock allowance; `seconds=None` or <= 0 means unlimited."""

    def __init__(self, seconds: float | None):
        self.deadline = time.monotonic() + seconds if seconds and seconds > 0 else math.inf

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0


def skip_reason(budget: Budget, fatal: str | None = None) -> str | None:
    """Why the next row is not measured: a CUDA error earlier in the process (`fatal`), or the budget is spent;
    None to measure it."""
    if fatal:
        return f"skipped: CUDA context lost earlier ({fatal})"
    if budget.expired():
        return "skipped: time budget"
    return None


class Results:
    """benchmarks/results/<bench>-<device>.json: {"device", "torch", "triton", "rows": [...]}, rewritten per row."""

    def __init__(self, bench: str, out_dir: str | Path | None = None, args: argparse.Namespace | None = None):
        import triton

        self.device = device_info()
        out = Path(out_dir) if out_dir else default_results_dir()
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / f"{bench}-{self.device.slug}.json"
        self.header = {
            "bench": bench,
            "device": self.device.slug,
            "device_name": self.device.name,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "peak_tflops": self.device.peak_tflops,
            "measured_tflops": self.device.measured_tflops,
            "bandwidth_gbs": self.device.bandwidth_gbs,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "args": {k: v for k, v in vars(args).items() if k != "func"} if args else {},
        }
        self.rows: list[dict] = []
        self.write()

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        self.write()
        return row

    def write(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({**self.header, "rows": self.rows}, indent=1) + "\n")
        tmp.replace(self.path)


def add_common_args(parser: argparse.ArgumentParser, budget: float) -> None:
    parser.add_argument(
        "--out", default=None, help="results folder (default benchmarks/results on a GPU, runs/bench on a CPU)"
    )
    parser.add_argument("--budget", type=BUDGET, default=budget, help="seconds before remaining rows are skipped")
    parser.add_argument("--no-plot", action="store_true", help="write the JSON only")


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def str_list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def attention_flops(B: int, H: int, Nq: int, Nk: int, D: int, *, causal: bool, mode: str = "fwd") -> float:
    """4*B*H*Nq*Nk*D (x0.5 causal) for the forward; backward 2.5x it, fwd+bwd 3.5x (FlashAttention's count)."""
    fwd = 4.0 * B * H * Nq * Nk * D * (0.5 if causal else 1.0)
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def build_model(
    size: str,
    *,
    layers: int | None,
    seq: int,
    device,
    dtype,
    adapter_len: int = 10,
    adapter_layers=30,
    quantize: str = "none",
):
    """A LLaMA of a `ModelArgs.from_name` shape ("7B", "tiny", ...), random weights and an adapter, on `device`;
    quantize "nf4" or "int8" stores its frozen block linears so (`llama_adapter.quantize`, torchao).

    Gates are set to 0.1 rather than their zero init so every path carries real values, as mid-training."""
    from llama_adapter import AdapterConfig, LLaMA, ModelArgs

    extra = {"n_layers": layers} if layers else {}
    params = ModelArgs.from_name(size, **extra)
    if params.max_seq_len < seq:
        params = ModelArgs.from_name(size, max_seq_len=seq, **extra)
    adapter = AdapterConfig(adapter_len=adapter_len, adapter_layers=min(adapter_layers, params.n_layers))
    torch.manual_seed(0)
    model = LLaMA(params, adapter, device=device, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adapter_gate"):
                p.fill_(0.1)
    if quantize != "none":
        from llama_adapter.quantize import quantize_model

        quantize_model(model, quantize)
    return model
