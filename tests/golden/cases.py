"""What the golden fixture records and how: shared by make_golden.py (which writes it) and test_golden.py.

Only stable public entry points are used: `build_parser()`, `parse_config(argv).to_dict()`, the CLI
`python -m rankclip.main` in a subprocess, and the run folder's files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from rankclip.config import build_parser, parse_config

GOLDEN = Path(__file__).resolve().parent
REPO = GOLDEN.parent.parent
PLACEHOLDER = "<repo>"
MODEL = "golden-micro"  # tests/golden/models/golden-micro.json, registered with open_clip by run_cli
DEMO = f"{REPO}/data/demo"

PARSE_CASES = {
    "demo": ["--name", "golden-demo"],
    "many_flags": [
        "--name", "golden-flags", "--logs_dir", "some/logs", "--train_data", f"{DEMO}/train.csv",
        "--validation_data", f"{DEMO}/validation.csv", "--eval_data_type", "ImageNet1K", "CIFAR10",
        "--eval_test_data_dir", f"{DEMO}/zeroshot", f"{DEMO}/zeroshot", "--retrieval_data", f"{DEMO}/validation.csv",
        "--device_ids", "0", "1", "--lr", "3e-4", "--lambda1", "0.125", "--rank_eps", "0", "--inmodal", "--sync_bn",
        "--loss", "cyclip", "--cylambda1", "0.25", "--precision", "fp32", "--pretrained", "--seed", "3",
        "--save_every_minutes", "2.5", "--keep_checkpoints", "3", "--best_metric", "eval/ImageNet1K/zeroshot_top1",
        "--delimiter", ";", "--model_name", "ViT-B/32", "--epochs", "2", "--notes", "golden",
    ],
    "config_file": ["--name", "golden-config", "--config", f"{GOLDEN}/config_case.json",
                    "--train_data", f"{DEMO}/train.csv", "--epochs", "3", "--lr", "1e-3"],
}

# The CLI runs: data made by tests/conftest.py's helpers in the run's working folder, all paths relative.
COMMON_FLAGS = ["--model_name", MODEL, "--logs", "logs", "--num_workers", "0", "--device", "cpu",
                "--batch_size", "16", "--epochs", "2", "--num_warmup_steps", "2", "--lr", "2e-3", "--seed", "5"]
EVALUATION_FLAGS = ["--validation_data", "validation.csv", "--eval_data_type", "ImageNet1K",
                    "--eval_test_data_dir", "zeroshot"]
TRAIN_FLAGS = ["--train_data", "train.csv", *EVALUATION_FLAGS, *COMMON_FLAGS]
CHECKPOINT = GOLDEN / "epoch_1.pt"
INTEGER_FIELDS = ("epoch", "step", "num_samples")


def normalise(value):
    """`value` with the repository's absolute path replaced by PLACEHOLDER (in strings, lists, dicts)."""
    if isinstance(value, str):
        return value.replace(str(REPO), PLACEHOLDER)
    if isinstance(value, list):
        return [normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    return value


def describe_parser() -> list[dict]:
    """Every action of build_parser(), as JSON-ready facts."""
    return [{"option_strings": a.option_strings, "dest": a.dest, "nargs": a.nargs, "const": a.const,
             "choices": list(a.choices) if a.choices is not None else None, "default": a.default,
             "type": getattr(a.type, "__name__", None), "action": type(a).__name__, "help": a.help}
            for a in build_parser()._actions]


def parsed_cases() -> dict[str, dict]:
    """parse_config(argv).to_dict() of each PARSE_CASES entry, placeholder-normalised."""
    return {name: normalise(parse_config(argv).to_dict()) for name, argv in PARSE_CASES.items()}


def parser_record() -> dict:
    """The content of parser.json."""
    return normalise({"actions": describe_parser(), "parse_config": parsed_cases()})


def write_data(folder: Path) -> None:
    """The runs' tiny dataset, identical on every call (seeded)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import write_caption_csv, write_zeroshot_folder
    write_caption_csv(folder, "train", 48, seed=1)
    write_caption_csv(folder, "validation", 16, seed=2)
    write_zeroshot_folder(folder, 16, seed=3)


def run_cli(folder: Path, argv: list[str]) -> None:
    """`python -m rankclip.main ARGV` in `folder`, single-threaded, with golden-micro registered in open_clip."""
    code = (f"import open_clip, runpy; open_clip.add_model_config({str(GOLDEN / 'models')!r}); "
            "runpy.run_module('rankclip.main', run_name='__main__', alter_sys=True)")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code, *argv], cwd=folder, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"rankclip.main {' '.join(argv)} failed:\n{done.stderr[-3000:]}")


def results(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def weight_summary(path: Path) -> dict[str, list[float]]:
    """[sum, sum of squares] of every tensor in a checkpoint's state_dict."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k: [float(v.double().sum()), float(v.double().square().sum())] for k, v in state.items()}


def evaluate_checkpoint(folder: Path, checkpoint: Path) -> list[dict]:
    """Records of evaluating `checkpoint` (no --train_data) on the validation and zero-shot sets."""
    run_cli(folder, ["--checkpoint", str(checkpoint), *EVALUATION_FLAGS, *COMMON_FLAGS, "--name", "evaluated"])
    return results(folder / "logs" / "evaluated")


def resume_checkpoint(folder: Path, checkpoint: Path) -> dict:
    """Resume `checkpoint` (epoch 1 of 2) from a copy in the run folder: its params.txt, epoch 2's records and
    final weights."""
    run_dir = folder / "logs" / "resumed"
    (run_dir / "checkpoints").mkdir(parents=True)
    copy = run_dir / "checkpoints" / "epoch_1.pt"
    copy.write_bytes(checkpoint.read_bytes())
    run_cli(folder, [*TRAIN_FLAGS, "--name", "resumed", "--resume", str(copy.relative_to(folder))])
    return {"params": (run_dir / "params.txt").read_text(),
            "records": [r for r in results(run_dir) if r["epoch"] == 2 and r["split"] in ("train", "validation")],
            "weights": weight_summary(run_dir / "checkpoints" / "epoch_2.pt")}
