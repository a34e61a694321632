"""Run-folder logging: output.log, params.txt, results.jsonl, steps.jsonl and (optionally) Weights & Biases
(whose run id the folder keeps, in wandb_run_id.txt).

Only the main process writes; other processes get a RunLogger whose methods do nothing, so
callers never branch on rank.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import sys
from pathlib import Path
from typing import Callable

from .config import RunConfig
from .errors import ReportError
from .files import atomic_write_text

log = logging.getLogger("rankclip")
WANDB_ID_FILE = "wandb_run_id.txt"


def setup_console_logging(rank: int = 0) -> None:
    """Console logging for every process: INFO on the main one, warnings and errors elsewhere."""
    handler = logging.StreamHandler(sys.stdout)
    prefix = "" if rank == 0 else f"[rank {rank}] "
    handler.setFormatter(logging.Formatter(f"%(asctime)s | {prefix}%(message)s", "%Y-%m-%d %H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False


class RunLogger:
    """Writes one run's folder: output.log, params.txt (the flat `settings`), results.jsonl, steps.jsonl."""

    def __init__(self, run: RunConfig, settings: dict, enabled: bool = True) -> None:
        self.enabled = enabled
        self.run_dir = run.run_dir
        self.wandb = None
        self.records: list[dict] = []
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(self.run_dir / "output.log")
        file_handler.setFormatter(logging.Formatter("%(asctime)s | %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(file_handler)
        with open(self.run_dir / "params.txt", "w") as f:
            for key, value in sorted(settings.items()):
                f.write(f"{key}: {value}\n")
        if run.wandb:
            import wandb

            self.wandb = wandb.init(project="rankclip", name=run.name, notes=run.notes, config=settings,
                                    dir=str(self.run_dir), id=wandb_run_id(self.run_dir), resume="allow")

    def results(self, epoch: int, split: str, metrics: dict) -> dict[str, float]:
        """Append one record to results.jsonl (and wandb); returns its numbers by their full names
        ("validation/loss", "eval/CIFAR10/zeroshot_top1": wandb's keys, which --best_metric takes)."""
        # One panel group per evaluation set: "eval/CIFAR10/zeroshot_top1"
        group = "/".join([split] + [str(metrics[k]) for k in ("eval_data_type", "retrieval_data") if k in metrics])
        named = {f"{group}/{k}": _plain(v) for k, v in metrics.items() if isinstance(_plain(v), (int, float))}
        if not self.enabled:
            return named
        record = {"epoch": epoch, "split": split, **{k: _plain(v) for k, v in metrics.items()}}
        self.records.append(record)
        with open(self.run_dir / "results.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
        log.info(f"epoch {epoch} {split}: {shown}")
        if self.wandb is not None:
            self.wandb.log(named | {"epoch": epoch})
        return named

    def rewind(self, epochs_done: int, step: int) -> None:
        """Forget what a stopped run recorded after the checkpoint that is continued (epochs after
        `epochs_done`, steps after `step`): the continued run records them again."""
        if not self.enabled:
            return
        _keep_records(self.run_dir / "results.jsonl", lambda r: r["epoch"] <= epochs_done)
        _keep_records(self.run_dir / "steps.jsonl", lambda r: r["step"] <= step)

    def step(self, step: int, epoch: int, metrics: dict) -> None:
        """Append one training-progress record to steps.jsonl (and wandb): the curves' data."""
        if not self.enabled:
            return
        with open(self.run_dir / "steps.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "epoch": epoch, **{k: _plain(v) for k, v in metrics.items()}}) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"train_step/{k}": v for k, v in metrics.items()} | {"step": step})

    def write_curves(self) -> None:
        """curves.png in the run folder; a plotting problem is reported, never fatal to a finished run."""
        if not self.enabled:
            return
        from .plot import write_curves  # matplotlib loads only when a plot is drawn

        try:
            log.info(f"curves: {write_curves(self.run_dir)}")
        except (ReportError, OSError) as e:
            log.warning(f"curves.png not written: {e}")

    def write_json(self, filename: str = "results.json") -> None:
        """This process's records as one JSON list (evaluation-only runs)."""
        if self.enabled:
            atomic_write_text(self.run_dir / filename, json.dumps(self.records, indent=2) + "\n")

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of a run folder, made at its first launch and kept in WANDB_ID_FILE, so that
    every requeue continues the same W&B run (wandb's resume="allow" resumes only a given id)."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(8)  # W&B ids: letters and digits
    atomic_write_text(path, run_id + "\n")
    return run_id


def _keep_records(path: Path, keep: Callable[[dict], bool]) -> None:
    """Rewrite a JSON-lines file (atomically) with the records `keep` accepts; a line cut short by a kill goes."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if keep(record):
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def _plain(value):
    """JSON-safe value: tensors become floats, NaN stays a float (json writes NaN)."""
    if hasattr(value, "item"):
        return value.item()
    return value


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def progress_interval(num_batches: int, fraction: float = 0.1) -> int:
    """Log every ~10% of an epoch (at least every batch)."""
    return max(1, math.ceil(num_batches * fraction))

