"""End-to-end runs of `python -m rankclip.main` on tiny-vit and the colour fixture (in-process for speed)."""

import json
import shutil

import open_clip
import pytest
import torch

from rankclip.errors import ConfigError
from rankclip.weights import read_checkpoint
from rankclip.main import main
from rankclip.report import main as report_main

from conftest import write_zeroshot_folder

EPOCHS = 4


def flags(data, logs, name, *extra, evaluate=True):
    evaluation = ["--validation_data", str(data["validation"]), "--eval_data_type", "ImageNet1K",
                  "--eval_test_data_dir", str(data["zeroshot"])] if evaluate else []
    return ["--train_data", str(data["train"]), *evaluation,
            "--model_name", "tiny-vit", "--logs", str(logs), "--name", name, "--num_workers", "0",
            "--batch_size", "32", "--lr", "2e-3", "--num_warmup_steps", "4", "--epochs", str(EPOCHS),
            "--device", "cpu", "--loss", "clip", *extra]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(colour_data, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    assert main(flags(colour_data, logs, "trained", "--keep_checkpoints", "0")) == 0  # every epoch's checkpoint
    return logs / "trained"


@pytest.mark.e2e
def test_run_folder_has_the_contract_files(trained):
    assert {p.name for p in trained.iterdir()} >= {"output.log", "params.txt", "results.jsonl", "checkpoints"}
    names = {p.name for p in (trained / "checkpoints").iterdir()}
    assert names == {f"epoch_{e}.pt" for e in range(1, EPOCHS + 1)} | {"epoch_latest.pt", "epoch.best.pt"}
    assert "model_name: tiny-vit" in (trained / "params.txt").read_text()
    assert "samples/s" in (trained / "output.log").read_text()
    steps = [json.loads(line) for line in (trained / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == sorted({r["step"] for r in steps}) and steps[-1]["step"] == 8 * EPOCHS
    assert {"loss", "lr", "epoch"} <= set(steps[0])
    assert all(r["grad_norm"] > 0 for r in steps)  # logged at every logged step, also without --grad_clip_norm
    assert (trained / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.e2e
def test_results_cover_every_epoch_and_split(trained):
    rows = records(trained)
    assert {(r["epoch"], r["split"]) for r in rows} == (
        {(0, "validation"), (0, "eval")} | {(e, s) for e in range(1, EPOCHS + 1) for s in ("train", "validation", "eval")})
    train = [r for r in rows if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    assert train[-1]["lr"] == 0.0  # the cosine schedule ends exactly at zero
    assert all(r["skipped_samples"] == 0 for r in train)


@pytest.mark.e2e
def test_zero_shot_accuracy_rises_above_chance(trained):
    evals = [r for r in records(trained) if r["split"] == "eval"]
    assert evals[-1]["num_classes"] == 4 and evals[-1]["eval_data_type"] == "ImageNet1K"
    assert evals[-1]["zeroshot_top1"] >= 0.75, evals  # chance is 0.25
    assert evals[-1]["zeroshot_top1"] > evals[0]["zeroshot_top1"]
    assert evals[-1]["zeroshot_top3"] >= evals[-1]["zeroshot_top1"]
    assert evals[-1]["zeroshot_top10"] == 1.0  # k beyond the class count is capped


@pytest.mark.e2e
def test_checkpoint_loads_strictly_into_open_clip(trained):
    ckpt = read_checkpoint(trained / "checkpoints" / "epoch_latest.pt")
    assert ckpt["epoch"] == EPOCHS and ckpt["name"] == "trained" and ckpt["model_name"] == "tiny-vit"
    assert {"optimizer", "scaler", "step", "config", "world_size", "ranks", "best_metric", "best_value"} <= set(ckpt)
    model = open_clip.create_model("tiny-vit")
    model.load_state_dict(ckpt["state_dict"], strict=True)
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])


@pytest.mark.e2e
def test_resume_is_bit_exact(trained, colour_data, tmp_path):
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copy(trained / "checkpoints" / "epoch_2.pt", resumed / "epoch_latest.pt")
    assert main(flags(colour_data, tmp_path, "resumed", "--resume", "latest")) == 0
    straight = read_checkpoint(trained / "checkpoints" / f"epoch_{EPOCHS}.pt")
    again = read_checkpoint(resumed / f"epoch_{EPOCHS}.pt")
    assert again["step"] == straight["step"]
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, again["state_dict"][key]), key
    first, second = straight["optimizer"]["state"], again["optimizer"]["state"]
    assert all(torch.equal(first[i]["exp_avg_sq"], second[i]["exp_avg_sq"]) for i in first)
    assert [r["epoch"] for r in records(tmp_path / "resumed") if r["split"] == "train"] == [3, 4]


@pytest.mark.e2e
def test_evaluation_only_run_reproduces_the_training_eval(trained, colour_data, tmp_path):
    argv = ["--checkpoint", str(trained / "checkpoints" / "epoch_3.pt"), "--model_name", "tiny-vit",
            "--eval_data_type", "ImageNet1K", "--eval_test_data_dir", str(colour_data["zeroshot"]),
            "--logs", str(tmp_path), "--name", "eval", "--num_workers", "0", "--device", "cpu"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    during = next(r for r in records(trained) if r["split"] == "eval" and r["epoch"] == 3)
    assert result == [during]
    assert not (tmp_path / "eval" / "checkpoints").exists()


@pytest.mark.e2e
def test_evaluation_only_run_with_several_sets_retrieval_and_analysis(trained, colour_data, tmp_path):
    zeroshot = str(colour_data["zeroshot"])
    argv = ["--checkpoint", str(trained / "checkpoints" / f"epoch_{EPOCHS}.pt"), "--model_name", "tiny-vit",
            "--eval_data_type", "ImageNet1K", "CIFAR10", "--eval_test_data_dir", zeroshot, zeroshot,
            "--validation_data", str(colour_data["validation"]), "--retrieval_data", str(colour_data["validation"]),
            "--logs", str(tmp_path), "--name", "eval", "--num_workers", "0", "--device", "cpu", "--loss", "clip"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [(r["split"], r.get("eval_data_type")) for r in result] == [
        ("validation", None), ("eval", "ImageNet1K"), ("eval", "CIFAR10"), ("retrieval", None)]
    validation, first, second, retrieval = result
    assert first["zeroshot_top1"] == second["zeroshot_top1"] >= 0.75  # the same folder twice
    # Colour names are the only signal: same-colour rows rank alike, across and within modalities.
    assert validation["crossmodal_consistency"] > 0.3 and validation["inmodal_consistency"] > 0.3
    assert validation["modality_gap"] > 0 and validation["alignment"] < 2
    # 16 validation images share each colour (and often a caption), so R@10 is at most ~10/16; chance 10/64.
    assert retrieval["retrieval_data"] == "validation" and retrieval["num_images"] == retrieval["num_captions"] == 64
    assert retrieval["image_to_text_R@10"] > 0.3 and retrieval["text_to_image_R@10"] > 0.3
    assert retrieval["image_to_text_R@1"] <= retrieval["image_to_text_R@5"] <= retrieval["image_to_text_R@10"]


@pytest.mark.e2e
def test_retrieval_sets_with_the_same_file_name_keep_their_own_records_best_and_report(colour_data, tmp_path):
    """flickr30k/test.csv and mscoco/test.csv: two records per epoch, told apart by folder, in results.jsonl,
    --best_metric and the report (the first 32 and the last 32 validation rows, so their numbers differ)."""
    header, *rows = colour_data["validation"].read_text().splitlines()
    rows = [f"{colour_data['root'] / row.split(',')[0]},{row.split(',', 1)[1]}" for row in rows]
    sets = []
    for folder, part in (("flickr30k", rows[:32]), ("mscoco", rows[32:])):
        (tmp_path / folder).mkdir()
        sets.append(tmp_path / folder / "test.csv")
        sets[-1].write_text("\n".join([header, *part]) + "\n")
    argv = flags(colour_data, tmp_path, "two_tests", "--epochs", "2", "--retrieval_data", *map(str, sets),
                 "--best_metric", "retrieval/mscoco-test/text_to_image_R@1", evaluate=False)
    assert main(argv) == 0
    retrieval = [r for r in records(tmp_path / "two_tests") if r["split"] == "retrieval"]
    assert [(r["epoch"], r["retrieval_data"]) for r in retrieval] == [
        (e, name) for e in range(3) for name in ("flickr30k-test", "mscoco-test")]
    mscoco = {r["epoch"]: r["text_to_image_R@1"] for r in retrieval if r["retrieval_data"] == "mscoco-test"}
    best = read_checkpoint(tmp_path / "two_tests" / "checkpoints" / "epoch.best.pt")
    assert best["best_value"] == max(mscoco[1], mscoco[2]) and best["epoch"] == max((1, 2), key=mscoco.get)
    assert report_main([str(tmp_path / "two_tests"), "-o", str(tmp_path / "report")]) == 0
    table = json.loads((tmp_path / "report" / "report.json").read_text())["tables"]["Retrieval recall"]
    (row,) = table["rows"].values()
    for record in (r for r in retrieval if r["epoch"] == 2):
        for way, column in (("image_to_text", "image→text"), ("text_to_image", "text→image")):
            assert row[f"{record['retrieval_data']} {column} R@5"]["values"] == [record[f"{way}_R@5"]]
    assert "mscoco-test text→image R@1" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.e2e
def test_linear_probe_of_the_trained_features(trained, colour_data, tmp_path):
    train_split = write_zeroshot_folder(tmp_path / "probe_train", count=64, seed=11)
    argv = ["--checkpoint", str(trained / "checkpoints" / f"epoch_{EPOCHS}.pt"), "--model_name", "tiny-vit",
            "--eval_data_type", "CIFAR10", "--eval_test_data_dir", str(colour_data["zeroshot"]),
            "--eval_train_data_dir", str(train_split), "--linear_probe", "--linear_probe_num_epochs", "16",
            "--logs", str(tmp_path), "--name", "probe", "--num_workers", "0", "--device", "cpu"]
    assert main(argv) == 0
    (record,) = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert record["eval_data_type"] == "CIFAR10" and record["num_train_samples"] == 64
    assert record["linear_probe_top1"] >= 0.75  # chance is 0.25
    assert "zeroshot_top1" not in record


@pytest.mark.e2e
def test_caltech101_probe_is_tested_on_held_out_images_with_both_accuracies(trained, caltech101_root, tmp_path):
    """One torchvision Caltech101 root for both folders: the probe trains on 30 images per class and is
    tested on the other 17, and the record and the log say how they were drawn."""
    argv = ["--checkpoint", str(trained / "checkpoints" / f"epoch_{EPOCHS}.pt"), "--model_name", "tiny-vit",
            "--eval_data_type", "Caltech101", "--eval_test_data_dir", str(caltech101_root),
            "--eval_train_data_dir", str(caltech101_root), "--linear_probe", "--linear_probe_num_epochs", "4",
            "--logs", str(tmp_path), "--name", "caltech", "--num_workers", "0", "--device", "cpu"]
    assert main(argv) == 0
    (record,) = json.loads((tmp_path / "caltech" / "results.json").read_text())
    assert record["num_train_samples"] == 90 and record["num_samples"] == 17 and record["num_classes"] == 3
    assert 0 <= record["linear_probe_mean_per_class_top1"] <= 1 and 0 <= record["linear_probe_top1"] <= 1
    assert "30 images per class drawn with seed 0" in record["eval_split"]
    assert record["eval_split"] in (tmp_path / "caltech" / "output.log").read_text()


@pytest.mark.e2e
def test_training_from_webdataset_shards(colour_data, colour_shards, tmp_path, capsys):
    argv = flags(dict(colour_data, train=colour_shards), tmp_path, "shards", "--train_num_samples", "256")
    assert main(argv[:argv.index("--epochs") + 1] + ["2"] + argv[argv.index("--epochs") + 2:]) == 0
    rows = records(tmp_path / "shards")
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [8, 16] and "dataset_type: webdataset" in (
        tmp_path / "shards" / "params.txt").read_text()
    evals = [r["zeroshot_top1"] for r in rows if r["split"] == "eval"]
    assert evals[-1] > max(evals[0], 0.4)  # learning from the shards' captions; chance is 0.25
    assert main(flags(dict(colour_data, train=colour_shards), tmp_path, "no_count")) == 2
    assert "--train_num_samples is required with webdataset shards" in capsys.readouterr().err


@pytest.mark.e2e
def test_checkpoint_of_another_model_is_one_line(trained, tmp_path, capsys):
    argv = ["--checkpoint", str(trained / "checkpoints" / "epoch_1.pt"), "--model_name", "tiny-rn",
            "--logs", str(tmp_path), "--name", "wrong", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model_name tiny-rn is not the model of checkpoint" in err[0] and \
        "epoch_1.pt, tiny-vit: leave --model_name out to use the checkpoint's" in err[0]


@pytest.mark.e2e
def test_existing_run_is_not_overwritten(trained, colour_data, capsys):
    assert main(flags(colour_data, trained.parent, "trained")) == 2
    assert "already holds checkpoints; pass --resume latest" in capsys.readouterr().err
    evaluation = ["--checkpoint", str(trained / "checkpoints" / "epoch_1.pt"), "--model_name", "tiny-vit",
                  "--logs", str(trained.parent), "--name", "trained", "--device", "cpu"]
    assert main(evaluation) == 2
    assert "already holds a run's results; choose another --name" in capsys.readouterr().err


def test_unreadable_images_are_skipped_then_fatal_past_one_percent(colour_data, tmp_path, capsys):
    lines = colour_data["train"].read_text().splitlines()
    root = colour_data["root"]

    def write(name, broken):
        rows = [lines[0]] + [f"missing_{i}.png,a red square" if i % 10 == 9 and i < 10 * broken else line
                             for i, line in enumerate(lines[1:])]
        path = root / name
        path.write_text("\n".join(rows) + "\n")
        return path

    data = dict(colour_data, train=write("two_broken.csv", 2))
    assert main(flags(data, tmp_path, "skips", "--epochs", "1", evaluate=False)) == 0
    train = [r for r in records(tmp_path / "skips") if r["split"] == "train"]
    assert train[0]["skipped_samples"] == 2
    data = dict(colour_data, train=write("many_broken.csv", 20))
    assert main(flags(data, tmp_path, "fails", "--epochs", "1", evaluate=False)) == 2
    assert "training images cannot be read (over 1%), e.g." in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (["--image_key", "path"], "no column 'path' (columns: image, caption); set --image_key"),
    (["--model_name", "ViT-B-23"], "--model_name ViT-B-23: unknown model; did you mean"),
    (["--train_data", "/nonexistent/train.csv"], "--train_data /nonexistent/train.csv: no such file"),
    (["--batch_size", "1000"], "--batch_size 1000 is larger than the 256 training samples"),
    (["--delimiter", ";"], "pass --delimiter ','"),
])
def test_bad_input_is_one_clear_line(colour_data, tmp_path, capsys, change, message):
    assert main(flags(colour_data, tmp_path, "bad", *change)) == 2  # the last value of a flag wins
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_empty_csv_is_refused(colour_data, tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert main(flags(dict(colour_data, train=empty), tmp_path, "empty")) == 2
    assert "the file is empty" in capsys.readouterr().err


@pytest.mark.e2e
def test_pretrained_path_loads_a_local_file_and_openai_needs_the_cache(trained, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from rankclip.config import ModelConfig
    from rankclip.models import build_model

    weights = trained / "checkpoints" / "epoch_1.pt"
    bundle = build_model(ModelConfig(model_name="tiny-vit", pretrained=str(weights)))
    expected = read_checkpoint(weights)["state_dict"]
    assert all(torch.equal(v, expected[k]) for k, v in bundle.model.state_dict().items())
    with pytest.raises(ConfigError, match="OpenAI released no weights for tiny-vit"):
        build_model(ModelConfig(model_name="tiny-vit", pretrained="openai"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="which the cache .* does not hold; .*`hf download timm/resnet50_clip.openai"):
        build_model(ModelConfig(model_name="RN50", pretrained="openai"))


@pytest.mark.e2e
@pytest.mark.parametrize("objective", [
    ["--loss", "rankclip", "--lambda1", "0.1", "--rank_schedule", "constant"],
    ["--loss", "cyclip", "--cylambda1", "0.25", "--cylambda2", "0.25"],
    ["--loss", "rankclip", "--inmodal"],
])
def test_every_objective_trains_end_to_end(colour_data, tmp_path, objective):
    assert main(flags(colour_data, tmp_path, "objective", "--epochs", "1", *objective, evaluate=False)) == 0
    train = next(r for r in records(tmp_path / "objective") if r["split"] == "train")
    parts = {"rankclip": {"rank_loss", "inmodal_rank_loss", "crossmodal_rank_loss"},
             "cyclip": {"inmodal_cyclic_loss", "crossmodal_cyclic_loss"}}[objective[1]]
    assert parts | {"loss", "contrastive_loss"} <= set(train)
    assert all(train[k] > 0 for k in parts)


@pytest.mark.e2e
def test_wandb_logs_offline(colour_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    argv = flags(colour_data, tmp_path, "tracked", "--epochs", "1", "--wandb", "--resume", "auto", evaluate=False)
    assert main(argv) == 0
    runs = list((tmp_path / "tracked" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert main(argv) == 0  # a requeue continues the same W&B run (the folder keeps its id)
    run_id = (tmp_path / "tracked" / "wandb_run_id.txt").read_text().strip()
    runs = sorted((tmp_path / "tracked" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith(f"-{run_id}") for run in runs), runs


@pytest.fixture(scope="module")
def ranked(colour_data, tmp_path_factory):
    """3 epochs of the rankclip objective with the reference ramp (rank weight 0, 1.5, 2) and validation."""
    logs = tmp_path_factory.mktemp("ranked")
    argv = flags(colour_data, logs, "ranked", "--loss", "rankclip", "--epochs", "3")
    assert main(argv) == 0
    return logs / "ranked"


@pytest.mark.e2e
def test_best_checkpoint_is_chosen_by_the_contrastive_loss(ranked):
    validation = {r["epoch"]: r for r in records(ranked) if r["split"] == "validation" and r["epoch"] > 0}
    best_epoch = min(validation, key=lambda e: validation[e]["contrastive_loss"])
    assert best_epoch != min(validation, key=lambda e: validation[e]["loss"])  # the full loss would pick another
    best = read_checkpoint(ranked / "checkpoints" / "epoch.best.pt")
    assert best["epoch"] == best_epoch, validation
    assert best["best_metric"] == "contrastive_loss"
    assert best["best_value"] == validation[best_epoch]["contrastive_loss"]


@pytest.mark.e2e
def test_evaluation_only_takes_the_rank_weight_from_the_checkpoint(ranked, colour_data, tmp_path):
    argv = ["--checkpoint", str(ranked / "checkpoints" / "epoch_2.pt"), "--model_name", "tiny-vit",
            "--validation_data", str(colour_data["validation"]), "--loss", "rankclip", "--batch_size", "32", "--logs", str(tmp_path), "--name", "eval", "--num_workers", "0", "--device", "cpu"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    during = next(r for r in records(ranked) if r["split"] == "validation" and r["epoch"] == 2)
    assert result[0]["loss"] == pytest.approx(during["loss"], rel=1e-6)


@pytest.mark.e2e
def test_resume_refuses_changed_settings_naming_each(trained, colour_data, tmp_path, capsys):
    folder = tmp_path / "changed" / "checkpoints"
    folder.mkdir(parents=True)
    shutil.copy(trained / "checkpoints" / "epoch_2.pt", folder / "epoch_latest.pt")
    changed = flags(colour_data, tmp_path, "changed", "--resume", "latest", "--batch_size", "64", "--epochs", "5",
                    evaluate=False)
    assert main(changed) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "batch_size 32 -> 64, epochs 4 -> 5;" in err[0] and "--resume_allow_changes" in err[0]
    assert main(changed + ["--resume_allow_changes"]) == 0
    assert "--resume_allow_changes: continuing" in capsys.readouterr().out
    assert read_checkpoint(folder / "epoch_5.pt")["step"] == 2 * 8 + 3 * 4


@pytest.mark.e2e
def test_a_roll_back_continues_exactly_and_sets_the_abandoned_checkpoints_aside(trained, colour_data, tmp_path):
    """`--resume checkpoints/epoch_2.pt` in a run that reached epoch 4: epochs 3 and 4 are trained again (to
    the same weights), and the first continuation's files wait in checkpoints/abandoned/, out of retention's
    and --resume auto's way."""
    shutil.copytree(trained, tmp_path / "rolled")
    folder = tmp_path / "rolled" / "checkpoints"
    assert main(flags(colour_data, tmp_path, "rolled", "--resume", str(folder / "epoch_2.pt"),
                      "--keep_checkpoints", "2")) == 0
    [aside] = (folder / "abandoned").iterdir()
    assert {"epoch_3.pt", "epoch_4.pt", "epoch_latest.pt"} <= {p.name for p in aside.iterdir()}
    assert sorted(p.name for p in folder.glob("*.pt")) == ["epoch.best.pt", "epoch_3.pt", "epoch_4.pt",
                                                           "epoch_latest.pt"]
    best = read_checkpoint(folder / "epoch.best.pt")
    assert best["epoch"] in (2, 3, 4) and (best["epoch"] == 2 or (folder / f"epoch_{best['epoch']}.pt").samefile(
        folder / "epoch.best.pt"))
    straight = read_checkpoint(trained / "checkpoints" / "epoch_4.pt")["state_dict"]
    again = read_checkpoint(folder / "epoch_4.pt")["state_dict"]
    assert all(torch.equal(value, again[key]) for key, value in straight.items())
    assert [r["epoch"] for r in records(tmp_path / "rolled") if r["split"] == "train"] == [1, 2, 3, 4]


def run_folder_with(tmp_path, name, files: dict):
    folder = tmp_path / name / "checkpoints"
    folder.mkdir(parents=True)
    for filename, content in files.items():
        (folder / filename).write_bytes(content)
    return folder

@pytest.mark.e2e

@pytest.mark.parametrize("latest", ["truncated", "foreign"])
def test_a_broken_epoch_latest_points_at_the_epoch_checkpoint(trained, colour_data, tmp_path, capsys, latest):
    epoch_2 = (trained / "checkpoints" / "epoch_2.pt").read_bytes()
    if latest == "truncated":
        content = epoch_2[:len(epoch_2) // 2]
    else:
        path = tmp_path / "seed.pt"
        torch.save({"epoch": 2, "state_dict": read_checkpoint(trained / "checkpoints" / "epoch_2.pt")["state_dict"]},
                   path)
        content = path.read_bytes()
    folder = run_folder_with(tmp_path, "broken", {"epoch_1.pt": b"", "epoch_2.pt": epoch_2, "epoch_latest.pt": content})
    assert main(flags(colour_data, tmp_path, "broken", "--resume", "auto", evaluate=False)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(f"continue from the last epoch checkpoint with --resume {folder}/epoch_2.pt")


@pytest.mark.e2e
def test_a_checkpoint_of_another_run_is_refused_naming_the_differences(trained, colour_data, tmp_path, capsys):
    """(Another model is refused before, naming both: tests/test_model_choice.py.)"""
    other = flags(dict(colour_data, train=colour_data["validation"]), tmp_path, "other", "--batch_size", "16",
                  "--resume", str(trained / "checkpoints" / "epoch_2.pt"), evaluate=False)
    assert main(other) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "validation.csv" in err[0] and "batch_size 32 -> 16" in err[0]


def test_a_full_disk_during_step_saves_warns_and_the_run_goes_on(colour_data, tmp_path, monkeypatch, capsys):
    save = torch.save

    def no_space_mid_epoch(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("position"):
            f.write(b"half")
            raise OSError(28, "No space left on device")
        save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", no_space_mid_epoch)
    assert main(flags(colour_data, tmp_path, "full", "--epochs", "1", "--save_every_steps", "3", evaluate=False)) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if "not written (" in line]
    assert len(warnings) == 2 and all("No space left on device" in w for w in warnings)  # steps 3, 6 (fewer than 3 in a row)
    folder = tmp_path / "full" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_1.pt", "epoch_latest.pt"]
    assert read_checkpoint(folder / "epoch_latest.pt")["step"] == 8


def test_resume_auto_without_epoch_latest_but_with_epoch_files_is_refused(colour_data, tmp_path, capsys):
    folder = run_folder_with(tmp_path, "orphans", {"epoch_1.pt": b"x"})
    assert main(flags(colour_data, tmp_path, "orphans", "--resume", "auto", evaluate=False)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"it has no epoch_latest.pt: pass --resume {folder}/epoch_<N>.pt" in err[0]
