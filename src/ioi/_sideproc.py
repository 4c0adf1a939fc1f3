"""Child processes for library calls that hold the GIL.

sep runs its C code without releasing the GIL (sep-developers/sep#172): on a
thread it stops the pipeline's other threads for as long as it runs, so the
second core idles through source detection.  :class:`SideProcesses` runs
such a call in a child interpreter instead, and the calling thread waits
with the GIL released.  The children import only the called function's
module (:mod:`ioi.stages._sep`: numpy and sep), so one starts in about
0.1 s; they are started on demand, at most ``workers`` of them, and each
serves one call at a time.

Hand-written rather than ``concurrent.futures.ProcessPoolExecutor``: with
the spawn start method that re-imports the parent's main script in every
child (``ioi`` and ``run_pipe`` import the whole pipeline, astropy
included: 1 s and 60 MB a child), and fork is unsafe once threads run.  The
protocol is a length-prefixed pickle each way over the child's stdin and
stdout; array arguments of a megabyte or more travel through a memory-mapped
file that the child maps once, one copy instead of the four of pickling
through a pipe (and no fresh pages: 20 MB cost 60 ms of CPU that way).  If a
child cannot be started or dies, the call (and every later one) runs in the
calling process: the same result, only without the overlap.
"""

from __future__ import annotations

import logging
import mmap
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import threading

import numpy as np

from ioi._parallel import one_blas_thread, pipeline_threads

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<Q")
_SHARE_MIN_BYTES = 1 << 20  # array arguments this large go through the shared file
_ALIGN = 64


class _SharedArray:
    """Stands for an array argument placed in the shared file at ``offset``."""

    def __init__(self, offset: int, shape, dtype):
        self.offset, self.shape, self.dtype = offset, tuple(shape), np.dtype(dtype)

    def __reduce__(self):
        return _SharedArray, (self.offset, self.shape, self.dtype)

    def view(self, buffer) -> np.ndarray:
        return np.ndarray(self.shape, dtype=self.dtype, buffer=buffer, offset=self.offset)


