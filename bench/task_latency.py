"""Submit -> running and submit -> completed latency of a trivial task, next to `docker run` in the same run.

    .venv/bin/python bench/task_latency.py [--runs 10]

Starts a real cluster (`kr host` + `kr runner` processes, the end-to-end test harness in tests/e2e/cluster.py,
free loopback ports, a temporary home), then for each run:
- baseline: `docker run --rm kohakuriver/busybox:latest true`, wall time of the CLI process;
- cluster: POST /api/submit of `true`, then GET /api/status every 5 ms until `running` and until `completed`.
Prints medians and the scheduling overhead (cluster completed - docker run). Goal: overhead < 100 ms.
Not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from tests.e2e.cluster import TEST_IMAGE, Cluster


def docker_run_seconds() -> float:
    start = time.perf_counter()
    subprocess.run(["docker", "run", "--rm", TEST_IMAGE, "true"], check=True, capture_output=True)
    return time.perf_counter() - start


def cluster_run_seconds(cluster: Cluster, client: httpx.Client) -> tuple[float, float]:
    start = time.perf_counter()
    r = client.post("/api/submit", json={"command": "true", "registry_image": TEST_IMAGE})
    r.raise_for_status()
    task_id = r.json()["task_ids"][0]
    running = None
    while True:
        status = client.get(f"/api/status/{task_id}").json()["status"]
        now = time.perf_counter() - start
        if running is None and status in ("running", "completed"):
            running = now
        if status == "completed":
            return running, now
        if status in ("failed", "killed", "lost", "killed_oom"):
            raise SystemExit(f"task {task_id} ended {status}")
        if now > 60:
            raise SystemExit(f"task {task_id} still {status} after 60 s")
        time.sleep(0.005)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(pathlib.Path(tmp))
        try:
            cluster.start_host()
            cluster.add_runner(0)
            headers = {"Authorization": f"Bearer {cluster.admin_token}"}
            with httpx.Client(base_url=cluster.url, headers=headers, timeout=30) as client:
                cluster_run_seconds(cluster, client)  # warm-up: image cache, connections
                docker_run_seconds()
                docker, running, completed = [], [], []
                for _ in range(args.runs):
                    docker.append(docker_run_seconds())
                    r, c = cluster_run_seconds(cluster, client)
                    running.append(r)
                    completed.append(c)
        finally:
            cluster.stop()
    med = statistics.median
    print(f"runs: {args.runs}, medians (p90 in brackets)")
    for name, values in (("docker run --rm true", docker), ("submit -> running", running),
                         ("submit -> completed", completed)):  # fmt: skip
        p90 = sorted(values)[max(0, int(len(values) * 0.9) - 1)]
        print(f"  {name:<22} {med(values) * 1000:8.1f} ms  [{p90 * 1000:.1f}]")
    overhead = (med(completed) - med(docker)) * 1000
    print(f"scheduling overhead (completed - docker run): {overhead:+.1f} ms  (goal < 100 ms)")
    print(f"ratio completed / docker run: {med(completed) / med(docker):.2f}")


if __name__ == "__main__":
    main()
