"""The calibration commands on the project's simulator (``ioi.simulate``) against its truth.

Size 512 rather than 256: photon transfer from two ramps has a statistical
error of ~1 % on the gain at 256 px (the CDS images of one ramp share their
charge noise), which would make the 2 % acceptance a 2-sigma test; at 512 it
is ~0.4 %.
"""

import argparse
import contextlib
import io
import json

import numpy as np
import pytest
from astropy.io import fits

from ioi.calib.commands import add_calib_parser
from ioi.calib.linearity import apply_correction

simulate = pytest.importorskip("ioi.simulate").simulate


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    res = simulate(out, size=512, utr=True, dithers=1, seed=2)
    return out, res.truth


def _run(*argv):
    p = argparse.ArgumentParser()
    add_calib_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["calib", *map(str, argv)])
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        assert args.func(args) == 0
    return buf.getvalue()


@pytest.mark.slow
def test_gain_and_read_noise_on_simulator(sim, tmp_path):
    out, truth = sim
    _run("gain", out / "utr", "--json", tmp_path / "g.json")
    g = json.loads((tmp_path / "g.json").read_text())
    assert g["gain_e_per_adu"] == pytest.approx(truth["gain_true"], rel=0.02)
    assert g["read_noise_adu_per_read"] == pytest.approx(truth["read_noise_adu"], rel=0.05)
    assert g["asicgain_db"] == pytest.approx(truth["asicgain_db"])


@pytest.mark.slow
def test_linearity_on_simulator(sim, tmp_path):
    out, truth = sim
    _run("linearity", out / "utr", "--out", tmp_path)
    bp = fits.getdata(out / "truth" / "badpix.fits").astype(int)
    beta = fits.getdata(out / "truth" / "nonlin_beta.fits").astype(np.float64)
    bad = ~np.isfinite(fits.getdata(tmp_path / "lin_bad.fits"))
    dead_or_badlin = (bp & (2 | 8)) > 0
    assert bad[dead_or_badlin].mean() >= 0.95
    assert bad[bp == 0].mean() < 0.001
    # hot pixels are only partly visible in a flat-lit ramp (dark 20-5000 e-/s on ~850 e-/s):
    # not asserted beyond "the brightest are flagged"
    with fits.open(tmp_path / "lin_coeffs.fits") as h:
        coeffs = np.stack([x.data.astype(np.float64) for x in h])
    good = bp == 0
    lin = np.linspace(2500, 40000, 40)[:, None]
    obs = lin * (1 - beta[good][None] * lin)
    corr = apply_correction(obs, coeffs[:, good][:, None, :], lost=0.0)
    inwin = (obs >= 2500) & (obs <= 40000)
    ratio = np.where(inwin, corr / lin, np.nan)
    resid = np.nanmedian(np.abs(ratio / np.nanmedian(ratio, axis=0) - 1), axis=0) * 100
    assert np.median(resid) < 0.15
    assert np.mean(resid < 0.3) > 0.9


@pytest.mark.slow
def test_fullwell_on_simulator(sim, tmp_path):
    out, _ = sim
    text = _run("fullwell", out / "utr", "--out", tmp_path)
    assert "full well" in text
    with fits.open(tmp_path / "fullwell.fits") as h:
        assert h[0].data.shape == (504, 504)
        assert "ELECTRONS" in h and "REACHED" in h
