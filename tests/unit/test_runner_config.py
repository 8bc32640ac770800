"""Runner settings: every seed-003 setting exists with its type and default; loading; derived values."""

from __future__ import annotations

from pathlib import Path

import pytest

from kohakuriver_net import paths
from kohakuriver_proto.models import OverlayMode
from kohakuriver_proto.settings import LogLevel, SettingsError, load_settings, render_template
from kohakuriver_runner.config import (
    RUNNER_SCHEMA,
    RunnerConfig,
    load_runner_config,
    runner_config_from,
)

# The tables of the runner-configuration seed (003), copied verbatim: (name, type, default).
SEED_RUNNER_SETTINGS = [
    # Network
    ("RUNNER_BIND_IP", str, "0.0.0.0"),
    ("RUNNER_PORT", int, 8001),
    ("HOST_ADDRESS", str, "127.0.0.1"),
    ("HOST_PORT", int, 8000),
    # Paths
    ("SHARED_DIR", str, "/mnt/cluster-share"),
    ("LOCAL_TEMP_DIR", str, "/tmp/kohakuriver"),
    ("CONTAINER_TAR_DIR", str, ""),
    ("NUMACTL_PATH", str, ""),
    ("RUNNER_LOG_FILE", str, ""),
    # Timing
    ("HEARTBEAT_INTERVAL_SECONDS", int, 5),
    ("RESOURCE_CHECK_INTERVAL_SECONDS", int, 1),
    # Execution
    ("RUNNER_USER", str, ""),
    ("DEFAULT_WORKING_DIR", str, "/shared"),
    # Docker
    ("TASKS_PRIVILEGED", bool, False),
    ("ADDITIONAL_MOUNTS", list[str], []),
    ("DOCKER_IMAGE_SYNC_TIMEOUT", int, 600),
    # Docker network
    ("DOCKER_NETWORK_NAME", str, "kohakuriver-net"),
    ("DOCKER_NETWORK_SUBNET", str, "172.30.0.0/16"),
    ("DOCKER_NETWORK_GATEWAY", str, "172.30.0.1"),
    # Tunnel
    ("TUNNEL_ENABLED", bool, True),
    ("TUNNEL_CLIENT_PATH", str, ""),
    # Snapshot
    ("AUTO_SNAPSHOT_ON_STOP", bool, True),
    ("MAX_SNAPSHOTS_PER_VPS", int, 3),
    ("AUTO_RESTORE_ON_CREATE", bool, True),
    # VM (QEMU/KVM)
    ("VM_IMAGES_DIR", str, "/var/lib/kohakuriver/vm-images"),
    ("VM_INSTANCES_DIR", str, "/var/lib/kohakuriver/vm-instances"),
    ("VM_DEFAULT_MEMORY_MB", int, 4096),
    ("VM_DEFAULT_DISK_SIZE", str, "500G"),
    ("VM_ACS_OVERRIDE", bool, True),
    ("VM_BOOT_TIMEOUT_SECONDS", int, 600),
    ("VM_SSH_READY_TIMEOUT_SECONDS", int, 600),
    ("VM_HEARTBEAT_TIMEOUT_SECONDS", int, 120),
    ("VM_BRIDGE_NAME", str, "kohaku-br0"),
    ("VM_BRIDGE_SUBNET", str, "10.200.0.0/24"),
    ("VM_BRIDGE_GATEWAY", str, "10.200.0.1"),
    # Overlay network
    ("OVERLAY_ENABLED", bool, False),
    ("OVERLAY_SUBNET", str, "10.128.0.0/12/6/14"),
    ("OVERLAY_NETWORK_NAME", str, "kohakuriver-overlay"),
    ("OVERLAY_VXLAN_ID", int, 100),
    ("OVERLAY_VXLAN_PORT", int, 4789),
    ("OVERLAY_MTU", int, 1450),
    # Logging
    ("LOG_LEVEL", LogLevel, LogLevel.INFO),
]

