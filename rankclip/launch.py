"""Launch modes: one process, `--distributed` (one spawned process per GPU), torchrun (env://, any
number of nodes) or Slurm's srun (SLURM_* variables + MASTER_ADDR/MASTER_PORT); devices per process."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .config import LaunchConfig
from .errors import ConfigError, RankCLIPError
from .peers import Peers, launch_token
from .runtime import Runtime
from .savepoints import EXIT_PREEMPTED, STOP_SIGNALS, Preempted

# The longest a collective waits for a peer. Ranks that wait for rank-0-only work (saving) wait in
# Runtime.barrier, which has no limit, so this only ends a run whose peer vanished. Evaluation is
# shared (every rank encodes its share and fits the same linear probe on the gathered features), so
# no rank waits long for another there.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)

# torchrun's --signals_to_handle for a run: its default (SIGTERM,SIGINT,SIGHUP,SIGQUIT) lets SIGUSR1, Slurm's
# usual time-limit signal, kill the agent, and with it the rendezvous store, instead of passing it on.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def resolve_device(requested: Optional[str], index: int) -> torch.device:
    """cpu, or cuda:<index> after checking that GPU exists."""
    if requested == "cpu" or (requested is None and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device gpu: no CUDA GPU is visible; use --device cpu")
    if index >= torch.cuda.device_count():
        raise ConfigError(f"GPU {index} does not exist: {torch.cuda.device_count()} GPUs are visible")
    return torch.device("cuda", index)


def task_device(local_rank: int) -> torch.device:
    """The GPU of a process that a launcher started: the only one it sees (srun --gpus-per-task=1
    shows each task its own GPU as cuda:0), else the one of its local rank."""
    count = torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda", 0)
    if local_rank >= count:
        raise ConfigError(f"this process has local rank {local_rank} but sees {count} GPUs, none of them its own: "
                          f"give each task one GPU (srun --gpus-per-task=1) or all tasks of a node all its GPUs")
    return torch.device("cuda", local_rank)


def _launcher_env() -> Optional[tuple[int, int, int]]:
    """(rank, local rank, world size) set by torchrun or srun, or None for a plain launch.

    Of Slurm's variables only srun's tell a task of a step apart from the batch script: sbatch
    runs the script once, with SLURM_NTASKS of the whole job and SLURM_PROCID 0, but without
    SLURM_STEP_NUM_TASKS, which srun sets for every task it starts.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"])
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in env:
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise ConfigError("under srun set MASTER_ADDR (first node's host name) and MASTER_PORT before launching")
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_STEP_NUM_TASKS"])
    return None


def _check_outside_srun(distributed: bool) -> None:
    """A plain launch inside a Slurm job of several tasks is its batch script (or an salloc shell),
    not one of the tasks: say what that runs, or refuse when it cannot cover the job's nodes."""
    env = os.environ
    tasks, nodes = int(env.get("SLURM_NTASKS", "1")), int(env.get("SLURM_JOB_NUM_NODES", "1"))
    if "SLURM_JOB_ID" not in env or "SLURM_STEP_NUM_TASKS" in env or tasks == 1:
        return
    where = f"this process is the job's batch script, not an srun task (SLURM_NTASKS={tasks})"
    if distributed and nodes > 1:
        raise ConfigError(f"--distributed spawns processes on this node only, but the job has {nodes} nodes and "
                          f"{where}: start the tasks with srun python -m rankclip.main ... without --distributed")
    if not distributed:
        print(f"rankclip: warning: Slurm gave this job {tasks} tasks but {where}: running one process; start "
              f"them with srun python -m rankclip.main ... (README: Slurm)", file=sys.stderr)


def configure_device(device: torch.device) -> None:
    """Make `device` this process's GPU and allow TF32 matmuls and convolutions (fp32 runs too)."""
    if device.type != "cuda":
        return
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels


