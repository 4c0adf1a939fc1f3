"""The reduction pipeline: composes the stages for one multrun.

Reads raw files (through :mod:`ioi.fitsio`), runs the enabled stages in the
order of SPEC section 2, and writes the products of SPEC section 3.  The
stages themselves are pure functions in :mod:`ioi.stages`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import queue
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bottleneck as bn
import numpy as np
from astropy.io import fits

from ioi import fitsio, sexconfig
from ioi._memory import Scratch, release_free_heap
from ioi._parallel import SIDE_PROCESS_MIN_PIXELS, pipeline_threads
from ioi._sideproc import SideProcesses, direct_call, sep_side_processes
from ioi.calibration import Calibration, load_calibration
from ioi.config import PathsConfig, PipelineConfig
from ioi.discovery import LT, DitherSequence, Multrun
from ioi.errors import ExitCode, IoiError, StageWarning
from ioi.frame import DQ, GAIN_BY_ASICGAIN, QUALITY_DTYPE, Frame, Ramp

log = logging.getLogger(__name__)

BORDER = 4
_SIDE_PROCESS_MIN_PIXELS = SIDE_PROCESS_MIN_PIXELS  # frames this large run sep in side processes
DEFAULT_GAIN = GAIN_BY_ASICGAIN[10]


@dataclasses.dataclass
class ReductionResult:
    """What a multrun's reduction produced."""

    multrun: str
    l1_products: list = dataclasses.field(default_factory=list)
    l2_product: Path | None = None
    intermediate: list = dataclasses.field(default_factory=list)
    warnings: list = dataclasses.field(default_factory=list)  # (exit code, message)
    stage_seconds: dict = dataclasses.field(default_factory=dict)
    report: Path | None = None
    stopped_after: str | None = None

    @property
    def products(self) -> list[Path]:
        return list(self.l1_products) + ([self.l2_product] if self.l2_product else [])


class _Quit(Exception):
    """Raised internally when a stage's ``quit`` is set."""

    def __init__(self, stage):
        super().__init__(stage)
        self.stage = stage


class _Run:
    """Bookkeeping for one multrun: stage timings and non-fatal warnings."""

    def __init__(self, result: ReductionResult):
        self.result = result
        self.t_start = time.perf_counter()
        self._lock = threading.Lock()

    def add_seconds(self, name: str, seconds: float) -> None:
        with self._lock:
            self.result.stage_seconds[name] = self.result.stage_seconds.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time a stage and turn its StageWarnings into logged, listed warnings.

        In a worker thread only the time is taken: ``warnings.catch_warnings``
        changes process-wide state and is not safe there (the stages run in
        threads emit no StageWarning)."""
        t0 = time.perf_counter()
        if threading.current_thread() is not threading.main_thread():
            try:
                yield
            finally:
                self.add_seconds(name, time.perf_counter() - t0)
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", StageWarning)
            try:
                yield
            finally:
                self.add_seconds(name, time.perf_counter() - t0)
        for w in caught:
            if isinstance(w.message, StageWarning):
                self.warn(int(w.message.exit_code), str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def warn(self, code: int, message: str) -> None:
        self.result.warnings.append((code, message))
        log.warning("[code %d] %s", code, message)


# ----------------------------------------------------------------------------- helpers

def gain_for(header) -> tuple[float, str | None]:
    """Nominal gain (e-/ADU) for the header's ASICGAIN, and a warning text when unknown."""
    value = header.get("ASICGAIN")
    try:
        key = int(float(value))
    except (TypeError, ValueError):
        key = None
    if key in GAIN_BY_ASICGAIN:
        return GAIN_BY_ASICGAIN[key], None
    return DEFAULT_GAIN, (f"unknown ASICGAIN {value!r}: variance uses {DEFAULT_GAIN} e-/ADU; "
                          "GAIN/EPERDN left out of the stack")


_SCRATCH = threading.local()


def _thread_buffer(name: str, shape, dtype) -> np.ndarray:
    """A per-thread array reused from one dither (or frame) to the next: the ramp
    cube, its saturation flags and quality (85 MB a full-size Fowler-2 dither),
    a worker's sky-subtracted planes, ... that need not be allocated, and zeroed
    by the kernel, every time.  Valid until the same thread asks again: nothing
    that outlives a dither may keep a view of it."""
    return _thread_scratch().get(name, shape, dtype)


