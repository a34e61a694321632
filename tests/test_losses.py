"""The losses against plain dense float64 oracles written out here: values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rankclip.config import ObjectiveConfig
from rankclip.losses import (ClipLoss, CyClipLoss, RankCLIPLoss, _argsort_rows, build_loss, default_chunk_size,
                             plackett_luce_nll, rank_weight)

RANK_KEYS = ("loss", "contrastive_loss", "rank_loss", "inmodal_rank_loss", "crossmodal_rank_loss")


pytestmark = pytest.mark.usefixtures("single_thread")


def oracle_pl(pred: torch.Tensor, true: torch.Tensor, eps: float) -> torch.Tensor:
    """DESIGN's PL per row, densely: sort by `true` descending, shift by the max, log of suffix sums."""
    order = true.argsort(dim=1, descending=True)
    z = (pred - pred.max(dim=1, keepdim=True).values).gather(1, order)
    log_suffix = torch.logcumsumexp(z.flip(1), 1).flip(1)
    if eps > 0:
        log_suffix = torch.logaddexp(log_suffix, torch.full_like(log_suffix, math.log(eps)))
    return (log_suffix - z).sum(1)


def oracle_contrastive(i, t, s, aug=None):
    labels = torch.arange(len(i))
    logits = s * i @ t.T
    crossmodal = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    if aug is None:
        return crossmodal
    i_aug, t_aug = aug
    inmodal = (F.cross_entropy(s * i @ i_aug.T, labels) + F.cross_entropy(s * t @ t_aug.T, labels)) / 2
    return (crossmodal + inmodal) / 2


def oracle_rankclip(i, t, s, lambda1, lambda2, eps, weight=1.0, aug=None) -> dict:
    n = len(i)
    contrastive = oracle_contrastive(i, t, s, aug)
    cross, ii, tt = s * i @ t.T, s * i @ i.T, s * t @ t.T
    inmodal = (oracle_pl(ii, tt, eps).mean() + oracle_pl(tt, ii, eps).mean()) / (2 * n)
    crossmodal = (oracle_pl(cross, cross.T, eps).mean() + oracle_pl(cross.T, cross, eps).mean()) / (2 * n)
    rank = lambda1 * inmodal + lambda2 * crossmodal
    return {"loss": contrastive + weight * rank, "contrastive_loss": contrastive, "rank_loss": rank,
            "inmodal_rank_loss": inmodal, "crossmodal_rank_loss": crossmodal}


def oracle_cyclip(i, t, s, cylambda1, cylambda2, aug=None) -> dict:
    """CyCLIP's train.py, as written there."""
    n = len(i)
    contrastive = oracle_contrastive(i, t, s, aug)
    inmodal = (s * i @ i.T - s * t @ t.T).square().mean() / (s * s) * n
    crossmodal = (s * i @ t.T - s * t @ i.T).square().mean() / (s * s) * n
    return {"loss": contrastive + cylambda1 * inmodal + cylambda2 * crossmodal, "contrastive_loss": contrastive,
            "inmodal_cyclic_loss": inmodal, "crossmodal_cyclic_loss": crossmodal}


def unit_features(n: int, d: int, seed: int, count: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=1) for _ in range(count)]


def evaluate(fn, features: list[torch.Tensor], scale: float, dtype: torch.dtype, **kwargs):
    """fn(*features, s, **kwargs) on leaf copies in `dtype`; returns (values, feature grads, scale grad)."""
    leaves = [f.to(dtype).detach().requires_grad_() for f in features]
    s = torch.tensor(scale, dtype=dtype, requires_grad=True)
    names = ("augmented_image_features", "augmented_text_features")
    out = fn(*leaves[:2], s, **kwargs, **dict(zip(names, leaves[2:])))
    out["loss"].backward()
    return out, [leaf.grad for leaf in leaves], s.grad


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float = 2e-5, floor: float = 1e-3) -> None:
    """Within `rel` of the largest magnitude in `want`, or of `floor` (float32 vs the float64 oracle).

    Plackett-Luce gradients are differences of O(1) terms (a probability sum minus 1), so
    their rounding scale is 1 even where the result is ~0: they use floor=1.
    """
    assert got.shape == want.shape
    tol = rel * max(want.abs().max().item(), floor)
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > {tol:.3g}"


