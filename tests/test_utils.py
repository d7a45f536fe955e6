"""Tests of utils: IoU and areas (against torchvision), RLE and polygons (against hand-made masks and
pycocotools), image conversion and loading, weight file loading (weights_only, files cut short), files
written atomically (the file is whole or unchanged; a full disk, simulated by a file whose write raises
ENOSPC, names the file and the bytes it needs, compared with the size torch.save gives on a disk with
room), and the removal of the temporaries a killed process left."""

import errno
import json
import os
import re
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import skimage.io
import torch
import torchvision
from pycocotools import mask as coco_mask

import utils

# ----------------------------------------------------------------------------------------------------
# Boxes


def random_boxes(n, generator, scale=100.0):
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * scale
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * scale / 2 + 0.5
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("n, m", [(1, 1), (7, 13), (50, 40), (0, 5), (5, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_box_iou_matches_torchvision(n, m, dtype):
    g = torch.Generator().manual_seed(n * 100 + m)
    a, b = random_boxes(n, g).to(dtype), random_boxes(m, g).to(dtype)
    got = utils.box_iou(a, b)
    assert got.shape == (n, m) and got.dtype == dtype
    torch.testing.assert_close(got, torchvision.ops.box_iou(a, b))
    if n and m:
        assert float(got.min()) >= 0 and float(got.max()) <= 1


def test_box_iou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [2.0, 0.0, 4.0, 2.0], [5.0, 5.0, 6.0, 7.0],
                      [20.0, 20.0, 30.0, 30.0]])
    expected = torch.tensor([
        [1 / 7, 1.0, 0.0, 0.0, 0.0],  # overlap 1x1 of two 2x2 boxes; identical; touching edges; disjoint
        [4 / 100, 4 / 100, 4 / 100, 2 / 100, 0.0],  # boxes inside the 10x10 one: area ratio
    ])
    torch.testing.assert_close(utils.box_iou(a, b), expected)


def test_box_area():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [1.5, 2.0, 4.0, 2.5], [5.0, 5.0, 5.0, 9.0]])
    torch.testing.assert_close(utils.box_area(boxes), torch.tensor([6.0, 1.25, 0.0]))  # no "+1"
    g = torch.Generator().manual_seed(0)
    boxes = random_boxes(20, g)
    torch.testing.assert_close(utils.box_area(boxes), torchvision.ops.box_area(boxes))


# ----------------------------------------------------------------------------------------------------
# RLE and polygons


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (64, 48), (33, 100)])
@pytest.mark.parametrize("density", [0.0, 0.3, 0.9, 1.0])
def test_rle_round_trip(shape, density):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    mask = rng.random(shape) < density
    rle = utils.mask_to_rle(mask)
    assert isinstance(rle["counts"], str)  # JSON-friendly
    assert list(rle["size"]) == list(shape)
    decoded = utils.rle_to_mask(rle, *shape)
    assert decoded.dtype == bool and decoded.shape == shape
    np.testing.assert_array_equal(decoded, mask)
    # The same encoding as pycocotools' (what COCO tools read).
    reference = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert rle["counts"] == reference["counts"].decode("ascii")
    assert int(coco_mask.area(reference)) == int(mask.sum())


def test_rle_of_non_contiguous_and_uint8_masks():
    rng = np.random.default_rng(1)
    mask = rng.random((20, 30)) < 0.5
    for variant in (mask.T, mask[::2, ::3], mask.astype(np.uint8)):
        np.testing.assert_array_equal(utils.rle_to_mask(utils.mask_to_rle(variant), *variant.shape), variant != 0)


def test_uncompressed_rle_by_hand():
    # COCO RLE runs are column-major and start with a run of zeros:
    #   row 0: 0 1 1 0
    #   row 1: 0 1 0 0      columns top to bottom: (0 0 1) (1 1 1) (1 0 0) (0 0 0)
    #   row 2: 1 1 0 0      -> 2 zeros, 5 ones, 5 zeros
    expected = np.array([[0, 1, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0]], dtype=bool)
    got = utils.rle_to_mask({"size": [3, 4], "counts": [2, 5, 5]}, 3, 4)
    assert got.dtype == bool
    np.testing.assert_array_equal(got, expected)
    # Starting with ones: the first run of zeros is empty.
    got = utils.rle_to_mask({"size": [2, 3], "counts": [0, 3, 3]}, 2, 3)
    np.testing.assert_array_equal(got, np.array([[1, 1, 0], [1, 0, 0]], dtype=bool))
    # And our encoding of the hand mask decodes to it (through pycocotools, independently of rle_to_mask).
    rle = utils.mask_to_rle(expected)
    np.testing.assert_array_equal(coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}),
                                  expected.astype(np.uint8))


