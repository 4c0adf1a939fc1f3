"""Settings: the original's ``pipeline.ini`` and ``paths.ini``, typed and validated.

The INI format users already have keeps working: sections and keys as in
SPEC section 2, ``key = value`` or ``key: value``, trailing ``; comments``.
When an INI file is given, every key the original reads must be present
(missing: exit 8 naming section and key); keys we added (*beyond*) are
optional.  With no INI at all, the original's values are the defaults, so
``ioi reduce`` needs no file.  New users may keep both in one TOML file with
``[pipeline.<section>]`` and ``[paths.<section>]`` tables.
"""

from __future__ import annotations

import configparser
import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from ioi.errors import ConfigError, ExitCode

REFERENCE_METHODS = ("TRIM", "CONSTANT", "CONSTANTOFF", "RAMP", "COLUMN", "FULL")
COMBINATION_METHODS = ("CDS", "FOWLER", "UTR")
SKY_ALGORITHMS = ("MEDIAN", "TUKEY", "HUBER")
GEOMETRIES = ("SHIFT", "RSCALE")
REGISTRATION_ALGORITHMS = ("SCIPY", "IRAF")
STACKING_METHODS = ("MEAN", "COADD", "MEANANDSCALE")
MASK_NAMES = ("FLAT", "LIN")
LINEARITY_FORMS = ("DIFFERENCE", "FACTOR")


@dataclass(frozen=True)
class GeneralSettings:
    write_output: bool = True


@dataclass(frozen=True)
class ReferenceSettings:
    do: bool = True
    hard: bool = False
    quit: bool = False
    method: str = "RAMP"


@dataclass(frozen=True)
class CombinationSettings:
    do: bool = True
    hard: bool = False
    quit: bool = False
    method: str = "FOWLER"
    fowler_pairs: int = 2
    fowler_bodge: float = 0.0
    # beyond the original
    saturation_level: float = 65535.0  # raw ADU at or above which a read is saturated
    jump_sigma: float = 5.0  # UTR cosmic-ray jump threshold
    read_noise: float = 0.0  # ADU per read; 0 = estimate from the reference pixels


@dataclass(frozen=True)
class NonlinearitySettings:
    do: bool = True
    hard: bool = False
    quit: bool = False
    order: int = 3
    # beyond: DIFFERENCE = exact poly(x+lost) - poly(lost); FACTOR = the original's x*poly(x+lost)/(x+lost)
    form: str = "DIFFERENCE"


@dataclass(frozen=True)
class FlatSettings:
    do: bool = True
    hard: bool = False
    quit: bool = False


@dataclass(frozen=True)
class BadPixelSettings:
    do: bool = True
    hard: bool = False
    quit: bool = False
    which: tuple = ("FLAT", "LIN")
    bad_post_register_threshold: float = 20.0


@dataclass(frozen=True)
class SkySettings:
    do: bool = True
    hard: bool = False
    quit: bool = False
    smoothing_box_size: int = 5
    bg_sigma_clip: float = 3.0
    peers_only: bool = True
    make_algorithm: str = "MEDIAN"
    max_robust_iterations: int = 50
    max_robust_unsolved_percentage: float = 1.0
    # beyond: second pass with sources masked
    mask_sources: bool = True


@dataclass(frozen=True)
class RegistrationSettings:
    do: bool = True
    hard: bool = False
    quit: bool = False
    fit_geometry: str = "SHIFT"
    registration_algorithm: str = "SCIPY"
    use_sexconfig: bool = False
    sexconfig_filename: str = "registration.sex"
    do_bad_region: int = 0
    bad_region1: str = "0:0,0:0"
    bad_region2: str = "0:0,0:0"


@dataclass(frozen=True)
class StackingSettings:
    do: bool = True
    hard: bool = False
    quit: bool = False
    method: str = "MEAN"
    # beyond: sigma-clipped mean (0 = plain mean as the original)
    clip_sigma: float = 0.0


@dataclass(frozen=True)
class PipelineConfig:
    general: GeneralSettings = field(default_factory=GeneralSettings)
    reference_subtraction: ReferenceSettings = field(default_factory=ReferenceSettings)
    frame_combination: CombinationSettings = field(default_factory=CombinationSettings)
    nonlinearity_corrections: NonlinearitySettings = field(default_factory=NonlinearitySettings)
    flatfielding: FlatSettings = field(default_factory=FlatSettings)
    bad_pix_masking: BadPixelSettings = field(default_factory=BadPixelSettings)
    sky_subtraction: SkySettings = field(default_factory=SkySettings)
    registration: RegistrationSettings = field(default_factory=RegistrationSettings)
    stacking: StackingSettings = field(default_factory=StackingSettings)
    source: str = "built-in defaults"

    def replace(self, section: str, **changes) -> PipelineConfig:
        """A copy with some keys of one section changed (validated)."""
        new = dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})
        validate_pipeline(new)
        return new


