"""Launcher scenarios of tests/test_launchers.py: `python tests/launcher_task.py spawn FLAGS` is the trainer
under --distributed's real mp.spawn, with CPU processes in place of GPUs; `barrier` and `cli FLAGS` are one
worker of a real torchrun, started again by its --max_restarts after the first attempt fails."""

from __future__ import annotations

import os
import sys
import time

import torch

from rankclip import launch, main
from rankclip.config import parse_config
from rankclip.errors import DataError
from rankclip.savepoints import SavePoints

ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
LATE = 3.0  # seconds by which rank 1 comes late to attempt 1's barrier


def killed_after_a_barrier(runtime) -> None:
    """Attempt 0 meets at a barrier, then rank 1 dies without a word (as the OOM killer leaves it).
    Attempt 1's first barrier must wait for rank 1, whatever attempt 0 counted."""
    if ATTEMPT == 0:
        runtime.barrier()
        if runtime.rank == 1:
            os._exit(3)
        time.sleep(60)  # torchrun ends this attempt
    if runtime.rank == 1:
        time.sleep(LATE)
    start = time.monotonic()
    runtime.barrier()
    print(f"attempt {ATTEMPT} rank {runtime.rank} waited {time.monotonic() - start:.1f} s", flush=True)


def failing_at_step(step: int):
    """SavePoints.at_step that raises a DataError at optimizer step `step` (before that step's save)."""
    original = SavePoints.at_step

    def at_step(self, current: int, may_save: bool = True):
        if current == step:
            raise DataError(f"injected failure at step {step} of attempt {ATTEMPT}")
        return original(self, current, may_save)
    return at_step


if __name__ == "__main__":
    scenario, flags = sys.argv[1], sys.argv[2:]
    if scenario == "spawn":  # --distributed's launch of two processes, on the CPU
        main.launch = lambda fn, settings: launch.spawn(fn, settings, [torch.device("cpu")] * 2)
        sys.exit(main.main(flags))
    if scenario == "cli":  # the trainer's own command; attempt 0 fails at step 4
        if ATTEMPT == 0:
            SavePoints.at_step = failing_at_step(4)
        sys.exit(main.main(flags))
    if ATTEMPT == 1 and os.environ["RANK"] == "0":
        time.sleep(LATE)  # late to attempt 1's process group: rank 1 must not find attempt 0's rank 0 in the store
    launch.launch(killed_after_a_barrier, parse_config(["--device", "cpu"]).launch)
