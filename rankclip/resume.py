"""Resume policy: which checkpoint a run continues from, when a resume is refused, and restoring
a training state (optimizer, scaler, each rank's random state and partial epoch) from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import TRAINING_KEYS, Checkpointer, TrainState, checkpoints_dir, epoch_files, latest_path
from .config import CheckpointsConfig, default_value
from .errors import ConfigError, CheckpointError
from .logger import log
from .optim import load_optimizer_state, state_by_name
from .rankstate import restore_rng, saved_rank_states, seed_rank
from .runtime import Runtime
from .weights import extract_state_dict, load_weights, read_checkpoint


# What places a run's schedule and data, which weights train, and the AdamW settings the optimizer's groups
# hold: a resumed run must keep them (or say --resume_allow_changes; the optimizer then takes the flags' values).
RESUME_KEYS = ("model_name", "train_data", "dataset_type", "train_num_samples", "batch_size", "accum_freq",
               "epochs", "num_warmup_steps", "lr_scheduler", "epochs_cooldown", "seed", "beta1", "beta2", "eps",
               "weight_decay", "lock_image", "lock_image_unlocked_groups", "lock_image_freeze_bn_stats", "lock_text",
               "lock_text_unlocked_layers", "lock_text_freeze_layer_norm")


# Of those, the ones that place the data inside an epoch: a mid-epoch position means nothing under others.
DATA_POSITION_KEYS = ("train_data", "dataset_type", "train_num_samples", "batch_size", "accum_freq", "seed")


def check_resumed_config(obj: dict, path: str | Path, settings: dict, world_size: int) -> None:
    """Refuse to continue a checkpoint under other `settings` (this run's, flat as stored) that place
    the schedule or the data or lock other weights, naming each change, unless --resume_allow_changes (then they are
    logged). A mid-epoch position is kept only where it stays exact. Checkpoints of the original
    code / CyCLIP store no configuration: nothing to compare."""
    saved = obj.get("config")
    if not isinstance(saved, dict):
        return
    now = settings
    then = {key: saved.get(key, default_value(key)) for key in RESUME_KEYS}  # keys added since: their defaults
    changed = [key for key in RESUME_KEYS if then[key] != now[key]]
    changes = ", ".join(f"{key} {then[key]!r} -> {now[key]!r}" for key in changed)
    if changed and not now["resume_allow_changes"]:
        raise CheckpointError(f"--resume {path}: the checkpoint was written with other settings: {changes}; "
                          f"resume with the run's settings, or pass --resume_allow_changes")
    position = obj.get("position")
    if position and position.get("train") is None:  # an epoch's end before its evaluation places no data
        done = int(obj["epoch"])
        fallback = (f"resume from {Path(path).parent / f'epoch_{done}.pt'} (the end of epoch {done})" if done
                    else "start the run afresh")
        moved = [key for key in changed if key in DATA_POSITION_KEYS]
        if moved:
            raise CheckpointError(f"--resume {path}: the checkpoint stops inside epoch {position['epoch']} and "
                              f"{', '.join(moved)} changed, which moves the data under its position; {fallback}")
        streams = (obj.get("world_size"), saved.get("num_workers")) != (world_size, now["num_workers"])
        if now["dataset_type"] == "webdataset" and streams:
            raise CheckpointError(f"--resume {path}: inside an epoch of webdataset shards the position is per "
                              f"(process, data worker): resume with {obj.get('world_size')} processes and "
                              f"--num_workers {saved.get('num_workers')}, or {fallback}")
    if changed:
        log.warning(f"--resume_allow_changes: continuing {path} with {changes}")


def find_resume(checkpoints: CheckpointsConfig, run_dir: Path, training: bool) -> Optional[Path]:
    """The checkpoint a training run continues from, if any (--resume latest/auto/PATH, or the original
    code's --checkpoint when `training`)."""
    latest = latest_path(run_dir)
    resume = checkpoints.resume
    if resume == "auto":
        return latest if latest.is_file() else None
    if resume == "latest":
        if not latest.is_file():
            raise ConfigError(f"--resume latest: {latest} does not exist; start the run without --resume "
                              f"(or with --resume auto)")
        return latest
    if resume is not None:
        if not Path(resume).is_file():
            raise ConfigError(f"--resume {resume}: no such file; pass 'latest', 'auto' or a checkpoint path")
        return Path(resume)
    if checkpoints.checkpoint is not None and training:
        return Path(checkpoints.checkpoint)
    return None


def check_run_folder(run_dir: Path, *, training: bool, resume: Optional[str], resuming: bool) -> None:
    """Never overwrite another run's checkpoints, or mix an evaluation into another run's logs."""
    existing = checkpoints_dir(run_dir)
    if not resuming and training and existing.is_dir() and any(existing.glob("*.pt")):
        hint = "pass --resume latest to continue it" if resume is None else (
            f"it has no epoch_latest.pt: pass --resume {existing}/epoch_<N>.pt")
        raise ConfigError(f"{run_dir} already holds checkpoints; {hint} or choose another --name")
    if not training and (run_dir / "results.jsonl").exists():
        raise ConfigError(f"{run_dir} already holds a run's results; choose another --name for this evaluation")


def read_resume_checkpoint(path: Path, run_dir: Path) -> dict:
    """Read the checkpoint to continue (memory-mapped: see read_checkpoint); when this run's own epoch_latest.pt is
    truncated or foreign (another program's), one line points at the epoch checkpoint to fall back on. A
    checkpoint of another run is refused by check_resumed_config, naming the differences."""
    own_latest = path == latest_path(run_dir)
    try:
        obj = read_checkpoint(path)
    except CheckpointError as e:
        if not own_latest:
            raise
        raise CheckpointError(f"{e}; {_fallback(path.parent)}") from e
    if own_latest and not set(TRAINING_KEYS) <= set(obj):
        raise CheckpointError(f"{path} is not a training checkpoint of this project (it has no config, step or "
                          f"optimizer); {_fallback(path.parent)}")
    return obj


def _fallback(folder: Path) -> str:
    epochs = epoch_files(folder)
    if epochs:
        return f"continue from the last epoch checkpoint with --resume {epochs[-1]}"
    return "no epoch checkpoint is left: start afresh under another --name"


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues: `epoch` is the next epoch to train, of which `steps_done`
    steps (and `seen` samples) are already trained; `sums` and `failed` are this rank's share of
    that partial epoch's loss sums and unreadable images. `trained` is the epoch's training record
    when all its steps were trained and saved before its evaluation: then only the evaluation is left."""

    epoch: int
    step: int
    steps_done: int = 0
    seen: int = 0
    sums: dict = field(default_factory=dict)
    failed: tuple = ()
    trained: Optional[dict] = None


def resume_training(path: Path, run_dir: Path, state: TrainState, checkpointer: Checkpointer, settings: dict,
                    steps_per_epoch: int, runtime: Runtime, seed: int) -> ResumePoint:
    """Continue run `run_dir` (flat `settings`) from checkpoint `path`: read it, refuse what cannot be
    continued, load its weights into `state.model` and restore the rest (`restore_training`).

    The checkpoint dict lives only inside this call: once its tensors are copied into the model and
    the optimizer (on their device) it is released, and with it the memory-mapped file. Only the
    small ResumePoint, this rank's share, stays."""
    obj = read_resume_checkpoint(path, run_dir)
    check_resumed_config(obj, path, settings, runtime.world_size)
    load_weights(state.model, obj, path)
    return restore_training(obj, path, state, checkpointer, steps_per_epoch, runtime, seed)


def restore_training(obj: dict, path: Path, state: TrainState, checkpointer: Checkpointer, steps_per_epoch: int,
                     runtime: Runtime, seed: int) -> ResumePoint:
    """Optimizer, scaler, step count, this rank's RNG and epoch progress, and the best value from
    checkpoint `obj` (read from `path`) whose weights are already loaded into `state.model`.

    Checkpoints of the original code/CyCLIP carry no step or RNG state: the step is then derived from
    the epoch, and each rank is seeded from (seed, rank, step).
    """
    if "epoch" not in obj:
        raise CheckpointError("the checkpoint has no 'epoch': it holds weights only; use --pretrained PATH to start from it")
    if "optimizer" in obj:
        restore_optimizer(obj, state.model, state.optimizer)
    if state.scaler is not None and obj.get("scaler"):
        state.scaler.load_state_dict(obj["scaler"])
    checkpointer.restore(obj, path)
    epoch = int(obj["epoch"])
    step = int(obj.get("step", epoch * steps_per_epoch))
    state.step = step
    own = restore_rank_state(obj, runtime, seed, step)
    position = obj.get("position")
    if not position:
        return ResumePoint(epoch + 1, step)
    return ResumePoint(int(position["epoch"]), step, int(position["steps_done"]), int(position["seen"]),
                       dict(own.get("sums", {})), tuple(own.get("failed", ())), position.get("train"))


def restore_rank_state(obj: dict, runtime: Runtime, seed: int, step: int) -> dict:
    """This rank's own entry of the checkpoint, its generators restored. When the number of
    processes changed: a deterministic re-seed, and rank 0 takes over the partial epoch's sums
    (scaled so that their mean over the new ranks is the old mean) and unreadable images; the
    other ranks hold the same sums at 0, since every rank adds up the same keys at the epoch's end
    (which may come at once: a checkpoint written at an epoch's last step)."""
    world, states = saved_rank_states(obj)
    if world == runtime.world_size:
        restore_rng(states[runtime.rank]["rng"], runtime.device, runtime.rank)
        return states[runtime.rank]
    if world:
        log.info(f"world size changed: the checkpoint was written by {world} processes, this run has "
                 f"{runtime.world_size}; each rank's random state is re-seeded from (seed, rank, step {step})")
    seed_rank(seed, runtime.rank, step)
    if not world:
        return {}
    sums = dict.fromkeys(sorted({key for state in states for key in state.get("sums", {})}), 0.0)
    if runtime.rank != 0:
        return {"sums": sums}
    for state in states:
        for key, value in state.get("sums", {}).items():
            sums[key] += value * runtime.world_size / world
    return {"sums": sums, "failed": sorted({path for state in states for path in state.get("failed", ())})}


def restore_optimizer(obj: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The checkpoint's optimizer state, matched to `optimizer`'s parameters by name (see optim.py), under
    this run's AdamW settings (a difference is logged); if it does not map completely, the optimizer
    starts fresh and one warning says why."""
    saved_order = list(extract_state_dict(obj))
    mapped, reason = state_by_name(obj["optimizer"], saved_order, model)
    if mapped is not None:
        try:
            changed = load_optimizer_state(optimizer, mapped)
        except (ValueError, KeyError, TypeError) as e:
            reason = str(e)
        else:
            if changed:
                log.info(f"the checkpoint's optimizer had other AdamW settings: {', '.join(changed)} "
                         f"(this run trains with its flags' values, as params.txt shows)")
            return
    log.warning(f"the checkpoint's optimizer state does not fit this model ({reason}): "
                f"training continues with a fresh optimizer (Adam moments start from zero)")
