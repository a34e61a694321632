"""clip_benchmark's webdataset evaluation layout: read as clip_benchmark reads it, and evaluated to the same
figures as the same images, classes and templates in the labels.csv + classes.py layout."""

import io
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import COLOURS, PHRASES
from rankclip.config import Config, CsvLayout, parse_config
from rankclip.errors import ConfigError, DataError
from rankclip.eval_data import build_labeled_loader, load_eval_set, load_retrieval_set
from rankclip.evaluate import EvalTasks, Evaluator, RetrievalTask, ZeroShotTask
from rankclip.models import build_model
from rankclip.config import ModelConfig
from rankclip.runtime import Runtime

FORMATS = ("jpg", "png", "webp")
SHARD_SIZES = (11, 7, 6)  # 24 samples in three shards of unequal size
TEMPLATES = ("a photo of a {c} square.", "{c} colour", "{{braces}} around {c}")


def colour_image(rng: random.Random, label: int, extension: str) -> bytes:
    """A noisy 24x24 image of colour `label`, encoded as `extension`."""
    base = list(COLOURS.values())[label]
    image = Image.new("RGB", (24, 24), tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in base))
    buffer = io.BytesIO()
    image.save(buffer, format={"jpg": "JPEG"}.get(extension, extension.upper()))
    return buffer.getvalue()


def write_shards(folder: Path, samples: list[dict], sizes=SHARD_SIZES) -> None:
    """`samples` (webdataset dicts without keys) as test/0.tar ... with test/nshards.txt, keyed as
    clip_benchmark's converter keys them (s0000000, ...)."""
    (folder / "test").mkdir(parents=True)
    start = 0
    for shard, size in enumerate(sizes):
        with wds.TarWriter(str(folder / "test" / f"{shard}.tar")) as sink:
            for index in range(start, start + size):
                sink.write({"__key__": f"s{index:07d}", **samples[index]})
        start += size
    (folder / "test" / "nshards.txt").write_text(f"{len(sizes)}\n")


