"""Photon-transfer gain and read noise against the truth of synthetic UTR ramps."""

import argparse
import json

import numpy as np
import pytest
from astropy.io import fits

from ioi.calib import synth
from ioi.calib.commands import add_calib_parser
from ioi.calib.gain import asicgain_db, fit_ptc, ptc_points, theoretical_gain
from ioi.errors import IoiError

GAIN, RN = 2.0, 17.0


@pytest.fixture(scope="module")
def cds_pair():
    truth = synth.make_truth(256, gain=GAIN, read_noise=RN, seed=7)
    cds = []
    for run in (1, 2):
        raw, t = synth.make_ramp(truth, seed=30 + run)
        r = raw[:, 4:-4, 4:-4].astype(np.float32)
        r[np.logical_or.accumulate(r >= 65535, axis=0)] = np.nan
        cds.append(r[1:] - r[0])
    return cds[0], cds[1], t


def test_gain_and_read_noise_match_truth(cds_pair):
    # 65536 pixels: the gain's statistical error is ~0.6 %, the read noise's ~2 %
    a, b, t = cds_pair
    mean, var = ptc_points(a, b, window=64)
    res = fit_ptc(mean, var, adu_range=(1000, 30000), times=t[1:], first_time=t[0])
    s = res.summary
    assert s["gain_e_per_adu"] == pytest.approx(GAIN, rel=0.02)
    assert s["read_noise_adu_per_read"] == pytest.approx(RN, rel=0.05)
    assert s["read_noise_e_per_read"] == pytest.approx(RN * GAIN, rel=0.06)


def test_unlinearized_ptc_is_biased(cds_pair):
    # nonlinearity (beta 1e-6) lowers the PTC slope: gain overestimated by several %
    a, b, t = cds_pair
    mean, var = ptc_points(a, b, window=64)
    res = fit_ptc(mean, var, adu_range=(1000, 30000), linearize=False)
    assert res.summary["gain_e_per_adu"] > GAIN * 1.04


def test_ptc_points_does_not_change_input(cds_pair):
    a, b, _ = cds_pair
    a2, b2 = a[:3, :64, :64].copy(), b[:3, :64, :64].copy()
    ptc_points(a2, b2, window=32)
    np.testing.assert_array_equal(a2, a[:3, :64, :64])
    np.testing.assert_array_equal(b2, b[:3, :64, :64])


def test_theoretical_gain_and_asicgain_comment():
    h = fits.Header()
    h["ASICGAIN"] = (10, "ASIC preamp gain setting, 18 dB")
    assert asicgain_db(h) == 18.0
    assert theoretical_gain(18.0) == pytest.approx(3 * 40e-15 / (2**16 * 10 ** 0.9 * 1.6e-19))
    assert asicgain_db(fits.Header()) is None


def _parser():
    p = argparse.ArgumentParser()
    add_calib_parser(p.add_subparsers(dest="command"))
    return p


def test_gain_command_end_to_end(tmp_path, capsys):
    truth = synth.make_truth(64, gain=GAIN, read_noise=RN, seed=8)
    for run in (1, 2):
        raw, t = synth.make_ramp(truth, seed=40 + run)
        synth.write_teledyne(tmp_path / "utr", raw, t, run=run, noutputs=4)
    args = _parser().parse_args(["calib", "gain", str(tmp_path / "utr"), "--window", "16", "--json",
                                 str(tmp_path / "g.json"), "--plots", str(tmp_path / "plots")])
    assert args.func(args) == 0
    summary = json.loads((tmp_path / "g.json").read_text())
    # 64x64 pixels only (~1.5 % statistical error): a looser tolerance than the test above
    assert summary["gain_e_per_adu"] == pytest.approx(GAIN, rel=0.04)
    assert summary["asicgain_db"] == 18.0
    assert (tmp_path / "plots" / "gain_hist.png").exists()
    assert "gain (e-/ADU)" in capsys.readouterr().out


def test_gain_fowler_command(tmp_path):
    truth = synth.make_truth(64, gain=GAIN, read_noise=RN, seed=9)
    rng = np.random.default_rng(0)
    run = 0
    for texp in (5.0, 15.0, 30.0, 50.0):
        for _ in range(2):
            run += 1
            # a 2-pair Fowler exposure: a UTR whose reads 1-2 are pedestals, the last 2 signals
            nreads = int(texp / 5.0) + 2
            raw, t = synth.make_ramp(truth, nreads=nreads, seed=int(rng.integers(1 << 30)))
            d = tmp_path / "fowler"
            synth.write_teledyne(d, raw[:2], t[:2], run=run, group=1, noutputs=4)
            synth.write_teledyne(d, raw[-2:], t[-2:], run=run, group=2, noutputs=4)
    args = _parser().parse_args(["calib", "gain", str(tmp_path / "fowler"), "--method", "fowler",
                                 "--window", "16", "--json", str(tmp_path / "f.json"), "--adu-range", "100,30000"])
    assert args.func(args) == 0
    summary = json.loads((tmp_path / "f.json").read_text())
    assert summary["gain_e_per_adu"] == pytest.approx(GAIN, rel=0.1)


def test_gain_command_needs_two_runs(tmp_path):
    truth = synth.make_truth(16, seed=1)
    raw, t = synth.make_ramp(truth, nreads=4, seed=1)
    synth.write_teledyne(tmp_path, raw, t, run=1, noutputs=4)
    args = _parser().parse_args(["calib", "gain", str(tmp_path), "--window", "8"])
    with pytest.raises(IoiError, match="two runs"):
        args.func(args)


@pytest.mark.parametrize("chunk_rows", [1, 64, 130, 1000])
def test_ptc_points_by_row_bands_equals_whole_sets(cds_pair, chunk_rows):
    # windows are independent: any band height gives the whole-set result exactly
    from ioi.calib.gain import ptc_points_rows

    a, b, _ = cds_pair
    a, b = a[:, :200], b[:, :200]  # 200 rows: the last partial window row is dropped
    calls = []

    def get_rows(y0, y1):
        calls.append((y0, y1))
        return a[:, y0:y1], b[:, y0:y1]

    mean, var = ptc_points_rows(get_rows, a.shape, window=64, chunk_rows=chunk_rows)
    m0, v0 = ptc_points(a, b, window=64)
    assert mean.shape == (a.shape[0], 3, 4)
    np.testing.assert_array_equal(mean, m0)
    np.testing.assert_array_equal(var, v0)
    assert calls[0][0] == 0 and calls[-1][1] == 192
    assert all(y1 - y0 <= max(64, chunk_rows // 64 * 64) for y0, y1 in calls)
