"""Locked towers (--lock_image, --lock_text) through open_clip's lock_image_tower / lock_text_tower: no gradient,
no optimizer state, no weight decay; bit-identical through training, a mid-epoch resume and two processes."""

from __future__ import annotations

import os
import signal
import subprocess

import open_clip
import pytest
import torch

from rankclip.accumulate import cached_gradient_step
from rankclip.config import Config, ModelConfig, ObjectiveConfig, OptimConfig, parse_config
from rankclip.errors import CheckpointError, ConfigError
from rankclip.losses import build_loss
from rankclip.main import main
from rankclip.models import build_model
from rankclip.optim import build_optimizer
from rankclip.resume import check_resumed_config
from rankclip.savepoints import EXIT_PREEMPTED, SavePoints
from rankclip.train import encode_batch
from rankclip.weights import load_weights, read_checkpoint

from test_distributed import command, relative_difference, run, signal_through_the_save, start_and_wait_for_step


def image_tower(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("visual.")}


def assert_tower_unchanged(expected: dict, got: dict) -> None:
    tower = image_tower(expected)
    assert tower and all(torch.equal(v, got[k]) for k, v in tower.items()), [
        k for k, v in tower.items() if not torch.equal(v, got[k])][:3]


def assert_text_trained(start: dict, got: dict) -> None:
    assert not torch.equal(start["text_projection"], got["text_projection"])
    assert not torch.equal(start["transformer.resblocks.0.attn.in_proj_weight"],
                           got["transformer.resblocks.0.attn.in_proj_weight"])


def batch(n: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 32, 32, generator=generator),
            "text": torch.randint(1, 49407, (n, 32), generator=generator)}


def test_locked_parameters_get_no_gradient_no_optimizer_state_and_no_weight_decay():
    model = build_model(ModelConfig(model_name="tiny-vit", lock_image=True, lock_image_unlocked_groups=1)).model
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1))
    trains = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trains == {n for n, _ in model.named_parameters() if not n.startswith("visual.")} | {"visual.proj"}
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for name, p in model.named_parameters() if name in trains}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    features = encode_batch(model, batch(8, 0), torch.device("cpu"), "fp32")
    build_loss(ObjectiveConfig(loss="clip"))(**features)["loss"].backward()
    optimizer.step()
    for name, p in model.named_parameters():
        assert (p.grad is None) == (name not in trains), name
        assert (name in trains) == (not torch.equal(p, before[name])), name
    assert len(optimizer.state) == len(trains)


def test_gradient_caching_with_both_towers_locked_trains_the_logit_scale_alone():
    """Micro-batches whose features need no gradient (both towers locked): only the last backward, with the
    logit scale, has anything to do."""
    model = build_model(ModelConfig(model_name="tiny-vit", lock_image=True, lock_text=True,
                                    lock_text_freeze_layer_norm=True)).model
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["logit_scale"]
    losses, _ = cached_gradient_step(model, [batch(4, 1), batch(4, 2)],
                                     lambda b: encode_batch(model, b, torch.device("cpu"), "fp32"),
                                     build_loss(ObjectiveConfig(loss="clip")), torch.Tensor.backward,
                                     torch.device("cpu"))
    assert torch.isfinite(losses["loss"]) and model.logit_scale.grad is not None


def test_a_lock_the_model_cannot_honour_is_one_line():
    with pytest.raises(ConfigError, match="--lock_image --lock_image_unlocked_groups 6: open_clip divides the image "
                                          "tower of tiny-vit into 5 layer groups; pass --lock_image_unlocked_groups 5"):
        build_model(ModelConfig(model_name="tiny-vit", lock_image=True, lock_image_unlocked_groups=6))
    with pytest.raises(ConfigError, match="--lock_text --lock_text_unlocked_layers 9: open_clip divides the text "
                                          "tower of tiny-vit into 5 layer groups"):
        build_model(ModelConfig(model_name="tiny-vit", lock_text=True, lock_text_unlocked_layers=9,
                                lock_text_freeze_layer_norm=True))
    with pytest.raises(ConfigError, match="open_clip cannot lock the image tower of tiny-rn so .*partial locking"):
        build_model(ModelConfig(model_name="tiny-rn", lock_image=True, lock_image_unlocked_groups=1))
    with pytest.raises(ConfigError, match="--lock_text: open_clip cannot lock the text tower of tiny-vit so .*; "
                                          "add --lock_text_freeze_layer_norm"):
        build_model(ModelConfig(model_name="tiny-vit", lock_text=True))
    with pytest.raises(ConfigError, match="--lock_image_unlocked_groups applies to a locked tower: add --lock_image"):
        parse_config(["--lock_image_unlocked_groups", "2"])
    with pytest.raises(ConfigError, match="--lock_text_unlocked_layers must not be negative"):
        parse_config(["--lock_text", "--lock_text_unlocked_layers", "-1"])


