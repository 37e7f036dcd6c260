"""The rules of docs/DESIGN.md that a machine can check: files and functions a reader can hold in their head, and
no private name used outside the module that owns it."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
WHOLE = "stays whole"  # the words of the comment that lets a longer function be


def _sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts)


def test_no_library_file_is_over_600_lines():
    long = {str(p.relative_to(REPO)): n for p in _sources("flexkd")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES}
    assert long == {}, f"split these into modules that say what they hold: {long}"


def test_no_function_is_over_80_lines_without_saying_why():
    long = {}
    for path in _sources("flexkd", "flows"):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and not any(WHOLE in line for line in lines[node.lineno - 1: node.end_lineno]):
                    long[f"{path.relative_to(REPO)}:{node.lineno} {node.name}"] = length
    assert long == {}, f"over {MAX_FUNCTION_LINES} lines with no comment saying why it {WHOLE}: {long}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_private_name_is_used_outside_its_module():
    """``from flexkd.x import _y`` or ``x._y`` on an imported module of ours, anywhere but in x itself."""
    ours = ("flexkd", "flows", "benchmarks")
    found = []
    for path in _sources(*ours):
        here = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = {}  # local name -> module of ours imported under it
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ours:
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__") and node.module != here:
                        found.append(f"{here}: from {node.module} import {alias.name}")
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in ours:
                        modules[alias.asname or alias.name.split(".")[0]] = alias.asname and alias.name or alias.name.split(".")[0]
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in modules
                    and modules[node.value.id] != here):
                found.append(f"{here}: {node.value.id}.{node.attr}")
    assert found == [], f"private names used outside their module (make them public where they live): {found}"
