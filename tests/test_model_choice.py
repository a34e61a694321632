"""Which model a run builds: the checkpoint's by default (recorded, or recognized for the original code's
checkpoints), a --model_name JSON file, an open_clip model folder (local-dir:, hf-hub: from the cache)."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from rankclip.config import Config, ModelConfig, default_num_workers, parse_config
from rankclip.errors import CheckpointError, ConfigError
from rankclip.export import export
from rankclip.main import main
from rankclip.models import build_model

from conftest import write_zeroshot_folder
from test_export import write_checkpoint

REPO = Path(__file__).resolve().parent.parent


def evaluation_flags(data: dict, logs: Path, name: str = "eval") -> list[str]:
    return ["--eval_data_type", "ImageNet1K", "--eval_test_data_dir", str(data["zeroshot"]), "--logs", str(logs),
            "--name", name, "--num_workers", "0", "--device", "cpu"]


def original_checkpoint(path: Path, open_clip_name: str, values: str = "zeros") -> Path:
    """A checkpoint in the original RankCLIP (CyCLIP) code's layout: epoch, name, a DDP ('module.') state dict of
    open_clip's model with OpenAI's layout, and the optimizer; no model name, no configuration. With `values`
    "zeros" the tensors share one zero (a small file; only the keys and shapes are real), else they are the
    random initial weights in fp16 (half the file)."""
    torch.manual_seed(0)
    state = open_clip.create_model(open_clip_name).state_dict()
    state = {k: torch.zeros((), dtype=v.dtype).expand(v.shape) if values == "zeros" else v.half()
             for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 64, "name": "cc3m", "state_dict": {f"module.{k}": v for k, v in state.items()},
                "optimizer": {"state": {}, "param_groups": []}}, path)
    return path


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("original")
    return {name: original_checkpoint(folder / f"{name}.pt", f"{name}-quickgelu") for name in ("RN50", "ViT-B-32")}


@pytest.mark.parametrize("model_name", ["tiny-vit", "tiny-rn"])
def test_the_checkpoints_model_is_the_default(tmp_path, colour_data, model_name):
    checkpoint, _ = write_checkpoint(tmp_path / "run", model_name)
    cfg = parse_config(["--checkpoint", str(checkpoint), *evaluation_flags(colour_data, tmp_path)])
    assert cfg.model.model_name == model_name
    resumed = parse_config(["--resume", str(checkpoint), "--train_data", str(colour_data["train"]), "--logs",
                            str(tmp_path), "--name", "continued"])
    assert resumed.model.model_name == model_name
    assert parse_config(["--checkpoint", str(checkpoint), "--model_name", model_name,
                         *evaluation_flags(colour_data, tmp_path)]).model.model_name == model_name


@pytest.mark.parametrize("name, original", [("RN50", "RN50"), ("ViT-B-32", "ViT-B/32")])
def test_the_original_codes_model_is_recognized_by_its_shapes(originals, tmp_path, colour_data, name, original):
    cfg = parse_config(["--checkpoint", str(originals[name]), *evaluation_flags(colour_data, tmp_path)])
    assert cfg.model.model_name == original
    assert cfg.run.name == "eval"
    spelled = parse_config(["--checkpoint", str(originals[name]), "--model_name", f"{name}-quickgelu",
                            *evaluation_flags(colour_data, tmp_path)])
    assert spelled.model.model_name == original  # open_clip's spelling of the same model


@pytest.mark.parametrize("checkpoint_model, given", [("tiny-vit", "tiny-rn"), ("RN50", "RN101"),
                                                     ("ViT-B-32", "ViT-B-32")])  # the last: GELU, not QuickGELU
def test_a_model_name_that_differs_is_refused_naming_both(originals, tmp_path, colour_data, checkpoint_model, given):
    checkpoint = originals.get(checkpoint_model) or write_checkpoint(tmp_path / "run", checkpoint_model)[0]
    with pytest.raises(ConfigError, match=f"--model_name {given} is not the model of checkpoint .*, "
                                          f"{checkpoint_model.replace('-B-', '-B/')}: leave --model_name out"):
        parse_config(["--checkpoint", str(checkpoint), "--model_name", given, *evaluation_flags(colour_data, tmp_path)])


def test_a_model_name_in_the_config_file_counts_as_given(tmp_path, colour_data):
    checkpoint, _ = write_checkpoint(tmp_path / "run", "tiny-vit")
    (tmp_path / "run.json").write_text(json.dumps({"model_name": "tiny-rn"}))
    with pytest.raises(ConfigError, match="--model_name tiny-rn is not the model"):
        parse_config(["--checkpoint", str(checkpoint), "--config", str(tmp_path / "run.json"),
                      *evaluation_flags(colour_data, tmp_path)])


def test_a_checkpoint_of_no_known_model_needs_model_name(tmp_path, colour_data):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": write_checkpoint(tmp_path / "run", "tiny-rn")[1].model.state_dict()}, path)
    with pytest.raises(CheckpointError, match="records no model and its weights are none of RN50, RN101, RN50x4, "
                                              "ViT-B/32: pass --model_name"):
        parse_config(["--checkpoint", str(path), *evaluation_flags(colour_data, tmp_path)])
    assert parse_config(["--checkpoint", str(path), "--model_name", "tiny-rn",
                         *evaluation_flags(colour_data, tmp_path)]).model.model_name == "tiny-rn"


@pytest.mark.e2e
def test_the_original_readme_command_evaluates_the_authors_vit_checkpoint(tmp_path, capsys):
    """`--checkpoint ckpts/epoch_64.pt --eval_data_type ... --eval_test_data_dir ...`, no --model_name, on a
    ViT-B/32 checkpoint of the original code's layout (random weights)."""
    checkpoint = original_checkpoint(tmp_path / "ckpts" / "epoch_64.pt", "ViT-B-32-quickgelu", values="random")
    zeroshot = write_zeroshot_folder(tmp_path, 8, seed=4)
    argv = ["--name", "eval_imagenet_1k", "--eval_data_type", "ImageNet1K", "--eval_test_data_dir", str(zeroshot),
            "--device_id", "0", "--checkpoint", str(checkpoint), "--logs", str(tmp_path / "logs"), "--device", "cpu"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "model_name: ViT-B/32" in (tmp_path / "logs" / "eval_imagenet_1k" / "params.txt").read_text()
    record = json.loads((tmp_path / "logs" / "eval_imagenet_1k" / "results.jsonl").read_text().splitlines()[0])
    assert record["epoch"] == 64 and record["num_classes"] == 4


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def measured(rows: list[dict]) -> list[dict]:
    """The records without their epoch (a folder carries none) and the full loss (its rank term is weighted by the
    epoch's rank weight)."""
    return [{k: v for k, v in r.items() if k not in ("epoch", "loss")} for r in rows]


@pytest.mark.e2e
def test_an_exported_folder_evaluates_and_trains_as_local_dir(tmp_path, colour_data):
    """The --model_name local-dir: round trip: the folder evaluates to the checkpoint's figures, and training
    starts from its weights (its epoch-0 evaluation is the same)."""
    checkpoint, _ = write_checkpoint(tmp_path / "run", "tiny-rn")
    out = export(checkpoint, tmp_path / "exported")
    validation = ["--validation_data", str(colour_data["validation"]), "--batch_size", "32"]
    assert main(["--checkpoint", str(checkpoint), *validation, *evaluation_flags(colour_data, tmp_path, "ckpt")]) == 0
    assert main(["--model_name", f"local-dir:{out}", *validation,
                 *evaluation_flags(colour_data, tmp_path, "folder")]) == 0
    assert measured(records(tmp_path / "folder")) == measured(records(tmp_path / "ckpt"))
    assert main(["--model_name", f"local-dir:{out}", "--train_data", str(colour_data["train"]), *validation,
                 "--epochs", "1", "--lr", "1e-3", *evaluation_flags(colour_data, tmp_path, "trained")]) == 0
    trained = records(tmp_path / "trained")
    assert measured([r for r in trained if r["epoch"] == 0]) == measured(records(tmp_path / "ckpt"))
    resumed = torch.load(tmp_path / "trained" / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert resumed["model_name"] == f"local-dir:{out}"


def test_a_missing_model_folder_is_one_line(tmp_path, colour_data):
    with pytest.raises(ConfigError, match="--model_name local-dir:.*nowhere: no open_clip model folder there"):
        build_model(ModelConfig(model_name=f"local-dir:{tmp_path / 'nowhere'}"))
    with pytest.raises(ConfigError, match="leave --pretrained out"):
        parse_config(["--model_name", f"local-dir:{tmp_path}", "--pretrained", str(colour_data["train"]),
                      *evaluation_flags(colour_data, tmp_path)])


def fill_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """`folder` as a downloaded snapshot of model repo `repo_id` in a Hugging Face hub cache (its layout:
    models--ORG--NAME/refs/main holding a commit, snapshots/<commit>/<files>)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


def test_hf_hub_names_load_from_the_local_cache_only(tmp_path, monkeypatch):
    from huggingface_hub import constants

    checkpoint, bundle = write_checkpoint(tmp_path / "run", "tiny-vit")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match="hf-hub:someone/tiny: not in the local Hugging Face cache; fetch it "
                                          "beforehand with hf download someone/tiny"):
        build_model(ModelConfig(model_name="hf-hub:someone/tiny"))
    fill_hub_cache(tmp_path / "hub", "someone/tiny", export(checkpoint, tmp_path / "exported"))
    loaded = build_model(ModelConfig(model_name="hf-hub:someone/tiny")).model
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in bundle.model.state_dict().items())


def custom_json(path: Path) -> dict:
    """An open_clip model JSON unknown to open_clip: tiny-vit with 64-wide embeddings."""
    content = json.loads((REPO / "configs" / "tiny-vit.json").read_text())
    content["embed_dim"] = 64
    path.write_text(json.dumps(content))
    return content


@pytest.mark.e2e
def test_a_model_json_is_built_and_recorded_so_that_the_file_may_move(tmp_path, colour_data):
    content = custom_json(tmp_path / "narrow-test-vit.json")
    cfg = parse_config(["--model_name", str(tmp_path / "narrow-test-vit.json"), "--train_data",
                        str(colour_data["train"]), "--logs", str(tmp_path)])
    assert cfg.model.model_cfg == content and cfg.run.name.endswith("-narrow-test-vit")
    bundle = build_model(cfg.model)
    assert bundle.model.text_projection.shape == (128, 64)
    checkpoint = tmp_path / "run" / "checkpoints" / "epoch_1.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"epoch": 1, "model_name": cfg.model.model_name, "config": cfg.to_dict(),
                "state_dict": bundle.model.state_dict()}, checkpoint)
    (tmp_path / "narrow-test-vit.json").unlink()
    evaluation = parse_config(["--checkpoint", str(checkpoint), *evaluation_flags(colour_data, tmp_path)])
    assert evaluation.model.model_cfg == content
    resumed = parse_config(["--model_name", cfg.model.model_name, "--resume", str(checkpoint), "--train_data",
                            str(colour_data["train"]), "--logs", str(tmp_path), "--name", "requeued"])
    assert resumed.model.model_cfg == content  # the same command as before the file moved
    with pytest.raises(ConfigError, match="is not the model of checkpoint"):
        parse_config(["--model_name", str(REPO / "configs" / "tiny-vit.json"), "--checkpoint", str(checkpoint),
                      *evaluation_flags(colour_data, tmp_path)])
    # A fresh process, where open_clip has not registered the architecture: it is rebuilt from the record.
    subprocess.run([sys.executable, "-m", "rankclip.export", str(checkpoint), str(tmp_path / "out")], check=True,
                   capture_output=True)
    assert json.loads((tmp_path / "out" / "open_clip_config.json").read_text())["model_cfg"] == content


@pytest.mark.parametrize("content, message", [
    ("{", "not valid JSON"),
    ('{"embed_dim": 64}', "not an open_clip model config (it needs embed_dim, vision_cfg, text_cfg"),
])
def test_a_bad_model_json_is_one_line(tmp_path, colour_data, content, message):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_config(["--model_name", str(tmp_path / "bad.json"), "--train_data", str(colour_data["train"])])
    with pytest.raises(ConfigError, match="no such file"):
        parse_config(["--model_name", str(tmp_path / "none.json"), "--train_data", str(colour_data["train"])])


def test_a_json_named_like_another_model_is_refused(tmp_path):
    content = custom_json(tmp_path / "tiny-rn.json")
    with pytest.raises(ConfigError, match="open_clip already has a model tiny-rn with another architecture"):
        build_model(ModelConfig(model_name=str(tmp_path / "tiny-rn.json"), model_cfg=content))


def test_building_without_weights_on_purpose_says_nothing_of_random_weights(caplog):
    with caplog.at_level(logging.INFO):
        build_model(ModelConfig(model_name="tiny-vit"))
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]


@pytest.mark.parametrize("cpus, local_processes, spawned, expected", [
    (2, None, None, 2), (64, None, None, 4), (8, "4", None, 2), (1, "2", None, 0), (6, None, 2, 3),
])
def test_the_default_num_workers_fits_the_cpus_this_process_may_use(monkeypatch, cpus, local_processes, spawned,
                                                                     expected):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus)))
    if local_processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_processes)
    assert default_num_workers(spawned) == expected


def test_the_default_num_workers_is_shared_among_distributed_processes(monkeypatch, colour_data):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(6)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    train = ["--train_data", str(colour_data["train"])]
    assert parse_config([*train, "--distributed", "--device_ids", "0", "1", "2"]).data.num_workers == 2
    assert parse_config([*train, "--num_workers", "5"]).data.num_workers == 5
    assert Config.from_dict({}).data.num_workers <= 4


def test_a_checkpoint_that_holds_code_is_one_line_at_start_up(tmp_path, colour_data, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": Config()}, path)  # a class: loading it needs full unpickling
    assert main(["--checkpoint", str(path), *evaluation_flags(colour_data, tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"rankclip: error: checkpoint {path} holds code (a pickled rankclip.config.Config) and is not "
                   f"loaded: only tensors and plain values are read; save the model's weights alone (its "
                   f"state_dict, or safetensors) and pass that file"]
