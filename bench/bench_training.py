"""The training step (forward, losses, backward, SGD step), ours against torchvision's MaskRCNN built with
the same settings, same weights, same images and targets, in one process.

    python bench/bench_training.py                          # both configurations, median of 5
    python bench/bench_training.py --configs shapes --repeats 9
    python bench/bench_training.py --layouts nchw,channels_last --inference   # ours in each memory format
    python bench/bench_training.py --threads 1              # on a CPU shared with other work (see below)

Configurations:
    shapes: the demo's (config.ShapesConfig: 128 px, batch 8, ResNet-18 with trained BatchNorm, narrow FPN
        and heads); torchvision's model gets the same widths through its backbone, head and predictor
        arguments. Images and targets are shapes.py's first 8 training images.
    coco: config.Config (R50-FPN, frozen BN, 3 trainable ResNet stages) at 800x1066, batch 2: the coffee
        photo and its mirror image, with 4 synthetic objects each.

Both models hold the same weights (torchvision's random ones, made to detect as in bench_inference, loaded
into ours). Before timing, a check: the first step's five losses of both, side by side, with every anchor
and proposal sampled (sampling draws random numbers differently in the two codebases), so that they must be
equal (relative 1e-3); the script stops if they are not. The timed steps then use the configuration's own
sampling. Steps alternate between the models (ours, torchvision, ours, ...) and the medians are reported
with the spread (min-max), since the machine may be shared, in wall-clock seconds and in the process's CPU
seconds: on a machine shared with other work, two threads' wall-clock times are dominated by waits for a
descheduled thread, and one thread's CPU time is the steadiest figure. --inference adds the same table for
inference at batch 1 (the first image). Peak RSS is the process's high-water mark over one call of each
(reset through /proc/self/clear_refs to the resident set, which holds every model built).

Our POOL_ALIGNED is set to False for the shapes comparison: torchvision's RoIAlign in MultiScaleRoIAlign and
in its mask targets is the unaligned one; the half-pixel shift costs nothing.
"""

import argparse
import contextlib
import datetime
import functools
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_inference import coffee_image, make_detecting, peak_memory_mb  # noqa: E402

import shapes  # noqa: E402
from config import Config, ShapesConfig  # noqa: E402
from model import MaskRCNN  # noqa: E402

SAMPLE_ALL = 10**6  # a sampler batch size that takes every anchor and every proposal
# --layouts: the configuration's CHANNELS_LAST, or one set here (None: per mode, as measured fastest).
LAYOUTS = {"auto": None, "nchw": False, "channels_last": True}


def our_config(name: str, sample_all: bool = False, layout: str = "default") -> Config:
    """Our settings for a configuration (`name` "shapes" or "coco"); `layout` "default" or a LAYOUTS name."""
    overrides = {} if layout == "default" else dict(CHANNELS_LAST=LAYOUTS[layout])
    if sample_all:
        overrides.update(RPN_BATCH_SIZE_PER_IMAGE=SAMPLE_ALL, ROI_BATCH_SIZE_PER_IMAGE=SAMPLE_ALL)
    if name == "shapes":
        return ShapesConfig(POOL_ALIGNED=False, **overrides)
    return Config(FROZEN_BN_EPS=1e-5, IMAGE_MIN_DIM_TRAIN=(800,), **overrides)


