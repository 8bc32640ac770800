"""The cloud-init NoCloud seed of a VM VPS (kohakuriver_runner/vm_seed.py): documents, key modes, hostile
input, and the ISO read back. Pure, apart from tmp_path for the host key store and ``systemd-escape``."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.models import SshKeyMode
from kohakuriver_runner import vm_seed
from kohakuriver_runner.vm_seed import (
    AGENT_ENV_PATH,
    AGENT_UNIT,
    SSHD_DROP_IN,
    GuestAgent,
    GuestMount,
    GuestNetwork,
    SeedRequest,
    build_seed,
    build_seed_iso,
    mount_unit_name,
    network_config_document,
    read_seed_iso,
    user_data_document,
    vm_hostname,
)
from kohakuriver_runner.vps_files import HostKeyStore, public_host_key
from kohakuriver_runner.vps_spec import sshd_argv

TASK = 1234567890123456
HOST_KEY_STORE_KEY = Ed25519PrivateKey.generate()


def public_key(comment: str = "user@laptop") -> str:
    key = Ed25519PrivateKey.generate().public_key()
    raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{raw} {comment}" if comment else raw


USER_KEY = public_key("alice@laptop")
RUNNER_KEY = public_key("kohakuriver-runner@node1")
SHARED = GuestMount("kohaku_shared", "/shared")
LOCAL = GuestMount("kohaku_local", "/local-temp")
NETWORK = GuestNetwork("10.200.0.10/24", "10.200.0.1", "52:54:00:0a:0b:0c", ("192.0.2.53", "198.51.100.53"))
SECRET = "0123456789abcdef" * 4
AGENT = GuestAgent(
    binary="/usr/local/bin/tunnel-client",
    runner_url="ws://10.200.0.1:8001",
    name=f"kohakuriver-vps-{TASK}",
    secret=SECRET,
    args=("--agent",),
)


@pytest.fixture(scope="module")
def host_key(tmp_path_factory) -> bytes:
    """The VPS's host key as the runner keeps it (the same store a Docker VPS uses)."""
    return HostKeyStore(tmp_path_factory.mktemp("keys")).get_or_create(TASK)


def request(mode: SshKeyMode, host_key: bytes | None, **overrides) -> SeedRequest:
    values = {
        "hostname": vm_hostname(TASK),
        "ssh_key_mode": mode,
        "network": NETWORK,
        "management_public_key": RUNNER_KEY,
        "ssh_public_key": USER_KEY if mode in (SshKeyMode.UPLOAD, SshKeyMode.GENERATE) else None,
        "host_key": host_key,
        "mounts": (SHARED, LOCAL),
        "agent": AGENT,
    }
    values.update(overrides)
    return SeedRequest(**values)


def user_data(files) -> dict:
    """The user-data parsed back: the header line, then one JSON document."""
    header, _, body = files.user_data.decode().partition("\n")
    assert header == "#cloud-config"
    return json.loads(body)


def all_strings(doc):
    if isinstance(doc, str):
        yield doc
    elif isinstance(doc, dict):
        for key, value in doc.items():
            yield key
            yield from all_strings(value)
    elif isinstance(doc, list):
        for value in doc:
            yield from all_strings(value)


def users(doc: dict) -> dict[str, dict]:
    return {user["name"]: user for user in doc["users"]}


def files_by_path(doc: dict) -> dict[str, dict]:
    return {f["path"]: f for f in doc["write_files"]}


# -- the documents ------------------------------------------------------------------------------------------

SSHD_CONF = (
    "# KohakuRiver VPS: public keys only, the VPS's pinned host key.\n"
    "HostKey /etc/ssh/ssh_host_ed25519_key\n"
    "AuthenticationMethods publickey\n"
    "PubkeyAuthentication yes\n"
    "PasswordAuthentication no\n"
    "KbdInteractiveAuthentication no\n"
    "PermitEmptyPasswords no\n"
    "PermitRootLogin prohibit-password\n"
)


