"""Typed run configuration, built once from command-line flags and an optional --config file.

`Config` is a frozen root of sections (run, model, data, evaluation, launch, training, optim,
objective, checkpoints). Each component takes its own section whole; a value owned by another
section is passed to it by name where the components are wired (main.py). Every field is one
flag of the original RankCLIP/CyCLIP command line, declared with its help text next to it, and
the configuration is stored flat (one key per flag: `to_dict` / `from_dict`) in --config files,
checkpoints, params.txt, wandb and compare's grid.

Precedence, lowest first: field defaults < the demo preset (only when no data flag is given)
< the `--config` JSON file < flags given on the command line. Runtime facts (rank, device)
live in `Runtime`, never here.
"""

from __future__ import annotations

from .benchmark_layout import is_benchmark_folder
from .errors import ConfigError

import argparse
import dataclasses
import json
import os
import re
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence


REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_PRESET = REPO_ROOT / "configs" / "demo.json"

EVAL_DATA_TYPES = (
    "Caltech101", "CIFAR10", "CIFAR100", "DTD", "FGVCAircraft", "Flowers102", "Food101", "GTSRB",
    "ImageNet1K", "OxfordIIITPet", "RenderedSST2", "StanfordCars", "STL10", "SVHN",
    "ImageNetSketch", "ImageNetV2", "ImageNet-A", "ImageNet-R",
)
LOSSES = ("rankclip", "clip", "cyclip", "siglip")
# open_clip SigLipLoss's ways of meeting the other processes' text features (its dist_impl).
SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")
DATASET_TYPES = ("auto", "csv", "webdataset")
PRECISIONS = ("amp", "amp_bf16", "fp32")
RANK_SCHEDULES = ("reference", "constant")
# --model_name prefixes of open_clip's model folders (open_clip_config.json + weights), as open_clip spells them.
MODEL_FOLDER_SCHEMAS = ("local-dir:", "hf-hub:")
# The keys open_clip requires of a model JSON (its registry skips files without them).
MODEL_JSON_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
# The most data-loader workers a process gets by default (more rarely speed up CLIP-sized images).
DEFAULT_MAX_WORKERS = 4
LR_SCHEDULERS = ("cosine", "const", "const-cooldown")  # open_clip_train's --lr-scheduler choices
# --best_metric: which recorded quantities are better when higher, which when lower (by their key).
HIGHER_IS_BETTER = re.compile(r"(zeroshot|linear_probe)_top\d+|.*_R@\d+|.*_consistency")
LOWER_IS_BETTER = re.compile(r".*loss|alignment|.*_uniformity|modality_gap")
# Flags whose presence means "the user brought data": without any of them we run the demo.
DATA_FLAGS = ("train_data", "validation_data", "eval_test_data_dir", "retrieval_data", "checkpoint", "resume",
              "pretrained")


def setting(default: Any, text: str, *aliases: str, **argparse_kwargs: Any) -> Any:
    """A field that is also a flag: `--<name>` (plus `aliases`), its help `text` ("{default}" is filled
    in) and argparse's options for it (type, nargs, choices, action, const)."""
    return field(default=default, metadata={"help": text, "aliases": aliases, "argparse": argparse_kwargs})


def _check_choices(section: object) -> None:
    """Values outside a flag's choices (argparse checks flags; --config values only meet this)."""
    for f in dataclasses.fields(section):
        allowed = f.metadata.get("argparse", {}).get("choices")
        value = getattr(section, f.name)
        if allowed is None or value is None:
            continue
        if isinstance(value, tuple):
            unknown = sorted(set(value) - set(allowed))
            if unknown:
                raise ConfigError(f"--{f.name} {unknown}: unknown; choose among {', '.join(allowed)}")
        elif value not in allowed:
            raise ConfigError(f"--{f.name} {value!r}: choose one of {', '.join(map(str, allowed))}")


def _check_signs(section: object, positive: Sequence[str] = (), non_negative: Sequence[str] = ()) -> None:
    for key in positive:
        if not getattr(section, key) > 0:
            raise ConfigError(f"--{key} must be positive, got {getattr(section, key)}")
    for key in non_negative:
        if (getattr(section, key) or 0) < 0:
            raise ConfigError(f"--{key} must not be negative, got {getattr(section, key)}")


