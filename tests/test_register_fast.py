"""Registration fast paths: separable SHIFT resampling, sparse bad-pixel fill, translation vote,
cheaper background for sky-subtracted frames -- each against the general method it replaces."""

import math

import numpy as np
import pytest
from _field_synth import make_field, similarity
from scipy import ndimage

from ioi.frame import DQ, Frame
from ioi.stages import register as R
from ioi.stages.sky import fill_nan_box_mean


def _reference_resample(frame, dx, dy, *, order=3, bad_threshold=20.0):
    """The general method for a pure shift: ndimage.shift of each plane (what the separable path replaces)."""
    ny, nx = frame.shape
    bad = ~np.isfinite(frame.science) | ((frame.quality & DQ.DO_NOT_USE) != 0)
    sci = fill_nan_box_mean(np.where(bad, np.nan, frame.science), box=5, max_passes=1)
    sci = np.where(np.isfinite(sci), sci, 0.0).astype(np.float32)
    var0 = np.where(bad | ~np.isfinite(frame.variance), 0.0, frame.variance).astype(np.float32)

    def warp(a, k, dtype=np.float32):
        return ndimage.shift(a, (-dy, -dx), order=k, mode="nearest", prefilter=k > 1, output=dtype)

    science = warp(sci, order)
    badmask = warp(np.where(bad, 100.0, 0.0).astype(np.float32), 1)
    w1 = 1.0 - badmask / np.float32(100.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        variance = warp(var0, 1) / w1
    quality = warp(frame.quality, 0, np.uint32) & ~np.uint32(DQ.DO_NOT_USE | DQ.MASKED)
    xin = np.arange(nx)[None, :] + dx
    yin = np.arange(ny)[:, None] + dy
    outside = (xin < -0.5) | (xin > nx - 0.5) | (yin < -0.5) | (yin > ny - 0.5)
    masked = ~outside & ((badmask > bad_threshold) | ~(w1 > 1e-6))
    science[masked | outside] = np.nan
    variance[masked | outside] = np.nan
    quality[masked] |= np.uint32(DQ.DO_NOT_USE | DQ.MASKED)
    quality[outside] = np.uint32(DQ.NO_OVERLAP | DQ.DO_NOT_USE)
    return science, variance, quality, badmask


def _random_frame(rng, shape, bad_fraction):
    sci = rng.normal(100.0, 10.0, shape).astype(np.float32)
    sci += np.float32(3e4) * (rng.random(shape) < 0.01)  # a few sharp peaks
    var = rng.uniform(1.0, 5.0, shape).astype(np.float32)
    q = np.zeros(shape, np.uint32)
    bad = rng.random(shape) < bad_fraction
    sci[bad & (rng.random(shape) < 0.5)] = np.nan  # half NaN, half flagged only
    q[bad] |= np.uint32(DQ.DO_NOT_USE | DQ.DEAD)
    q[rng.random(shape) < 0.05] |= np.uint32(DQ.SATURATED)  # a bit that must travel
    var[rng.random(shape) < 0.02] = np.nan
    return Frame.from_science(sci, variance=var, quality=q)


SHIFTS = [(0.0, 0.0), (2.0, -3.0), (0.5, -0.5), (-2.5, 1.5), (0.37, -0.81), (-4.62, 3.09), (12.7, 0.2),
          (-30.4, 25.9), (40.0, 0.3), (63.0, -1.0)]


@pytest.mark.parametrize("order", [3, 1, 0])
@pytest.mark.parametrize("bad_fraction", [0.0, 0.02, 0.3])
@pytest.mark.parametrize("shape", [(48, 40), (33, 51)])
@pytest.mark.parametrize("chunk_rows", [64, 5])
def test_separable_shift_matches_ndimage_shift(order, bad_fraction, shape, chunk_rows, monkeypatch):
    monkeypatch.setattr(R, "_CHUNK_ROWS", chunk_rows)  # rows interpolated along x at a time
    rng = np.random.default_rng(int(100 * bad_fraction) + order + shape[0])
    frame = _random_frame(rng, shape, bad_fraction)
    for dx, dy in SHIFTS:
        t = R.Transform(matrix=np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]]), dx=dx, dy=dy)
        for threshold in (20.0, 60.0):
            out = R.resample_frame(frame, t, order=order, bad_threshold=threshold)
            sci, var, q, badmask = _reference_resample(frame, dx, dy, order=order, bad_threshold=threshold)
            # A resampled bad mask exactly at the threshold (e.g. 60 from weights 0.6 and 0.4)
            # may round either way: float32 sums here, float64 in ndimage.
            use = np.abs(badmask - threshold) > 1e-3
            assert use.mean() > 0.5
            np.testing.assert_array_equal(out.quality[use], q[use])
            np.testing.assert_array_equal(np.isnan(out.science[use]), np.isnan(sci[use]))
            np.testing.assert_array_equal(np.isnan(out.variance[use]), np.isnan(var[use]))
            # float32 coefficients instead of float64: a few ulp of the 3e4 peaks
            np.testing.assert_allclose(out.science[use], sci[use], rtol=0, atol=0.02)
            np.testing.assert_allclose(out.variance[use], var[use], rtol=1e-5)


