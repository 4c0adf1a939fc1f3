"""Tests of the IO:I simulator against its own recorded truth, at size 256."""

from __future__ import annotations

import configparser
import datetime as dt
import json

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from ioi import _simphysics as phys
from ioi.errors import IoiError
from ioi.simulate import FRMTIME, SIZE_CHOICES, SimulationResult, read_schedule, simulate

SIZE = 256
M = SIZE - 8
B = 4
REQUIRED_KEYS = (
    "NOUTPUTS", "INTTIME", "FRMTIME", "SEQNUM_R", "SEQNUM_M", "SEQNUM_N", "SEQNNAME", "ACQTIME",
    "ACQTIME1", "ASICGAIN", "EXPTIME", "OBJECT", "FILTER1", "RA", "DEC", "INSTRUME", "DATE-OBS",
    "CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CD1_1", "CD1_2", "CD2_1", "CD2_2",
)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """Fowler 2, two dithers, cosmic rays, short UTR ramps."""
    out = tmp_path_factory.mktemp("sim")
    calls = []
    res = simulate(out, seed=5, dithers=2, size=SIZE, utr=True, utr_runs=2, utr_reads=6,
                   utr_interval=20.0, progress=lambda d, t, w: calls.append((d, t, w)))
    return res, calls


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """No cosmic rays, a small rotation and scale change; 3 dithers."""
    out = tmp_path_factory.mktemp("clean")
    return simulate(out, seed=9, dithers=3, size=SIZE, cosmic_rays=False, rotation_deg=0.8, scale=1.004)


def _raw(path):
    return fits.getdata(path).astype(np.float64)


def _truth(res):
    return json.loads((res.truth_dir / "truth.json").read_text())


def _inverse_nonlinear(obs, beta):
    """Linear signal from observed: the exact root of O = L (1 - beta L)."""
    return (1.0 - np.sqrt(np.clip(1.0 - 4.0 * beta * obs, 0.0, None))) / (2.0 * beta)


# ----------------------------------------------------------------------------- files and headers

def test_size_choices():
    assert SIZE_CHOICES == (256, 512, 1024, 2048)


def test_raw_file_names_and_headers(sim):
    res, _ = sim
    assert isinstance(res, SimulationResult)
    names = sorted(p.name for p in res.raw_dir.iterdir())
    expected = sorted(f"i_e_20150227_1_{d}_{e}_0.fits" for d in (1, 2) for e in (1, 2, 3, 4))
    assert names == expected
    assert sorted(p.name for p in res.raw_files) == expected
    groups = {1: (1, 1), 2: (1, 2), 3: (2, 1), 4: (2, 2)}
    for path in res.raw_files:
        exposure = int(path.name.split("_")[5])
        with fits.open(path, do_not_scale_image_data=True) as hdul:
            hdr = hdul[0].header
            assert hdr["BITPIX"] == 16 and hdr["BZERO"] == 32768 and hdul[0].data.dtype.kind == "i"
        for key in REQUIRED_KEYS:
            assert key in hdr, f"{key} missing from {path.name}"
        assert hdr["NAXIS1"] == hdr["NAXIS2"] == SIZE
        assert (hdr["SEQNUM_M"], hdr["SEQNUM_N"]) == groups[exposure]
        assert hdr["SEQNUM_R"] == 1 and hdr["NOUTPUTS"] == 32 and hdr["ASICGAIN"] == 10
        assert "dB" in hdr.comments["ASICGAIN"]
        assert hdr["INSTRUME"] == "IO:I" and hdr["FILTER1"] == "H" and hdr["FRMTIME"] == FRMTIME
        want_t = [1.4, 2.8, 11.4, 12.8][exposure - 1]
        assert hdr["INTTIME"] == pytest.approx(want_t)
        # ACQTIME (JD) and ACQTIME1 (text) are the same instant, to 1 ms.
        t1 = dt.datetime.strptime(hdr["ACQTIME1"], "%Y-%m-%d-%H:%M:%S.%f").replace(tzinfo=dt.timezone.utc)
        jd = 2440587.5 + t1.timestamp() / 86400.0
        assert abs(jd - hdr["ACQTIME"]) * 86400 < 1e-3
        assert ":" in hdr["RA"] and hdr["DEC"][0] in "+-"
        data = fits.getdata(path)
        assert data.dtype == np.uint16 and data.shape == (SIZE, SIZE)


