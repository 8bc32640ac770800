"""``HostSettings`` (the static type of the host's config) must match the class ``HOST_SCHEMA`` generates."""

from __future__ import annotations

import typing

from kohakuriver_host.config import HOST_SCHEMA, host_config_from
from kohakuriver_host.host_settings import HostSettings


def _members() -> dict[str, object]:
    members = {}
    for name, value in vars(HostSettings).items():
        if isinstance(value, property):
            members[name] = typing.get_type_hints(value.fget)["return"]
    return members


def test_every_member_is_provided_with_its_type():
    config = host_config_from()
    members = _members()
    assert len(members) >= 20
    for name, hint in members.items():
        value = getattr(config, name)  # AttributeError: a member the generated class does not have
        if name.isupper():
            # A setting: the schema declares the same type (a list setting is kept as a tuple).
            declared = HOST_SCHEMA.settings[name].type
            if typing.get_origin(declared) is list:
                declared = tuple[(*typing.get_args(declared), ...)]
            assert declared == hint, name
        origin = typing.get_origin(hint) or hint
        assert isinstance(value, origin), (name, value, hint)


def test_the_modules_read_only_listed_settings():
    # Every UPPER_CASE attribute the host's own modules read from ``config`` is a member of the protocol.
    import pathlib
    import re

    import kohakuriver_host

    members = set(_members())
    folder = pathlib.Path(kohakuriver_host.__file__).parent
    read = set()
    for path in folder.glob("*.py"):
        if path.name == "config.py":
            continue
        read |= set(re.findall(r"\bconfig\.([A-Z][A-Z0-9_]+)\b", path.read_text(encoding="utf-8")))
    read.discard("MAX_CONTENT_LENGTH")  # Quart's app.config, not ours
    read.discard("RESPONSE_TIMEOUT")
    assert read <= members, read - members