def default_num_workers(local_processes: Optional[int] = None) -> int:
    """The default --num_workers: the CPUs this process may use (its affinity, as torch's DataLoader counts
    them) shared among this node's processes (torchrun's LOCAL_WORLD_SIZE, or `local_processes`), at most
    DEFAULT_MAX_WORKERS; 0 (loading in the process itself) when there are fewer CPUs than processes."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes = local_processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(DEFAULT_MAX_WORKERS, cpus // max(1, processes))


@dataclass(frozen=True)
class RunConfig:
    """Which run this is: its folder, its seed and where it is tracked."""

    config: Optional[str] = setting(None, "JSON file of flag values; flags on the command line win", type=str)
    name: Optional[str] = setting(None, "run name; the run folder is <logs>/<name> (default: time stamp)", type=str)
    logs: str = setting("logs/", "folder that holds run folders (default {default}); under torchrun spell it "
                        "--logs_dir", "--logs_dir", type=str)
    seed: int = setting(0, "seed for weights, data order and augmentation (default {default})", type=int)
    wandb: bool = setting(False, "log to Weights & Biases (WANDB_MODE=offline works)", action="store_true")
    notes: Optional[str] = setting(None, "notes stored with the wandb run", type=str)
    demo: bool = field(default=False, metadata={"help": "set when the bundled demo preset was applied"})

    @property
    def run_dir(self) -> Path:
        return Path(self.logs) / str(self.name)

    def check(self) -> None:
        if self.name is not None and (os.sep in self.name or self.name in ("", ".", "..")):
            raise ConfigError(f"--name {self.name!r} must be a plain folder name")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture (open_clip), the weights it starts from and which of them train."""

    model_name: str = setting("RN50", "RN50, RN101, RN50x4, ViT-B/32, any open_clip name, configs/*.json names, "
                              "a path to an open_clip model JSON, or an open_clip model folder (local-dir:DIR, "
                              "hf-hub:ORG/NAME from the local cache); default: the model of the --checkpoint or "
                              "--resume checkpoint, else {default}", type=str)
    pretrained: Optional[str] = setting(None, "start from OpenAI's weights (no value), from released weights by "
                                        "their open_clip tag (e.g. laion2b_s34b_b79k; see open_clip."
                                        "list_pretrained_tags_by_model), read from the local cache, or from a local "
                                        "weights file", nargs="?", const="openai")
    cache_dir: Optional[str] = setting(None, "the open_clip/Hugging Face cache --pretrained tags are read from "
                                       "(default: the Hugging Face hub cache, under HF_HOME)", type=str)
    grad_checkpointing: bool = setting(False, "recompute activations in backward to save memory",
                                       action="store_true")
    lock_image: bool = setting(False, "lock the image tower (LiT): its weights get no gradient and do not train",
                               action="store_true")
    lock_image_unlocked_groups: int = setting(0, "with --lock_image, leave the last N layer groups of the image "
                                              "tower unlocked (default 0)", type=int)
    lock_image_freeze_bn_stats: bool = setting(False, "with --lock_image, also freeze the BatchNorm running "
                                               "statistics of the locked layers", action="store_true")
    lock_text: bool = setting(False, "lock the text tower: its weights get no gradient and do not train",
                              action="store_true")
    lock_text_unlocked_layers: int = setting(0, "with --lock_text, leave the last N layer groups of the text tower "
                                             "unlocked (default 0)", type=int)
    lock_text_freeze_layer_norm: bool = setting(False, "with --lock_text, lock the LayerNorms of the locked layers "
                                                "too (open_clip's own text towers always do: required there)",
                                                action="store_true")
    model_cfg: Optional[dict] = field(default=None, metadata={
        "help": "the architecture of a --model_name JSON file (its content), kept so that checkpoints rebuild it"})

    @property
    def from_json(self) -> bool:
        """--model_name is the path of an open_clip model JSON file."""
        return self.model_name.endswith(".json")

    @property
    def from_folder(self) -> bool:
        """--model_name is an open_clip model folder (local-dir:DIR or hf-hub:ORG/NAME), which holds its weights."""
        return self.model_name.startswith(MODEL_FOLDER_SCHEMAS)

    def check(self) -> None:
        _check_signs(self, non_negative=("lock_image_unlocked_groups", "lock_text_unlocked_layers"))
        for lock, options in (("lock_image", ("lock_image_unlocked_groups", "lock_image_freeze_bn_stats")),
                              ("lock_text", ("lock_text_unlocked_layers", "lock_text_freeze_layer_norm"))):
            given = [key for key in options if getattr(self, key) and not getattr(self, lock)]
            if given:
                raise ConfigError(f"--{given[0]} applies to a locked tower: add --{lock}")
        if self.from_folder and self.pretrained is not None:
            raise ConfigError(f"--pretrained: --model_name {self.model_name} brings its own weights; leave "
                              f"--pretrained out")


