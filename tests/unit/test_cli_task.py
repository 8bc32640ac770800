"""``kr task``: argv handling, spec building, --wait exit codes, list/status output, logs, control."""

from __future__ import annotations

import itertools
import json
import threading
from contextlib import contextmanager

import click
import httpx
import pytest
import trio
import trio_websocket

from kohakuriver_cli import log_socket, task_cmd
from kohakuriver_cli.client import EXIT_UNREACHABLE, CliError, HostClient, Settings
from kohakuriver_cli.task_cmd import (
    EXIT_KILLED,
    FollowEnd,
    build_spec,
    combined_exit_code,
    exit_code_for,
    follow_logs,
    follow_task_logs,
    list_params,
    logs_ws_url,
    parse_env,
    poll_delays,
    wait_for_tasks,
)

from . import test_cli_client
from .test_cli_client import HOST, TOKEN, FakeHost, assert_one_line_error, error_reply

# the shared fixtures: an isolated ~/.kohakuriver (autouse) and a FakeHost
kr_home = test_cli_client.kr_home
host = test_cli_client.host

SUBMITTED_AT = "2025-04-10T08:30:00Z"


def record(task_id: str = "101", status: str = "running", **fields) -> dict:
    data = {
        "task_id": task_id,
        "task_type": "command",
        "status": status,
        "submitted_at": SUBMITTED_AT,
        "command": "python",
        "arguments": ["train.py"],
        "required_cores": 1,
        "exit_code": None,
    }
    data.update(fields)
    return data


def accept(host: FakeHost, *ids: str) -> None:
    host.on("POST", "/api/submit", {"task_ids": list(ids or ["101"]), "message": "queued"}, status=202)


# -- argv: what the user typed is what runs ------------------------------------------------------------------


def test_double_dash_keeps_argv_exactly(host):
    accept(host)
    argv = [
        "python",
        "-c",
        "import sys; print(sys.argv)",
        "--json",
        "-t",
        "x",
        "; rm -rf /",
        "$(id)",
        "*",
        "a b",
    ]
    result = host.invoke("task", "submit", "--", *argv)
    assert result.exit_code == 0, result.output
    body = host.body("POST", "/api/submit")
    assert body["command"] == "python"
    assert body["arguments"] == argv[1:]
    assert body["targets"] == []  # "-t x" after -- belongs to the command


def test_shell_metacharacters_arrive_as_one_argument(host):
    accept(host)
    result = host.invoke("task", "submit", "--", "echo", "'; rm -rf /'")
    assert result.exit_code == 0, result.output
    assert host.body("POST", "/api/submit")["arguments"] == ["'; rm -rf /'"]


def test_options_stop_at_the_command_without_double_dash(host):
    accept(host)
    result = host.invoke(
        "task", "submit", "-t", "node1", "-c", "4", "python", "train.py", "--lr", "0.1", "-c", "9"
    )
    assert result.exit_code == 0, result.output
    body = host.body("POST", "/api/submit")
    assert (body["command"], body["arguments"]) == ("python", ["train.py", "--lr", "0.1", "-c", "9"])
    assert (body["targets"], body["required_cores"]) == (["node1"], 4)


def test_a_second_double_dash_belongs_to_the_command(host):
    accept(host)
    result = host.invoke("task", "submit", "--", "git", "log", "--", "README.md")
    assert result.exit_code == 0, result.output
    assert host.body("POST", "/api/submit")["arguments"] == ["log", "--", "README.md"]


def test_missing_command_is_a_usage_error(host):
    result = host.invoke("task", "submit", "-c", "2")
    assert result.exit_code == 2
    assert host.requests == []


def test_stdout_is_only_the_task_ids(host):
    accept(host, "7000000000000000001", "7000000000000000002")
    result = host.invoke("task", "submit", "-t", "a", "-t", "b", "--", "true")
    assert result.exit_code == 0, result.output
    assert result.stdout == "7000000000000000001\n7000000000000000002\n"
    assert "queued" in result.stderr


def test_submit_json_is_the_hosts_answer(host):
    answer = {"task_ids": ["101"], "message": "1 task queued", "extra": {"kept": True}}
    host.on("POST", "/api/submit", answer, status=202)
    result = host.invoke("task", "submit", "--json", "--", "true")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == answer


def test_submit_sends_the_whole_spec(host):
    accept(host)
    result = host.invoke(
        "task", "submit", "-t", "gpu1:0", "-c", "8", "-m", "16G", "--gpus", "0,1", "--image", "python:3.12",
        "-e", "A=1", "-e", "B=x=y", "--mount", "/data:/data:ro", "--workdir", "/work", "--privileged",
        "--name", "train run", "--", "python", "train.py",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert host.body("POST", "/api/submit") == {
        "command": "python",
        "arguments": ["train.py"],
        "env_vars": {"A": "1", "B": "x=y"},
        "required_cores": 8,
        "required_memory_bytes": 16 * 2**30,
        "required_gpus": [0, 1],
        "targets": ["gpu1:0"],
        "container_name": None,
        "registry_image": "python:3.12",
        "working_dir": "/work",
        "privileged": True,
        "additional_mounts": ["/data:/data:ro"],
        "name": "train run",
        "task_type": "command",
        "ip_token": None,
    }
    assert host.requests[0].headers["authorization"] == f"Bearer {TOKEN}"


# -- spec building -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"targets": ["gpu1::0,1", "gpu2:1"], "cores": 0, "memory": "4G", "image": "python:3.12"},
        {"gpus": "0,1", "targets": ["n"], "env": ["A=1", "B="], "mounts": ["/a:/b:ro"], "workdir": "/w"},
        {"container": "env1", "privileged": True, "name": "x y"},
    ],
)
def test_submit_body_is_what_the_converter_writes(kwargs):
    from kohakuriver_proto import converter

    spec = build_spec(["python", "-c", "print('é')"], environ={}, **kwargs)
    assert task_cmd.spec_body(spec) == converter.unstructure(spec)