def write_benchmark_pair(root: Path, seed: int = 5) -> tuple[Path, Path]:
    """The same 24 images (jpg, png and webp in turn), labels, classes and templates twice: a clip_benchmark
    classification folder and a labels.csv + classes.py folder. Returns (benchmark folder, labels.csv folder)."""
    rng = random.Random(seed)
    bench, plain = root / "wds_colours", root / "plain_colours"
    (plain / "images").mkdir(parents=True)
    samples, rows = [], ["image,label"]
    for index in range(sum(SHARD_SIZES)):
        label, extension = rng.randrange(len(COLOURS)), FORMATS[index % len(FORMATS)]
        data = colour_image(rng, label, extension)
        samples.append({extension: data, "cls": label})
        (plain / "images" / f"{index}.{extension}").write_bytes(data)
        rows.append(f"images/{index}.{extension},{label}")
    write_shards(bench, samples)
    (bench / "classnames.txt").write_text("\n".join(COLOURS) + "\n")
    (bench / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    (plain / "labels.csv").write_text("\n".join(rows) + "\n")
    classes = ", ".join(f'"{c}"' for c in COLOURS)
    (plain / "classes.py").write_text('{"classes": [' + classes + '], "templates": [lambda s: f"a photo of a '
                                      '{s} square.", lambda s: f"{s} colour", lambda s: f"{{braces}} around {s}"]}')
    return bench, plain


def write_retrieval_pair(root: Path, seed: int = 6) -> tuple[Path, Path]:
    """18 images with 1 to 3 captions each, as a clip_benchmark retrieval folder and as an image-caption CSV
    with one row per caption. Returns (benchmark folder, CSV)."""
    rng = random.Random(seed)
    bench, images = root / "wds_colour_captions", root / "caption_images"
    images.mkdir(parents=True)
    samples, rows = [], ["image,caption"]
    for index in range(18):
        label, extension = rng.randrange(len(COLOURS)), FORMATS[index % len(FORMATS)]
        data = colour_image(rng, label, extension)
        captions = [rng.choice(PHRASES).format(list(COLOURS)[label]) for _ in range(1 + index % 3)]
        samples.append({extension: data, "txt": "\n".join(captions)})
        (images / f"{index}.{extension}").write_bytes(data)
        rows += [f"{images.name}/{index}.{extension},{caption}" for caption in captions]
    write_shards(bench, samples, sizes=(8, 10))
    (bench / "dataset_type.txt").write_text("retrieval\n")
    csv = root / "colour_captions.csv"
    csv.write_text("\n".join(rows) + "\n")
    return bench, csv


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    return write_benchmark_pair(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="module")
def retrieval_pair(tmp_path_factory) -> tuple[Path, Path]:
    return write_retrieval_pair(tmp_path_factory.mktemp("bench_retrieval"))


@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(0)
    return build_model(ModelConfig(model_name="tiny-vit"))


def evaluator(bundle) -> Evaluator:
    return Evaluator(EvalTasks(), Runtime(), validation_loader=None, loss_fn=None, tokenizer=bundle.tokenizer,
                     logger=None, precision="fp32")


def to_value(image) -> torch.Tensor:
    return torch.tensor(np.asarray(image, dtype=np.float32)).mean(dim=(0, 1))


@pytest.mark.parametrize("workers", [0, 2])
def test_zero_shot_figures_equal_the_labels_csv_layout(pair, bundle, single_thread, workers):
    """Same images, classes and templates: the same features in the same order, the same top-k; the free set
    name is the record's. Batches of 5 cut across the three shards, read by two workers in turns."""
    bench, plain = pair
    model = bundle.model.eval()
    results, features = [], []
    for folder, name in ((bench, "wds_colours"), (plain, "ImageNet1K")):
        data = load_eval_set(name, folder, bundle.val_transform)
        loader = build_labeled_loader(data.dataset, Runtime(), batch_size=5, num_workers=workers)
        task = ZeroShotTask(name, loader, *data.require_prompts())
        assert [t(c) for c in task.classes for t in task.templates][:3] == [
            "a photo of a red square.", "red colour", "{braces} around red"]
        results.append(evaluator(bundle).zero_shot(model, task))
        features.append(evaluator(bundle).image_features(model, loader, name))
    assert torch.equal(features[0][0], features[1][0]) and torch.equal(features[0][1], features[1][1])
    ours, theirs = results
    assert ours.pop("eval_data_type") == "wds_colours" and theirs.pop("eval_data_type") == "ImageNet1K"
    assert ours == theirs and ours["num_samples"] == 24 and ours["num_classes"] == 4


def test_retrieval_figures_equal_the_csv_with_several_captions_per_image(retrieval_pair, bundle, single_thread):
    bench, csv = retrieval_pair
    model = bundle.model.eval()
    results = []
    for source in (bench, csv):
        data = load_retrieval_set(source, CsvLayout("image", "caption", ","), bundle.val_transform, Path(source).stem)
        loader = build_labeled_loader(data.images, Runtime(), batch_size=4, num_workers=0)
        results.append(evaluator(bundle).retrieval(model, RetrievalTask(data.name, loader, data.captions,
                                                                        data.caption_image)))
    ours, theirs = results
    assert ours.pop("retrieval_data") == "wds_colour_captions" and theirs.pop("retrieval_data") == "colour_captions"
    assert ours == theirs
    assert ours["num_images"] == 18 and ours["num_captions"] == 6 * (1 + 2 + 3)


@pytest.mark.parametrize("workers", [0, 2])
def test_each_rank_reads_its_block_and_the_blocks_make_the_set_in_order(pair, workers):
    """Three processes: each loader streams only its block (8 of 24), and the blocks in rank order are
    the one-process order, which evaluation's gather relies on."""
    bench, plain = pair
    data = load_eval_set("wds_colours", bench, to_value)
    whole = load_eval_set("ImageNet1K", plain, to_value)
    want = [sample for sample in (whole.dataset[i] for i in range(24))]
    got = []
    for rank in range(3):
        loader = build_labeled_loader(data.dataset, Runtime(rank=rank, world_size=3), batch_size=3,
                                      num_workers=workers)
        batches = list(loader)
        assert sum(len(labels) for _, labels, _ in batches) == 8
        got += [(image, int(label)) for images, labels, _ in batches for image, label in zip(images, labels)]
    assert [label for _, label in got] == [label for _, label in want]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(got, want))


