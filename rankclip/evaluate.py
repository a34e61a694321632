"""Evaluation, each epoch and in evaluation-only runs: validation loss with representation
analysis, zero-shot classification, linear probes and image-text retrieval.

Every process takes part: each encodes its contiguous block of every set's images (its loaders
hold only that block, `collectives.rank_block`) and of the prompts and captions, and the
features are gathered in rank order, so every process holds the same features as a
one-process evaluation (to float rounding) and computes the same metrics from them; only the
main process's logger writes them. Everything runs under no_grad (and autocast on CUDA);
features are computed in batches once per set and pass, and each zero-shot text classifier is
built once per evaluation. Every result becomes one results.jsonl record.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Optional, Sequence

import torch
from tqdm import tqdm

from .collectives import gather_rows, rank_and_world, rank_block
from .config import CsvLayout, EvaluationConfig
from .errors import DataError
from .eval_data import build_labeled_loader, images_in_share, load_eval_set, load_retrieval_set
from .linear_probe import probe_accuracy, train_linear_probe
from .logger import RunLogger, log
from .metrics import representation_metrics, retrieval_recall, topk_correct
from .precision import autocast
from .runtime import Runtime

TOP_K = (1, 3, 5, 10)
TEXT_BATCH = 256
EVAL_BATCH_SIZE = 256  # images per batch of every evaluation loader
# The validation loss is a mean over batches of about this many samples, whatever --batch_size
# and the number of processes: the contrastive and rank losses grow with the batch (a batch of
# one has loss 0), so a loss over batches that vary in size would not compare across runs.
VALIDATION_LOSS_BATCH = 256


@dataclass
class ZeroShotTask:
    """One zero-shot classification set: its name, images with labels, class names and templates."""

    name: str
    loader: torch.utils.data.DataLoader  # batches (images, labels, number unreadable)
    classes: Sequence[str]
    templates: Sequence[Callable[[str], str]]


@dataclass
class LinearProbeTask:
    """A logistic-regression probe fit on frozen features of `train_loader`, scored on `test_loader`."""

    name: str
    train_loader: torch.utils.data.DataLoader
    test_loader: torch.utils.data.DataLoader
    num_classes: int
    batch_size: int
    epochs: int
    seed: int
    split: Optional[str] = None  # how the test images were held out, where this project drew them


@dataclass
class RetrievalTask:
    """Images (labelled by their own index) and captions; caption t describes image caption_image[t]."""

    name: str
    image_loader: torch.utils.data.DataLoader
    captions: Sequence[str]
    caption_image: torch.Tensor  # [T] long


@dataclass(frozen=True)
class EvalTasks:
    """The sets one evaluation covers, besides validation: zero-shot, linear probe, retrieval."""

    zero_shot: Sequence[ZeroShotTask] = ()
    probes: Sequence[LinearProbeTask] = ()
    retrieval: Sequence[RetrievalTask] = ()


def build_eval_tasks(evaluation: EvaluationConfig, runtime: Runtime, transform: Callable, *, layout: CsvLayout,
                     num_workers: int, seed: int) -> EvalTasks:
    """The --eval_* sets (zero-shot, or linear probes with --linear_probe) and the --retrieval_data sets
    (CSVs read with the run's CSV `layout`, or clip_benchmark folders), each loader holding this process's
    block of its images."""
    loader = partial(build_labeled_loader, runtime=runtime, batch_size=EVAL_BATCH_SIZE, num_workers=num_workers)
    zero_shot, probes = [], []
    for name, test_dir, train_dir in evaluation.sets():
        test = load_eval_set(name, test_dir, transform)
        if test.split:
            log.info(f"{name}: {test.split}")
        if evaluation.linear_probe:
            train = load_eval_set(name, train_dir, transform, train=True)
            num_classes = max(train.num_classes, test.num_classes)
            probes.append(LinearProbeTask(name, loader(train.dataset), loader(test.dataset), num_classes,
                                          evaluation.linear_probe_batch_size, evaluation.linear_probe_num_epochs,
                                          seed, test.split))
        else:
            zero_shot.append(ZeroShotTask(name, loader(test.dataset), *test.require_prompts()))
    retrieval = []
    for path, name in zip(evaluation.retrieval_data or (), evaluation.retrieval_names):
        data = load_retrieval_set(path, layout, transform, name)
        retrieval.append(RetrievalTask(data.name, loader(data.images), data.captions, data.caption_image))
    return EvalTasks(zero_shot, probes, retrieval)


@torch.no_grad()
def zero_shot_classifier(model: torch.nn.Module, tokenizer: Callable, classes: Sequence[str],
                         templates: Sequence[Callable[[str], str]], device: torch.device) -> torch.Tensor:
    """Class weights [d, C]: per class, the mean of its normalized template embeddings, renormalized."""
    prompts = [template(name) for name in classes for template in templates]
    per_class = encode_texts(model, tokenizer, prompts, device).view(len(classes), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(per_class, dim=-1).T


@torch.no_grad()
def encode_texts(model: torch.nn.Module, tokenizer: Callable, texts: Sequence[str],
                 device: torch.device) -> torch.Tensor:
    """Normalized fp32 text features [len(texts), d], TEXT_BATCH texts at a time; each process
    encodes its block of `texts` and every process gets all features (all processes must call)."""
    block = rank_block(len(texts), *rank_and_world())
    mine = texts[block.start:block.stop]
    features = [model.encode_text(tokenizer(mine[i:i + TEXT_BATCH]).to(device), normalize=True).float()
                for i in range(0, len(mine), TEXT_BATCH)]
    return gather_rows(features, device)


def progress(loader: torch.utils.data.DataLoader, desc: str, show: bool) -> Iterator:
    """The loader's batches, with a progress bar counted in this process's images (so it shows images/s)
    when `show` (the main process: one bar, not one per rank)."""
    with tqdm(total=images_in_share(loader), desc=desc, unit="img", leave=False, disable=not show) as bar:
        for batch in loader:
            yield batch
            images, _, unreadable = batch
            bar.update(len(images) + unreadable)


def validation_losses(loss_fn: torch.nn.Module, image_features: torch.Tensor, text_features: torch.Tensor,
                      logits: dict[str, torch.Tensor], rank_weight: float) -> tuple[dict[str, float], int]:
    """Loss parts averaged over samples, the samples cut in order into ceil(N / VALIDATION_LOSS_BATCH)
    batches whose sizes differ by at most one; returns them and the largest batch size. `logits`: the
    model's logit_scale (and a SigLIP model's logit_bias), as `model_logits` gives them."""
    count = len(image_features)
    batches = -(-count // VALIDATION_LOSS_BATCH)
    totals: dict[str, torch.Tensor] = {}
    for images, texts in zip(image_features.tensor_split(batches), text_features.tensor_split(batches)):
        losses = loss_fn(images, texts, **logits, rank_weight=rank_weight)
        for key, value in losses.items():
            totals[key] = totals.get(key, 0.0) + value.double() * len(images)
    keys = list(totals)
    values = torch.stack([totals[k] for k in keys]).div_(count).tolist()
    return dict(zip(keys, values)), -(-count // batches)


def model_logits(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The logit_scale the model's forward returns (exp of the parameter) and, for a SigLIP model, its
    logit_bias: the loss's arguments besides the features, read from the model itself so that a rank
    without validation rows has them too."""
    logits = {"logit_scale": model.logit_scale.exp().float()}
    if getattr(model, "logit_bias", None) is not None:
        logits["logit_bias"] = model.logit_bias.float()
    return logits


