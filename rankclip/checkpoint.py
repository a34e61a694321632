"""Checkpoints: atomic writes, exact resume, and import of checkpoints made elsewhere.

Every file is written to a temporary name in the same folder, fsynced, renamed into place and
the folder fsynced, so a crash, a power cut or a full disk never leaves a truncated checkpoint
under a real name. Checkpoints hold only plain types and tensors and are always read with
`weights_only=True`.
"""

from __future__ import annotations

import math
import threading
import zipfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import safetensors.torch
import torch

from .config import Config, ConfigError, best_metric_key, higher_is_better
from .distributed import Runtime
from .files import atomic_alias, atomic_save
from .logger import log
from .optim import load_optimizer_state, state_by_name
from .rankstate import restore_rng, saved_rank_states, seed_rank

# Wrappers whose name prefixes every key: DDP, torch.compile, Lightning modules (self.model).
PREFIXES = ("module.", "_orig_mod.", "model.")


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


# Of those, the ones that place the data inside an epoch: a mid-epoch position means nothing under others.
DATA_POSITION_KEYS = ("train_data", "dataset_type", "train_num_samples", "batch_size", "accum_freq", "seed")


def check_resumed_config(obj: dict, cfg: Config, path: str | Path, world_size: int) -> None:
    """Refuse to continue a checkpoint under other settings that place the schedule or the data,
    naming each change, unless --resume_allow_changes (then they are logged). A mid-epoch
    position is kept only where it stays exact. Checkpoints of the seed / CyCLIP store no
    configuration: nothing to compare."""
    saved = obj.get("config")
    if not isinstance(saved, dict):
        return
    now = cfg.to_dict()
    changed = [key for key in RESUME_KEYS if saved.get(key) != now[key]]
    changes = ", ".join(f"{key} {saved.get(key)!r} -> {now[key]!r}" for key in changed)
    if changed and not cfg.resume_allow_changes:
        raise ConfigError(f"--resume {path}: the checkpoint was written with other settings: {changes}; "
                          f"resume with the run's settings, or pass --resume_allow_changes")
    position = obj.get("position")
    if position:
        done = int(obj["epoch"])
        fallback = (f"resume from {Path(path).parent / f'epoch_{done}.pt'} (the end of epoch {done})" if done
                    else "start the run afresh")
        moved = [key for key in changed if key in DATA_POSITION_KEYS]
        if moved:
            raise ConfigError(f"--resume {path}: the checkpoint stops inside epoch {position['epoch']} and "
                              f"{', '.join(moved)} changed, which moves the data under its position; {fallback}")
        streams = (obj.get("world_size"), saved.get("num_workers")) != (world_size, cfg.num_workers)
        if cfg.dataset_type == "webdataset" and streams:
            raise ConfigError(f"--resume {path}: inside an epoch of webdataset shards the position is per "
                              f"(process, data worker): resume with {obj.get('world_size')} processes and "
                              f"--num_workers {saved.get('num_workers')}, or {fallback}")
    if changed:
        log.warning(f"--resume_allow_changes: continuing {path} with {changes}")


def find_resume(cfg: Config) -> Optional[Path]:
    """The checkpoint a training run continues from, if any (--resume latest/auto/PATH, or the seed's
    --checkpoint with --train_data)."""
    latest = Checkpointer(cfg.run_dir).latest
    if cfg.resume == "auto":
        return latest if latest.is_file() else None
    if cfg.resume == "latest":
        if not latest.is_file():
            raise ConfigError(f"--resume latest: {latest} does not exist; start the run without --resume "
                              f"(or with --resume auto)")
        return latest
    if cfg.resume is not None:
        if not Path(cfg.resume).is_file():
            raise ConfigError(f"--resume {cfg.resume}: no such file; pass 'latest', 'auto' or a checkpoint path")
        return Path(cfg.resume)
    if cfg.checkpoint is not None and cfg.train_data is not None:
        return Path(cfg.checkpoint)
    return None


def check_run_folder(cfg: Config, resuming: bool) -> None:
    """Never overwrite another run's checkpoints, or mix an evaluation into another run's logs."""
    existing = Checkpointer(cfg.run_dir).dir
    if not resuming and cfg.train_data is not None and existing.is_dir() and any(existing.glob("*.pt")):
        hint = "pass --resume latest to continue it" if cfg.resume is None else (
            f"it has no epoch_latest.pt: pass --resume {existing}/epoch_<N>.pt")
        raise ConfigError(f"{cfg.run_dir} already holds checkpoints; {hint} or choose another --name")
    if cfg.train_data is None and (cfg.run_dir / "results.jsonl").exists():
        raise ConfigError(f"{cfg.run_dir} already holds a run's results; choose another --name for this evaluation")


def read_resume_checkpoint(path: Path, cfg: Config) -> dict:
    """Read the checkpoint to continue; when this run's own epoch_latest.pt is truncated or foreign
    (another program's), one line points at the epoch checkpoint to fall back on. A checkpoint of
    another run is refused by check_resumed_config, naming the differences."""
    own_latest = path == Checkpointer(cfg.run_dir).latest
    try:
        obj = read_checkpoint(path)
    except ConfigError as e:
        if not own_latest:
            raise
        raise ConfigError(f"{e}; {_fallback(path.parent)}") from e
    if own_latest and not {"config", "step", "optimizer"} <= set(obj):
        raise ConfigError(f"{path} is not a training checkpoint of this project (it has no config, step or "
                          f"optimizer); {_fallback(path.parent)}")
    return obj


