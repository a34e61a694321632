"""Real launchers (torchrun, mp.spawn) restarting and stopping runs: gloo on the CPU, tiny runs."""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rankclip.launch import TORCHRUN_SIGNALS
from rankclip.weights import read_checkpoint
from test_distributed import command, default_sigint, free_port, start_and_wait_for_step

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
    rather than pass on attempt 0's count (the rendezvous store outlives a torchrun restart), and rank 1
    must not connect to attempt 0's rank 0 when attempt 1's rank 0 comes late to the process group."""
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


def spawned(colour_data, logs, name: str) -> list[str]:
    """The trainer under --distributed's mp.spawn with 2 CPU processes, one epoch of 8 steps, --resume auto."""
    cli = command(colour_data, logs, name, 1, "--distributed_init_method", f"tcp://127.0.0.1:{free_port()}",
                  "--resume", "auto")[3:]
    return [sys.executable, str(TASK), "spawn", *cli]


def children(pid: int) -> list[int]:
    return [int(child) for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                   text=True).stdout.split()]


def running(pid: int) -> bool:
    """Whether `pid` exists and is no zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def assert_all_end(pids: list[int]) -> None:
    deadline = time.time() + TIMEOUT
    while any(running(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(running(pid) for pid in pids), "a rank outlived its launcher"


def assert_stopped_mid_epoch(run_dir: Path, world_size: int = 2) -> None:
    latest = read_checkpoint(run_dir / "checkpoints" / "epoch_latest.pt")
    assert latest["world_size"] == world_size and 2 <= latest["position"]["steps_done"] < 8, latest["position"]


def test_sigterm_to_the_spawning_parent_saves_every_rank_and_exits_75(colour_data, tmp_path):
    """`docker stop` or Kubernetes signal the --distributed parent alone (PID 1): it passes the signal on
    and waits; every rank saves and stops."""
    proc = start_and_wait_for_step(spawned(colour_data, tmp_path, "spawn"), tmp_path / "spawn", 2, environment(),
                                   default_sigint)
    try:
        os.kill(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=TIMEOUT)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, output[-3000:]
    assert "stopped by SIGTERM" in output and "Traceback" not in output, output[-3000:]
    assert_stopped_mid_epoch(tmp_path / "spawn")


# The README's Slurm batch script for a launch without srun (--distributed, or torchrun whose exit status
# says nothing about a stop): --signal=B:USR1@120 signals the batch shell alone, which passes it on.
BATCH_SCRIPT = """
{launch} &
pid=$!
trap 'stopped=1; kill -USR1 $pid' USR1
wait $pid; status=$?
while kill -0 $pid 2>/dev/null; do wait $pid; status=$?; done
if [ $status -eq 75 ] || [ -n "$stopped" ]; then echo "requeue (exit $status)"; fi
"""


def test_the_readme_batch_script_passes_slurms_signal_on_and_requeues(colour_data, tmp_path):
    """Slurm's --signal=B:USR1 reaches the batch shell alone: the README's script passes it on to the
    --distributed parent, whose ranks save; it requeues, and the requeued job continues the run."""
    launch = shlex.join(spawned(colour_data, tmp_path, "batch"))
    script = subprocess.Popen(["bash", "-c", BATCH_SCRIPT.format(launch=launch)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=environment(), start_new_session=True)
    try:
        steps, deadline = tmp_path / "batch" / "steps.jsonl", time.time() + TIMEOUT
        while not (steps.is_file() and '"step": 2,' in steps.read_text()) and time.time() < deadline:
            time.sleep(0.05)
        os.kill(script.pid, signal.SIGUSR1)
        output = script.communicate(timeout=TIMEOUT)[0]
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
    assert "requeue (exit 75)" in output and "stopped by SIGUSR1" in output, output[-3000:]
    assert_stopped_mid_epoch(tmp_path / "batch")
    requeued = subprocess.run(["bash", "-c", BATCH_SCRIPT.format(launch=launch)], capture_output=True, text=True,
                              timeout=TIMEOUT, env=environment())
    assert requeued.returncode == 0 and "requeue" not in requeued.stdout, requeued.stderr[-3000:]
    assert read_checkpoint(tmp_path / "batch" / "checkpoints" / "epoch_1.pt")["step"] == 8


def test_ranks_whose_spawning_parent_dies_save_and_stop(colour_data, tmp_path):
    """SIGKILL to the --distributed parent (the OOM killer): torch's PDEATHSIG sends the ranks SIGINT,
    which must not end them without a checkpoint."""
    proc = start_and_wait_for_step(spawned(colour_data, tmp_path, "orphans"), tmp_path / "orphans", 2, environment(),
                                   default_sigint)
    ranks = children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    assert_all_end(ranks)
    assert_stopped_mid_epoch(tmp_path / "orphans")




def torchrun_trainer(colour_data, logs, name: str, *torchrun_flags: str) -> list[str]:
    """The trainer under a real torchrun agent, 1 worker, one epoch of 8 steps, --resume auto."""
    cli = command(colour_data, logs, name, 1, "--resume", "auto")[3:]
    return torchrun(1, *torchrun_flags, "-m", "rankclip.main", *cli)


def stop_torchrun(proc: subprocess.Popen, to_workers: bool) -> str:
    """SIGUSR1 to the torchrun agent (and to its workers, as Slurm's --signal without B: does); its output."""
    workers = children(proc.pid)
    assert workers
    try:
        for pid in [proc.pid, *(workers if to_workers else [])]:
            os.kill(pid, signal.SIGUSR1)
        output = proc.communicate(timeout=TIMEOUT)[0]  # to its end: the workers write into the same pipe
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert_all_end(workers)
    return output


def test_sigusr1_to_a_torchrun_agent_that_handles_it_saves_and_the_same_command_continues(colour_data, tmp_path):
    """The README's torchrun: --signals_to_handle ...,SIGUSR1 passes SIGUSR1 on and waits (--shutdown_timeout)
    for the worker, which saves and exits 75; torchrun itself reports the stop as a failure (exit 1)."""
    cmd = torchrun_trainer(colour_data, tmp_path, "agent", "--signals_to_handle", TORCHRUN_SIGNALS,
                           "--shutdown_timeout", "300")
    proc = start_and_wait_for_step(cmd, tmp_path / "agent", 2, environment(), default_sigint)
    output = stop_torchrun(proc, to_workers=False)
    assert proc.returncode == 1 and "SignalException" in output
    assert "Sending process" in output and "closing signal SIGUSR1" in output
    assert "stopped by SIGUSR1" in output, output[-3000:]
    assert_stopped_mid_epoch(tmp_path / "agent", world_size=1)
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=environment())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_checkpoint(tmp_path / "agent" / "checkpoints" / "epoch_1.pt")["step"] == 8


def test_sigusr1_that_kills_a_default_torchrun_agent_and_its_store_still_saves(colour_data, tmp_path):
    """Slurm's --signal=USR1 reaches the agent and the workers; a torchrun without SIGUSR1 in its
    --signals_to_handle dies of it, and the store it held goes with it. The worker must still save and stop
    rather than end itself for the lost store (in the middle of the save)."""
    proc = start_and_wait_for_step(torchrun_trainer(colour_data, tmp_path, "plain"), tmp_path / "plain", 2,
                                   environment(), default_sigint)
    output = stop_torchrun(proc, to_workers=True)
    assert proc.returncode == -signal.SIGUSR1
    assert "stopped by SIGUSR1" in output and "ending this rank" not in output, \
        output[-3000:]
    assert_stopped_mid_epoch(tmp_path / "plain", world_size=1)