def test_clip_benchmark_reads_the_sets_the_tests_write(pair, retrieval_pair):
    """The sets these tests write are what clip_benchmark's own reader takes: the same images with the same
    labels or captions, class names and templates (its templates filled in with str.format(c=...))."""
    builder = pytest.importorskip("clip_benchmark.datasets.builder",
                                  reason="the clip-benchmark package is not installed (pip install clip-benchmark)")
    bench, _ = pair
    theirs = builder.build_wds_dataset("wds_colours", transform=to_value, split="test", data_dir=str(bench))
    ours = load_eval_set("wds_colours", bench, to_value)
    assert list(theirs.classes) == list(ours.classes)
    assert [t.format(c="red") for t in theirs.templates] == [t("red") for t in ours.templates]
    assert [(value.tolist(), label) for value, label in theirs] == [(v.tolist(), label) for v, label in ours.dataset]

    retrieval, csv = retrieval_pair
    theirs = builder.build_wds_dataset("wds_colour_captions", transform=to_value, split="test",
                                       data_dir=str(retrieval))
    ours = load_retrieval_set(retrieval, CsvLayout("image", "caption", ","), to_value, "set")
    their_samples = list(theirs)
    assert [caption for _, captions in their_samples for caption in captions] == ours.captions
    assert torch.equal(torch.tensor([i for i, (_, captions) in enumerate(their_samples) for _ in captions]),
                       ours.caption_image)
    assert [value.tolist() for value, _ in their_samples] == [value.tolist() for value, _ in ours.images]


class Listed(list):
    """A list of samples with the attributes clip_benchmark's converter reads (classes, templates)."""


def test_sets_written_by_clip_benchmark_are_read_as_their_source(pair, retrieval_pair, tmp_path):
    """clip_benchmark's own converter writes the tests' images (10 samples a shard): read back, they are the
    labels.csv folder's and the CSV's images, labels, class names, templates and captions, in order."""
    writer = pytest.importorskip("clip_benchmark.webdataset_builder",
                                 reason="the clip-benchmark package is not installed (pip install clip-benchmark)")
    bench, plain = pair
    source = load_eval_set("ImageNet1K", plain, to_value)
    samples = Listed((str(path), label) for path, label in zip(source.dataset.paths, source.dataset.labels))
    samples.classes, samples.templates = list(COLOURS), list(TEMPLATES)
    writer.convert_dataset(samples, "test", str(tmp_path / "written"), transform=writer.path_to_bytes, max_count=10,
                           verbose=False)
    assert (tmp_path / "written" / "test" / "nshards.txt").read_text() == "3\n"
    ours = load_eval_set("free name", tmp_path / "written", to_value)
    assert list(ours.classes) == list(source.classes)
    assert [t("red") for t in ours.templates] == [t("red") for t in source.templates]
    assert [(value.tolist(), label) for value, label in ours.dataset] == [
        (value.tolist(), label) for value, label in (source.dataset[i] for i in range(24))]

    _, csv = retrieval_pair
    source = load_retrieval_set(csv, CsvLayout("image", "caption", ","), to_value, "set")
    captions = [[c for c, i in zip(source.captions, source.caption_image) if i == image] for image in range(18)]
    samples = Listed(zip(source.images.paths, captions))
    writer.convert_retrieval_dataset(samples, "test", str(tmp_path / "captions"), transform=writer.path_to_bytes,
                                     max_count=10, verbose=False)
    ours = load_retrieval_set(tmp_path / "captions", CsvLayout("image", "caption", ","), to_value, "set")
    assert ours.captions == source.captions and torch.equal(ours.caption_image, source.caption_image)
    assert [value.tolist() for value, _ in ours.images] == [value.tolist() for value, _ in source.images]


def broken_copy(pair, tmp_path, change) -> Path:
    folder = tmp_path / "wds_broken"
    shutil.copytree(pair[0], folder)
    change(folder)
    return folder


