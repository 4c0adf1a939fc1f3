"""The streaming product writer of ioi.fitsio: byte for byte what astropy's
HDUList.writeto writes, without touching the caller's arrays."""

import io
import threading
import time

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import given, settings
from hypothesis import strategies as st

from ioi import fitsio
from ioi.frame import DQ, Frame

@pytest.fixture(autouse=True)
def _fresh_direct_rate(monkeypatch):
    """Each test starts with no direct writes measured (the rate is process-wide: slow
    writes of an earlier test would otherwise turn this one's to the page cache)."""
    monkeypatch.setattr(fitsio, "_DIRECT_RATE", fitsio._DirectRate())


DTYPES = ["float32", "float64", "int16", "int32", "uint8", "uint16", "uint32", "int64", "uint64"]


def _bits(shape, dtype, seed=0):
    """An array of ``dtype`` with uniformly random bit patterns (for floats: every
    kind of NaN, infinities, denormals and negative zero among them)."""
    dtype = np.dtype(dtype)
    raw = np.random.default_rng(seed).integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def _reference(make) -> bytes:
    """What astropy writes for the HDUList ``make()`` builds."""
    buf = io.BytesIO()
    make().writeto(buf, output_verify="silentfix")
    return buf.getvalue()


def _ours(tmp_path, make, monkeypatch) -> bytes:
    """What write_fits_atomic writes for ``make()``, with astropy's writeto made unusable
    (so that the streaming path is the one tested)."""

    def forbidden(*a, **k):
        raise AssertionError("fell back to HDUList.writeto")

    with monkeypatch.context() as m:
        m.setattr(fits.HDUList, "writeto", forbidden)
        path = fitsio.write_fits_atomic(tmp_path / "ours.fits", make(), overwrite=True)
    return path.read_bytes()


def _assert_same_file(tmp_path, make, monkeypatch):
    ref, ours = _reference(make), _ours(tmp_path, make, monkeypatch)
    assert len(ours) % 2880 == 0
    assert len(ours) == len(ref)
    assert ours == ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 13), (1, 1), (36, 20), (45, 32), (2040, 3), (3, 5, 7), (11,), (0, 4)])
def test_same_bytes_as_astropy(tmp_path, monkeypatch, dtype, shape):
    # (36, 20) float32 and (45, 32) int16: data of exactly one 2880-byte block (no padding)
    data = _bits(shape, dtype)

    def make():
        return fits.HDUList([fits.PrimaryHDU(data), fits.ImageHDU(data[::-1], name="SCI")])

    _assert_same_file(tmp_path, make, monkeypatch)


@pytest.mark.parametrize("dtype", ["float32", "uint32", "int16"])
def test_same_bytes_across_chunk_boundaries(tmp_path, monkeypatch, dtype):
    """Chunks of a few rows, rows split over chunks (a row larger than the buffer), a
    last chunk shorter than the others."""
    data = _bits((3, 29, 31), dtype, seed=3)
    for chunk_bytes in (8, 16, 124, 125, 31 * 4 * 5 + 4, 29 * 31 * 4, 10**6):
        monkeypatch.setattr(fitsio, "_CHUNK_BYTES", chunk_bytes)
        _assert_same_file(tmp_path, lambda: fits.HDUList([fits.PrimaryHDU(data)]), monkeypatch)


def test_uint32_near_the_ends_of_its_range(tmp_path, monkeypatch):
    values = np.array([0, 1, 2, 2**14, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2, 2**32 - 1], np.uint32)
    data = np.resize(values, (5, 9))

    def make():
        return fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, name="DQ")])

    _assert_same_file(tmp_path, make, monkeypatch)
    with fits.open(tmp_path / "ours.fits") as h:
        assert h["DQ"].header["BITPIX"] == 32 and h["DQ"].header["BZERO"] == 2**31
        assert h["DQ"].data.dtype == np.uint32
        np.testing.assert_array_equal(h["DQ"].data, data)


