"""Trains Mask R-CNN on a COCO-format data set, in one process or many under torchrun (DDP).

    python train.py --config shapes --out runs/shapes                 # the synthetic default, on CPU
    python train.py --config coco --data /path/to/coco --weights imagenet --out runs/coco
    python train.py --config custom --data data/mine --weights coco --out runs/mine   # fine-tune on your own
    python train.py ... --resume                                      # continue exactly where it stopped
    torchrun --nproc_per_node=8 train.py --config coco ...            # gloo on CPU, nccl on GPU

OUT/last.pth is always the newest complete checkpoint (model, optimizer, scheduler, scaler, iteration,
RNG states, config; tensors and plain types only, so it loads with weights_only=True); OUT/log.jsonl has
every logged step and evaluation, OUT/events.* is for TensorBoard, and OUT/metrics.json holds the final
COCO evaluation. A run holds OUT/.lock while it runs; a fresh run refuses an OUT that holds checkpoints
(--resume continues it, --overwrite replaces it).

`train()` is the recipe: under RunFolderLock, build_run (output folder, config, data, model, optimizer,
schedule), then fit, a loop of set_training_stage, train_step, TrainingLog, save_checkpoint and evaluate
inside StopOnSignal, in one screen. Each piece can be called alone (tests/test_train.py does).
"""

import argparse
import fcntl
import json
import logging
import math
import os
import random
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import coco
import shapes
import utils
from config import ARCHITECTURE_SETTINGS, DATA_PIPELINE_SETTINGS, OPTIMIZER_SETTINGS, STAGE_LAYERS, Config, named_config
from model import MaskRCNN

logger = logging.getLogger("train")


############################################################
#  Processes and devices
############################################################


def setup_distributed(device_arg):
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: nccl on
    GPU, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif world_size > 1:
        # Processes on one machine share its cores.
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def broadcast_error(error, world_size):
    """Raises on every process if any of them failed (a rank alone must not leave the others waiting)."""
    if world_size == 1:
        if error is not None:
            raise error
        return
    messages = [None] * world_size
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    failed = [m for m in messages if m is not None]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"another process failed: {failed[0]}")


############################################################
#  Learning rate, stages
############################################################


def lr_factor(iteration: int, config: Config) -> float:
    """Multiplier of LEARNING_RATE for the step after `iteration` completed ones."""
    if iteration < config.WARMUP_ITERS:
        alpha = iteration / config.WARMUP_ITERS
        warmup = config.WARMUP_FACTOR * (1 - alpha) + alpha
    else:
        warmup = 1.0
    if config.LR_SCHEDULE == "cosine":
        progress = min(iteration / config.MAX_ITERS, 1.0)
        return warmup * 0.5 * (1 + math.cos(math.pi * progress))
    return warmup * config.LR_GAMMA ** sum(iteration >= step for step in config.LR_STEPS)


def trainable_layers(iteration: int, config: Config) -> int:
    """Trainable ResNet stages at this iteration (TRAINING_STAGES, else TRAINABLE_BACKBONE_LAYERS)."""
    layers = config.TRAINABLE_BACKBONE_LAYERS
    for first, name in sorted(config.TRAINING_STAGES, key=lambda s: s[0]):
        if iteration >= first:
            layers = STAGE_LAYERS[name]
    return layers


############################################################
#  The run: configuration, data, model, optimizer, schedule
############################################################


