"""Flat fielding and bad-pixel masking (SPEC 2.4, 2.5).

Both take a :class:`~ioi.frame.Frame` (science ``(ny, nx)``, border already
stripped) and calibration arrays of the same ``(ny, nx)`` shape, and return a
new frame.

Shape errors name both shapes.  The code is the calibration file's own
(24 flat, 26 mask) unless the calibration array has the SPEC's standard
2040x2040 shape, in which case the science frame is the odd one out and the
code is 29 (DATA_SHAPE_MISMATCH); see
:func:`ioi.stages.nonlinearity.check_calibration_shape`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import numpy as np

from ioi.errors import ExitCode
from ioi.frame import DQ, QUALITY_DTYPE, Frame, as_quality
from ioi.stages.nonlinearity import check_calibration_shape

log = logging.getLogger(__name__)


def apply_flat(frame: Frame, flat, *, path=None, in_place: bool = False) -> Frame:
    """Divide by a normalised flat field.

    Parameters
    ----------
    frame : Frame
        Science ``(ny, nx)``.
    flat : array_like, (ny, nx)
        Normalised response.
    path : str, optional
        File the flat came from, for messages and the L1FLATF keyword.
    in_place : bool
        Divide the frame's own science and variance (and flag its quality)
        instead of making new arrays, when they are writeable C-contiguous
        float32 (uint16 quality); for a caller that owns the frame and no
        longer needs it unflattened (the pipeline: no fresh frame-sized arrays).

    Returns
    -------
    Frame
        science / flat, variance / flat^2 (the flat's own noise is not
        propagated).  Where the flat is <= 0 or non-finite: science and
        variance NaN, quality NO_FLAT | DO_NOT_USE.  Header L1FLAT = 1
        (and L1FLATF = file name when ``path`` is given).

    Raises
    ------
    IoiError
        exit code 24 (or 29) when the flat's shape differs from the frame's.
    """
    flat = np.asarray(flat)
    check_calibration_shape(flat, frame.shape, what="flat field", path=path,
                            exit_code=ExitCode.FLAT_SHAPE_MISMATCH)
    with np.errstate(invalid="ignore"):
        bad = ~(np.isfinite(flat) & (flat > 0))
    any_bad = bool(bad.any())
    # science / flat and variance / flat^2, straight into new arrays (float32
    # for a float32 flat: one rounding per division instead of float64 then float32)
    own = in_place and _writeable(frame.science, np.float32) and _writeable(frame.variance, np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if own:
            science = np.divide(frame.science, flat, out=frame.science, casting="unsafe")
            variance = np.divide(frame.variance, flat, out=frame.variance, casting="unsafe")
        else:
            science = np.asarray(np.divide(frame.science, flat), dtype=np.float32)
            variance = np.asarray(np.divide(frame.variance, flat), dtype=np.float32)
        np.divide(variance, flat, out=variance, casting="unsafe")
    # quality unchanged unless a pixel is flagged: shared, not copied (frames are never changed in place)
    quality = frame.quality
    if any_bad:
        idx = np.flatnonzero(bad)
        science.reshape(-1)[idx] = np.nan
        variance.reshape(-1)[idx] = np.nan
        quality = _with_flags(frame.quality, idx, DQ.NO_FLAT | DQ.DO_NOT_USE, in_place=in_place)
    header = frame.header.copy()
    header["L1FLAT"] = (1, "Flat field applied")
    if path is not None:
        header["L1FLATF"] = (os.path.basename(str(path)), "Flat field file")
    if any_bad:
        log.debug("flat: %d pixel(s) <= 0 or non-finite set to NaN", int(bad.sum()))
    return frame.replace(science=science, variance=variance, quality=quality, header=header)


def combined_bad_pixel_mask(masks: Mapping, shape) -> np.ndarray:
    """True where any mask marks a bad pixel, bool ``shape`` (ny, nx).

    ``masks`` maps a name (e.g. ``"FLAT"``, ``"LIN"``) to a ``(ny, nx)``
    array holding 1 for good and NaN for bad.  Any non-finite or zero value
    counts as bad; other finite values count as good (masks are flags, not
    weights).  An empty mapping gives all False.

    Raises
    ------
    IoiError
        exit code 26 (or 29) naming the mask and both shapes when a mask has
        the wrong shape.
    """
    shape = tuple(shape)
    bad = np.zeros(shape, dtype=bool)
    for name, mask in masks.items():  # loop over masks, not pixels
        mask = np.asarray(mask)
        check_calibration_shape(mask, shape, what=f"bad-pixel mask {name}", path=None,
                                exit_code=ExitCode.MASK_SHAPE_MISMATCH)
        good = np.isfinite(mask)
        good &= mask != 0
        bad |= ~good
    return bad


def _writeable(array, dtype) -> bool:
    """``array`` can be changed in place as a C-contiguous ``dtype`` array."""
    return (isinstance(array, np.ndarray) and array.dtype == dtype and array.flags.c_contiguous
            and array.flags.writeable)


def _with_flags(quality, flat_index, flags, *, in_place: bool = False) -> np.ndarray:
    """``quality`` with ``flags`` ORed in at ``flat_index`` (indices into the raveled frame):
    a copy (uint16, :data:`ioi.frame.QUALITY_DTYPE`), or ``quality`` itself with ``in_place``
    when it is a writeable array of that dtype.

    Flat indices rather than a boolean mask: an in-place OR through a boolean
    index gathers and scatters by the mask twice, about 5 times slower.
    """
    own = in_place and _writeable(quality, QUALITY_DTYPE)
    out = quality if own else np.array(as_quality(quality), order="C", copy=True)
    out.reshape(-1)[flat_index] |= QUALITY_DTYPE.type(flags)
    return out


def _nan_at(plane, flat_index, *, in_place: bool = False) -> np.ndarray:
    """``plane`` as float32 with NaN at ``flat_index``: a copy, or ``plane`` itself with
    ``in_place`` when it is a writeable float32 array."""
    own = in_place and _writeable(plane, np.float32)
    out = plane if own else np.array(plane, dtype=np.float32, order="C", copy=True)
    out.reshape(-1)[flat_index] = np.nan
    return out


def apply_bad_pixel_masks(frame: Frame, masks: Mapping, *, bad=None, in_place: bool = False) -> Frame:
    """Set pixels bad in any of ``masks`` to NaN (the original multiplies the
    1/NaN masks into the data; the result is the same).

    Parameters
    ----------
    frame : Frame
        Science ``(ny, nx)``.
    masks : mapping of name -> array_like (ny, nx)
        1 = good, NaN (or 0) = bad; see :func:`combined_bad_pixel_mask`.
    bad : ndarray of bool (ny, nx), optional
        ``combined_bad_pixel_mask(masks, frame.shape)`` when the caller has
        already computed it (once for all the frames of a run); ``masks``
        then only names the masks in the header.
    in_place : bool
        Change the frame's own arrays where they are writeable (see
        :func:`apply_flat`) instead of copying them.

    Returns
    -------
    Frame
        Bad pixels: science and variance NaN, quality MASKED | DO_NOT_USE.
        Header L1BADPX = 1 and L1BADPXW = the mask names joined by commas (L1BADPXF/L1BADPXL,
        the mask file names, are the pipeline's to write).

    Raises
    ------
    IoiError
        exit code 26 (or 29) naming the mask and both shapes.
    """
    if bad is None:
        bad = combined_bad_pixel_mask(masks, frame.shape)
    else:
        bad = np.asarray(bad, dtype=bool)
        check_calibration_shape(bad, frame.shape, what="combined bad-pixel mask", path=None,
                                exit_code=ExitCode.MASK_SHAPE_MISMATCH)
    idx = np.flatnonzero(bad)
    science = _nan_at(frame.science, idx, in_place=in_place)
    variance = _nan_at(frame.variance, idx, in_place=in_place)
    quality = _with_flags(frame.quality, idx, DQ.MASKED | DQ.DO_NOT_USE, in_place=in_place)
    header = frame.header.copy()
    header["L1BADPX"] = (int(bool(masks)), "Bad-pixel masks applied")
    header["L1BADPXW"] = (",".join(str(k) for k in masks), "Bad-pixel masks used")
    log.debug("bad-pixel masks %s: %d pixel(s) masked", ",".join(map(str, masks)), idx.size)
    return frame.replace(science=science, variance=variance, quality=quality, header=header)