def test_spec_targets_and_gpus():
    spec = build_spec(["nvidia-smi"], targets=["gpu1::0,1", " gpu2:1 "])
    assert spec.targets == ["gpu1::0,1", "gpu2:1"]
    assert [str(t) for t in spec.placements()] == ["gpu1::0,1", "gpu2:1"]
    spec = build_spec(["nvidia-smi"], targets=["gpu1"], gpus="2, 3")
    assert spec.required_gpus == [2, 3]


@pytest.mark.parametrize(
    ("kwargs", "option", "fragment"),
    [
        ({"targets": ["bad host"]}, "--target", "invalid hostname"),
        ({"targets": ["node:x"]}, "--target", "NUMA node"),
        ({"targets": ["node::"]}, "--target", "no GPU ids"),
        ({"gpus": "0,1"}, "--gpus", "give a target node"),
        ({"targets": ["n::0"], "gpus": "1"}, "--target", "either in the target"),
        ({"targets": ["n"], "gpus": "a,b"}, "--gpus", "GPU ids"),
        ({"targets": ["n"], "gpus": "1,1"}, "--gpus", "duplicate"),
        ({"memory": "lots"}, "--memory", "expected a size"),
        ({"memory": "1K"}, "--memory", "at least 6 MiB"),
        ({"memory": "4Q"}, "--memory", "unknown unit"),
        ({"env": ["1BAD=x"]}, "--env", "invalid variable name"),
        ({"env": ["KOHAKURIVER_TASK_ID=1"]}, "--env", "reserved"),
        ({"env": ["=x"]}, "--env", "NAME=VALUE"),
        ({"env": ["NOT_SET_ANYWHERE"]}, "--env", "not set in this shell"),
        ({"mounts": ["relative:/x"]}, "--mount", "absolute path"),
        ({"mounts": ["/a:/b:rx"]}, "--mount", "'ro' or 'rw'"),
        ({"workdir": "relative"}, "--workdir", "absolute path"),
        ({"image": "python:3", "container": "env"}, "--image", "not both"),
        ({"container": "bad name!"}, "--container", "environment name"),
        ({"name": "two\nlines"}, "--name", "one line"),
    ],
)
def test_spec_errors_name_the_option(kwargs, option, fragment):
    with pytest.raises(click.BadParameter) as info:
        build_spec(["true"], environ={}, **kwargs)
    message = info.value.format_message()
    assert option in message and fragment in message, message


def test_spec_memory_units():
    assert build_spec(["true"], memory="4G").required_memory_bytes == 4 * 2**30
    assert build_spec(["true"], memory="512MB").required_memory_bytes == 512 * 10**6
    assert build_spec(["true"], memory="1.5GiB").required_memory_bytes == 3 * 2**29
    assert build_spec(["true"], memory="0").required_memory_bytes is None
    assert build_spec(["true"]).required_memory_bytes is None


def test_env_parsing():
    assert parse_env(["A=1", "B=", "C=x=y", "A=2"], {}) == {"A": "2", "B": "", "C": "x=y"}
    assert parse_env(["HOME_DIR"], {"HOME_DIR": "/home/me"}) == {"HOME_DIR": "/home/me"}


def test_bad_option_is_exit_2_naming_it(host):
    result = host.invoke("task", "submit", "-m", "lots", "--", "true")
    assert result.exit_code == 2
    assert "'-m' / '--memory'" in result.stderr
    assert host.requests == []


# -- --wait --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "exit_code", "expected"),
    [
        ("completed", 0, 0),
        ("completed", None, 0),
        ("failed", 3, 3),
        ("failed", 255, 255),
        ("failed", None, 1),
        ("failed", -1, 1),
        ("failed", 0, 1),
        ("failed", 300, 1),
        ("killed", None, EXIT_KILLED),
        ("killed", 143, EXIT_KILLED),
        ("killed_oom", 137, EXIT_KILLED),
        ("lost", -1, 1),
        ("lost", None, 1),
        ("rejected", None, 1),
        ("stopped", None, 0),
        ("stopped", 2, 2),
        ("some_future_status", None, 1),
    ],
)
def test_exit_code_for_final_records(status, exit_code, expected):
    assert exit_code_for(record(status=status, exit_code=exit_code)) == expected


def test_combined_exit_code_is_first_non_zero_in_order():
    ok, bad, killed = (
        record(status="completed"),
        record(status="failed", exit_code=4),
        record(status="killed"),
    )
    assert combined_exit_code([ok, ok]) == 0
    assert combined_exit_code([ok, bad, killed]) == 4
    assert combined_exit_code([killed, bad]) == EXIT_KILLED


