"""Tests of `python coco.py convert`: labelme, VIA and instance-id PNG folders into our COCO layout.

The inputs are made here from shapes images: each object's mask is traced into polygons with
skimage.measure.find_contours (independent of the code under test), written in the tool's format, converted,
and read back through coco.CocoDataset. Oracles: the original masks (mask IoU at least 0.95; exactly equal
for PNG masks, which convert keeps as RLE), rectangles, disks and ellipses drawn here with numpy from their
implicit equations, and hand-counted splits.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image
from skimage import measure

import coco
import shapes

SIZE = 64
CLASSES = shapes.CLASSES


def make_images(folder, count, seed=0):
    """Shapes images written as PNGs into `folder`; returns [(file name, [(class name, HxW bool mask)])]."""
    os.makedirs(folder, exist_ok=True)
    samples = []
    for index in range(count):
        image, instances = shapes.make_image(seed, "train", index, SIZE)
        name = f"img{index:02d}.png"
        Image.fromarray(image).save(os.path.join(folder, name))
        samples.append((name, [(CLASSES[kind], mask) for kind, mask in instances]))
    return samples


def trace(mask):
    """The outlines of a mask as flat polygons in image coordinates (pixel (i, j) covers [j, j + 1) x
    [i, i + 1), as annotation tools show it): find_contours' pixel-centre outline, moved by half a pixel."""
    contours = measure.find_contours(np.pad(mask, 1).astype(float), 0.5)
    return [(contour[:, ::-1] - 1 + 0.5).reshape(-1).tolist() for contour in contours if len(contour) >= 3]


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def convert(*args):
    return coco.main(["convert", *map(str, args)])


def read_back(out):
    """{file name: [(class name, mask)]} of both splits, through the training loader."""
    objects = {}
    for split in ("train", "val"):
        dataset = coco.CocoDataset(str(out), split)
        for i, image_id in enumerate(dataset.image_ids):
            _, target = dataset[i]
            name = dataset.coco.imgs[image_id]["file_name"]
            objects[name] = [(dataset.class_names[label], mask.numpy().astype(bool))
                             for label, mask in zip(target["labels"].tolist(), target["masks"])]
    return objects


def assert_round_trip(expected, got, min_iou=0.95):
    assert set(got) == {name for name, _ in expected}
    for name, instances in expected:
        assert [label for label, _ in got[name]] == [label for label, _ in instances], name
        for (_, want), (_, mask) in zip(instances, got[name]):
            assert iou(want, mask) >= min_iou, name


# ----------------------------------------------------------------------------------------------------
# labelme


def labelme_file(folder, name, shapes_list, height=SIZE, width=SIZE):
    data = {"version": "5.4.1", "flags": {}, "shapes": shapes_list, "imagePath": name, "imageData": None,
            "imageHeight": height, "imageWidth": width}
    (folder / f"{os.path.splitext(name)[0]}.json").write_text(json.dumps(data))


def labelme_shape(label, points, shape_type="polygon", group_id=None):
    return {"label": label, "points": points, "group_id": group_id, "shape_type": shape_type, "flags": {}}


def write_labelme(folder, samples):
    """Every object's traced polygons as labelme polygons sharing one group_id."""
    for name, instances in samples:
        shapes_list = []
        for k, (label, mask) in enumerate(instances):
            for polygon in trace(mask):
                shapes_list.append(labelme_shape(label, np.reshape(polygon, (-1, 2)).tolist(), group_id=k))
        labelme_file(folder, name, shapes_list)


def test_labelme_round_trip(tmp_path):
    source = tmp_path / "labelme"
    samples = make_images(source, 6)
    write_labelme(source, samples)
    out = tmp_path / "data"
    convert("--format", "labelme", "--input", source, "--out", out)
    assert_round_trip(samples, read_back(out))
    # Images are copied, not moved.
    for name, _ in samples:
        assert (source / name).exists()
    assert sorted(os.listdir(out / "train") + os.listdir(out / "val")) == sorted(name for name, _ in samples)


