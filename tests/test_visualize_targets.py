"""Tests of visualize.py's training views, the anchor coverage report and model.anchors_for_input.

The views draw hand-made dicts that follow the contract of model.training_targets (positive, negative, ignored
and crowd anchors; foreground and background RoIs; 28 x 28 mask targets) on a noise image. As in
tests/test_visualize.py, each PNG has the size worked out from the inputs, and farther than an outline's width and
its antialiasing (MARGIN) from every box, label and title drawn -- placed from the inputs by
tests/helpers_visualize.py -- it is the enlarged image within 1/255; anchors that are not drawn leave their
outlines unchanged; drawn boxes change the pixels along them, in their colour (faint ones by at most their 35 %
of white). A mask target's crop is a slice of the image, by hand (a 28 px RoI is its 28 x 28 pixels, a 56 px
one every other pixel), with the mask blended by hand.

anchors_for_input: feature grids checked against the real backbone's feature shapes, anchors by hand (cell
centres, sizes). model.resized_size: the size model.preprocess gives the image. anchor_coverage: hand cases (a
box equal to an anchor has IoU 1 at that anchor's level; a 3 x 3 box inside a 16 px anchor has IoU 9 / 256; a
box in an image that training enlarges twice; a duplicated box gets no positive anchor, since the matcher gives
ties to the first box) and counts that add up. The integration test runs the real model.training_targets
(skipped until it exists).
"""

import json
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from helpers_model import rectangle_target, small_config, smooth_image
from helpers_visualize import (
    changed,
    enlarge,
    label_area,
    layout,
    near,
    outline_coverage,
    outline_points,
    panels,
    title_area,
)
from test_visualize import check_mask_panel, check_unchanged_outside, read_png

import model as model_module
import shapes
import visualize
from config import Config
from model import MaskRCNN

H, W = 96, 128
NAMES = ["__background__", "one", "two"]
GT_BOXES = np.array([[10, 30, 44, 70], [70, 34, 110, 74]], np.float32)
GT_CLASSES = np.array([1, 2])
CROWD = np.array([[86, 80, 124, 94]], np.float32)