@pytest.mark.parametrize("d", [0.0, 0.5, -0.5, 0.37, -4.62, 12.999, 63.0])
def test_cubic_kernel_is_ndimage_prefilter_and_taps_in_one(d):
    """The cubic shift as one truncated kernel over the edge-extended signal: ndimage's
    prefiltered cubic interpolation (mode="nearest") to float64 rounding and the
    truncation (|z|^14), at the edges too; its weights sum to 1 (a constant stays)."""
    rng = np.random.default_rng(5)
    s = rng.normal(100.0, 10.0, 150)
    s[40] = 3e4  # a sharp peak
    first, g = R._cubic_kernel(d)
    assert g.size == 2 * R._CUBIC_RADIUS + 2
    assert g.sum() == pytest.approx(1.0, abs=1e-12)
    want = ndimage.shift(s, -d, order=3, mode="nearest")
    pad = R._CUBIC_PAD + abs(math.floor(d))
    ext = np.pad(s, pad, mode="edge")
    inside = [i for i in range(s.size) if -0.5 <= i + d <= s.size - 0.5]
    got = [sum(w * ext[i + first + k + pad] for k, w in enumerate(g)) for i in inside]
    np.testing.assert_allclose(got, want[inside], rtol=0, atol=3e4 * 1e-7)


@pytest.mark.parametrize("order", [3, 1])
@pytest.mark.parametrize("threads", [2, 3])
def test_shift_on_several_threads_is_the_same_to_the_bit(order, threads, monkeypatch):
    """The last frame of a multrun is resampled on every thread: column blocks of the
    prefilter and row chunks apart, the same numbers as on one."""
    monkeypatch.setattr(R, "_CHUNK_ROWS", 7)  # many chunks, the last one short
    rng = np.random.default_rng(11 + order)
    frame = _random_frame(rng, (61, 47), 0.05)
    for dx, dy in SHIFTS:
        t = R.Transform(matrix=np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]]), dx=dx, dy=dy)
        one = R.resample_frame(frame, t, order=order)
        many = R.resample_frame(frame, t, order=order, threads=threads)
        for name in ("science", "variance", "quality"):
            np.testing.assert_array_equal(getattr(many, name), getattr(one, name), err_msg=f"{name} {dx} {dy}")


@pytest.mark.parametrize("pad", [2, 12])
def test_filled_padded_is_fill_then_edge_pad(pad):
    """The padded copy the separable shift interpolates: the box-mean fill, then edge padding."""
    rng = np.random.default_rng(pad)
    sci = rng.normal(0.0, 1.0, (31, 26)).astype(np.float32)
    bad = rng.random(sci.shape) < 0.1
    bad[0, 0] = bad[-1, 3] = bad[5, -1] = True  # boxes clipped by the edges
    bad[10:16, 10:16] = True  # boxes without a good pixel: 0
    sci[bad & (rng.random(sci.shape) < 0.5)] = np.nan
    want = np.pad(R._fill_bad(sci, bad), pad, mode="edge")
    got = R._filled_padded(sci, bad, pad)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)  # float64 sums in another order
    np.testing.assert_array_equal(got[pad:-pad, pad:-pad][~bad], sci[~bad])
    assert got[pad + 12, pad + 12] == 0.0


