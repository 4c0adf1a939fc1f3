"""Sky subtraction (SPEC 2.6) on synthetic dithered star fields with known sky."""

import math
import warnings

import numpy as np
import pytest
from _field_synth import make_field, similarity, star_free_mask

from ioi.errors import ExitCode, IoiError, StageWarning
from ioi.frame import DQ, Frame
from ioi.stages import sky as S

LEVELS = np.array([0.0, 37.5, -22.0, 12.25, -45.0])


@pytest.fixture(scope="module")
def field():
    return make_field(level_offsets=LEVELS.copy())


@pytest.mark.parametrize("algorithm", S.SKY_ALGORITHMS)
@pytest.mark.parametrize("peers_only", [True, False])
def test_sky_residual_is_zero_away_from_stars(field, algorithm, peers_only):
    res = S.subtract_sky(field.frames, algorithm=algorithm, peers_only=peers_only)
    for k, fr in enumerate(res.frames):
        m = star_free_mask(field, k)
        med = np.median(fr.science[m])
        # the sky-subtracted frame away from stars must be zero within 0.1 noise sigma
        assert abs(med) < 0.1 * field.noise, (k, med)
        # and the sky itself tracks the true (gradient + pattern + level) sky
        err = (res.skies[k] - field.sky[k])[m]
        assert abs(np.median(err)) < 0.1 * field.noise
        # a 4-frame median has sigma ~0.59 (Gaussian, exact order statistics); masking adds a bit
        assert np.std(err) < 0.7 * field.noise
        assert fr.header["L1SKYSUB"] == 1
        assert fr.header["SKYALG"] == algorithm
        assert fr.header["SKYPEERS"] == int(peers_only)


def test_level_offsets_match_truth(field):
    res = S.subtract_sky(field.frames, mask_sources=False)
    truth = LEVELS[:, None] - LEVELS[None, :]
    # clipped mean of ~20000 differences of sigma ~14 ADU: ~0.1 ADU; stars add a little
    np.testing.assert_allclose(res.offsets, truth, atol=0.5)
    np.testing.assert_allclose(res.offsets, -res.offsets.T, atol=1e-12)
    np.testing.assert_allclose(res.levels - res.levels[0], LEVELS - LEVELS[0], atol=0.5)
    one = S.level_offset(field.frames[1], field.frames[2], sigma=3.0)
    assert abs(one - (LEVELS[1] - LEVELS[2])) < 0.5


def test_median_skies_equal_explicit_peer_median(field):
    rng = np.random.default_rng(4)
    frames = list(field.frames)
    for k in (0, 2):  # NaNs in some frames only, so peers have 2..4 finite values
        sci = frames[k].science.copy()
        sci[rng.random(sci.shape) < 0.05] = np.nan
        frames[k] = frames[k].replace(science=sci)
    res = S.subtract_sky(frames, mask_sources=False)
    stack = np.stack([f.science for f in frames])
    lv = res.levels
    for i in (0, 2, 3):
        peers = [j for j in range(len(stack)) if j != i]
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels: NaN expected
            expect = np.nanmedian(stack[peers] - lv[peers, None, None], axis=0) + lv[i]
        got, uns = S.build_sky(stack, i, peers_only=True, algorithm="MEDIAN", levels=lv)
        finite = np.isfinite(expect)
        np.testing.assert_allclose(got[finite], expect[finite], atol=1e-3)
        np.testing.assert_allclose(res.skies[i][finite], expect[finite], atol=1e-3)
        assert not uns.any()


def test_variance_adds_sky_variance(field):
    res = S.subtract_sky(field.frames, mask_sources=False)
    m = star_free_mask(field, 0)
    # 4 peers of variance 100 each: median variance (pi/2) * 100 / 4
    expect = field.noise**2 * (1 + (math.pi / 2) / 4)
    np.testing.assert_allclose(np.median(res.frames[0].variance[m]), expect, rtol=1e-5)


