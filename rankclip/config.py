"""Typed run configuration, built once from command-line flags and an optional --config file.

Precedence, lowest first: dataclass defaults < the demo preset (only when no data flag is
given) < the `--config` JSON file < flags given on the command line. The result is frozen;
runtime facts (rank, device) live in `distributed.Runtime`, never here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_PRESET = REPO_ROOT / "configs" / "demo.json"

EVAL_DATA_TYPES = (
    "Caltech101", "CIFAR10", "CIFAR100", "DTD", "FGVCAircraft", "Flowers102", "Food101", "GTSRB",
    "ImageNet1K", "OxfordIIITPet", "RenderedSST2", "StanfordCars", "STL10", "SVHN",
    "ImageNetSketch", "ImageNetV2", "ImageNet-A", "ImageNet-R",
)
LOSSES = ("rankclip", "clip", "cyclip")
DATASET_TYPES = ("auto", "csv", "webdataset")
PRECISIONS = ("amp", "amp_bf16", "fp32")
RANK_SCHEDULES = ("reference", "constant")
# --best_metric: which recorded quantities are better when higher, which when lower (by their key).
HIGHER_IS_BETTER = re.compile(r"(zeroshot|linear_probe)_top\d+|.*_R@\d+|.*_consistency")
LOWER_IS_BETTER = re.compile(r".*loss|alignment|.*_uniformity|modality_gap")
# Flags whose presence means "the user brought data": without any of them we run the demo.
DATA_FLAGS = ("train_data", "validation_data", "eval_test_data_dir", "retrieval_data", "checkpoint", "resume",
              "pretrained")


class ConfigError(ValueError):
    """A problem with the user's flags or files, reported as one line at start-up."""


