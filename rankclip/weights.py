"""Reading checkpoint files safely (weights only, never pickled code), importing the model weights of
checkpoints written by other projects, and finding open_clip's released weights in the local cache."""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Optional

import open_clip
import safetensors.torch
import torch
from huggingface_hub import constants as hub_constants, try_to_load_from_cache
from open_clip.constants import HF_WEIGHTS_NAME
from open_clip.pretrained import _get_safe_alternatives

from .errors import CheckpointError, ConfigError
from .logger import log

BIAS, LOGIT_SCALE = "logit_bias", "logit_scale"  # open_clip's names of the logit parameters
# Wrappers whose name prefixes every key: DDP, torch.compile, Lightning modules (self.model).
PREFIXES = ("module.", "_orig_mod.", "model.")
# What torch's weights-only unpickler names when a file holds code: the class or function it would import.
PICKLED_CODE = re.compile(r"Unsupported global: GLOBAL (\S+)")


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file safely (no pickled code) onto the CPU: torch files or safetensors.

    Torch files are memory-mapped: reading one entry (its "epoch") reads no tensor, the processes of
    a machine share the file's pages, and a tensor's bytes are read when it is first used."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as e:
            raise CheckpointError(f"checkpoint {path}: cannot be read as safetensors ({e})") from e
    if _is_torchscript(path):
        raise CheckpointError(f"checkpoint {path}: a TorchScript archive (such as OpenAI's original release), which "
                          f"holds code; load it once with open_clip.load_openai_model and save its state_dict()")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        code = PICKLED_CODE.search(str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if code:
            raise CheckpointError(f"checkpoint {path} holds code (a pickled {code.group(1)}) and is not loaded: only "
                                  f"tensors and plain values are read; save the model's weights alone (its "
                                  f"state_dict, or safetensors) and pass that file") from e
        raise CheckpointError(f"checkpoint {path}: damaged or not a torch file ({_first_sentence(e)})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def _first_sentence(error: Exception) -> str:
    """What an error from torch says first (its messages run to several lines of advice)."""
    text = str(error).strip()
    return re.split(r"(?<=\.)\s", text, maxsplit=1)[0] if text else type(error).__name__


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip holding constants.pkl (plain torch.save zips never do)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def extract_state_dict(obj: dict) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint, whatever wrote it.

    Accepts this project's, the original RankCLIP code's, CyCLIP's and open_clip's checkpoints (weights under
    "state_dict"), Lightning's ("state_dict" with a "model." prefix), {"model": weights}, and
    plain state dicts (OpenAI/open_clip layout). A prefix is removed only when every key has
    it, so no key of a CLIP model itself is ever renamed.
    """
    state = obj
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    stripped = True
    while stripped:
        stripped = False
        for prefix in PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def load_model_weights(model: torch.nn.Module, path: str | Path) -> dict:
    """Strictly load a checkpoint's weights into `model`; returns the whole checkpoint dict."""
    obj = read_checkpoint(path)
    load_weights(model, obj, path)
    return obj


def load_weights(model: torch.nn.Module, obj: dict, path: str | Path) -> None:
    """Strictly load the weights of checkpoint `obj` (read from `path`) into `model`.

    The one exception: a SigLIP model (it has a logit_bias) takes weights without one with a bias of 0,
    as open_clip's load_checkpoint does when a CLIP model starts SigLIP training.
    """
    state = extract_state_dict(obj)
    expected = model.state_dict()
    if BIAS in expected and BIAS not in state and LOGIT_SCALE in state:
        log.info(f"{path} has no logit_bias (not a SigLIP model): it starts at 0, as in open_clip")
        state[BIAS] = torch.zeros_like(expected[BIAS])
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
              if k in expected and v.shape != expected[k].shape]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected or shapes:
        def some(keys: list[str]) -> str:
            return f"{keys[:5]}{' ...' if len(keys) > 5 else ''} ({len(keys)})"
        hint = ("it was trained with --loss siglip (it has a logit_bias): pass --loss siglip"
                if unexpected == [BIAS] and not missing and not shapes else "check --model_name")
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {some(missing)}, unexpected "
                          f"{some(unexpected)}, wrong shape {some(shapes)}; {hint}")
    model.load_state_dict(state, strict=True)


def cached_tag_weights(open_clip_name: str, tag: str, cache_dir: Optional[str]) -> str:
    """The file of open_clip's released weights `tag` for `open_clip_name` in the local Hugging Face cache
    (`cache_dir`, else HF_HOME's hub cache), found as open_clip's download_pretrained finds it: the
    repository and file named by the tag's `hf_hub`, its safetensors twin first. Nothing is downloaded:
    a file not in the cache is one line naming it and the command that fetches it."""
    pretrained = open_clip.get_pretrained_cfg(open_clip_name, tag)
    if not pretrained.get("hf_hub"):
        raise ConfigError(f"--pretrained {tag}: open_clip publishes these weights at {pretrained.get('url')} only; "
                          f"download that file and pass --pretrained PATH")
    repo, filename = os.path.split(pretrained["hf_hub"])  # 'org/name/' or 'org/name/file', as open_clip splits it
    filename = filename or HF_WEIGHTS_NAME
    for name in (*_get_safe_alternatives(filename), filename):
        found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
        if isinstance(found, str):
            return found
    root = cache_dir or hub_constants.HF_HUB_CACHE
    raise ConfigError(f"--pretrained {tag}: open_clip reads these weights of {open_clip_name} from {filename} of the "
                      f"Hugging Face repository {repo}, which the cache {root} does not hold; on a machine with "
                      f"internet run `hf download {repo} {filename}` and copy the folder "
                      f"models--{repo.replace('/', '--')} of its cache into {root} (or name the cache with --cache_dir)")
