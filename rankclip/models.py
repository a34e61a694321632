"""Model, tokenizer and image transforms, all from open_clip's model zoo.

The original code's names (RN50, RN101, RN50x4, ViT-B/32) map to open_clip's `-quickgelu` twins, the
architectures whose state dicts match OpenAI's and RankCLIP's released checkpoints. The JSON
files in configs/ (tiny-vit, tiny-rn) are registered as extra open_clip models.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable, Iterator, Optional

import huggingface_hub
import open_clip
import torch
from huggingface_hub import constants as hub_constants
from open_clip.constants import HF_CONFIG_NAME

from .config import REPO_ROOT, CheckpointsConfig, ModelConfig, read_model_json
from .errors import CheckpointError, ConfigError
from .resume import find_resume, read_resume_checkpoint
from .weights import cached_tag_weights, extract_state_dict, load_model_weights

ORIGINAL_MODEL_NAMES = {
    "RN50": "RN50-quickgelu",
    "RN101": "RN101-quickgelu",
    "RN50x4": "RN50x4-quickgelu",
    "ViT-B/32": "ViT-B-32-quickgelu",
}
OPENAI_WEIGHTS = "openai"
WEIGHTS_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# What open_clip logs when it builds a model without weights; a model built so on purpose (weights follow from a
# checkpoint, or training starts from scratch) does not say it.
RANDOM_INIT_NOTICE = "No pretrained weights loaded for model"

open_clip.add_model_config(REPO_ROOT / "configs")


@dataclass
class ModelBundle:
    """A built model with what goes with it: its transforms, tokenizer, open_clip name, input size and architecture."""

    model: torch.nn.Module
    train_transform: Callable
    val_transform: Callable
    tokenizer: Callable
    open_clip_name: str
    image_size: int  # the side the transforms resize images to
    model_cfg: dict  # the whole architecture, as open_clip's model JSONs and model folders write it


def resolve_model_name(name: str) -> str:
    """Original code's name, open_clip name ('ViT-B/16' spelled with a slash too), configs/ JSON name or model
    folder (local-dir:DIR, hf-hub:ORG/NAME, checked to be there) -> the name open_clip builds it by."""
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):])
        if not (folder / HF_CONFIG_NAME).is_file():
            raise ConfigError(f"--model_name {name}: no open_clip model folder there (it needs "
                              f"{HF_CONFIG_NAME}); write one with python -m rankclip.export")
        return name
    if name.startswith("hf-hub:"):
        repo = name[len("hf-hub:"):]
        if not isinstance(huggingface_hub.try_to_load_from_cache(repo, HF_CONFIG_NAME), str):
            raise ConfigError(f"--model_name {name}: not in the local Hugging Face cache; fetch it beforehand with "
                              f"hf download {repo} (huggingface_hub's CLI)")
        return name
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
    from --pretrained weights when given, its towers locked as --lock_image / --lock_text say.

    `init`: open_clip.create_model's keyword arguments that the objective needs (losses.model_init:
    SigLIP's logit scale and bias). Weights that have no logit bias give it 0, as open_clip's
    load_checkpoint does when a CLIP model is loaded for SigLIP training.

    --grad_checkpointing recomputes the transformers' block activations during backward
    (open_clip supports it in ViT towers and the text tower; ResNet towers run as usual).
    """
    open_clip_name = open_clip_name_of(model)
    tag, weights_file = pretrained_source(open_clip_name, model.pretrained)
    if tag is not None:
        cached_tag_weights(open_clip_name, tag, model.cache_dir)
    with _building(model):  # a tag's file is cached: open_clip reads it (and the tag's preprocessing) from there
        network, train_transform, val_transform = open_clip.create_model_and_transforms(
            open_clip_name, pretrained=tag, device=device, cache_dir=model.cache_dir, **(init or {}))
    if weights_file is not None:  # a local file: imported strictly into the architecture
        load_model_weights(network, weights_file)
    lock_towers(network, model, open_clip_name)
    network.set_grad_checkpointing(model.grad_checkpointing)
    with _building(model):
        tokenizer = open_clip.get_tokenizer(open_clip_name, cache_dir=model.cache_dir)
        architecture = open_clip.get_model_config(open_clip_name)
    size = architecture["vision_cfg"]["image_size"]
    image_size = max(size) if isinstance(size, (list, tuple)) else int(size)
    return ModelBundle(network, train_transform, val_transform, tokenizer, open_clip_name, image_size, architecture)


