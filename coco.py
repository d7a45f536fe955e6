"""COCO-format data (pycocotools): the training data set, its batch sampler, evaluation with COCOeval
(bbox, segm, and Boundary AP when faster-coco-eval is installed; overall and per class, confusion
matrix), checking a data set, and importing one from annotation tools.

Layout, as COCO's: <data>/annotations/instances_<split>.json and the images in <data>/<split>/.

    python coco.py evaluate --config coco --data /path/to/coco --weights runs/coco/last.pth [--max-dets 100]
    python coco.py convert --format labelme|via|mask-png --input DIR --out DATA [--val-fraction 0.2] [--seed 0]
    python coco.py check --data DATA [--split S] [--config NAME] [--strict]
"""

import argparse
import collections
import contextlib
import dataclasses
import glob
import io
import itertools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

try:  # optional: Boundary AP (see coco_metrics)
    import faster_coco_eval
except ImportError:
    faster_coco_eval = None

import shapes
import utils

logger = logging.getLogger(__name__)

# COCOeval's 12 summary numbers, in its order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# Category ids are the class indices when labels are the category ids (torchvision's COCO models): the
# classifier then has max id + 1 outputs and the data set a name list as long. The largest public label
# sets have about 1,200 categories (LVIS: 1,203; Open Images: 601), so an id above this bound is a
# mistake (an id from another table, a hash) that would allocate a class list and classifier that size.
MAX_CATEGORY_ID = 10_000

# A box whose [x, y, width, height] reading runs past the image by more than this (pixels) while its
# [x1, y1, x2, y2] reading lies inside is taken for a box written as corners. COCO's own boxes come from
# the polygons and run past the border by rounding only.
XYXY_TOLERANCE = 1.0


############################################################
#  Data set
############################################################


class CocoDataset(torch.utils.data.Dataset):
    """A COCO-format data set.

    Item `i` (or `(i, hflip)` from the training sampler) is (image [3, H, W] float in [0, 1], target)
    with target: boxes [K, 4] float32 (x1, y1, x2, y2), labels [K] int64, masks [K, H, W] uint8,
    crowd_boxes [C, 4] (iscrowd regions: neither objects nor background), image_id.

    Labels are contiguous 1..K in sorted category-id order (`label_to_category` maps them back), or the
    category ids themselves with labels_are_category_ids (torchvision's COCO models). The file is
    checked when loaded (load_coco: check_annotations' errors refuse it, with the file, image and
    annotation ids). Masks stay as polygons or RLE until an item is built. Images without annotations
    are kept (negatives). Objects whose box has no width or height inside the image are dropped, with
    one warning that counts them.
    """

    def __init__(self, root, split, labels_are_category_ids=False):
        self.root, self.split = root, split
        self.annotation_file = os.path.join(root, "annotations", f"instances_{split}.json")
        self.image_dir = os.path.join(root, split)
        self.coco = load_coco(self.annotation_file, labels_are_category_ids)
        self.category_ids = sorted(self.coco.getCatIds())
        if labels_are_category_ids:
            self.label_to_category = {c: c for c in self.category_ids}
        else:
            self.label_to_category = {i + 1: c for i, c in enumerate(self.category_ids)}
        self.category_to_label = {c: label for label, c in self.label_to_category.items()}
        self.num_classes = max(self.label_to_category) + 1
        names = {c["id"]: c.get("name", str(c["id"])) for c in self.coco.loadCats(self.category_ids)}
        self.class_names = ["__background__"] + [
            names.get(self.label_to_category.get(label), "N/A") for label in range(1, self.num_classes)
        ]
        self.image_ids = sorted(self.coco.getImgIds())
        self.objects, self.crowds = {}, {}
        for image_id in self.image_ids:
            info = self.coco.imgs[image_id]
            self.objects[image_id], self.crowds[image_id] = [], []
            for ann in self.coco.imgToAnns.get(image_id, []):
                box = clipped_box(ann, info)  # None: dropped, as load_coco's warning counted
                if box is None:
                    continue
                if ann.get("iscrowd", 0):
                    self.crowds[image_id].append(box)
                else:
                    self.objects[image_id].append((box, ann))
        self.aspect_ratios = [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in self.image_ids]

    def __len__(self):
        return len(self.image_ids)

    def __getitem__(self, key):
        index, hflip = key if isinstance(key, tuple) else (key, False)
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        image = read_image(os.path.join(self.image_dir, info["file_name"]), info, self.annotation_file)
        height, width = info["height"], info["width"]
        objects = self.objects[image_id]
        boxes = torch.tensor([box for box, _ in objects], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.category_to_label[ann["category_id"]] for _, ann in objects], dtype=torch.int64)
        masks = np.zeros((len(objects), height, width), np.uint8)
        for k, (_, ann) in enumerate(objects):
            masks[k] = annotation_mask(ann, height, width)
        crowd_boxes = torch.tensor(self.crowds[image_id], dtype=torch.float32).reshape(-1, 4)
        if hflip:
            image = image[:, ::-1]
            masks = masks[:, :, ::-1]
            boxes, crowd_boxes = flip_boxes(boxes, width), flip_boxes(crowd_boxes, width)
        target = {"boxes": boxes, "labels": labels, "masks": torch.from_numpy(np.ascontiguousarray(masks)),
                  "crowd_boxes": crowd_boxes, "image_id": image_id}
        return utils.image_to_tensor(np.ascontiguousarray(image)), target


class ImageSizeMismatch(ValueError):
    """An image file whose size is not the one its annotation file gives."""


def read_image(path, info: dict, annotation_file: str) -> np.ndarray:
    """The image of an annotation file's image entry `info` (height, width) as HxWx3 uint8 RGB. Raises
    FileNotFoundError (missing) or ValueError (undecodable; ImageSizeMismatch: not info's size), naming
    the file: the loader raises these when it reads the image, and check_images reports them."""
    image = utils.load_image(path)
    height, width = info["height"], info["width"]
    if image.shape[:2] != (height, width):
        raise ImageSizeMismatch(f"image {path} is {image.shape[1]}x{image.shape[0]} (WxH) but {annotation_file} "
                                f"says {width}x{height}")
    return image


def flip_boxes(boxes, width):
    """(x1, y1, x2, y2) boxes of an image of this width, mirrored left to right."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One fault of a COCO annotation file, found by check_annotations.

    level "error": the loader refuses the file. level "warning": the loader drops what it names and
    goes on (an object whose box is empty inside its image, a polygon of fewer than 3 points, an
    object left with no polygon), counting them in one log line per code. `code` is a short name of
    the kind of fault ("duplicate-id", "empty-box", ...), for counting; image_id and annotation_id
    are None where the fault is not tied to one.
    """

    file: str
    image_id: object
    annotation_id: object
    code: str
    message: str
    level: str = "error"

    def where(self) -> str:
        parts = [f"image {self.image_id}" if self.image_id is not None else "",
                 f"annotation {self.annotation_id}" if self.annotation_id is not None else ""]
        return ", ".join(p for p in parts if p)

    def __str__(self):
        where = self.where()
        return f"{self.file}: {where + ': ' if where else ''}{self.message}"


def read_annotation_file(annotation_file) -> dict:
    """The JSON of a COCO instances file, with clear errors for a missing or unreadable file and for
    one without the 'images', 'annotations' and 'categories' lists (nothing else can be checked then)."""
    if not os.path.exists(annotation_file):
        raise FileNotFoundError(f"annotation file not found: {annotation_file}")
    try:
        with open(annotation_file) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"annotation file {annotation_file} is not valid JSON: {error}") from error
    keys = ("images", "annotations", "categories")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in keys):
        got = {k: type(v).__name__ for k, v in data.items()} if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"annotation file {annotation_file} needs 'images', 'annotations' and 'categories' "
                         f"as lists (COCO instances format); got {got}")
    return data


def is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_short_polygon(polygon) -> bool:
    """A polygon of fewer than 3 points (COCO has a few): no area, and pycocotools reads a 4-number one
    as a box."""
    return isinstance(polygon, list) and len(polygon) < 6


