import json

import pytest

from rankclip.config import Config, ConfigError, parse_config


def test_demo_preset_applies_without_data_flags():
    cfg = parse_config([])
    assert cfg.demo
    assert cfg.model_name == "tiny-vit"
    assert cfg.train_data.endswith("train.csv") and cfg.eval_test_data_dir


def test_flags_beat_config_file_beat_defaults(tmp_path, colour_data):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"epochs": 7, "lr": 0.01, "device_ids": [0, 1]}))
    cfg = parse_config(["--train_data", str(colour_data["train"]), "--config", str(path), "--lr", "0.5"])
    assert not cfg.demo
    assert (cfg.epochs, cfg.lr, cfg.device_ids) == (7, 0.5, (0, 1))
    assert cfg.batch_size == Config.batch_size
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


def test_default_name_is_a_time_stamp_with_the_model(colour_data):
    cfg = parse_config(["--train_data", str(colour_data["train"]), "--model_name", "ViT-B/32"])
    assert cfg.name.endswith("-ViT-B-32") and "/" not in cfg.name