def test_nan_and_inf_are_written_bit_for_bit(tmp_path, monkeypatch):
    payloads = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF, 0xFF800000, 0x7F800000,
                         0x80000000, 0x00000001], np.uint32)
    data = np.resize(payloads, (4, 6)).view(np.float32)
    _assert_same_file(tmp_path, lambda: fits.HDUList([fits.PrimaryHDU(data)]), monkeypatch)
    with fits.open(tmp_path / "ours.fits") as h:
        np.testing.assert_array_equal(h[0].data.view(">u4").astype(np.uint32), np.resize(payloads, (4, 6)))


@pytest.mark.parametrize("view", ["strided", "transposed", "fortran", "reversed", "big-endian", "3-d slice"])
@pytest.mark.parametrize("dtype", ["float32", "uint32", "int16"])
def test_non_contiguous_input(tmp_path, monkeypatch, view, dtype):
    base = _bits((40, 50, 3), dtype, seed=7)
    data = {"strided": base[::3, 1::2, 0],
            "transposed": base[:, :, 1].T,
            "fortran": np.asfortranarray(base[:, :, 2]),
            "reversed": base[::-1, ::-2, 0],
            "big-endian": base[:, :, 0].astype(np.dtype(dtype).newbyteorder(">")),
            "3-d slice": base[5:9, ::7, :]}[view]
    assert not data.flags.c_contiguous or not data.dtype.isnative
    monkeypatch.setattr(fitsio, "_CHUNK_BYTES", 64)
    _assert_same_file(tmp_path, lambda: fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data)]), monkeypatch)


def _long_header():
    h = fits.Header()
    for i in range(120):  # several header blocks
        h[f"KEY{i}"] = (i * 1.5, f"comment number {i}")
    h["LONGSTR"] = "a long string value " * 12  # CONTINUE cards
    h["QUOTE"] = "it's quoted"
    h["FLAG"] = False
    h["NULLVAL"] = None
    h["HIERARCH ESO DET CHIP NAME"] = "Hawaii-2RG"
    for i in range(5):
        h.add_comment(f"comment card {i} " + "x" * 70)
        h.add_history(f"history card {i}")
    h.append()  # a blank card
    h["BZERO"] = 0  # no scaling, but cards present
    h["BSCALE"] = 1
    return h


@pytest.mark.parametrize("dtype", ["float32", "uint32"])
def test_long_headers(tmp_path, monkeypatch, dtype):
    data = _bits((9, 10), dtype, seed=1)

    def make():
        header = _long_header()
        return fits.HDUList([fits.PrimaryHDU(header=_long_header()), fits.ImageHDU(data, header=header),
                             fits.ImageHDU(header=_long_header())])

    _assert_same_file(tmp_path, make, monkeypatch)


def test_headers_are_completed_as_astropy_does(tmp_path, monkeypatch):
    """EXTEND added, NAXISn and BITPIX made to agree with the data (here changed after
    the HDU was made), a missing primary HDU inserted."""
    def make():
        hdu = fits.ImageHDU(np.zeros((3, 4), np.float32), name="A")
        hdu.data = np.ones((5, 2), np.uint16)
        return fits.HDUList([hdu, fits.ImageHDU(np.arange(6, dtype=np.int32).reshape(2, 3))])

    _assert_same_file(tmp_path, make, monkeypatch)


def _frame(shape, seed):
    rng = np.random.default_rng(seed)
    sci = rng.normal(100, 10, size=shape).astype(np.float32)
    sci[0, :3] = [np.nan, np.inf, -np.inf]
    var = rng.uniform(1, 2, size=shape).astype(np.float32)
    dq = rng.integers(0, 2**14, size=shape).astype(np.uint32)
    dq[1, 1] = DQ.SATURATED | DQ.DO_NOT_USE
    hdr = fits.Header({"OBJECT": "M1", "CRPIX1": 4.0, "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN",
                       "SIMPLE": True, "BZERO": 32768, "EXPTIME": 10.0})
    return Frame(sci, var, dq, hdr)


