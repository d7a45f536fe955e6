"""Tests of coco.py: the COCO-format loader (polygons, RLE, uncompressed RLE, crowds, empty images,
non-contiguous category ids, flips), its error messages, the training batch sampler, the evaluator
(against pycocotools' COCOeval on predictions made from the ground truth) and the command line.

Expected masks are drawn by hand with numpy (or rasterised by pycocotools called here); expected metrics
are those of perfect, shifted or mislabelled predictions."""

import itertools
import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

import coco
import config
import model
import shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------------------
# A small COCO-format data set written by the tests


def random_image(height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_coco(root, split, images, annotations, categories):
    """images: [(info dict, HxWx3 uint8 array or raw bytes)]; writes the PNGs and the annotation file."""
    os.makedirs(root / split, exist_ok=True)
    os.makedirs(root / "annotations", exist_ok=True)
    for info, pixels in images:
        path = root / split / info["file_name"]
        if isinstance(pixels, bytes):
            path.write_bytes(pixels)
        else:
            Image.fromarray(pixels).save(path)
    data = {"images": [info for info, _ in images], "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


def compressed_rle(mask):
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def mask_bbox(mask):
    """[x, y, w, h] of a mask's pixels, by numpy."""
    rows, cols = np.nonzero(mask)
    return [float(cols.min()), float(rows.min()), float(cols.max() - cols.min() + 1),
            float(rows.max() - rows.min() + 1)]


# Category ids 3, 7 and 12, listed out of order: labels must be 1, 2, 3 in sorted id order.
CATEGORIES = [{"id": 12, "name": "twelve"}, {"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]

# Image 1 (20 wide, 12 high): a two-part polygon (category 7), an L-shaped compressed RLE (category 3)
# and a crowd region (category 12, uncompressed RLE).
WIDE_H, WIDE_W = 12, 20
# Integer-cornered rectangles: pycocotools fills the pixels x in [x0, x1), y in [y0, y1).
POLYGONS = [[2, 6, 8, 6, 8, 10, 2, 10], [10, 9, 13, 9, 13, 11, 10, 11]]
L_SHAPE = np.zeros((WIDE_H, WIDE_W), np.uint8)
L_SHAPE[1:5, 1:3] = 1
L_SHAPE[3:5, 3:7] = 1
CROWD = np.zeros((WIDE_H, WIDE_W), np.uint8)
CROWD[0:5, 12:18] = 1
# 12 empty columns (144 zeros), then 6 columns of 5 ones and 7 zeros, the last zeros running on through 2 more columns.
CROWD_COUNTS = [144, 5, 7, 5, 7, 5, 7, 5, 7, 5, 7, 5, 7 + 24]

# Image 2 (10 wide, 16 high): a 4x3 rectangle as uncompressed RLE (category 12), and a degenerate annotation.
TALL_H, TALL_W = 16, 10
RECT = np.zeros((TALL_H, TALL_W), np.uint8)
RECT[2:6, 1:4] = 1
# Column-major runs by hand, starting with zeros: column 0 (16) + rows 0-1 of column 1 (2) = 18 zeros, 4 ones,
# rows 6-15 of column 1 and 0-1 of column 2 (12 zeros), 4 ones, 12 zeros, 4 ones, then 10 + 6 columns of 16.
RECT_COUNTS = [18, 4, 12, 4, 12, 4, 106]


def annotations():
    return [
        {"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 0, "area": 30.0, "bbox": [2, 6, 11, 5],
         "segmentation": POLYGONS},
        {"id": 2, "image_id": 1, "category_id": 3, "iscrowd": 0, "area": float(L_SHAPE.sum()),
         "bbox": mask_bbox(L_SHAPE), "segmentation": compressed_rle(L_SHAPE)},
        {"id": 3, "image_id": 1, "category_id": 12, "iscrowd": 1, "area": float(CROWD.sum()),
         "bbox": [12, 0, 6, 5], "segmentation": {"size": [WIDE_H, WIDE_W], "counts": CROWD_COUNTS}},
        {"id": 4, "image_id": 2, "category_id": 12, "iscrowd": 0, "area": 12.0, "bbox": [1, 2, 3, 4],
         "segmentation": {"size": [TALL_H, TALL_W], "counts": RECT_COUNTS}},
        {"id": 5, "image_id": 2, "category_id": 3, "iscrowd": 0, "area": 0.0, "bbox": [3, 3, 0, 5],
         "segmentation": [[3, 3, 3, 8, 3, 8]]},
    ]


IMAGES = [
    ({"id": 1, "file_name": "wide.png", "height": WIDE_H, "width": WIDE_W}, random_image(WIDE_H, WIDE_W, 1)),
    ({"id": 2, "file_name": "tall.png", "height": TALL_H, "width": TALL_W}, random_image(TALL_H, TALL_W, 2)),
    ({"id": 3, "file_name": "empty.png", "height": 8, "width": 8}, random_image(8, 8, 3)),  # no annotations
]


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    write_coco(root, "val", IMAGES, annotations(), CATEGORIES)
    return root


def polygon_mask():
    expected = np.zeros((WIDE_H, WIDE_W), np.uint8)
    expected[6:10, 2:8] = 1
    expected[9:11, 10:13] = 1
    return expected


# ----------------------------------------------------------------------------------------------------
# Loader


def test_hand_made_uncompressed_rle():
    # The crowd's uncompressed RLE above (12 empty columns, 6 columns of 5 ones, 2 empty columns) is CROWD.
    for counts, mask in ((CROWD_COUNTS, CROWD), (RECT_COUNTS, RECT)):
        height, width = mask.shape
        assert sum(counts) == height * width
        decoded = coco_mask.decode(coco_mask.frPyObjects({"size": [height, width], "counts": counts}, height, width))
        np.testing.assert_array_equal(decoded, mask)


def test_labels_are_contiguous_in_sorted_category_order(data, caplog):
    with caplog.at_level(logging.WARNING, logger="coco"):
        dataset = coco.CocoDataset(str(data), "val")
    assert dataset.category_ids == [3, 7, 12]
    assert dataset.label_to_category == {1: 3, 2: 7, 3: 12}
    assert dataset.category_to_label == {3: 1, 7: 2, 12: 3}
    assert dataset.num_classes == 4
    assert dataset.class_names == ["__background__", "three", "seven", "twelve"]
    assert len(dataset) == 3 and dataset.image_ids == [1, 2, 3]
    assert dataset.aspect_ratios == [WIDE_W / WIDE_H, TALL_W / TALL_H, 1.0]
    # The degenerate annotation (box width 0) is dropped, with one warning that counts it.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "dropped 1 of 5 annotations" in warnings[0].getMessage()
    assert str(data / "annotations" / "instances_val.json") in warnings[0].getMessage()

    _, target = dataset[0]
    assert target["labels"].dtype == torch.int64
    assert target["labels"].tolist() == [2, 1]  # categories 7 and 3
    _, target = dataset[1]
    assert target["labels"].tolist() == [3]  # category 12; the degenerate category-3 object is gone
    assert [dataset.label_to_category[label] for label in target["labels"].tolist()] == [12]


def test_labels_can_be_the_category_ids(data):
    dataset = coco.CocoDataset(str(data), "val", labels_are_category_ids=True)
    assert dataset.num_classes == 13
    assert dataset.label_to_category == {3: 3, 7: 7, 12: 12}
    assert dataset.class_names[3] == "three" and dataset.class_names[7] == "seven"
    assert dataset.class_names[12] == "twelve" and dataset.class_names[1] == "N/A"
    assert dataset[0][1]["labels"].tolist() == [7, 3]
    assert dataset[1][1]["labels"].tolist() == [12]


def test_items_have_the_drawn_masks_boxes_and_image(data):
    dataset = coco.CocoDataset(str(data), "val")
    image, target = dataset[0]
    assert image.shape == (3, WIDE_H, WIDE_W) and image.dtype == torch.float32
    assert float(image.min()) >= 0 and float(image.max()) <= 1
    expected_image = torch.from_numpy(IMAGES[0][1].astype(np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(image, expected_image, rtol=0, atol=1e-6)
    assert target["image_id"] == 1

    masks = target["masks"]
    assert masks.dtype == torch.uint8 and masks.shape == (2, WIDE_H, WIDE_W)
    # Polygons: the pixel set of the two rectangles, and pycocotools' own rasterisation.
    np.testing.assert_array_equal(masks[0].numpy(), polygon_mask())
    reference = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(POLYGONS, WIDE_H, WIDE_W)))
    np.testing.assert_array_equal(masks[0].numpy(), reference)
    np.testing.assert_array_equal(masks[1].numpy(), L_SHAPE)  # compressed RLE
    # Boxes: xyxy from the bbox.
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 6.0, 13.0, 11.0], [1.0, 1.0, 7.0, 5.0]]))
    assert target["boxes"].dtype == torch.float32
    # The crowd region is not an object.
    torch.testing.assert_close(target["crowd_boxes"], torch.tensor([[12.0, 0.0, 18.0, 5.0]]))
    assert not any(torch.equal(box, target["crowd_boxes"][0]) for box in target["boxes"])

    image, target = dataset[1]  # taller than wide
    assert image.shape == (3, TALL_H, TALL_W)
    torch.testing.assert_close(image, torch.from_numpy(IMAGES[1][1] / 255.0).permute(2, 0, 1).float(),
                               rtol=0, atol=1e-6)
    assert target["masks"].shape == (1, TALL_H, TALL_W)
    np.testing.assert_array_equal(target["masks"][0].numpy(), RECT)  # uncompressed RLE
    torch.testing.assert_close(target["boxes"], torch.tensor([[1.0, 2.0, 4.0, 6.0]]))
    assert target["crowd_boxes"].shape == (0, 4)