#: Keys of the original that must be present when an INI file is read.
#: ``hard``/``quit`` are optional ("most stages have them"), beyond keys too.
REQUIRED_KEYS = {
    "general": (),
    "reference_subtraction": ("do", "method"),
    "frame_combination": ("do", "method", "fowler_pairs", "fowler_bodge"),
    "nonlinearity_corrections": ("do", "order"),
    "flatfielding": ("do",),
    "bad_pix_masking": ("do", "which", "bad_post_register_threshold"),
    "sky_subtraction": ("do", "smoothing_box_size", "bg_sigma_clip", "peers_only", "make_algorithm",
                        "max_robust_iterations", "max_robust_unsolved_percentage"),
    "registration": ("do", "fit_geometry", "registration_algorithm"),
    "stacking": ("do", "method"),
}


@dataclass(frozen=True)
class PathsConfig:
    """Where calibration files are (``paths.ini``).

    A calibration file is ``path_base / path_config / <dir> / <filename>``; a
    relative ``path_base`` is taken relative to the directory of paths.ini.
    An empty file name means "no such calibration".
    """

    path_base: str = "."
    path_config: str = "config"
    path_man: str = "man"
    path_src: str = "src"
    path_flatfielding_corrections: str = "flatfielding"
    flat_coeff_filename: str = ""
    flat_bad_pix_filename: str = ""
    path_nonlinearity_corrections: str = "nonlinearity_corrections"
    lin_coeff_filename: str = ""
    lin_bad_pix_filename: str = ""
    anchor: str = "."  # directory that relative path_base is taken from
    source: str = "built-in defaults"

    def _resolve(self, directory: str, filename: str) -> Path | None:
        if not filename:
            return None
        base = Path(self.anchor) / self.path_base
        return (base / self.path_config / directory / filename).resolve()

    @property
    def flat(self) -> Path | None:
        return self._resolve(self.path_flatfielding_corrections, self.flat_coeff_filename)

    @property
    def flat_bad(self) -> Path | None:
        return self._resolve(self.path_flatfielding_corrections, self.flat_bad_pix_filename)

    @property
    def lin_coeffs(self) -> Path | None:
        return self._resolve(self.path_nonlinearity_corrections, self.lin_coeff_filename)

    @property
    def lin_bad(self) -> Path | None:
        return self._resolve(self.path_nonlinearity_corrections, self.lin_bad_pix_filename)

    @property
    def config_dir(self) -> Path:
        return (Path(self.anchor) / self.path_base / self.path_config).resolve()


# ----------------------------------------------------------------------------- parsing

_CHOICE_KEYS = {"method", "make_algorithm", "fit_geometry", "registration_algorithm", "form"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(value, typ, section: str, key: str, origin: str):
    text = str(value).strip()
    where = f"[{section}] {key} in {origin}"
    try:
        if typ is bool:
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if typ is int:
            return int(float(text)) if float(text).is_integer() else int(text)
        if typ is float:
            return float(text)
        if typ is tuple:
            return tuple(s.strip().upper() for s in text.split(",") if s.strip())
        return text
    except ValueError:
        kind = {bool: "0 or 1", int: "an integer", float: "a number"}.get(typ, "a value")
        raise ConfigError(f"bad value {text!r} for {where}: expected {kind}",
                          exit_code=ExitCode.CONFIG_KEY_MISSING) from None


def _section_from_mapping(cls, section: str, mapping, origin: str, *, strict: bool):
    kwargs = {}
    hints = {f.name: f.type for f in fields(cls)}
    types = {"bool": bool, "int": int, "float": float, "str": str, "tuple": tuple}
    if strict:
        for key in REQUIRED_KEYS.get(section, ()):
            if key not in mapping:
                raise ConfigError(f"missing key [{section}] {key} in {origin}",
                                  exit_code=ExitCode.CONFIG_KEY_MISSING)
    for key, value in mapping.items():
        if key not in hints:
            continue  # unknown keys are tolerated (the original's files carry extras)
        kwargs[key] = _convert(value, types[hints[key]], section, key, origin)
        if key in _CHOICE_KEYS:
            kwargs[key] = kwargs[key].upper()
    return cls(**kwargs)


def _read_ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None)
    parser.optionxform = str.lower
    if not path.is_file():
        raise ConfigError(f"configuration file not found: {path}", exit_code=ExitCode.CONFIG_KEY_MISSING)
    try:
        parser.read(path)
    except configparser.Error as exc:
        msg = " ".join(str(exc).split())
        raise ConfigError(f"cannot parse {path}: {msg}", exit_code=ExitCode.CONFIG_KEY_MISSING) from None
    return parser


