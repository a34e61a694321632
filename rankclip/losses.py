"""CLIP, CyCLIP, RankCLIP and SigLIP objectives, and the Plackett-Luce (ListMLE) kernel behind RankCLIP.

Similarity matrices are never materialized whole: `_RowTerms` walks the rows in chunks
(`default_chunk_size`: large on GPUs, cache-sized on CPUs), so at most chunk × N similarities
per term are alive and memory grows linearly in N. It computes the gradients in the forward pass (sorting, the costly part, then
happens once) and keeps only the O(N·d) feature gradients for backward. Math is fp32 (float64
for CyCLIP's Gram terms) whatever the feature dtype; gradients come back in the features'
dtype. Only `loss` carries gradient: the other returned values are detached, for logging.

Distributed (W > 1 processes): each loss takes this process's rows and gathers the columns
with `gather_with_grad`. Values are normalized so that their mean over processes is the
single-process value on the global batch, and each process's feature gradient is W × the
single-process gradient of its rows, which DDP's averaging turns into the full-batch gradient.
SigLIP is open_clip's own `SigLipLoss`, which keeps the same contract (see `SigLipLoss` here).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

import open_clip.loss
import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .collectives import gather_with_grad, rank_and_world
from .config import LOSSES, RANK_SCHEDULES, SIGLIP_DIST_IMPLS, ObjectiveConfig

# open_clip.create_model's arguments for a SigLIP model, as open_clip_train's --siglip sets them: the
# logit scale starts at 10 (not 1/0.07) and the learnt logit bias at -10, so that the N - 1 negatives of
# each row do not swamp its one positive at the start (Zhai et al., 2023).
SIGLIP_INIT = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}

# Row chunks (see default_chunk_size). Memory per term is about CHUNK_BYTES_PER_SIMILARITY x rows x N.
CHUNK_BYTES_PER_SIMILARITY = 80
CPU_CHUNK_SIMILARITIES = 2**19  # 2 MiB of fp32 similarities: about one core's L2 cache
CPU_CHUNK_ROWS = (64, 128)
GPU_CHUNK_BYTES = 2**30
GPU_MIN_CHUNK_ROWS = 256
# Exponents are clamped to _FLOOR before exp: below it fp32 exp is denormal or zero anyway
# and an order of magnitude slower. The direct Plackett-Luce path needs every normalizer
# Z' >= _TINY: that keeps each 1/Z' finite and the clamp's error (at most N·e^_FLOOR in any
# Z') negligible. Z' >= eps, so eps >= _TINY (the default 1e-10) guarantees it; with a smaller
# eps (0 is the exact likelihood) every row takes the log-space path, exact for any spread.
# The choice depends on eps alone, so it never needs the host to look at the data (a sync).
_FLOOR = -87.0
_TINY = 2.0 ** -80


def default_chunk_size(device: torch.device, columns: int) -> int:
    """Rows per chunk of the loss for N = `columns`, chosen by device.

    GPU: as many rows as a 1 GiB working set allows (GPU_CHUNK_BYTES / (80 bytes · N)), at least
    256: a GPU wants few, large kernels, and the loss's memory stays a small, fixed share of the
    device (at N = 32768, 409 rows; up to N ≈ 50 000 a whole local batch of 256+ rows). CPU: about
    2^19 similarities per chunk (a chunk's several rows × N arrays then stay near the cache), within
    [64, 128] rows: fewer rows make the per-operation overhead dominate, more spill the cache
    (the sweep behind the range is in the README's Performance section).
    """
    if device.type == "cuda":
        return max(GPU_MIN_CHUNK_ROWS, GPU_CHUNK_BYTES // (CHUNK_BYTES_PER_SIMILARITY * columns))
    low, high = CPU_CHUNK_ROWS
    return min(high, max(low, CPU_CHUNK_SIMILARITIES // columns))


def _pl_log_space(z: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """The fast path's (loss, dL/dz, max-shift term) in log space, exact for any spread of `z`."""
    log_norm = torch.logcumsumexp(z, 1)
    if eps > 0:
        log_norm = torch.logaddexp(log_norm, torch.full_like(log_norm, math.log(eps)))
    log_tail = torch.logcumsumexp(-log_norm.flip(1), 1).flip(1)
    shift = (log_tail[:, :1] + math.log(eps)).exp() if eps > 0 else torch.zeros_like(z[:, :1])
    return log_norm.sum(1) - z.sum(1), (z + log_tail).exp_().sub_(1), shift


def _argsort_rows(x: Tensor) -> Tensor:
    """Ascending argsort along dim 1 of a 2-D fp32 tensor; ties keep column order (a stable sort).

    On CPU this is one radix sort of int64 keys (row index, then the float's bits mapped to an
    order-preserving integer; + 0.0 turns -0.0 into +0.0) instead of a comparison sort per
    row: 1.4-2.5× faster on one thread.
    """
    if x.device.type != "cpu":
        return x.argsort(dim=1, stable=True)
    bits = (x + 0.0).view(torch.int32)
    keys = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)
    keys += torch.arange(2**31, (x.shape[0] << 32) + 2**31, 1 << 32)[:, None]  # row, then the value in [0, 2³²)
    flat = keys.view(-1).sort(stable=True).indices
    return flat.view(x.shape) - torch.arange(0, x.numel(), x.shape[1])[:, None]


def _ranked_rows(logits: Tensor, order: Tensor, eps: float, want_grad: bool, pl_weight: float = 1.0,
                 labels: Optional[Tensor] = None,
                 ce_weight: float = 0.0) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Plackett-Luce NLL of each row of fp32 `logits` ranked by `order`, fused with the rows' cross-entropy.

    Returns (NLL per row, CE per row against `labels` or None, ∂(pl_weight·ΣNLL + ce_weight·ΣCE)/∂logits
    if `want_grad` else None). `order[i]` lists row i's columns by ascending target, so the top-ranked
    item comes last and DESIGN.md's suffix sums Z_k become prefix sums: with z the row sorted that way
    minus its max, Z'_p = Σ_{q≤p} e^{z_q} + eps and the NLL is Σ_p log Z'_p − z_p. Its gradient is
    ∂/∂z_p = e^{z_p}·Σ_{q≥p} 1/Z'_q − 1, plus Σ_q eps/Z'_q on the row's argmax (the max shift only
    matters through eps). The CE reuses the exponentials: its softmax is e^z / Σe^z.
    """
    top, argmax = logits.max(dim=1, keepdim=True)
    z = logits.gather(1, order).sub_(top)
    if eps >= _TINY:
        rank, grad, shift, exp_z = _pl_direct(z, eps, want_grad)
    else:
        rank, grad, shift = _pl_log_space(z, eps)
        exp_z = z.clamp_min_(_FLOOR).exp_()
    total_exp = exp_z.sum(1)  # >= 1: the row max contributes e^0
    ce = None
    if labels is not None:
        ce = top.squeeze(1) + total_exp.log() - logits.gather(1, labels[:, None]).squeeze(1)
    if not want_grad:
        return rank, ce, None
    grad.mul_(pl_weight)
    if labels is not None:
        grad.addcmul_(exp_z, (ce_weight / total_exp)[:, None])
    out = torch.empty_like(logits).scatter_(1, order, grad)
    out.scatter_add_(1, argmax, shift.mul_(pl_weight))
    if labels is not None:
        out[torch.arange(len(labels), device=labels.device), labels] -= ce_weight
    return rank, ce, out


def _pl_direct(z: Tensor, eps: float, want_grad: bool) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Tensor]:
    """(loss, dL/dz, max-shift term, e^z) of rows whose normalizers are all >= _TINY; consumes `z`."""
    rank = -z.sum(1)
    exp_z = z.clamp_min_(_FLOOR).exp_()
    norm = exp_z.cumsum(1).add_(eps)
    tail = norm.reciprocal().flip(1).cumsum(1).flip(1) if want_grad else None
    rank += norm.log_().sum(1)
    if tail is None:
        return rank, None, None, exp_z
    shift = tail[:, :1] * eps
    return rank, tail.mul_(exp_z).sub_(1), shift, exp_z


class _PlackettLuce(torch.autograd.Function):
    """plackett_luce_nll's rows, with the analytic gradient computed in the forward pass."""

    @staticmethod
    def forward(ctx, pred: Tensor, true: Tensor, eps: float) -> Tensor:
        rank, _, grad = _ranked_rows(pred.float(), _argsort_rows(true.float()), eps, ctx.needs_input_grad[0])
        ctx.save_for_backward(grad)
        ctx.dtype = pred.dtype
        return rank

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor) -> tuple[Optional[Tensor], None, None]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss[:, None]).to(ctx.dtype), None, None


