"""ioi.frame helpers."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import pytest

from ioi.frame import DQ, QUALITY_DTYPE, Frame, as_quality, flagged


@settings(max_examples=40, deadline=None)
@given(ny=st.integers(1, 150), nx=st.integers(1, 9), bits=st.sampled_from([DQ.DO_NOT_USE, DQ.SATURATED | DQ.DEAD, 1 << 13]),
       seed=st.integers(0, 2**16), dtype=st.sampled_from([np.uint32, np.uint16]))
def test_flagged_is_the_bit_test(ny, nx, bits, seed, dtype):
    q = np.random.default_rng(seed).integers(0, 1 << 14, (ny, nx)).astype(dtype)
    got = flagged(q, bits)
    assert got.dtype == bool and got.shape == q.shape
    np.testing.assert_array_equal(got, (q & int(bits)) != 0)


def test_flagged_other_dimensions():
    q = np.arange(24, dtype=np.uint32).reshape(2, 3, 4)
    np.testing.assert_array_equal(flagged(q, 5), (q & 5) != 0)
    np.testing.assert_array_equal(flagged(q.ravel(), 2), (q.ravel() & 2) != 0)


def test_scratch_reuses_its_buffers():
    from ioi._memory import Scratch

    s = Scratch()
    a = s.get("x", (4, 5), np.float32)
    assert a.shape == (4, 5) and a.dtype == np.float32 and a.flags.c_contiguous
    a[...] = 1.0
    b = s.get("x", (3, 5), np.float32)  # smaller: the same memory
    assert np.shares_memory(a, b) and b.flags.c_contiguous
    c = s.get("x", (2, 5), np.uint32)
    assert np.shares_memory(a, c) and c.shape == (2, 5)
    d = s.get("x", (50, 50), np.float64)  # larger: a new buffer
    assert d.shape == (50, 50) and not np.shares_memory(a, d)
    assert not np.shares_memory(s.get("y", (4, 5), np.float32), s.get("x", (4, 5), np.float32))


def test_every_dq_bit_fits_the_quality_dtype():
    assert QUALITY_DTYPE == np.uint16
    assert all(int(b) <= np.iinfo(QUALITY_DTYPE).max for b in DQ)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.int32, np.int64, bool])
def test_as_quality_converts_flags_that_fit(dtype):
    q = np.array([[0, 1], [int(DQ.NONLINEAR_EXTRAPOLATED) if dtype not in (np.uint8, bool) else 1, 3 if dtype is not bool else 0]],
                 dtype=dtype)
    got = as_quality(q)
    assert got.dtype == QUALITY_DTYPE
    np.testing.assert_array_equal(got, q.astype(np.int64))
    same = np.zeros((2, 2), QUALITY_DTYPE)
    assert as_quality(same) is same  # no copy when already uint16
    assert Frame.from_science(np.zeros((2, 2)), quality=q).quality.dtype == QUALITY_DTYPE


@pytest.mark.parametrize("bad", [np.array([1 << 16], np.uint32), np.array([-1], np.int32), np.array([0.5])])
def test_as_quality_refuses_values_that_are_not_dq_bits(bad):
    with pytest.raises(ValueError):
        as_quality(bad)
