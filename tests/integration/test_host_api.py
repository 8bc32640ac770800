"""The host's HTTP API against a real ``serve_host``: the auth matrix over every route, input validation,
submit refusals, listing, users and tokens. Every error answer must be JSON ``{error, message, field}``."""

from __future__ import annotations

import itertools
import json

import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from kohakuriver_host.app import create_app
from kohakuriver_proto.converter import structure
from kohakuriver_proto.models import NodeInfo, TaskRecord

from ._host_harness import running_host


@pytest.fixture
async def host(tmp_path, monkeypatch):
    monkeypatch.setenv("KOHAKURIVER_HOME", str(tmp_path))
    async with running_host(tmp_path) as h:
        yield h


def assert_error(r, status: int, field: str | None = "any") -> dict:
    assert r.status_code == status, f"{r.status_code} {r.text}"
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error", "message", "field"}, body
    assert isinstance(body["message"], str) and body["message"]
    if field != "any":
        assert body["field"] == field, body
    return body


# -- the auth matrix ---------------------------------------------------------------------------------------

WHO = ("none", "garbage", "cluster", "viewer", "owner", "other", "operator", "admin")
PUBLIC = dict.fromkeys(WHO, 200)
ANY_USER = {"none": 401, "garbage": 401, "cluster": 401, **dict.fromkeys(WHO[3:], 200)}
RUNNER = {**dict.fromkeys(WHO, 401), "cluster": 200}
OWN_VIEW = {**ANY_USER, "viewer": 404, "other": 404}


def _with(base: dict, **changes: int) -> dict:
    return {**base, **changes}


#: (method, rule) -> expected status per caller. "owner" owns the task (or token) the route is called on.
MATRIX = {
    ("GET", "/api/health"): PUBLIC,
    ("DELETE", "/api/nodes/<hostname>"): _with(
        ANY_USER, viewer=403, owner=403, other=403, operator=403, admin=409
    ),
    ("GET", "/api/overlay"): ANY_USER,
    ("GET", "/api/overlay/status"): ANY_USER,
    ("POST", "/api/overlay/reserve"): _with(
        ANY_USER, viewer=403, owner=409, other=409, operator=409, admin=409
    ),
    ("DELETE", "/api/overlay/reservations/<what>"): _with(
        ANY_USER, viewer=403, owner=409, other=409, operator=409, admin=409
    ),
    ("GET", "/api/auth/me"): ANY_USER,
    ("GET", "/api/auth/tokens"): ANY_USER,
    ("POST", "/api/auth/tokens"): _with(ANY_USER, viewer=201, owner=201, other=201, operator=201, admin=201),
    ("DELETE", "/api/auth/tokens/<token_id>"): _with(ANY_USER, viewer=404, other=404, operator=404),
    ("GET", "/api/auth/users"): _with(ANY_USER, viewer=403, owner=403, other=403),
    ("POST", "/api/auth/users"): _with(ANY_USER, viewer=403, owner=403, other=403, operator=403, admin=201),
    ("POST", "/api/submit"): _with(ANY_USER, viewer=403, owner=202, other=202, operator=202, admin=202),
    ("GET", "/api/tasks"): ANY_USER,
    ("GET", "/api/status/<task_id>"): OWN_VIEW,
    ("POST", "/api/kill/<task_id>"): OWN_VIEW,
    # The task is queued, so pause/resume are refused as conflicts, but only after auth let the caller in.
    ("POST", "/api/command/<task_id>/pause"): _with(OWN_VIEW, owner=409, operator=409, admin=409),
    ("POST", "/api/command/<task_id>/resume"): _with(OWN_VIEW, owner=409, operator=409, admin=409),
    ("GET", "/api/tasks/<task_id>/stdout"): OWN_VIEW,
    ("GET", "/api/tasks/<task_id>/stderr"): OWN_VIEW,
    ("WS", "/ws/tasks/<task_id>/logs"): OWN_VIEW,
    ("POST", "/api/vps/create"): _with(ANY_USER, viewer=403, owner=202, other=202, operator=202, admin=202),
    ("GET", "/api/vps"): ANY_USER,
    ("GET", "/api/vps/<task_id>"): OWN_VIEW,
    # The VPS is queued: stop works (a fresh one per call), the rest conflict with its state, after auth.
    ("POST", "/api/vps/<task_id>/stop"): OWN_VIEW,
    ("POST", "/api/vps/<task_id>/restart"): _with(OWN_VIEW, owner=409, operator=409, admin=409),
    ("POST", "/api/vps/<task_id>/pause"): _with(OWN_VIEW, owner=409, operator=409, admin=409),
    ("POST", "/api/vps/<task_id>/resume"): _with(OWN_VIEW, owner=409, operator=409, admin=409),
    ("GET", "/api/vps/<task_id>/snapshots"): OWN_VIEW,
    # Never placed, so no runner has made its host key yet.
    ("GET", "/api/vps/<task_id>/host-key"): _with(OWN_VIEW, owner=409, operator=409, admin=409),
    ("POST", "/api/vps/<task_id>/snapshots"): _with(OWN_VIEW, owner=409, operator=409, admin=409),
    # Never placed, so it has no snapshot to delete.
    ("DELETE", "/api/vps/<task_id>/snapshots/<timestamp>"): _with(
        OWN_VIEW, owner=404, operator=404, admin=404
    ),
    # Never placed, so it has no snapshot to restore.
    ("POST", "/api/vps/<task_id>/snapshots/<timestamp>/restore"): _with(
        OWN_VIEW, owner=404, operator=404, admin=404
    ),
    ("GET", "/api/vm/images"): ANY_USER,
    ("GET", "/api/vm/instances"): _with(ANY_USER, viewer=403, owner=403, other=403),
    # Admins only; n1's runner address answers nothing, so the removal itself is a 503.
    ("DELETE", "/api/vm/instances/<node>/<task_id>"): _with(
        ANY_USER, viewer=403, owner=403, other=403, operator=403, admin=503
    ),
    # A forward session refuses an unknown, someone else's or a stopped task *on* the WebSocket (1008, after
    # the upgrade, because that is what the CLI reads); only a missing or bad token is refused before it.
    ("WS", "/ws/forward/<task_id>/<port>"): ANY_USER,
    ("WS", "/ws/terminal/<task_id>"): ANY_USER,
    ("GET", "/api/nodes"): ANY_USER,
    ("GET", "/api/nodes/<hostname>"): ANY_USER,
    ("POST", "/api/register"): RUNNER,
    ("PUT", "/api/heartbeat/<hostname>"): RUNNER,
    ("POST", "/api/update"): RUNNER,
}


