"""``kr ssh``: the ssh command line it builds (ProxyCommand quoting, host key alias, key, user, command), the
task id checks, ``kr ssh config`` output and file, the ``kr ssh TASK_ID`` / ``connect`` dispatch, and host key
pinning on both paths (the click command against ``FakeHost``, the fast path against a real HTTP server).

ssh runs ProxyCommand as ``$SHELL -c "exec <command>"`` after expanding ``%`` tokens, so the quoting test
does exactly that with a real shell and a stand-in ``kr`` at a hostile path."""

from __future__ import annotations

import json
import os
import shlex
import socket
import stat
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kohakuriver_cli import known_hosts, ssh_cmd, ssh_fast
from kohakuriver_cli.client import CliError
from kohakuriver_cli.ssh_cmd import build_ssh_argv, parse_task_id, proxy_command, render_config

from . import test_cli_client
from .test_cli_client import TOKEN, assert_one_line_error, error_reply

kr_home = test_cli_client.kr_home
host = test_cli_client.host

HOSTILE = 'my dir/it\'s "quoted" $(touch pwned) `x` 100%'
KEY_A = "ssh-ed25519 " + "A" * 68
KEY_B = "ssh-ed25519 " + "B" * 68


def _options(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-o"]


def _option(argv: list[str], name: str) -> str:
    values = [o.split("=", 1)[1] for o in _options(argv) if o.startswith(name + "=")]
    assert len(values) == 1, argv
    return values[0]


def _pinned_options(kr_home: Path, task_id: int) -> list[str]:
    return [
        f"UserKnownHostsFile={kr_home / 'known_hosts'}",
        f"HostKeyAlias=kohakuriver-{task_id}",
        "StrictHostKeyChecking=yes",
    ]


def _ssh_expand(value: str) -> str:
    """What ssh does to ``%%`` before handing ProxyCommand to the shell (other tokens do not occur)."""
    assert "%" not in value.replace("%%", ""), value
    return value.replace("%%", "%")


def test_proxy_command_survives_a_real_shell_with_a_hostile_path(tmp_path):
    bindir = tmp_path / HOSTILE
    bindir.mkdir(parents=True)
    fake_kr = bindir / "kr"
    fake_kr.write_text('#!/bin/sh\nfor a in "$0" "$@"; do printf "%s\\n" "$a"; done\n')
    fake_kr.chmod(0o755)
    argv = build_ssh_argv(42, kr=str(fake_kr), proxy_port=8002)
    command = _ssh_expand(_option(argv, "ProxyCommand"))
    out = subprocess.run(
        ["/bin/sh", "-c", f"exec {command}"], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    assert out.stdout.splitlines() == [str(fake_kr), "ssh", "proxy-command", "--proxy-port", "8002", "42"]
    assert not (tmp_path / "pwned").exists()


def test_ssh_argv_shape(tmp_path):
    key = tmp_path / "a key%"
    argv = build_ssh_argv(
        7,
        kr="/opt/kr",
        proxy_port=2202,
        user="ubuntu",
        key=key,
        command=["-x", "ls", "-la"],
        ssh="/usr/bin/ssh",
    )
    assert argv[0] == "/usr/bin/ssh"
    assert _option(argv, "ProxyCommand") == "/opt/kr ssh proxy-command --proxy-port 2202 7"
    assert _option(argv, "HostKeyAlias") == "kohakuriver-7"
    assert argv[argv.index("-l") + 1] == "ubuntu"
    assert argv[argv.index("-i") + 1] == str(key).replace("%", "%%")
    # the destination after "--": a command starting with "-" is never read as an ssh option
    assert argv[-5:] == ["--", "kohakuriver-7", "-x", "ls", "-la"]
    assert "-i" not in build_ssh_argv(7, kr="/opt/kr", proxy_port=2202)


@pytest.mark.parametrize("bad", ["1; rm -rf ~", "-1", "12a", "", " 12", "9" * 20, "0x10", "\uff11\uff12"])
def test_task_ids_must_be_decimal(bad):
    with pytest.raises(CliError, match="invalid task id"):
        parse_task_id(bad)
    with pytest.raises(CliError):
        proxy_command(bad, kr="/kr", proxy_port=8002)


@pytest.mark.parametrize("user", ["-oProxyCommand=x", "root user", "a\nb", ""])
def test_bad_user_names_are_refused(user):
    with pytest.raises(CliError, match="invalid user name"):
        build_ssh_argv(1, kr="/kr", proxy_port=8002, user=user)


def test_line_breaks_cannot_reach_ssh_options():
    with pytest.raises(CliError, match="line break"):
        build_ssh_argv(1, kr="/bin/k\nr", proxy_port=8002)


def test_config_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "my home"))
    keydir = tmp_path / "my home" / ".ssh"
    keydir.mkdir(parents=True)
    (keydir / "kohakuriver_11").write_text("key")
    tasks = [
        {"task_id": "11", "status": "running", "assigned_node": "gpu1", "name": "dev"},
        {"task_id": "12", "status": "paused", "assigned_node": "gpu2"},
    ]
    text = render_config(tasks, kr="/opt/k r/kr", host_url="http://10.0.0.2:8000", proxy_port=8022)
    blocks = {b.split("\n")[1]: b for b in text.split("\n\n") if "\nHost " in "\n" + b}
    first = blocks["Host kohakuriver-11"].splitlines()
    assert "    HostName 10.0.0.2" in first
    assert "    User root" in first
    assert "    HostKeyAlias kohakuriver-11" in first
    assert (
        "    ProxyCommand '/opt/k r/kr' --host http://10.0.0.2:8000 ssh proxy-command --proxy-port 8022 11"
        in first
    )
    assert f'    IdentityFile "{keydir / "kohakuriver_11"}"' in first
    assert not any("IdentityFile" in line for line in blocks["Host kohakuriver-12"].splitlines())
    with pytest.raises(CliError, match="invalid task id"):
        render_config([{"task_id": "1 2"}], kr="/kr", host_url="http://h:8000", proxy_port=8002)


