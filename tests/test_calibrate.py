"""Flat fielding and bad-pixel masking (SPEC 2.4, 2.5)."""

import numpy as np
import pytest
from astropy.io import fits
from numpy.testing import assert_allclose

from ioi.errors import ExitCode, IoiError
from ioi.frame import DQ, Frame
from ioi.stages.calibrate import apply_bad_pixel_masks, apply_flat, combined_bad_pixel_mask

SHAPE = (24, 40)


def _frame(seed=0):
    rng = np.random.default_rng(seed)
    header = fits.Header()
    header["OBJECT"] = "test"
    return Frame.from_science(
        rng.normal(1000, 30, SHAPE), header,
        variance=np.full(SHAPE, 900.0), quality=np.zeros(SHAPE, np.uint32),
    )


def _flat(seed=1):
    return np.random.default_rng(seed).uniform(0.8, 1.2, SHAPE).astype(np.float32)


def test_flat_divides_science_and_variance():
    frame, flat = _frame(), _flat()
    out = apply_flat(frame, flat, path="flat.fits")
    assert_allclose(out.science, frame.science / flat, rtol=1e-6)
    assert_allclose(out.variance, frame.variance / flat.astype(np.float64) ** 2, rtol=1e-6)
    assert out.science.dtype == np.float32 and out.variance.dtype == np.float32
    assert (out.quality == 0).all()
    assert out.header["L1FLAT"] == 1 and out.header["L1FLATF"] == "flat.fits"
    assert out.header["OBJECT"] == "test"


@pytest.mark.parametrize("value", [0.0, -0.5, np.nan, np.inf])
def test_bad_flat_values_give_nan_and_no_flat(value):
    flat = _flat()
    flat[5, 7] = value
    out = apply_flat(_frame(), flat)
    assert np.isnan(out.science[5, 7]) and np.isnan(out.variance[5, 7])
    assert out.quality[5, 7] == DQ.NO_FLAT | DQ.DO_NOT_USE
    good = np.ones(SHAPE, bool)
    good[5, 7] = False
    assert np.isfinite(out.science[good]).all() and (out.quality[good] == 0).all()


def test_flat_keeps_existing_quality_bits():
    frame = _frame()
    q = frame.quality.copy()
    q[1, 1] = DQ.SATURATED
    flat = _flat()
    flat[1, 1] = 0
    out = apply_flat(frame.replace(quality=q), flat)
    assert out.quality[1, 1] == DQ.SATURATED | DQ.NO_FLAT | DQ.DO_NOT_USE


def test_flat_shape_mismatch_is_exit_24_naming_both():
    with pytest.raises(IoiError) as err:
        apply_flat(_frame(), np.ones((24, 41)), path="flat_k.fits")
    assert err.value.exit_code == ExitCode.FLAT_SHAPE_MISMATCH == 24
    msg = str(err.value)
    assert "flat_k.fits" in msg and "(24, 41)" in msg and "(24, 40)" in msg


def test_standard_flat_on_a_small_frame_is_exit_29():
    with pytest.raises(IoiError) as err:
        apply_flat(_frame(), np.ones((2040, 2040), np.float32))
    assert err.value.exit_code == ExitCode.DATA_SHAPE_MISMATCH == 29
    assert "(2040, 2040)" in str(err.value) and "(24, 40)" in str(err.value)


def test_three_dimensional_flat_is_rejected():
    with pytest.raises(IoiError) as err:
        apply_flat(_frame(), np.ones((1,) + SHAPE))
    assert err.value.exit_code == 24


def _masks():
    flat_mask = np.ones(SHAPE, np.float32)
    lin_mask = np.ones(SHAPE, np.float32)
    flat_mask[2, 3] = np.nan
    lin_mask[4, 5] = np.nan
    lin_mask[2, 3] = np.nan  # bad in both
    return {"FLAT": flat_mask, "LIN": lin_mask}


def test_combined_mask_is_the_union_of_bad_pixels():
    bad = combined_bad_pixel_mask(_masks(), SHAPE)
    assert bad.dtype == bool and bad.shape == SHAPE
    assert set(zip(*np.nonzero(bad))) == {(2, 3), (4, 5)}
    assert not combined_bad_pixel_mask({}, SHAPE).any()