def test_reads_are_spaced_in_time_and_dithers_follow(sim):
    res, _ = sim
    acq = [fits.getheader(p)["ACQTIME"] for p in res.raw_files]
    assert np.all(np.diff(acq) > 0)
    inttime = [fits.getheader(p)["INTTIME"] for p in res.raw_files]
    assert np.allclose(np.diff(acq)[:3] * 86400, np.diff(inttime)[:3], atol=1e-3)


@pytest.mark.parametrize(
    "mode,nreads,groups",
    [("cds", None, [(1, 1), (2, 1)]), ("utr", 5, [(1, n) for n in range(1, 6)])],
)
def test_other_read_modes(tmp_path, mode, nreads, groups):
    res = simulate(tmp_path, seed=2, dithers=1, size=SIZE, mode=mode, nreads=nreads, exptime=10.0)
    assert len(res.raw_files) == len(groups)
    hdrs = [fits.getheader(p) for p in res.raw_files]
    assert [(h["SEQNUM_M"], h["SEQNUM_N"]) for h in hdrs] == groups
    t = [h["INTTIME"] for h in hdrs]
    assert t[0] == pytest.approx(FRMTIME) and t[-1] == pytest.approx(10.0 + FRMTIME)
    assert np.allclose(np.diff(t), np.diff(t)[0])
    ini = configparser.ConfigParser(inline_comment_prefixes=(";",))
    ini.read(res.pipeline_ini)
    assert ini["frame_combination"]["method"] == mode.upper()


def test_read_schedule_fowler():
    s = read_schedule("fowler", fowler_pairs=3, exptime=20.0)
    assert [(m, n) for _, m, n in s] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert [t for t, _, _ in s] == pytest.approx([1.4, 2.8, 4.2, 21.4, 22.8, 24.2])


@pytest.mark.parametrize("kwargs", [{"size": 300}, {"mode": "ramp"}, {"noutputs": 3}, {"dithers": 0},
                                    {"date": "2015-02-27"}, {"asicgain": 99}])
def test_bad_arguments_raise(tmp_path, kwargs):
    args = {"size": SIZE, "dithers": 1} | kwargs
    with pytest.raises(IoiError):
        simulate(tmp_path, **args)


def test_progress_called_once_per_file(sim):
    res, calls = sim
    files = [p for p in res.out_dir.rglob("*") if p.is_file()]
    assert len(calls) == len(files)
    assert [c[0] for c in calls] == list(range(1, len(files) + 1))
    assert all(c[1] == len(files) for c in calls)
    assert sorted(c[2] for c in calls) == sorted(p.name for p in files)


# ----------------------------------------------------------------------------- physics

def test_reference_border_sees_no_light(tmp_path):
    """The border is identical whatever the sky and exposure; the interior is not."""
    a = simulate(tmp_path / "a", seed=8, dithers=1, size=SIZE, exptime=5.0, cosmic_rays=False)
    b = simulate(tmp_path / "b", seed=8, dithers=1, size=SIZE, exptime=60.0, cosmic_rays=False)
    border = np.ones((SIZE, SIZE), bool)
    border[B:-B, B:-B] = False
    for pa, pb in zip(a.raw_files, b.raw_files):
        ra, rb = _raw(pa), _raw(pb)
        assert np.array_equal(ra[border], rb[border])
    # ...while the last read's interior got about 55 s x sky more signal in b.
    sky_adu_s = _truth(b)["sky"][0]["mean_adu_s"]
    gain = np.median(_raw(b.raw_files[-1])[B:-B, B:-B] - _raw(a.raw_files[-1])[B:-B, B:-B])
    assert gain > 0.8 * 55.0 * sky_adu_s
    # The border's last-minus-first difference is offsets and noise only (tens of ADU, not sky).
    d = _raw(b.raw_files[-1]) - _raw(b.raw_files[0])
    assert abs(np.median(d[border])) < 300 < 0.1 * 60 * sky_adu_s


def _isolated_bright(stars, *, m=M, margin=44, fmin=2e4, peak_max=30000.0, badpix=None):
    """Rows of a dither's star table: unsaturated, bright, isolated, far from the edges, no bad pixels."""
    out = []
    for row in stars:
        if not row["on_chip"] or row["saturated"] or row["flux_e_s"] < fmin or row["peak_adu"] > peak_max:
            continue
        x, y = row["x"], row["y"]
        if not (margin <= x <= m - 1 - margin and margin <= y <= m - 1 - margin):
            continue
        # no other stamp (33 x 33 px around the rounded centre) overlaps this star's stamp
        others = stars["id"] != row["id"]
        dxo = np.abs(np.rint(stars["x"]) - np.rint(x))
        dyo = np.abs(np.rint(stars["y"]) - np.rint(y))
        if (others & (dxo <= 32) & (dyo <= 32)).any():
            continue
        x0, y0 = int(np.rint(x)), int(np.rint(y))
        if badpix is not None and (badpix[y0 - 16:y0 + 17, x0 - 16:x0 + 17] & 7).any():
            continue
        out.append(row)
    return out


