"""Shared fixtures: a tiny image-caption dataset with real signal (colour names), written to disk."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}
PHRASES = ["a photo of a {} square", "{} colour", "something {}", "a {} picture"]


def write_colour_images(folder: Path, count: int, seed: int) -> list[tuple[str, int]]:
    """`count` noisy 32x32 images of one colour each; returns (relative path, class index)."""
    rng = random.Random(seed)
    names = list(COLOURS)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        label = i % len(names)
        base = COLOURS[names[label]]
        image = Image.new("RGB", (32, 32), tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in base))
        name = f"{seed}_{i}.png"
        image.save(folder / name)
        rows.append((f"{folder.name}/{name}", label))
    return rows


def write_caption_csv(root: Path, name: str, count: int, seed: int, delimiter: str = ",") -> Path:
    rng = random.Random(seed)
    names = list(COLOURS)
    rows = write_colour_images(root / f"images_{name}", count, seed)
    path = root / f"{name}.csv"
    with open(path, "w") as f:
        f.write(f"image{delimiter}caption\n")
        for image, label in rows:
            f.write(f"{image}{delimiter}{rng.choice(PHRASES).format(names[label])}\n")
    return path


def write_zeroshot_folder(root: Path, count: int, seed: int) -> Path:
    folder = root / "zeroshot"
    rows = write_colour_images(folder / "images", count, seed)
    with open(folder / "labels.csv", "w") as f:
        f.write("image,label\n")
        for image, label in rows:
            f.write(f"images/{Path(image).name},{label}\n")
    classes = ", ".join(f'"{c}"' for c in COLOURS)
    (folder / "classes.py").write_text(
        '{"classes": [' + classes + '], "templates": [lambda s: f"a photo of a {s} square.", '
        'lambda s: f"{s} colour"]}\n')
    return folder


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory) -> dict:
    """train.csv (256 rows), validation.csv (64 rows) and a zero-shot folder (64 images)."""
    root = tmp_path_factory.mktemp("colours")
    return {
        "root": root,
        "train": write_caption_csv(root, "train", 256, seed=1),
        "validation": write_caption_csv(root, "validation", 64, seed=2),
        "zeroshot": write_zeroshot_folder(root, 64, seed=3),
    }


@pytest.fixture(scope="session")
def colour_shards(colour_data) -> str:
    """The 256 training pairs as 4 webdataset shards of 64 (png + txt), as a brace pattern."""
    folder = colour_data["root"] / "shards"
    folder.mkdir()
    rows = [line.split(",", 1) for line in colour_data["train"].read_text().splitlines()[1:]]
    for shard in range(4):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as sink:
            for i in range(shard * 64, (shard + 1) * 64):
                image, caption = rows[i]
                sink.write({"__key__": f"{i:05d}", "png": (colour_data["root"] / image).read_bytes(),
                            "txt": caption})
    return str(folder / "{00000..00003}.tar")


def write_caltech101_root(root: Path, per_class: dict[str, int]) -> Path:
    """torchvision's Caltech101 layout (`caltech101/101_ObjectCategories/<class>/image_0001.jpg`, ...,
    with the BACKGROUND_Google folder that torchvision leaves out); each class's images share a colour."""
    folder = root / "caltech101" / "101_ObjectCategories"
    (folder / "BACKGROUND_Google").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "BACKGROUND_Google" / "image_0001.jpg")
    for (name, count), colour in zip(per_class.items(), COLOURS.values()):
        (folder / name).mkdir()
        for i in range(1, count + 1):
            Image.new("RGB", (8, 8), colour).save(folder / name / f"image_{i:04d}.jpg")
    return root


@pytest.fixture(scope="session")
def caltech101_root(tmp_path_factory) -> Path:
    """A torchvision Caltech101 root of three classes with 32, 35 and 40 images."""
    return write_caltech101_root(tmp_path_factory.mktemp("caltech"), {"accordion": 32, "anchor": 35, "ant": 40})


@pytest.fixture
def single_thread():
    """Tiny tensors run faster on one thread: OpenMP hand-offs cost milliseconds per op on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


HOST_READS = ("item", "tolist", "numpy", "cpu", "nonzero", "__float__", "__int__", "__index__", "__bool__",
              "__format__")
PACKAGE_DIR = str(Path(__file__).resolve().parent.parent / "rankclip")


@pytest.fixture
def host_reads(monkeypatch) -> list[str]:
    """Every call made from rankclip's own code that reads a tensor's values on the host, as "file:line name".

    On a GPU each of them waits until the device has finished all queued work (a sync). Calls
    inside torch (e.g. the optimizer reading its CPU step counter) are not counted.
    """
    reads: list[str] = []

    def counting(name: str):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(PACKAGE_DIR):
                reads.append(f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno} {name}")
            return original(self, *args, **kwargs)
        return wrapper

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    return reads
