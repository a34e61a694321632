"""The training loop: batch -> forward -> loss -> backward -> step -> log, plus the lr schedule."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from tqdm import tqdm

from .accumulate import cached_gradient_step
from .checkpoint import Checkpointer, TrainState
from .config import OptimConfig, TrainingConfig
from .data import FAILURE_LIMIT
from .errors import DataError
from .evaluate import Evaluator
from .loaders import TrainData
from .logger import RunLogger, log, progress_interval
from .optim import clip_gradients
from .precision import autocast
from .resume import ResumePoint
from .runtime import Runtime
from .savepoints import Preempted

MAX_LOGIT_SCALE = math.log(100)



@dataclass(frozen=True)
class LrSchedule:
    """The lr of optimizer steps 0 .. total_steps-1: a linear warmup from step 0, lr·(step+1)/warmup, then
    `kind` (--lr_scheduler):

    - cosine: a cosine decay that is exactly 0 at the last step;
    - const: the peak lr;
    - const-cooldown: the peak lr until the last `cooldown_steps`, which decay it as
      end + (lr - end)·(1 - progress)^power, progress going from 0 at the cooldown's first step to 1
      (lr = `cooldown_end`) at the last step.

    open_clip_train's schedules end one step early (its cosine never reaches 0, its cooldown never its
    end lr); here the last step's lr is the schedule's end (but a one-step cosine run keeps its lr): each
    equals open_clip_train's for total_steps-1 steps (and cooldown_steps-1). A warmup longer than the run
    ends at its last-but-one step; a cooldown that starts inside the warmup takes over, at its own
    progress, where the warmup ends.
    """

    base_lr: float
    warmup_steps: int
    total_steps: int
    kind: str = "cosine"
    cooldown_steps: int = 0
    cooldown_end: float = 0.0
    cooldown_power: float = 1.0

    def __call__(self, step: int) -> float:
        warmup = min(self.warmup_steps, self.total_steps - 1)
        if step < warmup:
            return self.base_lr * (step + 1) / warmup
        if self.kind == "const":
            return self.base_lr
        if self.kind == "const-cooldown":
            start = self.total_steps - self.cooldown_steps
            if step < start:
                return self.base_lr
            span = self.cooldown_steps - 1
            progress = min(step - start, span) / span if span > 0 else 1.0
            return self.cooldown_end + (self.base_lr - self.cooldown_end) * (1 - progress) ** self.cooldown_power
        decay_steps = self.total_steps - 1 - warmup
        if decay_steps <= 0:  # nothing but the last step follows warmup (a one-step run keeps its lr)
            return 0.0 if self.total_steps > 1 else self.base_lr
        progress = min(step - warmup, decay_steps) / decay_steps
        return 0.5 * self.base_lr * (1 + math.cos(math.pi * progress))


def lr_schedule(optim: OptimConfig, epochs: int, steps_per_epoch: int) -> LrSchedule:
    """The --lr_scheduler of a run of `epochs` epochs of `steps_per_epoch` optimizer steps."""
    return LrSchedule(optim.lr, optim.num_warmup_steps, epochs * steps_per_epoch, optim.lr_scheduler,
                      (optim.epochs_cooldown or 0) * steps_per_epoch, optim.lr_cooldown_end, optim.lr_cooldown_power)


def encode_batch(model: torch.nn.Module, batch: dict, device: torch.device, precision: str) -> dict:
    """One forward pass over images and captions (and their augmented views when present).

    Features come back fp32 whatever the autocast dtype: the loss math is always fp32. A SigLIP
    model also returns its `logit_bias`, passed on to the loss beside `logit_scale`.
    """
    images, texts = batch["image"], batch["text"]
    augmented = "augmented_image" in batch
    if augmented:
        images = torch.cat([images, batch["augmented_image"]])
        texts = torch.cat([texts, batch["augmented_text"]])
    with autocast(device, precision):
        image_features, text_features, logit_scale, *bias = model(images.to(device, non_blocking=True),
                                                                  texts.to(device, non_blocking=True))
    out = {"logit_scale": logit_scale.float()}
    if bias:
        out["logit_bias"] = bias[0].float()
    if augmented:
        n = batch["image"].shape[0]
        out["augmented_image_features"] = image_features[n:].float()
        out["augmented_text_features"] = text_features[n:].float()
        image_features, text_features = image_features[:n], text_features[:n]
    out["image_features"], out["text_features"] = image_features.float(), text_features.float()
    return out


class FailureCounter:
    """Counts this process's unreadable training images of an epoch; the run stops once more than
    FAILURE_LIMIT of the epoch's `num_samples` (all processes together) cannot be read.

    The limit is global: each process checks the count of all processes (`check_total`, given the
    all-reduced count) at log points and at the epoch's end, and stops at once when its own count
    alone is past the limit. A per-process share of the limit would stop a run whose unreadable
    images sit unevenly, and one resumed mid-epoch on fewer processes, where rank 0 takes over the
    counts of all the old ranks."""

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples
        self.failed: set[str] = set()

    def add(self, paths: list[str]) -> None:
        self.failed.update(paths)
        self.check_total(len(self.failed))

    def check_total(self, count: int) -> None:
        """Stop (DataError) when `count` unreadable images, this process's or all processes', are too many."""
        if count > FAILURE_LIMIT * self.num_samples:
            examples = f", e.g. {', '.join(sorted(self.failed)[:3])}" if self.failed else ""
            raise DataError(f"{count} of {self.num_samples} training images cannot be read "
                            f"(over {FAILURE_LIMIT:.0%}){examples}; fix or remove them from the CSV")


@dataclass(frozen=True)
class Schedules:
    """What changes over the run: the learning rate by optimizer step, the rank loss's weight by epoch."""

    lr: Callable[[int], float]
    rank_weight: Callable[[int], float]


