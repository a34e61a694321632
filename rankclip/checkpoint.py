"""Writing checkpoints: where they live, what a training state holds, the best epoch and the
background writer. Every file goes through files.py's atomic write, so a crash, a power cut or a
full disk never leaves a truncated checkpoint under a real name. Reading checkpoints is in
weights.py, the resume policy in resume.py."""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from .config import CheckpointsConfig, best_metric_key, higher_is_better
from .errors import CheckpointError
from .files import atomic_alias, atomic_save, leftover_temporaries
from .logger import log
from .rankstate import capture_rng, cpu_group, gather_rank_states
from .runtime import Runtime
from .savepoints import SavePoints, save_interval_minutes
from .weights import read_checkpoint

# Checkpoint writes that may fail in a row (a full disk) before the run stops rather than train on
# without one: with saves every 30 minutes, at most an hour and a half of training is unsaved.
MAX_FAILED_WRITES = 3
# What a checkpoint of this project's training holds that weights of other programs do not.
TRAINING_KEYS = ("config", "step", "optimizer")


def checkpoints_dir(run_dir: Path) -> Path:
    """The folder that holds a run's checkpoints."""
    return run_dir / "checkpoints"


def latest_path(run_dir: Path) -> Path:
    """A run's newest checkpoint (the end of an epoch, or inside one)."""
    return checkpoints_dir(run_dir) / "epoch_latest.pt"


