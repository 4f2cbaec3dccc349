"""The server process's use of glibc's allocator: large freed buffers kept for reuse."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["ARENAS", "KEPT_FREE_BYTES", "keep_freed_memory"]

# mallopt(3) parameters of glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# Freed memory glibc may keep mapped for reuse (keep_freed_memory): after large requests or
# answers the server's RSS stays up to this much above what it holds live.
KEPT_FREE_BYTES = 256 << 20
# Allocator arenas (glibc's default: 8 per core). Each keeps its own freed memory, and gRPC
# starts threads under load, each soon with an arena of its own: with the default, repeated
# 32 MiB requests under CPU contention grew RSS 185 -> 250-275 MB over 8 requests without
# levelling off (4 runs); with 2 it levelled at 205-242 MB (3 runs; tests/test_hostile.py).
ARENAS = 2


def keep_freed_memory() -> bool:
    """Let glibc reuse freed multi-MB buffers instead of handing them back to the OS.

    Each large answer allocates several buffers of megabytes (graph output, wire bytes). By
    default glibc maps and unmaps each one, and faulting in the fresh pages cost more than
    the copies themselves: 10 ms of system time per 1024-sample answer, 1 ms after this
    (docs/performance.md). The price is up to the trim threshold of memory kept mapped in
    each of ``ARENAS`` arenas, which the process's threads share. Variables
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set by an operator win.

    Returns:
        Whether the setting was applied (glibc only).
    """
    if platform.libc_ver()[0] != "glibc" or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(
        libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20)
        and libc.mallopt(_M_TRIM_THRESHOLD, KEPT_FREE_BYTES)
        and libc.mallopt(_M_ARENA_MAX, ARENAS)
    )
