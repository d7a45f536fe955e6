"""Tests of the validation of training data (issue 12, items 5, 6, 8 and 12): polygons and RLE checked
before pycocotools sees them (utils.check_polygon, utils.check_rle, polygons_to_mask, rle_to_mask), the
annotation-file check that the loader turns into one error (coco.check_annotations, load_coco), the
training batch sampler with orientations that cannot fill a batch, and the model's target check.

Oracles: hand-written broken files and masks whose faults are known by construction; run lengths of a
mask counted with numpy (for the compressed-RLE decoder); for the sampler, counts of each image over
whole epochs (each image once per epoch) and the same sampler run uninterrupted (for resume). No test
hands pycocotools a bad coordinate: the crashes these checks prevent never run here.
"""

import itertools
import json
import logging
import re
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

import coco
import model
import shapes
import train
import utils
from config import Config

# ----------------------------------------------------------------------------------------------------
# utils: polygons and RLE


@pytest.mark.parametrize("polygon, match", [
    ([10, 10, 20, 10, float("nan"), 20], r"polygons\[0\] has a coordinate nan"),
    ([10, 10, 20, 10, float("inf"), 20], r"polygons\[0\] has a coordinate inf"),
    ([10, 10, 1e7, 10, 15, 20], r"polygons\[0\] has the point \(1e\+07, 10\), more than one image size outside"),
    ([10, 10, 20, 10, 15, -65], r"polygons\[0\] has the point \(15, -65\)"),
    ([10, 10, 20, 10, 15], r"polygons\[0\] must have an even number of coordinates, at least 6 \(3 points\); got 5"),
    ([10, 10, 20, 20], r"polygons\[0\] must have an even number of coordinates, at least 6"),
    ([10, 10, "x", 20, 15, 20], r"polygons\[0\] must be a flat list of numbers"),
    ([[10, 10], [20, 10], [15, 20]], r"polygons\[0\] must be a flat list of numbers"),
])
def test_polygons_to_mask_refuses_what_pycocotools_cannot_rasterise(polygon, match):
    with pytest.raises(ValueError, match=match):
        utils.polygons_to_mask([polygon], 64, 64)


def test_polygons_to_mask_names_the_bad_polygon_and_keeps_good_ones():
    good = [2, 1, 6, 1, 6, 4, 2, 4]
    with pytest.raises(ValueError, match=r"polygons\[1\] has a coordinate nan"):
        utils.polygons_to_mask([good, [1, 1, 2, float("nan"), 3, 3]], 8, 10)
    # Points up to one image size beyond the borders are fine (clipped by the rasteriser).
    mask = utils.polygons_to_mask([[-10, -8, 20, -8, 20, 16, -10, 16]], 8, 10)
    assert mask.all()
    assert not utils.polygons_to_mask([], 8, 10).any()


def runs_by_numpy(mask):
    """COCO run lengths of a mask: column-major, starting with a (maybe empty) run of zeros."""
    flat = mask.T.reshape(-1).astype(np.int64)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (64, 48), (300, 200)])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_rle_string_counts_are_the_runs(shape, density):
    rng = np.random.default_rng(shape[0] + 1000 * int(density * 100))
    mask = rng.random(shape) < density
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert utils.rle_string_counts(rle["counts"]).tolist() == runs_by_numpy(mask)
    assert utils.rle_string_counts(rle["counts"].decode("ascii")).tolist() == runs_by_numpy(mask)


def test_rle_string_counts_of_long_runs():
    # One pixel set at the very end of a 3000 x 3000 mask: runs of 8999999 and 1 (several characters each).
    mask = np.zeros((3000, 3000), bool)
    mask[-1, -1] = True
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert utils.rle_string_counts(rle["counts"]).tolist() == [8_999_999, 1]


def compressed(mask):
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


