"""Reference-pixel subtraction (SPEC 2.1)."""

import numpy as np
import pytest
from _detector_synth import raw_offsets, section_parity_means
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from ioi.errors import ExitCode, IoiError
from ioi.stages import reference
from ioi.stages.reference import (
    REFERENCE_METHODS,
    estimate_read_noise,
    output_sections,
    strip_border,
    subtract_reference,
)

BORDER = 4


# ----------------------------------------------------------------- noise-free invariants


@st.composite
def offset_cases(draw):
    noutputs = draw(st.sampled_from([1, 4, 32]))
    ny = draw(st.sampled_from([64, 96, 256]))
    nx = draw(st.sampled_from([64, 128, 256]))
    level = st.floats(-2000, 2000, allow_nan=False)
    offsets = np.array(draw(st.lists(level, min_size=2 * noutputs, max_size=2 * noutputs))).reshape(noutputs, 2)
    slope = st.floats(-2, 2, allow_nan=False)
    drift = np.array(draw(st.lists(slope, min_size=2 * noutputs, max_size=2 * noutputs))).reshape(noutputs, 2)
    nreads = draw(st.integers(1, 3))
    return noutputs, ny, nx, offsets, drift, nreads


@settings(max_examples=40, deadline=None)
@given(offset_cases())
def test_ramp_removes_any_offset_and_linear_drift(case):
    noutputs, ny, nx, offsets, drift, nreads = case
    raw = np.stack(
        [raw_offsets(ny, nx, noutputs, offsets=offsets * (1 + 0.1 * k), drift=drift) for k in range(nreads)]
    )
    out = subtract_reference(raw.astype(np.float32), method="RAMP", noutputs=noutputs)
    assert out.dtype == np.float32 and out.shape == raw.shape
    # noise-free: everything (science and reference pixels) is removed
    assert np.abs(out).max() < 1e-3


@settings(max_examples=30, deadline=None)
@given(offset_cases())
def test_constantoff_removes_any_per_output_parity_offset(case):
    noutputs, ny, nx, offsets, _, _ = case
    raw = raw_offsets(ny, nx, noutputs, offsets=offsets).astype(np.float32)
    out = subtract_reference(raw, method="CONSTANTOFF", noutputs=noutputs)
    assert out.shape == raw.shape
    assert np.abs(out).max() < 1e-3


@pytest.mark.parametrize("method", ["CONSTANT", "CONSTANTOFF", "RAMP", "COLUMN", "FULL"])
def test_every_method_removes_a_global_constant(method):
    raw = np.full((2, 64, 64), 1234.5, dtype=np.float32)
    out = subtract_reference(raw, method=method, noutputs=4)
    assert np.abs(out).max() < 1e-3


def test_constant_uses_one_level_for_all_outputs():
    # four outputs: levels 100, 100, 300, 300
    raw = raw_offsets(64, 64, 4, offsets=np.array([[100.0, 100.0]] * 2 + [[300.0, 300.0]] * 2))
    out = subtract_reference(raw, method="CONSTANT", noutputs=4)
    # one mean (200) removed: the left half keeps -100, the right half +100
    assert_allclose(out[:, :32], -100.0, atol=1e-3)
    assert_allclose(out[:, 32:], 100.0, atol=1e-3)


def test_ramp_uses_true_reference_row_centres():
    # a drift of 1 ADU/row: the bottom rows 1-3 average to row 2, the top rows
    # (ny-4..ny-2) to row ny-3.  Placing them at 1.5 and ny+7.5 (the original's
    # 2055.5 for 2048 rows) would leave a residual tilt.
    ny = 128
    raw = np.broadcast_to(np.arange(ny, dtype=np.float32)[:, None], (ny, 64)).copy()
    out = subtract_reference(raw, method="RAMP", noutputs=1)
    assert np.abs(out).max() < 1e-3


def test_trim_changes_nothing_and_returns_float32():
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 65535, (2, 32, 32)).astype(np.uint16)
    out = subtract_reference(raw, method="trim", noutputs=4)
    assert out.dtype == np.float32
    assert_allclose(out, raw.astype(np.float32))


# ----------------------------------------------------------------- with read noise


