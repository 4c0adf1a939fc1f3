"""ioi.frame helpers."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ioi.frame import DQ, flagged


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
