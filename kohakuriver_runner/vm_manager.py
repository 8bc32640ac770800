"""VM VPS on this runner: one QEMU process per VPS, supervised from creation to its end.

``VmManager`` is the VM counterpart of the Docker executor (``executor.TaskManager``, which hands it every
request with ``vps_backend`` qemu and every control call for a task it holds). One supervisor task per VM in
the manager's nursery:

1. prepare (a kill or stop cancels it): the base image (``vm_disk``), the instance directory
   ``VM_INSTANCES_DIR/<task id>/`` with its disk (a qcow2 overlay on the base, kept across stops and
   re-creations: the VM's files live there), the SSH port, an address on the VM bridge and a TAP
   (``vm_network``), the cloud-init seed (``vm_seed``: the user's key, the runner's management key, the
   pinned host key, the 9p shares and the guest agent) and QEMU's argv (``vm_argv``);
2. launch QEMU (``vm_process``: its own session, so it outlives a runner restart) and hold its QMP socket
   (``qmp_client``) for the VM's whole life: pause/resume/power-down go through it, and its events say
   when the guest powered itself off;
3. wait until the guest answers (sshd's banner, or the agent's first heartbeat where SSH is disabled),
   bounded by ``VM_BOOT_TIMEOUT_SECONDS`` / ``VM_SSH_READY_TIMEOUT_SECONDS``; only then is the VPS
   reported ``running`` (before, the host shows "booting" progress): ``kr ssh`` works when it says running;
4. watch: QEMU's exit, the agent's heartbeats (``kohakuriver_proto.agent.AgentWatch``; a change of state
   and every ``HEALTH_REFRESH`` seconds a status update carries ``vm_health``), the SSH relay
   (``RUNNER_BIND_IP:<ssh port>`` -> the VM's port 22, where the host's SSH proxy connects, as for a
   Docker VPS);
5. QEMU exited: a restart or a snapshot restore relaunches it (same disk, same address, same port); else
   the VPS ends (``stopped`` after a user's stop or a guest power-off, ``killed``, or ``failed`` with QEMU's
   last words), its TAP, SSH port and QMP socket are released, and the disk stays for a later restart.

A runner restart re-adopts live VMs: ``<instance>/vm.json`` names the QEMU pid, which must still be a QEMU
of that instance directory (pid reuse), and its QMP socket; a VM that died meanwhile is reported ``failed``
with that reason. TAPs of VMs this runner no longer holds are removed at start.

Snapshots are internal qcow2 snapshots of the disk (``vm_disk``): taken while the VM runs through QMP
(crash-consistent, after a ``sync`` in the guest over the management SSH when it answers), or with
``qemu-img`` when it does not run. They hold the disk, not the memory: QEMU refuses to save the memory of a
VM with 9p shares. A restore therefore powers the VM off, reverts the disk and boots it again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import errno
import ipaddress
import json
import logging
import os
import shutil
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import trio

from kohakuriver_net.task_steps import step
from kohakuriver_proto.agent import AgentHeartbeat, AgentWatch
from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.lifecycle import TaskStatus
from kohakuriver_proto.models import (
    ExecuteRequest,
    SshKeyMode,
    StatusUpdate,
    TaskControl,
    VfioGpuInfo,
    VmAccel,
    VmAgentState,
    VmFacts,
    VmHealth,
)
from kohakuriver_proto.units import parse_size

from . import vfio, vm_disk, vm_network, vm_process
from .container_spec import SpecError
from .executor import BackendFailure, RunnerUnavailable, TaskConflict, TaskNotFound
from .qmp_client import QmpClient, QmpError, open_qmp
from .runner_settings import RunnerSettings
from .snapshots import SnapshotNotFound
from .ssh_ports import NoFreePort, SshPorts
from .state import Phase, StateStore, TaskState
from .tunnel_secret import container_secret
from .tunnel_server import HeldContainer, TunnelServer
from .vm_argv import VmLaunch, qemu_argv
from .vm_capability import VmCapability
from .vm_port_relay import serve_relay
from .vm_seed import (
    GuestAgent,
    GuestMount,
    GuestNetwork,
    SeedRequest,
    build_seed,
    build_seed_iso,
    vm_hostname,
)
from .vm_ssh import ManagementKey, VmSshTarget
from .vm_ssh import run as ssh_run
from .vps_files import HostKeyStore

__all__ = ["VM_NAME_PREFIX", "VmManager", "VmRun", "vm_name"]

log = logging.getLogger("kohakuriver.runner.vm")

VM_NAME_PREFIX = "kohakuriver-vm-"
#: A user's stop: seconds the guest gets to power off after the ACPI button, then QMP quit, then SIGKILL.
POWERDOWN_GRACE = 90.0
QUIT_GRACE = 10.0
#: How often the list of base images is read again (heartbeats carry it).
IMAGES_REFRESH = 60.0
#: How often the agent's figures go to the host while nothing changes.
HEALTH_REFRESH = 30.0
#: How often a booting VM's progress line is refreshed, and how often readiness is probed.
PROGRESS_EVERY = 5.0
PROBE_EVERY = 1.0
#: Where the guest finds the agent binary (a read-only 9p share of ``<instance>/agent``).
AGENT_TAG = "kr-agent"
AGENT_GUEST_DIR = "/opt/kohakuriver/agent"
AGENT_BINARY = "tunnel-client"
#: The task directories, as a Docker task sees them.
SHARE_TAGS = (("kr-shared", "/shared"), ("kr-local-temp", "/local_temp"))
DISK_NAME = "disk.qcow2"
META_NAME = "vm.json"


def vm_name(task_id: int) -> str:
    """What the tunnel server, the agent and the logs call the VM of ``task_id``."""
    return f"{VM_NAME_PREFIX}{int(task_id)}"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class VmPhase(enum.Enum):
    PREPARING = "preparing"
    BOOTING = "booting"  # QEMU runs, the guest does not answer yet
    RUNNING = "running"
    FINISHING = "finishing"


@attrs.define(eq=False)
class VmRun:
    state: TaskState
    instance: Path
    phase: VmPhase = VmPhase.PREPARING
    prepare_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    started: trio.Event = attrs.field(factory=trio.Event)
    done: trio.Event = attrs.field(factory=trio.Event)
    pid: int | None = None
    address: str | None = None
    tap: str | None = None
    ssh_port: int | None = None
    paused: bool = False
    stop_requested: bool = False
    guest_powered_off: bool = False
    #: Set by restart/restore: when QEMU has exited, do this (in a thread) and boot again.
    relaunch: Callable[[], None] | None = None
    relaunched: trio.Event | None = None
    qmp: QmpClient | None = None
    #: The VPS's pinned SSH host key (public half), which the runner checks when it connects.
    host_public_key: str | None = None
    #: On the overlay (else the VM NAT bridge): the gateway, prefix and MTU the seed gives the guest.
    on_overlay: bool = False
    gateway: str | None = None
    prefix: int | None = None
    mtu: int | None = None
    #: GPUs given to the VM: PCI address -> the driver it had before vfio-pci (given back at the end).
    vfio: dict[str, str | None] = attrs.field(factory=dict)
    #: The seed starts the guest agent (the runner has a tunnel client with --agent and forwarding is on).
    agent_expected: bool = False
    #: Why the coming exit is a failure (the guest never answered); reported once QEMU is gone.
    failure: str | None = None
    argv: list[str] = attrs.field(factory=list)
    watch: AgentWatch | None = None
    last_health: VmHealth | None = None

    @property
    def task_id(self) -> int:
        return self.state.task_id

    @property
    def request(self) -> ExecuteRequest:
        assert self.state.request is not None
        return self.state.request

    @property
    def disk(self) -> Path:
        return self.instance / DISK_NAME


class Reporter:  # the executor's Reporter protocol, restated to keep this module importable alone
    def send(self, update: StatusUpdate) -> None: ...

    def send_final(self, update: StatusUpdate) -> None: ...

    def progress(self, task_id: int, text: str) -> None: ...


class VmManager:
    """Creates, supervises, controls and re-adopts VM VPS. Run ``serve`` in the daemon's nursery."""

    def __init__(
        self,
        *,
        config: RunnerSettings,
        store: StateStore,
        reporter: Any,
        capability: VmCapability,
        ssh_ports: SshPorts,
        host_keys: HostKeyStore,
        tunnels: TunnelServer | None,
        tunnel_key: bytes | None,
    ) -> None:
        self.config = config
        self.store = store
        self.reporter = reporter
        self.capability = capability
        self.ssh_ports = ssh_ports
        self.host_keys = host_keys
        self.tunnels = tunnels
        self.tunnel_key = tunnel_key
        self.runs: dict[int, VmRun] = {}
        self.instances_dir = Path(config.VM_INSTANCES_DIR)
        self.images_dir = Path(config.VM_IMAGES_DIR)
        self.bridge = vm_network.VmBridge(
            config.VM_BRIDGE_NAME, config.VM_BRIDGE_SUBNET, config.VM_BRIDGE_GATEWAY
        )
        self.addresses = vm_network.AddressBook(
            store.root / "vm_addresses.json", config.VM_BRIDGE_SUBNET, config.VM_BRIDGE_GATEWAY
        )
        self._images: list[vm_disk.VmImage] = []
        #: This runner's overlay placement (``OverlayManager.placement``) where the overlay is on; set by the
        #: daemon. None: VMs go on the VM NAT bridge.
        self.overlay_placement: Callable[[], Any] = lambda: None
        #: GPU ids the runner's containers hold (set by the daemon: the TaskManager knows them).
        self.container_gpus: Callable[[], set[int]] = set
        self._bridge_ready = False
        self._bridge_lock = trio.Lock()
        self._management_key: ManagementKey | None = None
        self._nursery: trio.Nursery | None = None
        if tunnels is not None:
            tunnels.on_agent_heartbeat = self._agent_heartbeat
            tunnels.on_tunnel_attached = self._agent_attached
            tunnels.on_tunnel_detached = self._agent_detached

    # -- the daemon's side -------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._refresh_images()
            await self._adopt_all()
            task_status.started()
            while True:
                await trio.sleep(IMAGES_REFRESH)
                await self._refresh_images()

    async def _refresh_images(self) -> None:
        if not self.capability.capable:
            return
        try:
            self._images = await trio.to_thread.run_sync(vm_disk.list_images, self.images_dir)
        except OSError as exc:
            log.warning("listing VM images in %s failed: %s", self.images_dir, exc)

    async def images(self) -> list[vm_disk.VmImage]:
        """The base images (read again: an admin may just have added one)."""
        await self._refresh_images()
        return list(self._images)

    def facts(self) -> VmFacts:
        """What registration and heartbeats say about VMs on this node."""
        cap = self.capability
        return VmFacts(
            capable=cap.capable,
            accel=VmAccel(cap.accel.value),
            reason=cap.reason,
            qemu_version=cap.qemu_version,
            qemu_img_version=cap.qemu_img_version,
            ovmf_version=cap.ovmf_version,
            images=[image.to_info() for image in self._images],
            vfio_gpus=[_vfio_info(gpu) for gpu in cap.vfio_gpus],
            default_memory_mb=self.config.VM_DEFAULT_MEMORY_MB,
        )

    def owns(self, task_id: int) -> bool:
        if task_id in self.runs:
            return True
        entry = self.store.get(task_id)
        return entry is not None and is_vm_request(entry.request)

    def held_task_ids(self) -> list[int]:
        """VMs whose guest answered: a heartbeat's ``running_tasks`` (booting ones are ``assigning``)."""
        return [tid for tid, run in self.runs.items() if run.phase is VmPhase.RUNNING]

    def find_vm(self, ref: str) -> HeldContainer | None:
        """The VM a tunnel or terminal request names: its task id or ``kohakuriver-vm-<id>``."""
        text = ref[len(VM_NAME_PREFIX) :] if ref.startswith(VM_NAME_PREFIX) else ref
        if not (text.isascii() and text.isdigit()) or len(text) > 19:
            return None
        run = self.runs.get(int(text))
        if run is None:
            return None
        return HeldContainer(
            task_id=run.task_id,
            name=vm_name(run.task_id),
            running=run.phase in (VmPhase.BOOTING, VmPhase.RUNNING),
            status=run.phase.value,
            address=run.address,
        )

    def ssh_target(self, task_id: int) -> VmSshTarget | None:
        """How the runner reaches into the VM of ``task_id`` (terminals, ``sync``), or None: not a VM of
        this runner, or one without sshd."""
        run = self.runs.get(task_id)
        if run is None or run.address is None or run.host_public_key is None or self._management_key is None:
            return None
        return VmSshTarget(
            task_id=task_id,
            address=run.address,
            port=22,
            host_public_key=run.host_public_key,
            key=self._management_key,
        )

    # -- requests from the host --------------------------------------------------------------------------

    async def execute(self, request: ExecuteRequest) -> bool:
        task_id = request.task_id
        if task_id in self.runs or self.store.get(task_id) is not None:
            return False
        if not self.capability.capable:
            raise RunnerUnavailable(f"this runner cannot run VMs: {self.capability.reason}")
        state = TaskState(task_id=task_id, request=request, accepted_at=utcnow())
        run = VmRun(state, self.instances_dir / str(task_id))
        self.runs[task_id] = run
        try:
            await self.store.save(state)
        except BaseException:
            del self.runs[task_id]
            raise
        log.info("VM %s accepted: image %s", task_id, request.vm_image)
        self._spawn(self._execute, run)
        return True

    def _get(self, task_id: int) -> VmRun:
        run = self.runs.get(task_id)
        if run is None:
            raise TaskNotFound(f"this runner holds no VM {task_id}")
        return run

    async def kill(self, task_id: int, *, forget: bool = False) -> TaskControl:
        run = self._get(task_id)
        if run.phase is VmPhase.FINISHING:
            raise TaskConflict(f"VM {task_id} has already ended")
        run.state.killed_by_user = True
        run.state.forget = run.state.forget or forget
        await self.store.save(run.state)
        if run.phase is VmPhase.PREPARING:
            run.prepare_scope.cancel()
            return TaskControl(
                task_id=task_id, ok=True, message="preparation cancelled; the VM will not start"
            )
        run.relaunch = None
        self._signal(run, signal.SIGKILL)
        log.info("VM %s: kill requested", task_id)
        return TaskControl(task_id=task_id, ok=True, message="killed")

    async def pause(self, task_id: int) -> TaskControl:
        run = self._live(task_id, "paused")
        if run.paused:
            return TaskControl(task_id=task_id, ok=True, message="already paused")
        await self._qmp_call(run, "pause", self._qmp(run).stop)
        run.paused = True
        log.info("VM %s paused", task_id)
        return TaskControl(task_id=task_id, ok=True, message="paused")

    async def resume(self, task_id: int) -> TaskControl:
        run = self._live(task_id, "resumed")
        if not run.paused:
            return TaskControl(task_id=task_id, ok=True, message="not paused")
        await self._qmp_call(run, "resume", self._qmp(run).cont)
        run.paused = False
        log.info("VM %s resumed", task_id)
        return TaskControl(task_id=task_id, ok=True, message="resumed")

    async def stop(self, task_id: int) -> TaskControl:
        """Snapshot (``AUTO_SNAPSHOT_ON_STOP``), power the guest off (ACPI, then quit, then SIGKILL); the
        VPS ends ``stopped``, its disk stays for a restart."""
        run = self._get(task_id)
        if run.phase is VmPhase.FINISHING:
            raise TaskConflict(f"VM {task_id} has already ended")
        if run.phase is VmPhase.PREPARING:
            run.stop_requested = True
            run.prepare_scope.cancel()
            return TaskControl(task_id=task_id, ok=True, message="stopped before it started")
        note = ""
        if self.config.AUTO_SNAPSHOT_ON_STOP:
            snapshot = await self.create_snapshot(task_id, "automatic snapshot on stop")
            note = f"; its disk is in snapshot {snapshot['timestamp']}"
        run.stop_requested = True
        run.relaunch = None
        await self._power_off(run)
        with trio.move_on_after(QUIT_GRACE):
            await run.done.wait()
        log.info("VM %s stopped%s", task_id, note)
        return TaskControl(task_id=task_id, ok=True, message="stopped" + note)

    async def restart(self, task_id: int) -> TaskControl:
        """Power the guest off and boot it again: same disk, address and SSH port; still ``running``."""
        run = self._live(task_id, "restarted")
        await self._relaunch(run, lambda: None, "restart")
        return TaskControl(task_id=task_id, ok=True, message="restarted; the guest is booting")

    # -- snapshots ---------------------------------------------------------------------------------------

    def has_instance(self, task_id: int) -> bool:
        return (self.instances_dir / str(task_id) / DISK_NAME).exists()

    def _disk_of(self, task_id: int) -> Path:
        disk = self.instances_dir / str(task_id) / DISK_NAME
        if not disk.exists():
            raise TaskNotFound(f"this runner has no VM disk for VPS {task_id}")
        return disk

    async def _list_snapshots(self, task_id: int) -> list[dict[str, Any]]:
        disk = self._disk_of(task_id)
        snapshots = await trio.to_thread.run_sync(vm_disk.list_snapshots, disk)
        return sorted((_snapshot_json(task_id, s) for s in snapshots), key=lambda s: -s["timestamp"])

    async def _create_snapshot(self, task_id: int, message: str | None = None) -> dict[str, Any]:
        disk = self._disk_of(task_id)
        run = self.runs.get(task_id)
        tag = await trio.to_thread.run_sync(vm_disk.new_tag, disk)
        if run is not None and run.qmp is not None and run.phase is not VmPhase.FINISHING:
            await self._guest_sync(run)
            await vm_disk.create_snapshot_online(run.qmp, vm_disk.DRIVE_ID, disk, tag, message)
        else:
            await trio.to_thread.run_sync(vm_disk.create_snapshot, disk, tag, message)
        await self._prune(task_id)
        created = [s for s in await self._list_snapshots(task_id) if s["name"] == tag]
        if not created:
            raise RuntimeError(f"snapshot {tag} of VM {task_id} was not recorded")
        log.info("VM %s: snapshot %s taken", task_id, tag)
        return created[0]

    async def _prune(self, task_id: int) -> None:
        keep = self.config.MAX_SNAPSHOTS_PER_VPS
        snapshots = await self._list_snapshots(task_id)
        for old in snapshots[keep:]:
            await self._delete_snapshot(task_id, old["timestamp"])

    async def _delete_snapshot(self, task_id: int, timestamp: int) -> dict[str, Any]:
        disk = self._disk_of(task_id)
        tag = await self._tag_of(task_id, timestamp)
        run = self.runs.get(task_id)
        if run is not None and run.qmp is not None and run.phase is not VmPhase.FINISHING:
            await vm_disk.delete_snapshot_online(run.qmp, vm_disk.DRIVE_ID, disk, tag)
        else:
            await trio.to_thread.run_sync(vm_disk.delete_snapshot, disk, tag)
        return {"deleted": f"{vm_name(task_id)}:{timestamp}"}

    async def _tag_of(self, task_id: int, timestamp: int) -> str:
        for snapshot in await self._list_snapshots(task_id):
            if snapshot["timestamp"] == timestamp:
                return snapshot["name"]
        raise SnapshotNotFound(f"VM {task_id} has no snapshot {timestamp}")

    async def _restore_snapshot(self, task_id: int, timestamp: int) -> dict[str, Any]:
        """Revert the disk to a snapshot: a running VM is powered off, reverted and booted again; a VM that
        does not run is reverted in place (its next restart boots the restored disk)."""
        disk = self._disk_of(task_id)
        tag = await self._tag_of(task_id, timestamp)
        run = self.runs.get(task_id)
        if run is not None and run.phase in (VmPhase.BOOTING, VmPhase.RUNNING):
            await self._relaunch(run, lambda: vm_disk.apply_snapshot(disk, tag), f"restore of {timestamp}")
            return {"message": f"VPS {task_id} restored to snapshot {timestamp}; the guest is booting"}
        if run is not None:
            raise TaskConflict(f"VM {task_id} is {run.phase.value}; restore it once it runs or has ended")
        await trio.to_thread.run_sync(vm_disk.apply_snapshot, disk, tag)
        return {"message": f"VPS {task_id} restored to snapshot {timestamp}; restart it to boot that disk"}

    # The API's entry points: a failing qemu-img or QMP is the VM tool's failure (502), not the runner's.

    async def list_snapshots(self, task_id: int) -> list[dict[str, Any]]:
        with _tool_errors():
            return await self._list_snapshots(task_id)

    async def create_snapshot(self, task_id: int, message: str | None = None) -> dict[str, Any]:
        with _tool_errors():
            return await self._create_snapshot(task_id, message)

    async def delete_snapshot(self, task_id: int, timestamp: int) -> dict[str, Any]:
        with _tool_errors():
            return await self._delete_snapshot(task_id, timestamp)

    async def restore_snapshot(self, task_id: int, timestamp: int) -> dict[str, Any]:
        with _tool_errors():
            return await self._restore_snapshot(task_id, timestamp)

    # -- instances (admin) -------------------------------------------------------------------------------

    async def instances(self) -> list[dict[str, Any]]:
        def scan() -> list[dict[str, Any]]:
            found = []
            if not self.instances_dir.is_dir():
                return found
            for path in sorted(self.instances_dir.iterdir()):
                if not (path.is_dir() and path.name.isdigit()):
                    continue
                task_id = int(path.name)
                run = self.runs.get(task_id)
                disk = path / DISK_NAME
                found.append(
                    {
                        "task_id": str(task_id),
                        "path": str(path),
                        "disk_bytes": _allocated(disk),
                        "running": run is not None and run.pid is not None,
                        "pid": None if run is None else run.pid,
                        "tap": None if run is None else run.tap,
                    }
                )
            return found

        return await trio.to_thread.run_sync(scan)

    async def remove_instance(self, task_id: int) -> None:
        if task_id in self.runs:
            raise TaskConflict(f"VM {task_id} is held by this runner ({self.runs[task_id].phase.value})")
        path = self.instances_dir / str(task_id)
        if not path.is_dir():
            raise TaskNotFound(f"this runner has no VM instance {task_id}")
        await trio.to_thread.run_sync(shutil.rmtree, path)
        await trio.to_thread.run_sync(self.addresses.release, task_id)
        log.info("VM instance %s removed (%s)", task_id, path)

    # -- the supervisor ----------------------------------------------------------------------------------

    def _spawn(self, fn: Callable[..., Awaitable[None]], run: VmRun, *args: Any) -> None:
        assert self._nursery is not None, "VmManager.serve is not running"
        self._nursery.start_soon(self._guarded, fn, run, *args, name=f"vm {run.task_id}")

    async def _guarded(self, fn: Callable[..., Awaitable[None]], run: VmRun, *args: Any) -> None:
        try:
            await fn(run, *args)
        except Exception as exc:  # one VM fails, never the runner
            log.exception("VM %s: unexpected error", run.task_id)
            if run.state.final_report is None:
                with trio.CancelScope(shield=True), trio.move_on_after(30):
                    self._signal(run, signal.SIGKILL)
                    await self._finish(run, TaskStatus.FAILED, f"internal runner error: {exc}")
        finally:
            run.started.set()

    async def _execute(self, run: VmRun) -> None:
        request = run.request
        problem: str | None = None
        with run.prepare_scope:
            try:
                await self._prepare(run)
            except ValidationError as exc:
                problem = f"cannot create the VM: {exc}"
            except (vm_disk.VmDiskError, vm_network.VmNetworkError, NoFreePort) as exc:
                problem = f"cannot create the VM: {exc}"
            except OSError as exc:
                problem = f"cannot create the VM's files: {exc}"
        if run.state.killed_by_user or run.stop_requested or problem is not None or not run.argv:
            await self._release_network(run)
            if run.state.killed_by_user:
                await self._finish(run, TaskStatus.KILLED, "killed while preparing; the VM never started")
            elif run.stop_requested:
                await self._finish(run, TaskStatus.STOPPED, "stopped while preparing; it never started")
            else:
                log.warning("VM %s failed before start: %s", run.task_id, problem)
                await self._finish(run, TaskStatus.FAILED, problem or "preparation was interrupted")
            return
        del request
        await self._supervise(run, False)

    async def _prepare(self, run: VmRun) -> None:
        request, task_id, config = run.request, run.task_id, self.config
        assert request.vm_image is not None
        image = await trio.to_thread.run_sync(vm_disk.find_image, self.images_dir, request.vm_image)
        if image is None:
            raise vm_disk.VmDiskError(f"no VM image {request.vm_image!r} in {self.images_dir} on this node")
        size = parse_size(request.vm_disk_size or config.VM_DEFAULT_DISK_SIZE, "vm_disk_size")
        await trio.to_thread.run_sync(lambda: run.instance.mkdir(parents=True, exist_ok=True))
        fresh = not config.AUTO_RESTORE_ON_CREATE
        if fresh or not run.disk.exists():
            await trio.to_thread.run_sync(_remove, run.disk)
            base = await trio.to_thread.run_sync(_pinned_base, image, run.instance)
            await trio.to_thread.run_sync(vm_disk.create_overlay, base, run.disk, size)
            self.reporter.progress(task_id, f"disk made from {image.name}")
            step(task_id, "vm.disk_made")
        else:
            self.reporter.progress(task_id, "disk kept from the VPS's last run")
        if request.ssh_key_mode is not SshKeyMode.DISABLED:
            run.ssh_port = await self.ssh_ports.allocate(task_id)
        bridge = await self._place(run)
        run.tap = vm_network.tap_name(task_id)
        await trio.to_thread.run_sync(bridge.add_tap, run.tap)
        step(task_id, "vm.network_ready")
        addresses = await self._bind_gpus(run)
        seed = await self._seed(run)
        seed_path = run.instance / "seed.iso"
        await trio.to_thread.run_sync(_write, seed_path, seed)
        step(task_id, "vm.seed_written")
        run.argv = await self._argv(run, image, seed_path, addresses)

    async def _seed(self, run: VmRun) -> bytes:
        request, task_id, config = run.request, run.task_id, self.config
        key = await self._key()
        host_key = None
        if request.ssh_key_mode is not SshKeyMode.DISABLED:
            host_key = await trio.to_thread.run_sync(self.host_keys.get_or_create, task_id)
            run.host_public_key = await trio.to_thread.run_sync(self.host_keys.public_key, task_id)
        prefix = run.prefix or ipaddress.ip_network(config.VM_BRIDGE_SUBNET, strict=False).prefixlen
        dns = await trio.to_thread.run_sync(vm_network.read_guest_dns_servers)
        network = GuestNetwork(
            address=f"{run.address}/{prefix}",
            gateway=run.gateway or config.VM_BRIDGE_GATEWAY,
            mac=vm_network.mac_for_address(run.address),
            dns_servers=[d for d in dns if ":" not in d][:3],
        )
        mounts = [GuestMount(tag, path) for tag, path in SHARE_TAGS if self._share_source(tag) is not None]
        agent = None
        binary = await self._agent_binary(run)
        if binary is not None and self.tunnel_key is not None:
            mounts.append(GuestMount(AGENT_TAG, AGENT_GUEST_DIR, read_only=True))
            scheme = "wss" if config.tls_enabled else "ws"
            agent = GuestAgent(
                binary=f"{AGENT_GUEST_DIR}/{AGENT_BINARY}",
                runner_url=f"{scheme}://{run.gateway or config.VM_BRIDGE_GATEWAY}:{config.RUNNER_PORT}",
                name=vm_name(task_id),
                secret=container_secret(self.tunnel_key, vm_name(task_id)),
                args=("--agent",),
            )
            run.agent_expected = True
        seed = SeedRequest(
            hostname=vm_hostname(task_id),
            ssh_key_mode=request.ssh_key_mode or SshKeyMode.DISABLED,
            network=network,
            management_public_key=key.public_openssh,
            ssh_public_key=request.ssh_public_key,
            host_key=host_key,
            mounts=tuple(mounts),
            agent=agent,
        )
        return await trio.to_thread.run_sync(lambda: build_seed_iso(build_seed(seed)))

    def _share_source(self, tag: str) -> str | None:
        config = self.config
        if tag == "kr-shared":
            path = os.path.join(config.SHARED_DIR, "shared_data")
            return path if os.path.isdir(config.SHARED_DIR) else None
        if tag == "kr-local-temp":
            return config.LOCAL_TEMP_DIR
        return None

    async def _agent_binary(self, run: VmRun) -> Path | None:
        """A copy of the runner's tunnel client in ``<instance>/agent`` (shared read-only): the guest runs
        the same version as the runner, whatever its image holds."""
        if self.tunnels is None:
            return None
        source = await self.tunnels.locator.find(agent=True)
        if source is None:
            return None
        target = run.instance / "agent" / AGENT_BINARY

        def copy() -> None:
            target.parent.mkdir(exist_ok=True)
            tmp = target.with_suffix(".tmp")
            shutil.copyfile(source, tmp)
            os.chmod(tmp, 0o755)
            os.replace(tmp, target)

        await trio.to_thread.run_sync(copy)
        return target

    async def _place(self, run: VmRun) -> vm_network.VmBridge:
        """The VM's network: the overlay where this runner's is up (its TAP on the overlay bridge, an address
        of the runner's overlay subnet, the overlay's gateway and MTU: it reaches containers and VMs of
        every node), else the VM NAT bridge. Returns the bridge its TAP joins."""
        request, task_id = run.request, run.task_id
        placement = self.overlay_placement()
        if placement is None:
            if request.overlay_ip:
                raise vm_disk.VmDiskError(
                    f"the host gave overlay address {request.overlay_ip} but this runner's overlay is not up"
                )
            await self._ensure_bridge()
            address = await trio.to_thread.run_sync(self.addresses.allocate, task_id)
            run.address, run.on_overlay = str(address), False
            return self.bridge
        if request.overlay_ip:
            try:
                run.address = placement.check_address(request.overlay_ip)
            except SpecError as exc:
                raise vm_disk.VmDiskError(str(exc)) from None
        else:
            book = _overlay_book(self.store.root, placement)
            run.address = str(await trio.to_thread.run_sync(book.allocate, task_id))
        run.on_overlay = True
        run.gateway = str(placement.gateway)
        run.prefix = placement.subnet.prefixlen
        run.mtu = placement.mtu
        # Only add_tap/remove_tap on it: the overlay owns that bridge, its address and its rules.
        return vm_network.VmBridge(placement.bridge, str(placement.subnet), str(placement.gateway))

    async def _bind_gpus(self, run: VmRun) -> tuple[str, ...]:
        """Give the requested GPUs (their whole IOMMU groups) to vfio-pci; the addresses QEMU passes through.

        The host placed the VM on GPUs no container or VM holds; the runner checks again against what it
        runs (``vfio.allocate_gpus``) before it touches a driver, and gives the devices back when the VM ends
        (``_release``), or at once when one of them cannot be bound.
        """
        wanted = run.request.gpu_ids
        if not wanted:
            return ()
        held_by_vms = {g for other in self.runs.values() if other is not run for g in other.request.gpu_ids}
        grant = vfio.allocate_gpus(
            "vm",
            wanted,
            self.capability.vfio_gpus,
            held_by_containers=self.container_gpus(),
            held_by_vms=held_by_vms,
        )
        await trio.to_thread.run_sync(vfio.apply_acs_override, self.config.VM_ACS_OVERRIDE)
        changes, error = await trio.to_thread.run_sync(vfio.bind_devices, grant.bind_addresses)
        if error is not None:
            raise vm_disk.VmDiskError(f"cannot give GPU {','.join(map(str, wanted))} to vfio-pci: {error}")
        run.vfio = {change.address: change.driver_before for change in changes}
        return grant.bind_addresses

    async def _argv(
        self, run: VmRun, image: vm_disk.VmImage, seed_path: Path, vfio_devices: tuple[str, ...]
    ) -> list[str]:
        request, config, capability = run.request, self.config, self.capability
        shares = []
        for tag, _ in SHARE_TAGS:
            source = self._share_source(tag)
            if source is not None:
                await trio.to_thread.run_sync(lambda s=source: os.makedirs(s, exist_ok=True))
                shares.append((tag, source, False))
        if (run.instance / "agent" / AGENT_BINARY).exists():
            shares.append((AGENT_TAG, str(run.instance / "agent"), True))
        ovmf_code = ovmf_vars = None
        if image.firmware == "uefi":
            if capability.ovmf_code is None or capability.ovmf_vars is None:
                raise vm_disk.VmDiskError(f"image {image.name} boots with UEFI and this node has no OVMF")
            ovmf_code = capability.ovmf_code
            ovmf_vars = str(run.instance / "OVMF_VARS.fd")
            if not os.path.exists(ovmf_vars):
                await trio.to_thread.run_sync(shutil.copyfile, capability.ovmf_vars, ovmf_vars)
        launch = VmLaunch(
            name=vm_name(run.task_id),
            accel=capability.accel.value,
            cores=max(1, request.required_cores),
            memory_mb=request.memory_mb or config.VM_DEFAULT_MEMORY_MB,
            disk=run.disk,
            seed_iso=seed_path,
            tap=run.tap,
            mac=vm_network.mac_for_address(run.address),
            qmp_socket=run.instance / "qmp.sock",
            serial_log=run.instance / "serial.log",
            pidfile=run.instance / "qemu.pid",
            shares=shares,
            vfio_devices=list(vfio_devices),
            kernel=image.kernel,
            initrd=image.initrd,
            cmdline=image.cmdline,
            firmware=image.firmware,
            ovmf_code=ovmf_code,
            ovmf_vars=ovmf_vars,
        )
        return qemu_argv(launch)

    async def _launch(self, run: VmRun) -> None:
        await trio.to_thread.run_sync(_remove, run.instance / "qmp.sock")
        await trio.to_thread.run_sync(_truncate, run.instance / "serial.log")
        run.pid = await vm_process.launch(run.argv, log_path=run.instance / "qemu.log", cwd=run.instance)
        step(run.task_id, "vm.qemu_started")
        run.paused = False
        run.guest_powered_off = False
        run.watch = AgentWatch(self.config.VM_HEARTBEAT_TIMEOUT_SECONDS, trio.current_time())
        await self._save_meta(run)

    async def _save_meta(self, run: VmRun) -> None:
        meta = {
            "task_id": str(run.task_id),
            "pid": run.pid,
            "address": run.address,
            "tap": run.tap,
            "ssh_port": run.ssh_port,
            "agent": run.agent_expected,
            "overlay": run.on_overlay,
            "vfio": run.vfio,
            "argv": run.argv,
        }
        await trio.to_thread.run_sync(_write, run.instance / META_NAME, json.dumps(meta).encode())

    async def _supervise(self, run: VmRun, adopted: bool) -> None:
        """Launch (unless adopted), hold QMP, wait for readiness, watch until QEMU exits for good."""
        task_id = run.task_id
        booted_at = trio.current_time()
        if not adopted:
            await self._launch(run)
            run.phase = VmPhase.BOOTING
            run.state.phase = Phase.RUNNING
            run.state.started_at = utcnow()
            await self.store.save(run.state)
            log.info("VM %s: QEMU %s started (%s)", task_id, run.pid, self.capability.accel.value)
        run.started.set()
        outcome: str | None = None
        while True:
            async with trio.open_nursery() as nursery:
                if run.ssh_port is not None:
                    await nursery.start(self._relay, run)
                nursery.start_soon(self._hold_qmp, run)
                if run.phase is VmPhase.BOOTING:
                    nursery.start_soon(self._wait_ready, run, booted_at, nursery.cancel_scope)
                else:
                    nursery.start_soon(self._health_loop, run)
                assert run.pid is not None
                status = await vm_process.wait_exit(run.pid)
                nursery.cancel_scope.cancel()
            run.qmp = None
            log.info("VM %s: QEMU %s exited (%s)", task_id, run.pid, status)
            relaunch, run.relaunch = run.relaunch, None
            if relaunch is None or run.state.killed_by_user or run.stop_requested:
                outcome = _qemu_status(status)
                break
            try:
                await trio.to_thread.run_sync(relaunch)
                await self._launch(run)
            except Exception as exc:
                log.exception("VM %s: booting it again failed", task_id)
                outcome = f"booting it again failed: {exc}"
                break
            finally:
                if run.relaunched is not None:
                    run.relaunched.set()
            run.phase = VmPhase.BOOTING
            booted_at = trio.current_time()
            log.info("VM %s: QEMU %s started again", task_id, run.pid)
        await self._ended(run, outcome)

    async def _ended(self, run: VmRun, outcome: str | None) -> None:
        run.phase = VmPhase.FINISHING
        if run.state.killed_by_user:
            status, message = TaskStatus.KILLED, "killed by the user"
        elif run.failure is not None:
            status, message = TaskStatus.FAILED, run.failure
        elif run.stop_requested:
            status, message = TaskStatus.STOPPED, "stopped by the user"
        elif run.guest_powered_off and outcome in ("exit code 0", "exit status unknown"):
            status, message = TaskStatus.STOPPED, "the guest powered itself off"
        else:
            tail = await trio.to_thread.run_sync(_tail, run.instance / "qemu.log")
            status = TaskStatus.FAILED
            message = f"QEMU ended ({outcome})" + (f": {tail}" if tail else "")
        run.pid = None
        await self._save_meta(run)
        await self._finish(run, status, message)

    async def _finish(self, run: VmRun, status: TaskStatus, message: str) -> None:
        update = StatusUpdate(
            task_id=run.task_id,
            status=status,
            message=message,
            started_at=run.state.started_at,
            completed_at=utcnow(),
        )
        run.state.final_report = update
        run.state.phase = Phase.FINISHED
        await self.store.save(run.state)
        if self.runs.get(run.task_id) is run:
            del self.runs[run.task_id]
        if self.tunnels is not None:
            self.tunnels.container_ended(vm_name(run.task_id))
        await self._release_network(run)
        if run.state.forget:
            await self.store.delete(run.task_id)
        else:
            self.reporter.send_final(update)
        log.info("VM %s %s: %s", run.task_id, status.value, message)
        run.started.set()
        run.done.set()

    async def _release_network(self, run: VmRun) -> None:
        with trio.CancelScope(shield=True):
            if run.tap is not None:
                try:
                    await trio.to_thread.run_sync(self.bridge.remove_tap, run.tap)
                except vm_network.VmNetworkError as exc:
                    log.warning("VM %s: removing TAP %s failed: %s", run.task_id, run.tap, exc)
            await trio.to_thread.run_sync(_remove, run.instance / "qmp.sock")
            await self.ssh_ports.release(run.task_id)
            if run.vfio:
                for change in await trio.to_thread.run_sync(vfio.restore_devices, run.vfio):
                    if not change.ok:
                        log.error(
                            "VM %s: giving %s back failed: %s", run.task_id, change.address, change.error
                        )
                run.vfio = {}

    async def _relay(self, run: VmRun, *, task_status: trio.TaskStatus[None]) -> None:
        assert run.ssh_port is not None

        def target() -> tuple[str, int] | None:
            return None if run.address is None else (run.address, 22)

        try:
            await serve_relay(self.config.RUNNER_BIND_IP, run.ssh_port, target, task_status=task_status)
        except OSError as exc:
            log.error("VM %s: cannot listen on SSH port %s: %s", run.task_id, run.ssh_port, exc)
            task_status.started()

    async def _hold_qmp(self, run: VmRun) -> None:
        """Keep the QMP connection for commands, and read its events (pause state, guest power-off)."""
        try:
            async with open_qmp(str(run.instance / "qmp.sock")) as qmp:
                run.qmp = qmp
                status = await qmp.query_status()
                run.paused = not status.running and status.status == "paused"
                async for event in qmp:
                    name = event.name
                    if name == "STOP":
                        run.paused = True
                    elif name == "RESUME":
                        run.paused = False
                    elif name == "SHUTDOWN":
                        run.guest_powered_off = (event.data or {}).get("guest", False)
        except QmpError as exc:
            log.warning("VM %s: QMP connection lost: %s", run.task_id, exc)
        finally:
            run.qmp = None

    async def _wait_ready(self, run: VmRun, booted_at: float, scope: trio.CancelScope) -> None:
        """Until the guest is set up: progress lines, then ``running`` (with the SSH port and address).

        Set up means sshd answers with its banner (when the VPS has SSH) and the agent has sent its first
        heartbeat (when the VM has one): cloud-init starts the agent after the shares are mounted, so its
        heartbeat says the seed's last steps ran; sshd alone comes up before them. The boot is bounded by
        ``VM_BOOT_TIMEOUT_SECONDS`` (the agent, or sshd without one), SSH by ``VM_SSH_READY_TIMEOUT_SECONDS``.
        """
        config, task_id = self.config, run.task_id
        ssh = run.request.ssh_key_mode is not SshKeyMode.DISABLED
        agent = run.agent_expected
        ssh_ok = not ssh
        waits = []
        if ssh:
            waits.append(("SSH", config.VM_SSH_READY_TIMEOUT_SECONDS))
        if agent or not ssh:
            waits.append(("its agent", config.VM_BOOT_TIMEOUT_SECONDS))
        next_progress = trio.current_time()
        while True:
            now = trio.current_time()
            if not ssh_ok and run.address is not None and await _ssh_banner(run.address):
                ssh_ok = True
                step(task_id, "vm.ssh_answered")
            agent_ok = not agent or (run.watch is not None and run.watch.last is not None)
            if ssh_ok and agent_ok:
                break
            late = [(what, limit) for what, limit in waits if now >= booted_at + limit]
            late = [
                (w, lim) for w, lim in late if (w == "SSH" and not ssh_ok) or (w != "SSH" and not agent_ok)
            ]
            if late:
                what, limit = late[0]
                tail = await trio.to_thread.run_sync(_tail, run.instance / "serial.log")
                reason = f"the VM did not answer over {what} within {limit:.0f} s"
                log.warning("VM %s: %s", task_id, reason)
                run.failure = reason + (f"; its console's last lines: {tail}" if tail else "")
                run.relaunch = None
                self._signal(run, signal.SIGKILL)
                return
            if now >= next_progress and not run.state.forget:
                waiting = "SSH" if not ssh_ok else "the guest agent"
                self.reporter.progress(
                    task_id,
                    f"booting the VM ({self.capability.accel.value}): {now - booted_at:.0f} s, "
                    f"waiting for {waiting}",
                )
                next_progress = now + PROGRESS_EVERY
            await trio.sleep(PROBE_EVERY)
        run.phase = VmPhase.RUNNING
        step(task_id, "vm.ready")
        log.info("VM %s ready after %.1f s", task_id, trio.current_time() - booted_at)
        if not run.state.forget:
            self.reporter.send(
                StatusUpdate(
                    task_id=task_id,
                    status=TaskStatus.PAUSED if run.paused else TaskStatus.RUNNING,
                    started_at=run.state.started_at,
                    message=f"VM running at {run.address}"
                    + ("" if run.ssh_port is None else f", SSH on port {run.ssh_port}"),
                    ssh_port=run.ssh_port,
                    vm_ip=run.address,
                    overlay_ip=run.address if run.on_overlay else None,
                    vm_health=self._health(run),
                )
            )
        await self._health_loop(run)

    async def _health_loop(self, run: VmRun) -> None:
        last_state: VmAgentState | None = None
        last_sent = -HEALTH_REFRESH
        while True:
            now = trio.current_time()
            health = self._health(run)
            if health is not None and (health.agent is not last_state or now - last_sent >= HEALTH_REFRESH):
                if health.agent is not last_state and last_state is not None:
                    log.info("VM %s: agent %s -> %s", run.task_id, last_state.value, health.agent.value)
                last_state, last_sent = health.agent, now
                run.last_health = health
                if not run.state.forget and run.phase is VmPhase.RUNNING:
                    self.reporter.send(
                        StatusUpdate(
                            task_id=run.task_id,
                            status=TaskStatus.PAUSED if run.paused else TaskStatus.RUNNING,
                            started_at=run.state.started_at,
                            message=health.message,
                            ssh_port=run.ssh_port,
                            vm_ip=run.address,
                            vm_health=health,
                        )
                    )
            await trio.sleep(1.0)

    def _health(self, run: VmRun) -> VmHealth | None:
        if run.watch is None or self.tunnels is None:
            return None
        if run.paused:
            # A paused guest cannot speak: its silence says nothing about its agent.
            return run.last_health
        return run.watch.health(trio.current_time(), utcnow())

    # -- the agent's side (tunnel server callbacks) ---------------------------------------------------

    def _run_of(self, name: str) -> VmRun | None:
        if not name.startswith(VM_NAME_PREFIX):
            return None
        text = name[len(VM_NAME_PREFIX) :]
        return self.runs.get(int(text)) if text.isdigit() else None

    def _agent_heartbeat(self, name: str, heartbeat: AgentHeartbeat) -> None:
        run = self._run_of(name)
        if run is not None and run.watch is not None:
            if run.watch.last is None:
                step(run.task_id, "vm.agent_first_heartbeat")
            run.watch.heartbeat(heartbeat, trio.current_time())

    def _agent_attached(self, name: str) -> None:
        run = self._run_of(name)
        if run is not None and run.watch is not None:
            run.watch.attached(trio.current_time())

    def _agent_detached(self, name: str) -> None:
        run = self._run_of(name)
        if run is not None and run.watch is not None:
            run.watch.detached(trio.current_time())

    # -- helpers ---------------------------------------------------------------------------------------

    def _live(self, task_id: int, verb: str) -> VmRun:
        run = self._get(task_id)
        if run.phase is VmPhase.PREPARING:
            raise TaskConflict(f"VM {task_id} is still being prepared; it cannot be {verb} yet")
        if run.phase is VmPhase.FINISHING:
            raise TaskConflict(f"VM {task_id} has already ended")
        return run

    def _qmp(self, run: VmRun) -> QmpClient:
        if run.qmp is None:
            raise TaskConflict(f"VM {run.task_id}'s QEMU does not answer on its control socket")
        return run.qmp

    @staticmethod
    async def _qmp_call(run: VmRun, what: str, call: Callable[[], Awaitable[None]]) -> None:
        try:
            await call()
        except QmpError as exc:
            raise BackendFailure(f"QEMU refused to {what} VM {run.task_id}: {exc}") from None

    def _signal(self, run: VmRun, sig: int) -> None:
        if run.pid is not None:
            vm_process.signal(run.pid, sig)

    async def _power_off(self, run: VmRun) -> None:
        """ACPI power button, then QMP quit, then SIGKILL; returns once QEMU is gone (bounded)."""
        pid = run.pid
        if pid is None:
            return
        qmp = run.qmp
        with trio.move_on_after(POWERDOWN_GRACE + QUIT_GRACE + 5):
            try:
                if qmp is not None:
                    if run.paused:
                        await qmp.cont()
                    await qmp.system_powerdown()
                    with trio.move_on_after(POWERDOWN_GRACE):
                        await vm_process.wait_exit(pid)
                        return
                    log.warning(
                        "VM %s: the guest did not power off in %.0f s; quitting", run.task_id, POWERDOWN_GRACE
                    )
                    await qmp.quit()
            except QmpError as exc:
                log.warning("VM %s: QMP failed during power-off (%s); killing QEMU", run.task_id, exc)
            with trio.move_on_after(QUIT_GRACE):
                await vm_process.wait_exit(pid)
                return
        vm_process.signal(pid, signal.SIGKILL)

    async def _relaunch(self, run: VmRun, action: Callable[[], None], what: str) -> None:
        """Power the guest off, run ``action`` (in a thread) while QEMU is gone, boot again."""
        if run.relaunch is not None:
            raise TaskConflict(f"VM {run.task_id} is already being restarted")
        done = run.relaunched = trio.Event()
        run.relaunch = action
        log.info("VM %s: %s: powering off", run.task_id, what)
        await self._power_off(run)
        with trio.move_on_after(QUIT_GRACE):
            await done.wait()
        run.relaunched = None
        if not done.is_set():
            raise TaskConflict(f"VM {run.task_id}: QEMU did not start again after the {what}")
        if not run.state.forget:
            self.reporter.send(
                StatusUpdate(
                    task_id=run.task_id,
                    status=TaskStatus.RUNNING,
                    started_at=run.state.started_at,
                    message=f"{what}: the guest is booting",
                    ssh_port=run.ssh_port,
                    vm_ip=run.address,
                )
            )

    async def _guest_sync(self, run: VmRun) -> None:
        """Flush the guest's page cache before a crash-consistent snapshot (best effort, bounded)."""
        target = self.ssh_target(run.task_id)
        if target is None or run.paused:
            return
        with trio.move_on_after(15):
            try:
                await ssh_run(target, ["sync"], timeout=10)
            except Exception as exc:  # the snapshot is still crash-consistent
                log.info("VM %s: sync before the snapshot failed: %s", run.task_id, exc)

    async def _key(self) -> ManagementKey:
        if self._management_key is None:
            self._management_key = await trio.to_thread.run_sync(
                ManagementKey.load_or_create, self.store.root
            )
        return self._management_key

    async def _ensure_bridge(self) -> None:
        async with self._bridge_lock:
            if not self._bridge_ready:
                await trio.to_thread.run_sync(self.bridge.ensure)
                self._bridge_ready = True

    # -- re-adoption -----------------------------------------------------------------------------------

    async def _adopt_all(self) -> None:
        held: set[str] = set()
        for entry in self.store.entries():
            if not is_vm_request(entry.request) or entry.task_id in self.runs:
                continue
            run = VmRun(entry, self.instances_dir / str(entry.task_id))
            if entry.final_report is not None:
                if entry.forget:
                    await self.store.delete(entry.task_id)
                else:
                    self.reporter.send_final(entry.final_report)
                continue
            meta = await trio.to_thread.run_sync(_read_meta, run.instance / META_NAME)
            pid = meta.get("pid") if meta else None
            alive = isinstance(pid, int) and await trio.to_thread.run_sync(
                vm_process.is_qemu_of, pid, run.instance
            )
            if not alive:
                run.tap = vm_network.tap_name(entry.task_id)
                run.vfio = dict((meta or {}).get("vfio") or {})
                self.runs[entry.task_id] = run
                reason = "the VM's QEMU process ended while the runner was down"
                if entry.phase is Phase.PREPARING:
                    reason = "the runner restarted while preparing the VM"
                log.warning("VM %s: %s", entry.task_id, reason)
                status = TaskStatus.KILLED if entry.killed_by_user else TaskStatus.FAILED
                await self._finish(run, status, reason)
                continue
            assert meta is not None
            run.pid, run.address, run.tap = pid, meta.get("address"), meta.get("tap")
            run.argv = list(meta.get("argv") or [])
            run.ssh_port = meta.get("ssh_port")
            run.agent_expected = bool(meta.get("agent"))
            run.on_overlay = bool(meta.get("overlay"))
            run.vfio = dict(meta.get("vfio") or {})
            if entry.request is not None and entry.request.ssh_key_mode is not SshKeyMode.DISABLED:
                run.host_public_key = await trio.to_thread.run_sync(self.host_keys.public_key, entry.task_id)
                await self._key()
            if run.ssh_port is not None:
                await self.ssh_ports.claim(entry.task_id, run.ssh_port)
            if run.address is not None:
                try:  # a damaged address table must not hand this address to a new VM
                    await trio.to_thread.run_sync(self.addresses.claim, entry.task_id, run.address)
                except vm_network.VmNetworkError as exc:
                    log.warning(
                        "VM %s: cannot claim its address %s again: %s", entry.task_id, run.address, exc
                    )
            run.phase = VmPhase.RUNNING
            run.watch = AgentWatch(self.config.VM_HEARTBEAT_TIMEOUT_SECONDS, trio.current_time())
            self.runs[entry.task_id] = run
            if run.tap:
                held.add(run.tap)
            log.info("VM %s: re-adopted QEMU %s", entry.task_id, pid)
            if entry.killed_by_user:
                self._signal(run, signal.SIGKILL)
            elif not entry.forget:
                self.reporter.send(
                    StatusUpdate(
                        task_id=entry.task_id,
                        status=TaskStatus.RUNNING,
                        started_at=entry.started_at,
                        message="re-adopted by the restarted runner",
                        ssh_port=run.ssh_port,
                        vm_ip=run.address,
                    )
                )
            self._spawn(self._supervise, run, True)
        await self._remove_stray_taps(held)

    async def _remove_stray_taps(self, held: set[str]) -> None:
        try:
            taps = await trio.to_thread.run_sync(self.bridge.taps)
        except vm_network.VmNetworkError as exc:
            log.info("listing VM TAPs failed: %s", exc)
            return
        for tap in taps:
            if tap not in held:
                log.info("removing TAP %s of a VM this runner no longer holds", tap)
                with contextlib.suppress(vm_network.VmNetworkError):
                    await trio.to_thread.run_sync(self.bridge.remove_tap, tap)