def open_clip_name_of(model: ModelConfig) -> str:
    """The name open_clip builds `model` by; a --model_name JSON's architecture (kept in `model.model_cfg`, so
    that it need not be where it was; read from the file when not) is registered with open_clip under the
    file's name first."""
    if model.model_cfg is None and not model.from_json:
        return resolve_model_name(model.model_name)
    architecture = model.model_cfg if model.model_cfg is not None else read_model_json(model.model_name)
    name = Path(model.model_name).stem
    known = open_clip.get_model_config(name)
    if known is not None and known != architecture:
        raise ConfigError(f"--model_name {model.model_name}: open_clip already has a model {name} with another "
                          f"architecture; rename the file")
    if known is None:
        with tempfile.TemporaryDirectory() as folder:  # open_clip registers files; it keeps what it read
            path = Path(folder) / f"{name}.json"
            path.write_text(json.dumps(architecture))
            open_clip.add_model_config(path)
    return name


class _RandomInitNotice(logging.Filter):
    """Drops open_clip's notice that a model was built without weights."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(RANDOM_INIT_NOTICE)


@contextmanager
def _building(model: ModelConfig) -> Iterator[None]:
    """While `model` is built: Hugging Face hub calls answer from the local cache alone, never from the network
    (--pretrained tags and hf-hub: folders are read from there), and a model built without weights on purpose
    (they come from a checkpoint or a --pretrained file, or training starts from scratch; a model folder brings
    its own) does not log open_clip's random-init notice."""
    root, notice, offline = logging.getLogger(), _RandomInitNotice(), hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    if not model.from_folder:
        root.addFilter(notice)
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = offline
        root.removeFilter(notice)


def checkpoint_model(model: ModelConfig, checkpoints: CheckpointsConfig, run_dir: Path, given: bool) -> ModelConfig:
    """The model of the checkpoint a run starts from (--resume, else --checkpoint): the one it records, or for the
    original code's checkpoints, which record none, the one of ORIGINAL_MODEL_NAMES its weights' shapes are. A
    `given` --model_name must be that model (a spelling of it, or a JSON of the same architecture)."""
    path = find_resume(checkpoints, run_dir, training=True)
    if path is None:
        return model
    return model_of_checkpoint(read_resume_checkpoint(path, run_dir), path, model, given)


def model_of_checkpoint(obj: dict, path: Path, model: ModelConfig, given: bool) -> ModelConfig:
    """The model of checkpoint dict `obj` (read from `path`), see checkpoint_model."""
    recorded = recorded_model(obj)
    if recorded is None:
        if given:
            return model
        raise CheckpointError(f"checkpoint {path} records no model and its weights are none of "
                              f"{', '.join(ORIGINAL_MODEL_NAMES)}: pass --model_name")
    if given and model.from_json and model.model_cfg is None:
        moved = model.model_name == recorded.model_name and not os.path.isfile(model.model_name)
        # A JSON that has moved since: the checkpoint keeps its architecture.
        model = dataclasses.replace(model, model_cfg=recorded.model_cfg if moved else read_model_json(model.model_name))
    if given and not _same_model(model, recorded):
        raise ConfigError(f"--model_name {model.model_name} is not the model of checkpoint {path}, "
                          f"{recorded.model_name}: leave --model_name out to use the checkpoint's")
    return dataclasses.replace(model, model_name=recorded.model_name, model_cfg=recorded.model_cfg)


def recorded_model(obj: dict) -> Optional[ModelConfig]:
    """The model a checkpoint dict was written by: its record (this project's), or recognized by its weights'
    shapes among the original code's models; None when it is neither."""
    settings = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    name = obj.get("model_name") or settings.get("model_name")
    if isinstance(name, str):
        return ModelConfig(model_name=name, model_cfg=settings.get("model_cfg"))
    shapes = {key: tuple(value.shape) for key, value in extract_state_dict(obj).items()}
    for original, open_clip_name in ORIGINAL_MODEL_NAMES.items():
        if architecture_shapes(open_clip_name) == shapes:
            return ModelConfig(model_name=original)
    return None


@cache
def architecture_shapes(open_clip_name: str) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of an open_clip model and its shape, from a model built without memory (meta)."""
    with torch.device("meta"), _building(ModelConfig(model_name=open_clip_name)):
        network = open_clip.create_model(open_clip_name, device="meta")
    return {key: tuple(value.shape) for key, value in network.state_dict().items()}


def _same_model(given: ModelConfig, recorded: ModelConfig) -> bool:
    if given.model_cfg is not None or recorded.model_cfg is not None:
        return given.model_cfg == recorded.model_cfg
    return resolve_model_name(given.model_name) == resolve_model_name(recorded.model_name)


def pretrained_source(open_clip_name: str, pretrained: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(open_clip tag, local weights file) that --pretrained names, at most one of them: a tag of the model
    (open_clip's spelling rules: any case, '-' for '_'), else an existing file."""
    if pretrained is None:
        return None, None
    if open_clip.get_pretrained_cfg(open_clip_name, pretrained):
        return pretrained, None
    if os.path.isfile(pretrained):
        return None, pretrained
    if os.sep in pretrained or "/" in pretrained or os.path.splitext(pretrained)[1] in WEIGHTS_SUFFIXES:
        raise ConfigError(f"--pretrained {pretrained}: no such file; pass a weights file, a tag of {open_clip_name} "
                          f"or --pretrained alone for OpenAI's")
    tags = open_clip.list_pretrained_tags_by_model(open_clip_name)
    others = open_clip.list_pretrained_models_by_tag(pretrained)
    unknown = (f"OpenAI released no weights for {open_clip_name}" if pretrained == OPENAI_WEIGHTS
               else f"{open_clip_name} has no released weights {pretrained!r} (nor is it a file)")
    elsewhere = (f"; it is a tag of --model_name {', '.join(others[:4])}{' ...' if len(others) > 4 else ''}"
                 if others and pretrained != OPENAI_WEIGHTS else "")
    raise ConfigError(f"--pretrained: {unknown}; its tags: {', '.join(tags) or 'none'}{elsewhere}; "
                      f"or pass --pretrained PATH to a weights file")