def check_annotations(data: dict, annotation_file: str, labels_are_category_ids: bool = False) -> list[Problem]:
    """Every fault of a COCO instances file's contents (`data`, from read_annotation_file), as Problems.

    Errors: image entries without an id, file_name or positive integer height and width; duplicate image,
    category or annotation ids; category ids that are not integers, negative, or (labels_are_category_ids)
    0, the background, or above MAX_CATEGORY_ID; annotations without an id, with an unknown image or
    category, a bbox that is not 4 finite numbers or that looks like [x1, y1, x2, y2] (XYXY_TOLERANCE), or
    a segmentation that pycocotools cannot decode safely (utils.check_polygon, utils.check_rle: finite
    coordinates near the image, RLE runs summing to its size).
    Warnings (the loader drops these): boxes with no width or height inside their image, polygons of
    fewer than 3 points, and objects left with no polygon.
    """
    problems = []

    def add(image_id, annotation_id, code, message, level="error"):
        problems.append(Problem(annotation_file, image_id, annotation_id, code, message, level))

    images = {}
    for image in data["images"]:
        image_id = image.get("id") if isinstance(image, dict) else None
        missing = [k for k in ("id", "file_name", "height", "width") if not isinstance(image, dict) or k not in image]
        if missing:
            add(image_id, None, "bad-image", f"image entry {str(image)[:80]} lacks {', '.join(missing)}")
        elif not all(is_integer(image[k]) and image[k] > 0 for k in ("height", "width")):
            add(image_id, None, "bad-image", f"height and width must be positive integers; got "
                                             f"{image['height']!r} x {image['width']!r}")
        elif image_id in images:
            add(image_id, None, "duplicate-id", f"image id {image_id!r} is used by more than one image")
        else:
            images[image_id] = image

    categories = set()
    for category in data["categories"]:
        category_id = category.get("id") if isinstance(category, dict) else None
        if not is_integer(category_id) or category_id < 0:
            add(None, None, "category-id", f"category {str(category)[:80]}: ids must be integers >= 0; got "
                                           f"{category_id!r}")
        elif labels_are_category_ids and not 1 <= category_id <= MAX_CATEGORY_ID:
            add(None, None, "category-id", f"category id {category_id} cannot be a label: with "
                                           f"LABELS_ARE_CATEGORY_IDS ids must be in 1..{MAX_CATEGORY_ID} "
                                           "(0 is the background); renumber the categories or use "
                                           "LABELS_ARE_CATEGORY_IDS=False")
        elif category_id in categories:
            add(None, None, "duplicate-id", f"category id {category_id} is used by more than one category")
        else:
            categories.add(category_id)

    annotation_ids = set()
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or "id" not in ann:
            add(None, None, "bad-annotation", f"annotation entry {str(ann)[:80]} has no 'id'")
            continue
        ann_id, image_id = ann["id"], ann.get("image_id")
        if ann_id in annotation_ids:
            add(image_id, ann_id, "duplicate-id", f"annotation id {ann_id!r} is used by more than one annotation")
        annotation_ids.add(ann_id)
        if image_id not in images:
            add(image_id, ann_id, "unknown-image", f"refers to image_id {image_id!r}, which is not in 'images'")
            continue
        if ann.get("category_id") not in categories:
            add(image_id, ann_id, "unknown-category",
                f"has category_id {ann.get('category_id')!r}, which is not in 'categories'")
        height, width = images[image_id]["height"], images[image_id]["width"]
        problems += [Problem(annotation_file, image_id, ann_id, code, message, level)
                     for code, message, level in annotation_faults(ann, height, width)]
    return problems


def annotation_faults(ann: dict, height: int, width: int) -> list[tuple[str, str, str]]:
    """The faults of one annotation's bbox and segmentation, in a height x width image, as
    (code, message, level) for check_annotations."""
    faults = []
    bbox = ann.get("bbox")
    # A NaN or an infinity makes the sum non-finite.
    numbers = isinstance(bbox, list) and len(bbox) == 4 and set(map(type, bbox)) <= {int, float}
    if not numbers or not math.isfinite(sum(bbox)):
        faults.append(("bad-bbox", f"needs 'bbox' as [x, y, width, height], 4 finite numbers; got {bbox!r}", "error"))
    else:
        x, y, w, h = bbox
        runs_past = x + w > width + XYXY_TOLERANCE or y + h > height + XYXY_TOLERANCE
        if runs_past and x < w <= width and y < h <= height:
            faults.append(("xyxy-box", f"bbox {bbox} runs past the {width}x{height} image read as COCO's [x, y, "
                                       "width, height] but fits it read as [x1, y1, x2, y2]: write boxes as [x, y, "
                                       "width, height] (and clip those meant to run off the image)", "error"))
        elif clipped_box(ann, {"height": height, "width": width}) is None:
            faults.append(("empty-box", f"bbox {bbox} has no width or height inside the image (dropped)", "warning"))
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, list):
        for j, polygon in enumerate(segmentation):
            if is_short_polygon(polygon):
                faults.append(("short-polygon", f"segmentation[{j}] has fewer than 3 points (dropped)", "warning"))
                continue
            try:
                utils.check_polygon(polygon, height, width, f"segmentation[{j}]")
            except ValueError as error:
                faults.append(("bad-polygon", str(error), "error"))
        if all(is_short_polygon(p) for p in segmentation):
            faults.append(("no-polygon", "has no polygon of 3 or more points (the object is dropped)", "warning"))
    elif isinstance(segmentation, dict):
        try:
            utils.check_rle(segmentation, height, width, "segmentation")
        except ValueError as error:
            faults.append(("bad-rle", str(error), "error"))
    else:
        faults.append(("bad-segmentation", "needs 'segmentation' as polygons [[x1, y1, x2, y2, ...], ...] or RLE "
                                           f"{{'size', 'counts'}}; got {str(segmentation)[:80]}", "error"))
    return faults


def check_images(data: dict, image_dir: str, annotation_file: str, progress: bool = False) -> list[Problem]:
    """The faults of the image files of an annotation file's contents (`data`): each well-formed image
    entry's file (image_dir/file_name) is decoded by read_image, as the loader does, so the messages are
    the loader's. Errors, with the image file as Problem.file: "missing-image", "bad-image-file" (cannot
    be decoded) and "size-mismatch" (the file's size is not the entry's height and width). Entries
    check_annotations refuses (no file_name, bad size) are left to it. progress: a tqdm bar."""
    from tqdm import tqdm

    problems = []
    for info in tqdm(data["images"], desc=f"images of {os.path.basename(annotation_file)}", disable=not progress,
                     leave=False):
        if not (isinstance(info, dict) and isinstance(info.get("file_name"), str)
                and all(is_integer(info.get(k)) and info[k] > 0 for k in ("height", "width"))):
            continue
        path = os.path.join(image_dir, info["file_name"])
        try:
            read_image(path, info, annotation_file)
        except FileNotFoundError as error:
            problems.append(Problem(path, info.get("id"), None, "missing-image", str(error)))
        except ImageSizeMismatch as error:
            problems.append(Problem(path, info.get("id"), None, "size-mismatch", str(error)))
        except ValueError as error:
            problems.append(Problem(path, info.get("id"), None, "bad-image-file", str(error)))
    return problems


# What the loader drops, by Problem code, as its log line says it.
DROPPED = {
    "empty-box": "dropped {n} of {total} annotations whose box has no width or height inside its image",
    "short-polygon": "dropped {n} polygons of fewer than 3 points",
    "no-polygon": "dropped {n} of {total} annotations left with no polygon of 3 or more points (from evaluation too)",
}


def problem_report(annotation_file, errors: list[Problem], limit: int = 20) -> str:
    """The errors of one file as one message: a line each (image and annotation id first), the first `limit`."""
    lines = [f"{annotation_file} has {len(errors)} error{'s' if len(errors) > 1 else ''}:"]
    lines += [f"  {p.where() or 'file'}: {p.message}" for p in errors[:limit]]
    if len(errors) > limit:
        lines.append(f"  ... and {len(errors) - limit} more")
    return "\n".join(lines)


