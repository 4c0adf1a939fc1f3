"""Stacking (SPEC 2.8): methods, keywords, NaN handling, clipping, image quality."""

import numpy as np
import pytest
from _field_synth import FWHM_TO_SIGMA, make_field, similarity
from astropy.io import fits
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ioi.errors import ExitCode, IoiError, StageWarning
from ioi.frame import DQ, Frame
from ioi.stages import register as R
from ioi.stages import stack as K


def _frames(values, *, var=4.0, asicgain=10, exptime=10.0):
    out = []
    for v in values:
        h = fits.Header()
        h["ASICGAIN"] = asicgain
        h["EXPTIME"] = exptime
        sci = np.asarray(v, np.float32)
        out.append(Frame.from_science(sci, h, variance=np.full(sci.shape, var, np.float32)))
    return out


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float32, (6, 5),
                  elements=st.one_of(st.floats(-1e4, 1e4, width=32), st.just(np.nan))),
       st.integers(1, 6))
def test_identical_frames_stack_to_that_frame(img, n):
    finite = np.isfinite(img)
    if not finite.any():
        with pytest.raises(IoiError) as exc:
            K.stack_frames(_frames([img] * n))
        assert exc.value.exit_code == ExitCode.STACKING_FAILED
        return
    res = K.stack_frames(_frames([img] * n), chunk_rows=4)
    np.testing.assert_allclose(res.frame.science, img, rtol=1e-6, atol=1e-3)  # NaN where NaN
    np.testing.assert_array_equal(res.exposure_map, np.where(finite, n, 0))
    np.testing.assert_allclose(res.frame.variance[finite], 4.0 / n, rtol=1e-6)
    assert (res.frame.quality[~finite] & DQ.NO_OVERLAP).all()


def test_mean_is_nan_aware_with_exposure_map():
    vals = [np.full((4, 4), v) for v in (1.0, 2.0, 3.0, 6.0)]
    vals[3][0, 0] = np.nan
    frames = _frames(vals)
    q = frames[1].quality.copy()
    q[1, 1] = DQ.DO_NOT_USE | DQ.SATURATED  # finite but flagged: left out
    frames[1] = frames[1].replace(quality=q)
    res = K.stack_frames(frames, chunk_rows=3)
    assert res.frame.science[0, 0] == pytest.approx(2.0)
    assert res.frame.science[1, 1] == pytest.approx(10.0 / 3)
    assert res.frame.science[2, 2] == pytest.approx(3.0)
    assert res.exposure_map[0, 0] == 3 and res.exposure_map[1, 1] == 3 and res.exposure_map[2, 2] == 4
    assert res.exposure_map.dtype == np.int16
    assert res.frame.variance[0, 0] == pytest.approx(3 * 4.0 / 9)
    assert res.frame.variance[2, 2] == pytest.approx(4 * 4.0 / 16)


def test_pixel_without_data_is_nan_and_flagged():
    vals = [np.ones((3, 3)), np.ones((3, 3))]
    vals[0][1, 1] = vals[1][1, 1] = np.nan
    res = K.stack_frames(_frames(vals))
    assert np.isnan(res.frame.science[1, 1]) and res.exposure_map[1, 1] == 0
    assert res.frame.quality[1, 1] == DQ.DO_NOT_USE | DQ.NO_OVERLAP
    assert res.frame.quality[0, 0] == 0


def test_method_keywords():
    vals = [np.full((4, 4), v) for v in (1.0, 2.0, 3.0)]
    mean = K.stack_frames(_frames(vals), method="MEAN").frame
    assert mean.header["GAIN"] == pytest.approx(3 * 2.12) and mean.header["EPERDN"] == pytest.approx(3 * 2.12)
    assert mean.header["EXPTIME"] == 10.0 and "NCOADDS" not in mean.header
    assert mean.header["L1STK"] == 1 and mean.header["STKMETH"] == "MEAN" and mean.header["STKNFRM"] == 3
    co = K.stack_frames(_frames(vals), method="coadd").frame
    assert co.science[0, 0] == pytest.approx(6.0) and co.variance[0, 0] == pytest.approx(12.0)
    assert co.header["EXPTIME"] == 30.0 and co.header["NCOADDS"] == 3
    assert co.header["GAIN"] == pytest.approx(2.12)
    vals[2][0, 0] = np.nan
    ms = K.stack_frames(_frames(vals), method="MEANANDSCALE").frame
    assert ms.science[0, 0] == pytest.approx(3 * 1.5)  # mean of the two x 3 frames
    assert ms.science[1, 1] == pytest.approx(6.0)
    assert ms.variance[0, 0] == pytest.approx(9 * 8.0 / 4)
    assert ms.header["EXPTIME"] == 30.0 and ms.header["NCOADDS"] == 3


