"""Flat field from sky frames or dithered science frames (SPEC 6, second tool).

Axis order: ``(nframes, ny, nx)`` for a stack, ``(ny, nx)`` for a frame.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from ioi.errors import ExitCode, StageError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FlatResult:
    """flat: float32 (ny, nx), 1.0 at bad pixels; bad: bool (ny, nx); norms: float64 (nframes,)."""

    flat: np.ndarray
    bad: np.ndarray
    norms: np.ndarray


def _clipped_mean(frame, sigma):
    from astropy.stats import sigma_clipped_stats

    finite = frame[np.isfinite(frame)]
    if finite.size == 0:
        return np.nan
    mean, _, _ = sigma_clipped_stats(finite.astype(np.float64), sigma=sigma, maxiters=10)
    return float(mean)


def source_mask(frame, *, thresh=3.0, dilate=5) -> np.ndarray:
    """True where sep detects a source in ``frame`` (ny, nx), dilated by ``dilate`` px."""
    import sep
    from scipy import ndimage

    data = np.ascontiguousarray(np.nan_to_num(frame, nan=np.nanmedian(frame)), dtype=np.float32)
    bkg = sep.Background(data)
    sub = data - bkg.back()
    _, seg = sep.extract(sub, thresh, err=bkg.globalrms, segmentation_map=True)
    mask = seg > 0
    if dilate > 0 and mask.any():
        mask = ndimage.binary_dilation(mask, iterations=dilate)
    return mask


def make_flat(frames, *, low=0.35, high=2.0, sigma=10.0, from_science=False, dilate=5) -> FlatResult:
    """Combine frames into a normalised flat.

    Parameters
    ----------
    frames : sequence of ndarray (ny, nx), or ndarray (nframes, ny, nx)
        Sky frames (or dithered science frames with ``from_science``).
    low, high : float
        Normalised response outside [low, high] is bad: flat set to 1 there.
    sigma : float
        Clipping threshold of each frame's normalising mean.
    from_science : bool
        *beyond*: mask sources (sep, dilated by ``dilate`` px) as NaN and
        median-combine instead of averaging (the original's NaN -> 0 and mean
        are kept for sky frames).
    """
    stack = [np.asarray(f, dtype=np.float32) for f in frames]
    if not stack:
        raise StageError("no frames to make a flat from", exit_code=ExitCode.NO_FILES)
    shapes = {f.shape for f in stack}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise StageError(f"flat input frames differ in shape or are not 2-D: {sorted(shapes)}",
                         exit_code=ExitCode.DATA_SHAPE_MISMATCH)
    norms = np.empty(len(stack))
    normed = []
    # pixels with no data in any input frame (NaN there: masked bad upstream)
    no_input = np.logical_and.reduce([~np.isfinite(f) for f in stack])
    for i, f in enumerate(stack):  # loop over frames
        if from_science:
            f = np.where(source_mask(f, dilate=dilate), np.nan, f)
        else:
            f = np.nan_to_num(f, nan=0.0)
        norms[i] = _clipped_mean(f, sigma)
        if not np.isfinite(norms[i]) or norms[i] <= 0:
            raise StageError(f"flat input frame {i} has no positive level (clipped mean {norms[i]})")
        normed.append((f / norms[i]).astype(np.float32))
    cube = np.stack(normed)
    if from_science:
        import bottleneck as bn

        flat = bn.nanmedian(cube, axis=0)
        # renormalise: masked sources make the per-frame means slightly low
        flat = flat / _clipped_mean(flat, sigma)
    else:
        flat = cube.mean(axis=0, dtype=np.float64)
    unknown = np.zeros(flat.shape, dtype=bool)
    if from_science:
        # covered by a source in every frame: no measurement, not a bad pixel
        unknown = ~np.isfinite(flat) & ~no_input
        if unknown.any():
            log.info("flat: %d pixels under sources in every frame set to 1 (not flagged)", int(unknown.sum()))
    with np.errstate(invalid="ignore"):
        bad = ~((flat >= low) & (flat <= high)) & ~unknown
    flat = np.where(bad | unknown, 1.0, flat).astype(np.float32)
    log.info("flat: %d frames, %d bad pixels", len(stack), int(bad.sum()))
    return FlatResult(flat=flat, bad=bad, norms=norms)
