"""How long a checkpoint save blocks training, for a model of the zoo with its AdamW state.

The step waits only for the copy of weights, optimizer state and RNG states to host memory;
torch.save, fsync and rename run on the writer thread while training goes on. Prints one table
row per repeat:

    python utils/bench_checkpoint.py --model_name ViT-B/32 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rankclip.checkpoint import Checkpointer, TrainState, training_state  # noqa: E402
from rankclip.config import CheckpointsConfig, Config, OptimConfig  # noqa: E402
from rankclip.runtime import Runtime  # noqa: E402
from rankclip.models import resolve_model_name  # noqa: E402
from rankclip.optim import build_optimizer  # noqa: E402
from rankclip.rankstate import capture_rng  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name", default="ViT-B/32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--folder", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = open_clip.create_model(resolve_model_name(args.model_name), device=device)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4, beta2=0.98, eps=1e-6))
    for p in model.parameters():  # one step, so that the Adam moments exist as in a real run
        p.grad = torch.zeros_like(p)
    optimizer.step()
    cfg = Config.from_dict({"name": "bench", "model_name": args.model_name})
    record = {"name": "bench", "model_name": args.model_name, "config": cfg.to_dict()}
    params = sum(p.numel() for p in model.parameters()) / 1e6
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        checkpointer = Checkpointer(CheckpointsConfig(), Path(folder), Runtime(device=device), record)
        print("| model | parameters | file | device | blocks the step | background write |")
        print("| --- | --- | --- | --- | --- | --- |")
        blocked, written = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            state = training_state(TrainState(model, model, optimizer, None, step=1), epoch=0,
                                   position={"epoch": 1, "steps_done": 1, "seen": 1}, record=record,
                                   rank_states=[{"rng": capture_rng(device)}])
            checkpointer.write(state)
            blocked.append(time.perf_counter() - start)
            checkpointer.wait()
            written.append(time.perf_counter() - start - blocked[-1])
            size = checkpointer.latest.stat().st_size / 2**30
            print(f"| {args.model_name} | {params:.1f}M | {size:.2f} GiB | {device} | {blocked[-1]:.2f} s | "
                  f"{written[-1]:.2f} s |")
        print(f"median: blocks {statistics.median(blocked):.2f} s, writes {statistics.median(written):.2f} s")


if __name__ == "__main__":
    main()