def noise(height=H, width=W, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def rpn_dict():
    """Anchors of every kind, 4 px or more from the others' outlines (below the title, which covers the top 25
    rows): two positives of box 0 (one not sampled) and one of box 1, 6 px from their box; two sampled negatives,
    one negative not sampled, one ignored, one in the crowd region."""
    anchors = np.array([
        [16, 36, 38, 64],  # positive, box 0
        [2, 24, 48, 78],  # positive, box 0, not sampled
        [76, 40, 104, 68],  # positive, box 1
        [4, 84, 40, 95],  # negative, sampled
        [54, 28, 62, 90],  # negative, sampled
        [66, 80, 80, 92],  # negative, not sampled
        [80, 46, 100, 62],  # ignored
        [90, 84, 120, 91],  # in the crowd
    ], np.float32)
    return {
        "resize_scale": 1.0, "gt_boxes": GT_BOXES, "gt_class_ids": GT_CLASSES, "crowd_boxes": CROWD,
        "anchors": anchors, "anchor_levels": np.zeros(8, np.int64),
        "anchor_labels": np.array([1, 1, 1, 0, 0, 0, -1, -2], np.int8),
        "anchor_sampled": np.array([1, 0, 1, 1, 1, 0, 0, 0], bool),
        "anchor_matched_gt": np.array([0, 0, 1, -1, -1, -1, -1, -1], np.int64),
        "anchor_deltas": np.zeros((8, 4), np.float32),
    }


# The foreground RoIs: a 28 px square in box 0 (its crop is the image's pixels), a 56 px square over box 1 (every
# other pixel), and a 28 x 20 RoI of box 0; then two background RoIs.
ROIS = np.array([[12, 34, 40, 62], [62, 26, 118, 82], [10, 40, 38, 60], [2, 80, 20, 94], [48, 30, 58, 60]],
                np.float32)


def roi_dict(mask_size=28):
    rows, cols = np.mgrid[:mask_size, :mask_size]
    mask_targets = np.stack([np.clip((cols - 5) / 10, 0, 1), (rows > 12).astype(np.float32),
                             np.full((mask_size, mask_size), 0.25)]).astype(np.float32)
    return {
        **rpn_dict(), "rois": ROIS, "roi_class_ids": np.array([1, 2, 1, 0, 0]),
        "roi_matched_gt": np.array([0, 1, 0, -1, -1]), "roi_deltas": np.zeros((5, 4), np.float32),
        "mask_targets": mask_targets,
    }


def gt_masks():
    """Rectangles a little inside the ground-truth boxes (the first one cut by the first RoI)."""
    masks = np.zeros((2, H, W), bool)
    masks[0, 34:66, 14:40] = True
    masks[1, 40:70, 74:106] = True
    return masks


def pixels_of(picture, rgb, region, tolerance=2 / 255):
    return int(((np.abs(picture - np.asarray(rgb)[:3]).max(axis=2) < tolerance) & region).sum())


############################################################
#  RPN targets
############################################################


@pytest.mark.parametrize("scale", [1, 3])
def test_rpn_targets(tmp_path, scale):
    image, targets = noise(), rpn_dict()
    path = tmp_path / "rpn.png"
    visualize.display_rpn_targets(image, targets, scale=scale, save_path=str(path))
    picture = read_png(path)
    base = enlarge(image / 255.0, scale)
    assert picture.shape == base.shape == (H * scale, W * scale, 3)
    shape = picture.shape[:2]
    anchors = targets["anchors"]
    positives, negatives, undrawn = anchors[:3], anchors[3:5], anchors[5:]
    title = "RPN targets: 3 positive (dashed), 2 negative sampled (faint), 1 ignored, 1 in crowds"
    lines = {name: near(shape, outline_points(boxes, scale)) for name, boxes in
             (("gt", GT_BOXES), ("positive", positives), ("negative", negatives), ("crowd", CROWD))}
    allowed = title_area(shape, title) | lines["gt"] | lines["positive"] | lines["negative"] | lines["crowd"]
    check_unchanged_outside(picture, base, allowed)
    changes = changed(picture, base)
    assert changes[title_area(shape, title)].sum() > 50  # the title is there
    # The anchors that are not drawn: most of their outline is checked (unchanged) above.
    for anchor in undrawn:
        assert (~allowed[near(shape, outline_points([anchor], scale), 0.5)]).mean() > 0.5
    # Ground-truth boxes solid, their positives dashed, in the box's colour.
    for index, box in enumerate(GT_BOXES):
        assert outline_coverage(changes, box, scale) > 0.9
        mine = near(shape, outline_points([box], scale), 1.5)
        assert pixels_of(picture, visualize.color(index), mine) > 20 * scale
    for k, (anchor, owner) in enumerate(zip(positives, targets["anchor_matched_gt"][:3])):
        others = lines["gt"] | lines["negative"] | near(shape, outline_points(np.delete(positives, k, 0), scale))
        assert outline_coverage(changes, anchor, scale, skip=others) > 0.3
        assert pixels_of(picture, visualize.color(int(owner)), near(shape, outline_points([anchor], scale), 1.5)) > 0
    # Negatives faint: visible along them, and at most 35 % of the way to white.
    for anchor in negatives:
        assert outline_coverage(changes, anchor, scale, skip=lines["gt"] | lines["positive"]) > 0.5
    faint = lines["negative"] & ~(lines["gt"] | lines["positive"] | lines["crowd"] | title_area(shape, title))
    assert np.all(np.abs(picture - base)[faint] <= 0.35 * (1 - base[faint]) + 2 / 255)
    # The crowd region dotted.
    assert outline_coverage(changes, CROWD[0], scale, skip=lines["positive"]) > 0.2


def test_rpn_targets_with_nothing_to_draw(tmp_path):
    """No ground truth, no crowd, every anchor negative and none sampled: the image under the title."""
    image = noise()
    anchors = np.array([[10, 10, 40, 40], [50, 20, 70, 60]], np.float32)
    targets = {"gt_boxes": np.zeros((0, 4), np.float32), "crowd_boxes": np.zeros((0, 4), np.float32),
               "anchors": anchors, "anchor_labels": np.zeros(2, np.int8), "anchor_sampled": np.zeros(2, bool),
               "anchor_matched_gt": np.full(2, -1)}
    for name, drawn in (("none sampled", targets), ("no anchors", {**targets, **{
            "anchors": np.zeros((0, 4), np.float32), "anchor_labels": np.zeros(0, np.int8),
            "anchor_sampled": np.zeros(0, bool), "anchor_matched_gt": np.zeros(0, np.int64)}})):
        path = tmp_path / f"{name}.png"
        visualize.display_rpn_targets(image, drawn, scale=2, save_path=str(path))
        picture, base = read_png(path), enlarge(image / 255.0, 2)
        title = "RPN targets: 0 positive (dashed), 0 negative sampled (faint), 0 ignored, 0 in crowds"
        check_unchanged_outside(picture, base, title_area(picture.shape[:2], title))


############################################################
#  Sampled RoIs
############################################################


@pytest.mark.parametrize("scale", [1, 2])
def test_sampled_rois(tmp_path, scale):
    image, targets = noise(seed=1), roi_dict()
    path = tmp_path / "rois.png"
    visualize.display_sampled_rois(image, targets, NAMES, scale=scale, save_path=str(path))
    picture = read_png(path)
    base = enlarge(image / 255.0, scale)
    assert picture.shape == base.shape
    shape = picture.shape[:2]
    foreground, background = ROIS[:3], ROIS[3:]
    title = "sampled RoIs: 3 foreground (by class), 2 background (faint)"
    labels = np.zeros(shape, bool)
    for box, class_id in zip(GT_BOXES, GT_CLASSES):  # both boxes have foreground RoIs
        labels |= label_area(shape, box, NAMES[class_id], 9, scale)
    fg_lines = near(shape, outline_points(foreground, scale))
    bg_lines = near(shape, outline_points(background, scale))
    check_unchanged_outside(picture, base, title_area(shape, title) | labels | fg_lines | bg_lines)
    changes = changed(picture, base)
    for box, class_id in zip(foreground, targets["roi_class_ids"]):
        assert outline_coverage(changes, box, scale, skip=labels) > 0.9
        assert pixels_of(picture, visualize.color(int(class_id)), near(shape, outline_points([box], scale), 1.0)) > 0
    for box in background:
        assert outline_coverage(changes, box, scale, skip=fg_lines) > 0.5
    faint = bg_lines & ~fg_lines & ~labels
    assert np.all(np.abs(picture - base)[faint] <= 0.35 * (1 - base[faint]) + 2 / 255)
    for box, class_id in zip(GT_BOXES, GT_CLASSES):  # the labels, on 80 % of the class colour
        area = label_area(shape, box, NAMES[class_id], 9, scale)
        expected = 0.2 * base + 0.8 * np.array(visualize.color(int(class_id)))
        assert (changed(picture, expected, 3 / 255) == 0)[area].sum() > 20


def test_sampled_rois_without_rois(tmp_path):
    image = noise(seed=1)
    targets = {**roi_dict(), "rois": np.zeros((0, 4), np.float32), "roi_class_ids": np.zeros(0, np.int64),
               "roi_matched_gt": np.zeros(0, np.int64), "mask_targets": np.zeros((0, 28, 28), np.float32)}
    path = tmp_path / "rois.png"
    visualize.display_sampled_rois(image, targets, NAMES, scale=2, save_path=str(path))
    picture, base = read_png(path), enlarge(image / 255.0, 2)
    title = "sampled RoIs: 0 foreground (by class), 0 background (faint)"
    check_unchanged_outside(picture, base, title_area(picture.shape[:2], title))
    # And the mask targets of no foreground: one black panel with its title.
    visualize.display_mask_targets(image, targets, NAMES, gt_masks(), scale=2, save_path=str(path))
    picture = read_png(path)
    assert picture.shape == (56, 56, 3)
    strip = title_area((56, 56), "no foreground RoIs", 8)
    check_unchanged_outside(picture, np.zeros((56, 56, 3)), strip)
    assert changed(picture, np.zeros((56, 56, 3)))[strip].sum() > 50


############################################################
#  Mask targets
############################################################


def expected_crops(image, masks):
    """The crops of the three foreground RoIs by hand: ROIS[0] is 28 x 28 pixels, ROIS[1] 56 x 56 (the bins'
    centres fall on every other pixel, the second of each pair), ROIS[2] 28 x 20 (rows: bin i's centre is at
    40 + (i + 0.5) * 20 / 28)."""
    rows2 = 40 + np.floor((np.arange(28) + 0.5) * 20 / 28).astype(int)
    cuts = [(slice(34, 62), slice(12, 40)), (slice(27, 82, 2), slice(63, 118, 2)), (rows2, slice(10, 38))]
    crops = []
    for (rows, cols), owner, class_id in zip(cuts, (0, 1, 0), (1, 2, 1)):
        crop = image[rows][:, cols] / 255.0
        inside = masks[owner][rows][:, cols]
        crop[inside] = 0.5 * crop[inside] + 0.5 * np.array(visualize.color(class_id))
        crops.append(crop)
    return crops


@pytest.mark.parametrize("columns, scale", [(2, 4), (4, 3)])
def test_mask_targets(tmp_path, columns, scale):
    image, targets, masks = noise(seed=2), roi_dict(), gt_masks()
    path = tmp_path / "masks.png"
    visualize.display_mask_targets(image, targets, NAMES, masks, columns=columns, scale=scale, save_path=str(path))
    side = 28 * scale
    pieces = panels(read_png(path), [(side, side)] * 6, 2 * columns)
    crops = expected_crops(image, masks)
    assert masks[0, 34:62, 12:40].any() and not masks[0, 34:62, 12:40].all()  # blended and plain pixels checked
    for k, (crop, class_id, target) in enumerate(zip(crops, (1, 2, 1), targets["mask_targets"])):
        crop_panel, target_panel = pieces[2 * k], pieces[2 * k + 1]
        title = NAMES[class_id]
        check_unchanged_outside(crop_panel, enlarge(crop, scale), title_area((side, side), title, 8), least=0.8)
        check_mask_panel(target_panel, target, "", scale, 0.5, least=0.5)


def test_mask_targets_without_masks_and_of_another_size(tmp_path):
    """Without the ground-truth masks the crop is the image alone; 14 x 14 targets give 14 x 14 crops."""
    image = noise(seed=3)
    targets = roi_dict(14)
    path = tmp_path / "masks.png"
    visualize.display_mask_targets(image, targets, NAMES, scale=4, save_path=str(path))
    pieces = panels(read_png(path), [(56, 56)] * 6, 8)
    crop = image[35:62:2, 13:40:2] / 255.0  # ROIS[0], 28 px in 14 bins: the second pixel of each pair
    check_unchanged_outside(pieces[0], enlarge(crop, 4), title_area((56, 56), "one", 8), least=0.6)
    check_mask_panel(pieces[1], targets["mask_targets"][0], "", 4, 0.5, least=0.5)


@pytest.mark.parametrize("view", ["rpn", "rois", "masks"])
def test_figure_without_save_path(view, tmp_path):
    """Without save_path a pyplot figure of the picture's size, that draws what the PNG holds."""
    image, targets = noise(), roi_dict()
    draw = {"rpn": lambda p: visualize.display_rpn_targets(image, targets, scale=2, save_path=p),
            "rois": lambda p: visualize.display_sampled_rois(image, targets, NAMES, save_path=p),
            "masks": lambda p: visualize.display_mask_targets(image, targets, NAMES, gt_masks(), scale=2,
                                                              save_path=p)}[view]
    path = tmp_path / "view.png"
    draw(str(path))
    picture = read_png(path)
    figure = draw(None)
    try:
        assert figure.number in plt.get_fignums()
        np.testing.assert_allclose(figure.get_size_inches() * figure.dpi, picture.shape[1::-1], atol=1e-6)
        figure.canvas.draw()
        np.testing.assert_allclose(np.asarray(figure.canvas.buffer_rgba())[..., :3] / 255.0, picture, atol=1 / 255)
    finally:
        plt.close(figure)


def without(key):
    targets = roi_dict()
    del targets[key]
    return targets


# Each bad argument: a call of (image, save_path), and what the message names.
BAD_INPUTS = {
    "no anchor_labels": (lambda im, p: visualize.display_rpn_targets(im, without("anchor_labels"), save_path=p),
                         "targets has no anchor_labels"),
    "anchor_sampled length": (lambda im, p: visualize.display_rpn_targets(
        im, {**rpn_dict(), "anchor_sampled": np.zeros(7, bool)}, save_path=p),
        r"targets\['anchor_sampled'\] must be \[8\] \(one per targets\['anchors'\]\); got shape \(7,\)"),
    "anchors not [A, 4]": (lambda im, p: visualize.display_rpn_targets(
        im, {**rpn_dict(), "anchors": np.zeros((8, 5))}, save_path=p), r"targets\['anchors'\] must be \[N, 4\]"),
    "positive without a box": (lambda im, p: visualize.display_rpn_targets(
        im, {**rpn_dict(), "anchor_matched_gt": np.array([0, 0, 2, -1, -1, -1, -1, -1])}, save_path=p),
        r"targets\['anchor_matched_gt'\] must index targets\['gt_boxes'\] \(2 boxes\).*got \[0, 2\]"),
    "crowd_boxes not [C, 4]": (lambda im, p: visualize.display_rpn_targets(
        im, {**rpn_dict(), "crowd_boxes": np.zeros((1, 3))}, save_path=p), r"targets\['crowd_boxes'\] must be"),
    "no rois": (lambda im, p: visualize.display_sampled_rois(im, without("rois"), NAMES, save_path=p),
                "targets has no rois"),
    "roi_class_ids length": (lambda im, p: visualize.display_sampled_rois(
        im, {**roi_dict(), "roi_class_ids": np.array([1, 2])}, NAMES, save_path=p),
        r"targets\['roi_class_ids'\] must be \[5\]"),
    "gt_class_ids length": (lambda im, p: visualize.display_sampled_rois(
        im, {**roi_dict(), "gt_class_ids": np.array([1])}, NAMES, save_path=p),
        r"targets\['gt_class_ids'\] must be \[2\] \(one per targets\['gt_boxes'\]\)"),
    "foreground without a box": (lambda im, p: visualize.display_sampled_rois(
        im, {**roi_dict(), "roi_matched_gt": np.array([0, -1, 0, -1, -1])}, NAMES, save_path=p),
        r"targets\['roi_matched_gt'\] must index"),
    "no mask_targets": (lambda im, p: visualize.display_mask_targets(im, without("mask_targets"), NAMES, save_path=p),
                        "targets has no mask_targets"),
    "mask_targets count": (lambda im, p: visualize.display_mask_targets(
        im, {**roi_dict(), "mask_targets": np.zeros((2, 28, 28))}, NAMES, save_path=p),
        r"targets\['mask_targets'\] must be \[F, M, M\] with F = 3 foreground rois; got shape \(2, 28, 28\)"),
    "mask_targets not square": (lambda im, p: visualize.display_mask_targets(
        im, {**roi_dict(), "mask_targets": np.zeros((3, 28, 14))}, NAMES, save_path=p),
        r"targets\['mask_targets'\] must be \[F, M, M\]"),
    "masks of another image": (lambda im, p: visualize.display_mask_targets(
        im, roi_dict(), NAMES, np.zeros((2, H, W + 1), bool), save_path=p),
        rf"masks must be \[2, {H}, {W}\].*got shape \(2, {H}, {W + 1}\)"),
    "masks count": (lambda im, p: visualize.display_mask_targets(im, roi_dict(), NAMES, gt_masks()[:1], save_path=p),
                    r"masks must be \[2, "),
    "columns": (lambda im, p: visualize.display_mask_targets(im, roi_dict(), NAMES, columns=0, save_path=p),
                "columns must be a whole number >= 1; got 0"),
    "image": (lambda im, p: visualize.display_rpn_targets(im[..., 0], rpn_dict(), save_path=p), "HxWx3"),
}
for _name, _call in {
    "rpn": lambda im, p, s: visualize.display_rpn_targets(im, rpn_dict(), scale=s, save_path=p),
    "rois": lambda im, p, s: visualize.display_sampled_rois(im, roi_dict(), NAMES, scale=s, save_path=p),
    "masks": lambda im, p, s: visualize.display_mask_targets(im, roi_dict(), NAMES, scale=s, save_path=p),
}.items():
    BAD_INPUTS[f"{_name} at scale 0"] = (lambda im, p, call=_call: call(im, p, 0), "scale must be a whole number")


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(case, tmp_path):
    call, message = BAD_INPUTS[case]
    path = tmp_path / "x.png"
    with pytest.raises(ValueError, match=message):
        call(noise(), str(path))
    assert not path.exists()


############################################################
#  Anchors of a network input, anchor coverage
############################################################


@pytest.mark.parametrize("height, width, divisor", [(64, 96, 32), (37, 53, 1), (50, 71, 8), (128, 128, 32)])
def test_anchors_for_input_match_the_backbone(height, width, divisor):
    """The grids are the real backbone's feature shapes on the padded input; the anchors are generate_anchors'
    for those features (centres every stride, the config's sizes)."""
    config = small_config(IMAGE_SIZE_DIVISOR=divisor)
    torch.manual_seed(0)
    backbone = model_module.Backbone(config).eval()
    padded = (math.ceil(height / divisor) * divisor, math.ceil(width / divisor) * divisor)
    with torch.no_grad():
        features = backbone(torch.zeros(1, 3, *padded))
    anchors, levels = model_module.anchors_for_input(height, width, config)
    ratios = len(config.ANCHOR_RATIOS)
    counts = [f.shape[-2] * f.shape[-1] * ratios for f in features]
    assert anchors.shape == (sum(counts), 4) and levels.dtype == torch.int64
    assert torch.equal(levels, torch.cat([torch.full((c,), k) for k, c in enumerate(counts)]))
    torch.testing.assert_close(anchors, model_module.generate_anchors(features, padded, config), rtol=0, atol=0)
    for level, feature in enumerate(features):
        mine = anchors[levels == level]
        grid_h, grid_w = feature.shape[-2:]
        stride_h, stride_w = padded[0] // grid_h, padded[1] // grid_w
        centres = (mine[:, :2] + mine[:, 2:]) / 2  # cell (y, x), anchor
        xs = torch.arange(grid_w, dtype=torch.float32) * stride_w
        ys = torch.arange(grid_h, dtype=torch.float32) * stride_h
        expected = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1).reshape(-1, 1, 2)
        torch.testing.assert_close(centres.reshape(-1, ratios, 2), expected.expand(-1, ratios, -1))
        square = mine[config.ANCHOR_RATIOS.index(1.0) :: ratios]  # ratio 1: size x size
        assert torch.all(square[:, 2] - square[:, 0] == config.ANCHOR_SIZES[level])


