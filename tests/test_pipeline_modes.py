"""The whole pipeline in each read mode, output count and setting that the original offers,
on small simulations: every combination must produce the SPEC's products with sane values."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from ioi.config import load_settings
from ioi.discovery import discover
from ioi.pipeline import reduce_multrun
from ioi.simulate import simulate


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    out = {}
    for name, kw in {"fowler32": dict(), "cds4": dict(mode="cds", noutputs=4),
                     "utr1": dict(mode="utr", nreads=6, noutputs=1)}.items():
        out[name] = simulate(root / name, size=512, dithers=4, seed=31, **kw)
    return out


CASES = [
    ("fowler32", {}),
    ("cds4", {"frame_combination": {"method": "CDS"}}),
    ("utr1", {"frame_combination": {"method": "UTR"}}),
    ("fowler32", {"reference_subtraction": {"method": "FULL"}}),
    ("fowler32", {"reference_subtraction": {"method": "CONSTANTOFF"}}),
    ("fowler32", {"sky_subtraction": {"make_algorithm": "TUKEY"}}),
    ("fowler32", {"sky_subtraction": {"make_algorithm": "HUBER", "peers_only": False}}),
    ("fowler32", {"sky_subtraction": {"mask_sources": False}}),
    ("fowler32", {"stacking": {"method": "COADD"}}),
    ("fowler32", {"stacking": {"method": "MEANANDSCALE", "clip_sigma": 3.0}}),
    ("fowler32", {"nonlinearity_corrections": {"form": "FACTOR"}}),
    ("fowler32", {"bad_pix_masking": {"which": ("LIN",)}}),
]


@pytest.mark.parametrize("sim_name, changes", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_mode_produces_sane_products(sims, tmp_path, sim_name, changes):
    sim = sims[sim_name]
    pipe, paths = load_settings(pipeline_ini=sim.pipeline_ini, paths_ini=sim.paths_ini)
    for section, values in changes.items():
        pipe = pipe.replace(section, **values)
    (multrun,) = discover(sim.raw_dir)
    result = reduce_multrun(multrun, pipe, paths, tmp_path)
    assert len(result.l1_products) == 4
    assert not [w for w in result.warnings if w[0] == 18], result.warnings
    assert result.l2_product is not None
    for path in result.l1_products:
        with fits.open(path) as h:
            ss = h["IM_SS"].data
            var = h["IM_SS_VAR"].data
            assert np.isfinite(ss).mean() > 0.9
            sigma = np.sqrt(np.nanmedian(var))
            # most of the frame is sky: the sky-subtracted median is near zero
            assert abs(np.nanmedian(ss)) < 0.5 * sigma, (np.nanmedian(ss), sigma)
    with fits.open(result.l2_product) as h:
        stack = h[1].data
        assert h[1].name == "SK_SS"
        assert np.isfinite(stack).mean() > 0.5
        assert h[0].header["L1STK"] == 1


def test_late_registration_failure_restamps_written_products(sims, tmp_path, monkeypatch):
    """Frames are written while later ones are still being registered; when a later frame
    cannot be registered, the products already written must end up as if registration had
    been off: L1REG = L1STK = 0, no REGDX/REGDY, the same data, no stack, no temporary files."""
    from ioi.stages import register

    sim = sims["fowler32"]
    pipe, paths = load_settings(pipeline_ini=sim.pipeline_ini, paths_ini=sim.paths_ini)
    (multrun,) = discover(sim.raw_dir)
    plain = reduce_multrun(multrun, pipe.replace("registration", do=0), paths, tmp_path / "off")

    add = register.TransformFinder.add

    def failing_add(self, frame, guesses=None):
        if self.count == 3:
            raise register.RegistrationError("frame 3: no stars (test)")
        return add(self, frame, guesses)

    monkeypatch.setattr(register.TransformFinder, "add", failing_add)
    result = reduce_multrun(multrun, pipe, paths, tmp_path / "fail")
    assert [c for c, _ in result.warnings if c == 18] == [18]
    assert result.l2_product is None
    assert [p.name for p in result.l1_products] == [p.name for p in plain.l1_products]
    assert not list((tmp_path / "fail").glob(".*.tmp"))
    for got, want in zip(result.l1_products, plain.l1_products):
        with fits.open(got) as g, fits.open(want) as w:
            assert g[0].header["L1REG"] == 0 and g[0].header["L1STK"] == 0
            assert "REGDX" not in g[0].header
            assert [h.name for h in g] == [h.name for h in w]
            for hg, hw in zip(g[1:], w[1:]):
                np.testing.assert_array_equal(hg.data, hw.data)


def test_hard_quit_and_write_output(sims, tmp_path):
    """`hard` writes a stage's intermediate frames, `quit` stops after it, and
    `write_output = 0` writes no product (the report is still made)."""
    sim = sims["fowler32"]
    pipe, paths = load_settings(pipeline_ini=sim.pipeline_ini, paths_ini=sim.paths_ini)
    (multrun,) = discover(sim.raw_dir)

    hard = pipe.replace("sky_subtraction", hard=1).replace("registration", hard=1)
    result = reduce_multrun(multrun, hard, paths, tmp_path / "hard")
    names = sorted(p.name for p in result.intermediate)
    assert len([n for n in names if n.endswith("_skysub.fits")]) == 4
    assert len([n for n in names if n.endswith("_registered.fits")]) == 4
    assert result.l2_product is not None and len(result.l1_products) == 4
    with fits.open(next(p for p in result.intermediate if p.name.endswith("_2_registered.fits"))) as h:
        assert h[1].header["L1REG"] == 1 and np.isfinite(h[1].data).mean() > 0.8

    quit_sky = pipe.replace("sky_subtraction", quit=1)
    result = reduce_multrun(multrun, quit_sky, paths, tmp_path / "quit")
    assert result.l2_product is None  # neither registered nor stacked after the sky
    assert len(result.l1_products) == 4
    with fits.open(result.l1_products[0]) as h:
        assert h[0].header["L1SKYSUB"] == 1 and h[0].header["L1REG"] == 0 and h[0].header["L1STK"] == 0

    silent = pipe.replace("general", write_output=0)
    out = tmp_path / "silent"
    result = reduce_multrun(multrun, silent, paths, out)
    assert result.l1_products == [] and result.l2_product is None
    assert not list(out.glob("*.fits")) and result.report is not None and result.report.exists()


@pytest.mark.parametrize("sim_name, method", [("fowler32", "FOWLER"), ("cds4", "CDS"), ("utr1", "UTR")])
def test_calibrated_frames_do_not_share_the_reused_ramp_buffers(sims, tmp_path, sim_name, method):
    """Each thread reads its dithers into one reused cube: no calibrated frame may keep a view
    of it (the next dither would overwrite that frame)."""
    from ioi import pipeline
    from ioi.calibration import load_calibration

    sim = sims[sim_name]
    pipe, paths = load_settings(pipeline_ini=sim.pipeline_ini, paths_ini=sim.paths_ini)
    pipe = pipe.replace("frame_combination", method=method)
    (multrun,) = discover(sim.raw_dir)
    cal = load_calibration(pipe, paths)
    run = pipeline._Run(pipeline.ReductionResult(multrun=multrun.name))
    frame = pipeline.process_dither(multrun.dithers[0], pipe, cal, run, tmp_path, multrun.name)
    before = [frame.science.copy(), frame.variance.copy(), frame.quality.copy()]
    buffers = list(pipeline._thread_scratch()._arrays.values())
    assert len(buffers) >= 3  # the cube, its saturation flags and the ramp's quality
    for plane in (frame.science, frame.variance, frame.quality):
        assert not any(np.shares_memory(plane, b) for b in buffers)
    pipeline.process_dither(multrun.dithers[1], pipe, cal, run, tmp_path, multrun.name)  # reuses them
    for plane, b in zip((frame.science, frame.variance, frame.quality), before):
        np.testing.assert_array_equal(plane, b)


@pytest.mark.filterwarnings("ignore:File may have been truncated")
@pytest.mark.parametrize("broken_raw", [False, True])
def test_a_missing_calibration_file_is_reported_before_any_dither(sims, tmp_path, broken_raw):
    """The calibration is read while the first dithers are: its error (a missing flat,
    exit 21) still comes first, also when a raw file is unreadable too, and no product
    is written."""
    import dataclasses
    import shutil

    from ioi.errors import ExitCode, IoiError

    sim = sims["fowler32"]
    pipe, paths = load_settings(pipeline_ini=sim.pipeline_ini, paths_ini=sim.paths_ini)
    paths = dataclasses.replace(paths, flat_coeff_filename="no_such_flat.fits")
    raw = tmp_path / "raw"
    shutil.copytree(sim.raw_dir, raw)
    if broken_raw:
        first = sorted(raw.glob("*.fits"))[0]
        first.write_bytes(first.read_bytes()[:-10000])  # cut inside the data
    (multrun,) = discover(raw)
    with pytest.raises(IoiError) as exc:
        reduce_multrun(multrun, pipe, paths, tmp_path / "out")
    assert exc.value.exit_code == ExitCode.FLAT_FILE_MISSING
    assert "no_such_flat.fits" in str(exc.value)
    assert not list((tmp_path / "out").glob("*.fits"))
    if broken_raw:  # with the calibration there, the raw file's own error
        with pytest.raises(IoiError, match=first.name):
            reduce_multrun(multrun, pipe, load_settings(pipeline_ini=sim.pipeline_ini, paths_ini=sim.paths_ini)[1],
                           tmp_path / "out2")
