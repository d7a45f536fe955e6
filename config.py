"""Configuration of the Mask R-CNN model, its data and its training.

`Config()` unchanged is torchvision's COCO `maskrcnn_resnet50_fpn` (v1): 91 outputs indexed by COCO
category id, frozen BatchNorm with eps 0, so `MaskRCNN(Config()).load_weights(<that checkpoint>)`
reproduces torchvision's detections. Subclass it and override attributes for other data sets:

    class BalloonConfig(Config):
        NAME = "balloon"
        NUM_CLASSES = 1 + 1

Any attribute can also be set from a command line with `--set KEY=VALUE` (see `override`). Every value,
from `--set`, `Config(**overrides)`, `from_dict` or a subclass, is checked against the type of the
attribute's default in `Config` (and against RANGES and CHOICES) by `validate()`.
"""

import ast
import difflib
import json
import math
import numbers
from typing import NamedTuple

# COCO 2017 category names indexed by category id (0 is background, "N/A" ids are unused), as in
# torchvision's COCO checkpoints, whose outputs are indexed the same way.
COCO_CLASS_NAMES = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet",
    "N/A", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "N/A", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


class Range(NamedTuple):
    """Allowed values of a number (each element of a tuple of numbers): low..high, both included
    unless low_open / high_open."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self):
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE, NON_NEGATIVE, AT_LEAST_1, FRACTION = Range(0, low_open=True), Range(0), Range(1), Range(0, 1)

# Ranges where the meaning demands one: sizes, counts, periods and batch sizes are positive; fractions,
# probabilities and IoU thresholds lie in [0, 1]. Zero is allowed where the comment of the setting gives it
# a meaning (EVAL_PERIOD=0: only at the end; RPN_ and ROI_BATCH_SIZE_PER_IMAGE=0: nothing sampled for that
# loss, which is then 0).
RANGES = {
    "TRAINABLE_BACKBONE_LAYERS": Range(0, 5), "FROZEN_BN_EPS": NON_NEGATIVE, "FPN_CHANNELS": AT_LEAST_1,
    "ANCHOR_SIZES": POSITIVE, "ANCHOR_RATIOS": POSITIVE, "RPN_CONVS": AT_LEAST_1,
    "RPN_PRE_NMS_TOP_N_TRAIN": AT_LEAST_1, "RPN_PRE_NMS_TOP_N_TEST": AT_LEAST_1,
    "RPN_POST_NMS_TOP_N_TRAIN": AT_LEAST_1, "RPN_POST_NMS_TOP_N_TEST": AT_LEAST_1,
    "RPN_NMS_THRESHOLD": FRACTION, "RPN_SCORE_THRESHOLD": FRACTION, "RPN_MIN_SIZE": NON_NEGATIVE,
    "RPN_FG_IOU_THRESHOLD": FRACTION, "RPN_BG_IOU_THRESHOLD": FRACTION, "RPN_BATCH_SIZE_PER_IMAGE": NON_NEGATIVE,
    "RPN_POSITIVE_FRACTION": FRACTION, "ROI_FG_IOU_THRESHOLD": FRACTION, "ROI_BG_IOU_THRESHOLD": FRACTION,
    "ROI_BATCH_SIZE_PER_IMAGE": NON_NEGATIVE, "ROI_POSITIVE_FRACTION": FRACTION, "BOX_POOL_SIZE": AT_LEAST_1,
    "MASK_POOL_SIZE": AT_LEAST_1, "POOL_CANONICAL_SIZE": POSITIVE, "BOX_HEAD_CONVS": NON_NEGATIVE,
    "BOX_HEAD_DIM": AT_LEAST_1, "MASK_HEAD_CONVS": NON_NEGATIVE, "MASK_HEAD_CHANNELS": AT_LEAST_1,
    "BOX_CODER_WEIGHTS": POSITIVE, "SMOOTH_L1_BETA": NON_NEGATIVE, "FOCAL_GAMMA": NON_NEGATIVE,
    "FOCAL_ALPHA": FRACTION, "RPN_PRIOR_PROBABILITY": Range(0, 1, True, True), "DETECTION_MIN_CONFIDENCE": FRACTION,
    "DETECTION_NMS_THRESHOLD": FRACTION,
    "DETECTION_MAX_INSTANCES": AT_LEAST_1, "DETECTION_MIN_SIZE": NON_NEGATIVE, "MASK_THRESHOLD": FRACTION,
    "IMAGE_MIN_DIM": AT_LEAST_1, "IMAGE_MAX_DIM": AT_LEAST_1, "IMAGE_MIN_DIM_TRAIN": AT_LEAST_1,
    "IMAGE_SIZE_DIVISOR": AT_LEAST_1, "PIXEL_MEAN": Range(0, 255), "PIXEL_STD": POSITIVE, "NUM_CLASSES": Range(2),
    "CROWD_IGNORE_THRESHOLD": FRACTION, "NUM_WORKERS": NON_NEGATIVE, "BATCH_SIZE": AT_LEAST_1,
    "LEARNING_RATE": NON_NEGATIVE, "LEARNING_MOMENTUM": FRACTION, "WEIGHT_DECAY": NON_NEGATIVE,
    "WARMUP_ITERS": NON_NEGATIVE, "WARMUP_FACTOR": FRACTION, "LR_STEPS": NON_NEGATIVE, "LR_GAMMA": POSITIVE,
    "MAX_ITERS": AT_LEAST_1, "GRADIENT_CLIP_NORM": NON_NEGATIVE, "CHECKPOINT_PERIOD": AT_LEAST_1,
    "EVAL_PERIOD": NON_NEGATIVE, "LOG_PERIOD": AT_LEAST_1, "SEED": Range(0, 2**32 - 1),  # numpy's seed range
}  # fmt: skip

# Settings that take one of a few names.
CHOICES = {
    "VARIANT": ("v1", "v2"), "BACKBONE": ("resnet18", "resnet34", "resnet50", "resnet101"),
    "NORM": ("frozen_bn", "bn", "gn"), "LR_SCHEDULE": ("step", "cosine"), "INPUT_FORMAT": ("RGB", "BGR255"),
    "RESIZE_ROUNDING": ("floor", "round"), "POOL_LEVEL_FORMULA": ("torchvision", "detectron2"),
    "MASK_PASTE": ("torchvision", "grid_sample"), "RPN_OBJECTNESS_NORMALISER": ("samples", "positives"),
}

# The type of settings whose default is None (the default says nothing about it).
NONE_DEFAULT_TYPES = {"FOCAL_ALPHA": float, "RPN_PRIOR_PROBABILITY": float, "CHANNELS_LAST": bool}

# Settings whose default's type does not say what they take; Config.validate checks each of them.
FREE_FORM_SETTINGS = ("POOL_INTERPOLATION",)  # one name, or a pair (box pooling, mask pooling)
INTERPOLATIONS = ("bilinear", "bicubic")

BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class SettingType(NamedTuple):
    """What one setting accepts: `kind` (bool, int, float, str, tuple, or None for anything), the type
    of a tuple's elements (None: any, e.g. TRAINING_STAGES' pairs), whether None is allowed (a default of
    None), its Range and its choices."""

    key: str
    kind: type | None
    element: type | None = None
    nullable: bool = False
    range: Range | None = None
    choices: tuple | None = None

    @classmethod
    def of(cls, key, default) -> "SettingType":
        """The type of `key` from its default value."""
        extra = dict(range=RANGES.get(key), choices=CHOICES.get(key))
        if key in FREE_FORM_SETTINGS:
            return cls(key, None, **extra)
        if default is None:
            return cls(key, NONE_DEFAULT_TYPES.get(key), nullable=True, **extra)
        if isinstance(default, tuple):
            kinds = {type(v) for v in default}
            element = kinds.pop() if len(kinds) == 1 and not isinstance(default[0], tuple) else None
            return cls(key, tuple, element, **extra)
        if isinstance(default, (bool, int, float, str)):
            return cls(key, type(default), **extra)
        return cls(key, None, **extra)

    def __str__(self):
        if self.kind is bool:
            text = "a bool (true/false, 1/0, yes/no)"
        elif self.kind is tuple:
            text = f"a tuple of {self.element.__name__}" if self.element else "a tuple"
        elif self.choices:
            text = f"one of {', '.join(self.choices)}"
        elif self.kind is None:
            text = "a value"
        else:
            text = f"{'an' if self.kind is int else 'a'} {self.kind.__name__}"
        if self.range is not None:
            text += f" {self.range}"
        return text + (" or None" if self.nullable else "")

    def fail(self, value):
        raise ValueError(f"{self.key} must be {self}; got {value!r}")

    def parse(self, text: str):
        """The value of `text` as given to --set (see Config.override); check() does the rest."""
        stripped = text.strip()
        if self.nullable and stripped.lower() in ("none", "null"):
            return None
        if self.kind is bool:
            if stripped.lower() not in BOOL_WORDS:
                self.fail(text)
            return BOOL_WORDS[stripped.lower()]
        try:
            value = ast.literal_eval(stripped)
        except (ValueError, SyntaxError):
            value = text
        if self.kind is str:
            return value if isinstance(value, str) else text
        if self.kind is tuple and isinstance(value, numbers.Real) and self.element in (int, float):
            return (value,)  # IMAGE_MIN_DIM_TRAIN=800
        return value

    def check(self, value):
        """`value` as this setting's type (an int for a float becomes a float, lists become tuples), or
        ValueError naming the setting, the value and the expected type."""
        if value is None:
            if not self.nullable:
                self.fail(value)
            return None
        if self.kind is None:
            return as_tuples(value)
        if self.kind is tuple:
            if not isinstance(value, (tuple, list)):
                self.fail(value)
            value = as_tuples(value)
            if self.element is not None:
                value = tuple(self.scalar(v, self.element, value) for v in value)
            return value
        return self.scalar(value, self.kind, value)

    def scalar(self, value, kind, whole):
        """One value (or tuple element) of `kind`; `whole` is what the error shows."""
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        else:
            ok = isinstance(value, kind)
        if not ok or (self.range is not None and value not in self.range) or (
                self.choices is not None and value not in self.choices):
            self.fail(whole)
        return kind(value)


def as_tuples(value):
    """Lists (from JSON) as tuples, nested ones too."""
    return tuple(as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# Trainable ResNet stages (TRAINABLE_BACKBONE_LAYERS) for each name a training stage may use.
STAGE_LAYERS = {"heads": 0, "5+": 1, "4+": 2, "3+": 3, "2+": 4, "all": 5}


# What `train.py --resume --set KEY=VALUE` does with a setting that differs from the checkpoint's. The
# checkpoint's weights fit the network they were trained in, and the sampler's place in the data fits the
# data pipeline: changing either is refused (start a new run with --weights instead). The optimizer's
# settings are put into its param groups and the schedule (a checkpoint's optimizer state carries the old
# ones). Every other setting is read afresh where it is used (the schedule's shape at every step, losses,
# sampling, clipping, periods, detection), so a change applies from the next step on.
ARCHITECTURE_SETTINGS = (
    "VARIANT", "BACKBONE", "NORM", "FROZEN_BN_EPS", "STRIDE_IN_1X1", "FPN_CHANNELS", "ANCHOR_SIZES",
    "ANCHOR_RATIOS", "RPN_CONVS", "BOX_POOL_SIZE", "MASK_POOL_SIZE", "POOL_SAMPLING_RATIO", "POOL_ALIGNED",
    "POOL_CANONICAL_SIZE", "POOL_CANONICAL_LEVEL", "BOX_HEAD_CONVS", "BOX_HEAD_DIM", "MASK_HEAD_CONVS",
    "MASK_HEAD_CHANNELS", "BOX_CODER_WEIGHTS", "NUM_CLASSES", "LABELS_ARE_CATEGORY_IDS",
)  # fmt: skip
DATA_PIPELINE_SETTINGS = (
    "TRAIN_SPLIT", "BATCH_SIZE", "IMAGE_MIN_DIM", "IMAGE_MAX_DIM", "IMAGE_MIN_DIM_TRAIN", "IMAGE_SIZE_DIVISOR",
    "PIXEL_MEAN", "PIXEL_STD", "INPUT_FORMAT", "RESIZE_ROUNDING", "RESIZE_ANTIALIAS", "HFLIP", "SEED",
)  # fmt: skip
OPTIMIZER_SETTINGS = ("LEARNING_RATE", "LEARNING_MOMENTUM", "WEIGHT_DECAY")


class Config:
    """Base configuration; UPPER_CASE class attributes are the settings."""

    NAME = "coco"  # names the run (log and checkpoint folders)

    # ---- Model variant and backbone -------------------------------------------------------------
    # "v1": torchvision's maskrcnn_resnet50_fpn (37.9 box / 34.6 mask AP with its COCO weights).
    # "v2": maskrcnn_resnet50_fpn_v2 (47.4 / 41.8): BatchNorm in the FPN and heads, two RPN convs,
    # a 4-conv + 1-fc box head. Use the "v2" weights with Config.v2().
    VARIANT = "v1"
    BACKBONE = "resnet50"  # resnet18, resnet34, resnet50 or resnet101 (torchvision layouts)
    # Normalisation in the backbone: "frozen_bn" (BN with fixed statistics, the usual choice for small
    # batches), "bn" (trained BatchNorm; torchvision's v2 and its untrained models) or "gn" (GroupNorm, 32
    # groups, for training from scratch with small batches).
    NORM = "frozen_bn"
    # eps of the frozen BN: torchvision's v1 COCO weights need 0.0; ImageNet weights use 1e-5.
    FROZEN_BN_EPS = 0.0
    # Where each bottleneck's first block of layer2-4 subsamples: False on the 3x3 conv (torchvision,
    # "ResNet v1.5"), True on the first 1x1 conv (MSRA's original ResNet, which detectron2's weights need).
    STRIDE_IN_1X1 = False
    # How many of the backbone's stages train (0-5, from the top: layer4, layer3, layer2, layer1, conv1).
    # torchvision trains 3 when starting from pretrained weights.
    TRAINABLE_BACKBONE_LAYERS = 3
    FPN_CHANNELS = 256  # channels of every pyramid level (P2-P6)

    # ---- Anchors and Region Proposal Network ------------------------------------------------------
    ANCHOR_SIZES = (32, 64, 128, 256, 512)  # one size per level, P2 to P6 (pixels)
    ANCHOR_RATIOS = (0.5, 1.0, 2.0)  # height / width
    # True: the anchors' corners are rounded to whole pixels (torchvision); False: exact (detectron2).
    ANCHOR_ROUND = True
    # The distance between anchors on P2-P6 in pixels, e.g. (4, 8, 16, 32, 64) (detectron2); empty: the
    # padded image size // the level's size (torchvision), which is 61 rather than 64 on P6 when P5 is odd.
    ANCHOR_STRIDES = ()
    RPN_CONVS = 1  # 3x3 convs before the RPN's predictors (torchvision v2: 2)
    RPN_PRE_NMS_TOP_N_TRAIN = 2000  # proposals kept per level before NMS
    RPN_PRE_NMS_TOP_N_TEST = 1000
    RPN_POST_NMS_TOP_N_TRAIN = 2000  # proposals kept per image after NMS
    RPN_POST_NMS_TOP_N_TEST = 1000
    RPN_NMS_THRESHOLD = 0.7
    RPN_SCORE_THRESHOLD = 0.0  # proposals with a lower objectness probability are dropped
    RPN_MIN_SIZE = 1e-3  # proposals narrower or lower than this (pixels) are dropped
    # False: proposals at least RPN_MIN_SIZE wide and high are kept (torchvision); True: only those wider
    # and higher (detectron2's nonempty(), with RPN_MIN_SIZE 0: no empty box).
    RPN_MIN_SIZE_STRICT = False
    # NMS of the proposals ranks their objectness probabilities (False, torchvision) or logits (True,
    # detectron2): the same order, but float32's sigmoid saturates to 1.0 above a logit of about 17, and
    # tied probabilities can keep other proposals than distinct logits.
    RPN_NMS_ON_LOGITS = False
    RPN_FG_IOU_THRESHOLD = 0.7  # anchor is positive above this IoU with a ground-truth box
    RPN_BG_IOU_THRESHOLD = 0.3  # and negative below this
    RPN_BATCH_SIZE_PER_IMAGE = 256  # anchors sampled per image for the RPN losses
    RPN_POSITIVE_FRACTION = 0.5

    # ---- RoI heads ------------------------------------------------------------------------------
    ROI_FG_IOU_THRESHOLD = 0.5  # proposal is foreground at or above this IoU
    ROI_BG_IOU_THRESHOLD = 0.5  # and background below this
    ROI_BATCH_SIZE_PER_IMAGE = 512  # proposals sampled per image for the box and mask losses
    ROI_POSITIVE_FRACTION = 0.25
    BOX_POOL_SIZE = 7  # RoIAlign output for the box head
    MASK_POOL_SIZE = 14  # RoIAlign output for the mask head; masks are predicted at twice this
    POOL_SAMPLING_RATIO = 2  # samples per bin and axis (<= 0: adaptive)
    # How each sample reads the feature map: "bilinear" (4 pixels; the paper's and torchvision's) or
    # "bicubic" (4x4 pixels, cubic convolution with a = -0.75, at most 4x the pooling time; matterport's
    # lineage claimed it slightly better). One name for both poolers, or a pair (box pooling, mask
    # pooling), e.g. ("bilinear", "bicubic"). The mask targets are always cropped bilinearly (mask_targets).
    POOL_INTERPOLATION = "bilinear"
    # False: the original RoIAlign (torchvision); True: half-pixel aligned (detectron2, a little better).
    POOL_ALIGNED = False
    POOL_CANONICAL_SIZE = 224  # an RoI of this size maps to level 4 (FPN paper, eq. 1)
    POOL_CANONICAL_LEVEL = 4
    # The level of a box at the boundary between two: "torchvision" floor(4 + log2(sqrt(area) / 224) + 1e-6),
    # "detectron2" floor(4 + log2(sqrt(area) / 224 + 1e-8)).
    POOL_LEVEL_FORMULA = "torchvision"
    BOX_HEAD_CONVS = 0  # 3x3 convs of the box head before its fc layer (torchvision v2: 4, with BN)
    BOX_HEAD_DIM = 1024  # width of the box head's fully connected layers
    MASK_HEAD_CONVS = 4  # 3x3 convs of the mask head
    MASK_HEAD_CHANNELS = 256
    BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # (wx, wy, ww, wh): box deltas are scaled by these
    SMOOTH_L1_BETA = 1.0 / 9  # box regression loss (RPN and RoI head); 0 is plain L1

    # ---- Focal loss (Lin et al., 2017) instead of cross entropy -----------------------------------
    # It down-weights the examples a loss already gets right, which matters where easy examples swamp
    # the rest; a two-stage detector's sampling already balances most of its losses, so expect little.
    # gamma = 0 with no alpha is exactly the ordinary loss.
    # RPN objectness: worth it when the anchors are not balanced by sampling (a small
    # RPN_POSITIVE_FRACTION, or a large RPN_BATCH_SIZE_PER_IMAGE on images with few objects).
    RPN_FOCAL_LOSS = False
    # The box classifier (softmax focal loss): many easy background RoIs (a small
    # ROI_POSITIVE_FRACTION), or rare classes the cross entropy of the common ones drowns out.
    BOX_FOCAL_LOSS = False
    # The mask loss (sigmoid focal loss per pixel of each foreground RoI's own class): objects whose
    # masks are mostly easy pixels (large uniform interiors, thin parts), to weigh the hard pixels near
    # the boundary more.
    MASK_FOCAL_LOSS = False
    # Shared by the three switches, so that an ablation changes one switch at a time.
    FOCAL_GAMMA = 2.0
    FOCAL_ALPHA = None  # weight of positives in [0, 1] (RetinaNet: 0.25), or None for no weighting
    # RetinaNet's other two parts, for the RPN. Its loss is summed over every anchor and divided by the
    # positives ("positives"), where a mean over the sampled anchors ("samples") lets thousands of easy
    # negatives dilute the few positives; and its classifier starts at a small prior probability of an
    # object (0.01), so that those negatives' loss does not swamp the first steps.
    RPN_OBJECTNESS_NORMALISER = "samples"
    RPN_PRIOR_PROBABILITY = None  # None: the objectness bias starts at 0 (probability 0.5)

    # ---- Detection ------------------------------------------------------------------------------
    DETECTION_MIN_CONFIDENCE = 0.05  # detections with a lower class score are dropped
    DETECTION_NMS_THRESHOLD = 0.5  # per-class NMS
    DETECTION_MAX_INSTANCES = 100  # per image
    DETECTION_MIN_SIZE = 1e-2  # boxes narrower or lower than this (pixels) are dropped
    MASK_THRESHOLD = 0.5  # detect() thresholds mask probabilities at this
    # False: a pixel is in the mask above MASK_THRESHOLD (torchvision); True: at or above it (detectron2).
    MASK_THRESHOLD_INCLUSIVE = False
    # How a mask is pasted into the image: "torchvision" (padded by one pixel, box enlarged by (M + 2) / M
    # and cut to whole pixels, then resized) or "grid_sample" (detectron2: each pixel centre sampled
    # bilinearly in the exact box, zero outside the mask, no padding).
    MASK_PASTE = "torchvision"
    # After the boxes are scaled back to the image's own pixels: clip them to the image and drop those of
    # zero width or height (detectron2's detector_postprocess; True), or leave them as they are (False).
    RESCALE_CLIP_AND_DROP_EMPTY = False

    # Memory format of the feature maps (and conv weights): True channels-last (NHWC), False NCHW, None
    # per mode and machine (model.memory_format_for): channels-last, except NCHW for training on a CPU
    # without AVX-512. Measured with bench/bench_training.py (bench/RESULTS.md), 2 threads: on a 2-core
    # AMD EPYC (AVX2) the COCO training step was 0.80x torchvision in channels-last and 1.19x in NCHW;
    # on a 2-core Xeon (AVX-512, Emerald Rapids) it was 1.58x in channels-last and 1.00x in NCHW (12.0
    # against 19.1 s a step), and on the shapes preset 1.06x against 0.95x. Inference at 800x1066 was
    # faster in channels-last there (1.40x against 1.26x torchvision; our RoIAlign reads channels-last
    # maps without a transpose), and 1.35x torchvision in channels-last on the EPYC (NCHW not measured).
    # Results are the same up to float rounding.
    CHANNELS_LAST = None

    # ---- Images ---------------------------------------------------------------------------------
    IMAGE_MIN_DIM = 800  # the shorter side is resized to this ...
    IMAGE_MAX_DIM = 1333  # ... unless the longer side would exceed this
    # The resized sides: "floor" (torchvision, side * scale rounded down) or "round" (detectron2's
    # ResizeShortestEdge: the shorter side exactly IMAGE_MIN_DIM, the longer scaled, both int(x + 0.5)).
    RESIZE_ROUNDING = "floor"
    # Antialiased bilinear resizing when shrinking (detectron2 resizes with PIL, which antialiases); the
    # same as plain bilinear when enlarging.
    RESIZE_ANTIALIAS = False
    IMAGE_MIN_DIM_TRAIN = (800,)  # training draws the shorter side from these (multi-scale training)
    IMAGE_SIZE_DIVISOR = 32  # batches are zero-padded to a multiple of this
    # What the network takes: "RGB" in [0, 1] (torchvision) or "BGR255", the channels reversed and
    # scaled to [0, 255] (detectron2's and Caffe2's weights). PIXEL_MEAN and PIXEL_STD are in those units.
    INPUT_FORMAT = "RGB"
    PIXEL_MEAN = (0.485, 0.456, 0.406)  # RGB in [0, 1], ImageNet statistics
    PIXEL_STD = (0.229, 0.224, 0.225)

    # ---- Classes --------------------------------------------------------------------------------
    NUM_CLASSES = 91  # including background (index 0)
    # True when labels are the data set's category ids (torchvision's COCO weights); False when they
    # are contiguous 1..K and the data set keeps the map to its category ids.
    LABELS_ARE_CATEGORY_IDS = True
    # With LABELS_ARE_CATEGORY_IDS False: the category id of labels 1..K-1 when no data set gives the map
    # (detect.py's COCO JSON without --data); empty: the label itself.
    CATEGORY_IDS = ()
    CLASS_NAMES = COCO_CLASS_NAMES
    # Take NUM_CLASSES and CLASS_NAMES from the training data set's categories when training starts (the
    # custom preset): one's own data then needs no class count written by hand.
    CLASSES_FROM_DATA = False

    # ---- Data (coco.py): <data>/annotations/instances_<split>.json and images in <data>/<split>/ ----
    TRAIN_SPLIT = "train2017"
    VAL_SPLIT = "val2017"
    HFLIP = True  # training images are flipped left-right with probability 0.5
    # A proposal or anchor that is not positive and lies inside a crowd region (intersection over its
    # own area above this) is neither positive nor negative (Detectron's crowd filter).
    CROWD_IGNORE_THRESHOLD = 0.7
    NUM_WORKERS = 2  # data-loading processes per training process

    # ---- Training (train.py); iterations count optimizer steps --------------------------------------
    # torchvision's reference 1x schedule: 16 images a step, lr 0.02, 90k steps, decay at 60k and 80k.
    BATCH_SIZE = 16  # images per step over all processes (each of N processes takes BATCH_SIZE / N)
    LEARNING_RATE = 0.02
    LEARNING_MOMENTUM = 0.9
    WEIGHT_DECAY = 1e-4
    WARMUP_ITERS = 1000  # the learning rate rises linearly from WARMUP_FACTOR * LEARNING_RATE ...
    WARMUP_FACTOR = 0.001
    LR_SCHEDULE = "step"  # ... then "step" (x LR_GAMMA at each of LR_STEPS) or "cosine" (to 0 at MAX_ITERS)
    LR_STEPS = (60000, 80000)
    LR_GAMMA = 0.1
    MAX_ITERS = 90000
    GRADIENT_CLIP_NORM = 0.0  # clip the global gradient norm to this (0: no clipping, as torchvision)
    # Staged fine-tuning (matterport's): ((first iteration, layers), ...) where layers is "heads"
    # (backbone body frozen), "5+", "4+", "3+", "2+" (ResNet stages from that one up, plus the heads) or
    # "all". Empty: TRAINABLE_BACKBONE_LAYERS for the whole run.
    TRAINING_STAGES = ()
    CHECKPOINT_PERIOD = 5000  # also writes model_<iteration>.pth; last.pth is written at every checkpoint
    EVAL_PERIOD = 0  # evaluate on VAL_SPLIT every this many iterations (0: only at the end)
    LOG_PERIOD = 20  # iterations between log lines (JSON lines, TensorBoard, progress bar)
    SEED = 0

    def __init__(self, **overrides):
        for key, value in overrides.items():
            self._set(key, value)
        self.validate()

    @property
    def MASK_SIZE(self):  # noqa: N802 (derived setting, read like the others)
        """Side of the predicted masks: the mask head upsamples its pooled input twice."""
        return 2 * self.MASK_POOL_SIZE

    @classmethod
    def v2(cls, **overrides):
        """torchvision's maskrcnn_resnet50_fpn_v2."""
        settings = dict(VARIANT="v2", NORM="bn", RPN_CONVS=2, BOX_HEAD_CONVS=4)
        settings.update(overrides)
        return cls(**settings)

    def keys(self):
        return sorted(k for k in dir(type(self)) if k.isupper() and not isinstance(getattr(type(self), k), property))

    def check_key(self, key):
        """KeyError for a name that is not a setting, with the nearest names."""
        keys = self.keys()
        if key not in keys:
            near = difflib.get_close_matches(key, keys, n=3)
            hint = f"did you mean {' or '.join(near)}?" if near else f"known: {', '.join(keys)}"
            raise KeyError(f"unknown config attribute {key!r}; {hint}")

    def _set(self, key, value):
        self.check_key(key)
        setattr(self, key, value)

    def setting_type(self, key) -> "SettingType":
        """The type `key` takes: that of its default in the first class of the hierarchy that defines it
        (Config for its own settings, so a subclass cannot change a type by accident)."""
        for cls in reversed(type(self).__mro__):
            if key in vars(cls):
                return SettingType.of(key, vars(cls)[key])
        raise KeyError(key)

    def validate(self):
        """Checks every setting against its type (setting_type), RANGES and CHOICES, converting where it
        is lossless (an int for a float, a list for a tuple), then the settings that depend on each other.
        Errors are ValueError naming the setting, the value received and what was expected."""
        for key in self.keys():
            setattr(self, key, self.setting_type(key).check(getattr(self, key)))
        interpolation = self.POOL_INTERPOLATION
        names = (interpolation, interpolation) if isinstance(interpolation, str) else interpolation
        if not (isinstance(names, tuple) and len(names) == 2 and all(n in INTERPOLATIONS for n in names)):
            raise ValueError(f"POOL_INTERPOLATION must be 'bilinear', 'bicubic' or a pair (box pooling, mask "
                             f"pooling) of them; got {interpolation!r}")
        if len(self.ANCHOR_SIZES) != 5:
            raise ValueError(f"ANCHOR_SIZES needs one size per level P2-P6 (5); got {self.ANCHOR_SIZES}")
        if self.ANCHOR_STRIDES and (len(self.ANCHOR_STRIDES) != 5 or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in self.ANCHOR_STRIDES)):
            raise ValueError(f"ANCHOR_STRIDES must be empty or 5 ints >= 1 (P2-P6); got {self.ANCHOR_STRIDES}")
        top = 1.0 if self.INPUT_FORMAT == "RGB" else 255.0
        if any(v > top for v in self.PIXEL_MEAN):
            raise ValueError(f"PIXEL_MEAN must be in [0, {top:g}] for INPUT_FORMAT={self.INPUT_FORMAT}; got "
                             f"{self.PIXEL_MEAN}")
        for stage in self.TRAINING_STAGES:
            if (not isinstance(stage, tuple) or len(stage) != 2 or not isinstance(stage[0], int)
                    or stage[1] not in STAGE_LAYERS):
                raise ValueError(f"TRAINING_STAGES entries are (first iteration, one of {', '.join(STAGE_LAYERS)}); "
                                 f"got {stage!r}")
        if len(self.CLASS_NAMES) != self.NUM_CLASSES:
            # Keep the names usable when only NUM_CLASSES was changed.
            names = list(self.CLASS_NAMES[: self.NUM_CLASSES])
            self.CLASS_NAMES = tuple(names + [f"class {i}" for i in range(len(names), self.NUM_CLASSES)])

    def to_dict(self):
        """Plain dict of every setting (JSON-friendly), for checkpoints."""
        return {key: list(v) if isinstance(v := getattr(self, key), tuple) else v for key in self.keys()}

    @classmethod
    def from_dict(cls, values):
        """The inverse of to_dict (lists become tuples again in validate); unknown keys are an error."""
        return cls(**values)

    def override(self, assignments):
        """Applies ["KEY=VALUE", ...] (from --set). VALUE is read as the setting's type (SettingType.parse):
        true/false/1/0/yes/no for a bool, a number, a Python tuple such as (640, 672) (or one number for
        a one-element tuple), None where the default is None, and for a str the text itself (quotes
        optional). Every setting is then checked (validate)."""
        for assignment in assignments:
            key, sep, text = assignment.partition("=")
            key = key.strip()
            if not sep:
                raise ValueError(f"--set expects KEY=VALUE; got {assignment!r}")
            self.check_key(key)
            try:
                kind = self.setting_type(key)
                self._set(key, kind.check(kind.parse(text)))
            except ValueError as error:
                raise ValueError(f"--set {assignment}: {error}") from None
        self.validate()
        return self

    def display(self):
        """Prints every setting, one per line."""
        print("Configurations:")
        for key in self.keys():
            print(f"{key:30} {getattr(self, key)}")
        print()

    def __repr__(self):
        return f"{type(self).__name__}({json.dumps(self.to_dict())[:200]}...)"


