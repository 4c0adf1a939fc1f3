"""Reducing many multruns: serially, on local processes, or on a Dask cluster.

Each multrun is an independent task.  A multrun that fails -- an unreadable
raw file, a bad calibration, even an unexpected bug or a worker process that
dies -- does not stop the others; the summary lists what succeeded and what
failed, and the run's exit code is the first failure's.

Skip-if-done: after a successful reduction a small manifest
``OUT/.<multrun>.done.json`` records the settings digest, the inputs and the
products.  A re-run skips the multrun when the manifest's settings digest
matches, the same inputs are selected, every product exists, and every
product is newer than every input (raw reads and the calibration files the
settings use).  ``force`` redoes everything.  The manifest is removed before a
reduction starts and only written after it succeeded, so an interrupted or
failed run is never mistaken for a finished one.

Products are deterministic (no time stamps), so the same multrun reduced
serially, on a process pool or on a Dask cluster gives byte-identical files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import traceback
from pathlib import Path

from ioi.config import PathsConfig, PipelineConfig, render_paths_ini, render_pipeline_ini
from ioi.discovery import LT_PATTERN, Multrun, Selection, discover
from ioi.errors import ExitCode, IoiError

log = logging.getLogger(__name__)

#: Exit code recorded for a multrun that failed with an unexpected error (not an
#: IoiError) or whose worker died; ``EX_SOFTWARE`` of sysexits.h, outside the
#: original's codes.
INTERNAL_ERROR = 70


@dataclasses.dataclass
class MultrunOutcome:
    name: str
    status: str  # "done", "skipped", "failed"
    products: list = dataclasses.field(default_factory=list)
    warnings: list = dataclasses.field(default_factory=list)
    error: str = ""
    exit_code: int = 0
    seconds: float = 0.0
    report: str | None = None
    stage_seconds: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RunSummary:
    outcomes: list

    @property
    def failed(self) -> list:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def exit_code(self) -> int:
        """0 when every multrun succeeded, else the first failure's code."""
        return self.failed[0].exit_code if self.failed else 0

    def lines(self) -> list[str]:
        out = []
        for o in self.outcomes:
            if o.status == "failed":
                out.append(f"{o.name}: FAILED (exit {o.exit_code}): {o.error}")
            else:
                extra = f", {len(o.warnings)} warning(s)" if o.warnings else ""
                out.append(f"{o.name}: {o.status}, {len(o.products)} product(s), {o.seconds:.1f} s{extra}")
        n_ok = sum(o.status != "failed" for o in self.outcomes)
        out.append(f"{n_ok} multrun(s) succeeded, {len(self.failed)} failed")
        return out


# ----------------------------------------------------------------------------- skip-if-done

def settings_digest(pipe: PipelineConfig, paths: PathsConfig, flip: bool) -> str:
    """A short hash of every setting that affects the products (not where they came from)."""
    text = render_pipeline_ini(dataclasses.replace(pipe, source="")) + render_paths_ini(
        dataclasses.replace(paths, source="")) + f"flip={flip}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def calibration_inputs(pipe: PipelineConfig, paths: PathsConfig) -> list[Path]:
    """The calibration files the enabled stages read (as :func:`ioi.calibration.load_calibration` does)."""
    files = []
    if pipe.nonlinearity_corrections.do and pipe.frame_combination.do:
        files.append(paths.lin_coeffs)
    if pipe.flatfielding.do:
        files.append(paths.flat)
    if pipe.bad_pix_masking.do:
        files += [paths.flat_bad if w == "FLAT" else paths.lin_bad for w in pipe.bad_pix_masking.which]
    return [Path(p) for p in files if p is not None]


def _manifest_path(out_dir: Path, multrun: Multrun) -> Path:
    return out_dir / f".{multrun.name}.done.json"


def _mtime(path) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def is_done(multrun: Multrun, out_dir: Path, digest: str, calibration_files=()) -> bool:
    """True when a previous run left complete products newer than the inputs, with the same settings."""
    mpath = _manifest_path(out_dir, multrun)
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("settings") != digest:
        log.info("%s: settings changed since the last run", multrun.name)
        return False
    if sorted(manifest.get("inputs", [])) != sorted(str(p) for p in multrun.input_paths):
        log.info("%s: the selected raw files changed since the last run", multrun.name)
        return False
    products = manifest.get("products", [])
    product_times = [_mtime(p) for p in products]
    if not products or None in product_times:
        log.info("%s: products missing", multrun.name)
        return False
    input_times = [_mtime(p) for p in [*multrun.input_paths, *calibration_files]]
    if None in input_times:  # an input vanished: let the reduction report it
        return False
    if min(product_times) < max(input_times):
        log.info("%s: an input is newer than the products", multrun.name)
        return False
    return True


