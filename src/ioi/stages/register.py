"""Registration of dither frames onto the first one (SPEC 2.7).

Sources are detected with sep (windowed centroids), matched to the
reference frame's by asterism (triangle-invariant) matching with astroalign,
then every star is re-matched by nearest neighbour under that first transform
and a SHIFT or RSCALE (similarity) transform is fitted by least squares with
iterative outlier rejection (SHIFT: the first transform is the translation
most pairs of bright stars vote for; asterisms where that is not clear).
Each frame is resampled onto the reference grid: a SHIFT separably, with a
fixed 1-D kernel per axis (the numbers of ``scipy.ndimage.shift``), RSCALE
with ``scipy.ndimage.affine_transform``.

Coordinates: ``(x, y)`` = (column, row), pixel centres at integers.  Arrays
are ``(ny, nx)``.  A :class:`Transform` maps REFERENCE-frame ``(x, y)`` to the
frame's ``(x, y)``: ``[x', y'] = matrix[:, :2] @ [x, y] + matrix[:, 2]``,
which is exactly the pull-back ``affine_transform`` needs.

Interpolation: science with a cubic spline (order 3, prefiltered) -- linear
interpolation broadens stars by ~5-10 % for a 3 px FWHM, the cubic keeps the
stack within 1.05x the single-frame FWHM (see tests); variance and the bad
mask with linear interpolation (non-negative, no ringing at 0/100 edges);
quality bits by nearest neighbour.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from ioi._memory import Scratch
from ioi._parallel import thread_map
from ioi._sideproc import direct_call
from ioi.errors import ConfigError, ExitCode, IoiError, StageError
from ioi.frame import DQ, QUALITY_DTYPE, Frame, as_quality, flagged
from ioi.stages.sky import box_means_at, fill_nan_box_mean

log = logging.getLogger(__name__)

GEOMETRIES = ("SHIFT", "RSCALE")
REGISTRATION_ALGORITHMS = ("SCIPY", "IRAF")

#: Radius (px) for re-matching all stars once a first transform is known.
_MATCH_RADIUS = 2.0


class RegistrationError(IoiError):
    """Registration failed (too few sources or matches).  Non-fatal for the pipeline:
    the caller warns, writes the L1 products and skips stacking."""

    default_code = ExitCode.REGISTRATION_FAILED


@dataclasses.dataclass(frozen=True, eq=False)
class Transform:
    """A fitted map from REFERENCE-frame (x, y) to this frame's (x, y).

    Attributes
    ----------
    matrix : ndarray, float64, (2, 3)
        ``[x', y'] = matrix[:, :2] @ [x, y] + matrix[:, 2]``.
    dx, dy : float
        The translation part (px).
    rotation_deg : float
        Rotation angle (degrees, counter-clockwise in (x, y)).
    scale : float
    n_matched : int
        Stars used in the final fit.
    rms_px : float
        Rms of the fit residuals (px, 2-d distance).
    """

    matrix: np.ndarray
    dx: float = 0.0
    dy: float = 0.0
    rotation_deg: float = 0.0
    scale: float = 1.0
    n_matched: int = 0
    rms_px: float = 0.0

    @classmethod
    def identity(cls) -> Transform:
        return cls(matrix=np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))

    def apply(self, xy) -> np.ndarray:
        """Map reference (x, y) positions, shape (n, 2), to this frame."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        return xy @ self.matrix[:, :2].T + self.matrix[:, 2]


def _check_geometry(geometry: str) -> str:
    geo = str(geometry).strip().upper()
    if geo not in GEOMETRIES:
        raise ConfigError(f"fit_geometry = {geometry!r} is not one of {', '.join(GEOMETRIES)}",
                          exit_code=ExitCode.UNKNOWN_REGISTRATION_METHOD)
    return geo


def parse_bad_region(text):
    """Parse ``"y0:y1,x0:x1"`` (Python slice edges) into ``(slice(y0, y1), slice(x0, x1))``.

    Empty text, ``"0:0,0:0"`` or any region with no pixels gives None.
    Malformed text: ConfigError exit 8 naming it.
    """
    if text is None:
        return None
    s = str(text).split(";")[0].strip()
    if not s:
        return None
    m = re.fullmatch(r"\s*(-?\d+)\s*:\s*(-?\d+)\s*,\s*(-?\d+)\s*:\s*(-?\d+)\s*", s)
    if m is None:
        raise ConfigError(f"bad region {text!r} is not of the form y0:y1,x0:x1",
                          exit_code=ExitCode.CONFIG_KEY_MISSING)
    y0, y1, x0, x1 = (int(v) for v in m.groups())
    if y1 <= y0 or x1 <= x0:
        return None
    return slice(y0, y1), slice(x0, x1)


def _regions(bad_regions):
    out = []
    for reg in bad_regions or ():
        if isinstance(reg, str):
            reg = parse_bad_region(reg)
        if reg is not None:
            out.append(tuple(reg))
    return out


