"""A VM VPS's start, its memory overhead, and `kr forward` into it against `ssh -L` to it, in one run.

    .venv/bin/python bench/vm.py [--runs 1] [--mib 64]

Starts a real cluster whose runner runs VMs (the end-to-end harness of tests/e2e/test_vm_vps.py: real
`kr host` + `kr runner`, the project's Debian image, QEMU with the accelerator the node chose: TCG on
machines where KVM cannot run stock guests), then for each run creates a VM VPS with a generated key and
reports:

- create -> SSH-ready, split: disk (overlay made), network (address + TAP), seed (ISO written), QEMU
  started, guest ready (sshd answered: the VPS is `running`), the agent's first heartbeat; from the
  runner's step lines (``kohakuriver_net.task_steps``, same monotonic clock as this process);
- inside the guest, from systemd's monotonic timestamps (seconds since the guest's kernel started): the
  kernel, cloud-init (its first unit starting to its last finishing), sshd up, the agent up;
- memory: QEMU's resident set against what the guest uses (MemTotal - MemAvailable) when idle;
- throughput: a download of ``--mib`` MiB from a TCP server in the guest through `kr forward` and through
  `ssh -L` (via the host's SSH proxy, `kr ssh config`), same VM, same run; ratio kr/ssh.

Not a test: the numbers depend on the machine (TCG makes the guest slow; printed at the start).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from tests.e2e.cluster import KR, free_port, wait_until
from tests.e2e.test_vm_vps import VmCluster, image_dir, vm_cluster

STEP_RE = re.compile(r"task (\d+) step (\S+) at ([0-9.]+)")
SPLIT = (
    ("disk", "vm.disk_made"),
    ("network", "vm.network_ready"),
    ("seed", "vm.seed_written"),
    ("QEMU start", "vm.qemu_started"),
    ("sshd answers", "vm.ssh_answered"),
    ("agent heartbeat", "vm.agent_first_heartbeat"),
    ("ready (running)", "vm.ready"),
)
GUEST_UNITS = ("cloud-init-local.service", "cloud-final.service", "ssh.service", "kohakuriver-agent.service")
SERVER = (
    "import socket,sys\n"
    "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('127.0.0.1',9009));"
    "s.listen(4)\n"
    "buf=bytes(1<<20)\n"
    "while True:\n"
    " c,_=s.accept()\n"
    " try:\n"
    "  n=int(c.recv(32).decode() or 0)\n"  # the port probes connect and close at once
    "  for _ in range(n): c.sendall(buf)\n"
    " except (OSError,ValueError): pass\n"
    " c.close()\n"
)


def steps(log: str, task_id: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for match in STEP_RE.finditer(log):
        if match.group(1) == task_id:
            found.setdefault(match.group(2), float(match.group(3)))
    return found


def guest_timings(vc: VmCluster, task_id: str) -> dict[str, float]:
    """Seconds since the guest's kernel started, from systemd (monotonic microseconds)."""
    props = "InactiveExitTimestampMonotonic,ActiveEnterTimestampMonotonic"
    r = vc.kr_ssh(task_id, "systemctl", "show", "-p", props, *GUEST_UNITS)
    values = [int(line.split("=", 1)[1] or 0) / 1e6 for line in r.stdout.decode().split("\n") if "=" in line]
    out: dict[str, float] = {}
    for i, unit in enumerate(GUEST_UNITS):
        started, active = values[2 * i], values[2 * i + 1]
        out[unit] = active
        out[unit + " start"] = started
    r = vc.kr_ssh(task_id, "systemd-analyze")
    kernel = re.search(r"([0-9.]+)s \(kernel\)", r.stdout.decode())
    out["kernel"] = float(kernel.group(1)) if kernel else float("nan")
    return out


def agent_healthy(vc: VmCluster, task_id: str) -> bool:
    return (vc.status(task_id).get("vm_health") or {}).get("agent") == "healthy"


