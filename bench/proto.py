"""Tunnel frame codec throughput: encode and decode rates of ``kohakuriver_proto.frames``.

Cases: 64 KiB DATA frames (bulk transfer: dominated by the one payload copy of ``encode``) and 1-byte DATA
frames (interactive traffic: dominated by per-frame overhead). Each case runs for a fixed time budget and
prints frames/s and payload GB/s (10**9 bytes/s) for encode alone, decode alone and encode+decode.

    .venv/bin/python bench/proto.py [--seconds 1.0]

Runs in about 9 x --seconds (default: under 10 s). Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import time

from kohakuriver_proto import frames
from kohakuriver_proto.frames import MsgType

CASES = [("DATA 64 KiB", 64 * 1024), ("DATA 1 B", 1)]


def _rate(fn, seconds: float, batch: int) -> float:
    """Calls of ``fn`` per second, measured over about ``seconds`` (``batch`` calls per clock read)."""
    fn()  # warm up
    calls = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            fn()
        calls += batch
        now = time.perf_counter()
        if now >= deadline:
            return calls / (now - start)


def run(seconds: float) -> list[tuple[str, str, float, float]]:
    rows = []
    for name, size in CASES:
        payload = bytes(range(256)) * (size // 256) or b"x" * size
        wire = frames.encode(MsgType.DATA, 7, payload)
        batch = 64 if size > 1024 else 4096

        def encode(payload=payload):
            return frames.encode(MsgType.DATA, 7, payload)

        def decode(wire=wire):
            return frames.decode(wire)

        def both(payload=payload):
            return frames.decode(frames.encode(MsgType.DATA, 7, payload))

        assert bytes(decode().payload) == payload
        for op, fn in (("encode", encode), ("decode", decode), ("encode+decode", both)):
            per_s = _rate(fn, seconds, batch)
            rows.append((name, op, per_s, per_s * size / 1e9))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time budget per measurement")
    args = parser.parse_args()
    rows = run(args.seconds)
    print(f"{'case':<12} {'operation':<14} {'frames/s':>14} {'payload GB/s':>13}")
    print("-" * 56)
    for name, op, per_s, gbps in rows:
        print(f"{name:<12} {op:<14} {per_s:>14,.0f} {gbps:>13.4g}")


if __name__ == "__main__":
    main()
