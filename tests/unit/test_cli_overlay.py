"""``kr overlay status|reserve|release``, ``--ip-token`` on ``kr task submit`` and ``kr vps create``, the
overlay address in ``kr task status``, and ``kr node remove`` (``FakeHost``, no server)."""

from __future__ import annotations

import json

from . import test_cli_client
from .test_cli_client import assert_one_line_error, error_reply
from .test_cli_lazy import _modules_after

kr_home = test_cli_client.kr_home
host = test_cli_client.host

TOKEN = "eyJwYXlsb2FkIjoxfQ." + "A" * 43
RESERVATION = {
    "token": TOKEN,
    "ip": "10.128.127.254",
    "node": "n1",
    "expires_at": "2027-01-15T08:05:00Z",
    "used_by": None,
}
VIEW = {
    "enabled": True,
    "mode": "mesh",
    "subnet": "10.128.0.0/12/6/14",
    "host_overlay_address": "10.128.0.1/12",
    "runners": [
        {
            "runner_id": 1, "hostname": "n1", "subnet": "10.128.64.0/18", "link": "vxkr1",
            "underlay_address": "192.0.2.11", "active": True, "last_seen": "2027-01-15T08:00:00Z",
        },
        {
            "runner_id": 2, "hostname": "n2", "subnet": "10.128.128.0/18", "link": "vxkr2",
            "underlay_address": "192.0.2.12", "active": False, "last_seen": None,
        },
    ],
    "reservations": [RESERVATION, {**RESERVATION, "ip": "10.128.127.253", "used_by": "4242"}],
}  # fmt: skip


def test_reserve_prints_the_token_alone(host):
    host.on("POST", "/api/overlay/reserve", RESERVATION, status=201)
    result = host.invoke("overlay", "reserve", "-n", "n1")
    assert result.exit_code == 0, result.output
    assert result.stdout == TOKEN + "\n"
    assert "reserved 10.128.127.254 on n1 until" in result.stderr
    assert host.body("POST", "/api/overlay/reserve") == {"node": "n1", "ttl_seconds": 300}

    result = host.invoke("overlay", "reserve", "-n", "n1", "--ip", "10.128.64.9", "--ttl", "900")
    assert result.exit_code == 0, result.output
    assert host.body("POST", "/api/overlay/reserve") == {
        "node": "n1",
        "ttl_seconds": 900,
        "ip": "10.128.64.9",
    }

    result = host.invoke("overlay", "reserve", "-n", "n1", "--json")
    assert json.loads(result.stdout) == RESERVATION


def test_reserve_refuses_bad_options_before_asking(host):
    for args, hint in (
        (["--ip", "10.128.64.300"], "--ip"),
        (["--ttl", "5"], "--ttl"),
        (["--ttl", "4000"], "--ttl"),
    ):
        result = host.invoke("overlay", "reserve", "-n", "n1", *args)
        assert result.exit_code == 2 and hint in result.stderr, result.output
    result = host.invoke("overlay", "reserve", "-n", "bad name")
    assert result.exit_code == 2 and "--node" in result.stderr
    assert host.invoke("overlay", "reserve").exit_code == 2  # -n is required
    assert host.requests == []


def test_reserve_refused_by_the_host_is_one_line(host):
    host.on(
        "POST",
        "/api/overlay/reserve",
        error_reply(409, "conflict", "10.128.64.9 on node n1 is in use by task 7"),
    )
    result = host.invoke("overlay", "reserve", "-n", "n1", "--ip", "10.128.64.9")
    assert_one_line_error(result, 1, "in use by task 7")


def test_release_by_token_or_address(host):
    path = f"/api/overlay/reservations/{TOKEN}"
    host.on(
        "DELETE", path, {"ip": "10.128.127.254", "node": "n1", "message": "released 10.128.127.254 on n1"}
    )
    result = host.invoke("overlay", "release", TOKEN)
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and "released 10.128.127.254 on n1" in result.stderr
    host.on(
        "DELETE", "/api/overlay/reservations/10.128.127.254", error_reply(409, "conflict", "in use by task 9")
    )
    assert_one_line_error(host.invoke("overlay", "release", "10.128.127.254"), 1, "in use by task 9")
    assert host.invoke("overlay", "release", "a/b").exit_code == 2


