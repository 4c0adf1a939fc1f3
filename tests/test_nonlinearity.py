"""Nonlinearity correction and calibration-array checks (SPEC 2.3)."""

import numpy as np
import pytest
from _detector_synth import polynomial_observed
from numpy.testing import assert_allclose

from ioi.errors import ExitCode, IoiError
from ioi.stages.nonlinearity import (
    check_calibration_shape,
    correct_nonlinearity,
    flip_calibration,
    select_order,
)

SHAPE = (32, 48)


def _coefficients(shape=SHAPE, seed=2):
    """Per-pixel cubic poly(observed) = linear, increasing up to 60000 ADU."""
    rng = np.random.default_rng(seed)
    c = np.zeros((4,) + shape, dtype=np.float32)
    c[0] = rng.uniform(-5, 5, shape)
    c[1] = rng.uniform(0.98, 1.02, shape)
    c[2] = rng.uniform(1e-7, 2e-6, shape)  # 4 % to 12 % correction at 40000 ADU
    c[3] = rng.uniform(0, 5e-12, shape)
    return c


def test_known_polynomial_is_inverted():
    c = _coefficients()
    rng = np.random.default_rng(3)
    lost = rng.uniform(500, 3000, SHAPE)  # charge at the pedestal read
    linear_total = rng.uniform(4000, 45000, SHAPE)  # linear charge at the signal read
    obs_ped = polynomial_observed(lost, c)
    obs_sig = polynomial_observed(linear_total, c)
    x = (obs_sig - obs_ped).astype(np.float32)  # what a CDS measures
    corrected, factor = correct_nonlinearity(x, coefficients=c, lost=obs_ped, form="FACTOR")
    assert corrected.dtype == np.float32 and factor.dtype == np.float32
    # The original's rule treats the pedestal charge as linear-corrected by the
    # same factor as the pair: what it yields is x * poly(x+lost)/(x+lost).
    expected = x * (linear_total / obs_sig)
    assert_allclose(corrected, expected, rtol=1e-4)
    # and the correction is significant (several per cent)
    assert np.abs(factor - 1).max() > 0.02
    # The default (DIFFERENCE) gives the true linear charge between the reads
    exact, _ = correct_nonlinearity(x, coefficients=c, lost=obs_ped)
    assert_allclose(exact, linear_total - lost, rtol=1e-4)
    # which the original's rule misses by more than 0.3 % for bright pixels
    assert np.max(np.abs(corrected / (linear_total - lost) - 1)) > 0.003


def test_from_the_reset_the_correction_is_exact():
    c = _coefficients()
    linear = np.random.default_rng(4).uniform(100, 50000, SHAPE)
    observed = polynomial_observed(linear, c).astype(np.float32)
    corrected, _ = correct_nonlinearity(observed, coefficients=c, form="FACTOR")
    assert_allclose(corrected, linear, rtol=1e-4)
    # the difference form drops the polynomial's constant (it cancels in a difference)
    corrected, _ = correct_nonlinearity(observed, coefficients=c)
    assert_allclose(corrected, linear - c[0], rtol=1e-4)


def test_lost_charge_matters():
    c = np.zeros((3,) + SHAPE, dtype=np.float32)
    c[1], c[2] = 1.0, 2e-6  # linear = x + 2e-6 x^2
    lost = 20000.0
    x = np.full(SHAPE, 10000.0, dtype=np.float32)
    with_lost, f_with = correct_nonlinearity(x, coefficients=c, lost=lost, form="FACTOR")
    without, f_without = correct_nonlinearity(x, coefficients=c, form="FACTOR")
    assert_allclose(f_with, 1 + 2e-6 * 30000, rtol=1e-6)
    assert_allclose(f_without, 1 + 2e-6 * 10000, rtol=1e-6)
    # ignoring the pedestal charge underestimates the counts by 4 %
    assert np.all(with_lost - without > 0.035 * x)
    # exact: poly(30000) - poly(20000) = 10000 + 2e-6 * (30000**2 - 20000**2)
    exact, f_exact = correct_nonlinearity(x, coefficients=c, lost=lost)
    assert_allclose(exact, 11000.0, rtol=1e-6)