def compare(ours, oracle, features, scale, keys, dtype=torch.float32, rel=2e-5, **kwargs):
    """Values (fp32 scalars) and gradients of `ours` in `dtype` against `oracle` in float64.

    Tolerances are relative to the largest magnitude, floored at 1e-3·s: the rank terms are
    sums of O(s) logits that largely cancel, so fp32 rounding is ~u·s however small the result.
    """
    features = [f.to(dtype).double() for f in features]  # both see the same (rounded) inputs
    scale = torch.tensor(scale, dtype=dtype).item()
    got, got_grads, got_scale = evaluate(ours, features, scale, dtype, **kwargs)
    want, want_grads, want_scale = evaluate(oracle, features, scale, torch.float64, **kwargs)
    floor = 1e-3 * scale
    for key in keys:
        assert got[key].dtype == torch.float32 and got[key].shape == ()
        assert_close(got[key], want[key], floor=floor)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == dtype
        assert_close(g.double(), w.to(dtype).double(), rel, floor)
    assert_close(got_scale.double(), want_scale.to(dtype).double(), rel, floor)


def test_row_argsort_is_a_stable_ascending_sort():
    """The CPU radix path: negative and positive values, ties, ±0, infinities, one column."""
    generator = torch.Generator().manual_seed(0)
    values = torch.tensor([-math.inf, -2.5, -1e-30, -0.0, 0.0, 1e-30, 3.0, 3.5e38, math.inf])
    x = values[torch.randint(len(values), (7, 5000), generator=generator)]  # > 32768 keys: torch's radix sort
    assert torch.equal(_argsort_rows(x), x.argsort(dim=1, stable=True))
    x = torch.randn(300, 1, generator=generator)
    assert torch.equal(_argsort_rows(x), torch.zeros(300, 1, dtype=torch.long))


def check_plackett_luce(pred: torch.Tensor, true: torch.Tensor, eps: float, rel: float = 2e-5) -> None:
    """plackett_luce_nll against the float64 oracle on the same values, rows weighted unequally upstream."""
    upstream = torch.linspace(0.5, 1.5, len(pred), dtype=torch.float64)
    ours = pred.clone().requires_grad_()
    got = plackett_luce_nll(ours, true, eps)
    (got * upstream.float()).sum().backward()
    exact = pred.double().requires_grad_()
    want = oracle_pl(exact, true.double(), eps)
    (want * upstream).sum().backward()
    assert got.dtype == torch.float32 and ours.grad.dtype == pred.dtype
    assert torch.isfinite(got).all() and torch.isfinite(ours.grad).all()
    assert_close(got, want)
    assert_close(ours.grad.double(), exact.grad.to(pred.dtype).double(), rel, floor=1.0)


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 2), (5, 7), (4, 33)])
@pytest.mark.parametrize("eps", [0.0, 1e-10, 0.5])
@pytest.mark.parametrize("spread", [1.0, 100.0, 1000.0])
def test_plackett_luce_matches_oracle(rows, cols, eps, spread):
    """eps = 0.5 makes the max-shift gradient term visible; spread 1000 with eps = 0 needs log space."""
    generator = torch.Generator().manual_seed(rows * cols)
    pred = spread * (2 * torch.rand(rows, cols, generator=generator) - 1)
    check_plackett_luce(pred, torch.randn(rows, cols, generator=generator), eps)


