"""benchmarks/tune_attention.py: the CPU dry path runs end to end, and its pure parts choose what they should."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed; the scripts run as `python -m benchmarks.x`
    sys.path.insert(0, str(ROOT))

from benchmarks import tune_attention as tune  # noqa: E402
from llama_adapter.kernels._common import SMEM_BYTES  # noqa: E402
from llama_adapter.kernels.attention_bwd import adapter_attention_bwd  # noqa: E402


def test_dry_run_times_every_kernel_and_writes_json(tmp_path):
    out = tmp_path / "tune.json"
    tune.run(tune.parse_args(["--out", str(out), "--budget", "1e9"]))  # every config, however busy the machine
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["triton"] and data["torch"]
    assert {r["kernel"] for r in data["rows"]} == set(tune.KERNELS)
    assert all(r["error"] is None and r["ms"] > 0 and r["tflops"] > 0 for r in data["rows"]), data["rows"]
    assert len(data["rows"]) == sum(len(c) for c in data["candidates"].values())  # each candidate at N = 32
    for table in tune.TABLE_NAMES.values():
        assert f"{table}[80][16] = [(" in data["recommendation"]


def test_split_backward_launchers_give_the_full_backward():
    """The tuner times bwd_dkdv and bwd_dq alone: with the same inputs they produce what adapter_attention_bwd
    returns (bitwise: same kernels, same config)."""
    p = tune.make_problem(N=24, B=1, H=2, D=16, Ka=3, dtype=torch.float32, device="cpu", seed=3)
    o = tune.adapter_attention_fwd(
        p["q"], p["k"], p["v"], p["adapter_k"], p["adapter_v"], p["gate"], causal=True, sm_scale=p["sm_scale"]
    )[0]
    config = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    dq, dk, dv, dak, dav, _ = adapter_attention_bwd(
        p["do"],
        p["q"],
        p["k"],
        p["v"],
        p["adapter_k"],
        p["adapter_v"],
        p["gate"],
        o,
        p["lse_w"],
        p["lse_a"],
        causal=True,
        sm_scale=p["sm_scale"],
        config=config,
    )
    cfg = (16, 16, 4, 1)
    dk_alone, dv_alone, dak_alone, dav_alone = tune.launcher("dkdv", p, cfg)()  # the prompt's grads come from dK/dV
    dq_alone = tune.launcher("dq", p, cfg)()
    assert torch.equal(dk_alone, dk) and torch.equal(dv_alone, dv) and torch.equal(dq_alone, dq)
    assert torch.equal(dak_alone, dak) and torch.equal(dav_alone, dav)
    assert dq.abs().sum() > 0 and dk.abs().sum() > 0


def test_candidates_start_with_the_table_and_fit_shared_memory():
    table, h100 = tune.TABLES["fwd"][90][128], SMEM_BYTES[90]
    fwd = tune.candidates("fwd", 128, 90, h100)
    assert fwd[: len(table)] == [c for c in table if tune.fwd_smem_bytes(c[0], c[1], 128, c[3]) <= h100]
    assert len(fwd) == len(set(fwd)) > len(table)
    small = tune.candidates("dkdv", 128, 90, 48 * 1024)
    assert small and all(tune.dkdv_smem_bytes(m, n, 128, s) <= 48 * 1024 for m, n, _, s in small)
    assert len(small) < len(tune.candidates("dkdv", 128, 90, h100))


def test_best_configs_rank_by_geometric_mean_over_every_length():
    def row(cfg, N, tflops):
        return dict(kernel="fwd", N=N, config=list(cfg), tflops=tflops)

    rows = [
        row((128, 64, 8, 3), 1024, 100.0),
        row((128, 64, 8, 3), 4096, 400.0),  # geo-mean 200
        row((64, 64, 4, 3), 1024, 150.0),
        row((64, 64, 4, 3), 4096, 250.0),  # geo-mean ~194
        row((128, 128, 8, 3), 1024, 900.0),  # failed at 4096 (no row): not recommended
        row((64, 32, 4, 2), 1024, None),
        row((64, 32, 4, 2), 4096, 300.0),
    ]
    best = tune.best_configs(rows, "fwd")
    assert [cfg for cfg, _ in best] == [(128, 64, 8, 3), (64, 64, 4, 3)]
    assert best[0][1] == pytest.approx(200.0)
    snippet = tune.recommendation(rows, 90, 128, "H100")
    assert "FWD_CONFIGS[90][128] = [(128, 64, 8, 3), (64, 64, 4, 3)]" in snippet
