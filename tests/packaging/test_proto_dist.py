"""kohakuriver-proto installs and works alone: build its wheel, install it into a clean virtualenv with attrs
and cattrs only, and use it there (every public name, the documented example).

Slow-marked: it builds a wheel (pip fetches setuptools for the isolated build, as `pip install -e .` does) and
makes a virtualenv. Without `CI=true` a machine that cannot build (no package index) skips it; CI fails.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

import kohakuriver_proto

REPO = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "docs" / "examples" / "forward_over_socket.py"
# The main distribution's other dependencies (import names): none may come with the protocol library.
NOT_WANTED = [
    "trio", "hypercorn", "quart", "quart_trio", "trio_websocket", "wsproto", "h11", "httpx", "click", "rich",
    "psutil", "pynvml", "pyroute2", "cryptography", "websockets", "kohakuriver_cli", "kohakuriver_host",
    "kohakuriver_runner", "kohakuriver_net", "pycdlib",
]  # fmt: skip

pytestmark = pytest.mark.slow


def _run(*cmd: str | pathlib.Path, cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=300)


def _cannot(what: str, proc: subprocess.CompletedProcess) -> None:
    message = f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def proto_wheel(tmp_path_factory) -> pathlib.Path:
    """The wheel, built from a copy of proto/ (the link to the package followed), so that the build's own
    files stay out of the working tree."""
    work = tmp_path_factory.mktemp("proto-build")
    source = work / "proto"
    shutil.copytree(
        REPO / "proto", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "dist")
    )
    proc = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", work / "dist", source)
    if proc.returncode != 0:
        _cannot("building the kohakuriver-proto wheel", proc)
    (wheel,) = (work / "dist").glob("kohakuriver_proto-*.whl")
    return wheel


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory, proto_wheel) -> pathlib.Path:
    """A virtualenv without system site packages holding the wheel, attrs and cattrs, and nothing else (not
    even pip: the main environment's pip installs into it)."""
    work = tmp_path_factory.mktemp("proto-venv")
    venv = work / "venv"
    proc = _run(sys.executable, "-m", "venv", "--without-pip", venv)
    assert proc.returncode == 0, proc.stderr
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-input"]
    # attrs and cattrs at the main environment's versions, from pip's cache when it has them; only what the
    # wheel's metadata asks for is installed.
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in ("attrs", "cattrs")]
    wheels = work / "wheels"
    fetched = _run(sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", wheels, *pins)
    if fetched.returncode == 0:
        proc = _run(*pip, "--no-index", "--find-links", wheels, proto_wheel)
    else:
        proc = _run(*pip, proto_wheel)  # straight from the index
    if proc.returncode != 0:
        _cannot("installing the kohakuriver-proto wheel into a clean virtualenv", proc)
    return venv


def _in_venv(venv: pathlib.Path, code: str, cwd: pathlib.Path) -> str:
    # -I: isolated mode, so neither PYTHONPATH nor the working directory can bring the repository's copy in.
    proc = _run(venv / "bin" / "python", "-I", "-c", textwrap.dedent(code), cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_the_wheel_declares_attrs_and_cattrs_only(clean_venv, tmp_path):
    out = _in_venv(
        clean_venv,
        """
        import importlib.metadata as md, json
        dists = sorted(d.metadata["Name"].lower() for d in md.distributions())
        print(json.dumps([md.version("kohakuriver-proto"), md.requires("kohakuriver-proto"), dists]))
        """,
        tmp_path,
    )
    version, requires, dists = json.loads(out)
    assert version == kohakuriver_proto.__version__ == importlib.metadata.version("kohakuriver")
    assert sorted(r.split(">")[0].split("=")[0] for r in requires) == ["attrs", "cattrs"]
    # Only these distributions exist there (cattrs brings typing-extensions).
    assert set(dists) <= {"kohakuriver-proto", "attrs", "cattrs", "typing-extensions", "typing_extensions"}


def test_the_daemons_dependencies_are_absent(clean_venv, tmp_path):
    out = _in_venv(
        clean_venv,
        f"""
        import importlib.util, json
        print(json.dumps([m for m in {NOT_WANTED!r} if importlib.util.find_spec(m) is not None]))
        """,
        tmp_path,
    )
    assert json.loads(out) == []


def test_every_public_name_imports_there(clean_venv, tmp_path):
    out = _in_venv(
        clean_venv,
        """
        import importlib, json, pathlib, pkgutil, sys
        import kohakuriver_proto as k
        for m in pkgutil.walk_packages(k.__path__, "kohakuriver_proto."):  # every module loads
            importlib.import_module(m.name)
        names = [f"{m}.{n}" for m in k.PUBLIC_MODULES for n in k.public_names(m)]
        missing = [n for n in names if not hasattr(getattr(k, n.split(".")[0]), n.split(".")[1])]
        print(json.dumps([str(pathlib.Path(k.__file__).parent), len(names), missing, k.__version__]))
        """,
        tmp_path,
    )
    where, count, missing, version = json.loads(out)
    assert pathlib.Path(where).is_relative_to(clean_venv), f"imported from {where}, not the clean venv"
    assert count > 200 and missing == []
    assert version == kohakuriver_proto.__version__


def test_the_documented_example_runs_there(clean_venv, tmp_path):
    example = tmp_path / EXAMPLE.name
    shutil.copy(EXAMPLE, example)  # away from the repository, so only the installed package can serve
    proc = _run(clean_venv / "bin" / "python", "-I", example, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("forwarded 2097152 bytes there and back"), proc.stdout
    assert proc.stderr == ""