def test_image_without_annotations_is_a_negative(data):
    dataset = coco.CocoDataset(str(data), "val")
    for flip in (False, True):
        image, target = dataset[2, flip]
        assert image.shape == (3, 8, 8)
        assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
        assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
        assert target["masks"].shape == (0, 8, 8)
        assert target["crowd_boxes"].shape == (0, 4)
        assert target["image_id"] == 3


@pytest.mark.parametrize("index", [0, 1])
def test_flipped_item_is_the_mirror(data, index):
    dataset = coco.CocoDataset(str(data), "val")
    image, target = dataset[index]
    flipped, flipped_target = dataset[index, True]
    width = image.shape[2]
    assert torch.equal(flipped, image.flip(2))
    assert torch.equal(flipped_target["masks"], target["masks"].flip(2))
    assert torch.equal(flipped_target["labels"], target["labels"])
    boxes = target["boxes"]
    expected = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    torch.testing.assert_close(flipped_target["boxes"], expected)
    crowd = target["crowd_boxes"]
    expected_crowd = torch.stack([width - crowd[:, 2], crowd[:, 1], width - crowd[:, 0], crowd[:, 3]], dim=1)
    torch.testing.assert_close(flipped_target["crowd_boxes"], expected_crowd)
    # Flipped boxes still hold their flipped masks exactly (x1 is the first column, x2 one past the last).
    for box, mask in zip(flipped_target["boxes"].tolist(), flipped_target["masks"]):
        cols = torch.nonzero(mask.any(0))[:, 0]
        assert (box[0], box[2]) == (float(cols.min()), float(cols.max() + 1))
    assert (dataset[index, False][0] == image).all()