def _sky_model(truth, k):
    s = truth["sky"][k - 1]
    yy, xx = np.mgrid[0:M, 0:M] / (M - 1) - 0.5
    return s["mean_e_s"] * (1 + s["gradient_x"] * xx + s["gradient_y"] * yy)


def test_star_flux_noise_free(clean):
    """The truth rate image holds each star's catalogue flux, times the flat, in its stamp."""
    truth = _truth(clean)
    g = truth["gain_true"]
    flat = fits.getdata(clean.truth_dir / "flat.fits").astype(np.float64)
    dark = fits.getdata(clean.truth_dir / "dark.fits").astype(np.float64)
    badpix = fits.getdata(clean.truth_dir / "badpix.fits")
    checked = 0
    for k in (1, 2, 3):
        rate = fits.getdata(clean.truth_dir / f"rate_d{k}.fits").astype(np.float64)
        stars = Table.read(clean.truth_dir / f"stars_d{k}.ecsv")
        star_only = (rate * g - dark) / np.where(flat > 0.35, flat, np.nan) - _sky_model(truth, k)
        for row in _isolated_bright(stars, badpix=badpix, fmin=1e3, peak_max=1e9, margin=16):
            x0, y0 = int(np.rint(row["x"])), int(np.rint(row["y"]))
            box = star_only[y0 - 16:y0 + 17, x0 - 16:x0 + 17]
            assert np.nansum(box) == pytest.approx(row["flux_e_s"], rel=2e-4, abs=0.5)
            # and the brightest pixel is at the catalogue position
            iy, ix = np.unravel_index(np.nanargmax(box), box.shape)
            assert abs(x0 - 16 + ix - row["x"]) <= 1 and abs(y0 - 16 + iy - row["y"]) <= 1
            checked += 1
    assert checked >= 1


def test_star_flux_noise_free_whole_frame(clean):
    """Over the whole frame, the stars' charge is the catalogue flux of the stamps on chip."""
    truth = _truth(clean)
    g = truth["gain_true"]
    flat = fits.getdata(clean.truth_dir / "flat.fits").astype(np.float64)
    dark = fits.getdata(clean.truth_dir / "dark.fits").astype(np.float64)
    for k in (1, 2, 3):
        rate = fits.getdata(clean.truth_dir / f"rate_d{k}.fits").astype(np.float64)
        stars = Table.read(clean.truth_dir / f"stars_d{k}.ecsv")
        star_e = rate * g - dark - _sky_model(truth, k) * flat  # stars x flat, e-/s
        good = flat > 0.35
        total = np.sum(star_e[good] / flat[good])
        xr, yr = np.rint(stars["x"]), np.rint(stars["y"])
        inside = (xr - 16 >= 0) & (xr + 16 < M) & (yr - 16 >= 0) & (yr + 16 < M)
        touching = (xr + 16 >= 0) & (xr - 16 < M) & (yr + 16 >= 0) & (yr - 16 < M)
        low = stars["flux_e_s"][inside].sum()
        high = stars["flux_e_s"][touching].sum()
        # the flux that falls on low-response or dead pixels is left out of ``total``
        lost = np.sum(np.abs(star_e[~good]) / np.maximum(flat[~good], 1e-3))
        assert low * (1 - 1e-4) - lost <= total <= high * (1 + 1e-4)
        assert total > 0.5 * low > 0


def _linear_diff(res, k):
    """(last - first) read of dither k in linear ADU, stripped; bias removed, nonlinearity undone."""
    bias = fits.getdata(res.truth_dir / "bias.fits").astype(np.float64)[B:-B, B:-B]
    beta = fits.getdata(res.truth_dir / "nonlin_beta.fits").astype(np.float64)
    files = [p for p in res.raw_files if p.name.split("_")[4] == str(k)]
    first = _inverse_nonlinear(_raw(files[0])[B:-B, B:-B] - bias, beta)
    last = _inverse_nonlinear(_raw(files[-1])[B:-B, B:-B] - bias, beta)
    return last - first


