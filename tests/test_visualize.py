"""Tests of visualize.py.

A hand-made scene: pictures of the image's own size, masks blended with their class colour (by hand:
(1 - alpha) * pixel + alpha * colour), untouched pixels away from every instance and label, argument checks.

Real model outputs: a small random Mask R-CNN that makes detections (and a copy of it that makes none) runs
on a 96 x 128 image, and every drawing function writes a PNG of what it returns, read back with matplotlib.
Each PNG has the size worked out from the inputs (`scale` times the image, panels laid out GAP pixels apart,
anchor panels as far as the centre cell's anchors reach), and is compared pixel by pixel with the enlarged
image: farther than an outline's width and its antialiasing (MARGIN) from every box, mask outline, dot, label
and title -- all placed from the inputs by tests/helpers_visualize.py -- it is the image within 1/255; inside
a mask it is half the image and half the class colour; along every box drawn the pixels change. With nothing
to draw a picture is the image outside its title. The 28 x 28 mask views are viridis colours of the
probabilities, cut only by the threshold's contour; the training curves come from a hand-written log.jsonl.
"""

import colorsys
import itertools
import json
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from helpers_model import make_detecting, rectangle_target, small_config, smooth_image
from helpers_visualize import (
    GAP,
    MARGIN,
    changed,
    dilate,
    distance_to,
    enlarge,
    label_area,
    layout,
    near,
    near_mask_outline,
    outline_coverage,
    outline_points,
    panels,
    rectangle,
    seen_near,
    segment,
    title_area,
)
from PIL import Image

import shapes
import visualize
from config import ShapesConfig
from model import MaskRCNN

H, W = 64, 96
NAMES = ["__background__", "one", "two"]


def scene():
    """A noise image with two rectangular instances near the bottom: A (class 2) on the right, inside a
    larger box, and B (class 1) on the left. Their labels are drawn above their boxes, in rows 18 to 43
    (B's label reaches into the top rows of A's mask)."""
    image = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    masks = np.zeros((2, H, W), bool)
    masks[0, 40:58, 60:80] = True
    masks[1, 44:60, 8:28] = True
    boxes = np.array([[56, 36, 84, 62], [8, 44, 28, 60]], np.float32)
    return image, boxes, masks, np.array([2, 1]), np.array([0.9, 0.75])


# Far (> 3 px) from every mask, box and label.
FAR = [(slice(0, 16), slice(0, W)), (slice(48, H), slice(32, 52))]
# Inside each mask, 3 px from its outline.
INSIDE = [(slice(45, 55), slice(63, 77)), (slice(47, 57), slice(11, 25))]


def read_png(path):
    picture = plt.imread(path)
    assert picture.dtype == np.float32  # PNG read as floats in [0, 1]
    return picture[..., :3]


def test_saved_picture(tmp_path):
    image, boxes, masks, class_ids, scores = scene()
    path = tmp_path / "pictures" / "a.png"  # the folder is created
    visualize.display_instances(image, boxes, masks, class_ids, NAMES, scores, save_path=str(path))
    picture = read_png(path)
    assert picture.shape == (H, W, 3)
    with Image.open(path) as png:
        assert png.size == (W, H)
    original = image / 255.0
    for rows, cols in FAR:
        np.testing.assert_allclose(picture[rows, cols], original[rows, cols], atol=1 / 255)
    # Inside a mask: half the pixel, half its class's colour (alpha 0.5).
    for (rows, cols), class_id in zip(INSIDE, class_ids):
        expected = 0.5 * original[rows, cols] + 0.5 * np.array(visualize.color(int(class_id)))
        np.testing.assert_allclose(picture[rows, cols], expected, atol=1.5 / 255)
        assert np.abs(picture[rows, cols] - original[rows, cols]).max() > 20 / 255
    # Outlines, boxes and labels change pixels outside the masks too.
    changed = np.abs(picture - original).max(axis=2) > 10 / 255
    assert changed[~masks.any(0)].sum() > 100


@pytest.mark.parametrize("height, width", [(29, 57), (40, 33)])
def test_picture_has_the_image_size(tmp_path, height, width):
    image = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((1, height, width), bool)
    mask[0, 10:20, 5:15] = True
    path = tmp_path / "b.png"
    visualize.display_instances(image, [[5, 10, 15, 20]], mask, [1], NAMES, save_path=str(path))
    assert read_png(path).shape == (height, width, 3)


def test_no_instances_leaves_the_image_unchanged(tmp_path):
    image = scene()[0]
    path = tmp_path / "empty.png"
    visualize.display_instances(image, np.zeros((0, 4)), np.zeros((0, H, W), bool), np.zeros(0, np.int64), NAMES,
                                np.zeros(0), save_path=str(path))
    np.testing.assert_allclose(read_png(path), image / 255.0, atol=1 / 255)
    path = tmp_path / "none.png"
    visualize.display_instances(image, None, None, None, NAMES, save_path=str(path))
    np.testing.assert_allclose(read_png(path), image / 255.0, atol=1 / 255)


def test_render_instances_is_the_saved_picture(tmp_path):
    image, boxes, masks, class_ids, scores = scene()
    rendered = visualize.render_instances(image, boxes, masks, class_ids, NAMES, scores)
    assert rendered.shape == (H, W, 3) and rendered.dtype == np.uint8
    path = tmp_path / "c.png"
    visualize.display_instances(image, boxes, masks, class_ids, NAMES, scores, save_path=str(path))
    np.testing.assert_allclose(rendered / 255.0, read_png(path), atol=1 / 255)
    for rows, cols in FAR:
        np.testing.assert_array_equal(rendered[rows, cols], image[rows, cols])
    empty = visualize.render_instances(image, np.zeros((0, 4)), None, [], NAMES)
    np.testing.assert_array_equal(empty, image)