def app_routes() -> set[tuple[str, str]]:
    routes = set()
    for rule in create_app(None).url_map.iter_rules():
        if rule.websocket:
            routes.add(("WS", rule.rule))
            continue
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routes.add((method, rule.rule))
    return routes


def test_the_matrix_covers_every_route():
    # A new endpoint without a row here fails this test: nobody can add a route and forget its auth.
    assert app_routes() == set(MATRIX)


_names = itertools.count()


async def test_auth_matrix(host):
    tokens = {
        "none": None,
        "garbage": "krt_" + "x" * 43,
        "cluster": host.cluster_token,
        "viewer": await host.create_user("vic", "viewer"),
        "owner": await host.create_user("alice", "user"),
        "other": await host.create_user("bob", "user"),
        "operator": await host.create_user("olga", "operator"),
        "admin": host.admin_token,
    }
    # A node without Docker: tasks targeted at it stay queued, so nothing is ever dispatched.
    await host.register("n1", "http://127.0.0.1:9", docker=False)
    heartbeat = {"running_tasks": [], "docker_available": False}
    registration = {
        "hostname": "n1",
        "url": "http://127.0.0.1:9",
        "total_cores": 8,
        "memory_total_bytes": 1 << 34,
        "docker_available": False,
    }

    async def alice_task() -> str:
        (task_id,) = await host.submit(tokens["owner"], command="sleep", targets=["n1"])
        return task_id

    async def alice_token() -> int:
        return (await host.ok("POST", "/api/auth/tokens", tokens["owner"], json={"name": "t"}))["id"]

    async def alice_vps() -> str:
        r = await host.call("POST", "/api/vps/create", tokens["owner"], json={"target": "n1"})
        assert r.status_code == 202, r.text
        return r.json()["task_id"]

    shared_task = await alice_task()
    shared_vps = await alice_vps()

    async def probe(method: str, rule: str, who: str) -> int:
        token = tokens[who]
        kwargs: dict = {}
        path = rule
        if rule.startswith("/api/vps/<task_id>"):
            vps_id = await alice_vps() if rule.endswith("/stop") else shared_vps
            path = rule.replace("<task_id>", vps_id).replace("<timestamp>", "1700000000")
        elif "<task_id>" in rule:
            task_id = await alice_task() if rule.startswith("/api/kill") else shared_task
            path = rule.replace("<task_id>", task_id)
        if "<token_id>" in rule:
            path = rule.replace("<token_id>", str(await alice_token()))
        path = path.replace("<hostname>", "n1").replace("<node>", "n1").replace("<port>", "22")
        if rule == "/api/auth/tokens" and method == "POST":
            kwargs["json"] = {"name": "probe"}
        elif rule == "/api/auth/users" and method == "POST":
            kwargs["json"] = {"username": f"u{next(_names)}", "role": "user"}
        elif rule == "/api/submit":
            kwargs["json"] = {"command": "true", "targets": ["n1"]}
        elif rule == "/api/vps/create":
            kwargs["json"] = {"target": "n1"}
        elif rule == "/api/register":
            kwargs["json"] = registration
        elif rule.startswith("/api/heartbeat"):
            kwargs["json"] = heartbeat
        elif rule == "/api/update":
            kwargs["json"] = {"task_id": shared_task, "status": "pending"}
        elif rule == "/api/overlay/reserve":
            kwargs["json"] = {"node": "n1"}
        if method == "WS":
            url = host.handle.url.replace("http", "ws", 1) + path
            headers = [(b"Authorization", f"Bearer {token}".encode())] if token else []
            try:
                async with open_websocket_url(url, extra_headers=headers):
                    return 200
            except ConnectionRejected as exc:
                body = json.loads(exc.body)
                assert set(body) == {"error", "message", "field"}, body
                return exc.status_code
        r = await host.call(method, path, token, **kwargs)
        if r.status_code >= 400:
            assert_error(r, r.status_code)
        if r.status_code == 401:
            assert r.headers.get("www-authenticate") == "Bearer"
        return r.status_code

    failures = []
    for (method, rule), expected in MATRIX.items():
        for who in WHO:
            got = await probe(method, rule, who)
            if got != expected[who]:
                failures.append(f"{method} {rule} as {who}: {got}, expected {expected[who]}")
    assert not failures, "\n".join(failures)


