"""The calibration tools' files used by ``ioi reduce`` (issue 5): simulate UTR ramps
and a dithered multrun, build linearity and flat files with ``ioi calib``, reduce
with them, and compare with the simulator's truth."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from _truth import star_mask
from astropy.io import fits
from scipy import ndimage

from ioi.cli import main
from ioi.simulate import simulate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("calpipe")
    sim = simulate(root / "sim", size=512, dithers=5, utr=True, seed=21, cosmic_rays=False)
    cal = root / "cal" / "config"
    assert main(["calib", "linearity", str(sim.utr_dir), "--out", str(cal / "nonlinearity_corrections")]) == 0
    return sim, root, cal


def _paths_ini(root, cal, *, flat=None, flat_bad=None) -> str:
    p = root / f"paths_{flat or 'noflat'}.ini"
    p.write_text(textwrap.dedent(f"""\
        [general]
        path_base = {cal.parent}
        path_config = config
        path_man = man
        path_src = src
        [flatfielding]
        path_flatfielding_corrections = flatfielding
        coeff_filename = {flat or ''}
        bad_pix_filename = {flat_bad or ''}
        [nonlinearity_corrections]
        path_nonlinearity_corrections = nonlinearity_corrections
        coeff_filename = lin_coeffs.fits
        bad_pix_filename = lin_bad.fits
        """))
    return str(p)


def _toml(root, name, *, flat: bool, which: str, sky: bool = False) -> str:
    p = root / f"{name}.toml"
    p.write_text(textwrap.dedent(f"""\
        [pipeline.flatfielding]
        do = {str(flat).lower()}
        [pipeline.bad_pix_masking]
        which = "{which}"
        [pipeline.sky_subtraction]
        do = {str(sky).lower()}
        [pipeline.registration]
        do = false
        [pipeline.stacking]
        do = false
        """))
    return str(p)


def test_linearity_coefficients_in_reduce_leave_residual_below_03_percent(built):
    sim, root, cal = built
    out = root / "red_lin"
    rc = main(["reduce", str(sim.raw_dir), "--out", str(out), "--config", _toml(root, "lin", flat=False, which="LIN"),
               "--paths-ini", _paths_ini(root, cal), "--log", "WARNING"])
    assert rc == 0
    truth = json.loads((sim.truth_dir / "truth.json").read_text())
    bins = [(2500, 5000), (5000, 10000), (10000, 20000), (20000, 40000)]
    medians = {b: [] for b in bins}
    for d in range(1, 6):
        with fits.open(out / f"i_e_20150227_1_{d}_0_1.fits") as h:
            assert h[0].header["L1LCORF"] == "lin_coeffs.fits"
            sci = h["IM_NONSS"].data.astype(np.float64)
            dq = h["IM_NONSS_DQ"].data
        expected = fits.getdata(sim.truth_dir / f"rate_d{d}.fits").astype(np.float64) * truth["exptime"]
        bad = fits.getdata(sim.truth_dir / "badpix.fits") > 0
        ok = np.isfinite(sci) & (dq == 0) & ~bad
        for lo, hi in bins:
            sel = ok & (expected >= lo) & (expected < hi)
            if sel.sum() >= 30:
                medians[(lo, hi)].append(np.median(sci[sel] / expected[sel]))
    per_bin = {b: float(np.median(v)) for b, v in medians.items() if v}
    assert len(per_bin) >= 3, per_bin
    for b, ratio in per_bin.items():
        assert abs(ratio - 1) < 0.003, (b, ratio)


def test_flat_from_l1_products_is_used_by_reduce(built):
    sim, root, cal = built
    # 1. L1 frames without flat fielding; 2. a flat from them (sources masked); 3. reduce with it
    pre = root / "red_preflat"
    assert main(["reduce", str(sim.raw_dir), "--out", str(pre), "--config",
                 _toml(root, "preflat", flat=False, which="LIN"), "--paths-ini", _paths_ini(root, cal),
                 "--log", "WARNING"]) == 0
    l1 = sorted(str(p) for p in pre.glob("*_0_1.fits"))
    assert len(l1) == 5
    flatdir = cal / "flatfielding"
    assert main(["calib", "flat", *l1, "--ext", "IM_NONSS", "--out", str(flatdir), "--from-science"]) == 0
    flat = fits.getdata(flatdir / "flat.fits").astype(np.float64)
    true_flat = fits.getdata(sim.truth_dir / "flat.fits").astype(np.float64)
    good = (true_flat > 0.5) & (true_flat < 1.5) & np.isfinite(flat)
    rel = flat[good] / true_flat[good]
    rel /= np.median(rel)
    # noise-limited: ~42 ADU per pixel on ~2600 ADU of sky, median of 5 frames
    rms = 1.4826 * np.median(np.abs(rel - 1))
    assert rms < 0.025, rms
    out = root / "red_flat"
    assert main(["reduce", str(sim.raw_dir), "--out", str(out), "--config",
                 _toml(root, "flat", flat=True, which="FLAT,LIN"),
                 "--paths-ini", _paths_ini(root, cal, flat="flat.fits", flat_bad="flat_bad.fits"),
                 "--log", "WARNING"]) == 0
    with fits.open(out / "i_e_20150227_1_1_0_1.fits") as h:
        assert h[0].header["L1FLAT"] == 1 and h[0].header["L1FLATF"] == "flat.fits"
        assert h[0].header["L1BADPXF"] == "flat_bad.fits"
        sci = h["IM_NONSS"].data.astype(np.float64)
    # flat-fielded sky: the pixel-scale flat structure (1-2 % of ~2800 ADU) is gone, leaving
    # the noise of the frame plus that of a 5-frame flat
    with fits.open(pre / "i_e_20150227_1_1_0_1.fits") as h:
        before = h["IM_NONSS"].data.astype(np.float64)
        var = h["IM_NONSS_VAR"].data.astype(np.float64)
    stars = star_mask(sim.out_dir, 1, sci.shape, radius=15)

    def pixel_scale_rms(a):
        hp = a - ndimage.median_filter(np.nan_to_num(a, nan=np.nanmedian(a)), size=7)
        v = hp[~stars & np.isfinite(hp) & np.isfinite(before) & np.isfinite(sci)]
        return 1.4826 * np.median(np.abs(v - np.median(v)))

    noise = np.sqrt(np.nanmedian(var[~stars]))
    rms_before, rms_after = pixel_scale_rms(before), pixel_scale_rms(sci)
    assert rms_before > 1.2 * noise  # the flat's pixel structure is there before
    assert rms_after < noise * np.sqrt(1 + 1 / 5) * 1.1, (rms_after, noise)


def test_linearity_and_flat_masks_flag_the_simulated_bad_pixels(built):
    """Union of the two tools' 1/NaN masks against the simulator's bad-pixel truth
    (hot, dead, low response, bad linearity): >= 95 % flagged, < 0.1 % of good ones."""
    sim, root, cal = built
    lin_bad = ~np.isfinite(fits.getdata(cal / "nonlinearity_corrections" / "lin_bad.fits"))
    flat_path = cal / "flatfielding" / "flat_bad.fits"
    if not flat_path.exists():  # built by the flat test; build it here when run alone
        test_flat_from_l1_products_is_used_by_reduce(built)
    flat_bad = ~np.isfinite(fits.getdata(flat_path))
    truth_bits = fits.getdata(sim.truth_dir / "badpix.fits").astype(int)
    flagged = lin_bad | flat_bad
    truly_bad = truth_bits > 0
    assert flagged[truly_bad].mean() >= 0.95, flagged[truly_bad].mean()
    assert flagged[~truly_bad].mean() < 0.001, flagged[~truly_bad].mean()
