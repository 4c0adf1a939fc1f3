"""Read combination: CDS, Fowler, UTR, saturation, linearity, variance, header (SPEC 2.2, 2.3)."""

import zlib

import numpy as np
import pytest
from _detector_synth import fowler_layout, make_ramp
from astropy.io import fits
from numpy.testing import assert_allclose

from ioi.errors import ExitCode, IoiError
from ioi.frame import DQ
from ioi.stages.combine import (
    COMBINATION_METHODS,
    combine_cds,
    combine_fowler,
    combine_reads,
    count_rate,
    fit_ramp,
    flag_saturated,
    update_combined_header,
)

GAIN, RN = 2.0, 12.0
FRMTIME = 1.4


def _rate(shape=(32, 32), lo=20.0, hi=400.0, seed=7):
    return np.random.default_rng(seed).uniform(lo, hi, shape)


def _header():
    h = fits.Header()
    h["OBJECT"] = "field"
    for key, value in [("SEQNUM_R", 1), ("SEQNUM_N", 1), ("SEQNUM_M", 1), ("INTTIME", 1.4),
                       ("SEQNNAME", "seq"), ("ACQTIME", 2457081.3838), ("ACQTIME1", "2015-02-27-21:12:40.0126")]:
        h[key] = value
    return h


def _utr_times(n=10):
    return FRMTIME * np.arange(1, n + 1)


def _layouts(pairs=2):
    t, g, i = fowler_layout(pairs, frmtime=FRMTIME, gap=3.0)
    return {
        "CDS": dict(inttime=_utr_times(8)),
        "FOWLER": dict(inttime=t, group=g, index=i),
        "UTR": dict(inttime=_utr_times(8)),
    }


def _combine(method, ramp, **kw):
    return combine_reads(ramp, method=method, pairs=2, gain=GAIN, read_noise=RN, **kw)


# ------------------------------------------------------------------ noise-free truth


@pytest.mark.parametrize("method", COMBINATION_METHODS)
def test_noise_free_ramp_gives_rate_times_exptime(method):
    rate = _rate()
    ramp, _ = make_ramp(rate, header=_header(), **_layouts()[method])
    out = _combine(method, ramp)
    exptime = out.header["EXPTIME"]
    assert_allclose(out.science, rate * exptime, rtol=1e-5)
    assert out.science.dtype == np.float32 and out.variance.dtype == np.float32
    assert out.quality.dtype == np.uint16 and (out.quality == 0).all()
    assert (out.variance > 0).all()


def test_exptimes():
    t = _utr_times(5)
    ramp, _ = make_ramp(_rate(), t)
    assert combine_cds(ramp, gain=GAIN, read_noise=RN).header["EXPTIME"] == pytest.approx(t[-1] - t[0])
    assert fit_ramp(ramp, gain=GAIN, read_noise=RN).header["EXPTIME"] == pytest.approx(t[-1] - t[0])
    t, g, i = fowler_layout(3, frmtime=FRMTIME, gap=10.0)
    ramp, _ = make_ramp(_rate(), t, group=g, index=i)
    out = combine_fowler(ramp, pairs=3, bodge=0.25, gain=GAIN, read_noise=RN)
    assert out.header["EXPTIME"] == pytest.approx(3 * FRMTIME + 10.0 + 0.25)
    assert out.header["L1FMCOPA"] == 3 and out.header["L1FMCOME"] == "FOWLER"


def test_count_rate():
    rate = _rate()
    ramp, _ = make_ramp(rate, _utr_times(3))
    r = count_rate(ramp)
    assert r.dtype == np.float32
    assert_allclose(r, rate, rtol=1e-5)


def test_flag_saturated_uses_raw_level():
    raw = np.array([[65534.0, 65535.0], [70000.0, 0.0]])
    np.testing.assert_array_equal(flag_saturated(raw), [[False, True], [True, False]])
    np.testing.assert_array_equal(flag_saturated(raw, level=60000), [[True, True], [True, False]])