def test_anchors_for_input_by_hand():
    """A 64 x 64 input, sizes 32-512: P2 is a 16 x 16 grid at stride 4; its first anchors are centred on (0, 0)."""
    config = Config(IMAGE_SIZE_DIVISOR=32)
    anchors, levels = model_module.anchors_for_input(64, 64, config)
    assert [int((levels == k).sum()) for k in range(5)] == [16 * 16 * 3, 8 * 8 * 3, 4 * 4 * 3, 2 * 2 * 3, 1 * 3]
    # Ratio 1 (the second): [-16, -16, 16, 16]; the next cell is 4 px to the right.
    assert anchors[1].tolist() == [-16, -16, 16, 16] and anchors[4].tolist() == [-12, -16, 20, 16]
    assert anchors[levels == 4][1].tolist() == [-256, -256, 256, 256]


@pytest.mark.parametrize("height, width, min_size, max_size", [(480, 640, 800, 1333), (333, 500, 800, 1333),
                                                               (37, 91, 64, 100), (128, 128, 128, 128),
                                                               (1, 1000, 800, 1333)])
def test_resized_size_is_what_preprocess_makes(height, width, min_size, max_size):
    # The coverage report sizes each image with model.resized_size, without running preprocess.
    config = Config(IMAGE_MAX_DIM=max_size)
    batch, _ = model_module.preprocess([torch.zeros(3, height, width)], config, min_size=min_size)
    assert model_module.resized_size(height, width, min_size, max_size) == batch.image_sizes[0]


