"""A Docker VPS's container spec and the files put into it (pure: no Docker, no file system but tmp_path)."""

from __future__ import annotations

import io
import stat
import tarfile

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kohakuriver_proto.lifecycle import TaskType
from kohakuriver_proto.models import ExecuteRequest, SshKeyMode
from kohakuriver_runner.config import runner_config_from
from kohakuriver_runner.container_spec import (
    LABEL_TASK_TYPE,
    TUNNEL_CLIENT_TARGET,
    NodeFacts,
    TunnelInjection,
    build_container_spec,
)
from kohakuriver_runner.docker_api import Mount, PortBinding
from kohakuriver_runner.vps_files import (
    AUTHORIZED_KEYS,
    HOST_KEY_PATH,
    PRIVSEP_DIR,
    HostKeyStore,
    VpsFile,
    build_archive,
    vps_files,
)
from kohakuriver_runner.vps_spec import (
    KEEPALIVE,
    LABEL_SSH_PORT,
    SSHD,
    build_vps_spec,
    ssh_port_from_labels,
    sshd_argv,
)

IMAGE = "kohakuriver/sshd:latest"
TASK = 987654321012345


def public_key() -> str:
    key = Ed25519PrivateKey.generate().public_key()
    raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return raw.decode() + " user@laptop"


def config(**overrides):
    values = {"RUNNER_HOSTNAME": "node1", "SHARED_DIR": "/mnt/share", "LOCAL_TEMP_DIR": "/scratch/kr"}
    values.update(overrides)
    return runner_config_from(values)


def vps_request(mode: SshKeyMode, **kwargs) -> ExecuteRequest:
    if mode in (SshKeyMode.UPLOAD, SshKeyMode.GENERATE):
        kwargs.setdefault("ssh_public_key", public_key())
    return ExecuteRequest(task_id=TASK, task_type=TaskType.VPS, ssh_key_mode=mode, **kwargs)


def base_spec(req: ExecuteRequest, cfg=None):
    return build_container_spec(req, cfg or config(), NodeFacts(cpu_count=4), IMAGE)


TUNNEL = TunnelInjection(client_path="/opt/kr/tunnel-client", url="ws://172.30.0.1:8001", secret="s3cret")


# -- the main process ------------------------------------------------------------------------------------


def test_sshd_forbids_passwords_whatever_the_image_config_says():
    argv = sshd_argv()
    assert argv[:3] == (SSHD, "-D", "-e")
    options = {argv[i + 1] for i, a in enumerate(argv) if a == "-o"}
    assert {
        "AuthenticationMethods=publickey",
        "PasswordAuthentication=no",
        "KbdInteractiveAuthentication=no",
        "PermitEmptyPasswords=no",
        "PermitRootLogin=prohibit-password",
    } <= options
    assert argv[-2:] == ("-h", HOST_KEY_PATH)


@pytest.mark.parametrize("mode", [SshKeyMode.UPLOAD, SshKeyMode.GENERATE, SshKeyMode.NONE])
def test_ssh_modes_run_sshd_and_publish_22(mode):
    req = vps_request(mode)
    s = build_vps_spec(base_spec(req), req, ssh_port=2223, bind_ip="127.0.0.1")
    assert s.cmd == sshd_argv()
    assert s.entrypoint == ()
    assert s.ports == {22: PortBinding("127.0.0.1", 2223)}
    body = s.to_api()
    assert body["HostConfig"]["PortBindings"] == {"22/tcp": [{"HostIp": "127.0.0.1", "HostPort": "2223"}]}
    assert body["Entrypoint"] == [""]  # the image's entrypoint cannot reinterpret sshd's argv
    assert s.labels[LABEL_SSH_PORT] == "2223"
    assert ssh_port_from_labels(s.labels) == 2223
    assert s.labels[LABEL_TASK_TYPE] == "vps"
    assert s.name == f"kohakuriver-task-{TASK}"
    assert s.hostname == f"vps-{TASK}"


def test_sshd_runs_as_root_even_with_runner_user():
    req = vps_request(SshKeyMode.NONE)
    base = base_spec(req, config(RUNNER_USER="1000:1000"))
    assert base.user == "1000:1000"
    assert build_vps_spec(base, req, ssh_port=2222, bind_ip="0.0.0.0").user is None


def test_tunnel_client_wraps_sshd():
    req = vps_request(SshKeyMode.UPLOAD)
    s = build_vps_spec(base_spec(req), req, ssh_port=2222, bind_ip="127.0.0.1", tunnel=TUNNEL)
    assert s.entrypoint == (TUNNEL_CLIENT_TARGET, "--exec", "--")
    assert s.cmd == sshd_argv()
    assert s.env["KOHAKURIVER_TUNNEL_TOKEN"] == "s3cret"
    assert Mount("/opt/kr/tunnel-client", TUNNEL_CLIENT_TARGET, read_only=True) in s.mounts


