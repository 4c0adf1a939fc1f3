"""Accuracy figures against the simulator's truth (issue 4 point 5), two-pass sky on and off.

Simulates the standard full-size 9-dither multrun (SHIFT) and a 1024x1024
multrun with rotation and scale (RSCALE), reduces each with the two-pass sky
on and off, and prints: the sky-subtracted median away from stars in units of
the pixel noise, the registration error against the true positions, the stack
/ single-frame half-light-radius ratio, and the stack's aperture photometry
against a noise-free truth image.  Usage: ``python benchmarks/truth_figures.py
[--size 2048] [--out bench_out/truth]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import _truth as T  # noqa: E402

from ioi.config import load_settings  # noqa: E402
from ioi.discovery import discover  # noqa: E402
from ioi.pipeline import reduce_multrun  # noqa: E402
from ioi.simulate import simulate  # noqa: E402


def figures(sim, out, multrun) -> dict:
    rep = json.loads((out / f"{multrun.name}_report.json").read_text())
    sky = []
    for d in range(1, len(multrun.dithers) + 1):
        med, sig = T.sky_residual_sigma(out / multrun.l1_name(d), sim.out_dir, d)
        sky.append(med / sig)
    reg = T.registration_error(rep, sim.out_dir)
    stack, _ = T.read_ext(out / multrun.l2_name(), "SK_SS")
    var, _ = T.read_ext(out / multrun.l2_name(), "SK_SS_VAR")
    single, _ = T.read_ext(out / multrun.l1_name(1), "IM_SS")
    cat = T.photometry_stars(sim.out_dir, stack.shape, min_flux=20000)
    r1 = T.half_light_radius(single, cat["x_ref"], cat["y_ref"])
    r2 = T.half_light_radius(stack, cat["x_ref"], cat["y_ref"])
    ok = (r1 > 0) & (r2 > 0)
    expected_image = T.truth_star_image(sim.out_dir, stack.shape)
    expected_image[~np.isfinite(stack)] = np.nan
    flux, err, masked = T.aperture_photometry(stack, var, cat["x_ref"], cat["y_ref"])
    expected, _, _ = T.aperture_photometry(expected_image, np.zeros_like(stack), cat["x_ref"], cat["y_ref"])
    good = ~masked & np.isfinite(flux) & (expected > 0)
    z = (flux[good] - expected[good]) / err[good]
    bx, by = T.blank_positions(sim.out_dir, stack.shape)
    bflux, berr, bmasked = T.aperture_photometry(stack, var, bx, by)
    return {
        "sky_median_over_sigma_max_abs": float(np.max(np.abs(sky))),
        "sky_median_over_sigma": [round(v, 4) for v in sky],
        "registration_rms_px_max": float(max(reg)),
        "stack_to_single_half_light_radius": float(np.median(r2[ok] / r1[ok])),
        "photometry_stars": int(good.sum()),
        "photometry_median_ratio": float(np.median(flux[good] / expected[good])),
        "photometry_robust_std_z": T.robust_std(z),
        "blank_sky_robust_std_z": T.robust_std((bflux / berr)[~bmasked & np.isfinite(bflux)]),
        "stage_seconds": rep["stage_seconds"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--out", type=Path, default=Path("bench_out/truth"))
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    results = {}
    cases = {"SHIFT": dict(size=args.size, seed=7),
             "RSCALE": dict(size=min(args.size, 1024), seed=8, rotation_deg=0.4, scale=1.003)}
    for name, kw in cases.items():
        sim = simulate(args.out / name / "sim", dithers=9, **kw)
        pipe, paths = load_settings(pipeline_ini=sim.pipeline_ini, paths_ini=sim.paths_ini)
        (multrun,) = discover(sim.raw_dir)
        for two_pass in (True, False):
            out = args.out / name / f"out_twopass{int(two_pass)}"
            reduce_multrun(multrun, pipe.replace("sky_subtraction", mask_sources=two_pass), paths, out)
            results[f"{name} two-pass {'on' if two_pass else 'off'}"] = figures(sim, out, multrun)
    for key, fig in results.items():
        print(f"{key}: sky |median|/sigma max {fig['sky_median_over_sigma_max_abs']:.3f}; "
              f"registration rms max {fig['registration_rms_px_max']:.4f} px; "
              f"HLR stack/single {fig['stack_to_single_half_light_radius']:.4f}; "
              f"photometry {fig['photometry_stars']} stars, median ratio {fig['photometry_median_ratio']:.5f}, "
              f"robust std(z) {fig['photometry_robust_std_z']:.2f} (blank sky {fig['blank_sky_robust_std_z']:.2f})")
    (args.out / "truth_figures.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
