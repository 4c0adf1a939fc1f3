"""Sky subtraction from the dither frames themselves (SPEC 2.6).

For each dither frame ``i`` a sky is built from the other frames
(``peers_only``) or from all of them: every contributing frame ``j`` is
shifted to frame ``i``'s level by the mean of the iteratively sigma-clipped
difference ``i - j`` and the shifted frames are combined pixel by pixel with
the median, a Tukey biweight or a Huber M-estimator.  NaN sky pixels are
filled with a box mean, the sky is subtracted and its variance added.

*Beyond* the original (``mask_sources=True``, the default): sources found in
a first-pass sky-subtracted frame are masked (dilated) in the stack and every
sky is rebuilt without them, so that extended objects do not bias the sky.

Axis order: ``(ny, nx)`` for a frame, ``(nframes, ny, nx)`` for a stack.

Level offsets.  The clipped mean of ``i - j`` is computed for every pair on
the same random subsample of pixels, so ``offset[i, j] == -offset[j, i]``.
The per-frame levels ``L`` are the least-squares solution of
``L_i - L_j = offset[i, j]`` (``L_i = mean_j offset[i, j]``); frame ``j`` is
shifted by ``L_i - L_j``.  For three or more frames this differs from the
raw pair offset only by the (noise-level) non-additivity of the clipped means,
which is logged at DEBUG; it lets all ``n`` median skies come from one sort
of the level-normalised stack instead of ``n`` separate medians.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import warnings

import bottleneck as bn
import numpy as np
from scipy import ndimage

from ioi._parallel import thread_map
from ioi._sideproc import direct_call
from ioi.errors import ExitCode, IoiError, StageError, StageWarning
from ioi.frame import DQ, QUALITY_DTYPE, as_quality, flagged

log = logging.getLogger(__name__)

SKY_ALGORITHMS = ("MEDIAN", "TUKEY", "HUBER")

#: Tuning constants giving 95 % Gaussian efficiency (the textbook values).
_TUKEY_C = 4.685
_HUBER_C = 1.345
#: Variance of the estimator relative to the mean's, for Gaussian data.
_VARIANCE_FACTOR = {"MEDIAN": math.pi / 2, "TUKEY": 1 / 0.95, "HUBER": 1 / 0.95}
#: IRLS stops for a pixel when the update is below this fraction of the scale.
_IRLS_TOL = 1e-2  # 0.01 sigma: far below the estimate's own error (~0.4 sigma for 8 frames)
#: Pixels drawn for the level-offset clipping (FIELD_NOTES: a subsample suffices).
_N_SUBSAMPLE = 20000
_FIRST_PASS_BINNING = 2  # block size of the two-pass mode's first (source-finding) sky
_SPARSE_FILL_FRACTION = 0.05  # below this NaN fraction one fill pass gathers boxes per NaN pixel


@dataclasses.dataclass(frozen=True, eq=False)
class SkyResult:
    """What :func:`subtract_sky` returns.

    Attributes
    ----------
    frames : list of Frame
        The sky-subtracted frames, in input order.
    skies : list of ndarray, float32, (ny, nx)
        The sky subtracted from each frame (NaN where none could be made).
    offsets : ndarray, float64, (nframes, nframes)
        ``offsets[i, j]``: clipped mean of ``frame_i - frame_j`` (final pass).
    levels : ndarray, float64, (nframes,)
        Per-frame levels (least squares from ``offsets``, mean zero).
    unsolved_fraction : ndarray, float64, (nframes,)
        Fraction of pixels whose robust estimate did not converge (0 for MEDIAN,
        and for frames where the median fallback was used).
    source_masks : list of ndarray of bool, (ny, nx), or None
        The dilated source masks of the second pass (None without masking).
    notes : list of str
        Warnings and fallbacks, in words.
    """

    frames: list
    skies: list
    offsets: np.ndarray
    levels: np.ndarray
    unsolved_fraction: np.ndarray
    source_masks: list | None
    notes: list


# --------------------------------------------------------------------------- helpers


def _check_algorithm(algorithm: str) -> str:
    alg = str(algorithm).strip().upper()
    if alg not in SKY_ALGORITHMS:
        raise StageError(
            f"make_algorithm = {algorithm!r} is not one of {', '.join(SKY_ALGORITHMS)}",
            exit_code=ExitCode.UNKNOWN_SKY_ALGORITHM,
        )
    return alg


def _clip_stats(diff: np.ndarray, sigma: float, *, what: str) -> tuple[float, float]:
    """Mean and rms of the iteratively sigma-clipped 1-d ``diff`` (finite values only).

    Clipping is about the median (robust on the first pass) at ``sigma`` rms;
    it stops when no value changes state.  Raises exit 25 if nothing is left.
    The values kept, ``|d - centre| <= sigma * rms``, are always a run of the
    sorted values: sorted once, each iteration is a slice (its median the
    middle) and two binary searches, not a median and a mask over all the
    values (36 pairs of 40000 values: 0.35 -> 0.06 s of CPU).
    """
    d = np.asarray(diff, dtype=np.float64)
    d = np.sort(d[np.isfinite(d)])
    lo, hi = 0, d.size
    for _ in range(100):
        if hi <= lo:
            break
        kept = d[lo:hi]
        m = hi - lo
        centre = kept[m // 2] if m % 2 else (kept[m // 2 - 1] + kept[m // 2]) / 2
        limit = sigma * kept.std()
        # |d - centre| <= limit  <=>  -limit <= d - centre <= limit, and d - centre is sorted
        offset = d - centre
        span = int(np.searchsorted(offset, -limit, "left")), int(np.searchsorted(offset, limit, "right"))
        if span == (lo, hi):
            break
        lo, hi = span
    if hi <= lo:
        raise IoiError(
            f"sky level offset ({what}): sigma clipping at bg_sigma_clip = {sigma} "
            f"left no pixels ({d.size} finite differences)",
            exit_code=ExitCode.SKY_CLIP_EMPTY,
        )
    kept = d[lo:hi]
    return float(kept.mean()), float(kept.std())


def _subsample_index(shape, n: int, seed: int) -> np.ndarray:
    npix = int(np.prod(shape))
    if npix <= n:
        return np.arange(npix)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(npix, size=n, replace=False))


def level_offset(frame_i, frame_j, *, sigma: float, max_pixels: int = _N_SUBSAMPLE,
                 seed: int = 0) -> float:
    """Mean of the iteratively sigma-clipped difference ``frame_i - frame_j``.

    Parameters
    ----------
    frame_i, frame_j : ndarray (ny, nx) or Frame
        NaN pixels are ignored.
    sigma : float
        Clipping threshold in units of the difference's rms.
    max_pixels : int, keyword-only
        Clip a random subsample of this many pixels (seeded: reproducible).

    Raises
    ------
    IoiError
        Exit 25 when clipping leaves nothing (e.g. no common finite pixel).
    """
    a = np.asarray(getattr(frame_i, "science", frame_i))
    b = np.asarray(getattr(frame_j, "science", frame_j))
    if a.shape != b.shape:
        raise StageError(f"level_offset: shapes {a.shape} and {b.shape} differ",
                         exit_code=ExitCode.DATA_SHAPE_MISMATCH)
    idx = _subsample_index(a.shape, max_pixels, seed)
    diff = a.reshape(-1)[idx].astype(np.float64) - b.reshape(-1)[idx]
    # NaNs are dropped, never the tail of the (sorted, i.e. spatially ordered)
    # subsample: truncating it would keep only the top rows of the frame.
    diff = diff[np.isfinite(diff)]
    return _clip_stats(diff, sigma, what="one pair")[0]


def robust_combine(stack, *, algorithm: str = "MEDIAN", scale=None, max_iterations: int = 50):
    """Combine a stack pixel by pixel with the median, Tukey biweight or Huber estimator.

    Parameters
    ----------
    stack : ndarray, (nframes, ny, nx)
        Values to combine along axis 0; NaN values are ignored.
    algorithm : {"MEDIAN", "TUKEY", "HUBER"}
    scale : float
        Noise scale (sigma of one value) for TUKEY/HUBER; ignored for MEDIAN.
    max_iterations : int
        IRLS iterations allowed for a pixel to converge.

    Returns
    -------
    values : ndarray, float32, (ny, nx)
        NaN where no finite value exists.  Non-converged pixels keep their last
        iterate (the caller decides what to do with them).
    converged : ndarray of bool, (ny, nx)
        False where the M-estimator did not converge in ``max_iterations``.

    All pixels are iterated at once (iteratively re-weighted least squares with
    array weights) starting from the median; each iteration only touches the
    pixels not yet converged.
    """
    alg = _check_algorithm(algorithm)
    stack = np.asarray(stack)
    if stack.ndim != 3:
        raise StageError(f"robust_combine: stack must be (nframes, ny, nx), got {stack.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices -> NaN, as wanted
        med = bn.nanmedian(stack, axis=0)
    converged = np.ones(stack.shape[1:], dtype=bool)
    if alg == "MEDIAN":
        return med.astype(np.float32), converged
    if scale is None or not np.isfinite(scale) or scale <= 0:
        raise StageError(f"robust_combine: {alg} needs a positive finite scale, got {scale!r}")
    n = stack.shape[0]
    mu = med.reshape(-1).astype(np.float64)
    active = np.flatnonzero(np.isfinite(mu))
    # Working copies of the active pixels only, shrunk as pixels converge.
    # float32 arithmetic for the weights, float64 for the weighted sums.
    x = stack.reshape(n, -1)[:, active].astype(np.float32)
    fin = np.isfinite(x)
    x[~fin] = 0.0
    m = mu[active]
    c = np.float32((_TUKEY_C if alg == "TUKEY" else _HUBER_C) * float(scale))
    tol = _IRLS_TOL * float(scale)
    for _ in range(max_iterations):
        if active.size == 0:
            break
        u = (x - m.astype(np.float32)) / c
        if alg == "TUKEY":
            w = np.clip(1.0 - u * u, 0.0, None) ** 2
        else:
            au = np.abs(u)
            w = np.minimum(np.float32(1.0), 1.0 / np.maximum(au, np.float32(1e-30)))
        w *= fin
        sw = w.sum(axis=0, dtype=np.float64)
        swx = (w * x).sum(axis=0, dtype=np.float64)
        ok = sw > 0
        new = np.where(ok, swx / np.where(ok, sw, 1.0), m)
        # No value within c*scale of the estimate (a redescending estimator
        # with nothing to hold on to, e.g. a bimodal pixel): keep the current
        # estimate, the median on the first iteration, and call it done.
        done = ~ok | (np.abs(new - m) <= tol)
        mu[active] = new
        keep = ~done
        active, x, fin, m = active[keep], x[:, keep], fin[:, keep], new[keep]
    converged.reshape(-1)[active] = False
    return mu.reshape(stack.shape[1:]).astype(np.float32), converged


def fill_nan_box_mean(image, *, box: int = 5, max_passes: int | None = None, copy: bool = True) -> np.ndarray:
    """Replace NaN pixels by the mean of the finite values in a ``box`` x ``box`` window.

    Parameters
    ----------
    image : ndarray, (ny, nx)
    box : int
        Window side in pixels (odd values centre the window on the pixel).
    max_passes : int or None
        Repeat on the result while NaNs remain that a box could reach (a box of
        only NaN fills on a later pass); None: until nothing more changes; 1:
        the original's single pass.

    copy : bool
        False: fill ``image`` itself when it is a float32 array (no copy).

    Returns
    -------
    ndarray, float32, (ny, nx)
        A new array (or ``image``, see ``copy``); finite input pixels are unchanged.

    Vectorised: ``uniform_filter`` of the values (NaN -> 0) and of the finite
    indicator; their ratio is the mean of the finite values in the box.
    """
    out = np.array(image, dtype=np.float32, copy=True) if copy else np.asarray(image, dtype=np.float32)
    if box < 1:
        raise StageError(f"smoothing_box_size = {box} must be at least 1")
    passes = 0
    if max_passes == 1 and out.ndim == 2:
        bad = ~np.isfinite(out)
        nbad = np.count_nonzero(bad)
        if nbad == 0:
            return out
        if nbad <= _SPARSE_FILL_FRACTION * bad.size:
            _fill_sparse(out, bad, box)
            return out
    while True:
        bad = ~np.isfinite(out)
        if not bad.any() or bad.all():
            break
        if max_passes is not None and passes >= max_passes:
            break
        good = (~bad).astype(np.float64)
        vals = np.where(bad, 0.0, out.astype(np.float64))
        s = ndimage.uniform_filter(vals, size=box, mode="constant", cval=0.0)
        cnt = ndimage.uniform_filter(good, size=box, mode="constant", cval=0.0)
        fill = bad & (cnt > 1e-9)
        if not fill.any():
            break
        out[fill] = (s[fill] / cnt[fill]).astype(np.float32)
        passes += 1
    return out


def _fill_sparse(out: np.ndarray, bad: np.ndarray, box: int) -> None:
    """One box-mean pass evaluated only at the ``bad`` pixels (in place), for sparse NaNs:
    each takes the mean of the finite values in its window (NaN pixels, bad or not,
    count as missing); a window with none leaves the pixel as it is.

    Same windows as ``uniform_filter(size=box, mode="constant")``: rows and
    columns ``p - box // 2 .. p - box // 2 + box - 1``, clipped at the edges.
    Summed-area tables would cost two full-frame passes; gathering the box of
    each bad pixel costs box^2 x (number of bad pixels), with the window
    offsets that fall outside the frame left out.
    """
    ny, nx = out.shape
    flat = np.flatnonzero(bad)
    if flat.size == 0:
        return
    row, col = np.divmod(flat, nx)
    lo = box // 2
    values = out.reshape(-1)
    total = np.zeros(flat.size)
    count = np.zeros(flat.size, dtype=np.int32)
    for dy in range(-lo, box - lo):  # window order, as box_means_at sums
        r = row + dy
        row_in = (r >= 0) & (r < ny)
        for dx in range(-lo, box - lo):
            c = col + dx
            inside = row_in & (c >= 0) & (c < nx)
            v = values.take(np.where(inside, flat + (dy * nx + dx), 0))
            good = inside & np.isfinite(v)
            count += good
            total += np.where(good, v, np.float32(0.0))
    found = count > 0
    values[flat[found]] = (total[found] / count[found]).astype(np.float32)


_GATHER_CHUNK = 4096  # pixels whose boxes are gathered at a time (a (4096, box^2) block)


def box_means_at(bordered: np.ndarray, where: np.ndarray, box: int):
    """Means of the finite values in the ``box`` x ``box`` windows of the pixels at flat
    indices ``where`` of ``bordered`` (2-D, C-contiguous), windows as
    ``uniform_filter(size=box)`` places them.  Every window must lie inside the
    array: ``bordered`` has a border of at least ``box // 2`` pixels around the
    pixels asked for (NaN where the window should be clipped).  Missing values
    must be NaN (not infinite).

    Returns ``(means float32, found bool)``; ``found`` False (mean 0) where a window
    holds no finite value.  Each block of pixels' windows is gathered as one
    (pixels, box^2) array and summed along its rows in float64 with bottleneck's
    ``nansum`` (87000 pixels of a 2040x2040 frame, box 5: 35 -> 25 ms against a
    loop over the window offsets with ``np.where``).
    """
    width = bordered.shape[1]
    lo = box // 2
    offs = ((np.arange(box) - lo)[:, None] * width + (np.arange(box) - lo)[None, :]).ravel()
    flat = bordered.reshape(-1)
    means = np.zeros(len(where), dtype=np.float32)
    found = np.zeros(len(where), dtype=bool)
    for k in range(0, len(where), _GATHER_CHUNK):
        w = where[k:k + _GATHER_CHUNK]
        windows = flat.take(w[:, None] + offs)  # (pixels, box^2), float32
        count = np.count_nonzero(windows == windows, axis=1)  # not NaN
        total = bn.nansum(windows.astype(np.float64), axis=1)
        ok = count > 0
        means[k:k + _GATHER_CHUNK][ok] = (total[ok] / count[ok]).astype(np.float32)
        found[k:k + _GATHER_CHUNK] = ok
    return means, found


# --------------------------------------------------------------------------- sky builds


def _levels_from_offsets(off: np.ndarray) -> np.ndarray:
    """Least-squares levels L (mean 0) with L_i - L_j ~ off[i, j] for an antisymmetric off."""
    levels = off.mean(axis=1)
    n = off.shape[0]
    if n > 2:
        resid = off - (levels[:, None] - levels[None, :])
        log.debug("sky level offsets: max non-additivity %.3g ADU", float(np.abs(resid).max()))
    return levels


def _scale_for(rms: np.ndarray, i: int, peers: np.ndarray) -> float:
    others = [int(j) for j in peers if j != i]
    vals = rms[i, others] if others else rms.ravel()
    vals = vals[vals > 0]
    return float(np.median(vals) / math.sqrt(2)) if vals.size else 0.0


def build_sky(stack, target_index: int, *, peers_only: bool = True, algorithm: str = "MEDIAN",
              levels=None, scale=None, bg_sigma_clip: float = 3.0, max_iterations: int = 50,
              max_unsolved_percentage: float = 1.0, chunk_rows: int = 256):
    """The sky for one frame of a stack, before NaN filling.

    Parameters
    ----------
    stack : ndarray, (nframes, ny, nx)
        Frames (NaN = bad or masked).
    target_index : int
        The frame the sky is for.
    peers_only : bool
        Build it from the other frames only (True) or from all.
    algorithm : {"MEDIAN", "TUKEY", "HUBER"}
    levels : ndarray (nframes,), optional
        Per-frame levels; frame ``j`` is shifted by ``levels[i] - levels[j]``.
        Computed from the pairwise clipped offsets when not given.
    scale : float, optional
        M-estimator scale; default median(rms of the clipped differences i - j)/sqrt(2).
    max_unsolved_percentage : float
        More non-converged pixels than this: the median is used instead (logged);
        fewer: those pixels become NaN.

    Returns
    -------
    sky : ndarray, float32, (ny, nx)
        NaN where no frame contributes or an estimate did not converge.
    unsolved : ndarray of bool, (ny, nx)
        Pixels made NaN because the estimator did not converge.
    """
    alg = _check_algorithm(algorithm)
    stack = np.asarray(stack)
    n = stack.shape[0]
    if not 0 <= target_index < n:
        raise StageError(f"build_sky: target_index {target_index} outside 0..{n - 1}")
    rms = None
    if levels is None or (alg != "MEDIAN" and scale is None):
        off, rms = _pair_offsets(stack, bg_sigma_clip)
        if levels is None:
            levels = _levels_from_offsets(off)
    peers = np.array([j for j in range(n) if j != target_index]) if peers_only and n > 1 \
        else np.arange(n)
    if alg != "MEDIAN" and scale is None:
        scale = _scale_for(rms, target_index, peers)
    shift = (levels[target_index] - levels[peers]).astype(np.float32)[:, None, None]
    ny = stack.shape[1]
    sky = np.empty(stack.shape[1:], dtype=np.float32)
    conv = np.ones(stack.shape[1:], dtype=bool)
    for r0 in range(0, ny, chunk_rows):
        chunk = stack[peers, r0:r0 + chunk_rows].astype(np.float32) + shift
        sky[r0:r0 + chunk_rows], conv[r0:r0 + chunk_rows] = robust_combine(
            chunk, algorithm=alg, scale=scale, max_iterations=max_iterations)
    unsolved = ~conv
    pct = 100.0 * unsolved.mean()
    if pct > max_unsolved_percentage:
        log.info("sky for frame %d: %s left %.2f %% of pixels unsolved (> %.2f %%): using the median",
                 target_index, alg, pct, max_unsolved_percentage)
        med, _ = build_sky(stack, target_index, peers_only=peers_only, algorithm="MEDIAN",
                           levels=levels, chunk_rows=chunk_rows)
        return med, np.zeros_like(unsolved)
    sky[unsolved] = np.nan
    return sky, unsolved


def _sorting_network(n: int) -> list:
    """Comparator pairs (i, j), i < j, of Batcher's odd-even merge sort for ``n`` inputs.

    Hand-written because numpy has no sort across a list of planes: a network
    of element-wise ``minimum``/``maximum`` sorts n frame planes about twice as
    fast as ``np.sort(axis=0)`` on a stacked copy (9 x 256 x 2048: 10 ms
    against 22 ms) and needs no stacked copy.
    """
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


class _Planes:
    """The n frames' values by rows, with excluded pixels as NaN.

    ``values[k]`` are (ny, nx) arrays (not copied); ``exclude[k]`` bool planes or
    None (True = leave out, e.g. DO_NOT_USE or a masked source), kept packed
    eight pixels a byte along rows (the caller may drop its own planes).  Rows
    are copied on request, so no (n, ny, nx) stack is ever built.
    """

    def __init__(self, values, exclude=None):
        self.values = list(values)
        self.n = len(self.values)
        self.shape = self.values[0].shape
        self.exclude = [None if e is None else np.packbits(e, axis=1)
                        for e in (exclude if exclude is not None else [None] * self.n)]

    def _excluded(self, k: int, rows: slice = slice(None)):
        packed = self.exclude[k]
        if packed is None:
            return None
        return np.unpackbits(packed[rows], axis=1, count=self.shape[1]).view(bool)

    def rows(self, k: int, rows: slice) -> np.ndarray:
        out = np.array(self.values[k][rows], dtype=np.float32, copy=True)
        ex = self._excluded(k, rows)
        if ex is not None:
            out[ex] = np.nan
        return out

    def sample(self, idx: np.ndarray) -> np.ndarray:
        """(n, m) float64 values at the flat pixel indices ``idx`` (NaN where excluded)."""
        out = np.empty((self.n, idx.size), dtype=np.float64)
        row, col = np.divmod(idx, self.shape[1])
        for k in range(self.n):
            out[k] = self.values[k].reshape(-1)[idx]
            packed = self.exclude[k]
            if packed is not None:  # the bits of the sampled pixels only
                ex = (packed[row, col >> 3] >> (7 - (col & 7)).astype(np.uint8)) & 1
                out[k][ex.astype(bool)] = np.nan
        return out

    def valid(self, k: int, rows: slice = slice(None)) -> np.ndarray:
        """Rows of frame ``k`` that count: finite and not excluded."""
        ok = np.isfinite(self.values[k][rows])
        ex = self._excluded(k, rows)
        if ex is not None:
            ok &= ~ex
        return ok

    def stack(self) -> np.ndarray:
        """The (n, ny, nx) float32 stack (only the M-estimators need it)."""
        return np.stack([self.rows(k, slice(None)) for k in range(self.n)])


def _pair_offsets(planes, sigma: float, seed: int = 0):
    """Clipped mean and rms of ``frame_i - frame_j`` for every pair, on one subsample.

    ``planes``: a :class:`_Planes` or an (n, ny, nx) stack.  The subsample is
    spread uniformly over the frame; pixels that are NaN in either frame are
    dropped (never the tail of the subsample, which is in row order).  Returns
    ``(offsets, rms)``, both (n, n) float64, offsets antisymmetric.  (Clipping
    every pair at once with bottleneck along rows was measured slower: the
    pairs converge after different numbers of iterations.)
    """
    if not isinstance(planes, _Planes):
        planes = _Planes(np.asarray(planes))
    n = planes.n
    idx = _subsample_index(planes.shape, 2 * _N_SUBSAMPLE, seed)
    sub = planes.sample(idx)  # (n, m) small
    off = np.zeros((n, n))
    rms = np.zeros((n, n))

    def clip(pair):
        i, j = pair
        d = sub[i] - sub[j]
        return _clip_stats(d[np.isfinite(d)], sigma, what=f"frames {i} and {j}")

    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    stats = thread_map(clip, pairs)  # numpy's partition (the medians) releases the GIL
    for (i, j), (m, s) in zip(pairs, stats):
        off[i, j], off[j, i] = m, -m
        rms[i, j] = rms[j, i] = s
    return off, rms


def _all_bits(cond, out=None) -> np.ndarray:
    """int32 -1 (every bit set) where ``cond``, 0 elsewhere: the mask of the bit blends."""
    return np.subtract(0, cond, dtype=np.int32, out=out)


def _select(cond, a, b, out=None, mask=None, diff=None):
    """``np.where(cond, a, b)`` for float32 arrays of one shape, without branches.

    numpy's ``where`` (and a masked ``copyto``) branches on every element: on
    the near-random conditions of the median skies it was measured at 7 ns an
    element, this bit blend (``b ^ ((a ^ b) & -cond)`` on the bits) at 1.4 ns.
    ``out`` may be ``a`` or ``b``; ``mask`` an int32 work array; ``diff`` the
    int32 ``a ^ b`` when it is already known (the same pair, many conditions).
    """
    out = np.empty_like(a) if out is None else out
    mask = _all_bits(cond, out=np.empty(a.shape, np.int32) if mask is None else mask)
    bits, bb = out.view(np.int32), b.view(np.int32)
    if out is b:
        bb = b.copy().view(np.int32)
    if diff is None:
        np.bitwise_xor(a.view(np.int32), bb, out=bits)
        bits &= mask
    else:
        np.bitwise_and(diff, mask, out=bits)
    bits ^= bb
    return out


def _median_skies(planes: _Planes, levels: np.ndarray, *, peers_only: bool,
                  chunk_rows: int = 64) -> list:
    """All n median skies, a list of (ny, nx) float32, NaN-aware, in row chunks.

    Frames are level-normalised (``value_j - levels[j]``) and each sky is the
    median of the normalised peers (or of all frames) plus ``levels[i]``.  The
    normalised values of a chunk are sorted across frames once, with a sorting
    network (missing values as +inf sort last).  The k-th smallest of the
    values without frame ``i`` (value ``x``) is ``s[k]`` if ``s[k] < x`` else
    ``s[k + 1]``: no ranks are needed.  Pixels where every frame is finite (the
    bulk) take fixed positions; the others are gathered.  Equal to
    ``nanmedian`` over the peers (the two middle values averaged in float64).
    The choices between sorted values are bit blends, not ``np.where`` (see
    :func:`_select`): on the bench's second pass (nine 2040x2040 frames, 7 %
    of each masked) 2.0 s of CPU with ``np.where`` (2026-12-02), 1.0 s now.
    Chunks of 64 rows were measured fastest (2 cores, nine 2048x2048 frames:
    128 rows 0.44-0.53 s a pass, 64 rows 0.42-0.43 s, 32 rows 0.49 s).
    """
    n = planes.n
    ny, nx = planes.shape
    skies = [np.empty((ny, nx), dtype=np.float32) for _ in range(n)]
    lv = levels.astype(np.float32)
    network = _sorting_network(n)
    inf = np.float32(np.inf)

    def chunk(r0):
        rows = slice(r0, r0 + chunk_rows)
        vals, fins = [], []
        for k in range(n):
            v = np.subtract(planes.values[k][rows], lv[k], dtype=np.float32)
            fin = np.isfinite(v)
            ex = planes._excluded(k, rows)
            if ex is not None:
                fin &= ~ex
            np.copyto(v, inf, where=~fin)
            vals.append(v)
            fins.append(fin)
        count = np.sum(fins, axis=0, dtype=np.int16) if n > 1 else fins[0].astype(np.int16)
        # sort across frames; a comparator's first touch of a frame writes new arrays
        # (no copies of vals)
        s, own = list(vals), [False] * n
        tmp = np.empty_like(vals[0])
        for i, j in network:
            np.minimum(s[i], s[j], out=tmp)
            if own[j]:
                np.maximum(s[i], s[j], out=s[j])
            else:
                s[j], own[j] = np.maximum(s[i], s[j]), True
            if own[i]:
                s[i], tmp = tmp, s[i]
            else:
                s[i], own[i], tmp = tmp, True, np.empty_like(tmp)
        # Every median needed lies among the sorted values g0, g1, g2 at k1, k1 + 1,
        # k1 + 2, k1 = (count - 2) // 2 (clipped to 0 .. n - 1).
        k = (n - 2) // 2  # k1 where every frame is finite (the bulk of the pixels)
        g0, g1, g2 = (s[min(max(k + j, 0), n - 1)] for j in range(3))
        partial = bool(count.min() < n)  # some pixel has a missing frame
        if partial:
            # Only where k1 = count // 2 - 1 is not the bulk's k do g0, g1, g2 lie
            # elsewhere: those pixels' are gathered.  (For an odd n one missing frame,
            # the commonest case with dithered source masks, leaves k1 = k.)
            kp = count.reshape(-1) // 2 - 1
            moved = np.flatnonzero(kp != k)
            if moved.size:
                kp = kp[moved]
                srt = np.stack([si.reshape(-1)[moved] for si in s])
                cols = np.arange(moved.size)
                g0, g1, g2 = (g.copy() for g in (g0, g1, g2))
                for j, g in enumerate((g0, g1, g2)):
                    g.reshape(-1)[moved] = srt[np.clip(kp + j, 0, n - 1), cols]
                del srt, cols
            del kp, moved
            odd = (count & 1).astype(bool)
        else:
            odd = bool(n & 1)
        # The median of all count values: (g0 + g1) / 2, or g1 for an odd count.
        every = np.add(_select(odd, g1, g0) if partial else (g1 if odd else g0), g1, dtype=np.float64)
        every *= 0.5
        if partial:
            every[count == 0] = np.nan
        if not peers_only:
            for i in range(n):
                np.add(every, levels[i], out=skies[i][rows])
            return
        # Frame i (value x) left out: the k-th of its peers is s[k] if s[k] < x else
        # s[k + 1].  With an even number (count - 1) of peers the median averages
        # those at k1 and k1 + 1, (a, b) below; with an odd number it is a alone,
        # which b also gives when it picks from (g0, g1) instead of (g1, g2).
        h1 = _select(odd, g1, g0) if partial else (g1 if odd else g0)
        h2 = _select(odd, g2, g1) if partial else (g2 if odd else g1)
        # the same two pairs for every frame: their bit differences once
        d01 = np.bitwise_xor(g0.view(np.int32), g1.view(np.int32))
        dh = np.bitwise_xor(h1.view(np.int32), h2.view(np.int32))
        a, b, mask = np.empty_like(g0), np.empty_like(g0), np.empty(g0.shape, np.int32)
        less = np.empty(g0.shape, bool)
        med = np.empty(g0.shape, dtype=np.float64)
        lonely = count.reshape(-1) <= 1 if partial else None  # the one finite frame has no peer
        if lonely is not None and not lonely.any():
            lonely = None
        for i in range(n):
            x = vals[i]
            _select(np.less(g0, x, out=less), g0, g1, out=a, mask=mask, diff=d01)
            _select(np.less(h1, x, out=less), h1, h2, out=b, mask=mask, diff=dh)
            np.add(a, b, out=med, dtype=np.float64)
            med *= 0.5
            sky = skies[i][rows]
            np.add(med, levels[i], out=sky)
            if partial:
                sky = sky.reshape(-1)
                miss = np.flatnonzero(~fins[i].reshape(-1))  # frame i missing: all count values are its peers
                sky[miss] = every.reshape(-1)[miss] + levels[i]
                if lonely is not None:
                    sky[lonely & fins[i].reshape(-1)] = np.nan

    # numpy's element-wise operations release the GIL: row chunks (disjoint
    # output rows) run on the machine's cores
    thread_map(chunk, range(0, ny, chunk_rows))
    return skies


def _pack(mask: np.ndarray):
    """A bool plane as bits (8x less memory; many planes are held through the sky stage)."""
    return np.packbits(mask, axis=None), mask.shape


def _unpack(packed) -> np.ndarray:
    bits, shape = packed
    return np.unpackbits(bits, count=int(np.prod(shape))).view(bool).reshape(shape)


def _unpack_rows(packed, r0: int, r1: int) -> np.ndarray:
    """Rows ``r0 .. r1 - 1`` of a :func:`_pack` ed (ny, nx) plane."""
    bits, (ny, nx) = packed
    r1 = min(r1, ny)
    start, count = r0 * nx, (r1 - r0) * nx
    b0 = start // 8
    raw = np.unpackbits(bits[b0:(start + count + 7) // 8])
    return raw[start - 8 * b0:start - 8 * b0 + count].view(bool).reshape(r1 - r0, nx)


_VAR_ROWS = 64  # rows of a sky variance computed at a time
_VAR_BLOCK_ROWS = 8 * _VAR_ROWS  # rows of the variance sums one thread takes at a time


def _zero_unless(keep, values, out=None, bits=None) -> np.ndarray:
    """float32 ``values`` where ``keep``, +0.0 elsewhere (NaN there too): ``np.where(keep,
    values, 0)`` as a bit mask, several times faster than it or a ufunc's ``where=``
    (see :func:`_select`).  ``out``, ``bits``: float32 and int32 work arrays of at
    least ``values``' rows."""
    n = len(values)
    out = np.empty(values.shape, np.float32) if out is None else out[:n]
    bits = np.empty(values.shape, np.int32) if bits is None else bits[:n]
    np.bitwise_and(np.asarray(values, dtype=np.float32).view(np.int32), _all_bits(keep, out=bits),
                   out=out.view(np.int32))
    return out


