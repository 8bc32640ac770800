"""Port forwarding through `kr up`: host and runner in one process, so the host hands each forward session
to its runner in memory (``kohakuriver_host.local_runner``) instead of relaying it through a loopback
connection. Real `kr up`, `kr forward`, Docker, the Rust tunnel client and curl; the client must not be
able to tell the difference from the relayed path (``test_forward.py``).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from .cluster import running_cluster
from .forwarding import (
    ECHO_PORT,
    HTTP_PORT,
    Forward,
    check_closed_port_is_reported,
    check_refused_when_not_running,
    check_transfer_both_ways,
    connect,
    curl,
    echo_once,
    recv_exactly,
    start_service_task,
)

pytestmark = [pytest.mark.slow, pytest.mark.docker]


@pytest.fixture(scope="module")
def up_cluster(tmp_path_factory, test_image):
    with running_cluster(tmp_path_factory.mktemp("forward-up"), up=True) as c:
        yield c


@pytest.fixture(scope="module")
def up_task(up_cluster) -> str:
    return start_service_task(up_cluster)


def test_http_with_curl_goes_in_process(up_cluster, up_task):
    with Forward(up_cluster, up_task, HTTP_PORT) as fwd:
        proc = curl(f"http://127.0.0.1:{fwd.port}/index.html")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == b"hello through the forward\n"
    log = up_cluster.host.log_path.read_text(errors="replace")
    assert "open (in process)" in log, log[-3000:]
    assert "open (splice)" not in log


def test_transfer_both_ways_with_sha256(up_cluster, up_task, tmp_path):
    check_transfer_both_ways(up_cluster, up_task, 256 << 20, tmp_path)


def test_concurrent_connections_and_two_forward_processes(up_cluster, up_task):
    failures: list[str] = []

    def one(port: int, i: int) -> None:
        payload = os.urandom(2048) + b"\n"
        try:
            with connect(port, timeout=60) as sock:
                for _ in range(5):
                    sock.sendall(payload)
                    if recv_exactly(sock, len(payload)) != payload:
                        failures.append(f"connection {i}: wrong echo")
        except Exception as exc:
            failures.append(f"connection {i}: {exc!r}")

    with Forward(up_cluster, up_task, ECHO_PORT) as a, Forward(up_cluster, up_task, ECHO_PORT) as b:
        threads = [threading.Thread(target=one, args=((a, b)[i % 2].port, i)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not failures, failures[:5]


def test_refusals_are_the_runners_own(up_cluster, up_task):
    # The runner's checks answer through the handed-over connection, as they do through the host's relay.
    check_closed_port_is_reported(up_cluster, up_task)
    check_refused_when_not_running(up_cluster)


def test_sigterm_with_an_open_session_exits_0_promptly(tmp_path, test_image):
    with running_cluster(tmp_path, up=True) as c:
        task_id = start_service_task(c)
        fwd = Forward(c, task_id, ECHO_PORT)
        fwd.wait_ready()
        with connect(fwd.port) as sock:
            assert echo_once(fwd.port, b"hi\n") == b"hi\n"
            sock.sendall(b"open\n")
            assert recv_exactly(sock, 5) == b"open\n"
            t0 = time.monotonic()
            c.host.proc.send_signal(signal.SIGTERM)
            code = c.host.proc.wait(20)
            elapsed = time.monotonic() - t0
        assert code == 0, c.host.log()[-3000:]
        assert elapsed < 10, f"kr up took {elapsed:.1f}s to stop\n{c.host.log()[-3000:]}"
        fwd.stop()