def _zeroed(a: np.ndarray) -> np.ndarray:
    a.fill(0)
    return a


def _thread_scratch() -> Scratch:
    """This thread's :class:`~ioi._memory.Scratch` (work arrays it reuses)."""
    scratch = getattr(_SCRATCH, "scratch", None)
    if scratch is None:
        scratch = _SCRATCH.scratch = Scratch()
    return scratch


def read_ramp(seq: DitherSequence, *, saturation_level: float, reuse_buffers: bool = False) -> tuple[Ramp, int]:
    """Read the raw files of one dither into a :class:`Ramp` (border included)
    and its NOUTPUTS.  Saturation is judged on the raw values here.

    ``reuse_buffers``: the reads and saturation flags go into this thread's
    reused buffers (:func:`_thread_buffer`), overwritten by its next call."""
    from ioi.stages.combine import flag_saturated

    if not seq.reads:
        raise IoiError(f"dither {seq.dither} has no reads", exit_code=ExitCode.NO_SUITABLE_FILES)
    first = seq.reads[0]
    shape = (int(first.header.get("NAXIS2", 0)), int(first.header.get("NAXIS1", 0)))  # read by discovery
    cube_shape = (len(seq.reads),) + shape
    cube = _thread_buffer("cube", cube_shape, np.float32) if reuse_buffers else np.empty(cube_shape, np.float32)
    data0, header0 = fitsio.read_raw(first.path, out=cube[0])
    if data0.shape != shape:
        raise IoiError(f"{first.path}: image shape {data0.shape} does not match NAXIS1/NAXIS2 {shape}",
                       exit_code=ExitCode.NO_SUITABLE_FILES)
    for i, r in enumerate(seq.reads[1:], start=1):
        d, _ = fitsio.read_raw(r.path, out=cube[i])
        if d.shape != data0.shape:
            raise IoiError(f"{r.path} has shape {d.shape}, {first.path} has {data0.shape}",
                           exit_code=ExitCode.NO_SUITABLE_FILES)
        if d is not cube[i] and not np.shares_memory(d, cube[i]):
            cube[i] = d
    if "NOUTPUTS" not in header0:
        raise IoiError(f"{first.path} has no NOUTPUTS keyword", exit_code=ExitCode.NO_NOUTPUTS)
    try:
        noutputs = int(header0["NOUTPUTS"])
    except (TypeError, ValueError):
        raise IoiError(f"{first.path} has a non-integer NOUTPUTS {header0['NOUTPUTS']!r}",
                       exit_code=ExitCode.NO_NOUTPUTS) from None
    saturated = flag_saturated(cube, level=saturation_level,
                               out=_thread_buffer("saturated", cube.shape, bool) if reuse_buffers else None)
    ramp = Ramp(
        reads=cube,
        inttime=np.array([r.inttime for r in seq.reads], dtype=np.float64),
        group=np.array([int(r.header.get("SEQNUM_M", r.group)) for r in seq.reads]),
        index=np.array([int(r.header.get("SEQNUM_N", r.exposure)) for r in seq.reads]),
        header=header0,
        quality=_zeroed(_thread_buffer("quality", data0.shape, QUALITY_DTYPE)) if reuse_buffers
        else np.zeros(data0.shape, dtype=QUALITY_DTYPE),
        saturated=saturated,
        names=tuple(r.path.name for r in seq.reads),
    )
    return ramp, noutputs


def shift_wcs_for_border(header, border: int = BORDER) -> fits.Header:
    """A copy of ``header`` with CRPIX moved for the stripped reference border."""
    header = header.copy()
    for key in ("CRPIX1", "CRPIX2"):
        if key in header:
            header[key] = float(header[key]) - border
    return header


