"""Host settings: names, types and defaults; auth always on; impossible values; derived values."""

from __future__ import annotations

from pathlib import Path

import pytest

from kohakuriver_host.config import HOST_SCHEMA, HostConfig, host_config_from, load_host_config
from kohakuriver_proto.models import OverlayMode
from kohakuriver_proto.settings import LogLevel, SettingsError, load_settings, render_template

# The original host's settings (inventory 5.1) as this project keeps them, plus the additions.
HOST_SETTINGS = [
    ("HOST_BIND_IP", str, "0.0.0.0"),
    ("HOST_PORT", int, 8000),
    ("HOST_SSH_PROXY_PORT", int, 8002),
    ("HOST_REACHABLE_ADDRESS", str, "127.0.0.1"),
    ("SHARED_DIR", str, "/mnt/cluster-share"),
    ("DB_FILE", str, "/var/lib/kohakuriver/kohakuriver.db"),
    ("CONTAINER_DIR", str, ""),
    ("HOST_LOG_FILE", str, ""),
    ("HEARTBEAT_INTERVAL_SECONDS", int, 5),
    ("HEARTBEAT_TIMEOUT_FACTOR", int, 6),
    ("CLEANUP_CHECK_INTERVAL_SECONDS", int, 10),
    ("DEFAULT_CONTAINER_NAME", str, "kohakuriver-base"),
    ("INITIAL_BASE_IMAGE", str, "python:3.12-alpine"),
    ("TASKS_PRIVILEGED", bool, False),
    ("ADDITIONAL_MOUNTS", list[str], []),
    ("DEFAULT_WORKING_DIR", str, "/shared"),
    ("ENV_CONTAINER_CPU_LIMIT", float, 0.25),
    ("ENV_CONTAINER_MEM_LIMIT", float, 0.25),
    ("LOG_LEVEL", LogLevel, LogLevel.INFO),
    ("OVERLAY_ENABLED", bool, False),
    ("OVERLAY_SUBNET", str, "10.128.0.0/12/6/14"),
    ("OVERLAY_VXLAN_ID", int, 100),
    ("OVERLAY_VXLAN_PORT", int, 4789),
    ("OVERLAY_MTU", int, 1450),
    ("OVERLAY_MODE", OverlayMode, OverlayMode.HUB),
    ("AUTH_ENABLED", bool, True),
    ("ADMIN_SECRET", str, ""),
    ("ADMIN_REGISTER_SECRET", str, ""),
    ("SESSION_EXPIRE_HOURS", int, 720),
    # Added by this design.
    ("CLUSTER_TOKEN", str, ""),
    ("CREDENTIALS_FILE", str, ""),
    ("TLS_CERT_FILE", str, ""),
    ("TLS_KEY_FILE", str, ""),
    ("SSH_PROXY_HANDSHAKE_TIMEOUT_SECONDS", float, 10.0),
    ("SSH_PROXY_MAX_PENDING_HANDSHAKES", int, 64),
    ("FORWARD_CONNECT_TIMEOUT_SECONDS", float, 10.0),
]


@pytest.mark.parametrize(("name", "type_", "default"), HOST_SETTINGS)
def test_setting_exists_with_type_and_default(name, type_, default):
    setting = HOST_SCHEMA.settings[name]
    assert setting.type == type_
    assert setting.default == default


def test_no_other_settings():
    assert set(HOST_SCHEMA.names) == {name for name, _, _ in HOST_SETTINGS}


def test_template_round_trip():
    text = render_template(HOST_SCHEMA)
    config = load_settings(HOST_SCHEMA, text, "host_config.py")
    assert config == HOST_SCHEMA.defaults()
    assert isinstance(config, HostConfig)
    assert all(len(line) <= 110 for line in text.splitlines())


def test_auth_cannot_be_disabled():
    with pytest.raises(SettingsError) as info:
        load_settings(HOST_SCHEMA, "AUTH_ENABLED = False\n", "host_config.py")
    assert "host_config.py: AUTH_ENABLED: authentication cannot be turned off" in str(info.value)
    assert load_settings(HOST_SCHEMA, "AUTH_ENABLED = True\n", "host_config.py").AUTH_ENABLED is True


