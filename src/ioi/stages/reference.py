"""Reference-pixel subtraction (SPEC 2.1).

The HAWAII-2RG has a border of ``border`` (4) never-illuminated reference
pixels on every side.  Their level tracks the bias of each output amplifier
(and, within an output, of even and odd columns) and its drift during the
read, so subtracting it removes those offsets from the science pixels.

Axis order: ``(ny, nx)`` for one read, ``(nreads, ny, nx)`` for a ramp;
``y`` is the row, ``x`` the column.  All methods work on any frame size whose
width splits into ``noutputs`` sections of an even number of columns (the
simulator also makes 256x256 and 512x512 frames).

Reference pixels used (``b`` = border, the outermost row/column skipped as
unreliable, as in the original):

* rows ``1 .. b-1`` at the bottom and ``ny-b .. ny-2`` at the top
  (1-3 and 2044-2046 for a 2048-row frame), over every column;
* for COLUMN, columns ``1 .. b-1`` and ``nx-b .. nx-2`` (1-3 and 2044-2046),
  over every row.  The original took columns 2044-2045 only (a slice ending
  one column short); we use all three.
"""

from __future__ import annotations

import logging

import numpy as np

from ioi.errors import ConfigError, ExitCode, InputError, StageError

log = logging.getLogger(__name__)

REFERENCE_METHODS = ("TRIM", "CONSTANT", "CONSTANTOFF", "RAMP", "COLUMN", "FULL")
ALLOWED_NOUTPUTS = (1, 4, 32)

#: COLUMN smoothing: Gaussian kernel exp(-dy^2 / COLUMN_KERNEL_SCALE) over
#: |dy| <= COLUMN_KERNEL_HALF_WIDTH rows (sigma = sqrt(50) ~ 7.1 rows).
COLUMN_KERNEL_SCALE = 100.0
COLUMN_KERNEL_HALF_WIDTH = 100


def _check_method(method) -> str:
    name = str(method).strip().upper()
    if name not in REFERENCE_METHODS:
        raise ConfigError(
            f"unknown reference subtraction method {method!r}; "
            f"allowed: {', '.join(REFERENCE_METHODS)}",
            exit_code=ExitCode.UNKNOWN_REFERENCE_METHOD,
        )
    return name


def output_sections(nx: int, noutputs) -> list[slice]:
    """The column ranges read by each output amplifier.

    Parameters
    ----------
    nx : int
        Full width of the raw frame (reference columns included).
    noutputs : int
        Header NOUTPUTS: 1, 4 or 32.

    Returns
    -------
    list of slice
        ``noutputs`` slices of ``nx // noutputs`` columns each, left to right.

    Raises
    ------
    IoiError (exit code 4, NO_NOUTPUTS)
        ``noutputs`` missing or not 1, 4 or 32, or it does not split ``nx``
        into sections of an even number of columns (needed for the even/odd
        column offsets).
    """
    try:
        n = int(noutputs)
        ok = n == noutputs and n in ALLOWED_NOUTPUTS
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(
            f"NOUTPUTS={noutputs!r} is not one of {ALLOWED_NOUTPUTS}",
            exit_code=ExitCode.NO_NOUTPUTS,
        )
    if nx % (2 * n) != 0:
        raise InputError(
            f"NOUTPUTS={n} does not split a frame {nx} columns wide into "
            f"sections of an even number of columns",
            exit_code=ExitCode.NO_NOUTPUTS,
        )
    width = nx // n
    return [slice(k * width, (k + 1) * width) for k in range(n)]


