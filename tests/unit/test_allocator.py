"""keep_freed_memory tunes glibc where the project runs (Linux with glibc)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


def _in_fresh_process(call: str) -> str:
    code = f"from kohakuriver_net.allocator import keep_freed_memory as k; print({call})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_thresholds():
    assert _in_fresh_process("k()") == "True"
