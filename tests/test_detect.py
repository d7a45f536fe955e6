"""detect.py: tiles, detection over tiles, the runner over folders, globs and videos.

Oracles: model.detect itself on the whole image (a tile as large as the image must give exactly its
result; the runner's JSON must hold its detections); windows and boxes computed by hand; objects the test
draws, found by a stand-in detector that reports the blobs a window shows (so that where an object lies
across a seam is known exactly); pycocotools' COCOeval, which must accept the JSON; the frames the test
encodes, for the video round trip; the pixels of an EXIF-rotated JPEG turned by hand with numpy.
"""

import json
import os
from types import SimpleNamespace

import av
import numpy as np
import pytest
import scipy.ndimage
import torch
from helpers_model import make_detecting, small_config
from PIL import Image
from test_images import write_exif_jpeg

import coco
import detect
import shapes
import utils
import visualize
from model import MaskRCNN


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the machine has 2 busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    """A small random Mask R-CNN that makes detections (tests/helpers_model.py), labels 1..4 mapped to the
    data set's category ids as a model trained here."""
    torch.manual_seed(0)
    config = small_config(NUM_CLASSES=5, DETECTION_MAX_INSTANCES=20, LABELS_ARE_CATEGORY_IDS=False,
                          CLASS_NAMES=("__background__", "square", "circle", "triangle", "star"))
    return make_detecting(MaskRCNN(config)).eval()


@pytest.fixture(scope="module")
def weights(model, module_tmp_path):
    """The model as train.py writes a checkpoint (state_dict and config)."""
    path = module_tmp_path / "last.pth"
    torch.save({"model": model.state_dict(), "config": model.config.to_dict()}, path)
    return str(path)