# ----------------------------------------------------------------------------- one multrun

def reduce_one(multrun: Multrun, pipe: PipelineConfig, paths: PathsConfig, out_dir, *, flip=False,
               force=False, side_processes=True) -> MultrunOutcome:
    """Reduce one multrun, turning any failure into an outcome instead of an exception
    (``side_processes``: True, False or a running :class:`ioi._sideproc.SideProcesses`,
    see :func:`ioi.pipeline.reduce_multrun`)."""
    from ioi.pipeline import reduce_multrun

    out_dir = Path(out_dir)
    digest = settings_digest(pipe, paths, flip)
    manifest_path = _manifest_path(out_dir, multrun)
    if not force and is_done(multrun, out_dir, digest, calibration_inputs(pipe, paths)):
        log.info("%s: products up to date, skipped (use --force to redo)", multrun.name)
        manifest = json.loads(manifest_path.read_text())
        return MultrunOutcome(multrun.name, "skipped", products=manifest["products"])
    manifest_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        result = reduce_multrun(multrun, pipe, paths, out_dir, flip=flip, side_processes=side_processes)
    except IoiError as exc:
        log.error("%s: %s", multrun.name, exc)
        return MultrunOutcome(multrun.name, "failed", error=str(exc), exit_code=int(exc.exit_code),
                              seconds=time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - the task boundary: one multrun's bug must not stop the others
        log.error("%s: unexpected error: %s", multrun.name, "".join(traceback.format_exception(exc)).rstrip())
        return MultrunOutcome(multrun.name, "failed", error=f"unexpected {type(exc).__name__}: {exc}",
                              exit_code=INTERNAL_ERROR, seconds=time.perf_counter() - t0)
    products = [str(p) for p in result.products]
    if products and result.stopped_after is None:
        manifest = {"settings": digest, "inputs": [str(p) for p in multrun.input_paths], "products": products}
        tmp = manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(manifest_path)
    return MultrunOutcome(multrun.name, "done", products=products,
                          warnings=[(int(c), m) for c, m in result.warnings],
                          seconds=time.perf_counter() - t0, report=str(result.report) if result.report else None,
                          stage_seconds=dict(result.stage_seconds))


def _reduce_in_worker(multrun, pipe, paths, out_dir, flip, force, log_level, logfile=None):
    # Runs in a separate process: give it its own logging, to the console and (appending) to res.log.
    # No side processes for sep: the workers already keep the cores busy, and the side
    # processes' start-up and copies would only add CPU time.
    from ioi._memory import return_freed_memory_to_os
    from ioi.logs import close_logging, setup_logging

    return_freed_memory_to_os()
    setup_logging(log_level, logfile=logfile)
    try:
        return reduce_one(multrun, pipe, paths, out_dir, flip=flip, force=force, side_processes=False)
    finally:
        close_logging()


def _lost(name: str, exc: BaseException) -> MultrunOutcome:
    """The outcome of a task whose worker died or could not run it."""
    log.error("%s: worker failed: %s: %s", name, type(exc).__name__, exc)
    return MultrunOutcome(name, "failed", error=f"worker failed: {type(exc).__name__}: {exc}",
                          exit_code=INTERNAL_ERROR)


# ----------------------------------------------------------------------------- many multruns

def reduce_all(multruns, pipe: PipelineConfig, paths: PathsConfig, out_dir, *, flip=False, workers=1,
               scheduler=None, force=False, progress=None, log_level="WARNING", logfile=None,
               failed=(), side_processes=True) -> RunSummary:
    """Reduce every multrun: serially (workers=1), with a local process pool, or on a Dask cluster.

    ``scheduler`` is a dask.distributed scheduler address, a ``Client``, or a
    cluster object (e.g. ``LocalCluster``).  ``logfile`` (usually
    ``OUT/res.log``) is appended to by worker processes.  ``failed`` holds
    outcomes already known (multruns that could not even be discovered); they
    join the summary.  ``side_processes``: for a serial run, True, False or a running
    :class:`ioi._sideproc.SideProcesses` that every multrun shares (see
    :func:`ioi.pipeline.reduce_multrun`); process pools and Dask workers never use them.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    multruns = list(multruns)
    total = len(multruns)
    outcomes = []
    if logfile is None:  # workers append to the caller's log file (res.log), if it has one
        handlers = logging.getLogger("ioi").handlers
        logfile = next((h.baseFilename for h in handlers if isinstance(h, logging.FileHandler)), None)
    logfile = str(logfile) if logfile else None

    def _done(outcome):
        outcomes.append(outcome)
        if progress:
            progress(len(outcomes), total, f"{outcome.name} {outcome.status}")

    if scheduler is not None and total:
        from dask.distributed import Client, as_completed

        own = not isinstance(scheduler, Client)
        client = Client(scheduler) if own else scheduler
        try:
            futures = {client.submit(_reduce_in_worker, m, pipe, paths, str(out_dir), flip, force, log_level,
                                     logfile, key=f"ioi-{m.name}-{i}", pure=False): m.name
                       for i, m in enumerate(multruns)}
            for fut in as_completed(futures):
                try:
                    _done(fut.result())
                except Exception as exc:  # noqa: BLE001 - a lost worker (KilledWorker...) fails one multrun only
                    _done(_lost(futures[fut], exc))
        finally:
            if own:
                client.close()
    elif workers > 1 and total > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn: no fork of a parent that may hold threads or big arrays.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, total), mp_context=ctx) as pool:
            futs = {pool.submit(_reduce_in_worker, m, pipe, paths, str(out_dir), flip, force, log_level, logfile):
                    m.name for m in multruns}
            for fut in as_completed(futs):
                try:
                    _done(fut.result())
                except Exception as exc:  # noqa: BLE001 - BrokenProcessPool etc.: fail that multrun, go on
                    _done(_lost(futs[fut], exc))
    else:
        for m in multruns:
            _done(reduce_one(m, pipe, paths, out_dir, flip=flip, force=force, side_processes=side_processes))
    order = {m.name: i for i, m in enumerate(multruns)}
    outcomes.sort(key=lambda o: order.get(o.name, 0))
    return RunSummary(sorted(list(failed), key=lambda o: o.name) + outcomes)


def _lt_keys(data_dir: Path, selection: Selection) -> list[tuple[str, int]]:
    """(date, multrun) of every selected LT-named raw file, from the names alone."""
    it = data_dir.rglob("*") if selection.recursive else data_dir.iterdir()
    keys = set()
    for p in it:
        m = LT_PATTERN.match(p.name)
        if not m or int(m.group(7)) != 0:
            continue
        date, run = m.group(3), int(m.group(4))
        if selection.date is not None and date != str(selection.date):
            continue
        if selection.multruns is not None and not (selection.multruns[0] <= run <= selection.multruns[1]):
            continue
        keys.add((date, run))
    return sorted(keys)


def discover_each(data_dir, selection: Selection = Selection()) -> tuple[list[Multrun], list[MultrunOutcome]]:
    """Discover multruns one (date, multrun) at a time, so that an unreadable
    raw header fails only its own multrun.  Returns (multruns, failed outcomes).

    Falls back to plain :func:`ioi.discovery.discover` (Teledyne naming, or
    nothing found: exit 3).
    """
    data_dir = Path(data_dir)
    keys = _lt_keys(data_dir, selection) if data_dir.is_dir() else []
    if len(keys) <= 1:
        return discover(data_dir, selection), []
    multruns, failed = [], []
    for date, run in keys:
        try:
            found = discover(data_dir, dataclasses.replace(selection, date=date, multruns=(run, run)))
        except IoiError as exc:
            name = f"{date}_{run}"
            if exc.exit_code == ExitCode.NO_FILES:  # filtered out by the dither/exposure ranges
                continue
            log.error("%s: %s", name, exc)
            failed.append(MultrunOutcome(name, "failed", error=str(exc), exit_code=int(exc.exit_code)))
            continue
        multruns += found
    if not multruns and not failed:
        return discover(data_dir, selection), []
    return multruns, failed


def reduce_directory(data_dir, out_dir, *, selection: Selection = Selection(), pipe=None, paths=None,
                     **kwargs) -> RunSummary:
    """Discover the multruns under ``data_dir`` and reduce them all into ``out_dir``.

    Keyword arguments go to :func:`reduce_all` (``workers``, ``scheduler``,
    ``force``, ``flip``, ``progress``, ``log_level``, ``logfile``).
    """
    pipe = pipe or PipelineConfig()
    paths = paths or PathsConfig()
    multruns, failed = discover_each(data_dir, selection)
    return reduce_all(multruns, pipe, paths, out_dir, failed=failed, **kwargs)
