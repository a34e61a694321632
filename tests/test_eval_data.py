"""Evaluation sets in each supported layout: labels.csv folders, ImageNet-style trees, torchvision roots."""

import pickle
import shutil

import numpy as np
import pytest
import torch
import torchvision
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from PIL import Image

from rankclip.errors import DataError
from rankclip.config import CsvLayout
from rankclip.config import EVAL_DATA_TYPES
from rankclip.eval_data import (IMAGENET_FAMILY, TORCHVISION_SETS, collate_labeled, imagenet_wnids,
                                load_eval_set, load_retrieval_set, parse_classes_file)


def to_tensor(image):
    return torch.tensor(np.asarray(image, dtype=np.float32).mean())


def write_png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path)


def test_every_seed_eval_type_has_a_loader():
    assert set(EVAL_DATA_TYPES) == set(IMAGENET_FAMILY) | set(TORCHVISION_SETS)
    assert len(EVAL_DATA_TYPES) == 18


def test_classes_file_is_parsed_as_data(tmp_path):
    path = tmp_path / "classes.py"
    path.write_text('{"classes": ["cat", "dog"], "templates": [lambda s: f"a photo of a {s}.", lambda c: f"{c}"]}')
    classes, templates = parse_classes_file(path)
    assert classes == ["cat", "dog"]
    assert [t("cat") for t in templates] == ["a photo of a cat.", "cat"]


@pytest.mark.parametrize("content", [
    '__import__("pathlib").Path("{marker}").touch()',
    '{{"classes": [__import__("pathlib").Path("{marker}").touch()], "templates": [lambda s: s]}}',
    '{{"classes": ["a"], "templates": [lambda s: __import__("pathlib").Path("{marker}").touch()]}}',
    '{{"classes": ["a"], "templates": [lambda s: f"{{s!r}}"]}}',
    'import os\n{{"classes": ["a"], "templates": [lambda s: s]}}',
])
def test_classes_file_with_code_is_refused_without_running_it(tmp_path, content):
    marker = tmp_path / "executed"
    path = tmp_path / "classes.py"
    path.write_text(content.format(marker=marker))
    with pytest.raises(DataError, match="classes.py"):
        parse_classes_file(path)
    assert not marker.exists()


def test_labeled_folder_drops_unreadable_images(colour_data, tmp_path):
    folder = tmp_path / "zs"
    shutil.copytree(colour_data["zeroshot"], folder)
    first = (folder / "labels.csv").read_text().splitlines()[1].split(",")[0]
    (folder / first).write_bytes(b"garbage")
    dataset = load_eval_set("CIFAR10", folder, to_tensor).dataset
    assert len(dataset) == 64 and dataset[0] is None
    images, labels, bad = collate_labeled([dataset[i] for i in range(4)])
    assert (images.shape[0], bad) == (3, 1)
    assert labels.tolist() == [1, 2, 3]


def test_labels_out_of_range_of_the_classes_are_refused(colour_data, tmp_path):
    folder = tmp_path / "zs"
    shutil.copytree(colour_data["zeroshot"], folder)
    with open(folder / "labels.csv", "a") as f:
        f.write("images/0_0.png,4\n")  # the fixture has 4 classes: 0..3
    with pytest.raises(DataError, match=r"labels must lie in \[0, 4\)"):
        load_eval_set("CIFAR10", folder, to_tensor)


def test_labels_csv_without_classes_py_uses_imagenet_names_or_asks_for_the_file(colour_data, tmp_path):
    folder = tmp_path / "zs"
    shutil.copytree(colour_data["zeroshot"], folder)
    (folder / "classes.py").unlink()
    imagenet = load_eval_set("ImageNet1K", folder, to_tensor)
    assert imagenet.classes == list(IMAGENET_CLASSNAMES) and len(imagenet.templates) == 80
    cifar = load_eval_set("CIFAR10", folder, to_tensor)
    assert cifar.num_classes == 4
    with pytest.raises(DataError, match="put a classes.py"):
        cifar.require_prompts()


def test_imagenet_subset_folders_pick_their_classes(tmp_path):
    wnids = imagenet_wnids()
    chosen = [wnids[6], wnids[1], wnids[999]]  # stingray, goldfish, toilet paper: any order on disk
    for value, wnid in enumerate(chosen):
        write_png(tmp_path / "imagenet-a" / wnid / f"{value}.JPEG", value * 50)
    data = load_eval_set("ImageNet-A", tmp_path / "imagenet-a", to_tensor)
    assert data.classes == [IMAGENET_CLASSNAMES[1], IMAGENET_CLASSNAMES[6], IMAGENET_CLASSNAMES[999]]
    assert [t("dog") for t in data.templates] == [t("dog") for t in OPENAI_IMAGENET_TEMPLATES]
    labels = {float(value): label for value, label in (data.dataset[i] for i in range(3))}
    assert labels == {50.0: 0, 0.0: 1, 100.0: 2}  # goldfish (value 50) is class 0 of the subset


