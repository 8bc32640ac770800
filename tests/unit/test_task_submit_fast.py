"""``kr task submit`` served before click (``task_submit_fast``) must be the click command, only sooner.

- The request: for a table of argv forms, the body the fast path posts is, byte for byte, the one the click
  command posts (and the forms it does not understand are handed to the click command untouched).
- Whole ``kr`` processes, both ways (``entry.main``, which takes the fast path, and ``main.main``, the
  click command alone), against a real HTTP server: the same requests (headers and bodies), the same
  stdout, stderr and exit code, for answers that succeed, refusals (a spec the click command refuses
  itself, one only the host refuses, no token), failures after the request (500, not JSON, no id), an
  unreachable host, and ``--wait`` with its output streamed over real WebSockets.
- What loads before the request: no click, attrs, models, rich, httpx or trio.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import struct
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from kohakuriver_cli import entry, http_transport, task_submit_fast
from kohakuriver_cli.http_transport import json_body

from . import test_cli_client
from .test_cli_client import TOKEN, FakeHost

kr_home = test_cli_client.kr_home
host = test_cli_client.host

# -- the body ------------------------------------------------------------------------------------------------

#: argv after `kr task submit`, each a form the fast path serves; extra environment for `-e NAME`.
SERVED = [
    (["--", "true"], {}),
    (["true"], {}),
    (["--wait", "--image", "kohakuriver/busybox:latest", "--", "sh", "-c", "echo hi >&2"], {}),
    (["-t", "node1", "-c", "4", "python", "train.py", "--lr", "0.1", "-c", "9"], {}),
    (
        [
            "-t",
            "gpu1:0",
            "-t",
            " gpu2 ",
            "-c",
            "8",
            "-m",
            "16G",
            "--gpus",
            "0,1",
            "--image",
            "python:3.12",
            "-e",
            "A=1",
            "-e",
            "B=x=y",
            "--workdir",
            "/work",
            "--name",
            "train run",
            "--",
            "python",
            "t.py",
        ],
        {},
    ),
    (
        [
            "--target=n1",
            "--cores=0",
            "--memory=512MB",
            "--gpus=2, 3",
            "--container=env1",
            "--env=C=",
            "--workdir=/w",
            "--name=x",
            "-q",
            "--json",
            "--",
            "x",
        ],
        {},
    ),
    (["-m", "0", "-e", "HOME_DIR", "-w", "-q", "--", "git", "log", "--", "README.md"], {"HOME_DIR": "/h"}),
    (["-c", "2", "-c", "007", "--quiet", "--", "true"], {}),
    (["--json", "--wait", "--", "é", "ü", ""], {}),
    (["--", "--", "x"], {}),
    (["--", "-c", "9"], {}),
    (["--image", "busybox", "--", "echo", "; rm -rf /", "$(id)", "*"], {}),
    (["-e", "A=1", "-e", "A=2", "--env", "B==", "--", "env"], {}),
    (["--memory", "1.5GiB", "--name", "ü name", "--", "x"], {}),
]

#: Forms the fast path leaves to the click command (valid or not: click decides).
UNSERVED = [
    [],
    ["-c", "2"],
    ["--help"],
    ["-h"],
    ["--mount", "/a:/b", "--", "x"],
    ["--privileged", "--", "x"],
    ["--ip-token", "t", "--", "x"],
    ["-tnode", "--", "x"],
    ["-wq", "--", "x"],
    ["-c", "abc", "--", "x"],
    ["-c", "70000", "--", "x"],
    ["-c", "-1", "--", "x"],
    ["-c", "+1", "--", "x"],
    ["-m", "lots", "--", "x"],
    ["-t", "n", "--gpus", "a,b", "--", "x"],
    ["-e", "NOT_SET_ANYWHERE", "--", "x"],
    ["-e", "=x", "--", "x"],
    ["--wait=1", "--", "x"],
    ["-", "x"],
    ["--unknown", "--", "x"],
    ["-t"],
    ["--name", "--wait", "--", "x"],
    ["--targ", "n", "--", "x"],
    ["-n", "x", "--", "x"],
]


def accept(host: FakeHost) -> None:
    host.on("POST", "/api/submit", {"task_ids": ["101"], "message": "queued"}, status=202)


@pytest.mark.parametrize(("args", "env"), SERVED)
def test_the_fast_body_is_the_click_commands(host, monkeypatch, args, env):
    accept(host)
    if "--wait" in args or "-w" in args:  # the click command would wait: the body is what matters here
        host.on("GET", "/api/status/101", {"task_id": "101", "status": "completed", "exit_code": 0})
        host.on("GET", "/api/tasks/101/stdout", httpx.Response(200, content=b""))
        host.on("GET", "/api/tasks/101/stderr", httpx.Response(200, content=b""))
    result = host.invoke("task", "submit", *args, **env)
    assert result.exit_code == 0, result.output
    sent = host.calls("POST", "/api/submit")[0].content
    parsed = task_submit_fast.parse_args(args, env)
    assert parsed is not None
    assert json_body(parsed.body) == sent


@pytest.mark.parametrize("args", UNSERVED)
def test_forms_it_does_not_understand_go_to_click(monkeypatch, args):
    """`kr task submit ARGS` through ``entry.main``: the click command is called, and nothing was sent."""
    called: list[list[str]] = []

    class ToClick(Exception):
        pass

    def cli_main() -> None:
        called.append(sys.argv[1:])
        raise ToClick

    def no_request(*_args: object) -> None:
        raise AssertionError("the fast path sent a request")

    def no_done(code: int) -> None:
        raise AssertionError(f"the fast path served it (exit {code})")

    monkeypatch.setattr("kohakuriver_cli.main.main", cli_main)
    monkeypatch.setattr(http_transport.StdlibTransport, "send", no_request)
    monkeypatch.setattr(entry, "_done", no_done)
    monkeypatch.setenv("KOHAKURIVER_HOST", "http://127.0.0.1:9")
    monkeypatch.setenv("KOHAKURIVER_TOKEN", TOKEN)
    monkeypatch.setattr(sys, "argv", ["kr", "task", "submit", *args])
    assert task_submit_fast.parse_args(args) is None
    with pytest.raises(ToClick):
        entry.main()
    assert called == [["task", "submit", *args]]


def test_the_field_table_is_the_models():
    """Every field of ``CommandTaskSpec``, in its order (the body is written without loading it)."""
    import attrs

    from kohakuriver_proto.models import CommandTaskSpec

    parsed = task_submit_fast.parse_args(["true"], {})
    assert parsed is not None
    assert list(parsed.body) == [f.name for f in attrs.fields(CommandTaskSpec)]


# -- whole processes against a real server -------------------------------------------------------------------

#: ``entry.main`` (the fast path first); a file named by ``SERVED_MARK`` says whether the fast path served
#: the call (it ends with ``entry._done``; the click command exits through ``SystemExit``).
KR_FAST = (
    "import os, sys\n"
    "sys.argv = ['kr', *sys.argv[1:]]\n"
    "from kohakuriver_cli import entry\n"
    "done = entry._done\n"
    "def marked(code):\n"
    "    open(os.environ.pop('SERVED_MARK'), 'w').close()\n"
    "    done(code)\n"
    "entry._done = marked\n"
    "entry.main()\n"
)
KR_CLICK = "import sys\nsys.argv = ['kr', *sys.argv[1:]]\nfrom kohakuriver_cli.main import main\nmain()\n"
ACCEPTED = {"task_ids": ["7"], "message": "1 task submitted"}


def _json(
    handler: BaseHTTPRequestHandler, status: int, body: object, content_type="application/json"
) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class Server:
    """A host stand-in on a real socket. ``submits``: what each ``POST /api/submit`` is answered with (the
    last one repeats): ``(status, JSON or bytes)``. The task (id 7) is ``running`` at the first status
    read and then ``final``; its log WebSockets send ``outputs[stream]`` as one binary message and close."""

    def __init__(self, submits: list[tuple[int, object]], final: dict | None = None, outputs=None) -> None:
        self.submits = list(submits)
        self.final = final or {"status": "completed", "exit_code": 0}
        self.outputs = outputs or {"stdout": b"", "stderr": b""}
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.status_reads = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def record(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                # the port differs from server to server, a WebSocket key from request to request
                skip = ("host", "sec-websocket-key")
                headers = {k.lower(): v for k, v in self.headers.items() if k.lower() not in skip}
                server.requests.append((self.command, self.path, headers, body))
                return body

            def do_POST(self) -> None:
                self.record()
                status, answer = server.submits[0] if len(server.submits) == 1 else server.submits.pop(0)
                _json(self, status, answer, "text/plain" if isinstance(answer, bytes) else "application/json")

            def do_GET(self) -> None:
                self.record()
                if self.path.startswith("/api/status/7"):
                    server.status_reads += 1
                    running = {"task_id": "7", "status": "running", "exit_code": None}
                    _json(
                        self, 200, running if server.status_reads == 1 else {"task_id": "7", **server.final}
                    )
                    return
                key = self.headers["Sec-WebSocket-Key"].encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
                self.send_response(101)
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                accept_key = base64.b64encode(hashlib.sha1(key).digest()).decode()
                self.send_header("Sec-WebSocket-Accept", accept_key)
                self.end_headers()
                out = server.outputs["stderr" if "stream=stderr" in self.path else "stdout"]
                if out:
                    self.wfile.write(bytes((0x82, len(out))) + out)
                self.wfile.write(bytes((0x88, 2)) + struct.pack(">H", 1000))
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_WR)
                self.close_connection = True

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def reset(self, submits: list[tuple[int, object]]) -> None:
        self.submits = list(submits)
        self.requests = []
        self.status_reads = 0

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def run_kr(code: str, args: list[str], url: str, home, token: str | None = TOKEN, extra: str = ""):
    mark = home / "served"
    mark.unlink(missing_ok=True)
    env = {"KOHAKURIVER_HOST": url, "KOHAKURIVER_HOME": str(home), "PATH": "/usr/bin:/bin"}
    env["SERVED_MARK"] = str(mark)
    if token:
        env["KOHAKURIVER_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-c", extra + code, *args], capture_output=True, env=env, timeout=60
    )


def both_ways(tmp_path, args, submits, token: str | None = TOKEN, **server_options):
    """(fast, click): each a ``(process, the server's requests)``."""
    results = []
    server = Server(submits, **server_options)  # one server: its URL appears in some messages
    try:
        for code in (KR_FAST, KR_CLICK):
            server.reset(submits)
            proc = run_kr(code, ["task", "submit", *args], server.url, tmp_path, token)
            proc.served = (tmp_path / "served").exists()  # type: ignore[attr-defined]
            results.append((proc, server.requests))
    finally:
        server.close()
    return results


def same_output(fast, click) -> None:
    assert (fast.returncode, fast.stdout, fast.stderr) == (click.returncode, click.stdout, click.stderr)


@pytest.mark.parametrize(
    ("args", "answer"),
    [
        (["--", "true"], ACCEPTED),
        (["--json", "--image", "busybox", "--", "echo", "hi"], ACCEPTED),
        (
            ["-q", "-t", "a", "-t", "b", "--", "true"],
            {"task_ids": ["7", "8"], "message": "2 tasks submitted"},
        ),
        (["--", "true"], {"task_ids": [7], "message": None}),
        (["--", "true"], {"task_ids": ["7"], "message": "タスク 1 件"}),  # not ASCII: finish_submit prints
        (["--", "true"], {"task_ids": ["7"], "message": "queued\x1b[31m\nred"}),  # escaped by finish_submit
        (["--json", "--", "true"], {"task_ids": ["7"], "message": "ü"}),
        (["--", "true"], {"task_ids": ["7\x1b[2J"]}),
    ],
)
def test_an_accepted_task_reads_the_same(tmp_path, args, answer):
    (fast, fast_requests), (click, click_requests) = both_ways(tmp_path, args, [(202, answer)])
    assert click.returncode == 0, click.stderr
    assert fast.served and not click.served
    same_output(fast, click)
    assert fast_requests == click_requests
    assert len(fast_requests) == 1


def refusal(status: int, message: str, field: str | None = None) -> list[tuple[int, object]]:
    return [(status, {"error": "refused", "message": message, "field": field})]


@pytest.mark.parametrize(
    ("args", "submits", "token", "posts"),
    [
        # the click command refuses the spec itself (usage error naming -t): the host's 422 hands it over
        (["-t", "bad host", "--", "x"], refusal(422, "no", "targets"), TOKEN, (1, 0)),
        # only the host refuses it: both show the host's refusal
        (["--image", "busybox", "--", "x"], refusal(422, "registry_image: not allowed here"), TOKEN, (2, 1)),
        (["--", "x"], refusal(403, "not allowed"), TOKEN, (2, 1)),
        (["--", "x"], refusal(401, "token required"), None, (2, 1)),
        # a failure after the request: a task may exist, never posted twice
        (["--", "x"], refusal(500, "internal error"), TOKEN, (1, 1)),
        (["--wait", "--", "x"], [(502, b"Bad Gateway")], TOKEN, (1, 1)),
        (["--", "x"], [(202, b"<html>accepted</html>")], TOKEN, (1, 1)),
        (["--", "x"], [(202, {"message": "no ids"})], TOKEN, (1, 1)),
        (["--json", "--", "x"], [(202, {"task_ids": []})], TOKEN, (1, 1)),
    ],
)
def test_refusals_and_failures_read_the_same(tmp_path, args, submits, token, posts):
    (fast, fast_requests), (click, click_requests) = both_ways(tmp_path, args, submits, token)
    assert click.returncode != 0
    assert click.stderr.startswith((b"Error: ", b"Usage: ")), click.stderr
    same_output(fast, click)
    assert (len(fast_requests), len(click_requests)) == posts
    assert fast.served == (submits[0][0] >= 500 or submits[0][0] < 400)  # a 4xx goes to the click command
    if fast_requests and click_requests:
        assert fast_requests[-1] == click_requests[-1]


def test_an_unreachable_host_reads_the_same(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
        fast = run_kr(KR_FAST, ["task", "submit", "--", "true"], url, tmp_path)
        assert (tmp_path / "served").exists()
        click = run_kr(KR_CLICK, ["task", "submit", "--", "true"], url, tmp_path)
    assert click.returncode == 5 and b"cannot reach the host" in click.stderr
    same_output(fast, click)


@pytest.mark.parametrize(
    ("args", "final", "code"),
    [
        (["--wait", "--", "sh", "-c", "work"], {"status": "failed", "exit_code": 4}, 4),
        (["-w", "--image", "busybox", "--", "true"], {"status": "completed", "exit_code": 0}, 0),
        (
            ["--wait", "--", "x"],
            {"status": "killed", "exit_code": 137, "error_message": "killed by alice"},
            137,
        ),
        (["--wait", "--quiet", "--", "x"], {"status": "failed", "exit_code": 3}, 3),
        (["--wait", "--json", "--", "x"], {"status": "completed", "exit_code": 0}, 0),
    ],
)
def test_wait_streams_and_exits_the_same(tmp_path, args, final, code):
    outputs = {"stdout": b"out \xff\n", "stderr": b"err\n"}
    (fast, fast_requests), (click, click_requests) = both_ways(
        tmp_path, args, [(202, ACCEPTED)], final=final, outputs=outputs
    )
    assert click.returncode == code, click.stderr
    assert fast.served
    same_output(fast, click)
    if "--quiet" not in args and "--json" not in args:
        assert (click.stdout, click.stderr.startswith(b"err\n")) == (b"out \xff\n", True)

    # the same requests, in the same order (the follow threads' two upgrades may come either way round)
    def key(request):
        return (request[0], request[1])

    assert [r for r in fast_requests if "/ws/" not in r[1]] == [
        r for r in click_requests if "/ws/" not in r[1]
    ]
    assert sorted(fast_requests, key=key) == sorted(click_requests, key=key)


def test_nothing_heavy_loads_before_the_request(tmp_path):
    """What is loaded when the request is sent, and when a plain submit has printed its id."""
    server = Server([(202, ACCEPTED)])
    spy = (
        "from kohakuriver_cli import entry, http_transport\n"
        "send = http_transport.StdlibTransport.send\n"
        "seen = []\n"
        "def spying(self, *args):\n"
        "    seen.append(' '.join(sorted(sys.modules)))\n"
        "    return send(self, *args)\n"
        "http_transport.StdlibTransport.send = spying\n"
        "real_done = entry._done\n"
        "def done(code):\n"
        "    now = ' '.join(sorted(sys.modules))\n"
        "    sys.stdout.write('\\nAT_REQUEST ' + seen[0] + '\\nAT_EXIT ' + now + '\\n')\n"
        "    real_done(code)\n"
        "entry._done = done\n"
    )
    try:
        proc = run_kr(KR_FAST, ["task", "submit", "-m", "1G", "--", "true"], server.url, tmp_path, extra=
                      "import sys\n" + spy)  # fmt: skip
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert lines[0] == "7"
    at_request = set(lines[-2].removeprefix("AT_REQUEST ").split())
    at_exit = set(lines[-1].removeprefix("AT_EXIT ").split())
    heavy = {
        "click", "attrs", "attr", "cattrs", "kohakuriver_proto.models", "kohakuriver_proto.converter", "rich",
        "httpx", "trio", "ssl", "http.client", "kohakuriver_cli.task_cmd", "kohakuriver_cli.client",
    }  # fmt: skip
    assert not heavy & at_request, heavy & at_request
    assert not heavy & at_exit, heavy & at_exit


def test_wait_loads_nothing_once_the_output_streams(tmp_path):
    """With --wait, what is loaded after the POST is loaded while the task starts: nothing between the
    first log WebSocket and the exit (where an import would sit between the output's end and the exit)."""
    server = Server([(202, ACCEPTED)], outputs={"stdout": b"hi\n", "stderr": b""})
    spy = (
        "import sys\n"
        "from kohakuriver_cli import entry, log_socket\n"
        "opened = []\n"
        "open_socket = log_socket.open_log_socket\n"
        "def spying(*args, **kwargs):\n"
        "    opened.append(set(sys.modules))\n"
        "    return open_socket(*args, **kwargs)\n"
        "log_socket.open_log_socket = spying\n"
        "real_done = entry._done\n"
        "def done(code):\n"
        "    sys.stderr.write('LATE ' + ' '.join(sorted(set(sys.modules) - opened[0])) + '\\n')\n"
        "    real_done(code)\n"
        "entry._done = done\n"
    )
    try:
        proc = run_kr(KR_FAST, ["task", "submit", "--wait", "--", "true"], server.url, tmp_path, extra=spy)
    finally:
        server.close()
    assert (proc.returncode, proc.stdout) == (0, b"hi\n"), proc.stderr
    assert proc.stderr.decode().splitlines()[-1] == "LATE "


@pytest.mark.parametrize("args", [["--", "echo", b"\xff"], ["-e", b"A=\xfe", "--", "env"]])
def test_an_argument_that_is_not_utf8_reads_the_same(tmp_path, args):
    """It cannot be sent as JSON: the click command says so, and the fast path leaves it to it."""
    (fast, fast_requests), (click, click_requests) = both_ways(tmp_path, args, [(202, ACCEPTED)])
    assert click.returncode == 1 and click.stderr.startswith(b"Error: "), click.stderr
    assert not fast.served
    same_output(fast, click)
    assert fast_requests == click_requests == []


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:1", "http://127.0.0.1:99999", "http://"])
def test_a_host_url_it_cannot_use_reads_the_same(tmp_path, url):
    fast = run_kr(KR_FAST, ["task", "submit", "--", "true"], url, tmp_path)
    assert not (tmp_path / "served").exists()
    click = run_kr(KR_CLICK, ["task", "submit", "--", "true"], url, tmp_path)
    assert click.returncode != 0 and click.stderr.startswith(b"Error: "), click.stderr
    same_output(fast, click)


def test_ctrl_c_before_the_answer_reads_the_same(tmp_path):
    """Ctrl-C while the host has not answered the POST: click's `Aborted!`, exit 1, both ways."""
    import signal
    import time

    received = threading.Event()
    release = threading.Event()

    class Slow(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            received.set()
            release.wait(30)
            _json(self, 202, ACCEPTED)

    http = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{http.server_address[1]}"
    results = []
    try:
        for code in (KR_FAST, KR_CLICK):
            received.clear()
            release.clear()
            env = {"KOHAKURIVER_HOST": url, "KOHAKURIVER_TOKEN": TOKEN, "KOHAKURIVER_HOME": str(tmp_path)}
            env |= {"PATH": "/usr/bin:/bin", "SERVED_MARK": str(tmp_path / "served")}
            proc = subprocess.Popen(
                [sys.executable, "-c", code, "task", "submit", "--", "true"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            assert received.wait(30)
            time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
            release.set()
            results.append((proc.returncode, out, err))
    finally:
        release.set()
        http.shutdown()
        http.server_close()
    assert results[0] == results[1] == (1, b"", b"\nAborted!\n")