@dataclass(frozen=True)
class CsvLayout:
    """How an image-caption CSV is read: its image-path and caption columns and its delimiter."""

    image_key: str = "image"
    caption_key: str = "caption"
    delimiter: str = ","


@dataclass(frozen=True)
class DataConfig:
    """The training and validation image-caption data and how it is read."""

    train_data: Optional[str] = setting(None, "training CSV/TSV of image paths and captions", type=str)
    dataset_type: str = setting("auto", "csv (image-caption CSV/TSV) or webdataset (tar shards); auto: webdataset "
                                "when --train_data names .tar files", type=str, choices=DATASET_TYPES)
    train_num_samples: Optional[int] = setting(None, "samples per epoch with webdataset shards (required there)",
                                               type=int)
    validation_data: Optional[str] = setting(None, "validation CSV/TSV (validation loss each epoch)", type=str)
    delimiter: str = setting(",", "CSV delimiter (default ','; TSV: $'\\t')", type=str)
    image_key: str = setting("image", "column of image paths (default {default})", type=str)
    caption_key: str = setting("caption", "column of captions (default {default})", type=str)
    num_workers: int = setting(default_num_workers(), "data loader workers per process (default: the CPUs this "
                               "process may use, shared among the node's processes, at most 4; {default} here)",
                               type=int)
    inmodal: bool = setting(False, "add augmented views and the in-modal contrastive term", action="store_true")

    @property
    def shards(self) -> bool:
        return self.dataset_type == "webdataset"

    @property
    def csv_layout(self) -> CsvLayout:
        """The layout of every image-caption CSV of the run (training, validation, retrieval)."""
        return CsvLayout(self.image_key, self.caption_key, self.delimiter)

    def check(self) -> None:
        _check_choices(self)
        if self.shards and self.train_num_samples is None:
            raise ConfigError("--train_num_samples is required with webdataset shards: the samples per epoch "
                              "(e.g. the total of img2dataset's successes)")
        if self.dataset_type == "csv" and self.train_num_samples is not None:
            raise ConfigError("--train_num_samples sets the epoch length of webdataset shards; a CSV epoch is all "
                              "its rows: leave --train_num_samples out (or pass --dataset_type webdataset)")
        if self.train_num_samples is not None and self.train_num_samples <= 0:
            raise ConfigError(f"--train_num_samples must be positive, got {self.train_num_samples}")
        for key in ("validation_data",) if self.shards else ("train_data", "validation_data"):
            _check_file(key, getattr(self, key))
        _check_signs(self, non_negative=("num_workers",))
        if len(self.delimiter) != 1:
            raise ConfigError(f"--delimiter must be one character, got {self.delimiter!r} (TSV: --delimiter $'\\t')")