def torchvision_model(c: Config) -> TorchvisionMaskRCNN:
    """torchvision's MaskRCNN with the network and sampling settings of our config `c` (NORM "bn" or
    "frozen_bn", any widths): its own ResNet and freezing, an FPN, heads and predictors of c's widths."""
    norm = nn.BatchNorm2d if c.NORM == "bn" else torchvision.ops.FrozenBatchNorm2d
    resnet = getattr(torchvision.models, c.BACKBONE)(weights=None, norm_layer=norm)
    backbone = _resnet_fpn_extractor(resnet, c.TRAINABLE_BACKBONE_LAYERS)
    widths = [block[0].in_channels for block in backbone.fpn.inner_blocks]
    backbone.fpn = torchvision.ops.FeaturePyramidNetwork(widths, c.FPN_CHANNELS, extra_blocks=LastLevelMaxPool())
    backbone.out_channels = channels = c.FPN_CHANNELS
    anchors = AnchorGenerator(tuple((s,) for s in c.ANCHOR_SIZES), (tuple(c.ANCHOR_RATIOS),) * 5)
    return TorchvisionMaskRCNN(
        backbone, min_size=c.IMAGE_MIN_DIM_TRAIN[0], max_size=c.IMAGE_MAX_DIM,
        rpn_anchor_generator=anchors, rpn_head=RPNHead(channels, len(c.ANCHOR_RATIOS)),
        rpn_pre_nms_top_n_train=c.RPN_PRE_NMS_TOP_N_TRAIN, rpn_post_nms_top_n_train=c.RPN_POST_NMS_TOP_N_TRAIN,
        rpn_batch_size_per_image=c.RPN_BATCH_SIZE_PER_IMAGE, box_batch_size_per_image=c.ROI_BATCH_SIZE_PER_IMAGE,
        box_head=TwoMLPHead(channels * c.BOX_POOL_SIZE**2, c.BOX_HEAD_DIM),
        box_predictor=FastRCNNPredictor(c.BOX_HEAD_DIM, c.NUM_CLASSES),
        mask_head=MaskRCNNHeads(channels, (c.MASK_HEAD_CHANNELS,) * c.MASK_HEAD_CONVS, 1),
        mask_predictor=MaskRCNNPredictor(c.MASK_HEAD_CHANNELS, c.MASK_HEAD_CHANNELS, c.NUM_CLASSES),
    )


def build_pair(name: str, layout: str = "default", sample_all: bool = False):
    """(ours, torchvision's) in training mode with the same weights: torchvision's random ones made to detect
    (make_detecting), loaded into ours. torch's RNG is seeded, so every call makes the same weights."""
    torch.manual_seed(0)
    config = our_config(name, sample_all, layout)
    theirs = make_detecting(torchvision_model(config)).train()
    ours = MaskRCNN(config)
    ours.load_weights(theirs.state_dict())
    return ours.train(), theirs


def boxes_of(masks: torch.Tensor) -> torch.Tensor:
    """[K, 4] (x1, y1, x2, y2) boxes enclosing [K, H, W] bool masks (pixel edges, as COCO's)."""
    boxes = []
    for mask in masks:
        ys, xs = torch.where(mask)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def target_of(kinds, masks) -> dict:
    masks = torch.from_numpy(np.stack(masks))
    return {"boxes": boxes_of(masks), "labels": torch.tensor(kinds) + 1, "masks": masks.to(torch.uint8)}


def samples(name: str, batch: int):
    """The configuration's images ([3, H, W] in [0, 1]) and targets."""
    if name == "shapes":
        images, targets = [], []
        for index in range(batch):
            image, instances = shapes.make_image(0, "train", index, 128)
            images.append(torch.from_numpy(image).permute(2, 0, 1).float() / 255)
            targets.append(target_of([k for k, _ in instances], [m for _, m in instances]))
        return images, targets
    photo = coffee_image(800, 1066, torch.device("cpu"))
    images = [photo.flip(-1) if i % 2 else photo for i in range(batch)]
    rng = np.random.default_rng(0)
    targets = []
    for _ in images:
        kinds = [int(k) for k in rng.integers(len(shapes.CLASSES), size=4)]
        masks = [shapes.shape_mask(shapes.CLASSES[k], *rng.uniform(200, 800, 2), rng.uniform(100, 400),
                                   rng.uniform(0, 6.28), (800, 1066)) for k in kinds]
        targets.append(target_of(kinds, masks))
    return images, targets


