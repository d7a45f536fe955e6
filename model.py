"""Mask R-CNN (He et al., 2017, arXiv 1703.06870): ResNet-FPN backbone, RPN, RoIAlign, box and mask heads.

The file reads top to bottom in the order data flows through the network:

    images -> preprocessing (normalise, resize, pad) -> ResNet -> FPN (P2-P6)
           -> anchors + RPN head -> proposals (decode, NMS per level)
           -> pyramid RoIAlign -> box head -> class scores and boxes (post-processing, NMS per class)
           -> pyramid RoIAlign -> mask head -> 28x28 masks -> pasted into the image

In training, anchors and proposals get their targets from one rule (assign_targets: match, then encode),
are sampled (sample_balanced), and the losses are free functions (rpn_losses, fastrcnn_losses, mask_loss
on mask_targets); MaskRCNN.training_targets returns those targets for a look at them.

Parameter names follow torchvision's `maskrcnn_resnet50_fpn` module tree, so its checkpoints load
without renaming, and with the same weights the outputs are the same (see tests/test_model.py).
Conventions: boxes are [N, (x1, y1, x2, y2)] in absolute pixels with no "+1" in widths; images given
to `forward` are lists of [3, H, W] float tensors in [0, 1]; class 0 is background.
"""

import logging
import math
import os
import re
from collections import OrderedDict
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import guard_or_false, guard_or_true

import utils
from config import Config
from nms import batched_nms
from roialign import interpolation_code, roi_align

logger = logging.getLogger(__name__)


############################################################
#  Normalisation layers
############################################################


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (all buffers, nothing trains).

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, computed as x * scale + shift.
    torchvision's COCO weights were converted with eps = 0, so reproducing them needs eps = 0.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # present in nn.BatchNorm2d checkpoints
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scale_and_shift(self):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.scale_and_shift()
        return x * scale.reshape(1, -1, 1, 1).to(x.dtype) + shift.reshape(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: str, channels: int, frozen_eps: float = 1e-5) -> nn.Module:
    """"frozen_bn", "bn" or "gn" (32 groups, as in Wu and He, 2018)."""
    if kind == "frozen_bn":
        return FrozenBatchNorm2d(channels, eps=frozen_eps)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(32, channels)
    raise ValueError(f"norm must be 'frozen_bn', 'bn' or 'gn'; got {kind!r}")


def conv_norm(x: Tensor, conv: nn.Conv2d, norm: nn.Module) -> Tensor:
    """norm(conv(x)), with a frozen BN folded into the conv's weights and bias: one pass over the
    activations instead of two (the fold costs a pass over the weights, which are much smaller)."""
    if not isinstance(norm, FrozenBatchNorm2d):
        return norm(conv(x))
    scale, shift = norm.scale_and_shift()
    weight = conv.weight * scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return F.conv2d(x, weight, bias.to(weight.dtype), conv.stride, conv.padding, conv.dilation, conv.groups)


def conv_norm_relu(in_channels: int, out_channels: int, norm: Optional[str] = None) -> nn.Sequential:
    """3x3 conv (+ norm) + ReLU, named like torchvision's Conv2dNormActivation (".0" conv, ".1" norm)."""
    layers = [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=norm is None)]
    if norm is not None:
        layers.append(make_norm(norm, out_channels))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


############################################################
#  ResNet (torchvision layout; the stride is on the 3x3 conv, "ResNet v1.5", or on the first 1x1)
############################################################


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels, width, stride, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride, 1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != width:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, width, 1, stride, bias=False), norm(width))

    def forward(self, x):
        identity = x if self.downsample is None else conv_norm(x, *self.downsample)
        out = self.relu(conv_norm(x, self.conv1, self.bn1))
        out = conv_norm(out, self.conv2, self.bn2)
        out += identity  # in place: a new tensor the size of the feature map costs more than the add
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1, 3x3, 1x1 convs. stride_in_1x1: subsample in the first 1x1 conv (MSRA's ResNet, detectron2's
    STRIDE_IN_1X1) rather than in the 3x3 (torchvision); the weights have the same shapes either way."""

    expansion = 4

    def __init__(self, in_channels, width, stride, norm, stride_in_1x1=False):
        super().__init__()
        out_channels = width * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride_1x1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride_3x3, 1, bias=False)
        self.bn2 = norm(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = norm(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), norm(out_channels)
            )

    def forward(self, x):
        identity = x if self.downsample is None else conv_norm(x, *self.downsample)
        out = self.relu(conv_norm(x, self.conv1, self.bn1))
        out = self.relu(conv_norm(out, self.conv2, self.bn2))
        out = conv_norm(out, self.conv3, self.bn3)
        out += identity  # in place, as in BasicBlock
        return self.relu(out)


RESNETS = {  # block, blocks per stage
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """The ResNet trunk without its classifier. Returns C2-C5 (strides 4, 8, 16, 32).
    stride_in_1x1: see Bottleneck (basic blocks have no 1x1 conv to take the stride)."""

    def __init__(self, name: str, norm, stride_in_1x1: bool = False):
        super().__init__()
        block, depths = RESNETS[name]
        if stride_in_1x1 and block is not Bottleneck:
            raise ValueError(f"STRIDE_IN_1X1 needs a bottleneck ResNet (resnet50, resnet101); got {name}")
        options = {"stride_in_1x1": True} if stride_in_1x1 else {}
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_channels = 64
        for stage, (width, depth) in enumerate(zip((64, 128, 256, 512), depths)):
            blocks = []
            for i in range(depth):
                blocks.append(block(in_channels, width, 2 if i == 0 and stage > 0 else 1, norm, **options))
                in_channels = width * block.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.out_channels = [width * block.expansion for width in (64, 128, 256, 512)]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(conv_norm(x, self.conv1, self.bn1)))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]

    def freeze(self, trainable_layers: int):
        """Trains only the top `trainable_layers` stages (layer4, layer3, ..., conv1). The BatchNorm
        layers of frozen stages also keep their running statistics (they stay in eval mode)."""
        trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        if trainable_layers == 5:
            trainable.append("bn1")
        self.frozen_norms = [m for name, m in self.named_modules()
                             if isinstance(m, nn.modules.batchnorm._BatchNorm)
                             and not any(name.startswith(layer) for layer in trainable)]
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(any(name.startswith(layer) for layer in trainable))
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for norm in getattr(self, "frozen_norms", []):
            norm.eval()
        return self


############################################################
#  Feature Pyramid Network (Lin et al., 2017)
############################################################


class FPN(nn.Module):
    """P2-P5 from C2-C5 by lateral 1x1 convs and a nearest-neighbour top-down path, each smoothed by a
    3x3 conv; P6 is a stride-2 subsampling of P5 (max-pool with kernel 1), used by the RPN only."""

    def __init__(self, in_channels: list[int], channels: int, norm: Optional[str] = None):
        super().__init__()

        def conv(cin, kernel):
            layers = [nn.Conv2d(cin, channels, kernel, padding=kernel // 2, bias=norm is None)]
            if norm is not None:
                layers.append(make_norm(norm, channels))
            return nn.Sequential(*layers)

        self.inner_blocks = nn.ModuleList(conv(c, 1) for c in in_channels)
        self.layer_blocks = nn.ModuleList(conv(channels, 3) for _ in in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        inner = self.inner_blocks[-1](features[-1])
        results = [self.layer_blocks[-1](inner)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.inner_blocks[i](features[i])
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, self.layer_blocks[i](inner))
        results.append(F.max_pool2d(results[-1], 1, 2, 0))  # P6
        return results


class Backbone(nn.Module):
    """ResNet + FPN, as `backbone.body` and `backbone.fpn` (torchvision's names)."""

    def __init__(self, config: Config):
        super().__init__()
        eps = config.FROZEN_BN_EPS

        def norm(channels):
            return make_norm(config.NORM, channels, eps)

        self.body = ResNet(config.BACKBONE, norm, config.STRIDE_IN_1X1)
        self.body.freeze(config.TRAINABLE_BACKBONE_LAYERS)
        self.fpn = FPN(self.body.out_channels, config.FPN_CHANNELS, "bn" if config.VARIANT == "v2" else None)

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.fpn(self.body(x))


############################################################
#  Image preprocessing: normalise, resize, pad into a batch
############################################################


class ImageBatch:
    """Images normalised, resized and zero-padded into one tensor.

    tensor: [N, 3, H, W], H and W multiples of the size divisor.
    image_sizes: [(h, w)] of each resized image before padding.
    original_sizes: [(h, w)] of each image as given.
    scales: [float] the factor each image was resized by (each side is floor(original side * scale), 1 at least).
    """

    def __init__(self, tensor: Tensor, image_sizes, original_sizes, scales):
        self.tensor = tensor
        self.image_sizes = image_sizes
        self.original_sizes = original_sizes
        self.scales = scales


def resize_scale(height: int, width: int, min_size: float, max_size: float) -> float:
    """Scale that brings the shorter side to min_size unless the longer would exceed max_size.
    (torch.sym_min/max are min/max that keep symbolic sizes symbolic while torch.export traces.)"""
    return torch.sym_min(min_size / torch.sym_min(height, width), max_size / torch.sym_max(height, width))


def resized_size(height: int, width: int, min_size: float, max_size: float,
                 rounding: str = "floor") -> tuple[int, int]:
    """(h, w) of an image resized by resize_scale, 1 pixel at least (an image of extreme aspect ratio,
    1 x 1000, would otherwise have a side of 0 pixels). RESIZE_ROUNDING:

    "floor": each side floor(side * scale), as torchvision (the size F.interpolate(scale_factor=scale,
        recompute_scale_factor=True) picks).
    "round": detectron2's ResizeShortestEdge: the shorter side is min_size, the longer scaled by
        min_size / shorter; if the longer exceeds max_size both are scaled by max_size / longer; each is
        then int(x + 0.5). A 480 x 640 image becomes 800 x 1067 (floor: 800 x 1066).
    """
    if rounding == "floor":
        scale = resize_scale(height, width, min_size, max_size)
        # sym_int truncates, the floor of these positive sizes, in a form torch.export can also save.
        return (torch.sym_max(torch.sym_int(torch.sym_float(height) * scale), 1),
                torch.sym_max(torch.sym_int(torch.sym_float(width) * scale), 1))
    if rounding != "round":
        raise ValueError(f"RESIZE_ROUNDING must be 'floor' or 'round'; got {rounding!r}")
    # The same arithmetic as ResizeShortestEdge, without Python branches on the sizes, which would fix an
    # exported program to the example's orientation: shrink is 1 where the longer side fits max_size.
    shorter, longer = torch.sym_min(height, width), torch.sym_max(height, width)
    new_longer = min_size / shorter * longer
    shrink = torch.sym_min(1.0, max_size / new_longer)
    new_shorter = torch.sym_max(torch.sym_int(min_size * shrink + 0.5), 1)
    new_longer = torch.sym_max(torch.sym_int(new_longer * shrink + 0.5), 1)
    portrait = height >= width  # a square's "shorter" side is its width, as in detectron2
    return torch.sym_ite(portrait, new_longer, new_shorter), torch.sym_ite(portrait, new_shorter, new_longer)


def preprocess(images: list[Tensor], config: Config, targets=None, min_size: Optional[int] = None,
               dtype: torch.dtype = torch.float32):
    """Converts to `dtype` (the model's) and to INPUT_FORMAT (RGB in [0, 1], or BGR in [0, 255]), normalises
    with PIXEL_MEAN/STD, resizes (bilinear, as torchvision; antialiased with RESIZE_ANTIALIAS), pads to
    IMAGE_SIZE_DIVISOR.

    Each image is resized to resized_size (RESIZE_ROUNDING, 1 pixel at least).
    Targets (training) are resized with their images: boxes scaled per axis, masks by nearest neighbour.
    """
    min_size = config.IMAGE_MIN_DIM if min_size is None else min_size
    mean = torch.tensor(config.PIXEL_MEAN, dtype=dtype, device=images[0].device)[:, None, None]
    std = torch.tensor(config.PIXEL_STD, dtype=dtype, device=images[0].device)[:, None, None]
    resized, sizes, scales, new_targets = [], [], [], []
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        scales.append(resize_scale(h, w, min_size, config.IMAGE_MAX_DIM))
        size = resized_size(h, w, min_size, config.IMAGE_MAX_DIM, config.RESIZE_ROUNDING)
        image = image.to(dtype)
        if config.INPUT_FORMAT == "BGR255":
            image = image.flip(0) * 255
        image = F.interpolate(((image - mean) / std)[None], size=size, mode="bilinear", align_corners=False,
                              antialias=config.RESIZE_ANTIALIAS)[0]
        resized.append(image)
        sizes.append(tuple(image.shape[-2:]))
        if targets is not None:
            target = dict(targets[i])
            ratio_h, ratio_w = image.shape[-2] / h, image.shape[-1] / w
            scale_xyxy = torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h], device=image.device)
            for key in ("boxes", "crowd_boxes"):
                if key in target:
                    target[key] = target[key] * scale_xyxy.to(target[key].dtype)
            if "masks" in target:
                masks = target["masks"]
                target["masks"] = F.interpolate(masks[:, None].float(), size=image.shape[-2:])[:, 0].byte()
            new_targets.append(target)
    divisor = config.IMAGE_SIZE_DIVISOR
    # Rounded up with integer division, which keeps the sizes symbolic while torch.export traces.
    height = (max(s[0] for s in sizes) + divisor - 1) // divisor * divisor
    width = (max(s[1] for s in sizes) + divisor - 1) // divisor * divisor
    batch = torch.stack([F.pad(image, (0, width - image.shape[2], 0, height - image.shape[1])) for image in resized])
    originals = [tuple(image.shape[-2:]) for image in images]
    return ImageBatch(batch, sizes, originals, scales), (new_targets if targets is not None else None)


