"""RankCLIPLoss against a dense reference: time, peak memory and agreement, forward + backward.

The reference is what the original code does: four N×N ListMLE passes and the contrastive loss,
differentiated by autograd. Both run on the same inputs (fixed seed, unit-norm features, s = --scale,
lambda1 = lambda2 = 1/16), each implementation and size in a fresh subprocess. Reported per size and
chunk: wall time (best of --repeats), peak memory (growth of the process's peak resident set size,
ru_maxrss, over the timed runs, above its high-water mark once the inputs exist: tracemalloc does not
see torch's allocations and the current RSS would miss short-lived peaks), the loss's relative
difference and the largest gradient difference relative to the largest dense gradient (over image
features, text features and the scale). On a CPU that other work keeps busy, compare with --threads 1:
with more threads than free cores every OpenMP region waits for a descheduled thread, which penalizes
the chunked loss's many small operations far more than the dense reference's few large ones.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from bench_common import add_worker_arguments, print_table_header, run_worker, table_row
from rankclip.losses import RankCLIPLoss, default_chunk_size

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
    """The original code's RankCLIP loss on dense N×N matrices, differentiated by autograd."""
    n = image.shape[0]
    labels = torch.arange(n)
    cross = scale * image @ text.T
    contrastive = (F.cross_entropy(cross, labels) + F.cross_entropy(cross.T, labels)) / 2
    images, texts = scale * image @ image.T, scale * text @ text.T
    inmodal = (dense_list_mle(images, texts) + dense_list_mle(texts, images)) / (2 * n)
    crossmodal = (dense_list_mle(cross, cross.T) + dense_list_mle(cross.T, cross)) / (2 * n)
    return contrastive + LAMBDA * inmodal + LAMBDA * crossmodal


def peak_rss_mb() -> float:
    """The process's peak resident set size so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_loss_worker(args: argparse.Namespace) -> None:
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
    """Time, peak memory, loss and gradients of implementation `worker` at N = `size`, from its own process."""
    result = run_worker(__file__, ["--worker", worker, "--sizes", str(size), "--out", str(folder),
                                   "--chunk_size", chunk, "--threads", str(args.threads), "--repeats",
                                   str(args.repeats), "--dim", str(args.dim), "--scale", str(args.scale)],
                        f"{worker} at N={size}")
    result["grads"] = torch.load(folder / f"{worker}.pt", weights_only=True)["grads"]
    return result


def grad_difference(dense: list[torch.Tensor], ours: list[torch.Tensor]) -> float:
    """Largest |ours − dense| relative to the largest |dense|, over image, text and scale gradients."""
    return max(((o - d).abs().max() / d.abs().max()).item() for d, o in zip(dense, ours))


def benchmark_loss(args: argparse.Namespace) -> None:
    """The table: for each size, the dense reference against each --chunk_size of RankCLIPLoss."""
    automatic = ", ".join(f"{default_chunk_size(torch.device('cpu'), n)} at N={n}" for n in args.sizes)
    print(f"RankCLIPLoss vs dense reference: d={args.dim}, s={args.scale}, threads={args.threads}, best of "
          f"{args.repeats}, forward + backward; chunk = rows per chunk (auto: default_chunk_size, {automatic})\n")
    print_table_header("N", "chunk", "dense time (s)", "ours time (s)", "ratio", "dense peak (MB)", "ours peak (MB)",
                       "ratio", "loss rel diff", "grad diff")
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            dense = run_implementation(args, "dense", size, "auto", Path(folder))
            for chunk in args.chunk_size:
                ours = run_implementation(args, "ours", size, chunk, Path(folder))
                loss_diff = abs(ours["loss"] - dense["loss"]) / abs(dense["loss"])
                print(table_row(size, chunk, f"{dense['time']:.2f}", f"{ours['time']:.2f}",
                                f"{ours['time'] / dense['time']:.2f}", f"{dense['peak_mb']:.0f}",
                                f"{ours['peak_mb']:.0f}", f"{ours['peak_mb'] / dense['peak_mb']:.3f}",
                                f"{loss_diff:.1e}", f"{grad_difference(dense['grads'], ours['grads']):.1e}"),
                      flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192], help="batch sizes N")
    parser.add_argument("--chunk_size", nargs="+", default=["auto"],
                        help="RankCLIPLoss rows per chunk, several for a sweep; auto = the loss's own choice")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per implementation; the best counts")
    parser.add_argument("--dim", type=int, default=512, help="feature dimension d")
    parser.add_argument("--scale", type=float, default=100.0, help="logit scale s")
    add_worker_arguments(parser, ["dense", "ours"])
    args = parser.parse_args()
    (run_loss_worker if args.worker else benchmark_loss)(args)


if __name__ == "__main__":
    main()
