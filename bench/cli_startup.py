"""How long `kr` takes to start and answer, next to `python -c pass` measured in the same run.

    .venv/bin/python bench/cli_startup.py [--runs 30]

Starts a real host (`kr host` with a temporary KOHAKURIVER_HOME: the end-to-end harness, tests/e2e/cluster.py;
no runner and no Docker are needed), submits a few tasks (they stay pending, so `kr task list` has rows to
draw), then times each command as a whole process, wall clock, --runs times, interleaved so that a burst of
load on the machine hits every command alike:

- `python -c pass` with the same interpreter: the floor every Python program pays;
- `kr --version`, `kr --help`: the CLI's own start;
- `kr task list` (a table of the tasks) and `kr task list --json`: one command that talks to the host;
  `kr task list (tty)` is the same with its stdout on a pseudo-terminal, as a person runs it (colours, the
  terminal's width), the others write to /dev/null;
- `kr ssh proxy-command --proxy-port P ID`: what OpenSSH starts for every connection (here the proxy
  refuses the unknown VPS at once, so the time is the start plus one handshake);
- `kr task submit -- true`: submits a task (no runner: it stays pending) and prints its id, served before
  click loads (`kohakuriver_cli/task_submit_fast.py`); `kr task submit (click)` is the same call through the
  click command alone (`kohakuriver_cli.main.main()` in the same interpreter). Both as a second user, so
  `kr task list` (the admin's own tasks) keeps its five rows.

Prints, per command, the median and p90 in milliseconds, the ratio of the median to `python -c pass`, and the
goal (issue 12: `kr task list`, both ways, and `kr ssh proxy-command` under 150 ms, `kr --help` under
100 ms). Not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.cluster import KR, Cluster  # noqa: E402

GOALS_MS = {
    "kr --help": 100,
    "kr task list": 150,
    "kr task list (tty)": 150,
    "kr ssh proxy-command": 150,
}
TTY = {"kr task list (tty)"}
#: The click command without entry.py's fast paths (`python -c CODE task submit ...`: argv[1:] are kr's).
CLICK_ONLY = "import sys; sys.argv[0] = 'kr'; from kohakuriver_cli.main import main; main()"


def timed(argv: list[str], env: dict[str, str], tty: bool = False) -> float:
    if not tty:
        start = time.perf_counter()
        subprocess.run(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        return time.perf_counter() - start
    import pty

    main_fd, child_fd = pty.openpty()
    try:
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=child_fd, stderr=subprocess.DEVNULL
        )
        os.close(child_fd)
        child_fd = -1
        while True:  # drain the terminal so the command never blocks on it; EIO once the child is gone
            try:
                if not os.read(main_fd, 65536):
                    break
            except OSError:
                break
        proc.wait()
        return time.perf_counter() - start
    finally:
        os.close(main_fd)
        if child_fd >= 0:
            os.close(child_fd)


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * 0.9 + 0.5) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(pathlib.Path(tmp))
        try:
            cluster.start_host()
            env = dict(cluster.env, KOHAKURIVER_TOKEN=cluster.admin_token)
            for i in range(5):
                cluster.api("POST", "/api/submit", json={"command": "echo", "arguments": [str(i)]})
            bench_user = cluster.api("POST", "/api/auth/users", json={"username": "bench", "role": "user"})
            submit_env = dict(cluster.env, KOHAKURIVER_TOKEN=bench_user["token"])
            commands = {
                "python -c pass": [sys.executable, "-c", "pass"],
                "kr --version": [KR, "--version"],
                "kr --help": [KR, "--help"],
                "kr task list": [KR, "task", "list"],
                "kr task list (tty)": [KR, "task", "list"],
                "kr task list --json": [KR, "task", "list", "--json"],
                "kr ssh proxy-command": [
                    KR,
                    "ssh",
                    "proxy-command",
                    "--proxy-port",
                    str(cluster.ssh_port),
                    "1",
                ],
                "kr task submit": [KR, "task", "submit", "--", "true"],
                "kr task submit (click)": [sys.executable, "-c", CLICK_ONLY, "task", "submit", "--", "true"],
            }
            envs = {"kr task submit": submit_env, "kr task submit (click)": submit_env}
            check = subprocess.run([KR, "task", "list"], env=env, capture_output=True, text=True)
            assert check.returncode == 0 and check.stdout.count("\n") >= 5, check.stdout + check.stderr
            for name in envs:  # each prints the new task's id
                check = subprocess.run(commands[name], env=envs[name], capture_output=True, text=True)
                assert check.returncode == 0 and check.stdout.strip().isdigit(), check.stdout + check.stderr
            for name, argv in commands.items():  # warm-up: page cache, .pyc files
                timed(argv, envs.get(name, env), name in TTY)
            times: dict[str, list[float]] = {name: [] for name in commands}
            for _ in range(args.runs):
                for name, argv in commands.items():
                    times[name].append(timed(argv, envs.get(name, env), name in TTY))
        finally:
            cluster.stop()
    base = statistics.median(times["python -c pass"])
    print(f"runs: {args.runs} each, interleaved; {os.cpu_count()} CPUs")
    print(f"  {'command':<24} {'median':>9} {'p90':>9} {'x python':>9}   goal")
    for name, values in times.items():
        med = statistics.median(values)
        goal = GOALS_MS.get(name)
        verdict = "" if goal is None else f"< {goal} ms: {'met' if med * 1000 < goal else 'NOT met'}"
        print(f"  {name:<24} {med * 1000:7.1f}ms {p90(values) * 1000:7.1f}ms {med / base:8.2f}x   {verdict}")


if __name__ == "__main__":
    main()
