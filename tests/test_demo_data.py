"""The bundled demo dataset (data/demo/) is consistent, reproducible, and fits the tiny models."""

from __future__ import annotations

import ast
import csv
import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import open_clip
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO = REPO_ROOT / "data" / "demo"
ZEROSHOT = DEMO / "zeroshot"
TINY_MODELS = ("tiny-vit", "tiny-rn")
MAX_DEMO_BYTES = 10 * 2**20


def load_make_demo() -> ModuleType:
    """utils/make_demo.py is a script, not a package module: load it from its path."""
    spec = importlib.util.spec_from_file_location("make_demo", REPO_ROOT / "utils" / "make_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


make_demo = load_make_demo()


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as handle:
        header, *rows = list(csv.reader(handle))
    return header, rows


def pixel_digest(path: Path) -> str:
    with Image.open(path) as image:
        return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def template_parts(node: ast.expr) -> list[str | None]:
    """Literal parts of `lambda s: f"...{s}..."`, None where the argument goes; fails on anything else."""
    assert isinstance(node, ast.Lambda) and [a.arg for a in node.args.args] == ["s"], ast.unparse(node)
    assert isinstance(node.body, ast.JoinedStr), ast.unparse(node)
    parts: list[str | None] = []
    for piece in node.body.values:
        if isinstance(piece, ast.FormattedValue):
            assert isinstance(piece.value, ast.Name) and piece.value.id == "s", ast.unparse(node)
            parts.append(None)
        else:
            assert isinstance(piece, ast.Constant) and isinstance(piece.value, str), ast.unparse(node)
            parts.append(piece.value)
    assert None in parts, f"{ast.unparse(node)} never uses the class name"
    return parts


def parse_classes() -> tuple[list[str], list[list[str | None]]]:
    """classes.py as data: exactly one dict literal with "classes" and "templates"; never executed."""
    module = ast.parse((ZEROSHOT / "classes.py").read_text())
    assert len(module.body) == 1 and isinstance(module.body[0], ast.Expr), "classes.py must hold one expression"
    literal = module.body[0].value
    assert isinstance(literal, ast.Dict), "classes.py must be a dict literal"
    entries = {key.value: value for key, value in zip(literal.keys, literal.values) if isinstance(key, ast.Constant)}
    assert set(entries) == {"classes", "templates"} and len(literal.keys) == 2
    assert all(isinstance(v, ast.List) for v in entries.values())
    classes = [node.value for node in entries["classes"].elts if isinstance(node, ast.Constant)]
    assert len(classes) == len(entries["classes"].elts) and all(isinstance(c, str) for c in classes)
    return classes, [template_parts(node) for node in entries["templates"].elts]


def test_tables_have_the_documented_columns():
    assert read_rows(DEMO / "train.csv")[0] == ["image", "caption"]
    assert read_rows(DEMO / "validation.csv")[0] == ["image", "caption"]
    assert read_rows(ZEROSHOT / "labels.csv")[0] == ["image", "label"]


@pytest.mark.parametrize("table", [DEMO / "train.csv", DEMO / "validation.csv", ZEROSHOT / "labels.csv"],
                         ids=["train", "validation", "zeroshot"])
def test_every_listed_image_exists_and_decodes_at_model_size(table: Path):
    _, rows = read_rows(table)
    assert rows, f"{table} has no rows"
    for relative, _ in rows:
        path = table.parent / relative
        assert not Path(relative).is_absolute() and path.is_file(), f"{table}: missing {relative}"
        with Image.open(path) as image:
            image.load()
            assert image.format == "PNG" and image.mode == "RGB"
            assert image.size == (make_demo.IMAGE_SIZE, make_demo.IMAGE_SIZE)


def test_captions_vary_and_name_colours():
    _, rows = read_rows(DEMO / "train.csv")
    captions = [caption for _, caption in rows]
    bare_class_names = sum(caption in make_demo.CLASS_NAMES for caption in captions)
    assert len(rows) >= 1000
    assert len(set(captions)) > 50 * len(make_demo.CLASS_NAMES), "captions should vary in phrasing"
    assert bare_class_names < len(captions) / 5, "most captions should say more than the class name"
    assert all(any(colour in caption.split() for colour in make_demo.COLOURS) for caption in captions)


def test_generated_captions_describe_their_pictures():
    for index in range(200):
        _, sample = make_demo.draw_sample("train", index, make_demo.DEFAULT_SEED)
        words = (sample.shape,) + make_demo.SHAPE_SYNONYMS[sample.shape]
        assert sample.colour in sample.caption.split()
        assert any(word in sample.caption for word in words), sample
        assert make_demo.CLASS_NAMES[sample.label] == f"{sample.colour} {sample.shape}"


def test_classes_file_is_a_dict_literal_of_classes_and_templates():
    classes, templates = parse_classes()
    assert classes == make_demo.CLASS_NAMES
    assert len(templates) >= 3
    rendered = ["".join(classes[0] if part is None else part for part in parts) for parts in templates]
    assert "a photo of a red circle." in rendered


def test_zeroshot_labels_are_in_range_and_balanced():
    classes, _ = parse_classes()
    labels = [int(label) for _, label in read_rows(ZEROSHOT / "labels.csv")[1]]
    counts = [labels.count(c) for c in range(len(classes))]
    assert min(labels) >= 0 and max(labels) < len(classes)
    assert max(counts) - min(counts) <= 1


def test_zeroshot_images_are_held_out_from_training():
    train = {pixel_digest(DEMO / p) for p, _ in read_rows(DEMO / "train.csv")[1]}
    validation = {pixel_digest(DEMO / p) for p, _ in read_rows(DEMO / "validation.csv")[1]}
    zeroshot = {pixel_digest(ZEROSHOT / p) for p, _ in read_rows(ZEROSHOT / "labels.csv")[1]}
    assert not zeroshot & train and not zeroshot & validation and not validation & train


def test_demo_stays_small():
    assert sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file()) < MAX_DEMO_BYTES