@pytest.mark.parametrize("rle, match", [
    ({"size": [4, 5], "counts": [3, 2, -1, 16]}, r"rle\['counts'\] has a negative run \(-1\)"),
    ({"size": [4, 5], "counts": [3, 2, 1]}, r"rle\['counts'\] runs sum to 6; a 4x5 mask needs 20"),
    ({"size": [4, 5], "counts": [3, 2, 100]}, r"runs sum to 105"),
    ({"size": [5, 4], "counts": [20]}, r"rle\['size'\] must be the image's \[height, width\] = \[4, 5\]; got \[5, 4\]"),
    ({"size": [4, 5], "counts": [3.5, 16.5]}, r"rle\['counts'\] must be a list of integers"),
    ({"counts": [20]}, r"rle must be a dict with 'size'"),
    ({"size": [4, 5], "counts": "0\x7f"}, r"characters outside"),
    ({"size": [4, 5], "counts": "0P"}, r"end in the middle of a run"),
    # A whole 8x8 mask's runs (64) given as a 4x5 one: pycocotools would write past the mask.
    ({**compressed(np.ones((8, 8), bool)), "size": [4, 5]}, r"runs sum to 64; a 4x5 mask needs 20"),
])
def test_rle_to_mask_refuses_runs_that_do_not_fill_the_mask(rle, match):
    with pytest.raises(ValueError, match=match):
        utils.rle_to_mask(rle, 4, 5)


# ----------------------------------------------------------------------------------------------------
# The annotation file check and the loader


def write_file(root, images, annotations, categories, split="train"):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


IMAGES = [{"id": 1, "file_name": "a.png", "height": 40, "width": 60},
          {"id": 2, "file_name": "b.png", "height": 50, "width": 30}]
CATEGORIES = [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}]
SQUARE = [10, 10, 20, 10, 20, 20, 10, 20]


def ann(ann_id, image_id=1, category_id=1, bbox=(10, 10, 10, 10), segmentation=None):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": 0, "area": 100.0,
            "bbox": list(bbox), "segmentation": [SQUARE] if segmentation is None else segmentation}


def load_error(tmp_path, images, annotations, categories=CATEGORIES, **kwargs):
    path = write_file(tmp_path, images, annotations, categories)
    with pytest.raises(ValueError) as error:
        coco.load_coco(str(path), **kwargs)
    return str(path), str(error.value)


@pytest.mark.parametrize("segmentation, message", [
    ([[10, 10, 20, 10, float("nan"), 20]], "segmentation[0] has a coordinate nan"),
    ([SQUARE, [10, 10, float("inf"), 10, 20, 20]], "segmentation[1] has a coordinate inf"),
    ([[10, 10, 1e7, 10, 20, 20]], "segmentation[0] has the point (1e+07, 10)"),
    ([[10, 10, 20, 10, 20, 20, 5]], "segmentation[0] must have an even number of coordinates, at least 6 (3 points); "
                                    "got 7"),
    ({"size": [40, 60], "counts": [5, 10, 100]}, "segmentation['counts'] runs sum to 115; a 40x60 mask needs 2400"),
    ({"size": [40, 60], "counts": [2400, -5, 5]}, "segmentation['counts'] has a negative run (-5)"),
    ({"size": [60, 40], "counts": [2400]}, "segmentation['size'] must be the image's [height, width] = [40, 60]"),
    ("a string", "needs 'segmentation' as polygons"),
])
def test_loader_refuses_unsafe_segmentations_with_file_image_and_annotation(tmp_path, segmentation, message):
    path, error = load_error(tmp_path, IMAGES, [ann(1), ann(7, segmentation=segmentation)])
    assert path in error
    assert f"image 1, annotation 7: {message}" in error


def test_training_and_evaluation_refuse_a_nan_polygon_before_any_mask_is_made(tmp_path):
    # Both build their data set in the main process, before any loader worker starts.
    images = [dict(IMAGES[0], id=i, file_name=f"{i}.png") for i in (1, 2)]
    path = write_file(tmp_path, images, [ann(1), ann(5, image_id=2, segmentation=[[1, 1, 9, float("nan"), 5, 9]])],
                      CATEGORIES)
    write_file(tmp_path, images, [ann(5, image_id=2, segmentation=[[1, 1, 9, float("nan"), 5, 9]])], CATEGORIES,
               split="val")
    with pytest.raises(ValueError, match=r"image 2, annotation 5: segmentation\[0\] has a coordinate nan") as error:
        train.training_set(str(tmp_path), Config(NUM_CLASSES=3, TRAIN_SPLIT="train"), 0, 1)
    assert str(path) in str(error.value)
    cfg = Config(NUM_CLASSES=3, BACKBONE="resnet18", FPN_CHANNELS=16, BOX_HEAD_DIM=16, MASK_HEAD_CHANNELS=8,
                 MASK_HEAD_CONVS=1)
    weights = tmp_path / "w.pth"
    torch.save({"model": model.MaskRCNN(cfg).state_dict(), "config": cfg.to_dict(), "iteration": 0}, weights)
    with pytest.raises(ValueError, match=r"instances_val\.json has 1 error:\n  image 2, annotation 5: segmentation"):
        coco.main(["evaluate", "--data", str(tmp_path), "--weights", str(weights), "--split", "val",
                   "--device", "cpu", "--out", str(tmp_path / "m.json")])