def rectangle(y0, y1, x0, x1, height=SIZE, width=SIZE):
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def ellipse(cx, cy, rx, ry, theta=0.0, height=SIZE, width=SIZE):
    """Pixels whose centre lies in the ellipse (implicit equation, rotated by theta clockwise on screen)."""
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    dx, dy = xs - cx, ys - cy
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1


def test_labelme_rectangles_circles_and_groups(tmp_path):
    source = tmp_path / "labelme"
    source.mkdir()
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(source / "a.png")
    labelme_file(source, "a.png", [
        labelme_shape("box", [[10, 8], [2, 3]], "rectangle"),  # corners in either order
        labelme_shape("ball", [[40, 20], [40, 32]], "circle"),  # centre, then a point on the circle
        labelme_shape("box", [[30, 40], [40, 40], [40, 50], [30, 50]], group_id=7),
        labelme_shape("box", [[50, 40], [60, 40], [60, 50], [50, 50]], group_id=7),
        labelme_shape("mark", [[5, 5]], "point"),  # not a region: skipped
    ])
    out = tmp_path / "data"
    convert("--format", "labelme", "--input", source, "--out", out, "--val-fraction", 0)
    [(box, box_mask), (ball, ball_mask), (group, group_mask)] = read_back(out)["a.png"]
    assert (box, ball, group) == ("box", "ball", "box")
    assert np.array_equal(box_mask, rectangle(3, 8, 2, 10))  # integer corners: pixels [x1, x2) x [y1, y2)
    assert iou(ball_mask, ellipse(40, 20, 12, 12)) >= 0.95
    assert np.array_equal(group_mask, rectangle(40, 50, 30, 40) | rectangle(40, 50, 50, 60))
    data = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert [len(a["segmentation"]) for a in data["annotations"]] == [1, 1, 2]  # polygons stay polygons
    assert len(data["annotations"][1]["segmentation"][0]) == 2 * coco.CURVE_POINTS


