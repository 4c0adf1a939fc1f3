import logging

import pytest

from ioi.discovery import LT, TELEDYNE, Selection, discover, group_reads, scan_lt, scan_teledyne
from ioi.errors import ExitCode, InputError, IoiError


def lt(tmp, date, run, dither, expo, level=0, inttime=None, ftype="e", **kw):
    name = f"i_{ftype}_{date}_{run}_{dither}_{expo}_{level}.fits"
    # INTTIME deliberately not monotonic in the exposure number for some tests
    return ("LT", tmp / name, inttime if inttime is not None else 1.4 * expo, kw)


@pytest.fixture
def lt_dir(tmp_path, raw_writer):
    # multrun 1: dithers 1,2,4 (3 missing), 4 reads each; multrun 2: one dither; another date
    for run, dithers in ((1, (1, 2, 4)), (2, (1,))):
        for d in dithers:
            for e in (1, 2, 3, 4):
                raw_writer(tmp_path / f"i_e_20150227_{run}_{d}_{e}_0.fits", INTTIME=1.4 * e + (10 if e > 2 else 0))
    for e in (1, 2):
        raw_writer(tmp_path / f"i_e_20150228_1_1_{e}_0.fits", INTTIME=1.4 * e)
    # stray files: a product, a text file, a near-miss name, a Teledyne file
    raw_writer(tmp_path / "i_e_20150227_1_1_0_1.fits")
    (tmp_path / "notes.txt").write_text("hello")
    raw_writer(tmp_path / "i_e_20150227_1_1_1.fits")
    raw_writer(tmp_path / "H2RG_R01_M01_N01.fits")
    return tmp_path


def test_lt_grouping_and_missing_dither(lt_dir):
    mrs = discover(lt_dir, Selection(date="20150227"))
    assert [(m.convention, m.date, m.multrun) for m in mrs] == [(LT, "20150227", 1), (LT, "20150227", 2)]
    m1 = mrs[0]
    assert [d.dither for d in m1.dithers] == [1, 2, 4]
    assert all(len(d.reads) == 4 for d in m1.dithers)
    assert m1.l1_name(4) == "i_e_20150227_1_4_0_1.fits"
    assert m1.l2_name() == "i_e_20150227_1_0_0_2.fits"


def test_reads_are_ordered_by_inttime(tmp_path, raw_writer):
    for e, t in ((1, 30.0), (2, 1.4), (3, 2.8), (4, 31.4)):
        raw_writer(tmp_path / f"i_e_20150227_1_1_{e}_0.fits", INTTIME=t)
    (m,) = discover(tmp_path)
    assert [r.exposure for r in m.dithers[0].reads] == [2, 3, 1, 4]
    assert [r.inttime for r in m.dithers[0].reads] == sorted(r.inttime for r in m.dithers[0].reads)


def test_all_dates_when_none_given(lt_dir):
    mrs = discover(lt_dir)
    assert {(m.date, m.multrun) for m in mrs} == {("20150227", 1), ("20150227", 2), ("20150228", 1)}


@pytest.mark.parametrize("sel, expect", [
    (Selection(multruns=(2, 2)), {(2, 1): 4}),
    (Selection(date="20150227", dithers=(2, 4)), {(1, 2): 4, (1, 4): 4}),
    (Selection(date="20150227", multruns=(1, 1), exposures=(2, 3)), {(1, 1): 2, (1, 2): 2, (1, 4): 2}),
    (Selection(date="20150228"), {(1, 1): 2}),
])
def test_selection_ranges_are_inclusive(lt_dir, sel, expect):
    mrs = discover(lt_dir, sel)
    got = {(m.multrun, d.dither): len(d.reads) for m in mrs for d in m.dithers}
    assert got == expect