############################################################
#  Anchors
############################################################


def cell_anchors(size: float, ratios, dtype, device, rounded: bool = True) -> Tensor:
    """[A, 4] anchors centred on (0, 0) for one size and every ratio (height / width), corners rounded
    to integers as torchvision does (ANCHOR_ROUND), or exact as detectron2's."""
    ratios = torch.as_tensor(ratios, dtype=dtype, device=device)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = w_ratios * size
    hs = h_ratios * size
    corners = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
    return corners.round() if rounded else corners


def anchor_strides(features: list[Tensor], image_size, config: Config) -> list[tuple[int, int]]:
    """(stride_h, stride_w) in pixels of each level's anchors: ANCHOR_STRIDES where given (detectron2),
    otherwise the padded image size // the feature size (torchvision)."""
    if config.ANCHOR_STRIDES:
        return [(s, s) for s in config.ANCHOR_STRIDES[: len(features)]]
    return [(image_size[0] // f.shape[-2], image_size[1] // f.shape[-1]) for f in features]


def generate_anchors(features: list[Tensor], image_size, config: Config) -> Tensor:
    """[sum over levels of H * W * A, 4] anchors for a padded batch image of `image_size` (h, w), in
    (level, y, x, anchor) order, at anchor_strides; no half-cell offset (torchvision and detectron2)."""
    anchors = []
    strides = anchor_strides(features, image_size, config)
    for feature, size, (stride_h, stride_w) in zip(features, config.ANCHOR_SIZES, strides):
        grid_h, grid_w = feature.shape[-2:]
        base = cell_anchors(size, config.ANCHOR_RATIOS, feature.dtype, feature.device, config.ANCHOR_ROUND)
        # Cells in (y, x) order from one arange (no meshgrid, whose broadcasting torch.export would fix to
        # the example's grid size).
        cell = torch.arange(grid_h * grid_w, dtype=torch.int32, device=feature.device)
        shift_x, shift_y = cell % grid_w * stride_w, cell // grid_w * stride_h
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
        anchors.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
    return torch.cat(anchors)


def anchors_for_input(height: int, width: int, config: Config) -> tuple[Tensor, Tensor]:
    """The RPN's anchors for one network input of (height, width) pixels (the resized image, before
    padding), without running the network (visualize.anchor_coverage).

    Returns anchors [A, 4] (x1, y1, x2, y2) in the input's pixels, in generate_anchors' order, and
    levels [A] int64 (0 = P2). The input is padded to IMAGE_SIZE_DIVISOR; every stride-2 layer of the
    backbone (conv1, the max-pool, the first block of layer2-4, P6's pool) maps n cells to ceil(n / 2).
    """
    divisor = config.IMAGE_SIZE_DIVISOR
    grid = (math.ceil(height / divisor) * divisor, math.ceil(width / divisor) * divisor)
    padded = grid
    grids = []
    for halvings in (2, 1, 1, 1, 1):  # P2 is at stride 4, P3-P6 each double it
        for _ in range(halvings):
            grid = (math.ceil(grid[0] / 2), math.ceil(grid[1] / 2))
        grids.append(grid)
    features = [torch.empty((0, *g)) for g in grids]  # only their shapes are read
    anchors = generate_anchors(features, padded, config)
    counts = torch.tensor([g[0] * g[1] * len(config.ANCHOR_RATIOS) for g in grids])
    return anchors, torch.repeat_interleave(torch.arange(len(grids)), counts)


############################################################
#  Box coding, matching, sampling, target assignment
############################################################

BOX_DELTA_CLAMP = math.log(1000.0 / 16)  # the largest log-scale change of a box (Detectron)


def encode_boxes(reference: Tensor, proposals: Tensor, weights) -> Tensor:
    """Deltas [N, 4] (dx, dy, dw, dh) that turn `proposals` [N, 4] into `reference` [N, 4]."""
    wx, wy, ww, wh = weights
    ex_w = proposals[:, 2] - proposals[:, 0]
    ex_h = proposals[:, 3] - proposals[:, 1]
    ex_x = proposals[:, 0] + 0.5 * ex_w
    ex_y = proposals[:, 1] + 0.5 * ex_h
    gt_w = reference[:, 2] - reference[:, 0]
    gt_h = reference[:, 3] - reference[:, 1]
    gt_x = reference[:, 0] + 0.5 * gt_w
    gt_y = reference[:, 1] + 0.5 * gt_h
    dx = wx * (gt_x - ex_x) / ex_w
    dy = wy * (gt_y - ex_y) / ex_h
    return torch.stack((dx, dy, ww * torch.log(gt_w / ex_w), wh * torch.log(gt_h / ex_h)), dim=1)


def decode_boxes(deltas: Tensor, boxes: Tensor, weights) -> Tensor:
    """Boxes [N, K, 4] from deltas [N, K * 4] applied to boxes [N, 4] (the inverse of encode_boxes).
    Computed in float32 at least: under autocast the deltas may be bfloat16, far too coarse for pixels."""
    deltas = deltas.to(torch.promote_types(deltas.dtype, torch.float32))
    boxes = boxes.to(deltas.dtype)
    wx, wy, ww, wh = weights
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = torch.clamp(deltas[:, 2::4] / ww, max=BOX_DELTA_CLAMP)
    dh = torch.clamp(deltas[:, 3::4] / wh, max=BOX_DELTA_CLAMP)
    x = dx * widths[:, None] + ctr_x[:, None]
    y = dy * heights[:, None] + ctr_y[:, None]
    half_w = 0.5 * (torch.exp(dw) * widths[:, None])
    half_h = 0.5 * (torch.exp(dh) * heights[:, None])
    return torch.stack((x - half_w, y - half_h, x + half_w, y + half_h), dim=2)


def clip_boxes(boxes: Tensor, size) -> Tensor:
    """Clamps x to [0, w] and y to [0, h]; size = (h, w)."""
    x = boxes[..., 0::2].clamp(min=0, max=size[1])
    y = boxes[..., 1::2].clamp(min=0, max=size[0])
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


def large_enough(boxes: Tensor, min_size: float, strict: bool = False) -> Tensor:
    """Mask of boxes at least min_size wide and high, or with `strict` wider and higher than min_size
    (detectron2's Boxes.nonempty: strict with 0 keeps the boxes of positive width and height)."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    if strict:
        return (widths > min_size) & (heights > min_size)
    return (widths >= min_size) & (heights >= min_size)


class Matcher:
    """Assigns each prediction the ground-truth box it overlaps most.

    matches[i] = index of the ground truth, or BELOW_LOW (-1, background) below `low`, or
    BETWEEN (-2, ignored) in [low, high). With allow_low_quality_matches, every ground truth also keeps
    the predictions it overlaps most even below `high` (Faster R-CNN's RPN rule).
    """

    BELOW_LOW = -1
    BETWEEN = -2

    def __init__(self, high: float, low: float, allow_low_quality_matches: bool):
        self.high, self.low, self.allow_low_quality_matches = high, low, allow_low_quality_matches

    def __call__(self, iou: Tensor) -> Tensor:
        """iou: [G, P] -> matches [P] int64."""
        if iou.shape[0] == 0:
            return torch.full((iou.shape[1],), self.BELOW_LOW, dtype=torch.int64, device=iou.device)
        best, matches = iou.max(dim=0)
        all_matches = matches.clone()
        matches[best < self.low] = self.BELOW_LOW
        matches[(best >= self.low) & (best < self.high)] = self.BETWEEN
        if self.allow_low_quality_matches:
            best_per_gt = iou.max(dim=1).values
            predictions = torch.where(iou == best_per_gt[:, None])[1]
            matches[predictions] = all_matches[predictions]
        return matches


class BalancedSample(NamedTuple):
    """The predictions chosen for a loss. positive, negative: [P] bool masks (disjoint)."""

    positive: Tensor
    negative: Tensor


def sample_balanced(labels: Tensor, batch_size: int, positive_fraction: float) -> BalancedSample:
    """Random positives (label >= 1) and negatives (label 0) in proportion; labels < 0 are ignored.

    labels: [P] int. At most batch_size * positive_fraction positives; negatives fill the rest of
    batch_size. Draws from torch's RNG (positives first, then negatives).
    """
    positive = torch.where(labels >= 1)[0]
    negative = torch.where(labels == 0)[0]
    num_pos = min(positive.numel(), int(batch_size * positive_fraction))
    num_neg = min(negative.numel(), batch_size - num_pos)
    pos_idx = positive[torch.randperm(positive.numel(), device=labels.device)[:num_pos]]
    neg_idx = negative[torch.randperm(negative.numel(), device=labels.device)[:num_neg]]
    pos_mask = torch.zeros_like(labels, dtype=torch.bool)
    neg_mask = torch.zeros_like(labels, dtype=torch.bool)
    pos_mask[pos_idx] = True
    neg_mask[neg_idx] = True
    return BalancedSample(pos_mask, neg_mask)


def inside_crowd(boxes: Tensor, target: dict, threshold: float) -> Tensor:
    """[N] bool: boxes whose intersection with one of the target's crowd regions ("crowd_boxes",
    optional) covers more than `threshold` of their own area. They are left out of sampling."""
    crowd = target.get("crowd_boxes")
    if crowd is None or crowd.shape[0] == 0:
        return torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    inter = utils.box_intersection(boxes, crowd.to(boxes))
    return (inter / utils.box_area(boxes).clamp(min=1e-6)[:, None]).amax(dim=1) > threshold


IGNORED = -1  # the label of predictions that no loss sees


class AssignedTargets(NamedTuple):
    """What P predictions (anchors or proposals) should output, from one image's ground truth.

    labels: [P] int64: the class of the matched ground truth (1 for every object when classes are not
        asked for, as in the RPN), 0 background, IGNORED (-1) between the IoU thresholds or background
        inside a crowd region. The samplers read only these.
    matched_gt: [P] int64 index into the ground truth for foreground predictions (labels >= 1), -1 otherwise.
    deltas: [P, 4] regression targets (encode_boxes with the given weights), 0 where not foreground.
    crowd: [P] bool, not foreground and inside a crowd region (labels IGNORED because of the crowd).
    """

    labels: Tensor
    matched_gt: Tensor
    deltas: Tensor
    crowd: Tensor


def assign_targets(boxes: Tensor, target: dict, matcher: Matcher, weights, crowd_threshold: float,
                   with_classes: bool) -> AssignedTargets:
    """Matches `boxes` [P, 4] to the target's ground truth ("boxes" [G, 4], "labels" [G], optional
    "crowd_boxes" [C, 4], all in the pixels of `boxes`), then encodes the foreground's regression targets.
    One rule for the RPN (anchors, with_classes=False) and the RoI heads (proposals, with_classes=True)."""
    gt = target["boxes"]
    matches = matcher(utils.box_iou(gt, boxes))
    foreground = matches >= 0
    matched_gt = torch.where(foreground, matches, -1)
    labels = torch.zeros_like(matches)
    if with_classes:
        labels[foreground] = target["labels"][matches[foreground]].to(labels.dtype)
    else:
        labels[foreground] = 1
    labels[matches == Matcher.BETWEEN] = IGNORED
    crowd = ~foreground & inside_crowd(boxes, target, crowd_threshold)
    labels[crowd] = IGNORED
    # In the dtype the encoding computes in: float32 ground truth against bfloat16 anchors (autocast) stays
    # float32, as the losses compare them.
    deltas = torch.zeros(boxes.shape[0], 4, dtype=torch.promote_types(gt.dtype, boxes.dtype), device=boxes.device)
    deltas[foreground] = encode_boxes(gt[matches[foreground]], boxes[foreground], weights)
    return AssignedTargets(labels, matched_gt, deltas, crowd)


############################################################
#  Region Proposal Network
############################################################


class RPNHead(nn.Module):
    """3x3 conv(s) + ReLU, then per anchor an objectness logit and 4 box deltas, on every level."""

    def __init__(self, channels: int, num_anchors: int, convs: int = 1, prior_probability: Optional[float] = None):
        super().__init__()
        self.conv = nn.Sequential(*[nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
                                    for _ in range(convs)])
        self.cls_logits = nn.Conv2d(channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(channels, num_anchors * 4, 1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)
        if prior_probability is not None:  # sigmoid(bias) = prior_probability
            nn.init.constant_(self.cls_logits.bias, math.log(prior_probability / (1 - prior_probability)))

    def forward(self, features: list[Tensor]):
        """Returns objectness [N, sum(H*W*A)] and deltas [N, sum(H*W*A), 4] in (level, y, x, anchor) order."""
        logits, deltas = [], []
        for x in features:
            t = self.conv(x)
            objectness = self.cls_logits(t)
            n, a, h, w = objectness.shape
            logits.append(objectness.permute(0, 2, 3, 1).reshape(n, -1))
            deltas.append(self.bbox_pred(t).view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
        return torch.cat(logits, dim=1), torch.cat(deltas, dim=1)


class Proposals(NamedTuple):
    """One image's proposals, in the pixels of the resized image.

    boxes: [K, 4] after NMS, best first; scores: [K] their objectness probabilities.
    boxes_before_nms, scores_before_nms, levels_before_nms: [B, 4], [B], [B] int64 (FPN level, 0 = P2):
        the top anchors of each level decoded, clipped, small and low-scoring ones dropped, before NMS.
    """

    boxes: Tensor
    scores: Tensor
    boxes_before_nms: Tensor
    scores_before_nms: Tensor
    levels_before_nms: Tensor


class RPNOutput(NamedTuple):
    """proposals: a Proposals per image. anchors: [A, 4] of the padded batch image, levels concatenated
    (anchors_per_level: [A_level] counts). With targets (training): anchor_targets and anchor_samples, an
    AssignedTargets and a BalancedSample per image, and losses (loss_objectness, loss_rpn_box_reg);
    otherwise empty lists and an empty dict."""

    proposals: list[Proposals]
    anchors: Tensor
    anchors_per_level: list[int]
    anchor_targets: list[AssignedTargets]
    anchor_samples: list[BalancedSample]
    losses: dict


RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)  # the RPN's deltas are not scaled (torchvision)


class RPN(nn.Module):
    """Anchors, RPN head, proposal selection and, with targets, the anchors' targets and the RPN losses."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.head = RPNHead(config.FPN_CHANNELS, len(config.ANCHOR_RATIOS), config.RPN_CONVS,
                            config.RPN_PRIOR_PROBABILITY)
        self.matcher = Matcher(config.RPN_FG_IOU_THRESHOLD, config.RPN_BG_IOU_THRESHOLD, True)

    def forward(self, images: ImageBatch, features: list[Tensor], targets: Optional[list[dict]] = None) -> RPNOutput:
        """Proposals for every image. Targets (training: boxes, labels, optional crowd_boxes per image, in the
        resized images' pixels) also select the RPN_*_TRAIN numbers of proposals and give the losses."""
        c = self.config
        training = targets is not None
        objectness, deltas = self.head(features)  # (N, A), (N, A, 4)
        anchors = generate_anchors(features, images.tensor.shape[-2:], c)  # (A, 4)
        per_level = [f.shape[-2] * f.shape[-1] * len(c.ANCHOR_RATIOS) for f in features]
        pre_nms = c.RPN_PRE_NMS_TOP_N_TRAIN if training else c.RPN_PRE_NMS_TOP_N_TEST
        post_nms = c.RPN_POST_NMS_TOP_N_TRAIN if training else c.RPN_POST_NMS_TOP_N_TEST
        proposals = self.select_proposals(objectness.detach(), deltas.detach(), anchors, per_level, images.image_sizes,
                                          pre_nms, post_nms)
        if not training:
            return RPNOutput(proposals, anchors, per_level, [], [], {})
        assigned = [assign_targets(anchors, target, self.matcher, RPN_BOX_WEIGHTS, c.CROWD_IGNORE_THRESHOLD, False)
                    for target in targets]
        samples = [sample_balanced(a.labels, c.RPN_BATCH_SIZE_PER_IMAGE, c.RPN_POSITIVE_FRACTION) for a in assigned]
        return RPNOutput(proposals, anchors, per_level, assigned, samples,
                         rpn_losses(objectness, deltas, assigned, samples, c))

    def select_proposals(self, objectness, deltas, anchors, per_level, image_sizes, pre_nms,
                         post_nms) -> list[Proposals]:
        """Top `pre_nms` anchors by objectness on each level, decoded, clipped, small ones dropped, NMS
        within each level, then the best `post_nms` of the image.

        objectness: [N, A] logits; deltas: [N, A, 4]; anchors: [A, 4]; per_level: anchors per level.
        """
        c = self.config
        top, levels = [], []
        offset = 0
        for level, count in enumerate(per_level):
            k = min(pre_nms, count)
            top.append(objectness[:, offset : offset + count].topk(k, dim=1).indices + offset)
            levels.append(torch.full((k,), level, dtype=torch.int64, device=objectness.device))
            offset += count
        top = torch.cat(top, dim=1)  # (N, sum of k)
        levels = torch.cat(levels)
        proposals = []
        for i, size in enumerate(image_sizes):
            idx = top[i]
            boxes = decode_boxes(deltas[i, idx], anchors[idx], RPN_BOX_WEIGHTS)[:, 0]
            boxes = clip_boxes(boxes, size)
            logits = objectness[i, idx].float()
            scores = torch.sigmoid(logits)
            keep = large_enough(boxes, c.RPN_MIN_SIZE, c.RPN_MIN_SIZE_STRICT) & (scores >= c.RPN_SCORE_THRESHOLD)
            boxes, scores, level = boxes[keep], scores[keep], levels[keep]
            ranking = logits[keep] if c.RPN_NMS_ON_LOGITS else scores
            keep = batched_nms(boxes, ranking, level, c.RPN_NMS_THRESHOLD)[:post_nms]
            proposals.append(Proposals(boxes[keep], scores[keep], boxes, scores, level))
        return proposals


