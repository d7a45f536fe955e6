"""Helpers that are not layers of the network: IoU, images, masks (RLE and polygons), weight files."""

import codecs
import collections
import errno
import json
import math
import numbers
import os
import pickle
import re
import shutil
import urllib.error
import zipfile

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
    # detectron2's model zoo (detectron2/model_zoo/model_zoo.py), for the d2_* presets of config.py.
    "d2_r50_fpn_3x": "https://dl.fbaipublicfiles.com/detectron2/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x/"
                     "137849600/model_final_f10217.pkl",
    "d2_r101_fpn_3x": "https://dl.fbaipublicfiles.com/detectron2/COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x/"
                      "138205316/model_final_a3ec72.pkl",
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


def image_size(path) -> tuple[int, int]:
    """(height, width) of an image file as it is shown, read from its header: swapped when its EXIF
    orientation turns it by 90 degrees (values 5 to 8), as viewers and annotation tools show it. Raises
    ValueError naming the file for one that is not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


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


def threshold_masks(probabilities: Tensor, threshold: float, inclusive: bool = False) -> Tensor:
    """bool masks of the pixels whose probability is above `threshold`, or at or above it with `inclusive`
    (MASK_THRESHOLD_INCLUSIVE: detectron2's >= 0.5); any shape."""
    return probabilities >= threshold if inclusive else probabilities > threshold


# pycocotools rasterises a polygon edge by edge with no bound on its length and decodes RLE runs
# without checking them against the mask's size, so a far-away, NaN or infinite coordinate takes
# gigabytes or crashes the process, and runs that overshoot write past the mask. The checks below
# run first; a polygon may reach one image size beyond each border (annotation tools let points
# stray a little off the picture), no further.


def polygon_coordinates(polygon):
    """The coordinates of a polygon as a list of Python numbers, or None if it is not a flat list, tuple
    or 1-D array of real numbers."""
    if isinstance(polygon, np.ndarray):
        numeric = np.issubdtype(polygon.dtype, np.integer) or np.issubdtype(polygon.dtype, np.floating)
        return polygon.astype(np.float64).tolist() if polygon.ndim == 1 and numeric else None
    if not isinstance(polygon, (list, tuple)):
        return None
    if set(map(type, polygon)) <= {int, float}:  # what JSON gives; the fast path for a whole data set
        return polygon
    if all(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) for v in polygon):
        return [float(v) for v in polygon]
    return None


def check_polygon(polygon, height: int, width: int, name: str = "polygon") -> None:
    """Raises ValueError unless `polygon` is a COCO polygon [x1, y1, x2, y2, ...] that pycocotools can
    rasterise safely in a height x width image: an even number, at least 6 (3 points), of finite
    coordinates in pixels, each within one image size beyond the borders (x in [-width, 2 * width],
    y in [-height, 2 * height])."""
    coords = polygon_coordinates(polygon)
    if coords is None:
        raise ValueError(f"{name} must be a flat list of numbers [x1, y1, x2, y2, ...]; got {str(polygon)[:80]}")
    if len(coords) < 6 or len(coords) % 2:
        raise ValueError(f"{name} must have an even number of coordinates, at least 6 (3 points); got {len(coords)}")
    # Plain Python, not numpy: a data set has a million polygons of a few dozen numbers. A NaN or an
    # infinity makes the sum non-finite.
    if not math.isfinite(sum(coords)):
        bad = next((v for v in coords if not math.isfinite(v)), None)
        if bad is not None:
            raise ValueError(f"{name} has a coordinate {bad}; coordinates must be finite (pixels)")
    xs, ys = coords[0::2], coords[1::2]
    if min(xs) < -width or max(xs) > 2 * width or min(ys) < -height or max(ys) > 2 * height:
        x, y = next((x, y) for x, y in zip(xs, ys)
                    if not (-width <= x <= 2 * width and -height <= y <= 2 * height))
        raise ValueError(f"{name} has the point ({x:g}, {y:g}), more than one image size outside the "
                         f"{width}x{height} image; expected x in [{-width}, {2 * width}] and y in "
                         f"[{-height}, {2 * height}]")