def test_stray_files_skipped_at_debug(lt_dir, caplog):
    caplog.set_level(logging.DEBUG, logger="ioi")
    mrs = discover(lt_dir, Selection(date="20150227"))
    names = {r.path.name for m in mrs for d in m.dithers for r in d.reads}
    assert "i_e_20150227_1_1_0_1.fits" not in names and "notes.txt" not in names
    assert any("level 1 is not raw" in r.message for r in caplog.records)
    assert any("notes.txt" in r.message for r in caplog.records)
    assert any("found i_e_20150227_1" in r.message and "3 dither(s)" in r.message for r in caplog.records)


def test_teledyne_fallback(tmp_path, raw_writer):
    for run in (1, 2):
        for m in (1, 2):
            for n in (1, 2):
                raw_writer(tmp_path / f"H2RG_R{run:02d}_M{m:02d}_N{n:02d}.fits", INTTIME=(m - 1) * 10 + 1.4 * n,
                           SEQNUM_M=m, SEQNUM_N=n)
    mrs = discover(tmp_path, Selection(multruns=(2, 2)))
    assert len(mrs) == 1 and mrs[0].convention == TELEDYNE and mrs[0].multrun == 2
    reads = mrs[0].dithers[0].reads
    assert [(r.group, r.read) for r in reads] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    only_g1 = discover(tmp_path, Selection(groups=(0, 1)))
    assert all(r.group == 1 for m in only_g1 for d in m.dithers for r in d.reads)
    assert mrs[0].l1_name(1) == "H2RG_R02_L1.fits"


def test_lt_naming_wins_over_teledyne(lt_dir):
    assert {m.convention for m in discover(lt_dir)} == {LT}


def test_no_files_exit_3_says_where_and_what(tmp_path):
    with pytest.raises(IoiError) as exc:
        discover(tmp_path, Selection(date="20200101", multruns=(5, 6)))
    assert exc.value.exit_code == ExitCode.NO_FILES
    msg = str(exc.value)
    assert str(tmp_path) in msg and "20200101" in msg and "multruns 5-6" in msg and "\n" not in msg


def test_missing_directory_is_exit_3(tmp_path):
    with pytest.raises(IoiError) as exc:
        discover(tmp_path / "nowhere")
    assert exc.value.exit_code == ExitCode.NO_FILES


def test_matching_name_that_is_not_fits_is_a_clear_error(tmp_path, raw_writer):
    raw_writer(tmp_path / "i_e_20150227_1_1_1_0.fits")
    (tmp_path / "i_e_20150227_1_1_2_0.fits").write_bytes(b"garbage")
    with pytest.raises(InputError, match="i_e_20150227_1_1_2_0.fits.*not a readable FITS"):
        discover(tmp_path)


def test_missing_inttime_is_named(tmp_path, raw_writer):
    raw_writer(tmp_path / "i_e_20150227_1_1_1_0.fits", INTTIME=None)
    with pytest.raises(InputError, match="INTTIME"):
        discover(tmp_path)


def test_scanning_reads_headers_only(tmp_path, raw_writer, monkeypatch):
    raw_writer(tmp_path / "i_e_20150227_1_1_1_0.fits")
    from astropy.io import fits

    def no_data(*a, **k):
        raise AssertionError("pixel data read during discovery")

    monkeypatch.setattr(fits, "getdata", no_data)
    monkeypatch.setattr(fits, "open", no_data)
    reads = scan_lt(tmp_path)
    assert len(reads) == 1


def test_recursive_scan(tmp_path, raw_writer):
    raw_writer(tmp_path / "night1" / "i_e_20150227_1_1_1_0.fits")
    raw_writer(tmp_path / "night2" / "i_e_20150228_3_1_1_0.fits")
    with pytest.raises(IoiError):
        discover(tmp_path)
    mrs = discover(tmp_path, Selection(recursive=True))
    assert [(m.date, m.multrun) for m in mrs] == [("20150227", 1), ("20150228", 3)]


def test_group_reads_direct(tmp_path, raw_writer):
    for e in (1, 2):
        raw_writer(tmp_path / f"H2RG_R01_M01_N0{e}.fits", INTTIME=e * 1.0)
    groups = group_reads(scan_teledyne(tmp_path))
    assert groups[0].name == "H2RG_R01"
