"""Give the C heap's free pages back to the kernel once a round's large transient arrays
are gone.

glibc keeps freed blocks below its (self-raising) mmap threshold in the heap; a round
close frees an accumulator and a result as large as the global adapter, in blocks of a
module's size, and without a trim they stay resident into the next round: measured with
a 128 MiB adapter, 294 MiB anonymous memory after the first close against 32 MiB at
idle (bench/transfer_bench.py). `malloc_trim(0)` returns every free page of every arena
(madvise), in a few milliseconds. A no-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

__all__ = ["trim"]


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_trim = _malloc_trim()


def trim() -> None:
    """Return free heap pages to the kernel (blocking: a few ms; call it off the event loop)."""
    if _trim is not None:
        _trim(0)
