"""Reading checkpoint files safely (weights only, never pickled code) and importing the model
weights of checkpoints written by other projects."""

from __future__ import annotations

from .errors import CheckpointError

import pickle
import re
import zipfile
from pathlib import Path

import safetensors.torch
import torch


# Wrappers whose name prefixes every key: DDP, torch.compile, Lightning modules (self.model).
PREFIXES = ("module.", "_orig_mod.", "model.")
# What torch's weights-only unpickler names when a file holds code: the class or function it would import.
PICKLED_CODE = re.compile(r"Unsupported global: GLOBAL (\S+)")


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """Load a checkpoint file safely (no pickled code) onto the CPU: torch files or safetensors. With `mmap`
    a torch file's tensors stay in the file until they are read (a look at its record costs no memory)."""
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
        obj = _load_weights_only(path, mmap)
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


def _load_weights_only(path: Path, mmap: bool) -> object:
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files of torch's legacy (non-zip) format cannot be mapped: read them whole
            pass
    return torch.load(path, map_location="cpu", weights_only=True)


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
    """Strictly load the weights of checkpoint `obj` (read from `path`) into `model`."""
    state = extract_state_dict(obj)
    expected = model.state_dict()
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
              if k in expected and v.shape != expected[k].shape]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected or shapes:
        def some(keys: list[str]) -> str:
            return f"{keys[:5]}{' ...' if len(keys) > 5 else ''} ({len(keys)})"
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {some(missing)}, unexpected "
                          f"{some(unexpected)}, wrong shape {some(shapes)}; check --model_name")
    model.load_state_dict(state, strict=True)
