"""Writing checkpoints: where they live, what a training state holds, the best epoch and the
background writer. Every file goes through files.py's atomic write, so a crash, a power cut or a
full disk never leaves a truncated checkpoint under a real name. Reading checkpoints is in
weights.py, the resume policy in resume.py."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from .config import CheckpointsConfig, best_metric_key, higher_is_better
from .files import atomic_alias, atomic_save
from .logger import log
from .rankstate import capture_rng, cpu_group, gather_rank_states
from .runtime import Runtime
from .savepoints import SavePoints, save_interval_minutes


def checkpoints_dir(run_dir: Path) -> Path:
    """The folder that holds a run's checkpoints."""
    return run_dir / "checkpoints"


def latest_path(run_dir: Path) -> Path:
    """A run's newest checkpoint (the end of an epoch, or inside one)."""
    return checkpoints_dir(run_dir) / "epoch_latest.pt"


@dataclass
class BestMetric:
    """The quantity epoch.best.pt is chosen by (a --best_metric name) and its best value so far."""

    name: str
    value: Optional[float] = None

    def improved_by(self, recorded: dict[str, float]) -> bool:
        """Take this epoch's recorded numbers; True (and remember the value) when they beat the best."""
        value = recorded.get(best_metric_key(self.name))
        if value is None or math.isnan(value):
            return False
        better = self.value is None or (value > self.value if higher_is_better(self.name) else value < self.value)
        if better:
            self.value = value
        return better


def host_copy(value: Any) -> Any:
    """`value` with every tensor copied to host memory, so training can go on while it is written."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: host_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(host_copy(v) for v in value)
    return value


class BackgroundWriter:
    """Runs one checkpoint write at a time on a thread; a new one waits for the previous one.

    A write that fails (a full disk) leaves the previous files intact (atomic_save) and is
    reported as a warning: the run goes on. The thread is not a daemon, so an interrupted
    process still finishes the file it is writing before it exits.
    """

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None

    def submit(self, write: Callable[[], None], what: str) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(write, what), name="checkpoint-writer")
        self._thread.start()

    @staticmethod
    def _run(write: Callable[[], None], what: str) -> None:
        try:
            write()
        except OSError as e:
            log.warning(f"{what} not written ({e}); the previous checkpoint is intact and training continues")

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


@dataclass
class TrainState:
    """What the training loop updates and a checkpoint holds: the model (and the module the loop calls,
    DDP-wrapped and/or compiled), the optimizer, the fp16 loss scaler and the optimizer steps taken."""

    model: torch.nn.Module
    wrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    step: int = 0


class Checkpointer:
    """Owns <run>/checkpoints: when to save (SavePoints: every N steps or M minutes, a stop signal) and
    what: epoch_<N>.pt every epoch, epoch_latest.pt (also mid-epoch), and epoch.best.pt by
    --best_metric; the newest --keep_checkpoints epoch files are kept (all when not given).

    Built on every rank at the same point (it makes the CPU group the ranks agree and gather over);
    rank 0 writes, in the background. `record` is stored in every checkpoint: the run's name, model
    name and flat configuration."""

    def __init__(self, checkpoints: CheckpointsConfig, run_dir: Path, runtime: Runtime, record: dict) -> None:
        self.dir, self.latest = checkpoints_dir(run_dir), latest_path(run_dir)
        self.runtime, self.record = runtime, record
        self.enabled = runtime.is_main
        self.best = BestMetric(checkpoints.best_metric)
        self.keep = checkpoints.keep_checkpoints
        self.writer = BackgroundWriter()
        self.cpu_group = cpu_group()
        self.points = SavePoints(checkpoints.save_every_steps,
                                 save_interval_minutes(checkpoints.save_every_minutes, runtime.device),
                                 runtime.world_size, runtime.is_main, self.cpu_group, runtime.peers)

    def save(self, state: TrainState, epochs_done: int, position: Optional[dict], recorded: Optional[dict] = None,
             sums: Optional[dict] = None, failed: Iterable[str] = ()) -> None:
        """Every rank hands over its own state (its generators, its share of a partial epoch's loss sums
        and unreadable images); rank 0 writes the checkpoint in the background. With `recorded`
        (Evaluator.run) it is an epoch's end: epoch_<N>.pt, latest and perhaps best; without it a
        mid-epoch state at `position`: epoch_latest.pt only. Blocks only for the copy to host memory."""
        own = {"rng": capture_rng(self.runtime.device), "sums": dict(sums or {}), "failed": sorted(failed)}
        rank_states = gather_rank_states(own, self.cpu_group)
        if self.enabled:
            self.write(training_state(state, epoch=epochs_done, position=position, record=self.record,
                                      rank_states=rank_states), recorded)
        self.points.saved()

    def write(self, state: dict, recorded: Optional[dict[str, float]] = None) -> None:
        """Write a checkpoint dict (`training_state`) in the background (rank 0; a no-op elsewhere)."""
        if not self.enabled:
            return
        improved = recorded is not None and self.best.improved_by(recorded)
        state = host_copy(state) | {"best_metric": self.best.name, "best_value": self.best.value}
        if recorded is None:
            self.writer.submit(partial(atomic_save, state, self.latest), f"step {state['step']} checkpoint")
        else:
            self.writer.submit(partial(self._write_epoch, state, improved), f"epoch {state['epoch']} checkpoint")

    def _write_epoch(self, state: dict, improved: bool) -> None:
        path = self.dir / f"epoch_{state['epoch']}.pt"
        atomic_save(state, path)
        atomic_alias(path, self.latest)
        if improved:
            atomic_alias(path, self.dir / "epoch.best.pt")
        if self.keep is not None:
            for old in epoch_files(self.dir)[:-self.keep]:
                old.unlink()

    def wait(self) -> None:
        """Until the last checkpoint is on disk."""
        self.writer.wait()

    def restore(self, obj: dict) -> None:
        """Pick up the best value so far from a resumed checkpoint (when it was chosen by the same quantity)."""
        if obj.get("best_metric") == self.best.name:
            self.best.value = obj.get("best_value")
        elif obj.get("best_metric") is not None:
            log.info(f"the checkpoint's best epoch was chosen by {obj['best_metric']}, this run uses "
                     f"--best_metric {self.best.name}: epoch.best.pt is chosen afresh from now on")


def training_state(state: TrainState, *, epoch: int, position: Optional[dict], record: dict,
                   rank_states: list[dict]) -> dict:
    """A checkpoint: `epoch` epochs completed, `state.step` optimizer steps taken; a mid-epoch one has
    `position` {"epoch": the epoch it stops in, "steps_done": its steps trained, "seen": its samples}.
    `record`: the run's "name", "model_name" and flat "config"."""
    return {
        "epoch": epoch,
        "step": state.step,
        "position": position,
        "name": record["name"],
        "model_name": record["model_name"],
        "config": record["config"],
        "state_dict": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "world_size": len(rank_states),
        "ranks": rank_states,
    }


def epoch_files(folder: Path) -> list[Path]:
    """epoch_<N>.pt in `folder`, oldest first."""
    numbered = [(int(p.stem.split("_")[1]), p) for p in folder.glob("epoch_*.pt") if p.stem.split("_")[1].isdigit()]
    return [p for _, p in sorted(numbered)]