def test_flip_by_hand(data):
    # The 4x3 rectangle in columns 1-3 of a 10-wide image lands in columns 6-8: box x from 6 to 9.
    _, target = coco.CocoDataset(str(data), "val")[1, True]
    expected = np.zeros((TALL_H, TALL_W), np.uint8)
    expected[2:6, 6:9] = 1
    np.testing.assert_array_equal(target["masks"][0].numpy(), expected)
    torch.testing.assert_close(target["boxes"], torch.tensor([[6.0, 2.0, 9.0, 6.0]]))


def test_boxes_are_clipped_to_the_image(tmp_path):
    info = {"id": 5, "file_name": "a.png", "height": 10, "width": 10}
    mask = np.zeros((10, 10), np.uint8)
    mask[6:10, 7:10] = 1
    ann = {"id": 1, "image_id": 5, "category_id": 1, "iscrowd": 0, "area": 12.0, "bbox": [7, 6, 5, 9],
           "segmentation": compressed_rle(mask)}
    outside = {"id": 2, "image_id": 5, "category_id": 1, "iscrowd": 0, "area": 4.0, "bbox": [12, 1, 2, 2],
               "segmentation": [[12, 1, 14, 1, 14, 3, 12, 3]]}
    write_coco(tmp_path, "train", [(info, random_image(10, 10, 0))], [ann, outside], [{"id": 1, "name": "x"}])
    _, target = coco.CocoDataset(str(tmp_path), "train")[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[7.0, 6.0, 10.0, 10.0]]))
    np.testing.assert_array_equal(target["masks"][0].numpy(), mask)