def is_vm_request(request: ExecuteRequest | None) -> bool:
    return request is not None and request.vps_backend.value == "qemu"


@contextlib.contextmanager
def _tool_errors() -> Iterator[None]:
    try:
        yield
    except vm_disk.SnapshotNotFound:
        raise
    except (vm_disk.VmDiskError, QmpError) as exc:
        raise BackendFailure(str(exc)) from None


def _vfio_info(gpu: Any) -> VfioGpuInfo:
    return VfioGpuInfo(
        gpu_id=gpu.gpu_id,
        address=gpu.address,
        iommu_group=gpu.device.iommu_group,
        driver=gpu.device.driver,
        viable=gpu.viable,
        problems=list(gpu.problems),
        group_gpus=list(gpu.gpu_peers),
    )


def _snapshot_json(task_id: int, snapshot: vm_disk.DiskSnapshot) -> dict[str, Any]:
    created = dt.datetime.fromtimestamp(snapshot.created_at, dt.UTC)
    return {
        "tag": f"{vm_name(task_id)}:{snapshot.timestamp}",
        "name": snapshot.tag,
        "timestamp": snapshot.timestamp,
        "created_at": created.isoformat().replace("+00:00", "Z"),
        "size_bytes": snapshot.vm_state_bytes,
        "message": snapshot.message,
    }