# Settings this design adds to the seed's (DESIGN sections 3, 9 and 11).
ADDED_RUNNER_SETTINGS = [
    ("RUNNER_HOSTNAME", str, ""),
    ("RUNNER_URL", str, ""),
    ("CLUSTER_TOKEN", str, ""),
    ("HOST_USE_TLS", bool, False),
    ("HOST_TLS_CA_FILE", str, ""),
    ("TLS_CERT_FILE", str, ""),
    ("TLS_KEY_FILE", str, ""),
    ("VPS_SSH_PORT_START", int, 2222),
    ("RUNNER_STATE_DIR", str, ""),
    ("DOCKER_SOCKET", str, "/var/run/docker.sock"),
    ("DEFAULT_IMAGE", str, "kohakuriver/kohakuriver-base:base"),
    ("TASK_LOG_MAX_SIZE_MB", int, 100),
    ("TASK_LOG_MAX_FILES", int, 10),
    ("VM_ACCEL", str, "auto"),
    ("OVERLAY_MODE", OverlayMode, OverlayMode.HUB),
    ("OVERLAY_BRIDGE_NAME", str, "kohaku-overlay"),
    ("OVERLAY_VXLAN_NAME", str, "vxlan0"),
    ("OVERLAY_UNDERLAY_ADDRESS", str, ""),
    ("OVERLAY_UNDERLAY_NETNS", str, ""),
]

SEED_EXAMPLE = '''"""KohakuRiver Runner Configuration"""
from kohakuengine import Config
from kohakuriver.models.enums import LogLevel

RUNNER_BIND_IP: str = "0.0.0.0"
RUNNER_PORT: int = 8001
HOST_ADDRESS: str = "192.168.1.100"
HOST_PORT: int = 8000

SHARED_DIR: str = "/mnt/cluster-share"
LOCAL_TEMP_DIR: str = "/tmp/kohakuriver"

TASKS_PRIVILEGED: bool = False
ADDITIONAL_MOUNTS: list[str] = ["/data:/data"]

TUNNEL_ENABLED: bool = True

AUTO_SNAPSHOT_ON_STOP: bool = True
MAX_SNAPSHOTS_PER_VPS: int = 3

VM_IMAGES_DIR: str = "/var/lib/kohakuriver/vm-images"
VM_ACS_OVERRIDE: bool = True

LOG_LEVEL: LogLevel = LogLevel.INFO

def config_gen():
    return Config.from_globals()
'''


@pytest.mark.parametrize(("name", "type_", "default"), SEED_RUNNER_SETTINGS + ADDED_RUNNER_SETTINGS)
def test_setting_exists_with_type_and_default(name, type_, default):
    setting = RUNNER_SCHEMA.settings[name]
    assert setting.type == type_
    assert setting.default == default
    value = getattr(RUNNER_SCHEMA.defaults(), name)
    assert (list(value) if type_ == list[str] else value) == default


def test_no_setting_outside_the_tables():
    expected = {name for name, _, _ in SEED_RUNNER_SETTINGS + ADDED_RUNNER_SETTINGS}
    assert set(RUNNER_SCHEMA.names) == expected


def test_template_round_trip():
    text = render_template(RUNNER_SCHEMA)
    assert load_settings(RUNNER_SCHEMA, text, "runner_config.py") == RUNNER_SCHEMA.defaults()
    assert all(len(line) <= 110 for line in text.splitlines())


def test_seed_example_loads(tmp_path):
    path = tmp_path / "runner_config.py"
    path.write_text(SEED_EXAMPLE)
    config = load_runner_config(str(path))
    assert isinstance(config, RunnerConfig)
    assert config.HOST_ADDRESS == "192.168.1.100"
    assert config.ADDITIONAL_MOUNTS == ("/data:/data",)
    assert config.LOG_LEVEL is LogLevel.INFO


def test_default_path_missing_means_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("KOHAKURIVER_HOME", str(tmp_path))
    assert load_runner_config(None) == RUNNER_SCHEMA.defaults()
    (tmp_path / "runner_config.py").write_text("RUNNER_PORT = 8101\n")
    assert load_runner_config(None).RUNNER_PORT == 8101


def test_explicit_missing_path_is_an_error(tmp_path):
    missing = tmp_path / "nope.py"
    with pytest.raises(SettingsError) as info:
        load_runner_config(str(missing))
    assert str(info.value) == f"{missing}: config file not found"


