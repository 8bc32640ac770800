"""kohakuriver_proto stays sans-IO: no I/O, concurrency, clock or randomness modules in its own imports."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import kohakuriver_proto

PROTO_DIR = pathlib.Path(kohakuriver_proto.__file__).parent
FORBIDDEN = {
    "socket", "ssl", "selectors", "select", "trio", "asyncio", "anyio", "threading", "subprocess",
    "multiprocessing", "time", "random", "secrets", "os", "io", "httpx", "wsproto", "h11", "uuid",
}  # fmt: skip


def _imported_roots(path: pathlib.Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_module_of_the_package_imports_io_or_clocks():
    offenders = {
        str(path.relative_to(PROTO_DIR)): sorted(_imported_roots(path) & FORBIDDEN)
        for path in PROTO_DIR.rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_the_whole_package_loads_no_io_module():
    # attrs itself imports `threading` (a thread-local in attr._compat) and typing_extensions pulls in the C
    # `_socket` module; neither is used by us. Everything a protocol user could do I/O with must be absent.
    code = (
        "import pkgutil, importlib, sys, kohakuriver_proto\n"
        "for m in pkgutil.walk_packages(kohakuriver_proto.__path__, 'kohakuriver_proto.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
                 .stdout.split())  # fmt: skip
    for name in ("socket", "ssl", "selectors", "trio", "asyncio", "anyio", "subprocess", "random", "httpx"):
        assert name not in loaded, f"{name} was imported by kohakuriver_proto"
