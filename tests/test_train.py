import math

import pytest
import torch

from rankclip.optim import build_optimizer
from rankclip.train import CosineSchedule, DataError, FailureCounter


def test_schedule_warms_up_from_step_zero_and_ends_at_zero():
    schedule = CosineSchedule(base_lr=1.0, warmup_steps=10, total_steps=111)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(110) == 0.0
    assert schedule(60) == pytest.approx(0.5)  # halfway through the decay
    decay = [schedule(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_schedule_with_warmup_longer_than_the_run():
    schedule = CosineSchedule(base_lr=2.0, warmup_steps=10_000, total_steps=5)
    values = [schedule(s) for s in range(5)]
    assert values[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert values[-1] == 0.0
    assert CosineSchedule(1.0, 0, 1)(0) == 1.0  # a one-step run still learns


def test_schedule_without_warmup_is_pure_cosine():
    schedule = CosineSchedule(base_lr=1.0, warmup_steps=0, total_steps=5)
    expected = [0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(5)]
    assert [schedule(s) for s in range(5)] == pytest.approx(expected)


def test_optimizer_excludes_norms_biases_and_logit_scale_from_weight_decay():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.ln_final = torch.nn.LayerNorm(4)
            self.bn1 = torch.nn.BatchNorm2d(4)
            self.logit_scale = torch.nn.Parameter(torch.ones([]))
            self.embedding = torch.nn.Parameter(torch.ones(3, 4))
            self.class_embedding = torch.nn.Parameter(torch.ones(4))
            self.downsample = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1, bias=False), torch.nn.BatchNorm2d(4))

    model = Tiny()
    optimizer = build_optimizer(model, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    # The seed's rule goes by name only: a 1-D class embedding and a BatchNorm named "downsample.1"
    # are decayed, as in the seed and CyCLIP, so their optimizer states keep their groups' sizes.
    assert decay == {id(model.proj.weight), id(model.embedding), id(model.class_embedding),
                     id(model.downsample[0].weight), id(model.downsample[1].weight)}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-6


def test_failure_counter_stops_past_one_percent():
    counter = FailureCounter(num_samples=300)
    counter.add(["a.jpg", "b.jpg", "a.jpg"])  # 2 distinct of 300 is under 1%
    counter.add(["c.jpg"])  # 3 is exactly 1%
    with pytest.raises(DataError, match="4 of 300 training images cannot be read.*a.jpg"):
        counter.add(["d.jpg"])