def test_gain_keywords_table_and_unknown_warns_34():
    assert K.gain_keywords(8) == {"GAIN": 3.05, "EPERDN": 3.05}
    assert K.gain_keywords("13") == {"GAIN": 1.06, "EPERDN": 1.06}
    assert K.gain_keywords(12.0)["GAIN"] == 1.5
    with pytest.warns(StageWarning) as rec:
        assert K.gain_keywords(11) is None
    assert rec[0].message.exit_code == ExitCode.UNKNOWN_ASICGAIN
    with pytest.warns(StageWarning) as rec:
        res = K.stack_frames(_frames([np.ones((2, 2))] * 2, asicgain=9))
    assert rec[0].message.exit_code == ExitCode.UNKNOWN_ASICGAIN
    assert "GAIN" not in res.frame.header and "EPERDN" not in res.frame.header


def test_clipping_rejects_outlier():
    rng = np.random.default_rng(3)
    vals = [rng.normal(100.0, 2.0, (16, 16)) for _ in range(5)]
    vals[2][5, 5] += 500.0  # a cosmic ray
    plain = K.stack_frames(_frames(vals))
    clipped = K.stack_frames(_frames(vals), clip_sigma=3.0)
    assert plain.frame.science[5, 5] > 190.0
    others = np.mean([v[5, 5] for k, v in enumerate(vals) if k != 2])
    assert clipped.frame.science[5, 5] == pytest.approx(others, abs=1e-3)
    assert clipped.exposure_map[5, 5] == 4
    # noise-only pixels are (almost all) kept: 3 sigma clips ~0.3 % of values
    assert (clipped.exposure_map == 5).mean() > 0.97
    assert clipped.frame.header["STKCLIP"] == 3.0


def test_unknown_method_33_and_failures_13():
    frames = _frames([np.ones((2, 2))] * 2)
    with pytest.raises(IoiError) as exc:
        K.stack_frames(frames, method="MEDIAN")
    assert exc.value.exit_code == ExitCode.UNKNOWN_STACKING_METHOD and "MEDIAN" in str(exc.value)
    with pytest.raises(IoiError) as exc:
        K.stack_frames([])
    assert exc.value.exit_code == ExitCode.STACKING_FAILED
    with pytest.raises(IoiError) as exc:
        K.stack_frames(_frames([np.full((2, 2), np.nan)] * 2))
    assert exc.value.exit_code == ExitCode.STACKING_FAILED


def test_stack_frames_does_not_change_input():
    vals = [np.arange(16.0).reshape(4, 4) + k for k in range(3)]
    frames = _frames(vals)
    before = [(f.science.copy(), f.variance.copy(), f.quality.copy(), f.header.copy()) for f in frames]
    K.stack_frames(frames, method="COADD", clip_sigma=2.0)
    for f, (s, v, q, h) in zip(frames, before):
        np.testing.assert_array_equal(f.science, s)
        np.testing.assert_array_equal(f.variance, v)
        np.testing.assert_array_equal(f.quality, q)
        assert list(f.header.items()) == list(h.items())


def _median_fwhm(image, xy):
    """FWHM = 2 x half-light radius (exact for a Gaussian), median over the stars."""
    import sep

    data = np.nan_to_num(np.ascontiguousarray(image, np.float32))
    bkg = sep.Background(data)
    sub = data - bkg.back()
    r, flag = sep.flux_radius(sub, xy[:, 0], xy[:, 1], np.full(len(xy), 8.0), 0.5, subpix=5)
    return float(np.median(2.0 * r[flag == 0]))


