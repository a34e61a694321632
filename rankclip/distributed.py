"""Processes: launch modes, the per-process Runtime, rank queries and an all-gather that carries gradients."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .config import Config, ConfigError


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


# ----------------------------------------------------------------------------------------------
# Processes and devices: one process, `--distributed` (one spawned process per GPU), torchrun
# (env://, any number of nodes) or Slurm's srun (SLURM_* variables + MASTER_ADDR/MASTER_PORT).

PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)  # rank 0 may evaluate a large set while others wait


@dataclass(frozen=True)
class Runtime:
    """Facts about this process, fixed at launch; kept apart from the (user-given) Config."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"world size {self.world_size}, rank {self.rank}, device {self.device}"

    def wrap(self, model: torch.nn.Module, sync_bn: bool = False, compile: bool = False) -> torch.nn.Module:
        """The module the training loop calls: DDP over several processes, optionally compiled.

        With `sync_bn` the BatchNorm layers of `model` are replaced in place by SyncBatchNorm
        (same parameters, so an optimizer built on `model` stays valid): batch statistics are
        then those of the global batch rather than of each process's share.
        """
        wrapped = model
        if sync_bn and self.world_size > 1 and self.device.type != "cuda":
            raise ConfigError("--sync_bn synchronizes BatchNorm over GPUs; on CPUs leave it out")
        if self.world_size > 1:
            if sync_bn:
                torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return torch.compile(wrapped) if compile else wrapped

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all ranks (a sync point); `values` itself for one process."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()


def resolve_device(requested: Optional[str], index: int) -> torch.device:
    """cpu, or cuda:<index> after checking that GPU exists."""
    if requested == "cpu" or (requested is None and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device gpu: no CUDA GPU is visible; use --device cpu")
    if index >= torch.cuda.device_count():
        raise ConfigError(f"GPU {index} does not exist: {torch.cuda.device_count()} GPUs are visible")
    return torch.device("cuda", index)


def _launcher_env() -> Optional[tuple[int, int, int]]:
    """(rank, local rank, world size) set by torchrun or Slurm, or None for a plain launch."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"])
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise ConfigError("under srun set MASTER_ADDR (first node's host name) and MASTER_PORT before launching")
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"])
    return None


def configure_device(device: torch.device) -> None:
    """Make `device` this process's GPU and allow TF32 matmuls and convolutions (fp32 runs too)."""
    if device.type != "cuda":
        return
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels


def _init_process_group(cfg: Config, device: torch.device, rank: int, world: int, init_method: str) -> None:
    backend = cfg.distributed_backend or ("nccl" if device.type == "cuda" else "gloo")
    configure_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=PROCESS_GROUP_TIMEOUT)


def _run_member(fn: Callable[[Runtime, Config], None], runtime: Runtime, cfg: Config, init_method: str) -> None:
    """Join the process group, run, and always leave it (so no rank hangs on exit)."""
    _init_process_group(cfg, runtime.device, runtime.rank, runtime.world_size, init_method)
    try:
        fn(runtime, cfg)
    finally:
        dist.destroy_process_group()


def process_label() -> str:
    """'[rank r] ' in a multi-process run (for error lines), '' otherwise."""
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    return f"[rank {rank}] " if world > 1 else ""


def _spawned(local_rank: int, fn: Callable, cfg: Config, devices: list[torch.device]) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(len(devices)))
    runtime = Runtime(rank=local_rank, local_rank=local_rank, world_size=len(devices), device=devices[local_rank])
    try:
        _run_member(fn, runtime, cfg, cfg.distributed_init_method)
    except ConfigError as e:  # one line per rank, then a non-zero exit that ends the other ranks
        print(f"rankclip: error: {process_label()}{e}", file=sys.stderr)
        sys.exit(2)


def spawn(fn: Callable[[Runtime, Config], None], cfg: Config, devices: list[torch.device]) -> None:
    """One process per device on this machine (the seed's --distributed)."""
    try:
        mp.spawn(_spawned, args=(fn, cfg, devices), nprocs=len(devices), join=True)
    except mp.ProcessExitedException as e:
        raise ConfigError(f"process {e.error_index} of {len(devices)} exited with code {e.exit_code}; "
                          f"its error is shown above") from e


def launch(fn: Callable[[Runtime, Config], None], cfg: Config) -> None:
    """Run `fn(runtime, cfg)` in every process of the chosen launch mode."""
    launched = _launcher_env()
    if launched is not None:
        rank, local_rank, world = launched
        on_gpu = cfg.device != "cpu" and torch.cuda.is_available()
        device = resolve_device("gpu", local_rank) if on_gpu else torch.device("cpu")
        _run_member(fn, Runtime(rank, local_rank, world, device), cfg, "env://")
    elif cfg.distributed:
        if cfg.device == "cpu" or not torch.cuda.is_available():
            raise ConfigError("--distributed spawns one process per GPU and no GPU is visible; "
                              "on CPUs use torchrun --nproc_per_node N -m rankclip.main")
        ids = cfg.device_ids if cfg.device_ids is not None else tuple(range(torch.cuda.device_count()))
        spawn(fn, cfg, [resolve_device("gpu", i) for i in ids])
    else:
        device = resolve_device(cfg.device, cfg.device_id)
        configure_device(device)
        fn(Runtime(device=device), cfg)
