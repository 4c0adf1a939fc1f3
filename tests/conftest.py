"""Shared fixtures: small hand-made raw files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits


def write_raw(path: Path, data=None, **keywords) -> Path:
    """A tiny raw read: uint16 stored as int16 + BZERO 32768, with header keywords."""
    if data is None:
        data = np.full((16, 16), 20000, dtype=np.uint16)
    hdr = fits.Header()
    defaults = {"NOUTPUTS": 1, "INTTIME": 1.4, "FRMTIME": 1.4, "ASICGAIN": 10}
    for k, v in {**defaults, **keywords}.items():
        if v is not None:
            hdr[k] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(np.asarray(data, dtype=np.uint16), header=hdr).writeto(path, overwrite=True)
    return path


@pytest.fixture
def raw_writer():
    return write_raw
