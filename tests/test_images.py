"""utils.load_image on images as people have them: EXIF-rotated phone photos, grey, palette, 16-bit and
broken files, and the training loader reading through it.

Oracles: the pixels the test itself writes with PIL (rotated by hand with numpy for the EXIF cases),
and conversions computed by hand (a palette lookup, value * 255 / 65535 rounded for 16-bit).
"""

import json

import numpy as np
import pytest
from PIL import Image

import coco
import utils

EXIF_ORIENTATION = 0x0112  # the EXIF tag that says how to turn the stored pixels to show them upright


def upright_image(height=40, width=64):
    """An asymmetric, smooth picture (JPEG keeps it well), so that a wrong turn or a mirror shows."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 7.0) * (y > height / 3)], -1)
    return np.clip(image, 0, 255).astype(np.uint8)


# orientation -> (how the camera stores an upright picture, how a viewer turns the stored one upright)
ORIENTATIONS = {
    2: (np.fliplr, np.fliplr),
    3: (lambda a: np.rot90(a, 2), lambda a: np.rot90(a, 2)),
    6: (lambda a: np.rot90(a, 1), lambda a: np.rot90(a, -1)),  # stored turned left, shown turned right
    8: (lambda a: np.rot90(a, -1), lambda a: np.rot90(a, 1)),
}


def write_exif_jpeg(path, upright, orientation):
    """A JPEG whose stored pixels are `upright` turned as a camera held sideways stores them, with the
    EXIF orientation tag that says so. Returns the stored pixels as decoded (no EXIF applied)."""
    stored, _ = ORIENTATIONS[orientation]
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(np.ascontiguousarray(stored(upright))).save(path, quality=95, exif=exif)
    with Image.open(path) as raw:
        assert raw.getexif()[EXIF_ORIENTATION] == orientation
        return np.asarray(raw.convert("RGB"))


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied(tmp_path, orientation):
    upright = upright_image()
    path = tmp_path / f"photo_{orientation}.jpg"
    raw = write_exif_jpeg(path, upright, orientation)
    loaded = utils.load_image(path)
    _, show = ORIENTATIONS[orientation]
    np.testing.assert_array_equal(loaded, show(raw))  # exactly the decoded pixels, turned
    assert loaded.shape == upright.shape and loaded.dtype == np.uint8 and loaded.flags["C_CONTIGUOUS"]
    assert np.abs(loaded.astype(int) - upright).mean() < 3  # and that is the picture as it was taken
    assert np.abs(np.fliplr(loaded).astype(int) - upright).mean() > 20  # (a mirror would be far off)


def test_grey_and_black_and_white(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, (9, 13), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(grey > 127).save(tmp_path / "bw.png")  # mode "1"
    np.testing.assert_array_equal(utils.load_image(tmp_path / "grey.png"), np.repeat(grey[..., None], 3, 2))
    np.testing.assert_array_equal(utils.load_image(tmp_path / "bw.png"),
                                  np.repeat(np.where(grey > 127, 255, 0)[..., None], 3, 2))


def test_palette_image_is_looked_up(tmp_path):
    rng = np.random.default_rng(1)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    indices = rng.integers(0, 256, (11, 7), dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.reshape(-1).tolist())
    image.save(tmp_path / "palette.png")
    with Image.open(tmp_path / "palette.png") as check:
        assert check.mode == "P"
    np.testing.assert_array_equal(utils.load_image(tmp_path / "palette.png"), palette[indices])


def test_alpha_is_dropped_not_composited(tmp_path):
    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: the stored colours still come back
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    la = rng.integers(0, 256, (6, 5, 2), dtype=np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(utils.load_image(tmp_path / "rgba.png"), rgba[..., :3])
    np.testing.assert_array_equal(utils.load_image(tmp_path / "la.png"), np.repeat(la[..., :1], 3, 2))


def test_16_bit_grey_is_scaled_by_the_16_bit_range(tmp_path):
    values = np.array([[0, 128, 129, 257], [32767, 32768, 65278, 65535]], np.uint16)
    expected = np.array([[0, 0, 1, 1], [127, 128, 254, 255]], np.uint8)  # v / 257, rounded, by hand
    Image.fromarray(values).save(tmp_path / "sixteen.png")
    with Image.open(tmp_path / "sixteen.png") as check:
        assert check.mode.startswith("I")
    np.testing.assert_array_equal(utils.load_image(tmp_path / "sixteen.png"), np.repeat(expected[..., None], 3, 2))


def test_32_bit_grey_is_clipped_to_the_16_bit_range(tmp_path):
    values = np.array([[-5, 0, 257], [65535, 70000, 2**30]], np.int32)
    Image.fromarray(values, mode="I").save(tmp_path / "wide.tif")
    with Image.open(tmp_path / "wide.tif") as check:
        assert check.mode == "I"
    expected = np.array([[0, 0, 1], [255, 255, 255]], np.uint8)
    np.testing.assert_array_equal(utils.load_image(tmp_path / "wide.tif"), np.repeat(expected[..., None], 3, 2))


def test_what_cannot_be_read_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jpg"):
        utils.load_image(tmp_path / "nowhere.jpg")
    (tmp_path / "notes.jpg").write_text("not a picture")
    with pytest.raises(ValueError, match="notes.jpg"):
        utils.load_image(tmp_path / "notes.jpg")
    Image.fromarray(upright_image(200, 300)).save(tmp_path / "whole.jpg", quality=95)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])  # a download that stopped half way
    with pytest.raises(ValueError, match="cut.jpg"):
        utils.load_image(tmp_path / "cut.jpg")
    Image.fromarray(np.zeros((3, 4), np.float32), mode="F").save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match=r"float.tif.*floating-point"):
        utils.load_image(tmp_path / "float.tif")
    with pytest.raises(ValueError, match="folder"):
        (tmp_path / "folder").mkdir()
        utils.load_image(tmp_path / "folder")


def test_training_loader_reads_through_load_image(tmp_path):
    """The data set's items are EXIF-upright and RGB, and the JSON's size is the upright one."""
    upright = upright_image()
    (tmp_path / "val").mkdir()
    raw = write_exif_jpeg(tmp_path / "val" / "phone.jpg", upright, 6)
    grey = np.arange(40 * 64, dtype=np.uint16).reshape(40, 64) * 25
    Image.fromarray(grey).save(tmp_path / "val" / "scan.png")
    images = [{"id": 1, "file_name": "phone.jpg", "height": 40, "width": 64},
              {"id": 2, "file_name": "scan.png", "height": 40, "width": 64}]
    annotations = [{"id": k + 1, "image_id": k + 1, "category_id": 1, "bbox": [2, 2, 10, 10], "iscrowd": 0,
                    "area": 100, "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]} for k in range(2)]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}))
    dataset = coco.CocoDataset(str(tmp_path), "val")
    phone, _ = dataset[0]
    np.testing.assert_array_equal((phone.permute(1, 2, 0) * 255).round().byte().numpy(), np.rot90(raw, -1))
    scan, _ = dataset[1]
    expected = np.round(grey / 257).astype(np.uint8)  # 65535 / 255 = 257; v / 257 is never half-way
    np.testing.assert_array_equal((scan[0] * 255).round().byte().numpy(), expected)