def test_resample_frame_does_not_change_input():
    rng = np.random.default_rng(3)
    frame = _random_frame(rng, (40, 40), 0.05)
    before = (frame.science.copy(), frame.variance.copy(), frame.quality.copy())
    R.resample_frame(frame, R.Transform(matrix=np.array([[1.0, 0.0, 1.3], [0.0, 1.0, -0.4]])))
    for a, b in zip((frame.science, frame.variance, frame.quality), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fraction", [0.0005, 0.02, 0.2, 1.0])
def test_fill_bad_is_the_box_mean(fraction):
    rng = np.random.default_rng(4)
    sci = rng.normal(0.0, 1.0, (37, 53)).astype(np.float32)
    bad = rng.random(sci.shape) < fraction
    bad[0, 0] = bad[-1, -1] = True  # corners: boxes clipped by the edges
    expect = fill_nan_box_mean(np.where(bad, np.nan, sci), box=5, max_passes=1)
    expect = np.where(np.isfinite(expect), expect, 0.0)
    got = R._fill_bad(sci, bad)
    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got[~bad], sci[~bad])


def test_vote_translation_finds_the_shift_and_declines_ambiguity():
    rng = np.random.default_rng(6)
    ref = rng.uniform(0, 1000, (60, 2))
    assert np.allclose(R._vote_translation(ref, ref + [31.4, -12.6], 2.0), [31.4, -12.6])
    # half the frame's sources fixed on the detector (artefacts vote for (0, 0)): no clear winner
    mixed = np.vstack([ref[:25] + [31.4, -12.6], ref[25:50]])[rng.permutation(50)]
    assert R._vote_translation(ref, mixed, 2.0) is None
    assert R._vote_translation(ref, rng.uniform(0, 1000, (60, 2)), 2.0) is None


def test_shift_match_by_vote_equals_asterism_match(monkeypatch):
    f = make_field(n_frames=2, matrices=[similarity(), similarity(12.37, -7.61)], n_stars=120, seed=11)
    ref = R.detect_sources(f.frames[0].science)
    src = R.detect_sources(f.frames[1].science)
    by_vote = R.match_sources(ref, src, geometry="SHIFT")
    monkeypatch.setattr(R, "_vote_translation", lambda *a: None)
    by_asterism = R.match_sources(ref, src, geometry="SHIFT")
    for a, b in zip(by_vote, by_asterism):
        np.testing.assert_array_equal(a, b)


def test_sky_subtracted_detection_matches_full_background():
    f = make_field(n_frames=3, n_stars=120, seed=12, sky_level=0.0, gradient=(0.0, 0.0))
    full = R.find_transforms(f.frames)
    cheap = R.find_transforms(f.frames, sky_subtracted=True)
    for k in (1, 2):
        truth = f.frame_xy(k)
        ins = (truth > 5).all(axis=1) & (truth < 250).all(axis=1)
        for t in (full[k], cheap[k]):
            rms = np.sqrt(np.mean(np.sum((t.apply(f.ref_xy) - truth)[ins] ** 2, axis=1)))
            assert rms < 0.05
        assert abs(cheap[k].dx - full[k].dx) < 0.01 and abs(cheap[k].dy - full[k].dy) < 0.01
        assert abs(cheap[k].n_matched - full[k].n_matched) <= 0.1 * full[k].n_matched
    a = R.detect_sources(f.frames[0].science)
    b = R.detect_sources(f.frames[0].science, sky_subtracted=True)
    assert abs(len(a) - len(b)) <= 0.05 * len(a)


