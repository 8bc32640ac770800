"""``HostSettings`` and ``RunnerSettings`` (the static types of the daemons' configs) must match the classes
their schemas generate, and every setting a daemon's module reads must be listed in its protocol."""

from __future__ import annotations

import inspect
import pathlib
import re
import typing

import pytest

import kohakuriver_host
import kohakuriver_runner
from kohakuriver_host.config import HOST_SCHEMA, host_config_from
from kohakuriver_host.host_settings import HostSettings
from kohakuriver_runner.config import RUNNER_SCHEMA, runner_config_from
from kohakuriver_runner.runner_settings import RunnerSettings

CASES = {
    "host": (HostSettings, HOST_SCHEMA, host_config_from, kohakuriver_host),
    "runner": (RunnerSettings, RUNNER_SCHEMA, runner_config_from, kohakuriver_runner),
}
#: ``config.X`` in a module that is not one of ours: Quart's ``app.config``.
NOT_OURS = {"MAX_CONTENT_LENGTH", "RESPONSE_TIMEOUT"}


def _members(protocol: type) -> dict[str, object]:
    members = {}
    for name, value in vars(protocol).items():
        if isinstance(value, property):
            members[name] = typing.get_type_hints(value.fget)["return"]
        elif inspect.isfunction(value) and not name.startswith("_"):
            members[name] = typing.get_type_hints(value)["return"]
    return members


@pytest.mark.parametrize("daemon", sorted(CASES))
def test_every_member_is_provided_with_its_type(daemon: str) -> None:
    protocol, schema, build, _ = CASES[daemon]
    config = build()
    members = _members(protocol)
    assert len(members) >= 20
    for name, hint in members.items():
        value = getattr(config, name)  # AttributeError: a member the generated class does not have
        if callable(value) and not name.isupper():
            continue  # a method: its presence is what matters (calling it may read the file system)
        if name.isupper():
            # A setting: the schema declares the same type (a list setting is kept as a tuple).
            declared = schema.settings[name].type
            if typing.get_origin(declared) is list:
                declared = tuple[(*typing.get_args(declared), ...)]
            assert declared == hint, name
        origin = typing.get_origin(hint) or hint
        if origin is typing.Union or type(hint).__name__ == "UnionType":
            origin = tuple(typing.get_origin(a) or a for a in typing.get_args(hint))
        assert isinstance(value, origin), (name, value, hint)


@pytest.mark.parametrize("daemon", sorted(CASES))
def test_the_modules_read_only_listed_settings(daemon: str) -> None:
    protocol, _, _, package = CASES[daemon]
    members = set(_members(protocol))
    folder = pathlib.Path(package.__file__).parent
    read = set()
    for path in folder.glob("*.py"):
        if path.name == "config.py":
            continue
        read |= set(re.findall(r"\bconfig\.([A-Z][A-Z0-9_]+)\b", path.read_text(encoding="utf-8")))
    assert read - NOT_OURS <= members, read - NOT_OURS - members