def test_status_shows_runners_reservations_and_task_addresses(host):
    host.on("GET", "/api/overlay", VIEW)
    tasks = [
        {"task_id": "4242", "task_type": "vps", "name": "db", "assigned_node": "n1", "status": "running",
         "overlay_ip": "10.128.127.253"},
        {"task_id": "4243", "task_type": "command", "name": None, "assigned_node": "n2", "status": "pending",
         "overlay_ip": None},
    ]  # fmt: skip
    host.on("GET", "/api/tasks", {"tasks": tasks, "limit": 1000, "offset": 0, "has_more": False})
    result = host.invoke("overlay", "status", COLUMNS="200")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for fragment in ("mesh", "10.128.0.0/12/6/14", "10.128.0.1/12", "vxkr1", "192.0.2.12", "10.128.128.0/18"):
        assert fragment in out, fragment
    n2 = next(line for line in out.splitlines() if "vxkr2" in line)
    assert "no" in n2
    assert "when the task ends" in out and "4242" in out
    assert TOKEN not in out  # tokens only with --json
    task_lines = [line for line in out.splitlines() if "4242" in line and "db" in line]
    assert task_lines and "10.128.127.253" in task_lines[0]
    assert "4243" not in out  # no overlay address: not listed
    params = host.calls("GET", "/api/tasks")[0].url.params
    assert params["status"] == "pending,assigning,running,paused"

    result = host.invoke("overlay", "status", "--json")
    assert json.loads(result.stdout) == VIEW
    assert len(host.calls("GET", "/api/tasks")) == 1  # --json is the host's answer alone


def test_status_of_a_host_without_the_overlay(host):
    off = {"enabled": False, "mode": None, "subnet": None, "host_overlay_address": None}
    host.on("GET", "/api/overlay", {**off, "runners": [], "reservations": []})
    result = host.invoke("overlay", "status")
    assert result.exit_code == 0 and result.stdout == ""
    assert "off on this host" in result.stderr


def test_submit_and_create_carry_the_ip_token(host, tmp_path):
    host.on("POST", "/api/submit", {"task_ids": ["101"], "message": "1 task submitted"}, status=202)
    result = host.invoke("task", "submit", "--ip-token", TOKEN, "--", "true")
    assert result.exit_code == 0, result.output
    assert host.body("POST", "/api/submit")["ip_token"] == TOKEN
    result = host.invoke("task", "submit", "--ip-token", TOKEN, "-t", "n1", "-t", "n2", "--", "true")
    assert result.exit_code == 2 and "--ip-token" in result.stderr and "one target" in result.stderr
    result = host.invoke("task", "submit", "--ip-token", "not a token", "--", "true")
    assert result.exit_code == 2 and "--ip-token" in result.stderr
    assert len(host.calls("POST", "/api/submit")) == 1

    host.on("POST", "/api/vps/create", {"task_id": "202", "message": "VPS 202 created"}, status=202)
    result = host.invoke("vps", "create", "--no-ssh", "--ip-token", TOKEN)
    assert result.exit_code == 0, result.output
    assert host.body("POST", "/api/vps/create")["ip_token"] == TOKEN

    message = "the token reserves 10.128.127.254 on node n1, but the target is n2"
    refusal = error_reply(400, "invalid", message, "ip_token")
    host.on("POST", "/api/submit", refusal)
    result = host.invoke("task", "submit", "--ip-token", TOKEN, "-t", "n2", "--", "true")
    assert_one_line_error(result, 1, "ip_token: the token reserves 10.128.127.254 on node n1")


def test_task_status_shows_the_overlay_address(host):
    record = {
        "task_id": "101", "task_type": "command", "status": "running", "command": "true", "arguments": [],
        "assigned_node": "n1", "submitted_at": "2027-01-15T08:00:00Z", "overlay_ip": "10.128.64.2",
    }  # fmt: skip
    host.on("GET", "/api/status/101", record)
    result = host.invoke("task", "status", "101", COLUMNS="200")
    assert result.exit_code == 0, result.output
    assert "Overlay IP" in result.stdout and "10.128.64.2" in result.stdout


def test_node_remove(host):
    host.on(
        "DELETE",
        "/api/nodes/n1",
        {"hostname": "n1", "message": "node n1 removed; overlay runner id 1 released"},
    )
    result = host.invoke("node", "remove", "n1")
    assert result.exit_code == 0, result.output
    assert "overlay runner id 1 released" in result.stderr
    host.on(
        "DELETE", "/api/nodes/n2", error_reply(409, "conflict", "node n2 is online: stop its runner first")
    )
    assert_one_line_error(host.invoke("node", "remove", "n2"), 1, "is online")
    assert host.invoke("node", "remove", "bad name").exit_code == 2


def test_overlay_commands_load_only_their_module():
    loaded = _modules_after(["overlay", "release", "10.128.64.9"])
    heavy = {"httpx", "trio", "cryptography", "cattrs", "pyroute2"}
    heavy |= {f"kohakuriver_cli.{m}" for m in ("task_cmd", "vps_cmd", "daemon_cmd", "node_cmd")}
    assert "kohakuriver_cli.overlay_cmd" in loaded
    assert not heavy & loaded, heavy & loaded