def mount_file(unit: str, tag: str, where: str) -> dict:
    return {
        "path": f"/etc/systemd/system/{unit}",
        "content": (
            f"[Unit]\nDescription=KohakuRiver share {tag}\n[Mount]\nWhat={tag}\nWhere={where}\nType=9p\n"
            "Options=trans=virtio,version=9p2000.L,msize=524288\n[Install]\nWantedBy=multi-user.target\n"
        ),
        "owner": "root:root",
        "permissions": "0644",
    }


AGENT_FILES = [
    {
        "path": "/etc/kohakuriver/agent.env",
        "content": (
            "KOHAKURIVER_TUNNEL_URL=ws://10.200.0.1:8001\n"
            f"KOHAKURIVER_CONTAINER_ID=kohakuriver-vps-{TASK}\n"
            f"KOHAKURIVER_TUNNEL_TOKEN={SECRET}\n"
        ),
        "owner": "root:root",
        "permissions": "0600",
    },
    {
        "path": "/etc/systemd/system/kohakuriver-agent.service",
        "content": (
            "[Unit]\nDescription=KohakuRiver guest agent\nWants=network-online.target\n"
            "After=network-online.target\nRequiresMountsFor=/usr/local/bin\nStartLimitIntervalSec=0\n"
            "[Service]\nEnvironmentFile=/etc/kohakuriver/agent.env\n"
            "ExecStart=/usr/local/bin/tunnel-client --agent\nRestart=always\nRestartSec=2\n[Install]\n"
            "WantedBy=multi-user.target\n"
        ),
        "owner": "root:root",
        "permissions": "0644",
    },
]


def test_upload_user_data_is_exactly_the_intended_document(host_key):
    public = public_host_key(host_key)
    doc = user_data(build_seed(request(SshKeyMode.UPLOAD, host_key)))
    assert doc == {
        "hostname": f"vps-{TASK}",
        "preserve_hostname": False,
        "manage_etc_hosts": True,
        "locale": "C.UTF-8",
        "users": [
            {
                "name": "kohaku",
                "gecos": "KohakuRiver VPS user",
                "shell": "/bin/bash",
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "lock_passwd": True,
                "ssh_authorized_keys": [USER_KEY],
            },
            {"name": "root", "lock_passwd": True, "ssh_authorized_keys": [USER_KEY, RUNNER_KEY]},
        ],
        "disable_root": False,
        "ssh_pwauth": False,
        "ssh_deletekeys": True,
        "ssh_genkeytypes": ["ed25519"],
        "ssh_keys": {"ed25519_private": host_key.decode(), "ed25519_public": public},
        "resize_rootfs": True,
        "growpart": {"mode": "auto", "devices": ["/"]},
        "write_files": [
            {"path": SSHD_DROP_IN, "content": SSHD_CONF, "owner": "root:root", "permissions": "0644"},
            mount_file("shared.mount", "kohaku_shared", "/shared"),
            mount_file("local\\x2dtemp.mount", "kohaku_local", "/local-temp"),
            *AGENT_FILES,
        ],
        "runcmd": [
            ["systemctl", "daemon-reload"],
            ["systemctl", "enable", "--now", "shared.mount", "local\\x2dtemp.mount"],
            ["systemctl", "enable", "--now", "kohakuriver-agent.service"],
        ],
    }


def test_the_sshd_options_are_the_docker_vps_ones():
    argv = sshd_argv()
    options = {argv[i + 1].split("=")[0]: argv[i + 1].split("=")[1] for i, a in enumerate(argv) if a == "-o"}
    assert options["PasswordAuthentication"] == "no"
    for name, value in options.items():
        assert f"\n{name} {value}\n" in SSHD_CONF


def test_generate_is_upload_with_the_client_made_key(host_key):
    upload = user_data(build_seed(request(SshKeyMode.UPLOAD, host_key)))
    generate = user_data(build_seed(request(SshKeyMode.GENERATE, host_key)))
    assert upload == generate


