"""Slurm task layouts: the environments that srun and sbatch really set (variable names and values
as Slurm's src/common/env.c writes them), faked, and real gloo processes started the way srun starts
them: each with its own SLURM_PROCID, and nothing that ends the others when one fails."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import torch

from rankclip.errors import ConfigError
from rankclip import launch as launching
from rankclip.config import parse_config
from rankclip.main import main

from rankclip.weights import read_checkpoint
from test_distributed import command, free_port

TASK = Path(__file__).resolve().parent / "slurm_task.py"
DATA = ["--train_data", str(TASK)]  # any existing file: launch() is faked, nothing reads it

# The batch step: the one copy of the script that sbatch runs, of a job with --ntasks=4 on one node
# (env_array_for_batch_job, then setup_env for task 0). Released Slurm sets no SLURM_STEP_ID there;
# its development code since May 2026 (commit 87077e7) reads as writing the batch step's id
# 0xfffffffb with "%d", i.e. -5. Only srun's env_array_for_step sets SLURM_STEP_NUM_TASKS.
BATCH_STEP = {
    "SLURM_JOB_ID": "4242", "SLURM_JOBID": "4242", "SLURM_JOB_NAME": "rankclip", "SLURM_CLUSTER_NAME": "lab",
    "SLURM_JOB_PARTITION": "gpu", "SLURM_NTASKS": "4", "SLURM_NPROCS": "4", "SLURM_TASKS_PER_NODE": "4",
    "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node01", "SLURM_NODELIST": "node01",
    "SLURM_JOB_CPUS_PER_NODE": "32", "SLURM_CPUS_ON_NODE": "32", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0", "SLURM_TASK_PID": "51234", "SLURMD_NODENAME": "node01", "ENVIRONMENT": "BATCH",
}
BATCH_STEP_LATER = BATCH_STEP | {"SLURM_STEP_ID": "-5", "SLURM_STEPID": "-5"}


def srun_task(rank: int, tasks: int = 4, nodes: int = 1, per_node: int = 4) -> dict[str, str]:
    """What `srun` inside that batch script gives task `rank` (step 0) on top of the batch variables."""
    step = {"SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_STEP_NUM_TASKS": str(tasks),
            "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_STEP_NODELIST": "node01",
            "SLURM_STEP_TASKS_PER_NODE": str(per_node), "SLURM_STEP_LAUNCHER_PORT": "40321",
            "SLURM_SRUN_COMM_PORT": "40321", "SLURM_NTASKS": str(tasks), "SLURM_NPROCS": str(tasks),
            "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % per_node), "SLURM_NODEID": str(rank // per_node)}
    return BATCH_STEP | step


@pytest.fixture
def slurm_env(monkeypatch):
    """Set a Slurm environment in place of this process's launcher variables."""
    for name in list(os.environ):
        if name.startswith("SLURM_") or name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(name)

    def apply(variables: dict[str, str]) -> None:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
    return apply


