"""Collectives the loss and evaluation call: rank queries, an all-gather that carries gradients, and a
gather of rows whose counts differ by rank. They read the default process group themselves (every
rank must call them at the same point anyway) and are plain identities in a one-process run."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gradient over ranks and keeps this rank's slice.

    Each rank's loss covers its own rows against the columns of every rank, so the gradient
    for rank r's features is spread over all W losses: the backward all-reduces (sums) the
    incoming gradient and returns rows [r·n, (r+1)·n). With every rank's loss normalized as a
    mean over its own rows, the result is W × the single-process gradient of those rows,
    which DDP's averaging over ranks turns into exactly the single-process gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = rank_and_world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The global batch from every rank's shard `x` (rank order); `x` itself if not distributed.

    Every rank must call it, with shards of one shape.
    """
    if rank_and_world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


def rank_block(count: int, rank: int, world: int) -> range:
    """Process `rank`'s contiguous share of `count` items for evaluation (sizes differ by at most one);
    the blocks in rank order are range(count)."""
    return range(count * rank // world, count * (rank + 1) // world)


def gather_rows(parts: Sequence[torch.Tensor], device: torch.device,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """This rank's `parts` concatenated along dim 0, then every rank's concatenated in rank order, on
    every rank; row counts may differ, and a rank may have no parts (`device` and `dtype` then
    make its empty share). Only this rank's rows if not distributed."""
    x = torch.cat(list(parts)) if parts else torch.empty(0, dtype=dtype, device=device)
    world = rank_and_world()[1]
    if world == 1:
        return x
    shapes: list[tuple[int, ...]] = [()] * world
    dist.all_gather_object(shapes, tuple(x.shape))
    trailing = next((shape[1:] for shape in shapes if shape[0] > 0), None)
    if trailing is None:
        return x
    rows = max(shape[0] for shape in shapes)
    padded = x.new_zeros((rows, *trailing))
    if len(x):
        padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:shape[0]] for part, shape in zip(parts, shapes)])
