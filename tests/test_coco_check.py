"""Tests of `python coco.py check` (data set summary and every problem, exit code) and of the per-class
evaluation of `python coco.py evaluate` (AP per class, confusion matrix, precision-recall curves, --max-dets).

Oracles: small data sets written here whose counts, sizes and box sizes are known by construction; broken
copies of them, one fault each, whose file and annotation id must appear in the report; the loader's own
exceptions (the same messages); per-class AP worked out by hand from COCO's 101-point interpolated
precision; confusion-matrix counts of a constructed case counted by hand.
"""

import json
import math
import os
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
# A small data set: train has 3 images (40x30, 30x50, 20x20 as width x height) with 2, 1 and 0 objects,
# val one 20x20 image with one object.


def square(x, y, side):
    return {"bbox": [x, y, side, side], "segmentation": [[x, y, x + side, y, x + side, y + side, x, y + side]]}


def base_data():
    train = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                   {"id": 2, "file_name": "b.png", "width": 30, "height": 50},
                   {"id": 3, "file_name": "c.png", "width": 20, "height": 20}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 100.0, **square(2, 2, 10)},
                        {"id": 2, "image_id": 1, "category_id": 2, "iscrowd": 0, "area": 64.0, **square(20, 10, 8)},
                        {"id": 3, "image_id": 2, "category_id": 1, "iscrowd": 0, "area": 400.0, **square(0, 0, 20)}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    val = {"images": [{"id": 1, "file_name": "v.png", "width": 20, "height": 20}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "iscrowd": 0, "area": 25.0, **square(5, 5, 5)}],
           "categories": train["categories"]}
    return {"train": train, "val": val}


def write_data(root, datasets):
    for split, data in datasets.items():
        os.makedirs(root / split, exist_ok=True)
        os.makedirs(root / "annotations", exist_ok=True)
        for info in data["images"]:
            pixels = np.zeros((info["height"], info["width"], 3), np.uint8)
            Image.fromarray(pixels).save(root / split / info["file_name"])
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def check(capsys, root, *args):
    code = coco.main(["check", "--data", str(root), *args])
    return code, capsys.readouterr().out


def test_summary_of_a_clean_data_set(tmp_path, capsys):
    root = write_data(tmp_path, base_data())
    code, out = check(capsys, root)
    assert code == 0, out
    assert "0 errors, 0 warnings in train, val" in out
    lines = out.splitlines()
    assert lines[lines.index("objects per class:") + 2].split() == ["1", "cat", "2", "0"]
    assert lines[lines.index("objects per class:") + 3].split() == ["2", "dog", "1", "1"]
    assert "train: 3 images, 3 objects" in out and "val: 1 images, 1 objects" in out
    assert "image width: min 20, median 30, max 40" in out
    assert "image height: min 20, median 30, max 50" in out
    assert "objects per image: min 0, median 1, max 2, 1 images without any" in out
    code, out = check(capsys, root, "--split", "val")
    assert code == 0 and "train" not in out and "val: 1 images" in out


def test_box_size_bins_by_hand():
    bins = coco.box_size_bins((16, 32, 64, 128, 256))
    edges = [8, math.sqrt(16 * 32), math.sqrt(32 * 64), math.sqrt(64 * 128), math.sqrt(128 * 256), 512]
    assert [low for _, low, _ in bins] == pytest.approx([0, *edges])
    assert [high for _, _, high in bins] == pytest.approx([*edges, math.inf])
    assert [name for name, _, _ in bins] == ["below P2/2", "P2 (16)", "P3 (32)", "P4 (64)", "P5 (128)", "P6 (256)",
                                             "above P6x2"]