def test_two_pass_masking_reduces_bias_near_extended_source():
    mats = [similarity(*d) for d in [(0, 0), (50.3, 0.4), (-0.6, 50.2), (-50.1, -0.3), (0.2, -49.8)]]
    f = make_field(matrices=mats, margin=60, n_stars=80, extended=(128, 128, 3e5, 15.0), seed=3)
    yy, xx = np.mgrid[:256, :256]
    bias = {}
    for two_pass in (False, True):
        res = S.subtract_sky(f.frames, peers_only=False, mask_sources=two_pass)
        vals = []
        for k, fr in enumerate(res.frames):
            cx, cy = f.matrices[k][:, :2] @ [128, 128] + f.matrices[k][:, 2]
            ring = ((xx - cx) ** 2 + (yy - cy) ** 2 < 30**2) & ~f.bad
            vals.append(np.mean((fr.science - f.sources[k])[ring]))
        bias[two_pass] = float(np.mean(vals))
        if two_pass:
            assert res.source_masks is not None
            assert all(m[int(round(f.matrices[k][1, 2] + 128)), int(round(f.matrices[k][0, 2] + 128))]
                       for k, m in enumerate(res.source_masks))
            assert all(fr.quality[m].all() for fr, m in zip(res.frames, res.source_masks))
    print(f"mean sky bias within 30 px of the extended source: one pass {bias[False]:.2f} ADU, "
          f"two-pass {bias[True]:.2f} ADU (noise {f.noise} ADU)")
    assert bias[False] < -0.1 * f.noise  # the galaxy biases a one-pass sky high
    assert abs(bias[True]) < 0.25 * abs(bias[False])
    assert abs(bias[True]) < 0.05 * f.noise


def test_fill_nan_box_mean_known_values():
    yy, xx = np.mgrid[:32, :32].astype(np.float32)
    ramp = 3.0 * xx + 2.0 * yy + 7.0
    img = ramp.copy()
    img[10, 10] = np.nan
    img[20:27, 5:12] = np.nan  # a 7x7 hole
    out = S.fill_nan_box_mean(img, box=3, max_passes=1)
    assert out[10, 10] == pytest.approx(ramp[10, 10], abs=1e-4)  # mean of a linear ramp
    assert np.isnan(out[23, 8])  # the hole's inside: its 3x3 box is all NaN
    assert np.isfinite(out[20, 5])  # the rim is filled
    full = S.fill_nan_box_mean(img, box=3, max_passes=None)
    assert np.isfinite(full).all()
    np.testing.assert_array_equal(full[np.isfinite(img)], img[np.isfinite(img)])
    assert np.isnan(S.fill_nan_box_mean(np.full((4, 4), np.nan), box=3)).all()


def test_fill_nan_box_mean_does_not_change_input():
    img = np.ones((8, 8), np.float32)
    img[3, 3] = np.nan
    before = img.copy()
    S.fill_nan_box_mean(img, box=3)
    np.testing.assert_array_equal(img, before)


def test_robust_combine_rejects_outlier_frame():
    rng = np.random.default_rng(5)
    stack = rng.normal(100.0, 1.0, (9, 64, 64)).astype(np.float32)
    stack[4] += 50.0  # one frame far off at every pixel
    stack[2, :8] = np.nan
    tol = 3 * 1.3 / math.sqrt(8 * 64 * 64)  # 3 sigma of the mean over pixels
    tukey, ok = S.robust_combine(stack, algorithm="TUKEY", scale=1.0)
    assert ok.all()
    assert abs(tukey.mean() - 100.0) < tol  # the biweight ignores it entirely
    huber, ok = S.robust_combine(stack, algorithm="HUBER", scale=1.0)
    assert ok.all()
    assert abs(huber.mean() - 100.0) < 0.3  # Huber: bounded influence, ~c*scale/n
    med, ok = S.robust_combine(stack, algorithm="MEDIAN")
    assert abs(med.mean() - 100.0) < 0.3
    assert np.isnan(S.robust_combine(np.full((3, 2, 2), np.nan), algorithm="TUKEY", scale=1.0)[0]).all()


def test_convergence_fallback_and_unsolved_pixels(field):
    stack = np.stack([f.science for f in field.frames])
    med, _ = S.build_sky(stack, 1, algorithm="MEDIAN")
    # one iteration cannot converge anywhere: more than 1 % unsolved -> the median
    fb, uns = S.build_sky(stack, 1, algorithm="TUKEY", max_iterations=1, max_unsolved_percentage=1.0)
    np.testing.assert_array_equal(np.isnan(fb), np.isnan(med))
    np.testing.assert_allclose(fb[np.isfinite(med)], med[np.isfinite(med)])
    assert not uns.any()
    # allowing 100 %: the unconverged pixels become NaN
    sky, uns = S.build_sky(stack, 1, algorithm="TUKEY", max_iterations=1, max_unsolved_percentage=100)
    assert uns.sum() > 0.5 * uns.size
    assert np.isnan(sky[uns]).all()


