"""``kr task``: submit command tasks, list them, show one, read or follow its logs, kill/pause/resume.

The user's command is an argument vector from the first word after ``--`` (or after the last option) to the
end of the line: ``command`` = argv[0], ``arguments`` = the rest, sent as a JSON list and executed without a
shell, so ``kr task submit -- echo '; rm -rf /'`` prints ``; rm -rf /``. To use a shell, say so:
``kr task submit -- sh -c 'make && ./run'``.

``kr task submit --wait`` shows the task's stdout and stderr as they come (on this process's stdout and
stderr) and exits with the task's exit code (see ``exit_code_for``), like ``srun`` or ``docker run``;
``--wait --quiet`` prints only the id and waits. ``kr task logs -f`` streams over the host's WebSocket and
exits 0 when the task ends, 130 on Ctrl-C.

How ``--wait`` gets the output (``stream_and_wait``), each byte exactly once:

- While the task is queued its status is read with long polls (``wait_for_tasks``: the host answers when
  the status changes; a host from before the long poll is polled, 20 ms growing to 1 s). A task that is
  already final at a read (it ran in between) has its saved output fetched over HTTP, stdout then stderr.
- Otherwise one follow WebSocket per stream (``/ws/tasks/{id}/logs?stream=stdout|stderr&binary=1``, no
  ``lines``: from the first byte), each read by a thread blocked on its socket (``log_socket``: no event
  loop, no trio, whose import and teardown cost more than the rest of a short task's command). The
  runner serves a running container's log from its start, and a finished task's saved files (written
  before it reports the end) whole, so a task that ends before the socket opens loses nothing. Within a
  stream the order is kept; between the two streams it is the arrival order. ``binary=1`` makes the host
  send the bytes as they are (output need not be UTF-8); a host from before it sends text, which is
  written UTF-8 encoded.
- If a stream breaks (a refusal close that may be retried, a dropped connection), it is opened again from
  the start and the bytes already written are skipped (the same bytes every time; an older host makes them
  into the same text every time, so the counts agree there too), rather than asking for ``lines=0`` and
  losing what came in between. How a close is read: ``close_outcome`` (by the refusal code in the close
  reason, else the close code; never by the reason's words).

Heavy imports (the models) happen in the functions that need them: this module is loaded by every
``kr task ...`` and its startup cost is part of every command. ``kr task submit`` validates the spec with
the model (the same messages as the host's) but writes its JSON itself (``spec_body``), without the
converter and cattrs. Its common forms are served before click loads (``task_submit_fast``, which posts
the same body and hands the answer to ``finish_submit``); the option parsers both use are in
``task_submit_args``.
"""

from __future__ import annotations

import gc
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlencode, urlsplit, urlunsplit

import click

from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.lifecycle import FINAL, TaskStatus, describe_exit

from . import task_submit_args
from .client import EXIT_ERROR, EXIT_FORBIDDEN, EXIT_NOT_FOUND, EXIT_UNREACHABLE, CliError, HostClient
from .context import CliContext, KrGroup, json_option, pass_cli
from .output import (
    DASH,
    TextTable,
    clean,
    command_line,
    fmt_age,
    fmt_bool,
    fmt_duration,
    fmt_size,
    fmt_time_and_age,
    info,
    items_of,
    kv_panel,
    parse_time,
    plain,
    print_json,
    print_renderable,
    print_table,
    status_cell,
    status_text,
    stderr_console,
)

if TYPE_CHECKING:
    from kohakuriver_proto.models import CommandTaskSpec

FINAL_STATUSES: frozenset[str] = frozenset(s.value for s in FINAL)
#: Not on a node yet: no output can exist.
QUEUED_STATUSES: frozenset[str] = frozenset(
    s.value for s in (TaskStatus.PENDING_APPROVAL, TaskStatus.PENDING, TaskStatus.ASSIGNING)
)
TASK_ID_RE = re.compile(r"[0-9]{1,20}")

#: ``--wait`` exit codes for final tasks that have no meaningful exit code of their own.
EXIT_KILLED = 137  # 128 + SIGKILL: what a shell reports for a killed process (killed, killed_oom)
EXIT_TASK_FAILED = 1  # failed without an exit code, lost, rejected, or a status this CLI does not know
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C while waiting or following

POLL_FIRST = 0.02
POLL_MAX = 1.0
POLL_GROWTH = 1.25
#: How long the host may hold a status read that waits for a change (``GET /api/status/{id}?wait=&since=``;
#: the host caps it at 30 s, and the client's read timeout is 30 s).
LONG_POLL_SECONDS = 20.0
#: The same with a status line on a terminal: its elapsed time is redrawn at least this often.
LONG_POLL_WITH_STATUS_LINE = 1.0
#: While waiting, how long the host may be unreachable (restarting, network blip) before ``--wait`` gives up.
WAIT_UNREACHABLE_GRACE = 60.0
WS_CONNECT_TIMEOUT = 15.0
#: ``kr task logs -f`` reconnects when the host's stream breaks while the task runs (backoff 0.5 s .. 5 s).
MAX_RECONNECTS = 10
RECONNECT_FIRST_DELAY = 0.5
RECONNECT_MAX_DELAY = 5.0
WS_MAX_MESSAGE = 16 * 1024 * 1024

#: CommandTaskSpec field -> the option a user typed, for error messages.
_FIELD_OPTIONS = {
    "command": "COMMAND",
    "arguments": "ARGS",
    "env_vars": "'-e' / '--env'",
    "required_cores": "'-c' / '--cores'",
    "required_memory_bytes": "'-m' / '--memory'",
    "required_gpus": "'--gpus'",
    "targets": "'-t' / '--target'",
    "container_name": "'--container'",
    "registry_image": "'--image'",
    "working_dir": "'--workdir'",
    "additional_mounts": "'--mount'",
    "name": "'--name'",
    "ip_token": "'--ip-token'",
}