@dataclass(frozen=True)
class EvaluationConfig:
    """What is evaluated, and after which epochs: zero-shot or linear-probe sets, and retrieval."""

    eval_data_type: Optional[tuple[str, ...]] = setting(
        None, "evaluation sets, one per --eval_test_data_dir: the original code's " + ", ".join(EVAL_DATA_TYPES)
              + "; or any name for a clip_benchmark folder (e.g. wds_sun397)", type=str, nargs="+")
    eval_test_data_dir: Optional[tuple[str, ...]] = setting(
        None, "test split of each eval set: a labels.csv + classes.py folder, an ImageNet-style image folder, "
              "a torchvision dataset root, or a clip_benchmark webdataset folder (its test/ split)", type=str,
        nargs="+")
    eval_train_data_dir: Optional[tuple[str, ...]] = setting(
        None, "training split of each eval set (linear probe)", type=str, nargs="+")
    linear_probe: bool = setting(False, "evaluate the eval sets by linear probe instead of zero-shot",
                                 action="store_true")
    retrieval_data: Optional[tuple[str, ...]] = setting(
        None, "image-caption CSVs or clip_benchmark retrieval folders for image<->text retrieval (several "
              "captions per image allowed)", type=str, nargs="+")
    linear_probe_batch_size: int = setting(16, "(default {default})", type=int)
    linear_probe_num_epochs: int = setting(32, "(default {default})", type=int)
    zeroshot_frequency: int = setting(1, "evaluate the --eval_data_type sets (zero-shot or linear probe) before "
                                      "training, after epochs divisible by N and after the last (default {default}; "
                                      "0 = never)", type=int)
    val_frequency: int = setting(1, "evaluate --validation_data and --retrieval_data before training, after epochs "
                                 "divisible by N and after the last (default {default}; 0 = never)", type=int)

    def sets(self) -> Iterator[tuple[str, str, Optional[str]]]:
        """(set name, test folder, training folder or None) of each --eval_data_type."""
        trains = self.eval_train_data_dir or (None,) * len(self.eval_data_type or ())
        return zip(self.eval_data_type or (), self.eval_test_data_dir or (), trains)

    @property
    def retrieval_names(self) -> list[str]:
        """The names retrieval results are recorded under (records, wandb, --best_metric, report): each
        CSV's file stem, and where stems repeat, preceded by as many parent folders as tell those CSVs
        apart, joined by '-' (`a/flickr30k/test.csv b/mscoco/test.csv` -> flickr30k-test, mscoco-test).
        The same CSV given twice is a ConfigError."""
        paths = list(self.retrieval_data or ())
        parts = [Path(os.path.abspath(p)).with_suffix("").parts[1:] for p in paths]  # folders and stem
        depth = [1] * len(paths)
        while True:
            names = ["-".join(p[-d:]) for p, d in zip(parts, depth)]
            clashing = [i for i, name in enumerate(names) if names.count(name) > 1]
            if not clashing:
                return names
            longer = [i for i in clashing if depth[i] < len(parts[i])]
            if not longer:
                raise ConfigError(f"--retrieval_data {paths[clashing[0]]} is given twice; give each retrieval set once")
            for i in longer:
                depth[i] += 1

    def check(self) -> None:
        _check_choices(self)
        self.retrieval_names  # distinct names, or a ConfigError at start-up
        for path in self.retrieval_data or ():
            if not os.path.isfile(path) and not is_benchmark_folder(path):
                raise ConfigError(f"--retrieval_data {path}: no such file; pass a CSV of image paths and captions "
                                  f"or a clip_benchmark retrieval folder (dataset_type.txt, test/nshards.txt, ...)")
        for key in ("eval_test_data_dir", "eval_train_data_dir"):
            for path in getattr(self, key) or ():
                if not os.path.isdir(path):
                    raise ConfigError(f"--{key} {path}: no such folder; it must hold labels.csv and classes.py, "
                                      f"an ImageNet-style image folder or a torchvision dataset root")
        sets, tests = self.eval_data_type or (), self.eval_test_data_dir or ()
        trains = self.eval_train_data_dir or ()
        if tests and not sets:
            raise ConfigError("--eval_test_data_dir needs --eval_data_type (e.g. --eval_data_type ImageNet1K)")
        if sets and len(sets) != len(tests):
            raise ConfigError(f"--eval_data_type names {len(sets)} sets but --eval_test_data_dir gives {len(tests)} "
                              f"folders; give one folder per set, in the same order")
        for name, test in zip(sets, tests):
            if name not in EVAL_DATA_TYPES and not is_benchmark_folder(test):
                raise ConfigError(f"--eval_data_type {name}: unknown set; name one of {', '.join(EVAL_DATA_TYPES)}, "
                                  f"or give a clip_benchmark folder (test/nshards.txt, classnames.txt, ...), "
                                  f"whose name is free")
        if self.linear_probe and len(trains) != len(sets):
            raise ConfigError(f"--linear_probe needs one --eval_train_data_dir per --eval_data_type ({len(sets)}), "
                              f"got {len(trains)}")
        _check_signs(self, positive=("linear_probe_batch_size", "linear_probe_num_epochs"),
                     non_negative=("zeroshot_frequency", "val_frequency"))