def check_same_losses(name: str, images, targets) -> list[str]:
    """The first step's losses of both models with every anchor and proposal sampled, as table rows;
    raises if any differs by more than 1e-3 (relative)."""
    ours, theirs = build_pair(name, sample_all=True)
    with torch.no_grad():
        torch.manual_seed(1)
        got = ours(images, targets)
        torch.manual_seed(1)
        expected = theirs(images, targets)
    rows = []
    for key in sorted(expected):
        a, b = got[key].item(), expected[key].item()
        rows.append(f"| {name} | {key} | {a:.6f} | {b:.6f} |")
        if not abs(a - b) <= 1e-3 * abs(b) + 1e-6:
            raise SystemExit(f"{name}: {key} differs: ours {a}, torchvision {b}")
    return rows


def step_function(model, images, targets, stage=lambda name: contextlib.nullcontext()):
    """One SGD step of `model` on (images, targets): zero grads, forward, sum of losses, backward, step
    (torchvision's reference settings: lr 0.02, momentum 0.9, weight decay 1e-4). stage(name) gives a
    context manager put around the backward and around the optimizer step (profile_stages' ranges)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.02, momentum=0.9, weight_decay=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        losses = model(images, targets)
        with stage("backward"):
            sum(losses.values()).backward()
        with stage("optimizer"):
            optimizer.step()
    return step


def alternate(steps: dict, repeats: int) -> tuple[dict, dict]:
    """Wall-clock and CPU seconds (this process's, all threads) of each step function, run in turn (one
    warm-up each), `repeats` times. CPU time hardly changes with the load other processes put on the
    machine, where wall-clock time does; with one thread it is the wall-clock time of an idle machine."""
    for step in steps.values():
        step()
    wall, cpu = {key: [] for key in steps}, {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            wall[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - start_cpu)
    return wall, cpu


def timed_rows(name: str, what: str, batch: int, calls: dict, repeats: int) -> list[str]:
    """Table rows of `calls` (name -> function doing `batch` images; "torchvision" the reference), timed
    alternately, with their peak RSS."""
    memory = {key: peak_memory_mb(call, torch.device("cpu")) for key, call in calls.items()}
    wall, cpu = alternate(calls, repeats)
    reference, reference_cpu = statistics.median(wall["torchvision"]), statistics.median(cpu["torchvision"])
    rows = []
    for key, seconds in wall.items():
        median, median_cpu = statistics.median(seconds), statistics.median(cpu[key])
        rows.append(f"| {name} | {what} | {key} | {median:.2f} ({min(seconds):.2f}-{max(seconds):.2f}) | "
                    f"{batch / median:.2f} | {reference / median:.2f}x | {median_cpu:.2f} | "
                    f"{reference_cpu / median_cpu:.2f}x | {memory[key]:.0f} |")
    print("\n".join(rows), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="shapes,coco")
    parser.add_argument("--layouts", default="default",
                        help=f"ours in these memory formats: default (the configuration's), {', '.join(LAYOUTS)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--inference", action="store_true", help="also time inference (batch 1) in each layout")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} cores ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} "
          f"alternating calls (min-max), load average {os.getloadavg()[0]:.1f}")
    loss_rows, rows = [], []
    for name in args.configs.split(","):
        batch = ShapesConfig.BATCH_SIZE if name == "shapes" else 2
        images, targets = samples(name, batch)
        loss_rows += check_same_losses(name, images, targets)
        pairs = {layout: build_pair(name, layout) for layout in args.layouts.split(",")}
        models = {f"ours ({layout})": ours for layout, (ours, _) in pairs.items()}
        models["torchvision"] = next(iter(pairs.values()))[1]
        rows += timed_rows(name, "training step", batch, {
            key: step_function(model, images, targets) for key, model in models.items()}, args.repeats)
        if args.inference:
            with torch.inference_mode():
                rows += timed_rows(name, "inference", 1, {
                    key: functools.partial(model.eval(), images[:1]) for key, model in models.items()}, args.repeats)
    print()
    print("First step, every anchor and proposal sampled:")
    print()
    print("| configuration | loss | ours | torchvision |")
    print("|---|---|---:|---:|")
    print("\n".join(loss_rows))
    print()
    print("| configuration | run | model | s (min-max) | images/s | torchvision / this | CPU s | "
          "torchvision / this (CPU) | peak RSS MB |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
