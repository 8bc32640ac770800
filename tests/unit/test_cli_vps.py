"""``kr vps``: key-mode choice, option -> VpsSpec mapping, the generated private key's file and mode (with a
temporary HOME), and what each subcommand sends to the host (``FakeHost``, no server)."""

from __future__ import annotations

import json
import stat

import click
import pytest
from cryptography.hazmat.primitives import serialization

from kohakuriver_cli import ssh_cmd
from kohakuriver_cli.ssh_keys import generate_ed25519
from kohakuriver_cli.vps_cmd import KeyChoice, build_vps_spec, choose_key, create_body
from kohakuriver_proto.models import SshKeyMode

from . import test_cli_client
from .test_cli_client import FakeHost, assert_one_line_error, error_reply

kr_home = test_cli_client.kr_home
host = test_cli_client.host

VPS_ID = "7301"


def new_public_key(comment: str = "me@laptop") -> str:
    return generate_ed25519(comment=comment)[1]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A temporary HOME (``~/.ssh`` lives there) without any key."""
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("HOME", str(path))
    return path


@pytest.fixture
def user_key(home) -> str:
    ssh = home / ".ssh"
    ssh.mkdir(mode=0o700)
    key = new_public_key()
    (ssh / "id_ed25519.pub").write_text(key + "\n")
    return key


def accept(host: FakeHost, task_id: str = VPS_ID) -> None:
    host.on("POST", "/api/vps/create", {"task_id": task_id, "message": f"VPS {task_id} created"}, status=202)


def record(status: str = "running", **fields) -> dict:
    data = {
        "task_id": VPS_ID,
        "task_type": "vps",
        "status": status,
        "submitted_at": "2025-04-10T08:30:00Z",
        "assigned_node": "n1",
        "ssh_port": 2222,
        "ssh_key_mode": "upload",
        "vps_backend": "docker",
        "required_cores": 2,
        "name": "box",
    }
    data.update(fields)
    return data


# -- key modes -----------------------------------------------------------------------------------------------


def test_default_mode_uploads_the_users_own_key(user_key, home):
    choice = choose_key()
    assert choice.mode is SshKeyMode.UPLOAD and choice.public_key == user_key
    assert choice.source == str(home / ".ssh" / "id_ed25519.pub") and choice.private_key is None


def test_default_mode_without_a_key_suggests_the_alternatives(home):
    with pytest.raises(click.UsageError) as exc:
        choose_key()
    assert "--gen-ssh-key" in exc.value.message and "--no-ssh-key" in exc.value.message


def test_explicit_modes():
    assert choose_key(ssh=False) == KeyChoice(SshKeyMode.DISABLED)
    assert choose_key(no_key=True) == KeyChoice(SshKeyMode.NONE)
    key = new_public_key()
    assert choose_key(public_key_string=f"  {key}\n") == KeyChoice(
        SshKeyMode.UPLOAD, key, source="--public-key-string"
    )
    generated = choose_key(gen_key=True)
    assert generated.mode is SshKeyMode.GENERATE and generated.public_key.startswith("ssh-ed25519 ")
    private = serialization.load_ssh_private_key(generated.private_key, password=None)
    public = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    assert generated.public_key.split()[:2] == public.decode().split()  # the pair belongs together
    assert "PRIVATE" not in repr(generated)  # never printed by accident


def test_public_key_file(tmp_path):
    key = new_public_key()
    path = tmp_path / "k.pub"
    path.write_text(key + "\n")
    assert choose_key(public_key_file=str(path)).public_key == key
    path.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    with pytest.raises(click.BadParameter) as exc:
        choose_key(public_key_file=str(path))
    assert exc.value.param_hint == "'--public-key-file'"
    with pytest.raises(click.BadParameter):
        choose_key(public_key_file=str(tmp_path / "missing.pub"))


@pytest.mark.parametrize(
    "options",
    [
        {"gen_key": True, "no_key": True},
        {"public_key_string": "x", "public_key_file": "y"},
        {"ssh": False, "gen_key": True},
        {"ssh": False, "no_key": True},
        {"key_out_file": "/tmp/k"},
        {"no_key": True, "key_out_file": "/tmp/k"},
    ],
)
def test_contradicting_key_options_are_usage_errors(options):
    with pytest.raises(click.UsageError):
        choose_key(**options)


def test_bad_public_key_string_names_the_option():
    with pytest.raises(click.BadParameter) as exc:
        choose_key(public_key_string="ssh-ed25519 not-base64!")
    assert exc.value.param_hint == "'--public-key-string'"


# -- options -> VpsSpec --------------------------------------------------------------------------------------


def test_options_map_onto_the_spec():
    key = KeyChoice(SshKeyMode.UPLOAD, new_public_key())
    spec = build_vps_spec(
        target="n1:0",
        cores=4,
        memory="2G",
        gpus="0,1",
        image="kohakuriver/sshd:latest",
        name="dev",
        privileged=True,
        mounts=["/data:/data:ro"],
        key=key,
    )
    body = create_body(spec, key)
    assert body["target"] == "n1:0" and body["required_cores"] == 4
    assert body["required_memory_bytes"] == 2 << 30 and body["required_gpus"] == [0, 1]
    assert body["registry_image"] == "kohakuriver/sshd:latest" and body["container_name"] is None
    assert body["privileged"] is True and body["additional_mounts"] == ["/data:/data:ro"]
    assert body["ssh_key_mode"] == "upload" and body["ssh_public_key"] == key.public_key
    assert body["vps_backend"] == "docker" and body["name"] == "dev"
    env = build_vps_spec(container="my-env", key=KeyChoice(SshKeyMode.NONE))
    assert create_body(env, KeyChoice(SshKeyMode.NONE))["container_name"] == "my-env"


def test_generated_key_is_sent_with_mode_generate():
    key = KeyChoice(SshKeyMode.GENERATE, new_public_key("kohakuriver"), b"secret", "generated")
    body = create_body(build_vps_spec(key=key), key)
    assert body["ssh_key_mode"] == "generate" and body["ssh_public_key"] == key.public_key
    assert "secret" not in json.dumps(body)


@pytest.mark.parametrize(
    ("options", "hint"),
    [
        ({"target": "n1:x"}, "'-t' / '--target'"),
        ({"gpus": "0"}, "'--gpus'"),  # GPU ids need a target node
        ({"memory": "lots"}, "'-m' / '--memory'"),
        ({"mounts": ["relative:/x"]}, "'--mount'"),
        ({"image": "a", "container": "b"}, "'--image'"),
        ({"image": "Bad Image"}, "'--image'"),
    ],
)
def test_invalid_options_name_the_option(options, hint):
    with pytest.raises(click.BadParameter) as exc:
        build_vps_spec(**options)
    assert exc.value.param_hint == hint


# -- kr vps create -------------------------------------------------------------------------------------------


def test_create_uploads_the_default_key(host, user_key):
    accept(host)
    result = host.invoke("vps", "create", "-t", "n1", "-c", "2", "--image", "kohakuriver/sshd:latest")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{VPS_ID}\n"
    body = host.body("POST", "/api/vps/create")
    assert body["ssh_key_mode"] == "upload" and body["ssh_public_key"] == user_key
    assert body["target"] == "n1" and body["required_cores"] == 2
    assert f"kr vps connect {VPS_ID}" in result.stderr and "id_ed25519.pub" in result.stderr


def test_gen_ssh_key_writes_the_private_key_0600_after_the_host_answered(host, home):
    accept(host)
    result = host.invoke("vps", "create", "--gen-ssh-key")
    assert result.exit_code == 0, result.output
    body = host.body("POST", "/api/vps/create")
    assert body["ssh_key_mode"] == "generate" and body["ssh_public_key"].startswith("ssh-ed25519 ")
    path = home / ".ssh" / f"kohakuriver_{VPS_ID}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    private = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    public = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    assert body["ssh_public_key"].split()[:2] == public.decode().split()
    assert "PRIVATE KEY" not in result.output and str(path) in result.stderr


def test_key_out_file(host, home, tmp_path):
    accept(host)
    out = tmp_path / "keys" / "vps_key"
    result = host.invoke("vps", "create", "--gen-ssh-key", "--key-out-file", str(out))
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert not (home / ".ssh" / f"kohakuriver_{VPS_ID}").exists()
    assert f"--key {out}" in result.stderr
    # An existing file is never overwritten, and the VPS is not created then.
    result = host.invoke("vps", "create", "--gen-ssh-key", "--key-out-file", str(out))
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert len(host.calls("POST", "/api/vps/create")) == 1


def test_no_ssh_and_no_ssh_key(host, home):
    accept(host)
    assert host.invoke("vps", "create", "--no-ssh").exit_code == 0
    body = host.body("POST", "/api/vps/create")
    assert body["ssh_key_mode"] == "disabled" and body["ssh_public_key"] is None
    result = host.invoke("vps", "create", "--no-ssh-key")
    assert result.exit_code == 0
    body = host.body("POST", "/api/vps/create")
    assert body["ssh_key_mode"] == "none" and body["ssh_public_key"] is None
    assert "none injected" in result.stderr


def test_create_without_any_key_fails_before_asking_the_host(host, home):
    result = host.invoke("vps", "create")
    assert result.exit_code == 2 and "--gen-ssh-key" in result.stderr
    assert host.requests == []


def test_create_refused_by_the_host_is_one_line(host, user_key):
    message = "this task can never run: needs 64 cores,\nnode 'n1' has 8"
    host.on("POST", "/api/vps/create", error_reply(400, "invalid", message, "target"))
    result = host.invoke("vps", "create", "-t", "n1", "-c", "64")
    assert_one_line_error(result, 1, "target: this task can never run: needs 64 cores, node 'n1' has 8")


def test_create_wait(host, user_key):
    accept(host)
    host.on_each("GET", f"/api/status/{VPS_ID}", record("assigning"), record("running"))
    result = host.invoke("vps", "create", "--wait")
    assert result.exit_code == 0, result.output
    assert "running on n1, ssh port 2222" in result.stderr
    host.on_each("GET", f"/api/status/{VPS_ID}", record("failed", error_message="no such image"))
    result = host.invoke("vps", "create", "--wait")
    assert result.exit_code == 1 and "no such image" in result.stderr


# -- the other subcommands -----------------------------------------------------------------------------------


def test_list_and_status(host):
    host.on("GET", "/api/vps", {"vps": [record()], "limit": 1000, "offset": 0, "has_more": False})
    result = host.invoke("vps", "list", "-a", "-s", "running")
    assert result.exit_code == 0, result.output
    assert VPS_ID in result.stdout and "2222" in result.stdout and "upload" in result.stdout
    (call,) = host.calls("GET", "/api/vps")
    assert call.url.params["all"] == "1" and call.url.params["status"] == "running"
    assert host.invoke("vps", "list", "-q").stdout == f"{VPS_ID}\n"
    host.on("GET", f"/api/vps/{VPS_ID}", record())
    result = host.invoke("vps", "status", VPS_ID)
    assert (
        result.exit_code == 0
        and "SSH key mode" in result.stdout
        and f"kr vps connect {VPS_ID}" in result.stdout
    )
    assert json.loads(host.invoke("vps", "status", VPS_ID, "--json").stdout) == record()
    host.on("GET", "/api/vps/9", error_reply(404, "not_found", "no VPS 9"))
    assert_one_line_error(host.invoke("vps", "status", "9"), 3, "no VPS 9")
    assert host.invoke("vps", "status", "abc").exit_code == 2


@pytest.mark.parametrize("action", ["stop", "restart", "pause", "resume"])
def test_control_commands(host, action):
    path = f"/api/vps/{VPS_ID}/{action}"
    host.on("POST", path, {"task_id": VPS_ID, "status": "running", "message": f"VPS {VPS_ID}: {action} ok"})
    result = host.invoke("vps", action, VPS_ID)
    assert result.exit_code == 0, result.output
    assert f"{action} ok" in result.stdout and len(host.calls("POST", path)) == 1


def test_snapshots(host):
    base = f"/api/vps/{VPS_ID}/snapshots"
    snaps = [
        {
            "tag": f"kohakuriver-snapshot/vps-{VPS_ID}:1700000001",
            "created_at": "2025-04-10T08:30:00Z",
            "size_bytes": 2048,
        },
        {
            "tag": f"kohakuriver-snapshot/vps-{VPS_ID}:1700000000",
            "created_at": "2025-04-10T08:00:00Z",
            "size_bytes": 1024,
        },
    ]
    host.on("GET", base, {"task_id": VPS_ID, "snapshots": snaps})
    result = host.invoke("vps", "snapshot", "list", VPS_ID)
    assert result.exit_code == 0 and result.stdout.index("1700000001") < result.stdout.index("1700000000")
    host.on("POST", base, snaps[0], status=201)
    result = host.invoke("vps", "snapshot", "create", VPS_ID)
    assert result.exit_code == 0 and result.stdout == snaps[0]["tag"] + "\n"
    host.on("DELETE", f"{base}/1700000000", {"task_id": VPS_ID, "timestamp": 1700000000, "deleted": True})
    result = host.invoke("vps", "snapshot", "delete", VPS_ID, "1700000000")
    assert result.exit_code == 0 and len(host.calls("DELETE", f"{base}/1700000000")) == 1
    assert host.invoke("vps", "snapshot", "delete", VPS_ID, "latest").exit_code == 2


def test_connect_is_kr_ssh(host, monkeypatch):
    seen = {}

    def fake_ssh_to_task(cli_ctx, task_id, **kwargs):
        seen.update(task_id=task_id, **kwargs)
        return 7

    monkeypatch.setattr(ssh_cmd, "ssh_to_task", fake_ssh_to_task)
    result = host.invoke("vps", "connect", VPS_ID, "--key", "/k", "--user", "me", "--", "uname", "-a")
    assert result.exit_code == 7, result.output
    assert seen == {
        "task_id": int(VPS_ID),
        "key": "/k",
        "user": "me",
        "proxy_port": None,
        "local_port": None,
        "command": ["uname", "-a"],
    }


# -- VM VPS (--backend qemu) ---------------------------------------------------------------------------------


def test_qemu_options_map_onto_the_spec():
    key = KeyChoice(SshKeyMode.NONE)
    spec = build_vps_spec(
        backend="qemu", vm_image="debian-12", disk="50G", cores=2, memory="4G", target="vm1", key=key
    )
    body = create_body(spec, key)
    assert body["vps_backend"] == "qemu" and body["vm_image"] == "debian-12" and body["vm_disk_size"] == "50G"
    assert body["memory_mb"] == 4096 and body["required_memory_bytes"] is None
    assert body["required_cores"] == 2 and body["target"] == "vm1" and body["ssh_key_mode"] == "none"
    # No -m: the node's default (the host resolves it); fractions round down to whole MiB.
    assert create_body(build_vps_spec(backend="qemu", vm_image="d", key=key), key)["memory_mb"] is None
    assert build_vps_spec(backend="qemu", vm_image="d", memory="1.5G", key=key).memory_mb == 1536
    assert build_vps_spec(backend="qemu", vm_image="d", memory="3000MB", key=key).memory_mb == 2861


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"backend": "qemu", "vm_image": "d", "image": "x"}, "--image is for a Docker VPS"),
        ({"backend": "qemu", "vm_image": "d", "container": "env"}, "--container is for a Docker VPS"),
        ({"backend": "qemu", "vm_image": "d", "privileged": True}, "--privileged is for a Docker VPS"),
        ({"backend": "qemu", "vm_image": "d", "mounts": ["/a:/a"]}, "--mount is for a Docker VPS"),
        ({"backend": "qemu"}, "needs --vm-image"),
        ({"vm_image": "debian-12"}, "--vm-image is for a VM: add --backend qemu"),
        ({"disk": "50G"}, "--disk is for a VM"),
    ],
)
def test_options_of_the_other_backend_are_usage_errors(options, words):
    with pytest.raises(click.UsageError) as exc:
        build_vps_spec(**options)
    assert words in exc.value.message and not isinstance(exc.value, click.BadParameter)


@pytest.mark.parametrize(
    ("options", "hint"),
    [
        ({"memory": "0"}, "'-m' / '--memory'"),  # a VM cannot run without memory
        ({"memory": "10M"}, "'-m' / '--memory'"),
        ({"memory": "lots"}, "'-m' / '--memory'"),
        ({"disk": "big"}, "'--disk'"),
        ({"disk": "0G"}, "'--disk'"),
        ({"vm_image": "Bad Image"}, "'--vm-image'"),
        ({"gpus": "0"}, "'--gpus'"),  # GPU ids need a target node, as for containers
    ],
)
def test_invalid_qemu_options_name_the_option(options, hint):
    options = {"backend": "qemu", "vm_image": "debian-12", **options}
    with pytest.raises(click.BadParameter) as exc:
        build_vps_spec(**options)
    assert exc.value.param_hint == hint


def test_create_a_vm(host, user_key):
    accept(host)
    result = host.invoke(
        "vps", "create", "--backend", "qemu", "--vm-image", "debian-12", "--disk", "50G",
        "-c", "2", "-m", "4G", "-t", "vm1::0",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{VPS_ID}\n"
    body = host.body("POST", "/api/vps/create")
    assert body["vps_backend"] == "qemu" and body["vm_image"] == "debian-12" and body["vm_disk_size"] == "50G"
    assert body["memory_mb"] == 4096 and body["required_cores"] == 2 and body["target"] == "vm1::0"
    assert body["ssh_key_mode"] == "upload" and body["ssh_public_key"] == user_key


def test_create_a_vm_with_docker_options_asks_nothing(host, home):
    for args in (
        ["--backend", "qemu", "--vm-image", "d", "--image", "x"],
        ["--backend", "qemu", "--vm-image", "d", "--gen-ssh-key", "--privileged"],
        ["--vm-image", "d"],
        ["--backend", "qemu", "--no-ssh"],
    ):
        result = host.invoke("vps", "create", *args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output
    assert host.requests == [] and not (home / ".ssh").exists()  # no key pair was made either


def test_a_vm_refused_by_the_host_names_the_field(host, user_key):
    message = "node vm1 has no VM image 'ubuntu' (it has: debian-12)"
    host.on("POST", "/api/vps/create", error_reply(422, "invalid", message, "vm_image"))
    result = host.invoke("vps", "create", "--backend", "qemu", "--vm-image", "ubuntu", "-t", "vm1")
    assert_one_line_error(result, 1, "vm_image: node vm1 has no VM image 'ubuntu'", "(HTTP 422)")


def vm_record(status: str = "running", **fields) -> dict:
    health = {
        "agent": "healthy",
        "last_heartbeat_at": "2025-04-10T08:30:00Z",
        "uptime_seconds": 3725.0,
        "load1": 0.42,
        "memory_total_bytes": 4 << 30,
        "memory_available_bytes": 3 << 30,
        "disk_total_bytes": 50 << 30,
        "disk_free_bytes": 40 << 30,
        "gpus": 0,
    }
    data = {
        "vps_backend": "qemu",
        "vm_image": "debian-12",
        "vm_disk_size": "50G",
        "memory_mb": 4096,
        "required_memory_bytes": 4 << 30,
        "vm_ip": "10.201.0.7",
        "vm_health": health,
    }
    return record(status, **{**data, **fields})


def test_status_of_a_vm(host):
    host.on("GET", f"/api/vps/{VPS_ID}", vm_record())
    result = host.invoke("vps", "status", VPS_ID, COLUMNS="200")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for fragment in (
        "qemu",
        "VM image",
        "debian-12",
        "50G",
        "10.201.0.7",
        "healthy",
        "last heartbeat",
        "load 0.42",
        "memory 1 GiB / 4 GiB used",
        "disk 10 GiB / 50 GiB used",
        "up 1h02m",
        "4 GiB",
        f"kr vps connect {VPS_ID}",
    ):
        assert fragment in out, (fragment, out)
    assert "Image " not in out  # a VM has no container image row
    unhealthy = {"agent": "unhealthy", "message": "no heartbeat for 95 s"}
    host.on("GET", f"/api/vps/{VPS_ID}", vm_record(vm_health=unhealthy, vm_disk_size=None))
    out = host.invoke("vps", "status", VPS_ID, COLUMNS="200").stdout
    assert "unhealthy" in out and "no heartbeat for 95 s" in out and "the node's default" in out
    host.on("GET", f"/api/vps/{VPS_ID}", vm_record("assigning", vm_health=None, vm_ip=None))
    out = host.invoke("vps", "status", VPS_ID, COLUMNS="200").stdout
    assert "Agent" not in out and "IP" in out
    host.on("GET", f"/api/vps/{VPS_ID}", vm_record(vm_health=None))
    assert "no report yet" in host.invoke("vps", "status", VPS_ID, COLUMNS="200").stdout
    # A Docker VPS shows none of it.
    host.on("GET", f"/api/vps/{VPS_ID}", record())
    out = host.invoke("vps", "status", VPS_ID, COLUMNS="200").stdout
    assert "VM image" not in out and "Agent" not in out


def test_create_wait_for_a_vm_says_its_address(host, user_key):
    accept(host)
    host.on_each("GET", f"/api/status/{VPS_ID}", vm_record("assigning"), vm_record("running"))
    result = host.invoke("vps", "create", "--backend", "qemu", "--vm-image", "debian-12", "--wait")
    assert result.exit_code == 0, result.output
    assert "running on n1, ssh port 2222, VM address 10.201.0.7" in result.stderr


def test_snapshot_restore(host):
    path = f"/api/vps/{VPS_ID}/snapshots/1700000000/restore"
    answer = {"task_id": VPS_ID, "timestamp": 1700000000, "message": "VM restored to 1700000000; it rebooted"}
    host.on("POST", path, answer)
    result = host.invoke("vps", "snapshot", "restore", VPS_ID, "1700000000")
    assert result.exit_code == 0, result.output
    assert "it rebooted" in result.stderr and len(host.calls("POST", path)) == 1
    assert (
        json.loads(host.invoke("vps", "snapshot", "restore", VPS_ID, "1700000000", "--json").stdout) == answer
    )
    host.on("POST", path, error_reply(501, "not_implemented", "node n1: restore needs a stopped VPS"))
    assert_one_line_error(host.invoke("vps", "snapshot", "restore", VPS_ID, "1700000000"), 1, "restore needs")
    host.on("POST", path, error_reply(404, "not_found", "no snapshot 1700000000"))
    assert_one_line_error(host.invoke("vps", "snapshot", "restore", VPS_ID, "1700000000"), 3, "no snapshot")
    assert host.invoke("vps", "snapshot", "restore", VPS_ID, "latest").exit_code == 2