def test_generator_is_deterministic_and_reproduces_the_bundled_data(tmp_path: Path):
    """Same seed, same output: byte-identical between runs, and the same pictures and rows as data/demo.

    Bundled images are compared by pixels, not bytes, so that a different zlib under Pillow
    cannot fail the test.
    """
    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        make_demo.write_demo(out, num_train=6, num_val=3, num_eval=20, seed=make_demo.DEFAULT_SEED)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for relative in files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative
        if relative.suffix == ".png":
            assert pixel_digest(first / relative) == pixel_digest(DEMO / relative), relative
    assert (first / "zeroshot" / "classes.py").read_text() == (ZEROSHOT / "classes.py").read_text()
    for table in ("train.csv", "validation.csv", "zeroshot/labels.csv"):
        header, rows = read_rows(first / table)
        bundled_header, bundled_rows = read_rows(DEMO / table)
        assert [header, *rows] == [bundled_header, *bundled_rows[:len(rows)]], table


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_model_configs_build_and_run_on_demo_images(name: str):
    open_clip.add_model_config(REPO_ROOT / "configs")
    model, train_transform, val_transform = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    config = open_clip.get_model_config(name)
    embed_dim, context_length = config["embed_dim"], config["text_cfg"]["context_length"]

    _, rows = read_rows(DEMO / "train.csv")
    with Image.open(DEMO / rows[0][0]) as first, Image.open(DEMO / rows[1][0]) as second:
        images = torch.stack([train_transform(first.convert("RGB")), val_transform(second.convert("RGB"))])
    texts = tokenizer([rows[0][1], rows[1][1]])
    assert images.shape == (2, 3, make_demo.IMAGE_SIZE, make_demo.IMAGE_SIZE)
    assert texts.shape == (2, context_length)

    model.eval()
    with torch.no_grad():
        image_features, text_features, logit_scale = model(images, texts)[:3]
    assert image_features.shape == text_features.shape == (2, embed_dim)
    assert torch.allclose(image_features.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(text_features.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert logit_scale.numel() == 1
