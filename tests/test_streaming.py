"""The one-frame-at-a-time pieces of the pipeline give what the all-at-once functions give:
the running stack (StackAccumulator) against stack_frames, the sky model against
subtract_sky, and the sorting-network median skies against nanmedian over the peers."""

import warnings

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import given, settings
from hypothesis import strategies as st

from ioi.frame import DQ, Frame
from ioi.stages import sky as S
from ioi.stages import stack as K


def _random_frames(rng, n, shape=(37, 29), nan_fraction=0.1, dnu_fraction=0.05):
    frames = []
    for _ in range(n):
        sci = rng.normal(100.0, 10.0, shape).astype(np.float32)
        sci[rng.random(shape) < nan_fraction] = np.nan
        var = rng.uniform(1.0, 5.0, shape).astype(np.float32)
        var[rng.random(shape) < nan_fraction / 2] = np.nan
        q = rng.integers(0, 4, shape).astype(np.uint32) << 1  # harmless flags
        q[rng.random(shape) < dnu_fraction] |= np.uint32(DQ.DO_NOT_USE)
        h = fits.Header()
        h["ASICGAIN"] = 10
        h["EXPTIME"] = 10.0
        frames.append(Frame(science=sci, variance=var, quality=q, header=h))
    return frames


@pytest.mark.parametrize("method", K.STACKING_METHODS)
@pytest.mark.parametrize("n", [1, 2, 9])
@pytest.mark.parametrize("chunk_rows", [64, 5])
def test_running_stack_matches_the_formulas(method, n, chunk_rows, monkeypatch):
    """The running stack (used by stack_frames without clipping) against the SPEC's
    formulas over the valid values (finite, not DO_NOT_USE), frame by frame; rows
    summed in chunks of any size (5: several chunks and a short last one)."""
    monkeypatch.setattr(K, "_ADD_ROWS", chunk_rows)
    rng = np.random.default_rng(n)
    frames = _random_frames(rng, n)
    frames[0].science[:3] = np.nan  # rows without the first frame (no frame at all when n == 1)
    acc = K.StackAccumulator(method)
    for f in frames:
        acc.add(f)
    run = acc.result()
    sci = np.stack([f.science for f in frames]).astype(np.float64)
    var = np.stack([f.variance for f in frames]).astype(np.float64)
    flags = np.stack([f.quality for f in frames])
    valid = np.isfinite(sci) & ((flags & DQ.DO_NOT_USE) == 0)
    used = valid.sum(axis=0)
    total = np.where(valid, sci, 0.0).sum(axis=0)
    vtot = np.where(valid & np.isfinite(var), var, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = {"MEAN": 1.0 / used, "COADD": np.ones_like(total), "MEANANDSCALE": n / used}[method]
        want_sci = np.where(used > 0, total * scale, np.nan)
        want_var = np.where(used > 0, vtot * scale**2, np.nan)
    np.testing.assert_allclose(run.frame.science, want_sci, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(run.frame.variance, want_var, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(run.exposure_map, used)
    want_q = np.bitwise_or.reduce(np.where(valid, flags, 0), axis=0)
    want_q[used == 0] = DQ.DO_NOT_USE | DQ.NO_OVERLAP
    np.testing.assert_array_equal(run.frame.quality, want_q)
    assert run.n_frames == n and run.frame.header["STKMETH"] == method
    whole = K.stack_frames(frames, method=method)  # the same running stack
    np.testing.assert_array_equal(whole.frame.science, run.frame.science)


def test_accumulator_needs_frames():
    with pytest.raises(Exception, match="no frames"):
        K.StackAccumulator("MEAN").result()


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 20), st.booleans(), st.floats(0.0, 0.9), st.integers(0, 2**32 - 1))
def test_median_skies_equal_nanmedian_of_peers(n, peers_only, nan_fraction, seed):
    rng = np.random.default_rng(seed)
    shape = (7, 11)
    values = [rng.normal(0.0, 5.0, shape).astype(np.float32).round(1) for _ in range(n)]  # ties happen
    for v in values:
        v[rng.random(shape) < nan_fraction] = np.nan
    levels = rng.normal(0.0, 3.0, n)
    skies = S._median_skies(S._Planes(values), levels, peers_only=peers_only, chunk_rows=3)
    norm = (np.stack(values) - levels.astype(np.float32)[:, None, None]).astype(np.float64)
    for i in range(n):
        peers = [j for j in range(n) if j != i] if peers_only else list(range(n))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            expect = (np.nanmedian(norm[peers], axis=0) + levels[i]).astype(np.float32)
        np.testing.assert_array_equal(skies[i], expect)


def test_sorting_network_sorts():
    for n in range(1, 40):
        rng = np.random.default_rng(n)
        data = rng.normal(size=(n, 50)).round(1)
        a = list(data)
        for i, j in S._sorting_network(n):
            a[i], a[j] = np.minimum(a[i], a[j]), np.maximum(a[i], a[j])
        np.testing.assert_array_equal(np.stack(a), np.sort(data, axis=0))


def test_sky_model_gives_subtract_sky_frames_one_at_a_time():
    rng = np.random.default_rng(3)
    frames = _random_frames(rng, 5, shape=(64, 48), nan_fraction=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = S.subtract_sky(frames, mask_sources=False)
        model = S.model_skies(frames, mask_sources=False)
    skies = [s.copy() for s in model.skies]
    model.subtract_in_place()
    assert model.skies is None
    for i, f in enumerate(frames):
        got = model.subtracted(i, f)
        model.release(i)
        want = whole.frames[i]
        np.testing.assert_array_equal(got.science, want.science)
        np.testing.assert_array_equal(got.variance, want.variance)
        np.testing.assert_array_equal(got.quality, want.quality)
        np.testing.assert_array_equal(skies[i], whole.skies[i])
        assert got.header["SKYLEVEL"] == want.header["SKYLEVEL"]
    # the inputs are untouched
    assert all(np.isfinite(f.science).sum() > 0.9 * f.science.size for f in frames)


@pytest.mark.parametrize("peers_only", [True, False])
def test_sky_variance_is_the_mean_variance_of_the_contributing_frames(peers_only):
    """Sky variance = (pi/2) x mean(contributing variances) / n_contributing, the same on
    every call and for every frame (the shared running sum must never be modified)."""
    rng = np.random.default_rng(5)
    frames = _random_frames(rng, 4, shape=(40, 30), nan_fraction=0.0, dnu_fraction=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = S.model_skies(frames, mask_sources=False, peers_only=peers_only)
    var = np.stack([f.variance for f in frames]).astype(np.float64)
    for i in range(4):
        used = [j for j in range(4) if j != i] if peers_only else list(range(4))
        expect = np.pi / 2 * var[used].sum(axis=0) / len(used) ** 2
        first = model.subtracted(i).variance - frames[i].variance
        again = model.subtracted(i).variance - frames[i].variance
        ok = np.isfinite(expect)
        np.testing.assert_allclose(first[ok], expect[ok], rtol=1e-5)
        np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("block_rows, chunk_rows", [(7, 5), (3, 5), (10, 5)])
def test_sky_variance_sums_do_not_depend_on_the_split_or_on_who_builds_them(block_rows, chunk_rows,
                                                                           monkeypatch):
    """The sums of the sky variances are made on threads in blocks of rows (any block and
    chunk size, a block not a whole number of chunks) and on first use or by
    prepare_variances on another thread: the same bits as one block built eagerly."""
    import threading

    rng = np.random.default_rng(17)
    frames = _random_frames(rng, 5, shape=(43, 29), nan_fraction=0.02)

    def variances(prepare: bool):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = S.model_skies(frames, mask_sources=False)
        if prepare:  # built on a thread while this one asks for the first frame
            builder = threading.Thread(target=model.prepare_variances)
            builder.start()
            got = [model.sky_variance(i) for i in range(5)]
            builder.join()
        else:
            got = [model.sky_variance(i) for i in range(5)]
        return got

    monkeypatch.setattr(S, "_VAR_ROWS", 64)
    monkeypatch.setattr(S, "_VAR_BLOCK_ROWS", 10_000)
    want = variances(False)
    monkeypatch.setattr(S, "_VAR_ROWS", chunk_rows)
    monkeypatch.setattr(S, "_VAR_BLOCK_ROWS", block_rows)
    for prepare in (False, True):
        for got, expect in zip(variances(prepare), want):
            np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize("chunk_rows", [64, 5])
def test_subtracted_into_reused_planes_is_the_same_frame(chunk_rows, monkeypatch):
    """SkyModel.subtracted with out= (planes full of an earlier frame's values): the same
    variance and flags (SOURCE, NO_SKY) as new planes, written into those planes; the
    row chunks of any size and a width that is not a whole number of bytes of bits."""
    monkeypatch.setattr(S, "_VAR_ROWS", chunk_rows)
    rng = np.random.default_rng(11)
    frames = _random_frames(rng, 5, shape=(61, 37), nan_fraction=0.01)
    for k, f in enumerate(frames):
        f.science[20 + 6 * k:24 + 6 * k, 10 + 4 * k:14 + 4 * k] += np.float32(500.0)  # a dithered "source"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = S.model_skies(frames, mask_sources=True, source_sigma=2.0, mask_dilate=1)
    assert model.source_masks is not None and any(m.any() for m in model.source_masks)
    model.subtract_in_place()
    for i in range(5):
        want = model.subtracted(i)
        out = (np.full(want.shape, 9.0, np.float32), np.full(want.shape, 77, np.uint16))
        got = model.subtracted(i, out=out)
        assert got.variance is out[0] and got.quality is out[1]
        np.testing.assert_array_equal(got.variance, want.variance)
        np.testing.assert_array_equal(got.quality, want.quality)
        np.testing.assert_array_equal((got.quality & DQ.SOURCE) != 0, model.source_masks[i])


@settings(max_examples=50, deadline=None)
@given(ny=st.integers(1, 20), nx=st.integers(1, 21), r0=st.integers(0, 19), n=st.integers(1, 25),
       seed=st.integers(0, 2**16))
def test_unpack_rows_is_a_row_slice_of_unpack(ny, nx, r0, n, seed):
    mask = np.random.default_rng(seed).random((ny, nx)) < 0.4
    r0 = min(r0, ny - 1)
    packed = S._pack(mask)
    np.testing.assert_array_equal(S._unpack_rows(packed, r0, r0 + n), mask[r0:r0 + n])


def test_planes_sample_and_valid_follow_the_exclusions():
    rng = np.random.default_rng(12)
    values = [rng.normal(0.0, 1.0, (23, 19)).astype(np.float32) for _ in range(3)]
    values[1][4, 5] = np.nan
    exclude = [rng.random((23, 19)) < 0.3 for _ in range(3)]
    planes = S._Planes(values, exclude)
    idx = rng.choice(23 * 19, 200, replace=False)
    want = np.stack([np.where(e, np.nan, v).reshape(-1)[idx] for v, e in zip(values, exclude)])
    np.testing.assert_array_equal(planes.sample(idx), want)
    for k in range(3):
        np.testing.assert_array_equal(planes.valid(k), np.isfinite(values[k]) & ~exclude[k])
        np.testing.assert_array_equal(planes.valid(k, slice(5, 9)), (np.isfinite(values[k]) & ~exclude[k])[5:9])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["new", "a", "b"]))
def test_select_is_where(seed, into):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(5, 9)).astype(np.float32)
    b = rng.normal(size=(5, 9)).astype(np.float32)
    a[0, :3] = [np.nan, np.inf, -0.0]
    cond = rng.random((5, 9)) < 0.5
    want = np.where(cond, a, b)
    out = {"new": None, "a": a, "b": b}[into]
    diff = np.bitwise_xor(a.view(np.int32), b.view(np.int32))  # the known-difference form
    got_diff = S._select(cond, a, b, diff=diff)
    got = S._select(cond, a, b, out=out)
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))  # bit for bit
    np.testing.assert_array_equal(got_diff.view(np.int32), want.view(np.int32))


def test_median_skies_of_one_frame():
    v = [np.array([[1.0, np.nan, 3.0]], dtype=np.float32)]
    alone = S._median_skies(S._Planes(v), np.zeros(1), peers_only=True)[0]
    assert np.isnan(alone).all()  # no peers
    np.testing.assert_array_equal(S._median_skies(S._Planes(v), np.zeros(1), peers_only=False)[0], v[0])
