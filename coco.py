"""COCO-format data (pycocotools): the training data set, its batch sampler, and evaluation with COCOeval
(bbox, segm, and Boundary AP when faster-coco-eval is installed).

Layout, as COCO's: <data>/annotations/instances_<split>.json and the images in <data>/<split>/.

    python coco.py evaluate --config coco --data /path/to/coco --weights runs/coco/last.pth
"""

import argparse
import contextlib
import io
import json
import logging
import os
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


############################################################
#  Data set
############################################################


class CocoDataset(torch.utils.data.Dataset):
    """A COCO-format data set.

    Item `i` (or `(i, hflip)` from the training sampler) is (image [3, H, W] float in [0, 1], target)
    with target: boxes [K, 4] float32 (x1, y1, x2, y2), labels [K] int64, masks [K, H, W] uint8,
    crowd_boxes [C, 4] (iscrowd regions: neither objects nor background), image_id.

    Labels are contiguous 1..K in sorted category-id order (`label_to_category` maps them back), or the
    category ids themselves with labels_are_category_ids (torchvision's COCO models). Masks stay as
    polygons or RLE until an item is built. Images without annotations are kept (negatives). Objects
    whose box has no width or height inside the image are dropped, with one warning that counts them.
    """

    def __init__(self, root, split, labels_are_category_ids=False):
        self.root, self.split = root, split
        self.annotation_file = os.path.join(root, "annotations", f"instances_{split}.json")
        self.image_dir = os.path.join(root, split)
        self.coco = load_coco(self.annotation_file)
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
        self.objects, self.crowds, dropped = {}, {}, 0
        for image_id in self.image_ids:
            info = self.coco.imgs[image_id]
            self.objects[image_id], self.crowds[image_id] = [], []
            for ann in self.coco.imgToAnns.get(image_id, []):
                box = clipped_box(ann, info)
                if box is None:
                    dropped += 1
                elif ann.get("iscrowd", 0):
                    self.crowds[image_id].append(box)
                else:
                    self.objects[image_id].append((box, ann))
        if dropped:
            logger.warning("%s: dropped %d of %d annotations whose box has no width or height inside its image",
                           self.annotation_file, dropped, len(self.coco.anns))
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


def load_coco(annotation_file) -> COCO:
    """pycocotools' COCO index of a file, with clear errors for a missing, unreadable or malformed one."""
    if not os.path.exists(annotation_file):
        raise FileNotFoundError(f"annotation file not found: {annotation_file}")
    try:
        with open(annotation_file) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"annotation file {annotation_file} is not valid JSON: {error}") from error
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"annotation file {annotation_file} needs 'images', 'annotations' and 'categories' "
                         f"(COCO instances format); got {keys}")
    image_ids = {im.get("id") for im in data["images"]}
    category_ids = {c.get("id") for c in data["categories"]}
    for image in data["images"]:
        missing = [k for k in ("id", "file_name", "height", "width") if k not in image]
        if missing:
            raise ValueError(f"{annotation_file}: image entry {image} lacks {', '.join(missing)}")
    for ann in data["annotations"]:
        where = f"{annotation_file}: annotation {ann.get('id')}"
        if ann.get("image_id") not in image_ids:
            raise ValueError(f"{where} refers to image_id {ann.get('image_id')!r}, which is not in 'images'")
        if ann.get("category_id") not in category_ids:
            raise ValueError(f"{where} has category_id {ann.get('category_id')!r}, which is not in 'categories'")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise ValueError(f"{where} needs 'bbox' as [x, y, width, height]; got {bbox!r}")
        if "segmentation" not in ann:
            raise ValueError(f"{where} has no 'segmentation' (polygons or RLE)")
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
        if isinstance(segmentation, list):  # polygons; fewer than 3 points make no area
            polygons = [p for p in segmentation if len(p) >= 6]
            mask = utils.polygons_to_mask(polygons, height, width) if polygons else np.zeros((height, width), bool)
        elif isinstance(segmentation, dict):
            mask = utils.rle_to_mask(segmentation, height, width)
        else:
            raise TypeError(f"unknown segmentation type {type(segmentation).__name__}")
    except Exception as error:
        raise ValueError(f"annotation {ann.get('id')}: cannot decode its segmentation ({error})") from error
    if mask.shape != (height, width):
        raise ValueError(f"annotation {ann.get('id')}: mask is {mask.shape}, image is {(height, width)}")
    return mask