def test_stacked_fwhm_within_1p05_of_single_frame():
    mats = [similarity(), similarity(7.43, -4.61), similarity(-5.27, 6.38), similarity(3.71, 9.14),
            similarity(-8.55, -7.92)]
    f = make_field(matrices=mats, n_stars=80, fwhm=3.0, sky_level=0.0, pattern=0.0, gradient=(0, 0),
                   bad_fraction=0.0, seed=21)
    sel = (f.ref_xy[:, 0] > 25) & (f.ref_xy[:, 0] < 230) & (f.ref_xy[:, 1] > 25) & (f.ref_xy[:, 1] < 230)
    xy = f.ref_xy[sel]
    single = _median_fwhm(f.frames[0].science, xy)
    # the measure itself is right: a pixel-integrated Gaussian has sigma^2 + 1/12
    assert single == pytest.approx(np.hypot(f.fwhm, 1 / (FWHM_TO_SIGMA * np.sqrt(12))), rel=0.05)
    widths = {}
    for order in (3, 1):
        ts = [R.Transform.identity()] + [
            R.fit_transform(f.ref_xy, f.frame_xy(k), geometry="SHIFT") for k in range(1, 5)]
        reg = [f.frames[0]] + [R.resample_frame(f.frames[k], ts[k], order=order) for k in range(1, 5)]
        widths[order] = _median_fwhm(K.stack_frames(reg).frame.science, xy)
    print(f"FWHM single {single:.3f} px, stack cubic {widths[3]:.3f} px "
          f"({widths[3] / single:.3f}x), stack linear {widths[1]:.3f} px ({widths[1] / single:.3f}x)")
    assert widths[3] <= 1.05 * single
    assert widths[3] < widths[1]  # why the cubic is the default


def test_stack_quality_carries_the_flags_of_the_frames_used():
    sci = np.ones((4, 5), np.float32)
    q1 = np.zeros((4, 5), np.uint32)
    q2 = np.zeros((4, 5), np.uint32)
    q1[1, 1] = DQ.JUMP_DET
    q2[2, 2] = DQ.SATURATED | DQ.DO_NOT_USE  # not used: its flag does not propagate
    q1[3, 3] = q2[3, 3] = DQ.DO_NOT_USE | DQ.MASKED  # no frame left
    frames = [Frame(sci, sci, q, fits.Header({"ASICGAIN": 10})) for q in (q1, q2)]
    out = K.stack_frames(frames, method="MEAN").frame
    assert out.quality[1, 1] == DQ.JUMP_DET
    assert out.quality[2, 2] == 0
    assert out.quality[3, 3] == DQ.DO_NOT_USE | DQ.NO_OVERLAP
    assert out.quality[0, 0] == 0


_values = st.sampled_from([0.0, -0.0, 1.5, -2.25, 3e4, 1e-30, np.nan, np.inf, -np.inf])


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 4), rows=st.integers(1, 300))
def test_accumulator_sums_are_those_of_adding_only_where_valid(data, n, rows):
    """The masked-bits sums of StackAccumulator.add against the plain rule, bit for bit:
    every frame in order, a value added where it is finite and not DO_NOT_USE (its
    variance where that is finite too), flags OR-ed where it is used.  Rows beyond
    one chunk, signed zeros, NaN and infinities included."""
    shape = (rows, 3)
    frames = []
    for _ in range(n):
        sci = data.draw(hnp.arrays(np.float32, shape, elements=_values))
        var = data.draw(hnp.arrays(np.float32, shape, elements=_values))
        q = data.draw(hnp.arrays(np.uint32, shape, elements=st.sampled_from(
            [0, int(DQ.DO_NOT_USE), int(DQ.MASKED), int(DQ.DO_NOT_USE | DQ.NO_OVERLAP), 1 << 15])))
        frames.append(Frame(science=sci, variance=var, quality=q, header=fits.Header()))
    acc = K.StackAccumulator("COADD")
    total, vtot = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    used, quality = np.zeros(shape, np.int16), np.zeros(shape, np.uint32)
    for f in frames:
        acc.add(f)
        ok = np.isfinite(f.science) & ((f.quality & DQ.DO_NOT_USE) == 0)
        total = np.where(ok, total + f.science, total)
        vok = ok & np.isfinite(f.variance)
        vtot = np.where(vok, vtot + f.variance, vtot)
        used += ok
        quality = np.where(ok, quality | f.quality, quality)
    assert acc.total.tobytes() == total.tobytes()
    assert acc.vtot.tobytes() == vtot.tobytes()
    assert np.array_equal(acc.used, used) and np.array_equal(acc.quality, quality)
