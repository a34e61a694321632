"""A study: a grid of ordinary runs from one base configuration, then their report.

`python -m rankclip.compare --name STUDY --grid loss=clip,cyclip,rankclip seed=0,1,2 [main's flags]`

Every cell of the grid is an ordinary run folder `<logs>/<study>/<cell>/`, the cell named after
its grid values (`loss=clip_seed=0`). It is started as
`python -m rankclip.main <base flags> <cell's grid flags> --logs_dir <logs>/<study> --name <cell>`
in a subprocess (or under torchrun with --nproc_per_node), so a cell is exactly what the same
command typed by hand gives, and --print_commands writes those command lines for an array job.
Running the study again skips finished cells and resumes interrupted ones. With no flags, a
small study of the three objectives on the bundled demo runs.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .config import MULTI_VALUED, SETTINGS, Config, build_parser, demo_preset, parse_config, setting_type
from .errors import ConfigError, RankCLIPError, ReportError
from .launch import TORCHRUN_SIGNALS
from .plot import read_jsonl
from .report import EXECUTION_SETTINGS, MIXED_SETTINGS, read_params, write_report
from .savepoints import EXIT_PREEMPTED, STOP_SIGNALS

# Grid axes cannot set these: compare names, places and resumes the cells itself.
NOT_AXES = ("name", "logs", "config", "resume", "demo")
# The demo study: two epochs of the bundled demo (the single demo run trains five), CyCLIP with
# the cyclic weights of CyCLIP's paper (they change nothing for the other objectives).
DEMO_STUDY = "demo_study"
DEMO_GRID = ("loss=clip,cyclip,rankclip", "seed=0,1")
DEMO_SETTINGS = {"epochs": 2, "cylambda1": 0.25, "cylambda2": 0.25}
FINISHED, INTERRUPTED, FRESH = "finished", "interrupted", "fresh"


@dataclass(frozen=True)
class Axis:
    """One --grid axis: a setting and the values the study tries for it."""

    key: str
    values: tuple[str, ...]  # as typed on the command line
    parsed: tuple[object, ...]  # as rankclip.main's parser reads them for --<key>


@dataclass(frozen=True)
class Cell:
    """One run of the study: its folder name, its rankclip.main flags and their checked configuration."""

    name: str
    argv: tuple[str, ...]  # rankclip.main's flags, without --resume
    config: Config

    @property
    def run_dir(self) -> Path:
        return self.config.run.run_dir


def parse_axis(spec: str) -> Axis:
    """'KEY=V1,V2' -> Axis, each value checked by rankclip.main's own parser for --KEY."""
    key, sep, values = spec.partition("=")
    if not sep or not key or not values:
        raise ConfigError(f"--grid {spec!r}: write KEY=VALUE1,VALUE2 (e.g. --grid loss=clip,rankclip seed=0,1)")
    if key in NOT_AXES:
        raise ConfigError(f"--grid {key}: compare sets --{key} for each cell itself; it cannot be an axis")
    if key not in SETTINGS:
        raise ConfigError(f"--grid {key}: not a setting of a run; use a flag of python -m rankclip.main without "
                          f"'--' (e.g. loss, seed, lambda1)")
    if key in MULTI_VALUED:
        raise ConfigError(f"--grid {key}: --{key} takes several values per run; put it in the base flags instead")
    items = tuple(values.split(","))
    if len(set(items)) != len(items) or "" in items:
        raise ConfigError(f"--grid {spec}: give each value once, separated by commas without spaces")
    parser = build_parser(exit_on_error=False)
    parsed = []
    for value in items:
        if setting_type(key) is bool:
            if value not in ("true", "false"):
                raise ConfigError(f"--grid {key}={value}: --{key} is on or off; write {key}=true,false")
            parsed.append(value == "true")
            continue
        try:
            parsed.append(getattr(parser.parse_args([f"--{key}", value]), key))
        except argparse.ArgumentError as e:
            raise ConfigError(f"--grid {key}={value}: {e}") from None
    return Axis(key, items, tuple(parsed))


