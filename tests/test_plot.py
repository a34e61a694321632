"""rankclip.plot: the series extracted from synthetic run folders, the PNGs and the CLI's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from rankclip.errors import ReportError
from rankclip.plot import draw_runs, main, run_curves, run_label, write_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVAL_SETS = ("ImageNet1K", "CIFAR10")
EPOCHS, STEPS_PER_EPOCH = 3, 4
REPO = Path(__file__).resolve().parents[1]


def loss_parts(loss: str, x: float) -> dict:
    """Loss record of the objective `loss` at x, values distinct per key so mix-ups show."""
    parts = {"loss": 10 / x, "contrastive_loss": 8 / x}
    if loss == "rankclip":
        parts |= {"rank_loss": 1 / x, "inmodal_rank_loss": 5 / x, "crossmodal_rank_loss": 4 / x}
    return parts


def write_lines(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_run(root: Path, name: str, loss: str, steps: bool = True, train: bool = True) -> Path:
    """A run folder as the trainer leaves it: epoch 0 evaluation, then EPOCHS epochs of training."""
    run = root / name
    run.mkdir(parents=True)
    (run / "params.txt").write_text(f"epochs: {EPOCHS}\nloss: {loss}\nmodel_name: tiny-vit\nname: {name}\n")
    results = []
    for epoch in range(EPOCHS + 1 if train else 1):
        if epoch > 0:
            results.append({"epoch": epoch, "split": "train", **loss_parts(loss, epoch), "lr": 0.1 * epoch,
                            "rank_weight": 1.0, "samples_per_second": 500.0, "step": epoch * STEPS_PER_EPOCH})
        results.append({"epoch": epoch, "split": "validation", **loss_parts(loss, epoch + 1), "num_samples": 64})
        for i, data_type in enumerate(EVAL_SETS):
            results.append({"epoch": epoch, "split": "eval", "zeroshot_top1": 0.1 * epoch + i / 100,
                            "zeroshot_top5": 0.5, "num_classes": 4, "num_samples": 64, "eval_data_type": data_type})
    results.append({"epoch": EPOCHS, "split": "analysis", "loss": 99.0})  # unknown splits are ignored
    write_lines(run / "results.jsonl", results)
    if steps and train:
        write_lines(run / "steps.jsonl", [{"step": s, "epoch": (s - 1) // STEPS_PER_EPOCH + 1,
                                           **loss_parts(loss, s), "lr": s / 100}
                                          for s in range(1, EPOCHS * STEPS_PER_EPOCH + 1)])
    return run


def test_series_from_steps_and_results(tmp_path):
    curves = run_curves(write_run(tmp_path, "rank", "rankclip"))
    steps = list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    train = curves["training loss"]
    assert set(train) == {"loss", "contrastive_loss", "rank_loss", "inmodal_rank_loss", "crossmodal_rank_loss"}
    assert train["rank_loss"] == (steps, [1 / s for s in steps])
    assert curves["learning rate"] == {"lr": (steps, [s / 100 for s in steps])}
    epochs = list(range(EPOCHS + 1))
    assert curves["validation loss"]["loss"] == (epochs, [10 / (e + 1) for e in epochs])
    assert "num_samples" not in curves["validation loss"]
    assert set(curves["zero-shot top-1"]) == set(EVAL_SETS)
    assert curves["zero-shot top-1"]["CIFAR10"] == (epochs, [0.1 * e + 0.01 for e in epochs])


def test_fallback_to_epoch_means_without_steps(tmp_path):
    curves = run_curves(write_run(tmp_path, "clip", "clip", steps=False))
    ends = [e * STEPS_PER_EPOCH for e in range(1, EPOCHS + 1)]
    assert set(curves["training loss"]) == {"loss", "contrastive_loss"}
    assert curves["training loss"]["contrastive_loss"] == (ends, [8 / e for e in range(1, EPOCHS + 1)])
    assert curves["learning rate"]["lr"] == (ends, [0.1 * e for e in range(1, EPOCHS + 1)])


def test_resumed_run_keeps_the_later_record(tmp_path):
    run = write_run(tmp_path, "rank", "rankclip")
    with open(run / "steps.jsonl", "a") as f:  # a resume re-logs step 12
        f.write(json.dumps({"step": 12, "epoch": 3, "loss": 0.5, "lr": 0.0}) + "\n")
    xs, ys = run_curves(run)["training loss"]["loss"]
    assert xs.count(12) == 1 and ys[-1] == 0.5


def test_write_curves_png(tmp_path):
    run = write_run(tmp_path, "rank", "rankclip")
    (run / "curves.png").write_bytes(b"old")
    path = write_curves(run)
    assert path == run / "curves.png"
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(path) as image:
        assert image.size == (1200, 800)
    assert sorted(p.name for p in run.iterdir()) == ["curves.png", "params.txt", "results.jsonl", "steps.jsonl"]


def test_overlay_one_colour_per_run(tmp_path):
    runs = [write_run(tmp_path, "a", "clip"), write_run(tmp_path, "b", "rankclip")]
    assert [run_label(r) for r in runs] == ["a (clip)", "b (rankclip)"]
    fig = draw_runs([(run_label(r), run_curves(r)) for r in runs])
    training = fig.axes[0]
    colours = {}
    for line in training.lines:
        colours.setdefault(line.get_label().split(":")[0], set()).add(line.get_color())
    assert set(colours) == {"a (clip)", "b (rankclip)"}
    assert all(len(c) == 1 for c in colours.values()) and colours["a (clip)"] != colours["b (rankclip)"]
    styles = {line.get_label(): line.get_linestyle() for line in training.lines}
    assert styles["a (clip): loss"] == styles["b (rankclip): loss"] != styles["b (rankclip): rank_loss"]
    zero_shot = fig.axes[3].get_legend_handles_labels()[1]
    assert sorted(zero_shot) == sorted(f"{r}: {d}" for r in colours for d in EVAL_SETS)


def test_eval_only_folder(tmp_path):
    run = write_run(tmp_path, "eval", "rankclip", train=False)
    curves = run_curves(run)
    assert curves["training loss"] == {} and curves["learning rate"] == {}
    assert curves["zero-shot top-1"]["ImageNet1K"] == ([0], [0.0])
    fig = draw_runs([("eval", curves)])
    assert [t.get_text() for t in fig.axes[0].texts] == ["no data"]
    assert fig.axes[3].lines[0].get_marker() == "o"  # a lone point must be visible
    assert write_curves(run).read_bytes().startswith(PNG_SIGNATURE)


def test_cli_overlay_default_output_without_pyplot(tmp_path):
    """Several runs go to ./comparison.png; the module never imports pyplot (the caller's backend stays)."""
    runs = [str(write_run(tmp_path, "a", "clip")), str(write_run(tmp_path, "b", "rankclip", steps=False))]
    code = ("import sys; from rankclip.plot import main; rc = main(sys.argv[1:]); "
            "assert 'matplotlib.pyplot' not in sys.modules; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, *runs], cwd=tmp_path, capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "comparison.png") as image:
        assert image.size == (1200, 800)


def test_cli_output_flag(tmp_path, capsys):
    run = write_run(tmp_path, "rank", "rankclip")
    assert main([str(run), "-o", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").read_bytes().startswith(PNG_SIGNATURE)
    assert not (run / "curves.png").exists()
    capsys.readouterr()
    assert main([str(run), "-o", str(tmp_path / "no_such_folder" / "x.png")]) == 2
    assert capsys.readouterr().err == f"rankclip.plot: error: cannot write {tmp_path}/no_such_folder/x.png: " \
                                      "No such file or directory\n"


def bad_json(root: Path) -> Path:
    run = write_run(root, "bad", "rankclip")
    lines = (run / "results.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]  # a truncated record on line 2
    (run / "results.jsonl").write_text("\n".join(lines) + "\n")
    return run


@pytest.mark.parametrize("make, message", [
    (lambda root: root / "missing", "is not a folder"),
    (lambda root: root, "neither results.jsonl nor steps.jsonl"),
    (bad_json, "results.jsonl line 2: not valid JSON"),
])
def test_cli_errors(tmp_path, capsys, make, message):
    assert main([str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rankclip.plot: error: ") and err.count("\n") == 1 and message in err


def test_empty_results_is_an_error_and_exit_code_is_2(tmp_path):
    (tmp_path / "results.jsonl").write_text("\n")
    with pytest.raises(ReportError, match="hold no records"):
        write_curves(tmp_path)
    done = subprocess.run([sys.executable, "-m", "rankclip.plot", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 2 and done.stderr.startswith("rankclip.plot: error: ")
    assert not (tmp_path / "curves.png").exists()
