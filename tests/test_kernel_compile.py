"""Every Triton kernel compiles for A100 (sm80) and H100 (sm90) at each config it may run, with no GPU.

The interpreter checks numerics only; this catches what it cannot: compile errors, register spills, shared
memory over the chip's limit, tensor-core paths lost (no HMMA on sm80, no HGMMA where sm90 should use
wgmma), duplicated work (a main loop computing each score twice, from its MUFU.EX2 count) and a forward hot
loop over its instruction budget. `llama_adapter.kernel_report` compiles every `compile_specs()` entry of every
module in kernels/, in a child process without TRITON_INTERPRET (interpreted kernels cannot be compiled), once per
session; KERNEL_REPORT_JSON=path checks a saved `kernel_report --json` of this tree instead (a stale one fails
the first test, which compares the rows with the specs).
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
    saved = os.environ.get("KERNEL_REPORT_JSON")
    if saved:  # `python -m llama_adapter.kernel_report --json` output of this tree, to check it without recompiling
        with open(saved) as f:
            return json.load(f)
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


# Triton's fused-attention tutorial at the same tiles (sm90, bf16, D = 128, causal; triton 3.9), counted the same
# way: the forward's hot loop must match or beat it. (BLOCK_M, BLOCK_N, num_warps) -> instructions per iteration.
# Counts depend on the compiler: the budgets hold for triton 3.9's (3.6 gave 377 and 594 where 3.9 gave 403 and
# 620 for the same kernel), so other versions only report them.
FORWARD_BUDGETS = {(128, 64, 8): 359, (128, 128, 8): 519}
BUDGET_TRITON = "3.9"


def _needs_sass():
    if kernel_report.cuobjdump_path() is None:
        pytest.skip("no cuobjdump (neither bundled with triton nor on PATH): SASS unavailable")


def test_forward_hot_loop_within_the_tutorials_instruction_budget(rows):
    _needs_sass()
    compiled_with = {r.get("triton", "?").rsplit(".", 1)[0] for r in rows}
    if compiled_with != {BUDGET_TRITON}:
        pytest.skip(f"budgets are triton {BUDGET_TRITON} instruction counts; compiled with triton {compiled_with}")
    checked, over = [], []
    for r in rows:
        c = r["constexprs"]
        tile = (c.get("BLOCK_M"), c.get("BLOCK_N"), r["num_warps"])
        if r["module"] != "attention_fwd" or r["arch"] != "sm90" or r["dtype"] != "bf16" or r["error"]:
            continue
        if c.get("HEAD_DIM") != 128 or tile not in FORWARD_BUDGETS:
            continue
        checked.append(r)
        budget = FORWARD_BUDGETS[tile]
        if r["hot_loop_instructions"] is None or r["hot_loop_instructions"] > budget:
            over.append(f"{_where(r)}: hot loop {r['hot_loop_instructions']} instructions/iteration > {budget}")
    assert checked, f"no sm90 bf16 D=128 forward config at any of the budgeted tiles {sorted(FORWARD_BUDGETS)}"
    assert not over, "\n".join(over)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_duplicated_work(rows, arch):
    """One exp2 per score element per main-loop iteration: twice that means two warpgroups compute the same rows
    (a 64-row tile at 8 warps on sm90 gets warpsPerCTA [8, 1]), which the spill and register checks cannot see."""
    _needs_sass()
    dup = []
    for r in rows:
        if r["arch"] != arch or r["error"] or not r["tc_loops"] or r["score_tile"] is None:
            continue
        if r["duplicated_work"]:
            dup.append(
                f"{_where(r)}: {r['hot_loop_ex2']} MUFU.EX2/thread/iteration for {r['score_tile']} "
                f"(minimum {r['ex2_minimum']:g}, x{r['ex2_ratio']})"
            )
    assert not dup, "duplicated work:\n" + "\n".join(dup)


def test_the_attention_kernels_main_loops_are_found(rows):
    """The duplicated-work check must see each attention kernel's main loop, or it could pass by finding none."""
    _needs_sass()
    for prefix in ("fwd_", "bwd_dkdv_", "bwd_dq_", "decode_split"):
        mine = [r for r in rows if r["kernel"].startswith(prefix) and not r["error"]]
        assert mine, f"no {prefix}* specs"
        assert all(r["hot_loop"] is not None for r in mine), [_where(r) for r in mine if r["hot_loop"] is None]


# Two loops as cuobjdump prints them: an outer one (0x0040 .. 0x00c0) around an inner one (0x0060 .. 0x0090) that
# holds the tensor-core and exp2 instructions, then the trap loop after EXIT (a branch to itself: not a loop).
_SASS = """
        /*0040*/                   IMAD.MOV.U32 R2, RZ, RZ, RZ ;
        /*0050*/                   MOV R3, 0x1 ;
        /*0060*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0070*/                   MUFU.EX2 R5, R4 ;
        /*0080*/                   MUFU.EX2 R6, R7 ;
        /*0090*/              @!P4 BRA 0x60 ;
        /*00a0*/                   HMMA.16816.F32.BF16 R8, R12, R14, R8 ;
        /*00b0*/                   IADD3 R2, R2, 0x1, RZ ;
        /*00c0*/               @P0 BRA 0x40 ;
        /*00d0*/                   EXIT ;
        /*00e0*/                   BRA 0xe0;
"""


def test_sass_loops_counts_innermost_tensor_core_loops_per_iteration():
    loops = kernel_report.sass_loops(_SASS)
    assert loops == [{"head": 0x60, "branch": 0x90, "instructions": 4, "ex2": 2, "mma": 1}]


def test_loop_facts_flags_a_main_loop_with_twice_the_exp2():
    loops = [
        {"head": 0, "branch": 16, "instructions": 40, "ex2": 8, "mma": 2},  # a prompt loop: narrower tile
        {"head": 32, "branch": 64, "instructions": 400, "ex2": 68, "mma": 12},
    ]
    spec = {"constexprs": {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_A": 16}, "num_warps": 8}
    facts = kernel_report.loop_facts(loops, spec)
    assert (facts["hot_loop"], facts["hot_loop_instructions"], facts["ex2_minimum"]) == (1, 400, 32.0)
    assert facts["duplicated_work"] and facts["ex2_ratio"] == 68 / 32
    # the masked diagonal loop after the unmasked one: as many exp2, more instructions; the first is the hot one
    lean = kernel_report.loop_facts([dict(loops[1], ex2=34), dict(loops[1], head=96, instructions=530, ex2=34)], spec)
    assert (lean["duplicated_work"], lean["hot_loop_instructions"], lean["tc_loops"]) == (False, 400, 2)
    # a small tile's per-row rescaling exp2 weigh more (16 x 64 at 8 warps: 4 per element + 2 per row) but are not
    # duplicated work; the backward (no rescaling) doubled is exactly 2
    small = dict(constexprs={"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=8)
    assert kernel_report.loop_facts([dict(loops[1], ex2=6)], small)["duplicated_work"] is False
    assert kernel_report.loop_facts([dict(loops[1], ex2=8)], small)["duplicated_work"] is True
    # a spec's own score_tile wins over the BLOCK_M x BLOCK_N default
    own = kernel_report.loop_facts(loops, dict(spec, score_tile=("BLOCK_M", "BLOCK_A")))
    assert (own["ex2_minimum"], own["ex2_ratio"]) == (8.0, 68 / 8)
    assert kernel_report.loop_facts([], spec)["hot_loop"] is None
