"""Process-level memory setting (the command-line edge).

glibc raises its mmap threshold dynamically: once a large array has been
freed, later arrays of that size come from the heap, whose freed pages are
kept by the process.  A reduction allocates and frees many frame-sized
arrays (16 MB at 2040x2040 float32), so the resident size grew to the sum of
every stage's peak rather than the largest one (1.8 GB instead of 1.3 GB for
a 9-dither multrun).  Fixing the threshold makes every large array a mapping
of its own, returned to the system when freed.  No maintained library sets
this; numpy leaves allocation to the C library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_THRESHOLD = 8 << 20  # 8 MiB: frame-sized arrays are mapped, row-chunk temporaries are not


def return_freed_memory_to_os() -> bool:
    """Fix glibc's mmap threshold (Linux only; elsewhere nothing happens). True when set."""
    if not sys.platform.startswith("linux"):
        return False
    threshold = os.environ.get("IOI_MMAP_THRESHOLD", "")
    try:
        threshold = int(threshold) if threshold.strip() else _THRESHOLD
    except ValueError:
        log.warning("IOI_MMAP_THRESHOLD=%r is not a whole number of bytes: ignored", threshold)
        threshold = _THRESHOLD
    if threshold <= 0:  # 0: leave glibc's dynamic threshold alone
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    log.debug("glibc mmap threshold fixed at %d bytes: %s", threshold, ok)
    return ok
