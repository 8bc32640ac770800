"""Submit -> running and submit -> completed latency of a trivial task, next to `docker run` in the same run.

    .venv/bin/python bench/task_latency.py [--runs 10] [--poll] [--click] [--settle 0.5]

Starts a real cluster (`kr host` + `kr runner` processes, the end-to-end test harness in tests/e2e/cluster.py,
free loopback ports, a temporary home, DEBUG logs), then for each run, in turn:
- baseline: `docker run --rm kohakuriver/busybox:latest true`, wall time of the CLI process, and the same on
  the tasks' network (`--network kohakuriver-net`: a user-defined bridge, whose start costs more than the
  default bridge's on Docker 20.10), for reference;
- API: POST /api/submit of `true`, then GET /api/status long-polled (``?wait=&since=``; ``--poll``: every
  5 ms) until `running` and until `completed`;
- command: `kr task submit --wait --image IMAGE -- true`, wall time of the real `kr` process (as typed:
  served before click loads, `kohakuriver_cli/task_submit_fast.py`); with ``--click`` also the same call
  through the click command alone (`kohakuriver_cli.main.main()`, as every `kr task submit` ran before the
  fast path), for comparison in the same run.

The output's end: the daemons also log when each log follow ends (``runner.follow_<stream>_ended``,
``host.follow_<stream>_ended``/``_closed``), so the command's table shows how long after the exit the engine
let the output end and what `kr` paid after that.

Each call starts ``--settle`` seconds (0.5) after the one before it ended, on an engine that is done with
the call before: a container is removed after its call returns (the API run returns when the status says
`completed`, 100-150 ms before the removal), and a call started into that removal shares the engine with it.
``--settle 0`` runs them back to back, as this bench did before.

Then it reads the step lines the daemons log (``kohakuriver_net.task_steps``: host and runner share the
machine's monotonic clock with this process) and prints, for the API path and for the command, the median
time of each step since the submit (or since `kr` was spawned) and the median time from the previous step.
Ratios are against the `docker run` medians of the same run. Not a test: the numbers depend on the machine
and its load (printed at the start and the end).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from tests.e2e.cluster import KR, TEST_IMAGE, Cluster

STEP_RE = re.compile(rb"task (\d+) step (\S+) at ([0-9.]+)")
FAILED = ("failed", "killed", "lost", "killed_oom")
NETWORK = "kohakuriver-net"  # the runner's DOCKER_NETWORK_NAME by default
#: The click command without entry.py's fast paths (`python -c CODE task submit ...`: argv[1:] are kr's).
CLICK_ONLY = "import sys; sys.argv[0] = 'kr'; from kohakuriver_cli.main import main; main()"


def docker_run_seconds(*options: str) -> float:
    start = time.perf_counter()
    argv = ["docker", "run", "--rm", *options, TEST_IMAGE, "true"]
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - start


class ApiRun:
    """One task through the REST API; ``points`` are what this client saw (monotonic seconds)."""

    def __init__(self, client: httpx.Client, poll: bool) -> None:
        self.t0 = time.monotonic()
        r = client.post("/api/submit", json={"command": "true", "registry_image": TEST_IMAGE})
        r.raise_for_status()
        self.task_id = int(r.json()["task_ids"][0])
        self.points: dict[str, float] = {"client.submit_answered": time.monotonic()}
        status = "pending"
        while status != "completed":
            if poll:
                time.sleep(0.005)
                record = client.get(f"/api/status/{self.task_id}").json()
            else:
                params = {"wait": "30", "since": status}
                record = client.get(f"/api/status/{self.task_id}", params=params).json()
            status = record["status"]
            now = time.monotonic()
            if status in ("running", "completed"):
                self.points.setdefault("client.saw_running", now)
            if status == "completed":
                self.points["client.saw_completed"] = now
            if status in FAILED:
                raise SystemExit(f"task {self.task_id} ended {status}: {record.get('error_message')}")
            if now - self.t0 > 60:
                raise SystemExit(f"task {self.task_id} still {status} after 60 s")

    @property
    def running(self) -> float:
        return self.points["client.saw_running"] - self.t0

    @property
    def completed(self) -> float:
        return self.points["client.saw_completed"] - self.t0


class CommandRun:
    """`kr task submit --wait -- true` as a user types it; the task is found by time in the logs."""

    def __init__(self, cluster: Cluster, click: bool = False) -> None:
        self.t0 = time.monotonic()
        kr = [sys.executable, "-c", CLICK_ONLY] if click else [KR]
        argv = [*kr, "task", "submit", "--wait", "--image", TEST_IMAGE, "--", "true"]
        proc = subprocess.run(argv, env=cluster.env, capture_output=True, timeout=120)
        end = time.monotonic()
        if proc.returncode != 0:
            raise SystemExit(
                f"kr task submit --wait failed ({proc.returncode}): {proc.stderr.decode()[-500:]}"
            )
        self.points = {"client.kr_exited": end}
        self.task_id: int | None = None

    @property
    def seconds(self) -> float:
        return self.points["client.kr_exited"] - self.t0


def read_steps(paths: list[pathlib.Path]) -> dict[int, dict[str, float]]:
    steps: dict[int, dict[str, float]] = {}
    for path in paths:
        for match in STEP_RE.finditer(path.read_bytes()):
            task_id, name, at = int(match[1]), match[2].decode(), float(match[3])
            steps.setdefault(task_id, {}).setdefault(name, at)
    return steps


def step_table(title: str, runs: list[tuple[float, dict[str, float]]]) -> list[str]:
    """Median time of each step since the run's start, and since the step before it (in median order)."""
    names: dict[str, list[float]] = {}
    for t0, points in runs:
        for name, at in points.items():
            names.setdefault(name, []).append(at - t0)
    order = sorted(names, key=lambda n: statistics.median(names[n]))
    lines = [title, f"  {'step':<34} {'at (ms)':>9} {'+prev (ms)':>11}  runs"]
    previous: str | None = None
    for name in order:
        at = statistics.median(names[name]) * 1000
        deltas = [
            points[name] - points[previous]
            for _, points in runs
            if previous is not None and name in points and previous in points
        ]
        delta = f"{statistics.median(deltas) * 1000:11.1f}" if deltas else f"{'':11}"
        lines.append(f"  {name:<34} {at:9.1f} {delta}  {len(names[name])}")
        previous = name
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--poll", action="store_true", help="poll /api/status every 5 ms (no long-poll)")
    parser.add_argument("--click", action="store_true", help="also time kr through the click command alone")
    parser.add_argument(
        "--settle", type=float, default=0.5, metavar="SECONDS",
        help="pause before each measured call, so it does not start while the engine still removes the "
        "container of the call before (0: back to back)",
    )  # fmt: skip
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(pathlib.Path(tmp))
        try:
            cluster.start_host()
            runner = cluster.add_runner(0)
            cluster.kr("whoami")  # the CLI's first start (bytecode, credentials)
            headers = {"Authorization": f"Bearer {cluster.admin_token}"}
            with httpx.Client(base_url=cluster.url, headers=headers, timeout=60) as client:
                ApiRun(client, args.poll)  # warm-up: image cache, connections
                CommandRun(cluster)
                docker_run_seconds()
                docker: list[float] = []
                docker_net: list[float] = []
                api: list[ApiRun] = []
                commands: list[CommandRun] = []
                clicks: list[CommandRun] = []
                if args.click:
                    CommandRun(cluster, click=True)
                measures: list[Callable[[], object]] = [
                    lambda: docker.append(docker_run_seconds()),
                    lambda: docker_net.append(docker_run_seconds("--network", NETWORK)),
                    lambda: api.append(ApiRun(client, args.poll)),
                    lambda: commands.append(CommandRun(cluster)),
                ]
                if args.click:
                    measures.append(lambda: clicks.append(CommandRun(cluster, click=True)))
                for _ in range(args.runs):
                    for measure in measures:
                        time.sleep(args.settle)
                        measure()
            time.sleep(0.5)  # the last removals and log lines
            steps = read_steps([cluster.host.log_path, cluster.runners[runner].log_path])
        finally:
            cluster.stop()
    load_after = os.getloadavg()

    # A command's task: the one whose submit reached the host while that kr process ran.
    for run in [*commands, *clicks]:
        for task_id, points in steps.items():
            at = points.get("host.submit_received")
            if at is not None and run.t0 <= at <= run.points["client.kr_exited"]:
                run.task_id = task_id
    api_table = [(r.t0, {**steps.get(r.task_id, {}), **r.points}) for r in api]
    cmd_table = [(r.t0, {**steps.get(r.task_id or -1, {}), **r.points}) for r in commands]
    click_table = [(r.t0, {**steps.get(r.task_id or -1, {}), **r.points}) for r in clicks]

    med = statistics.median
    loads = ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(load_before, load_after, strict=True))
    print(f"runs: {args.runs}; load average 1/5/15 min before/after: {loads}; {os.cpu_count()} CPUs")
    print("API path (submit over REST, status " + ("polled every 5 ms)" if args.poll else "long-polled)"))
    print("\n".join(step_table("steps, medians since POST /api/submit was sent:", api_table)))
    print()
    print("\n".join(step_table("kr task submit --wait -- true, medians since kr was spawned:", cmd_table)))
    print()
    if clicks:
        title = "the same through the click command alone, medians since it was spawned:"
        print("\n".join(step_table(title, click_table)))
        print()

    def p90(values: list[float]) -> float:
        return sorted(values)[max(0, int(len(values) * 0.9) - 1)]

    running = [r.running for r in api]
    completed = [r.completed for r in api]
    whole = [r.seconds for r in commands]
    print("medians (p90 in brackets)")
    rows = [
        ("docker run --rm IMAGE true", docker),
        ("  same, --network " + NETWORK, docker_net),
        ("API submit -> running", running),
        ("API submit -> completed", completed),
        ("kr task submit --wait -- true", whole),
    ]
    if clicks:
        rows.append(("  same, click command alone", [r.seconds for r in clicks]))
    for name, values in rows:
        print(f"  {name:<30} {med(values) * 1000:8.1f} ms  [{p90(values) * 1000:.1f}]")
    # The engine's own share of submit -> running: the create and start calls.
    engine = [
        points["runner.container_created"] - points["runner.dirs_made"]
        + points["runner.container_started"] - points["runner.container_created"]
        for _, points in api_table
        if {"runner.container_created", "runner.dirs_made", "runner.container_started"} <= points.keys()
    ]  # fmt: skip
    if engine:
        overhead = (med(running) - med(engine)) * 1000
        print(f"submit -> running less the engine's create + start ({med(engine) * 1000:.1f} ms): "
              f"{overhead:.1f} ms  (goal < 30 ms)")  # fmt: skip
    print(f"ratio API submit -> completed / docker run: {med(completed) / med(docker):.2f}  (goal <= 1.0)")
    print(f"ratio kr task submit --wait / docker run:   {med(whole) / med(docker):.2f}  (goal <= 1.0)")
    print(f"ratio API submit -> completed / docker run on {NETWORK}: {med(completed) / med(docker_net):.2f}")
    print(f"ratio kr task submit --wait / docker run on {NETWORK}:   {med(whole) / med(docker_net):.2f}")
    if clicks:
        alone = med([r.seconds for r in clicks])
        print(f"ratio the same through the click command alone / docker run: {alone / med(docker):.2f}")


if __name__ == "__main__":
    main()
