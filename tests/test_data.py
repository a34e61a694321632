import pandas as pd
import pytest
import torch
from PIL import Image

from rankclip.errors import ConfigError, DataError
from rankclip.config import CsvLayout
from rankclip.csv_index import open_caption_rows
from rankclip.data import (Batches, CaptionDataset, GlobalBatchSampler, SampleMaker, SampleSource, build_caption_loader,
                           collate_samples, load_image, sample_seed)
from rankclip.runtime import Runtime


def to_tensor(image):
    """A random transform: a draw from torch's RNG next to a pixel, to check per-sample seeding."""
    return torch.tensor([float(torch.randint(0, 1000, ())), *image.getpixel((0, 0))])


def fake_tokenizer(texts):
    return torch.tensor([[len(t)] for t in texts])


def with_rows_replaced(tmp_path, csv, replaced: dict) -> str:
    """A copy of a fixture CSV with absolute image paths, rows `replaced` {row: path} pointing elsewhere."""
    lines = csv.read_text().splitlines()
    for i in range(1, len(lines)):
        image, caption = lines[i].split(",", 1)
        lines[i] = f"{replaced.get(i - 1, csv.parent / image)},{caption}"
    copy = tmp_path / csv.name
    copy.write_text("\n".join(lines) + "\n")
    return str(copy)


def test_csv_paths_are_relative_to_the_csv_folder(colour_data):
    rows = open_caption_rows(colour_data["train"], CsvLayout("image", "caption", ","))
    assert len(rows) == 256
    assert rows.image(0).startswith(str(colour_data["root"]))


def test_samples_are_those_of_the_list_based_loader(colour_data):
    """The index gives every row the path and caption that pandas' lists gave, so the same samples."""
    csv = colour_data["train"]
    frame = pd.read_csv(csv, sep=",", dtype=str, keep_default_na=False, quoting=0)
    images, captions = [str(csv.parent / p) for p in frame["image"]], frame["caption"].tolist()
    maker = SampleMaker(to_tensor, fake_tokenizer)
    dataset = CaptionDataset(open_caption_rows(csv, CsvLayout("image", "caption", ",")), maker, seed=4)
    for index in range(len(images)):
        expected = maker(load_image(images[index]), captions[index], sample_seed(4, 2, index), [])
        sample = dataset[(2, index)]
        assert torch.equal(sample["image"], expected["image"]) and torch.equal(sample["text"], expected["text"])


def test_missing_column_lists_the_columns(colour_data):
    with pytest.raises(DataError, match=r"no column 'text' \(columns: image, caption\); set --caption_key"):
        open_caption_rows(str(colour_data["train"]), CsvLayout("image", "text", ","))


def test_wrong_delimiter_says_which_to_use(tmp_path, colour_data):
    tsv = tmp_path / "data.tsv"
    tsv.write_text(colour_data["train"].read_text().replace(",", "\t"))
    with pytest.raises(DataError, match=r"pass --delimiter '\\t'"):
        open_caption_rows(str(tsv), CsvLayout("image", "caption", ","))


def test_empty_and_header_only_files(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="the file is empty"):
        open_caption_rows(str(empty), CsvLayout("image", "caption", ","))
    header = tmp_path / "header.csv"
    header.write_text("image,caption\n")
    with pytest.raises(DataError, match="no rows"):
        open_caption_rows(str(header), CsvLayout("image", "caption", ","))


def test_images_that_do_not_exist_are_caught_at_start_up(tmp_path):
    path = tmp_path / "moved.csv"
    path.write_text("image,caption\nmissing/a.png,a cat\nmissing/b.png,a dog\n")
    with pytest.raises(DataError, match="none of the first 2 images exist"):
        open_caption_rows(str(path), CsvLayout("image", "caption", ","))


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_split_the_same_global_batches(world):
    single = list(GlobalBatchSampler(50, 8, seed=3))
    shards = [list(GlobalBatchSampler(50, 8, seed=3, rank=r, world=world)) for r in range(world)]
    assert len(single) == 6  # the partial last batch is dropped
    for b, batch in enumerate(single):
        assert sum((shard[b] for shard in shards), []) == batch


def test_sampler_order_depends_on_epoch_and_seed_only():
    sampler = GlobalBatchSampler(40, 10, seed=0)
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) != first
    again = GlobalBatchSampler(40, 10, seed=0)
    again.set_epoch(1)
    assert list(again) == first
    assert {i for batch in first for _, i in batch} == set(range(40))