def test_none_has_no_user_key_but_keeps_the_runner_key_on_root(host_key):
    doc = user_data(build_seed(request(SshKeyMode.NONE, host_key)))
    accounts = users(doc)
    assert "ssh_authorized_keys" not in accounts["kohaku"]
    assert accounts["root"]["ssh_authorized_keys"] == [RUNNER_KEY]
    assert files_by_path(doc)[SSHD_DROP_IN]["content"] == SSHD_CONF  # sshd runs, keys only
    assert doc["ssh_keys"]["ed25519_public"] == public_host_key(host_key)
    assert (
        "runcmd" in doc and ["systemctl", "mask", "--now", "ssh.service", "ssh.socket"] not in doc["runcmd"]
    )


@pytest.mark.parametrize("with_host_key", [False, True])
def test_disabled_starts_no_sshd_and_installs_no_key(host_key, with_host_key):
    doc = user_data(build_seed(request(SshKeyMode.DISABLED, host_key if with_host_key else None)))
    accounts = users(doc)
    assert all("ssh_authorized_keys" not in user for user in accounts.values())
    paths = files_by_path(doc)
    assert SSHD_DROP_IN not in paths
    assert paths["/etc/ssh/sshd_not_to_be_run"]["content"]
    assert doc["runcmd"][0] == ["systemctl", "mask", "--now", "ssh.service", "ssh.socket"]
    assert RUNNER_KEY.split()[1] not in json.dumps(doc)
    # The image's shared host keys are removed either way.
    assert doc["ssh_deletekeys"] is True
    assert ("ssh_keys" in doc) is with_host_key
    # The agent still runs: it is the way in for terminals.
    assert paths[AGENT_ENV_PATH]["permissions"] == "0600"
    assert ["systemctl", "enable", "--now", AGENT_UNIT] in doc["runcmd"]


@pytest.mark.parametrize("mode", list(SshKeyMode))
def test_no_mode_ever_allows_a_password_login(host_key, mode):
    doc = user_data(build_seed(request(mode, host_key)))
    assert doc["ssh_pwauth"] is False
    assert all(user["lock_passwd"] is True for user in doc["users"])
    text = json.dumps(doc)
    for word in ('passwd":', "plain_text_passwd", "hashed_passwd", "chpasswd", 'password":'):
        assert word not in text.replace("lock_passwd", "")
    if mode is not SshKeyMode.DISABLED:
        assert "\nPasswordAuthentication no\n" in files_by_path(doc)[SSHD_DROP_IN]["content"]


def test_the_vm_presents_the_pinned_host_key(tmp_path):
    store = HostKeyStore(tmp_path)
    private = store.get_or_create(TASK)
    doc = user_data(build_seed(request(SshKeyMode.NONE, private)))
    assert doc["ssh_keys"]["ed25519_private"].encode() == private
    assert doc["ssh_keys"]["ed25519_public"] == store.public_key(TASK)  # what `kr ssh` pins


def test_network_config_matches_the_mac_with_the_callers_dns():
    files = build_seed(request(SshKeyMode.NONE, None, ssh_key_mode=SshKeyMode.DISABLED))
    assert json.loads(files.network_config) == {
        "version": 2,
        "ethernets": {
            "eth0": {
                "match": {"macaddress": "52:54:00:0a:0b:0c"},
                "set-name": "eth0",
                "addresses": ["10.200.0.10/24"],
                "routes": [{"to": "0.0.0.0/0", "via": "10.200.0.1"}],
                "nameservers": {"addresses": ["192.0.2.53", "198.51.100.53"]},
            }
        },
    }


def test_network_config_ipv6_and_without_dns():
    net = GuestNetwork("2001:db8:0:1::10/64", "2001:db8:0:1::1", "52:54:00:00:00:01")
    assert network_config_document(net)["ethernets"]["eth0"] == {
        "match": {"macaddress": "52:54:00:00:00:01"},
        "set-name": "eth0",
        "addresses": ["2001:db8:0:1::10/64"],
        "routes": [{"to": "::/0", "via": "2001:db8:0:1::1"}],
    }