@dataclass(frozen=True)
class LaunchConfig:
    """Devices and processes: one process, --distributed (one per GPU), torchrun or srun."""

    device: Optional[str] = setting(None, "default: gpu when CUDA is available, else cpu", type=str,
                                    choices=("cpu", "gpu"))
    device_id: int = setting(0, "GPU index for one-process runs (default {default})", type=int)
    device_ids: Optional[tuple[int, ...]] = setting(None, "GPU indices for --distributed", type=int, nargs="+")
    distributed: bool = setting(False, "one process per GPU", action="store_true")
    distributed_backend: Optional[str] = setting(None, "nccl on GPUs, gloo on CPUs by default", type=str)
    distributed_init_method: str = setting("tcp://127.0.0.1:5434", "(default {default})", type=str)
    sync_bn: bool = setting(False, "synchronize BatchNorm statistics over processes (ResNets)", action="store_true")
    compile: bool = setting(False, "torch.compile the model", action="store_true")

    def check(self) -> None:
        _check_choices(self)


@dataclass(frozen=True)
class TrainingConfig:
    """The loop: how long, how large a batch, in which precision, how often it logs."""

    epochs: int = setting(64, "(default {default})", type=int)
    batch_size: int = setting(128, "global batch size, split over processes (default {default})", type=int)
    accum_freq: int = setting(1, "micro-batches of --batch_size per optimizer step, combined exactly by gradient "
                              "caching (default 1)", type=int)
    precision: str = setting("amp", "amp (fp16), amp_bf16 or fp32; CPU always uses fp32", type=str,
                             choices=PRECISIONS)
    log_every_n_steps: Optional[int] = setting(None, "log the training loss every N steps (default: about every "
                                               "10%% of an epoch)", type=int)
    grad_clip_norm: Optional[float] = setting(None, "clip the gradient's global L2 norm (all processes, all "
                                              "micro-batches of a step, after fp16 unscaling) to this before each "
                                              "optimizer step (default: no clipping); steps.jsonl's grad_norm is the "
                                              "norm before clipping", type=float)

    def check(self) -> None:
        _check_choices(self)
        if self.log_every_n_steps is not None and self.log_every_n_steps < 1:
            raise ConfigError(f"--log_every_n_steps must be positive, got {self.log_every_n_steps}")
        _check_signs(self, positive=("epochs", "batch_size", "accum_freq"))
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ConfigError(f"--grad_clip_norm must be positive, got {self.grad_clip_norm} (leave it out for no "
                              f"clipping)")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its learning-rate schedule (linear warmup, then cosine to 0, constant, or constant with a cooldown)."""

    lr: float = setting(5e-4, "peak learning rate (default {default})", type=float)
    beta1: float = setting(0.9, "AdamW beta1 (default {default})", type=float)
    beta2: float = setting(0.999, "AdamW beta2 (default {default})", type=float)
    eps: float = setting(1e-8, "AdamW eps (default {default})", type=float)
    weight_decay: float = setting(0.1, "(default {default}); never applied to norms, biases, logit scale",
                                  type=float)
    num_warmup_steps: int = setting(10000, "linear warmup steps (default {default})", type=int)
    lr_scheduler: str = setting("cosine", "after the warmup: cosine (to 0 at the last step), const (the peak lr) "
                                "or const-cooldown (the peak lr, then a decay over the last --epochs_cooldown "
                                "epochs) (default {default})", type=str, choices=LR_SCHEDULERS)
    epochs_cooldown: Optional[int] = setting(None, "const-cooldown: the last N epochs decay the lr", type=int)
    lr_cooldown_end: float = setting(0.0, "const-cooldown: the lr the cooldown reaches at the last step (default "
                                     "{default})", type=float)
    lr_cooldown_power: float = setting(1.0, "const-cooldown: the decay is (1 - progress)^power (default {default}: "
                                       "linear)", type=float)

    @property
    def betas(self) -> tuple[float, float]:
        return self.beta1, self.beta2

    def check(self) -> None:
        _check_choices(self)
        _check_signs(self, positive=("lr", "lr_cooldown_power"),
                     non_negative=("num_warmup_steps", "weight_decay", "lr_cooldown_end"))
        if self.lr_scheduler == "const-cooldown" and self.epochs_cooldown is None:
            raise ConfigError("--lr_scheduler const-cooldown needs --epochs_cooldown N: the last N epochs cool down")
        if self.epochs_cooldown is not None and self.epochs_cooldown < 1:
            raise ConfigError(f"--epochs_cooldown must be positive, got {self.epochs_cooldown}")


@dataclass(frozen=True)
class ObjectiveConfig:
    """The loss: CLIP, CyCLIP, RankCLIP or SigLIP, its term weights and the rank weight's schedule."""

    loss: str = setting("rankclip", "training objective (default {default})", type=str, choices=LOSSES)
    lambda1: float = setting(1 / 16, "weight of the in-modal rank loss (default 1/16)", type=float)
    lambda2: float = setting(1 / 16, "weight of the cross-modal rank loss (default 1/16)", type=float)
    rank_eps: float = setting(1e-10, "eps inside the Plackett-Luce log (default {default}; 0 = exact)", type=float)
    rank_schedule: str = setting("reference", "rank-loss weight over epochs (default reference)", type=str,
                                 choices=RANK_SCHEDULES)
    cylambda1: float = setting(0.0, "CyCLIP in-modal cyclic weight (default 0)", type=float)
    cylambda2: float = setting(0.0, "CyCLIP cross-modal cyclic weight (default 0)", type=float)
    loss_dist_impl: str = setting("bidir", "how --loss siglip meets the other processes' text features (open_clip's "
                                  "SigLipLoss: bidir/shift pass them between neighbours, reduce/gather collect them; "
                                  "same value; default {default})", type=str, choices=SIGLIP_DIST_IMPLS)

    def check(self) -> None:
        _check_choices(self)
        _check_signs(self, non_negative=("lambda1", "lambda2", "rank_eps", "cylambda1", "cylambda2"))


