import hashlib
import os

import numpy as np
import pytest
from astropy.io import fits

from ioi import fitsio
from ioi.errors import InputError, IoiError
from ioi.frame import DQ, Frame


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_read_raw_applies_bzero_exactly(tmp_path, raw_writer):
    data = np.array([[0, 1, 32767], [32768, 65534, 65535]], dtype=np.uint16)
    p = raw_writer(tmp_path / "r.fits", data)
    hdr = fits.getheader(p)
    assert hdr["BITPIX"] == 16 and hdr["BZERO"] == 32768
    out, header = fitsio.read_raw(p)
    assert out.dtype == np.float32 and out.dtype.isnative
    np.testing.assert_array_equal(out, data.astype(np.float32))
    assert "BZERO" not in header and header["NOUTPUTS"] == 1


def test_reading_does_not_change_input(tmp_path, raw_writer):
    p = raw_writer(tmp_path / "r.fits")
    before, mtime = _digest(p), os.path.getmtime(p)
    data, _ = fitsio.read_raw(p)
    data += 5  # our copy, not the file
    fitsio.read_image(p)
    fitsio.read_header(p)
    assert _digest(p) == before and os.path.getmtime(p) == mtime


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="not found.*nope.fits"):
        fitsio.read_raw(tmp_path / "nope.fits")
    bad = tmp_path / "bad.fits"
    bad.write_text("this is not FITS")
    with pytest.raises(InputError, match="bad.fits"):
        fitsio.read_raw(bad)


def test_read_image_big_endian_float_becomes_native(tmp_path):
    p = tmp_path / "f.fits"
    fits.PrimaryHDU(np.arange(12, dtype=">f4").reshape(3, 4)).writeto(p)
    data, _ = fitsio.read_image(p)
    assert data.dtype == np.float32 and data.dtype.isnative
    np.testing.assert_array_equal(data, np.arange(12).reshape(3, 4))


def test_cube_round_trip(tmp_path):
    planes = np.random.default_rng(1).normal(size=(4, 5, 6)).astype(np.float32)
    p = fitsio.write_cube(tmp_path / "c.fits", planes)
    with fits.open(p) as h:
        assert len(h) == 4
    np.testing.assert_array_equal(fitsio.read_cube(p), planes)


def test_product_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    sci = rng.normal(size=(8, 9)).astype(np.float32)
    var = rng.uniform(1, 2, size=(8, 9)).astype(np.float32)
    dq = np.zeros((8, 9), np.uint32)
    dq[1, 2] = DQ.SATURATED | DQ.DO_NOT_USE
    hdr = fits.Header({"OBJECT": "M1", "CRPIX1": 4.0, "CTYPE1": "RA---TAN"})
    f = Frame(sci, var, dq, hdr)
    prim = fits.Header({"L1FLAT": 1})
    p = fitsio.write_product(tmp_path / "x_1.fits", prim, {"IM_SS": f, "IM_NONSS": f})
    with fits.open(p) as h:
        assert [x.name for x in h] == ["PRIMARY", "IM_SS", "IM_NONSS", "IM_SS_VAR", "IM_SS_DQ",
                                       "IM_NONSS_VAR", "IM_NONSS_DQ"]
        assert h[0].header["L1FLAT"] == 1
        np.testing.assert_array_equal(h["IM_SS"].data, sci)
        np.testing.assert_array_equal(h["IM_NONSS_VAR"].data, var)
        np.testing.assert_array_equal(h["IM_SS_DQ"].data, dq)
        assert h["IM_SS_VAR"].header["CTYPE1"] == "RA---TAN"


@pytest.mark.parametrize("high_bit, stored", [(None, np.uint16), (15, np.uint16), (16, np.uint32), (31, np.uint32)])
def test_product_quality_plane_is_uint16_when_its_values_fit(tmp_path, high_bit, stored):
    """Every DQ bit fits in 16 bits: the planes are written as uint16 (half the bytes);
    a plane with a higher bit set keeps uint32.  The values read back are the same."""
    assert max(int(b) for b in DQ) <= 0xFFFF
    rng = np.random.default_rng(4)
    dq = rng.integers(0, 1 << 14, size=(6, 7)).astype(np.uint32)
    if high_bit is not None:
        dq[2, 3] |= np.uint32(1 << high_bit)
    f = Frame(np.zeros((6, 7), np.float32), np.ones((6, 7), np.float32), dq, fits.Header())
    p = fitsio.write_product(tmp_path / "q.fits", fits.Header(), {"IM_NONSS": f})
    with fits.open(p) as h:
        got = h["IM_NONSS_DQ"].data
        assert got.dtype == stored
        np.testing.assert_array_equal(got.astype(np.uint64), dq.astype(np.uint64))
    assert fitsio._quality_dtype(np.array([[-1, 3]], np.int32)) == np.uint32  # a negative value: not uint16