@pytest.mark.parametrize("world, micro_batches", [(1, 1), (2, 1), (2, 3)])
def test_sampler_batches_are_slices_of_the_seeded_permutation(world, micro_batches):
    """Each step takes the next global_batch x micro_batches entries of randperm(N) seeded by (seed, epoch),
    as when the permutation was a list: the same batches as before, from a tensor."""
    sampler = GlobalBatchSampler(70, 4, seed=5, rank=world - 1, world=world, micro_batches=micro_batches)
    sampler.set_epoch(3)
    order = torch.randperm(70, generator=torch.Generator().manual_seed(5 * 100_003 + 3)).tolist()
    step, local, micro = 4 * micro_batches, 4 * micro_batches // world, 4 // world
    expected = [order[b * step:(b + 1) * step][(world - 1) * local:world * local] for b in range(70 // step)]
    expected = [mine[j * micro:(j + 1) * micro] for mine in expected for j in range(micro_batches)]
    assert list(sampler) == [[(3, i) for i in batch] for batch in expected]
    assert all(type(i) is int for batch in sampler for _, i in batch)


def test_sampler_refuses_impossible_batches():
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        GlobalBatchSampler(100, 8, seed=0, world=3)
    with pytest.raises(ConfigError, match="larger than the 5 training samples"):
        GlobalBatchSampler(5, 8, seed=0)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_validation_blocks_keep_every_sample_once_in_order(colour_data, world):
    keys = []
    for rank in range(world):
        loader = build_caption_loader(str(colour_data["validation"]), CsvLayout(),
                                      SampleSource(SampleMaker(to_tensor, fake_tokenizer)), Batches(5, seed=0),
                                      Runtime(rank=rank, world_size=world), num_workers=0, train=False)
        keys += [key for batch in loader.batch_sampler for key in batch]
    assert keys == [(0, i) for i in range(64)]


def test_augmentation_is_seeded_per_sample(colour_data):
    rows = open_caption_rows(colour_data["train"], CsvLayout("image", "caption", ","))
    dataset = CaptionDataset(rows, SampleMaker(to_tensor, fake_tokenizer), seed=0)
    a = dataset[(1, 5)]["image"]
    torch.manual_seed(123)  # the global RNG must not matter
    dataset[(1, 4)]
    assert torch.equal(dataset[(1, 5)]["image"], a)
    draws = {dataset[(epoch, 5)]["image"][0].item() for epoch in range(12)}
    assert len(draws) > 1  # but epochs draw different augmentations


def test_unreadable_image_is_replaced_and_reported(tmp_path, colour_data):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    rows = open_caption_rows(with_rows_replaced(tmp_path, colour_data["train"], {3: broken, 4: tmp_path / "gone.png"}),
                             CsvLayout("image", "caption", ","))
    dataset = CaptionDataset(rows, SampleMaker(to_tensor, fake_tokenizer), seed=0)
    sample = dataset[(0, 3)]
    assert sample["failed"] == [str(broken), str(tmp_path / "gone.png")]
    assert torch.equal(sample["text"], fake_tokenizer([rows.caption(5)])[0])
    assert dataset[(0, 2)]["failed"] == []


@pytest.mark.parametrize("world, micro_batches", [(1, 1), (2, 2)])
def test_a_resumed_epoch_skips_the_consumed_steps_as_indices(world, micro_batches):
    for rank in range(world):
        sampler = GlobalBatchSampler(100, global_batch=8, seed=3, rank=rank, world=world, micro_batches=micro_batches)
        sampler.set_epoch(2)
        straight = list(sampler)
        sampler.set_epoch(2, start_step=4)
        assert list(sampler) == straight[4 * micro_batches:]
        sampler.set_epoch(3)
        assert len(list(sampler)) == len(straight)  # the next epoch is whole again


def test_a_resumed_loader_opens_no_image_of_the_skipped_steps(colour_data, monkeypatch):
    rows = open_caption_rows(colour_data["train"], CsvLayout("image", "caption", ","))
    opened = []
    monkeypatch.setattr("rankclip.data.load_image",
                        lambda path, size=None: opened.append(path) or Image.new("RGB", (4, 4)))
    dataset = CaptionDataset(rows, SampleMaker(to_tensor, fake_tokenizer), seed=0)
    sampler = GlobalBatchSampler(len(dataset), global_batch=32, seed=0)
    sampler.set_epoch(1, start_step=5)
    batches = list(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_samples))
    assert len(batches) == 3 and len(opened) == 3 * 32


def test_unreadable_validation_image_is_skipped_not_replaced(tmp_path, colour_data):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    rows = open_caption_rows(with_rows_replaced(tmp_path, colour_data["validation"], {3: broken}), CsvLayout("image", "caption", ","))
    dataset = CaptionDataset(rows, SampleMaker(to_tensor, fake_tokenizer), seed=0, substitute=False)
    assert dataset[(0, 3)] == {"failed": [str(broken)]}
    batch = collate_samples([dataset[(0, i)] for i in range(2, 6)])
    assert batch["failed"] == [str(broken)] and len(batch["image"]) == 3
    assert batch["text"].flatten().tolist() == [len(rows.caption(i)) for i in (2, 4, 5)]
    assert collate_samples([dataset[(0, 3)]]) == {"failed": [str(broken)]}


def test_sample_seeding_draws_what_torch_manual_seed_would_and_restores_the_rng():
    """The per-sample seed goes straight to the CPU generator (no torch.manual_seed, which also queues a
    CUDA seeding with a stack trace per call): same draws, and the caller's RNG state is left as it was."""
    maker = SampleMaker(to_tensor, fake_tokenizer)
    image = Image.new("RGB", (4, 4), (10, 20, 30))
    torch.manual_seed(1234)
    expected = to_tensor(image)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    assert torch.equal(maker(image, "a cat", seed=1234, failed=[])["image"], expected)
    assert torch.equal(torch.get_rng_state(), before)