def test_masks_make_bad_pixels_nan_and_flag_them():
    frame = _frame()
    out = apply_bad_pixel_masks(frame, _masks())
    for y, x in [(2, 3), (4, 5)]:
        assert np.isnan(out.science[y, x]) and np.isnan(out.variance[y, x])
        assert out.quality[y, x] == DQ.MASKED | DQ.DO_NOT_USE
    # equivalent to the original's multiplication of the 1/NaN masks into the data
    product = frame.science * _masks()["FLAT"] * _masks()["LIN"]
    np.testing.assert_array_equal(out.science, product)
    assert np.count_nonzero(out.quality) == 2
    assert out.header["L1BADPX"] == 1 and out.header["L1BADPXW"] == "FLAT,LIN"


def test_no_masks_changes_no_data():
    frame = _frame()
    out = apply_bad_pixel_masks(frame, {})
    np.testing.assert_array_equal(out.science, frame.science)
    assert out.header["L1BADPX"] == 0


def test_mask_shape_mismatch_is_exit_26_naming_mask_and_shapes():
    masks = _masks()
    masks["LIN"] = np.ones((24, 39), np.float32)
    with pytest.raises(IoiError) as err:
        apply_bad_pixel_masks(_frame(), masks)
    assert err.value.exit_code == ExitCode.MASK_SHAPE_MISMATCH == 26
    msg = str(err.value)
    assert "LIN" in msg and "(24, 39)" in msg and "(24, 40)" in msg


def test_standard_mask_on_small_frame_is_exit_29():
    with pytest.raises(IoiError) as err:
        combined_bad_pixel_mask({"FLAT": np.ones((2040, 2040), np.float32)}, SHAPE)
    assert err.value.exit_code == 29
    assert "FLAT" in str(err.value)


def _snapshot(frame):
    return (frame.science.copy(), frame.variance.copy(), frame.quality.copy(), frame.header.copy())


@pytest.mark.parametrize(
    "call",
    [
        lambda f, flat, masks: apply_flat(f, flat),
        lambda f, flat, masks: apply_bad_pixel_masks(f, masks),
        lambda f, flat, masks: combined_bad_pixel_mask(masks, f.shape),
    ],
)
def test_calibrate_does_not_change_input(call):
    frame, flat, masks = _frame(), _flat(), _masks()
    flat[0, 0] = 0.0
    before = _snapshot(frame)
    flat_before = flat.copy()
    masks_before = {k: v.copy() for k, v in masks.items()}
    call(frame, flat, masks)
    after = _snapshot(frame)
    for a, b in zip(before[:3], after[:3]):
        np.testing.assert_array_equal(a, b)
    assert before[3] == after[3]
    np.testing.assert_array_equal(flat, flat_before)
    for k in masks:
        np.testing.assert_array_equal(masks[k], masks_before[k])


@pytest.mark.parametrize("step", ["flat", "masks"])
def test_in_place_gives_the_same_frame_in_the_frames_own_arrays(step):
    """in_place=True (the pipeline's own frames): same values, flags and header as the copying
    call, written into the input's arrays; arrays that cannot be changed are copied instead."""
    flat, masks = _flat(), _masks()
    flat[0, 0] = 0.0  # a NO_FLAT pixel: the quality is flagged too
    call = {"flat": lambda f, **kw: apply_flat(f, flat, **kw),
            "masks": lambda f, **kw: apply_bad_pixel_masks(f, masks, **kw)}[step]
    want = call(_frame())
    frame = _frame()
    got = call(frame, in_place=True)
    for name in ("science", "variance", "quality"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
        assert getattr(got, name) is getattr(frame, name)
    assert got.header == want.header
    # read-only (or float64) arrays: a new frame, the input untouched
    frozen = _frame()
    for a in (frozen.science, frozen.variance, frozen.quality):
        a.flags.writeable = False
    before = _snapshot(frozen)
    got = call(frozen, in_place=True)
    for name, b in zip(("science", "variance", "quality"), before):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
        np.testing.assert_array_equal(getattr(frozen, name), b)
