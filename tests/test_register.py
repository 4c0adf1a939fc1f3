"""Registration (SPEC 2.7) on synthetic star fields with known dithers."""

import numpy as np
import pytest
from _field_synth import make_field, similarity

from ioi.errors import ConfigError, ExitCode, IoiError
from ioi.frame import DQ, Frame
from ioi.stages import register as R

CASES = {
    "SHIFT": [similarity(), similarity(12.37, -7.61), similarity(-5.52, 9.18)],
    "RSCALE": [similarity(), similarity(6.3, -4.2, 0.3, 1.002, (128, 128)),
               similarity(-3.1, 5.4, -0.25, 0.998, (128, 128))],
}


def _inside(xy, n=256, edge=3):
    return (xy[:, 0] > edge) & (xy[:, 0] < n - 1 - edge) & (xy[:, 1] > edge) & (xy[:, 1] < n - 1 - edge)


@pytest.fixture(scope="module", params=list(CASES))
def registered(request):
    geo = request.param
    f = make_field(n_frames=3, matrices=CASES[geo], n_stars=120, seed=11)
    out, ts = R.register_frames(f.frames, geometry=geo)
    return geo, f, out, ts


def test_transform_recovered_within_0p05_px(registered):
    geo, f, out, ts = registered
    for k in (1, 2):
        truth = f.frame_xy(k)
        ins = _inside(truth)
        pred = ts[k].apply(f.ref_xy)
        rms = np.sqrt(np.mean(np.sum((pred - truth)[ins] ** 2, axis=1)))
        assert rms < 0.05, (geo, k, rms)
        assert ts[k].n_matched >= 20
        assert ts[k].rms_px < 0.1  # centroid noise of ~S/N 100+ stars
        if geo == "RSCALE":
            true_rot = np.degrees(np.arctan2(f.matrices[k][1, 0], f.matrices[k][0, 0]))
            assert ts[k].rotation_deg == pytest.approx(true_rot, abs=0.01)
            assert ts[k].scale == pytest.approx(np.hypot(*f.matrices[k][:, 0]), abs=1e-4)
        else:
            assert ts[k].rotation_deg == 0.0 and ts[k].scale == 1.0
            assert ts[k].dx == pytest.approx(f.matrices[k][0, 2], abs=0.02)
            assert ts[k].dy == pytest.approx(f.matrices[k][1, 2], abs=0.02)
        h = out[k].header
        assert h["L1REG"] == 1 and h["REGGEOM"] == geo and h["REGNMAT"] == ts[k].n_matched


def test_resampled_stars_land_on_reference_positions(registered):
    geo, f, out, ts = registered
    for k in (1, 2):
        src = R.detect_sources(out[k].science, thresh=10.0)
        xy = np.column_stack([src["x"], src["y"]])
        ri, i = R._mutual_nearest(f.ref_xy, xy, 1.0)
        bright = (f.flux[ri] > 8e3) & _inside(f.ref_xy[ri], edge=12)
        d = xy[i][bright] - f.ref_xy[ri][bright]
        # measured positions: transform error + centroid noise + interpolation
        # (median: a star next to a bad pixel or a neighbour may be off by more)
        dist = np.hypot(*d.T)
        assert np.median(dist) < 0.03 and np.percentile(dist, 80) < 0.05
        assert bright.sum() >= 10


def test_resample_linear_ramp_exact():
    yy, xx = np.mgrid[:64, :64].astype(np.float32)
    frame = Frame.from_science(5.0 * xx - 2.0 * yy + 100.0)
    t = R.fit_transform(np.array([[10.0, 10.0], [40.0, 30.0]]),
                        np.array([[12.3, 8.6], [42.3, 28.6]]), geometry="SHIFT")
    out = R.resample_frame(frame, t)
    expect = 5.0 * (xx + 2.3) - 2.0 * (yy - 1.4) + 100.0
    inner = (slice(8, 52), slice(8, 52))  # away from spline edge effects
    np.testing.assert_allclose(out.science[inner], expect[inner], atol=1e-3)


def test_no_overlap_pixels_are_nan_and_flagged():
    rng = np.random.default_rng(2)
    frame = Frame.from_science(rng.normal(0, 1, (64, 64)))
    t = R.Transform(matrix=np.array([[1.0, 0.0, 20.4], [0.0, 1.0, -10.2]]), dx=20.4, dy=-10.2)
    out = R.resample_frame(frame, t)
    # ref x maps to x + 20.4: ref columns > 63.5 - 20.4 = 43.1 fall outside; rows < 9.7 too
    no = (out.quality & DQ.NO_OVERLAP) != 0
    assert no[:, 44:].all() and no[:10, :].all()
    assert not no[10:, :43].any()
    assert np.isnan(out.science[no]).all() and np.isfinite(out.science[~no]).all()
    assert (out.quality[no] & DQ.DO_NOT_USE).all()


@pytest.mark.parametrize("threshold, n_masked", [(20.0, 2), (60.0, 0)])
def test_bad_mask_threshold(threshold, n_masked):
    sci = np.full((32, 32), 10.0, np.float32)
    sci[16, 16] = np.nan
    frame = Frame.from_science(sci)
    # half-pixel shift in x: the bad pixel's 100 spreads as 50 % over two output pixels
    t = R.Transform(matrix=np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]), dx=0.5)
    out = R.resample_frame(frame, t, bad_threshold=threshold)
    masked = (out.quality & DQ.MASKED) != 0
    assert masked.sum() == n_masked
    assert np.isnan(out.science).sum() == n_masked
    if n_masked:
        assert masked[16, 15] and masked[16, 16]
    good = np.isfinite(out.science) & ((out.quality & DQ.NO_OVERLAP) == 0)
    # NaN-safe: the weight keeps the filled zero from pulling neighbours down
    np.testing.assert_allclose(out.science[good], 10.0, atol=1e-3)


