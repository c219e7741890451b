"""Every Triton kernel compiles for A100 (sm80) and H100 (sm90) at each config it may run, with no GPU.

The interpreter checks numerics only; this catches what it cannot: compile errors, register spills, shared
memory over the chip's limit, and tensor-core paths lost (no HMMA on sm80, no HGMMA where sm90 should use
wgmma). `llama_adapter.kernel_report` compiles every `compile_specs()` entry of every module in kernels/, in
a child process without TRITON_INTERPRET (interpreted kernels cannot be compiled), once per session.
"""

import importlib
import json
import os
import subprocess
import sys

import pytest

from llama_adapter import kernel_report

ARCHS = sorted(kernel_report.ARCHS)


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "llama_adapter.kernel_report", "--json", "--jobs", str(os.cpu_count() or 1)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.stdout.strip(), f"kernel_report printed nothing; stderr:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def _where(row):
    return f"{row['module']}:{row['kernel']} on {row['arch']} (warps={row['num_warps']}, stages={row['num_stages']})"


def test_every_spec_of_every_kernel_module_is_compiled(rows):
    modules = kernel_report.kernel_modules()
    assert "llama_adapter.kernels.decode" in modules
    expected = {
        (name.rsplit(".", 1)[-1], spec["name"], arch)
        for name in modules
        for spec in importlib.import_module(name).compile_specs()
        for arch in kernel_report.spec_archs(spec)
    }
    assert {(r["module"], r["kernel"], r["arch"]) for r in rows} == expected
    assert len(rows) == len(expected), "two specs of one module share a name"


@pytest.mark.parametrize("arch", ARCHS)
def test_compiles_without_spills(rows, arch):
    mine = [r for r in rows if r["arch"] == arch]
    failed = [f"{_where(r)}: {r['error']}" for r in mine if r["error"]]
    assert not failed, "\n".join(failed)
    if kernel_report.cuobjdump_path() is None:
        pytest.skip("no cuobjdump (neither bundled with triton nor on PATH): registers and spills unknown")
    spilled = [f"{_where(r)}: {r['spill_instructions']} LDL/STL" for r in mine if r["spill_instructions"]]
    assert not spilled, "register spills:\n" + "\n".join(spilled)
    assert all(0 < r["registers"] <= 255 for r in mine)


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_memory_fits_the_chip(rows, arch):
    limit = kernel_report.SHARED_LIMIT[arch]
    over = [f"{_where(r)}: {r['shared']} B > {limit} B" for r in rows if r["arch"] == arch and r["shared"] > limit]
    assert not over, "\n".join(over)


@pytest.mark.parametrize("arch", ARCHS)
def test_dots_run_on_tensor_cores(rows, arch):
    if kernel_report.cuobjdump_path() is None:
        pytest.skip("no cuobjdump (neither bundled with triton nor on PATH): SASS unavailable")
    dot_rows = [r for r in rows if r["arch"] == arch and r["uses_dot"]]
    assert dot_rows, "no kernel uses tl.dot?"
    wrong = []
    for r in dot_rows:
        want = "HMMA" if arch == "sm80" else r["sm90_mma"]
        if want not in r["mma"]:
            wrong.append(f"{_where(r)}: SASS has {r['mma'] or 'no MMA'}, expected {want}")
    assert not wrong, "\n".join(wrong)


def test_spec_arch_selects_the_chips_compiled_for():
    spec = {"name": "k"}
    assert kernel_report.spec_archs(spec) == ARCHS
    assert kernel_report.spec_archs(dict(spec, arch=90)) == ["sm90"]
    assert kernel_report.spec_archs(dict(spec, arch="sm80"), archs=("sm90",)) == []
    with pytest.raises(ValueError, match="arch must be one of"):
        kernel_report.spec_archs(dict(spec, arch=75))
