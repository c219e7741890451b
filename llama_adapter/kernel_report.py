"""Compile every Triton kernel for A100 (sm80) and H100 (sm90) without a GPU and report what the chip would run.

Each module in `llama_adapter.kernels` that defines `compile_specs()` lists the (kernel, constexprs, config)
combinations its launchers can pick: dicts with "name", "fn" (the @triton.jit function, not an autotuner),
"signature" (arg name -> "*fp16" / "*bf16" / "*fp32" / "*i32" / "i32" / "fp32" / "constexpr"),
"constexprs" (name -> value), "num_warps", "num_stages", and optionally "arch" (80 or 90: a config tuned
for that chip only; without it the spec is compiled for both), "sm90_mma" ("HGMMA", the default for
kernels with tl.dot, or "HMMA" where wgmma cannot apply, e.g. 16-row tiles: wgmma needs 64 rows per
warpgroup) and "score_tile" (two constexpr names, see `score_tile`).

Each spec is compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`, specialised as
the JIT would for contiguous tensors: the spec's "divisible" argument names (default: pointers and `stride_*`
arguments) divisible by 16; unit strides are constexpr 1 in the specs. From the cubin: registers (cuobjdump
-res-usage), spills (local-memory LDL/STL instructions in the SASS), shared memory (Triton's metadata), and
whether the SASS holds HMMA (mma.sync) or HGMMA (wgmma).

From the SASS, per loop that holds tensor-core instructions (`sass_loops`: innermost loops, head to backward
branch): instructions per iteration, counted per warp, and MUFU.EX2 per iteration, per thread. The main (hot)
loop is the first whose exp2 count reaches one per element of the score tile (BLOCK_M x BLOCK_N by default, or
the spec's "score_tile"), rows * cols / (32 * num_warps) per thread; "ex2_ratio" is its count over that minimum,
and a ratio of DUPLICATED_RATIO or more is "duplicated_work" (two warpgroups computing the same rows).

    python -m llama_adapter.kernel_report [--json] [--jobs N] [--arch sm80 sm90] [--module decode ...]

Under TRITON_INTERPRET=1 the kernels are interpreter objects that cannot be compiled, so the report then
re-runs itself in a child process without that variable.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from llama_adapter.kernels._common import SMEM_BYTES
from llama_adapter.validation import POSITIVE_INT

ARCHS = {"sm80": 80, "sm90": 90}
SHARED_LIMIT = {name: SMEM_BYTES[cc] for name, cc in ARCHS.items()}  # bytes per block (opt-in maximum)
_MMA = re.compile(r"\b(HGMMA|HMMA)\b")
# One SASS instruction as cuobjdump prints it: `/*1a30*/   @!P4 BRA 0x16e0 ;` (address, then the instruction).
_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;", re.MULTILINE)
_BRANCH = re.compile(r"^(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(?:`?\(?)0x([0-9a-f]+)")
# The main loop's exp2 per thread over the one-per-score-element minimum at or above which two warps (warpgroups)
# must be computing the same scores. A lean loop sits just above 1: the online softmax adds one exp2 per row the
# thread holds (2 of 34 at 128x64 with 8 warps; 2 of 6 for a 16x64 decode tile at 8 warps, which is why the bar is
# not lower); computing every score twice gives 2 or a little more.
DUPLICATED_RATIO = 2.0


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def spec_archs(spec: dict, archs=tuple(ARCHS)) -> list[str]:
    """The archs (of `archs`) a spec is compiled for: its own "arch" if it names one, else all."""
    own = spec.get("arch")
    if own is None:
        return list(archs)
    own = own if isinstance(own, str) else f"sm{own}"
    if own not in ARCHS:
        raise ValueError(f"{spec['name']}: arch must be one of {sorted(ARCHS)} (or 80 / 90), got {spec['arch']!r}")
    return [own] if own in archs else []


def kernel_modules() -> list[str]:
    """Names of the modules in llama_adapter.kernels that define compile_specs()."""
    package = importlib.import_module("llama_adapter.kernels")
    names = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        name = f"{package.__name__}.{info.name}"
        if hasattr(importlib.import_module(name), "compile_specs"):
            names.append(name)
    return names


def cuobjdump_path() -> str | None:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.isfile(bundled) else shutil.which("cuobjdump")


def default_divisible(spec: dict) -> tuple[str, ...]:
    """What the JIT marks divisible by 16 for contiguous tensors: every pointer and every i32 `stride_*`."""
    sig = spec["signature"]
    return tuple(a for a, t in sig.items() if t.startswith("*") or (t == "i32" and a.startswith("stride")))


def _ast_source(spec: dict):
    from triton.compiler import ASTSource

    from llama_adapter.kernels._common import divisibility_attrs

    fn, signature = spec["fn"], spec["signature"]
    missing = set(fn.arg_names) ^ set(signature)
    if missing:
        raise ValueError(f"{spec['name']}: signature and {fn.__name__}'s arguments differ in {sorted(missing)}")
    # keys as (index,) tuples: what triton 3.9 converts names to, and what older 3.x takes directly
    constexprs = {(fn.arg_names.index(k),): v for k, v in spec["constexprs"].items()}
    attrs = divisibility_attrs(fn, spec.get("divisible", default_divisible(spec)))
    return ASTSource(fn, signature, constexprs, attrs)


def sass_loops(sass: str) -> list[dict]:
    """The innermost loops of a SASS listing that hold tensor-core instructions, in code order.

    A loop runs from a backward branch's target (its head) to the branch; one holding no other loop is innermost
    (outer loops, e.g. the dK/dV kernel's over the GQA group, would count their inner loops' work once per outer
    iteration). Per iteration, for each warp: "instructions" (every instruction from head to branch, taken
    branches aside: what a warp issues when no forward branch inside skips code), "ex2" (MUFU.EX2, each
    thread's exp2 calls), "mma" (HGMMA/HMMA). `head` and `branch` are the code addresses."""
    code = [(int(addr, 16), text) for addr, text in _SASS_LINE.findall(sass)]
    spans = {}
    for addr, text in code:
        branch = _BRANCH.match(text)
        target = int(branch.group(1), 16) if branch else None
        if target is not None and target < addr:  # backward: a loop (target == addr is the trap after EXIT)
            spans[target] = max(spans.get(target, addr), addr)
    innermost = [
        (head, end)
        for head, end in spans.items()
        if not any(head <= h2 and e2 <= end and (h2, e2) != (head, end) for h2, e2 in spans.items())
    ]
    loops = []
    for head, end in sorted(innermost):
        body = [text for addr, text in code if head <= addr <= end]
        mma = sum(1 for text in body if _MMA.search(text))
        if mma:
            ex2 = sum(1 for text in body if "MUFU.EX2" in text)
            loops.append({"head": head, "branch": end, "instructions": len(body), "ex2": ex2, "mma": mma})
    return loops


def score_tile(spec: dict) -> tuple[str, str] | None:
    """The two constexprs whose product is the score tile of the spec's main loop: its own "score_tile", else
    BLOCK_M by the first of BLOCK_N (key blocks), BLOCK_A (prompt blocks) it has; None if neither."""
    if "score_tile" in spec:
        return tuple(spec["score_tile"])
    consts = spec["constexprs"]
    cols = next((c for c in ("BLOCK_N", "BLOCK_A") if c in consts), None)
    return ("BLOCK_M", cols) if "BLOCK_M" in consts and cols else None


def loop_facts(loops: list[dict], spec: dict) -> dict:
    """The hot-loop figures of one compiled spec, from its `sass_loops`.

    The main loop is the tensor-core loop with the most exp2 per iteration, the first of equals in code order
    (the SASS keeps source order: the unmasked key loop before the masked diagonal one, which exponentiates as
    many scores; the prompt loops' tiles are BLOCK_A = 16 wide, narrower than any key tile). Its count is held
    against the score tile's minimum, rows * cols / (32 * num_warps): one exp2 per score element, every thread
    an equal share. None without tensor-core loops."""
    tile = score_tile(spec)
    facts = {"tc_loops": len(loops), "loops": loops, "score_tile": None, "ex2_minimum": None}
    facts.update(hot_loop=None, hot_loop_instructions=None, hot_loop_ex2=None, ex2_ratio=None, duplicated_work=None)
    if tile is None:
        return facts
    rows, cols = (spec["constexprs"][name] for name in tile)
    minimum = rows * cols / (32 * spec["num_warps"])
    facts.update(score_tile=f"{tile[0]}={rows} x {tile[1]}={cols}", ex2_minimum=minimum)
    if loops:
        hot = max(range(len(loops)), key=lambda i: (loops[i]["ex2"], -i))
        loop = loops[hot]
        ratio = loop["ex2"] / minimum
        facts.update(hot_loop=hot, hot_loop_instructions=loop["instructions"], hot_loop_ex2=loop["ex2"])
        facts.update(ex2_ratio=round(ratio, 3), duplicated_work=ratio >= DUPLICATED_RATIO)
    return facts


def _sass_facts(cubin: bytes, tool: str | None) -> dict:
    if tool is None:
        return {"registers": None, "stack": None, "spill_instructions": None, "mma": None, "sass": None}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-sass", "-res-usage", f.name], check=True, capture_output=True, text=True).stdout
    usage = re.search(r"REG:(\d+)\s+STACK:(\d+)", text)
    return {
        "registers": int(usage.group(1)),
        "stack": int(usage.group(2)),
        "spill_instructions": len(re.findall(r"\b(?:STL|LDL)(?:\.\w+)*\s", text)),
        "mma": sorted(set(_MMA.findall(text))),
        "sass": text,
    }


def compile_one(module: str, index: int, arch: str) -> dict:
    """Compile spec `index` of `module` for `arch` and return one report row (errors are recorded, not raised)."""
    import triton
    from triton.backends.compiler import GPUTarget

    spec = importlib.import_module(module).compile_specs()[index]
    row = {
        "module": module.rsplit(".", 1)[-1],
        "kernel": spec["name"],
        "arch": arch,
        "num_warps": spec["num_warps"],
        "num_stages": spec["num_stages"],
        "sm90_mma": spec.get("sm90_mma", "HGMMA"),
        # the element type of the first pointer (q's, or the kernel's main input) and the constexprs, for selecting
        "dtype": next((t[1:] for t in spec["signature"].values() if t.startswith("*")), None),
        "constexprs": spec["constexprs"],
        "triton": triton.__version__,
        "error": None,
    }
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            _ast_source(spec),
            target=GPUTarget("cuda", ARCHS[arch], 32),
            options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]},
        )
        row["shared"] = compiled.metadata.shared
        row["uses_dot"] = "tt.dot" in compiled.asm["ttir"]
        facts = _sass_facts(compiled.asm["cubin"], cuobjdump_path())
        sass = facts.pop("sass")
        row.update(facts)
        if sass is not None:
            row.update(loop_facts(sass_loops(sass), spec))
    except Exception as exc:  # a compile failure is a finding of the report, not a crash of it
        row["error"] = f"{type(exc).__name__}: {str(exc).strip()[-2000:]}"
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _star(job):
    return compile_one(*job)


