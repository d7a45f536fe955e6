"""Helpers that are not layers of the network: IoU, images, masks (RLE and polygons), weight files."""

import errno
import json
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


def load_image(path) -> np.ndarray:
    """An image file as an HxWx3 uint8 RGB array (grey and RGBA are converted)."""
    import skimage.io

    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        image = skimage.io.imread(path)
    except Exception as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"image {path} has shape {image.shape}; expected HxW, HxWx3 or HxWx4")
    return np.ascontiguousarray(image[..., :3])


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
    """A state dict (or a checkpoint dict) from a dict, a file (load_file), or a name in WEIGHT_URLS
    ("imagenet" means the config's backbone), downloaded to the torch hub cache when there is a network."""
    if isinstance(source, dict):
        return source
    source = str(source)
    name = f"imagenet:{backbone}" if source == "imagenet" else source
    if name in WEIGHT_URLS:
        try:
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


def load_file(path) -> dict:
    """torch.load of a weight or checkpoint file with weights_only=True (tensors and plain Python types
    only: loading never runs code stored in the file). A file cut short (a crash or a full disk while
    it was copied) or otherwise corrupt, or one holding other objects, raises UnreadableFileError
    naming the file and which of the two it is."""
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