@dataclass(frozen=True)
class CheckpointsConfig:
    """Where a run starts from, when it saves, what it keeps and what epoch.best.pt is chosen by."""

    checkpoint: Optional[str] = setting(None, "checkpoint to start from; with no --train_data, evaluate it",
                                        type=str)
    resume: Optional[str] = setting(None, "'latest' (this run's epoch_latest.pt), 'auto' (latest if there is one, "
                                    "else start: one command for the first launch and every requeue) or a "
                                    "checkpoint path", type=str)
    save_every_minutes: Optional[float] = setting(None, "also write epoch_latest.pt mid-epoch every M minutes "
                                                  "(default 30 on GPUs, off on CPUs; 0 = off)", type=float)
    save_every_steps: int = setting(0, "also write epoch_latest.pt every N optimizer steps (default off)", type=int)
    keep_checkpoints: Optional[int] = setting(3, "keep the K newest epoch_<N>.pt (default {default}; 0 = every "
                                              "epoch's); epoch_latest.pt and epoch.best.pt are always kept",
                                              type=int)
    resume_allow_changes: bool = setting(False, "resume although the batch size, epochs, warmup, data, seed or "
                                         "AdamW settings differ from the checkpoint's (logged; the flags' "
                                         "values are used)", action="store_true")
    best_metric: str = setting("contrastive_loss", "what epoch.best.pt is chosen by: a validation quantity "
                               "(default contrastive_loss) or eval/<set>/<key>, retrieval/<file>/<key> "
                               "(e.g. eval/ImageNet1K/zeroshot_top1)", type=str)

    def check(self) -> None:
        _check_file("checkpoint", self.checkpoint)
        _check_signs(self, non_negative=("save_every_minutes", "save_every_steps", "keep_checkpoints"))
        higher_is_better(self.best_metric)