def report(archs=tuple(ARCHS), jobs: int = 1, modules=None) -> list[dict]:
    """Compile every spec of every kernel module (or of `modules`, short names) for every arch; a row each."""
    work = [
        (module, i, arch)
        for module in kernel_modules()
        if modules is None or module.rsplit(".", 1)[-1] in modules
        for i, spec in enumerate(importlib.import_module(module).compile_specs())
        for arch in spec_archs(spec, archs)
    ]
    if jobs <= 1:
        return [compile_one(*job) for job in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_star, work))


def format_table(rows: list[dict]) -> str:
    """One line per row: resources, then the hot loop (instructions and exp2 per iteration, exp2 over its minimum;
    "DUP" marks duplicated work) and, after "loops", every tensor-core loop as instructions/exp2."""
    head = (
        f"{'kernel':<44} {'arch':<5} {'warps':>5} {'stages':>6} {'regs':>5} {'spill':>5} {'smem KB':>8} {'s':>5}  "
        f"{'mma':<5} {'instr/it':>8} {'ex2/it':>6} {'ex2/min':>7}  loops (instr/ex2 per iteration)"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["error"]:
            lines.append(f"{r['kernel']:<44} {r['arch']:<5} FAILED: {r['error'].splitlines()[0][:80]}")
            continue
        mma = ",".join(r["mma"]) if r["mma"] is not None else "?"
        hot = r.get("hot_loop_instructions")
        ratio = r.get("ex2_ratio")
        ratio_text = "-" if ratio is None else f"{ratio:.2f}" + (" DUP" if r["duplicated_work"] else "")
        loops = " ".join(f"{loop['instructions']}/{loop['ex2']}" for loop in r.get("loops") or [])
        lines.append(
            f"{r['kernel']:<44} {r['arch']:<5} {r['num_warps']:>5} {r['num_stages']:>6} {r['registers']!s:>5} "
            f"{r['spill_instructions']!s:>5} {r['shared'] / 1024:>8.1f} {r['seconds']:>5.1f}  {mma or '-':<5} "
            f"{'-' if hot is None else hot:>8} {r.get('hot_loop_ex2') or '-':>6} {ratio_text:>7}  {loops}"
        )
    failed = sum(1 for r in rows if r["error"])
    dup = sum(1 for r in rows if r.get("duplicated_work"))
    lines.append(
        f"{len(rows)} compiles, {failed} failed, {dup} with duplicated work, "
        f"{sum(r['seconds'] for r in rows):.0f} s compiling"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_adapter.kernel_report", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--jobs", type=POSITIVE_INT, default=1, help="compile in this many processes")
    parser.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=sorted(ARCHS))
    parser.add_argument("--module", nargs="+", help="only these kernel modules (e.g. decode attention_fwd)")
    args = parser.parse_args(argv)
    if _interpreting():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "llama_adapter.kernel_report", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(cmd, env=env).returncode
    rows = report(tuple(args.arch), args.jobs, args.module)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
