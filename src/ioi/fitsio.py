"""FITS input and output: the only module that touches FITS files on disk.

Raw IO:I reads are uint16 stored as int16 with BZERO = 32768.  astropy refuses
to memory-map scaled images, so raw data are read unscaled through a memory
map and converted to float32 here (FIELD_NOTES: 3-5 ms a read).  Inputs are
always opened read-only.  Products are written to a temporary name in the
destination directory and renamed into place, so an interrupted run never
leaves a half-written product.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

from ioi.errors import ExitCode, InputError, IoiError

log = logging.getLogger(__name__)


def _open(path, what="FITS file"):
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}", exit_code=ExitCode.BAD_INPUT)
    try:
        return fits.open(path, mode="readonly", memmap=True, do_not_scale_image_data=True)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"cannot read {what} {path}: {exc}") from None


def read_header(path, *, hdu=0) -> fits.Header:
    """The header of one HDU, without reading pixel data."""
    path = Path(path)
    try:
        return fits.getheader(path, hdu)
    except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise InputError(f"cannot read FITS header of {path}: {exc}") from None


def _to_float32(hdu, out=None) -> np.ndarray:
    """Scale a (possibly BZERO/BSCALE-scaled) image HDU to native float32 (into ``out`` if given)."""
    raw = hdu.data
    if raw is None:
        raise ValueError("HDU holds no image data")
    hdr = hdu.header
    bzero = float(hdr.get("BZERO", 0.0))
    bscale = float(hdr.get("BSCALE", 1.0))
    if out is not None and out.shape == raw.shape:
        np.copyto(out, raw, casting="unsafe")  # also converts big-endian to native
        data = out
    else:
        data = np.asarray(raw, dtype=np.float32)  # also converts big-endian to native
    if bscale != 1.0:
        data *= np.float32(bscale)
    if bzero != 0.0:
        data += np.float32(bzero)
    return data


def read_raw(path, out=None) -> tuple[np.ndarray, fits.Header]:
    """Read one raw read: ``(data float32 (ny, nx), header)``.

    Values are the ADC counts 0..65535 (BZERO applied here).  ``out``: a
    float32 array of the image's shape to read into (e.g. a plane of a cube);
    a different shape is ignored (a new array is returned, for the caller to
    report).

    A plain 2-D integer or float primary image (what detectors write) is read
    straight from the file: astropy parses the header (``Header.fromfile``
    leaves the file at the first data byte) and the pixels are converted in
    row chunks into ``out`` -- no memory map to fault in and unmap, no
    HDUList; 3x faster per read.  Anything else goes through astropy.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"raw file not found: {path}", exit_code=ExitCode.BAD_INPUT)
    data = header = None
    try:
        with open(path, "rb") as f:
            header = fits.Header.fromfile(f)
            data = _read_primary_image(f, header, out)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InputError(f"cannot read raw file {path}: {exc}") from None
    if data is None:  # not a plain primary image: astropy reads it
        with _open(path, "raw file") as hdul:
            try:
                hdu = hdul[0]
                data = _to_float32(hdu, out)
            except (ValueError, TypeError, OSError) as exc:
                raise InputError(f"cannot read image data of {path}: {exc}") from None
            if data.ndim != 2:
                raise InputError(f"raw file {path} is not a 2-D image (shape {data.shape})")
            header = hdu.header.copy()
    for key in ("BZERO", "BSCALE"):
        header.remove(key, ignore_missing=True)
    return data, header


_BITPIX = {8: ">u1", 16: ">i2", 32: ">i4", -32: ">f4", -64: ">f8"}
_RAW_CHUNK = 1 << 20  # bytes of pixels read and converted at a time


