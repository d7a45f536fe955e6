"""Runs a trained Mask R-CNN over images, folders, huge photos (in overlapping tiles) and videos.

    python detect.py --weights runs/demo/last.pth --input 'photos/*.jpg' --out runs/photos
    python detect.py --weights runs/demo/last.pth --input photos/ --out runs/photos --tile 1333
    python detect.py --weights runs/demo/last.pth --input clip.mp4 --out runs/clip --min-score 0.7
    python detect.py --weights runs/demo/last.pth --input data/shapes/val --data data/shapes --split val \\
        --min-score 0 --out runs/val      # detections.json then carries the data set's image ids

Writes into --out, and nowhere else:
    <name>.png         one picture per image (its detections drawn; at most PICTURE_MAX_SIDE pixels a side)
    <name>.mp4         one annotated video per video (H.264, the input's frame rate and size)
    detections.json    every detection as COCO results: image_id, category_id, bbox [x, y, w, h], score,
                       segmentation (compressed RLE), as pycocotools' loadRes and COCOeval take them
    images.json        {"images": [{id, file_name, height, width[, frame]}], "categories": [{id, name}]}:
                       which image (or video frame) each image_id is

Image ids: with --data, the ids of the split's annotation file, matched by file name (every input must be
in it, and be of the size it says), with its category ids: detections.json is then what COCOeval scores
against that file. Without --data: 1, 2, ... in input order (video frames each get one), and the model's
labels as category ids (torchvision's COCO weights use COCO's ids as labels).

Images whose longer side exceeds twice IMAGE_MAX_DIM (or all images, with --tile N) are cut into
overlapping tiles of IMAGE_MAX_DIM (or N) pixels; see detect_tiled. The functions work from Python too:

    from detect import detect_tiled, full_masks
    r = detect_tiled(model, image, tile=1333)        # boxes, class_ids, scores, mask_crops, mask_origins
    masks = full_masks(r, *image.shape[:2])          # [N, H, W] bool, as detect() gives them
"""

import argparse
import glob
import logging
import os
from fractions import Fraction
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import utils
import visualize
from nms import batched_nms

logger = logging.getLogger("detect")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")  # PyAV is imported only for these
# Pictures of huge photos are drawn smaller: a 6000x4000 matplotlib canvas is slow and large, and a
# picture to look at needs no more. Video frames are always drawn at their own size.
PICTURE_MAX_SIDE = 2000
# x264's constant rate factor for annotated videos: 18 is commonly taken as visually lossless
# (0 would be lossless, at several times the size).
VIDEO_CRF = 18


############################################################
#  Tiles
############################################################


class Tile(NamedTuple):
    """A window of the image the model sees, and the part of the image whose objects this tile reports."""

    window: tuple  # (x1, y1, x2, y2) integer pixels, x2 and y2 exclusive
    owned: tuple  # (x1, y1, x2, y2): a detection belongs to this tile when its box centre lies inside


