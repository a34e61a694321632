"""Real multi-process runs on the CPU with gloo, through torchrun and the CLI."""

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from rankclip.weights import read_checkpoint

pytestmark = pytest.mark.e2e

TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(data, logs, name, nproc, *extra):
    """`torchrun --nproc_per_node nproc -m rankclip.main ...`, or plain python for one process."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "rankclip.main"]
    if nproc == 1:
        launcher = [sys.executable, "-m", "rankclip.main"]
    return launcher + ["--train_data", str(data["train"]), "--model_name", "tiny-vit", "--logs_dir", str(logs),
                       "--name", name, "--num_workers", "0", "--batch_size", "32", "--epochs", "1",
                       "--lr", "1e-3", "--num_warmup_steps", "2", "--device", "cpu", *extra]


def run(cmd, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, **kwargs)


def relative_difference(a: dict, b: dict) -> float:
    num = sum((a[k].double() - b[k].double()).square().sum() for k in a)
    den = sum(a[k].double().square().sum() for k in a)
    return float((num / den).sqrt())


# The settings of the `runs` fixture's uninterrupted runs, which the tests below continue or compare with.
# A small lr: Adam turns float noise in gradients that are exactly 0 in exact arithmetic (the attention
# key bias) into ±lr steps, and the 1-vs-2-process comparison should see only noise. The gradient norm
# is clipped at every step (its norm is 10 to 20 there), so every comparison covers clipping too.
RUN_EXTRA = ["--validation_data", "{validation}", "--loss", "rankclip", "--rank_schedule", "constant", "--epochs", "2",
             "--lr", "5e-5", "--grad_clip_norm", "5"]
CLIP = 5.0


def run_life_command(colour_data, logs, name, nproc, *extra):
    settings = [a.format(validation=colour_data["validation"]) for a in RUN_EXTRA]
    return command(colour_data, logs, name, nproc, *settings, *extra)


def grad_norms(run_dir) -> list[float]:
    return [json.loads(line)["grad_norm"] for line in (run_dir / "steps.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(colour_data, tmp_path_factory):
    """The same training with one and with two processes (rankclip loss, a validation set, clipping)."""
    logs = tmp_path_factory.mktemp("dist")
    one = run(run_life_command(colour_data, logs, "one", 1))
    two = run(run_life_command(colour_data, logs, "two", 2))
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    return logs, two


def test_two_processes_take_the_same_steps_as_one(runs):
    logs, _ = runs
    one = read_checkpoint(logs / "one" / "checkpoints" / "epoch_2.pt")
    two = read_checkpoint(logs / "two" / "checkpoints" / "epoch_2.pt")
    assert one["step"] == two["step"] == 16
    start = read_checkpoint(logs / "one" / "checkpoints" / "epoch_1.pt")["state_dict"]
    assert relative_difference(one["state_dict"], start) > 1e-4  # training moved the weights
    assert relative_difference(one["state_dict"], two["state_dict"]) <= 1e-5


def test_clipping_sees_the_global_norm_whatever_the_number_of_processes(runs):
    """steps.jsonl's grad_norm (before clipping, every step) is the whole batch's on 2 processes as on 1:
    DDP has all-reduced the gradients before the norm is taken."""
    logs, _ = runs
    one, two = grad_norms(logs / "one"), grad_norms(logs / "two")
    assert len(one) == 16 and min(one) > CLIP  # clipped at every step
    assert two == pytest.approx(one, rel=1e-4)


def test_only_rank_zero_writes_and_logs_the_world(runs):
    logs, two = runs
    log = (logs / "two" / "output.log").read_text()
    assert "world size 2" in log and "per-process batch 16" in log
    lines = (logs / "two" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 5  # validation at epoch 0, then train + validation for two epochs


def test_resume_of_a_two_process_run(runs, colour_data):
    logs, _ = runs
    folder = logs / "resumed" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "epoch_latest.pt").write_bytes((logs / "two" / "checkpoints" / "epoch_1.pt").read_bytes())
    result = run(run_life_command(colour_data, logs, "resumed", 2, "--resume", "latest"))
    assert result.returncode == 0, result.stderr[-3000:]
    straight = read_checkpoint(logs / "two" / "checkpoints" / "epoch_2.pt")["state_dict"]
    resumed = read_checkpoint(folder / "epoch_2.pt")["state_dict"]
    assert relative_difference(straight, resumed) <= 1e-6


def test_a_checkpoint_from_an_epochs_last_step_resumes_on_another_world_size(runs, colour_data):
    """A stop at an epoch's last step saves steps_done = all of them; resumed on 2 processes from 1, no
    step is left and only rank 0 holds the epoch's sums: every rank must still sum the same keys."""
    logs, _ = runs
    checkpoint = read_checkpoint(logs / "one" / "checkpoints" / "epoch_1.pt")
    sums = {"loss": 2.0, "contrastive_loss": 1.5, "rank_loss": 8.0, "inmodal_rank_loss": 4.0,
            "crossmodal_rank_loss": 4.0}
    checkpoint.update(step=16, position={"epoch": 2, "steps_done": 8, "seen": 256},
                      ranks=[dict(checkpoint["ranks"][0], sums={k: 256 * v for k, v in sums.items()})])
    folder = logs / "last_step" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(checkpoint, folder / "epoch_latest.pt")
    extra = ["--validation_data", str(colour_data["validation"]), "--loss", "rankclip", "--rank_schedule",
             "constant", "--epochs", "2", "--lr", "5e-5", "--resume", "latest"]
    result = run(command(colour_data, logs, "last_step", 2, *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    train = [json.loads(line) for line in (logs / "last_step" / "results.jsonl").read_text().splitlines()
             if '"train"' in line]
    assert [r["epoch"] for r in train] == [2] and train[0]["step"] == 16
    assert {k: train[0][k] for k in sums} == pytest.approx(sums)


def test_two_processes_with_gradient_caching_take_the_large_batch_steps(runs, colour_data):
    """2 processes x 2 micro-batches of global batch 16 (DDP no_sync, gathers of cached features) = 1 x 32,
    clipped once per step, by the norm of the whole step's gradient."""
    logs, _ = runs
    cmd = run_life_command(colour_data, logs, "accumulated", 2, "--accum_freq", "2")
    cmd[cmd.index("--batch_size") + 1] = "16"
    result = run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    one = read_checkpoint(logs / "one" / "checkpoints" / "epoch_2.pt")
    accumulated = read_checkpoint(logs / "accumulated" / "checkpoints" / "epoch_2.pt")
    assert accumulated["step"] == 16
    assert relative_difference(one["state_dict"], accumulated["state_dict"]) <= 1e-5
    assert grad_norms(logs / "accumulated") == pytest.approx(grad_norms(logs / "one"), rel=1e-4)


def test_two_processes_train_from_shards(colour_data, colour_shards, tmp_path):
    cmd = command(dict(colour_data, train=colour_shards), tmp_path, "shards", 2, "--train_num_samples", "256",
                  "--num_workers", "1")
    result = run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = read_checkpoint(tmp_path / "shards" / "checkpoints" / "epoch_1.pt")
    assert checkpoint["step"] == 8 and checkpoint["config"]["dataset_type"] == "webdataset"


def test_bad_batch_size_fails_on_every_rank_without_hanging(colour_data, tmp_path):
    result = run(command(colour_data, tmp_path, "odd", 2, "--batch_size", "33"))
    assert result.returncode != 0
    assert result.stderr.count("--batch_size 33 is not divisible by the 2 processes") == 2


def default_sigint() -> None:
    """In the child before exec: SIGINT as a terminal's foreground job has it. A shell starts background
    jobs (`cmd &`, also a CI script run so) with SIGINT ignored, Python keeps an inherited SIG_IGN, and
    a run started that way rightly ignores Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_and_wait_for_training(cmd):
    """Start a run in its own session; return it once its log shows a training step."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True,
                            preexec_fn=default_sigint)
    deadline = time.time() + TIMEOUT
    for line in proc.stdout:
        if "epoch 1 [" in line or time.time() > deadline:
            break
    return proc


@pytest.mark.parametrize("nproc", [1, 2])
def test_ctrl_c_ends_every_rank_with_one_line(colour_data, tmp_path, nproc):
    name = f"interrupted{nproc}"
    proc = start_and_wait_for_training(command(colour_data, tmp_path, name, nproc, "--epochs", "50"))
    try:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, output[-3000:]
    assert output.count("interrupted; continue the run with --resume latest") == nproc, output[-3000:]
    if nproc == 1:
        assert proc.returncode == 130 and "Traceback" not in output
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", "--", f"--name {name}"], capture_output=True, text=True).stdout.split()
    assert left == [], "a rank outlived the run"


def test_a_dead_rank_ends_the_run(colour_data, tmp_path):
    proc = start_and_wait_for_training(command(colour_data, tmp_path, "killed", 2, "--epochs", "50"))
    try:
        workers = subprocess.run(["pgrep", "-f", "--", "--name killed"], capture_output=True, text=True).stdout.split()
        victims = [int(p) for p in workers if int(p) != proc.pid]
        assert victims, "no worker processes found"
        os.kill(max(victims), signal.SIGKILL)
        proc.wait(timeout=120)
        assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", "--", "--name killed"], capture_output=True, text=True).stdout.split()
    assert left == [], "a rank outlived the run"


def test_ranks_draw_their_own_masks_and_resume_them_exactly(colour_data, tmp_path):
    """Patch dropout 0.5 with 2 processes: each rank has its own RNG stream, saved and restored per rank
    (rank 0's validation moves its generator past the other ranks')."""
    extra = ["--model_name", "tiny-vit-patchdrop", "--epochs", "2", "--batch_size", "64", "--loss", "clip",
             "--validation_data", str(colour_data["validation"])]
    straight = run(command(colour_data, tmp_path, "straight", 2, *extra))
    assert straight.returncode == 0, straight.stderr[-3000:]
    folder = tmp_path / "resumed" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "epoch_latest.pt").write_bytes((tmp_path / "straight" / "checkpoints" / "epoch_1.pt").read_bytes())
    resumed = run(command(colour_data, tmp_path, "resumed", 2, *extra, "--resume", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = read_checkpoint(tmp_path / "straight" / "checkpoints" / "epoch_2.pt")["state_dict"]
    again = read_checkpoint(folder / "epoch_2.pt")["state_dict"]
    assert all(torch.equal(expected[k], again[k]) for k in expected), relative_difference(expected, again)
    first = read_checkpoint(tmp_path / "straight" / "checkpoints" / "epoch_1.pt")
    assert first["world_size"] == 2 and len(first["ranks"]) == 2
    assert not torch.equal(first["ranks"][0]["rng"]["torch"], first["ranks"][1]["rng"]["torch"])


# ---- Run life: kill -9 at a random step, preemption signals, resume on another number of processes.

def start_and_wait_for_step(cmd, run_dir, step, env=None, preexec_fn=None):
    """Start a run in its own session; return it once steps.jsonl shows optimizer step `step`."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env or dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True,
                            preexec_fn=preexec_fn)
    deadline = time.time() + TIMEOUT
    steps = run_dir / "steps.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if steps.is_file() and f'"step": {step},' in steps.read_text():
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the run never reached step {step}: {proc.communicate()[0][-3000:]}")


def kill_9_every_process(proc, name: str) -> None:
    """SIGKILL the launcher and every rank of run `name`: torchrun starts each worker in a session of its
    own, so killing the launcher's process group alone leaves the ranks running (and writing)."""
    ranks = subprocess.run(["pgrep", "-f", "--", f"--name {name}"], capture_output=True, text=True).stdout.split()
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in ranks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.time() + 60
    while subprocess.run(["pgrep", "-f", "--", f"--name {name}"], capture_output=True).returncode == 0:
        assert time.time() < deadline, f"a rank of {name} outlived SIGKILL"
        time.sleep(0.1)


def random_mid_epoch_step() -> int:
    """A step inside epoch 1 or 2 (8 steps each), drawn afresh every time (in-process runs seed `random`).

    From step 3 on, so that a step checkpoint is surely on disk when the kill comes (see below)."""
    return random.SystemRandom().choice([s for s in range(3, 15) if s != 8])


def weights(path):
    return read_checkpoint(path)["state_dict"]


def assert_bit_identical(expected, got, context):
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{context}: {different[:3]}, relative difference {relative_difference(expected, got)}"


@pytest.mark.parametrize("workers", ["0", "2"])
def test_kill_9_at_a_random_step_then_resume_is_bit_exact(runs, colour_data, workers):
    logs, _ = runs
    name, step = f"killed_w{workers}", random_mid_epoch_step()
    cmd = run_life_command(colour_data, logs, name, 1, "--num_workers", workers, "--save_every_steps", "1")
    proc = start_and_wait_for_step(cmd, logs / name, step)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    latest = read_checkpoint(logs / name / "checkpoints" / "epoch_latest.pt")
    # Step N is logged before its save is submitted, and the write of step N-1 may still be running then
    # (writes are in the background): the save of step N-2 is the newest one surely complete.
    assert latest["step"] >= step - 2, (step, latest["step"])
    resumed = run(cmd + ["--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if latest["position"] is not None:
        assert f"after step {latest['position']['steps_done']} of 8" in resumed.stdout
    assert_bit_identical(weights(logs / "one" / "checkpoints" / "epoch_2.pt"),
                         weights(logs / name / "checkpoints" / "epoch_2.pt"), f"killed at step {step}")
    train = [json.loads(line) for line in (logs / name / "results.jsonl").read_text().splitlines()]
    straight = [json.loads(line) for line in (logs / "one" / "results.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["split"]) for r in train] == [(r["epoch"], r["split"]) for r in straight]
    assert [r["loss"] for r in train] == pytest.approx([r["loss"] for r in straight], rel=1e-9)


def test_kill_9_inside_the_cooldown_then_resume_is_bit_exact(runs, colour_data):
    """--lr_scheduler const-cooldown, epoch 2 of 2 cooling down (power 2, to 1e-5): killed at a random step
    of the cooldown and resumed, the run ends with the uninterrupted run's weights, bit for bit, and every
    step's lr is the schedule's."""
    logs, _ = runs
    schedule = ["--lr_scheduler", "const-cooldown", "--epochs_cooldown", "1", "--lr_cooldown_end", "1e-5",
                "--lr_cooldown_power", "2"]
    straight = run(run_life_command(colour_data, logs, "cooldown", 1, *schedule))
    assert straight.returncode == 0, straight.stderr[-3000:]
    # Steps 9..16 cool down; the newest complete save at a kill after step N is N-2 or later (see above).
    step = random.SystemRandom().choice(range(11, 16))
    cmd = run_life_command(colour_data, logs, "cooldown_killed", 1, *schedule, "--save_every_steps", "1")
    proc = start_and_wait_for_step(cmd, logs / "cooldown_killed", step)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    resumed = run(cmd + ["--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and " of 8, step " in resumed.stdout  # inside epoch 2
    assert_bit_identical(weights(logs / "cooldown" / "checkpoints" / "epoch_2.pt"),
                         weights(logs / "cooldown_killed" / "checkpoints" / "epoch_2.pt"), f"killed at step {step}")
    config = read_checkpoint(logs / "cooldown" / "checkpoints" / "epoch_2.pt")["config"]
    stored = {"lr_scheduler": "const-cooldown", "epochs_cooldown": 1, "lr_cooldown_end": 1e-5, "lr_cooldown_power": 2.0,
              "grad_clip_norm": CLIP, "zeroshot_frequency": 1, "val_frequency": 1}
    assert {key: config[key] for key in stored} == stored
    params = (logs / "cooldown" / "params.txt").read_text().splitlines()
    assert {f"{key}: {value}" for key, value in stored.items()} <= set(params)
    # Warmup 2 steps to 5e-5, constant, then the cooldown over optimizer steps 8..15 (record N: step N-1).
    expected = [2.5e-5, 5e-5] + [5e-5] * 6 + [1e-5 + 4e-5 * (1 - k / 7) ** 2 for k in range(8)]
    for name in ("cooldown", "cooldown_killed"):
        records = [json.loads(line) for line in (logs / name / "steps.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, 17))
        assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-12)


def test_two_processes_killed_resume_on_two_exactly_and_on_one_within_float_precision(runs, colour_data):
    logs, _ = runs
    step = random_mid_epoch_step()
    cmd = run_life_command(colour_data, logs, "killed2", 2, "--save_every_steps", "1")
    proc = start_and_wait_for_step(cmd, logs / "killed2", step)
    kill_9_every_process(proc, "killed2")
    shutil.copytree(logs / "killed2", logs / "shrunk")
    again = run(cmd + ["--resume", "latest"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert_bit_identical(weights(logs / "two" / "checkpoints" / "epoch_2.pt"),
                         weights(logs / "killed2" / "checkpoints" / "epoch_2.pt"), f"killed at step {step}")
    one = run(run_life_command(colour_data, logs, "shrunk", 1, "--resume", "latest"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert one.stdout.count("world size changed: the checkpoint was written by 2 processes, this run has 1") == 1
    difference = relative_difference(weights(logs / "one" / "checkpoints" / "epoch_2.pt"),
                                     weights(logs / "shrunk" / "checkpoints" / "epoch_2.pt"))
    assert difference <= 1e-5, (step, difference)


def signal_through_the_save(proc, pids, stop, latest) -> str:
    """Send `stop` to the first of `pids`, then to all of them every 50 ms until `latest` (absent
    before) is written, so also during the save; then wait for the run to end."""
    assert not latest.exists()
    os.kill(pids[0], stop)
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # a rank that has handed over its state may be gone
                os.kill(pid, stop)
    return proc.communicate(timeout=120)[0]


@pytest.mark.parametrize("stop", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_a_stop_signal_saves_and_the_same_command_continues_exactly(runs, colour_data, stop):
    """One process: --resume auto starts the run, the signal stops it after a save (exit 75), and the
    same command continues it (the SIGUSR1 case is checked against the uninterrupted run)."""
    logs, _ = runs
    name = f"stopped_{stop.name}"
    cmd = run_life_command(colour_data, logs, name, 1, "--resume", "auto")
    proc = start_and_wait_for_step(cmd, logs / name, 3)
    output = signal_through_the_save(proc, [proc.pid], stop, logs / name / "checkpoints" / "epoch_latest.pt")
    assert proc.returncode == 75, output[-3000:]
    assert output.count(f"stopped by {stop.name} after saving a checkpoint") == 1 and "Traceback" not in output
    latest = read_checkpoint(logs / name / "checkpoints" / "epoch_latest.pt")
    done = latest["position"]["steps_done"]
    assert 3 <= done <= 8 and latest["step"] == done  # it finished the step it was in, then saved
    if stop == signal.SIGUSR1:
        resumed = run(cmd)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert_bit_identical(weights(logs / "one" / "checkpoints" / "epoch_2.pt"),
                             weights(logs / name / "checkpoints" / "epoch_2.pt"), f"stopped after step {done}")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_to_one_rank_stops_every_rank_with_a_checkpoint(runs, colour_data, stop):
    logs, _ = runs
    name = f"stopped2_{stop.name}"
    proc = start_and_wait_for_step(run_life_command(colour_data, logs, name, 2), logs / name, 3)
    try:
        workers = subprocess.run(["pgrep", "-f", "--", f"--name {name}"], capture_output=True, text=True).stdout.split()
        ranks = sorted(int(p) for p in workers if int(p) != proc.pid)
        assert len(ranks) >= 2, workers
        output = signal_through_the_save(proc, ranks[::-1], stop, logs / name / "checkpoints" / "epoch_latest.pt")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert output.count("after saving a checkpoint") == 2 and f"stopped by {stop.name}" in output, output[-3000:]
    latest = read_checkpoint(logs / name / "checkpoints" / "epoch_latest.pt")
    assert latest["world_size"] == 2 and latest["position"]["steps_done"] >= 3
    assert [p.name for p in (logs / name / "checkpoints").iterdir() if p.name.startswith(".")] == []


def evaluation(data, logs, name, nproc, checkpoint, *extra):
    """An evaluation-only run of `checkpoint`; returns its results.json records."""
    cmd = command(data, logs, name, nproc, "--checkpoint", str(checkpoint), *extra)
    at = cmd.index("--train_data")
    del cmd[at:at + 2]
    result = run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((logs / name / "results.json").read_text())


@pytest.mark.parametrize("kind", ["zero-shot", "linear-probe"])
def test_two_processes_share_evaluation_with_the_one_process_results(runs, colour_data, kind):
    """Each rank encodes its block of every set and the features are gathered: the records of a 2-process
    evaluation-only run are those of 1 process, to float rounding (the counts exactly). Rank 0 encodes
    only half of each set, so equal sample counts also show that rank 1 did the other half."""
    logs, _ = runs
    checkpoint = logs / "one" / "checkpoints" / "epoch_2.pt"
    sets = ["--eval_data_type", "ImageNet1K", "--eval_test_data_dir", str(colour_data["zeroshot"])]
    if kind == "zero-shot":
        extra = [*sets, "--validation_data", str(colour_data["validation"]), "--retrieval_data",
                 str(colour_data["validation"])]
    else:
        extra = [*sets, "--linear_probe", "--eval_train_data_dir", str(colour_data["zeroshot"]),
                 "--linear_probe_num_epochs", "4"]
    one, two = (evaluation(colour_data, logs, f"{kind}{n}", n, checkpoint, *extra) for n in (1, 2))
    desc = "zero-shot ImageNet1K" if kind == "zero-shot" else "probe ImageNet1K train"
    assert f"{desc}: 32 of 64 images encoded by this process" in (logs / f"{kind}2" / "output.log").read_text()
    assert [r["split"] for r in one] == [r["split"] for r in two]
    assert {r["split"] for r in one} == ({"validation", "eval", "retrieval"} if kind == "zero-shot" else {"eval"})
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
            else:
                assert b[key] == value, key


def test_two_processes_share_clip_benchmark_sets_with_the_figures_of_the_labels_csv_layout(runs, colour_data, tmp_path):
    """clip_benchmark folders under a free set name (zero-shot) and for retrieval (several captions per image),
    beside the same data as a labels.csv folder and a CSV, in one 2-process evaluation with 2 loader workers a
    process: each rank streams its half of each set, and the gathered figures of the two layouts are equal
    (each rank encodes the same images in the same batches in either layout)."""
    from test_benchmark_sets import write_benchmark_pair, write_retrieval_pair

    logs, _ = runs
    (bench, plain), (bench_captions, captions_csv) = write_benchmark_pair(tmp_path), write_retrieval_pair(tmp_path)
    extra = ["--eval_data_type", "wds_colours", "ImageNet1K", "--eval_test_data_dir", str(bench), str(plain),
             "--retrieval_data", str(bench_captions), str(captions_csv), "--num_workers", "2"]
    records = evaluation(colour_data, logs, "bench2", 2, logs / "one" / "checkpoints" / "epoch_2.pt", *extra)
    assert "zero-shot wds_colours: 12 of 24 images encoded by this process" in (logs / "bench2" / "output.log").read_text()
    (ours, theirs), (our_retrieval, their_retrieval) = ([r for r in records if r["split"] == split]
                                                        for split in ("eval", "retrieval"))
    assert (ours.pop("eval_data_type"), theirs.pop("eval_data_type")) == ("wds_colours", "ImageNet1K")
    assert ours == theirs and ours["num_samples"] == 24
    assert (our_retrieval.pop("retrieval_data"), their_retrieval.pop("retrieval_data")) == (
        "wds_colour_captions", "colour_captions")
    assert our_retrieval == their_retrieval and our_retrieval["num_captions"] == 36


# ---- Save before evaluating: a kill or a stop signal during an evaluation loses no training.

class HeldImage:
    """A validation "image" that is a named pipe: each evaluation's read waits in open() until `serve`
    opens the writing end, and then reads nothing (an unreadable image, skipped). So the test knows
    when a run is inside an evaluation, holds it there, and acts (`act`, before the n-th read is
    released, n counted from 1) before letting it go on."""

    def __init__(self, path):
        self.path = path
        os.mkfifo(path)

    def reader_waits(self):
        """Whether a reader has the pipe open (opening its writing end without blocking fails otherwise)."""
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
            return True
        except OSError:
            return False

    def serve(self, proc, act=None, at=0):
        """Release every read until `proc` ends; returns how many there were."""
        reads = 0
        while proc.poll() is None:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)  # fails (ENXIO) until a reader waits
            except OSError:
                time.sleep(0.02)
                continue
            reads += 1
            if reads == at:
                act()
                time.sleep(0.5)  # the handler runs (it only sets a flag) while the read still waits
            os.close(fd)  # the reader reads the end of the file
            while proc.poll() is None and self.reader_waits():  # until it has closed the pipe
                time.sleep(0.02)
        return reads


def evaluated_run(colour_data, logs, name, held):
    """Validation (held at each evaluation) then zero-shot; 2 epochs of 4 steps; the best epoch by zero-shot."""
    header, *rows = colour_data["validation"].read_text().splitlines()
    rows = [f"{colour_data['root'] / r.split(',')[0]},{r.split(',', 1)[1]}" for r in rows]
    validation = logs / f"{name}_validation.csv"
    validation.write_text("\n".join([header, *rows[:32], f"{held.path},a picture that keeps us waiting"]) + "\n")
    return command(colour_data, logs, name, 1, "--validation_data", str(validation), "--eval_data_type", "ImageNet1K",
                   "--eval_test_data_dir", str(colour_data["zeroshot"]), "--best_metric",
                   "eval/ImageNet1K/zeroshot_top1", "--batch_size", "64", "--epochs", "2", "--resume", "auto")


def served(cmd, held, act=None, at=0):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    try:
        reads = held.serve(proc, (lambda: act(proc)) if act else None, at)
        return proc.communicate(timeout=TIMEOUT)[0], proc.returncode, reads
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def results_of(run_dir):
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(colour_data, tmp_path_factory):
    """The uninterrupted run of `evaluated_run`, and its held image."""
    logs = tmp_path_factory.mktemp("evaluated")
    held = HeldImage(logs / "held.png")
    output, code, reads = served(evaluated_run(colour_data, logs, "straight", held), held)
    assert code == 0 and reads == 3, output[-3000:]  # evaluations after epochs 0, 1, 2
    return logs, held


@pytest.mark.parametrize("stop", [signal.SIGUSR1, signal.SIGKILL], ids=["SIGUSR1", "kill-9"])
def test_a_stop_or_kill_during_evaluation_loses_no_training_and_the_resume_evaluates_that_epoch(
        colour_data, straight, stop):
    """Epoch 1's training is on disk before its evaluation starts. SIGUSR1 during its validation ends
    the run before zero-shot (exit 75, nothing trained again); kill -9 there loses nothing either. The
    same command then evaluates epoch 1 and trains epoch 2: the records, the best epoch and the weights
    are those of an uninterrupted run (bit for bit)."""
    tmp_path, held = straight
    cmd = evaluated_run(colour_data, tmp_path, f"stopped_{stop.name}", held)
    output, code, _ = served(cmd, held, act=lambda proc: os.kill(proc.pid, stop), at=2)
    run_dir = tmp_path / f"stopped_{stop.name}"
    latest = read_checkpoint(run_dir / "checkpoints" / "epoch_latest.pt")
    assert latest["epoch"] == 0 and latest["step"] == 4 and latest["position"]["steps_done"] == 4
    assert not (run_dir / "checkpoints" / "epoch_1.pt").exists()
    cut = [(r["epoch"], r["split"]) for r in results_of(run_dir)]
    if stop == signal.SIGUSR1:
        assert code == 75 and output.count("stopped by SIGUSR1 after saving a checkpoint") == 1, output[-3000:]
        assert cut[-2:] == [(1, "train"), (1, "validation")]  # zero-shot never started
    else:
        assert code == -signal.SIGKILL and cut[-1] == (1, "train")
    again, code, reads = served(cmd, held)
    assert code == 0 and reads == 2, again[-3000:]  # epoch 1 again, then epoch 2
    assert "resumed from" in again and "after step 4 of 4" in again and "epoch 1 [" not in again  # not retrained
    expected, got = results_of(tmp_path / "straight"), results_of(run_dir)
    assert [(r["epoch"], r["split"]) for r in got] == [(r["epoch"], r["split"]) for r in expected]
    timing = {"samples_per_second", "samples_per_second_per_process"}
    for want, have in zip(expected, got):
        assert {k: v for k, v in have.items() if k not in timing} == {k: v for k, v in want.items() if k not in timing}
    assert_bit_identical(weights(tmp_path / "straight" / "checkpoints" / "epoch_2.pt"),
                         weights(run_dir / "checkpoints" / "epoch_2.pt"), f"{stop.name} during evaluation")
    best = [read_checkpoint(folder / "checkpoints" / "epoch.best.pt") for folder in (tmp_path / "straight", run_dir)]
    assert (best[1]["epoch"], best[1]["best_value"]) == (best[0]["epoch"], best[0]["best_value"])


def test_a_stop_during_the_evaluation_before_training_saves_nothing_and_the_same_command_starts_again(
        colour_data, straight):
    tmp_path, held = straight
    cmd = evaluated_run(colour_data, tmp_path, "stopped_at_0", held)
    output, code, _ = served(cmd, held, act=lambda proc: os.kill(proc.pid, signal.SIGUSR1), at=1)
    assert code == 75 and output.count("stopped by SIGUSR1 before training, with nothing to save") == 1, output[-3000:]
    run_dir = tmp_path / "stopped_at_0"
    assert [(r["epoch"], r["split"]) for r in results_of(run_dir)] == [(0, "validation")]
    assert not list((run_dir / "checkpoints").glob("*.pt"))
    again, code, _ = served(cmd, held)
    assert code == 0, again[-3000:]
    expected = results_of(tmp_path / "straight")
    assert [(r["epoch"], r["split"]) for r in results_of(run_dir)] == [(r["epoch"], r["split"]) for r in expected]