def rewrite_label(folder: Path, value: bytes) -> None:
    samples = [dict(sample) for sample in wds.WebDataset(str(folder / "test" / "1.tar"), shardshuffle=False)]
    samples[2]["cls"] = value
    with wds.TarWriter(str(folder / "test" / "1.tar")) as sink:
        for sample in samples:
            sink.write({k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"})


@pytest.mark.parametrize("change, message", [
    (lambda f: (f / "test" / "nshards.txt").unlink(), r"test/nshards.txt: missing; a clip_benchmark folder holds"),
    (lambda f: (f / "classnames.txt").unlink(), r"classnames.txt: missing; a clip_benchmark folder holds one class"),
    (lambda f: (f / "zeroshot_classification_templates.txt").unlink(), r"templates.txt: missing"),
    (lambda f: (f / "classnames.txt").write_bytes(b"red\n\xff\xfe\n"), r"classnames.txt: cannot be read as UTF-8"),
    (lambda f: (f / "classnames.txt").write_text("red\n\ngreen\n"), r"classnames.txt: one class name a line, but "
                                                                     r"line 2 is empty"),
    (lambda f: (f / "test" / "nshards.txt").write_text("4\n"), r"test/nshards.txt says 4 shards, but 1 of them are "
                                                              r"missing from .*test \(e.g. 3.tar\)"),
    (lambda f: (f / "test" / "nshards.txt").write_text("2\n"), r"test/nshards.txt says 2 shards \(0.tar ... 1.tar\), "
                                                              r"but .*test also holds 2.tar"),
    (lambda f: (f / "test" / "nshards.txt").write_text("three"), r"nshards.txt: must hold the number of shards"),
    (lambda f: (f / "test" / "2.tar").write_bytes(b"not a tar file"), r"2.tar: not a readable tar file"),
    (lambda f: rewrite_label(f, b"4"), r"sample s0000013's label 4 is outside \[0, 4\), the classes in"),
    (lambda f: rewrite_label(f, b"red"), r"sample s0000013's .cls holds b'red', not an integer label"),
    (lambda f: (f / "zeroshot_classification_templates.txt").write_text("a {c}\na {0} photo\n"),
     r"templates.txt: line 2 \('a \{0\} photo'\): the field \{0\}; a template holds `\{c\}`"),
    (lambda f: (f / "dataset_type.txt").write_text("retrieval\n"), r"a retrieval set \(its dataset_type.txt says\), "
                                                                   r"not a classification set; pass it to --retrieval"),
    (lambda f: (f / "dataset_type.txt").write_text("multilabel\n"), r"'multilabel' is not a set type this project"),
])
def test_bad_folders_are_refused_in_one_line(pair, tmp_path, change, message):
    folder = broken_copy(pair, tmp_path, change)
    with pytest.raises(DataError, match=message) as error:
        load_eval_set("wds_broken", folder, to_value)
    assert "\n" not in str(error.value)


def test_a_sample_without_its_label_or_image_is_refused(tmp_path):
    write_shards(tmp_path / "set", [{"png": colour_image(random.Random(0), 0, "png")}, {"cls": 0}], sizes=(2,))
    (tmp_path / "set" / "classnames.txt").write_text("red\n")
    (tmp_path / "set" / "zeroshot_classification_templates.txt").write_text("{c}\n")
    with pytest.raises(DataError, match=r"0.tar: sample s0000000 has no .cls \(label\)"):
        load_eval_set("x", tmp_path / "set", to_value)


def test_a_linear_probe_reads_the_train_split(pair, tmp_path):
    folder = broken_copy(pair, tmp_path, lambda f: None)
    with pytest.raises(DataError, match=r"train/nshards.txt: missing; a clip_benchmark folder holds the number of "
                                        r"the train split's shards there"):
        load_eval_set("wds_colours", folder, to_value, train=True)
    shutil.copytree(folder / "test", folder / "train")
    for shard in (folder / "test").glob("*.tar"):
        shard.unlink()
    (folder / "test" / "nshards.txt").write_text("0\n")
    data = load_eval_set("wds_colours", folder, to_value, train=True)
    assert len(data.dataset) == 24 and data.num_classes == 4


def test_a_classification_folder_is_not_a_retrieval_set(pair):
    with pytest.raises(DataError, match=r"a classification set \(without `retrieval` in dataset_type.txt\), not a "
                                        r"retrieval set; pass it to --eval_test_data_dir"):
        load_retrieval_set(pair[0], CsvLayout("image", "caption", ","), to_value, "set")


def test_the_set_name_is_free_only_for_a_clip_benchmark_folder(pair, retrieval_pair, colour_data):
    bench, plain = pair
    cfg = parse_config(["--pretrained", "--eval_data_type", "wds_colours", "CIFAR10", "--eval_test_data_dir",
                        str(bench), str(bench), "--retrieval_data", str(retrieval_pair[0])])
    assert cfg.evaluation.eval_data_type == ("wds_colours", "CIFAR10")
    assert cfg.evaluation.retrieval_names == ["wds_colour_captions"]
    with pytest.raises(ConfigError, match=r"--eval_data_type wds_colours: unknown set; name one of Caltech101, .*, "
                                          r"or give a clip_benchmark folder"):
        parse_config(["--pretrained", "--eval_data_type", "wds_colours", "--eval_test_data_dir", str(plain)])
    with pytest.raises(ConfigError, match="--retrieval_data .*: no such file; pass a CSV .* or a clip_benchmark"):
        parse_config(["--pretrained", "--retrieval_data", str(colour_data["root"])])
    assert Config.from_dict(cfg.to_dict()) == cfg
