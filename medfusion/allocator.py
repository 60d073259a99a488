"""Keep freed memory for reuse instead of handing it back to the OS (glibc only).

Why: NumPy, SciPy and torch allocate their temporaries with ``malloc``; glibc serves blocks
above its (dynamic) mmap threshold with fresh ``mmap`` pages and trims freed heap tops, so every
large temporary costs one page fault per 4 KB page. On 512x512 slices the metrics of one pair
took ~22 000 page faults and about 20 % of their CPU time in them, and volume fusion spent a
large share of its time in the kernel. ``mallopt`` with a fixed mmap threshold of 32 MB (glibc's
maximum) and a 256 MB trim threshold serves such temporaries from the heap and reuses them: the
faults vanish and the peak memory does not grow (freed memory is reused, not added to). Volume
arrays (hundreds of MB) are still mapped and returned as before.

The command line calls :func:`keep_freed_memory` once at start; ``MEDFUSION_MALLOC_TUNING=0``
turns it off. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc refuses more than HEAP_MAX_SIZE / 2 (32 MB)
TRIM_THRESHOLD_BYTES = 256 * 2**20

_done = False


def keep_freed_memory() -> bool:
    """Tune glibc's allocator for large temporaries; True when it was applied (idempotent)."""
    global _done
    if _done:
        return True
    if os.environ.get("MEDFUSION_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _done
