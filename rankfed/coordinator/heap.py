"""The C heap and a round's large arrays: what glibc keeps resident, and how not to.

A round allocates arrays as large as the global adapter, in blocks of a module's size:
the accumulator (at its start), the result and the redistributed copies (at its close and
the next start). glibc raises its mmap threshold (up to 32 MiB) each time a mapped block
is freed, so after the first round such blocks come from the heap, and a freed heap stays
resident: with a 128 MiB adapter the coordinator's peak RSS was 453 MiB, growing with the
heap left by earlier rounds (bench/transfer_bench.py).

`mapped_blocks()` lowers the threshold to 128 KiB while those arrays are allocated: each
gets a mapping of its own, returned to the kernel when freed (peak RSS 453 -> 330 MiB).
Outside it the threshold stays high, so the ingest's per-chunk buffers are reused from the
heap (with glibc's trim threshold at twice the mmap threshold, as its dynamic mode sets
it): a low threshold everywhere cost a page fault per 4 KiB of every received chunk,
+1.6 to 3.4 ms of coordinator CPU per uploaded MiB on the benchmark VM (and the same in a
bare grpcio server). `keep_buffers()` sets that high threshold at start-up, so the first
round's chunks are reused too (glibc's dynamic mode trims the heap's top whenever more
than twice the last freed block is free, so a stream of 1 MiB messages faulted its
buffers in again and again). `limit_arenas()` caps the per-thread heaps. `trim()` returns
the heap's free pages after a close. All are no-ops off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["keep_buffers", "limit_arenas", "mapped_blocks", "trim"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
LOW = 128 * 1024  # glibc's initial threshold
HIGH = 32 * 1024 * 1024  # the highest its dynamic threshold reaches on 64-bit


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


_lib = _libc()
_lock = threading.Lock()
_depth = 0


def _set_threshold(value: int) -> None:
    if _lib is not None:
        _lib.mallopt(_M_MMAP_THRESHOLD, value)
        # A fixed mmap threshold also freezes the trim threshold at 128 KiB (glibc's dynamic
        # mode keeps it at twice the mmap threshold): the heap's top was then given back
        # after every freed 1 MiB chunk and faulted in again for the next, 0.44 against
        # 0.025 CPU ms per 1 MiB buffer (downloads 0.9 -> 5.5 ms/MiB in transfer_bench).
        _lib.mallopt(_M_TRIM_THRESHOLD, 2 * HIGH)


def limit_arenas(arenas: int = 2) -> None:
    """Cap glibc's per-thread malloc arenas; call it before any thread starts. Upload and
    aggregation threads otherwise each grow an arena of freed megabyte buffers: measured
    with 128 MiB adapters, peak RSS 1540 MiB climbing every round, against 1022 MiB and
    flat with 2 arenas (docs/benchmarks.md). Same effect as MALLOC_ARENA_MAX=2."""
    if _lib is not None:
        _lib.mallopt(_M_ARENA_MAX, arenas)


def keep_buffers() -> None:
    """The threshold outside `mapped_blocks()` from the start: blocks below 32 MiB come from
    the heap, and up to 64 MiB of it stays free at its top, so a stream's message buffers
    are reused, not mapped and faulted in per message. The same in a bare grpc.aio server
    receiving 128 MiB in 1 MiB messages: 0.94 -> 0.47 server CPU ms per MiB, 1026 -> 1846
    MiB/s (bench/transfer_bench.py, its "kept heap" rows)."""
    with _lock:
        if _depth == 0:
            _set_threshold(HIGH)


@contextmanager
def mapped_blocks() -> Iterator[None]:
    """Blocks of 128 KiB or more allocated inside (by any thread) get mappings of their own."""
    global _depth
    with _lock:
        _depth += 1
        if _depth == 1:
            _set_threshold(LOW)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set_threshold(HIGH)


def trim() -> None:
    """Return free heap pages to the kernel (blocking: a few ms; call it off the event loop)."""
    if _lib is not None:
        _lib.malloc_trim(0)


