"""Command line: ``ioi`` (simulate, reduce, calib, config) and the original's ``run_pipe``.

A thin layer: it parses arguments, sets up logging, calls the library, and
turns an :class:`~ioi.errors.IoiError` into one line on stderr and the
original's exit code.  Heavy modules are imported inside the commands so that
``ioi --help`` stays instant.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
from pathlib import Path

from ioi._parallel import SIDE_PROCESS_MIN_PIXELS, one_blas_thread
from ioi.errors import ExitCode, IoiError

log = logging.getLogger("ioi.cli")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _range(text: str) -> tuple[int, int]:
    """'3' -> (3, 3); '1,4' or '1-4' or '1:4' -> (1, 4)."""
    for sep in (",", ":", "-"):
        if sep in text:
            lo, hi = text.split(sep, 1)
            break
    else:
        lo = hi = text
    try:
        lo, hi = int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO,HI, got {text!r}") from None
    if lo > hi:
        raise argparse.ArgumentTypeError(f"range {text!r} has LO > HI")
    return lo, hi


def _date(text: str) -> str:
    if len(text) != 8 or not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a date YYYYMMDD, got {text!r}")
    return text


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


# ----------------------------------------------------------------------------- ioi simulate

def _add_simulate(sub) -> None:
    p = sub.add_parser("simulate", help="simulate an IO:I multrun with known truth",
                       description="Write an IO:I-like raw multrun (LT naming), calibration files, INI files "
                                   "and the truth into OUT.")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dithers", type=_positive_int, default=9)
    p.add_argument("--fowler-pairs", type=_positive_int, default=2)
    p.add_argument("--size", type=int, default=2048, help="detector size in pixels (2048; 512 or 256 for tests)")
    p.add_argument("--date", type=_date, default="20150227")
    p.add_argument("--multrun", type=_positive_int, default=1)
    p.add_argument("--mode", choices=("fowler", "cds", "utr"), default="fowler", help="read mode of the science")
    p.add_argument("--nreads", type=_positive_int, default=None, help="reads per dither in utr mode")
    p.add_argument("--exptime", type=float, default=10.0)
    p.add_argument("--rotation", type=float, default=0.0, help="rotation (deg) of the last dither")
    p.add_argument("--scale", type=float, default=1.0, help="scale change of the last dither")
    p.add_argument("--no-cosmic-rays", action="store_true")
    p.add_argument("--utr", action="store_true", help="also write Teledyne-named up-the-ramp runs")
    p.add_argument("--log", default="INFO", choices=LOG_LEVELS)
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args) -> int:
    from ioi.logs import Progress, setup_logging
    from ioi.simulate import simulate

    setup_logging(args.log)
    res = simulate(args.out, seed=args.seed, dithers=args.dithers, fowler_pairs=args.fowler_pairs, size=args.size,
                   date=args.date, multrun=args.multrun, mode=args.mode, nreads=args.nreads, exptime=args.exptime,
                   rotation_deg=args.rotation, scale=args.scale, cosmic_rays=not args.no_cosmic_rays,
                   utr=args.utr, progress=Progress("simulate"))
    print(f"raw reads:     {res.raw_dir} ({len(res.raw_files)} files)")
    print(f"settings:      {res.pipeline_ini}, {res.paths_ini}")
    print(f"truth:         {res.truth_dir}")
    if res.utr_dir:
        print(f"up-the-ramp:   {res.utr_dir}")
    print(f"simulated in {res.elapsed_s:.1f} s")
    return 0


# ----------------------------------------------------------------------------- settings

def _add_settings_args(p) -> None:
    g = p.add_argument_group("settings")
    g.add_argument("--pipeline-ini", "--pi", dest="pipeline_ini", type=Path, help="the original's pipeline.ini")
    g.add_argument("--paths-ini", "--pa", dest="paths_ini", type=Path, help="the original's paths.ini")
    g.add_argument("--config", dest="toml", type=Path, help="one TOML file with [pipeline.*] and [paths.*]")


def _settings(args):
    from ioi.config import load_settings

    return load_settings(pipeline_ini=args.pipeline_ini, paths_ini=args.paths_ini, toml=args.toml)


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="show the effective settings",
                       description="Print the effective pipeline and paths settings (defaults, TOML, INI files).")
    p.add_argument("--show", action="store_true", help="print the effective settings (the default action)")
    _add_settings_args(p)
    p.set_defaults(func=_cmd_config)


def _cmd_config(args) -> int:
    from ioi.config import render_paths_ini, render_pipeline_ini

    pipe, paths = _settings(args)
    sys.stdout.write(render_pipeline_ini(pipe))
    sys.stdout.write("\n")
    sys.stdout.write(render_paths_ini(paths))
    return 0


# ----------------------------------------------------------------------------- ioi reduce

def _add_reduce(sub) -> None:
    p = sub.add_parser("reduce", help="reduce raw multruns to L1/L2 products",
                       description="Reduce every multrun found under DATA into OUT.")
    p.add_argument("data", type=Path, help="directory with raw reads (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="output directory (created if needed)")
    _add_settings_args(p)
    s = p.add_argument_group("selection (inclusive ranges N or LO,HI)")
    s.add_argument("--date", type=_date)
    s.add_argument("--multruns", type=_range)
    s.add_argument("--dithers", type=_range)
    s.add_argument("--exposures", type=_range)
    s.add_argument("--groups", type=_range, help="Teledyne groups")
    p.add_argument("--flip", action="store_true", help="flip calibration arrays left-right (run_pipe --f)")
    p.add_argument("--workers", type=_positive_int, default=1, help="local processes, one multrun each")
    p.add_argument("--scheduler", help="address of a dask.distributed scheduler to run the multruns on")
    p.add_argument("--force", action="store_true", help="redo multruns whose products are up to date")
    p.add_argument("--log", default="INFO", choices=LOG_LEVELS)
    p.set_defaults(func=_cmd_reduce)


#: A raw read of this many bytes or more (16-bit pixels) is a full-size frame, for which
#: a reduction runs sep in side processes.
_FULL_SIZE_READ_BYTES = 2 * SIDE_PROCESS_MIN_PIXELS


def _full_size_input(data: Path) -> bool:
    """Whether the first FITS file under ``data`` (walked in name order) is a full-size read."""
    for root, dirs, files in os.walk(data):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith((".fits", ".fit", ".fts")):
                try:
                    return os.stat(os.path.join(root, name)).st_size >= _FULL_SIZE_READ_BYTES
                except OSError:
                    return False
    return False


@contextlib.contextmanager
def _side_processes_for(data: Path, serial: bool):
    """What a run's ``side_processes`` should be.

    For a serial run of full-size data: sep's side processes, the first started now,
    before the pipeline's imports (0.5 s on one core), so that its own start-up
    (numpy and sep, ~0.2 s of CPU) runs on the idle core instead of during the
    reduction (the pipeline starts the second as its last dither runs alone on one
    core); they serve every multrun of the run and end with it.  Otherwise True (the
    pipeline decides per multrun).  A wrong guess costs only speed: the products are
    the same with or without them.
    """
    if not (serial and _full_size_input(data)):
        yield True
        return
    from ioi._sideproc import sep_side_processes

    side = sep_side_processes().start(1)  # the other near the end of the ramps: not 3 processes on 2 cores now
    try:
        yield side
    finally:
        side.close()


def _cmd_reduce(args) -> int:
    from ioi.logs import setup_logging

    args.out.mkdir(parents=True, exist_ok=True)
    setup_logging(args.log, logfile=args.out / "res.log")
    with _side_processes_for(args.data, serial=args.workers <= 1 and args.scheduler is None) as side:
        return _reduce_command(args, side)


def _reduce_command(args, side) -> int:
    from ioi.calibration import effective_settings
    from ioi.discovery import Selection
    from ioi.logs import Progress
    from ioi.runner import reduce_directory

    pipe, paths = _settings(args)
    if args.pipeline_ini is None and args.paths_ini is None and args.toml is None:
        log.info("no settings files given: using the built-in defaults")
    pipe = effective_settings(pipe, paths)
    selection = Selection(date=args.date, multruns=args.multruns, dithers=args.dithers, exposures=args.exposures,
                          groups=args.groups, recursive=True)
    summary = reduce_directory(args.data, args.out, selection=selection, pipe=pipe, paths=paths, flip=args.flip,
                               workers=args.workers, scheduler=args.scheduler, force=args.force,
                               progress=Progress("multruns"), log_level=args.log, side_processes=side)
    for line in summary.lines():
        log.info(line)
        print(line)
    for o in summary.outcomes:
        if o.report:
            print(f"report: {o.report}")
    print(f"products in {args.out.resolve()}; log in {args.out.resolve() / 'res.log'}")
    return summary.exit_code


# ----------------------------------------------------------------------------- ioi

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ioi", description="Reduction pipeline for the LT IO:I HAWAII-2RG camera.",
                                     allow_abbrev=False)
    from ioi import __version__

    parser.add_argument("--version", action="version", version=f"ioi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_simulate(sub)
    _add_reduce(sub)
    from ioi.calib.commands import add_calib_parser  # light: the tools import their libraries when run

    add_calib_parser(sub)
    _add_config(sub)
    return parser


def _run(func, args) -> int:
    from ioi._memory import return_freed_memory_to_os

    return_freed_memory_to_os()
    try:
        return int(func(args) or 0)
    except IoiError as exc:
        logging.getLogger("ioi").debug("fatal error", exc_info=True)
        print(f"ioi: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("ioi: interrupted", file=sys.stderr)
        return 130
    finally:
        from ioi.logs import close_logging

        close_logging()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return _run(args.func, args)


# ----------------------------------------------------------------------------- run_pipe

def build_run_pipe_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_pipe", description="The original IO:I pipeline's command line.",
                                allow_abbrev=False)
    g = p.add_argument_group("General")
    g.add_argument("--p", dest="datapath", type=Path, required=True, metavar="DATAPATH", help="path to data")
    g.add_argument("--wd", dest="workingdir", type=Path, required=True, metavar="WORKINGDIR",
                   help="path to working directory")
    g.add_argument("--o", dest="clobber", action="store_true", help="clobber working directory?")
    g.add_argument("--pa", dest="paths_ini", type=Path, metavar="PATHSCFGPATH", help="path to paths config file")
    g.add_argument("--pi", dest="pipeline_ini", type=Path, metavar="PIPECFGPATH", help="path to pipeline config file")
    g.add_argument("--rlo", type=int, default=1, metavar="MINRUNNUM", help="minimum multrun number")
    g.add_argument("--rhi", type=int, default=1, metavar="MAXRUNNUM", help="maximum multrun number")
    g.add_argument("--elo", type=int, default=1, metavar="MINEXPNUM", help="lowest exposure number to use")
    g.add_argument("--ehi", type=int, default=4, metavar="MAXEXPNUM", help="highest exposure number to use")
    g.add_argument("--log", default="INFO", type=str.upper, choices=LOG_LEVELS, metavar="LOGLEVEL",
                   help="log level (DEBUG|INFO|WARNING|ERROR|CRITICAL)")
    g.add_argument("--f", dest="flip", action="store_true", help="flip calibration data about x axis?")
    lt = p.add_argument_group("LT specific general parameters")
    lt.add_argument("--d", dest="date", type=_date, metavar="DATE", help="date (YYYYMMDD)")
    lt.add_argument("--dlo", type=int, default=1, metavar="MINDITHNUM", help="minimum dither number")
    lt.add_argument("--dhi", type=int, default=999, metavar="MAXDITHNUM", help="maximum dither number")
    te = p.add_argument_group("Teledyne specific general parameters")
    te.add_argument("--glo", type=int, default=0, metavar="MINGRPNUM", help="lowest group number to use")
    te.add_argument("--ghi", type=int, default=1, metavar="MAXGRPNUM", help="highest group number to use")
    return p


def _cmd_run_pipe(args) -> int:
    from ioi.logs import setup_logging

    for lo, hi, what in ((args.rlo, args.rhi, "--rlo/--rhi"), (args.elo, args.ehi, "--elo/--ehi"),
                         (args.dlo, args.dhi, "--dlo/--dhi"), (args.glo, args.ghi, "--glo/--ghi")):
        if lo > hi:
            raise IoiError(f"{what}: low {lo} is above high {hi}", exit_code=ExitCode.USAGE)
    wd = args.workingdir
    if wd.exists() and not args.clobber:
        raise IoiError(f"working directory {wd} exists (use --o to clobber)", exit_code=ExitCode.WORKDIR_EXISTS)
    if wd.exists() and not wd.is_dir():
        raise IoiError(f"working directory {wd} is not a directory", exit_code=ExitCode.WORKDIR_EXISTS)
    wd.mkdir(parents=True, exist_ok=True)
    logfile = wd / "res.log"
    if args.clobber and logfile.exists():
        logfile.unlink()
    setup_logging(args.log, logfile=logfile)
    log.info("run_pipe %s", " ".join(sys.argv[1:]))
    with _side_processes_for(args.datapath, serial=True) as side:
        return _run_pipe_command(args, wd, side)


def _run_pipe_command(args, wd, side) -> int:
    from ioi.calibration import effective_settings
    from ioi.config import load_settings
    from ioi.discovery import Selection
    from ioi.logs import Progress
    from ioi.runner import reduce_directory

    pipe, paths = load_settings(pipeline_ini=args.pipeline_ini, paths_ini=args.paths_ini)
    if args.paths_ini is None:
        pipe = effective_settings(pipe, paths)
    selection = Selection(date=args.date, multruns=(args.rlo, args.rhi), dithers=(args.dlo, args.dhi),
                          exposures=(args.elo, args.ehi), groups=(args.glo, args.ghi))
    summary = reduce_directory(args.datapath, wd, selection=selection, pipe=pipe, paths=paths, flip=args.flip,
                               force=True, progress=Progress("multruns"), side_processes=side)
    for line in summary.lines():
        log.info(line)
    return summary.exit_code


def run_pipe_main(argv=None) -> int:
    args = build_run_pipe_parser().parse_args(argv)
    return _run(_cmd_run_pipe, args)


# ----------------------------------------------------------------------------- console scripts

def exit_without_teardown(code: int):
    """End the process with ``code``, skipping the interpreter's teardown of its modules.

    Finalising what a reduction imports (astropy, scipy, numpy, sep) takes
    0.2-0.3 s of one core after the work is done (measured: 0.13-0.17 s for
    astropy.io.fits alone), paid by every nightly run.  Nothing of ours needs
    it: by then every product is written and renamed, logging is closed, thread
    pools and side processes are shut down.  The exit functions that libraries
    registered (:mod:`atexit`) still run and the standard streams are flushed.
    Where another non-daemon thread is still alive the interpreter exits
    normally, so that it is joined as usual.
    """
    import atexit

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if others:
        sys.exit(code)
    logging.shutdown()
    atexit._run_exitfuncs()  # (what the normal exit runs; os._exit below would skip them)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more to say
            pass
    os._exit(code)


def console_main():
    """The ``ioi`` command (and ``python -m ioi``)."""
    one_blas_thread(os.environ)  # before numpy is imported
    exit_without_teardown(_exit_status(main))


def console_run_pipe():
    """The ``run_pipe`` command."""
    one_blas_thread(os.environ)
    exit_without_teardown(_exit_status(run_pipe_main))


def _exit_status(func) -> int:
    try:
        return int(func() or 0)
    except SystemExit as exc:  # argparse's --help and usage errors
        code = exc.code
        if code is None or isinstance(code, int):
            return int(code or 0)
        print(code, file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    console_main()