@dataclass
class Run:
    """One process's training run: what build_run makes and the loop's pieces below read and change."""

    out: str  # output folder
    config: Config
    data: str  # data root (annotations/ and the image folders)
    rank: int
    world_size: int
    device: torch.device
    model: MaskRCNN
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR  # LEARNING_RATE * lr_factor(iteration)
    scaler: torch.amp.GradScaler  # enabled for --amp on GPU (float16); bfloat16 on CPU needs none
    amp: bool
    end: int  # the loop stops after this iteration: --iters, at most MAX_ITERS
    iteration: int = 0  # optimizer steps done
    train_seconds: float = 0.0  # time in training steps, over every session of the run
    layers: int = 0  # trainable ResNet stages now (set_training_stage)
    network: Optional[torch.nn.Module] = None  # the model, or DDP around it
    loader: Optional[torch.utils.data.DataLoader] = None  # endless batches from `iteration` on
    val_set: Optional[coco.CocoDataset] = None  # loaded at the first evaluation

    @property
    def main_process(self) -> bool:
        return self.rank == 0

    @property
    def last_path(self) -> str:
        return os.path.join(self.out, "last.pth")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train Mask R-CNN (one process, or many under torchrun).")
    parser.add_argument("--config", help="preset: shapes (synthetic, the default), coco, custom (one's own "
                        "data: classes from the data set, a fine-tuning schedule), d2_r50_fpn_3x or d2_r101_fpn_3x "
                        "(detectron2's); with --resume the "
                        "checkpoint's settings are used instead")
    parser.add_argument("--data", help="data root with annotations/ and the image folders (default: "
                        f"{shapes.DEFAULT_ROOT} for shapes, written there if missing)")
    parser.add_argument("--make-data", action="store_true", help="with --config shapes: write the synthetic "
                        "data set to --data when it is not there (it is written unasked only to the default folder)")
    parser.add_argument("--weights", help="initial weights: a checkpoint path, imagenet, coco or coco_v2")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, logs, metrics)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pth")
    parser.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds one "
                        "(its checkpoints, log and metrics are deleted)")
    parser.add_argument("--iters", type=int, help="stop after this iteration (the schedule still ends at "
                        "MAX_ITERS, so --resume continues the same run)")
    parser.add_argument("--amp", action="store_true", help="mixed precision (float16 on GPU, bfloat16 on CPU)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (typed and "
                        "checked; with --resume only those that keep the network and the data pipeline)")
    return parser.parse_args(argv)


def build_run(args) -> Run:
    """Everything one training process needs, from the command line (parse_args): the process group,
    the output folder (prepare_out), the config (the preset with --set on top; with --resume the
    checkpoint's with the --set changes resume_changes allows, through MaskRCNN.from_checkpoint), the
    training data (the first process writes the shapes data set when it is missing and may be written
    there), the model (seeded with SEED + rank; --weights or the checkpoint's), SGD with momentum and
    weight decay at LEARNING_RATE * lr_factor(iteration), the AMP scaler, the batch loader, and with
    --resume the optimizer, schedule, iteration and random state of OUT/last.pth (then the optimizer
    settings of the config: apply_optimizer_settings)."""
    if args.resume and args.overwrite:
        raise SystemExit("--resume continues the run in --out and --overwrite replaces it: give one of them")
    rank, world_size, device = setup_distributed(args.device)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    error = None
    if rank == 0:
        try:
            prepare_out(args.out, args.resume, args.overwrite)
        except (Exception, SystemExit) as e:  # noqa: BLE001 (passed on to every process below)
            error = e
    broadcast_error(error, world_size)
    preset = args.config or "shapes"
    checkpoint, model = None, None
    if args.resume:
        path = last_checkpoint_path(args.out)
        checkpoint = load_checkpoint(path)
        changes = resume_changes(checkpoint, args.set, path)
        for flag, value in (("--config", args.config), ("--weights", args.weights)):
            if value is not None:
                logger.warning("%s %s is ignored with --resume: the model and its settings are the checkpoint's "
                               "(change settings with --set)", flag, value)
        for key, (old, new) in changes.items():
            logger.info("--resume: %s %r -> %r (%s)", key, old, new, "in the optimizer from this step on"
                        if key in OPTIMIZER_SETTINGS else "read from the next step on")
        model = MaskRCNN.from_checkpoint(checkpoint, args.set, device)
        logger.info("resuming %s at iteration %d", path, checkpoint["iteration"])
    config = model.config if model is not None else named_config(preset).override(args.set)
    if config.BATCH_SIZE % world_size:
        raise SystemExit(f"BATCH_SIZE={config.BATCH_SIZE} must be a multiple of the number of processes "
                         f"({world_size})")
    if args.make_data and preset != "shapes":
        raise SystemExit(f"--make-data writes the synthetic shapes data set; it needs --config shapes, not {preset}")
    data = coco.data_root(preset, args.data)
    write_shapes = checkpoint is None and coco.may_write_shapes(preset, data, asked=args.make_data)
    train_set = training_set(data, config, rank, world_size, shapes_preset=preset == "shapes",
                             write_shapes=write_shapes, adopt_classes=checkpoint is None)
    if model is None:
        seed_everything(config.SEED + rank)
        model = MaskRCNN(config).to(device)
        if args.weights:
            model.load_weights(args.weights)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.LEARNING_RATE, momentum=config.LEARNING_MOMENTUM,
                                weight_decay=config.WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, config))
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and device.type == "cuda")
    end = min(config.MAX_ITERS, args.iters if args.iters is not None else config.MAX_ITERS)
    run = Run(args.out, config, data, rank, world_size, device, model, optimizer, scheduler, scaler, args.amp, end)
    if checkpoint is not None:
        restore(run, checkpoint)
        apply_optimizer_settings(run)
    run.layers = trainable_layers(run.iteration, config)
    model.backbone.body.freeze(run.layers)
    run.network = distributed(model, run)
    sampler = coco.TrainingBatchSampler(train_set.aspect_ratios, config.BATCH_SIZE // world_size, config.SEED,
                                        rank, world_size, config.HFLIP, run.iteration)
    # The loader gets its own generator so that making it does not draw from the global RNG.
    run.loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=config.NUM_WORKERS,
                                             collate_fn=coco.collate, generator=torch.Generator(),
                                             persistent_workers=False)
    if run.main_process:
        utils.write_json_atomic(os.path.join(args.out, "config.json"), config.to_dict())
    return run