def test_meta_data_and_a_content_addressed_instance_id(host_key):
    files = build_seed(request(SshKeyMode.UPLOAD, host_key))
    meta = json.loads(files.meta_data)
    assert set(meta) == {"instance-id", "local-hostname"}
    assert meta["local-hostname"] == f"vps-{TASK}"
    assert re.fullmatch(rf"kohakuriver-vps-{TASK}-[0-9a-f]{{16}}", meta["instance-id"])
    # Same request, same seed (a plain restart does not re-run cloud-init's per-instance modules) ...
    assert build_seed(request(SshKeyMode.UPLOAD, host_key)) == files
    # ... and a changed seed is a new instance, so cloud-init applies it.
    other_dns = GuestNetwork(NETWORK.address, NETWORK.gateway, NETWORK.mac, ("192.0.2.54",))
    changed = build_seed(request(SshKeyMode.UPLOAD, host_key, network=other_dns))
    assert json.loads(changed.meta_data)["instance-id"] != meta["instance-id"]


def test_without_mounts_and_agent_there_are_no_commands(host_key):
    doc = user_data(build_seed(request(SshKeyMode.NONE, host_key, mounts=(), agent=None)))
    assert "runcmd" not in doc
    assert [f["path"] for f in doc["write_files"]] == [SSHD_DROP_IN]


def test_read_only_share(host_key):
    ro = GuestMount("kohaku_shared", "/mnt/data.set/ro", read_only=True)
    doc = user_data(build_seed(request(SshKeyMode.NONE, host_key, mounts=(ro,), agent=None)))
    unit = files_by_path(doc)["/etc/systemd/system/mnt-data.set-ro.mount"]["content"]
    assert "\nOptions=trans=virtio,version=9p2000.L,msize=524288,ro\n" in unit
    assert "\nWhere=/mnt/data.set/ro\n" in unit


def test_commands_are_argv_lists(host_key):
    for mode in SshKeyMode:
        doc = user_data(build_seed(request(mode, host_key)))
        for command in doc.get("runcmd", []):
            assert isinstance(command, list) and all(isinstance(arg, str) for arg in command)
            assert command[0] == "systemctl"


# -- hostile input ------------------------------------------------------------------------------------------

HOSTILE_COMMENTS = [
    'x": "y", "runcmd": [["rm", "-rf", "/"]], "z": "',
    "#cloud-config",
    "a: b # c",
    "{[&anchor *alias !tag |> ' % @ ` ]}",
    "---",
    "... ---",
    "key: value\\n#cloud-config",
    "é ü 日本 😀 \U0010fffd",
]


@pytest.mark.parametrize("comment", HOSTILE_COMMENTS)
def test_hostile_key_comments_are_carried_as_data(host_key, comment):
    key = public_key(comment)
    files = build_seed(request(SshKeyMode.UPLOAD, host_key, ssh_public_key=key))
    doc = user_data(files)
    assert users(doc)["kohaku"]["ssh_authorized_keys"] == [key]
    # Still exactly one header line, and nothing but the intended top-level keys.
    assert files.user_data.count(b"#cloud-config\n") == 1
    assert files.user_data.startswith(b"#cloud-config\n{")
    assert set(doc) == set(user_data(build_seed(request(SshKeyMode.UPLOAD, host_key))))


@pytest.mark.parametrize("mode", list(SshKeyMode))
def test_yaml_reads_the_files_as_json_does(host_key, mode):
    """cloud-init reads the seed with PyYAML (YAML 1.1). PyYAML is not a dependency of the project; where it
    is installed this checks the claim directly (the character rule is checked without it below)."""
    yaml = pytest.importorskip("yaml")
    for comment in HOSTILE_COMMENTS:
        key = public_key(comment) if mode in (SshKeyMode.UPLOAD, SshKeyMode.GENERATE) else None
        files = build_seed(request(mode, host_key, ssh_public_key=key))
        assert yaml.safe_load(files.user_data) == user_data(files)
        assert yaml.safe_load(files.network_config) == json.loads(files.network_config)
        assert yaml.safe_load(files.meta_data) == json.loads(files.meta_data)