# ------------------------------------------------------------------ noise: bias and variance


def _chi2_check(out, truth, npix):
    """Mean bias within 5 sigma of its error; mean chi^2 = 1 within 5 sigma."""
    resid = out.science.astype(np.float64) - truth
    var = out.variance.astype(np.float64)
    assert abs(resid.mean()) < 5 * np.sqrt(var.mean() / npix)
    chi2 = np.mean(resid**2 / var)
    assert abs(chi2 - 1) < 5 * np.sqrt(2 / npix)
    return chi2


@pytest.mark.parametrize("method", COMBINATION_METHODS)
@pytest.mark.parametrize("regime", ["read-noise", "poisson"])
def test_variance_plane_matches_scatter(method, regime):
    """128x128 pixels of one rate with Poisson and read noise: the variance
    plane predicts the scatter about the truth (chi^2 per pixel = 1)."""
    shape = (128, 128)
    rate = np.full(shape, 5.0 if regime == "read-noise" else 2000.0)
    rng = np.random.default_rng(zlib.crc32(f"{method}{regime}".encode()))
    kw = _layouts(pairs=4)[method]
    ramp, charge = make_ramp(rate, rng=rng, gain=GAIN, read_noise=RN, **kw)
    out = _combine(method, ramp) if method != "FOWLER" else combine_fowler(ramp, pairs=4, gain=GAIN, read_noise=RN)
    truth = rate * out.header["EXPTIME"]
    _chi2_check(out, truth, rate.size)


def test_fowler_variance_uses_pair_covariance():
    """Fowler-4 with reads one frame apart and no gap: the simple S/g
    Poisson term overestimates the variance by 1/(1 - dt(n^2-1)/(3nT)) =
    1/(1 - 15/48) = 1.45; the exact covariance matches the scatter."""
    shape = (128, 128)
    rate = np.full(shape, 3000.0)
    t, g, i = fowler_layout(4, frmtime=FRMTIME, gap=0.0)
    ramp, _ = make_ramp(rate, t, group=g, index=i, rng=np.random.default_rng(8), gain=GAIN, read_noise=1.0)
    out = combine_fowler(ramp, pairs=4, gain=GAIN, read_noise=1.0)
    truth = rate * out.header["EXPTIME"]
    chi2 = _chi2_check(out, truth, rate.size)
    simple = (2 * 1.0**2 / 4 + truth / GAIN)
    assert_allclose(np.median(out.variance) / simple[0, 0], 1 - 15 / 48, rtol=0.01)
    assert chi2 > 0.9


# ------------------------------------------------------------------ saturation


@pytest.mark.parametrize("method", COMBINATION_METHODS)
def test_saturation_handling(method):
    """Rates chosen so that pixels saturate at different reads (noise-free)."""
    kw = _layouts(pairs=2)[method]
    t = kw["inttime"]
    level = 40000.0
    rate = np.full((4, 4), 100.0)
    rate[0, 0] = level / t[0] * 1.01  # saturated in the first read
    rate[0, 1] = level / t[1] * 1.01  # first two reads... the second saturated
    rate[0, 2] = level / t[2] * 1.01  # third read saturated onwards
    rate[0, 3] = level / t[-1] * 1.01  # only the last read saturated
    ramp, _ = make_ramp(rate, saturate_at=level, **kw)
    out = _combine(method, ramp)
    exptime = out.header["EXPTIME"]
    q, s = out.quality, out.science
    bad = DQ.SATURATED | DQ.DO_NOT_USE
    for x in (0, 1):  # no rate can be formed
        assert np.isnan(s[0, x]) and np.isnan(out.variance[0, x]) and q[0, x] == bad
    for x in (2, 3):  # recovered from the unsaturated reads
        assert q[0, x] == DQ.SATURATED
        assert s[0, x] == pytest.approx(rate[0, x] * exptime, rel=1e-5)
        assert np.isfinite(out.variance[0, x]) and out.variance[0, x] > 0
    assert (q[1:] == 0).all()
    assert_allclose(s[1:], 100.0 * exptime, rtol=1e-5)