# What a run writes into OUT (besides .lock and the data it is given): --overwrite deletes these.
CHECKPOINT_NAME = re.compile(r"^(last|model_(?P<iteration>\d+))\.pth$")
RUN_OUTPUTS = re.compile(r"^(last\.pth|model_\d+\.pth|log\.jsonl|metrics\.json|config\.json"
                         r"|events\.out\.tfevents\..*)$")


def prepare_out(out: str, resume: bool, overwrite: bool):
    """Readies the output folder before anything is written to it (the first process, holding its lock):
    removes the temporary files a killed run left (utils.remove_stale_temporaries); a fresh run (not
    `resume`) into a folder with checkpoints is refused, naming one, unless `overwrite`, which deletes
    the previous run's outputs (RUN_OUTPUTS) first."""
    os.makedirs(out, exist_ok=True)
    removed = utils.remove_stale_temporaries(out)
    if removed:
        logger.info("removed %d temporary files left by a killed run: %s", len(removed), ", ".join(removed))
    if resume:
        return
    checkpoints = sorted(name for name in os.listdir(out) if CHECKPOINT_NAME.match(name))
    if checkpoints and not overwrite:
        raise SystemExit(f"{os.path.join(out, checkpoints[0])} exists: --out {out} holds a run. Continue it with "
                         "--resume, choose another --out, or add --overwrite to start a new run there (it deletes "
                         "that run's checkpoints, log and metrics)")
    previous = sorted(name for name in os.listdir(out) if RUN_OUTPUTS.match(name))
    if overwrite and previous:
        for name in previous:
            os.remove(os.path.join(out, name))
        logger.warning("--overwrite: deleted the previous run's %s", ", ".join(previous))


def last_checkpoint_path(out: str) -> str:
    """OUT/last.pth, which --resume needs."""
    path = os.path.join(out, "last.pth")
    if not os.path.exists(path):
        raise SystemExit(f"--resume: no checkpoint at {path}")
    return path


def load_checkpoint(path: str) -> dict:
    """A checkpoint of save_checkpoint (weights_only=True). One cut short or corrupt (a copy that did
    not finish, a broken disk) is a SystemExit naming it and the newest intact model_<iteration>.pth
    beside it, if any, with how to continue from there."""
    try:
        return utils.load_file(path)
    except utils.UnreadableFileError as error:
        folder = os.path.dirname(path)
        snapshot = newest_intact_snapshot(folder)
        if snapshot is None:
            hint = (f"No model_<iteration>.pth in {folder} is intact either: start again with --overwrite (or "
                    "another --out)")
        else:
            hint = (f"The newest intact snapshot is {snapshot[0]} (iteration {snapshot[1]}): to continue from "
                    f"there, copy it over the broken file (cp {snapshot[0]} {path}) and --resume again")
        raise SystemExit(f"{error}. {hint}") from error


