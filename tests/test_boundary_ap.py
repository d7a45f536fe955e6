"""Boundary AP (Cheng et al., CVPR 2021) in coco.coco_metrics, computed by faster-coco-eval (skipped
when it is not installed).

Oracle: boundary IoUs computed by hand for a square and the same square shifted by whole pixels, and
the AP those IoUs give at COCO's ten thresholds 0.50, 0.55, ..., 0.95 (one ground truth, one detection:
AP = the fraction of thresholds the IoU reaches); and pycocotools for bbox and segm.
"""

import contextlib
import io

import numpy as np
import pytest
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

import coco

pytest.importorskip("faster_coco_eval")

SIZE = 128  # image side; diagonal 181.02 px, so d = round(0.02 * 181.02) = 4 px


def square(x0, y0=40, side=20):
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[y0 : y0 + side, x0 : x0 + side] = 1
    rle = coco_mask.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle, [float(x0), float(y0), float(side), float(side)]


def ground_truth():
    """One 128x128 image with one 20x20 square at x, y = 40..59."""
    rle, box = square(40)
    dataset = {
        "images": [{"id": 1, "width": SIZE, "height": SIZE, "file_name": "1.png"}],
        "categories": [{"id": 1, "name": "square"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": rle, "bbox": box,
                         "area": 400.0, "iscrowd": 0}],
    }
    gt = COCO()
    gt.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def detection(x0):
    rle, box = square(x0)
    return {"image_id": 1, "category_id": 1, "bbox": box, "score": 0.9, "segmentation": rle}


# Shifted right by s pixels. Mask IoU: (20 - s) 20 / ((20 + s) 20). Boundaries: each square minus its
# 12x12 interior (eroded by d = 4 px), 400 - 144 = 256 px. Their intersection: the 8 rows outside
# the interiors' rows share 20 - s columns; the 12 rows through the interiors share the columns that
# are in both squares and in neither interior (44..55 and 44+s..55+s).
#   s = 1: 8 * 19 + 12 * 6 ({41, 42, 43, 57, 58, 59}) = 224; union 512 - 224 = 288: 7/9 = 0.778;
#          mask IoU 380/420 = 0.905 -> boundary AP at 0.50..0.75 (6 of 10) = 0.6, segm 0.50..0.90 = 0.9.
#   s = 3: 8 * 17 + 12 * 2 ({43, 59}) = 160; union 352: 0.455; mask IoU 340/460 = 0.739
#          -> boundary AP 0, segm 0.50..0.70 (5 of 10) = 0.5.
#   s = 0: every IoU is 1 -> 1.
@pytest.mark.parametrize("shift, segm_ap, boundary_ap", [(0, 1.0, 1.0), (1, 0.9, 0.6), (3, 0.5, 0.0)])
def test_boundary_ap_of_a_shifted_square_by_hand(shift, segm_ap, boundary_ap):
    metrics, table = coco.coco_metrics(ground_truth(), [detection(40 + shift)])
    assert metrics["segm"]["AP"] == pytest.approx(segm_ap, abs=1e-6)
    assert metrics["boundary"]["AP"] == pytest.approx(boundary_ap, abs=1e-6)
    assert metrics["bbox"]["AP"] == pytest.approx(segm_ap, abs=1e-6)  # the boxes overlap as the masks do
    assert "boundary:" in table


def test_boundary_ap_is_never_above_segm_ap_and_keeps_the_other_numbers():
    # min(mask IoU, boundary IoU) <= mask IoU, so Boundary AP <= mask AP; bbox and segm are unchanged.
    gt = ground_truth()
    results = [detection(40 + s) | {"score": 0.9 - 0.1 * s} for s in (1, 2, 3)]
    metrics, _ = coco.coco_metrics(gt, results)
    assert set(metrics) == {"bbox", "segm", "boundary"}
    assert metrics["boundary"]["AP"] <= metrics["segm"]["AP"]
    for kind in ("bbox", "segm"):
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = coco.COCOeval(gt, gt.loadRes(results), kind)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        assert [metrics[kind][name] for name in coco.STAT_NAMES] == pytest.approx(list(evaluator.stats), abs=1e-12)


def test_no_detections_give_zero_boundary_ap():
    metrics, _ = coco.coco_metrics(ground_truth(), [])
    assert metrics["boundary"] == dict.fromkeys(coco.STAT_NAMES, 0.0)