async def test_revoked_and_inactive_tokens_and_wrong_schemes_are_refused(host):
    created = await host.ok("POST", "/api/auth/tokens", json={"name": "laptop"})
    assert created["token"].startswith("krt_")
    assert (await host.ok("GET", "/api/auth/me", created["token"]))["username"] == "admin"
    listed = await host.ok("GET", "/api/auth/tokens")
    assert {t["name"] for t in listed} >= {"laptop"}
    assert all("token" not in t and "token_hash" not in t for t in listed)
    await host.ok("DELETE", f"/api/auth/tokens/{created['id']}")
    assert_error(await host.call("GET", "/api/auth/me", created["token"]), 401)
    assert_error(await host.call("DELETE", f"/api/auth/tokens/{created['id']}"), 409)
    assert_error(await host.call("DELETE", "/api/auth/tokens/abc"), 404)
    assert_error(await host.call("DELETE", "/api/auth/tokens/999999"), 404)
    for header in ("Basic YWRtaW46YWRtaW4=", "Bearer", "Bearer " + host.cluster_token, host.admin_token):
        r = await host.http.get("/api/auth/me", headers={"Authorization": header})
        assert_error(r, 401)


async def test_admin_secret_acts_as_the_first_admin(tmp_path, monkeypatch):
    monkeypatch.setenv("KOHAKURIVER_HOME", str(tmp_path))
    secret = "s3cret-admin-value-0123456789"
    async with running_host(tmp_path, ADMIN_SECRET=secret) as h:
        me = await h.ok("GET", "/api/auth/me", secret)
        assert me == {"user_id": 1, "username": "admin", "role": "admin"}
        assert_error(await h.call("GET", "/api/auth/me", secret + "x"), 401)


# -- users -------------------------------------------------------------------------------------------------


