"""rankclip.report on fabricated run folders: numbers against hand-computed mean ± sample std, refusals, warnings."""

import json
import math

import pytest
import torch

from rankclip.errors import ReportError
from rankclip.config import Config
from rankclip.report import build_report, main, write_report

EPOCHS = 2


def write_run(folder, records, **settings):
    """A run folder as RunLogger leaves it: params.txt of every Config key, results.jsonl."""
    folder.mkdir(parents=True)
    values = Config.from_dict(dict(name=folder.name, model_name="tiny-vit", train_data="/data/train.csv",
                                   validation_data="/data/val.csv", eval_data_type=("ImageNet1K",),
                                   eval_test_data_dir=("/data/zeroshot",), epochs=EPOCHS)).to_dict() | settings
    (folder / "params.txt").write_text("".join(f"{k}: {v}\n" for k, v in sorted(values.items())))
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def records_for(top1, loss, epochs=EPOCHS, gap=0.3, recall=None):
    """Per epoch: train, validation and eval records; the metric of epoch e is value - 0.1 * (final - e)."""
    rows = []
    for epoch in range(epochs + 1):
        shift = 0.1 * (epochs - epoch)
        if epoch:
            rows.append({"epoch": epoch, "split": "train", "loss": 9.0})
        rows.append({"epoch": epoch, "split": "validation", "loss": loss + shift, "contrastive_loss": loss + shift,
                     "inmodal_consistency": top1 - shift, "crossmodal_consistency": top1 / 2,
                     "alignment": loss / 4, "image_uniformity": -loss, "text_uniformity": -loss / 2,
                     "modality_gap": gap})
        rows.append({"epoch": epoch, "split": "eval", "eval_data_type": "ImageNet1K", "zeroshot_top1": top1 - shift,
                     "zeroshot_top5": min(1.0, top1 + 0.2 - shift), "num_classes": 4})
        if recall is not None:
            rows.append({"epoch": epoch, "split": "retrieval", "retrieval_data": "flickr",
                         **{f"{way}_R@{k}": recall for way in ("image_to_text", "text_to_image") for k in (1, 5, 10)}})
    return rows


@pytest.fixture
def study(tmp_path):
    """clip: 3 seeds (top-1 0.5, 0.6, 0.7), rankclip: 2 seeds (top-1 0.8, 0.9); rankclip has the lower loss."""
    root = tmp_path / "study"
    for seed, (top1, loss) in enumerate([(0.5, 3.0), (0.6, 2.0), (0.7, 1.0)]):
        write_run(root / f"loss=clip_seed={seed}", records_for(top1, loss, recall=0.25 * (seed + 1)),
                  loss="clip", seed=seed, num_workers=seed)  # num_workers: how it ran, not another configuration
    for seed, (top1, loss) in enumerate([(0.8, 0.5), (0.9, 0.25)]):
        write_run(root / f"loss=rankclip_seed={seed}", records_for(top1, loss, recall=0.5), loss="rankclip", seed=seed)
    return root


def test_means_and_sample_stds_match_hand_computation(study, tmp_path):
    report, _ = build_report([study])
    assert [c["label"] for c in report["configurations"]] == ["loss=clip", "loss=rankclip"]
    assert report["configurations"][0]["seeds"] == ["0", "1", "2"]
    assert report["configurations"][0]["epochs"] == [EPOCHS] * 3
    assert report["differing_settings"] == ["loss"]
    zero_shot = report["tables"]["Zero-shot accuracy"]
    clip = zero_shot["rows"]["loss=clip"]["ImageNet1K top-1"]
    assert clip["n"] == 3 and clip["values"] == [0.5, 0.6, 0.7]
    assert clip["mean"] == pytest.approx(0.6) and clip["std"] == pytest.approx(0.1)  # sqrt((.01+0+.01)/2)
    rank = zero_shot["rows"]["loss=rankclip"]["ImageNet1K top-1"]
    assert rank["mean"] == pytest.approx(0.85) and rank["std"] == pytest.approx(math.sqrt(0.005))
    assert zero_shot["rows"]["loss=clip"]["ImageNet1K top-5"]["mean"] == pytest.approx(0.8)
    assert zero_shot["best"] == {"ImageNet1K top-1": ["loss=rankclip"], "ImageNet1K top-5": ["loss=rankclip"]}
    loss = report["tables"]["Validation contrastive loss"]
    assert loss["rows"]["loss=clip"]["contrastive loss"]["std"] == pytest.approx(1.0)
    assert loss["rows"]["loss=rankclip"]["contrastive loss"]["mean"] == pytest.approx(0.375)
    assert loss["best"] == {"contrastive loss": ["loss=rankclip"]}  # lower is better
    uniformity = report["tables"]["Alignment and uniformity (validation)"]["best"]
    assert uniformity["image uniformity"] == ["loss=clip"]  # -2 vs -0.375: lower is better
    assert "Modality gap (validation)" in report["tables"]
    assert report["tables"]["Modality gap (validation)"]["best"] == {}  # no better direction
    retrieval = report["tables"]["Retrieval recall"]
    assert retrieval["rows"]["loss=clip"]["flickr image→text R@5"]["mean"] == pytest.approx(0.5)
    assert retrieval["best"]["flickr text→image R@10"] == ["loss=clip", "loss=rankclip"]  # a tie shares the mark
    assert "Linear probe accuracy" not in report["tables"]  # no data: no table


