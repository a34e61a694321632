"""Gradient caching (--accum_freq): K micro-batches give the gradient of one step over all of them."""

import math

import pytest
import torch
from torch import nn

from rankclip.errors import ConfigError
from rankclip.config import ModelConfig
from rankclip.accumulate import cached_gradient_step
from rankclip.weights import read_checkpoint
from rankclip.data import GlobalBatchSampler
from rankclip.losses import RankCLIPLoss
from rankclip.main import main
from rankclip.models import build_model
from rankclip.train import encode_batch

from test_cli import flags
from test_distributed import relative_difference

CPU = torch.device("cpu")


class NoisyTwoTower(nn.Module):
    """A CLIP-shaped model with dropout and BatchNorm: both depend on state that replay must get right."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 8))
        self.text = nn.Sequential(nn.Embedding(50, 8), nn.Dropout(0.3))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, images, texts):
        image = nn.functional.normalize(self.image(images), dim=-1)
        text = nn.functional.normalize(self.text(texts).mean(1), dim=-1)
        return image, text, self.logit_scale.exp()


def micro_batches(count: int, size: int, augmented: bool = False) -> list[dict]:
    generator = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(count):
        batch = {"image": torch.randn(size, 12, generator=generator),
                 "text": torch.randint(0, 50, (size, 5), generator=generator)}
        if augmented:
            batch["augmented_image"] = torch.randn(size, 12, generator=generator)
            batch["augmented_text"] = torch.randint(0, 50, (size, 5), generator=generator)
        batches.append(batch)
    return batches


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_close(a: dict, b: dict, rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=1e-7, msg=name)


def cached(model, batches, loss_fn):
    def encode(batch):
        return encode_batch(model, batch, CPU, "fp32")

    return cached_gradient_step(model, batches, encode, loss_fn, lambda t: t.backward(), CPU)


@pytest.mark.parametrize("augmented", [False, True], ids=["plain", "inmodal"])
def test_cached_gradients_equal_one_graph_over_all_micro_batches(augmented):
    """Oracle: the same micro-batch forwards (same dropout masks, same BatchNorm batches) kept in one graph."""
    loss_fn = RankCLIPLoss(gather=False)
    batches = micro_batches(3, 8, augmented)
    torch.manual_seed(0)
    model = NoisyTwoTower().train()
    reference = NoisyTwoTower().train()
    reference.load_state_dict(model.state_dict())

    torch.manual_seed(1)
    losses, scale = cached(model, batches, loss_fn)
    after_cached = torch.get_rng_state()

    torch.manual_seed(1)
    parts = [encode_batch(reference, batch, CPU, "fp32") for batch in batches]
    features = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "logit_scale"}
    expected = loss_fn(**features, logit_scale=parts[0]["logit_scale"])
    expected["loss"].backward()

    for key in expected:
        torch.testing.assert_close(losses[key], expected[key].detach(), msg=key)
    assert not losses["loss"].requires_grad and scale.item() == pytest.approx(math.exp(2.0))
    assert_close(grads(model), grads(reference))
    # BatchNorm statistics move once per micro-batch, as in the reference's three forwards.
    assert_close(dict(model.named_buffers()), dict(reference.named_buffers()))
    assert torch.equal(after_cached, torch.get_rng_state())  # the RNG ends where three forwards leave it


def test_tiny_vit_two_micro_batches_equal_one_batch_of_twice_the_size():
    """Without BatchNorm or dropout, K micro-batches of B are exactly one batch of K·B."""
    bundle = build_model(ModelConfig(model_name="tiny-vit"))
    model = bundle.model.train()
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(16, 3, 32, 32, generator=generator)
    texts = bundle.tokenizer([f"a {c} shape number {i}" for i, c in enumerate(["red", "blue"] * 8)])
    loss_fn = RankCLIPLoss(gather=False)

    full = loss_fn(**encode_batch(model, {"image": images, "text": texts}, CPU, "fp32"))
    full["loss"].backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)

    halves = [{"image": images[:8], "text": texts[:8]}, {"image": images[8:], "text": texts[8:]}]
    losses, _ = cached(model, halves, loss_fn)
    torch.testing.assert_close(losses["loss"], full["loss"].detach())
    assert_close(grads(model), expected, rtol=1e-4)


def test_sampler_micro_batches_cover_each_process_share_of_the_step_batch():
    one_step_batch = GlobalBatchSampler(64, 32, seed=5, rank=1, world=2)
    micro = GlobalBatchSampler(64, 8, seed=5, rank=1, world=2, micro_batches=4)
    assert micro.steps == one_step_batch.steps == 2 and len(micro) == 8
    for epoch in (1, 2):
        one_step_batch.set_epoch(epoch)
        micro.set_epoch(epoch)
        groups = list(micro)
        assert all(len(group) == 4 for group in groups)
        assert [sum(groups[4 * s:4 * s + 4], []) for s in range(2)] == list(one_step_batch)


def test_sampler_refuses_a_step_batch_larger_than_the_data():
    with pytest.raises(ConfigError, match="--accum_freq 4 is larger than the 64"):
        GlobalBatchSampler(64, 32, seed=0, micro_batches=4)


@pytest.mark.e2e
def test_accum_freq_run_takes_the_steps_of_the_large_batch_run(colour_data, tmp_path):
    """Through the CLI: --batch_size 16 --accum_freq 2 trains like --batch_size 32."""
    common = ["--loss", "rankclip", "--rank_schedule", "constant", "--epochs", "1", "--lr", "5e-5"]
    large = flags(colour_data, tmp_path, "large", *common, evaluate=False)
    accumulated = flags(colour_data, tmp_path, "accumulated", *common, "--accum_freq", "2", evaluate=False)
    accumulated[accumulated.index("--batch_size") + 1] = "16"
    assert main(large) == 0 and main(accumulated) == 0
    a = read_checkpoint(tmp_path / "large" / "checkpoints" / "epoch_1.pt")
    b = read_checkpoint(tmp_path / "accumulated" / "checkpoints" / "epoch_1.pt")
    assert a["step"] == b["step"] == 8
    assert relative_difference(a["state_dict"], b["state_dict"]) <= 1e-5
    assert "x 2 micro-batches = step batch 32" in (tmp_path / "accumulated" / "output.log").read_text()
