"""Tests of export.py: torch.export (.pt2, loaded in a fresh process) and ONNX (run by onnxruntime on the CPU).

Oracles: the eager model's own detections (the model is checked against torchvision's in test_model.py)
for whole-model exports, with issue 15's tolerances (boxes within 0.01 px, scores within 1e-4, mask IoU at
least 0.99) on two image sizes each (the exported sizes are dynamic); torchvision.ops (batched_nms, nms,
roi_align) for the ONNX translations of our ops, on hand-made cases with ties and several groups; and
the errors that name what cannot be exported.
Models are small (ResNet-18, 128-160 px images, random weights that make detections) and each is exported
once per module, because an export takes tens of seconds on a 2-core CPU.
"""

import os
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import skimage.data
import torch
import torch.nn.functional as F
import torchvision
from helpers_model import make_detecting, small_config, smooth_image

import export
from config import ShapesConfig
from model import MaskRCNN

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def photo(name, height, width):
    """A scikit-image photo resized to height x width, as a [3, H, W] float tensor in [0, 1]."""
    image = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float()[None] / 255
    return F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False)[0].clamp(0, 1)


def assert_same(model, image, got, min_detections=5):
    expected = export.eager_detections(model, image)
    report = export.compare_detections(expected, got, model.config.MASK_THRESHOLD)
    assert report["count_expected"] >= min_detections, f"the eager model made only {report['count_expected']} " \
        "detections; the test needs real ones"
    assert report["same"], report


@pytest.fixture(scope="module")
def shapes_model():
    """The shapes preset (half-pixel aligned RoIAlign, trained BN) with random weights that detect things."""
    torch.manual_seed(0)
    return make_detecting(MaskRCNN(ShapesConfig())).eval()


@pytest.fixture(scope="module")
def coco_like_model():
    """Original RoIAlign (aligned=False, 2 samples per bin, as the COCO default), GroupNorm, 128-160 px."""
    torch.manual_seed(1)
    return make_detecting(MaskRCNN(small_config())).eval()


@pytest.fixture(scope="module")
def program_file(shapes_model, module_tmp_path):
    path = str(module_tmp_path / "model.pt2")
    export.export_program(shapes_model, path, example=smooth_image(120, 150))
    return path


@pytest.fixture(scope="module")
def onnx_file(coco_like_model, module_tmp_path):
    path = str(module_tmp_path / "model.onnx")
    export.export_onnx(coco_like_model, path, example=smooth_image(150, 200))
    return path


# ---- torch.export ----


def test_program_keeps_our_ops_as_custom_ops(program_file):
    targets = {str(node.target) for node in torch.export.load(program_file).graph.nodes if node.op == "call_function"}
    assert {"maskrcnn.batched_nms.default", "maskrcnn.roi_align.default"} <= targets, sorted(targets)


def test_program_in_a_fresh_process_gives_the_eager_detections(shapes_model, program_file, tmp_path):
    # Sizes in both orientations (the height and width of the program are dynamic); 200 x 220, whose resized
    # width (128 / 220 * 220) is 128 in float64 but 127 in float32; and 35 x 250, resized to 18 x 128 and padded
    # to 32, where the pooling scale inferred for P5 (as torchvision's) is 1/16, not 1/32.
    images = [smooth_image(120, 150, seed=1), smooth_image(200, 90, seed=2), smooth_image(200, 220, seed=5),
              smooth_image(35, 250, seed=5)]
    torch.save(images, tmp_path / "images.pt")
    script = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import export; "
              "program = export.load_program(sys.argv[2]); "
              "images = torch.load(sys.argv[3]); "
              "torch.save([program(image) for image in images], sys.argv[4])")
    subprocess.run([sys.executable, "-c", script, REPO, program_file, str(tmp_path / "images.pt"),
                    str(tmp_path / "outputs.pt")], check=True, cwd=tmp_path)
    outputs = torch.load(tmp_path / "outputs.pt")
    for image, got in zip(images, outputs):
        assert got[3].shape[-2:] == image.shape[-2:]
        assert_same(shapes_model, image, got)


def test_program_and_onnx_with_no_detections(tmp_path):
    # Background always wins: the detections, masks and pasting run on empty tensors.
    torch.manual_seed(2)
    model = make_detecting(MaskRCNN(ShapesConfig())).eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[0] = 1e4
    program = export.export_program(model, str(tmp_path / "model.pt2"), example=smooth_image(120, 150))
    export.export_onnx(model, str(tmp_path / "model.onnx"), program=program)
    image = smooth_image(100, 130, seed=4)
    expected = [(0, 4), (0,), (0,), (0, 1, 100, 130)]
    assert [tuple(v.shape) for v in export.eager_detections(model, image)] == expected
    assert [tuple(v.shape) for v in export.load_program(str(tmp_path / "model.pt2"))(image)] == expected
    assert [v.shape for v in export.run_onnx(str(tmp_path / "model.onnx"), image.numpy())] == expected


