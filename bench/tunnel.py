"""Port forwarding through the whole chain against raw loopback and `ssh -L`, measured in the same run.

    .venv/bin/python bench/tunnel.py [--mib 1024] [--echo 2000] [--conns 100] [--topology split|up|both]

Starts one small measurement service (`SERVICE` below) on the machine's loopback (raw baseline), reached
directly and behind a local OpenSSH server with `ssh -N -L` (the tool people use today); then, for each
topology, a real cluster, a busybox task and the same service inside the task container's network
namespace, reached through `kr forward` -> host -> runner -> the injected Rust tunnel client. Topologies:
"split" is `kr host` + `kr runner` processes (like the end-to-end tests, and like a cluster of several
machines: the host relays each session to the runner over TCP); "up" is `kr up`, host and runner in one
process, which hands each session to its runner in memory. The same Python client measures every path:

- single-stream throughput, container -> laptop ("down") and laptop -> container ("up");
- 64-byte echo round trips, p50 and p99;
- aggregate throughput of ``--conns`` concurrent connections;
- under load: echo p50/p99 of an interactive connection while a bulk transfer runs and another connection's
  reader has stopped (its data fills every buffer on the way), all sharing one container tunnel; the same
  through `ssh -L` (one SSH connection) for comparison;
- peak resident memory of `kr forward`, the host, the runner and the tunnel client during the run;
- CPU seconds each process of a path spends per GiB of the single-stream transfers, and from it the
  throughput its busiest process would allow with a core of its own (what bounds a real deployment, where
  the laptop, the host and the GPU node each have their own cores; on this machine every process of every
  path shares the same two).

Goals (issue "tighten the core"): throughput at least that of `ssh -L` both ways, echo p50 and p99 at most
twice `ssh -L`'s, interactive p99 under load under 10 ms, bounded memory. Not a test: numbers depend on the
machine; on a 2-core machine every process of the chain, the service and the client share both cores.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.cluster import Cluster, free_port, wait_until  # noqa: E402
from tests.e2e.forwarding import Forward, container_pid, rss_bytes  # noqa: E402

SERVICE = r"""
import socket, sys, threading
ZEROS = bytes(1 << 20)

def serve(conn):
    try:
        handle(conn)
    except OSError:
        pass  # the client went away (the stalled and bulk connections end that way)
    finally:
        conn.close()

def handle(conn):
    if True:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = conn.makefile("rb", buffering=0)
        line = b""
        while not line.endswith(b"\n"):
            c = f.read(1)
            if not c:
                return
            line += c
        cmd, _, arg = line.strip().partition(b" ")
        if cmd == b"S":  # send n bytes
            n = int(arg)
            view = memoryview(ZEROS)
            while n > 0:
                k = min(n, len(ZEROS))
                conn.sendall(view[:k])
                n -= k
        elif cmd == b"R":  # receive n bytes, then answer one byte
            n = int(arg)
            buf = bytearray(1 << 20)
            while n > 0:
                k = conn.recv_into(buf, min(n, len(buf)))
                if not k:
                    return
                n -= k
            conn.sendall(b"K")
        elif cmd == b"E":  # echo until EOF
            while data := conn.recv(65536):
                conn.sendall(data)

s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(512)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

MIB = 1 << 20


# -- the client ----------------------------------------------------------------------------------------------


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def download(port: int, nbytes: int) -> float:
    """Seconds to receive ``nbytes`` from the service."""
    buf = bytearray(MIB)
    with _connect(port) as sock:
        t0 = time.perf_counter()
        sock.sendall(b"S %d\n" % nbytes)
        got = 0
        while got < nbytes:
            k = sock.recv_into(buf)
            if not k:
                raise RuntimeError(f"closed after {got} of {nbytes} bytes")
            got += k
        return time.perf_counter() - t0


def upload(port: int, nbytes: int) -> float:
    """Seconds to send ``nbytes`` and get the service's acknowledgement (all bytes arrived)."""
    block = memoryview(bytes(MIB))
    with _connect(port) as sock:
        t0 = time.perf_counter()
        sock.sendall(b"R %d\n" % nbytes)
        left = nbytes
        while left > 0:
            k = min(left, MIB)
            sock.sendall(block[:k])
            left -= k
        if sock.recv(1) != b"K":
            raise RuntimeError("no acknowledgement")
        return time.perf_counter() - t0


