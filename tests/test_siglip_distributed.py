"""--loss siglip on several gloo processes against one: open_clip's exchanges, the loss, its gradients, training.

Rank r holds rows [r·n, (r+1)·n) of the global batch. The contract of every objective
(tests/test_losses_distributed.py): the mean over ranks of the value is the single-process value;
each rank's gradient of its own features is W × the single-process gradient of those rows; the
logit scale's and bias's gradients average to the single-process ones. So DDP's averaging gives
the full-batch gradient. Four processes take open_clip's bidirectional exchange through a full
round and then its one-way remainder step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from rankclip.config import SIGLIP_DIST_IMPLS
from rankclip.losses import SigLipLoss
from rankclip.main import main
from rankclip.weights import read_checkpoint

from test_distributed import command, relative_difference, run
from test_losses_distributed import run_workers

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("single_thread")]

ROWS = 3  # per rank
DIM = 8
SCALE, BIAS = 6.0, -2.5  # bias -2.5: positives and negatives both carry weight in the gradients
WORLD = 4


def global_batch() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [F.normalize(torch.randn(WORLD * ROWS, DIM, generator=generator), dim=1) for _ in range(2)]


def run_loss(loss: SigLipLoss, image: torch.Tensor, text: torch.Tensor) -> dict:
    """Value and the gradients of the features, the logit scale and the bias, on leaf copies."""
    leaves = [t.clone().requires_grad_() for t in (image, text, torch.tensor(SCALE), torch.tensor(BIAS))]
    out = loss(leaves[0], leaves[1], leaves[2], logit_bias=leaves[3])
    out["loss"].backward()
    return {"values": {k: v.item() for k, v in out.items()}, "grads": [leaf.grad for leaf in leaves]}


def worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        image, text = global_batch()
        results = {impl: run_loss(SigLipLoss(impl), image[rows], text[rows]) for impl in SIGLIP_DIST_IMPLS}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_workers(worker, tmp_path_factory.mktemp("siglip"), WORLD)


@pytest.mark.parametrize("impl", SIGLIP_DIST_IMPLS)
def test_ranks_reproduce_the_single_process_loss_and_gradients(ranks, impl):
    single = run_loss(SigLipLoss(gather=False), *global_batch())
    parts = [r[impl] for r in ranks]
    assert sum(p["values"]["loss"] for p in parts) / WORLD == pytest.approx(single["values"]["loss"], rel=1e-6)
    for rank, part in enumerate(parts):
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        for got, want in zip(part["grads"][:2], single["grads"][:2]):
            torch.testing.assert_close(got, WORLD * want[rows], rtol=1e-5, atol=1e-6)
    for index in (2, 3):  # the logit scale's and bias's gradients, as DDP averages them
        mean = sum(p["grads"][index] for p in parts) / WORLD
        torch.testing.assert_close(mean, single["grads"][index], rtol=1e-5, atol=1e-6)


def test_two_processes_train_as_one(colour_data, tmp_path):
    """The CLI with torchrun: 8 SigLIP steps (with the bias and scale learnt) on 2 processes end where 1
    process ends, and validation (shared by both) records the same losses."""
    extra = ["--loss", "siglip", "--validation_data", str(colour_data["validation"]), "--lr", "5e-5"]
    assert main(command(colour_data, tmp_path, "one", 1, *extra)[3:]) == 0  # in this process: one start fewer
    done = run(command(colour_data, tmp_path, "two", 2, *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (read_checkpoint(tmp_path / name / "checkpoints" / "epoch_1.pt") for name in ("one", "two"))
    assert one["step"] == two["step"] == 8
    start = one["state_dict"]["logit_bias"].item()
    assert start != -10.0  # the bias trains
    assert relative_difference(one["state_dict"], two["state_dict"]) <= 1e-5
    assert two["state_dict"]["logit_bias"].item() == pytest.approx(start, abs=1e-6)
    results = [[line for line in (tmp_path / name / "results.jsonl").read_text().splitlines()
                if '"validation"' in line] for name in ("one", "two")]
    for a, b in zip(*results):
        a, b = json.loads(a), json.loads(b)
        for key in ("siglip_loss", "contrastive_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
