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

train   Whole training processes: open_clip_train (open_clip_train.main with its CLIP loss) against this
        trainer with --loss clip and --loss rankclip, on the same generated CSV (utils/make_demo.py
        pictures, absolute paths), model, batch, data workers, precision, lr schedule and log
        interval, one epoch each. Every trainer runs in its own process, the three in turn for
        --pairs rounds (the order reversed every other round). Each output line is stamped when it
        arrives, and steps/s is measured from the first logged step past --skip (start-up, first
        batches) to the last logged step. Reported per round: steps/s of each trainer and the
        ratios clip / open_clip (target >= 1.0) and rankclip / clip (target >= 0.95), then their
        median, min and max. Then, unless --eval_processes is empty, an evaluation-only run of the
        last --loss clip checkpoint (validation loss + representation analysis, zero-shot and
        retrieval on 256 generated images each) with 1 and 2 processes (torchrun; with --threads,
        OMP_NUM_THREADS is split between them), timed from the model being built to the last result.
        Needs `pip install -e '.[bench]'` (open_clip_train's own imports).

Usage: python utils/benchmark.py loss [--sizes 1024 4096 8192] [--chunk_size auto 64 128 256] [--threads 2]
       python utils/benchmark.py data [--images 512] [--workers 2] [--batch_size 64] [--model ViT-B-32-quickgelu]
                                      [--repeats 2]
       python utils/benchmark.py train [--pairs 3] [--images 4096] [--batch_size 128] [--workers 1]
                                       [--model tiny-vit] [--precision fp32] [--device cpu] [--eval_processes 1 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rankclip.config import DataConfig, ModelConfig  # noqa: E402
from rankclip.data import Batches, SampleMaker, SampleSource  # noqa: E402
from rankclip.distributed import Runtime  # noqa: E402
from rankclip.loaders import build_train_data  # noqa: E402
from rankclip.losses import RankCLIPLoss, default_chunk_size  # noqa: E402

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
    ours = RankCLIPLoss(LAMBDA, LAMBDA, EPS, chunk_rows(args.chunk_size[0]))
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


def chunk_rows(setting: str) -> Optional[int]:
    """--chunk_size value: rows per chunk, or None for "auto" (default_chunk_size)."""
    return None if setting == "auto" else int(setting)


def run_implementation(args: argparse.Namespace, worker: str, size: int, chunk: str, folder: Path) -> dict:
    command = [sys.executable, __file__, "loss", "--worker", worker, "--sizes", str(size), "--out", str(folder),
               "--chunk_size", chunk, "--threads", str(args.threads),
               "--repeats", str(args.repeats), "--dim", str(args.dim), "--scale", str(args.scale)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{worker} at N={size} failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["grads"] = torch.load(folder / f"{worker}.pt")["grads"]
    return result


def grad_difference(dense: list[torch.Tensor], ours: list[torch.Tensor]) -> float:
    """Largest |ours − dense| relative to the largest |dense|, over image, text and scale gradients."""
    return max(((o - d).abs().max() / d.abs().max()).item() for d, o in zip(dense, ours))


def benchmark_loss(args: argparse.Namespace) -> None:
    if args.worker:
        return run_worker(args)
    automatic = ", ".join(f"{default_chunk_size(torch.device('cpu'), n)} at N={n}" for n in args.sizes)
    print(f"RankCLIPLoss vs dense reference: d={args.dim}, s={args.scale}, threads={args.threads}, best of "
          f"{args.repeats}, forward + backward; chunk = rows per chunk (auto: default_chunk_size, {automatic})\n")
    print("| N | chunk | dense time (s) | ours time (s) | ratio | dense peak (MB) | ours peak (MB) | ratio "
          "| loss rel diff | grad diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            dense = run_implementation(args, "dense", size, "auto", Path(folder))
            for chunk in args.chunk_size:
                ours = run_implementation(args, "ours", size, chunk, Path(folder))
                loss_diff = abs(ours["loss"] - dense["loss"]) / abs(dense["loss"])
                print(f"| {size} | {chunk} | {dense['time']:.2f} | {ours['time']:.2f} "
                      f"| {ours['time'] / dense['time']:.2f} | {dense['peak_mb']:.0f} | {ours['peak_mb']:.0f} "
                      f"| {ours['peak_mb'] / dense['peak_mb']:.3f} | {loss_diff:.1e} "
                      f"| {grad_difference(dense['grads'], ours['grads']):.1e} |", flush=True)


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


# ----------------------------------------------------------------------------------------------
# train: whole training processes, open_clip_train against this trainer

TRAINERS = ("open_clip", "clip", "rankclip")
OUR_STEP = re.compile(r"epoch 1 \[(\d+)/(\d+)\]")
OPEN_CLIP_STEP = re.compile(r"Train Epoch: 0 \[\s*(\d+)/(\d+) ")
RESULT_LINE = re.compile(r"epoch \d+ (validation|eval|retrieval):")
OPEN_CLIP_MAIN = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
                  "from open_clip_train.main import main; main(sys.argv[2:])")


def write_train_data(folder: Path, images: int) -> dict[str, Path]:
    """utils/make_demo.py pictures: a training CSV with absolute paths (which open_clip's CsvDataset
    needs; ours takes them too), a validation CSV and a zero-shot folder for the evaluation timing."""
    subprocess.run([sys.executable, str(ROOT / "utils" / "make_demo.py"), "--out", str(folder / "demo"),
                    "--num_train", str(images), "--num_val", "256", "--num_eval", "256"], check=True,
                   capture_output=True)
    demo = folder / "demo"
    for split in ("train", "validation"):
        header, *rows = (demo / f"{split}.csv").read_text().splitlines()
        rows = [f"{demo / row.split(',', 1)[0]},{row.split(',', 1)[1]}" for row in rows]
        (folder / f"{split}.csv").write_text("\n".join([header, *rows]) + "\n")
    return {"train": folder / "train.csv", "validation": folder / "validation.csv", "zeroshot": demo / "zeroshot"}


def trainer_command(args: argparse.Namespace, trainer: str, data: dict[str, Path], logs: Path, name: str) -> list[str]:
    """The same work for both trainers: one epoch of the CSV, model, batch, workers, precision, lr."""
    if trainer == "open_clip":
        return [sys.executable, "-c", OPEN_CLIP_MAIN, str(ROOT / "configs"),
                "--train-data", str(data["train"]), "--dataset-type", "csv", "--csv-img-key", "image",
                "--csv-caption-key", "caption", "--csv-separator", ",", "--model", args.model,
                "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--precision", args.precision,
                "--epochs", "1", "--lr", "5e-4", "--wd", "0.1", "--warmup", "10", "--seed", "0",
                "--log-every-n-steps", str(args.log_every), "--device", args.device, "--logs", str(logs),
                "--name", name, "--report-to", "", "--save-frequency", "0", "--zeroshot-frequency", "0",
                *(["--torchcompile"] if args.compile else [])]
    precision = {"fp32": "fp32", "amp": "amp", "amp_bf16": "amp_bf16"}[args.precision]
    return [sys.executable, "-m", "rankclip.main", "--train_data", str(data["train"]), "--model_name", args.model,
            "--loss", trainer, "--batch_size", str(args.batch_size), "--num_workers", str(args.workers),
            "--precision", precision, "--epochs", "1", "--lr", "5e-4", "--weight_decay", "0.1",
            "--num_warmup_steps", "10", "--seed", "0", "--log_every_n_steps", str(args.log_every),
            "--device", "gpu" if args.device == "cuda" else "cpu", "--logs_dir", str(logs), "--name", name,
            *(["--compile"] if args.compile else [])]


def timed_lines(command: list[str], env: dict[str, str]) -> list[tuple[float, str]]:
    """Run `command`, stamping each line of its output (stdout and stderr) as it arrives."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines = [(time.perf_counter(), line) for line in proc.stdout]
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{''.join(line for _, line in lines[-40:])}")
    return lines


def steady_steps_per_second(lines: list[tuple[float, str]], pattern: re.Pattern, batch: Optional[int],
                            skip: int) -> tuple[float, int]:
    """Optimizer steps per second between the first logged step past `skip` and the last one.

    open_clip logs samples done rather than steps (`batch` converts them)."""
    steps = []
    for stamp, line in lines:
        match = pattern.search(line)
        if match:
            done = int(match.group(1))
            steps.append((stamp, done // batch if batch else done))
    window = [(t, s) for t, s in steps if s > skip]
    if len(window) < 2:
        raise SystemExit(f"too few logged steps past the first {skip}; use more --images or a smaller --log_every")
    (t0, s0), (t1, s1) = window[0], window[-1]
    return (s1 - s0) / (t1 - t0), s1 - s0


def eval_seconds(args: argparse.Namespace, data: dict[str, Path], checkpoint: Path, logs: Path, processes: int,
                 env: dict[str, str]) -> float:
    """Evaluation-only run of `checkpoint` (validation + representation analysis, zero-shot, retrieval) on
    `processes` processes: seconds from the model being built to the last result line."""
    launcher = [sys.executable, "-m", "rankclip.main"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(processes), "-m", "rankclip.main"]
    command = [*launcher, "--checkpoint", str(checkpoint), "--model_name", args.model, "--validation_data",
               str(data["validation"]), "--retrieval_data", str(data["validation"]), "--eval_data_type",
               "ImageNet1K", "--eval_test_data_dir", str(data["zeroshot"]), "--num_workers", str(args.workers),
               "--precision", args.precision, "--device", "gpu" if args.device == "cuda" else "cpu",
               "--logs_dir", str(logs), "--name", f"eval{processes}"]
    threads = env.get("OMP_NUM_THREADS")
    per_process = dict(env, OMP_NUM_THREADS=str(max(1, int(threads) // processes))) if threads else env
    lines = timed_lines(command, per_process)
    start = next(t for t, line in lines if " | model " in line)
    end = [t for t, line in lines if RESULT_LINE.search(line)][-1]
    return end - start


def benchmark_train(args: argparse.Namespace) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    steps = args.images // args.batch_size
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        data = write_train_data(folder, args.images)
        print(f"Training throughput: {args.model}, batch {args.batch_size}, {args.workers} workers, {args.precision}, "
              f"{args.device}, {steps} steps of one epoch over {args.images} generated images; steps/s between "
              f"the first logged step past step {args.skip} and the last; {args.pairs} rounds, each trainer in "
              f"its own process, order alternating; OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}\n")
        print("| round | open_clip_train steps/s | rankclip --loss clip steps/s | rankclip --loss rankclip steps/s "
              "| clip / open_clip | rankclip / clip |")
        print("|---|---|---|---|---|---|")
        ratios: dict[str, list[float]] = {"clip / open_clip": [], "rankclip / clip": []}
        for round_ in range(args.pairs):
            rates = {}
            for trainer in TRAINERS if round_ % 2 == 0 else TRAINERS[::-1]:
                name = f"{trainer}{round_}"
                lines = timed_lines(trainer_command(args, trainer, data, folder / "logs", name), env)
                pattern, batch = (OPEN_CLIP_STEP, args.batch_size) if trainer == "open_clip" else (OUR_STEP, None)
                rates[trainer] = steady_steps_per_second(lines, pattern, batch, args.skip)[0]
            ratios["clip / open_clip"].append(rates["clip"] / rates["open_clip"])
            ratios["rankclip / clip"].append(rates["rankclip"] / rates["clip"])
            print(f"| {round_ + 1} | {rates['open_clip']:.3f} | {rates['clip']:.3f} | {rates['rankclip']:.3f} "
                  f"| {ratios['clip / open_clip'][-1]:.3f} | {ratios['rankclip / clip'][-1]:.3f} |", flush=True)
        print()
        for key, target in (("clip / open_clip", 1.0), ("rankclip / clip", 0.95)):
            values = ratios[key]
            print(f"{key}: median {statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f}; "
                  f"target >= {target})")
        if args.eval_processes:
            checkpoint = folder / "logs" / f"clip{args.pairs - 1}" / "checkpoints" / "epoch_1.pt"
            print("\n| evaluation processes | seconds (validation + analysis, zero-shot, retrieval of 256 images) |")
            print("|---|---|")
            for processes in args.eval_processes:
                seconds = eval_seconds(args, data, checkpoint, folder / "logs", processes, env)
                print(f"| {processes} | {seconds:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    loss = commands.add_parser("loss", help="RankCLIPLoss vs the dense reference: time, memory, agreement")
    loss.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192], help="batch sizes N")
    loss.add_argument("--chunk_size", nargs="+", default=["auto"],
                      help="RankCLIPLoss rows per chunk, several for a sweep; auto = the loss's own choice")
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
    train = commands.add_parser("train", help="steps/s of open_clip_train and this trainer on the same work")
    train.add_argument("--model", default="tiny-vit", help="open_clip name or configs/ JSON, for both trainers")
    train.add_argument("--images", type=int, default=4096, help="generated training images (one epoch)")
    train.add_argument("--batch_size", type=int, default=128)
    train.add_argument("--workers", type=int, default=1, help="data loader workers of both trainers")
    train.add_argument("--precision", choices=["fp32", "amp", "amp_bf16"], default="fp32")
    train.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    train.add_argument("--compile", action="store_true", help="torch.compile in both trainers")
    train.add_argument("--pairs", type=int, default=3, help="rounds of the three trainers")
    train.add_argument("--log_every", type=int, default=2, help="log interval of both trainers, in steps")
    train.add_argument("--skip", type=int, default=4, help="start-up steps left out of the timing")
    train.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every process (split over evaluation "
                       "processes)")
    train.add_argument("--eval_processes", type=int, nargs="*", default=[1, 2],
                       help="also time an evaluation-only run with these process counts (none: skip)")
    train.set_defaults(run=benchmark_train)
    args = parser.parse_args()
    if args.command == "data" and args.images < (max(1, args.workers) + 1) * args.batch_size:
        parser.error(f"--images {args.images} leaves no batch to time after the warm-up round of "
                     f"max(1, --workers) batches; use at least {(max(1, args.workers) + 1) * args.batch_size}")
    args.run(args)


if __name__ == "__main__":
    main()
