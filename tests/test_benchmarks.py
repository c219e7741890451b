"""The benchmark scripts run end to end at tiny sizes on the CPU (fused under the interpreter) and write valid JSON.

No speed is asserted: this keeps the scripts from rotting between GPU runs. Providers that need CUDA must
leave a row saying why; failures and OOMs must become rows, not crashes.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed; the scripts run as `python -m benchmarks.x`
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_attention, bench_finetune, bench_generate, common, plot  # noqa: E402
from llama_adapter.attention import get_attention_backend  # noqa: E402

ATTENTION_KEYS = {
    "provider",
    "mode",
    "dtype",
    "B",
    "H",
    "N",
    "D",
    "Ka",
    "causal",
    "ms",
    "tflops",
    "peak_mem_mb",
    "backend",
    "error",
}
# Rows store timings and rates to a fixed number of significant digits, so a rate recomputed from a stored time
# agrees with the stored rate to within two roundings, on any machine at any load.
ROUNDING = 3 * common.RELATIVE_ROUNDING
TINY_ATTENTION = [
    "--dtypes",
    "fp32",
    "--head-dims",
    "16",
    "--tokens",
    "32",
    "--hidden",
    "32",
    "--rep-ms",
    "1",
    "--provider-budget",
    "flex=1e9,eager=1e9",
]  # no row may depend on how busy the machine is


def read(path) -> dict:
    data = json.loads(Path(path).read_text())
    assert {"device", "torch", "triton", "rows"} <= set(data)
    assert data["device"] == "cpu" and data["torch"] == torch.__version__
    return data


def test_attention_all_providers_and_modes(tmp_path):
    args = bench_attention.parse_args(["--out", str(tmp_path), "--seqlens", "32", "--no-plot", *TINY_ATTENTION])
    results = bench_attention.run(args)
    data = read(tmp_path / "attention-cpu.json")
    assert results.path == tmp_path / "attention-cpu.json"
    rows = {(r["provider"], r["mode"]): r for r in data["rows"]}
    assert set(rows) == {(p, m) for p in bench_attention.PROVIDERS for m in bench_attention.MODES}
    for (provider, mode), row in rows.items():
        assert ATTENTION_KEYS <= set(row), provider
        assert (row["B"], row["H"], row["N"], row["D"], row["causal"]) == (1, 2, 32, 16, True)
        if provider in ("sdpa_flash_adapter", "flex"):  # CUDA only: the row says why it is empty
            assert row["error"].startswith("skipped:") and row["ms"] is None
        else:
            assert row["error"] is None, (provider, mode, row["error"])
            assert row["ms"] > 0 and row["tflops"] >= 0 and row["input_sets"] == 1
            if mode == "fwd" and provider != "sdpa_adapter":  # checked against SDPA + prompt, fp32
                assert row["rel_err"] < 1e-5, (provider, row["rel_err"])
    assert rows["fused", "fwd"]["backend"] == "triton" and rows["sdpa_adapter", "fwd"]["backend"].startswith("sdpa:")
    assert rows["fused_noprompt", "fwd"]["Ka"] == 0 and rows["fused", "fwd"]["Ka"] == 10


def test_attention_failures_become_rows(tmp_path, monkeypatch):
    """A provider that raises gets its message in the row; after an OOM the larger sizes are skipped."""
    real = bench_attention.make_provider

    def fake(name, **kw):
        if name == "eager":
            return (lambda *a: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("CUDA out of memory"))), "eager"
        if name == "fused":
            return (lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))), "triton"
        return real(name, **kw)

    monkeypatch.setattr(bench_attention, "make_provider", fake)
    args = bench_attention.parse_args(
        [
            "--out",
            str(tmp_path),
            "--seqlens",
            "16,32",
            "--modes",
            "fwd",
            "--no-plot",
            "--providers",
            "fused,eager,sdpa_adapter",
            *TINY_ATTENTION,
        ]
    )
    bench_attention.run(args)
    rows = {(r["provider"], r["N"]): r for r in read(tmp_path / "attention-cpu.json")["rows"]}
    assert rows["fused", 16]["error"] == rows["fused", 32]["error"] == "RuntimeError: boom"
    assert rows["eager", 16]["error"].startswith("OOM:")
    assert rows["eager", 32]["error"] == "skipped: OOM at N=16"
    assert rows["sdpa_adapter", 32]["error"] is None and rows["sdpa_adapter", 32]["ms"] > 0


def test_attention_budget_skips_rows(tmp_path):
    args = bench_attention.parse_args(
        [
            "--out",
            str(tmp_path),
            "--seqlens",
            "32",
            "--budget",
            "1e-9",
            "--no-plot",
            "--providers",
            "sdpa_adapter",
            *TINY_ATTENTION,
        ]
    )
    rows = bench_attention.run(args).rows
    assert len(rows) == 3 and all(r["error"] == "skipped: time budget" for r in rows)


def test_finetune_smoke_and_plot(tmp_path):
    args = bench_finetune.parse_args(
        ["--out", str(tmp_path), "--seq", "8", "--batches", "2", "--steps", "1", "--warmup", "0"]
    )
    bench_finetune.run(args)
    assert get_attention_backend() == "reference"  # conftest's choice is given back
    data = read(tmp_path / "finetune-cpu.json")
    assert [r["provider"] for r in data["rows"]] == ["fused", "sdpa_adapter", "eager"]
    for row in data["rows"]:
        assert row["error"] is None, row
        assert row["B"] == 2 and row["N"] == 8 and row["tokens_per_s"] > 0 and row["trainable"] > 0
        assert row["tokens_per_s"] == pytest.approx(16 / row["ms"] * 1e3, rel=ROUNDING)
    assert (tmp_path / "finetune-cpu.png").stat().st_size > 0


def test_finetune_takes_largest_batch_that_fits(tmp_path, monkeypatch):
    real = bench_finetune.train_step

    def small_memory(model, optimizer, tokens):
        if tokens.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, optimizer, tokens)

    monkeypatch.setattr(bench_finetune, "train_step", small_memory)
    args = bench_finetune.parse_args(
        [
            "--out",
            str(tmp_path),
            "--seq",
            "4",
            "--batches",
            "8,4,2,1",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--backends",
            "sdpa",
            "--no-plot",
        ]
    )
    (row,) = bench_finetune.run(args).rows
    assert row["error"] is None and row["B"] == 2
    assert [t["B"] for t in row["tried"]] == [8, 4, 2]
    assert row["tried"][0]["error"].startswith("OOM:") and row["tried"][2]["error"] is None


def test_finetune_flops_formula():
    model = common.build_model("tiny", layers=3, seq=16, device="cpu", dtype=torch.float32, adapter_layers=2)
    p = model.params
    kv = p.n_kv_heads * p.head_dim
    layer = 2 * p.dim * p.dim + 2 * p.dim * kv + 3 * p.dim * p.hidden_dim
    head = p.vocab_size * p.dim
    B, N, Ka, H, D = 2, 16, model.adapter_config.adapter_len, p.n_heads, p.head_dim
    words = 4 * B * H * N * N * D * 0.5
    prompt = 4 * B * H * N * Ka * D
    forward = 2 * (3 * layer + head) * B * N + 3 * words + 2 * prompt
    backward = 2 * (2 * layer + head) * B * N + 2 * 2.5 * (words + prompt)
    assert bench_finetune.step_flops(model, B, N) == pytest.approx(forward + backward, rel=1e-12)


def test_generate_smoke(tmp_path):
    args = bench_generate.parse_args(
        ["--out", str(tmp_path), "--prompt", "5", "--new-tokens", "3", "--batches", "2", "--no-plot"]
    )
    bench_generate.run(args)
    rows = read(tmp_path / "generate-cpu.json")["rows"]
    assert [(r["provider"], r["B"]) for r in rows] == [("fused", 2), ("sdpa_adapter", 2)]
    for row in rows:
        assert row["error"] is None, row
        assert row["ms_per_token"] > 0 and row["prefill_ms"] > 0 and row["gb_per_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(row["B"] / row["ms_per_token"] * 1e3, rel=ROUNDING)


def test_quantized_bases_smoke(tmp_path):
    """--quantize adds rows per base (provider suffixed); the packed weights are what GB/s counts."""
    pytest.importorskip("torchao")
    args = bench_finetune.parse_args(
        [
            "--out",
            str(tmp_path),
            "--seq",
            "8",
            "--batches",
            "2",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--backends",
            "sdpa",
            "--quantize",
            "none,nf4,int8",
            "--no-plot",
        ]
    )
    rows = {r["provider"]: r for r in bench_finetune.run(args).rows}
    assert list(rows) == ["sdpa_adapter", "sdpa_adapter+nf4", "sdpa_adapter+int8"]
    for row in rows.values():
        assert row["error"] is None and row["tokens_per_s"] > 0, row
    assert (
        rows["sdpa_adapter+nf4"]["weight_mb"]
        < rows["sdpa_adapter+int8"]["weight_mb"]
        < rows["sdpa_adapter"]["weight_mb"]
    )
    args = bench_generate.parse_args(
        [
            "--out",
            str(tmp_path),
            "--prompt",
            "5",
            "--new-tokens",
            "3",
            "--batches",
            "1",
            "--backends",
            "sdpa",
            "--quantize",
            "none,nf4",
            "--no-plot",
        ]
    )
    full, nf4 = bench_generate.run(args).rows
    assert nf4["provider"] == "sdpa_adapter+nf4" and nf4["error"] is None and nf4["gb_per_s"] > 0
    assert nf4["weight_mb"] < full["weight_mb"]


def test_generate_decode_bytes():
    model = common.build_model("tiny", layers=2, seq=16, device="cpu", dtype=torch.float32)
    p = model.params
    weights = 4 * (sum(w.numel() for w in model.parameters()) - p.vocab_size * p.dim)
    cache = 4 * 2 * p.n_layers * 3 * p.n_kv_heads * p.head_dim * 10
    assert bench_generate.decode_bytes(model, 3, 10) == weights + cache


def test_summary_and_plots_from_json(tmp_path):
    rows = []
    for provider, ms in (("fused", 1.0), ("fused_noprompt", 0.8), ("sdpa_adapter", 2.0), ("eager", None)):
        error = "OOM: CUDA out of memory" if ms is None else None
        rows.append(
            dict(
                provider=provider,
                mode="fwd",
                dtype="bf16",
                B=2,
                H=32,
                N=1024,
                D=128,
                Ka=0 if provider == "fused_noprompt" else 10,
                causal=True,
                ms=ms,
                tflops=ms and 2.0 / ms,
                peak_mem_mb=100.0,
                backend="x",
                error=error,
                rel_err=0.5 if provider == "fused" else 1e-3,
            )
        )
    header = dict(bench="attention", device="h100", device_name="NVIDIA H100", torch="t", triton="t", time="now")
    path = tmp_path / "attention-h100.json"
    path.write_text(json.dumps({**header, "rows": rows}))
    text = plot.summary_markdown([path])
    assert "| fwd | 1024 | 1.000 | 2 | – | +25.0% | 2.00x | OOM |" in text
    assert "WRONG OUTPUT: fused bf16 D=128 N=1024" in text and "WRONG OUTPUT: fused_noprompt" not in text
    assert [p.name for p in plot.plot_file(path)] == ["attention-h100-bf16-d128.png"]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        plot.load(bad)


def test_common_device_facts_and_errors():
    assert common.device_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert common.device_slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert common.device_slug("NVIDIA GeForce RTX 4090") == "nvidia-geforce-rtx-4090"
    assert common.attention_flops(2, 4, 8, 8, 16, causal=True, mode="fwd+bwd") == 4 * 2 * 4 * 64 * 16 * 0.5 * 3.5
    assert common.describe_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried")).startswith("OOM: ")
    assert common.is_fatal("AcceleratorError: CUDA error: an illegal memory access was encountered")
    assert common.describe_error(ValueError("bad\nmore")) == "ValueError: bad"


def test_gpu_suite_script_parses():
    script = ROOT / "benchmarks" / "gpu_suite.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "set -uo pipefail" in text and "pytest -m gpu" in text


def test_cpu_defaults_are_tiny_and_write_outside_the_committed_results():
    """Without CUDA every script's default is the tiny fp32 smoke, written under runs/bench (git-ignored), never
    beside the committed GPU results; --quick does not switch bench_attention to the GPU sweep there."""
    from benchmarks import bench_packing

    assert common.default_results_dir() == ROOT / "runs" / "bench"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(ROOT / "runs" / "bench" / "x.json")], cwd=ROOT)
    assert ignored.returncode == 0
    args = bench_attention.parse_args(["--quick"])
    bench_attention.fill_defaults(args)
    assert (args.dtypes, args.head_dims, args.seqlens, args.tokens) == ("fp32", "16", "16,32", 32)
    packing = bench_packing.parse_args([])
    assert (packing.size, packing.dtype, packing.max_len) == ("tiny", "fp32", 32)


def test_packing_default_cpu_run_times_both_modes(tmp_path):
    from benchmarks import bench_packing

    results = bench_packing.run(bench_packing.parse_args(["--out", str(tmp_path), "--rep-ms", "1"]))
    rows = {r["mode"]: r for r in read(results.path)["rows"]}
    assert set(rows) == {"padded", "packed"}
    for row in rows.values():
        assert "error" not in row and row["step_ms"] > 0 and row["size"] == "tiny"
    assert rows["packed"]["pad_share"] == 0 and rows["padded"]["pad_share"] > 0


def test_plot_reads_every_bench_and_ignores_the_rest(tmp_path, capsys):
    header = dict(device="cpu", device_name="cpu", torch="t", triton="t", time="now")
    packing = tmp_path / "bench_packing-cpu.json"
    packing.write_text(json.dumps({**header, "bench": "bench_packing", "rows": [{"mode": "packed", "step_ms": 1.5}]}))
    hf = tmp_path / "bench_hf-cpu.json"
    hf.write_text(json.dumps({**header, "bench": "bench_hf", "rows": [{"impl": "peft", "ms": 2.0, "error": None}]}))
    tune = tmp_path / "tune_attention-cpu.json"
    tune.write_text(json.dumps({"device": "cpu", "candidates": {}}))
    assert plot.main([str(packing), str(hf), str(tune)]) == 0
    out = capsys.readouterr().out
    assert "bench_packing-cpu.json: no chart for bench 'bench_packing'" in out
    assert "tune_attention-cpu.json: not a benchmark results file; ignored" in out
    assert "| mode | step_ms |" in out and "| packed | 1.5 |" in out and "| peft | 2 | None |" in out
