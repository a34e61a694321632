"""Entry point: `python -m rankclip.main [flags]`. Parses flags, builds the components, runs them.

This file only wires components together; each component lives in its own module.
"""

from __future__ import annotations

import random
import sys
from functools import partial
from itertools import repeat
from typing import Optional, Sequence

import torch

from .checkpoint import Checkpointer
from .config import Config, ConfigError, parse_config
from .data import SampleMaker, build_caption_loader
from .distributed import Runtime, launch, process_label
from .eval_data import build_labeled_loader, load_eval_set, load_retrieval_set
from .evaluate import Evaluator, LinearProbeTask, RetrievalTask, ZeroShotTask
from .loaders import build_train_data
from .logger import RunLogger, log, setup_console_logging
from .losses import build_loss, rank_weight
from .models import build_model
from .optim import build_optimizer
from .rankstate import seed_rank
from .resume import (ResumePoint, check_resumed_config, check_run_folder, find_resume, read_resume_checkpoint,
                     restore_training)
from .savepoints import EXIT_PREEMPTED, Preempted
from .train import CosineSchedule, Trainer, autocast, build_scaler
from .weights import load_model_weights, load_weights

EVAL_BATCH_SIZE = 256


def build_evaluator(cfg: Config, runtime: Runtime, bundle, loss_fn, logger: RunLogger) -> Evaluator:
    pin = runtime.device.type == "cuda"
    loader = partial(build_labeled_loader, batch_size=EVAL_BATCH_SIZE, num_workers=cfg.num_workers, pin_memory=pin,
                     rank=runtime.rank, world=runtime.world_size)
    validation = None
    if cfg.validation_data:
        validation = build_caption_loader(
            cfg.validation_data, image_key=cfg.image_key, caption_key=cfg.caption_key, delimiter=cfg.delimiter,
            make_sample=SampleMaker(bundle.val_transform, bundle.tokenizer), seed=cfg.seed,
            global_batch=EVAL_BATCH_SIZE, rank=runtime.rank, world=runtime.world_size,
            num_workers=cfg.num_workers, pin_memory=pin, train=False, min_size=bundle.image_size)
    zero_shot, probes = [], []
    sets = zip(cfg.eval_data_type or (), cfg.eval_test_data_dir or (), cfg.eval_train_data_dir or repeat(None))
    for name, test_dir, train_dir in sets:
        test = load_eval_set(name, test_dir, bundle.val_transform)
        if test.split:
            log.info(f"{name}: {test.split}")
        if cfg.linear_probe:
            train = load_eval_set(name, train_dir, bundle.val_transform, train=True)
            num_classes = max(train.num_classes, test.num_classes)
            probes.append(LinearProbeTask(name, loader(train.dataset), loader(test.dataset), num_classes,
                                          cfg.linear_probe_batch_size, cfg.linear_probe_num_epochs, cfg.seed,
                                          test.split))
        else:
            zero_shot.append(ZeroShotTask(name, loader(test.dataset), *test.require_prompts()))
    retrieval = []
    for path in cfg.retrieval_data or ():
        data = load_retrieval_set(path, cfg.image_key, cfg.caption_key, cfg.delimiter, bundle.val_transform)
        retrieval.append(RetrievalTask(data.name, loader(data.images), data.captions, data.caption_image))
    return Evaluator(device=runtime.device, autocast=partial(autocast, runtime.device, cfg.precision),
                     loss_fn=loss_fn, validation_loader=validation, tokenizer=bundle.tokenizer, logger=logger,
                     zero_shot=zero_shot, probes=probes, retrieval=retrieval)


