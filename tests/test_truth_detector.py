"""End-to-end tests of the detector chain (reference pixels -> L1) against simulator truth.

Issue 3, point 7.  Each test simulates a small data set once (module-scoped
fixtures), runs the pipeline on it, and compares with what the simulator
injected (``truth/``).  Tolerances are derived from the injected noise and
written beside each assertion.

Notes on the truth used:

* ``truth/bias.fits`` is the raw-frame bias INCLUDING the reference border.
  The reference pixels' own bias (a per-pixel scatter of hundreds of ADU) is
  subtracted by every reference method together with the offsets, so the
  truth that a corrected read is compared with is ``refsub(bias)`` (the same
  linear operation applied to the bias frame), not the bare bias.
* ``truth/rate_d<k>.fits`` is ADU/s at the true gain, dark and flat
  included, before nonlinearity; a combined (not flat-fielded) frame should
  equal ``rate x EXPTIME``.
* The simulator draws scene AND noise from one seed (``SeedSequence(seed)``
  spawns every stream), so a repeated simulation with another seed changes
  the scene too: the variance plane is checked within one frame instead
  (pixels of similar true counts, scatter of science - truth vs the mean
  reported variance).
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time

from ioi.calibration import load_calibration
from ioi.cli import main, run_pipe_main
from ioi.config import load_settings
from ioi.discovery import discover
from ioi.frame import DQ
from ioi.pipeline import reduce_multrun
from ioi.simulate import simulate
from ioi.stages import reference

B = 4  # reference border
NOUT = 32


# ----------------------------------------------------------------------------- helpers

def _truth_image(sim, name):
    return fits.getdata(sim.truth_dir / name).astype(np.float64)


def _observed(linear, beta):
    """The simulator's nonlinearity: O = L (1 - beta L)."""
    return linear * (1.0 - beta * linear)


def _cr_mask(sim, dither, shape):
    """True at every pixel hit by a cosmic ray in ``dither`` (any read)."""
    cr = Table.read(sim.truth_dir / "cosmic_rays.ecsv")
    cr = cr[cr["dither"] == dither]
    mask = np.zeros(shape, bool)
    mask[np.asarray(cr["y"], int), np.asarray(cr["x"], int)] = True
    return mask


def _settings(sim):
    return load_settings(pipeline_ini=sim.pipeline_ini, paths_ini=sim.paths_ini)


def _reduce_each_dither(sim, pipe, paths, out_dir):
    """Reduce every dither as its own one-dither multrun (no sky, registration or stack).

    Returns a list of (dither, science, variance, quality, primary header, extension header).
    """
    mr = discover(sim.raw_dir)[0]
    cal = load_calibration(pipe, paths)
    out = []
    for seq in mr.dithers:  # a loop over dithers
        res = reduce_multrun(dataclasses.replace(mr, dithers=(seq,)), pipe, paths, out_dir, calibration=cal)
        (path,) = res.l1_products
        with fits.open(path) as h:
            out.append((seq.dither, h["IM_NONSS"].data.astype(np.float64),
                        h["IM_NONSS_VAR"].data.astype(np.float64), np.asarray(h["IM_NONSS_DQ"].data),
                        h[0].header.copy(), h["IM_NONSS"].header.copy()))
    return out


def _sha(paths):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


# ----------------------------------------------------------------------------- 1. reference subtraction

@pytest.fixture(scope="module")
def refsim(tmp_path_factory):
    """512 x 512, 32 outputs, Fowler-8, two dithers: 32 reads; no cosmic rays."""
    return simulate(tmp_path_factory.mktemp("refsim"), seed=21, dithers=2, fowler_pairs=8, size=512,
                    cosmic_rays=False)


