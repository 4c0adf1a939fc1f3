import pytest

from ioi.errors import ConfigError
from ioi.sexconfig import DEFAULTS, read_sexconfig


def test_reads_detection_keys_and_ignores_the_rest(tmp_path):
    p = tmp_path / "registration.sex"
    p.write_text("# SExtractor configuration\nCATALOG_NAME  test.cat\nDETECT_MINAREA   8   # pixels\n"
                 "DETECT_THRESH    3.5,3.5\nANALYSIS_THRESH 2\n")
    assert read_sexconfig(p) == {"thresh": 3.5, "minarea": 8}


def test_defaults_for_absent_keys_and_errors(tmp_path):
    p = tmp_path / "empty.sex"
    p.write_text("# nothing\n")
    assert read_sexconfig(p) == DEFAULTS
    with pytest.raises(ConfigError, match="not found"):
        read_sexconfig(tmp_path / "missing.sex")
    bad = tmp_path / "bad.sex"
    bad.write_text("DETECT_THRESH high\n")
    with pytest.raises(ConfigError, match="bad.sex:1"):
        read_sexconfig(bad)


def test_pipeline_uses_the_configuration(tmp_path):
    from ioi.config import load_settings
    from ioi.discovery import discover
    from ioi.errors import IoiError
    from ioi.pipeline import reduce_multrun
    from ioi.simulate import simulate

    sim = simulate(tmp_path / "sim", size=256, dithers=2, seed=3)
    pipe, paths = load_settings(pipeline_ini=sim.pipeline_ini, paths_ini=sim.paths_ini)
    pipe = pipe.replace("registration", use_sexconfig=True, sexconfig_filename="registration.sex")
    (multrun,) = discover(sim.raw_dir)
    with pytest.raises(IoiError, match="registration.sex"):
        reduce_multrun(multrun, pipe, paths, tmp_path / "out")
    (paths.config_dir / "registration.sex").write_text("DETECT_THRESH 1e6\nDETECT_MINAREA 5\n")
    # an absurd threshold finds no stars: registration fails (non-fatal, code 18)
    result = reduce_multrun(multrun, pipe, paths, tmp_path / "out2")
    assert any(code == 18 for code, _ in result.warnings)
    assert result.l2_product is None and len(result.l1_products) == 2