def plackett_luce_nll(pred: Tensor, true: Tensor, eps: float = 1e-10) -> Tensor:
    """Per-row ListMLE loss: the Plackett-Luce NLL of each row of `true`'s ranking under `pred`.

    For row i, with π = true[i] sorted descending and ã = pred[i] − max(pred[i]):
    Σ_k log(Σ_{m≥k} exp(ã_π(m)) + eps) − ã_π(k). eps = 0 is the exact NLL (computed in log
    space where fp32 would underflow). Math is fp32 for any input dtype, with the analytic
    gradient. Gradient flows to `pred` only: `true` is a ranking target, and a sort index
    carries no gradient (as in the reference's dense ListMLE).
    """
    if pred.dim() != 2 or pred.shape != true.shape:
        raise ValueError(f"pred and true must be 2-D of one shape, got {tuple(pred.shape)} and {tuple(true.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return _PlackettLuce.apply(pred, true.detach(), eps)


def _ce_rows(logits: Tensor, labels: Tensor, want_grad: bool, weight: float) -> tuple[Tensor, Optional[Tensor]]:
    """Cross-entropy of each row against its label, and weight·∂/∂logits when asked for."""
    top = logits.amax(dim=1, keepdim=True)
    exp_l = torch.sub(logits, top).clamp_min_(_FLOOR).exp_()
    total_exp = exp_l.sum(1)
    ce = top.squeeze(1) + total_exp.log() - logits.gather(1, labels[:, None]).squeeze(1)
    if not want_grad:
        return ce, None
    grad = exp_l.mul_((weight / total_exp)[:, None])
    grad[torch.arange(len(labels), device=labels.device), labels] -= weight
    return ce, grad


def _assert_positive(scale: Tensor) -> None:
    """Refuse a non-positive logit scale (it is exp of a parameter) without a host sync: on a GPU the
    check is queued with the kernels, on the CPU it runs at once."""
    message = "logit_scale must be positive (it is exp of the parameter)"
    try:
        torch._assert_async(scale > 0, message)
    except RuntimeError as e:
        raise ValueError(f"{message}, got {scale.item()}") from e


class _RowTerms(torch.autograd.Function):
    """Summed loss terms over this process's rows of s·X·Yᵀ and s·U·Vᵀ, chunk by chunk.

    X, U hold local rows, Y, V the global columns. For each row of either matrix: the
    cross-entropy against the row's global index (when `ce_weight` is set) and the
    Plackett-Luce NLL of the row's ranking in the other matrix (when `pl_weight` is set):
    PL(s·X·Yᵀ, U·Vᵀ) and PL(s·U·Vᵀ, X·Yᵀ); the scale s > 0 does not change a ranking.
    Returns (ce_weight·ce_sum + pl_weight·pl_sum, ce_sum, pl_sum); only the first is
    differentiable, its gradient is computed here in the forward pass.
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, u: Tensor, v: Tensor, scale: Tensor, ce_weight: Optional[float],
                pl_weight: Optional[float], eps: float, offset: int, chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
        feats = [t.float() for t in (x, y, u, v)]
        s = scale.detach().float()  # a tensor: reading its value on the host would wait for the GPU
        _assert_positive(s)
        wants = ctx.needs_input_grad[:5]
        grads = [torch.zeros_like(f) if want else None for f, want in zip(feats, wants)]
        grad_scale = torch.zeros((), dtype=torch.float64, device=x.device)
        sums = torch.zeros(2, dtype=torch.float64, device=x.device)
        want = any(wants) and bool(ce_weight or pl_weight)
        for start in range(0, x.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = [(feats[0][rows] * s) @ feats[1].T, (feats[2][rows] * s) @ feats[3].T]
            labels = torch.arange(offset + start, offset + start + len(logits[0]), device=x.device)
            for side, (a, b) in enumerate(((0, 1), (2, 3))):  # rows and columns of X·Yᵀ, then of U·Vᵀ
                if pl_weight is None:
                    ce, grad = _ce_rows(logits[side], labels, want, ce_weight)
                else:
                    order = _argsort_rows(logits[1 - side])
                    rank, ce, grad = _ranked_rows(logits[side], order, eps, want, pl_weight,
                                                  None if ce_weight is None else labels, ce_weight or 0.0)
                    sums[1] += rank.sum()
                if ce is not None:
                    sums[0] += ce.sum()
                if grad is None:
                    continue
                # The factor s of ∂logits/∂features is applied once, after the loop.
                if grads[a] is not None:
                    grads[a][rows].addmm_(grad, feats[b])
                if grads[b] is not None:
                    grads[b].addmm_(grad.T, feats[a][rows])
                # in float64: the terms largely cancel, and an fp32 dot loses ~1e-5 of the result at N = 8192
                grad_scale += torch.dot(grad.view(-1).double(), logits[side].view(-1).double())
        grads = [g if g is None else g.mul_(s) for g in grads]
        ctx.grads = [*grads, (grad_scale / s.double()).reshape(scale.shape)]
        ctx.dtypes = [t.dtype for t in (x, y, u, v, scale)]
        ce_sum, pl_sum = (sums[i].float() for i in range(2))
        total = (ce_weight or 0.0) * ce_sum + (pl_weight or 0.0) * pl_sum
        ctx.mark_non_differentiable(ce_sum, pl_sum)
        return total, ce_sum, pl_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: Tensor, *_) -> tuple[Optional[Tensor], ...]:
        grads = [None if g is None else (g * grad_total).to(dtype) for g, dtype in zip(ctx.grads, ctx.dtypes)]
        return (*grads, None, None, None, None, None)


class _Views(NamedTuple):
    """This process's rows of a feature pair and the global batch gathered with gradient."""

    image: Tensor
    text: Tensor
    images: Tensor
    texts: Tensor
    offset: int  # global index of the first local row
    total: int  # global batch size N

    @classmethod
    def of(cls, image: Tensor, text: Tensor, gather: bool) -> _Views:
        if image.dim() != 2 or image.shape != text.shape:
            raise ValueError(f"image and text features must be 2-D of one shape, "
                             f"got {tuple(image.shape)} and {tuple(text.shape)}")
        if not gather:
            return cls(image, text, image, text, 0, image.shape[0])
        rank, world = rank_and_world()
        n = image.shape[0]
        return cls(image, text, gather_with_grad(image), gather_with_grad(text), rank * n, world * n)


@contextlib.contextmanager
def _full_fp32_matmuls() -> Iterator[None]:
    """TF32 off while the loss runs, even where the towers use it (launch.configure_device):
    with TF32's 10-bit mantissa, logits at s = 100 are off by ~1e-3, enough to swap near-tied
    ranks in the Plackett-Luce targets and far from the fp32 accuracy the loss is tested to."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


class ClipLoss(nn.Module):
    """CLIP's symmetric cross-entropy; with augmented views, CyCLIP's (crossmodal + inmodal) / 2.

    The in-modal part (the original code's --inmodal) is (CE(s·I·I_augᵀ) + CE(s·T·T_augᵀ)) / 2. Every
    loss takes the same arguments; `rank_weight` only matters to RankCLIPLoss. With
    `gather=False` the features are the whole batch even in a distributed run, as for an
    evaluation that only one process runs (gathering there would wait for the others forever).
    """

    def __init__(self, chunk_size: Optional[int] = None, gather: bool = True) -> None:
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size, self.gather = chunk_size, gather

    def rows_per_chunk(self, views: _Views) -> int:
        """`chunk_size` if given, else default_chunk_size for the features' device and N."""
        return self.chunk_size or default_chunk_size(views.image.device, views.total)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, rank_weight: float = 1.0,
                augmented_image_features: Optional[Tensor] = None,
                augmented_text_features: Optional[Tensor] = None) -> dict[str, Tensor]:
        with _full_fp32_matmuls():  # every matmul of the loss and its gradient runs here, in _RowTerms.forward
            return self._forward(image_features, text_features, logit_scale, rank_weight,
                                 augmented_image_features, augmented_text_features)

    def _forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, rank_weight: float,
                 augmented_image_features: Optional[Tensor],
                 augmented_text_features: Optional[Tensor]) -> dict[str, Tensor]:
        views = _Views.of(image_features, text_features, self.gather)
        augmented = None
        if augmented_image_features is not None or augmented_text_features is not None:
            if augmented_image_features is None or augmented_text_features is None \
                    or augmented_image_features.shape != image_features.shape:
                raise ValueError("augmented_image_features and augmented_text_features must be given together, "
                                 "shaped like image_features and text_features")
            augmented = _Views.of(augmented_image_features, augmented_text_features, self.gather)
        return self._losses(views, logit_scale, rank_weight, augmented)

    def _losses(self, views: _Views, scale: Tensor, rank_weight: float,
                augmented: Optional[_Views]) -> dict[str, Tensor]:
        loss, contrastive, _ = self._contrastive(views, scale, augmented)
        return {"loss": loss, "contrastive_loss": contrastive}

    def _contrastive(self, views: _Views, scale: Tensor, augmented: Optional[_Views],
                     pl_weight: Optional[float] = None, eps: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        """(differentiable total, contrastive value, summed cross-modal PL rows when `pl_weight` is set)."""
        ce_weight = 1 / (2 * len(views.image) * (1 if augmented is None else 2))
        total, ce_sum, pl_sum = _RowTerms.apply(views.image, views.texts, views.text, views.images, scale, ce_weight,
                                                pl_weight, eps, views.offset, self.rows_per_chunk(views))
        if augmented is not None:
            aug_total, aug_ce, _ = _RowTerms.apply(views.image, augmented.images, views.text, augmented.texts, scale,
                                                   ce_weight, None, 0.0, views.offset, self.rows_per_chunk(views))
            total, ce_sum = total + aug_total, ce_sum + aug_ce
        return total, ce_sum * ce_weight, pl_sum


class RankCLIPLoss(ClipLoss):
    """contrastive + rank_weight·(lambda1·R_in + lambda2·R_cross), as DESIGN.md's "The objective" defines it.

    R_cross = (PL(S, Sᵀ) + PL(Sᵀ, S)) / (2N), R_in = (PL(s·I·Iᵀ, s·T·Tᵀ) + PL(s·T·Tᵀ, s·I·Iᵀ)) / (2N),
    PL being the mean over rows of `plackett_luce_nll`. A lambda of 0 skips its term (reported as 0).
    Returned: loss, contrastive_loss, rank_loss (= lambda1·R_in + lambda2·R_cross, without
    rank_weight), inmodal_rank_loss (R_in) and crossmodal_rank_loss (R_cross).
    """

    def __init__(self, lambda1: float = 1 / 16, lambda2: float = 1 / 16, eps: float = 1e-10,
                 chunk_size: Optional[int] = None, gather: bool = True) -> None:
        super().__init__(chunk_size, gather)
        if lambda1 < 0 or lambda2 < 0 or eps < 0:
            raise ValueError(f"lambda1, lambda2 and eps must be >= 0, got {lambda1}, {lambda2}, {eps}")
        self.lambda1, self.lambda2, self.eps = lambda1, lambda2, eps

    def _losses(self, views: _Views, scale: Tensor, rank_weight: float,
                augmented: Optional[_Views]) -> dict[str, Tensor]:
        per_row = 1 / (2 * len(views.image) * views.total)  # mean over (local) rows, then / (2N)
        cross_weight = rank_weight * self.lambda2 * per_row if self.lambda2 else None
        loss, contrastive, cross_sum = self._contrastive(views, scale, augmented, cross_weight, self.eps)
        in_sum = torch.zeros_like(cross_sum)
        if self.lambda1:
            inmodal, _, in_sum = _RowTerms.apply(views.image, views.images, views.text, views.texts, scale, None,
                                                 rank_weight * self.lambda1 * per_row, self.eps, views.offset,
                                                 self.rows_per_chunk(views))
            loss = loss + inmodal
        inmodal_rank, crossmodal_rank = in_sum * per_row, cross_sum * per_row
        return {"loss": loss, "contrastive_loss": contrastive,
                "rank_loss": self.lambda1 * inmodal_rank + self.lambda2 * crossmodal_rank,
                "inmodal_rank_loss": inmodal_rank, "crossmodal_rank_loss": crossmodal_rank}


class CyClipLoss(ClipLoss):
    """CyCLIP: contrastive + cylambda1·inmodal_cyclic + cylambda2·crossmodal_cyclic.

    inmodal_cyclic = ‖s·I·Iᵀ − s·T·Tᵀ‖²_F / (s²·N) and crossmodal_cyclic = ‖s·I·Tᵀ − s·T·Iᵀ‖²_F /
    (s²·N), CyCLIP's `.square().mean() / s² · N`. s cancels, so neither depends on the logit scale, and
    both are evaluated through d×d Gram matrices in float64 (O(N·d²) time, O(d²) memory, no
    cancellation trouble). Every process computes them on the gathered global batch, so its
    value is the global one and, through the gather's summed backward, its feature gradient
    is W × the single-process one.
    """

    def __init__(self, cylambda1: float, cylambda2: float, chunk_size: Optional[int] = None,
                 gather: bool = True) -> None:
        super().__init__(chunk_size, gather)
        if cylambda1 < 0 or cylambda2 < 0:
            raise ValueError(f"cylambda1 and cylambda2 must be >= 0, got {cylambda1}, {cylambda2}")
        self.cylambda1, self.cylambda2 = cylambda1, cylambda2

    def _losses(self, views: _Views, scale: Tensor, rank_weight: float,
                augmented: Optional[_Views]) -> dict[str, Tensor]:
        loss, contrastive, _ = self._contrastive(views, scale, augmented)
        inmodal = crossmodal = torch.zeros((), dtype=torch.float64, device=contrastive.device)
        if self.cylambda1 or self.cylambda2:
            images, texts = views.images.double(), views.texts.double()
            gram_i, gram_t, mixed = images.T @ images, texts.T @ texts, texts.T @ images
            if self.cylambda1:  # ‖I·Iᵀ − T·Tᵀ‖² = ‖IᵀI‖² + ‖TᵀT‖² − 2‖TᵀI‖²
                inmodal = (gram_i.square().sum() + gram_t.square().sum() - 2 * mixed.square().sum()) / views.total
            if self.cylambda2:  # ‖I·Tᵀ − T·Iᵀ‖² = 2⟨IᵀI, TᵀT⟩ − 2 tr((TᵀI)²)
                crossmodal = 2 * ((gram_i * gram_t).sum() - (mixed * mixed.T).sum()) / views.total
            loss = loss + (self.cylambda1 * inmodal + self.cylambda2 * crossmodal).float()
        return {"loss": loss, "contrastive_loss": contrastive, "inmodal_cyclic_loss": inmodal.detach().float(),
                "crossmodal_cyclic_loss": crossmodal.detach().float()}


class SigLipLoss(nn.Module):
    """SigLIP's sigmoid loss, computed by open_clip's `SigLipLoss`, behind this project's loss interface.

    Value: with S = s·I·Tᵀ + b over the global batch and labels +1 on the diagonal, −1 elsewhere,
    siglip_loss = −Σ_ij log σ(label_ij·S_ij) / N, a sum over columns and a mean over rows. In a
    distributed run each process's open_clip loss takes its n = N/W image rows against its own
    texts and, passed between the processes as `dist_impl` says, everyone else's, divided by n (its
    local batch): the mean over processes is the single-process value, and each process's feature
    gradient (the exchanges carry gradient back to the texts' owners) is W × the single-process
    one, which DDP's averaging turns into the full-batch gradient, as for the other objectives.
    That is open_clip_train's use exactly: its loss's value, backpropagated as it is.

    `gather=False` (one process's evaluation of the whole batch) also reports `contrastive_loss`,
    CLIP's loss on the same features, so that validation compares with the other objectives; in
    training it would cost a gather of the features that SigLIP's exchanges are there to avoid.
    `rank_weight` is accepted like every loss's and unused; SigLIP has no augmented-view term.
    """

    def __init__(self, dist_impl: str = "bidir", gather: bool = True) -> None:
        super().__init__()
        if dist_impl not in SIGLIP_DIST_IMPLS:
            raise ValueError(f"unknown dist_impl {dist_impl!r}; choose one of {', '.join(SIGLIP_DIST_IMPLS)}")
        self.dist_impl, self.gather = dist_impl, gather

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, rank_weight: float = 1.0,
                logit_bias: Optional[Tensor] = None, augmented_image_features: Optional[Tensor] = None,
                augmented_text_features: Optional[Tensor] = None) -> dict[str, Tensor]:
        if logit_bias is None:
            raise ValueError("SigLIP needs the model's logit_bias: build the model with SIGLIP_INIT")
        if augmented_image_features is not None or augmented_text_features is not None:
            raise ValueError("SigLIP has no augmented-view (--inmodal) term")
        rank, world = rank_and_world() if self.gather else (0, 1)
        # The process group is read at each call: the loss may be built before it exists.
        siglip = open_clip.loss.SigLipLoss(rank=rank, world_size=world, dist_impl=self.dist_impl)
        with _full_fp32_matmuls():
            loss = siglip(image_features.float(), text_features.float(), logit_scale.float(), logit_bias.float())
        out = {"loss": loss, "siglip_loss": loss.detach()}
        if not self.gather:
            with torch.no_grad():
                out["contrastive_loss"] = ClipLoss(gather=False)(image_features, text_features,
                                                                 logit_scale)["contrastive_loss"]
        return out


