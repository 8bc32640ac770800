"""The host's state store: SQLite in WAL mode, one writer thread, a small pool of reader threads.

Concurrency model (why it looks like this):

- SQLite allows one writer at a time. Instead of letting many threads fight over the write lock (and retry on
  ``SQLITE_BUSY``), one dedicated thread owns the only write connection and runs submitted transactions in
  the order they were submitted. A trio task submits a job to a queue and parks with
  ``trio.lowlevel.wait_task_rescheduled``; the writer hands the outcome back through the trio token. The event
  loop never waits on SQLite.
- Cancellation is exact: a job cancelled while still queued is dropped and never runs; a job the writer has
  already started runs to its end (commit or rollback) and its result is delivered, with the cancellation
  raised at the caller's next checkpoint. So "cancelled" never means "maybe half-written".
- Every write is a function of a ``WriteTx`` run inside ``BEGIN IMMEDIATE ... COMMIT``; an exception rolls it
  back. Read-modify-write (``update_task``) is therefore atomic, and callers can put the lifecycle rules
  inside the mutation. Such functions run on the writer thread: they must be quick and must not touch trio.
- Reads run on ``trio.to_thread`` threads over a pool of ``query_only`` connections, each read in its own
  (deferred) transaction so a multi-statement read sees one snapshot. WAL lets them run while the writer
  writes.

The API is two generic entry points, ``read(fn, *args)`` and ``write(fn, *args)``: ``fn`` is a ``ReadTx`` /
``WriteTx`` operation (``store.read(ReadTx.get_task, 7)``) or any function of one, composing several
operations in one snapshot or one atomic transaction. There is no async mirror per operation.

A task is a typed ``StoredTask`` (``stored_task.py``: the public ``TaskRecord`` plus the host's bookkeeping)
kept as one JSON document; the indexed columns (``TASK_COLUMNS``) are copied from its fields on every write,
so they cannot drift from it. Mutations take the record and return a new one (``attrs.evolve``).
``queue_seq`` (submission order) is assigned by the store.

Timestamps are float seconds since the epoch, passed by the caller or read from the injected ``clock``.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import pathlib
import queue
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Concatenate, ParamSpec, TypeVar

import attrs
import outcome
import trio

from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.lifecycle import FINAL, TaskStatus, TaskType

from .migrations import MIGRATIONS
from .status_watch import StatusWatch
from .stored_task import StoredTask, task_document, task_from_document

T = TypeVar("T")
P = ParamSpec("P")
Clock = Callable[[], float]
#: A lifecycle mutation: the task as stored -> the task to store, or None for "no change".
Mutation = Callable[[StoredTask], StoredTask | None]

BUSY_TIMEOUT_MS = 5000
DEFAULT_READ_CONNECTIONS = 4
MAX_LIST_LIMIT = 10_000
_MAX_ID = (1 << 63) - 1
_DOC_KEY_RE = re.compile(r"[a-z_][a-z0-9_]{0,63}")

#: Fields of the task copied into indexed columns (``submitted_at`` as epoch seconds).
TASK_COLUMNS = ("task_id", "task_type", "owner_id", "status", "assigned_node", "batch_id", "submitted_at")


# -- errors ------------------------------------------------------------------------------------------------


class StoreError(Exception):
    """Base class of the store's own errors (SQLite errors other than constraints propagate as they are)."""


class StoreClosed(StoreError):
    """The store was used after (or while) it was closed."""


class SchemaVersionError(StoreError):
    """The database was written by a newer version of KohakuRiver than this one."""


class TaskNotFound(StoreError, KeyError):
    def __init__(self, task_id: int) -> None:
        super().__init__(f"no task {task_id}")
        self.task_id = task_id

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class ConstraintError(StoreError):
    """A uniqueness or reference constraint failed (duplicate username, token, task id; unknown user...)."""


class InvalidTaskDoc(StoreError, ValueError):
    """A stored task document does not read back as a ``StoredTask``, or a task cannot be written as JSON."""


# -- rows --------------------------------------------------------------------------------------------------


@attrs.frozen
class UserRow:
    id: int
    username: str
    role: str
    is_active: bool
    created_at: float


@attrs.frozen
class TokenRow:
    id: int
    user_id: int
    name: str
    token_hash: str
    created_at: float
    last_used_at: float | None
    revoked: bool
    revoked_at: float | None


@attrs.frozen
class NodeRow:
    hostname: str
    url: str
    status: str  # "online" | "offline"
    registered_at: float
    last_heartbeat: float | None
    registration: dict[str, Any]
    metrics: dict[str, Any]
    runner_token_hash: str | None


@attrs.frozen
class OverlayRunnerRow:
    """A runner's overlay id and the underlay address the host's VXLAN link points at."""

    runner_id: int
    hostname: str
    underlay: str
    allocated_at: float
    updated_at: float


