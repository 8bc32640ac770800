"""The protocol library's stated API and its packaging: public names, lazy loading, one version, the docs.

The slow test beside this one (test_proto_dist.py) builds the distribution and uses it in a clean virtualenv.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import pathlib
import pkgutil
import re
import subprocess
import sys
import tomllib

import pytest

import kohakuriver_proto

REPO = pathlib.Path(__file__).resolve().parents[2]
PROTO_DIR = pathlib.Path(kohakuriver_proto.__file__).parent
API_DOC = REPO / "docs" / "proto-api.md"
EXAMPLE = REPO / "docs" / "examples" / "forward_over_socket.py"
# Modules of the package that are deliberately not part of the library's API.
INTERNAL = {"shared_settings"}  # the daemons' own settings (host and runner config files)


def test_every_module_is_public_or_deliberately_internal():
    modules = {m.name for m in pkgutil.iter_modules(kohakuriver_proto.__path__)}
    undecided = modules - set(kohakuriver_proto.PUBLIC_MODULES) - INTERNAL
    assert not undecided, (
        f"new modules {sorted(undecided)}: list them in _PUBLIC and __all__ of kohakuriver_proto/__init__.py "
        "(and docs/proto-api.md), or in INTERNAL here"
    )


def test_all_names_the_public_modules():
    modules = {
        name for name in kohakuriver_proto.__all__ if importlib.util.find_spec(f"kohakuriver_proto.{name}")
    }
    assert modules == set(kohakuriver_proto.PUBLIC_MODULES)


@pytest.mark.parametrize("module", kohakuriver_proto.PUBLIC_MODULES)
def test_every_public_name_exists(module):
    names = kohakuriver_proto.public_names(module)
    loaded = getattr(kohakuriver_proto, module)
    assert names, f"{module} offers nothing"
    assert [n for n in names if not hasattr(loaded, n)] == []
    assert set(getattr(loaded, "__all__", ())) <= set(names)


def test_importing_the_package_loads_no_module_until_used():
    code = (
        "import sys, kohakuriver_proto as k\n"
        "print(sorted(m for m in sys.modules if m.startswith('kohakuriver_proto')))\n"
        "print(k.frames.encode(k.frames.MsgType.PING, 7).hex())\n"
        "print('kohakuriver_proto.frames' in sys.modules, 'kohakuriver_proto.forwarder' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.splitlines() == [
        "['kohakuriver_proto', 'kohakuriver_proto.errors']",
        "0600000000070000",
        "True False",
    ]


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError):
        kohakuriver_proto.no_such_module  # noqa: B018
    with pytest.raises(KeyError):
        kohakuriver_proto.public_names("shared_settings")


def _pyproject(path: pathlib.Path) -> dict:
    return tomllib.loads(path.read_text())


def test_one_version_for_both_distributions():
    for path in (REPO / "pyproject.toml", REPO / "proto" / "pyproject.toml"):
        data = _pyproject(path)
        assert "version" not in data["project"], f"{path.name}: the version must be read, not written"
        assert "version" in data["project"]["dynamic"]
        assert data["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "kohakuriver_proto.__version__"}
    installed = importlib.metadata.version("kohakuriver")
    assert installed == kohakuriver_proto.__version__, (
        "the installed kohakuriver metadata is stale: run `.venv/bin/pip install -e '.[test]'` again"
    )


def test_proto_distribution_depends_on_attrs_and_cattrs_only():
    proto = _pyproject(REPO / "proto" / "pyproject.toml")["project"]
    main = _pyproject(REPO / "pyproject.toml")["project"]
    names = [re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower() for d in proto["dependencies"]]
    assert names == ["attrs", "cattrs"]
    # The same lower bounds as the main distribution, which carries the same package.
    assert set(proto["dependencies"]) <= set(main["dependencies"])
    assert "optional-dependencies" not in proto and "scripts" not in proto


def test_proto_directory_links_to_the_package():
    link = REPO / "proto" / "kohakuriver_proto"
    assert link.is_symlink(), "proto/kohakuriver_proto must stay a link: the code exists once"
    assert link.resolve() == PROTO_DIR.resolve()


def test_the_api_page_names_every_public_module_and_name():
    prose = re.sub(
        r"```.*?```", "", API_DOC.read_text(), flags=re.DOTALL
    )  # the API sections, not the example
    spans = re.findall(r"`([^`]+)`", prose)  # a name counts where it is written as code
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", " ".join(spans)))
    missing = [
        f"{module}.{name}" if name else module
        for module in kohakuriver_proto.PUBLIC_MODULES
        for name in ("", *kohakuriver_proto.public_names(module))
        if (name or module) not in words
    ]
    assert missing == [], f"docs/proto-api.md does not mention: {missing} (add them to the module's section)"


def _example():
    spec = importlib.util.spec_from_file_location("forward_over_socket", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("size", "server"),
    [
        (0, {}),
        (3 << 20, {}),
        (1 << 20, {"window": 16 * 1024}),  # the Forwarder waits for credit over and over
        (3 << 20, {"hello": False}),  # a seed-protocol server: no flow control, bounded buffers
    ],
)
def test_the_documented_example_forwards(size, server):
    example = _example()
    assert len(example.demo(size, **server)) == size


def test_the_documented_example_reports_a_refusal():
    example = _example()
    with pytest.raises(example.SessionRefused) as refused:
        example.demo(1024, refuse=example.RefusalCode.NOT_RUNNING)
    assert refused.value.refused.code is example.RefusalCode.NOT_RUNNING
    assert refused.value.refused.exit_code == 3
