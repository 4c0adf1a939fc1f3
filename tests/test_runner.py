"""Reducing a tree of several multruns: independence, parallel equality, failures, skip-if-done.

Three small simulated multruns (256x256, 2-3 dithers, two dates) share one
raw tree.  Products carry no run-time keywords, so equality is byte equality
of the FITS files (the JSON reports hold timings and are left out).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest

from ioi.cli import main
from ioi.config import load_settings
from ioi.discovery import Selection
from ioi.runner import INTERNAL_ERROR, reduce_directory
from ioi.simulate import simulate

# (date, multrun, dithers); seeds differ so that the multruns differ.
MULTRUNS = (("20150227", 1, 2), ("20150227", 2, 3), ("20150228", 1, 2))


def _name(date, run):
    return f"i_e_{date}_{run}"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """One data tree ``data/<date>/`` holding three multruns, and their settings."""
    root = tmp_path_factory.mktemp("runner")
    data = root / "data"
    for i, (date, run, dithers) in enumerate(MULTRUNS):
        res = simulate(root / f"sim{i}", seed=1 if i == 0 else 10 + i, dithers=dithers, fowler_pairs=1,
                       size=256, date=date, multrun=run, cosmic_rays=False)
        dest = data / date
        dest.mkdir(parents=True, exist_ok=True)
        for p in res.raw_files:
            shutil.copy2(p, dest / p.name)
    cfg = root / "sim0" / "config"  # one set of calibration files for every multrun
    return {"root": root, "data": data, "pi": cfg / "pipeline.ini", "pa": cfg / "paths.ini"}


def _copy_data(tree, dest: Path) -> Path:
    shutil.copytree(tree["data"], dest)
    return dest


def _reduce(tree, data, out, *extra):
    return main(["reduce", str(data), "--out", str(out), "--pi", str(tree["pi"]), "--pa", str(tree["pa"]),
                 "--log", "ERROR", *extra])


def _fits_bytes(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.fits"))}


def _expected_products(date, run, dithers):
    names = {f"{_name(date, run)}_{d}_0_1.fits" for d in range(1, dithers + 1)}
    return names


@pytest.fixture(scope="module")
def serial(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    rc = _reduce(tree, tree["data"], out)
    return rc, out


def test_each_multrun_reduced_independently(tree, serial, tmp_path):
    rc, out = serial
    assert rc == 0
    products = _fits_bytes(out)
    for date, run, dithers in MULTRUNS:
        assert _expected_products(date, run, dithers) <= set(products), (date, run)
        report = json.loads((out / f"{_name(date, run)}_report.json").read_text())
        assert len(report["dithers"]) == dithers
    # Reducing one multrun alone gives the same bytes as reducing it among the others.
    alone = tmp_path / "alone"
    assert _reduce(tree, tree["data"], alone, "--date", "20150227", "--multruns", "2") == 0
    alone_products = _fits_bytes(alone)
    assert set(alone_products) >= _expected_products("20150227", 2, 3)
    assert not any(n.startswith(_name("20150228", 1)) for n in alone_products)
    for name, data in alone_products.items():
        assert products[name] == data, name


def test_workers_give_byte_identical_products(tree, serial, tmp_path):
    _, out_serial = serial
    out = tmp_path / "par"
    assert _reduce(tree, tree["data"], out, "--workers", "2") == 0
    assert _fits_bytes(out) == _fits_bytes(out_serial)
    # the workers appended their records to res.log
    assert "i_e_20150228_1" in (out / "res.log").read_text()


def test_dask_local_cluster_gives_byte_identical_products(tree, serial, tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    _, out_serial = serial
    out = tmp_path / "dask"
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0",
                                  silence_logs=logging.ERROR) as cluster:
        rc = _reduce(tree, tree["data"], out, "--scheduler", cluster.scheduler_address)
    assert rc == 0
    assert _fits_bytes(out) == _fits_bytes(out_serial)


def _corrupt_data(path: Path) -> None:
    """Keep the header, cut the pixel data short (a truncated transfer)."""
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2 // 2880 * 2880])


def _corrupt_header(path: Path) -> None:
    path.write_bytes(b"this is not a FITS file" * 200)


@pytest.mark.filterwarnings("ignore:File may have been truncated")  # astropy's own notice; the read then fails
@pytest.mark.parametrize("corrupt, extra", [(_corrupt_data, ()), (_corrupt_header, ()),
                                            (_corrupt_data, ("--workers", "2"))],
                         ids=["truncated-data", "garbage-file", "truncated-data-workers"])
def test_failed_multrun_does_not_stop_the_others(tree, serial, tmp_path, capsys, corrupt, extra):
    _, out_serial = serial
    data = _copy_data(tree, tmp_path / "data")
    corrupt(data / "20150227" / "i_e_20150227_2_2_1_0.fits")
    out = tmp_path / "out"
    rc = _reduce(tree, data, out, *extra)
    printed = capsys.readouterr().out
    assert rc == 40  # unreadable input (BAD_INPUT), the first failure's code
    assert "FAILED" in printed and "i_e_20150227_2_2_1_0.fits" in printed
    assert "2 multrun(s) succeeded, 1 failed" in printed
    products = _fits_bytes(out)
    for date, run, dithers in (MULTRUNS[0], MULTRUNS[2]):
        for name in _expected_products(date, run, dithers):
            assert products[name] == _fits_bytes(out_serial)[name]
    assert not any(n.startswith(_name("20150227", 2)) for n in products)


def test_unexpected_error_fails_one_multrun_only(tree, tmp_path, monkeypatch):
    import ioi.pipeline

    real = ioi.pipeline.reduce_multrun

    def flaky(multrun, *args, **kwargs):
        if multrun.name == _name("20150227", 2):
            raise ZeroDivisionError("a bug")
        return real(multrun, *args, **kwargs)

    monkeypatch.setattr(ioi.pipeline, "reduce_multrun", flaky)
    pipe, paths = load_settings(pipeline_ini=tree["pi"], paths_ini=tree["pa"])
    summary = reduce_directory(tree["data"], tmp_path / "out", selection=Selection(recursive=True), pipe=pipe,
                               paths=paths)
    status = {o.name: o.status for o in summary.outcomes}
    assert status == {_name("20150227", 1): "done", _name("20150227", 2): "failed", _name("20150228", 1): "done"}
    assert summary.exit_code == INTERNAL_ERROR
    assert "ZeroDivisionError" in summary.failed[0].error


def _statuses(tree, data, out, **kwargs):
    pipe, paths = load_settings(pipeline_ini=kwargs.pop("pi", tree["pi"]), paths_ini=tree["pa"])
    summary = reduce_directory(data, out, selection=Selection(recursive=True), pipe=pipe, paths=paths, **kwargs)
    assert summary.exit_code == 0
    return {o.name: o.status for o in summary.outcomes}


def _touch_now(path: Path) -> None:
    t = time.time()
    os.utime(path, (t, t))


def test_rerun_skips_done_multruns_and_redoes_changed_ones(tree, tmp_path):
    data = _copy_data(tree, tmp_path / "data")
    out = tmp_path / "out"
    names = [_name(d, r) for d, r, _ in MULTRUNS]
    assert set(_statuses(tree, data, out).values()) == {"done"}
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.fits")}

    # Nothing changed: everything skipped, products untouched.
    assert set(_statuses(tree, data, out).values()) == {"skipped"}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.fits")} == mtimes

    # One raw input touched: only its multrun is redone.
    _touch_now(data / "20150228" / "i_e_20150228_1_1_1_0.fits")
    st = _statuses(tree, data, out)
    assert st == {names[0]: "skipped", names[1]: "skipped", names[2]: "done"}

    # A product deleted: its multrun is redone.
    (out / f"{names[0]}_1_0_1.fits").unlink()
    assert _statuses(tree, data, out)[names[0]] == "done"

    # A setting changed: everything redone.
    pi = tmp_path / "pipeline.ini"
    text = tree["pi"].read_text()
    assert "method = MEAN" in text  # the simulated settings stack with MEAN
    pi.write_text(text.replace("method = MEAN", "method = COADD"))
    assert set(_statuses(tree, data, out, pi=pi).values()) == {"done"}
    assert set(_statuses(tree, data, out, pi=pi).values()) == {"skipped"}

    # A calibration file the settings use is newer than the products: everything redone.
    _, paths = load_settings(paths_ini=tree["pa"])
    flat_copy_mtime = paths.flat.stat()
    try:
        _touch_now(paths.flat)
        assert set(_statuses(tree, data, out, pi=pi).values()) == {"done"}
    finally:
        os.utime(paths.flat, ns=(flat_copy_mtime.st_atime_ns, flat_copy_mtime.st_mtime_ns))

    # --force redoes everything.
    assert set(_statuses(tree, data, out, pi=pi, force=True).values()) == {"done"}


def test_cli_rerun_reports_skipped_and_force(tree, tmp_path, capsys):
    data = _copy_data(tree, tmp_path / "data")
    out = tmp_path / "out"
    assert _reduce(tree, data, out, "--multruns", "1") == 0
    capsys.readouterr()
    assert _reduce(tree, data, out, "--multruns", "1") == 0
    assert capsys.readouterr().out.count(": skipped") == 2
    before = {p.name: p.stat().st_ino for p in out.glob("*.fits")}
    assert _reduce(tree, data, out, "--multruns", "1", "--force") == 0
    assert capsys.readouterr().out.count(": done") == 2
    after = {p.name: p.stat().st_ino for p in out.glob("*.fits")}
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in after)  # new files
    assert not list(out.glob(".*.old")) + list(out.glob(".*.tmp"))  # replaced ones set aside and deleted


def test_side_processes_give_byte_identical_products(tree, serial, tmp_path, monkeypatch):
    """sep's calls in side processes (forced on for these small frames): the same bytes."""
    from ioi import pipeline

    monkeypatch.setattr(pipeline, "_SIDE_PROCESS_MIN_PIXELS", 0)
    started = []
    real = pipeline.SideProcesses.start

    def start(self, count=None):
        started.append(self)
        return real(self, count)

    monkeypatch.setattr(pipeline.SideProcesses, "start", start)
    out = tmp_path / "side"
    assert _reduce(tree, tree["data"], out) == 0
    assert started and all(s._children for s in started)  # they did run
    assert not any(s._broken for s in started)
    assert _fits_bytes(out) == _fits_bytes(serial[1])


