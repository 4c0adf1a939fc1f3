import textwrap

import pytest

from ioi.config import (PathsConfig, PipelineConfig, load_settings, read_paths_ini, read_pipeline_ini, read_toml,
                        render_paths_ini, render_pipeline_ini)
from ioi.errors import ConfigError, ExitCode

ORIGINAL_INI = textwrap.dedent("""\
    [general]
    write_output = 1 ; write L1 files

    [reference_subtraction]
    do = 1
    hard = 0
    quit = 0
    method = RAMP          ; TRIM|CONSTANT|CONSTANTOFF|RAMP|COLUMN|FULL

    [frame_combination]
    do: 1
    hard: 0
    quit: 0
    method: FOWLER
    fowler_pairs: 2
    fowler_bodge: 0.3

    [nonlinearity_corrections]
    do = 1
    hard = 0
    quit = 0
    order = 3

    [flatfielding]
    do = 1
    hard = 0
    quit = 0

    [bad_pix_masking]
    do = 1
    hard = 0
    quit = 0
    which = FLAT,LIN
    bad_post_register_threshold = 20

    [sky_subtraction]
    do = 1
    hard = 0
    quit = 0
    smoothing_box_size = 5
    bg_sigma_clip = 3
    peers_only = 1
    make_algorithm = tukey
    max_robust_iterations = 50
    max_robust_unsolved_percentage = 1

    [registration]
    do = 1
    hard = 0
    quit = 0
    fit_geometry = RSCALE
    registration_algorithm = SCIPY
    use_sexconfig = 0
    sexconfig_filename = registration.sex
    do_bad_region = 1
    bad_region1 = 0:100,512:1024
    bad_region2 = 0:0,0:0

    [stacking]
    do = 1
    hard = 0
    quit = 0
    method = MEAN
    """)


