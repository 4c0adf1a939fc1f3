"""Batched weighted polynomial least squares: one small fit per pixel, all pixels at once.

numpy has no batched ``lstsq`` with a per-sample mask, so the normal equations
are built from masked power sums (closed form) and solved with the batched
``np.linalg.solve``; pixels whose system is singular fall back to ``pinv``.
"""

from __future__ import annotations

import numpy as np


def polyfit_masked(x, y, mask, *, order: int, scale: float = 1.0, lowest: int = 0):
    """Fit ``y = sum_i c_i x**i`` independently along axis 0 for every pixel.

    Parameters
    ----------
    x, y : ndarray, (npoints, npix)
        Abscissae and ordinates (NaN allowed where ``mask`` is False).
    mask : ndarray of bool, (npoints, npix)
        Points used in each pixel's fit.
    order : int
        Polynomial order.
    scale : float
        ``x`` is divided by this before forming powers (conditioning).
    lowest : int
        Lowest power fitted; lower coefficients are fixed at 0 (e.g. 1 forces
        the polynomial through the origin).

    Returns
    -------
    coeffs : ndarray, float64, (order + 1, npix)
        Coefficients for the unscaled ``x`` (order 0 first; those below
        ``lowest`` are 0).
    count : ndarray, int, (npix,)
        Points used; a pixel with fewer points than free coefficients gets NaN.
    """
    w = mask.astype(np.float64)
    # no needless copies: these (npoints, npix) float64 arrays set a chunk's memory
    xs = np.where(mask, x, 0.0).astype(np.float64, copy=False)
    xs /= scale
    ys = np.where(mask, y, 0.0).astype(np.float64, copy=False)
    powers = np.arange(lowest, order + 1)
    npar = powers.size
    npix = xs.shape[1]
    sums = np.empty((2 * order + 1, npix))
    rhs = np.empty((order + 1, npix))
    power = w.copy()
    for m in range(2 * order + 1):  # loop over polynomial orders
        sums[m] = power.sum(axis=0)
        if m <= order:
            rhs[m] = (power * ys).sum(axis=0)
        power *= xs
    idx = np.add.outer(powers, powers)
    normal = np.moveaxis(sums[idx], -1, 0)  # (npix, npar, npar)
    rhs_t = rhs[powers].T[..., None]  # (npix, npar, 1)
    count = w.sum(axis=0).astype(int)
    few = count < npar
    normal[few] = np.eye(npar)
    rhs_t[few] = 0.0
    try:
        sol = np.linalg.solve(normal, rhs_t)[..., 0]
    except np.linalg.LinAlgError:
        sol = (np.linalg.pinv(normal) @ rhs_t)[..., 0]
    sol[few] = np.nan
    out = np.zeros((order + 1, npix))
    out[powers] = sol.T / scale ** powers[:, None]
    sol = out
    return sol, count


def polyval(coeffs, x):
    """Evaluate ``sum_i coeffs[i] * x**i`` (Horner), broadcasting ``coeffs[i]`` against ``x``."""
    out = np.zeros(np.broadcast_shapes(np.shape(coeffs[0]), np.shape(x)), dtype=np.float64)
    for c in coeffs[::-1]:  # loop over polynomial orders
        out = out * x + c
    return out