def test_poll_delays_grow_from_20ms_to_1s():
    delays = poll_delays()
    first = [next(delays) for _ in range(20)]
    assert first[0] == pytest.approx(0.02)
    assert all(b >= a for a, b in itertools.pairwise(first))
    assert first[-1] == 1.0 and max(first) == 1.0


def _client(host: FakeHost) -> HostClient:
    return HostClient(Settings(HOST, TOKEN), transport=httpx.MockTransport(host.handle))


def test_wait_polls_until_final(host):
    host.on_each(
        "GET",
        "/api/status/1",
        *[record("1", s) for s in ("pending", "assigning", "running", "running")],
        record("1", "completed", exit_code=0),
    )
    host.on("GET", "/api/status/2", record("2", "failed", exit_code=2))
    slept: list[float] = []
    seen: list[int] = []
    records = wait_for_tasks(
        _client(host), ["1", "2"], sleep=slept.append, on_poll=lambda r: seen.append(len(r))
    )
    assert [r["status"] for r in records] == ["completed", "failed"]
    assert len(host.calls("GET", "/api/status/2")) == 1  # final records are not polled again
    assert len(host.calls("GET", "/api/status/1")) == 5
    # This host answers at once whatever it is asked (a host from before the long poll): a read that brings
    # a new status is followed at once by the next, one that brings the same status by a growing pause.
    assert slept == pytest.approx([0.02])
    assert seen and seen[-1] == 2


class HoldingHost:
    """A host with the long poll, on a fake clock: a status read with ``since`` equal to the task's status is
    held until the next status of ``statuses`` (a repeated one: the hold runs out) or ``wait`` seconds."""

    def __init__(self, statuses: dict[str, list[str]]) -> None:
        self.statuses = {task_id: list(seq) for task_id, seq in statuses.items()}
        self.now = 0.0
        self.queries: list[tuple[str, dict[str, str]]] = []

    def current(self, task_id: str) -> str:
        return self.statuses[task_id][0]

    def handle(self, request: httpx.Request) -> httpx.Response:
        task_id = request.url.path.rsplit("/", 1)[1]
        query = dict(request.url.params)
        self.queries.append((task_id, query))
        seq = self.statuses[task_id]
        if "since" in query and query["since"] == seq[0]:
            if len(seq) > 1 and seq[1] != seq[0]:
                self.now += 0.005  # the status changes a moment later
            else:
                self.now += float(query["wait"])  # held to the end: the same record
            if len(seq) > 1:
                seq.pop(0)
        return httpx.Response(200, json=record(task_id, self.current(task_id)))


def test_wait_long_polls_a_holding_host_and_never_sleeps():
    fake = HoldingHost(
        {"1": ["pending", "assigning", "running", "running", "completed"], "2": ["running"] * 3}
    )
    fake.statuses["2"].append("failed")
    client = HostClient(Settings(HOST, TOKEN), transport=httpx.MockTransport(fake.handle))
    slept: list[float] = []
    records = wait_for_tasks(client, ["1", "2"], sleep=slept.append, clock=lambda: fake.now, hold=7)
    assert [r["status"] for r in records] == ["completed", "failed"] and slept == []
    assert fake.queries[:2] == [("1", {}), ("2", {})]  # first reads: plain
    assert fake.queries[2] == ("1", {"wait": "7", "since": "pending"})
    assert ("1", {"wait": "7", "since": "running"}) in fake.queries
    assert fake.now // 7 == 3  # the three reads whose status stayed were held to the end, and no other


def test_wait_backs_off_when_a_host_ignores_the_long_poll(host):
    host.on_each("GET", "/api/status/1", *[record("1", "running")] * 6, record("1", "completed"))
    slept: list[float] = []
    records = wait_for_tasks(_client(host), ["1"], sleep=slept.append)
    assert records[0]["status"] == "completed"
    assert slept == pytest.approx([0.02, 0.025, 0.03125, 0.0390625, 0.048828125])
    assert all(
        dict(r.url.params) == {"wait": "20", "since": "running"}
        for r in host.calls("GET", "/api/status/1")[1:]
    )


def test_wait_survives_a_host_restart(host):
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    host.on_each("GET", "/api/status/1", down, down, record("1", "completed", exit_code=0))
    records = wait_for_tasks(_client(host), ["1"], sleep=lambda _s: None)
    assert records[0]["status"] == "completed"


def test_wait_gives_up_when_the_host_stays_away(host):
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    host.on("GET", "/api/status/1", down)
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(CliError) as info:
        wait_for_tasks(_client(host), ["1"], sleep=sleep, clock=lambda: now[0])
    assert info.value.exit_code == EXIT_UNREACHABLE
    assert now[0] > task_cmd.WAIT_UNREACHABLE_GRACE


def test_wait_stops_on_other_errors(host):
    host.on("GET", "/api/status/1", error_reply(404, "not_found", "task 1 not found"))
    with pytest.raises(CliError) as info:
        wait_for_tasks(_client(host), ["1"], sleep=lambda _s: None)
    assert info.value.exit_code == 3


