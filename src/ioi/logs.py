"""Logging set-up and progress reporting (the command-line edge).

Library code logs through ``logging.getLogger(__name__)``; this module only
decides where records go: the terminal, and ``res.log`` in the working
directory when a run has one.  Progress is a tqdm bar on a terminal and plain
log lines otherwise.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(level="INFO", *, logfile=None) -> None:
    """Route ``ioi`` log records to stderr and, when given, to ``logfile``."""
    root = logging.getLogger("ioi")
    root.setLevel(logging.DEBUG)
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root.addHandler(console)
    if logfile is not None:
        fh = logging.FileHandler(logfile, mode="a")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(fh)
    root.propagate = False
    logging.captureWarnings(True)
    pywarn = logging.getLogger("py.warnings")
    pywarn.handlers = root.handlers[:]
    pywarn.propagate = False


def close_logging() -> None:
    root = logging.getLogger("ioi")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()


class Progress:
    """A progress reporter: a tqdm bar on a terminal, log lines otherwise.

    Use as a callable ``progress(done, total, what)``.
    """

    def __init__(self, desc: str, *, logger=None, stream=None):
        self.desc = desc
        self.log = logger or logging.getLogger("ioi.progress")
        self.stream = stream if stream is not None else sys.stderr
        self._bar = None
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, done: int, total: int, what: str = "") -> None:
        if self._tty:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=self.desc, file=self.stream, leave=False)
            self._bar.n = done
            self._bar.set_postfix_str(what, refresh=True)
            if done >= total:
                self.close()
        else:
            self.log.info("%s: %d/%d %s", self.desc, done, total, what)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