def collate(batch):
    """A list of (image, target) into (images, targets), as the model takes them."""
    return tuple(zip(*batch))


############################################################
#  Training batches
############################################################


class TrainingBatchSampler(torch.utils.data.Sampler):
    """Endless batches of (index, hflip) for one process, starting at batch `start`.

    Every epoch is a permutation seeded by (seed, epoch), split among the processes; images are
    grouped by aspect ratio (wider than high or not) so that a batch pads little, and each is
    flipped with probability 0.5 when `hflip`. Batch k of a process is a function of (seed, k, rank,
    world_size) alone, so a run resumed at iteration k sees the same data as one that never stopped.
    """

    def __init__(self, aspect_ratios, batch_size, seed=0, rank=0, world_size=1, hflip=True, start=0):
        if len(aspect_ratios) < world_size * batch_size:
            raise ValueError(f"the data set has {len(aspect_ratios)} images; {world_size} processes of "
                             f"{batch_size} images a batch need at least {world_size * batch_size}")
        self.wide = [r >= 1 for r in aspect_ratios]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.hflip, self.start = hflip, start

    def __iter__(self):
        count, epoch = 0, 0
        while True:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(len(self.wide), generator=generator).tolist()
            flips = (torch.rand(len(self.wide), generator=generator) < 0.5).tolist()
            groups = {True: [], False: []}
            for index in order[self.rank :: self.world_size]:
                group = groups[self.wide[index]]
                group.append((index, self.hflip and flips[index]))
                if len(group) == self.batch_size:
                    if count >= self.start:
                        yield list(group)
                    count += 1
                    group.clear()
            epoch += 1


############################################################
#  Evaluation (COCOeval, bbox, segm and boundary)
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


def coco_evaluator(coco_gt, results, kind):
    """pycocotools' COCOeval for kind "bbox" or "segm"; for "boundary", faster-coco-eval's, whose
    Boundary AP (Cheng et al., CVPR 2021) is mask AP with each IoU replaced by min(mask IoU, boundary
    IoU), a mask's boundary being its pixels within d = 2% of the image diagonal of its contour (the
    mask minus its erosion by d). Its bbox and segm numbers equal pycocotools' on the shapes data."""
    if kind == "boundary":
        gt = faster_coco_eval.COCO(coco_gt.dataset, use_deepcopy=True)  # it adds RLEs to the annotations
        return faster_coco_eval.COCOeval_faster(gt, gt.loadRes([dict(r) for r in results]), kind)
    return COCOeval(coco_gt, coco_gt.loadRes([dict(r) for r in results]), kind)


def coco_metrics(coco_gt, results, image_ids=None):
    """COCOeval for bbox, segm and (with faster-coco-eval installed) boundary. Returns
    ({"bbox": {AP, AP50, ...}, "segm": {...}, "boundary": {...}}, printable table)."""
    metrics, table = {}, []
    for kind in ("bbox", "segm") + (("boundary",) if faster_coco_eval is not None else ()):
        if not results:  # pycocotools cannot load an empty result list
            metrics[kind] = dict.fromkeys(STAT_NAMES, 0.0)
            table.append(f"{kind}: no detections")
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = coco_evaluator(coco_gt, results, kind)
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
    parser = argparse.ArgumentParser(description="COCO-format evaluation (bbox, segm and, with faster-coco-eval, "
                                                 "Boundary AP) with pycocotools.")
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