def model_init(loss: str) -> dict[str, float]:
    """open_clip.create_model's keyword arguments that objective `loss` needs of the model (SIGLIP_INIT
    for SigLIP, which learns a logit bias; none for the others)."""
    return dict(SIGLIP_INIT) if loss == "siglip" else {}


def build_loss(objective: ObjectiveConfig, chunk_size: Optional[int] = None, gather: bool = True) -> nn.Module:
    """The training objective named by --loss, with its weights (`gather=False`: see ClipLoss)."""
    if objective.loss == "rankclip":
        return RankCLIPLoss(objective.lambda1, objective.lambda2, objective.rank_eps, chunk_size, gather)
    if objective.loss == "clip":
        return ClipLoss(chunk_size, gather)
    if objective.loss == "cyclip":
        return CyClipLoss(objective.cylambda1, objective.cylambda2, chunk_size, gather)
    if objective.loss == "siglip":
        return SigLipLoss(objective.loss_dist_impl, gather)
    raise ValueError(f"unknown loss {objective.loss!r}; choose one of {', '.join(LOSSES)}")


@dataclass(frozen=True)
class RankWeightSchedule:
    """The rank loss's weight over a run of `epochs` epochs (--rank_schedule, see `rank_weight`)."""

    schedule: str
    epochs: int

    def __call__(self, epoch: int) -> float:
        return rank_weight(epoch, self.epochs, self.schedule)


def rank_weight(epoch: int, epochs: int, schedule: str = "reference") -> float:
    """Weight of the rank loss in `epoch` (counted from 1; 0 = before training) of `epochs`.

    "reference": the reference code's ramp clamp(3·(epoch − 1)/(epochs − 1), 0, 2), which
    reaches its cap of 2 two thirds into training. With epochs = 1 the single epoch is also
    the last one, so it gets the final weight 2 (rather than 0, which would silently train
    plain CLIP). "constant": 1.
    """
    if schedule == "constant":
        return 1.0
    if schedule != "reference":
        raise ValueError(f"unknown rank schedule {schedule!r}; choose one of {', '.join(RANK_SCHEDULES)}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if epoch < 1:
        return 0.0
    progress = 1.0 if epochs == 1 else (min(epoch, epochs) - 1) / (epochs - 1)
    return min(2.0, max(0.0, 3.0 * progress))