def parse_grid(specs: Sequence[str]) -> list[Axis]:
    axes = [parse_axis(spec) for spec in specs]
    keys = [axis.key for axis in axes]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ConfigError(f"--grid names {', '.join(repeated)} more than once; give each axis once")
    return axes


def axis_flags(key: str, value: str, parsed: object) -> list[str]:
    if isinstance(parsed, bool):
        return [f"--{key}"] if parsed else []
    return [f"--{key}", value]


def cell_name(values: Sequence[tuple[str, str]]) -> str:
    """The cell's folder name from its grid values: 'loss=clip_seed=0' (characters unsafe in a path replaced)."""
    return "_".join(f"{key}={re.sub(r'[^A-Za-z0-9.+-]', '-', value)}" for key, value in values)


def expand_grid(axes: Sequence[Axis], base_argv: Sequence[str], study_dir: Path) -> list[Cell]:
    """Every combination of the axes' values (the last axis varying fastest), each a checked cell."""
    cells = []
    for combination in itertools.product(*(zip([axis.key] * len(axis.values), axis.values, axis.parsed)
                                           for axis in axes)):
        name = cell_name([(key, value) for key, value, _ in combination])
        argv = [*base_argv, *(flag for setting in combination for flag in axis_flags(*setting)),
                "--logs_dir", str(study_dir), "--name", name]
        try:
            config = parse_config(argv)
        except ConfigError as e:
            raise ConfigError(f"cell {name}: {e}") from None
        settings = config.to_dict()
        for key, value, parsed in combination:
            if settings[key] != parsed:
                raise ConfigError(f"--grid {key}={value}: the base configuration overrides it "
                                  f"(--{key} is {settings[key]}); remove --{key} from the base flags")
        cells.append(Cell(name, tuple(argv), config))
    names = [c.name for c in cells]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ConfigError(f"--grid values give the same folder name {clashes[0]}; use values that differ in "
                          f"letters, digits or . + -")
    return cells


def cell_state(cell: Cell) -> str:
    """finished (results reach the final epoch and its checkpoint is written), interrupted (a
    checkpoints/epoch_latest.pt to continue from) or fresh.

    The final checkpoint is written after the final epoch's results, so a run stopped between
    the two counts as interrupted and repeats its last epoch; the report keeps the later records.
    """
    run_dir, epochs = cell.run_dir, cell.config.training.epochs
    results = run_dir / "results.jsonl"
    if results.is_file() and (run_dir / "checkpoints" / f"epoch_{epochs}.pt").is_file():
        if any(record.get("epoch") == epochs and record.get("split") == "train" for record in _records(results)):
            return FINISHED
    if (run_dir / "checkpoints" / "epoch_latest.pt").is_file():
        return INTERRUPTED
    return FRESH


def _records(path: Path) -> list[dict]:
    try:
        return read_jsonl(path)
    except ReportError as e:
        raise ReportError(f"{e}; repair or remove that line") from None


def check_same_settings(cell: Cell) -> None:
    """A cell folder started before must hold the same run: otherwise resuming it would mix two runs."""
    if not (cell.run_dir / "params.txt").is_file():
        return
    stored = read_params(cell.run_dir)
    wanted = {k: str(v) for k, v in cell.config.to_dict().items()}
    changed = [f"{k}: {stored.get(k)} -> {wanted[k]}" for k in sorted(wanted)
               if k not in EXECUTION_SETTINGS and k in stored and stored[k] != wanted[k]]
    if changed:
        raise ConfigError(f"{cell.run_dir} was started with other settings ({'; '.join(changed)}); "
                          f"give the study another --name or the settings it had")


def cell_command(cell: Cell, nproc_per_node: int) -> list[str]:
    """The command line that starts or continues the cell: rankclip.main, in one process or under torchrun.

    `--resume auto` makes it the same command whatever the cell's state (it continues from the
    cell's epoch_latest.pt when there is one), so a printed command can be requeued as it is."""
    launcher = [sys.executable, "-m", "rankclip.main"] if nproc_per_node == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc_per_node),
        "--signals_to_handle", TORCHRUN_SIGNALS, "-m", "rankclip.main"]
    return [*launcher, *cell.argv, "--resume", "auto"]