def _run_member(fn: Callable[[Runtime], None], runtime: Runtime, backend: Optional[str], init_method: str) -> None:
    """Join the process group (`backend`: nccl on GPUs, gloo on CPUs when None), run, and always
    leave it (so no rank hangs on exit).

    A failure here ends the other ranks within seconds (see Peers); a success waits for them to
    finish, so that rank 0's store outlives their last look at it."""
    backend = backend or ("nccl" if runtime.device.type == "cuda" else "gloo")
    configure_device(runtime.device)
    store, _, _ = next(dist.rendezvous(init_method, runtime.rank, runtime.world_size, timeout=PROCESS_GROUP_TIMEOUT))
    store.set_timeout(PROCESS_GROUP_TIMEOUT)
    # torchrun keeps its rendezvous store across --max_restarts, and with it the keys through which a process
    # group's members find each other (their addresses, NCCL's id): a rank of the next attempt could read a
    # failed attempt's peer there and fail to connect. Each attempt's keys live apart, under its number.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"default_pg/attempt{attempt}", store),
                            rank=runtime.rank, world_size=runtime.world_size, timeout=PROCESS_GROUP_TIMEOUT)
    peers = Peers(store, runtime.rank, runtime.world_size, launch_token())
    try:
        fn(dataclasses.replace(runtime, peers=peers))
    except Preempted:  # every rank stops together, after its checkpoint: not a failure
        peers.finish()
        raise
    except Exception:
        peers.announce_failure()
        raise
    else:
        peers.finish()
    finally:
        peers.done.set()
        dist.destroy_process_group()


def process_label() -> str:
    """'[rank r] ' in a multi-process run (for error lines), '' otherwise."""
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_STEP_NUM_TASKS", "1")))
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    return f"[rank {rank}] " if world > 1 else ""


def _stop_when_orphaned() -> None:
    """torch's spawn has a child sent SIGINT when its parent dies (PR_SET_PDEATHSIG), and the
    KeyboardInterrupt would end it mid-step or mid-save: such a SIGINT becomes a SIGTERM (save and
    stop). Ctrl-C, while the parent lives, keeps its usual meaning (an ignored SIGINT stays ignored)."""
    parent, usual = os.getppid(), signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: object) -> None:
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
        elif callable(usual):
            usual(signum, frame)
    signal.signal(signal.SIGINT, on_sigint)


def _spawned(local_rank: int, fn: Callable, settings: LaunchConfig, devices: list[torch.device]) -> None:
    _stop_when_orphaned()
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(len(devices)))
    runtime = Runtime(rank=local_rank, local_rank=local_rank, world_size=len(devices), device=devices[local_rank])
    try:
        _run_member(fn, runtime, settings.distributed_backend, settings.distributed_init_method)
    except RankCLIPError as e:  # one line per rank, then a non-zero exit that ends the other ranks
        print(f"rankclip: error: {process_label()}{e}", file=sys.stderr)
        sys.exit(2)
    except Preempted:  # saved; the parent reports it
        sys.exit(EXIT_PREEMPTED)


def spawn(fn: Callable[[Runtime], None], settings: LaunchConfig, devices: list[torch.device]) -> None:
    """One process per device on this machine (the original code's --distributed).

    A stop signal to this parent (`docker stop`, Kubernetes, Slurm's time limit without srun) is
    passed on to the children, which save and stop, while the parent goes on waiting for them: were
    it to die of the signal, torch would end the children with SIGINT (see _stop_when_orphaned)."""
    processes: list = []
    received: list[str] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signal.Signals(signum).name)
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        context = mp.start_processes(_spawned, args=(fn, settings, devices), nprocs=len(devices), join=False,
                                     start_method="spawn")
        processes.extend(context.processes)
        while not context.join():
            pass
    except mp.ProcessExitedException as e:
        if e.exit_code == EXIT_PREEMPTED:
            raise Preempted(received[0] if received else "a stop signal") from e
        raise ConfigError(f"process {e.error_index} of {len(devices)} exited with code {e.exit_code}; "
                          f"its error is shown above") from e
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def launch(fn: Callable[[Runtime], None], settings: LaunchConfig) -> None:
    """Run `fn(runtime)` in every process of the launch mode: the launcher's (torchrun, srun), else
    one spawned process per GPU (--distributed), else this process alone. `fn` must pickle
    (--distributed starts it in new processes)."""
    launched = _launcher_env()
    if launched is not None:
        rank, local_rank, world = launched
        on_gpu = settings.device != "cpu" and torch.cuda.is_available()
        device = task_device(local_rank) if on_gpu else torch.device("cpu")
        _run_member(fn, Runtime(rank, local_rank, world, device), settings.distributed_backend, "env://")
        return
    _check_outside_srun(settings.distributed)
    if settings.distributed:
        if settings.device == "cpu" or not torch.cuda.is_available():
            raise ConfigError("--distributed spawns one process per GPU and no GPU is visible; "
                              "on CPUs use torchrun --nproc_per_node N -m rankclip.main")
        ids = settings.device_ids if settings.device_ids is not None else tuple(range(torch.cuda.device_count()))
        spawn(fn, settings, [resolve_device("gpu", i) for i in ids])
    else:
        device = resolve_device(settings.device, settings.device_id)
        configure_device(device)
        fn(Runtime(device=device))