def test_markdown_marks_best_and_states_epoch_and_std(study, tmp_path):
    written = write_report([study], tmp_path / "out")
    assert [p.name for p in written] == ["report.md", "report.json", "report.png"]
    text = (tmp_path / "out" / "report.md").read_text()
    assert "sample standard deviation (ddof=1)" in text
    assert "| loss=clip | 3 | 2 | 0.6000 ± 0.1000 | 0.8000 ± 0.1000 |" in text
    assert "| loss=rankclip | 2 | 2 | **0.8500 ± 0.0707** | **1.0000 ± 0.0000** |" in text
    assert "| configuration | loss | seeds | runs |" in text
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "out" / "report.json").read_text())["std"].startswith("sample")


def test_curves_are_mean_and_std_over_seeds_per_epoch(study):
    report, _ = build_report([study])
    curve = report["curves"]["loss=clip"]["zero-shot top-1 ImageNet1K"]
    assert curve["epochs"] == [0, 1, 2]
    assert curve["mean"] == pytest.approx([0.4, 0.5, 0.6]) and curve["std"] == pytest.approx([0.1] * 3)
    assert report["curves"]["loss=rankclip"]["validation contrastive loss"]["mean"] == pytest.approx(
        [0.575, 0.475, 0.375])


def test_at_best_takes_the_epoch_of_epoch_best(study):
    for run in study.iterdir():
        (run / "checkpoints").mkdir()
        torch.save({"epoch": 1}, run / "checkpoints" / "epoch.best.pt")
    report, _ = build_report([study], at="best")
    assert report["configurations"][0]["epochs"] == [1, 1, 1]
    assert report["tables"]["Zero-shot accuracy"]["rows"]["loss=clip"]["ImageNet1K top-1"]["mean"] == pytest.approx(0.5)


def bytes_read() -> int:
    """This process's bytes read through read() so far (/proc/self/io rchar)."""
    return int(dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())["rchar"])


def test_at_best_reads_the_epoch_without_reading_the_weights(study):
    """report --at best needs one integer of each run's epoch.best.pt: its tensors stay on disk (mmap)."""
    for run in study.iterdir():
        (run / "checkpoints").mkdir()
        torch.save({"epoch": 1, "state_dict": {"big": torch.ones(4 * 2**20)}}, run / "checkpoints" / "epoch.best.pt")
    before = bytes_read()
    report, _ = build_report([study], at="best")
    assert report["configurations"][0]["epochs"] == [1, 1, 1]
    assert bytes_read() - before < 2**20  # not the five 16 MiB files


def test_at_best_without_epoch_best_names_the_setting_that_chooses_it(study):
    warnings = []
    with pytest.raises(ReportError, match="no finished runs"):
        build_report([study], at="best", warn=warnings.append)
    assert all("no checkpoints/epoch.best.pt (written at each epoch that improves --best_metric" in w for w in warnings)
    assert len(warnings) == 5 and "--best_metric contrastive_loss" in warnings[0] and "--validation_data" not in warnings[0]


def test_how_a_run_saved_is_not_its_configuration(study):
    """A seed requeued with another save interval, retention or logging is still the same configuration."""
    bookkeeping = dict(save_every_minutes=10.0, save_every_steps=100, keep_checkpoints=1, log_every_n_steps=7,
                       best_metric="eval/ImageNet1K/zeroshot_top1", resume_allow_changes=True)
    write_run(study / "loss=clip_seed=3", records_for(0.6, 2.0), loss="clip", seed=3, **bookkeeping)
    report, _ = build_report([study])
    assert [c["label"] for c in report["configurations"]] == ["loss=clip", "loss=rankclip"]
    assert report["configurations"][0]["seeds"] == ["0", "1", "2", "3"] and report["differing_settings"] == ["loss"]


def test_a_resumed_runs_later_records_win(tmp_path):
    rows = records_for(0.2, 1.0) + [{"epoch": EPOCHS, "split": "eval", "eval_data_type": "ImageNet1K",
                                     "zeroshot_top1": 0.9, "zeroshot_top5": 1.0}]
    write_run(tmp_path / "a", rows, seed=0)
    report, _ = build_report([tmp_path / "a"])
    assert report["tables"]["Zero-shot accuracy"]["rows"]["loss=rankclip"]["ImageNet1K top-1"]["values"] == [0.9]


def test_mixed_models_are_refused_unless_allowed(study, capsys):
    write_run(study / "other_model", records_for(0.5, 1.0), model_name="tiny-rn", seed=5)
    with pytest.raises(ReportError, match=r"model_name \(tiny-vit in .*; tiny-rn in .*other_model\).*--allow_mixed"):
        build_report([study])
    assert main([str(study)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    report, _ = build_report([study], allow_mixed=True)
    assert report["differing_settings"] == ["loss", "model_name"]
    assert [c["label"] for c in report["configurations"]][-1] == "loss=rankclip, model_name=tiny-rn"


def test_missing_unfinished_and_repeated_runs_are_named_and_left_out(study, tmp_path):
    write_run(study / "half", records_for(0.5, 1.0, epochs=1), seed=7)  # results reach epoch 1 of 2
    write_run(study / "twin", records_for(0.1, 1.0), loss="clip", seed=0)  # same settings and seed as loss=clip_seed=0
    warnings = []
    report, _ = build_report([study, tmp_path / "nowhere"], warn=warnings.append)
    reasons = {item["run"]: item["reason"] for item in report["left_out"]}
    assert reasons[str(tmp_path / "nowhere")] == "no such folder"
    assert reasons[str(study / "half")] == "unfinished: results reach epoch 1 of 2"
    assert reasons[str(study / "twin")].startswith("same settings and seed as")
    assert len(warnings) == 3 and all("left out" in w for w in warnings)
    assert report["tables"]["Zero-shot accuracy"]["rows"]["loss=clip"]["ImageNet1K top-1"]["n"] == 3
    with pytest.raises(ReportError, match="no finished runs"):
        build_report([study / "half"], warn=warnings.append)
