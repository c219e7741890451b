"""PNGs and a markdown summary from the benchmarks' JSON files (benchmarks/results/<bench>-<device>.json).

    python -m benchmarks.plot                       # every JSON in benchmarks/results (runs/bench on a CPU)
    python -m benchmarks.plot results/attention-h100.json --summary-only

Summary ratios are speedups of ours: another provider's time over fused's (> 1: fused is faster).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from benchmarks.common import Results, default_results_dir, describe_error, log

ATTENTION_OTHERS = ("sdpa_adapter", "sdpa_flash_adapter", "eager", "flex")
WRONG_REL_ERR = 2e-2


def load(path) -> dict:
    data = json.loads(Path(path).read_text())
    if not isinstance(data.get("rows"), list) or "device" not in data:
        raise ValueError(f"{path}: not a benchmark results file (needs 'device' and a 'rows' list)")
    return data


def _ok(rows):
    return [r for r in rows if not r.get("error") and r.get("ms")]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _groups(rows, keys):
    out = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return dict(sorted(out.items(), key=lambda kv: str(kv[0])))


def plot_attention(data: dict, out_dir: Path) -> list[Path]:
    plt = _pyplot()
    pngs = []
    for (dtype, D), rows in _groups(_ok(data["rows"]), ("dtype", "D")).items():
        modes = [m for m in ("fwd", "bwd", "fwd+bwd") if any(r["mode"] == m for r in rows)]
        fig, axes = plt.subplots(1, len(modes) + 1, figsize=(5 * (len(modes) + 1), 4), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            for provider, prow in _groups([r for r in rows if r["mode"] == mode], ("provider",)).items():
                prow.sort(key=lambda r: r["N"])
                ax.plot([r["N"] for r in prow], [r["tflops"] for r in prow], marker="o", label=provider[0])
            ax.set(title=f"{mode}", xlabel="N (B*N fixed)", ylabel="TFLOP/s")
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        mem_mode = "fwd+bwd" if "fwd+bwd" in modes else modes[-1]
        ax = axes[0][-1]
        for provider, prow in _groups([r for r in rows if r["mode"] == mem_mode], ("provider",)).items():
            prow = sorted((r for r in prow if r.get("peak_mem_mb") is not None), key=lambda r: r["N"])
            ax.plot([r["N"] for r in prow], [r["peak_mem_mb"] for r in prow], marker="o", label=provider[0])
        ax.set(title=f"peak memory ({mem_mode})", xlabel="N", ylabel="MiB")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"gated prompt attention, {data['device_name']}, {dtype}, D={D}, Ka={rows[0]['Ka'] or 10}")
        fig.tight_layout()
        png = out_dir / f"attention-{data['device']}-{dtype}-d{D}.png"
        fig.savefig(png, dpi=110)
        plt.close(fig)
        pngs.append(png)
    return pngs


def plot_bars(data: dict, out_dir: Path, metric: str, label: str) -> list[Path]:
    """finetune / generate: one bar per (provider, B)."""
    rows = [r for r in data["rows"] if not r.get("error") and r.get(metric)]
    if not rows:
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [f"{r['provider']}\nB={r['B']}" for r in rows]
    ax.bar(names, [r[metric] for r in rows])
    ax.set(ylabel=label, title=f"{data['bench']}, {data['device_name']}")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    png = out_dir / f"{data['bench']}-{data['device']}.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [png]


def load_result(path) -> dict | None:
    """A benchmark's results file (common.Results), or None for other JSON (tune_attention's log, ...)."""
    try:
        data = load(path)
    except ValueError:
        return None
    return data if isinstance(data.get("bench"), str) else None


def plot_file(path, say=print) -> list[Path]:
    """PNGs for the benches that have a chart; any other file is left alone, saying so."""
    path = Path(path)
    data = load_result(path)
    if data is None:
        say(f"{path.name}: not a benchmark results file; ignored")
        return []
    if data["bench"] == "attention":
        return plot_attention(data, path.parent)
    if data["bench"] == "finetune":
        return plot_bars(data, path.parent, "tokens_per_s", "training tokens/s")
    if data["bench"] == "generate":
        return plot_bars(data, path.parent, "tokens_per_s", "decoded tokens/s")
    say(f"{path.name}: no chart for bench {data['bench']!r}; its rows are in the summary table")
    return []


def maybe_plot(results: Results, args: argparse.Namespace) -> None:
    """A benchmark's PNGs after its last row, unless --no-plot."""
    if args.no_plot:
        return
    try:
        for png in plot_file(results.path):
            log(f"wrote {png}")
    except Exception as exc:  # a missing matplotlib must not lose the measurements
        log(f"plot skipped: {describe_error(exc)}")


def _cell(row, fmt="{:.2f}"):
    if row is None:
        return "–"
    if row.get("error"):
        return "OOM" if row["error"].startswith("OOM") else ("skip" if row["error"].startswith("skipped") else "err")
    return fmt.format(row)