def echo_times(port: int, count: int) -> list[float]:
    payload = b"x" * 64
    times = []
    with _connect(port) as sock:
        sock.sendall(b"E\n")
        for _ in range(count):
            t0 = time.perf_counter()
            sock.sendall(payload)
            got = 0
            while got < 64:
                data = sock.recv(64 - got)
                if not data:
                    raise RuntimeError("echo closed")
                got += len(data)
            times.append(time.perf_counter() - t0)
    return times


def aggregate(port: int, conns: int, total: int) -> float:
    """Bytes per second of ``conns`` concurrent downloads of ``total / conns`` bytes each."""
    each = total // conns
    errors: list[BaseException] = []
    barrier = threading.Barrier(conns + 1)

    def one() -> None:
        try:
            barrier.wait(60)
            download(port, each)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(conns)]
    for t in threads:
        t.start()
    barrier.wait(60)
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} connections failed: {errors[0]!r}")
    return each * conns / (time.perf_counter() - t0)


def under_load(port: int, count: int, seconds: float = 6.0) -> tuple[list[float], float]:
    """Echo round trips while one connection downloads in bulk and another has stopped reading."""
    stop = threading.Event()
    moved = [0]

    def bulk() -> None:
        buf = bytearray(MIB)
        with _connect(port) as sock:
            sock.sendall(b"S %d\n" % (1 << 50))
            while not stop.is_set():
                moved[0] += sock.recv_into(buf)

    stalled = _connect(port)
    stalled.sendall(b"S %d\n" % (1 << 50))  # and never read
    thread = threading.Thread(target=bulk, daemon=True)
    thread.start()
    time.sleep(1.0)  # let the stalled connection fill its windows and buffers
    t0 = time.perf_counter()
    times: list[float] = []
    while time.perf_counter() - t0 < seconds and len(times) < count:
        times += echo_times(port, 100)
    bulk_rate = moved[0] / (time.perf_counter() - t0 + 1.0)
    stop.set()
    thread.join(10)
    stalled.close()
    return times, bulk_rate


# -- the three paths -----------------------------------------------------------------------------------------