# ---- ONNX ----


def test_onnx_uses_the_standard_ops_and_no_custom_domain(onnx_file):
    import onnx

    graph = onnx.load(onnx_file)
    op_types = {node.op_type for node in graph.graph.node} | {
        node.op_type for function in graph.functions for node in function.node}
    assert {"NonMaxSuppression", "RoiAlign"} <= op_types
    assert all(node.domain in ("", "ai.onnx") for node in graph.graph.node if node.op_type in op_types), \
        "our ops must become standard ONNX ops"
    inputs = graph.graph.input[0].type.tensor_type.shape.dim
    assert [inputs[1].dim_param, inputs[2].dim_param] == ["height", "width"], "the image height and width are dynamic"
    # and renamed everywhere: the masks output ends in height, width
    masks = next(o for o in graph.graph.output if o.name == "masks").type.tensor_type.shape.dim
    assert [masks[-2].dim_param, masks[-1].dim_param] == ["height", "width"]


@pytest.mark.parametrize("image", [
    pytest.param(lambda: smooth_image(150, 200, seed=3), id="smooth-150x200"),
    pytest.param(lambda: photo("coffee", 160, 120), id="coffee-160x120"),
    pytest.param(lambda: photo("astronaut", 140, 140), id="astronaut-140x140"),
    # resized to 120 x 160 in float64 but 120 x 159 in the float32 the exporter computes sizes in by default
    pytest.param(lambda: photo("chelsea", 100, 133), id="chelsea-100x133"),
    # resized to 22 x 160, padded to 32: P5's inferred pooling scale is 1/16 (a constant 1/32 would differ)
    pytest.param(lambda: smooth_image(35, 250, seed=5), id="smooth-35x250"),
])
def test_onnx_in_onnxruntime_gives_the_eager_detections(coco_like_model, onnx_file, image):
    image = image()
    got = export.run_onnx(onnx_file, image.numpy())
    assert got[3].shape[-2:] == tuple(image.shape[-2:])
    assert_same(coco_like_model, image, got)


def test_detectron2_rounding_exports_in_both_orientations(tmp_path):
    # The detectron2 presets' resize (RESIZE_ROUNDING="round": the shorter side to IMAGE_MIN_DIM, then + 0.5
    # and truncated). Python branches on the orientation fixed the export to the example's (it failed), and
    # the ONNX file must add the 0.5 in float64 (a float32 constant there was an invalid file). Portrait,
    # landscape and square images.
    torch.manual_seed(3)
    config = small_config(RESIZE_ROUNDING="round", RESIZE_ANTIALIAS=True, INPUT_FORMAT="BGR255",
                          PIXEL_MEAN=(103.53, 116.28, 123.675), PIXEL_STD=(1.0, 1.0, 1.0))
    model = make_detecting(MaskRCNN(config)).eval()
    program = export.export_program(model, str(tmp_path / "model.pt2"), example=smooth_image(120, 150))
    export.export_onnx(model, str(tmp_path / "model.onnx"), program=program)
    loaded = export.load_program(str(tmp_path / "model.pt2"))
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for image in (smooth_image(150, 200, seed=6), smooth_image(200, 150, seed=7), photo("chelsea", 140, 140),
                  photo("coffee", 100, 133)):
        assert_same(model, image, loaded(image))
        assert_same(model, image, export.run_onnx(session, image.numpy()))


class OneOp(torch.nn.Module):
    """One of our ops with its settings fixed, to export its ONNX translation alone."""

    def __init__(self, op, *settings):
        super().__init__()
        self.op, self.settings = op, settings

    def forward(self, *tensors):
        return self.op(*tensors, *self.settings)


def onnx_of(module, inputs, dynamic, path):
    """onnxruntime session for `module` exported through export.onnx_translations, dims `dynamic` free."""
    program = torch.export.export(module, inputs, dynamic_shapes=(dynamic,))  # one entry: forward(*tensors)
    torch.onnx.export(program, dynamo=True, opset_version=export.ONNX_OPSET,
                      custom_translation_table=export.onnx_translations()).save(str(path))
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def nms_cases():
    """(boxes [N, 4], scores [N], groups [N]): random overlapping boxes in 3 groups with tied scores, and none."""
    g = torch.Generator().manual_seed(0)
    corners = torch.rand(60, 2, generator=g) * 50
    boxes = torch.cat([corners, corners + 5 + torch.rand(60, 2, generator=g) * 30], dim=1)
    scores = torch.randint(0, 8, (60,), generator=g).float() / 8  # many ties
    groups = torch.randint(3, 7, (60,), generator=g)  # ids that do not start at 0
    empty = (torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    return [(boxes, scores, groups), (boxes[:1], scores[:1], groups[:1]), empty]


def test_onnx_batched_nms_is_torchvisions(tmp_path):
    boxes, scores, groups = nms_cases()[0]
    n = torch.export.Dim("n", min=0)
    session = onnx_of(OneOp(torch.ops.maskrcnn.batched_nms.default, 0.5), (boxes, scores, groups),
                      ({0: n}, {0: n}, {0: n}), tmp_path / "batched_nms.onnx")
    for boxes, scores, groups in nms_cases():
        (keep,) = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), (boxes, scores, groups))})
        expected = torchvision.ops.batched_nms(boxes, scores, groups, 0.5)
        np.testing.assert_array_equal(keep, expected.numpy())


