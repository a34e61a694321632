"""Retrieval recall and representation analysis on precomputed, L2-normalized features.

Pure tensor functions: the caller encodes once, these only compare. Math is fp32 on the
features' device, and similarity matrices are walked in chunks of `chunk_size` rows, so
memory grows linearly in N (a few chunk_size × N arrays at a time). Features are expected
to be unit rows (as `encode_image(..., normalize=True)` returns them); they are not
renormalized here, because alignment, uniformity and the modality gap are statements about
those unit vectors.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

RECALL_KS = (1, 5, 10)
# Rows per chunk. Peak memory is about 100 bytes × chunk_size × N (the Spearman rows are sorted and
# ranked with int64 indices); 256 keeps that near 1.3 GB at N = 50,000.
DEFAULT_CHUNK_SIZE = 256
UNIFORMITY_T = 2.0


def topk_correct(logits: Tensor, labels: Tensor, ks: Sequence[int]) -> dict[int, int]:
    """How many rows of `logits` [N, C] have their label among their k highest entries, for each
    k (capped at C, so k ≥ C counts every row)."""
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


def _check_features(name: str, features: Tensor) -> None:
    if features.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(features.shape)}")


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


@torch.no_grad()
def retrieval_recall(image_features: Tensor, text_features: Tensor, text_image: Tensor,
                     ks: Sequence[int] = RECALL_KS, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, float]:
    """Recall@k both ways for I images and T captions, caption t describing image `text_image[t]`.

    image→text: an image is a hit at k if ANY of its captions is among its k most similar
    captions (the Flickr30k / MSCOCO 5-caption protocol); averaged over the images that have
    at least one caption (an image without captions has nothing to retrieve, so it is skipped
    rather than counted as a miss). text→image: a caption is a hit at k if its image is among
    its k most similar images; averaged over all captions.

    Ties count against the query: the rank of the right answer is 1 + the number of wrong
    answers scoring at least as high. So a collapsed model (all similarities equal) scores 0
    rather than a perfect 1 (for k below the number of wrong answers), and no result depends on
    how a sort happens to break ties.
    Returns keys image_to_text_R@k and text_to_image_R@k for each k in `ks`, values in [0, 1].
    """
    _check_features("image_features", image_features)
    _check_features("text_features", text_features)
    _check_chunk_size(chunk_size)
    num_images, num_texts = len(image_features), len(text_features)
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"image and text features differ in width: "
                         f"{image_features.shape[1]} vs {text_features.shape[1]}")
    if text_image.shape != (num_texts,) or text_image.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"text_image must be an integer tensor of shape [{num_texts}] (one image index per caption), "
                         f"got {text_image.dtype} of shape {tuple(text_image.shape)}")
    if num_texts == 0:
        raise ValueError("text_features is empty: retrieval recall needs at least one caption")
    if int(text_image.min()) < 0 or int(text_image.max()) >= num_images:
        raise ValueError(f"text_image holds indices outside [0, {num_images}): the caption-to-image map "
                         f"must index rows of image_features")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty list of positive integers, got {list(ks)}")
    device = image_features.device
    images, texts = image_features.float(), text_features.to(device).float()
    text_image = text_image.to(device).long()

    image_ranks = []  # [images with captions]: rank of the image's best-ranked caption
    for start in range(0, num_images, chunk_size):
        sims = images[start:start + chunk_size] @ texts.T  # [c, T]
        own = text_image[None, :] == torch.arange(start, start + len(sims), device=device)[:, None]  # [c, T]
        best_own = sims.masked_fill(~own, -math.inf).amax(dim=1, keepdim=True)  # [c, 1]
        beaten_by = ((sims >= best_own) & ~own).sum(dim=1)  # [c]
        image_ranks.append(1 + beaten_by[own.any(dim=1)])
    text_ranks = []  # [T]: rank of each caption's image
    for start in range(0, num_texts, chunk_size):
        sims = texts[start:start + chunk_size] @ images.T  # [c, I]
        right = sims.gather(1, text_image[start:start + chunk_size, None])  # [c, 1]
        text_ranks.append((sims >= right).sum(dim=1))  # counts the right image itself once: rank from 1
    image_ranks_all, text_ranks_all = torch.cat(image_ranks), torch.cat(text_ranks)
    metrics = {f"image_to_text_R@{k}": int((image_ranks_all <= k).sum()) / len(image_ranks_all) for k in ks}
    return metrics | {f"text_to_image_R@{k}": int((text_ranks_all <= k).sum()) / len(text_ranks_all) for k in ks}


def average_ranks(x: Tensor) -> Tensor:
    """Rank of each entry within its row of 2-D `x` (0-based), tied entries sharing their mean rank.

    This is the tie handling of Spearman's rho (scipy's rankdata(method="average")): n equal
    values at sorted positions p .. p+n−1 all get p + (n−1)/2, so every row's ranks still sum to
    m(m−1)/2. Returned in fp32, exact for rows shorter than 2²⁴.
    """
    values, order = x.sort(dim=1)  # [r, m]
    m = x.shape[1]
    positions = torch.arange(m, device=x.device).expand_as(order)
    differs = values[:, 1:] != values[:, :-1]  # [r, m-1]: a new tie group starts at column j+1
    edge = torch.ones_like(differs[:, :1])
    starts = torch.cat([edge, differs], dim=1)  # [r, m]: first entry of its group
    ends = torch.cat([differs, edge], dim=1)  # [r, m]: last entry of its group
    first = torch.where(starts, positions, 0).cummax(dim=1).values
    last = torch.where(ends, positions, m).flip(1).cummin(dim=1).values.flip(1)
    mean_rank = (first + last).float() / 2
    return torch.empty_like(mean_rank).scatter_(1, order, mean_rank)


def rowwise_spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's rho between each row of `a` [r, m] and the same row of `b` [r, m]: a tensor [r].

    The Pearson correlation of the rows' average ranks (see `average_ranks`). A row in which
    either side is constant carries no ranking, and its correlation (0/0) is defined as 0 here:
    no evidence of agreement, and never a NaN in the logs.
    """
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must be 2-D of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    center = (a.shape[1] - 1) / 2  # the mean of every row of average ranks
    rank_a, rank_b = average_ranks(a) - center, average_ranks(b) - center
    covariance = (rank_a * rank_b).sum(dim=1)
    scale = (rank_a.square().sum(dim=1) * rank_b.square().sum(dim=1)).sqrt()
    return torch.where(scale > 0, covariance / scale, 0.0)


