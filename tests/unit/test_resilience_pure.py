"""waypoint.resilience decides only: no I/O, no clock or global randomness of its own, small modules."""
from __future__ import annotations

import ast
import pathlib

import pytest

import waypoint.resilience as pkg

MODULES = sorted(pathlib.Path(pkg.__file__).parent.glob("*.py"))
FORBIDDEN = {"asyncio", "socket", "ssl", "time", "selectors", "os", "threading"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_does_no_io_and_reads_no_clock(path):
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
        # random.random() & co. at module level would be hidden global randomness.
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "random"
                and node.func.attr != "Random"):
            pytest.fail(f"{path.name}:{node.lineno} uses the global random generator")
    assert not imported & FORBIDDEN, imported & FORBIDDEN


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_is_small_with_a_docstring(path):
    text = path.read_text()
    assert len(text.splitlines()) < 700
    assert ast.get_docstring(ast.parse(text))


def test_public_api_is_exported():
    for name in pkg.__all__:
        assert hasattr(pkg, name), name
