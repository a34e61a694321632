"""Labelled image sets for zero-shot classification and linear probes, in three on-disk layouts.

1. A CyCLIP folder: labels.csv (image,label) + classes.py, a dict literal of class names
   and caption templates that is parsed with `ast` and never executed.
2. The ImageNet family as image folders (ImageNet1K `val/n01440764/*.JPEG`, ImageNetSketch,
   ImageNet-A and ImageNet-R by WordNet id, ImageNetV2 by class index `0/ ... 999/`), with
   open_clip's class names and OpenAI's 80 templates. ImageNet-A and ImageNet-R hold 200 of
   the 1000 classes: their folders say which.
3. A torchvision dataset root (CIFAR10, SVHN, ...), read with `download=False`. Caltech101's has
   no split, so a fixed seeded one is drawn: 30 images per class train, the rest test.

Every set yields `(image tensor, label)`, or None for an image that cannot be read: the
evaluator skips and counts those.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torchvision.datasets as tvd
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from timm.data import ImageNetInfo
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from .collectives import rank_block
from .config import CsvLayout
from .csv_index import open_caption_rows
from .data import load_image
from .errors import ConfigError, DataError
from .runtime import Runtime

IMAGENET_FAMILY = ("ImageNet1K", "ImageNetSketch", "ImageNetV2", "ImageNet-A", "ImageNet-R")
IMAGENET_SUBSETS = ("ImageNet-A", "ImageNet-R")  # 200-class subsets, chosen by their folders

# torchvision class, the keyword arguments of its (test, train) splits, and what its root holds.
TORCHVISION_SETS: dict[str, tuple[type, dict, dict, str]] = {
    "Caltech101": (tvd.Caltech101, {}, {}, "caltech101/101_ObjectCategories/"),
    "CIFAR10": (tvd.CIFAR10, {"train": False}, {"train": True}, "cifar-10-batches-py/"),
    "CIFAR100": (tvd.CIFAR100, {"train": False}, {"train": True}, "cifar-100-python/"),
    "DTD": (tvd.DTD, {"split": "test"}, {"split": "train"}, "dtd/"),
    "FGVCAircraft": (tvd.FGVCAircraft, {"split": "test"}, {"split": "trainval"}, "fgvc-aircraft-2013b/"),
    "Flowers102": (tvd.Flowers102, {"split": "test"}, {"split": "train"}, "flowers-102/"),
    "Food101": (tvd.Food101, {"split": "test"}, {"split": "train"}, "food-101/"),
    "GTSRB": (tvd.GTSRB, {"split": "test"}, {"split": "train"}, "gtsrb/"),
    "OxfordIIITPet": (tvd.OxfordIIITPet, {"split": "test"}, {"split": "trainval"}, "oxford-iiit-pet/"),
    "RenderedSST2": (tvd.RenderedSST2, {"split": "test"}, {"split": "train"}, "rendered-sst2/"),
    "StanfordCars": (tvd.StanfordCars, {"split": "test"}, {"split": "train"}, "stanford_cars/"),
    "STL10": (tvd.STL10, {"split": "test"}, {"split": "train"}, "stl10_binary/"),
    "SVHN": (tvd.SVHN, {"split": "test"}, {"split": "train"}, "test_32x32.mat and train_32x32.mat"),
}
CALTECH101_TRAIN_PER_CLASS = 30  # the usual protocol (Fei-Fei et al.; CLIP's 3,060 training images)
CALTECH101_SPLIT_SEED = 0  # fixed, not --seed: every run is tested on the same images
DIGITS = tuple(str(d) for d in range(10))  # SVHN's labels are its digits (torchvision maps "10" to 0)


@dataclass(frozen=True)
class Template:
    """A caption template such as `lambda s: f"a photo of a {s}."`, kept as literal parts."""

    parts: tuple[Optional[str], ...]  # None marks where the class name goes

    def __call__(self, name: str) -> str:
        return "".join(name if part is None else part for part in self.parts)


def _template_from_ast(node: ast.AST, where: str) -> Template:
    ok = isinstance(node, ast.Lambda) and len(node.args.args) == 1 and not node.args.defaults
    if ok:
        arg, body = node.args.args[0].arg, node.body
        pieces = body.values if isinstance(body, ast.JoinedStr) else [body]
        parts: list[Optional[str]] = []
        for piece in pieces:
            if isinstance(piece, ast.Constant) and isinstance(piece.value, str):
                parts.append(piece.value)
            elif (isinstance(piece, ast.FormattedValue) and isinstance(piece.value, ast.Name)
                  and piece.value.id == arg and piece.conversion == -1 and piece.format_spec is None):
                parts.append(None)
            else:
                ok = False
        if ok:
            return Template(tuple(parts))
    raise DataError(f"{where}: templates must be lambdas like `lambda s: f\"a photo of a {{s}}.\"`, found "
                      f"`{ast.unparse(node)[:60]}`")


def parse_classes_file(path: str | Path) -> tuple[list[str], list[Template]]:
    """Read classes.py as data: one dict literal with "classes" (strings) and "templates" (lambdas).

    The file is parsed with `ast` and never executed; anything else in it is refused.
    """
    try:
        tree = ast.parse(Path(path).read_text(), mode="eval")
    except FileNotFoundError as e:
        raise DataError(f"{path}: missing; an eval folder needs classes.py") from e
    except SyntaxError as e:
        raise DataError(f"{path}: must be a single dict literal {{\"classes\": [...], \"templates\": [...]}} "
                          f"({e.msg}, line {e.lineno})") from e
    shape = "must be a single dict literal {\"classes\": [...], \"templates\": [...]}"
    if not isinstance(tree.body, ast.Dict):
        raise DataError(f"{path}: {shape}")
    entries = {}
    for key, value in zip(tree.body.keys, tree.body.values):
        if not (isinstance(key, ast.Constant) and key.value in ("classes", "templates")
                and isinstance(value, (ast.List, ast.Tuple))):
            raise DataError(f"{path}: {shape}")
        entries[key.value] = value.elts
    if set(entries) != {"classes", "templates"}:
        raise DataError(f"{path}: {shape}")
    classes = []
    for node in entries["classes"]:
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            raise DataError(f"{path}: classes must be strings, found `{ast.unparse(node)[:60]}`")
        classes.append(node.value)
    templates = [_template_from_ast(node, str(path)) for node in entries["templates"]]
    if not classes or not templates:
        raise DataError(f"{path}: needs at least one class and one template")
    return classes, templates


# ----------------------------------------------------------------------------------------------
# Datasets


class LabeledImages(Dataset):
    """Image files with integer labels; an unreadable image comes back as None."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], transform: Callable) -> None:
        self.paths, self.labels, self.transform = list(paths), list(labels), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Optional[tuple[torch.Tensor, int]]:
        image = load_image(self.paths[index])
        return None if image is None else (self.transform(image), self.labels[index])