def _bright_stars(stars, badpix, *, fmin=2e4, margin=20):
    x0, y0 = np.rint(stars["x"]).astype(int), np.rint(stars["y"]).astype(int)
    ok = (stars["on_chip"] & ~stars["saturated"] & (stars["flux_e_s"] >= fmin) & (stars["peak_adu"] < 30000)
          & (x0 >= margin) & (x0 < M - margin) & (y0 >= margin) & (y0 < M - margin))
    return [r for r, keep, xx, yy in zip(stars, ok, x0, y0)
            if keep and not (badpix[yy - 16:yy + 17, xx - 16:xx + 17] & 7).any()]


def _column_offsets(resid, x0, y0):
    """Per-column offset of a residual image near (x0, y0): median over up to 81 rows."""
    rows = slice(max(y0 - 40, 0), min(y0 + 41, M))
    return np.nanmedian(resid[rows, x0 - 16:x0 + 17], axis=0)


def test_star_flux_in_raw_reads(clean):
    """From the raw reads (bias, flat, beta known), each star's charge matches the truth within noise."""
    truth = _truth(clean)
    g, rn = truth["gain_true"], truth["read_noise_adu"]
    flat = fits.getdata(clean.truth_dir / "flat.fits").astype(np.float64)
    dark = fits.getdata(clean.truth_dir / "dark.fits").astype(np.float64)
    badpix = fits.getdata(clean.truth_dir / "badpix.fits")
    times = truth["read_times"]
    dt_s = times[-1] - times[0]
    checked = 0
    for k in (1, 2, 3):
        diff = _linear_diff(clean, k)
        rate = fits.getdata(clean.truth_dir / f"rate_d{k}.fits").astype(np.float64)
        resid = np.where(badpix & 7, np.nan, diff - rate * dt_s)  # noise + per-read column offsets
        background = (_sky_model(truth, k) * flat + dark) * dt_s / g  # ADU, no stars
        star_truth = rate * dt_s - background  # stars x flat, ADU
        for row in _bright_stars(Table.read(clean.truth_dir / f"stars_d{k}.ecsv"), badpix):
            x0, y0 = int(np.rint(row["x"])), int(np.rint(row["y"]))
            box = np.s_[y0 - 16:y0 + 17, x0 - 16:x0 + 17]
            off = _column_offsets(resid, x0, y0)
            measured = np.sum((diff[box] - off[None, :] - background[box]) / flat[box])
            expected = np.sum(star_truth[box] / flat[box])
            npix = 33 * 33
            sky_adu = truth["sky"][k - 1]["mean_adu_s"] * dt_s
            pix_var = 2 * rn**2 + sky_adu / g
            var = (expected / g  # star photons, ADU^2
                   + npix * pix_var  # read noise of two reads, sky photons
                   + 33 * npix * 1.25**2 * pix_var / 81  # the column offsets' medians
                   + (2 * truth["one_over_f_rms_adu"] * npix) ** 2 / 2)  # 1/f, half coherent over the box
            assert abs(measured - expected) < 5 * np.sqrt(var), (row["id"], measured, expected, np.sqrt(var))
            assert expected == pytest.approx(row["flux_e_s"] * dt_s / g, rel=0.5)  # mostly this star
            checked += 1
    assert checked >= 2


def _centroid(img, x, y, *, sigma=2.5, half=16, niter=30):
    """Gaussian-windowed centroid (iterated, as SExtractor's XWIN), unbiased for a symmetric star."""
    x0, y0 = int(np.rint(x)), int(np.rint(y))
    yy, xx = np.mgrid[y0 - half:y0 + half + 1, x0 - half:x0 + half + 1].astype(float)
    cut = img[y0 - half:y0 + half + 1, x0 - half:x0 + half + 1]
    xc, yc = float(x0), float(y0)
    for _ in range(niter):
        w = np.exp(-((xx - xc) ** 2 + (yy - yc) ** 2) / (2 * sigma**2)) * cut
        xc, yc = xc + 2 * (w * (xx - xc)).sum() / w.sum(), yc + 2 * (w * (yy - yc)).sum() / w.sum()
    return xc, yc


