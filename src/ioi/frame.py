"""The data carried between stages: one frame, or one ramp of reads.

Axis order everywhere: ``(ny, nx)`` for a frame, ``(nreads, ny, nx)`` for a
ramp; ``y`` is the FITS row (NAXIS2), ``x`` the column (NAXIS1).
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np
from astropy.io import fits


class DQ(enum.IntFlag):
    """Data-quality bits, held in :data:`QUALITY_DTYPE` (uint16) planes.  0 means good.

    ``DO_NOT_USE`` is set together with any bit that makes a pixel's value
    unusable; the others say why.  Every bit is below ``1 << 16``.
    """

    GOOD = 0
    DO_NOT_USE = 1 << 0
    SATURATED = 1 << 1  # at or above the saturation level in a read used
    JUMP_DET = 1 << 2  # a cosmic-ray jump was found in the ramp
    DEAD = 1 << 3  # no response
    HOT = 1 << 4  # excess dark signal
    LOW_RESPONSE = 1 << 5  # flat response below threshold
    BAD_LINEARITY = 1 << 6  # flagged by the linearity calibration
    NO_OVERLAP = 1 << 7  # no data after registration
    MASKED = 1 << 8  # NaN in a selected bad-pixel mask
    NO_SKY = 1 << 9  # no sky estimate could be made
    NO_FLAT = 1 << 10  # flat missing or non-positive
    REFERENCE_PIXEL = 1 << 11  # part of the reference border
    SOURCE = 1 << 12  # inside a detected-source mask (informational)
    NONLINEAR_EXTRAPOLATED = 1 << 13  # beyond the calibrated linearity range


#: The dtype of quality planes.  Every DQ bit fits in 16 bits, so a frame's flags take
#: 8 MB at 2040x2040 instead of 16 MB as uint32: less memory at the pipeline's peak
#: (nine frames, their resampled planes and the stack's) and half the bytes in every
#: pass over the flags; the products store them as uint16 too.
QUALITY_DTYPE = np.dtype(np.uint16)


def as_quality(quality) -> np.ndarray:
    """``quality`` as a :data:`QUALITY_DTYPE` array: itself when it already is one, else
    converted (any integer dtype whose values fit; others raise ValueError)."""
    q = np.asarray(quality)
    if q.dtype == QUALITY_DTYPE:
        return q
    if q.dtype.kind not in "ui" and q.dtype != bool:
        raise ValueError(f"quality flags must be integers, got {q.dtype}")
    wider = q.dtype.itemsize > QUALITY_DTYPE.itemsize or q.dtype.kind == "i"
    if wider and q.size and (int(q.max()) > np.iinfo(QUALITY_DTYPE).max or int(q.min()) < 0):
        raise ValueError("quality flags beyond 16 bits or negative: not DQ bits")
    return q.astype(QUALITY_DTYPE)


_FLAG_ROWS = 64  # rows tested at a time by flagged()


def flagged(quality: np.ndarray, bits, out=None) -> np.ndarray:
    """Boolean plane of the pixels with any of the DQ ``bits`` set: ``(quality & bits) != 0``
    computed in row chunks through one small reused buffer (no frame-sized
    integer temporary; several times faster on a full frame).  ``out``: a bool
    array of the same shape to write into."""
    quality = np.asarray(quality)
    out = np.empty(quality.shape, dtype=bool) if out is None else out
    if quality.ndim != 2:
        np.not_equal(quality & quality.dtype.type(bits), 0, out=out)
        return out
    ny, nx = quality.shape
    buf = np.empty((min(_FLAG_ROWS, ny), nx), dtype=quality.dtype)
    for r in range(0, ny, _FLAG_ROWS):
        n = min(_FLAG_ROWS, ny - r)
        np.not_equal(np.bitwise_and(quality[r:r + n], quality.dtype.type(bits), out=buf[:n]), 0, out=out[r:r + n])
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Frame:
    """One image with its variance, quality flags and header.

    Attributes
    ----------
    science : ndarray, float32, (ny, nx)
        Data in ADU (counts) unless the header's BUNIT says otherwise.
    variance : ndarray, float32, (ny, nx)
        Variance of ``science`` in ADU^2.
    quality : ndarray, uint16 (:data:`QUALITY_DTYPE`), (ny, nx)
        :class:`DQ` bit flags.
    header : astropy.io.fits.Header
    """

    science: np.ndarray
    variance: np.ndarray
    quality: np.ndarray
    header: fits.Header

    def __post_init__(self):
        shape = self.science.shape
        for name in ("variance", "quality"):
            arr = getattr(self, name)
            if arr.shape != shape:
                raise ValueError(f"Frame.{name} has shape {arr.shape}, science has {shape}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.science.shape

    @classmethod
    def from_science(cls, science, header=None, *, variance=None, quality=None) -> Frame:
        """A frame from a science array, with zero variance and good quality by default."""
        science = np.asarray(science, dtype=np.float32)
        if variance is None:
            variance = np.zeros_like(science)
        if quality is None:
            quality = np.zeros(science.shape, dtype=QUALITY_DTYPE)
        return cls(
            science=science,
            variance=np.asarray(variance, dtype=np.float32),
            quality=as_quality(quality),
            header=fits.Header() if header is None else header.copy(),
        )

    def replace(self, **changes) -> Frame:
        """A new frame with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True, eq=False)
class Ramp:
    """The raw reads of one exposure sequence (one dither), in INTTIME order.

    Attributes
    ----------
    reads : ndarray, float32, (nreads, ny, nx)
        Raw counts in ADU, reference border included until it is stripped.
    inttime : ndarray, float64, (nreads,)
        Seconds since the reset for each read (header INTTIME).
    group : ndarray, int, (nreads,)
        SEQNUM_M of each read (1 = pedestal, 2 = signal in Fowler mode).
    index : ndarray, int, (nreads,)
        SEQNUM_N of each read within its group.
    header : astropy.io.fits.Header
        Header of the first read.
    quality : ndarray, uint16 (:data:`QUALITY_DTYPE`), (ny, nx)
        Flags gathered from the reads so far (e.g. saturation).
    saturated : ndarray of bool, (nreads, ny, nx), or None
        True where a read was at or above the saturation level (raw ADU,
        judged before reference subtraction).  Such reads are never used.
    names : tuple of str
        File names of the reads, for messages and provenance.
    """

    reads: np.ndarray
    inttime: np.ndarray
    group: np.ndarray
    index: np.ndarray
    header: fits.Header
    quality: np.ndarray
    saturated: np.ndarray | None = None
    names: tuple = ()

    @property
    def nreads(self) -> int:
        return self.reads.shape[0]

    def replace(self, **changes) -> Ramp:
        return dataclasses.replace(self, **changes)


#: e-/ADU for each ASICGAIN setting (SPEC 2.8).
GAIN_BY_ASICGAIN = {8: 3.05, 10: 2.12, 12: 1.5, 13: 1.06}
