"""Command-line layer of ``ioi calib``: argument parsing, files and plots.

The maths lives in :mod:`ioi.calib.linearity`, :mod:`~ioi.calib.flat`,
:mod:`~ioi.calib.gain` and :mod:`~ioi.calib.fullwell`.  Heavy imports (numpy
maths, astropy, matplotlib) happen inside the command functions so that
``ioi --help`` stays instant.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ioi.errors import ExitCode, InputError, IoiError

log = logging.getLogger(__name__)

SATURATION = 65535.0


# ----------------------------------------------------------------- parsing helpers
def _pair(text, cast=float):
    try:
        a, b = (cast(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got {text!r}") from None
    return a, b


def _int_pair(text):
    return _pair(text, int)


def _pixels(text):
    out = []
    for item in text.split(";"):
        if item.strip():
            out.append(_pair(item, int))
    return out


def add_calib_parser(subparsers) -> None:
    """Add ``calib`` with sub-commands linearity, flat, gain, fullwell; each sets ``func``."""
    calib = subparsers.add_parser("calib", help="make calibration files (linearity, flat, gain, full well)")
    sub = calib.add_subparsers(dest="calib_command", metavar="{linearity,flat,gain,fullwell}")
    sub.required = True

    p = sub.add_parser("linearity", help="nonlinearity coefficients and bad-pixel mask from UTR runs")
    p.add_argument("ramp_dir", metavar="RAMP_DIR", help="directory of Teledyne-named up-the-ramp runs")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--runs", type=_int_pair, default=None, metavar="R0,R1", help="run range (inclusive)")
    p.add_argument("--time-window", type=_pair, default=(20.0, 100.0), metavar="T0,T1",
                   help="seconds whose reads define the ideal (linear) signal (default 20,100)")
    p.add_argument("--adu-window", type=_pair, default=(2500.0, 40000.0), metavar="A0,A1",
                   help="observed signal range of the polynomial fit (default 2500,40000)")
    p.add_argument("--order", type=int, default=3, help="polynomial order (default 3)")
    p.add_argument("--bad-threshold", type=float, default=0.8, metavar="PCT",
                   help="residual nonlinearity (%%) above which a pixel is bad (default 0.8)")
    p.add_argument("--rate-sigma", type=float, default=3.0, metavar="S",
                   help="bad when mean rate - S x std(rate) < 0 (default 3)")
    p.add_argument("--outlier-sigma", type=float, default=5.0, metavar="S",
                   help="bad if the pixel's nonlinearity is this many robust sigmas from the median (0: off)")
    p.add_argument("--flip", action="store_true", help="flip outputs left-right")
    p.add_argument("--plot-pixels", type=_pixels, default=[], metavar="Y,X;Y,X...",
                   help="write diagnostic PNGs for these pixels")
    p.add_argument("--plot-bad", type=int, default=0, metavar="N", help="plot the first N bad pixels")
    p.add_argument("--clobber", action="store_true", help="overwrite existing outputs")
    p.set_defaults(func=cmd_linearity)

    p = sub.add_parser("flat", help="flat field and bad-pixel mask from sky (or science) frames")
    p.add_argument("files", nargs="+", metavar="FILE", help="sky frames or L1 products")
    p.add_argument("--out", required=True, help="output directory (flat.fits, flat_bad.fits)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--hdu", type=int, default=None, metavar="N", help="HDU index to read")
    g.add_argument("--ext", default=None, metavar="NAME", help="extension name to read (e.g. IM_NONSS)")
    p.add_argument("--low", type=float, default=0.35, help="response below this is bad (default 0.35)")
    p.add_argument("--high", type=float, default=2.0, help="response above this is bad (default 2.0)")
    p.add_argument("--sigma", type=float, default=10.0,
                   help="clipping of each frame's normalising mean (default 10)")
    p.add_argument("--clobber", action="store_true", help="overwrite existing outputs")
    p.add_argument("--flip", action="store_true", help="flip outputs left-right")
    p.add_argument("--from-science", action="store_true", help="mask sources, median-combine (beyond)")
    p.set_defaults(func=cmd_flat)

    p = sub.add_parser("gain", help="gain and read noise by photon transfer")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="directories of ramps or Fowler exposures")
    p.add_argument("--method", choices=("utr", "fowler"), default="utr", help="two UTR ramps or Fowler pairs")
    p.add_argument("--window", type=int, default=50, help="window side in pixels (default 50)")
    p.add_argument("--adu-range", type=_pair, default=(1000.0, 30000.0), metavar="A0,A1",
                   help="mean-signal range of the PTC fit")
    p.add_argument("--no-linearize", action="store_true", help="do not correct the PTC for nonlinearity")
    p.add_argument("--json", default=None, metavar="FILE", help="write the summary as JSON")
    p.add_argument("--plots", default=None, metavar="DIR", help="write PTC and histogram PNGs here")
    p.set_defaults(func=cmd_gain)

    p = sub.add_parser("fullwell", help="full-well depth from a UTR sequence to saturation")
    p.add_argument("ramp_dir", metavar="RAMP_DIR", help="directory of a UTR sequence to saturation")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--runs", type=_int_pair, default=None, metavar="R0,R1", help="run range (inclusive)")
    p.add_argument("--gain", type=float, default=None, help="e-/ADU (default: from ASICGAIN)")
    p.add_argument("--clobber", action="store_true")
    p.set_defaults(func=cmd_fullwell)


# ----------------------------------------------------------------- shared loading
def _find_runs(directory, *, runs=None, groups=None):
    """The Teledyne files of ``directory`` by run: a list of (run, files in read order)."""
    from ioi.discovery import scan_teledyne

    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"ramp directory not found: {directory}", exit_code=ExitCode.NO_FILES)
    found = scan_teledyne(directory, runs=runs, groups=groups)
    if not found:
        raise InputError(f"no Teledyne-named raw files (H2RG_R*_M*_N*.fits) found in {directory}",
                         exit_code=ExitCode.NO_FILES)
    by_run = {}
    for r in found:
        by_run.setdefault(r.run, []).append(r)
    return sorted(by_run.items())


def _corrected_reads(items):
    """Yield ``(read, saturated, header)`` for each file of one run, one file at a time.

    ``read``: float32 (ny, nx), reference-subtracted (RAMP: a read's correction
    uses only its own reference rows, so reads are corrected one by one) and
    border-stripped; ``saturated``: bool (ny, nx), ADC-saturated raw pixels;
    ``header``: the run's first header (it gives NOUTPUTS).  Only one raw read
    is in memory at a time.
    """
    from ioi.fitsio import read_raw
    from ioi.stages.reference import strip_border, subtract_reference

    header = shape = None
    for r in items:  # loop over reads
        data, hdr = read_raw(r.path)
        if header is None:
            header, shape = hdr, data.shape
            if "NOUTPUTS" not in header:
                raise InputError(f"NOUTPUTS missing in {items[0].path}", exit_code=ExitCode.NO_NOUTPUTS)
        elif data.shape != shape:
            raise InputError(f"raw file {r.path} is {data.shape}, the run's first read {shape}",
                             exit_code=ExitCode.DATA_SHAPE_MISMATCH)
        sat = strip_border(data >= SATURATION)
        read = strip_border(subtract_reference(data, method="RAMP", noutputs=int(header["NOUTPUTS"])))
        yield read, sat, header


def _load_runs(directory, *, runs=None, groups=None):
    """Reference-subtracted, border-stripped reads of every Teledyne run in ``directory``.

    Returns a list of dicts: run, reads (nreads, ny, nx) float32, first_sat
    (ny, nx) int16 (index of each pixel's first ADC-saturated read; nreads if
    none), inttime (nreads,), group (nreads,), header.  Reads are corrected one
    at a time straight into the run's cube: no raw or float64 cube is held.
    """
    import numpy as np

    out = []
    for run, items in _find_runs(directory, runs=runs, groups=groups):  # loop over runs, then reads
        nreads = len(items)
        reads = first_sat = header = None
        for k, (read, sat, hdr) in enumerate(_corrected_reads(items)):
            if reads is None:
                header = hdr
                reads = np.empty((nreads,) + read.shape, dtype=np.float32)
                first_sat = np.full(read.shape, nreads, dtype=np.int16)
            reads[k] = read
            first_sat[sat & (first_sat > k)] = k
        out.append({"run": run, "reads": reads, "first_sat": first_sat,
                    "inttime": np.array([r.inttime for r in items]), "group": np.array([r.group for r in items]),
                    "header": header, "paths": [r.path for r in items]})
    log.info("read %d run(s) from %s", len(out), directory)
    return out


def _saturated_since(run, n, rows=slice(None)):
    """Reads 0..n-1 of ``run`` at or after each pixel's first saturated read: bool (n, nrows, nx)."""
    import numpy as np

    return np.arange(n)[:, None, None] >= run["first_sat"][None, rows]


