"""Tests of visualize.py: pictures of the image's own size, masks blended with their class colour (by
hand: (1 - alpha) * pixel + alpha * colour), untouched pixels away from every instance and label, and
argument checks. The PNGs are written and read back with matplotlib and PIL."""

import colorsys
import itertools

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

import visualize

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
