"""COCO-format data (pycocotools): the training data set, its batch sampler, and evaluation with COCOeval.

Layout, as COCO's: <data>/annotations/instances_<split>.json and the images in <data>/<split>/.

    python coco.py evaluate --config coco --data /path/to/coco --weights runs/coco/last.pth
"""

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import logging
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

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
        path = os.path.join(self.image_dir, info["file_name"])
        image = utils.load_image(path)
        height, width = info["height"], info["width"]
        if image.shape[:2] != (height, width):
            raise ValueError(f"image {path} is {image.shape[1]}x{image.shape[0]} (WxH) but {self.annotation_file} "
                             f"says {width}x{height}")
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
#  Evaluation (COCOeval, bbox and segm)
############################################################


def detections_to_coco(output, image_id, label_to_category, mask_threshold):
    """One image's model output (eval mode) as COCO results: xywh boxes, category ids, RLE masks."""
    boxes = output["boxes"].float().cpu()
    boxes[:, 2:] -= boxes[:, :2]
    masks = (output["masks"][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
    rles = coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []
    results = []
    for box, label, score, rle in zip(boxes.tolist(), output["labels"].tolist(), output["scores"].tolist(), rles):
        rle["counts"] = rle["counts"].decode("ascii")
        results.append({"image_id": image_id, "category_id": label_to_category[label], "bbox": box,
                        "score": score, "segmentation": rle})
    return results


def coco_metrics(coco_gt, results, image_ids=None):
    """COCOeval for bbox and segm. Returns ({"bbox": {AP, AP50, ...}, "segm": {...}}, printable table)."""
    metrics, table = {}, []
    for kind in ("bbox", "segm"):
        if not results:  # pycocotools cannot load an empty result list
            metrics[kind] = dict.fromkeys(STAT_NAMES, 0.0)
            table.append(f"{kind}: no detections")
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes([dict(r) for r in results])
            evaluator = COCOeval(coco_gt, coco_dt, kind)
            if image_ids is not None:
                evaluator.params.imgIds = list(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
        summary = io.StringIO()
        with contextlib.redirect_stdout(summary):
            evaluator.summarize()
        metrics[kind] = {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}
        table.append(f"{kind}:\n{summary.getvalue().rstrip()}")
    return metrics, "\n".join(table)


@torch.no_grad()
def evaluate(model, dataset, batch_size=8, device="cpu", limit=None, amp=False, progress=True):
    """Runs the model on the data set (split among the processes under torch.distributed) and scores it
    with COCOeval on the first process. Returns (metrics, table, results); the other processes get
    (None, None, None)."""
    from tqdm import tqdm

    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = list(range(len(dataset) if limit is None else min(limit, len(dataset))))
    mine = indices[rank::world_size]
    was_training = model.training
    model.eval()
    config = model.module.config if hasattr(model, "module") else model.config
    results = []
    started = time.perf_counter()
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    for batch in tqdm(batches, desc="evaluate", disable=not progress or rank != 0, leave=False):
        items = [dataset[i] for i in batch]
        images = [image.to(device) for image, _ in items]
        with torch.autocast(torch.device(device).type, enabled=amp):
            outputs = model(images)
        for output, (_, target) in zip(outputs, items):
            results += detections_to_coco(output, target["image_id"], dataset.label_to_category,
                                          config.MASK_THRESHOLD)
    model.train(was_training)
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    if rank != 0:
        return None, None, None
    image_ids = [dataset.image_ids[i] for i in indices]
    metrics, table = coco_metrics(dataset.coco, results, image_ids)
    logger.info("evaluated %d images in %.1f s", len(indices), time.perf_counter() - started)
    return metrics, table, results


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


def main(argv=None):
    parser = argparse.ArgumentParser(description="COCO-format evaluation (bbox and segm) with pycocotools.")
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="evaluate a model on a split of a COCO-format data set")
    ev.add_argument("--config", default="coco", help="preset: coco or shapes (a checkpoint's own config wins)")
    ev.add_argument("--data", help="data root (annotations/ and the image folders); default: "
                    f"{shapes.DEFAULT_ROOT} for shapes")
    ev.add_argument("--weights", required=True, help="checkpoint path, or coco / coco_v2 (torchvision's)")
    ev.add_argument("--split", help="default: the config's VAL_SPLIT")
    ev.add_argument("--out", help="metrics JSON (default: eval_<split>.json beside the weights file)")
    ev.add_argument("--detections", help="also write the detections (COCO results JSON) here")
    ev.add_argument("--batch-size", type=int, default=4)
    ev.add_argument("--limit", type=int, help="evaluate the first N images only")
    ev.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ev.add_argument("--amp", action="store_true", help="autocast (bfloat16 on CPU, float16 on GPU)")
    ev.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from config import named_config
    from model import MaskRCNN

    data = data_root(args.config, args.data)
    model = MaskRCNN.from_checkpoint(args.weights, args.set, args.device, config=named_config(args.config))
    config = model.config
    if args.config == "shapes":
        shapes.ensure(data)
    split = args.split or config.VAL_SPLIT
    dataset = CocoDataset(data, split, config.LABELS_ARE_CATEGORY_IDS)
    metrics, table, results = evaluate(model, dataset, args.batch_size, args.device, args.limit, args.amp)
    print(table)
    if os.path.isfile(str(args.weights)):
        default_out = os.path.join(os.path.dirname(os.path.abspath(args.weights)), f"eval_{split}.json")
    else:
        default_out = f"eval_{split}.json"
    out = args.out or default_out
    utils.write_json_atomic(out, {**metrics, "weights": str(args.weights), "data": data, "split": split,
                                  "images": len(dataset) if args.limit is None else min(args.limit, len(dataset))})
    print(f"metrics written to {out}")
    if args.detections:
        utils.write_json_atomic(args.detections, results)


if __name__ == "__main__":
    main()
