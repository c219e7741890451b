"""Compile every Triton kernel for A100 (sm80) and H100 (sm90) without a GPU and report what the chip would run.

Each module in `llama_adapter.kernels` that defines `compile_specs()` lists the (kernel, constexprs, config)
combinations its launchers can pick: dicts with "name", "fn" (the @triton.jit function, not an autotuner),
"signature" (arg name -> "*fp16" / "*bf16" / "*fp32" / "*i32" / "i32" / "fp32" / "constexpr"),
"constexprs" (name -> value), "num_warps", "num_stages", and optionally "arch" (80 or 90: a config tuned
for that chip only; without it the spec is compiled for both) and "sm90_mma" ("HGMMA", the default for
kernels with tl.dot, or "HMMA" where wgmma cannot apply, e.g. 16-row tiles: wgmma needs 64 rows per
warpgroup).

Each spec is compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`, specialised as
the JIT would for contiguous tensors: the spec's "divisible" argument names (default: pointers and `stride_*`
arguments) divisible by 16; unit strides are constexpr 1 in the specs. From the cubin: registers (cuobjdump
-res-usage), spills (local-memory LDL/STL instructions in the SASS), shared memory (Triton's metadata), and
whether the SASS holds HMMA (mma.sync) or HGMMA (wgmma).

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

from llama_adapter.validation import POSITIVE_INT

ARCHS = {"sm80": 80, "sm90": 90}
SHARED_LIMIT = {"sm80": 164 * 1024, "sm90": 227 * 1024}  # max dynamic shared memory per block: A100, H100
_MMA = re.compile(r"\b(HGMMA|HMMA)\b")


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


def _sass_facts(cubin: bytes, tool: str | None) -> dict:
    if tool is None:
        return {"registers": None, "stack": None, "spill_instructions": None, "mma": None}
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
        row.update(_sass_facts(compiled.asm["cubin"], cuobjdump_path()))
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
    head = (
        f"{'kernel':<44} {'arch':<5} {'warps':>5} {'stages':>6} {'regs':>5} {'spill':>5} {'smem KB':>8} {'s':>5}  mma"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["error"]:
            lines.append(f"{r['kernel']:<44} {r['arch']:<5} FAILED: {r['error'].splitlines()[0][:80]}")
            continue
        mma = ",".join(r["mma"]) if r["mma"] is not None else "?"
        lines.append(
            f"{r['kernel']:<44} {r['arch']:<5} {r['num_warps']:>5} {r['num_stages']:>6} {r['registers']!s:>5} "
            f"{r['spill_instructions']!s:>5} {r['shared'] / 1024:>8.1f} {r['seconds']:>5.1f}  {mma or '-'}"
        )
    failed = sum(1 for r in rows if r["error"])
    lines.append(f"{len(rows)} compiles, {failed} failed, {sum(r['seconds'] for r in rows):.0f} s compiling")
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
