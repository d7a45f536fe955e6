"""Tests of shapes.py, the synthetic data set: determinism, annotations consistent with their masks and
images (checked with pycocotools and numpy), loading with CocoDataset, and refusal to overwrite."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

import coco
import shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 48


def files(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


@pytest.fixture(scope="module")
def data(module_tmp_path):
    root = module_tmp_path / "data"
    shapes.generate(str(root), train=4, val=3, size=SIZE, seed=0)
    return root


def test_layout(data):
    assert sorted(files(data)) == sorted(
        [os.path.join("annotations", "instances_train.json"), os.path.join("annotations", "instances_val.json")]
        + [os.path.join("train", f"{i:06d}.png") for i in range(4)]
        + [os.path.join("val", f"{i:06d}.png") for i in range(3)]
    )
    assert [p.name for p in data.parent.iterdir()] == ["data"]  # no temporary folder left beside it
    for split, count in (("train", 4), ("val", 3)):
        annotations = json.loads((data / "annotations" / f"instances_{split}.json").read_text())
        assert [image["id"] for image in annotations["images"]] == list(range(1, count + 1))
        assert [c["name"] for c in annotations["categories"]] == ["square", "circle", "triangle", "star"]
        assert [c["id"] for c in annotations["categories"]] == [1, 2, 3, 4]
        for image in annotations["images"]:
            assert (image["height"], image["width"]) == (SIZE, SIZE)
            with Image.open(data / split / image["file_name"]) as png:
                assert png.size == (SIZE, SIZE) and png.mode == "RGB"


def test_same_seed_same_bytes_other_seed_differs(data, tmp_path):
    shapes.generate(str(tmp_path / "again"), train=4, val=3, size=SIZE, seed=0)
    assert files(tmp_path / "again") == files(data)
    shapes.generate(str(tmp_path / "other"), train=4, val=3, size=SIZE, seed=1)
    other = files(tmp_path / "other")
    assert sorted(other) == sorted(files(data))
    for name in other:
        assert other[name] != files(data)[name], name


def test_splits_differ(data):
    train, val = files(data / "train"), files(data / "val")
    assert train["000000.png"] != val["000000.png"]


def test_annotations_match_their_masks_and_images(data):
    for split in ("train", "val"):
        annotations = json.loads((data / "annotations" / f"instances_{split}.json").read_text())
        images = {image["id"]: image for image in annotations["images"]}
        assert annotations["annotations"], "every image has at least one shape drawn"
        assert [a["id"] for a in annotations["annotations"]] == list(range(1, len(annotations["annotations"]) + 1))
        per_image = {}
        for ann in annotations["annotations"]:
            info = images[ann["image_id"]]
            assert ann["category_id"] in (1, 2, 3, 4) and ann["iscrowd"] == 0
            rle = ann["segmentation"]
            assert isinstance(rle["counts"], str) and rle["size"] == [SIZE, SIZE]
            mask = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)
            assert mask.shape == (info["height"], info["width"])
            assert mask.sum() >= 1
            assert ann["area"] == float(mask.sum())
            rows, cols = np.nonzero(mask)
            bbox = [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
            assert ann["bbox"] == [float(v) for v in bbox]
            assert ann["bbox"] == coco_mask.toBbox({"size": rle["size"], "counts": rle["counts"].encode()}).tolist()
            # The visible part of a shape is one colour plus a little noise, unlike the whole image.
            with Image.open(data / split / info["file_name"]) as png:
                pixels = np.asarray(png.convert("RGB"), np.float64)
            assert pixels[mask].std(axis=0).max() < 8
            assert pixels.reshape(-1, 3).std(axis=0).max() > 8
            per_image.setdefault(ann["image_id"], []).append(mask)
        # Annotations are visible parts: the masks of one image do not overlap.
        for masks in per_image.values():
            assert np.sum(masks, axis=0).max() == 1


def test_loads_as_a_coco_dataset(data):
    dataset = coco.CocoDataset(str(data), "train")
    assert len(dataset) == 4
    assert dataset.num_classes == 5
    assert dataset.class_names == ["__background__", "square", "circle", "triangle", "star"]
    assert dataset.label_to_category == {1: 1, 2: 2, 3: 3, 4: 4}
    image, target = dataset[0]
    assert image.shape == (3, SIZE, SIZE)
    assert 1 <= len(target["labels"]) <= 5
    assert target["masks"].shape == (len(target["labels"]), SIZE, SIZE)
    areas = target["masks"].flatten(1).sum(1)
    assert (areas > 0).all()


def test_generate_refuses_an_existing_folder(data, tmp_path):
    before = files(data)
    with pytest.raises(FileExistsError, match=str(data)):
        shapes.generate(str(data), train=1, val=1, size=SIZE)
    assert files(data) == before
    assert [p.name for p in data.parent.iterdir()] == ["data"]

    # Even an empty folder is left alone.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileExistsError):
        shapes.generate(str(empty), train=1, val=1, size=SIZE)
    assert list(empty.iterdir()) == []


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    # Ctrl-C while the third image is drawn: neither the data set nor the temporary folder is left behind.
    real, calls = shapes.make_image, []

    def interrupted(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(shapes, "make_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shapes.generate(str(tmp_path / "out"), train=2, val=2, size=32)
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []


def test_ensure(data, tmp_path, capsys):
    before = files(data)
    mtimes = {p: os.stat(data / p).st_mtime_ns for p in before}
    shapes.ensure(str(data), train=1, val=1, size=32)
    assert files(data) == before
    assert {p: os.stat(data / p).st_mtime_ns for p in before} == mtimes
    assert capsys.readouterr().out == ""

    missing = tmp_path / "new"
    shapes.ensure(str(missing), train=2, val=1, size=32, seed=0)
    assert "writing the shapes data set" in capsys.readouterr().out
    assert len(os.listdir(missing / "train")) == 2 and len(os.listdir(missing / "val")) == 1


def test_command_line(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "shapes.py", "--out", str(out), "--train", "3", "--val", "2", "--size", "64"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out / "train")) == ["000000.png", "000001.png", "000002.png"]
    assert sorted(os.listdir(out / "val")) == ["000000.png", "000001.png"]
    for split, count in (("train", 3), ("val", 2)):
        annotations = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
        assert len(annotations["images"]) == count
        assert all((im["height"], im["width"]) == (64, 64) for im in annotations["images"])
        assert f"{split}: {count} images, {len(annotations['annotations'])} objects" in result.stdout
    # The same as the library call with the default seed.
    shapes.generate(str(tmp_path / "lib"), train=3, val=2, size=64)
    assert files(out) == files(tmp_path / "lib")
    # A second run refuses to overwrite, with a non-zero exit status.
    again = subprocess.run([sys.executable, "shapes.py", "--out", str(out), "--train", "1", "--val", "1"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "exists" in again.stderr
