"""Training from webdataset shards (tar files of `<key>.jpg` + `<key>.txt`, as img2dataset writes them).

Same batch semantics as CSV data: `--batch_size` B is global, every process takes B/W
samples per step, and an epoch is exactly `--train_num_samples // B` steps on every process.
Shards are dealt out per epoch: a permutation seeded by (seed, epoch) is split over the
W x K (process, worker) streams; a stream that exhausts its shards reshuffles them and goes
round again (resampling), so the epoch length never depends on shard sizes, and with fewer
shards than streams each stream draws shards at random. Samples pass a seeded shuffle buffer.
A corrupt tar member or an undecodable image is skipped and counted like a bad CSV row.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import random
import tarfile
from typing import Iterator, Optional

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from .data import SampleMaker, collate_samples, load_image, per_process_batch, sample_seed
from .errors import ConfigError, DataError
from .logger import log

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHUFFLE_BUFFER = 1000  # samples held per stream to mix neighbours from one shard


def expand_shards(pattern: str) -> list[str]:
    """Shard paths from a brace pattern ("data/{00000..00099}.tar") or a '::'-separated list.

    Local files must exist (checked at start-up); URLs and `pipe:` commands are taken as given.
    """
    shards = wds.shardlists.expand_urls(pattern)
    local = [s for s in shards if "://" not in s and not s.startswith("pipe:")]
    missing = [s for s in local if not os.path.isfile(s)]
    if not shards or len(missing) == len(shards):
        raise ConfigError(f"--train_data {pattern}: matches no shard file; write the shards as a brace "
                          f"pattern such as 'DIR/{{00000..00099}}.tar'")
    if missing:
        raise ConfigError(f"--train_data {pattern}: {len(missing)} of {len(shards)} shards are missing "
                          f"(e.g. {missing[0]})")
    empty = {s for s in local if _holds_no_member(s)}  # img2dataset writes these when all URLs of a shard fail
    if len(empty) == len(shards):
        raise DataError(f"--train_data {pattern}: every shard is empty")
    if empty:
        log.warning(f"--train_data: skipping {len(empty)} empty shards, e.g. {sorted(empty)[0]}")
    return [s for s in shards if s not in empty]


def _holds_no_member(path: str) -> bool:
    """True for a well-formed tar without members (reads one header); a corrupt file is left to the
    stream, which skips and counts what it cannot read."""
    try:
        with tarfile.open(path) as tar:
            return tar.next() is None
    except tarfile.TarError:
        return False


class ShardStream(IterableDataset):
    """One process's micro-batches of one epoch, from its share of the shards."""

    def __init__(self, shards: list[str], num_samples: int, global_batch: int, make_sample: SampleMaker, seed: int,
                 rank: int = 0, world: int = 1, micro_batches: int = 1, min_size: Optional[int] = None) -> None:
        self.local_batch = per_process_batch(global_batch, world)
        self.steps = num_samples // (global_batch * micro_batches)
        if self.steps == 0:
            raise ConfigError(f"--train_num_samples {num_samples} is smaller than one step's batch "
                              f"({global_batch * micro_batches}); use a smaller --batch_size")
        self.shards, self.num_samples, self.make_sample, self.seed = shards, num_samples, make_sample, seed
        self.rank, self.world, self.micro_batches, self.min_size = rank, world, micro_batches, min_size
        self._epoch = mp.Value("i", 0)  # shared, so that persistent workers see set_epoch
        self._start_step = mp.Value("i", 0)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next pass is `epoch`'s, after its first `start_step` optimizer steps (a mid-epoch resume)."""
        self._epoch.value, self._start_step.value = epoch, start_step

    def __len__(self) -> int:
        return self.steps * self.micro_batches

    def __iter__(self) -> Iterator[dict]:
        epoch, consumed = self._epoch.value, self._start_step.value * self.micro_batches
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batches from its workers in turn, from worker 0: stream k makes batches
        # k, k + K, ... After `consumed` batches, worker w continues the stream that makes batch consumed + w.
        role = (worker + consumed) % workers
        batches = len(self) // workers + (1 if role < len(self) % workers else 0)
        done = consumed // workers + (1 if role < consumed % workers else 0)
        stream = self.rank * workers + role
        rng = random.Random(sample_seed(self.seed, epoch, stream))
        failed: list[str] = []
        samples = self._samples(self._passes(epoch, stream, self.world * workers, rng), rng, failed,
                                consumed=done * self.local_batch)
        for _ in range(batches - done):
            batch = collate_samples([next(samples) for _ in range(self.local_batch)])
            batch["failed"], failed[:] = batch["failed"] + failed, []
            yield batch

    def _passes(self, epoch: int, stream: int, streams: int,
                rng: random.Random) -> Iterator[tuple[list[dict], int]]:
        """Endless passes over this stream's shards (reshuffled each time), or single random shards;
        each with the number of distinct shards the stream draws from."""
        order = list(self.shards)
        random.Random(sample_seed(self.seed, epoch, -1)).shuffle(order)
        mine = order[stream::streams]
        while True:
            if mine:
                rng.shuffle(mine)
                yield [{"url": url} for url in mine], len(mine)
            else:  # fewer shards than streams: draw at random
                yield [{"url": rng.choice(order)}], len(order)

    def _samples(self, passes: Iterator[tuple[list[dict], int]], rng: random.Random, failed: list[str],
                 consumed: int = 0) -> Iterator[dict]:
        """Decoded training samples; the keys of what cannot be read are appended to `failed`.

        The shuffle buffer is emptied at the end of every pass, so a pass never repeats a sample.
        The first `consumed` samples (trained before a resume) are read past without decoding, drawing
        what they drew from `rng`, so the stream continues exactly where it stopped; a record whose
        image bytes cannot be decoded counts as a sample there (an approximation only then).
        """
        def skip(error: Exception) -> bool:
            failed.append(f"corrupt shard data ({type(error).__name__}: {error})")
            return True

        empty: set[str] = set()  # shards of the passes since the last readable sample
        for shards, candidates in passes:
            records = wds.tarfile_to_samples(handler=skip)(iter(shards))
            good = 0
            for record in wds.shuffle(SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER, rng=rng)(records):
                where = f"{record.get('__url__')}:{record.get('__key__')}"
                image_bytes = next((record[e] for e in IMAGE_EXTENSIONS if e in record), None)
                if consumed:
                    if image_bytes is not None and "txt" in record:
                        consumed, good = consumed - 1, good + 1
                        rng.getrandbits(62)
                        if not consumed:
                            failed.clear()  # counted before the resume
                    continue
                image = load_image(io.BytesIO(image_bytes), self.min_size) if image_bytes is not None else None
                if image is None or "txt" not in record:
                    failed.append(where)
                    continue
                good += 1
                yield self.make_sample(image, record["txt"].decode("utf-8", "replace"), rng.getrandbits(62), [])
            # An empty shard (img2dataset writes one when all its URLs failed) is skipped; only when
            # every shard this stream can read has come up empty would the loop never end.
            empty = set() if good else empty | {shard["url"] for shard in shards}
            if len(empty) == candidates:
                raise DataError(f"shards {sorted(empty)[:3]} hold no readable image-caption samples "
                                  f"(.jpg/.png/.webp + .txt)")
