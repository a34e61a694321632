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
    """One line that says so, without torch's advice to load it with weights_only=False (#21)."""
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": Config()}, path)  # an arbitrary class needs full unpickling
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and "weights_only=False" not in message
    assert f"checkpoint {path} holds code (a pickled rankclip.config.Config) and is not loaded" in message


def test_a_damaged_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"state_dict": linear_weights()}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    assert str(error.value) == (f"checkpoint {path}: damaged or not a torch file (PytorchStreamReader failed reading "
                                f"zip archive: failed finding central directory.)")


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
    accuracy = BestMetric("eval/ImageNet1K/zeroshot_top1", value=0.2)
    assert accuracy.beaten_by({"eval/ImageNet1K/zeroshot_top1": 0.3}) == 0.3
    assert accuracy.beaten_by({"eval/ImageNet1K/zeroshot_top1": 0.1}) is None
    assert accuracy.value == 0.2  # it moves only when the best checkpoint is written
    loss = BestMetric("contrastive_loss")
    assert loss.beaten_by({"validation/contrastive_loss": 2.0}) == 2.0
    loss.value = 2.0
    assert loss.beaten_by({"validation/contrastive_loss": 2.5, "validation/loss": 0.1}) is None
    assert loss.beaten_by({}) is None  # nothing recorded (e.g. on other ranks)


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


def write_epochs(checkpointer: Checkpointer, model: torch.nn.Module, losses: dict[int, float]) -> None:
    for epoch, loss in losses.items():
        checkpointer.write(checkpoint_state(epoch, model), recorded={"validation/contrastive_loss": loss})
    checkpointer.wait()


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def test_a_roll_back_sets_the_abandoned_epochs_aside_and_retention_keeps_the_new_ones(tmp_path):
    """Epochs 1-7 with --keep_checkpoints 3 (kept 5, 6, 7; best 3), then `--resume checkpoints/epoch.best.pt`:
    the re-trained epoch 4 is kept, the abandoned 5-7 (and the old latest) are moved aside."""
    setup_console_logging(0)
    model, folder = torch.nn.Linear(2, 2), tmp_path / "checkpoints"
    write_epochs(checkpointer_in(tmp_path, keep_checkpoints=3), model, {1: 5.0, 2: 4.0, 3: 1.0, 4: 3.0, 5: 2.0,
                                                                        6: 2.5, 7: 3.0})
    assert names(folder) == ["epoch.best.pt", "epoch_5.pt", "epoch_6.pt", "epoch_7.pt", "epoch_latest.pt"]
    resumed = checkpointer_in(tmp_path, keep_checkpoints=3)
    resumed.restore(read_checkpoint(folder / "epoch.best.pt"), folder / "epoch.best.pt")
    assert names(folder) == ["epoch.best.pt", "epoch_latest.pt"]  # latest is the resumed state until the next save
    assert read_checkpoint(folder / "epoch_latest.pt")["epoch"] == 3
    [aside] = (folder / "abandoned").iterdir()
    assert names(aside) == ["epoch_5.pt", "epoch_6.pt", "epoch_7.pt", "epoch_latest.pt"]
    write_epochs(resumed, model, {4: 1.5})
    assert names(folder) == ["epoch.best.pt", "epoch_4.pt", "epoch_latest.pt"]
    assert read_checkpoint(folder / "epoch.best.pt")["epoch"] == 3 and resumed.best.value == 1.0


def test_after_a_roll_back_best_never_points_at_an_abandoned_epoch(tmp_path):
    model, folder = torch.nn.Linear(2, 2), tmp_path / "checkpoints"
    write_epochs(checkpointer_in(tmp_path, keep_checkpoints=3), model, {1: 5.0, 2: 4.0, 3: 3.0, 4: 3.5, 5: 2.0,
                                                                        6: 1.0, 7: 3.0})
    resumed = checkpointer_in(tmp_path, keep_checkpoints=3)
    resumed.restore(read_checkpoint(folder / "epoch_5.pt"), folder / "epoch_5.pt")
    assert names(folder) == ["epoch.best.pt", "epoch_5.pt", "epoch_latest.pt"]
    assert read_checkpoint(folder / "epoch.best.pt")["epoch"] == 5 and resumed.best.value == 2.0
    write_epochs(resumed, model, {6: 2.5})
    assert read_checkpoint(folder / "epoch.best.pt")["epoch"] == 5


