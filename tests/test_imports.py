"""The package's import graph: no cycles, and no floor importing a higher one.

Every import counts, also those inside functions (a lazy import is still a dependency).
`python tests/test_imports.py` prints the graph between floors and any cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "htcli"
# Lowest first: a module may import its own floor and the floors below it, never one above.
FLOORS = ("htcli.errors", "htcli.core", "htcli.models", "htcli.data", "htcli.methods", "htcli.generate",
          "htcli.evaluation", "htcli.serve", "htcli.publish", "htcli.api", "htcli.demo", "htcli.cli", "htcli.__main__")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (at any depth of its code)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + [base] if base else parent)
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `from a.b import f`: the module a.b
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def floor(module: str) -> int:
    matches = [i for i, prefix in enumerate(FLOORS) if module == prefix or module.startswith(prefix + ".")]
    return matches[-1] if matches else -1  # `htcli` itself (the version) sits below everything


def test_the_package_has_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_module_imports_a_higher_floor():
    graph = import_graph()
    upward = [(a, b) for a, targets in graph.items() for b in targets if b != "htcli" and floor(b) > floor(a)]
    assert upward == []


def test_every_module_has_a_floor():
    assert [name for name in import_graph() if name != "htcli" and floor(name) < 0] == []


if __name__ == "__main__":
    graph = import_graph()
    between: dict[tuple[str, str], int] = {}
    for a, targets in graph.items():
        for b in targets:
            if b != "htcli" and floor(a) != floor(b):
                key = (FLOORS[floor(a)], FLOORS[floor(b)])
                between[key] = between.get(key, 0) + 1
    for (a, b), count in sorted(between.items(), key=lambda item: (-floor(item[0][0]), floor(item[0][1]))):
        print(f"{a:18} -> {b:18} {count} imports")
    print(f"{len(graph)} modules, cycles: {cycles(graph) or 'none'}")
