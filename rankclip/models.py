"""Model, tokenizer and image transforms, all from open_clip's model zoo.

The original code's names (RN50, RN101, RN50x4, ViT-B/32) map to open_clip's `-quickgelu` twins, the
architectures whose state dicts match OpenAI's and RankCLIP's released checkpoints. The JSON
files in configs/ (tiny-vit, tiny-rn) are registered as extra open_clip models.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import open_clip
import torch
from huggingface_hub import constants as hub_constants

from .config import REPO_ROOT, ModelConfig
from .errors import ConfigError
from .weights import load_model_weights

ORIGINAL_MODEL_NAMES = {
    "RN50": "RN50-quickgelu",
    "RN101": "RN101-quickgelu",
    "RN50x4": "RN50x4-quickgelu",
    "ViT-B/32": "ViT-B-32-quickgelu",
}
OPENAI_WEIGHTS = "openai"

open_clip.add_model_config(REPO_ROOT / "configs")


@dataclass
class ModelBundle:
    """A built model with what goes with it: its transforms, tokenizer, open_clip name and input size."""

    model: torch.nn.Module
    train_transform: Callable
    val_transform: Callable
    tokenizer: Callable
    open_clip_name: str
    image_size: int  # the side the transforms resize images to


def resolve_model_name(name: str) -> str:
    """Original code's name, open_clip name ('ViT-B/16' spelled with a slash too) or configs/ JSON -> open_clip name."""
    if name in ORIGINAL_MODEL_NAMES:
        return ORIGINAL_MODEL_NAMES[name]
    known = open_clip.list_models()
    candidate = name.replace("/", "-")
    if candidate in known:
        return candidate
    close = difflib.get_close_matches(candidate, known + list(ORIGINAL_MODEL_NAMES), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "see open_clip.list_models()"
    raise ConfigError(f"--model_name {name}: unknown model; {hint} (or one of {', '.join(ORIGINAL_MODEL_NAMES)}, tiny-vit, tiny-rn)")


def build_model(model: ModelConfig, device: torch.device = torch.device("cpu"),
                init: Optional[dict[str, float]] = None) -> ModelBundle:
    """Create the --model_name model with fp32 weights (autocast handles mixed precision) on `device`,
    from --pretrained weights when given.

    `init`: open_clip.create_model's keyword arguments that the objective needs (losses.model_init:
    SigLIP's logit scale and bias). Weights that have no logit bias give it 0, as open_clip's
    load_checkpoint does when a CLIP model is loaded for SigLIP training.

    --grad_checkpointing recomputes the transformers' block activations during backward
    (open_clip supports it in ViT towers and the text tower; ResNet towers run as usual).
    """
    open_clip_name = resolve_model_name(model.model_name)
    pretrained = model.pretrained
    openai = pretrained == OPENAI_WEIGHTS
    if openai:
        network, train_transform, val_transform = _with_openai_weights(open_clip_name, device, init or {})
    else:
        if pretrained:
            _check_weights_file(pretrained)
        network, train_transform, val_transform = open_clip.create_model_and_transforms(open_clip_name, device=device,
                                                                                        **(init or {}))
        if pretrained:  # a local file: imported strictly into the architecture
            load_model_weights(network, pretrained)
    network.set_grad_checkpointing(model.grad_checkpointing)
    tokenizer = open_clip.get_tokenizer(open_clip_name)
    size = open_clip.get_model_config(open_clip_name)["vision_cfg"]["image_size"]
    image_size = max(size) if isinstance(size, (list, tuple)) else int(size)
    return ModelBundle(network, train_transform, val_transform, tokenizer, open_clip_name, image_size)


def _with_openai_weights(open_clip_name: str, device: torch.device, init: dict[str, float]) -> tuple:
    """open_clip's model with OpenAI's weights: from the local cache first, then by download."""
    if OPENAI_WEIGHTS not in open_clip.list_pretrained_tags_by_model(open_clip_name):
        raise ConfigError(f"--pretrained: OpenAI released no weights for {open_clip_name}; "
                          f"pass --pretrained PATH to a weights file")
    create = partial(open_clip.create_model_and_transforms, open_clip_name, pretrained=OPENAI_WEIGHTS, device=device,
                     **init)
    offline = hub_constants.HF_HUB_OFFLINE
    try:
        hub_constants.HF_HUB_OFFLINE = True  # no network round trips when the weights are cached
        return create()
    except Exception:  # not cached: fall through to a download
        pass
    finally:
        hub_constants.HF_HUB_OFFLINE = offline
    if offline:
        error: Exception = RuntimeError("HF_HUB_OFFLINE is set")
    else:
        try:
            return create()
        except Exception as e:  # open_clip raises many kinds when a download is impossible
            error = e
    raise ConfigError(
        f"--pretrained: OpenAI weights for {open_clip_name} are not in open_clip's cache and cannot be "
        f"downloaded here ({type(error).__name__}); download them where there is network and pass "
        f"--pretrained PATH/TO/weights.pt") from error


def _check_weights_file(path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"--pretrained {path}: no such file; pass a weights file, or --pretrained alone for OpenAI's")
