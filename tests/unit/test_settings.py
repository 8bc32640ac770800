"""The settings machinery: types, checks, error collection, legacy shims, the template round trip."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kohakuriver_proto import ValidationError
from kohakuriver_proto import settings as s
from kohakuriver_proto.settings import (
    CrossCheck,
    LogLevel,
    Schema,
    Section,
    Setting,
    SettingsError,
    load_settings,
    parse_overlay_subnet,
    render_template,
)

SCHEMA = Schema(
    class_name="DemoConfig",
    title="Demo configuration",
    filename="demo_config.py",
    sections=[
        Section(
            "Basics",
            [
                Setting("PORT", int, 8001, "A port.", s.port),
                Setting("NAME", str, "demo", "A name."),
                Setting("RATIO", float, 0.5, "A fraction.", s.fraction),
                Setting("ENABLED", bool, True, "A switch."),
                Setting("MOUNTS", list[str], [], "Bind mounts.", s.mounts),
                Setting("LOG_LEVEL", LogLevel, LogLevel.INFO, "Verbosity."),
                Setting("TOKEN", str, "", "A secret.", s.optional(s.token), secret=True),
            ],
        ),
        Section(
            "Network",
            [
                Setting("SUBNET", str, "172.30.0.0/16", "A subnet.", s.ip_network),
                Setting("GATEWAY", str, "172.30.0.1", "Its gateway.", s.ip_address),
                Setting("OVERLAY", str, "10.128.0.0/12/6/14", "Overlay plan.", s.overlay_subnet),
            ],
        ),
    ],
    cross_checks=[s.gateway_in_subnet("SUBNET", "GATEWAY")],
    module=__name__,
)


def load(text: str):
    return load_settings(SCHEMA, text, "/etc/demo_config.py")


def problems(text: str) -> dict[str | None, str]:
    with pytest.raises(SettingsError) as info:
        load(text)
    return {p.setting: p.message for p in info.value.problems}


def test_empty_file_gives_defaults():
    config = load("")
    assert config == SCHEMA.defaults()
    assert config.PORT == 8001 and config.MOUNTS == () and config.LOG_LEVEL is LogLevel.INFO


def test_result_is_frozen_attrs():
    config = load("PORT = 9000\n")
    assert attrs.has(type(config))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.PORT = 1
    assert type(config).__name__ == "DemoConfig"


def test_values_are_coerced():
    config = load('RATIO = 1\nLOG_LEVEL = "DEBUG"\nMOUNTS = ["/a:/b", "/c:/d:ro"]\n')
    assert config.RATIO == 1.0 and isinstance(config.RATIO, float)
    assert config.LOG_LEVEL is LogLevel.DEBUG
    assert config.MOUNTS == ("/a:/b", "/c:/d:ro")


@pytest.mark.parametrize(
    ("line", "name", "fragment"),
    [
        ('PORT = "8001"', "PORT", "expected int, got '8001' (str)"),
        ("PORT = True", "PORT", "expected int, got True (bool)"),
        ("PORT = 1.5", "PORT", "expected int"),
        ("ENABLED = 1", "ENABLED", "expected bool, got 1 (int)"),
        ('ENABLED = "yes"', "ENABLED", "expected bool"),
        ("RATIO = False", "RATIO", "expected float, got False (bool)"),
        ("NAME = 3", "NAME", "expected str, got 3 (int)"),
        ('MOUNTS = "/a:/b"', "MOUNTS", "expected list[str]"),
        ('MOUNTS = ["/a:/b", 3]', "MOUNTS", "element 1 is 3 (int)"),
        ('LOG_LEVEL = "verbose"', "LOG_LEVEL", "one of 'full', 'debug', 'info', 'warning', 'error'"),
        ("LOG_LEVEL = 20", "LOG_LEVEL", "expected LogLevel"),
    ],
)
def test_wrong_types_name_the_setting(line, name, fragment):
    found = problems(line + "\n")
    assert list(found) == [name]
    assert fragment in found[name]


@pytest.mark.parametrize(
    ("line", "name", "fragment"),
    [
        ("PORT = 0", "PORT", "between 1 and 65535"),
        ("PORT = 65536", "PORT", "between 1 and 65535"),
        ("RATIO = 0", "RATIO", "0 < x <= 1"),
        ("RATIO = 1.5", "RATIO", "0 < x <= 1"),
        ('MOUNTS = ["data:/data"]', "MOUNTS", "host path must be absolute"),
        ('MOUNTS = ["/data:data"]', "MOUNTS", "container path must be absolute"),
        ('MOUNTS = ["/data:/data:rx"]', "MOUNTS", "'ro' or 'rw'"),
        ('MOUNTS = ["/data"]', "MOUNTS", "must look like"),
        ('MOUNTS = ["/a:/b:ro:x"]', "MOUNTS", "must look like"),
        ('SUBNET = "172.30.0.1/16"', "SUBNET", "CIDR"),
        ('SUBNET = "banana"', "SUBNET", "CIDR"),
        ('GATEWAY = "300.1.1.1"', "GATEWAY", "IP address"),
        ('GATEWAY = "10.0.0.1"', "GATEWAY", "not inside SUBNET 172.30.0.0/16"),
        ('GATEWAY = "172.30.255.255"', "GATEWAY", "broadcast"),
        ('OVERLAY = "10.128.0.0/12"', "OVERLAY", "BASE/TOTAL_PREFIX/NODE_BITS/SUBNET_BITS"),
        ('OVERLAY = "10.128.0.0/12/6/13"', "OVERLAY", "must be 32"),
        ('OVERLAY = "10.128.0.1/12/6/14"', "OVERLAY", "host bits"),
        ('TOKEN = "short"', "TOKEN", "at least 16"),
    ],
)
def test_impossible_values_name_the_setting(line, name, fragment):
    found = problems(line + "\n")
    assert list(found) == [name]
    assert fragment in found[name]


def test_unknown_name_suggests_the_closest():
    found = problems("PROT = 1\n")
    assert found == {"PROT": "unknown setting (did you mean PORT?)"}
    assert problems("ZZZZZZZZ = 1\n") == {"ZZZZZZZZ": "unknown setting"}


def test_all_problems_are_collected_in_one_error():
    with pytest.raises(SettingsError) as info:
        load('PORT = 0\nENABLED = "no"\nPROT = 1\nGATEWAY = "10.0.0.1"\n')
    err = info.value
    assert [p.setting for p in err.problems] == ["PORT", "ENABLED", "GATEWAY", "PROT"]
    text = str(err)
    assert text.startswith("/etc/demo_config.py: 4 problems:\n")
    for name in ("PORT", "ENABLED", "GATEWAY", "PROT"):
        assert f"\n  {name}: " in text
    assert isinstance(err, ValidationError) and err.field == "PORT"


def test_single_problem_is_one_line():
    with pytest.raises(SettingsError) as info:
        load("PORT = 0\n")
    assert str(info.value) == "/etc/demo_config.py: PORT: must be a port number between 1 and 65535, got 0"


def test_cross_check_skipped_when_a_part_is_already_wrong():
    found = problems('SUBNET = "nonsense"\nGATEWAY = "10.0.0.1"\n')
    assert list(found) == ["SUBNET"]


def test_lowercase_camelcase_and_private_names_are_ignored():
    config = load("import os\n_BASE = '/data'\nhelper = 3\nClass = int\nMOUNTS = [_BASE + ':/data']\n")
    assert config.MOUNTS == ("/data:/data",)


def test_legacy_kohakuengine_file_loads():
    text = (
        '"""Legacy"""\n'
        "from kohakuengine import Config\n"
        "from kohakuriver.models.enums import LogLevel\n"
        "import kohakuriver.models.enums as enums\n"
        "PORT: int = 9001\n"
        "LOG_LEVEL: LogLevel = LogLevel.DEBUG\n"
        "assert enums.LogLevel is LogLevel\n"
        "def config_gen():\n"
        "    return Config.from_globals()\n"
        "assert config_gen()['PORT'] == 9001\n"
    )
    config = load(text)
    assert config.PORT == 9001 and config.LOG_LEVEL is LogLevel.DEBUG


def test_new_style_import_of_loglevel():
    config = load("from kohakuriver_proto.settings import LogLevel\nLOG_LEVEL = LogLevel.WARNING\n")
    assert config.LOG_LEVEL is LogLevel.WARNING


def test_other_legacy_imports_fail_clearly():
    found = problems("from kohakuriver.models.enums import TaskStatus\n")
    assert list(found) == [None]
    assert "line 1" in found[None] and "TaskStatus" in found[None]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("PORT = = 3\n", "line 1: syntax error"),
        ("X = 1\nraise RuntimeError('boom')\n", "line 2: the file raised RuntimeError: boom"),
        ("import no_such_module_here\n", "No module named 'no_such_module_here'"),
        ("PORT = undefined_name\n", "NameError"),
        ("PORT = 1\x00\n", "null bytes"),
    ],
)
def test_broken_files_are_reported_not_raised(text, fragment):
    found = problems(text)
    assert list(found) == [None]
    assert fragment in found[None]


def test_secrets_are_hidden_in_repr_and_to_dict():
    config = load('TOKEN = "abcdefghijklmnopqrstuvwxyz"\n')
    assert "abcdefghij" not in repr(config)
    assert config.to_dict()["TOKEN"] == "***"
    assert config.to_dict(redact=False)["TOKEN"] == "abcdefghijklmnopqrstuvwxyz"
    assert SCHEMA.defaults().to_dict()["TOKEN"] == ""


def test_construction_and_evolve_validate():
    with pytest.raises(SettingsError):
        SCHEMA.config_class(PORT=0)
    config = SCHEMA.defaults()
    with pytest.raises(SettingsError):
        attrs.evolve(config, RATIO=2.0)
    assert attrs.evolve(config, MOUNTS=["/x:/y"]).MOUNTS == ("/x:/y",)


def test_build_rejects_unknown_names():
    with pytest.raises(SettingsError) as info:
        SCHEMA.build({"PORT": 1, "NOPE": 2})
    assert [p.setting for p in info.value.problems] == ["NOPE"]
    assert SCHEMA.build({"PORT": 1}).PORT == 1


def test_template_round_trips_to_defaults():
    text = render_template(SCHEMA)
    assert load(text) == SCHEMA.defaults()
    for setting in SCHEMA.settings.values():
        assert f"{setting.name}: {setting.type_name} = " in text
        assert setting.doc in text
    assert "# Basics" in text and "# Network" in text
    assert "from kohakuriver_proto.settings import LogLevel" in text
    assert all(len(line) <= 110 for line in text.splitlines())


printable = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30)


@given(
    name=printable,
    port=st.integers(1, 65535),
    ratio=st.floats(min_value=1e-6, max_value=1.0),
    enabled=st.booleans(),
    level=st.sampled_from(list(LogLevel)),
    mounts=st.lists(st.from_regex(r"/[a-z0-9 '\"\\]{0,8}:/[a-z]{1,5}(:ro|:rw)?", fullmatch=True), max_size=3),
)
def test_template_round_trips_any_values(name, port, ratio, enabled, level, mounts):
    config = SCHEMA.build(
        {"NAME": name, "PORT": port, "RATIO": ratio, "ENABLED": enabled, "LOG_LEVEL": level, "MOUNTS": mounts}
    )
    assert load(render_template(SCHEMA, config)) == config


def test_schema_rejects_bad_declarations():
    with pytest.raises(ValueError):
        Setting("lower", int, 1, "doc")
    with pytest.raises(ValueError):
        Setting("X", dict, {}, "doc")
    with pytest.raises(SettingsError):  # a default that fails its own check is caught at import time
        Schema(
            class_name="Bad",
            title="t",
            filename="f.py",
            sections=[Section("S", [Setting("P", int, 0, "doc", s.port)])],
        )
    with pytest.raises(ValueError):
        Schema(
            class_name="Bad",
            title="t",
            filename="f.py",
            sections=[Section("S", [Setting("P", int, 1, "doc")])],
            cross_checks=[CrossCheck(("Q",), lambda v: ())],
        )


def test_loglevel():
    assert [m.value for m in LogLevel] == ["full", "debug", "info", "warning", "error"]
    assert LogLevel.FULL.logging_level < LogLevel.DEBUG.logging_level == 10
    assert LogLevel.ERROR.logging_level == 40


def test_overlay_subnet_plan():
    plan = parse_overlay_subnet("10.128.0.0/12/6/14")
    assert str(plan.network) == "10.128.0.0/12"
    assert plan.max_runners == 63 and plan.runner_prefix == 18
    assert parse_overlay_subnet("10.0.0.0/8/8/16").max_runners == 255
    for bad in ("10.0.0.0/25/1/6", "10.0.0.0/8/17/7", "10.0.0.0/8/x/16", "fe80::/8/8/16"):
        with pytest.raises(ValueError):
            parse_overlay_subnet(bad)


@pytest.mark.parametrize("value", ["example.com", "host-1", "10.0.0.5", "::1", "node_1.lab."])
def test_reachable_address_accepts(value):
    s.reachable_address(value)


@pytest.mark.parametrize("value", ["0.0.0.0", "::", "", "http://x", "a b", "-bad"])
def test_reachable_address_rejects(value):
    with pytest.raises(ValueError):
        s.reachable_address(value)


def test_sys_exit_in_a_config_is_reported():
    found = problems("import sys\nsys.exit(3)\n")
    assert "line 2: the file raised SystemExit: 3" in found[None]