@pytest.mark.parametrize("kind, message", [
    ("images", "image id 1 is used by more than one image"),
    ("categories", "category id 2 is used by more than one category"),
    ("annotations", "image 1, annotation 3: annotation id 3 is used by more than one annotation"),
])
def test_duplicate_ids_are_refused(tmp_path, kind, message):
    images, categories, annotations = list(IMAGES), list(CATEGORIES), [ann(3), ann(4)]
    if kind == "images":
        images.append(dict(IMAGES[0], file_name="other.png"))
    elif kind == "categories":
        categories.append({"id": 2, "name": "two again"})
    else:
        annotations.append(ann(3, bbox=(1, 1, 5, 5)))
    path, error = load_error(tmp_path, images, annotations, categories)
    assert message in error and path in error


@pytest.mark.parametrize("category_id, labels_are_category_ids, message", [
    (10_001, True, "category id 10001 cannot be a label: with LABELS_ARE_CATEGORY_IDS ids must be in 1..10000"),
    (10**9, True, "category id 1000000000 cannot be a label"),
    (0, True, "category id 0 cannot be a label"),
    (-3, False, "ids must be integers >= 0; got -3"),
    (2.5, False, "ids must be integers >= 0; got 2.5"),
    ("7", False, "ids must be integers >= 0; got '7'"),
])
def test_bad_category_ids_are_refused(tmp_path, category_id, labels_are_category_ids, message):
    categories = [CATEGORIES[0], {"id": category_id, "name": "odd"}]
    path, error = load_error(tmp_path, IMAGES, [ann(1)], categories, labels_are_category_ids=labels_are_category_ids)
    assert message in error and path in error


def test_large_category_ids_are_fine_as_contiguous_labels(tmp_path):
    write_file(tmp_path, IMAGES, [ann(1, category_id=10**9)], [{"id": 10**9, "name": "big"}])
    dataset = coco.CocoDataset(str(tmp_path), "train")
    assert dataset.num_classes == 2 and dataset.label_to_category == {1: 10**9}


def test_boxes_written_as_corners_are_refused(tmp_path):
    # [10, 10, 50, 30] read as [x, y, w, h] ends at x = 60 and y = 40, the corner of the 60 x 40 image 1: fine.
    # [5, 10, 28, 40] in the 30 x 50 image 2 runs to x = 33, past the border, and read as corners it fits: refused.
    annotations = [ann(1, bbox=(10, 10, 50, 30)), ann(2, image_id=2, bbox=(5, 10, 28, 40))]
    path, error = load_error(tmp_path, IMAGES, annotations)
    assert "image 2, annotation 2: bbox [5, 10, 28, 40] runs past the 30x50 image read as COCO's [x, y, width, " \
           "height] but fits it read as [x1, y1, x2, y2]" in error
    assert "annotation 1" not in error


def test_every_error_is_in_one_message(tmp_path):
    annotations = [ann(1, segmentation=[[1, 1, float("nan"), 2, 3, 3]]), ann(2, image_id=9), ann(3, category_id=5),
                   ann(4, bbox=[1, 2, 3])]
    path, error = load_error(tmp_path, IMAGES, annotations)
    assert error.startswith(f"{path} has 4 errors:\n")
    for line in ("image 1, annotation 1: segmentation[0] has a coordinate nan",
                 "image 9, annotation 2: refers to image_id 9, which is not in 'images'",
                 "image 1, annotation 3: has category_id 5, which is not in 'categories'",
                 "image 1, annotation 4: needs 'bbox' as [x, y, width, height], 4 finite numbers; got [1, 2, 3]"):
        assert f"\n  {line}" in error