class Processes:
    """Everything the bench starts, stopped in reverse order."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], ready: str | None = None, **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, **kwargs)
        self.procs.append(proc)
        if ready is not None:
            line = proc.stdout.readline()
            if ready not in line:
                raise RuntimeError(f"{argv[0]} did not start: {line!r}")
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.kill()
            proc.wait(10)


def start_sshd(tmp: Path, procs: Processes) -> int:
    """An OpenSSH server on a free loopback port that only accepts a key made for this run."""
    port = free_port()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "hostkey")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "userkey")], check=True)
    shutil.copy(tmp / "userkey.pub", tmp / "authorized_keys")
    (tmp / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {tmp / 'hostkey'}\n"
        f"AuthorizedKeysFile {tmp / 'authorized_keys'}\nPidFile none\nUsePAM no\n"
        "PasswordAuthentication no\nStrictModes no\nAllowTcpForwarding yes\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    procs.start([shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f", str(tmp / "sshd_config")],
                stderr=subprocess.DEVNULL)  # fmt: skip
    wait_until(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True, 10, "sshd")
    return port


def start_ssh_forward(
    tmp: Path, procs: Processes, sshd_port: int, target_port: int
) -> tuple[int, subprocess.Popen]:
    local = free_port()
    return local, procs.start(
        ["ssh", "-N", "-p", str(sshd_port), "-i", str(tmp / "userkey"), "-o", "StrictHostKeyChecking=no",
         "-o", f"UserKnownHostsFile={tmp / 'known_hosts'}", "-o", "ExitOnForwardFailure=yes",
         "-L", f"127.0.0.1:{local}:127.0.0.1:{target_port}", "root@127.0.0.1"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


class RssSampler:
    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for name, pid in self.pids.items():
                with contextlib.suppress(OSError):  # a process that ended keeps its peak
                    self.peak[name] = max(self.peak[name], rss_bytes(pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def tunnel_client_pid(container_pid_: int) -> int | None:
    """The tunnel client inside the container: the process of the container's PID namespace whose name is
    ``tunnel-client`` (the container's init, ``docker-init -- tunnel-client --exec ...``, has the word in
    its command line too)."""
    target_ns = os.readlink(f"/proc/{container_pid_}/ns/pid")  # "pid:[inode]"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.readlink(proc / "ns" / "pid") != target_ns:
                continue
            if (proc / "comm").read_text().strip() == "tunnel-client":
                return int(proc.name)
        except OSError:
            continue
    return None


# -- report --------------------------------------------------------------------------------------------------


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) >= 2 else values[0]


class CpuMeter:
    """CPU seconds (user + system, all threads) that named processes, and their descendants, spend."""

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots = roots
        self.spent = dict.fromkeys(roots, 0.0)
        self._start: dict[str, float] = {}

    def _now(self, pid: int) -> float:
        total = 0.0
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    total += times.user + times.system
        except psutil.Error:
            pass
        return total

    def __enter__(self) -> CpuMeter:
        self._start = {name: self._now(pid) for name, pid in self.roots.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        for name, pid in self.roots.items():
            self.spent[name] += max(0.0, self._now(pid) - self._start[name])


def cpu_report(name: str, meter: CpuMeter, nbytes: int) -> float:
    """Print CPU seconds per GiB of each process; return the busiest one's single-core ceiling (MiB/s)."""
    gib = nbytes / (1 << 30)
    per_gib = {proc: spent / gib for proc, spent in meter.spent.items()}
    busiest = max(per_gib.values())
    parts = ", ".join(f"{proc} {value:.2f}" for proc, value in per_gib.items())
    ceiling = 1024 / busiest if busiest else float("inf")
    print(f"{name:>6}: CPU s/GiB {parts}; total {sum(per_gib.values()):.2f}; "
          f"busiest process alone on a core: {ceiling:.0f} MiB/s", flush=True)  # fmt: skip
    return ceiling


def measure(name: str, port: int, args: argparse.Namespace, cpu: dict[str, int] | None = None) -> dict:
    nbytes = args.mib * MIB
    download(port, 8 * MIB)  # warm up
    meter = CpuMeter(cpu or {})
    with meter:
        down = min(download(port, nbytes) for _ in range(args.runs))
        up = min(upload(port, nbytes) for _ in range(args.runs))
    times = echo_times(port, args.echo)
    agg = aggregate(port, args.conns, min(nbytes, args.conns * 4 * MIB))
    result = {
        "down": nbytes / down,
        "up": nbytes / up,
        "p50": pct(times, 50),
        "p99": pct(times, 99),
        "agg": agg,
    }
    print(
        f"{name:>6}: down {result['down'] / MIB:8.1f} MiB/s  up {result['up'] / MIB:8.1f} MiB/s  "
        f"echo p50 {result['p50'] * 1e3:6.3f} ms  p99 {result['p99'] * 1e3:6.3f} ms  "
        f"{args.conns} conns {agg / MIB:8.1f} MiB/s",
        flush=True,
    )
    if cpu:
        result["ceiling"] = cpu_report(name, meter, 2 * args.runs * nbytes)
    return result


TOPOLOGIES = {
    "split": "`kr host` + `kr runner` processes (as on separate machines)",
    "up": "`kr up` (host and runner in one process: sessions handed over in memory)",
}


def print_under_load(name: str, times: list[float], bulk: float) -> None:
    print(
        f"{name:>6}: under load (bulk {bulk / MIB:.0f} MiB/s + a stalled reader on the same tunnel): "
        f"echo p50 {pct(times, 50) * 1e3:.2f} ms  p99 {pct(times, 99) * 1e3:.2f} ms  "
        f"({len(times)} round trips)",
        flush=True,
    )


