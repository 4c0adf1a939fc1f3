"""ioi: reduction pipeline for Teledyne HAWAII-2RG near-infrared imagers (LT IO:I)."""

__version__ = "0.1.0"

from ioi.errors import ExitCode, IoiError  # noqa: E402,F401

# The frame types are imported on first use (PEP 562), not with the package:
# ioi.frame imports astropy, which a side process running sep does not need
# (see ioi._sideproc).
_LAZY = {"DQ": "ioi.frame", "Frame": "ioi.frame", "Ramp": "ioi.frame"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ioi' has no attribute {name!r}")


__all__ = ["DQ", "ExitCode", "Frame", "IoiError", "Ramp", "__version__"]
