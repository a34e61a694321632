"""Processes: launch modes, the per-process Runtime, rank queries and an all-gather that carries gradients."""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .config import ConfigError, LaunchConfig
from .savepoints import EXIT_PREEMPTED, Preempted


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gradient over ranks and keeps this rank's slice.

    Each rank's loss covers its own rows against the columns of every rank, so the gradient
    for rank r's features is spread over all W losses: the backward all-reduces (sums) the
    incoming gradient and returns rows [r·n, (r+1)·n). With every rank's loss normalized as a
    mean over its own rows, the result is W × the single-process gradient of those rows,
    which DDP's averaging over ranks turns into exactly the single-process gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = rank_and_world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The global batch from every rank's shard `x` (rank order); `x` itself if not distributed.

    Every rank must call it, with shards of one shape.
    """
    if rank_and_world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


def rank_block(count: int, rank: int, world: int) -> range:
    """Process `rank`'s contiguous share of `count` items for evaluation (sizes differ by at most one);
    the blocks in rank order are range(count)."""
    return range(count * rank // world, count * (rank + 1) // world)


def gather_rows(parts: Sequence[torch.Tensor], device: torch.device,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """This rank's `parts` concatenated along dim 0, then every rank's concatenated in rank order, on
    every rank; row counts may differ, and a rank may have no parts (`device` and `dtype` then
    make its empty share). Only this rank's rows if not distributed."""
    x = torch.cat(list(parts)) if parts else torch.empty(0, dtype=dtype, device=device)
    world = rank_and_world()[1]
    if world == 1:
        return x
    shapes: list[tuple[int, ...]] = [()] * world
    dist.all_gather_object(shapes, tuple(x.shape))
    trailing = next((shape[1:] for shape in shapes if shape[0] > 0), None)
    if trailing is None:
        return x
    rows = max(shape[0] for shape in shapes)
    padded = x.new_zeros((rows, *trailing))
    if len(x):
        padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:shape[0]] for part, shape in zip(parts, shapes)])


# ----------------------------------------------------------------------------------------------
# Processes and devices: one process, `--distributed` (one spawned process per GPU), torchrun
# (env://, any number of nodes) or Slurm's srun (SLURM_* variables + MASTER_ADDR/MASTER_PORT).

# The longest a collective waits for a peer. Ranks that wait for rank-0-only work (saving) wait in
# Runtime.barrier, which has no limit, so this only ends a run whose peer vanished. Evaluation is
# shared (every rank encodes its share and fits the same linear probe on the gathered features), so
# no rank waits long for another there.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)
PEER_POLL_SECONDS = 1.0
PEER_SILENCE_SECONDS = 30.0  # a rank whose watcher has not ticked for this long is taken for dead
FAILED_KEY = "failed"


class Peers:
    """The run's other processes, seen through the rendezvous store that every rank is connected to.

    Under srun nothing ends the other tasks when one fails (torchrun's agent and --distributed's
    parent do), and an NCCL collective does not notice a dead peer: they would wait out
    PROCESS_GROUP_TIMEOUT. So a thread in every rank ticks a counter in the store every
    PEER_POLL_SECONDS and ends its process when another rank failed (a rank that fails with an
    error writes so) or the store is gone (rank 0, its host under srun, died); rank 0's thread
    also takes a rank whose counter stood still for PEER_SILENCE_SECONDS, without it having
    finished, for killed (the OOM killer), and ends the run.

    `barrier` meets in the store rather than in a collective, so ranks may wait there any time.
    """

    def __init__(self, store: dist.Store, rank: int, world: int) -> None:
        self.store, self.rank, self.world = dist.PrefixStore("rankclip", store), rank, world
        self.barriers = 0
        self.done = threading.Event()  # set when this rank stops watching: it failed or finished
        threading.Thread(target=self._watch, name="rankclip-peers", daemon=True).start()

    def _watch(self) -> None:
        heard: dict[int, tuple[int, float]] = {}  # rank 0's view: rank -> (its tick count, when it changed)
        while not self.done.wait(PEER_POLL_SECONDS):
            self._ask(lambda: self.store.add(f"tick{self.rank}", 1))
            if self._ask(lambda: self.store.check([FAILED_KEY])):
                failed = self._ask(lambda: self.store.get(FAILED_KEY).decode())
                time.sleep(PEER_POLL_SECONDS)  # a rank failing for the same reason gets to say so itself
                self._end(f"{failed} failed (its error is in its output)")
            silent = self._silent_rank(heard) if self.rank == 0 else None
            if silent is not None:
                self._ask(lambda: self.store.set(FAILED_KEY, f"rank {silent}"))
                self._end(f"rank {silent} has not been heard from for {PEER_SILENCE_SECONDS:g} s (killed?)")

    def _silent_rank(self, heard: dict[int, tuple[int, float]]) -> Optional[int]:
        now = time.monotonic()
        for rank in range(1, self.world):
            ticks = self._ask(lambda: self.store.add(f"tick{rank}", 0))
            if rank not in heard or heard[rank][0] != ticks:
                heard[rank] = (ticks, now)
            elif now - heard[rank][1] > PEER_SILENCE_SECONDS and not self._ask(
                    lambda: self.store.check([f"finished{rank}"])):
                return rank
        return None

    def _ask(self, question: Callable):
        """The store's answer; a rank that cannot reach the store any more ends, unless it is done."""
        try:
            return question()
        except RuntimeError:
            if self.done.is_set():
                return None
            self._end("rank 0, which holds the run's store, is gone")

    def _end(self, reason: str) -> None:
        if not self.done.is_set():
            print(f"rankclip: error: [rank {self.rank}] {reason}; ending this rank", file=sys.stderr, flush=True)
            os._exit(1)

    def barrier(self) -> None:
        """Wait until every rank has called barrier as often as this one, with no time limit."""
        self.barriers += 1
        key = f"barrier{self.barriers}"
        self._ask(lambda: self.store.add(key, 1))
        self._wait_until(lambda: self._ask(lambda: self.store.add(key, 0)) >= self.world)

    def announce_failure(self) -> None:
        self.done.set()
        try:
            self.store.set(FAILED_KEY, f"rank {self.rank}")
        except RuntimeError:
            pass  # the store is gone too: the others see that instead

    def finish(self) -> None:
        """Stop watching. Rank 0 then waits for every rank to finish: under srun the store lives in
        rank 0's process, and a rank that could not reach it any more would take rank 0 for dead."""
        self._ask(lambda: self.store.set(f"finished{self.rank}", "1"))
        self.done.set()
        if self.rank == 0:
            self._wait_until(self._all_finished_or_one_failed)

    def _all_finished_or_one_failed(self) -> bool:
        try:
            return self.store.check([f"finished{r}" for r in range(self.world)]) or self.store.check([FAILED_KEY])
        except RuntimeError:
            return True

    @staticmethod
    def _wait_until(ready: Callable[[], bool]) -> None:
        pause = 0.01
        while not ready():
            time.sleep(pause)
            pause = min(2 * pause, PEER_POLL_SECONDS)