############################################################
#  Pyramid RoIAlign
############################################################


def pool_interpolations(setting) -> tuple[str, str]:
    """POOL_INTERPOLATION (one name, or a pair) -> (box pooling, mask pooling) interpolation."""
    if isinstance(setting, str):
        return setting, setting
    if isinstance(setting, (tuple, list)) and len(setting) == 2:
        return tuple(setting)
    raise ValueError(f"POOL_INTERPOLATION must be 'bilinear', 'bicubic' or a pair (box pooling, mask pooling) of "
                     f"them; got {setting!r}")


def pyramid_levels(boxes: Tensor, canonical_size: float, canonical_level: int, formula: str) -> Tensor:
    """[N] FPN levels (float, not clamped) of boxes [N, 4] (FPN paper, eq. 1), with POOL_LEVEL_FORMULA's
    epsilon, which decides boxes at a boundary between two levels:
    "torchvision" (LevelMapper): floor(level + log2(sqrt(area) / size) + 1e-6);
    "detectron2" (poolers.py, assign_boxes_to_levels): floor(level + log2(sqrt(area) / size + 1e-8))."""
    relative = torch.sqrt(utils.box_area(boxes)) / canonical_size
    if formula == "detectron2":
        return torch.floor(canonical_level + torch.log2(relative + 1e-8))
    if formula != "torchvision":
        raise ValueError(f"POOL_LEVEL_FORMULA must be 'torchvision' or 'detectron2'; got {formula!r}")
    eps = torch.tensor(1e-6, dtype=relative.dtype, device=relative.device)
    return torch.floor(canonical_level + torch.log2(relative) + eps)


def exported_level_scales(features: list[Tensor], height) -> list[Tensor]:
    """The scales PyramidRoIAlign infers, 2 ** round(log2(feature height / image height)), as 0-d float64
    tensors computed inside an exported program from its symbolic sizes. A Python float would be fixed to the
    example's sizes, and on images resized to under about 3 x IMAGE_SIZE_DIVISOR pixels high the inference
    gives other scales than 1 / stride (P5 of an image 18 px high, padded to 32: 1/16), as in eager mode."""
    scales = []
    for feature in features:
        ratio = torch.scalar_tensor(feature.shape[-2] / height, dtype=torch.float64, device=feature.device)
        scales.append(torch.exp2(torch.round(torch.log2(ratio))))
    return scales