def test_star_positions_in_stripped_coordinates(clean):
    """Centroids in the last-minus-first difference sit at the catalogue (x, y) within 0.1 px.

    The other stars and the sky are removed with the truth rate image less
    this star's own stamp, so that blends do not pull the centroid.
    """
    truth = _truth(clean)
    g = truth["gain_true"]
    flat = fits.getdata(clean.truth_dir / "flat.fits").astype(np.float64)
    badpix = fits.getdata(clean.truth_dir / "badpix.fits")
    times = truth["read_times"]
    dt_s = times[-1] - times[0]
    mof = truth["moffat"]
    checked = 0
    for k in (1, 2, 3):
        diff = _linear_diff(clean, k)
        rate = fits.getdata(clean.truth_dir / f"rate_d{k}.fits").astype(np.float64)
        resid = np.where(badpix & 7, np.nan, diff - rate * dt_s)
        for row in _bright_stars(Table.read(clean.truth_dir / f"stars_d{k}.ecsv"), badpix):
            x0, y0 = int(np.rint(row["x"])), int(np.rint(row["y"]))
            own, _ = phys.render_stars([row["x"]], [row["y"]], [row["flux_e_s"]], (M, M),
                                       fwhm=mof["fwhm"], beta=mof["beta"])
            others = rate * dt_s - own * flat * dt_s / g
            img = diff - others
            img[:, x0 - 16:x0 + 17] -= _column_offsets(resid, x0, y0)[None, :]
            xc, yc = _centroid(np.nan_to_num(img), row["x"], row["y"])
            assert abs(xc - row["x"]) < 0.1 and abs(yc - row["y"]) < 0.1, (k, row["id"], xc, yc)
            checked += 1
    assert checked >= 2


def test_dither_transforms_and_wcs(clean):
    truth = _truth(clean)
    ref = Table.read(clean.truth_dir / "stars.ecsv")
    w1 = WCS(fits.getheader(clean.raw_files[0]))
    for tr in truth["transforms"]:
        k = tr["dither"]
        a = np.array(tr["affine"])
        stars = Table.read(clean.truth_dir / f"stars_d{k}.ecsv")
        x = a[0, 0] * ref["x_ref"] + a[0, 1] * ref["y_ref"] + a[0, 2]
        y = a[1, 0] * ref["x_ref"] + a[1, 1] * ref["y_ref"] + a[1, 2]
        np.testing.assert_allclose(stars["x"], x, atol=1e-9)
        np.testing.assert_allclose(stars["y"], y, atol=1e-9)
        rot = np.degrees(np.arctan2(a[1, 0], a[0, 0]))
        assert rot == pytest.approx(tr["rotation_deg"], abs=1e-9)
        assert np.hypot(a[0, 0], a[1, 0]) == pytest.approx(tr["scale"], abs=1e-12)
        if k > 1:
            assert 40 - 2 <= np.hypot(tr["dx"], tr["dy"]) <= 120 * np.sqrt(2) + 2
        # The header WCS of dither k puts each star at the same sky position as dither 1's WCS.
        wk = WCS(fits.getheader(next(p for p in clean.raw_files if p.name.split("_")[4] == str(k))))
        ra1, de1 = w1.all_pix2world(ref["x_ref"] + B + 1, ref["y_ref"] + B + 1, 1)
        rak, dek = wk.all_pix2world(stars["x"] + B + 1, stars["y"] + B + 1, 1)
        sep = np.hypot((rak - ra1) * np.cos(np.radians(de1)), dek - de1) * 3600
        assert sep.max() < 1e-4
    assert truth["transforms"][-1]["rotation_deg"] == pytest.approx(0.8)
    assert truth["transforms"][-1]["scale"] == pytest.approx(1.004)
    ini = configparser.ConfigParser(inline_comment_prefixes=(";",))
    ini.read(clean.pipeline_ini)
    assert ini["registration"]["fit_geometry"] == "RSCALE"


