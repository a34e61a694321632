"""Evaluation: validation loss and zero-shot classification, each epoch and for evaluation-only runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from tqdm import tqdm

from .logger import RunLogger, log

TOP_K = (1, 3, 5, 10)
TEXT_BATCH = 256


@dataclass
class ZeroShotTask:
    """One zero-shot classification set: its name, images with labels, class names and templates."""

    name: str
    loader: torch.utils.data.DataLoader
    classes: Sequence[str]
    templates: Sequence[Callable[[str], str]]


@torch.no_grad()
def zero_shot_classifier(model: torch.nn.Module, tokenizer: Callable, classes: Sequence[str],
                         templates: Sequence[Callable[[str], str]], device: torch.device) -> torch.Tensor:
    """Class weights [d, C]: per class, the mean of its normalized template embeddings, renormalized."""
    prompts = [template(name) for name in classes for template in templates]
    embeddings = []
    for start in range(0, len(prompts), TEXT_BATCH):
        tokens = tokenizer(prompts[start:start + TEXT_BATCH]).to(device)
        embeddings.append(model.encode_text(tokens, normalize=True).float())
    per_class = torch.cat(embeddings).view(len(classes), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(per_class, dim=-1).T


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]) -> dict[int, int]:
    """How many rows have their label among the k highest logits, for each k (capped at C)."""
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


class Evaluator:
    """Runs the configured evaluations on the main process and records them in results.jsonl."""

    def __init__(self, *, device: torch.device, autocast: Callable, loss_fn: torch.nn.Module,
                 validation_loader: Optional[torch.utils.data.DataLoader], tasks: Sequence[ZeroShotTask],
                 tokenizer: Callable, logger: RunLogger, enabled: bool = True) -> None:
        self.device, self.autocast, self.loss_fn = device, autocast, loss_fn
        self.validation_loader, self.tasks, self.tokenizer = validation_loader, tasks, tokenizer
        self.logger, self.enabled = logger, enabled

    def run(self, model: torch.nn.Module, epoch: int, rank_weight: float) -> Optional[float]:
        """Evaluate `model` (unwrapped); returns the validation loss, or None without validation data."""
        if not self.enabled:
            return None
        was_training = model.training
        model.eval()
        validation_loss = None
        if self.validation_loader is not None:
            metrics = self.validation(model, rank_weight)
            self.logger.results(epoch, "validation", metrics)
            validation_loss = metrics["loss"]
        for task in self.tasks:
            self.logger.results(epoch, "eval", self.zero_shot(model, task))
        model.train(was_training)
        return validation_loss

    @torch.no_grad()
    def validation(self, model: torch.nn.Module, rank_weight: float) -> dict:
        """Loss parts averaged over samples (each batch's loss is a per-batch mean, weighted by size)."""
        totals: dict[str, float] = {}
        count = 0
        for batch in tqdm(self.validation_loader, desc="validation", leave=False):
            with self.autocast():
                image_features, text_features, logit_scale = model(batch["image"].to(self.device),
                                                                   batch["text"].to(self.device))
            losses = self.loss_fn(image_features.float(), text_features.float(), logit_scale.float(),
                                  rank_weight=rank_weight)
            n = batch["image"].shape[0]
            count += n
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + value.item() * n
        return {k: v / count for k, v in totals.items()} | {"num_samples": count}

    @torch.no_grad()
    def zero_shot(self, model: torch.nn.Module, task: ZeroShotTask) -> dict:
        with self.autocast():
            classifier = zero_shot_classifier(model, self.tokenizer, task.classes, task.templates, self.device)
        correct = dict.fromkeys(TOP_K, 0)
        total = unreadable = 0
        for images, labels, bad in tqdm(task.loader, desc=f"zero-shot {task.name}", leave=False):
            unreadable += bad
            if labels.numel() == 0:
                continue
            with self.autocast():
                features = model.encode_image(images.to(self.device), normalize=True).float()
            for k, c in topk_correct(features @ classifier, labels.to(self.device), TOP_K).items():
                correct[k] += c
            total += labels.numel()
        if unreadable:
            log.warning(f"zero-shot {task.name}: skipped {unreadable} unreadable images")
        metrics = {f"zeroshot_top{k}": correct[k] / max(total, 1) for k in TOP_K}
        return metrics | {"num_classes": len(task.classes), "num_samples": total, "eval_data_type": task.name}
