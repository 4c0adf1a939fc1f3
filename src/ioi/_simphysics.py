"""Detector and sky models for :mod:`ioi.simulate` (private).

Every function here is a pure function of its arguments and a
``numpy.random.Generator``; nothing is written to disk.  Axis order:
``(ny, nx)`` for a frame; ``x`` is the column, ``y`` the row.  "Stripped"
coordinates are 0-based in the science array without the 4-pixel reference
border: raw pixel (row r, col c) is stripped (r - 4, c - 4).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.fft

#: Width of the reference-pixel border on every side (SPEC 1).
BORDER = 4

#: SIDECAR ASIC preamp gain setting -> gain in dB (settings come in pairs of 3 dB steps).
ASICGAIN_DB = {
    0: -3, 1: 0, 2: 3, 3: 6, 4: 6, 5: 9, 6: 9, 7: 12,
    8: 12, 9: 15, 10: 15, 11: 18, 12: 18, 13: 21, 14: 24, 15: 27,
}

#: Full-well depth in electrons; charge above it is not collected.
FULL_WELL_E = 1.2e5

#: ADC ceiling of the 16-bit raw data.
ADC_MAX = 65535


def theoretical_gain(db: float) -> float:
    """Gain in e-/ADU from the ASIC preamp gain in dB (SPEC 6: 3 x 40 fF / (2^16 10^(G/20) e))."""
    return 3 * 40e-15 / (2**16 * 10 ** (db / 20.0) * 1.602176634e-19)


@dataclasses.dataclass(frozen=True)
class Detector:
    """Fixed per-pixel properties of the simulated H2RG.

    Attributes
    ----------
    bias : float32 (n, n)
        Raw-frame bias in ADU, reference border included.
    flat : float32 (m, m)
        Relative response of the stripped array (mean 1 over responsive pixels).
    dark : float32 (m, m)
        Dark current in e-/s.
    beta : float32 (m, m)
        Nonlinearity coefficient: observed = L (1 - beta L), L in ADU.
    badpix : uint8 (m, m)
        1 hot, 2 dead, 4 low response, 8 bad linearity.
    offset_fixed : float32 (noutputs, 2)
        Fixed offset of each output and column parity (ADU).
    read_noise : float32 (noutputs,)
        White read noise of each output (ADU rms per read).
    one_over_f_rms : float
        Rms of the 1/f noise (ADU).
    """

    bias: np.ndarray
    flat: np.ndarray
    dark: np.ndarray
    beta: np.ndarray
    badpix: np.ndarray
    offset_fixed: np.ndarray
    read_noise: np.ndarray
    one_over_f_rms: float

    @property
    def size(self) -> int:
        return self.bias.shape[0]


def smooth_field(rng, shape, *, nterms=6, scale=1.0):
    """A smooth random field of rms about ``scale``: a sum of low-frequency cosines, (ny, nx) float32."""
    ny, nx = shape
    y = np.linspace(0.0, 1.0, ny, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, nx, dtype=np.float32)[None, :]
    out = np.zeros(shape, np.float32)
    for _ in range(nterms):
        kx, ky = rng.uniform(0.3, 2.5, 2) * np.pi
        px, py = rng.uniform(0, 2 * np.pi, 2)
        out += (np.cos(kx * x + px) * np.cos(ky * y + py)).astype(np.float32)
    out *= np.float32(scale * 2.0 / np.sqrt(nterms))
    return out


def make_detector(rng, size, noutputs, *, dark_e_s=0.1):
    """Draw the fixed detector properties for a ``size`` x ``size`` array (see :class:`Detector`)."""
    n = size
    m = n - 2 * BORDER

    # Bias: a smooth pattern, a column pattern and per-pixel scatter, within 15000-25000 ADU.
    bias = 20000.0 + smooth_field(rng, (n, n), scale=1500.0)
    bias += rng.normal(0.0, 300.0, n).astype(np.float32)[None, :]
    bias += rng.normal(0.0, 600.0, (n, n)).astype(np.float32)
    np.clip(bias, 15000.0, 25000.0, out=bias)

    # Flat: large-scale vignetting and waves (several %), pixel-scale 1.5 %, blobs, dead pixels.
    yy = np.linspace(-1.0, 1.0, m, dtype=np.float32)[:, None]
    xx = np.linspace(-1.0, 1.0, m, dtype=np.float32)[None, :]
    flat = 1.0 - 0.04 * (xx**2 + yy**2) + smooth_field(rng, (m, m), nterms=4, scale=0.02)
    flat *= 1.0 + rng.normal(0.0, 0.015, (m, m)).astype(np.float32)
    nblob = max(2, int(round(6 * (m / 2040.0) ** 2)))
    for _ in range(nblob):  # a few blobs: a loop over blobs, each touching a small box
        r = rng.uniform(3.0, 10.0)
        cx, cy = rng.uniform(r + 2, m - r - 2, 2)
        x0, x1 = int(cx - r - 1), int(cx + r + 2)
        y0, y1 = int(cy - r - 1), int(cy + r + 2)
        by, bx = np.mgrid[y0:y1, x0:x1]
        inside = (bx - cx) ** 2 + (by - cy) ** 2 <= r * r
        flat[y0:y1, x0:x1][inside] *= rng.uniform(0.1, 0.3)
    npix = m * m
    dead = np.zeros(npix, bool)
    dead[rng.choice(npix, max(1, int(2e-4 * npix)), replace=False)] = True
    dead = dead.reshape(m, m)
    flat[dead] = rng.uniform(0.0, 0.02, int(dead.sum())).astype(np.float32)
    good = flat >= 0.35
    flat /= np.float32(flat[good].mean(dtype=np.float64))
    low = (flat < 0.35) & ~dead

    # Dark current: lognormal around ``dark_e_s``, plus hot pixels up to thousands of e-/s.
    dark = (dark_e_s * rng.lognormal(0.0, 0.3, (m, m))).astype(np.float32)
    hot = np.zeros(npix, bool)
    hot[rng.choice(npix, max(1, int(5e-4 * npix)), replace=False)] = True
    hot = hot.reshape(m, m) & ~dead
    dark[hot] = np.exp(rng.uniform(np.log(20.0), np.log(5000.0), int(hot.sum()))).astype(np.float32)

    # Nonlinearity: beta ~ 1e-6 (40000 ADU is 3-5 % low); 2 % of pixels much worse.
    beta = np.clip(1e-6 * (1.0 + 0.1 * rng.standard_normal((m, m))), 0.75e-6, 1.25e-6)
    badlin = rng.random((m, m)) < 0.02
    beta[badlin] = rng.uniform(3e-6, 6e-6, int(badlin.sum()))
    beta = beta.astype(np.float32)

    badpix = (
        hot.astype(np.uint8) * 1 + dead.astype(np.uint8) * 2 + low.astype(np.uint8) * 4
        + badlin.astype(np.uint8) * 8
    )
    return Detector(
        bias=bias.astype(np.float32),
        flat=flat.astype(np.float32),
        dark=dark,
        beta=beta,
        badpix=badpix,
        offset_fixed=rng.uniform(-150.0, 150.0, (noutputs, 2)).astype(np.float32),
        read_noise=rng.uniform(15.0, 20.0, noutputs).astype(np.float32),
        one_over_f_rms=3.0,
    )


def read_offsets(rng, size, noutputs, offset_fixed):
    """Per-read additive pattern (ADU), (size, size) float32.

    Each output section and column parity gets its own offset (fixed part
    plus a per-read change of tens of ADU) and a linear drift along the rows.
    """
    w = size // noutputs
    per_read = rng.normal(0.0, 60.0, (noutputs, 1)) + rng.normal(0.0, 10.0, (noutputs, 2))
    level = (offset_fixed + per_read).astype(np.float32)  # (noutputs, parity)
    slope = rng.normal(0.0, 20.0, (noutputs, 2)).astype(np.float32)  # ADU over the full height
    cols = np.arange(size)
    out_idx, parity = cols // w, cols % 2
    rowfrac = (np.arange(size, dtype=np.float32) / (size - 1) - 0.5)[:, None]
    return level[out_idx, parity][None, :] + slope[out_idx, parity][None, :] * rowfrac


def one_over_f(rng, size, noutputs, rms):
    """1/f noise along the readout, common to all outputs (read in parallel), (size, size) float32.

    Pixels are read along the rows of each output section, so the time
    series of length ``size * size / noutputs`` is laid out row by row in
    one section and repeated in every section.
    """
    w = size // noutputs
    nt = size * w
    white = rng.standard_normal(nt, dtype=np.float32)
    spec = scipy.fft.rfft(white)
    f = np.arange(spec.size, dtype=np.float32)
    f[0] = np.inf  # no DC term
    spec /= np.sqrt(f)
    series = scipy.fft.irfft(spec, n=nt).astype(np.float32)
    series *= np.float32(rms / max(float(series.std(dtype=np.float64)), 1e-12))
    return np.tile(series.reshape(size, w), (1, noutputs))


def moffat_alpha(fwhm, beta):
    """Moffat core width alpha from the FWHM."""
    return fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def render_stars(x, y, flux, shape, *, fwhm, beta, half=16, oversample=3, batch=128):
    """Add Moffat stars into an image; return (image, peak_index).

    Each star is a postage stamp of (2 half + 1)^2 pixels, each pixel the
    mean of ``oversample``^2 sub-samples of the Moffat profile, normalised so
    that the stamp sums to exactly ``flux``; pixels falling outside the image
    are lost.

    Parameters
    ----------
    x, y : float arrays (nstars,)
        Centres in pixel coordinates of ``shape`` (pixel centres at integers).
    flux : float array (nstars,)
        Total of each stamp (e.g. e-/s).
    shape : (ny, nx)

    Returns
    -------
    image : float32 (ny, nx)
    peak_index : int64 (nstars,)
        Flat index of each star's brightest in-image pixel, -1 if none.
    """
    ny, nx = shape
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    flux = np.asarray(flux, np.float64)
    nstar = x.size
    alpha2 = moffat_alpha(fwhm, beta) ** 2
    offs = np.arange(-half, half + 1)
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    idx_parts, w_parts = [], []
    peak_index = np.full(nstar, -1, np.int64)
    for s in range(0, nstar, batch):  # a loop over batches of stars, vectorised within
        xs, ys = x[s:s + batch], y[s:s + batch]
        x0, y0 = np.rint(xs).astype(np.int64), np.rint(ys).astype(np.int64)
        dx = ((x0 - xs)[:, None, None] + offs[None, :, None] + sub[None, None, :]).astype(np.float32)
        dy = ((y0 - ys)[:, None, None] + offs[None, :, None] + sub[None, None, :]).astype(np.float32)
        u = 1.0 + (dy[:, :, :, None, None] ** 2 + dx[:, None, None, :, :] ** 2) / np.float32(alpha2)
        prof = u ** np.float32(-beta)
        stamp = prof.sum(axis=(2, 4), dtype=np.float64)  # (b, S, S)
        stamp *= (flux[s:s + batch] / stamp.sum(axis=(1, 2)))[:, None, None]
        rows = y0[:, None] + offs[None, :]
        cols = x0[:, None] + offs[None, :]
        valid = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
        flat_idx = rows[:, :, None] * nx + cols[:, None, :]
        idx_parts.append(flat_idx[valid])
        w_parts.append(stamp[valid])
        masked = np.where(valid, stamp, -1.0).reshape(len(xs), -1)
        best = masked.argmax(axis=1)
        ok = valid.reshape(len(xs), -1)[np.arange(len(xs)), best]
        peak_index[s:s + batch] = np.where(ok, flat_idx.reshape(len(xs), -1)[np.arange(len(xs)), best], -1)
    if idx_parts:
        img = np.bincount(np.concatenate(idx_parts), weights=np.concatenate(w_parts), minlength=ny * nx)
    else:
        img = np.zeros(ny * nx)
    return img.reshape(ny, nx).astype(np.float32), peak_index


def nonlinear(signal_adu, beta):
    """Observed signal from linear signal (ADU since reset): L (1 - beta L), L capped at its maximum 1/(2 beta)."""
    lcap = np.minimum(signal_adu, np.float32(0.5) / beta)
    return lcap * (np.float32(1.0) - beta * lcap)


def dither_pattern(ndither, step, rng, *, jitter=0.3):
    """Offsets (ndither, 2) of (dx, dy) in pixels: a square spiral from (0, 0), plus sub-pixel jitter.

    Dither 1 is the reference and has exactly (0, 0).
    """
    pts = [(0, 0)]
    x = y = 0
    leg, direction = 1, 0
    moves = [(1, 0), (0, 1), (-1, 0), (0, -1)]
    while len(pts) < ndither:  # a loop over dither positions
        for _ in range(2):
            mx, my = moves[direction % 4]
            for _ in range(leg):
                x, y = x + mx, y + my
                pts.append((x, y))
            direction += 1
        leg += 1
    off = np.array(pts[:ndither], np.float64) * step
    off[1:] += rng.normal(0.0, jitter, (ndither - 1, 2))
    return off