def test_bad_region_zeroed_for_detection_only():
    f = make_field(n_frames=2, matrices=CASES["SHIFT"][:2], n_stars=80, seed=4, sky_level=0.0,
                   pattern=0.0, gradient=(0.0, 0.0))
    frames = []
    for fr in f.frames:
        sci = fr.science.copy()
        sci[:, 200:216] += np.where(np.arange(256)[:, None] % 8 < 2, 3000.0, 0.0)  # a bad channel
        frames.append(fr.replace(science=sci))
    src_all = R.detect_sources(frames[0].science)
    src_cut = R.detect_sources(frames[0].science, bad_regions=["0:256,200:216"])
    assert ((src_all["x"] > 199) & (src_all["x"] < 216)).sum() >= 4  # the stripes are detected
    assert not ((src_cut["x"] > 199.5) & (src_cut["x"] < 215.5)).any()
    out, ts = R.register_frames(frames, bad_regions=[R.parse_bad_region("0:256,200:216")])
    truth = f.frame_xy(1)
    ins = _inside(truth)
    assert np.sqrt(np.mean(np.sum((ts[1].apply(f.ref_xy) - truth)[ins] ** 2, axis=1))) < 0.05
    # the data themselves are not zeroed
    np.testing.assert_array_equal(out[0].science[:, 200:216], frames[0].science[:, 200:216])
    assert np.nanmax(out[1].science[:, 190:210]) > 1000


def test_parse_bad_region():
    assert R.parse_bad_region("10:20,30:40") == (slice(10, 20), slice(30, 40))
    assert R.parse_bad_region(" 0:2040 , 1536:1600 ; channel 25") == (slice(0, 2040), slice(1536, 1600))
    assert R.parse_bad_region("0:0,0:0") is None
    assert R.parse_bad_region("") is None
    for bad in ("10:20", "a:b,c:d", "1:2,3"):
        with pytest.raises(ConfigError) as exc:
            R.parse_bad_region(bad)
        assert exc.value.exit_code == ExitCode.CONFIG_KEY_MISSING and bad in str(exc.value)


def test_iraf_and_unknown_algorithm_exit_19():
    frames = [Frame.from_science(np.zeros((16, 16)))] * 2
    with pytest.raises(IoiError) as exc:
        R.register_frames(frames, algorithm="IRAF")
    assert exc.value.exit_code == ExitCode.UNKNOWN_REGISTRATION_METHOD
    assert "IRAF registration is not available" in str(exc.value)
    with pytest.raises(IoiError) as exc:
        R.register_frames(frames, algorithm="ASTROMETRY")
    assert exc.value.exit_code == ExitCode.UNKNOWN_REGISTRATION_METHOD
    assert "SCIPY" in str(exc.value) and "ASTROMETRY" in str(exc.value)
    with pytest.raises(IoiError) as exc:
        R.register_frames(frames, geometry="AFFINE")
    assert exc.value.exit_code == ExitCode.UNKNOWN_REGISTRATION_METHOD


def test_too_few_stars_registration_error_18():
    f = make_field(n_frames=2, n_stars=2, margin=-40, seed=6)
    with pytest.raises(R.RegistrationError) as exc:
        R.register_frames(f.frames)
    assert exc.value.exit_code == ExitCode.REGISTRATION_FAILED
    assert isinstance(exc.value, IoiError)


def test_fit_transform_rejects_outlier():
    rng = np.random.default_rng(8)
    ref = rng.uniform(0, 200, (40, 2))
    xy = ref + [3.25, -1.5] + rng.normal(0, 0.01, ref.shape)
    xy[7] += [1.5, 0.0]  # a mismatched star
    t = R.fit_transform(ref, xy, geometry="SHIFT")
    assert t.n_matched == 39
    assert t.dx == pytest.approx(3.25, abs=0.01) and t.dy == pytest.approx(-1.5, abs=0.01)


def test_register_frames_does_not_change_input():
    f = make_field(n_frames=2, matrices=CASES["SHIFT"][:2], seed=9)
    before = [(x.science.copy(), x.variance.copy(), x.quality.copy()) for x in f.frames]
    R.register_frames(f.frames)
    for x, (s, v, q) in zip(f.frames, before):
        np.testing.assert_array_equal(x.science, s)
        np.testing.assert_array_equal(x.variance, v)
        np.testing.assert_array_equal(x.quality, q)
        assert "L1REG" not in x.header


def test_weighted_fit_trusts_precise_centroids():
    """With per-star position errors, bright (precise) stars dominate the fit."""
    rng = np.random.default_rng(17)
    n = 200
    ref = rng.uniform(0, 1000, (n, 2))
    ang, s = np.radians(0.3), 1.002
    m = np.array([[s * np.cos(ang), -s * np.sin(ang), 12.3], [s * np.sin(ang), s * np.cos(ang), -4.5]])
    err = np.where(rng.random(n) < 0.2, 0.01, 0.5)  # 20 % bright stars, the rest faint
    pos = ref @ m[:, :2].T + m[:, 2] + rng.normal(size=(n, 2)) * err[:, None]
    weighted = R.fit_transform(ref, pos, geometry="RSCALE", errors=err)
    plain = R.fit_transform(ref, pos, geometry="RSCALE")

    def worst(t):
        return np.abs(ref @ t.matrix[:, :2].T + t.matrix[:, 2] - (ref @ m[:, :2].T + m[:, 2])).max()

    assert worst(weighted) < 0.01
    assert worst(weighted) < 0.5 * worst(plain)
