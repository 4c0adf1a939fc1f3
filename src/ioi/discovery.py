"""Finding raw reads on disk and grouping them into multruns and dithers.

Two naming conventions (SPEC section 1):

* LT: ``i_<type>_<YYYYMMDD>_<multrun>_<dither>_<exposure>_<level>.fits`` —
  exactly seven ``_`` fields, instrument ``i``, level 0 = raw.
* Teledyne: ``H2RG_R<run>_M<group>_N<read>.fits`` — no dithers; every
  selected group of a run is one read sequence.

LT naming is tried first; Teledyne naming only when no LT file matched.
Scanning reads headers only, never pixel data.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections import defaultdict
from pathlib import Path

from astropy.io import fits

from ioi.errors import ExitCode, InputError, IoiError

log = logging.getLogger(__name__)

LT_PATTERN = re.compile(r"^(i)_([A-Za-z]+)_(\d{8})_(\d+)_(\d+)_(\d+)_(\d+)\.fits?$")
TELEDYNE_PATTERN = re.compile(r"^H2RG_R(\d+)_M(\d+)_N(\d+)\.fits?$", re.IGNORECASE)

LT = "LT"
TELEDYNE = "TELEDYNE"


@dataclasses.dataclass(frozen=True)
class RawRead:
    """One raw read file and the numbers its name and header give."""

    path: Path
    convention: str
    date: str  # YYYYMMDD for LT, "" for Teledyne
    multrun: int  # LT multrun, or Teledyne run
    dither: int  # LT dither, or 1 for Teledyne
    exposure: int  # LT exposure number, or Teledyne read (N)
    group: int  # Teledyne group (M); header SEQNUM_M for LT when present
    inttime: float
    header: fits.Header = dataclasses.field(repr=False, compare=False)
    prefix: str = ""  # first fields of the LT name, e.g. "i_e"

    @property
    def run(self) -> int:
        return self.multrun

    @property
    def read(self) -> int:
        return self.exposure


@dataclasses.dataclass(frozen=True)
class DitherSequence:
    """The reads of one dither position (one exposure sequence), in INTTIME order."""

    dither: int
    reads: tuple

    @property
    def paths(self) -> list[Path]:
        return [r.path for r in self.reads]


@dataclasses.dataclass(frozen=True)
class Multrun:
    """One observing block: its dithers, each a sequence of reads."""

    convention: str
    date: str
    multrun: int
    dithers: tuple
    prefix: str = "i_e"

    @property
    def name(self) -> str:
        if self.convention == LT:
            return f"{self.prefix}_{self.date}_{self.multrun}"
        return f"H2RG_R{self.multrun:02d}"

    @property
    def nreads(self) -> int:
        return sum(len(d.reads) for d in self.dithers)

    def l1_name(self, dither: int) -> str:
        """SPEC section 3: first five name fields + ``_0_1.fits``."""
        if self.convention == LT:
            return f"{self.name}_{dither}_0_1.fits"
        return f"{self.name}_L1.fits"

    def l2_name(self) -> str:
        """SPEC section 3: first four name fields + ``_0_0_2.fits``."""
        if self.convention == LT:
            return f"{self.name}_0_0_2.fits"
        return f"{self.name}_L2.fits"

    @property
    def input_paths(self) -> list[Path]:
        return [p for d in self.dithers for p in d.paths]


def _in(value: int, limits) -> bool:
    if limits is None:
        return True
    lo, hi = limits
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def _list_fits(directory: Path, recursive: bool):
    if recursive:
        for root, dirs, files in os.walk(directory):
            dirs.sort()
            for name in sorted(files):
                yield Path(root) / name
    else:
        for p in sorted(directory.iterdir()):
            if p.is_file():
                yield p


def _header_of(path: Path) -> fits.Header:
    """The primary header, parsed straight from the file (``Header.fromfile``: a third of
    the time of ``fits.getheader``, which builds an HDU list; 11 against 30 ms for the
    36 reads of a 9-dither multrun)."""
    try:
        with open(path, "rb") as f:
            header = fits.Header.fromfile(f)
        if "SIMPLE" not in header:
            raise ValueError("no SIMPLE card: not a FITS primary header")
        return header
    except (OSError, ValueError, TypeError, IndexError, EOFError) as exc:
        raise InputError(f"{path} matches a raw file name but is not a readable FITS file: {exc}") from None


def _inttime(path: Path, header) -> float:
    if "INTTIME" not in header:
        raise InputError(f"{path} has no INTTIME keyword: cannot order its reads", exit_code=ExitCode.NO_SUITABLE_FILES)
    try:
        return float(header["INTTIME"])
    except (TypeError, ValueError):
        raise InputError(f"{path} has a non-numeric INTTIME {header['INTTIME']!r}",
                         exit_code=ExitCode.NO_SUITABLE_FILES) from None


def _group_of(header) -> int:
    try:
        return int(header.get("SEQNUM_M", 0))
    except (TypeError, ValueError):
        return 0


def scan_lt(directory, *, date=None, multruns=None, dithers=None, exposures=None,
            recursive=False) -> list[RawRead]:
    """LT-named level-0 reads in ``directory`` within the inclusive ranges."""
    directory = Path(directory)
    found = []
    for path in _list_fits(directory, recursive):
        m = LT_PATTERN.match(path.name)
        if not m:
            log.debug("skipping %s: not an LT raw-file name", path)
            continue
        inst, ftype, fdate, run, dith, expo, level = m.groups()
        if int(level) != 0:
            log.debug("skipping %s: level %s is not raw", path, level)
            continue
        if date is not None and fdate != str(date):
            continue
        if not (_in(int(run), multruns) and _in(int(dith), dithers) and _in(int(expo), exposures)):
            continue
        header = _header_of(path)
        found.append(RawRead(path=path, convention=LT, date=fdate, multrun=int(run), dither=int(dith),
                             exposure=int(expo), group=_group_of(header), inttime=_inttime(path, header),
                             header=header, prefix=f"{inst}_{ftype}"))
    return found


def scan_teledyne(directory, *, runs=None, groups=None, reads=None, recursive=False) -> list[RawRead]:
    """Teledyne-named reads ``H2RG_R<run>_M<group>_N<read>.fits``, sorted by run then INTTIME."""
    directory = Path(directory)
    found = []
    for path in _list_fits(directory, recursive):
        m = TELEDYNE_PATTERN.match(path.name)
        if not m:
            log.debug("skipping %s: not a Teledyne raw-file name", path)
            continue
        run, group, read = (int(g) for g in m.groups())
        if not (_in(run, runs) and _in(group, groups) and _in(read, reads)):
            continue
        header = _header_of(path)
        found.append(RawRead(path=path, convention=TELEDYNE, date="", multrun=run, dither=1, exposure=read,
                             group=group, inttime=_inttime(path, header), header=header))
    found.sort(key=lambda r: (r.multrun, r.inttime, r.group, r.exposure))
    return found


def group_reads(reads) -> list[Multrun]:
    """Group reads into multrun -> dither -> reads ordered by INTTIME."""
    by_run = defaultdict(lambda: defaultdict(list))
    meta = {}
    for r in reads:
        key = (r.convention, r.date, r.multrun, r.prefix)
        by_run[key][r.dither].append(r)
        meta[key] = r
    multruns = []
    for key in sorted(by_run):
        convention, date, run, prefix = key
        dithers = []
        for d in sorted(by_run[key]):
            seq = sorted(by_run[key][d], key=lambda r: (r.inttime, r.group, r.exposure))
            dithers.append(DitherSequence(dither=d, reads=tuple(seq)))
        multruns.append(Multrun(convention=convention, date=date, multrun=run, dithers=tuple(dithers),
                                prefix=prefix or "i_e"))
    return multruns


@dataclasses.dataclass(frozen=True)
class Selection:
    """What to look for: inclusive (lo, hi) ranges, None = everything."""

    date: str | None = None
    multruns: tuple | None = None
    dithers: tuple | None = None
    exposures: tuple | None = None
    groups: tuple | None = None
    recursive: bool = False

    def describe(self) -> str:
        parts = [f"date {self.date or 'any'}"]
        for name in ("multruns", "dithers", "exposures", "groups"):
            v = getattr(self, name)
            if v is not None:
                parts.append(f"{name} {v[0]}-{v[1]}")
        return ", ".join(parts)


def discover(directory, selection: Selection = Selection()) -> list[Multrun]:
    """Find and group the reads of ``directory``: LT naming first, Teledyne as fallback.

    Raises IoiError (exit 3) when nothing matches, saying where it looked and for what.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise IoiError(f"data directory not found: {directory}", exit_code=ExitCode.NO_FILES)
    reads = scan_lt(directory, date=selection.date, multruns=selection.multruns, dithers=selection.dithers,
                    exposures=selection.exposures, recursive=selection.recursive)
    if not reads:
        log.debug("no LT-named raw files in %s; trying Teledyne naming", directory)
        reads = scan_teledyne(directory, runs=selection.multruns, groups=selection.groups,
                              reads=selection.exposures, recursive=selection.recursive)
    if not reads:
        raise IoiError(
            f"no raw files found in {directory} (looked for LT names i_<type>_<date>_<multrun>_<dither>_"
            f"<exposure>_0.fits and Teledyne names H2RG_R<run>_M<group>_N<read>.fits; {selection.describe()})",
            exit_code=ExitCode.NO_FILES)
    multruns = group_reads(reads)
    for mr in multruns:
        counts = ", ".join(f"dither {d.dither}: {len(d.reads)}" for d in mr.dithers)
        log.info("found %s (%s naming): %d dither(s), %d read(s) [%s]", mr.name, mr.convention,
                 len(mr.dithers), mr.nreads, counts)
    return multruns