def test_fowler_drops_only_the_saturated_pair():
    t, g, i = fowler_layout(3, frmtime=FRMTIME, gap=5.0)
    rate = np.full((2, 2), 50.0)
    ramp, _ = make_ramp(rate, t, group=g, index=i)
    sat = np.zeros(ramp.reads.shape, bool)
    sat[5, 0, 0] = True  # third signal read of pixel (0, 0)
    reads = ramp.reads.copy()
    reads[5, 0, 0] = 60000.0  # garbage that must not be used
    out = combine_fowler(ramp.replace(reads=reads, saturated=sat), pairs=3, gain=GAIN, read_noise=RN)
    assert out.science[0, 0] == pytest.approx(50.0 * (t[3] - t[0]), rel=1e-5)
    assert out.quality[0, 0] == DQ.SATURATED
    full = combine_fowler(ramp, pairs=3, gain=GAIN, read_noise=RN)
    # two pairs instead of three: more read noise
    assert out.variance[0, 0] > full.variance[0, 0]


# ------------------------------------------------------------------ linearity


def _linearity(shape):
    c = np.zeros((4,) + shape, dtype=np.float32)
    c[1] = 1.0
    c[2] = 3e-6  # linear = x + 3e-6 x^2 (+ 1e-12 x^3): 10 % at 30000 ADU
    c[3] = 1e-12
    return c


@pytest.mark.parametrize("method", COMBINATION_METHODS)
def test_linearity_applied_inside_combination(method):
    shape = (16, 16)
    rate = _rate(shape, 500, 2500)
    coeff = _linearity(shape)
    kw = _layouts()[method]
    ramp, charge = make_ramp(rate, coefficients=coeff, **kw)
    out = _combine(method, ramp, linearity=coeff)
    raw = _combine(method, ramp)
    truth = rate * out.header["EXPTIME"]
    assert out.header["L1LCOR"] == 1 and raw.header["L1LCOR"] == 0
    # uncorrected: several per cent low
    assert (raw.science < 0.95 * truth).any()
    if method == "UTR":
        # exact linearised differences; only the lost charge, from the
        # observed (slightly nonlinear) first-read rate, is a little off:
        # error ~ 2 c2 * d(lost) ~ 6e-6 * 80 ADU = 5e-4
        assert_allclose(out.science, truth, rtol=1e-3)
    else:
        # the original's factor rule is short by about c2 * (pedestal charge)
        # of the difference (see correct_nonlinearity): 3e-6 * 3500 = 1 %
        pedestal = charge[0] if method == "CDS" else charge[:2].mean(axis=0)
        assert_allclose(out.science, truth, rtol=1.2 * 3e-6 * pedestal.max() + 1e-3)
        assert np.abs(out.science / truth - 1).max() < np.abs(raw.science / truth - 1).max() / 3


def test_cds_linearity_follows_the_spec_rule():
    shape = (8, 8)
    rate = _rate(shape, 500, 2500)
    coeff = _linearity(shape)
    t = _utr_times(5)
    ramp, _ = make_ramp(rate, t, coefficients=coeff)
    out = combine_cds(ramp, gain=GAIN, read_noise=RN, linearity=coeff, linearity_form="FACTOR")
    r = ramp.reads.astype(np.float64)
    x = r[-1] - r[0]
    lost = (r[1] - r[0]) / (t[1] - t[0]) * t[0]
    xl = x + lost
    poly = lambda v: v + 3e-6 * v**2 + 1e-12 * v**3  # noqa: E731
    assert_allclose(out.science, x * poly(xl) / xl, rtol=1e-5)
    exact = combine_cds(ramp, gain=GAIN, read_noise=RN, linearity=coeff)
    assert_allclose(exact.science, poly(xl) - poly(lost), rtol=1e-5)


