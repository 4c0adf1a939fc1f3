"""The per-dither statistics of the JSON quality report (``ioi.pipeline``)."""

import math

import numpy as np
import pytest

from ioi.pipeline import _median_and_robust_sigma, _robust_sigma


@pytest.mark.parametrize("n", [9, 150_000, 260_100, 1_000_001])
def test_median_and_robust_sigma_against_numpy_and_the_true_sigma(n):
    rng = np.random.default_rng(n)
    values = rng.normal(4.0, 3.0, n).astype(np.float32)
    values[rng.random(n) < 0.05] = np.nan
    values[:2] = np.inf, -np.inf  # not finite: left out like NaN
    median, sigma = _median_and_robust_sigma(values)
    finite = values[np.isfinite(values)]
    assert median == pytest.approx(float(np.median(finite)), abs=1e-6)
    if n > 1000:  # 1.4826 x MAD estimates a Gaussian's sigma (within 1 % for >= 1e5 values)
        assert sigma == pytest.approx(3.0, rel=0.01)
    assert _robust_sigma(values) == sigma


def test_median_and_robust_sigma_of_no_finite_value_is_nan():
    median, sigma = _median_and_robust_sigma(np.full(10, np.nan, dtype=np.float32))
    assert math.isnan(median) and math.isnan(sigma)
