"""Export a checkpoint as an open_clip model folder: `python -m rankclip.export CHECKPOINT OUT_DIR`.

The folder is the one open_clip and the Hugging Face hub share: `open_clip_config.json` (`model_cfg`, the
whole architecture, so that open_clip builds models it does not know by name, such as tiny-vit or a custom
JSON, and `preprocess_cfg`), `open_clip_model.safetensors` (the weights alone), the tokenizer's files where
the model has them, and a model card README.md. open_clip writes the first three (`save_for_hf`) and the
card's frame (`generate_readme`). `open_clip.create_model_and_transforms('local-dir:OUT_DIR')` loads it,
`python -m rankclip.main --model_name local-dir:OUT_DIR` evaluates it or trains from it, and uploaded as is it
loads as 'hf-hub:ORG/NAME'.

The folder appears whole or not at all: it is written beside OUT_DIR under a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from open_clip.constants import HF_CONFIG_NAME
from open_clip.push_to_hf_hub import generate_readme, save_for_hf

from .config import ModelConfig
from .errors import CheckpointError, ConfigError, RankCLIPError, ReportError
from .files import fsync_folder, temporary_name
from .losses import model_init
from .models import ModelBundle, build_model, model_of_checkpoint
from .plot import read_jsonl
from .weights import BIAS, extract_state_dict, load_weights, read_checkpoint

CITATION = """@InProceedings{Zhang_2025_ICCV,
    author    = {Zhang, Yiming and Zhao, Zhuokai and Chen, Zhaorun and Feng, Zhili and Ding, Zenghui and Sun, Yining},
    title     = {RANKCLIP: Ranking-Consistent Language-Image Pretraining},
    booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
    month     = {October},
    year      = {2025},
    pages     = {3874-3884}
}"""
# The records of a run's results.jsonl that the card lists, and the key that names each one's set.
CARD_SPLITS = {"validation": None, "eval": "eval_data_type", "retrieval": "retrieval_data"}


class _BundledVocabulary:
    """The tokenizer of a model whose vocabulary ships with open_clip (its SimpleTokenizer): no files to write."""

    def save_pretrained(self, folder: str) -> None:
        pass


def export(checkpoint: str | Path, out_dir: str | Path, model_name: Optional[str] = None, force: bool = False) -> Path:
    """Write `checkpoint`'s model as an open_clip model folder `out_dir` (see the module docstring); returns it.

    The model is the one the checkpoint records (or, for the original code's, recognizes); `model_name` names it
    for checkpoints that have neither and must agree with it otherwise. An `out_dir` that holds files is
    replaced only with `force`, and only when it is an earlier export."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    _check_out_dir(out_dir, force)
    obj = read_checkpoint(checkpoint)
    if not extract_state_dict(obj):
        raise CheckpointError(f"checkpoint {checkpoint} holds no model weights (no tensors); export a checkpoint "
                              f"of a training run")
    given = ModelConfig(model_name=model_name) if model_name else ModelConfig()
    model = model_of_checkpoint(obj, checkpoint, given, given=model_name is not None)
    # A SigLIP run's weights hold open_clip's logit_bias: the model is built with one, and the folder's model_cfg
    # asks open_clip for one too (init_logit_bias, as open_clip's own SigLIP configs do).
    init = model_init("siglip") if BIAS in extract_state_dict(obj) else {}
    bundle = build_model(model, init=init)
    load_weights(bundle.model, obj, checkpoint)
    staging = temporary_name(out_dir)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        tokenizer = bundle.tokenizer if hasattr(bundle.tokenizer, "save_pretrained") else _BundledVocabulary()
        save_for_hf(bundle.model, tokenizer, bundle.model_cfg | init, staging, safe_serialization=True)
        (staging / "README.md").write_text(model_card(obj, checkpoint, model, bundle, out_dir), encoding="utf-8")
        _sync(staging)
        _move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _check_out_dir(out_dir: Path, force: bool) -> None:
    """OUT_DIR must be new or empty; --force replaces an earlier export, but never a folder of other files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"OUT_DIR {out_dir} is a file; name a folder to write the model into")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not force:
        raise ConfigError(f"OUT_DIR {out_dir} exists and is not empty; choose a new folder, or pass --force to "
                          f"replace it")
    if not (out_dir / HF_CONFIG_NAME).is_file():
        raise ConfigError(f"OUT_DIR {out_dir} is not an open_clip model folder (no {HF_CONFIG_NAME}): --force "
                          f"replaces an earlier export only; choose a new folder")


def _sync(folder: Path) -> None:
    """Every file of `folder` readable as the user's new files are (some writers make theirs private) and on
    disk, and the folder itself, before it is renamed into place."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fsync_folder(folder)


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename `staging` to `out_dir`; an existing `out_dir` (empty, or replaced under --force) is moved aside first
    and removed after, so that `out_dir` is always either the old folder or the new one."""
    aside = None
    if out_dir.exists():
        aside = out_dir.with_name(f".{out_dir.name}.replaced{os.getpid()}")
        os.rename(out_dir, aside)
    os.rename(staging, out_dir)
    fsync_folder(out_dir.parent)
    if aside is not None:
        shutil.rmtree(aside)


def model_card(obj: dict, checkpoint: Path, model: ModelConfig, bundle: ModelBundle, out_dir: Path) -> str:
    """The folder's README.md: open_clip's card (hub metadata, details, usage, citation) with the run's settings,
    and the checkpoint's evaluation results when its run folder has them."""
    settings = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    epoch = obj.get("epoch")
    details = {
        "Model type": "contrastive image-text model (CLIP), zero-shot image classification and retrieval",
        "Architecture": model.model_name + (f" (open_clip {bundle.open_clip_name})"
                                            if bundle.open_clip_name != model.model_name else ""),
        "Objective": _objective(settings),
        "Training data": settings.get("train_data", "not recorded"),
        "Epochs": f"{epoch} of {settings['epochs']}" if "epochs" in settings and epoch is not None else epoch,
        "Global batch size": settings.get("batch_size"),
        "Peak learning rate": settings.get("lr"),
        "Checkpoint": checkpoint.name,
    }
    card = {
        "tags": ("clip", "rankclip"),
        "license": "other",
        "description": "A CLIP model trained with RankCLIP (ranking-consistent language-image pretraining), "
                       "exported by `python -m rankclip.export`.",
        "details": {key: value for key, value in details.items() if value is not None},
        "usage": _usage(out_dir),
        "citation": CITATION,
    }
    return generate_readme(card, out_dir.name) + _results_section(checkpoint, epoch)


def _objective(settings: dict) -> str:
    loss = settings.get("loss")
    if loss == "rankclip":
        return (f"RankCLIP: contrastive + rank weight x (lambda1 {settings['lambda1']:g} x in-modal + lambda2 "
                f"{settings['lambda2']:g} x cross-modal Plackett-Luce ranking consistency), rank weight schedule "
                f"{settings.get('rank_schedule', 'reference')}, eps {settings.get('rank_eps', 1e-10):g}")
    if loss == "cyclip":
        return (f"CyCLIP: contrastive + cylambda1 {settings['cylambda1']:g} x in-modal + cylambda2 "
                f"{settings['cylambda2']:g} x cross-modal cyclic consistency")
    if loss == "clip":
        return "CLIP: contrastive (InfoNCE over image-text pairs)"
    if loss == "siglip":
        return "SigLIP: sigmoid loss over every image-text pair, with a learnt logit bias (open_clip's SigLipLoss)"
    return "not recorded (a checkpoint of the original RankCLIP code, or of another project)"


def _usage(out_dir: Path) -> str:
    name = f"local-dir:{out_dir.name}"
    return ("```python\nimport open_clip\n\n"
            f"# this folder, or 'hf-hub:ORG/NAME' once uploaded\n"
            f"model, _, preprocess = open_clip.create_model_and_transforms('{name}')\n"
            f"tokenizer = open_clip.get_tokenizer('{name}')\n```\n\n"
            f"Evaluate it with RankCLIP: `python -m rankclip.main --model_name {name} --eval_data_type ImageNet1K "
            f"--eval_test_data_dir DIR`.\n")


def _results_section(checkpoint: Path, epoch: Optional[int]) -> str:
    """A table of the results.jsonl records of the checkpoint's epoch, from its run folder (<run>/checkpoints/)."""
    results = checkpoint.parent.parent / "results.jsonl"
    if epoch is None or checkpoint.parent.name != "checkpoints" or not results.is_file():
        return ""
    try:
        records = [r for r in read_jsonl(results) if r.get("epoch") == epoch and r.get("split") in CARD_SPLITS]
    except ReportError as e:
        print(f"rankclip export: warning: the model card has no results: {e}", file=sys.stderr)
        return ""
    rows = []
    for record in records:
        key = CARD_SPLITS[record["split"]]
        name = f"{record['split']} {record[key]}" if key and key in record else record["split"]
        rows += [f"| {name} | {metric} | {value:.4f} |" for metric, value in record.items()
                 if metric not in ("epoch", "split", key) and isinstance(value, float)]
    if not rows:
        return ""
    return (f"\n## Evaluation results\n\nFrom the run's `results.jsonl`, epoch {epoch}:\n\n"
            "| evaluation | metric | value |\n|---|---|---|\n" + "\n".join(rows) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rankclip.export",
        description="Write a checkpoint's model as an open_clip model folder (open_clip_config.json, "
                    "open_clip_model.safetensors, tokenizer files, README.md model card), loadable as "
                    "local-dir:OUT_DIR or, once uploaded, hf-hub:ORG/NAME.")
    parser.add_argument("checkpoint", help="a checkpoint of this project (or of the original RankCLIP code)")
    parser.add_argument("out_dir", help="the folder to write; it must not exist or be empty (see --force)")
    parser.add_argument("--model_name", help="the model of a checkpoint that records none and is none of the "
                                             "original code's (default: the checkpoint's)")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it holds an earlier export")
    args = parser.parse_args(argv)
    try:
        out_dir = export(args.checkpoint, args.out_dir, args.model_name, args.force)
    except RankCLIPError as e:
        print(f"rankclip export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out_dir}: open_clip.create_model_and_transforms('local-dir:{out_dir}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
