"""The fast (float32, in-place, view-based) detector chain against plain float64 references.

The reference, combination, flat and mask stages were rewritten for speed
(issue 6): float32 work arrays, the linearity factor as a divided difference,
the common case on all pixels with the rare saturated pixels redone on their
indices.  These tests pin them to straightforward float64 versions of the same
formulas: the differences must stay far below the noise.
"""

import numpy as np
import pytest
from _detector_synth import fowler_layout, make_ramp, raw_offsets

from ioi.errors import IoiError
from ioi.frame import DQ, Frame
from ioi.stages.calibrate import (
    apply_bad_pixel_masks,
    apply_flat,
    combined_bad_pixel_mask,
)
from ioi.stages.combine import combine_reads
from ioi.stages.nonlinearity import horner_factor
from ioi.stages.reference import estimate_read_noise, strip_border, subtract_reference

GAIN, RN = 2.0, 15.0


def _coefficients(shape, seed=5):
    rng = np.random.default_rng(seed)
    c = np.zeros((4,) + shape, dtype=np.float32)
    c[0] = rng.uniform(-3, 3, shape)
    c[1] = rng.uniform(0.98, 1.02, shape)
    c[2] = rng.uniform(1e-6, 6e-6, shape)
    c[3] = rng.uniform(1e-12, 7e-11, shape)
    return c


def _poly64(y, c):
    c = c.astype(np.float64)
    return sum(ci * y**i for i, ci in enumerate(c))


def _factor64(x, c, lost, form):
    """The factor by its definition, in float64 (1 where undefined)."""
    xl = x + lost
    with np.errstate(divide="ignore", invalid="ignore"):
        if form == "FACTOR":
            f, good = _poly64(xl, c) / xl, xl > 0
        else:
            f, good = (_poly64(xl, c) - _poly64(lost, c)) / x, (xl > 0) & (x != 0)
    return np.where(good & np.isfinite(f), f, 1.0)


