"""--loss siglip: open_clip's SigLipLoss wired into the config, the model's logit bias, the loop, the
validation records and the checkpoint (2 processes against 1: test_siglip_distributed.py)."""

import json
import math
import os
import signal

import open_clip
import pytest
import torch
import torch.nn.functional as F

from rankclip import compare
from rankclip.accumulate import cached_gradient_step
from rankclip.config import Config, ModelConfig
from rankclip.errors import CheckpointError, ConfigError
from rankclip.evaluate import model_logits, validation_losses
from rankclip.losses import ClipLoss, SigLipLoss, build_loss, model_init
from rankclip.main import main
from rankclip.models import build_model
from rankclip.savepoints import EXIT_PREEMPTED
from rankclip.train import Trainer, encode_batch
from rankclip.weights import load_weights, read_checkpoint

from test_accumulate import grads
from test_cli import flags, records
from test_compare import study_flags

CPU = torch.device("cpu")


def features(rows: int = 6, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(F.normalize(torch.randn(rows, dim, generator=generator), dim=1) for _ in range(2))


def test_the_loss_is_open_clips_siglip_loss_with_its_gradients():
    image, text = features()
    leaves = [t.clone().requires_grad_() for t in (image, text, torch.tensor(7.5), torch.tensor([-3.0]))]
    ours = SigLipLoss()(leaves[0], leaves[1], leaves[2], logit_bias=leaves[3])
    ours["loss"].backward()
    reference = [t.clone().requires_grad_() for t in (image, text, torch.tensor(7.5), torch.tensor([-3.0]))]
    theirs = open_clip.loss.SigLipLoss()(*reference)
    theirs.backward()
    assert set(ours) == {"loss", "siglip_loss"}
    torch.testing.assert_close(ours["loss"], theirs)
    assert ours["siglip_loss"] == ours["loss"] and not ours["siglip_loss"].requires_grad
    for got, want in zip(leaves, reference):
        torch.testing.assert_close(got.grad, want.grad)
    # Its definition: −Σ log σ(±(s·i·t + b)) over all pairs, / N (open_clip divides by the batch).
    logits = 7.5 * image @ text.T - 3.0
    labels = 2 * torch.eye(len(image)) - 1
    assert ours["loss"].item() == pytest.approx(-F.logsigmoid(labels * logits).sum().item() / len(image), rel=1e-6)


def test_evaluation_reports_the_contrastive_loss_beside_siglips():
    image, text = features()
    scale, bias = torch.tensor(7.5), torch.tensor([-3.0])
    out = SigLipLoss(gather=False)(image, text, scale, logit_bias=bias)
    assert set(out) == {"loss", "siglip_loss", "contrastive_loss"}
    assert out["contrastive_loss"] == ClipLoss(gather=False)(image, text, scale)["contrastive_loss"]
    # validation_losses passes the model's logit bias on: the SigLIP value of the same features.
    model = torch.nn.Module()
    model.logit_scale, model.logit_bias = torch.nn.Parameter(scale.log()), torch.nn.Parameter(bias)
    values, _ = validation_losses(SigLipLoss(gather=False), image, text, model_logits(model), rank_weight=1.0)
    assert values == pytest.approx({k: v.item() for k, v in out.items()}, rel=1e-6)


def test_the_loss_refuses_a_model_without_logit_bias_and_augmented_views():
    image, text = features()
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(image, text, torch.tensor(10.0))
    with pytest.raises(ValueError, match="inmodal"):
        SigLipLoss()(image, text, torch.tensor(10.0), logit_bias=torch.tensor([-10.0]),
                     augmented_image_features=image, augmented_text_features=text)


def test_config_wires_the_loss_and_its_exchange():
    objective = Config.from_dict({"loss": "siglip", "loss_dist_impl": "shift"}).objective
    loss = build_loss(objective)
    assert isinstance(loss, SigLipLoss) and loss.dist_impl == "shift" and loss.gather
    assert not build_loss(objective, gather=False).gather
    assert Config.from_dict({"loss": "siglip"}).objective.loss_dist_impl == "bidir"  # open_clip's default
    with pytest.raises(ConfigError, match="loss_dist_impl"):
        Config.from_dict({"loss": "siglip", "loss_dist_impl": "ring"}).objective.check()
    with pytest.raises(ConfigError, match="--inmodal.*siglip"):
        Config.from_dict({"loss": "siglip", "inmodal": True, "train_data": __file__}).check()


def test_a_siglip_model_starts_as_open_clips_siglip_models():
    """open_clip_train's --siglip: init_logit_scale log(10), init_logit_bias -10; the other objectives: no bias."""
    assert model_init("siglip") == {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}
    model = build_model(ModelConfig(model_name="tiny-vit"), init=model_init("siglip")).model
    assert model.logit_scale.item() == pytest.approx(math.log(10), rel=1e-7) and model.logit_bias.item() == -10.0
    assert dict(model.named_parameters())["logit_bias"].requires_grad
    assert model_init("clip") == {} and build_model(ModelConfig(model_name="tiny-vit")).model.logit_bias is None


def tiny_siglip_batch(bundle, rows: int = 8) -> dict:
    generator = torch.Generator().manual_seed(3)
    return {"image": torch.randn(rows, 3, 32, 32, generator=generator),
            "text": bundle.tokenizer([f"a {c} shape number {i}" for i, c in enumerate(["red", "blue"] * (rows // 2))])}


def test_the_loop_trains_the_logit_bias_and_caching_keeps_it_shared():
    """encode_batch hands the model's bias to the loss (it gets a gradient); two cached micro-batches
    give one batch's gradients, the bias's included (it is shared, like the logit scale)."""
    bundle = build_model(ModelConfig(model_name="tiny-vit"), init=model_init("siglip"))
    model, loss_fn = bundle.model.train(), SigLipLoss(gather=False)
    batch = tiny_siglip_batch(bundle)
    features = encode_batch(model, batch, CPU, "fp32")
    assert set(features) == {"image_features", "text_features", "logit_scale", "logit_bias"}
    full = loss_fn(**features)
    full["loss"].backward()
    expected = grads(model)
    assert expected["logit_bias"].abs().item() > 0
    # Against the loss computed by hand from the model's own outputs.
    logits = features["logit_scale"] * features["image_features"] @ features["text_features"].T - 10
    labels = 2 * torch.eye(8) - 1
    assert full["loss"].item() == pytest.approx(-F.logsigmoid(labels * logits).sum().item() / 8, rel=1e-5)

    model.zero_grad(set_to_none=True)
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    losses, _ = cached_gradient_step(model, halves, lambda b: encode_batch(model, b, CPU, "fp32"), loss_fn,
                                     lambda t: t.backward(), CPU)
    torch.testing.assert_close(losses["loss"], full["loss"].detach())
    cached = grads(model)
    assert cached.keys() == expected.keys()
    for name, want in expected.items():  # float noise is relative to each tensor's scale (here up to ~6)
        torch.testing.assert_close(cached[name], want, rtol=1e-4, atol=1e-6 * want.abs().max().item(), msg=name)


def test_weights_without_logit_bias_start_siglip_at_zero_as_open_clip_and_the_reverse_is_one_line(tmp_path):
    clip = build_model(ModelConfig(model_name="tiny-vit")).model
    siglip = build_model(ModelConfig(model_name="tiny-vit"), init=model_init("siglip")).model
    load_weights(siglip, {"state_dict": clip.state_dict()}, "clip.pt")
    # open_clip's own loader, on the same weights, as the reference
    reference = open_clip.create_model("tiny-vit", **model_init("siglip"))
    torch.save({"state_dict": clip.state_dict()}, tmp_path / "clip.pt")
    open_clip.load_checkpoint(reference, str(tmp_path / "clip.pt"))
    assert siglip.logit_bias.item() == reference.logit_bias.item() == 0.0
    assert torch.equal(siglip.logit_scale, clip.logit_scale)
    with pytest.raises(CheckpointError, match="trained with --loss siglip.*pass --loss siglip"):
        load_weights(clip, {"state_dict": siglip.state_dict()}, "siglip.pt")


SIGLIP_RUN = ["--loss", "siglip", "--epochs", "2"]


@pytest.fixture(scope="module")
def siglip_run(colour_data, tmp_path_factory):
    logs = tmp_path_factory.mktemp("siglip")
    assert main(flags(colour_data, logs, "siglip", *SIGLIP_RUN)) == 0
    return logs / "siglip"


@pytest.mark.e2e
def test_a_siglip_run_records_its_loss_and_validation_the_contrastive_one(siglip_run):
    rows = records(siglip_run)
    train = [r for r in rows if r["split"] == "train"]
    validation = [r for r in rows if r["split"] == "validation"]
    assert [r["epoch"] for r in train] == [1, 2] and [r["epoch"] for r in validation] == [0, 1, 2]
    assert {"loss", "siglip_loss"} <= set(train[0]) and "contrastive_loss" not in train[0]
    assert {"loss", "siglip_loss", "contrastive_loss", "alignment", "num_samples"} <= set(validation[0])
    assert all(r["loss"] == r["siglip_loss"] for r in train + validation)
    assert train[-1]["loss"] < train[0]["loss"]
    assert validation[-1]["siglip_loss"] < validation[0]["siglip_loss"]
    assert {r["eval_data_type"] for r in rows if r["split"] == "eval"} == {"ImageNet1K"}  # zero-shot as for all
    steps = [json.loads(line) for line in (siglip_run / "steps.jsonl").read_text().splitlines()]
    assert "siglip_loss" in steps[0]
    assert "loss: siglip" in (siglip_run / "params.txt").read_text()
    assert "loss_dist_impl: bidir" in (siglip_run / "params.txt").read_text()


@pytest.mark.e2e
def test_the_checkpoint_holds_logit_bias_and_loads_strictly_into_open_clips_siglip_model(siglip_run, tmp_path):
    path = siglip_run / "checkpoints" / "epoch_latest.pt"
    ckpt = read_checkpoint(path)
    state = ckpt["state_dict"]
    assert ckpt["config"]["loss"] == "siglip" and state["logit_bias"].item() != -10.0  # trained
    model = open_clip.create_model("tiny-vit", init_logit_bias=-10)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.logit_bias, state["logit_bias"])
    again = open_clip.create_model("tiny-vit", init_logit_bias=-10)
    open_clip.load_checkpoint(again, str(path))  # open_clip's own loader reads the file as it is
    assert torch.equal(again.logit_bias, state["logit_bias"])
    with pytest.raises(RuntimeError, match="logit_bias"):  # a CLIP model has no place for it
        open_clip.create_model("tiny-vit").load_state_dict(state, strict=True)


@pytest.mark.e2e
def test_a_siglip_run_stopped_mid_epoch_resumes_exactly(siglip_run, colour_data, tmp_path, monkeypatch):
    """SIGUSR1 at step 11 (inside epoch 2) saves and stops; --resume latest ends bit-identical to the
    uninterrupted run: the logit bias, its optimizer state and the SigLIP loss sums are restored."""
    forward_backward = Trainer.forward_backward

    def signal_at_step_11(self, batches, weight):
        if self.state.step == 10:
            os.kill(os.getpid(), signal.SIGUSR1)
        return forward_backward(self, batches, weight)

    argv = flags(colour_data, tmp_path, "stopped", *SIGLIP_RUN)
    monkeypatch.setattr(Trainer, "forward_backward", signal_at_step_11)
    assert main(argv) == EXIT_PREEMPTED
    monkeypatch.undo()
    latest = read_checkpoint(tmp_path / "stopped" / "checkpoints" / "epoch_latest.pt")
    assert latest["step"] == 11 and latest["position"] == {"epoch": 2, "steps_done": 3, "seen": 96}
    assert main([*argv, "--resume", "latest"]) == 0
    straight = read_checkpoint(siglip_run / "checkpoints" / "epoch_2.pt")
    again = read_checkpoint(tmp_path / "stopped" / "checkpoints" / "epoch_2.pt")
    assert again["step"] == straight["step"] == 16
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, again["state_dict"][key]), key
    trained = [r for r in records(siglip_run) if r["split"] == "train"]
    continued = [r for r in records(tmp_path / "stopped") if r["split"] == "train"]
    assert continued[-1]["siglip_loss"] == pytest.approx(trained[-1]["siglip_loss"], rel=1e-6)


def test_a_compare_grid_takes_siglip_beside_the_other_objectives(colour_data, tmp_path):
    study = compare.parse_study(study_flags(colour_data, tmp_path, "loss=clip,siglip,rankclip"))
    assert [cell.name for cell in study.cells] == ["loss=clip", "loss=siglip", "loss=rankclip"]
    assert [cell.config.objective.loss for cell in study.cells] == ["clip", "siglip", "rankclip"]