@pytest.mark.parametrize(
    ("final", "expected"),
    [
        (record("101", "completed", exit_code=0), 0),
        (record("101", "failed", exit_code=42), 42),
        (record("101", "killed_oom", exit_code=137), 137),
        (record("101", "lost", exit_code=-1), 1),
    ],
)
def test_submit_wait_exits_with_the_task_code(host, final, expected):
    accept(host)
    host.on_each("GET", "/api/status/101", record("101", "running"), final)
    result = host.invoke("task", "submit", "--wait", "--quiet", "--", "python", "train.py")
    assert result.exit_code == expected, result.output
    assert result.stdout == "101\n"
    if expected:
        assert final["status"] in result.stderr


def test_submit_wait_several_tasks(host):
    accept(host, "1", "2", "3")
    host.on("GET", "/api/status/1", record("1", "completed", exit_code=0))
    host.on("GET", "/api/status/2", record("2", "failed", exit_code=5))
    host.on("GET", "/api/status/3", record("3", "failed", exit_code=6))
    result = host.invoke("task", "submit", "-w", "-q", "-t", "a", "-t", "b", "-t", "c", "--", "true")
    assert result.exit_code == 5, result.output
    assert result.stdout == "1\n2\n3\n"


def test_ctrl_c_while_waiting_exits_130(host):
    accept(host)

    def interrupt(request: httpx.Request) -> httpx.Response:
        raise KeyboardInterrupt

    host.on("GET", "/api/status/101", interrupt)
    for quiet in (["--quiet"], []):
        result = host.invoke("task", "submit", "--wait", *quiet, "--", "sleep", "100")
        assert result.exit_code == 130
        assert "keeps running" in result.stderr and "kr task kill 101" in result.stderr
        assert "Traceback" not in result.output


# -- --wait shows the output ---------------------------------------------------------------------------------


def test_wait_json_prints_the_answer_and_no_output(host):
    accept(host)
    host.on("GET", "/api/status/101", record("101", "failed", exit_code=3))
    result = host.invoke("task", "submit", "--wait", "--json", "--", "false")
    assert result.exit_code == 3
    assert json.loads(result.stdout) == {"task_ids": ["101"], "message": "queued"}
    assert not host.calls("GET", "/api/tasks/101/stdout")


@pytest.mark.parametrize(
    ("final", "expected", "outcome_line"),
    [
        (record("101", "completed", exit_code=0), 0, False),
        (record("101", "failed", exit_code=3), 3, False),  # the code says it, as with docker run
        (record("101", "killed_oom", exit_code=137), 137, True),
        (record("101", "lost", exit_code=-1), 1, True),
    ],
)
def test_wait_of_a_task_that_ended_between_polls_prints_its_saved_output(host, final, expected, outcome_line):
    accept(host)
    host.on_each("GET", "/api/status/101", record("101", "pending"), final)
    host.on("GET", "/api/tasks/101/stdout", httpx.Response(200, content=b"out \xff\n"))
    host.on("GET", "/api/tasks/101/stderr", httpx.Response(200, content=b"err\n"))
    result = host.invoke("task", "submit", "--wait", "--", "sh", "-c", "work")
    assert result.exit_code == expected, result.output
    assert result.stdout_bytes == b"out \xff\n"  # no id: stdout is the task's
    assert result.stderr.startswith("err\n")
    assert (final["status"] in result.stderr) == outcome_line
    assert len(host.calls("GET", "/api/tasks/101/stdout")) == 1


def ws_by_stream(sessions: dict[str, list[tuple[list, FakeClose]]], urls: list[str]):
    """A fake ``open_log_socket`` that serves, per stream, one session per connection."""
    lock = threading.Lock()

    def connect(url, headers, **kwargs):
        with lock:
            urls.append(url)
            stream = "stderr" if "stream=stderr" in url else "stdout"
            messages, close = sessions[stream].pop(0)
        return FakeWs(messages, close)

    return connect


def test_wait_streams_both_outputs_of_a_running_task(host, monkeypatch):
    accept(host)
    host.on_each("GET", "/api/status/101", record("101", "running"), record("101", "failed", exit_code=3))
    urls: list[str] = []
    sessions = {
        "stdout": [(["line 1\n", b"line 2 \xff\n"], FakeClose(1000, "task failed"))],
        "stderr": [(["oops\n"], FakeClose(1000, "task failed"))],
    }
    monkeypatch.setattr(log_socket, "open_log_socket", ws_by_stream(sessions, urls))
    result = host.invoke("task", "submit", "--wait", "--", "sh", "-c", "work")
    assert result.exit_code == 3, result.output
    assert result.stdout_bytes == b"line 1\nline 2 \xff\n"
    assert result.stderr == "oops\n"
    # from the first byte: no `lines`
    assert sorted(urls) == [
        f"ws://{HOST.split('://')[1]}/ws/tasks/101/logs?stream=stderr&binary=1",
        f"ws://{HOST.split('://')[1]}/ws/tasks/101/logs?stream=stdout&binary=1",
    ]


