"""Flat field and full-well tools against known truth."""

import argparse

import numpy as np
import pytest
from astropy.io import fits

from ioi.calib import synth
from ioi.calib.commands import add_calib_parser
from ioi.calib.flat import make_flat
from ioi.calib.fullwell import full_well
from ioi.calib.linearity import ramp_signal
from ioi.errors import IoiError


def _sky_frames(flat, n=8, level=2000.0, gain=2.0, seed=0):
    rng = np.random.default_rng(seed)
    levels = level * (1 + 0.2 * rng.random(n))
    return [(rng.poisson(lv * flat * gain) / gain).astype(np.float32) for lv in levels]


def _flat_truth(size=128, seed=1):
    rng = np.random.default_rng(seed)
    flat = rng.normal(1.0, 0.05, (size, size))
    flat[5, 7] = 0.1  # dead-ish
    flat[9, 9] = 3.0  # hot
    return flat / np.mean(flat)


def test_flat_recovered_within_noise():
    flat = _flat_truth()
    frames = _sky_frames(flat)
    res = make_flat(frames)
    good = ~res.bad
    assert res.bad[5, 7] and res.bad[9, 9] and res.bad.sum() == 2
    assert res.flat[5, 7] == 1.0
    # photon noise per frame ~ 1/sqrt(2 x 2200) = 1.5 %, 8 frames -> 0.5 %; flat mean drifts by the bad pixels
    rms = np.sqrt(np.mean((res.flat[good] / flat[good] / np.mean(res.flat[good] / flat[good]) - 1) ** 2))
    assert rms < 0.006
    frames16 = _sky_frames(flat, n=16, seed=3)
    res16 = make_flat(frames16)
    rms16 = np.std(res16.flat[good] / flat[good])
    assert rms16 < 0.005


def test_flat_does_not_change_input():
    frames = _sky_frames(_flat_truth(32), n=3)
    frames[0][0, 0] = np.nan
    before = [f.copy() for f in frames]
    make_flat(frames)
    for a, b in zip(frames, before):
        np.testing.assert_array_equal(a, b)


def test_flat_from_science_masks_sources():
    flat = _flat_truth(128)
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:128, :128]
    frames = []
    for _frame in range(9):  # dithered star fields
        sky = np.full((128, 128), 2000.0)
        for _ in range(6):
            y0, x0 = rng.uniform(10, 118, 2)
            sky += 20000 * np.exp(-((yy - y0) ** 2 + (xx - x0) ** 2) / (2 * 2.0**2))
        frames.append((rng.poisson(sky * flat * 2) / 2).astype(np.float32))
    plain = make_flat(frames)
    sci = make_flat(frames, from_science=True)
    good = ~sci.bad & ~plain.bad
    err_sci = np.std(sci.flat[good] / flat[good])
    err_plain = np.std(plain.flat[good] / flat[good])
    assert err_sci < 0.01 and err_sci < err_plain / 2


def _parser():
    p = argparse.ArgumentParser()
    add_calib_parser(p.add_subparsers(dest="command"))
    return p


def test_flat_command_end_to_end(tmp_path):
    flat = _flat_truth(64)
    files = []
    for i, f in enumerate(_sky_frames(flat, n=4)):
        p = tmp_path / f"sky{i}.fits"
        fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(f, name="IM_NONSS")]).writeto(p)
        files.append(str(p))
    out = tmp_path / "out"
    args = _parser().parse_args(["calib", "flat", *files, "--out", str(out), "--ext", "IM_NONSS", "--flip"])
    assert args.func(args) == 0
    got = fits.getdata(out / "flat.fits")[:, ::-1]
    good = (flat > 0.35) & (flat < 2.0)
    assert np.std(got[good] / flat[good]) < 0.012  # 4 frames of ~2200 ADU at gain 2: 0.75 % rms
    assert got[5, 7] == 1.0
    assert np.isnan(fits.getdata(out / "flat_bad.fits")[5, 64 - 1 - 7])
    with pytest.raises(IoiError, match="flat.fits"):
        args.func(args)
    args = _parser().parse_args(["calib", "flat", *files, "--out", str(out), "--ext", "IM_NONSS", "--clobber"])
    assert args.func(args) == 0
    args = _parser().parse_args(["calib", "flat", str(tmp_path / "nope.fits"), "--out", str(tmp_path / "o2")])
    with pytest.raises(IoiError, match="nope.fits"):
        args.func(args)


def test_full_well_plateau_and_adc():
    truth = synth.make_truth(32, fullwell=25000.0, seed=2)
    raw, t = synth.make_ramp(truth, nreads=25, seed=3)
    sat = raw[:, 4:-4, 4:-4] >= 65535
    sig = ramp_signal(raw[:, 4:-4, 4:-4], t, saturated=sat)
    before = sig.copy()
    res = full_well(sig)
    np.testing.assert_array_equal(sig, before)
    expect = truth.fullwell * (1 - truth.beta * truth.fullwell)
    assert res.reached.all()
    # error per pixel: restoring the charge before read 1 from the rate of reads 1-2
    # (~50 ADU rms) plus the max of ~10 plateau reads (read noise 17 x sqrt(2), ~+1.5 sigma)
    err = res.depth - expect
    assert np.all(np.abs(err) < 250) and np.median(np.abs(err)) < 80
    # every pixel is independent: row chunks of any height give the same maps
    for rows in (1, 7):
        chunked = full_well(sig, chunk_rows=rows)
        np.testing.assert_array_equal(chunked.depth, res.depth)
        np.testing.assert_array_equal(chunked.reached, res.reached)
        np.testing.assert_array_equal(chunked.adc, res.adc)


def test_fullwell_command_end_to_end(tmp_path, capsys):
    truth = synth.make_truth(32, seed=4, rate=900.0)  # ADC saturation before 125 s
    raw, t = synth.make_ramp(truth, nreads=25, seed=5, bias=20000.0)
    synth.write_teledyne(tmp_path / "utr", raw, t, run=1, noutputs=4)
    out = tmp_path / "out"
    args = _parser().parse_args(["calib", "fullwell", str(tmp_path / "utr"), "--out", str(out)])
    assert args.func(args) == 0
    with fits.open(out / "fullwell.fits") as h:
        depth = h[0].data
        assert h["REACHED"].data.all()
        np.testing.assert_allclose(h["ELECTRONS"].data, depth * 2.12, rtol=1e-5)
    # ADC saturation at 65535 raw with bias 20000 (reference-subtracted): ~45500 ADU, minus one step
    assert np.all(depth < 45535 + 150) and np.median(depth) > 45535 - 900 * 5 * 1.3
    assert (out / "fullwell_hist.png").exists()
    assert "full well" in capsys.readouterr().out
    with pytest.raises(IoiError, match="fullwell.fits"):
        args.func(args)