class _SkyVariances:
    """factor x mean(variance of the contributing frames) / n_contributing, per frame on demand.

    The sum over all frames is accumulated once (float32) without
    stacking the variance planes, and each frame's own term is removed for
    ``peers_only`` when that frame's sky variance is asked for: one frame-sized
    result at a time instead of n.  NaN where no frame contributes.
    ``valid``: a function of the frame index and a row slice giving those rows
    of its bool plane (True = the frame contributes there); each plane is kept
    packed (eight pixels a byte along rows) once counted.  In row chunks.

    The sums are made on first use (or by :meth:`build`), so that a caller can
    have them made on a thread while it does other work; until then ``valid``
    and the variance planes are kept.
    """

    def __init__(self, variances, valid, *, peers_only: bool, factor: float):
        self.variances = variances
        self.peers_only = peers_only and len(variances) > 1
        self.factor = np.float32(factor)
        self._valid_rows = valid
        self._lock = threading.Lock()
        self.total = self.count = self.valid = None

    def build(self) -> None:
        """Make the sums over the frames (once; threads that ask meanwhile wait)."""
        with self._lock:
            if self.total is None:
                self._build()
                self._valid_rows = None

    def _build(self) -> None:
        variances, valid = self.variances, self._valid_rows
        ny, nx = np.shape(variances[0])
        total = np.zeros((ny, nx), dtype=np.float32)  # float32: a sum of a few dozen positive terms
        count = np.zeros((ny, nx), dtype=np.int16)
        self.valid = [np.empty((ny, (nx + 7) // 8), dtype=np.uint8) for _ in variances]

        def block(r0):
            # rows r0 .. r0 + _VAR_BLOCK_ROWS - 1 (disjoint between threads), by row chunks
            term = np.empty((_VAR_ROWS, nx), dtype=np.float32)
            bits = np.empty((_VAR_ROWS, nx), dtype=np.int32)
            for r in range(r0, min(ny, r0 + _VAR_BLOCK_ROWS), _VAR_ROWS):
                rows = slice(r, min(r + _VAR_ROWS, r0 + _VAR_BLOCK_ROWS))
                for k, v in enumerate(variances):  # frame by frame per pixel, as a sum over the stack
                    ok = valid(k, rows)
                    total[rows] += _zero_unless(ok, v[rows], term, bits)
                    count[rows] += ok
                    self.valid[k][rows] = np.packbits(ok, axis=1)

        # numpy releases the GIL: blocks of rows on the machine's cores (the sum of each
        # pixel is made in frame order whatever the split, so the result is the same)
        thread_map(block, range(0, ny, _VAR_BLOCK_ROWS))
        self.total = total
        self.count = count

    def release(self, i: int) -> None:
        self.build()  # the sums need every frame's variance
        self.variances[i] = None

    def __call__(self, i: int, variance=None, out=None) -> np.ndarray:
        """Sky variance of frame ``i``; ``variance``: the frame's own variance once released;
        ``out``: a float32 plane to write it into (else a new one).  In row chunks."""
        self.build()
        own = self.variances[i] if variance is None else variance
        ny, nx = self.total.shape
        s = np.empty((ny, nx), dtype=np.float32) if out is None else out
        for r in range(0, ny, _VAR_ROWS):
            rows = slice(r, r + _VAR_ROWS)
            part = s[rows]
            if self.peers_only:
                valid = np.unpackbits(self.valid[i][rows], axis=1, count=nx).view(bool)
                np.subtract(self.total[rows], _zero_unless(valid, own[rows]), out=part)  # x - 0 is x
                c = (self.count[rows] - valid).astype(np.float32)
            else:
                np.copyto(part, self.total[rows])  # scaled below: never the shared sum itself
                c = self.count[rows].astype(np.float32)
            c *= c
            with np.errstate(invalid="ignore", divide="ignore"):
                part *= self.factor
                part /= c  # c == 0: 0/0 -> NaN
        return s


_BIN_ROWS = 64  # full-resolution rows binned at a time (a multiple of the block size is used)


def _bin_plane(plane: np.ndarray, b: int, exclude=None) -> np.ndarray:
    """NaN-aware b x b block means of one (ny, nx) plane, float32 (edges padded with NaN);
    ``exclude``: bool (ny, nx), pixels to leave out as if NaN.

    Summed from b^2 strided views (float32 is exact enough for b^2 values)
    rather than a 4-d reshape: several times faster on a 2040^2 frame; in row
    chunks through small reused buffers (no frame-sized temporaries).
    """
    ny, nx = plane.shape
    by, bx = -(-ny // b), -(-nx // b)
    out = np.empty((by, bx), dtype=np.float32)
    step = max(1, _BIN_ROWS // b) * b  # full-resolution rows per chunk, whole blocks
    buf = np.full((step, bx * b), np.nan, dtype=np.float32)  # NaN beyond the frame's columns
    finite = np.empty(buf.shape, dtype=bool)
    for r0 in range(0, by * b, step):
        n = min(step, ny - r0)  # rows of the frame in this chunk
        m = min(step, by * b - r0)  # rows of the chunk (the last one padded with NaN)
        buf[:n, :nx] = plane[r0:r0 + n]
        buf[n:m] = np.nan
        if exclude is not None:
            np.copyto(buf[:n, :nx], np.float32(np.nan), where=exclude[r0:r0 + n])
        chunk, fin = buf[:m], finite[:m]
        np.isfinite(chunk, out=fin)
        values = np.where(fin, chunk, np.float32(0.0))
        count = fin.view(np.uint8)
        # rows first (contiguous), then columns of the row sums
        vrows = values[0::b].copy()
        crows = count[0::b].astype(np.float32)
        for dy in range(1, b):
            vrows += values[dy::b]
            crows += count[dy::b]
        total = vrows[:, 0::b].copy()
        cnt = crows[:, 0::b].copy()
        for dx in range(1, b):
            total += vrows[:, dx::b]
            cnt += crows[:, dx::b]
        with np.errstate(invalid="ignore", divide="ignore"):
            np.divide(total, cnt, out=out[r0 // b:(r0 + m) // b])
    return out


def _detect_source_mask(image: np.ndarray, *, sigma: float, dilate: int, binning: int = 1,
                        shape=None, sources: bool = False, offload=direct_call):
    """Pixels of sources found by sep at ``sigma`` x background rms, dilated by ``dilate`` px.

    ``image`` may be a ``binning`` x ``binning`` block-averaged frame: the
    sources worth masking are several pixels wide, a binned image has
    ``binning``^2 fewer pixels to segment (sep's cost), and the mask is
    expanded back to the full-resolution ``shape``.  NaN pixels are ignored.
    ``image`` is expected sky-subtracted (the first pass's residual): sep's
    background of what is left is estimated on a subsample (see
    :func:`ioi.stages._sep._subtract_background`).
    ``sources=True``: also return the sources (deblended), a structured array
    ``x``, ``y``, ``a`` (full-resolution pixels) and ``flux``, brightest first.
    ``offload``: how the sep calls are run (``ioi._sideproc.SideProcesses.call``:
    in another process; default here).
    """
    from ioi.stages import _sep  # deferred: only the two-pass mode needs sep

    b = max(1, int(binning))
    data = np.ascontiguousarray(image, dtype=np.float32).copy()
    bad = ~np.isfinite(data)
    data[bad] = 0.0
    full_shape = tuple(shape) if shape is not None else data.shape
    if bad.all():
        empty = np.zeros(full_shape, dtype=bool)
        return (empty, np.zeros(0, dtype=_sep.SOURCE_DTYPE)) if sources else empty
    # the binned rms is ~1/b of a pixel's: a threshold of b x sigma keeps the
    # surface-brightness limit of a full-resolution detection at ``sigma``
    # a mask needs no deblending (3x faster with one threshold level); a source
    # list for the registration does
    # the image is sky-subtracted (a first pass): only a smooth residual background is left
    objs, mask = offload(_sep.segment, data, bad, thresh=sigma * b, minarea=max(2, 5 // (b * b)),
                         deblend=sources, sky_subtracted=True)
    del data, bad
    grow = int(dilate) // b  # dilation in binned pixels (the blocks add up to b - 1 more)
    if grow > 0:
        # A square maximum filter is separable, hence much faster than
        # binary_dilation with a disc on a full frame.
        mask = ndimage.maximum_filter(mask, size=2 * grow + 1)
    if b > 1:
        mask = np.repeat(np.repeat(mask, b, axis=0), b, axis=1)[:full_shape[0], :full_shape[1]]
    mask = np.ascontiguousarray(mask)
    if not sources:
        return mask
    found = np.zeros(len(objs), dtype=_sep.SOURCE_DTYPE)
    # block (j, i) covers full-resolution pixels b*j .. b*j + b - 1: centre b*j + (b - 1)/2
    found["x"] = objs["x"] * b + (b - 1) / 2.0
    found["y"] = objs["y"] * b + (b - 1) / 2.0
    found["a"] = objs["a"] * b
    found["flux"] = objs["flux"]
    return mask, found[np.argsort(-found["flux"], kind="stable")]


def _sky_pass(planes: _Planes, variances, *, peers_only, alg, bg_sigma_clip, max_iterations,
              max_unsolved_percentage, notes, with_variance=True):
    """Raw skies (before filling), their variances (None unless ``with_variance``),
    offsets, levels and unsolved fractions."""
    n = planes.n
    off, rms = _pair_offsets(planes, bg_sigma_clip)
    levels = _levels_from_offsets(off)
    if alg == "MEDIAN":
        skies = _median_skies(planes, levels, peers_only=peers_only)
        unsolved = np.zeros(n)
    else:
        stack = planes.stack()  # the M-estimators iterate over a stacked copy
        skies, unsolved = [], np.zeros(n)
        for i in range(n):
            peers = [j for j in range(n) if j != i] if peers_only and n > 1 else list(range(n))
            sky, uns = build_sky(stack, i, peers_only=peers_only, algorithm=alg, levels=levels,
                                 scale=_scale_for(rms, i, np.array(peers)),
                                 max_iterations=max_iterations,
                                 max_unsolved_percentage=max_unsolved_percentage)
            if uns.any():
                notes.append(f"frame {i}: {uns.sum()} pixels did not converge ({alg}); set NaN")
            unsolved[i] = uns.mean()
            skies.append(sky)
        del stack
    sky_variances = None
    if with_variance:
        sky_variances = _SkyVariances(variances, planes.valid, peers_only=peers_only,
                                      factor=_VARIANCE_FACTOR[alg])
    return skies, sky_variances, off, levels, unsolved


class SkyModel:
    """The skies of a multrun's dither frames, subtracted on demand.

    Made by :func:`model_skies`.  Holds one filled sky per frame (float32) and
    what is needed for the sky variances; :meth:`subtracted` returns the
    sky-subtracted frame ``i`` as a new :class:`~ioi.frame.Frame`, so that a
    caller can build, use and drop one sky-subtracted frame at a time instead
    of holding a second full set of frames.  :meth:`subtract_in_place` turns
    the stored skies into the sky-subtracted science (no more memory).

    Attributes: ``skies`` (list of float32 (ny, nx), NaN where no sky could be
    made; None after :meth:`subtract_in_place`), ``offsets``, ``levels``,
    ``unsolved_fraction``, ``source_masks`` (list of bool planes or None),
    ``notes``, ``nan_left`` ((frame, pixels) with NaN sky after filling) - as
    in :class:`SkyResult`.
    """

    def __init__(self, frames, skies, sky_variances, *, offsets, levels, unsolved, masks, notes, nosky,
                 keywords, smoothing_box_size, fill_passes, sources=None):
        self.frames = frames
        self.skies = skies
        self._science = None
        self._nosky = nosky  # per frame, flat indices of the pixels with no sky
        self._sky_variances = sky_variances
        self.offsets = offsets
        self.levels = levels
        self.unsolved_fraction = np.asarray(unsolved, dtype=np.float64)
        self._masks = None if masks is None else [m if isinstance(m, tuple) else _pack(m) for m in masks]
        self.notes = notes
        self.nan_left = [(k, int(ix.size)) for k, ix in enumerate(nosky) if ix.size]
        self.sources = sources  # first-pass source lists, with model_skies(keep_sources=True)
        self._keywords = keywords
        self._box = smoothing_box_size
        self._passes = fill_passes

    def __len__(self) -> int:
        return len(self._nosky)

    @property
    def source_masks(self):
        """The source masks of the second pass (bool planes), or None."""
        return None if self._masks is None else [_unpack(m) for m in self._masks]

    def subtract_in_place(self) -> None:
        """Replace each stored sky by its frame's science minus the sky (``skies`` becomes None)."""
        if self._science is None:
            for f, sky in zip(self.frames, self.skies):
                np.subtract(f.science, sky, out=sky, dtype=np.float32)
            self._science, self.skies = self.skies, None

    def science(self, i: int, frame=None) -> np.ndarray:
        """The sky-subtracted science of frame ``i`` (the stored array after :meth:`subtract_in_place`)."""
        if self._science is not None:
            return self._science[i]
        f = self.frames[i] if frame is None else frame
        return np.subtract(f.science, self.skies[i], dtype=np.float32)

    def prepare_variances(self) -> None:
        """Make the sums the sky variances come from now (else on the first
        :meth:`sky_variance`): e.g. on a thread while the caller measures the first frame."""
        self._sky_variances.build()

    def sky_variance(self, i: int, frame=None, out=None) -> np.ndarray:
        """The variance of sky ``i`` (float32), NaN holes filled like the sky.

        With one fill pass (which takes only the originally finite neighbours)
        the filling is limited to the pixels where the frame's own variance is
        finite: where that is NaN (DO_NOT_USE pixels) the frame's total variance
        is NaN whatever the sky's.  ``frame``: frame ``i`` once released;
        ``out``: a float32 plane to write into."""
        f = self.frames[i] if frame is None else frame
        variance = self._sky_variances(i, f.variance, out=out)
        if self._passes == 1 and np.count_nonzero(np.isnan(variance)) <= _SPARSE_FILL_FRACTION * variance.size:
            hole = ~np.isfinite(variance)
            hole &= np.isfinite(f.variance)
            if hole.any():
                _fill_sparse(variance, hole, self._box)
            return variance
        return fill_nan_box_mean(variance, box=self._box, max_passes=self._passes, copy=False)

    def subtracted(self, i: int, frame=None, out=None):
        """Frame ``i`` minus its sky: science - sky, variance + sky variance,
        quality with SOURCE on masked source pixels and NO_SKY|DO_NOT_USE where
        no sky could be made.  ``frame``: frame ``i`` itself when the caller
        has released it from the model (see :meth:`release`).  ``out``:
        (variance float32, quality uint16) planes to write into (e.g. reused
        from an earlier frame) instead of new ones."""
        f = self.frames[i] if frame is None else frame
        var_out = q_out = None
        if out is not None:
            var_out, q_out = out
            if (var_out.dtype != np.float32 or q_out.dtype != QUALITY_DTYPE or var_out.shape != f.shape
                    or q_out.shape != f.shape):
                raise ValueError(f"out must be float32 and uint16 planes of shape {f.shape}")
        science = self.science(i, f)
        variance = self.sky_variance(i, f, out=var_out)
        variance += f.variance
        if q_out is None:
            quality = np.array(as_quality(f.quality), copy=True)
        else:
            quality = q_out
            np.copyto(quality, as_quality(f.quality))
        if self._nosky[i].size:
            quality.reshape(-1)[self._nosky[i]] |= QUALITY_DTYPE.type(DQ.NO_SKY | DQ.DO_NOT_USE)
        if self._masks is not None:
            for r in range(0, quality.shape[0], _VAR_ROWS):
                rows = slice(r, r + _VAR_ROWS)
                np.bitwise_or(quality[rows], QUALITY_DTYPE.type(DQ.SOURCE), out=quality[rows],
                              where=_unpack_rows(self._masks[i], r, r + _VAR_ROWS))
        hdr = f.header.copy()
        for key, value, comment in self._keywords[i]:
            hdr[key] = (value, comment)
        return f.replace(science=science, variance=variance, quality=quality, header=hdr)

    def release(self, i: int) -> None:
        """Drop what the model holds for frame ``i`` but what :meth:`subtracted` needs
        with the frame passed in (the frame reference, and the subtracted science)."""
        self.frames[i] = None
        self._sky_variances.release(i)
        if self._science is not None:
            self._science[i] = None


def model_skies(frames, *, peers_only: bool = True, algorithm: str = "MEDIAN",
                bg_sigma_clip: float = 3.0, smoothing_box_size: int = 5,
                max_iterations: int = 50, max_unsolved_percentage: float = 1.0,
                mask_sources: bool = True, source_sigma: float = 3.0, mask_dilate: int = 5,
                fill_passes: int | None = 1, keep_sources: bool = False, offload=direct_call) -> SkyModel:
    """Build a sky for every dither frame from the frames themselves (see :func:`subtract_sky`
    for the parameters) without subtracting it: a :class:`SkyModel`.

    ``keep_sources``: with ``mask_sources``, keep each frame's first-pass source
    list (``SkyModel.sources``: positions to start centroids from, see
    :func:`ioi.stages.register.detect_sources`).  ``offload``: how sep's calls run
    (``ioi._sideproc.SideProcesses.call``: in other processes; default here).

    Memory: the frames are read by rows; besides them the model holds one sky
    per frame, the source masks and two planes for the sky variances, never a
    stacked copy of the frames (except for the TUKEY and HUBER estimators).
    Raises StageWarning (exit 30) when sky pixels remain NaN after filling.
    """
    alg = _check_algorithm(algorithm)
    frames = list(frames)
    n = len(frames)
    if n < 2:
        raise StageError(f"sky subtraction needs at least 2 frames, got {n}")
    shape = frames[0].shape
    for k, f in enumerate(frames):
        if f.shape != shape:
            raise StageError(f"sky subtraction: frame {k} has shape {f.shape}, frame 0 has {shape}",
                             exit_code=ExitCode.DATA_SHAPE_MISMATCH)
    dnu = thread_map(lambda f: flagged(f.quality, DQ.DO_NOT_USE), frames)  # DO_NOT_USE pixels count as missing
    variances = [np.asarray(f.variance, dtype=np.float32) for f in frames]
    notes: list[str] = []
    kw = dict(peers_only=peers_only, alg=alg, bg_sigma_clip=bg_sigma_clip,
              max_iterations=max_iterations, max_unsolved_percentage=max_unsolved_percentage,
              notes=notes)
    masks = None
    sources = None
    if not mask_sources:
        planes = _Planes([f.science for f in frames], dnu)
        skies, sky_vars, off, levels, unsolved = _sky_pass(planes, variances, **kw)
    else:
        # First pass on 2x2 block means: its sky only serves to find the
        # sources to mask, which are several pixels wide (4x fewer pixels to
        # combine and to segment).
        b = _FIRST_PASS_BINNING
        # per frame on threads: numpy releases the GIL (sep does not: see offload)
        small = thread_map(lambda k: _bin_plane(frames[k].science, b, exclude=dnu[k]), range(n))
        first, _, _, _, _ = _sky_pass(_Planes(small), None, with_variance=False, **kw)

        def detect(i):
            found = _detect_source_mask(small[i] - first[i], sigma=source_sigma, dilate=mask_dilate,
                                        binning=b, shape=shape, sources=keep_sources, offload=offload)
            small[i] = None
            return found

        found = thread_map(detect, range(n))
        masks = [x[0] for x in found] if keep_sources else found
        sources = [x[1] for x in found] if keep_sources else []
        del found
        fractions = [float(m.mean()) for m in masks]
        for i in range(n):
            dnu[i] |= masks[i]  # leave the masked sources out of the second pass
            masks[i] = _pack(masks[i])
        planes = _Planes([f.science for f in frames], dnu)
        del dnu  # packed in planes
        skies, sky_vars, off, levels, unsolved = _sky_pass(planes, variances, **kw)

        def keep_first_pass(i):
            # Where every contributing frame is masked keep the first-pass sky
            # (its variance, NaN there, is filled from the neighbours below).
            hole = np.flatnonzero(~np.isfinite(skies[i]))  # flat indices: np.nonzero of a 2-D mask is ~15x slower
            if hole.size:
                ys, xs = np.divmod(hole, shape[1])
                skies[i].reshape(-1)[hole] = first[i][ys // b, xs // b]
            first[i] = None

        thread_map(keep_first_pass, range(n))
        log.info("sky: second pass with %s source pixels masked", ", ".join(f"{m:.1%}" for m in fractions))
    del planes

    def finish(i):
        """Frame i's sky filled, its pixels still NaN, and its header cards."""
        skies[i] = fill_nan_box_mean(skies[i], box=smoothing_box_size, max_passes=fill_passes, copy=False)
        cards = [("L1SKYSUB", 1, "sky subtracted (1 = yes)"),
                 ("SKYALG", alg, "sky combination algorithm"),
                 ("SKYPEERS", int(bool(peers_only)), "sky from other frames only (1) or all (0)"),
                 ("SKYNFRM", n - 1 if peers_only else n, "frames combined into the sky"),
                 ("SKY2PASS", int(bool(mask_sources)), "sources masked before final sky (1 = yes)"),
                 ("SKYCLIP", float(bg_sigma_clip), "sigma clip for sky level offsets"),
                 ("SKYBOX", int(smoothing_box_size), "box for filling NaN sky pixels"),
                 ("SKYLEVEL", float(levels[i]), "[ADU] level relative to mean of frames")]
        med_sky = float(bn.nanmedian(skies[i][::4, ::4]))  # a 1-in-16 sample is plenty for a header value
        if np.isfinite(med_sky):  # (bottleneck returns NaN for all-NaN without a warning)
            cards.append(("SKYMED", med_sky, "[ADU] median of the subtracted sky"))
        return np.flatnonzero(~np.isfinite(skies[i])), cards

    nosky, keywords = (list(x) for x in zip(*thread_map(finish, range(n))))  # per frame, in frame order
    for i in range(n):
        if nosky[i].size:
            notes.append(f"frame {i}: {nosky[i].size} sky pixels remain NaN after box filling "
                         f"(smoothing_box_size = {smoothing_box_size})")
    model = SkyModel(frames, skies, sky_vars, offsets=off, levels=levels, unsolved=unsolved, masks=masks,
                     notes=notes, nosky=nosky, keywords=keywords, smoothing_box_size=smoothing_box_size,
                     fill_passes=fill_passes, sources=sources if keep_sources else None)
    if model.nan_left:  # one warning for all frames
        counts = ", ".join(f"{k}: {c}" for k, c in model.nan_left)
        warnings.warn(StageWarning(f"sky pixels remain NaN after box filling (smoothing_box_size = "
                                   f"{smoothing_box_size}), per frame {counts}; flagged NO_SKY",
                                   exit_code=ExitCode.SKY_BAD_PIXELS_REMAIN), stacklevel=2)
    return model


def subtract_sky(frames, *, peers_only: bool = True, algorithm: str = "MEDIAN",
                 bg_sigma_clip: float = 3.0, smoothing_box_size: int = 5,
                 max_iterations: int = 50, max_unsolved_percentage: float = 1.0,
                 mask_sources: bool = True, source_sigma: float = 3.0, mask_dilate: int = 5,
                 fill_passes: int | None = 1, keep_skies: bool = True) -> SkyResult:
    """Build a sky for every dither frame from the frames themselves and subtract it.

    Parameters
    ----------
    frames : list of Frame
        Dither frames of one multrun, science (ny, nx) float32 with NaN bad pixels.
    peers_only : bool
        Each frame's sky from the other frames only (True) or from all frames.
    algorithm : {"MEDIAN", "TUKEY", "HUBER"}
        Pixel-by-pixel combination (``make_algorithm``); other values: exit 38.
    bg_sigma_clip : float
        Clipping threshold (rms) for the level offsets.
    smoothing_box_size : int
        Box for filling NaN sky pixels with the mean of their finite neighbours.
    max_iterations, max_unsolved_percentage
        M-estimator iteration limit and the percentage of unconverged pixels above
        which the median is used instead.
    mask_sources, source_sigma, mask_dilate
        *Beyond*: two passes, masking sep detections at ``source_sigma`` dilated by
        ``mask_dilate`` px before the second.  ``mask_sources=False`` is the original.
    fill_passes : int or None
        Passes of the box fill (1, the original: NaNs in a box of only NaN remain and
        give StageWarning exit 30; None: repeat until filled).
    keep_skies : bool
        Return the skies in ``SkyResult.skies``; False returns an empty list.

    Returns
    -------
    SkyResult
        New frames; the inputs are not modified.  The variance of each sky is
        estimated as factor x mean(variance of contributing frames) / n, factor
        pi/2 for the median and 1/0.95 for the M-estimators.  Quality: SOURCE on
        masked source pixels; NO_SKY|DO_NOT_USE where no sky could be made.

    :func:`model_skies` builds the same skies without holding the subtracted
    frames all at once.
    """
    model = model_skies(frames, peers_only=peers_only, algorithm=algorithm, bg_sigma_clip=bg_sigma_clip,
                        smoothing_box_size=smoothing_box_size, max_iterations=max_iterations,
                        max_unsolved_percentage=max_unsolved_percentage, mask_sources=mask_sources,
                        source_sigma=source_sigma, mask_dilate=mask_dilate, fill_passes=fill_passes)
    out = [model.subtracted(i) for i in range(len(model))]
    return SkyResult(frames=out, skies=model.skies if keep_skies else [], offsets=model.offsets,
                     levels=model.levels, unsolved_fraction=model.unsolved_fraction,
                     source_masks=model.source_masks, notes=model.notes)