def _median_signal(directory, *, runs=None, chunk_rows=64):
    """Median over runs of the signal since reset, read file by file.

    Returns (signal float32 (nreads, ny, nx), inttime (nreads,), header of the
    first run, run numbers).  Each run's signal is built one read at a time
    (:func:`ioi.calib.linearity.iter_ramp_signal`); with two runs (the usual
    case) the second is folded into the first as it is read, since the median
    of two values is their mean (float32, bit for bit what ``np.median``
    gives), so one signal cube is all that is held.  With three or more runs
    every run's cube is kept and the median taken in row bands.
    """
    import numpy as np

    from ioi.calib.linearity import iter_ramp_signal

    found = _find_runs(directory, runs=runs)
    n = min(len(items) for _, items in found)
    t = np.array([r.inttime for r in found[0][1][:n]])
    for run, items in found[1:]:
        if not np.allclose(np.array([r.inttime for r in items[:n]]), t, atol=1e-3):
            raise InputError(f"run {run} has different INTTIMEs from run {found[0][0]}")
    sigs = []
    header = None
    for j, (run, items) in enumerate(found):  # loop over runs, then reads
        fold = j == 1 and len(found) == 2
        cube = sigs[0] if fold else None
        headers = []

        def pairs(items=items, headers=headers):
            for read, sat, hdr in _corrected_reads(items[:n]):  # loop over reads
                headers.append(hdr)
                yield read, sat

        for k, s in enumerate(iter_ramp_signal(pairs(), t)):
            if sigs and s.shape != sigs[0].shape[1:]:
                raise InputError(f"run {run} has frames of {s.shape}, run {found[0][0]} {sigs[0].shape[1:]}",
                                 exit_code=ExitCode.DATA_SHAPE_MISMATCH)
            if cube is None:
                cube = np.empty((n,) + s.shape, dtype=np.float32)
                sigs.append(cube)
            if fold:
                cube[k] += s  # NaN (saturated) propagates, as in np.median
                cube[k] *= np.float32(0.5)
            else:
                cube[k] = s
        if header is None:
            header = headers[0]
    sig = sigs[0]
    if len(sigs) > 2:
        for y0 in range(0, sig.shape[1], chunk_rows):  # row bands bound the stacked copy
            rows = slice(y0, y0 + chunk_rows)
            sig[:, rows] = np.median(np.stack([c[:, rows] for c in sigs]), axis=0)  # NaN propagates
    log.info("read %d run(s) from %s", len(found), directory)
    return sig, t, header, [run for run, _ in found]