@pytest.mark.parametrize(
    "comment",
    [
        "a\nb",
        "a\r\n#cloud-config",
        "a\x00b",
        "a\tb",
        "a\x85b",  # NEL: a line break to YAML 1.1
        "a\u2028b",
        "a\u2029b",
        "a\ufeffb",
        "a\x9bb",  # C1 control
        "a\x7fb",
    ],
)
def test_key_comments_with_breaks_or_controls_are_refused(comment):
    with pytest.raises(ValidationError) as err:
        request(SshKeyMode.UPLOAD, None, ssh_public_key=public_key(comment))
    assert err.value.field == "ssh_public_key"
    with pytest.raises(ValidationError) as err:
        request(SshKeyMode.NONE, None, management_public_key=public_key(comment))
    assert err.value.field == "management_public_key"


@pytest.mark.parametrize(
    "key",
    [
        "",
        "ssh-ed25519",
        "not-a-type AAAA",
        "ssh-ed25519 !!!notbase64",
        'command="/bin/sh" ' + USER_KEY,
        "-----BEGIN OPENSSH PRIVATE KEY-----",
        USER_KEY + "\n" + USER_KEY,
    ],
)
def test_malformed_user_keys_are_refused(key, host_key):
    with pytest.raises(ValidationError) as err:
        request(SshKeyMode.UPLOAD, host_key, ssh_public_key=key)
    assert err.value.field == "ssh_public_key"


def test_key_mode_rules(host_key):
    with pytest.raises(ValidationError, match="required") as err:
        request(SshKeyMode.GENERATE, host_key, ssh_public_key=None)
    assert err.value.field == "ssh_public_key"
    for mode in (SshKeyMode.NONE, SshKeyMode.DISABLED):
        with pytest.raises(ValidationError) as err:
            request(mode, host_key, ssh_public_key=USER_KEY)
        assert err.value.field == "ssh_public_key"
    for mode in (SshKeyMode.UPLOAD, SshKeyMode.GENERATE, SshKeyMode.NONE):
        with pytest.raises(ValidationError) as err:
            request(mode, None)
        assert err.value.field == "host_key"
    with pytest.raises(ValidationError) as err:
        request("upload", host_key)
    assert err.value.field == "ssh_key_mode"


def test_bad_host_keys_are_refused():
    rsa_like = b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
    ecdsa = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    pkcs8 = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for bad in (b"", b"garbage", rsa_like, ecdsa, pkcs8, "text", RUNNER_KEY.encode()):
        with pytest.raises(ValidationError) as err:
            request(SshKeyMode.NONE, bad)
        assert err.value.field == "host_key"


