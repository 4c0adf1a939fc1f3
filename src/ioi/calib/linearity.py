"""Nonlinearity coefficients from up-the-ramp (UTR) sequences (SPEC 6, first tool).

Axis order: ``(nreads, ny, nx)`` for a ramp or a stack of signals, ``(ny, nx)``
for a map, ``(order + 1, ny, nx)`` for the coefficients (index i = order i).

Choice of the "ideal" signal.  The original fitted a straight line to signal
versus time between 20 and 100 s.  A ramp that is already nonlinear there
(observed = L (1 - beta L) with beta ~ 1e-6 reaches 4 % at 40000 ADU) bends
that line's slope low by ~5 %, and every coefficient inherits the bias.  We fit
``O = b t + c t**2`` in the time window instead and take ``b t`` as the ideal
(linear) signal: for a quadratic nonlinearity in charge the ramp is exactly
quadratic in time, so ``b`` is the unbiased initial rate; for milder
higher-order terms the quadratic absorbs most of the curvature.  No intercept:
the signal is restored to the reset (``ramp_signal``), so it is 0 at t = 0; a
free intercept, extrapolated from 20 s, carried ~200 ADU of photon noise into
the constant coefficient.  The fit is made to the per-step rates
``dO/dt = b + c (t_k + t_{k-1})``, whose Poisson noise is independent between
steps (the cumulative ramp is a random walk).  The polynomial observed ->
ideal is then fitted inside the ADU window.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

import numpy as np

from ioi.calib._lsq import polyfit_masked, polyval
from ioi.errors import ExitCode, StageError

log = logging.getLogger(__name__)

#: Reason bits in :attr:`LinearityResult.reason`.
NO_POINTS = 1
HIGH_RESIDUAL = 2
NO_RATE = 4
NONLINEARITY_OUTLIER = 8


def ramp_signal(reads, inttime, *, lost_time=None, saturated=None) -> np.ndarray:
    """Signal since the reset at every read of one UTR run.

    ``signal_k = read_k - read_1 + rate * lost_time`` with ``rate = (read_2 -
    read_1) / (t_2 - t_1)``: the CDS of reads 1..k plus the charge collected
    before the first read.

    Parameters
    ----------
    reads : ndarray, (nreads, ny, nx)
        Reference-subtracted reads in INTTIME order.
    inttime : array, (nreads,)
        Seconds since the reset of each read.
    lost_time : float, optional
        Seconds of charge collected before read 1; default ``inttime[0]``
        (on IO:I equal to FRMTIME, one read time).
    saturated : ndarray of bool, (nreads, ny, nx), optional
        ADC-saturated reads; they and every later read become NaN.

    Returns
    -------
    ndarray, float32, (nreads, ny, nx)
    """
    reads = np.asarray(reads)
    t = np.asarray(inttime, dtype=np.float64)
    if reads.ndim != 3 or reads.shape[0] < 2 or t.shape != (reads.shape[0],):
        raise StageError(
            f"a UTR run needs >= 2 reads with one INTTIME each; got reads {reads.shape}, inttime {t.shape}",
            exit_code=ExitCode.TOO_FEW_FILES_CDS,
        )
    sats = itertools.repeat(None) if saturated is None else np.asarray(saturated, dtype=bool)
    if saturated is not None and sats.shape != reads.shape:
        raise StageError(f"saturation flags {sats.shape} do not match reads {reads.shape}",
                         exit_code=ExitCode.DATA_SHAPE_MISMATCH)
    sig = np.empty(reads.shape, dtype=np.float32)
    for k, s in enumerate(iter_ramp_signal(zip(reads, sats), t, lost_time=lost_time)):  # loop over reads
        sig[k] = s
    return sig


def iter_ramp_signal(reads, inttime, *, lost_time=None):
    """:func:`ramp_signal` one read at a time, for reads that arrive one by one.

    Parameters
    ----------
    reads : iterable of (read, saturated) pairs
        ``read``: a reference-subtracted read, ndarray (ny, nx), in INTTIME
        order (e.g. read from disk one at a time, so that the run's cube is
        never held); ``saturated``: its ADC-saturated pixels, bool ndarray
        (ny, nx), or None.  A saturated pixel is NaN in that and every later read.
    inttime : array, (nreads,)
        Seconds since the reset of each read (only the first two are used).
    lost_time : float, optional
        As for :func:`ramp_signal`.

    Yields
    ------
    ndarray, float32, (ny, nx)
        The signal of each read, the values :func:`ramp_signal` gives (the
        first one once the second read has arrived, to know the rate).
    """
    t = np.asarray(inttime, dtype=np.float64)
    if t.ndim != 1 or t.size < 2:
        raise StageError(f"a UTR run needs >= 2 reads with one INTTIME each; got inttime {t.shape}",
                         exit_code=ExitCode.TOO_FEW_FILES_CDS)
    if lost_time is None:
        lost_time = float(t[0])
    first = rate = bad = bad_first = None
    nreads = 0
    for k, (read, saturated) in enumerate(reads):  # loop over reads
        nreads = k + 1
        if saturated is not None:
            s = np.asarray(saturated, dtype=bool)
            bad = s.copy() if bad is None else bad | s  # saturated here or earlier
        if k == 0:
            first = np.asarray(read).astype(np.float64)
            bad_first = bad
            continue
        if k == 1:
            rate = (read - first) / (t[1] - t[0])
            yield _read_signal(first, first, rate, lost_time, bad_first)
        yield _read_signal(read, first, rate, lost_time, bad)
    if nreads < 2:
        raise StageError(f"a UTR run needs >= 2 reads with one INTTIME each; got {nreads} read(s)",
                         exit_code=ExitCode.TOO_FEW_FILES_CDS)


def _read_signal(read, first, rate, lost_time, bad):
    """float32 (ny, nx) signal since reset of one read; NaN where ``bad``."""
    sig = ((np.asarray(read).astype(np.float64) - first) + rate * lost_time).astype(np.float32)
    if bad is not None:
        sig[bad] = np.nan
    return sig


@dataclasses.dataclass(frozen=True)
class LinearityResult:
    """Per-pixel linearity calibration, all arrays ``(ny, nx)`` except ``coeffs``.

    coeffs : float32 (order + 1, ny, nx), observed -> ideal polynomial, NaN-free (bad pixels: identity)
    residual : float32, median |corrected - ideal| / ideal in percent (NaN where no points)
    bad : bool, True for a bad pixel
    reason : uint8, OR of NO_POINTS, HIGH_RESIDUAL, NO_RATE, NONLINEARITY_OUTLIER
    rate : float32, linear rate b (ADU/s) from the time-window fit
    beta : float32, quadratic nonlinearity -c / b**2 (observed = L (1 - beta L)) from the same fit
    """

    coeffs: np.ndarray
    residual: np.ndarray
    bad: np.ndarray
    reason: np.ndarray
    rate: np.ndarray
    beta: np.ndarray


def _fit_chunk(sig, t, time_window, adu_window, order, bad_threshold, rate_sigma, fit_constant):
    """Fit one block of pixels.  sig: float (nreads, npix)."""
    nreads, npix = sig.shape
    tt = np.broadcast_to(t[:, None], sig.shape)
    finite = np.isfinite(sig)
    in_t = finite & (tt >= time_window[0]) & (tt <= time_window[1])
    # Fit the increments, not the cumulative signal: Poisson increments are
    # independent, a cumulative ramp is a random walk whose points are not.
    # O = b t + c t**2  =>  dO/dt between reads k-1, k = b + c (t_k + t_{k-1}).
    dt = np.diff(t)[:, None]
    step_rate = np.diff(sig, axis=0) / dt
    tsum = np.broadcast_to((t[1:] + t[:-1])[:, None], step_rate.shape)
    use = in_t[1:] & in_t[:-1]
    lin, n_t = polyfit_masked(tsum, step_rate, use, order=1, scale=max(abs(time_window[1]), 1.0))
    ideal = lin[0] * tt  # (nreads, npix): signal since reset at the initial rate
    model = ideal + lin[1] * tt**2  # the fitted (noise-free) observed ramp
    in_a = finite & (sig >= adu_window[0]) & (sig <= adu_window[1])
    # The polynomial maps the fitted observed ramp (not the noisy reads) to the
    # ideal one: the reads' random-walk photon noise (~1 % at 2500 ADU) would
    # otherwise be fitted by the polynomial's low-order terms.
    coeffs, n_a = polyfit_masked(model, ideal, in_a, order=order, scale=max(abs(adu_window[1]), 1.0),
                                  lowest=0 if fit_constant else 1)
    del model  # free each work array once used: they set the memory of a chunk
    no_points = (n_t < 2) | (n_a < order + int(fit_constant)) | ~np.all(np.isfinite(coeffs), axis=0)
    identity = np.zeros((order + 1, 1))
    identity[1] = 1.0
    coeffs = np.where(no_points, identity, coeffs)

    # Residual nonlinearity: how well a polynomial of this order maps this
    # pixel's own reads to the ideal ramp (a fit to the noisy reads, as the
    # original measured it); kinks, plateaus and telegraph noise leave a large one.
    data_coeffs, _ = polyfit_masked(sig, ideal, in_a, order=order, scale=max(abs(adu_window[1]), 1.0),
                                    lowest=0 if fit_constant else 1)
    data_coeffs = np.where(no_points, identity, data_coeffs)
    corrected = polyval(data_coeffs[:, None, :], sig)
    with np.errstate(invalid="ignore", divide="ignore"):
        res = np.abs(corrected - ideal) / np.abs(ideal) * 100.0
    del corrected
    res = np.where(in_a & (ideal != 0), res, np.nan)
    del ideal, in_a, finite, in_t
    # np.nanmedian warns on all-NaN columns; those pixels are NO_POINTS anyway
    filled = np.where(np.isnan(res), np.inf, res)
    cnt = np.isfinite(res).sum(axis=0)
    del res
    filled.sort(axis=0)  # in place: `filled` is private
    srt = filled
    lo = np.clip((cnt - 1) // 2, 0, nreads - 1)
    hi = np.clip(cnt // 2, 0, nreads - 1)
    cols = np.arange(npix)
    resid = 0.5 * (srt[lo, cols] + srt[hi, cols])
    resid = np.where(cnt > 0, resid, np.nan)

    # per-step rates between consecutive finite reads
    ok = np.isfinite(step_rate)
    rates = np.where(ok, step_rate, 0.0)
    nr = ok.sum(axis=0)
    mean = rates.sum(axis=0) / np.maximum(nr, 1)
    var = (np.where(ok, rates - mean, 0.0) ** 2).sum(axis=0) / np.maximum(nr - 1, 1)
    no_rate = (nr < 2) | (mean - rate_sigma * np.sqrt(var) < 0)

    reason = np.zeros(npix, dtype=np.uint8)
    reason |= np.where(no_points, NO_POINTS, 0).astype(np.uint8)
    reason |= np.where(~no_points & ~(resid <= bad_threshold), HIGH_RESIDUAL, 0).astype(np.uint8)
    reason |= np.where(no_rate, NO_RATE, 0).astype(np.uint8)
    with np.errstate(invalid="ignore", divide="ignore"):
        beta = np.where(lin[0] > 0, -lin[1] / lin[0] ** 2, np.nan)
    return coeffs, resid, reason, lin[0], beta


def fit_linearity(
    signal,
    times,
    *,
    time_window=(20.0, 100.0),
    adu_window=(2500.0, 40000.0),
    order: int = 3,
    bad_threshold: float = 0.8,
    rate_sigma: float = 3.0,
    fit_constant: bool = False,
    outlier_sigma: float = 5.0,
    chunk_rows: int = 64,
) -> LinearityResult:
    """Fit the observed -> ideal polynomial of every pixel.

    Parameters
    ----------
    signal : ndarray, (nreads, ny, nx)
        Signal since reset (e.g. median over runs of :func:`ramp_signal`);
        NaN marks unusable (saturated) reads.
    times : array, (nreads,)
        Seconds since reset of each read.
    time_window : (t0, t1)
        Reads used for the ideal-signal fit (inclusive).
    adu_window : (a0, a1)
        Observed signals used for the polynomial fit (inclusive).
    order : int
        Polynomial order (>= 1).
    bad_threshold : float
        Median residual nonlinearity (%) above which a pixel is bad.
    rate_sigma : float
        A pixel whose mean step rate minus ``rate_sigma`` x its std is below 0 is bad.
    fit_constant : bool
        Fit the order-0 coefficient too.  Default False: it is fixed at 0,
        because a signal restored to the reset is 0 when the charge is 0, and
        a free constant soaks up the photon noise of the lowest reads (it left
        ~1 % errors at 2500 ADU in our tests).
    outlier_sigma : float
        *beyond* the original: a pixel whose quadratic nonlinearity ``beta``
        lies more than this many robust sigmas (1.4826 MAD) from the array's
        median is bad (NONLINEARITY_OUTLIER): a strongly nonlinear pixel is
        still fitted well by a cubic, so the residual test alone misses it.
        0 disables.
    chunk_rows : int
        Rows per block (bounds memory: ~ nreads x chunk_rows x nx x 80 bytes).

    Returns
    -------
    LinearityResult
    """
    signal = np.asarray(signal)
    t = np.asarray(times, dtype=np.float64)
    if signal.ndim != 3 or t.shape != (signal.shape[0],):
        raise StageError(f"signal {signal.shape} and times {t.shape} do not match (nreads, ny, nx)")
    if order < 1:
        raise StageError(f"linearity order must be >= 1, got {order}", exit_code=ExitCode.USAGE)
    if not (time_window[0] < time_window[1] and adu_window[0] < adu_window[1]):
        raise StageError(f"empty window: time {time_window}, ADU {adu_window}", exit_code=ExitCode.USAGE)
    nreads, ny, nx = signal.shape
    coeffs = np.empty((order + 1, ny, nx), dtype=np.float32)
    resid = np.empty((ny, nx), dtype=np.float32)
    reason = np.empty((ny, nx), dtype=np.uint8)
    rate = np.empty((ny, nx), dtype=np.float32)
    beta = np.empty((ny, nx), dtype=np.float32)
    for y0 in range(0, ny, chunk_rows):  # row chunks bound memory
        y1 = min(ny, y0 + chunk_rows)
        block = signal[:, y0:y1].reshape(nreads, -1).astype(np.float64)
        c, r, why, b, bet = _fit_chunk(block, t, time_window, adu_window, order, bad_threshold, rate_sigma,
                                  fit_constant)
        coeffs[:, y0:y1] = c.reshape(order + 1, y1 - y0, nx)
        resid[y0:y1] = r.reshape(y1 - y0, nx)
        reason[y0:y1] = why.reshape(y1 - y0, nx)
        rate[y0:y1] = b.reshape(y1 - y0, nx)
        beta[y0:y1] = bet.reshape(y1 - y0, nx)
    if outlier_sigma and outlier_sigma > 0:
        ok = (reason == 0) & np.isfinite(beta)
        if ok.sum() >= 10:
            med = np.median(beta[ok])
            sig = 1.4826 * np.median(np.abs(beta[ok] - med))
            with np.errstate(invalid="ignore"):
                out = np.abs(beta - med) > outlier_sigma * sig
            reason |= np.where(out & (reason & NO_POINTS == 0), NONLINEARITY_OUTLIER, 0).astype(np.uint8)
    bad = reason != 0
    log.info("linearity: %d of %d pixels bad", int(bad.sum()), bad.size)
    return LinearityResult(coeffs=coeffs, residual=resid, bad=bad, reason=reason, rate=rate, beta=beta)


def apply_correction(x, coeffs, *, lost=0.0) -> np.ndarray:
    """The pipeline's correction: ``x * poly(x + lost) / (x + lost)``.

    Parameters
    ----------
    x : ndarray, (..., ny, nx)
        Observed CDS/Fowler signal.
    coeffs : ndarray, (order + 1, ny, nx)
    lost : float or ndarray broadcastable to ``x``
        Charge collected before the pedestal read (rate x INTTIME of it).
    """
    x = np.asarray(x, dtype=np.float64)
    full = x + lost
    with np.errstate(invalid="ignore", divide="ignore"):
        out = x * polyval(np.asarray(coeffs, dtype=np.float64), full) / full
    return out.astype(np.float32)
