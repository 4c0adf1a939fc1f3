"""Synthetic dithered star fields with known truth, for the sky/register/stack tests.

Coordinates: (x, y) = (column, row), pixel centres at integers.  Each frame k
sees the reference-frame position ``p`` at ``A_k @ p + t_k`` (the same
convention as :class:`ioi.stages.register.Transform`).  Stars are circular
Gaussians integrated over the pixel (erf), so their centroids are unbiased.
The sky is fixed to the detector (a gradient plus a faint pattern) with a
per-frame level offset; noise is Gaussian with a known sigma.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from astropy.io import fits
from scipy.special import erf

from ioi.frame import DQ, Frame

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@dataclasses.dataclass
class Field:
    frames: list  # list of Frame
    ref_xy: np.ndarray  # (nstars, 2) positions in the reference frame
    flux: np.ndarray  # (nstars,)
    matrices: list  # per frame (2, 3): ref (x, y) -> frame (x, y)
    sources: list  # per frame noiseless source image (ny, nx), float64
    sky: list  # per frame true sky (ny, nx), float64
    noise: float
    fwhm: float
    bad: np.ndarray  # (ny, nx) bool, the NaN bad pixels (same in every frame)

    def frame_xy(self, k: int) -> np.ndarray:
        m = self.matrices[k]
        return self.ref_xy @ m[:, :2].T + m[:, 2]


def similarity(dx=0.0, dy=0.0, rotation_deg=0.0, scale=1.0, centre=None) -> np.ndarray:
    """A (2, 3) matrix: rotation/scale about ``centre`` (default origin) then shift."""
    th = math.radians(rotation_deg)
    a = scale * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    c = np.zeros(2) if centre is None else np.asarray(centre, float)
    t = c - a @ c + np.array([dx, dy])
    return np.hstack([a, t[:, None]])


def render_gaussians(shape, xy, flux, fwhm, *, half=None) -> np.ndarray:
    """Pixel-integrated circular Gaussians at (x, y) with total ``flux`` (loop over sources)."""
    ny, nx = shape
    img = np.zeros(shape)
    sig = fwhm * FWHM_TO_SIGMA
    h = int(math.ceil(6 * sig)) if half is None else half
    s2 = math.sqrt(2.0) * sig
    for (x, y), f in zip(xy, flux):
        x0, x1 = max(int(round(x)) - h, 0), min(int(round(x)) + h + 1, nx)
        y0, y1 = max(int(round(y)) - h, 0), min(int(round(y)) + h + 1, ny)
        if x0 >= x1 or y0 >= y1:
            continue
        ex = np.arange(x0, x1 + 1) - 0.5 - x
        ey = np.arange(y0, y1 + 1) - 0.5 - y
        px = np.diff(0.5 * erf(ex / s2))
        py = np.diff(0.5 * erf(ey / s2))
        img[y0:y1, x0:x1] += f * np.outer(py, px)
    return img


def make_field(*, n_frames=5, shape=(256, 256), n_stars=60, fwhm=3.0, matrices=None,
               flux_range=(3e3, 3e4), sky_level=1000.0, level_offsets=None, gradient=(0.05, -0.03),
               pattern=5.0, noise=10.0, bad_fraction=0.003, extended=None, seed=1,
               asicgain=10, exptime=10.0, margin=40) -> Field:
    """Build ``n_frames`` dithered frames of one star field.

    matrices : list of (2, 3), frame k's map ref -> frame (default: small
        sub-pixel dithers); the star list covers the frame plus ``margin`` px.
    extended : (x, y, flux, fwhm) of one extra extended Gaussian source, in
        reference coordinates, or None.
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    if matrices is None:
        dith = [(0.0, 0.0), (7.3, -4.6), (-5.8, 6.2), (3.4, 9.1), (-8.7, -7.9), (10.2, 2.5),
                (-2.2, -10.4), (6.6, 5.5), (-9.9, 1.7)]
        matrices = [similarity(*dith[k % len(dith)]) for k in range(n_frames)]
    matrices = [np.asarray(m, float) for m in matrices]
    matrices[0] = similarity()  # the first frame is the reference
    ref_xy = np.column_stack([rng.uniform(-margin, nx + margin, n_stars),
                              rng.uniform(-margin, ny + margin, n_stars)])
    flux = np.exp(rng.uniform(np.log(flux_range[0]), np.log(flux_range[1]), n_stars))
    if level_offsets is None:
        level_offsets = rng.uniform(-50, 50, n_frames)
        level_offsets[0] = 0.0
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    base_sky = (sky_level + gradient[0] * (xx - nx / 2) + gradient[1] * (yy - ny / 2)
                + pattern * np.sin(xx / 9.0) * np.cos(yy / 13.0))
    bad = rng.random(shape) < bad_fraction
    frames, sources, skies = [], [], []
    for k in range(n_frames):
        m = matrices[k]
        xy = ref_xy @ m[:, :2].T + m[:, 2]
        src = render_gaussians(shape, xy, flux, fwhm)
        if extended is not None:
            ex, ey, ef, efw = extended
            exy = np.array([[ex, ey]]) @ m[:, :2].T + m[:, 2]
            src += render_gaussians(shape, exy, [ef], efw)
        sky = base_sky + level_offsets[k]
        sci = (sky + src + rng.normal(0.0, noise, shape)).astype(np.float32)
        sci[bad] = np.nan
        q = np.zeros(shape, np.uint32)
        q[bad] = DQ.MASKED | DQ.DO_NOT_USE
        hdr = fits.Header()
        hdr["EXPTIME"] = exptime
        hdr["ASICGAIN"] = asicgain
        hdr["OBJECT"] = "synthetic"
        hdr["DITHER"] = k
        frames.append(Frame(science=sci, variance=np.full(shape, noise**2, np.float32),
                            quality=q, header=hdr))
        sources.append(src)
        skies.append(sky)
    return Field(frames=frames, ref_xy=ref_xy, flux=flux, matrices=matrices, sources=sources,
                 sky=skies, noise=noise, fwhm=fwhm, bad=bad)


def star_free_mask(field: Field, k: int, *, radius=None) -> np.ndarray:
    """True on pixels farther than ``radius`` (default 3 FWHM) from every star in frame k."""
    ny, nx = field.frames[k].shape
    r = 3.0 * field.fwhm if radius is None else radius
    mask = np.ones((ny, nx), bool)
    yy, xx = np.mgrid[0:ny, 0:nx]
    for x, y in field.frame_xy(k):
        x0, x1 = max(int(x - r), 0), min(int(x + r) + 2, nx)
        y0, y1 = max(int(y - r), 0), min(int(y + r) + 2, ny)
        if x0 < x1 and y0 < y1:
            mask[y0:y1, x0:x1] &= (xx[y0:y1, x0:x1] - x) ** 2 + (yy[y0:y1, x0:x1] - y) ** 2 > r * r
    return mask & ~field.bad