class PyramidRoIAlign(nn.Module):
    """RoIAlign on the FPN level that suits each box's size (FPN paper, eq. 1):
    level = floor(4 + log2(sqrt(area) / 224)), clamped to P2-P5, with POOL_LEVEL_FORMULA's epsilon.
    `interpolation`: "bilinear" or "bicubic"."""

    def __init__(self, output_size: int, config: Config, interpolation: str = "bilinear"):
        super().__init__()
        self.output_size = output_size
        self.interpolation = interpolation_code(interpolation, "POOL_INTERPOLATION")
        self.sampling_ratio = config.POOL_SAMPLING_RATIO
        self.aligned = config.POOL_ALIGNED
        self.canonical_size = config.POOL_CANONICAL_SIZE
        self.canonical_level = config.POOL_CANONICAL_LEVEL
        self.level_formula = config.POOL_LEVEL_FORMULA

    def forward(self, features: list[Tensor], boxes: list[Tensor], image_sizes) -> Tensor:
        """features: P2-P5; boxes: [[Ki, 4]] per image -> [sum Ki, C, S, S]."""
        # The scale of each level, from the largest unpadded image (as torchvision infers it).
        largest = (max(s[0] for s in image_sizes), max(s[1] for s in image_sizes))
        exporting = torch.compiler.is_exporting()
        if exporting:
            scales = exported_level_scales(features, largest[0])
            first, last = -torch.log2(scales[0]), -torch.log2(scales[-1])
        else:
            scales = [2.0 ** round(math.log2(f.shape[-2] / largest[0])) for f in features]
            first, last = -math.log2(scales[0]), -math.log2(scales[-1])
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        levels = pyramid_levels(rois[:, 1:], self.canonical_size, self.canonical_level, self.level_formula)
        levels = (levels.clamp(first, last) - first).to(torch.int64)
        out = features[0].new_zeros((rois.shape[0], features[0].shape[1], self.output_size, self.output_size))
        for level, (feature, scale) in enumerate(zip(features, scales)):
            index = torch.where(levels == level)[0]
            if guard_or_true(index.numel() > 0):  # unknown while torch.export traces: then pooled (maybe none)
                # RoIs stay in float32 whatever the features' dtype (bfloat16 cannot hold pixel positions).
                level_rois, spatial_scale = rois[index], scale
                if exporting:  # the op's scale is a constant: the boxes are scaled instead (by 2 ** k, exactly)
                    level_rois = torch.cat([level_rois[:, :1], level_rois[:, 1:] * scale.to(rois.dtype)], dim=1)
                    spatial_scale = 1.0
                out[index] = torch.ops.maskrcnn.roi_align(
                    feature, level_rois, spatial_scale, self.output_size, self.output_size,
                    self.sampling_ratio, self.aligned, self.interpolation,
                )
        return out


############################################################
#  Box head and predictor
############################################################


class TwoMLPHead(nn.Module):
    """v1 box head: flatten, fc6 + ReLU, fc7 + ReLU."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.fc6 = nn.Linear(in_features, dim)
        self.fc7 = nn.Linear(dim, dim)

    def forward(self, x):
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


def conv_fc_head(channels: int, pool: int, convs: int, dim: int) -> nn.Sequential:
    """v2 box head: `convs` x (3x3 conv + BN + ReLU), flatten, fc + ReLU (indices as torchvision's)."""
    layers = []
    in_channels = channels
    for _ in range(convs):
        layers.append(conv_norm_relu(in_channels, 256, "bn"))
        in_channels = 256
    layers += [nn.Flatten(), nn.Linear(in_channels * pool * pool, dim), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class BoxPredictor(nn.Module):
    """Class logits and per-class box deltas."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(dim, num_classes)
        self.bbox_pred = nn.Linear(dim, num_classes * 4)

    def forward(self, x):
        return self.cls_score(x), self.bbox_pred(x)


############################################################
#  Mask head and predictor
############################################################


def mask_head(channels: int, width: int, convs: int, norm: Optional[str]) -> nn.Sequential:
    """`convs` x (3x3 conv (+ BN in v2) + ReLU), as `mask_head.{i}.0`."""
    head = nn.Sequential(*[conv_norm_relu(channels if i == 0 else width, width, norm) for i in range(convs)])
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return head


class MaskPredictor(nn.Module):
    """2x2 transposed conv (stride 2) + ReLU, then a 1x1 conv to one mask logit map per class."""

    def __init__(self, channels: int, width: int, num_classes: int):
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(channels, width, 2, 2, 0)
        self.mask_fcn_logits = nn.Conv2d(width, num_classes, 1)
        for m in (self.conv5_mask, self.mask_fcn_logits):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.mask_fcn_logits(F.relu(self.conv5_mask(x), inplace=True))  # no second [R, C, 28, 28] tensor


############################################################
#  Losses
############################################################


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, gamma: float, alpha: Optional[float]) -> Tensor:
    """Mean binary focal loss (Lin et al., 2017): BCE * (1 - p_t)^gamma, positives weighted by alpha and
    negatives by 1 - alpha. gamma = 0 and alpha = None give the mean BCE exactly."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    loss = bce
    if gamma:
        p = torch.sigmoid(logits)
        p_t = p * targets + (1 - p) * (1 - targets)
        loss = loss * (1 - p_t) ** gamma
    if alpha is not None:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.mean() if loss.numel() else loss.sum()


def softmax_focal_loss(logits: Tensor, labels: Tensor, gamma: float, alpha: Optional[float]) -> Tensor:
    """Mean multi-class focal loss: -(1 - p_y)^gamma log p_y, foreground weighted by alpha and background by
    1 - alpha. gamma = 0 and alpha = None give the cross entropy exactly."""
    log_p = F.log_softmax(logits, dim=1).gather(1, labels[:, None])[:, 0]
    loss = -log_p
    if gamma:
        loss = loss * (1 - log_p.exp()) ** gamma
    if alpha is not None:
        loss = loss * torch.where(labels > 0, alpha, 1 - alpha)
    return loss.mean()


def mean_over_samples(loss: Callable[..., Tensor], predictions: Tensor, *args) -> Tensor:
    """loss(predictions, *args), a loss that averages over the samples (predictions' first dimension).
    With no samples (nothing sampled, or a batch of ROI_BATCH_SIZE_PER_IMAGE = 0) a mean would be 0 / 0:
    the loss is then 0, an empty sum of `predictions`, still connected to the parameters that made them, so
    backward gives each a zero gradient rather than none (DDP expects every parameter in every step)."""
    if predictions.shape[0] == 0:
        return predictions.sum()
    return loss(predictions, *args)


def box_regression_loss(deltas: Tensor, target_deltas: Tensor, beta: float, normaliser: int) -> Tensor:
    """Smooth L1 (Huber with `beta`) summed over [P, 4] deltas and divided by `normaliser`, the number of
    sampled predictions (positives and negatives), as Faster R-CNN normalises its box losses (by 1 when
    nothing was sampled: the sum is then 0)."""
    return F.smooth_l1_loss(deltas, target_deltas, beta=beta, reduction="sum") / max(normaliser, 1)


def rpn_losses(objectness: Tensor, deltas: Tensor, assigned: list[AssignedTargets], samples: list[BalancedSample],
               config: Config) -> dict:
    """loss_objectness (BCE, or focal with RPN_FOCAL_LOSS) over the sampled anchors, per sampled anchor or
    (RPN_OBJECTNESS_NORMALISER "positives") per positive one, and loss_rpn_box_reg over the positive ones per
    sampled anchor of the batch.

    objectness: [N, A] logits; deltas: [N, A, 4]; assigned, samples: per image, from assign_targets and
    sample_balanced on the anchors.
    """
    c = config
    pos = torch.stack([s.positive for s in samples])  # (N, A)
    sampled = pos | torch.stack([s.negative for s in samples])  # (N, A)
    labels = torch.stack([a.labels for a in assigned]).to(objectness.dtype)  # (N, A), 1 or 0 where sampled
    target_deltas = torch.stack([a.deltas for a in assigned])  # (N, A, 4)
    sampled_count = int(sampled.sum())
    box_loss = box_regression_loss(deltas[pos], target_deltas[pos], c.SMOOTH_L1_BETA, sampled_count)
    if c.RPN_FOCAL_LOSS:
        object_loss = sigmoid_focal_loss(objectness[sampled], labels[sampled], c.FOCAL_GAMMA, c.FOCAL_ALPHA)
    else:
        object_loss = mean_over_samples(F.binary_cross_entropy_with_logits, objectness[sampled], labels[sampled])
    if c.RPN_OBJECTNESS_NORMALISER == "positives":  # the mean's sum, over the positives (RetinaNet)
        object_loss = object_loss * sampled_count / max(int(pos.sum()), 1)
    return {"loss_objectness": object_loss, "loss_rpn_box_reg": box_loss}


def fastrcnn_losses(class_logits: Tensor, box_deltas: Tensor, labels: Tensor, target_deltas: Tensor,
                    config: Config) -> dict:
    """loss_classifier (cross entropy, or focal with BOX_FOCAL_LOSS) over the sampled RoIs and loss_box_reg
    over the foreground ones, with the deltas predicted for their own class, per sampled RoI.

    class_logits: [R, K]; box_deltas: [R, K * 4]; labels: [R] int64 (0 background); target_deltas: [R, 4].
    """
    c = config
    if c.BOX_FOCAL_LOSS:
        class_loss = mean_over_samples(softmax_focal_loss, class_logits, labels, c.FOCAL_GAMMA, c.FOCAL_ALPHA)
    else:
        class_loss = mean_over_samples(F.cross_entropy, class_logits, labels)
    pos = torch.where(labels > 0)[0]
    deltas = box_deltas.reshape(labels.shape[0], class_logits.shape[1], 4)[pos, labels[pos]]  # (R, K, 4) -> (F, 4)
    box_loss = box_regression_loss(deltas, target_deltas[pos], c.SMOOTH_L1_BETA, labels.numel())
    return {"loss_classifier": class_loss, "loss_box_reg": box_loss}


def mask_targets(gt_masks: Tensor, boxes: Tensor, matched_gt: Tensor, size: int, aligned: bool) -> Tensor:
    """[F, size, size] float mask targets in [0, 1]: each ground-truth mask cropped to its RoI and resized
    by our roi_align (as torchvision's project_masks_on_boxes). Always bilinear, whatever
    POOL_INTERPOLATION says for the features: bicubic would overshoot a binary mask's edges out of
    [0, 1], and the targets are the ground truth the interpolations are compared on.

    gt_masks: [G, H, W] bool/uint8 in the pixels of `boxes`; boxes: [F, 4] RoIs; matched_gt: [F] index of
    each RoI's ground truth.
    """
    if boxes.shape[0] == 0:
        return boxes.new_zeros((0, size, size))
    rois = torch.cat([matched_gt[:, None].to(boxes.dtype), boxes], dim=1)  # (F, 5): ground truth index, box
    # The masks are the "images" of the batch, so each RoI reads the mask of its own ground truth.
    return roi_align(gt_masks[:, None].to(boxes.dtype), rois, size, 1.0, -1, aligned)[:, 0]


def mask_loss(mask_logits: Tensor, labels: Tensor, targets: Tensor,
              focal: Optional[tuple[float, Optional[float]]] = None) -> Tensor:
    """Mean per-pixel BCE (or, with focal = (gamma, alpha), sigmoid focal loss: MASK_FOCAL_LOSS) of each
    foreground RoI's mask for its own class.

    mask_logits: [F, K, M, M]; labels: [F] int64 (1..K-1); targets: [F, M, M] in [0, 1]. F may be 0.
    """
    logits = mask_logits[torch.arange(labels.numel(), device=labels.device), labels]  # (F, M, M)
    if focal is not None:
        return mean_over_samples(sigmoid_focal_loss, logits, targets, *focal)
    return mean_over_samples(F.binary_cross_entropy_with_logits, logits, targets)


############################################################
#  RoI heads: sampling, box and mask branches, post-processing
############################################################


class RoISamples(NamedTuple):
    """One image's RoIs sampled for the heads' losses, in the resized image's pixels.

    boxes: [R, 4]; labels: [R] int64 (0 background); matched_gt: [R] int64 index into the ground truth
    for foreground RoIs, -1 for background; deltas: [R, 4] box regression targets (BOX_CODER_WEIGHTS),
    0 for background.
    """

    boxes: Tensor
    labels: Tensor
    matched_gt: Tensor
    deltas: Tensor


class RoIHeads(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        c = self.config = config
        box_interpolation, mask_interpolation = pool_interpolations(c.POOL_INTERPOLATION)
        self.box_roi_pool = PyramidRoIAlign(c.BOX_POOL_SIZE, c, box_interpolation)
        self.mask_roi_pool = PyramidRoIAlign(c.MASK_POOL_SIZE, c, mask_interpolation)
        if c.BOX_HEAD_CONVS:
            self.box_head = conv_fc_head(c.FPN_CHANNELS, c.BOX_POOL_SIZE, c.BOX_HEAD_CONVS, c.BOX_HEAD_DIM)
        else:
            self.box_head = TwoMLPHead(c.FPN_CHANNELS * c.BOX_POOL_SIZE**2, c.BOX_HEAD_DIM)
        self.box_predictor = BoxPredictor(c.BOX_HEAD_DIM, c.NUM_CLASSES)
        norm = "bn" if c.VARIANT == "v2" else None
        self.mask_head = mask_head(c.FPN_CHANNELS, c.MASK_HEAD_CHANNELS, c.MASK_HEAD_CONVS, norm)
        self.mask_predictor = MaskPredictor(c.MASK_HEAD_CHANNELS, c.MASK_HEAD_CHANNELS, c.NUM_CLASSES)
        self.matcher = Matcher(c.ROI_FG_IOU_THRESHOLD, c.ROI_BG_IOU_THRESHOLD, False)

    def forward(self, features, proposals, image_sizes, targets=None):
        """Training mode: the losses (see `train_forward`). Eval mode: the detections (see `predict`)."""
        features = features[:4]  # P2-P5; P6 serves the RPN only
        if self.training:
            return self.train_forward(features, proposals, image_sizes, targets)
        return self.predict(features, proposals, image_sizes)

    # ---- training ----
    def select_training_samples(self, proposals: list[Tensor], targets: list[dict]) -> list[RoISamples]:
        """Per image: the ground truth added to the proposals [K, 4], targets assigned, then a balanced
        sample of ROI_BATCH_SIZE_PER_IMAGE (in index order). Boxes in the resized images' pixels."""
        c = self.config
        samples = []
        for boxes, target in zip(proposals, targets):
            boxes = torch.cat([boxes, target["boxes"].to(boxes.dtype)])
            assigned = assign_targets(boxes, target, self.matcher, c.BOX_CODER_WEIGHTS, c.CROWD_IGNORE_THRESHOLD,
                                      True)
            sample = sample_balanced(assigned.labels, c.ROI_BATCH_SIZE_PER_IMAGE, c.ROI_POSITIVE_FRACTION)
            keep = torch.where(sample.positive | sample.negative)[0]
            samples.append(RoISamples(boxes[keep], assigned.labels[keep], assigned.matched_gt[keep],
                                      assigned.deltas[keep]))
        return samples

    def foreground_mask_targets(self, samples: list[RoISamples], targets: list[dict]) -> list[Tensor]:
        """Per image [F, MASK_SIZE, MASK_SIZE]: the mask targets of its foreground samples, in sample order."""
        c = self.config
        return [mask_targets(t["masks"], s.boxes[s.labels > 0], s.matched_gt[s.labels > 0], c.MASK_SIZE,
                             c.POOL_ALIGNED) for s, t in zip(samples, targets)]

    def train_forward(self, features, proposals, image_sizes, targets) -> dict:
        """The box and mask losses on a sample of the proposals (plus the ground truth) of each image."""
        samples = self.select_training_samples(proposals, targets)
        labels = torch.cat([s.labels for s in samples])
        pooled = self.box_roi_pool(features, [s.boxes for s in samples], image_sizes)
        class_logits, box_deltas = self.box_predictor(self.box_head(pooled))
        losses = fastrcnn_losses(class_logits, box_deltas, labels, torch.cat([s.deltas for s in samples]), self.config)
        # Mask branch on the foreground only; with none it runs on no RoIs, so that every mask parameter stays
        # in the graph (see mean_over_samples).
        foreground_labels = labels[labels > 0]
        foreground_boxes = [s.boxes[s.labels > 0] for s in samples]
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, foreground_boxes, image_sizes)))
        foreground_masks = torch.cat(self.foreground_mask_targets(samples, targets))
        focal = (self.config.FOCAL_GAMMA, self.config.FOCAL_ALPHA) if self.config.MASK_FOCAL_LOSS else None
        losses["loss_mask"] = mask_loss(mask_logits, foreground_labels, foreground_masks, focal)
        return losses

    # ---- inference ----
    def predict(self, features, proposals, image_sizes) -> list[dict]:
        """Detections per image, in the resized image's pixels: boxes [D, 4], scores [D], labels [D],
        masks [D, 1, M, M] (the predicted class's mask probabilities) and proposal_index [D] (the row of
        `proposals` each detection was refined from)."""
        c = self.config
        pooled = self.box_roi_pool(features, proposals, image_sizes)
        class_logits, box_deltas = self.box_predictor(self.box_head(pooled))
        boxes = decode_boxes(box_deltas, torch.cat(proposals), c.BOX_CODER_WEIGHTS)  # (sum K, classes, 4)
        scores = F.softmax(class_logits.float(), -1)
        counts = [p.shape[0] for p in proposals]  # sizes, not len(): symbolic while torch.export traces
        results = [self.postprocess_detections(b, s, size)
                   for b, s, size in zip(boxes.split(counts), scores.split(counts), image_sizes)]
        mask_boxes = [r["boxes"] for r in results]
        if guard_or_false(sum(b.shape[0] for b in mask_boxes) == 0):  # unknown while exporting: masks made
            for r in results:
                r["masks"] = r["boxes"].new_zeros((0, 1, c.MASK_SIZE, c.MASK_SIZE))
            return results
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_boxes, image_sizes)))
        labels = torch.cat([r["labels"] for r in results])
        probs = mask_logits[torch.arange(labels.numel(), device=labels.device), labels][:, None].float().sigmoid()
        for r, p in zip(results, probs.split([b.shape[0] for b in mask_boxes])):
            r["masks"] = p
        return results

    def postprocess_detections(self, boxes, scores, size) -> dict:
        """Per class: clip, drop background, low scores and tiny boxes, NMS per class, keep the best.

        boxes: [K, classes, 4] decoded per class; scores: [K, classes] softmax. Returns boxes [D, 4], scores,
        labels and proposal_index [D] (the row of `boxes` each detection comes from).
        """
        c = self.config
        num_classes = scores.shape[1]
        boxes = clip_boxes(boxes, size)[:, 1:].reshape(-1, 4)  # (K * (classes - 1), 4)
        labels = torch.arange(1, num_classes, device=scores.device).repeat(scores.shape[0])
        scores = scores[:, 1:].reshape(-1)
        kept = torch.where(scores > c.DETECTION_MIN_CONFIDENCE)[0]
        boxes, scores, labels = boxes[kept], scores[kept], labels[kept]
        keep = torch.where(large_enough(boxes, c.DETECTION_MIN_SIZE))[0]
        boxes, scores, labels, kept = boxes[keep], scores[keep], labels[keep], kept[keep]
        keep = batched_nms(boxes, scores, labels, c.DETECTION_NMS_THRESHOLD)[: c.DETECTION_MAX_INSTANCES]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep],
                "proposal_index": kept[keep] // (num_classes - 1)}  # rows of (proposal, class) pairs