def _check_outputs(paths, clobber):
    for p in paths:
        if Path(p).exists() and not clobber:
            raise IoiError(f"output file exists (use --clobber): {p}", exit_code=ExitCode.WORKDIR_EXISTS)


def _flip(a, flip):
    import numpy as np

    return np.ascontiguousarray(a[..., ::-1]) if flip else a


# ----------------------------------------------------------------- linearity
def cmd_linearity(args) -> int:
    import numpy as np
    from astropy.io import fits

    from ioi.calib.linearity import fit_linearity
    from ioi.fitsio import write_fits_atomic, write_image

    out = Path(args.out)
    names = [out / "lin_coeffs.fits", out / "lin.fits", out / "lin_bad.fits"]
    _check_outputs(names, getattr(args, "clobber", False))
    sig, t, _, run_ids = _median_signal(args.ramp_dir, runs=args.runs)
    res = fit_linearity(sig, t, time_window=args.time_window, adu_window=args.adu_window, order=args.order,
                        bad_threshold=args.bad_threshold, rate_sigma=args.rate_sigma,
                        outlier_sigma=args.outlier_sigma)
    hdr = fits.Header()
    hdr["LINRUNS"] = (",".join(str(r) for r in run_ids), "UTR runs used")
    hdr["LINTWIN"] = (f"{args.time_window[0]:g},{args.time_window[1]:g}", "time window (s) of ideal fit")
    hdr["LINAWIN"] = (f"{args.adu_window[0]:g},{args.adu_window[1]:g}", "ADU window of polynomial fit")
    hdr["LINORDER"] = (args.order, "polynomial order observed -> ideal")
    hdr["LINTHRSH"] = (args.bad_threshold, "bad: median residual nonlinearity > this (%)")
    hdr["LINFLIP"] = (bool(args.flip), "flipped left-right")
    coeffs = _flip(res.coeffs, args.flip)
    hdus = [fits.PrimaryHDU(coeffs[0], header=hdr)] + [fits.ImageHDU(c) for c in coeffs[1:]]
    write_fits_atomic(names[0], fits.HDUList(hdus), overwrite=True)
    write_image(names[1], _flip(res.residual, args.flip), hdr, overwrite=True)
    mask = np.where(res.bad, np.nan, 1.0).astype(np.float32)
    write_image(names[2], _flip(mask, args.flip), hdr, overwrite=True)
    pixels = list(args.plot_pixels)
    if args.plot_bad:
        ys, xs = np.nonzero(res.bad)
        pixels += list(zip(ys[: args.plot_bad].tolist(), xs[: args.plot_bad].tolist()))
    for y, x in pixels:  # loop over chosen pixels
        _plot_linearity_pixel(out / f"lin_pixel_{y}_{x}.png", sig, t, res, y, x, args.adu_window)
    print(f"linearity: {res.bad.size} pixels, {int(res.bad.sum())} bad "
          f"({100.0 * res.bad.mean():.3f} %), median residual {np.nanmedian(res.residual):.3f} %; "
          f"wrote {', '.join(str(n) for n in names)}")
    return 0


