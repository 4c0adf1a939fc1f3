"""Side processes for sep's calls (ioi._sideproc): same results as in-process calls."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from ioi._sideproc import SideProcesses, direct_call
from ioi.stages import _sep


def _star_field(shape=(600, 700), n=40, seed=3):
    """A noisy frame with ``n`` Gaussian stars (float32, C-contiguous) and a bad-pixel plane."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    img = rng.normal(100.0, 5.0, shape)
    for x, y, f in zip(rng.uniform(20, shape[1] - 20, n), rng.uniform(20, shape[0] - 20, n),
                       rng.uniform(2e3, 2e4, n)):
        img += f / (2 * np.pi * 1.8 ** 2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.8 ** 2))
    bad = np.zeros(shape, bool)
    bad[100:104, :] = True
    img[bad] = 0.0
    return np.ascontiguousarray(img, dtype=np.float32), bad


def test_measure_and_segment_in_a_side_process_equal_the_direct_calls():
    img, bad = _star_field()  # 1.7 MB: travels through the shared file
    want_m = _sep.measure(img.copy(), bad.copy(), thresh=5.0, minarea=5, sky_subtracted=False)
    want_objs, want_seg = _sep.segment(img.copy(), bad.copy(), thresh=3.0, minarea=5, deblend=True)
    assert len(want_m) >= 30 and len(want_objs) >= 30  # the field has 40 stars
    data = img.copy()
    with SideProcesses(2, preload=("ioi.stages._sep",)).start() as side:
        got_m = side.call(_sep.measure, data, bad, thresh=5.0, minarea=5, sky_subtracted=False)
        got_objs, got_seg = side.call(_sep.segment, img.copy(), bad, thresh=3.0, minarea=5, deblend=True)
        # with guesses (a small structured array, pickled) as registration calls it
        guesses = want_objs[:20].copy()
        want_g = _sep.measure(img.copy(), bad, thresh=5.0, minarea=5, sky_subtracted=False, guesses=guesses.copy())
        got_g = side.call(_sep.measure, img.copy(), bad, thresh=5.0, minarea=5, sky_subtracted=False,
                          guesses=guesses.copy())
        assert not side._broken and side._children
    np.testing.assert_array_equal(got_m, want_m)
    np.testing.assert_array_equal(got_objs, want_objs)
    np.testing.assert_array_equal(got_seg, want_seg)
    np.testing.assert_array_equal(got_g, want_g)
    np.testing.assert_array_equal(data, img)  # the caller's array is not changed by the child


def test_calls_from_threads_share_the_children():
    img, bad = _star_field(seed=5)
    want = _sep.measure(img.copy(), bad, thresh=5.0, minarea=5, sky_subtracted=True)
    results = [None] * 6
    with SideProcesses(2, preload=("ioi.stages._sep",)) as side:
        def work(i):
            results[i] = side.call(_sep.measure, img.copy(), bad, thresh=5.0, minarea=5, sky_subtracted=True)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(side._children) <= 2
    for r in results:
        np.testing.assert_array_equal(r, want)


def test_an_error_in_the_child_is_raised_in_the_caller():
    with SideProcesses(1) as side:
        with pytest.raises(ValueError, match="no such thing"):  # (the child imports only importable functions)
            side.call(int, "no such thing")
        assert side.call(np.add, 2, 3) == 5  # the child is still serving
        assert not side._broken


def test_a_killed_child_falls_back_to_this_process_with_one_warning(caplog):
    img, bad = _star_field(seed=7)
    want = _sep.measure(img.copy(), bad, thresh=5.0, minarea=5, sky_subtracted=False)
    with SideProcesses(1, preload=("ioi.stages._sep",)).start() as side:
        side._children[0].proc.kill()
        side._children[0].proc.wait()
        with caplog.at_level(logging.WARNING, logger="ioi._sideproc"):
            first = side.call(_sep.measure, img.copy(), bad, thresh=5.0, minarea=5, sky_subtracted=False)
            second = side.call(_sep.measure, img.copy(), bad, thresh=5.0, minarea=5, sky_subtracted=False)
        assert side._broken and not side._children
    np.testing.assert_array_equal(first, want)
    np.testing.assert_array_equal(second, want)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "side process" in warnings[0].getMessage()


def test_closed_side_processes_run_calls_here():
    side = SideProcesses(1).start()
    side.close()
    assert side.call(np.multiply, 4, 5) == 20
    assert direct_call(np.subtract, 9, 4) == 5


def test_an_interrupted_exchange_retires_that_child(monkeypatch):
    from ioi import _sideproc

    with SideProcesses(1).start() as side:
        first = side._children[0]
        real = _sideproc._Child.call

        def interrupted(self, fn, args, kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(_sideproc._Child, "call", interrupted)
        with pytest.raises(KeyboardInterrupt):
            side.call(np.add, 1, 2)
        monkeypatch.setattr(_sideproc._Child, "call", real)
        assert first not in side._children and first.proc.wait(timeout=10) is not None
        assert side.call(np.add, 1, 2) == 3  # a fresh child serves the next call
        assert not side._broken


def test_start_tops_up_to_count_then_workers():
    with SideProcesses(2) as side:
        side.start(1)
        assert len(side._children) == 1
        side.start(5)  # never more than workers
        assert len(side._children) == 2
        side.start()
        assert len(side._children) == 2
        assert side.call(np.add, 2, 3) == 5
