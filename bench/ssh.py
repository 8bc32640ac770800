"""SSH through the host's SSH proxy against direct SSH to the VPS's published port, measured in the same run.

    .venv/bin/python bench/ssh.py [--runs 20] [--mib 256] [--copies 2] [--trace 20]

Starts a real cluster (`kr host` + `kr runner` processes: the end-to-end harness, tests/e2e/cluster.py),
creates a Docker VPS from kohakuriver/sshd:latest with `kr vps create --gen-ssh-key`, then measures four paths
with the same OpenSSH client, key and options:

- direct: `ssh -p <the VPS's published port> root@127.0.0.1` (the baseline: no proxy at all);
- kr proxy-command: `ProxyCommand kr ssh proxy-command --proxy-port P ID` (what the entries of `kr ssh config`
  use; includes kr's Python start-up on every connection);
- minimal: `ProxyCommand sh -c '{ printf "REQUEST_TUNNEL ID\\n"; exec cat; } | exec socat - TCP:...'`, the
  seed's unauthenticated handshake with no Python on the client side. OpenSSH ignores lines the server sends
  before its `SSH-2.0-` banner (RFC 4253 section 4.2), so the proxy's `SUCCESS` line needs no stripping;
- `kr ssh ID -- true` (setup only): what a user types, with no host key option: the VPS's key is pinned in
  kohakuriver's known_hosts by the first run (before anything is timed), so ssh starts at once and `kr` opens
  the tunnel meanwhile; ssh gets the connected socket from its ProxyCommand, `tunnel-client --fdpass` (the
  static Rust binary, when built: ProxyUseFdpass; kohakuriver_cli/ssh_fast.py);
- the same with the Python fd passer (`KOHAKURIVER_TUNNEL_CLIENT=`: a `python -S` one-liner), what `kr ssh`
  uses where no tunnel-client binary is found;
- `kr ssh ID -- true` through the click command (setup only, for comparison): the CLI's imports, the
  host's /api/health for the proxy port, and `kr ssh proxy-command` as ProxyCommand relaying every byte.

Every timed process runs without PYTHONDONTWRITEBYTECODE (a development shell may set it): `kr` is timed as
installed, with its modules' bytecode compiled (the warm-up runs write it), not Python's compiler.

`--trace N`: where the time of `kr ssh ID` goes, from N more runs of it (each passer) and of direct ssh
under `strace --seccomp-bpf` (only execve, connect and sendmsg stop the traced processes): medians, from the
start of `kr` (or of ssh, for direct), of ssh's start, its ProxyCommand's start, the fd passer asking `kr` for
the socket, `kr` connecting to the SSH proxy, ssh holding the tunnel (the passer's `sendmsg`; for direct,
its `connect`) and the end. strace adds a little to every traced call; compare the columns, not the totals
with the untraced table.

For each: connection setup time (`ssh ... true`, median and p90 of --runs), and scp throughput of --mib MiB
up (to /dev/null in the VPS) and down (to /dev/null here), best of --copies. Goals (issue "VPS and SSH"):
setup overhead of the proxy under 20 ms, throughput at least 0.9 of direct. Not a test: numbers depend on the
machine; on a 2-core machine ssh, sshd, the proxy and the copy share both cores.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.cluster import KR, Cluster, free_port, wait_until  # noqa: E402

SSHD_IMAGE = "kohakuriver/sshd:latest"
MIB = 1 << 20


class Paths:
    """The ssh argv prefix (everything before the destination) of each path, and its destination."""

    def __init__(self, tmp: Path, cluster: Cluster, task_id: str, key: Path, vps_port: int) -> None:
        self.env = dict(cluster.env, HOME=str(tmp / "home"), KOHAKURIVER_TOKEN=cluster.admin_token)
        self.env.pop("SSH_AUTH_SOCK", None)
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)  # kr as installed: its bytecode compiled once
        common = ["-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                  "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={tmp / 'known_hosts'}",
                  "-o", "LogLevel=ERROR", "-o", f"HostKeyAlias=kohakuriver-{task_id}"]  # fmt: skip
        kr_proxy = shlex.join([KR, "ssh", "proxy-command", "--proxy-port", str(cluster.ssh_port), task_id])
        # No '%' anywhere: ssh expands %-tokens in ProxyCommand. The task id is decimal (from the host).
        minimal = (
            f'sh -c \'{{ printf "REQUEST_TUNNEL {task_id}\\n"; exec cat; }} '
            f"| exec socat - TCP:127.0.0.1:{cluster.ssh_port}'"
        )
        self.ssh_options = {
            "direct": ([*common, "-p", str(vps_port)], "root@127.0.0.1"),
            "kr proxy-command": ([*common, "-o", f"ProxyCommand={kr_proxy}"], "root@vps"),
            "minimal proxy": ([*common, "-o", f"ProxyCommand={minimal}"], "root@vps"),
        }
        # What a user types: no host key option (kr ssh pins the VPS's key in KOHAKURIVER_HOME/known_hosts on
        # its first run, before anything is timed, and ssh checks it there).
        self.kr_ssh = [KR, "ssh", task_id, "--key", str(key), "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]
        # The same command, but into the click CLI directly (what `kr ssh` was before its fast path).
        click_cli = "import sys; from kohakuriver_cli.main import main; sys.argv[0] = 'kr'; main()"
        self.kr_ssh_click = [sys.executable, "-c", click_cli, *self.kr_ssh[1:]]

    def ssh(self, name: str, *command: str) -> list[str]:
        options, dest = self.ssh_options[name]
        return ["ssh", *options, dest, *command]

    def scp(self, name: str, source: str, target: str) -> list[str]:
        options, dest = self.ssh_options[name]
        # scp spells the port -P; everything else is the same -o/-i set
        options = ["-P" if o == "-p" else o for o in options]
        return ["scp", "-q", *options, source.replace("VPS:", f"{dest}:"), target.replace("VPS:", f"{dest}:")]


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, timeout=300)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} -> {proc.returncode}: {proc.stderr.decode()[-500:]}")
    return elapsed


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="ssh ... true runs per path")
    parser.add_argument("--mib", type=int, default=256, help="MiB per scp transfer")
    parser.add_argument("--copies", type=int, default=2, help="scp transfers per direction (best is kept)")
    parser.add_argument("--trace", type=int, default=0, help="strace'd runs for the timeline (0: none)")
    args = parser.parse_args()

    if subprocess.run(["docker", "image", "inspect", SSHD_IMAGE], capture_output=True).returncode != 0:
        subprocess.run(["bash", str(REPO / "scripts/images/sshd.sh")], check=True)
    with tempfile.TemporaryDirectory(prefix="kr-bench-ssh-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "home" / ".ssh").mkdir(parents=True, mode=0o700)
        cluster = Cluster(tmp / "cluster")
        task_id = None
        try:
            cluster.start_host()
            cluster.add_runner(0, VPS_SSH_PORT_START=free_port())
            # HOME is the temporary one: the generated private key must not land in the real ~/.ssh
            create = [KR, "vps", "create", "-c", "0", "--image", SSHD_IMAGE, "--gen-ssh-key", "--wait"]
            env = dict(cluster.env, HOME=str(tmp / "home"), KOHAKURIVER_TOKEN=cluster.admin_token)
            task_id = subprocess.run(
                create, env=env, capture_output=True, text=True, check=True
            ).stdout.split()[0]
            key = tmp / "home" / ".ssh" / f"kohakuriver_{task_id}"
            paths = Paths(tmp, cluster, task_id, key, cluster.task(task_id)["ssh_port"])
            return run(paths, args, tmp)
        finally:
            cluster.stop()
            if task_id is not None:
                repo = f"kohakuriver-snapshot/vps-{task_id}"
                tags = subprocess.run(["docker", "images", "-q", repo], capture_output=True, text=True).stdout
                if tags.split():
                    subprocess.run(["docker", "rmi", "-f", *tags.split()], capture_output=True)


def run(paths: Paths, args: argparse.Namespace, tmp: Path) -> int:
    env = paths.env
    direct = paths.ssh("direct", "true")
    wait_until(lambda: subprocess.run(direct, env=env, capture_output=True).returncode == 0, 30, "the sshd")
    for name in paths.ssh_options:  # every path works (and warms caches) before anything is timed
        timed(paths.ssh(name, "true"), env)
    python_passer = dict(env, KOHAKURIVER_TUNNEL_CLIENT="")  # ssh_fast.TUNNEL_CLIENT_ENV: no binary
    timed([*paths.kr_ssh, "--", "true"], env)
    timed([*paths.kr_ssh, "--", "true"], python_passer)
    timed([*paths.kr_ssh_click, "--", "true"], env)

    print(f"connection setup (ssh ... true, {args.runs} runs, interleaved), scp of {args.mib} MiB (best of "
          f"{args.copies})", flush=True)  # fmt: skip
    kr_names = ["kr ssh ID", "kr ssh ID (py passer)", "kr ssh ID (click)"]
    setup: dict[str, list[float]] = {name: [] for name in [*paths.ssh_options, *kr_names]}
    for _ in range(args.runs):  # interleaved, so a burst of load on the machine hits every path alike
        for name in paths.ssh_options:
            setup[name].append(timed(paths.ssh(name, "true"), env))
        setup["kr ssh ID"].append(timed([*paths.kr_ssh, "--", "true"], env))
        setup["kr ssh ID (py passer)"].append(timed([*paths.kr_ssh, "--", "true"], python_passer))
        setup["kr ssh ID (click)"].append(timed([*paths.kr_ssh_click, "--", "true"], env))

    nbytes = args.mib * MIB
    blob = tmp / "blob"
    with open(blob, "wb") as f:
        for _ in range(args.mib):
            f.write(os.urandom(MIB))
    timed(paths.ssh("direct", f"head -c {nbytes} /dev/urandom > blob"), env)
    up: dict[str, float] = {}
    down: dict[str, float] = {}
    for name in paths.ssh_options:
        up[name] = min(timed(paths.scp(name, str(blob), "VPS:/dev/null"), env) for _ in range(args.copies))
        down[name] = min(timed(paths.scp(name, "VPS:blob", "/dev/null"), env) for _ in range(args.copies))

    base = statistics.median(setup["direct"])
    for name, times in setup.items():
        p50, p90 = statistics.median(times) * 1e3, pct(times, 90) * 1e3
        line = f"{name:>21}: setup p50 {p50:7.1f} ms  p90 {p90:7.1f} ms"
        if name in up:
            line += (
                f"  scp up {nbytes / up[name] / MIB:7.1f} MiB/s  down {nbytes / down[name] / MIB:7.1f} MiB/s"
            )
        print(line, flush=True)
    print("against direct SSH:")
    for name in [*paths.ssh_options, *kr_names]:
        if name == "direct":
            continue
        overhead = (statistics.median(setup[name]) - base) * 1e3
        line = f"  {name:>21}: setup overhead {overhead:+6.1f} ms"
        if name in up:
            line += (
                f"  scp up {up['direct'] / up[name]:.2f}x  down {down['direct'] / down[name]:.2f}x of direct"
            )
        print(line)
    if args.trace:
        timeline(paths, args.trace, python_passer)
    return 0


# -- where the time goes -------------------------------------------------------------------------------------

PHASES = [
    "ssh started",
    "ProxyCommand started",
    "passer asks kr",
    "kr connects to proxy",
    "ssh has tunnel",
    "end",
]


def traced(argv: list[str], env: dict[str, str]) -> list[tuple[int, float, str]]:
    """``(pid, time, call)`` of each execve/connect/sendmsg of ``argv``'s process tree (strace -f)."""
    with tempfile.NamedTemporaryFile("r", prefix="kr-bench-strace-") as out:
        trace = [
            "strace",
            "--seccomp-bpf",
            "-f",
            "-ttt",
            "-e",
            "trace=execve,connect,sendmsg",
            "-o",
            out.name,
        ]
        proc = subprocess.run([*trace, *argv], env=env, capture_output=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)} -> {proc.returncode}: {proc.stderr.decode()[-500:]}")
        events = []
        for line in out.read().splitlines():
            pid, when, call = line.split(None, 2)
            events.append((int(pid), float(when), call))
    return events


