"""Process-level memory settings (the command-line edge), for glibc.

glibc raises its mmap threshold dynamically: once a large array has been
freed, later arrays of that size come from the heap, whose freed pages are
kept by the process.  A reduction allocates and frees many frame-sized
arrays (16 MB at 2040x2040 float32), so the resident size grew to the sum of
every stage's peak rather than the largest one (1.8 GB instead of 1.3 GB for
a 9-dither multrun).  Fixing the threshold makes every large array a mapping
of its own, returned to the system when freed.

The price is that every such array is a fresh mapping whose pages the kernel
must zero (system time).  The pipeline therefore reuses its largest per-dither
arrays (the ramp cube and its saturation flags, ``pipeline._thread_buffer``)
and trims the heap between phases (:func:`release_free_heap`).  Measured on
2026-11-25 (9 dithers, 2 cores, ``make bench``'s case): this fixed threshold,
913-923 MB peak and 4.7-5.0 s; glibc's dynamic threshold, about 1.0 GB and
4.6-4.7 s.  (A large threshold during the ramp phase only was tried: no faster
than dynamic, and as large.)  No maintained library sets these; numpy leaves
allocation to the C library.

``IOI_MMAP_THRESHOLD`` (bytes) overrides the threshold; 0 leaves glibc's own
dynamic threshold alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
import sys

import numpy as np

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 8 << 20  # 8 MiB: frame-sized arrays are mapped, row-chunk temporaries are not

_LIBC = []


def _libc():
    """glibc through ctypes, or None (not Linux, or no C library found)."""
    if not _LIBC:
        libc = None
        if sys.platform.startswith("linux"):
            name = ctypes.util.find_library("c")
            try:
                libc = ctypes.CDLL(name) if name else None
            except OSError:
                libc = None
        _LIBC.append(libc)
    return _LIBC[0]


def _set_threshold(nbytes: int) -> bool:
    libc = _libc()
    if libc is None:
        return False
    try:
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
    except AttributeError:  # not glibc (musl has no mallopt)
        return False


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
    ok = _set_threshold(threshold)
    trim = int(os.environ.get("IOI_TRIM_THRESHOLD", str(64 << 20)))
    if ok and trim > 0:
        _LIBC[0].mallopt(_M_TRIM_THRESHOLD, trim)
    log.debug("glibc mmap threshold fixed at %d bytes: %s", threshold, ok)
    return ok


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``).

    Called between the pipeline's phases: the frame-sized temporaries of one
    phase, freed but kept in the heap for reuse, would otherwise add to the
    next phase's peak.  True when it ran (Linux with glibc)."""
    libc = _libc()
    if libc is None:
        return False
    try:
        libc.malloc_trim(0)
    except AttributeError:
        return False
    return True


class Scratch:
    """Named work arrays reused from one call to the next by one thread (e.g. one
    frame after another): :meth:`get` returns a C-contiguous array of the shape
    and dtype asked for, carved from a buffer kept under that name (a new buffer
    only when the old one is too small).  Contents are whatever the last user
    left: callers overwrite what they read.

    Fresh frame-sized arrays are costly: the kernel zeroes every page on first
    touch (with the fixed mmap threshold above, every time), 15-25 % of the
    pipeline's CPU before work arrays were reused.  One Scratch per thread; not
    thread-safe.
    """

    def __init__(self):
        self._arrays = {}

    def get(self, name: str, shape, dtype) -> np.ndarray:
        shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        buf = self._arrays.get(name)
        if buf is None or buf.size < nbytes:
            self._arrays[name] = None  # drop the old one first (less memory at the peak)
            buf = self._arrays[name] = np.empty(nbytes, dtype=np.uint8)
        return buf[:nbytes].view(dtype).reshape(shape)