def test_labelme_group_with_two_labels_is_refused(tmp_path):
    source = tmp_path / "labelme"
    source.mkdir()
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(source / "a.png")
    labelme_file(source, "a.png", [labelme_shape("cat", [[1, 1], [9, 1], [9, 9]], group_id=3),
                                   labelme_shape("dog", [[20, 1], [29, 1], [29, 9]], group_id=3)])
    with pytest.raises(ValueError, match=r"a\.json: shapes\[1\] has group_id 3 with label 'dog'.*'cat'"):
        convert("--format", "labelme", "--input", source, "--out", tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_labelme_size_differing_from_the_image_is_refused(tmp_path):
    source = tmp_path / "labelme"
    source.mkdir()
    Image.fromarray(np.zeros((SIZE, SIZE + 8, 3), np.uint8)).save(source / "a.png")
    labelme_file(source, "a.png", [labelme_shape("cat", [[1, 1], [9, 1], [9, 9]])])
    with pytest.raises(ValueError, match=r"a\.json: imageHeight x imageWidth is 64x64 but .*a\.png is 64x72"):
        convert("--format", "labelme", "--input", source, "--out", tmp_path / "data")


# ----------------------------------------------------------------------------------------------------
# VIA


def via_project(folder, entries, name="project.json"):
    """A VIA 2.x project: entries [(file name, [(shape_attributes, region_attributes)])]."""
    metadata = {}
    for file_name, regions in entries:
        size = os.path.getsize(folder / file_name)
        metadata[f"{file_name}{size}"] = {
            "filename": file_name, "size": size, "file_attributes": {},
            "regions": [{"shape_attributes": s, "region_attributes": r} for s, r in regions]}
    project = {"_via_settings": {}, "_via_img_metadata": metadata, "_via_attributes": {"region": {}, "file": {}}}
    (folder / name).write_text(json.dumps(project))


def via_polygon(polygon):
    xy = np.reshape(polygon, (-1, 2))
    return {"name": "polygon", "all_points_x": xy[:, 0].tolist(), "all_points_y": xy[:, 1].tolist()}


def test_via_round_trip(tmp_path):
    source = tmp_path / "via"
    samples = make_images(source, 6)
    # VIA has no groups: one region, one object, so only the objects in one piece are written.
    samples = [(name, [(label, mask) for label, mask in instances if len(trace(mask)) == 1])
               for name, instances in samples]
    via_project(source, [(name, [(via_polygon(trace(mask)[0]), {"shape": label}) for label, mask in instances])
                         for name, instances in samples])
    out = tmp_path / "data"
    convert("--format", "via", "--input", source, "--out", out, "--class-attribute", "shape")
    assert_round_trip(samples, read_back(out))


def test_via_rectangles_circles_and_ellipses(tmp_path):
    source = tmp_path / "via"
    source.mkdir()
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(source / "a.png")
    via_project(source, [("a.png", [
        ({"name": "rect", "x": 2, "y": 3, "width": 8, "height": 5}, {"kind": "box"}),
        ({"name": "circle", "cx": 40, "cy": 20, "r": 12}, {"kind": "ball"}),
        ({"name": "ellipse", "cx": 30, "cy": 45, "rx": 20, "ry": 8, "theta": 0.5}, {"kind": {"egg": True, "x": False}}),
        ({"name": "point", "cx": 3, "cy": 3}, {"kind": "mark"}),  # not an area: skipped
    ])])
    out = tmp_path / "data"
    convert("--format", "via", "--input", source, "--out", out, "--class-attribute", "kind", "--val-fraction", 0)
    [(box, box_mask), (ball, ball_mask), (egg, egg_mask)] = read_back(out)["a.png"]
    assert (box, ball, egg) == ("box", "ball", "egg")  # the checkbox attribute: the one key set
    assert np.array_equal(box_mask, rectangle(3, 8, 2, 10))
    assert iou(ball_mask, ellipse(40, 20, 12, 12)) >= 0.95
    assert iou(egg_mask, ellipse(30, 45, 20, 8, 0.5)) >= 0.95
    assert iou(egg_mask, ellipse(30, 45, 20, 8, -0.5)) < 0.8  # the rotation goes the way VIA draws it


def test_via_needs_the_class_attribute(tmp_path):
    source = tmp_path / "via"
    source.mkdir()
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(source / "a.png")
    via_project(source, [("a.png", [({"name": "rect", "x": 2, "y": 3, "width": 8, "height": 5}, {"type": "x"})])])
    with pytest.raises(ValueError, match="--class-attribute is required"):
        convert("--format", "via", "--input", source, "--out", tmp_path / "data")
    with pytest.raises(ValueError, match=r"project\.json: a\.png, regions\[0\]: region attribute 'kind'"):
        convert("--format", "via", "--input", source, "--out", tmp_path / "data", "--class-attribute", "kind")


# ----------------------------------------------------------------------------------------------------
# Instance-id PNGs


def write_mask_pngs(folder, samples, dtype=np.uint8):
    os.makedirs(folder / "masks", exist_ok=True)
    for name, instances in samples:
        ids = np.zeros((SIZE, SIZE), dtype)
        for k, (_, mask) in enumerate(instances):
            ids[mask] = k + 1
        Image.fromarray(ids).save(folder / "masks" / f"{os.path.splitext(name)[0]}.png")
        table = {str(k + 1): label for k, (label, _) in enumerate(instances)}
        (folder / "masks" / f"{os.path.splitext(name)[0]}.json").write_text(json.dumps(table))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_mask_png_round_trip_is_exact(tmp_path, dtype):
    source = tmp_path / "png"
    samples = make_images(source / "images", 6)
    write_mask_pngs(source, samples, dtype)
    out = tmp_path / "data"
    convert("--format", "mask-png", "--input", source, "--out", out)
    assert_round_trip(samples, read_back(out), min_iou=1.0)
    data = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert all(isinstance(a["segmentation"], dict) for a in data["annotations"])  # RLE


def test_mask_png_with_an_instance_the_table_does_not_name(tmp_path):
    source = tmp_path / "png"
    samples = make_images(source / "images", 1)
    write_mask_pngs(source, samples)
    (source / "masks" / "img00.json").write_text(json.dumps({"1": "square"}))
    with pytest.raises(ValueError, match=r"img00\.json names no class for instance ids \[2"):
        convert("--format", "mask-png", "--input", source, "--out", tmp_path / "data")
    (source / "masks" / "img00.json").write_text('["square", "circle"]')
    with pytest.raises(ValueError, match=r"img00\.json must hold a JSON object \{...\}; got a list"):
        convert("--format", "mask-png", "--input", source, "--out", tmp_path / "data")


# ----------------------------------------------------------------------------------------------------
# Split, classes, output folder


def val_files(out):
    return sorted(os.listdir(out / "val"))


def test_split_is_deterministic(tmp_path):
    source = tmp_path / "png"
    samples = make_images(source / "images", 10)
    write_mask_pngs(source, samples)
    for name, seed in (("a", 0), ("b", 0), ("c", 5)):
        convert("--format", "mask-png", "--input", source, "--out", tmp_path / name, "--seed", seed,
                "--val-fraction", 0.3)
    assert len(val_files(tmp_path / "a")) == 3 and len(os.listdir(tmp_path / "a" / "train")) == 7
    assert val_files(tmp_path / "a") == val_files(tmp_path / "b")
    assert val_files(tmp_path / "a") != val_files(tmp_path / "c")


def test_val_names_rule():
    names = [f"{i}.png" for i in range(10)]
    assert coco.val_names(names, 0.3, 0) == coco.val_names(list(reversed(names)), 0.3, 0)  # read order: no matter
    assert len(coco.val_names(names, 0.3, 0)) == 3
    assert len(coco.val_names(names, 0.01, 0)) == 1  # at least one when asked for some
    assert len(coco.val_names(names[:2], 0.9, 0)) == 1  # and at least one left to train on
    assert coco.val_names(names, 0.0, 0) == set()
    with pytest.raises(ValueError, match="--val-fraction must be in"):
        coco.val_names(names, 1.0, 0)


def test_classes_fix_the_category_order(tmp_path):
    source = tmp_path / "png"
    samples = make_images(source / "images", 6)
    write_mask_pngs(source, samples)
    order = ["triangle", "star", "square", "circle"]
    convert("--format", "mask-png", "--input", source, "--out", tmp_path / "a", "--classes", ",".join(order))
    convert("--format", "mask-png", "--input", source, "--out", tmp_path / "b")
    for name, expected in (("a", order), ("b", sorted(CLASSES))):
        for split in ("train", "val"):
            data = json.loads((tmp_path / name / "annotations" / f"instances_{split}.json").read_text())
            assert data["categories"] == [{"id": i + 1, "name": n} for i, n in enumerate(expected)]
    assert_round_trip(samples, read_back(tmp_path / "a"), min_iou=1.0)  # labels follow the names
    with pytest.raises(ValueError, match=r"class 'star' \(in .*img\d\d\.png\) is not in --classes"):
        convert("--format", "mask-png", "--input", source, "--out", tmp_path / "c", "--classes",
                "triangle,square,circle")


def test_existing_output_is_refused_and_an_empty_one_filled(tmp_path):
    source = tmp_path / "png"
    write_mask_pngs(source, make_images(source / "images", 3))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--out .*full exists and is not empty"):
        convert("--format", "mask-png", "--input", source, "--out", tmp_path / "full")
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    convert("--format", "mask-png", "--input", source, "--out", tmp_path / "empty")
    assert sorted(os.listdir(tmp_path / "empty")) == ["annotations", "train", "val"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".convert-")]  # no temporary folder left


def test_labelme_image_paths_from_windows_and_subfolders(tmp_path):
    source = tmp_path / "labelme"
    (source / "images").mkdir(parents=True)
    (source / "json").mkdir()
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(source / "images" / "a.png")
    data = {"shapes": [labelme_shape("box", [[2, 3], [10, 8]], "rectangle")], "imagePath": "..\\images\\a.png",
            "imageHeight": SIZE, "imageWidth": SIZE}
    (source / "json" / "a.json").write_text(json.dumps(data))
    out = tmp_path / "data"
    convert("--format", "labelme", "--input", source, "--out", out, "--val-fraction", 0)
    [(_, mask)] = read_back(out)["images/a.png"]  # the path under --input, kept in the split folder
    assert np.array_equal(mask, rectangle(3, 8, 2, 10))
    assert (out / "train" / "images" / "a.png").exists()