def kr_phases(events: list[tuple[int, float, str]]) -> dict[str, float]:
    kr_pid, start = events[0][0], events[0][1]

    def first(test) -> float:
        return next(when for pid, when, call in events if test(pid, call)) - start

    def is_passer(call: str) -> bool:  # the Rust passer's argv, or the Python one-liner's
        return call.startswith("execve(") and ("--fdpass" in call or '"-S", "-I"' in call)

    passer = next(pid for pid, _, call in events if is_passer(call))
    return {
        "ssh started": first(lambda pid, call: call.startswith("execve(") and '/ssh", [' in call),
        "ProxyCommand started": first(lambda pid, call: pid == passer and call.startswith("execve(")),
        "passer asks kr": first(lambda pid, call: pid == passer and call.startswith("connect(")),
        "kr connects to proxy": first(
            lambda pid, call: pid == kr_pid and call.startswith("connect(") and "AF_INET" in call
        ),
        "ssh has tunnel": first(lambda pid, call: pid == passer and call.startswith("sendmsg(1,")),
        "end": events[-1][1] - start,
    }


def direct_phases(events: list[tuple[int, float, str]]) -> dict[str, float]:
    start = events[0][1]
    connect = next(when for _, when, call in events if call.startswith("connect(") and "AF_INET" in call)
    return {"ssh started": 0.0, "ssh has tunnel": connect - start, "end": events[-1][1] - start}


def timeline(paths: Paths, runs: int, python_passer: dict[str, str]) -> None:
    if subprocess.run(["strace", "-V"], capture_output=True).returncode != 0:
        print("timeline: strace is not installed")
        return
    env = paths.env
    cases = {
        "direct": (paths.ssh("direct", "true"), env, direct_phases),
        "kr ssh ID": ([*paths.kr_ssh, "--", "true"], env, kr_phases),
        "kr ssh ID (py passer)": ([*paths.kr_ssh, "--", "true"], python_passer, kr_phases),
    }
    found: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, (argv, case_env, phases) in cases.items():
            found[name].append(phases(traced(argv, case_env)))
    print(f"timeline (strace'd, {runs} runs, medians in ms from the start of kr, or of ssh for direct):")
    print(f"  {'':>21}  " + "  ".join(f"{phase:>20}" for phase in PHASES))
    for name, rows in found.items():
        cells = [f"{statistics.median(r[p] for r in rows) * 1e3:20.1f}" if p in rows[0] else f"{'':>20}"
                 for p in PHASES]  # fmt: skip
        print(f"  {name:>21}  " + "  ".join(cells))


if __name__ == "__main__":
    raise SystemExit(main())
