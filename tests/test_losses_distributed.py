"""Two gloo processes on the CPU against one process on the whole batch: values and gradients.

Rank r holds rows [r·n, (r+1)·n) of the global batch. The contract: the mean over ranks of
every returned value is the single-process value; each rank's gradient of its own features
is W × the single-process gradient of those rows; the logit-scale gradients average to the
single-process one.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from rankclip.losses import ClipLoss, CyClipLoss, RankCLIPLoss

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("single_thread")]

WORLD = 2
ROWS = 5  # per rank: odd, and not a multiple of the chunk size
DIM = 8
SCALE = 14.3
NAMES = ("image_features", "text_features", "augmented_image_features", "augmented_text_features")
CASES = {
    "rankclip": lambda: RankCLIPLoss(0.5, 0.3, 1e-10, chunk_size=2),
    "rankclip-eps0": lambda: RankCLIPLoss(0.5, 0.3, 0.0, chunk_size=3),
    "clip": lambda: ClipLoss(chunk_size=2),
    "cyclip": lambda: CyClipLoss(0.25, 0.5, chunk_size=2),
}


def global_batch(augmented: bool) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    count = 4 if augmented else 2
    return [F.normalize(torch.randn(WORLD * ROWS, DIM, generator=generator), dim=1) for _ in range(count)]


def run_loss(loss: torch.nn.Module, features: list[torch.Tensor]) -> dict:
    """Values, feature gradients and the scale gradient of `loss` on leaf copies of `features`."""
    leaves = [f.clone().requires_grad_() for f in features]
    scale = torch.tensor(SCALE, requires_grad=True)
    out = loss(leaves[0], leaves[1], scale, rank_weight=1.5, **dict(zip(NAMES[2:], leaves[2:])))
    out["loss"].backward()
    return {"values": {k: v.item() for k, v in out.items()}, "grads": [leaf.grad for leaf in leaves],
            "scale_grad": scale.grad.item()}


def worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        results = {f"{name}-{aug}": run_loss(make(), [f[rows] for f in global_batch(aug)])
                   for name, make in CASES.items() for aug in (False, True)}
        if rank == 0:  # the other rank takes no part, as when only the main process evaluates
            results["alone"] = run_loss(RankCLIPLoss(0.5, 0.3, 1e-10, chunk_size=2, gather=False), global_batch(False))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_workers(worker, folder: Path, world: int) -> list[dict]:
    """`worker(rank, init_file, out_dir)` on `world` spawned processes; what each saved as rank<r>.pt in `folder`."""
    context = mp.start_processes(worker, args=(str(folder / "init"), str(folder)), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the gloo workers did not finish within 120 s")
    return [torch.load(folder / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_workers(worker, tmp_path_factory.mktemp("gloo"), WORLD)


@pytest.mark.parametrize("augmented", [False, True], ids=["plain", "augmented"])
@pytest.mark.parametrize("name", list(CASES))
def test_ranks_reproduce_the_single_process_loss(ranks, name, augmented):
    single = run_loss(CASES[name](), global_batch(augmented))
    parts = [r[f"{name}-{augmented}"] for r in ranks]
    for key, value in single["values"].items():
        assert sum(p["values"][key] for p in parts) / WORLD == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for rank, part in enumerate(parts):
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        for got, want in zip(part["grads"], single["grads"]):
            torch.testing.assert_close(got, WORLD * want[rows], rtol=1e-4, atol=1e-6)
    assert sum(p["scale_grad"] for p in parts) / WORLD == pytest.approx(single["scale_grad"], rel=1e-4, abs=1e-7)


def test_without_gather_one_rank_computes_the_whole_batch(ranks):
    single, alone = run_loss(CASES["rankclip"](), global_batch(False)), ranks[0]["alone"]
    assert alone["values"] == pytest.approx(single["values"], rel=1e-6)
    for got, want in zip(alone["grads"], single["grads"]):
        torch.testing.assert_close(got, want)