async def test_users_create_and_validate(host):
    body = await host.ok("POST", "/api/auth/users", json={"username": "carol", "role": "operator"})
    assert body["user"]["username"] == "carol" and body["user"]["role"] == "operator"
    assert (await host.ok("GET", "/api/auth/me", body["token"]))["role"] == "operator"
    assert {u["username"] for u in await host.ok("GET", "/api/auth/users")} == {"admin", "carol"}
    assert_error(await host.call("POST", "/api/auth/users", json={"username": "carol"}), 409, "username")
    assert_error(
        await host.call("POST", "/api/auth/users", json={"username": "x", "role": "god"}), 422, "role"
    )
    assert_error(await host.call("POST", "/api/auth/users", json={"username": "-bad"}), 422, "username")
    assert_error(await host.call("POST", "/api/auth/users", json={"role": "user"}), 422, "username")
    assert_error(await host.call("POST", "/api/auth/users", json={"username": "d", "rol": "x"}), 422, "rol")
    assert_error(await host.call("POST", "/api/auth/users", json=[1]), 422, "body")
    assert_error(await host.call("POST", "/api/auth/tokens", json={"name": ""}), 422, "name")


# -- submit validation and refusals ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({}, "command"),
        ({"command": "echo", "required_cores": "2"}, "required_cores"),
        ({"command": "echo", "required_cores": -1}, "required_cores"),
        ({"command": "echo", "required_core": 2}, "required_core"),
        ({"command": "echo", "env_vars": {"KOHAKURIVER_TASK_ID": "1"}}, "env_vars.KOHAKURIVER_TASK_ID"),
        ({"command": "echo", "arguments": "a b"}, "arguments"),
        ({"command": "echo", "arguments": ["ok", 3]}, "arguments[1]"),
        ({"command": "echo", "targets": ["ok", "bad host!"]}, "targets[1]"),
        ({"command": "echo", "targets": ["n1::0,0"]}, "targets[0]"),
        ({"command": "echo", "required_gpus": [0]}, "required_gpus"),
        ({"command": "echo", "required_memory_bytes": 1024}, "required_memory_bytes"),
        ({"command": "echo", "task_type": "vps"}, "task_type"),
        ({"command": "echo", "additional_mounts": ["relative:/x"]}, "additional_mounts[0]"),
    ],
)
async def test_invalid_specs_are_422_naming_the_field(host, spec, field):
    assert_error(await host.call("POST", "/api/submit", json=spec), 422, field)


async def test_malformed_bodies(host):
    for raw in (b"{", b"", b"\xff\xfe", b"NaN", b'{"command": "echo",}'):
        r = await host.call("POST", "/api/submit", content=raw, headers={"Content-Type": "application/json"})
        assert_error(r, 400, "body")
    assert_error(await host.call("POST", "/api/submit", json=["echo"]), 422, "body")
    r = await host.call("POST", "/api/submit", content=b"x" * (9 * 1024 * 1024))
    assert_error(r, 413)
    assert (await host.call("GET", "/api/auth/me")).status_code == 200  # the client is not stuck after it


async def test_privileged_and_mounts_need_an_operator(host):
    alice = await host.create_user("alice", "user")
    olga = await host.create_user("olga", "operator")
    r = await host.call("POST", "/api/submit", alice, json={"command": "id", "privileged": True})
    assert "operator" in assert_error(r, 403, "privileged")["message"]
    r = await host.call(
        "POST", "/api/submit", alice, json={"command": "ls", "additional_mounts": ["/:/host"]}
    )
    assert_error(r, 403, "additional_mounts")
    assert await host.submit(olga, command="id", privileged=True, additional_mounts=["/srv:/srv:ro"])