def test_polygons_to_mask_rectangle():
    # A rectangle from x 2 to 6 and y 1 to 4 covers the pixels whose squares [i, i+1) lie inside it:
    # columns 2..5, rows 1..3.
    mask = utils.polygons_to_mask([[2, 1, 6, 1, 6, 4, 2, 4]], 8, 10)
    expected = np.zeros((8, 10), dtype=bool)
    expected[1:4, 2:6] = True
    assert mask.dtype == bool and mask.shape == (8, 10)
    np.testing.assert_array_equal(mask, expected)


def test_polygons_to_mask_merges_several_polygons():
    square = [1, 1, 3, 1, 3, 3, 1, 3]
    rectangle = [5.0, 2.0, 9.0, 2.0, 9.0, 7.0, 5.0, 7.0]
    mask = utils.polygons_to_mask([square, rectangle], 8, 10)
    expected = np.zeros((8, 10), dtype=bool)
    expected[1:3, 1:3] = True
    expected[2:7, 5:9] = True
    np.testing.assert_array_equal(mask, expected)


# ----------------------------------------------------------------------------------------------------
# Images


def test_image_to_tensor():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    image[0, 0] = (0, 128, 255)
    tensor = utils.image_to_tensor(image)
    assert tensor.shape == (3, 5, 7) and tensor.dtype == torch.float32
    assert float(tensor.min()) >= 0 and float(tensor.max()) <= 1
    torch.testing.assert_close(tensor[:, 0, 0], torch.tensor([0.0, 128 / 255, 1.0]))
    for c in range(3):
        np.testing.assert_allclose(tensor[c].numpy(), image[..., c] / 255.0, rtol=0, atol=1e-7)
    # A view with negative strides is fine; the input is not modified.
    flipped = image[:, ::-1]
    np.testing.assert_allclose(utils.image_to_tensor(flipped)[1].numpy(), flipped[..., 1] / 255.0, atol=1e-7)
    assert image[0, 0, 2] == 255


@pytest.mark.parametrize("image, match", [
    (np.zeros((5, 7, 3), dtype=np.float32), "uint8"),
    (np.zeros((5, 7), dtype=np.uint8), "HxWx3"),
    (np.zeros((5, 7, 4), dtype=np.uint8), "HxWx3"),
    (np.zeros((3, 5, 7), dtype=np.uint8), "HxWx3"),
    (torch.zeros(5, 7, 3, dtype=torch.uint8), "numpy"),
])
def test_image_to_tensor_rejects(image, match):
    with pytest.raises(ValueError, match=match):
        utils.image_to_tensor(image)


