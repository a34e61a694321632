"""The training loop's data source: CSV rows or webdataset shards, behind one small interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Protocol

from torch.utils.data import DataLoader

from .data import SampleMaker, build_caption_loader, loader_generator
from .shards import ShardStream, expand_shards


class EpochPlan(Protocol):
    """What decides an epoch's batches: GlobalBatchSampler (CSV) or ShardStream (shards)."""

    steps: int  # optimizer steps per epoch
    num_samples: int

    def set_epoch(self, epoch: int, start_step: int = 0) -> None: ...


@dataclass
class TrainData:
    """An epoch of micro-batches (`micro_batches` per optimizer step) for this process."""

    loader: DataLoader
    plan: EpochPlan

    @property
    def steps(self) -> int:
        return self.plan.steps

    @property
    def num_samples(self) -> int:
        return self.plan.num_samples

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next pass is `epoch`'s, starting after its first `start_step` optimizer steps."""
        self.plan.set_epoch(epoch, start_step)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.loader)


def build_train_data(train_data: str, *, dataset_type: str, num_samples: Optional[int], image_key: str,
                     caption_key: str, delimiter: str, make_sample: SampleMaker, seed: int, global_batch: int,
                     rank: int, world: int, num_workers: int, pin_memory: bool, micro_batches: int,
                     min_size: Optional[int]) -> TrainData:
    if dataset_type == "webdataset":
        stream = ShardStream(expand_shards(train_data), num_samples, global_batch, make_sample, seed, rank, world,
                             micro_batches, min_size)
        loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                            persistent_workers=num_workers > 0, generator=loader_generator(seed))
        return TrainData(loader, stream)
    loader = build_caption_loader(train_data, image_key=image_key, caption_key=caption_key, delimiter=delimiter,
                                  make_sample=make_sample, seed=seed, global_batch=global_batch, rank=rank,
                                  world=world, num_workers=num_workers, pin_memory=pin_memory, train=True,
                                  micro_batches=micro_batches, min_size=min_size)
    return TrainData(loader, loader.batch_sampler)
