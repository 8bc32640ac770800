"""VM VPS end to end: ``kr vps create --backend qemu`` on a real runner with real QEMU (TCG on these machines)
and the project's Debian image (``scripts/images/vm-debian.sh``, cached after its first build).

One VM is shared by the module's tests, in the order written (each leaves it running): SSH with a generated
key through ``kr ssh`` and plain ``ssh -F`` (``kr ssh config``), ``kr connect``-style terminals, the agent's
heartbeat in the status and a stopped agent marking the VM unhealthy, ``kr forward`` to an HTTP server in the
guest, pause/resume, snapshot/change/restore, restart in place, ``kill -9`` of the runner (the VM is
re-adopted and still reachable), stop (QEMU and the TAP gone, the disk kept) and restart from the kept disk.
Bad requests are refused before anything is stored.

The runner's VM bridge, subnet and instance directory are private to the module; QEMU processes, the
bridge and its iptables rules are removed at the end whatever happened (a runner leaves its VMs running on
purpose, like its containers).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.need import need, need_program

from .cluster import KR, REPO, free_port, running_cluster, wait_until
from .test_vps import VpsCluster, _text

pytestmark = [pytest.mark.slow, pytest.mark.vm]

IMAGE_SCRIPT = REPO / "scripts" / "images" / "vm-debian.sh"
IMAGE_NAME = "debian"
#: First boot with cloud-init under TCG took 50-110 s on this machine kind; later boots 40-60 s.
BOOT = 420


# -- fixtures ------------------------------------------------------------------------------------------------


def image_dir(root: Path) -> Path:
    """A VM_IMAGES_DIR under ``root`` holding the project's image as ``debian`` (links to the cached build,
    made by ``vm-debian.sh`` when missing)."""
    done = subprocess.run(["bash", str(IMAGE_SCRIPT)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"vm-debian.sh failed ({done.returncode}):\n{done.stderr[-4000:]}")
    built = Path(done.stdout.strip().splitlines()[-1])
    images = root / "vm-images"
    images.mkdir()
    for source in built.parent.glob(built.stem + ".*"):
        (images / (IMAGE_NAME + source.suffix)).symlink_to(source)
    return images


@pytest.fixture(scope="module")
def vm_image_files(tmp_path_factory) -> Path:
    for tool in ("qemu-system-x86_64", "qemu-img", "ssh", "curl", "iptables"):
        need_program(tool)
    need(os.geteuid() == 0, "VMs need root (TAPs, the bridge, iptables)")
    need(shutil.which("debootstrap"), "debootstrap is not installed (scripts/setup.sh)")
    try:
        return image_dir(tmp_path_factory.mktemp("images"))
    except RuntimeError as exc:
        pytest.fail(str(exc))


class VmCluster(VpsCluster):
    """A VPS cluster whose runner runs VMs; ``create_vm`` makes one and waits until SSH answers."""

    def __init__(self, cluster, root: Path, instances: Path, bridge: str) -> None:
        super().__init__(cluster, root)
        self.instances = instances
        self.bridge = bridge

    def create_vm(self, *options: str, timeout: float = BOOT) -> str:
        proc = self.kr(
            "vps", "create", "--backend", "qemu", "--vm-image", IMAGE_NAME, "--disk", "4G",
            "-c", "2", "-m", "1G", "--wait", *options, timeout=timeout,
        )  # fmt: skip
        task_id = proc.stdout.decode().split()[0]
        self.created.append(task_id)
        return task_id

    def qemu_pids(self, task_id: str) -> list[int]:
        directory = str(self.instances / task_id)
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                argv
                and argv[0].endswith(b"qemu-system-x86_64")
                and any(directory.encode() in a for a in argv)
            ):
                pids.append(int(entry.name))
        return pids

    def links(self) -> str:
        return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout

    def status(self, task_id: str) -> dict:
        return self.cluster.task(task_id)


def _teardown_network(bridge: str, subnet: str) -> None:
    for table in ("nat", "filter"):
        rules = subprocess.run(["iptables", "-t", table, "-S"], capture_output=True, text=True).stdout
        for line in rules.splitlines():
            if line.startswith("-A ") and (f" {bridge} " in f"{line} " or subnet in line):
                subprocess.run(["iptables", "-t", table, "-D", *line.split()[1:]], capture_output=True)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name == bridge or f"master {bridge} " in line:
            subprocess.run(["ip", "link", "del", name], capture_output=True)


@contextlib.contextmanager
def vm_cluster(root: Path, images: Path) -> Iterator[VmCluster]:
    """A host and a runner that runs VMs from ``images``, on a bridge and subnet of their own."""
    instances = root / "instances"
    tag = secrets.token_hex(2)
    bridge = f"krtbr{tag}"
    subnet = ipaddress.ip_network(f"10.{200 + int(tag[0], 16)}.{int(tag[1:], 16) % 250}.0/24")
    gateway = str(subnet.network_address + 1)
    vc: VmCluster | None = None
    try:
        with running_cluster(
            root / "cluster",
            VPS_SSH_PORT_START=free_port(),
            VM_IMAGES_DIR=str(images),
            VM_INSTANCES_DIR=str(instances),
            VM_BRIDGE_NAME=bridge,
            VM_BRIDGE_SUBNET=str(subnet),
            VM_BRIDGE_GATEWAY=gateway,
            VM_HEARTBEAT_TIMEOUT_SECONDS=20,
            VM_DEFAULT_MEMORY_MB=1024,
        ) as cluster:
            vc = VmCluster(cluster, root, instances, bridge)
            yield vc
    finally:
        if vc is not None:
            for task_id in vc.created:
                for pid in vc.qemu_pids(task_id):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        _teardown_network(bridge, str(subnet))


@pytest.fixture(scope="module")
def vmc(tmp_path_factory, vm_image_files) -> Iterator[VmCluster]:
    with vm_cluster(tmp_path_factory.mktemp("vmvps"), vm_image_files) as vc:
        yield vc


@pytest.fixture(scope="module")
def vm(vmc: VmCluster) -> str:
    """The module's VM: created with a generated key, reachable over SSH."""
    started = time.monotonic()
    task_id = vmc.create_vm("--gen-ssh-key")
    print(f"\nVM {task_id}: create -> running (SSH answers) in {time.monotonic() - started:.1f} s")
    vmc.wait_ssh(task_id, timeout=60)
    return task_id


