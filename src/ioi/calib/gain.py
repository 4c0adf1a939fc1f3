"""Gain and read noise by photon transfer (SPEC 6, third tool).

Axis order: ``(npoints, ny, nx)`` for a set of difference images (one per
read count or exposure time), ``(npoints, nwy, nwx)`` for per-window
statistics, ``(nwy, nwx)`` for per-window results.

Nonlinearity biases the photon-transfer curve: with observed = L (1 - beta L)
the local slope d var / d mean is (1 - 6 beta L) / gain, 3 % low at 5000 ADU for
beta = 1e-6.  We correct it from the data themselves: in each window the mean
signal against time is fitted with ``a + b t + c t**2``; the response slope
``dO/dL = 1 + 2 c t / b`` converts each point to linear units (mean ->
``b (t - t_1)`` for UTR, variance -> shot part / slope**2) before the straight
line is fitted.  ``linearize=False`` gives the plain fit; then keep the ADU
range low.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import numpy as np

from ioi.calib._lsq import polyfit_masked
from ioi.errors import ExitCode, StageError

log = logging.getLogger(__name__)


def theoretical_gain(db: float) -> float:
    """e-/ADU from the ASIC preamp gain in dB: 3 x 40 fF / (2^16 x 10^(G/20) x 1.6e-19 C)."""
    return 3.0 * 40e-15 / (2.0**16 * 10.0 ** (db / 20.0) * 1.6e-19)


def asicgain_db(header) -> float | None:
    """The preamp gain in dB parsed from the ASICGAIN keyword's comment, or None."""
    if "ASICGAIN" not in header:
        return None
    comment = header.comments["ASICGAIN"] or ""
    m = re.search(r"([-+]?\d+(?:\.\d+)?)\s*dB", comment, re.IGNORECASE)
    return float(m.group(1)) if m else None


def ptc_points(images_a, images_b, *, window: int = 50, clip: float = 5.0):
    """Per-window mean and half-variance of the difference of two matched image sets.

    Parameters
    ----------
    images_a, images_b : ndarray, (npoints, ny, nx)
        Difference images (CDS or Fowler) of two exposures with the same
        illumination, point i of each at the same read count / exposure time.
    window : int
        Window side in pixels; edges that do not fill a window are dropped.
    clip : float
        Pixels whose difference lies beyond this many robust sigmas (1.4826
        MAD) of the window's median difference are left out (0: none).

    Returns
    -------
    mean, var : ndarray, float64, (npoints, nwy, nwx)
        Mean signal of (a + b) / 2 and var(a - b) / 2 (the variance of one image).
    """
    a = np.asarray(images_a)
    b = np.asarray(images_b)
    if a.shape != b.shape or a.ndim != 3:
        raise StageError(f"photon transfer needs two matching (npoints, ny, nx) sets; got {a.shape} and {b.shape}",
                         exit_code=ExitCode.DATA_SHAPE_MISMATCH)
    return ptc_points_rows(lambda y0, y1: (a[:, y0:y1], b[:, y0:y1]), a.shape, window=window, clip=clip)


def ptc_points_rows(get_rows, shape, *, window: int = 50, clip: float = 5.0, chunk_rows: int = 64):
    """:func:`ptc_points` on image sets produced one band of rows at a time.

    ``get_rows(y0, y1)`` returns ``(a_rows, b_rows)``, each ``(npoints, y1 -
    y0, nx)``; ``shape`` is each whole set's ``(npoints, ny, nx)``.  Bands are
    whole rows of windows, at least one and about ``chunk_rows`` pixel rows, so
    only one band's float64 work arrays exist at a time; every window is
    independent, so the result equals :func:`ptc_points` on the whole sets.
    """
    if len(shape) != 3:
        raise StageError(f"photon transfer needs (npoints, ny, nx) sets; got {tuple(shape)}",
                         exit_code=ExitCode.DATA_SHAPE_MISMATCH)
    n, ny, nx = shape
    nwy, nwx = ny // window, nx // window
    if nwy == 0 or nwx == 0:
        raise StageError(f"window {window} px is larger than the image {ny}x{nx}", exit_code=ExitCode.USAGE)
    mean = np.empty((n, nwy, nwx))
    var = np.empty((n, nwy, nwx))
    step = max(1, int(chunk_rows) // window)  # window rows per band
    for w0 in range(0, nwy, step):  # bands of window rows bound memory
        w1 = min(nwy, w0 + step)
        a, b = get_rows(w0 * window, w1 * window)
        a = np.asarray(a)
        b = np.asarray(b)
        want = (n, (w1 - w0) * window, nx)
        if a.shape != want or b.shape != want:
            raise StageError(f"image rows {w0 * window}:{w1 * window} have shapes {a.shape} and {b.shape}, "
                             f"expected {want}", exit_code=ExitCode.DATA_SHAPE_MISMATCH)
        mean[:, w0:w1], var[:, w0:w1] = _ptc_band(a, b, window, clip)
    return mean, var


def _ptc_band(a, b, window, clip):
    """Per-window mean and half-variance of one band ``(npoints, k * window, nx)``."""
    n, ny, nx = a.shape
    nwy, nwx = ny // window, nx // window
    shape = (n, nwy, window, nwx, window)
    crop = (slice(None), slice(0, nwy * window), slice(0, nwx * window))
    sa = a[crop].astype(np.float64).reshape(shape)
    sb = b[crop].astype(np.float64).reshape(shape)
    ok = np.isfinite(sa) & np.isfinite(sb)
    if clip:
        # cosmic rays and hot pixels differ between the two exposures and would
        # inflate the variance: clip the difference at `clip` robust sigmas
        import bottleneck as bn

        d = np.where(ok, sa - sb, np.nan).transpose(0, 1, 3, 2, 4).reshape(n, nwy, nwx, -1)
        med = bn.nanmedian(d, axis=-1)
        mad = bn.nanmedian(np.abs(d - med[..., None]), axis=-1) * 1.4826
        with np.errstate(invalid="ignore"):
            keep = np.abs(d - med[..., None]) <= clip * mad[..., None]
        del d
        ok &= keep.reshape(n, nwy, nwx, window, window).transpose(0, 1, 3, 2, 4)
    cnt = ok.sum(axis=(2, 4))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ok, 0.5 * (sa + sb), 0.0).sum(axis=(2, 4)) / cnt
        d = np.where(ok, sa - sb, 0.0)
        dmean = d.sum(axis=(2, 4)) / cnt
        var = (np.where(ok, d - dmean[:, :, None, :, None], 0.0) ** 2).sum(axis=(2, 4)) / (cnt - 1) / 2.0
    # a window point needs at least half its pixels (saturated ones are NaN)
    thin = cnt < 0.5 * window * window
    mean[thin] = np.nan
    var[thin] = np.nan
    return mean, var


