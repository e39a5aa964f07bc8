"""The package's import graph, read from the source: no cycles, integrations independent of each other, and the
communication core below everything that uses it.

Every import counts — at module level and inside functions (a lazy import is still a dependency; it only hides a
cycle) — except those under ``if TYPE_CHECKING:``, which never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"hybrid_ext": ROOT / "hybrid_ext", "hybrid_ext.integrations": ROOT / "integrations"}
INTEGRATIONS = ("torch", "horovod", "deepspeed")
PURE_PLANS = ("hybrid_ext.comm.schedule", "hybrid_ext.comm.hierarchy", "hybrid_ext.comm.cost_model")
ABOVE_COMM = (
    "hybrid_ext.parallel",
    "hybrid_ext.train",
    "hybrid_ext.bench",
    "hybrid_ext.launch",
    "hybrid_ext.integrations",
    "hybrid_ext.cli",
)

# Lazy imports that close a cycle, each with the reason it is still there. Remove an entry with its cycle (a test
# below fails once the edge is gone).
ALLOWED_EDGES: dict[tuple[str, str], str] = {}  # none at present


def package_modules() -> dict[str, Path]:
    """Every module of the installed package, by its dotted name (``integrations/`` installs as
    ``hybrid_ext.integrations``)."""
    modules = {}
    for prefix, directory in PACKAGES.items():
        for path in sorted(directory.rglob("*.py")):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([prefix, *parts])] = path
    return modules


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """The import statements of ``tree``, at any depth, leaving out ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child.test):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module ``name`` is, or is inside (``a.b.C`` -> ``a.b``); None outside the package."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (an imported name that is a submodule counts as that module)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = name if is_package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != name:
                    edges.add(resolved)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as the modules along it (first repeated at the end), or None where the graph has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def _without_allowed(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: {t for t in targets if (m, t) not in ALLOWED_EDGES} for m, targets in graph.items()}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(package_modules())


def test_the_graph_reads_the_package():
    modules = package_modules()
    assert "hybrid_ext.comm.transports.contract" in modules
    assert "hybrid_ext.integrations.horovod.transport" in modules
    edges = import_graph(modules)
    assert "hybrid_ext.comm.transports.contract" in edges["hybrid_ext.comm.transports.routed"]


def test_no_module_imports_itself_through_others(graph):
    cycle = find_cycle(_without_allowed(graph))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_allowed_cycle_edge_still_exists(graph):
    gone = [f"{m} -> {t}" for m, t in ALLOWED_EDGES if t not in graph.get(m, ())]
    assert not gone, "remove these from ALLOWED_EDGES, their cycles are gone: " + ", ".join(gone)


def test_the_cycle_finder_finds_a_cycle_and_names_its_modules():
    fake = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set()}
    assert find_cycle(fake) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    # a lazy (function-level) import counts; one under TYPE_CHECKING does not
    lazy = ast.parse("import x\ndef f():\n    from y import z\nif TYPE_CHECKING:\n    import w\n")
    assert {n.module if isinstance(n, ast.ImportFrom) else n.names[0].name for n in _imports(lazy)} == {"x", "y"}


def test_integrations_do_not_import_each_other(graph):
    crossing = []
    for module, targets in graph.items():
        for own in INTEGRATIONS:
            if module.startswith(f"hybrid_ext.integrations.{own}"):
                others = [f"hybrid_ext.integrations.{o}" for o in INTEGRATIONS if o != own]
                crossing += [f"{module} -> {t}" for t in targets if t.startswith(tuple(others))]
    assert not crossing, "integrations importing each other:\n" + "\n".join(sorted(crossing))


def test_pure_plans_import_no_transport(graph):
    reaching = [
        f"{module} -> {t}"
        for module in PURE_PLANS
        for t in graph[module]
        if t.startswith("hybrid_ext.comm.transports") or t in ("hybrid_ext.comm.executor", "hybrid_ext.comm.topology")
    ]
    assert not reaching, "plans importing transports:\n" + "\n".join(reaching)


def test_the_communication_core_imports_nothing_above_it(graph):
    reaching = [
        f"{module} -> {t}"
        for module, targets in graph.items()
        if module.startswith("hybrid_ext.comm")
        for t in targets
        if t.startswith(ABOVE_COMM)
    ]
    assert not reaching, "hybrid_ext.comm importing what is built on it:\n" + "\n".join(sorted(reaching))