@attrs.frozen
class ReservationRow:
    """A reserved overlay address, with the status of the task using it (None: unused, or no such task)."""

    nonce: str
    ip: str
    node: str
    runner_id: int
    owner_id: int | None
    created_at: float
    expires_at: float
    used_by: int | None
    task_status: str | None

    def live(self, now: float) -> bool:
        """Still held: unused and unexpired, or used by a task that has not ended (a queued, placed or
        running task keeps its address; any final status releases it)."""
        if self.used_by is None:
            return now < self.expires_at
        return self.task_status is not None and TaskStatus(self.task_status) not in FINAL


@attrs.frozen
class TaskRow:
    """A stored task and its place in the queue. The indexed columns are read from the record."""

    task: StoredTask
    queue_seq: int

    @property
    def task_id(self) -> int:
        return self.task.task_id

    @property
    def task_type(self) -> TaskType:
        return self.task.task_type

    @property
    def status(self) -> TaskStatus:
        return self.task.status

    @property
    def owner_id(self) -> int | None:
        return self.task.owner_id

    @property
    def assigned_node(self) -> str | None:
        return self.task.assigned_node


def _user(r: sqlite3.Row) -> UserRow:
    return UserRow(r["id"], r["username"], r["role"], bool(r["is_active"]), r["created_at"])


def _token(r: sqlite3.Row) -> TokenRow:
    return TokenRow(
        r["id"], r["user_id"], r["name"], r["token_hash"], r["created_at"], r["last_used_at"],
        bool(r["revoked"]), r["revoked_at"],
    )  # fmt: skip


def _node(r: sqlite3.Row) -> NodeRow:
    return NodeRow(
        r["hostname"], r["url"], r["status"], r["registered_at"], r["last_heartbeat"],
        json.loads(r["registration"]), json.loads(r["metrics"]), r["runner_token_hash"],
    )  # fmt: skip


def _overlay_runner(r: sqlite3.Row) -> OverlayRunnerRow:
    return OverlayRunnerRow(r["runner_id"], r["hostname"], r["underlay"], r["allocated_at"], r["updated_at"])


def _reservation(r: sqlite3.Row) -> ReservationRow:
    return ReservationRow(
        r["nonce"], r["ip"], r["node"], r["runner_id"], r["owner_id"], r["created_at"], r["expires_at"],
        r["used_by"], r["task_status"],
    )  # fmt: skip


_RESERVATIONS = (
    "SELECT r.*, t.status AS task_status FROM overlay_reservations r"
    " LEFT JOIN tasks t ON t.task_id = r.used_by"
)


def _task(r: sqlite3.Row) -> TaskRow:
    return TaskRow(_read_task(r["task_id"], r["doc"]), r["queue_seq"])


def _read_task(task_id: int, text: str) -> StoredTask:
    try:
        return task_from_document(json.loads(text))
    except (ValueError, ValidationError) as exc:  # json.JSONDecodeError is a ValueError
        raise InvalidTaskDoc(f"stored task {task_id} does not read back: {exc}") from None


# -- task documents ----------------------------------------------------------------------------------------


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidTaskDoc(f"{what} is not JSON-serialisable: {exc}") from None


def task_columns(task: StoredTask) -> tuple[int, str, int | None, str, str | None, int | None, float]:
    """The indexed columns of a task, in ``TASK_COLUMNS`` order (the record's validators checked them)."""
    if not isinstance(task, StoredTask):
        raise InvalidTaskDoc(f"a task must be a StoredTask, got {type(task).__name__}")
    return (
        task.task_id,
        task.task_type.value,
        task.owner_id,
        task.status.value,
        task.assigned_node,
        task.batch_id,
        task.submitted_at.timestamp(),
    )


