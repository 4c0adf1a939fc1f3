"""Small synthetic detector data with known truth, for the detector-stage tests.

Independent of ``ioi.simulate`` on purpose: these tests pin the stages down
on their own.  Axis order: ``(nreads, ny, nx)`` for ramps.
"""

from __future__ import annotations

import numpy as np
from astropy.io import fits

from ioi.frame import Ramp


def raw_offsets(ny, nx, noutputs, *, offsets, drift=None, border=4):
    """A (ny, nx) float64 frame holding only per-section, per-parity offsets.

    offsets : (noutputs, 2) level of (even, odd) columns of each section at
        the centre of the bottom reference rows (row border/2).
    drift : (noutputs, 2) ADU per row, or None.
    """
    width = nx // noutputs
    col = np.arange(nx)
    sect, parity = col // width, col % 2
    level = np.asarray(offsets, dtype=np.float64)[sect, parity][None, :]
    frame = np.broadcast_to(level, (ny, nx)).copy()
    if drift is not None:
        rows = np.arange(ny, dtype=np.float64)[:, None] - border / 2
        frame += rows * np.asarray(drift, dtype=np.float64)[sect, parity][None, :]
    return frame


def section_parity_means(frame, noutputs, *, border=4):
    """Mean of the SCIENCE pixels of a (..., ny, nx) frame per section and parity.

    Returns (..., noutputs, 2).
    """
    frame = np.asarray(frame, dtype=np.float64)
    ny, nx = frame.shape[-2:]
    width = nx // noutputs
    col = np.arange(nx)
    inside = (col >= border) & (col < nx - border)
    out = np.empty(frame.shape[:-2] + (noutputs, 2))
    sci = frame[..., border : ny - border, :]
    for s in range(noutputs):  # loop over sections in test code only
        for p in (0, 1):
            cols = inside & (col // width == s) & (col % 2 == p)
            out[..., s, p] = sci[..., :, cols].mean(axis=(-2, -1))
    return out


def polynomial_observed(linear, coefficients):
    """Invert ``linear = poly(observed)`` for observed, by Newton iteration.

    coefficients : (order+1, ...) broadcastable to ``linear``; the polynomial
    must be increasing over the range used.
    """
    linear = np.asarray(linear, dtype=np.float64)
    obs = linear.copy()
    c = [np.asarray(ci, dtype=np.float64) for ci in coefficients]
    for _ in range(50):
        val = sum(ci * obs**i for i, ci in enumerate(c))
        der = sum(i * ci * obs ** (i - 1) for i, ci in enumerate(c) if i > 0)
        obs = obs - (val - linear) / der
    return obs


def make_ramp(
    rate, inttime, *, gain=2.0, read_noise=0.0, rng=None, group=None, index=None,
    coefficients=None, saturate_at=None, jumps=None, header=None,
):
    """A Ramp of (nreads, ny, nx) reads of a constant ``rate`` (ADU/s).

    Charge accumulates from the reset (t=0): Poisson in electrons when ``rng``
    is given (else noise-free), plus Gaussian ``read_noise`` ADU per read.
    ``coefficients`` makes the detector nonlinear: the read holds the
    ``observed`` value with poly(observed) = linear charge.
    ``jumps``: dict read index -> (ny, nx) ADU added from that read on.
    ``saturate_at``: ADU (on the noise-free charge) at or above which a read
    is flagged saturated and clipped.
    Returns (ramp, linear charge per read).
    """
    rate = np.asarray(rate, dtype=np.float64)
    t = np.asarray(inttime, dtype=np.float64)
    nreads = t.size
    ny, nx = rate.shape
    charge = np.empty((nreads, ny, nx))
    if rng is None:
        charge[:] = rate[None] * t[:, None, None]
    else:
        prev_t, acc = 0.0, np.zeros((ny, nx))
        for i in range(nreads):  # loop over reads
            acc = acc + rng.poisson(rate * gain * (t[i] - prev_t)) / gain
            charge[i] = acc
            prev_t = t[i]
    if jumps:
        for i, amount in jumps.items():
            charge[i:] += amount
    observed = charge if coefficients is None else polynomial_observed(charge, np.asarray(coefficients)[:, None])
    saturated = None
    if saturate_at is not None:
        saturated = observed >= saturate_at
        observed = np.minimum(observed, saturate_at)
    if read_noise and rng is not None:
        observed = observed + rng.normal(0.0, read_noise, observed.shape)
    if group is None:
        group = np.ones(nreads, dtype=int)
    if index is None:
        index = np.arange(1, nreads + 1)
    ramp = Ramp(
        reads=observed.astype(np.float32),
        inttime=t,
        group=np.asarray(group),
        index=np.asarray(index),
        header=fits.Header() if header is None else header,
        quality=np.zeros((ny, nx), dtype=np.uint32),
        saturated=saturated,
        names=tuple(f"read{i + 1}" for i in range(nreads)),
    )
    return ramp, charge


def fowler_layout(pairs, *, frmtime=1.4, gap=0.0):
    """INTTIME, group, index of a Fowler-``pairs`` sequence: n pedestal reads,
    a wait of ``gap`` seconds, n signal reads, one read every ``frmtime``."""
    ped = frmtime * np.arange(1, pairs + 1)
    sig = ped[-1] + gap + frmtime * np.arange(1, pairs + 1)
    t = np.concatenate([ped, sig])
    group = np.repeat([1, 2], pairs)
    index = np.tile(np.arange(1, pairs + 1), 2)
    return t, group, index
