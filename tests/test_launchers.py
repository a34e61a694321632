"""Real launchers (torchrun, mp.spawn) restarting and stopping runs: gloo on the CPU, tiny runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rankclip.weights import read_checkpoint
from test_distributed import command, free_port

pytestmark = pytest.mark.e2e

TASK = Path(__file__).resolve().parent / "launcher_task.py"
TIMEOUT = 300


def environment() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(TASK.parent.parent))


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), *args]


def test_a_restarted_attempt_waits_at_its_barriers_for_every_rank():
    """Attempt 0 meets at a barrier, then rank 1 dies; attempt 1's rank 0 must wait for late rank 1
    rather than pass on attempt 0's count (the rendezvous store outlives a torchrun restart)."""
    result = subprocess.run(torchrun(2, "--max_restarts", "1", str(TASK), "barrier"), capture_output=True,
                            text=True, timeout=TIMEOUT, env=environment())
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    waited = float(output.split("attempt 1 rank 0 waited ")[1].split()[0])
    assert waited >= 2.0, output[-3000:]


def test_a_run_whose_first_torchrun_attempt_fails_continues_on_the_second(colour_data, tmp_path):
    """torchrun --max_restarts 1: attempt 0 fails at step 4 (a rank that raises writes `failed` into the
    store), attempt 1 resumes from step 2's checkpoint and finishes the run."""
    cli = command(colour_data, tmp_path, "restarted", 1, "--save_every_steps", "2", "--resume", "auto")[3:]
    result = subprocess.run(torchrun(1, "--max_restarts", "1", str(TASK), "cli", *cli), capture_output=True,
                            text=True, timeout=TIMEOUT, env=environment())
    output = result.stdout + result.stderr
    assert "injected failure at step 4 of attempt 0" in output
    assert result.returncode == 0, output[-3000:]
    assert "after step 2 of 8" in output
    assert read_checkpoint(tmp_path / "restarted" / "checkpoints" / "epoch_1.pt")["step"] == 8
