"""Trains Mask R-CNN on a COCO-format data set, in one process or many under torchrun (DDP).

    python train.py --config shapes --out runs/shapes                 # the synthetic default, on CPU
    python train.py --config coco --data /path/to/coco --weights imagenet --out runs/coco
    python train.py ... --resume                                      # continue exactly where it stopped
    torchrun --nproc_per_node=8 train.py --config coco ...            # gloo on CPU, nccl on GPU

OUT/last.pth is always the newest complete checkpoint (model, optimizer, scheduler, scaler, iteration,
RNG states, config); OUT/log.jsonl has every logged step and evaluation, OUT/events.* is for
TensorBoard, and OUT/metrics.json holds the final COCO evaluation.
"""

import argparse
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import coco
import utils
from config import STAGE_LAYERS, Config, named_config
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
#  Checkpoints
############################################################


def save_atomic(state: dict, path: str):
    """torch.save through a temporary file that is renamed over `path` once complete."""
    utils.atomic_write(path, lambda f: torch.save(state, f))


def rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


############################################################
#  Logging
############################################################


class RunLog:
    """JSON lines (OUT/log.jsonl) and TensorBoard events (OUT/events.*), written by the first process."""

    def __init__(self, out: str, start: int, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(out, "log.jsonl")
        self.writer = None
        if not enabled:
            return
        if start > 0 and os.path.exists(self.path):
            # A run killed after its last checkpoint logged steps that will now be run again.
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

    def write(self, record: dict):
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
            elif isinstance(value, dict):  # evaluation: {"bbox": {...}, "segm": {...}}
                for name, number in value.items():
                    if isinstance(number, float):
                        self.writer.add_scalar(f"{key}/{name}", number, step)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


############################################################
#  Training
############################################################


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train Mask R-CNN (one process, or many under torchrun).")
    parser.add_argument("--config", default="shapes", help="preset: shapes (synthetic, the default) or coco")
    parser.add_argument("--data", help="data root with annotations/ and the image folders (default: data/shapes "
                        "for shapes, written there if missing)")
    parser.add_argument("--weights", help="initial weights: a checkpoint path, imagenet, coco or coco_v2")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, logs, metrics)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pth")
    parser.add_argument("--iters", type=int, help="stop after this iteration (the schedule still ends at "
                        "MAX_ITERS, so --resume continues the same run)")
    parser.add_argument("--amp", action="store_true", help="mixed precision (float16 on GPU, bfloat16 on CPU)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    return parser.parse_args(argv)


def build_config(args, checkpoint):
    """The preset, or the checkpoint's config when resuming, with --set on top."""
    config = Config.from_dict(checkpoint["config"]) if checkpoint is not None else named_config(args.config)
    return config.override(args.set)


def default_data(args):
    if args.data:
        return args.data
    if args.config == "shapes":
        return "data/shapes"
    raise SystemExit("--data is required for --config coco (the folder with annotations/ and train2017/)")


@torch.enable_grad()  # also when called from code (a notebook) that turned gradients off
def train(args):
    rank, world_size, device = setup_distributed(args.device)
    main_process = rank == 0
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format="%(message)s")
    last_path = os.path.join(args.out, "last.pth")
    checkpoint = None
    if args.resume:
        if not os.path.exists(last_path):
            raise SystemExit(f"--resume: no checkpoint at {last_path}")
        checkpoint = torch.load(last_path, map_location="cpu", weights_only=False)
    config = build_config(args, checkpoint)
    if config.BATCH_SIZE % world_size:
        raise SystemExit(f"BATCH_SIZE={config.BATCH_SIZE} must be a multiple of the number of processes "
                         f"({world_size})")
    data = default_data(args)

    # Data: the first process writes the shapes data set if needed, the others wait for it.
    error = None
    if main_process:
        os.makedirs(args.out, exist_ok=True)
        if args.config == "shapes" and checkpoint is None:
            try:
                import shapes

                shapes.ensure(data)
            except Exception as e:  # noqa: BLE001 (passed on to every process below)
                error = e
    broadcast_error(error, world_size)
    train_set = coco.CocoDataset(data, config.TRAIN_SPLIT, config.LABELS_ARE_CATEGORY_IDS)
    if train_set.num_classes > config.NUM_CLASSES:
        raise SystemExit(f"the data set has labels up to {train_set.num_classes - 1} but NUM_CLASSES="
                         f"{config.NUM_CLASSES}; use --set NUM_CLASSES={train_set.num_classes}")

    # Model, optimizer, schedule.
    torch.manual_seed(config.SEED + rank)
    np.random.seed(config.SEED + rank)
    random.seed(config.SEED + rank)
    model = MaskRCNN(config).to(device)
    if args.weights and checkpoint is None:
        model.load_weights(args.weights)
    start = 0 if checkpoint is None else int(checkpoint["iteration"])
    layers = trainable_layers(start, config)
    model.backbone.body.freeze(layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.LEARNING_RATE, momentum=config.LEARNING_MOMENTUM,
                                weight_decay=config.WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, config))
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and device.type == "cuda")
    train_seconds = 0.0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        train_seconds = float(checkpoint.get("train_seconds", 0.0))
        states = checkpoint.get("rng", [])
        if len(states) == world_size:
            set_rng_state(states[rank], device)
        else:
            logger.warning("the checkpoint has RNG states for %d processes, this run has %d: random streams "
                           "restart from the seed", len(states), world_size)
        logger.info("resuming %s at iteration %d", last_path, start)
    end = min(config.MAX_ITERS, args.iters if args.iters is not None else config.MAX_ITERS)

    def wrap(module):
        if world_size == 1:
            return module
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    network = wrap(model)
    sampler = coco.TrainingBatchSampler(train_set.aspect_ratios, config.BATCH_SIZE // world_size, config.SEED,
                                        rank, world_size, config.HFLIP, start)
    # The loader gets its own generator so that making it does not draw from the global RNG.
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=config.NUM_WORKERS,
                                         collate_fn=coco.collate, generator=torch.Generator(),
                                         persistent_workers=False)
    val_set = None
    log = RunLog(args.out, start, main_process)
    if main_process:
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=1)

    def checkpoint_state(iteration):
        rng = rng_state(device)
        states = [rng]
        if world_size > 1:
            states = [None] * world_size
            dist.all_gather_object(states, rng)
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "iteration": iteration,
                "rng": states, "config": config.to_dict(), "train_seconds": train_seconds}

    def save(iteration):
        state = checkpoint_state(iteration)  # every process takes part (RNG states are gathered)
        if main_process:
            save_atomic(state, last_path)
            if iteration % config.CHECKPOINT_PERIOD == 0 or iteration == config.MAX_ITERS:
                save_atomic(state, os.path.join(args.out, f"model_{iteration:07d}.pth"))

    def run_evaluation(iteration):
        nonlocal val_set
        if val_set is None:
            val_set = coco.CocoDataset(data, config.VAL_SPLIT, config.LABELS_ARE_CATEGORY_IDS)
        metrics, table, _ = coco.evaluate(network.module if world_size > 1 else model, val_set,
                                          max(1, config.BATCH_SIZE // world_size), device, amp=args.amp,
                                          progress=main_process)
        if main_process:
            logger.info("iteration %d, %s:\n%s", iteration, config.VAL_SPLIT, table)
            log.write({"iteration": iteration, "eval": {k: metrics[k] for k in ("bbox", "segm")}})
        return metrics

    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    progress = tqdm(total=end, initial=start, desc="train", disable=not main_process, dynamic_ncols=True)
    iteration, window_start, window_images = start, time.perf_counter(), 0
    loader_iter = iter(loader)
    # Ctrl-C (single process) finishes the current step, saves and stops; a second one stops at once.
    interrupted = []
    previous_handler = None
    if world_size == 1 and threading.current_thread() is threading.main_thread():
        def on_interrupt(signum, frame):
            if interrupted:
                raise KeyboardInterrupt
            interrupted.append(signum)
            logger.warning("interrupt: stopping after this step (press Ctrl-C again to stop at once)")

        previous_handler = signal.signal(signal.SIGINT, on_interrupt)
    try:
        while iteration < end and not interrupted:
            step_started = time.perf_counter()
            if trainable_layers(iteration, config) != layers:
                layers = trainable_layers(iteration, config)
                model.backbone.body.freeze(layers)
                network = wrap(model)  # DDP fixes its parameter set when it is built
                logger.info("iteration %d: %d trainable backbone stages", iteration, layers)
            images, targets = next(loader_iter)
            images = [image.to(device, non_blocking=True) for image in images]
            targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
                losses = network(images, targets)
            total = sum(losses.values())
            values = torch.stack([total.detach().float()] + [v.detach().float() for v in losses.values()])
            if world_size > 1:
                dist.all_reduce(values)
                values /= world_size
            if not bool(torch.isfinite(values).all()):
                names = ["loss"] + list(losses)
                bad = ", ".join(f"{n} = {v:g}" for n, v in zip(names, values.tolist()) if not math.isfinite(v))
                raise FloatingPointError(
                    f"non-finite loss at iteration {iteration + 1}: {bad}. Training stopped; nothing was saved "
                    f"for this step ({last_path} holds the last good checkpoint). Try a lower LEARNING_RATE, "
                    "a longer WARMUP_ITERS or GRADIENT_CLIP_NORM.")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            grad_norm = None
            if config.GRADIENT_CLIP_NORM > 0:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.GRADIENT_CLIP_NORM)
                if not scaler.is_enabled() and not bool(torch.isfinite(grad_norm)):
                    raise FloatingPointError(f"non-finite gradient norm at iteration {iteration + 1} (losses were "
                                             f"finite). Training stopped; {last_path} holds the last good checkpoint.")
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            iteration += 1
            train_seconds += time.perf_counter() - step_started
            window_images += config.BATCH_SIZE
            progress.update(1)

            if iteration % config.LOG_PERIOD == 0 or iteration == end:
                elapsed = time.perf_counter() - window_start
                record = {"iteration": iteration, "lr": optimizer.param_groups[0]["lr"],
                          **{n: round(v, 5) for n, v in zip(["loss"] + list(losses), values.tolist())},
                          "images_per_second": round(window_images / max(elapsed, 1e-9), 2),
                          "train_seconds": round(train_seconds, 1)}
                if grad_norm is not None:
                    record["grad_norm"] = round(float(grad_norm), 4)
                log.write(record)
                progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2g}",
                                     img_s=f"{record['images_per_second']:.1f}")
                window_start, window_images = time.perf_counter(), 0
            if iteration % config.CHECKPOINT_PERIOD == 0 and iteration != end:
                save(iteration)
            if config.EVAL_PERIOD and iteration % config.EVAL_PERIOD == 0 and iteration != config.MAX_ITERS:
                run_evaluation(iteration)
                window_start = time.perf_counter()
    except KeyboardInterrupt:
        # Stopped inside a step (a second Ctrl-C): the forward pass may already have moved BatchNorm
        # statistics, so nothing is saved and the last checkpoint stands.
        logger.warning("stopped inside iteration %d; %s holds the last checkpoint", iteration + 1, last_path)
        log.close()
        raise
    finally:
        progress.close()
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
    if interrupted:
        logger.warning("interrupted; saving iteration %d to %s (continue with --resume)", iteration, last_path)
        save(iteration)
        log.close()
        raise KeyboardInterrupt
    save(iteration)
    if main_process:
        logger.info("iteration %d: %.1f s of training; checkpoint %s", iteration, train_seconds, last_path)
    if iteration == config.MAX_ITERS:
        metrics = run_evaluation(iteration)
        if main_process:
            coco.write_json_atomic(os.path.join(args.out, "metrics.json"),
                                   {"bbox": metrics["bbox"], "segm": metrics["segm"],
                                    "train_seconds": round(train_seconds, 1), "iteration": iteration})
    log.close()
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return model


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except FloatingPointError as error:
        logger.error("%s", error)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
