"""The runner's side of the host API: registration, heartbeats, status reports.

- Registration (``POST /api/register``) is retried in the background with exponential backoff and jitter;
  a host that is down never blocks the runner's start-up. A heartbeat answered 404 ("unknown node", e.g. the
  host lost its database) makes the runner register again.
- Heartbeats (``PUT /api/heartbeat/{hostname}``) every ``HEARTBEAT_INTERVAL_SECONDS`` carry the latest
  resource sample, the tasks the runner holds, Docker's status and the final reports not yet acknowledged.
  The host's ``kill`` list is applied: those tasks are killed and forgotten.
- The overlay: the registration carries the runner's ``OVERLAY_*`` settings and its VXLAN endpoint; the
  answer's assignment (or the reason there is none) goes to ``OverlayManager.apply``, and in mesh mode the
  peer lists of heartbeat answers go to ``OverlayManager.update_peers``.
- Reports (``POST /api/update``) leave through one ordered queue, so a task's ``running`` never overtakes
  its preparation progress and its final report never overtakes its ``running``. Final reports are already
  in the state store when they are queued (``executor``); they are retried until the host answers, and their
  record is deleted once it has. Progress texts are best effort: coalesced per task and dropped on failure.
"""

from __future__ import annotations

import collections
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import httpx
import trio

from kohakuriver_net.task_steps import step
from kohakuriver_proto.converter import dumps, structure
from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.lifecycle import TaskStatus
from kohakuriver_proto.models import (
    Heartbeat,
    HeartbeatAnswer,
    NodeRegistration,
    OverlayPeer,
    RegisterAnswer,
    StatusUpdate,
)
from kohakuriver_proto.snowflake import SnowflakeId

from .executor import DockerStatus, TaskConflict, TaskManager, TaskNotFound
from .monitor import NodeMonitor
from .runner_settings import RunnerSettings

__all__ = ["HostClient", "Reporter", "make_http_client"]

log = logging.getLogger("kohakuriver.runner.host")

REQUEST_TIMEOUT = 10.0
BACKOFF_START = 1.0
BACKOFF_MAX = 30.0
#: Final reports carried by one heartbeat (the rest go with the next ones).
MAX_FINISHED_PER_HEARTBEAT = 100
#: Answers after which retrying the same report cannot help.
_PERMANENT = frozenset({400, 404, 405, 410, 413, 422})


def _jitter(delay: float) -> float:
    # Spread retries so that many runners do not hammer a host that just came back in lock step.
    return delay * random.uniform(0.8, 1.2)


async def make_http_client(config: RunnerSettings) -> httpx.AsyncClient:
    """The client for the host API: cluster token, timeouts, the host's CA when configured."""
    verify: ssl.SSLContext | bool = True
    if config.HOST_USE_TLS and config.HOST_TLS_CA_FILE:
        verify = await trio.to_thread.run_sync(
            lambda: ssl.create_default_context(cafile=config.HOST_TLS_CA_FILE)
        )
    return httpx.AsyncClient(
        base_url=config.host_url,
        headers={"Authorization": f"Bearer {config.CLUSTER_TOKEN}"},
        timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=5.0),
        verify=verify,
        # Cluster-internal traffic: a proxy from the environment would be wrong (and would see the token).
        trust_env=False,
    )


@attrs.define(eq=False)
class _Item:
    update: StatusUpdate
    final: bool = False
    progress: bool = False


class Reporter:
    """The ordered outbox of status reports. ``run(host)`` delivers it."""

    def __init__(self) -> None:
        self._queue: collections.deque[_Item] = collections.deque()
        self._finals: dict[int, _Item] = {}
        self._wakeup = trio.Event()
        self.on_final_delivered: Callable[[StatusUpdate], Awaitable[None]] | None = None

    def _push(self, item: _Item) -> None:
        self._queue.append(item)
        self._wakeup.set()

    def _drop_progress(self, task_id: int) -> None:
        for item in [i for i in self._queue if i.progress and i.update.task_id == task_id]:
            self._queue.remove(item)

    def send(self, update: StatusUpdate) -> None:
        self._drop_progress(update.task_id)
        self._push(_Item(update))

    def send_final(self, update: StatusUpdate) -> None:
        if update.task_id in self._finals:
            return  # already queued (re-delivered from a record)
        self._drop_progress(update.task_id)
        item = _Item(update, final=True)
        self._finals[update.task_id] = item
        self._push(item)

    def progress(self, task_id: int, text: str) -> None:
        update = StatusUpdate(task_id=task_id, status=TaskStatus.ASSIGNING, message=text[:1000])
        for item in self._queue:
            if item.progress and item.update.task_id == task_id:
                item.update = update  # coalesce: only the newest text matters
                return
        self._push(_Item(update, progress=True))

    def pending_finals(self) -> list[StatusUpdate]:
        return [item.update for item in self._finals.values()]

    async def delivered(self, updates: list[StatusUpdate]) -> None:
        """The host acknowledged these final reports (in a heartbeat or an update)."""
        for update in updates:
            item = self._finals.get(update.task_id)
            if item is None or item.update != update:
                continue
            del self._finals[update.task_id]
            if item in self._queue:
                self._queue.remove(item)
            if self.on_final_delivered is not None:
                await self.on_final_delivered(update)

    async def run(self, host: HostClient) -> None:
        delay = BACKOFF_START
        while True:
            if not self._queue:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            if not host.registered.is_set():
                # The host may reject reports from a node it does not know: register first. The queue
                # may change meanwhile (a heartbeat acknowledges finals), so look at it again after.
                await host.registered.wait()
                continue
            item = self._queue[0]
            if not item.progress:
                step(item.update.task_id, f"runner.{item.update.status.value}_report_sent")
            outcome = await host.post_update(item.update)
            if not item.progress:
                step(item.update.task_id, f"runner.{item.update.status.value}_reported")
            if outcome == "retry":
                if item.progress and item in self._queue:
                    self._queue.remove(item)  # stale by the time the host is back
                await trio.sleep(_jitter(delay))
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay = BACKOFF_START
            if item in self._queue:
                self._queue.remove(item)
            if item.final:
                await self.delivered([item.update])