@pytest.mark.parametrize("method", ["CONSTANTOFF", "RAMP"])
@pytest.mark.parametrize("noutputs", [1, 4])
def test_offsets_removed_to_the_noise_limit(method, noutputs):
    """256x256, 15 ADU read noise: every output and parity left within 5 sigma.

    sigma of one residual = rn * sqrt(1/n_ref_eff + 1/n_sci): n_ref is the
    number of reference pixels of that section and parity (3 bottom + 3 top
    rows); for RAMP the section mean of the line is the mean of the bottom
    and top estimates, so n_ref_eff = n_ref as well.  Averaged over 16
    independent reads the limit shrinks by 4.
    """
    rng = np.random.default_rng(20261125)
    rn, ny, nx, nreads = 15.0, 256, 256, 16
    offsets = rng.uniform(-3000, 3000, (noutputs, 2))
    drift = rng.uniform(-1, 1, (noutputs, 2)) if method == "RAMP" else None
    raw = raw_offsets(ny, nx, noutputs, offsets=offsets, drift=drift)
    reads = (raw[None] + rng.normal(0, rn, (nreads, ny, nx))).astype(np.float32)
    out = subtract_reference(reads, method=method, noutputs=noutputs)
    resid = section_parity_means(out, noutputs)  # (nreads, noutputs, 2)
    width = nx // noutputs
    n_ref = 6 * width // 2
    n_sci = (ny - 2 * BORDER) * (width - (2 * BORDER if noutputs == 1 else BORDER)) / 2
    sigma = rn * np.sqrt(1 / n_ref + 1 / n_sci)
    assert np.abs(resid).max() < 5 * sigma
    assert np.abs(resid.mean(axis=0)).max() < 5 * sigma / np.sqrt(nreads)
    # and the offsets were large: without correction the residual is huge
    assert np.abs(section_parity_means(reads, noutputs)).max() > 100


# ----------------------------------------------------------------- COLUMN / FULL


def _banding(ny, amplitude=20.0, period=400.0):
    rows = np.arange(ny, dtype=np.float64)
    return amplitude * np.sin(2 * np.pi * rows / period + 0.3) + 5.0


def test_column_removes_slow_row_banding():
    ny, nx = 256, 64
    band = _banding(ny)
    raw = np.broadcast_to(band[:, None], (ny, nx)).astype(np.float32)
    out = subtract_reference(raw, method="COLUMN", noutputs=1)
    # A Gaussian of sigma^2 = 50 rows^2 passes a period-400 sine with gain
    # exp(-50 (2 pi / 400)^2 / 2) = 0.9939: residual amplitude 20 * 0.0061 =
    # 0.12 ADU away from the edges (the mirrored edges add a little more).
    interior = slice(30, ny - 30)
    assert np.abs(out[interior]).max() < 0.2
    assert np.abs(out).max() < 2.0
    assert np.abs(raw - raw.mean()).max() > 15  # there was banding to remove


def test_column_kernel_is_normalised_gaussian_over_201_rows():
    k = reference._column_kernel()
    assert k.size == 201
    assert_allclose(k.sum(), 1.0, rtol=1e-12)
    assert_allclose(k[100 + 10] / k[100], np.exp(-1.0), rtol=1e-12)


def test_full_removes_offsets_and_banding():
    ny, nx, noutputs = 256, 128, 4
    rng = np.random.default_rng(5)
    offsets = rng.uniform(-500, 500, (noutputs, 2))
    drift = rng.uniform(-0.5, 0.5, (noutputs, 2))
    band = _banding(ny) - 5.0
    raw = raw_offsets(ny, nx, noutputs, offsets=offsets, drift=drift) + band[:, None]
    out = subtract_reference(raw.astype(np.float32), method="FULL", noutputs=noutputs)
    ramp_only = subtract_reference(raw.astype(np.float32), method="RAMP", noutputs=noutputs)
    interior = slice(30, ny - 30)
    # RAMP alone leaves the banding (minus its straight-line part)
    assert np.abs(ramp_only[interior]).max() > 5
    assert np.abs(out[interior]).max() < 0.3


# ----------------------------------------------------------------- helpers


def test_output_sections_split_any_width():
    assert output_sections(2048, 32)[1] == slice(64, 128)
    assert output_sections(256, 4) == [slice(0, 64), slice(64, 128), slice(128, 192), slice(192, 256)]
    assert output_sections(512, 1) == [slice(0, 512)]


