"""Reading checkpoint files safely (weights only, never pickled code) and importing the model
weights of checkpoints written by other projects."""

from __future__ import annotations

from .errors import CheckpointError

import zipfile
from pathlib import Path

import safetensors.torch
import torch


# Wrappers whose name prefixes every key: DDP, torch.compile, Lightning modules (self.model).
PREFIXES = ("module.", "_orig_mod.", "model.")



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
        raise CheckpointError(f"checkpoint {path}: cannot be read as a weights-only torch file ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


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