@pytest.mark.parametrize("shape", [(37, 41), (2040, 2040)])
def test_product_same_bytes_as_astropy(tmp_path, monkeypatch, shape):
    """A product from write_product, and the same product read and written again
    (the pipeline's restamping), as astropy would write them."""
    ss, nonss = _frame(shape, 1), _frame(shape, 2)
    prim = fits.Header({"L1FLAT": 1, "NAXIS": 2, "NAXIS1": shape[1], "NAXIS2": shape[0]})
    prim.add_history("written by a test")

    def product(name):
        return fitsio.write_product(tmp_path / name, prim, {"IM_SS": ss, "IM_NONSS": nonss},
                                    extra_hdus=[fits.ImageHDU(np.ones(shape, np.int16), name="EXP")])

    calls = []
    real_writeto = fits.HDUList.writeto
    monkeypatch.setattr(fits.HDUList, "writeto", lambda *a, **k: calls.append(1) or real_writeto(*a, **k))
    ours = product("ours.fits").read_bytes()
    assert calls == []  # streamed
    with monkeypatch.context() as m:
        m.setattr(fitsio, "_prepare_streamed", lambda hdul: False)  # astropy's writeto
        ref = product("ref.fits").read_bytes()
    assert calls == [1]
    assert ours == ref

    def restamped():
        with fits.open(tmp_path / "ours.fits", memmap=False) as hdul:
            return fits.HDUList([h.copy() for h in hdul])

    assert _ours(tmp_path, restamped, monkeypatch) == _reference(restamped) == ours


@pytest.mark.parametrize("direct", [False, True], ids=["page cache", "direct I/O"])
def test_input_arrays_are_never_changed(tmp_path, monkeypatch, direct):
    """Writeable native arrays (which astropy byte-swaps in place and back while writing
    them) and read-only ones: same values and flags after the write, and at every write
    to the file (what another thread reading them meanwhile would see)."""
    writeable = {dt: _bits((64, 48), dt, seed=i) for i, dt in enumerate(DTYPES)}
    read_only = {dt: a.copy() for dt, a in writeable.items()}
    for a in read_only.values():
        a.flags.writeable = False
    snapshots = {dt: a.copy() for dt, a in writeable.items()}
    arrays = list(writeable.items()) + list(read_only.items())
    seen = []

    def unchanged():
        return all(np.array_equal(a.view(np.uint8), snapshots[dt].view(np.uint8)) for dt, a in arrays)

    if direct:
        real_write = fitsio._DirectFile._write
        monkeypatch.setattr(fitsio._DirectFile, "_write", lambda self, b: seen.append(unchanged()) or real_write(self, b))
        monkeypatch.setattr(fitsio, "_DIRECT_BYTES", 4096)  # many writes per array
    else:
        class SpyFile(io.FileIO):
            def write(self, b):
                seen.append(unchanged())
                return super().write(b)

        monkeypatch.setenv("IOI_DIRECT_IO", "0")
        monkeypatch.setattr(fitsio, "open", lambda path, mode: SpyFile(path, mode), raising=False)
        monkeypatch.setattr(fitsio, "_CHUNK_BYTES", 1024)  # many writes per array
    stop, changed = threading.Event(), []

    def reader():
        while not stop.is_set():
            changed.extend(dt for dt, a in arrays if a.tobytes() != snapshots[dt].tobytes())
            time.sleep(0.0002)  # let the writer run

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        hdus = [fits.PrimaryHDU()] + [fits.ImageHDU(a) for _, a in arrays]
        fitsio.write_fits_atomic(tmp_path / "p.fits", fits.HDUList(hdus))
    finally:
        stop.set()
        thread.join()
    assert len(seen) > 50 and all(seen)
    assert changed == []
    for dt, a in writeable.items():
        assert a.flags.writeable and a.dtype == np.dtype(dt)
        np.testing.assert_array_equal(a.view(np.uint8), snapshots[dt].view(np.uint8))
    for dt, a in read_only.items():
        assert not a.flags.writeable
        np.testing.assert_array_equal(a.view(np.uint8), snapshots[dt].view(np.uint8))
    with fits.open(tmp_path / "p.fits") as h:
        for hdu, (dt, a) in zip(h[1:], arrays):
            np.testing.assert_array_equal(hdu.data, a)


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(DTYPES),
       shape=st.lists(st.integers(0, 12), min_size=1, max_size=3).map(tuple),
       chunk_bytes=st.integers(8, 600),
       step=st.sampled_from([1, 2, -1]),
       seed=st.integers(0, 2**16))
