"""Small synthetic up-the-ramp data with known truth, for the calibration tests and benchmarks.

Physics as in ``ioi.simulate``: flat illumination ``rate x flat`` (ADU/s),
Poisson charge in electrons, observed = L (1 - beta L), bias 15000-25000 ADU,
Gaussian read noise per read, ADC saturation at 65535 raw, a 4-pixel
reference border that sees bias and noise only.  Axis order ``(nreads, ny, nx)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

SATURATION = 65535.0


@dataclasses.dataclass(frozen=True)
class RampTruth:
    """Truth arrays over the science area ``(ny, nx)`` (border excluded)."""

    flat: np.ndarray
    beta: np.ndarray
    rate: np.ndarray  # ADU/s of linear charge
    bad: np.ndarray  # bool, injected bad pixels (dead, clipped-early, hot)
    gain: float
    read_noise: float  # per read, ADU
    fullwell: np.ndarray  # ADU of linear charge at which charge stops accumulating (inf: none)


def make_truth(size=64, *, rate=400.0, flat_rms=0.05, beta=1e-6, gain=2.0, read_noise=17.0,
               nbad=0, fullwell=None, seed=0) -> RampTruth:
    """Random truth for a ``size x size`` science array."""
    rng = np.random.default_rng(seed)
    flat = rng.normal(1.0, flat_rms, (size, size)).clip(0.5, 1.5)
    b = rng.normal(beta, 0.1 * beta, (size, size))
    bad = np.zeros((size, size), dtype=bool)
    fw = np.full((size, size), np.inf) if fullwell is None else rng.normal(fullwell, 0.03 * fullwell, (size, size))
    if nbad:
        idx = rng.choice(size * size, nbad, replace=False)
        bad.flat[idx] = True
    return RampTruth(flat=flat, beta=b, rate=rate * flat, bad=bad, gain=gain, read_noise=read_noise,
                     fullwell=fw)


def make_ramp(truth: RampTruth, *, nreads=25, interval=5.0, border=4, seed=1, bias=None):
    """One raw UTR run: ``(reads float32 (nreads, ny+2b, nx+2b), inttime (nreads,))``.

    Injected bad pixels (``truth.bad``) are split in thirds: dead (no charge),
    clipped (charge stops at 8000 ADU), hot (30x the rate).
    """
    rng = np.random.default_rng(seed)
    ny, nx = truth.flat.shape
    t = interval * np.arange(1, nreads + 1)
    rate = truth.rate.copy()
    bad_idx = np.flatnonzero(truth.bad)
    dead, clip, hot = np.array_split(bad_idx, 3)
    rate.flat[dead] = 0.0
    rate.flat[hot] *= 30.0
    dt = np.diff(np.concatenate([[0.0], t]))
    electrons = rng.poisson(rate[None] * truth.gain * dt[:, None, None]).cumsum(axis=0)
    lin = electrons / truth.gain
    lin = np.minimum(lin, truth.fullwell[None])
    lin.reshape(nreads, -1)[:, clip] = np.minimum(lin.reshape(nreads, -1)[:, clip], 8000.0)
    obs = lin * (1.0 - truth.beta[None] * lin)
    full = np.zeros((nreads, ny + 2 * border, nx + 2 * border))
    full[:, border:border + ny, border:border + nx] = obs
    if bias is None:
        bias = rng.uniform(15000, 25000)
    full += bias + rng.normal(0.0, truth.read_noise, full.shape)
    full = np.clip(np.round(full), 0, SATURATION)
    return full.astype(np.float32), t


def write_teledyne(directory, reads, inttime, *, run=1, group=1, asicgain=10, gain_db=18.0,
                   frmtime=None, noutputs=32):
    """Write reads as ``H2RG_R<run:02d>_M<group:02d>_N<read:02d>.fits`` raw files (int16 + BZERO)."""
    from astropy.io import fits

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (img, t) in enumerate(zip(reads, inttime), start=1):  # loop over reads
        hdu = fits.PrimaryHDU((np.asarray(img, dtype=np.int64) - 32768).astype(np.int16))
        hdu.header["BZERO"] = 32768
        hdu.header["BSCALE"] = 1
        h = hdu.header
        h["INTTIME"] = float(t)
        h["FRMTIME"] = float(inttime[0] if frmtime is None else frmtime)
        h["NOUTPUTS"] = noutputs
        h["SEQNUM_R"] = run
        h["SEQNUM_M"] = group
        h["SEQNUM_N"] = k
        h["ASICGAIN"] = (asicgain, f"ASIC preamp gain setting, {gain_db:g} dB")
        p = directory / f"H2RG_R{run:02d}_M{group:02d}_N{k:02d}.fits"
        hdu.writeto(p, overwrite=True)
        paths.append(p)
    return paths