_PIPELINE_SECTIONS = [f.name for f in fields(PipelineConfig) if f.name != "source"]


def _pipeline_from_sections(sections, origin: str, *, strict: bool) -> PipelineConfig:
    values = {}
    for f in fields(PipelineConfig):
        if f.name == "source":
            continue
        cls = f.default_factory
        if f.name in sections:
            values[f.name] = _section_from_mapping(cls, f.name, sections[f.name], origin, strict=strict)
        elif strict and REQUIRED_KEYS.get(f.name):
            raise ConfigError(f"missing section [{f.name}] in {origin}", exit_code=ExitCode.CONFIG_KEY_MISSING)
        else:
            values[f.name] = cls()
    cfg = PipelineConfig(**values, source=origin)
    validate_pipeline(cfg)
    return cfg


def read_pipeline_ini(path) -> PipelineConfig:
    """Read the original's ``pipeline.ini``."""
    path = Path(path)
    parser = _read_ini(path)
    sections = {name: dict(parser[name]) for name in parser.sections()}
    return _pipeline_from_sections(sections, str(path), strict=True)


_PATHS_KEYS = {
    "general": {"path_base": "path_base", "path_config": "path_config", "path_man": "path_man",
                "path_src": "path_src"},
    "flatfielding": {"path_flatfielding_corrections": "path_flatfielding_corrections",
                     "coeff_filename": "flat_coeff_filename", "bad_pix_filename": "flat_bad_pix_filename"},
    "nonlinearity_corrections": {"path_nonlinearity_corrections": "path_nonlinearity_corrections",
                                 "coeff_filename": "lin_coeff_filename",
                                 "bad_pix_filename": "lin_bad_pix_filename"},
}


def _paths_from_sections(sections, origin: str, anchor: Path, *, strict: bool) -> PathsConfig:
    kwargs = {}
    for section, keys in _PATHS_KEYS.items():
        if section not in sections:
            if strict:
                raise ConfigError(f"missing section [{section}] in {origin}", exit_code=ExitCode.CONFIG_KEY_MISSING)
            continue
        for key, attr in keys.items():
            if key not in sections[section]:
                if strict:
                    raise ConfigError(f"missing key [{section}] {key} in {origin}",
                                      exit_code=ExitCode.CONFIG_KEY_MISSING)
                continue
            kwargs[attr] = str(sections[section][key]).strip()
    return PathsConfig(**kwargs, anchor=str(anchor), source=origin)


def read_paths_ini(path) -> PathsConfig:
    """Read the original's ``paths.ini``."""
    path = Path(path)
    parser = _read_ini(path)
    sections = {name: dict(parser[name]) for name in parser.sections()}
    return _paths_from_sections(sections, str(path), path.parent.resolve(), strict=True)


