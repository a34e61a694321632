"""The training loop's data source: CSV rows or webdataset shards, behind one small interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

from torch.utils.data import DataLoader

from .config import DataConfig
from .data import Batches, SampleSource, build_caption_loader, loader_generator
from .runtime import Runtime
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


def build_train_data(data: DataConfig, runtime: Runtime, source: SampleSource, batches: Batches) -> TrainData:
    """This process's training data: CSV rows or webdataset shards, cut into `batches`."""
    if data.shards:
        stream = ShardStream(expand_shards(data.train_data), data.train_num_samples, batches.global_batch,
                             source.make_sample, batches.seed, runtime.rank, runtime.world_size, batches.micro_batches,
                             source.min_size)
        loader = DataLoader(stream, batch_size=None, num_workers=data.num_workers,
                            pin_memory=runtime.device.type == "cuda", persistent_workers=data.num_workers > 0,
                            generator=loader_generator(batches.seed))
        return TrainData(loader, stream)
    loader = build_caption_loader(data.train_data, data.csv_layout, source, batches, runtime,
                                  num_workers=data.num_workers, train=True)
    return TrainData(loader, loader.batch_sampler)