@pytest.fixture
def gpus(monkeypatch):
    """Pretend `count` GPUs are visible to this process."""
    def apply(count: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    return apply


@pytest.fixture
def launched(monkeypatch):
    """What launch() would start: the Runtime of a process-group member, or the devices spawned."""
    seen = {}
    monkeypatch.setattr(launching, "_run_member", lambda fn, runtime, backend, init: seen.update(member=runtime))
    monkeypatch.setattr(launching, "spawn", lambda fn, launch, devices: seen.update(spawned=devices))
    monkeypatch.setattr(launching, "configure_device", lambda device: None)
    return seen


def test_one_gpu_per_task_uses_the_gpu_it_sees(slurm_env, gpus, launched):
    """srun --gpus-per-task=1: task 3 sees one GPU, cuda:0, while its SLURM_LOCALID is 3."""
    slurm_env(srun_task(3) | {"MASTER_ADDR": "node01", "MASTER_PORT": "29500", "CUDA_VISIBLE_DEVICES": "0"})
    gpus(1)
    launching.launch(print, parse_config(DATA).launch)
    runtime = launched["member"]
    assert (runtime.rank, runtime.local_rank, runtime.world_size) == (3, 3, 4)
    assert runtime.device == torch.device("cuda", 0)


def test_tasks_sharing_the_node_gpus_take_their_local_rank(slurm_env, gpus, launched):
    slurm_env(srun_task(6, tasks=8, nodes=2) | {"MASTER_ADDR": "node01", "MASTER_PORT": "29500"})
    gpus(4)
    launching.launch(print, parse_config(DATA).launch)
    assert launched["member"].device == torch.device("cuda", 2) and launched["member"].rank == 6


def test_a_task_without_a_gpu_of_its_own_is_told_how_to_fix_it(slurm_env, gpus, launched):
    """srun --gpus-per-task=2: each task sees 2 GPUs, and local rank 3 has none of them."""
    slurm_env(srun_task(3) | {"MASTER_ADDR": "node01", "MASTER_PORT": "29500"})
    gpus(2)
    with pytest.raises(ConfigError, match="local rank 3 but sees 2 GPUs.*--gpus-per-task=1"):
        launching.launch(print, parse_config(DATA).launch)


@pytest.mark.parametrize("batch", [BATCH_STEP, BATCH_STEP_LATER], ids=["no step id", "batch step id"])
def test_distributed_in_the_batch_step_spawns_instead_of_waiting_for_3_more_ranks(slurm_env, gpus, launched, batch):
    slurm_env(batch | {"MASTER_ADDR": "node01", "MASTER_PORT": "29500"})
    gpus(4)
    launching.launch(print, parse_config(DATA + ["--distributed"]).launch)
    assert "member" not in launched
    assert launched["spawned"] == [torch.device("cuda", i) for i in range(4)]


def test_distributed_in_the_batch_step_of_a_two_node_job_is_refused(slurm_env, gpus, launched, capsys):
    slurm_env(BATCH_STEP | {"SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2", "SLURM_NTASKS": "8"})
    gpus(4)
    argv = DATA + ["--distributed"]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "not an srun task" in line and "srun" in line and "2 nodes" in line and not launched


def test_a_plain_run_in_the_batch_step_is_one_process_and_says_so(slurm_env, gpus, launched, capsys):
    slurm_env(BATCH_STEP)
    gpus(0)
    launching.launch(lambda runtime: launched.update(single=runtime), parse_config(["--device", "cpu"]).launch)
    assert launched["single"].world_size == 1 and "member" not in launched
    assert "4 tasks" in capsys.readouterr().err
    assert launching.process_label() == ""


def test_srun_tasks_need_the_rendezvous_address(slurm_env, gpus, launched):
    slurm_env(srun_task(1))
    gpus(0)
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        launching.launch(print, parse_config(["--device", "cpu"]).launch)


# ----------------------------------------------------------------------------------------------
# Real processes: two tasks of a fake srun step, talking gloo over 127.0.0.1.

def start_tasks(scenario: str, tasks: int = 2, command: Optional[list[str]] = None) -> list[subprocess.Popen]:
    """`tasks` processes of `python tests/slurm_task.py scenario` (or of `command`), as srun starts them."""
    port = free_port()
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = []
    for rank in range(tasks):
        env = base | srun_task(rank, tasks=tasks, per_node=tasks) | {
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(TASK.parent.parent)}
        procs.append(subprocess.Popen(command or [sys.executable, str(TASK), scenario], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """(exit code, stdout + stderr) per task, killing whatever is still running after `timeout`."""
    deadline = time.monotonic() + timeout
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += "\n[still running: killed by the test]"
        results.append((proc.returncode, out + err))
    return results


def ended_within(procs: list[subprocess.Popen], first: int, seconds: float) -> float:
    """Wait for task `first` to end, then return how long the others took to follow it."""
    procs[first].wait(timeout=120)
    ended = time.monotonic()
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, ended + seconds - time.monotonic()))
        except subprocess.TimeoutExpired:
            break
    return time.monotonic() - ended


@pytest.mark.parametrize("scenario, dead, survivor_says, limit", [
    ("rank_1_fails", 1, "[rank 0] rank 1 failed", 10),  # it wrote so into the store
    # after STOP_NOTICE_SECONDS (5 s), which a stop signal that killed the store's host gets to arrive
    ("rank_0_is_killed", 0, "[rank 1] the run's store (in rank 0, or in torchrun's agent) is gone", 5 + 10),
    ("rank_1_is_killed", 1, "[rank 0] rank 1 has not been heard from for 5 s", 5 + 10),  # the OOM killer's way
])
@pytest.mark.e2e
def test_a_task_that_fails_or_is_killed_ends_the_other_within_seconds(scenario, dead, survivor_says, limit):
    procs = start_tasks(scenario)
    took = ended_within(procs, first=dead, seconds=30)
    results = wait_all(procs, timeout=1)
    (dead_code, _), (survivor_code, survivor_out) = results[dead], results[1 - dead]
    assert dead_code != 0 and survivor_code != 0 and took < limit, survivor_out
    assert survivor_says in survivor_out


@pytest.mark.e2e
def test_other_ranks_wait_out_a_rank_0_evaluation_longer_than_the_collective_timeout():
    results = wait_all(start_tasks("long_rank_0_evaluation"), timeout=120)
    assert [code for code, _ in results] == [0, 0], results
    assert all(f"rank {r} sums 2" in out for r, (_, out) in enumerate(results))


@pytest.mark.e2e
def test_rank_0_ending_first_is_no_failure():
    results = wait_all(start_tasks("rank_0_ends_first"), timeout=120)
    assert [code for code, _ in results] == [0, 0], results
    assert all("failed" not in out and "gone" not in out for _, out in results)


@pytest.mark.e2e
def test_two_srun_tasks_train_and_evaluate_like_torchrun_processes(colour_data, tmp_path):
    cli = command(colour_data, tmp_path, "srun", 1, "--validation_data", str(colour_data["validation"]))
    results = wait_all(start_tasks("", command=cli), timeout=300)
    assert [code for code, _ in results] == [0, 0], results
    assert "world size 2" in (tmp_path / "srun" / "output.log").read_text()
    assert read_checkpoint(tmp_path / "srun" / "checkpoints" / "epoch_1.pt")["step"] == 8