# -- through click -------------------------------------------------------------------------------------------


@pytest.fixture
def ran(monkeypatch):
    """Replace running ssh: record argv and environment, exit with 7."""
    calls: list[tuple[list[str], dict[str, str]]] = []

    def fake(argv, env):
        calls.append((argv, env))
        return 7

    monkeypatch.setattr(ssh_cmd, "_run_foreground", fake)
    monkeypatch.setattr(ssh_cmd, "kr_executable", lambda: "/venv/bin/kr")
    return calls


def test_kr_ssh_task_id_runs_ssh_with_the_token_in_the_environment(host, ran, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "kohakuriver_42").write_text("key")
    host.on("GET", "/api/health", {"status": "ok", "ssh_proxy_port": 9022})
    result = host.invoke("ssh", "42", "--user", "alice", "--", "echo", "ok")
    assert result.exit_code == 7, result.output
    [(argv, env)] = ran
    assert _option(argv, "ProxyCommand") == "/venv/bin/kr ssh proxy-command --proxy-port 9022 42"
    assert argv[argv.index("-i") + 1] == str(tmp_path / ".ssh" / "kohakuriver_42")
    assert argv[-4:] == ["--", "kohakuriver-42", "echo", "ok"]
    assert env["KOHAKURIVER_TOKEN"] == TOKEN and env["KOHAKURIVER_HOST"] == test_cli_client.HOST
    assert TOKEN not in " ".join(argv)  # never on a command line (ps shows those)


def test_connect_spelling_and_port_sources(host, ran, monkeypatch):
    host.on("GET", "/api/health", {"status": "ok"})  # a host that does not announce its proxy port
    assert host.invoke("ssh", "connect", "5").exit_code == 7
    assert "--proxy-port 8002 5" in _option(ran[-1][0], "ProxyCommand")
    monkeypatch.setenv("KOHAKURIVER_SSH_PROXY_PORT", "2022")
    assert host.invoke("ssh", "5").exit_code == 7
    assert "--proxy-port 2022 5" in _option(ran[-1][0], "ProxyCommand")
    assert host.invoke("ssh", "5", "--proxy-port", "3022").exit_code == 7
    assert "--proxy-port 3022 5" in _option(ran[-1][0], "ProxyCommand")
    assert len(host.calls("GET", "/api/health")) == 1