def spans(length: int, tile: int, overlap: int) -> list:
    """[(start, end), ...]: windows of `tile` pixels along an axis of `length`, evenly spread, each
    overlapping the next by at least `overlap` pixels; one window (0, length) when length <= tile."""
    if length <= tile:
        return [(0, length)]
    count = -(-(length - overlap) // (tile - overlap))  # ceil: the fewest windows that keep the overlap
    return [(i * (length - tile) // (count - 1), i * (length - tile) // (count - 1) + tile) for i in range(count)]


def owned_ranges(axis_spans: list) -> list:
    """[(low, high), ...]: what each span owns along its axis, split at the middle of each overlap; the
    outer ones reach to infinity, so that every point belongs to exactly one span (low <= x < high)."""
    cuts = [(start + end) / 2 for (_, end), (start, _) in zip(axis_spans, axis_spans[1:])]
    return list(zip([-float("inf"), *cuts], [*cuts, float("inf")]))


def tiles(height: int, width: int, tile: int, overlap: int) -> list:
    """The Tiles covering a height x width image, row by row: windows of at most tile x tile pixels that
    overlap their neighbours by at least `overlap` pixels. An image no larger than `tile` is one tile."""
    for name, value in (("tile", tile), ("overlap", overlap)):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a whole number of pixels >= 0; got {value!r}")
    if not overlap < tile:
        raise ValueError(f"overlap must be smaller than tile; got overlap {overlap}, tile {tile}")
    rows, columns = spans(height, tile, overlap), spans(width, tile, overlap)
    return [Tile((x1, y1, x2, y2), (ox1, oy1, ox2, oy2))
            for (y1, y2), (oy1, oy2) in zip(rows, owned_ranges(rows))
            for (x1, x2), (ox1, ox2) in zip(columns, owned_ranges(columns))]


def tile_size(height: int, width: int, config, tile: Optional[int] = None, overlap: Optional[int] = None):
    """(tile, overlap) for an image: `tile` when given; else IMAGE_MAX_DIM for images whose longer side
    exceeds twice that (the network would shrink them more than twofold, and small objects vanish), and
    the whole image otherwise. The overlap defaults to a quarter of the tile."""
    if tile is None:
        tile = config.IMAGE_MAX_DIM if max(height, width) > 2 * config.IMAGE_MAX_DIM else max(height, width, 1)
    return tile, tile // 4 if overlap is None else overlap


############################################################
#  Detection over tiles
############################################################


def crop_masks(masks: np.ndarray, origin) -> tuple:
    """[N, h, w] bool masks of a window at origin (x, y) -> (crops, origins): each mask cut to the rows and
    columns it covers (an empty mask to 0x0), and [N, 2] int64 (x, y) of each crop in the image."""
    crops, origins = [], np.zeros((len(masks), 2), np.int64)
    for i, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if rows.size == 0:
            crops.append(np.zeros((0, 0), bool))
            origins[i] = origin
            continue
        crops.append(mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].copy())  # a copy frees the window's mask
        origins[i] = (origin[0] + cols[0], origin[1] + rows[0])
    return crops, origins


def select(result: dict, keep) -> dict:
    """The detections `keep` (indices or a bool array) of a result with cropped masks."""
    keep = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep, np.int64)
    return {"boxes": result["boxes"][keep], "class_ids": result["class_ids"][keep], "scores": result["scores"][keep],
            "mask_crops": [result["mask_crops"][i] for i in keep], "mask_origins": result["mask_origins"][keep]}


def concatenate(results: list) -> dict:
    return {"boxes": np.concatenate([r["boxes"] for r in results]).reshape(-1, 4),
            "class_ids": np.concatenate([r["class_ids"] for r in results]),
            "scores": np.concatenate([r["scores"] for r in results]),
            "mask_crops": [crop for r in results for crop in r["mask_crops"]],
            "mask_origins": np.concatenate([r["mask_origins"] for r in results]).reshape(-1, 2)}


def window_detections(result: dict, window) -> dict:
    """detect()'s result on a window at (x1, y1, ...) of the image, in the image's pixels, masks cropped."""
    x, y = window[:2]
    crops, origins = crop_masks(result["masks"], (x, y))
    return {"boxes": result["boxes"] + np.array([x, y, x, y], np.float32), "class_ids": result["class_ids"],
            "scores": result["scores"], "mask_crops": crops, "mask_origins": origins}


def merge_tiles(parts: list, image_tiles: list, nms_threshold: float) -> dict:
    """One image's detections from its tiles' (window_detections, in `image_tiles` order).

    Each tile keeps the detections whose box centre lies in the part of the image it owns (split at the
    middle of each overlap): an object that lies whole in an overlap is seen whole by both tiles and kept
    by one, and a tile that sees an object cut by its edge sees its centre on the far side of the cut,
    outside what it owns, while the neighbour that sees it whole keeps it. What is left (objects larger
    than the overlap, seen cut by both tiles) goes through class-wise NMS at DETECTION_NMS_THRESHOLD.
    One tile is detect()'s own result: nothing to merge.
    """
    if len(parts) == 1:
        return parts[0]
    kept = []
    for part, tile in zip(parts, image_tiles):
        centre = (part["boxes"][:, :2] + part["boxes"][:, 2:]) / 2  # (N, 2) x, y
        x1, y1, x2, y2 = tile.owned
        inside = (centre[:, 0] >= x1) & (centre[:, 0] < x2) & (centre[:, 1] >= y1) & (centre[:, 1] < y2)
        kept.append(select(part, inside))
    merged = concatenate(kept)
    keep = batched_nms(torch.from_numpy(merged["boxes"]), torch.from_numpy(merged["scores"]),
                       torch.from_numpy(merged["class_ids"]), nms_threshold)
    return select(merged, keep.numpy())


def as_image(image) -> np.ndarray:
    """A path (through utils.load_image) or an HxWx3 uint8 RGB array."""
    if isinstance(image, (str, os.PathLike)):
        return utils.load_image(image)
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"{image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"images must be HxWx3 uint8 RGB arrays or paths; got {got}")
    return image


@torch.no_grad()
def detect_many(model, images: list, tile: Optional[int] = None, overlap: Optional[int] = None, batch: int = 1) -> list:
    """model.detect over images of any size, large ones in tiles (tile_size says which and how large),
    `batch` windows to a call. Returns per image a dict: boxes [N, 4] float32 (x1, y1, x2, y2) in the
    image's pixels, class_ids [N] int64, scores [N] float32, by decreasing score, and the masks cut to
    what they cover: mask_crops (N bool arrays [h_i, w_i]) and mask_origins [N, 2] int64 (x, y) of each
    crop in the image (full_masks pastes them). No full-size mask is kept for any detection.
    DETECTION_MAX_INSTANCES applies per tile.
    """
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a whole number >= 1; got {batch!r}")
    images = [as_image(image) for image in images]
    plans = [tiles(*image.shape[:2], *tile_size(*image.shape[:2], model.config, tile, overlap)) for image in images]
    jobs = [(i, t) for i, plan in enumerate(plans) for t in plan]
    parts = [[] for _ in images]
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        windows = [images[i][t.window[1] : t.window[3], t.window[0] : t.window[2]] for i, t in chunk]
        for (i, t), result in zip(chunk, model.detect(windows)):
            parts[i].append(window_detections(result, t.window))
    return [merge_tiles(p, plan, model.config.DETECTION_NMS_THRESHOLD) for p, plan in zip(parts, plans)]


def detect_tiled(model, image, tile: int, overlap: Optional[int] = None, batch: int = 1) -> dict:
    """One image (HxWx3 uint8 RGB, or a path) in overlapping tiles of tile x tile pixels (overlap: a
    quarter of the tile unless given), merged as merge_tiles says; a tile at least as large as the image
    gives detect()'s result. Returns what detect_many does."""
    return detect_many(model, [image], tile, overlap, batch)[0]


def sampled_crop(crop: np.ndarray, origin, rows: np.ndarray, cols: np.ndarray) -> tuple:
    """Where a mask crop at origin (x, y) lands on a grid whose rows and columns show the image rows
    `rows` and columns `cols` (increasing): (row slice, column slice, the crop sampled there, bool)."""
    x, y = int(origin[0]), int(origin[1])
    r0, r1 = np.searchsorted(rows, [y, y + crop.shape[0]])
    c0, c1 = np.searchsorted(cols, [x, x + crop.shape[1]])
    return slice(r0, r1), slice(c0, c1), crop[np.ix_(rows[r0:r1] - y, cols[c0:c1] - x)]


def grid(height: int, width: int, size: Optional[tuple] = None) -> tuple:
    """(rows, cols): the image row and column each pixel of a size=(h, w) picture of a height x width
    image shows (nearest pixel; the identity for the image's own size)."""
    out_h, out_w = size or (height, width)
    return (((np.arange(out_h) + 0.5) * (height / out_h)).astype(np.int64),
            ((np.arange(out_w) + 0.5) * (width / out_w)).astype(np.int64))


def full_masks(result: dict, height: int, width: int, size: Optional[tuple] = None) -> np.ndarray:
    """[N, h, w] bool: the cropped masks of a result pasted into an image of height x width pixels, or
    sampled (nearest pixel) onto size=(h, w) pixels covering that image."""
    rows, cols = grid(height, width, size)
    masks = np.zeros((len(result["mask_crops"]), len(rows), len(cols)), bool)
    for mask, crop, origin in zip(masks, result["mask_crops"], result["mask_origins"]):
        row_slice, col_slice, sampled = sampled_crop(crop, origin, rows, cols)
        mask[row_slice, col_slice] = sampled
    return masks


############################################################
#  Results: COCO JSON and pictures
############################################################


def crop_rle(crop: np.ndarray, origin, height: int, width: int) -> dict:
    """COCO RLE (compressed, counts as a str) of the height x width mask that is `crop` (bool [h, w]) at
    origin (x, y) and empty elsewhere, from the crop alone: COCO's runs go down the columns, and only the
    crop's columns hold ones (encoding the full mask would cost a 6000x4000 pass per detection)."""
    from pycocotools import mask as coco_mask

    x, y = int(origin[0]), int(origin[1])
    h, w = crop.shape
    columns = np.zeros((w, h + 2), bool)  # (w, h + 2): the crop's columns with a zero above and below
    columns[:, 1:-1] = crop.T
    flat = columns.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # where runs of ones start and end, alternately
    column, row = np.divmod(change, h + 2)
    edges = (x + column) * height + y + row - 1  # the same places as indices into the column-major mask
    starts, ends = edges[0::2], edges[1::2]
    apart = starts[1:] != ends[:-1]  # a run down to a crop as high as the image goes on in the next column
    if len(starts):
        starts, ends = starts[np.concatenate([[True], apart])], ends[np.concatenate([apart, [True]])]
    counts = np.diff(np.concatenate([[0], np.stack([starts, ends], 1).reshape(-1), [height * width]]))
    if len(counts) > 1 and counts[-1] == 0:  # COCO's counts end with the last run, not an empty one
        counts = counts[:-1]
    rle = coco_mask.frPyObjects({"counts": counts.tolist(), "size": [height, width]}, height, width)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def coco_results(result: dict, image_id: int, height: int, width: int, label_to_category=None) -> list:
    """One image's detections as COCO results (bbox [x, y, w, h], compressed RLE), with the category id
    of each label (label_to_category; the label itself when None)."""
    entries = []
    for i in range(len(result["scores"])):
        x1, y1, x2, y2 = (float(v) for v in result["boxes"][i])
        label = int(result["class_ids"][i])
        rle = crop_rle(result["mask_crops"][i], result["mask_origins"][i], height, width)
        entries.append({"image_id": image_id, "category_id": label_to_category[label] if label_to_category else label,
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(result["scores"][i]), "segmentation": rle})
    return entries


def picture(image: np.ndarray, result: dict, class_names, max_side: Optional[int] = PICTURE_MAX_SIDE,
            alpha: float = 0.5) -> np.ndarray:
    """The image with its detections drawn, shrunk so that its longer side is at most max_side (None:
    the image's own size): each mask blended with its class's colour (visualize.color), then the boxes
    and "class score" labels of visualize.render_instances. Masks are blended crop by crop, so no stack
    of full-size masks is made (render_instances would need one, and draws an outline per contour,
    which for hundreds of detections takes longer than detecting them). Returns HxWx3 uint8."""
    height, width = image.shape[:2]
    scale = 1.0 if max_side is None else min(1.0, max_side / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    if size != (height, width):
        image = np.asarray(Image.fromarray(image).resize(size[::-1], Image.Resampling.BILINEAR))
    blended = image.astype(np.float32)
    rows, cols = grid(height, width, size)
    for crop, origin, class_id in zip(result["mask_crops"], result["mask_origins"], result["class_ids"]):
        row_slice, col_slice, sampled = sampled_crop(crop, origin, rows, cols)
        region = blended[row_slice, col_slice]  # a view: blending writes into the picture
        region[sampled] = (1 - alpha) * region[sampled] + alpha * 255 * np.asarray(visualize.color(int(class_id)))
    boxes = result["boxes"] * np.array([size[1] / width, size[0] / height] * 2, np.float32)
    return visualize.render_instances(blended.round().astype(np.uint8), boxes, None, result["class_ids"],
                                      class_names, result["scores"])


############################################################
#  Inputs and videos
############################################################


def list_inputs(spec: str) -> list:
    """The files an --input names: an image or video file, a folder (its image and video files, not its
    subfolders) or a glob pattern ('photos/*.jpg', 'photos/**/*.png'), sorted."""
    suffixes = IMAGE_SUFFIXES + VIDEO_SUFFIXES
    if os.path.isfile(spec):
        if not spec.lower().endswith(suffixes):
            raise ValueError(f"--input {spec!r} is neither an image nor a video; expected a file ending in "
                             f"{', '.join(suffixes)}")
        return [spec]
    if os.path.isdir(spec):
        found = sorted(os.path.join(spec, name) for name in os.listdir(spec))
    else:
        found = sorted(glob.glob(spec, recursive=True))
        if not found and not glob.has_magic(spec):
            raise FileNotFoundError(f"--input {spec!r}: no such file or folder (expected an image, a video, a "
                                    "folder or a glob pattern such as 'photos/*.jpg')")
    files = [f for f in found if os.path.isfile(f) and f.lower().endswith(suffixes)]
    if not files:
        raise ValueError(f"--input {spec!r}: no image or video there (files ending in {', '.join(suffixes)})")
    return files


def is_video(path) -> bool:
    return str(path).lower().endswith(VIDEO_SUFFIXES)


def output_names(paths: list, suffixes: list) -> list:
    """Names under --out for the inputs: each path relative to the inputs' common folder, its suffix
    replaced by the output's; where two would collide, the input's own suffix is kept before it."""
    absolute = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(p) for p in absolute])
    relative = [os.path.relpath(p, root) for p in absolute]
    names = [os.path.splitext(r)[0] + s for r, s in zip(relative, suffixes)]
    return [r + s if names.count(n) > 1 else n for r, s, n in zip(relative, suffixes, names)]