def test_cosmic_rays_are_jumps_between_recorded_reads(sim):
    res, _ = sim
    truth = _truth(res)
    g = truth["gain_true"]
    times = np.array(truth["read_times"])
    crs = Table.read(res.truth_dir / "cosmic_rays.ecsv")
    assert len(crs) > 0
    assert set(crs.colnames) >= {"dither", "x", "y", "read_index", "charge_e"}
    per_hit = crs.group_by(["dither", "cr_id"])["charge_e"].groups.aggregate(np.sum)
    assert crs["charge_e"].min() > 0 and 500 <= per_hit.min() and per_hit.max() <= 20000
    assert len(per_hit) > 0.5 * 300 * 2 * (M / 2048) ** 2  # a few hundred per dither per 2048^2
    checked = 0
    for k in (1, 2):
        rate = fits.getdata(res.truth_dir / f"rate_d{k}.fits").astype(np.float64)
        files = [p for p in res.raw_files if p.name.split("_")[4] == str(k)]
        reads = np.array([_raw(p)[B:-B, B:-B] for p in files])
        mine = crs[crs["dither"] == k]
        # several hits on one pixel would add up: keep single hits
        pix, counts = np.unique(np.asarray(mine["y"]) * M + np.asarray(mine["x"]), return_counts=True)
        single = set(pix[counts == 1].tolist())
        for row in mine:
            j, x, y, q = int(row["read_index"]), int(row["x"]), int(row["y"]), float(row["charge_e"])
            if j == 0 or q < 2000 or y * M + x not in single or rate[y, x] > 1.5 * np.median(rate):
                continue
            if not 10 <= y < M - 10:
                continue
            steps = []
            for i in range(1, len(files)):
                resid = reads[i] - reads[i - 1] - rate * (times[i] - times[i - 1])
                col = np.median(resid[y - 10:y + 11, x])  # this read's column offset
                steps.append(resid[y, x] - col)
            steps = np.array(steps)
            assert steps[j - 1] == pytest.approx(q / g, rel=0.1, abs=150), (row, steps)
            others = np.delete(steps, j - 1)
            assert np.all(np.abs(others) < 150), (row, steps)
            checked += 1
    assert checked >= 3


def test_no_cosmic_rays_when_disabled(clean):
    assert len(Table.read(clean.truth_dir / "cosmic_rays.ecsv")) == 0


def test_utr_ramps(sim):
    res, _ = sim
    truth = _truth(res)
    names = sorted(p.name for p in res.utr_dir.iterdir())
    assert names == sorted(f"H2RG_R{r:02d}_M01_N{n:02d}.fits" for r in (1, 2) for n in range(1, 7))
    g = truth["gain_true"]
    bias = fits.getdata(res.truth_dir / "bias.fits").astype(np.float64)
    beta = fits.getdata(res.truth_dir / "nonlin_beta.fits").astype(np.float64)
    flat = fits.getdata(res.truth_dir / "flat.fits").astype(np.float64)
    badpix = fits.getdata(res.truth_dir / "badpix.fits")
    rate = truth["utr"]["illumination_adu_s"] * flat + truth["dark_e_s"] / g
    good = badpix == 0
    for p in res.utr_files:
        hdr = fits.getheader(p)
        run, n = int(p.name[6:8]), int(p.name[-7:-5])
        assert (hdr["SEQNUM_R"], hdr["SEQNUM_M"], hdr["SEQNUM_N"]) == (run, 1, n)
        assert hdr["INTTIME"] == pytest.approx(20.0 * n)
        for key in REQUIRED_KEYS:
            assert key in hdr
        raw = _raw(p)
        # per-column offset of this read from the reference rows (drift along rows is tens of ADU)
        col = np.median((raw - bias)[np.r_[0:4, SIZE - 4:SIZE], :], axis=0)
        obs = (raw - bias - col[None, :])[B:-B, B:-B]
        lin = rate * hdr["INTTIME"]
        pred = lin * (1 - beta * lin)
        unsat = good & (raw[B:-B, B:-B] < 65535) & (lin < 45000)
        resid = np.median((obs - pred)[unsat])
        assert abs(resid) < 40, (p.name, resid)  # nonlinearity there is up to ~2000 ADU
        if n == 6:
            assert np.median(obs[good]) > 40000  # crosses 40000 ADU
            assert (raw == 65535).sum() > 0  # the top of the ramp saturates
            assert np.all(raw[B:-B, B:-B][bias[B:-B, B:-B] + pred > 65535 + 500] == 65535)