def strip_border(array, *, border: int = 4, copy: bool = True) -> np.ndarray:
    """Remove the reference border: ``(..., ny, nx) -> (..., ny-2b, nx-2b)``.

    A copy by default; ``copy=False`` returns a view of ``array`` (no time or
    memory spent), for a caller that neither writes into the result nor
    needs the full array released.
    """
    array = np.asarray(array)
    if border < 0 or array.ndim < 2:
        raise StageError(f"cannot strip a border of {border} from an array of shape {array.shape}")
    ny, nx = array.shape[-2:]
    if ny <= 2 * border or nx <= 2 * border:
        raise StageError(f"array of shape {array.shape} is too small to strip a {border}-pixel border")
    view = array[..., border : ny - border, border : nx - border]
    return view.copy() if copy else view


def _reference_rows(ny: int, border: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the bottom and top reference rows used (outermost skipped)."""
    bottom = np.arange(1, border)
    top = np.arange(ny - border, ny - 1)
    return bottom, top


def _section_parity_means(rows: np.ndarray, nsect: int) -> np.ndarray:
    """Mean of ``rows`` (nreads, nrows, nx) per section and column parity.

    Returns float64 (nreads, nsect, 2); the last axis is (even, odd) column.
    Sections are an even number of columns wide, so the parity inside a
    section is the parity of the frame column.
    """
    nreads, nrows, nx = rows.shape
    r = rows.reshape(nreads, nrows, nsect, nx // (2 * nsect), 2)
    return r.mean(axis=(1, 3), dtype=np.float64)


def subtract_reference(reads, *, method: str = "RAMP", noutputs: int = 32, border: int = 4,
                       out: np.ndarray | None = None) -> np.ndarray:
    """Subtract the reference-pixel level from raw reads.

    Parameters
    ----------
    reads : array_like, (ny, nx) or (nreads, ny, nx)
        Raw reads in ADU, the reference border still present.
    method : str
        One of :data:`REFERENCE_METHODS` (case-insensitive):

        ``TRIM``
            No subtraction (the caller strips the border).
        ``CONSTANT``
            One mean of the reference rows, over the full width, subtracted
            everywhere (per read).
        ``CONSTANTOFF``
            Per output section and column parity, the mean of the reference
            rows subtracted from that section's columns of that parity.
        ``RAMP`` (default)
            Per section and parity, the bottom-row mean and the top-row mean
            define a straight line in row number, evaluated at each row and
            subtracted.  The two points are placed at the TRUE centres of the
            reference rows used, row ``b/2`` (2) and row ``ny-1-b/2``
            (``ny-3``, 2045 for 2048 rows).  The original placed them at
            1.5 and 2055.5, which tilts the line slightly; we do not.
        ``COLUMN``
            The side reference columns are averaged per row, smoothed along
            the rows with a normalised Gaussian kernel exp(-dy^2/100)
            truncated at +-100 rows, and that per-row offset subtracted from
            every pixel of the row.  At the top and bottom edges the profile
            is mirrored with ``scipy.ndimage.convolve1d(mode='reflect')``
            (``d c b a | a b c d``: the edge row is repeated, so the edge
            value carries the same weight as its neighbours).
        ``FULL``
            RAMP, then COLUMN on the result.
    noutputs : int
        Header NOUTPUTS (1, 4 or 32): the number of equal vertical sections.
    border : int
        Width of the reference border (4 for the HAWAII-2RG); at least 2
        unless ``method`` is TRIM.
    out : ndarray, float32, C-contiguous, same shape as ``reads``, optional
        Where to write the result, e.g. ``reads`` itself when the caller has
        no further use for the raw values (saves a new array the size of the
        ramp).  By default a new array; ``reads`` is never changed.

    Returns
    -------
    ndarray, float32, same shape as ``reads``
        Reference-corrected reads (``out`` when given), border still present.
        Means are accumulated in float64.

    Raises
    ------
    IoiError
        exit code 5 for an unknown method (the message lists the allowed
        ones), exit code 4 for a bad ``noutputs``.
    """
    name = _check_method(method)
    data = np.asarray(reads)
    if data.ndim not in (2, 3):
        raise StageError(f"reads must be (ny, nx) or (nreads, ny, nx), got shape {data.shape}")
    single = data.ndim == 2
    src = data[np.newaxis] if single else data
    if src.dtype != np.float32:
        src = src.astype(np.float32)  # the means are taken over the float32 values
    nreads, ny, nx = src.shape
    sections = output_sections(nx, noutputs)
    nsect = len(sections)
    if name != "TRIM" and (border < 2 or ny <= 2 * border or nx <= 2 * border):
        raise StageError(
            f"reference method {name} needs a border of at least 2 pixels inside the "
            f"frame; got border={border} for shape {data.shape}"
        )

    # Each method writes src - offset into the result in one pass (no copy
    # first); the offsets are measured before anything is written, so ``out``
    # may be ``reads``.
    if out is None:
        cube = np.empty(src.shape, dtype=np.float32)
    else:
        if not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == data.shape
                and out.flags.c_contiguous and out.flags.writeable):
            raise StageError(f"out must be a writeable C-contiguous float32 array of shape {data.shape}, got "
                             f"{getattr(out, 'dtype', type(out))} {getattr(out, 'shape', '')}")
        cube = out[np.newaxis] if single else out
    if name == "CONSTANT":
        bottom, top = _reference_rows(ny, border)
        level = src[:, np.concatenate([bottom, top]), :].mean(axis=(1, 2), dtype=np.float64)
        np.subtract(src, level.astype(np.float32)[:, None, None], out=cube)
    elif name == "CONSTANTOFF":
        bottom, top = _reference_rows(ny, border)
        off = _section_parity_means(src[:, np.concatenate([bottom, top]), :], nsect)  # (nreads, nsect, 2)
        _subtract_section_parity(src, off.astype(np.float32)[:, None, :, :], nsect, cube)
    elif name in ("RAMP", "FULL"):
        _subtract_ramp(src, nsect, border, cube)
    else:  # TRIM, COLUMN
        np.copyto(cube, src)
    if name in ("COLUMN", "FULL"):
        _subtract_column(cube, border)
    log.debug("reference subtraction %s on %d read(s) of %dx%d, %d outputs", name, nreads, ny, nx, nsect)
    return out if out is not None else (cube[0] if single else cube)


def _subtract_section_parity(src: np.ndarray, offset: np.ndarray, nsect: int, out: np.ndarray) -> None:
    """``out = src - offset`` with ``offset`` (nreads, ny or 1, nsect, 2) float32 per
    section and column parity, broadcast over the columns of each.

    One subtraction per parity: its innermost axis is the section's columns of
    that parity (a broadcast over a last axis of length 2 would make numpy's
    inner loop 2 elements long, 2-3 times slower).
    """
    nreads, ny, nx = src.shape
    shape5 = (nreads, ny, nsect, nx // (2 * nsect), 2)
    s5, o5 = src.reshape(shape5), out.reshape(shape5)
    for parity in (0, 1):
        np.subtract(s5[..., parity], offset[:, :, :, None, parity], out=o5[..., parity])


def _subtract_ramp(src: np.ndarray, nsect: int, border: int, out: np.ndarray) -> None:
    """RAMP: ``out = src - offset`` for float32 cubes (nreads, ny, nx)."""
    ny = src.shape[1]
    bottom, top = _reference_rows(ny, border)
    low = _section_parity_means(src[:, bottom, :], nsect)  # (nreads, nsect, 2)
    high = _section_parity_means(src[:, top, :], nsect)
    y_low, y_high = bottom.mean(), top.mean()  # true centres: b/2 and ny-1-b/2
    slope = (high - low) / (y_high - y_low)
    dy = np.arange(ny, dtype=np.float64) - y_low
    # offset(read, row, section, parity), (nreads, ny, nsect, 2): small, float64
    offset = low[:, None, :, :] + slope[:, None, :, :] * dy[None, :, None, None]
    _subtract_section_parity(src, offset.astype(np.float32), nsect, out)


def _column_kernel() -> np.ndarray:
    dy = np.arange(-COLUMN_KERNEL_HALF_WIDTH, COLUMN_KERNEL_HALF_WIDTH + 1, dtype=np.float64)
    kernel = np.exp(-(dy**2) / COLUMN_KERNEL_SCALE)
    return kernel / kernel.sum()


def _subtract_column(cube: np.ndarray, border: int) -> None:
    """COLUMN in place on a private float32 cube (nreads, ny, nx)."""
    from scipy import ndimage  # deferred: 0.3 s to import, and only COLUMN needs it

    nx = cube.shape[2]
    cols = np.concatenate([np.arange(1, border), np.arange(nx - border, nx - 1)])
    per_row = cube[:, :, cols].mean(axis=2, dtype=np.float64)  # (nreads, ny)
    # scipy's convolve1d does the mirrored-edge Gaussian smoothing along rows;
    # 'reflect' keeps working when the kernel is longer than the profile.
    smooth = ndimage.convolve1d(per_row, _column_kernel(), axis=1, mode="reflect")
    cube -= smooth.astype(np.float32)[:, :, None]


def estimate_read_noise(difference, *, border: int = 4) -> float:
    """Read noise per read (ADU) from the reference pixels of a read difference.

    Parameters
    ----------
    difference : array_like, (ny, nx)
        Difference of two reference-corrected reads, border still present.
    border : int
        Reference border width.

    Returns
    -------
    float
        ``1.4826 * MAD / sqrt(2)`` of the reference pixels used for the
        correction (rows ``1..b-1`` and ``ny-b..ny-2`` and columns ``1..b-1``
        and ``nx-b..nx-2``; the outermost row and column skipped).  Reference
        pixels see no light, so their difference holds read noise only; the
        MAD makes it robust to a few hot pixels, and sqrt(2) converts the
        noise of a difference into the noise of one read.
    """
    diff = np.asarray(difference)
    _check_reference_frame(diff.shape, border, "estimate_read_noise")
    values = np.concatenate([p.ravel() for p in _reference_parts(diff, border)]).astype(np.float64)
    return _read_noise_of(values)


def read_noise_of_reads(earlier, later, *, border: int = 4) -> float:
    """:func:`estimate_read_noise` of ``later - earlier`` (two reference-corrected reads,
    border still present), the difference taken over the reference pixels only (no
    frame-sized difference is made).  Same float32 differences, same result."""
    a, b = np.asarray(earlier), np.asarray(later)
    if a.shape != b.shape:
        raise StageError(f"read_noise_of_reads: reads of shapes {a.shape} and {b.shape}")
    _check_reference_frame(a.shape, border, "read_noise_of_reads")
    values = np.concatenate([np.subtract(pb, pa).ravel()
                             for pa, pb in zip(_reference_parts(a, border), _reference_parts(b, border))])
    return _read_noise_of(values.astype(np.float64))


def _check_reference_frame(shape, border: int, what: str) -> None:
    if len(shape) != 2 or border < 2 or min(shape) <= 2 * border:
        raise StageError(f"{what} needs a (ny, nx) frame with a border of {border}; got {tuple(shape)}")


def _reference_parts(frame: np.ndarray, border: int) -> list:
    """The reference pixels of ``frame`` used for the correction, each once, as views (no
    full-frame mask or copy): the reference rows over every column but the outermost,
    then the reference columns over the rows in between."""
    ny, nx = frame.shape
    bottom, top = _reference_rows(ny, border)
    return [frame[bottom, 1:-1], frame[top, 1:-1],
            frame[border : ny - border, 1:border], frame[border : ny - border, nx - border : nx - 1]]


def _read_noise_of(values: np.ndarray) -> float:
    """``1.4826 * MAD / sqrt(2)`` of the finite ``values`` (float64 read differences)."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise StageError("no finite reference pixels to estimate the read noise from")
    mad = np.median(np.abs(values - np.median(values)))
    return float(1.4826 * mad / np.sqrt(2.0))