@pytest.mark.parametrize(
    "hostname",
    ["", "VPS-1", "vps_1", "-vps", "vps-", "a" * 64, "vps.1", "vps\n1", "vps 1", "vps-1\x00", 12],
)
def test_bad_hostnames(hostname):
    with pytest.raises(ValidationError) as err:
        request(SshKeyMode.DISABLED, None, hostname=hostname)
    assert err.value.field == "hostname"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"address": "10.200.0.10"}, "network.address"),
        ({"address": "10.200.0.10/33"}, "network.address"),
        ({"address": "10.200.0.0/24"}, "network.address"),
        ({"address": "10.200.0.255/24"}, "network.address"),
        ({"address": "127.0.0.2/8", "gateway": "127.0.0.1"}, "network.address"),
        ({"address": "10.200.0.10/24\n"}, "network.address"),
        ({"gateway": "10.201.0.1"}, "network.gateway"),
        ({"gateway": "10.200.0.10"}, "network.gateway"),
        ({"gateway": "fe80::1"}, "network.gateway"),
        ({"gateway": "10.200.0.1\nnameserver 1.1.1.1"}, "network.gateway"),
        ({"mac": "52:54:00:0A:0B:0C"}, "network.mac"),
        ({"mac": "53:54:00:0a:0b:0c"}, "network.mac"),
        ({"mac": "00:00:00:00:00:00"}, "network.mac"),
        ({"mac": "52-54-00-0a-0b-0c"}, "network.mac"),
        ({"mac": "52:54:00:0a:0b:0c\n"}, "network.mac"),
        ({"dns_servers": ("127.0.0.53",)}, "network.dns_servers[0]"),
        ({"dns_servers": ("192.0.2.1", "::1")}, "network.dns_servers[1]"),
        ({"dns_servers": ("2001:db8::53",)}, "network.dns_servers[0]"),
        ({"dns_servers": ("192.0.2.1", "192.0.2.1")}, "network.dns_servers[1]"),
        ({"dns_servers": ("0.0.0.0",)}, "network.dns_servers[0]"),
        ({"dns_servers": ("dns.example",)}, "network.dns_servers[0]"),
        ({"dns_servers": ("192.0.2.1\x00",)}, "network.dns_servers[0]"),
        ({"dns_servers": tuple(f"192.0.2.{i}" for i in range(1, 10))}, "network.dns_servers"),
    ],
)
def test_bad_network_settings(kwargs, field):
    values = {"address": "10.200.0.10/24", "gateway": "10.200.0.1", "mac": "52:54:00:0a:0b:0c"}
    values.update(kwargs)
    with pytest.raises(ValidationError) as err:
        GuestNetwork(**values)
    assert err.value.field == field


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tag": ""}, "mount.tag"),
        ({"tag": "kohaku shared"}, "mount.tag"),
        ({"tag": "kohaku\nshared"}, "mount.tag"),
        ({"tag": "kohaku\x00"}, "mount.tag"),
        ({"tag": "-opt"}, "mount.tag"),
        ({"tag": "a" * 32}, "mount.tag"),
        ({"guest_path": "shared"}, "mount.guest_path"),
        ({"guest_path": "/"}, "mount.guest_path"),
        ({"guest_path": "/a/../etc"}, "mount.guest_path"),
        ({"guest_path": "/a//b"}, "mount.guest_path"),
        ({"guest_path": "/a/"}, "mount.guest_path"),
        ({"guest_path": "/sh ared"}, "mount.guest_path"),
        ({"guest_path": "/shared\nWhat=/dev/sda"}, "mount.guest_path"),
        ({"guest_path": "/shared\x00"}, "mount.guest_path"),
        ({"guest_path": "/%h"}, "mount.guest_path"),
        ({"read_only": "yes"}, "mount.read_only"),
    ],
)
def test_bad_mounts(kwargs, field):
    values = {"tag": "kohaku_shared", "guest_path": "/shared"}
    values.update(kwargs)
    with pytest.raises(ValidationError) as err:
        GuestMount(**values)
    assert err.value.field == field


def test_duplicate_mounts(host_key):
    with pytest.raises(ValidationError) as err:
        request(SshKeyMode.NONE, host_key, mounts=(SHARED, GuestMount("kohaku_shared", "/other")))
    assert err.value.field == "mounts[1].tag"
    with pytest.raises(ValidationError) as err:
        request(SshKeyMode.NONE, host_key, mounts=(SHARED, GuestMount("other", "/shared")))
    assert err.value.field == "mounts[1].guest_path"
    with pytest.raises(ValidationError) as err:
        request(SshKeyMode.NONE, host_key, mounts=("kohaku_shared:/shared",))
    assert err.value.field == "mounts[0]"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"binary": "tunnel-client"}, "agent.binary"),
        ({"binary": "/usr/bin/tunnel client"}, "agent.binary"),
        ({"binary": "/usr/bin/x\nExecStartPre=/bin/sh"}, "agent.binary"),
        ({"runner_url": "ws://10.200.0.1:8001\nKOHAKURIVER_TUNNEL_TOKEN=x"}, "agent.runner_url"),
        ({"runner_url": "ws://10.200.0.1:8001 x"}, "agent.runner_url"),
        ({"runner_url": 'ws://"10.200.0.1"'}, "agent.runner_url"),
        ({"runner_url": "ws://$HOST:8001"}, "agent.runner_url"),
        ({"runner_url": "ws://host:8001/%2e"}, "agent.runner_url"),
        ({"runner_url": "ftp://10.200.0.1"}, "agent.runner_url"),
        ({"runner_url": "ws://"}, "agent.runner_url"),
        ({"runner_url": "ws://10.200.0.1:99999"}, "agent.runner_url"),
        ({"runner_url": "10.200.0.1:8001"}, "agent.runner_url"),
        ({"name": "vps 1"}, "agent.name"),
        ({"name": "vps\n1"}, "agent.name"),
        ({"secret": "short"}, "agent.secret"),
        ({"secret": "a" * 40 + " b"}, "agent.secret"),
        ({"secret": "a" * 40 + "\nX=1"}, "agent.secret"),
        ({"args": ("--url", "$X")}, "agent.args[1]"),
        ({"args": ("%n",)}, "agent.args[0]"),
        ({"args": ("a b",)}, "agent.args[0]"),
        ({"args": ("",)}, "agent.args[0]"),
    ],
)
def test_bad_agent_settings(kwargs, field):
    values = {"binary": "/usr/local/bin/tunnel-client", "runner_url": "ws://10.200.0.1:8001", "name": "vps-1"}
    values["secret"] = SECRET
    values.update(kwargs)
    with pytest.raises(ValidationError) as err:
        GuestAgent(**values)
    assert err.value.field == field
    if "secret" in kwargs:
        assert kwargs["secret"] not in str(err.value)