def _plot_linearity_pixel(path, sig, t, res, y, x, adu_window):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ioi.calib._lsq import polyval

    ny, nx = res.bad.shape
    if not (0 <= y < ny and 0 <= x < nx):
        raise IoiError(f"--plot-pixels {y},{x} is outside the {ny}x{nx} array", exit_code=ExitCode.USAGE)
    s = sig[:, y, x].astype(np.float64)
    ideal = float(res.rate[y, x]) * t
    c = res.coeffs[:, y, x].astype(np.float64)
    corr = polyval(c, s)
    fig, ax = plt.subplots(1, 5, figsize=(22, 4))
    ax[0].plot(t, s, "o", label="observed")
    ax[0].plot(t, ideal, "-", label="ideal")
    ax[0].set(xlabel="time since reset (s)", ylabel="signal (ADU)", title=f"pixel y={y} x={x}")
    ax[0].legend()
    grid = np.linspace(max(adu_window[0], 1.0), adu_window[1], 200)
    ax[1].plot(grid, polyval(c, grid) / grid)
    ax[1].set(xlabel="observed (ADU)", ylabel="correction factor", title="correction")
    with np.errstate(invalid="ignore", divide="ignore"):
        ax[2].plot(s, (corr - ideal) / ideal * 100, "o")
    ax[2].axhline(0, color="k", lw=0.5)
    ax[2].set(xlabel="observed (ADU)", ylabel="residual (%)", title=f"median {res.residual[y, x]:.3f} %")
    ax[3].plot(0.5 * (s[1:] + s[:-1]), np.diff(s) / np.diff(t), "o")
    ax[3].set(xlabel="signal (ADU)", ylabel="rate (ADU/s)", title="rate vs signal")
    y0, y1, x0, x1 = max(0, y - 10), min(ny, y + 11), max(0, x - 10), min(nx, x + 11)
    stamp = np.nanmax(sig[:, y0:y1, x0:x1], axis=0) if np.isfinite(sig[:, y0:y1, x0:x1]).any() else \
        np.zeros((y1 - y0, x1 - x0))
    ax[4].imshow(stamp, origin="lower", extent=(x0 - 0.5, x1 - 0.5, y0 - 0.5, y1 - 0.5))
    ax[4].plot([x], [y], "r+")
    ax[4].set(title=f"stamp, bad={bool(res.bad[y, x])} reason={int(res.reason[y, x])}")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


