"""Per-rank random state: each rank's own generators, its own GPU only, one-line errors."""

import random

import pytest
import torch

from rankclip.errors import CheckpointError
from rankclip.resume import restore_rank_state
from rankclip.runtime import Runtime
from rankclip.rankstate import capture_rng, rank_seed, restore_rng, saved_rank_states, seed_rank


def test_every_rank_and_step_gets_its_own_seed():
    seeds = {rank_seed(seed, rank, step) for seed in range(3) for rank in range(8) for step in (0, 1, 1000)}
    assert len(seeds) == 3 * 8 * 3


def test_own_gpu_state_only(monkeypatch):
    """A rank on cuda:3 saves and restores cuda:3's generator, so a checkpoint of an 8-GPU run
    resumes where fewer GPUs are visible (the old get/set_rng_state_all raised IndexError)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or torch.ones(4))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", device)))
    device = torch.device("cuda", 3)
    state = capture_rng(device)
    restore_rng(state, device, rank=3)
    assert calls == [("get", device), ("set", device)]
    assert torch.equal(state["cuda"], torch.ones(4))


def test_restore_gives_back_the_cpu_streams():
    seed_rank(5, 1)
    state = capture_rng(torch.device("cpu"))
    expected = torch.rand(3), random.random()
    torch.manual_seed(99), random.seed(99)
    restore_rng(state, torch.device("cpu"), rank=1)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_a_damaged_state_is_one_line():
    with pytest.raises(CheckpointError, match="random state of rank 2 cannot be restored.*epoch_<N>.pt"):
        restore_rng({"torch": torch.zeros(3, dtype=torch.uint8), "python": (3, (), None)}, torch.device("cpu"), 2)


def test_each_rank_takes_its_own_state_and_another_world_size_re_seeds(capsys):
    from rankclip.logger import setup_console_logging

    setup_console_logging(0)
    states = []
    for rank in range(2):
        seed_rank(0, rank)
        states.append({"rng": capture_rng(torch.device("cpu"))})
    checkpoint = {"world_size": 2, "ranks": states}
    restore_rank_state(checkpoint, Runtime(rank=1, world_size=2), seed=0, step=7)
    assert torch.equal(torch.get_rng_state(), states[1]["rng"]["torch"])
    restore_rank_state(checkpoint, Runtime(rank=0, world_size=1), seed=0, step=7)
    re_seeded = torch.get_rng_state()
    seed_rank(0, 0, 7)
    assert torch.equal(re_seeded, torch.get_rng_state())
    assert not any(torch.equal(re_seeded, s["rng"]["torch"]) for s in states)
    lines = [line for line in capsys.readouterr().out.splitlines() if "world size changed" in line]
    assert len(lines) == 1 and "2 processes" in lines[0] and "this run has 1" in lines[0]


def test_older_and_foreign_checkpoints():
    old = {"rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": [torch.zeros(1)]}}
    world, states = saved_rank_states(old)
    assert world == 1 and set(states[0]["rng"]) == {"torch", "python"}
    assert saved_rank_states({"epoch": 3, "state_dict": {}}) == (0, [])


def test_the_partial_epoch_sums_move_to_rank_zero_when_the_world_shrinks():
    """Per-rank loss sums S_r of W ranks give the epoch mean sum(S_r)/W over seen samples; on W' ranks
    rank 0 takes sum(S_r)·W'/W, so that the mean over the new ranks is unchanged."""
    states = [{"rng": capture_rng(torch.device("cpu")), "sums": {"loss": 8.0}, "failed": ["a.jpg"]},
              {"rng": capture_rng(torch.device("cpu")), "sums": {"loss": 4.0}, "failed": ["b.jpg"]}]
    checkpoint = {"world_size": 2, "ranks": states}
    own = restore_rank_state(checkpoint, Runtime(rank=0, world_size=1), seed=0, step=3)
    assert own == {"sums": {"loss": 6.0}, "failed": ["a.jpg", "b.jpg"]}
    assert restore_rank_state(checkpoint, Runtime(rank=1, world_size=3), seed=0, step=3) == {"sums": {"loss": 0.0}}
    assert restore_rank_state(checkpoint, Runtime(rank=1, world_size=2), seed=0, step=3)["sums"] == {"loss": 4.0}


def test_every_rank_sums_the_same_keys_after_the_world_size_changed():
    """A checkpoint written at an epoch's last step, resumed on another number of processes: no step
    is left, and the epoch's all-reduce of the sums needs the same keys, in the same order, on every rank."""
    sums = {"loss": 8.0, "contrastive_loss": 6.0, "rank_loss": 2.0}
    checkpoint = {"world_size": 2, "ranks": [{"rng": capture_rng(torch.device("cpu")), "sums": sums}] * 2}
    owns = [restore_rank_state(checkpoint, Runtime(rank=rank, world_size=3), seed=0, step=8) for rank in range(3)]
    assert [list(own["sums"]) for own in owns] == [sorted(sums)] * 3
    assert sum(own["sums"]["loss"] for own in owns) / 3 == pytest.approx(8.0)  # the old mean over ranks