def test_box_size_histogram_at_the_network_input_size():
    # One 100x100 image resized to 200x200 (scale 2): sqrt(w * h) of 6, 20, 24, 80 and 200 pixels there.
    boxes = [(3, 3), (10, 10), (12, 12), (20, 80), (100, 100)]
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 100}],
            "annotations": [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, w, h]}
                            for k, (w, h) in enumerate(boxes)],
            "categories": [{"id": 1, "name": "thing"}]}
    cfg = config.ShapesConfig(IMAGE_MIN_DIM=200, IMAGE_MAX_DIM=200)
    lines = coco.data_summary({"train": data}, cfg).splitlines()
    start = next(i for i, line in enumerate(lines) if "box sizes" in line) + 1
    counts = [int(line.split()[-2]) if line.split()[-1].startswith("#") else int(line.split()[-1])
              for line in lines[start : start + 7]]
    assert counts == [1, 1, 1, 1, 0, 1, 0]  # below 8, P2 [8, 22.6), P3, P4, P5, P6 [181, 512), above


# ----------------------------------------------------------------------------------------------------
# Broken data sets: one fault each


def break_image(root, how):
    path = root / "train" / "b.png"
    if how == "missing":
        path.unlink()
    elif how == "undecodable":
        path.write_bytes(b"not an image at all" * 10)
    else:
        Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(path)  # width and height swapped


@pytest.mark.parametrize("how, code, message", [
    ("missing", "missing-image", "image file not found"),
    ("undecodable", "bad-image-file", "cannot read image"),
    ("size", "size-mismatch", "is 50x30 (WxH) but"),
])
def test_image_faults_are_errors_with_the_loaders_message(tmp_path, capsys, how, code, message):
    root = write_data(tmp_path, base_data())
    break_image(root, how)
    exit_code, out = check(capsys, root)
    assert exit_code == 1
    path = str(root / "train" / "b.png")
    [line] = [line for line in out.splitlines() if line.startswith("error")]
    assert line.startswith(f"error [{code}] {path}: image 2: ") and message in line
    # The training loader raises the same message when it reads the image.
    dataset = coco.CocoDataset(str(root), "train")
    with pytest.raises((FileNotFoundError, ValueError)) as error:
        dataset[1]
    assert line.endswith(str(error.value))


def set_annotation(data, annotation_id, **changes):
    next(a for a in data["train"]["annotations"] if a["id"] == annotation_id).update(changes)
    return data


def add_short_polygon(data):
    data["train"]["annotations"][0]["segmentation"].append([1, 1, 3, 3])
    return data


def duplicate_image_id(data):
    data["train"]["images"][2]["id"] = 1
    return data


ANNOTATION_FAULTS = [  # (make the fault, level, code, annotation id or None, words of the message)
    (lambda d: set_annotation(d, 2, category_id=9), "error", "unknown-category", 2, "category_id 9"),
    (lambda d: set_annotation(d, 3, id=2), "error", "duplicate-id", 2, "annotation id 2 is used by more than one"),
    (duplicate_image_id, "error", "duplicate-id", None, "image id 1 is used by more than one image"),
    (lambda d: set_annotation(d, 3, bbox=[5, 5, 0, 10]), "warning", "empty-box", 3, "no width or height"),
    (add_short_polygon, "warning", "short-polygon", 1, "segmentation[1] has fewer than 3 points"),
]


@pytest.mark.parametrize("fault, level, code, annotation_id, message", ANNOTATION_FAULTS)
def test_annotation_faults_name_the_file_and_annotation(tmp_path, capsys, fault, level, code, annotation_id, message):
    root = write_data(tmp_path, fault(base_data()))
    exit_code, out = check(capsys, root)
    annotation_file = str(root / "annotations" / "instances_train.json")
    where = f"annotation {annotation_id}: " if annotation_id is not None else ""
    [line] = [line for line in out.splitlines() if line.startswith(f"{level} [{code}]")]
    assert line.startswith(f"{level} [{code}] {annotation_file}: image ") and where in line and message in line
    assert exit_code == (1 if level == "error" else 0)
    # Warnings (what the loader drops) fail the check with --strict; the loader refuses the errors.
    assert check(capsys, root, "--strict")[0] == 1
    if level == "error":
        with pytest.raises(ValueError, match=message):
            coco.CocoDataset(str(root), "train")


