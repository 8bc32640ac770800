"""Let glibc keep freed buffers instead of returning them to the kernel after every frame.

The tunnel data path allocates and frees a 256 KiB buffer per frame (a payload, a read). glibc serves
blocks that large with ``mmap`` and gives them back with ``munmap`` on free, so every frame paid for fresh
pages: page faults and page clearing, expensive under a virtualised kernel (measured with ``perf`` on the
forward chain: several percent of ``kr forward``'s time). Raising the mmap threshold (16 MiB) serves them from
the heap, and raising the trim threshold (64 MiB) keeps freed heap memory for the next frame. The memory
kept is bounded by what flow control lets be in flight, plus the trim threshold. The Rust tunnel client does
the same (``keep_freed_memory`` in its ``main.rs``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 16 << 20, trim_threshold: int = 64 << 20) -> bool:
    """Tune glibc's allocator for the process (call once, at start). False where it does not apply (not
    Linux, not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        mallopt.restype = ctypes.c_int
        mmap_set = mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        return bool(mmap_set) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    return False
