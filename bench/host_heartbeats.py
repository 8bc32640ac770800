"""Host API latency while 500 runners heartbeat: p50/p99 of GET /api/nodes, GET /api/tasks, POST /api/submit.

    .venv/bin/python bench/host_heartbeats.py [--runners 500] [--interval 5] [--seconds 45]

Three processes, because this machine has two cores and a load generator sharing the host's trio loop (or
the measuring client's loop) would measure itself:

- the host: a real ``kr host`` subprocess (127.0.0.1, a temporary home and database);
- the load: this script with ``--load``, a subprocess that registers the simulated runners, sends their
  heartbeats every ``--interval`` seconds spread evenly (500 / 5 s = 100 heartbeats a second, each runner on
  its own keep-alive connection), answers the host's ``/api/execute`` calls for the submitted tasks like a
  runner (202), lists each dispatched task in its node's heartbeats (the host turns it ``running``) and
  completes it after a while (``/api/update``), so placement, reconciliation and the scheduler all run;
- the measurer (this process): one client sending the three measured requests in turn, one at a time, so
  its timings are the host's latency and not a queue of its own. It mostly waits, leaving the second core
  to the load.

Prints the percentiles, the goal (p99 < 50 ms) and the heartbeat latency the load saw. Traffic goes only to
127.0.0.1. Runs in about ``--seconds`` + 15 s. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import trio

REPO = Path(__file__).resolve().parents[1]
KR = Path(sys.executable).with_name("kr")
GOAL_P99_MS = 50.0
GPUS = 4
TASK_SECONDS = 20.0  # a dispatched task "runs" this long on its simulated node


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(samples: list[float], p: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# -- the load process --------------------------------------------------------------------------------------


def gpu_info(i: int) -> list[dict]:
    return [
        {"gpu_id": g, "name": "NVIDIA RTX A6000", "gpu_utilization": random.randint(0, 100),
         "memory_total_mib": 49140, "memory_used_mib": random.randint(0, 49140), "temperature": 55}
        for g in range(GPUS)
    ]  # fmt: skip


class Load:
    def __init__(
        self, host: str, cluster_token: str, admin_token: str, runners: int, interval: float
    ) -> None:
        self.host = host
        self.cluster_token = cluster_token
        self.admin_token = admin_token
        self.names = [f"sim-{i:04d}" for i in range(runners)]
        self.interval = interval
        self.running: dict[str, dict[str, float]] = {n: {} for n in self.names}  # node -> task id -> end
        self.latencies: list[float] = []
        self.errors = 0
        self.kills = 0
        self.executed: trio.MemorySendChannel
        self.execute_queue: trio.MemoryReceiveChannel
        self.executed, self.execute_queue = trio.open_memory_channel(10_000)

    async def runner_endpoint(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """A minimal HTTP/1.1 server for the host's /api/execute (202) and kill (200) calls."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._serve_connection, listeners)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = next((int(v) for k, _, v in (h.partition(":") for h in lines[1:])
                               if k.lower() == "content-length"), 0)  # fmt: skip
                while len(buffer) < length:
                    buffer += await stream.receive_some(65536)
                body, buffer = buffer[:length], buffer[length:]
                if method == "POST" and path == "/api/execute":
                    self.executed.send_nowait(json.loads(body)["task_id"])
                    status, reply = b"202 Accepted", b"{}"
                else:
                    status, reply = b"200 OK", b'{"ok":true}'
                head = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                await stream.send_all(head % (status, len(reply)) + reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ValueError):
            return

    def client(self, ssl_context: ssl.SSLContext) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.host, verify=ssl_context, timeout=10,
            headers={"Authorization": f"Bearer {self.cluster_token}"},
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )  # fmt: skip

    async def simulate(self, name: str, offset: float, runner_url: str, ssl_context: ssl.SSLContext) -> None:
        async with self.client(ssl_context) as http:
            registration = {
                "hostname": name, "url": runner_url, "total_cores": 32, "memory_total_bytes": 256 << 30,
                "gpu_info": gpu_info(0), "numa_topology": {"0": {"cores": list(range(16))},
                                                           "1": {"cores": list(range(16, 32))}},
                "runner_version": "bench",
            }  # fmt: skip
            r = await http.post("/api/register", json=registration)
            r.raise_for_status()
            await trio.sleep(offset)
            next_at = trio.current_time()
            while True:
                now = time.time()
                finished = []
                for task_id, end in list(self.running[name].items()):
                    if end <= now:
                        del self.running[name][task_id]
                        finished.append({"task_id": task_id, "status": "completed", "exit_code": 0})
                body = {
                    "running_tasks": list(self.running[name]), "finished_tasks": finished,
                    "cpu_percent": random.uniform(0, 100), "memory_percent": random.uniform(0, 100),
                    "memory_used_bytes": random.randint(0, 256 << 30), "memory_total_bytes": 256 << 30,
                    "current_avg_temp": 50.0, "current_max_temp": 60.0, "gpu_info": gpu_info(0),
                    "runner_version": "bench",
                }  # fmt: skip
                start = time.perf_counter()
                try:
                    r = await http.put(f"/api/heartbeat/{name}", json=body)
                    self.latencies.append(time.perf_counter() - start)
                    if r.status_code != 200:
                        self.errors += 1
                    else:
                        self.kills += len(r.json()["kill"])
                except httpx.HTTPError:
                    self.errors += 1
                next_at += self.interval
                await trio.sleep_until(next_at)

    async def track_dispatches(self) -> None:
        """Learn the node of each dispatched task, so that node lists it as running from then on."""
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        async with httpx.AsyncClient(base_url=self.host, headers=headers, timeout=10) as http:
            async for task_id in self.execute_queue:
                record = (await http.get(f"/api/status/{task_id}")).json()
                node = record.get("assigned_node")
                if node in self.running:
                    self.running[node][task_id] = time.time() + TASK_SECONDS

    async def run(self, seconds: float) -> dict:
        ssl_context = ssl.create_default_context()  # one for all clients: building 500 is slow
        async with trio.open_nursery() as nursery:
            port = await nursery.start(self.runner_endpoint)
            runner_url = f"http://127.0.0.1:{port}"
            nursery.start_soon(self.track_dispatches)
            for i, name in enumerate(self.names):
                nursery.start_soon(
                    self.simulate, name, i * self.interval / len(self.names), runner_url, ssl_context
                )
            print("ready", flush=True)  # the measurer starts its clock after this line
            await trio.sleep(seconds)
            nursery.cancel_scope.cancel()
        lat = self.latencies
        return {
            "heartbeats": len(lat), "errors": self.errors, "kills": self.kills,
            "p50_ms": percentile(lat, 50) * 1000, "p99_ms": percentile(lat, 99) * 1000,
            "max_ms": max(lat, default=float("nan")) * 1000,
        }  # fmt: skip