def test_linearity_is_applied_to_each_fowler_pair():
    shape = (8, 8)
    rate = np.full(shape, 2000.0)
    coeff = _linearity(shape)
    t, g, i = fowler_layout(3, frmtime=FRMTIME, gap=4.0)
    ramp, _ = make_ramp(rate, t, group=g, index=i, coefficients=coeff)
    out = combine_fowler(ramp, pairs=3, gain=GAIN, read_noise=RN, linearity=coeff, linearity_form="FACTOR")
    exact = combine_fowler(ramp, pairs=3, gain=GAIN, read_noise=RN, linearity=coeff)
    # pair by pair with the SPEC's lost-charge rule, from the observed reads
    r = ramp.reads.astype(np.float64)
    rate_obs = (r[1] - r[0]) / (t[1] - t[0])
    poly = lambda v: v + 3e-6 * v**2 + 1e-12 * v**3  # noqa: E731
    pairs, exact_pairs = [], []
    for k in range(3):
        x = r[3 + k] - r[k]
        lost = rate_obs * t[k]
        xl = x + lost
        pairs.append(x * poly(xl) / xl)
        exact_pairs.append(poly(xl) - poly(lost))
    assert_allclose(out.science, np.mean(pairs, axis=0), rtol=1e-5)
    assert_allclose(exact.science, np.mean(exact_pairs, axis=0), rtol=1e-5)


# ------------------------------------------------------------------ UTR jumps


def test_utr_finds_jumps_and_ignores_them():
    shape = (64, 64)
    rng = np.random.default_rng(21)
    rate = np.full(shape, 30.0)
    hit = np.zeros(shape, bool)
    hit[rng.integers(0, 64, 40), rng.integers(0, 64, 40)] = True
    jump = np.where(hit, 800.0, 0.0)
    ramp, _ = make_ramp(rate, _utr_times(10), rng=rng, gain=GAIN, read_noise=RN, jumps={5: jump})
    out = fit_ramp(ramp, gain=GAIN, read_noise=RN, jump_sigma=5.0)
    found = (out.quality & DQ.JUMP_DET) > 0
    assert found[hit].all()
    assert np.count_nonzero(found & ~hit) <= 4  # 5-sigma false alarms in 4000 clean pixels
    truth = rate * out.header["EXPTIME"]
    z = (out.science - truth) / np.sqrt(out.variance)
    assert np.abs(z[hit]).max() < 5  # the 800 ADU jump is gone
    # without jump detection the jump would bias the fit by hundreds of ADU
    naive = fit_ramp(ramp, gain=GAIN, read_noise=RN, jump_sigma=1e9)
    assert (naive.science[hit] - truth[hit]).min() > 300


def test_utr_segments_fit_exact_noise_free():
    rate = np.full((4, 4), 100.0)
    jump = np.zeros((4, 4))
    jump[1, 1] = 5000.0
    ramp, _ = make_ramp(rate, _utr_times(10), jumps={3: jump, 7: jump})
    out = fit_ramp(ramp, gain=GAIN, read_noise=RN)
    assert out.quality[1, 1] == DQ.JUMP_DET
    assert_allclose(out.science, 100.0 * out.header["EXPTIME"], rtol=1e-5)


# ------------------------------------------------------------------ header


def test_update_combined_header():
    h = _header()
    before = h.copy()
    out = update_combined_header(h, exptime=12.5, method="fowler", pairs=2)
    for key in ("SEQNUM_R", "SEQNUM_N", "SEQNUM_M", "INTTIME", "SEQNNAME"):
        assert key not in out
    assert out["EXPTIME"] == 12.5
    assert out["MJD"] == pytest.approx(57080.8838, abs=1e-9)
    assert out["DATE-OBS"] == "2015-02-27T21:12:40.013"
    assert out["DATE"] == "2015-02-27"
    assert out["UTSTART"] == "21:12:40.013"
    assert out["L1FMCO"] == 1 and out["L1FMCOME"] == "FOWLER" and out["L1FMCOPA"] == 2
    assert out["OBJECT"] == "field"
    assert h == before


