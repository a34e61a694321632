"""Training from webdataset shards: exact epoch lengths, disjoint shares per process, skipped bad samples."""

import io
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from rankclip.errors import ConfigError, DataError
from rankclip.data import SampleMaker
from rankclip.shards import ShardStream, expand_shards


def pixel_mean(image):
    return torch.tensor(float(sum(image.resize((1, 1)).getpixel((0, 0)))))


def caption_number(texts):
    """A fake tokenizer: the caption's length, which is the sample's row number + 1."""
    return torch.tensor([[len(text)] for text in texts])


def keyed_shards(tmp_path, count=4, per_shard=16, corrupt=()):
    """Shards whose captions are 'x' * (row + 1): the fake tokenizer reads the row back."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format="PNG")
    for shard in range(count):
        with wds.TarWriter(str(tmp_path / f"{shard:03d}.tar")) as sink:
            for i in range(shard * per_shard, (shard + 1) * per_shard):
                png = b"not an image" if i in corrupt else buffer.getvalue()
                sink.write({"__key__": f"{i:05d}", "png": png, "txt": "x" * (i + 1)})
    return str(tmp_path / f"{{000..{count - 1:03d}}}.tar")


def rows_of(batches):
    return [int(t) - 1 for batch in batches for t in batch["text"].flatten()]


def stream(pattern, **kwargs):
    defaults = dict(num_samples=64, global_batch=8, make_sample=SampleMaker(pixel_mean, caption_number), seed=0)
    return ShardStream(expand_shards(pattern), **(defaults | kwargs))


def test_an_epoch_is_exact_and_two_processes_share_the_shards(tmp_path):
    pattern = keyed_shards(tmp_path)
    ranks = [stream(pattern, rank=r, world=2) for r in range(2)]
    assert all(s.steps == 8 and len(s) == 8 for s in ranks)
    seen = []
    for s in ranks:
        batches = list(s)
        assert len(batches) == 8 and all(b["image"].shape == (4,) for b in batches)
        seen.append(rows_of(batches))
    # 4 shards over 2 processes: each reads its 2 shards once, and together they cover all 64 rows.
    assert sorted(seen[0] + seen[1]) == list(range(64))
    assert {r // 16 for r in seen[0]}.isdisjoint({r // 16 for r in seen[1]})


def test_epochs_are_reproducible_and_differ_from_each_other(tmp_path):
    pattern = keyed_shards(tmp_path)
    first, again = stream(pattern), stream(pattern)
    first.set_epoch(1)
    again.set_epoch(1)
    epoch_one = rows_of(first)
    assert epoch_one == rows_of(again)
    assert sorted(epoch_one) == list(range(64)) and epoch_one != list(range(64))  # shuffled
    first.set_epoch(2)
    assert rows_of(first) != epoch_one


def test_workers_together_make_exactly_one_epoch(tmp_path):
    pattern = keyed_shards(tmp_path)
    data = stream(pattern, num_samples=56)  # 7 steps: workers make 4 and 3
    batches = list(DataLoader(data, batch_size=None, num_workers=2))
    assert len(batches) == 7 and len(set(rows_of(batches))) == 56


def test_persistent_workers_follow_set_epoch(tmp_path):
    pattern = keyed_shards(tmp_path)
    data = stream(pattern)
    loader = DataLoader(data, batch_size=None, num_workers=1, persistent_workers=True)
    reference = stream(pattern)
    for epoch in (1, 2):
        data.set_epoch(epoch)
        reference.set_epoch(epoch)
        assert rows_of(loader) == rows_of(reference)  # the worker saw the new epoch


def test_fewer_shards_than_streams_resample(tmp_path):
    pattern = keyed_shards(tmp_path, count=1, per_shard=16)
    data = stream(pattern, num_samples=48, rank=1, world=2)  # 1 shard, 2 processes, 3 passes over it
    rows = rows_of(data)
    assert len(rows) == 24 and set(rows) <= set(range(16))


def test_undecodable_samples_are_skipped_and_reported(tmp_path):
    pattern = keyed_shards(tmp_path, corrupt={3, 40})
    batches = list(stream(pattern))
    assert len(rows_of(batches)) == 64 and not {3, 40} & set(rows_of(batches))
    failed = [path for batch in batches for path in batch["failed"]]
    assert sorted(f.rsplit(":", 1)[1] for f in failed) == ["00003", "00040"]


def test_a_truncated_shard_is_skipped_not_fatal(tmp_path):
    pattern = keyed_shards(tmp_path)
    broken = tmp_path / "002.tar"
    broken.write_bytes(broken.read_bytes()[:3000])  # cut mid-member
    batches = list(stream(pattern))
    assert len(batches) == 8 and any(batch["failed"] for batch in batches)
    with pytest.raises(tarfile.ReadError):
        tarfile.open(broken).getmembers()


def test_an_empty_shard_among_good_ones_is_skipped(tmp_path):
    pattern = keyed_shards(tmp_path, count=2, per_shard=16)
    wds.TarWriter(str(tmp_path / "002.tar")).close()  # img2dataset leaves such a tar when all its URLs fail
    pattern = pattern.replace("001}", "002}")
    assert [Path(s).name for s in expand_shards(pattern)] == ["000.tar", "001.tar"]
    for world in (1, 2, 4):  # 4 streams > 2 shards: each draws shards at random
        for rank in range(world):
            data = stream(pattern, num_samples=32 * world, global_batch=8 * world, rank=rank, world=world)
            assert set(rows_of(data)) <= set(range(32))


def test_shards_without_readable_samples_stop_the_run(tmp_path):
    pattern = keyed_shards(tmp_path, count=1, corrupt=set(range(16)))
    with pytest.raises(DataError, match="hold no readable image-caption samples"):
        list(stream(pattern, num_samples=16))


def test_bad_shard_patterns_fail_at_start_up(tmp_path):
    with pytest.raises(ConfigError, match="matches no shard file"):
        expand_shards(str(tmp_path / "{000..009}.tar"))
    keyed_shards(tmp_path, count=2)
    with pytest.raises(ConfigError, match="1 of 3 shards are missing"):
        expand_shards(str(tmp_path / "{000..002}.tar"))
    with pytest.raises(ConfigError, match="smaller than one step's batch"):
        stream(str(tmp_path / "{000..001}.tar"), num_samples=4)


def epoch_rows(data, epoch, start_step=0, workers=0):
    data.set_epoch(epoch, start_step)
    return rows_of(DataLoader(data, batch_size=None, num_workers=workers))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_mid_epoch_resume_continues_the_very_next_samples(tmp_path, workers):
    """No resampling (4 shards of 16 = 64 samples, 64 per epoch): an epoch resumed after k steps yields
    exactly the remaining steps, and with the k steps before it every sample exactly once, in order."""
    pattern = keyed_shards(tmp_path)
    data = stream(pattern, micro_batches=2, global_batch=4)  # 8 steps of 2 micro-batches of 4
    straight = epoch_rows(data, 3, workers=workers)
    assert sorted(straight) == list(range(64))
    for start in (1, 3, 7):
        resumed = epoch_rows(data, 3, start, workers=workers)
        assert len(resumed) == (8 - start) * 8
        assert straight[:start * 8] + resumed == straight, start


def test_a_resumed_stream_with_resampling_and_a_shuffle_buffer_replays_exactly(tmp_path):
    """Fewer samples in the shards than the epoch asks for (resampling) and a shuffle buffer: the
    continued part is still the uninterrupted one."""
    pattern = keyed_shards(tmp_path, count=2, per_shard=8)
    data = stream(pattern, num_samples=48)
    straight = epoch_rows(data, 1)
    resumed = epoch_rows(data, 1, 4)
    assert len(straight) == 48 and straight[32:] == resumed
