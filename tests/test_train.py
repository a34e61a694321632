import json
import math
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from open_clip_train.scheduler import const_lr, const_lr_cooldown, cosine_lr

from rankclip.errors import ConfigError, DataError
from rankclip.checkpoint import Checkpointer, TrainState
from rankclip.config import (LR_SCHEDULERS, CheckpointsConfig, Config, EvaluationConfig, ObjectiveConfig, OptimConfig,
                             RunConfig, TrainingConfig, parse_config)
from rankclip.evaluate import EvalTasks, Evaluator, RetrievalTask, ZeroShotTask
from rankclip.report import build_report
from rankclip.weights import read_checkpoint
from rankclip.runtime import Runtime
from rankclip.logger import RunLogger
from rankclip.losses import RankWeightSchedule, build_loss
from rankclip.optim import build_optimizer
from rankclip.precision import CPU_AMP_ENV, build_scaler
from rankclip.resume import ResumePoint, restore_rank_state
from rankclip.train import MAX_LOGIT_SCALE, LrSchedule, FailureCounter, Schedules, Trainer, lr_schedule


def test_schedule_warms_up_from_step_zero_and_ends_at_zero():
    schedule = LrSchedule(base_lr=1.0, warmup_steps=10, total_steps=111)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(110) == 0.0
    assert schedule(60) == pytest.approx(0.5)  # halfway through the decay
    decay = [schedule(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_schedule_with_warmup_longer_than_the_run():
    schedule = LrSchedule(base_lr=2.0, warmup_steps=10_000, total_steps=5)
    values = [schedule(s) for s in range(5)]
    assert values[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert values[-1] == 0.0
    assert LrSchedule(1.0, 0, 1)(0) == 1.0  # a one-step run still learns


def test_schedule_without_warmup_is_pure_cosine():
    schedule = LrSchedule(base_lr=1.0, warmup_steps=0, total_steps=5)
    expected = [0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(5)]
    assert [schedule(s) for s in range(5)] == pytest.approx(expected)


@pytest.mark.parametrize("warmup", [0, 3, 10])
def test_each_schedule_is_open_clip_trains_ended_one_step_later(warmup):
    """open_clip_train's schedules (its own code), given one step and one cooldown step fewer: ours reach
    their end (0, the cooldown's end lr) at the last step, where open_clip_train's stop one step short."""
    total, cooldown, base, end, power = 40, 12, 2.0, 0.1, 2.0
    optimizer = SimpleNamespace(param_groups=[{}])  # what open_clip_train's schedules write the lr into
    theirs = {"cosine": cosine_lr(optimizer, base, warmup, total - 1),
              "const": const_lr(optimizer, base, warmup, total - 1),
              "const-cooldown": const_lr_cooldown(optimizer, base, warmup, total - 1, cooldown - 1, power, end)}
    assert set(theirs) == set(LR_SCHEDULERS)
    for kind, adjust in theirs.items():
        ours = LrSchedule(base, warmup, total, kind, cooldown_steps=cooldown, cooldown_end=end, cooldown_power=power)
        assert [ours(s) for s in range(total)] == pytest.approx([adjust(s) for s in range(total)], rel=1e-12), kind


def test_const_and_const_cooldown_step_by_step():
    const = LrSchedule(1.0, 4, 20, "const")
    assert [const(s) for s in range(20)] == pytest.approx([0.25, 0.5, 0.75] + [1.0] * 17)
    cooldown = LrSchedule(1.0, 4, 20, "const-cooldown", cooldown_steps=6, cooldown_end=0.1, cooldown_power=2.0)
    expected = [0.25, 0.5, 0.75] + [1.0] * 11 + [0.1 + 0.9 * (1 - k / 5) ** 2 for k in range(6)]
    assert [cooldown(s) for s in range(20)] == pytest.approx(expected)
    assert cooldown(19) == 0.1
    linear = LrSchedule(1.0, 0, 10, "const-cooldown", cooldown_steps=5)
    assert [linear(s) for s in range(10)] == pytest.approx([1.0] * 6 + [0.75, 0.5, 0.25, 0.0])


def test_warmup_applies_to_each_schedule_also_longer_than_the_run():
    """The warmup ends at the last-but-one step, as the cosine's does; a cooldown that began inside the warmup
    continues from there at its own progress."""
    assert [LrSchedule(2.0, 10_000, 5, "const")(s) for s in range(5)] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0])
    inside = LrSchedule(1.0, 6, 10, "const-cooldown", cooldown_steps=8)  # the cooldown starts at step 2
    assert [inside(s) for s in range(10)] == pytest.approx([(s + 1) / 6 for s in range(6)] + [3 / 7, 2 / 7, 1 / 7, 0])
    assert LrSchedule(1.0, 0, 1, "const-cooldown", cooldown_steps=1)(0) == 0.0  # the cooldown's end
    assert LrSchedule(1.0, 0, 1, "const")(0) == 1.0


def test_the_cooldown_covers_the_last_epochs():
    """--epochs_cooldown 2 of 5 epochs of 4 steps: steps 12..19 cool down (open_clip_train's cooldown_steps)."""
    optim = OptimConfig(lr=1.0, num_warmup_steps=0, lr_scheduler="const-cooldown", epochs_cooldown=2,
                        lr_cooldown_end=0.2, lr_cooldown_power=1.0)
    schedule = lr_schedule(optim, epochs=5, steps_per_epoch=4)
    assert (schedule.total_steps, schedule.cooldown_steps) == (20, 8)
    assert [schedule(s) for s in range(20)] == pytest.approx([1.0] * 13 + [1.0 - 0.8 * k / 7 for k in range(1, 8)])
    assert lr_schedule(OptimConfig(lr=1.0, num_warmup_steps=2), 5, 4) == LrSchedule(1.0, 2, 20)  # the default


@pytest.mark.parametrize("flags, message", [
    (["--lr_scheduler", "const-cooldown"], "needs --epochs_cooldown"),
    (["--lr_scheduler", "const-cooldown", "--epochs_cooldown", "3", "--epochs", "2"], "longer than the run"),
    (["--epochs_cooldown", "0"], "--epochs_cooldown must be positive"),
    (["--lr_cooldown_power", "0"], "--lr_cooldown_power must be positive"),
    (["--lr_cooldown_end", "-1"], "--lr_cooldown_end must not be negative"),
    (["--grad_clip_norm", "0"], "--grad_clip_norm must be positive"),
    (["--val_frequency", "-1"], "--val_frequency must not be negative"),
])
def test_bad_schedule_clipping_and_frequency_flags(colour_data, flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(["--train_data", str(colour_data["train"]), *flags])


def test_optimizer_excludes_norms_biases_and_logit_scale_from_weight_decay():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.ln_final = torch.nn.LayerNorm(4)
            self.bn1 = torch.nn.BatchNorm2d(4)
            self.logit_scale = torch.nn.Parameter(torch.ones([]))
            self.embedding = torch.nn.Parameter(torch.ones(3, 4))
            self.class_embedding = torch.nn.Parameter(torch.ones(4))
            self.downsample = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1, bias=False), torch.nn.BatchNorm2d(4))

    model = Tiny()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, beta2=0.98, eps=1e-6, weight_decay=0.2))
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    # The original code's rule goes by name only: a 1-D class embedding and a BatchNorm named "downsample.1"
    # are decayed, as in the original code and CyCLIP, so their optimizer states keep their groups' sizes.
    assert decay == {id(model.proj.weight), id(model.embedding), id(model.class_embedding),
                     id(model.downsample[0].weight), id(model.downsample[1].weight)}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-6