def _provenance(pipe: PipelineConfig, cal: Calibration, *, sky_done: bool, reg_done: bool,
                stack_done: bool) -> list[tuple]:
    """The original's L1 processing keywords, plus our own method keywords."""
    fc = pipe.frame_combination
    name = lambda what: Path(cal.files[what]).name if what in cal.files else "none"  # noqa: E731
    masks = pipe.bad_pix_masking
    return [
        ("L1REFSUB", int(pipe.reference_subtraction.do), "reference pixels subtracted"),
        ("L1REFMET", pipe.reference_subtraction.method if pipe.reference_subtraction.do else "none",
         "reference subtraction method"),
        ("L1FMCO", int(fc.do), "frames combined"),
        ("L1FMCOME", fc.method, "frame combination method"),
        ("L1FMCOPA", fc.fowler_pairs if fc.method == "FOWLER" else 0, "Fowler pairs"),
        ("L1LCOR", int(pipe.nonlinearity_corrections.do), "nonlinearity corrected"),
        ("L1LCORF", name("lin"), "linearity coefficient file"),
        ("L1FLAT", int(pipe.flatfielding.do), "flat fielded"),
        ("L1FLATF", name("flat"), "flat file"),
        ("L1BADPX", int(masks.do), "bad pixels masked"),
        ("L1BADPXF", name("mask_flat") if "FLAT" in masks.which else "none", "flat bad-pixel mask"),
        ("L1BADPXL", name("mask_lin") if "LIN" in masks.which else "none", "linearity bad-pixel mask"),
        ("L1SKYSUB", int(sky_done), "sky subtracted"),
        ("L1REG", int(reg_done), "registered"),
        ("L1STK", int(stack_done), "stacked"),
        ("L1FLIP", int(cal.flipped), "calibration flipped left-right (--f)"),
    ]


def _with_keywords(header, cards) -> fits.Header:
    header = header.copy()
    for key, value, comment in cards:
        header[key] = (value, comment)
    return header


# ----------------------------------------------------------------------------- one dither

def process_dither(seq: DitherSequence, pipe: PipelineConfig, cal: Calibration, run: _Run,
                   out_dir: Path, stem: str, bad_pixels=None) -> Frame:
    """Raw reads of one dither -> a calibrated L1 frame (before sky subtraction).

    ``bad_pixels``: the union of the calibration's bad-pixel masks (bool), when
    the caller made it once for every dither."""
    from ioi.stages import calibrate, combine, reference

    fc = pipe.frame_combination
    with run.stage("read"):
        ramp, noutputs = read_ramp(seq, saturation_level=fc.saturation_level, reuse_buffers=True)
    rs = pipe.reference_subtraction
    with run.stage("reference"):
        reads = ramp.reads
        if rs.do:
            # in place: the raw values are not needed once saturation is flagged (read_ramp)
            reads = reference.subtract_reference(reads, method=rs.method, noutputs=noutputs, border=BORDER,
                                                 out=reads)
        if fc.read_noise > 0:
            read_noise = fc.read_noise
        elif ramp.nreads >= 2:
            read_noise = reference.read_noise_of_reads(reads[0], reads[1], border=BORDER)
        else:
            read_noise = 17.0
        header = shift_wcs_for_border(ramp.header)
        header["RDNOISE"] = (round(float(read_noise), 3), "[ADU] read noise per read (reference pixels)")
        ramp = ramp.replace(reads=reference.strip_border(reads, border=BORDER, copy=False),
                            saturated=reference.strip_border(ramp.saturated, border=BORDER, copy=False),
                            quality=reference.strip_border(ramp.quality, border=BORDER, copy=False),
                            header=header)
    log.debug("%s dither %d: read noise %.2f ADU", stem, seq.dither, read_noise)
    if rs.hard:
        p = out_dir / f"{stem}_{seq.dither}_refsub.fits"
        fitsio.write_fits_atomic(p, fits.HDUList([fits.PrimaryHDU(ramp.reads, header=ramp.header)]), overwrite=True)
        run.result.intermediate.append(p)
    if rs.quit:
        raise _Quit("reference_subtraction")
    if not fc.do:
        log.warning("frame_combination.do = 0: cannot proceed past reference subtraction")
        raise _Quit("reference_subtraction")

    cal.check_shape(ramp.reads.shape[-2:])
    gain, why = gain_for(ramp.header)
    if why and seq.dither == 1:
        run.warn(ExitCode.UNKNOWN_ASICGAIN, why)
    lin = cal.lin_coeffs if pipe.nonlinearity_corrections.do else None
    with run.stage("combine"):
        frame = combine.combine_reads(ramp, method=fc.method, pairs=fc.fowler_pairs, bodge=fc.fowler_bodge,
                                      gain=gain, read_noise=read_noise, linearity=lin,
                                      jump_sigma=fc.jump_sigma, linearity_form=pipe.nonlinearity_corrections.form)
    del ramp
    _hard(pipe.frame_combination, frame, run, out_dir, f"{stem}_{seq.dither}_combined.fits")
    if fc.quit:
        raise _Quit("frame_combination")
    if pipe.nonlinearity_corrections.quit:
        raise _Quit("nonlinearity_corrections")
    if pipe.flatfielding.do:
        with run.stage("flat"):
            # in place: the frame is this dither's own, just made by the combination
            frame = calibrate.apply_flat(frame, cal.flat, path=cal.files.get("flat"), in_place=True)
        _hard(pipe.flatfielding, frame, run, out_dir, f"{stem}_{seq.dither}_flat.fits")
        if pipe.flatfielding.quit:
            raise _Quit("flatfielding")
    if pipe.bad_pix_masking.do and cal.masks:
        with run.stage("badpix"):
            frame = calibrate.apply_bad_pixel_masks(frame, cal.masks, bad=bad_pixels, in_place=True)
        _hard(pipe.bad_pix_masking, frame, run, out_dir, f"{stem}_{seq.dither}_badpix.fits")
        if pipe.bad_pix_masking.quit:
            raise _Quit("bad_pix_masking")
    return frame


