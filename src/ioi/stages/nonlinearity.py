"""Nonlinearity correction (SPEC 2.3) and checks shared by the calibration stages.

The coefficient cube ``(order+1, ny, nx)`` holds, in plane ``i``, the
order-``i`` coefficient of a per-pixel polynomial mapping observed counts
(charge since the reset, ADU) to linear counts.  A CDS or Fowler difference
starts at the pedestal read, after ``lost`` ADU have already been collected
since the reset, so the polynomial is evaluated at ``x + lost`` and the
correction applied as a factor::

    factor = poly(x + lost) / (x + lost),   corrected = x * factor

Axis order: ``(ny, nx)`` for a frame, ``(order+1, ny, nx)`` for coefficients.
"""

from __future__ import annotations

import numpy as np

from ioi.errors import ConfigError, ExitCode, IoiError

#: The shape every calibration array has in the SPEC (science area of 2048x2048).
STANDARD_CALIBRATION_SHAPE = (2040, 2040)


def check_calibration_shape(array, shape, *, what: str, path, exit_code: int, ndim: int = 2) -> None:
    """Raise unless ``array`` has ``ndim`` axes and its last two equal ``shape[-2:]``.

    Parameters
    ----------
    array : ndarray, (..., ny, nx)
        The calibration array (flat, mask, coefficient cube).
    shape : tuple
        Shape of the data it is applied to; its last two axes are compared.
    what : str
        What the array is, e.g. ``"flat"`` or ``"linearity coefficients"``.
    path : str or None
        File it came from, named in the message.
    exit_code : int
        The code of the calibration file itself (23 linearity, 24 flat,
        26 mask).
    ndim : int
        Number of axes ``array`` must have: 2 for a flat or mask, 3 for a
        coefficient cube.

    Raises
    ------
    IoiError
        With ``exit_code`` when the calibration array has the wrong shape.
        When the calibration array has the SPEC's standard 2040x2040 shape,
        the file is right and the data frame is the odd one out, so the code
        is 29 (DATA_SHAPE_MISMATCH) instead.  The message names both shapes.
    """
    arr_shape = tuple(np.shape(array))
    want = tuple(shape)[-2:]
    if len(arr_shape) == ndim and arr_shape[-2:] == want:
        return
    code = exit_code
    if len(arr_shape) == ndim and arr_shape[-2:] == STANDARD_CALIBRATION_SHAPE:
        code = ExitCode.DATA_SHAPE_MISMATCH
    source = f" ({path})" if path else ""
    raise IoiError(
        f"{what}{source} has shape {arr_shape}, but the data frame is {want}",
        exit_code=code,
    )


def select_order(coefficients, order: int) -> np.ndarray:
    """The first ``order + 1`` planes of a coefficient cube ``(n, ny, nx)``, a copy.

    Raises
    ------
    IoiError
        exit code 23 when the cube has fewer than ``order + 1`` planes or is
        not 3-D; ConfigError (exit code 8) for a negative order.
    """
    coefficients = np.asarray(coefficients)
    if int(order) != order or order < 0:
        raise ConfigError(f"[nonlinearity_corrections] order={order!r} must be a whole number >= 0")
    if coefficients.ndim != 3 or coefficients.shape[0] < order + 1:
        raise IoiError(
            f"linearity coefficients of shape {coefficients.shape} do not hold order {order} "
            f"({order + 1} planes needed)",
            exit_code=ExitCode.LINEARITY_SHAPE_MISMATCH,
        )
    return coefficients[: int(order) + 1].copy()


def flip_calibration(array) -> np.ndarray:
    """Left-right flip of ``(..., ny, nx)`` (the ``--f`` flag), a copy."""
    return np.ascontiguousarray(np.asarray(array)[..., ::-1])


def linearity_factor(counts, *, coefficients, lost=0.0, form: str = "DIFFERENCE") -> np.ndarray:
    """The correction factor (see :func:`horner_factor`) as float64 (ny, nx); 1 where undefined.

    Horner evaluation in float64.  Where ``x + lost <= 0`` or anything is
    non-finite the factor is 1 (no correction).
    """
    x = np.asarray(counts, dtype=np.float64)
    coefficients = np.asarray(coefficients)
    check_calibration_shape(
        coefficients, x.shape, what="linearity coefficients", path=None,
        exit_code=ExitCode.LINEARITY_SHAPE_MISMATCH, ndim=3,
    )
    return horner_factor(x, coefficients, lost, form=form)


def horner_poly(x, coefficients) -> np.ndarray:
    """``sum_i coefficients[i] * x**i`` by Horner's rule, float64.

    ``coefficients`` is ``(order+1,)`` followed by axes broadcastable with ``x``.
    """
    x = np.asarray(x, dtype=np.float64)
    poly = np.empty(np.broadcast_shapes(x.shape, np.shape(coefficients)[1:]), dtype=np.float64)
    poly[...] = coefficients[-1]
    for plane in coefficients[-2::-1]:  # highest order first
        poly *= x
        poly += plane
    return poly


LINEARITY_FORMS = ("DIFFERENCE", "FACTOR")


