"""Helpers for the port-forwarding end-to-end tests and benchmarks: a running `kr forward` process, the
services a busybox task container offers, and a UDP echo server inside a container's network namespace.

Everything is real: `kr forward` is the installed CLI, the services run in the task's container next to the
tunnel client the runner injected. The UDP echo is a Python process of the test machine that joins the
container's network namespace with `nsenter -n` (busybox has no UDP server): the tunnel client inside the
container sends its datagrams to 127.0.0.1 of that namespace, exactly as it would to a service in the image.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from .cluster import KR, Cluster, wait_until

HTTP_PORT = 8080
ECHO_PORT = 7000
FLOOD_PORT = 7001  # sends "y\n" for ever: the stalled-reader test never reads it
UDP_PORT = 5353
CLOSED_PORT = 6999  # nothing listens there
BURST_ECHO_PORT = 7002  # a TCP echo with a deep accept queue (``EchoInContainer``)

CGI = """#!/bin/sh
echo "Content-Type: text/plain"
echo
head -c "$CONTENT_LENGTH" | sha256sum
"""

#: The task's command: busybox httpd (a page, and a CGI answering the sha256 of the request body), a
#: persistent echo server and a flood server, then sleep. Each service listens on the container's
#: loopback or all addresses; none is published with Docker.
SERVICES = (
    "set -e; mkdir -p /tmp/www/cgi-bin; "
    "echo 'hello through the forward' > /tmp/www/index.html; "
    f"printf '%s' '{CGI}' > /tmp/www/cgi-bin/sum; chmod +x /tmp/www/cgi-bin/sum; "
    f"httpd -p 127.0.0.1:{HTTP_PORT} -h /tmp/www; "
    f"nc -ll -p {ECHO_PORT} -e cat & "
    f"nc -ll -p {FLOOD_PORT} -e yes & "
    "exec sleep 2147483647"
)


def start_service_task(cluster: Cluster, token: str | None = None) -> str:
    """A running task with ``SERVICES``, once its echo server listens (they start in the background of the
    task's shell)."""
    # -c 0: no core reserved, so several service tasks fit on a 2-core test machine at once.
    out = cluster.kr("task", "submit", "-c", "0", "--", "sh", "-c", SERVICES, token=token).stdout.split()
    assert len(out) == 1, out
    task_id = out[0]
    cluster.wait_status(task_id, "running")
    wait_until(lambda: str(ECHO_PORT) in docker_exec(task_id, "netstat", "-ltn"), 20,
               f"the echo server of task {task_id} to listen")  # fmt: skip
    return task_id


def check_closed_port_is_reported(cluster: Cluster, task_id: str) -> None:
    """A connection to a port nothing listens on closes, `kr forward` says why and keeps serving."""
    with Forward(cluster, task_id, CLOSED_PORT) as fwd:
        # An abort (reset) is an acceptable way to close it too.
        with connect(fwd.port, timeout=15) as sock, contextlib.suppress(ConnectionResetError):
            assert sock.recv(100) == b""
        wait_until(lambda: str(CLOSED_PORT) in fwd.stderr or "refused" in fwd.stderr.lower(), 10,
                   "kr forward to print why the connection closed")  # fmt: skip
        assert fwd.proc.poll() is None


def check_refused_when_not_running(cluster: Cluster) -> None:
    """`kr forward` to a task that already completed exits non-zero, saying so."""
    task_id = cluster.kr("task", "submit", "--", "true").stdout.split()[0]
    cluster.wait_status(task_id, "completed")
    fwd = Forward(cluster, task_id, ECHO_PORT)
    assert fwd.wait_exit(15) != 0
    assert "not running" in fwd.stderr.lower() or "completed" in fwd.stderr.lower(), fwd.stderr


def container_pid(task_id: str) -> int:
    out = subprocess.run(
        ["docker", "inspect", "-f", "{{.State.Pid}}", f"kohakuriver-task-{task_id}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(out.stdout.strip())


def docker_exec(task_id: str, *argv: str, timeout: float = 120) -> str:
    proc = subprocess.run(
        ["docker", "exec", f"kohakuriver-task-{task_id}", *argv],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, f"docker exec {argv}: {proc.returncode} {proc.stderr}"
    return proc.stdout


_UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(65535)
    s.sendto(data, addr)
"""


class UdpEchoInContainer:
    """A UDP echo server on 127.0.0.1:port inside the task container's network namespace."""

    SCRIPT = _UDP_ECHO

    def __init__(self, task_id: str, port: int = UDP_PORT) -> None:
        pid = container_pid(task_id)
        self.proc = subprocess.Popen(
            ["nsenter", "-t", str(pid), "-n", sys.executable, "-c", self.SCRIPT, str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", f"echo server did not start: {line!r} {self.proc.stderr.read()}"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


_TCP_ECHO = """
import socket, sys, threading
def serve(c):
    with c:
        while data := c.recv(65536):
            c.sendall(data)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(1024)
print("ready", flush=True)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""


class EchoInContainer(UdpEchoInContainer):
    """A TCP echo server on 127.0.0.1:port in the container's network namespace, with an accept queue deep
    enough for a burst of connections: busybox `nc -ll` accepts one connection per fork, with a short queue,
    and a burst of 200 connects overflows it (the kernel then drops the handshakes' last ACKs and the clients
    retransmit for many seconds), which would measure busybox, not the forward."""

    SCRIPT = _TCP_ECHO

    def __init__(self, task_id: str, port: int = BURST_ECHO_PORT) -> None:
        super().__init__(task_id, port)


class Forward:
    """A running `kr forward TASK PORT --local-port 0 ...`; ``port`` is the local port it printed."""

    LINE = re.compile(r"Forwarding \S*?:(\d+) ")

    def __init__(
        self, cluster: Cluster, task_id: str, remote_port: int, *extra: str, token: str | None = None
    ) -> None:
        env = dict(cluster.env)
        if token:
            env["KOHAKURIVER_TOKEN"] = token
        argv = [KR, "forward", task_id, str(remote_port), "--local-port", "0", *extra]
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        self.stdout: queue.Queue[str] = queue.Queue()
        self.stderr_lines: list[str] = []
        pumps = ((self.proc.stdout, self.stdout.put), (self.proc.stderr, self.stderr_lines.append))
        for stream, sink in pumps:
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True).start()
        self.port: int | None = None

    @staticmethod
    def _pump(stream, sink) -> None:
        for line in stream:
            sink(line)

    def wait_ready(self, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.stdout.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise AssertionError(f"kr forward exited {self.proc.returncode}: {self.stderr}") from None
                continue
            match = self.LINE.search(line)
            if match:
                self.port = int(match.group(1))
                return self.port
        raise AssertionError(f"kr forward printed no 'Forwarding' line within {timeout}s: {self.stderr}")

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def wait_exit(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(f"kr forward did not stop on SIGINT: {self.stderr}") from None
        return self.proc.returncode

    def __enter__(self) -> Forward:
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        code = self.stop()
        if exc[0] is None:
            assert code in (0, 130), f"kr forward exited {code} on SIGINT: {self.stderr}"


def curl(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--fail", *args], capture_output=True, timeout=timeout)


def check_transfer_both_ways(cluster: Cluster, task_id: str, nbytes: int, tmp_path: Path) -> None:
    """``nbytes`` of random data up and down through a forward to the task's httpd, checked by sha256."""
    mib = 1 << 20
    # Upload: a local random file POSTed to the CGI, which answers the sha256 of what it received.
    upload = tmp_path / "up.bin"
    digest = hashlib.sha256()
    with open(upload, "wb") as f:
        for _ in range(nbytes // (16 * mib)):
            block = os.urandom(16 * mib)
            digest.update(block)
            f.write(block)
    # Download: random data made inside the container, its sha256 computed there.
    docker_exec(task_id, "dd", "if=/dev/urandom", "of=/tmp/www/big", f"bs={mib}", f"count={nbytes // mib}")
    remote_sum = docker_exec(task_id, "sha256sum", "/tmp/www/big").split()[0]
    with Forward(cluster, task_id, HTTP_PORT) as fwd:
        # -T streams the file (--data-binary would load it into curl's memory); -X POST for the CGI.
        proc = curl("-T", str(upload), "-X", "POST", "-H", "Content-Type: application/octet-stream",
                    f"http://127.0.0.1:{fwd.port}/cgi-bin/sum")  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split()[0].decode() == digest.hexdigest()
        upload.unlink()

        down = hashlib.sha256()
        size = 0
        with subprocess.Popen(["curl", "-sS", "--fail", f"http://127.0.0.1:{fwd.port}/big"],
                              stdout=subprocess.PIPE) as curl_proc:  # fmt: skip
            while chunk := curl_proc.stdout.read(mib):
                down.update(chunk)
                size += len(chunk)
        assert curl_proc.returncode == 0
        assert size == nbytes
        assert down.hexdigest() == remote_sum
    docker_exec(task_id, "rm", "-f", "/tmp/www/big")


def connect(port: int, timeout: float = 20) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        data = sock.recv(min(n - len(chunks), 1 << 20))
        if not data:
            raise AssertionError(f"connection closed after {len(chunks)} of {n} bytes")
        chunks += data
    return bytes(chunks)


def echo_once(port: int, payload: bytes) -> bytes:
    with connect(port) as sock:
        sock.sendall(payload)
        return recv_exactly(sock, len(payload))


def wait_echo_works(port: int, timeout: float = 30, fwd: Forward | None = None) -> None:
    """New connections through the forward echo again (after a restart somewhere in the chain). With
    ``fwd``, a failure reports what that `kr forward` printed and whether it is still running."""

    def works() -> bool:
        return echo_once(port, b"ping\n") == b"ping\n"

    try:
        wait_until(works, timeout, f"an echo through local port {port}", interval=0.3)
    except AssertionError as exc:
        if fwd is None:
            raise
        status = fwd.proc.poll()
        raise AssertionError(f"{exc}; kr forward exit status {status}, stderr:\n{fwd.stderr}") from None


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def process_pid(daemon) -> int:
    assert daemon.proc is not None
    return daemon.proc.pid


__all__ = [
    "BURST_ECHO_PORT",
    "CLOSED_PORT",
    "ECHO_PORT",
    "FLOOD_PORT",
    "HTTP_PORT",
    "UDP_PORT",
    "EchoInContainer",
    "Forward",
    "UdpEchoInContainer",
    "check_closed_port_is_reported",
    "check_refused_when_not_running",
    "check_transfer_both_ways",
    "connect",
    "container_pid",
    "curl",
    "docker_exec",
    "echo_once",
    "process_pid",
    "recv_exactly",
    "rss_bytes",
    "start_service_task",
    "wait_echo_works",
]
