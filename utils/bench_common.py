"""What the benchmark scripts share: the repository on sys.path, worker subprocesses, Markdown tables.

Each benchmark runs every measured implementation in a fresh subprocess of its own script (a hidden
--worker flag), so that none inherits another's memory, allocator state or in-memory caches.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts run as `python utils/bench_*.py`, from any folder


def add_worker_arguments(parser: argparse.ArgumentParser, workers: Sequence[str]) -> None:
    """The hidden flags by which a benchmark starts itself as one worker: which one, and its folder."""
    parser.add_argument("--worker", choices=list(workers), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)


def run_worker(script: str, arguments: list[str], what: str) -> dict:
    """Run `python script *arguments` in a fresh process; its last output line, parsed as JSON.

    A failed worker ends the benchmark with `what` and the worker's error output."""
    done = subprocess.run([sys.executable, script, *arguments], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table_row(*cells: object) -> str:
    """One Markdown table row of the cells as given (already formatted)."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def print_table_header(*columns: str) -> None:
    """A Markdown table's header row and its separator."""
    print(table_row(*columns))
    print("|" + "---|" * len(columns))
