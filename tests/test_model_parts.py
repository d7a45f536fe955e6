"""Unit tests of model.py's parts, detectron2-style: the matcher, balanced sampling, box coding, anchors,
mask pasting, preprocessing, target assignment, mask targets, the losses, input validation and
MaskRCNN.training_targets (the contract in the module's docstring).

Oracles: small cases computed by hand (the expected numbers are written out here, with the arithmetic
in comments), a float64 reference written here in plain PyTorch (mask pasting), and torchvision's own
training functions (fastrcnn_loss, maskrcnn_loss, project_masks_on_boxes, BoxCoder).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers_model import rectangle_target, small_config
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection import roi_heads as tv_roi_heads

import model as model_module
import roialign
from config import Config
from model import (
    BOX_DELTA_CLAMP,
    AssignedTargets,
    BalancedSample,
    MaskRCNN,
    Matcher,
    assign_targets,
    box_regression_loss,
    cell_anchors,
    decode_boxes,
    encode_boxes,
    fastrcnn_losses,
    generate_anchors,
    mask_loss,
    mask_targets,
    paste_masks,
    preprocess,
    rpn_losses,
    sample_balanced,
)

BELOW, BETWEEN = Matcher.BELOW_LOW, Matcher.BETWEEN


# ----------------------------------------------------------------------------------------------------
# Matcher


def test_matcher_thresholds():
    # high 0.7, low 0.3: >= 0.7 matched, [0.3, 0.7) between, < 0.3 background; the bounds themselves
    # belong to the upper side.
    iou = torch.tensor([[0.75, 0.7, 0.69, 0.3, 0.29, 0.0]], dtype=torch.float64)
    assert Matcher(0.7, 0.3, False)(iou).tolist() == [0, 0, BETWEEN, BETWEEN, BELOW, BELOW]


def test_matcher_picks_the_best_ground_truth():
    iou = torch.tensor([[0.8, 0.1, 0.2], [0.9, 0.75, 0.1]], dtype=torch.float64)
    assert Matcher(0.7, 0.3, False)(iou).tolist() == [1, 1, BELOW]


def test_matcher_low_quality_matches():
    # Every prediction is below 0.7. Ground truth 0's best prediction is 0 (0.4), ground truth 1's is 2 (0.6):
    # the low-quality rule matches those two; prediction 1 stays between the thresholds.
    iou = torch.tensor([[0.4, 0.1, 0.0], [0.2, 0.5, 0.6]], dtype=torch.float64)
    assert Matcher(0.7, 0.3, False)(iou).tolist() == [BETWEEN, BETWEEN, BETWEEN]
    assert Matcher(0.7, 0.3, True)(iou).tolist() == [0, BETWEEN, 1]


def test_matcher_low_quality_match_keeps_the_predictions_own_best_ground_truth():
    # Prediction 0 is ground truth 0's best (0.2), but its own best ground truth is 1 (0.25): as in
    # torchvision and Detectron, it is matched to 1.
    iou = torch.tensor([[0.2, 0.0], [0.25, 0.9]], dtype=torch.float64)
    assert Matcher(0.7, 0.3, False)(iou).tolist() == [BELOW, 1]
    assert Matcher(0.7, 0.3, True)(iou).tolist() == [1, 1]


def test_matcher_ties():
    # Ground truth 0 overlaps predictions 0 and 1 equally (0.5): the low-quality rule keeps both.
    # Prediction 2 overlaps both ground truths equally (0.1): the first one wins.
    iou = torch.tensor([[0.5, 0.5, 0.1], [0.0, 0.0, 0.1]], dtype=torch.float64)
    assert Matcher(0.7, 0.3, False)(iou).tolist() == [BETWEEN, BETWEEN, BELOW]
    assert Matcher(0.7, 0.3, True)(iou).tolist() == [0, 0, 0]


@pytest.mark.parametrize("low_quality", [False, True])
def test_matcher_without_ground_truth(low_quality):
    matches = Matcher(0.7, 0.3, low_quality)(torch.zeros((0, 4)))
    assert matches.dtype == torch.int64 and matches.tolist() == [BELOW] * 4


# ----------------------------------------------------------------------------------------------------
# Balanced sampling


def check_sample(sample, labels, positives, negatives):
    assert sample.positive.dtype == torch.bool and sample.negative.dtype == torch.bool
    assert int(sample.positive.sum()) == positives and int(sample.negative.sum()) == negatives
    assert not (sample.positive & sample.negative).any()
    assert (labels[sample.positive] >= 1).all() and (labels[sample.negative] == 0).all()


def test_sampling_counts():
    # 10 positives, 100 negatives, 10 ignored; 20 samples with at most a quarter (5) positive.
    torch.manual_seed(0)
    labels = torch.tensor([1] * 10 + [0] * 100 + [-1] * 5 + [-2] * 5)
    check_sample(sample_balanced(labels, 20, 0.25), labels, 5, 15)


def test_sampling_fills_with_negatives_when_positives_are_few():
    torch.manual_seed(0)
    labels = torch.tensor([2, 3] + [0] * 100)  # any class >= 1 is a positive
    check_sample(sample_balanced(labels, 20, 0.25), labels, 2, 18)


def test_sampling_without_positives():
    torch.manual_seed(0)
    labels = torch.tensor([0] * 100 + [-1] * 3)
    check_sample(sample_balanced(labels, 20, 0.25), labels, 0, 20)


def test_sampling_takes_everything_when_there_is_not_enough():
    labels = torch.tensor([1, 1, 0, 0, 0, -1])
    sample = sample_balanced(labels, 20, 0.5)
    check_sample(sample, labels, 2, 3)
    assert sample.positive.tolist() == [True, True, False, False, False, False]


def test_sampling_is_random():
    labels = torch.tensor([1] * 50 + [0] * 50)
    torch.manual_seed(0)
    first = sample_balanced(labels, 10, 0.5)
    second = sample_balanced(labels, 10, 0.5)
    assert not torch.equal(first.positive, second.positive)


# ----------------------------------------------------------------------------------------------------
# Box coding


def test_encode_by_hand():
    # Proposal: centre (5, 5), 10 x 10. Reference: centre (10, 15), 10 x 20.
    proposals = torch.tensor([[0.0, 0, 10, 10]], dtype=torch.float64)
    reference = torch.tensor([[5.0, 5, 15, 25]], dtype=torch.float64)
    torch.testing.assert_close(encode_boxes(reference, proposals, (1.0, 1.0, 1.0, 1.0)),
                               torch.tensor([[0.5, 1.0, 0.0, math.log(2)]], dtype=torch.float64))
    torch.testing.assert_close(encode_boxes(reference, proposals, (10.0, 10.0, 5.0, 5.0)),
                               torch.tensor([[5.0, 10.0, 0.0, 5 * math.log(2)]], dtype=torch.float64))


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_and_decode_are_inverses(weights):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, 2, generator=g, dtype=torch.float64) * 100
    wh = torch.rand(50, 2, 2, generator=g, dtype=torch.float64) * 60 + 1
    proposals, reference = torch.cat([xy + 0, xy + wh], dim=2).unbind(1)  # (50, 4) each
    decoded = decode_boxes(encode_boxes(reference, proposals, weights), proposals, weights)
    assert decoded.shape == (50, 1, 4)
    torch.testing.assert_close(decoded[:, 0], reference, atol=1e-9, rtol=0)


def test_decode_per_class_deltas():
    # [N, K * 4] deltas give [N, K, 4] boxes, each class decoded on its own.
    box = torch.tensor([[0.0, 0, 10, 10]])
    deltas = torch.tensor([[0.0, 0, 0, 0, 1.0, 0, 0, 0]])  # class 1 moves the centre one width right
    decoded = decode_boxes(deltas, box, (1.0, 1.0, 1.0, 1.0))
    assert decoded.tolist() == [[[0.0, 0, 10, 10], [10.0, 0, 20, 10]]]


def test_decode_clamps_the_scale_change():
    assert BOX_DELTA_CLAMP == math.log(1000.0 / 16)
    box = torch.tensor([[0.0, 0, 16, 16]], dtype=torch.float64)
    deltas = torch.tensor([[0.0, 0, BOX_DELTA_CLAMP, BOX_DELTA_CLAMP], [0.0, 0, 10.0, 10.0]], dtype=torch.float64)
    at_clamp, beyond = decode_boxes(deltas, box.expand(2, 4), (1.0, 1.0, 1.0, 1.0))[:, None]
    # 16 px times 1000 / 16 = 1000 px, centred on (8, 8).
    torch.testing.assert_close(beyond[0, 0], torch.tensor([-492.0, -492, 508, 508], dtype=torch.float64))
    torch.testing.assert_close(beyond, at_clamp)
    # The weights divide the deltas before the clamp: ww = 5 lets a delta up to 5 * log(1000 / 16) through.
    weighted = decode_boxes(torch.tensor([[0.0, 0, 50.0, 0]], dtype=torch.float64), box, (10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(weighted[0, 0], torch.tensor([-492.0, 0, 508, 16], dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------
# Anchors


def test_cell_anchors_by_hand():
    # Size 32, ratio h / w = 0.5: w = 32 * sqrt(2) = 45.25, h = 32 / sqrt(2) = 22.63; halves rounded: 23 and 11.
    anchors = cell_anchors(32, (0.5, 1.0, 2.0), torch.float32, "cpu")
    assert anchors.tolist() == [[-23.0, -11, 23, 11], [-16.0, -16, 16, 16], [-11.0, -23, 11, 23]]


def test_anchors_on_odd_feature_grids():
    # A 96 x 160 padded image: P2-P5 are 24 x 40, 12 x 20, 6 x 10 and 3 x 5 (odd), and P6, P5 subsampled by
    # 2, is 2 x 3, so its strides are 96 // 2 = 48 and 160 // 3 = 53 (not 64).
    grids = [(24, 40), (12, 20), (6, 10), (3, 5), (2, 3)]
    features = [torch.zeros(1, 1, h, w) for h, w in grids]
    config = Config()
    anchors = generate_anchors(features, (96, 160), config)
    counts = [h * w * 3 for h, w in grids]
    assert anchors.shape == (sum(counts), 4)
    levels = anchors.split(counts)
    for (h, w), level, size in zip(grids, levels, config.ANCHOR_SIZES):
        level = level.reshape(h, w, 3, 4)  # (y, x, anchor, 4)
        stride_y, stride_x = 96 // h, 160 // w
        centre_x = (level[..., 0] + level[..., 2]) / 2
        centre_y = (level[..., 1] + level[..., 3]) / 2
        assert torch.equal(centre_x, (torch.arange(w) * stride_x).float()[None, :, None].expand(h, w, 3))
        assert torch.equal(centre_y, (torch.arange(h) * stride_y).float()[:, None, None].expand(h, w, 3))
        square = level[..., 1, :]  # ratio 1: size x size
        assert ((square[..., 2] - square[..., 0]) == size).all() and ((square[..., 3] - square[..., 1]) == size).all()
        wide, tall = level[..., 0, :], level[..., 2, :]  # ratios 0.5 and 2: wider than high, higher than wide
        assert ((wide[..., 2] - wide[..., 0]) > (wide[..., 3] - wide[..., 1])).all()
        assert ((tall[..., 2] - tall[..., 0]) < (tall[..., 3] - tall[..., 1])).all()
    assert levels[4].reshape(2, 3, 3, 4)[1, 2, 1].tolist() == [106.0 - 256, 48.0 - 256, 106.0 + 256, 48.0 + 256]


# ----------------------------------------------------------------------------------------------------
# Mask pasting against a float64 reference: one mask at a time, as torchvision's paste_mask_in_image


def paste_reference(masks, boxes, height, width):
    """[N, M, M] float64 masks into [N, height, width]: pad by one pixel, enlarge the box by (M + 2) / M,
    cut its corners to integers (towards zero), resize the padded mask bilinearly to the box's integer
    size (corners inclusive) and copy the part inside the image."""
    n, m = masks.shape[0], masks.shape[-1]
    out = torch.zeros(n, height, width, dtype=torch.float64)
    for i in range(n):
        padded = F.pad(masks[i], (1, 1, 1, 1))
        x1, y1, x2, y2 = boxes[i].tolist()
        half_w, half_h = (x2 - x1) / 2 * (m + 2) / m, (y2 - y1) / 2 * (m + 2) / m
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        ex1, ey1, ex2, ey2 = int(cx - half_w), int(cy - half_h), int(cx + half_w), int(cy + half_h)
        w, h = max(ex2 - ex1 + 1, 1), max(ey2 - ey1 + 1, 1)
        resized = F.interpolate(padded[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        xa, xb = max(ex1, 0), min(ex2 + 1, width)
        ya, yb = max(ey1, 0), min(ey2 + 1, height)
        if xa < xb and ya < yb:
            out[i, ya:yb, xa:xb] = resized[ya - ey1 : yb - ey1, xa - ex1 : xb - ex1]
    return out


@pytest.mark.parametrize("m", [28, 7])
def test_paste_masks_matches_a_float64_reference(m):
    g = torch.Generator().manual_seed(m)
    masks = torch.rand(6, m, m, generator=g, dtype=torch.float64)
    boxes = torch.tensor([
        [10.3, 12.6, 50.2, 40.9],  # inside
        [-20.4, -5.2, 30.7, 25.1],  # over the top-left corner
        [70.5, 50.5, 130.3, 95.8],  # over the bottom-right corner
        [33.2, 33.4, 33.8, 34.1],  # smaller than a pixel
        [5.1, 60.2, 95.3, 61.0],  # one pixel high
        [200.5, 10.5, 220.5, 30.5],  # outside
    ], dtype=torch.float64)
    got = paste_masks(masks[:, None], boxes, (70, 100))
    assert got.shape == (6, 1, 70, 100) and got.dtype == torch.float64
    expected = paste_reference(masks, boxes, 70, 100)
    # Ours computes the sample positions in float32; the reference in float64.
    torch.testing.assert_close(got[:, 0], expected, atol=1e-5, rtol=0)
    assert got[5].abs().max() == 0
    got32 = paste_masks(masks[:, None].float(), boxes.float(), (70, 100))
    torch.testing.assert_close(got32[:, 0].double(), expected, atol=1e-5, rtol=0)
    # One mask per chunk (the smallest working set) pastes the same masks.
    one_by_one = paste_masks(masks[:, None].float(), boxes.float(), (70, 100), chunk_bytes=1)
    torch.testing.assert_close(one_by_one[:, 0].double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_bytes", [None, 1, 3 * 70 * 100 * 4])
def test_paste_masks_with_a_threshold_is_the_thresholded_float_paste(chunk_bytes):
    # Random masks and boxes (some over the image's borders); the bool paste must be exactly the float paste
    # compared with the threshold, chunk by chunk (the default, one mask at a time, three at a time).
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(8, 1, 28, 28, generator=g)
    corner = torch.rand(8, 2, generator=g) * 120 - 20
    boxes = torch.cat([corner, corner + 1 + torch.rand(8, 2, generator=g) * 60], dim=1)
    chunking = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
    probabilities = paste_masks(masks, boxes, (70, 100), **chunking)
    assert probabilities.dtype == torch.float32 and probabilities.shape == (8, 1, 70, 100)
    for threshold in (0.0, 0.5, 0.9):
        got = paste_masks(masks, boxes, (70, 100), threshold, **chunking)
        assert got.dtype == torch.bool and got.shape == (8, 1, 70, 100)
        assert torch.equal(got, probabilities > threshold)
        assert got.any() and not got.all()
    assert paste_masks(masks[:0], boxes[:0], (30, 40), 0.5).shape == (0, 1, 30, 40)


def test_paste_no_masks():
    assert paste_masks(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (30, 40)).shape == (0, 1, 30, 40)


# ----------------------------------------------------------------------------------------------------
# Preprocessing


def preprocess_config(divisor=32):
    return Config(IMAGE_MIN_DIM=128, IMAGE_MAX_DIM=300, IMAGE_SIZE_DIVISOR=divisor)


@pytest.mark.parametrize("divisor, padded", [(32, (128, 320)), (1, (128, 300)), (7, (133, 301))])
def test_preprocess_resizes_normalises_and_pads(divisor, padded):
    # Image A, 100 x 200: scale min(128 / 100, 300 / 200) = 1.28 -> 128 x 256. Image B, 90 x 300: the long
    # side limits the scale to min(128 / 90, 300 / 300) = 1 -> 90 x 300. The batch is padded to the
    # largest height and width rounded up to the divisor.
    config = preprocess_config(divisor)
    a = torch.full((3, 100, 200), 0.5)
    b = torch.rand(3, 90, 300, generator=torch.Generator().manual_seed(0))
    batch, _ = preprocess([a, b], config)
    assert tuple(batch.tensor.shape) == (2, 3, *padded)
    assert batch.image_sizes == [(128, 256), (90, 300)]
    assert batch.original_sizes == [(100, 200), (90, 300)]
    assert batch.scales == [1.28, 1.0]
    mean = torch.tensor(config.PIXEL_MEAN)[:, None, None]
    std = torch.tensor(config.PIXEL_STD)[:, None, None]
    torch.testing.assert_close(batch.tensor[0, :, :128, :256], ((0.5 - mean) / std).expand(3, 128, 256))
    torch.testing.assert_close(batch.tensor[1, :, :90, :300], (b - mean) / std)
    # Zero padding (in the normalised space) to the right and below each image.
    assert batch.tensor[0, :, 128:].abs().sum() == 0 and batch.tensor[0, :, :, 256:].abs().sum() == 0
    assert batch.tensor[1, :, 90:].abs().sum() == 0 and batch.tensor[1, :, :, 300:].abs().sum() == 0


def test_preprocess_resizes_targets_with_their_images():
    target = rectangle_target(100, 200, [(10, 20, 50, 60)], [1])
    target["crowd_boxes"] = torch.tensor([[0.0, 0, 100, 50]])
    batch, (resized,) = preprocess([torch.rand(3, 100, 200)], preprocess_config(), [target])
    # Scale 1.28 on both axes.
    torch.testing.assert_close(resized["boxes"], torch.tensor([[12.8, 25.6, 64.0, 76.8]]))
    torch.testing.assert_close(resized["crowd_boxes"], torch.tensor([[0.0, 0, 128, 64]]))
    assert resized["masks"].shape == (1, 128, 256) and resized["masks"].dtype == torch.uint8
    # Nearest neighbour: output pixel (y, x) reads input pixel (floor(y / 1.28), floor(x / 1.28)).
    ys = (torch.arange(128) / 1.28).floor().long()
    xs = (torch.arange(256) / 1.28).floor().long()
    assert torch.equal(resized["masks"][0], target["masks"][0][ys][:, xs])
    assert torch.equal(resized["labels"], target["labels"])


@pytest.mark.parametrize("height, width, resized", [(1, 1000, (1, 300)), (1000, 1, (300, 1)), (2, 900, (1, 300))])
def test_preprocess_keeps_a_pixel_on_each_side_of_extreme_aspect_ratios(height, width, resized):
    # 1 x 1000: scale min(128 / 1, 300 / 1000) = 0.3, so the short side would be floor(1 * 0.3) = 0 pixels; it is
    # kept at 1 (2 x 900: floor(2 * 1/3) = 0 too) and the long side is resized as usual, to 300.
    config = preprocess_config()
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))
    batch, _ = preprocess([image], config)
    assert batch.image_sizes == [resized]
    mean = torch.tensor(config.PIXEL_MEAN)[:, None, None]
    std = torch.tensor(config.PIXEL_STD)[:, None, None]
    expected = F.interpolate(((image - mean) / std)[None], size=resized, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(batch.tensor[0, :, : resized[0], : resized[1]], expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_preprocess_converts_images_to_the_models_dtype(dtype):
    image = torch.rand(3, 100, 200, generator=torch.Generator().manual_seed(0)).to(dtype)
    batch, _ = preprocess([image], preprocess_config())
    expected, _ = preprocess([image.float()], preprocess_config())
    assert batch.tensor.dtype == torch.float32 and torch.equal(batch.tensor, expected.tensor)
    assert preprocess([image], preprocess_config(), dtype=torch.float64)[0].tensor.dtype == torch.float64


# ----------------------------------------------------------------------------------------------------
# Target assignment

BOXES = torch.tensor([
    [0.0, 0, 10, 10],  # IoU 100 / 120 with the ground truth
    [0.0, 0, 10, 12],  # the ground truth itself
    [20.0, 20, 30, 30],  # no overlap
    [100.0, 100, 110, 110],  # no overlap
    [0.0, 0, 10, 20],  # IoU 120 / 200 = 0.6
])
GT = {"boxes": torch.tensor([[0.0, 0, 10, 12]]), "labels": torch.tensor([3])}
WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def test_assign_targets_by_hand():
    assigned = assign_targets(BOXES, GT, Matcher(0.5, 0.5, False), WEIGHTS, 0.7, True)
    assert isinstance(assigned, AssignedTargets)
    assert assigned.labels.tolist() == [3, 3, 0, 0, 3]
    assert assigned.matched_gt.tolist() == [0, 0, -1, -1, 0]
    assert not assigned.crowd.any()
    # Box 0: centre (5, 5), 10 x 10 against (5, 6), 10 x 12: dy = 10 * 1 / 10, dh = 5 log(12 / 10).
    # Box 4: centre (5, 10), 10 x 20: dy = 10 * (6 - 10) / 20 = -2, dh = 5 log(12 / 20).
    expected = torch.tensor([[0.0, 1.0, 0.0, 5 * math.log(1.2)], [0.0, 0, 0, 0], [0.0, 0, 0, 0], [0.0, 0, 0, 0],
                             [0.0, -2.0, 0.0, 5 * math.log(0.6)]])
    torch.testing.assert_close(assigned.deltas, expected)
    assert torch.equal(assigned.deltas[1], torch.zeros(4))  # a box equal to its ground truth: exactly 0


def test_assign_targets_without_classes_labels_objects_1():
    assigned = assign_targets(BOXES, GT, Matcher(0.5, 0.5, False), WEIGHTS, 0.7, False)
    assert assigned.labels.tolist() == [1, 1, 0, 0, 1]


def test_assign_targets_between_thresholds_is_ignored():
    assigned = assign_targets(BOXES, GT, Matcher(0.7, 0.3, False), WEIGHTS, 0.7, True)
    assert assigned.labels.tolist() == [3, 3, 0, 0, -1]
    assert assigned.matched_gt.tolist() == [0, 0, -1, -1, -1]
    assert assigned.deltas[4].tolist() == [0.0, 0, 0, 0]


def test_assign_targets_crowd_regions():
    # Crowd 0 covers boxes 0 and 1 (foreground: they stay foreground) and 70% of box 4 (not more than
    # 0.7: not inside); crowd 1 covers box 3 (background: ignored, as crowd).
    target = {**GT, "crowd_boxes": torch.tensor([[-5.0, -5, 12, 14], [95, 95, 120, 120]])}
    assigned = assign_targets(BOXES, target, Matcher(0.5, 0.5, False), WEIGHTS, 0.7, True)
    assert assigned.labels.tolist() == [3, 3, 0, -1, 3]
    assert assigned.crowd.tolist() == [False, False, False, True, False]
    # A box between the thresholds and inside a crowd region counts as crowd.
    target = {**GT, "crowd_boxes": torch.tensor([[0.0, 0, 10, 20]])}
    assigned = assign_targets(BOXES, target, Matcher(0.7, 0.3, False), WEIGHTS, 0.7, True)
    assert assigned.labels.tolist() == [3, 3, 0, 0, -1]
    assert assigned.crowd.tolist() == [False, False, False, False, True]


def test_assign_targets_without_ground_truth():
    target = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64),
              "crowd_boxes": torch.tensor([[95.0, 95, 120, 120]])}
    assigned = assign_targets(BOXES, target, Matcher(0.7, 0.3, True), (1.0, 1.0, 1.0, 1.0), 0.7, False)
    assert assigned.labels.tolist() == [0, 0, 0, -1, 0]
    assert assigned.matched_gt.tolist() == [-1] * 5
    assert assigned.crowd.tolist() == [False, False, False, True, False]
    assert torch.equal(assigned.deltas, torch.zeros(5, 4))


# ----------------------------------------------------------------------------------------------------
# Mask targets and the losses


def rectangle_masks():
    """Two 64 x 64 ground-truth masks: 0 is empty, 1 is the rectangle x in [20, 60), y in [10, 30)."""
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[1, 10:30, 20:60] = 1
    return masks


@pytest.mark.parametrize("aligned", [False, True])
def test_mask_target_of_a_roi_equal_to_its_box(aligned):
    # RoI = the rectangle's box (40 x 20 px onto 28 x 28: bins of 10/7 x 5/7 px, 2 x 1 samples per bin).
    # Samples inside the rectangle read 1; only the first and last rows and columns reach past its edge:
    # aligned (a half-pixel shift): the first column's samples at x = 19.857 (weight 6/7 on pixel 20) and
    # 20.57 average 13/14, the first row's at y = 9.857 reads 6/7, and the same on the far sides. Not
    # aligned: the first row and column read 1, the last column's samples at 58.93 and 59.64 (weight 5/14 on
    # pixel 59) average 19/28 and the last row's at 29.64 reads 5/14.
    got = mask_targets(rectangle_masks(), torch.tensor([[20.0, 10, 60, 30]]), torch.tensor([1]), 28, aligned)
    assert got.shape == (1, 28, 28) and got.dtype == torch.float32
    # 1 up to float32 rounding of the interpolation weights.
    torch.testing.assert_close(got[0, 1:-1, 1:-1], torch.ones(26, 26), atol=1e-6, rtol=0)
    rows, columns = torch.ones(28, dtype=torch.float64), torch.ones(28, dtype=torch.float64)
    if aligned:
        rows[[0, -1]], columns[[0, -1]] = 6 / 7, 13 / 14
    else:
        rows[-1], columns[-1] = 5 / 14, 19 / 28
    torch.testing.assert_close(got[0].double(), rows[:, None] * columns[None, :], atol=1e-5, rtol=0)


def test_mask_targets_read_the_matched_mask():
    boxes = torch.tensor([[25.0, 12, 45, 28], [25.0, 12, 45, 28], [0.0, 40, 20, 60]])
    got = mask_targets(rectangle_masks(), boxes, torch.tensor([1, 0, 1]), 28, False)
    torch.testing.assert_close(got[0], torch.ones(28, 28), atol=1e-6, rtol=0)  # inside the rectangle
    assert (got[1] == 0).all()  # the same RoI on the empty mask
    assert (got[2] == 0).all()  # outside the rectangle
    assert mask_targets(rectangle_masks(), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 28, False).shape \
        == (0, 28, 28)


def test_mask_targets_and_loss_match_torchvision():
    g = torch.Generator().manual_seed(0)
    gt_masks = (torch.rand(3, 80, 90, generator=g) > 0.5).to(torch.uint8)
    xy = torch.rand(6, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(6, 2, generator=g) * 30], dim=1)
    matched = torch.tensor([0, 1, 2, 2, 1, 0])
    gt_labels = torch.tensor([1, 3, 2])
    expected_targets = tv_roi_heads.project_masks_on_boxes(gt_masks, boxes, matched, 28)
    got_targets = mask_targets(gt_masks, boxes, matched, 28, False)
    torch.testing.assert_close(got_targets, expected_targets, atol=1e-6, rtol=0)
    logits = torch.randn(6, 4, 28, 28, generator=g)
    expected = tv_roi_heads.maskrcnn_loss(logits, [boxes], [gt_masks], [gt_labels], [matched])
    torch.testing.assert_close(mask_loss(logits, gt_labels[matched], got_targets), expected, atol=1e-6, rtol=1e-6)


def test_fastrcnn_losses_match_torchvision():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 2, 0, 1, 3, 0, 0, 2])
    class_logits = torch.randn(8, 4, generator=g)
    box_deltas = torch.randn(8, 16, generator=g)
    target_deltas = torch.randn(8, 4, generator=g) * (labels > 0)[:, None]
    config = Config()
    assert config.SMOOTH_L1_BETA == 1 / 9  # torchvision's
    class_loss, box_loss = tv_roi_heads.fastrcnn_loss(class_logits, box_deltas, [labels], [target_deltas])
    got = fastrcnn_losses(class_logits, box_deltas, labels, target_deltas, config)
    torch.testing.assert_close(got["loss_classifier"], class_loss)
    torch.testing.assert_close(got["loss_box_reg"], box_loss)


@pytest.mark.parametrize("focal", [False, True])
def test_losses_over_no_samples_are_zero_and_connected(focal):
    # No sampled RoI (or anchor): every loss is exactly 0, not NaN (a mean over nothing), and backward reaches
    # the predictions with zero gradients, so the parameters that made them get a gradient (DDP needs one).
    config = Config(BOX_FOCAL_LOSS=focal, RPN_FOCAL_LOSS=focal)
    class_logits = torch.randn(0, 4, requires_grad=True)
    box_deltas = torch.randn(0, 16, requires_grad=True)
    mask_logits = torch.randn(0, 4, 28, 28, requires_grad=True)
    objectness = torch.randn(2, 5, requires_grad=True)
    anchor_deltas = torch.randn(2, 5, 4, requires_grad=True)
    no_label = torch.zeros(0, dtype=torch.int64)
    ignored = AssignedTargets(torch.full((5,), -1), torch.full((5,), -1), torch.zeros(5, 4), torch.zeros(5, dtype=bool))
    nothing = BalancedSample(torch.zeros(5, dtype=bool), torch.zeros(5, dtype=bool))
    losses = {**fastrcnn_losses(class_logits, box_deltas, no_label, torch.zeros(0, 4), config),
              "loss_mask": mask_loss(mask_logits, no_label, torch.zeros(0, 28, 28)),
              **rpn_losses(objectness, anchor_deltas, [ignored] * 2, [nothing] * 2, config)}
    assert {name: value.item() for name, value in losses.items()} == dict.fromkeys(losses, 0.0)
    sum(losses.values()).backward()
    for tensor in (class_logits, box_deltas, mask_logits, objectness, anchor_deltas):
        assert tensor.grad is not None and tensor.grad.shape == tensor.shape and not tensor.grad.any()


def test_box_regression_loss_by_hand():
    # beta 1: |d| < 1 gives d^2 / 2, else |d| - 1/2. (0.5^2 / 2 + (2 - 0.5)) / 4 = (0.125 + 1.5) / 4.
    deltas = torch.tensor([[0.5, 2.0, 0.0, 0.0]])
    assert box_regression_loss(deltas, torch.zeros(1, 4), 1.0, 4).item() == pytest.approx(1.625 / 4)


# ----------------------------------------------------------------------------------------------------
# The whole model: non-finite images


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return MaskRCNN(small_config())


@pytest.mark.parametrize("value, found", [(float("nan"), "1 NaN and 0 infinite"),
                                          (float("inf"), "0 NaN and 1 infinite"),
                                          (float("-inf"), "0 NaN and 1 infinite")])
@pytest.mark.parametrize("training", [False, True])
def test_non_finite_images_are_a_clear_error(small_model, value, found, training):
    good, bad = torch.rand(3, 64, 80), torch.rand(3, 64, 80)
    bad[1, 10, 20] = value
    targets = [rectangle_target(64, 80, [(5, 5, 30, 30)], [1])] * 2
    with pytest.raises(ValueError, match=rf"images\[1\] has {found} values"):
        small_model.train(training)([good, bad], targets if training else None)


# ----------------------------------------------------------------------------------------------------
# MaskRCNN.training_targets

CONTRACT = {  # key: dtype, shape with G ground truth, C crowd regions, A anchors, R RoIs, F foreground RoIs
    "gt_boxes": (np.float32, ("G", 4)), "gt_class_ids": (np.int64, ("G",)), "crowd_boxes": (np.float32, ("C", 4)),
    "anchors": (np.float32, ("A", 4)), "anchor_levels": (np.int64, ("A",)), "anchor_labels": (np.int8, ("A",)),
    "anchor_sampled": (np.bool_, ("A",)), "anchor_matched_gt": (np.int64, ("A",)),
    "anchor_deltas": (np.float32, ("A", 4)), "rois": (np.float32, ("R", 4)), "roi_class_ids": (np.int64, ("R",)),
    "roi_matched_gt": (np.int64, ("R",)), "roi_deltas": (np.float32, ("R", 4)),
    "mask_targets": (np.float32, ("F", 28, 28)),
}


def uint8_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def numpy_target(height, width, boxes, labels, crowd=None):
    target = {key: value.numpy() for key, value in rectangle_target(height, width, boxes, labels).items()}
    target["masks"] = target["masks"].astype(bool)
    if crowd is not None:
        target["crowd_boxes"] = np.array(crowd, dtype=np.float32)
    return target


def check_contract(result, num_gt, num_crowd):
    assert set(result) == set(CONTRACT) | {"resize_scale"}
    assert isinstance(result["resize_scale"], float)
    sizes = {"G": num_gt, "C": num_crowd, "A": result["anchors"].shape[0], "R": result["rois"].shape[0],
             "F": int((result["roi_class_ids"] > 0).sum())}
    for key, (dtype, shape) in CONTRACT.items():
        assert isinstance(result[key], np.ndarray), key
        assert result[key].dtype == dtype, (key, result[key].dtype)
        assert result[key].shape == tuple(sizes.get(s, s) for s in shape), (key, result[key].shape)
    labels = result["anchor_labels"]
    assert set(np.unique(labels)) <= {-2, -1, 0, 1}
    positive = labels == 1
    assert ((result["anchor_matched_gt"] >= 0) == positive).all()
    assert (result["anchor_deltas"][~positive] == 0).all()
    assert (labels[result["anchor_sampled"]] >= 0).all()  # ignored anchors are never sampled
    foreground = result["roi_class_ids"] > 0
    assert ((result["roi_matched_gt"] >= 0) == foreground).all()
    assert (result["roi_deltas"][~foreground] == 0).all()
    assert ((result["mask_targets"] >= 0) & (result["mask_targets"] <= 1)).all()


def test_ground_truth_equal_to_an_anchor_in_a_scaled_image():
    # A 64 x 64 image is resized by 2 (IMAGE_MIN_DIM_TRAIN 128) to 128 x 128. The P2 anchor of size 32 and
    # ratio 1 at the cell (16, 16) (stride 4) is [48, 48, 80, 80] in the network's pixels, [24, 24, 40, 40] in
    # the image's. A ground-truth box there gets that anchor, label 1, deltas exactly 0.
    torch.manual_seed(0)
    model = MaskRCNN(small_config()).eval()
    box = (24, 24, 40, 40)
    target = numpy_target(64, 64, [box], [2])
    (r,) = model.training_targets([uint8_image(64, 64)], [target])
    check_contract(r, 1, 0)
    assert r["resize_scale"] == 2.0
    np.testing.assert_array_equal(r["gt_boxes"], [box])
    np.testing.assert_array_equal(r["gt_class_ids"], [2])
    # 3 anchors per cell on 32 x 32, 16 x 16, 8 x 8, 4 x 4 and 2 x 2 grids.
    counts = [3 * n * n for n in (32, 16, 8, 4, 2)]
    np.testing.assert_array_equal(r["anchor_levels"], np.repeat(np.arange(5), counts))
    # The first cell's anchors (centre (0, 0)), halved: [-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23].
    np.testing.assert_array_equal(r["anchors"][:3],
                                  [[-11.5, -5.5, 11.5, 5.5], [-8, -8, 8, 8], [-5.5, -11.5, 5.5, 11.5]])
    (index,) = np.where((r["anchors"] == np.array(box, np.float32)).all(axis=1))[0]
    assert index == 3 * (16 * 32 + 16) + 1
    assert r["anchor_labels"][index] == 1 and r["anchor_matched_gt"][index] == 0
    assert (r["anchor_deltas"][index] == 0).all()
    # The sampled RoIs are in the image's pixels: inside it, and the foreground ones overlap their
    # ground truth by at least ROI_FG_IOU_THRESHOLD (far from it, were they in the network's pixels).
    rois = torch.from_numpy(r["rois"])
    assert rois.min() >= 0 and rois.max() <= 64
    foreground = r["roi_class_ids"] > 0
    assert foreground.any() and (r["roi_class_ids"][foreground] == 2).all()
    iou = torchvision.ops.box_iou(rois[foreground], torch.tensor([box], dtype=torch.float32))[:, 0]
    assert (iou >= model.config.ROI_FG_IOU_THRESHOLD).all()
    # The box deltas turn each foreground RoI into its ground truth (torchvision's decoder).
    coder = tv_utils.BoxCoder(model.config.BOX_CODER_WEIGHTS)
    decoded = coder.decode_single(torch.from_numpy(r["roi_deltas"][foreground]), rois[foreground])
    torch.testing.assert_close(decoded, torch.tensor([box], dtype=torch.float32).expand_as(decoded), atol=1e-3,
                               rtol=0)


def test_crowd_regions_give_crowd_anchors():
    torch.manual_seed(0)
    model = MaskRCNN(small_config()).eval()
    crowd = [60.0, 60, 120, 120]
    (r,) = model.training_targets([uint8_image(128, 128)], [numpy_target(128, 128, [(10, 10, 40, 40)], [1], [crowd])])
    check_contract(r, 1, 1)
    np.testing.assert_array_equal(r["crowd_boxes"], [crowd])
    # Anchors whose intersection with the crowd region covers more than 70% of their area.
    anchors = r["anchors"].astype(np.float64)
    width = (np.minimum(anchors[:, 2], crowd[2]) - np.maximum(anchors[:, 0], crowd[0])).clip(min=0)
    height = (np.minimum(anchors[:, 3], crowd[3]) - np.maximum(anchors[:, 1], crowd[1])).clip(min=0)
    area = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    inside = width * height / area > model.config.CROWD_IGNORE_THRESHOLD
    assert inside.any() and not inside.all()
    np.testing.assert_array_equal(r["anchor_labels"] == -2, inside)  # no positive is near the crowd region
    assert not r["anchor_sampled"][inside].any()
    assert (r["anchor_labels"] == -1).any()  # between the thresholds, around the object


def test_sample_counts_follow_the_batch_sizes_and_fractions():
    # RPN: 32 anchors, at most a quarter positive. Five 32 x 32 objects on P2 anchors have several positive
    # anchors each (the anchor itself, and those shifted by one stride: IoU 28 * 32 / (2 * 32^2 - 28 * 32)
    # = 0.78), so exactly 8 positives and 24 negatives. Heads: 16 RoIs, a quarter foreground: the five
    # ground-truth boxes alone are 5 candidates, so exactly 4. The second image has no object.
    torch.manual_seed(0)
    config = small_config(RPN_BATCH_SIZE_PER_IMAGE=32, RPN_POSITIVE_FRACTION=0.25, ROI_BATCH_SIZE_PER_IMAGE=16,
                          ROI_POSITIVE_FRACTION=0.25)
    model = MaskRCNN(config).eval()
    boxes = [(0, 0, 32, 32), (48, 0, 80, 32), (0, 48, 32, 80), (48, 48, 80, 80), (80, 80, 112, 112)]
    targets = [numpy_target(128, 128, boxes, [1, 2, 3, 1, 2]), numpy_target(128, 128, [], [])]
    with_objects, empty = model.training_targets([uint8_image(128, 128), uint8_image(128, 128, 1)], targets)
    check_contract(with_objects, 5, 0)
    check_contract(empty, 0, 0)
    for r, positives in ((with_objects, 8), (empty, 0)):
        sampled_labels = r["anchor_labels"][r["anchor_sampled"]]
        assert (sampled_labels == 1).sum() == positives and (sampled_labels == 0).sum() == 32 - positives
    assert with_objects["rois"].shape == (16, 4) and (with_objects["roi_class_ids"] > 0).sum() == 4
    assert with_objects["mask_targets"].shape == (4, 28, 28)
    assert empty["rois"].shape == (16, 4) and (empty["roi_class_ids"] == 0).all()
    assert empty["mask_targets"].shape == (0, 28, 28)
    assert (empty["anchor_labels"] == 0).all() and (empty["anchor_matched_gt"] == -1).all()


def test_mask_targets_of_ground_truth_rois_are_ones_inside():
    # Every foreground candidate is sampled (fraction 1), so the ground-truth boxes themselves are RoIs.
    torch.manual_seed(0)
    model = MaskRCNN(small_config(ROI_POSITIVE_FRACTION=1.0)).eval()
    boxes = [(10, 20, 60, 80), (70, 30, 120, 60)]
    (r,) = model.training_targets([uint8_image(128, 128)], [numpy_target(128, 128, boxes, [1, 3])])
    check_contract(r, 2, 0)
    foreground_rois = r["rois"][r["roi_class_ids"] > 0]
    for k, box in enumerate(boxes):
        (row,) = np.where((foreground_rois == np.array(box, np.float32)).all(axis=1))[0]
        assert r["roi_class_ids"][r["roi_class_ids"] > 0][row] == [1, 3][k]
        np.testing.assert_allclose(r["mask_targets"][row][1:-1, 1:-1], 1, atol=1e-6, rtol=0)


def test_training_targets_sample_as_training_does(monkeypatch):
    # With the same seed, training's forward samples the same anchors and RoIs (the small config has
    # GroupNorm only, so the features do not depend on the mode).
    torch.manual_seed(0)
    model = MaskRCNN(small_config()).train()
    image = uint8_image(120, 140)
    target = numpy_target(120, 140, [(10, 10, 60, 70), (70, 40, 130, 100)], [1, 2])
    seen = []

    def spy(labels, batch_size, fraction):
        sample = sample_balanced(labels, batch_size, fraction)
        seen.append((labels, sample))
        return sample

    monkeypatch.setattr(model_module, "sample_balanced", spy)
    torch.manual_seed(5)
    model([torch.from_numpy(image).permute(2, 0, 1).float() / 255],
          [{key: torch.as_tensor(value) for key, value in target.items()}])
    torch.manual_seed(5)
    (r,) = model.training_targets([image], [target])
    assert model.training  # the mode is restored
    assert len(seen) == 4  # training: RPN then heads; then the same for training_targets
    (rpn_labels, rpn_sample), (roi_labels, roi_sample) = seen[:2]
    np.testing.assert_array_equal(r["anchor_sampled"], (rpn_sample.positive | rpn_sample.negative).numpy())
    np.testing.assert_array_equal(r["roi_class_ids"], roi_labels[roi_sample.positive | roi_sample.negative].numpy())


def test_training_targets_reject_a_wrong_number_of_targets(small_model):
    with pytest.raises(ValueError, match="targets"):
        small_model.training_targets([uint8_image(64, 64)], [])


# ----------------------------------------------------------------------------------------------------
# POOL_INTERPOLATION: bilinear or bicubic pooling, per pooler


def test_pyramid_roi_align_bicubic_pools_each_box_on_its_level():
    # Oracle: roialign.roi_align (tested against a float64 grid_sample reference in test_roialign.py)
    # on the level FPN eq. 1 gives by hand: level = floor(4 + log2(sqrt(area) / 224)), clamped to 2..5.
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(2, 4, 256 // s, 192 // s, generator=g) for s in (4, 8, 16, 32)]
    boxes = [torch.tensor([[10.0, 12.0, 40.0, 30.0], [5.5, 7.25, 180.0, 250.0]]),
             torch.tensor([[60.0, 20.0, 150.0, 130.0], [100.3, 50.2, 112.9, 140.1]])]
    got = model_module.PyramidRoIAlign(7, Config(POOL_ALIGNED=True), "bicubic")(features, boxes, [(256, 192)] * 2)
    # Areas 540, 42,360, 9,900 and 1,133 px: sqrt 23.2, 205.8, 99.5, 33.7 -> levels 2, 3, 2, 2.
    for j, (image, box, level) in enumerate([(0, 0, 2), (0, 1, 3), (1, 0, 2), (1, 1, 2)]):
        expected = roialign.roi_align(features[level - 2][image:image + 1], [boxes[image][box:box + 1]], 7,
                                      2.0**-level, 2, True, "bicubic")
        torch.testing.assert_close(got[j:j + 1], expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("setting, box, mask", [("bilinear", 0, 0), ("bicubic", 1, 1), (("bilinear", "bicubic"), 0, 1),
                                                (("bicubic", "bilinear"), 1, 0)])
def test_pool_interpolation_picks_each_pooler(setting, box, mask):
    heads = MaskRCNN(small_config(POOL_INTERPOLATION=setting)).roi_heads
    assert (heads.box_roi_pool.interpolation, heads.mask_roi_pool.interpolation) == (box, mask)


@pytest.mark.parametrize("setting", ["nearest", ("bilinear",), ("bilinear", "cubic"), 2])
def test_bad_pool_interpolation_is_a_clear_error(setting):
    with pytest.raises(ValueError, match=r"^POOL_INTERPOLATION must be .*; got "):
        MaskRCNN(small_config(POOL_INTERPOLATION=setting))


def test_bicubic_pooling_trains():
    # Both poolers bicubic: finite losses and finite gradients everywhere.
    torch.manual_seed(0)
    model = MaskRCNN(small_config(POOL_INTERPOLATION="bicubic")).train()
    image = torch.rand(3, 120, 140)
    target = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([1]),
              "masks": torch.zeros(1, 120, 140, dtype=torch.uint8)}
    target["masks"][0, 10:70, 10:60] = 1
    losses = model([image], [target])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