class _SharedFile:
    """A file (in /dev/shm where there is one) mapped here and, by path, in one child."""

    def __init__(self, size: int):
        folder = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        fd, self.path = tempfile.mkstemp(prefix="ioi-side-", dir=folder)
        try:
            os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        os.close(fd)
        self.size = size

    def close(self) -> None:
        self.map.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of ``_ALIGN`` (each array's place in the shared file)."""
    return -(-nbytes // _ALIGN) * _ALIGN


def _is_shared(a) -> bool:
    return isinstance(a, np.ndarray) and a.nbytes >= _SHARE_MIN_BYTES and not a.dtype.hasobject


class ChildLost(Exception):
    """A child process ended or could not be reached."""


def _read_message(stream):
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        return None
    return data


def _write_message(stream, data: bytes) -> None:
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


class _Child:
    def __init__(self, preload=()):
        env = dict(os.environ)
        one_blas_thread(env)  # numpy's BLAS would start a thread per core in each child for nothing
        self.proc = subprocess.Popen([sys.executable, "-m", "ioi._sideproc", *preload], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        self.shared = None  # _SharedFile, grown as calls need

    def _place(self, args, kwargs):
        """The arguments with the large arrays copied into the shared file (replaced by markers)."""
        big = [a for a in list(args) + list(kwargs.values()) if _is_shared(a)]
        if not big:
            return None, args, kwargs
        need = sum(_aligned(a.nbytes) for a in big)
        if self.shared is None or self.shared.size < need:
            if self.shared is not None:
                self.shared.close()  # the child drops its map when it sees a new path
                self.shared = None
            self.shared = _SharedFile(need)
        offset = 0

        def put(a):
            nonlocal offset
            if not _is_shared(a):
                return a
            marker = _SharedArray(offset, a.shape, a.dtype)
            np.copyto(marker.view(self.shared.map), a)
            offset += _aligned(a.nbytes)
            return marker

        return self.shared.path, tuple(put(a) for a in args), {k: put(v) for k, v in kwargs.items()}

    def call(self, fn, args, kwargs):
        try:
            path, args, kwargs = self._place(args, kwargs)
            _write_message(self.proc.stdin, pickle.dumps((path, fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL))
            reply = _read_message(self.proc.stdout)
        except (OSError, ValueError) as exc:  # a broken pipe, or a closed stream
            raise ChildLost(str(exc)) from exc
        if reply is None:
            raise ChildLost(f"exit status {self.proc.poll()}")
        ok, value = pickle.loads(reply)
        if ok:
            return value
        raise value

    def end_input(self) -> None:
        """Close the child's input: its loop ends and it exits (see :meth:`close`)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def close(self) -> None:
        self.end_input()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            self.proc.stdout.close()
            if self.shared is not None:
                self.shared.close()
                self.shared = None


class SideProcesses:
    """Up to ``workers`` child processes running picklable module-level functions.

    ``preload``: modules each child imports as it starts (before the first call).
    ``call(fn, *args, **kwargs)`` returns ``fn(*args, **kwargs)`` computed in a
    child (exceptions are raised again here), blocking only the calling
    thread.  Thread-safe; use as a context manager (or :meth:`close`) so that
    the children end with the work.
    """

    def __init__(self, workers: int = 1, preload=()):
        self.workers = max(1, int(workers))
        self.preload = tuple(preload)
        self._idle: list[_Child] = []
        self._children: list[_Child] = []
        self._cond = threading.Condition()
        self._closed = False
        self._broken = False

    def __enter__(self) -> SideProcesses:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, count: int | None = None) -> SideProcesses:
        """Start children now until ``count`` (default ``workers``, at most that) are running;
        each imports its modules while the caller goes on."""
        count = self.workers if count is None else min(self.workers, int(count))
        with self._cond:
            while not (self._closed or self._broken) and len(self._children) < count:
                child = self._spawn()
                if child is None:
                    break
                self._idle.append(child)
        return self

    def _spawn(self):
        """A new child, counted among the children (under the lock), or None if none can
        start (then every call runs here)."""
        try:
            child = _Child(self.preload)
        except OSError as exc:
            self._give_up(f"cannot start a side process ({exc})")
            return None
        self._children.append(child)
        return child

    def _acquire(self):
        with self._cond:
            while True:
                if self._closed or self._broken:
                    return None
                if self._idle:
                    return self._idle.pop()
                if len(self._children) < self.workers:
                    return self._spawn()
                self._cond.wait()

    def _release(self, child: _Child, lost: bool) -> None:
        with self._cond:
            if lost:
                self._children.remove(child)
                child.close()
            elif self._closed:
                child.close()
            else:
                self._idle.append(child)
            self._cond.notify()

    def _give_up(self, why: str) -> None:
        if not self._broken:
            log.warning("%s: running source detection in this process instead", why)
        self._broken = True
        self._cond.notify_all()

    def call(self, fn, *args, **kwargs):
        child = self._acquire()
        if child is None:
            return fn(*args, **kwargs)
        lost = False
        try:
            return child.call(fn, args, kwargs)
        except ChildLost as exc:
            lost = True
            with self._cond:
                self._give_up(f"a side process ended ({exc})")
        except BaseException as exc:
            # an interrupt in the middle of an exchange: the child's reply may still
            # come, so it cannot serve again (an error raised in the child can)
            if not isinstance(exc, Exception):
                lost = True
                child.proc.kill()
            raise
        finally:
            self._release(child, lost)
        return fn(*args, **kwargs)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for child in idle:  # all told first, so that they exit together
            child.end_input()
        for child in idle:
            child.close()


def sep_side_processes(workers: int | None = None) -> SideProcesses:
    """Side processes (not yet started) for :mod:`ioi.stages._sep`'s calls, each child
    importing it as it starts; ``workers`` defaults to one per pipeline thread, at
    most one a core."""
    return SideProcesses(workers=pipeline_threads() if workers is None else workers, preload=("ioi.stages._sep",))


def direct_call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` here: what a stage does without side processes."""
    return fn(*args, **kwargs)


def _serve(preload=()) -> None:
    """A child's loop: read a call, run it, write ``(True, result)`` or ``(False, exception)``."""
    import importlib
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and closes our input
    from ioi._memory import return_freed_memory_to_os

    return_freed_memory_to_os()  # as in the parent: a call's work arrays go back to the OS after it
    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # the call that needs it reports the error
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints cannot corrupt the replies
    mapped = None  # (path, mmap) of the parent's shared file

    def unpack(a):
        return a.view(mapped[1]) if isinstance(a, _SharedArray) else a

    while True:
        message = _read_message(inp)
        if message is None:
            return
        try:
            path, fn, args, kwargs = pickle.loads(message)
            if path is not None and (mapped is None or mapped[0] != path):
                if mapped is not None:
                    try:
                        mapped[1].close()
                    except BufferError:  # a view still alive: the map goes with it
                        pass
                with open(path, "r+b") as f:
                    mapped = (path, mmap.mmap(f.fileno(), 0))
            args = tuple(unpack(a) for a in args)
            kwargs = {k: unpack(v) for k, v in kwargs.items()}
            reply = (True, fn(*args, **kwargs))
            del args, kwargs
        except BaseException as exc:  # noqa: BLE001 - sent back to the caller to raise
            reply = (False, exc)
        try:
            data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # an unpicklable result or exception
            data = pickle.dumps((False, RuntimeError(f"side process: {reply[1]!r} ({exc})")))
        del reply
        _write_message(out, data)


if __name__ == "__main__":
    # run as ioi._sideproc, not as a second copy of this module named __main__,
    # so that the markers unpickled (ioi._sideproc._SharedArray) are this module's
    from ioi._sideproc import _serve as serve

    serve(sys.argv[1:])
    # Every reply is written and flushed: end without the interpreter's teardown of numpy
    # and sep (~0.06 s a child, which the parent's close would wait for).
    sys.stderr.flush()
    os._exit(0)
