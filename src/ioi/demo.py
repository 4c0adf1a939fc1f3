"""``make demo``: simulate an IO:I night and reduce it, printing where everything is."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ioi.demo", description=__doc__)
    p.add_argument("--dir", type=Path, default=Path("demo"), help="where to put the simulation and products")
    p.add_argument("--size", type=int, default=2048, help="detector size (2048 = real IO:I)")
    p.add_argument("--dithers", type=int, default=9)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    from ioi.cli import main as ioi_main

    sim = args.dir / "sim"
    out = args.dir / "reduced"
    for d in (sim, out):
        if d.exists():
            shutil.rmtree(d)
    t0 = time.perf_counter()
    print(f"== simulating a {args.dithers}-dither IO:I multrun ({args.size}x{args.size}) into {sim}", flush=True)
    rc = ioi_main(["simulate", "--out", str(sim), "--size", str(args.size), "--dithers", str(args.dithers),
                   "--seed", str(args.seed), "--log", "WARNING"])
    if rc:
        return rc
    print(f"== reducing {sim / 'raw'} into {out}", flush=True)
    rc = ioi_main(["reduce", str(sim / "raw"), "--out", str(out), "--pipeline-ini", str(sim / "config" / "pipeline.ini"),
                   "--paths-ini", str(sim / "config" / "paths.ini"), "--log", "WARNING"])
    print(f"== demo finished in {time.perf_counter() - t0:.1f} s")
    products = sorted(out.glob("*.fits"))
    for prod in products:
        print(f"product: {prod}")
    for rep in sorted(out.glob("*_report.json")):
        print(f"quality report: {rep}")
    print(f"truth of the simulation: {sim / 'truth'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