# ----------------------------------------------------------------------------------------------------
# Errors


def test_missing_annotation_file(tmp_path):
    path = os.path.join(str(tmp_path), "annotations", "instances_val.json")
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        coco.CocoDataset(str(tmp_path), "val")


def test_corrupt_json(tmp_path):
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "instances_val.json"
    path.write_text('{"images": [1, 2')
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*not valid JSON"):
        coco.CocoDataset(str(tmp_path), "val")


def test_json_without_categories(tmp_path):
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "instances_val.json"
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="'categories'") as error:
        coco.CocoDataset(str(tmp_path), "val")
    assert str(path) in str(error.value)


@pytest.mark.parametrize("key, value, message", [
    ("image_id", 99, "image_id 99"),
    ("category_id", 5, "category_id 5"),
])
def test_annotation_with_unknown_reference(tmp_path, key, value, message):
    anns = annotations()
    anns[1][key] = value
    write_coco(tmp_path, "val", IMAGES, anns, CATEGORIES)
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        coco.CocoDataset(str(tmp_path), "val")
    assert "annotation 2" in str(error.value)


def test_unreadable_image_fails_when_loaded(tmp_path):
    images = [IMAGES[0], (IMAGES[1][0], b"this is not a PNG file" * 8)]
    write_coco(tmp_path, "val", images, annotations(), CATEGORIES)
    dataset = coco.CocoDataset(str(tmp_path), "val")  # the index is fine
    dataset[0]
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "val" / "tall.png"))):
        dataset[1]


def test_image_size_differs_from_the_json(tmp_path):
    images = [IMAGES[0], (IMAGES[1][0], random_image(TALL_W, TALL_H, 0))]  # transposed size
    write_coco(tmp_path, "val", images, annotations(), CATEGORIES)
    dataset = coco.CocoDataset(str(tmp_path), "val")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "val" / "tall.png")) + ".*16x10"):
        dataset[1]


def test_missing_image_file(tmp_path):
    write_coco(tmp_path, "val", IMAGES, annotations(), CATEGORIES)
    (tmp_path / "val" / "empty.png").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "val" / "empty.png"))):
        coco.CocoDataset(str(tmp_path), "val")[2]


# ----------------------------------------------------------------------------------------------------
# Training batch sampler

ASPECT_RATIOS = [1.5, 0.5, 1.0, 0.7, 2.0, 0.8, 1.2, 0.6, 1.3, 0.9, 0.99, 1.01]


def batches(sampler, count, start=0):
    return list(itertools.islice(iter(sampler), start, start + count))


def test_batches_are_wide_or_tall_only():
    sampler = coco.TrainingBatchSampler(ASPECT_RATIOS, batch_size=3, seed=0)
    for batch in batches(sampler, 40):
        assert len(batch) == 3
        wide = {ASPECT_RATIOS[index] >= 1 for index, _ in batch}
        assert len(wide) == 1
        assert len({index for index, _ in batch}) == 3


def test_sampler_is_deterministic_and_seeded():
    first = batches(coco.TrainingBatchSampler(ASPECT_RATIOS, 2, seed=5), 30)
    assert first == batches(coco.TrainingBatchSampler(ASPECT_RATIOS, 2, seed=5), 30)
    assert first != batches(coco.TrainingBatchSampler(ASPECT_RATIOS, 2, seed=6), 30)
    # Two iterators of one sampler start over.
    sampler = coco.TrainingBatchSampler(ASPECT_RATIOS, 2, seed=5)
    assert batches(sampler, 10) == batches(sampler, 10)