def test_check_command_exit_code(tmp_path):
    root = write_data(tmp_path, base_data())
    run = [sys.executable, "coco.py", "check", "--data", str(root), "--config", "shapes"]
    result = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    break_image(root, "missing")
    result = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and str(root / "train" / "b.png") in result.stdout


def test_unreadable_annotation_file_is_one_error(tmp_path, capsys):
    root = write_data(tmp_path, base_data())
    (root / "annotations" / "instances_val.json").write_text("{not json")
    code, out = check(capsys, root)
    assert code == 1 and "error [bad-file]" in out and "is not valid JSON" in out
    assert "train: 3 images" in out  # the other split is still summarised


# ----------------------------------------------------------------------------------------------------
# Per-class evaluation: a hand-computed case
#
# One 100x100 image; classes cat (1), dog (2) and bird (3, no ground truth).
# cat: two objects; a perfect prediction of the first (score 0.9) and a prediction on nothing (0.8).
#   Ranked: TP (recall 1/2, precision 1), FP (recall 1/2, precision 1/2). COCO's precision at recall r is
#   the best precision at any recall >= r: 1 for the 51 recall points 0, 0.01, ..., 0.5, and 0 for the 50
#   above (never reached). AP = AP50 = 51 / 101 at every IoU threshold (the match is exact).
# dog: one object [0, 0, 10, 10] and one prediction [0, 0, 10, 16]: IoU 100 / 160 = 0.625, a match at the
#   thresholds 0.5, 0.55 and 0.6 (AP 1 each) and not at the 7 above (AP 0): AP = 3 / 10, AP50 = 1.
# Masks are the boxes filled, so segm gives the same numbers.

CATS = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}]


def box_mask(bbox, height=100, width=100):
    x, y, w, h = bbox
    mask = np.zeros((height, width), np.uint8)
    mask[y : y + h, x : x + w] = 1
    return mask


def rle(mask):
    encoded = coco_mask.encode(np.asfortranarray(mask))
    return {"size": list(encoded["size"]), "counts": encoded["counts"].decode("ascii")}


def ground_truth(objects, images=(1,)):
    """A pycocotools index of [(image id, category id, [x, y, w, h])] on 100x100 images."""
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": 100, "width": 100} for i in images],
        "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": float(b[2] * b[3]),
                         "iscrowd": 0, "segmentation": rle(box_mask(b))} for k, (i, c, b) in enumerate(objects)],
        "categories": CATS}
    gt.createIndex()
    return gt


def prediction(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score,
            "segmentation": rle(box_mask(bbox))}


HAND_GT = [(1, 1, [10, 10, 20, 20]), (1, 1, [50, 50, 20, 20]), (1, 2, [0, 0, 10, 10])]
HAND_PREDICTIONS = [prediction(1, 1, [10, 10, 20, 20], 0.9), prediction(1, 1, [70, 10, 20, 20], 0.8),
                    prediction(1, 2, [0, 0, 10, 16], 0.7)]