def test_legacy_host_file_loads():
    text = (
        "from kohakuengine import Config\n"
        "from kohakuriver.models.enums import LogLevel\n"
        "HOST_REACHABLE_ADDRESS = '192.168.1.10'\n"
        "LOG_LEVEL = LogLevel.DEBUG\n"
        "AUTH_ENABLED = True\n"
        "def config_gen():\n"
        "    return Config.from_globals()\n"
    )
    config = load_settings(HOST_SCHEMA, text, "host_config.py")
    assert config.HOST_REACHABLE_ADDRESS == "192.168.1.10" and config.LOG_LEVEL is LogLevel.DEBUG


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("HOST_PROT = 8000", "HOST_PROT"),
        ("HOST_PORT = 0", "HOST_PORT"),
        ("HOST_PORT = 8002", "HOST_SSH_PROXY_PORT"),
        ("HOST_SSH_PROXY_PORT = 99999", "HOST_SSH_PROXY_PORT"),
        ("HOST_BIND_IP = 'any'", "HOST_BIND_IP"),
        ("HOST_REACHABLE_ADDRESS = '0.0.0.0'", "HOST_REACHABLE_ADDRESS"),
        ("OVERLAY_ENABLED = True\nHOST_REACHABLE_ADDRESS = 'host.lab'", "HOST_REACHABLE_ADDRESS"),
        ("HEARTBEAT_INTERVAL_SECONDS = 0", "HEARTBEAT_INTERVAL_SECONDS"),
        ("HEARTBEAT_TIMEOUT_FACTOR = 0", "HEARTBEAT_TIMEOUT_FACTOR"),
        ("CLEANUP_CHECK_INTERVAL_SECONDS = -5", "CLEANUP_CHECK_INTERVAL_SECONDS"),
        ("ENV_CONTAINER_CPU_LIMIT = 0", "ENV_CONTAINER_CPU_LIMIT"),
        ("ENV_CONTAINER_MEM_LIMIT = 1.5", "ENV_CONTAINER_MEM_LIMIT"),
        ("ENV_CONTAINER_MEM_LIMIT = '0.5'", "ENV_CONTAINER_MEM_LIMIT"),
        ("DEFAULT_CONTAINER_NAME = 'My Env'", "DEFAULT_CONTAINER_NAME"),
        ("ADDITIONAL_MOUNTS = ['/a']", "ADDITIONAL_MOUNTS"),
        ("OVERLAY_SUBNET = '10.128.0.0/12/6'", "OVERLAY_SUBNET"),
        ("OVERLAY_VXLAN_ID = 16777200", "OVERLAY_VXLAN_ID"),
        ("OVERLAY_MTU = 10000", "OVERLAY_MTU"),
        ("SESSION_EXPIRE_HOURS = 0", "SESSION_EXPIRE_HOURS"),
        ("ADMIN_SECRET = 'admin'", "ADMIN_SECRET"),
        ("CLUSTER_TOKEN = 'with space in the middle!'", "CLUSTER_TOKEN"),
        ("TLS_KEY_FILE = '/k.pem'", "TLS_CERT_FILE"),
        ("SSH_PROXY_HANDSHAKE_TIMEOUT_SECONDS = 0", "SSH_PROXY_HANDSHAKE_TIMEOUT_SECONDS"),
        ("SSH_PROXY_MAX_PENDING_HANDSHAKES = 0", "SSH_PROXY_MAX_PENDING_HANDSHAKES"),
        ("FORWARD_CONNECT_TIMEOUT_SECONDS = -1", "FORWARD_CONNECT_TIMEOUT_SECONDS"),
        ("DB_FILE = ''", "DB_FILE"),
        ("LOG_LEVEL = 'trace'", "LOG_LEVEL"),
    ],
)
def test_bad_values_name_the_setting(text, name):
    with pytest.raises(SettingsError) as info:
        load_settings(HOST_SCHEMA, text + "\n", "host_config.py")
    assert [p.setting for p in info.value.problems] == [name]
    assert f"{name}: " in str(info.value)


def test_small_timeouts_for_tests_are_fine():
    config = host_config_from(SSH_PROXY_HANDSHAKE_TIMEOUT_SECONDS=0.5, FORWARD_CONNECT_TIMEOUT_SECONDS=1)
    assert config.SSH_PROXY_HANDSHAKE_TIMEOUT_SECONDS == 0.5
    assert config.FORWARD_CONNECT_TIMEOUT_SECONDS == 1.0


def test_secrets_are_redacted():
    config = host_config_from(CLUSTER_TOKEN="x" * 32, ADMIN_SECRET="y" * 20)
    assert "x" * 32 not in repr(config) and "y" * 20 not in repr(config)
    assert config.to_dict()["CLUSTER_TOKEN"] == "***"
    assert config.CLUSTER_TOKEN == "x" * 32


def test_derived_values(tmp_path, monkeypatch):
    monkeypatch.setenv("KOHAKURIVER_HOME", str(tmp_path / "home"))
    config = HOST_SCHEMA.defaults()
    assert config.container_dir == Path("/mnt/cluster-share/kohakuriver-containers")
    assert config.db_path == Path("/var/lib/kohakuriver/kohakuriver.db")
    assert config.cluster_token_file == Path("/var/lib/kohakuriver/cluster_token")
    assert config.credentials_file == tmp_path / "home" / "credentials.json"
    assert config.heartbeat_timeout_seconds == 30.0
    assert config.public_url == "http://127.0.0.1:8000"
    assert config.tls_enabled is False
    assert config.log_file is None
    assert config.overlay_subnet.max_runners == 63

    custom = host_config_from(
        CONTAINER_DIR="/srv/envs",
        DB_FILE=str(tmp_path / "db" / "kr.db"),
        CREDENTIALS_FILE=str(tmp_path / "creds.json"),
        HOST_REACHABLE_ADDRESS="fd00::1",
        TLS_CERT_FILE="/c.pem",
        TLS_KEY_FILE="/k.pem",
    )
    assert custom.container_dir == Path("/srv/envs")
    assert custom.cluster_token_file == tmp_path / "db" / "cluster_token"
    assert custom.credentials_file == tmp_path / "creds.json"
    assert custom.public_url == "https://[fd00::1]:8000"


def test_load_host_config_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("KOHAKURIVER_HOME", str(tmp_path))
    assert load_host_config() == HOST_SCHEMA.defaults()
    (tmp_path / "host_config.py").write_text("HOST_PORT = 18000\n")
    assert load_host_config().HOST_PORT == 18000
    other = tmp_path / "other.py"
    other.write_text("HOST_PORT = 18001\n")
    assert load_host_config(other).HOST_PORT == 18001
    with pytest.raises(SettingsError, match="config file not found"):
        load_host_config(tmp_path / "missing.py")