def test_whole_stream_reconnect_skips_what_was_written():
    urls: list[str] = []
    out: list[bytes] = []
    delays: list[float] = []
    sessions = {
        "stdout": [
            (["héllo ", "wor"], FakeClose(1011, "stream broke")),
            ([], FakeClose(1006)),  # dropped before anything arrived: again, with a longer pause
            (["héllo world\n", "more\n"], FakeClose(1000, "task completed")),
        ]
    }
    end = task_cmd.follow_whole_stream(
        "http://h:8000", "5", "stdout", None, out.append, connect=ws_by_stream(sessions, urls),
        sleep=delays.append,
    )  # fmt: skip
    assert end == FollowEnd(0)
    assert b"".join(out) == "héllo world\nmore\n".encode()
    assert urls == ["ws://h:8000/ws/tasks/5/logs?stream=stdout&binary=1"] * 3
    assert delays == [0.5, 1.0]


def test_a_write_that_fails_in_a_follow_thread_is_raised_here():
    sessions = {"stdout": [(["x"], FakeClose(1000))], "stderr": [([], FakeClose(1000))]}

    def broken(data: bytes) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(BrokenPipeError):
        task_cmd.follow_outputs("http://h", None, ["5"], broken, print, ws_by_stream(sessions, []))


# -- list / status -------------------------------------------------------------------------------------------


def test_list_params():
    assert list_params(["running", "PENDING", "running"], "n1", "vps", 10, 20) == {
        "status": "running,pending",
        "node": "n1",
        "task_type": "vps",
        "limit": "10",
        "offset": "20",
    }
    assert list_params([], None, None, None, None) == {}


def test_list_filters_to_own_tasks_unless_all_users(host):
    host.on("GET", "/api/auth/me", {"user_id": 3, "username": "alice", "role": "operator"})
    host.on("GET", "/api/tasks", [])
    assert host.invoke("task", "list", "-s", "running").exit_code == 0
    assert dict(host.calls("GET", "/api/tasks")[-1].url.params) == {"status": "running", "owner": "alice"}
    assert host.invoke("task", "list", "--all-users", "--limit", "5").exit_code == 0
    assert dict(host.calls("GET", "/api/tasks")[-1].url.params) == {"limit": "5"}