def test_the_agent_secret_is_not_in_reprs():
    assert SECRET not in repr(AGENT)
    assert b"PRIVATE" not in repr(request(SshKeyMode.DISABLED, None)).encode()


# -- hypothesis ---------------------------------------------------------------------------------------------

LABELS = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True)


@given(task_id=st.integers(min_value=0, max_value=2**63 - 1))
def test_vm_hostnames_are_valid(task_id):
    hostname = vm_hostname(task_id)
    req = request(SshKeyMode.DISABLED, None, hostname=hostname)
    assert json.loads(build_seed(req).meta_data)["local-hostname"] == hostname


@given(hostname=st.one_of(LABELS, st.text(max_size=70)))
def test_any_hostname_is_a_label_or_refused(hostname):
    try:
        req = request(SshKeyMode.DISABLED, None, hostname=hostname)
    except ValidationError as err:
        assert err.field == "hostname"
        assert not re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", hostname)
        return
    assert user_data(build_seed(req))["hostname"] == hostname


# What YAML 1.1 (PyYAML, which cloud-init reads with) would not read back as itself.
YAML_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ufeff\ud800-\udfff\ufffe\uffff]")


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(comment=st.text(max_size=80))
def test_any_key_comment_is_refused_or_carried_exactly(host_key, comment):
    key = public_key(comment)
    try:
        req = request(SshKeyMode.UPLOAD, host_key, ssh_public_key=key)
    except ValidationError as err:
        assert err.field == "ssh_public_key"
        assert YAML_UNSAFE.search(comment) or "PRIVATE KEY" in comment
        return
    files = build_seed(req)
    doc = user_data(files)
    expected = " ".join(key.strip().split(None, 2))
    assert users(doc)["kohaku"]["ssh_authorized_keys"] == [expected]
    # Every string that reaches the file is one YAML 1.1 reads as itself, in a JSON document whose
    # separators YAML needs (": " and ", ").
    text = files.user_data.decode()
    assert not YAML_UNSAFE.search(text.replace("\n", ""))
    assert all(not YAML_UNSAFE.search(s) for s in all_strings(doc) if "\n" not in s)


@st.composite
def networks(draw):
    version = draw(st.sampled_from([4, 6]))
    if version == 4:
        prefix = draw(st.integers(min_value=8, max_value=30))
        base = draw(st.integers(min_value=0, max_value=2**32 - 1))
        net = ipaddress.IPv4Network((base, prefix), strict=False)
    else:
        prefix = draw(st.integers(min_value=48, max_value=126))
        base = draw(st.integers(min_value=0, max_value=2**128 - 1))
        net = ipaddress.IPv6Network((base, prefix), strict=False)
    first, last = int(net.network_address) + 1, int(net.broadcast_address) - 1
    host = draw(st.integers(min_value=first, max_value=last))
    gateway = draw(st.integers(min_value=first, max_value=last).filter(lambda g: g != host))
    mac_bytes = draw(st.binary(min_size=6, max_size=6))
    mac = ":".join(f"{b:02x}" for b in bytes([mac_bytes[0] & 0xFE | 0x02]) + mac_bytes[1:])
    dns = draw(
        st.lists(st.integers(min_value=1, max_value=2**net.max_prefixlen - 2), max_size=3, unique=True)
    )
    cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    return (f"{cls(host)}/{prefix}", str(cls(gateway)), mac, tuple(str(cls(d)) for d in dns))


