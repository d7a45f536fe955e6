"""Configuration of the Mask R-CNN model, its data and its training.

`Config()` unchanged is torchvision's COCO `maskrcnn_resnet50_fpn` (v1): 91 outputs indexed by COCO
category id, frozen BatchNorm with eps 0, so `MaskRCNN(Config()).load_weights(<that checkpoint>)`
reproduces torchvision's detections. Subclass it and override attributes for other data sets:

    class ShapesConfig(Config):
        NAME = "shapes"
        NUM_CLASSES = 1 + 3

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
    POOL_SAMPLING_RATIO = 2  # bilinear samples per bin and axis (<= 0: adaptive)
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
    # gamma = 0 with no alpha is exactly the ordinary loss.
    RPN_FOCAL_LOSS = False  # for RPN objectness
    BOX_FOCAL_LOSS = False  # for the box classifier (softmax focal loss)
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
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

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