def test_unknown_algorithm_exit_38(field):
    with pytest.raises(IoiError) as exc:
        S.subtract_sky(field.frames, algorithm="MODE")
    assert exc.value.exit_code == ExitCode.UNKNOWN_SKY_ALGORITHM
    assert "MODE" in str(exc.value)


def test_clipping_left_nothing_exit_25():
    a = np.ones((16, 16), np.float32)
    with pytest.raises(IoiError) as exc:
        S.level_offset(a, np.full_like(a, np.nan), sigma=3.0)
    assert exc.value.exit_code == ExitCode.SKY_CLIP_EMPTY
    frames = [Frame.from_science(a), Frame.from_science(np.full_like(a, np.nan))]
    with pytest.raises(IoiError) as exc:
        S.subtract_sky(frames)
    assert exc.value.exit_code == ExitCode.SKY_CLIP_EMPTY


def test_nan_left_in_sky_warns_30(field):
    frames = []
    for f in field.frames:
        sci = f.science.copy()
        sci[100:120, 100:120] = np.nan  # same dead block in every frame: no sky there
        frames.append(f.replace(science=sci))
    with pytest.warns(StageWarning) as rec:
        res = S.subtract_sky(frames, smoothing_box_size=5)
    assert {w.message.exit_code for w in rec} == {ExitCode.SKY_BAD_PIXELS_REMAIN}
    q = res.frames[0].quality
    assert (q[108:112, 108:112] & DQ.NO_SKY).all()
    assert (q[108:112, 108:112] & DQ.DO_NOT_USE).all()
    # the box fills the block's rim, so only its inside (box 5 -> 2 px in) stays NaN
    assert np.isfinite(res.skies[0][100:102, 100:120]).all()
    assert np.isnan(res.skies[0][102:118, 102:118]).all()
    # iterating the fill removes them without a warning
    res2 = S.subtract_sky(frames, smoothing_box_size=5, fill_passes=None)
    assert np.isfinite(res2.skies[0]).all()


def test_subtract_sky_does_not_change_input(field):
    before = [(f.science.copy(), f.variance.copy(), f.quality.copy(), f.header.copy())
              for f in field.frames]
    res = S.subtract_sky(field.frames, algorithm="HUBER")
    for f, (s, v, q, h) in zip(field.frames, before):
        np.testing.assert_array_equal(f.science, s)
        np.testing.assert_array_equal(f.variance, v)
        np.testing.assert_array_equal(f.quality, q)
        assert "L1SKYSUB" not in f.header and list(f.header.items()) == list(h.items())
    assert res.frames[0] is not field.frames[0]


def test_level_offset_samples_the_whole_frame():
    """Frames whose skies differ by a gradient as well as a level: the offset
    is the difference of the frame means, not of some rows (regression: the
    subsample was once truncated in row order, keeping only the top rows)."""
    rng = np.random.default_rng(11)
    ny, nx = 400, 300
    y = np.arange(ny, dtype=np.float64)[:, None] / (ny - 1) - 0.5
    a = (1000.0 + 60.0 * y + rng.normal(0, 10, (ny, nx))).astype(np.float32)
    b = (950.0 - 60.0 * y + rng.normal(0, 10, (ny, nx))).astype(np.float32)
    off = S.level_offset(a, b, sigma=3.0, max_pixels=5000)
    # the clipped mean of a gradient +-60 ADU plus noise: 3-sigma clipping trims
    # symmetric tails only, so the mean difference (50) stays; noise ~ 0.5 ADU
    assert abs(off - 50.0) < 2.0