def test_list_json_is_the_api_json_verbatim(host):
    tasks = [record("9007199254740993", "running", name="big id", zebra=1, alpha=2), record("5", "completed")]
    host.on("GET", "/api/tasks", tasks)
    result = host.invoke("task", "list", "--all-users", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == tasks
    assert list(json.loads(result.stdout)[0]) == list(tasks[0])  # key order kept
    assert '"9007199254740993"' in result.stdout  # ids stay strings
    global_flag = host.invoke("--json", "task", "list", "--all-users")
    assert global_flag.stdout == result.stdout


def test_list_table(host):
    host.on(
        "GET",
        "/api/tasks",
        {
            "tasks": [
                record("11", "running", assigned_node="gpu1", required_memory_bytes=4 * 2**30),
                record("12", "failed", name="\x1b]0;pwned\x07[bold]x", exit_code=3),
            ]
        },
    )
    result = host.invoke("task", "list", "-a")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "11" in out and "python train.py" in out and "gpu1" in out and "4 GiB" in out
    assert "\x1b" not in out and "\\x1b]0;pwned\\x07[bold]x" in out


def test_list_says_when_there_are_more(host):
    host.on(
        "GET",
        "/api/tasks",
        {"tasks": [record("11"), record("12")], "limit": 2, "offset": 4, "has_more": True},
    )
    result = host.invoke("task", "list", "-a", "--limit", "2", "--offset", "4")
    assert result.exit_code == 0, result.output
    assert "--offset 6" in result.stderr and "--offset" not in result.stdout


def test_list_quiet_prints_ids(host):
    host.on("GET", "/api/tasks", [record("11"), record("12")])
    result = host.invoke("task", "list", "-a", "-q")
    assert result.stdout == "11\n12\n"


def test_status_panel(host):
    host.on(
        "GET",
        "/api/status/11",
        record(
            "11",
            "failed",
            arguments=["-c", "print('a b')"],
            assigned_node="gpu1",
            exit_code=137,
            error_message="out of memory",
            env_vars={"SECRET": "hunter2"},
            started_at="2025-04-10T08:30:05Z",
            completed_at="2025-04-10T08:31:05Z",
        ),
    )
    result = host.invoke("task", "status", "11")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for fragment in (
        "task 11",
        "failed",
        "python -c 'print('\"'\"'a b'\"'\"')'",
        "gpu1",
        "SIGKILL",
        "out of memory",
    ):
        assert fragment in out, (fragment, out)
    assert "Ran for" in out and "1m00s" in out
    assert "SECRET" in out and "hunter2" not in out


def test_status_json_verbatim(host):
    data = record("11", "running")
    host.on("GET", "/api/status/11", data)
    result = host.invoke("task", "status", "11", "--json")
    assert json.loads(result.stdout) == data


@pytest.mark.parametrize("bad", ["../etc", "12a", "", "1/2", "-1"])
def test_task_ids_are_validated(host, bad):
    result = host.invoke("task", "status", "--", bad)
    assert result.exit_code == 2
    assert host.requests == []


# -- logs ----------------------------------------------------------------------------------------------------


def test_logs_tail_is_raw_bytes(host):
    payload = b"line 1\n\xff\xfe not utf-8\n\x1b[31mred\x1b[0m\n"
    host.on("GET", "/api/tasks/11/stdout", httpx.Response(200, content=payload))
    result = host.invoke("task", "logs", "11", "--lines", "50")
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes == payload
    assert dict(host.calls("GET", "/api/tasks/11/stdout")[0].url.params) == {"lines": "50"}


def test_logs_stderr_stream(host):
    host.on("GET", "/api/tasks/11/stderr", httpx.Response(200, text="oops\n"))
    result = host.invoke("task", "logs", "11", "--stderr")
    assert result.stdout == "oops\n"
    assert dict(host.requests[0].url.params) == {}


def test_logs_follow_of_a_finished_task_prints_the_tail(host):
    host.on("GET", "/api/status/11", record("11", "completed", exit_code=0))
    host.on("GET", "/api/tasks/11/stdout", httpx.Response(200, text="done\n"))
    result = host.invoke("task", "logs", "-f", "11")
    assert result.exit_code == 0, result.output
    assert result.stdout == "done\n"


def test_logs_follow_of_an_unknown_task_is_exit_3(host):
    host.on("GET", "/api/status/11", error_reply(404, "not_found", "task 11 not found"))
    assert_one_line_error(host.invoke("task", "logs", "-f", "11"), 3, "task 11 not found")


def test_ws_url():
    assert (
        logs_ws_url("http://h:8000", "5", "stdout", None)
        == "ws://h:8000/ws/tasks/5/logs?stream=stdout&binary=1"
    )
    assert (
        logs_ws_url("https://h/kr/", "5", "stderr", 10)
        == "wss://h/kr/ws/tasks/5/logs?stream=stderr&lines=10&binary=1"
    )


class FakeClose:
    def __init__(self, code: int, reason: str | None = None) -> None:
        self.code, self.reason = code, reason


class FakeWs:
    """Stands in for ``log_socket.LogSocket``: the messages, then how it ended."""

    def __init__(self, messages: list, close: FakeClose) -> None:
        self.messages, self.ended = list(messages), log_socket.Ended(close.code, close.reason)
        self.closed = False

    def receive(self):
        return self.messages.pop(0) if self.messages else self.ended

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.closed = True


def fake_connect(messages: list, close: FakeClose, seen: dict | None = None):
    def connect(url, headers, **kwargs):
        if seen is not None:
            seen.update(url=url, headers=headers, **kwargs)
        return FakeWs(messages, close)

    return connect


@pytest.mark.parametrize(
    ("close", "expected"),
    [
        (FakeClose(1000, "task completed"), FollowEnd(0)),
        (FakeClose(1001), FollowEnd(0)),
        (FakeClose(1005), FollowEnd(0)),
        (FakeClose(1006), FollowEnd(5, "the connection to the host was lost", reconnect=True)),
        # The reason is a refusal code: it decides.
        (FakeClose(1008, "not_found"), FollowEnd(3, "task not found")),
        (FakeClose(1008, "not_allowed"), FollowEnd(4, "not allowed to read this task's output")),
        (
            FakeClose(1011, "runner_unavailable"),
            FollowEnd(1, "the task's runner could not serve its output", reconnect=True),
        ),
        (FakeClose(1011, "not_found"), FollowEnd(3, "task not found")),  # the code wins over the close code
        (FakeClose(1008, "a_newer_code"), FollowEnd(3, "the host refused the log stream (a_newer_code)")),
        # No code (an older host's prose): the close code alone decides; the words are shown, never read.
        (FakeClose(1008, "task not found"), FollowEnd(3, "task not found")),
        (FakeClose(1008, "not allowed"), FollowEnd(3, "not allowed")),
        (FakeClose(1011, "runner: boom"), FollowEnd(1, "runner: boom", reconnect=True)),
        (FakeClose(1011), FollowEnd(1, "the host's log stream broke", reconnect=True)),
        (FakeClose(4000, "odd"), FollowEnd(1, "the host refused the log stream (odd)")),
        (FakeClose(4000, "Odd: words"), FollowEnd(1, "Odd: words")),
    ],
)
def test_follow_logs_close_codes(close, expected):
    out: list[bytes] = []
    seen: dict = {}
    connect = fake_connect(["a\n", b"\xffb\n"], close, seen)
    assert follow_logs("ws://h/x", "krt_x", out.append, connect=connect) == expected
    assert out == [b"a\n", b"\xffb\n"]
    assert seen["headers"] == {"Authorization": "Bearer krt_x"}


def test_follow_logs_refused_and_unreachable():
    def rejected(url, headers, **kwargs):
        raise log_socket.Rejected(403, b'{"error": "forbidden", "message": "not yours"}')

    def refused(url, headers, **kwargs):
        raise log_socket.HandshakeFailed("Connection refused")

    def slow(url, headers, **kwargs):
        raise TimeoutError("timed out")

    end = follow_logs("ws://h/x", None, print, connect=rejected)
    assert end.exit_code == 4 and "not yours" in end.error and "HTTP 403" in end.error and not end.reconnect
    end = follow_logs("ws://h/x", None, print, connect=refused)
    assert end.exit_code == 5 and "Connection refused" in end.error
    end = follow_logs("ws://h/x", None, print, connect=slow)
    assert end.exit_code == 5 and "within 15 s" in end.error


def sequence_connect(sessions: list[tuple[list, FakeClose]], urls: list[str]):
    def connect(url, headers, **kwargs):
        urls.append(url)
        messages, close = sessions.pop(0) if len(sessions) > 1 else sessions[0]
        return FakeWs(messages, close)

    return connect


def test_follow_reconnects_for_new_output_only():
    urls: list[str] = []
    out: list[bytes] = []
    delays: list[float] = []
    sessions = [(["one\n"], FakeClose(1011, "stream broke")), (["two\n"], FakeClose(1000, "task completed"))]
    end = follow_task_logs(
        "http://h:8000", "5", "stdout", 20, None, out.append, lambda: True,
        connect=sequence_connect(sessions, urls), sleep=delays.append,
    )  # fmt: skip
    assert end == FollowEnd(0)
    assert out == [b"one\n", b"two\n"]
    assert urls == [
        "ws://h:8000/ws/tasks/5/logs?stream=stdout&lines=20&binary=1",
        "ws://h:8000/ws/tasks/5/logs?stream=stdout&lines=0&binary=1",
    ]
    assert delays == [0.5]


def test_follow_stops_reconnecting_when_the_task_ended():
    urls: list[str] = []
    connect = sequence_connect([([], FakeClose(1011, "cannot reach node gpu1"))], urls)
    end = follow_task_logs("http://h", "5", "stdout", None, None, print, lambda: False, connect=connect)
    assert end == FollowEnd(1, "cannot reach node gpu1", reconnect=True)
    assert len(urls) == 1


def test_follow_gives_up_after_repeated_empty_reconnects():
    urls: list[str] = []
    delays: list[float] = []
    connect = sequence_connect([([], FakeClose(1011, "runner: 500"))], urls)
    end = follow_task_logs(
        "http://h", "5", "stdout", None, None, print, lambda: True, connect=connect, sleep=delays.append
    )
    assert end.exit_code == 1 and end.error == "runner: 500"
    assert len(urls) == task_cmd.MAX_RECONNECTS + 1
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0] and max(delays) == task_cmd.RECONNECT_MAX_DELAY