def run(runtime: Runtime, cfg: Config) -> None:
    """One process's whole job: build everything, then train (or only evaluate)."""
    setup_console_logging(runtime.rank)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    resume_from = find_resume(cfg)
    check_run_folder(cfg, resuming=resume_from is not None)
    logger = RunLogger(cfg, enabled=runtime.is_main)
    log.info(f"run folder {cfg.run_dir} | {runtime.describe()} | per-process batch "
             f"{cfg.batch_size // runtime.world_size}"
             + (f" x {cfg.accum_freq} micro-batches = step batch {cfg.accum_freq * cfg.batch_size}"
                if cfg.accum_freq > 1 else "")
             + (" | bundled demo" if cfg.demo else ""))

    bundle = build_model(cfg.model_name, cfg.pretrained, runtime.device, cfg.grad_checkpointing)
    objective = partial(build_loss, cfg.loss, lambda1=cfg.lambda1, lambda2=cfg.lambda2, rank_eps=cfg.rank_eps,
                        cylambda1=cfg.cylambda1, cylambda2=cfg.cylambda2)
    loss_fn = objective()
    # Every rank evaluates on the gathered features: the validation loss must not gather again.
    evaluator = build_evaluator(cfg, runtime, bundle, objective(gather=False), logger)
    log.info(f"model {cfg.model_name} ({bundle.open_clip_name}), "
             f"{sum(p.numel() for p in bundle.model.parameters()) / 1e6:.2f}M parameters, loss {cfg.loss}")

    if cfg.train_data is None:  # evaluation only
        obj = load_model_weights(bundle.model, cfg.checkpoint) if cfg.checkpoint else {}
        epoch = int(obj.get("epoch", 0))
        trained = obj.get("config") or {}  # the rank weight of the run that wrote the checkpoint
        weight = rank_weight(epoch, int(trained.get("epochs", cfg.epochs)),
                             trained.get("rank_schedule", cfg.rank_schedule))
        evaluator.run(bundle.model, epoch=epoch, rank_weight=weight)
        logger.write_json()
        logger.close()
        return

    data = build_train_data(
        cfg.train_data, dataset_type=cfg.dataset_type, num_samples=cfg.train_num_samples, image_key=cfg.image_key,
        caption_key=cfg.caption_key, delimiter=cfg.delimiter,
        make_sample=SampleMaker(bundle.train_transform, bundle.tokenizer, cfg.inmodal), seed=cfg.seed,
        global_batch=cfg.batch_size, rank=runtime.rank, world=runtime.world_size, num_workers=cfg.num_workers,
        pin_memory=runtime.device.type == "cuda", micro_batches=cfg.accum_freq, min_size=bundle.image_size)
    steps_per_epoch = data.steps
    optimizer = build_optimizer(bundle.model, cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps, cfg.weight_decay)
    scaler = build_scaler(runtime.device, cfg.precision)
    checkpointer = Checkpointer(cfg.run_dir, enabled=runtime.is_main, best_metric=cfg.best_metric,
                                keep=cfg.keep_checkpoints)
    seed_rank(cfg.seed, runtime.rank)  # weights are built (and broadcast by DDP): now each rank's own stream
    resume = ResumePoint(epoch=1, step=0)
    if resume_from is not None:
        obj = read_resume_checkpoint(resume_from, cfg)
        check_resumed_config(obj, cfg, resume_from, runtime.world_size)
        load_weights(bundle.model, obj, resume_from)
        resume = restore_training(obj, bundle.model, optimizer, scaler, checkpointer, steps_per_epoch, runtime,
                                  cfg.seed)
        within = f" after step {resume.steps_done} of {steps_per_epoch}" if resume.steps_done else ""
        log.info(f"resumed from {resume_from} at epoch {resume.epoch}{within}, step {resume.step}")
    if resume_from is not None:  # a stopped run may have recorded past its checkpoint
        logger.rewind(resume.epoch - 1, resume.step)
    elif cfg.resume == "auto":
        logger.rewind(-1, 0)

    trainer = Trainer(
        model=runtime.wrap(bundle.model, cfg.sync_bn, cfg.compile), unwrapped=bundle.model, optimizer=optimizer,
        scaler=scaler, schedule=CosineSchedule(cfg.lr, cfg.num_warmup_steps, cfg.epochs * steps_per_epoch),
        loss_fn=loss_fn, data=data, evaluator=evaluator, checkpointer=checkpointer, logger=logger, runtime=runtime, cfg=cfg,
        step=resume.step)
    trainer.fit(resume)
    logger.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        cfg = parse_config(argv)
        launch(run, cfg)
    except ConfigError as e:
        print(f"rankclip: error: {process_label()}{e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"rankclip: {process_label()}stopped by {e.signal_name} after saving a checkpoint; the same command "
              f"with --resume auto (or latest) continues the run (exit code {EXIT_PREEMPTED})", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:  # checkpoints are written atomically: every one on disk is complete
        print(f"rankclip: {process_label()}interrupted; continue the run with --resume latest", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