@pytest.mark.parametrize("side, step", [(2040, 4), (1020, 2)])
def test_residual_background_on_a_subsample_removes_a_smooth_background(side, step):
    """A sky-subtracted frame's residual background, estimated on every ``step``-th pixel
    (4 on a full frame, 2 on a 2x2 binned one), is subtracted from every pixel of its
    block: what is left is the noise, with the right rms, wherever in the frame."""
    from ioi.stages import _sep

    assert (4 if side // 4 >= _sep._BACKGROUND_MIN_SIDE else 2) == step
    rng = np.random.default_rng(side)
    yy, xx = np.mgrid[:side, :side].astype(np.float32) / side
    residual = 6.0 * xx - 4.0 * yy + 3.0 * np.sin(3.0 * xx)  # smooth, several sigma across
    data = (residual + rng.normal(0.0, 2.0, (side, side))).astype(np.float32)
    bad = np.zeros(data.shape, dtype=bool)
    bad[100:140, 200:260] = True  # masked pixels are left out of the background
    data[bad] = 0.0
    rms = _sep._subtract_background(data, bad, sky_subtracted=True)
    assert rms == pytest.approx(2.0, rel=0.02)
    for oy in range(step):  # every pixel of the blocks, not only the sampled ones
        for ox in range(step):
            left = data[oy::step, ox::step][~bad[oy::step, ox::step]]
            assert abs(float(np.mean(left))) < 0.05
            assert float(np.std(left)) == pytest.approx(2.0, rel=0.03)
    edge = data[-64:, -64:]  # a corner (the mesh interpolation's extrapolation)
    assert abs(float(np.mean(edge))) < 0.3


def test_centroids_from_guesses_match_full_detection():
    """Starting positions from elsewhere (the sky stage's 2x2 block-mean detections) give the
    same stars at the same centroids as sep's own extraction, and the transform is as good."""
    from _field_synth import make_field

    from ioi.stages import sky as S

    f = make_field(n_frames=3, n_stars=120, seed=21, sky_level=0.0, pattern=0.0, gradient=(0.0, 0.0))
    model = S.model_skies(f.frames, keep_sources=True)
    assert model.sources is not None and len(model.sources) == 3
    full, guessed = [], []
    for k, fr in enumerate(f.frames):
        mask = (fr.quality & 1) != 0
        full.append(R.detect_sources(fr.science, mask=mask))
        guessed.append(R.detect_sources(fr.science, mask=mask, guesses=model.sources[k]))
        a, b = full[-1], guessed[-1]
        d = np.hypot(a["x"][:, None] - b["x"][None], a["y"][:, None] - b["y"][None])
        near = d.min(axis=1) < 0.5
        assert near.mean() > 0.9  # nearly every star of the full detection is found again
        assert np.median(d.min(axis=1)[near]) < 0.01  # at the same centroid
    finder = R.TransformFinder()
    ts = [finder.add(fr, model.sources[k]) for k, fr in enumerate(f.frames)]
    for k in (1, 2):
        truth = f.frame_xy(k)
        ok = (truth[:, 0] > 5) & (truth[:, 0] < 250) & (truth[:, 1] > 5) & (truth[:, 1] < 250)
        err = ts[k].apply(f.ref_xy)[ok] - truth[ok]
        assert np.sqrt(np.mean(np.sum(err**2, axis=1))) < 0.05
    # no usable starting position: no sources (not an error)
    empty = np.zeros(0, dtype=model.sources[0].dtype)
    assert len(R.detect_sources(f.frames[0].science, guesses=empty)) == 0


@pytest.mark.parametrize("matrix", [[[1.0, 0.0, 3.4], [0.0, 1.0, -7.7]],  # separable shift
                                    [[0.9998, -0.0175, 2.1], [0.0175, 0.9998, 1.3]]])  # rotation: ndimage
@pytest.mark.parametrize("chunk_rows", [64, 5])
def test_resampling_into_reused_planes_writes_every_pixel(matrix, chunk_rows, monkeypatch):
    """out= (planes reused from an earlier frame, full of old values): the same frame as new
    planes give, in those planes."""
    monkeypatch.setattr(R, "_CHUNK_ROWS", chunk_rows)
    rng = np.random.default_rng(8)
    frame = _random_frame(rng, (41, 37), 0.05)
    t = R.Transform(matrix=np.array(matrix))
    want = R.resample_frame(frame, t)
    out = (np.full(frame.shape, 7.0, np.float32), np.full(frame.shape, -3.0, np.float32),
           np.full(frame.shape, 12345, np.uint16))
    got = R.resample_frame(frame, t, out=out)
    for plane, name in zip(out, ("science", "variance", "quality")):
        assert getattr(got, name) is plane
        np.testing.assert_array_equal(plane, getattr(want, name))
    with pytest.raises(ValueError, match="out must be"):
        R.resample_frame(frame, t, out=(out[0], out[1], out[1]))
