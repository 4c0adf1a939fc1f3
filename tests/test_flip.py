"""run_pipe --f / ioi reduce --flip: calibration stored flipped left-right, flipped back before use."""

import shutil

import numpy as np
from astropy.io import fits

from ioi.cli import main
from ioi.simulate import simulate


def test_flipped_calibration_with_flip_gives_the_same_products(tmp_path):
    sim = simulate(tmp_path / "sim", size=256, dithers=2, seed=4)
    flipped = tmp_path / "flipped"
    shutil.copytree(sim.out_dir, flipped)
    for path in (flipped / "config").rglob("*.fits"):
        with fits.open(path) as h:
            hdus = [type(x)(np.ascontiguousarray(x.data[..., ::-1]) if x.data is not None else None,
                            header=x.header) for x in h]
        fits.HDUList(hdus).writeto(path, overwrite=True)
    paths_ini = flipped / "config" / "paths.ini"
    paths_ini.write_text(paths_ini.read_text().replace(str(sim.out_dir), str(flipped)))
    toml = tmp_path / "t.toml"
    toml.write_text("[pipeline.registration]\ndo = false\n[pipeline.stacking]\ndo = false\n")
    common = ["--config", str(toml), "--log", "WARNING"]
    assert main(["reduce", str(sim.raw_dir), "--out", str(tmp_path / "a"), "--pi", str(sim.pipeline_ini),
                 "--pa", str(sim.paths_ini), *common]) == 0
    assert main(["reduce", str(sim.raw_dir), "--out", str(tmp_path / "b"), "--pi", str(sim.pipeline_ini),
                 "--pa", str(paths_ini), "--flip", *common]) == 0
    assert main(["reduce", str(sim.raw_dir), "--out", str(tmp_path / "c"), "--pi", str(sim.pipeline_ini),
                 "--pa", str(paths_ini), *common]) == 0
    name = "i_e_20150227_1_1_0_1.fits"
    with fits.open(tmp_path / "a" / name) as a, fits.open(tmp_path / "b" / name) as b, \
            fits.open(tmp_path / "c" / name) as c:
        np.testing.assert_array_equal(a["IM_NONSS"].data, b["IM_NONSS"].data)
        assert b[0].header["L1FLIP"] == 1 and a[0].header["L1FLIP"] == 0
        # without --flip the flipped files give different data
        assert not np.array_equal(np.nan_to_num(a["IM_NONSS"].data), np.nan_to_num(c["IM_NONSS"].data))