@dataclass(frozen=True)
class Config:
    # run
    name: Optional[str] = None
    logs: str = "logs/"
    seed: int = 0
    wandb: bool = False
    notes: Optional[str] = None
    # model
    model_name: str = "RN50"
    pretrained: Optional[str] = None
    # data
    train_data: Optional[str] = None
    dataset_type: str = "auto"
    train_num_samples: Optional[int] = None
    validation_data: Optional[str] = None
    delimiter: str = ","
    image_key: str = "image"
    caption_key: str = "caption"
    num_workers: int = 4
    log_every_n_steps: Optional[int] = None
    inmodal: bool = False
    # evaluation
    eval_data_type: Optional[tuple[str, ...]] = None
    eval_test_data_dir: Optional[tuple[str, ...]] = None
    eval_train_data_dir: Optional[tuple[str, ...]] = None
    retrieval_data: Optional[tuple[str, ...]] = None
    linear_probe: bool = False
    linear_probe_batch_size: int = 16
    linear_probe_num_epochs: int = 32
    # devices and processes
    device: Optional[str] = None
    device_id: int = 0
    device_ids: Optional[tuple[int, ...]] = None
    distributed: bool = False
    distributed_backend: Optional[str] = None
    distributed_init_method: str = "tcp://127.0.0.1:5434"
    precision: str = "amp"
    sync_bn: bool = False
    grad_checkpointing: bool = False
    compile: bool = False
    # optimisation
    epochs: int = 64
    batch_size: int = 128
    accum_freq: int = 1
    lr: float = 5e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.1
    num_warmup_steps: int = 10000
    # objective
    loss: str = "rankclip"
    lambda1: float = 1 / 16
    lambda2: float = 1 / 16
    rank_eps: float = 1e-10
    rank_schedule: str = "reference"
    cylambda1: float = 0.0
    cylambda2: float = 0.0
    # checkpoints
    checkpoint: Optional[str] = None
    resume: Optional[str] = None
    resume_allow_changes: bool = False
    save_every_minutes: Optional[float] = None  # None: 30 on GPUs, off on CPUs (see train.save_interval)
    save_every_steps: int = 0
    keep_checkpoints: Optional[int] = None
    best_metric: str = "contrastive_loss"
    config: Optional[str] = None
    demo: bool = field(default=False, metadata={"help": "set when the bundled demo preset was applied"})

    @property
    def run_dir(self) -> Path:
        return Path(self.logs) / str(self.name)

    def to_dict(self) -> dict:
        """Plain types only, so the dict can be stored in a checkpoint loaded with weights_only."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def build_parser(exit_on_error: bool = True) -> argparse.ArgumentParser:
    """Seed-compatible flags. Defaults are SUPPRESSed so we can tell which flags were given.

    `exit_on_error=False` makes a bad value raise argparse.ArgumentError instead of exiting
    (rankclip.compare checks grid values with it).
    """
    p = argparse.ArgumentParser(
        prog="python -m rankclip.main",
        description="RankCLIP pretraining and evaluation. With no data flags, trains tiny-vit on the bundled demo.",
        argument_default=argparse.SUPPRESS, exit_on_error=exit_on_error,
    )
    d = Config()
    add = p.add_argument
    add("--config", type=str, help="JSON file of flag values; flags on the command line win")
    add("--name", type=str, help="run name; the run folder is <logs>/<name> (default: time stamp)")
    add("--logs", "--logs_dir", dest="logs", type=str,
        help=f"folder that holds run folders (default {d.logs}); under torchrun spell it --logs_dir")
    add("--seed", type=int, help=f"seed for weights, data order and augmentation (default {d.seed})")
    add("--wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works)")
    add("--notes", type=str, help="notes stored with the wandb run")
    add("--model_name", type=str, help=f"RN50, RN101, RN50x4, ViT-B/32, any open_clip name, or configs/*.json (default {d.model_name})")
    add("--pretrained", nargs="?", const="openai", help="start from OpenAI's weights (no value) or a local weights file")
    add("--train_data", type=str, help="training CSV/TSV of image paths and captions")
    add("--dataset_type", type=str, choices=DATASET_TYPES,
        help="csv (image-caption CSV/TSV) or webdataset (tar shards); auto: webdataset when --train_data names .tar files")
    add("--train_num_samples", type=int, help="samples per epoch with webdataset shards (required there)")
    add("--validation_data", type=str, help="validation CSV/TSV (validation loss each epoch)")
    add("--delimiter", type=str, help="CSV delimiter (default ','; TSV: $'\\t')")
    add("--image_key", type=str, help=f"column of image paths (default {d.image_key})")
    add("--caption_key", type=str, help=f"column of captions (default {d.caption_key})")
    add("--num_workers", type=int, help=f"data loader workers per process (default {d.num_workers})")
    add("--log_every_n_steps", type=int,
        help="log the training loss every N steps (default: about every 10%% of an epoch)")
    add("--inmodal", action="store_true", help="add augmented views and the in-modal contrastive term")
    add("--eval_data_type", type=str, nargs="+", choices=EVAL_DATA_TYPES,
        help="evaluation sets, one per --eval_test_data_dir (e.g. ImageNet1K CIFAR10)")
    add("--eval_test_data_dir", type=str, nargs="+",
        help="test split of each eval set: a labels.csv + classes.py folder, an ImageNet-style image folder, "
             "or a torchvision dataset root")
    add("--eval_train_data_dir", type=str, nargs="+", help="training split of each eval set (linear probe)")
    add("--linear_probe", action="store_true", help="evaluate the eval sets by linear probe instead of zero-shot")
    add("--retrieval_data", type=str, nargs="+",
        help="image-caption CSVs for image<->text retrieval (several captions per image allowed)")
    add("--linear_probe_batch_size", type=int, help=f"(default {d.linear_probe_batch_size})")
    add("--linear_probe_num_epochs", type=int, help=f"(default {d.linear_probe_num_epochs})")
    add("--device", type=str, choices=("cpu", "gpu"), help="default: gpu when CUDA is available, else cpu")
    add("--device_id", type=int, help=f"GPU index for one-process runs (default {d.device_id})")
    add("--device_ids", type=int, nargs="+", help="GPU indices for --distributed")
    add("--distributed", action="store_true", help="one process per GPU")
    add("--distributed_backend", type=str, help="nccl on GPUs, gloo on CPUs by default")
    add("--distributed_init_method", type=str, help=f"(default {d.distributed_init_method})")
    add("--precision", type=str, choices=PRECISIONS, help="amp (fp16), amp_bf16 or fp32; CPU always uses fp32")
    add("--sync_bn", action="store_true", help="synchronize BatchNorm statistics over processes (ResNets)")
    add("--grad_checkpointing", action="store_true", help="recompute activations in backward to save memory")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--epochs", type=int, help=f"(default {d.epochs})")
    add("--batch_size", type=int, help=f"global batch size, split over processes (default {d.batch_size})")
    add("--accum_freq", type=int, help="micro-batches of --batch_size per optimizer step, combined exactly "
        "by gradient caching (default 1)")
    add("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    add("--beta1", type=float, help=f"AdamW beta1 (default {d.beta1})")
    add("--beta2", type=float, help=f"AdamW beta2 (default {d.beta2})")
    add("--eps", type=float, help=f"AdamW eps (default {d.eps})")
    add("--weight_decay", type=float, help=f"(default {d.weight_decay}); never applied to norms, biases, logit scale")
    add("--num_warmup_steps", type=int, help=f"linear warmup steps (default {d.num_warmup_steps})")
    add("--loss", type=str, choices=LOSSES, help=f"training objective (default {d.loss})")
    add("--lambda1", type=float, help="weight of the in-modal rank loss (default 1/16)")
    add("--lambda2", type=float, help="weight of the cross-modal rank loss (default 1/16)")
    add("--rank_eps", type=float, help=f"eps inside the Plackett-Luce log (default {d.rank_eps}; 0 = exact)")
    add("--rank_schedule", type=str, choices=RANK_SCHEDULES, help="rank-loss weight over epochs (default reference)")
    add("--cylambda1", type=float, help="CyCLIP in-modal cyclic weight (default 0)")
    add("--cylambda2", type=float, help="CyCLIP cross-modal cyclic weight (default 0)")
    add("--checkpoint", type=str, help="checkpoint to start from; with no --train_data, evaluate it")
    add("--resume", type=str, help="'latest' (this run's epoch_latest.pt), 'auto' (latest if there is one, "
        "else start: one command for the first launch and every requeue) or a checkpoint path")
    add("--save_every_minutes", type=float, help="also write epoch_latest.pt mid-epoch every M minutes "
        "(default 30 on GPUs, off on CPUs; 0 = off)")
    add("--save_every_steps", type=int, help="also write epoch_latest.pt every N optimizer steps (default off)")
    add("--keep_checkpoints", type=int, help="keep only the K newest epoch_<N>.pt (latest and best are always kept)")
    add("--resume_allow_changes", action="store_true",
        help="resume although the batch size, epochs, warmup, data or seed differ from the checkpoint's (logged)")
    add("--best_metric", type=str, help="what epoch.best.pt is chosen by: a validation quantity "
        "(default contrastive_loss) or eval/<set>/<key>, retrieval/<file>/<key> (e.g. eval/ImageNet1K/zeroshot_top1)")
    return p


def _read_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file; pass a JSON file of flag values")
    try:
        with open(path) as f:
            values = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {path}: not valid JSON ({e}); write it as {{\"epochs\": 10, ...}}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of flag values")
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown keys {unknown}; use the flag names without '--'")
    return values


def demo_preset() -> dict:
    """The bundled demo's flag values (configs/demo.json), its paths made absolute so it runs from any folder."""
    preset = _read_config_file(str(DEMO_PRESET))
    for key in ("train_data", "validation_data"):
        preset[key] = str(REPO_ROOT / preset[key])
    preset["eval_test_data_dir"] = [str(REPO_ROOT / p) for p in preset["eval_test_data_dir"]]
    return preset