class HostClient:
    """Registration and heartbeats; ``post_update`` for the reporter. Run ``run()`` in a nursery."""

    def __init__(
        self,
        *,
        config: RunnerSettings,
        http: httpx.AsyncClient,
        hostname: str,
        runner_url: str,
        version: str,
        monitor: NodeMonitor,
        manager: TaskManager,
        reporter: Reporter,
        docker_status: DockerStatus,
        overlay: Any = None,
    ) -> None:
        self.config = config
        #: ``overlay_manager.OverlayManager`` (None: no overlay handling, as in tests of other parts).
        self.overlay = overlay
        self.http = http
        self.hostname = hostname
        self.runner_url = runner_url
        self.version = version
        self.monitor = monitor
        self.manager = manager
        self.reporter = reporter
        self.docker_status = docker_status
        self.registered = trio.Event()
        self.last_heartbeat_ok: bool | None = None

    async def run(self) -> None:
        if not self.config.CLUSTER_TOKEN:
            log.error(
                "CLUSTER_TOKEN is not set: this runner cannot join the cluster (set it to the host's cluster "
                "token); the API refuses every request meanwhile"
            )
            await trio.sleep_forever()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.reporter.run, self)
            await self._heartbeat_loop(nursery)

    # -- registration ----------------------------------------------------------------------------------

    def registration(self) -> NodeRegistration:
        fields = self.monitor.heartbeat_fields()
        return NodeRegistration(
            hostname=self.hostname,
            url=self.runner_url,
            total_cores=self.monitor.cpu_count,
            memory_total_bytes=fields["memory_total_bytes"],
            numa_topology=fields["numa_topology"],
            gpu_info=fields["gpu_info"],
            runner_version=self.version,
            docker_available=self.docker_status.available,
            docker_error=None if self.docker_status.available else self.docker_status.error,
            **self._vm_fields(),
            **self._overlay_fields(),
        )

    def _overlay_fields(self) -> dict[str, Any]:
        if self.overlay is None:
            return {}
        return {"overlay": self.overlay.settings_view(), "underlay_address": self.overlay.underlay_address}

    async def _register_until_done(self) -> None:
        delay = BACKOFF_START
        attempt = 0
        while True:
            attempt += 1
            problem = await self._register()
            if problem is None:
                log.info(
                    "registered with the host at %s as %s (%s)",
                    self.config.host_url,
                    self.hostname,
                    self.runner_url,
                )
                self.registered.set()
                return
            wait = _jitter(delay)
            level = logging.WARNING if attempt == 1 or delay >= BACKOFF_MAX else logging.INFO
            log.log(
                level,
                "registering with %s failed (%s); retrying in %.0f s",
                self.config.host_url,
                problem,
                wait,
            )
            await trio.sleep(wait)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _register(self) -> str | None:
        """None on success, else why not."""
        try:
            resp = await self._send("POST", "/api/register", self.registration())
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if resp.is_success:
            await self._apply_overlay(resp)
            return None
        return f"HTTP {resp.status_code}: {_error_text(resp)}"

    async def _apply_overlay(self, resp: httpx.Response) -> None:
        if self.overlay is None:
            return
        try:
            answer = structure(resp.json(), RegisterAnswer)
        except (ValueError, ValidationError) as exc:
            answer = RegisterAnswer(message="", overlay_error=f"unreadable registration answer: {exc}")
        try:
            await self.overlay.apply(answer)
        except Exception:  # a surprise in the overlay must not undo the registration: log it, go on
            log.exception("applying the host's overlay assignment failed")

    # -- heartbeats ------------------------------------------------------------------------------------

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(
            running_tasks=self.manager.held_task_ids(),
            finished_tasks=self.reporter.pending_finals()[:MAX_FINISHED_PER_HEARTBEAT],
            docker_available=self.docker_status.available,
            docker_error=None if self.docker_status.available else self.docker_status.error,
            runner_version=self.version,
            **self._vm_fields(),
            **self.monitor.heartbeat_fields(),
        )

    def _vm_fields(self) -> dict[str, Any]:
        facts = self.manager.vm_facts()
        return {"vm_capable": facts is not None and facts.capable, "vm": facts}

    async def _heartbeat_loop(self, nursery: trio.Nursery) -> None:
        interval = self.config.heartbeat_interval
        while True:
            if not self.registered.is_set():
                await self._register_until_done()
            started = trio.current_time()
            await self._beat(nursery)
            await trio.sleep_until(started + interval)

    async def _beat(self, nursery: trio.Nursery) -> None:
        beat = self.heartbeat()
        try:
            resp = await self._send("PUT", f"/api/heartbeat/{self.hostname}", beat)
        except httpx.HTTPError as exc:
            self._beat_failed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            return
        if resp.status_code == 404:
            log.warning("the host does not know this node (any more); registering again")
            self.registered = trio.Event()
            self.last_heartbeat_ok = False
            return
        if not resp.is_success:
            self._beat_failed(f"HTTP {resp.status_code}: {_error_text(resp)}")
            return
        if self.last_heartbeat_ok is False:
            log.info("heartbeats reach the host again")
        self.last_heartbeat_ok = True
        await self.reporter.delivered(beat.finished_tasks)
        kill, peers = _beat_answer(resp)
        for task_id in kill:
            nursery.start_soon(self._kill_for_host, task_id)
        if peers is not None and self.overlay is not None:
            nursery.start_soon(self._update_peers, peers)

    async def _update_peers(self, peers: list[OverlayPeer]) -> None:
        try:
            await self.overlay.update_peers(peers)
        except Exception:
            log.exception("applying the host's overlay peer list failed")

    def _beat_failed(self, reason: str) -> None:
        # Once per outage, not once per interval: a host down for an hour must not flood the log.
        level = logging.WARNING if self.last_heartbeat_ok is not False else logging.DEBUG
        log.log(level, "heartbeat to %s failed: %s", self.config.host_url, reason)
        self.last_heartbeat_ok = False

    async def _kill_for_host(self, task_id: int) -> None:
        try:
            await self.manager.kill(task_id, forget=True)
        except (TaskNotFound, TaskConflict):
            pass
        except Exception as exc:  # Docker trouble: the next heartbeat asks again
            log.warning("task %s: kill requested by the host failed: %s", task_id, exc)

    # -- reports ---------------------------------------------------------------------------------------

    async def post_update(self, update: StatusUpdate) -> str:
        """Deliver one report: ``"ok"`` (the host answered; accepted or not), ``"drop"`` (it never will
        accept it) or ``"retry"``."""
        try:
            resp = await self._send("POST", "/api/update", update)
        except httpx.HTTPError as exc:
            log.info(
                "report for task %s not delivered (%s); will retry", update.task_id, exc or type(exc).__name__
            )
            return "retry"
        if resp.is_success:
            try:
                accepted = resp.json().get("accepted", True)
            except (ValueError, AttributeError):
                accepted = True
            if not accepted:
                log.info(
                    "host did not apply %s for task %s (it already has a later status)",
                    update.status.value,
                    update.task_id,
                )
            return "ok"
        if resp.status_code in _PERMANENT:
            log.warning(
                "host refused the %s report for task %s: HTTP %s: %s",
                update.status.value,
                update.task_id,
                resp.status_code,
                _error_text(resp),
            )
            return "drop"
        log.info("report for task %s: HTTP %s; will retry", update.task_id, resp.status_code)
        return "retry"

    async def _send(self, method: str, path: str, model: Any) -> httpx.Response:
        return await self.http.request(
            method, path, content=dumps(model).encode(), headers={"Content-Type": "application/json"}
        )


def _error_text(resp: httpx.Response) -> str:
    try:
        data = resp.json()
        if isinstance(data, dict) and data.get("message"):
            return str(data["message"])[:300]
    except ValueError:
        pass
    return resp.text[:300] or resp.reason_phrase


def _beat_answer(resp: httpx.Response) -> tuple[list[int], list[OverlayPeer] | None]:
    """The kill list and, in mesh mode, the overlay peers of a heartbeat answer. An answer whose peers
    cannot be read still gives its kill list."""
    try:
        data = resp.json()
    except ValueError:
        log.warning("unreadable heartbeat answer: %s", resp.text[:200])
        return [], None
    try:
        answer = structure(data, HeartbeatAnswer)
        return list(answer.kill), answer.overlay_peers
    except (ValueError, ValidationError):
        pass
    try:
        kill = structure((data.get("kill") if isinstance(data, dict) else None) or [], list[SnowflakeId])
    except (ValueError, ValidationError):
        log.warning("unreadable heartbeat answer: %s", resp.text[:200])
        return [], None
    log.warning("heartbeat answer: unreadable overlay peers ignored: %s", resp.text[:200])
    return kill, None