def test_imagenet_val_tree_maps_folders_to_the_1000_classes(tmp_path):
    wnids = imagenet_wnids()
    for wnid in wnids:
        (tmp_path / "val" / wnid).mkdir(parents=True)
    write_png(tmp_path / "val" / wnids[0] / "a.JPEG", 10)
    write_png(tmp_path / "val" / wnids[417] / "b.JPEG", 20)
    data = load_eval_set("ImageNet1K", tmp_path, to_tensor)  # the root holding val/ works too
    assert data.num_classes == 1000 and data.classes == list(IMAGENET_CLASSNAMES)
    assert sorted(label for _, label in (data.dataset[i] for i in range(2))) == [0, 417]


def test_imagenet_v2_folders_are_class_indices(tmp_path):
    for index in range(1000):
        (tmp_path / str(index)).mkdir()
    write_png(tmp_path / "2" / "x.jpeg", 1)
    write_png(tmp_path / "10" / "y.jpeg", 2)
    data = load_eval_set("ImageNetV2", tmp_path, to_tensor)
    assert sorted(label for _, label in (data.dataset[i] for i in range(2))) == [2, 10]


def test_incomplete_imagenet_tree_is_refused(tmp_path):
    for wnid in imagenet_wnids()[:3]:
        write_png(tmp_path / wnid / "a.JPEG", 1)
    with pytest.raises(DataError, match="ImageNet1K has 1000 class folders, found 3"):
        load_eval_set("ImageNet1K", tmp_path, to_tensor)
    (tmp_path / "not-a-wnid").mkdir()
    with pytest.raises(DataError, match="named by WordNet id"):
        load_eval_set("ImageNet-R", tmp_path, to_tensor)


def write_cifar10_root(root, images: np.ndarray, labels: list[int]) -> None:
    """CIFAR-10's python layout: pickled dicts with uint8 rows of 3x32x32 pixels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": images.reshape(len(labels), -1), "labels": labels}, f)


def test_torchvision_cifar10_root(tmp_path, monkeypatch):
    # The fixture cannot match the real files' MD5 sums, which torchvision checks before reading.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    images = np.stack([np.full((3, 32, 32), v, dtype=np.uint8) for v in (0, 100, 200)])
    write_cifar10_root(tmp_path, images, [3, 1, 9])
    data = load_eval_set("CIFAR10", tmp_path, to_tensor)
    assert data.num_classes == 10 and data.classes[:2] == ["airplane", "automobile"]
    assert [t("cat") for t in data.templates] == ["a photo of a cat."]
    assert [(float(x), y) for x, y in (data.dataset[i] for i in range(3))] == [(0.0, 3), (100.0, 1), (200.0, 9)]
    images, labels, bad = collate_labeled([data.dataset[i] for i in range(3)])
    assert labels.tolist() == [3, 1, 9] and bad == 0


def test_missing_torchvision_files_say_where_they_belong(tmp_path):
    with pytest.raises(DataError, match="no CIFAR100 files; torchvision expects cifar-100-python/ there"):
        load_eval_set("CIFAR100", tmp_path, to_tensor)
    with pytest.raises(DataError, match="test_32x32.mat"):
        load_eval_set("SVHN", tmp_path, to_tensor)


def test_retrieval_csv_groups_captions_by_image(tmp_path):
    for name in ("a", "b", "c"):
        write_png(tmp_path / f"{name}.png", 1)
    (tmp_path / "test.csv").write_text("image,caption\na.png,one\nb.png,two\na.png,three\nc.png,four\n"
                                       "b.png,five\n")
    data = load_retrieval_set(tmp_path / "test.csv", CsvLayout(), to_tensor, "test")
    assert data.name == "test" and len(data.images) == 3
    assert data.captions == ["one", "two", "three", "four", "five"]
    assert data.caption_image.tolist() == [0, 1, 0, 2, 1]
    assert [data.images[i][1] for i in range(3)] == [0, 1, 2]


def test_caltech101_root_is_split_30_per_class_the_same_way_every_time(caltech101_root):
    """torchvision's Caltech101 has no split: training takes 30 seeded images per class, testing the rest."""
    train = load_eval_set("Caltech101", caltech101_root, to_tensor, train=True)
    test = load_eval_set("Caltech101", caltech101_root, to_tensor)
    again = load_eval_set("Caltech101", caltech101_root, to_tensor, train=True)

    def images(data):
        inner = data.dataset.dataset  # SkipUnreadable(Subset(Caltech101))
        return [(inner.dataset.y[i], inner.dataset.index[i]) for i in inner.indices]

    assert len(train.dataset) == 3 * 30 and len(test.dataset) == (32 + 35 + 40) - 3 * 30
    assert not set(images(train)) & set(images(test))
    assert images(train) == images(again)
    assert sorted(label for label, _ in images(test)) == [0] * 2 + [1] * 5 + [2] * 10
    assert {index for label, index in images(train) if label == 2} != set(range(1, 31))  # drawn, not the first 30
    assert "30 images per class" in train.split and "seed" in train.split and train.split == test.split
    assert train.classes == test.classes == ["accordion", "anchor", "ant"]