def cell_environment() -> dict[str, str]:
    """The environment of a cell: this one, with this rankclip package first on the path, so that every
    cell runs the same code as the study, installed or not."""
    package_root = str(Path(__file__).resolve().parent.parent)
    return os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}


def build_compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rankclip.compare", allow_abbrev=False,
        description="Run a grid of rankclip.main runs (a study) and report on them. Flags not listed here are "
                    "rankclip.main's and form the base configuration of every cell. With no flags: CLIP, CyCLIP "
                    "and RankCLIP x 2 seeds on the bundled demo.",
        epilog="example: python -m rankclip.compare --name objectives --grid loss=clip,cyclip,rankclip seed=0,1,2 "
               "--train_data train.csv --epochs 32")
    p.add_argument("--grid", nargs="+", metavar="KEY=V1,V2", help="axes of the grid, each a flag of "
                   "rankclip.main without '--' and its values")
    p.add_argument("--name", help="the study; its cells go to <logs>/<name>/<cell>/")
    p.add_argument("--logs", "--logs_dir", dest="logs", default="logs/", help="folder of studies (default logs/)")
    p.add_argument("--print_commands", action="store_true",
                   help="print each cell's command line (one per line, for an array job) instead of running them")
    p.add_argument("--nproc_per_node", type=int, default=1, help="run each cell under torchrun with this many "
                   "processes (default 1: a plain python -m rankclip.main)")
    p.add_argument("--allow_mixed", action="store_true",
                   help="let the grid vary data, model or evaluation settings (the report shows them)")
    return p


@dataclass(frozen=True)
class Study:
    """A checked study: its name, its cells, how many processes each cell runs and whether it may mix settings."""

    name: str
    cells: list[Cell]
    nproc_per_node: int
    allow_mixed: bool
    print_commands: bool
    study_dir: Path


def flags_from_values(values: dict) -> list[str]:
    """Flag values (as in a --config file) as rankclip.main's command-line flags."""
    flags = []
    for key, value in values.items():
        if value is True:
            flags.append(f"--{key}")
        elif isinstance(value, list):
            flags += [f"--{key}", *map(str, value)]
        elif value is not None and value is not False:
            flags += [f"--{key}", str(value)]
    return flags


def parse_study(argv: Sequence[str]) -> Study:
    """compare's own flags and the base flags -> a checked Study; every cell is checked like a run at start-up."""
    args, base = build_compare_parser().parse_known_args(argv)
    if args.grid is None:
        if base or args.name:
            raise ConfigError("--grid is missing: name the axes, e.g. --grid loss=clip,cyclip,rankclip seed=0,1")
        args.grid, args.name = list(DEMO_GRID), DEMO_STUDY
        base = flags_from_values(demo_preset() | DEMO_SETTINGS)
    if not args.name:
        raise ConfigError("--name is missing: name the study (the same --name again continues it)")
    if "/" in args.name or args.name in (".", ".."):
        raise ConfigError(f"--name {args.name!r} must be a plain folder name")
    for flag in ("--resume", "--name", "--logs", "--logs_dir"):
        if any(arg == flag or arg.startswith(f"{flag}=") for arg in base):
            raise ConfigError(f"{flag}: compare sets it for each cell; remove it from the flags")
    try:
        _, unknown = build_parser(exit_on_error=False).parse_known_args(base)
    except argparse.ArgumentError as e:
        raise ConfigError(str(e)) from None
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a flag of rankclip.compare or rankclip.main (see their --help)")
    if args.nproc_per_node < 1:
        raise ConfigError(f"--nproc_per_node must be at least 1, got {args.nproc_per_node}")
    axes = parse_grid(args.grid)
    mixed = [axis.key for axis in axes if axis.key in MIXED_SETTINGS]
    if mixed and not args.allow_mixed:
        raise ConfigError(f"--grid {mixed[0]}: the cells would differ in data, model or evaluation settings and "
                          f"their report would mix them; pass --allow_mixed to do so anyway")
    study_dir = Path(args.logs) / args.name
    cells = expand_grid(axes, base, study_dir)
    for cell in cells:
        check_same_settings(cell)
    return Study(args.name, cells, args.nproc_per_node, args.allow_mixed, args.print_commands, study_dir)


