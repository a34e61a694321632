"""The heartbeat between a run's processes, and a barrier without a time limit, both through the rendezvous store."""

from __future__ import annotations

import os
import secrets
import sys
import threading
import time
from typing import Callable, Optional

import torch.distributed as dist

PEER_POLL_SECONDS = 1.0
PEER_SILENCE_SECONDS = 30.0  # a rank whose watcher has not ticked for this long is taken for dead
STOP_NOTICE_SECONDS = 5.0  # how long a rank that lost the store waits for a stop signal to reach its main thread
FAILED_KEY = "failed"


def launch_token() -> str:
    """A name for this launch's keys in the rendezvous store, the same on every rank: rank 0's, sent
    over the process group (a collective). torchrun keeps its store across --max_restarts, so fixed
    names would show a restarted attempt the failed one's `failed` key and barrier counts; torchrun's
    restart count is no such name, as the agents of different nodes may count restarts differently."""
    token = [secrets.token_hex(8)]
    dist.broadcast_object_list(token, src=0)
    return token[0]


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
    The keys live under `token` (launch_token), new for each launch.

    A rank that is stopping (`stopping`: a stop signal arrived, it saves and exits with its code)
    does without the store: torchrun's agent, which holds it there, may die of the same signal
    (SIGUSR1 unless torchrun handles it), and the save must not be cut short by it.
    """

    def __init__(self, store: dist.Store, rank: int, world: int, token: str) -> None:
        self.store, self.rank, self.world = dist.PrefixStore(f"rankclip/{token}", store), rank, world
        self.barriers = 0
        self.stopping = False  # set by the stop-signal handler (SavePoints), read by the watcher thread
        self.done = threading.Event()  # set when this rank stops watching: failed, finished, or stopping storeless
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
        """The store's answer, or None once it cannot be reached: a rank that is neither done nor
        stopping then ends, after giving a stop signal that killed the store's host (torchrun's
        agent) STOP_NOTICE_SECONDS to reach this rank's main thread, which may be inside a step."""
        try:
            return question()
        except RuntimeError:
            deadline = time.monotonic() + STOP_NOTICE_SECONDS
            while not (self.done.is_set() or self.stopping) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not (self.done.is_set() or self.stopping):
                self._end("the run's store (in rank 0, or in torchrun's agent) is gone")
            self.done.set()
            return None

    def _end(self, reason: str) -> None:
        if not self.done.is_set():
            print(f"rankclip: error: [rank {self.rank}] {reason}; ending this rank", file=sys.stderr, flush=True)
            os._exit(1)

    def barrier(self) -> None:
        """Wait until every rank has called barrier as often as this one, with no time limit."""
        self.barriers += 1
        key = f"barrier{self.barriers}"
        self._ask(lambda: self.store.add(key, 1))
        self._wait_until(lambda: self._count(key) >= self.world)

    def _count(self, key: str) -> int:
        """A barrier's count; without the store (a stopping rank) there is nobody left to wait for."""
        count = self._ask(lambda: self.store.add(key, 0))
        return self.world if count is None else count

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