def video_stream(container, path):
    """A container's first video stream."""
    if not container.streams.video:
        raise ValueError(f"video {path} has no video stream")
    return container.streams.video[0]


def video_properties(path) -> tuple:
    """(frame rate as a Fraction, frame count or 0 when the container does not say) of a video's first
    video stream."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = video_stream(container, path)
            return Fraction(stream.average_rate or stream.guessed_rate or 30), int(stream.frames or 0)
    except av.FFmpegError as error:
        raise ValueError(f"cannot read video {path}: {error}") from error


def read_video(path):
    """The frames of a video's first video stream, decoded by FFmpeg (PyAV), as HxWx3 uint8 RGB arrays, turned
    upright as players show them: a phone stores a portrait video as landscape frames and a display matrix
    that rotates them (frame.rotation, counter-clockwise degrees; to the nearest quarter turn)."""
    import av

    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video_stream(container, path)):
                pixels = frame.to_ndarray(format="rgb24")
                quarter_turns = round(frame.rotation / 90) % 4
                yield np.ascontiguousarray(np.rot90(pixels, quarter_turns)) if quarter_turns else pixels
    except av.FFmpegError as error:
        raise ValueError(f"cannot read video {path}: {error}") from error


def write_video(path, frames, fps, crf: int = VIDEO_CRF) -> int:
    """Encodes HxWx3 uint8 RGB frames (an iterable; all of one size) as H.264 in `path` (MP4) at `fps`
    frames a second, at x264's constant rate factor `crf`: 4:2:0 chroma (what every player plays) when
    both sides are even, else 4:4:4; crf 0 is lossless up to the RGB <-> YUV rounding (4:4:4 always).
    Returns the number of frames written."""
    import av

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    count = 0
    with av.open(str(path), "w") as container:
        stream = None
        for frame in frames:
            if stream is None:
                height, width = frame.shape[:2]
                stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(100_000))
                stream.width, stream.height = width, height
                subsample = crf > 0 and height % 2 == 0 and width % 2 == 0  # 4:2:0 needs even sides
                stream.pix_fmt = "yuv420p" if subsample else "yuv444p"
                stream.options = {"crf": str(crf)}
            if frame.shape[:2] != (stream.height, stream.width):
                raise ValueError(f"write_video: frame {count} is {frame.shape[:2]}; the first was "
                                 f"{(stream.height, stream.width)}")
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
            count += 1
        if stream is not None:
            container.mux(stream.encode())  # flush the frames the encoder still holds
    return count


def batches(items, size: int):
    """Lists of `size` consecutive items of an iterable (the last may be shorter)."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