def newest_intact_snapshot(folder: str) -> Optional[tuple[str, int]]:
    """(path, iteration) of the newest model_<iteration>.pth in `folder` that loads, or None."""
    snapshots = [(int(m["iteration"]), name) for name in os.listdir(folder)
                 if (m := CHECKPOINT_NAME.match(name)) and m["iteration"]]
    for iteration, name in sorted(snapshots, reverse=True):
        path = os.path.join(folder, name)
        try:
            if "model" in utils.load_file(path):
                return path, iteration
        except utils.UnreadableFileError:
            continue
    return None


def resume_changes(checkpoint: dict, overrides, path: str) -> dict:
    """The settings that --set changes on --resume, {key: (the checkpoint's value, the new one)}.
    Changing the network or the data pipeline within a run is refused (SystemExit naming the keys, see
    config.ARCHITECTURE_SETTINGS and DATA_PIPELINE_SETTINGS); the optimizer's settings are applied by
    apply_optimizer_settings and every other setting is read afresh where it is used."""
    saved = Config.from_dict(checkpoint["config"])
    wanted = Config.from_dict(checkpoint["config"]).override(overrides)
    changes = {key: (getattr(saved, key), getattr(wanted, key)) for key in saved.keys()
               if getattr(saved, key) != getattr(wanted, key)}
    fixed = [f"{key} ({'network' if key in ARCHITECTURE_SETTINGS else 'data pipeline'}: {old!r} in the checkpoint, "
             f"{new!r} asked)" for key, (old, new) in changes.items()
             if key in ARCHITECTURE_SETTINGS or key in DATA_PIPELINE_SETTINGS]
    if fixed:
        raise SystemExit(f"--resume cannot change {', '.join(fixed)}: the checkpoint was trained with its own. To "
                         f"change them, start a new run from its weights: --out <new folder> --weights {path} "
                         "--set ...")
    return changes


def training_set(data: str, config: Config, rank: int, world_size: int, shapes_preset: bool = False,
                 write_shapes: bool = False, adopt_classes: bool = False) -> coco.CocoDataset:
    """The TRAIN_SPLIT of `data`. With `write_shapes` the first process writes the shapes data set there
    first when it is missing (the others wait, and all of them stop if it fails). A `data` without the
    split's annotations is a SystemExit naming it (for the shapes preset, with how to write it there).
    With `adopt_classes` (a new run) and CLASSES_FROM_DATA, `config` takes the data set's classes."""
    error = None
    if rank == 0 and write_shapes:
        try:
            shapes.ensure(data)
        except Exception as e:  # noqa: BLE001 (passed on to every process below)
            error = e
    broadcast_error(error, world_size)
    annotations = os.path.join(data, "annotations", f"instances_{config.TRAIN_SPLIT}.json")
    if not os.path.exists(annotations):
        hint = (f"; to write the synthetic shapes data set there, add --make-data (without --data it is written to "
                f"{shapes.DEFAULT_ROOT})" if shapes_preset else "")
        raise SystemExit(f"--data {data}: no annotations for {config.TRAIN_SPLIT} there ({annotations} does not "
                         f"exist){hint}")
    dataset = coco.CocoDataset(data, config.TRAIN_SPLIT, config.LABELS_ARE_CATEGORY_IDS)
    if adopt_classes and config.CLASSES_FROM_DATA and (config.NUM_CLASSES, config.CLASS_NAMES) != (dataset.num_classes,
                                                                                  tuple(dataset.class_names)):
        config.NUM_CLASSES, config.CLASS_NAMES = dataset.num_classes, tuple(dataset.class_names)
        config.validate()
        logger.info("classes from %s: NUM_CLASSES=%d (%s)", dataset.annotation_file, config.NUM_CLASSES,
                    ", ".join(config.CLASS_NAMES[1:]))
    if dataset.num_classes > config.NUM_CLASSES:
        raise SystemExit(f"the data set has labels up to {dataset.num_classes - 1} but NUM_CLASSES="
                         f"{config.NUM_CLASSES}; use --set NUM_CLASSES={dataset.num_classes}")
    return dataset