def coverage_config(**overrides):
    """Anchors 16-256 px; images resized to 128 px (64 px images enlarged twice)."""
    settings = dict(ANCHOR_SIZES=(16, 32, 64, 128, 256), IMAGE_MIN_DIM_TRAIN=(128,), IMAGE_MAX_DIM=128,
                    IMAGE_SIZE_DIVISOR=32, RPN_FG_IOU_THRESHOLD=0.7, RPN_BG_IOU_THRESHOLD=0.3)
    settings.update(overrides)
    return Config(**settings)


# A 128 x 128 image (kept as it is). Anchors centre on multiples of the stride (4 on P2, 8 on P3, ...).
EXACT = [8, 8, 40, 40]  # the P3 anchor of size 32, ratio 1, centred on (24, 24)
TINY = [100, 20, 103, 23]  # 3 x 3 inside P2 anchors of 16 x 16 (IoU 9 / 256); no anchor is smaller
TALL = [41, 35, 87, 125]  # the P4 anchor of size 64, ratio 2 (23 and 45 half-sides, rounded), centred on (64, 80)
LARGE = [0, 0, 128, 128]  # the P5 anchor of size 128, ratio 1, centred on (64, 64)


def test_anchor_coverage_by_hand():
    """The four boxes above, then a 64 x 64 image (enlarged twice) where [4, 4, 20, 20] becomes EXACT, twice: the
    copy gets no positive anchor. Each box keeps its own anchors: the others overlap them less."""
    boxes1 = np.array([EXACT, TINY, TALL, LARGE], np.float32)
    boxes2 = np.array([[4, 4, 20, 20], [4, 4, 20, 20]], np.float32)
    report = visualize.anchor_coverage([(1, 128, 128, boxes1), (2, 64, 64, boxes2), (3, 128, 96, np.zeros((0, 4)))],
                                       coverage_config())
    entries = report["boxes"]
    assert [(e["image_id"], e["box"]) for e in entries] == [(1, b) for b in boxes1.tolist()] + [(2, [4, 4, 20, 20])] * 2
    got = [(e["best_iou"], e["level"], e["size"], e["area"], e["low_quality"], e["positives"] > 0) for e in entries]
    assert got == [
        (1.0, 1, "medium", 32 * 32, False, True),  # COCO's ranges: small is below 32^2
        (pytest.approx(9 / 256), 0, "small", 9, True, True),  # the low-quality rule gives it its best anchors
        (1.0, 2, "medium", 46 * 90, False, True),
        (1.0, 3, "large", 128 * 128, False, True),
        (1.0, 1, "small", 16 * 16, False, True),  # areas in the original image
        (1.0, 1, "small", 16 * 16, False, False),  # the matcher gives tied anchors to the first box
    ]
    assert entries[0]["min_size"] == 128
    mean = (5 + 9 / 256) / 6
    groups = report["groups"]
    assert groups["all"] == {"count": 6, "mean_best_iou": pytest.approx(mean), "median_best_iou": 1.0,
                             "low_quality": 1, "no_positive": 1}
    assert [groups[name]["count"] for name in ("small", "medium", "large")] == [3, 2, 1]
    assert [groups[f"P{k}"]["count"] for k in range(2, 7)] == [1, 3, 1, 1, 0]
    assert groups["P6"]["mean_best_iou"] is None and groups["P2"]["low_quality"] == 1
    assert groups["small"]["no_positive"] == 1 and groups["small"]["mean_best_iou"] == pytest.approx((2 + 9 / 256) / 3)
    json.dumps(report)  # JSON-ready