############################################################
#  Command line
############################################################


def image_ids_from_data(paths: list, dataset) -> list:
    """The data set's image id of each input, matched by file name; every input must be in it."""
    by_name = {}
    for image_id, info in dataset.coco.imgs.items():
        by_name.setdefault(os.path.basename(info["file_name"]), []).append(image_id)
    missing = [p for p in paths if len(by_name.get(os.path.basename(p), [])) != 1]
    if missing:
        raise SystemExit(f"--data: {len(missing)} inputs are not (or not once) in {dataset.annotation_file}, "
                         f"e.g. {missing[:3]}; with --data every input must be an image of that split")
    return [by_name[os.path.basename(p)][0] for p in paths]


class Run(NamedTuple):
    """What the loop over the inputs needs besides the model."""

    out: str
    min_score: float
    tile: Optional[int]
    overlap: Optional[int]
    batch: int
    class_names: tuple
    label_to_category: Optional[dict]
    sizes: Optional[dict]  # with --data: image id -> (height, width) as the annotation file says


def detect_and_record(model, run: Run, images: list, image_ids: list, results: list, max_side) -> list:
    """Detects a batch of images, appends their COCO results to `results`, returns their pictures."""
    pictures = []
    for image, image_id, result in zip(images, image_ids, detect_many(model, images, run.tile, run.overlap, run.batch)):
        result = select(result, result["scores"] >= run.min_score)
        results += coco_results(result, image_id, *image.shape[:2], run.label_to_category)
        pictures.append(picture(image, result, run.class_names, max_side))
    return pictures