def _fallback(folder: Path) -> str:
    epochs = epoch_files(folder)
    if epochs:
        return f"continue from the last epoch checkpoint with --resume {epochs[-1]}"
    return "no epoch checkpoint is left: start afresh under another --name"


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


class Checkpointer:
    """Owns <run>/checkpoints: epoch_<N>.pt every epoch, epoch_latest.pt (also mid-epoch), and
    epoch.best.pt by --best_metric; the newest `keep` epoch files are kept (all when None)."""

    def __init__(self, run_dir: Path, enabled: bool = True, best_metric: str = Config.best_metric,
                 keep: Optional[int] = None) -> None:
        self.dir = run_dir / "checkpoints"
        self.enabled = enabled
        self.best = BestMetric(best_metric)
        self.keep = keep
        self.writer = BackgroundWriter()

    @property
    def latest(self) -> Path:
        return self.dir / "epoch_latest.pt"

    def save(self, state: dict, recorded: Optional[dict[str, float]] = None) -> None:
        """Write a training state (rank 0; a no-op elsewhere) in the background. With `recorded`
        (Evaluator.run) it is an epoch's end: epoch_<N>.pt, latest and perhaps best; without it a
        mid-epoch state: epoch_latest.pt only. Blocks only for the copy to host memory."""
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


def training_state(*, epoch: int, step: int, position: Optional[dict], cfg: Config, model: torch.nn.Module,
                   optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler],
                   rank_states: list[dict]) -> dict:
    """A checkpoint: `epoch` epochs completed, `step` optimizer steps taken; a mid-epoch one has
    `position` {"epoch": the epoch it stops in, "steps_done": its steps trained, "seen": its samples}."""
    return {
        "epoch": epoch,
        "step": step,
        "position": position,
        "name": cfg.name,
        "model_name": cfg.model_name,
        "config": cfg.to_dict(),
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "world_size": len(rank_states),
        "ranks": rank_states,
    }


def epoch_files(folder: Path) -> list[Path]:
    """epoch_<N>.pt in `folder`, oldest first."""
    numbered = [(int(p.stem.split("_")[1]), p) for p in folder.glob("epoch_*.pt") if p.stem.split("_")[1].isdigit()]
    return [p for _, p in sorted(numbered)]


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues: `epoch` is the next epoch to train, of which `steps_done`
    steps (and `seen` samples) are already trained; `sums` and `failed` are this rank's share of
    that partial epoch's loss sums and unreadable images."""

    epoch: int
    step: int
    steps_done: int = 0
    seen: int = 0
    sums: dict = field(default_factory=dict)
    failed: tuple = ()


def restore_training(obj: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scaler: Optional[torch.amp.GradScaler], checkpointer: Checkpointer, steps_per_epoch: int,
                     runtime: Runtime, seed: int) -> ResumePoint:
    """Optimizer, scaler, this rank's RNG and epoch progress, and the best value from a checkpoint
    whose weights are already loaded.

    Checkpoints of the seed/CyCLIP carry no step or RNG state: the step is then derived from the
    epoch, and each rank is seeded from (seed, rank, step).
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
    own = restore_rank_state(obj, runtime, seed, step)
    position = obj.get("position")
    if not position:
        return ResumePoint(epoch + 1, step)
    return ResumePoint(int(position["epoch"]), step, int(position["steps_done"]), int(position["seen"]),
                       dict(own.get("sums", {})), tuple(own.get("failed", ())))


def restore_rank_state(obj: dict, runtime: Runtime, seed: int, step: int) -> dict:
    """This rank's own entry of the checkpoint, its generators restored. When the number of
    processes changed: a deterministic re-seed, and rank 0 takes over the partial epoch's sums
    (scaled so that their mean over the new ranks is the old mean) and unreadable images."""
    world, states = saved_rank_states(obj)
    if world == runtime.world_size:
        restore_rng(states[runtime.rank]["rng"], runtime.device, runtime.rank)
        return states[runtime.rank]
    if world:
        log.info(f"world size changed: the checkpoint was written by {world} processes, this run has "
                 f"{runtime.world_size}; each rank's random state is re-seeded from (seed, rank, step {step})")
    seed_rank(seed, runtime.rank, step)
    if runtime.rank != 0 or not world:
        return {}
    sums: dict[str, float] = {}
    for state in states:
        for key, value in state.get("sums", {}).items():
            sums[key] = sums.get(key, 0.0) + value * runtime.world_size / world
    return {"sums": sums, "failed": sorted({path for state in states for path in state.get("failed", ())})}


def restore_optimizer(obj: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The checkpoint's optimizer state, matched to `optimizer`'s parameters by name (see optim.py);
    if it does not map completely, the optimizer starts fresh and one warning says why."""
    saved_order = list(extract_state_dict(obj))
    mapped, reason = state_by_name(obj["optimizer"], saved_order, model)
    if mapped is not None:
        try:
            load_optimizer_state(optimizer, mapped)
            return
        except (ValueError, KeyError, TypeError) as e:
            reason = str(e)
    log.warning(f"the checkpoint's optimizer state does not fit this model ({reason}): "
                f"training continues with a fresh optimizer (Adam moments start from zero)")
