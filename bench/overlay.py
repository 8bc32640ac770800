"""The VXLAN overlay against the underlay it runs on: throughput, round trips and CPU, hub and mesh.

    .venv/bin/python bench/overlay.py [--seconds 5] [--repeat 3] [--rounds 2000] [--modes hub,mesh]
                                      [--host-on-bridge]

For each mode, a real cluster with the topology of tests/e2e/test_overlay.py (real `kr host` in its own
network namespace, two real `kr runner`s whose VXLAN endpoints sit in namespaces of their own, one Docker
engine), two task containers, one per runner, then in the same run, ``--repeat`` rounds of overlay,
underlay and bare VXLAN one after the other (a shared machine's load drifts: each round's ratio compares
runs seconds apart; the medians and the spread of the rounds are printed):

- throughput: iperf3 (TCP, one stream, ``--seconds``) from the container on runner 0 to the container on
  runner 1 by overlay address, against iperf3 between the two runners' underlay namespaces (the path the
  VXLAN packets take: veth, the underlay bridge, veth). iperf3 runs in the containers' network namespaces
  (``nsenter -n``, the machine's iperf3: the test image has none), which is the containers' own path.
  Goal: at least 0.85x of the underlay (bare VXLAN between two namespaces measured 0.87x here). Hub mode
  crosses VXLAN twice (runner -> host -> runner) and is expected lower.
- round trip: ``--rounds`` one-byte TCP ping-pongs over one connection, overlay against underlay; the
  overhead is the difference of the means.
- reference: iperf3 over a plain VXLAN link between the same two underlay namespaces (no bridge, routing,
  firewall or container), to tell what VXLAN itself costs from what the overlay's path adds.
- CPU per GiB: the machine's busy CPU time during the iperf3 run (``/proc/stat``, every core) less the CPU
  time of every other process (``/proc/PID/stat``: a VM or a build running beside the bench is not counted),
  divided by the GiB moved. What is left is iperf3's own time and the kernel's network work wherever it ran
  (softirq in any context, ksoftirqd). Every namespace shares this machine's CPUs, so in hub mode this
  includes the host's decap and encap; mesh against hub shows what the host no longer does.
- ``--host-on-bridge``: the host's underlay address on the underlay bridge itself (not on a port of it).
  A Linux bridge has no encapsulation offloads, so the kernel segments and checksums in software every
  GSO packet the host sends into VXLAN: in hub mode, everything it relays (see docs/benchmarks.md).

One iperf3 stream's whole path runs on this machine's CPUs, so the overlay's cost adds up here: a runner's
bridge, routing and firewall on both sides, and in hub mode the host's decap, routing and encap, where
between real machines each does its part on its own CPUs.

Not a test: numbers depend on the machine (printed at the start); the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from tests.e2e.cluster import TEST_IMAGE, local_image, wait_until
from tests.e2e.test_overlay import OverlayCluster, overlay_cluster

GIB = 1 << 30
IPERF_PORT = 5201
PINGPONG_PORT = 7300

# One-byte ping-pong: the server echoes every byte; the client prints the mean round trip in microseconds.
PINGPONG_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while data := c.recv(1):
    c.sendall(data)
"""
PINGPONG_CLIENT = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
n = int(sys.argv[3])
for _ in range(100):
    c.sendall(b"x"); c.recv(1)
samples = []
for _ in range(n):
    t = time.perf_counter_ns(); c.sendall(b"x"); c.recv(1); samples.append(time.perf_counter_ns() - t)
