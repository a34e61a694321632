"""Gradient caching: one optimizer step over K micro-batches with the memory of one.

A contrastive or ranking loss couples every sample of the batch with every other, so the
usual "sum the micro-batch losses" accumulation computes a different objective. Gradient
caching computes the same one (Gao et al., 2021; open_clip's --accum-freq):

1. forward every micro-batch without a graph and keep only the features;
2. evaluate the loss on all features at once, as leaf tensors, and backpropagate to them:
   dL/dfeatures for the whole step (a few MB: rows x embed_dim);
3. forward each micro-batch again, with a graph, and backpropagate its cached feature
   gradients: sum(features · dL/dfeatures) has exactly those gradients, so the parameter
   gradients add up to dL/dθ of the full step.

Step 3 must reproduce step 1's features, so each micro-batch's re-forward replays the RNG
state of its first forward (dropout, patch dropout) and step 1 leaves the model's buffers
(BatchNorm running statistics) as it found them: they are updated once, by step 3.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

Features = dict[str, torch.Tensor]
# What the model returns once per batch rather than per sample: the same in every micro-batch.
SHARED = ("logit_scale", "logit_bias")


def _rng_state(device: torch.device) -> tuple:
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda_state


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _no_sync(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """DDP's no_sync (skip the gradient all-reduce) when the model has one."""
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


def cached_gradient_step(model: torch.nn.Module, batches: list[dict], encode: Callable[[dict], Features],
                         loss_fn: Callable[..., dict[str, torch.Tensor]], backward: Callable[[torch.Tensor], None],
                         device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Accumulate into `.grad` the gradient of `loss_fn` over all of `batches` together.

    `encode(batch)` runs the (possibly DDP-wrapped) `model` and returns fp32 features plus
    `logit_scale` (and a SigLIP model's `logit_bias`); `loss_fn(**features)` returns a dict with "loss";
    `backward(tensor)` runs backward (through the AMP scaler when there is one). Under DDP only the last re-forward
    all-reduces gradients. Returns the detached loss parts and the logit scale.
    """
    buffers = [b.detach().clone() for b in model.buffers()]
    states, cached = [], []
    with torch.no_grad():
        for batch in batches:
            states.append(_rng_state(device))
            cached.append(encode(batch))
        for saved, buffer in zip(buffers, model.buffers()):
            buffer.copy_(saved)

    keys = [k for k in cached[0] if k not in SHARED]
    sizes = [c[keys[0]].shape[0] for c in cached]
    leaves = {k: torch.cat([c[k] for c in cached]).requires_grad_() for k in keys}
    shared = {k: cached[0][k].detach().requires_grad_() for k in SHARED if k in cached[0]}
    losses = loss_fn(**leaves, **shared)
    losses["loss"].backward()  # gradients of the features only: they are leaves
    feature_grads = {k: leaves[k].grad.split(sizes) for k in keys}

    for j, batch in enumerate(batches):
        _set_rng_state(states[j], device)
        last = j == len(batches) - 1
        with contextlib.nullcontext() if last else _no_sync(model):
            features = encode(batch)
            surrogate = sum((features[k] * feature_grads[k][j]).sum() for k in keys)
            # The logit scale (and bias) are shared by all micro-batches: count their gradient once, in
            # the last backward, whose all-reduce under DDP expects a gradient for every parameter.
            if last:
                surrogate = surrogate + sum((features[k] * leaf.grad).sum() for k, leaf in shared.items())
            if surrogate.requires_grad:  # not when both towers are locked: then only the logit scale trains
                backward(surrogate)
    return {k: v.detach() for k, v in losses.items()}, shared["logit_scale"].detach()