def due(frequency: int, epoch: int, last: bool) -> bool:
    """open_clip_train's rule for --zeroshot_frequency and --val_frequency: evaluate after epochs divisible
    by `frequency` (epoch 0, before training, too) and after the `last` one; 0 = never."""
    return frequency > 0 and (epoch % frequency == 0 or last)


class Evaluator:
    """Runs the configured evaluations, shared by all processes, and records them in results.jsonl.

    `evaluation` gives the frequencies: --val_frequency for validation and retrieval (open_clip_train's
    validation pass, which also measures retrieval), --zeroshot_frequency for the --eval_data_type sets,
    zero-shot or linear probe."""

    def __init__(self, tasks: EvalTasks, runtime: Runtime, *, validation_loader: Optional[torch.utils.data.DataLoader],
                 loss_fn: torch.nn.Module, tokenizer: Callable, logger: RunLogger, precision: str,
                 evaluation: EvaluationConfig = EvaluationConfig()) -> None:
        self.device, self.autocast = runtime.device, partial(autocast, runtime.device, precision)
        self.show_progress = runtime.is_main
        self.loss_fn, self.validation_loader, self.tokenizer, self.logger = loss_fn, validation_loader, tokenizer, logger
        self.zero_shot_tasks, self.probes, self.retrievals = tasks.zero_shot, tasks.probes, tasks.retrieval
        self.val_frequency, self.zeroshot_frequency = evaluation.val_frequency, evaluation.zeroshot_frequency

    def due(self, epoch: int, last: bool) -> bool:
        """Whether the evaluation after `epoch` records anything (`last`: see run)."""
        return any(True for _ in self.tasks(None, 0.0, epoch, last))

    def tasks(self, model: Optional[torch.nn.Module], rank_weight: float, epoch: int,
              last: bool) -> Iterator[tuple[str, Callable[[], dict]]]:
        """(split, the task's metrics when called) of each evaluation due after `epoch`, in order."""
        validate, sets = due(self.val_frequency, epoch, last), due(self.zeroshot_frequency, epoch, last)
        if self.validation_loader is not None and validate:
            yield "validation", partial(self.validation, model, rank_weight)
        for task in self.zero_shot_tasks if sets else ():
            yield "eval", partial(self.zero_shot, model, task)
        for task in self.probes if sets else ():
            yield "eval", partial(self.linear_probe, model, task)
        for task in self.retrievals if validate else ():
            yield "retrieval", partial(self.retrieval, model, task)

    def run(self, model: torch.nn.Module, epoch: int, rank_weight: float, last: bool = True,
            between: Optional[Callable[[], None]] = None) -> dict[str, float]:
        """Evaluate `model` (unwrapped; every process calls this) after `epoch`, what the frequencies make due
        (`last`: the run's last epoch, or an evaluation-only run); returns every number recorded, by its
        full name ("validation/contrastive_loss", "eval/ImageNet1K/zeroshot_top1"); {} on other ranks
        (their logger records nothing) and where nothing was due. `between` runs before each task, on every
        rank: a training run's stop check, which ends a long evaluation by raising."""
        was_training = model.training
        model.eval()
        recorded: dict[str, float] = {}
        try:
            for split, task in self.tasks(model, rank_weight, epoch, last):
                if between is not None:
                    between()
                recorded |= self.logger.results(epoch, split, task())
        finally:
            model.train(was_training)
        return recorded

    @torch.no_grad()
    def validation(self, model: torch.nn.Module, rank_weight: float) -> dict:
        """Loss parts (`validation_losses`) and the representation analysis of all readable validation
        pairs; unreadable rows are skipped, counted (`skipped_samples`) and reported."""
        image_parts, text_parts, failed = [], [], []
        for batch in tqdm(self.validation_loader, desc="validation", leave=False, disable=not self.show_progress):
            failed += batch["failed"]
            if "image" not in batch:
                continue
            with self.autocast():
                image_features, text_features, *_ = model(batch["image"].to(self.device),
                                                          batch["text"].to(self.device))
            image_parts.append(image_features.float())
            text_parts.append(text_features.float())
        images, texts = (gather_rows(parts, self.device) for parts in (image_parts, text_parts))
        skipped = int(gather_rows([torch.tensor([len(failed)], device=self.device)], self.device).sum())
        if failed:
            log.warning(f"validation: skipped {len(failed)} unreadable images, e.g. {failed[0]}")
        count = len(images)
        if count < 2:
            raise DataError(f"validation: {count} readable image-caption pairs ({skipped} unreadable); the "
                              f"validation loss needs at least 2: fix the images or the --validation_data CSV")
        losses, batch_size = validation_losses(self.loss_fn, images, texts, model_logits(model), rank_weight)
        analysis = representation_metrics(images, texts) if count >= 3 else {}
        return losses | analysis | {"num_samples": count, "skipped_samples": skipped, "loss_batch_size": batch_size}

    @torch.no_grad()
    def image_features(self, model: torch.nn.Module, loader: torch.utils.data.DataLoader, desc: str,
                       normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 features [N, d] (unit rows unless `normalize` is False) and labels [N] of a labelled
        loader's readable images, gathered from every process's block."""
        if rank_and_world()[1] > 1:
            log.info(f"{desc}: {images_in_share(loader)} of {len(loader.dataset)} images encoded by this process")
        features, labels, unreadable = [], [], 0
        for images, batch_labels, bad in progress(loader, desc, self.show_progress):
            unreadable += bad
            if batch_labels.numel() == 0:
                continue
            with self.autocast():
                features.append(model.encode_image(images.to(self.device, non_blocking=True), normalize=normalize).float())
            labels.append(batch_labels.to(self.device))
        if unreadable:
            log.warning(f"{desc}: skipped {unreadable} unreadable images")
        features = gather_rows(features, self.device)
        labels = gather_rows(labels, self.device, torch.long)
        if not len(features):
            raise DataError(f"{desc}: none of the images can be read; check the folder")
        return features, labels

    @torch.no_grad()
    def zero_shot(self, model: torch.nn.Module, task: ZeroShotTask) -> dict:
        with self.autocast():
            classifier = zero_shot_classifier(model, self.tokenizer, task.classes, task.templates, self.device)
        features, labels = self.image_features(model, task.loader, f"zero-shot {task.name}")
        correct = topk_correct(features @ classifier, labels, TOP_K)
        metrics = {f"zeroshot_top{k}": correct[k] / len(labels) for k in TOP_K}
        return metrics | {"num_classes": len(task.classes), "num_samples": len(labels), "eval_data_type": task.name}

    def linear_probe(self, model: torch.nn.Module, task: LinearProbeTask) -> dict:
        """The original code's protocol: a probe on the raw (unnormalized) image embeddings, which its
        learning rate was chosen for."""
        train_features, train_labels = self.image_features(model, task.train_loader, f"probe {task.name} train",
                                                           normalize=False)
        test_features, test_labels = self.image_features(model, task.test_loader, f"probe {task.name} test",
                                                         normalize=False)
        probe = train_linear_probe(train_features, train_labels, task.num_classes, batch_size=task.batch_size,
                                   epochs=task.epochs, seed=task.seed, device=self.device)
        metrics = probe_accuracy(probe, test_features, test_labels, TOP_K)
        split = {"eval_split": task.split} if task.split else {}
        return metrics | split | {"num_classes": task.num_classes, "num_samples": len(test_labels),
                                  "num_train_samples": len(train_labels), "eval_data_type": task.name}

    @torch.no_grad()
    def retrieval(self, model: torch.nn.Module, task: RetrievalTask) -> dict:
        image_features, image_ids = self.image_features(model, task.image_loader, f"retrieval {task.name}")
        # Captions of unreadable images have nothing to retrieve: drop them, renumber the rest.
        position = torch.full((len(task.image_loader.dataset),), -1, dtype=torch.long)  # the whole set's images
        position[image_ids.cpu()] = torch.arange(len(image_ids))
        caption_image = position[task.caption_image]
        kept = (caption_image >= 0).nonzero().flatten().tolist()
        with self.autocast():
            text_features = encode_texts(model, self.tokenizer, [task.captions[i] for i in kept], self.device)
        metrics = retrieval_recall(image_features, text_features, caption_image[kept].to(self.device))
        return metrics | {"num_images": len(image_ids), "num_captions": len(kept), "retrieval_data": task.name}
