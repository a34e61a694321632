"""Each process's own state in a checkpoint: its random generators (and the trainer's per-rank sums).

Model randomness (dropout, patch dropout) is drawn from the process's CPU generator and its
own GPU's generator, seeded by (seed, rank), so the rows of different ranks draw different
masks; data randomness is keyed by (seed, epoch, sample index) elsewhere and is not touched
here. A checkpoint holds `world_size` and `ranks`, a list with one dict per rank:
{"rng": {"torch", "python"[, "cuda"]}, ...}. Rank 0 gathers them over a CPU (gloo) group
before it writes; on resume each rank takes its own entry back. When the number of
processes changed, no entry belongs to a rank: every rank is re-seeded from (seed, rank,
step) instead, which is deterministic but not the uninterrupted run's stream.
"""

from __future__ import annotations

from .errors import CheckpointError

import random
from typing import Any, Optional

import torch
import torch.distributed as dist



def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A distinct seed for every (run seed, rank, step)."""
    return ((seed * 1_000_003 + rank) * 10_000_019 + step + 1) % (2**63)


def seed_rank(seed: int, rank: int, step: int = 0) -> None:
    """Seed this process's model randomness (torch CPU and GPU generators, Python's random)."""
    value = rank_seed(seed, rank, step)
    torch.manual_seed(value)
    random.seed(value)


def capture_rng(device: torch.device) -> dict:
    """This process's generators: the CPU's, Python's, and its own GPU's (never the other GPUs')."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device, rank: int) -> None:
    """Put back what `capture_rng` took; a state that does not fit is one ConfigError line."""
    try:
        torch.set_rng_state(state["torch"])
        random.setstate(_as_tuple(state["python"]))
        if device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], device)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"the checkpoint's random state of rank {rank} cannot be restored "
                          f"({type(e).__name__}: {e}); resume from an epoch checkpoint epoch_<N>.pt") from e


def _as_tuple(value: Any) -> Any:
    """torch.load returns Python's random state with lists where tuples were."""
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    return value


def cpu_group() -> Optional[dist.ProcessGroup]:
    """A gloo group for small CPU objects (None: the default group, when it is gloo or absent).
    Collective: every rank calls it at the same point."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def gather_rank_states(state: dict, group: Optional[dist.ProcessGroup]) -> Optional[list[dict]]:
    """Every rank's `state`, in rank order, on rank 0 (None on the others). Every rank must call it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    states = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(state, states, dst=0, group=group)
    return states


def saved_rank_states(obj: dict) -> tuple[int, list[dict]]:
    """(world size, per-rank states) of a checkpoint. This project's checkpoints before per-rank
    states held one "rng" (rank 0's): read as a one-process run's. Foreign checkpoints: (0, [])."""
    if "ranks" in obj:
        return int(obj["world_size"]), list(obj["ranks"])
    if isinstance(obj.get("rng"), dict):
        old = {k: v for k, v in obj["rng"].items() if k in ("torch", "python")}
        return 1, [{"rng": old}]
    return 0, []
