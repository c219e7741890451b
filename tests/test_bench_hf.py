"""benchmarks/bench_hf.py runs end to end at its tiny CPU size and writes rows whose ours-vs-PEFT columns are checked.

No speed is asserted; the parity columns are: fp32 logits and adapter gradients of the fused providers and PEFT
agree (full and padded batches), and their greedy generate() tokens equal PEFT's.
"""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed; the scripts run as `python -m benchmarks.x`
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_hf, common  # noqa: E402
from llama_adapter.attention import get_attention_backend  # noqa: E402

ROW_KEYS = {
    "provider",
    "mode",
    "dtype",
    "B",
    "N",
    "layers",
    "Ka",
    "adapter_layers",
    "backend",
    "ms",
    "tokens",
    "tokens_per_s",
    "peak_mem_mb",
    "speedup_vs_peft",
    "error",
}
ROUNDING = 3 * common.RELATIVE_ROUNDING  # stored to fixed significant digits: see test_benchmarks.py
TINY = [
    "--layers",
    "1",
    "--batch",
    "2",
    "--seq",
    "8",
    "--new-tokens",
    "2",
    "--warmup-ms",
    "0",
    "--rep-ms",
    "0",
    "--dtype",
    "fp32",
]


def test_alpaca_lengths_mix_long_and_short_rows():
    lengths = bench_hf.alpaca_lengths(8, 100)
    assert len(lengths) == 8 and lengths[0] == 100 and min(lengths) >= 10 and sum(lengths) < 8 * 100
    mask = bench_hf.padding_mask([3, 1], 4, "left")
    assert mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert bench_hf.padding_mask([3, 1], 4, "right").tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_tiny_run_writes_every_row_and_ours_matches_peft(tmp_path):
    backend_before = get_attention_backend()
    bench_hf.run(bench_hf.parse_args(["--out", str(tmp_path), "--size", "tiny", *TINY]))
    assert get_attention_backend() == backend_before  # the run restores what it changed

    data = json.loads((tmp_path / "bench_hf-cpu.json").read_text())
    assert data["bench"] == "bench_hf" and data["device"] == "cpu" and data["args"]["layers"] == 1
    rows = {(r["provider"], r["mode"]): r for r in data["rows"]}
    assert set(rows) == {(p, m) for p in bench_hf.PROVIDERS for m in bench_hf.MODES}
    real_tokens = sum(bench_hf.alpaca_lengths(2, 8))
    assert real_tokens < 2 * 8  # the padded batch really has pads
    expected_tokens = {"train": 2 * 8, "prefill": 2 * 8, "train_padded": real_tokens, "generate": 2 * 2}
    for (provider, mode), row in rows.items():
        assert ROW_KEYS <= set(row), (provider, mode)
        assert row["error"] is None, (provider, mode, row["error"])
        assert (row["B"], row["N"], row["layers"], row["adapter_layers"]) == (2, 8, 1, 1)
        assert row["tokens"] == expected_tokens[mode]
        assert row["ms"] > 0 and row["tokens_per_s"] == pytest.approx(row["tokens"] / row["ms"] * 1e3, rel=ROUNDING)
        assert row["peak_mem_mb"] is None  # the CPU has no allocator statistics
        if mode == "generate":  # greedy tokens of the fused providers equal PEFT's
            assert row["tokens_equal"] == 1.0
            continue
        assert row["adapter_effect"] > 1e-3  # the gates are nonzero: the diff below compares live prompts
        assert row["logits_max_abs_diff"] < 1e-4
        if provider == "peft":
            assert row["logits_max_abs_diff"] == 0
        if mode.startswith("train"):
            assert 0 <= row["grad_max_abs_diff"] < 1e-5
    # CPU default "auto" runs the fused kernel under TRITON_INTERPRET=1 (set by conftest before any import)
    for mode in bench_hf.MODES:
        assert rows["ours", mode]["backend"] == rows["peft_fused", mode]["backend"] == "triton"
        assert rows["peft", mode]["backend"].startswith("peft+")
        assert rows["peft", mode]["speedup_vs_peft"] == 1.0
    peft_ms, ours_ms = rows["peft", "prefill"]["ms"], rows["ours", "prefill"]["ms"]
    assert rows["ours", "prefill"]["speedup_vs_peft"] == pytest.approx(peft_ms / ours_ms, rel=ROUNDING)


def test_set_up_failure_becomes_rows(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no weights")

    monkeypatch.setattr(bench_hf, "build_base", broken)
    bench_hf.run(bench_hf.parse_args(["--out", str(tmp_path), "--size", "tiny", "--modes", "prefill", *TINY]))
    rows = json.loads((tmp_path / "bench_hf-cpu.json").read_text())["rows"]
    assert [(r["provider"], r["mode"]) for r in rows] == [(p, "prefill") for p in bench_hf.PROVIDERS]
    assert all(r["error"] == "set-up failed: RuntimeError: no weights" and r["ms"] is None for r in rows)


def test_unknown_mode_is_refused():
    with pytest.raises(SystemExit):
        bench_hf.parse_args(["--modes", "train,decode"])