# ----------------------------------------------------------------- flat
def cmd_flat(args) -> int:
    import numpy as np

    from ioi.calib.flat import make_flat
    from ioi.fitsio import read_image, write_image

    out = Path(args.out)
    names = [out / "flat.fits", out / "flat_bad.fits"]
    _check_outputs(names, args.clobber)
    hdu = args.ext if args.ext is not None else (args.hdu if args.hdu is not None else 0)
    frames = []
    for f in args.files:  # loop over frames
        if not Path(f).is_file():
            raise InputError(f"flat input file not found: {f}", exit_code=ExitCode.NO_FILES)
        data, _ = read_image(f, hdu=hdu, what="flat input")
        frames.append(data)
    res = make_flat(frames, low=args.low, high=args.high, sigma=args.sigma, from_science=args.from_science)
    from astropy.io import fits

    hdr = fits.Header()
    hdr["FLATN"] = (len(frames), "frames combined")
    hdr["FLATCOMB"] = ("MEDIAN" if args.from_science else "MEAN", "combination")
    hdr["FLATLOW"] = (args.low, "bad below")
    hdr["FLATHIGH"] = (args.high, "bad above")
    hdr["FLATFLIP"] = (bool(args.flip), "flipped left-right")
    write_image(names[0], _flip(res.flat, args.flip), hdr, overwrite=True)
    write_image(names[1], _flip(np.where(res.bad, np.nan, 1.0).astype(np.float32), args.flip), hdr, overwrite=True)
    print(f"flat: {len(frames)} frames, {int(res.bad.sum())} bad pixels; wrote {names[0]}, {names[1]}")
    return 0


# ----------------------------------------------------------------- gain
def _gain_points(args):
    """Matched difference-image sets by rows: get_rows, shape, times, first_time, reads_per_image, header.

    ``get_rows(y0, y1)`` returns rows ``y0:y1`` of the two sets, each float32
    (npoints, y1 - y0, nx); ``shape`` is each whole set's (npoints, ny, nx).
    """
    import numpy as np

    runs = []
    for d in args.dirs:
        runs += _load_runs(d)
    if args.method == "utr":
        if len(runs) < 2:
            raise InputError(f"UTR photon transfer needs two runs; found {len(runs)} in {', '.join(args.dirs)}",
                             exit_code=ExitCode.NO_SUITABLE_FILES)
        r1, r2 = runs[0], runs[1]
        n = min(len(r1["inttime"]), len(r2["inttime"]))
        if r1["reads"].shape[1:] != r2["reads"].shape[1:]:
            raise InputError(f"runs {r1['run']} and {r2['run']} have frames of {r1['reads'].shape[1:]} and "
                             f"{r2['reads'].shape[1:]}", exit_code=ExitCode.DATA_SHAPE_MISMATCH)

        def get_rows(y0, y1):
            cds = []
            for r in (r1, r2):  # CDS of reads 2..n against read 1, NaN from the first saturated read on
                c = r["reads"][1:n, y0:y1] - r["reads"][0, y0:y1]
                c[_saturated_since(r, n, slice(y0, y1))[1:]] = np.nan
                cds.append(c)
            return cds[0], cds[1]

        t = r1["inttime"][1:n]
        return get_rows, (n - 1,) + r1["reads"].shape[1:], t, float(r1["inttime"][0]), 1, r1["header"]
    # Fowler: each run is one exposure (group 1 pedestal, group 2 signal); pair runs of equal time
    images = {}
    for r in runs:
        ped, sig = r["group"] == 1, r["group"] == 2
        if ped.sum() == 0 or ped.sum() != sig.sum():
            raise InputError(f"run {r['run']}: Fowler needs equal pedestal/signal reads "
                             f"({int(ped.sum())}/{int(sig.sum())})", exit_code=ExitCode.UNEQUAL_FOWLER_READS)
        img = r["reads"][sig].mean(axis=0, dtype=np.float64) - r["reads"][ped].mean(axis=0, dtype=np.float64)
        texp = round(float(r["inttime"][sig].mean() - r["inttime"][ped].mean()), 2)
        images.setdefault(texp, []).append((img.astype(np.float32), int(ped.sum())))
    pairs = sorted((k, v) for k, v in images.items() if len(v) >= 2)
    if len(pairs) < 3:
        raise InputError("Fowler photon transfer needs two exposures at each of >= 3 exposure times; "
                         f"found pairs at {[k for k, _ in pairs]}", exit_code=ExitCode.NO_SUITABLE_FILES)
    a = np.stack([v[0][0] for _, v in pairs])
    b = np.stack([v[1][0] for _, v in pairs])
    t = np.array([k for k, _ in pairs])
    return (lambda y0, y1: (a[:, y0:y1], b[:, y0:y1])), a.shape, t, 0.0, pairs[0][1][0][1], runs[0]["header"]


