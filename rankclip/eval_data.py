"""Labelled image sets for zero-shot classification and linear probes, in four on-disk layouts, and
retrieval sets in two.

1. A CyCLIP folder: labels.csv (image,label) + classes.py, a dict literal of class names
   and caption templates that is parsed with `ast` and never executed.
2. The ImageNet family as image folders (ImageNet1K `val/n01440764/*.JPEG`, ImageNetSketch,
   ImageNet-A and ImageNet-R by WordNet id, ImageNetV2 by class index `0/ ... 999/`), with
   open_clip's class names and OpenAI's 80 templates. ImageNet-A and ImageNet-R hold 200 of
   the 1000 classes: their folders say which.
3. A torchvision dataset root (CIFAR10, SVHN, ...), read with `download=False`. Caltech101's has
   no split, so a fixed seeded one is drawn: 30 images per class train, the rest test.
4. clip_benchmark's webdataset folders (benchmark_layout.py), with their own class names and
   templates, under any set name; also for retrieval. Their shards are indexed at start-up (tar
   headers and the small label and caption members only) and the images streamed with webdataset.

Every set yields `(image tensor, label)`, or None for an image that cannot be read: the
evaluator skips and counts those.
"""

from __future__ import annotations

import ast
import bisect
import io
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torchvision.datasets as tvd
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from timm.data import ImageNetInfo
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, get_worker_info
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from .benchmark_layout import IMAGE_EXTENSIONS, BenchmarkSplit, is_benchmark_folder, read_benchmark_split
from .collectives import rank_block
from .config import CsvLayout
from .csv_index import open_caption_rows
from .data import load_image
from .errors import ConfigError, DataError
from .logger import log
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


@dataclass(frozen=True)
class ShardIndex:
    """A clip_benchmark split's samples in the order webdataset reads them, shard after shard: each
    sample's key, the tar offset of its first member, and its label or captions member's bytes."""

    shards: tuple[str, ...]
    first: tuple[int, ...]  # the index of each shard's first sample
    keys: tuple[str, ...]
    offsets: tuple[int, ...]
    targets: tuple[bytes, ...]

    def __len__(self) -> int:
        return len(self.keys)

    def segments(self, samples: range) -> list[tuple[int, range]]:
        """The contiguous run of `samples` cut at shard boundaries: (shard, its samples) pieces."""
        pieces = []
        start = samples.start
        while start < samples.stop:
            shard = bisect.bisect_right(self.first, start) - 1
            stop = min(samples.stop, self.first[shard + 1] if shard + 1 < len(self.first) else len(self))
            pieces.append((shard, range(start, stop)))
            start = stop
        return pieces


def index_shards(split: BenchmarkSplit) -> ShardIndex:
    """Read the split's tar headers (seeking past the images) and its small `.cls` or `.txt` members;
    members are grouped into samples by webdataset's own key rule. A sample without an image or without
    its label or captions is refused, as is a shard that is not a tar file."""
    first, keys, offsets, targets = [], [], [], []
    for path in split.shards:
        first.append(len(keys))
        members: Optional[dict[str, bytes]] = None  # the current sample's, by extension
        try:
            with tarfile.open(path) as tar:
                for info in tar:
                    key, extension = base_plus_ext(info.name)
                    if not info.isreg() or key is None or info.name.startswith("__"):
                        continue
                    if members is None or key != keys[-1]:
                        if members is not None:
                            targets.append(_sample_target(split, path, keys[-1], members))
                        keys.append(key)
                        offsets.append(info.offset)
                        members = {}
                    extension = extension.lower()
                    members[extension] = tar.extractfile(info).read() if extension == split.target else b""
        except (tarfile.TarError, OSError) as e:
            reason = str(e).splitlines()[-1].lstrip("- ")  # tarfile's message lists every method it tried
            raise DataError(f"{path}: not a readable tar file ({reason}); fetch the set again") from e
        if members is not None:
            targets.append(_sample_target(split, path, keys[-1], members))
    if not keys:
        raise DataError(f"{split.root}: its shards hold no samples")
    log.info(f"{split.shards[0].parent}: {len(keys)} samples in {len(split.shards)} shards indexed")
    return ShardIndex(tuple(map(str, split.shards)), tuple(first), tuple(keys), tuple(offsets), tuple(targets))


def _sample_target(split: BenchmarkSplit, path: Path, key: str, members: dict[str, bytes]) -> bytes:
    """The sample's label or captions member, after checking that it has an image too."""
    if not any(e in members for e in IMAGE_EXTENSIONS):
        raise DataError(f"{path}: sample {key} has no image ({', '.join('.' + e for e in IMAGE_EXTENSIONS)})")
    if split.target not in members:
        what = "captions" if split.kind == "retrieval" else "label"
        raise DataError(f"{path}: sample {key} has no .{split.target} ({what})")
    return members[split.target]


