import json
import re

import pytest

from rankclip.errors import ConfigError
from rankclip.config import Config, higher_is_better, parse_config


def test_demo_preset_applies_without_data_flags():
    cfg = parse_config([])
    assert cfg.run.demo
    assert cfg.model.model_name == "tiny-vit"
    assert cfg.data.train_data.endswith("train.csv") and cfg.evaluation.eval_test_data_dir


def test_flags_beat_config_file_beat_defaults(tmp_path, colour_data):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"epochs": 7, "lr": 0.01, "device_ids": [0, 1]}))
    cfg = parse_config(["--train_data", str(colour_data["train"]), "--config", str(path), "--lr", "0.5"])
    assert not cfg.run.demo
    assert (cfg.training.epochs, cfg.optim.lr, cfg.launch.device_ids) == (7, 0.5, (0, 1))
    assert cfg.training.batch_size == Config().training.batch_size
    assert cfg.to_dict()["device_ids"] == [0, 1]


@pytest.mark.parametrize("content, message", [
    ('{"epoch": 3}', "unknown keys ['epoch']"),
    ("epochs: 3", "not valid JSON"),
    ("[1, 2]", "JSON object"),
])
def test_bad_config_file(tmp_path, colour_data, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(["--train_data", str(colour_data["train"]), "--config", str(path)])


@pytest.mark.parametrize("argv, message", [
    (["--train_data", "nope.csv"], "--train_data nope.csv: no such file"),
    (["--resume", "latest"], "needs the --name"),
    (["--checkpoint", "x.pt"], "--checkpoint x.pt: no such file"),
    (["--eval_test_data_dir", "/nonexistent"], "no such folder"),
])
def test_bad_values_name_the_flag(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv)


def test_negative_and_zero_values_are_refused(colour_data):
    with pytest.raises(ConfigError, match="--batch_size must be positive"):
        parse_config(["--train_data", str(colour_data["train"]), "--batch_size", "0"])
    with pytest.raises(ConfigError, match="--lambda1 must not be negative"):
        parse_config(["--train_data", str(colour_data["train"]), "--lambda1", "-1"])


def test_several_eval_sets_pair_with_their_folders(colour_data):
    folder = str(colour_data["zeroshot"])
    cfg = parse_config(["--train_data", str(colour_data["train"]), "--eval_data_type", "ImageNet1K", "CIFAR10",
                        "--eval_test_data_dir", folder, folder])
    assert cfg.evaluation.eval_data_type == ("ImageNet1K", "CIFAR10") and cfg.evaluation.eval_test_data_dir == (folder, folder)
    assert cfg.to_dict()["eval_data_type"] == ["ImageNet1K", "CIFAR10"]


@pytest.mark.parametrize("extra, message", [
    (["--eval_data_type", "ImageNet1K", "CIFAR10", "--eval_test_data_dir", "{zs}"],
     "--eval_data_type names 2 sets but --eval_test_data_dir gives 1 folders"),
    (["--eval_data_type", "CIFAR10", "--eval_test_data_dir", "{zs}", "--linear_probe"],
     "--linear_probe needs one --eval_train_data_dir per --eval_data_type (1), got 0"),
    (["--retrieval_data", "/nonexistent.csv"], "--retrieval_data /nonexistent.csv: no such file"),
    (["--eval_data_type", "CIFAR10", "--eval_test_data_dir", "/nonexistent"], "--eval_test_data_dir /nonexistent: no such folder"),
    (["--linear_probe_num_epochs", "0"], "--linear_probe_num_epochs must be positive"),
    (["--best_metric", "eval/CIFAR10/zeroshot_top1"], "this run evaluates no eval set 'CIFAR10' (it has none)"),
    (["--best_metric", "eval/ImageNet1K/zeroshot_top1", "--eval_data_type", "CIFAR10", "--eval_test_data_dir",
      "{zs}"], "no eval set 'ImageNet1K' (it has CIFAR10)"),
    (["--best_metric", "loss"], "--best_metric loss is a validation quantity: pass --validation_data"),
    (["--best_metric", "speed"], "--best_metric speed: unknown quantity"),
    (["--best_metric", "eval/zeroshot_top1"], "write KEY (validation), eval/<set>/KEY"),
    (["--train_num_samples", "100"], "--train_num_samples sets the epoch length of webdataset shards"),
])
def test_bad_evaluation_flags(colour_data, extra, message):
    argv = ["--train_data", str(colour_data["train"])] + [a.format(zs=colour_data["zeroshot"]) for a in extra]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(argv)


def test_retrieval_sets_with_the_same_file_name_are_told_apart_by_their_folders(tmp_path):
    paths = [tmp_path / "flickr30k" / "test.csv", tmp_path / "mscoco" / "test.csv", tmp_path / "val.csv",
             tmp_path / "a" / "x" / "val2.csv", tmp_path / "b" / "x" / "val2.csv"]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("image,caption\n")
    cfg = parse_config(["--pretrained", "--retrieval_data", *map(str, paths),
                        "--best_metric", "retrieval/mscoco-test/image_to_text_R@1"])
    assert cfg.evaluation.retrieval_names == ["flickr30k-test", "mscoco-test", "val", "a-x-val2", "b-x-val2"]
    with pytest.raises(ConfigError, match="this run evaluates no retrieval set 'test'"):
        parse_config(["--pretrained", "--retrieval_data", *map(str, paths[:2]),
                      "--best_metric", "retrieval/test/image_to_text_R@1"])
    with pytest.raises(ConfigError, match=f"--retrieval_data {paths[2]} is given twice; give each retrieval set once"):
        parse_config(["--pretrained", "--retrieval_data", str(paths[2]), str(paths[0]), str(paths[2])])


def test_a_config_file_with_data_is_not_the_demo(tmp_path, colour_data):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"train_data": str(colour_data["train"]), "model_name": "RN50"}))
    cfg = parse_config(["--config", str(path)])
    assert not cfg.run.demo and cfg.data.validation_data is None and cfg.evaluation.eval_test_data_dir is None
    assert (cfg.training.epochs, cfg.optim.lr, cfg.launch.device) == (Config().training.epochs, Config().optim.lr, Config().launch.device)


