"""Combination of the reads of one exposure into one frame (SPEC 2.2, 2.3).

Input is a :class:`~ioi.frame.Ramp` whose ``reads`` ``(nreads, ny, nx)`` are
already reference-subtracted and border-stripped, in INTTIME order, and whose
``saturated`` flags ``(nreads, ny, nx)`` were computed from the RAW values
with :func:`flag_saturated` (then stripped like the reads).  Output is a
:class:`~ioi.frame.Frame` of counts (ADU) over ``EXPTIME``, with variance
(ADU^2) and quality flags.

Noise model: ``read_noise`` is the noise of one read in ADU; Poisson noise of
a signal ``S`` ADU is ``S / gain`` ADU^2 (``gain`` in e-/ADU).  When a
linearity cube is given, values are multiplied by the correction factor and
variances by its square.

Saturated reads are never used.  A pixel whose reads are all unusable for
the chosen method falls back to ``count_rate x EXPTIME`` when the first two
reads are unsaturated (flag SATURATED), else it becomes NaN with
SATURATED | DO_NOT_USE.

Precision: CDS and Fowler work in float32 row chunks (the common case, every
pair usable, on all pixels; the few pixels with a saturated read redone in
float64).  Against a float64 evaluation the science differs by a few 1e-7 of
its value (< 1e-4 of the noise at full scale) and the variance by < 1e-6 of
itself.  UTR works in float64.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging

import bottleneck as bn
import numpy as np
from astropy.io import fits

from ioi._parallel import thread_map
from ioi.errors import ConfigError, ExitCode, StageError
from ioi.frame import DQ, QUALITY_DTYPE, Frame, Ramp, as_quality
from ioi.stages.nonlinearity import check_calibration_shape, horner_factor, horner_poly

log = logging.getLogger(__name__)

COMBINATION_METHODS = ("CDS", "FOWLER", "UTR")

#: Keywords that mean nothing once the reads are combined.
READ_KEYWORDS = ("SEQNUM_R", "SEQNUM_N", "SEQNUM_M", "INTTIME", "SEQNNAME")

#: Pixels per chunk of the UTR fit (bounds the float64 work arrays).
_UTR_CHUNK_VALUES = 1 << 22


# --------------------------------------------------------------------------- helpers


def flag_saturated(raw_reads, *, level: float = 65535.0, out=None) -> np.ndarray:
    """True where a raw read is at or above ``level`` (ADC saturation).

    ``raw_reads``: ``(nreads, ny, nx)`` or ``(ny, nx)`` raw ADU, before
    reference subtraction.  Returns a bool array of the same shape.
    """
    return np.greater_equal(np.asarray(raw_reads), level, out=out)


def _check_ramp(ramp: Ramp) -> None:
    reads = ramp.reads
    if reads.ndim != 3:
        raise StageError(f"ramp reads must be (nreads, ny, nx), got shape {reads.shape}")
    if len(ramp.inttime) != reads.shape[0]:
        raise StageError(f"ramp has {reads.shape[0]} reads but {len(ramp.inttime)} INTTIME values")
    if ramp.saturated is not None and ramp.saturated.shape != reads.shape:
        raise StageError(
            f"ramp saturation flags have shape {ramp.saturated.shape}, reads {reads.shape} "
            f"(strip the reference border from both)"
        )
    if ramp.quality is not None and ramp.quality.shape != reads.shape[1:]:
        raise StageError(f"ramp quality has shape {ramp.quality.shape}, reads {reads.shape}")
    if np.any(np.diff(np.asarray(ramp.inttime, dtype=np.float64)) <= 0):
        raise StageError(f"ramp reads are not in increasing INTTIME order: {list(ramp.inttime)}")


def _check_linearity(linearity, shape) -> np.ndarray | None:
    if linearity is None:
        return None
    linearity = np.asarray(linearity)
    check_calibration_shape(
        linearity, shape, what="linearity coefficients", path=None,
        exit_code=ExitCode.LINEARITY_SHAPE_MISMATCH, ndim=3,
    )
    return linearity


def _saturated(ramp: Ramp) -> np.ndarray:
    if ramp.saturated is None:
        return np.zeros(ramp.reads.shape, dtype=bool)
    return np.asarray(ramp.saturated, dtype=bool)


def _quality(ramp: Ramp) -> np.ndarray:
    if ramp.quality is None:
        return np.zeros(ramp.reads.shape[1:], dtype=QUALITY_DTYPE)
    return np.array(as_quality(ramp.quality), copy=True)


def _need_reads(ramp: Ramp, what: str = "CDS") -> None:
    if ramp.nreads < 2:
        names = ", ".join(map(str, ramp.names)) or "no file names"
        raise StageError(
            f"{what} needs at least 2 reads, found {ramp.nreads} ({names})",
            exit_code=ExitCode.TOO_FEW_FILES_CDS,
        )


def _rate64(ramp: Ramp) -> np.ndarray:
    """(read 2 - read 1) / (INTTIME2 - INTTIME1), float64 (ny, nx)."""
    dt = float(ramp.inttime[1]) - float(ramp.inttime[0])
    return (ramp.reads[1].astype(np.float64) - ramp.reads[0]) / dt


def count_rate(ramp: Ramp) -> np.ndarray:
    """Count rate from the first two reads, ADU/s, float32 (ny, nx).

    ``(read 2 - read 1) / (INTTIME2 - INTTIME1)`` for reads in INTTIME order.
    Fewer than 2 reads: IoiError exit code 11.
    """
    _need_reads(ramp, "the count rate")
    _check_ramp(ramp)
    return _rate64(ramp).astype(np.float32)


def _make_frame(ramp, science, variance, quality, *, exptime, method, pairs, linearity, extra=None):
    header = update_combined_header(ramp.header, exptime=exptime, method=method, pairs=pairs)
    header["L1LCOR"] = (int(linearity is not None), "Nonlinearity corrected in combination")
    for key, value in (extra or {}).items():
        header[key] = value
    return Frame(
        science=np.asarray(science, dtype=np.float32),
        variance=np.asarray(variance, dtype=np.float32),
        quality=quality,
        header=header,
    )


# --------------------------------------------------------------------------- CDS and Fowler pairs


@dataclasses.dataclass(frozen=True)
class _Pairs:
    """The per-exposure constants of a CDS or Fowler combination (pairs of reads).

    CDS is one pair (first read, last read); Fowler-n is n pairs (pedestal
    read k, signal read k).  Every per-pixel operation is on the reads of that
    pixel only, so any split of the frame gives the same result.  The derived
    times are computed once (each row chunk of a frame reads them).
    """

    ped: tuple  # index of each pair's first (pedestal) read
    sig: tuple  # index of each pair's second (signal) read
    t: np.ndarray  # INTTIME of every read, float64
    bodge: float
    gain: float
    read_noise: float
    form: str

    @property
    def npairs(self) -> int:
        return len(self.ped)

    @functools.cached_property
    def dts(self) -> np.ndarray:
        return self.t[list(self.sig)] - self.t[list(self.ped)]

    @functools.cached_property
    def dt_mean(self) -> float:
        return float(self.dts.mean())

    @functools.cached_property
    def exptime(self) -> float:
        return self.dt_mean + float(self.bodge)

    @functools.cached_property
    def overlap(self) -> np.ndarray:
        """(pairs, pairs): time shared by the intervals [t_ped_k, t_sig_k] and [t_ped_l, t_sig_l]."""
        ts, tp = self.t[list(self.sig)], self.t[list(self.ped)]
        return np.clip(np.minimum.outer(ts, ts) - np.maximum.outer(tp, tp), 0.0, None)


def _combine_pairs(ramp: Ramp, linearity, plan: _Pairs, chunk_rows: int):
    """Science, variance (float32) and quality of a CDS/Fowler combination.

    Works in row chunks of ``chunk_rows``: the float32 work arrays of a chunk
    stay in the cache, and the chunks run on the machine's cores (numpy
    releases the GIL in its loops).  Each chunk writes its rows of the
    output; the pixels with a saturated read are then redone together.
    ``ramp``'s arrays may be views (e.g. of a frame with its border).
    """
    ny, nx = ramp.reads.shape[1:]
    science = np.empty((ny, nx), dtype=np.float32)
    variance = np.empty((ny, nx), dtype=np.float32)
    flags_in = None if ramp.quality is None else as_quality(ramp.quality)  # checked as every path checks it
    quality = np.zeros((ny, nx), dtype=QUALITY_DTYPE) if flags_in is None else np.empty((ny, nx), QUALITY_DTYPE)
    sat = None if ramp.saturated is None else np.asarray(ramp.saturated, dtype=bool)

    def part(r0):
        rows = slice(r0, min(ny, r0 + chunk_rows))
        if flags_in is not None:
            quality[rows] = flags_in[rows]  # the input flags, copied chunk by chunk
        flat = _pairs_chunk(ramp.reads[:, rows], None if sat is None else sat[:, rows],
                            None if linearity is None else linearity[:, rows], plan, science[rows], variance[rows])
        return flat + r0 * nx  # flat indices into the frame

    irregular = np.concatenate(thread_map(part, range(0, ny, max(1, int(chunk_rows)))))
    if irregular.size:  # all chunks' pixels with a saturated read at once: one set of small-array calls
        _pairs_irregular(ramp.reads, sat, linearity, plan, np.divmod(irregular, nx), science, variance, quality)
    return science, variance, quality


def _pairs_chunk(reads, sat, linearity, plan: _Pairs, science, variance) -> np.ndarray:
    """One row chunk: ``reads`` (nreads, rows, nx), ``sat`` likewise or None,
    ``linearity`` (order+1, rows, nx) or None; writes ``science`` and
    ``variance`` (rows, nx) and returns the flat indices (into the chunk) of
    the pixels with a saturated read in a pair.

    Every pixel is first combined as if all its pairs were usable, in float32
    (a difference of two reads is rounded by at most 2^-9 ADU; the linearity factor
    is evaluated without cancellation, see
    :func:`ioi.stages.nonlinearity.horner_factor`, so its relative error is a
    few 1e-7, far below the noise).  The few pixels with a saturated read
    are redone afterwards in float64 by :func:`_pairs_irregular`.
    """
    f32 = np.float32
    n = plan.npairs
    t = plan.t
    if linearity is not None:
        # lost charge of pair k = rate x INTTIME(pedestal k), rate from reads 1 and 2
        d01 = np.subtract(reads[1], reads[0], dtype=f32)
        dt01 = float(t[1] - t[0])
    observed = total = fsum = None
    for p, s in zip(plan.ped, plan.sig):
        x = np.subtract(reads[s], reads[p], dtype=f32)
        if linearity is None:
            observed = x if observed is None else np.add(observed, x, out=observed)
            continue
        lost = np.multiply(d01, f32(t[p] / dt01))
        factor = horner_factor(x, linearity, lost, form=plan.form, dtype=f32)
        fsum = factor.copy() if fsum is None else np.add(fsum, factor, out=fsum)
        corrected = np.multiply(factor, x, out=factor)
        total = corrected if total is None else np.add(total, corrected, out=total)
        observed = x if observed is None else np.add(observed, x, out=observed)
    if total is None:
        total = observed
    # all pairs used: time used = mean pair time, so the rescaling of
    # combine_fowler is (dt_mean + bodge) / (time_used + bodge), 1 up to rounding
    time_used = float(np.sum(plan.dts)) / n
    scale = (plan.dt_mean + plan.bodge) / (time_used + plan.bodge) / n
    np.multiply(total, f32(scale), out=science)
    # variance = (2 rn^2 / n + max(observed / n, 0) / time / gain * cov / n^2) * mean_factor^2
    poisson = float(plan.overlap.sum()) / (time_used * plan.gain * n**3)
    np.maximum(observed, f32(0.0), out=variance)
    variance *= f32(poisson)
    variance += f32(2.0 * plan.read_noise**2 / n)
    if fsum is not None:
        fsum *= f32(1.0 / n)
        fsum *= fsum
        variance *= fsum
    if sat is None:
        return np.zeros(0, dtype=np.intp)
    unusable = np.logical_or(sat[plan.ped[0]], sat[plan.sig[0]])
    for p, s in zip(plan.ped[1:], plan.sig[1:]):
        unusable |= sat[p]
        unusable |= sat[s]
    # flat indices (np.nonzero of a 2-D mask is ~15 times slower)
    return np.flatnonzero(unusable)


def _pairs_irregular(reads, sat, linearity, plan: _Pairs, pixels, science, variance, quality) -> None:
    """Redo ``pixels`` (tuple of index arrays) that have a saturated read, in float64.

    A pair with a saturated read is dropped; the remaining pairs are averaged
    and rescaled to the mean pair time; the Poisson covariance is summed over
    the pairs used.  A pixel with no usable pair falls back to the count rate
    of the first two reads (:func:`_fallback`).
    """
    every = (slice(None),) + pixels
    r = reads[every]  # (nreads, m)
    sat = sat[every]
    coeff = None if linearity is None else linearity[every]
    t = plan.t
    n = plan.npairs
    dts = plan.dts
    dt_mean, bodge = plan.dt_mean, plan.bodge
    rate = (r[1].astype(np.float64) - r[0]) / (t[1] - t[0]) if coeff is not None else None
    m = r.shape[1]
    total = np.zeros(m)  # sum of corrected pairs used
    observed = np.zeros(m)  # sum of observed pairs used
    fsum = np.zeros(m)  # sum of factors of pairs used
    tsum = np.zeros(m)  # sum of pair times used
    used = np.empty((n, m), dtype=bool)
    for k, (p, s) in enumerate(zip(plan.ped, plan.sig)):
        x = r[s].astype(np.float64) - r[p]
        use = ~(sat[s] | sat[p])
        used[k] = use
        factor = horner_factor(x, coeff, rate * t[p], form=plan.form) if coeff is not None else 1.0
        observed += np.where(use, x, 0.0)
        total += np.where(use, x * factor, 0.0)
        fsum += np.where(use, factor, 0.0)
        tsum += use * dts[k]
    nused = used.sum(axis=0)
    overlap = plan.overlap
    with np.errstate(divide="ignore", invalid="ignore"):
        time_used = tsum / nused
        sci = total / nused * ((dt_mean + bodge) / (time_used + bodge))
        mean_obs = np.maximum(observed / nused, 0.0)
        mean_factor = fsum / nused
        # Poisson covariance: sum over the used pairs of the interval overlaps
        cov = np.einsum("kl,km,lm->m", overlap, used.astype(np.float64), used.astype(np.float64))
        poisson = mean_obs / time_used / plan.gain * cov / nused**2
        var = (2.0 * plan.read_noise**2 / nused + poisson) * mean_factor**2
    flags = np.zeros(m, dtype=QUALITY_DTYPE)
    flags[nused < n] |= QUALITY_DTYPE.type(DQ.SATURATED)
    none = np.flatnonzero(nused == 0)
    if none.size:
        counts, fvar, ok = _fallback(r[:, none], sat[:, none], None if coeff is None else coeff[:, none],
                                     None if rate is None else rate[none], plan)
        sci[none] = np.where(ok, counts, np.nan)
        var[none] = np.where(ok, fvar, np.nan)
        flags[none[~ok]] |= QUALITY_DTYPE.type(DQ.DO_NOT_USE)
    science[pixels] = sci
    variance[pixels] = var
    quality[pixels] |= flags


def _fallback(r, sat, coeff, rate, plan: _Pairs):
    """Counts, variance and usability of pixels with no usable pair, from the
    first two reads: corrected rate x EXPTIME.  ``r`` (nreads, m), ``sat``
    (nreads, m), ``coeff`` (order+1, m) or None, ``rate`` (m,) or None."""
    t0, t1 = float(plan.t[0]), float(plan.t[1])
    x = r[1].astype(np.float64) - r[0]
    factor = np.ones_like(x)
    if coeff is not None:
        factor = horner_factor(x, coeff, rate * t0, form=plan.form)
    scale = plan.exptime / (t1 - t0)
    counts = x * factor * scale
    var = (2.0 * plan.read_noise**2 + np.maximum(x, 0.0) / plan.gain) * (factor * scale) ** 2
    ok = ~sat[0] & ~sat[1]
    return counts, var, ok


# --------------------------------------------------------------------------- header


_ACQTIME1_FORMATS = ("%Y-%m-%d-%H:%M:%S.%f", "%Y-%m-%d-%H:%M:%S", "%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S")
_UNIX_EPOCH = datetime.datetime(1970, 1, 1)


def _parse_acqtime1(value):
    """ACQTIME1 as a naive UTC datetime (the LT format first, ISO variants too), or None."""
    if value is None:
        return None
    text = str(value).strip()
    for fmt in _ACQTIME1_FORMATS:
        try:
            return datetime.datetime.strptime(text, fmt)
        except ValueError:
            continue
    return None


def update_combined_header(header, *, exptime: float, method: str, pairs: int | None = None) -> fits.Header:
    """A new header for a combined frame (the input is not changed).

    Removes SEQNUM_R, SEQNUM_N, SEQNUM_M, INTTIME, SEQNNAME; sets EXPTIME;
    MJD = ACQTIME - 2400000.5; from ACQTIME1 (``%Y-%m-%d-%H:%M:%S.%f``)
    DATE-OBS (``YYYY-MM-DDTHH:MM:SS.sss``), DATE (its date part) and UTSTART
    (``HH:MM:SS.sss``), rounded to the millisecond.  Missing or unreadable
    ACQTIME/ACQTIME1 leave those keywords out (debug log).  Provenance:
    L1FMCO = 1, L1FMCOME = method, L1FMCOPA = Fowler pairs (1 for CDS, 0 for
    UTR or when ``pairs`` is None).
    """
    out = fits.Header() if header is None else header.copy()
    for key in READ_KEYWORDS:
        out.remove(key, ignore_missing=True, remove_all=True)
    out["EXPTIME"] = (float(exptime), "[s] exposure time of the combined frame")
    acqtime = out.get("ACQTIME")
    try:
        out["MJD"] = (float(acqtime) - 2400000.5, "[d] MJD of acquisition, ACQTIME - 2400000.5")
    except (TypeError, ValueError):
        log.debug("no usable ACQTIME (%r): MJD not set", acqtime)
    acqtime1 = out.get("ACQTIME1")
    when = _parse_acqtime1(acqtime1)
    if when is None and "MJD" in out:
        # ACQTIME1 missing or in another format: the same instant from the Julian date
        when = _UNIX_EPOCH + datetime.timedelta(days=float(acqtime) - 2440587.5)
        log.debug("no usable ACQTIME1 (%r): DATE-OBS, DATE, UTSTART from ACQTIME", acqtime1)
    if when is None:
        log.debug("no usable ACQTIME1 (%r) or ACQTIME: DATE-OBS, DATE, UTSTART not set", acqtime1)
    else:
        when = when + datetime.timedelta(microseconds=500)  # round to the millisecond
        ms = when.microsecond // 1000
        out["DATE-OBS"] = (f"{when:%Y-%m-%dT%H:%M:%S}.{ms:03d}", "UTC start of acquisition, from ACQTIME1")
        out["DATE"] = (f"{when:%Y-%m-%d}", "UTC date of acquisition")
        out["UTSTART"] = (f"{when:%H:%M:%S}.{ms:03d}", "UTC start of acquisition")
    out["L1FMCO"] = (1, "Frame combination done")
    out["L1FMCOME"] = (str(method).upper(), "Frame combination method")
    out["L1FMCOPA"] = (int(pairs) if pairs is not None else 0, "Fowler pairs (1 = CDS, 0 = n/a)")
    return out


# --------------------------------------------------------------------------- CDS


def combine_cds(ramp: Ramp, *, gain: float, read_noise: float, linearity=None,
                linearity_form: str = "DIFFERENCE", chunk_rows: int = 128) -> Frame:
    """Correlated double sampling: last read minus first read.

    Parameters
    ----------
    ramp : Ramp
        ``reads`` (nreads, ny, nx), reference-corrected and border-stripped.
    gain : float
        e-/ADU.
    read_noise : float
        ADU per read.
    linearity : ndarray (order+1, ny, nx) or None
        Applied to the difference with lost charge ``rate x INTTIME[0]``.

    Returns
    -------
    Frame
        Counts over EXPTIME = INTTIME[-1] - INTTIME[0]; variance
        ``(2 rn^2 + S/g) * factor^2`` (S = observed counts, clipped at 0).
        If the first or last read is saturated the pixel falls back to the
        count rate of the first two reads (see module docstring).

    Raises
    ------
    IoiError
        exit code 11 with fewer than 2 reads.
    """
    _need_reads(ramp)
    _check_ramp(ramp)
    linearity = _check_linearity(linearity, ramp.reads.shape[1:])
    t = np.asarray(ramp.inttime, dtype=np.float64)
    plan = _Pairs(ped=(0,), sig=(ramp.nreads - 1,), t=t, bodge=0.0, gain=gain, read_noise=read_noise,
                  form=linearity_form)
    science, variance, quality = _combine_pairs(ramp, linearity, plan, chunk_rows)
    return _make_frame(ramp, science, variance, quality, exptime=plan.exptime, method="CDS", pairs=1,
                       linearity=linearity)


# --------------------------------------------------------------------------- Fowler


def _fowler_reads(ramp: Ramp, pairs: int) -> tuple[list[int], list[int]]:
    group = np.asarray(ramp.group)
    index = np.asarray(ramp.index)
    n_ped = int(np.count_nonzero(group == 1))
    n_sig = int(np.count_nonzero(group == 2))
    names = ", ".join(map(str, ramp.names)) or "no file names"
    if ramp.nreads < 2 * pairs:
        raise StageError(
            f"[frame_combination] fowler_pairs={pairs} (Fowler-{pairs}) needs {2 * pairs} reads, found "
            f"{ramp.nreads} ({n_ped} pedestal, {n_sig} signal: {names})",
            exit_code=ExitCode.TOO_FEW_FILES_FOWLER,
        )
    if n_ped == 0 and n_sig == 0:
        # No SEQNUM_M in the headers: in INTTIME order the first half of the reads
        # are the pedestal reads and the second half the signal reads.
        if ramp.nreads % 2:
            raise StageError(
                f"Fowler-{pairs}: no SEQNUM_M groups and an odd number of reads ({ramp.nreads}: {names}), "
                "so pedestal and signal reads cannot be paired", exit_code=ExitCode.UNEQUAL_FOWLER_READS)
        half = ramp.nreads // 2
        log.info("Fowler-%d: no SEQNUM_M in the headers; pairing read k with read %d + k by INTTIME", pairs, half)
        return list(range(pairs)), list(range(half, half + pairs))
    if n_ped != n_sig:
        raise StageError(
            f"Fowler-{pairs}: {n_ped} pedestal reads (SEQNUM_M=1) but {n_sig} signal reads (SEQNUM_M=2) "
            f"({names})",
            exit_code=ExitCode.UNEQUAL_FOWLER_READS,
        )
    ped, sig = [], []
    for k in range(1, pairs + 1):
        for grp, out in ((1, ped), (2, sig)):
            where = np.flatnonzero((group == grp) & (index == k))
            if where.size != 1:
                raise StageError(
                    f"Fowler-{pairs}: found {where.size} reads with SEQNUM_M={grp}, SEQNUM_N={k} (need 1; "
                    f"{names})",
                    exit_code=ExitCode.TOO_FEW_FILES_FOWLER,
                )
            out.append(int(where[0]))
    return ped, sig


def combine_fowler(
    ramp: Ramp, *, pairs: int, bodge: float = 0.0, gain: float, read_noise: float, linearity=None,
    linearity_form: str = "DIFFERENCE", chunk_rows: int = 128,
) -> Frame:
    """Fowler sampling: the mean of ``pairs`` (signal_k - pedestal_k) differences.

    Pedestal reads are SEQNUM_M = 1, SEQNUM_N = 1..n; signal reads
    SEQNUM_M = 2, SEQNUM_N = 1..n.  Each pair is linearity-corrected (lost
    charge = rate x INTTIME of its pedestal read) before averaging.  A pair
    with a saturated read is dropped for that pixel; the remaining pairs are
    averaged and rescaled by (mean pair time) / (mean time of the pairs
    used), which is 1 for the usual equally long pairs.  A pixel with no
    usable pair falls back to the count rate (module docstring).

    EXPTIME = mean pair time + ``bodge`` (seconds).

    Variance (ADU^2): read noise ``2 rn^2 / m`` for ``m`` pairs used; Poisson
    noise from the exact covariance of overlapping pair intervals (Garnett &
    Forrest 1993): ``(rate/g) * sum_kl overlap(k, l) / m^2``, where
    ``overlap`` is the time the intervals [t_ped_k, t_sig_k] and
    [t_ped_l, t_sig_l] share.  For equal spacing ``dt`` this is
    ``S/g * (1 - dt (m^2-1) / (3 m T))``, slightly below the ``S/g`` of the
    simple approximation.  The rate is the observed mean pair counts over the
    mean pair time used.  With linearity, the variance is scaled by the
    square of the mean factor of the pairs used.

    Raises
    ------
    IoiError
        exit code 31 when there are fewer than ``2 pairs`` reads or a
        pedestal/signal read is missing; 32 when the numbers of pedestal and
        signal reads differ; 8 for ``pairs`` < 1.
    """
    _check_ramp(ramp)
    if int(pairs) != pairs or pairs < 1:
        raise ConfigError(f"[frame_combination] fowler_pairs={pairs!r} must be a whole number >= 1")
    pairs = int(pairs)
    ped, sig = _fowler_reads(ramp, pairs)
    linearity = _check_linearity(linearity, ramp.reads.shape[1:])
    t = np.asarray(ramp.inttime, dtype=np.float64)
    plan = _Pairs(ped=tuple(ped), sig=tuple(sig), t=t, bodge=float(bodge), gain=gain, read_noise=read_noise,
                  form=linearity_form)
    if np.any(plan.dts <= 0):
        raise StageError(f"Fowler pair times are not positive: {plan.dts.tolist()}")
    science, variance, quality = _combine_pairs(ramp, linearity, plan, chunk_rows)
    return _make_frame(
        ramp, science, variance, quality, exptime=plan.exptime, method="FOWLER", pairs=pairs,
        linearity=linearity, extra={"L1FMCOBO": (float(bodge), "[s] Fowler bodge added to EXPTIME")},
    )


# --------------------------------------------------------------------------- UTR


def fit_ramp(ramp: Ramp, *, gain: float, read_noise: float, jump_sigma: float = 5.0, linearity=None) -> Frame:
    """Up-the-ramp least-squares slope with saturation and jump handling (*beyond*).

    Per pixel, only the reads before the first saturated read are used.
    With linearity, each read's signal relative to the first read ``x_i``
    is linearised before fitting as ``poly(x_i + lost) - poly(lost)``, lost =
    ``rate x INTTIME[0]`` (rate from the first two reads): the exact linear
    charge difference, rather than the CDS/Fowler factor rule (see
    :func:`ioi.stages.nonlinearity.correct_nonlinearity`).

    Jumps (cosmic rays): each read-to-read difference, as a rate, is compared
    with the pixel's median rate over its usable differences; the largest
    deviation beyond ``jump_sigma`` x sigma (sigma from the read noise and the
    Poisson noise of the median rate) is flagged and the search repeated on
    that pixel until none is left.  Only pixels with at least 3 usable
    differences are searched.  A flagged difference splits the ramp into
    segments; the slope is the least-squares common slope with a separate
    intercept per segment (pooled within-segment regression), so the jump
    itself is ignored and every other read still counts.

    Variance of the slope: ``rn^2 / Sxx + (rate/g) * sum_ij w_i w_j
    min(t_i, t_j)``, with ``w`` the least-squares weights (the exact OLS
    variance with correlated Poisson noise, cf. the JWST ramp-fitting
    literature), rate = the fitted slope (>= 0).  Science is counts =
    slope x EXPTIME, EXPTIME = INTTIME[-1] - INTTIME[0], variance scaled by
    EXPTIME^2 (and by the square of linearised / observed charge at the last
    used read, an approximation).

    Flags: SATURATED where a read was dropped for saturation; JUMP_DET where
    a jump was found; SATURATED | DO_NOT_USE and NaN where fewer than 2
    reads are usable (first or second read saturated); DO_NOT_USE and NaN
    where no segment has 2 reads.

    Works in row chunks to bound memory.  Raises IoiError exit 11 with fewer
    than 2 reads.
    """
    _need_reads(ramp, "UTR")
    _check_ramp(ramp)
    nreads, ny, nx = ramp.reads.shape
    linearity = _check_linearity(linearity, (ny, nx))
    sat = _saturated(ramp)
    t_abs = np.asarray(ramp.inttime, dtype=np.float64)
    t = t_abs - t_abs[0]
    exptime = float(t[-1])
    science = np.empty((ny, nx), dtype=np.float32)
    variance = np.empty((ny, nx), dtype=np.float32)
    quality = _quality(ramp)
    rows = max(1, _UTR_CHUNK_VALUES // (nreads * nx))
    njumps = 0
    for y0 in range(0, ny, rows):  # row chunks, not rows: bounds the float64 work arrays
        sl = slice(y0, min(ny, y0 + rows))
        coeff = None if linearity is None else linearity[:, sl].reshape(linearity.shape[0], -1)
        sci, var, flags, nj = _fit_chunk(
            ramp.reads[:, sl].reshape(nreads, -1), sat[:, sl].reshape(nreads, -1), t, t_abs[0],
            coeff, gain=gain, read_noise=read_noise, jump_sigma=jump_sigma,
        )
        shape = (sl.stop - sl.start, nx)
        science[sl] = (sci * exptime).reshape(shape)
        variance[sl] = (var * exptime**2).reshape(shape)
        quality[sl] |= flags.reshape(shape)
        njumps += nj
    log.debug("UTR fit of %d reads: %d jump(s) flagged", nreads, njumps)
    return _make_frame(
        ramp, science, variance, quality, exptime=exptime, method="UTR", pairs=None,
        linearity=linearity, extra={"L1FMCOJS": (float(jump_sigma), "UTR jump threshold (sigma)")},
    )


def _find_jumps(q, dvalid, dt, *, gain, read_noise, jump_sigma):
    """Flag outlying read-to-read rates, one per pixel per pass.

    q : (ndiff, npix) rates; dvalid : (ndiff, npix) usable.  Returns bool
    (ndiff, npix) jumps.
    """
    jumps = np.zeros(q.shape, dtype=bool)
    active = np.flatnonzero(dvalid.sum(axis=0) >= 3)
    while active.size:  # at most ndiff passes, each on the pixels that just had a jump
        ok = dvalid[:, active] & ~jumps[:, active]
        qa = np.where(ok, q[:, active], np.nan)
        med = bn.nanmedian(qa, axis=0)  # bottleneck: NaN-aware median, fast
        sigma = np.sqrt(2.0 * read_noise**2 + np.maximum(med, 0.0) * dt[:, None] / gain) / dt[:, None]
        # the median itself is uncertain: var(median of n) ~ pi/(2n) var(one)
        sigma = sigma * np.sqrt(1.0 + np.pi / (2.0 * np.maximum(ok.sum(axis=0), 1)))
        z = np.where(ok, np.abs(qa - med) / sigma, -np.inf)
        worst = np.argmax(z, axis=0)
        zmax = z[worst, np.arange(active.size)]
        hit = zmax > jump_sigma
        jumps[worst[hit], active[hit]] = True
        still = ok.sum(axis=0) - 1 >= 3
        active = active[hit & still]
    return jumps


def _fit_chunk(reads, sat, t, t0_abs, coeff, *, gain, read_noise, jump_sigma):
    """UTR fit of (nreads, npix) reads.  Returns slope, slope variance, flags, jumps."""
    nreads, npix = reads.shape
    valid = ~np.logical_or.accumulate(sat, axis=0)  # reads before the first saturation
    nvalid = valid.sum(axis=0)
    y = reads.astype(np.float64) - reads[0].astype(np.float64)  # signal since the first read
    factor = None
    if coeff is not None:
        # linearised charge since the first read: poly(x + lost) - poly(lost),
        # lost = rate x INTTIME of the first read
        lost = y[1] / (t[1] - t[0]) * t0_abs
        lin = horner_poly(y + lost, coeff[:, None, :]) - horner_poly(lost, coeff)[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            factor = np.where(y > 0, lin / y, 1.0)
        factor[~np.isfinite(factor)] = 1.0
        y = lin
    dt = np.diff(t)
    jumps = _find_jumps(np.diff(y, axis=0) / dt[:, None], valid[1:], dt,
                        gain=gain, read_noise=read_noise, jump_sigma=jump_sigma)
    has_jump = jumps.any(axis=0)
    flags = np.zeros(npix, dtype=QUALITY_DTYPE)
    flags[nvalid < nreads] |= QUALITY_DTYPE.type(DQ.SATURATED)
    flags[has_jump] |= QUALITY_DTYPE.type(DQ.JUMP_DET)

    # clean pixels: every read, one segment: fixed weights, float64 accumulation
    w = (t - t.mean()) / np.sum((t - t.mean()) ** 2)
    slope = np.zeros(npix, dtype=np.float64)
    for i in range(nreads):
        slope += w[i] * y[i]
    pfac = np.full(npix, np.sum(np.outer(w, w) * np.minimum.outer(t, t)))
    sxx = np.full(npix, np.sum((t - t.mean()) ** 2))

    irregular = np.flatnonzero((nvalid < nreads) | has_jump)
    if irregular.size:
        s, p, x = _fit_segments(y[:, irregular], valid[:, irregular], jumps[:, irregular], t)
        slope[irregular], pfac[irregular], sxx[irregular] = s, p, x
    with np.errstate(divide="ignore", invalid="ignore"):
        var = read_noise**2 / sxx + np.maximum(slope, 0.0) / gain * pfac
    if factor is not None:
        last = np.maximum(nvalid - 1, 0)
        var *= np.take_along_axis(factor, last[None, :], axis=0)[0] ** 2
    too_few = nvalid < 2
    flags[too_few] |= QUALITY_DTYPE.type(DQ.SATURATED | DQ.DO_NOT_USE)
    unfit = ~(sxx > 0) | too_few
    flags[unfit] |= QUALITY_DTYPE.type(DQ.DO_NOT_USE)
    slope[unfit] = np.nan
    var[unfit] = np.nan
    return slope, var, flags, int(jumps.sum())


def _fit_segments(y, valid, jumps, t):
    """Common slope with one intercept per segment, for (nreads, m) pixels.

    Returns slope, Poisson factor sum_ij w_i w_j min(t_i, t_j), and Sxx.
    """
    nreads, m = y.shape
    seg = np.zeros((nreads, m), dtype=np.int64)
    seg[1:] = np.cumsum(jumps, axis=0)
    tcol = t[:, None]
    centred = np.zeros((nreads, m), dtype=np.float64)
    for s in range(int(seg.max()) + 1):  # loop over segments (at most nreads)
        member = (seg == s) & valid
        n = member.sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            tbar = np.where(n > 0, (tcol * member).sum(axis=0) / n, 0.0)
        centred += np.where(member, tcol - tbar, 0.0)
    sxx = np.sum(centred**2, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = centred / sxx
    slope = np.sum(w * y, axis=0)
    tmin = np.minimum.outer(t, t)
    pfac = np.einsum("im,ij,jm->m", w, tmin, w)
    return slope, pfac, sxx


# --------------------------------------------------------------------------- dispatcher


def combine_reads(
    ramp: Ramp, *, method: str, pairs: int | None = None, bodge: float = 0.0, gain: float,
    read_noise: float, linearity=None, jump_sigma: float = 5.0, linearity_form: str = "DIFFERENCE",
    chunk_rows: int = 128,
) -> Frame:
    """Combine a ramp with ``method`` CDS, FOWLER or UTR (case-insensitive).

    ``linearity_form`` chooses how CDS/Fowler differences are linearised (see
    :func:`ioi.stages.nonlinearity.horner_factor`); UTR is always exact.

    Raises IoiError exit code 10 for an unknown method (the message lists
    the allowed ones) and ConfigError (exit 8) for FOWLER without ``pairs``.
    """
    name = str(method).strip().upper()
    if name == "CDS":
        return combine_cds(ramp, gain=gain, read_noise=read_noise, linearity=linearity,
                           linearity_form=linearity_form, chunk_rows=chunk_rows)
    if name == "FOWLER":
        if pairs is None:
            raise ConfigError("[frame_combination] fowler_pairs is needed for method FOWLER")
        return combine_fowler(ramp, pairs=pairs, bodge=bodge, gain=gain, read_noise=read_noise,
                              linearity=linearity, linearity_form=linearity_form, chunk_rows=chunk_rows)
    if name == "UTR":
        return fit_ramp(ramp, gain=gain, read_noise=read_noise, jump_sigma=jump_sigma, linearity=linearity)
    raise ConfigError(
        f"unknown frame combination method {method!r}; allowed: {', '.join(COMBINATION_METHODS)}",
        exit_code=ExitCode.UNKNOWN_COMBINATION_METHOD,
    )