def _check_file(key: str, path: Optional[str]) -> None:
    if path is not None and not os.path.isfile(path):
        raise ConfigError(f"--{key} {path}: no such file; check the path")


@dataclass(frozen=True)
class Config:
    """The whole run's settings, one typed section per component (see the module docstring)."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    checkpoints: CheckpointsConfig = field(default_factory=CheckpointsConfig)

    def sections(self) -> Iterator[Any]:
        return (getattr(self, f.name) for f in dataclasses.fields(self))

    def to_dict(self) -> dict:
        """The flat form (one key per flag), plain types only: it is stored in checkpoints loaded with
        weights_only, in params.txt and in wandb."""
        return {key: list(value) if isinstance(value, tuple) else value
                for section in self.sections() for key, value in dataclasses.asdict(section).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """The inverse of `to_dict` (missing keys take their defaults); an unknown key is a ConfigError."""
        unknown = sorted(set(values) - set(SETTINGS))
        if unknown:
            raise ConfigError(f"unknown settings {unknown}; use the flag names without '--'")
        given = _coerce(dict(values))
        return cls(**{name: section(**{k: v for k, v in given.items() if SETTINGS[k][0] == name})
                      for name, section in SECTIONS.items()})

    def check(self) -> None:
        """Start-up checks of the values and of the files they name (data is opened where it is read)."""
        run, data, checkpoints = self.run, self.data, self.checkpoints
        if run.demo:
            for path in (data.train_data, data.validation_data, *(self.evaluation.eval_test_data_dir or ())):
                if not os.path.exists(path):
                    raise ConfigError(
                        f"the demo data is missing ({path}); build it with `python utils/make_demo.py`")
        if self.objective.loss == "siglip" and data.inmodal:
            raise ConfigError("--inmodal adds CyCLIP's in-modal contrastive term, which --loss siglip does not have; "
                              "leave --inmodal out or choose --loss clip, cyclip or rankclip")
        if checkpoints.resume is not None and data.train_data is None:
            raise ConfigError("--resume continues training: pass the run's --train_data too")
        for section in self.sections():
            getattr(section, "check", lambda: None)()
        if data.train_data is None and checkpoints.checkpoint is None and checkpoints.resume is None \
                and self.model.pretrained is None and not self.model.from_folder:
            raise ConfigError("nothing to do: pass --train_data to train, or --checkpoint (or --pretrained, or "
                              "--model_name local-dir:DIR) with --eval_* or --retrieval_data to evaluate")
        self._check_best_metric()
        cooldown = self.optim.epochs_cooldown
        if self.optim.lr_scheduler == "const-cooldown" and cooldown > self.training.epochs:
            raise ConfigError(f"--epochs_cooldown {cooldown} is longer than the run (--epochs {self.training.epochs}); "
                              f"give at most {self.training.epochs}")

    def _check_best_metric(self) -> None:
        """The --best_metric must be a quantity this run's evaluation records (the default needs validation data)."""
        name = self.checkpoints.best_metric
        split, *rest = best_metric_key(name).split("/")
        sets = {"validation": [], "eval": list(self.evaluation.eval_data_type or ()),
                "retrieval": self.evaluation.retrieval_names}
        if split not in sets or len(rest) != (1 if split == "validation" else 2):
            raise ConfigError(f"--best_metric {name}: write KEY (validation), eval/<set>/KEY or "
                              f"retrieval/<file>/KEY")
        if split == "validation" and self.data.validation_data is None and name != CheckpointsConfig.best_metric:
            raise ConfigError(f"--best_metric {name} is a validation quantity: pass --validation_data")
        if split != "validation" and rest[0] not in sets[split]:
            raise ConfigError(f"--best_metric {name}: this run evaluates no {split} set {rest[0]!r} "
                              f"(it has {', '.join(sets[split]) or 'none'})")