def _qemu_status(status: int | None) -> str:
    """``vm_process.wait_exit``'s answer in words (None: an adopted QEMU, whose status only its parent
    could read)."""
    if status is None:
        return "exit status unknown"
    if status < 0:
        return f"killed by signal {-status}"
    return f"exit code {status}"


async def _ssh_banner(address: str, port: int = 22) -> bool:
    """Whether an sshd answers with its banner (a TCP accept alone is not enough: see vm-recipes)."""
    with trio.move_on_after(3):
        try:
            stream = await trio.open_tcp_stream(address, port)
        except OSError:
            return False
        async with stream:
            data = await stream.receive_some(256)
            return data.startswith(b"SSH-")
    return False


def _overlay_book(state_dir: Path, placement: Any) -> vm_network.AddressBook:
    """VM addresses on the overlay: the upper half of the runner's subnet, which Docker never picks from
    (``overlay_manager`` gives it the lower half), without the host's address. Blocking (reads the file)."""
    upper = list(placement.subnet.subnets(prefixlen_diff=1))[1]
    taken = [a for a in placement.reserved if a in upper]
    # The book always keeps its "gateway" free: make that the reserved address that falls in this half.
    return vm_network.AddressBook(
        state_dir / "vm_overlay_addresses.json", str(upper), str(taken[0] if taken else upper.network_address)
    )


def _pinned_base(image: vm_disk.VmImage, instance: Path) -> vm_disk.VmImage:
    """The base the overlay names: a hard link in the instance directory where the filesystem allows it.

    An overlay records its base by path; an admin who rebuilds an image in place (a new file renamed over
    the old one) would otherwise change the disk under every VM made from it. The link keeps the old file
    alive for them. Across filesystems there is no link: the image's own path, and a log line.
    """
    pinned = instance / "base.qcow2"
    with contextlib.suppress(FileNotFoundError):
        pinned.unlink()
    try:
        os.link(image.path, pinned)
    except OSError as exc:
        log.info(
            "VM image %s cannot be linked into %s (%s); the overlay names it directly",
            image.path,
            instance,
            exc,
        )
        return image
    return attrs.evolve(image, path=pinned)


def _allocated(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _truncate(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.write_bytes(b"")


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _tail(path: Path, lines: int = 5, limit: int = 600) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 8192))
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return ""
        return f"({exc})"
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept)[-limit:]
