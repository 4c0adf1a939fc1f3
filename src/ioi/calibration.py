"""Loading the calibration files named in ``paths.ini`` (the I/O edge).

Each file is read once per run, flipped left-right when ``--f`` is given, and
checked for shape against the science frame before any stage uses it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from ioi import fitsio
from ioi._parallel import thread_map
from ioi.config import PathsConfig, PipelineConfig
from ioi.errors import ExitCode, InputError, IoiError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Calibration arrays for the stages, all (ny, nx) float32 (coefficients (order+1, ny, nx))."""

    flat: np.ndarray | None = None
    masks: dict = dataclasses.field(default_factory=dict)  # "FLAT"/"LIN" -> 1/NaN array
    lin_coeffs: np.ndarray | None = None
    files: dict = dataclasses.field(default_factory=dict)  # what -> Path, for provenance
    flipped: bool = False

    def check_shape(self, shape) -> None:
        """Raise exit 29 when the science frame does not match the calibration arrays."""
        for what, key, arr in (("flat", "flat", self.flat), ("linearity coefficients", "lin", self.lin_coeffs),
                               *((f"{k} mask", f"mask_{k.lower()}", v) for k, v in self.masks.items())):
            if arr is not None and arr.shape[-2:] != tuple(shape):
                src = self.files.get(key, "")
                raise IoiError(f"science frame shape {tuple(shape)} does not match {what} shape "
                               f"{arr.shape[-2:]} ({src})", exit_code=ExitCode.DATA_SHAPE_MISMATCH)


def _require(path: Path | None, what: str, code: ExitCode) -> Path:
    if path is None:
        raise InputError(f"no {what} file named in paths.ini", exit_code=code)
    if not Path(path).is_file():
        raise InputError(f"{what} file not found: {path}", exit_code=code)
    return Path(path)


_SHAPE_CODES = {"linearity coefficients": ExitCode.LINEARITY_SHAPE_MISMATCH, "flat": ExitCode.FLAT_SHAPE_MISMATCH}


def _same_shape(arrays) -> None:
    """All calibration arrays must share one (ny, nx); the odd one out gets its
    own exit code (linearity 23, flat 24, mask 26)."""
    shapes = [a.shape[-2:] for _, a, _ in arrays]
    if len(set(shapes)) <= 1:
        return
    counts = Counter(shapes)
    # the majority shape is taken as right; on a tie, the first file's shape
    majority = max(counts, key=lambda s: (counts[s], -shapes.index(s)))
    what, arr, path = next(item for item, s in zip(arrays, shapes) if s != majority)
    others = ", ".join(f"{w} {Path(p).name}" for (w, _, p), s in zip(arrays, shapes) if s == majority)
    raise IoiError(f"{what} file {path} has shape {arr.shape[-2:]}, but {others} have {majority}",
                   exit_code=_SHAPE_CODES.get(what, ExitCode.MASK_SHAPE_MISMATCH))


def effective_settings(pipe: PipelineConfig, paths: PathsConfig) -> PipelineConfig:
    """Turn off the calibration stages whose files ``paths`` does not name at all.

    For ``ioi reduce`` without a paths.ini: a stage with no calibration file
    is skipped with a warning rather than failing.  A file that is named but
    absent is still an error (see :func:`load_calibration`).
    """
    if pipe.nonlinearity_corrections.do and paths.lin_coeffs is None:
        log.warning("no linearity coefficient file named in the paths settings: nonlinearity correction skipped")
        pipe = pipe.replace("nonlinearity_corrections", do=False)
    if pipe.flatfielding.do and paths.flat is None:
        log.warning("no flat file named in the paths settings: flat fielding skipped")
        pipe = pipe.replace("flatfielding", do=False)
    if pipe.bad_pix_masking.do:
        named = {"FLAT": paths.flat_bad, "LIN": paths.lin_bad}
        which = tuple(w for w in pipe.bad_pix_masking.which if named[w] is not None)
        if which != pipe.bad_pix_masking.which:
            log.warning("bad-pixel masks not named in the paths settings are skipped: %s",
                        ", ".join(sorted(set(pipe.bad_pix_masking.which) - set(which))))
            pipe = pipe.replace("bad_pix_masking", which=which, do=bool(which))
    return pipe


