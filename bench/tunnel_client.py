"""Throughput of one TCP connection through the Rust tunnel client, against raw loopback TCP.

    .venv/bin/python bench/tunnel_client.py [--mib 1024] [--window 262144] [--runs 3]

Builds the static client (tunnel-client-rs/build.sh) and the bench example, then runs the example, which
measures raw loopback TCP and then, in the same process, plays the runner (flow control negotiated) for the
real tunnel-client binary started as a child process: one connection runner -> client -> local service
("to container") and one local service -> client -> runner ("from container"). Prints each run, the
median, and the ratio to raw loopback. Traffic stays on 127.0.0.1. Not a test: the numbers depend on the
machine, and on a 2-core machine the runner stand-in, the client and the local service share both cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CRATE = REPO / "tunnel-client-rs"
BINARY = CRATE / "target" / "release" / "tunnel-client"
EXAMPLE = CRATE / "target" / "x86_64-unknown-linux-gnu" / "release" / "examples" / "bench"


def build() -> None:
    subprocess.run(["bash", str(CRATE / "build.sh")], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["cargo", "build", "--release", "--locked", "--example", "bench"],
        cwd=CRATE,
        check=True,
        stderr=subprocess.DEVNULL,
    )


def run_once(mib: int, window: int) -> dict:
    out = subprocess.run(
        [str(EXAMPLE), "--binary", str(BINARY), "--mib", str(mib), "--window", str(window)],
        cwd=CRATE,
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=1024, help="MiB per measurement (default 1024)")
    parser.add_argument("--window", type=int, default=262144, help="per-connection window, both sides")
    parser.add_argument("--runs", type=int, default=3, help="repetitions; the median is reported")
    parser.add_argument("--no-build", action="store_true", help="use the binaries as they are")
    args = parser.parse_args()
    if not args.no_build:
        build()
    runs = []
    for i in range(args.runs):
        r = run_once(args.mib, args.window)
        runs.append(r)
        print(
            f"run {i + 1}: raw loopback {r['raw_loopback_mib_s']:8.1f} MiB/s   "
            f"to container {r['to_container_mib_s']:8.1f} MiB/s   "
            f"from container {r['from_container_mib_s']:8.1f} MiB/s"
        )
    raw = statistics.median(r["raw_loopback_mib_s"] for r in runs)
    to_c = statistics.median(r["to_container_mib_s"] for r in runs)
    from_c = statistics.median(r["from_container_mib_s"] for r in runs)
    print(f"\none TCP connection, {args.mib} MiB, window {args.window} B, median of {args.runs} runs:")
    print(f"  raw loopback TCP            {raw:8.1f} MiB/s")
    print(f"  through tunnel-client, in   {to_c:8.1f} MiB/s   ratio {to_c / raw:.2f}")
    print(f"  through tunnel-client, out  {from_c:8.1f} MiB/s   ratio {from_c / raw:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