def measure_chain(topology: str, tmp: Path, args: argparse.Namespace, raw: dict, ssh: dict) -> None:
    """Start a cluster of ``topology``, a task and the service in it; measure and print the chain."""
    procs = Processes()
    cluster = Cluster(tmp / f"cluster-{topology}")
    fwd: Forward | None = None
    try:
        if topology == "up":
            cluster.start_up()
        else:
            cluster.start_host()
            cluster.add_runner(0)
        task_id = cluster.kr("task", "submit", "--", "sleep", "2147483647").stdout.split()[0]
        cluster.wait_status(task_id, "running")
        cpid = container_pid(task_id)
        in_container = 9000
        procs.start(["nsenter", "-t", str(cpid), "-n", sys.executable, str(tmp / "service.py"),
                     str(in_container)], ready="ready")  # fmt: skip
        fwd = Forward(cluster, task_id, in_container)
        fwd.wait_ready()
        wait_until(lambda: download(fwd.port, 1) >= 0, 30, "the kr forward path", interval=0.3)

        pids = {"kr forward": fwd.proc.pid}
        if topology == "up":
            pids["kr up"] = cluster.host.proc.pid
        else:
            pids["host"] = cluster.host.proc.pid
            pids["runner"] = next(iter(cluster.runners.values())).proc.pid
        tc = tunnel_client_pid(cpid)
        if tc is not None:
            pids["tunnel-client"] = tc
        name = f"kr {topology}"
        print(f"-- {name}: {TOPOLOGIES[topology]}", flush=True)
        with RssSampler(pids) as rss:
            chain = measure(name, fwd.port, args, pids)
            times, bulk = under_load(fwd.port, 5000)
        print_under_load(name, times, bulk)
        print("peak RSS: " + ", ".join(f"{k} {v / MIB:.0f} MiB" for k, v in rss.peak.items()))
        print(f"ratios ({name}):")
        for key, label in (("down", "down"), ("up", "up"), ("agg", "aggregate")):
            of_raw, of_ssh = chain[key] / raw[key], chain[key] / ssh[key]
            print(f"  {label:>9}: {of_raw:.2f} of raw loopback, {of_ssh:.2f} of ssh -L")
        p50, p99 = chain["p50"] / ssh["p50"], chain["p99"] / ssh["p99"]
        print(f"  echo p50 {p50:.2f}x ssh -L, p99 {p99:.2f}x ssh -L")
        load50, load99 = pct(times, 50) / pct(ssh["load"], 50), pct(times, 99) / pct(ssh["load"], 99)
        print(f"  under load: echo p50 {load50:.2f}x ssh -L, p99 {load99:.2f}x ssh -L")
        print(f"  busiest process alone on a core: {chain['ceiling'] / ssh['ceiling']:.2f} of ssh -L's")
    finally:
        if fwd is not None:
            fwd.stop()
        procs.stop()
        cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="MiB per single-stream transfer")
    parser.add_argument("--runs", type=int, default=2, help="transfers per direction (best is kept)")
    parser.add_argument("--echo", type=int, default=2000, help="64-byte round trips")
    parser.add_argument("--conns", type=int, default=100, help="concurrent connections")
    parser.add_argument(
        "--topology",
        choices=[*TOPOLOGIES, "both"],
        default="both",
        help="the cluster the kr chain goes through (default: both, one after the other)",
    )
    args = parser.parse_args()

    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="kr-bench-tunnel-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            (tmp / "service.py").write_text(SERVICE)
            raw_port = free_port()
            procs.start([sys.executable, str(tmp / "service.py"), str(raw_port)], ready="ready")
            sshd_port = start_sshd(tmp, procs)
            sshd = procs.procs[-1]
            ssh_port, ssh_client = start_ssh_forward(tmp, procs, sshd_port, raw_port)
            wait_until(lambda: download(ssh_port, 1) >= 0, 20, "the ssh -L forward", interval=0.2)
            print(
                f"transfers of {args.mib} MiB (best of {args.runs}), {args.echo} echoes, {args.conns} conns"
            )
            raw = measure("raw", raw_port, args)
            ssh = measure("ssh -L", ssh_port, args, {"ssh": ssh_client.pid, "sshd": sshd.pid})
            ssh["load"], bulk = under_load(ssh_port, 5000)
            print_under_load("ssh -L", ssh["load"], bulk)
            for topology in TOPOLOGIES if args.topology == "both" else [args.topology]:
                measure_chain(topology, tmp, args, raw, ssh)
        finally:
            procs.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