def test_usage_errors_are_one_line(host, ran, tmp_path):
    assert_one_line_error(host.invoke("ssh", "12x"), 2, "invalid task id")
    assert_one_line_error(
        host.invoke("ssh", "1", "--proxy-port", "1", "--key", str(tmp_path / "nope")), 2, "no key file"
    )
    assert_one_line_error(host.invoke("ssh", "1", "--proxy-port", "70000"), 2, "--proxy-port")
    assert ran == []


def test_ssh_config_to_stdout_and_to_a_private_file(host, ran, tmp_path):
    host.on("GET", "/api/auth/me", {"user_id": 3, "username": "alice", "role": "user"})
    host.on(
        "GET",
        "/api/tasks",
        {"tasks": [{"task_id": "77", "status": "running", "assigned_node": "n1"}], "has_more": False},
    )
    result = host.invoke("ssh", "config", "--proxy-port", "8002")
    assert result.exit_code == 0, result.output
    assert "Host kohakuriver-77\n" in result.stdout and "Include" in result.stdout
    query = host.calls("GET", "/api/tasks")[0].url.params
    assert (query["task_type"], query["status"], query["owner"]) == ("vps", "running,paused", "alice")
    out = tmp_path / "cfg dir" / "kohakuriver_config"
    result = host.invoke("ssh", "config", "--proxy-port", "8002", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert f'Include "{out}"' in result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert "ProxyCommand /venv/bin/kr --host http://kr-host.test:8000 ssh proxy-command" in out.read_text()
    assert sorted(os.listdir(out.parent)) == ["kohakuriver_config"]


def test_kr_executable_is_an_absolute_path():
    path = ssh_cmd.kr_executable()
    assert Path(path).is_absolute() and os.access(path, os.X_OK)
    assert shlex.split(proxy_command(1, kr=path, proxy_port=8002))[0] == path


# -- the fast path of `kr ssh ID` (kohakuriver_cli/ssh_fast.py) ---------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["7"],
            {"task_id": 7, "key": None, "user": "root", "proxy_port": None, "options": [], "command": []},
        ),
        (
            [
                "7",
                "-i",
                "k",
                "-u",
                "me",
                "--proxy-port=9",
                "-o",
                "A=b",
                "--ssh-option",
                "C=d",
                "--",
                "ls",
                "-l",
            ],
            {
                "task_id": 7,
                "key": "k",
                "user": "me",
                "proxy_port": "9",
                "options": ["A=b", "C=d"],
                "command": ["ls", "-l"],
            },
        ),
        (
            ["7", "--key=k", "--user=u", "--", "--", "x"],
            {
                "task_id": 7,
                "key": "k",
                "user": "u",
                "proxy_port": None,
                "options": [],
                "command": ["--", "x"],
            },
        ),
        (["7", "--local-port", "2222"], None),
        (["7", "--help"], None),
        (["7", "ls"], None),  # a command without `--`: the click command decides how to read it
        (["7", "-oA=b"], None),
        (["7", "-o"], None),
        (["x7"], None),
        (["0"], None),
        (["config"], None),
        (["proxy-command", "7"], None),
    ],
)
def test_fast_path_serves_only_the_plain_form(args, expected):
    assert ssh_fast.parse_args(args) == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"user": "ubuntu", "key": "/home/me/.ssh/id 50%"},
        {"options": ["StrictHostKeyChecking=accept-new", "ServerAliveInterval=5"], "command": ["-x", "ls"]},
        {"options": ["ControlPath=~/.ssh/cm-%r@%h:%p"], "host_key_options": _pinned_options(Path("/k h"), 9)},
    ],
)
def test_fast_path_runs_the_same_ssh_as_the_click_command(kwargs):
    """The two paths differ only in how the bytes reach the proxy (ProxyCommand + ProxyUseFdpass)."""

    def without_proxy(argv: list[str]) -> list[str]:
        out: list[str] = []
        for word in argv:
            if word.startswith(("ProxyCommand=", "ProxyUseFdpass=")):
                out.pop()  # its "-o"
            else:
                out.append(word)
        return out

    user = kwargs.get("user", "root")
    key = kwargs.get("key")
    options, command = kwargs.get("options", []), kwargs.get("command", [])
    checking = kwargs.get("host_key_options")
    slow = build_ssh_argv(
        9, kr="/kr", proxy_port=8002, user=user, key=key, options=options, command=command,
        host_key_options=checking,
    )  # fmt: skip
    fast = ssh_fast.fast_ssh_argv(
        9, proxy_options=ssh_fast.fdpass_options("/tmp/kr-ssh-x/s"), user=user,
        key=None if key is None else Path(key), options=options, command=command, host_key_options=checking,
    )  # fmt: skip
    assert without_proxy(fast) == without_proxy(slow)
    assert "ProxyUseFdpass=yes" in fast
    # The user's options as typed (their % tokens are ssh's), before how the host key is checked.
    assert _options(slow)[1 : 1 + len(options)] == options
    assert _options(slow)[-len(checking or [1]) :] == (checking or ["HostKeyAlias=kohakuriver-9"])