def rss_kib(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def download(port: int, mib: int) -> float:
    """MiB/s of a ``mib`` MiB download from the guest's server through a local port."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        started = time.monotonic()
        s.sendall(str(mib).encode())
        got = 0
        while got < mib << 20:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got += len(chunk)
        elapsed = time.monotonic() - started
    if got != mib << 20:
        raise RuntimeError(f"downloaded {got} bytes of {mib << 20}")
    return mib / elapsed


def wait_port(port: int, timeout: float = 60) -> None:
    def up() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True

    wait_until(up, timeout, f"local port {port}", interval=0.3)


def throughput(vc: VmCluster, task_id: str, mib: int, root: pathlib.Path) -> tuple[float, float]:
    r = vc.kr_ssh(
        task_id, f"cat > /root/srv.py <<'EOF'\n{SERVER}EOF\n(setsid python3 /root/srv.py >/dev/null 2>&1 &)"
    )
    assert r.returncode == 0, r.stderr
    # Python starts slowly under TCG: wait until the server listens in the guest.
    listening = "for i in $(seq 100); do ss -ltn | grep -q ':9009 ' && exit 0; sleep 0.2; done; exit 1"
    r = vc.kr_ssh(task_id, listening)
    assert r.returncode == 0, f"the guest's server did not start: {r.stderr!r}"
    kr_port, ssh_port = free_port(), free_port()
    cfg = root / "ssh_config"
    vc.kr("ssh", "config", "--output", str(cfg))
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True}
    tunnel = f"{ssh_port}:127.0.0.1:9009"
    procs = [
        subprocess.Popen([KR, "forward", task_id, "9009", "--local-port", str(kr_port)], env=vc.env, **quiet),
        subprocess.Popen(
            ["ssh", "-F", str(cfg), "-N", "-L", tunnel, f"kohakuriver-{task_id}"], env=vc.env, **quiet
        ),
    ]
    try:
        wait_port(kr_port)
        wait_port(ssh_port)
        time.sleep(1)
        kr_rates, ssh_rates = [], []
        for _ in range(3):
            kr_rates.append(download(kr_port, mib))
            ssh_rates.append(download(ssh_port, mib))
        return statistics.median(kr_rates), statistics.median(ssh_rates)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--mib", type=int, default=64)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="kr-bench-vm-") as tmp:
        root = pathlib.Path(tmp)
        images = image_dir(root)
        with vm_cluster(root, images) as vc:
            (name,) = vc.cluster.runners
            node = vc.cluster.api("GET", f"/api/nodes/{name}")
            vm = node.get("vm") or {}
            print(f"accelerator: {vm.get('accel')} ({vm.get('reason')}); QEMU {vm.get('qemu_version')}")
            for run in range(args.runs):
                started = time.monotonic()
                task_id = vc.create_vm("--gen-ssh-key", timeout=900)
                ready = time.monotonic() - started
                vc.wait_ssh(task_id, timeout=120)
                wait_until(lambda tid=task_id: agent_healthy(vc, tid), 120, "the agent's heartbeat")
                marks = steps(vc.cluster.runners[name].log(), task_id)
                print(f"\nrun {run + 1}: VM {task_id}: `kr vps create --wait` took {ready:.1f} s")
                print(f"  {'step (runner)':<24}{'since accept':>14}{'since previous':>16}")
                base = marks.get("runner.execute_received") or min(marks.values(), default=0.0)
                previous = base
                for label, key in SPLIT:
                    if key in marks:
                        at = marks[key]
                        print(f"  {label:<24}{at - base:>13.2f}s{at - previous:>15.2f}s")
                        previous = at
                guest = guest_timings(vc, task_id)
                print(f"  {'in the guest':<24}{'since kernel start':>20}")
                print(f"  {'kernel done':<24}{guest['kernel']:>19.2f}s")
                print(f"  {'cloud-init':<24}{guest['cloud-init-local.service start']:>10.2f}s -> "
                      f"{guest['cloud-final.service']:.2f}s")  # fmt: skip
                print(f"  {'sshd up':<24}{guest['ssh.service']:>19.2f}s")
                print(f"  {'agent up':<24}{guest['kohakuriver-agent.service']:>19.2f}s")
                time.sleep(10)
                (pid,) = vc.qemu_pids(task_id)
                health = vc.status(task_id)["vm_health"]
                used = (health["memory_total_bytes"] - health["memory_available_bytes"]) >> 10
                rss = rss_kib(pid)
                print(f"  memory: QEMU RSS {rss / 1024:.0f} MiB, guest uses {used / 1024:.0f} MiB "
                      f"(overhead {(rss - used) / 1024:.0f} MiB over what the guest uses)")  # fmt: skip
                kr_rate, ssh_rate = throughput(vc, task_id, args.mib, root)
                print(f"  download {args.mib} MiB: kr forward {kr_rate:.1f} MiB/s, "
                      f"ssh -L {ssh_rate:.1f} MiB/s, ratio {kr_rate / ssh_rate:.2f}x")  # fmt: skip
                vc.kr("vps", "kill", task_id, check=False)
    print(f"\nload at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