class SkipUnreadable(Dataset):
    """A torchvision dataset whose undecodable images come back as None instead of raising."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Optional[tuple[torch.Tensor, int]]:
        try:
            return self.dataset[index]
        except OSError:
            return None


@dataclass(frozen=True)
class LabeledSet:
    """One evaluation split: its images with labels, and (for zero-shot) class names and templates."""

    name: str
    dataset: Dataset
    num_classes: int
    classes: Optional[Sequence[str]] = None
    templates: Optional[Sequence[Callable[[str], str]]] = None
    split: Optional[str] = None  # how train and test were drawn, where this project drew them

    def require_prompts(self) -> tuple[Sequence[str], Sequence[Callable[[str], str]]]:
        if self.classes is None or self.templates is None:
            raise DataError(f"{self.name}: no class names are known for zero-shot classification; "
                              f"put a classes.py (dict of \"classes\" and \"templates\") in its folder")
        return self.classes, self.templates


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet WordNet ids in class-index order (timm's copy of the list)."""
    return tuple(ImageNetInfo("imagenet-1k").label_names())


def _labels_csv_set(name: str, root: Path, transform: Callable) -> LabeledSet:
    rows = open_caption_rows(root / "labels.csv", CsvLayout("image", "label", ","))
    images = [rows.image(i) for i in range(len(rows))]
    try:
        labels = [int(rows.caption(i)) for i in range(len(rows))]
    except ValueError as e:
        raise DataError(f"{root / 'labels.csv'}: labels must be integers ({e})") from e
    if (root / "classes.py").is_file():
        classes, templates = parse_classes_file(root / "classes.py")
    elif name in IMAGENET_FAMILY and name not in IMAGENET_SUBSETS:
        classes, templates = list(IMAGENET_CLASSNAMES), list(OPENAI_IMAGENET_TEMPLATES)
    else:
        classes, templates = None, None
    num_classes = len(classes) if classes is not None else max(labels) + 1
    if min(labels) < 0 or max(labels) >= num_classes:
        raise DataError(f"{root / 'labels.csv'}: labels must lie in [0, {num_classes}) "
                          f"(the classes listed in classes.py), found {min(labels)}..{max(labels)}")
    return LabeledSet(name, LabeledImages(images, labels, transform), num_classes, classes, templates)