def test_fdpass_proxy_command_is_one_line_without_percent():
    (option,) = [o for o in ssh_fast.fdpass_options("/tmp/kr-ssh-x/s") if o.startswith("ProxyCommand=")]
    assert "\n" not in option and "%" not in option.replace("%%", "")
    words = shlex.split(option.removeprefix("ProxyCommand="))
    assert words[1:3] == ["-S", "-I"] and words[-1] == "/tmp/kr-ssh-x/s"


def test_remembered_proxy_ports(kr_home):
    assert ssh_fast.remembered_port("http://h:8000") is None
    ssh_fast.remember_port("http://h:8000", 2222)
    ssh_fast.remember_port("http://other:8000", 2223)
    assert ssh_fast.remembered_port("http://h:8000") == 2222
    assert stat.S_IMODE((kr_home / ssh_fast.PORTS_FILE).stat().st_mode) == 0o600
    ssh_fast.remember_port("http://h:8000", None)
    assert ssh_fast.remembered_port("http://h:8000") is None
    assert ssh_fast.remembered_port("http://other:8000") == 2223
    (kr_home / ssh_fast.PORTS_FILE).write_text("not json")
    assert ssh_fast.remembered_port("http://other:8000") is None


# -- host key pinning ----------------------------------------------------------------------------------------


def test_kr_ssh_pins_the_host_key_once_and_checks_it_strictly(host, ran, kr_home):
    host.on("GET", "/api/health", {"status": "ok", "ssh_proxy_port": 9022})
    host.on("GET", "/api/vps/42/host-key", {"task_id": "42", "host_key": KEY_A})
    result = host.invoke("ssh", "42", "-o", "StrictHostKeyChecking=accept-new", "--", "true")
    assert result.exit_code == 7, result.output
    assert result.stderr == ""
    argv = ran[-1][0]
    # The user's option first (ssh keeps the first value: theirs wins), then the pinned file, strictly.
    assert _options(argv)[-4:] == ["StrictHostKeyChecking=accept-new", *_pinned_options(kr_home, 42)]
    assert not any(o == "StrictHostKeyChecking=no" for o in _options(argv))
    assert (kr_home / "known_hosts").read_text() == f"kohakuriver-42 {KEY_A}\n"
    # Pinned: the next runs read the file and ask the host nothing more (vps connect too).
    assert host.invoke("ssh", "42").exit_code == 7
    assert host.invoke("vps", "connect", "42").exit_code == 7
    assert len(host.calls("GET", "/api/vps/42/host-key")) == 1
    assert _options(ran[-1][0])[-3:] == _pinned_options(kr_home, 42)