def test_command_line_side_processes_are_shared_by_the_multruns(tree, serial, tmp_path, monkeypatch):
    """A serial ``ioi reduce`` of full-size data starts sep's side processes before its
    imports and shares them among its multruns; the products are the same bytes."""
    from ioi import cli, pipeline

    monkeypatch.setattr(pipeline, "_SIDE_PROCESS_MIN_PIXELS", 0)
    monkeypatch.setattr(cli, "_FULL_SIZE_READ_BYTES", 0)  # these small reads count as full size
    started, calls = [], []
    real_start, real_call = pipeline.SideProcesses.start, pipeline.SideProcesses.call

    def start(self, count=None):
        if self not in started:
            started.append(self)
        return real_start(self, count)

    def call(self, fn, *args, **kwargs):
        calls.append(self)
        return real_call(self, fn, *args, **kwargs)

    monkeypatch.setattr(pipeline.SideProcesses, "start", start)
    monkeypatch.setattr(pipeline.SideProcesses, "call", call)
    out = tmp_path / "shared"
    assert _reduce(tree, tree["data"], out) == 0
    assert len(started) == 1 and set(calls) == set(started)  # one set of children for all three multruns
    side = started[0]
    assert side._closed and not side._broken
    assert len(side._children) == side.workers  # the first at the start, the rest with the reduction
    assert all(c.proc.poll() is not None for c in side._children)  # ended with the run
    assert _fits_bytes(out) == _fits_bytes(serial[1])


def test_side_processes_not_started_early_for_small_data_or_workers(tree, tmp_path):
    from ioi import cli

    with cli._side_processes_for(tree["data"], serial=True) as side:
        assert side is True  # 256x256 reads: the pipeline decides per multrun
    big = tmp_path / "night" / "i_e_20150227_1_1_1_1.fits"
    big.parent.mkdir()
    with open(big, "wb") as f:
        f.truncate(cli._FULL_SIZE_READ_BYTES)  # sparse: only its size matters
    assert cli._full_size_input(tmp_path)
    assert not cli._full_size_input(tmp_path / "night" / "missing")
    with cli._side_processes_for(tmp_path, serial=False) as side:
        assert side is True  # --workers / --scheduler: none in this process