def test_disabled_has_no_sshd_and_no_port():
    req = vps_request(SshKeyMode.DISABLED)
    s = build_vps_spec(base_spec(req), req, ssh_port=None, bind_ip="127.0.0.1")
    assert s.ports == {} and LABEL_SSH_PORT not in s.labels
    assert s.entrypoint == () and s.cmd == KEEPALIVE
    # With the tunnel client injected, the client itself is the keep-alive (nothing needed from the image).
    t = build_vps_spec(base_spec(req), req, ssh_port=None, bind_ip="127.0.0.1", tunnel=TUNNEL)
    assert t.entrypoint == (TUNNEL_CLIENT_TARGET,) and t.cmd == ()
    assert t.env["KOHAKURIVER_CONTAINER_ID"] == t.name
    assert "ExposedPorts" not in t.to_api()


def test_missing_key_mode_means_disabled():
    req = ExecuteRequest(task_id=TASK, task_type=TaskType.VPS)
    assert build_vps_spec(base_spec(req), req, ssh_port=None, bind_ip="127.0.0.1").cmd == KEEPALIVE


def test_ssh_without_port_is_a_bug():
    req = vps_request(SshKeyMode.NONE)
    with pytest.raises(ValueError, match="SSH port"):
        build_vps_spec(base_spec(req), req, ssh_port=None, bind_ip="127.0.0.1")


def test_resources_and_mounts_are_the_command_task_ones():
    req = vps_request(SshKeyMode.NONE, required_cores=2, required_memory_bytes=1 << 30)
    base = base_spec(req)
    s = build_vps_spec(base, req, ssh_port=2222, bind_ip="127.0.0.1")
    assert (s.nano_cpus, s.memory_bytes, s.mounts, s.network, s.init) == (
        base.nano_cpus,
        base.memory_bytes,
        base.mounts,
        base.network,
        base.init,
    )


@pytest.mark.parametrize("text", ["", "0", "70000", "22x", "-1", "²"])
def test_bad_port_labels_are_ignored(text):
    assert ssh_port_from_labels({LABEL_SSH_PORT: text}) is None


# -- the files put into it -------------------------------------------------------------------------------


def read_archive(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: m for m in tar.getmembers()}


def archive_text(data: bytes, name: str) -> str:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        f = tar.extractfile(name)
        assert f is not None
        return f.read().decode()


def test_archive_with_key_modes_and_owner():
    key = public_key()
    data = build_archive(vps_files(key, b"HOSTKEY"))
    members = read_archive(data)
    assert set(members) == {PRIVSEP_DIR[1:], HOST_KEY_PATH[1:], "root/.ssh", AUTHORIZED_KEYS[1:]}
    assert "root" not in members  # /root keeps the image's own (private) mode
    ssh_dir, keys = members["root/.ssh"], members["root/.ssh/authorized_keys"]
    assert ssh_dir.isdir() and stat.S_IMODE(ssh_dir.mode) == 0o700
    assert keys.isfile() and stat.S_IMODE(keys.mode) == 0o600
    assert stat.S_IMODE(members[HOST_KEY_PATH[1:]].mode) == 0o600
    assert members[PRIVSEP_DIR[1:]].isdir() and stat.S_IMODE(members[PRIVSEP_DIR[1:]].mode) == 0o755
    assert all(m.uid == 0 and m.gid == 0 for m in members.values())
    assert archive_text(data, "root/.ssh/authorized_keys") == key + "\n"


def test_archive_without_key_has_no_authorized_keys():
    members = read_archive(build_archive(vps_files(None, b"HOSTKEY")))
    assert set(members) == {"run/sshd", "etc/ssh/kohakuriver_host_ed25519_key"}


@pytest.mark.parametrize("path", ["relative", "/a/../b", "/a//b", "/a/./b", "/"])
def test_unclean_paths_are_refused(path):
    with pytest.raises(ValueError):
        VpsFile(path, 0o600, b"")


def test_host_key_is_kept_private_and_stable(tmp_path):
    store = HostKeyStore(tmp_path / "keys")
    first = store.get_or_create(42)
    assert first.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    key = serialization.load_ssh_private_key(first, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    assert stat.S_IMODE(store.path(42).stat().st_mode) == 0o600
    assert store.get_or_create(42) == first  # the VPS's identity survives a re-create
    assert HostKeyStore(tmp_path / "keys").get_or_create(43) != first