@pytest.mark.parametrize("start", [1, 5, 17])
def test_sampler_resumes_at_start(start):
    whole = coco.TrainingBatchSampler(ASPECT_RATIOS, 2, seed=3, rank=1, world_size=2)
    resumed = coco.TrainingBatchSampler(ASPECT_RATIOS, 2, seed=3, rank=1, world_size=2, start=start)
    assert batches(resumed, 12) == batches(whole, 12, start=start)


def test_epochs_are_permutations_split_among_ranks():
    n = len(ASPECT_RATIOS)
    # One image a batch: the first n batches of one process are one epoch, every image once.
    alone = batches(coco.TrainingBatchSampler(ASPECT_RATIOS, 1, seed=1), n)
    assert sorted(index for [(index, _)] in alone) == list(range(n))
    # Two processes: their first epochs (n / 2 batches each) are disjoint and cover the data set.
    ranks = [batches(coco.TrainingBatchSampler(ASPECT_RATIOS, 1, seed=1, rank=r, world_size=2), n // 2)
             for r in (0, 1)]
    seen = [{index for [(index, _)] in rank} for rank in ranks]
    assert len(seen[0]) == len(seen[1]) == n // 2
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(n))
    # With batches of two (all images wide, so no leftovers), the same holds.
    square = [1.0] * 8
    ranks = [batches(coco.TrainingBatchSampler(square, 2, seed=4, rank=r, world_size=2), 2) for r in (0, 1)]
    seen = [[index for batch in rank for index, _ in batch] for rank in ranks]
    assert len(set(seen[0])) == len(set(seen[1])) == 4
    assert not set(seen[0]) & set(seen[1])


def test_flips():
    flips = [flip for batch in batches(coco.TrainingBatchSampler(ASPECT_RATIOS, 2, seed=0, hflip=True), 40)
             for _, flip in batch]
    assert set(flips) == {True, False}
    assert all(isinstance(flip, bool) for flip in flips)
    no_flips = batches(coco.TrainingBatchSampler(ASPECT_RATIOS, 2, seed=0, hflip=False), 40)
    assert all(flip is False for batch in no_flips for _, flip in batch)
    # hflip changes nothing but the flags.
    with_flips = batches(coco.TrainingBatchSampler(ASPECT_RATIOS, 2, seed=0, hflip=True), 40)
    assert [[i for i, _ in b] for b in with_flips] == [[i for i, _ in b] for b in no_flips]


def test_too_few_images_for_the_batch():
    with pytest.raises(ValueError, match="at least 4"):
        coco.TrainingBatchSampler([1.0, 1.0, 0.5], batch_size=2, world_size=2)
    coco.TrainingBatchSampler([1.0, 1.0, 0.5, 0.5], batch_size=2, world_size=2)  # just enough


# ----------------------------------------------------------------------------------------------------
# Evaluation


def rectangle(height, width, y0, y1, x0, x1):
    mask = np.zeros((height, width), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def disk(height, width, cy, cx, r):
    ys, xs = np.mgrid[0:height, 0:width]
    return ((ys - cy) ** 2 + (xs - cx) ** 2 <= r * r).astype(np.uint8)


@pytest.fixture
def eval_data(tmp_path):
    """Three images (one wider than high, one higher than wide), objects of categories 3, 7 and 12."""
    root = tmp_path / "eval"
    sizes = {1: (32, 48), 2: (44, 30), 3: (36, 36)}
    objects = {
        1: [(3, rectangle(32, 48, 4, 18, 5, 20)), (12, disk(32, 48, 20, 34, 8)), (7, rectangle(32, 48, 20, 30, 2, 14))],
        2: [(7, disk(44, 30, 14, 15, 9)), (7, rectangle(44, 30, 28, 42, 4, 26))],
        3: [(12, rectangle(36, 36, 3, 15, 3, 33)), (3, disk(36, 36, 25, 18, 7))],
    }
    images, anns = [], []
    for image_id, (height, width) in sizes.items():
        images.append(({"id": image_id, "file_name": f"{image_id}.png", "height": height, "width": width},
                       random_image(height, width, image_id)))
        for category, mask in objects[image_id]:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": category, "iscrowd": 0,
                         "area": float(mask.sum()), "bbox": mask_bbox(mask), "segmentation": compressed_rle(mask)})
    write_coco(root, "val", images, anns, CATEGORIES)
    return root


