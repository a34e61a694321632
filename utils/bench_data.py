"""Training data loading, images/s, of three pipelines over the same synthetic photos.

The photos are seeded 1024x768 gradients, shapes and noise saved as JPEGs at quality 90, like web
photos; every pipeline uses the same transform and tokenizer (open_clip's, for --model), workers and
batch size:
  open_clip   open_clip_train.data.CsvDataset over a TSV of the full-size JPEGs, in the DataLoader
              open_clip_train builds for it (shuffled, drop_last);
  csv         this project's CSV pipeline (build_train_data with min_size = the model's image size:
              JPEG draft decoding);
  shards      this project's webdataset pipeline (build_train_data) over tar shards of the same photos
              resized to 256 px on the shorter side, JPEG quality 95 (what utils/download.py asks
              img2dataset for).
Each pipeline runs in a fresh subprocess that first reads every file it will load once, so all run on
a warm OS page cache: this measures decoding and transforms, not the disk. Each epoch (one per
--repeats) is timed from the arrival of its first max(1, --workers) batches, one per worker, to its
last batch, so start-up is not counted. Reported: images/s (best epoch), the ratio to open_clip's
CsvDataset, and the two targets: csv / open_clip >= 1.0, shards / csv >= 1.5.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from bench_common import add_worker_arguments, print_table_header, run_worker, table_row
from rankclip.config import DataConfig, ModelConfig
from rankclip.data import Batches, SampleMaker, SampleSource
from rankclip.runtime import Runtime
from rankclip.loaders import build_train_data

PIPELINES = {
    "open_clip": "open_clip CsvDataset, full-size JPEGs",
    "csv": "rankclip CSV, full-size JPEGs",
    "shards": "rankclip shards, 256 px JPEGs",
}
PHOTO_SIZE = (1024, 768)
PHOTO_QUALITY = 90
SHARD_SIDE, SHARD_QUALITY = 256, 95  # utils/download.py's img2dataset settings
SHARD_SAMPLES = 64  # small shards, so that every worker's stream gets several


def synthetic_photo(rng: np.random.Generator) -> Image.Image:
    """A photo-like image: smooth colour gradients and waves, a dozen flat shapes, sensor-like noise."""
    width, height = PHOTO_SIZE
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x, y = x / width, y / height
    channels = []
    for _ in range(3):
        base, dx, dy = rng.uniform(0, 255), rng.uniform(-120, 120), rng.uniform(-120, 120)
        frequency, phase = rng.uniform(2, 12), rng.uniform(0, 2 * np.pi)
        channels.append(base + dx * x + dy * y + 30 * np.sin(frequency * (x + y) + phase))
    photo = Image.fromarray(np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(photo)
    for _ in range(12):
        left, top = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [left, top, left + int(rng.integers(40, 400)), top + int(rng.integers(40, 300))]
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    noisy = np.asarray(photo, dtype=np.float32) + rng.normal(0, 8, (height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    """`image` encoded as a JPEG file at `quality`."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def shorter_side_to(image: Image.Image, side: int) -> Image.Image:
    """Resized, aspect kept, so the shorter side is `side`; BOX averages like img2dataset's INTER_AREA."""
    scale = side / min(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BOX)