def _hard(settings, frame: Frame, run: _Run, out_dir: Path, name: str) -> None:
    if getattr(settings, "hard", False):
        p = fitsio.write_product(out_dir / name, frame.header, {"IM": frame}, overwrite=True)
        run.result.intermediate.append(p)


# ----------------------------------------------------------------------------- one multrun

#: The stages' modules, in the order the pipeline needs them.  Importing them takes
#: about 0.6 s of one core (scipy.ndimage for the sky, scipy.spatial for
#: registration), which would otherwise sit on the critical path between the
#: ramps and the sky; the ramps' own modules need only numpy and astropy.
_STAGE_MODULES = ("ioi.stages.reference", "ioi.stages.calibrate", "ioi.stages.combine", "ioi.stages.sky",
                  "ioi.stages.register", "ioi.stages.stack")


def _import_in_background(names) -> threading.Thread:
    """Import ``names`` on a daemon thread while the caller goes on (a thread that needs
    one of them first waits for that module's import lock, as it would anyway)."""
    import importlib

    def run():
        for name in names:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the import that needs it will raise it properly
                return

    thread = threading.Thread(target=run, name="ioi-import", daemon=True)
    thread.start()
    return thread


def reduce_multrun(multrun: Multrun, pipe: PipelineConfig, paths: PathsConfig, out_dir, *,
                   flip: bool = False, calibration: Calibration | None = None,
                   progress=None, side_processes=True) -> ReductionResult:
    """Reduce one multrun from raw reads to L1 (and, for dithered LT data, L2) products.

    ``side_processes``: for full-size frames, run sep's calls (source masks,
    registration) in up to two child processes (:mod:`ioi._sideproc`), since sep
    holds the GIL; the products are the same either way.  True: children started
    for this multrun (and ended with it); a running
    :class:`~ioi._sideproc.SideProcesses` (preloading ``ioi.stages._sep``): those
    children, left running for the caller to close (the command line starts one
    as it starts, so that its start-up overlaps its own, and shares them among
    the multruns of a run; the rest are started here as the last dither runs
    alone); False: sep runs in this process.  Off where other
    processes already share the cores (``--workers``, a Dask cluster).

    Non-fatal problems (codes 18, 30, 34) are logged and listed in the result;
    fatal ones raise :class:`~ioi.errors.IoiError`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _import_in_background(_STAGE_MODULES)
    result = ReductionResult(multrun=multrun.name)
    run = _Run(result)
    cal = calibration if calibration is not None else load_calibration(pipe, paths, flip=flip)
    detection = dict(sexconfig.DEFAULTS)  # registration's source detection (sep)
    if pipe.registration.do and pipe.registration.use_sexconfig:
        detection = sexconfig.read_sexconfig(paths.config_dir / pipe.registration.sexconfig_filename)
        log.info("registration detection from %s: %s", pipe.registration.sexconfig_filename, detection)
    frames: list[Frame] = []
    try:
        # Two dithers at a time: reading, reference subtraction and calibration are
        # single-threaded numpy that releases the GIL, so two dithers overlap on
        # two cores (the combination itself also runs in row chunks on threads).
        workers = max(1, min(pipeline_threads(), len(multrun.dithers)))
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            bad_pixels = None
            if pipe.bad_pix_masking.do and cal.masks:
                from ioi.stages.calibrate import combined_bad_pixel_mask
                shape = next(iter(cal.masks.values())).shape  # checked against each frame before use
                bad_pixels = combined_bad_pixel_mask(cal.masks, shape)
            done = pool.map(lambda seq: process_dither(seq, pipe, cal, run, out_dir, multrun.name, bad_pixels),
                            multrun.dithers)
            n_dithers = len(multrun.dithers)
            for i, (seq, frame) in enumerate(zip(multrun.dithers, done)):
                if isinstance(side_processes, SideProcesses) and i >= n_dithers - 2:
                    # the rest of the caller's children, started as the last dither runs alone on
                    # one core (their start-up would otherwise take CPU from two busy dithers);
                    # ready for the sky's source masks
                    side_processes.start()
                frames.append(frame)
                if progress:
                    progress(i + 1, len(multrun.dithers), f"{multrun.name} dither {seq.dither}")
                log.info("%s dither %d: combined %d reads (%s)", multrun.name, seq.dither, len(seq.reads),
                         pipe.frame_combination.method)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after a failure, start no other dither
        # only the file names of the calibration are needed from here: drop the arrays
        cal = dataclasses.replace(cal, flat=None, masks={}, lin_coeffs=None)
        release_free_heap()  # the ramps' temporaries, freed: not held through the next phases
        _finish(multrun, frames, pipe, cal, run, out_dir, detection, side_processes)
    except _Quit as q:
        result.stopped_after = q.stage
        log.info("stopping after %s (quit = 1)", q.stage)
    result.stage_seconds["total"] = time.perf_counter() - run.t_start
    return result


def _finish(multrun: Multrun, frames: list, pipe: PipelineConfig, cal: Calibration, run: _Run, out_dir: Path,
            detection: dict, side_processes=True):
    """Sky subtraction, registration, stacking and the products, one frame at a time
    where the order allows.  ``frames`` (the unsubtracted frames) is emptied.

    Memory: besides the unsubtracted frames only the sky-subtracted science is
    held for every frame (the sky model turns each sky into it in place); the
    variance and flags of a sky-subtracted frame are made when it is written.
    Then frame by frame: its transform is measured on this thread while two
    worker threads write the earlier frames' L1 products (under temporary names
    until every frame is done: their keywords say whether registration and the
    stack succeeded) and resample them into a running stack, releasing each
    frame; sums are added in frame order, so the result does not depend on the
    threads.  A sigma-clipped stack needs every resampled frame at once and
    keeps them.  For full-size frames sep's calls (source masks, registration)
    run in side processes, as sep holds the GIL.
    """
    dithered = multrun.convention == LT and len(frames) > 1
    sp = pipe.sky_subtraction
    # The sky's first pass finds each frame's sources; registration centroids start
    # from them instead of running sep's extraction again (not with a user's own
    # detection settings, use_sexconfig, which then apply as they are).
    reuse_sources = pipe.registration.do and not pipe.registration.use_sexconfig
    side = own = None
    if side_processes is not False and dithered and (sp.do and sp.mask_sources or pipe.registration.do) \
            and frames[0].science.size >= _SIDE_PROCESS_MIN_PIXELS:
        if isinstance(side_processes, SideProcesses):
            side = side_processes
        else:
            side = own = sep_side_processes().start()
    try:
        _finish_frames(multrun, frames, pipe, cal, run, out_dir, detection, dithered, reuse_sources,
                       side.call if side is not None else direct_call)
    finally:
        if own is not None:
            own.close()


def _finish_frames(multrun, frames, pipe, cal, run, out_dir, detection, dithered, reuse_sources, offload):
    """:func:`_finish` from the sky on; ``offload`` runs sep's calls (see :mod:`ioi._sideproc`)."""
    from ioi.stages import register, sky, stack

    n = len(frames)
    model = None
    sp = pipe.sky_subtraction
    if dithered and sp.do:
        with run.stage("sky"):
            model = sky.model_skies(
                frames, peers_only=sp.peers_only, algorithm=sp.make_algorithm, bg_sigma_clip=sp.bg_sigma_clip,
                smoothing_box_size=sp.smoothing_box_size, max_iterations=sp.max_robust_iterations,
                max_unsolved_percentage=sp.max_robust_unsolved_percentage, mask_sources=sp.mask_sources,
                keep_sources=reuse_sources, offload=offload)
            model.subtract_in_place()
        release_free_heap()
        log.info("%s: sky subtracted (%s, peers_only=%d, two-pass=%d)", multrun.name, sp.make_algorithm,
                 sp.peers_only, sp.mask_sources)
        if sp.hard:
            for seq, i in zip(multrun.dithers, range(n)):
                _hard(sp, model.subtracted(i), run, out_dir, f"{multrun.name}_{seq.dither}_skysub.fits")
    sky_done = model is not None

    rp = pipe.registration
    finder = None
    if dithered and rp.do and not (sky_done and sp.quit):
        regions = []
        if rp.do_bad_region >= 1:
            regions.append(register.parse_bad_region(rp.bad_region1))
        if rp.do_bad_region >= 2:
            regions.append(register.parse_bad_region(rp.bad_region2))
        regions = [r for r in regions if r is not None]
        finder = register.TransformFinder(geometry=rp.fit_geometry, algorithm=rp.registration_algorithm,
                                          bad_regions=tuple(regions), sky_subtracted=sky_done, offload=offload,
                                          **detection)
    stack_wanted = dithered and pipe.stacking.do and rp.do and not rp.quit and not (sky_done and sp.quit)
    clip = pipe.stacking.clip_sigma or None
    accumulator = stack.StackAccumulator(pipe.stacking.method) if stack_wanted and finder and clip is None else None
    kept = [None] * n  # resampled frames, for a clipped stack only
    stats = [None] * n
    pending = [None] * n  # L1 products under temporary names until every frame is done
    write = pipe.general.write_output
    if not write:
        log.info("write_output = 0: no products written")
    # The L1 keywords assume that registration (and so the stack) will succeed; if a
    # frame cannot be registered, the products already written are restamped.
    cards = _provenance(pipe, cal, sky_done=sky_done, reg_done=finder is not None,
                        stack_done=stack_wanted and finder is not None)

    # Frame-sized planes are reused rather than made (and zeroed by the kernel) for every
    # frame: each worker thread's sky-subtracted variance and flags, and the resampled
    # planes once the running stack has summed them.
    resampled_planes = queue.SimpleQueue()

    def planes_for_resampling(shape):
        if accumulator is None:  # a clipped stack keeps every resampled frame
            return None
        try:
            return resampled_planes.get_nowait()
        except queue.Empty:
            return (np.empty(shape, np.float32), np.empty(shape, np.float32), np.empty(shape, QUALITY_DTYPE))

    # the last frame is resampled on every thread: nothing else is left to run beside it
    last_threads = pipeline_threads()

    def one_frame(i, t, cards):
        """Write frame i's L1 product (pending) and resample it with transform t (None: not registered)."""
        seq = multrun.dithers[i]
        nonss = frames[i]
        ss = None
        if sky_done:
            # the reference frame goes into the stack as it is: its planes must be its own
            kept_as_is = t is not None and stack_wanted and i == 0
            out = None if kept_as_is else (_thread_buffer("ss_variance", nonss.shape, np.float32),
                                           _thread_buffer("ss_quality", nonss.shape, QUALITY_DTYPE))
            ss = model.subtracted(i, nonss, out=out)
        seconds = {}
        stats[i] = _dither_stats(seq, nonss, ss, t)
        product = None
        if write:
            t0 = time.perf_counter()
            product = _write_l1(out_dir / multrun.l1_name(seq.dither), nonss, ss, cards, t)
            seconds["write"] = time.perf_counter() - t0
        # written: release the unsubtracted frame before resampling (less memory at the peak)
        frames[i] = None
        target = ss if sky_done else nonss
        del nonss, ss
        if sky_done:
            model.release(i)
        registered = None
        if t is not None and stack_wanted:
            t0 = time.perf_counter()
            registered = register.registered_frame(target, t, reference=i == 0, geometry=rp.fit_geometry,
                                                   bad_threshold=pipe.bad_pix_masking.bad_post_register_threshold,
                                                   out=None if i == 0 else planes_for_resampling(target.shape),
                                                   scratch=_thread_scratch(),
                                                   threads=last_threads if i == n - 1 else 1)
            seconds["resample"] = time.perf_counter() - t0
            if rp.hard:
                _hard(rp, registered, run, out_dir, f"{multrun.name}_{seq.dither}_registered.fits")
        del target
        return i, product, registered, seconds

    def collect(future):
        i, product, registered, seconds = future.result()
        pending[i] = product
        for name, sec in seconds.items():
            run.add_seconds(name, sec)  # thread seconds: these overlap with each other and with detection
        if registered is not None:
            with run.stage("stack"):
                if accumulator is not None:
                    accumulator.add(registered)
                    if i > 0:  # summed: its planes can take a later frame
                        resampled_planes.put((registered.science, registered.variance, registered.quality))
                else:
                    kept[i] = registered

    # Frame by frame: sources are measured here (sep holds the GIL) while the frames
    # before are written and resampled on two threads (I/O, numpy and scipy release
    # it); results are taken in frame order, so the stack does not depend on timing.
    failure = None
    pool = ThreadPoolExecutor(max_workers=pipeline_threads())
    inflight = collections.deque()
    if sky_done:
        # the sums of the sky variances on a worker while this thread measures the first
        # frame (a core would otherwise wait for sep); its product is the first to need them
        pool.submit(model.prepare_variances)
    try:
        for i in range(n):
            t = None
            if finder is not None and failure is None:
                light = frames[i].replace(science=model.science(i)) if sky_done else frames[i]
                try:
                    guesses = model.sources[i] if sky_done and model.sources is not None else None
                    with run.stage("register"):
                        t = finder.add(light, guesses)
                except register.RegistrationError as exc:
                    failure = exc
                    break
                del light
                d = multrun.dithers[i]
                log.info("%s dither %d: dx=%.3f dy=%.3f rot=%.4f deg scale=%.5f (%d stars, rms %.3f px)",
                         multrun.name, d.dither, t.dx, t.dy, t.rotation_deg, t.scale, t.n_matched, t.rms_px)
            inflight.append(pool.submit(one_frame, i, t, cards))
            while len(inflight) > 2:
                collect(inflight.popleft())
        while inflight:
            collect(inflight.popleft())
        if failure is not None:
            run.warn(ExitCode.REGISTRATION_FAILED, f"registration failed: {failure}; stacking skipped")
            if dithered and pipe.stacking.do:
                log.warning("%s: no stack written (registration did not succeed)", multrun.name)
            finder, accumulator = None, None
            kept = [None] * n
            cards = _provenance(pipe, cal, sky_done=sky_done, reg_done=False, stack_done=False)
            done = [i for i in range(n) if stats[i] is not None]
            for i in done:  # written with the registration keywords: write them again without
                stats[i].pop("registration", None)
                if pending[i] is not None:
                    pending[i] = _restamp(pending[i], cards)
            for i in range(len(done), n):
                collect(pool.submit(one_frame, i, None, cards))
    except BaseException:
        for product in pending:
            if product is not None:
                product.discard()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    set_aside = []  # the products of an earlier run, replaced: deleted beside the stack's work
    run.result.l1_products.extend(p.commit(set_aside) for p in pending if p is not None)
    remover = fitsio.remove_files(set_aside)
    try:
        frames.clear()
        reg_done = finder is not None  # registration was run and every frame registered

        stacked = None
        if stack_wanted and reg_done:
            with run.stage("stack"):
                if accumulator is not None:
                    stacked = accumulator.result()
                else:
                    stacked = stack.stack_frames(kept, method=pipe.stacking.method, clip_sigma=clip)
            del kept, accumulator
            if write:
                with run.stage("write"):
                    ext = "SK_SS" if sky_done else "SK_NONSS"
                    primary = _with_keywords(stacked.frame.header, cards)
                    primary["NCOMBINE"] = (stacked.n_frames, "frames in the stack")
                    exp_header = fits.Header(fitsio.wcs_cards(stacked.frame.header))
                    exp_header["BUNIT"] = ("frames", "number of frames contributing per pixel")
                    exposure = fits.ImageHDU(np.asarray(stacked.exposure_map, dtype=np.int16), header=exp_header,
                                             name=f"{ext}_EXP")
                    run.result.l2_product = fitsio.write_product(out_dir / multrun.l2_name(), primary,
                                                                 {ext: stacked.frame}, overwrite=True,
                                                                 extra_hdus=[exposure])
        run.result.stage_seconds["total"] = time.perf_counter() - run.t_start
        run.result.report = write_report(out_dir, multrun, run.result, stats, stacked=stacked)
    finally:
        remover.join()


