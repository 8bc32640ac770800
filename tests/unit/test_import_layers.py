"""The import graph keeps its shape: proto at the bottom, net above it, host and runner side by side, the CLI
on top. A helper that lives where it was first needed (the runner importing the CLI's file writer, the CLI
importing the host's relay) is how layers rot; this test names the import that breaks the rule."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: What each package may import from the project (besides itself).
ALLOWED = {
    "kohakuriver_proto": set(),
    "kohakuriver_net": {"kohakuriver_proto"},
    "kohakuriver_host": {"kohakuriver_proto", "kohakuriver_net"},
    "kohakuriver_runner": {"kohakuriver_proto", "kohakuriver_net"},
    "kohakuriver_cli": {"kohakuriver_proto", "kohakuriver_net", "kohakuriver_host", "kohakuriver_runner"},
}


def _project_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return [(line, name) for line, name in found if name in ALLOWED]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_layers_below(package: str) -> None:
    broken = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, name in _project_imports(path)
        if name != package and name not in ALLOWED[package]
    ]
    assert not broken, "\n".join(broken)


def test_the_cli_reaches_the_daemons_only_to_run_them() -> None:
    """The CLI starts the daemons (``kr host``/``runner``/``up``) and writes their config templates; any other
    use of daemon internals belongs in ``kohakuriver_net`` or ``kohakuriver_proto``."""
    allowed_files = {"daemon_cmd.py", "init_cmd.py"}
    broken = [
        f"{path.name}:{line} imports {name}"
        for path in sorted((ROOT / "kohakuriver_cli").glob("*.py"))
        for line, name in _project_imports(path)
        if name in {"kohakuriver_host", "kohakuriver_runner"} and path.name not in allowed_files
    ]
    assert not broken, "\n".join(broken)