@dataclass
class BestMetric:
    """The quantity epoch.best.pt is chosen by (a --best_metric name), its best value so far and the epoch
    that had it. The value moves only when that epoch's checkpoint is on disk (`Checkpointer`)."""

    name: str
    value: Optional[float] = None
    epoch: Optional[int] = None

    def beaten_by(self, recorded: dict[str, float]) -> Optional[float]:
        """This epoch's value of the quantity when it beats the best so far, else None."""
        value = recorded.get(best_metric_key(self.name))
        if value is None or math.isnan(value):
            return None
        if self.value is None or (value > self.value if higher_is_better(self.name) else value < self.value):
            return value
        return None


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
    reported as a warning, and counted: `failures` is the number of writes that failed in a row,
    `error` the last one's message. The thread is not a daemon, so an interrupted process still
    finishes the file it is writing before it exits.
    """

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self.failures = 0
        self.error = ""

    def submit(self, write: Callable[[], None], what: str) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(write, what), name="checkpoint-writer")
        self._thread.start()

    def _run(self, write: Callable[[], None], what: str) -> None:
        try:
            write()
        except OSError as e:
            self.failures += 1
            self.error = f"{what} not written ({e})"
            log.warning(f"{self.error}; the previous checkpoint is intact and training continues")
        else:
            self.failures = 0

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
    --best_metric; the newest --keep_checkpoints epoch files are kept (all with 0).

    Built on every rank at the same point (it makes the CPU group the ranks agree and gather over);
    rank 0 writes, in the background, and first removes what killed writes left behind. After
    MAX_FAILED_WRITES failed writes in a row the next save stops the run (CheckpointError).
    `record` is stored in every checkpoint: the run's name, model name and flat configuration."""

    def __init__(self, checkpoints: CheckpointsConfig, run_dir: Path, runtime: Runtime, record: dict) -> None:
        self.dir, self.latest = checkpoints_dir(run_dir), latest_path(run_dir)
        self.runtime, self.record = runtime, record
        self.enabled = runtime.is_main
        self.best = BestMetric(checkpoints.best_metric)
        self.keep = checkpoints.keep_checkpoints
        self.writer = BackgroundWriter()
        self.cpu_group = cpu_group()
        if self.enabled:
            remove_leftovers(self.dir)
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
        """Write a checkpoint dict (`training_state`) in the background (rank 0; a no-op elsewhere).
        CheckpointError when the writes before it failed MAX_FAILED_WRITES times in a row."""
        if not self.enabled:
            return
        self.writer.wait()  # the best value is that of the checkpoints on disk
        self._check_written(MAX_FAILED_WRITES, "the run stops rather than train on without checkpoints")
        value = self.best.beaten_by(recorded) if recorded is not None else None
        best_value, best_epoch = (self.best.value, self.best.epoch) if value is None else (value, state["epoch"])
        state = host_copy(state) | {"best_metric": self.best.name, "best_value": best_value, "best_epoch": best_epoch}
        if recorded is None:
            self.writer.submit(partial(atomic_save, state, self.latest), f"step {state['step']} checkpoint")
        else:
            self.writer.submit(partial(self._write_epoch, state, value is not None),
                               f"epoch {state['epoch']} checkpoint")

    def _write_epoch(self, state: dict, improved: bool) -> None:
        path = self.dir / f"epoch_{state['epoch']}.pt"
        atomic_save(state, path)
        atomic_alias(path, self.latest)
        if improved:
            atomic_alias(path, self.dir / "epoch.best.pt")
            self.best.value, self.best.epoch = state["best_value"], state["best_epoch"]
        if self.keep:
            for old in epoch_files(self.dir)[:-self.keep]:
                old.unlink()

    def _check_written(self, limit: int, consequence: str) -> None:
        failures = self.writer.failures
        if failures >= limit:
            what = "the last checkpoint write failed" if failures == 1 else \
                f"{failures} checkpoint writes in a row failed"
            raise CheckpointError(f"{what} ({self.writer.error}): {consequence}; free space in {self.dir} (or "
                                  f"repair its file system), then continue with --resume auto from "
                                  f"epoch_latest.pt, the last state written")

    def wait(self) -> None:
        """Until the last checkpoint is on disk (or its write failed)."""
        self.writer.wait()

    def finish(self) -> None:
        """Until the last checkpoint is on disk; CheckpointError when it could not be written, so that
        a run never ends, or stops for a requeue, as though its state were saved."""
        self.wait()
        if self.enabled:
            self._check_written(1, "the run's last state is not saved")

    def restore(self, obj: dict, path: Path) -> None:
        """Continue from checkpoint `obj`, read from `path`: the best value so far (when chosen by the
        same quantity), and on rank 0 this run's checkpoints that the resumed state does not lead to
        set aside (`set_aside_abandoned`)."""
        if obj.get("best_metric") == self.best.name:
            self.best.value, self.best.epoch = obj.get("best_value"), obj.get("best_epoch")
        elif obj.get("best_metric") is not None:
            log.info(f"the checkpoint's best epoch was chosen by {obj['best_metric']}, this run uses "
                     f"--best_metric {self.best.name}: epoch.best.pt is chosen afresh from now on")
        if self.enabled:
            self.set_aside_abandoned(int(obj["epoch"]), Path(path), set(TRAINING_KEYS) <= set(obj))

    def set_aside_abandoned(self, epochs_done: int, resumed: Path, own_format: bool) -> None:
        """A run resumed from an earlier state (a roll-back: `--resume checkpoints/epoch.best.pt`)
        abandons what it had written past it: epoch_<N>.pt with N > `epochs_done`, an epoch_latest.pt
        other than `resumed`, an epoch.best.pt of such an epoch. They move to
        checkpoints/abandoned/<time>/, so retention counts only this continuation's epochs and
        `--resume auto` never picks the abandoned state; epoch_latest.pt becomes the resumed state
        (when it is this project's checkpoint) and epoch.best.pt that of the best epoch so far, if its
        file is still there."""
        best = self.dir / "epoch.best.pt"
        abandoned = [p for p in epoch_files(self.dir) if epoch_number(p) > epochs_done]
        if self.latest.is_file() and not os.path.samefile(self.latest, resumed):
            abandoned.append(self.latest)
        if best.is_file() and int(read_checkpoint(best)["epoch"]) > epochs_done:
            abandoned.append(best)
        if not abandoned:
            return
        aside = self.dir / "abandoned" / time.strftime("%Y%m%d-%H%M%S")
        aside.mkdir(parents=True, exist_ok=True)
        for path in abandoned:
            os.replace(path, aside / path.name)
        if own_format and not self.latest.exists():
            atomic_alias(resumed, self.latest)
        best_file = self.dir / f"epoch_{self.best.epoch}.pt"
        if best in abandoned and self.best.epoch is not None and best_file.is_file():
            atomic_alias(best_file, best)
        log.warning(f"resuming after epoch {epochs_done}: {', '.join(p.name for p in abandoned)} belong to the "
                    f"run's abandoned continuation and were moved to {aside} (delete them when not needed)")


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


def epoch_number(path: Path) -> int:
    """N of epoch_<N>.pt."""
    return int(path.stem.split("_")[1])


def epoch_files(folder: Path) -> list[Path]:
    """epoch_<N>.pt in `folder`, oldest first."""
    return sorted((p for p in folder.glob("epoch_*.pt") if p.stem.split("_")[1].isdigit()), key=epoch_number)


def remove_leftovers(folder: Path) -> None:
    """Delete the temporary files of writes that a kill interrupted (SIGKILL, a rank ended by Peers):
    their names hold the writer's pid, so no later write replaces them, and each is as large as a
    checkpoint."""
    leftovers = leftover_temporaries(folder)
    if leftovers:
        size = sum(p.stat().st_size for p in leftovers)
        for path in leftovers:
            path.unlink(missing_ok=True)
        log.info(f"removed {len(leftovers)} unfinished checkpoint files ({size / 2**30:.2f} GiB) that interrupted "
                 f"writes left in {folder}")
