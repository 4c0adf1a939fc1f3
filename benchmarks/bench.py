"""Benchmark of ``ioi reduce`` on simulated full-size multruns (``make bench``).

For each dither count it simulates a multrun once into ``bench_out/`` (reused
when present), then measures on this machine:

* the time of each pipeline stage (``ReductionResult.stage_seconds`` as written
  to the multrun's JSON report; median of ``--repeat`` runs);
* the wall time of the whole ``ioi reduce`` run as a subprocess (interpreter
  start and imports included) and its peak resident memory (``ru_maxrss`` of
  that very child, from ``os.wait4``);
* the machine's state at each run: the CPU steal during it (time the hypervisor
  gave other guests) and a fixed numpy probe just before it (milliseconds; this
  shared machine's speed varies from hour to hour by more than steal shows);
* before any of it, the ``ioi`` package's bytecode is compiled (``compileall``), as
  an installed package's is: with ``PYTHONDONTWRITEBYTECODE`` set (it is on some
  machines, this one included) every timed run would otherwise compile the
  package's sources again, 50-70 ms of start-up in each process;
* the input/output floor: reading every raw file with
  :func:`ioi.fitsio.read_raw` and writing products of the same size and count
  with :func:`ioi.fitsio.write_product`, nothing else.

If a stage fails (a stage still being written, say), the run is repeated with
that stage and the later ones switched off, so that the other stages are
still measured; the failure is reported in the table and the JSON.

Usage::

    .venv/bin/python benchmarks/bench.py                 # 3, 9, 18, 36 dithers of 2048^2
    .venv/bin/python benchmarks/bench.py --quick         # 3 and 9 dithers only
    .venv/bin/python benchmarks/bench.py --size 1024 --dithers 9 --repeat 1

Results: a table on stdout and ``bench_out/bench.json``.  Nothing here is
asserted: targets are for people to read.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench_out"
STAGES = ("read", "reference", "combine", "flat", "badpix", "sky", "register", "stack", "write")
#: Stages switched off, in this order, when a run fails (each with the later ones).
OPTIONAL_STAGES = ("sky_subtraction", "registration", "stacking")
TARGETS = {"wall_s": 3.5, "peak_mb_at_9": 1024, "x_io_floor": 3.0}


def compile_package() -> bool:
    """Compile the ``ioi`` package's bytecode (``__pycache__`` beside its sources), so that
    the timed runs import it as an installed package does; True when it all compiled."""
    import compileall

    import ioi

    return bool(compileall.compile_dir(Path(ioi.__file__).parent, quiet=1))


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- machine

def machine_info() -> dict:
    import astropy

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "cpu_model": cpu,
        "memory_gb": round(mem_gb, 1) if mem_gb else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "astropy": astropy.__version__,
    }


# ----------------------------------------------------------------------------- data

def ensure_simulated(out: Path, *, size: int, dithers: int, fowler_pairs: int) -> Path:
    """Simulate one multrun into ``out/sim_<size>_d<dithers>_f<pairs>`` unless a complete one is there."""
    from ioi.simulate import simulate

    sim = out / f"sim_{size}_d{dithers}_f{fowler_pairs}"
    marker = sim / ".complete"
    if marker.is_file():
        log(f"reusing {sim.relative_to(out.parent) if sim.is_relative_to(out.parent) else sim}")
        return sim
    if sim.exists():
        shutil.rmtree(sim)
    log(f"simulating {dithers} dithers of {size}x{size}, Fowler {fowler_pairs} pairs -> {sim} ...")
    t0 = time.perf_counter()
    res = simulate(sim, dithers=dithers, fowler_pairs=fowler_pairs, size=size, seed=1)
    marker.write_text(json.dumps({"raw_files": len(res.raw_files), "seconds": round(time.perf_counter() - t0, 1)}))
    log(f"simulated {len(res.raw_files)} raw files in {time.perf_counter() - t0:.1f} s")
    return sim


def pipeline_ini_without(sim: Path, dest: Path, stages_off) -> Path:
    """A copy of the simulated pipeline.ini with some stages' ``do`` set to 0."""
    from ioi.config import read_pipeline_ini, render_pipeline_ini

    pipe = read_pipeline_ini(sim / "config" / "pipeline.ini")
    for section in stages_off:
        pipe = pipe.replace(section, do=False)
    dest.write_text(render_pipeline_ini(pipe))
    return dest