def test_check_annotations_returns_the_problems(tmp_path):
    annotations = [ann(1), ann(2, segmentation=[[1, 1, float("nan"), 2, 3, 3]]), ann(3, bbox=(10, 10, 0, 5)),
                   ann(4, image_id=2, segmentation=[SQUARE, [1, 2, 3, 4]])]
    images = [*IMAGES, {"id": 3, "file_name": "c.png", "height": 0, "width": 10}]
    problems = coco.check_annotations({"images": images, "annotations": annotations, "categories": CATEGORIES},
                                      "f.json")
    found = [(p.file, p.image_id, p.annotation_id, p.code, p.level) for p in problems]
    assert found == [
        ("f.json", 3, None, "bad-image", "error"),
        ("f.json", 1, 2, "bad-polygon", "error"),
        ("f.json", 1, 3, "empty-box", "warning"),
        ("f.json", 2, 4, "short-polygon", "warning"),
    ]
    assert str(problems[1]) == "f.json: image 1, annotation 2: segmentation[0] has a coordinate nan; coordinates " \
                               "must be finite (pixels)"


def test_the_shapes_data_set_has_no_problems(tmp_path):
    shapes.generate(str(tmp_path / "shapes"), train=6, val=2, size=64)
    for split in ("train", "val"):
        path = str(tmp_path / "shapes" / "annotations" / f"instances_{split}.json")
        assert coco.check_annotations(coco.read_annotation_file(path), path) == []


def test_short_polygons_are_dropped_with_a_counted_warning(tmp_path, caplog):
    # Annotation 2 keeps its square and loses a 2-point polygon; annotation 3 has only a 2-point polygon (which
    # pycocotools would read as a box) and is dropped, from training and from evaluation alike.
    image = np.zeros((40, 60, 3), np.uint8)
    (tmp_path / "train").mkdir()
    Image.fromarray(image).save(tmp_path / "train" / "a.png")
    annotations = [ann(1), ann(2, segmentation=[SQUARE, [30, 30, 35, 35]]), ann(3, segmentation=[[1, 1, 5, 5]])]
    write_file(tmp_path, IMAGES[:1], annotations, CATEGORIES)
    with caplog.at_level(logging.WARNING, logger="coco"):
        dataset = coco.CocoDataset(str(tmp_path), "train")
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 2
    assert re.search(r"instances_train\.json: dropped 2 polygons of fewer than 3 points \(annotations 2, 3\)",
                     messages[0])
    assert "dropped 1 of 3 annotations left with no polygon of 3 or more points" in messages[1]
    assert sorted(dataset.coco.anns) == [1, 2]
    assert dataset.coco.anns[2]["segmentation"] == [SQUARE]
    _, target = dataset[0]
    assert target["masks"].shape == (2, 40, 60)
    expected = np.zeros((40, 60), np.uint8)
    expected[10:20, 10:20] = 1  # the square's pixels, both objects
    for mask in target["masks"]:
        assert mask.dtype == torch.uint8
        np.testing.assert_array_equal(mask.numpy(), expected)


# ----------------------------------------------------------------------------------------------------
# Training batch sampler: orientations that cannot fill a batch


def batches(sampler, count, start=0):
    """The first `count` batches from `start`, failing (not hanging) if the sampler never gives them."""

    def hung(*_):
        raise AssertionError(f"the sampler gave no {count} batches within 30 s: it hangs")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        return list(itertools.islice(iter(sampler), start, start + count))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


THREE_AND_THREE = [2.0, 0.5, 2.0, 0.5, 2.0, 0.5]  # no group of 3 can fill a batch of 4
THIRTEEN_AND_SEVEN = [0.75] * 13 + [1.5] * 7  # the 7 wide ones cannot fill a batch of 8


@pytest.mark.parametrize("ratios, batch_size", [(THREE_AND_THREE, 4), (THIRTEEN_AND_SEVEN, 8),
                                                ([1.0, 0.5, 1.0, 0.5], 4), ([1.3, 0.7] * 6 + [1.0], 3)])