@pytest.mark.parametrize("box", [3, 4, 5])
def test_sparse_fill_equals_one_full_frame_pass(box):
    """The gather path for sparse NaNs (< 5 %) gives the uniform_filter result of one pass."""
    from scipy import ndimage

    rng = np.random.default_rng(5)
    img = rng.normal(100, 5, (120, 90)).astype(np.float32)
    ys, xs = rng.integers(0, 120, 60), rng.integers(0, 90, 60)
    img[ys, xs] = np.nan
    img[0, 0] = img[0, 1] = img[1, 0] = img[1, 1] = np.nan  # a corner cluster
    assert (~np.isfinite(img)).mean() < 0.01
    got = S.fill_nan_box_mean(img, box=box, max_passes=1)
    bad = ~np.isfinite(img)
    vals = np.where(bad, 0.0, img.astype(np.float64))
    s = ndimage.uniform_filter(vals, size=box, mode="constant")
    c = ndimage.uniform_filter((~bad).astype(np.float64), size=box, mode="constant")
    expected = img.copy()
    fill = bad & (c > 1e-9)
    expected[fill] = (s[fill] / c[fill]).astype(np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(got[~bad], img[~bad])


def test_source_mask_survives_a_pixel_stack_overflow(monkeypatch):
    """sep's default pixel stack first; a frame whose sources outgrow it is extracted again
    with a larger one: the same mask and sources as with a large stack from the start."""
    rng = np.random.default_rng(9)
    img = rng.normal(0.0, 1.0, (120, 100)).astype(np.float32)
    yy, xx = np.mgrid[:120, :100]
    img += 50.0 * np.exp(-((yy - 60) ** 2 + (xx - 50) ** 2) / (2 * 15.0**2))  # a big bright object
    img += 30.0 * np.exp(-((yy - 20) ** 2 + (xx - 15) ** 2) / 2.0)
    want = S._detect_source_mask(img, sigma=3.0, dilate=2, sources=True)
    import sep

    from ioi.stages import _sep

    monkeypatch.setattr(_sep, "_PIXSTACK_FIRST", 50)  # far fewer than the object's pixels
    before = sep.get_extract_pixstack()
    sep.set_extract_pixstack(50)
    try:
        got = S._detect_source_mask(img, sigma=3.0, dilate=2, sources=True)
        assert sep.get_extract_pixstack() == 50  # restored after the retry
    finally:
        sep.set_extract_pixstack(before)
    assert want[0].sum() > 500
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("shape", [(40, 30), (37, 29), (5, 3)])
@pytest.mark.parametrize("b", [2, 3])
@pytest.mark.parametrize("chunk_rows", [64, 4])
def test_bin_plane_is_the_nan_aware_block_mean(shape, b, chunk_rows, monkeypatch):
    """Block means over the finite, not excluded pixels (NaN-padded edges), in row chunks of any size."""
    monkeypatch.setattr(S, "_BIN_ROWS", chunk_rows)
    rng = np.random.default_rng(shape[0] + b)
    img = rng.normal(10.0, 2.0, shape).astype(np.float32)
    img[rng.random(shape) < 0.1] = np.nan
    img[:b, :b] = np.nan  # a block with no value at all
    exclude = rng.random(shape) < 0.1
    by, bx = -(-shape[0] // b), -(-shape[1] // b)
    padded = np.full((by * b, bx * b), np.nan)
    padded[:shape[0], :shape[1]] = np.where(exclude, np.nan, img)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = np.nanmean(padded.reshape(by, b, bx, b), axis=(1, 3))
    got = S._bin_plane(img, b, exclude=exclude)
    assert got.dtype == np.float32 and got.shape == (by, bx)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.isnan(got[0, 0])


def _clip_by_masks(d, sigma):
    """The clipping's definition, with a mask over all the values each iteration."""
    d = d[np.isfinite(d)]
    keep = np.ones(d.size, bool)
    for _ in range(100):
        kept = d[keep]
        new = np.abs(d - np.median(kept)) <= sigma * kept.std()
        if np.array_equal(new, keep):
            break
        keep = new
    return d[keep].mean(), d[keep].std()


@pytest.mark.parametrize("seed", range(6))
def test_clip_stats_equal_its_definition(seed):
    rng = np.random.default_rng(seed)
    d = rng.normal(3.0, 2.0, 3000)
    stars = rng.random(d.size) < 0.1  # a positive tail, as sources give
    d[stars] += rng.exponential(50.0, stars.sum())
    d[:: 97] = np.nan
    d = d.round(2)  # ties
    for sigma in (1.5, 2.5, 3.0):
        want = _clip_by_masks(d, sigma)
        got = S._clip_stats(d, sigma, what="test")
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