def run_cell(command: list[str]) -> tuple[int, Optional[int]]:
    """Run one cell to its end: (exit status, the signal that asked the study to stop, if one did).

    Ctrl-C reaches the cell too (one process group); the trainer's stop signals (SIGTERM, SIGUSR1),
    which a scheduler sends to this process, are passed on. Either way the cell ends itself, its
    checkpoints complete.
    """
    process = subprocess.Popen(command, env=cell_environment())
    stopped: list[int] = []

    def forward(signum: int, frame: object) -> None:
        stopped.append(signum)
        process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        try:
            returncode = process.wait()
        except KeyboardInterrupt:
            stopped.append(signal.SIGINT)
            returncode = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return returncode, stopped[0] if stopped else None


def study_stop_status(returncode: int, stopped_by: Optional[int], torchrun: bool) -> int:
    """compare's exit status when a cell stopped early: EXIT_PREEMPTED (75) when the cell saved and
    stopped (or had just finished) on a stop signal, so that a job script requeues the study as it
    would a run; 128 + the signal otherwise (Ctrl-C: 130). torchrun exits 1 after passing a stop
    signal on (its SignalException), whatever its workers did."""
    ended = (0, 1) if torchrun else (0,)
    if returncode == EXIT_PREEMPTED or (stopped_by in STOP_SIGNALS and returncode in ended):
        return EXIT_PREEMPTED
    return 128 + (stopped_by or signal.SIGINT)


def run_study(study: Study) -> int:
    """Run every cell that is not finished, one after another, then write the report; the exit status."""
    summary = []
    for index, cell in enumerate(study.cells, 1):
        state = cell_state(cell)
        if state == FINISHED:
            print(f"rankclip.compare: cell {index}/{len(study.cells)} {cell.name}: finished, skipped", flush=True)
            summary.append((cell.name, state, "skipped", 0.0))
            continue
        print(f"rankclip.compare: cell {index}/{len(study.cells)} {cell.name}: "
              f"{'resuming' if state == INTERRUPTED else 'starting'}", flush=True)
        start = time.perf_counter()
        returncode, stopped_by = run_cell(cell_command(cell, study.nproc_per_node))
        seconds = time.perf_counter() - start
        if returncode == EXIT_PREEMPTED or stopped_by is not None or returncode == 130:
            print(f"rankclip.compare: stopped in cell {cell.name}; run the same command again to continue the study",
                  file=sys.stderr)
            return study_stop_status(returncode, stopped_by, torchrun=study.nproc_per_node > 1)
        outcome = "done" if returncode == 0 and cell_state(cell) == FINISHED else f"failed (exit {returncode})"
        summary.append((cell.name, state, outcome, seconds))
    print(f"rankclip.compare: study {study.study_dir}")
    for name, state, outcome, seconds in summary:
        print(f"  {name:<40} {state:<12} {outcome:<18} {seconds:7.1f} s")
    failed = [name for name, _, outcome, _ in summary if outcome.startswith("failed")]
    if failed:
        print(f"rankclip.compare: error: {len(failed)} cells did not finish ({', '.join(failed)}); their "
              f"output.log says why; the same command continues the study", file=sys.stderr)
        return 1
    for path in write_report([study.study_dir], study.study_dir, allow_mixed=study.allow_mixed):
        print(path)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        study = parse_study(sys.argv[1:] if argv is None else argv)
        if study.print_commands:
            for cell in study.cells:
                print(shlex.join(cell_command(cell, study.nproc_per_node)))
            return 0
        return run_study(study)
    except RankCLIPError as e:
        print(f"rankclip.compare: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