def test_frozen_batch_norm_statistics_keep_the_architecture_keys():
    """--lock_image_freeze_bn_stats (open_clip swaps in FrozenBatchNorm2d): the statistics stay as they are in
    training mode, and the state dict keeps every key, so it loads strictly into open_clip's model and back."""
    model = build_model(ModelConfig(model_name="tiny-rn", lock_image=True, lock_image_freeze_bn_stats=True)).model
    plain = open_clip.create_model("tiny-rn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert set(before) == set(plain.state_dict())
    model.train()
    encode_batch(model, batch(4, 3), torch.device("cpu"), "fp32")
    assert_tower_unchanged(before, model.state_dict())
    plain.load_state_dict(before, strict=True)
    load_weights(build_model(ModelConfig(model_name="tiny-rn", lock_image=True, lock_image_freeze_bn_stats=True)).model,
                 {"state_dict": before}, "checkpoint")


def test_a_resume_under_another_lock_is_refused_and_older_checkpoints_resume(tmp_path):
    """Which weights train is part of what a resumed run keeps; checkpoints written before the lock flags
    existed hold none of them and continue as unlocked runs."""
    settings = dict(name="run", train_data="train.csv", dataset_type="csv")
    locked = Config.from_dict(dict(settings, lock_image=True)).to_dict()
    unlocked = Config.from_dict(settings).to_dict()
    with pytest.raises(CheckpointError, match="other settings: lock_image False -> True; .*--resume_allow_changes"):
        check_resumed_config({"config": unlocked, "epoch": 1}, tmp_path / "epoch_1.pt", locked, world_size=1)
    older = {k: v for k, v in unlocked.items() if not k.startswith("lock_")}
    check_resumed_config({"config": older, "epoch": 1}, tmp_path / "epoch_1.pt", unlocked, world_size=1)

# ---- Training runs: the image tower of released weights stays bit-identical; the text tower trains.

EXTRA = ["--lock_image", "--loss", "clip", "--epochs", "2", "--lr", "5e-5"]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Randomly initialised tiny-vit weights in a file, standing in for released ones."""
    path = tmp_path_factory.mktemp("released") / "tiny-vit.pt"
    torch.manual_seed(11)
    torch.save(open_clip.create_model("tiny-vit").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def straight(colour_data, tmp_path_factory, released):
    logs = tmp_path_factory.mktemp("locked")
    argv = command(colour_data, logs, "straight", 1, "--pretrained", str(released), *EXTRA)[3:]
    assert main(argv) == 0
    return logs / "straight" / "checkpoints"


@pytest.mark.e2e
def test_the_locked_tower_stays_bit_identical_through_epochs(straight, released):
    start = torch.load(released, weights_only=True)
    for epoch in (1, 2):
        state = read_checkpoint(straight / f"epoch_{epoch}.pt")["state_dict"]
        assert_tower_unchanged(start, state)
        assert_text_trained(start, state)
    assert "of them train" in (straight.parent / "output.log").read_text()


@pytest.mark.e2e
def test_a_mid_epoch_resume_continues_the_locked_run_exactly(straight, released, colour_data, tmp_path, monkeypatch):
    """Stopped inside epoch 2 (a signal at step 11), then resumed: the same weights, bit for bit, as the run
    that never stopped, so the optimizer was rebuilt with the same groups and its state fitted them."""
    argv = command(colour_data, tmp_path, "stopped", 1, "--pretrained", str(released), *EXTRA)[3:]
    at_step = SavePoints.at_step

    def signal_at_step_11(self, step, may_save=True):
        if step == 11:
            os.kill(os.getpid(), signal.SIGUSR1)
        return at_step(self, step, may_save)

    monkeypatch.setattr(SavePoints, "at_step", signal_at_step_11)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        assert main(argv) == EXIT_PREEMPTED
    finally:  # a stopped run ignores further stop signals: give this process its handlers back
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    latest = read_checkpoint(tmp_path / "stopped" / "checkpoints" / "epoch_latest.pt")
    assert latest["position"]["epoch"] == 2 and latest["step"] == 11
    assert_tower_unchanged(torch.load(released, weights_only=True), latest["state_dict"])
    monkeypatch.setattr(SavePoints, "at_step", at_step)
    assert main(argv + ["--resume", "latest"]) == 0
    expected = read_checkpoint(straight / "epoch_2.pt")["state_dict"]
    resumed = read_checkpoint(tmp_path / "stopped" / "checkpoints" / "epoch_2.pt")["state_dict"]
    assert all(torch.equal(v, resumed[k]) for k, v in expected.items())
    assert "fresh optimizer" not in (tmp_path / "stopped" / "output.log").read_text()


@pytest.mark.e2e
def test_two_processes_keep_the_locked_tower_through_a_mid_epoch_resume(straight, released, colour_data, tmp_path):
    """torchrun with 2 ranks (gloo): DDP over the parameters that train, a stop signal inside epoch 1 and a
    resume; the image tower stays the released one, the rest ends as the 1-process run's (float precision)."""
    cmd = command(colour_data, tmp_path, "two", 2, "--pretrained", str(released), *EXTRA)
    proc = start_and_wait_for_step(cmd, tmp_path / "two", 3)
    try:
        workers = subprocess.run(["pgrep", "-f", "--", f"--name two --num_workers"], capture_output=True,
                                 text=True).stdout.split()
        ranks = sorted(int(p) for p in workers if int(p) != proc.pid)
        output = signal_through_the_save(proc, ranks, signal.SIGUSR1,
                                         tmp_path / "two" / "checkpoints" / "epoch_latest.pt")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert output.count("after saving a checkpoint") == 2, output[-3000:]
    start = torch.load(released, weights_only=True)
    latest = read_checkpoint(tmp_path / "two" / "checkpoints" / "epoch_latest.pt")
    assert latest["world_size"] == 2 and latest["position"]["epoch"] == 1
    assert_tower_unchanged(start, latest["state_dict"])
    resumed = run(cmd + ["--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "fresh optimizer" not in resumed.stdout + resumed.stderr
    for epoch in (1, 2):
        state = read_checkpoint(tmp_path / "two" / "checkpoints" / f"epoch_{epoch}.pt")["state_dict"]
        assert_tower_unchanged(start, state)
        assert_text_trained(start, state)
    one = read_checkpoint(straight / "epoch_2.pt")["state_dict"]
    assert relative_difference(one, state) <= 1e-5