def smooth_picture(height, width, seed=0):
    """HxWx3 uint8 with structure at several scales (detections of a random model need some)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((height // 8 + 2, width // 8 + 2, 3))
    image = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR))
    return np.clip(image.astype(int) + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)


def run_detect(*argv):
    detect.main([str(a) for a in argv])


# ----------------------------------------------------------------------------------------------------
# Tiles


def test_spans_by_hand():
    assert detect.spans(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]  # 3 windows, overlaps of exactly 1
    assert detect.spans(5, 4, 0) == [(0, 4), (1, 5)]
    assert detect.spans(4, 4, 1) == [(0, 4)]
    assert detect.spans(3, 4, 1) == [(0, 3)]  # an image smaller than a tile is one window


@pytest.mark.parametrize("length", [5, 129, 200, 1000, 4000, 6000])
@pytest.mark.parametrize("tile,overlap", [(128, 32), (100, 0), (1333, 333), (64, 63)])
def test_spans_cover_overlap_and_are_few(length, tile, overlap):
    windows = detect.spans(length, tile, overlap)
    if length <= tile:
        assert windows == [(0, length)]
        return
    assert windows[0][0] == 0 and windows[-1][1] == length
    assert all(end - start == tile for start, end in windows)
    assert all(a_end - b_start >= overlap for (_, a_end), (b_start, _) in zip(windows, windows[1:]))
    count = len(windows)
    assert (count - 1) * (tile - overlap) + overlap < length, "one window fewer would have been enough"


def test_owned_regions_partition_the_image_inside_the_windows():
    height, width = 300, 250
    image_tiles = detect.tiles(height, width, 128, 32)
    assert len(image_tiles) == 3 * 3
    points = np.random.default_rng(0).uniform([0, 0], [width, height], (2000, 2))
    points = np.concatenate([points, [[94.5, 107.0], [0, 0], [width, height]]])  # on the cuts and the corners
    owners = np.zeros(len(points), int)
    for t in image_tiles:
        x1, y1, x2, y2 = t.owned
        inside = (points[:, 0] >= x1) & (points[:, 0] < x2) & (points[:, 1] >= y1) & (points[:, 1] < y2)
        owners += inside
        wx1, wy1, wx2, wy2 = t.window
        assert wx2 - wx1 <= 128 and wy2 - wy1 <= 128
        assert np.all((points[inside] >= [wx1, wy1]) & (points[inside] <= [wx2, wy2]))
    assert np.all(owners == 1)


def test_tiles_reject_an_overlap_as_large_as_the_tile():
    with pytest.raises(ValueError, match="overlap must be smaller than tile; got overlap 64, tile 64"):
        detect.tiles(100, 100, 64, 64)


def test_images_are_tiled_above_twice_image_max_dim(model):
    config = model.config  # IMAGE_MAX_DIM 160
    assert detect.tile_size(320, 200, config) == (320, 80)  # whole image: one tile
    assert detect.tile_size(200, 321, config) == (160, 40)
    assert detect.tile_size(50, 60, config, tile=32, overlap=5) == (32, 5)


def test_full_masks_paste_and_sample_by_hand():
    crop = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1]], bool)
    result = {"mask_crops": [crop], "mask_origins": np.array([[1, 1]])}  # x 1..3, y 1..3 of a 4x4 image
    expected = np.zeros((4, 4), bool)
    expected[1:4, 1:4] = crop
    np.testing.assert_array_equal(detect.full_masks(result, 4, 4)[0], expected)
    # Half size: output pixel (i, j) shows image pixel (2i + 1, 2j + 1), i.e. crop pixel (2i, 2j).
    np.testing.assert_array_equal(detect.full_masks(result, 4, 4, size=(2, 2))[0], [[True, False], [True, True]])


@pytest.mark.parametrize("case", ["inside", "corner", "full height", "whole image", "empty", "one pixel", "edges"])
def test_crop_rle_is_pycocotools_encoding_of_the_full_mask(case):
    height, width = 9, 7
    rng = np.random.default_rng(len(case))
    crop, origin = {
        "inside": (rng.random((4, 3)) < 0.5, (2, 3)),
        "corner": (rng.random((3, 2)) < 0.5, (5, 6)),
        "full height": (rng.random((9, 3)) < 0.7, (1, 0)),  # runs go on from one column into the next
        "whole image": (np.ones((9, 7), bool), (0, 0)),
        "empty": (np.zeros((0, 0), bool), (0, 0)),
        "one pixel": (np.ones((1, 1), bool), (6, 8)),
        "edges": (np.array([[1, 0], [0, 0], [1, 1]], bool), (0, 0)),
    }[case]
    full = np.zeros((height, width), bool)
    full[origin[1] : origin[1] + crop.shape[0], origin[0] : origin[0] + crop.shape[1]] = crop
    assert detect.crop_rle(crop, origin, height, width) == utils.mask_to_rle(full)


# ----------------------------------------------------------------------------------------------------
# Detection over tiles


def assert_same_as_detect(tiled, expected, height, width):
    np.testing.assert_array_equal(tiled["boxes"], expected["boxes"])
    np.testing.assert_array_equal(tiled["scores"], expected["scores"])
    np.testing.assert_array_equal(tiled["class_ids"], expected["class_ids"])
    np.testing.assert_array_equal(detect.full_masks(tiled, height, width), expected["masks"])


@pytest.mark.parametrize("extra", [0, 50])
def test_a_tile_as_large_as_the_image_is_detect(model, extra):
    image = smooth_picture(96, 130)
    expected = model.detect([image])[0]
    assert len(expected["scores"]) >= 5, "the test needs real detections"
    tiled = detect.detect_tiled(model, image, tile=130 + extra)
    assert_same_as_detect(tiled, expected, 96, 130)
    assert all(c.dtype == bool for c in tiled["mask_crops"])
    covered = [c.size for c in tiled["mask_crops"]]
    assert sum(covered) < len(covered) * 96 * 130, "masks are kept cut to what they cover"


class BlobDetector:
    """Stands in for MaskRCNN in detect_many: reports each connected blob of non-black pixels a window
    shows, cut where the window cuts it (as a detector sees an object at a tile's edge), with its exact
    box and mask, class 1 + its red value // 64, score 0.9."""

    config = SimpleNamespace(IMAGE_MAX_DIM=128, DETECTION_NMS_THRESHOLD=0.5)

    def detect(self, images):
        results = []
        for image in images:
            labels, count = scipy.ndimage.label(image.any(2))
            masks = np.stack([labels == k for k in range(1, count + 1)]).reshape(count, *image.shape[:2])
            boxes = np.array([box_of(m) for m in masks], np.float32).reshape(-1, 4)
            class_ids = np.array([1 + image[m][0, 0] // 64 for m in masks], np.int64)
            results.append({"boxes": boxes, "class_ids": class_ids, "scores": np.full(count, 0.9, np.float32),
                            "masks": masks})
        return results


def box_of(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_an_object_across_a_seam_is_found_once():
    # tile 128, overlap 48 on 200x240: columns 0-128, 56-184, 112-240 (cuts at 92 and 148), rows 0-128 and
    # 72-200 (cut at 100).
    image_tiles = detect.tiles(200, 240, 128, 48)
    assert [t.window for t in image_tiles[:3]] == [(0, 0, 128, 128), (56, 0, 184, 128), (112, 0, 240, 128)]
    assert image_tiles[3].window == (0, 72, 128, 200)
    image = np.zeros((200, 240, 3), np.uint8)
    yy, xx = np.mgrid[0:200, 0:240]
    objects = [
        (xx >= 78) & (xx < 108) & (yy >= 20) & (yy < 50),  # wholly inside an overlap, across the cut at 92
        (xx >= 112) & (xx < 150) & (yy >= 20) & (yy < 50),  # across the first column's edge at 128
        (xx - 140) ** 2 + (yy - 110) ** 2 < 20**2,  # across the row edge at 128 and the cut at 100
        (xx >= 200) & (xx < 230) & (yy >= 150) & (yy < 190),  # in one tile only
    ]
    for k, mask in enumerate(objects):
        image[mask] = (40 + 64 * k, 200, 200)
    found = detect.detect_tiled(BlobDetector(), image, tile=128, overlap=48)
    assert len(found["scores"]) == len(objects)
    masks = detect.full_masks(found, 200, 240)
    for k, mask in enumerate(objects):
        i = int(np.flatnonzero(found["class_ids"] == 1 + k)[0])
        np.testing.assert_array_equal(found["boxes"][i], box_of(mask))
        np.testing.assert_array_equal(masks[i], mask)


def test_tiled_detections_of_a_real_model_are_merged(model):
    image = smooth_picture(200, 300, seed=3)
    found = detect.detect_tiled(model, image, tile=128, overlap=32, batch=3)
    assert len(detect.tiles(200, 300, 128, 32)) == 6
    boxes, n = found["boxes"], len(found["scores"])
    assert n > 20, "six tiles of a detecting model give many detections"
    assert np.all(np.diff(found["scores"]) <= 0)
    assert np.all(boxes >= 0) and np.all(boxes[:, [0, 2]] <= 300) and np.all(boxes[:, [1, 3]] <= 200)
    iou = utils.box_iou(torch.from_numpy(boxes), torch.from_numpy(boxes)).numpy()
    same_class = found["class_ids"][:, None] == found["class_ids"][None]
    assert not np.any((iou > model.config.DETECTION_NMS_THRESHOLD) & same_class & ~np.eye(n, dtype=bool))
    for crop, (x, y) in zip(found["mask_crops"], found["mask_origins"]):
        assert x >= 0 and y >= 0 and x + crop.shape[1] <= 300 and y + crop.shape[0] <= 200


def test_exif_rotated_jpeg_gives_the_upright_detections(model, tmp_path):
    upright = smooth_picture(96, 128, seed=5)
    raw = write_exif_jpeg(tmp_path / "phone.jpg", upright, 6)  # stored 128 high, 96 wide
    assert raw.shape[:2] == (128, 96)
    expected = model.detect([np.ascontiguousarray(np.rot90(raw, -1))])[0]
    assert len(expected["scores"]) >= 5
    got = model.detect([tmp_path / "phone.jpg"])[0]
    for key in ("boxes", "scores", "class_ids", "masks"):
        np.testing.assert_array_equal(got[key], expected[key])
    assert_same_as_detect(detect.detect_tiled(model, tmp_path / "phone.jpg", 128), expected, 96, 128)


# ----------------------------------------------------------------------------------------------------
# Videos


def moving_frames(count, height, width):
    """Smooth colour waves that move from frame to frame, as in a real video."""
    y, x = np.mgrid[0:height, 0:width]
    return [np.stack([128 + 100 * np.sin((x + 4 * t) / 10.0), 128 + 100 * np.cos((y + t) / 8.0),
                      128 + 60 * np.sin((x + y + t) / 9.0)], -1).round().astype(np.uint8) for t in range(count)]


def read_frames(path):
    return list(detect.read_video(path))


def test_video_round_trip_is_near_lossless(tmp_path):
    frames = moving_frames(7, 45, 61)  # odd sides: 4:4:4
    assert detect.write_video(tmp_path / "clip.mp4", iter(frames), 12, crf=0) == 7
    back = read_frames(tmp_path / "clip.mp4")
    assert len(back) == 7 and all(b.shape == (45, 61, 3) and b.dtype == np.uint8 for b in back)
    worst = max(np.abs(b.astype(int) - f).max() for b, f in zip(back, frames))
    assert worst <= 3, f"crf 0 differs only by RGB <-> YUV rounding; got up to {worst}"
    assert detect.video_properties(tmp_path / "clip.mp4") == (12, 7)


@pytest.mark.parametrize("degrees, corner", [(90, (slice(35, 40), slice(0, 5))), (-90, (slice(0, 5), slice(25, 30))),
                                             (180, (slice(25, 30), slice(35, 40)))])
def test_video_with_a_display_rotation_is_read_upright(tmp_path, degrees, corner):
    # Stored 30 x 40 with a white 5 x 5 top-left corner, and a display matrix that turns it `degrees`
    # counter-clockwise (FFmpeg's sign, as a phone's portrait video: -90): 90 puts that corner at the
    # bottom left of a 40 x 30 picture, -90 at the top right, 180 at the bottom right of a 30 x 40 one.
    stored = np.zeros((30, 40, 3), np.uint8)
    stored[:5, :5] = 255
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt, stream.options = 40, 30, "yuv444p", {"crf": "0"}
        stream.set_display_rotation(degrees)
        for _ in range(2):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")))
        container.mux(stream.encode())
    frames = read_frames(path)
    expected = np.zeros((30, 40) if degrees == 180 else (40, 30), bool)
    expected[corner] = True
    assert len(frames) == 2
    for frame in frames:
        assert frame.shape == expected.shape + (3,)
        np.testing.assert_array_equal(frame.min(2) > 128, expected)


def test_detect_py_on_a_video_gives_every_frame_back(weights, tmp_path):
    frames = moving_frames(6, 64, 80)
    detect.write_video(tmp_path / "in" / "clip.mp4", frames, 25, crf=0)
    # Nothing detected (no score exceeds 1): the annotated video is the video itself, re-encoded at
    # VIDEO_CRF 18 with 4:2:0 chroma (as players want it), which costs a few levels on these colour waves.
    run_detect("--weights", weights, "--input", tmp_path / "in" / "clip.mp4", "--out", tmp_path / "plain",
               "--set", "DETECTION_MIN_CONFIDENCE=1.0")
    back = read_frames(tmp_path / "plain" / "clip.mp4")
    assert len(back) == 6 and all(b.shape == (64, 80, 3) for b in back)
    error = np.mean([np.abs(b.astype(int) - f).mean() for b, f in zip(back, frames)])
    assert error < 5.0, f"mean pixel error {error}"
    assert detect.video_properties(tmp_path / "plain" / "clip.mp4") == (25, 6)
    # With detections: every frame comes back drawn on, and each has its image id.
    run_detect("--weights", weights, "--input", tmp_path / "in", "--out", tmp_path / "drawn", "--min-score", 0,
               "--batch", 4)
    drawn = read_frames(tmp_path / "drawn" / "clip.mp4")
    assert len(drawn) == 6 and all(d.shape == (64, 80, 3) for d in drawn)
    images = json.loads((tmp_path / "drawn" / "images.json").read_text())["images"]
    assert [(e["frame"], e["height"], e["width"]) for e in images] == [(k, 64, 80) for k in range(6)]
    detections = json.loads((tmp_path / "drawn" / "detections.json").read_text())
    assert detections and {d["image_id"] for d in detections} <= {e["id"] for e in images}
    assert max(np.abs(d.astype(int) - b).mean() for d, b in zip(drawn, back)) > 5, "the frames are drawn on"


# ----------------------------------------------------------------------------------------------------
# The runner: folders and globs, COCO results, bad input


def files_under(root):
    return {os.path.join(d, f) for d, _, names in os.walk(root) for f in names}


@pytest.mark.parametrize("kind", ["folder", "glob"])
def test_a_run_writes_pictures_and_json_that_cocoeval_scores(model, weights, tmp_path, monkeypatch, kind):
    data = tmp_path / "data"
    shapes.write_split(str(data), "val", 4, 64, seed=0)
    monkeypatch.chdir(tmp_path)  # anything written relative to the working folder would show here
    before = files_under(tmp_path)
    spec = data / "val" if kind == "folder" else data / "val" / "00000[12].png"
    run_detect("--weights", weights, "--input", spec, "--out", tmp_path / "out", "--data", data, "--split", "val",
               "--min-score", 0.3)
    written = files_under(tmp_path) - before
    assert all(path.startswith(str(tmp_path / "out") + os.sep) for path in written), "only --out is written"
    names = [f"00000{k}.png" for k in ((0, 1, 2, 3) if kind == "folder" else (1, 2))]
    assert written == {str(tmp_path / "out" / n) for n in [*names, "detections.json", "images.json"]}
    for name in names:
        with Image.open(tmp_path / "out" / name) as drawn:
            assert drawn.size == (64, 64)

    dataset = coco.CocoDataset(str(data), "val", labels_are_category_ids=False)
    ids = {info["file_name"]: image_id for image_id, info in dataset.coco.imgs.items()}
    images = json.loads((tmp_path / "out" / "images.json").read_text())["images"]
    assert [(e["id"], os.path.basename(e["file_name"])) for e in images] == [(ids[n], n) for n in names]
    results = json.loads((tmp_path / "out" / "detections.json").read_text())
    # The JSON holds detect()'s detections above --min-score, under the data set's ids.
    for name in names:
        expected = model.detect([data / "val" / name])[0]
        keep = expected["scores"] >= 0.3
        mine = [r for r in results if r["image_id"] == ids[name]]
        assert len(mine) == keep.sum() > 0
        np.testing.assert_allclose([r["bbox"] for r in mine], np.concatenate(
            [expected["boxes"][keep, :2], expected["boxes"][keep, 2:] - expected["boxes"][keep, :2]], 1), atol=1e-4)
        assert [r["category_id"] for r in mine] == [dataset.label_to_category[c] for c in expected["class_ids"][keep]]
        for r, mask in zip(mine, expected["masks"][keep]):
            np.testing.assert_array_equal(utils.rle_to_mask(r["segmentation"], 64, 64), mask)
    metrics, _ = coco.coco_metrics(dataset.coco, results, image_ids=[ids[n] for n in names])
    for kind_ in ("bbox", "segm"):
        assert set(metrics[kind_]) == set(coco.STAT_NAMES)
        assert all(-1 <= v <= 1 for v in metrics[kind_].values())


def test_images_without_data_are_numbered_and_upright(weights, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    write_exif_jpeg(folder / "b_phone.jpg", smooth_picture(40, 64), 8)
    Image.fromarray(smooth_picture(30, 50, 1)).convert("L").save(folder / "a_grey.png")
    (folder / "notes.txt").write_text("not an image, skipped in a folder")
    run_detect("--weights", weights, "--input", folder, "--out", tmp_path / "out")
    images = json.loads((tmp_path / "out" / "images.json").read_text())
    assert [(e["id"], os.path.basename(e["file_name"]), e["height"], e["width"]) for e in images["images"]] == [
        (1, "a_grey.png", 30, 50), (2, "b_phone.jpg", 40, 64)]
    assert [c["name"] for c in images["categories"]] == ["square", "circle", "triangle", "star"]
    with Image.open(tmp_path / "out" / "b_phone.png") as drawn:
        assert drawn.size == (64, 40)  # upright


def test_bad_input_is_named(weights, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="nowhere.jpg.*no such file"):
        run_detect("--weights", weights, "--input", tmp_path / "nowhere.jpg", "--out", out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="empty.*no image or video"):
        run_detect("--weights", weights, "--input", tmp_path / "empty", "--out", out)
    with pytest.raises(SystemExit, match=r"\*.png.*no image or video"):
        run_detect("--weights", weights, "--input", tmp_path / "empty" / "*.png", "--out", out)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SystemExit, match="notes.txt.*neither an image nor a video"):
        run_detect("--weights", weights, "--input", tmp_path / "notes.txt", "--out", out)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(ValueError, match="cut.png"):
        run_detect("--weights", weights, "--input", tmp_path / "broken", "--out", out)
    (tmp_path / "video").mkdir()
    (tmp_path / "video" / "clip.mp4").write_text("not a video")
    with pytest.raises(ValueError, match="clip.mp4"):
        run_detect("--weights", weights, "--input", tmp_path / "video", "--out", out)
    data = tmp_path / "data"
    shapes.write_split(str(data), "val", 1, 64, seed=0)
    Image.fromarray(smooth_picture(64, 64)).save(tmp_path / "broken" / "stranger.png")
    with pytest.raises(SystemExit, match="stranger.png"):
        run_detect("--weights", weights, "--input", tmp_path / "broken" / "stranger.png", "--out", out,
                   "--data", data, "--split", "val")
    Image.fromarray(smooth_picture(64, 48)).save(tmp_path / "broken" / "000000.png")  # the JSON says 64x64
    with pytest.raises(ValueError, match="000000.png is 48x64 .*says 64x64"):
        run_detect("--weights", weights, "--input", tmp_path / "broken" / "000000.png", "--out", out,
                   "--data", data, "--split", "val")
    with pytest.raises(SystemExit):
        run_detect("--weights", weights, "--input", tmp_path, "--out", out, "--tile", 64, "--overlap", 64)
    assert not out.exists() or not any(out.iterdir())


def test_pictures_of_large_images_are_drawn_smaller():
    image = np.zeros((200, 300, 3), np.uint8)
    image[50:150, 100:200] = 255
    crop = np.ones((100, 100), bool)
    result = {"boxes": np.array([[100, 50, 200, 150]], np.float32), "class_ids": np.array([1]),
              "scores": np.array([0.9], np.float32), "mask_crops": [crop], "mask_origins": np.array([[100, 50]])}
    small = detect.picture(image, result, ["background", "thing"], max_side=150)
    assert small.shape == (100, 150, 3)
    assert detect.picture(image, result, ["background", "thing"], max_side=None).shape == (200, 300, 3)
    # The mask, blended half and half with its class's colour, covers the white square's place.
    expected = np.round(0.5 * 255 + 0.5 * 255 * np.array(visualize.color(1)))
    np.testing.assert_allclose(small[50, 75], expected, atol=1)
    np.testing.assert_array_equal(small[90, 10], [0, 0, 0])


def test_crop_rle_on_random_crops():
    rng = np.random.default_rng(7)
    height, width = 30, 25
    for _ in range(50):
        h, w = rng.integers(1, height + 1), rng.integers(1, width + 1)
        y, x = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        crop = rng.random((h, w)) < rng.uniform(0.1, 0.9)
        full = np.zeros((height, width), bool)
        full[y : y + h, x : x + w] = crop
        assert detect.crop_rle(crop, (x, y), height, width) == utils.mask_to_rle(full)