async def test_impossible_requests_are_refused_with_the_reason(host):
    # No node at all: an untargeted task waits (a runner may join), a named node must exist.
    body = await host.ok("POST", "/api/submit", json={"command": "echo"})
    assert "no node is registered" in body["message"]
    r = await host.call("POST", "/api/submit", json={"command": "echo", "targets": ["ghost"]})
    assert "unknown node 'ghost'" in assert_error(r, 400, "targets[0]")["message"]

    await host.register(
        "n1", "http://127.0.0.1:9", cores=4, memory=8 << 30, gpus=(0, 1), numa={"0": {"cores": [0, 1]}}
    )
    cases = [
        ({"required_cores": 64}, None, "cores"),
        ({"required_memory_bytes": 1 << 40}, None, "memory"),
        ({"targets": ["n1::5"]}, "targets[0]", "GPU 5"),
        ({"targets": ["n1:3"]}, "targets[0]", "NUMA node 3"),
        ({"targets": ["n1:0"], "required_cores": 3}, "targets[0]", "NUMA node 0"),
        ({"targets": ["n1", "nope"]}, "targets[1]", "unknown node 'nope'"),
    ]
    for extra, field, words in cases:
        r = await host.call("POST", "/api/submit", json={"command": "echo", **extra})
        body = assert_error(r, 400, field)
        assert words in body["message"], body
    # Nothing was stored by a refused submit (all targets or none).
    tasks = (await host.ok("GET", "/api/tasks"))["tasks"]
    assert len(tasks) == 1


async def test_multi_target_submit_makes_one_task_each_with_a_batch(host):
    await host.register("n1", "http://127.0.0.1:9", cores=1, docker=False)
    await host.register("n2", "http://127.0.0.1:9", cores=1, numa={"0": {"cores": [0]}}, docker=False)
    r = await host.call(
        "POST", "/api/submit", json={"command": "hostname", "targets": ["n1", "n2"], "required_cores": 4}
    )
    assert_error(r, 400, "targets[0]")
    body = await host.ok(
        "POST", "/api/submit", json={"command": "hostname", "targets": ["n1", "n2:0"], "required_cores": 0}
    )
    assert len(body["task_ids"]) == 2 and all(t.isdigit() for t in body["task_ids"])
    records = [await host.task(t) for t in body["task_ids"]]
    assert records[0]["batch_id"] == records[1]["batch_id"] == body["task_ids"][0]
    assert [r["target"] for r in records] == ["n1", "n2:0"]


# -- reading tasks -----------------------------------------------------------------------------------------


async def test_status_unknown_and_malformed_ids(host):
    for bad in ("abc", "-1", "1.5", "99999999999999999999", "123"):
        assert_error(await host.call("GET", f"/api/status/{bad}"), 404)
        assert_error(await host.call("POST", f"/api/kill/{bad}"), 404)
    assert_error(await host.call("GET", "/api/no/such/route"), 404)
    assert_error(await host.call("DELETE", "/api/submit"), 405)


async def test_status_long_poll_validates_wait_and_since(host):
    (task_id,) = await host.submit()
    for query, field in [
        ("wait=x&since=pending", "wait"),
        ("wait=-1&since=pending", "wait"),
        ("wait=1e3&since=pending", "wait"),
        ("wait=nan&since=pending", "wait"),
        ("wait=1&since=bogus", "since"),
        ("since=PENDING", "since"),
    ]:
        assert_error(await host.call("GET", f"/api/status/{task_id}?{query}"), 400, field)
    # Without ``since`` (or with wait=0) it is the plain read; a wait above the cap is capped, not refused;
    # a ``since`` the task is no longer in answers at once.
    for query in ("wait=5", "since=pending", "since=pending&wait=0", "since=running&wait=100", "wait=.5"):
        with trio.fail_after(2):
            record = await host.ok("GET", f"/api/status/{task_id}?{query}")
        assert record["task_id"] == task_id and record["status"] == "pending"  # the record, as it is


async def test_status_long_poll_answers_when_the_status_changes(host):
    alice = await host.create_user("alice", "user")
    (task_id,) = await host.submit(alice)
    answers: list[tuple[float, dict]] = []

    async def long_poll(token: str) -> None:
        started = trio.current_time()
        record = await host.ok("GET", f"/api/status/{task_id}?since=pending&wait=20", token)
        answers.append((trio.current_time() - started, record))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(long_poll, alice)
        nursery.start_soon(long_poll, "admin")
        await trio.sleep(0.5)
        assert answers == []  # both held: the task is still pending
        # Others' tasks cannot be waited on any more than read: 404 at once, not a hold.
        bob = await host.create_user("bob", "user")
        with trio.fail_after(2):
            assert_error(await host.call("GET", f"/api/status/{task_id}?since=pending&wait=20", bob), 404)
        await host.ok("POST", f"/api/kill/{task_id}", alice)
    assert len(answers) == 2
    for waited, record in answers:
        assert 0.5 <= waited < 5, waited
        assert record["status"] == "killed" and record == await host.task(task_id)