def _ratio(other, fused, key="ms", higher_is_better=False):
    if not other or not fused or other.get("error") or fused.get("error"):
        return _cell(other) if other and other.get("error") else "–"
    a, b = (fused[key], other[key]) if higher_is_better else (other[key], fused[key])
    return f"{a / b:.2f}x"


def summarize_attention(data: dict) -> list[str]:
    lines = []
    index = {(r["provider"], r["mode"], r["dtype"], r["D"], r["N"]): r for r in data["rows"]}
    others = [p for p in ATTENTION_OTHERS if any(r["provider"] == p for r in data["rows"])]
    for (dtype, D), rows in _groups(data["rows"], ("dtype", "D")).items():
        lines += [f"**attention, {data['device']}, {dtype}, D={D}** (speedup = other ms / fused ms)", ""]
        head = ["mode", "N", "fused ms", "TFLOP/s", "% peak", "prompt cost"] + [f"vs {p}" for p in others]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for mode in ("fwd", "bwd", "fwd+bwd"):
            for N in sorted({r["N"] for r in rows if r["mode"] == mode}):
                fused = index.get(("fused", mode, dtype, D, N))
                floor = index.get(("fused_noprompt", mode, dtype, D, N))
                ok = fused and not fused.get("error")
                cost = "–"
                if ok and floor and not floor.get("error"):
                    cost = f"{100 * (fused['ms'] / floor['ms'] - 1):+.1f}%"
                cells = [
                    mode,
                    str(N),
                    f"{fused['ms']:.3f}" if ok else _cell(fused),
                    f"{fused['tflops']:.0f}" if ok else "–",
                    f"{fused['pct_peak']:.0f}" if ok and fused.get("pct_peak") else "–",
                    cost,
                ]
                cells += [_ratio(index.get((p, mode, dtype, D, N)), fused) for p in others]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    # bf16 implementations differ from each other by ~1e-3 relative; far more means a wrong output was timed
    wrong = [r for r in data["rows"] if r.get("rel_err", 0) > WRONG_REL_ERR]
    lines += [
        f"WRONG OUTPUT: {r['provider']} {r['dtype']} D={r['D']} N={r['N']}: rel_err {r['rel_err']:.2e} vs SDPA"
        for r in wrong
    ] + ([""] if wrong else [])
    return lines


def summarize_runs(data: dict, columns: dict, same_batch: bool) -> list[str]:
    """finetune / generate: a row per (provider, B) with `columns` {json key: header} and fused's speedup in
    tokens/s: at the same B (generate), or each at its own largest micro-batch (finetune)."""
    lines = [f"**{data['bench']}, {data['device']}**", ""]
    head = ["provider", "B", *columns.values(), "fused speedup"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fused = {r["B"] if same_batch else None: r for r in data["rows"] if r["provider"] == "fused"}
    for r in data["rows"]:
        cells = [r["provider"], str(r["B"])]
        for key in columns:
            value = r.get(key)
            cells.append(_cell(r) if r.get("error") else ("–" if value is None else f"{value:.4g}"))
        speedup = (
            "–"
            if r["provider"] == "fused"
            else _ratio(r, fused.get(r["B"] if same_batch else None), "tokens_per_s", True)
        )
        lines.append("| " + " | ".join(cells + [speedup]) + " |")
    return lines + [""]


FINETUNE_COLUMNS = {"tokens_per_s": "tokens/s", "ms": "step ms", "mfu_pct": "MFU %", "peak_mem_mb": "peak MiB"}
GENERATE_COLUMNS = {
    "tokens_per_s": "tokens/s",
    "ms_per_token": "ms/token",
    "gb_per_s": "GB/s",
    "pct_bandwidth": "% bandwidth",
}


def summarize_table(data: dict) -> list[str]:
    """Any other bench (bench_packing, bench_hf, ...): its rows as they are, one column per key."""
    columns = list(dict.fromkeys(k for r in data["rows"] for k in r))
    lines = [f"**{data['bench']}, {data['device']}**", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in data["rows"]:
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "–")) for k in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def summary_markdown(paths) -> str:
    lines = []
    for path in paths:
        data = load_result(path)
        if data is None:
            continue
        if data["bench"] == "attention":
            lines += summarize_attention(data)
        elif data["bench"] == "finetune":
            lines += summarize_runs(data, FINETUNE_COLUMNS, same_batch=False)
        elif data["bench"] == "generate":
            lines += summarize_runs(data, GENERATE_COLUMNS, same_batch=True)
        else:
            lines += summarize_table(data)
        lines.append(f"_{data['device_name']}, torch {data['torch']}, triton {data['triton']}, {data['time']}_")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "files",
        nargs="*",
        help="result JSONs (default: every *.json in benchmarks/results on a GPU, runs/bench on a CPU)",
    )
    p.add_argument("--summary-only", action="store_true", help="print the markdown summary, make no PNG")
    args = p.parse_args(argv)
    files = [Path(f) for f in args.files] or sorted(default_results_dir().glob("*.json"))
    if not files:
        raise SystemExit(f"no result files given or found in {default_results_dir()}")
    if not args.summary_only:
        for f in files:
            for png in plot_file(f):
                print(f"wrote {png}", flush=True)
    print(summary_markdown(files), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