@dataclass(frozen=True)
class Runtime:
    """Facts about this process, fixed at launch; kept apart from the (user-given) Config."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    peers: Optional[Peers] = None  # the other processes, in a multi-process run

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"world size {self.world_size}, rank {self.rank}, device {self.device}"

    def wrap(self, model: torch.nn.Module, sync_bn: bool = False, compile: bool = False) -> torch.nn.Module:
        """The module the training loop calls: DDP over several processes, optionally compiled.

        With `sync_bn` the BatchNorm layers of `model` are replaced in place by SyncBatchNorm
        (same parameters, so an optimizer built on `model` stays valid): batch statistics are
        then those of the global batch rather than of each process's share.
        """
        wrapped = model
        if sync_bn and self.world_size > 1 and self.device.type != "cuda":
            raise ConfigError("--sync_bn synchronizes BatchNorm over GPUs; on CPUs leave it out")
        if self.world_size > 1:
            if sync_bn:
                torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return torch.compile(wrapped) if compile else wrapped

    def barrier(self) -> None:
        """Wait for every rank. Not a collective: ranks may wait here as long as rank-0-only work
        (a checkpoint) takes, without PROCESS_GROUP_TIMEOUT ending them."""
        if self.peers is not None:
            self.peers.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all ranks (a sync point); `values` itself for one process."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()


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
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=runtime.rank,
                            world_size=runtime.world_size, timeout=PROCESS_GROUP_TIMEOUT)
    peers = Peers(store, runtime.rank, runtime.world_size)
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


def _spawned(local_rank: int, fn: Callable, launch: LaunchConfig, devices: list[torch.device]) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(len(devices)))
    runtime = Runtime(rank=local_rank, local_rank=local_rank, world_size=len(devices), device=devices[local_rank])
    try:
        _run_member(fn, runtime, launch.distributed_backend, launch.distributed_init_method)
    except ConfigError as e:  # one line per rank, then a non-zero exit that ends the other ranks
        print(f"rankclip: error: {process_label()}{e}", file=sys.stderr)
        sys.exit(2)
    except Preempted:  # saved; the parent reports it
        sys.exit(EXIT_PREEMPTED)


def spawn(fn: Callable[[Runtime], None], launch: LaunchConfig, devices: list[torch.device]) -> None:
    """One process per device on this machine (the original code's --distributed)."""
    try:
        mp.spawn(_spawned, args=(fn, launch, devices), nprocs=len(devices), join=True)
    except mp.ProcessExitedException as e:
        if e.exit_code == EXIT_PREEMPTED:
            raise Preempted("a stop signal") from e
        raise ConfigError(f"process {e.error_index} of {len(devices)} exited with code {e.exit_code}; "
                          f"its error is shown above") from e


def launch(fn: Callable[[Runtime], None], launch: LaunchConfig) -> None:
    """Run `fn(runtime)` in every process of the launch mode: the launcher's (torchrun, srun), else
    one spawned process per GPU (--distributed), else this process alone. `fn` must pickle
    (--distributed starts it in new processes)."""
    launched = _launcher_env()
    if launched is not None:
        rank, local_rank, world = launched
        on_gpu = launch.device != "cpu" and torch.cuda.is_available()
        device = task_device(local_rank) if on_gpu else torch.device("cpu")
        _run_member(fn, Runtime(rank, local_rank, world, device), launch.distributed_backend, "env://")
        return
    _check_outside_srun(launch.distributed)
    if launch.distributed:
        if launch.device == "cpu" or not torch.cuda.is_available():
            raise ConfigError("--distributed spawns one process per GPU and no GPU is visible; "
                              "on CPUs use torchrun --nproc_per_node N -m rankclip.main")
        ids = launch.device_ids if launch.device_ids is not None else tuple(range(torch.cuda.device_count()))
        spawn(fn, launch, [resolve_device("gpu", i) for i in ids])
    else:
        device = resolve_device(launch.device, launch.device_id)
        configure_device(device)
        fn(Runtime(device=device))