def test_any_image_any_chunking_same_bytes_as_astropy(dtype, shape, chunk_bytes, step, seed):
    data = _bits(tuple(n * abs(step) for n in shape), dtype, seed)[(slice(None, None, step),) * len(shape)]

    def make():
        return fits.HDUList([fits.PrimaryHDU(data), fits.ImageHDU(data)])

    hdul = make()
    assert fitsio._prepare_streamed(hdul)
    ours = io.BytesIO()
    old, fitsio._CHUNK_BYTES = fitsio._CHUNK_BYTES, chunk_bytes
    try:
        fitsio._write_streamed(ours, hdul)
    finally:
        fitsio._CHUNK_BYTES = old
    assert ours.getvalue() == _reference(make)


def _table():
    return fits.BinTableHDU.from_columns([fits.Column(name="X", format="E", array=np.arange(5, dtype=np.float32))])


@pytest.mark.parametrize("case", ["table", "compressed", "int8", "bscale", "scale_back", "from file"])
def test_other_hdus_fall_back_to_astropy(tmp_path, monkeypatch, case):
    data = np.arange(20, dtype=np.float32).reshape(4, 5)
    source = tmp_path / "source.fits"
    fits.PrimaryHDU(np.arange(20, dtype=np.uint16).reshape(4, 5)).writeto(source)

    def make():
        if case == "table":
            return fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data), _table()])
        if case == "compressed":
            return fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data)])
        if case == "int8":
            return fits.HDUList([fits.PrimaryHDU(np.arange(-5, 5, dtype=np.int8))])
        if case == "bscale":
            hdu = fits.PrimaryHDU(data)
            hdu.header["BSCALE"] = 2.0  # (a header given to the constructor loses it)
            return fits.HDUList([hdu])
        if case == "scale_back":
            return fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.arange(4, dtype=np.uint16), scale_back=True)])
        opened.append(fits.open(source))
        return opened[-1]

    opened = []

    calls = []
    real_writeto = fits.HDUList.writeto
    monkeypatch.setattr(fits.HDUList, "writeto", lambda *a, **k: calls.append(1) or real_writeto(*a, **k))
    ref = _reference(make)
    calls.clear()
    hdul = make()
    path = fitsio.write_fits_atomic(tmp_path / "out.fits", hdul)
    for h in opened:
        h.close()
    assert calls == [1]
    assert path.read_bytes() == ref
    if case == "from file":
        assert ref == source.read_bytes()


def test_checksum_is_written_by_astropy(tmp_path):
    path = fitsio.write_fits_atomic(tmp_path / "c.fits", fits.HDUList([fits.PrimaryHDU(np.ones((3, 3), np.float32))]),
                                    checksum=True)
    with fits.open(path, checksum=True) as h:
        assert "CHECKSUM" in h[0].header and "DATASUM" in h[0].header


def test_empty_hdulist_behaves_as_before(tmp_path):
    with pytest.warns(UserWarning, match="nothing to write"):
        path = fitsio.write_fits_atomic(tmp_path / "e.fits", fits.HDUList())
    assert path.read_bytes() == b""


def test_commit_sets_an_older_file_aside_for_deletion_later(tmp_path):
    path = tmp_path / "product.fits"
    old = fitsio.write_image(path, np.zeros((4, 4), np.float32))
    keep = old.read_bytes()
    pending = fitsio.write_fits_atomic(path, fits.HDUList([fits.PrimaryHDU(np.ones((4, 4), np.float32))]),
                                       overwrite=True, pending=True)
    aside = []
    assert pending.commit(aside) == path
    assert fits.getdata(path)[0, 0] == 1.0
    assert len(aside) == 1 and aside[0].parent == tmp_path and aside[0].name.startswith(".")
    assert aside[0].read_bytes() == keep  # the old product, intact until removed
    fitsio.remove_files(aside + [tmp_path / "gone"]).join()  # a missing file is no error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["product.fits"]
    # nothing to set aside into an empty place
    fresh = fitsio.write_fits_atomic(tmp_path / "new.fits", fits.HDUList([fits.PrimaryHDU()]), pending=True)
    none = []
    fresh.commit(none)
    assert none == [] and (tmp_path / "new.fits").exists()


def _direct_io_works(directory) -> bool:
    import os
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = directory / "probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