def test_evaluating_pretrained_weights_is_not_the_demo(colour_data):
    cfg = parse_config(["--pretrained", "--retrieval_data", str(colour_data["validation"])])
    assert not cfg.run.demo and cfg.data.train_data is None and cfg.model.pretrained == "openai"


@pytest.mark.parametrize("values, message", [
    ({"precision": "fp16"}, "--precision 'fp16': choose one of amp, amp_bf16, fp32"),
    ({"loss": "infonce"}, "--loss 'infonce': choose one of"),
    ({"eval_data_type": ["ImageNet"], "eval_test_data_dir": ["{zs}"]}, "--eval_data_type ImageNet: unknown set; name one of Caltech101"),
])
def test_config_file_values_are_checked_like_flags(tmp_path, colour_data, values, message):
    path = tmp_path / "run.json"
    values = {k: [x.format(zs=colour_data["zeroshot"]) for x in v] if isinstance(v, list) else v
              for k, v in values.items()}
    path.write_text(json.dumps({"train_data": str(colour_data["train"]), **values}))
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(["--config", str(path)])


def test_resume_needs_the_training_data():
    with pytest.raises(ConfigError, match="--resume continues training: pass the run's --train_data too"):
        parse_config(["--resume", "latest", "--name", "x", "--model_name", "tiny-vit"])


def test_default_name_is_a_time_stamp_with_the_model(colour_data):
    cfg = parse_config(["--train_data", str(colour_data["train"]), "--model_name", "ViT-B/32"])
    assert cfg.run.name.endswith("-ViT-B-32") and "/" not in cfg.run.name


def test_best_metric_names_and_directions(colour_data):
    argv = ["--train_data", str(colour_data["train"]), "--eval_data_type", "ImageNet1K", "--eval_test_data_dir",
            str(colour_data["zeroshot"]), "--best_metric", "eval/ImageNet1K/zeroshot_top1"]
    assert parse_config(argv).checkpoints.best_metric == "eval/ImageNet1K/zeroshot_top1"
    assert parse_config(["--train_data", str(colour_data["train"])]).checkpoints.best_metric == "contrastive_loss"
    assert higher_is_better("eval/ImageNet1K/zeroshot_top1") and higher_is_better("retrieval/val/text_to_image_R@5")
    assert not higher_is_better("contrastive_loss") and not higher_is_better("validation/image_uniformity")


@pytest.mark.parametrize("mode", ["auto", "latest"])
def test_resume_of_this_run_needs_its_name(colour_data, mode):
    with pytest.raises(ConfigError, match=f"--resume {mode} needs the --name of the run to continue"):
        parse_config(["--train_data", str(colour_data["train"]), "--resume", mode])


def test_step_checkpoint_flags(colour_data):
    cfg = parse_config(["--train_data", str(colour_data["train"]), "--save_every_steps", "5", "--keep_checkpoints", "2"])
    assert (cfg.checkpoints.save_every_steps, cfg.checkpoints.keep_checkpoints, cfg.checkpoints.save_every_minutes) == (5, 2, None)
    assert parse_config(["--train_data", str(colour_data["train"])]).checkpoints.keep_checkpoints == 3
    assert parse_config(["--train_data", str(colour_data["train"]), "--keep_checkpoints", "0"]).checkpoints.keep_checkpoints == 0
    with pytest.raises(ConfigError, match="--keep_checkpoints must not be negative"):
        parse_config(["--train_data", str(colour_data["train"]), "--keep_checkpoints", "-1"])
    with pytest.raises(ConfigError, match="--save_every_minutes must not be negative"):
        parse_config(["--train_data", str(colour_data["train"]), "--save_every_minutes", "-1"])
