"""The sep calls of source detection, apart from everything else.

sep runs its C code without releasing the GIL (sep-developers/sep#172): on a
thread, a call stops every other thread of the pipeline until it returns.
What sep does in the sky's source masks and in registration is therefore
gathered here, as pure functions of plain arrays that import only numpy and
sep, so that a caller can run them in another process
(:class:`ioi._sideproc.SideProcesses`) while its own threads go on.  The
numpy work around them (copies, masks, dilation) stays with the callers.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import sep

#: Fields of a source list from :func:`segment` (full-resolution pixels).
SOURCE_DTYPE = [("x", "f8"), ("y", "f8"), ("a", "f8"), ("flux", "f8")]
#: Fields of a measured source list from :func:`measure`.
MEASURED_DTYPE = [("x", "f8"), ("y", "f8"), ("flux", "f8"), ("pos_err", "f8")]

_PIXSTACK_FIRST = 300_000  # sep's own default pixel stack
_PIXSTACK_LOCK = threading.Lock()
_PIXSTACK_USERS = [0, None]  # threads inside _sep_pixstack, the value to restore
POSITION_ERROR_FLOOR = 0.01  # px: centroiding systematics beyond the noise


@contextlib.contextmanager
def _sep_pixstack(size: int):
    """sep's pixel stack (a process-wide setting) at least ``size`` while any thread is
    inside; the first thread in raises it, the last one out restores it."""
    with _PIXSTACK_LOCK:
        if _PIXSTACK_USERS[0] == 0:
            _PIXSTACK_USERS[1] = sep.get_extract_pixstack()
        _PIXSTACK_USERS[0] += 1
        if sep.get_extract_pixstack() < size:
            sep.set_extract_pixstack(size)
    try:
        yield
    finally:
        with _PIXSTACK_LOCK:
            _PIXSTACK_USERS[0] -= 1
            if _PIXSTACK_USERS[0] == 0:
                sep.set_extract_pixstack(_PIXSTACK_USERS[1])


def extract(data, thresh, **kw):
    """``sep.extract`` with sep's default pixel stack, and only if that overflows (a frame
    with a huge object, or a bad sky) again with one as large as the image.

    sep allocates and fills the whole stack on every call: one of a binned
    frame's size (1M pixels) costs 15 ms and 42 MB of fresh memory more than
    the default, which a normal frame never outgrows."""
    try:
        with _sep_pixstack(min(data.size, _PIXSTACK_FIRST)):
            return sep.extract(data, thresh, **kw)
    except Exception as exc:  # sep raises a bare Exception
        if "pixel buffer full" not in str(exc):
            raise
    with _sep_pixstack(data.size):
        return sep.extract(data, thresh, **kw)


def segment(data, bad, *, thresh: float, minarea: int, deblend: bool, sky_subtracted: bool = False):
    """Sources of ``data`` (float32, C-contiguous, 0 at ``bad``; changed in place) above
    ``thresh`` x the background rms, after subtracting sep's mesh background.

    Returns ``(objects, segmented)``: a :data:`SOURCE_DTYPE` array in ``data``'s
    pixels (sep's order) and the bool plane of pixels in a source.  ``deblend``:
    sep's 32 deblending levels (a source list); else one (a mask, 3x faster).
    ``sky_subtracted``: the residual background on a subsample, as in
    :func:`measure` (a 1020^2 binned frame: 2x2, 27 -> 9 ms, the rms within 0.1 %).
    """
    rms = _subtract_background(data, bad, sky_subtracted)
    data[bad] = 0.0
    objs, seg = extract(data, thresh, err=rms, mask=bad, minarea=minarea,
                        segmentation_map=True, deblend_nthresh=32 if deblend else 1)
    found = np.zeros(len(objs), dtype=SOURCE_DTYPE)
    for name in ("x", "y", "a", "flux"):
        found[name] = objs[name]
    return found, seg > 0


#: Fewest pixels on the shorter side of the subsample a residual background is estimated on.
_BACKGROUND_MIN_SIDE = 500


def _subtract_background(data, bad, sky_subtracted: bool) -> float:
    """Subtract sep's mesh background from ``data`` (float32, in place); return the global rms.

    ``sky_subtracted``: only a small, slowly varying residual is left, so the
    background (64 px meshes, as on the full frame) is estimated on every 4th
    pixel in each axis -- every 2nd where that would leave fewer than
    :data:`_BACKGROUND_MIN_SIDE` pixels on a side (a 2x2 binned frame) -- and
    each subsampled value is subtracted from its block.  The per-pixel rms is
    that of the full frame.  Measured on a 9-dither simulated multrun (2040^2):
    sep's part 33 -> 16 ms a frame with 4 instead of 2, the rms within 0.1 %, the
    registration's error against the simulation's truth unchanged (0.004 px rms).
    """
    if not sky_subtracted:
        bkg = sep.Background(data, mask=bad)
        data -= bkg.back()
        return float(bkg.globalrms)
    step = 4 if min(data.shape) // 4 >= _BACKGROUND_MIN_SIDE else 2
    bkg = sep.Background(np.ascontiguousarray(data[::step, ::step]), mask=np.ascontiguousarray(bad[::step, ::step]),
                         bw=64 // step, bh=64 // step)
    back = bkg.back()
    for oy in range(step):
        for ox in range(step):
            view = data[oy::step, ox::step]
            view -= back[:view.shape[0], :view.shape[1]]
    return float(bkg.globalrms)


def measure(data, bad, *, thresh: float, minarea: int, sky_subtracted: bool, guesses=None):
    """Background-subtract ``data`` (float32, C-contiguous, 0 at ``bad``; changed in place),
    find its sources (or start from ``guesses``, a :data:`SOURCE_DTYPE` array) and
    measure windowed centroids: a :data:`MEASURED_DTYPE` array, brightest first.

    See :func:`ioi.stages.register.detect_sources` for the parameters.
    """
    rms = _subtract_background(data, bad, sky_subtracted)
    sub = data
    sub[bad] = 0.0
    if guesses is not None:
        objs = guesses
        if len(objs):  # the flux within the radius flux_radius normalises to (total, not isophotal)
            objs["flux"], _, _ = sep.sum_circle(sub, objs["x"], objs["y"], 6.0 * objs["a"], mask=bad, subpix=3)
    else:
        objs = sep.extract(sub, thresh, err=rms, mask=bad, minarea=minarea)
    if len(objs) == 0:
        return np.zeros(0, dtype=MEASURED_DTYPE)
    # subpix 3 (not 5): half the cost, half-light radii within 0.5 % -- it only sizes the window
    r_half, _ = sep.flux_radius(sub, objs["x"], objs["y"], 6.0 * objs["a"], 0.5,
                                normflux=objs["flux"], subpix=3)
    sig = 2.0 * np.clip(r_half, 0.5, None) / 2.3548
    # subpix=0: exact pixel/aperture overlap, twice as fast as the default 11 and closer to exact
    x, y, flag = sep.winpos(sub, objs["x"], objs["y"], sig, mask=bad, subpix=0)
    # A masked pixel in the window is fine (the mask excludes it); a window
    # cut by the image edge, all masked, or non-positive is not.
    fatal = sep.APER_TRUNC | sep.APER_ALLMASKED | sep.APER_NONPOSITIVE
    ok = ((flag & fatal) == 0) & np.isfinite(x) & np.isfinite(y) & (objs["flux"] > 0)
    ok &= (np.abs(x - objs["x"]) < 2.0) & (np.abs(y - objs["y"]) < 2.0)
    out = np.zeros(int(ok.sum()), dtype=MEASURED_DTYPE)
    out["x"], out["y"], out["flux"] = x[ok], y[ok], objs["flux"][ok]
    # Centroid error per axis for a background-limited source: the PSF sigma over
    # the S/N within an effective area 4 pi sigma^2, with a small floor.
    snr = objs["flux"][ok] / (rms * np.sqrt(4.0 * np.pi) * sig[ok])
    out["pos_err"] = np.hypot(sig[ok] / np.maximum(snr, 1e-3), POSITION_ERROR_FLOOR)
    if guesses is not None:
        out = out[snr >= thresh]
    return out[np.argsort(-out["flux"], kind="stable")]