def horner_factor(x, coefficients, lost=0.0, *, form: str = "DIFFERENCE", dtype=np.float64) -> np.ndarray:
    """The correction factor for a difference ``x`` that starts ``lost`` ADU after the reset
    (no shape checks; ``dtype``, float64 by default, shape of ``x``).

    ``form="FACTOR"`` is the original pipeline's rule, ``poly(x + lost) / (x + lost)``:
    it treats the pedestal charge as if it had been corrected by the same factor
    as the whole, which leaves the result short by about ``c2 * lost`` (0.1-1 %
    for bright pixels).  ``form="DIFFERENCE"`` (default) is exact for a
    difference of two nonlinear reads: ``(poly(x + lost) - poly(lost)) / x``, so
    that ``x * factor`` is the linear charge collected between the two reads.

    ``coefficients`` is ``(order+1,) + x.shape``; the factor is 1 where it is
    undefined (``x + lost <= 0``, ``x == 0`` for DIFFERENCE, or non-finite).

    Both forms are evaluated without subtracting large numbers, so float32
    (``dtype=np.float32``, what the frame combination uses) keeps a relative
    error of a few 1e-7 even for tiny ``x``:

    * DIFFERENCE is the divided difference ``poly[x + lost, lost]``, by a
      Horner-style recurrence (synthetic division of ``poly`` by
      ``(y - lost)``, the quotient evaluated at ``x + lost``); for a cubic it is
      ``c1 + c2 (a + b) + c3 (a^2 + a b + b^2)``, ``a = x + lost``, ``b = lost``.
      Subtracting ``poly(lost)`` from ``poly(x + lost)`` instead loses
      ``poly / x`` ulps, which float32 cannot afford.
    * FACTOR is ``c0 / a + (c1 + c2 a + ... )``, the same quotient without
      forming ``poly(a)`` first.
    """
    x = np.asarray(x, dtype=dtype)
    lost = np.asarray(lost, dtype=dtype)
    shape = np.broadcast_shapes(x.shape, lost.shape, np.shape(coefficients)[1:])
    order = len(coefficients) - 1
    a = np.add(x, lost, dtype=dtype)  # x + lost
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if str(form).upper() == "FACTOR":
            factor = np.empty(shape, dtype=dtype)
            factor[...] = coefficients[-1] if order >= 1 else 0.0
            for plane in coefficients[-2:0:-1]:  # Horner over c1..cn: (poly(a) - c0) / a
                factor *= a
                factor += plane
            factor += np.divide(coefficients[0], a, dtype=dtype)
            good = a > 0
        else:
            factor = _divided_difference(a, lost, coefficients, shape, dtype)
            good = (a > 0) & (x != 0)
        good &= np.isfinite(factor)
    if not good.all():
        factor[~good] = 1.0
    return factor


def _divided_difference(a, b, coefficients, shape, dtype) -> np.ndarray:
    """``(poly(a) - poly(b)) / (a - b)`` for per-pixel polynomials, without the subtraction.

    Loop over orders: ``D = D*a + R``, ``R = R*b + c_k``, from ``D = c_n``,
    ``R = c_n b + c_(n-1)``; ``R`` runs the synthetic division of ``poly`` by
    ``(y - b)`` and ``D`` evaluates the quotient at ``a`` (no library offers
    this for arrays of polynomials).  In-place updates keep two work arrays.
    """
    order = len(coefficients) - 1
    if order < 1:
        return np.zeros(shape, dtype=dtype)  # a constant cancels in a difference
    if order == 1:
        d = np.empty(shape, dtype=dtype)
        d[...] = coefficients[1]
        return d
    r = np.multiply(coefficients[order], b, out=np.empty(shape, dtype=dtype))
    r += coefficients[order - 1]
    d = np.multiply(coefficients[order], a, out=np.empty(shape, dtype=dtype))
    d += r
    for k in range(order - 2, 0, -1):
        r *= b
        r += coefficients[k]
        d *= a
        d += r
    return d


def correct_nonlinearity(counts, *, coefficients, lost=0.0, form: str = "DIFFERENCE") -> tuple[np.ndarray, np.ndarray]:
    """Correct counts for the detector's nonlinearity.

    Parameters
    ----------
    counts : array_like, (ny, nx)
        Observed counts ``x`` (ADU) of a difference that starts at the
        pedestal read.
    coefficients : ndarray, (order+1, ny, nx)
        Plane ``i`` = order-``i`` coefficient of poly(observed) = linear.
    lost : float or array_like (ny, nx)
        Charge (ADU) already collected at the pedestal read: rate x INTTIME
        of that read.

    Returns
    -------
    corrected : ndarray, float32, (ny, nx)
        ``counts * factor``.
    factor : ndarray, float32, (ny, nx)
        See :func:`horner_factor`; 1 where undefined (NaN counts stay NaN
        in ``corrected``).
    form : {"DIFFERENCE", "FACTOR"}
        ``FACTOR`` is the original's rule, ``poly(x + lost) / (x + lost)``
        applied to the difference; ``DIFFERENCE`` (default) the exactly
        linearised difference ``poly(x + lost) - poly(lost)``.  They differ by
        a fraction of about ``c2 * lost`` (0.1-1 % for bright pixels).

    Raises
    ------
    IoiError
        exit code 23 (or 29, see :func:`check_calibration_shape`) when the
        coefficient planes do not match ``counts``; the message names both.
    """
    x = np.asarray(counts, dtype=np.float64)
    factor = linearity_factor(x, coefficients=coefficients, lost=lost, form=form)
    return (x * factor).astype(np.float32), factor.astype(np.float32)