def test_onnx_nms_is_torchvisions(tmp_path):
    boxes, scores, _ = nms_cases()[0]
    n = torch.export.Dim("n", min=0)
    session = onnx_of(OneOp(torch.ops.maskrcnn.nms.default, 0.3), (boxes, scores), ({0: n}, {0: n}),
                      tmp_path / "nms.onnx")
    for boxes, scores, _ in nms_cases():
        (keep,) = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), (boxes, scores))})
        np.testing.assert_array_equal(keep, torchvision.ops.nms(boxes, scores, 0.3).numpy())


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, -1, 2])
def test_onnx_roi_align_is_torchvisions(tmp_path, aligned, sampling_ratio):
    g = torch.Generator().manual_seed(0)
    features = torch.rand(2, 3, 20, 24, generator=g)
    corners = torch.rand(7, 2, generator=g) * 60
    # Boxes under one feature cell too (aligned=False makes them 1x1), and some past the border.
    boxes = torch.cat([corners, corners + torch.rand(7, 2, generator=g) * 40], dim=1)
    rois = torch.cat([torch.tensor([[0.0], [1.0], [0.0], [1.0], [1.0], [0.0], [1.0]]), boxes], dim=1)
    k = torch.export.Dim("k", min=0)
    session = onnx_of(OneOp(torch.ops.maskrcnn.roi_align.default, 0.25, 5, 4, sampling_ratio, aligned, 0),
                      (features, rois), (None, {0: k}), tmp_path / "roi_align.onnx")
    (got,) = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), (features, rois))})
    expected = torchvision.ops.roi_align(features, rois, (5, 4), 0.25, sampling_ratio, aligned)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=1e-5)


# ---- what cannot be exported ----


def test_training_mode_is_refused(shapes_model, tmp_path):
    shapes_model.train()
    try:
        for fn in (export.export_program, export.export_onnx):
            with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
                fn(shapes_model, str(tmp_path / "model"))
    finally:
        shapes_model.eval()


@pytest.mark.parametrize("setting", ["bicubic", ("bilinear", "bicubic")])
def test_bicubic_pooling_is_refused_for_onnx(setting, tmp_path):
    model = MaskRCNN(small_config(POOL_INTERPOLATION=setting)).eval()
    with pytest.raises(ValueError, match=r"POOL_INTERPOLATION=.*bicubic.*ONNX RoiAlign interpolates bilinearly"):
        export.export_onnx(model, str(tmp_path / "model.onnx"))
    assert not (tmp_path / "model.onnx").exists()


def test_float64_model_and_unknown_format_are_refused(shapes_model):
    with pytest.raises(ValueError, match=r"format must be one of onnx, torch; got 'tflite'"):
        export.check_exportable(shapes_model, "tflite")
    model = MaskRCNN(small_config()).eval().double()
    with pytest.raises(ValueError, match=r"float32 .* got torch.float64"):
        export.check_exportable(model, "torch")


def test_compare_detections_notices_each_kind_of_difference():
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 30]])
    masks = torch.zeros(2, 1, 50, 50)
    masks[0, 0, :10, :10] = 1
    masks[1, 0, 20:30, 20:40] = 1
    expected = (boxes, torch.tensor([1, 2]), torch.tensor([0.9, 0.8]), masks)
    assert export.compare_detections(expected, expected)["same"]
    changed = [(boxes + 0.02, *expected[1:]), (boxes, torch.tensor([1, 3]), *expected[2:]),
               (boxes, expected[1], torch.tensor([0.9, 0.8002]), masks), (*expected[:3], masks.roll(1, dims=-1)),
               tuple(v[:1] for v in expected)]
    for got in changed:
        assert not export.compare_detections(expected, got)["same"]


# ---- command line ----


def test_command_line_exports_a_checkpoint_and_checks_it(shapes_model, tmp_path):
    checkpoint = tmp_path / "last.pth"
    torch.save({"model": shapes_model.state_dict(), "config": shapes_model.config.to_dict()}, checkpoint)
    out = tmp_path / "model.pt2"
    result = subprocess.run([sys.executable, os.path.join(REPO, "export.py"), "--weights", str(checkpoint),
                             "--format", "torch", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.exists()
    assert "same detections as the eager model on astronaut, coffee, chelsea" in result.stderr
