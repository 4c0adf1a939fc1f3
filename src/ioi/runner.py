"""Reducing many multruns: serially, on local processes, or on a Dask cluster.

Each multrun is an independent task.  A multrun that fails does not stop the
others; the summary lists what succeeded and what failed.  A re-run skips
multruns whose products are complete and newer than their inputs and
settings, unless ``force``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path

from ioi.config import PathsConfig, PipelineConfig, render_paths_ini, render_pipeline_ini
from ioi.discovery import Multrun, Selection, discover
from ioi.errors import ExitCode, IoiError

log = logging.getLogger(__name__)


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


def settings_digest(pipe: PipelineConfig, paths: PathsConfig, flip: bool) -> str:
    text = render_pipeline_ini(dataclasses.replace(pipe, source="")) + render_paths_ini(
        dataclasses.replace(paths, source="")) + f"flip={flip}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _manifest_path(out_dir: Path, multrun: Multrun) -> Path:
    return out_dir / f".{multrun.name}.done.json"


def is_done(multrun: Multrun, out_dir: Path, digest: str) -> bool:
    """True when a previous run left complete products newer than the inputs, with the same settings."""
    mpath = _manifest_path(out_dir, multrun)
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("settings") != digest:
        return False
    if sorted(manifest.get("inputs", [])) != sorted(str(p) for p in multrun.input_paths):
        return False
    products = [Path(p) for p in manifest.get("products", [])]
    if not products or not all(p.is_file() for p in products):
        return False
    newest_input = max(os.path.getmtime(p) for p in multrun.input_paths)
    return min(os.path.getmtime(p) for p in products) >= newest_input


def reduce_one(multrun: Multrun, pipe: PipelineConfig, paths: PathsConfig, out_dir, *, flip=False,
               force=False) -> MultrunOutcome:
    """Reduce one multrun, turning a failure into an outcome instead of an exception."""
    from ioi.pipeline import reduce_multrun

    out_dir = Path(out_dir)
    digest = settings_digest(pipe, paths, flip)
    if not force and is_done(multrun, out_dir, digest):
        log.info("%s: products up to date, skipped (use --force to redo)", multrun.name)
        manifest = json.loads(_manifest_path(out_dir, multrun).read_text())
        return MultrunOutcome(multrun.name, "skipped", products=manifest["products"])
    t0 = time.perf_counter()
    try:
        result = reduce_multrun(multrun, pipe, paths, out_dir, flip=flip)
    except IoiError as exc:
        log.error("%s: %s", multrun.name, exc)
        return MultrunOutcome(multrun.name, "failed", error=str(exc), exit_code=int(exc.exit_code),
                              seconds=time.perf_counter() - t0)
    products = [str(p) for p in result.products]
    if products:
        manifest = {"settings": digest, "inputs": [str(p) for p in multrun.input_paths], "products": products}
        tmp = _manifest_path(out_dir, multrun).with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(_manifest_path(out_dir, multrun))
    return MultrunOutcome(multrun.name, "done", products=products,
                          warnings=[(int(c), m) for c, m in result.warnings],
                          seconds=time.perf_counter() - t0, report=str(result.report) if result.report else None,
                          stage_seconds=dict(result.stage_seconds))


def _reduce_in_worker(multrun, pipe, paths, out_dir, flip, force, log_level):
    # Runs in a separate process: give it its own console logging.
    from ioi.logs import setup_logging

    setup_logging(log_level)
    return reduce_one(multrun, pipe, paths, out_dir, flip=flip, force=force)


def reduce_all(multruns, pipe: PipelineConfig, paths: PathsConfig, out_dir, *, flip=False, workers=1,
               scheduler=None, force=False, progress=None, log_level="WARNING") -> RunSummary:
    """Reduce every multrun: serially (workers=1), with a local process pool, or on a Dask cluster."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    multruns = list(multruns)
    total = len(multruns)
    outcomes = []

    def _done(outcome):
        outcomes.append(outcome)
        if progress:
            progress(len(outcomes), total, f"{outcome.name} {outcome.status}")

    if scheduler:
        from dask.distributed import Client, as_completed

        client = Client(scheduler) if isinstance(scheduler, str) else scheduler
        try:
            futures = [client.submit(_reduce_in_worker, m, pipe, paths, str(out_dir), flip, force, log_level,
                                     key=f"ioi-{m.name}-{i}", pure=False) for i, m in enumerate(multruns)]
            for fut in as_completed(futures):
                _done(fut.result())
        finally:
            if isinstance(scheduler, str):
                client.close()
    elif workers > 1 and total > 1:
        from concurrent.futures import ProcessPoolExecutor, as_completed
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futs = [pool.submit(_reduce_in_worker, m, pipe, paths, str(out_dir), flip, force, log_level)
                    for m in multruns]
            for fut in as_completed(futs):
                _done(fut.result())
    else:
        for m in multruns:
            _done(reduce_one(m, pipe, paths, out_dir, flip=flip, force=force))
    order = {m.name: i for i, m in enumerate(multruns)}
    outcomes.sort(key=lambda o: order.get(o.name, 0))
    return RunSummary(outcomes)


def reduce_directory(data_dir, out_dir, *, selection: Selection = Selection(), pipe=None, paths=None,
                     **kwargs) -> RunSummary:
    """Discover the multruns under ``data_dir`` and reduce them all into ``out_dir``."""
    pipe = pipe or PipelineConfig()
    paths = paths or PathsConfig()
    multruns = discover(data_dir, selection)
    if not multruns:
        raise IoiError(f"no multruns in {data_dir}", exit_code=ExitCode.NO_FILES)
    return reduce_all(multruns, pipe, paths, out_dir, **kwargs)
