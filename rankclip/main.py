"""Entry point: `python -m rankclip.main [flags]`. Parses flags, builds the components, runs them.

This file only wires components together: each takes its own section of the configuration,
the runtime objects it works on, and any value of another section by name.
"""

from __future__ import annotations

import random
import sys
from functools import partial
from typing import Optional, Sequence

import torch

from .checkpoint import Checkpointer, TrainState
from .config import Config, parse_config
from .data import Batches, SampleMaker, SampleSource, build_validation_loader
from .errors import RankCLIPError
from .evaluate import EVAL_BATCH_SIZE, Evaluator, build_eval_tasks
from .launch import launch, process_label
from .loaders import build_train_data
from .logger import RunLogger, log, setup_console_logging
from .losses import RankWeightSchedule, build_loss, model_init
from .models import ModelBundle, build_model, describe_parameters
from .optim import build_optimizer
from .precision import build_scaler
from .rankstate import seed_rank
from .resume import ResumePoint, check_run_folder, find_resume, resume_training
from .runtime import Runtime
from .savepoints import EXIT_PREEMPTED, Preempted
from .train import Schedules, Trainer, lr_schedule
from .weights import load_model_weights


def build_evaluator(cfg: Config, runtime: Runtime, bundle: ModelBundle, logger: RunLogger) -> Evaluator:
    """Validation and the --eval_* / --retrieval_data sets, shared by every process. The validation
    loss runs on features every rank has gathered already: its loss must not gather again."""
    data, seed = cfg.data, cfg.run.seed
    validation = build_validation_loader(data, runtime, SampleSource(SampleMaker(bundle.val_transform, bundle.tokenizer),
                                                                     bundle.image_size), seed, EVAL_BATCH_SIZE)
    tasks = build_eval_tasks(cfg.evaluation, runtime, bundle.val_transform, layout=data.csv_layout,
                             num_workers=data.num_workers, seed=seed)
    return Evaluator(tasks, runtime, validation_loader=validation, loss_fn=build_loss(cfg.objective, gather=False),
                     tokenizer=bundle.tokenizer, logger=logger, precision=cfg.training.precision,
                     evaluation=cfg.evaluation)


def evaluate_checkpoint(cfg: Config, bundle: ModelBundle, evaluator: Evaluator) -> None:
    """An evaluation-only run: the --checkpoint's weights (or the --pretrained ones), evaluated at its
    epoch with the rank weight of the run that wrote it (its own epochs and schedule)."""
    obj = load_model_weights(bundle.model, cfg.checkpoints.checkpoint) if cfg.checkpoints.checkpoint else {}
    epoch = int(obj.get("epoch", 0))
    trained = obj.get("config") or {}
    weight = RankWeightSchedule(trained.get("rank_schedule", cfg.objective.rank_schedule),
                                int(trained.get("epochs", cfg.training.epochs)))
    evaluator.run(bundle.model, epoch=epoch, rank_weight=weight(epoch))


def run(cfg: Config, runtime: Runtime) -> None:
    """One process's whole job: build everything, then train (or only evaluate)."""
    setup_console_logging(runtime.rank)
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    run_dir, training = cfg.run.run_dir, cfg.data.train_data is not None
    resume_from = find_resume(cfg.checkpoints, run_dir, training)
    check_run_folder(run_dir, training=training, resume=cfg.checkpoints.resume, resuming=resume_from is not None)
    logger = RunLogger(cfg.run, cfg.to_dict(), enabled=runtime.is_main)
    batch, accum = cfg.training.batch_size, cfg.training.accum_freq
    log.info(f"run folder {run_dir} | {runtime.describe()} | per-process batch {batch // runtime.world_size}"
             + (f" x {accum} micro-batches = step batch {accum * batch}" if accum > 1 else "")
             + (" | bundled demo" if cfg.run.demo else ""))

    bundle = build_model(cfg.model, runtime.device, model_init(cfg.objective.loss))
    evaluator = build_evaluator(cfg, runtime, bundle, logger)
    log.info(f"model {cfg.model.model_name} ({bundle.open_clip_name}), "
             f"{describe_parameters(bundle.model)}, loss {cfg.objective.loss}")
    if not training:
        evaluate_checkpoint(cfg, bundle, evaluator)
        logger.write_json()
        logger.close()
        return

    source = SampleSource(SampleMaker(bundle.train_transform, bundle.tokenizer, cfg.data.inmodal), bundle.image_size)
    data = build_train_data(cfg.data, runtime, source, Batches(batch, cfg.run.seed, accum))
    state = TrainState(bundle.model, runtime.wrap(bundle.model, cfg.launch.sync_bn, cfg.launch.compile),
                       build_optimizer(bundle.model, cfg.optim), build_scaler(runtime.device, cfg.training.precision))
    record = {"name": cfg.run.name, "model_name": cfg.model.model_name, "config": cfg.to_dict()}
    checkpointer = Checkpointer(cfg.checkpoints, run_dir, runtime, record)
    seed_rank(cfg.run.seed, runtime.rank)  # weights are built (and broadcast by DDP): now each rank's own stream
    resume = ResumePoint(epoch=1, step=0)
    if resume_from is not None:
        resume = resume_training(resume_from, run_dir, state, checkpointer, record["config"], data.steps, runtime,
                                 cfg.run.seed)
        within = f" after step {resume.steps_done} of {data.steps}" if resume.steps_done else ""
        log.info(f"resumed from {resume_from} at epoch {resume.epoch}{within}, step {resume.step}")
        logger.rewind(resume.epoch - 1, resume.step)  # a stopped run may have recorded past its checkpoint
    elif cfg.checkpoints.resume == "auto":
        logger.rewind(-1, 0)

    schedules = Schedules(lr=lr_schedule(cfg.optim, cfg.training.epochs, data.steps),
                          rank_weight=RankWeightSchedule(cfg.objective.rank_schedule, cfg.training.epochs))
    trainer = Trainer(cfg.training, runtime, state, schedules, build_loss(cfg.objective), data, evaluator,
                      checkpointer, logger)
    trainer.fit(resume)
    logger.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        cfg = parse_config(argv)
        launch(partial(run, cfg), cfg.launch)
    except RankCLIPError as e:
        print(f"rankclip: error: {process_label()}{e}", file=sys.stderr)
        return 2
    except Preempted as e:
        what = ("after saving a checkpoint; the same command with --resume auto (or latest) continues the run"
                if e.saved else "before training, with nothing to save; the same command starts the run again")
        print(f"rankclip: {process_label()}stopped by {e.signal_name} {what} (exit code {EXIT_PREEMPTED})",
              file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:  # checkpoints are written atomically: every one on disk is complete
        print(f"rankclip: {process_label()}interrupted; continue the run with --resume latest", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
