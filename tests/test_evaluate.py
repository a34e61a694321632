"""The evaluator's protocols against open_clip's and against hand-computed values."""

import contextlib
import logging
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from rankclip.config import Config, ModelConfig, ObjectiveConfig
from rankclip.runtime import Runtime
from rankclip.eval_data import build_labeled_loader, load_eval_set
from rankclip.evaluate import EvalTasks, Evaluator, ZeroShotTask, zero_shot_classifier
from rankclip.logger import RunLogger, log
from rankclip.losses import build_loss
from rankclip.main import build_evaluator
from rankclip.metrics import topk_correct
from rankclip.models import build_model

CPU = torch.device("cpu")


@contextlib.contextmanager
def propagating(logger: logging.Logger):
    """Let caplog see the project's logger (setup_console_logging turns propagation off)."""
    before = logger.propagate
    logger.propagate = True
    try:
        yield
    finally:
        logger.propagate = before


def test_zero_shot_agrees_with_open_clip(colour_data):
    torch.manual_seed(0)
    bundle = build_model(ModelConfig(model_name="tiny-vit"))
    model = bundle.model.eval()
    data = load_eval_set("ImageNet1K", colour_data["zeroshot"], bundle.val_transform)
    classes, templates = data.require_prompts()

    ours = zero_shot_classifier(model, bundle.tokenizer, classes, templates, CPU)
    theirs = open_clip.build_zero_shot_classifier(model, bundle.tokenizer, classes, templates, device=CPU)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)

    loader = build_labeled_loader(data.dataset, Runtime(), batch_size=16, num_workers=0)
    evaluator = Evaluator(EvalTasks(), Runtime(), validation_loader=None, loss_fn=None, tokenizer=bundle.tokenizer,
                          logger=None, precision="fp32")
    metrics = evaluator.zero_shot(model, ZeroShotTask("ImageNet1K", loader, classes, templates))
    with torch.no_grad():
        images, labels, _ = next(iter(build_labeled_loader(data.dataset, Runtime(), 64, 0)))
        predictions = (model.encode_image(images, normalize=True) @ theirs).argmax(dim=1)
    assert metrics["zeroshot_top1"] == (predictions == labels).float().mean().item()
    assert metrics["num_samples"] == 64 and metrics["num_classes"] == 4


def test_topk_counts_hits_and_caps_k_at_the_class_count():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.3, 0.5, 0.2]])
    labels = torch.tensor([0, 1, 0])
    assert topk_correct(logits, labels, (1, 2, 5)) == {1: 1, 2: 3, 5: 3}


def validation_csv(colour_data, tmp_path) -> tuple[Path, list[int]]:
    """The 64 validation rows, one more readable row (65) and two unreadable ones; returns the CSV and
    the readable rows' line numbers."""
    header, *rows = colour_data["validation"].read_text().splitlines()
    rows.append(colour_data["train"].read_text().splitlines()[1])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    root = colour_data["root"]
    rows = [f"{root / r.split(',')[0]},{r.split(',', 1)[1]}" for r in rows]
    rows.insert(3, f"{broken},a broken picture")
    rows.insert(40, f"{tmp_path / 'gone.png'},a missing picture")
    path = tmp_path / "validation.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path, [i for i in range(len(rows)) if i not in (3, 40)]


def test_validation_skips_unreadable_rows_and_its_loss_ignores_batch_size(colour_data, tmp_path, caplog,
                                                                         monkeypatch):
    monkeypatch.setattr("rankclip.evaluate.VALIDATION_LOSS_BATCH", 40)  # 65 pairs: loss batches of 33 and 32
    torch.manual_seed(0)
    bundle = build_model(ModelConfig(model_name="tiny-vit"))
    model = bundle.model.eval()
    path, readable = validation_csv(colour_data, tmp_path)
    results = []
    for batch_size in (64, 8):
        cfg = Config.from_dict(dict(validation_data=str(path), batch_size=batch_size, model_name="tiny-vit",
                                    num_workers=0, name="v"))
        evaluator = build_evaluator(cfg, Runtime(), bundle, RunLogger(cfg.run, cfg.to_dict(), enabled=False))
        with caplog.at_level(logging.WARNING, logger="rankclip"), propagating(log):
            results.append(evaluator.validation(model, rank_weight=1.5))
        assert "validation: skipped 2 unreadable images, e.g." in caplog.text
        caplog.clear()
    for a, b in zip(results[0].values(), results[1].values()):
        assert a == pytest.approx(b, rel=1e-5)
    metrics = results[0]
    assert metrics["num_samples"] == 65 and metrics["skipped_samples"] == 2 and metrics["loss_batch_size"] == 33

    # Oracle: the 65 readable pairs in order, the loss averaged over batches of 33 and 32 (never one of 1).
    lines = path.read_text().splitlines()[1:]
    with torch.no_grad():
        images = torch.stack([bundle.val_transform(Image.open(lines[i].split(",")[0]).convert("RGB"))
                              for i in readable])
        texts = bundle.tokenizer([lines[i].split(",", 1)[1] for i in readable])
        image_features, text_features, scale = model(images, texts)
        loss_fn = build_loss(ObjectiveConfig(), gather=False)
        parts = [loss_fn(image_features[rows], text_features[rows], scale, rank_weight=1.5)
                 for rows in (slice(0, 33), slice(33, 65))]
    for key in parts[0]:
        want = (33 * parts[0][key].item() + 32 * parts[1][key].item()) / 65
        assert metrics[key] == pytest.approx(want, rel=1e-4, abs=1e-6), key


def test_only_the_main_process_draws_evaluation_progress_bars(colour_data, capsys):
    """Under srun/torchrun every rank shares the job's output: one set of bars, rank 0's."""
    bundle = build_model(ModelConfig(model_name="tiny-vit"))
    cfg = Config.from_dict(dict(validation_data=str(colour_data["validation"]), eval_data_type=["ImageNet1K"],
                                eval_test_data_dir=[str(colour_data["zeroshot"])], model_name="tiny-vit",
                                num_workers=0, name="bars"))
    shown = {}
    for runtime in (Runtime(), Runtime(rank=1, world_size=2)):  # no process group: each evaluates alone
        logger = RunLogger(cfg.run, cfg.to_dict(), enabled=False)
        build_evaluator(cfg, runtime, bundle, logger).run(bundle.model, epoch=0, rank_weight=1.0)
        shown[runtime.rank] = capsys.readouterr().err
    assert "validation" in shown[0] and "zero-shot ImageNet1K" in shown[0]
    assert shown[1] == ""