def test_load_image_rgb_grey_rgba(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(12, 9, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, size=(12, 9), dtype=np.uint8)
    rgba = rng.integers(0, 256, size=(12, 9, 4), dtype=np.uint8)
    for name, image in (("rgb.png", rgb), ("grey.png", grey), ("rgba.png", rgba)):
        skimage.io.imsave(tmp_path / name, image, check_contrast=False)
    loaded = utils.load_image(str(tmp_path / "rgb.png"))
    assert loaded.dtype == np.uint8 and loaded.shape == (12, 9, 3)
    np.testing.assert_array_equal(loaded, rgb)
    loaded = utils.load_image(tmp_path / "grey.png")  # a Path works too
    assert loaded.shape == (12, 9, 3)
    for c in range(3):
        np.testing.assert_array_equal(loaded[..., c], grey)
    loaded = utils.load_image(str(tmp_path / "rgba.png"))
    assert loaded.shape == (12, 9, 3) and loaded.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(loaded, rgba[..., :3])
    assert utils.image_to_tensor(loaded).shape == (3, 12, 9)


def test_load_image_errors(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match="missing.png"):
        utils.load_image(str(missing))
    broken = tmp_path / "broken.png"
    broken.write_text("this is not an image")
    with pytest.raises(ValueError, match="broken.png"):
        utils.load_image(str(broken))


# ----------------------------------------------------------------------------------------------------
# Weight files


def test_load_state_dict_from_dict_and_file(tmp_path):
    state = {"a": torch.arange(3.0), "b": torch.ones(2, 2)}
    assert utils.load_state_dict(state) is state
    path = tmp_path / "w.pth"
    torch.save(state, path)
    for source in (str(path), path):
        loaded = utils.load_state_dict(source)
        assert set(loaded) == {"a", "b"} and torch.equal(loaded["a"], state["a"])


def test_load_state_dict_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        utils.load_state_dict(str(tmp_path / "nothing.pth"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    for name, url in (("coco", torchvision.models.detection.MaskRCNN_ResNet50_FPN_Weights.COCO_V1.url),
                      ("imagenet", torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url)):
        with pytest.raises(RuntimeError) as error:
            utils.load_state_dict(name, backbone="resnet50")
        assert torch.hub.get_dir() in str(error.value) and url in str(error.value)


def test_load_state_dict_downloads_by_name(monkeypatch):
    urls = []

    def fake(url, *args, **kwargs):
        urls.append(url)
        return {"x": torch.zeros(1)}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake)
    assert set(utils.load_state_dict("coco_v2")) == {"x"}
    utils.load_state_dict("imagenet", backbone="resnet101")
    assert urls == [torchvision.models.detection.MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1.url,
                    torchvision.models.ResNet101_Weights.IMAGENET1K_V1.url]


# ----------------------------------------------------------------------------------------------------
# Atomic JSON


def test_write_json_atomic(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    utils.write_json_atomic(str(path), {"AP": 0.5, "images": [1, 2]})
    assert json.loads(path.read_text()) == {"AP": 0.5, "images": [1, 2]}
    before = path.read_bytes()
    with pytest.raises(TypeError):
        utils.write_json_atomic(str(path), {"AP": 0.7, "more": list(range(100)), "bad": object()})
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["metrics.json"]
    utils.write_json_atomic(str(path), {"AP": 0.7})
    assert json.loads(path.read_text()) == {"AP": 0.7}
    assert os.listdir(path.parent) == ["metrics.json"]


class FullDisk:
    """A file whose device fills up after `room` bytes: write raises OSError(ENOSPC), as the kernel does."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, data):
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.file.close()


def test_a_full_disk_names_the_file_and_the_space_needed_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    state = {"weights": torch.arange(250_000, dtype=torch.float32)}  # 1 MB of data
    utils.atomic_write(str(path), lambda f: torch.save({"old": torch.ones(3)}, f))
    old = path.read_bytes()
    torch.save(state, tmp_path / "reference.pth")
    size = (tmp_path / "reference.pth").stat().st_size  # what the file takes on a disk with room
    monkeypatch.setattr(utils, "open", lambda name, mode: FullDisk(open(name, mode), room=100_000), raising=False)
    with pytest.raises(OSError) as error:
        utils.atomic_write(str(path), lambda f: torch.save(state, f))
    monkeypatch.undo()
    message = str(error.value)
    assert error.value.errno == errno.ENOSPC
    assert "No space left on device" in message and str(path) in message
    needed = int(re.search(r"needs about ([\d,]+) bytes", message)[1].replace(",", ""))
    assert abs(needed - size) < 0.01 * size
    assert re.search(r"[\d,]+ bytes are free there", message)
    assert path.read_bytes() == old  # the previous file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth", "reference.pth"]


def test_remove_stale_temporaries_removes_only_those_of_dead_processes(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has ended
    names = {
        f"last.pth.tmp{dead_pid}": False,  # left by a killed run: removed
        f"model_0000300.pth.tmp{dead_pid}": False,
        f"log.jsonl.tmp{os.getpid()}": False,  # this process has written nothing yet: its pid was reused
        "config.json.tmp1": True,  # pid 1 is running: it may be writing
        "notes.tmp": True,  # not atomic_write's naming
        "data.tmp12x": True,
        "last.pth": True,
    }
    for name in names:
        (tmp_path / name).write_text("x")
    removed = utils.remove_stale_temporaries(str(tmp_path))
    assert sorted(removed) == sorted(name for name, kept in names.items() if not kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(name for name, kept in names.items() if kept)
    # The naming it knows is atomic_write's own.
    assert utils.TEMPORARY_NAME.match(os.path.basename(utils.temporary_path(str(tmp_path / "x.pth"))))


def test_load_file_loads_with_weights_only_and_names_a_cut_file(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"a": torch.arange(100_000), "config": {"NAME": "x", "SIZES": [1, 2]}}, path)
    loaded = utils.load_file(str(path))
    assert torch.equal(loaded["a"], torch.arange(100_000)) and loaded["config"] == {"NAME": "x", "SIZES": [1, 2]}
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(utils.UnreadableFileError, match=re.escape(str(path)) + " is incomplete or corrupt"):
        utils.load_file(str(path))
    path.write_bytes(b"")
    with pytest.raises(utils.UnreadableFileError, match="incomplete or corrupt"):
        utils.load_file(str(path))
    torch.save({"state": np.random.get_state()}, path)  # numpy arrays are no plain type for weights_only
    with pytest.raises(utils.UnreadableFileError, match="holds Python objects besides tensors"):
        utils.load_file(str(path))