############################################################
#  Mask pasting
############################################################


PASTE_CHUNK_BYTES = 2**28  # paste_masks' working set: 256 MB of pasted probabilities at a time


def paste_masks(masks: Tensor, boxes: Tensor, size, threshold: Optional[float] = None,
                chunk_bytes: int = PASTE_CHUNK_BYTES, mode: str = "torchvision", inclusive: bool = False) -> Tensor:
    """Pastes [N, 1, M, M] mask probabilities at `boxes` [N, 4] (x1, y1, x2, y2) into [N, 1, H, W] images
    (size = (H, W)): probabilities in masks.dtype, or with `threshold` bool masks (probability > threshold,
    or >= with `inclusive`: MASK_THRESHOLD_INCLUSIVE).

    mode (MASK_PASTE) "torchvision": the masks are padded by one pixel and the boxes enlarged by (M + 2) / M
    and cut to integers; each mask is resized bilinearly (align_corners=False) to its box's integer size.
    "grid_sample" (detectron2's paste_masks_in_image): each pixel centre is sampled bilinearly in the mask
    spread over the exact float box (F.grid_sample, align_corners=False, zero outside the mask).
    Both resizes are separable, so they are written as two batched matrix products with the interpolation
    weights: crop = Wy @ mask @ Wx^T, with Wy [N, h, M'] and Wx [N, w, M'] (M' = M + 2 or M) for the rows and
    columns of the box's part of the image (everything else is zero), h x w the largest such part in a
    chunk. Only the boxes are computed, not the whole image (a 170 px box on an 800x1066 image is 30x less
    work). The products run a chunk of masks at a time, chunk_bytes of crops at most (one mask at least),
    and a threshold applies to each crop as it is copied into the image: on a 20 MP photo, 80 bool masks
    take 1.6 GB where their float32 probabilities would take 6.4 GB; the bool masks are exactly the
    thresholded probabilities. An exported program (torch.export, whose number of masks and image size are
    symbolic) computes the whole image for all masks at once instead.
    """
    # sym_int keeps the sizes symbolic while torch.export traces (int() would fix them to the example's).
    n, height, width = masks.shape[0], torch.sym_int(size[0]), torch.sym_int(size[1])
    out = torch.zeros((n, 1, height, width), dtype=masks.dtype if threshold is None else torch.bool,
                      device=masks.device)
    if guard_or_false(n == 0):
        return out
    if mode == "grid_sample":
        source, box, weights = masks[:, 0], boxes.float(), grid_sample_weights
        # Bilinear sampling against the zero padding reaches half a mask cell beyond the box.
        margin = (box[:, 2:] - box[:, :2]) / (2 * source.shape[-1]) + 1  # (N, 2) x, y
        low, high = (box[:, :2] - margin).floor().to(torch.int64), (box[:, 2:] + margin).ceil().to(torch.int64)
    elif mode == "torchvision":
        m = masks.shape[-1]
        source = F.pad(masks[:, 0], (1, 1, 1, 1))
        scale = (m + 2) / m
        half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
        half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
        ctr_x = (boxes[:, 2] + boxes[:, 0]) * 0.5
        ctr_y = (boxes[:, 3] + boxes[:, 1]) * 0.5
        box = torch.stack([ctr_x - half_w, ctr_y - half_h, ctr_x + half_w, ctr_y + half_h], dim=1).to(torch.int64)
        low, high, weights = box[:, :2], box[:, 2:], interpolation_weights
    else:
        raise ValueError(f"MASK_PASTE must be 'torchvision' or 'grid_sample'; got {mode!r}")
    k = source.shape[-1]

    def paste(chunk, first_x, first_y, w, h):
        wy = weights(box[chunk, 1], box[chunk, 3], first_y, h, k, masks.dtype)
        wx = weights(box[chunk, 0], box[chunk, 2], first_x, w, k, masks.dtype)
        with torch.autocast(masks.device.type, enabled=False):  # probabilities stay in their own dtype
            return torch.bmm(torch.bmm(wy, source[chunk]), wx.transpose(1, 2))  # (chunk, h, w)

    if torch.compiler.is_exporting():
        zero = torch.zeros(n, dtype=torch.int64, device=masks.device)
        pasted = paste(slice(None), zero, zero, width, height)
        out[:, 0] = pasted if threshold is None else utils.threshold_masks(pasted, threshold, inclusive)
        return out
    # The box's part of the image: pixels first..last (inclusive) of each axis, empty where last < first.
    first = torch.stack([low[:, 0].clamp(0, width - 1), low[:, 1].clamp(0, height - 1)], dim=1)  # (N, 2) x, y
    last = torch.stack([high[:, 0].clamp(max=width - 1), high[:, 1].clamp(max=height - 1)], dim=1)
    extent = (last - first + 1).clamp(min=0)  # (N, 2) w, h
    # The crops' corners and sizes on the host once (one device sync each, not two per mask).
    corners, sizes = first.tolist(), extent.tolist()
    for chunk in crop_chunks(sizes, chunk_bytes // masks.element_size()):
        w, h = max(size[0] for size in sizes[chunk]), max(size[1] for size in sizes[chunk])
        if w == 0 or h == 0:
            continue
        crops = paste(chunk, first[chunk, 0], first[chunk, 1], w, h)
        for i, crop in zip(range(chunk.start, chunk.stop), crops):
            (x0, y0), (cw, ch) = corners[i], sizes[i]
            crop = crop[:ch, :cw]
            out[i, 0, y0 : y0 + ch, x0 : x0 + cw] = (
                crop if threshold is None else utils.threshold_masks(crop, threshold, inclusive))
    return out


def crop_chunks(extents: list, max_elements: int) -> list[slice]:
    """Consecutive slices of the crops of `extents` ([(w, h)] per mask) such that a chunk's crops, each
    padded to the chunk's largest width and height, hold max_elements at most (one crop at least)."""
    chunks, start, w, h = [], 0, 0, 0
    for i, (cw, ch) in enumerate(extents):
        w, h = max(w, cw), max(h, ch)
        if i > start and (i - start + 1) * w * h > max_elements:
            chunks.append(slice(start, i))
            start, w, h = i, cw, ch
    chunks.append(slice(start, len(extents)))
    return chunks


def grid_sample_weights(start: Tensor, end: Tensor, first: Tensor, length: int, source: int, dtype) -> Tensor:
    """[N, length, source] weights of F.grid_sample (bilinear, align_corners=False, zero padding) reading
    `source` samples spread over [start, end] (float pixel edges) at the pixel centres first + 0.5 ..
    first + length - 0.5 of an axis (first [N]); computed in float32 in grid_sample's steps (normalise to
    [-1, 1], then back to the source's index) so the weights round as detectron2's paste does. A box of
    zero size gets no weights."""
    centre = first.float()[:, None] + torch.arange(length, device=start.device, dtype=torch.float32)[None, :] + 0.5
    start, end = start.float()[:, None], end.float()[:, None]
    grid = (centre - start) / (end - start) * 2 - 1  # (N, length)
    src = ((grid + 1) * source - 1) / 2
    valid = torch.isfinite(src)
    src = torch.where(valid, src, torch.full_like(src, -2.0))  # -2: both neighbours outside, weight 0
    low = src.floor()
    high = low + 1
    weights = torch.zeros(start.shape[0], length, source + 2, dtype=dtype, device=start.device)
    # Indices shifted by one into a row with a slot on each side for neighbours outside the mask (zero
    # padding), which are then cut off.
    for index, weight in ((low, high - src), (high, src - low)):
        slot = (index.clamp(-1, source) + 1).to(torch.int64)
        weights.scatter_add_(2, slot[..., None], weight.to(dtype)[..., None])
    return weights[..., 1:-1]


def interpolation_weights(start: Tensor, end: Tensor, first: Tensor, length: int, source: int, dtype) -> Tensor:
    """[N, length, source] weights of a bilinear resize (align_corners=False) of `source` samples onto the
    pixels start..end (inclusive, integer) of an axis, for the `length` pixels from first [N] on; zero
    outside start..end."""
    size = (end - start + 1).clamp(min=1)  # pixels the mask covers
    pixel = first[:, None] + torch.arange(length, device=start.device)[None, :]
    local = pixel - start[:, None]  # index within the resized mask
    inside = (local >= 0) & (local < size[:, None])
    step = source / size.to(torch.float32)  # PyTorch's scale for a resize to a given size
    src = (step[:, None] * (local.to(torch.float32) + 0.5) - 0.5).clamp(min=0)
    low = src.floor().to(torch.int64).clamp(max=source - 1)
    high = torch.where(low < source - 1, low + 1, low)
    frac = (src - low.to(torch.float32)).to(dtype)
    weights = torch.zeros(start.shape[0], length, source, dtype=dtype, device=start.device)
    zero = torch.zeros((), dtype=dtype, device=start.device)
    weights.scatter_add_(2, low[..., None], torch.where(inside, 1 - frac, zero)[..., None])
    weights.scatter_add_(2, high[..., None], torch.where(inside, frac, zero)[..., None])
    return weights


############################################################
#  Mask R-CNN
############################################################


def to_numpy(value):
    """Tensors (and lists and dicts of them) as numpy arrays, floating point ones as float32."""
    if isinstance(value, list):
        return [to_numpy(v) for v in value]
    if isinstance(value, dict):
        return {key: to_numpy(v) for key, v in value.items()}
    if not torch.is_tensor(value):
        return value
    return (value.float() if value.is_floating_point() else value).cpu().numpy()


def to_original_pixels(size, original, device) -> Tensor:
    """[4] factors (sx, sy, sx, sy) that take (x1, y1, x2, y2) boxes from a resized image of `size` (h, w)
    back to the `original` (h, w) image."""
    return torch.tensor([original[1] / size[1], original[0] / size[0]] * 2, device=device)


def memory_format_for(channels_last: Optional[bool], training: bool, device: torch.device) -> torch.memory_format:
    """The memory format of the activations (and conv weights) for the CHANNELS_LAST setting: True
    channels-last, False NCHW, None the one measured fastest (see config.py): channels-last, except for
    training on a CPU without AVX-512, whose channels-last convolution backward is slower than NCHW's."""
    if channels_last is None:
        avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
        channels_last = not (training and device.type == "cpu" and not avx512)
    return torch.channels_last if channels_last else torch.contiguous_format


class MaskRCNN(nn.Module):
    """Mask R-CNN with a ResNet-FPN backbone.

    forward(images, targets=None):
        images: list of [3, H, W] float tensors in [0, 1] (sizes may differ; any float dtype, converted to
            the model's; values outside [0, 1], NaN or inf are refused with an error naming the image).
        targets (training): per image a dict with boxes [K, 4] float (x1, y1, x2, y2) in pixels,
            labels [K] int64 in 1..NUM_CLASSES-1, masks [K, H, W] uint8/bool, and optionally
            crowd_boxes [C, 4]: regions where anchors and proposals count as neither object nor background.
        Training returns a dict of scalar losses. Evaluation returns per image a dict with boxes
        [D, 4], labels [D], scores [D] and masks [D, 1, H, W] (probabilities) at the image's size.
    detect(images, return_intermediates=False): numpy HxWx3 uint8 RGB images (or paths) -> per image
        numpy boxes, class_ids, scores and masks [D, H, W] bool; with return_intermediates also what
        each stage computed (anchors, proposals, 28x28 masks; see `infer`).
    """

    def __init__(self, config: Optional[Config] = None):
        super().__init__()
        self.config = config = config if config is not None else Config()
        self.backbone = Backbone(config)
        self.rpn = RPN(config)
        self.roi_heads = RoIHeads(config)
        self.memory_format = torch.contiguous_format  # the layout nn.Module's parameters are made in
        self.use_memory_format()

    def use_memory_format(self):
        """Puts the conv weights in the memory format of the activations for the current mode and device
        (memory_format_for), so that no conv converts its weights at each call. Called on every change of
        mode (train, eval) or device (to, cuda, ...). Outside inference mode, so that an eval() inside
        torch.inference_mode() does not turn the weights into inference tensors, which training refuses."""
        memory_format = memory_format_for(self.config.CHANNELS_LAST, self.training, next(self.parameters()).device)
        if memory_format != self.memory_format:
            self.memory_format = memory_format
            with torch.inference_mode(False):
                super()._apply(lambda t: t.contiguous(memory_format=memory_format) if t.dim() == 4 else t)

    def train(self, mode: bool = True):
        super().train(mode)
        self.use_memory_format()
        return self

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.use_memory_format()
        return self

    def forward(self, images: list[Tensor], targets: Optional[list[dict]] = None):
        if not self.training:
            return self.infer(images)
        check_images(images)
        if targets is None:
            raise ValueError("targets are required in training mode (call model.eval() for inference)")
        check_targets(targets, images, self.config.NUM_CLASSES)
        batch, targets, features = self.training_batch(images, targets)
        rpn = self.rpn(batch, features, targets)
        return {**rpn.losses, **self.roi_heads(features, [p.boxes for p in rpn.proposals], batch.image_sizes, targets)}

    def training_batch(self, images: list[Tensor], targets: list[dict]):
        """Images and targets resized at a training scale drawn from IMAGE_MIN_DIM_TRAIN (torch's RNG), and
        the backbone's features. Returns (ImageBatch, targets in the resized pixels, [P2..P6])."""
        min_size = self.config.IMAGE_MIN_DIM_TRAIN[int(torch.randint(len(self.config.IMAGE_MIN_DIM_TRAIN), ()))]
        batch, targets = preprocess(images, self.config, targets, min_size, self.input_dtype)
        return batch, targets, self.backbone(batch.tensor.contiguous(memory_format=self.memory_format))

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype images are converted to: the parameters' (float32 unless the model was cast)."""
        return next(self.parameters()).dtype

    def infer(self, images: list[Tensor], return_intermediates: bool = False,
              mask_threshold: Optional[float] = None) -> list[dict]:
        """Inference on [3, H, W] tensors (what forward does in eval mode): per image boxes [D, 4], labels,
        scores and masks [D, 1, H, W] (probabilities) in the image's own pixels.

        images: float tensors in [0, 1] of any float dtype, converted to the model's (`input_dtype`); checked
        by check_images. Gradients flow back to images that require them.
        mask_threshold: None gives the masks as probabilities; a number gives bool masks (probability >
        mask_threshold), thresholded while pasting, which needs far less memory on large images.

        return_intermediates adds to each result "intermediates", a dict of what the stages computed, in the
        image's own pixels: anchors (a [A, 4] tensor per FPN level) with anchor_strides and anchor_sizes (in
        the resized image the network saw, resize_scale (sy, sx) times the image), proposals_before_nms with
        proposal_scores_before_nms and proposal_levels_before_nms, proposals (after NMS) with
        proposal_scores, and per detection detection_proposals (the proposal its box was refined from) and
        mask_probs [D, M, M] (the predicted class's mask before pasting).
        """
        check_images(images)
        c = self.config
        batch, _ = preprocess(images, c, dtype=self.input_dtype)
        features = self.backbone(batch.tensor.contiguous(memory_format=self.memory_format))
        rpn = self.rpn(batch, features)
        results = self.roi_heads(features, [p.boxes for p in rpn.proposals], batch.image_sizes)
        for result, proposals, size, original in zip(results, rpn.proposals, batch.image_sizes, batch.original_sizes):
            ratio = to_original_pixels(size, original, result["boxes"].device)
            proposal_index = result.pop("proposal_index")
            result["boxes"] = result["boxes"] * ratio.to(result["boxes"].dtype)
            if c.RESCALE_CLIP_AND_DROP_EMPTY:  # detectron2's detector_postprocess
                result["boxes"] = clip_boxes(result["boxes"], original)
                keep = large_enough(result["boxes"], 0.0, strict=True)
                for key in ("boxes", "scores", "labels", "masks"):
                    result[key] = result[key][keep]
                proposal_index = proposal_index[keep]
            if return_intermediates:
                result["intermediates"] = {
                    "anchors": [a * ratio.to(a.dtype) for a in rpn.anchors.split(rpn.anchors_per_level)],
                    "anchor_strides": [w for _, w in anchor_strides(features, batch.tensor.shape[-2:], c)],
                    "anchor_sizes": list(c.ANCHOR_SIZES[: len(features)]),
                    "proposals_before_nms": proposals.boxes_before_nms * ratio,
                    "proposal_scores_before_nms": proposals.scores_before_nms,
                    "proposal_levels_before_nms": proposals.levels_before_nms,
                    "proposals": proposals.boxes * ratio,
                    "proposal_scores": proposals.scores,
                    "detection_proposals": proposals.boxes[proposal_index] * ratio,
                    "mask_probs": result["masks"][:, 0],
                    "resize_scale": (size[0] / original[0], size[1] / original[1]),
                }
            result["masks"] = paste_masks(result["masks"], result["boxes"], original, mask_threshold,
                                          mode=c.MASK_PASTE, inclusive=c.MASK_THRESHOLD_INCLUSIVE)
        return results

    def as_tensors(self, images) -> list[Tensor]:
        """numpy HxWx3 uint8 RGB images or paths as [3, H, W] float tensors in [0, 1] on the model's device."""
        if not isinstance(images, (list, tuple)):
            raise ValueError("expected a list of images (HxWx3 uint8 arrays or paths); got "
                             f"{type(images).__name__}")
        device = next(self.parameters()).device
        tensors = []
        for i, image in enumerate(images):
            try:
                tensors.append(utils.image_to_tensor(
                    utils.load_image(image) if isinstance(image, (str, os.PathLike)) else image))
            except ValueError as error:
                raise ValueError(f"images[{i}]: {error}") from error
        check_images(tensors)
        return [t.to(device) for t in tensors]

    @torch.no_grad()
    def detect(self, images, return_intermediates: bool = False) -> list[dict]:
        """Inference on numpy images (HxWx3 uint8 RGB; other dtypes are refused, as float arrays could be in
        [0, 1] or [0, 255]) or image paths; see the class docstring. Masks are thresholded at MASK_THRESHOLD
        while they are pasted (see paste_masks), so memory holds boolean full-size masks only.

        return_intermediates=True adds to each result "intermediates", a dict of numpy arrays in the
        image's own pixels, for the stage views of visualize.py (see `infer` for the keys).
        """
        tensors = self.as_tensors(images)
        was_training = self.training
        self.eval()
        outputs = self.infer(tensors, return_intermediates, self.config.MASK_THRESHOLD)
        self.train(was_training)
        results = []
        for o in outputs:
            result = {
                "boxes": o["boxes"].float().cpu().numpy(),
                "class_ids": o["labels"].cpu().numpy().astype(np.int64),
                "scores": o["scores"].float().cpu().numpy(),
                "masks": o["masks"][:, 0].cpu().numpy(),
            }
            if return_intermediates:
                result["intermediates"] = to_numpy(o["intermediates"])
            results.append(result)
        return results

    @torch.no_grad()
    def training_targets(self, images, targets: list[dict]) -> list[dict]:
        """What training asks of the network for each image: the anchors' and the sampled RoIs' targets.

        images: like detect(). targets: per image boxes [G, 4] (x1, y1, x2, y2) in the image's pixels,
        labels [G] (1..NUM_CLASSES-1), masks [G, H, W] bool/uint8, optional crowd_boxes [C, 4] (numpy or
        tensors). Runs the training step's own resize, target assignment and sampling (drawing from torch's
        RNG as training does) with the layers in eval mode, without gradients. Returns per image a dict of
        numpy arrays, boxes in the image's own pixels:
            resize_scale: float, the network's input is the image resized by this factor;
            gt_boxes [G, 4] float32, gt_class_ids [G] int64, crowd_boxes [C, 4] float32: the targets;
            anchors [A, 4] float32 (every level, concatenated) and anchor_levels [A] int64 (0 = P2);
            anchor_labels [A] int8: 1 positive, 0 negative, -1 ignored (IoU between the thresholds),
                -2 ignored because inside a crowd region;
            anchor_sampled [A] bool: chosen for the RPN loss; anchor_matched_gt [A] int64 (-1 if not positive);
            anchor_deltas [A, 4] float32: RPN regression targets, 0 where not positive;
            rois [R, 4] float32: the proposals (and ground truth) sampled for the heads, in training's order;
            roi_class_ids [R] int64 (0 background), roi_matched_gt [R] int64 (-1 background);
            roi_deltas [R, 4] float32: box regression targets (BOX_CODER_WEIGHTS), 0 for background;
            mask_targets [F, MASK_SIZE, MASK_SIZE] float32 in [0, 1]: of the F foreground rois, in order.
        """
        tensors = self.as_tensors(images)
        if not isinstance(targets, (list, tuple)) or len(targets) != len(tensors):
            raise ValueError(f"targets must be a list of one dict per image ({len(tensors)}); got "
                             f"{len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__}")
        targets = [target_tensors(t, i, tensors[0].device) for i, t in enumerate(targets)]
        check_targets(targets, tensors, self.config.NUM_CLASSES)
        was_training = self.training
        self.eval()
        try:
            batch, resized, features = self.training_batch(tensors, targets)
            rpn = self.rpn(batch, features, resized)  # the same assignment and sampling as training
            samples = self.roi_heads.select_training_samples([p.boxes for p in rpn.proposals], resized)
            masks = self.roi_heads.foreground_mask_targets(samples, resized)
        finally:
            self.train(was_training)
        levels = torch.repeat_interleave(torch.arange(len(rpn.anchors_per_level)), torch.tensor(rpn.anchors_per_level))
        results = []
        for i, (target, size, original) in enumerate(zip(targets, batch.image_sizes, batch.original_sizes)):
            ratio = to_original_pixels(size, original, rpn.anchors.device)
            assigned, sample, rois = rpn.anchor_targets[i], rpn.anchor_samples[i], samples[i]
            anchor_labels = assigned.labels.to(torch.int8)  # 1, 0 or IGNORED
            anchor_labels[assigned.crowd] = -2
            results.append(to_numpy({
                "resize_scale": batch.scales[i],
                "gt_boxes": target["boxes"],
                "gt_class_ids": target["labels"],
                "crowd_boxes": target.get("crowd_boxes", target["boxes"].new_zeros((0, 4))),
                "anchors": rpn.anchors * ratio.to(rpn.anchors.dtype),
                "anchor_levels": levels,
                "anchor_labels": anchor_labels,
                "anchor_sampled": sample.positive | sample.negative,
                "anchor_matched_gt": assigned.matched_gt,
                "anchor_deltas": assigned.deltas,
                "rois": rois.boxes * ratio,
                "roi_class_ids": rois.labels,
                "roi_matched_gt": rois.matched_gt,
                "roi_deltas": rois.deltas,
                "mask_targets": masks[i],
            }))
        return results

    def load_weights(self, source, exclude=(), strict=True):
        """Loads our checkpoint, torchvision's Mask R-CNN checkpoint (either key spelling), detectron2's (a
        model-zoo .pkl or a .pth; names and class rows converted by convert_detectron2_state_dict, for the
        d2_* presets) or an ImageNet ResNet (backbone only). `source` is a path, a state_dict, or "coco",
        "coco_v2", "imagenet", "d2_r50_fpn_3x", "d2_r101_fpn_3x" for the published files; files are loaded
        with weights_only=True or, for .pkl, a restricted unpickler (utils.load_file).
        `exclude`: key prefixes or regexes to skip; "heads" means the class-specific layers (to fine-tune
        on other classes). Keys whose shapes differ are skipped and logged (e.g. a head for another
        number of classes).

        strict: a whole-model checkpoint must hold exactly this model's tensors, and an ImageNet ResNet
        exactly its backbone's (`exclude`d keys and shape differences aside): otherwise ValueError lists
        the keys the checkpoint lacks and those this model lacks (another backbone depth, another
        variant), and nothing is loaded. strict=False loads what fits and logs the rest.

        Returns {"loaded", "skipped_shape", "excluded", "unexpected", "missing"} (lists of keys; missing
        counts every tensor of this model left as it was)."""
        state = utils.load_state_dict(source, self.config.BACKBONE)
        state = convert_state_dict(state)
        patterns = []
        for item in exclude:
            patterns += HEAD_KEYS if item == "heads" else [item]

        def excluded_key(key):
            return any(key.startswith(p) or re.match(p, key) for p in patterns)

        own = self.state_dict()
        skipped_shape, excluded, loaded = [], [], {}
        for key, value in state.items():
            if excluded_key(key):
                excluded.append(key)
            elif key in own and own[key].shape != value.shape:
                skipped_shape.append(f"{key} {tuple(value.shape)} -> {tuple(own[key].shape)}")
            elif key in own:
                loaded[key] = value
        # BatchNorm's step counter is loaded where the model has one and is never worth a warning.
        optional = "num_batches_tracked"
        unexpected = sorted(k for k in set(state) - set(own) - set(excluded) if not k.endswith(optional))
        missing = sorted(k for k in set(own) - set(loaded) if not k.endswith(optional))
        if strict:
            # What the checkpoint is meant to cover: this whole model, or only its ResNet (ImageNet weights).
            whole = any(not k.startswith("backbone.body.") for k in state)
            absent = [k for k in missing if k not in state and not excluded_key(k)
                      and (whole or k.startswith("backbone.body."))]
            if unexpected or absent:
                name = "the state dict" if isinstance(source, dict) else str(source)
                raise ValueError(
                    f"load_weights({name!r}): the {'checkpoint' if whole else 'ImageNet ResNet'} does not fit this "
                    f"model (BACKBONE={self.config.BACKBONE}, VARIANT={self.config.VARIANT}): "
                    f"{key_list(unexpected)} in it are not in the model; {key_list(absent)} of the model are not in "
                    "it. Nothing was loaded; pass strict=False to load the tensors that fit.")
        self.load_state_dict(loaded, strict=False)
        logger.info("loaded %d of %d tensors", len(loaded), len(own))
        if skipped_shape:
            logger.warning("skipped (shape differs): %s", ", ".join(skipped_shape))
        if excluded:
            logger.info("excluded: %d tensors (%s)", len(excluded), ", ".join(exclude))
        if unexpected:
            logger.warning("not in this model (ignored): %s", ", ".join(unexpected))
        if missing:
            logger.warning("not in the checkpoint (left as initialised): %s", ", ".join(missing))
        return {"loaded": sorted(loaded), "skipped_shape": skipped_shape, "excluded": excluded,
                "unexpected": unexpected, "missing": missing}

    @classmethod
    def from_checkpoint(cls, source, overrides=(), device="cpu", config: Optional[Config] = None) -> "MaskRCNN":
        """The model a checkpoint describes, with its weights loaded: the one way train.py --resume,
        coco.py evaluate, visualize.py and demo.ipynb build a trained model.

        source: a checkpoint written by train.py (its path, or the dict torch.load gives), whose "config"
            builds the model; or weights that carry no config (torchvision's checkpoint files, a bare
            state_dict, or the names "coco", "coco_v2", "imagenet"), which need `config`.
        overrides: ["KEY=VALUE", ...] as --set takes them (Config.override), applied on top.
        config: the configuration for weights that carry none; a checkpoint's own config wins. It is
            copied, not changed.
        Tensors are loaded as by load_weights, strictly (a checkpoint of another network is an error
        listing the keys; those whose shape differs, e.g. after overriding NUM_CLASSES, are skipped and
        logged); files with weights_only=True.
        """
        is_file = not isinstance(source, dict) and os.path.isfile(str(source))
        checkpoint = utils.load_state_dict(source) if is_file else source
        saved = checkpoint.get("config") if isinstance(checkpoint, dict) else None
        if isinstance(saved, dict):
            config = Config.from_dict(saved)
        elif config is not None:
            config = type(config).from_dict(config.to_dict())
        elif isinstance(source, dict) or is_file:
            where = "the checkpoint" if isinstance(source, dict) else repr(str(source))
            raise ValueError(f"from_checkpoint: {where} has no 'config' (it was not written by train.py); pass "
                             "config=, e.g. Config() for torchvision's maskrcnn_resnet50_fpn weights")
        else:
            raise FileNotFoundError(f"from_checkpoint: no file {str(source)!r}; published weights (coco, coco_v2, "
                                    "imagenet) need config=")
        model = cls(config.override(list(overrides)))
        model.load_weights(checkpoint)
        return model.to(device)


HEAD_KEYS = ["roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits."]


def key_list(keys, shown=5) -> str:
    """'N tensors (a, b, ... and M more)' for an error message."""
    more = f", ... and {len(keys) - shown} more" if len(keys) > shown else ""
    listed = f" ({', '.join(keys[:shown])}{more})" if keys else ""
    return f"{len(keys)} tensor{'' if len(keys) == 1 else 's'}{listed}"


def convert_state_dict(state: dict) -> dict:
    """Our key spelling from any accepted checkpoint: our own (possibly under "model" and DDP's
    "module."), torchvision's current and legacy Mask R-CNN keys, detectron2's (convert_detectron2_state_dict),
    or a bare ImageNet ResNet."""
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    state = OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in state.items())
    if any(k.startswith("backbone.bottom_up.") for k in state):
        return convert_detectron2_state_dict(state)
    if "conv1.weight" in state and not any(k.startswith("backbone.") for k in state):
        # An ImageNet classifier: its trunk is our backbone.body; the fc classifier is dropped.
        return OrderedDict(("backbone.body." + k, v) for k, v in state.items() if not k.startswith("fc."))
    legacy = [
        (r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$", r"\1.0.\2"),
        (r"^(rpn\.head\.conv)\.(weight|bias)$", r"\1.0.0.\2"),
        (r"^(roi_heads\.mask_head)\.mask_fcn(\d+)\.(weight|bias)$", lambda m: f"{m[1]}.{int(m[2]) - 1}.0.{m[3]}"),
    ]
    converted = OrderedDict()
    for key, value in state.items():
        for pattern, replacement in legacy:
            key = re.sub(pattern, replacement, key)
        converted[key] = value
    return converted


# detectron2's parameter names -> ours (the same layers: see the README's section on detectron2's model zoo).
DETECTRON2_KEYS = [
    (r"^backbone\.bottom_up\.stem\.conv1\.weight$", "backbone.body.conv1.weight"),
    (r"^backbone\.bottom_up\.stem\.conv1\.norm\.", "backbone.body.bn1."),
    (r"^backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.weight$",
     lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.weight"),
    (r"^backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.norm\.",
     lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}."),
    (r"^backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.weight$",
     lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.downsample.0.weight"),
    (r"^backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.norm\.",
     lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.downsample.1."),
    (r"^backbone\.fpn_lateral(\d)\.", lambda m: f"backbone.fpn.inner_blocks.{int(m[1]) - 2}.0."),
    (r"^backbone\.fpn_output(\d)\.", lambda m: f"backbone.fpn.layer_blocks.{int(m[1]) - 2}.0."),
    (r"^proposal_generator\.rpn_head\.conv\.", "rpn.head.conv.0.0."),
    (r"^proposal_generator\.rpn_head\.objectness_logits\.", "rpn.head.cls_logits."),
    (r"^proposal_generator\.rpn_head\.anchor_deltas\.", "rpn.head.bbox_pred."),
    (r"^roi_heads\.box_head\.fc(\d)\.", lambda m: f"roi_heads.box_head.fc{int(m[1]) + 5}."),
    (r"^roi_heads\.mask_head\.mask_fcn(\d)\.", lambda m: f"roi_heads.mask_head.{int(m[1]) - 1}.0."),
    (r"^roi_heads\.mask_head\.deconv\.", "roi_heads.mask_predictor.conv5_mask."),
    (r"^roi_heads\.mask_head\.predictor\.", "roi_heads.mask_predictor.mask_fcn_logits."),
]
# What detectron2 keeps beside the weights: the input statistics (our PIXEL_MEAN and PIXEL_STD) and the
# anchors of older files (computed, ANCHOR_SIZES); its own loader drops them too (detection_checkpoint.py).
DETECTRON2_IGNORED = re.compile(r"^(pixel_mean|pixel_std|proposal_generator\.anchor_generator\..*)$")


def convert_detectron2_state_dict(state: dict) -> dict:
    """Our keys and class layout from a detectron2 Mask R-CNN state dict (numpy arrays from a model-zoo
    .pkl, or tensors from a .pth), names mapped by DETECTRON2_KEYS.

    detectron2's K foreground classes are 0..K-1 with background last (index K) in cls_score [K + 1, D];
    bbox_pred [4K, D] and the mask predictor [K, C, 1, 1] have no background rows. Ours put background
    at 0 (NUM_CLASSES = K + 1), so cls_score's rows become [K, 0, ..., K - 1] (the same softmax, read in
    another order) and the other two get zero rows for background in front (never read: the box and mask
    of a detection are those of its own class).
    """
    converted = OrderedDict()
    for key, value in state.items():
        if DETECTRON2_IGNORED.match(key):
            continue
        value = torch.as_tensor(np.array(value)) if isinstance(value, np.ndarray) else value
        for pattern, replacement in DETECTRON2_KEYS:
            key, found = re.subn(pattern, replacement, key)
            if found:
                break
        if key.startswith("roi_heads.box_predictor.cls_score."):
            value = torch.cat([value[-1:], value[:-1]])  # background: last -> first
        elif key.startswith(("roi_heads.box_predictor.bbox_pred.", "roi_heads.mask_predictor.mask_fcn_logits.")):
            rows = 4 if "bbox_pred" in key else 1
            value = torch.cat([value.new_zeros((rows, *value.shape[1:])), value])
        converted[key] = value
    return converted


############################################################
#  Input validation
############################################################


def check_images(images):
    """images: a non-empty list of [3, H, W] floating point tensors (any float dtype: the model converts them to
    its own), finite, with values in [0, 1] as torchvision's detection models take them. Raises ValueError
    naming the image and what is wrong; a [0, 255] image would otherwise give no detections and no error."""
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError(f"images must be a non-empty list of [3, H, W] tensors; got {type(images).__name__}")
    for i, image in enumerate(images):
        if not isinstance(image, Tensor):
            raise ValueError(f"images[{i}] must be a torch.Tensor [3, H, W]; got {type(image).__name__}")
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"images[{i}] must be [3, H, W] (RGB, channels first); got shape {list(image.shape)}")
        if not image.is_floating_point():
            raise ValueError(f"images[{i}] must be floating point in [0, 1]; got {image.dtype}")
        if image.shape[1] < 1 or image.shape[2] < 1:
            raise ValueError(f"images[{i}] is empty: shape {list(image.shape)}")
        if torch.compiler.is_exporting():
            continue  # the values are not known while tracing; an exported program takes them as they come
        values = image.detach()
        if not bool(torch.isfinite(values).all()):
            nan, inf = int(torch.isnan(values).sum()), int(torch.isinf(values).sum())
            raise ValueError(f"images[{i}] has {nan} NaN and {inf} infinite values; images must be finite, "
                             "in [0, 1]")
        low, high = (float(v) for v in torch.aminmax(values))
        if low < 0 or high > 1:
            hint = " (divide 0-255 images by 255)" if high > 1 else ""
            raise ValueError(f"images[{i}] has values from {low:g} to {high:g}; image tensors must be in [0, 1]"
                             f"{hint}")


def target_tensors(target, index: int, device) -> dict:
    """A target of numpy arrays or tensors (boxes, labels, masks, optional crowd_boxes) as tensors on
    `device`: boxes float32, labels int64, masks uint8. Shapes and values are checked by check_targets."""
    if not isinstance(target, dict):
        raise ValueError(f"targets[{index}] must be a dict with boxes, labels and masks; got {type(target).__name__}")
    dtypes = {"boxes": torch.float32, "crowd_boxes": torch.float32, "labels": torch.int64, "masks": torch.uint8}
    return {key: torch.as_tensor(value).to(device, dtypes[key]) for key, value in target.items() if key in dtypes}


def check_targets(targets, images, num_classes):
    if len(targets) != len(images):
        raise ValueError(f"targets must have one dict per image ({len(images)}); got {len(targets)}")
    for i, (target, image) in enumerate(zip(targets, images)):
        boxes, labels = target.get("boxes"), target.get("labels")
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
            shape = list(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
            raise ValueError(f"targets[{i}]['boxes'] must be [K, 4] (x1, y1, x2, y2); got {shape}")
        if not boxes.is_floating_point():
            raise ValueError(f"targets[{i}]['boxes'] must be floating point; got {boxes.dtype}")
        height, width = image.shape[-2:]
        if boxes.numel():
            if not bool(torch.isfinite(boxes).all()):
                raise ValueError(f"targets[{i}]['boxes'] has non-finite values")
            bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
            if bool(bad.any()):
                j = int(torch.where(bad)[0][0])
                raise ValueError(f"targets[{i}]['boxes'][{j}] = {boxes[j].tolist()} has x2 <= x1 or y2 <= y1; "
                                 "boxes must be (x1, y1, x2, y2) with positive width and height")
            outside = (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > width) | (boxes[:, 3] > height)
            if bool(outside.any()):
                j = int(torch.where(outside)[0][0])
                raise ValueError(f"targets[{i}]['boxes'][{j}] = {boxes[j].tolist()} lies outside the image "
                                 f"({width} x {height})")
        # int64 only: a uint8 or bool tensor used as an index is a mask, not class numbers.
        if not isinstance(labels, Tensor) or labels.shape != boxes.shape[:1] or labels.dtype != torch.int64:
            got = f"{list(labels.shape)} {labels.dtype}" if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"targets[{i}]['labels'] must be an integer tensor [K] with K = {boxes.shape[0]} and "
                             f"dtype torch.int64; got {got}")
        if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) >= num_classes):
            raise ValueError(f"targets[{i}]['labels'] must be in 1..{num_classes - 1} (0 is background); got "
                             f"values from {int(labels.min())} to {int(labels.max())}")
        masks = target.get("masks")
        if masks is None or not isinstance(masks, Tensor) or tuple(masks.shape) != (boxes.shape[0], height, width):
            shape = list(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
            raise ValueError(f"targets[{i}]['masks'] must be [K, H, W] = [{boxes.shape[0]}, {height}, {width}]; "
                             f"got {shape}")
        # The mask loss is a binary cross-entropy against these values: a target above 1 (a 0/255 mask)
        # leaves it unbounded below, and training runs to NaN within steps.
        if masks.numel() and masks.dtype != torch.bool and not 0 <= float(masks.min()) <= float(masks.max()) <= 1:
            raise ValueError(f"targets[{i}]['masks'] must hold 0 and 1 (or values in [0, 1]); got values from "
                             f"{float(masks.min()):g} to {float(masks.max()):g} ({masks.dtype})")