def test_calibration_files(sim):
    res, _ = sim
    cal = res.calibration_files
    flat_t = fits.getdata(res.truth_dir / "flat.fits")
    badpix = fits.getdata(res.truth_dir / "badpix.fits")
    beta = fits.getdata(res.truth_dir / "nonlin_beta.fits")
    flat = fits.getdata(cal["flat"])
    flat_bad = fits.getdata(cal["flat_bad"])
    lin_bad = fits.getdata(cal["lin_bad"])
    for arr in (flat, flat_bad, lin_bad, flat_t, beta, badpix):
        assert arr.shape == (M, M)
    assert flat.dtype.kind == "f" and flat_bad.dtype.kind == "f"
    outside = (flat_t < 0.35) | (flat_t > 2.0)
    assert np.all(flat[outside] == 1.0)
    np.testing.assert_allclose(flat[~outside], flat_t[~outside], rtol=0.002 * 6)
    assert np.nanmean(flat_t[~outside]) == pytest.approx(1.0, abs=1e-3)
    for mask in (flat_bad, lin_bad):
        assert np.all(np.isnan(mask) | (mask == 1.0))
    np.testing.assert_array_equal(np.isnan(flat_bad), outside | ((badpix & 2) > 0))
    np.testing.assert_array_equal(np.isnan(lin_bad), (badpix & (1 | 2 | 8)) > 0)
    assert ((badpix & 4) > 0).sum() > 0 and ((badpix & 1) > 0).sum() > 0
    with fits.open(cal["lin_coeffs"]) as hdul:
        assert len(hdul) == 4
        for h in hdul:
            assert h.data.shape == (M, M)
        np.testing.assert_array_equal(hdul[0].data, 0.0)
        np.testing.assert_array_equal(hdul[1].data, 1.0)
        np.testing.assert_allclose(hdul[2].data, beta, rtol=1e-6)
        # the series maps observed back to linear to < 0.1 % over 0-40000 ADU for good pixels
        lin = np.linspace(0, 40000, 9)[:, None]
        b = beta[(badpix == 0)][:200][None, :]
        obs = lin * (1 - b * lin)
        back = sum(h.data[(badpix == 0)][:200][None, :] * obs**i for i, h in enumerate(hdul))
        np.testing.assert_allclose(back, lin * np.ones_like(b), rtol=1e-3, atol=0.5)


def test_ini_files(sim):
    res, _ = sim
    paths = configparser.ConfigParser(inline_comment_prefixes=(";",))
    paths.read(res.paths_ini)
    base = paths["general"]["path_base"]
    assert base == str(res.out_dir.resolve())
    conf = paths["general"]["path_config"]
    for sec, key in (("flatfielding", "path_flatfielding_corrections"),
                     ("nonlinearity_corrections", "path_nonlinearity_corrections")):
        for fkey in ("coeff_filename", "bad_pix_filename"):
            p = res.out_dir.resolve() / conf / paths[sec][key] / paths[sec][fkey]
            assert p.is_file(), p
    assert {"path_man", "path_src"} <= set(paths["general"])
    text = res.pipeline_ini.read_text()
    assert "; " in text  # trailing comments the parser must cope with
    pipe = configparser.ConfigParser(inline_comment_prefixes=(";",))
    pipe.read(res.pipeline_ini)
    want = {
        "general": {"write_output": "1"},
        "reference_subtraction": {"method": "RAMP"},
        "frame_combination": {"method": "FOWLER", "fowler_pairs": "2", "fowler_bodge": "0"},
        "nonlinearity_corrections": {"order": "3"},
        "flatfielding": {},
        "bad_pix_masking": {"which": "FLAT,LIN", "bad_post_register_threshold": "20"},
        "sky_subtraction": {"smoothing_box_size": "5", "bg_sigma_clip": "3", "peers_only": "1",
                            "make_algorithm": "MEDIAN", "max_robust_iterations": "50",
                            "max_robust_unsolved_percentage": "1"},
        "registration": {"fit_geometry": "SHIFT", "registration_algorithm": "SCIPY", "use_sexconfig": "0",
                         "sexconfig_filename": "registration.sex", "do_bad_region": "0",
                         "bad_region1": "0:0,0:0", "bad_region2": "0:0,0:0"},
        "stacking": {"method": "MEAN"},
    }
    for sec, keys in want.items():
        assert sec in pipe, sec
        if sec != "general":
            assert (pipe[sec]["do"], pipe[sec]["hard"], pipe[sec]["quit"]) == ("1", "0", "0")
        for key, value in keys.items():
            assert pipe[sec][key] == value, (sec, key)


def test_truth_files(sim):
    res, _ = sim
    truth = _truth(res)
    for key in ("seed", "size", "dithers", "mode", "exptime", "read_times", "noutputs", "asicgain",
                "gain_true", "gain_nominal", "read_noise_adu", "one_over_f_rms_adu", "dark_e_s", "sky",
                "transforms", "moffat", "saturation_adu", "nonlinearity"):
        assert key in truth
    assert truth["gain_nominal"] == 2.12 and truth["gain_true"] != truth["gain_nominal"]
    assert 15 <= truth["read_noise_adu"] <= 20
    for k in (1, 2):
        stars = Table.read(res.truth_dir / f"stars_d{k}.ecsv")
        assert set(stars.colnames) >= {"id", "x", "y", "flux_e_s", "flux_adu_s", "peak_adu", "saturated", "on_chip"}
        assert stars["saturated"].dtype == bool
    assert 300 <= truth["sky"][0]["mean_e_s"] <= 800
    assert (res.truth_dir / "rate_d2.fits").is_file()
    assert Table.read(res.truth_dir / "stars.ecsv").colnames == ["id", "x_ref", "y_ref", "flux_e_s"]