def _write_l1(path: Path, nonss: Frame, ss, cards, transform):
    """An L1 product (pending): IM_SS (when the sky was subtracted) and IM_NONSS with their planes."""
    extensions = {"IM_SS": ss} if ss is not None else {}
    extensions["IM_NONSS"] = nonss
    primary = _with_keywords(nonss.header, cards)
    if transform is not None:
        primary["REGDX"] = (round(float(transform.dx), 4), "[px] registration shift x")
        primary["REGDY"] = (round(float(transform.dy), 4), "[px] registration shift y")
    return fitsio.write_product(path, primary, extensions, overwrite=True, pending=True)


def _restamp(product, cards):
    """A pending L1 product written again with other provenance keywords and
    without the registration shifts (registration failed after it was written)."""
    with fits.open(product.tmp, memmap=False) as hdul:  # the DQ planes are scaled (uint16): no memmap
        hdus = [h.copy() for h in hdul]
    for key, value, comment in cards:
        hdus[0].header[key] = (value, comment)
    for key in ("REGDX", "REGDY"):
        hdus[0].header.remove(key, ignore_missing=True)
    again = fitsio.write_fits_atomic(product.path, fits.HDUList(hdus), overwrite=True, pending=True)
    product.discard()
    return again


def _median_and_robust_sigma(values) -> tuple[float, float]:
    """The median of the finite ``values`` and their robust sigma (1.4826 x the median
    absolute deviation, from at most ~200,000 of them); NaN, NaN when none is finite."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return float("nan"), float("nan")
    median = med = bn.median(v)
    step = v.size // 200_000
    if step > 1:
        v = v[::step]
        med = bn.median(v)
    return float(median), float(1.4826 * bn.median(np.abs(v - med)))


def _robust_sigma(values) -> float:
    return _median_and_robust_sigma(values)[1]


def _dither_stats(seq: DitherSequence, frame: Frame, sky_frame, transform) -> dict:
    """The quality-report entry of one dither."""
    sample = frame.science[::4, ::4]
    entry = {
        "dither": seq.dither,
        "reads": len(seq.reads),
        "exptime_s": float(frame.header.get("EXPTIME", float("nan"))),
        "median_level_adu": float(bn.nanmedian(sample)) if np.isfinite(sample).any() else None,
        "bad_pixel_fraction": float(np.mean((frame.quality[::4, ::4] & DQ.DO_NOT_USE) != 0)),
        "read_noise_adu": frame.header.get("RDNOISE"),
    }
    if sky_frame is not None:
        # one pass over the sample for both (the median of its finite values is the MAD's centre)
        median, sigma = _median_and_robust_sigma(sky_frame.science[::4, ::4].ravel())
        entry["sky_subtracted_rms_adu"] = sigma
        entry["sky_subtracted_median_adu"] = median
    if transform is not None:
        t = transform
        entry["registration"] = {"dx": float(t.dx), "dy": float(t.dy), "rotation_deg": float(t.rotation_deg),
                                 "scale": float(t.scale), "n_matched": int(t.n_matched), "rms_px": float(t.rms_px),
                                 "matrix_ref_to_frame": np.asarray(t.matrix, dtype=float).tolist()}
    return entry


# ----------------------------------------------------------------------------- report

def write_report(out_dir: Path, multrun: Multrun, result: ReductionResult, dither_stats, *, stacked) -> Path:
    """A JSON quality report per multrun (beyond the original)."""
    report = {
        "multrun": multrun.name,
        "convention": multrun.convention,
        "l1_products": [str(p) for p in result.l1_products],
        "l2_product": str(result.l2_product) if result.l2_product else None,
        "warnings": [{"code": int(c), "message": m} for c, m in result.warnings],
        "stage_seconds": {k: round(v, 3) for k, v in result.stage_seconds.items()},
        "dithers": list(dither_stats),
    }
    if stacked is not None:
        report["stack"] = {"n_frames": int(stacked.n_frames),
                           "rms_adu": _robust_sigma(stacked.frame.science[::4, ::4].ravel())}
    path = out_dir / f"{multrun.name}_report.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)
    return path
