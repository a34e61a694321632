"""The linear probe: it learns what is learnable, nothing more, reproducibly, on CyCLIP's schedule."""

from __future__ import annotations

import math

import pytest
import torch

from rankclip.linear_probe import probe_accuracy, train_linear_probe


pytestmark = pytest.mark.usefixtures("single_thread")


def clusters(n: int, dim: int, classes: int, seed: int, spread: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples around one fixed random centre per class (centres from seed 0, samples from `seed`)."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    return centres[labels] + spread * torch.randn(n, dim, generator=g), labels


def test_separable_clusters_are_learned():
    features, labels = clusters(400, 32, 10, seed=1)
    probe = train_linear_probe(features, labels, 10, epochs=4)
    test_features, test_labels = clusters(500, 32, 10, seed=2)
    got = probe_accuracy(probe, test_features, test_labels)
    assert got.keys() == {"linear_probe_top1", "linear_probe_top3", "linear_probe_top5", "linear_probe_top10",
                          "linear_probe_mean_per_class_top1"}
    assert got["linear_probe_top1"] > 0.97 and got["linear_probe_mean_per_class_top1"] > 0.97


def test_random_labels_give_chance_on_held_out_data():
    g = torch.Generator().manual_seed(3)
    features, labels = torch.randn(600, 32, generator=g), torch.randint(0, 10, (600,), generator=g)
    probe = train_linear_probe(features, labels, 10, epochs=8)
    train = probe_accuracy(probe, features, labels)
    held_out = probe_accuracy(probe, torch.randn(1000, 32, generator=g), torch.randint(0, 10, (1000,), generator=g))
    assert train["linear_probe_top1"] > 0.2  # it did fit the training noise ...
    assert 0.06 < held_out["linear_probe_top1"] < 0.14  # ... which carries nothing: chance is 0.1
    assert 0.4 < held_out["linear_probe_top5"] < 0.6
    assert held_out["linear_probe_top10"] == 1.0  # k = C: every label is in the top C


def test_top_k_is_capped_at_the_number_of_classes():
    features, labels = clusters(60, 8, 3, seed=4, spread=3.0)
    probe = train_linear_probe(features, labels, 3, epochs=2)
    got = probe_accuracy(probe, features, labels, ks=(1, 2, 3, 5))
    assert got["linear_probe_top1"] <= got["linear_probe_top2"] < 1.0
    assert got["linear_probe_top3"] == got["linear_probe_top5"] == 1.0


def test_same_seed_same_probe_and_the_global_rng_untouched():
    features, labels = clusters(100, 16, 5, seed=5, spread=2.0)
    state = torch.get_rng_state()
    a = train_linear_probe(features, labels, 5, epochs=3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = train_linear_probe(features, labels, 5, epochs=3, seed=7)
    c = train_linear_probe(features, labels, 5, epochs=3, seed=8)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)


def test_weight_decay_and_cosine_schedule_follow_cyclip():
    """With zero features the weight gets no gradient, so only decoupled decay moves it.

    AdamW then scales it by (1 − lr_s·wd) at step s of S, lr_s = lr·(1 + cos(π·s/S))/2 (no
    warmup, not quite 0 at the last step); with wd = 0 it stays at its initial value.
    """
    features, labels = torch.zeros(40, 6), torch.arange(40) % 4  # 3 steps per epoch at batch size 16
    kept = train_linear_probe(features, labels, 4, epochs=4, lr=1.0, weight_decay=0.0)
    decayed = train_linear_probe(features, labels, 4, epochs=4, lr=1.0, weight_decay=0.5)
    total = 12
    factor = math.prod(1 - 0.5 * 0.5 * (1 + math.cos(math.pi * s / total)) for s in range(total))
    assert torch.allclose(decayed.weight, kept.weight * factor, rtol=1e-5, atol=0)
    assert torch.equal(decayed.bias, kept.bias)  # the bias is not decayed (and its gradient ignores the weight)
    assert not torch.equal(kept.weight, decayed.weight)


def test_training_works_under_no_grad_with_inference_mode_features():
    with torch.inference_mode():
        features, labels = clusters(64, 8, 4, seed=6)
    with torch.no_grad():
        probe = train_linear_probe(features, labels, 4, epochs=32)
    assert probe_accuracy(probe, features, labels)["linear_probe_top1"] > 0.9
    assert not probe.weight.requires_grad


def test_a_probe_on_1000_by_64_features_fits_ten_classes_in_three_epochs():
    features, labels = clusters(1000, 64, 10, seed=7)
    probe = train_linear_probe(features, labels, 10, epochs=3)
    assert probe_accuracy(probe, features, labels)["linear_probe_top1"] > 0.95


def test_bad_labels_are_rejected():
    features = torch.randn(5, 4)
    with pytest.raises(ValueError, match="num_classes"):
        train_linear_probe(features, torch.tensor([0, 1, 2, 3, 4]), 3)
    with pytest.raises(ValueError, match="one per feature row"):
        train_linear_probe(features, torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="integer"):
        train_linear_probe(features, torch.zeros(5), 3)


def test_mean_per_class_accuracy_weighs_every_class_alike():
    """A probe that predicts the largest feature: class 0 gets 3 of 4 right, class 1 0 of 1, class 2
    5 of 5, class 3 has no test sample (left out of the mean). Plain accuracy 8/10; mean per class
    (3/4 + 0/1 + 5/5) / 3."""
    probe = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        probe.weight.copy_(torch.eye(4))
    predicted = torch.tensor([0, 0, 0, 2, 3, 2, 2, 2, 2, 2])
    labels = torch.tensor([0, 0, 0, 0, 1, 2, 2, 2, 2, 2])
    got = probe_accuracy(probe, torch.nn.functional.one_hot(predicted, 4).float(), labels)
    assert got["linear_probe_top1"] == pytest.approx(0.8)
    assert got["linear_probe_mean_per_class_top1"] == pytest.approx((3 / 4 + 0 / 1 + 5 / 5) / 3)