@dataclasses.dataclass(frozen=True)
class PtcResult:
    """Per-window results (nwy, nwx) and their medians.

    gain: e-/ADU.  read_noise_adu / read_noise_e: noise of ONE read (a CDS image
    holds sqrt(2) x that; a Fowler-n image sqrt(2/n) x that).
    """

    gain: np.ndarray
    read_noise_adu: np.ndarray
    read_noise_e: np.ndarray
    mean: np.ndarray  # (npoints, nwy, nwx) as fitted (linearised if asked)
    var: np.ndarray
    used: np.ndarray  # bool (npoints, nwy, nwx)
    pooled_gain: float = float("nan")  # one fit to every window's points
    pooled_read_noise_adu: float = float("nan")

    @property
    def summary(self) -> dict:
        def med(a):
            f = a[np.isfinite(a)]
            return float(np.median(f)) if f.size else float("nan")

        return {"gain_e_per_adu": self.pooled_gain, "read_noise_adu_per_read": self.pooled_read_noise_adu,
                "read_noise_e_per_read": self.pooled_read_noise_adu * self.pooled_gain,
                "gain_window_median": med(self.gain), "read_noise_adu_window_median": med(self.read_noise_adu),
                "read_noise_e_window_median": med(self.read_noise_e),
                "nwindows": int(np.isfinite(self.gain).sum())}


def fit_ptc(mean, var, *, adu_range=(1000.0, 30000.0), times=None, first_time=None, linearize=True,
            reads_per_image: int = 1) -> PtcResult:
    """Straight-line fit of variance against mean in every window.

    Parameters
    ----------
    mean, var : ndarray, (npoints, nwy, nwx)
        From :func:`ptc_points`.
    adu_range : (a0, a1)
        Mean signals (observed ADU) used in the fit.
    times : array, (npoints,), optional
        Time since reset of each point's signal read (UTR) or exposure time
        (Fowler); needed for ``linearize``.
    first_time : float, optional
        Time of the pedestal read (UTR: INTTIME of read 1; Fowler: 0).
    linearize : bool
        Correct the nonlinearity from each window's mean ramp (module doc).
    reads_per_image : int
        Reads averaged on each side of a difference image (1 for CDS, n for Fowler-n).
    """
    mean = np.asarray(mean, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    npts = mean.shape[0]
    m2 = mean.reshape(npts, -1)
    v2 = var.reshape(npts, -1)
    used = np.isfinite(m2) & np.isfinite(v2) & (m2 >= adu_range[0]) & (m2 <= adu_range[1])
    if linearize:
        if times is None:
            raise StageError("linearised photon transfer needs the times of the points")
        t = np.broadcast_to(np.asarray(times, dtype=np.float64)[:, None], m2.shape)
        t1 = 0.0 if first_time is None else float(first_time)
        c, _ = polyfit_masked(t, m2, used, order=2, scale=max(float(np.max(times)), 1.0))
        response = 1.0 + 2.0 * c[2] * t / c[1]  # dO/dL at each point
        lin_mean = c[1] * (t - t1)
        # var = I + response**2 * L / gain: a straight line in X = response**2 * L
        x = response**2 * lin_mean
    else:
        response = np.ones_like(m2)
        lin_mean = m2
        x = m2
    p, n = polyfit_masked(x, v2, used, order=1, scale=max(adu_range[1], 1.0))
    pool, _ = polyfit_masked(x.reshape(-1, 1), v2.reshape(-1, 1), used.reshape(-1, 1), order=1,
                             scale=max(adu_range[1], 1.0))
    shape = mean.shape[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        gain = np.where(n >= 3, 1.0 / p[1], np.nan)
        rn = np.sqrt(np.where(p[0] > 0, p[0], np.nan) * reads_per_image / 2.0)
        pooled = (1.0 / pool[1, 0], float(np.sqrt(max(pool[0, 0], 0.0) * reads_per_image / 2.0)))
        v_lin = (v2 - p[0]) / response**2 + p[0]
    m2, v2 = lin_mean, v_lin
    return PtcResult(gain=gain.reshape(shape), read_noise_adu=rn.reshape(shape),
                     read_noise_e=(rn * gain).reshape(shape), mean=m2.reshape(mean.shape),
                     var=v2.reshape(mean.shape), used=used.reshape(mean.shape),
                     pooled_gain=float(pooled[0]), pooled_read_noise_adu=pooled[1])