def _reference_residuals(sim, method):
    """Per read, per row quarter and per (output section, column parity): the mean over
    science pixels of refsub(raw) - refsub(bias) - nonlinear(rate x INTTIME).

    Returns (residual (nreads_total, 4, 2*NOUT), pixel noise of each mean (same shape)).
    Pixels: unflagged in the truth, linear signal at the last read below 30000 ADU.
    """
    t = sim.truth
    times = np.asarray(t["read_times"])
    nr, size, m = len(times), t["size"], t["stripped_size"]
    gain = t["gain_true"]
    beta = _truth_image(sim, "nonlin_beta.fits")
    good = _truth_image(sim, "badpix.fits") == 0
    rb = reference.subtract_reference(_truth_image(sim, "bias.fits").astype(np.float32), method=method,
                                      noutputs=NOUT)[B:-B, B:-B].astype(np.float64)
    w = size // NOUT
    cols = np.arange(m) + B
    key = (cols // w) * 2 + cols % 2  # (section, parity) of each stripped column
    quarter = np.minimum(np.arange(m) * 4 // m, 3)
    rn2 = np.repeat(np.asarray(t["read_noise_adu_per_output"]) ** 2, w)[cols]  # per column
    out, noise = [], []
    for d in range(1, t["dithers"] + 1):  # a loop over dithers
        rate = _truth_image(sim, f"rate_d{d}.fits")
        ok = good & (rate * times[-1] < 30000.0)
        raw = np.stack([fits.getdata(p).astype(np.float32) for p in sim.raw_files[(d - 1) * nr:d * nr]])
        rs = reference.subtract_reference(raw, method=method, noutputs=NOUT)[:, B:-B, B:-B]
        for i, ti in enumerate(times):  # a loop over reads
            resid = rs[i].astype(np.float64) - rb - _observed(rate * ti, beta)
            # pixel noise of one pixel in this read: read noise + Poisson of the charge so far
            pvar = rn2[None, :] + rate * ti / gain
            r_sum = np.zeros((4, 2 * NOUT))
            v_sum = np.zeros((4, 2 * NOUT))
            n = np.zeros((4, 2 * NOUT))
            idx = (quarter[:, None] * 2 * NOUT + key[None, :])[ok]
            r_sum.flat[:] = np.bincount(idx, weights=resid[ok], minlength=8 * NOUT)
            v_sum.flat[:] = np.bincount(idx, weights=pvar[ok], minlength=8 * NOUT)
            n.flat[:] = np.bincount(idx, minlength=8 * NOUT)
            out.append(r_sum / n)
            noise.append(np.sqrt(v_sum) / n)
    return np.array(out), np.array(noise)


@pytest.fixture(scope="module")
def ref_residuals(refsim):
    return {m: _reference_residuals(refsim, m) for m in ("RAMP", "CONSTANTOFF", "CONSTANT", "TRIM")}


def _expected_reference_noise(sim):
    """White-noise error of the RAMP line averaged over a section/parity's rows: the mean of the
    bottom and top reference means, rn / sqrt(2 n_ref) with n_ref = 3 rows x (section width / 2)."""
    t = sim.truth
    n_ref = 3 * (t["size"] // NOUT // 2)
    rn = np.asarray(t["read_noise_adu_per_output"])
    return float(np.sqrt(np.mean(rn**2) / (2 * n_ref))), n_ref


def test_reference_ramp_residual_matches_reference_pixel_noise(refsim, ref_residuals, record_property):
    """RAMP leaves no systematic offset; per read it is limited by the few reference pixels.

    * The 1/f noise is common to all outputs (read in parallel), so the mean over all
      sections of each read (the "common mode") carries the 1/f noise of the reference
      rows; the rest (the "differential" part) carries the white noise of the reference
      pixels.  Both are zero-mean; their averages over reads (and sections) are checked
      against 0.2 ADU or 4 standard errors, whichever is larger.
    * The per-read scatter of the differential part, over whole sections (all rows), is
      compared with rn / sqrt(2 n_ref) (plus the small noise of averaging the science
      pixels) within -15 % / +25 % (sampling error of 2048 values is 1.6 %; the 1/f
      noise and the row dependence of the line add a little).
    """
    res, pix_noise = ref_residuals["RAMP"]  # (nreads, 4, 64)
    nreads = res.shape[0]
    per_key = res.mean(axis=1)  # whole sections, all rows (quarters have equal pixel counts within ~1 %)
    common = per_key.mean(axis=1)  # (nreads,)
    diff = per_key - common[:, None]
    # systematic: mean over reads and sections
    common_mean = float(common.mean())
    common_se = float(common.std(ddof=1) / np.sqrt(nreads))
    assert abs(common_mean) < max(0.2, 4 * common_se), (common_mean, common_se)
    # every section and parity: mean over reads, within 4 standard errors (~0.5 ADU each
    # here: 32 reads of ~2.6 ADU differential plus ~2.1 ADU common-mode noise)
    key_sys = per_key.mean(axis=0)
    key_se = per_key.std(axis=0, ddof=1) / np.sqrt(nreads)
    assert np.all(np.abs(key_sys) < np.maximum(0.2, 4 * key_se)), (key_sys, key_se)
    record_property("ramp_max_abs_section_parity_mean_adu", round(float(np.abs(key_sys).max()), 3))
    record_property("ramp_section_parity_se_adu", round(float(np.median(key_se)), 3))
    # row dependence: per quarter, mean over reads and sections of the differential part
    quarter_sys = (res - common[:, None, None]).mean(axis=(0, 2))
    rms_diff = float(diff.std())
    se_quarter = 2 * rms_diff / np.sqrt(diff.size)  # quarters are noisier than whole sections
    assert np.all(np.abs(quarter_sys) < max(0.2, 4 * se_quarter)), (quarter_sys, se_quarter)
    # per-read scatter vs the reference pixels' noise
    expected, n_ref = _expected_reference_noise(refsim)
    pix = float(np.sqrt(np.mean(pix_noise**2)) / 2)  # 4 quarters averaged
    expected_total = float(np.hypot(expected, pix) * np.sqrt(1 - 1 / diff.shape[1]))
    ratio = rms_diff / expected_total
    record_property("ramp_common_mean_adu", round(common_mean, 3))
    record_property("ramp_common_se_adu", round(common_se, 3))
    record_property("ramp_common_rms_per_read_adu", round(float(common.std()), 3))
    record_property("ramp_quarter_systematic_adu", np.round(quarter_sys, 3).tolist())
    record_property("ramp_per_read_rms_adu", round(rms_diff, 3))
    record_property("ramp_per_read_expected_adu", round(expected_total, 3))
    record_property("ramp_n_ref_per_end", n_ref)
    assert 0.85 < ratio < 1.25, (rms_diff, expected_total)


def test_reference_trim_and_constant_leave_the_injected_offsets(ref_residuals, record_property):
    """TRIM subtracts nothing and CONSTANT one level for the whole frame: the per-output and
    parity offsets the simulator injects (fixed +-150 ADU plus ~60 ADU per read) remain,
    far above RAMP's residual.  CONSTANTOFF removes the offsets but not their drift along
    the rows (tens of ADU over the height), so its top-minus-bottom difference is larger."""
    ramp = ref_residuals["RAMP"][0]
    ramp_rms = float(np.sqrt(np.mean(ramp.mean(axis=1) ** 2)))
    for method in ("TRIM", "CONSTANT"):
        res = ref_residuals[method][0].mean(axis=1)  # (nreads, 64)
        diff = res - res.mean(axis=1, keepdims=True)
        rms = float(np.sqrt(np.mean(res**2)))
        record_property(f"{method.lower()}_rms_adu", round(rms, 2))
        assert rms > 10 * ramp_rms, (method, rms, ramp_rms)
        assert float(diff.std()) > 30.0  # offsets between outputs/parities (injected: uniform +-150)
    # drift along rows: top quarter minus bottom quarter, per read and section
    tilt = {m: ref_residuals[m][0][:, 3] - ref_residuals[m][0][:, 0] for m in ("RAMP", "CONSTANTOFF")}
    record_property("ramp_tilt_rms_adu", round(float(tilt["RAMP"].std()), 2))
    record_property("constantoff_tilt_rms_adu", round(float(tilt["CONSTANTOFF"].std()), 2))
    assert tilt["CONSTANTOFF"].std() > 1.5 * tilt["RAMP"].std()


# ----------------------------------------------------------------------------- 2./3. linearity, variance

@pytest.fixture(scope="module")
def fowler(tmp_path_factory):
    """512 x 512, Fowler-2, four dithers, cosmic rays on."""
    return simulate(tmp_path_factory.mktemp("fowler"), seed=7, dithers=4, fowler_pairs=2, size=512)


@pytest.fixture(scope="module")
def combined(fowler, tmp_path_factory):
    """The combined frames (reference RAMP, Fowler, no flat, no masks) with the exact
    linearity form, the original FACTOR form, and no linearity correction.

    Returns {label: (ratio, true counts, pull, EXPTIME of each dither)} over usable pixels: no DQ flag,
    no truth bad-pixel bit, no cosmic ray."""
    pipe, paths = _settings(fowler)
    pipe = pipe.replace("flatfielding", do=False).replace("bad_pix_masking", do=False)
    variants = {
        "DIFFERENCE": pipe,
        "FACTOR": pipe.replace("nonlinearity_corrections", form="FACTOR"),
        "NONE": pipe.replace("nonlinearity_corrections", do=False),
    }
    good = _truth_image(fowler, "badpix.fits") == 0
    out = {}
    for label, p in variants.items():  # a loop over settings
        ratio, true, pull, exptimes = [], [], [], []
        for d, sci, var, dq, hdr, _ in _reduce_each_dither(fowler, p, paths, tmp_path_factory.mktemp(label)):
            rate = _truth_image(fowler, f"rate_d{d}.fits")
            exptimes.append(hdr["EXPTIME"])
            expected = rate * hdr["EXPTIME"]
            ok = (dq == 0) & good & ~_cr_mask(fowler, d, dq.shape)
            ratio.append((sci / expected)[ok])
            true.append(expected[ok])
            pull.append(((sci - expected) / np.sqrt(var))[ok])
        out[label] = (np.concatenate(ratio), np.concatenate(true), np.concatenate(pull), exptimes)
    return out


#: Bins of true counts (ADU).  The sky alone gives ~2300 ADU in 10 s, so no pixel has fewer
#: than ~2000: the lowest bin starts there.  Stars fill the bins above.
COUNT_BINS = ((2000, 3000), (3000, 5000), (5000, 10000), (10000, 20000), (20000, 40000))


def _binned_medians(ratio, true):
    rows = []
    for lo, hi in COUNT_BINS:
        s = (true >= lo) & (true < hi)
        n = int(s.sum())
        med = float(np.median(ratio[s])) if n else float("nan")
        se = float(1.2533 * np.std(ratio[s]) / np.sqrt(n)) if n > 1 else float("inf")  # error of a median
        rows.append((lo, hi, n, med, se))
    return rows


def test_combined_exptime_is_mean_pair_time(combined, fowler):
    t = fowler.truth
    times = np.asarray(t["read_times"])
    n = t["fowler_pairs"]
    pair_time = float(np.mean(times[n:] - times[:n]))
    assert all(e == pytest.approx(pair_time, abs=1e-9) for e in combined["DIFFERENCE"][3])


def test_linearity_corrected_counts_match_truth(combined, record_property):
    """Median of science / (rate x EXPTIME) within 0.3 % of 1 in every bin of true counts.

    Every bin must hold enough pixels for the median's standard error to be below 0.1 %
    (so that 0.3 % is a 3-sigma bound and the test can fail).  The residual at the top is
    expected to be slightly negative (-0.1..-0.3 %): the simulator's coefficient file is
    the inverse series truncated at order 3 (the omitted 5 beta^3 O^4 term)."""
    rows = _binned_medians(*combined["DIFFERENCE"][:2])
    record_property("linearity_difference", [(lo, hi, n, round(med, 5)) for lo, hi, n, med, _ in rows])
    for lo, hi, n, med, se in rows:
        assert se < 1e-3, (lo, hi, n, se)
        assert abs(med - 1.0) < 3e-3, (lo, hi, n, med)


def test_without_linearity_high_counts_are_several_percent_low(combined, record_property):
    """Without correction the observed counts fall short by beta x (signal since reset):
    beta ~ 1e-6, so ~ -2 % at 10000-20000 ADU and -3..-5 % at 20000-40000 ADU."""
    rows = _binned_medians(*combined["NONE"][:2])
    record_property("linearity_none", [(lo, hi, n, round(med, 5)) for lo, hi, n, med, _ in rows])
    assert rows[-1][3] < 0.975
    assert rows[-2][3] < 0.99
    # and the correction really moved them
    corrected = _binned_medians(*combined["DIFFERENCE"][:2])
    assert abs(corrected[-1][3] - 1) < 0.3 * abs(rows[-1][3] - 1)


def test_factor_form_is_biased_low_by_the_pedestal_charge(combined, record_property):
    """The original's FACTOR rule treats the pedestal charge as corrected by the same factor,
    leaving the result short by about c2 x lost = beta x rate x INTTIME(pedestal): for
    20000-40000 ADU in 10 s (rate 2000-4000 ADU/s, pedestals at 1.4 and 2.8 s) that is
    0.3-1.2 %, so FACTOR misses the 0.3 % goal at the top while DIFFERENCE meets it."""
    fac = _binned_medians(*combined["FACTOR"][:2])
    diff = _binned_medians(*combined["DIFFERENCE"][:2])
    record_property("linearity_factor", [(lo, hi, n, round(med, 5)) for lo, hi, n, med, _ in fac])
    assert fac[-1][3] < diff[-1][3] - 2e-3
    assert 0.985 < fac[-1][3] < 0.997


def test_variance_plane_matches_scatter_about_truth(combined, record_property):
    """Within bins of true counts, the empirical variance of science - truth over the mean
    reported variance (= variance of the pulls) is 1 within 10 %.  Asserted for the bins
    whose sampling error sqrt(2/N) is below 3 % (N >= 2200); the others are reported."""
    ratio, true, pull, _ = combined["DIFFERENCE"]
    figures = []
    checked = 0
    for lo, hi in COUNT_BINS:
        s = (true >= lo) & (true < hi)
        n = int(s.sum())
        v = float(np.var(pull[s])) if n > 1 else float("nan")
        figures.append((lo, hi, n, round(v, 4)))
        if n >= 2200:
            checked += 1
            assert abs(v - 1.0) < 0.10, (lo, hi, n, v)
    record_property("variance_ratio_by_bin", figures)
    assert checked >= 2


# ----------------------------------------------------------------------------- 4. up the ramp

@pytest.fixture(scope="module")
def utr(tmp_path_factory):
    """512 x 512, UTR with 10 reads, three dithers (about 55 cosmic rays)."""
    sim = simulate(tmp_path_factory.mktemp("utr"), seed=13, dithers=3, mode="utr", nreads=10, size=512)
    pipe, paths = _settings(sim)
    pipe = pipe.replace("flatfielding", do=False).replace("bad_pix_masking", do=False)
    assert pipe.frame_combination.method == "UTR"
    return sim, _reduce_each_dither(sim, pipe, paths, tmp_path_factory.mktemp("utr_out"))


def test_utr_slopes_are_unbiased(utr, record_property):
    """Median of science / (rate x EXPTIME) within 0.3 % of 1 over unflagged pixels of
    2000-40000 true counts, and in the star bins (standard error < 0.1 % each)."""
    sim, frames = utr
    good = _truth_image(sim, "badpix.fits") == 0
    ratio, true = [], []
    for d, sci, _, dq, hdr, _ in frames:
        expected = _truth_image(sim, f"rate_d{d}.fits") * hdr["EXPTIME"]
        ok = (dq == 0) & good & ~_cr_mask(sim, d, dq.shape)
        ratio.append((sci / expected)[ok])
        true.append(expected[ok])
    ratio, true = np.concatenate(ratio), np.concatenate(true)
    sel = (true >= 2000) & (true < 40000)
    overall = float(np.median(ratio[sel]))
    rows = [(lo, hi, n, round(med, 5)) for lo, hi, n, med, _ in _binned_medians(ratio, true)]
    record_property("utr_median_ratio", round(overall, 5))
    record_property("utr_by_bin", rows)
    assert abs(overall - 1) < 3e-3
    checked = 0
    for lo, hi, n, med, se in _binned_medians(ratio, true):
        if se < 1e-3:  # bins with enough pixels for 0.3 % to be a 3-sigma bound
            checked += 1
            assert abs(med - 1) < 3e-3, (lo, hi, n, med)
    assert checked >= 3


def test_utr_flags_cosmic_rays_and_few_clean_pixels(utr, record_property):
    """At least 95 % of cosmic-ray pixels whose charge exceeds 10 sigma of a read difference
    (and that arrive between the first and last read, in an unsaturated pixel) are flagged
    JUMP_DET; fewer than 0.1 % of clean pixels are."""
    sim, frames = utr
    t = sim.truth
    gain = t["gain_true"]
    times = np.asarray(t["read_times"])
    dt = float(np.diff(times).mean())
    rn = t["read_noise_adu"]
    cr = Table.read(sim.truth_dir / "cosmic_rays.ecsv")
    good = _truth_image(sim, "badpix.fits") == 0
    detected = eligible = 0
    clean_flagged = clean_total = 0
    for d, _, _, dq, _, _ in frames:
        rate = _truth_image(sim, f"rate_d{d}.fits")
        c = cr[cr["dither"] == d]
        x, y = np.asarray(c["x"], int), np.asarray(c["y"], int)
        sigma = np.sqrt(2 * rn**2 + rate[y, x] * dt / gain)
        charge_adu = np.asarray(c["charge_e"]) / gain
        ri = np.asarray(c["read_index"])
        # read_index 0: the hit came before the first read, so there is no jump to see
        sel = (charge_adu > 10 * sigma) & (ri >= 1) & ((dq[y, x] & DQ.SATURATED) == 0)
        eligible += int(sel.sum())
        detected += int(((dq[y[sel], x[sel]] & DQ.JUMP_DET) != 0).sum())
        hit = _cr_mask(sim, d, dq.shape)
        clean = good & ~hit & ((dq & DQ.SATURATED) == 0)
        clean_total += int(clean.sum())
        clean_flagged += int(((dq & DQ.JUMP_DET) != 0)[clean].sum())
    record_property("utr_cr_detected", f"{detected}/{eligible}")
    record_property("utr_clean_false_jumps", f"{clean_flagged}/{clean_total}")
    assert eligible >= 40
    assert detected >= 0.95 * eligible
    assert clean_flagged < 1e-3 * clean_total


# ----------------------------------------------------------------------------- 5. error paths

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """256 x 256, Fowler-2, one dither: the data set the error paths and products use."""
    return simulate(tmp_path_factory.mktemp("small"), seed=3, dithers=1, fowler_pairs=2, size=256)


def _copy(sim, dest):
    """A private copy of the simulated data set whose paths.ini points at the copy."""
    shutil.copytree(sim.out_dir, dest)
    paths_ini = dest / "config" / "paths.ini"
    text = paths_ini.read_text().replace(f"path_base = {sim.out_dir.resolve()}", f"path_base = {dest.resolve()}")
    paths_ini.write_text(text)
    return dest


def _set_ini(path, section, key, value):
    lines = path.read_text().splitlines()
    out, current, done = [], None, False
    for line in lines:
        s = line.strip()
        if s.startswith("["):
            current = s.strip("[]")
        elif current == section and s.split("=")[0].strip() == key:
            line = f"{key} = {value}"
            done = True
        out.append(line)
    assert done, (section, key)
    path.write_text("\n".join(out) + "\n")


def _with_header(path, **changes):
    with fits.open(path) as h:
        data = h[0].data.copy()
        hdr = h[0].header.copy()
    for k, v in changes.items():
        if v is None:
            del hdr[k]
        else:
            hdr[k] = v
    fits.PrimaryHDU(data, header=hdr).writeto(path, overwrite=True)


def _shrink(path, n=100):
    """Rewrite an image or multi-extension cube at n x n."""
    with fits.open(path) as h:
        hdus = [fits.PrimaryHDU(h[0].data[:n, :n].copy())] + [fits.ImageHDU(x.data[:n, :n].copy()) for x in h[1:]]
    fits.HDUList(hdus).writeto(path, overwrite=True)


def _break_lin_missing(d):
    (d / "config/nonlinearity_corrections/lin_coeffs_20150227.fits").unlink()
    return "lin_coeffs_20150227.fits"


def _break_lin_shape(d):
    _shrink(d / "config/nonlinearity_corrections/lin_coeffs_20150227.fits")
    return "lin_coeffs_20150227.fits"


def _break_flat_missing(d):
    (d / "config/flatfielding/flat_20150227.fits").unlink()
    return "flat_20150227.fits"


def _break_flat_shape(d):
    _shrink(d / "config/flatfielding/flat_20150227.fits")
    return "flat_20150227.fits"


def _break_mask_missing(d):
    (d / "config/flatfielding/flat_bad_20150227.fits").unlink()
    return "flat_bad_20150227.fits"


def _break_mask_shape(d):
    _shrink(d / "config/nonlinearity_corrections/lin_bad_20150227.fits")
    return "lin_bad_20150227.fits"


def _break_noutputs_missing(d):
    for p in sorted((d / "raw").glob("*.fits")):
        _with_header(p, NOUTPUTS=None)
    return "NOUTPUTS"


def _break_noutputs_unsupported(d):
    for p in sorted((d / "raw").glob("*.fits")):
        _with_header(p, NOUTPUTS=8)
    return "NOUTPUTS"


def _break_reference_method(d):
    _set_ini(d / "config/pipeline.ini", "reference_subtraction", "method", "SIDEWAYS")
    return "SIDEWAYS"


def _break_combination_method(d):
    _set_ini(d / "config/pipeline.ini", "frame_combination", "method", "SUMALL")
    return "SUMALL"


def _break_cds_one_read(d):
    _set_ini(d / "config/pipeline.ini", "frame_combination", "method", "CDS")
    for p in sorted((d / "raw").glob("*.fits"))[1:]:
        p.unlink()
    return "i_e_20150227_1_1_1_0.fits"


def _break_fowler_too_few(d):
    _set_ini(d / "config/pipeline.ini", "frame_combination", "fowler_pairs", "3")
    return "fowler_pairs=3"


def _break_fowler_unequal(d):
    _set_ini(d / "config/pipeline.ini", "frame_combination", "fowler_pairs", "1")
    (d / "raw" / "i_e_20150227_1_1_4_0.fits").unlink()  # the second signal read
    return "i_e_20150227_1_1_3_0.fits"  # the files are named


ERROR_CASES = [
    pytest.param(_break_lin_missing, 7, id="linearity-missing"),
    pytest.param(_break_lin_shape, 23, id="linearity-shape"),
    pytest.param(_break_flat_missing, 21, id="flat-missing"),
    pytest.param(_break_flat_shape, 24, id="flat-shape"),
    pytest.param(_break_mask_missing, 27, id="mask-missing"),
    pytest.param(_break_mask_shape, 26, id="mask-shape"),
    pytest.param(_break_noutputs_missing, 4, id="noutputs-missing"),
    pytest.param(_break_noutputs_unsupported, 4, id="noutputs-unsupported"),
    pytest.param(_break_reference_method, 5, id="reference-method"),
    pytest.param(_break_combination_method, 10, id="combination-method"),
    pytest.param(_break_cds_one_read, 11, id="cds-one-read"),
    pytest.param(_break_fowler_too_few, 31, id="fowler-too-few"),
    pytest.param(_break_fowler_unequal, 32, id="fowler-unequal"),
]


def _error_lines(stderr):
    """Lines reporting a fatal error: ``ioi: error ...`` (raised out of the command) or the
    runner's ``ERROR <multrun>: ...`` (a multrun that failed; the summary goes to stdout)."""
    return [ln for ln in stderr.splitlines() if ln.startswith(("ioi: error", "ERROR"))]


@pytest.mark.parametrize("breaker, code", ERROR_CASES)
def test_error_paths_end_to_end(small, tmp_path, capsys, breaker, code):
    d = _copy(small, tmp_path / "data")
    before = _sha(sorted(small.out_dir.rglob("*.fits")))
    named = breaker(d)
    rc = main(["reduce", str(d / "raw"), "--out", str(tmp_path / "out"), "--pi", str(d / "config/pipeline.ini"),
               "--pa", str(d / "config/paths.ini"), "--log", "WARNING"])
    err = capsys.readouterr().err
    assert rc == code, err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    assert named in lines[0], lines[0]
    assert "Traceback" not in err
    assert _sha(sorted(small.out_dir.rglob("*.fits"))) == before  # the fixture's files untouched


@pytest.mark.parametrize("breaker, code", [ERROR_CASES[2], ERROR_CASES[8], ERROR_CASES[12]])
def test_error_paths_through_run_pipe(small, tmp_path, capsys, breaker, code):
    d = _copy(small, tmp_path / "data")
    named = breaker(d)
    rc = run_pipe_main(["--p", str(d / "raw"), "--wd", str(tmp_path / "wd"), "--pi", str(d / "config/pipeline.ini"),
                        "--pa", str(d / "config/paths.ini"), "--log", "WARNING"])
    err = capsys.readouterr().err
    assert rc == code, err
    lines = _error_lines(err)
    assert len(lines) == 1 and named in lines[0], err


# ----------------------------------------------------------------------------- 6. L1 products

def _run_reduce(d, out):
    return main(["reduce", str(d / "raw"), "--out", str(out), "--pi", str(d / "config/pipeline.ini"),
                 "--pa", str(d / "config/paths.ini"), "--log", "WARNING"])


def test_l1_product_names_extensions_and_keywords(small, tmp_path, capsys):
    d = _copy(small, tmp_path / "data")
    inputs = sorted(d.rglob("*.fits"))
    before = _sha(inputs)
    assert _run_reduce(d, tmp_path / "out") == 0
    capsys.readouterr()
    assert _sha(inputs) == before  # raw and calibration files unchanged
    t = small.truth
    name = f"i_e_{t['date']}_{t['multrun']}_1_0_1.fits"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.fits")) == [name]
    with fits.open(tmp_path / "out" / name) as h:
        names = [x.name for x in h]
        assert names[:4] == ["PRIMARY", "IM_NONSS", "IM_NONSS_VAR", "IM_NONSS_DQ"]
        ph, eh = h[0].header, h["IM_NONSS"].header
        assert h["IM_NONSS"].data.shape == (t["stripped_size"],) * 2
        assert h["IM_NONSS_DQ"].data.dtype.kind in "ui"
    expected = {
        "L1REFSUB": 1, "L1FMCO": 1, "L1FMCOME": "FOWLER", "L1FMCOPA": 2, "L1LCOR": 1,
        "L1LCORF": "lin_coeffs_20150227.fits", "L1FLAT": 1, "L1FLATF": "flat_20150227.fits", "L1BADPX": 1,
        "L1BADPXF": "flat_bad_20150227.fits", "L1BADPXL": "lin_bad_20150227.fits",
    }
    for key, value in expected.items():
        assert ph[key] == value, (key, ph.get(key))
    for hdr in (ph, eh):
        for key in ("SEQNUM_R", "SEQNUM_M", "SEQNUM_N", "INTTIME", "SEQNNAME"):
            assert key not in hdr, key
    # EXPTIME = mean pair time; MJD and DATE-OBS = the first read (reset + FRMTIME)
    times = np.asarray(t["read_times"])
    assert ph["EXPTIME"] == pytest.approx(float(np.mean(times[2:] - times[:2])), abs=1e-9)
    mjd = t["dither_resets_jd"][0]["reset_jd"] + times[0] / 86400.0 - 2400000.5
    assert ph["MJD"] == pytest.approx(mjd, abs=2e-8)  # ~2 ms
    first_read = Time(t["dither_resets_jd"][0]["reset_jd"] + times[0] / 86400.0, format="jd", scale="utc")
    assert ph["DATE-OBS"][:21] == first_read.isot[:21]  # to 0.1 s (JD in float64 is good to ~20 us)


@pytest.mark.parametrize("section, keys", [
    ("reference_subtraction", {"L1REFSUB": 0}),
    ("nonlinearity_corrections", {"L1LCOR": 0, "L1LCORF": "none"}),
    ("flatfielding", {"L1FLAT": 0, "L1FLATF": "none"}),
    ("bad_pix_masking", {"L1BADPX": 0}),
])
def test_l1_do_zero_is_reflected_in_keywords(small, tmp_path, capsys, section, keys):
    d = _copy(small, tmp_path / "data")
    _set_ini(d / "config/pipeline.ini", section, "do", "0")
    assert _run_reduce(d, tmp_path / "out") == 0
    capsys.readouterr()
    (path,) = (tmp_path / "out").glob("*_0_1.fits")
    with fits.open(path) as h:
        for key, value in keys.items():
            assert h[0].header[key] == value, (key, h[0].header[key])
        sci = h["IM_NONSS"].data
    if section == "bad_pix_masking":
        assert np.isfinite(sci).all()  # nothing masked
    if section == "reference_subtraction":
        assert float(np.nanmedian(sci)) > 0  # still a sensible difference (bias cancels in Fowler)


def test_l1_quit_after_nonlinearity_writes_nothing(small, tmp_path, capsys):
    """Nonlinearity is corrected inside frame combination: quit there stops before any product."""
    d = _copy(small, tmp_path / "data")
    _set_ini(d / "config/pipeline.ini", "nonlinearity_corrections", "quit", "1")
    assert _run_reduce(d, tmp_path / "out") == 0
    capsys.readouterr()
    assert list((tmp_path / "out").glob("*.fits")) == []


@pytest.mark.parametrize("section, suffix", [
    ("reference_subtraction", "refsub"),
    ("frame_combination", "combined"),
    ("flatfielding", "flat"),
    ("bad_pix_masking", "badpix"),
])
def test_l1_hard_writes_intermediate_and_quit_stops(small, tmp_path, capsys, section, suffix):
    d = _copy(small, tmp_path / "data")
    _set_ini(d / "config/pipeline.ini", section, "hard", "1")
    _set_ini(d / "config/pipeline.ini", section, "quit", "1")
    assert _run_reduce(d, tmp_path / "out") == 0
    capsys.readouterr()
    files = sorted(p.name for p in (tmp_path / "out").glob("*.fits"))
    assert files == [f"i_e_20150227_1_1_{suffix}.fits"], files  # the intermediate only: no L1 product
    with fits.open(tmp_path / "out" / files[0]) as h:
        data = next(x.data for x in h if x.data is not None)
    m = small.truth["stripped_size"]
    assert data.shape[-2:] == (m, m)


def test_l1_extension_keywords_agree_with_primary(small, tmp_path, capsys):
    d = _copy(small, tmp_path / "data")
    assert _run_reduce(d, tmp_path / "out") == 0
    capsys.readouterr()
    (path,) = (tmp_path / "out").glob("*_0_1.fits")
    with fits.open(path) as h:
        ph, eh = h[0].header, h["IM_NONSS"].header
    keys = [k for k in ("L1REFSUB", "L1FMCO", "L1FMCOME", "L1FMCOPA", "L1LCOR", "L1LCORF", "L1FLAT", "L1FLATF",
                        "L1BADPX", "L1BADPXF", "L1BADPXL") if k in eh]
    assert keys
    assert {k: eh[k] for k in keys} == {k: ph[k] for k in keys}
