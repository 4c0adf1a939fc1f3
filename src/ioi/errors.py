"""Errors a caller can act on, carrying the original pipeline's exit codes.

Every fatal problem is raised as an :class:`IoiError` (or a subclass) whose
message names the file, key or shape at fault.  The command line turns it into
one line on stderr and the exit code; library callers can catch it.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit codes of the original pipeline (SPEC section 5)."""

    SUCCESS = 0
    WORKDIR_EXISTS = 1
    USAGE = 2  # bad command-line value (argparse convention; not in the original)
    NO_FILES = 3
    NO_NOUTPUTS = 4
    UNKNOWN_REFERENCE_METHOD = 5
    LINEARITY_FILE_MISSING = 7
    CONFIG_KEY_MISSING = 8
    UNKNOWN_COMBINATION_METHOD = 10
    TOO_FEW_FILES_CDS = 11
    STACKING_FAILED = 13
    NO_SUITABLE_FILES = 17
    REGISTRATION_FAILED = 18  # non-fatal
    UNKNOWN_REGISTRATION_METHOD = 19
    FLAT_FILE_MISSING = 21
    LINEARITY_SHAPE_MISMATCH = 23
    FLAT_SHAPE_MISMATCH = 24
    SKY_CLIP_EMPTY = 25
    MASK_SHAPE_MISMATCH = 26
    MASK_FILE_MISSING = 27
    DATA_SHAPE_MISMATCH = 29  # science frame does not match the calibration arrays
    SKY_BAD_PIXELS_REMAIN = 30  # non-fatal
    TOO_FEW_FILES_FOWLER = 31
    UNEQUAL_FOWLER_READS = 32
    UNKNOWN_STACKING_METHOD = 33
    UNKNOWN_ASICGAIN = 34  # non-fatal
    UNKNOWN_SKY_ALGORITHM = 38
    BAD_INPUT = 40  # unreadable or malformed input file (not in the original)


#: Codes that the original reports but carries on after.
NON_FATAL = frozenset(
    {ExitCode.REGISTRATION_FAILED, ExitCode.SKY_BAD_PIXELS_REMAIN, ExitCode.UNKNOWN_ASICGAIN}
)


class IoiError(Exception):
    """A fatal, user-facing error with an exit code.

    Parameters
    ----------
    message : str
        One line naming the file, key, setting or shape at fault.
    exit_code : ExitCode
        The original pipeline's exit code for this failure.
    """

    default_code = ExitCode.BAD_INPUT

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        self.exit_code = ExitCode(exit_code if exit_code is not None else self.default_code)

    def __str__(self) -> str:  # one line, always
        return " ".join(str(self.args[0]).split()) if self.args else ""


class ConfigError(IoiError):
    """A setting is missing or has a value outside its allowed set."""

    default_code = ExitCode.CONFIG_KEY_MISSING


class InputError(IoiError):
    """A raw or calibration file is missing, unreadable, or malformed."""

    default_code = ExitCode.BAD_INPUT


class StageError(IoiError):
    """A processing stage cannot run on the data it was given."""

    default_code = ExitCode.BAD_INPUT


class StageWarning(UserWarning):
    """A non-fatal problem that the original reports with an exit code.

    Stages raise it with :func:`warnings.warn`; the pipeline logs it with its
    code and carries on.
    """

    def __init__(self, message: str, *, exit_code: int):
        super().__init__(message)
        self.exit_code = ExitCode(exit_code)