MULTI_VALUED = ("device_ids", "eval_data_type", "eval_test_data_dir", "eval_train_data_dir", "retrieval_data")


def _coerce(values: dict) -> dict:
    """Bring flag and JSON values to the dataclass's types: lists (or one JSON string) to tuples."""
    for key in MULTI_VALUED:
        value = values.get(key)
        if value is not None:
            values[key] = (value,) if isinstance(value, (str, int)) else tuple(value)
    return values


def parse_config(argv: Optional[Sequence[str]] = None) -> Config:
    """Flags (+ optional --config file) -> frozen Config, with start-up checks of the values."""
    given = vars(build_parser().parse_args(argv))
    from_file = _read_config_file(given["config"]) if "config" in given else {}
    values: dict = {}
    if not any(k in given or from_file.get(k) is not None for k in DATA_FLAGS):
        values.update(demo_preset(), demo=True)
    values.update(from_file)
    values.update(given)
    if values.get("resume") in ("latest", "auto") and not values.get("name"):
        raise ConfigError(f"--resume {values['resume']} needs the --name of the run to continue")
    if values.get("dataset_type", "auto") == "auto" and values.get("train_data"):
        values["dataset_type"] = "webdataset" if str(values["train_data"]).endswith(".tar") else "csv"
    if not values.get("name"):
        model = str(values.get("model_name", Config.model_name)).replace("/", "-")
        values["name"] = f"{time.strftime('%Y_%m_%d-%H_%M_%S')}-{model}"
    cfg = Config(**_coerce(values))
    _check(cfg)
    return cfg


