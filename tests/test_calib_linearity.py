"""Linearity calibration against the truth of small synthetic UTR ramps."""

import argparse

import numpy as np
import pytest
from astropy.io import fits

from ioi.calib import synth
from ioi.calib.commands import add_calib_parser
from ioi.calib.linearity import apply_correction, fit_linearity, ramp_signal
from ioi.errors import IoiError


def _signal(truth, nruns=2, seed=10):
    sigs = []
    for run in range(nruns):
        raw, t = synth.make_ramp(truth, seed=seed + run)
        sat = raw[:, 4:-4, 4:-4] >= 65535
        sigs.append(ramp_signal(raw[:, 4:-4, 4:-4], t, saturated=sat))
    return np.median(np.stack(sigs), axis=0), t


@pytest.fixture(scope="module")
def fitted():
    truth = synth.make_truth(64, nbad=60, seed=3)
    sig, t = _signal(truth)
    return truth, sig, t, fit_linearity(sig, t)


def test_linearity_flags_injected_bad_pixels(fitted):
    truth, _, _, res = fitted
    assert res.bad[truth.bad].mean() >= 0.95
    assert res.bad[~truth.bad].mean() < 0.001


def test_linearity_residual_nonlinearity_against_truth(fitted):
    # Noise-free observed signals of the truth, corrected with the pipeline's formula
    # x * poly(x + lost) / (x + lost); the residual is measured against a per-pixel
    # proportional response (the scale is photon noise of the rate, ~0.8 % here, and
    # is absorbed by a flat made from corrected data).
    truth, _, _, res = fitted
    good = ~truth.bad
    lin = np.linspace(2500, 40000, 60)[:, None, None] + 0 * truth.beta
    obs = lin * (1 - truth.beta * lin)
    # a CDS x with charge `lost` before its pedestal read: corrected x vs true linear CDS
    lost_lin = 2000.0
    lost = lost_lin * (1 - truth.beta * lost_lin)
    corr = apply_correction(obs - lost, res.coeffs, lost=lost)
    lin = lin - lost_lin
    inwin = (obs >= 2500) & (obs <= 40000)
    ratio = np.where(inwin, corr / lin, np.nan)
    scale = np.nanmedian(ratio, axis=0)
    resid = np.nanmedian(np.abs(ratio / scale - 1), axis=0)[good] * 100
    assert np.median(resid) < 0.15
    assert np.mean(resid < 0.3) > 0.9
    # without correction the same measure is several times larger
    rraw = np.where(inwin, (obs - lost) / lin, np.nan)
    raw = np.nanmedian(np.abs(rraw / np.nanmedian(rraw, axis=0) - 1), axis=0)[good] * 100
    assert np.median(raw) > 5 * np.median(resid)


def test_linearity_rate_matches_truth(fitted):
    truth, _, _, res = fitted
    good = ~truth.bad
    rel = res.rate[good] / truth.rate[good] - 1
    # per-step photon + read noise gives ~0.8 % per pixel; the mean must be unbiased
    assert abs(np.mean(rel)) < 0.003
    assert np.std(rel) < 0.02


def test_ramp_signal_does_not_change_input():
    truth = synth.make_truth(8, seed=1)
    raw, t = synth.make_ramp(truth, nreads=5, seed=2)
    before = raw.copy()
    ramp_signal(raw, t)
    np.testing.assert_array_equal(raw, before)


def test_fit_linearity_does_not_change_input(fitted):
    _, sig, t, _ = fitted
    s = sig[:, :8, :8].copy()
    before = s.copy()
    fit_linearity(s, t)
    np.testing.assert_array_equal(s, before)


def test_all_nan_pixel_is_bad_with_identity_coefficients():
    truth = synth.make_truth(8, seed=1)
    sig, t = _signal(truth, nruns=1)
    sig[:, 2, 3] = np.nan
    res = fit_linearity(sig, t)
    assert res.bad[2, 3] and res.reason[2, 3] & 1
    np.testing.assert_array_equal(res.coeffs[:, 2, 3], [0, 1, 0, 0])
    assert np.all(np.isfinite(res.coeffs))


