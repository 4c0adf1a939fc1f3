"""Teledyne-named data (H2RG_R<run>_M<group>_N<read>.fits) go through the same
detector chain and are written under a clear name, without sky/registration/stack."""

import numpy as np
import pytest
from astropy.io import fits

from ioi.cli import main
from ioi.simulate import simulate


@pytest.fixture(scope="module")
def utr(tmp_path_factory):
    root = tmp_path_factory.mktemp("teledyne")
    sim = simulate(root / "sim", size=256, dithers=1, utr=True, utr_runs=2, utr_reads=8, seed=5)
    return sim


@pytest.mark.parametrize("method", ["UTR", "CDS"])
def test_teledyne_runs_reduce_to_named_l1(utr, tmp_path, method):
    toml = tmp_path / "t.toml"
    toml.write_text(f'[pipeline.frame_combination]\nmethod = "{method}"\n')
    out = tmp_path / "out"
    rc = main(["reduce", str(utr.utr_dir), "--out", str(out), "--config", str(toml), "--paths-ini",
               str(utr.paths_ini), "--log", "WARNING"])
    assert rc == 0
    assert sorted(p.name for p in out.glob("*.fits")) == ["H2RG_R01_L1.fits", "H2RG_R02_L1.fits"]
    with fits.open(out / "H2RG_R01_L1.fits") as h:
        names = [x.name for x in h]
        assert names[1] == "IM_NONSS" and "IM_SS" not in names
        assert h[0].header["L1FMCOME"] == method and h[0].header["L1SKYSUB"] == 0
        data = h["IM_NONSS"].data
        # flat illumination of ~400 ADU/s over the ramp: the median rate is of that order
        exptime = h["IM_NONSS"].header["EXPTIME"]
        assert 200 < np.nanmedian(data) / exptime < 600


def test_teledyne_group_selection_is_used(utr, tmp_path):
    # the original's run_pipe defaults select groups 0..1 and reads 1..4: with UTR ramps in
    # group 1 that is a 4-read ramp per run
    toml = tmp_path / "t.toml"
    toml.write_text('[pipeline.frame_combination]\nmethod = "UTR"\n')
    out = tmp_path / "out"
    rc = main(["reduce", str(utr.utr_dir), "--out", str(out), "--config", str(toml), "--paths-ini",
               str(utr.paths_ini), "--exposures", "1,4", "--multruns", "2", "--log", "WARNING"])
    assert rc == 0
    with fits.open(out / "H2RG_R02_L1.fits") as h:
        assert h["IM_NONSS"].header["EXPTIME"] == pytest.approx(3 * 5.0)
    assert not (out / "H2RG_R01_L1.fits").exists()