def detect_sources(image, *, bad_regions=(), mask=None, thresh: float = 5.0, minarea: int = 5,
                   sky_subtracted: bool = False, guesses=None, scratch=None, offload=direct_call):
    """Detect sources with sep and measure windowed centroids.

    Parameters
    ----------
    image : ndarray, (ny, nx)
        NaN pixels are excluded (sep mask).
    bad_regions : sequence of (slice, slice) or "y0:y1,x0:x1" strings
        Zeroed (and excluded from the background) for detection only.
    mask : ndarray of bool, (ny, nx), optional
        True = exclude.
    thresh : float
        Detection threshold in units of the global background rms.
    minarea : int
    sky_subtracted : bool
        The image's sky has been subtracted already: the residual background
        is estimated on a 2x2 subsample (4x cheaper, same registration
        accuracy).  False: on every pixel.
    guesses : structured array with ``x``, ``y``, ``a``, ``flux``, optional
        Sources already found in this frame (e.g. by the sky stage on 2x2 block
        means): sep's extraction is skipped and the windowed centroids start
        from these positions (the brightest ``_MAX_GUESSES``); a source is kept
        when its S/N in the centroid window reaches ``thresh``.
    scratch : ioi._memory.Scratch, optional
        Work arrays reused from call to call (the copy of the image, its bad
        pixels) instead of new ones.
    offload : callable, optional
        How the sep calls are run: ``offload(fn, *args, **kwargs)``
        (``ioi._sideproc.SideProcesses.call`` runs them in another process,
        which frees this one's threads: sep holds the GIL).  Default: here.

    Returns
    -------
    ndarray, structured, fields ``x``, ``y``, ``flux`` (float64), brightest first.
    """
    from ioi.stages import _sep  # deferred import (sep)

    image = np.asarray(image)
    if scratch is None:
        data = np.array(image, dtype=np.float32, order="C", copy=True)
        bad = np.empty(data.shape, dtype=bool)
    else:
        data = scratch.get("data", image.shape, np.float32)
        np.copyto(data, image, casting="unsafe")
        bad = scratch.get("bad", image.shape, bool)
    np.logical_not(np.isfinite(data, out=bad), out=bad)
    if mask is not None:
        bad |= np.asarray(mask, dtype=bool)
    for ys, xs in _regions(bad_regions):
        bad[ys, xs] = True
    np.copyto(data, np.float32(0.0), where=bad)
    if bad.all():
        return np.zeros(0, dtype=_sep.MEASURED_DTYPE)
    objs = _usable_guesses(guesses, bad) if guesses is not None else None
    return offload(_sep.measure, data, bad, thresh=thresh, minarea=minarea, sky_subtracted=sky_subtracted,
                   guesses=objs)


_MAX_GUESSES = 200  # brightest starting positions kept: matching uses 50; measured on a simulated
# 9-dither multrun, 400 -> 200 guesses: shift error vs truth 0.0032 -> 0.0043 px rms (negligible
# against the 5.2 px FWHM); sep, which holds the GIL, 0.20 -> 0.14 s of CPU a frame


def _usable_guesses(guesses, bad) -> np.ndarray:
    """Starting positions inside the frame and on a usable pixel, brightest first, with
    the fields flux_radius and winpos need (``flux`` to be measured in the frame)."""
    g = np.asarray(guesses)
    ny, nx = bad.shape
    ix, iy = np.rint(g["x"]).astype(int), np.rint(g["y"]).astype(int)
    inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    keep = np.flatnonzero(inside)
    keep = keep[~bad[iy[keep], ix[keep]]]
    keep = keep[np.argsort(-g["flux"][keep], kind="stable")][:_MAX_GUESSES]
    objs = np.zeros(keep.size, dtype=[("x", "f8"), ("y", "f8"), ("a", "f8"), ("flux", "f8")])
    for name in ("x", "y", "a"):
        objs[name] = g[name][keep]
    objs["a"] = np.clip(objs["a"], 0.5, None)
    return objs


def _as_xy(src) -> np.ndarray:
    if getattr(src, "dtype", None) is not None and src.dtype.names:
        return np.column_stack([src["x"], src["y"]]).astype(np.float64)
    return np.asarray(src, dtype=np.float64).reshape(-1, 2)


def _mutual_nearest(pred: np.ndarray, xy: np.ndarray, radius: float):
    """Index pairs (i into pred, j into xy) that are each other's nearest within radius."""
    if len(pred) == 0 or len(xy) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    d1, j = cKDTree(xy).query(pred, distance_upper_bound=radius)
    _, i_back = cKDTree(pred).query(xy, distance_upper_bound=radius)
    i = np.arange(len(pred))
    ok = np.isfinite(d1)
    ok[ok] &= i_back[j[ok]] == i[ok]
    return i[ok], j[ok]


#: Brightest sources of each list that vote for a translation (astroalign also uses 50).
_VOTE_SOURCES = 50


def _vote_translation(ref_xy: np.ndarray, xy: np.ndarray, radius: float):
    """The translation (dx, dy) that most pairs of bright sources agree on, or None.

    Every pair (reference star, frame star) among the brightest votes for its
    offset; the true shift collects one vote per star the lists share, chance
    pairs scatter over thousands of pixels.  A first guess for a SHIFT fit in
    a few ms, where astroalign's triangles cost ~60 ms of pure Python.  None
    (the caller falls back to astroalign) unless the winner has 3 votes or more
    and at least twice those of any other offset (fixed-pattern artefacts vote
    for (0, 0); a rotated frame spreads the votes).
    """
    a, b = ref_xy[:_VOTE_SOURCES], xy[:_VOTE_SOURCES]
    d = (b[None, :, :] - a[:, None, :]).reshape(-1, 2)
    counts = cKDTree(d).query_ball_point(d, radius, return_length=True)
    k = int(np.argmax(counts))
    dist = np.hypot(*(d - d[k]).T)
    rival = counts[dist > 2.0 * radius]
    if counts[k] < 3 or (rival.size and 2 * rival.max() > counts[k]):
        return None
    return np.median(d[dist <= radius], axis=0)


def match_sources(ref_xy, xy, *, geometry: str = "SHIFT", radius: float = _MATCH_RADIUS):
    """Match two source lists by asterism, then every star by nearest neighbour.

    SHIFT: the first guess is the translation most bright pairs vote for
    (:func:`_vote_translation`), asterisms only where the vote is not clear.

    Parameters
    ----------
    ref_xy, xy : (n, 2) arrays or structured arrays with ``x``, ``y``
        Reference and frame positions, brightest first (astroalign uses the first 50).
    geometry : {"SHIFT", "RSCALE"}
        The refined transform used for the final nearest-neighbour match.

    Returns
    -------
    ref_idx, idx : int arrays of matched pairs.

    Raises RegistrationError (18) when the asterisms cannot be matched.
    """
    geo = _check_geometry(geometry)
    ref_xy, xy = _as_xy(ref_xy), _as_xy(xy)
    if len(ref_xy) < 3 or len(xy) < 3:
        raise RegistrationError(
            f"too few sources to match: {len(ref_xy)} in the reference, {len(xy)} in the frame")
    shift = _vote_translation(ref_xy, xy, radius) if geo == "SHIFT" else None
    if shift is not None:
        matrix = np.array([[1.0, 0.0, shift[0]], [0.0, 1.0, shift[1]]])
    else:
        import astroalign as aa  # deferred import

        try:
            first, _ = aa.find_transform(ref_xy, xy)
        except (aa.MaxIterError, ValueError) as exc:
            raise RegistrationError(f"no asterism match between the frame and the reference: {exc}") from None
        matrix = np.asarray(first.params, dtype=np.float64)[:2]
    for _ in range(2):  # match, refit with the requested geometry, match again
        ri, i = _mutual_nearest(ref_xy @ matrix[:, :2].T + matrix[:, 2], xy, radius)
        if len(ri) < 2:
            break
        matrix = fit_transform(ref_xy[ri], xy[i], geometry=geo).matrix
    ri, i = _mutual_nearest(ref_xy @ matrix[:, :2].T + matrix[:, 2], xy, radius)
    return ri, i