# COCOeval's precision is tp / (tp + fp + eps): perfect is 1 up to rounding.
PERFECT = pytest.approx(1.0, abs=1e-9)


def gt_predictions(dataset, shift=0, categories=None):
    """COCO results from the ground truth itself, optionally shifted right and down or relabelled."""
    results = []
    for ann in dataset.coco.dataset["annotations"]:
        info = dataset.coco.imgs[ann["image_id"]]
        mask = coco_mask.decode({**ann["segmentation"], "counts": ann["segmentation"]["counts"].encode("ascii")})
        shifted = np.zeros_like(mask)
        shifted[shift:, shift:] = mask[: info["height"] - shift, : info["width"] - shift]
        x, y, w, h = ann["bbox"]
        category = ann["category_id"] if categories is None else categories[ann["category_id"]]
        results.append({"image_id": ann["image_id"], "category_id": category, "bbox": [x + shift, y + shift, w, h],
                        "score": 1.0, "segmentation": compressed_rle(shifted)})
    return results


def test_metrics_of_the_ground_truth_are_perfect(eval_data):
    dataset = coco.CocoDataset(str(eval_data), "val")
    metrics, table = coco.coco_metrics(dataset.coco, gt_predictions(dataset), dataset.image_ids)
    for kind in ("bbox", "segm"):
        assert set(metrics[kind]) == set(coco.STAT_NAMES)
        for name in ("AP", "AP50", "AP75", "AR100"):
            assert metrics[kind][name] == PERFECT, (kind, name)
        assert kind in table


def test_shifted_predictions_score_lower(eval_data):
    dataset = coco.CocoDataset(str(eval_data), "val")
    metrics, _ = coco.coco_metrics(dataset.coco, gt_predictions(dataset, shift=2), dataset.image_ids)
    for kind in ("bbox", "segm"):
        assert 0.0 < metrics[kind]["AP"] < 1.0
        assert metrics[kind]["AP75"] < metrics[kind]["AP50"]  # a 2-pixel shift still overlaps by half


def test_wrong_categories_score_zero(eval_data):
    dataset = coco.CocoDataset(str(eval_data), "val")
    results = gt_predictions(dataset, categories={3: 7, 7: 12, 12: 3})
    metrics, _ = coco.coco_metrics(dataset.coco, results, dataset.image_ids)
    for kind in ("bbox", "segm"):
        assert metrics[kind]["AP"] == 0.0 and metrics[kind]["AP50"] == 0.0


def test_no_detections(eval_data):
    dataset = coco.CocoDataset(str(eval_data), "val")
    metrics, table = coco.coco_metrics(dataset.coco, [], dataset.image_ids)
    kinds = ("bbox", "segm") + (("boundary",) if coco.faster_coco_eval is not None else ())
    assert metrics == {kind: dict.fromkeys(coco.STAT_NAMES, 0.0) for kind in kinds}
    assert "no detections" in table


def test_metrics_on_some_images_only(eval_data):
    # Perfect predictions on image 1 only: perfect when the evaluation is limited to image 1.
    dataset = coco.CocoDataset(str(eval_data), "val")
    results = [r for r in gt_predictions(dataset) if r["image_id"] == 1]
    metrics, _ = coco.coco_metrics(dataset.coco, results, [1])
    assert metrics["bbox"]["AP"] == PERFECT and metrics["segm"]["AP"] == PERFECT
    metrics, _ = coco.coco_metrics(dataset.coco, results, dataset.image_ids)
    assert metrics["bbox"]["AP"] < 0.9 and metrics["segm"]["AP"] < 0.9