def test_header_without_acquisition_times():
    h = _header()
    del h["ACQTIME"]
    h["ACQTIME1"] = "not a date"
    out = update_combined_header(h, exptime=3.0, method="CDS", pairs=1)
    assert "MJD" not in out and "DATE-OBS" not in out and "UTSTART" not in out
    assert out["EXPTIME"] == 3.0


# ------------------------------------------------------------------ errors


def test_cds_with_one_read_is_exit_11():
    ramp, _ = make_ramp(_rate(), [1.4])
    for call in (lambda: combine_cds(ramp, gain=GAIN, read_noise=RN),
                 lambda: fit_ramp(ramp, gain=GAIN, read_noise=RN),
                 lambda: count_rate(ramp)):
        with pytest.raises(IoiError) as err:
            call()
        assert err.value.exit_code == ExitCode.TOO_FEW_FILES_CDS == 11
        assert "2 reads" in str(err.value) and "found 1" in str(err.value)


def test_fowler_too_few_reads_is_exit_31():
    t, g, i = fowler_layout(2)
    ramp, _ = make_ramp(_rate(), t, group=g, index=i)
    with pytest.raises(IoiError) as err:
        combine_fowler(ramp, pairs=3, gain=GAIN, read_noise=RN)
    assert err.value.exit_code == ExitCode.TOO_FEW_FILES_FOWLER == 31
    assert "6 reads" in str(err.value) and "found 4" in str(err.value)


def test_fowler_unequal_reads_is_exit_32():
    t = FRMTIME * np.arange(1, 6)
    ramp, _ = make_ramp(_rate(), t, group=[1, 1, 1, 2, 2], index=[1, 2, 3, 1, 2])
    with pytest.raises(IoiError) as err:
        combine_fowler(ramp, pairs=2, gain=GAIN, read_noise=RN)
    assert err.value.exit_code == ExitCode.UNEQUAL_FOWLER_READS == 32
    assert "3 pedestal" in str(err.value) and "2 signal" in str(err.value)


def test_unknown_method_is_exit_10():
    ramp, _ = make_ramp(_rate(), _utr_times(3))
    with pytest.raises(IoiError) as err:
        combine_reads(ramp, method="MEDIAN", gain=GAIN, read_noise=RN)
    assert err.value.exit_code == ExitCode.UNKNOWN_COMBINATION_METHOD == 10
    for name in ("MEDIAN",) + COMBINATION_METHODS:
        assert name in str(err.value)


def test_linearity_shape_mismatch_is_exit_23():
    ramp, _ = make_ramp(_rate(), _utr_times(3))
    with pytest.raises(IoiError) as err:
        combine_cds(ramp, gain=GAIN, read_noise=RN, linearity=np.zeros((3, 16, 16), np.float32))
    assert err.value.exit_code == 23
    assert "(3, 16, 16)" in str(err.value) and "(32, 32)" in str(err.value)


# ------------------------------------------------------------------ purity


@pytest.mark.parametrize("method", COMBINATION_METHODS)
def test_combine_does_not_change_input(method):
    shape = (16, 16)
    coeff = _linearity(shape)
    ramp, _ = make_ramp(_rate(shape), saturate_at=3000.0, header=_header(), **_layouts()[method])
    snap = (ramp.reads.copy(), ramp.saturated.copy(), ramp.quality.copy(), ramp.header.copy(), coeff.copy())
    _combine(method, ramp, linearity=coeff)
    count_rate(ramp)
    np.testing.assert_array_equal(ramp.reads, snap[0])
    np.testing.assert_array_equal(ramp.saturated, snap[1])
    np.testing.assert_array_equal(ramp.quality, snap[2])
    assert ramp.header == snap[3]
    np.testing.assert_array_equal(coeff, snap[4])