def check_polygons(polygons, height: int, width: int, name: str = "polygons") -> None:
    """check_polygon for each polygon of a list of them (COCO's segmentation of one object)."""
    if not isinstance(polygons, (list, tuple)):
        raise ValueError(f"{name} must be a list of polygons [[x1, y1, x2, y2, ...], ...]; "
                         f"got {type(polygons).__name__}")
    for j, polygon in enumerate(polygons):
        check_polygon(polygon, height, width, f"{name}[{j}]")


def rle_string_counts(counts) -> np.ndarray:
    """The run lengths [R] int64 of a compressed COCO RLE string (str or bytes), decoded as pycocotools'
    rleFrString does: each run is a little-endian series of 5-bit groups written as chr(48 + group),
    with 0x20 set on every group but the last and 0x10 of the last one the sign, and runs from the
    fourth on are stored as the difference to the run two before. Raises ValueError for a character
    outside that alphabet or a string that ends inside a run."""
    try:
        data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    except (UnicodeEncodeError, TypeError) as error:
        raise ValueError(f"compressed RLE counts must be an ASCII string; got {str(counts)[:40]!r}") from error
    groups = np.frombuffer(data, np.uint8).astype(np.int64) - 48  # (G,)
    if ((groups < 0) | (groups > 63)).any():
        raise ValueError(f"compressed RLE counts hold characters outside '0'..'o'; got {str(counts)[:40]!r}")
    if not len(groups):
        return np.zeros(0, np.int64)
    last = (groups & 0x20) == 0  # the last group of each run
    if not last[-1]:
        raise ValueError("compressed RLE counts end in the middle of a run")
    run = np.cumsum(last) - last  # (G,) the run each group belongs to
    first = np.flatnonzero(np.concatenate([[True], last[:-1]]))  # (R,) index of each run's first group
    position = np.arange(len(groups)) - first[run]  # (G,) place of the group within its run
    if position.max() >= 7:  # 7 groups hold 35 bits: more than any mask has pixels
        raise ValueError("compressed RLE counts hold a run of more than 7 characters")
    values = np.zeros(len(first), np.int64)
    np.add.at(values, run, (groups & 0x1F) << (5 * position))
    sign = (groups[last] & 0x10) != 0
    values[sign] -= np.left_shift(1, 5 * (position[last][sign] + 1))
    values[1::2] = np.cumsum(values[1::2])  # run m >= 3 is stored minus run m - 2
    values[2::2] = np.cumsum(values[2::2])
    return values


def check_rle(rle, height: int, width: int, name: str = "rle") -> None:
    """Raises ValueError unless `rle` is a COCO RLE of a height x width mask that pycocotools can decode
    safely: {"size": [height, width], "counts": ...}, counts a list of non-negative integers
    (uncompressed) or a compressed string, the runs summing to height * width."""
    if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
        got = sorted(rle) if isinstance(rle, dict) else type(rle).__name__
        raise ValueError(f"{name} must be a dict with 'size' [height, width] and 'counts'; got {got}")
    size = rle["size"]
    if not isinstance(size, (list, tuple)) or list(size) != [height, width]:
        raise ValueError(f"{name}['size'] must be the image's [height, width] = [{height}, {width}]; "
                         f"got {size!r}")
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        runs = rle_string_counts(counts)
    elif isinstance(counts, (list, tuple)) and all(isinstance(c, numbers.Integral) and not isinstance(c, bool)
                                                   for c in counts):
        runs = np.asarray(counts, dtype=np.int64).reshape(-1)
    else:
        raise ValueError(f"{name}['counts'] must be a list of integers (uncompressed) or a string (compressed); "
                         f"got {str(counts)[:80]}")
    if len(runs) and runs.min() < 0:
        raise ValueError(f"{name}['counts'] has a negative run ({int(runs.min())}); runs must be >= 0")
    if int(runs.sum()) != height * width:
        raise ValueError(f"{name}['counts'] runs sum to {int(runs.sum())}; a {height}x{width} mask needs "
                         f"{height * width}")