# ----------------------------------------------------------------------------- one reduce

def steal_seconds() -> float | None:
    """CPU time the hypervisor gave to other guests so far, summed over this machine's CPUs
    (the ``steal`` column of /proc/stat; None where there is none).  On a shared virtual
    machine a run with much steal is slower for reasons outside ``ioi``."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def machine_probe_ms() -> float:
    """Milliseconds of a fixed single-threaded numpy workload like the pipeline's (float32
    element-wise passes over a 16 MB plane, and a sort), the fastest of three tries.

    Taken before each reduce run: this shared machine's speed changes from hour to
    hour by more than its reported steal shows, and runs are comparable only at
    similar probe times."""
    rng = np.random.default_rng(0)
    a = rng.random((2048, 2048), dtype=np.float32)
    b = np.empty_like(a)
    s = rng.random(1 << 20, dtype=np.float32)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(10):
            np.multiply(a, np.float32(1.0001), out=b)
            b += a
        np.sort(s)
        best = min(best, time.perf_counter() - t0)
    return 1000.0 * best


def _reduce_command(sim: Path, out_dir: Path, pipeline_ini: Path) -> list:
    """The ``ioi reduce`` command line of one multrun's timed and memory runs."""
    return [sys.executable, "-m", "ioi", "reduce", str(sim / "raw"), "--out", str(out_dir),
            "--pi", str(pipeline_ini), "--pa", str(sim / "config" / "paths.ini"), "--force", "--log", "WARNING"]


def _tree_pss_kb(pid: int):
    """Proportional set size (kB) of process ``pid`` and its children, or None (not Linux).

    PSS counts a page shared by n processes as 1/n in each, so the sum over the tree
    counts the memory that the pipeline and its side processes share (the file that
    carries frames to them) once."""
    total = 0
    try:
        pids = [pid] + [int(c) for t in os.listdir(f"/proc/{pid}/task")
                        for c in open(f"/proc/{pid}/task/{t}/children").read().split()]
    except OSError:
        return None
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            continue  # a child that has just ended
    return total


def tree_peak_mb(sim: Path, out_dir: Path, *, pipeline_ini: Path, every_s: float = 0.05):
    """Peak PSS (MB) of ``ioi reduce`` with every process it starts (sep's side processes),
    sampled every ``every_s`` in an untimed run: ``ru_maxrss`` is one process's peak.

    Reading smaps_rollup walks the page tables (a few ms for 1 GB), which is why this
    is a separate run and not part of the timed ones."""
    if not os.path.exists("/proc/self/smaps_rollup"):
        return None
    if out_dir.exists():
        shutil.rmtree(out_dir)
    cmd = _reduce_command(sim, out_dir, pipeline_ini)
    peak = 0
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    while proc.poll() is None:
        kb = _tree_pss_kb(proc.pid)
        if kb:
            peak = max(peak, kb)
        time.sleep(every_s)
    return peak / 1024 if proc.returncode == 0 and peak else None


