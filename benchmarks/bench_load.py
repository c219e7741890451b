"""Host memory of `LLaMA.from_pretrained` with and without quantize=, measured in fresh processes.

A random Meta checkpoint (params.json + consolidated.00.pth) is written once by a child process; then, for each
of --quantize, another child loads it in --dtype and reports (Linux /proc/self/status):

  peak_anon_mb   the largest anonymous resident memory seen while loading, above what the process held before
                 (a thread samples RssAnon every millisecond): the memory the load really allocates
  peak_rss_mb    VmHWM after a reset just before loading (clear_refs 5): also counts the checkpoint's file pages,
                 which torch.load maps and the kernel may drop at any time (they are page cache, not allocations)
  weights_mb     what the loaded model's parameters occupy (quantized data and scales included)

Loading in another dtype than the file's converts every tensor: without quantize= that is a full copy of the
model in --dtype; with it, each block linear is quantized as it is converted and its copy freed at once, so the
peak stays near the quantized size plus one weight.

    python -m benchmarks.bench_load                            # dim 1024, 4 layers, fp32 file loaded in bf16
    python -m benchmarks.bench_load --dim 2048 --layers 8 --quantize none,nf4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.common import DTYPES, Results, add_common_args, log, str_list
from llama_adapter.validation import POSITIVE_INT, Number


def write_checkpoint(directory: Path, dim: int, layers: int, dtype: torch.dtype, vocab: int = 1024) -> int:
    """A random Meta checkpoint of a LLaMA shape; returns its file size in bytes."""
    from llama_adapter import LLaMA, ModelArgs

    args = ModelArgs(dim=dim, n_layers=layers, n_heads=dim // 128, vocab_size=vocab, multiple_of=256)
    model = LLaMA(args, device="meta")
    gen = torch.Generator().manual_seed(0)
    state = {n: torch.randn(t.shape, generator=gen, dtype=dtype) * 0.02 for n, t in model.state_dict().items()}
    directory.mkdir(parents=True, exist_ok=True)
    keys = "dim n_layers n_heads n_kv_heads vocab_size multiple_of norm_eps rope_theta max_seq_len".split()
    (directory / "params.json").write_text(json.dumps({k: getattr(args, k) for k in keys}))
    torch.save(state, directory / "consolidated.00.pth")
    return (directory / "consolidated.00.pth").stat().st_size


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_load(directory: Path, dtype: torch.dtype, quantize: str | None) -> dict:
    """Load in this process and report its memory (see the module docstring)."""
    from llama_adapter import LLaMA, ModelArgs
    from llama_adapter.quantize import check_quantize, weight_bytes

    # Imports before the baseline: torchao, and the modules torch loads on first use of the meta device (~74 MB of
    # Python objects, measured), which would otherwise count as the load's.
    check_quantize(quantize)
    LLaMA(ModelArgs.from_name("tiny"), device="meta")
    base_anon = _status_kb("RssAnon")
    peak = [base_anon]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _status_kb("RssAnon"))
            time.sleep(0.001)

    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    model = LLaMA.from_pretrained(directory, dtype=dtype, quantize=quantize)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _status_kb("RssAnon"))
    end_anon = _status_kb("RssAnon")
    return dict(
        quantize=quantize or "none",
        load_s=round(seconds, 2),
        peak_anon_mb=round((peak[0] - base_anon) / 1024, 1),
        end_anon_mb=round((end_anon - base_anon) / 1024, 1),
        peak_rss_mb=round(_status_kb("VmHWM") / 1024, 1),
        weights_mb=round(weight_bytes(model) / 2**20, 1),
    )


def child(argv: list[str]) -> dict:
    """Run a `--child` step in a fresh interpreter (nothing of this process's memory counts) and parse its JSON.

    glibc serves blocks under its (adaptive, up to 32 MB) mmap threshold from heaps it rarely gives back, so RssAnon
    would keep every freed temporary of a small model's weights; a fixed 64 KB threshold makes freed blocks leave
    RSS, so the sampled peak is the memory the load holds at once (a 70B's weights are all above 32 MB anyway)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_load", "--child", *argv],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if out.returncode:
        raise RuntimeError(f"child {argv} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> Results:
    results = Results("load", args.out, args)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        info = child(["write", str(ckpt), str(args.dim), str(args.layers), args.ckpt_dtype])
        log(
            f"checkpoint dim {args.dim} x {args.layers} layers, {args.ckpt_dtype}: {info['file_mb']} MB; "
            f"loading in {args.dtype}"
        )
        for quantize in str_list(args.quantize):
            row = dict(
                dim=args.dim,
                layers=args.layers,
                ckpt_dtype=args.ckpt_dtype,
                dtype=args.dtype,
                file_mb=info["file_mb"],
                error=None,
            )
            try:
                row.update(child(["load", str(ckpt), args.dtype, quantize]))
            except Exception as exc:
                row.update(quantize=quantize, error=str(exc)[:300])
            results.add(row)
            log(format_row(row))
    return results


def format_row(row: dict) -> str:
    if row["error"]:
        return f"{row['quantize']:>5}: {row['error']}"
    return (
        f"{row['quantize']:>5}: weights {row['weights_mb']:.1f} MB, peak anonymous +{row['peak_anon_mb']:.1f} MB, "
        f"peak RSS {row['peak_rss_mb']:.1f} MB (with mapped file pages), {row['load_s']:.1f} s"
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=Number(int, min=128), default=1024, help="model width (heads of 128)")
    p.add_argument("--layers", type=POSITIVE_INT, default=4)
    p.add_argument("--ckpt-dtype", default="fp32", choices=sorted(DTYPES), help="dtype stored in the file")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="dtype to load in")
    p.add_argument("--quantize", default="none,int8,nf4", help="loads to measure, of none,nf4,int8")
    add_common_args(p, budget=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # internal: one step in a fresh process, JSON on the last line of stdout
        step, directory, *rest = argv[1:]
        if step == "write":
            dim, layers, dtype = int(rest[0]), int(rest[1]), DTYPES[rest[2]]
            size = write_checkpoint(Path(directory), dim, layers, dtype)
            print(json.dumps({"file_mb": round(size / 2**20, 1)}))
        else:
            dtype, quantize = DTYPES[rest[0]], rest[1]
            print(json.dumps(measure_load(Path(directory), dtype, None if quantize == "none" else quantize)))
        return 0
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