def load_coco(annotation_file, labels_are_category_ids: bool = False) -> COCO:
    """pycocotools' COCO index of a file, checked first by check_annotations: every error in one
    ValueError (problem_report), and one warning line per kind of thing dropped, counted. Polygons of
    fewer than 3 points, and objects left with no polygon, are removed from the index, so that training
    and COCOeval see the same objects; objects with an empty box stay (the data set leaves them out
    of training)."""
    data = read_annotation_file(annotation_file)
    problems = check_annotations(data, annotation_file, labels_are_category_ids)
    errors = [p for p in problems if p.level == "error"]
    if errors:
        raise ValueError(problem_report(annotation_file, errors))
    for code, text in DROPPED.items():
        found = [p for p in problems if p.code == code]
        if found:
            ids = ", ".join(str(p.annotation_id) for p in found[:5]) + (", ..." if len(found) > 5 else "")
            logger.warning("%s: %s (annotations %s)", annotation_file,
                           text.format(n=len(found), total=len(data["annotations"])), ids)
    no_polygon = {p.annotation_id for p in problems if p.code == "no-polygon"}
    data["annotations"] = [ann for ann in data["annotations"] if ann["id"] not in no_polygon]
    for ann in data["annotations"]:
        if isinstance(ann["segmentation"], list):
            ann["segmentation"] = [p for p in ann["segmentation"] if not is_short_polygon(p)]
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def clipped_box(ann, info):
    """The annotation's box as (x1, y1, x2, y2) clipped to the image, or None if it is empty there."""
    x, y, w, h = (float(v) for v in ann["bbox"])
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, float(info["width"])), min(y + h, float(info["height"]))
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def annotation_mask(ann, height, width) -> np.ndarray:
    """HxW bool mask of an annotation: polygons, RLE (compressed) or uncompressed RLE."""
    segmentation = ann["segmentation"]
    try:
        if isinstance(segmentation, list):
            mask = utils.polygons_to_mask(segmentation, height, width)
        elif isinstance(segmentation, dict):
            mask = utils.rle_to_mask(segmentation, height, width)
        else:
            raise TypeError(f"unknown segmentation type {type(segmentation).__name__}")
    except Exception as error:
        raise ValueError(f"image {ann.get('image_id')}, annotation {ann.get('id')}: cannot decode its segmentation "
                         f"({error})") from error
    return mask


def collate(batch):
    """A list of (image, target) into (images, targets), as the model takes them."""
    return tuple(zip(*batch))


############################################################
#  Training batches
############################################################


class TrainingBatchSampler(torch.utils.data.Sampler):
    """Endless batches of (index, hflip) for one process, starting at batch `start`.

    Every epoch is a permutation seeded by (seed, epoch), split among the processes; each image is
    flipped with probability 0.5 when `hflip`. Images are grouped by aspect ratio (wider than high or
    not) so that a batch pads little: a group gives a batch whenever it holds `batch_size` images. At
    the end of an epoch the partial groups are emptied, wide then tall, oldest first, into mixed
    batches, the last one completed with the first images of the next epoch (which that epoch then
    does not draw again). So every image of a process's share is drawn exactly once per epoch, whatever
    the orientations, and at most two batches an epoch mix them. Batch k of a process is a function of
    (seed, k, rank, world_size) alone, so a run resumed at iteration k sees the same data as one that
    never stopped. A data set smaller than world_size * batch_size is refused (rather than repeating
    images within a batch): it is almost surely the wrong folder or split.
    """

    def __init__(self, aspect_ratios, batch_size, seed=0, rank=0, world_size=1, hflip=True, start=0):
        if len(aspect_ratios) < world_size * batch_size:
            raise ValueError(f"the data set has {len(aspect_ratios)} images; {world_size} processes of "
                             f"{batch_size} images a batch need at least {world_size * batch_size}")
        self.wide = [r >= 1 for r in aspect_ratios]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.hflip, self.start = hflip, start

    def epoch(self, epoch):
        """This process's share of an epoch: [(index, hflip)] in the epoch's order (at least batch_size)."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.wide), generator=generator).tolist()
        flips = (torch.rand(len(self.wide), generator=generator) < 0.5).tolist()
        return [(index, self.hflip and flips[index]) for index in order[self.rank :: self.world_size]]

    def batches(self):
        """All batches from the first, endlessly."""
        share, drawn, epoch = self.epoch(0), 0, 0  # drawn: images of `share` already drawn last epoch
        while True:
            groups = {True: [], False: []}
            for item in share[drawn:]:
                group = groups[self.wide[item[0]]]
                group.append(item)
                if len(group) == self.batch_size:
                    yield list(group)
                    group.clear()
            leftovers = groups[True] + groups[False]  # fewer than 2 * batch_size
            while len(leftovers) >= self.batch_size:
                yield leftovers[: self.batch_size]
                leftovers = leftovers[self.batch_size :]
            epoch += 1
            share = self.epoch(epoch)
            drawn = self.batch_size - len(leftovers) if leftovers else 0
            if leftovers:
                yield leftovers + share[:drawn]

    def __iter__(self):
        return itertools.islice(self.batches(), self.start, None)


############################################################
#  Evaluation (COCOeval, bbox, segm and boundary)
############################################################


def detections_to_coco(output, image_id, label_to_category, mask_threshold, inclusive=False):
    """One image's model output (eval mode) as COCO results: xywh boxes, category ids, RLE masks (mask
    probabilities thresholded as utils.threshold_masks with MASK_THRESHOLD_INCLUSIVE)."""
    boxes = output["boxes"].float().cpu()
    boxes[:, 2:] -= boxes[:, :2]
    masks = utils.threshold_masks(output["masks"][:, 0], mask_threshold, inclusive).cpu().numpy().astype(np.uint8)
    rles = coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []
    results = []
    for box, label, score, rle in zip(boxes.tolist(), output["labels"].tolist(), output["scores"].tolist(), rles):
        rle["counts"] = rle["counts"].decode("ascii")
        results.append({"image_id": image_id, "category_id": label_to_category[label], "bbox": box,
                        "score": score, "segmentation": rle})
    return results


def coco_evaluator(coco_gt, results, kind):
    """pycocotools' COCOeval for kind "bbox" or "segm"; for "boundary", faster-coco-eval's, whose
    Boundary AP (Cheng et al., CVPR 2021) is mask AP with each IoU replaced by min(mask IoU, boundary
    IoU), a mask's boundary being its pixels within d = 2% of the image diagonal of its contour (the
    mask minus its erosion by d). Its bbox and segm numbers equal pycocotools' on the shapes data."""
    if kind == "boundary":
        gt = faster_coco_eval.COCO(coco_gt.dataset, use_deepcopy=True)  # it adds RLEs to the annotations
        return faster_coco_eval.COCOeval_faster(gt, gt.loadRes([dict(r) for r in results]), kind)
    return COCOeval(coco_gt, coco_gt.loadRes([dict(r) for r in results]), kind)