def test_quality_plane_written_from_a_view_is_the_file_of_a_uint16_copy(tmp_path):
    """A uint32 quality plane goes to the writer as a view of its low halves (no copy):
    the file is byte for byte the one written from a uint16 copy, and the caller's plane
    is untouched."""
    rng = np.random.default_rng(8)
    dq = rng.integers(0, 1 << 14, size=(300, 37)).astype(np.uint32)  # several writer chunks
    before = dq.copy()
    sci, var = np.zeros((300, 37), np.float32), np.ones((300, 37), np.float32)
    a = fitsio.write_product(tmp_path / "a.fits", fits.Header(), {"IM": Frame(sci, var, dq, fits.Header())})
    b = fitsio.write_product(tmp_path / "b.fits", fits.Header(),
                             {"IM": Frame(sci, var, dq.astype(np.uint16), fits.Header())})
    assert a.read_bytes() == b.read_bytes()
    np.testing.assert_array_equal(dq, before)
    view = fitsio._quality_plane(dq)
    assert view.dtype == np.uint16 and np.shares_memory(view, dq) and not view.flags.writeable


@pytest.mark.parametrize("dtype", [np.float32, np.int8])  # our writer; astropy's (int8)
def test_interrupted_write_leaves_no_product(tmp_path, monkeypatch, dtype):
    target = tmp_path / "product.fits"

    def broken_writeto(self, name, *a, **k):
        with open(name, "wb") as fh:
            fh.write(b"SIMPLE  =                    T" + b" " * 100)  # a partial file
        raise KeyboardInterrupt("simulated interruption")

    def broken_streamed(path, hdul):
        with open(path, "wb") as fh:
            fh.write(b"SIMPLE  =                    T" + b" " * 100)
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(fits.HDUList, "writeto", broken_writeto)
    monkeypatch.setattr(fitsio, "_write_streamed_to", broken_streamed)
    with pytest.raises(KeyboardInterrupt):
        fitsio.write_image(target, np.zeros((4, 4), dtype))
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_old_product(tmp_path, monkeypatch):
    target = tmp_path / "product.fits"
    fitsio.write_image(target, np.ones((4, 4), np.float32))
    before = _digest(target)

    def broken_writer(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(fits.HDUList, "writeto", broken_writer)
    monkeypatch.setattr(fitsio, "_write_streamed", broken_writer)
    with pytest.raises(OSError):
        fitsio.write_image(target, np.zeros((4, 4), np.float32), overwrite=True)
    assert _digest(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["product.fits"]


def test_write_refuses_to_overwrite_by_default(tmp_path):
    target = tmp_path / "p.fits"
    fitsio.write_image(target, np.ones((2, 2), np.float32))
    with pytest.raises(IoiError, match="exists"):
        fitsio.write_image(target, np.ones((2, 2), np.float32))


def test_read_image_finds_the_image_behind_an_empty_primary(tmp_path):
    p = tmp_path / "flat.fits"
    data = np.full((4, 5), 1.25, np.float32)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, name="FLAT")]).writeto(p)
    out, _ = fitsio.read_image(p)
    np.testing.assert_array_equal(out, data)


def test_products_get_the_usual_file_mode(tmp_path):
    """The temporary file is private (mkstemp); the product must be readable like any file
    written under the process umask, so that the observatory's other accounts can read it."""
    import os
    import stat

    from ioi import fitsio as F

    path = F.write_image(tmp_path / "p.fits", np.zeros((4, 4), np.float32))
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode == 0o666 & ~F._UMASK


@pytest.mark.parametrize("dtype, bscale, bzero", [(np.uint16, 1, None), (np.int16, 1, 0), (np.uint8, 1, 0),
                                                  (np.int32, 1, 0), (np.float32, 1, 0), (np.float64, 1, 0),
                                                  (np.int16, 2.5, 100.0)])
@pytest.mark.parametrize("chunk", [1 << 20, 40])
def test_direct_raw_read_equals_astropy(tmp_path, monkeypatch, dtype, bscale, bzero, chunk):
    """The direct reader (header by astropy, pixels by row chunks) against astropy's own
    scaled read, for each BITPIX, scaling and chunks that split the image's rows."""
    monkeypatch.setattr(fitsio, "_RAW_CHUNK", chunk)
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    data = (rng.integers(info.min, info.max, (13, 7), endpoint=True) if info else rng.normal(0, 1e3, (13, 7)))
    data = data.astype(dtype)
    hdu = fits.PrimaryHDU(data)
    if bzero is not None and np.dtype(dtype).kind in "iu" and (bscale != 1 or bzero != 0):
        hdu.header["BSCALE"], hdu.header["BZERO"] = bscale, bzero
        hdu = fits.PrimaryHDU(data, header=hdu.header, do_not_scale_image_data=True)
    hdu.header["NOUTPUTS"] = 4
    p = tmp_path / "r.fits"
    hdu.writeto(p)
    out = np.full((13, 7), np.nan, np.float32)
    got, header = fitsio.read_raw(p, out=out)
    assert got is out and "BZERO" not in header and header["NOUTPUTS"] == 4
    with fits.open(p) as h:
        want = np.asarray(h[0].data, dtype=np.float64)
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-7, atol=0)
    np.testing.assert_array_equal(fitsio.read_raw(p)[0], got)  # a new array: the same values


def test_truncated_or_odd_raw_files(tmp_path):
    p = tmp_path / "cut.fits"
    fits.PrimaryHDU(np.zeros((50, 40), np.int16)).writeto(p)
    p.write_bytes(p.read_bytes()[:2880 + 1000])
    with pytest.raises(InputError, match="cut.fits.*ends inside"):
        fitsio.read_raw(p)
    cube = tmp_path / "cube.fits"
    fits.PrimaryHDU(np.zeros((2, 5, 4), np.int16)).writeto(cube)
    with pytest.raises(InputError, match="cube.fits.*2-D"):
        fitsio.read_raw(cube)
