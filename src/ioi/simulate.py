"""Simulated IO:I raw data with known truth.

:func:`simulate` writes a complete data set the way the Liverpool Telescope
does: one FITS file per read of a dithered multrun (LT naming), optional
up-the-ramp calibration sequences (Teledyne naming), the calibration files
and INI files the pipeline expects, and a ``truth/`` directory holding every
injected quantity so that tests can compare the pipeline's results with it.

Layout written under ``out_dir``::

    raw/i_e_<date>_<multrun>_<dither>_<exposure>_0.fits
    config/pipeline.ini, config/paths.ini
    config/flatfielding/flat_<date>.fits, flat_bad_<date>.fits
    config/nonlinearity_corrections/lin_coeffs_<date>.fits, lin_bad_<date>.fits
    truth/truth.json, stars.ecsv, stars_d<k>.ecsv, flat.fits, nonlin_beta.fits,
          badpix.fits, bias.fits, dark.fits, cosmic_rays.ecsv, rate_d<k>.fits
    utr/H2RG_R<run>_M01_N<read>.fits            (utr=True)

Coordinates in the truth files are "stripped" pixel coordinates: 0-based in
the (size-8) x (size-8) science array, x = column, y = row, pixel centres at
integers; raw pixel (row r, col c) is stripped (r - 4, c - 4).

Physics, in electrons then ADU through the true gain: per-pixel bias; per
output and column parity offsets that change each read and drift along the
rows; white read noise and 1/f noise along the readout; dark current with hot
pixels; sky with a gradient; Moffat stars; a flat with structure, low-response
blobs and dead pixels; Poisson noise accumulated read by read; cosmic rays
arriving between reads; a full well; per-pixel quadratic nonlinearity
observed = L (1 - beta L) (L in ADU since reset); ADC saturation at 65535.
The reference border sees bias, offsets and noise only.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table, vstack

from ioi import _simphysics as phys
from ioi.errors import ConfigError, ExitCode
from ioi.frame import GAIN_BY_ASICGAIN

log = logging.getLogger(__name__)

#: Array sizes the simulator is meant for (any multiple of 64 >= 256 works).
SIZE_CHOICES = (256, 512, 1024, 2048)

#: Seconds per read in 32-output mode (header FRMTIME).
FRMTIME = 1.4
#: Arcsec per pixel.
PIXEL_SCALE = 0.18
#: Tangent point of the simulated field (degrees).
FIELD_RA, FIELD_DEC = 150.1, 30.25
#: Ratio of the true gain to the nominal one.
GAIN_ERROR = 1.01
#: Moffat shape of the simulated PSF.
MOFFAT_BETA = 3.0
#: Stars per 2040 x 2040 pixels of sky.
STAR_DENSITY = 1500
#: Cosmic rays per dither per 2048 x 2048 pixels.
CR_DENSITY = 300
#: Half size of each star's postage stamp (pixels).
STAMP_HALF = 16
#: Illumination of the UTR calibration ramps (ADU/s at flat = 1).
UTR_RATE_ADU_S = 400.0

_MODES = ("fowler", "cds", "utr")


@dataclasses.dataclass(frozen=True)
class SimulationResult:
    """Where :func:`simulate` wrote its files, and the truth it injected.

    Attributes
    ----------
    out_dir, raw_dir, config_dir, truth_dir : Path
    pipeline_ini, paths_ini : Path
    utr_dir : Path or None
        Teledyne-named UTR ramps (only with ``utr=True``).
    raw_files : list of Path
        LT-named reads, dither by dither, each dither in INTTIME order.
    utr_files : list of Path
    calibration_files : dict of str -> Path
        Keys ``flat``, ``flat_bad``, ``lin_coeffs``, ``lin_bad``.
    truth : dict
        The content of ``truth/truth.json``.
    elapsed_s : float
        Wall-clock time taken.
    """

    out_dir: Path
    raw_dir: Path
    config_dir: Path
    pipeline_ini: Path
    paths_ini: Path
    truth_dir: Path
    utr_dir: Path | None
    raw_files: list
    utr_files: list
    calibration_files: dict
    truth: dict
    elapsed_s: float


def read_schedule(mode, *, fowler_pairs=2, nreads=None, exptime=10.0, frmtime=FRMTIME):
    """The reads of one exposure: list of ``(inttime_s, seqnum_m, seqnum_n)`` in INTTIME order.

    Fowler: pedestal reads (M=1, N=1..n) at k*FRMTIME, signal reads (M=2, N=1..n)
    at exptime + k*FRMTIME.  CDS: (1, 1) at FRMTIME and (2, 1) at exptime + FRMTIME.
    UTR: ``nreads`` reads (default 10), M=1, N=1..n, the first at FRMTIME and the
    last at exptime + FRMTIME, equally spaced (never closer than FRMTIME, so the
    last read comes later when exptime is short).
    """
    if mode == "fowler":
        n = int(fowler_pairs)
        if n < 1:
            raise ConfigError(f"fowler_pairs must be >= 1, got {fowler_pairs}", exit_code=ExitCode.USAGE)
        ped = [(k * frmtime, 1, k) for k in range(1, n + 1)]
        sig = [(exptime + k * frmtime, 2, k) for k in range(1, n + 1)]
        return ped + sig
    if mode == "cds":
        return [(frmtime, 1, 1), (exptime + frmtime, 2, 1)]
    if mode == "utr":
        n = 10 if nreads is None else int(nreads)
        if n < 2:
            raise ConfigError(f"nreads must be >= 2 for UTR, got {nreads}", exit_code=ExitCode.USAGE)
        step = max(frmtime, exptime / (n - 1))
        return [(frmtime + k * step, 1, k + 1) for k in range(n)]
    raise ConfigError(f"mode must be one of {_MODES}, got {mode!r}", exit_code=ExitCode.USAGE)


def dither_transforms(dithers, size, *, rng, rotation_deg=0.0, scale=1.0):
    """Per-dither geometry: list of dicts with dx, dy, rotation_deg, scale and ``affine``.

    ``affine`` is the 2x3 matrix [[a, b, tx], [c, d, ty]] mapping a reference
    (dither 1) stripped (x, y) to dither-k stripped (x', y'):
    x' = a x + b y + tx, y' = c x + d y + ty.  Rotation and scale are about
    the frame centre and grow linearly from 0 (dither 1) to ``rotation_deg``
    and ``scale`` (last dither); (dx, dy) is where the reference centre lands,
    minus the centre.
    """
    m = size - 2 * phys.BORDER
    centre = np.array([(m - 1) / 2.0, (m - 1) / 2.0])
    step = float(np.clip(round(0.03 * size), 40, 120))
    offsets = phys.dither_pattern(dithers, step, rng)
    out = []
    for k in range(dithers):  # a loop over dithers
        frac = k / (dithers - 1) if dithers > 1 else 0.0
        rot = rotation_deg * frac
        sc = 1.0 + (scale - 1.0) * frac
        th = math.radians(rot)
        mat = sc * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
        t = centre + offsets[k] - mat @ centre
        affine = np.hstack([mat, t[:, None]])
        out.append(
            {
                "dither": k + 1,
                "dx": float(offsets[k][0]),
                "dy": float(offsets[k][1]),
                "rotation_deg": float(rot),
                "scale": float(sc),
                "affine": affine.tolist(),
            }
        )
    return out


def _apply(affine, x, y):
    a = np.asarray(affine)
    return a[0, 0] * x + a[0, 1] * y + a[0, 2], a[1, 0] * x + a[1, 1] * y + a[1, 2]


def _invert(affine):
    a = np.asarray(affine)
    inv = np.linalg.inv(a[:, :2])
    return np.hstack([inv, (-inv @ a[:, 2])[:, None]])


def _jd(t: _dt.datetime) -> float:
    return 2440587.5 + t.timestamp() / 86400.0


def _time_cards(acq: _dt.datetime) -> list:
    """Acquisition-time keywords of one read (ACQTIME as JD, ACQTIME1 in the LT text format)."""
    return [
        ("ACQTIME", _jd(acq), "[JD] acquisition of this read"),
        ("ACQTIME1", acq.strftime("%Y-%m-%d-%H:%M:%S.%f"), "acquisition of this read (UTC)"),
        ("DATE-OBS", acq.strftime("%Y-%m-%dT%H:%M:%S.%f"), "acquisition of this read (UTC)"),
        ("MJD-OBS", _jd(acq) - 2400000.5, "[d] acquisition of this read"),
    ]


def _sexagesimal(value, *, hours):
    # Formatting only; astropy.coordinates would cost a slow import for two strings.
    sign = "-" if value < 0 else "+"
    v = abs(value) / 15.0 if hours else abs(value)
    d = int(v)
    mnt = int((v - d) * 60)
    sec = (v - d - mnt / 60.0) * 3600.0
    if hours:
        return f"{d:02d}:{mnt:02d}:{sec:05.2f}"
    return f"{sign}{d:02d}:{mnt:02d}:{sec:04.1f}"


def _wcs_cards(affine, m):
    """TAN WCS cards for a dither whose stripped pixels relate to the reference by ``affine``."""
    s = PIXEL_SCALE / 3600.0
    cd_ref = np.array([[-s, 0.0], [0.0, s]])  # north up, east left
    a = np.asarray(affine)
    cd = cd_ref @ np.linalg.inv(a[:, :2])
    c = (m - 1) / 2.0
    cx, cy = _apply(a, c, c)
    off = phys.BORDER + 1  # stripped 0-based -> raw 1-based FITS pixels
    return [
        ("CTYPE1", "RA---TAN", "TAN projection"),
        ("CTYPE2", "DEC--TAN", "TAN projection"),
        ("CRVAL1", FIELD_RA, "[deg] RA at CRPIX"),
        ("CRVAL2", FIELD_DEC, "[deg] Dec at CRPIX"),
        ("CRPIX1", float(cx + off), "raw-frame 1-based pixel"),
        ("CRPIX2", float(cy + off), "raw-frame 1-based pixel"),
        ("CD1_1", float(cd[0, 0]), "[deg/px]"),
        ("CD1_2", float(cd[0, 1]), "[deg/px]"),
        ("CD2_1", float(cd[1, 0]), "[deg/px]"),
        ("CD2_2", float(cd[1, 1]), "[deg/px]"),
    ]


def _pointing(affine, m):
    """RA, Dec (deg) of the stripped frame centre of a dither (tangent-plane inverse)."""
    c = (m - 1) / 2.0
    xr, yr = _apply(_invert(affine), c, c)
    s = PIXEL_SCALE / 3600.0
    xi, eta = np.radians(-s * (xr - c)), np.radians(s * (yr - c))
    ra0, dec0 = np.radians(FIELD_RA), np.radians(FIELD_DEC)
    den = math.cos(dec0) - eta * math.sin(dec0)
    ra = ra0 + math.atan2(xi, den)
    dec = math.atan2(math.sin(dec0) + eta * math.cos(dec0), math.hypot(xi, den))
    return math.degrees(ra) % 360.0, math.degrees(dec)


def _header(common, cards):
    hdr = fits.Header()
    for key, value, comment in common + cards:
        hdr[key] = (value, comment)
    return hdr


def _to_uint16(raw):
    """Round and clip a float32 frame to the ADC range, as uint16 (in place on ``raw``)."""
    np.rint(raw, out=raw)
    np.clip(raw, 0, phys.ADC_MAX, out=raw)
    return raw.astype(np.uint16)


class _Reader:
    """Turns accumulated charge into raw reads (bias, offsets, noise, nonlinearity, ADC)."""

    def __init__(self, det, gain, noutputs):
        self.det = det
        self.gain = np.float32(gain)
        self.noutputs = noutputs
        w = det.size // noutputs
        self.noise_cols = np.repeat(det.read_noise, w)[None, :]

    def read(self, charge, rng):
        det, n, b = self.det, self.det.size, phys.BORDER
        raw = phys.read_offsets(rng, n, self.noutputs, det.offset_fixed)
        raw += det.bias
        noise = rng.standard_normal((n, n), dtype=np.float32)
        noise *= self.noise_cols
        raw += noise
        raw += phys.one_over_f(rng, n, self.noutputs, det.one_over_f_rms)
        sig = np.minimum(charge, np.float32(phys.FULL_WELL_E))
        sig /= self.gain
        raw[b:n - b, b:n - b] += phys.nonlinear(sig, det.beta)
        return _to_uint16(raw)


def _accumulate(charge, rate_e, dt, rng):
    """Add a Poisson draw of ``rate_e * dt`` electrons to ``charge`` (in place)."""
    if dt > 0:
        charge += rng.poisson(rate_e * np.float32(dt)).astype(np.float32)


def _cosmic_rays(rng, m, dither, times):
    """Cosmic-ray hits of one dither: a Table with one row per affected pixel."""
    ncr = int(rng.poisson(CR_DENSITY * (m / 2048.0) ** 2))
    templates = np.array(
        [
            [[0, 0], [0, 0], [0, 0], [0, 0]],
            [[0, 0], [1, 0], [0, 0], [0, 0]],
            [[0, 0], [1, 0], [0, 1], [0, 0]],
            [[0, 0], [1, 0], [0, 1], [1, 1]],
        ]
    )
    npix = rng.choice(4, ncr, p=[0.4, 0.3, 0.15, 0.15]) + 1
    transpose = rng.random(ncr) < 0.5  # vertical instead of horizontal pairs
    x0 = rng.integers(0, m - 1, ncr)
    y0 = rng.integers(0, m - 1, ncr)
    total = np.exp(rng.uniform(np.log(500.0), np.log(20000.0), ncr))
    t_hit = rng.uniform(0.0, times[-1], ncr)
    first_read = np.searchsorted(np.asarray(times), t_hit, side="left")
    weights = rng.random((ncr, 4)) + np.array([1.5, 0, 0, 0])
    weights *= np.arange(4)[None, :] < npix[:, None]
    weights /= weights.sum(axis=1, keepdims=True)
    off = templates[npix - 1]  # (ncr, 4, 2) as (dx, dy)
    off = np.where(transpose[:, None, None], off[:, :, ::-1], off)
    keep = np.arange(4)[None, :] < npix[:, None]
    cr_id = np.repeat(np.arange(1, ncr + 1), npix)
    return Table(
        {
            "cr_id": cr_id,
            "dither": np.full(cr_id.size, dither, np.int64),
            "x": (x0[:, None] + off[:, :, 0])[keep],
            "y": (y0[:, None] + off[:, :, 1])[keep],
            "read_index": np.repeat(first_read, npix),
            "exposure": np.repeat(first_read + 1, npix),
            "time_s": np.repeat(t_hit, npix),
            "charge_e": (total[:, None] * weights)[keep],
        }
    )


def _write_ini(config_dir, out_dir, date, mode, fowler_pairs, rscale):
    paths = config_dir / "paths.ini"
    paths.write_text(
        "[general]\n"
        f"path_base = {out_dir.resolve()}\n"
        "path_config = config\n"
        "path_man = man\n"
        "path_src = src\n"
        "\n"
        "[flatfielding]\n"
        "path_flatfielding_corrections = flatfielding\n"
        f"coeff_filename = flat_{date}.fits\n"
        f"bad_pix_filename = flat_bad_{date}.fits\n"
        "\n"
        "[nonlinearity_corrections]\n"
        "path_nonlinearity_corrections = nonlinearity_corrections\n"
        f"coeff_filename = lin_coeffs_{date}.fits\n"
        f"bad_pix_filename = lin_bad_{date}.fits\n"
    )
    method = {"fowler": "FOWLER", "cds": "CDS", "utr": "UTR"}[mode]
    std = "do = 1\nhard = 0\nquit = 0\n"
    pipeline = config_dir / "pipeline.ini"
    pipeline.write_text(
        "[general]\n"
        "write_output = 1 ; write the L1 products\n"
        "\n[reference_subtraction]\n" + std
        + "method = RAMP ; TRIM | CONSTANT | CONSTANTOFF | RAMP | COLUMN | FULL\n"
        "\n[frame_combination]\n" + std
        + f"method = {method}\n"
        f"fowler_pairs = {int(fowler_pairs)}\n"
        "fowler_bodge = 0 ; seconds added to each pair's exposure time\n"
        "\n[nonlinearity_corrections]\n" + std
        + "order = 3\n"
        "\n[flatfielding]\n" + std
        + "\n[bad_pix_masking]\n" + std
        + "which = FLAT,LIN\n"
        "bad_post_register_threshold = 20 ; percent\n"
        "\n[sky_subtraction]\n" + std
        + "smoothing_box_size = 5\n"
        "bg_sigma_clip = 3\n"
        "peers_only = 1\n"
        "make_algorithm = MEDIAN ; MEDIAN | TUKEY | HUBER\n"
        "max_robust_iterations = 50\n"
        "max_robust_unsolved_percentage = 1\n"
        "\n[registration]\n" + std
        + f"fit_geometry = {'RSCALE' if rscale else 'SHIFT'}\n"
        "registration_algorithm = SCIPY\n"
        "use_sexconfig = 0\n"
        "sexconfig_filename = registration.sex\n"
        "do_bad_region = 0\n"
        "bad_region1 = 0:0,0:0\n"
        "bad_region2 = 0:0,0:0\n"
        "\n[stacking]\n" + std
        + "method = MEAN ; MEAN | COADD | MEANANDSCALE\n"
    )
    return pipeline, paths


def _validate(size, noutputs, mode, dithers, exptime, asicgain, multrun, date):
    usage = ExitCode.USAGE
    if size < 256 or size % 64:
        raise ConfigError(f"size must be a multiple of 64 and >= 256, got {size}", exit_code=usage)
    if noutputs < 1 or size % noutputs or (size // noutputs) % 2:
        raise ConfigError(f"noutputs={noutputs} does not split size={size} into even sections",
                          exit_code=usage)
    if mode not in _MODES:
        raise ConfigError(f"mode must be one of {_MODES}, got {mode!r}", exit_code=usage)
    if dithers < 1:
        raise ConfigError(f"dithers must be >= 1, got {dithers}", exit_code=usage)
    if not exptime > 0:
        raise ConfigError(f"exptime must be > 0, got {exptime}", exit_code=usage)
    if asicgain not in phys.ASICGAIN_DB:
        raise ConfigError(f"asicgain must be a SIDECAR setting 0-15, got {asicgain}", exit_code=usage)
    if multrun < 1:
        raise ConfigError(f"multrun must be >= 1, got {multrun}", exit_code=usage)
    try:
        _dt.datetime.strptime(str(date), "%Y%m%d")
    except ValueError:
        raise ConfigError(f"date must be YYYYMMDD, got {date!r}", exit_code=usage) from None


def simulate(out_dir, *, seed=1, dithers=9, fowler_pairs=2, size=2048, date="20150227",
             multrun=1, mode="fowler", nreads=None, exptime=10.0, noutputs=32, asicgain=10,
             rotation_deg=0.0, scale=1.0, cosmic_rays=True, utr=False, utr_runs=2,
             utr_reads=25, utr_interval=5.0, truth_images=None, progress=None) -> SimulationResult:
    """Write a simulated IO:I data set with its truth under ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        Created if needed; files already there with the same names are overwritten.
    seed : int
        Everything is drawn from ``numpy.random.default_rng``-style generators
        spawned from this seed: the same seed gives byte-identical files.
    dithers : int
        Dither positions (a square spiral, 3x3 for 9, steps of 40-120 px with
        sub-pixel jitter).
    fowler_pairs : int
        Pedestal/signal read pairs in Fowler mode.
    size : int
        Raw array side, reference border included (a multiple of 64 >= 256).
    date, multrun : str, int
        LT file-name fields.
    mode : {"fowler", "cds", "utr"}
        Read scheme of each dither; ``nreads`` applies to "utr" only (default 10).
    exptime : float
        Nominal exposure time (s).
    noutputs : int
        Readout amplifiers (header NOUTPUTS); sections of size/noutputs columns.
    asicgain : int
        ASIC gain setting (header ASICGAIN); nominal gain from
        :data:`ioi.frame.GAIN_BY_ASICGAIN`, true gain 1 % higher.
    rotation_deg, scale : float
        Rotation and scale of the last dither relative to the first, growing
        linearly over the dithers.
    cosmic_rays : bool
    utr, utr_runs, utr_reads, utr_interval
        Also write uniformly illuminated UTR ramps (Teledyne naming).
    truth_images : bool or None
        Write ``truth/rate_d<k>.fits``; None means yes when size <= 512.
    progress : callable or None
        ``progress(done, total, what)``, called once per file written.

    Returns
    -------
    SimulationResult
    """
    t_start = time.perf_counter()
    size, dithers, noutputs, asicgain = int(size), int(dithers), int(noutputs), int(asicgain)
    multrun, exptime = int(multrun), float(exptime)
    _validate(size, noutputs, mode, dithers, exptime, asicgain, multrun, date)
    if truth_images is None:
        truth_images = size <= 512
    schedule = read_schedule(mode, fowler_pairs=fowler_pairs, nreads=nreads, exptime=exptime)
    times = [t for t, _, _ in schedule]
    m = size - 2 * phys.BORDER
    date = str(date)

    out_dir = Path(out_dir)
    raw_dir, config_dir, truth_dir = out_dir / "raw", out_dir / "config", out_dir / "truth"
    flat_dir, lin_dir = config_dir / "flatfielding", config_dir / "nonlinearity_corrections"
    utr_dir = out_dir / "utr" if utr else None
    for d in (raw_dir, flat_dir, lin_dir, truth_dir) + ((utr_dir,) if utr else ()):
        d.mkdir(parents=True, exist_ok=True)

    n_files = (dithers * len(schedule) + (utr_runs * utr_reads if utr else 0) + 4 + 2
               + 8 + dithers * (2 if truth_images else 1))
    done = [0]

    def tick(path):
        done[0] += 1
        if progress is not None:
            progress(done[0], n_files, str(Path(path).name))

    # Independent generators for each ingredient, so that e.g. the star field
    # does not change when the cosmic rays are switched off.
    # Photon noise and read-out noise have separate streams, so that the
    # reference border (read-out only) is identical whatever the illumination.
    (rng_det, rng_sky, rng_geo, rng_cr, rng_photon, rng_read, rng_utr_photon, rng_utr_read,
     rng_cal) = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(9))

    det = phys.make_detector(rng_det, size, noutputs)
    db = phys.ASICGAIN_DB[asicgain]
    gain_nominal = GAIN_BY_ASICGAIN.get(asicgain)
    gain_true = (gain_nominal if gain_nominal is not None
                 else phys.theoretical_gain(db) * 1.04) * GAIN_ERROR
    reader = _Reader(det, gain_true, noutputs)

    geo = dither_transforms(dithers, size, rng=rng_geo, rotation_deg=rotation_deg, scale=scale)

    # Star field over the union of the dithers' footprints in reference coordinates.
    corners = np.array([[-0.5, -0.5], [m - 0.5, -0.5], [-0.5, m - 0.5], [m - 0.5, m - 0.5]])
    ref_pts = np.concatenate([np.column_stack(_apply(_invert(g["affine"]), *corners.T)) for g in geo])
    pad = STAMP_HALF + 2
    lo, hi = ref_pts.min(axis=0) - pad, ref_pts.max(axis=0) + pad
    area = float(np.prod(hi - lo))
    nstars = max(60, int(rng_sky.poisson(STAR_DENSITY * area / 2040.0**2)))
    star_x = rng_sky.uniform(lo[0], hi[0], nstars)
    star_y = rng_sky.uniform(lo[1], hi[1], nstars)
    fmin, fmax = 500.0, 3.0e6  # e-/s: S/N ~ 10 in 10 s on this sky, to deeply saturated
    u = rng_sky.random(nstars)
    star_flux = fmin * (1.0 - u * (1.0 - math.sqrt(fmin / fmax))) ** -2.0  # N(>F) ~ F^-1/2
    fwhm = float(rng_sky.uniform(5.0, 7.0))
    stars = Table({"id": np.arange(1, nstars + 1), "x_ref": star_x, "y_ref": star_y,
                   "flux_e_s": star_flux})

    sky_level = float(rng_sky.uniform(400.0, 600.0))
    sky_mean = sky_level * (1.0 + 0.03 * rng_sky.standard_normal(dithers))
    sky_grad = rng_sky.normal(0.0, 0.02, (dithers, 2))  # fractional change across the frame in x, y

    # Times: dithers follow each other with 10 s of overhead; multruns half an hour apart.
    night = _dt.datetime.strptime(date, "%Y%m%d").replace(hour=21, tzinfo=_dt.timezone.utc)
    t_reset = night + _dt.timedelta(seconds=1800.0 * (multrun - 1))
    db_comment = f"[{db} dB] ASIC preamp gain"
    seqnname = {"fowler": "FOWLER", "cds": "CDS", "utr": "UTR"}[mode]

    common = [
        ("INSTRUME", "IO:I", "instrument"),
        ("ORIGIN", "ioi.simulate", "simulated data"),
        ("OBJECT", "SIMFIELD", "target"),
        ("FILTER1", "H", "filter"),
        ("EXPTIME", exptime, "[s] nominal exposure time"),
        ("NOUTPUTS", noutputs, "readout amplifiers"),
        ("FRMTIME", FRMTIME, "[s] time for one read"),
        ("ASICGAIN", asicgain, db_comment),
        ("SIMSEED", int(seed), "simulation seed"),
    ]

    yy = (np.arange(m, dtype=np.float32) / (m - 1) - 0.5)[:, None]
    xx = (np.arange(m, dtype=np.float32) / (m - 1) - 0.5)[None, :]
    raw_files, star_tables, cr_tables, read_log = [], [], [], []
    for k, g in enumerate(geo):  # a loop over dithers
        dither = k + 1
        sx, sy = _apply(g["affine"], star_x, star_y)
        near = (sx > -STAMP_HALF - 1) & (sx < m + STAMP_HALF) & (sy > -STAMP_HALF - 1) & (sy < m + STAMP_HALF)
        star_img, peak_idx = phys.render_stars(
            sx[near], sy[near], star_flux[near], (m, m), fwhm=fwhm, beta=MOFFAT_BETA, half=STAMP_HALF
        )
        sky = np.float32(sky_mean[k]) * (1.0 + np.float32(sky_grad[k, 0]) * xx
                                         + np.float32(sky_grad[k, 1]) * yy)
        star_img += sky
        star_img *= det.flat
        star_img += det.dark
        rate_e = star_img  # e-/s per stripped pixel, as the detector sees it
        del star_img, sky

        t_last = times[-1]
        peak = np.zeros(nstars)
        sat = np.zeros(nstars, bool)
        pidx = np.full(nstars, -1)
        pidx[near] = peak_idx
        has = pidx >= 0
        q = rate_e.reshape(-1)[pidx[has]].astype(np.float64) * t_last
        peak[has] = q / gain_true
        br, bc = np.divmod(pidx[has], m)
        obs = phys.nonlinear(np.minimum(q, phys.FULL_WELL_E) / gain_true, det.beta.reshape(-1)[pidx[has]])
        sat[has] = (q >= phys.FULL_WELL_E) | (det.bias[br + phys.BORDER, bc + phys.BORDER] + obs >= phys.ADC_MAX)
        on_chip = (sx >= -0.5) & (sx < m - 0.5) & (sy >= -0.5) & (sy < m - 0.5)
        star_tables.append(Table({
            "id": stars["id"], "x": sx, "y": sy, "flux_e_s": star_flux,
            "flux_adu_s": star_flux / gain_true, "peak_adu": peak, "saturated": sat, "on_chip": on_chip,
        }))

        crs = _cosmic_rays(rng_cr, m, dither, times)  # drawn either way: same stream with or without
        if not cosmic_rays:
            crs = crs[:0]
        cr_tables.append(crs)
        cr_flat = np.asarray(crs["y"]) * m + np.asarray(crs["x"])
        cr_read = np.asarray(crs["read_index"])
        cr_q = np.asarray(crs["charge_e"], np.float32)

        if truth_images:
            path = truth_dir / f"rate_d{dither}.fits"
            fits.PrimaryHDU((rate_e / np.float32(gain_true)).astype(np.float32)).writeto(path, overwrite=True)
            tick(path)

        ra, dec = _pointing(g["affine"], m)
        cards = _wcs_cards(g["affine"], m) + [
            ("RA", _sexagesimal(ra, hours=True), "pointing (dither centre)"),
            ("DEC", _sexagesimal(dec, hours=False), "pointing (dither centre)"),
        ]
        charge = np.zeros((m, m), np.float32)
        t_prev = 0.0
        for i, (t, grp, idx) in enumerate(schedule):  # a loop over reads
            _accumulate(charge, rate_e, t - t_prev, rng_photon)
            t_prev = t
            hit = cr_read == i
            if hit.any():
                np.add.at(charge.reshape(-1), cr_flat[hit], cr_q[hit])
            data = reader.read(charge, rng_read)
            acq = t_reset + _dt.timedelta(seconds=t)
            hdr = _header(common, cards + [
                ("INTTIME", float(t), "[s] time since reset"),
                ("SEQNUM_R", multrun, "run (multrun)"),
                ("SEQNUM_M", grp, "group"),
                ("SEQNUM_N", idx, "read within group"),
                ("SEQNNAME", seqnname, "sequence name"),
            ] + _time_cards(acq))
            path = raw_dir / f"i_e_{date}_{multrun}_{dither}_{i + 1}_0.fits"
            fits.PrimaryHDU(data, header=hdr).writeto(path, overwrite=True)
            raw_files.append(path)
            tick(path)
        read_log.append({"dither": dither, "reset_jd": _jd(t_reset)})
        t_reset = t_reset + _dt.timedelta(seconds=times[-1] + 10.0)
        del rate_e, charge

    utr_files = []
    if utr:
        utr_rate_e = (np.float32(UTR_RATE_ADU_S * gain_true) * det.flat + det.dark).astype(np.float32)
        utr_common = [c for c in common if c[0] not in ("OBJECT", "EXPTIME")] + [
            ("OBJECT", "UTR_FLAT", "target"),
            ("EXPTIME", utr_reads * float(utr_interval), "[s] nominal exposure time"),
        ]
        ra, dec = _pointing(geo[0]["affine"], m)
        cards = _wcs_cards(geo[0]["affine"], m) + [
            ("RA", _sexagesimal(ra, hours=True), "pointing (dither centre)"),
            ("DEC", _sexagesimal(dec, hours=False), "pointing (dither centre)"),
        ]
        for run in range(1, utr_runs + 1):  # a loop over runs
            charge = np.zeros((m, m), np.float32)
            for k in range(1, utr_reads + 1):  # a loop over reads
                _accumulate(charge, utr_rate_e, float(utr_interval), rng_utr_photon)
                data = reader.read(charge, rng_utr_read)
                t = k * float(utr_interval)
                acq = t_reset + _dt.timedelta(seconds=t)
                hdr = _header(utr_common, cards + [
                    ("INTTIME", t, "[s] time since reset"),
                    ("SEQNUM_R", run, "run"),
                    ("SEQNUM_M", 1, "group"),
                    ("SEQNUM_N", k, "read within group"),
                    ("SEQNNAME", "UTR", "sequence name"),
                ] + _time_cards(acq))
                path = utr_dir / f"H2RG_R{run:02d}_M01_N{k:02d}.fits"
                fits.PrimaryHDU(data, header=hdr).writeto(path, overwrite=True)
                utr_files.append(path)
                tick(path)
            t_reset = t_reset + _dt.timedelta(seconds=utr_reads * float(utr_interval) + 10.0)

    # Calibration files in the original's formats, (size-8)^2 float32.
    dead = (det.badpix & 2) > 0
    hot = (det.badpix & 1) > 0
    badlin = (det.badpix & 8) > 0
    outside = (det.flat < 0.35) | (det.flat > 2.0)
    flat_meas = det.flat * (1.0 + 0.002 * rng_cal.standard_normal((m, m))).astype(np.float32)
    flat_meas[outside] = 1.0
    flat_bad = np.where(outside | dead, np.nan, 1.0).astype(np.float32)
    lin_bad = np.where(hot | dead | badlin, np.nan, 1.0).astype(np.float32)
    # Inverse series of O = L - beta L^2:  L = O + beta O^2 + 2 beta^2 O^3 (+ 5 beta^3 O^4 ...).
    lin_hdus = fits.HDUList([fits.PrimaryHDU(np.zeros((m, m), np.float32))])
    for order, coeff in ((1, np.ones((m, m), np.float32)), (2, det.beta), (3, 2.0 * det.beta.astype(np.float64) ** 2)):
        lin_hdus.append(fits.ImageHDU(np.asarray(coeff, np.float32), name=f"ORDER{order}"))
    lin_hdus[0].header["VALIDLO"] = (0.0, "[ADU] lowest observed signal fitted")
    lin_hdus[0].header["VALIDHI"] = (50000.0, "[ADU] highest observed signal fitted")
    lin_hdus[0].header["COMMENT"] = "HDU i = order-i coefficient: linear = sum c_i observed^i"
    cal = {
        "flat": flat_dir / f"flat_{date}.fits",
        "flat_bad": flat_dir / f"flat_bad_{date}.fits",
        "lin_coeffs": lin_dir / f"lin_coeffs_{date}.fits",
        "lin_bad": lin_dir / f"lin_bad_{date}.fits",
    }
    fits.PrimaryHDU(flat_meas.astype(np.float32)).writeto(cal["flat"], overwrite=True)
    tick(cal["flat"])
    fits.PrimaryHDU(flat_bad).writeto(cal["flat_bad"], overwrite=True)
    tick(cal["flat_bad"])
    lin_hdus.writeto(cal["lin_coeffs"], overwrite=True)
    tick(cal["lin_coeffs"])
    fits.PrimaryHDU(lin_bad).writeto(cal["lin_bad"], overwrite=True)
    tick(cal["lin_bad"])

    pipeline_ini, paths_ini = _write_ini(config_dir, out_dir, date, mode, fowler_pairs,
                                         rotation_deg != 0.0 or scale != 1.0)
    tick(pipeline_ini)
    tick(paths_ini)

    # Truth.
    for name, arr in (("flat", det.flat), ("nonlin_beta", det.beta), ("badpix", det.badpix),
                      ("bias", det.bias), ("dark", det.dark)):
        path = truth_dir / f"{name}.fits"
        fits.PrimaryHDU(arr).writeto(path, overwrite=True)
        tick(path)
    stars.write(truth_dir / "stars.ecsv", format="ascii.ecsv", overwrite=True)
    tick(truth_dir / "stars.ecsv")
    for k, tab in enumerate(star_tables):
        path = truth_dir / f"stars_d{k + 1}.ecsv"
        tab.write(path, format="ascii.ecsv", overwrite=True)
        tick(path)
    cr_all = vstack(cr_tables) if cr_tables else Table()
    cr_all.write(truth_dir / "cosmic_rays.ecsv", format="ascii.ecsv", overwrite=True)
    tick(truth_dir / "cosmic_rays.ecsv")

    truth = {
        "seed": int(seed),
        "size": size,
        "stripped_size": m,
        "border": phys.BORDER,
        "dithers": dithers,
        "multrun": multrun,
        "date": date,
        "mode": mode,
        "fowler_pairs": int(fowler_pairs) if mode == "fowler" else None,
        "exptime": exptime,
        "frmtime": FRMTIME,
        "read_times": times,
        "read_groups": [[grp, idx] for _, grp, idx in schedule],
        "noutputs": noutputs,
        "asicgain": asicgain,
        "asicgain_db": db,
        "gain_nominal": gain_nominal,
        "gain_true": gain_true,
        "read_noise_adu": float(np.mean(det.read_noise)),
        "read_noise_adu_per_output": [float(v) for v in det.read_noise],
        "one_over_f_rms_adu": det.one_over_f_rms,
        "dark_e_s": float(np.median(det.dark)),
        "full_well_e": phys.FULL_WELL_E,
        "bias_adu_range": [float(det.bias.min()), float(det.bias.max())],
        "sky": [
            {"dither": k + 1, "mean_e_s": float(sky_mean[k]), "mean_adu_s": float(sky_mean[k] / gain_true),
             "gradient_x": float(sky_grad[k, 0]), "gradient_y": float(sky_grad[k, 1])}
            for k in range(dithers)
        ],
        "sky_model": "mean * (1 + gradient_x * (x/(m-1) - 0.5) + gradient_y * (y/(m-1) - 0.5)), e-/s, times flat",
        "transforms": geo,
        "transform_convention": "affine maps reference (dither 1) stripped (x, y) to dither-k stripped (x, y)",
        "pixel_scale_arcsec": PIXEL_SCALE,
        "field_radec_deg": [FIELD_RA, FIELD_DEC],
        "moffat": {"fwhm": fwhm, "beta": MOFFAT_BETA, "alpha": float(phys.moffat_alpha(fwhm, MOFFAT_BETA)),
                   "stamp_half": STAMP_HALF,
                   "normalisation": "each star's (2*half+1)^2 stamp sums to flux_e_s (before the flat)"},
        "nstars": nstars,
        "saturation_adu": phys.ADC_MAX,
        "peak_adu_definition": "linear signal (ADU, before nonlinearity) accumulated since reset at the "
                               "last read in the star's brightest pixel (stars + sky + dark, times flat)",
        "nonlinearity": "observed = L*(1 - beta*L), L = linear signal in ADU since reset (capped at 1/(2 beta)); "
                        "lin_coeffs holds the inverse series L = O + beta O^2 + 2 beta^2 O^3",
        "badpix_bits": {"hot": 1, "dead": 2, "low_response": 4, "bad_linearity": 8},
        "n_badpix": {name: int(((det.badpix & bit) > 0).sum())
                     for name, bit in (("hot", 1), ("dead", 2), ("low_response", 4), ("bad_linearity", 8))},
        "cosmic_rays": bool(cosmic_rays),
        "n_cosmic_ray_pixels": int(len(cr_all)),
        "dither_resets_jd": read_log,
        "utr": None if not utr else {
            "runs": int(utr_runs), "reads": int(utr_reads), "interval_s": float(utr_interval),
            "illumination_adu_s": UTR_RATE_ADU_S,
            "illumination": "UTR_RATE_ADU_S * flat (ADU/s at the true gain) plus dark current",
        },
    }
    path = truth_dir / "truth.json"
    path.write_text(json.dumps(truth, indent=1))
    tick(path)
    elapsed = time.perf_counter() - t_start
    log.info("simulated %d raw reads of %dx%d in %.1f s under %s", len(raw_files), size, size, elapsed, out_dir)
    return SimulationResult(
        out_dir=out_dir, raw_dir=raw_dir, config_dir=config_dir, pipeline_ini=pipeline_ini,
        paths_ini=paths_ini, truth_dir=truth_dir, utr_dir=utr_dir, raw_files=raw_files,
        utr_files=utr_files, calibration_files=cal, truth=truth, elapsed_s=elapsed,
    )
