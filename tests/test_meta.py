"""Rules for the tests themselves: a test may skip for a missing optional package, never for
the project's own modules, so that an import error in the project fails the suite."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT_MODULES = {path.stem for path in ROOT.glob("*.py")}


def skipped_project_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every `importorskip("m...")` call in `source` whose top-level module
    is one of the project's scripts."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        module = node.args[0].value
        if name == "importorskip" and isinstance(module, str) and module.split(".")[0] in PROJECT_MODULES:
            found.append((node.lineno, module))
    return found


def test_the_scan_finds_project_importorskips() -> None:
    source = (
        'import pytest\nfrom pytest import importorskip\npytest.importorskip("faiss")\n'
        'data = pytest.importorskip("data")\nimportorskip("model")\n'
    )
    assert skipped_project_imports(source) == [(4, "data"), (5, "model")]


def test_no_test_skips_for_a_project_module() -> None:
    assert {"model", "data", "evaluation"} <= PROJECT_MODULES
    offenders = [
        f"{path.name}:{line}: importorskip({module!r})"
        for path in sorted(Path(__file__).parent.glob("*.py"))
        for line, module in skipped_project_imports(path.read_text())
    ]
    assert not offenders, "import the project's own modules plainly:\n" + "\n".join(offenders)