def mask_to_rle(mask: np.ndarray) -> dict:
    """HxW bool mask -> COCO RLE (column-major, counts as a str for JSON)."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def rle_to_mask(rle: dict, height: int, width: int) -> np.ndarray:
    """COCO RLE (compressed, or uncompressed with a list of counts) -> HxW bool mask. Raises ValueError
    (naming `rle`) for one that does not describe a height x width mask (see check_rle)."""
    from pycocotools import mask as coco_mask

    check_rle(rle, height, width, "rle")
    if isinstance(rle["counts"], list):
        rle = coco_mask.frPyObjects(rle, height, width)
    return coco_mask.decode(rle).astype(bool)


def polygons_to_mask(polygons: list, height: int, width: int) -> np.ndarray:
    """COCO polygons [[x1, y1, x2, y2, ...], ...] -> HxW bool mask (all False for no polygon). Raises
    ValueError (naming `polygons[j]`) for one pycocotools cannot rasterise safely (see check_polygon)."""
    from pycocotools import mask as coco_mask

    check_polygons(polygons, height, width, "polygons")
    if not polygons:
        return np.zeros((height, width), bool)
    rles = coco_mask.frPyObjects([[float(v) for v in p] for p in polygons], height, width)
    return coco_mask.decode(coco_mask.merge(rles)).astype(bool)


############################################################
#  Weight files
############################################################


def load_state_dict(source, backbone: str = "resnet50") -> dict:
    """A state dict (or a checkpoint dict) from a dict, a file (load_file), or a name in WEIGHT_URLS
    ("imagenet" means the config's backbone), downloaded to the torch hub cache when there is a network
    (a file already there under the URL's file name is used without one)."""
    if isinstance(source, dict):
        return source
    source = str(source)
    name = f"imagenet:{backbone}" if source == "imagenet" else source
    if name in WEIGHT_URLS:
        try:
            if WEIGHT_URLS[name].endswith(".pkl"):  # torch.hub would torch.load it
                path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(WEIGHT_URLS[name]))
                if not os.path.exists(path):
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    torch.hub.download_url_to_file(WEIGHT_URLS[name], path, progress=False)
                return load_file(path)
            return torch.hub.load_state_dict_from_url(WEIGHT_URLS[name], map_location="cpu", progress=False,
                                                      weights_only=True)
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
    return load_file(source)


class UnreadableFileError(ValueError):
    """A weight or checkpoint file that exists but cannot be loaded: cut short, corrupt, or holding
    Python objects that weights_only loading refuses."""


def pickle_globals() -> dict:
    """(module, name) -> object: what a detectron2 model-zoo pickle may hold besides plain containers and
    numbers: numpy arrays, their dtypes and scalars (under numpy 1's and numpy 2's module names), the
    str -> bytes step of Python 3's protocol-2 pickles of bytes, and OrderedDict. Everything else
    (os.system, a class with __reduce__) is refused by RestrictedUnpickler before it is looked up."""
    # The functions themselves, wherever this numpy keeps them, under either name.
    reconstruct = np.zeros(1).__reduce__()[0]  # protocols 0-4
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5
    scalar = np.float32(0).__reduce__()[0]
    return {
        **{(module, "_reconstruct"): reconstruct for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
        **{(module, "_frombuffer"): frombuffer for module in ("numpy.core.numeric", "numpy._core.numeric")},
        **{(module, "scalar"): scalar for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that builds only plain containers, numbers, strings, numpy arrays and OrderedDicts:
    find_class answers from pickle_globals() and refuses every other global, so nothing in the file runs."""

    def __init__(self, file, path):
        super().__init__(file, encoding="latin1")  # detectron2's files were pickled by Python 2
        self.path = path
        self.allowed = pickle_globals()

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise UnreadableFileError(
                f"{self.path} holds the Python global {module}.{name}, which a weight file does not need: it is not "
                "loaded (pickles are read with a restricted unpickler that builds numpy arrays and plain types "
                "only, so loading never runs code from the file)")
        return self.allowed[(module, name)]


def load_pickle(path) -> dict:
    """A detectron2 .pkl weight file ({"model": {name: numpy array}, "__author__": ...}) read with
    RestrictedUnpickler; a file cut short or corrupt raises UnreadableFileError naming it."""
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, path).load()
        except UnreadableFileError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
            raise UnreadableFileError(f"{path} is incomplete or corrupt ({os.path.getsize(path):,} bytes; "
                                      f"unpickling: {str(error)[:200] or type(error).__name__})") from error


def load_file(path) -> dict:
    """torch.load of a weight or checkpoint file with weights_only=True (tensors and plain Python types
    only: loading never runs code stored in the file); a .pkl file (detectron2's model zoo) with
    load_pickle, which is as restrictive. A file cut short (a crash or a full disk while
    it was copied) or otherwise corrupt, or one holding other objects, raises UnreadableFileError
    naming the file and which of the two it is."""
    if str(path).endswith(".pkl"):
        return load_pickle(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        # torch writes zip archives; one whose directory (at its end) is intact was not cut short, so a
        # refusal to unpickle it means it holds objects other than tensors and plain types (torch's long
        # message names the object on one of its lines).
        if isinstance(error, pickle.UnpicklingError) and zipfile.is_zipfile(path):
            lines = [line for line in str(error).splitlines() if "WeightsUnpickler error" in line] or [""]
            raise UnreadableFileError(
                f"{path} holds Python objects besides tensors and plain types, so it is not loaded (weights "
                "are loaded with weights_only=True, which never runs code from the file): "
                f"{lines[0].strip().split('. ')[0]}. If you trust the file, convert it once with "
                "torch.load(path, weights_only=False) and save its tensors again."
            ) from error
        detail = "not a torch archive" if isinstance(error, pickle.UnpicklingError) else str(error).strip()[:200]
        detail = detail or type(error).__name__
        raise UnreadableFileError(f"{path} is incomplete or corrupt ({os.path.getsize(path):,} bytes; torch.load: "
                                  f"{detail})") from error


############################################################
#  Files
############################################################


def temporary_path(path) -> str:
    """Where atomic_write builds `path` (beside it, named after this process)."""
    return f"{path}.tmp{os.getpid()}"


# temporary_path's names: <file name>.tmp<pid>.
TEMPORARY_NAME = re.compile(r"^(?P<name>.+)\.tmp(?P<pid>\d+)$")


def atomic_write(path, write, mode="wb"):
    """Calls write(file) on a temporary file beside `path`, flushes it to disk and renames it over
    `path`: a crash mid-write leaves the previous file intact and no temporary file behind (a SIGKILL
    leaves the temporary: remove_stale_temporaries cleans it). A full disk raises OSError(ENOSPC)
    naming `path`, the bytes the file needs and the bytes free there."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        code = out_of_space(error)
        if code is not None:
            raise OSError(code, out_of_space_message(path, write, mode, code)) from error
        raise


def out_of_space(error: BaseException):
    """ENOSPC or EDQUOT if `error` or one it arose from is a full disk (torch.save reports a failed write as
    its own "enforce fail at inline_container.cc" RuntimeError, with the OSError as its context), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error.errno
        error = error.__cause__ or error.__context__
    return None


def out_of_space_message(path, write, mode, code) -> str:
    """'No space left on device: writing <path> needs about N bytes; M bytes are free there ...'."""
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    try:
        needed = f"needs about {bytes_written_by(write, mode):,} bytes"
    except Exception:  # noqa: BLE001 (the size is a hint; the error is the full disk)
        needed = "failed"
    return (f"{os.strerror(code)}: writing {path} {needed}; {free:,} bytes are free there (the previous file, if "
            "any, is intact)")


class _ByteCounter:
    """A file-like sink that only counts what is written to it."""

    def __init__(self, text: bool):
        self.text, self.count = text, 0

    def write(self, data):
        self.count += len(data.encode()) if self.text else len(data)
        return len(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        pass


def bytes_written_by(write, mode="wb") -> int:
    """How many bytes write(file) writes (it is run again into a counter: no disk, no memory)."""
    counter = _ByteCounter(text="b" not in mode)
    write(counter)
    return counter.count


def remove_stale_temporaries(folder) -> list[str]:
    """Removes the temporary files that atomic_write left in `folder` when its process was killed
    (those of other processes still running are kept: they may be writing). Call it before this
    process writes into `folder`. Returns the removed names."""
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        match = TEMPORARY_NAME.match(name)
        pid = None if match is None else int(match["pid"])
        # This process has written nothing yet; a file of its pid is from a killed process whose pid was
        # reused (containers start processes at the same small pids).
        if pid is None or not os.path.isfile(os.path.join(folder, name)) or (pid != os.getpid() and pid_alive(pid)):
            continue
        os.remove(os.path.join(folder, name))
        removed.append(name)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