def _gauss_fit(values):
    """Mean and sigma of a Gaussian fitted to the histogram of finite values (and the histogram)."""
    import numpy as np
    from scipy.optimize import curve_fit

    v = values[np.isfinite(values)]
    if v.size < 5:
        return float(np.mean(v)) if v.size else float("nan"), float("nan"), None
    hist, edges = np.histogram(v, bins=max(5, min(50, v.size // 3)))
    centres = 0.5 * (edges[1:] + edges[:-1])
    p0 = (hist.max(), float(np.median(v)), float(np.std(v)) or 1e-3)
    try:
        popt, _ = curve_fit(lambda x, a, m, s: a * np.exp(-0.5 * ((x - m) / s) ** 2), centres, hist, p0=p0,
                            maxfev=5000)
        return float(popt[1]), abs(float(popt[2])), (hist, edges, popt)
    except RuntimeError:  # no convergence: fall back to moments
        return p0[1], p0[2], (hist, edges, None)


def cmd_gain(args) -> int:
    import json

    from ioi.calib.gain import asicgain_db, fit_ptc, ptc_points_rows, theoretical_gain
    from ioi.frame import GAIN_BY_ASICGAIN

    get_rows, shape, t, t1, nper, header = _gain_points(args)
    mean, var = ptc_points_rows(get_rows, shape, window=args.window)
    res = fit_ptc(mean, var, adu_range=args.adu_range, times=t, first_time=t1,
                  linearize=not args.no_linearize, reads_per_image=nper)
    summary = dict(res.summary)
    g_mu, g_sig, g_hist = _gauss_fit(res.gain.ravel())
    r_mu, r_sig, r_hist = _gauss_fit(res.read_noise_e.ravel())
    db = asicgain_db(header)
    summary.update({
        "method": args.method, "window": args.window, "adu_range": list(args.adu_range),
        "linearized": not args.no_linearize,
        "gain_gauss_mean": g_mu, "gain_gauss_sigma": g_sig,
        "read_noise_e_gauss_mean": r_mu, "read_noise_e_gauss_sigma": r_sig,
        "read_noise_note": "per single read (a CDS image has sqrt(2) x this)",
        "asicgain": header.get("ASICGAIN"), "asicgain_db": db,
        "gain_theoretical": theoretical_gain(db) if db is not None else None,
        "gain_table": GAIN_BY_ASICGAIN.get(int(header["ASICGAIN"])) if "ASICGAIN" in header else None,
    })
    rows = [("gain (e-/ADU), all windows pooled", summary["gain_e_per_adu"]),
            ("gain (e-/ADU), median of windows", summary["gain_window_median"]),
            ("gain (e-/ADU), Gaussian fit", g_mu),
            ("read noise per read (ADU), pooled", summary["read_noise_adu_per_read"]),
            ("read noise per read (e-), pooled", summary["read_noise_e_per_read"]),
            ("read noise per read (e-), Gaussian fit", r_mu),
            ("theoretical gain from ASICGAIN dB", summary["gain_theoretical"]),
            ("gain table for ASICGAIN", summary["gain_table"]),
            ("windows fitted", summary["nwindows"])]
    for name, val in rows:
        print(f"{name:38s} {val if val is None or isinstance(val, int) else f'{val:.4g}'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2, default=float))
    if args.plots:
        _plot_gain(Path(args.plots), res, g_hist, r_hist)
    return 0


def _plot_gain(directory, res, g_hist, r_hist):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    for name, h, label in (("gain_hist.png", g_hist, "gain (e-/ADU)"), ("readnoise_hist.png", r_hist,
                                                                          "read noise per read (e-)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        if h is not None:
            hist, edges, popt = h
            ax.stairs(hist, edges)
            if popt is not None:
                x = np.linspace(edges[0], edges[-1], 200)
                ax.plot(x, popt[0] * np.exp(-0.5 * ((x - popt[1]) / popt[2]) ** 2),
                        label=f"mean {popt[1]:.3f}, sigma {abs(popt[2]):.3f}")
                ax.legend()
        ax.set(xlabel=label, ylabel="windows")
        fig.savefig(directory / name, dpi=80)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    m = res.mean.reshape(res.mean.shape[0], -1)
    v = res.var.reshape(res.var.shape[0], -1)
    ax.plot(m, v, ".", ms=2)
    ax.set(xlabel="mean signal (ADU)", ylabel="variance (ADU^2)", title="photon transfer")
    fig.savefig(directory / "ptc.png", dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------- full well
def cmd_fullwell(args) -> int:
    import numpy as np
    from astropy.io import fits

    from ioi.calib.fullwell import full_well
    from ioi.fitsio import write_fits_atomic
    from ioi.frame import GAIN_BY_ASICGAIN

    out = Path(args.out)
    names = [out / "fullwell.fits", out / "fullwell_hist.png"]
    _check_outputs(names[:1], args.clobber)
    sig, _, header, _ = _median_signal(args.ramp_dir, runs=args.runs)
    res = full_well(sig)
    gain = args.gain
    if gain is None and "ASICGAIN" in header:
        gain = GAIN_BY_ASICGAIN.get(int(header["ASICGAIN"]))
    hdr = fits.Header()
    hdr["BUNIT"] = "ADU"
    hdr["FWGAIN"] = (gain if gain is not None else -1.0, "e-/ADU used for ELECTRONS (-1: none)")
    hdus = [fits.PrimaryHDU(res.depth, header=hdr),
            fits.ImageHDU(res.depth * np.float32(gain if gain else np.nan), name="ELECTRONS"),
            fits.ImageHDU(res.reached.astype(np.uint8), name="REACHED")]
    write_fits_atomic(names[0], fits.HDUList(hdus), overwrite=True)
    good = res.depth[res.reached & np.isfinite(res.depth)]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if good.size:
        ax.hist(good, bins=100)
    ax.set(xlabel="full well (ADU)", ylabel="pixels", title=f"{good.size} pixels reached saturation")
    fig.savefig(names[1], dpi=80)
    plt.close(fig)
    if good.size:
        q = np.percentile(good, [5, 50, 95])
        e = f"; median {q[1] * gain:.0f} e-" if gain else ""
        print(f"full well: {good.size} of {res.depth.size} pixels saturated; ADU 5/50/95 %: "
              f"{q[0]:.0f} / {q[1]:.0f} / {q[2]:.0f}{e}; wrote {names[0]}")
    else:
        print(f"full well: no pixel reached saturation (depths are lower limits); wrote {names[0]}")
    return 0
