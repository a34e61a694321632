"""When a run saves mid-epoch and when it stops: every N steps, every M minutes, on SIGTERM or SIGUSR1.

Rank 0's clock decides the timed saves; a signal may reach any rank (Slurm's `--signal=USR1@120`,
Kubernetes' SIGTERM before a kill, torchrun forwarding its own SIGTERM). At every step boundary
the ranks combine their flags in one all-reduce of two integers over a CPU (gloo) group, so every
rank saves at the same step and all stop together, after the save, with exit code EXIT_PREEMPTED.
The handler only sets a flag: a second signal during the save changes nothing, and the files
are written atomically whatever happens. SIGINT (Ctrl-C) keeps Python's KeyboardInterrupt.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

from .peers import Peers

EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped after saving; the same command continues the run
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def save_interval_minutes(requested: Optional[float], device: torch.device) -> float:
    """--save_every_minutes, by default 30 on GPUs (hours per epoch) and off on CPUs (the demo)."""
    if requested is not None:
        return requested
    return 30.0 if device.type == "cuda" else 0.0


class Preempted(Exception):
    """Raised on every rank once the checkpoint that a stop signal asked for is written (`saved`), or
    when there was nothing to save: a stop during the evaluation before training."""

    def __init__(self, signal_name: str, saved: bool = True) -> None:
        super().__init__(signal_name)
        self.signal_name, self.saved = signal_name, saved


class SavePoints:
    """Decides, at each step boundary and identically on every rank, whether to save and whether to stop."""

    def __init__(self, every_steps: int, every_minutes: float, world_size: int, is_main: bool,
                 group: Optional[dist.ProcessGroup], peers: Optional[Peers] = None) -> None:
        self.every_steps, self.every_seconds = every_steps, every_minutes * 60
        self.world_size, self.is_main, self.group, self.peers = world_size, is_main, group, peers
        self.signal_name: Optional[str] = None
        self.last_save = time.monotonic()
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Catch SIGTERM and SIGUSR1 (only the main thread may install handlers)."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        """Put back the handlers that install replaced (a no-op after `ignore`)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def ignore(self) -> None:
        """Ignore further stop signals: the process is ending after its checkpoint. (Python puts the
        default handlers back while it shuts down, but leaves ignored signals ignored.)"""
        if self._previous:
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
            self._previous.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signal_name = signal.Signals(signum).name
        self._stopping()

    def _stopping(self) -> None:
        """Tell Peers that this rank now saves and stops: it needs the store no longer (see Peers)."""
        if self.peers is not None:
            self.peers.stopping = True

    def at_step(self, step: int, may_save: bool = True) -> tuple[bool, bool]:
        """(save now, stop after saving), agreed by all ranks. Collective when there are several."""
        due = may_save and self.is_main and (
            (self.every_steps > 0 and step % self.every_steps == 0)
            or (self.every_seconds > 0 and time.monotonic() - self.last_save >= self.every_seconds))
        stop = self.signal_name is not None
        if self.world_size > 1:
            flags = torch.tensor([int(due), int(stop)], dtype=torch.int32)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
            due, stop = bool(flags[0]), bool(flags[1])
        if stop:
            self._stopping()
        return due or stop, stop

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def stop_reason(self) -> str:
        """The signal that stopped this rank, or the one another rank received."""
        return self.signal_name or "a signal to another rank"
