"""Helpers that are not layers of the network: IoU, images, masks (RLE and polygons), weight files."""

import json
import os
import urllib.error

import numpy as np
import torch
from torch import Tensor

# torchvision's published weights, by the short names load_weights accepts.
WEIGHT_URLS = {
    "coco": "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth",
    "coco_v2": "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth",
    "imagenet:resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "imagenet:resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "imagenet:resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "imagenet:resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
}


############################################################
#  Boxes
############################################################


def box_area(boxes: Tensor) -> Tensor:
    """[N, 4] (x1, y1, x2, y2) -> [N] areas (no "+1")."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_intersection(a: Tensor, b: Tensor) -> Tensor:
    """Intersection area of every pair: a [N, 4], b [M, 4] -> [N, M]."""
    top_left = torch.max(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.min(a[:, None, 2:], b[None, :, 2:])
    return (bottom_right - top_left).clamp(min=0).prod(dim=2)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of every pair: a [N, 4], b [M, 4] -> [N, M]."""
    inter = box_intersection(a, b)
    return inter / (box_area(a)[:, None] + box_area(b)[None, :] - inter)


############################################################
#  Images
############################################################


# Pillow modes that hold more than 8 bits of grey per pixel: 16-bit PNG and TIFF open as one of these.
WIDE_GREY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def load_image(path) -> np.ndarray:
    """An image file as an HxWx3 uint8 RGB array, upright, as people see it in a photo viewer.

    - EXIF orientation (phone photos taken sideways) is applied, so the array is the upright picture.
    - Grey ("L", "1"), palette ("P") and CMYK or YCbCr images are converted to RGB by Pillow.
    - Alpha is dropped (RGBA, LA, PA): the colour channels are kept as stored, not composited on a
      background, so transparent pixels show whatever colour the file holds there.
    - 16-bit grey ("I;16", and "I" with values in 0..65535) is scaled by the 16-bit range, not by the
      image's own minimum and maximum, so that every image of a camera or scanner gets the same scale:
      value * 255 / 65535, rounded (the "I" values outside 0..65535 are clipped first).
    - A multi-frame file (GIF, TIFF) gives its first frame.
    Raises FileNotFoundError for a missing file and ValueError, naming the file, for one that is not an
    image, is truncated, or holds floating-point pixels ("F": their range is unknown).
    """
    from PIL import Image, ImageOps

    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)  # a copy, fully decoded: the file can be closed
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # Pillow raises UnidentifiedImageError (an OSError) for what is no image, OSError for a
        # truncated file and SyntaxError or ValueError for some malformed headers.
        raise ValueError(f"cannot read image {path}: {error}") from error
    if image.mode in WIDE_GREY_MODES:
        grey = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        grey = ((grey * 255 + 32767) // 65535).astype(np.uint8)  # rounded to nearest
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    if image.mode == "F":
        raise ValueError(f"image {path} has floating-point pixels (Pillow mode 'F'); expected 8-bit or "
                         "16-bit images (convert it to one of those first)")
    return np.array(image.convert("RGB"), dtype=np.uint8)  # a copy: writable, as torch.from_numpy wants


def image_to_tensor(image: np.ndarray) -> Tensor:
    """HxWx3 uint8 RGB array -> [3, H, W] float tensor in [0, 1]."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = image.shape if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be an HxWx3 RGB numpy array; got {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (0-255); got {image.dtype}")
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)


############################################################
#  Masks: RLE and polygons (COCO formats, via pycocotools)
############################################################


def mask_to_rle(mask: np.ndarray) -> dict:
    """HxW bool mask -> COCO RLE (column-major, counts as a str for JSON)."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def rle_to_mask(rle: dict, height: int, width: int) -> np.ndarray:
    """COCO RLE (compressed, or uncompressed with a list of counts) -> HxW bool mask."""
    from pycocotools import mask as coco_mask

    if isinstance(rle.get("counts"), list):
        rle = coco_mask.frPyObjects(rle, height, width)
    return coco_mask.decode(rle).astype(bool)


def polygons_to_mask(polygons: list, height: int, width: int) -> np.ndarray:
    """COCO polygons [[x1, y1, x2, y2, ...], ...] -> HxW bool mask."""
    from pycocotools import mask as coco_mask

    rles = coco_mask.frPyObjects(polygons, height, width)
    return coco_mask.decode(coco_mask.merge(rles)).astype(bool)


############################################################
#  Weight files
############################################################


def load_state_dict(source, backbone: str = "resnet50") -> dict:
    """A state dict from a dict, a file, or a name in WEIGHT_URLS ("imagenet" means the config's
    backbone), downloaded to the torch hub cache when there is a network."""
    if isinstance(source, dict):
        return source
    source = str(source)
    name = f"imagenet:{backbone}" if source == "imagenet" else source
    if name in WEIGHT_URLS:
        try:
            return torch.hub.load_state_dict_from_url(WEIGHT_URLS[name], map_location="cpu", progress=False)
        except (urllib.error.URLError, OSError) as error:
            cache = os.path.join(torch.hub.get_dir(), "checkpoints")
            raise RuntimeError(
                f"cannot download the {source!r} weights from {WEIGHT_URLS[name]} ({error}). Without a network, "
                f"copy that file into {cache} or pass its path to load_weights."
            ) from error
    if not os.path.exists(source):
        raise FileNotFoundError(
            f"weights not found: {source!r} is neither a file nor one of {', '.join(['imagenet', *WEIGHT_URLS])}"
        )
    return torch.load(source, map_location="cpu", weights_only=False)


############################################################
#  Files
############################################################


def atomic_write(path, write, mode="wb"):
    """Calls write(file) on a temporary file beside `path`, flushes it to disk and renames it over
    `path`: a crash mid-write leaves the previous file intact and no temporary file behind."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path, data):
    """Writes JSON through a temporary file and a rename, so `path` is never half written."""
    atomic_write(path, lambda f: json.dump(data, f, indent=1), mode="w")


def read_jsonl(path) -> list[dict]:
    """The records of a JSON-lines file, skipping a line cut short (a run killed while writing it)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
