"""Configuration of the Mask R-CNN model, its data and its training.

`Config()` unchanged is torchvision's COCO `maskrcnn_resnet50_fpn` (v1): 91 outputs indexed by COCO
category id, frozen BatchNorm with eps 0, so `MaskRCNN(Config()).load_weights(<that checkpoint>)`
reproduces torchvision's detections. Subclass it and override attributes for other data sets:

    class BalloonConfig(Config):
        NAME = "balloon"
        NUM_CLASSES = 1 + 1

Any attribute can also be set from a command line with `--set KEY=VALUE` (see `override`).
"""

import ast
import json

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


# Trainable ResNet stages (TRAINABLE_BACKBONE_LAYERS) for each name a training stage may use.
STAGE_LAYERS = {"heads": 0, "5+": 1, "4+": 2, "3+": 3, "2+": 4, "all": 5}


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
    # How many of the backbone's stages train (0-5, from the top: layer4, layer3, layer2, layer1, conv1).
    # torchvision trains 3 when starting from pretrained weights.
    TRAINABLE_BACKBONE_LAYERS = 3
    FPN_CHANNELS = 256  # channels of every pyramid level (P2-P6)

    # ---- Anchors and Region Proposal Network ------------------------------------------------------
    ANCHOR_SIZES = (32, 64, 128, 256, 512)  # one size per level, P2 to P6 (pixels)
    ANCHOR_RATIOS = (0.5, 1.0, 2.0)  # height / width
    RPN_CONVS = 1  # 3x3 convs before the RPN's predictors (torchvision v2: 2)
    RPN_PRE_NMS_TOP_N_TRAIN = 2000  # proposals kept per level before NMS
    RPN_PRE_NMS_TOP_N_TEST = 1000
    RPN_POST_NMS_TOP_N_TRAIN = 2000  # proposals kept per image after NMS
    RPN_POST_NMS_TOP_N_TEST = 1000
    RPN_NMS_THRESHOLD = 0.7
    RPN_SCORE_THRESHOLD = 0.0  # proposals with a lower objectness probability are dropped
    RPN_MIN_SIZE = 1e-3  # proposals narrower or lower than this (pixels) are dropped
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

    # ---- Detection ------------------------------------------------------------------------------
    DETECTION_MIN_CONFIDENCE = 0.05  # detections with a lower class score are dropped
    DETECTION_NMS_THRESHOLD = 0.5  # per-class NMS
    DETECTION_MAX_INSTANCES = 100  # per image
    DETECTION_MIN_SIZE = 1e-2  # boxes narrower or lower than this (pixels) are dropped
    MASK_THRESHOLD = 0.5  # detect() thresholds mask probabilities at this

    # Keep feature maps channels-last (NHWC): faster convolutions on CPU (oneDNN) and on recent GPUs,
    # and our RoIAlign reads NHWC maps directly. Results are the same up to float rounding.
    CHANNELS_LAST = True

    # ---- Images ---------------------------------------------------------------------------------
    IMAGE_MIN_DIM = 800  # the shorter side is resized to this ...
    IMAGE_MAX_DIM = 1333  # ... unless the longer side would exceed this
    IMAGE_MIN_DIM_TRAIN = (800,)  # training draws the shorter side from these (multi-scale training)
    IMAGE_SIZE_DIVISOR = 32  # batches are zero-padded to a multiple of this
    PIXEL_MEAN = (0.485, 0.456, 0.406)  # RGB in [0, 1], ImageNet statistics
    PIXEL_STD = (0.229, 0.224, 0.225)

    # ---- Classes --------------------------------------------------------------------------------
    NUM_CLASSES = 91  # including background (index 0)
    # True when labels are the data set's category ids (torchvision's COCO weights); False when they
    # are contiguous 1..K and the data set keeps the map to its category ids.
    LABELS_ARE_CATEGORY_IDS = True
    CLASS_NAMES = COCO_CLASS_NAMES

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

    def _set(self, key, value):
        if key not in self.keys():
            raise KeyError(f"unknown config attribute {key!r}; known: {', '.join(self.keys())}")
        setattr(self, key, value)

    def validate(self):
        if self.VARIANT not in ("v1", "v2"):
            raise ValueError(f"VARIANT must be 'v1' or 'v2'; got {self.VARIANT!r}")
        if self.BACKBONE not in ("resnet18", "resnet34", "resnet50", "resnet101"):
            raise ValueError(f"BACKBONE must be resnet18, resnet34, resnet50 or resnet101; got {self.BACKBONE!r}")
        if self.NORM not in ("frozen_bn", "bn", "gn"):
            raise ValueError(f"NORM must be 'frozen_bn', 'bn' or 'gn'; got {self.NORM!r}")
        if not 0 <= self.TRAINABLE_BACKBONE_LAYERS <= 5:
            raise ValueError(f"TRAINABLE_BACKBONE_LAYERS must be in 0..5; got {self.TRAINABLE_BACKBONE_LAYERS}")
        if not isinstance(self.NUM_CLASSES, int) or self.NUM_CLASSES < 2:
            raise ValueError(f"NUM_CLASSES must be an int >= 2 (background + classes); got {self.NUM_CLASSES!r}")
        if len(self.ANCHOR_SIZES) != 5:
            raise ValueError(f"ANCHOR_SIZES needs one size per level P2-P6 (5); got {self.ANCHOR_SIZES}")
        if self.LR_SCHEDULE not in ("step", "cosine"):
            raise ValueError(f"LR_SCHEDULE must be 'step' or 'cosine'; got {self.LR_SCHEDULE!r}")
        if not isinstance(self.BATCH_SIZE, int) or self.BATCH_SIZE < 1:
            raise ValueError(f"BATCH_SIZE must be a positive int; got {self.BATCH_SIZE!r}")
        for stage in self.TRAINING_STAGES:
            if len(stage) != 2 or stage[1] not in STAGE_LAYERS:
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
        """The inverse of to_dict; unknown keys are an error."""
        def as_tuple(value):
            return tuple(as_tuple(v) for v in value) if isinstance(value, list) else value

        return cls(**{k: as_tuple(v) for k, v in values.items()})

    def override(self, assignments):
        """Applies ["KEY=VALUE", ...] (from --set); VALUE is a Python literal or a bare string."""
        for assignment in assignments:
            key, sep, text = assignment.partition("=")
            if not sep:
                raise ValueError(f"--set expects KEY=VALUE; got {assignment!r}")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
            self._set(key.strip(), value)
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
      the first steps from scratch stable. 800 steps (6,400 images) fit in 10 minutes with room for
      this machine's noise (0.55 to 0.71 s a step).
    - NCHW activations: for these small maps channels-last convolutions were not faster on CPU.
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
    CHANNELS_LAST = False
    IMAGE_MIN_DIM = 128
    IMAGE_MAX_DIM = 128
    IMAGE_MIN_DIM_TRAIN = (128,)
    NUM_CLASSES = 1 + 4
    LABELS_ARE_CATEGORY_IDS = False
    CLASS_NAMES = ("__background__", "square", "circle", "triangle", "star")
    TRAIN_SPLIT = "train"
    VAL_SPLIT = "val"
    NUM_WORKERS = 1
    BATCH_SIZE = 8
    LEARNING_RATE = 0.03
    WARMUP_ITERS = 100
    LR_SCHEDULE = "cosine"
    MAX_ITERS = 800
    GRADIENT_CLIP_NORM = 10.0
    CHECKPOINT_PERIOD = 300
    EVAL_PERIOD = 0
    LOG_PERIOD = 10


# The presets that --config names.
CONFIGS = {"coco": Config, "shapes": ShapesConfig}


def named_config(name: str) -> Config:
    if name not in CONFIGS:
        raise ValueError(f"--config must be one of {', '.join(CONFIGS)}; got {name!r}")
    return CONFIGS[name]()