@pytest.mark.parametrize("method", ["CDS", "FOWLER"])
def test_row_chunks_give_the_whole_frame_result(method):
    """combine_reads works in row chunks (threads); the result equals one whole-frame call."""
    shape = (40, 24)
    rate = _rate(shape, 50, 3000)
    coeff = _linearity(shape)
    if method == "FOWLER":
        t, g, i = fowler_layout(2, frmtime=FRMTIME, gap=6.0)
        ramp, _ = make_ramp(rate, t, group=g, index=i, coefficients=coeff, rng=np.random.default_rng(3),
                            gain=GAIN, read_noise=RN)
    else:
        ramp, _ = make_ramp(rate, _utr_times(3), coefficients=coeff, rng=np.random.default_rng(3), gain=GAIN,
                            read_noise=RN)
    sat = np.zeros(ramp.reads.shape, bool)
    sat[-1, 5:9, 3] = True
    ramp = ramp.replace(saturated=sat)
    whole = combine_reads(ramp, method=method, pairs=2, gain=GAIN, read_noise=RN, linearity=coeff, chunk_rows=1000)
    chunked = combine_reads(ramp, method=method, pairs=2, gain=GAIN, read_noise=RN, linearity=coeff, chunk_rows=7)
    np.testing.assert_array_equal(chunked.science, whole.science)
    np.testing.assert_array_equal(chunked.variance, whole.variance)
    np.testing.assert_array_equal(chunked.quality, whole.quality)
    assert chunked.header == whole.header


@pytest.mark.parametrize("acqtime1", ["2015-02-27-21:12:40.500", "2015-02-27T21:12:40.500", "2015-02-27-21:12:40.5",
                                      None, "garbage"])
def test_header_times_from_acqtime1_variants_or_acqtime(acqtime1):
    h = fits.Header()
    h["ACQTIME"] = 2457081.3838020833  # 2015-02-27 21:12:40.500 UTC
    if acqtime1 is not None:
        h["ACQTIME1"] = acqtime1
    out = update_combined_header(h, exptime=10.0, method="CDS")
    assert out["DATE-OBS"] == "2015-02-27T21:12:40.500"
    assert out["UTSTART"] == "21:12:40.500" and out["DATE"] == "2015-02-27"


def test_fowler_without_group_keywords_pairs_by_inttime():
    shape = (6, 6)
    rate = np.full(shape, 100.0)
    t, g, i = fowler_layout(2, frmtime=FRMTIME, gap=8.0)
    ramp, _ = make_ramp(rate, t, group=g, index=i)
    with_groups = combine_fowler(ramp, pairs=2, gain=GAIN, read_noise=RN)
    no_groups = combine_fowler(ramp.replace(group=np.zeros_like(ramp.group), index=np.zeros_like(ramp.index)),
                               pairs=2, gain=GAIN, read_noise=RN)
    np.testing.assert_array_equal(no_groups.science, with_groups.science)
    odd = ramp.replace(reads=ramp.reads[:3], inttime=ramp.inttime[:3], group=np.zeros(3, int), index=np.zeros(3, int),
                       saturated=None if ramp.saturated is None else ramp.saturated[:3])
    with pytest.raises(IoiError) as exc:
        combine_fowler(odd, pairs=1, gain=GAIN, read_noise=RN)
    assert exc.value.exit_code == 32


@pytest.mark.parametrize("method", ["CDS", "FOWLER", "UTR"])
def test_ramp_flags_beyond_16_bits_are_refused_by_every_method(method):
    """The ramp's quality goes into uint16 planes: every combination checks it (as_quality)
    rather than letting an assignment cut bits off."""
    ramp, _ = make_ramp(_rate(), header=_header(), **_layouts()[method])
    q = np.zeros(ramp.reads.shape[1:], np.uint32)
    ok = ramp.replace(quality=q | np.uint32(DQ.DEAD))
    out = _combine(method, ok)
    assert out.quality.dtype == np.uint16 and ((out.quality & DQ.DEAD) != 0).all()
    q[0, 0] = 1 << 20
    with pytest.raises(ValueError, match="16 bits"):
        _combine(method, ramp.replace(quality=q))