def test_anchor_coverage_counts_each_training_size():
    """With two training sizes each box is matched twice: at 32 px the 32 x 32 image is as given, where
    [4, 4, 20, 20] is the P2 anchor of size 16 centred on (12, 12); at 64 px it is the P3 anchor above."""
    report = visualize.anchor_coverage([(7, 32, 32, np.array([[4, 4, 20, 20]]))],
                                       coverage_config(IMAGE_MIN_DIM_TRAIN=(32, 64)))  # IMAGE_MAX_DIM 128
    assert [(e["min_size"], e["best_iou"], e["level"]) for e in report["boxes"]] == [(32, 1.0, 0), (64, 1.0, 1)]
    assert report["groups"]["all"]["count"] == 2 and report["settings"]["IMAGE_MIN_DIM_TRAIN"] == [32, 64]


def test_anchor_coverage_of_nothing(tmp_path):
    report = visualize.anchor_coverage([], coverage_config())
    assert report["boxes"] == [] and report["groups"]["all"]["count"] == 0
    assert "all" in visualize.coverage_table(report)
    path = tmp_path / "coverage.png"
    visualize.plot_anchor_coverage(report, save_path=str(path))
    assert read_png(path).shape == (400, 800, 3)


def test_coverage_histogram(tmp_path):
    """Bars of the report's boxes: as many as there are boxes in all, the IoU-1 boxes in the last bin."""
    report = visualize.anchor_coverage([(1, 128, 128, np.array([EXACT, TINY, TALL], np.float32))], coverage_config())
    path = tmp_path / "coverage.png"
    figure = visualize.plot_anchor_coverage(report, save_path=str(path), width=640, height=320)
    assert read_png(path).shape == (320, 640, 3)
    bars = [patch for patch in figure.axes[0].patches if patch.get_height() > 0]
    assert sum(bar.get_height() for bar in bars) == 3
    assert sum(bar.get_height() for bar in bars if bar.get_x() == pytest.approx(0.95)) == 2