def test_directory_and_binary_files_are_errors(tmp_path):
    with pytest.raises(SettingsError, match="is a directory"):
        load_runner_config(tmp_path)
    binary = tmp_path / "bin.py"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SettingsError, match="not UTF-8"):
        load_runner_config(binary)


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("RUNER_PORT = 8001", "RUNER_PORT"),
        ("HOST_BIND_IP = '0.0.0.0'", "HOST_BIND_IP"),
        ("RUNNER_PORT = '8001'", "RUNNER_PORT"),
        ("RUNNER_PORT = 0", "RUNNER_PORT"),
        ("HOST_PORT = 70000", "HOST_PORT"),
        ("OVERLAY_VXLAN_PORT = -1", "OVERLAY_VXLAN_PORT"),
        ("RUNNER_BIND_IP = 'localhost'", "RUNNER_BIND_IP"),
        ("HOST_ADDRESS = '0.0.0.0'", "HOST_ADDRESS"),
        ("HEARTBEAT_INTERVAL_SECONDS = 0", "HEARTBEAT_INTERVAL_SECONDS"),
        ("RESOURCE_CHECK_INTERVAL_SECONDS = -1", "RESOURCE_CHECK_INTERVAL_SECONDS"),
        ("DOCKER_IMAGE_SYNC_TIMEOUT = 0", "DOCKER_IMAGE_SYNC_TIMEOUT"),
        ("TASKS_PRIVILEGED = 'false'", "TASKS_PRIVILEGED"),
        ("ADDITIONAL_MOUNTS = ['/data']", "ADDITIONAL_MOUNTS"),
        ("ADDITIONAL_MOUNTS = ['relative:/data']", "ADDITIONAL_MOUNTS"),
        ("DOCKER_NETWORK_SUBNET = '172.30.0.0/33'", "DOCKER_NETWORK_SUBNET"),
        ("DOCKER_NETWORK_GATEWAY = '172.31.0.1'", "DOCKER_NETWORK_GATEWAY"),
        ("DOCKER_NETWORK_NAME = 'bad name'", "DOCKER_NETWORK_NAME"),
        ("VM_BRIDGE_GATEWAY = '10.201.0.1'", "VM_BRIDGE_GATEWAY"),
        ("VM_BRIDGE_SUBNET = '172.30.5.0/24'\nVM_BRIDGE_GATEWAY = '172.30.5.1'", "VM_BRIDGE_SUBNET"),
        ("VM_BRIDGE_NAME = 'a-very-long-bridge-name'", "VM_BRIDGE_NAME"),
        ("VM_DEFAULT_DISK_SIZE = 'big'", "VM_DEFAULT_DISK_SIZE"),
        ("VM_DEFAULT_MEMORY_MB = 0", "VM_DEFAULT_MEMORY_MB"),
        ("MAX_SNAPSHOTS_PER_VPS = -1", "MAX_SNAPSHOTS_PER_VPS"),
        ("OVERLAY_SUBNET = '10.128.0.0/12/6/15'", "OVERLAY_SUBNET"),
        ("OVERLAY_SUBNET = '10.128.0.0/12'", "OVERLAY_SUBNET"),
        ("OVERLAY_VXLAN_ID = 0", "OVERLAY_VXLAN_ID"),
        ("OVERLAY_VXLAN_ID = 16777215", "OVERLAY_VXLAN_ID"),
        ("OVERLAY_MTU = 100", "OVERLAY_MTU"),
        ("OVERLAY_ENABLED = True\nOVERLAY_SUBNET = '172.0.0.0/8/8/16'", "DOCKER_NETWORK_SUBNET"),
        ("OVERLAY_ENABLED = True\nOVERLAY_SUBNET = '10.0.0.0/8/8/16'", "VM_BRIDGE_SUBNET"),
        ("OVERLAY_VXLAN_NAME = 'kohaku-overlay'", "OVERLAY_VXLAN_NAME"),
        ("OVERLAY_BRIDGE_NAME = 'kohaku-br0'", "VM_BRIDGE_NAME"),
        ("OVERLAY_BRIDGE_NAME = 'has space'", "OVERLAY_BRIDGE_NAME"),
        ("OVERLAY_UNDERLAY_ADDRESS = '10.0.0.300'", "OVERLAY_UNDERLAY_ADDRESS"),
        ("OVERLAY_UNDERLAY_ADDRESS = 'fd00::1'", "OVERLAY_UNDERLAY_ADDRESS"),
        ("OVERLAY_UNDERLAY_NETNS = 'a/b'", "OVERLAY_UNDERLAY_NETNS"),
        ("OVERLAY_MODE = 'star'", "OVERLAY_MODE"),
        ("SHARED_DIR = 'relative/dir'", "SHARED_DIR"),
        ("DEFAULT_WORKING_DIR = 'work'", "DEFAULT_WORKING_DIR"),
        ("LOG_LEVEL = 'loud'", "LOG_LEVEL"),
        ("RUNNER_HOSTNAME = 'has space'", "RUNNER_HOSTNAME"),
        ("RUNNER_URL = 'ftp://x'", "RUNNER_URL"),
        ("CLUSTER_TOKEN = 'short'", "CLUSTER_TOKEN"),
        ("TLS_CERT_FILE = '/etc/cert.pem'", "TLS_KEY_FILE"),
        ("VPS_SSH_PORT_START = 0", "VPS_SSH_PORT_START"),
        ("DOCKER_SOCKET = 'docker.sock'", "DOCKER_SOCKET"),
        ("DEFAULT_IMAGE = ''", "DEFAULT_IMAGE"),
        ("VM_ACCEL = 'hvf'", "VM_ACCEL"),
        ("VM_ACCEL = 'KVM'", "VM_ACCEL"),
    ],
)
def test_bad_values_name_the_setting(text, name):
    with pytest.raises(SettingsError) as info:
        load_settings(RUNNER_SCHEMA, text + "\n", "runner_config.py")
    assert [p.setting for p in info.value.problems] == [name]
    assert f"runner_config.py: {name}: " in str(info.value)