def test_plackett_luce_covers_rows_beyond_fp32_range():
    """eps = 0 with last-ranked items 500-1000 nats below the row max, where fp32 exp underflows to 0."""
    pred = torch.tensor([[0.0, -1000.0, -3.0], [0.0, -1000.0, -500.0], [0.0, -1.0, -2.0]])
    check_plackett_luce(pred, torch.tensor([[3.0, 1.0, 2.0], [2.0, 3.0, 1.0], [3.0, 2.0, 1.0]]), 0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_plackett_luce_half_inputs_use_fp32_math(dtype):
    """fp32-accurate values on the rounded inputs; gradients in `dtype`, compared after rounding."""
    generator = torch.Generator().manual_seed(0)
    pred = (30 * torch.randn(4, 50, generator=generator)).to(dtype)
    check_plackett_luce(pred, torch.randn(4, 50, generator=generator).to(dtype), 1e-10, rel=torch.finfo(dtype).eps)


def test_target_gets_no_gradient_like_the_dense_reference():
    pred = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    true = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    oracle_pl(pred, true, 1e-10).sum().backward()
    assert true.grad is None  # the dense reference's argsort carries no gradient to the target
    ours_pred, ours_true = pred.detach().float().requires_grad_(), true.detach().float().requires_grad_()
    plackett_luce_nll(ours_pred, ours_true).sum().backward()
    assert ours_true.grad is None
    assert_close(ours_pred.grad, pred.grad, floor=1.0)


def rankclip_oracle(lambda1: float, lambda2: float, eps: float):
    def loss(i, t, s, rank_weight=1.0, augmented_image_features=None, augmented_text_features=None):
        aug = None if augmented_image_features is None else (augmented_image_features, augmented_text_features)
        return oracle_rankclip(i, t, s, lambda1, lambda2, eps, rank_weight, aug)
    return loss


def cyclip_oracle(cylambda1: float, cylambda2: float):
    def loss(i, t, s, rank_weight=1.0, augmented_image_features=None, augmented_text_features=None):
        aug = None if augmented_image_features is None else (augmented_image_features, augmented_text_features)
        return oracle_cyclip(i, t, s, cylambda1, cylambda2, aug)
    return loss


@pytest.mark.parametrize("n", [1, 2, 7, 33, 64])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
@pytest.mark.parametrize("eps", [1e-10, 0.0])
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_rankclip_matches_oracle(n, scale, eps, chunk_size):
    """d = 8 spreads the similarities, so with s = 100 and eps = 0 rows take the log-space path too."""
    compare(RankCLIPLoss(0.5, 0.3, eps, chunk_size), rankclip_oracle(0.5, 0.3, eps), unit_features(n, 8, seed=n),
            scale, RANK_KEYS, rank_weight=1.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rankclip_half_inputs_give_fp32_values(dtype):
    """Half-precision features and scale: fp32-accurate values on the rounded inputs, grads in the input dtype."""
    features = unit_features(33, 16, seed=3)
    scale = 14.3
    ulp = torch.finfo(dtype).eps  # gradients are compared after rounding to `dtype`
    compare(RankCLIPLoss(0.5, 0.3, 1e-10, 8), rankclip_oracle(0.5, 0.3, 1e-10), features, scale, RANK_KEYS,
            dtype=dtype, rel=ulp)


@pytest.mark.parametrize("lambda1,lambda2", [(0.0, 0.3), (0.5, 0.0)])
def test_rankclip_zero_lambda_skips_its_term(lambda1, lambda2):
    features = unit_features(9, 8, seed=4)
    compare(RankCLIPLoss(lambda1, lambda2, 1e-10, 4), rankclip_oracle(lambda1, lambda2, 1e-10), features, 14.3,
            ("loss", "contrastive_loss", "rank_loss"), rank_weight=1.5)
    out, _, _ = evaluate(RankCLIPLoss(lambda1, lambda2, 1e-10, 4), features, 14.3, torch.float32)
    skipped = "inmodal_rank_loss" if lambda1 == 0 else "crossmodal_rank_loss"
    kept = "crossmodal_rank_loss" if lambda1 == 0 else "inmodal_rank_loss"
    assert out[skipped].item() == 0.0 and out[kept].item() > 0.0


def test_rankclip_without_rank_terms_is_clip():
    features = unit_features(9, 8, seed=5)
    rank, rank_grads, rank_scale = evaluate(RankCLIPLoss(0.0, 0.0, chunk_size=4), features, 14.3, torch.float32)
    clip, clip_grads, clip_scale = evaluate(ClipLoss(chunk_size=4), features, 14.3, torch.float32)
    assert set(clip) == {"loss", "contrastive_loss"}
    assert torch.equal(rank["loss"], clip["loss"]) and rank["rank_loss"].item() == 0.0
    assert all(torch.equal(a, b) for a, b in zip(rank_grads, clip_grads)) and torch.equal(rank_scale, clip_scale)


def test_rank_weight_zero_still_reports_rank_terms():
    features = unit_features(9, 8, seed=6)
    compare(RankCLIPLoss(0.5, 0.3, 1e-10, 4), rankclip_oracle(0.5, 0.3, 1e-10), features, 14.3, RANK_KEYS,
            rank_weight=0.0)
    out, _, _ = evaluate(RankCLIPLoss(0.5, 0.3, 1e-10, 4), features, 14.3, torch.float32, rank_weight=0.0)
    assert out["rank_loss"].item() > 0.0 and out["loss"].item() == pytest.approx(out["contrastive_loss"].item())


@pytest.mark.parametrize("ours,oracle,keys", [
    (RankCLIPLoss(0.5, 0.3, 1e-10, 4), rankclip_oracle(0.5, 0.3, 1e-10), RANK_KEYS),
    (ClipLoss(4), rankclip_oracle(0.0, 0.0, 1e-10), ("loss", "contrastive_loss")),
    (CyClipLoss(0.25, 0.5, 4), cyclip_oracle(0.25, 0.5),
     ("loss", "contrastive_loss", "inmodal_cyclic_loss", "crossmodal_cyclic_loss")),
], ids=["rankclip", "clip", "cyclip"])
def test_augmented_views_add_the_inmodal_contrastive_term(ours, oracle, keys):
    """--inmodal: contrastive = (crossmodal + inmodal) / 2; the rank and cyclic terms use the plain views."""
    compare(ours, oracle, unit_features(10, 8, seed=7, count=4), 14.3, keys, rank_weight=1.5)


@pytest.mark.parametrize("n", [1, 7, 33])
@pytest.mark.parametrize("scale", [1.0, 100.0])
@pytest.mark.parametrize("cylambda1,cylambda2", [(0.25, 0.5), (0.0, 0.5), (0.3, 0.0)])
def test_cyclip_matches_oracle(n, scale, cylambda1, cylambda2):
    features = unit_features(n, 8, seed=n)
    keys = ("loss", "contrastive_loss", "inmodal_cyclic_loss", "crossmodal_cyclic_loss")
    compare(CyClipLoss(cylambda1, cylambda2, 5), cyclip_oracle(cylambda1, cylambda2), features, scale, keys[:2])
    out, _, _ = evaluate(CyClipLoss(cylambda1, cylambda2, 5), features, scale, torch.float32)
    want = oracle_cyclip(*features, torch.tensor(scale, dtype=torch.float64), cylambda1, cylambda2)
    for key, weight in zip(keys[2:], (cylambda1, cylambda2)):
        assert_close(out[key], want[key] if weight else torch.zeros((), dtype=torch.float64))


def test_values_without_autograd_match_and_only_loss_has_gradient():
    features = [f.float() for f in unit_features(9, 8, seed=8)]
    scale = torch.tensor(14.3, requires_grad=True)
    loss = RankCLIPLoss(0.5, 0.3, chunk_size=4)
    with_grad = loss(*[f.requires_grad_() for f in features], scale)
    with torch.no_grad():
        without = loss(*features, scale)
    for key in RANK_KEYS:
        assert torch.equal(with_grad[key].detach(), without[key])
        assert with_grad[key].requires_grad == (key == "loss")


def test_invalid_inputs_are_rejected():
    i, t = unit_features(4, 8, seed=9)
    with pytest.raises(ValueError, match="one shape"):
        RankCLIPLoss()(i, t[:3], torch.tensor(10.0))
    with pytest.raises(ValueError, match="together"):
        ClipLoss()(i, t, torch.tensor(10.0), augmented_image_features=i)
    with pytest.raises(ValueError, match="positive"):
        ClipLoss()(i, t, torch.tensor(0.0))
    with pytest.raises(ValueError, match=">= 0"):
        RankCLIPLoss(lambda1=-1.0)


@pytest.mark.parametrize("epoch,epochs,want", [
    (0, 64, 0.0), (1, 64, 0.0), (2, 64, 3 / 63), (22, 64, 1.0), (43, 64, 2.0), (64, 64, 2.0), (80, 64, 2.0),
    (0, 1, 0.0), (1, 1, 2.0), (1, 2, 0.0), (2, 2, 2.0),
])
def test_reference_rank_weight_schedule(epoch, epochs, want):
    assert rank_weight(epoch, epochs, "reference") == pytest.approx(want)


def test_constant_and_unknown_rank_weight_schedules():
    assert rank_weight(1, 64, "constant") == 1.0 and rank_weight(1, 1, "constant") == 1.0
    with pytest.raises(ValueError, match="unknown rank schedule"):
        rank_weight(1, 64, "linear")


def test_build_loss():
    weights = dict(lambda1=0.1, lambda2=0.2, rank_eps=0.0, cylambda1=0.3, cylambda2=0.4)
    rank = build_loss(ObjectiveConfig(loss="rankclip", **weights))
    assert isinstance(rank, RankCLIPLoss) and (rank.lambda1, rank.lambda2, rank.eps) == (0.1, 0.2, 0.0)
    cyclic = build_loss(ObjectiveConfig(loss="cyclip", **weights))
    assert isinstance(cyclic, CyClipLoss) and (cyclic.cylambda1, cyclic.cylambda2) == (0.3, 0.4)
    clip = build_loss(ObjectiveConfig(loss="clip", **weights), chunk_size=7)
    assert type(clip) is ClipLoss and clip.chunk_size == 7
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss(ObjectiveConfig(loss="infonce", **weights))


def test_loss_matmuls_run_without_tf32_and_restore_the_setting(monkeypatch):
    import rankclip.losses as losses

    seen = []
    original = losses._RowTerms.apply
    monkeypatch.setattr(losses._RowTerms, "apply",
                        lambda *args: seen.append(torch.backends.cuda.matmul.allow_tf32) or original(*args))
    # Set and restore the backend flag by hand: torch's cuBLAS module refuses the delattr with
    # which newer pytest's monkeypatch undoes a setattr on it.
    towers_setting = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        image, text = (torch.nn.functional.normalize(torch.randn(6, 4), dim=1) for _ in range(2))
        RankCLIPLoss(gather=False)(image, text, torch.tensor(10.0))
        assert seen and not any(seen)
        assert torch.backends.cuda.matmul.allow_tf32  # the towers' setting is back
    finally:
        torch.backends.cuda.matmul.allow_tf32 = towers_setting


@pytest.mark.parametrize("eps", [1e-10, 0.0])
def test_loss_reads_nothing_back_to_the_host(host_reads, eps):
    """No .item()/float()/nonzero() inside the loss: each would stall a GPU's queue at every step."""
    image, text = (f.float().requires_grad_() for f in unit_features(16, 8, seed=11))
    scale = torch.tensor(30.0, requires_grad=True)
    losses = RankCLIPLoss(0.5, 0.3, eps, chunk_size=4)(image, text, scale, augmented_image_features=None)
    losses["loss"].backward()
    CyClipLoss(0.25, 0.5, 4)(image.detach(), text.detach(), scale.detach())
    assert host_reads == []


def test_chunk_size_by_device():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert [default_chunk_size(cpu, n) for n in (128, 4096, 8192, 65536)] == [128, 128, 64, 64]
    assert [default_chunk_size(gpu, n) for n in (4096, 32768, 10**6)] == [3276, 409, 256]


def test_default_chunks_give_the_one_chunk_result():
    """N = 300 on the CPU: three chunks of at most 128 rows, the same loss and gradients as one chunk."""
    features = unit_features(300, 16, seed=12)
    chunked, chunked_grads, chunked_scale = evaluate(RankCLIPLoss(0.5, 0.3), features, 30.0, torch.float32)
    whole, whole_grads, whole_scale = evaluate(RankCLIPLoss(0.5, 0.3, chunk_size=300), features, 30.0, torch.float32)
    for key in RANK_KEYS:
        torch.testing.assert_close(chunked[key], whole[key], rtol=1e-6, atol=1e-6)
    for a, b in zip([*chunked_grads, chunked_scale], [*whole_grads, whole_scale]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