def load_calibration(pipe: PipelineConfig, paths: PathsConfig, *, flip: bool = False,
                     shape=None) -> Calibration:
    """Read the flat, the linearity coefficients and the selected bad-pixel masks.

    Only what an enabled stage needs is read.  Missing files raise the SPEC's
    exit codes: linearity 7, flat 21, mask 27; shapes that disagree with
    ``shape`` (the stripped science frame): linearity 23, flat 24, mask 26.
    """
    # what to read, in the order the checks report problems
    wanted = []
    if pipe.nonlinearity_corrections.do and pipe.frame_combination.do:
        wanted.append(("lin", paths.lin_coeffs, "linearity coefficient", ExitCode.LINEARITY_FILE_MISSING))
    if pipe.flatfielding.do:
        wanted.append(("flat", paths.flat, "flat", ExitCode.FLAT_FILE_MISSING))
    if pipe.bad_pix_masking.do:
        for name in pipe.bad_pix_masking.which:
            wanted.append((f"mask_{name.lower()}", paths.flat_bad if name == "FLAT" else paths.lin_bad,
                           f"{name} bad-pixel mask", ExitCode.MASK_FILE_MISSING))

    def read(item):
        key, path, what, code = item
        p = _require(path, what, code)
        if key == "lin":
            return p, fitsio.read_cube(p, what="linearity coefficient file")
        return p, fitsio.read_image(p, what="flat" if key == "flat" else what)[0]

    # the files on threads (the conversion to float32 releases the GIL); the first
    # problem in the order above is the one raised
    read_files = dict(zip((w[0] for w in wanted), thread_map(read, wanted)))
    flat = lin = None
    masks = {}
    files = {}
    loaded = []
    if "lin" in read_files:
        p, lin = read_files["lin"]
        need = pipe.nonlinearity_corrections.order + 1
        if lin.shape[0] < need:
            raise IoiError(f"linearity coefficient file {p} has {lin.shape[0]} HDUs; order "
                           f"{pipe.nonlinearity_corrections.order} needs {need}",
                           exit_code=ExitCode.LINEARITY_SHAPE_MISMATCH)
        lin = lin[:need]
        files["lin"] = p
        loaded.append(("linearity coefficients", lin, p))
        if shape is not None and lin.shape[-2:] != tuple(shape):
            raise IoiError(f"linearity coefficient file {p} has shape {lin.shape[-2:]}, expected {tuple(shape)}",
                           exit_code=ExitCode.LINEARITY_SHAPE_MISMATCH)
    if "flat" in read_files:
        p, flat = read_files["flat"]
        files["flat"] = p
        loaded.append(("flat", flat, p))
        if shape is not None and flat.shape != tuple(shape):
            raise IoiError(f"flat file {p} has shape {flat.shape}, expected {tuple(shape)}",
                           exit_code=ExitCode.FLAT_SHAPE_MISMATCH)
    if pipe.bad_pix_masking.do:
        for name in pipe.bad_pix_masking.which:
            p, mask = read_files[f"mask_{name.lower()}"]
            if shape is not None and mask.shape != tuple(shape):
                raise IoiError(f"{name} bad-pixel mask {p} has shape {mask.shape}, expected {tuple(shape)}",
                               exit_code=ExitCode.MASK_SHAPE_MISMATCH)
            masks[name] = mask
            files[f"mask_{name.lower()}"] = p
            loaded.append((f"{name} mask", mask, p))
    if len(loaded) > 1:
        _same_shape(loaded)
    if flip:
        flat = None if flat is None else np.ascontiguousarray(flat[:, ::-1])
        lin = None if lin is None else np.ascontiguousarray(lin[..., ::-1])
        masks = {k: np.ascontiguousarray(v[:, ::-1]) for k, v in masks.items()}
        log.info("calibration arrays flipped left-right (--f)")
    for what, p in files.items():
        log.info("calibration %s: %s", what, p)
    return Calibration(flat=flat, masks=masks, lin_coeffs=lin, files=files, flipped=flip)