@pytest.mark.parametrize(
    "reply",
    [
        error_reply(404, "not_found", "no route GET /api/vps/5/host-key"),  # a host from before the route
        error_reply(409, "conflict", "VPS 5 has no host key yet (it was never started on its node)"),
        error_reply(503, "unavailable", "node gpu1 is offline"),
        {"task_id": "5", "host_key": "ssh-rsa AAAA"},
    ],
)
def test_a_key_that_cannot_be_had_leaves_ssh_its_own_checking(host, ran, kr_home, reply):
    host.on("GET", "/api/health", {"status": "ok"})
    host.on("GET", "/api/vps/5/host-key", reply)
    result = host.invoke("ssh", "5", "--", "true")
    assert result.exit_code == 7, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("kr ssh: cannot pin the host key of VPS 5 (") and "the usual way" in line
    assert _options(ran[-1][0])[-1] == "HostKeyAlias=kohakuriver-5"
    assert not any(
        o.startswith(("StrictHostKeyChecking", "UserKnownHostsFile")) for o in _options(ran[-1][0])
    )
    assert not (kr_home / "known_hosts").exists()


def test_a_changed_key_is_refused_by_ssh_and_kr_names_the_file(host, monkeypatch, kr_home):
    monkeypatch.setattr(ssh_cmd, "_run_foreground", lambda argv, env: 255)
    monkeypatch.setattr(ssh_cmd, "kr_executable", lambda: "/venv/bin/kr")
    known_hosts.pin("kohakuriver-8", KEY_A)
    host.on("GET", "/api/health", {"status": "ok"})
    host.on("GET", "/api/vps/8/host-key", {"task_id": "8", "host_key": KEY_B})
    result = host.invoke("ssh", "8")
    assert result.exit_code == 255
    [line] = result.stderr.splitlines()
    assert str(kr_home / "known_hosts") in line and "re-created node" in line
    assert known_hosts.pinned_key("kohakuriver-8") == KEY_A  # never replaced by kr
    # ssh failed for another reason (the host gives the pinned key): nothing to add.
    host.on("GET", "/api/vps/8/host-key", {"task_id": "8", "host_key": KEY_A})
    assert host.invoke("ssh", "8").stderr == ""


def test_ssh_config_pins_every_listed_vps(host, ran, kr_home):
    host.on("GET", "/api/auth/me", {"user_id": 3, "username": "alice", "role": "user"})
    tasks = [{"task_id": str(i), "status": "running", "assigned_node": "n1"} for i in (61, 62, 63)]
    host.on("GET", "/api/tasks", {"tasks": tasks, "has_more": False})
    known_hosts.pin("kohakuriver-61", KEY_A)
    host.on("GET", "/api/vps/62/host-key", {"task_id": "62", "host_key": KEY_B})
    host.on("GET", "/api/vps/63/host-key", error_reply(409, "conflict", "VPS 63 has no host key yet"))
    result = host.invoke("ssh", "config", "--proxy-port", "8002")
    assert result.exit_code == 0, result.output
    [warning] = result.stderr.splitlines()
    assert "VPS 63" in warning and "VPS 63 has no host key yet" in warning
    assert [len(host.calls("GET", f"/api/vps/{i}/host-key")) for i in (61, 62, 63)] == [0, 1, 1]
    assert known_hosts.pinned_key("kohakuriver-62") == KEY_B
    blocks = {b.split("\n")[1]: b.splitlines() for b in result.stdout.split("\n\n") if "\nHost " in "\n" + b}
    for i in (61, 62):
        assert f"    UserKnownHostsFile {kr_home / 'known_hosts'}" in blocks[f"Host kohakuriver-{i}"]
        assert "    StrictHostKeyChecking yes" in blocks[f"Host kohakuriver-{i}"]
        assert f"    HostKeyAlias kohakuriver-{i}" in blocks[f"Host kohakuriver-{i}"]
    assert not any("KnownHosts" in line or "Strict" in line for line in blocks["Host kohakuriver-63"])