async def _serve_logs(task_status=trio.TASK_STATUS_IGNORED, seen: dict | None = None):
    """A real WebSocket server (trio-websocket, wsproto underneath) playing the host's log stream."""

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        if seen is not None:
            seen["path"] = request.path
            seen["headers"] = dict(request.headers)
        ws = await request.accept()
        await ws.send_message("hello\n")
        await ws.send_message(b"\x00\xffraw\n")
        await ws.send_message("héllo ünïcode\n")
        await ws.send_message(b"x" * 300_000)  # a large message: 64-bit length, many reads
        await ws.aclose(1000, "task ended")

    await trio_websocket.serve_websocket(handler, "127.0.0.1", 0, ssl_context=None, task_status=task_status)


@contextmanager
def logs_server(seen: dict | None = None):
    """``_serve_logs`` in a thread of its own; yields its port."""
    started = threading.Event()
    port: list[int] = []
    stop: list[tuple[trio.lowlevel.TrioToken, trio.CancelScope]] = []

    async def serve() -> None:
        with trio.CancelScope() as scope:
            stop.append((trio.lowlevel.current_trio_token(), scope))
            async with trio.open_nursery() as nursery:
                server = await nursery.start(lambda task_status: _serve_logs(task_status, seen))
                port.append(server.port)
                started.set()

    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield port[0]
    finally:
        token, scope = stop[0]
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(10)


def test_follow_logs_against_a_real_websocket():
    seen: dict = {}
    out: list[bytes] = []
    with logs_server(seen) as port:
        url = logs_ws_url(f"http://127.0.0.1:{port}", "77", "stdout", 5)
        assert follow_logs(url, "krt_secret", out.append) == FollowEnd(0)
    assert out == [b"hello\n", b"\x00\xffraw\n", "héllo ünïcode\n".encode(), b"x" * 300_000]
    assert seen["path"] == "/ws/tasks/77/logs?stream=stdout&lines=5&binary=1"
    assert seen["headers"][b"authorization"] == b"Bearer krt_secret"