@pytest.mark.parametrize("block_bytes", [4096, 3 * 4096, 1 << 22])
def test_direct_io_writes_the_same_bytes(tmp_path, monkeypatch, block_bytes):
    """Direct writes: whole aligned blocks, the last one padded and the file truncated
    back to its length; headers and data across block boundaries."""
    if not _direct_io_works(tmp_path):
        pytest.skip("no O_DIRECT on this file system")
    used = []
    real_finish = fitsio._DirectFile.finish
    monkeypatch.setattr(fitsio._DirectFile, "finish", lambda self: used.append(1) or real_finish(self))
    monkeypatch.setattr(fitsio, "_DIRECT_BYTES", block_bytes)
    for shape, dtype in [((301, 257), "float32"), ((45, 32), "int16"), ((2040, 3), "uint32"), ((0, 4), "float64")]:
        data = _bits(shape, dtype, seed=len(used))
        make = lambda: fits.HDUList([fits.PrimaryHDU(header=_long_header()), fits.ImageHDU(data, name="SCI"),
                                     fits.ImageHDU(data[::-1, ::2], name="VIEW")])  # noqa: E731
        _assert_same_file(tmp_path, make, monkeypatch)
    assert len(used) == 4


def test_direct_io_refused_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    """A file system that refuses O_DIRECT at open, or at the first write (EINVAL):
    the same file, written through the page cache."""
    import errno
    import os

    data = _bits((100, 70), "float32", seed=5)
    make = lambda: fits.HDUList([fits.PrimaryHDU(data), fits.ImageHDU(_bits((100, 70), "uint16", seed=6))])  # noqa: E731
    real_open = os.open

    def refusing_open(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    with monkeypatch.context() as m:
        m.setattr(fitsio.os, "open", refusing_open)
        _assert_same_file(tmp_path, make, monkeypatch)
    if not _direct_io_works(tmp_path):
        return
    real_write = os.write
    refused = []

    def refusing_write(fd, b):
        import fcntl
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(1)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, b)

    with monkeypatch.context() as m:
        m.setattr(fitsio.os, "write", refusing_write)
        _assert_same_file(tmp_path, make, monkeypatch)
    assert refused == [1]


def test_direct_io_can_be_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("IOI_DIRECT_IO", "0")
    monkeypatch.setattr(fitsio, "_DirectFile", None)  # would fail if used
    _assert_same_file(tmp_path, lambda: fits.HDUList([fits.PrimaryHDU(_bits((20, 30), "int32"))]), monkeypatch)


def test_slow_direct_writes_turn_to_the_page_cache(tmp_path, monkeypatch, caplog):
    """Once the process's direct writes have gone out slower than _DIRECT_MIN_RATE (a
    spinning disk, a busy network file system), later products are written through the
    page cache, whose writes return without waiting for the disk: the same bytes."""
    import logging
    import os
    import time as _time

    if not _direct_io_works(tmp_path):
        pytest.skip("no O_DIRECT on this file system")
    monkeypatch.setattr(fitsio, "_DIRECT_PROBE_BYTES", 8192)
    monkeypatch.setattr(fitsio, "_DIRECT_BYTES", 4096)
    real_write = os.write

    def slow_write(fd, b):
        _time.sleep(0.002)  # 4 KiB in 2 ms: about 2 MB/s
        return real_write(fd, b)

    finished = []
    real_finish = fitsio._DirectFile.finish
    monkeypatch.setattr(fitsio._DirectFile, "finish", lambda self: finished.append(1) or real_finish(self))
    data = _bits((60, 70), "float32", seed=9)
    make = lambda: fits.HDUList([fits.PrimaryHDU(data), fits.ImageHDU(data[::-1])])  # noqa: E731
    with monkeypatch.context() as m, caplog.at_level(logging.INFO, logger="ioi.fitsio"):
        m.setattr(fitsio.os, "write", slow_write)
        _assert_same_file(tmp_path, make, monkeypatch)  # direct, found slow
        assert finished == [1] and fitsio._DIRECT_RATE.slow
        _assert_same_file(tmp_path, make, monkeypatch)  # through the page cache
    assert finished == [1]
    assert "page cache from now on" in caplog.text
