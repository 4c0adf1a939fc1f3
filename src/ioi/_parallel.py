"""Running independent pieces of a stage on the machine's cores (threads).

numpy's element-wise loops, sorts and scipy.ndimage filters release the GIL,
so disjoint row chunks or frames run in parallel on threads without copying
data to other processes.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor


def thread_map(fn, items, workers: int | None = None) -> list:
    """``[fn(x) for x in items]``, in order, on up to ``workers`` threads (default:
    the machine's cores); serially when one would do.  The first exception raised
    by ``fn`` (in item order) propagates."""
    items = list(items)
    n = min(workers or os.cpu_count() or 1, len(items))
    if n > 1:
        with ThreadPoolExecutor(max_workers=n) as pool:
            return list(pool.map(fn, items))
    return [fn(x) for x in items]
