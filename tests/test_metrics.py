"""Retrieval recall and representation metrics against dense loop oracles written out here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rankclip.metrics import average_ranks, representation_metrics, retrieval_recall, rowwise_spearman

KS = (1, 5, 10)


pytestmark = pytest.mark.usefixtures("single_thread")


def unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def oracle_average_ranks(values: list[float]) -> list[float]:
    """0-based ranks, each tie group sharing the mean of the positions it spans."""
    ordered = sorted(values)
    return [ordered.index(v) + (ordered.count(v) - 1) / 2 for v in values]


def oracle_spearman(a: list[float], b: list[float]) -> float:
    ra, rb = oracle_average_ranks(a), oracle_average_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var > 0 else 0.0


def oracle_representation(images: torch.Tensor, texts: torch.Tensor) -> dict[str, float]:
    """Every definition densely in float64, diagonals dropped from the Spearman rows."""
    i, t = images.double(), texts.double()
    n = len(i)

    def consistency(a: torch.Tensor, b: torch.Tensor) -> float:
        others = [[c for c in range(n) if c != r] for r in range(n)]
        rows = [oracle_spearman(a[r, others[r]].tolist(), b[r, others[r]].tolist()) for r in range(n)]
        return sum(rows) / n

    def uniformity(x: torch.Tensor) -> float:
        return torch.pdist(x).square().mul(-2).exp().mean().log().item()

    return {"inmodal_consistency": consistency(i @ i.T, t @ t.T),
            "crossmodal_consistency": consistency(i @ t.T, t @ i.T),
            "alignment": (i - t).norm(dim=1).square().mean().item(),
            "image_uniformity": uniformity(i), "text_uniformity": uniformity(t),
            "modality_gap": (i.mean(0) - t.mean(0)).norm().item()}


def oracle_recall(images: torch.Tensor, texts: torch.Tensor, text_image: torch.Tensor, ks) -> dict[str, float]:
    """Top-k by argsort, one query at a time (meant for features without ties)."""
    sims = images.double() @ texts.double().T
    i2t = {k: [] for k in ks}
    for image in range(len(images)):
        captions = set((text_image == image).nonzero().flatten().tolist())
        if not captions:
            continue
        order = sims[image].argsort(descending=True).tolist()
        for k in ks:
            i2t[k].append(bool(captions & set(order[:k])))
    t2i = {k: [] for k in ks}
    for text in range(len(texts)):
        order = sims[:, text].argsort(descending=True).tolist()
        for k in ks:
            t2i[k].append(int(text_image[text]) in order[:k])
    return ({f"image_to_text_R@{k}": sum(v) / len(v) for k, v in i2t.items()}
            | {f"text_to_image_R@{k}": sum(v) / len(v) for k, v in t2i.items()})


# --- ranks and Spearman


def test_average_ranks_share_the_mean_position_of_ties():
    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0, 5.0], [0.0, -1.0, 2.0, 1.0, -2.0]])
    assert average_ranks(x).tolist() == [[3.0, 0.0, 3.0, 1.0, 3.0], [2.0] * 5, [2.0, 1.0, 4.0, 3.0, 0.0]]


def test_average_ranks_match_the_oracle_with_many_ties():
    x = torch.randint(0, 6, (20, 33), generator=torch.Generator().manual_seed(0)).float()
    assert average_ranks(x).tolist() == [oracle_average_ranks(row) for row in x.tolist()]


def test_rowwise_spearman_with_ties_matches_the_oracle():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 4, (30, 17), generator=g).float()
    b = (a + torch.randint(0, 3, (30, 17), generator=g)).float()  # correlated, with ties on both sides
    expected = torch.tensor([oracle_spearman(x, y) for x, y in zip(a.tolist(), b.tolist())])
    got = rowwise_spearman(a, b)
    assert torch.allclose(got.double(), expected.double(), atol=1e-6)
    assert got.min() < 0.9  # the case is not trivial


def test_rowwise_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, 5, (10, 40), generator=g).float()
    b = a * torch.randn(10, 40, generator=g).sign() + torch.randint(0, 2, (10, 40), generator=g)
    expected = [stats.spearmanr(x, y).statistic for x, y in zip(a.numpy(), b.numpy())]
    assert rowwise_spearman(a, b).tolist() == pytest.approx(expected, abs=1e-6)


def test_rowwise_spearman_is_one_for_monotone_rows_and_zero_for_constant_ones():
    a = torch.randn(4, 9, generator=torch.Generator().manual_seed(3))
    assert rowwise_spearman(a, a.exp() * 3).tolist() == pytest.approx([1.0] * 4)
    assert rowwise_spearman(a, -a).tolist() == pytest.approx([-1.0] * 4)
    assert rowwise_spearman(a, torch.ones_like(a)).tolist() == [0.0] * 4  # no ranking: 0, not NaN


# --- representation metrics


def test_representation_metrics_match_the_dense_oracle_for_any_chunk_size():
    images, texts = unit(23, 8, 4), unit(23, 8, 5)
    texts = F.normalize(texts + images, dim=1)  # partly aligned, so no metric sits at its trivial value
    expected = oracle_representation(images, texts)
    for chunk_size in (1, 5, 23, 1024):  # 5 does not divide 23
        got = representation_metrics(images, texts, chunk_size=chunk_size)
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key] == pytest.approx(expected[key], abs=2e-5), (key, chunk_size)
    assert 0.2 < expected["inmodal_consistency"] < 0.95
    assert 0.2 < expected["crossmodal_consistency"] < 0.95


def test_representation_metrics_with_tied_similarities_match_the_oracle():
    """Entries ±1/2 in 4-D: unit rows whose dot products are exact multiples of 1/4, so rows are full of ties."""
    g = torch.Generator().manual_seed(6)
    images = torch.randint(0, 2, (14, 4), generator=g).float() - 0.5
    texts = torch.randint(0, 2, (14, 4), generator=g).float() - 0.5
    expected = oracle_representation(images, texts)
    got = representation_metrics(images, texts, chunk_size=4)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-5), key


def test_consistency_leaves_out_the_diagonal():
    """Three pairs whose images and texts order every row's two other samples oppositely.

    Images at angles 0°, 60°, 180° rank (row: nearer, farther) 0: 1, 2; 1: 0, 2; 2: 1, 0; texts at
    0°, 160°, 60° rank 0: 2, 1; 1: 2, 0; 2: 0, 1. Without the diagonal every row's Spearman is −1;
    with the self-similarity kept at the top of both rows it would be 0.5.
    """
    def at(degrees):
        radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
        return torch.stack([radians.cos(), radians.sin()], dim=1).float()

    got = representation_metrics(at([0.0, 60.0, 180.0]), at([0.0, 160.0, 60.0]))
    assert got["inmodal_consistency"] == pytest.approx(-1.0)


def test_identical_modalities_are_perfectly_consistent_aligned_and_gapless():
    images = unit(40, 16, 7)
    got = representation_metrics(images, images.clone(), chunk_size=16)
    assert got["inmodal_consistency"] == pytest.approx(1.0)
    assert got["crossmodal_consistency"] == pytest.approx(1.0)
    assert got["alignment"] == pytest.approx(0.0, abs=1e-6)
    assert got["modality_gap"] == pytest.approx(0.0, abs=1e-6)
    assert got["image_uniformity"] == pytest.approx(got["text_uniformity"])


def test_independent_modalities_are_inconsistent_and_unaligned():
    images, texts = unit(200, 32, 8), unit(200, 32, 9)
    got = representation_metrics(images, texts, chunk_size=64)
    assert abs(got["inmodal_consistency"]) < 0.05
    assert abs(got["crossmodal_consistency"]) < 0.05
    assert got["alignment"] == pytest.approx(2.0, abs=0.1)  # E‖x − y‖² = 2 for independent unit vectors
    # Uniform on the sphere in 32-D: ‖x − y‖² = 2 − 2c with c ≈ N(0, 1/32), so
    # log E exp(−2‖x − y‖²) ≈ −4 + 16/(2·32) = −3.75.
    assert -3.9 < got["image_uniformity"] < -3.6


def test_uniformity_of_a_collapsed_modality_is_zero():
    point = torch.full((10, 4), 0.5)  # unit rows whose dot products are exactly 1
    got = representation_metrics(point, unit(10, 4, 11))
    assert got["image_uniformity"] == pytest.approx(0.0, abs=1e-6)  # every distance is 0
    assert got["inmodal_consistency"] == 0.0  # constant image rows carry no ranking


def test_modality_gap_is_the_distance_between_centres():
    images = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]), dim=1)
    texts = torch.tensor([[0.0, 0.0, 1.0]]).expand(3, 3).clone()
    centre = images.mean(0)
    assert representation_metrics(images, texts)["modality_gap"] == pytest.approx(
        math.sqrt(centre[0] ** 2 + centre[1] ** 2 + 1.0))


def test_representation_metrics_do_not_depend_on_the_order_of_pairs():
    images = unit(30, 8, 12)
    texts = F.normalize(images + unit(30, 8, 13), dim=1)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    a = representation_metrics(images, texts, chunk_size=7)
    b = representation_metrics(images[perm], texts[perm], chunk_size=7)
    assert a == pytest.approx(b, abs=1e-5)
    unpaired = representation_metrics(images[perm], texts, chunk_size=7)  # pairing matters where it should
    assert unpaired["alignment"] > a["alignment"] + 0.5
    assert unpaired["inmodal_consistency"] < a["inmodal_consistency"] - 0.2


def test_representation_metrics_reject_unpaired_or_tiny_inputs():
    with pytest.raises(ValueError, match="paired"):
        representation_metrics(unit(5, 4, 0), unit(6, 4, 1))
    with pytest.raises(ValueError, match="at least 3"):
        representation_metrics(unit(2, 4, 0), unit(2, 4, 1))


# --- retrieval recall


def test_recall_hand_computed_with_multi_caption_and_captionless_images():
    """Images e0..e3 (e3 has no caption); captions 0 and 1 describe image 0, 2 image 1, 3 image 2.

    Caption features → similarity to images 0..3:
      t0 (0.6, 0.8, 0, 0)   t1 (1, 0, 0, 0)   t2 (0, 0.6, 0.8, 0)   t3 (0, 0, 0, 1)
    text→image ranks (ties count against): t0 2, t1 1, t2 2, t3 4 (its image ties at 0 with 0 and 1).
    image→text ranks of the best own caption: image 0 → 1 (t1 beats t0), image 1 → 2 (t0 at 0.8
    beats t2 at 0.6), image 2 → 4 (t3 at 0 ties with t0, t1 and loses to t2); image 3 skipped.
    """
    images = torch.eye(4)
    texts = torch.tensor([[0.6, 0.8, 0, 0], [1.0, 0, 0, 0], [0, 0.6, 0.8, 0], [0, 0, 0, 1.0]])
    text_image = torch.tensor([0, 0, 1, 2])
    got = retrieval_recall(images, texts, text_image, ks=(1, 2, 3, 4))
    assert got == pytest.approx({"image_to_text_R@1": 1 / 3, "image_to_text_R@2": 2 / 3, "image_to_text_R@3": 2 / 3,
                                 "image_to_text_R@4": 1.0, "text_to_image_R@1": 1 / 4, "text_to_image_R@2": 3 / 4,
                                 "text_to_image_R@3": 3 / 4, "text_to_image_R@4": 1.0})


def test_recall_matches_the_oracle_with_five_captions_per_image_for_any_chunk_size():
    images = unit(40, 16, 20)
    text_image = torch.arange(36).repeat_interleave(5)  # images 36..39 have no caption
    texts = F.normalize(images[text_image] + 2.5 * unit(180, 16, 21), dim=1)
    expected = oracle_recall(images, texts, text_image, KS)
    assert 0.1 < expected["image_to_text_R@1"] < 0.9 and 0.1 < expected["text_to_image_R@1"] < 0.9
    for chunk_size in (1, 7, 1024):  # 7 divides neither 40 nor 180
        assert retrieval_recall(images, texts, text_image, KS, chunk_size=chunk_size) == expected


def test_recall_does_not_depend_on_the_order_of_images_or_captions():
    images = unit(30, 8, 22)
    text_image = torch.randint(0, 30, (70,), generator=torch.Generator().manual_seed(0))
    texts = F.normalize(images[text_image] + unit(70, 8, 23), dim=1)
    expected = retrieval_recall(images, texts, text_image)
    image_perm = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    text_perm = torch.randperm(70, generator=torch.Generator().manual_seed(2))
    new_index = image_perm.argsort()  # old image index → its row in the permuted images
    got = retrieval_recall(images[image_perm], texts[text_perm], new_index[text_image[text_perm]], chunk_size=8)
    assert got == expected


def test_perfect_features_recall_everything_and_random_ones_recall_at_chance():
    images = unit(300, 64, 24)
    text_image = torch.arange(300).repeat_interleave(2)
    perfect = retrieval_recall(images, images[text_image], text_image, chunk_size=64)
    assert set(perfect.values()) == {1.0}
    chance = retrieval_recall(images, unit(600, 64, 25), text_image, chunk_size=64)
    assert chance["text_to_image_R@10"] < 0.07  # chance: 10/300
    assert chance["image_to_text_R@10"] < 0.07  # chance: about 2·10/600
    assert chance["text_to_image_R@1"] < 0.02


def test_collapsed_features_recall_nothing_below_the_candidate_count():
    """All similarities tie; counting ties against the query gives 0, not a flattering 1."""
    images, texts = torch.ones(6, 4) / 2, torch.ones(6, 4) / 2
    got = retrieval_recall(images, texts, torch.arange(6), ks=(1, 5, 6))
    assert got == {"image_to_text_R@1": 0.0, "image_to_text_R@5": 0.0, "image_to_text_R@6": 1.0,
                   "text_to_image_R@1": 0.0, "text_to_image_R@5": 0.0, "text_to_image_R@6": 1.0}


def test_recall_rejects_a_bad_caption_map():
    images, texts = unit(4, 8, 0), unit(5, 8, 1)
    with pytest.raises(ValueError, match="outside"):
        retrieval_recall(images, texts, torch.tensor([0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="shape"):
        retrieval_recall(images, texts, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="integer"):
        retrieval_recall(images, texts, torch.zeros(5))