def _image_folder_set(name: str, root: Path, transform: Callable, train: bool) -> LabeledSet:
    """ImageNet-family folders: one subfolder per class, named by WordNet id (or index, ImageNetV2).

    `root` is the class folders' parent, or holds them under train/ and val/."""
    split = root / ("train" if train else "val")
    folder = split if split.is_dir() else root
    names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    wnids = imagenet_wnids()
    if names and all(n.isdigit() for n in names):  # ImageNetV2: folders 0 ... 999 are class indices
        names = sorted(names, key=int)
        indices = [int(n) for n in names]
    else:
        unknown = [n for n in names if n not in wnids]
        if unknown or not names:
            raise DataError(f"{folder}: expected one subfolder per class named by WordNet id (n01440764, ...) "
                              f"or class index (ImageNetV2), found {unknown[:3] or 'none'}")
        indices = [wnids.index(n) for n in names]
    full = name not in IMAGENET_SUBSETS
    if full and len(names) != len(wnids):
        raise DataError(f"{folder}: {name} has {len(wnids)} class folders, found {len(names)}")
    samples = make_dataset(str(folder), {n: i for i, n in enumerate(names)}, extensions=IMG_EXTENSIONS,
                           allow_empty=True)
    if not samples:
        raise DataError(f"{folder}: no images ({', '.join(IMG_EXTENSIONS)}) in its class folders")
    paths, labels = zip(*samples)
    classes = [IMAGENET_CLASSNAMES[i] for i in indices]
    return LabeledSet(name, LabeledImages(paths, labels, transform), len(classes), classes,
                      list(OPENAI_IMAGENET_TEMPLATES))


def _torchvision_set(name: str, root: Path, transform: Callable, train: bool) -> LabeledSet:
    cls, test_kwargs, train_kwargs, holds = TORCHVISION_SETS[name]
    try:
        dataset = cls(str(root), transform=transform, download=False, **(train_kwargs if train else test_kwargs))
    except (RuntimeError, FileNotFoundError) as e:
        raise DataError(f"{root}: no {name} files; torchvision expects {holds} there (this project never "
                          f"downloads at run time: fetch it elsewhere with torchvision.datasets.{cls.__name__}"
                          f"(root, download=True) and copy the root)") from e
    if (root / "classes.py").is_file():
        classes, templates = parse_classes_file(root / "classes.py")
    else:
        known = getattr(dataset, "classes", None) or getattr(dataset, "categories", None)
        known = DIGITS if name == "SVHN" else known
        classes = [c.replace("_", " ") for c in known] if known else None
        templates = [Template(("a photo of a ", None, "."))] if known else None
    num_classes = len(classes) if classes else int(max(_targets(dataset))) + 1
    split = None
    if name == "Caltech101":
        dataset, split = _caltech101_split(dataset, train)
    return LabeledSet(name, SkipUnreadable(dataset), num_classes, classes, templates, split)