class Oracle(torch.nn.Module):
    """Returns each image's ground truth (from the data set, matched by content) as detections."""

    def __init__(self, dataset):
        super().__init__()
        self.config = config.ShapesConfig()
        self.items = [dataset[i] for i in range(len(dataset))]
        self.calls = []

    def forward(self, images):
        assert not self.training
        self.calls.append(len(images))
        outputs = []
        for image in images:
            [target] = [t for im, t in self.items if im.shape == image.shape and torch.equal(im, image)]
            k = len(target["labels"])
            outputs.append({"boxes": target["boxes"].clone(), "labels": target["labels"].clone(),
                            "scores": torch.ones(k), "masks": target["masks"][:, None].float()})
        return outputs


def test_evaluate_an_oracle_end_to_end(eval_data):
    dataset = coco.CocoDataset(str(eval_data), "val")
    oracle = Oracle(dataset)
    oracle.train()
    metrics, table, results = coco.evaluate(oracle, dataset, batch_size=2, progress=False)
    assert oracle.training  # back in the mode it was in
    assert oracle.calls == [2, 1]
    for kind in ("bbox", "segm"):
        assert metrics[kind]["AP"] == PERFECT and metrics[kind]["AP75"] == PERFECT, table
    # The results are COCO's: original category ids, xywh boxes, RLE that pycocotools decodes to the masks.
    assert len(results) == len(dataset.coco.dataset["annotations"])
    expected = sorted((a["image_id"], a["category_id"], tuple(a["bbox"])) for a in dataset.coco.dataset["annotations"])
    assert sorted((r["image_id"], r["category_id"], tuple(r["bbox"])) for r in results) == expected
    for result in results:
        assert isinstance(result["segmentation"]["counts"], str)
        info = dataset.coco.imgs[result["image_id"]]
        assert list(result["segmentation"]["size"]) == [info["height"], info["width"]]
        assert result["score"] == 1.0
    json.dumps(results)  # JSON-friendly


def test_evaluate_with_category_id_labels_and_a_limit(eval_data):
    dataset = coco.CocoDataset(str(eval_data), "val", labels_are_category_ids=True)
    oracle = Oracle(dataset).eval()
    metrics, _, results = coco.evaluate(oracle, dataset, batch_size=8, limit=1, progress=False)
    assert not oracle.training
    assert oracle.calls == [1]
    assert {r["image_id"] for r in results} == {1}
    assert metrics["segm"]["AP"] == PERFECT  # scored on the first image only


# ----------------------------------------------------------------------------------------------------
# Command line


def test_evaluate_command_line(tmp_path):
    data = tmp_path / "shapes"
    shapes.generate(str(data), train=4, val=4, size=64)
    cfg = config.ShapesConfig(IMAGE_MIN_DIM=64, IMAGE_MAX_DIM=64, IMAGE_MIN_DIM_TRAIN=(64,), FPN_CHANNELS=16,
                              BOX_HEAD_DIM=32, MASK_HEAD_CHANNELS=16)
    torch.manual_seed(0)
    net = model.MaskRCNN(cfg)
    weights = tmp_path / "ckpt.pth"
    torch.save({"model": net.state_dict(), "config": cfg.to_dict(), "iteration": 0}, weights)
    out = tmp_path / "m.json"
    detections = tmp_path / "d.json"
    result = subprocess.run(
        [sys.executable, "coco.py", "evaluate", "--config", "shapes", "--data", str(data), "--weights", str(weights),
         "--out", str(out), "--detections", str(detections), "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(out.read_text())
    for kind in ("bbox", "segm"):
        assert list(metrics[kind]) == list(coco.STAT_NAMES)
        assert all(isinstance(v, float) for v in metrics[kind].values())
    assert metrics["split"] == "val" and metrics["images"] == 4
    assert metrics["weights"] == str(weights)
    results = json.loads(detections.read_text())
    assert isinstance(results, list)
    gt = COCO(str(data / "annotations" / "instances_val.json")) if results else None
    for r in results:
        assert r["image_id"] in gt.imgs and r["category_id"] in gt.cats
    assert f"metrics written to {out}" in result.stdout