def write(tmp_path, text, name="pipeline.ini"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_reads_original_ini_with_comments_and_colons(tmp_path):
    cfg = read_pipeline_ini(write(tmp_path, ORIGINAL_INI))
    assert cfg.reference_subtraction.method == "RAMP"
    assert cfg.frame_combination.method == "FOWLER" and cfg.frame_combination.fowler_pairs == 2
    assert cfg.frame_combination.fowler_bodge == pytest.approx(0.3)
    assert cfg.sky_subtraction.make_algorithm == "TUKEY"  # case-insensitive values
    assert cfg.bad_pix_masking.which == ("FLAT", "LIN")
    assert cfg.registration.fit_geometry == "RSCALE" and cfg.registration.do_bad_region == 1
    assert cfg.registration.bad_region1 == "0:100,512:1024"
    assert cfg.general.write_output is True
    # beyond keys absent from the original's file take their defaults
    assert cfg.sky_subtraction.mask_sources is True


def test_defaults_are_the_originals():
    cfg = PipelineConfig()
    assert cfg.reference_subtraction.method == "RAMP"
    assert cfg.sky_subtraction.smoothing_box_size == 5 and cfg.sky_subtraction.bg_sigma_clip == 3
    assert cfg.bad_pix_masking.which == ("FLAT", "LIN")
    assert cfg.stacking.method == "MEAN"


@pytest.mark.parametrize("section, key", [
    ("reference_subtraction", "method"), ("frame_combination", "fowler_pairs"), ("sky_subtraction", "peers_only"),
    ("stacking", "do"), ("registration", "fit_geometry"), ("nonlinearity_corrections", "order"),
])
def test_missing_key_is_exit_8_naming_section_and_key(tmp_path, section, key):
    lines = ORIGINAL_INI.splitlines()
    out, current = [], None
    for line in lines:
        if line.startswith("["):
            current = line.strip("[]")
        if current == section and line.split("=")[0].split(":")[0].strip() == key:
            continue
        out.append(line)
    with pytest.raises(ConfigError) as exc:
        read_pipeline_ini(write(tmp_path, "\n".join(out)))
    assert exc.value.exit_code == ExitCode.CONFIG_KEY_MISSING
    assert f"[{section}] {key}" in str(exc.value)


def test_missing_section_is_exit_8(tmp_path):
    text = ORIGINAL_INI.replace("[stacking]\ndo = 1\nhard = 0\nquit = 0\nmethod = MEAN\n", "")
    with pytest.raises(ConfigError, match=r"missing section \[stacking\]") as exc:
        read_pipeline_ini(write(tmp_path, text))
    assert exc.value.exit_code == 8


@pytest.mark.parametrize("old, new, code, allowed", [
    ("method = RAMP ", "method = WOBBLE ", ExitCode.UNKNOWN_REFERENCE_METHOD, "TRIM, CONSTANT"),
    ("method: FOWLER", "method: FANCY", ExitCode.UNKNOWN_COMBINATION_METHOD, "CDS, FOWLER, UTR"),
    ("make_algorithm = tukey", "make_algorithm = mode", ExitCode.UNKNOWN_SKY_ALGORITHM, "MEDIAN, TUKEY, HUBER"),
    ("registration_algorithm = SCIPY", "registration_algorithm = ASTROMETRY", ExitCode.UNKNOWN_REGISTRATION_METHOD,
     "SCIPY, IRAF"),
    ("method = MEAN", "method = MEDIAN", ExitCode.UNKNOWN_STACKING_METHOD, "MEAN, COADD, MEANANDSCALE"),
    ("fit_geometry = RSCALE", "fit_geometry = WARP", ExitCode.UNKNOWN_REGISTRATION_METHOD, "SHIFT, RSCALE"),
    ("which = FLAT,LIN", "which = FLAT,DARK", ExitCode.CONFIG_KEY_MISSING, "FLAT, LIN"),
])
def test_unknown_values_list_the_allowed_ones(tmp_path, old, new, code, allowed):
    assert old in ORIGINAL_INI
    with pytest.raises(ConfigError) as exc:
        read_pipeline_ini(write(tmp_path, ORIGINAL_INI.replace(old, new)))
    assert exc.value.exit_code == code
    assert allowed in str(exc.value)


@pytest.mark.parametrize("old, new, what", [
    ("fowler_pairs: 2", "fowler_pairs: two", "fowler_pairs"),
    ("peers_only = 1", "peers_only = maybe", "peers_only"),
    ("bg_sigma_clip = 3", "bg_sigma_clip = -1", "bg_sigma_clip"),
    ("fowler_pairs: 2", "fowler_pairs: 0", "fowler_pairs"),
    ("max_robust_unsolved_percentage = 1", "max_robust_unsolved_percentage = 150", "max_robust_unsolved"),
    ("do_bad_region = 1", "do_bad_region = 3", "do_bad_region"),
    ("order = 3", "order = 2.5", "order"),
])
def test_bad_values_are_exit_8(tmp_path, old, new, what):
    with pytest.raises(ConfigError) as exc:
        read_pipeline_ini(write(tmp_path, ORIGINAL_INI.replace(old, new)))
    assert exc.value.exit_code == 8 and what in str(exc.value)


def test_unparseable_file_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_pipeline_ini(tmp_path / "nope.ini")
    with pytest.raises(ConfigError, match="cannot parse"):
        read_pipeline_ini(write(tmp_path, "no section header here\nkey = 1\n"))


def test_render_round_trip(tmp_path):
    cfg = read_pipeline_ini(write(tmp_path, ORIGINAL_INI))
    again = read_pipeline_ini(write(tmp_path, render_pipeline_ini(cfg), "again.ini"))
    for name in ("reference_subtraction", "frame_combination", "sky_subtraction", "registration", "stacking"):
        assert getattr(again, name) == getattr(cfg, name)


PATHS_INI = textwrap.dedent("""\
    [general]
    path_base = {base}
    path_config = config ; where configs live
    path_man = man
    path_src = src

    [flatfielding]
    path_flatfielding_corrections = flatfielding
    coeff_filename = flat_20150227.fits
    bad_pix_filename = flat_bad_20150227.fits

    [nonlinearity_corrections]
    path_nonlinearity_corrections = nonlinearity_corrections
    coeff_filename = lin_coeffs_20150227.fits
    bad_pix_filename = lin_bad_20150227.fits
    """)


def test_paths_resolve_absolute_and_relative(tmp_path):
    p = read_paths_ini(write(tmp_path, PATHS_INI.format(base="/data/ioi"), "paths.ini"))
    assert str(p.flat) == "/data/ioi/config/flatfielding/flat_20150227.fits"
    assert str(p.lin_bad) == "/data/ioi/config/nonlinearity_corrections/lin_bad_20150227.fits"
    sub = tmp_path / "cfg"
    sub.mkdir()
    p = read_paths_ini(write(sub, PATHS_INI.format(base=".."), "paths.ini"))
    assert p.lin_coeffs == (tmp_path / "config/nonlinearity_corrections/lin_coeffs_20150227.fits").resolve()
    assert "flat_20150227.fits" in render_paths_ini(p)


def test_paths_missing_key_is_exit_8(tmp_path):
    text = PATHS_INI.format(base="/x").replace("bad_pix_filename = lin_bad_20150227.fits\n", "")
    with pytest.raises(ConfigError, match=r"\[nonlinearity_corrections\] bad_pix_filename") as exc:
        read_paths_ini(write(tmp_path, text, "paths.ini"))
    assert exc.value.exit_code == 8


def test_toml_holds_both_and_ini_overrides(tmp_path):
    toml = write(tmp_path, textwrap.dedent("""\
        [pipeline.stacking]
        method = "COADD"
        [pipeline.sky_subtraction]
        peers_only = false
        mask_sources = false
        [pipeline.bad_pix_masking]
        which = ["LIN"]
        [paths.general]
        path_base = "/cal"
        [paths.flatfielding]
        coeff_filename = "flat.fits"
        """), "ioi.toml")
    pipe, paths = read_toml(toml)
    assert pipe.stacking.method == "COADD" and pipe.sky_subtraction.peers_only is False
    assert pipe.sky_subtraction.mask_sources is False and pipe.bad_pix_masking.which == ("LIN",)
    assert pipe.reference_subtraction.method == "RAMP"  # defaults fill the rest
    assert str(paths.flat) == "/cal/config/flatfielding/flat.fits" and paths.lin_coeffs is None
    pipe2, _ = load_settings(toml=toml, pipeline_ini=write(tmp_path, ORIGINAL_INI))
    assert pipe2.stacking.method == "MEAN"


def test_toml_bad_value_is_exit_code_of_setting(tmp_path):
    toml = write(tmp_path, '[pipeline.stacking]\nmethod = "SUM"\n', "bad.toml")
    with pytest.raises(ConfigError) as exc:
        read_toml(toml)
    assert exc.value.exit_code == ExitCode.UNKNOWN_STACKING_METHOD


def test_replace_validates():
    with pytest.raises(ConfigError):
        PipelineConfig().replace("stacking", method="NOPE")
    assert PathsConfig().flat is None