@click.group("task", cls=KrGroup)
def task() -> None:
    """Command tasks: submit, list, status, logs, kill, pause, resume."""


# -- argument helpers ----------------------------------------------------------------------------------------


def check_task_id(value: str) -> str:
    """A task id is a decimal number (a 64-bit snowflake); anything else never reaches a URL path."""
    value = value.strip()
    if not TASK_ID_RE.fullmatch(value):
        raise click.BadParameter(f"not a task id: {clean(value, 40)!r} (ids are decimal numbers)")
    return value


def task_id_callback(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(check_task_id(v) for v in value)
    return check_task_id(value)


def _option_value(parse: Callable[..., Any], *args: Any) -> Any:
    """``parse(*args)`` (a ``task_submit_args`` parser, shared with the fast path), its ``BadValue`` as the
    ``click.BadParameter`` naming the option."""
    try:
        return parse(*args)
    except task_submit_args.BadValue as exc:
        raise click.BadParameter(exc.message, param_hint=exc.hint) from None


def parse_env(items: Iterable[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``-e K=V`` pairs (split at the first ``=``; V may contain ``=`` or be empty). ``-e K`` alone copies K
    from this shell's environment, as ``docker run -e K`` does. Later values win."""
    return _option_value(task_submit_args.parse_env, items, environ)


def parse_gpus(text: str | None) -> list[int]:
    """``--gpus 0,1`` -> ``[0, 1]`` (GPU ids of the target node)."""
    return _option_value(task_submit_args.parse_gpus, text)


def parse_memory(text: str | None) -> int | None:
    """``-m 4G`` -> bytes (``kohakuriver_proto.units``: K/M/G are x1024, KB/MB/GB x1000); 0 = no limit."""
    return _option_value(task_submit_args.parse_memory, text)


def check_targets(targets: Iterable[str]) -> None:
    """``click.BadParameter`` for the first ``-t`` that is not a target (before anything is sent)."""
    from kohakuriver_proto.targets import parse_target

    for text in targets:
        try:
            parse_target(text, "--target")
        except ValidationError as exc:
            raise click.BadParameter(exc.message, param_hint="'-t' / '--target'") from None


def check_mounts(mounts: Iterable[str]) -> None:
    """``click.BadParameter`` for the first ``--mount`` that is not ``SRC:DST[:ro]``."""
    from kohakuriver_proto.models import parse_mount

    for text in mounts:
        try:
            parse_mount(text, "--mount")
        except ValidationError as exc:
            raise click.BadParameter(exc.message, param_hint="'--mount'") from None


def spec_error(exc: ValidationError, field_options: Mapping[str, str]) -> click.ClickException:
    """The click error for a spec the model refused: it names the option behind the field (from
    ``field_options``), or is a usage error when no option sets that field."""
    field = re.split(r"[.\[]", exc.field, maxsplit=1)[0]
    hint = field_options.get(field)
    if hint is None:
        return click.UsageError(str(exc))
    detail = exc.message if exc.field == field else f"{exc.field}: {exc.message}"
    return click.BadParameter(detail, param_hint=hint)


def build_spec(
    argv: Sequence[str],
    *,
    targets: Sequence[str] = (),
    cores: int = 1,
    memory: str | None = None,
    gpus: str | None = None,
    image: str | None = None,
    container: str | None = None,
    env: Iterable[str] = (),
    mounts: Sequence[str] = (),
    workdir: str | None = None,
    privileged: bool = False,
    name: str | None = None,
    environ: Mapping[str, str] | None = None,
    ip_token: str | None = None,
) -> CommandTaskSpec:
    """The ``CommandTaskSpec`` of ``kr task submit``; ``click.BadParameter`` naming the option if invalid."""
    from kohakuriver_proto.models import CommandTaskSpec

    if not argv:
        raise click.UsageError("missing the command to run: kr task submit [OPTIONS] -- COMMAND [ARGS]...")
    check_targets(targets)
    check_mounts(mounts)
    try:
        return CommandTaskSpec(
            command=argv[0],
            arguments=list(argv[1:]),
            env_vars=parse_env(env, environ),
            required_cores=cores,
            required_memory_bytes=parse_memory(memory),
            required_gpus=parse_gpus(gpus),
            targets=[t.strip() for t in targets],
            container_name=container,
            registry_image=image,
            working_dir=workdir,
            privileged=privileged,
            additional_mounts=list(mounts),
            name=name,
            ip_token=ip_token,
        )
    except ValidationError as exc:
        raise spec_error(exc, _FIELD_OPTIONS) from None


def spec_body(spec: Any) -> dict[str, Any]:
    """The JSON body of a validated spec, as ``kohakuriver_proto.converter.unstructure`` writes it (a unit
    test holds the two equal): every field by name, enums as their values. Written here because the
    converter's import (cattrs, and hooks for every model) cost a quarter of ``kr task submit``'s start;
    a ``CommandTaskSpec`` holds only strings, numbers, booleans, lists, string maps and one enum."""
    import enum

    import attrs

    body: dict[str, Any] = {}
    for field in attrs.fields(type(spec)):
        value = getattr(spec, field.name)
        body[field.name] = value.value if isinstance(value, enum.Enum) else value
    return body


# -- waiting -------------------------------------------------------------------------------------------------


def is_final(record: Mapping[str, Any]) -> bool:
    return record.get("status") in FINAL_STATUSES


def has_started(record: Mapping[str, Any]) -> bool:
    """Out of the queue: running, paused, or already final (output may exist)."""
    return record.get("status") not in QUEUED_STATUSES


def exit_code_for(record: Mapping[str, Any]) -> int:
    """The exit code ``kr task submit --wait`` ends with, for one final task record.

    - ``completed``: 0.
    - ``failed``: the task's exit code when it is 1..255, else 1 (no exit code, or one a process cannot
      return, e.g. -1 for "the runner lost it").
    - ``killed`` and ``killed_oom``: 137 (128 + SIGKILL, as a shell reports a killed process).
    - ``stopped`` (a VPS): its exit code when 1..255, else 0.
    - ``lost``, ``rejected`` and any status this CLI does not know: 1.
    """
    status = record.get("status")
    code = record.get("exit_code")
    usable = isinstance(code, int) and not isinstance(code, bool) and 1 <= code <= 255
    if status == TaskStatus.COMPLETED:
        return 0
    if status == TaskStatus.FAILED:
        return code if usable else EXIT_TASK_FAILED
    if status in (TaskStatus.KILLED, TaskStatus.KILLED_OOM):
        return EXIT_KILLED
    if status == TaskStatus.STOPPED:
        return code if usable else 0
    return EXIT_TASK_FAILED


def combined_exit_code(records: Sequence[Mapping[str, Any]]) -> int:
    """Several tasks (one per target): the first non-zero exit code in submission order, else 0."""
    for record in records:
        code = exit_code_for(record)
        if code != 0:
            return code
    return 0


def poll_delays(first: float = POLL_FIRST, maximum: float = POLL_MAX, growth: float = POLL_GROWTH):
    """20 ms, 25 ms, 31 ms, ... capped at 1 s (reached after ~4 s): the pauses between status reads when the
    host does not hold them (an older host, see ``wait_for_tasks``): a short task is seen within a few tens
    of milliseconds of its end, a long one costs one request a second."""
    delay = first
    while True:
        yield delay
        delay = min(maximum, delay * growth)


def read_status(
    client: HostClient, task_id: str, since: str | None = None, hold: float = LONG_POLL_SECONDS
) -> dict[str, Any]:
    """``GET /api/status/{id}``; with ``since`` (the status last seen) a long poll: the host answers when the
    status is no longer ``since``, or after ``hold`` seconds with the same record (a host from before the
    long poll ignores the parameters and answers at once)."""
    params = None if since is None else {"wait": f"{hold:g}", "since": since}
    record = client.get(f"/api/status/{task_id}", params=params)
    if not isinstance(record, dict):
        raise CliError(f"the host returned something that is not a task record for task {task_id}")
    return record


def wait_for_tasks(
    client: HostClient,
    task_ids: Sequence[str],
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    on_poll: Callable[[dict[str, dict[str, Any]]], None] | None = None,
    until: Callable[[Mapping[str, Any]], bool] = is_final,
    hold: float = LONG_POLL_SECONDS,
) -> list[dict[str, Any]]:
    """Read the tasks' status until every one is final (or what ``until`` says); the last records, in
    ``task_ids`` order.

    Each read after the first is a long poll (``read_status`` with the status last seen), so a change is
    seen the moment the host records it, and a task that keeps its status costs one request per ``hold``
    seconds. The tasks are held one after the other: all of them must get there, so holding on the first
    that has not delays nothing. A host that answers a long poll at once with the status unchanged does not
    hold (it predates the long poll): then the reads are spaced by ``poll_delays``, so this never spins.

    A host that is unreachable for a while (restart, network blip) is retried for ``WAIT_UNREACHABLE_GRACE``
    seconds; any other error (404, 401, ...) ends the wait with that error.
    """
    records: dict[str, dict[str, Any]] = {}
    pending = list(task_ids)
    unreachable_since: float | None = None
    delays = poll_delays()
    while True:
        still: list[str] = []
        pause = False
        for task_id in pending:
            since = records[task_id].get("status") if task_id in records else None
            since = since if isinstance(since, str) else None
            asked = clock()
            try:
                record = read_status(client, task_id, since, hold)
            except CliError as exc:
                if exc.exit_code != EXIT_UNREACHABLE:
                    raise
                now = clock()
                unreachable_since = now if unreachable_since is None else unreachable_since
                if now - unreachable_since > WAIT_UNREACHABLE_GRACE:
                    raise
                still, pause = pending, True
                break
            unreachable_since = None
            records[task_id] = record
            if not until(record):
                still.append(task_id)
                # Unchanged, and answered well before the hold ran out: this host did not hold the read.
                if since is not None and record.get("status") == since and clock() - asked < hold / 2:
                    pause = True
        if on_poll is not None:
            on_poll(records)
        if not still:
            return [records[task_id] for task_id in task_ids]
        pending = still
        if pause:
            sleep(next(delays))


def _wait_line(records: Mapping[str, Mapping[str, Any]], task_ids: Sequence[str], started: float) -> str:
    elapsed = fmt_duration(time.monotonic() - started)
    if len(task_ids) == 1:
        record = records.get(task_ids[0], {})
        status = clean(record.get("status", "submitted"))
        node = record.get("assigned_node")
        where = f" on {clean(node)}" if node else ""
        message = record.get("status_message")
        extra = f": {clean(message, 60)}" if message and status in ("pending", "assigning") else ""
        return f"task {task_ids[0]}: {status}{where}{extra} ({elapsed})"
    done = sum(1 for r in records.values() if is_final(r))
    return f"{done}/{len(task_ids)} tasks finished ({elapsed})"


def _poll_with_status_line(
    client: HostClient, task_ids: list[str], until: Callable[[Mapping[str, Any]], bool]
) -> list[dict[str, Any]]:
    """``wait_for_tasks``, with a status line on stderr while it waits when stderr is a terminal."""
    if not sys.stderr.isatty():
        return wait_for_tasks(client, task_ids, until=until)
    console = stderr_console()
    started = time.monotonic()
    # transient: the line disappears when the wait ends, before any output of the task is written
    with console.status(f"waiting for {len(task_ids)} task(s)") as status:
        return wait_for_tasks(
            client,
            task_ids,
            until=until,
            on_poll=lambda r: status.update(_wait_line(r, task_ids, started)),
            hold=LONG_POLL_WITH_STATUS_LINE,
        )


def _wait_and_exit(ctx: click.Context, client: HostClient, task_ids: list[str]) -> None:
    """``--wait --quiet`` (and ``--wait --json``): wait without showing output, exit with the task's code."""
    try:
        records = _poll_with_status_line(client, task_ids, is_final)
    except KeyboardInterrupt:
        _stopped_waiting(ctx, task_ids)
    for record in records:
        if record.get("status") != TaskStatus.COMPLETED or len(records) > 1:
            info(f"task {clean(record.get('task_id'))}: {_outcome(record)}")
    ctx.exit(combined_exit_code(records))


def _stopped_waiting(ctx: click.Context, task_ids: Sequence[str]) -> None:
    info(f"stopped waiting; the task keeps running (`kr task kill {' '.join(task_ids)}` stops it)")
    ctx.exit(EXIT_INTERRUPTED)


def _ended_on_its_own(record: Mapping[str, Any]) -> bool:
    """Completed, or failed with its own exit code: the exit code says it all, as with ``docker run``."""
    if record.get("status") == TaskStatus.COMPLETED:
        return True
    code = record.get("exit_code")
    usable = isinstance(code, int) and not isinstance(code, bool) and 1 <= code <= 255
    return record.get("status") == TaskStatus.FAILED and usable


def stream_and_wait(
    ctx: click.Context,
    obj: CliContext,
    task_ids: list[str],
    *,
    connect: Callable[..., Any] | None = None,
) -> None:
    """``--wait``: the tasks' stdout and stderr on ours while they run, then exit with the task's code."""
    client = obj.client()
    try:
        started = _poll_with_status_line(client, task_ids, has_started)
        if all(is_final(record) for record in started):
            # It ran between two polls: its output is saved on the runner already.
            for task_id in task_ids:
                for stream, write in (("stdout", _write_stdout), ("stderr", _write_stderr)):
                    write(client.content(f"/api/tasks/{task_id}/{stream}"))
            records = wait_for_tasks(client, task_ids)
        else:
            settings = obj.settings()
            from . import log_socket  # noqa: F401 - loaded before the freeze below

            # What is loaded now lives until the exit: keep it out of the collector's way (the exit's
            # collections walked it for 10-30 ms).
            gc.freeze()
            finals: list[list[dict[str, Any]]] = []
            ends = follow_outputs(
                settings.host_url, settings.token, task_ids, _write_stdout, _write_stderr, connect,
                # The final records are read while the output streams: the status is final before the
                # engine lets the output end, so no request is left for after it.
                meanwhile=lambda: finals.append(wait_for_tasks(client, task_ids)),
            )  # fmt: skip
            records = finals[0]
            for task_id, stream, end in ends:
                if end.error:
                    info(f"task {task_id}: its {stream} could not be read to the end: {end.error}")
    except KeyboardInterrupt:
        _stopped_waiting(ctx, task_ids)
    for record in records:
        if not _ended_on_its_own(record) or (len(records) > 1 and exit_code_for(record) != 0):
            info(f"task {clean(record.get('task_id'))}: {_outcome(record)}")
    ctx.exit(combined_exit_code(records))


def follow_outputs(
    host_url: str,
    token: str | None,
    task_ids: Sequence[str],
    write_stdout: Callable[[bytes], None],
    write_stderr: Callable[[bytes], None],
    connect: Callable[..., Any] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    meanwhile: Callable[[], object] | None = None,
) -> list[tuple[str, str, FollowEnd]]:
    """Both streams of every task, whole, at once: ``(task id, stream, how it ended)`` for each.

    One thread per stream, each blocked on its socket (a handful of streams; a thread costs less than the
    event loop it replaces); writes are serialised so the two streams never tear each other's pieces.
    ``meanwhile`` runs here while they stream (an exception from it leaves at once). The threads are
    daemons: Ctrl-C interrupts the joins here, and the process leaves without them."""
    import threading

    lock = threading.Lock()
    ends: list[tuple[str, str, FollowEnd]] = []
    errors: list[BaseException] = []

    def one(task_id: str, stream: str, write: Callable[[bytes], None]) -> None:
        def locked_write(data: bytes) -> None:
            with lock:
                write(data)

        try:
            end = follow_whole_stream(
                host_url, task_id, stream, token, locked_write, connect=connect, sleep=sleep
            )
        except BaseException as exc:  # e.g. our stdout closed under us: the main thread raises it
            errors.append(exc)
            return
        ends.append((task_id, stream, end))

    threads = [
        threading.Thread(target=one, args=(task_id, stream, write), daemon=True)
        for task_id in task_ids
        for stream, write in (("stdout", write_stdout), ("stderr", write_stderr))
    ]
    for thread in threads:
        thread.start()
    if meanwhile is not None:
        meanwhile()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return ends


def follow_whole_stream(
    host_url: str,
    task_id: str,
    stream: str,
    token: str | None,
    write: Callable[[bytes], None],
    *,
    connect: Callable[..., Any] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> FollowEnd:
    """One stream of a task from its first byte to its end, each byte written once.

    A broken stream (a refusal that may be retried, a dropped connection) is opened again from the start
    and the bytes already written are skipped, whether the task still runs (the engine's log) or has ended
    (the saved file): the same bytes each time. Gives up after ``MAX_RECONNECTS`` attempts in a row
    that brought nothing new.
    """
    written = 0
    failures = 0
    url = logs_ws_url(host_url, task_id, stream, None)
    while True:
        skip = written
        progressed = False

        def skipping_write(data: bytes) -> None:
            nonlocal skip, written, progressed
            if skip:
                if len(data) <= skip:
                    skip -= len(data)
                    return
                data, skip = data[skip:], 0
            written += len(data)
            progressed = True
            write(data)

        end = follow_logs(url, token, skipping_write, connect=connect)
        if not end.reconnect:
            return end
        failures = 1 if progressed else failures + 1
        if failures > MAX_RECONNECTS:
            return end
        info(f"task {task_id}: {stream} stream interrupted ({end.error}); reconnecting")
        sleep(min(RECONNECT_MAX_DELAY, RECONNECT_FIRST_DELAY * 2 ** (failures - 1)))


def _outcome(record: Mapping[str, Any]) -> str:
    status = clean(record.get("status"))
    code = record.get("exit_code")
    parts = [status]
    if isinstance(code, int) and not isinstance(code, bool):
        parts.append(describe_exit(code, oom_killed=record.get("status") == TaskStatus.KILLED_OOM))
    if record.get("error_message"):
        parts.append(clean(record["error_message"], 200))
    return ", ".join(parts)


# -- submit --------------------------------------------------------------------------------------------------


@task.command("submit", context_settings={"allow_interspersed_args": False})
@click.option(
    "-t", "--target", "targets", multiple=True, metavar="NODE[:NUMA][::GPUS]",
    help="Where to run: a node, a NUMA node of it, GPU ids on it. Repeat for one task per target.",
)  # fmt: skip
@click.option("-c", "--cores", type=click.IntRange(0, 65536), default=1, show_default=True, help="CPU cores.")
@click.option("-m", "--memory", metavar="SIZE", help="Memory limit: 512M, 4G (x1024), 4GB (x1000); 0 = none.")
@click.option("--gpus", metavar="IDS", help="GPU ids on the target node, e.g. 0,1 (needs -t).")
@click.option("--image", metavar="IMAGE", help="Registry image to run (pulled by the runner).")
@click.option("--container", metavar="ENV", help="KohakuRiver environment (container tarball) to run.")
@click.option("-e", "--env", multiple=True, metavar="K=V", help="Environment variable; K alone copies it.")
@click.option("--mount", "mounts", multiple=True, metavar="SRC:DST[:ro]", help="Extra bind mount.")
@click.option("--workdir", metavar="DIR", help="Working directory inside the container.")
@click.option("--privileged", is_flag=True, help="Run the container privileged.")
@click.option("--name", help="A name to recognise the task by.")
@click.option(
    "--ip-token", metavar="TOKEN",
    help="Give the task the overlay address `kr overlay reserve` reserved (it runs on that node).",
)  # fmt: skip
@click.option(
    "-w",
    "--wait",
    is_flag=True,
    help="Show the task's stdout and stderr as it runs, then exit with its exit code.",
)
@click.option(
    "-q", "--quiet", is_flag=True,
    help="With --wait: print only the task id (on stdout, as without --wait) and none of its output.",
)  # fmt: skip
@json_option
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- COMMAND [ARGS]...")
@pass_cli
@click.pass_context
def submit(
    ctx: click.Context,
    obj: CliContext,
    targets: tuple[str, ...],
    cores: int,
    memory: str | None,
    gpus: str | None,
    image: str | None,
    container: str | None,
    env: tuple[str, ...],
    mounts: tuple[str, ...],
    workdir: str | None,
    privileged: bool,
    name: str | None,
    ip_token: str | None,
    wait: bool,
    quiet: bool,
    argv: tuple[str, ...],
) -> None:
    """Run COMMAND once, in a container, on a node that fits.

    Everything after `--` is the command, passed as-is (no shell):
    `kr task submit -- python train.py --lr 1e-3`. Prints the task id (one per target) on stdout,
    so `ID=$(kr task submit -- ...)` works.

    With --wait, like `docker run`: the task's stdout and stderr appear on ours as it runs, and the exit
    code is the task's: 0 completed; the process's code if it failed (1 if it has none); 137 if killed or
    OOM-killed; 1 if lost. With several tasks, the first non-zero one. The id is not printed on stdout then
    (stdout is the task's: `out=$(kr task submit --wait -- cmd)`); it is shown on stderr when stderr is a
    terminal. Ctrl-C stops waiting and leaves the task running. --wait --quiet (or --wait --json) waits
    without the output and prints the id as without --wait.
    """
    spec = build_spec(
        argv,
        targets=targets,
        cores=cores,
        memory=memory,
        gpus=gpus,
        image=image,
        container=container,
        env=env,
        mounts=mounts,
        workdir=workdir,
        privileged=privileged,
        name=name,
        ip_token=ip_token,
    )
    answer = obj.client().post("/api/submit", json=spec_body(spec))
    finish_submit(ctx, obj, answer, wait=wait, quiet=quiet)


def finish_submit(ctx: click.Context, obj: CliContext, answer: Any, *, wait: bool, quiet: bool) -> None:
    """What ``kr task submit`` does with the host's answer to its ``POST /api/submit``: print the ids (or
    the JSON), or show the output while waiting; ``ctx.exit`` with the exit code. The fast path
    (``task_submit_fast``, served before click) posts the body itself and hands the answer here."""
    client = obj.client()
    task_ids = [str(i) for i in (answer.get("task_ids") if isinstance(answer, dict) else None) or []]
    if not task_ids:
        raise CliError("the host accepted the task but returned no task id")
    if wait and not (quiet or obj.json_output):
        if sys.stderr.isatty():
            info(f"task {', '.join(task_ids)}")
            if isinstance(answer.get("message"), str) and answer["message"]:
                info(clean(answer["message"], 300))
        stream_and_wait(ctx, obj, task_ids)
        return
    if obj.json_output:
        print_json(answer)
    else:
        for task_id in task_ids:
            click.echo(task_id)
        if isinstance(answer.get("message"), str) and answer["message"]:
            info(clean(answer["message"], 300))
    sys.stdout.flush()
    if wait:
        _wait_and_exit(ctx, client, task_ids)


# -- list / status -------------------------------------------------------------------------------------------

_STATUS_CHOICE = click.Choice([s.value for s in TaskStatus], case_sensitive=False)


@task.command("list")
@click.option(
    "-s", "--status", "statuses", multiple=True, type=_STATUS_CHOICE, metavar="STATUS",
    help="Only this status (repeatable): pending, assigning, running, paused, completed, failed, killed, ...",
)  # fmt: skip
@click.option("-n", "--node", metavar="HOSTNAME", help="Only tasks on this node.")
@click.option("--type", "task_type", type=click.Choice(["command", "vps"]), help="Only this task type.")
@click.option("-a", "--all-users", is_flag=True, help="Every user's tasks (operators and admins).")
@click.option("-l", "--limit", type=click.IntRange(1, 10000), help="At most this many (newest first).")
@click.option("--offset", type=click.IntRange(0), help="Skip this many (paging with --limit).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the task ids.")
@json_option
@pass_cli
def list_tasks(
    obj: CliContext,
    statuses: tuple[str, ...],
    node: str | None,
    task_type: str | None,
    all_users: bool,
    limit: int | None,
    offset: int | None,
    quiet: bool,
) -> None:
    """List tasks, newest first (your own unless --all-users)."""
    client = obj.client()
    params = list_params(statuses, node, task_type, limit, offset)
    if not all_users:
        me = client.get("/api/auth/me")
        if isinstance(me, dict) and isinstance(me.get("username"), str):
            params["owner"] = me["username"]
    answer = client.get("/api/tasks", params=params)
    tasks = items_of(answer, "tasks", "items")
    if obj.json_output:
        print_json(answer)
        return
    if quiet:
        for record in tasks:
            click.echo(clean(record.get("task_id")))
        return
    print_table(task_table(tasks))
    if isinstance(answer, dict) and answer.get("has_more"):
        shown = int(answer.get("offset") or 0) + len(tasks)
        info(f"(more tasks: kr task list --offset {shown} ...)")


def list_params(
    statuses: Iterable[str], node: str | None, task_type: str | None, limit: int | None, offset: int | None
) -> dict[str, str]:
    """Query parameters of ``GET /api/tasks``; several statuses are one comma-separated ``status``."""
    params: dict[str, str] = {}
    statuses = [s.lower() for s in statuses]
    if statuses:
        params["status"] = ",".join(dict.fromkeys(statuses))
    if node:
        params["node"] = node
    if task_type:
        params["task_type"] = task_type
    if limit is not None:
        params["limit"] = str(limit)
    if offset is not None:
        params["offset"] = str(offset)
    return params


def task_table(tasks: Sequence[Mapping[str, Any]]) -> TextTable:
    """The table of ``kr task list`` (a ``TextTable``: this command cannot afford rich's import)."""
    table = TextTable(
        "ID", "NAME / COMMAND", "STATUS", "NODE", "CORES", "MEM", "SUBMITTED", "EXIT",
        right=("CORES", "EXIT"), shrink="NAME / COMMAND",
    )  # fmt: skip
    for record in tasks:
        label = clean(record["name"], 40) if record.get("name") else command_line(record, 50)
        exit_code = record.get("exit_code")
        table.add_row(
            clean(record.get("task_id")),
            label,
            status_cell(record.get("status")),
            clean(record.get("assigned_node") or DASH),
            clean(record.get("required_cores", DASH)),
            fmt_size(record.get("required_memory_bytes")),
            fmt_age(record.get("submitted_at")),
            clean(DASH if exit_code is None else exit_code),
        )
    if not tasks:
        table.add_row("(no tasks)", *[""] * 7)
    return table


def task_rows(record: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The key/value rows of ``kr task status``."""
    status = status_text(record.get("status"))
    if record.get("status_message") and not is_final(record):
        status.append(f"  {clean(record['status_message'], 200)}", style="dim")
    image = record.get("registry_image") or record.get("container_name") or record.get("docker_image_name")
    gpus = record.get("required_gpus") or []
    placement = record.get("target") or DASH
    if record.get("target_numa_node_id") is not None:
        placement = f"{placement} (NUMA {record['target_numa_node_id']})"
    rows: list[tuple[str, Any]] = [
        ("Status", status),
        ("Name", clean(record.get("name"))),
        ("Type", clean(record.get("task_type"))),
        ("Owner", clean(record.get("owner"))),
        ("Command", command_line(record)),
        ("Image", clean(image)),
        ("Node", clean(record.get("assigned_node"))),
        ("Target", clean(placement)),
        ("Cores", clean(record.get("required_cores"))),
        (
            "Memory",
            fmt_size(record.get("required_memory_bytes"))
            if record.get("required_memory_bytes")
            else "no limit",
        ),
        ("GPUs", ",".join(str(g) for g in gpus) if gpus else DASH),
    ]
    if record.get("working_dir"):
        rows.append(("Workdir", clean(record["working_dir"])))
    if record.get("additional_mounts"):
        rows.append(("Mounts", clean(", ".join(str(m) for m in record["additional_mounts"]))))
    if record.get("privileged"):
        rows.append(("Privileged", fmt_bool(True)))
    env = record.get("env_vars") or {}
    if env:
        rows.append(("Env", clean(", ".join(sorted(str(k) for k in env))) + "  (values: --json)"))
    if record.get("ssh_port"):
        rows.append(("SSH port", clean(record["ssh_port"])))
    if record.get("overlay_ip"):
        rows.append(("Overlay IP", clean(record["overlay_ip"])))
    rows.append(("Submitted", fmt_time_and_age(record.get("submitted_at"))))
    if record.get("started_at"):
        rows.append(("Started", fmt_time_and_age(record.get("started_at"))))
    if record.get("completed_at"):
        rows.append(("Ended", fmt_time_and_age(record.get("completed_at"))))
    started, ended = parse_time(record.get("started_at")), parse_time(record.get("completed_at"))
    if started and ended:
        rows.append(("Ran for", fmt_duration((ended - started).total_seconds())))
    code = record.get("exit_code")
    if isinstance(code, int) and not isinstance(code, bool):
        rows.append(("Exit", describe_exit(code, oom_killed=record.get("status") == TaskStatus.KILLED_OOM)))
    if record.get("error_message"):
        rows.append(("Error", plain(record["error_message"], 1000, style="red")))
    return rows


def show_record(
    obj: CliContext,
    path: str,
    kind: str,
    task_id: str,
    rows_of: Callable[[Mapping[str, Any]], list[tuple[str, Any]]],
) -> None:
    """``status`` of one task or VPS (``kind``): the host's record as JSON (``--json``) or as a panel of
    ``rows_of``."""
    record = obj.client().get(path)
    if obj.json_output:
        print_json(record)
        return
    title = f"{kind} {task_id}"
    if not isinstance(record, dict):
        raise CliError(f"the host returned something that is not a {kind} record for {title}")
    print_renderable(kv_panel(title, rows_of(record)))


@task.command("status")
@click.argument("task_id", callback=task_id_callback, metavar="ID")
@json_option
@pass_cli
def status_cmd(obj: CliContext, task_id: str) -> None:
    """Show one task."""
    show_record(obj, f"/api/status/{task_id}", "task", task_id, task_rows)


# -- logs ----------------------------------------------------------------------------------------------------


def logs_ws_url(host_url: str, task_id: str, stream: str, lines: int | None) -> str:
    """``http(s)://host[:port][/prefix]`` -> ``ws(s)://host[:port][/prefix]/ws/tasks/{id}/logs?...``, asking
    for binary messages (the output's bytes as they are; a host from before ``binary`` sends text)."""
    parts = urlsplit(host_url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None:
        raise CliError(f"cannot follow logs over {parts.scheme}:// (use an http:// or https:// host URL)", 2)
    query: dict[str, str] = {"stream": stream}
    if lines is not None:
        query["lines"] = str(lines)
    query["binary"] = "1"
    path = f"{parts.path.rstrip('/')}/ws/tasks/{task_id}/logs"
    return urlunsplit((scheme, parts.netloc, path, urlencode(query), ""))


class FollowEnd(NamedTuple):
    """How one log WebSocket ended: the exit code for ``kr task logs -f``, an error message (None when the
    task ended normally), and whether to connect again (the host said a later attempt may work, or the
    connection dropped)."""

    exit_code: int
    error: str | None = None
    reconnect: bool = False


#: What a log stream's refusal code means for the person reading (the code decides, never these words).
_STREAM_REFUSALS = {
    "not_found": "task not found",
    "not_allowed": "not allowed to read this task's output",
    "runner_unavailable": "the task's runner could not serve its output",
    "node_offline": "the task's node is offline",
}


def close_outcome(code: int | None, reason: str | None) -> FollowEnd:
    """What a WebSocket close from the host means for ``kr task logs -f``.

    1000/1001/1005 (or no close frame): the task ended and its output is complete. 1006: the connection
    dropped, connect again. Anything else is a refusal read by ``session_opening``: its code (the close
    reason, a ``RefusalCode`` name) gives the exit code and whether to connect again; without a code (a
    host from before the codes, or a close code it did not come with) the close code alone decides: 1011
    reconnects, 1008 is "not found" (exit 3), others exit 1. The words of a reason are shown, never read.
    """
    from kohakuriver_proto.session_opening import CLOSE_UNAVAILABLE, refused

    if code in (None, 1000, 1001, 1005):  # normal closure / going away / no status: the task ended
        return FollowEnd(0)
    if code == 1006:
        return FollowEnd(EXIT_UNREACHABLE, "the connection to the host was lost", reconnect=True)
    refusal = refused("", code, reason)
    if refusal.code is not None:
        name = refusal.code.value
        what = _STREAM_REFUSALS.get(name, f"the host refused the log stream ({name})")
        return FollowEnd(refusal.code.exit_code, what, reconnect=refusal.code.retry_later)
    text = clean(refusal.reason, 300) if refusal.reason else ""
    if refusal.code_name is not None:  # a code from a newer host
        text = f"the host refused the log stream ({refusal.code_name})"
    if code == CLOSE_UNAVAILABLE:
        return FollowEnd(EXIT_ERROR, text or "the host's log stream broke", reconnect=True)
    return FollowEnd(refusal.exit_code, text or f"the host closed the log stream (code {code})")


def follow_logs(
    url: str,
    token: str | None,
    write: Callable[[bytes], None],
    *,
    connect: Callable[..., Any] | None = None,
) -> FollowEnd:
    """Write every message of the log WebSocket at ``url`` until the host closes it.

    Binary messages are written as they are, text ones (a host from before ``binary=1``) UTF-8 encoded.
    ``write`` blocks on a slow stdout; that is the backpressure we want (the host's send queue, not this
    process, holds what the terminal cannot take yet). ``connect``: ``log_socket.open_log_socket`` or a
    test's stand-in with its signature.
    """
    from .log_socket import Ended, HandshakeFailed, Rejected, open_log_socket

    connect = connect or open_log_socket
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        ws = connect(url, headers, timeout=WS_CONNECT_TIMEOUT, max_message=WS_MAX_MESSAGE)
    except Rejected as exc:
        body = exc.body.decode("utf-8", "replace") if exc.body else ""
        code = {401: EXIT_FORBIDDEN, 403: EXIT_FORBIDDEN, 404: EXIT_NOT_FOUND}.get(exc.status, EXIT_ERROR)
        why = _error_text(body) or "no reason given"
        return FollowEnd(code, f"the host refused the log stream: {why} (HTTP {exc.status})")
    except TimeoutError:
        return FollowEnd(
            EXIT_UNREACHABLE, f"the host did not accept the log stream within {WS_CONNECT_TIMEOUT:.0f} s"
        )
    except HandshakeFailed as exc:
        where = url.split("?")[0]
        return FollowEnd(EXIT_UNREACHABLE, f"cannot open the log stream at {where}: {exc}")
    except OSError as exc:
        return FollowEnd(EXIT_UNREACHABLE, f"cannot reach the host: {exc.strerror or exc}")
    with ws:
        while True:
            message = ws.receive()
            if isinstance(message, Ended):
                return close_outcome(message.code, message.reason)
            write(message.encode("utf-8") if isinstance(message, str) else bytes(message))


def follow_task_logs(
    host_url: str,
    task_id: str,
    stream: str,
    lines: int | None,
    token: str | None,
    write: Callable[[bytes], None],
    still_running: Callable[[], bool],
    *,
    connect: Callable[..., Any] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> FollowEnd:
    """``follow_logs`` plus reconnection: when the stream breaks (a close that may be retried, a lost
    connection) while the task still runs, connect again asking for new output only (``lines=0``, so
    nothing is printed twice), with backoff; give up after ``MAX_RECONNECTS`` attempts in a row that brought
    no output."""
    failures = 0
    while True:
        wrote = False

        def counting_write(data: bytes) -> None:
            nonlocal wrote
            wrote = True
            write(data)

        url = logs_ws_url(host_url, task_id, stream, lines)
        end = follow_logs(url, token, counting_write, connect=connect)
        if not end.reconnect:
            return end
        failures = 1 if wrote else failures + 1
        if failures > MAX_RECONNECTS or not still_running():
            return end
        info(f"log stream interrupted ({end.error}); reconnecting")
        sleep(min(RECONNECT_MAX_DELAY, RECONNECT_FIRST_DELAY * 2 ** (failures - 1)))
        lines = 0


def _error_text(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return clean(body.strip().splitlines()[0] if body.strip() else "", 200)
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return clean(data["message"], 200)
    return clean(body, 200)


def _write_to(stream: Any, data: bytes) -> None:
    """Bytes as they are (logs need not be UTF-8), flushed at once (the output is live)."""
    stream.flush()
    out = getattr(stream, "buffer", None)
    if out is None:  # a text-only stream (embedding, some IDEs)
        stream.write(data.decode("utf-8", "replace"))
        stream.flush()
        return
    out.write(data)
    out.flush()


def _write_stdout(data: bytes) -> None:
    _write_to(sys.stdout, data)


def _write_stderr(data: bytes) -> None:
    _write_to(sys.stderr, data)


@task.command("logs")
@click.argument("task_id", callback=task_id_callback, metavar="ID")
@click.option("--stderr", "use_stderr", is_flag=True, help="The task's stderr instead of its stdout.")
@click.option("-f", "--follow", is_flag=True, help="Keep streaming until the task ends (Ctrl-C to stop).")
@click.option("-n", "--lines", type=click.IntRange(0), help="Only the last N lines.")
@pass_cli
@click.pass_context
def logs(
    ctx: click.Context, obj: CliContext, task_id: str, use_stderr: bool, follow: bool, lines: int | None
) -> None:
    """Print a task's output (stdout, or stderr with --stderr), raw, to stdout."""
    stream = "stderr" if use_stderr else "stdout"
    client = obj.client()
    params = {} if lines is None else {"lines": str(lines)}
    if follow:
        record = client.get(f"/api/status/{task_id}")  # a clean 404/403 before any WebSocket
        if not (isinstance(record, dict) and is_final(record)):
            settings = obj.settings()

            def still_running() -> bool:
                again = client.get(f"/api/status/{task_id}")
                return not (isinstance(again, dict) and is_final(again))

            try:
                end = follow_task_logs(
                    settings.host_url, task_id, stream, lines, settings.token, _write_stdout, still_running
                )
            except KeyboardInterrupt:
                ctx.exit(EXIT_INTERRUPTED)
            if end.error:
                raise CliError(end.error, end.exit_code)
            ctx.exit(end.exit_code)
    _write_stdout(client.content(f"/api/tasks/{task_id}/{stream}", params=params))


# -- control -------------------------------------------------------------------------------------------------


def _control(obj: CliContext, task_ids: Sequence[str], path: str, done: str) -> None:
    client = obj.client()
    failures: list[CliError] = []
    answers = []
    for task_id in task_ids:
        try:
            answer = client.post(path.format(id=task_id))
        except CliError as exc:
            if len(task_ids) == 1:
                raise
            click.echo(f"Error: task {task_id}: {exc.format_message()}", err=True)
            failures.append(exc)
            continue
        answers.append(answer)
        if not obj.json_output:
            message = answer.get("message") if isinstance(answer, dict) else None
            click.echo(f"task {task_id}: {clean(message, 200) if message else done}")
    if obj.json_output:
        print_json(answers[0] if len(task_ids) == 1 else answers)
    if failures:
        raise click.exceptions.Exit(failures[0].exit_code)


@task.command("kill")
@click.argument("task_ids", nargs=-1, required=True, callback=task_id_callback, metavar="ID...")
@json_option
@pass_cli
def kill(obj: CliContext, task_ids: tuple[str, ...]) -> None:
    """Kill tasks (a task still preparing never starts)."""
    _control(obj, task_ids, "/api/kill/{id}", "kill requested")


@task.command("pause")
@click.argument("task_ids", nargs=-1, required=True, callback=task_id_callback, metavar="ID...")
@json_option
@pass_cli
def pause(obj: CliContext, task_ids: tuple[str, ...]) -> None:
    """Pause running tasks (their processes are frozen, resources stay reserved)."""
    _control(obj, task_ids, "/api/command/{id}/pause", "paused")


@task.command("resume")
@click.argument("task_ids", nargs=-1, required=True, callback=task_id_callback, metavar="ID...")
@json_option
@pass_cli
def resume(obj: CliContext, task_ids: tuple[str, ...]) -> None:
    """Resume paused tasks."""
    _control(obj, task_ids, "/api/command/{id}/resume", "resumed")