async def test_status_long_poll_times_out_with_the_unchanged_record(host):
    (task_id,) = await host.submit()
    started = trio.current_time()
    record = await host.ok("GET", f"/api/status/{task_id}?since=pending&wait=0.4")
    assert 0.4 <= trio.current_time() - started < 3
    assert record["task_id"] == task_id and record["status"] == "pending"
    # An unknown task is 404 at once, never held.
    with trio.fail_after(2):
        assert_error(await host.call("GET", "/api/status/123?since=pending&wait=5"), 404)


async def test_list_filters_paging_and_ownership(host):
    alice = await host.create_user("alice", "user")
    bob = await host.create_user("bob", "user")
    a_ids = [(await host.submit(alice, command="echo", name=f"a{i}"))[0] for i in range(5)]
    b_ids = await host.submit(bob, command="echo")
    await host.ok("POST", f"/api/kill/{a_ids[0]}", alice)

    listed = await host.ok("GET", "/api/tasks", alice)
    assert [t["task_id"] for t in listed["tasks"]] == a_ids[::-1]  # newest first, only her own
    assert listed["has_more"] is False
    assert (await host.ok("GET", "/api/tasks?owner=bob", alice))["tasks"] == []
    everything = await host.ok("GET", "/api/tasks")
    assert {t["task_id"] for t in everything["tasks"]} == {*a_ids, *b_ids}
    assert [t["task_id"] for t in (await host.ok("GET", "/api/tasks?owner=bob"))["tasks"]] == b_ids
    assert (await host.ok("GET", "/api/tasks?owner=nobody"))["tasks"] == []
    killed = await host.ok("GET", "/api/tasks?status=killed")
    assert [t["task_id"] for t in killed["tasks"]] == [a_ids[0]]
    both = await host.ok("GET", "/api/tasks?status=killed,pending&owner=alice")
    assert len(both["tasks"]) == 5
    page = await host.ok("GET", "/api/tasks?owner=alice&limit=2&offset=1")
    assert [t["task_id"] for t in page["tasks"]] == a_ids[::-1][1:3] and page["has_more"] is True
    assert (await host.ok("GET", "/api/tasks?task_type=vps"))["tasks"] == []
    assert (await host.ok("GET", "/api/tasks?node=n1"))["tasks"] == []
    for query, field in [
        ("limit=0", "limit"),
        ("limit=x", "limit"),
        ("limit=100000", "limit"),
        ("offset=-1", "offset"),
        ("status=bogus", "status"),
        ("task_type=job", "task_type"),
        ("node=bad%20name", "node"),
    ]:
        assert_error(await host.call("GET", f"/api/tasks?{query}"), 400, field)
    structure(everything["tasks"], list[TaskRecord])  # the list is made of valid records
    record = await host.task(a_ids[1])
    assert record["owner"] == "alice" and record["status"] == "pending" and record["name"] == "a1"
    assert structure(record, TaskRecord).owner_id == (await host.ok("GET", "/api/auth/me", alice))["user_id"]
    assert not any(k.startswith("dispatch") for k in record)  # host bookkeeping stays inside


async def test_kill_is_409_once_final(host):
    (task_id,) = await host.submit()
    killed = await host.ok("POST", f"/api/kill/{task_id}")
    assert killed["status"] == "killed"
    record = await host.task(task_id)
    assert (
        record["status"] == "killed"
        and record["completed_at"]
        and "killed by admin" in record["status_message"]
    )
    assert_error(await host.call("POST", f"/api/kill/{task_id}"), 409)
    # A task that never ran has no output, which is an empty answer, not an error.
    r = await host.call("GET", f"/api/tasks/{task_id}/stdout?lines=10")
    assert r.status_code == 200 and r.text == ""
    assert_error(await host.call("GET", f"/api/tasks/{task_id}/stdout?lines=x"), 400, "lines")