def _read_primary_image(f, header, out):
    """The pixels of a plain 2-D primary image whose header was just read from ``f``,
    as float32 (into ``out`` when it has the image's shape); None for anything else
    (extensions, groups, other dimensions: the caller uses astropy)."""
    if not header.get("SIMPLE", False) or header.get("GROUPS", False) or header.get("NAXIS") != 2:
        return None
    dtype = _BITPIX.get(header.get("BITPIX"))
    if dtype is None:
        return None
    dtype = np.dtype(dtype)
    shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
    bscale = float(header.get("BSCALE", 1.0))
    bzero = float(header.get("BZERO", 0.0))
    if out is None or out.shape != shape or out.dtype != np.float32:
        out = np.empty(shape, dtype=np.float32)
    rows = max(1, _RAW_CHUNK // max(1, shape[1] * dtype.itemsize))
    buf = np.empty(min(rows, shape[0]) * shape[1] * dtype.itemsize, dtype=np.uint8)
    for r in range(0, shape[0], rows):
        n = min(rows, shape[0] - r)
        nbytes = n * shape[1] * dtype.itemsize
        if f.readinto(memoryview(buf)[:nbytes]) != nbytes:
            raise ValueError(f"file ends inside the image data (expected {shape[0] * shape[1]} pixels)")
        raw = buf[:nbytes].view(dtype).reshape(n, shape[1])
        block = out[r:r + n]
        if bscale != 1.0:
            np.multiply(raw, np.float32(bscale), out=block, casting="unsafe")
            if bzero != 0.0:
                block += np.float32(bzero)
        elif bzero != 0.0:  # one pass: the byte swap and conversion inside the addition's loop
            np.add(raw, np.float32(bzero), out=block, casting="unsafe")
        else:
            np.copyto(block, raw, casting="unsafe")
    return out


def read_image(path, *, hdu=0, what="image") -> tuple[np.ndarray, fits.Header]:
    """Read one image HDU (by index or EXTNAME) as native float32 with its header.

    With the default ``hdu=0`` and an empty primary HDU (image in an
    extension, as many tools write), the first HDU holding an image is read.
    """
    path = Path(path)
    with _open(path, what) as hdul:
        try:
            h = hdul[hdu]
        except (KeyError, IndexError):
            raise InputError(f"{what} {path} has no HDU {hdu!r}") from None
        if hdu == 0 and h.data is None:
            h = next((x for x in hdul[1:] if getattr(x, "data", None) is not None and x.is_image), h)
        try:
            data = _to_float32(h)
        except (ValueError, TypeError, OSError) as exc:
            raise InputError(f"cannot read {what} {path} HDU {hdu!r}: {exc}") from None
        header = h.header.copy()
    return data, header


def read_cube(path, *, what="multi-extension file") -> np.ndarray:
    """Read every image HDU of a multi-extension file, stacked: float32 (nhdu, ny, nx).

    Used for linearity coefficients (HDU i = order-i coefficient image).
    Each plane is converted straight into the cube (no stacked copy).
    """
    path = Path(path)
    with _open(path, what) as hdul:
        images = []
        for i, h in enumerate(hdul):
            try:
                if h.data is None:
                    continue
            except (ValueError, TypeError, OSError) as exc:
                raise InputError(f"cannot read {what} {path} HDU {i}: {exc}") from None
            images.append((i, h))
        if not images:
            raise InputError(f"{what} {path} holds no image data")
        shapes = {h.data.shape for _, h in images}
        if len(shapes) != 1:
            raise InputError(f"{what} {path} has HDUs of different shapes {sorted(shapes)}")
        cube = np.empty((len(images),) + shapes.pop(), dtype=np.float32)
        for k, (i, h) in enumerate(images):
            try:
                _to_float32(h, out=cube[k])
            except (ValueError, TypeError, OSError) as exc:
                raise InputError(f"cannot read {what} {path} HDU {i}: {exc}") from None
    return cube


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


class PendingFile:
    """A product written under a temporary name in its directory, not yet in place:
    :meth:`commit` renames it to ``path`` (atomic), :meth:`discard` removes it."""

    def __init__(self, tmp, path):
        self.tmp, self.path = Path(tmp), Path(path)

    def commit(self, set_aside: list | None = None) -> Path:
        """Rename the file into place and return its path.

        ``set_aside``: a list; a file already at ``path`` is first renamed to a hidden
        name beside it and appended to the list, for the caller to delete later
        (:func:`remove_files`).  Renaming a new file over a large old one makes the
        file system free the old one inside the rename (and ext4 flush the new
        one first): 60-120 ms for a 96 MB product on the benchmark machine,
        against 0.1 ms when nothing is replaced.  Between the two renames the
        product is briefly absent; it is never partly written.
        """
        if set_aside is not None:
            old = self.tmp.with_name(self.tmp.name.removesuffix(".tmp") + ".old")  # unique as tmp is
            try:
                os.rename(self.path, old)
            except FileNotFoundError:
                pass
            else:
                set_aside.append(old)
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


def remove_files(paths) -> threading.Thread:
    """Delete ``paths`` (missing ones ignored) on a thread, started and returned; join it
    before the process ends.  Deleting a large file costs the kernel tens of ms, which
    need not wait in line with the work that follows."""
    paths = list(paths)

    def run():
        for p in paths:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not remove %s: %s", p, exc)

    thread = threading.Thread(target=run, name="ioi-remove", daemon=False)
    thread.start()
    return thread


# Products are written by our own writer, not by HDUList.writeto: for each image
# astropy makes a full-size byte-swapped copy of the data (for unsigned integers an
# offset copy), a 16 MB temporary per 2040x2040 plane which, under the fixed mmap
# threshold of ioi._memory, is a fresh mapping the kernel must zero.  astropy still
# fixes and formats the headers; the data go to the file in row chunks through one
# small big-endian buffer, and the caller's arrays are only read.  The output is
# byte for byte what writeto writes (tests/test_fitsio_stream.py); anything other
# than plain images (tables, compressed or rescaled images, checksums) goes to writeto.

_BLOCK = 2880  # FITS block size: headers and data are padded to a multiple of it
_CHUNK_BYTES = 1 << 20  # the conversion buffer: 128 rows of a 2040-pixel float32 image
_STREAMED = frozenset({"float32", "float64", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"})


def _pseudo_unsigned(dtype) -> bool:
    """uint16/32/64: stored as signed integers with BZERO = 2**(bits-1) (FITS convention)."""
    return dtype.kind == "u" and dtype.itemsize > 1


def _prepare_streamed(hdul) -> bool:
    """Complete the headers of ``hdul`` as ``writeto`` does before writing them, and say
    whether :func:`_write_streamed` reproduces writeto's output for every HDU: an
    in-memory PrimaryHDU then ImageHDUs, holding no data or a plain numpy array of a
    dtype in ``_STREAMED``, not rescaled on writing."""
    if len(hdul) == 0:
        return False  # writeto warns and writes nothing
    hdul.verify("silentfix")  # what writeto does first (with our output_verify) ...
    hdul.update_extend()  # ... then this
    for i, hdu in enumerate(hdul):
        if type(hdu) is not (fits.PrimaryHDU if i == 0 else fits.ImageHDU):
            return False
        # writeto rescales data read from a file, or given with scale_back=True, before
        # writing (no public API says whether it will: the attributes it tests)
        if hdu.fileinfo() is not None or getattr(hdu, "_scale_back", False) \
                or getattr(hdu, "_data_needs_rescale", False):
            return False
        hdu.update_header()  # as writeto does for each HDU just before writing it
        data = hdu.data
        if data is None:
            continue
        if type(data) is not np.ndarray or data.dtype.name not in _STREAMED:
            return False
        # only astropy's own scaling keywords: BZERO for unsigned data, none otherwise
        bzero = 1 << (8 * data.dtype.itemsize - 1) if _pseudo_unsigned(data.dtype) else 0
        header = hdu.header
        if header.get("BSCALE", 1) != 1 or header.get("BZERO", 0) != bzero:
            return False
    return True


def _row_chunks(array, max_bytes):
    """Consecutive pieces of ``array`` of at most ``max_bytes``, in C order: slices of
    whole rows of the first axis, or of each sub-array when one row is larger."""
    if array.nbytes <= max_bytes:
        yield array
        return
    row_bytes = array.nbytes // len(array)
    if row_bytes > max_bytes:
        for sub in array:
            yield from _row_chunks(sub, max_bytes)
        return
    step = max_bytes // row_bytes
    for start in range(0, len(array), step):
        yield array[start:start + step]


class _Sink:
    """Bytes to a file through one buffer: headers are copied in, image data are
    converted straight into it (:meth:`put_items`), and ``write`` receives each full
    buffer (a partial one at :meth:`close`).  ``pos`` is always a multiple of the
    item size being written: headers and padded data are multiples of 2880 bytes."""

    def __init__(self, write, buffer: np.ndarray):
        self._write, self.buf = write, buffer
        self.pos = 0  # bytes of buf filled
        self.total = 0  # bytes handed to write so far

    def flush(self) -> None:
        if self.pos:
            self._write(self.buf[:self.pos])
            self.total += self.pos
            self.pos = 0

    def put_bytes(self, data: bytes) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            n = min(len(view), self.buf.size - self.pos)
            self.buf[self.pos:self.pos + n] = np.frombuffer(view[:n], np.uint8)
            self.pos += n
            view = view[n:]
            if self.pos == self.buf.size:
                self.flush()

    def put_items(self, flat: np.ndarray, stored, sign=None) -> None:
        """The 1-d array ``flat`` as items of dtype ``stored`` (big-endian), with the
        top bit of each item flipped where ``sign`` (a native item) is given."""
        size = stored.itemsize
        i = 0
        while i < flat.size:
            n = min(flat.size - i, (self.buf.size - self.pos) // size)
            if n == 0:
                self.flush()
                continue
            raw = self.buf[self.pos:self.pos + n * size]
            np.copyto(raw.view(stored), flat[i:i + n])  # the byte swap
            if sign is not None:
                items = raw.view(sign.dtype)
                np.bitwise_xor(items, sign, out=items)
            self.pos += n * size
            i += n
            if self.pos == self.buf.size:
                self.flush()

    def close(self) -> None:
        self.flush()


def _write_streamed(fh, hdul) -> None:
    """Write the HDUs accepted by :func:`_prepare_streamed` to ``fh``: an open binary
    file (through a buffer of ``_CHUNK_BYTES``) or a :class:`_Sink`."""
    sink = fh if isinstance(fh, _Sink) else _Sink(fh.write, np.empty(max(8, _CHUNK_BYTES), np.uint8))
    for hdu in hdul:
        sink.put_bytes(hdu.header.tostring().encode("ascii"))  # padded to 2880 with END
        data = hdu.data
        if data is None or data.size == 0:
            continue
        big_endian = data.dtype.newbyteorder(">")
        sign = None
        if _pseudo_unsigned(data.dtype):
            # stored value = value - 2**(bits-1), i.e. the top bit flipped: in big-endian
            # bytes, the top bit of each item's first byte; ``sign`` is that bit pattern
            # read as a native unsigned integer, to flip it with one XOR over whole items
            sign = np.frombuffer(b"\x80".ljust(data.dtype.itemsize, b"\0"), dtype=data.dtype.newbyteorder("="))[0]
        if data.flags.c_contiguous:
            sink.put_items(data.reshape(-1), big_endian, sign)
        else:  # a view: converted a few rows at a time (no full-size copy)
            for chunk in _row_chunks(data, _CHUNK_BYTES):
                sink.put_items(np.ascontiguousarray(chunk).reshape(-1), big_endian, sign)
        sink.put_bytes(bytes(-data.nbytes % _BLOCK))  # zero padding to the block size
    if sink is not fh:
        sink.close()  # a sink given is finished by its owner


# Direct I/O (Linux O_DIRECT): the products bypass the page cache.  A buffered write
# copies every byte into page-cache pages the kernel must first find (and, on a
# virtual machine whose host has taken back the guest's free memory, fault in from
# the host): on the benchmark machine (a 2-core AMD EPYC virtual machine, 2026-12-04)
# `dd` of 763 MB took 0.2-2.3 s of system CPU, against 0.05 s with O_DIRECT, whose
# wait for the disk (0.35-0.44 s there) costs no CPU.  The
# data go out in aligned blocks from an aligned buffer; the last block is padded and
# the file truncated to its length.  Where the file system refuses O_DIRECT (EINVAL),
# or IOI_DIRECT_IO=0, the file is written through the page cache as before.  No
# maintained FITS library writes with O_DIRECT.
_DIRECT_ALIGN = 4096  # the largest logical block size of common disks
_DIRECT_BYTES = 4 << 20  # bytes per direct write
_DIRECT_BUFFERS = threading.local()  # one aligned buffer per writing thread, reused


# A direct write waits for the disk, where a buffered one returns once the bytes are
# in the page cache: on a slow disk (a spinning one: 150 MB/s, or a busy network file
# system) the products would then hold the reduction up.  The process therefore keeps
# the rate of its direct writes, and once _DIRECT_PROBE_BYTES have gone out at less
# than _DIRECT_MIN_RATE, writes the rest through the page cache.  (The benchmark
# machine's disk takes 1.9 GB/s, measured by dd; at the rate below an L1 product of a
# full frame takes ~0.17 s to write, about what the page cache's copy cost there.)
_DIRECT_MIN_RATE = 500e6  # bytes a second
_DIRECT_PROBE_BYTES = 64 << 20


class _DirectRate:
    """Bytes and seconds of this process's direct writes (every writing thread's)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.bytes = 0
        self.seconds = 0.0
        self.slow = False

    def add(self, nbytes: int, seconds: float) -> None:
        with self.lock:
            self.bytes += nbytes
            self.seconds += seconds
            if not self.slow and self.bytes >= _DIRECT_PROBE_BYTES and self.bytes < _DIRECT_MIN_RATE * self.seconds:
                self.slow = True
                log.info("direct writes at %.0f MB/s: the products go through the page cache from now on",
                         self.bytes / self.seconds / 1e6)


_DIRECT_RATE = _DirectRate()


def _direct_io_wanted() -> bool:
    return (hasattr(os, "O_DIRECT") and not _DIRECT_RATE.slow
            and os.environ.get("IOI_DIRECT_IO", "1").strip() not in ("0", "no", "false"))


class _DirectFile:
    """Writes whole aligned blocks to ``fd`` (opened with O_DIRECT) from an aligned
    buffer; :meth:`finish` pads the last block, then truncates the file to the bytes
    given.  If the kernel refuses a direct write (EINVAL), O_DIRECT is switched off
    on the descriptor and the rest is written through the page cache."""

    def __init__(self, fd: int):
        self.fd = fd
        buf = getattr(_DIRECT_BUFFERS, "buf", None)
        if buf is None or buf.size != _DIRECT_BYTES:
            import mmap  # an anonymous mapping is page aligned

            buf = _DIRECT_BUFFERS.buf = np.frombuffer(mmap.mmap(-1, _DIRECT_BYTES), np.uint8)
        self.sink = _Sink(self._write, buf)

    def _write(self, block: np.ndarray) -> None:
        view = memoryview(block)
        while len(view):
            t0 = time.perf_counter()
            try:
                n = os.write(self.fd, view)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self._buffered():
                    raise
                continue
            _DIRECT_RATE.add(n, time.perf_counter() - t0)
            view = view[n:]

    def _buffered(self) -> bool:
        """Switch O_DIRECT off; False if it was not on."""
        import fcntl  # POSIX only, as O_DIRECT is

        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        if not flags & os.O_DIRECT:
            return False
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        return True

    def finish(self) -> None:
        sink = self.sink
        length = sink.total + sink.pos
        pad = -sink.pos % _DIRECT_ALIGN
        sink.buf[sink.pos:sink.pos + pad] = 0
        sink.pos += pad
        sink.flush()
        if pad:
            os.ftruncate(self.fd, length)


def _write_streamed_to(path, hdul) -> None:
    """:func:`_write_streamed` into the file at ``path`` (created, empty), with direct
    I/O where the system allows it."""
    fd = -1
    if _direct_io_wanted():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    if fd < 0:
        with open(path, "wb") as fh:
            _write_streamed(fh, hdul)
        return
    try:
        direct = _DirectFile(fd)
        _write_streamed(direct.sink, hdul)
        direct.finish()
    finally:
        os.close(fd)


def write_fits_atomic(path, hdul: fits.HDUList, *, overwrite: bool = False, pending: bool = False,
                      checksum: bool = False):
    """Write ``hdul`` to ``path`` through a temporary file in the same directory.

    The rename is atomic on POSIX file systems, so readers see either no file
    or the complete one.  ``overwrite=False`` and an existing file: IoiError.
    ``pending=True``: leave the file under its temporary name and return a
    :class:`PendingFile` (the caller commits or discards it).  ``checksum``:
    add CHECKSUM/DATASUM cards.  The file is what ``hdul.writeto(...,
    output_verify="silentfix")`` writes, and the headers of ``hdul`` are
    completed as writeto completes them; plain images are written by our own
    writer, which only reads their arrays (writeto byte-swaps writeable ones
    in place and back).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise IoiError(f"output file exists (use overwrite/clobber): {path}", exit_code=ExitCode.BAD_INPUT)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # mkstemp makes the file private (0600); a product gets the usual mode under the umask
        os.chmod(tmp, 0o666 & ~_UMASK)
        if not checksum and _prepare_streamed(hdul):
            _write_streamed_to(tmp, hdul)
        else:
            hdul.writeto(tmp, overwrite=True, output_verify="silentfix", checksum=checksum)
        written = PendingFile(tmp, path)
        return written if pending else written.commit()
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_image(path, data, header=None, *, overwrite: bool = False) -> Path:
    """Write one float image as a primary HDU, atomically."""
    hdu = fits.PrimaryHDU(np.asarray(data), header=header)
    return write_fits_atomic(path, fits.HDUList([hdu]), overwrite=overwrite)


def write_cube(path, planes, *, header=None, overwrite: bool = False) -> Path:
    """Write planes (n, ny, nx) as HDU 0..n-1 (the original's coefficient-file format)."""
    hdus = [fits.PrimaryHDU(np.asarray(planes[0], dtype=np.float32), header=header)]
    hdus += [fits.ImageHDU(np.asarray(p, dtype=np.float32)) for p in planes[1:]]
    return write_fits_atomic(path, fits.HDUList(hdus), overwrite=overwrite)


def _read_only(array, dtype) -> np.ndarray:
    """A read-only view (or converted copy) of ``array``: astropy byte-swaps a writeable
    little-endian array in place while writing it (and back afterwards), which would
    disturb any other thread reading the same array meanwhile; for a read-only one it
    writes a swapped copy instead."""
    view = np.asarray(array, dtype=dtype).view()
    view.flags.writeable = False
    return view


def frame_hdus(frame, extname: str, *, with_planes: bool = True) -> list:
    """Image HDUs for a :class:`~ioi.frame.Frame`: ``EXTNAME`` science, then
    ``<EXTNAME>_VAR`` (variance) and ``<EXTNAME>_DQ`` (quality) when asked."""
    header = frame.header.copy()
    for key in ("SIMPLE", "EXTEND", "BZERO", "BSCALE", "XTENSION", "PCOUNT", "GCOUNT"):
        header.remove(key, ignore_missing=True)
    header["EXTNAME"] = extname
    hdus = [fits.ImageHDU(_read_only(frame.science, np.float32), header=header, name=extname)]
    if with_planes:
        wcs_header = wcs_cards(header)
        vh = fits.Header(wcs_header)
        vh["BUNIT"] = ("ADU2", "variance of " + extname)
        hdus.append(fits.ImageHDU(_read_only(frame.variance, np.float32), header=vh, name=f"{extname}_VAR"))
        qh = fits.Header(wcs_header)
        qh["COMMENT"] = "data-quality bit flags, see ioi.frame.DQ"
        hdus.append(fits.ImageHDU(_quality_plane(frame.quality), header=qh, name=f"{extname}_DQ"))
    return hdus


def _quality_plane(quality) -> np.ndarray:
    """The quality plane as written: read-only, uint16 when its values fit (see
    :func:`_quality_dtype`).  A C-contiguous uint32 plane on a little-endian machine
    gives a strided view of its items' low halves: no frame-sized copy (two writer
    threads converting copies held ~35 MB more at the 9-dither peak); the writer
    converts the view chunk by chunk as it writes, as fast as from a copy."""
    quality = np.asarray(quality)
    dtype = _quality_dtype(quality)
    if dtype is np.uint16 and quality.dtype == np.uint32 and quality.ndim >= 1 \
            and quality.flags.c_contiguous and sys.byteorder == "little":
        low = quality.view(np.uint16)[..., ::2]  # every value <= 0xFFFF: its low half is the value
        low.flags.writeable = False
        return low
    return _read_only(quality, dtype)


def _quality_dtype(quality):
    """uint16 for a quality plane whose values fit (every bit of :class:`ioi.frame.DQ` does):
    half the bytes of uint32 to write and store, the same values read back; else uint32."""
    quality = np.asarray(quality)
    if quality.dtype in (np.uint8, np.uint16):  # the pipeline's own planes: no pass over them
        return np.uint16
    if quality.size and (quality.dtype.kind not in "ui" or int(quality.max()) > 0xFFFF
                         or (quality.dtype.kind == "i" and int(quality.min()) < 0)):
        return np.uint32
    return np.uint16


_WCS_PREFIXES = ("CTYPE", "CRVAL", "CRPIX", "CDELT", "CUNIT", "CD1_", "CD2_", "PC1_", "PC2_")


def wcs_cards(header) -> list:
    return [card for card in header.cards if card.keyword.startswith(_WCS_PREFIXES)
            or card.keyword in ("RADESYS", "EQUINOX", "WCSAXES", "LONPOLE", "LATPOLE")]


def write_product(path, primary_header, frames_by_extname, *, overwrite=True, with_planes=True,
                  extra_hdus=(), pending=False):
    """Write a product atomically: an empty primary HDU carrying ``primary_header``,
    then one science extension per ``extname -> frame`` item (the original's
    layout, so HDU 1, 2, ... are what the original wrote), then the
    ``<EXTNAME>_VAR`` and ``<EXTNAME>_DQ`` planes of each, then ``extra_hdus``.
    Returns the path, or a :class:`PendingFile` with ``pending=True``."""
    primary = fits.PrimaryHDU(header=primary_header.copy() if primary_header is not None else None)
    for key in ("NAXIS1", "NAXIS2", "BZERO", "BSCALE"):
        primary.header.remove(key, ignore_missing=True)
    groups = [frame_hdus(frame, extname, with_planes=with_planes) for extname, frame in frames_by_extname.items()]
    hdus = [primary] + [g[0] for g in groups] + [h for g in groups for h in g[1:]] + list(extra_hdus)
    return write_fits_atomic(path, fits.HDUList(hdus), overwrite=overwrite, pending=pending)