def read_sums(totals: dict[str, torch.Tensor]) -> dict[str, float]:
    """The device-side running sums as floats, in one host read."""
    values = torch.stack(list(totals.values())).tolist() if totals else []
    return dict(zip(totals, values))


@dataclass
class Trainer:
    """Runs one run's epochs over `state`: trains, evaluates after each epoch and checkpoints."""

    training: TrainingConfig
    runtime: Runtime
    state: TrainState
    schedules: Schedules
    loss_fn: torch.nn.Module
    data: TrainData
    evaluator: Evaluator
    checkpointer: Checkpointer
    logger: RunLogger

    def fit(self, resume: ResumePoint) -> None:
        """Train from `resume` to the last epoch; SIGTERM/SIGUSR1 end it with a checkpoint (Preempted).

        An epoch's training is saved before its evaluation (a mid-epoch-style epoch_latest.pt at its
        last step, holding the epoch's training record), so a kill or a failure during a long
        evaluation loses no training, and a stop signal ends the evaluation between two of its tasks.
        A run resumed from that checkpoint evaluates the epoch (its records of it are dropped by
        RunLogger.rewind and written again); epoch_<N>.pt and the best epoch follow the evaluation."""
        points = self.checkpointer.points
        points.install()
        try:
            if resume.epoch == 1 and resume.steps_done == 0:
                self.evaluate(0, self.schedules.rank_weight(0), last=False, saved=False)
            for epoch in range(resume.epoch, self.training.epochs + 1):
                weight = self.schedules.rank_weight(epoch)
                if epoch == resume.epoch and resume.trained is not None:  # trained and saved, not evaluated
                    train_metrics = resume.trained
                else:
                    train_metrics = self.train_epoch(epoch, weight, resume if epoch == resume.epoch else None,
                                                     save_at_end=self.evaluator.due(epoch, epoch == self.training.epochs))
                self.logger.results(epoch, "train", train_metrics)
                recorded = self.evaluate(epoch, weight, last=epoch == self.training.epochs)
                self.checkpointer.save(self.state, epoch, position=None, recorded=recorded)
                if points.at_step(self.state.step, may_save=False)[1]:
                    raise Preempted(points.stop_reason())
            self.checkpointer.finish()  # the final checkpoint is on disk, or the run fails saying so
        except Preempted:
            self.checkpointer.finish()  # a stop is reported as saved (exit 75) only when it was
            self.runtime.barrier()  # no rank exits before the checkpoint is on disk (srun --kill-on-bad-exit)
            points.ignore()  # the run ends now, with its exit code, whatever else arrives
            raise
        finally:
            self.checkpointer.wait()  # the last checkpoint is on disk before the run ends, however it ends
            points.uninstall()
        self.logger.write_curves()

    def evaluate(self, epoch: int, weight: float, last: bool, saved: bool = True) -> dict[str, float]:
        """The evaluation after `epoch` (0: before training; `last`: the run's last epoch), on every rank; a
        stop signal ends it between two tasks (Preempted; `saved`: whether the state evaluated is on disk)."""
        self.checkpointer.wait()  # evaluation may start loader workers: never fork during a write
        self.runtime.barrier()  # the other ranks wait for rank 0's write here, not in a collective
        points = self.checkpointer.points

        def stop_if_signalled() -> None:
            if points.at_step(self.state.step, may_save=False)[1]:
                raise Preempted(points.stop_reason(), saved)

        recorded = self.evaluator.run(self.state.model, epoch=epoch, rank_weight=weight, last=last,
                                      between=stop_if_signalled)
        self.runtime.barrier()
        return recorded

    def save_or_stop(self, epoch: int, steps_done: int, seen: int, totals: dict[str, torch.Tensor],
                     failed: set[str], bar: tqdm) -> None:
        """At a step boundary inside an epoch: a timed or signalled save of the position, and the stop."""
        points = self.checkpointer.points
        save, stop = points.at_step(self.state.step)
        if save:
            self.checkpointer.save(self.state, epoch - 1, {"epoch": epoch, "steps_done": steps_done, "seen": seen},
                                   sums=read_sums(totals), failed=failed)
        if stop:
            bar.close()
            raise Preempted(points.stop_reason())

    def micro_batch_groups(self) -> Iterator[list[dict]]:
        """The loader's batches, `accum_freq` at a time: the micro-batches of one optimizer step."""
        group: list[dict] = []
        for batch in self.data:
            group.append(batch)
            if len(group) == self.training.accum_freq:
                yield group
                group = []

    def backward(self, tensor: torch.Tensor) -> None:
        scaler = self.state.scaler
        (tensor if scaler is None else scaler.scale(tensor)).backward()

    def forward_backward(self, batches: list[dict], weight: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Loss of one step and its gradient in `.grad`; several micro-batches use gradient caching."""
        def encode(batch: dict) -> dict:
            return encode_batch(self.state.wrapped, batch, self.runtime.device, self.training.precision)

        def loss(**features: torch.Tensor) -> dict[str, torch.Tensor]:
            return self.loss_fn(**features, rank_weight=weight)

        if len(batches) > 1:
            return cached_gradient_step(self.state.wrapped, batches, encode, loss, self.backward, self.runtime.device)
        features = encode(batches[0])
        losses = loss(**features)
        self.backward(losses["loss"])
        return {k: v.detach() for k, v in losses.items()}, features["logit_scale"].detach()

    def clip_gradients(self) -> torch.Tensor:
        """The step's gradient norm before clipping; the gradients clipped to --grad_clip_norm when it is given.

        Called once per optimizer step, after the backward of every micro-batch, and under fp16 after
        unscaling (scaler.step then does not unscale again). Under DDP the backward has all-reduced the
        gradients already (with --accum_freq, the last micro-batch's backward reduces the sum of all of
        them): every rank holds the same global gradient, so the local norm is the global norm and every
        rank clips alike, with no collective of its own.
        """
        if self.state.scaler is not None:
            self.state.scaler.unscale_(self.state.optimizer)
        return clip_gradients(self.state.model.parameters(), self.training.grad_clip_norm)

    def train_epoch(self, epoch: int, weight: float, resume: Optional[ResumePoint] = None,
                    save_at_end: bool = False) -> dict:
        """One epoch, or the rest of one that a mid-epoch checkpoint (`resume`) stopped in. With
        `save_at_end` (an evaluation follows) its end is saved as a position after its last step,
        with its training record (`train`), before `fit` evaluates it."""
        state = self.state
        state.wrapped.train()
        start_step = resume.steps_done if resume is not None else 0
        self.data.set_epoch(epoch, start_step)
        on_gpu = self.runtime.device.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(self.runtime.device)
        num_steps = self.data.steps
        every = self.training.log_every_n_steps or progress_interval(num_steps)
        failures = FailureCounter(self.data.num_samples)
        # Running sums stay on the device and are read at log and save points only: a .item() per step
        # would make the host wait for the GPU's queue to drain at every step.
        totals: dict[str, torch.Tensor] = {k: torch.tensor(v, dtype=torch.float64, device=self.runtime.device)
                                           for k, v in (resume.sums.items() if resume is not None else ())}
        seen = resume.seen if resume is not None else 0
        failures.add(list(resume.failed) if resume is not None else [])
        seen_before, lr = seen, self.schedules.lr(max(state.step - 1, 0))
        start = interval_start = time.perf_counter()
        interval_samples = 0
        bar = tqdm(self.micro_batch_groups(), total=num_steps, initial=start_step, desc=f"epoch {epoch}",
                   disable=not self.runtime.is_main, leave=False)
        for i, batches in enumerate(bar, start=start_step):
            for batch in batches:
                failures.add(batch["failed"])
            lr = self.schedules.lr(state.step)
            for group in state.optimizer.param_groups:
                group["lr"] = lr

            state.optimizer.zero_grad(set_to_none=True)
            losses, logit_scale = self.forward_backward(batches, weight)
            log_now = (i + 1) % every == 0 or i + 1 == num_steps
            if log_now or self.training.grad_clip_norm is not None:
                grad_norm = self.clip_gradients()
            if state.scaler is not None:
                state.scaler.step(state.optimizer)
                state.scaler.update()
            else:
                state.optimizer.step()
            with torch.no_grad():  # the original code's clamp: the temperature never exceeds 100
                state.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            state.step += 1

            n = sum(batch["image"].shape[0] for batch in batches) * self.runtime.world_size
            seen += n
            interval_samples += n
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + value.double() * n
            if log_now:
                now = time.perf_counter()
                logged = losses | {"grad_norm": grad_norm}
                values = dict(zip(logged, torch.stack([v.float() for v in logged.values()]).tolist()))
                parts = " ".join(f"{k} {v:.4f}" for k, v in values.items())
                rate = interval_samples / max(now - interval_start, 1e-9)
                bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
                log.info(f"epoch {epoch} [{i + 1}/{num_steps}] {parts} lr {lr:.3e} "
                         f"logit_scale {logit_scale.item():.2f} samples/s {rate:.1f}")
                self.logger.step(state.step, epoch, values | {"lr": lr})
                failures.check_total(int(self.runtime.all_sum([len(failures.failed)])[0]))
                interval_start, interval_samples = time.perf_counter(), 0
            if i + 1 < num_steps:  # the epoch's end is saved, and a stop signal heeded there, by `fit`
                self.save_or_stop(epoch, i + 1, seen, totals, failures.failed, bar)
        bar.close()
        elapsed = time.perf_counter() - start
        # Each rank's loss is its rows' share of the global loss: the mean over ranks is the global value.
        keys = sorted(totals)
        local = read_sums(totals)  # the epoch's one read
        summed = self.runtime.all_sum([local[k] / self.runtime.world_size for k in keys] + [len(failures.failed)])
        failures.check_total(int(summed[-1]))
        metrics = {k: v / max(seen, 1) for k, v in zip(keys, summed)}
        rate = (seen - seen_before) / max(elapsed, 1e-9)
        metrics.update(lr=lr, rank_weight=weight, samples_per_second=rate,
                       samples_per_second_per_process=rate / self.runtime.world_size,
                       skipped_samples=int(summed[-1]), step=state.step)
        if on_gpu:  # this process's peak of allocated tensors (the caching allocator reserves more)
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.runtime.device) / 2**30
        if failures.failed:
            log.warning(f"epoch {epoch}: skipped {len(failures.failed)} unreadable images, e.g. "
                        f"{sorted(failures.failed)[0]}")
        if save_at_end:
            self.checkpointer.save(state, epoch - 1, {"epoch": epoch, "steps_done": num_steps, "seen": seen,
                                                      "train": metrics})
        return metrics