def run_reduce(sim: Path, out_dir: Path, *, pipeline_ini: Path) -> dict:
    """``ioi reduce`` as a subprocess: wall time, peak RSS of that child, exit code, report."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    cmd = _reduce_command(sim, out_dir, pipeline_ini)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    probe = machine_probe_ms()
    steal0 = steal_seconds()
    t0 = time.perf_counter()
    log_out, log_err = out_dir.parent / "reduce.stdout", out_dir.parent / "reduce.stderr"
    with open(log_out, "w") as fo, open(log_err, "w") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env)
        # Reap with wait4 to get this child's own rusage (RUSAGE_CHILDREN would be the maximum
        # over every child so far).
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    steal1 = steal_seconds()
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = log_out.read_text(), log_err.read_text()
    peak_kb = usage.ru_maxrss  # kilobytes on Linux
    reports = sorted(out_dir.glob("*_report.json"))
    report = json.loads(reports[0].read_text()) if reports else None
    error = ""
    if proc.returncode != 0 or report is None:
        lines = [ln for ln in (stderr or "").splitlines() if ln.strip()]
        fails = [ln for ln in (stdout or "").splitlines() if "FAILED" in ln]
        error = (fails or lines or [f"exit {proc.returncode}"])[-1][:300]
    return {"wall_s": wall, "peak_mb": peak_kb / 1024, "rc": proc.returncode, "report": report,
            "error": error, "products": sorted(str(p) for p in out_dir.glob("*.fits")),
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "steal_s": None if steal0 is None or steal1 is None else steal1 - steal0, "probe_ms": probe}


def reduce_with_fallback(sim: Path, work: Path, *, repeat: int) -> dict:
    """Median stage times, wall time and peak memory; switch failing optional stages off."""
    for n_off in range(len(OPTIONAL_STAGES) + 1):
        off = OPTIONAL_STAGES[len(OPTIONAL_STAGES) - n_off:]
        ini = pipeline_ini_without(sim, work / f"pipeline_off{n_off}.ini", off)
        runs = []
        for i in range(repeat):
            r = run_reduce(sim, work / "reduce", pipeline_ini=ini)
            if r["rc"] != 0 or r["report"] is None:
                break
            runs.append(r)
            steal = "" if r["steal_s"] is None else f", {r['steal_s']:.1f} s CPU steal"
            steal += f", probe {r['probe_ms']:.0f} ms"
            log(f"  reduce run {i + 1}/{repeat}: {r['wall_s']:.2f} s wall, {r['peak_mb']:.0f} MB peak{steal}")
        if runs:
            break
        log(f"  reduce failed with {list(off) or 'all stages'} on: {r['error']}")
        failure = {"stages_off": list(off), "error": r["error"], "rc": r["rc"]}
    else:
        return {"failed": True, "error": failure["error"]}
    tree_mb = tree_peak_mb(sim, work / "reduce", pipeline_ini=ini)
    if tree_mb is not None:
        log(f"  memory run: {tree_mb:.0f} MB peak PSS of all its processes")
    stage_names = sorted({k for r in runs for k in r["report"]["stage_seconds"]},
                         key=lambda k: (STAGES.index(k) if k in STAGES else len(STAGES), k))
    stages = {k: statistics.median(r["report"]["stage_seconds"].get(k, 0.0) for r in runs) for k in stage_names}
    return {
        "failed": False,
        "stages_off": list(off),
        "first_failure": failure if n_off else None,
        "stage_seconds": stages,
        "wall_s": statistics.median(r["wall_s"] for r in runs),
        "wall_all_s": [round(r["wall_s"], 3) for r in runs],
        "cpu_s": statistics.median(r["cpu_s"] for r in runs),
        "steal_s": None if any(r["steal_s"] is None for r in runs) else statistics.median(r["steal_s"] for r in runs),
        "steal_all_s": [None if r["steal_s"] is None else round(r["steal_s"], 2) for r in runs],
        "probe_ms": statistics.median(r["probe_ms"] for r in runs),
        "probe_all_ms": [round(r["probe_ms"], 1) for r in runs],
        "peak_mb": max(r["peak_mb"] for r in runs),
        "peak_tree_pss_mb": tree_mb,
        "products": runs[-1]["products"],
        "n_warnings": len(runs[-1]["report"].get("warnings", [])),
    }


# ----------------------------------------------------------------------------- I/O floor

def product_templates(products, *, n_dithers: int, shape) -> list:
    """(name, primary header, {extname: Frame}, extra HDUs) for each product to write.

    Taken from the products the reduce run wrote (same count, extensions, sizes);
    when there are none, the SPEC's layout: per dither IM_SS + IM_NONSS, one SK_SS stack.
    """
    from astropy.io import fits

    from ioi.frame import Frame

    out = []
    for p in products:
        frames, extra = {}, []
        with fits.open(p) as hdul:
            primary = hdul[0].header.copy()
            names = [h.name for h in hdul[1:]]
            for h in hdul[1:]:
                if h.name.endswith(("_VAR", "_DQ")):
                    continue
                if h.name.endswith("_EXP") or f"{h.name}_VAR" not in names:
                    extra.append(fits.ImageHDU(np.array(h.data), header=h.header.copy(), name=h.name))
                    continue
                var = hdul[f"{h.name}_VAR"].data if f"{h.name}_VAR" in names else None
                dq = hdul[f"{h.name}_DQ"].data if f"{h.name}_DQ" in names else None
                frames[h.name] = Frame.from_science(np.array(h.data, dtype=np.float32), h.header.copy(),
                                                    variance=None if var is None else np.array(var, np.float32),
                                                    quality=None if dq is None else np.array(dq, np.uint32))
        out.append((Path(p).name, primary, frames, extra))
    if not out:
        from astropy.io.fits import Header

        blank = Frame.from_science(np.zeros(shape, np.float32))
        out = [(f"l1_{i}.fits", Header(), {"IM_SS": blank, "IM_NONSS": blank}, []) for i in range(n_dithers)]
        exp = fits.ImageHDU(np.zeros(shape, np.int16), name="SK_SS_EXP")
        out.append(("l2.fits", Header(), {"SK_SS": blank}, [exp]))
    return out


def io_floor(sim: Path, products, work: Path, *, n_dithers: int, size: int, repeat: int) -> dict:
    """Seconds to read every raw file and to write the same products, nothing else (median)."""
    from ioi import fitsio

    raw = sorted((sim / "raw").glob("*.fits"))
    templates = product_templates(products, n_dithers=n_dithers, shape=(size - 8, size - 8))
    dest = work / "floor"
    reads, writes = [], []
    for _ in range(max(repeat, 1)):
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        t0 = time.perf_counter()
        for p in raw:
            fitsio.read_raw(p)
        t1 = time.perf_counter()
        for name, primary, frames, extra in templates:
            fitsio.write_product(dest / name, primary, frames, overwrite=True, extra_hdus=extra)
        t2 = time.perf_counter()
        reads.append(t1 - t0)
        writes.append(t2 - t1)
    nbytes_in = sum(p.stat().st_size for p in raw)
    nbytes_out = sum(p.stat().st_size for p in dest.glob("*.fits"))
    shutil.rmtree(dest, ignore_errors=True)
    r, w = statistics.median(reads), statistics.median(writes)
    return {"read_s": r, "write_s": w, "total_s": r + w, "n_raw": len(raw), "n_products": len(templates),
            "mb_in": nbytes_in / 2**20, "mb_out": nbytes_out / 2**20}


# ----------------------------------------------------------------------------- report

def print_table(results: dict, size: int) -> None:
    keys = list(results)
    width = 11
    print()
    print(f"ioi reduce, {size}x{size}, Fowler 2 pairs: seconds (median), memory MB")
    print("dithers".ljust(18) + "".join(str(k).rjust(width) for k in keys))
    stage_rows = []
    for r in results.values():
        for k in r.get("reduce", {}).get("stage_seconds", {}):
            if k not in stage_rows and k != "total":
                stage_rows.append(k)

    def row(label, fn):
        cells = []
        for k in keys:
            try:
                v = fn(results[k])
            except (KeyError, TypeError):
                v = None
            cells.append(("-" if v is None else (v if isinstance(v, str) else f"{v:.2f}")).rjust(width))
        print(label.ljust(18) + "".join(cells))

    for s in stage_rows:
        row(f"  {s}", lambda r, s=s: r["reduce"]["stage_seconds"].get(s))
    row("sum (overlapping)", lambda r: sum(v for k, v in r["reduce"]["stage_seconds"].items() if k != "total"))
    row("ioi reduce wall", lambda r: r["reduce"]["wall_s"])
    row("  fastest run", lambda r: min(r["reduce"]["wall_all_s"]))
    row("  cpu (user+sys)", lambda r: r["reduce"]["cpu_s"])
    row("  machine steal", lambda r: r["reduce"]["steal_s"])
    row("  machine probe ms", lambda r: r["reduce"]["probe_ms"])
    row("I/O floor", lambda r: r["io_floor"]["total_s"])
    row("  read raw", lambda r: r["io_floor"]["read_s"])
    row("  write products", lambda r: r["io_floor"]["write_s"])
    row("wall / floor", lambda r: r["reduce"]["wall_s"] / r["io_floor"]["total_s"])
    row("peak RSS MB", lambda r: r["reduce"]["peak_mb"])
    row("  all processes PSS", lambda r: r["reduce"].get("peak_tree_pss_mb"))
    row("data in MB", lambda r: r["io_floor"]["mb_in"])
    row("stages off", lambda r: ",".join(s.split("_")[0] for s in r["reduce"]["stages_off"]) or "none")
    print(f"targets: wall < {TARGETS['wall_s']} s and < {TARGETS['x_io_floor']}x I/O floor; "
          f"peak < {TARGETS['peak_mb_at_9']} MB at 9 dithers, growing no faster than the data")
    for k in keys:
        red = results[k].get("reduce", {})
        if red.get("first_failure"):
            print(f"note: {k} dithers: failed with all stages on ({red['first_failure']['error']}); "
                  f"measured with {', '.join(red['stages_off'])} off")
        if red.get("failed"):
            print(f"note: {k} dithers: reduce failed: {red.get('error')}")


# ----------------------------------------------------------------------------- many multruns

def bench_parallel(out: Path, *, size: int, dithers: int, n_multruns: int, fowler_pairs: int) -> dict:
    """Throughput of ``ioi reduce`` over a tree of ``n_multruns`` multruns: serial, --workers 2,
    and a dask LocalCluster (2 processes), each run once with --force."""
    from ioi.simulate import simulate

    tree = out / f"multi_{size}_d{dithers}_m{n_multruns}"
    marker = tree / ".complete"
    if not marker.is_file():
        shutil.rmtree(tree, ignore_errors=True)
        for m in range(1, n_multruns + 1):
            log(f"simulating multrun {m}/{n_multruns} ({dithers} dithers of {size}x{size}) ...")
            res = simulate(tree / f"sim{m}", dithers=dithers, fowler_pairs=fowler_pairs, size=size, seed=m,
                           multrun=m)
            (tree / "raw").mkdir(exist_ok=True)
            for p in res.raw_files:
                os.replace(p, tree / "raw" / p.name)
        marker.write_text("{}")
    cfg = tree / "sim1" / "config"
    results = {}
    cases = [("serial", []), ("workers 2", ["--workers", "2"]), ("dask 2 procs", None)]
    for label, extra in cases:
        dest = out / "multi_out"
        shutil.rmtree(dest, ignore_errors=True)
        cluster = None
        if extra is None:
            from dask.distributed import LocalCluster

            cluster = LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0")
            extra = ["--scheduler", cluster.scheduler_address]
        cmd = [sys.executable, "-m", "ioi", "reduce", str(tree / "raw"), "--out", str(dest), "--pi",
               str(cfg / "pipeline.ini"), "--pa", str(cfg / "paths.ini"), "--force", "--log", "ERROR", *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if cluster is not None:
            cluster.close()
        results[label] = {"wall_s": wall, "rc": proc.returncode,
                          "per_multrun_s": wall / n_multruns}
        log(f"  {n_multruns} multruns, {label}: {wall:.1f} s (exit {proc.returncode})")
    shutil.rmtree(out / "multi_out", ignore_errors=True)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=2048, help="detector side in pixels (2048; 1024 for a quick check)")
    ap.add_argument("--dithers", default="3,9,18,36", help="comma-separated dither counts (default 3,9,18,36)")
    ap.add_argument("--quick", action="store_true", help="only 3 and 9 dithers")
    ap.add_argument("--repeat", type=int, default=3, help="reduce runs per case (median taken)")
    ap.add_argument("--fowler-pairs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="cache and results directory (bench_out/)")
    ap.add_argument("--parallel", type=int, default=0, metavar="N",
                    help="also time N multruns (9 dithers) reduced serially, with --workers 2 and on dask")
    args = ap.parse_args(argv)
    dithers = [3, 9] if args.quick else [int(x) for x in args.dithers.split(",") if x.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    if not compile_package():
        log("warning: the ioi package's bytecode did not all compile; timed runs compile it")
    log(f"{info['cpu_model']}, {info['cores']} cores, python {info['python']}, numpy {info['numpy']}, "
        f"load {info['load_average']}")
    json_path = args.out / ("bench.json" if args.size == 2048 else f"bench_{args.size}.json")
    results, extra = {}, {}
    if json_path.is_file():  # keep the cases of an earlier run (e.g. --quick, then --dithers 18,36)
        try:
            old = json.loads(json_path.read_text())
            if old.get("size") == args.size and old.get("fowler_pairs") == args.fowler_pairs:
                results = {int(k): v for k, v in old.get("results", {}).items() if int(k) not in dithers}
                extra = {"parallel": old["parallel"]} if "parallel" in old else {}
        except (OSError, ValueError):
            results, extra = {}, {}
    for n in dithers:
        log(f"=== {n} dithers ===")
        sim = ensure_simulated(args.out, size=args.size, dithers=n, fowler_pairs=args.fowler_pairs)
        work = args.out / f"work_{args.size}_d{n}"
        work.mkdir(parents=True, exist_ok=True)
        red = reduce_with_fallback(sim, work, repeat=args.repeat)
        floor = io_floor(sim, red.get("products", []), work, n_dithers=n, size=args.size, repeat=args.repeat)
        log(f"  I/O floor {floor['total_s']:.2f} s (read {floor['read_s']:.2f}, write {floor['write_s']:.2f})")
        red.pop("products", None)
        results[n] = {"reduce": red, "io_floor": floor, "repeat": args.repeat, "date_utc": info["date_utc"]}
        shutil.rmtree(work / "reduce", ignore_errors=True)
        json_path.write_text(json.dumps({"machine": info, "size": args.size, "fowler_pairs": args.fowler_pairs,
                                         "repeat": args.repeat, "targets": TARGETS, "results": results, **extra},
                                        indent=1, default=float))
    results = dict(sorted(results.items()))
    print_table(results, args.size)
    if args.parallel:
        log(f"=== {args.parallel} multruns of 9 dithers: serial, --workers 2, dask ===")
        par = bench_parallel(args.out, size=args.size, dithers=9, n_multruns=args.parallel,
                             fowler_pairs=args.fowler_pairs)
        data = {"machine": info, "size": args.size, "fowler_pairs": args.fowler_pairs, "repeat": args.repeat,
                "targets": TARGETS, "results": results}
        data["parallel"] = {"n_multruns": args.parallel, "dithers": 9, **par}
        json_path.write_text(json.dumps(data, indent=1, default=float))
        print(f"\n{args.parallel} multruns x 9 dithers, {args.size}x{args.size}: wall seconds")
        for label, r in par.items():
            print(f"  {label:14s} {r['wall_s']:7.1f}  ({r['per_multrun_s']:.1f} s per multrun, exit {r['rc']})")
    print(f"\nJSON: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