def test_every_image_is_drawn_once_per_epoch(ratios, batch_size):
    n = len(ratios)
    epochs = batch_size  # batch_size epochs of n images are n whole batches
    drawn = batches(coco.TrainingBatchSampler(ratios, batch_size, seed=2), n)
    assert all(len(batch) == batch_size for batch in drawn)
    indices = [index for batch in drawn for index, _ in batch]
    assert np.bincount(indices, minlength=n).tolist() == [epochs] * n
    # In every prefix no image is more than one epoch ahead of another.
    counts = np.zeros(n, int)
    for index in indices:
        counts[index] += 1
        assert counts.max() - counts.min() <= 1


def test_batches_stay_grouped_but_for_at_most_two_an_epoch():
    drawn = batches(coco.TrainingBatchSampler(THIRTEEN_AND_SEVEN, 8, seed=0), 20)  # 8 epochs
    mixed = [batch for batch in drawn if len({THIRTEEN_AND_SEVEN[i] >= 1 for i, _ in batch}) > 1]
    assert len(mixed) <= 2 * 8
    assert len(mixed) < len(drawn)


def test_two_processes_draw_every_image_once_per_epoch():
    n, batch_size = len(THIRTEEN_AND_SEVEN), 4
    # Each process draws 10 images an epoch: 2 epochs are 5 batches of 4.
    ranks = [batches(coco.TrainingBatchSampler(THIRTEEN_AND_SEVEN, batch_size, seed=1, rank=r, world_size=2), 5)
             for r in (0, 1)]
    indices = [index for rank in ranks for batch in rank for index, _ in batch]
    assert np.bincount(indices, minlength=n).tolist() == [2] * n
    first_epoch = [{index for batch in rank[:2] for index, _ in batch} for rank in ranks]
    assert not first_epoch[0] & first_epoch[1]


@pytest.mark.parametrize("ratios, batch_size", [(THREE_AND_THREE, 4), (THIRTEEN_AND_SEVEN, 8)])
@pytest.mark.parametrize("start", [1, 2, 3, 7, 11])
def test_resume_across_mixed_batches_and_epochs(ratios, batch_size, start):
    whole = coco.TrainingBatchSampler(ratios, batch_size, seed=3)
    resumed = coco.TrainingBatchSampler(ratios, batch_size, seed=3, start=start)
    assert batches(resumed, 10) == batches(whole, 10, start=start)
    whole = coco.TrainingBatchSampler(ratios, batch_size // 2, seed=3, rank=1, world_size=2)
    resumed = coco.TrainingBatchSampler(ratios, batch_size // 2, seed=3, rank=1, world_size=2, start=start)
    assert batches(resumed, 10) == batches(whole, 10, start=start)


def test_fewer_images_than_a_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="the data set has 3 images; 1 processes of 4 images a batch need at least 4"):
        coco.TrainingBatchSampler([1.0, 0.5, 1.0], batch_size=4)


# ----------------------------------------------------------------------------------------------------
# The model's target check


def target(labels=None, masks=None):
    mask = torch.zeros((1, 20, 30), dtype=torch.uint8)
    mask[0, 2:8, 3:9] = 1
    return {"boxes": torch.tensor([[3.0, 2.0, 9.0, 8.0]]),
            "labels": torch.tensor([1]) if labels is None else labels,
            "masks": mask if masks is None else masks}


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool, torch.int16])
def test_check_targets_refuses_labels_that_are_not_int64(dtype):
    with pytest.raises(ValueError, match=rf"targets\[0\]\['labels'\] must be .*dtype torch\.int64; got \[1\] "
                                         rf"{re.escape(str(dtype))}"):
        model.check_targets([target(labels=torch.ones(1, dtype=dtype))], [torch.rand(3, 20, 30)], 4)


def test_check_targets_refuses_masks_of_0_and_255():
    masks = target()["masks"] * 255
    match = r"targets\[0\]\['masks'\] must hold 0 and 1 .* from 0 to 255 \(torch\.uint8\)"
    with pytest.raises(ValueError, match=match):
        model.check_targets([target(masks=masks)], [torch.rand(3, 20, 30)], 4)
    with pytest.raises(ValueError, match=r"targets\[0\]\['masks'\] must hold 0 and 1"):
        model.check_targets([target(masks=torch.full((1, 20, 30), float("nan")))], [torch.rand(3, 20, 30)], 4)
    for ok in (target()["masks"], target()["masks"].bool(), target()["masks"].float() * 0.5):
        model.check_targets([target(masks=ok)], [torch.rand(3, 20, 30)], 4)