@pytest.mark.parametrize("value", [0.0, -100.0, np.nan, np.inf])
def test_undefined_points_get_factor_one(value):
    c = _coefficients()
    x = np.full(SHAPE, 5000.0, dtype=np.float32)
    x[3, 4] = value
    corrected, factor = correct_nonlinearity(x, coefficients=c)
    assert factor[3, 4] == 1.0
    assert np.isfinite(factor).all()
    np.testing.assert_array_equal(corrected[3, 4], np.float32(value))


def test_lost_can_make_negative_counts_valid():
    c = np.zeros((2,) + SHAPE, dtype=np.float32)
    c[1] = 1.5
    x = np.full(SHAPE, -10.0, dtype=np.float32)  # noise below the pedestal
    corrected, factor = correct_nonlinearity(x, coefficients=c, lost=1000.0)
    assert_allclose(factor, 1.5)
    assert_allclose(corrected, -15.0)


def test_coefficient_shape_mismatch_is_exit_23_naming_both_shapes():
    c = _coefficients(shape=(16, 16))
    with pytest.raises(IoiError) as err:
        correct_nonlinearity(np.ones(SHAPE, np.float32), coefficients=c)
    assert err.value.exit_code == ExitCode.LINEARITY_SHAPE_MISMATCH == 23
    msg = str(err.value)
    assert "(4, 16, 16)" in msg and "(32, 48)" in msg


def test_standard_size_coefficients_with_odd_data_is_exit_29():
    c = np.zeros((2, 2040, 2040), dtype=np.float32)
    with pytest.raises(IoiError) as err:
        correct_nonlinearity(np.ones((504, 504), np.float32), coefficients=c)
    assert err.value.exit_code == ExitCode.DATA_SHAPE_MISMATCH == 29
    assert "2040" in str(err.value) and "504" in str(err.value)


def test_check_calibration_shape_names_file_and_shapes():
    with pytest.raises(IoiError) as err:
        check_calibration_shape(np.ones((10, 12)), (10, 14), what="flat field", path="flat.fits",
                                exit_code=ExitCode.FLAT_SHAPE_MISMATCH)
    assert err.value.exit_code == 24
    msg = str(err.value)
    assert "flat.fits" in msg and "(10, 12)" in msg and "(10, 14)" in msg
    check_calibration_shape(np.ones((10, 14)), (3, 10, 14), what="flat", path=None, exit_code=24)


def test_select_order_keeps_the_first_planes():
    c = _coefficients()
    s = select_order(c, 2)
    assert s.shape == (3,) + SHAPE
    np.testing.assert_array_equal(s, c[:3])
    assert not np.shares_memory(s, c)


def test_select_order_too_high_is_exit_23():
    with pytest.raises(IoiError) as err:
        select_order(_coefficients(), 5)
    assert err.value.exit_code == 23
    assert "(4, 32, 48)" in str(err.value) and "5" in str(err.value)


def test_flip_calibration_is_left_right():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    f = flip_calibration(a)
    np.testing.assert_array_equal(f[:, :, 0], a[:, :, -1])
    np.testing.assert_array_equal(flip_calibration(f), a)
    assert not np.shares_memory(f, a)


@pytest.mark.parametrize(
    "call",
    [
        lambda x, c: correct_nonlinearity(x, coefficients=c, lost=x * 0.1),
        lambda x, c: select_order(c, 1),
        lambda x, c: flip_calibration(c),
    ],
)
def test_nonlinearity_does_not_change_input(call):
    c = _coefficients()
    x = np.random.default_rng(0).uniform(0, 30000, SHAPE).astype(np.float32)
    cb, xb = c.copy(), x.copy()
    call(x, c)
    np.testing.assert_array_equal(c, cb)
    np.testing.assert_array_equal(x, xb)
