"""No module of the project imports a module that imports it back.

A cycle is the sign of a module in the wrong place (shared helpers living in the module that wires everything,
one endpoint module taking another's private helpers), and it bites at import time: whichever module of the
circle is imported first sees the other half-initialised. Hiding the import inside a function does not make
the dependency go away, so the first import of a cycle counts wherever it is written; the way back counts when
it runs at import time (the module body, class bodies, ``try``/``if`` blocks). ``if TYPE_CHECKING:`` blocks
never run and do not count. The layers between packages are ``test_import_layers.py``'s business; this test
looks at every module of every package, so a cycle inside one package is caught too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (
    "kohakuriver_proto",
    "kohakuriver_net",
    "kohakuriver_host",
    "kohakuriver_runner",
    "kohakuriver_cli",
)

#: Cycles waiting for a change in a file owned elsewhere, as (importer, imported) of the import that closes
#: them. Each entry must still be true (the test below fails once it is fixed, so that the entry goes too).
PENDING: set[tuple[str, str]] = set()


@attrs.frozen
class Import:
    target: str
    line: int
    at_import_time: bool  # False inside a function body: runs only when the function is called


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _type_checking_only(node: ast.stmt) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_statements(
    body: list[ast.stmt], at_import_time: bool
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    for node in body:
        if _type_checking_only(node):
            assert isinstance(node, ast.If)
            yield from _import_statements(node.orelse, at_import_time)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, at_import_time
            continue
        inner = at_import_time and not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                yield from _import_statements([child], inner)
            elif isinstance(child, ast.excepthandler | ast.match_case):
                yield from _import_statements(child.body, inner)


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The project modules an import statement loads (``from pkg import mod`` names the module itself)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".")
        if MODULES[module].name != "__init__.py":
            parts.pop()  # a module's relative imports start from its package
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]


def _imports(module: str) -> list[Import]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    return [
        Import(target, node.lineno, at_import_time)
        for node, at_import_time in _import_statements(tree.body, True)
        for target in _targets(module, node)
        if target in MODULES and target != module
    ]


IMPORTS = {module: _imports(module) for module in MODULES}


def _path_back(start: str, goal: str) -> list[str] | None:
    """The chain of import-time imports from ``start`` to ``goal``, or None."""
    came_from: dict[str, str | None] = {start: None}
    todo = [start]
    while todo:
        here = todo.pop()
        if here == goal:
            chain = [here]
            while (prev := came_from[chain[-1]]) is not None:
                chain.append(prev)
            return chain[::-1]
        for imp in IMPORTS[here]:
            if imp.at_import_time and imp.target not in came_from:
                came_from[imp.target] = here
                todo.append(imp.target)
    return None


def _cycles() -> dict[tuple[str, str], str]:
    found = {}
    for module, imports in IMPORTS.items():
        for imp in imports:
            chain = _path_back(imp.target, module)
            if chain is not None:
                where = "" if imp.at_import_time else " (inside a function)"
                found[(module, imp.target)] = f"{module}:{imp.line}{where} -> " + " -> ".join(chain)
    return found


def test_the_scanner_sees_imports() -> None:
    """Guards the test itself: a scanner that resolved nothing would find no cycle either."""
    daemon = {imp.target for imp in IMPORTS["kohakuriver_runner.daemon"]}
    assert {"kohakuriver_runner.app", "kohakuriver_net.front_door"} <= daemon  # ``from .app``, absolute
    tasks = {imp.target for imp in IMPORTS["kohakuriver_proto.models.tasks"]}
    assert {"kohakuriver_proto.lifecycle", "kohakuriver_proto.models._fields"} <= tasks  # ``..`` and ``.``
    assert len(MODULES) > 100


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_imports_itself_back(package: str) -> None:
    cycles = [
        text
        for (module, target), text in sorted(_cycles().items())
        if module.split(".")[0] == package and (module, target) not in PENDING
    ]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_pending_cycles_still_exist() -> None:
    gone = PENDING - set(_cycles())
    assert not gone, f"these cycles are gone: remove them from PENDING: {sorted(gone)}"