def coco_evaluators(coco_gt, results, image_ids=None, max_dets=100) -> dict:
    """COCOeval for bbox, segm and (with faster-coco-eval installed) boundary, evaluated and accumulated:
    {kind: COCOeval, or None without results (pycocotools cannot load an empty result list)}. max_dets:
    the detections per image scored, COCOeval's last maxDets; the others stay 1 and 10, or max_dets if
    lower (COCOeval sorts them, and summarize reads the last for AP)."""
    if not is_integer(max_dets) or max_dets < 1:
        raise ValueError(f"max_dets (--max-dets) must be an integer >= 1; got {max_dets!r}")
    evaluators = {}
    for kind in ("bbox", "segm") + (("boundary",) if faster_coco_eval is not None else ()):
        if not results:
            evaluators[kind] = None
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = coco_evaluator(coco_gt, results, kind)
            evaluator.params.maxDets = [min(1, max_dets), min(10, max_dets), max_dets]
            if image_ids is not None:
                evaluator.params.imgIds = list(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
        evaluators[kind] = evaluator
    return evaluators


def coco_summary(evaluators: dict) -> tuple[dict, str]:
    """COCOeval's 12 numbers of each evaluator: ({"bbox": {AP, AP50, ...}, "segm": {...}}, printable table)."""
    metrics, table = {}, []
    for kind, evaluator in evaluators.items():
        if evaluator is None:
            metrics[kind] = dict.fromkeys(STAT_NAMES, 0.0)
            table.append(f"{kind}: no detections")
            continue
        summary = io.StringIO()
        with contextlib.redirect_stdout(summary):
            evaluator.summarize()
        metrics[kind] = {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}
        table.append(f"{kind}:\n{summary.getvalue().rstrip()}")
    return metrics, "\n".join(table)


def coco_metrics(coco_gt, results, image_ids=None, max_dets=100):
    """COCOeval for bbox, segm and (with faster-coco-eval) boundary. Returns ({"bbox": {AP, AP50, ...},
    "segm": {...}, "boundary": {...}}, printable table)."""
    return coco_summary(coco_evaluators(coco_gt, results, image_ids, max_dets))


def iou_index(coco_eval, iou: float) -> int:
    index = np.flatnonzero(np.isclose(coco_eval.params.iouThrs, iou))
    if not len(index):
        raise ValueError(f"IoU {iou} is not one of COCOeval's thresholds {coco_eval.params.iouThrs.tolist()}")
    return int(index[0])


def per_class_ap(coco_eval, names: dict) -> dict:
    """AP and AP50 of each class from an accumulated COCOeval's precision array [T, R, K, A, M] (IoU
    thresholds, recall points, classes, area ranges, maxDets): AP the mean over the IoU thresholds
    0.5:0.95 and the 101 recall points, AP50 the mean over the recall points at IoU 0.5, both for area
    "all" and the last maxDets, as COCOeval.summarize averages over all classes. A class without
    ground truth in the images evaluated has None (COCOeval's -1).

    names: {category id: class name}. Returns {name: {"AP": float or None, "AP50": float or None}} in
    COCOeval's category order (params.catIds).
    """
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]  # (T, R, K)
    at_50 = iou_index(coco_eval, 0.5)
    table = {}
    for k, category_id in enumerate(coco_eval.params.catIds):
        values = {"AP": precision[:, :, k], "AP50": precision[at_50, :, k]}
        table[names.get(category_id, str(category_id))] = {
            key: float(v[v > -1].mean()) if (v > -1).any() else None for key, v in values.items()}
    return table


def per_class_table(per_class: dict) -> str:
    """{kind: per_class_ap} as text: a row per class, AP and AP50 of each kind (in %; "-": no ground truth)."""
    kinds = list(per_class)
    names = list(next(iter(per_class.values()), {}))
    width = max([len("class"), *map(len, names)])
    lines = [f"{'class':{width}} " + " ".join(f"{f'{kind} AP':>9} {f'{kind} AP50':>10}" for kind in kinds)]
    for name in names:
        cells = []
        for kind in kinds:
            row = per_class[kind][name]
            cells += [f"{'-' if row[key] is None else f'{100 * row[key]:.1f}':>{w}}"
                      for key, w in (("AP", 9), ("AP50", 10))]
        lines.append(f"{name:{width}} " + " ".join(cells))
    return "\n".join(lines)


