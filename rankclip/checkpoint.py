"""Checkpoints: atomic writes, exact resume, and import of checkpoints made elsewhere.

Every file is written to a temporary name in the same folder, fsynced, renamed into place and
the folder fsynced, so a crash, a power cut or a full disk never leaves a truncated checkpoint
under a real name. Checkpoints hold only plain types and tensors and are always read with
`weights_only=True`.
"""

from __future__ import annotations

import math
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import safetensors.torch
import torch

from .config import Config, ConfigError, best_metric_key, higher_is_better
from .distributed import Runtime
from .logger import log
from .optim import state_by_name
from .rankstate import restore_rng, saved_rank_states, seed_rank

# Wrappers whose name prefixes every key: DDP, torch.compile, Lightning modules (self.model).
PREFIXES = ("module.", "_orig_mod.", "model.")


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to `path` via a temporary file + fsync + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (the new name lives in the folder's own data)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_alias(src: Path, dst: Path) -> None:
    """Make `dst` a copy of `src` atomically: a hard link when the file system allows one, else a
    copy that is fsynced before it is renamed into place."""
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
        fsync_folder(dst.parent)
    finally:
        tmp.unlink(missing_ok=True)


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file safely (no pickled code) onto the CPU: torch files or safetensors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as e:
            raise ConfigError(f"checkpoint {path}: cannot be read as safetensors ({e})") from e
    if _is_torchscript(path):
        raise ConfigError(f"checkpoint {path}: a TorchScript archive (such as OpenAI's original release), which "
                          f"holds code; load it once with open_clip.load_openai_model and save its state_dict()")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"checkpoint {path}: cannot be read as a weights-only torch file ({e})") from e
    if not isinstance(obj, dict):
        raise ConfigError(f"checkpoint {path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip holding constants.pkl (plain torch.save zips never do)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def extract_state_dict(obj: dict) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint, whatever wrote it.

    Accepts this project's, the seed's, CyCLIP's and open_clip's checkpoints (weights under
    "state_dict"), Lightning's ("state_dict" with a "model." prefix), {"model": weights}, and
    plain state dicts (OpenAI/open_clip layout). A prefix is removed only when every key has
    it, so no key of a CLIP model itself is ever renamed.
    """
    state = obj
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    stripped = True
    while stripped:
        stripped = False
        for prefix in PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def load_model_weights(model: torch.nn.Module, path: str | Path) -> dict:
    """Strictly load a checkpoint's weights into `model`; returns the whole checkpoint dict."""
    obj = read_checkpoint(path)
    load_weights(model, obj, path)
    return obj


def load_weights(model: torch.nn.Module, obj: dict, path: str | Path) -> None:
    """Strictly load the weights of checkpoint `obj` (read from `path`) into `model`."""
    state = extract_state_dict(obj)
    expected = model.state_dict()
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
              if k in expected and v.shape != expected[k].shape]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected or shapes:
        def some(keys: list[str]) -> str:
            return f"{keys[:5]}{' ...' if len(keys) > 5 else ''} ({len(keys)})"
        raise ConfigError(f"checkpoint {path} does not match the model: missing {some(missing)}, unexpected "
                          f"{some(unexpected)}, wrong shape {some(shapes)}; check --model_name")
    model.load_state_dict(state, strict=True)


# What places a run's schedule and data: a resumed run must keep them (or say --resume_allow_changes).
RESUME_KEYS = ("model_name", "train_data", "dataset_type", "train_num_samples", "batch_size", "accum_freq",
               "epochs", "num_warmup_steps", "seed")


def check_resumed_config(obj: dict, cfg: Config, path: str | Path) -> None:
    """Refuse to continue a checkpoint under other settings that place the schedule or the data,
    naming each change, unless --resume_allow_changes (then they are logged). Checkpoints of the
    seed / CyCLIP store no configuration: nothing to compare."""
    saved = obj.get("config")
    if not isinstance(saved, dict):
        return
    now = cfg.to_dict()
    changes = [f"{key} {saved.get(key)!r} -> {now[key]!r}" for key in RESUME_KEYS if saved.get(key) != now[key]]
    if not changes:
        return
    if not cfg.resume_allow_changes:
        raise ConfigError(f"--resume {path}: the checkpoint was written with other settings: {', '.join(changes)}; "
                          f"resume with the run's settings, or pass --resume_allow_changes")
    log.warning(f"--resume_allow_changes: continuing {path} with {', '.join(changes)}")


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


