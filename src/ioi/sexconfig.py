"""The original's SExtractor configuration for registration (``registration.sex``).

With ``[registration] use_sexconfig = 1`` the original ran SExtractor with
that file; we detect with ``sep`` and take from it the settings sep has an
equivalent for: ``DETECT_THRESH`` (sigma) and ``DETECT_MINAREA`` (pixels).
Other keys are ignored (logged at debug level).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ioi.errors import ConfigError, ExitCode

log = logging.getLogger(__name__)

#: sep's detection defaults used without a configuration file.
DEFAULTS = {"thresh": 5.0, "minarea": 5}


def read_sexconfig(path) -> dict:
    """``{"thresh": float, "minarea": int}`` from a SExtractor ``.sex`` file (defaults for absent keys)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"[registration] sexconfig_filename: file not found: {path}",
                          exit_code=ExitCode.CONFIG_KEY_MISSING)
    out = dict(DEFAULTS)
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        key, _, value = text.partition(" ")
        value = value.strip().split(",")[0].strip()
        try:
            if key == "DETECT_THRESH":
                out["thresh"] = float(value)
            elif key == "DETECT_MINAREA":
                out["minarea"] = int(float(value))
            else:
                log.debug("%s:%d: %s has no sep equivalent, ignored", path, number, key)
        except ValueError:
            raise ConfigError(f"{path}:{number}: bad value {value!r} for {key}",
                              exit_code=ExitCode.CONFIG_KEY_MISSING) from None
    return out
