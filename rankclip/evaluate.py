"""Evaluation, each epoch and in evaluation-only runs: validation loss with representation
analysis, zero-shot classification, linear probes and image-text retrieval.

Everything runs on the main process under no_grad (and autocast on CUDA); features are
computed in batches once per set and pass, and each zero-shot text classifier is built once
per evaluation. Every result becomes one results.jsonl record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from tqdm import tqdm

from .config import ConfigError
from .linear_probe import probe_accuracy, train_linear_probe
from .logger import RunLogger, log
from .metrics import representation_metrics, retrieval_recall, topk_correct

TOP_K = (1, 3, 5, 10)
TEXT_BATCH = 256


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
    """Normalized fp32 text features [len(texts), d], TEXT_BATCH texts at a time."""
    features = [model.encode_text(tokenizer(texts[i:i + TEXT_BATCH]).to(device), normalize=True).float()
                for i in range(0, len(texts), TEXT_BATCH)]
    return torch.cat(features)


def progress(loader: torch.utils.data.DataLoader, desc: str) -> Iterator:
    """The loader's batches, with a progress bar counted in images (so it shows images/s)."""
    with tqdm(total=len(loader.dataset), desc=desc, unit="img", leave=False) as bar:
        for batch in loader:
            yield batch
            images, _, unreadable = batch
            bar.update(len(images) + unreadable)


class Evaluator:
    """Runs the configured evaluations on the main process and records them in results.jsonl."""

    def __init__(self, *, device: torch.device, autocast: Callable, loss_fn: torch.nn.Module,
                 validation_loader: Optional[torch.utils.data.DataLoader], tokenizer: Callable, logger: RunLogger,
                 zero_shot: Sequence[ZeroShotTask] = (), probes: Sequence[LinearProbeTask] = (),
                 retrieval: Sequence[RetrievalTask] = (), enabled: bool = True) -> None:
        self.device, self.autocast, self.loss_fn = device, autocast, loss_fn
        self.validation_loader, self.tokenizer, self.logger = validation_loader, tokenizer, logger
        self.zero_shot_tasks, self.probes, self.retrievals = zero_shot, probes, retrieval
        self.enabled = enabled

    def run(self, model: torch.nn.Module, epoch: int, rank_weight: float) -> dict[str, float]:
        """Evaluate `model` (unwrapped); returns every number recorded, by its full name
        ("validation/contrastive_loss", "eval/ImageNet1K/zeroshot_top1"); {} on other ranks."""
        if not self.enabled:
            return {}
        was_training = model.training
        model.eval()
        recorded: dict[str, float] = {}
        if self.validation_loader is not None:
            recorded |= self.logger.results(epoch, "validation", self.validation(model, rank_weight))
        for task in self.zero_shot_tasks:
            recorded |= self.logger.results(epoch, "eval", self.zero_shot(model, task))
        for task in self.probes:
            recorded |= self.logger.results(epoch, "eval", self.linear_probe(model, task))
        for task in self.retrievals:
            recorded |= self.logger.results(epoch, "retrieval", self.retrieval(model, task))
        model.train(was_training)
        return recorded

    @torch.no_grad()
    def validation(self, model: torch.nn.Module, rank_weight: float) -> dict:
        """Loss parts averaged over samples (each batch's loss is a per-batch mean, weighted by size),
        and the representation analysis of all validation features together."""
        totals: dict[str, float] = {}
        image_parts, text_parts = [], []
        for batch in tqdm(self.validation_loader, desc="validation", leave=False):
            with self.autocast():
                image_features, text_features, logit_scale = model(batch["image"].to(self.device),
                                                                   batch["text"].to(self.device))
            image_features, text_features = image_features.float(), text_features.float()
            losses = self.loss_fn(image_features, text_features, logit_scale.float(), rank_weight=rank_weight)
            n = batch["image"].shape[0]
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + value.item() * n
            image_parts.append(image_features)
            text_parts.append(text_features)
        count = sum(len(part) for part in image_parts)
        analysis = representation_metrics(torch.cat(image_parts), torch.cat(text_parts)) if count >= 3 else {}
        return {k: v / count for k, v in totals.items()} | analysis | {"num_samples": count}

    @torch.no_grad()
    def image_features(self, model: torch.nn.Module, loader: torch.utils.data.DataLoader, desc: str,
                       normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 features [N, d] (unit rows unless `normalize` is False) and labels [N] of a labelled
        loader's readable images."""
        features, labels, unreadable = [], [], 0
        for images, batch_labels, bad in progress(loader, desc):
            unreadable += bad
            if batch_labels.numel() == 0:
                continue
            with self.autocast():
                features.append(model.encode_image(images.to(self.device, non_blocking=True), normalize=normalize).float())
            labels.append(batch_labels.to(self.device))
        if unreadable:
            log.warning(f"{desc}: skipped {unreadable} unreadable images")
        if not features:
            raise ConfigError(f"{desc}: none of the images can be read; check the folder")
        return torch.cat(features), torch.cat(labels)

    @torch.no_grad()
    def zero_shot(self, model: torch.nn.Module, task: ZeroShotTask) -> dict:
        with self.autocast():
            classifier = zero_shot_classifier(model, self.tokenizer, task.classes, task.templates, self.device)
        features, labels = self.image_features(model, task.loader, f"zero-shot {task.name}")
        correct = topk_correct(features @ classifier, labels, TOP_K)
        metrics = {f"zeroshot_top{k}": correct[k] / len(labels) for k in TOP_K}
        return metrics | {"num_classes": len(task.classes), "num_samples": len(labels), "eval_data_type": task.name}

    def linear_probe(self, model: torch.nn.Module, task: LinearProbeTask) -> dict:
        """The seed's protocol: a probe on the raw (unnormalized) image embeddings, which its
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
        position = torch.full((len(task.image_loader.dataset),), -1, dtype=torch.long)
        position[image_ids.cpu()] = torch.arange(len(image_ids))
        caption_image = position[task.caption_image]
        kept = (caption_image >= 0).nonzero().flatten().tolist()
        with self.autocast():
            text_features = encode_texts(model, self.tokenizer, [task.captions[i] for i in kept], self.device)
        metrics = retrieval_recall(image_features, text_features, caption_image[kept].to(self.device))
        return metrics | {"num_images": len(image_ids), "num_captions": len(kept), "retrieval_data": task.name}
