"""SSH ports of this runner's Docker VPS: ``VPS_SSH_PORT_START``, +1, +2, ... (DESIGN section 3).

A VPS's container port 22 is published on ``RUNNER_BIND_IP:<port>``. The port is chosen by the runner, not
by Docker (upstream let the engine pick an ephemeral 32768+ port, which changed at every restart): the
lowest port from the start that no other VPS of this runner holds and that nothing on the machine listens on
(a bind test, run in a thread). The allocation is written to ``<state_dir>/ssh_ports.json`` so that a
restarted runner keeps every VPS's port; it is freed when the VPS ends.

``pick_port`` is the pure rule; ``SshPorts`` adds the lock, the bind test and the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import socket
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import trio

from .state import atomic_write_json

__all__ = ["NoFreePort", "SshPorts", "pick_port", "port_in_use"]

log = logging.getLogger("kohakuriver.runner.ssh_ports")

MAX_PORT = 65535


class NoFreePort(Exception):
    """Every port from the start to 65535 is taken."""


def pick_port(start: int, held: Collection[int], in_use: Callable[[int], bool]) -> int:
    """The lowest port >= ``start`` not in ``held`` for which ``in_use`` is false."""
    for port in range(start, MAX_PORT + 1):
        if port not in held and not in_use(port):
            return port
    raise NoFreePort(f"no free SSH port from {start} to {MAX_PORT}")


def port_in_use(bind_ip: str, port: int) -> bool:
    """Whether a TCP listener could not be opened on ``bind_ip:port`` now (blocking: use a thread).

    No SO_REUSEADDR: with it Linux lets the bind succeed over sockets in TIME_WAIT, but also over a
    listener bound to a more specific address on some systems; without it the test is strict.
    """
    family = socket.AF_INET6 if ":" in bind_ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((bind_ip, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


class SshPorts:
    """The allocation table (task id -> port), persisted. Call ``await load()`` once."""

    def __init__(self, path: str | Path, start: int, bind_ip: str) -> None:
        self.path = Path(path)
        self.start = int(start)
        self.bind_ip = bind_ip
        self._ports: dict[int, int] = {}
        self._lock = trio.Lock()

    async def load(self) -> None:
        self._ports = await trio.to_thread.run_sync(_read_table, self.path)

    def get(self, task_id: int) -> int | None:
        return self._ports.get(task_id)

    def table(self) -> Mapping[int, int]:
        return dict(self._ports)

    async def allocate(self, task_id: int) -> int:
        """The task's port: the one it already holds, else the next free one (saved before returning)."""
        async with self._lock:
            port = self._ports.get(task_id)
            if port is not None:
                return port
            held = set(self._ports.values())
            port = await trio.to_thread.run_sync(pick_port, self.start, held, self._in_use)
            self._ports[task_id] = port
            await self._save()
        log.info("task %s: SSH port %s", task_id, port)
        return port

    async def claim(self, task_id: int, port: int) -> None:
        """Record a port found on an adopted container (its record was lost): keep it reserved."""
        async with self._lock:
            if self._ports.get(task_id) != port:
                self._ports[task_id] = port
                await self._save()

    async def release(self, task_id: int) -> None:
        async with self._lock:
            if self._ports.pop(task_id, None) is not None:
                await self._save()

    def _in_use(self, port: int) -> bool:
        try:
            return port_in_use(self.bind_ip, port)
        except OSError as exc:  # cannot even test it (address not on this machine): do not use it
            log.warning("cannot test port %s on %s: %s", port, self.bind_ip, exc)
            return True

    async def _save(self) -> None:
        data = {str(t): p for t, p in sorted(self._ports.items())}
        await trio.to_thread.run_sync(atomic_write_json, self.path, data)


def _read_table(path: Path) -> dict[int, int]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.error("unreadable SSH port table %s (%s); starting empty", path, exc)
        return {}
    table: dict[int, int] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            with contextlib.suppress(TypeError, ValueError):
                if 0 < int(value) <= MAX_PORT:
                    table[int(key)] = int(value)
    return table