def _solve(ref: np.ndarray, xy: np.ndarray, geo: str, w: np.ndarray) -> np.ndarray:
    """Weighted least squares (weights ``w`` per star, 1/variance of a coordinate)."""
    if geo == "SHIFT":
        t = np.average(xy - ref, axis=0, weights=w)
        return np.array([[1.0, 0.0, t[0]], [0.0, 1.0, t[1]]])
    # Similarity: x' = a x - b y + tx, y' = b x + a y + ty (linear in a, b, tx, ty).
    n = len(ref)
    A = np.zeros((2 * n, 4))
    A[0::2] = np.column_stack([ref[:, 0], -ref[:, 1], np.ones(n), np.zeros(n)])
    A[1::2] = np.column_stack([ref[:, 1], ref[:, 0], np.zeros(n), np.ones(n)])
    sw = np.repeat(np.sqrt(w), 2)
    (a, b, tx, ty), *_ = np.linalg.lstsq(A * sw[:, None], xy.reshape(-1) * sw, rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def fit_transform(ref_xy, xy, *, geometry: str = "SHIFT", clip_sigma: float = 3.0,
                  max_iterations: int = 10, errors=None) -> Transform:
    """Least-squares SHIFT or RSCALE transform from matched positions, with outlier rejection.

    Parameters
    ----------
    ref_xy, xy : (n, 2)
        Matched positions in the reference and in the frame.
    geometry : {"SHIFT", "RSCALE"}
        Translation only, or similarity (shift, rotation, scale).
    clip_sigma : float
        Stars whose (error-normalised) residual exceeds ``clip_sigma`` x the rms
        are dropped, and the fit repeated until nothing changes.
    errors : (n,) array, optional
        Expected position error of each pair (px, both positions together);
        the fit weights stars by 1/error^2, so bright stars with precise
        centroids dominate.  None: equal weights.
    """
    geo = _check_geometry(geometry)
    ref, pos = _as_xy(ref_xy), _as_xy(xy)
    need = 1 if geo == "SHIFT" else 2
    if len(ref) < need:
        raise RegistrationError(f"{geo} fit needs at least {need} matched stars, got {len(ref)}")
    err = np.ones(len(ref)) if errors is None else np.maximum(np.asarray(errors, dtype=np.float64), 1e-6)
    w = 1.0 / err**2
    keep = np.ones(len(ref), dtype=bool)
    for _ in range(max_iterations):
        m = _solve(ref[keep], pos[keep], geo, w[keep])
        r = np.hypot(*(ref @ m[:, :2].T + m[:, 2] - pos).T) / err
        rms = math.sqrt(float(np.mean(r[keep] ** 2)))
        new = r <= max(clip_sigma * rms, 1e-6)
        if new.sum() < need or np.array_equal(new, keep):
            break
        keep = new
    m = _solve(ref[keep], pos[keep], geo, w[keep])
    r = np.hypot(*(ref[keep] @ m[:, :2].T + m[:, 2] - pos[keep]).T)
    return Transform(matrix=m, dx=float(m[0, 2]), dy=float(m[1, 2]),
                     rotation_deg=math.degrees(math.atan2(m[1, 0], m[0, 0])),
                     scale=math.hypot(m[0, 0], m[1, 0]), n_matched=int(keep.sum()),
                     rms_px=math.sqrt(float(np.mean(r**2))))


def _pullback(transform: Transform):
    """(matrix, offset) for ndimage.affine_transform in (row, col) order."""
    m = np.asarray(transform.matrix, dtype=np.float64)
    return m[::-1, :2][:, ::-1], m[::-1, 2]


_CUBIC_POLE = math.sqrt(3.0) - 2.0  # the cubic B-spline prefilter's pole, z = -0.268

#: Half-width (px) of the cubic interpolation kernel kept: its weights fall off as
#: ``|z|^k`` (``|z|^14 = 1e-8``), below float32's resolution of the values they weigh.
_CUBIC_RADIUS = 14
#: Edge padding of the frame a cubic shift reads (the kernel's reach, plus the rounding
#: of the shift and one more), by edge replication as ``ndimage.shift(mode="nearest")``.
_CUBIC_PAD = _CUBIC_RADIUS + 2
_X_BLOCK = 64  # output columns of one windowed product along x


def _cubic_kernel(d: float):
    """The cubic B-spline interpolation of a signal at ``i + d`` as one fixed kernel over the
    signal itself: ``(first, g)`` with ``out[i] = sum_k g[k] * s[i + first + k]`` (float64,
    ``2 * _CUBIC_RADIUS + 2`` weights).

    ndimage prefilters the signal (the recursive filter whose impulse response is
    ``h_l = -6 z / (1 - z^2) z^|l|``) and then applies the 4 B-spline taps of
    :func:`_axis_taps`; for a constant shift the two make one convolution, here
    its weights ``g = taps * h`` truncated at :data:`_CUBIC_RADIUS` px on each side
    of the sample.  Written out because applying it as a banded matrix product
    (BLAS, below) costs a fifth of the prefilter and taps done separately.
    """
    f0 = math.floor(d)
    first, taps = _axis_taps(d, 3)  # taps at f0 - 1 .. f0 + 2
    offsets = np.arange(-_CUBIC_RADIUS, _CUBIC_RADIUS + 2)  # signal samples f0 + offset
    z = _CUBIC_POLE
    g = np.zeros(offsets.size)
    for k, w in enumerate(taps):
        g += w * (-6.0 * z / (1.0 - z * z)) * z ** np.abs(offsets - (first - f0 + k))
    return f0 - _CUBIC_RADIUS, g / g.sum()  # the truncated tails (2e-9): a constant stays constant


def _band_matrix(g: np.ndarray, n: int) -> np.ndarray:
    """``(n, n + len(g) - 1)`` float32 with ``g`` along each row from the diagonal on:
    ``(M @ s)[r] = sum_k g[k] s[r + k]``."""
    m = np.zeros((n, n + g.size - 1), dtype=np.float32)
    for k, w in enumerate(g):
        m[np.arange(n), np.arange(n) + k] = w
    return m


def _axis_taps(d: float, order: int):
    """Interpolation along one axis at input coordinate ``i + d`` for output index ``i``.

    Returns ``(first, weights)``: ``out[i] = sum_k weights[k] * coef[i + first + k]``,
    the same weights for every ``i`` because the shift ``d`` is constant.  Order 0:
    nearest (a tie rounds up, as ndimage does); 1: linear; 3: the cubic B-spline
    basis at distances ``1 + t, t, 1 - t, 2 - t`` (``t`` the fractional part),
    applied to prefiltered coefficients -- ndimage's order-3 interpolation written
    out, since no library applies a constant 1-D kernel with slicing only.
    """
    if order == 0:
        return math.floor(d + 0.5), (1.0,)
    first = math.floor(d)
    t = d - first
    if order == 1:
        return first, (1.0 - t, t)
    return first - 1, ((1.0 - t) ** 3 / 6.0, (4.0 - 6.0 * t * t + 3.0 * t**3) / 6.0,
                       (1.0 + 3.0 * t + 3.0 * t * t - 3.0 * t**3) / 6.0, t**3 / 6.0)


def _apply_taps(a, axis: int, first: int, weights, n: int, out=None):
    """``out[i] = sum_k weights[k] * a[first + i + k]`` along ``axis`` (0 or 1), i < n; float32."""
    def take(k):
        s = slice(first + k, first + k + n)
        return a[s] if axis == 0 else a[:, s]

    if len(weights) == 1:  # nearest neighbour: a copy
        if out is None:
            return take(0).copy()
        out[...] = take(0)
        return out
    out = np.multiply(take(0), np.float32(weights[0]), out=out)
    tmp = np.empty_like(out)
    for k in range(1, len(weights)):
        out += np.multiply(take(k), np.float32(weights[k]), out=tmp)
    return out


_CHUNK_ROWS = 64  # output rows interpolated along x at a time (a chunk's planes stay in cache)


def _clamped(start: int, stop: int, n: int):
    """Indices ``start .. stop - 1`` clamped to ``[0, n - 1]`` (edge replication): a slice
    when no clamping is needed, else an index array."""
    if start >= 0 and stop <= n:
        return slice(start, stop)
    return np.clip(np.arange(start, stop), 0, n - 1)


def _bad_pixels(science, quality, out=None) -> np.ndarray:
    """NaN (or infinite) or DO_NOT_USE pixels, in row chunks (no frame-sized temporaries);
    ``out``: a bool plane to write into."""
    bad = flagged(quality, DQ.DO_NOT_USE, out=out)
    finite = np.empty((_CHUNK_ROWS, science.shape[1]), dtype=bool)
    for r in range(0, science.shape[0], _CHUNK_ROWS):
        n = min(_CHUNK_ROWS, science.shape[0] - r)
        np.logical_not(np.isfinite(science[r:r + n], out=finite[:n]), out=finite[:n])
        bad[r:r + n] |= finite[:n]
    return bad


def _work(scratch, name, shape, dtype) -> np.ndarray:
    """A work array: reused from ``scratch`` (an :class:`ioi._memory.Scratch`) when given, else new."""
    return np.empty(shape, dtype=dtype) if scratch is None else scratch.get(name, shape, dtype)


def _filled_padded(science, bad, pad: int, scratch=None) -> np.ndarray:
    """``science`` edge-padded by ``pad`` pixels, its ``bad`` pixels first replaced by the mean
    of the good pixels in the ``_FILL_BOX`` square around them (clipped at the edges), 0 where
    there are none: what :func:`_fill_bad` then ``np.pad(mode="edge")`` give, in one copy."""
    ny, nx = science.shape
    p = _work(scratch, "padded", (ny + 2 * pad, nx + 2 * pad), np.float32)
    inner = p[pad:pad + ny, pad:pad + nx]
    inner[...] = science
    flat = np.flatnonzero(bad)
    if flat.size:
        # a NaN border clips the boxes at the edges; the bad pixels themselves count as missing
        p[:pad], p[-pad:], p[:, :pad], p[:, -pad:] = np.nan, np.nan, np.nan, np.nan
        width = nx + 2 * pad
        where = flat + (flat // nx) * (2 * pad) + (pad * width + pad)
        p.reshape(-1)[where] = np.nan
        means, _ = box_means_at(p, where, _FILL_BOX)  # 0 where a box has no good pixel
        p.reshape(-1)[where] = means
    p[:pad, pad:pad + nx] = inner[0]
    p[pad + ny:, pad:pad + nx] = inner[-1]
    p[:, :pad] = p[:, pad:pad + 1]
    p[:, pad + nx:] = p[:, pad + nx - 1:pad + nx]
    return p


def _bad_weight_at(bad, rows: slice, cols: slice, shift, scratch=None):
    """The bad indicator (bad = 100, good = 0) linearly interpolated at ``(i + dy, j + dx)``,
    evaluated only where it is not 0: ``(flat output indices, values float32)``.

    Bad pixels are a few per cent; an output pixel is touched by the 2 x 2 input
    pixels around its sampled centre, so the candidates are found with four
    shifted boolean slices and only those are interpolated (same float32
    arithmetic, y then x, as interpolating the whole 0/100 plane).
    """
    ny, nx = bad.shape
    (fy, (wy0, wy1)), (fx, (wx0, wx1)) = _axis_taps(shift[0], 1), _axis_taps(shift[1], 1)
    r0, c0 = rows.start + fy, cols.start + fx  # input corner of output (rows.start, cols.start)
    nr, nc = rows.stop - rows.start, cols.stop - cols.start
    b = _work(scratch, "bad_padded", (ny + 2, nx + 2), bool)  # edge replication covers the clamped
    b[1:-1, 1:-1] = bad                                       # taps (-1 and n)
    b[0, 1:-1], b[-1, 1:-1] = bad[0], bad[-1]
    b[:, 0], b[:, -1] = b[:, 1], b[:, -2]
    near = _work(scratch, "near", (nr, nc), bool)
    np.copyto(near, b[r0 + 1:r0 + 1 + nr, c0 + 1:c0 + 1 + nc])
    for dy, dx in ((0, 1), (1, 0), (1, 1)):
        near |= b[r0 + 1 + dy:r0 + 1 + dy + nr, c0 + 1 + dx:c0 + 1 + dx + nc]
    local = np.flatnonzero(near)
    if local.size == 0:
        return local, np.zeros(0, dtype=np.float32)
    i, j = np.divmod(local, nc)
    base = (i + r0 + 1) * (nx + 2) + (j + c0 + 1)  # flat index of the top-left tap in b
    flat = b.reshape(-1)
    hundred = np.float32(100.0)

    def tap(offset):  # 0 or 100 (a product, not np.where, which branches on every pixel)
        return np.multiply(flat.take(base + offset), hundred, dtype=np.float32)

    w = [np.float32(x) for x in (wy0, wy1, wx0, wx1)]
    left = tap(0) * w[0] + tap(nx + 2) * w[1]  # along y first, as the full-plane warp does
    right = tap(1) * w[0] + tap(nx + 3) * w[1]
    values = left * w[2] + right * w[3]
    keep = values > 0
    return ((i + rows.start) * nx + (j + cols.start))[keep], values[keep]


def _output_planes(shape, out):
    """(science float32, variance float32, quality uint16) planes of ``shape`` to resample into:
    ``out`` when given (checked), else new arrays."""
    if out is None:
        return (np.empty(shape, dtype=np.float32), np.empty(shape, dtype=np.float32),
                np.empty(shape, dtype=QUALITY_DTYPE))
    planes = tuple(out)
    want = (np.float32, np.float32, QUALITY_DTYPE)
    if len(planes) != 3 or any(not isinstance(p, np.ndarray) or p.shape != tuple(shape) or p.dtype != d
                               or not p.flags.c_contiguous or not p.flags.writeable
                               for p, d in zip(planes, want)):
        raise ValueError(f"out must be writeable C-contiguous float32, float32, uint16 planes of shape {shape}")
    return planes


def _resample_shift(frame: Frame, shift, order: int, bad_threshold: float, out=None, scratch=None,
                    threads: int = 1):
    """A pure shift, separably: every output pixel ``(i, j)`` samples the input at
    ``(i + dy, j + dx)``, so each axis is one fixed 1-D kernel applied by slicing.

    Same values as ``ndimage.shift(-shift, order, mode="nearest")`` of each plane
    up to float32 rounding, several times faster, nearly all of it with the GIL
    released.  Order 3 (the science): the prefilter and the taps along each axis
    are one kernel (:func:`_cubic_kernel`), applied to the edge-padded frame as
    banded matrix products -- along y a row chunk at a time, along x to windows of
    :data:`_X_BLOCK` output columns -- which BLAS does at a fraction of the cost of
    the recursive prefilters.  Only the overlap (the output rectangle whose
    centres fall in ``[-0.5, n - 0.5]``) is interpolated, in row chunks; the
    bad-pixel weight only near bad pixels.  Returns (science, variance, quality): new
    planes, or ``out``'s.  ``threads`` > 1: the row chunks shared among that
    many threads (each chunk is computed as with one, so the result is the same
    to the bit).
    """
    science_in = np.asarray(frame.science, dtype=np.float32)
    quality_in = as_quality(frame.quality)
    variance_in = np.asarray(frame.variance, dtype=np.float32)
    ny, nx = science_in.shape
    rows, cols = _overlap(shift[0], ny), _overlap(shift[1], nx)
    science, variance, quality = _output_planes((ny, nx), out)
    no_overlap = QUALITY_DTYPE.type(DQ.NO_OVERLAP | DQ.DO_NOT_USE)
    for plane, fill in ((science, np.nan), (variance, np.nan), (quality, no_overlap)):
        plane[:rows.start], plane[rows.stop:] = fill, fill
        plane[:, :cols.start], plane[:, cols.stop:] = fill, fill
    if rows.stop == rows.start or cols.stop == cols.start:
        return science, variance, quality
    nc = cols.stop - cols.start

    bad = _bad_pixels(science_in, quality_in, out=_work(scratch, "bad", (ny, nx), bool))
    pad = _CUBIC_PAD if order == 3 else _FILL_BOX // 2  # the fill's boxes need a border too
    p = _filled_padded(science_in, bad, pad, scratch)  # finite everywhere: a product sums every entry
    threads = max(1, int(threads))
    if order == 3:
        fy, gy = _cubic_kernel(shift[0])
        fx, gx = _cubic_kernel(shift[1])
        band_y = _band_matrix(gy, min(_CHUNK_ROWS, rows.stop - rows.start))
        # column block -> its window of the y-interpolated rows (x_reach wide, a stride
        # of _X_BLOCK apart): (window, block) weights, the same for every block
        x_reach = _X_BLOCK + gx.size - 1
        band_x = np.ascontiguousarray(_band_matrix(gx, _X_BLOCK).T)
        nblocks = -(-nc // _X_BLOCK)
        x_first = cols.start + fx + pad  # column of p the first window starts at
        x_width = (nblocks - 1) * _X_BLOCK + x_reach  # columns the windows span
        x_avail = min(x_width, p.shape[1] - x_first)  # the rest (beyond every kept weight): 0
    else:
        fy, wy = _axis_taps(shift[0], order)
        fx, wx = _axis_taps(shift[1], order)
    # variance: linear, bad pixels 0 (their weight is divided out below)
    (vfy, vwy), (vfx, vwx) = _axis_taps(shift[0], 1), _axis_taps(shift[1], 1)
    qfy, _ = _axis_taps(shift[0], 0)
    qfx, _ = _axis_taps(shift[1], 0)
    qcols = _clamped(cols.start + qfx, cols.stop + qfx, nx)
    keep_bits = ~QUALITY_DTYPE.type(DQ.DO_NOT_USE | DQ.MASKED)

    def chunk(a):
        b = min(a + _CHUNK_ROWS, rows.stop)
        out = slice(a, b)
        if order == 3:
            n = b - a
            t = np.empty((n, x_width), dtype=np.float32)
            t[:, x_avail:] = 0.0
            window_rows = slice(a + fy + pad, b + fy + pad + gy.size - 1)
            np.matmul(band_y[:n, :n + gy.size - 1], p[window_rows, x_first:x_first + x_avail], out=t[:, :x_avail])
            windows = np.lib.stride_tricks.as_strided(t, shape=(n, nblocks, x_reach),
                                                      strides=(t.strides[0], _X_BLOCK * t.itemsize, t.itemsize),
                                                      writeable=False)
            science[out, cols] = np.matmul(windows, band_x).reshape(n, nblocks * _X_BLOCK)[:, :nc]
        else:
            t = _apply_taps(p, 0, a + fy + pad, wy, b - a)
            _apply_taps(t, 1, cols.start + fx + pad, wx, nc, out=science[out, cols])
        # variance rows a + vfy .. b + vfy (two taps), edge-padded by one column
        src = _clamped(a + vfy, b + vfy + 1, ny)
        v = np.empty((b - a + 1, nx + 2), dtype=np.float32)
        v[:, 1:-1] = variance_in[src]
        np.copyto(v[:, 1:-1], np.float32(0.0), where=bad[src] | ~np.isfinite(v[:, 1:-1]))
        v[:, 0], v[:, -1] = v[:, 1], v[:, -2]
        vt = _apply_taps(v, 0, 0, vwy, b - a)
        _apply_taps(vt, 1, cols.start + vfx + 1, vwx, nc, out=variance[out, cols])
        q = quality_in[_clamped(a + qfy, b + qfy, ny)]
        np.bitwise_and(q[:, qcols], keep_bits, out=quality[out, cols])

    thread_map(chunk, range(rows.start, rows.stop, _CHUNK_ROWS), workers=threads)
    del p
    idx, weight = _bad_weight_at(bad, rows, cols, shift, scratch)
    del bad
    _mask_bad(science, variance, quality, idx, weight, bad_threshold)
    return science, variance, quality


def _overlap(d: float, n: int) -> slice:
    """Output indices ``i`` whose sampled centre ``i + d`` lies in ``[-0.5, n - 0.5]``."""
    lo = max(0, math.ceil(-0.5 - d))
    hi = min(n, math.floor(n - 0.5 - d) + 1)
    return slice(lo, max(lo, hi))


def _mask_bad(science, variance, quality, idx, badmask, bad_threshold: float) -> None:
    """In place: at flat indices ``idx`` (where the resampled bad mask ``badmask`` is
    above 0) divide the variance by the good-pixel weight ``1 - badmask / 100``,
    and where the bad mask exceeds the threshold set NaN and DO_NOT_USE|MASKED.

    The three planes (ny, nx), C-contiguous.  Only the pixels a bad input pixel
    reaches (a few per cent) are touched: cheaper than full-frame passes.
    """
    w1 = 1.0 - badmask / np.float32(100.0)  # linear interpolation of the good-pixel weight
    var = variance.reshape(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        var[idx] = var.take(idx) / w1
    idx = idx[(badmask > bad_threshold) | ~(w1 > 1e-6)]
    science.reshape(-1)[idx] = np.nan
    var[idx] = np.nan
    q = quality.reshape(-1)
    q[idx] = q.take(idx) | QUALITY_DTYPE.type(DQ.DO_NOT_USE | DQ.MASKED)


_FILL_BOX = 5  # px: bad pixels take the mean of the good ones in this box before interpolation


def _fill_bad(science, bad):
    """A new float32 ``science`` with each bad pixel replaced by the mean of the good
    pixels in the ``_FILL_BOX`` square around it (clipped at the edges), 0 where
    there are none: one pass of ``ioi.stages.sky.fill_nan_box_mean``."""
    out = fill_nan_box_mean(np.where(bad, np.float32(np.nan), science), box=_FILL_BOX, max_passes=1, copy=False)
    np.copyto(out, np.float32(0.0), where=~np.isfinite(out))
    return out


def resample_frame(frame: Frame, transform: Transform, *, bad_threshold: float = 20.0,
                   order: int = 3, out=None, scratch=None, threads: int = 1) -> Frame:
    """Resample a frame onto the reference grid (same shape).

    Parameters
    ----------
    frame : Frame
        science/variance/quality (ny, nx).
    transform : Transform
        Maps reference (x, y) to this frame's (x, y).
    bad_threshold : float
        Percentage: output pixels where the resampled bad mask (bad = 100,
        good = 0) exceeds it become NaN with DQ DO_NOT_USE|MASKED.
    order : int
        Spline order for the science (3: cubic, the default; 1: linear).
    out : (science, variance, quality) arrays, optional
        Writeable C-contiguous float32, float32 and uint16 planes of the
        frame's shape to resample into (e.g. reused from an earlier frame),
        instead of new arrays.  They must not be the input's own.
    scratch : ioi._memory.Scratch, optional
        Work arrays to reuse from call to call (one per thread), instead of
        new ones (a pure shift's padded copy and bad-pixel planes).
    threads : int
        Threads for one pure shift (e.g. the last frame of a multrun, when
        nothing else is left to run beside it); same result.

    Returns
    -------
    Frame
        New frame (its planes ``out``'s when given).  Bad (NaN or DO_NOT_USE) input pixels are filled with the
        mean of their good neighbours before the science is interpolated;
        output pixels where the linearly resampled bad mask exceeds
        ``bad_threshold`` are NaN; pixels whose centre maps outside the input
        get NaN and DQ NO_OVERLAP|DO_NOT_USE.

    A pure translation (SHIFT) is resampled separably with fixed 1-D kernels
    (the same numbers as ``ndimage.shift``, several times faster); rotation or
    scale with ``ndimage.affine_transform``.  Thread-safe; numpy and
    scipy.ndimage release the GIL for most of the work.
    """
    ny, nx = frame.shape
    mat, off = _pullback(transform)
    shift_only = bool(np.allclose(mat, np.eye(2), rtol=0, atol=1e-12))
    if shift_only and order in (0, 1, 3):
        science, variance, quality = _resample_shift(frame, off, order, bad_threshold, out, scratch, threads)
        return frame.replace(science=science, variance=variance, quality=quality, header=frame.header.copy())

    planes = _output_planes((ny, nx), out)

    def warp(a, k, into=None):
        into = np.empty((ny, nx), dtype=a.dtype) if into is None else into
        if shift_only:  # ndimage.shift is ~1.4x faster than affine_transform
            ndimage.shift(a, -off, order=k, mode="nearest", prefilter=k > 1, output=into)
        else:
            ndimage.affine_transform(a, mat, offset=off, output_shape=(ny, nx), order=k,
                                     mode="nearest", prefilter=k > 1, output=into)
        return into

    # One plane at a time, each input temporary released once warped.
    science_in = np.asarray(frame.science, dtype=np.float32)
    quality_in = as_quality(frame.quality)
    bad = _bad_pixels(science_in, quality_in)
    if bad.any():
        # Bad pixels take the mean of their good neighbours before the spline
        # sees them (one cubic warp instead of two with a weight plane); the
        # output pixels they influence beyond bad_threshold are NaN anyway.
        science_in = _fill_bad(science_in, bad)
    science = warp(science_in, order, planes[0])
    del science_in
    badmask = warp(np.where(bad, np.float32(100.0), np.float32(0.0)), 1)
    variance_in = np.asarray(frame.variance, dtype=np.float32)
    variance = warp(np.where(bad | ~np.isfinite(variance_in), np.float32(0.0), variance_in), 1, planes[1])
    del bad
    no_overlap = QUALITY_DTYPE.type(DQ.NO_OVERLAP | DQ.DO_NOT_USE)
    quality = warp(quality_in, 0, planes[2])
    quality &= ~QUALITY_DTYPE.type(DQ.DO_NOT_USE | DQ.MASKED)
    idx = np.flatnonzero(badmask > 0)
    _mask_bad(science, variance, quality, idx, badmask.reshape(-1).take(idx), bad_threshold)
    # Where each output pixel centre lands in the input (broadcast, no full grids).
    xx = np.arange(nx, dtype=np.float64)[None, :]
    yy = np.arange(ny, dtype=np.float64)[:, None]
    m = transform.matrix
    xin = m[0, 0] * xx + m[0, 1] * yy + m[0, 2]
    yin = m[1, 0] * xx + m[1, 1] * yy + m[1, 2]
    outside = (xin < -0.5) | (xin > nx - 0.5) | (yin < -0.5) | (yin > ny - 0.5)
    science[outside] = np.nan
    variance[outside] = np.nan
    quality[outside] = no_overlap
    return frame.replace(science=science, variance=variance, quality=quality, header=frame.header.copy())


def _reg_header(hdr, geo, t: Transform, order, bad_threshold):
    hdr = hdr.copy()
    hdr["L1REG"] = (1, "registered to the first dither (1 = yes)")
    hdr["REGGEOM"] = (geo, "registration fit geometry")
    hdr["REGALG"] = ("SCIPY", "resampling: scipy.ndimage B-spline")
    hdr["REGORDER"] = (int(order), "spline order used for the science")
    hdr["REGDX"] = (round(t.dx, 4), "[px] x shift, reference -> this frame")
    hdr["REGDY"] = (round(t.dy, 4), "[px] y shift, reference -> this frame")
    hdr["REGROT"] = (round(t.rotation_deg, 5), "[deg] rotation, reference -> this frame")
    hdr["REGSCALE"] = (round(t.scale, 6), "scale, reference -> this frame")
    hdr["REGNMAT"] = (int(t.n_matched), "stars used in the fit")
    hdr["REGRMS"] = (round(t.rms_px, 4), "[px] rms residual of the fit")
    hdr["REGBADTH"] = (float(bad_threshold), "[%] resampled bad-mask threshold")
    return hdr


def _check_frames(frames) -> tuple:
    frames = list(frames)
    if not frames:
        raise StageError("registration needs at least one frame")
    shape = frames[0].shape
    for k, f in enumerate(frames):
        if f.shape != shape:
            raise StageError(f"registration: frame {k} has shape {f.shape}, frame 0 has {shape}",
                             exit_code=ExitCode.DATA_SHAPE_MISMATCH)
    return frames


def find_transforms(frames, *, geometry: str = "SHIFT", algorithm: str = "SCIPY", bad_regions=(),
                    min_matches: int = 4, thresh: float = 5.0, minarea: int = 5,
                    sky_subtracted: bool = False) -> list:
    """The transform of every frame relative to the first (the reference).

    Sources are found with sep in each frame (``bad_regions`` zeroed for the
    detection only), matched to the reference by asterisms, and a SHIFT or
    RSCALE transform is fitted, weighted by each star's centroid error.

    Parameters
    ----------
    frames : list of Frame, each (ny, nx), same shape
    geometry : {"SHIFT", "RSCALE"}
    algorithm : {"SCIPY", "IRAF"}
        IRAF: exit 19 (not available); another value: exit 19 listing the allowed ones.
    bad_regions : sequence of (slice, slice) or "y0:y1,x0:x1"
    min_matches : int
        Fewer sources or matched stars than this: RegistrationError (exit 18).
    thresh, minarea, sky_subtracted
        Passed to :func:`detect_sources` (``sky_subtracted=True`` for frames whose
        sky has been subtracted: a cheaper background estimate).

    Returns
    -------
    list of Transform
        The first is the identity.
    """
    finder = TransformFinder(geometry=geometry, algorithm=algorithm, bad_regions=bad_regions,
                             min_matches=min_matches, thresh=thresh, minarea=minarea,
                             sky_subtracted=sky_subtracted)
    return [finder.add(f) for f in _check_frames(frames)]


class TransformFinder:
    """:func:`find_transforms` one frame at a time: :meth:`add` the frames in order
    (the first is the reference) and get each frame's transform at once, so that
    a caller can resample a frame while the next one is being measured.

    Parameters as for :func:`find_transforms`; ``offload``: how sep's calls run (see
    :func:`detect_sources`).  :meth:`add` raises :class:`RegistrationError`
    (exit 18) for a frame that cannot be registered.
    """

    def __init__(self, *, geometry: str = "SHIFT", algorithm: str = "SCIPY", bad_regions=(),
                 min_matches: int = 4, thresh: float = 5.0, minarea: int = 5, sky_subtracted: bool = False,
                 offload=direct_call):
        alg = str(algorithm).strip().upper()
        if alg == "IRAF":
            raise IoiError("registration_algorithm = IRAF: IRAF registration is not available; use SCIPY",
                           exit_code=ExitCode.UNKNOWN_REGISTRATION_METHOD)
        if alg not in REGISTRATION_ALGORITHMS:
            raise IoiError(f"registration_algorithm = {algorithm!r} is not one of "
                           f"{', '.join(REGISTRATION_ALGORITHMS)}",
                           exit_code=ExitCode.UNKNOWN_REGISTRATION_METHOD)
        self.geometry = _check_geometry(geometry)
        self.regions = _regions(bad_regions)
        self.min_matches = min_matches
        self.detection = dict(thresh=thresh, minarea=minarea, sky_subtracted=sky_subtracted)
        self.offload = offload
        self.count = 0
        self.shape = None
        self._ref_src = self._ref_xy = None
        self._scratch = Scratch()  # work arrays reused frame after frame (one thread adds)

    def sources(self, frame, guesses=None) -> np.ndarray:
        """The frame's sources (:func:`detect_sources`, its DO_NOT_USE pixels masked)."""
        m = flagged(frame.quality, DQ.DO_NOT_USE, out=self._scratch.get("mask", frame.shape, bool))
        return detect_sources(frame.science, bad_regions=self.regions, mask=m, guesses=guesses,
                              scratch=self._scratch, offload=self.offload, **self.detection)

    def add(self, frame, guesses=None) -> Transform:
        """The transform of ``frame`` relative to the first frame added (``guesses``:
        starting positions for the centroids, see :func:`detect_sources`)."""
        k = self.count
        if self.shape is None:
            self.shape = frame.shape
        elif frame.shape != self.shape:
            raise StageError(f"registration: frame {k} has shape {frame.shape}, frame 0 has {self.shape}",
                             exit_code=ExitCode.DATA_SHAPE_MISMATCH)
        src = self.sources(frame, guesses)
        xy = _as_xy(src)
        if k == 0:
            if len(xy) < self.min_matches:
                raise RegistrationError(f"reference frame: {len(xy)} sources found, "
                                        f"need at least {self.min_matches}")
            self._ref_src, self._ref_xy = src, xy
            self.count += 1
            return dataclasses.replace(Transform.identity(), n_matched=len(xy))
        if len(xy) < self.min_matches:
            raise RegistrationError(f"frame {k}: {len(xy)} sources found, need at least {self.min_matches}")
        try:
            ri, i = match_sources(self._ref_xy, xy, geometry=self.geometry)
        except RegistrationError as exc:
            raise RegistrationError(f"frame {k}: {exc}") from exc
        if len(ri) < self.min_matches:
            raise RegistrationError(f"frame {k}: {len(ri)} stars matched, need at least {self.min_matches}")
        t = fit_transform(self._ref_xy[ri], xy[i], geometry=self.geometry,
                          errors=np.hypot(self._ref_src["pos_err"][ri], src["pos_err"][i]))
        log.info("frame %d: dx=%.3f dy=%.3f rot=%.4f deg scale=%.5f n=%d rms=%.3f px",
                 k, t.dx, t.dy, t.rotation_deg, t.scale, t.n_matched, t.rms_px)
        self.count += 1
        return t


def registered_frame(frame: Frame, transform: Transform, *, reference: bool = False, geometry: str = "SHIFT",
                     bad_threshold: float = 20.0, order: int = 3, out=None, scratch=None,
                     threads: int = 1) -> Frame:
    """One frame on the reference grid with the registration keywords, as
    :func:`resample_frames` makes it (the reference itself is not resampled;
    ``out``, ``scratch``, ``threads``: planes to resample into, work arrays, threads,
    see :func:`resample_frame`)."""
    geo = _check_geometry(geometry)
    if not reference:
        frame = resample_frame(frame, transform, bad_threshold=bad_threshold, order=order, out=out,
                               scratch=scratch, threads=threads)
    return frame.replace(header=_reg_header(frame.header, geo, transform, order, bad_threshold))


def resample_frames(frames, transforms, *, geometry: str = "SHIFT", bad_threshold: float = 20.0,
                    order: int = 3, threads: int | None = None, release: bool = False) -> list:
    """Resample every frame onto the reference grid with its transform (see :func:`resample_frame`).

    The reference comes back unresampled, with the registration keywords.
    ``threads``: frames resampled at once (default: the machine's cores;
    scipy.ndimage's interpolation releases the GIL); the result does not
    depend on it.  ``release=True`` (``frames`` a list the caller gives up):
    each input frame is dropped from the list once resampled, so that input
    and output frames are not all held at once.
    """
    geo = _check_geometry(geometry)
    if len(transforms) != len(frames):
        raise StageError(f"resample_frames: {len(frames)} frames but {len(transforms)} transforms")
    _check_frames(frames)
    kw = dict(geometry=geo, bad_threshold=bad_threshold, order=order)
    out = [registered_frame(frames[0], transforms[0], reference=True, **kw)]

    def resample(k):
        res = registered_frame(frames[k], transforms[k], **kw)
        if release:
            frames[k] = None
        return res

    out.extend(thread_map(resample, range(1, len(frames)), workers=threads))
    if release:
        frames[0] = None
    return out


def register_frames(frames, *, geometry: str = "SHIFT", algorithm: str = "SCIPY",
                    bad_threshold: float = 20.0, bad_regions=(), min_matches: int = 4,
                    order: int = 3, thresh: float = 5.0, minarea: int = 5, threads: int | None = None,
                    sky_subtracted: bool = False):
    """Register frames onto the first (the reference) and resample them onto its grid:
    :func:`find_transforms` then :func:`resample_frames`.

    Returns
    -------
    (list of Frame, list of Transform)
        The reference comes back unresampled (identity transform).
    """
    frames = list(frames)
    transforms = find_transforms(frames, geometry=geometry, algorithm=algorithm, bad_regions=bad_regions,
                                 min_matches=min_matches, thresh=thresh, minarea=minarea,
                                 sky_subtracted=sky_subtracted)
    out = resample_frames(frames, transforms, geometry=geometry, bad_threshold=bad_threshold, order=order,
                          threads=threads)
    return out, transforms