@settings(max_examples=200)
@given(networks())
def test_network_settings_are_refused_or_rendered_exactly(values):
    address, gateway, mac, dns = values
    try:
        net = GuestNetwork(address, gateway, mac, dns)
    except ValidationError as err:
        # Only the special addresses a VM cannot use are refused.
        ip = ipaddress.ip_interface(address).ip
        specials = [ip] + [ipaddress.ip_address(d) for d in dns]
        assert any(a.is_loopback or a.is_multicast or a.is_unspecified for a in specials), err
        return
    nic = json.loads(json.dumps(network_config_document(net)))["ethernets"]["eth0"]
    assert nic["match"] == {"macaddress": mac}
    assert nic["addresses"] == [str(ipaddress.ip_interface(address))]
    assert nic["routes"][0]["via"] == str(ipaddress.ip_address(gateway))
    assert nic.get("nameservers", {"addresses": []})["addresses"] == list(dns)


@pytest.mark.skipif(shutil.which("systemd-escape") is None, reason="needs systemd-escape")
@settings(max_examples=60, deadline=None)
@given(st.lists(st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True), min_size=1, max_size=4))
def test_mount_unit_names_are_what_systemd_expects(parts):
    parts = [p for p in parts if p not in (".", "..")] or ["x"]
    path = "/" + "/".join(parts)
    GuestMount("t", path)
    out = subprocess.run(
        ["systemd-escape", "--path", "--suffix=mount", path], capture_output=True, text=True, check=True
    )
    assert mount_unit_name(path) == out.stdout.strip()


# -- the ISO ------------------------------------------------------------------------------------------------


def test_iso_reads_back_with_the_volume_id_and_the_files_byte_exact(host_key):
    files = build_seed(request(SshKeyMode.UPLOAD, host_key, ssh_public_key=public_key('é 😀 ": #')))
    image = build_seed_iso(files)
    volume, found = read_seed_iso(image)
    assert volume == "cidata"
    assert found == files.as_dict()
    assert len(image) < 128 * 1024  # a few blocks of descriptors and three small files
    assert len(image) % 2048 == 0


def test_iso_has_joliet_names_and_a_joliet_volume_id(host_key):
    import io

    import pycdlib

    files = build_seed(request(SshKeyMode.NONE, host_key))
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(build_seed_iso(files)))
    try:
        assert iso.has_rock_ridge() and iso.has_joliet()
        assert iso.joliet_vd.volume_identifier.decode("utf-16-be").rstrip() == "cidata"
        for name, data in files.as_dict().items():
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, joliet_path=f"/{name}")
            assert out.getvalue() == data
    finally:
        iso.close()


def test_isoinfo_reads_the_seed(host_key, tmp_path):
    """An independent reader (genisoimage's isoinfo, installed by scripts/setup.sh) sees the same files."""
    if shutil.which("isoinfo") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("isoinfo is missing: scripts/setup.sh installs genisoimage")
        pytest.skip("isoinfo (genisoimage) is not installed")
    files = build_seed(request(SshKeyMode.NONE, host_key))
    path = tmp_path / "seed.iso"
    path.write_bytes(build_seed_iso(files))
    info = subprocess.run(["isoinfo", "-d", "-i", str(path)], capture_output=True, text=True, check=True)
    assert "Volume id: cidata" in info.stdout
    for name, data in files.as_dict().items():
        out = subprocess.run(
            ["isoinfo", "-R", "-i", str(path), "-x", f"/{name}"], capture_output=True, check=True
        )
        assert out.stdout == data


def test_module_constants_match_the_documents(host_key):
    doc = user_data_document(request(SshKeyMode.UPLOAD, host_key))
    assert vm_seed.USER in users(doc)
    assert {f["path"] for f in doc["write_files"]} >= {SSHD_DROP_IN, AGENT_ENV_PATH}
