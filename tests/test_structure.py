"""The code's shape (docs/design.md §8): no import cycle, small modules and functions, no formatter opt-outs.

Imports are read from the source (ast), lazy ones inside functions included: a cycle hidden in a function body
is still a cycle for a reader. Kernels are exempt from the size limits (a kernel's body is one unit).
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("llama_adapter", "benchmarks", "kernels")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _ours(name: str) -> str | None:
    """Our module a dotted name refers to; kernels/ is installed as llama_adapter.kernels (setup.py)."""
    if name == "llama_adapter.kernels" or name.startswith("llama_adapter.kernels."):
        name = name[len("llama_adapter.") :]
    return name if name in MODULES else None


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """Our modules that one import statement names (a `from pkg import name` may name a submodule)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = module.split(".")
        if MODULES[module].name != "__init__.py":
            base = base[:-1]  # relative to the module's package
        if node.level:
            base = base[: len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
    return {_ours(name) for name in names} - {None, module}


def _named(module: str, tree: ast.Module) -> set[str]:
    """Our modules named by a string constant: what `importlib.import_module(name)` tables load on first use
    (the op's backends). A package's own lazy table is its public face, above everything, so it is skipped."""
    if MODULES[module].name == "__init__.py":
        return set()
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return {_ours(s) for s in strings} - {None, module}


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        statements = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        graph[module] = set().union(_named(module, tree), *(_imported(module, n) for n in statements))
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_graph_sees_known_edges():
    """Guards against a resolver that finds nothing (and so no cycle): edges we know exist must be seen."""
    graph = import_graph()
    assert "llama_adapter.attention" in graph["llama_adapter.model"]
    assert "kernels._common" in graph["kernels.attention_fwd"]
    assert "kernels.attention_fwd" in graph["llama_adapter.ops"]  # installed as llama_adapter.kernels
    assert "llama_adapter.ops" in graph["llama_adapter.attention"]  # a backend loaded by name on first use
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert import_cycles(import_graph()) == []


def test_model_is_a_leaf():
    """The network imports only the op, the adapter and the leaves it is made of; everything else is built on it."""
    leaves = {"llama_adapter.adapter", "llama_adapter.layout", "llama_adapter.model_args"}
    graph = import_graph()
    assert graph["llama_adapter.model"] <= {"llama_adapter.attention"} | leaves
    below = {"llama_adapter.attention", "llama_adapter.files", "llama_adapter.validation"}
    for leaf in leaves:
        assert graph[leaf] <= below, f"{leaf} imports {sorted(graph[leaf] - below)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith("kernels")))
def test_module_and_function_sizes(module):
    source = MODULES[module].read_text(encoding="utf-8")
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{module} has more than {MAX_MODULE_LINES} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{module}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_formatter_opt_outs():
    """`ruff format` owns the layout (make lint checks it); hand-kept layouts drift."""
    markers = ("fmt: " + "skip", "fmt: " + "off")  # spelled apart so this file does not match itself
    paths = [*MODULES.values(), *(ROOT / "tests").glob("*.py")]
    marked = [
        f"{path.relative_to(ROOT)}:{i}"
        for path in sorted(paths)
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if any(marker in line for marker in markers)
    ]
    assert not marked, marked


def test_setup_installs_every_package():
    """A subpackage missing from setup.py works in an editable install and is absent from a wheel."""
    setup_call = next(
        node
        for node in ast.walk(ast.parse((ROOT / "setup.py").read_text(encoding="utf-8")))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup"
    )
    listed = next(ast.literal_eval(kw.value) for kw in setup_call.keywords if kw.arg == "packages")
    on_disk = {".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "llama_adapter").rglob("__init__.py")}
    assert on_disk <= set(listed), sorted(on_disk - set(listed))
    assert "llama_adapter.kernels" in listed  # kernels/ is installed under the package (setup.py's docstring)
