"""Linear probe: multinomial logistic regression trained on frozen, precomputed features.

The recipe is CyCLIP's (the original code's `--linear_probe`): one nn.Linear trained with cross-entropy
by AdamW (lr 0.005, weight decay 0.01 on the weight and none on the bias, default betas), the
learning rate following a cosine from lr to 0 over all steps with no warmup, reshuffled
mini-batches every epoch. Unlike CyCLIP, the run is reproducible: initialization (nn.Linear's
default distribution) and shuffling draw from a generator seeded by `seed`, and the caller's
global RNG is left untouched, so a probe in the middle of training does not shift training's
random stream.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .metrics import topk_correct

LR = 0.005
WEIGHT_DECAY = 0.01
BATCH_SIZE = 16
EPOCHS = 32
PROBE_KS = (1, 3, 5, 10)
EVAL_CHUNK = 4096


def _check_data(features: Tensor, labels: Tensor, num_classes: int) -> None:
    if features.dim() != 2 or len(features) == 0:
        raise ValueError(f"features must be 2-D [samples, dim] with at least one row, "
                         f"got shape {tuple(features.shape)}")
    if labels.shape != (len(features),):
        raise ValueError(f"labels must have shape [{len(features)}] (one per feature row), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]: check num_classes against the label file")


def _new_probe(dim: int, num_classes: int, generator: torch.Generator) -> nn.Linear:
    """nn.Linear's default initialization, U(±1/√dim) for weight and bias, drawn from `generator`."""
    probe = nn.Linear(dim, num_classes, device="meta").to_empty(device="cpu")  # meta: no draw from the global RNG
    bound = 1 / math.sqrt(dim)
    with torch.no_grad():
        nn.init.uniform_(probe.weight, -bound, bound, generator=generator)
        nn.init.uniform_(probe.bias, -bound, bound, generator=generator)
    return probe


def train_linear_probe(features: Tensor, labels: Tensor, num_classes: int, *, batch_size: int = BATCH_SIZE,
                       epochs: int = EPOCHS, lr: float = LR, weight_decay: float = WEIGHT_DECAY, seed: int = 0,
                       device: Optional[torch.device | str] = None) -> nn.Linear:
    """A linear classifier [dim → num_classes] fit to `features` [N, dim] and `labels` [N].

    Each epoch visits every sample once in a fresh random order, in ceil(N / batch_size)
    batches (the last may be smaller). Step s of S = epochs·ceil(N / batch_size) uses the learning
    rate lr·(1 + cos(π·s/S))/2. Features are used as given (fp32); CyCLIP probes the
    unnormalized image embeddings. Runs on `device` (default: the features' device) and works
    when called under torch.no_grad(). The same inputs, seed and device give the same weights.
    """
    _check_data(features, labels, num_classes)
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch_size and epochs must be >= 1, got {batch_size} and {epochs}")
    if lr <= 0 or weight_decay < 0:
        raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {lr} and {weight_decay}")
    device = features.device if device is None else torch.device(device)
    x = features.to(device, torch.float32)  # [N, d]
    y = labels.to(device, torch.long)  # [N]
    generator = torch.Generator().manual_seed(seed)
    probe = _new_probe(x.shape[1], num_classes, generator).to(device)
    optimizer = torch.optim.AdamW([{"params": [probe.weight], "weight_decay": weight_decay},
                                   {"params": [probe.bias], "weight_decay": 0.0}], lr=lr)
    total_steps = epochs * math.ceil(len(x) / batch_size)
    step = 0
    with torch.enable_grad():
        for _ in range(epochs):
            for batch in torch.randperm(len(x), generator=generator).to(device).split(batch_size):
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
                loss = F.cross_entropy(probe(x[batch]), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
    return probe.eval().requires_grad_(False)


@torch.no_grad()
def probe_accuracy(probe: nn.Linear, features: Tensor, labels: Tensor,
                   ks: Sequence[int] = PROBE_KS) -> dict[str, float]:
    """Accuracy of `probe` on `features` [N, dim] with `labels` [N], two ways.

    linear_probe_top{k}: the fraction of samples whose label is among the k highest logits (as in
    zero-shot evaluation, k is capped at the number of classes, so top-k with k ≥ C is 1); the
    original code's metric. linear_probe_mean_per_class_top1: top-1 accuracy within each class, averaged over
    the classes that have test samples; the metric CLIP and CyCLIP report for Caltech101,
    FGVCAircraft, Flowers102 and OxfordIIITPet, whose test sets are unbalanced. Evaluated on the
    probe's device in chunks of EVAL_CHUNK rows.
    """
    _check_data(features, labels, probe.out_features)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty list of positive integers, got {list(ks)}")
    device = probe.weight.device
    correct = dict.fromkeys(ks, 0)
    per_class_hits = torch.zeros(probe.out_features, dtype=torch.long, device=device)
    per_class_count = torch.zeros(probe.out_features, dtype=torch.long, device=device)
    for start in range(0, len(features), EVAL_CHUNK):
        logits = probe(features[start:start + EVAL_CHUNK].to(device, torch.float32))  # [c, C]
        chunk_labels = labels[start:start + EVAL_CHUNK].to(device)
        for k, hits in topk_correct(logits, chunk_labels, ks).items():
            correct[k] += hits
        per_class_count += torch.bincount(chunk_labels, minlength=probe.out_features)
        per_class_hits += torch.bincount(chunk_labels[logits.argmax(dim=1) == chunk_labels],
                                         minlength=probe.out_features)
    present = per_class_count > 0
    mean_per_class = (per_class_hits[present] / per_class_count[present]).mean().item()
    return {f"linear_probe_top{k}": correct[k] / len(features) for k in ks} | {
        "linear_probe_mean_per_class_top1": mean_per_class}