def _off_diagonal(sims: Tensor, start: int) -> Tensor:
    """Rows start.. of an N × N matrix, [c, N], without each row's own column: [c, N−1]."""
    rows = torch.arange(len(sims), device=sims.device)
    keep = torch.ones_like(sims, dtype=torch.bool)
    keep[rows, rows + start] = False
    return sims[keep].view(len(sims), sims.shape[1] - 1)


def _log_mean_exp_pairs(features: Tensor, t: float, chunk_size: int) -> float:
    """log of the mean of exp(−t‖x_i − x_j‖²) over ordered pairs i ≠ j, in log space chunk by chunk."""
    n = len(features)
    norms = features.square().sum(dim=1)  # [N]
    log_sums = []  # per chunk: log Σ exp(−t‖x_i − x_j‖²) over its rows i and all j ≠ i
    for start in range(0, n, chunk_size):
        block = features[start:start + chunk_size]  # [c, d]
        sq_dist = (norms[start:start + chunk_size, None] + norms[None, :] - 2 * block @ features.T).clamp_min(0)
        log_sums.append(torch.logsumexp(_off_diagonal(-t * sq_dist, start).flatten(), 0))
    return torch.logsumexp(torch.stack(log_sums), 0).item() - math.log(n * (n - 1))


@torch.no_grad()
def representation_metrics(image_features: Tensor, text_features: Tensor, *,
                           chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, float]:
    """Rank consistency, alignment, uniformity and modality gap of N paired unit features.

    - inmodal_consistency: mean over rows i of Spearman(row i of I·Iᵀ, row i of T·Tᵀ).
    - crossmodal_consistency: mean over rows i of Spearman(row i of I·Tᵀ, row i of T·Iᵀ).
      Both leave out column i: in-modal it is the trivial self-similarity (always the row's
      maximum, which would inflate agreement), and cross-modal it is the matched pair, whose
      rank is what retrieval recall already measures. So each row ranks the N−1 other samples.
    - alignment (Wang & Isola 2020, alpha = 2): mean over pairs i of ‖I_i − T_i‖².
    - image_uniformity, text_uniformity (Wang & Isola, t = 2): log mean over pairs i ≠ j of
      exp(−t‖x_i − x_j‖²); lower is more uniform.
    - modality_gap (Liang et al. 2022): ‖mean of I − mean of T‖.
    """
    _check_features("image_features", image_features)
    _check_features("text_features", text_features)
    _check_chunk_size(chunk_size)
    if image_features.shape != text_features.shape:
        raise ValueError(f"image and text features must be paired rows of one shape, "
                         f"got {tuple(image_features.shape)} and {tuple(text_features.shape)}")
    n = len(image_features)
    if n < 3:
        raise ValueError(f"representation metrics need at least 3 pairs (rankings of the N−1 others), got {n}")
    images, texts = image_features.float(), text_features.to(image_features.device).float()

    inmodal = crossmodal = 0.0
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        inmodal += rowwise_spearman(_off_diagonal(images[rows] @ images.T, start),  # [c, N−1]
                                    _off_diagonal(texts[rows] @ texts.T, start)).sum().item()
        crossmodal += rowwise_spearman(_off_diagonal(images[rows] @ texts.T, start),
                                       _off_diagonal(texts[rows] @ images.T, start)).sum().item()
    return {
        "inmodal_consistency": inmodal / n,
        "crossmodal_consistency": crossmodal / n,
        "alignment": (images - texts).square().sum(dim=1).mean().item(),
        "image_uniformity": _log_mean_exp_pairs(images, UNIFORMITY_T, chunk_size),
        "text_uniformity": _log_mean_exp_pairs(texts, UNIFORMITY_T, chunk_size),
        "modality_gap": (images.mean(dim=0) - texts.mean(dim=0)).norm().item(),
    }