def write_benchmark_data(folder: Path, count: int) -> float:
    """Full-size JPEGs and a TSV (absolute paths, as open_clip needs) listing them, and shards of the
    same photos at 256 px; returns the mean full-size JPEG size in KB."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir()
    (folder / "shards").mkdir()
    rows, total_bytes = ["filepath\ttitle"], 0
    shard = None
    for i in range(count):
        if i % SHARD_SAMPLES == 0:
            if shard is not None:
                shard.close()
            shard = wds.TarWriter(str(folder / "shards" / f"{i // SHARD_SAMPLES:05d}.tar"))
        photo, caption = synthetic_photo(rng), f"a photo number {i}"
        data = jpeg_bytes(photo, PHOTO_QUALITY)
        path = folder / "images" / f"{i:06d}.jpg"
        path.write_bytes(data)
        total_bytes += len(data)
        rows.append(f"{path.resolve()}\t{caption}")
        shard.write({"__key__": f"{i:06d}", "jpg": jpeg_bytes(shorter_side_to(photo, SHARD_SIDE), SHARD_QUALITY),
                     "txt": caption})
    shard.close()
    (folder / "train.tsv").write_text("\n".join(rows) + "\n")
    return total_bytes / count / 1024


def shard_pattern(folder: Path, count: int) -> str:
    """The brace pattern naming every shard that write_benchmark_data wrote for `count` photos."""
    last = (count - 1) // SHARD_SAMPLES
    return str(folder / "shards" / f"{{00000..{last:05d}}}.tar")


def build_pipeline(args: argparse.Namespace) -> tuple[DataLoader, Callable[[int], None], Callable]:
    """The loader of pipeline `args.worker`, its set_epoch, and a function that counts a batch's images.

    Its input files are read once first, so that it starts on a warm page cache.
    """
    # Imported here: open_clip takes seconds to import, and only the data workers need it.
    from open_clip_train.data import CsvDataset
    from rankclip.models import build_model

    bundle = build_model(ModelConfig(model_name=args.model), device=torch.device("meta"))  # only its transforms and tokenizer are used
    folder, shards = args.out, args.worker == "shards"
    for path in sorted((folder / "shards").glob("*.tar") if shards else (folder / "images").glob("*.jpg")):
        path.read_bytes()
    table = str(folder / "train.tsv")
    if args.worker == "open_clip":
        dataset = CsvDataset(table, bundle.train_transform, img_key="filepath", caption_key="title",
                             tokenizer=bundle.tokenizer)
        # As open_clip_train.data.get_csv_dataset builds it for training (no pinning on the CPU).
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                            drop_last=True)
        return loader, lambda epoch: None, lambda batch: len(batch[0])
    source = DataConfig(train_data=shard_pattern(folder, args.images) if shards else table,
                        dataset_type="webdataset" if shards else "csv", train_num_samples=args.images if shards else None,
                        delimiter="\t", image_key="filepath", caption_key="title", num_workers=args.workers)
    data = build_train_data(source, Runtime(), SampleSource(SampleMaker(bundle.train_transform, bundle.tokenizer),
                                                            bundle.image_size), Batches(args.batch_size, seed=0))
    return data.loader, data.set_epoch, lambda batch: len(batch["image"])


def run_data_worker(args: argparse.Namespace) -> None:
    """One pipeline: images/s of each epoch after its warm-up round, printed as JSON."""
    loader, set_epoch, count_images = build_pipeline(args)
    warmup = max(1, args.workers)
    rates = []
    for epoch in range(args.repeats):
        set_epoch(epoch)
        batches = iter(loader)
        for _ in range(warmup):
            next(batches)
        images, start = 0, time.perf_counter()
        for batch in batches:
            images += count_images(batch)
        rates.append(images / (time.perf_counter() - start))
    print(json.dumps({"rates": rates}))


def benchmark_data(args: argparse.Namespace) -> None:
    """The table: the best epoch's images/s of each pipeline, each from its own process."""
    with tempfile.TemporaryDirectory() as folder:
        jpeg_kb = write_benchmark_data(Path(folder), args.images)
        print(f"Data loading: {args.images} photos {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} (JPEG q{PHOTO_QUALITY}, "
              f"{jpeg_kb:.0f} KB on average), model {args.model}, batch {args.batch_size}, {args.workers} workers, "
              f"best of {args.repeats} epochs, warm page cache\n")
        rates = {}
        for worker in PIPELINES:
            result = run_worker(__file__, ["--worker", worker, "--out", folder, "--images", str(args.images),
                                           "--workers", str(args.workers), "--batch_size", str(args.batch_size),
                                           "--model", args.model, "--repeats", str(args.repeats)],
                                f"pipeline {worker}")
            rates[worker] = max(result["rates"])
    print_table_header("pipeline", "images/s", "vs open_clip")
    for worker, name in PIPELINES.items():
        print(table_row(name, f"{rates[worker]:.1f}", f"{rates[worker] / rates['open_clip']:.2f}"))
    print(f"\nCSV / open_clip: {rates['csv'] / rates['open_clip']:.2f} (target >= 1.0); "
          f"shards@256 / CSV full-size: {rates['shards'] / rates['csv']:.2f} (target >= 1.5)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="synthetic photos to generate")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of every pipeline")
    parser.add_argument("--batch_size", type=int, default=64, help="images per batch")
    parser.add_argument("--model", default="ViT-B-32-quickgelu", help="the open_clip model whose transform and "
                        "tokenizer are used (tiny-vit and tiny-rn come from configs/)")
    parser.add_argument("--repeats", type=int, default=2, help="timed epochs per pipeline; the best counts")
    add_worker_arguments(parser, PIPELINES)
    args = parser.parse_args()
    if args.images < (max(1, args.workers) + 1) * args.batch_size:
        parser.error(f"--images {args.images} leaves no batch to time after the warm-up round of "
                     f"max(1, --workers) batches; use at least {(max(1, args.workers) + 1) * args.batch_size}")
    (run_data_worker if args.worker else benchmark_data)(args)


if __name__ == "__main__":
    main()