def best_metric_key(name: str) -> str:
    """The full name of a --best_metric: a bare key is a validation quantity."""
    return name if "/" in name else f"validation/{name}"


def higher_is_better(name: str) -> bool:
    """Whether a larger value of the --best_metric quantity is better."""
    key = name.rsplit("/", 1)[-1]
    if HIGHER_IS_BETTER.fullmatch(key):
        return True
    if LOWER_IS_BETTER.fullmatch(key):
        return False
    raise ConfigError(f"--best_metric {name}: unknown quantity; use a loss part (contrastive_loss, loss, ...), "
                      f"zeroshot_topK, linear_probe_topK, a retrieval R@K or a representation metric")


def _check_best_metric(cfg: Config) -> None:
    """The --best_metric must be a quantity this run's evaluation records (the default needs validation data)."""
    higher_is_better(cfg.best_metric)
    split, *rest = best_metric_key(cfg.best_metric).split("/")
    sets = {"validation": [], "eval": list(cfg.eval_data_type or ()),
            "retrieval": [Path(p).stem for p in cfg.retrieval_data or ()]}
    if split not in sets or len(rest) != (1 if split == "validation" else 2):
        raise ConfigError(f"--best_metric {cfg.best_metric}: write KEY (validation), eval/<set>/KEY or "
                          f"retrieval/<file>/KEY")
    if split == "validation" and cfg.validation_data is None and cfg.best_metric != Config.best_metric:
        raise ConfigError(f"--best_metric {cfg.best_metric} is a validation quantity: pass --validation_data")
    if split != "validation" and rest[0] not in sets[split]:
        raise ConfigError(f"--best_metric {cfg.best_metric}: this run evaluates no {split} set {rest[0]!r} "
                          f"(it has {', '.join(sets[split]) or 'none'})")


