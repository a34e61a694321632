"""Image-caption data (CSV/TSV) for training and validation, and the global-batch sampler.

Determinism: the sampler yields `(epoch, index)` pairs and every random transform of a sample
runs under a torch seed derived from (seed, epoch, index). The batches and their augmentations
therefore do not depend on the number of workers or processes, and resuming at an epoch
boundary replays exactly what an uninterrupted run would have seen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, Optional

import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, default_collate

from .augment import AugmentedImage, augment_caption
from .collectives import rank_block
from .config import CsvLayout, DataConfig
from .csv_index import CaptionRows, open_caption_rows
from .errors import ConfigError
from .runtime import Runtime

MAX_SUBSTITUTIONS = 10  # consecutive unreadable images tolerated before a sample gives up
FAILURE_LIMIT = 0.01  # fraction of an epoch's samples allowed to be unreadable


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A distinct torch seed for every (run seed, epoch, sample index)."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63)


def load_image(source: str | BinaryIO, min_size: Optional[int] = None) -> Optional[Image.Image]:
    """The image (a path or an open file) as RGB, or None when it is missing or cannot be decoded.

    With `min_size`, a JPEG is decoded at the smallest of 1/1, 1/2, 1/4 or 1/8 scale that keeps
    both sides at least `min_size` (libjpeg scales in the DCT, far cheaper than decoding every
    pixel of a large photo and resizing afterwards). The transforms resize to `min_size` anyway.
    """
    try:
        with Image.open(source) as img:
            if min_size is not None:
                img.draft("RGB", (min_size, min_size))
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


class SampleMaker:
    """Image + caption -> training sample: transformed image, tokens, and with `inmodal` the
    augmented views; every random choice is drawn from `seed` (the global RNG is left as it was).

    torchvision's transforms draw from torch's default CPU generator and take no generator of
    their own, so that generator is seeded for the sample and its state restored afterwards.
    Directly, not through torch.manual_seed and fork_rng: those also (lazily) seed every CUDA
    device, and while CUDA is not initialized each call records a traceback.format_stack() for
    later, which costs far more than the sample's own seeding; the draws are the same.
    """

    def __init__(self, transform: Callable, tokenizer: Callable, inmodal: bool = False) -> None:
        self.transform, self.tokenizer = transform, tokenizer
        self.augmented_transform = AugmentedImage(transform) if inmodal else None

    def __call__(self, image: Image.Image, caption: str, seed: int, failed: list[str]) -> dict:
        sample = {"text": self.tokenizer([caption])[0], "failed": failed}
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(seed)
        try:
            sample["image"] = self.transform(image)
            if self.augmented_transform is not None:
                sample["augmented_image"] = self.augmented_transform(image)
                sample["augmented_text"] = self.tokenizer([augment_caption(caption, random.Random(seed))])[0]
        finally:
            generator.set_state(saved)
        return sample


class CaptionDataset(Dataset):
    """(image, tokenized caption) pairs from a CSV's row index; indexed by (epoch, index) for seeded
    augmentation. A row's path and caption are decoded from the shared index when it is read.

    For training (`substitute`), an unreadable image is replaced by the next readable one (so every
    batch keeps its size and processes stay in step) and its path is reported with the sample, to
    be counted. For validation it is skipped: the item is only `{"failed": [path]}`, which
    `collate_samples` leaves out of the batch (a substitute would duplicate its neighbour's pair
    in the same batch, and two identical pairs hold the contrastive loss above log 2).
    """

    def __init__(self, rows: CaptionRows, make_sample: SampleMaker, seed: int, min_size: Optional[int] = None,
                 substitute: bool = True) -> None:
        self.rows = rows
        self.make_sample, self.seed, self.min_size, self.substitute = make_sample, seed, min_size, substitute

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        if not self.substitute:
            path = self.rows.image(index)
            image = load_image(path, self.min_size)
            if image is None:
                return {"failed": [path]}
            return self.make_sample(image, self.rows.caption(index), sample_seed(self.seed, epoch, index), [])
        failed = []
        for attempt in range(MAX_SUBSTITUTIONS):
            i = (index + attempt) % len(self)
            path = self.rows.image(i)
            image = load_image(path, self.min_size)
            if image is not None:
                break
            failed.append(path)
        else:
            raise RuntimeError(f"{MAX_SUBSTITUTIONS} consecutive images cannot be read, e.g. {failed[:3]}")
        return self.make_sample(image, self.rows.caption(i), sample_seed(self.seed, epoch, index), failed)


def collate_samples(samples: list[dict]) -> dict:
    """Stack the tensors (default_collate does it straight into shared memory inside a worker,
    saving a copy on the way to the main process) and list the unreadable paths. Skipped
    samples (no "image") are left out; a batch of nothing but those holds only "failed"."""
    readable = [{k: v for k, v in s.items() if k != "failed"} for s in samples if "image" in s]
    batch = default_collate(readable) if readable else {}
    batch["failed"] = [path for s in samples for path in s["failed"]]
    return batch


def per_process_batch(global_batch: int, world: int) -> int:
    """Each process's share of a global batch, which must split evenly."""
    if global_batch % world:
        raise ConfigError(f"--batch_size {global_batch} is not divisible by the {world} processes; "
                          f"use a multiple of {world}")
    return global_batch // world