class ShardedImages(IterableDataset):
    """A clip_benchmark split's images with their labels, streamed from its shards with webdataset;
    an unreadable image comes back as None. `share` gives one process its block of the samples, which
    its DataLoader workers read in turns of whole batches, so that the batches arrive in order."""

    def __init__(self, index: ShardIndex, labels: Sequence[int], transform: Callable,
                 block: Optional[range] = None, batch_size: int = 1) -> None:
        self.index, self.labels, self.transform = index, labels, transform
        self.block, self.batch_size = range(len(index)) if block is None else block, batch_size

    def __len__(self) -> int:
        return len(self.index)

    def share(self, block: range, batch_size: int) -> ShardedImages:
        """The same set, iterating only `block` (a range of its samples), in batches of `batch_size`."""
        return ShardedImages(self.index, self.labels, self.transform, block, batch_size)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batches from its workers in turn, from worker 0: worker w reads batches w, w + K, ...
        for start in range(worker * self.batch_size, len(self.block), workers * self.batch_size):
            for shard, samples in self.index.segments(self.block[start:start + self.batch_size]):
                yield from self._read(shard, samples)

    def _read(self, shard: int, samples: range):
        """The samples of one shard, streamed from the first one's tar header on."""
        path = self.index.shards[shard]
        with open(path, "rb") as stream:
            stream.seek(self.index.offsets[samples.start])
            records = group_by_keys(tar_file_expander([{"url": path, "stream": stream}]))
            for sample, record in zip(samples, records):
                if record["__key__"] != self.index.keys[sample]:
                    raise DataError(f"{path}: changed while it was read (sample {self.index.keys[sample]} is now "
                                    f"{record['__key__']})")
                image_bytes = next(record[e] for e in IMAGE_EXTENSIONS if e in record)
                image = load_image(io.BytesIO(image_bytes))
                yield None if image is None else (self.transform(image), self.labels[sample])


def _benchmark_set(name: str, root: Path, transform: Callable, train: bool) -> LabeledSet:
    split = read_benchmark_split(root, "train" if train else "test", "classification")
    index = index_shards(split)
    labels = []
    for key, target in zip(index.keys, index.targets):
        try:
            labels.append(int(target))
        except ValueError:
            raise DataError(f"{root}: sample {key}'s .cls holds {target[:20]!r}, not an integer label") from None
        if not 0 <= labels[-1] < len(split.classes):
            raise DataError(f"{root}: sample {key}'s label {labels[-1]} is outside [0, {len(split.classes)}), "
                            f"the classes in {root / 'classnames.txt'}")
    templates = [Template(parts) for parts in split.templates]
    return LabeledSet(name, ShardedImages(index, labels, transform), len(split.classes), split.classes, templates)


def load_eval_set(name: str, root: str | Path, transform: Callable, train: bool = False) -> LabeledSet:
    """The split at `root` of eval set `name`, in whichever supported layout `root` holds."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: no such folder for {name}")
    if (root / "labels.csv").is_file():
        return _labels_csv_set(name, root, transform)
    if is_benchmark_folder(root):
        return _benchmark_set(name, root, transform, train)
    if name in TORCHVISION_SETS:
        return _torchvision_set(name, root, transform, train)
    if name in IMAGENET_FAMILY:
        return _image_folder_set(name, root, transform, train)
    raise DataError(f"{root}: no labels.csv for {name}; use the labels.csv + classes.py layout or "
                    f"clip_benchmark's (test/nshards.txt, test/0.tar ..., classnames.txt, ...)")


@dataclass(frozen=True)
class RetrievalSet:
    """Distinct images (each labelled by its own index) and all captions; caption t shows image
    caption_image[t]. Several captions per image, as in the Flickr30k and MSCOCO test sets."""

    name: str
    images: Dataset  # (image, its index) samples
    captions: list[str]
    caption_image: torch.Tensor  # [T] long


def load_retrieval_set(path: str | Path, layout: CsvLayout, transform: Callable, name: str) -> RetrievalSet:
    """An image-caption CSV as a retrieval set recorded as `name` (EvaluationConfig.retrieval_names): rows
    with the same image path share the image; or a clip_benchmark retrieval folder, whose samples hold an
    image and its captions."""
    if is_benchmark_folder(path):
        return _benchmark_retrieval_set(Path(path), transform, name)
    rows = open_caption_rows(path, layout)
    captions = [rows.caption(i) for i in range(len(rows))]
    index: dict[str, int] = {}
    caption_image = [index.setdefault(rows.image(i), len(index)) for i in range(len(rows))]
    images = LabeledImages(list(index), range(len(index)), transform)
    return RetrievalSet(name, images, captions, torch.tensor(caption_image))


def _benchmark_retrieval_set(root: Path, transform: Callable, name: str) -> RetrievalSet:
    """The test split of a clip_benchmark retrieval folder; each `.txt` holds its image's captions, one a
    line (split as clip_benchmark splits them, with `str.splitlines`)."""
    index = index_shards(read_benchmark_split(root, "test", "retrieval"))
    captions, caption_image = [], []
    for image, (key, target) in enumerate(zip(index.keys, index.targets)):
        try:
            lines = target.decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise DataError(f"{root}: sample {key}'s .txt is not UTF-8 text ({e})") from e
        captions += lines
        caption_image += [image] * len(lines)
    if not captions:
        raise DataError(f"{root}: its .txt members hold no captions")
    images = ShardedImages(index, range(len(index)), transform)
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
    """This process's contiguous block of `dataset`, in order (evaluation gathers the blocks); a streamed
    set (ShardedImages) reads its block itself."""
    block = rank_block(len(dataset), runtime.rank, runtime.world_size)
    options = dict(batch_size=batch_size, num_workers=num_workers, collate_fn=collate_labeled,
                   pin_memory=runtime.device.type == "cuda")
    if isinstance(dataset, ShardedImages):
        return DataLoader(dataset.share(block, batch_size), **options)
    return DataLoader(dataset, sampler=block, **options)


def images_in_share(loader: DataLoader) -> int:
    """How many images a loader of build_labeled_loader holds: this process's block of its set."""
    return len(loader.dataset.block) if isinstance(loader.dataset, ShardedImages) else len(loader.sampler)
