"""``kr task submit [OPTIONS] [--] COMMAND...`` with the request sent before click loads, and no models.

Why: ``kr task submit --wait -- true`` is the command people compare with ``docker run --rm IMAGE true``,
and the click command reached the host 133-147 ms after ``kr`` was spawned (``bench/task_latency.py``'s
step table): Python, click, attrs and the task models (the spec is checked client side), then the request.
Everything after the request overlaps the engine creating and starting the container; everything before it
does not. So this path posts first, with ``os``, ``sys``, ``json`` and ``socket`` (``http_transport``), and
loads the rest, if at all, while the task is being scheduled.

1. ``parse_args``: the common options only (``OPTIONS``, ``FLAGS``): ``--long VALUE``, ``--long=VALUE``,
   ``-s VALUE``, read as click reads them (the last value of a single option wins; the command starts at
   ``--`` or at the first word that is not an option, as ``allow_interspersed_args=False`` says). Anything
   else, or anything odd (``--mount``, ``--help``, ``-tNODE``, ``-wq``, a value starting with ``-``, a
   value the shared parsers of ``task_submit_args`` refuse, no command), returns None: the click command
   takes the call and says what it says today. So do a body that cannot be sent (an argument that is not
   UTF-8) and a host URL the transport cannot use (``_post``), before anything is sent.
2. The body: ``spec_body(build_spec(...))`` of the click command, field for field in ``CommandTaskSpec``'s
   order (tests/unit/test_task_submit_fast.py holds the two requests equal, byte for byte), with the
   headers ``HostClient`` sends, over ``http_transport.StdlibTransport``, to the host and with the token of
   ``host_settings`` (``KOHAKURIVER_HOST``/``KOHAKURIVER_TOKEN``, else the credentials file).
3. The spec is not checked here: the host checks the same models. A 4xx answer means nothing was stored
   (the host refuses before its one write), so the click command takes the call from the start: it checks
   the spec first and says what it says today (an invalid target is click's usage error naming ``-t``), or
   posts again and shows the host's refusal as it always has. Only a refused call pays for two requests.
4. Any other answer, or a transport failure (a task may exist: never sent again), goes to
   ``task_cmd.finish_submit`` under a ``KrCommand``, the click command's own code from its POST on: the
   ``HostClient`` it uses gets the answer from this request first (``_Answered``; then the same keep-alive
   connection), so errors, ``--wait``'s output (``stream_and_wait``: stdout and stderr apart, the task's
   exit code), ``--wait --quiet`` and Ctrl-C are the click command's. Without ``--wait``, the ids (or
   ``--json``'s answer) are printed here when they are plain ASCII, as ``click.echo`` would print them;
   anything else goes to ``finish_submit`` too.

Ctrl-C before the answer: ``Aborted!`` and exit 1, as click says it.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from .host_settings import Settings
    from .http_transport import Reply, StdlibTransport, TransportError

SUBMIT_PATH = "/api/submit"
#: ``CliContext``'s timeout, which the click command's ``HostClient`` uses.
TIMEOUT = 30.0
#: Options that take a value -> the click parameter it sets. ``targets`` and ``env`` may repeat.
OPTIONS = {
    "-t": "targets",
    "--target": "targets",
    "-c": "cores",
    "--cores": "cores",
    "-m": "memory",
    "--memory": "memory",
    "--gpus": "gpus",
    "--image": "image",
    "--container": "container",
    "-e": "env",
    "--env": "env",
    "--workdir": "workdir",
    "--name": "name",
}
FLAGS = {"-w": "wait", "--wait": "wait", "-q": "quiet", "--quiet": "quiet", "--json": "json"}
_MULTIPLE = ("targets", "env")
MAX_CORES = 65536  # the click option's IntRange(0, 65536)


class Submit:
    """What ``parse_args`` read: the request body (a dict in ``CommandTaskSpec``'s field order) and the
    flags."""

    __slots__ = ("body", "json_output", "quiet", "wait")

    def __init__(self, body: dict[str, Any], wait: bool, quiet: bool, json_output: bool) -> None:
        self.body = body
        self.wait = wait
        self.quiet = quiet
        self.json_output = json_output


def parse_args(args: list[str], environ: Mapping[str, str] | None = None) -> Submit | None:
    """The call ``kr task submit ARGS`` as this path serves it, or None when the click command must."""
    values: dict[str, Any] = {"targets": [], "env": []}
    flags: set[str] = set()
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if arg[:1] != "-":
            break  # the command (click stops at the first argument)
        i += 1
        if arg in FLAGS:
            flags.add(FLAGS[arg])
            continue
        name, eq, value = arg.partition("=")
        if eq and name[:2] == "--" and name in OPTIONS:
            pass
        elif arg in OPTIONS and i < len(args) and args[i][:1] != "-":
            name, value = arg, args[i]
            i += 1
        else:
            return None  # --help, --mount, -tNODE, -wq, a value like -1, ...: the click command explains
        key = OPTIONS[name]
        if key in _MULTIPLE:
            values[key].append(value)
        else:
            values[key] = value
    argv = args[i:]
    if not argv:
        return None  # click's usage error
    cores_text = values.get("cores", "1")
    if not (cores_text.isascii() and cores_text.isdigit() and int(cores_text) <= MAX_CORES):
        return None

    from . import task_submit_args as parse

    try:
        env = parse.parse_env(values["env"], os.environ if environ is None else environ)
        memory = parse.parse_memory(values.get("memory"))
        gpus = parse.parse_gpus(values.get("gpus"))
    except parse.BadValue:
        return None
    body = {
        "command": argv[0],
        "arguments": argv[1:],
        "env_vars": env,
        "required_cores": int(cores_text),
        "required_memory_bytes": memory,
        "required_gpus": gpus,
        "targets": [t.strip() for t in values["targets"]],
        "container_name": values.get("container"),
        "registry_image": values.get("image"),
        "working_dir": values.get("workdir"),
        "privileged": False,
        "additional_mounts": [],
        "name": values.get("name"),
        "task_type": "command",
        "ip_token": None,
    }
    return Submit(body, "wait" in flags, "quiet" in flags, "json" in flags)


def try_run(args: list[str], environ: Mapping[str, str] | None = None) -> int | None:
    """Serve ``kr task submit ARGS`` and return the exit code, or None when the click command must (then
    nothing has been printed)."""
    environ = os.environ if environ is None else environ
    try:
        parsed = parse_args(args, environ)
        if parsed is None:
            return None
        # As click reads the global options from the environment: an empty variable is no value.
        host_option = environ.get("KOHAKURIVER_HOST") or None
        token_option = environ.get("KOHAKURIVER_TOKEN") or None
        from .host_settings import Settings, normalize_host_url, resolve_settings

        if host_option and token_option:
            # resolve_settings' first case, without loading the credentials module (pathlib, ~2 ms)
            settings = Settings(normalize_host_url(host_option), token_option, parsed.json_output)
        else:
            settings = resolve_settings(host_option, token_option, parsed.json_output)
        posted = _post(settings, parsed.body)
        if posted is None:
            return None
        transport, result = posted
        status = getattr(result, "status_code", 0)
        if 400 <= status < 500:
            transport.close()
            return None  # refused, nothing stored: the click command checks the spec and says why
        if not parsed.wait and 200 <= status < 300:
            code = _print_answer(result, parsed.json_output)
            if code is not None:
                return code
    except KeyboardInterrupt:
        sys.stderr.write("\nAborted!\n")  # what click says
        return 1
    return _finish(parsed, host_option, token_option, transport, result)


def _post(settings: Settings, body: dict[str, Any]) -> tuple[StdlibTransport, Reply | TransportError] | None:
    """``POST /api/submit`` as ``HostClient.request`` sends it: the transport (kept for the requests that
    follow) and the answer or the transport's failure; None for a host URL the click command refuses."""
    if not settings.host_url.lower().startswith(("http://", "https://")):
        return None
    from .http_transport import StdlibTransport, TransportError, json_body

    try:
        data = json_body(body)  # an argument that is not UTF-8 (a surrogate escape) cannot be sent
        transport = StdlibTransport(settings.host_url, TIMEOUT)
    except ValueError:
        return None
    headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
    headers["Content-Type"] = "application/json"
    try:
        return transport, transport.send("POST", SUBMIT_PATH, headers, data)
    except TransportError as exc:
        return transport, exc


def _print_answer(reply: Reply, json_output: bool) -> int | None:
    """Without ``--wait``: print what ``finish_submit`` prints, when that is plain ASCII (``click.echo``
    writes it unchanged then, and ``output.clean`` leaves it as it is), and return the exit code; None when
    ``finish_submit`` must."""
    import json

    try:
        answer = json.loads(reply.content)
    except ValueError:
        return None
    ids = answer.get("task_ids") if isinstance(answer, dict) else None
    if not (isinstance(ids, list) and ids and all(isinstance(i, str | int) for i in ids)):
        return None
    ids = [str(i) for i in ids]
    message = answer.get("message")
    message = message if isinstance(message, str) and message else None
    if json_output:
        out, err = json.dumps(answer, indent=2, ensure_ascii=False) + "\n", ""
    else:
        out, err = "".join(f"{i}\n" for i in ids), "" if message is None else f"{message}\n"
        if not all(i.isascii() and i.isprintable() for i in ids):
            return None
        if message is not None and not (message.isascii() and message.isprintable() and len(message) <= 300):
            return None
    if not out.isascii():
        return None
    try:
        sys.stdout.write(out)
        sys.stdout.flush()
        if err:
            sys.stderr.write(err)
    except BrokenPipeError:
        return 1  # as click's main: nothing more is said on a closed pipe, and it exits 1
    return 0


class _Answered:
    """The wire of the click code's ``HostClient``: its first request (the submit) is answered with what
    this path got; the others go over this path's transport (the same keep-alive connection)."""

    def __init__(self, transport: StdlibTransport, result: Reply | TransportError) -> None:
        self._transport = transport
        self._result: Reply | TransportError | None = result

    def send(self, method: str, path: str, headers: dict[str, str], body: bytes | None) -> Reply:
        result, self._result = self._result, None
        if result is None:
            return self._transport.send(method, path, headers, body)
        assert (method, path) == ("POST", SUBMIT_PATH), (method, path)
        if isinstance(result, BaseException):
            raise result
        return result

    def close(self) -> None:
        self._transport.close()


def _finish(
    parsed: Submit,
    host_option: str | None,
    token_option: str | None,
    transport: StdlibTransport,
    result: Reply | TransportError,
) -> int:
    """The click command from its POST on (``task_cmd.finish_submit``), its answer being ``result``; the
    exit code click would exit with."""
    import click

    from .context import CliContext, KrCommand
    from .task_cmd import finish_submit

    obj = CliContext(host_option, token_option, parsed.json_output)
    if parsed.wait and not (parsed.quiet or parsed.json_output):
        # What reads each stream's close (``task_cmd.close_outcome``): loaded now, while the task starts,
        # and not between the output's end and the exit (attrs with it: the click command had it already
        # from the models; here it cost 20-60 ms at the end of every `kr task submit --wait`).
        import kohakuriver_proto.session_opening  # noqa: F401

    def rest() -> None:
        client = obj.client()
        client._wire.close()  # never connected: a HostClient connects on its first request
        client._wire = _Answered(transport, result)
        answer = client.post(SUBMIT_PATH, json=parsed.body)  # the answer above, or its error as the CLI's
        finish_submit(click.get_current_context(), obj, answer, wait=parsed.wait, quiet=parsed.quiet)

    try:
        KrCommand("submit", callback=rest).main(args=[], prog_name="kr task submit", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