class GlobalBatchSampler(Sampler):
    """Batches of `(epoch, index)` for one process: its slice of each global batch.

    One permutation per epoch, seeded by (seed, epoch), is cut into the global batches of
    the optimizer steps, `global_batch · micro_batches` samples each (the last partial one is
    dropped); process `rank` of `world` takes rows [rank·s, (rank+1)·s) of each, s = step
    batch / world, and yields them as `micro_batches` consecutive batches of global_batch /
    world. So the samples of a step, and the rows each process holds, are the same whether a
    step is one batch of K·B or K micro-batches of B (gradient caching).

    The permutation stays a tensor (8 bytes a sample; a list of Python ints takes 36, 410 MiB
    at 12M samples): only each step's slice becomes Python ints.
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True, drop_last: bool = True, micro_batches: int = 1) -> None:
        per_process_batch(global_batch, world)
        if drop_last and num_samples < global_batch * micro_batches:
            accum = f" x --accum_freq {micro_batches}" if micro_batches > 1 else ""
            raise ConfigError(f"--batch_size {global_batch}{accum} is larger than the {num_samples} training "
                              f"samples; use a smaller --batch_size")
        if micro_batches > 1 and not drop_last:
            raise ValueError("micro-batches need full global batches (drop_last=True)")
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.rank, self.world, self.shuffle, self.drop_last = rank, world, shuffle, drop_last
        self.micro_batches = micro_batches
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next pass is `epoch`'s, from optimizer step `start_step` on (the steps before are skipped
        as indices: no image of theirs is opened)."""
        self.epoch, self.start_step = epoch, start_step

    @property
    def steps(self) -> int:
        """Optimizer steps per epoch."""
        full, rest = divmod(self.num_samples, self.global_batch * self.micro_batches)
        return full + (0 if self.drop_last or rest == 0 else 1)

    def __len__(self) -> int:
        return self.steps * self.micro_batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        step_batch = self.global_batch * self.micro_batches
        local, micro = step_batch // self.world, self.global_batch // self.world
        for b in range(self.start_step, self.steps):
            batch = order[b * step_batch:(b + 1) * step_batch].tolist()
            if len(batch) < step_batch:  # the last, partial batch of an evaluation pass
                yield [(self.epoch, i) for i in batch[self.rank::self.world]]
                continue
            mine = batch[self.rank * local:(self.rank + 1) * local]
            for j in range(self.micro_batches):
                yield [(self.epoch, i) for i in mine[j * micro:(j + 1) * micro]]


@dataclass(frozen=True)
class Batches:
    """How a loader cuts its data: batches of `global_batch` samples over all processes, `micro_batches`
    of them per optimizer step, every draw seeded by `seed`."""

    global_batch: int
    seed: int
    micro_batches: int = 1


@dataclass(frozen=True)
class SampleSource:
    """What turns a row into a sample: `make_sample` (transforms, tokenizer) and the side images are
    decoded at (`min_size`, for JPEG draft decoding; None decodes every pixel)."""

    make_sample: SampleMaker
    min_size: Optional[int] = None


def build_caption_loader(path: str, layout: CsvLayout, source: SampleSource, batches: Batches, runtime: Runtime, *,
                         num_workers: int, train: bool) -> DataLoader:
    """Training (shuffled, full global batches) or validation loader for a CSV.

    Validation: this process's contiguous block of the rows (`rank_block`), in order, in batches of
    `global_batch`, unreadable rows skipped; gathering the blocks in rank order gives every row once.
    """
    rows = open_caption_rows(path, layout)
    dataset = CaptionDataset(rows, source.make_sample, batches.seed, source.min_size, substitute=train)
    rank, world = runtime.rank, runtime.world_size
    if train:
        sampler = GlobalBatchSampler(len(dataset), batches.global_batch, batches.seed, rank, world,
                                     micro_batches=batches.micro_batches)
    else:
        sampler = BatchSampler([(0, i) for i in rank_block(len(dataset), rank, world)], batches.global_batch,
                               drop_last=False)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_samples,
                      pin_memory=runtime.device.type == "cuda", persistent_workers=train and num_workers > 0,
                      generator=loader_generator(batches.seed))


def build_validation_loader(data: DataConfig, runtime: Runtime, source: SampleSource, seed: int,
                            batch_size: int) -> Optional[DataLoader]:
    """The --validation_data loader (None without it), this process's block of its rows."""
    if data.validation_data is None:
        return None
    return build_caption_loader(data.validation_data, data.csv_layout, source, Batches(batch_size, seed), runtime,
                                num_workers=data.num_workers, train=False)


def loader_generator(seed: int) -> torch.Generator:
    """The DataLoader's own generator: starting its iterators then draws nothing from the global
    one, whose stream (dropout) a mid-epoch resume must continue exactly. Samples are seeded
    by (seed, epoch, index), never by the workers' seeds."""
    return torch.Generator().manual_seed(seed)
