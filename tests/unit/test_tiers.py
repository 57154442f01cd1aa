"""The unit tier stands alone: it imports nothing from tests/integration (which needs root)."""

from __future__ import annotations

import ast
from pathlib import Path

UNIT = Path(__file__).parent


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_unit_tests_import_nothing_from_integration() -> None:
    offenders = {
        path.name: sorted(m for m in _imported_modules(path) if m.startswith("tests.integration"))
        for path in sorted(UNIT.glob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}