def _check(cfg: Config) -> None:
    """Cheap value checks; file and data checks happen where those are opened."""
    choices = {"precision": PRECISIONS, "loss": LOSSES, "rank_schedule": RANK_SCHEDULES,
               "dataset_type": DATASET_TYPES, "device": (None, "cpu", "gpu")}
    for key, allowed in choices.items():  # flags are checked by argparse; --config values only here
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"--{key} {getattr(cfg, key)!r}: choose one of {', '.join(map(str, allowed))}")
    unknown = sorted(set(cfg.eval_data_type or ()) - set(EVAL_DATA_TYPES))
    if unknown:
        raise ConfigError(f"--eval_data_type {unknown}: unknown; choose among {', '.join(EVAL_DATA_TYPES)}")
    if cfg.resume is not None and cfg.train_data is None:
        raise ConfigError("--resume continues training: pass the run's --train_data too")
    if cfg.demo:
        for path in (cfg.train_data, cfg.validation_data, *(cfg.eval_test_data_dir or ())):
            if not os.path.exists(path):
                raise ConfigError(
                    f"the demo data is missing ({path}); build it with `python utils/make_demo.py`")
    if cfg.dataset_type == "webdataset" and cfg.train_num_samples is None:
        raise ConfigError("--train_num_samples is required with webdataset shards: the samples per epoch "
                          "(e.g. the total of img2dataset's successes)")
    if cfg.dataset_type == "csv" and cfg.train_num_samples is not None:
        raise ConfigError("--train_num_samples sets the epoch length of webdataset shards; a CSV epoch is all "
                          "its rows: leave --train_num_samples out (or pass --dataset_type webdataset)")
    if cfg.train_num_samples is not None and cfg.train_num_samples <= 0:
        raise ConfigError(f"--train_num_samples must be positive, got {cfg.train_num_samples}")
    shards = cfg.dataset_type == "webdataset"
    for key in ("validation_data", "checkpoint") if shards else ("train_data", "validation_data", "checkpoint"):
        path = getattr(cfg, key)
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"--{key} {path}: no such file; check the path")
    for path in cfg.retrieval_data or ():
        if not os.path.isfile(path):
            raise ConfigError(f"--retrieval_data {path}: no such file; pass a CSV of image paths and captions")
    for key in ("eval_test_data_dir", "eval_train_data_dir"):
        for path in getattr(cfg, key) or ():
            if not os.path.isdir(path):
                raise ConfigError(f"--{key} {path}: no such folder; it must hold labels.csv and classes.py, "
                                  f"an ImageNet-style image folder or a torchvision dataset root")
    sets, tests, trains = cfg.eval_data_type or (), cfg.eval_test_data_dir or (), cfg.eval_train_data_dir or ()
    if tests and not sets:
        raise ConfigError("--eval_test_data_dir needs --eval_data_type (e.g. --eval_data_type ImageNet1K)")
    if sets and len(sets) != len(tests):
        raise ConfigError(f"--eval_data_type names {len(sets)} sets but --eval_test_data_dir gives {len(tests)} "
                          f"folders; give one folder per set, in the same order")
    if cfg.linear_probe and len(trains) != len(sets):
        raise ConfigError(f"--linear_probe needs one --eval_train_data_dir per --eval_data_type ({len(sets)}), "
                          f"got {len(trains)}")
    if cfg.train_data is None and cfg.checkpoint is None and cfg.resume is None and cfg.pretrained is None:
        raise ConfigError("nothing to do: pass --train_data to train, or --checkpoint (or --pretrained) with "
                          "--eval_* or --retrieval_data to evaluate")
    if cfg.log_every_n_steps is not None and cfg.log_every_n_steps < 1:
        raise ConfigError(f"--log_every_n_steps must be positive, got {cfg.log_every_n_steps}")
    positive = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "accum_freq": cfg.accum_freq,
                "linear_probe_batch_size": cfg.linear_probe_batch_size,
                "linear_probe_num_epochs": cfg.linear_probe_num_epochs}
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"--{key} must be positive, got {value}")
    if cfg.keep_checkpoints is not None and cfg.keep_checkpoints < 1:
        raise ConfigError(f"--keep_checkpoints must be at least 1, got {cfg.keep_checkpoints}")
    for key in ("num_warmup_steps", "num_workers", "weight_decay", "lambda1", "lambda2", "rank_eps",
                "cylambda1", "cylambda2", "save_every_minutes", "save_every_steps"):
        if (getattr(cfg, key) or 0) < 0:
            raise ConfigError(f"--{key} must not be negative, got {getattr(cfg, key)}")
    _check_best_metric(cfg)
    if len(cfg.delimiter) != 1:
        raise ConfigError(f"--delimiter must be one character, got {cfg.delimiter!r} (TSV: --delimiter $'\\t')")
    if cfg.name is not None and (os.sep in cfg.name or cfg.name in ("", ".", "..")):
        raise ConfigError(f"--name {cfg.name!r} must be a plain folder name")