def confusion_matrix(coco_gt, results, iou: float = 0.5, min_score: float = 0.5, image_ids=None) -> np.ndarray:
    """Counts of ground truth against predictions, background included, by box IoU.

    In each image the predictions with score >= min_score are taken in decreasing score order, and each
    is matched to the not yet matched ground-truth object (of any class) with which its box has the
    highest IoU, if that IoU is >= iou. A match counts at [true class, predicted class], a prediction
    left unmatched at [background, predicted class], an object left unmatched at [true class,
    background]. Crowd regions are not objects (they are left out).

    coco_gt: pycocotools COCO; results: COCO results (image_id, category_id, bbox [x, y, w, h], score).
    Returns [K + 1, K + 1] int64: rows ground truth, columns predictions, in sorted category-id order
    with the background last.
    """
    category_ids = sorted(coco_gt.getCatIds())
    index = {c: i for i, c in enumerate(category_ids)}
    background = len(category_ids)
    matrix = np.zeros((background + 1, background + 1), np.int64)
    image_ids = sorted(coco_gt.getImgIds()) if image_ids is None else list(image_ids)
    unknown = {r["category_id"] for r in results} - set(index)
    if unknown:
        raise ValueError(f"results have category ids {sorted(unknown)[:10]}, which are not in the ground truth's "
                         f"categories {category_ids[:20]}")
    predictions = collections.defaultdict(list)
    for r in results:
        if r["score"] >= min_score:
            predictions[r["image_id"]].append(r)
    for image_id in image_ids:
        gts = [a for a in coco_gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        dts = sorted(predictions.get(image_id, []), key=lambda r: -r["score"])
        if gts and dts:
            ious = np.asarray(coco_mask.iou([d["bbox"] for d in dts], [g["bbox"] for g in gts], [0] * len(gts)))
        matched = np.zeros(len(gts), bool)
        for d, dt in enumerate(dts):
            g = -1
            if gts:
                candidates = np.where(matched, -1.0, ious[d])  # (G,)
                g = int(candidates.argmax())
                if candidates[g] < iou:
                    g = -1
            if g >= 0:
                matched[g] = True
                matrix[index[gts[g]["category_id"]], index[dt["category_id"]]] += 1
            else:
                matrix[background, index[dt["category_id"]]] += 1
        for g in np.flatnonzero(~matched):
            matrix[index[gts[g]["category_id"]], background] += 1
    return matrix


def confusion_table(matrix: np.ndarray, names: list[str]) -> str:
    """The confusion matrix as text: rows ground truth, columns predictions (names: the classes, then
    background)."""
    corner = "truth \\ predicted"
    width = max(len(corner), *map(len, names))
    cell = max(7, *(len(n) for n in names))
    lines = [f"{corner:{width}} " + " ".join(f"{n:>{cell}}" for n in names)]
    lines += [f"{name:{width}} " + " ".join(f"{v:>{cell}}" for v in row) for name, row in zip(names, matrix.tolist())]
    return "\n".join(lines)


def plot_confusion_matrix(matrix: np.ndarray, names: list[str], path, title="") -> None:
    """The confusion matrix as a heat map (PNG), each cell with its count."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend and figures stay as they are

    side = 2 + 0.45 * len(names)
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=90)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    top = matrix.max() if matrix.size else 0
    for (row, column), value in np.ndenumerate(matrix):
        ax.text(column, row, str(value), ha="center", va="center", fontsize=8,
                color="white" if top and value > top / 2 else "black")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_pr_curves(coco_eval, names: dict, path, title="") -> None:
    """Precision against recall of each class at IoU 0.5 (area all, last maxDets), from COCOeval's
    precision array, as a PNG, each labelled with its AP50 (the curve's mean). Classes without ground
    truth are left out."""
    from matplotlib.figure import Figure

    precision = coco_eval.eval["precision"][iou_index(coco_eval, 0.5), :, :, 0, -1]  # (R, K)
    recall = coco_eval.params.recThrs
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    for k, category_id in enumerate(coco_eval.params.catIds):
        if (precision[:, k] > -1).any():
            label = f"{names.get(category_id, str(category_id))} (AP50 {precision[:, k].mean():.3f})"
            ax.plot(recall, np.maximum(precision[:, k], 0), label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    if ax.lines:
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def score(coco_gt, results, image_ids=None, max_dets=100) -> tuple[dict, str, dict]:
    """COCOeval of the results: (metrics, table, evaluators). metrics: {"bbox": {AP, ...}, "segm": {...},
    "per_class": {"bbox": per_class_ap, "segm": ...}}; the table ends with the per-class one. Without
    results every class with objects has AP 0 (as coco_summary's 0.0), the others None."""
    evaluators = coco_evaluators(coco_gt, results, image_ids, max_dets)
    metrics, table = coco_summary(evaluators)
    names = {c: coco_gt.cats[c].get("name", str(c)) for c in sorted(coco_gt.getCatIds())}
    ids = set(coco_gt.getImgIds() if image_ids is None else image_ids)
    found = {a["category_id"] for a in coco_gt.dataset["annotations"] if a["image_id"] in ids and not a.get("iscrowd")}
    empty = {name: dict.fromkeys(("AP", "AP50"), 0.0 if c in found else None) for c, name in names.items()}
    metrics["per_class"] = {kind: empty if e is None else per_class_ap(e, names) for kind, e in evaluators.items()}
    return metrics, f"{table}\nper class (%):\n{per_class_table(metrics['per_class'])}", evaluators


@torch.no_grad()
def predict(model, dataset, batch_size=8, device="cpu", limit=None, amp=False, progress=True):
    """The model's detections on the data set (its first `limit` images) as COCO results, split among the
    processes under torch.distributed and gathered: the first process gets them all, the others None."""
    from tqdm import tqdm

    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = list(range(len(dataset) if limit is None else min(limit, len(dataset))))
    mine = indices[rank::world_size]
    was_training = model.training
    model.eval()
    config = model.module.config if hasattr(model, "module") else model.config
    results = []
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    for batch in tqdm(batches, desc="evaluate", disable=not progress or rank != 0, leave=False):
        items = [dataset[i] for i in batch]
        images = [image.to(device) for image, _ in items]
        with torch.autocast(torch.device(device).type, enabled=amp):
            outputs = model(images)
        for output, (_, target) in zip(outputs, items):
            results += detections_to_coco(output, target["image_id"], dataset.label_to_category,
                                          config.MASK_THRESHOLD, config.MASK_THRESHOLD_INCLUSIVE)
    model.train(was_training)
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    return results if rank == 0 else None


def evaluate(model, dataset, batch_size=8, device="cpu", limit=None, amp=False, progress=True, max_dets=100):
    """Runs the model on the data set (split among the processes under torch.distributed) and scores it
    with COCOeval on the first process (score: the 12 numbers and AP per class). Returns (metrics, table,
    results); the other processes get (None, None, None)."""
    started = time.perf_counter()
    results = predict(model, dataset, batch_size, device, limit, amp, progress)
    if results is None:
        return None, None, None
    image_ids = dataset.image_ids[: len(dataset) if limit is None else limit]
    metrics, table, _ = score(dataset.coco, results, image_ids, max_dets)
    logger.info("evaluated %d images in %.1f s", len(image_ids), time.perf_counter() - started)
    return metrics, table, results



############################################################
#  Checking a data set (python coco.py check)
############################################################


def dataset_splits(root) -> list[str]:
    """The splits of a data folder: the <split> of every annotations/instances_<split>.json, sorted."""
    folder = os.path.join(root, "annotations")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [n[len("instances_"):-len(".json")] for n in names if n.startswith("instances_") and n.endswith(".json")]


def check_split(root, split, labels_are_category_ids=False, progress=False) -> tuple[dict | None, list[Problem]]:
    """One split's annotation file (None when it cannot be read) and all its Problems: check_annotations'
    and check_images'. A file that cannot be read at all is one error."""
    annotation_file = os.path.join(root, "annotations", f"instances_{split}.json")
    try:
        data = read_annotation_file(annotation_file)
    except (FileNotFoundError, ValueError) as error:
        return None, [Problem(annotation_file, None, None, "bad-file", str(error))]
    problems = check_annotations(data, annotation_file, labels_are_category_ids)
    return data, problems + check_images(data, os.path.join(root, split), annotation_file, progress)


def box_size_bins(anchor_sizes) -> list[tuple[str, float, float]]:
    """(name, low, high) bins of box size sqrt(w * h) in network-input pixels, one per anchor size,
    split at the geometric mean of neighbouring sizes (the level whose anchor fits a box best), plus
    one below half the smallest anchor and one above twice the largest: there even the best anchor
    overlaps a square box by IoU below 0.25."""
    sizes = list(anchor_sizes)
    edges = [sizes[0] / 2] + [math.sqrt(a * b) for a, b in zip(sizes, sizes[1:])] + [sizes[-1] * 2]
    bins = [("below P2/2", 0.0, edges[0])]
    bins += [(f"P{level + 2} ({size})", low, high)
             for level, (size, low, high) in enumerate(zip(sizes, edges, edges[1:]))]
    return bins + [(f"above P{len(sizes) + 1}x2", edges[-1], math.inf)]


def data_summary(datasets: dict, config) -> str:
    """Text tables of a data set's splits (`datasets`: {split: annotation file contents}, well-formed):
    objects per class and split, image sizes, objects per image, and a histogram of box sizes
    sqrt(w * h) at the network's input size (each image resized by model.resize_scale with the config's
    IMAGE_MIN_DIM and IMAGE_MAX_DIM) in bins around the config's ANCHOR_SIZES (box_size_bins).
    Crowd regions are not counted as objects."""
    from model import resize_scale

    names = {}
    for data in datasets.values():
        names.update({c["id"]: c.get("name", str(c["id"])) for c in data["categories"] if isinstance(c, dict)})
    splits = list(datasets)
    counts = {split: collections.Counter(a.get("category_id") for a in data["annotations"]
                                         if isinstance(a, dict) and not a.get("iscrowd", 0))
              for split, data in datasets.items()}
    width = max([len("class"), *(len(str(n)) for n in names.values())])
    lines = ["objects per class:", f"  {'id':>5} {'class':{width}} " + " ".join(f"{s:>10}" for s in splits)]
    for category_id in sorted(names, key=str):
        row = " ".join(f"{counts[s][category_id]:>10}" for s in splits)
        lines.append(f"  {category_id:>5} {names[category_id]:{width}} {row}")
    bins = box_size_bins(config.ANCHOR_SIZES)
    for split, data in datasets.items():
        images = {i["id"]: i for i in data["images"] if isinstance(i, dict) and "id" in i}
        lines.append(f"{split}: {len(images)} images, {sum(counts[split].values())} objects")
        if not images:
            continue
        for axis in ("width", "height"):
            values = [i[axis] for i in images.values() if is_integer(i.get(axis))]
            if values:
                lines.append(f"  image {axis}: min {min(values)}, median {np.median(values):g}, max {max(values)}")
        per_image = collections.Counter(a.get("image_id") for a in data["annotations"]
                                        if isinstance(a, dict) and not a.get("iscrowd", 0))
        objects = [per_image[i] for i in images]
        lines.append(f"  objects per image: min {min(objects)}, median {np.median(objects):g}, max {max(objects)}, "
                     f"{objects.count(0)} images without any")
        histogram = collections.Counter()
        for ann in data["annotations"]:
            info = images.get(ann.get("image_id")) if isinstance(ann, dict) else None
            bbox = ann.get("bbox") if info else None
            if not (isinstance(bbox, list) and len(bbox) == 4 and is_integer(info.get("height"))
                    and is_integer(info.get("width")) and not ann.get("iscrowd", 0)):
                continue
            scale = resize_scale(info["height"], info["width"], config.IMAGE_MIN_DIM, config.IMAGE_MAX_DIM)
            size = math.sqrt(max(bbox[2], 0) * max(bbox[3], 0)) * scale
            histogram[next(name for name, low, high in bins if low <= size < high)] += 1
        total = max(sum(histogram.values()), 1)
        lines.append(f"  box sizes sqrt(w * h) at the network input ({config.NAME}: IMAGE_MIN_DIM "
                     f"{config.IMAGE_MIN_DIM}, IMAGE_MAX_DIM {config.IMAGE_MAX_DIM}), by anchor size:")
        for name, low, high in bins:
            n = histogram[name]
            bar = "#" * round(40 * n / total)
            lines.append(f"    {name:12} {f'[{low:.0f}, {high:.0f})':>12} {n:>7} {bar}".rstrip())
    return "\n".join(lines)


def check_command(root, splits, config, strict=False) -> int:
    """`python coco.py check`: prints the summary and every problem; returns 1 when there are errors (with
    `strict`, warnings too: what the loader would drop)."""
    datasets, problems = {}, []
    for split in splits:
        data, found = check_split(root, split, config.LABELS_ARE_CATEGORY_IDS, progress=sys.stderr.isatty())
        problems += found
        if data is not None:
            datasets[split] = data
    if datasets:
        print(data_summary(datasets, config))
    errors = [p for p in problems if p.level == "error"]
    for problem in problems:
        print(f"{problem.level} [{problem.code}] {problem}")
    print(f"{len(errors)} errors, {len(problems) - len(errors)} warnings in {', '.join(splits)}")
    return 1 if errors or (strict and problems) else 0


############################################################
#  Import: labelme, VIA and instance-id PNGs (python coco.py convert)
############################################################

# Circles and ellipses become polygons of this many points on the curve: the inscribed 64-gon covers
# 64 sin(2 pi / 64) / (2 pi) = 99.8% of the area, whatever the radius.
CURVE_POINTS = 64

# The mask-png format, as its errors and --help state it.
MASK_PNG_LAYOUT = ("images/<name>.<ext> (any image), masks/<stem>.png (one instance id per pixel, 0 the "
                   "background; 8 or 16 bits, one channel) and masks/<stem>.json "
                   '({"<instance id>": "<class name>", ...})')


@dataclasses.dataclass
class Sample:
    """One image of a data set being imported.

    objects: [(class name, segmentation)], segmentation COCO polygons [[x1, y1, x2, y2, ...], ...] in
    pixels or an RLE dict (utils.mask_to_rle). source: the file it was read from, for errors.
    """

    path: str
    file_name: str
    height: int
    width: int
    objects: list
    source: str


def ellipse_polygon(cx, cy, rx, ry, theta=0.0) -> list[float]:
    """An ellipse centred at (cx, cy) with radii rx, ry, rotated by theta (radians, clockwise on the
    image since y points down), as a flat polygon of CURVE_POINTS points on it."""
    t = np.arange(CURVE_POINTS) * 2 * math.pi / CURVE_POINTS
    x, y = rx * np.cos(t), ry * np.sin(t)
    xs = cx + x * math.cos(theta) - y * math.sin(theta)
    ys = cy + x * math.sin(theta) + y * math.cos(theta)
    return np.stack([xs, ys], axis=1).reshape(-1).tolist()


def rectangle_polygon(x1, y1, x2, y2) -> list[float]:
    return [x1, y1, x2, y1, x2, y2, x1, y2]


def relative_name(path, root) -> str:
    """The file name an image keeps in the split folder: its path under the input folder (subfolders
    kept, so that equal names in different folders stay apart), or its bare name if it lies elsewhere."""
    relative = os.path.relpath(path, root)
    return os.path.basename(path) if relative.startswith("..") else relative.replace(os.sep, "/")


def source_image(path, source) -> tuple[int, int]:
    """(height, width) of an image named by an annotation file, with an error naming both if missing."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{source}: image file not found: {path}")
    try:
        return utils.image_size(path)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from error


def read_json_object(path) -> dict:
    """A JSON file holding an object, with errors that name the file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object {{...}}; got a {type(data).__name__}")
    return data


def labelme_shape(shape: dict) -> list[float] | None:
    """One labelme shape as a flat polygon (rectangle: its 4 corners; circle: centre and a point on it),
    None for the kinds that are not regions (point, line, linestrip, ...)."""
    kind = shape.get("shape_type") or "polygon"
    points = [(float(x), float(y)) for x, y in shape["points"]]
    if kind == "polygon":
        return [v for point in points for v in point]
    if kind == "rectangle":
        (x1, y1), (x2, y2) = points
        return rectangle_polygon(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
    if kind == "circle":
        (cx, cy), (px, py) = points
        radius = math.hypot(px - cx, py - cy)
        return ellipse_polygon(cx, cy, radius, radius)
    return None


def read_labelme(input_dir) -> list[Sample]:
    """Every labelme JSON file under input_dir (recursively): polygon, rectangle and circle shapes;
    shapes with one group_id (and label) are one object, every other shape an object of its own. The
    image is imagePath relative to the JSON file. Other shape kinds are skipped with a counted warning."""
    samples, skipped = [], collections.Counter()
    for path in sorted(glob.glob(os.path.join(input_dir, "**", "*.json"), recursive=True)):
        data = read_json_object(path)
        if not isinstance(data.get("shapes"), list) or "imagePath" not in data:
            raise ValueError(f"{path} is not a labelme file: expected a JSON object with 'shapes' and 'imagePath'")
        # labelme writes the path with the separators of the system it ran on.
        image = os.path.normpath(os.path.join(os.path.dirname(path), str(data["imagePath"]).replace("\\", "/")))
        height, width = source_image(image, path)
        declared = (data.get("imageHeight"), data.get("imageWidth"))
        if None not in declared and tuple(declared) != (height, width):
            raise ValueError(f"{path}: imageHeight x imageWidth is {declared[0]}x{declared[1]} but {image} is "
                             f"{height}x{width}")
        objects = {}  # key: the group, or the shape itself when it has none -> (label, polygons)
        for j, shape in enumerate(data["shapes"]):
            try:
                polygon = labelme_shape(shape)
                label = shape["label"]
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{path}: shapes[{j}] is not a labelme shape with 'label', 'points' "
                                 f"[[x, y], ...] and 'shape_type' ({error!r})") from error
            if polygon is None:
                skipped[shape.get("shape_type")] += 1
                continue
            group = shape.get("group_id")
            key = ("group", group) if group is not None else ("shape", j)
            if key in objects and objects[key][0] != label:
                raise ValueError(f"{path}: shapes[{j}] has group_id {group} with label {label!r}, but an earlier "
                                 f"shape of that group has {objects[key][0]!r}; one group is one object")
            objects.setdefault(key, (label, []))[1].append(polygon)
        samples.append(Sample(image, relative_name(image, input_dir), height, width, list(objects.values()), path))
    if skipped:
        logger.warning("skipped labelme shapes that are not regions: %s", dict(skipped))
    return samples


def via_region(shape: dict) -> list[float] | None:
    """One VIA region's shape_attributes as a flat polygon, None for points and polylines."""
    name = shape.get("name")
    if name == "polygon":
        return [float(v) for xy in zip(shape["all_points_x"], shape["all_points_y"]) for v in xy]
    if name == "rect":
        x, y, w, h = (float(shape[k]) for k in ("x", "y", "width", "height"))
        return rectangle_polygon(x, y, x + w, y + h)
    if name == "circle":
        return ellipse_polygon(float(shape["cx"]), float(shape["cy"]), float(shape["r"]), float(shape["r"]))
    if name == "ellipse":
        return ellipse_polygon(float(shape["cx"]), float(shape["cy"]), float(shape["rx"]), float(shape["ry"]),
                               float(shape.get("theta", 0.0)))
    return None


def via_class(attributes, class_attribute):
    """A region's class: its attribute `class_attribute`, a text or (checkboxes) the one key set true."""
    value = attributes.get(class_attribute) if isinstance(attributes, dict) else None
    if isinstance(value, dict):
        chosen = [k for k, v in value.items() if v]
        value = chosen[0] if len(chosen) == 1 else None
    return value if isinstance(value, str) and value else None


def read_via(input_dir, class_attribute) -> list[Sample]:
    """The VIA 2.x project files (*.json) in input_dir: polygon, rect, circle and ellipse regions, each one
    object of the class in its region attribute `class_attribute`. Images are the project's file names
    in input_dir. A project saved by VIA ({"_via_img_metadata": ...}) and VIA's annotation export (that
    dict alone) are both read. Points and polylines are skipped with a counted warning."""
    if not class_attribute:
        raise ValueError("--class-attribute is required for --format via: the region attribute that holds the "
                         "class name")
    samples, skipped = [], collections.Counter()
    for path in sorted(glob.glob(os.path.join(input_dir, "*.json"))):
        data = read_json_object(path)
        metadata = data.get("_via_img_metadata", data)
        if not isinstance(metadata, dict) or not all(isinstance(e, dict) and "filename" in e
                                                     for e in metadata.values()):
            raise ValueError(f"{path} is not a VIA 2.x project: expected '_via_img_metadata' (or the export) "
                             "mapping keys to {'filename', 'regions', ...}")
        for entry in metadata.values():
            image = os.path.join(input_dir, entry["filename"])
            height, width = source_image(image, path)
            regions = entry.get("regions") or []
            objects = []
            for j, region in enumerate(regions.values() if isinstance(regions, dict) else regions):
                where = f"{path}: {entry['filename']}, regions[{j}]"
                try:
                    polygon = via_region(region["shape_attributes"])
                except (KeyError, TypeError, ValueError) as error:
                    raise ValueError(f"{where}: shape_attributes are not a VIA region ({error!r})") from error
                if polygon is None:
                    skipped[region["shape_attributes"].get("name")] += 1
                    continue
                label = via_class(region.get("region_attributes"), class_attribute)
                if label is None:
                    raise ValueError(f"{where}: region attribute {class_attribute!r} must be a class name; got "
                                     f"{str(region.get('region_attributes'))[:80]} (--class-attribute)")
                objects.append((label, [polygon]))
            samples.append(Sample(image, relative_name(image, input_dir), height, width, objects, path))
    if skipped:
        logger.warning("skipped VIA regions that are not areas: %s", dict(skipped))
    return samples


def read_mask_pngs(input_dir) -> list[Sample]:
    """Instance-id PNGs (MASK_PNG_LAYOUT): each id but 0 in an image's mask is one object, of the class its
    table names, written as RLE (exact: holes and separate parts stay as they are)."""
    from PIL import Image

    image_dir, mask_dir = os.path.join(input_dir, "images"), os.path.join(input_dir, "masks")
    if not os.path.isdir(image_dir) or not os.path.isdir(mask_dir):
        raise FileNotFoundError(f"--input {input_dir} for --format mask-png must hold {MASK_PNG_LAYOUT}")
    samples = []
    for name in sorted(n for n in os.listdir(image_dir) if not n.startswith(".")):  # .DS_Store and the like
        image = os.path.join(image_dir, name)
        stem = os.path.splitext(name)[0]
        mask_path, table_path = os.path.join(mask_dir, f"{stem}.png"), os.path.join(mask_dir, f"{stem}.json")
        if not os.path.isfile(mask_path):
            raise FileNotFoundError(f"{image} has no instance mask {mask_path} ({MASK_PNG_LAYOUT})")
        height, width = source_image(image, image)
        with Image.open(mask_path) as png:
            ids = np.asarray(png)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{mask_path} must be one channel of integer instance ids; got shape {ids.shape}, "
                             f"{ids.dtype}")
        if ids.shape != (height, width):
            raise ValueError(f"{mask_path} is {ids.shape[1]}x{ids.shape[0]} (WxH) but {image} is {width}x{height}")
        present = [int(i) for i in np.unique(ids) if i != 0]
        table = {}
        if present:
            if not os.path.isfile(table_path):
                raise FileNotFoundError(f"{mask_path} has instances {present[:10]} but no class table {table_path}")
            table = read_json_object(table_path)
        unnamed = [i for i in present if not isinstance(table.get(str(i)), str)]
        if unnamed:
            raise ValueError(f"{table_path} names no class for instance ids {unnamed[:10]} of {mask_path}; expected "
                             '{"<instance id>": "<class name>", ...}')
        objects = [(table[str(i)], utils.mask_to_rle(ids == i)) for i in present]
        samples.append(Sample(image, name, height, width, objects, mask_path))
    return samples


def val_names(file_names, val_fraction: float, seed: int) -> set:
    """The images that go to val: the file names sorted, shuffled by numpy.random.default_rng(seed), the
    first round(val_fraction * N) of them, at least 1 and at most N - 1 when val_fraction > 0 and there
    are 2 images or more. Same names, fraction and seed, same split, whatever the order they were read."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1); got {val_fraction}")
    names = sorted(file_names)
    count = round(val_fraction * len(names))
    if val_fraction > 0 and len(names) >= 2:
        count = min(max(count, 1), len(names) - 1)
    order = np.random.default_rng(seed).permutation(len(names))
    return {names[i] for i in order[:count]}


def coco_segmentation(segmentation, height, width, where) -> tuple[object, list[float], float]:
    """(segmentation, bbox [x, y, w, h] of its pixels, area in pixels) of one imported object. Polygons
    of fewer than 3 points are dropped (segmentation None when none is left); the others are checked
    (utils.check_polygons) before pycocotools rasterises them."""
    if isinstance(segmentation, dict):
        rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}
    else:
        segmentation = [p for p in segmentation if not is_short_polygon(p)]
        if not segmentation:
            return None, [], 0.0
        utils.check_polygons(segmentation, height, width, where)
        rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
    return segmentation, [float(v) for v in coco_mask.toBbox(rle)], float(coco_mask.area(rle))


def imported_split(samples, class_ids, split) -> dict:
    """A COCO instances file of the samples: image ids 1..N in file-name order, annotation ids 1..M."""
    images, annotations, dropped = [], [], 0
    for image_id, sample in enumerate(sorted(samples, key=lambda s: s.file_name), start=1):
        images.append({"id": image_id, "file_name": sample.file_name, "height": sample.height,
                       "width": sample.width})
        for k, (label, segmentation) in enumerate(sample.objects):
            where = f"{sample.source}: object {k} ({label})"
            segmentation, bbox, area = coco_segmentation(segmentation, sample.height, sample.width, where)
            if segmentation is None:
                dropped += 1
                continue
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": class_ids[label],
                                "iscrowd": 0, "area": area, "bbox": bbox, "segmentation": segmentation})
    if dropped:
        logger.warning("%s: dropped %d objects without a polygon of 3 or more points", split, dropped)
    categories = [{"id": i, "name": name} for name, i in class_ids.items()]
    return {"images": images, "annotations": annotations, "categories": categories}


def refuse_existing(out):
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"--out {out} exists and is not empty; choose a new folder")


def write_imported(samples, out, val_fraction=0.2, seed=0, classes=None) -> dict:
    """Writes the samples in our layout (out/annotations/instances_{train,val}.json, images copied into
    out/{train,val}/), split by val_names. Category ids are 1..K in the order of `classes`, or of the
    sorted class names. The data set is built in a temporary folder beside `out` and renamed to it, so
    `out` is complete or absent; an existing non-empty `out` is refused. Returns {split: (images,
    objects)}."""
    out = os.path.abspath(out)
    refuse_existing(out)
    names = sorted({label for s in samples for label, _ in s.objects})
    if classes:
        if len(set(classes)) != len(classes):
            raise ValueError(f"--classes names a class twice: {','.join(classes)}")
        unknown = [n for n in names if n not in classes]
        if unknown:
            where = next(s.source for s in samples if any(label == unknown[0] for label, _ in s.objects))
            raise ValueError(f"class {unknown[0]!r} (in {where}) is not in --classes {','.join(classes)}; "
                             f"all unknown: {', '.join(unknown)}")
        names = list(classes)
    class_ids = {name: i + 1 for i, name in enumerate(names)}
    by_name = collections.Counter(s.file_name for s in samples)
    twice = [n for n, c in by_name.items() if c > 1]
    if twice:
        raise ValueError(f"image {twice[0]} is annotated by more than one file: "
                         f"{', '.join(s.source for s in samples if s.file_name == twice[0])}")
    val = val_names(by_name, val_fraction, seed)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(dir=parent, prefix=".convert-")
    counts = {}
    try:
        for split in ("train", "val"):
            members = [s for s in samples if (s.file_name in val) == (split == "val")]
            data = imported_split(members, class_ids, split)
            annotation_file = os.path.join(out, "annotations", f"instances_{split}.json")
            errors = [p for p in check_annotations(data, annotation_file) if p.level == "error"]
            if errors:
                raise ValueError(problem_report(annotation_file, errors))
            for sample in members:
                target = os.path.join(work, split, sample.file_name)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(sample.path, target)
            utils.write_json_atomic(os.path.join(work, "annotations", f"instances_{split}.json"), data)
            counts[split] = (len(data["images"]), len(data["annotations"]))
        os.replace(work, out)  # onto an empty folder too (POSIX rename)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return counts


def convert_command(args) -> None:
    refuse_existing(os.path.abspath(args.out))
    if not os.path.isdir(args.input):
        raise SystemExit(f"--input must be a folder; got {args.input}")
    if args.format == "labelme":
        samples = read_labelme(args.input)
    elif args.format == "via":
        samples = read_via(args.input, args.class_attribute)
    else:
        samples = read_mask_pngs(args.input)
    if not samples:
        raise SystemExit(f"no {args.format} annotations found in {args.input}")
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    counts = write_imported(samples, args.out, args.val_fraction, args.seed, classes)
    for split, (images, objects) in counts.items():
        print(f"{split}: {images} images, {objects} objects -> {os.path.join(args.out, split)}")


############################################################
#  Command line
############################################################


def data_root(config_name, data=None):
    """The data folder of a command line: `data` (--data) when given, else the preset's own folder
    (only shapes has one: shapes.DEFAULT_ROOT)."""
    if data:
        return data
    if config_name == "shapes":
        return shapes.DEFAULT_ROOT
    raise SystemExit(f"--data is required for --config {config_name} (the folder with annotations/ and the "
                     "image folders)")


def may_write_shapes(config_name, data, asked=False) -> bool:
    """Whether a command may write the synthetic shapes data set into `data` when it is missing: with
    --config shapes, into the default folder (shapes.DEFAULT_ROOT) or when asked (train.py --make-data).
    A mistyped --data is then an error that names it, not 2,200 new images there."""
    return config_name == "shapes" and (asked or os.path.abspath(data) == os.path.abspath(shapes.DEFAULT_ROOT))


def main(argv=None):
    parser = argparse.ArgumentParser(description="COCO-format evaluation (bbox, segm and, with faster-coco-eval, "
                                                 "Boundary AP) with pycocotools.")
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="evaluate a model on a split of a COCO-format data set")
    ev.add_argument("--config", default="coco", help="preset: coco, shapes, custom, d2_r50_fpn_3x or d2_r101_fpn_3x (a "
                    "checkpoint's own config wins)")
    ev.add_argument("--data", help="data root (annotations/ and the image folders); default: "
                    f"{shapes.DEFAULT_ROOT} for shapes")
    ev.add_argument("--weights", help="checkpoint path, or coco / coco_v2 (torchvision's)")
    ev.add_argument("--results", help="score this COCO results JSON (detect.py --data's detections.json, or "
                    "--detections' file) instead of running a model (then --weights is not needed)")
    ev.add_argument("--split", help="default: the config's VAL_SPLIT")
    ev.add_argument("--out", help="metrics JSON (default: eval_<split>.json beside the weights file)")
    ev.add_argument("--detections", help="also write the detections (COCO results JSON) here")
    ev.add_argument("--batch-size", type=int, default=4)
    ev.add_argument("--limit", type=int, help="evaluate the first N images only")
    ev.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ev.add_argument("--amp", action="store_true", help="autocast (bfloat16 on CPU, float16 on GPU)")
    ev.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    ev.add_argument("--max-dets", type=int, default=100, help="detections per image scored (COCOeval's maxDets; "
                    "the model gives at most DETECTION_MAX_INSTANCES)")
    ev.add_argument("--min-score", type=float, default=0.5, help="score from which a detection counts in the "
                    "confusion matrix")
    co = sub.add_parser("convert", help="import labelme, VIA or instance-id PNG annotations into our layout")
    co.add_argument("--format", required=True, choices=("labelme", "via", "mask-png"))
    co.add_argument("--input", required=True, help="labelme: a folder of labelme JSON files (searched "
                    "recursively); via: a folder with VIA 2.x project JSON files and the images; mask-png: "
                    f"a folder with {MASK_PNG_LAYOUT}")
    co.add_argument("--out", required=True, help="the data folder to create (must not exist, or be empty)")
    co.add_argument("--val-fraction", type=float, default=0.2, help="share of the images in val (see val_names)")
    co.add_argument("--seed", type=int, default=0, help="the split's seed: same seed, same split")
    co.add_argument("--classes", help="class names a,b,c: category ids 1..K in this order (default: sorted names)")
    co.add_argument("--class-attribute", help="via: the region attribute that holds the class name")
    ch = sub.add_parser("check", help="summarise a data set and list every problem (exit code 1 on errors)")
    ch.add_argument("--data", required=True, help="data root (annotations/ and the image folders)")
    ch.add_argument("--split", help="one split (default: every annotations/instances_<split>.json)")
    ch.add_argument("--config", default="coco", help="preset whose anchor sizes, image size and label rule to "
                    "check against")
    ch.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    ch.add_argument("--strict", action="store_true", help="exit code 1 on warnings too (objects the loader drops: "
                    "empty boxes, polygons of fewer than 3 points)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "convert":
        return convert_command(args)
    if args.command == "check":
        from config import named_config

        splits = [args.split] if args.split else dataset_splits(args.data)
        if not splits:
            raise SystemExit(f"--data {args.data} has no annotations/instances_<split>.json")
        return check_command(args.data, splits, named_config(args.config).override(args.set), args.strict)

    from config import named_config
    from model import MaskRCNN

    if (args.weights is None) == (args.results is None):
        parser.error("evaluate needs --weights (run a model) or --results (score a results file), one of them")
    data = data_root(args.config, args.data)
    if args.results:
        config = named_config(args.config).override(args.set)
    else:
        model = MaskRCNN.from_checkpoint(args.weights, args.set, args.device, config=named_config(args.config))
        config = model.config
    if may_write_shapes(args.config, data):
        shapes.ensure(data)
    split = args.split or config.VAL_SPLIT
    dataset = CocoDataset(data, split, config.LABELS_ARE_CATEGORY_IDS)
    if args.results:
        results = read_results(args.results, dataset.coco)
    else:
        results = predict(model, dataset, args.batch_size, args.device, args.limit, args.amp)
    image_ids = dataset.image_ids[: args.limit]
    metrics, table, evaluators = score(dataset.coco, results, image_ids, args.max_dets)
    print(table)
    scored = args.results or args.weights
    if os.path.isfile(str(scored)):
        default_out = os.path.join(os.path.dirname(os.path.abspath(scored)), f"eval_{split}.json")
    else:
        default_out = f"eval_{split}.json"
    out = args.out or default_out
    source = {"results": str(args.results)} if args.results else {"weights": str(args.weights)}
    utils.write_json_atomic(out, {**metrics, **source, "data": data, "split": split,
                                  "images": len(dataset) if args.limit is None else min(args.limit, len(dataset))})
    print(f"metrics written to {out}")
    print(evaluation_pictures(dataset.coco, results, evaluators, os.path.splitext(out)[0], args.min_score,
                              image_ids))
    if args.detections:
        utils.write_json_atomic(args.detections, results)


def read_results(path, coco_gt) -> list[dict]:
    """A COCO results JSON (a list of {image_id, category_id, bbox, score[, segmentation]}) to score against
    `coco_gt`, with errors that name the file and the entry: an image or category the annotation file does
    not have would otherwise be scored as nothing, or crash pycocotools."""
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--results {path}: cannot read it as JSON ({error})") from error
    if not isinstance(results, list):
        raise ValueError(f"--results {path} must hold a list of detections; got a {type(results).__name__}")
    for i, r in enumerate(results):
        missing = [k for k in ("image_id", "category_id", "bbox", "score", "segmentation")
                   if not isinstance(r, dict) or k not in r]
        if missing:
            raise ValueError(f"--results {path}: entry {i} lacks {', '.join(missing)}")
        if r["image_id"] not in coco_gt.imgs:
            raise ValueError(f"--results {path}: entry {i} is for image id {r['image_id']!r}, which "
                             "the annotation file does not have (run detect.py with --data and --split)")
        if r["category_id"] not in coco_gt.cats:
            raise ValueError(f"--results {path}: entry {i} has category id {r['category_id']!r}, which "
                             "the annotation file does not have")
    return results


def evaluation_pictures(coco_gt, results, evaluators, stem, min_score, image_ids) -> str:
    """Writes <stem>_confusion.png (confusion_matrix at IoU 0.5, predictions from min_score) and
    <stem>_pr_<kind>.png (plot_pr_curves) for each evaluator; returns the confusion table and the paths."""
    category_ids = sorted(coco_gt.getCatIds())
    names = {c: coco_gt.cats[c].get("name", str(c)) for c in category_ids}
    labels = [names[c] for c in category_ids] + ["background"]
    matrix = confusion_matrix(coco_gt, results, 0.5, min_score, image_ids)
    title = f"box IoU >= 0.5, score >= {min_score:g}"
    plot_confusion_matrix(matrix, labels, f"{stem}_confusion.png", title)
    lines = [f"confusion matrix ({title}):", confusion_table(matrix, labels), f"written to {stem}_confusion.png"]
    for kind, evaluator in evaluators.items():
        if evaluator is not None:
            plot_pr_curves(evaluator, names, f"{stem}_pr_{kind}.png", f"{kind}: precision-recall at IoU 0.5")
            lines.append(f"precision-recall curves ({kind}) written to {stem}_pr_{kind}.png")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
