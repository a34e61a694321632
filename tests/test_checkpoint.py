import errno
from pathlib import Path

import pytest
import torch

from rankclip.errors import CheckpointError
from rankclip.checkpoint import BestMetric, Checkpointer, TrainState, training_state
from rankclip.config import CheckpointsConfig, Config
from rankclip.runtime import Runtime
from rankclip.resume import check_resumed_config
from rankclip.weights import extract_state_dict, load_model_weights, read_checkpoint
from rankclip.logger import setup_console_logging


def linear_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2).state_dict()


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


@pytest.mark.parametrize("layout", [
    lambda w: {"epoch": 3, "state_dict": prefixed(w, "module."), "optimizer": {}},  # seed / CyCLIP / DDP runs
    lambda w: {"epoch": 3, "name": "run", "state_dict": prefixed(w, "module.")},  # open_clip's training
    lambda w: {"epoch": 1, "global_step": 10, "state_dict": prefixed(w, "model.")},  # Lightning
    lambda w: {"model": w},
    lambda w: w,  # a plain (OpenAI / open_clip layout) state dict
    lambda w: prefixed(prefixed(w, "_orig_mod."), "module."),  # compiled, then DDP-wrapped
], ids=["seed", "open_clip", "lightning", "model-key", "plain", "compiled-ddp"])
def test_foreign_checkpoints_import_strictly(tmp_path, layout):
    weights = linear_weights()
    path = tmp_path / "foreign.pt"
    torch.save(layout(weights), path)
    model = torch.nn.Linear(3, 2)
    load_model_weights(model, path)
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)


def test_safetensors_weights_import(tmp_path):
    from safetensors.torch import save_file

    weights = linear_weights()
    save_file(weights, str(tmp_path / "open_clip_model.safetensors"))
    model = torch.nn.Linear(3, 2)
    load_model_weights(model, tmp_path / "open_clip_model.safetensors")
    assert torch.equal(model.weight, weights["weight"])


def test_a_prefix_on_only_some_keys_is_kept():
    state = extract_state_dict({"module.visual.w": torch.ones(1), "logit_scale": torch.ones(1)})
    assert set(state) == {"module.visual.w", "logit_scale"}


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript_archive_is_refused_with_a_way_out(tmp_path):
    path = tmp_path / "ViT-B-32.pt"
    torch.jit.script(torch.nn.Linear(3, 2)).save(str(path))
    with pytest.raises(CheckpointError, match="TorchScript archive.*load_openai_model"):
        read_checkpoint(path)


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"module.weight": torch.zeros(3, 2), "module.extra": torch.zeros(1)}}, path)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match=r"missing \['bias'\] \(1\), unexpected \['extra'\] \(1\), "
                                          r"wrong shape \['weight \(3, 2\) vs \(2, 2\)'\]"):
        load_model_weights(model, path)


def test_pickled_code_is_not_loaded(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": Config()}, path)  # an arbitrary class needs full unpickling
    with pytest.raises(CheckpointError, match="weights-only"):
        read_checkpoint(path)


def checkpoint_state(epoch: int, model: torch.nn.Module, position=None, name: str = "run") -> dict:
    optimizer = torch.optim.AdamW(model.parameters())
    cfg = Config.from_dict({"name": name, "model_name": "tiny-vit"})
    record = {"name": name, "model_name": "tiny-vit", "config": cfg.to_dict()}
    return training_state(TrainState(model, model, optimizer, None, step=10 * epoch), epoch=epoch, position=position,
                          record=record, rank_states=[{"rng": {"torch": torch.get_rng_state()}}])


def checkpointer_in(run_dir: Path, **checkpoints) -> Checkpointer:
    """A one-process run's Checkpointer for `run_dir` (what it records is given with each write)."""
    return Checkpointer(CheckpointsConfig(**checkpoints), run_dir, Runtime(), record={})


def test_checkpointer_keeps_latest_and_best(tmp_path):
    model = torch.nn.Linear(2, 2)
    checkpointer = checkpointer_in(tmp_path)
    for epoch, loss in [(1, 2.0), (2, 1.0), (3, 1.5)]:
        with torch.no_grad():
            model.bias.fill_(epoch)
        checkpointer.write(checkpoint_state(epoch, model),
                          recorded={"validation/contrastive_loss": loss, "validation/loss": -epoch})
    checkpointer.wait()
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "epoch.best.pt", "epoch_1.pt", "epoch_2.pt", "epoch_3.pt", "epoch_latest.pt"]
    latest, best = read_checkpoint(folder / "epoch_latest.pt"), read_checkpoint(folder / "epoch.best.pt")
    assert (latest["epoch"], latest["step"], latest["state_dict"]["bias"][0].item()) == (3, 30, 3.0)
    assert (best["epoch"], best["best_metric"], best["best_value"]) == (2, "contrastive_loss", 1.0)
    assert latest["config"]["model_name"] == "tiny-vit" and latest["model_name"] == "tiny-vit"
    assert latest["world_size"] == 1 and set(latest["ranks"][0]["rng"]) == {"torch"}