class ShapesConfig(Config):
    """The embedded default (`python train.py --config shapes`, `make demo`): the synthetic shapes of
    shapes.py (128 px images, objects 19 to 64 px), trained from scratch in under 10 minutes on a
    2-core CPU.

    Why these settings (measured on that machine; runs of 900-1000 steps, segm AP on the 200
    validation images):
    - Nothing pretrained can be downloaded, so the backbone is the smallest ResNet (18), trained
      whole, from scratch. Trained BatchNorm (8 images of 128 px give usable batch statistics)
      reached 0.728 in 900 steps where GroupNorm reached 0.712 in 1000, at about the same speed.
    - Images stay at their own 128 px, so anchors start at 16 px on P2; the FPN, box head and mask
      head are narrow (64 / 256 / 2 x 64) because the objects are simple.
    - Half-pixel aligned RoIAlign (detectron2's) for pooling and for the mask targets: with the
      original one, masks of small objects sat a pixel or two off. With lr 0.03 instead of 0.02 it
      took GroupNorm runs from 0.686 to 0.712.
    - A short warm-up, then cosine decay to zero at MAX_ITERS, and gradient clipping, which keeps
      the first steps from scratch stable. 900 steps (7,200 images): 390 to 475 s of training here
      (0.43 to 0.53 s a step, as busy as the shared machine was), segm AP 0.764 / AP50 0.949 with
      the paste below (800 steps with torchvision's paste: 0.715 / 0.935).
    - NCHW in both modes (CHANNELS_LAST False), as the calibration above ran. On an AVX-512 Xeon the
      default (None) would train in channels-last: 0.32 s against 0.36 s a step in
      bench/bench_training.py on a quiet machine, but no difference measurable in train.py's loop
      (0.37 to 0.39 s a step either way), with other float rounding than the calibrated runs.
    - Masks pasted as detectron2 does (MASK_PASTE "grid_sample": each pixel samples the 28x28 mask in the
      exact box) rather than torchvision's way (box cut to whole pixels, padded mask resized): on the
      demo's trained model, segm AP 0.715 -> 0.739 and Boundary AP 0.458 -> 0.522 on the same weights,
      because a pixel or two of error is a large share of a 19-64 px object.
    """

    NAME = "shapes"
    BACKBONE = "resnet18"
    NORM = "bn"
    TRAINABLE_BACKBONE_LAYERS = 5
    FPN_CHANNELS = 64
    ANCHOR_SIZES = (16, 32, 64, 128, 256)
    RPN_PRE_NMS_TOP_N_TRAIN = 300
    RPN_POST_NMS_TOP_N_TRAIN = 150
    RPN_PRE_NMS_TOP_N_TEST = 300
    RPN_POST_NMS_TOP_N_TEST = 100
    RPN_BATCH_SIZE_PER_IMAGE = 128
    ROI_BATCH_SIZE_PER_IMAGE = 64
    POOL_ALIGNED = True
    BOX_HEAD_DIM = 256
    MASK_HEAD_CONVS = 2
    MASK_HEAD_CHANNELS = 64
    DETECTION_MAX_INSTANCES = 20
    MASK_PASTE = "grid_sample"
    CHANNELS_LAST = False
    IMAGE_MIN_DIM = 128
    IMAGE_MAX_DIM = 128
    IMAGE_MIN_DIM_TRAIN = (128,)
    NUM_CLASSES = 1 + 4
    LABELS_ARE_CATEGORY_IDS = False
    CLASS_NAMES = ("__background__", "square", "circle", "triangle", "star")
    TRAIN_SPLIT = "train"
    VAL_SPLIT = "val"
    # Loading in the training process: a batch of eight 128 px PNGs takes 13 ms (3% of a step), and on
    # two cores a worker process would take a core from the step's two threads. The batches and flips
    # are the same either way (the sampler draws them).
    NUM_WORKERS = 0
    BATCH_SIZE = 8
    LEARNING_RATE = 0.03
    WARMUP_ITERS = 100
    LR_SCHEDULE = "cosine"
    MAX_ITERS = 900
    GRADIENT_CLIP_NORM = 10.0
    CHECKPOINT_PERIOD = 300
    EVAL_PERIOD = 0
    LOG_PERIOD = 10