def test_per_class_ap_by_hand():
    gt = ground_truth(HAND_GT)
    evaluators = coco.coco_evaluators(gt, HAND_PREDICTIONS)
    names = {c["id"]: c["name"] for c in CATS}
    for kind in ("bbox", "segm"):
        table = coco.per_class_ap(evaluators[kind], names)
        assert list(table) == ["cat", "dog", "bird"]
        assert table["cat"] == {"AP": pytest.approx(51 / 101), "AP50": pytest.approx(51 / 101)}
        assert table["dog"] == {"AP": pytest.approx(3 / 10), "AP50": pytest.approx(1.0)}
        assert table["bird"] == {"AP": None, "AP50": None}
    # score() puts the table into the metrics and the printed table (in %).
    metrics, table, _ = coco.score(gt, HAND_PREDICTIONS)
    assert metrics["per_class"]["segm"]["dog"]["AP"] == pytest.approx(0.3)
    assert metrics["bbox"]["AP"] == pytest.approx((51 / 101 + 3 / 10) / 2)  # COCO's AP: the mean over classes
    # The bbox and segm columns (boundary ones follow where faster-coco-eval is installed).
    assert table.splitlines()[-3].split()[:5] == ["cat", "50.5", "50.5", "50.5", "50.5"]
    assert table.splitlines()[-1].split()[:5] == ["bird", "-", "-", "-", "-"]
    # Without any detection: 0 for the classes with objects, None for the others.
    metrics, _, _ = coco.score(gt, [])
    assert metrics["per_class"]["bbox"] == {"cat": {"AP": 0.0, "AP50": 0.0}, "dog": {"AP": 0.0, "AP50": 0.0},
                                            "bird": {"AP": None, "AP50": None}}


def test_max_dets_limits_the_detections_scored():
    # Two cat objects, both found (scores 0.9 and 0.8): AP 1 with 100 detections an image; with 1 only the
    # first counts, recall 1/2 at precision 1: 51 / 101.
    gt = ground_truth(HAND_GT[:2])
    found = [prediction(1, 1, [10, 10, 20, 20], 0.9), prediction(1, 1, [50, 50, 20, 20], 0.8)]
    names = {c["id"]: c["name"] for c in CATS}
    assert coco.per_class_ap(coco.coco_evaluators(gt, found)["bbox"], names)["cat"]["AP"] == pytest.approx(1.0)
    one = coco.coco_evaluators(gt, found, max_dets=1)["bbox"]
    assert coco.per_class_ap(one, names)["cat"]["AP"] == pytest.approx(51 / 101)


def test_confusion_matrix_by_hand():
    gt = ground_truth([
        (1, 1, [0, 0, 20, 20]), (1, 1, [40, 0, 20, 20]), (1, 2, [0, 50, 20, 20]),  # image 1: cat, cat, dog
        (2, 2, [10, 10, 30, 30]),  # image 2: dog
        (3, 1, [50, 50, 10, 10]), (3, 2, [52, 50, 10, 10]),  # image 3: a cat and a dog overlapping
    ], images=(1, 2, 3))
    results = [
        prediction(1, 1, [0, 0, 20, 20], 0.9),  # the first cat, as cat: [cat, cat]
        prediction(1, 2, [41, 0, 20, 20], 0.8),  # the second cat, as dog: [cat, dog]
        prediction(1, 1, [80, 80, 15, 15], 0.7),  # nothing there: [background, cat]
        prediction(1, 2, [0, 50, 20, 20], 0.3),  # the dog, below min_score: ignored, so [dog, background]
        prediction(2, 2, [10, 10, 30, 30], 0.9),  # the dog: [dog, dog]
        prediction(2, 2, [11, 10, 30, 30], 0.8),  # the same dog again, taken already: [background, dog]
        # Box IoU 1 with the dog and 80 / 120 with the cat: the best one wins, [dog, cat]; the cat is
        # then left: [cat, background].
        prediction(3, 1, [52, 50, 10, 10], 0.9),
    ]
    matrix = coco.confusion_matrix(gt, results, iou=0.5, min_score=0.5)
    #                      predicted cat, dog, background
    expected = np.array([[1, 1, 1],  # true cat
                         [1, 1, 1],  # true dog
                         [1, 1, 0],  # background
                         ])
    # bird (3) has neither objects nor predictions: its row and column are zeros, before the background.
    assert matrix.tolist() == np.insert(np.insert(expected, 2, 0, axis=0), 2, 0, axis=1).tolist()
    # A prediction whose best IoU is below the threshold is background: at 0.95 the dog predicted on the second
    # cat (IoU 380 / 420 = 0.905) is [background, dog], and that cat [cat, background].
    strict = coco.confusion_matrix(gt, results, iou=0.95, min_score=0.5)
    assert strict[[0, 1, 3]][:, [0, 1, 3]].tolist() == [[1, 0, 2], [1, 1, 1], [1, 2, 0]]
    table = coco.confusion_table(matrix, ["cat", "dog", "bird", "background"]).splitlines()
    assert table[1].split() == ["cat", "1", "1", "0", "1"]


