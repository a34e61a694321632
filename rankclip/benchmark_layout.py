"""clip_benchmark's webdataset layout of evaluation sets (the `clip-benchmark/wds_*` sets on Hugging Face), as
its reader `clip_benchmark.datasets.builder.build_wds_dataset` expects it:

    DIR/test/nshards.txt    n, the split's number of shards: DIR/test/0.tar ... DIR/test/{n-1}.tar
    DIR/train/...           the same for the training split (linear probes), where the set has one
    DIR/classnames.txt      one class name a line, in label order (classification sets)
    DIR/zeroshot_classification_templates.txt   one template a line, `{c}` where the class name goes
    DIR/dataset_type.txt    `retrieval` for retrieval sets; absent for classification sets

A shard holds samples `<key>.<webp|png|jpg|jpeg>` with `<key>.cls` (the label, an integer) or, in a
retrieval set, `<key>.txt` (the image's captions, one a line). This module reads and checks the small
files (standard library only, so that the configuration can recognize such a folder at start-up);
eval_data.py indexes and streams the shards.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import DataError

CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
DATASET_TYPE = "dataset_type.txt"
NSHARDS = "nshards.txt"
SPLITS = ("test", "train")  # the folders of --eval_test_data_dir and --eval_train_data_dir
MARKERS = (f"test/{NSHARDS}", f"train/{NSHARDS}", CLASSNAMES, TEMPLATES, DATASET_TYPE)
# The image extensions in the order clip_benchmark picks one when a sample has several.
IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")
# dataset_type.txt -> the member holding each sample's target; an absent file means classification.
TARGETS = {"classification": "cls", "retrieval": "txt"}
FETCH = "huggingface-cli download --repo-type dataset clip-benchmark/wds_<set> --local-dir DIR"


def is_benchmark_folder(path: str | Path) -> bool:
    """Whether `path` is a folder in clip_benchmark's layout: it holds any of the layout's files and no
    labels.csv (whose folder is read in the labels.csv + classes.py layout)."""
    root = Path(path)
    return root.is_dir() and not (root / "labels.csv").is_file() and any((root / m).is_file() for m in MARKERS)


@dataclass(frozen=True)
class BenchmarkSplit:
    """One split of a clip_benchmark folder: its shards in order and, for classification, its class names
    and templates (each a tuple of literal parts, None where the class name goes)."""

    root: Path
    kind: str  # "classification" or "retrieval"
    shards: tuple[Path, ...]
    classes: Optional[tuple[str, ...]] = None
    templates: Optional[tuple[tuple[Optional[str], ...], ...]] = None

    @property
    def target(self) -> str:
        """The extension of each sample's label (`cls`) or captions (`txt`)."""
        return TARGETS[self.kind]


def read_benchmark_split(root: str | Path, split: str, kind: str) -> BenchmarkSplit:
    """Split `split` (test or train) of the clip_benchmark folder `root`, which must be a `kind` set
    (classification or retrieval); its files are checked here, each problem one line."""
    root = Path(root)
    found = _dataset_type(root)
    if found != kind:
        flag = "--retrieval_data" if found == "retrieval" else "--eval_test_data_dir with --eval_data_type"
        why = f"its {DATASET_TYPE} says" if found == "retrieval" else f"without `retrieval` in {DATASET_TYPE}"
        raise DataError(f"{root}: a {found} set ({why}), not a {kind} set; pass it to {flag}")
    shards = _shards(root, split)
    if kind == "retrieval":
        return BenchmarkSplit(root, kind, shards)
    classes = _lines(root / CLASSNAMES, "class name")
    templates = tuple(_template(line, root / TEMPLATES, number)
                      for number, line in enumerate(_lines(root / TEMPLATES, "template"), start=1))
    return BenchmarkSplit(root, kind, shards, classes, templates)


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise DataError(f"{path}: missing; a clip_benchmark folder holds {what} there (fetch the whole set "
                        f"beforehand: {FETCH})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({e})") from e


def _dataset_type(root: Path) -> str:
    """As clip_benchmark reads it: the stripped, lower-cased file; no file is a classification set."""
    if not (root / DATASET_TYPE).exists():
        return "classification"
    value = _read(root / DATASET_TYPE, "the set's type").strip().lower()
    if value not in TARGETS:
        raise DataError(f"{root / DATASET_TYPE}: {value!r} is not a set type this project reads; write "
                        f"`retrieval`, or delete the file for a classification set (multilabel sets are not "
                        f"supported)")
    return value


def _shards(root: Path, split: str) -> tuple[Path, ...]:
    """The split's n shards 0.tar ... {n-1}.tar, n from its nshards.txt; a missing or extra shard is refused."""
    folder = root / split
    count_file = folder / NSHARDS
    text = _read(count_file, f"the number of the {split} split's shards")
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise DataError(f"{count_file}: must hold the number of shards (a positive integer), found {text.strip()!r}")
    shards = tuple(folder / f"{i}.tar" for i in range(count))
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise DataError(f"{count_file} says {count} shards, but {len(missing)} of them are missing from {folder} "
                        f"(e.g. {missing[0]}); fetch the whole set again")
    extra = sorted(p.name for p in folder.glob("*.tar") if p not in shards)
    if extra:
        raise DataError(f"{count_file} says {count} shards (0.tar ... {count - 1}.tar), but {folder} also holds "
                        f"{', '.join(extra[:3])}; correct nshards.txt")
    return shards


def _lines(path: Path, what: str) -> tuple[str, ...]:
    """One entry a line, stripped, as clip_benchmark reads the file; an empty file or line is refused."""
    lines = tuple(line.strip() for line in _read(path, f"one {what} a line").splitlines())
    empty = next((number for number, line in enumerate(lines, start=1) if not line), None)
    if not lines or empty is not None:
        where = f"line {empty} is empty" if lines else "it is empty"
        raise DataError(f"{path}: one {what} a line, but {where}")
    return lines


def _template(line: str, path: Path, number: int) -> tuple[Optional[str], ...]:
    """A template line as literal parts and None for each `{c}`: exactly what clip_benchmark's
    `template.format(c=classname)` makes of it (`{{` and `}}` are braces); other fields are refused."""
    parts: list[Optional[str]] = []
    try:
        for literal, field, spec, conversion in string.Formatter().parse(line):
            parts.append(literal)
            if field is None:
                continue
            if field != "c" or spec or conversion:
                raise ValueError(f"the field {{{field}}}")
            parts.append(None)
    except ValueError as e:
        raise DataError(f"{path}: line {number} ({line!r}): {e}; a template holds `{{c}}` where the class "
                        f"name goes") from e
    return tuple(part for part in parts if part != "")
