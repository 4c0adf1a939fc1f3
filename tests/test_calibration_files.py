"""Calibration.check_shape names the file whose array does not fit the science frame."""

import numpy as np
import pytest

from ioi.calibration import Calibration
from ioi.errors import ExitCode, IoiError


@pytest.mark.parametrize("which, expected", [("flat", "flat.fits"), ("lin", "lin_coeffs.fits"),
                                             ("mask", "lin_bad.fits")])
def test_check_shape_names_the_file_at_fault(which, expected):
    good = np.ones((8, 8), np.float32)
    bad = np.ones((6, 6), np.float32)
    cal = Calibration(flat=bad if which == "flat" else good,
                      lin_coeffs=np.ones((4,) + (bad if which == "lin" else good).shape, np.float32),
                      masks={"FLAT": good, "LIN": bad if which == "mask" else good},
                      files={"flat": "flat.fits", "lin": "lin_coeffs.fits", "mask_flat": "flat_bad.fits",
                             "mask_lin": "lin_bad.fits"})
    with pytest.raises(IoiError) as exc:
        cal.check_shape((8, 8))
    assert exc.value.exit_code == ExitCode.DATA_SHAPE_MISMATCH
    assert expected in str(exc.value)
