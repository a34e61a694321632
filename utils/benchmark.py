"""Benchmarks for the project's hot spots.

loss    RankCLIPLoss against a dense reference (what the original code does: four N×N ListMLE
        passes and the contrastive loss, differentiated by autograd), forward + backward on the
        same inputs (fixed seed, unit-norm features, s = 100, lambda1 = lambda2 = 1/16). Each
        implementation and size runs in a fresh subprocess, so neither inherits the other's
        memory or allocator state. Reported per size: wall time (best of --repeats), peak
        memory, the loss's relative difference and the largest gradient difference relative
        to the largest dense gradient (over image features, text features and the scale).

On a CPU that other work keeps busy, compare with --threads 1: with more threads than free
cores every OpenMP parallel region waits for a descheduled thread (~8 ms each on a shared
2-core machine), which penalizes the chunked loss's many small operations far more than the
dense reference's few large ones.

Peak memory is the growth of the process's peak resident set size (ru_maxrss, the
high-water mark) over the timed runs, relative to the high-water mark after the inputs
exist. tracemalloc does not see torch's allocations, and the current RSS would miss
short-lived peaks.

data    Training data loading, images/s, of three pipelines over the same synthetic photos (seeded
        1024x768 gradients, shapes and noise: ~200 KB JPEGs at quality 90, like web photos), with
        the same transform and tokenizer (open_clip's, for --model), workers and batch size:
          open_clip   open_clip_train.data.CsvDataset over a TSV of the full-size JPEGs, in the
                      DataLoader open_clip_train builds for it (shuffled, drop_last);
          csv         this project's CSV pipeline (build_train_data, i.e. build_caption_loader
                      with train=True and min_size = the model's image size: JPEG draft decoding);
          shards      this project's webdataset pipeline (ShardStream via build_train_data) over
                      tar shards (jpg + txt, webdataset.TarWriter) of the same photos resized to
                      256 px on the shorter side, JPEG quality 95 (what utils/download.py asks
                      img2dataset for: --image_size 256, resize_mode keep_ratio).
        Each pipeline runs in a fresh subprocess (no shared in-memory caches), which first reads
        every file it will load once, so all of them run on a warm OS page cache: this measures
        decoding and transforms, not the disk. Each epoch (one per --repeats) is timed from the
        arrival of its first `max(1, --workers)` batches, one per worker, to its last batch:
        the workers start and fill the pipeline during that warm-up round, so start-up is not
        counted. Reported: images/s (best epoch), the ratio to open_clip's CsvDataset, and the
        two targets: csv / open_clip >= 1.0, shards / csv >= 1.5.

Usage: python utils/benchmark.py loss [--sizes 1024 4096 8192] [--chunk_size 256] [--threads 2]
       python utils/benchmark.py data [--images 512] [--workers 2] [--batch_size 64] [--model ViT-B-32-quickgelu]
                                      [--repeats 2]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rankclip.data import SampleMaker  # noqa: E402
from rankclip.loaders import build_train_data  # noqa: E402
from rankclip.losses import DEFAULT_CHUNK_SIZE, RankCLIPLoss  # noqa: E402

LAMBDA = 1 / 16
EPS = 1e-10


def dense_list_mle(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """The reference's ListMLE on whole N×N matrices: mean over rows of the per-row NLL.

    Without the reference's random column shuffle (it only breaks exact ties) and padding mask
    (targets never equal its -1 marker here), which would only cost the dense side time.
    """
    order = true.sort(descending=True, dim=-1).indices
    sorted_pred = torch.gather(pred, 1, order)
    shifted = sorted_pred - sorted_pred.max(dim=1, keepdim=True).values
    suffix_sums = torch.cumsum(shifted.exp().flip(dims=[1]), dim=1).flip(dims=[1])
    return (torch.log(suffix_sums + EPS) - shifted).sum(dim=1).mean()


def dense_rankclip(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n = image.shape[0]
    labels = torch.arange(n)
    cross = scale * image @ text.T
    contrastive = (F.cross_entropy(cross, labels) + F.cross_entropy(cross.T, labels)) / 2
    images, texts = scale * image @ image.T, scale * text @ text.T
    inmodal = (dense_list_mle(images, texts) + dense_list_mle(texts, images)) / (2 * n)
    crossmodal = (dense_list_mle(cross, cross.T) + dense_list_mle(cross.T, cross)) / (2 * n)
    return contrastive + LAMBDA * inmodal + LAMBDA * crossmodal


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_worker(args: argparse.Namespace) -> None:
    """One implementation at one size: time, peak memory, and the loss and gradients into --out."""
    torch.set_num_threads(args.threads)
    size = args.sizes[0]
    generator = torch.Generator().manual_seed(0)
    image, text = (F.normalize(torch.randn(size, args.dim, generator=generator), dim=1) for _ in range(2))
    image.requires_grad_()
    text.requires_grad_()
    scale = torch.tensor(args.scale, requires_grad=True)
    ours = RankCLIPLoss(LAMBDA, LAMBDA, EPS, args.chunk_size)
    objective = dense_rankclip if args.worker == "dense" else (lambda *inputs: ours(*inputs)["loss"])
    baseline = peak_rss_mb()
    times = []
    for _ in range(args.repeats):
        for leaf in (image, text, scale):
            leaf.grad = None
        start = time.perf_counter()
        objective(image, text, scale).backward()
        times.append(time.perf_counter() - start)
    peak = peak_rss_mb() - baseline
    torch.save({"grads": [image.grad, text.grad, scale.grad.reshape(1)]}, args.out / f"{args.worker}.pt")
    with torch.no_grad():
        value = objective(image, text, scale).item()
    print(json.dumps({"time": min(times), "peak_mb": peak, "loss": value}))


def run_pair(args: argparse.Namespace, size: int, folder: Path) -> dict:
    results = {}
    for worker in ("dense", "ours"):
        command = [sys.executable, __file__, "loss", "--worker", worker, "--sizes", str(size), "--out", str(folder),
                   "--chunk_size", str(args.chunk_size), "--threads", str(args.threads),
                   "--repeats", str(args.repeats), "--dim", str(args.dim), "--scale", str(args.scale)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{worker} at N={size} failed:\n{done.stderr}")
        results[worker] = json.loads(done.stdout.strip().splitlines()[-1])
        results[worker]["grads"] = torch.load(folder / f"{worker}.pt")["grads"]
    return results


def grad_difference(dense: list[torch.Tensor], ours: list[torch.Tensor]) -> float:
    """Largest |ours − dense| relative to the largest |dense|, over image, text and scale gradients."""
    return max(((o - d).abs().max() / d.abs().max()).item() for d, o in zip(dense, ours))


def benchmark_loss(args: argparse.Namespace) -> None:
    if args.worker:
        return run_worker(args)
    print(f"RankCLIPLoss vs dense reference: d={args.dim}, s={args.scale}, chunk_size={args.chunk_size}, "
          f"threads={args.threads}, best of {args.repeats}, forward + backward\n")
    print("| N | dense time (s) | ours time (s) | ratio | dense peak (MB) | ours peak (MB) | ratio "
          "| loss rel diff | grad diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            r = run_pair(args, size, Path(folder))
            dense, ours = r["dense"], r["ours"]
            loss_diff = abs(ours["loss"] - dense["loss"]) / abs(dense["loss"])
            print(f"| {size} | {dense['time']:.2f} | {ours['time']:.2f} | {ours['time'] / dense['time']:.2f} "
                  f"| {dense['peak_mb']:.0f} | {ours['peak_mb']:.0f} | {ours['peak_mb'] / dense['peak_mb']:.3f} "
                  f"| {loss_diff:.1e} | {grad_difference(dense['grads'], ours['grads']):.1e} |", flush=True)


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
    last = (count - 1) // SHARD_SAMPLES
    return str(folder / "shards" / f"{{00000..{last:05d}}}.tar")


def build_pipeline(args: argparse.Namespace) -> tuple[DataLoader, Callable[[int], None], Callable]:
    """The loader of pipeline `args.worker`, its set_epoch, and a function that counts a batch's images.

    Its input files are read once first, so that it starts on a warm page cache.
    """
    # Imported here: open_clip takes seconds to import, and only the data workers need it.
    from open_clip_train.data import CsvDataset
    from rankclip.models import build_model

    bundle = build_model(args.model, device=torch.device("meta"))  # only its transforms and tokenizer are used
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
    data = build_train_data(
        shard_pattern(folder, args.images) if shards else table, dataset_type="webdataset" if shards else "csv",
        num_samples=args.images, image_key="filepath", caption_key="title", delimiter="\t",
        make_sample=SampleMaker(bundle.train_transform, bundle.tokenizer), seed=0, global_batch=args.batch_size,
        rank=0, world=1, num_workers=args.workers, pin_memory=False, micro_batches=1, min_size=bundle.image_size)
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
    if args.worker:
        return run_data_worker(args)
    with tempfile.TemporaryDirectory() as folder:
        jpeg_kb = write_benchmark_data(Path(folder), args.images)
        print(f"Data loading: {args.images} photos {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} (JPEG q{PHOTO_QUALITY}, "
              f"{jpeg_kb:.0f} KB on average), model {args.model}, batch {args.batch_size}, {args.workers} workers, "
              f"best of {args.repeats} epochs, warm page cache\n")
        rates = {}
        for worker in PIPELINES:
            command = [sys.executable, __file__, "data", "--worker", worker, "--out", folder,
                       "--images", str(args.images), "--workers", str(args.workers),
                       "--batch_size", str(args.batch_size), "--model", args.model, "--repeats", str(args.repeats)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"pipeline {worker} failed:\n{done.stderr}")
            rates[worker] = max(json.loads(done.stdout.strip().splitlines()[-1])["rates"])
    print("| pipeline | images/s | vs open_clip |")
    print("|---|---|---|")
    for worker, name in PIPELINES.items():
        print(f"| {name} | {rates[worker]:.1f} | {rates[worker] / rates['open_clip']:.2f} |")
    print(f"\nCSV / open_clip: {rates['csv'] / rates['open_clip']:.2f} (target >= 1.0); "
          f"shards@256 / CSV full-size: {rates['shards'] / rates['csv']:.2f} (target >= 1.5)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    loss = commands.add_parser("loss", help="RankCLIPLoss vs the dense reference: time, memory, agreement")
    loss.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192], help="batch sizes N")
    loss.add_argument("--chunk_size", type=int, default=DEFAULT_CHUNK_SIZE, help="RankCLIPLoss rows per chunk")
    loss.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    loss.add_argument("--repeats", type=int, default=3, help="timed runs per implementation; the best counts")
    loss.add_argument("--dim", type=int, default=512, help="feature dimension d")
    loss.add_argument("--scale", type=float, default=100.0, help="logit scale s")
    loss.add_argument("--worker", choices=["dense", "ours"], help=argparse.SUPPRESS)
    loss.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    loss.set_defaults(run=benchmark_loss)
    data = commands.add_parser("data", help="images/s of open_clip's CsvDataset, our CSV and our shard pipelines")
    data.add_argument("--images", type=int, default=512, help="synthetic photos to generate")
    data.add_argument("--workers", type=int, default=2, help="DataLoader workers of every pipeline")
    data.add_argument("--batch_size", type=int, default=64, help="images per batch")
    data.add_argument("--model", default="ViT-B-32-quickgelu", help="the open_clip model whose transform and "
                      "tokenizer are used (tiny-vit and tiny-rn come from configs/)")
    data.add_argument("--repeats", type=int, default=2, help="timed epochs per pipeline; the best counts")
    data.add_argument("--worker", choices=list(PIPELINES), help=argparse.SUPPRESS)
    data.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    data.set_defaults(run=benchmark_data)
    args = parser.parse_args()
    if args.command == "data" and args.images < (max(1, args.workers) + 1) * args.batch_size:
        parser.error(f"--images {args.images} leaves no batch to time after the warm-up round of "
                     f"max(1, --workers) batches; use at least {(max(1, args.workers) + 1) * args.batch_size}")
    args.run(args)


if __name__ == "__main__":
    main()