def _wait_agent(vmc: VmCluster, task_id: str, state: str, timeout: float) -> dict:
    def reached():
        health = vmc.status(task_id).get("vm_health") or {}
        return health if health.get("agent") == state else None

    return wait_until(reached, timeout, lambda: f"agent {state}: {vmc.status(task_id)}", interval=0.5)


# -- the tests (in order, on one VM) -------------------------------------------------------------------------


def test_ssh_with_a_generated_key_and_ssh_config(vmc: VmCluster, vm: str, tmp_path: Path) -> None:
    record = vmc.status(vm)
    assert (record["status"], record["vps_backend"], record["ssh_key_mode"]) == (
        "running",
        "qemu",
        "generate",
    )
    assert record["vm_ip"] and isinstance(record["ssh_port"], int), record
    r = vmc.kr_ssh(vm, "hostname")
    assert (r.returncode, r.stdout.decode().strip()) == (0, f"vps-{vm}"), _text(r)
    # the VM's own kernel, not the runner's
    r = vmc.kr_ssh(vm, "uname", "-r")
    assert r.stdout.decode().strip() != os.uname().release, _text(r)
    # the runner's temp directory is mounted over 9p, as /local_temp is in a container
    r = vmc.kr_ssh(vm, "findmnt -n -o FSTYPE /local_temp")
    assert r.stdout.decode().strip() == "9p", _text(r)

    cfg = tmp_path / "kohakuriver.sshconfig"
    vmc.kr("ssh", "config", "--output", str(cfg))
    r = vmc.run(["ssh", "-F", str(cfg), f"kohakuriver-{vm}", "echo", "via-config"])
    assert (r.returncode, r.stdout) == (0, b"via-config\n"), _text(r)
    # never a password: the server offers public keys only
    r = vmc.run(["ssh", "-F", str(cfg), "-o", "PubkeyAuthentication=no", "-o", "BatchMode=yes",
                 f"kohakuriver-{vm}", "true"])  # fmt: skip
    assert r.returncode == 255 and b"Permission denied (publickey)" in r.stderr, _text(r)


