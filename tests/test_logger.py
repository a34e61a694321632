"""RunLogger: results.jsonl and steps.jsonl records, and the keys sent to Weights & Biases."""

import json
import sys
import types

from rankclip.config import RunConfig
from rankclip.logger import RunLogger


class FakeRun:
    def __init__(self):
        self.logged = []

    def log(self, values):
        self.logged.append(values)


def test_each_eval_set_gets_its_own_wandb_keys_and_record(tmp_path):
    logger = RunLogger(RunConfig(logs=str(tmp_path), name="run"), {})
    logger.wandb = FakeRun()
    logger.results(1, "eval", {"zeroshot_top1": 0.5, "eval_data_type": "CIFAR10"})
    logger.results(1, "eval", {"zeroshot_top1": 0.7, "eval_data_type": "ImageNet1K"})
    logger.results(1, "retrieval", {"image_to_text_R@1": 0.2, "retrieval_data": "flickr"})
    logger.step(10, 1, {"loss": 2.0, "lr": 1e-3})
    assert logger.wandb.logged[:3] == [{"eval/CIFAR10/zeroshot_top1": 0.5, "epoch": 1},
                                       {"eval/ImageNet1K/zeroshot_top1": 0.7, "epoch": 1},
                                       {"retrieval/flickr/image_to_text_R@1": 0.2, "epoch": 1}]
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["eval_data_type"] for r in records[:2]] == ["CIFAR10", "ImageNet1K"]
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert steps == [{"step": 10, "epoch": 1, "loss": 2.0, "lr": 1e-3}]


def test_rewind_forgets_what_was_recorded_after_the_checkpoint(tmp_path):
    logger = RunLogger(RunConfig(logs=str(tmp_path), name="run"), {})
    for epoch in range(3):
        logger.results(epoch, "validation", {"loss": 3.0 - epoch})
    for step in range(1, 6):
        logger.step(step, 1 + step // 3, {"loss": 1.0})
    with open(tmp_path / "run" / "steps.jsonl", "a") as f:
        f.write('{"step": 6, "ep')  # cut short by a kill
    logger.rewind(epochs_done=1, step=4)
    results = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in results] == [0, 1] and [s["step"] for s in steps] == [1, 2, 3, 4]
    logger.rewind(epochs_done=-1, step=0)  # a fresh start of a run that never saved
    assert (tmp_path / "run" / "results.jsonl").read_text() == ""


def test_every_launch_of_a_run_folder_continues_one_wandb_run(tmp_path, monkeypatch):
    """wandb resumes only a given id: the folder keeps one, and a requeue passes it again."""
    calls = []
    fake = types.SimpleNamespace(init=lambda **kwargs: calls.append(kwargs) or FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = RunConfig(logs=str(tmp_path), name="run", wandb=True)
    RunLogger(run, {"lr": 1e-3})
    RunLogger(run, {"lr": 1e-3})
    RunLogger(RunConfig(logs=str(tmp_path), name="other", wandb=True), {})
    assert [c["resume"] for c in calls] == ["allow"] * 3
    assert calls[0]["id"] == calls[1]["id"] != calls[2]["id"]
    assert calls[0]["id"].isalnum() and calls[0]["name"] == "run"