def test_evaluate_writes_the_per_class_table_and_pictures(tmp_path, capsys):
    data = tmp_path / "shapes"
    shapes.generate(str(data), train=2, val=3, size=64)
    cfg = config.ShapesConfig(IMAGE_MIN_DIM=64, IMAGE_MAX_DIM=64, IMAGE_MIN_DIM_TRAIN=(64,), FPN_CHANNELS=16,
                              BOX_HEAD_DIM=32, MASK_HEAD_CHANNELS=16, DETECTION_MIN_CONFIDENCE=0.0)
    torch.manual_seed(0)
    weights = tmp_path / "ckpt.pth"
    torch.save({"model": model.MaskRCNN(cfg).state_dict(), "config": cfg.to_dict(), "iteration": 0}, weights)
    out = tmp_path / "eval" / "m.json"
    coco.main(["evaluate", "--config", "shapes", "--data", str(data), "--weights", str(weights), "--out", str(out),
               "--device", "cpu", "--max-dets", "20", "--min-score", "0.0"])
    printed = capsys.readouterr().out
    metrics = json.loads(out.read_text())
    for kind in ("bbox", "segm"):
        assert list(metrics["per_class"][kind]) == list(shapes.CLASSES)
        for row in metrics["per_class"][kind].values():
            assert set(row) == {"AP", "AP50"} and all(v is None or 0 <= v <= 1 for v in row.values())
    for name in ("m_confusion.png", "m_pr_bbox.png", "m_pr_segm.png"):
        with Image.open(tmp_path / "eval" / name) as picture:
            assert picture.format == "PNG" and min(picture.size) > 100
    # Every ground-truth object is in its class's row of the confusion matrix, matched or not.
    gt = json.loads((data / "annotations" / "instances_val.json").read_text())
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("confusion matrix")) + 2
    for k, name in enumerate(shapes.CLASSES):
        row = lines[start + k].split()
        assert row[0] == name
        assert sum(map(int, row[1:])) == sum(a["category_id"] == k + 1 for a in gt["annotations"])
    assert "per class (%):" in printed


def test_evaluate_scores_a_results_file_without_a_model(tmp_path):
    # detect.py --data writes detections.json with the data set's ids; evaluate --results scores it. The
    # hand case above gives bbox AP (51/101 + 3/10) / 2 and the same per class.
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val").mkdir()
    gt = ground_truth(HAND_GT)
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(gt.dataset))
    results = tmp_path / "detections.json"
    results.write_text(json.dumps(HAND_PREDICTIONS))
    out = tmp_path / "eval.json"
    args = ["evaluate", "--config", "coco", "--data", str(tmp_path), "--split", "val", "--out", str(out)]
    coco.main([*args, "--results", str(results)])
    metrics = json.loads(out.read_text())
    assert metrics["bbox"]["AP"] == pytest.approx((51 / 101 + 3 / 10) / 2)
    assert metrics["per_class"]["segm"]["cat"]["AP"] == pytest.approx(51 / 101)
    assert metrics["results"] == str(results) and "weights" not in metrics
    # An image the annotation file does not have is named, not scored as nothing.
    results.write_text(json.dumps([dict(HAND_PREDICTIONS[0], image_id=7)]))
    with pytest.raises(ValueError, match=r"entry 0 is for image id 7"):
        coco.main([*args, "--results", str(results)])
    with pytest.raises(SystemExit):
        coco.main(args)  # neither --weights nor --results