def test_terminal_exec_into_the_vm(vmc: VmCluster, vm: str) -> None:
    """``kr terminal exec`` goes through the runner's own SSH access (its management key)."""
    r = vmc.kr("terminal", "exec", vm, "--", "sh", "-c", "echo out; echo err >&2; exit 3", check=False)
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n"), _text(r)


def test_agent_heartbeat_and_unhealthy_when_silent(vmc: VmCluster, vm: str) -> None:
    health = _wait_agent(vmc, vm, "healthy", 120)
    assert health["memory_total_bytes"] > 500 * (1 << 20), health
    assert health["disk_total_bytes"] > 2 * (1 << 30), health
    out = vmc.kr("vps", "status", vm).stdout.decode()
    assert "healthy" in out, out
    r = vmc.kr_ssh(vm, "systemctl", "stop", "kohakuriver-agent")
    assert r.returncode == 0, _text(r)
    health = _wait_agent(vmc, vm, "unhealthy", 60)
    assert "no heartbeat" in health["message"], health
    assert vmc.status(vm)["status"] == "running"
    r = vmc.kr_ssh(vm, "systemctl", "start", "kohakuriver-agent")
    assert r.returncode == 0, _text(r)
    _wait_agent(vmc, vm, "healthy", 60)


def test_forward_to_an_http_server_in_the_vm(vmc: VmCluster, vm: str) -> None:
    serve = "(setsid python3 -m http.server 8088 --directory /srv/www >/dev/null 2>&1 &)"
    r = vmc.kr_ssh(vm, f"mkdir -p /srv/www && echo hello-from-vm > /srv/www/index.html && {serve}")
    assert r.returncode == 0, _text(r)
    port = free_port()
    forward = subprocess.Popen(
        [KR, "forward", vm, "8088", "--local-port", str(port)], env=vmc.env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:

        def served() -> bool:
            return httpx.get(f"http://127.0.0.1:{port}/index.html", timeout=5).text == "hello-from-vm\n"

        wait_until(served, 60, "the forwarded HTTP server", interval=0.5)
    finally:
        forward.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            forward.wait(10)
        if forward.poll() is None:
            forward.kill()


def test_pause_and_resume(vmc: VmCluster, vm: str) -> None:
    vmc.kr("vps", "pause", vm)
    assert vmc.status(vm)["status"] == "paused"
    r = vmc.kr_ssh(vm, "true", options=("ConnectTimeout=3",))
    assert r.returncode == 255, _text(r)
    vmc.kr("vps", "resume", vm)
    assert vmc.status(vm)["status"] == "running"
    vmc.wait_ssh(vm, timeout=60)


def test_snapshot_change_restore(vmc: VmCluster, vm: str) -> None:
    assert vmc.kr_ssh(vm, "echo before > /root/marker && sync").returncode == 0
    created = json.loads(vmc.kr("vps", "snapshot", "create", vm, "--json").stdout)
    timestamp = str(created["timestamp"])
    listed = json.loads(vmc.kr("vps", "snapshot", "list", vm, "--json").stdout)
    snapshots = listed["snapshots"] if isinstance(listed, dict) else listed
    assert timestamp in [str(s["timestamp"]) for s in snapshots], listed
    assert vmc.kr_ssh(vm, "echo after > /root/marker && touch /root/new && sync").returncode == 0
    vmc.kr("vps", "snapshot", "restore", vm, timestamp, timeout=300)
    vmc.wait_ssh(vm, timeout=BOOT)
    r = vmc.kr_ssh(vm, "cat /root/marker; ls /root/new 2>&1 || true")
    assert r.stdout.decode().splitlines()[0] == "before", _text(r)
    assert "No such file" in r.stdout.decode(), _text(r)
    vmc.kr("vps", "snapshot", "delete", vm, timestamp)


def test_restart_in_place_keeps_files(vmc: VmCluster, vm: str) -> None:
    assert vmc.kr_ssh(vm, "echo kept-1 > /root/kept && sync").returncode == 0
    before = vmc.qemu_pids(vm)
    vmc.kr("vps", "restart", vm, timeout=300)
    assert vmc.status(vm)["status"] == "running"
    vmc.wait_ssh(vm, timeout=BOOT)
    assert vmc.qemu_pids(vm) != before
    r = vmc.kr_ssh(vm, "cat", "/root/kept")
    assert r.stdout == b"kept-1\n", _text(r)


def test_runner_kill9_readopts_the_running_vm(vmc: VmCluster, vm: str) -> None:
    cluster = vmc.cluster
    (name,) = cluster.runners
    pids = vmc.qemu_pids(vm)
    assert len(pids) == 1
    cluster.runners[name].kill9()
    time.sleep(1)
    assert vmc.qemu_pids(vm) == pids, "QEMU died with the runner"
    cluster.runners[name].start()
    cluster.wait_node_online(name, timeout=60)
    cluster.wait_status(vm, "running", timeout=60)
    vmc.wait_ssh(vm, timeout=60)
    assert vmc.qemu_pids(vm) == pids
    assert "re-adopted QEMU" in cluster.runners[name].log_path.read_text(errors="replace")


def test_stop_removes_qemu_and_tap_and_restart_boots_the_kept_disk(vmc: VmCluster, vm: str) -> None:
    assert vmc.kr_ssh(vm, "echo kept-2 >> /root/kept && sync").returncode == 0
    vmc.kr("vps", "stop", vm, timeout=300)
    assert vmc.status(vm)["status"] == "stopped"
    wait_until(lambda: not vmc.qemu_pids(vm), 30, "QEMU to exit")
    tap = [line for line in vmc.links().splitlines() if f"master {vmc.bridge} " in line]
    assert tap == [], tap
    assert (vmc.instances / vm / "disk.qcow2").exists()
    vmc.kr("vps", "restart", vm)
    vmc.cluster.wait_status(vm, "running", timeout=BOOT)
    vmc.wait_ssh(vm, timeout=60)
    r = vmc.kr_ssh(vm, "cat", "/root/kept")
    assert r.stdout == b"kept-1\nkept-2\n", _text(r)


# -- refusals ------------------------------------------------------------------------------------------------


def _create_error(vmc: VmCluster, **fields) -> tuple[int, dict]:
    body = {"vps_backend": "qemu", "vm_image": IMAGE_NAME, "ssh_key_mode": "none", **fields}
    headers = {"Authorization": f"Bearer {vmc.cluster.admin_token}"}
    r = httpx.post(f"{vmc.cluster.url}/api/vps/create", json=body, headers=headers, timeout=30)
    return r.status_code, r.json()


def _vps_ids(vmc: VmCluster) -> set[str]:
    return {t["task_id"] for t in vmc.cluster.api("GET", "/api/vps?all=1")["vps"]}


def test_bad_requests_are_refused_naming_the_field(vmc: VmCluster) -> None:
    before = _vps_ids(vmc)
    vmc.instances.mkdir(exist_ok=True)
    dirs = sorted(p.name for p in vmc.instances.iterdir())
    cases = [
        ({"vm_image": "no-such-image"}, "vm_image"),
        ({"vm_disk_size": "1M"}, "vm_disk_size"),
        ({"required_gpus": [0], "target": vmc.cluster.runner_name(0)}, "required_gpus"),
        ({"ssh_key_mode": "upload", "ssh_public_key": "ssh-ed25519 not-a-key"}, "ssh_public_key"),
    ]
    for fields, field in cases:
        status, body = _create_error(vmc, **fields)
        assert 400 <= status < 500, (fields, status, body)
        assert body.get("field") == field, (fields, body)
    assert _vps_ids(vmc) == before
    assert sorted(p.name for p in vmc.instances.iterdir()) == dirs