def distributed(model: MaskRCNN, run: Run) -> torch.nn.Module:
    """The model under DDP when there are several processes (it fixes its parameter set when made)."""
    if run.world_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)


def set_training_stage(run: Run):
    """Trains the backbone stages that TRAINING_STAGES names for the next step, when they change."""
    layers = trainable_layers(run.iteration, run.config)
    if layers != run.layers:
        run.layers = layers
        run.model.backbone.body.freeze(layers)
        run.network = distributed(run.model, run)
        logger.info("iteration %d: %d trainable backbone stages", run.iteration, layers)


############################################################
#  One training step
############################################################


def train_step(run: Run, batch) -> dict:
    """One optimizer step on `batch` = (images, targets) as the loader gives them: the forward pass
    (autocast with --amp: float16 on GPU, bfloat16 on CPU), the losses averaged over the processes and
    checked, backward, gradient clipping to GRADIENT_CLIP_NORM, the optimizer and schedule steps.

    Returns the losses as floats averaged over the processes: "loss" (their sum) then each term, and
    "grad_norm" (the global gradient norm before clipping) when clipping is on; run.iteration then
    counts this step. A non-finite loss (on any process) or gradient norm raises FloatingPointError
    naming the step and the terms before any weight changes."""
    images, targets = batch
    images = [image.to(run.device, non_blocking=True) for image in images]
    targets = [{k: v.to(run.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    amp_dtype = torch.float16 if run.device.type == "cuda" else torch.bfloat16
    with torch.autocast(run.device.type, dtype=amp_dtype, enabled=run.amp):
        losses = run.network(images, targets)
    total = sum(losses.values())
    values = torch.stack([total.detach().float()] + [v.detach().float() for v in losses.values()])
    if run.world_size > 1:
        dist.all_reduce(values)
        values /= run.world_size
    stats = dict(zip(["loss", *losses], values.tolist()))
    step = run.iteration + 1
    bad = ", ".join(f"{name} = {value:g}" for name, value in stats.items() if not math.isfinite(value))
    if bad:
        raise FloatingPointError(
            f"non-finite loss at iteration {step}: {bad}. Training stopped; nothing was saved for this step "
            f"({run.last_path} holds the last good checkpoint). Try a lower LEARNING_RATE, a longer WARMUP_ITERS "
            "or GRADIENT_CLIP_NORM.")
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(total).backward()
    if run.config.GRADIENT_CLIP_NORM > 0:
        run.scaler.unscale_(run.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.GRADIENT_CLIP_NORM)
        # With the float16 scaler an inf norm is expected now and then: the scaler skips that step.
        if not run.scaler.is_enabled() and not bool(torch.isfinite(grad_norm)):
            raise FloatingPointError(f"non-finite gradient norm at iteration {step} (losses were finite). "
                                     f"Training stopped; {run.last_path} holds the last good checkpoint.")
        stats["grad_norm"] = float(grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.iteration = step
    return stats


############################################################
#  Checkpoints
############################################################


def save_atomic(state: dict, path: str):
    """torch.save through a temporary file that is renamed over `path` once complete."""
    utils.atomic_write(path, lambda f: torch.save(state, f))


def seed_everything(seed: int):
    """Seeds torch, numpy and Python's random module."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_state(device) -> dict:
    """This process's random state in plain types (tensors, ints, tuples), so that a checkpoint loads with
    weights_only=True: numpy's (name, keys array, position, has_gauss, cached_gaussian) has its keys as
    an int64 tensor."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device):
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    np.random.set_state((saved["name"], saved["keys"].numpy().astype(np.uint32), saved["position"],
                         saved["has_gauss"], saved["cached_gaussian"]))
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(run: Run):
    """Writes OUT/model_<iteration>.pth every CHECKPOINT_PERIOD and at MAX_ITERS, then OUT/last.pth, each
    atomically: model, optimizer, scheduler, scaler, iteration, every process's random state, config,
    training seconds. The snapshot goes first: a run killed while writing it still has the previous
    last.pth, so --resume writes that snapshot again (the other order would lose it for good). Every
    process must call it (the random states are gathered to the first one)."""
    states = [rng_state(run.device)]
    if run.world_size > 1:
        mine, states = states[0], [None] * run.world_size
        dist.all_gather_object(states, mine)
    state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
             "iteration": run.iteration, "rng": states, "config": run.config.to_dict(),
             "train_seconds": run.train_seconds}
    if run.main_process:
        if run.iteration % run.config.CHECKPOINT_PERIOD == 0 or run.iteration == run.config.MAX_ITERS:
            save_atomic(state, os.path.join(run.out, f"model_{run.iteration:07d}.pth"))
        save_atomic(state, run.last_path)


def restore(run: Run, checkpoint: dict):
    """Continues `run` from a checkpoint of save_checkpoint: optimizer, schedule, scaler, iteration,
    training seconds and this process's random state (the weights come with MaskRCNN.from_checkpoint).
    With another number of processes than the checkpoint's, the random streams restart from the seed."""
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    run.scaler.load_state_dict(checkpoint["scaler"])
    run.iteration = int(checkpoint["iteration"])
    run.train_seconds = float(checkpoint.get("train_seconds", 0.0))
    states = checkpoint.get("rng", [])
    if len(states) == run.world_size:
        set_rng_state(states[run.rank], run.device)
    else:
        logger.warning("the checkpoint has RNG states for %d processes, this run has %d: random streams "
                       "restart from the seed", len(states), run.world_size)
        seed_everything(run.config.SEED + run.rank)


def apply_optimizer_settings(run: Run):
    """Puts the config's LEARNING_RATE, LEARNING_MOMENTUM and WEIGHT_DECAY into the optimizer's param
    groups and the schedule's base, and sets the next step's learning rate to LEARNING_RATE *
    lr_factor(iteration): after restore, whose optimizer state carries the checkpoint's values, so that
    --resume --set LEARNING_RATE=... applies. With nothing changed it recomputes exactly what the
    schedule had set (resumed runs stay bit for bit the same)."""
    config = run.config
    run.scheduler.base_lrs = [config.LEARNING_RATE for _ in run.optimizer.param_groups]
    factor = lr_factor(run.iteration, config)
    for group in run.optimizer.param_groups:
        group.update(initial_lr=config.LEARNING_RATE, lr=config.LEARNING_RATE * factor,
                     momentum=config.LEARNING_MOMENTUM, weight_decay=config.WEIGHT_DECAY)


############################################################
#  Logging, evaluation, signals, the folder lock
############################################################


class TrainingLog:
    """What the first process shows and keeps of a run: a tqdm bar, JSON lines (OUT/log.jsonl) and
    TensorBoard events (OUT/events.*). With `enabled` False (the other processes) it does nothing.

    A run resumed at `start` drops the lines after it (steps logged by a run killed after its last
    checkpoint, which will run again); a run from the start begins a new file."""

    def __init__(self, out: str, start: int, end: int, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(out, "log.jsonl")
        self.writer = None
        self.progress = tqdm(total=end, initial=start, desc="train", disable=not enabled, dynamic_ncols=True)
        self.restart_window()
        if not enabled:
            return
        if start > 0 and os.path.exists(self.path):
            kept = [json.dumps(r) + "\n" for r in utils.read_jsonl(self.path) if r.get("iteration", 0) <= start]
            utils.atomic_write(self.path, lambda f: f.writelines(kept), mode="w")
        elif start == 0 and os.path.exists(self.path):
            os.remove(self.path)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # e.g. a GPU machine with its own torch and no tensorboard package
            logger.warning("tensorboard is not installed: no TensorBoard events (log.jsonl has the same numbers)")
            return
        self.writer = SummaryWriter(out, purge_step=start if start > 0 else None)

    def restart_window(self):
        """Images per second are measured over the steps since this call."""
        self.window_start, self.window_images = time.perf_counter(), 0

    def restart_clock(self):
        """The time since the last step (an evaluation) is not training: the window's clock starts now."""
        self.window_start = time.perf_counter()

    def step(self, images: int):
        """Counts a training step of `images` images (over all processes): the bar moves on."""
        self.window_images += images
        self.progress.update(1)

    def write_step(self, iteration: int, stats: dict, lr: float, train_seconds: float):
        """One line for the step just counted: train_step's losses (and grad_norm), the learning rate for
        the next step, the images per second since the last line, the training seconds so far."""
        elapsed = time.perf_counter() - self.window_start
        record = {"iteration": iteration, "lr": lr,
                  **{name: round(value, 5) for name, value in stats.items() if name != "grad_norm"},
                  "images_per_second": round(self.window_images / max(elapsed, 1e-9), 2),
                  "train_seconds": round(train_seconds, 1)}
        if "grad_norm" in stats:
            record["grad_norm"] = round(stats["grad_norm"], 4)
        self.write(record)
        self.progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2g}",
                                  img_s=f"{record['images_per_second']:.1f}")
        self.restart_window()

    def write(self, record: dict):
        """Appends `record` (with its "iteration") to log.jsonl; its numbers, and those of dicts in it
        (an evaluation: {"bbox": {...}, "segm": {...}}), to TensorBoard."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is None:
            return
        step = record["iteration"]
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "iteration":
                self.writer.add_scalar(f"train/{key}", value, step)
            elif isinstance(value, dict):
                for name, number in value.items():
                    if isinstance(number, float):
                        self.writer.add_scalar(f"{key}/{name}", number, step)
        self.writer.flush()

    def close(self):
        self.progress.close()
        if self.writer is not None:
            self.writer.close()


def evaluate(run: Run, log: TrainingLog) -> Optional[dict]:
    """COCO evaluation of the model on VAL_SPLIT, split among the processes. The first process logs the
    table and writes {"iteration", "eval": {"bbox": .., "segm": ..}} to the log and gets coco.evaluate's
    metrics; the others get None."""
    if run.val_set is None:
        run.val_set = coco.CocoDataset(run.data, run.config.VAL_SPLIT, run.config.LABELS_ARE_CATEGORY_IDS)
    metrics, table, _ = coco.evaluate(run.model, run.val_set, max(1, run.config.BATCH_SIZE // run.world_size),
                                      run.device, amp=run.amp, progress=run.main_process)
    if run.main_process:
        logger.info("iteration %d, %s:\n%s", run.iteration, run.config.VAL_SPLIT, table)
        log.write({"iteration": run.iteration, "eval": {k: metrics[k] for k in ("bbox", "segm")}})
    return metrics


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT (Ctrl-C) or SIGTERM (a cluster's pre-emption, `kill`); `signum` says
    which (main exits with 128 + signum, as a shell reports a process the signal ended)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopOnSignal:
    """Ctrl-C (SIGINT) and SIGTERM during training, as a context manager around the loop: the first
    signal sets `requested` (and `signum`), so that the loop finishes its step, saves and stops; with
    `repeat_stops` a second one raises Interrupted at once. Under torchrun repeats are ignored: the
    launcher passes on the signal it got to workers that often got it too (a terminal's Ctrl-C, a
    cluster's SIGTERM to the whole job), and itself kills them 30 s later. The handlers are installed
    only when `enabled` and in the main thread (Python allows signal handlers only there), and the
    previous ones are put back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True, repeat_stops: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.repeat_stops = repeat_stops
        self.requested = False
        self.signum = None
        self.previous = {}

    def __enter__(self):
        if self.enabled:
            self.previous = {signum: signal.signal(signum, self.handle) for signum in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        if self.requested:
            if self.repeat_stops:
                raise Interrupted(signum)
            return
        self.requested, self.signum = True, signum
        logger.warning("%s: stopping after this step%s", signal.Signals(signum).name,
                       " (send it again to stop at once)" if self.repeat_stops else "")

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def stop_agreed(run: Run, stop: StopOnSignal) -> bool:
    """Whether any process was asked to stop: all of them stop after the same step, since the checkpoint
    gathers every process's random state."""
    if run.world_size == 1:
        return stop.requested
    flag = torch.tensor([float(stop.requested)], device=run.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class RunFolderLock:
    """Holds OUT/.lock (with the holder's pid in it) for a run's lifetime, as a context manager, so that
    two runs cannot write into one folder: a second one is refused with the holder's pid. The lock is
    flock's, which the operating system releases when the process ends however it ends (no stale lock
    after a SIGKILL); the file stays (removing it would let a third run lock a new file while a second
    holds the old one). With `enabled` False (the other processes under torchrun) it does nothing."""

    def __init__(self, out: str, enabled: bool = True):
        self.path = os.path.join(out, ".lock")
        self.enabled = enabled
        self.file = None

    def __enter__(self):
        if not self.enabled:
            return self
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise SystemExit(f"{os.path.dirname(self.path)} is in use by another training run (pid {holder}, which "
                             f"holds {self.path}); wait for it to end or choose another --out") from None
        self.file.truncate(0)
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc_info):
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


############################################################
#  Training
############################################################


def train(args):
    """Trains as the command line (parse_args) says and returns the model: build_run, then fit. The
    first process holds the output folder's lock (RunFolderLock) from before anything is written there
    to the end."""
    if args.resume:
        last_checkpoint_path(args.out)  # refuse before the lock creates OUT
    with RunFolderLock(args.out, enabled=int(os.environ.get("RANK", "0")) == 0):
        return fit(build_run(args))


@torch.enable_grad()  # also when called from code (a notebook) that turned gradients off
def fit(run: Run) -> MaskRCNN:
    """The training loop from run.iteration to run.end, then the last checkpoint and, at MAX_ITERS, the
    final evaluation (OUT/metrics.json). Ctrl-C or SIGTERM: the step finishes, a checkpoint is saved and
    Interrupted is raised."""
    config = run.config
    log = TrainingLog(run.out, run.iteration, run.end, enabled=run.main_process)
    batches = iter(run.loader)
    stopping = False
    with StopOnSignal(repeat_stops=run.world_size == 1) as stop:
        try:
            while run.iteration < run.end and not (stopping := stop_agreed(run, stop)):
                started = time.perf_counter()
                # The backbone stages that train from this step on (TRAINING_STAGES).
                set_training_stage(run)
                # Forward, backward, update.
                stats = train_step(run, next(batches))
                run.train_seconds += time.perf_counter() - started
                # Progress and logging.
                log.step(config.BATCH_SIZE)
                if run.iteration % config.LOG_PERIOD == 0 or run.iteration == run.end:
                    log.write_step(run.iteration, stats, run.optimizer.param_groups[0]["lr"], run.train_seconds)
                # Checkpoints and evaluation (the last checkpoint and evaluation come after the loop).
                if run.iteration % config.CHECKPOINT_PERIOD == 0 and run.iteration != run.end:
                    save_checkpoint(run)
                if config.EVAL_PERIOD and run.iteration % config.EVAL_PERIOD == 0 and run.iteration != config.MAX_ITERS:
                    evaluate(run, log)
                    log.restart_clock()
        except KeyboardInterrupt:
            # Stopped inside a step (a second signal): the forward pass may already have moved BatchNorm
            # statistics, so nothing is saved and the last checkpoint stands.
            logger.warning("stopped inside iteration %d; %s holds the last checkpoint", run.iteration + 1,
                           run.last_path)
            log.close()
            raise
        finally:
            log.progress.close()
    # Ctrl-C or SIGTERM (on any process): save where the loop stopped and exit (continue with --resume).
    if stopping:
        signum = stop.signum or signal.SIGTERM  # a process the signal did not reach stops with the others
        logger.warning("%s: saving iteration %d to %s (continue with --resume)", signal.Signals(signum).name,
                       run.iteration, run.last_path)
        save_checkpoint(run)
        log.close()
        raise Interrupted(signum)
    # The end: the last checkpoint, and at MAX_ITERS the final evaluation in OUT/metrics.json.
    save_checkpoint(run)
    if run.main_process:
        logger.info("iteration %d: %.1f s of training; checkpoint %s", run.iteration, run.train_seconds,
                    run.last_path)
    if run.iteration == config.MAX_ITERS:
        metrics = evaluate(run, log)
        if run.main_process:
            utils.write_json_atomic(os.path.join(run.out, "metrics.json"),
                                    {**metrics,  # bbox, segm, boundary (with faster-coco-eval), per_class
                                     "train_seconds": round(run.train_seconds, 1), "iteration": run.iteration})
    log.close()
    if run.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return run.model


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except FloatingPointError as error:
        logger.error("%s", error)
        sys.exit(1)
    except KeyboardInterrupt as error:  # Interrupted, or Ctrl-C before the training loop
        sys.exit(128 + getattr(error, "signum", signal.SIGINT))


if __name__ == "__main__":
    main()