def _caltech101_split(dataset: Dataset, train: bool) -> tuple[Subset, str]:
    """torchvision's Caltech101 is one unsplit set, so the same root serves as train and test folder:
    per class, CALTECH101_TRAIN_PER_CLASS images drawn with a fixed seed train, the others test."""
    labels = torch.tensor(_targets(dataset))
    generator = torch.Generator().manual_seed(CALTECH101_SPLIT_SEED)
    chosen = []
    for label in range(int(labels.max()) + 1):
        members = (labels == label).nonzero().flatten()
        drawn = members[torch.randperm(len(members), generator=generator)]
        chosen.append(drawn[:CALTECH101_TRAIN_PER_CLASS] if train else drawn[CALTECH101_TRAIN_PER_CLASS:])
    description = (f"torchvision Caltech101 has no split: {CALTECH101_TRAIN_PER_CLASS} images per class drawn with "
                   f"seed {CALTECH101_SPLIT_SEED} train, the rest test")
    return Subset(dataset, torch.cat(chosen).sort().values.tolist()), description


def _targets(dataset: Dataset) -> Sequence[int]:
    """The labels of a torchvision dataset without decoding its images."""
    for attribute in ("targets", "labels", "_labels", "y"):
        if hasattr(dataset, attribute):
            return list(getattr(dataset, attribute))
    return [int(target) for _, target in getattr(dataset, "_samples")]


def load_eval_set(name: str, root: str | Path, transform: Callable, train: bool = False) -> LabeledSet:
    """The split at `root` of eval set `name`, in whichever supported layout `root` holds."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: no such folder for {name}")
    if (root / "labels.csv").is_file():
        return _labels_csv_set(name, root, transform)
    if name in TORCHVISION_SETS:
        return _torchvision_set(name, root, transform, train)
    if name in IMAGENET_FAMILY:
        return _image_folder_set(name, root, transform, train)
    raise DataError(f"{root}: no labels.csv for {name}; use the labels.csv + classes.py layout")


@dataclass(frozen=True)
class RetrievalSet:
    """Distinct images (each labelled by its own index) and all captions; caption t shows image
    caption_image[t]. Several captions per image, as in the Flickr30k and MSCOCO test sets."""

    name: str
    images: LabeledImages
    captions: list[str]
    caption_image: torch.Tensor  # [T] long


def load_retrieval_set(path: str | Path, layout: CsvLayout, transform: Callable, name: str) -> RetrievalSet:
    """An image-caption CSV as a retrieval set recorded as `name` (EvaluationConfig.retrieval_names):
    rows with the same image path share the image."""
    rows = open_caption_rows(path, layout)
    captions = [rows.caption(i) for i in range(len(rows))]
    index: dict[str, int] = {}
    caption_image = [index.setdefault(rows.image(i), len(index)) for i in range(len(rows))]
    images = LabeledImages(list(index), range(len(index)), transform)
    return RetrievalSet(name, images, captions, torch.tensor(caption_image))


def collate_labeled(samples: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack readable samples; also return how many were unreadable."""
    good = [s for s in samples if s is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), len(samples)
    images = torch.stack([s[0] for s in good])
    labels = torch.tensor([int(s[1]) for s in good])
    return images, labels, len(samples) - len(good)


def build_labeled_loader(dataset: Dataset, runtime: Runtime, batch_size: int, num_workers: int) -> DataLoader:
    """This process's contiguous block of `dataset`, in order (evaluation gathers the blocks)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=rank_block(len(dataset), runtime.rank, runtime.world_size),
                      num_workers=num_workers, collate_fn=collate_labeled, pin_memory=runtime.device.type == "cuda")
