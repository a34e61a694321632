"""AdamW with the original code's parameter groups, and optimizer states mapped onto them by parameter name.

torch's optimizer state names parameters by position (0, 1, ... over the groups in order). The
original RankCLIP and CyCLIP code registers each transformer block's modules as attn, ln_1, mlp,
ln_2, open_clip as ln_1, attn, ln_2, mlp, so the same position holds another parameter there.
A checkpoint's `state_dict` lists the parameters in the order of the model that wrote it; with
the original code's group rule that order gives every saved position its parameter name, and the state
is moved to the position that name has here.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

from .config import OptimConfig

NO_DECAY_KEYS = ("bn", "ln", "bias", "logit_scale")


def decays_weight(name: str) -> bool:
    """The original code's rule, by name only: no weight decay on names holding bn, ln, bias or logit_scale."""
    return not any(key in name for key in NO_DECAY_KEYS)


def grouped_names(names: list[str]) -> list[list[str]]:
    """Parameter names in the original code's group order: [no decay, decay], each in the given order."""
    return [[n for n in names if not decays_weight(n)], [n for n in names if decays_weight(n)]]


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW with the original code's groups (no decay, then decay), so that the original code's and CyCLIP's
    optimizer states fit these groups once their parameters are matched by name. Only parameters that
    train are in them: a locked tower's (requires_grad=False) get no optimizer state and no weight decay.

    Fused: one kernel updates every parameter (CPU and CUDA), where torch's default on the CPU is
    a Python loop over the parameters (README, Performance); on GPUs fused also beats the default
    `foreach`. Same update to float rounding; GradScaler passes its scale into the kernel.
    """
    params = dict(trainable_parameters(model))
    no_decay, decay = grouped_names(list(params))
    groups = [{"params": [params[n] for n in no_decay], "weight_decay": 0.0},
              {"params": [params[n] for n in decay], "weight_decay": optim.weight_decay}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=True)


# The group settings a run's flags set (the lr follows the schedule at every step).
FLAG_KEYS = ("weight_decay", "betas", "eps")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> list[str]:
    """The moments of `state` (an optimizer state_dict mapped onto `optimizer`'s groups) loaded into
    `optimizer`, whose group settings all stay its own: torch's load_state_dict would take weight
    decay, betas, eps, and fused from the saved groups, so a resumed run would train with the
    checkpoint's values while its flags and params.txt show others (and the original code's unfused
    states would turn the fused kernel off). Returns the flag settings that differ from the saved ones,
    as 'weight_decay 0.1 -> 0.5'.

    CPU moments are made to own their memory: the checkpoint is memory-mapped (weights.read_checkpoint),
    and torch keeps a CPU tensor of the right dtype as it is, a view of the file for the whole run."""
    groups = state["param_groups"]
    changed = [f"{key} {saved[key]} -> {mine[key]}" for key in FLAG_KEYS
               for saved, mine in zip(groups, optimizer.param_groups) if key in saved and saved[key] != mine[key]]
    if len(groups) == len(optimizer.param_groups):
        groups = [dict(mine, params=saved["params"]) for saved, mine in zip(groups, optimizer.param_groups)]
    optimizer.load_state_dict(dict(state, param_groups=groups))
    for moments in optimizer.state.values():
        for key, value in moments.items():
            if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                moments[key] = value.clone()
    return list(dict.fromkeys(changed))


def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_norm: Optional[float]) -> torch.Tensor:
    """The L2 norm of all gradients of `parameters` together (those that have one), before clipping;
    with `max_norm`, the gradients are scaled down to at most that norm (torch's clip_grad_norm_, as
    open_clip_train calls it), without it only measured (scaled by exactly 1). A device tensor: no host
    read, the caller reads it where it logs."""
    return torch.nn.utils.clip_grad_norm_(parameters, math.inf if max_norm is None else max_norm)


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def state_by_name(saved: dict, saved_order: list[str], model: torch.nn.Module) -> tuple[Optional[dict], str]:
    """`saved` (an optimizer state_dict written for a model whose parameters came in `saved_order`)
    re-indexed for `build_optimizer(model)`; (None, reason) when it does not map completely.

    `saved_order`: the writer's parameter names in its registration order, i.e. the keys of its
    checkpoint's state_dict (prefixes removed) that are trainable parameters here.
    """
    params = dict(trainable_parameters(model))
    groups = saved.get("param_groups", [])
    saved_groups = grouped_names([n for n in saved_order if n in params])
    if len(groups) != len(saved_groups) or any(len(g["params"]) != len(names)
                                               for g, names in zip(groups, saved_groups)):
        sizes = [len(g["params"]) for g in groups]
        return None, (f"its parameter groups hold {sizes} parameters, the original code's rule gives "
                      f"{[len(names) for names in saved_groups]}")
    name_of = {index: name for g, names in zip(groups, saved_groups) for index, name in zip(g["params"], names)}
    missing = sorted(set(params) - set(name_of.values()))
    if missing:
        return None, f"it has no state for {missing[:3]} ({len(missing)} parameters)"
    position = {name: i for i, name in enumerate(n for names in grouped_names(list(params)) for n in names)}
    state = {}
    for index, moments in saved.get("state", {}).items():
        name = name_of.get(index)
        if name is None:
            return None, f"its state {index} belongs to no parameter"
        for key, value in moments.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[name].shape:
                return None, f"{key} of {name} has shape {tuple(value.shape)}, the parameter {tuple(params[name].shape)}"
        state[position[name]] = moments
    mapped_groups = [dict(g, params=[position[n] for n in names])
                     for g, names in zip(groups, grouped_names(list(params)))]
    return {"state": state, "param_groups": mapped_groups}, ""
