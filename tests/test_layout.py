"""Dependencies point one way: no import cycles between modules, and the layer rules of
docs/architecture.md (masks know shapes, not criteria; selection does not import export)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "slimtune"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    """module -> slimtune modules it imports (module-level statements only when top_level_only)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in nodes:
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("slimtune"):
                    for alias in node.names:  # `from .pkg import module` names a module too
                        deps.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def test_no_import_cycles():
    graph = _graph(top_level_only=True)
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize("low, high", [
    ("slimtune.masking", ("slimtune.importance", "slimtune.pruning", "slimtune.training", "slimtune.export", "slimtune.adapters", "slimtune.api")),
    ("slimtune.models", ("slimtune.masking", "slimtune.importance", "slimtune.pruning", "slimtune.training", "slimtune.export", "slimtune.api")),
    ("slimtune.pruning.selection", ("slimtune.export",)),
    ("slimtune.importance", ("slimtune.pruning", "slimtune.export", "slimtune.api")),
])
def test_dependencies_point_one_way(low, high):
    graph = _graph(top_level_only=False)
    for module, deps in graph.items():
        if module == low or module.startswith(low + "."):
            bad = sorted(d for d in deps if d.startswith(high))
            assert not bad, f"{module} imports {bad}"