class CustomConfig(Config):
    """Fine-tuning on one's own data (`python train.py --config custom --data DATA --weights coco`): a few
    hundred images in our layout (`python coco.py convert` writes it), any number of classes.

    - The network is torchvision's COCO R50-FPN (v1), so `--weights coco` loads all of it but the
      class-specific layers (box classifier and regressor, mask logits), which are skipped because their
      shape differs (logged). Frozen BN with eps 0 as those weights need.
    - NUM_CLASSES and CLASS_NAMES come from the data set (CLASSES_FROM_DATA); labels are 1..K.
    - The schedule is matterport's two stages for small data sets: the heads alone first (the new
      layers start random, and a few hundred images would pull the pretrained backbone far with large
      early gradients), then the whole network. 1,500 steps of 4 images are about 20 epochs of 300
      images; lr 0.01 is torchvision's 0.02 for 16 images scaled down for the smaller batch, with a
      short warm-up and cosine decay, and clipping as in the shapes preset.
    """

    NAME = "custom"
    CLASSES_FROM_DATA = True
    LABELS_ARE_CATEGORY_IDS = False
    NUM_CLASSES = 2
    CLASS_NAMES = ("__background__", "object")
    TRAIN_SPLIT = "train"
    VAL_SPLIT = "val"
    BATCH_SIZE = 4
    LEARNING_RATE = 0.01
    WARMUP_ITERS = 50
    LR_SCHEDULE = "cosine"
    MAX_ITERS = 1500
    TRAINING_STAGES = ((0, "heads"), (500, "all"))
    GRADIENT_CLIP_NORM = 10.0
    CHECKPOINT_PERIOD = 250
    EVAL_PERIOD = 500
    LOG_PERIOD = 10


