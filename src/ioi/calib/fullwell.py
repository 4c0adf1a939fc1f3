"""Full-well depth per pixel from an up-the-ramp sequence to saturation (SPEC 6, fourth tool).

Axis order: ``(nreads, ny, nx)`` for signals, ``(ny, nx)`` for maps.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ioi.errors import ExitCode, StageError


@dataclasses.dataclass(frozen=True)
class FullWellResult:
    """depth: float32 ADU (ny, nx), the highest signal reached before the ramp
    stops rising or the ADC saturates (NaN: no usable read); reached: bool, True
    where the ramp did stop (plateau or ADC saturation) -- elsewhere ``depth``
    is only a lower limit; adc: bool, True where ADC saturation ended the ramp."""

    depth: np.ndarray
    reached: np.ndarray
    adc: np.ndarray


def full_well(signal, *, plateau_fraction: float = 0.1, chunk_rows: int = 64) -> FullWellResult:
    """Full-well depth from signals since reset.

    Parameters
    ----------
    signal : ndarray, (nreads, ny, nx)
        Signal since reset at each read (:func:`ioi.calib.linearity.ramp_signal`),
        NaN from the first ADC-saturated read on.
    plateau_fraction : float
        The ramp has stopped rising when its last step is below this fraction
        of its first step.
    chunk_rows : int
        Rows per block (bounds the float64 work arrays; the result does not
        depend on it, every pixel is independent).
    """
    s = np.asarray(signal)
    if s.ndim != 3 or s.shape[0] < 3:
        raise StageError(f"full well needs a ramp (nreads >= 3, ny, nx); got {s.shape}",
                         exit_code=ExitCode.TOO_FEW_FILES_CDS)
    ny, nx = s.shape[1:]
    depth = np.empty((ny, nx), dtype=np.float32)
    reached = np.empty((ny, nx), dtype=bool)
    adc = np.empty((ny, nx), dtype=bool)
    step = max(int(chunk_rows), 1)
    for y0 in range(0, ny, step):  # row chunks, not rows: bound the float64 copy
        rows = slice(y0, y0 + step)
        depth[rows], reached[rows], adc[rows] = _full_well_block(s[:, rows].astype(np.float64), plateau_fraction)
    return FullWellResult(depth=depth, reached=reached, adc=adc)


def _full_well_block(s, plateau_fraction):
    """depth (float64), reached, adc of one block ``s`` float64 (nreads, rows, nx)."""
    finite = np.isfinite(s)
    nfin = finite.sum(axis=0)
    depth = np.where(finite, s, -np.inf).max(axis=0)
    depth = np.where(nfin > 0, depth, np.nan)
    adc = nfin < s.shape[0]
    last = np.clip(nfin - 1, 1, s.shape[0] - 1)
    yy, xx = np.indices(s.shape[1:])
    last_step = s[last, yy, xx] - s[last - 1, yy, xx]
    first_step = s[1] - s[0]
    with np.errstate(invalid="ignore"):
        plateau = (nfin >= 2) & (last_step < plateau_fraction * first_step)
    reached = adc | plateau
    return depth, reached, adc