def read_toml(path) -> tuple[PipelineConfig, PathsConfig]:
    """Read one TOML file holding ``[pipeline.*]`` and ``[paths.*]`` tables.

    Keys left out take the built-in defaults (TOML is the forgiving format).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file not found: {path}", exit_code=ExitCode.CONFIG_KEY_MISSING)
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot parse {path}: {exc}", exit_code=ExitCode.CONFIG_KEY_MISSING) from None
    pipe = {k: {kk: _toml_value(vv) for kk, vv in v.items()} for k, v in data.get("pipeline", {}).items()}
    paths = {k: {kk: str(vv) for kk, vv in v.items()} for k, v in data.get("paths", {}).items()}
    return (_pipeline_from_sections(pipe, str(path), strict=False),
            _paths_from_sections(paths, str(path), path.parent.resolve(), strict=False))


def _toml_value(value):
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def load_settings(*, pipeline_ini=None, paths_ini=None, toml=None) -> tuple[PipelineConfig, PathsConfig]:
    """Effective settings: TOML first (if given), then the INI files override it."""
    pipe, paths = (read_toml(toml) if toml else (PipelineConfig(), PathsConfig()))
    if pipeline_ini:
        pipe = read_pipeline_ini(pipeline_ini)
    if paths_ini:
        paths = read_paths_ini(paths_ini)
    return pipe, paths


# ----------------------------------------------------------------------------- validation

def _check_choice(value: str, allowed, section: str, key: str, code: ExitCode) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown value {value!r} for [{section}] {key}; allowed: {', '.join(allowed)}",
                          exit_code=code)


def validate_pipeline(cfg: PipelineConfig) -> None:
    """Check every setting's value; raise ConfigError with the SPEC's exit code."""
    _check_choice(cfg.reference_subtraction.method, REFERENCE_METHODS, "reference_subtraction", "method",
                  ExitCode.UNKNOWN_REFERENCE_METHOD)
    _check_choice(cfg.frame_combination.method, COMBINATION_METHODS, "frame_combination", "method",
                  ExitCode.UNKNOWN_COMBINATION_METHOD)
    _check_choice(cfg.sky_subtraction.make_algorithm, SKY_ALGORITHMS, "sky_subtraction", "make_algorithm",
                  ExitCode.UNKNOWN_SKY_ALGORITHM)
    _check_choice(cfg.registration.registration_algorithm, REGISTRATION_ALGORITHMS, "registration",
                  "registration_algorithm", ExitCode.UNKNOWN_REGISTRATION_METHOD)
    _check_choice(cfg.registration.fit_geometry, GEOMETRIES, "registration", "fit_geometry",
                  ExitCode.UNKNOWN_REGISTRATION_METHOD)
    _check_choice(cfg.stacking.method, STACKING_METHODS, "stacking", "method", ExitCode.UNKNOWN_STACKING_METHOD)
    _check_choice(cfg.nonlinearity_corrections.form, LINEARITY_FORMS, "nonlinearity_corrections", "form",
                  ExitCode.CONFIG_KEY_MISSING)
    for name in cfg.bad_pix_masking.which:
        _check_choice(name, MASK_NAMES, "bad_pix_masking", "which", ExitCode.CONFIG_KEY_MISSING)
    checks = [
        (cfg.frame_combination.fowler_pairs >= 1, "frame_combination", "fowler_pairs", "must be >= 1"),
        (cfg.nonlinearity_corrections.order >= 1, "nonlinearity_corrections", "order", "must be >= 1"),
        (cfg.sky_subtraction.smoothing_box_size >= 1, "sky_subtraction", "smoothing_box_size", "must be >= 1"),
        (cfg.sky_subtraction.bg_sigma_clip > 0, "sky_subtraction", "bg_sigma_clip", "must be > 0"),
        (cfg.sky_subtraction.max_robust_iterations >= 1, "sky_subtraction", "max_robust_iterations", "must be >= 1"),
        (0 <= cfg.sky_subtraction.max_robust_unsolved_percentage <= 100, "sky_subtraction",
         "max_robust_unsolved_percentage", "must be within 0-100"),
        (0 <= cfg.bad_pix_masking.bad_post_register_threshold <= 100, "bad_pix_masking",
         "bad_post_register_threshold", "must be within 0-100"),
        (cfg.registration.do_bad_region in (0, 1, 2), "registration", "do_bad_region", "must be 0, 1 or 2"),
        (cfg.frame_combination.jump_sigma > 0, "frame_combination", "jump_sigma", "must be > 0"),
        (cfg.frame_combination.read_noise >= 0, "frame_combination", "read_noise", "must be >= 0"),
        (cfg.stacking.clip_sigma >= 0, "stacking", "clip_sigma", "must be >= 0"),
    ]
    for ok, section, key, why in checks:
        if not ok:
            value = getattr(getattr(cfg, section), key)
            raise ConfigError(f"bad value {value!r} for [{section}] {key}: {why}",
                              exit_code=ExitCode.CONFIG_KEY_MISSING)


# ----------------------------------------------------------------------------- rendering

def _fmt(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def render_pipeline_ini(cfg: PipelineConfig) -> str:
    """The settings as a ``pipeline.ini`` the original (and we) can read."""
    lines = [f"; effective pipeline settings (from {cfg.source})"]
    for name in _PIPELINE_SECTIONS:
        section = getattr(cfg, name)
        lines.append(f"\n[{name}]")
        for f in fields(section):
            lines.append(f"{f.name} = {_fmt(getattr(section, f.name))}")
    return "\n".join(lines) + "\n"


def render_paths_ini(paths: PathsConfig) -> str:
    lines = [f"; effective paths (from {paths.source})"]
    for section, keys in _PATHS_KEYS.items():
        lines.append(f"\n[{section}]")
        for key, attr in keys.items():
            lines.append(f"{key} = {getattr(paths, attr)}")
    lines.append("\n; resolved calibration files")
    for what in ("flat", "flat_bad", "lin_coeffs", "lin_bad"):
        lines.append(f";   {what}: {getattr(paths, what) or '(none)'}")
    return "\n".join(lines) + "\n"
