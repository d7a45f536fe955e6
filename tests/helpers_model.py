"""Shared helpers for tests/test_model.py: small configs, random models that produce detections,
synthetic images and targets, and comparisons of detections.

Nothing here computes an expected value with the code under test.
"""

import torch
import torchvision
from torch import nn

from config import Config

# torchvision's FrozenBatchNorm2d and ours both have these four tensors; nn.BatchNorm2d too.
BN_TYPES = (nn.BatchNorm2d, torchvision.ops.FrozenBatchNorm2d)


def small_config(**overrides):
    """A small network (ResNet-18, GroupNorm, narrow FPN and heads, ~150 px images) for training tests."""
    settings = dict(
        NUM_CLASSES=4, BACKBONE="resnet18", NORM="gn", FPN_CHANNELS=64, BOX_HEAD_DIM=128, MASK_HEAD_CHANNELS=64,
        MASK_HEAD_CONVS=2, IMAGE_MIN_DIM=128, IMAGE_MAX_DIM=160, IMAGE_MIN_DIM_TRAIN=(128,),
        RPN_PRE_NMS_TOP_N_TRAIN=200, RPN_POST_NMS_TOP_N_TRAIN=100, RPN_PRE_NMS_TOP_N_TEST=300,
        RPN_POST_NMS_TOP_N_TEST=300, ROI_BATCH_SIZE_PER_IMAGE=64, TRAINABLE_BACKBONE_LAYERS=5,
    )
    settings.update(overrides)
    return Config(**settings)


def randomise_norms(model, seed=0):
    """Random BN statistics and affine parameters (in place), so that no normalisation layer is the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BN_TYPES) or type(module).__name__ == "FrozenBatchNorm2d":
                n = module.running_mean.numel()
                module.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
                module.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                module.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
                module.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            elif isinstance(module, nn.GroupNorm):
                n = module.weight.numel()
                module.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
                module.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    return model


def make_detecting(model, seed=0, cls_factor=40.0, rpn_factor=30.0):
    """A randomly initialised Mask R-CNN (ours or torchvision's, same module names) that produces real
    detections: random norms, and sharper class and objectness logits. With much larger factors the
    softmax saturates to exactly 1.0 and tied scores make torchvision's order arbitrary."""
    randomise_norms(model, seed)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(cls_factor)
        model.rpn.head.cls_logits.weight.mul_(rpn_factor)
    return model


def smooth_image(height, width, seed=0):
    """A [3, H, W] float image in [0, 1] with structure at several scales (blurred noise plus noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(height // 16, 2), max(width // 16, 2), generator=g)
    image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
    image = 0.7 * image + 0.3 * torch.rand(3, height, width, generator=g)
    return image.clamp(0, 1)


def rectangle_target(height, width, boxes, labels):
    """Target dict with the given integer boxes (x1, y1, x2, y2) and filled rectangular masks."""
    masks = torch.zeros((len(boxes), height, width), dtype=torch.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        masks[k, y1:y2, x1:x2] = 1
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": masks,
    }


def shapes_sample(height, width, boxes, labels, seed=0):
    """An image where each box is a flat-coloured rectangle on a grey noisy background, and its target."""
    g = torch.Generator().manual_seed(seed)
    image = 0.4 + 0.1 * torch.rand(3, height, width, generator=g)
    colours = {1: (0.9, 0.1, 0.1), 2: (0.1, 0.8, 0.1), 3: (0.1, 0.2, 0.9)}
    for (x1, y1, x2, y2), label in zip(boxes, labels):
        image[:, y1:y2, x1:x2] = torch.tensor(colours[label])[:, None, None]
    return image, rectangle_target(height, width, boxes, labels)


def mask_ious(a, b, threshold=0.5):
    """Per-detection IoU of two [D, 1, H, W] probability maps thresholded at `threshold`; two empty masks
    count as IoU 1."""
    a, b = (a > threshold).flatten(1), (b > threshold).flatten(1)
    inter = (a & b).sum(1).double()
    union = (a | b).sum(1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def pair_near_ties(expected_boxes, got_boxes, scores, box_atol, score_rtol=1e-5):
    """Index array p [N] with got_boxes[p[i]] within box_atol of expected_boxes[i], one to one.

    Outputs sorted by decreasing score may swap two entries whose scores are nearly equal: float
    rounding differs between CPUs (AVX2 against AVX-512), so tests must not depend on the order of
    near-ties. Any other reordering fails: an entry may move only between positions whose `scores`
    (the sorted scores of either side, [N]) are within score_rtol (relative) of each other.
    """
    expected_boxes, got_boxes = torch.as_tensor(expected_boxes), torch.as_tensor(got_boxes)
    scores = torch.as_tensor(scores).double()
    n = expected_boxes.shape[0]
    assert got_boxes.shape == expected_boxes.shape, f"{got_boxes.shape[0]} rows instead of {n}"
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    distance = (expected_boxes[:, None].double() - got_boxes[None].double()).abs().amax(-1)  # (N, N)
    p = distance.argmin(1)
    worst = distance[torch.arange(n), p].max().item()
    assert worst <= box_atol, f"rows differ by up to {worst} (allowed {box_atol})"
    assert len(set(p.tolist())) == n, "rows are not paired one to one"
    moved = torch.where(p != torch.arange(n))[0]
    gap = (scores[moved] - scores[p[moved]]).abs()
    allowed = score_rtol * scores[moved].abs().clamp(min=1e-6)
    assert bool((gap <= allowed).all()), f"rows {moved.tolist()[:10]} moved between positions of different scores"
    return p


def assert_same_detections(expected, got, min_detections=10, box_atol=1e-3, score_atol=1e-4, min_mask_iou=0.99):
    """Compares one image's detections (torchvision's `expected` with ours `got`), in order up to near-ties
    (see pair_near_ties)."""
    n = expected["boxes"].shape[0]
    assert n >= min_detections, f"the reference made only {n} detections; the test needs real detections"
    assert got["boxes"].shape == (n, 4), f"{got['boxes'].shape[0]} detections instead of {n}"
    got = {key: value[pair_near_ties(expected["boxes"], got["boxes"], expected["scores"], box_atol)]
           for key, value in got.items()}
    assert torch.equal(got["labels"], expected["labels"]), "labels differ"
    box_error = (got["boxes"] - expected["boxes"]).abs().max().item()
    assert box_error <= box_atol, f"boxes differ by up to {box_error} px"
    score_error = (got["scores"] - expected["scores"]).abs().max().item()
    assert score_error <= score_atol, f"scores differ by up to {score_error}"
    assert got["masks"].shape == expected["masks"].shape
    assert got["masks"].dtype.is_floating_point
    assert float(got["masks"].min()) >= 0 and float(got["masks"].max()) <= 1
    iou = mask_ious(expected["masks"], got["masks"]).mean().item()
    assert iou > min_mask_iou, f"mean mask IoU {iou}"
