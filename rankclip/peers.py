"""The heartbeat between a run's processes, and a barrier without a time limit, both through the rendezvous store."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, Optional

import torch.distributed as dist

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
