"""One task of a fake srun step (SLURM_* variables from the test, no torchrun agent to end the
others): `python tests/slurm_task.py SCENARIO`. The scenarios belong to tests/test_slurm.py."""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from rankclip.errors import ConfigError
from rankclip import launch, peers
from rankclip.config import parse_config

NEVER = 300  # seconds: stands for an NCCL collective, which never notices that a peer is gone


def rank_1_fails(runtime) -> None:
    runtime.barrier()  # both ranks are up
    if runtime.rank == 1:
        raise RuntimeError("rank 1 broke")
    time.sleep(NEVER)


def rank_0_is_killed(runtime) -> None:
    runtime.barrier()
    if runtime.rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(NEVER)


def rank_1_is_killed(runtime) -> None:
    """Killed without a word, as the OOM killer does."""
    runtime.barrier()
    if runtime.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(NEVER)


def long_rank_0_evaluation(runtime) -> None:
    if runtime.rank == 0:
        time.sleep(3 * COLLECTIVE_TIMEOUT.total_seconds() / 2)  # longer than a collective may wait
    runtime.barrier()
    total = torch.ones(1)
    dist.all_reduce(total)  # the process group still works
    print(f"rank {runtime.rank} sums {int(total.item())}")


def rank_0_ends_first(runtime) -> None:
    """A successful run whose rank 0 (the store's host under srun) is done long before rank 1."""
    time.sleep(3 if runtime.rank == 1 else 0)
    print(f"rank {runtime.rank} done")


SCENARIOS = {f.__name__: f for f in (rank_1_fails, rank_0_is_killed, rank_1_is_killed, long_rank_0_evaluation,
                                      rank_0_ends_first)}
COLLECTIVE_TIMEOUT = timedelta(seconds=8)
SILENCE = 5.0  # seconds, for PEER_SILENCE_SECONDS

if __name__ == "__main__":
    launch.PROCESS_GROUP_TIMEOUT = COLLECTIVE_TIMEOUT
    peers.PEER_SILENCE_SECONDS = SILENCE
    try:
        launch.launch(SCENARIOS[sys.argv[1]], parse_config(["--device", "cpu"]).launch)
    except ConfigError as e:
        print(f"rankclip: error: {e}", file=sys.stderr)
        sys.exit(2)