def test_strip_border_returns_a_copy_of_the_science_area():
    a = np.arange(3 * 16 * 20, dtype=np.float32).reshape(3, 16, 20)
    s = strip_border(a)
    assert s.shape == (3, 8, 12)
    assert_allclose(s, a[:, 4:12, 4:16])
    s[...] = -1
    assert a.min() == 0


def test_read_noise_of_reads_is_that_of_their_difference():
    """The difference over the reference pixels only: the same float32 differences, so the
    same estimate to the bit, with NaNs and hot reference pixels among them."""
    rng = np.random.default_rng(12)
    a = rng.normal(1000.0, 15.0, (70, 90)).astype(np.float32)
    b = (a + rng.normal(3.0, 21.0, a.shape)).astype(np.float32)
    a[1, 5], b[50, 2], b[2, 40] = np.nan, np.inf, 9e4
    assert reference.read_noise_of_reads(a, b, border=4) == estimate_read_noise(b - a, border=4)
    assert reference.read_noise_of_reads(a, b, border=3) == estimate_read_noise(b - a, border=3)
    with pytest.raises(IoiError, match="shapes"):
        reference.read_noise_of_reads(a, b[:, :-1])
    with pytest.raises(IoiError, match="border"):
        reference.read_noise_of_reads(a[:8], b[:8], border=4)


def test_estimate_read_noise_recovers_injected_noise():
    rng = np.random.default_rng(11)
    rn, ny, nx = 15.0, 256, 256
    offsets = rng.uniform(-100, 100, (4, 2))
    raw = raw_offsets(ny, nx, 4, offsets=offsets)
    reads = (raw[None] + rng.normal(0, rn, (2, ny, nx))).astype(np.float32)
    corrected = subtract_reference(reads, method="RAMP", noutputs=4)
    est = estimate_read_noise(corrected[1] - corrected[0])
    # N ~ 3000 reference pixels; the MAD-based sigma of N Gaussian values has a
    # relative standard error sqrt(1.3605 / N) = 1.17 / sqrt(N): allow 5 of them
    n = 6 * (nx - 2) + 6 * (ny - 2 * 4)
    assert abs(est - rn) < 5 * 1.17 / np.sqrt(n) * rn


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize("noutputs", [0, 2, 3, 16, 64, None, "x"])
def test_bad_noutputs_is_exit_4(noutputs):
    with pytest.raises(IoiError) as err:
        subtract_reference(np.zeros((64, 64), np.float32), noutputs=noutputs)
    assert err.value.exit_code == ExitCode.NO_NOUTPUTS == 4
    assert "NOUTPUTS" in str(err.value)


def test_noutputs_not_dividing_width_is_exit_4():
    with pytest.raises(IoiError) as err:
        subtract_reference(np.zeros((64, 72), np.float32), noutputs=32)
    assert err.value.exit_code == 4
    assert "72" in str(err.value) and "32" in str(err.value)


def test_unknown_method_is_exit_5_and_lists_methods():
    with pytest.raises(IoiError) as err:
        subtract_reference(np.zeros((64, 64), np.float32), method="MEDIAN", noutputs=4)
    assert err.value.exit_code == ExitCode.UNKNOWN_REFERENCE_METHOD == 5
    msg = str(err.value)
    assert "MEDIAN" in msg
    for name in REFERENCE_METHODS:
        assert name in msg


# ----------------------------------------------------------------- purity


@pytest.mark.parametrize(
    "call",
    [
        *[(lambda a, m=m: subtract_reference(a, method=m, noutputs=4)) for m in REFERENCE_METHODS],
        lambda a: strip_border(a),
        lambda a: estimate_read_noise(a[0]),
    ],
)
def test_reference_stages_do_not_change_input(call):
    rng = np.random.default_rng(0)
    a = rng.normal(1000, 10, (2, 64, 64)).astype(np.float32)
    before = a.copy()
    call(a)
    np.testing.assert_array_equal(a, before)


def test_subtract_reference_does_not_change_input_2d():
    a = np.random.default_rng(1).normal(1000, 10, (64, 64)).astype(np.float32)
    before = a.copy()
    out = subtract_reference(a, method="FULL", noutputs=32)
    assert out.shape == a.shape
    np.testing.assert_array_equal(a, before)