# -- the measurer ------------------------------------------------------------------------------------------


async def measure(host: str, token: str, seconds: float) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"GET /api/nodes": [], "GET /api/tasks": [], "POST /api/submit": []}
    requests = [
        ("GET /api/nodes", "GET", "/api/nodes", None),
        ("GET /api/tasks", "GET", "/api/tasks?limit=100", None),
        ("POST /api/submit", "POST", "/api/submit",
         {"command": "python", "arguments": ["train.py"], "required_cores": 4}),
    ]  # fmt: skip
    async with httpx.AsyncClient(
        base_url=host, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as http:
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            name, method, path, body = requests[i % len(requests)]
            i += 1
            start = time.perf_counter()
            r = await http.request(method, path, json=body)
            elapsed = time.perf_counter() - start
            if r.status_code >= 400:
                raise SystemExit(f"{name}: {r.status_code} {r.text[:300]}")
            samples[name].append(elapsed)
            await trio.sleep(0.02)  # a steady, modest request rate on top of the heartbeats
    return samples


def write_host_config(home: Path, port: int, interval: float) -> Path:
    config = home / "host_config.py"
    settings = {
        "HOST_BIND_IP": "127.0.0.1",
        "HOST_PORT": port,
        "HOST_SSH_PROXY_PORT": free_port(),
        "DB_FILE": str(home / "host.db"),
        "SHARED_DIR": str(home / "shared"),
        "HEARTBEAT_INTERVAL_SECONDS": int(interval),
        "LOG_LEVEL": "info",
    }
    config.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    return config


def wait_ready(url: str, credentials: Path, proc: subprocess.Popen, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"kr host exited with {proc.returncode}")
        try:
            if credentials.exists() and httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                return json.loads(credentials.read_text())["token"]
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit("the host did not start in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runners", type=int, default=500)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=45.0, help="measurement time")
    parser.add_argument("--profile", metavar="FILE", help="run the host under cProfile, stats to FILE")
    parser.add_argument(
        "--boost",
        type=int,
        default=0,
        metavar="N",
        help="run the host, the load and the measurer N nice levels above normal (needs root): on a machine "
        "shared with other work this approximates the host having its machine to itself",
    )
    parser.add_argument(
        "--load", nargs=3, metavar=("URL", "CLUSTER_TOKEN", "ADMIN_TOKEN"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()

    # The load generator and the measurer should not add pauses of their own to what they measure: the
    # same GC tuning as the host's (see kohakuriver_host/daemon.py).
    gc.set_threshold(20_000, 20, 50)
    if args.load:
        url, cluster_token, admin_token = args.load
        load = Load(url, cluster_token, admin_token, args.runners, args.interval)
        print(json.dumps(trio.run(load.run, args.seconds)), flush=True)
        return

    with tempfile.TemporaryDirectory(prefix="kr-bench-") as tmp:
        home = Path(tmp)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, KOHAKURIVER_HOME=str(home))
        log = open(home / "host.log", "wb")  # noqa: SIM115 - closed in the finally below
        argv = [str(KR), "host", "--config", str(write_host_config(home, port, args.interval))]
        if args.profile:  # the host under cProfile (written when it exits on SIGTERM)
            argv = [sys.executable, "-m", "cProfile", "-o", args.profile, *argv]
        if args.boost:
            os.nice(-args.boost)  # the children (host and load) inherit it
        host = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        load = None
        try:
            admin_token = wait_ready(url, home / "credentials.json", host)
            cluster_token = (home / "cluster_token").read_text().strip()
            warmup = args.interval + 3.0  # every runner registered and heartbeating before measuring
            load = subprocess.Popen(
                [sys.executable, __file__, "--runners", str(args.runners), "--interval", str(args.interval),
                 "--seconds", str(args.seconds + warmup + 2), "--load", url, cluster_token, admin_token],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert load.stdout is not None
            if load.stdout.readline().strip() != "ready":
                raise SystemExit("the load generator failed to start")
            time.sleep(warmup)
            nodes = httpx.get(f"{url}/api/nodes", headers={"Authorization": f"Bearer {admin_token}"}).json()
            online = sum(n["status"] == "online" for n in nodes)
            cpu = [psutil.Process(p.pid) for p in (host, load)] + [psutil.Process()]
            for proc in cpu:
                proc.cpu_percent()  # starts the measurement window
            psutil.cpu_percent()
            samples = trio.run(measure, url, admin_token, args.seconds)
            host_cpu, load_cpu, own_cpu = (proc.cpu_percent() for proc in cpu)
            machine_cpu = psutil.cpu_percent() * psutil.cpu_count()
            others_cpu = max(0.0, machine_cpu - host_cpu - load_cpu - own_cpu)
            load_stats = json.loads(load.stdout.readline())
            load.wait(30)
        finally:
            for proc in (load, host):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            log.close()

        rate = args.runners / args.interval
        print(f"host under {args.runners} runners heartbeating every {args.interval:g} s ({rate:.0f}/s); "
              f"{online} nodes online; {args.seconds:g} s of measurement")  # fmt: skip
        if args.boost:
            print(f"(host, load and measurer ran {args.boost} nice levels above other processes)")
        print(f"{'request':<18} {'n':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        worst = 0.0
        for name, values in samples.items():
            p99 = percentile(values, 99) * 1000
            worst = max(worst, p99)
            print(f"{name:<18} {len(values):>6} {percentile(values, 50) * 1000:>8.1f} {p99:>8.1f} "
                  f"{max(values) * 1000:>8.1f}")  # fmt: skip
        print(f"{'PUT heartbeat':<18} {load_stats['heartbeats']:>6} {load_stats['p50_ms']:>8.1f} "
              f"{load_stats['p99_ms']:>8.1f} {load_stats['max_ms']:>8.1f}   (seen by the load generator; "
              f"{load_stats['errors']} errors)")  # fmt: skip
        print(
            f"CPU during the measurement (100% = one core): host {host_cpu:.0f}%, "
            f"load generator {load_cpu:.0f}%, measurer {own_cpu:.0f}%, "
            f"other processes on this machine {others_cpu:.0f}% (of {psutil.cpu_count() * 100}%)"
        )
        verdict = "met" if worst < GOAL_P99_MS else "NOT met"
        print(
            f"goal: p99 < {GOAL_P99_MS:.0f} ms for the measured requests: {verdict} "
            f"(worst p99 {worst:.1f} ms)"
        )


if __name__ == "__main__":
    main()