def test_inspect_data_command(tmp_path, capsys):
    root = tmp_path / "shapes"
    shapes.generate(root, train=3, val=1, size=64, seed=0)
    out = tmp_path / "coverage"
    visualize.main(["--inspect-data", "--config", "shapes", "--data", str(root), "--out", str(out), "--set",
                    "IMAGE_MIN_DIM_TRAIN=(64,96)"])
    annotations = json.loads((root / "annotations" / "instances_train.json").read_text())
    objects = [a for a in annotations["annotations"] if not a.get("iscrowd", 0)]
    report = json.loads((out / "anchor_coverage.json").read_text())
    assert len(report["boxes"]) == 2 * len(objects) > 0 and report["groups"]["all"]["count"] == 2 * len(objects)
    assert {e["min_size"] for e in report["boxes"]} == {64, 96}
    assert read_png(out / "anchor_coverage.png").shape == (400, 800, 3)
    printed = capsys.readouterr().out
    for group in ("all", "small", "medium", "large", "P2", "P6"):
        assert f"\n{group} " in "\n" + printed


############################################################
#  The real model.training_targets (after the model branch is merged)
############################################################


@pytest.mark.skipif(not hasattr(MaskRCNN, "training_targets"), reason="model.training_targets is not merged yet")
def test_views_of_real_training_targets(tmp_path):
    """A tiny random model's targets for a 96 x 128 image with two rectangles: the three views at their sizes."""
    torch.manual_seed(0)
    net = MaskRCNN(small_config()).eval()
    image = (smooth_image(96, 128, seed=7) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    target = rectangle_target(96, 128, [(10, 20, 50, 60), (70, 35, 120, 90)], [1, 3])
    names = net.config.CLASS_NAMES
    paths = visualize.training_views(net, image, target, str(tmp_path), "val", scale=2)
    assert paths == {view: str(tmp_path / f"val_{view}.png") for view in ("rpn_targets", "sampled_rois",
                                                                           "mask_targets")}
    assert read_png(paths["rpn_targets"]).shape == read_png(paths["sampled_rois"]).shape == (192, 256, 3)
    torch.manual_seed(1)
    (targets,) = net.training_targets([image], [target])
    foreground = int((targets["roi_class_ids"] > 0).sum())
    assert foreground == targets["mask_targets"].shape[0] > 0 and (targets["anchor_labels"] == 1).any()
    path = tmp_path / "masks.png"
    visualize.display_mask_targets(image, targets, names, target["masks"], save_path=str(path))
    side = 4 * targets["mask_targets"].shape[1]
    assert read_png(path).shape == (*layout([(side, side)] * (2 * foreground), 8)[1], 3)
    path = tmp_path / "rpn.png"
    visualize.display_rpn_targets(image, targets, save_path=str(path))
    picture, base = read_png(path), image / 255.0
    positives = targets["anchors"][targets["anchor_labels"] == 1]
    changes = changed(picture, base)
    for box in targets["gt_boxes"]:
        assert outline_coverage(changes, box, 1) > 0.9
    assert len(positives) > 0