class Checkpointer:
    """Owns <run>/checkpoints: epoch_<N>.pt every epoch, epoch_latest.pt, and epoch.best.pt by --best_metric."""

    def __init__(self, run_dir: Path, enabled: bool = True, best_metric: str = Config.best_metric) -> None:
        self.dir = run_dir / "checkpoints"
        self.enabled = enabled
        self.best = BestMetric(best_metric)

    @property
    def latest(self) -> Path:
        return self.dir / "epoch_latest.pt"

    def save(self, *, epoch: int, step: int, cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scaler: Optional[torch.amp.GradScaler], recorded: dict[str, float],
             rank_states: Optional[list[dict]]) -> None:
        """Rank 0 writes; `recorded`: the epoch's evaluation (Evaluator.run); `rank_states`: every
        rank's own states (rankstate.gather_rank_states)."""
        if not self.enabled:
            return
        improved = self.best.improved_by(recorded)
        state = {
            "epoch": epoch,
            "step": step,
            "name": cfg.name,
            "model_name": cfg.model_name,
            "config": cfg.to_dict(),
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "world_size": len(rank_states),
            "ranks": rank_states,
            "best_metric": self.best.name,
            "best_value": self.best.value,
        }
        path = self.dir / f"epoch_{epoch}.pt"
        atomic_save(state, path)
        atomic_alias(path, self.latest)
        if improved:
            atomic_alias(path, self.dir / "epoch.best.pt")

    def restore(self, obj: dict) -> None:
        """Pick up the best value so far from a resumed checkpoint (when it was chosen by the same quantity)."""
        if obj.get("best_metric") == self.best.name:
            self.best.value = obj.get("best_value")
        elif obj.get("best_metric") is not None:
            log.info(f"the checkpoint's best epoch was chosen by {obj['best_metric']}, this run uses "
                     f"--best_metric {self.best.name}: epoch.best.pt is chosen afresh from now on")


def restore_training(obj: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scaler: Optional[torch.amp.GradScaler], checkpointer: Checkpointer, steps_per_epoch: int,
                     runtime: Runtime, seed: int) -> tuple[int, int]:
    """Optimizer, scaler, this rank's RNG and the best loss from a checkpoint whose weights are
    already loaded.

    Returns (first epoch to train, global step). Checkpoints of the seed/CyCLIP carry no step or
    RNG state: the step is then derived from the epoch, and the ranks keep their (seed, rank) seeding.
    """
    if "epoch" not in obj:
        raise ConfigError("the checkpoint has no 'epoch': it holds weights only; use --pretrained PATH to start from it")
    if "optimizer" in obj:
        restore_optimizer(obj, model, optimizer)
    if scaler is not None and obj.get("scaler"):
        scaler.load_state_dict(obj["scaler"])
    checkpointer.restore(obj)
    epoch = int(obj["epoch"])
    step = int(obj.get("step", epoch * steps_per_epoch))
    restore_rank_rng(obj, runtime, seed, step)
    return epoch + 1, step


def restore_rank_rng(obj: dict, runtime: Runtime, seed: int, step: int) -> None:
    """Each rank's own generators back; when the number of processes changed, a deterministic re-seed."""
    world, states = saved_rank_states(obj)
    if world == runtime.world_size:
        restore_rng(states[runtime.rank]["rng"], runtime.device, runtime.rank)
    elif world:
        log.info(f"world size changed: the checkpoint was written by {world} processes, this run has "
                 f"{runtime.world_size}; each rank's random state is re-seeded from (seed, rank, step {step})")
        seed_rank(seed, runtime.rank, step)


def restore_optimizer(obj: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The checkpoint's optimizer state, matched to `optimizer`'s parameters by name (see optim.py);
    if it does not map completely, the optimizer starts fresh and one warning says why."""
    saved_order = list(extract_state_dict(obj))
    mapped, reason = state_by_name(obj["optimizer"], saved_order, model)
    if mapped is not None:
        try:
            optimizer.load_state_dict(mapped)
            return
        except (ValueError, KeyError, TypeError) as e:
            reason = str(e)
    log.warning(f"the checkpoint's optimizer state does not fit this model ({reason}): "
                f"training continues with a fresh optimizer (Adam moments start from zero)")
