"""The embedded default data set: synthetic shapes written in COCO format.

Each image has a random background (a colour gradient with noise) and one to five shapes (squares,
circles, triangles and stars) of random size, colour and rotation, which may overlap. Annotations are
the visible part of each shape, as compressed RLE, in the same `annotations/instances_<split>.json`
plus `<split>/*.png` layout as COCO, so the same loader and evaluator serve both.

Everything is drawn from numpy generators seeded by (seed, split, image index), so a data set is
the same on every machine and every run, whatever order the images are made in.

    python shapes.py --out data/shapes [--train 2000] [--val 200] [--size 128] [--seed 0]
"""

import argparse
import math
import os
import shutil
import tempfile

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image
from skimage.draw import disk, polygon

import utils

CLASSES = ("square", "circle", "triangle", "star")  # category ids 1..4
DEFAULT_ROOT = "data/shapes"  # where --config shapes reads the data set (and first writes it) without --data
SPLIT_SEEDS = {"train": 0, "val": 1}
MIN_VISIBLE = 0.6  # a shape that later ones would hide by more than 40% is not drawn
MIN_CONTRAST = 80.0  # minimum distance (RGB, 0-255) between a shape's colour and the background's mean


def star_vertices(cx, cy, radius, angle):
    """Five-pointed star: outer points on `radius`, inner ones on 0.45 * radius."""
    angles = angle + np.arange(10) * math.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
    return cx + radii * np.sin(angles), cy - radii * np.cos(angles)


def regular_vertices(cx, cy, radius, sides, angle):
    angles = angle + np.arange(sides) * 2 * math.pi / sides
    return cx + radius * np.sin(angles), cy - radius * np.cos(angles)


def shape_mask(kind, cx, cy, size, angle, shape):
    """Boolean mask of one shape; `size` is the diameter of its circumscribed circle (pixels)."""
    mask = np.zeros(shape, bool)
    radius = size / 2
    if kind == "circle":
        rows, cols = disk((cy, cx), radius, shape=shape)
    else:
        if kind == "square":
            xs, ys = regular_vertices(cx, cy, radius, 4, angle + math.pi / 4)
        elif kind == "triangle":
            xs, ys = regular_vertices(cx, cy, radius, 3, angle)
        else:
            xs, ys = star_vertices(cx, cy, radius, angle)
        rows, cols = polygon(ys, xs, shape=shape)
    mask[rows, cols] = True
    return mask


def background(rng, height, width):
    """A linear gradient between two random colours with Gaussian noise, float RGB in [0, 255]."""
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    direction = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width]
    t = (np.cos(direction) * xs / width + np.sin(direction) * ys / height + 1) / 2
    image = start + (end - start) * t[..., None]
    return image + rng.normal(0, rng.uniform(0, 12), image.shape)


def make_image(seed, split, index, size):
    """One image (HxWx3 uint8) and its instances [(category index, visible mask)], fully determined
    by (seed, split, index). Every shape drawn is annotated: a shape that later ones would hide by
    more than 1 - MIN_VISIBLE is left out of the picture altogether."""
    rng = np.random.default_rng([seed, SPLIT_SEEDS[split], index])
    image = background(rng, size, size)
    mean = image.reshape(-1, 3).mean(0)
    candidates = []  # (category, full mask, colour) in drawing order: later shapes cover earlier ones
    for _ in range(rng.integers(1, 6)):
        kind = int(rng.integers(len(CLASSES)))
        diameter = rng.uniform(0.15, 0.5) * size
        cx, cy = rng.uniform(diameter / 3, size - diameter / 3, 2)
        mask = shape_mask(CLASSES[kind], cx, cy, diameter, rng.uniform(0, 2 * math.pi), (size, size))
        colour = rng.uniform(0, 255, 3)
        while np.linalg.norm(colour - mean) < MIN_CONTRAST:
            colour = rng.uniform(0, 255, 3)
        if mask.sum() >= 16:
            candidates.append((kind, mask, colour))
    kept = []  # topmost first, with the part of each that stays visible
    covered = np.zeros((size, size), bool)
    for kind, mask, colour in reversed(candidates):
        visible = mask & ~covered
        if visible.sum() >= MIN_VISIBLE * mask.sum():
            kept.append((kind, mask, colour, visible))
            covered |= mask
    for _, mask, colour, _ in reversed(kept):  # paint bottom to top
        image[mask] = colour + rng.normal(0, 4, (int(mask.sum()), 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    return image, [(kind, visible) for kind, _, _, visible in reversed(kept)]


def annotation(instance_id, image_id, kind, mask):
    rle = utils.mask_to_rle(mask)  # counts as str, as JSON needs
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return {
        "id": instance_id, "image_id": image_id, "category_id": kind + 1, "iscrowd": 0,
        "area": float(mask_utils.area(rle)), "bbox": [x, y, w, h],
        "segmentation": {"size": list(rle["size"]), "counts": rle["counts"]},
    }


def write_split(out, split, count, size, seed):
    """Writes out/<split>/*.png and out/annotations/instances_<split>.json."""
    image_dir = os.path.join(out, split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        image, instances = make_image(seed, split, index, size)
        name = f"{index:06d}.png"
        # zlib level 1: half the time of the default 6 (the data set is written on every fresh `make demo`)
        # for 10% larger files; PNG is lossless at every level.
        Image.fromarray(image).save(os.path.join(image_dir, name), compress_level=1)
        image_id = index + 1
        images.append({"id": image_id, "file_name": name, "height": size, "width": size})
        for kind, mask in instances:
            annotations.append(annotation(len(annotations) + 1, image_id, kind, mask))
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    data = {"info": {"description": f"synthetic shapes, seed {seed}"}, "images": images,
            "annotations": annotations, "categories": categories}
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    utils.write_json_atomic(os.path.join(out, "annotations", f"instances_{split}.json"), data)
    return len(images), len(annotations)


def generate(out, train=2000, val=200, size=128, seed=0):
    """Writes the data set to `out` (built in a temporary folder beside it, then renamed, so an
    interrupted run never leaves a half-written data set where a complete one is expected)."""
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; remove it first or choose another --out")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(dir=parent, prefix=".shapes-")
    try:
        counts = {split: write_split(work, split, n, size, seed) for split, n in (("train", train), ("val", val))}
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return counts


def ensure(out, **kwargs):
    """Generates the data set at `out` unless it is already there."""
    if not os.path.exists(os.path.join(out, "annotations", "instances_val.json")):
        print(f"writing the shapes data set to {out}")
        generate(out, **kwargs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_ROOT, help="folder to create")
    parser.add_argument("--train", type=int, default=2000, help="training images")
    parser.add_argument("--val", type=int, default=200, help="validation images")
    parser.add_argument("--size", type=int, default=128, help="image side (pixels)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = generate(args.out, args.train, args.val, args.size, args.seed)
    for split, (images, objects) in counts.items():
        print(f"{split}: {images} images, {objects} objects -> {os.path.join(args.out, split)}")


if __name__ == "__main__":
    main()