def test_known_hosts_path_with_spaces_and_percent_reaches_ssh_whole(tmp_path):
    path = tmp_path / "a dir 100%" / "known_hosts"
    [file_option, *_] = known_hosts.ssh_options("kohakuriver-1", path)
    out = subprocess.run(
        ["ssh", "-G", "-o", file_option, "somewhere"], capture_output=True, text=True, check=True
    ).stdout
    assert f"userknownhostsfile {path}\n" in out


class _HostKeyServer:
    """A real HTTP server answering ``GET /api/vps/<id>/host-key`` from ``answers`` (status, JSON)."""

    def __init__(self, answers: dict[str, tuple[int, object]]) -> None:
        self.answers = answers
        self.seen: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.seen.append((self.path, self.headers.get("Authorization")))
                status, body = outer.answers.get(self.path, (404, {"message": "no route"}))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def fast_host(monkeypatch):
    """The fast path with a real HTTP host for the key, a socket pair for the tunnel and ssh recorded."""
    server = _HostKeyServer({})
    runs: list[list[str]] = []
    exit_code = [0]

    class FakeSsh:
        def __init__(self, argv_of, env):
            runs.append(argv_of("/tmp/kr-ssh-x/s"))

        def serve(self, tunnel):
            tunnel.close()
            return exit_code[0]

        def abort(self):
            pass

    monkeypatch.setattr(ssh_fast, "_tunnel", lambda *args: socket.socketpair()[0])
    monkeypatch.setattr(ssh_fast, "FdpassSsh", FakeSsh)
    server.runs, server.exit_code = runs, exit_code
    yield server
    server.server.shutdown()
    server.server.server_close()


def test_fast_path_pins_over_http_client_then_reads_only_the_file(fast_host, kr_home, capsys):
    fast_host.answers["/api/vps/21/host-key"] = (200, {"task_id": "21", "host_key": KEY_A})
    env = {"KOHAKURIVER_HOST": fast_host.url, "KOHAKURIVER_TOKEN": TOKEN}
    assert ssh_fast.try_run(["21", "--", "true"], env) == 0
    assert ssh_fast.try_run(["21", "-o", "LogLevel=ERROR", "--", "true"], env) == 0
    assert fast_host.seen == [("/api/vps/21/host-key", f"Bearer {TOKEN}")]  # one request, then the file
    for argv in fast_host.runs:
        assert _options(argv)[-3:] == _pinned_options(kr_home, 21)
    assert capsys.readouterr().err == ""
    # A changed key: ssh refuses (255); the host gives another key now, and the line names the file.
    (kr_home / "known_hosts").write_text(f"kohakuriver-21 {KEY_B}\n")
    fast_host.exit_code[0] = 255
    assert ssh_fast.try_run(["21", "--", "true"], env) == 255
    [line] = capsys.readouterr().err.splitlines()
    assert str(kr_home / "known_hosts") in line and "re-created node" in line


def test_fast_path_falls_back_with_one_line_when_the_host_has_no_key(fast_host, kr_home, capsys):
    fast_host.answers["/api/vps/22/host-key"] = (409, {"message": "VPS 22 has no host key yet"})
    env = {"KOHAKURIVER_HOST": fast_host.url, "KOHAKURIVER_TOKEN": TOKEN}
    assert ssh_fast.try_run(["22", "--", "true"], env) == 0
    assert capsys.readouterr().err == (
        "kr ssh: cannot pin the host key of VPS 22 (VPS 22 has no host key yet (HTTP 409)); "
        "ssh checks it the usual way\n"
    )
    assert _options(fast_host.runs[-1])[-1] == "HostKeyAlias=kohakuriver-22"
    assert not (kr_home / "known_hosts").exists()
    env["KOHAKURIVER_HOST"] = "http://127.0.0.1:1"  # nothing listens: the same fallback
    assert ssh_fast.try_run(["22", "--", "true"], env) == 0
    assert "cannot reach the host" in capsys.readouterr().err
