"""Port forwarding with a peer that speaks only the seed protocol (no HELLO, no flow control): it is slowed,
never cut, and no byte is lost (DESIGN section 11).

- A seed-protocol tunnel client serves the task's httpd in place of the injected Rust client, and real
  `kr forward` + curl download (and upload) 64 MiB files through it. The Rust client is stopped inside the
  container and ``seed_peers.py`` takes its place: it runs in the container's network namespace (busybox
  has no Python, so the test machine's interpreter enters the namespace with ``nsenter -n``), dials the
  services on the container's 127.0.0.1 and connects to the runner from the container's address with the
  container's secret, so the runner checks it exactly as it checks the Rust client.
- The mirror case: a seed-protocol forward client speaks to the host's ``/ws/forward`` route itself,
  against the normal Rust tunnel client (which speaks flow control).

The sender without flow control always outruns its receiver here (it writes as fast as loopback allows);
before the runner paused such senders these transfers were cut after a few MiB ("buffer overflow").
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio

from .cluster import Cluster, running_cluster, wait_until
from .forwarding import (
    HTTP_PORT,
    Forward,
    check_transfer_both_ways,
    container_pid,
    docker_exec,
    process_pid,
    rss_bytes,
    start_service_task,
)
from .seed_peers import forward_exchange

pytestmark = [pytest.mark.slow, pytest.mark.docker]

MIB = 1 << 20
SIZE = 64 * MIB
SEED_PEERS = Path(__file__).with_name("seed_peers.py")
#: How fast each download is read: a quarter of what the seed client sends on loopback, or less.
READ_RATE = "16M"
#: What the runner may grow by while all this goes through it: far less than one file, so that a runner
#: holding a transfer instead of pausing its sender shows (the bound is 1 MiB per connection).
RUNNER_GROWTH = 48 * MIB


@pytest.fixture(scope="module")
def legacy_cluster(tmp_path_factory, test_image):
    with running_cluster(tmp_path_factory.mktemp("forward-legacy")) as c:
        yield c


class SeedTunnelClient:
    """The seed-protocol tunnel client of ``seed_peers.py`` attached for the task's container, in place of
    the injected Rust client (stopped first, so that it does not reconnect and replace this one)."""

    def __init__(self, task_id: str) -> None:
        pids = docker_exec(task_id, "pidof", "tunnel-client").split()
        assert pids, "the runner injected no tunnel client"
        docker_exec(task_id, "kill", *pids)
        wait_until(lambda: not _pidof(task_id, "tunnel-client"), 10, "the Rust tunnel client to exit")
        env = _container_env(task_id)
        argv = [
            "nsenter", "-t", str(container_pid(task_id)), "-n", sys.executable, str(SEED_PEERS), "tunnel",
            env["KOHAKURIVER_TUNNEL_URL"], env["KOHAKURIVER_CONTAINER_ID"], env["KOHAKURIVER_TUNNEL_TOKEN"],
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.strip() == "attached", f"seed tunnel client: {line!r} {self.proc.stderr.read()}"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


def _pidof(task_id: str, name: str) -> bool:
    proc = subprocess.run(
        ["docker", "exec", f"kohakuriver-task-{task_id}", "pidof", name], capture_output=True, timeout=30
    )
    return proc.returncode == 0


def _container_env(task_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["docker", "inspect", "-f", "{{json .Config.Env}}", f"kohakuriver-task-{task_id}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return dict(item.split("=", 1) for item in json.loads(out.stdout))


def _runner_rss(cluster: Cluster) -> int:
    return rss_bytes(process_pid(next(iter(cluster.runners.values()))))


def _make_big_file(task_id: str) -> str:
    docker_exec(task_id, "dd", "if=/dev/urandom", "of=/tmp/www/big", f"bs={MIB}", f"count={SIZE // MIB}")
    return docker_exec(task_id, "sha256sum", "/tmp/www/big").split()[0]


def _download(port: int, results: list) -> None:
    digest = hashlib.sha256()
    size = 0
    # Read more slowly than the seed client sends (as over a real network), so the runner must hold it back.
    argv = ["curl", "-sS", "--fail", "--limit-rate", READ_RATE, f"http://127.0.0.1:{port}/big"]
    with subprocess.Popen(argv,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as curl:  # fmt: skip
        while chunk := curl.stdout.read(MIB):
            digest.update(chunk)
            size += len(chunk)
        error = curl.stderr.read()
    results.append((curl.returncode, size, digest.hexdigest(), error))


def test_downloads_and_an_upload_through_a_seed_protocol_tunnel_client(legacy_cluster, tmp_path):
    c = legacy_cluster
    task_id = start_service_task(c)
    client = SeedTunnelClient(task_id)
    try:
        remote_sum = _make_big_file(task_id)
        rss_before = _runner_rss(c)
        with Forward(c, task_id, HTTP_PORT) as fwd:
            # Three at once: the seed client's connections share its one WebSocket, which the runner stops
            # reading whenever one of them is a connection's bound ahead of `kr forward`.
            results: list = []
            threads = [threading.Thread(target=_download, args=(fwd.port, results)) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
        assert [r[:3] for r in results] == [(0, SIZE, remote_sum)] * 3, [r[3] for r in results]
        growth = _runner_rss(c) - rss_before
        assert growth < RUNNER_GROWTH, f"the runner grew by {growth / MIB:.0f} MiB"
        # An upload the other way (the CGI answers the sha256 of what it read), and one more download.
        check_transfer_both_ways(c, task_id, SIZE, tmp_path)
        assert client.proc.poll() is None, client.proc.stderr.read()  # never cut
    finally:
        client.close()
    c.kr("task", "kill", task_id)


def test_a_seed_protocol_forward_client_uploads_and_downloads(legacy_cluster):
    c = legacy_cluster
    task_id = start_service_task(c)  # served by the injected Rust tunnel client (flow control)
    url = f"ws://127.0.0.1:{c.host_port}/ws/forward/{task_id}/{HTTP_PORT}?proto=tcp"
    rss_before = _runner_rss(c)

    # Upload: the body goes out as fast as the WebSocket takes it; the CGI answers its sha256.
    sent = hashlib.sha256()

    def body():
        for _ in range(SIZE // (256 * 1024)):
            block = os.urandom(256 * 1024)
            sent.update(block)
            yield block

    head = b"POST /cgi-bin/sum HTTP/1.0\r\nContent-Type: application/octet-stream\r\n"
    request = head + b"Content-Length: %d\r\n\r\n" % SIZE
    answer = bytearray()
    trio.run(
        forward_exchange, url, c.admin_token, HTTP_PORT, itertools.chain([request], body()), answer.extend
    )
    assert sent.hexdigest().encode() in answer, bytes(answer[:300])

    # Download: the Rust client sends with flow control, the runner writes to the seed client unbounded by
    # credit but acknowledged as written.
    remote_sum = _make_big_file(task_id)
    response = bytearray()
    trio.run(forward_exchange, url, c.admin_token, HTTP_PORT, [b"GET /big HTTP/1.0\r\n\r\n"], response.extend)
    headers, _, content = bytes(response).partition(b"\r\n\r\n")
    assert headers.split(b" ", 2)[1] == b"200", headers[:200]
    assert len(content) == SIZE and hashlib.sha256(content).hexdigest() == remote_sum
    growth = _runner_rss(c) - rss_before
    assert growth < RUNNER_GROWTH, f"the runner grew by {growth / MIB:.0f} MiB"
    c.kr("task", "kill", task_id)