def lock_towers(network: torch.nn.Module, model: ModelConfig, open_clip_name: str) -> None:
    """--lock_image / --lock_text through open_clip's own lock_image_tower / lock_text_tower (LiT): the
    locked parameters get requires_grad=False, so they get no gradient, no optimizer state and no weight
    decay. A lock the model cannot honour (a partial lock of a ResNet tower, more unlocked groups than
    the tower has, ...) is one line."""
    if model.lock_image:
        counts = {k: v for k, v in network.state_dict().items() if k.endswith("num_batches_tracked")}
        _lock(network, lambda n: network.lock_image_tower(unlocked_groups=n, freeze_bn_stats=False),
              model.lock_image_unlocked_groups, "image", "--lock_image", "--lock_image_unlocked_groups", open_clip_name)
        if model.lock_image_freeze_bn_stats:
            network.lock_image_tower(unlocked_groups=model.lock_image_unlocked_groups, freeze_bn_stats=True)
            _keep_state_dict_keys(network, counts)
    if model.lock_text:
        _lock(network, lambda n: network.lock_text_tower(unlocked_layers=n,
                                                         freeze_layer_norm=model.lock_text_freeze_layer_norm),
              model.lock_text_unlocked_layers, "text", "--lock_text", "--lock_text_unlocked_layers", open_clip_name)


def _lock(network: torch.nn.Module, lock: Callable[[int], None], unlocked: int, tower: str, flag: str,
          unlocked_flag: str, open_clip_name: str) -> None:
    """`lock(unlocked)`, checked: open_clip's locks raise on what a tower does not support, and silently
    unlock the whole tower when asked for more groups than it has (then one group more unlocks nothing)."""
    given = flag + (f" {unlocked_flag} {unlocked}" if unlocked else "")
    try:
        if unlocked:
            lock(unlocked - 1)
            fewer = trainable_count(network)
        lock(unlocked)
    except (AssertionError, RuntimeError) as e:
        hint = "lock it whole (no unlocked groups)" if tower == "image" else "add --lock_text_freeze_layer_norm"
        raise ConfigError(f"{given}: open_clip cannot lock the {tower} tower of {open_clip_name} so ({e}); "
                          f"{hint}") from e
    if unlocked and trainable_count(network) == fewer:
        groups = next(n for n in range(unlocked) if not _unlocks_more(network, lock, n))
        raise ConfigError(f"{given}: open_clip divides the {tower} tower of {open_clip_name} into {groups} layer "
                          f"groups; pass {unlocked_flag} {groups} or fewer")


def _unlocks_more(network: torch.nn.Module, lock: Callable[[int], None], groups: int) -> bool:
    """Whether leaving `groups` + 1 groups unlocked trains more parameters than leaving `groups`."""
    lock(groups)
    before = trainable_count(network)
    lock(groups + 1)
    return trainable_count(network) > before


def _keep_state_dict_keys(network: torch.nn.Module, counts: dict[str, torch.Tensor]) -> None:
    """open_clip's freeze_bn_stats swaps BatchNorm2d for torchvision's FrozenBatchNorm2d, whose state_dict
    lacks num_batches_tracked: the key is put back (its value as frozen), so that checkpoints keep the
    architecture's keys and load strictly into open_clip.create_model (FrozenBatchNorm2d drops it again
    when loading)."""
    kept = network.state_dict()
    for key, count in counts.items():
        if key not in kept:
            module_name, name = key.rsplit(".", 1)
            network.get_submodule(module_name).register_state_dict_post_hook(
                lambda module, state, prefix, metadata, name=name, count=count: state.__setitem__(prefix + name,
                                                                                                   count))


def trainable_count(network: torch.nn.Module) -> int:
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


def describe_parameters(network: torch.nn.Module) -> str:
    """How many parameters the model has and how many of them train (locked towers' do not)."""
    total = sum(p.numel() for p in network.parameters())
    return f"{total / 1e6:.2f}M parameters, {trainable_count(network) / 1e6:.2f}M of them train"
