"""Measurements of reduced products against the simulator's truth (shared by the truth tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import sep
from astropy.io import fits
from astropy.table import Table


def truth(sim_dir) -> dict:
    return json.loads((Path(sim_dir) / "truth" / "truth.json").read_text())


def stars(sim_dir, dither=None) -> Table:
    name = "stars.ecsv" if dither is None else f"stars_d{dither}.ecsv"
    return Table.read(Path(sim_dir) / "truth" / name)


def star_mask(sim_dir, dither, shape, *, radius=18) -> np.ndarray:
    """True within ``radius`` px of any catalogue star of ``dither`` (stripped pixels)."""
    t = stars(sim_dir, dither)
    ny, nx = shape
    x = np.round(np.asarray(t["x"])).astype(int)
    y = np.round(np.asarray(t["y"])).astype(int)
    keep = (x > -radius) & (x < nx + radius) & (y > -radius) & (y < ny + radius)
    dy, dx = np.nonzero(np.hypot(*np.mgrid[-radius:radius + 1, -radius:radius + 1]) <= radius)
    yy = (y[keep][:, None] + dy[None, :] - radius).ravel()
    xx = (x[keep][:, None] + dx[None, :] - radius).ravel()
    inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    mask = np.zeros(shape, bool)
    mask[yy[inside], xx[inside]] = True
    return mask


def read_ext(path, ext) -> tuple[np.ndarray, fits.Header]:
    with fits.open(path) as h:
        return np.asarray(h[ext].data, dtype=np.float32).astype(np.float32, copy=True), h[ext].header.copy()


def sky_residual_sigma(product, sim_dir, dither) -> tuple[float, float]:
    """Median of IM_SS away from stars, and the per-pixel sigma from IM_SS_VAR."""
    ss, _ = read_ext(product, "IM_SS")
    var, _ = read_ext(product, "IM_SS_VAR")
    mask = star_mask(sim_dir, dither, ss.shape) | ~np.isfinite(ss)
    return float(np.median(ss[~mask])), float(np.sqrt(np.nanmedian(var[~mask])))


def registration_error(report: dict, sim_dir, *, min_snr_flux=0.0) -> list[float]:
    """Per dither: rms (px) of the fitted transform applied to true reference
    positions minus the true positions in that dither, over stars on chip."""
    ref = stars(sim_dir)
    out = []
    for entry in report["dithers"]:
        d = entry["dither"]
        m = np.asarray(entry["registration"]["matrix_ref_to_frame"])
        t = stars(sim_dir, d)
        on = np.asarray(t["on_chip"]) & (np.asarray(t["flux_e_s"]) > min_snr_flux)
        ids = np.asarray(t["id"])[on]
        lookup = {int(i): k for k, i in enumerate(np.asarray(ref["id"]))}
        k = np.array([lookup[int(i)] for i in ids])
        xr, yr = np.asarray(ref["x_ref"])[k], np.asarray(ref["y_ref"])[k]
        px = m[0, 0] * xr + m[0, 1] * yr + m[0, 2]
        py = m[1, 0] * xr + m[1, 1] * yr + m[1, 2]
        dx = px - np.asarray(t["x"])[on]
        dy = py - np.asarray(t["y"])[on]
        out.append(float(np.sqrt(np.mean(dx**2 + dy**2))))
    return out


def isolated_bright_stars(sim_dir, dither, shape, *, min_flux, max_peak=30000.0, isolation=40.0, edge=50):
    """Catalogue rows of unsaturated stars with no comparable neighbour nearby, well inside the chip."""
    t = stars(sim_dir, dither)
    x, y = np.asarray(t["x"]), np.asarray(t["y"])
    f = np.asarray(t["flux_e_s"])
    ok = (np.asarray(t["on_chip"]) & (f > min_flux) & (np.asarray(t["peak_adu"]) < max_peak)
          & ~np.asarray(t["saturated"]) & (x > edge) & (y > edge) & (x < shape[1] - edge) & (y < shape[0] - edge))
    d2 = (x[:, None] - x[None, :]) ** 2 + (y[:, None] - y[None, :]) ** 2
    np.fill_diagonal(d2, np.inf)
    # nothing above 0.3 % of the star's flux inside the aperture reach (22 px + 16 px stamp),
    # nothing above 5 % that could reach the background annulus
    neighbour = ((d2 < isolation**2) & (f[None, :] > 0.003 * f[:, None])) | ((d2 < 62.0**2) & (f[None, :] > 0.05 * f[:, None]))
    ok &= ~neighbour.any(axis=1)
    return t[ok]


def truth_star_image(sim_dir, shape) -> np.ndarray:
    """Noise-free image of every catalogue star in the reference (dither 1) frame,
    in ADU over the exposure, without flat or sky: what a perfect stack shows."""
    from ioi._simphysics import render_stars

    tr = truth(sim_dir)
    ref = stars(sim_dir)
    flux_adu = np.asarray(ref["flux_e_s"]) / tr["gain_true"] * tr["exptime"]
    image, _ = render_stars(np.asarray(ref["x_ref"]), np.asarray(ref["y_ref"]), flux_adu, shape,
                            fwhm=tr["moffat"]["fwhm"], beta=tr["moffat"]["beta"], half=tr["moffat"]["stamp_half"])
    return image


def photometry_stars(sim_dir, shape, *, min_flux, edge=50, saturated_clearance=70.0):
    """Reference-frame catalogue rows of bright stars unsaturated in every dither,
    away from the edges and from any saturated star."""
    tr = truth(sim_dir)
    ref = stars(sim_dir)
    ids = np.asarray(ref["id"])
    sat = np.zeros(len(ref), bool)
    onall = np.ones(len(ref), bool)
    for d in range(1, tr["dithers"] + 1):
        t = stars(sim_dir, d)
        lookup = dict(zip(np.asarray(t["id"]).tolist(), range(len(t))))
        k = np.array([lookup.get(int(i), -1) for i in ids])
        has = k >= 0
        sat[has] |= np.asarray(t["saturated"])[k[has]] | (np.asarray(t["peak_adu"])[k[has]] > 30000)
        onall &= has & np.where(has, np.asarray(t["on_chip"])[np.maximum(k, 0)], False)
    x, y = np.asarray(ref["x_ref"]), np.asarray(ref["y_ref"])
    f = np.asarray(ref["flux_e_s"])
    near_sat = np.zeros(len(ref), bool)
    if sat.any():
        d2 = (x[:, None] - x[sat][None, :]) ** 2 + (y[:, None] - y[sat][None, :]) ** 2
        near_sat = (d2 < saturated_clearance**2).any(axis=1)
    ok = (onall & ~sat & ~near_sat & (f > min_flux) & (x > edge) & (y > edge)
          & (x < shape[1] - edge) & (y < shape[0] - edge))
    return ref[ok]


def half_light_radius(image, x, y, *, rmax=20.0) -> np.ndarray:
    """sep half-flux radii at (x, y) of a background-free image (NaN -> 0)."""
    data = np.ascontiguousarray(np.nan_to_num(image, nan=0.0), dtype=np.float64)
    r, _ = sep.flux_radius(data, np.asarray(x, float), np.asarray(y, float), np.full(len(x), rmax), 0.5,
                           subpix=5)
    return np.asarray(r)


def aperture_photometry(image, variance, x, y, *, radius=22.0, annulus=(30.0, 45.0)):
    """Aperture sums minus the annulus MEAN background (sep's bkgann), with errors
    from the variance plane; returns (flux, err, masked).

    The mean is linear, so the same measurement on a noise-free truth image
    (with the same NaN pixels) differs from it by the sky alone, faint stars
    in the annulus included; a median would not be.  NaN pixels are masked.
    """
    data = np.ascontiguousarray(np.nan_to_num(image, nan=0.0), dtype=np.float64)
    var = np.ascontiguousarray(np.nan_to_num(variance, nan=0.0), dtype=np.float64)
    bad = np.ascontiguousarray(~np.isfinite(image))
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    flux, err, flag = sep.sum_circle(data, x, y, radius, var=var, mask=bad, bkgann=annulus, subpix=5)
    # the error of the annulus mean, scaled to the aperture area (not in sep's err)
    ones = np.ascontiguousarray(np.isfinite(image), dtype=np.float64)
    ann_var, _, _ = sep.sum_circann(var, x, y, annulus[0], annulus[1], mask=bad, subpix=5)
    ann_n, _, _ = sep.sum_circann(ones, x, y, annulus[0], annulus[1], mask=bad, subpix=5)
    area = np.pi * radius**2
    err = np.sqrt(np.asarray(err) ** 2 + area**2 * np.asarray(ann_var) / np.maximum(np.asarray(ann_n), 1.0) ** 2)
    return np.asarray(flux), err, (flag & sep.APER_HASMASKED) != 0


def blank_positions(sim_dir, shape, *, n=300, clearance=60.0, edge=50, seed=0):
    """Random (x, y) in the reference frame at least ``clearance`` px from any catalogue star."""
    ref = stars(sim_dir)
    rng = np.random.default_rng(seed)
    x = rng.uniform(edge, shape[1] - edge, 20 * n)
    y = rng.uniform(edge, shape[0] - edge, 20 * n)
    sx, sy = np.asarray(ref["x_ref"]), np.asarray(ref["y_ref"])
    far = np.ones(x.size, bool)
    for k in range(0, x.size, 500):  # chunks keep the distance matrix small
        d2 = (x[k:k + 500, None] - sx[None, :]) ** 2 + (y[k:k + 500, None] - sy[None, :]) ** 2
        far[k:k + 500] = (d2 > clearance**2).all(axis=1)
    return x[far][:n], y[far][:n]


def robust_std(v) -> float:
    v = np.asarray(v, float)
    return float(1.4826 * np.median(np.abs(v - np.median(v))))