samples.sort()
print(sum(samples) / n / 1000, samples[n // 2] / 1000)
"""


def container_pid(task_id: str) -> int:
    out = subprocess.run(
        ["docker", "inspect", "-f", "{{.State.Pid}}", f"kohakuriver-task-{task_id}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(out.stdout.strip())


def in_container(task_id: str) -> list[str]:
    return ["nsenter", "-t", str(container_pid(task_id)), "-n"]


def in_netns(name: str) -> list[str]:
    return ["ip", "netns", "exec", name]


TICK = os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """All cores' non-idle time so far, in seconds (``/proc/stat``)."""
    fields = [int(x) for x in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / TICK


def process_seconds() -> dict[int, tuple[str, float]]:
    """Every process's name and CPU time so far (user + system, all its threads), by pid."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = pathlib.Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        found[int(entry.name)] = (name, (int(fields[11]) + int(fields[12])) / TICK)
    return found


class PathCpu:
    """The machine's busy time over a span less every other process's: what the measured path cost."""

    def __init__(self, ours: set[int]) -> None:
        self.ours = ours
        self.busy = busy_seconds()
        self.procs = process_seconds()

    def seconds(self) -> float:
        busy = busy_seconds() - self.busy
        others = 0.0
        for pid, (name, seconds) in process_seconds().items():
            before = self.procs.get(pid)
            # iperf3 itself and ksoftirqd (network work deferred to a thread) are the path; the rest is not.
            if before is None or pid in self.ours or name.startswith(("iperf3", "ksoftirqd")):
                continue
            others += seconds - before[1]
        return max(busy - others, 0.0)


def iperf(
    server_prefix: list[str], client_prefix: list[str], address: str, seconds: int
) -> tuple[float, float]:
    """(Gbit/s received, the path's CPU seconds per GiB) of one iperf3 TCP run from client to server."""
    server = subprocess.Popen(
        [*server_prefix, "iperf3", "-s", "-1", "-B", address, "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(0.5)
        cpu = PathCpu({server.pid})
        done = subprocess.run(
            [*client_prefix, "iperf3", "-c", address, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"],
            capture_output=True, text=True, timeout=seconds + 60,
        )  # fmt: skip
        used = cpu.seconds()
        if done.returncode != 0:
            raise RuntimeError(f"iperf3 failed: {done.stdout[-500:]} {done.stderr[-500:]}")
        result = json.loads(done.stdout)["end"]["sum_received"]
        return result["bits_per_second"] / 1e9, used / (result["bytes"] / GIB)
    finally:
        server.kill()
        server.wait(5)


def pingpong(
    server_prefix: list[str], client_prefix: list[str], address: str, rounds: int
) -> tuple[float, float]:
    """(mean, median) round trip in microseconds over one TCP connection."""
    server = subprocess.Popen(
        [*server_prefix, sys.executable, "-c", PINGPONG_SERVER, address, str(PINGPONG_PORT)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        done = subprocess.run(
            [*client_prefix, sys.executable, "-c", PINGPONG_CLIENT, address, str(PINGPONG_PORT), str(rounds)],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        mean, median = (float(x) for x in done.stdout.split())
        return mean, median
    finally:
        server.kill()
        server.wait(5)


#: Per path: one (Gbit/s, CPU seconds per GiB) per round; per round trip: (mean, median) microseconds.
Results = dict[str, list[tuple[float, float]]]


def measure(oc: OverlayCluster, seconds: int, rounds: int, repeat: int) -> Results:
    client = oc.submit(0, "sleep", "3600")
    server = oc.submit(1, "sleep", "3600")
    server_ip = oc.cluster.task(server)["overlay_ip"]
    u0, u1 = oc.runners[0], oc.runners[1]
    # The first packets resolve neighbours across VXLAN: wait until a few round trips go through.
    wait_until(
        lambda: pingpong(in_container(server), in_container(client), server_ip, 10), 30, "the overlay path"
    )
    over, under = in_container(server), in_netns(u1.underlay_ns)
    paths = {
        "overlay": (over, in_container(client), server_ip),
        "underlay": (under, in_netns(u0.underlay_ns), u1.underlay),
        "bare vxlan": (under, in_netns(u0.underlay_ns), BARE[1]),
    }
    out: Results = {name: [] for name in paths}
    with bare_vxlan(oc):
        for _ in range(repeat):
            for name, (server_prefix, client_prefix, address) in paths.items():
                out[name].append(iperf(server_prefix, client_prefix, address, seconds))
    out["overlay rtt"] = [pingpong(over, in_container(client), server_ip, rounds)]
    out["underlay rtt"] = [pingpong(under, in_netns(u0.underlay_ns), u1.underlay, rounds)]
    return out


def ratios(r: Results, name: str, index: int) -> tuple[float, float, float]:
    """(median, lowest, highest) over the rounds of ``name``'s value against the underlay's in that round."""
    values = [a[index] / b[index] for a, b in zip(r[name], r["underlay"], strict=True)]
    return statistics.median(values), min(values), max(values)


def median(r: Results, name: str, index: int) -> float:
    return statistics.median(x[index] for x in r[name])


def report(mode: str, r: Results) -> None:
    o_gbps, u_gbps, b_gbps = (median(r, n, 0) for n in ("overlay", "underlay", "bare vxlan"))
    o_cpu, u_cpu, b_cpu = (median(r, n, 1) for n in ("overlay", "underlay", "bare vxlan"))
    (o_mean, o_med), (u_mean, u_med) = r["overlay rtt"][0], r["underlay rtt"][0]
    tp, tp_lo, tp_hi = ratios(r, "overlay", 0)
    cpu, cpu_lo, cpu_hi = ratios(r, "overlay", 1)
    bare, bare_lo, bare_hi = ratios(r, "bare vxlan", 0)
    print(f"\n{mode} ({len(r['overlay'])} rounds; medians, and the rounds' lowest-highest ratio):")
    print(f"  throughput  overlay {o_gbps:6.2f} Gbit/s  underlay {u_gbps:6.2f} Gbit/s  "
          f"ratio {tp:.2f}x ({tp_lo:.2f}-{tp_hi:.2f}; goal >= 0.85x)")  # fmt: skip
    print(f"  round trip  overlay {o_mean:7.1f} us (median {o_med:.1f})  underlay {u_mean:7.1f} us "
          f"(median {u_med:.1f})  overhead {o_mean - u_mean:+.1f} us")  # fmt: skip
    print(f"  CPU per GiB overlay {o_cpu:6.3f} s  underlay {u_cpu:6.3f} s  "
          f"ratio {cpu:.2f}x ({cpu_lo:.2f}-{cpu_hi:.2f})")  # fmt: skip
    print(f"  reference   bare VXLAN, same namespaces {b_gbps:6.2f} Gbit/s "
          f"({bare:.2f}x, {bare_lo:.2f}-{bare_hi:.2f}), CPU per GiB {b_cpu:.3f} s; "
          f"overlay/bare {o_gbps / b_gbps:.2f}x")  # fmt: skip


#: Addresses of the bare VXLAN pair (a reference: VXLAN alone between the same two namespaces).
BARE = ("10.251.255.1", "10.251.255.2")


@contextlib.contextmanager
def bare_vxlan(oc: OverlayCluster) -> Iterator[None]:
    """A plain VXLAN link between the runners' underlay namespaces, no bridge, routing or firewall: what the
    overlay costs beyond VXLAN itself."""
    sides = oc.runners
    for i, side in enumerate(sides):
        other = sides[1 - i]
        ip = ["ip", "-n", side.underlay_ns]
        subprocess.run([*ip, "link", "add", "krbare", "type", "vxlan", "id", "4000", "local", side.underlay,
                        "remote", other.underlay, "dstport", "4790", "nolearning"], check=True)  # fmt: skip
        subprocess.run([*ip, "link", "set", "krbare", "mtu", "1450", "up"], check=True)
        subprocess.run([*ip, "addr", "add", f"{BARE[i]}/30", "dev", "krbare"], check=True)
    try:
        yield
    finally:
        for side in sides:
            subprocess.run(["ip", "-n", side.underlay_ns, "link", "del", "krbare"], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of overlay, underlay, bare VXLAN")
    parser.add_argument("--rounds", type=int, default=2000, help="one-byte round trips")
    parser.add_argument("--modes", default="hub,mesh")
    parser.add_argument("--host-on-bridge", action="store_true", help="the host's address on the bridge")
    args = parser.parse_args()
    for program in ("iperf3", "nsenter", "ip"):
        if shutil.which(program) is None:
            sys.exit(f"{program} is not installed (scripts/setup.sh installs it)")
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces, VXLAN, iptables)")
    local_image(TEST_IMAGE, "busybox.sh")
    where = "on the underlay bridge" if args.host_on_bridge else "on a port of the underlay bridge"
    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, {os.uname().release}; "
          f"the host's underlay address {where}")  # fmt: skip
    results: dict[str, Results] = {}
    for mode in args.modes.split(","):
        with (
            tempfile.TemporaryDirectory(prefix="kr-bench-overlay-") as tmp,
            overlay_cluster(pathlib.Path(tmp), mode, host_on_bridge=args.host_on_bridge) as oc,
        ):
            results[mode] = measure(oc, args.seconds, args.rounds, args.repeat)
        report(mode, results[mode])
    if "hub" in results and "mesh" in results:
        hub, mesh = results["hub"], results["mesh"]
        print("\nmesh against hub:")
        print(f"  throughput {median(mesh, 'overlay', 0) / median(hub, 'overlay', 0):.2f}x, "
              f"CPU per GiB {median(mesh, 'overlay', 1) / median(hub, 'overlay', 1):.2f}x, "
              f"round trip {mesh['overlay rtt'][0][0] - hub['overlay rtt'][0][0]:+.1f} us")  # fmt: skip


if __name__ == "__main__":
    main()