def test_failure_counter_stops_past_one_percent():
    counter = FailureCounter(num_samples=300)
    counter.add(["a.jpg", "b.jpg", "a.jpg"])  # 2 distinct of 300 is under 1%
    counter.add(["c.jpg"])  # 3 is exactly 1%
    with pytest.raises(DataError, match="4 of 300 training images cannot be read.*a.jpg"):
        counter.add(["d.jpg"])


class TinyTowers(torch.nn.Module):
    """Stand-in for an open_clip model: linear image and bag-of-words text towers, a logit scale."""

    def __init__(self) -> None:
        super().__init__()
        self.image = torch.nn.Linear(3 * 4 * 4, 8)
        self.text = torch.nn.Embedding(16, 8)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, images, texts):
        image = torch.nn.functional.normalize(self.image(images.flatten(1)), dim=-1)
        text = torch.nn.functional.normalize(self.text(texts).mean(1), dim=-1)
        return image, text, self.logit_scale.exp()


class ListData:
    """TrainData's interface over batches made in advance (no loader, so only the step is measured)."""

    def __init__(self, steps: int, micro_batches: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.steps, self.num_samples = steps, steps * micro_batches * 8
        self.batches = [{"image": torch.randn(8, 3, 4, 4, generator=generator),
                         "text": torch.randint(0, 16, (8, 5), generator=generator), "failed": []}
                        for _ in range(steps * micro_batches)]

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        pass

    def __iter__(self):
        return iter(self.batches)


def tiny_trainer(steps: int, accum_freq: int = 1, precision: str = "fp32", compile: bool = False,
                 data: Optional[ListData] = None, logs: Optional[Path] = None, settings: Optional[dict] = None,
                 checkpoints: CheckpointsConfig = CheckpointsConfig(), runtime: Optional[Runtime] = None,
                 **training: object) -> Trainer:
    """A Trainer of TinyTowers over ListData (on `runtime`, one process by default); with `logs` it logs every
    step (params.txt: `settings`), and its fit checkpoints into <logs>/tiny."""
    torch.manual_seed(0)
    model, runtime = TinyTowers(), runtime or Runtime()
    training = TrainingConfig(accum_freq=accum_freq, precision=precision, log_every_n_steps=1 if logs else 1000,
                              **training)
    state = TrainState(model, runtime.wrap(model, compile=compile), build_optimizer(model, OptimConfig(lr=1e-3)),
                       build_scaler(runtime.device, precision))
    schedules = Schedules(lr=LrSchedule(1e-3, 2, 100), rank_weight=RankWeightSchedule("reference", 64))
    run = RunConfig(name="tiny", logs=str(logs))
    checkpointer = Checkpointer(checkpoints, run.run_dir, runtime,  # saves nothing unless fit runs
                                record={"name": "tiny", "model_name": "tiny", "config": {}})
    logger = RunLogger(run, settings or {}, enabled=logs is not None)
    return Trainer(training, runtime, state, schedules, build_loss(ObjectiveConfig()), data or ListData(steps, accum_freq),
                   evaluator=None, checkpointer=checkpointer, logger=logger)


def step_records(trainer: Trainer) -> list[dict]:
    return [json.loads(line) for line in (trainer.logger.run_dir / "steps.jsonl").read_text().splitlines()]


def gradient_norms_at_each_step(trainer: Trainer) -> list[float]:
    """The global gradient norm the optimizer sees at each of its steps (after clipping and unscaling)."""
    norms, optimizer = [], trainer.state.optimizer
    original = optimizer.step

    def step(*args, **kwargs):
        grads = [p.grad for p in trainer.state.model.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return original(*args, **kwargs)

    optimizer.step = step
    return norms


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("grad_clip_norm", [None, 0.5])
@pytest.mark.parametrize("accum_freq", [1, 2])
def test_training_steps_read_nothing_back_until_a_log_point(host_reads, accum_freq, grad_clip_norm):
    """Host reads of tensor values happen at log points and once at the end of an epoch, never per step
    (clipping at every step included)."""
    counts = []
    for steps in (3, 9):
        host_reads.clear()
        metrics = tiny_trainer(steps, accum_freq, grad_clip_norm=grad_clip_norm).train_epoch(epoch=1, weight=1.0)
        counts.append(len(host_reads))
        assert metrics["step"] == steps and math.isfinite(metrics["loss"])
    assert counts[0] == counts[1], host_reads


def test_cpu_runs_fp32_whatever_the_precision_flag(monkeypatch):
    monkeypatch.delenv(CPU_AMP_ENV, raising=False)
    trainer = tiny_trainer(2, precision="amp")
    dtypes = []
    trainer.state.model.image.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    trainer.train_epoch(epoch=1, weight=1.0)
    assert trainer.state.scaler is None and dtypes == [torch.float32] * 2


def test_amp_bf16_on_the_cpu_runs_the_towers_in_bf16(monkeypatch):
    monkeypatch.setenv(CPU_AMP_ENV, "1")
    trainer = tiny_trainer(3, precision="amp_bf16")
    dtypes = []
    trainer.state.model.image.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    before = parameters(trainer.state.model)
    metrics = trainer.train_epoch(epoch=1, weight=1.0)
    assert trainer.state.scaler is None and dtypes == [torch.bfloat16] * 3
    assert math.isfinite(metrics["loss"])
    assert not torch.equal(before["image.weight"], trainer.state.model.image.weight)


class Recording(ListData):
    """Records the parameters, lr and loss scale before each step; before step `poke`, sets the
    logit-scale parameter above the clamp."""

    def __init__(self, steps: int, trainer_ref: list, poke: int) -> None:
        super().__init__(steps, 1)
        self.trainer_ref, self.poke, self.before = trainer_ref, poke, []

    def __iter__(self):
        for step, batch in enumerate(self.batches):
            trainer = self.trainer_ref[0]
            if step == self.poke:
                with torch.no_grad():
                    trainer.state.model.logit_scale.fill_(5.0)
            self.before.append((parameters(trainer.state.model), trainer.state.scaler.get_scale()))
            yield batch


def test_fp16_scaler_on_the_cpu_skips_an_overflowing_step(monkeypatch):
    """An inf in one batch: that step changes no weight, the scale halves, and the logit-scale clamp,
    the step count and the lr schedule go on as for any step."""
    monkeypatch.setenv(CPU_AMP_ENV, "1")
    ref: list = []
    data = Recording(4, ref, poke=2)
    data.batches[2]["image"][0, 0, 0, 0] = float("inf")
    trainer = tiny_trainer(4, precision="amp", data=data)
    ref.append(trainer)
    assert isinstance(trainer.state.scaler, torch.amp.GradScaler)
    # The default first scale, 2^16, overflows this model's fp16 gradients until it has backed off;
    # start where finite steps stay finite, so that only the inf batch overflows.
    trainer.state.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    metrics = trainer.train_epoch(epoch=1, weight=1.0)
    (at_2, scale_2), (at_3, scale_3) = data.before[2], data.before[3]
    assert scale_3 == scale_2 / 2 and data.before[1][1] == scale_2  # only the overflowing step halves it
    assert at_2["logit_scale"].item() == 5.0 and at_3["logit_scale"].item() == pytest.approx(MAX_LOGIT_SCALE)
    assert all(torch.equal(at_2[k], at_3[k]) for k in at_2 if k != "logit_scale")  # the step was skipped
    assert not torch.equal(data.before[1][0]["image.weight"], at_2["image.weight"])  # steps before it were not
    assert not torch.equal(at_3["image.weight"], trainer.state.model.image.weight)  # nor the one after it
    assert trainer.state.step == 4 and metrics["lr"] == trainer.schedules.lr(3)


def test_compiled_model_trains_like_the_eager_one():
    eager, compiled = tiny_trainer(3), tiny_trainer(3, compile=True)
    for trainer in (eager, compiled):
        trainer.train_epoch(epoch=1, weight=1.0)
    assert compiled.state.wrapped is not compiled.state.model  # torch.compile's wrapper ran the steps
    for key, value in parameters(eager.state.model).items():
        torch.testing.assert_close(parameters(compiled.state.model)[key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "amp"])
def test_clipping_bounds_the_step_gradient_and_the_log_has_the_norm_before(tmp_path, monkeypatch, precision):
    """--grad_clip_norm: the optimizer sees the gradient scaled to the norm, unscaled under fp16 (clipping
    the scaled gradient would leave it 1/scale of that); steps.jsonl has the norm before clipping at every
    step, the same norm an unclipped run logs for the same first step."""
    monkeypatch.setenv(CPU_AMP_ENV, "1")
    trainers = {}
    for clip in (None, 0.05):
        trainer = trainers[clip] = tiny_trainer(4, precision=precision, logs=tmp_path / str(clip), grad_clip_norm=clip)
        if precision == "amp":  # a scale at which this model's fp16 gradients stay finite (see the test above)
            trainer.state.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        seen = gradient_norms_at_each_step(trainer)
        trainer.train_epoch(epoch=1, weight=1.0)
        logged = [r["grad_norm"] for r in step_records(trainer)]
        assert len(logged) == len(seen) == 4
        if clip is None:
            assert seen == pytest.approx(logged, rel=1e-5)
        else:
            assert min(logged) > clip  # it clipped at every step
            assert seen == pytest.approx([clip] * 4, rel=1e-5)
    unclipped, clipped = (step_records(trainers[c])[0]["grad_norm"] for c in (None, 0.05))
    assert clipped == pytest.approx(unclipped, rel=1e-6)


def test_clipping_after_gradient_caching_equals_clipping_the_whole_batch(tmp_path):
    """The norm is the whole step's: 2 micro-batches of 8 clip like one batch of 16, to float precision."""
    cached = ListData(4, micro_batches=2)
    whole = ListData(4, micro_batches=1)
    whole.batches = [{"image": torch.cat([a["image"], b["image"]]), "text": torch.cat([a["text"], b["text"]]),
                      "failed": []} for a, b in zip(cached.batches[::2], cached.batches[1::2])]
    runs = [tiny_trainer(4, accum_freq, data=data, logs=tmp_path / str(accum_freq), grad_clip_norm=0.05)
            for accum_freq, data in ((2, cached), (1, whole))]
    for trainer in runs:
        trainer.train_epoch(epoch=1, weight=1.0)
    norms = [[r["grad_norm"] for r in step_records(trainer)] for trainer in runs]
    assert min(norms[1]) > 0.05 and norms[0] == pytest.approx(norms[1], rel=1e-5)
    for key, value in parameters(runs[1].state.model).items():
        torch.testing.assert_close(parameters(runs[0].state.model)[key], value, rtol=1e-5, atol=1e-7)


TOP1 = [0.1, 0.9, 0.3, 0.5, 0.8, 0.2]  # a zero-shot top-1 per epoch 0..5: the best epochs differ by frequency


def evaluator_of_numbers(trainer: Trainer, zeroshot_frequency: int, val_frequency: int) -> Evaluator:
    """An Evaluator of validation, one zero-shot set and one retrieval CSV whose measurements are stand-ins
    (zero-shot top-1: TOP1 of the epoch trained): what runs when is the Evaluator's own."""
    tasks = EvalTasks(zero_shot=[ZeroShotTask("ImageNet1K", None, (), ())],
                      retrieval=[RetrievalTask("flickr", None, (), torch.zeros(0))])
    evaluator = Evaluator(tasks, Runtime(), validation_loader=[], loss_fn=None, tokenizer=None, logger=trainer.logger,
                          precision="fp32", evaluation=EvaluationConfig(zeroshot_frequency=zeroshot_frequency,
                                                                         val_frequency=val_frequency))

    def epoch() -> int:
        return trainer.state.step // trainer.data.steps

    evaluator.validation = lambda model, rank_weight: {"contrastive_loss": 1.0 / (1 + epoch())}
    evaluator.zero_shot = lambda model, task: {"zeroshot_top1": TOP1[epoch()], "eval_data_type": task.name}
    evaluator.retrieval = lambda model, task: {"image_to_text_R@1": 0.5, "retrieval_data": task.name}
    return evaluator


@pytest.mark.parametrize("zeroshot_frequency, val_frequency, zeroshot_epochs, val_epochs", [
    (1, 1, [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]),
    (2, 3, [0, 2, 4, 5], [0, 3, 5]),
    (0, 2, [], [0, 2, 4, 5]),
    (3, 0, [0, 3, 5], []),
    (10, 4, [0, 5], [0, 4, 5]),
])
def test_evaluation_epochs_follow_the_frequencies_and_best_and_report_use_them(
        tmp_path, zeroshot_frequency, val_frequency, zeroshot_epochs, val_epochs):
    """After epochs divisible by N, after the last and at epoch 0 (0 = never); validation and retrieval by
    --val_frequency, the --eval_data_type sets by --zeroshot_frequency. epoch.best.pt is the best of the
    epochs evaluated (the others have no record, and leave it as it is), and the report reads the run."""
    settings = Config.from_dict({"name": "tiny", "logs": str(tmp_path), "train_data": "train.csv", "epochs": 5,
                                 "eval_data_type": ["ImageNet1K"], "eval_test_data_dir": ["zeroshot"],
                                 "retrieval_data": ["flickr.csv"], "zeroshot_frequency": zeroshot_frequency,
                                 "val_frequency": val_frequency}).to_dict()
    trainer = tiny_trainer(2, logs=tmp_path, settings=settings, epochs=5,
                           checkpoints=CheckpointsConfig(best_metric="eval/ImageNet1K/zeroshot_top1"))
    trainer.evaluator = evaluator_of_numbers(trainer, zeroshot_frequency, val_frequency)
    trainer.fit(ResumePoint(epoch=1, step=0))
    run_dir = tmp_path / "tiny"
    records = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5]
    assert [r["epoch"] for r in records if r["split"] == "eval"] == zeroshot_epochs
    assert [r["epoch"] for r in records if r["split"] == "validation"] == val_epochs
    assert [r["epoch"] for r in records if r["split"] == "retrieval"] == val_epochs
    trained = [e for e in zeroshot_epochs if e > 0]
    best = run_dir / "checkpoints" / "epoch.best.pt"
    assert best.exists() == bool(trained)
    report, _ = build_report([run_dir])
    zero_shot = report["tables"].get("Zero-shot accuracy", {"rows": {}})["rows"]
    if trained:
        best_epoch = max(trained, key=lambda e: TOP1[e])
        assert read_checkpoint(best)["epoch"] == best_epoch
        assert list(zero_shot.values())[0]["ImageNet1K top-1"]["mean"] == TOP1[5]  # the last epoch: always evaluated
        at_best, _ = build_report([run_dir], at="best")
        assert list(at_best["tables"]["Zero-shot accuracy"]["rows"].values())[0]["ImageNet1K top-1"]["mean"] == \
            TOP1[best_epoch]
    else:
        assert zero_shot == {}


class FirstOfFour(Runtime):
    """Rank 0 of 4 processes whose other ranks have nothing to add to its sums (no process group)."""

    def all_sum(self, values: list[float]) -> list[float]:
        return values


def test_a_resume_on_fewer_processes_counts_the_inherited_unreadable_images_against_the_global_limit():
    """8 ranks with 100 unreadable images each (0.8% of 100 000) resumed mid-epoch on 4: rank 0 takes
    all 800, which is within the epoch's 1% (1000); one more than 1000 over all ranks stops the run."""
    checkpoint = {"world_size": 8, "ranks": [{"rng": {}, "sums": {}, "failed": [f"r{r}_{i}.jpg" for i in range(100)]}
                                             for r in range(8)]}
    inherited = restore_rank_state(checkpoint, Runtime(rank=0, world_size=4), seed=0, step=0)["failed"]
    assert len(inherited) == 800
    for extra, fails in ((200, False), (201, True)):
        trainer = tiny_trainer(2)
        trainer.runtime, trainer.data.num_samples = FirstOfFour(world_size=4), 100_000
        trainer.data.batches[1]["failed"] = [f"new_{i}.jpg" for i in range(extra)]
        resume = ResumePoint(epoch=1, step=0, failed=tuple(inherited))
        if fails:
            with pytest.raises(DataError, match="1001 of 100000 training images cannot be read"):
                trainer.train_epoch(epoch=1, weight=1.0, resume=resume)
        else:
            assert trainer.train_epoch(epoch=1, weight=1.0, resume=resume)["skipped_samples"] == 1000


def unreadable_images_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One of 2 gloo ranks over an epoch of 800 samples (1% is 8): "uneven", rank 1 alone meets 6
    unreadable images; "resumed", a 4-rank checkpoint's 8 are inherited and rank 1 meets 1 more."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    runtime, outcome = Runtime(rank=rank, world_size=2), {}
    try:
        for case, new in (("uneven", 6), ("resumed", 1)):
            checkpoint = {"world_size": 4, "ranks": [{"rng": {}, "failed": [f"old{r}_{i}.jpg" for i in range(2)]}
                                                     for r in range(4)] if case == "resumed" else []}
            own = restore_rank_state(checkpoint, runtime, seed=0, step=0) if case == "resumed" else {}
            trainer = tiny_trainer(4, runtime=runtime)
            trainer.data.num_samples = 800
            if rank == 1:
                trainer.data.batches[1]["failed"] = [f"bad{i}.jpg" for i in range(new)]
            try:
                resume = ResumePoint(epoch=1, step=0, failed=tuple(own.get("failed", ())))
                outcome[case] = trainer.train_epoch(epoch=1, weight=1.0, resume=resume)["skipped_samples"]
            except DataError as e:
                outcome[case] = str(e)
    finally:
        Path(out_dir, f"{rank}.json").write_text(json.dumps(outcome))
        dist.destroy_process_group()


@pytest.mark.e2e
def test_two_processes_stop_together_only_past_the_global_limit(tmp_path):
    mp.spawn(unreadable_images_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    outcomes = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert [o["uneven"] for o in outcomes] == [6, 6]  # 0.75% of the epoch, all on rank 1: 1.5% of its share
    for outcome in outcomes:  # 8 inherited + 1: both ranks stop at the same point, neither waits for the other
        assert outcome["resumed"].startswith("9 of 800 training images cannot be read (over 1%)"), outcome