def test_saturated_stars_clip_at_adc_max(sim):
    res, _ = sim
    stars = Table.read(res.truth_dir / "stars_d1.ecsv")
    raw = _raw(res.raw_files[3])[B:-B, B:-B]
    sat = stars[stars["saturated"] & stars["on_chip"]]
    unsat = stars[~stars["saturated"] & stars["on_chip"] & (stars["peak_adu"] < 20000)]
    for row in sat:
        x0, y0 = int(np.rint(row["x"])), int(np.rint(row["y"]))
        assert raw[max(y0 - 2, 0):y0 + 3, max(x0 - 2, 0):x0 + 3].max() == 65535
    for row in unsat:
        x0, y0 = int(np.rint(row["x"])), int(np.rint(row["y"]))
        assert raw[y0, x0] < 65535 or x0 < 0
    assert raw.max() <= 65535 and raw.min() >= 0


# ----------------------------------------------------------------------------- determinism

def test_same_seed_identical_files_and_different_seed_differs(tmp_path):
    kw = dict(dithers=2, size=SIZE, fowler_pairs=1)
    a = simulate(tmp_path / "a", seed=21, **kw)
    b = simulate(tmp_path / "b", seed=21, **kw)
    c = simulate(tmp_path / "c", seed=22, **kw)
    fa = sorted(p.relative_to(a.out_dir) for p in a.out_dir.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b.out_dir) for p in b.out_dir.rglob("*") if p.is_file())
    assert fa == fb
    for rel in fa:
        if rel.name == "paths.ini":  # holds the absolute output directory
            continue
        assert (a.out_dir / rel).read_bytes() == (b.out_dir / rel).read_bytes(), rel
    for pa, pc in zip(a.raw_files, c.raw_files):
        assert pa.name == pc.name
        assert pa.read_bytes() != pc.read_bytes()


# ----------------------------------------------------------------------------- helpers

def test_render_stars_normalisation_and_edge():
    img, peak = phys.render_stars([50.3, 1.0], [40.7, 60.2], [1000.0, 1000.0], (100, 120), fwhm=6.0, beta=3.0)
    assert img.shape == (100, 120) and img.dtype == np.float32
    assert img[20:62, 30:72].sum() == pytest.approx(1000.0, rel=1e-5)
    cut = img[40:82, :20].sum()  # the star at x=1 loses its left part
    assert 500 < cut < 700  # about 1000 x (1 + area fraction right of x=-0.5...) for a Moffat
    assert np.unravel_index(peak[0], img.shape) == (41, 50)
    cx = (img[20:62, 30:72].sum(axis=0) * np.arange(30, 72)).sum() / 1000.0
    cy = (img[20:62, 30:72].sum(axis=1) * np.arange(20, 62)).sum() / 1000.0
    assert cx == pytest.approx(50.3, abs=0.02) and cy == pytest.approx(40.7, abs=0.02)


def test_render_stars_does_not_change_input():
    x, y, f = np.array([10.2, 30.0]), np.array([12.0, 20.5]), np.array([5.0, 7.0])
    copies = (x.copy(), y.copy(), f.copy())
    phys.render_stars(x, y, f, (40, 40), fwhm=5.0, beta=3.0)
    for a, b in zip((x, y, f), copies):
        np.testing.assert_array_equal(a, b)


def test_nonlinear_does_not_change_input():
    sig = np.array([0.0, 1000.0, 40000.0], np.float32)
    beta = np.full(3, 1e-6, np.float32)
    before = sig.copy()
    obs = phys.nonlinear(sig, beta)
    np.testing.assert_array_equal(sig, before)
    assert obs[2] == pytest.approx(40000 * (1 - 0.04), rel=1e-6)  # 4 % low at 40000 ADU


def test_dither_pattern_3x3():
    off = phys.dither_pattern(9, 60.0, np.random.default_rng(0))
    assert np.array_equal(off[0], [0.0, 0.0])
    grid = np.rint(off / 60.0)
    assert sorted(map(tuple, grid.tolist())) == sorted((x, y) for x in (-1.0, 0.0, 1.0) for y in (-1.0, 0.0, 1.0))
    assert np.all(np.abs(off[1:] - grid[1:] * 60) < 1.5)