def test_options_change_colours_and_masks():
    image, boxes, masks, class_ids, scores = scene()
    original = image / 255.0
    # One colour per instance (by index), and another alpha.
    rendered = visualize.render_instances(image, boxes, masks, class_ids, NAMES, scores, color_by="instance",
                                          alpha=0.25) / 255.0
    for index, (rows, cols) in enumerate(INSIDE):
        expected = 0.75 * original[rows, cols] + 0.25 * np.array(visualize.color(index))
        np.testing.assert_allclose(rendered[rows, cols], expected, atol=1.5 / 255)
    # No masks drawn: the inside of a mask is the image.
    rendered = visualize.render_instances(image, boxes, masks, class_ids, NAMES, scores, show_masks=False)
    for rows, cols in INSIDE:
        np.testing.assert_array_equal(rendered[rows, cols], image[rows, cols])


@pytest.mark.parametrize("boxes, masks, class_ids, scores", [
    (np.zeros((2, 4)), np.zeros((2, H, W), bool), [1], None),  # class_ids
    (np.zeros((2, 4)), np.zeros((1, H, W), bool), [1, 2], None),  # masks
    (np.zeros((1, 4)), np.zeros((1, H, W), bool), [1], [0.5, 0.6]),  # scores
    (np.zeros((0, 4)), None, [1], None),
])
def test_mismatched_lengths(boxes, masks, class_ids, scores, tmp_path):
    image = scene()[0]
    with pytest.raises(ValueError):
        visualize.display_instances(image, boxes, masks, class_ids, NAMES, scores, save_path=str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_image_must_be_rgb_uint8():
    with pytest.raises(ValueError, match="uint8"):
        visualize.render_instances(np.zeros((H, W, 3), np.float32), None, None, None, NAMES)
    with pytest.raises(ValueError, match="HxWx3"):
        visualize.render_instances(np.zeros((H, W), np.uint8), None, None, None, NAMES)


def test_colors():
    assert visualize.color(3) == visualize.color(3)
    colours = [visualize.color(i) for i in range(1, 91)]  # COCO's category ids
    for rgb in colours:
        assert len(rgb) == 3 and all(0.0 <= c <= 1.0 for c in rgb)
        _, saturation, value = colorsys.rgb_to_hsv(*rgb)
        assert saturation > 0.5 and value > 0.9  # saturated, bright
    for a, b in itertools.combinations(colours[:10], 2):
        assert max(abs(x - y) for x, y in zip(a, b)) > 0.1
    assert len(set(colours)) == len(colours)


############################################################
#  Real model outputs
############################################################

PH, PW = 96, 128  # the photo's size
TOP = 3  # detections drawn where every pixel is checked (a hundred would cover the image)


@pytest.fixture(scope="module")
def detector():
    """A small random model that makes detections (a hundred on the photo)."""
    torch.manual_seed(0)
    return make_detecting(MaskRCNN(small_config()), cls_factor=5.0, rpn_factor=30.0).eval()


@pytest.fixture(scope="module")
def silent(detector):
    """The same model with DETECTION_MIN_CONFIDENCE = 1: no detection passes."""
    model = MaskRCNN(small_config(DETECTION_MIN_CONFIDENCE=1.0))
    model.load_state_dict(detector.state_dict())
    return model.eval()


@pytest.fixture(scope="module")
def photo():
    return (smooth_image(PH, PW, seed=7) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def result(detector, photo):
    (out,) = detector.detect([photo], return_intermediates=True)
    assert out["boxes"].shape[0] > 10 and len(set(out["scores"][:TOP].tolist())) == TOP
    return out


@pytest.fixture(scope="module")
def empty(silent, photo):
    (out,) = silent.detect([photo], return_intermediates=True)
    assert out["boxes"].shape == (0, 4) and out["intermediates"]["mask_probs"].shape == (0, 28, 28)
    return out


@pytest.fixture(scope="module")
def names(detector):
    return detector.config.CLASS_NAMES


def ground_truth():
    """A target as CocoDataset gives it (torch tensors, "labels"): two rectangles."""
    return rectangle_target(PH, PW, [(10, 20, 50, 60), (70, 35, 120, 90)], [1, 3])


def label(names, class_id, score=None):
    return names[class_id] if score is None else f"{names[class_id]} {score:.2f}"


def best(result, count=TOP):
    """The first `count` detections (the best: detect sorts them by score) and their stage outputs."""
    stages = result["intermediates"]
    return {"boxes": result["boxes"][:count], "masks": result["masks"][:count],
            "class_ids": result["class_ids"][:count], "scores": result["scores"][:count],
            "detection_proposals": stages["detection_proposals"][:count], "mask_probs": stages["mask_probs"][:count]}


def check_unchanged_outside(picture, expected, allowed, least=0.2):
    """Outside `allowed` the picture is `expected` within 1/255, and enough is outside for that to matter."""
    assert (~allowed).mean() >= least, "the test checks too few pixels"
    np.testing.assert_allclose(picture[~allowed], expected[~allowed], atol=1 / 255)


def check_instances(picture, image, boxes, masks, class_ids, scores, names, scale, title=None, least_inside=100):
    """A display_instances picture: the enlarged image except near boxes, labels, masks and the title; inside a
    mask (of one instance, away from every outline and label: at least `least_inside` pixels) half the pixel and
    half its class's colour; and every box's dashed outline visible along at least half its length (where it is
    clear of the masks and labels)."""
    base = enlarge(image / 255.0, scale)
    assert picture.shape == base.shape
    shape = picture.shape[:2]
    lines = near(shape, outline_points(boxes, scale))
    texts = title_area(shape, title) if title else np.zeros(shape, bool)
    for box, class_id, score in zip(boxes, class_ids, scores):
        texts |= label_area(shape, box, label(names, class_id, score), 9, scale)
    mask_lines = np.zeros(shape, bool)
    for mask in masks:
        mask_lines |= near_mask_outline(mask, scale)
    cover = np.array([enlarge(mask, scale) for mask in masks]).reshape(-1, *shape).sum(0)
    check_unchanged_outside(picture, base, lines | mask_lines | texts | (cover > 0))
    inside = (cover == 1) & ~lines & ~mask_lines & ~texts
    assert inside.sum() >= least_inside
    for mask, class_id in zip(masks, class_ids):
        region = inside & enlarge(mask, scale)
        expected = 0.5 * base[region] + 0.5 * np.array(visualize.color(int(class_id)))
        np.testing.assert_allclose(picture[region], expected, atol=1.5 / 255)
    # Where a box runs clear of the masks and their outlines (and its label), its dashes show.
    changes, masked = changed(picture, base), mask_lines | (cover > 0) | texts
    for box in boxes:
        coverage = outline_coverage(changes, box, scale, skip=masked)
        assert coverage is None or coverage > 0.5, f"box {box}: outline visible along {coverage:.0%} of it"


@pytest.mark.parametrize("scale", [1, 4])
def test_instances_of_real_detections(result, photo, names, tmp_path, scale):
    """The random model's masks are speckled, 2 pixels thick at most: only at scale 4 are there pixels inside them
    far enough from their outlines to check the blend."""
    drawn = best(result)
    path = tmp_path / "instances.png"
    visualize.display_instances(photo, drawn["boxes"], drawn["masks"], drawn["class_ids"], names, drawn["scores"],
                                scale=scale, save_path=str(path))
    picture = read_png(path)
    assert picture.shape == (scale * PH, scale * PW, 3)
    check_instances(picture, photo, drawn["boxes"], drawn["masks"], drawn["class_ids"], drawn["scores"], names, scale,
                    least_inside=100 if scale == 4 else 0)


def test_comparison_of_real_detections(result, photo, names, tmp_path):
    scale = 2
    truth = ground_truth()
    path = tmp_path / "comparison.png"
    # min_score: the TOP best predictions are drawn.
    visualize.display_comparison(photo, truth, result, names, min_score=float(result["scores"][TOP - 1]),
                                 scale=scale, save_path=str(path))
    picture = read_png(path)
    assert picture.shape == (scale * PH, 2 * scale * PW + GAP, 3)
    left, right = panels(picture, [(scale * PH, scale * PW)] * 2, 2)
    check_instances(left, photo, truth["boxes"].numpy(), truth["masks"].numpy().astype(bool), truth["labels"].numpy(),
                    [None, None], names, scale, "ground truth")
    drawn = best(result)
    check_instances(right, photo, drawn["boxes"], drawn["masks"], drawn["class_ids"], drawn["scores"], names, scale,
                    "predictions", least_inside=0)  # speckled masks (see test_instances_of_real_detections)


def anchor_panel(level_anchors, height, width):
    """The documented extent of a level's panel, in image pixels: the image and the anchors of the cell whose
    centre is nearest the image's centre, floored and ceiled. Returns (left, top, right, bottom), those
    anchors, and the cells' centres."""
    centres = np.round((level_anchors[:, :2] + level_anchors[:, 2:]) / 2, 3)
    cells = np.unique(centres, axis=0)
    # Box coordinates are pixel edges: the image's centre is (W / 2, H / 2). Of cells equally near it, the first
    # in (x, y) order.
    distance = np.hypot(cells[:, 0] - width / 2, cells[:, 1] - height / 2)
    middle = cells[np.argmin(distance)]
    shown = level_anchors[np.all(centres == middle, axis=1)]
    left, top = np.floor(np.minimum(shown[:, :2].min(0), 0)).astype(int)
    right, bottom = np.ceil(np.maximum(shown[:, 2:].max(0), (width, height))).astype(int)
    return (left, top, right, bottom), shown, cells


def dotted_cells(cells, scale):
    """The centres with a dot: every k-th row and column of them, k the least that puts dots 5 px apart."""
    xs, ys = np.unique(cells[:, 0]), np.unique(cells[:, 1])
    spacing = min(np.diff(xs).min() if xs.size > 1 else np.inf, np.diff(ys).min() if ys.size > 1 else np.inf)
    step = max(1, math.ceil(5 / (spacing * scale))) if np.isfinite(spacing) else 1
    return cells[np.isin(cells[:, 0], xs[::step]) & np.isin(cells[:, 1], ys[::step])]


@pytest.mark.parametrize("scale", [1, 3])
def test_anchors_of_the_model(result, photo, tmp_path, scale):
    stages = result["intermediates"]
    anchors, strides, sizes = stages["anchors"], stages["anchor_strides"], stages["anchor_sizes"]
    path = tmp_path / "anchors.png"
    visualize.display_anchors(photo, anchors, strides, sizes, scale=scale, save_path=str(path))
    extents = [anchor_panel(level, PH, PW) for level in anchors]
    shapes = [((bottom - top) * scale, (right - left) * scale) for (left, top, right, bottom), _, _ in extents]
    assert any(shape != (PH * scale, PW * scale) for shape in shapes)  # large anchors reach beyond the image
    pieces = panels(read_png(path), shapes, 3)
    for level, (piece, ((left, top, _, _), shown, cells)) in enumerate(zip(pieces, extents)):
        shape = piece.shape[:2]
        # Grey around the image, which sits at image pixel (0, 0).
        base = np.full(piece.shape, 0.85)
        base[-top * scale : (PH - top) * scale, -left * scale : (PW - left) * scale] = enlarge(photo / 255.0, scale)
        title = f"P{level + 2}, stride {strides[level]}, size {sizes[level]}: {len(shown)} per cell, "
        title += f"{len(anchors[level])} anchors"
        # A dot at each shown centre (MARGIN around it).
        dots = [np.array([[(x - left) * scale, (y - top) * scale]]) for x, y in dotted_cells(cells, scale)]
        near_dots = near(shape, np.concatenate(dots))
        allowed = near(shape, outline_points(shown, scale, (left, top))) | title_area(shape, title)
        check_unchanged_outside(piece, base, allowed | near_dots, least=0.1)
        changes = changed(piece, base)
        for anchor in shown:
            assert outline_coverage(changes, anchor, scale, (left, top)) > 0.9
        # Every dot in the panel shows (white, on the image); the anchors of the padding below and right of the
        # resized image have their centres outside it.
        visible = [seen_near(changes, dot) for dot in dots if dot[0, 0] < shape[1] - 2 and dot[0, 1] < shape[0] - 2]
        assert len(visible) > 0.8 * len(dots)
        assert np.mean(visible) > 0.9


def test_anchor_dots_are_at_the_centres_of_the_anchors(tmp_path):
    image = np.full((60, 60, 3), 64, np.uint8)  # flat: the dot's pixels weigh the same
    anchors = np.array([[20, 20, 40, 40], [15, 25, 45, 35]], np.float32)  # one cell, centred at (30, 30)
    scale = 4
    path = tmp_path / "anchors.png"
    visualize.display_anchors(image, [anchors], scale=scale, save_path=str(path))
    picture = read_png(path)
    assert picture.shape == (60 * scale, 60 * scale, 3)
    difference = np.abs(picture - enlarge(image / 255.0, scale)).max(axis=2)
    for anchor in anchors:
        assert outline_coverage(difference > 2 / 255, anchor, scale) > 0.9  # outlines at x1 * scale, ...
    centre = (30 * scale, 30 * scale)  # where the outlines are centred
    weights = difference * (distance_to(difference.shape, [centre]) <= 8)
    rows, cols = np.mgrid[: difference.shape[0], : difference.shape[1]]
    dot = ((weights * (cols + 0.5)).sum() / weights.sum(), (weights * (rows + 0.5)).sum() / weights.sum())
    assert np.hypot(dot[0] - centre[0], dot[1] - centre[1]) <= 1.0, f"dot at {dot}, anchors centred at {centre}"


def check_boxes_panel(piece, base, boxes, title, scale, least_coverage=0.9, font_size=9, also_allowed=None):
    """Solid box outlines on the enlarged image: changes only near them and under the title, each outline visible
    along (nearly) all its length."""
    shape = piece.shape[:2]
    allowed = near(shape, outline_points(boxes, scale)) | title_area(shape, title, font_size)
    check_unchanged_outside(piece, base, allowed if also_allowed is None else allowed | also_allowed)
    changes = changed(piece, base)
    for box in boxes:
        coverage = outline_coverage(changes, box, scale)
        assert coverage is None or coverage >= least_coverage, f"box {box}: visible along {coverage:.0%} of it"
    return changes


@pytest.mark.parametrize("scale", [1, 2])
def test_proposals_of_the_model(result, photo, tmp_path, scale):
    stages = result["intermediates"]
    count = 5
    path = tmp_path / "proposals.png"
    visualize.display_proposals(photo, stages["proposals_before_nms"], stages["proposal_scores_before_nms"],
                                stages["proposals"], stages["proposal_scores"], count=count, scale=scale,
                                save_path=str(path))
    base = enlarge(photo / 255.0, scale)
    pieces = panels(read_png(path), [base.shape[:2]] * 2, 2)
    yellow = np.array(plt.get_cmap("plasma")(1.0)[:3])  # the colour of the best
    for piece, name, boxes, scores in zip(pieces, ("before NMS", "after NMS"),
                                          (stages["proposals_before_nms"], stages["proposals"]),
                                          (stages["proposal_scores_before_nms"], stages["proposal_scores"])):
        order = np.argsort(-scores, kind="stable")
        assert scores[order[0]] > scores[order[1]]  # one best
        check_boxes_panel(piece, base, boxes[order[:count]], f"{name}: best {count} of {len(boxes)}", scale)
        # The best is yellow, and drawn on top of the others.
        yellow_pixels = np.abs(piece - yellow).max(axis=2) < 2 / 255
        assert outline_coverage(yellow_pixels, boxes[order[0]], scale) > 0.9
    # The default: the best 50.
    visualize.display_proposals(photo, stages["proposals_before_nms"], stages["proposal_scores_before_nms"],
                                stages["proposals"], stages["proposal_scores"], scale=scale, save_path=str(path))
    for piece in panels(read_png(path), [base.shape[:2]] * 2, 2):
        assert changed(piece, base).mean() > 0.2


def test_refinement_of_real_detections(result, photo, names, tmp_path):
    scale = 3
    drawn = best(result)
    proposals, boxes = drawn["detection_proposals"], drawn["boxes"]
    path = tmp_path / "refinement.png"
    visualize.display_refinement(photo, proposals, boxes, drawn["class_ids"], names, drawn["scores"], scale=scale,
                                 save_path=str(path))
    picture = read_png(path)
    base = enlarge(photo / 255.0, scale)
    assert picture.shape == base.shape
    shape = picture.shape[:2]
    # Corners joined: proposal's top-left to box's top-left, bottom-right to bottom-right.
    joins = [segment(p[corner] * scale, q[corner] * scale)
             for p, q in zip(proposals, boxes) for corner in ([0, 1], [2, 3])]
    allowed = near(shape, np.concatenate(joins + [outline_points(proposals, scale)]))
    for box, class_id, score in zip(boxes, drawn["class_ids"], drawn["scores"]):
        allowed |= label_area(shape, box, label(names, class_id, score), 9, scale)
    title = f"refinement of {TOP}: proposal (dashed) to box (solid)"
    changes = check_boxes_panel(picture, base, boxes, title, scale, also_allowed=allowed)
    for proposal in proposals:  # dashed
        coverage = outline_coverage(changes, proposal, scale)
        assert coverage is None or coverage > 0.4
    # All hundred: the same size.
    stages = result["intermediates"]
    visualize.display_refinement(photo, stages["detection_proposals"], result["boxes"], result["class_ids"], names,
                                 scale=scale, save_path=str(path))
    assert read_png(path).shape == base.shape


def check_mask_panel(piece, probs, title, scale, threshold=0.5, least=0.3):
    """Viridis colours of the probabilities, each a scale x scale block, but for the title and the threshold's
    contour: it runs through the squares between four pixel centres whose probabilities straddle the threshold,
    and is drawn when some probabilities are below the threshold and some above it."""
    expected = enlarge(plt.get_cmap("viridis")(np.clip(probs, 0, 1))[..., :3], scale)
    assert piece.shape == expected.shape
    shape = piece.shape[:2]
    corners = [probs[:-1, :-1], probs[1:, :-1], probs[:-1, 1:], probs[1:, 1:]]
    straddle = (np.minimum.reduce(corners) <= threshold) & (np.maximum.reduce(corners) >= threshold)
    contour = np.zeros(shape, bool)
    for row, col in zip(*np.nonzero(straddle)):
        contour |= rectangle(shape, (col + 0.5) * scale, (row + 0.5) * scale, (col + 1.5) * scale,
                             (row + 1.5) * scale)
    contour = dilate(contour, MARGIN)
    title = title_area(shape, title, 8)
    check_unchanged_outside(piece, expected, contour | title, least)
    if probs.min() < threshold < probs.max():
        assert changed(piece, expected)[contour & ~title].sum() > 2 * scale  # the contour is drawn


def test_mask_predictions_of_real_detections(result, names, tmp_path):
    """The random model's masks are a fine checkerboard that the 0.5 contour covers; with threshold 1 (no
    contour) every pixel below the title is checked."""
    columns, count = 4, 10
    drawn = best(result, count)
    path = tmp_path / "masks.png"
    for threshold, least in ((1.0, 0.6), (0.5, 0.0)):
        visualize.display_mask_predictions(drawn["mask_probs"], drawn["class_ids"], names, drawn["scores"], threshold,
                                           columns=columns, save_path=str(path))
        pieces = panels(read_png(path), [(28 * 4, 28 * 4)] * count, columns)  # scale 4 by default
        for piece, probs, class_id, score in zip(pieces, drawn["mask_probs"], drawn["class_ids"], drawn["scores"]):
            check_mask_panel(piece, probs, label(names, class_id, score), 4, threshold, least)
    # No scores: the class alone.
    visualize.display_mask_predictions(drawn["mask_probs"][:2], drawn["class_ids"][:2], names, threshold=1.0,
                                       save_path=str(path))
    for piece, probs, class_id in zip(panels(read_png(path), [(112, 112)] * 2, 8), drawn["mask_probs"],
                                      drawn["class_ids"]):
        check_mask_panel(piece, probs, names[class_id], 4, 1.0, least=0.6)


def test_mask_prediction_contour(names, tmp_path):
    """A smooth blob: its 0.5 contour (a circle) in white, viridis everywhere else."""
    rows, cols = np.mgrid[:28, :28]
    blob = np.exp(-((rows - 15.2) ** 2 + (cols - 12.7) ** 2) / 60.0)
    ramp = np.linspace(0, 0.4, 28 * 28).reshape(28, 28)  # no contour: below 0.5 everywhere
    path = tmp_path / "blob.png"
    visualize.display_mask_predictions(np.stack([blob, ramp]), [1, 3], names, [0.9, 0.3], scale=3,
                                       save_path=str(path))
    blob_panel, ramp_panel = panels(read_png(path), [(84, 84)] * 2, 8)
    check_mask_panel(blob_panel, blob, "person 0.90", 3)
    check_mask_panel(ramp_panel, ramp, "car 0.30", 3, least=0.7)


@pytest.mark.parametrize("case", ["instances", "comparison", "anchors", "empty anchor level", "proposals",
                                  "best 0 proposals", "refinement", "mask predictions"])
def test_nothing_to_draw(case, photo, empty, names, tmp_path):
    """The silent model's outputs (no detections), no anchors, no proposals: pictures of the expected size that
    are the image (or black, for masks) outside their titles, which are drawn."""
    scale = 2
    path = str(tmp_path / "empty.png")
    stages = empty["intermediates"]
    image = enlarge(photo / 255.0, scale)
    if case == "instances":
        visualize.display_instances(photo, empty["boxes"], empty["masks"], empty["class_ids"], names, empty["scores"],
                                    scale=scale, save_path=path)
        expected = [(image, None)]
    elif case == "comparison":
        truth = {"boxes": np.zeros((0, 4)), "masks": np.zeros((0, PH, PW), bool), "class_ids": np.zeros(0, int)}
        visualize.display_comparison(photo, truth, empty, names, scale=scale, save_path=path)
        expected = [(image, "ground truth"), (image, "predictions")]
    elif case == "anchors":
        visualize.display_anchors(photo, [], scale=scale, save_path=path)
        expected = [(image, "no anchors")]
    elif case == "empty anchor level":
        visualize.display_anchors(photo, [np.zeros((0, 4))], [4], [32], scale=scale, save_path=path)
        expected = [(image, "P2, stride 4, size 32: no anchors")]
    elif case == "proposals":
        visualize.display_proposals(photo, np.zeros((0, 4)), np.zeros(0), np.zeros((0, 4)), np.zeros(0), scale=scale,
                                    save_path=path)
        expected = [(image, "before NMS: best 0 of 0"), (image, "after NMS: best 0 of 0")]
    elif case == "best 0 proposals":
        visualize.display_proposals(photo, stages["proposals_before_nms"], stages["proposal_scores_before_nms"],
                                    stages["proposals"], stages["proposal_scores"], count=0, scale=scale,
                                    save_path=path)
        expected = [(image, f"before NMS: best 0 of {len(stages['proposals_before_nms'])}"),
                    (image, f"after NMS: best 0 of {len(stages['proposals'])}")]
    elif case == "refinement":
        visualize.display_refinement(photo, stages["detection_proposals"], empty["boxes"], empty["class_ids"], names,
                                     empty["scores"], scale=scale, save_path=path)
        expected = [(image, "refinement of 0: proposal (dashed) to box (solid)")]
    else:
        visualize.display_mask_predictions(stages["mask_probs"], empty["class_ids"], names, empty["scores"],
                                           scale=scale, save_path=path)
        expected = [(np.zeros((28 * scale, 28 * scale, 3)), "no detections")]
    font_size = 8 if case == "mask predictions" else 9
    pieces = panels(read_png(path), [background.shape[:2] for background, _ in expected], len(expected))
    for piece, (background, title) in zip(pieces, expected):
        strip = title_area(piece.shape[:2], title, font_size) if title else np.zeros(piece.shape[:2], bool)
        check_unchanged_outside(piece, background, strip)
        if title:
            assert changed(piece, background)[strip].sum() > 50  # the title is there


############################################################
#  Training curves
############################################################

LOSSES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
RECORDS = [
    {"iteration": 10 * (i + 1), "lr": lr, "loss": total, **{key: total / (k + 2) for k, key in enumerate(LOSSES)}}
    for i, (lr, total) in enumerate([(0.004, 3.0), (0.02, 2.2), (0.02, 1.6), (0.02, 1.3), (0.002, 0.9)])
]
RECORDS.insert(2, {"iteration": 20, "eval": {"bbox": {"AP": 0.12, "AP50": 0.3}, "segm": {"AP": 0.1, "AP50": 0.25}}})
RECORDS.append({"iteration": 50, "eval": {"bbox": {"AP": 0.35, "AP50": 0.6}, "segm": {"AP": 0.3, "AP50": 0.55}}})


def write_log(folder, records, cut_last=True):
    """A run's log.jsonl; with cut_last, a last line cut short as by a killed run."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record) + "\n" for record in records]
    if cut_last:
        lines.append(json.dumps({"iteration": 60, "lr": 0.002, "loss": 0.8})[:25])
    (folder / "log.jsonl").write_text("".join(lines))
    return folder / "log.jsonl"


def test_read_log_skips_a_cut_last_line(tmp_path):
    path = write_log(tmp_path / "run", RECORDS)
    assert visualize.read_log(str(path)) == RECORDS
    assert visualize.read_log(str(tmp_path / "run")) == RECORDS  # the run's folder
    assert visualize.read_log(write_log(tmp_path / "empty", [], cut_last=False)) == []


def plot_areas(figure):
    """The (rows, cols) slices of each Axes' inside, 3 px in from its frame, from the returned figure."""
    height = figure.bbox.height
    areas = []
    for ax in figure.axes:
        box = ax.get_window_extent()
        areas.append((slice(round(height - box.y1) + 3, round(height - box.y0) - 3),
                      slice(round(box.x0) + 3, round(box.x1) - 3)))
    return areas


def colour_pixels(picture, rgb, tolerance=0.06):
    return int((np.abs(picture - np.asarray(rgb)).max(axis=2) < tolerance).sum())


@pytest.mark.parametrize("width, height", [(1200, 350), (901, 333)])
def test_training_curves(tmp_path, width, height):
    path = write_log(tmp_path / "run", RECORDS)
    empty_path = write_log(tmp_path / "empty", [], cut_last=False)
    size = {} if (width, height) == (1200, 350) else {"width": width, "height": height}  # the defaults
    pictures, figures = {}, {}
    for name, log in (("file", str(path)), ("folder", tmp_path / "run"), ("records", RECORDS),
                      ("empty file", str(empty_path)), ("no records", [])):
        out = tmp_path / f"{name}.png"
        figures[name] = visualize.plot_training_curves(log, save_path=str(out), **size)
        pictures[name] = read_png(out)
        assert pictures[name].shape == (height, width, 3)
    np.testing.assert_array_equal(pictures["file"], pictures["folder"])
    np.testing.assert_array_equal(pictures["file"], pictures["records"])
    np.testing.assert_array_equal(pictures["empty file"], pictures["no records"])
    drawn, empty = pictures["file"], pictures["empty file"]
    areas = plot_areas(figures["file"])
    assert len(areas) == 3 and areas == plot_areas(figures["empty file"])
    # The titles' row, above the plots (and above their highest tick labels), is the same and has the titles;
    # inside each plot the lines differ.
    titles = slice(0, min(rows.start for rows, _ in areas) - 10)
    for _, cols in areas:
        np.testing.assert_array_equal(drawn[titles, cols], empty[titles, cols])
        assert (drawn[titles, cols] < 0.5).any()
    for rows, cols in areas:
        assert changed(drawn[rows, cols], empty[rows, cols], 0.25).sum() > 50
    (loss_rows, loss_cols), (lr_rows, lr_cols), (ap_rows, ap_cols) = areas
    blue, orange = plt.get_cmap("tab10")(0)[:3], plt.get_cmap("tab10")(1)[:3]  # the first two lines' colours
    assert colour_pixels(drawn[loss_rows, loss_cols], blue) > 50  # "loss", 2 px wide
    assert colour_pixels(drawn[lr_rows, lr_cols], (0, 0, 0), 0.2) > 50  # the learning rate, black
    assert colour_pixels(drawn[ap_rows, ap_cols], blue) > 30 and colour_pixels(drawn[ap_rows, ap_cols], orange) > 30
    for rows, cols in areas:
        assert colour_pixels(empty[rows, cols], blue) == colour_pixels(empty[rows, cols], (0, 0, 0), 0.2) == 0


############################################################
#  Every view of a run, figures, bad input
############################################################


def anchors_size(anchors, scale, columns=3):
    shapes = [((bottom - top) * scale, (right - left) * scale)
              for (left, top, right, bottom), _, _ in (anchor_panel(level, PH, PW) for level in anchors)]
    return layout(shapes, columns)[1]


@pytest.mark.parametrize("model, target, min_score", [("detector", None, 0.5), ("detector", "ground truth", 0.7),
                                                      ("silent", None, 0.5)])
def test_stage_views(model, target, min_score, photo, tmp_path, request):
    """Five pictures at scale 3 (the masks at their own default, 4) of the detections scoring min_score or more;
    their sizes as the drawing functions' documentation says."""
    model = request.getfixturevalue(model)
    target = ground_truth() if target else None
    (expected,) = model.detect([photo], return_intermediates=True)
    stages = expected["intermediates"]
    kept = int((expected["scores"] >= min_score).sum())
    assert kept > 8 or model.config.DETECTION_MIN_CONFIDENCE == 1.0  # more than a row of mask panels
    paths = visualize.stage_views(model, photo, str(tmp_path / "views"), "val", target, min_score)
    views = ("detections", "anchors", "proposals", "refinement", "masks")
    assert paths == {view: str(tmp_path / "views" / f"val_{view}.png") for view in views}
    sizes = {
        "detections": (3 * PH, 3 * PW * (2 if target else 1) + (GAP if target else 0)),
        "anchors": anchors_size(stages["anchors"], 3),
        "proposals": (3 * PH, 6 * PW + GAP),
        "refinement": (3 * PH, 3 * PW),
        "masks": layout([(112, 112)] * kept, 8)[1] if kept else (112, 112),
    }
    pictures = {view: read_png(paths[view]) for view in views}
    for view in views:
        assert pictures[view].shape == (*sizes[view], 3), view
    # Not blank: the detections (and the ground truth) are drawn on the image; with neither, it is the image.
    image = enlarge(photo / 255.0, 3)
    if kept or target:
        for piece in panels(pictures["detections"], [image.shape[:2]] * (2 if target else 1), 2):
            assert changed(piece, image).mean() > 0.1
    else:
        np.testing.assert_allclose(pictures["detections"], image, atol=1 / 255)
    assert plt.get_fignums() == []  # stage_views leaves no figure open


def drawings(photo, result, names):
    """Each display function with a few real outputs, as f(save_path) -> figure."""
    stages, drawn = result["intermediates"], best(result)
    return {
        "instances": lambda path: visualize.display_instances(photo, drawn["boxes"], drawn["masks"],
                                                              drawn["class_ids"], names, drawn["scores"], scale=2,
                                                              save_path=path),
        "comparison": lambda path: visualize.display_comparison(photo, ground_truth(), result, names,
                                                                float(result["scores"][TOP - 1]), save_path=path),
        "anchors": lambda path: visualize.display_anchors(photo, stages["anchors"][2:], columns=2, save_path=path),
        "proposals": lambda path: visualize.display_proposals(photo, stages["proposals_before_nms"],
                                                              stages["proposal_scores_before_nms"],
                                                              stages["proposals"], stages["proposal_scores"],
                                                              count=10, scale=2, save_path=path),
        "refinement": lambda path: visualize.display_refinement(photo, drawn["detection_proposals"], drawn["boxes"],
                                                                drawn["class_ids"], names, save_path=path),
        "masks": lambda path: visualize.display_mask_predictions(drawn["mask_probs"], drawn["class_ids"], names,
                                                                 columns=2, scale=3, save_path=path),
        "curves": lambda path: visualize.plot_training_curves(RECORDS, save_path=path, width=640, height=250),
    }


@pytest.mark.parametrize("name", ["instances", "comparison", "anchors", "proposals", "refinement", "masks", "curves"])
def test_figure_without_save_path(name, photo, result, names, tmp_path):
    """Without save_path a pyplot figure (a notebook shows it) of the picture's size in pixels, that draws the
    picture the PNG holds."""
    draw = drawings(photo, result, names)[name]
    path = tmp_path / f"{name}.png"
    draw(str(path))
    picture = read_png(path)
    figure = draw(None)
    try:
        assert figure.number in plt.get_fignums()
        np.testing.assert_allclose(figure.get_size_inches() * figure.dpi, picture.shape[1::-1], atol=1e-6)
        figure.canvas.draw()
        shown = np.asarray(figure.canvas.buffer_rgba())[..., :3] / 255.0
        np.testing.assert_allclose(shown, picture, atol=1 / 255)
    finally:
        plt.close(figure)
    assert figure.number not in plt.get_fignums()


PROBS = np.full((2, 28, 28), 0.5, np.float32)
BOX = np.array([[10, 10, 40, 30]], np.float32)
# Each bad argument: a call of (image, save_path), and what the message names.
BAD_INPUTS = {
    "scores before NMS": (lambda im, p: visualize.display_proposals(im, np.zeros((3, 4)), np.zeros(2), BOX, [1.0],
                                                                    save_path=p), "3 proposals before NMS but 2"),
    "scores after NMS": (lambda im, p: visualize.display_proposals(im, BOX, [1.0], np.zeros((3, 4)), np.zeros(4),
                                                                   save_path=p), "3 proposals after NMS but 4"),
    "proposals not [N, 4]": (lambda im, p: visualize.display_proposals(im, np.zeros((3, 5)), np.zeros(3), BOX, [1.0],
                                                                       save_path=p), r"proposals.*\[N, 4\]"),
    "proposals vs boxes": (lambda im, p: visualize.display_refinement(im, np.zeros((2, 4)), BOX, [1], NAMES,
                                                                      save_path=p), r"proposals \(2\), boxes \(1\)"),
    "class_ids vs boxes": (lambda im, p: visualize.display_refinement(im, BOX, BOX, [1, 2], NAMES, save_path=p),
                           r"class_ids \(2\)"),
    "refined boxes not [N, 4]": (lambda im, p: visualize.display_refinement(im, BOX, np.zeros((1, 3)), [1], NAMES,
                                                                            save_path=p), r"boxes must be \[N, 4\]"),
    "boxes not [N, 4]": (lambda im, p: visualize.display_instances(im, np.zeros((2, 2, 4)), None, [1, 2], NAMES,
                                                                   save_path=p), r"boxes must be \[N, 4\]"),
    "anchors not [A, 4]": (lambda im, p: visualize.display_anchors(im, [BOX, np.zeros((5, 3))], save_path=p),
                           r"anchors\[1\] must be \[N, 4\]"),
    "mask_probs vs class_ids": (lambda im, p: visualize.display_mask_predictions(PROBS, [1, 2, 1], NAMES, save_path=p),
                                r"mask_probs \(2\), class_ids \(3\)"),
    "mask_probs vs scores": (lambda im, p: visualize.display_mask_predictions(PROBS, [1, 2], NAMES, [0.5], save_path=p),
                             r"scores \(1\)"),
    "mask_probs not square": (lambda im, p: visualize.display_mask_predictions(PROBS[:, :, :27], [1, 2], NAMES,
                                                                               save_path=p), r"mask_probs must be"),
    "mask_probs 2-d": (lambda im, p: visualize.display_mask_predictions(PROBS[0], [1], NAMES, save_path=p),
                       r"mask_probs must be \[D, M, M\]"),
}
SCALED = {  # (image, save_path, scale)
    "instances": lambda im, p, s: visualize.display_instances(im, BOX, None, [1], NAMES, scale=s, save_path=p),
    "comparison": lambda im, p, s: visualize.display_comparison(
        im, {"boxes": BOX, "labels": [1]}, {"boxes": BOX, "masks": np.ones((1, H, W), bool), "class_ids": [1],
                                            "scores": [0.9]}, NAMES, scale=s, save_path=p),
    "anchors": lambda im, p, s: visualize.display_anchors(im, [BOX], scale=s, save_path=p),
    "proposals": lambda im, p, s: visualize.display_proposals(im, BOX, [1.0], BOX, [1.0], scale=s, save_path=p),
    "refinement": lambda im, p, s: visualize.display_refinement(im, BOX, BOX, [1], NAMES, scale=s, save_path=p),
    "masks": lambda im, p, s: visualize.display_mask_predictions(PROBS, [1, 2], NAMES, scale=s, save_path=p),
}
for _name, _call in SCALED.items():
    for _scale in (0, 1.5):
        BAD_INPUTS[f"{_name} at scale {_scale}"] = (lambda im, p, call=_call, scale=_scale: call(im, p, scale),
                                                   f"scale must be a whole number >= 1; got {_scale}")


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(case, tmp_path):
    call, message = BAD_INPUTS[case]
    path = tmp_path / "x.png"
    with pytest.raises(ValueError, match=message):
        call(scene()[0], str(path))
    assert not path.exists()


############################################################
#  The command line
############################################################


def test_command_writes_only_inside_its_out_folder(tmp_path):
    """`python visualize.py --out RUN/pictures` with a random shapes model: the detection grid and every other
    picture land in RUN/pictures; RUN (here holding the checkpoint and a detections.png of the user's) keeps
    exactly its files, unchanged."""
    data = tmp_path / "shapes"
    shapes.generate(data, train=1, val=2, size=64, seed=0)
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    config = ShapesConfig()
    torch.save({"model": MaskRCNN(config).state_dict(), "config": config.to_dict()}, run / "last.pth")
    (run / "detections.png").write_bytes(b"the user's own file")
    before = {path.name: path.read_bytes() for path in run.iterdir()}
    out = run / "pictures"
    visualize.main(["--weights", str(run / "last.pth"), "--config", "shapes", "--data", str(data), "--out", str(out),
                    "--count", "2"])
    assert {path.name: path.read_bytes() for path in run.iterdir() if path != out} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run", "shapes"]
    assert (out / "detections.png").is_file() and (out / "val_detections.png").is_file()