class Detectron2R50FPN3xConfig(Config):
    """detectron2's model zoo Mask R-CNN R50-FPN 3x (41.0 box / 37.2 mask AP on COCO val2017):
    `python detect.py --config d2_r50_fpn_3x --weights d2_r50_fpn_3x`, or
    `MaskRCNN(Detectron2R50FPN3xConfig()).load_weights("model_final_f10217.pkl")`.

    Each value is detectron2's, from its configs/Base-RCNN-FPN.yaml, configs/COCO-InstanceSegmentation/
    mask_rcnn_R_50_FPN_3x.yaml and detectron2/config/defaults.py (paths in detectron2's repository), or
    from the code that reads them:
    - Backbone: MODEL.RESNETS.STRIDE_IN_1X1 True (modeling/backbone/resnet.py, BottleneckBlock), NORM
      "FrozenBN" with eps 1e-5 (layers/batch_norm.py, FrozenBatchNorm2d), FREEZE_AT 2 (stem and res2:
      the top three stages train).
    - Input: BGR in [0, 255], MODEL.PIXEL_MEAN (103.530, 116.280, 123.675) and PIXEL_STD (1, 1, 1),
      normalised in the model (modeling/meta_arch/rcnn.py). INPUT.MIN_SIZE_TEST 800, MAX_SIZE_TEST 1333
      with ResizeShortestEdge's int(x + 0.5) sides and PIL's antialiased bilinear
      (data/transforms/augmentation_impl.py, transform.py); MIN_SIZE_TRAIN (640, ..., 800).
    - Anchors: ANCHOR_GENERATOR.SIZES 32-512, ratios 0.5/1/2, OFFSET 0, not rounded, strides 4-64
      (modeling/anchor_generator.py).
    - RPN: PRE_NMS_TOPK_TRAIN/TEST 2000/1000 per level, POST_NMS_TOPK_TRAIN/TEST 1000/1000 per image,
      NMS 0.7 ranked on logits, MIN_SIZE 0 with nonempty()'s strict > (proposal_generator/proposal_utils.py),
      SMOOTH_L1_BETA 0.
    - RoI heads: ROIAlignV2 (aligned) with POOLER_SAMPLING_RATIO 0 (adaptive), 7x7 and 14x14, levels by
      floor(4 + log2(sqrt(area) / 224 + 1e-8)) (modeling/poolers.py); SCORE_THRESH_TEST 0.05 with no
      small-box filter, NMS 0.5, 100 detections (roi_heads/fast_rcnn.py); box regression SMOOTH_L1_BETA 0.
    - Output: boxes scaled back, clipped and emptied ones dropped (modeling/postprocessing.py); masks
      pasted by grid_sample and thresholded at >= 0.5 (layers/mask_ops.py).
    - Classes: 80, contiguous in COCO category-id order (data/datasets/builtin_meta.py); the file puts
      background last, the loader moves it to our index 0 (model.convert_detectron2_state_dict), so
      labels are 1..80 and coco.py maps them to category ids (LABELS_ARE_CATEGORY_IDS False).
    - Training (SOLVER): 16 images, lr 0.02, 270k steps, decay at 210k and 250k, warm-up 1000 from 0.001.
    """

    NAME = "d2_r50_fpn_3x"
    STRIDE_IN_1X1 = True
    FROZEN_BN_EPS = 1e-5
    INPUT_FORMAT = "BGR255"
    PIXEL_MEAN = (103.530, 116.280, 123.675)
    PIXEL_STD = (1.0, 1.0, 1.0)
    RESIZE_ROUNDING = "round"
    RESIZE_ANTIALIAS = True
    IMAGE_MIN_DIM_TRAIN = (640, 672, 704, 736, 768, 800)
    ANCHOR_ROUND = False
    ANCHOR_STRIDES = (4, 8, 16, 32, 64)
    RPN_POST_NMS_TOP_N_TRAIN = 1000
    RPN_MIN_SIZE = 0.0
    RPN_MIN_SIZE_STRICT = True
    RPN_NMS_ON_LOGITS = True
    SMOOTH_L1_BETA = 0.0
    POOL_ALIGNED = True
    POOL_SAMPLING_RATIO = 0
    POOL_LEVEL_FORMULA = "detectron2"
    DETECTION_MIN_SIZE = 0.0
    RESCALE_CLIP_AND_DROP_EMPTY = True
    MASK_PASTE = "grid_sample"
    MASK_THRESHOLD_INCLUSIVE = True
    NUM_CLASSES = 1 + 80
    LABELS_ARE_CATEGORY_IDS = False
    CLASS_NAMES = tuple(name for name in COCO_CLASS_NAMES if name != "N/A")
    CATEGORY_IDS = tuple(i for i, name in enumerate(COCO_CLASS_NAMES) if i and name != "N/A")  # 1, 2, ..., 90
    LR_STEPS = (210000, 250000)
    MAX_ITERS = 270000


class Detectron2R101FPN3xConfig(Detectron2R50FPN3xConfig):
    """detectron2's model zoo Mask R-CNN R101-FPN 3x (42.9 box / 38.6 mask AP): the R50 preset with
    MODEL.RESNETS.DEPTH 101 (configs/COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml)."""

    NAME = "d2_r101_fpn_3x"
    BACKBONE = "resnet101"


# The presets that --config names.
CONFIGS = {"coco": Config, "shapes": ShapesConfig, "custom": CustomConfig, "d2_r50_fpn_3x": Detectron2R50FPN3xConfig,
           "d2_r101_fpn_3x": Detectron2R101FPN3xConfig}


def named_config(name: str) -> Config:
    if name not in CONFIGS:
        raise ValueError(f"--config must be one of {', '.join(CONFIGS)}; got {name!r}")
    return CONFIGS[name]()