def test_log_socket_refusal_and_no_server():
    """An HTTP error answer to the upgrade is ``Rejected`` with its body; nothing listening is
    ``HandshakeFailed``."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    body = b'{"error":"not_found","message":"no task 9"}'

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            while b"\r\n\r\n" not in conn.recv(65536):
                pass
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    with pytest.raises(log_socket.Rejected) as info:
        log_socket.open_log_socket(f"ws://127.0.0.1:{port}/ws", {}, timeout=5, max_message=1 << 20)
    assert (info.value.status, info.value.body) == (404, body)
    thread.join(5)
    listener.close()
    with pytest.raises(log_socket.HandshakeFailed):
        log_socket.open_log_socket(f"ws://127.0.0.1:{port}/ws", {}, timeout=5, max_message=1 << 20)


def test_logs_follow_cli_end_to_end(host):
    """``kr task logs -f``: REST pre-check through the mock transport, the stream over a real WebSocket."""
    host.on("GET", "/api/status/77", record("77", "running"))
    with logs_server() as port:
        result = host.invoke("task", "logs", "-f", "77", KOHAKURIVER_HOST=f"http://127.0.0.1:{port}")
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes.startswith(b"hello\n\x00\xffraw\n")


# -- control -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verb", "path"),
    [("kill", "/api/kill/11"), ("pause", "/api/command/11/pause"), ("resume", "/api/command/11/resume")],
)
def test_control_paths(host, verb, path):
    host.on("POST", path, {"message": f"task 11 {verb} requested"})
    result = host.invoke("task", verb, "11")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"task 11: task 11 {verb} requested\n"
    assert len(host.calls("POST", path)) == 1


def test_kill_of_a_final_task_is_one_line_error(host):
    host.on("POST", "/api/kill/11", error_reply(409, "conflict", "task 11 is already completed"))
    assert_one_line_error(host.invoke("task", "kill", "11"), 1, "already completed", "HTTP 409")


def test_kill_several_reports_each_and_exits_with_the_first_failure(host):
    host.on("POST", "/api/kill/1", {"message": "killed"})
    host.on("POST", "/api/kill/2", error_reply(404, "not_found", "task 2 not found"))
    host.on("POST", "/api/kill/3", {"message": "killed"})
    result = host.invoke("task", "kill", "1", "2", "3")
    assert result.exit_code == 3
    assert result.stdout == "task 1: killed\ntask 3: killed\n"
    assert result.stderr.strip() == "Error: task 2: task 2 not found (HTTP 404)"


def test_task_list_against_a_host_loads_no_heavy_module():
    """A whole `kr task list` drawing a table, in a fresh process against a real HTTP server: none of the
    imports its 150 ms budget cannot afford (rich, http.client and the email package, ssl, fractions,
    attrs, httpx, trio)."""
    import subprocess
    import sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.path.startswith("/api/auth/me"):
                body = {"user_id": "1", "username": "alice", "role": "user"}
            else:
                body = {
                    "tasks": [record("11", "running", required_memory_bytes=1536 << 20)],
                    "has_more": False,
                }
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    code = (
        "import sys\n"
        "sys.argv = ['kr', 'task', 'list']\n"
        "from kohakuriver_cli.entry import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print('MODULES', ' '.join(sorted(sys.modules)))\n"
    )
    env = {
        "KOHAKURIVER_HOST": f"http://127.0.0.1:{server.server_address[1]}",
        "KOHAKURIVER_TOKEN": TOKEN,
        "PATH": "/usr/bin:/bin",
        "COLUMNS": "120",
    }
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
        )
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr
    table, _, modules = proc.stdout.partition("MODULES ")
    assert "11" in table and "python train.py" in table and "1.5 GiB" in table
    heavy = {"rich", "http.client", "email.parser", "ssl", "fractions", "attrs", "httpx", "trio"}
    assert not heavy & set(modules.split()), heavy & set(modules.split())


def test_submit_wait_against_a_host_loads_no_event_loop_nor_converter():
    """A whole `kr task submit --wait` in a fresh process, against a real HTTP server that also upgrades the
    log WebSockets: the output arrives, the exit code is the task's, and neither trio (the follow reads its
    sockets in threads) nor the converter and cattrs (the body is written from the validated spec) load."""
    import base64
    import hashlib
    import socket
    import struct
    import subprocess
    import sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    reads: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def reply(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.reply({"task_ids": ["7"], "message": "queued"})

        def do_GET(self) -> None:
            if self.path.startswith("/api/status/7"):
                reads.append(self.path)
                final = len(reads) > 1
                self.reply(record("7", "failed" if final else "running", exit_code=4 if final else None))
                return
            key = self.headers["Sec-WebSocket-Key"].encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", base64.b64encode(hashlib.sha1(key).digest()).decode())
            self.end_headers()
            out = b"out \xff\n" if "stream=stdout" in self.path else b"err\n"
            self.wfile.write(bytes((0x82, len(out))) + out)  # one binary message
            reason = b"task failed"
            self.wfile.write(bytes((0x88, 2 + len(reason))) + struct.pack(">H", 1000) + reason)
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.close_connection = True

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    code = (
        "import sys\n"
        "sys.argv = ['kr', 'task', 'submit', '--wait', '--', 'sh', '-c', 'work']\n"
        "from kohakuriver_cli import entry\n"
        "from kohakuriver_cli.entry import main\n"
        # the fast path ends with os._exit: make it a SystemExit, so the loaded modules can be listed
        "def done(code):\n    sys.stdout.flush()\n    raise SystemExit(code)\n"
        "entry._done = done\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
        "sys.stderr.write('MODULES ' + ' '.join(sorted(sys.modules)) + ' CODE ' + str(code))\n"
    )
    env = {
        "KOHAKURIVER_HOST": f"http://127.0.0.1:{server.server_address[1]}",
        "KOHAKURIVER_TOKEN": TOKEN,
        "PATH": "/usr/bin:/bin",
    }
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    stderr, _, rest = proc.stderr.partition(b"MODULES ")
    modules, _, exit_code = rest.decode().partition(" CODE ")
    assert proc.stdout == b"out \xff\n"
    assert stderr == b"err\n" and exit_code == "4"
    heavy = {"trio", "trio_websocket", "wsproto", "cattrs", "kohakuriver_proto.converter", "httpx", "ssl"}
    assert not heavy & set(modules.split()), heavy & set(modules.split())