def test_a_save_copies_the_state_before_training_goes_on(tmp_path):
    model = torch.nn.Linear(2, 2)
    checkpointer = checkpointer_in(tmp_path)
    with torch.no_grad():
        model.bias.fill_(1.0)
    checkpointer.write(checkpoint_state(0, model, position={"epoch": 1, "steps_done": 3, "seen": 96}))
    with torch.no_grad():
        model.bias.fill_(2.0)  # the next step, while the writer may still be busy
    checkpointer.wait()
    latest = read_checkpoint(tmp_path / "checkpoints" / "epoch_latest.pt")
    assert latest["state_dict"]["bias"].tolist() == [1.0, 1.0] and latest["position"]["steps_done"] == 3
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch_latest.pt"]


def test_keep_checkpoints_bounds_the_epoch_files(tmp_path):
    model = torch.nn.Linear(2, 2)
    checkpointer = checkpointer_in(tmp_path, keep_checkpoints=2)
    for epoch, loss in [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]:
        checkpointer.write(checkpoint_state(epoch, model), recorded={"validation/contrastive_loss": loss})
    checkpointer.wait()
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch.best.pt", "epoch_3.pt", "epoch_4.pt", "epoch_latest.pt"]
    assert read_checkpoint(folder / "epoch.best.pt")["epoch"] == 1  # best survives its epoch file


def test_a_full_disk_keeps_the_previous_checkpoint_and_warns(tmp_path, monkeypatch, capsys):
    setup_console_logging(0)
    model = torch.nn.Linear(2, 2)
    checkpointer = checkpointer_in(tmp_path)
    checkpointer.write(checkpoint_state(1, model), recorded={})
    checkpointer.wait()

    def disk_full(obj, f):
        f.write(b"part of a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    checkpointer.write(checkpoint_state(1, model, position={"epoch": 2, "steps_done": 1, "seen": 32}))
    checkpointer.wait()
    monkeypatch.undo()
    latest = read_checkpoint(tmp_path / "checkpoints" / "epoch_latest.pt")
    assert latest["epoch"] == 1 and latest["position"] is None
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_1.pt", "epoch_latest.pt"]
    warning = [line for line in capsys.readouterr().out.splitlines() if "not written" in line]
    assert len(warning) == 1 and "No space left on device" in warning[0] and "training continues" in warning[0]


def test_best_metric_knows_which_way_is_better():
    accuracy = BestMetric("eval/ImageNet1K/zeroshot_top1")
    assert accuracy.improved_by({"eval/ImageNet1K/zeroshot_top1": 0.2})
    assert not accuracy.improved_by({"eval/ImageNet1K/zeroshot_top1": 0.1})
    assert accuracy.improved_by({"eval/ImageNet1K/zeroshot_top1": 0.3}) and accuracy.value == 0.3
    loss = BestMetric("contrastive_loss")
    assert loss.improved_by({"validation/contrastive_loss": 2.0})
    assert not loss.improved_by({"validation/contrastive_loss": 2.5, "validation/loss": 0.1})
    assert not loss.improved_by({})  # nothing recorded (e.g. on other ranks)


def mid_epoch_checkpoint(**config) -> dict:
    saved = Config.from_dict(dict(name="run", train_data="train.csv", dataset_type="webdataset", train_num_samples=256,
                                  num_workers=2, **config))
    return {"config": saved.to_dict(), "epoch": 2, "world_size": 2, "position": {"epoch": 3, "steps_done": 4, "seen": 4}}


def test_a_mid_epoch_position_is_kept_only_where_it_stays_exact(tmp_path):
    cfg = Config.from_dict(dict(name="run", train_data="train.csv", dataset_type="webdataset", train_num_samples=256,
                                num_workers=2, resume_allow_changes=True)).to_dict()
    path = tmp_path / "checkpoints" / "epoch_latest.pt"
    check_resumed_config(mid_epoch_checkpoint(), path, cfg, world_size=2)  # same streams: fine
    with pytest.raises(CheckpointError, match=r"per \(process, data worker\): resume with 2 processes and "
                                          r"--num_workers 2, or resume from .*epoch_2.pt"):
        check_resumed_config(mid_epoch_checkpoint(), path, cfg, world_size=1)
    with pytest.raises(CheckpointError, match="inside epoch 3 and batch_size changed"):
        check_resumed_config(mid_epoch_checkpoint(batch_size=64), path, cfg, world_size=2)
    csv = Config.from_dict(dict(name="run", train_data="train.csv", dataset_type="csv", resume_allow_changes=True))
    csv_checkpoint = dict(mid_epoch_checkpoint(), config=csv.to_dict() | {"epochs": 10})
    check_resumed_config(csv_checkpoint, path, csv.to_dict(), world_size=1)  # CSV: any world size; the epochs may change


def test_an_epoch_saved_before_its_evaluation_continues_on_other_streams(tmp_path):
    """Stopped during the evaluation after epoch 3: nothing of the epoch is left to read, so another
    number of processes or data workers (a node lost while requeued) continues it."""
    cfg = Config.from_dict(dict(name="run", train_data="train.csv", dataset_type="webdataset", train_num_samples=256,
                                num_workers=2)).to_dict()
    trained = mid_epoch_checkpoint()
    trained["position"] |= {"steps_done": 8, "train": {"loss": 1.0}}
    check_resumed_config(trained, tmp_path / "checkpoints" / "epoch_latest.pt", cfg, world_size=1)
