"""One command task's life on the runner: image -> container -> wait -> collect -> report.

``TaskManager`` owns the executors: each accepted or adopted task gets one task in the manager's nursery
(a child of the daemon's nursery). Cancelling that nursery (runner shutdown or crash-like stop) abandons the
executors where they are and leaves the containers running: a restarted runner re-adopts them from the Docker
labels and its state records (``reconcile.py``). A *kill* is different: it cancels only that task's
preparation scope, or sends SIGKILL to its container, and the executor reports ``killed``.

The order of the steps after a container exits is what makes restarts safe:
logs are copied to ``<state>/logs/<id>/``, the final report is written to the state record, the report is
delivered (retried until the host acknowledges it; the record is deleted then), then the container is removed
(after the report: `docker run --rm` waits for the removal, a task's user need not). A crash between any two
steps is repaired by ``reconcile`` from whatever is left. Ahead of all that, a command that exits 0 is
reported ``completed`` at the engine's ``die`` event (``exit_events``): a plain report, which the host takes
as the task's end; the collection above still happens and its final report is what the record keeps.

What is saved when: the record at acceptance (the host was told yes) and with the final report, both
fsynced; the ``running`` phase after the report is queued (it only words the reason should the container
vanish); never at ``created`` (reconcile finds a created container by its labels and removes it).

A Docker VPS takes the same path with three differences: its spec comes from ``vps_spec`` (sshd or a
keep-alive, port 22 on the SSH port ``ssh_ports`` allocated), the files sshd needs are uploaded between create
and start (``vps_files``), and it ends ``stopped`` on exit 0 or when a user stopped it (``stop_vps``, after
a snapshot). ``restart_vps`` restarts the container under the same waiter; its SSH port is freed in
``_release``, like every other resource of an ended task.

While this runner's overlay is up (``overlay_manager.OverlayManager.placement``), a new container (task or
Docker VPS) joins the overlay's Docker network instead of the task network, at the address the host reserved
for it if any, and its ``running`` report carries its overlay address (also after a re-adoption or a VPS
restart).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs
import trio

from kohakuriver_net.task_steps import step
from kohakuriver_proto.lifecycle import TaskStatus, TaskType, describe_exit, status_for_exit
from kohakuriver_proto.models import ExecuteRequest, StatusUpdate, TaskControl, VmFacts, VpsBackend

from .container_spec import (
    CONTAINER_PREFIX,
    LABEL_TASK_TYPE,
    NodeFacts,
    SpecError,
    build_container_spec,
    container_name,
    host_directories,
)
from .docker_api import Conflict, ContainerInfo, DockerClient, DockerError, NotFound
from .exit_events import ContainerExit, ExitEvents
from .images import ImageError, ImageResolver
from .logs import save_container_logs, tail_file
from .runner_settings import RunnerSettings
from .snapshots import Snapshots, snapshot_repo
from .ssh_ports import NoFreePort, SshPorts
from .state import Phase, StateStore, TaskState
from .tunnel_server import HeldContainer, TunnelServer
from .vps_files import HostKeyStore, SshdMissing, install_vps_files
from .vps_spec import build_vps_spec, ssh_enabled, ssh_port_from_labels

__all__ = [
    "BackendFailure",
    "DockerStatus",
    "Reporter",
    "RestoreUnsupported",
    "RunnerUnavailable",
    "TaskConflict",
    "TaskManager",
    "TaskNotFound",
    "TaskRun",
]

log = logging.getLogger("kohakuriver.runner.executor")

#: Backoff bounds when Docker answers a wait with an error (the engine reconnect itself is in docker_api).
_WAIT_RETRY_MAX = 30.0
#: A VPS's stop/restart: seconds sshd (or the keep-alive) gets between SIGTERM and SIGKILL, and how long the
#: stop request waits for the exited container to be collected and reported.
VPS_STOP_GRACE = 10
VPS_STOP_WAIT = 60.0


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class TaskNotFound(LookupError):
    """The runner holds no task with this id."""


class TaskConflict(Exception):
    """The task is in a state that does not allow the request (pause while preparing, kill when done)."""


class BackendFailure(Exception):
    """QEMU or a VM tool failed at the request (answered 502)."""


class RestoreUnsupported(Exception):
    """This kind of VPS has no in-place snapshot restore (answered 501)."""


class RunnerUnavailable(Exception):
    """The runner cannot take work now (Docker unreachable); the message says why."""


class Reporter(Protocol):
    """Where status reports go (``host_client.Reporter``)."""

    def send(self, update: StatusUpdate) -> None: ...

    def send_final(self, update: StatusUpdate) -> None: ...

    def progress(self, task_id: int, text: str) -> None: ...


@attrs.define
class DockerStatus:
    """Whether the engine answers (kept current by ``daemon._watch_docker``)."""

    available: bool = False
    error: str | None = "not checked yet"


class RunPhase(enum.Enum):
    PREPARING = "preparing"
    CREATED = "created"
    RUNNING = "running"
    FINISHING = "finishing"


@attrs.define(eq=False)
class TaskRun:
    """The live side of a task the runner holds (``state`` is its persisted record)."""

    state: TaskState
    phase: RunPhase = RunPhase.PREPARING
    prepare_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    #: Set once the container has started, or the task ended without one (log followers wait on it).
    started: trio.Event = attrs.field(factory=trio.Event)
    done: trio.Event = attrs.field(factory=trio.Event)
    #: An executor task owns this run (it will finish it, whatever happens).
    has_executor: bool = False
    task_type: TaskType = TaskType.COMMAND
    #: A VPS stop was asked for: its exit, whatever the code, is ``stopped``.
    stop_requested: bool = False
    #: Set while ``docker restart`` runs: the waiter must not collect the container it sees stop.
    restarting: trio.Event | None = None

    @property
    def task_id(self) -> int:
        return self.state.task_id

    @property
    def container_id(self) -> str | None:
        return self.state.container_id


class TaskManager:
    """Accepts, adopts, controls and finishes tasks. Run ``serve`` in the daemon's nursery first."""

    def __init__(
        self,
        *,
        config: RunnerSettings,
        docker: DockerClient,
        store: StateStore,
        images: ImageResolver,
        reporter: Reporter,
        docker_status: DockerStatus,
        node_facts: Callable[[], Awaitable[NodeFacts]],
        tunnels: TunnelServer | None = None,
        exits: ExitEvents | None = None,
    ) -> None:
        self.config = config
        #: The engine's ``die`` events: a command that exits 0 is reported at once (``exit_events``).
        self.exits = exits
        #: Port forwarding: injects the tunnel client into new containers, told when containers end.
        self.tunnels = tunnels
        self.docker = docker
        self.store = store
        self.images = images
        self.reporter = reporter
        self.docker_status = docker_status
        self.node_facts = node_facts
        self.runs: dict[int, TaskRun] = {}
        self._nursery: trio.Nursery | None = None
        # Docker VPS: SSH ports, host keys and snapshots (state next to the task records).
        self.ssh_ports = SshPorts(
            store.root / "ssh_ports.json", config.VPS_SSH_PORT_START, config.RUNNER_BIND_IP
        )
        self.host_keys = HostKeyStore(store.root / "vps-host-keys")
        self.snapshots = Snapshots(docker, config)
        #: VM VPS (``vm_manager.VmManager``), set by the daemon; every call for one of its tasks goes there.
        self.vms: Any = None
        #: The overlay (``overlay_manager.OverlayManager``), set by the daemon when OVERLAY_ENABLED: new
        #: containers join its network while it is up (``placement()``).
        self.overlay: Any = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the executors' nursery open until cancelled."""
        await self.ssh_ports.load()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def _spawn(self, fn: Callable[..., Awaitable[None]], run: TaskRun, *args: Any) -> None:
        assert self._nursery is not None, "TaskManager.serve is not running"
        run.has_executor = True
        self._nursery.start_soon(self._guarded, fn, run, *args, name=f"task {run.task_id}")

    def held_task_ids(self) -> list[int]:
        """Tasks whose container is alive, running or paused: a heartbeat's ``running_tasks``.

        Tasks still preparing are left out: the host reads an id in this list as "its container runs"
        (an ``assigning`` task becomes ``running``), which would be false while the image is pulled.
        """
        held = [tid for tid, run in self.runs.items() if run.phase is RunPhase.RUNNING]
        return held + (self.vms.held_task_ids() if self.vms is not None else [])

    def _vm(self, task_id: int) -> Any:
        """The VM manager when ``task_id`` is one of its VMs, else None."""
        vms = self.vms
        return vms if vms is not None and task_id not in self.runs and vms.owns(task_id) else None

    def held_gpus(self) -> set[int]:
        """GPU ids of the containers this runner holds (a VM never gets one of them)."""
        return {g for run in self.runs.values() if run.state.request for g in run.state.request.gpu_ids}

    def vm_facts(self) -> VmFacts | None:
        return None if self.vms is None else self.vms.facts()

    def find_container(self, ref: str) -> HeldContainer | None:
        """The command task a tunnel request names: a decimal task id or its container name."""
        text = ref[len(CONTAINER_PREFIX) :] if ref.startswith(CONTAINER_PREFIX) else ref
        if not (text.isascii() and text.isdigit()) or len(text) > 19:
            return None
        task_id = int(text)
        run = self.runs.get(task_id)
        if run is None:
            return None
        return HeldContainer(
            task_id=task_id,
            name=container_name(task_id),
            running=run.phase is RunPhase.RUNNING,
            status=run.phase.value,
        )

    def _container_ended(self, task_id: int) -> None:
        if self.tunnels is not None:
            self.tunnels.container_ended(container_name(task_id))

    # -- requests from the host ------------------------------------------------------------------------

    async def execute(self, request: ExecuteRequest) -> bool:
        """Accept a task; False when this id is already held (a retried dispatch: accepted once)."""
        if request.vps_backend is VpsBackend.QEMU:
            if self.vms is None:
                raise RunnerUnavailable("this runner does not run VMs")
            if request.task_id in self.runs:
                return False
            return await self.vms.execute(request)
        if not self.docker_status.available:
            raise RunnerUnavailable(f"Docker is not available on this runner: {self.docker_status.error}")
        task_id = request.task_id
        step(task_id, "runner.execute_received")
        if task_id in self.runs or self.store.get(task_id) is not None:
            return False
        state = TaskState(task_id=task_id, request=request, accepted_at=utcnow())
        run = TaskRun(state, task_type=request.task_type)
        # Claim the id before the first await so that a concurrent duplicate sees it.
        self.runs[task_id] = run
        try:
            await self.store.save(state)
        except BaseException:
            del self.runs[task_id]
            raise
        step(task_id, "runner.record_saved")
        log.info("task %s accepted: %s", task_id, [request.command, *request.arguments][:8])
        self._spawn(self._execute, run)
        return True

    def _get(self, task_id: int) -> TaskRun:
        run = self.runs.get(task_id)
        if run is not None:
            return run
        entry = self.store.get(task_id)
        if entry is not None and entry.final_report is not None:
            raise TaskConflict(f"task {task_id} already finished ({entry.final_report.status.value})")
        raise TaskNotFound(f"this runner holds no task {task_id}")

    async def kill(self, task_id: int, *, forget: bool = False) -> TaskControl:
        """SIGKILL the task's container, or cancel its preparation. ``forget``: report nothing (the host
        already considers the task over)."""
        if vms := self._vm(task_id):
            return await vms.kill(task_id, forget=forget)
        run = self._get(task_id)
        if run.phase is RunPhase.FINISHING:
            raise TaskConflict(f"task {task_id} has already exited")
        run.state.killed_by_user = True
        run.state.forget = run.state.forget or forget
        await self.store.save(run.state)
        if run.phase is RunPhase.PREPARING:
            run.prepare_scope.cancel()
            message = "preparation cancelled; the container will not start"
        elif run.phase is RunPhase.CREATED:
            message = "the container will be removed before it starts"
        else:
            await self._signal_kill(run)
            message = "killed"
        log.info("task %s: kill requested%s", task_id, " by the host's heartbeat reply" if forget else "")
        return TaskControl(task_id=task_id, ok=True, message=message)

    async def _signal_kill(self, run: TaskRun) -> None:
        # Conflict/NotFound: already exiting or gone; the executor reports what happened.
        with contextlib.suppress(Conflict, NotFound):
            await self.docker.kill(run.container_id, "SIGKILL")

    async def _running_container(self, task_id: int, verb: str) -> tuple[TaskRun, ContainerInfo]:
        run = self._get(task_id)
        if run.phase in (RunPhase.PREPARING, RunPhase.CREATED):
            raise TaskConflict(f"task {task_id} is still being prepared; it cannot be {verb} yet")
        if run.phase is RunPhase.FINISHING:
            raise TaskConflict(f"task {task_id} has already exited")
        try:
            info = await self.docker.inspect(run.container_id)
        except NotFound:
            raise TaskConflict(f"the container of task {task_id} is gone") from None
        return run, info

    async def pause(self, task_id: int) -> TaskControl:
        if vms := self._vm(task_id):
            return await vms.pause(task_id)
        run, info = await self._running_container(task_id, "paused")
        if info.state.paused:
            return TaskControl(task_id=task_id, ok=True, message="already paused")
        if not info.state.running:
            raise TaskConflict(f"task {task_id} is not running")
        await self.docker.pause(run.container_id)
        log.info("task %s paused", task_id)
        return TaskControl(task_id=task_id, ok=True, message="paused")

    async def resume(self, task_id: int) -> TaskControl:
        if vms := self._vm(task_id):
            return await vms.resume(task_id)
        run, info = await self._running_container(task_id, "resumed")
        if not info.state.paused:
            if info.state.running:
                return TaskControl(task_id=task_id, ok=True, message="not paused")
            raise TaskConflict(f"task {task_id} is not running")
        await self.docker.unpause(run.container_id)
        log.info("task %s resumed", task_id)
        return TaskControl(task_id=task_id, ok=True, message="resumed")

    # -- VPS -------------------------------------------------------------------------------------------

    def _get_vps(self, task_id: int) -> TaskRun:
        run = self._get(task_id)
        if run.task_type is not TaskType.VPS:
            raise TaskConflict(f"task {task_id} is not a VPS")
        return run

    async def stop_vps(self, task_id: int) -> TaskControl:
        """Snapshot (``AUTO_SNAPSHOT_ON_STOP``), stop and remove the VPS's container; it ends ``stopped``.

        Answers once the container is collected (bounded): the report is on its way then and the SSH port
        is free. A failed snapshot fails the stop and leaves the VPS running: stopping would lose the
        user's changes (``kill`` discards them on purpose).
        """
        if vms := self._vm(task_id):
            return await vms.stop(task_id)
        run = self._get_vps(task_id)
        if run.phase is RunPhase.FINISHING:
            raise TaskConflict(f"task {task_id} has already exited")
        if run.phase in (RunPhase.PREPARING, RunPhase.CREATED):
            run.stop_requested = True
            run.prepare_scope.cancel()
            return TaskControl(task_id=task_id, ok=True, message="stopped before it started")
        note = ""
        if self.config.AUTO_SNAPSHOT_ON_STOP:
            snapshot = await self.snapshots.create(task_id, run.container_id, "automatic snapshot on stop")
            note = f"; its state is in snapshot {snapshot.tag}"
        run.stop_requested = True
        try:
            if (await self.docker.inspect(run.container_id)).state.paused:
                await self.docker.unpause(run.container_id)
            await self.docker.stop(run.container_id, timeout=VPS_STOP_GRACE)
        except (NotFound, Conflict):
            pass  # already gone or exiting: the waiter reports it
        with trio.move_on_after(VPS_STOP_WAIT):
            await run.done.wait()
        log.info("task %s: VPS stopped%s", task_id, note)
        return TaskControl(task_id=task_id, ok=True, message="stopped" + note)

    async def restart_vps(self, task_id: int) -> TaskControl:
        """``docker restart``: same container (files, SSH port and host key kept), still ``running``."""
        if vms := self._vm(task_id):
            return await vms.restart(task_id)
        self._get_vps(task_id)
        run, info = await self._running_container(task_id, "restarted")
        done = run.restarting = trio.Event()
        try:
            if info.state.paused:
                await self.docker.unpause(run.container_id)
            await self.docker.restart(run.container_id, timeout=VPS_STOP_GRACE)
        finally:
            run.restarting = None
            done.set()
        log.info("task %s: VPS restarted", task_id)
        # The address again, after the restart (a container Docker gave an address may get another one).
        on_overlay = self.config.OVERLAY_NETWORK_NAME in info.networks
        network = self.config.OVERLAY_NETWORK_NAME if on_overlay and run.container_id else None
        self.reporter.send(
            StatusUpdate(
                task_id=task_id,
                status=TaskStatus.RUNNING,
                started_at=run.state.started_at,
                message="restarted",
                ssh_port=self.ssh_ports.get(task_id),
                overlay_ip=await self._overlay_ip(network, run.container_id or "", None),
            )
        )
        return TaskControl(task_id=task_id, ok=True, message="restarted")

    async def snapshot_vps(self, task_id: int, message: str | None = None) -> dict[str, Any]:
        """Commit the VPS's container now (running or paused); a VM's disk snapshot (running or not)."""
        if self._vm_disk(task_id):
            return await self.vms.create_snapshot(task_id, message)
        self._get_vps(task_id)
        run, _ = await self._running_container(task_id, "snapshotted")
        return (await self.snapshots.create(task_id, run.container_id, message)).to_json()

    def _vm_disk(self, task_id: int) -> bool:
        """Snapshots of ``task_id`` are a VM's (held, or its disk is still on this node)."""
        vms = self.vms
        return (
            vms is not None and task_id not in self.runs and (vms.owns(task_id) or vms.has_instance(task_id))
        )

    async def list_snapshots(self, task_id: int) -> list[dict[str, Any]]:
        if self._vm_disk(task_id):
            return await self.vms.list_snapshots(task_id)
        return [s.to_json() for s in await self.snapshots.list_snapshots(task_id)]

    async def delete_snapshot(self, task_id: int, timestamp: int) -> dict[str, Any]:
        if self._vm_disk(task_id):
            return await self.vms.delete_snapshot(task_id, timestamp)
        await self.snapshots.delete(task_id, timestamp)
        return {"deleted": f"{snapshot_repo(task_id)}:{timestamp}"}

    async def restore_snapshot(self, task_id: int, timestamp: int) -> dict[str, Any]:
        """A VM's disk goes back to the snapshot. A Docker VPS is restored by re-creating it from its newest
        snapshot (``kr vps restart`` of a stopped VPS with ``AUTO_RESTORE_ON_CREATE``)."""
        if self._vm_disk(task_id):
            return await self.vms.restore_snapshot(task_id, timestamp)
        raise RestoreUnsupported(
            "a Docker VPS is restored by restarting it once stopped: it is re-created from its newest "
            "snapshot"
        )

    # -- adoption (reconcile) --------------------------------------------------------------------------

    async def adopt(self, info: ContainerInfo, task_id: int, entry: TaskState | None) -> None:
        """Take over a container found at start-up (or after Docker came back)."""
        if task_id in self.runs:
            return
        if entry is None:
            entry = TaskState(task_id=task_id, phase=Phase.RUNNING, container_id=info.id)
        if entry.final_report is not None:
            # Collected and reported before the crash; only the removal was missing.
            await self._remove_container(info.id)
            await self._deliver_final(entry)
            return
        entry.container_id = info.id
        entry.started_at = entry.started_at or info.state.started_at
        vps = info.labels.get(LABEL_TASK_TYPE) == TaskType.VPS.value
        run = TaskRun(entry, task_type=TaskType.VPS if vps else TaskType.COMMAND)
        self.runs[task_id] = run
        try:
            await self._adopt(run, info)
        except BaseException:
            # Not adopted after all: the next reconciliation must not find it "already held".
            if self.runs.get(task_id) is run and not run.has_executor:
                del self.runs[task_id]
            raise

    async def _adopt(self, run: TaskRun, info: ContainerInfo) -> None:
        entry, task_id = run.state, run.task_id
        status = info.state.status
        if info.state.running or info.state.paused or status == "restarting":
            entry.phase = Phase.RUNNING
            await self.store.save(entry)
            ssh_port = await self._adopted_ssh_port(run, info)
            run.phase = RunPhase.RUNNING
            run.started.set()
            self._spawn(self._watch_adopted, run)
            if not (entry.killed_by_user or entry.forget):
                state = TaskStatus.PAUSED if info.state.paused else TaskStatus.RUNNING
                self.reporter.send(
                    StatusUpdate(
                        task_id=task_id,
                        status=state,
                        started_at=entry.started_at,
                        message="re-adopted by the restarted runner",
                        ssh_port=ssh_port,
                        overlay_ip=info.networks.get(self.config.OVERLAY_NETWORK_NAME) or None,
                    )
                )
            log.info("task %s: re-adopted %s container %s", task_id, status, info.name)
        elif status == "created":
            # Created but never started: the runner stopped between the two calls.
            await self._remove_container(info.id)
            run.started.set()
            await self._finish(
                run,
                TaskStatus.KILLED if entry.killed_by_user else TaskStatus.FAILED,
                "the runner stopped before the container was started",
            )
        else:  # exited, dead, removing
            run.phase = RunPhase.FINISHING
            run.started.set()
            log.info("task %s: container %s ended while the runner was down", task_id, info.name)
            self._spawn(self._collect, run, info)

    async def _adopted_ssh_port(self, run: TaskRun, info: ContainerInfo) -> int | None:
        """An adopted VPS keeps its port: from the saved table, else from its label (table lost)."""
        if run.task_type is not TaskType.VPS:
            return None
        port = self.ssh_ports.get(run.task_id)
        if port is None:
            port = ssh_port_from_labels(info.labels)
            if port is not None:
                await self.ssh_ports.claim(run.task_id, port)
        return port

    async def report_lost(self, entry: TaskState) -> None:
        """A record without a container (at start-up): report what can be known."""
        if entry.task_id in self.runs:
            return
        if entry.final_report is not None:
            await self._deliver_final(entry)
            return
        run = TaskRun(entry)
        run.started.set()
        if entry.phase is Phase.PREPARING:
            reason = "the runner restarted while preparing the task (image pull/load interrupted)"
        else:
            reason = (
                f"container {container_name(entry.task_id)} disappeared while the runner was down; "
                "the exit code is unknown"
            )
        status = TaskStatus.KILLED if entry.killed_by_user else TaskStatus.FAILED
        log.warning("task %s: %s", entry.task_id, reason)
        await self._finish(run, status, reason)

    # -- the executor ----------------------------------------------------------------------------------

    async def _guarded(self, fn: Callable[..., Awaitable[None]], run: TaskRun, *args: Any) -> None:
        try:
            await fn(run, *args)
        except Exception as exc:  # a bug or an unforeseen engine answer fails one task, never the runner
            log.exception("task %s: unexpected error", run.task_id)
            if run.state.final_report is None:
                with trio.CancelScope(shield=True), trio.move_on_after(30):
                    try:
                        # Nothing may run untracked: a container the runner lost track of goes too.
                        if run.container_id is not None:
                            await self._remove_container(run.container_id)
                        await self._finish(run, TaskStatus.FAILED, f"internal runner error: {exc}")
                    except Exception:
                        log.exception("task %s: could not record the failure", run.task_id)
        finally:
            run.started.set()

    async def _execute(self, run: TaskRun) -> None:
        request = run.state.request
        assert request is not None
        task_id = run.task_id

        async def progress(text: str) -> None:
            self.reporter.progress(task_id, text)

        problem: str | None = None
        spec = None
        ssh_port: int | None = None
        with run.prepare_scope:
            try:
                image = await self.images.resolve(request, progress)
                step(task_id, "runner.image_resolved")
                facts = await self.node_facts()
                step(task_id, "runner.node_facts")
                name = container_name(task_id)
                overlay = None if self.overlay is None else self.overlay.placement()
                gateway = None if overlay is None else str(overlay.gateway)
                tunnel = None if self.tunnels is None else await self.tunnels.injection(name, gateway)
                step(task_id, "runner.tunnel_ready")
                if request.task_type is TaskType.VPS:
                    if ssh_enabled(request):
                        ssh_port = await self.ssh_ports.allocate(task_id)
                    base = build_container_spec(request, self.config, facts, image, overlay=overlay)
                    spec = build_vps_spec(
                        base, request, ssh_port=ssh_port, bind_ip=self.config.RUNNER_BIND_IP, tunnel=tunnel
                    )
                else:
                    spec = build_container_spec(request, self.config, facts, image, tunnel, overlay)
                step(task_id, "runner.spec_built")
                await trio.to_thread.run_sync(_make_dirs, host_directories(self.config, facts))
                step(task_id, "runner.dirs_made")
            except ImageError as exc:
                problem = str(exc)
            except SpecError as exc:
                problem = f"cannot run here: {exc}"
            except NoFreePort as exc:
                problem = f"cannot run here: {exc}"
            except DockerError as exc:
                problem = f"preparing the image failed: {exc}"
            except OSError as exc:
                problem = f"cannot create the task's directories: {exc}"
        if run.state.killed_by_user:
            await self._finish(
                run, TaskStatus.KILLED, "killed while preparing; the container was never started"
            )
            return
        if run.stop_requested:
            await self._finish(run, TaskStatus.STOPPED, "stopped while preparing; it never started")
            return
        if problem is not None or spec is None:
            log.warning("task %s failed before start: %s", task_id, problem)
            await self._finish(run, TaskStatus.FAILED, problem or "preparation was interrupted")
            return

        try:
            container_id = await self.docker.create_container(spec)
        except Conflict as exc:
            await self._finish(
                run, TaskStatus.FAILED, f"a container named {spec.name} already exists ({exc.message})"
            )
            return
        except DockerError as exc:
            await self._finish(run, TaskStatus.FAILED, f"creating the container failed: {exc}")
            return
        step(task_id, "runner.container_created")
        # Not saved here: a crash now leaves a container labelled with the task, which reconcile finds,
        # removes (never started) and reports; the record would add nothing to that (one fsync less).
        run.phase = RunPhase.CREATED
        run.state.phase = Phase.CREATED
        run.state.container_id = container_id
        if run.state.killed_by_user or run.stop_requested:
            await self._remove_container(container_id)
            if run.stop_requested and not run.state.killed_by_user:
                await self._finish(run, TaskStatus.STOPPED, "stopped before the container started")
            else:
                await self._finish(run, TaskStatus.KILLED, "killed before the container started")
            return
        if ssh_port is not None:
            try:
                await install_vps_files(
                    self.docker,
                    container_id,
                    image=spec.image,
                    public_key=request.ssh_public_key,
                    host_keys=self.host_keys,
                    task_id=task_id,
                )
            except (SshdMissing, DockerError, OSError) as exc:
                reason = (
                    str(exc) if isinstance(exc, SshdMissing) else f"preparing SSH in the VPS failed: {exc}"
                )
                await self._remove_container(container_id)
                await self._finish(run, TaskStatus.FAILED, reason)
                return

        exit = self._expect_exit(run)  # before the start: a quick command may exit before it answers
        try:
            await self.docker.start(container_id)
        except DockerError as exc:
            if exit is not None and self.exits is not None:
                self.exits.forget(container_id)
            # Mount and runtime errors surface at start, not at create (a missing program does not:
            # tini execs it inside the started container, which then exits 127).
            exit_code = None
            with contextlib.suppress(DockerError):
                exit_code = (await self.docker.inspect(container_id)).state.exit_code or None
            await self._remove_container(container_id)
            await self._finish(run, TaskStatus.FAILED, f"starting the container failed: {exc}", exit_code)
            return
        step(task_id, "runner.container_started")
        run.phase = RunPhase.RUNNING
        run.state.phase = Phase.RUNNING
        run.state.started_at = utcnow()
        run.started.set()
        log.info("task %s running in container %s (%s)", task_id, spec.name, spec.image)
        if run.state.killed_by_user:
            await self._signal_kill(run)  # the kill arrived while the start was in flight
        elif not run.state.forget:
            overlay_ip = await self._overlay_ip(spec.network, container_id, spec.ipv4_address)
            self.reporter.send(
                StatusUpdate(
                    task_id=task_id,
                    status=TaskStatus.RUNNING,
                    started_at=run.state.started_at,
                    message=f"running in {spec.image}"
                    + ("" if ssh_port is None else f", SSH on port {ssh_port}")
                    + ("" if overlay_ip is None else f", overlay address {overlay_ip}"),
                    ssh_port=ssh_port,
                    overlay_ip=overlay_ip,
                )
            )
        # Saved after the report is queued, not before: reconcile adopts a started container from its
        # labels whatever the record says; the phase only words the reason if the container vanishes.
        await self.store.save(run.state)
        step(task_id, "runner.running_saved")
        await self._watch(run, exit)

    async def _overlay_ip(self, network: str | None, container_id: str, fixed: str | None) -> str | None:
        """The container's address on the overlay network, when it is on it (the fixed one it was given,
        else the one Docker chose: one inspect)."""
        if network is None or network != self.config.OVERLAY_NETWORK_NAME:
            return None
        if fixed:
            return fixed
        try:
            info = await self.docker.inspect(container_id)
        except DockerError as exc:
            log.warning("container %s: cannot read its overlay address: %s", container_id[:12], exc)
            return None
        return info.networks.get(network) or None

    async def _watch_adopted(self, run: TaskRun) -> None:
        if run.state.killed_by_user:
            await self._signal_kill(run)  # the kill was asked for before the restart
        await self._watch(run)

    def _expect_exit(self, run: TaskRun) -> ContainerExit | None:
        """Listen for the container's ``die`` event (command tasks; see ``exit_events``)."""
        if self.exits is None or run.task_type is not TaskType.COMMAND or run.container_id is None:
            return None
        return self.exits.expect(run.container_id)

    async def _report_exit_early(self, run: TaskRun, exit: ContainerExit) -> None:
        """At the ``die`` event of a command that exited 0, report ``completed`` (the engine's cleanup, which
        the wait answers after, costs 60-70 ms more). Anything else waits for the collection: a failure's
        message quotes its stderr, a kill or an OOM needs the engine's state.

        A plain report, not the final one: the collection records and delivers the final report as always
        (the host, already ``completed``, keeps its status), so crash recovery is unchanged."""
        await exit.event.wait()
        state = run.state
        if exit.exit_code != 0 or state.killed_by_user or state.forget or run.stop_requested:
            return
        if run.phase is not RunPhase.RUNNING:
            return
        # Exited: from now on a kill or pause is refused as for any exited task, and heartbeats stop
        # listing it as running (the host would answer with a kill order for a task it has completed).
        run.phase = RunPhase.FINISHING
        step(run.task_id, "runner.exit_event")
        self.reporter.send(
            StatusUpdate(
                task_id=run.task_id,
                status=TaskStatus.COMPLETED,
                exit_code=0,
                message=describe_exit(0),
                started_at=state.started_at,
                completed_at=exit.at or utcnow(),
            )
        )

    async def _watch(self, run: TaskRun, exit: ContainerExit | None = None) -> None:
        """Wait for the container to exit, then collect it. ``exit``: its ``die`` event, when expected."""
        try:
            async with trio.open_nursery() as nursery:
                if exit is not None:
                    nursery.start_soon(self._report_exit_early, run, exit)
                info = await self._wait_exited(run)
                nursery.cancel_scope.cancel()
        finally:
            if exit is not None and self.exits is not None and run.container_id is not None:
                self.exits.forget(run.container_id)
        if info is None:
            return
        run.phase = RunPhase.FINISHING
        await self._collect(run, info)

    async def _wait_exited(self, run: TaskRun) -> ContainerInfo | None:
        """The exited container's state once the engine's wait answers; None when it vanished (then the
        task is finished here)."""
        container = run.container_id
        delay = 1.0
        while True:
            try:
                await self.docker.wait(container)
                step(run.task_id, "runner.container_exited")
                restarting = run.restarting
                if restarting is not None:
                    # A VPS restart stops the container first: wait for it to run again, then watch it.
                    await restarting.wait()
                    continue
                info = await self.docker.inspect(container)
            except NotFound:
                await self._finish(
                    run,
                    TaskStatus.FAILED,
                    f"container {container_name(run.task_id)} disappeared (removed outside the runner)",
                )
                return None
            except DockerError as exc:
                log.warning("task %s: waiting for the container failed (%s); retrying", run.task_id, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, _WAIT_RETRY_MAX)
                continue
            if info.state.running or info.state.paused:
                continue  # "not-running" answered while restarting; wait again
            return info

    async def _collect(self, run: TaskRun, info: ContainerInfo) -> None:
        """Save the exited container's output, record and deliver the final report, remove it."""
        run.phase = RunPhase.FINISHING
        self._container_ended(run.task_id)
        state = info.state
        note = ""
        step(run.task_id, "runner.inspected")
        try:
            await save_container_logs(self.docker, info.id, self.store.logs_dir(run.task_id), tty=info.tty)
        except (DockerError, OSError) as exc:
            log.warning("task %s: saving the logs failed: %s", run.task_id, exc)
            note = f" (its output could not be saved: {exc})"
        step(run.task_id, "runner.logs_saved")
        status = status_for_exit(
            state.exit_code,
            oom_killed=state.oom_killed,
            killed_by_user=run.state.killed_by_user,
            task_type=run.task_type,
        )
        if run.state.killed_by_user:
            message = f"killed by the user ({describe_exit(state.exit_code)})"
        elif run.stop_requested:
            # sshd ends with 255 on SIGTERM: the code says nothing, the user asked for the stop.
            status, message = TaskStatus.STOPPED, f"stopped by the user ({describe_exit(state.exit_code)})"
        else:
            message = describe_exit(state.exit_code, oom_killed=state.oom_killed)
        if status is TaskStatus.FAILED and not note:
            # "exit code 127" alone does not say that the program was not found; its last words usually do.
            last = await tail_file(self.store.logs_dir(run.task_id) / "stderr.log", 1)
            text = last.decode("utf-8", "replace").strip()
            if text:
                message += f"; last stderr line: {text[:300]}"
        update = StatusUpdate(
            task_id=run.task_id,
            status=status,
            exit_code=state.exit_code,
            message=message + note,
            # The engine's own times: the runner's clock reads "started" only after start() returned,
            # which can be later than a quick command's exit.
            started_at=state.started_at or run.state.started_at,
            completed_at=state.finished_at or utcnow(),
        )
        log.info("task %s %s: %s", run.task_id, status.value, message)
        await self._record_final(run, update)
        step(run.task_id, "runner.final_saved")
        # Reported before the removal (which `docker run --rm` pays and a task's user need not): the output
        # and the report are saved, so a crash from here on only leaves the removal to reconcile.
        await self._release(run, remove=info.id)

    async def _finish(
        self, run: TaskRun, status: TaskStatus, message: str, exit_code: int | None = None
    ) -> None:
        """End a task that has no container (any more) with ``status``."""
        update = StatusUpdate(
            task_id=run.task_id,
            status=status,
            exit_code=exit_code,
            message=message,
            started_at=run.state.started_at,
            completed_at=utcnow(),
        )
        await self._record_final(run, update)
        await self._release(run)

    async def _record_final(self, run: TaskRun, update: StatusUpdate) -> None:
        run.state.final_report = update
        run.state.phase = Phase.FINISHED
        await self.store.save(run.state)

    async def _release(self, run: TaskRun, *, remove: str | None = None) -> None:
        """Forget the run and deliver its final report; then remove its container (``remove``) and free its
        SSH port. ``done`` is set last: a VPS stop answers once the port is free."""
        if self.runs.get(run.task_id) is run:
            del self.runs[run.task_id]
        self._container_ended(run.task_id)
        run.started.set()
        await self._deliver_final(run.state)
        if remove is not None:
            await self._remove_container(remove)
            step(run.task_id, "runner.container_removed")
        # The VPS's SSH port (if it had one) is free for the next VPS; a re-create allocates again.
        await self.ssh_ports.release(run.task_id)
        run.done.set()

    async def _deliver_final(self, entry: TaskState) -> None:
        assert entry.final_report is not None
        if entry.forget:
            # The host already holds a final status for it: nothing to tell, nothing to keep.
            await self.store.delete(entry.task_id)
            return
        self.reporter.send_final(entry.final_report)

    async def final_delivered(self, update: StatusUpdate) -> None:
        """The host acknowledged a final report: the record has served its purpose."""
        entry = self.store.get(update.task_id)
        if entry is not None and entry.final_report == update and update.task_id not in self.runs:
            await self.store.delete(update.task_id)

    async def _remove_container(self, container: str) -> None:
        try:
            await self.docker.remove(container, force=True)
        except NotFound:
            pass
        except DockerError as exc:
            # Left behind, it is found again at the next start and only removed then.
            log.warning("removing container %s failed: %s", container, exc)


def _make_dirs(paths: list[str]) -> None:
    for path in paths:
        os.makedirs(path, exist_ok=True)
