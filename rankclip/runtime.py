"""Runtime: the facts about one process (rank, world size, device, its peers), fixed at launch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .errors import ConfigError
from .peers import Peers


@dataclass(frozen=True)
class Runtime:
    """Facts about this process, fixed at launch; kept apart from the (user-given) Config."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    peers: Optional[Peers] = None  # the other processes, in a multi-process run

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
        """Wait for every rank. Not a collective: ranks may wait here as long as rank-0-only work
        (a checkpoint) takes, without PROCESS_GROUP_TIMEOUT ending them."""
        if self.peers is not None:
            self.peers.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all ranks (a sync point); `values` itself for one process."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()