def test_unknown_host_setting_gets_a_suggestion():
    with pytest.raises(SettingsError) as info:
        load_settings(RUNNER_SCHEMA, "RUNER_PORT = 8001\n", "runner_config.py")
    assert "did you mean RUNNER_PORT?" in str(info.value)


def test_derived_values():
    config = RUNNER_SCHEMA.defaults()
    assert config.container_tar_dir == Path("/mnt/cluster-share/kohakuriver-containers")
    assert config.state_dir == paths.kohakuriver_home() / "runner" / config.hostname
    assert not config.state_dir.is_relative_to(config.LOCAL_TEMP_DIR)
    assert config.host_url == "http://127.0.0.1:8000"
    assert config.tls_enabled is False
    assert config.log_file is None
    assert config.overlay_subnet.max_runners == 63
    assert config.hostname  # the system host name

    custom = runner_config_from(
        CONTAINER_TAR_DIR="/srv/tars",
        RUNNER_STATE_DIR="/var/lib/kohakuriver/runner",
        HOST_ADDRESS="::1",
        HOST_PORT=9000,
        HOST_USE_TLS=True,
        RUNNER_HOSTNAME="gpu-01",
        RUNNER_URL="http://10.0.0.5:8001/",
    )
    assert custom.container_tar_dir == Path("/srv/tars")
    assert custom.state_dir == Path("/var/lib/kohakuriver/runner")
    assert custom.host_url == "https://[::1]:9000"
    assert custom.hostname == "gpu-01"
    assert custom.runner_url() == "http://10.0.0.5:8001"


def test_runner_url_derivation():
    specific = runner_config_from(RUNNER_BIND_IP="127.0.0.2", RUNNER_PORT=8101)
    assert specific.runner_url() == "http://127.0.0.2:8101"
    routed = runner_config_from(HOST_ADDRESS="127.0.0.1", TLS_CERT_FILE="/c.pem", TLS_KEY_FILE="/k.pem")
    assert routed.runner_url() == "https://127.0.0.1:8001"


def test_tunnel_client_candidates(tmp_path):
    binary = tmp_path / "tunnel-client"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    config = runner_config_from(TUNNEL_CLIENT_PATH=str(binary))
    assert config.tunnel_client_candidates == [binary]
    assert config.find_tunnel_client() == binary
    default = RUNNER_SCHEMA.defaults()
    assert Path("/usr/local/bin/tunnel-client") in default.tunnel_client_candidates
    assert Path("/mnt/cluster-share/bin/tunnel-client") in default.tunnel_client_candidates
    missing = runner_config_from(TUNNEL_CLIENT_PATH=str(tmp_path / "absent"))
    assert missing.find_tunnel_client() is None


def test_two_runners_on_one_machine():
    a = runner_config_from(RUNNER_HOSTNAME="node-a", RUNNER_PORT=8101, RUNNER_STATE_DIR="/tmp/kr-a")
    b = runner_config_from(RUNNER_HOSTNAME="node-b", RUNNER_PORT=8102, RUNNER_STATE_DIR="/tmp/kr-b")
    assert (a.hostname, a.RUNNER_PORT, a.state_dir) != (b.hostname, b.RUNNER_PORT, b.state_dir)