def _task_filter(
    owner_id: int | None,
    statuses: Iterable[str] | None,
    task_type: str | None,
    node: str | None,
    batch_id: int | None,
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if owner_id is not None:
        clauses.append("owner_id = ?")
        params.append(owner_id)
    if statuses is not None:
        wanted = sorted({str(s.value if isinstance(s, enum.Enum) else s) for s in statuses})
        if not wanted:
            clauses.append("0")
        else:
            clauses.append(f"status IN ({', '.join('?' * len(wanted))})")
            params.extend(wanted)
    if task_type is not None:
        clauses.append("task_type = ?")
        params.append(str(task_type))
    if node is not None:
        clauses.append("assigned_node = ?")
        params.append(node)
    if batch_id is not None:
        clauses.append("batch_id = ?")
        params.append(batch_id)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


# -- transactions ------------------------------------------------------------------------------------------


class ReadTx:
    """Read operations on one connection, inside one transaction (a consistent snapshot)."""

    def __init__(self, conn: sqlite3.Connection, clock: Clock) -> None:
        self.conn = conn
        self.clock = clock

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else float(now)

    def _one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        return self.conn.execute(sql, params).fetchone()

    # meta
    def get_meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else row["value"]

    # users and tokens
    def get_user(self, user_id: int) -> UserRow | None:
        row = self._one("SELECT * FROM users WHERE id = ?", (user_id,))
        return None if row is None else _user(row)

    def get_user_by_name(self, username: str) -> UserRow | None:
        row = self._one("SELECT * FROM users WHERE username = ?", (username,))
        return None if row is None else _user(row)

    def list_users(self) -> list[UserRow]:
        return [_user(r) for r in self.conn.execute("SELECT * FROM users ORDER BY id")]

    def count_users(self) -> int:
        return self._one("SELECT COUNT(*) AS n FROM users")["n"]

    def get_token(self, token_id: int) -> TokenRow | None:
        row = self._one("SELECT * FROM tokens WHERE id = ?", (token_id,))
        return None if row is None else _token(row)

    def lookup_token(self, token_hash: str) -> tuple[TokenRow, UserRow] | None:
        """The token with this hash and its user (revoked tokens and inactive users included)."""
        row = self._one(
            "SELECT t.*, u.username, u.role, u.is_active, u.created_at AS user_created_at"
            " FROM tokens t JOIN users u ON u.id = t.user_id WHERE t.token_hash = ?",
            (token_hash,),
        )
        if row is None:
            return None
        user = UserRow(
            row["user_id"], row["username"], row["role"], bool(row["is_active"]), row["user_created_at"]
        )
        return _token(row), user

    def list_tokens(self, user_id: int | None = None) -> list[TokenRow]:
        if user_id is None:
            return [_token(r) for r in self.conn.execute("SELECT * FROM tokens ORDER BY id")]
        return [
            _token(r)
            for r in self.conn.execute("SELECT * FROM tokens WHERE user_id = ? ORDER BY id", (user_id,))
        ]

    # nodes
    def get_node(self, hostname: str) -> NodeRow | None:
        row = self._one("SELECT * FROM nodes WHERE hostname = ?", (hostname,))
        return None if row is None else _node(row)

    def list_nodes(self, status: str | None = None) -> list[NodeRow]:
        if status is None:
            return [_node(r) for r in self.conn.execute("SELECT * FROM nodes ORDER BY hostname")]
        rows = self.conn.execute("SELECT * FROM nodes WHERE status = ? ORDER BY hostname", (status,))
        return [_node(r) for r in rows]

    def stale_nodes(self, cutoff: float) -> list[NodeRow]:
        """Online nodes whose last heartbeat is older than ``cutoff`` (or that never sent one)."""
        rows = self.conn.execute(
            "SELECT * FROM nodes WHERE status = 'online' AND (last_heartbeat IS NULL OR last_heartbeat < ?)"
            " ORDER BY hostname",
            (cutoff,),
        )
        return [_node(r) for r in rows]

    # tasks
    def get_task(self, task_id: int) -> TaskRow | None:
        row = self._one("SELECT * FROM tasks WHERE task_id = ?", (task_id,))
        return None if row is None else _task(row)

    def list_tasks(
        self,
        *,
        owner_id: int | None = None,
        statuses: Iterable[str] | None = None,
        task_type: str | None = None,
        node: str | None = None,
        batch_id: int | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[TaskRow]:
        """Tasks matching every given filter, newest submission first."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValueError(f"limit must be an integer in 1..{MAX_LIST_LIMIT}, got {limit!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative integer, got {offset!r}")
        where, params = _task_filter(owner_id, statuses, task_type, node, batch_id)
        sql = f"SELECT * FROM tasks{where} ORDER BY queue_seq DESC LIMIT ? OFFSET ?"
        return [_task(r) for r in self.conn.execute(sql, [*params, limit, offset])]

    def list_task_documents(
        self,
        *,
        owner_id: int | None = None,
        statuses: Iterable[str] | None = None,
        task_type: str | None = None,
        node: str | None = None,
        limit: int = 100,
        offset: int = 0,
        drop_keys: Sequence[str] = (),
    ) -> list[str]:
        """``list_tasks``, but each document as JSON text with ``drop_keys`` removed by SQLite: an API list
        is then a string join, with no JSON parsing or encoding in Python."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValueError(f"limit must be an integer in 1..{MAX_LIST_LIMIT}, got {limit!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative integer, got {offset!r}")
        for key in drop_keys:
            if not _DOC_KEY_RE.fullmatch(key):
                raise ValueError(f"not a document key: {key!r}")
        doc = "json_remove(doc" + "".join(f", '$.{k}'" for k in drop_keys) + ")" if drop_keys else "doc"
        where, params = _task_filter(owner_id, statuses, task_type, node, None)
        sql = f"SELECT {doc} AS d FROM tasks{where} ORDER BY queue_seq DESC LIMIT ? OFFSET ?"
        return [r["d"] for r in self.conn.execute(sql, [*params, limit, offset])]

    def count_tasks(
        self,
        *,
        owner_id: int | None = None,
        statuses: Iterable[str] | None = None,
        task_type: str | None = None,
        node: str | None = None,
        batch_id: int | None = None,
    ) -> int:
        where, params = _task_filter(owner_id, statuses, task_type, node, batch_id)
        return self._one(f"SELECT COUNT(*) AS n FROM tasks{where}", params)["n"]

    def tasks_in_status(self, statuses: Iterable[str], *, node: str | None = None) -> list[TaskRow]:
        """Every task in one of ``statuses`` (optionally on ``node``), oldest submission first."""
        where, params = _task_filter(None, statuses, None, node, None)
        return [_task(r) for r in self.conn.execute(f"SELECT * FROM tasks{where} ORDER BY queue_seq", params)]

    def task_summaries(
        self, statuses: Iterable[str], keys: Sequence[str], *, assigned: bool | None = None
    ) -> list[tuple[Any, ...]]:
        """``(task_id, task_type, status, assigned_node, queue_seq, *values of keys)`` of every task in one of
        ``statuses``, oldest submission first; ``assigned`` True/False keeps only tasks with/without a node.

        The values are read from the document by SQLite (``json_extract``: lists come back as JSON text), so
        a scan over many tasks (the scheduler, node usage) never parses whole documents in Python.
        """
        for key in keys:
            if not _DOC_KEY_RE.fullmatch(key):
                raise ValueError(f"not a document key: {key!r}")
        where, params = _task_filter(None, statuses, None, None, None)
        if assigned is not None:
            where += (" AND " if where else " WHERE ") + (
                "assigned_node IS NOT NULL" if assigned else "assigned_node IS NULL"
            )
        extracted = "".join(f", json_extract(doc, '$.{key}')" for key in keys)
        sql = (
            f"SELECT task_id, task_type, status, assigned_node, queue_seq{extracted} FROM tasks{where}"
            " ORDER BY queue_seq"
        )
        return [tuple(r) for r in self.conn.execute(sql, params)]

    def task_states(self, task_ids: Iterable[int]) -> dict[int, tuple[str, str, str | None]]:
        """``task_id -> (status, task_type, assigned_node)`` for those of ``task_ids`` that exist, in one
        query that reads no documents (heartbeat reconciliation)."""
        ids = sorted({int(t) for t in task_ids})
        found: dict[int, tuple[str, str, str | None]] = {}
        for start in range(0, len(ids), 500):  # stay well below SQLite's bound-parameter limit
            chunk = ids[start : start + 500]
            rows = self.conn.execute(
                f"SELECT task_id, status, task_type, assigned_node FROM tasks"
                f" WHERE task_id IN ({', '.join('?' * len(chunk))})",
                chunk,
            )
            for r in rows:
                found[r["task_id"]] = (r["status"], r["task_type"], r["assigned_node"])
        return found

    def node_state(self, hostname: str) -> tuple[str, str, bool] | None:
        """``(status, url, docker_available)`` of a node without parsing its JSON columns; None if unknown.
        Docker availability is the latest metrics' word, else the registration's, else True."""
        row = self._one(
            "SELECT status, url, json_extract(metrics, '$.docker_available') AS m,"
            " json_extract(registration, '$.docker_available') AS r FROM nodes WHERE hostname = ?",
            (hostname,),
        )
        if row is None:
            return None
        docker = row["m"] if row["m"] is not None else row["r"]
        return row["status"], row["url"], docker is None or bool(docker)

    def max_task_id(self) -> int | None:
        """The largest task id (seeds the id generator after a restart)."""
        return self._one("SELECT MAX(task_id) AS m FROM tasks")["m"]

    def count_nodes_by_status(self) -> dict[str, int]:
        return {
            r["status"]: r["n"]
            for r in self.conn.execute("SELECT status, COUNT(*) AS n FROM nodes GROUP BY status")
        }

    # overlay
    def overlay_runners(self) -> list[OverlayRunnerRow]:
        """Every runner with an overlay id, by id."""
        return [
            _overlay_runner(r) for r in self.conn.execute("SELECT * FROM overlay_runners ORDER BY runner_id")
        ]

    def overlay_runner(self, hostname: str) -> OverlayRunnerRow | None:
        row = self._one("SELECT * FROM overlay_runners WHERE hostname = ?", (hostname,))
        return None if row is None else _overlay_runner(row)

    def reservations(self, *, ip: str | None = None, node: str | None = None) -> list[ReservationRow]:
        """Reservation rows (live or not: ``ReservationRow.live`` tells), oldest first."""
        clauses, params = [], []
        if ip is not None:
            clauses.append("r.ip = ?")
            params.append(ip)
        if node is not None:
            clauses.append("r.node = ?")
            params.append(node)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = self.conn.execute(f"{_RESERVATIONS}{where} ORDER BY r.created_at, r.nonce", params)
        return [_reservation(r) for r in rows]

    def reservation(self, nonce: str) -> ReservationRow | None:
        row = self._one(f"{_RESERVATIONS} WHERE r.nonce = ?", (nonce,))
        return None if row is None else _reservation(row)

    def overlay_ips_in_use(self) -> list[tuple[str, int]]:
        """(overlay address, task id) of every task that has not ended and has one (reported by its runner
        as ``overlay_ip``, or reserved for it as ``reserved_ip``)."""
        final = sorted(s.value for s in FINAL)
        rows = self.conn.execute(
            "SELECT task_id, o, r FROM (SELECT task_id, status, json_extract(doc, '$.overlay_ip') AS o,"
            " json_extract(doc, '$.reserved_ip') AS r FROM tasks)"
            f" WHERE status NOT IN ({', '.join('?' * len(final))}) AND (o IS NOT NULL OR r IS NOT NULL)",
            final,
        )
        found: list[tuple[str, int]] = []
        for r in rows:
            for ip in dict.fromkeys((r["o"], r["r"])):
                if isinstance(ip, str):
                    found.append((ip, r["task_id"]))
        return found


class WriteTx(ReadTx):
    """Read and write operations inside the writer's ``BEGIN IMMEDIATE`` transaction."""

    def __init__(self, conn: sqlite3.Connection, clock: Clock) -> None:
        super().__init__(conn, clock)
        #: Tasks whose status this transaction changed: their waiters are woken once it commits.
        self.status_changed: list[int] = []

    def _exec(self, sql: str, params: Sequence[Any] = (), what: str = "") -> sqlite3.Cursor:
        try:
            return self.conn.execute(sql, params)
        except sqlite3.IntegrityError as exc:
            raise ConstraintError(f"{what}: {exc}" if what else str(exc)) from None

    # meta
    def set_meta(self, key: str, value: str) -> None:
        self._exec(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def get_or_set_meta(self, key: str, value: str) -> str:
        """The stored value of ``key``; if there is none, store ``value`` and return it (atomically)."""
        existing = self.get_meta(key)
        if existing is not None:
            return existing
        self._exec("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
        return value

    # users and tokens
    def create_user(
        self, username: str, role: str, *, is_active: bool = True, now: float | None = None
    ) -> UserRow:
        cur = self._exec(
            "INSERT INTO users (username, role, is_active, created_at) VALUES (?, ?, ?, ?)",
            (username, role, int(is_active), self._now(now)),
            what=f"cannot create user {username!r}",
        )
        return self.get_user(cur.lastrowid)

    def update_user(
        self, user_id: int, *, role: str | None = None, is_active: bool | None = None
    ) -> UserRow | None:
        if role is not None:
            self._exec("UPDATE users SET role = ? WHERE id = ?", (role, user_id), what="cannot change role")
        if is_active is not None:
            self._exec("UPDATE users SET is_active = ? WHERE id = ?", (int(is_active), user_id))
        return self.get_user(user_id)

    def create_token(self, user_id: int, name: str, token_hash: str, *, now: float | None = None) -> TokenRow:
        cur = self._exec(
            "INSERT INTO tokens (user_id, name, token_hash, created_at) VALUES (?, ?, ?, ?)",
            (user_id, name, token_hash, self._now(now)),
            what="cannot create token",
        )
        return self.get_token(cur.lastrowid)

    def create_first_admin(
        self, username: str, token_name: str, token_hash: str, *, now: float | None = None
    ) -> tuple[UserRow, TokenRow] | None:
        """Create an admin and its token only if there are no users at all; None if there already are."""
        if self.count_users():
            return None
        user = self.create_user(username, "admin", now=now)
        return user, self.create_token(user.id, token_name, token_hash, now=now)

    def revoke_token(self, token_id: int, *, user_id: int | None = None, now: float | None = None) -> bool:
        """Revoke a token (only if it belongs to ``user_id`` when given). True if it was active."""
        sql = "UPDATE tokens SET revoked = 1, revoked_at = ? WHERE id = ? AND revoked = 0"
        params: list[Any] = [self._now(now), token_id]
        if user_id is not None:
            sql += " AND user_id = ?"
            params.append(user_id)
        return self._exec(sql, params).rowcount == 1

    def touch_token(self, token_id: int, *, now: float | None = None, min_interval: float = 0.0) -> bool:
        """Set ``last_used_at`` unless it was set less than ``min_interval`` seconds ago. True if written."""
        t = self._now(now)
        cur = self._exec(
            "UPDATE tokens SET last_used_at = ? WHERE id = ? AND (last_used_at IS NULL OR last_used_at <= ?)",
            (t, token_id, t - min_interval),
        )
        return cur.rowcount == 1

    # nodes
    def upsert_node(
        self,
        hostname: str,
        url: str,
        registration: Mapping[str, Any],
        *,
        runner_token_hash: str | None = None,
        now: float | None = None,
    ) -> NodeRow:
        """Register (or re-register) a node: it is online as of ``now``. Metrics are kept; a None
        ``runner_token_hash`` keeps the stored one."""
        t = self._now(now)
        self._exec(
            "INSERT INTO nodes (hostname, url, status, registered_at, last_heartbeat, registration,"
            " runner_token_hash) VALUES (?, ?, 'online', ?, ?, ?, ?)"
            " ON CONFLICT(hostname) DO UPDATE SET url = excluded.url, status = 'online',"
            " registered_at = excluded.registered_at, last_heartbeat = excluded.last_heartbeat,"
            " registration = excluded.registration,"
            " runner_token_hash = COALESCE(excluded.runner_token_hash, nodes.runner_token_hash)",
            (hostname, url, t, t, _dumps(dict(registration), "registration"), runner_token_hash),
        )
        return self.get_node(hostname)

    def heartbeat_node(
        self, hostname: str, metrics: Mapping[str, Any], *, now: float | None = None
    ) -> NodeRow | None:
        """Record a heartbeat: metrics replaced, node online. None if the node is unknown (re-register)."""
        cur = self._exec(
            "UPDATE nodes SET metrics = ?, last_heartbeat = ?, status = 'online' WHERE hostname = ?",
            (_dumps(dict(metrics), "metrics"), self._now(now), hostname),
        )
        return self.get_node(hostname) if cur.rowcount else None

    def record_heartbeat(
        self, hostname: str, metrics: Mapping[str, Any] | str, *, now: float | None = None
    ) -> bool:
        """``heartbeat_node`` without reading the row back (the hot path): True if the node exists.
        ``metrics`` may be JSON text already (of an object)."""
        text = metrics if isinstance(metrics, str) else _dumps(dict(metrics), "metrics")
        cur = self._exec(
            "UPDATE nodes SET metrics = ?, last_heartbeat = ?, status = 'online' WHERE hostname = ?",
            (text, self._now(now), hostname),
        )
        return cur.rowcount == 1

    def mark_node_offline(
        self, hostname: str, *, task_statuses: Iterable[str] = (), mutate: Mutation | None = None
    ) -> tuple[bool, list[TaskRow]]:
        """Mark a node offline and, in the same transaction, apply ``mutate`` to each of its tasks in
        ``task_statuses`` (e.g. lifecycle ``-> lost``). Returns (it was online, the tasks that changed)."""
        cur = self._exec(
            "UPDATE nodes SET status = 'offline' WHERE hostname = ? AND status = 'online'", (hostname,)
        )
        was_online = cur.rowcount == 1
        changed: list[TaskRow] = []
        if mutate is not None:
            for row in self.tasks_in_status(task_statuses, node=hostname):
                new = self._apply(row, mutate)
                if new is not row:
                    changed.append(new)
        return was_online, changed

    def delete_node(self, hostname: str) -> bool:
        """Forget a node (its tasks keep its name). True if it existed."""
        return self._exec("DELETE FROM nodes WHERE hostname = ?", (hostname,)).rowcount == 1

    # overlay
    def put_overlay_runner(
        self, runner_id: int, hostname: str, underlay: str, *, now: float | None = None
    ) -> OverlayRunnerRow:
        """Give ``hostname`` the id ``runner_id`` (or keep it) with ``underlay`` as its address."""
        t = self._now(now)
        self._exec(
            "INSERT INTO overlay_runners (runner_id, hostname, underlay, allocated_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT(runner_id) DO UPDATE SET hostname = excluded.hostname,"
            " underlay = excluded.underlay, updated_at = excluded.updated_at",
            (runner_id, hostname, underlay, t, t),
            what=f"cannot give overlay runner id {runner_id} to {hostname}",
        )
        row = self.overlay_runner(hostname)
        assert row is not None
        return row

    def delete_overlay_runner(self, hostname: str) -> OverlayRunnerRow | None:
        """Release ``hostname``'s overlay id; the row it had, if any."""
        row = self.overlay_runner(hostname)
        if row is not None:
            self._exec("DELETE FROM overlay_runners WHERE runner_id = ?", (row.runner_id,))
        return row

    def insert_reservation(
        self,
        nonce: str,
        ip: str,
        node: str,
        runner_id: int,
        owner_id: int | None,
        expires_at: float,
        *,
        used_by: int | None = None,
        now: float | None = None,
    ) -> ReservationRow:
        self._exec(
            "INSERT INTO overlay_reservations (nonce, ip, node, runner_id, owner_id, created_at, expires_at,"
            " used_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (nonce, ip, node, runner_id, owner_id, self._now(now), expires_at, used_by),
            what=f"cannot reserve {ip}",
        )
        row = self.reservation(nonce)
        assert row is not None
        return row

    def use_reservation(self, nonce: str, task_id: int) -> bool:
        """Mark an unused reservation as used by ``task_id``. False if it is gone or already used."""
        cur = self._exec(
            "UPDATE overlay_reservations SET used_by = ? WHERE nonce = ? AND used_by IS NULL",
            (task_id, nonce),
            what=f"task {task_id} already uses a reserved address",
        )
        return cur.rowcount == 1

    def delete_reservation(self, nonce: str) -> bool:
        return self._exec("DELETE FROM overlay_reservations WHERE nonce = ?", (nonce,)).rowcount == 1

    def delete_reservations_of_task(self, task_id: int) -> int:
        return self._exec("DELETE FROM overlay_reservations WHERE used_by = ?", (task_id,)).rowcount

    # tasks
    def insert_tasks(self, tasks: Iterable[StoredTask]) -> list[TaskRow]:
        """Insert tasks, all or none, with consecutive ``queue_seq`` values in the given order."""
        seq = self._one("SELECT COALESCE(MAX(queue_seq), 0) AS s FROM tasks")["s"]
        rows: list[TaskRow] = []
        for task in tasks:
            cols = task_columns(task)
            seq += 1
            self._exec(
                "INSERT INTO tasks (task_id, task_type, owner_id, status, assigned_node, batch_id,"
                " submitted_at, queue_seq, doc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*cols, seq, _dumps(task_document(task), f"task {cols[0]}")),
                what=f"cannot insert task {cols[0]}",
            )
            rows.append(TaskRow(task, seq))
        return rows

    def _apply(self, row: TaskRow, mutate: Mutation) -> TaskRow:
        new = mutate(row.task)
        # Records are immutable: "no change" is None or the same record (or an equal one).
        if new is None or new is row.task or new == row.task:
            return row
        cols = task_columns(new)
        if cols[0] != row.task_id:
            raise InvalidTaskDoc(f"an update may not change task_id ({row.task_id} -> {cols[0]})")
        self._exec(
            "UPDATE tasks SET task_type = ?, owner_id = ?, status = ?, assigned_node = ?, batch_id = ?,"
            " submitted_at = ?, doc = ? WHERE task_id = ?",
            (*cols[1:], _dumps(task_document(new), f"task {row.task_id}"), row.task_id),
            what=f"cannot update task {row.task_id}",
        )
        if new.status is not row.task.status:
            self.status_changed.append(row.task_id)
        return TaskRow(new, row.queue_seq)

    def update_task(self, task_id: int, mutate: Mutation) -> TaskRow:
        """Read-modify-write one task atomically.

        ``mutate`` receives the stored record and returns the new one (``attrs.evolve``), or None (or the
        record itself) for "no change"; an exception aborts the whole transaction and propagates. Raises
        ``TaskNotFound``. Returns the row as it is after the call (the same row if nothing changed).
        """
        row = self.get_task(task_id)
        if row is None:
            raise TaskNotFound(task_id)
        return self._apply(row, mutate)

    def update_tasks(self, task_ids: Iterable[int], mutate: Mutation) -> list[TaskRow]:
        """``update_task`` for several tasks in one transaction: all changes or none. Returns every row."""
        return [self.update_task(task_id, mutate) for task_id in task_ids]


def _in_transaction(conn: sqlite3.Connection, fn: Callable[[], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def migrate(conn: sqlite3.Connection, migrations: Sequence[Sequence[str]] = MIGRATIONS) -> int:
    """Bring the database to ``len(migrations)``, one transaction per migration; return the version."""
    target = len(migrations)
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read the version inside the write transaction: another process may have migrated meanwhile.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > target:
                raise SchemaVersionError(
                    f"the database has schema version {version}, newer than this KohakuRiver knows"
                    f" ({target}); upgrade KohakuRiver or use a backup made for this version"
                )
            if version == target:
                conn.execute("ROLLBACK")
                return version
            for statement in migrations[version]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


# -- the store ---------------------------------------------------------------------------------------------


class _Job:
    __slots__ = ("cancelled", "fn", "lock", "started", "task", "token")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any]) -> None:
        self.fn = fn
        self.task = trio.lowlevel.current_task()
        self.token = trio.lowlevel.current_trio_token()
        self.lock = threading.Lock()
        self.started = False
        self.cancelled = False

    def deliver(self, result: outcome.Outcome) -> None:
        with contextlib.suppress(trio.RunFinishedError):  # the trio run is gone; nobody is waiting any more
            self.token.run_sync_soon(trio.lowlevel.reschedule, self.task, result)


class Store:
    """The host's state store. Create it with ``open_store``; every method is safe to call from trio."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Clock = time.time,
        read_connections: int = DEFAULT_READ_CONNECTIONS,
        migrations: Sequence[Sequence[str]] = MIGRATIONS,
    ) -> None:
        self.path = pathlib.Path(path)
        self.clock = clock
        self._migrations = migrations
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._writer_main, name="kohakuriver-store-writer", daemon=True
        )
        self._read_limiter = trio.CapacityLimiter(max(1, read_connections))
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._started = False
        #: Woken after every committed write that changed a task's status (``GET /api/status?wait=``).
        self.status_watch = StatusWatch()

    # -- connections

    def _connect(self, *, writer: bool) -> sqlite3.Connection:
        # Reader connections move between trio's worker threads (one user at a time), hence
        # check_same_thread=False for them; the write connection never leaves its thread.
        conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=writer
        )
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys = ON")
            if writer:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(
                        f"cannot use WAL mode for {self.path} (got {mode!r}); use a local filesystem"
                    )
            conn.execute("PRAGMA synchronous = NORMAL")
            if not writer:
                conn.execute("PRAGMA query_only = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare_path(self) -> None:
        # The database holds the cluster token: create it (and a missing directory) private to this user.
        # SQLite gives the -wal and -shm files the same permissions as the database file.
        parent = self.path.parent
        if not parent.exists():
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        except FileExistsError:
            return
        os.close(fd)

    # -- the writer thread

    def _writer_main(self) -> None:
        conn: sqlite3.Connection | None = None
        failure: BaseException | None = None
        try:
            conn = self._connect(writer=True)
        except BaseException as exc:  # reported to every job, so open_store raises it
            failure = exc
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                with job.lock:
                    if job.cancelled:
                        continue
                    job.started = True
                if failure is not None:
                    job.deliver(outcome.Error(StoreError(f"cannot open {self.path}: {failure}")))
                else:
                    job.deliver(outcome.capture(job.fn, conn))
        finally:
            if conn is not None:
                conn.close()

    async def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed or not self._started:
            raise StoreClosed("the store is closed")
        job = _Job(fn)
        self._jobs.put(job)

        def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
            with job.lock:
                if job.started:
                    return trio.lowlevel.Abort.FAILED  # let it finish; Cancelled comes at the next checkpoint
                job.cancelled = True
                return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    async def write(self, fn: Callable[Concatenate[WriteTx, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(tx, *args, **kwargs)`` on the writer thread inside one transaction; commit on return,
        roll back on raise. ``fn`` is a ``WriteTx`` operation (``store.write(WriteTx.set_meta, "k", "v")``)
        or a function composing several atomically; it must be quick and must not call trio.

        Tasks whose status the transaction changed are announced to ``status_watch`` once it committed."""
        changed: list[int] = []

        def job(conn: sqlite3.Connection) -> T:
            tx = WriteTx(conn, self.clock)
            result = _in_transaction(conn, lambda: fn(tx, *args, **kwargs))
            changed.extend(tx.status_changed)  # only reached after COMMIT
            return result

        try:
            return await self._submit(job)
        finally:
            # Back on the trio side (the writer handed the outcome over), even when the caller was
            # cancelled while the job ran: the change is committed either way.
            if changed:
                self.status_watch.changed(changed)

    # -- readers

    def _read_sync(self, fn: Callable[[ReadTx], T]) -> T:
        with self._readers_lock:
            if self._closed:
                raise StoreClosed("the store is closed")
            conn = self._readers.pop() if self._readers else None
        if conn is None:
            conn = self._connect(writer=False)
        reusable = False
        try:
            conn.execute("BEGIN")
            try:
                return fn(ReadTx(conn, self.clock))
            finally:
                conn.execute("ROLLBACK")
                reusable = True  # only a connection whose transaction ended cleanly goes back to the pool
        finally:
            with self._readers_lock:
                if reusable and not self._closed:
                    self._readers.append(conn)
                    conn = None
            if conn is not None:
                conn.close()

    async def read(self, fn: Callable[Concatenate[ReadTx, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(tx, *args, **kwargs)`` on a reader thread, in one read transaction (a consistent
        snapshot). ``fn`` is a ``ReadTx`` operation (``store.read(ReadTx.get_task, 7)``) or a function
        composing several."""
        if self._closed or not self._started:
            raise StoreClosed("the store is closed")
        call = (lambda tx: fn(tx, *args, **kwargs)) if args or kwargs else fn
        return await trio.to_thread.run_sync(self._read_sync, call, limiter=self._read_limiter)

    # -- life cycle

    async def _start(self) -> None:
        await trio.to_thread.run_sync(self._prepare_path)
        self._thread.start()
        self._started = True
        try:
            await self._submit(lambda conn: migrate(conn, self._migrations))
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Finish queued transactions, stop and join the writer thread, close every connection."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive() or self._started:
            self._jobs.put(None)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._thread.join)
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()

    @property
    def closed(self) -> bool:
        return self._closed


@asynccontextmanager
async def open_store(
    path: str | os.PathLike[str],
    *,
    clock: Clock = time.time,
    read_connections: int = DEFAULT_READ_CONNECTIONS,
    migrations: Sequence[Sequence[str]] = MIGRATIONS,
) -> AsyncIterator[Store]:
    """Open (creating and migrating as needed) the store at ``path``; close it, thread joined, on exit."""
    store = Store(path, clock=clock, read_connections=read_connections, migrations=migrations)
    await store._start()
    try:
        yield store
    finally:
        await store.aclose()
