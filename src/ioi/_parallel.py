"""Running independent pieces of a stage on the machine's cores (threads).

numpy's element-wise loops, sorts and scipy.ndimage filters release the GIL,
so disjoint row chunks or frames run in parallel on threads without copying
data to other processes.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

#: Threads of a reduction's parallel phases (two dithers, two frames written and
#: resampled at once): the benchmark machine's 2 cores.
PIPELINE_THREADS = 2


def pipeline_threads() -> int:
    """Threads (or side processes) a reduction's parallel phase uses: PIPELINE_THREADS,
    at most one a core."""
    return max(1, min(PIPELINE_THREADS, os.cpu_count() or 1))

#: Frames of at least this many pixels have sep's calls run in side processes
#: (ioi._sideproc: sep holds the GIL).  Measured on the 9-dither 2048x2048 bench
#: multrun, 2 cores, eight alternate pairs: wall 9.03 -> 8.61 s (median), for
#: 0.6-1.4 s more CPU (the processes' start-up and the copies to them), which
#: smaller frames would not repay.
SIDE_PROCESS_MIN_PIXELS = 2_000_000

#: Environment variables that size the thread pools of numpy's BLAS (OpenBLAS in the
#: wheels; MKL or OpenMP builds elsewhere).
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def one_blas_thread(environ) -> None:
    """Set ``environ``'s BLAS thread counts to 1 where they are not set already.

    The pipeline's only BLAS calls are least-squares fits of a few hundred
    stars; its parallelism is its own threads.  OpenBLAS otherwise starts a
    thread per core when numpy is imported, which costs 0.25-0.35 s of CPU at
    start-up on the 2-core benchmark machine (``import`` of the pipeline:
    1.3-1.6 s of user time against 1.0-1.3 s with one thread).  It only takes
    effect before numpy is first imported (the command-line entry points and
    child processes call it); a value the user set is kept.
    """
    for name in BLAS_THREAD_VARIABLES:
        environ.setdefault(name, "1")


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