async def test_health_and_nodes(host):
    r = await host.http.get("/api/health")
    body = r.json()
    assert body == {
        "status": "ok",
        "nodes_online": 0,
        "nodes_total": 0,
        "version": body["version"],
        "ssh_proxy_port": host.handle.ssh_proxy_port,
    }
    await host.register("n1", "http://127.0.0.1:9", gpus=(0,), docker=False)
    node = await host.ok("GET", "/api/nodes/n1")
    assert node["docker_available"] is False and "docker.sock" in node["docker_error"]
    assert node["available_cores"] == 8 and node["gpus_in_use"] == [] and node["status"] == "online"
    assert (await host.http.get("/api/health")).json()["nodes_online"] == 1
    assert_error(await host.call("GET", "/api/nodes/ghost"), 404)
    await host.register("n2", "http://127.0.0.1:9", numa={"0": {"cores": [0, 1], "memory_bytes": 1 << 30}})
    nodes = await host.ok("GET", "/api/nodes")
    assert [n["hostname"] for n in nodes] == ["n1", "n2"]
    assert structure(nodes, list[NodeInfo])[1].numa_topology[0].memory_bytes == 1 << 30
    assert nodes[0] == await host.ok("GET", "/api/nodes/n1")  # the fast list and the single view agree


async def test_many_runners_heartbeating_at_once(host):
    names = [f"r{i:03d}" for i in range(60)]
    for name in names:
        await host.register(name, "http://127.0.0.1:9")
    statuses = []

    async def beat(name):
        statuses.append((await host.heartbeat(name)).status_code)

    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(beat, name)
        nursery.start_soon(beat, "unknown-node")
    assert sorted(statuses) == [200] * 60 + [404]
    assert (await host.http.get("/api/health")).json()["nodes_online"] == 60


async def test_runner_endpoints_validate_their_input(host):
    token = host.cluster_token
    r = await host.call(
        "POST",
        "/api/register",
        token,
        json={"hostname": "n1", "url": "ftp://x", "total_cores": 1, "memory_total_bytes": 1},
    )
    assert_error(r, 422, "url")
    r = await host.call(
        "POST", "/api/register", token, json={"hostname": "n1", "url": "http://x:1", "memory_total_bytes": 1}
    )
    assert_error(r, 422, "total_cores")
    assert_error(await host.call("PUT", "/api/heartbeat/ghost", token, json={}), 404)
    assert_error(await host.call("PUT", "/api/heartbeat/bad..name!", token, json={}), 404)
    await host.register("n1", "http://127.0.0.1:9")
    r = await host.call("PUT", "/api/heartbeat/n1", token, json={"running_tasks": ["x"]})
    assert_error(r, 422, "running_tasks[0]")
    r = await host.call("POST", "/api/update", token, json={"task_id": "1", "status": "exploded"})
    assert_error(r, 422, "status")
    assert await host.update("12345", "running") == {"accepted": False}  # unknown task: ignored, not fatal
    r = await host.call("PUT", "/api/heartbeat/n1", token, content=b"{not json")
    assert_error(r, 400, "body")
    big = b'{"running_tasks": [' + b'"1",' * (3 << 20) + b'"1"]}'
    assert_error(await host.call("PUT", "/api/heartbeat/n1", token, content=big), 413)
    r = await host.call("PUT", "/api/heartbeat/n1", token, json={"running_tasks": []})
    assert r.status_code == 200 and r.json() == {"kill": []}


async def test_websocket_refusals_are_json(host):
    url = host.handle.url.replace("http", "ws", 1)
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(f"{url}/ws/tasks/123/logs"):
            pass
    assert info.value.status_code == 401
    headers = [(b"Authorization", f"Bearer {host.admin_token}".encode())]
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(f"{url}/ws/tasks/123/logs", extra_headers=headers):
            pass
    assert info.value.status_code == 404
    (task_id,) = await host.submit()
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(f"{url}/ws/tasks/{task_id}/logs?stream=both", extra_headers=headers):
            pass
    assert info.value.status_code == 400 and json.loads(info.value.body)["field"] == "stream"
    # A queued task's follow waits for it; killing it ends the socket cleanly.
    async with open_websocket_url(f"{url}/ws/tasks/{task_id}/logs", extra_headers=headers) as ws:
        await host.ok("POST", f"/api/kill/{task_id}")
        with trio.fail_after(5):
            with pytest.raises(Exception) as closed:
                await ws.get_message()
        assert getattr(closed.value, "reason", None) is not None and closed.value.reason.code == 1000
