"""ioi: reduction pipeline for Teledyne HAWAII-2RG near-infrared imagers (LT IO:I)."""

__version__ = "0.1.0"

from ioi.errors import ExitCode, IoiError  # noqa: E402,F401
from ioi.frame import DQ, Frame, Ramp  # noqa: E402,F401