def fail_saves(monkeypatch) -> None:
    def disk_full(obj, f, *args, **kwargs):
        f.write(b"part of a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)


def test_the_best_value_advances_only_with_a_written_best_checkpoint(tmp_path, monkeypatch):
    setup_console_logging(0)
    model, checkpointer = torch.nn.Linear(2, 2), checkpointer_in(tmp_path)
    write_epochs(checkpointer, model, {1: 2.0})
    with monkeypatch.context() as patch:
        fail_saves(patch)
        write_epochs(checkpointer, model, {2: 1.0})  # the best so far, but not on disk
    assert checkpointer.best.value == 2.0
    write_epochs(checkpointer, model, {3: 1.5})
    best = read_checkpoint(tmp_path / "checkpoints" / "epoch.best.pt")
    assert (best["epoch"], best["best_value"], checkpointer.best.value) == (3, 1.5, 1.5)


def test_failed_writes_in_a_row_stop_the_run_with_one_clear_line(tmp_path, monkeypatch):
    setup_console_logging(0)
    model, checkpointer = torch.nn.Linear(2, 2), checkpointer_in(tmp_path)
    fail_saves(monkeypatch)
    for step in (1, 2, 3):
        checkpointer.write(checkpoint_state(0, model, position={"epoch": 1, "steps_done": step, "seen": 32 * step}))
    with pytest.raises(CheckpointError, match=r"3 checkpoint writes in a row failed .*No space left on device.*"
                                              r"--resume auto"):
        checkpointer.write(checkpoint_state(0, model, position={"epoch": 1, "steps_done": 4, "seen": 128}))


def test_a_run_never_ends_as_saved_when_its_last_write_failed(tmp_path, monkeypatch):
    setup_console_logging(0)
    model, checkpointer = torch.nn.Linear(2, 2), checkpointer_in(tmp_path)
    write_epochs(checkpointer, model, {1: 2.0})
    checkpointer.finish()  # written: fine
    fail_saves(monkeypatch)
    checkpointer.write(checkpoint_state(1, model, position={"epoch": 2, "steps_done": 1, "seen": 32}))
    with pytest.raises(CheckpointError, match="step 10 checkpoint not written .*No space left on device"):
        checkpointer.finish()


def test_a_stop_whose_save_failed_does_not_exit_as_saved(colour_data, tmp_path, monkeypatch, capsys):
    """SIGUSR1, then the stop's checkpoint cannot be written: no 'after saving a checkpoint', no exit 75."""
    import os
    import signal

    from rankclip.main import main
    from rankclip.train import Trainer

    fail_saves(monkeypatch)
    forward_backward = Trainer.forward_backward

    def signalled(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)
        return forward_backward(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "forward_backward", signalled)
    argv = ["--train_data", str(colour_data["train"]), "--model_name", "tiny-vit", "--logs", str(tmp_path),
            "--name", "full", "--num_workers", "0", "--batch_size", "64", "--epochs", "1", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "after saving a checkpoint" not in err and "rankclip: error: " in err and "not written" in err, err


def test_leftovers_of_killed_writes_are_removed_at_the_next_start(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    leftovers = [folder / ".epoch_latest.pt.tmp4242", folder / ".epoch_3.pt.tmp17"]
    for path in leftovers + [folder / "epoch_2.pt"]:
        path.write_bytes(b"x")
    Checkpointer(CheckpointsConfig(), tmp_path, Runtime(rank=1, world_size=2), record={})
    assert all(path.exists() for path in leftovers)  # only rank 0 touches the folder
    checkpointer_in(tmp_path)
    assert names(folder) == ["epoch_2.pt"]


def test_default_retention_keeps_the_three_newest_epochs_and_zero_keeps_all(tmp_path):
    model = torch.nn.Linear(2, 2)
    write_epochs(checkpointer_in(tmp_path / "default"), model, {e: 1.0 / e for e in range(1, 6)})
    assert names(tmp_path / "default" / "checkpoints") == [
        "epoch.best.pt", "epoch_3.pt", "epoch_4.pt", "epoch_5.pt", "epoch_latest.pt"]
    write_epochs(checkpointer_in(tmp_path / "all", keep_checkpoints=0), model, {e: 1.0 / e for e in range(1, 6)})
    assert len(names(tmp_path / "all" / "checkpoints")) == 7


def test_the_resumed_checkpoint_is_released_before_training(colour_data, tmp_path, monkeypatch):
    """Every tensor of the checkpoint dict a run resumed from (weights, Adam moments, each rank's RNG
    state) is freed once restored: only what was copied into the model and optimizer stays."""
    import gc
    import weakref

    import rankclip.resume
    from rankclip.main import main
    from rankclip.train import Trainer

    argv = ["--train_data", str(colour_data["train"]), "--model_name", "tiny-vit", "--logs", str(tmp_path),
            "--name", "run", "--num_workers", "0", "--batch_size", "64", "--epochs", "1", "--device", "cpu"]
    assert main(argv) == 0
    loaded, alive_in_fit = [], []

    def read_and_watch(path):
        obj = read_checkpoint(path)
        stack = [obj]
        while stack:
            value = stack.pop()
            if isinstance(value, torch.Tensor):
                loaded.append(weakref.ref(value))
            elif isinstance(value, dict):
                stack.extend(value.values())
            elif isinstance(value, (list, tuple)):
                stack.extend(value)
        return obj

    def fit(self, resume):
        gc.collect()
        alive_in_fit.append(sum(ref() is not None for ref in loaded))

    monkeypatch.setattr(rankclip.resume, "read_checkpoint", read_and_watch)
    monkeypatch.setattr(Trainer, "fit", fit)
    assert main(argv + ["--resume", "latest"]) == 0
    assert len(loaded) > 50 and alive_in_fit == [0]


def test_a_resume_keeps_the_lr_schedule_and_reads_older_checkpoints_as_cosine(tmp_path):
    """--lr_scheduler and --epochs_cooldown place the schedule: changing them needs --resume_allow_changes; a
    checkpoint written before they existed has the cosine schedule, today's default."""
    path = tmp_path / "checkpoints" / "epoch_latest.pt"
    settings = dict(name="run", train_data="train.csv", dataset_type="csv")
    cosine = Config.from_dict(settings).to_dict()
    older = {"config": {k: v for k, v in cosine.items() if k not in ("lr_scheduler", "epochs_cooldown")}, "epoch": 1}
    check_resumed_config(older, path, cosine, world_size=1)
    cooldown = Config.from_dict(settings | {"lr_scheduler": "const-cooldown", "epochs_cooldown": 2}).to_dict()
    with pytest.raises(CheckpointError, match="lr_scheduler 'cosine' -> 'const-cooldown', epochs_cooldown None -> 2"
                                              ".*--resume_allow_changes"):
        check_resumed_config(older, path, cooldown, world_size=1)
    check_resumed_config(older, path, cooldown | {"resume_allow_changes": True}, world_size=1)


def test_an_epoch_saved_before_its_evaluation_continues_on_other_streams(tmp_path):
    """Stopped during the evaluation after epoch 3: nothing of the epoch is left to read, so another
    number of processes or data workers (a node lost while requeued) continues it."""
    cfg = Config.from_dict(dict(name="run", train_data="train.csv", dataset_type="webdataset", train_num_samples=256,
                                num_workers=2)).to_dict()
    trained = mid_epoch_checkpoint()
    trained["position"] |= {"steps_done": 8, "train": {"loss": 1.0}}
    check_resumed_config(trained, tmp_path / "checkpoints" / "epoch_latest.pt", cfg, world_size=1)
