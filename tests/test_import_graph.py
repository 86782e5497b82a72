"""The project's modules form layers: no module imports (at the top or inside a function) one
that imports it back, directly or through others."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def project_imports(root: Path) -> dict[str, set[str]]:
    """{module: the project modules it imports anywhere in its file} for root/*.py."""
    modules = {path.stem for path in root.glob("*.py")}
    graph = {}
    for name in modules:
        imported = set()
        for node in ast.walk(ast.parse((root / f"{name}.py").read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
        graph[name] = (imported & modules) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import loop as [a, b, ..., a], or [] when the graph is acyclic (depth-first search)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[node] = "done"
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return []


def test_the_cycle_finder_finds_a_loop_and_accepts_layers():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_scan_sees_imports_inside_functions(tmp_path):
    (tmp_path / "rules.py").write_text("def f():\n    from loader import load\n")
    (tmp_path / "loader.py").write_text("import rules, os\n")
    assert project_imports(tmp_path) == {"rules": {"loader"}, "loader": {"rules"}}


def test_project_modules_import_in_layers():
    graph = project_imports(ROOT)
    assert {"options", "checkpoint", "model", "trainer"} <= set(graph)
    cycle = find_cycle(graph)
    assert not cycle, "import loop: " + " -> ".join(cycle)