def _parser():
    p = argparse.ArgumentParser()
    add_calib_parser(p.add_subparsers(dest="command"))
    return p


def test_linearity_command_end_to_end(tmp_path):
    truth = synth.make_truth(32, nbad=9, seed=5)
    for run in (1, 2):
        raw, t = synth.make_ramp(truth, seed=20 + run)
        synth.write_teledyne(tmp_path / "utr", raw, t, run=run, noutputs=4)
    out = tmp_path / "out"
    args = _parser().parse_args(["calib", "linearity", str(tmp_path / "utr"), "--out", str(out),
                                 "--plot-pixels", "3,4", "--plot-bad", "1", "--flip"])
    assert args.func(args) == 0
    with fits.open(out / "lin_coeffs.fits") as h:
        assert len(h) == 4 and h[0].data.shape == (32, 32) and h[1].data.dtype == np.dtype(">f4")
        c1 = h[1].data[:, ::-1]
    assert abs(np.median(c1) - 1) < 0.05
    bad = ~np.isfinite(fits.getdata(out / "lin_bad.fits"))[:, ::-1]
    assert bad[truth.bad].mean() >= 0.95
    assert (out / "lin.fits").exists() and (out / "lin_pixel_3_4.png").exists()
    with pytest.raises(IoiError, match="lin_coeffs.fits"):
        args.func(args)


def test_linearity_command_no_files(tmp_path):
    args = _parser().parse_args(["calib", "linearity", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(IoiError, match="no Teledyne") as exc:
        args.func(args)
    assert exc.value.exit_code == 3


def test_iter_ramp_signal_matches_ramp_signal():
    # the read-by-read signal must be the whole-cube one exactly, saturation included
    from ioi.calib.linearity import iter_ramp_signal

    truth = synth.make_truth(24, seed=6, rate=900.0)  # ADC saturation before the last read
    raw, t = synth.make_ramp(truth, nreads=12, seed=7, bias=20000.0, interval=5.0)
    reads, sat = raw[:, 4:-4, 4:-4], raw[:, 4:-4, 4:-4] >= 65535
    assert sat.any() and not sat.all()
    whole = ramp_signal(reads, t, saturated=sat)
    each = np.stack(list(iter_ramp_signal(zip(reads, sat), t)))
    np.testing.assert_array_equal(each, whole)
    with pytest.raises(IoiError, match="2 reads"):
        list(iter_ramp_signal([(reads[0], None)], t))


@pytest.mark.parametrize("nruns", [1, 2, 3])
def test_median_signal_read_by_read_equals_median_of_whole_cubes(tmp_path, nruns):
    # the command reads files one at a time (two runs folded into one cube); the
    # result must be, bit for bit, the median over runs of ramp_signal of each
    # run's reference-subtracted cube
    from ioi.calib.commands import _median_signal
    from ioi.stages.reference import strip_border, subtract_reference

    truth = synth.make_truth(24, seed=8, rate=900.0)
    sigs = []
    for run in range(1, nruns + 1):
        raw, t = synth.make_ramp(truth, nreads=10, seed=20 + run, bias=20000.0)
        synth.write_teledyne(tmp_path / "utr", raw, t, run=run, noutputs=4)
        raw = np.round(raw)  # as stored: integer ADC counts
        reads = strip_border(subtract_reference(raw, method="RAMP", noutputs=4))
        sigs.append(ramp_signal(reads, t, saturated=strip_border(raw >= 65535)))
    expect = np.median(np.stack(sigs), axis=0)
    sig, tt, header, run_ids = _median_signal(tmp_path / "utr", chunk_rows=7)
    assert run_ids == list(range(1, nruns + 1)) and header["NOUTPUTS"] == 4
    np.testing.assert_allclose(tt, t, atol=1e-3)
    assert np.isnan(expect).any()
    np.testing.assert_array_equal(sig, expect)