# Section name -> its class, in the root's order.
SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}
# Every setting's flat key -> (its section's name, its dataclass field); keys are unique across sections.
SETTINGS: dict[str, tuple[str, dataclasses.Field]] = {
    f.name: (name, f) for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
assert len(SETTINGS) == sum(len(dataclasses.fields(cls)) for cls in SECTIONS.values()), "a setting is declared twice"
MULTI_VALUED = tuple(k for k, (_, f) in SETTINGS.items() if f.metadata.get("argparse", {}).get("nargs") == "+")


def setting_type(key: str) -> Any:
    """The Python type of setting `key` (e.g. bool, Optional[int])."""
    return typing.get_type_hints(SECTIONS[SETTINGS[key][0]])[key]


def default_value(key: str) -> Any:
    return SETTINGS[key][1].default


def build_parser(exit_on_error: bool = True) -> argparse.ArgumentParser:
    """The original code's flags, one argument group per section. Defaults are SUPPRESSed so that
    parse_config can tell which flags were given.

    `exit_on_error=False` makes a bad value raise argparse.ArgumentError instead of exiting
    (rankclip.compare checks grid values with it).
    """
    p = argparse.ArgumentParser(
        prog="python -m rankclip.main",
        description="RankCLIP pretraining and evaluation. With no data flags, trains tiny-vit on the bundled demo.",
        argument_default=argparse.SUPPRESS, exit_on_error=exit_on_error,
    )
    for name, section in SECTIONS.items():
        group = p.add_argument_group(name, section.__doc__)
        for f in dataclasses.fields(section):
            if "argparse" not in f.metadata:
                continue
            help_text = f.metadata["help"].replace("{default}", str(f.default))
            group.add_argument(f"--{f.name}", *f.metadata["aliases"], dest=f.name, help=help_text,
                               **f.metadata["argparse"])
    return p


def _read_json(flag: str, path: str, wanted: str, example: str = "") -> Any:
    """The content of the JSON file that `flag` names; a missing or malformed file is a ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"{flag} {path}: no such file; pass {wanted}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag} {path}: not valid JSON ({e}){example}") from e


def _read_config_file(path: str) -> dict:
    values = _read_json("--config", path, "a JSON file of flag values", '; write it as {"epochs": 10, ...}')
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of flag values")
    unknown = sorted(set(values) - set(SETTINGS))
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


def _coerce(values: dict) -> dict:
    """Bring flag and JSON values to the fields' types: lists (or one JSON string) to tuples."""
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
    if "num_workers" not in values:
        values["num_workers"] = default_num_workers(_spawned_processes(values))
    cfg = Config.from_dict(values)
    cfg.check()
    if cfg.checkpoints.checkpoint is not None or cfg.checkpoints.resume is not None:
        # Here: models.py imports this module, and only runs that start from a checkpoint need it (and torch).
        from .models import checkpoint_model
        model = checkpoint_model(cfg.model, cfg.checkpoints, cfg.run.run_dir, given="model_name" in values)
        cfg = dataclasses.replace(cfg, model=model)
    if cfg.model.from_json and cfg.model.model_cfg is None:  # kept in the configuration: the file may move
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                 model_cfg=read_model_json(cfg.model.model_name)))
    if not cfg.run.name:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=_default_name(cfg.model)))
    return cfg


def _default_name(model: ModelConfig) -> str:
    """A run's name when --name is not given: the time and the model (a JSON's file name)."""
    spelled = Path(model.model_name).stem if model.from_json else model.model_name.replace("/", "-")
    return f"{time.strftime('%Y_%m_%d-%H_%M_%S')}-{spelled}"


def _spawned_processes(values: dict) -> Optional[int]:
    """How many processes --distributed starts on this node (one per GPU), or None without it."""
    if not values.get("distributed"):
        return None
    if values.get("device_ids"):
        return len(values["device_ids"])
    import torch  # here: only --distributed needs the GPU count, and the configuration loads without torch

    return torch.cuda.device_count()


def read_model_json(path: str) -> dict:
    """The content of a --model_name JSON file: an open_clip model config (embed_dim, vision_cfg, text_cfg)."""
    content = _read_json("--model_name", path, "an open_clip model JSON or a model name")
    if not isinstance(content, dict) or not all(key in content for key in MODEL_JSON_KEYS):
        raise ConfigError(f"--model_name {path}: not an open_clip model config (it needs "
                          f"{', '.join(MODEL_JSON_KEYS)}, as in open_clip's model_configs/)")
    return content


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