def _pairs_reference(ramp, ped, sig, coeff, form, bodge=0.0):
    """Float64 CDS/Fowler with dropped saturated pairs and the count-rate fallback
    (module docstring of ioi.stages.combine), written out directly."""
    r = ramp.reads.astype(np.float64)
    sat = ramp.saturated
    t = ramp.inttime
    dts = t[sig] - t[ped]
    n = len(ped)
    exptime = dts.mean() + bodge
    rate = (r[1] - r[0]) / (t[1] - t[0])
    used = np.array([~(sat[s] | sat[p]) for p, s in zip(ped, sig)])
    nused = used.sum(axis=0)
    xs = np.array([r[s] - r[p] for p, s in zip(ped, sig)])
    fs = np.array([_factor64(x, coeff, rate * t[p], form) if coeff is not None else np.ones_like(x)
                   for x, p in zip(xs, ped)])
    overlap = np.clip(np.minimum.outer(t[sig], t[sig]) - np.maximum.outer(t[ped], t[ped]), 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        time_used = (used * dts[:, None, None]).sum(axis=0) / nused
        science = (used * xs * fs).sum(axis=0) / nused * (exptime / (time_used + bodge))
        mean_obs = np.maximum((used * xs).sum(axis=0) / nused, 0.0)
        cov = np.einsum("kl,kyx,lyx->yx", overlap, used.astype(float), used.astype(float))
        variance = (2 * RN**2 / nused + mean_obs / time_used / GAIN * cov / nused**2) * \
            ((used * fs).sum(axis=0) / nused) ** 2
    quality = np.where((nused > 0) & (nused < n), np.uint32(DQ.SATURATED), np.uint32(0))
    # no usable pair: count rate of the first two reads x EXPTIME
    x01 = r[1] - r[0]
    f01 = _factor64(x01, coeff, rate * t[0], form) if coeff is not None else np.ones_like(x01)
    scale = exptime / (t[1] - t[0])
    ok = ~sat[0] & ~sat[1]
    none = nused == 0
    science = np.where(none, np.where(ok, x01 * f01 * scale, np.nan), science)
    fvar = (2 * RN**2 + np.maximum(x01, 0.0) / GAIN) * (f01 * scale) ** 2
    variance = np.where(none, np.where(ok, fvar, np.nan), variance)
    quality = quality | np.where(none, np.where(ok, DQ.SATURATED, DQ.SATURATED | DQ.DO_NOT_USE), 0).astype(np.uint32)
    return science, variance, quality


def _saturating_ramp(method, shape=(48, 40), seed=9):
    rng = np.random.default_rng(seed)
    rate = rng.uniform(0, 12000, shape)  # faint (differences of either sign) to saturating late
    rate[:4, :4] = 1e5  # saturated from the first read: no rate, NaN
    rate[:4, 4:8] = 2e4  # saturated from the second read: no rate either
    coeff = _coefficients(shape)
    if method == "FOWLER":
        t, g, i = fowler_layout(2, frmtime=1.4, gap=10.0)
        kw = {"group": g, "index": i}
    else:
        t, kw = 1.4 * np.arange(1, 6), {}
    ramp, _ = make_ramp(rate, t, coefficients=coeff, rng=rng, gain=GAIN, read_noise=RN, saturate_at=40000.0, **kw)
    return ramp, coeff


@pytest.mark.parametrize("form", ["DIFFERENCE", "FACTOR"])
@pytest.mark.parametrize("method", ["CDS", "FOWLER"])
def test_pair_combination_matches_float64_reference(method, form):
    ramp, coeff = _saturating_ramp(method)
    assert ramp.saturated.any(axis=0).mean() > 0.2  # partial pairs and fallbacks are exercised
    out = combine_reads(ramp, method=method, pairs=2, gain=GAIN, read_noise=RN, linearity=coeff,
                        linearity_form=form, chunk_rows=7)
    ped, sig = ([0, 1], [2, 3]) if method == "FOWLER" else ([0], [ramp.nreads - 1])
    science, variance, quality = _pairs_reference(ramp, ped, sig, coeff, form)
    np.testing.assert_array_equal(out.quality, quality)
    np.testing.assert_array_equal(np.isnan(out.science), np.isnan(science))
    np.testing.assert_array_equal(np.isnan(out.variance), np.isnan(variance))
    ok = np.isfinite(science)
    sigma = np.sqrt(variance[ok])
    # float32 work: a few 1e-7 of the value, i.e. < 1e-4 of the noise here
    assert np.max(np.abs(out.science[ok] - science[ok]) / sigma) < 1e-4
    np.testing.assert_allclose(out.variance[ok], variance[ok], rtol=2e-6)


def test_combination_without_linearity_or_saturation_flags():
    ramp, _ = _saturating_ramp("FOWLER")
    ramp = ramp.replace(saturated=None)
    out = combine_reads(ramp, method="FOWLER", pairs=2, gain=GAIN, read_noise=RN)
    ref = _pairs_reference(ramp.replace(saturated=np.zeros(ramp.reads.shape, bool)), [0, 1], [2, 3], None, "")
    np.testing.assert_allclose(out.science, ref[0], rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(out.variance, ref[1], rtol=2e-6)
    assert (out.quality == 0).all()


def test_float32_factor_has_no_cancellation_for_small_differences():
    shape = (64, 64)
    rng = np.random.default_rng(1)
    c = _coefficients(shape)
    lost = rng.uniform(1000, 30000, shape)
    x = rng.uniform(-1, 1, shape) * 10.0 ** rng.integers(-3, 5, shape)  # 1e-3 .. 1e4 ADU, both signs
    exact = horner_factor(x, c.astype(np.float64), lost)
    fast = horner_factor(x.astype(np.float32), c, lost.astype(np.float32), dtype=np.float32)
    assert fast.dtype == np.float32
    # the old evaluation, (poly(x + lost) - poly(lost)) / x in float32, is off by up to poly/x ulps:
    # percent-level errors at x ~ 1 ADU; the divided difference keeps a few float32 ulps
    np.testing.assert_allclose(fast, exact, rtol=5e-7)


def test_strip_border_view_and_copy():
    a = np.arange(2 * 12 * 14, dtype=np.float32).reshape(2, 12, 14)
    v = strip_border(a, border=3, copy=False)
    c = strip_border(a, border=3)
    assert np.shares_memory(v, a) and not np.shares_memory(c, a)
    np.testing.assert_array_equal(v, c)
    np.testing.assert_array_equal(v, a[:, 3:9, 3:11])


@pytest.mark.parametrize("method", ["CONSTANT", "CONSTANTOFF", "RAMP", "FULL"])
def test_reference_subtraction_of_views_and_other_dtypes(method):
    """Non-contiguous and non-float32 input give the float32-cube result."""
    rng = np.random.default_rng(4)
    raw = raw_offsets(64, 64, 4, offsets=rng.uniform(-100, 100, (4, 2)), drift=rng.uniform(-0.1, 0.1, (4, 2)))
    reads = np.round(raw[None] + 1000 + rng.normal(0, 10, (3, 64, 64)))
    want = subtract_reference(reads.astype(np.float32), method=method, noutputs=4)
    big = np.zeros((3, 64, 80), dtype=np.float32)
    big[:, :, 8:72] = reads
    np.testing.assert_array_equal(subtract_reference(big[:, :, 8:72], method=method, noutputs=4), want)
    np.testing.assert_array_equal(subtract_reference(reads.astype(np.uint16), method=method, noutputs=4), want)


def test_read_noise_uses_exactly_the_reference_pixels():
    rng = np.random.default_rng(2)
    ny, nx, b = 40, 56, 4
    diff = rng.normal(0, 20, (ny, nx))
    diff[b:-b, b:-b] = 1e6  # the science area must not count
    diff[0, :] = diff[-1, :] = diff[:, 0] = diff[:, -1] = -1e6  # nor the outermost rows and columns
    use = np.zeros((ny, nx), bool)
    use[1:b, 1:-1] = use[ny - b : ny - 1, 1:-1] = use[1:-1, 1:b] = use[1:-1, nx - b : nx - 1] = True
    v = diff[use]
    want = 1.4826 * np.median(np.abs(v - np.median(v))) / np.sqrt(2.0)
    assert estimate_read_noise(diff, border=b) == pytest.approx(want, rel=1e-15)


def test_flat_and_masks_match_the_float64_definition():
    rng = np.random.default_rng(6)
    shape = (30, 50)
    frame = Frame.from_science(rng.normal(1000, 30, shape), variance=rng.uniform(500, 900, shape))
    flat = rng.uniform(0.8, 1.2, shape).astype(np.float32)
    flat[3, 4], flat[5, 6] = 0.0, np.nan
    out = apply_flat(frame, flat)
    f = np.where(np.isfinite(flat) & (flat > 0), flat.astype(np.float64), np.nan)
    np.testing.assert_allclose(out.science, frame.science / f, rtol=2e-7)
    np.testing.assert_allclose(out.variance, frame.variance / f**2, rtol=4e-7)
    assert out.quality[3, 4] == out.quality[5, 6] == DQ.NO_FLAT | DQ.DO_NOT_USE
    masks = {"FLAT": np.where(rng.random(shape) < 0.05, np.nan, 1.0), "LIN": np.where(rng.random(shape) < 0.05, 0, 1)}
    bad = combined_bad_pixel_mask(masks, shape)
    a = apply_bad_pixel_masks(out, masks)
    b = apply_bad_pixel_masks(out, masks, bad=bad)
    for x, y in ((a.science, b.science), (a.variance, b.variance), (a.quality, b.quality)):
        np.testing.assert_array_equal(x, y)
    assert np.isnan(a.science[bad]).all() and np.isfinite(a.science[~bad & np.isfinite(f)]).all()
    assert ((a.quality[bad] & (DQ.MASKED | DQ.DO_NOT_USE)) == DQ.MASKED | DQ.DO_NOT_USE).all()
    assert (a.quality[~bad] & DQ.MASKED == 0).all()
    with pytest.raises(IoiError):
        apply_bad_pixel_masks(out, masks, bad=bad[:, :-1])


@pytest.mark.parametrize("method", ["TRIM", "CONSTANT", "CONSTANTOFF", "RAMP", "COLUMN", "FULL"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_reference_subtraction_in_place(method, ndim):
    rng = np.random.default_rng(8)
    raw = raw_offsets(64, 64, 4, offsets=rng.uniform(-100, 100, (4, 2)), drift=rng.uniform(-0.1, 0.1, (4, 2)))
    reads = np.round(raw[None] + 1000 + rng.normal(0, 10, (3, 64, 64))).astype(np.float32)
    if ndim == 2:
        reads = reads[0]
    want = subtract_reference(reads, method=method, noutputs=4)
    buf = reads.copy()
    got = subtract_reference(buf, method=method, noutputs=4, out=buf)
    assert got is buf
    np.testing.assert_array_equal(buf, want)
    with pytest.raises(IoiError):
        subtract_reference(reads, method=method, noutputs=4, out=np.empty(reads.shape, np.float64))
