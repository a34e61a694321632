"""Whole training processes: steps/s of open_clip_train against this trainer on the same work.

open_clip_train (open_clip_train.main with its CLIP loss) and this trainer with --loss clip and
--loss rankclip train one epoch each of the same generated CSV (utils/make_demo.py pictures, absolute
paths), with the same model, batch, data workers, precision, lr schedule and log interval. Every
trainer runs in its own process, the three in turn for --pairs rounds (the order reversed every other
round). Each output line is stamped when it arrives, and steps/s is measured from the first logged
step past --skip (start-up, first batches) to the last logged step. Reported per round: steps/s of
each trainer and the ratios clip / open_clip (target >= 1.0) and rankclip / clip (target >= 0.95),
then their median, min and max. Then, unless --eval_processes is empty, an evaluation-only run of the
last --loss clip checkpoint (validation loss + representation analysis, zero-shot and retrieval on 256
generated images each) with each process count (torchrun; with --threads, OMP_NUM_THREADS is split
between them), timed from the model being built to the last result.
Needs `pip install -e '.[bench]'` (open_clip_train's own imports).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from bench_common import ROOT, print_table_header, table_row

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
    """The tables: steps/s per round with the two ratios and their summary, then evaluation seconds."""
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
        print_table_header("round", "open_clip_train steps/s", "rankclip --loss clip steps/s",
                           "rankclip --loss rankclip steps/s", "clip / open_clip", "rankclip / clip")
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
            print(table_row(round_ + 1, *(f"{rates[trainer]:.3f}" for trainer in TRAINERS),
                            *(f"{values[-1]:.3f}" for values in ratios.values())), flush=True)
        print()
        for key, target in (("clip / open_clip", 1.0), ("rankclip / clip", 0.95)):
            values = ratios[key]
            print(f"{key}: median {statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f}; "
                  f"target >= {target})")
        if args.eval_processes:
            checkpoint = folder / "logs" / f"clip{args.pairs - 1}" / "checkpoints" / "epoch_1.pt"
            print()
            print_table_header("evaluation processes",
                               "seconds (validation + analysis, zero-shot, retrieval of 256 images)")
            for processes in args.eval_processes:
                seconds = eval_seconds(args, data, checkpoint, folder / "logs", processes, env)
                print(table_row(processes, f"{seconds:.2f}"), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-vit", help="open_clip name or configs/ JSON, for both trainers")
    parser.add_argument("--images", type=int, default=4096, help="generated training images (one epoch)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1, help="data loader workers of both trainers")
    parser.add_argument("--precision", choices=["fp32", "amp", "amp_bf16"], default="fp32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile in both trainers")
    parser.add_argument("--pairs", type=int, default=3, help="rounds of the three trainers")
    parser.add_argument("--log_every", type=int, default=2, help="log interval of both trainers, in steps")
    parser.add_argument("--skip", type=int, default=4, help="start-up steps left out of the timing")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every process (split over evaluation "
                        "processes)")
    parser.add_argument("--eval_processes", type=int, nargs="*", default=[1, 2],
                        help="also time an evaluation-only run with these process counts (none: skip)")
    benchmark_train(parser.parse_args())


if __name__ == "__main__":
    main()