def run_images(model, run: Run, paths, names, image_ids, results: list, progress):
    """Every image: its picture under --out and its COCO results; returns their images.json entries."""
    entries = []
    for chunk in batches(list(zip(paths, names, image_ids)), run.batch):
        images = [utils.load_image(path) for path, _, _ in chunk]
        for (path, _, image_id), image in zip(chunk, images):
            if run.sizes and run.sizes[image_id] != image.shape[:2]:
                raise ValueError(f"image {path} is {image.shape[1]}x{image.shape[0]} (WxH, EXIF orientation "
                                 f"applied) but --data says {run.sizes[image_id][1]}x{run.sizes[image_id][0]}")
        pictures = detect_and_record(model, run, images, [i for _, _, i in chunk], results, PICTURE_MAX_SIDE)
        for (path, name, image_id), image, drawn in zip(chunk, images, pictures):
            target = os.path.join(run.out, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            Image.fromarray(drawn).save(target)
            entries.append({"id": image_id, "file_name": path, "height": image.shape[0], "width": image.shape[1]})
            progress.update(1)
    return entries


def run_video(model, run: Run, path, name, first_id: int, results: list, progress):
    """A video: its annotated copy under --out (same frame rate, size and frame count) and the COCO
    results of every frame, with image ids from first_id on; returns the frames' images.json entries."""
    entries = []

    def annotated():
        for chunk in batches(read_video(path), run.batch):
            ids = list(range(first_id + len(entries), first_id + len(entries) + len(chunk)))
            yield from detect_and_record(model, run, chunk, ids, results, max_side=None)
            entries.extend({"id": i, "file_name": path, "frame": i - first_id, "height": f.shape[0],
                            "width": f.shape[1]} for i, f in zip(ids, chunk))
            progress.update(len(chunk))

    write_video(os.path.join(run.out, name), annotated(), video_properties(path)[0])
    return entries


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Mask R-CNN over images, folders, huge photos (tiles) and videos.")
    parser.add_argument("--weights", required=True, help="checkpoint path (train.py's), or coco / coco_v2")
    parser.add_argument("--input", required=True,
                        help="an image, a video, a folder, or a glob pattern in quotes ('photos/*.jpg')")
    parser.add_argument("--out", required=True, help="folder for the pictures, videos and JSON files")
    parser.add_argument("--config", default="coco", help="preset for weights without a config (coco, shapes, "
                        "custom, d2_r50_fpn_3x, d2_r101_fpn_3x)")
    parser.add_argument("--min-score", type=float, default=0.5,
                        help="keep detections scoring at least this (0 keeps all the model reports, for COCOeval)")
    parser.add_argument("--batch", type=int, default=1, help="images (or tiles, or frames) per forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tile", type=int,
                        help="tile side in pixels for every image (default: IMAGE_MAX_DIM, only for images "
                        "whose longer side exceeds twice that)")
    parser.add_argument("--overlap", type=int, help="pixels shared by neighbouring tiles (default: tile / 4)")
    parser.add_argument("--data", help="a COCO-format data root: take image and category ids from its annotations")
    parser.add_argument("--split", help="with --data: the split (default: the config's VAL_SPLIT)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)
    if not 0 <= args.min_score <= 1:
        parser.error(f"--min-score must be in [0, 1]; got {args.min_score}")
    if args.batch < 1:
        parser.error(f"--batch must be >= 1; got {args.batch}")
    if args.tile is not None and args.tile < 1:
        parser.error(f"--tile must be >= 1 pixel; got {args.tile}")
    if args.overlap is not None and not 0 <= args.overlap < (args.tile or float("inf")):
        parser.error(f"--overlap must be >= 0 and smaller than --tile; got {args.overlap}")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        paths = list_inputs(args.input)
    except (OSError, ValueError) as error:
        raise SystemExit(str(error)) from error

    import coco
    from config import named_config
    from model import MaskRCNN

    model = MaskRCNN.from_checkpoint(args.weights, args.set, args.device, config=named_config(args.config)).eval()
    config = model.config
    names = output_names(paths, [".mp4" if is_video(p) else ".png" for p in paths])
    stills = [i for i, p in enumerate(paths) if not is_video(p)]
    videos = [i for i, p in enumerate(paths) if is_video(p)]
    label_to_category, sizes, image_ids = None, None, list(range(1, len(stills) + 1))  # frames numbered after
    if not config.LABELS_ARE_CATEGORY_IDS and len(config.CATEGORY_IDS) == config.NUM_CLASSES - 1 > 0:
        label_to_category = dict(enumerate(config.CATEGORY_IDS, start=1))
    if args.data:
        if videos:
            raise SystemExit("--data: videos have no image ids in an annotation file; run them without --data")
        dataset = coco.CocoDataset(args.data, args.split or config.VAL_SPLIT, config.LABELS_ARE_CATEGORY_IDS)
        label_to_category, image_ids = dataset.label_to_category, image_ids_from_data(paths, dataset)
        sizes = {i: (info["height"], info["width"]) for i, info in dataset.coco.imgs.items()}
    run = Run(args.out, args.min_score, args.tile, args.overlap, args.batch, config.CLASS_NAMES, label_to_category,
              sizes)
    os.makedirs(args.out, exist_ok=True)

    frames = [video_properties(paths[i])[1] for i in videos]
    total = len(paths) - len(videos) + sum(frames) if all(frames) else None
    results, entries = [], []
    with tqdm(total=total, desc="detect", unit="image", dynamic_ncols=True) as progress:
        entries += run_images(model, run, [paths[i] for i in stills], [names[i] for i in stills], image_ids,
                              results, progress)
        for i in videos:
            first_id = max([e["id"] for e in entries], default=0) + 1
            entries += run_video(model, run, paths[i], names[i], first_id, results, progress)
    categories = sorted(set(label_to_category.values())) if label_to_category else range(1, config.NUM_CLASSES)
    label_of = {c: label for label, c in (label_to_category or {c: c for c in categories}).items()}
    utils.write_json_atomic(os.path.join(args.out, "images.json"), {
        "images": entries, "categories": [{"id": c, "name": config.CLASS_NAMES[label_of[c]]} for c in categories]})
    utils.write_json_atomic(os.path.join(args.out, "detections.json"), results)
    logger.info("%d detections in %d images and %d videos written to %s", len(results), len(stills), len(videos),
                args.out)


if __name__ == "__main__":
    main()
