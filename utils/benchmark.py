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

Usage: python utils/benchmark.py loss [--sizes 1024 4096 8192] [--chunk_size 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
