"""Exports a Mask R-CNN to torch.export (an ExportedProgram, .pt2) or to ONNX, and checks that the exported
model gives the eager model's detections.

    python export.py --weights runs/demo/last.pth --format onnx --out runs/demo/model.onnx
    python export.py --weights runs/demo/last.pth --format torch --out runs/demo/model.pt2
    python export.py --weights coco --config coco --format onnx --out coco.onnx   # weights with no config

Both formats hold one program with this signature (DetectionProgram):
    image:  [3, H, W] float32 RGB in [0, 1], any H and W (dynamic), one image per call;
    boxes:  [D, 4] float32 (x1, y1, x2, y2) in the image's pixels, by decreasing score;
    labels: [D] int64 (as the model's labels: 1..K, or COCO category ids for torchvision's COCO weights);
    scores: [D] float32;
    masks:  [D, 1, H, W] float32 mask probabilities at the image's size (threshold them at MASK_THRESHOLD, 0.5).
It is MaskRCNN.forward in eval mode for a list of one image: the resize to IMAGE_MIN_DIM / IMAGE_MAX_DIM,
normalisation and padding are inside, so a user feeds the photo as it is. Training mode (losses) and the
intermediates of detect(..., return_intermediates=True) are not exported.

torch.export: our ops stay custom ops (torch.ops.maskrcnn.nms, batched_nms, roi_align); the loading process
needs them registered (`import nms, roialign` from this repository). Loaded with torch.export.load, the
program runs on images of any size (2 pixels a side at least), and checks at run time the size conditions the
trace assumed: with some models (seen with GroupNorm) it refuses images resized to 32 pixels or fewer on a side
("Guard failed"). The pooling scales are computed in the program from the sizes (model.exported_level_scales),
as the eager model infers them.

ONNX: the exporter is torch's dynamo exporter (torch.onnx.export(..., dynamo=True)), fed the same
ExportedProgram, with translations of our three ops written with onnxscript (onnx_translations). The
TorchScript exporter is not used: it traces one example, so the data-dependent control flow (numbers of
proposals and detections) and the image size would be frozen into the graph, and it is deprecated in the
pinned torch. batched_nms becomes NonMaxSuppression with one ONNX class per group (exact, where the
coordinate-offset trick could round an IoU across a threshold), reordered by decreasing score with ties in
index order as ours; roi_align becomes RoiAlign (opset 16 or later: coordinate_transformation_mode
"output_half_pixel" for POOL_ALIGNED=False, "half_pixel" for True; mode "avg"; sampling ratio 0 =
adaptive as our <= 0). Bicubic pooling (POOL_INTERPOLATION) has no ONNX form and is refused. The image's
size arithmetic is done in float64, as Python does it eagerly (the exporter's default, float32, resized
about one image size in ten to a pixel less, and the detections moved with it).
The file runs with onnxruntime alone (see the README's "Export" section).
"""

import argparse
import logging
import math
import operator
import os
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

import model as model_lib
import utils
from model import MaskRCNN
from roialign import INTERPOLATIONS

logger = logging.getLogger("export")

FORMATS = ("onnx", "torch")
ONNX_OPSET = 18  # RoiAlign's coordinate_transformation_mode needs >= 16; 18 is the exporter's default
OUTPUT_NAMES = ("boxes", "labels", "scores", "masks")
# The exported program's image sides, in pixels.
MIN_SIDE, MAX_SIDE = 2, 8192
# What "the same detections" means (issue 15): boxes within 0.01 pixel, scores within 1e-4, and every mask
# (thresholded at MASK_THRESHOLD) with an IoU of at least 0.99 with the eager one.
BOX_TOLERANCE, SCORE_TOLERANCE, MIN_MASK_IOU = 0.01, 1e-4, 0.99


############################################################
#  The exported program
############################################################


class DetectionProgram(nn.Module):
    """MaskRCNN inference for one image as tensors in and out, the signature both formats export:
    image [3, H, W] float32 in [0, 1] -> boxes [D, 4], labels [D] int64, scores [D], masks [D, 1, H, W]."""

    def __init__(self, model: MaskRCNN):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        result = self.model.infer([image])[0]
        return tuple(result[name] for name in OUTPUT_NAMES)


def check_exportable(model: MaskRCNN, format: str) -> None:
    """Raises ValueError naming what an export of `model` to `format` cannot express."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
    if not isinstance(model, MaskRCNN):
        raise ValueError(f"model must be a MaskRCNN; got {type(model).__name__}")
    if model.training:
        raise ValueError("model is in training mode, which returns losses and needs targets: only inference "
                         "exports; call model.eval() first")
    dtype = model.input_dtype
    if dtype != torch.float32:
        raise ValueError(f"model parameters must be float32 to export (the program takes a float32 image); got "
                         f"{dtype}: call model.float()")
    if format == "onnx":
        if "bicubic" in model_lib.pool_interpolations(model.config.POOL_INTERPOLATION):
            raise ValueError(f"POOL_INTERPOLATION={model.config.POOL_INTERPOLATION!r} cannot be exported to ONNX: "
                             "ONNX RoiAlign interpolates bilinearly only; export with --format torch, or use "
                             "'bilinear'")


def example_image(model: MaskRCNN) -> Tensor:
    """A [3, H, W] image in [0, 1] to trace with: not square (so that neither side is fixed to the other) and
    at least 3 x IMAGE_SIZE_DIVISOR pixels on each side after the resize."""
    c = model.config
    side = max(c.IMAGE_MIN_DIM, 3 * c.IMAGE_SIZE_DIVISOR + 1)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, side, side * 5 // 4, generator=g).to(device)


def export_program(model: MaskRCNN, path: Optional[str] = None,
                   example: Optional[Tensor] = None) -> torch.export.ExportedProgram:
    """torch.export of DetectionProgram(model) with dynamic image height and width; saved to `path`
    (torch.export.save, a .pt2 file) when given. model: a MaskRCNN in eval mode, float32."""
    check_exportable(model, "torch")
    example = example_image(model) if example is None else example
    height, width = torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE), torch.export.Dim("width", min=MIN_SIDE,
                                                                                             max=MAX_SIDE)
    # backed_size_oblivious: shapes are not specialised for sides of 0 or 1 (a feature map of one cell would
    # otherwise fix a side of the trace to the example's).
    with torch.no_grad(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
        program = torch.export.export(DetectionProgram(model), (example,), dynamic_shapes=({1: height, 2: width},))
    if path is not None:
        utils.atomic_write(path, lambda f: torch.export.save(program, f))
    return program


def load_program(path: str):
    """The callable module of a .pt2 written by export_program: image [3, H, W] -> (boxes, labels, scores,
    masks). Our ops must be registered: this module imports nms and roialign (through model)."""
    return torch.export.load(path).module()


############################################################
#  ONNX
############################################################


def onnx_translations() -> dict:
    """{our op, or Python arithmetic on sizes: its onnxscript translation} for torch.onnx.export's
    custom_translation_table."""
    import onnx
    from onnxscript import opset18 as op

    def selected_by_score(keep, scores):
        """keep [K] int64 indices -> the same by decreasing score, equal scores in index order (as ours)."""
        count = op.Shape(keep)
        ascending = op.TopK(keep, count, largest=0, sorted=1)[0]
        # TopK breaks ties by position (ONNX: the lower index first), here the ascending box index.
        order = op.TopK(op.Gather(scores, ascending), count, largest=1, sorted=1)[1]
        return op.Gather(ascending, order)

    def grouped_nms(boxes, scores, groups, iou_threshold):
        """NonMaxSuppression with one class per group: boxes [N, 4], scores [N], groups [N] int64 in 0..G-1."""
        count = op.Shape(boxes, start=0, end=1)
        # The largest group + 1, with a -1 appended so that no boxes give 0 groups (ReduceMax of nothing fails).
        group_count = op.Add(op.ReduceMax(op.Concat(groups, op.Constant(value_ints=[-1]), axis=0), keepdims=1),
                             op.Constant(value_ints=[1]))
        member = op.Equal(op.Unsqueeze(groups, [0]),
                          op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Squeeze(group_count), op.Constant(
                              value_int=1)), [1]))  # (G, N)
        # Boxes of other groups get -inf, which the threshold (the lowest finite float) drops.
        lowest = float(np.finfo(np.float32).min)
        class_scores = op.Where(member, op.Unsqueeze(scores, [0]), op.Constant(value_float=-math.inf))  # (G, N)
        selected = op.NonMaxSuppression(
            op.Unsqueeze(boxes, [0]), op.Unsqueeze(class_scores, [0]), count,
            op.Constant(value_floats=[iou_threshold]), op.Constant(value_floats=[lowest]), center_point_box=0,
        )  # (K, 3): batch, class, box
        keep = op.Squeeze(op.Slice(selected, [2], [3], [1]), [1])
        return selected_by_score(keep, scores)

    def nms(boxes, scores, iou_threshold: float):
        one_group = op.Expand(op.Constant(value_ints=[0]), op.Shape(scores))
        return grouped_nms(boxes, scores, one_group, iou_threshold)

    def batched_nms(boxes, scores, idxs, iou_threshold: float):
        # Groups renumbered 0..G-1 (Unique's inverse), so that G is their number, not their largest id.
        inverse = op.Unique(idxs, sorted=1)[2]
        return grouped_nms(boxes, scores, inverse, iou_threshold)

    def roi_align(input, rois, spatial_scale: float, pooled_height: int, pooled_width: int, sampling_ratio: int,
                  aligned: bool, interpolation: int = 0):
        if interpolation != INTERPOLATIONS["bilinear"]:
            raise ValueError("roi_align: ONNX RoiAlign interpolates bilinearly only; got bicubic pooling")
        batch_indices = op.Cast(op.Squeeze(op.Slice(rois, [0], [1], [1]), [1]), to=7)  # int64
        return op.RoiAlign(
            input, op.Slice(rois, [1], [5], [1]), batch_indices,
            # output_half_pixel is the original RoIAlign (RoIs at least 1x1), half_pixel detectron2's aligned one.
            coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel",
            mode="avg", output_height=pooled_height, output_width=pooled_width,
            sampling_ratio=max(sampling_ratio, 0), spatial_scale=spatial_scale,
        )

    # Python arithmetic on the image's (symbolic) sizes, in float64 wherever a float is involved, as Python
    # computes it eagerly. The exporter's own translations use float32, in which 220 * (128 / 220) < 128 (a
    # 200 x 220 image was resized to 116 x 127, not 116 x 128), and they make a Python float beside a size
    # (the 0.5 of detectron2's rounding) a float32 constant, which ONNX cannot add to a float64.
    def as_float64(value):
        if isinstance(value, (int, float)):
            return op.Constant(value=onnx.helper.make_tensor("value", onnx.TensorProto.DOUBLE, [], [float(value)]))
        return op.Cast(value, to=onnx.TensorProto.DOUBLE)

    def python_op(onnx_op):
        """onnx_op on two sizes or numbers, in float64 where either is a float (Python's promotion)."""
        def translation(a, b):
            if any(isinstance(v, float) or (not isinstance(v, int) and v.dtype.is_floating_point()) for v in (a, b)):
                a, b = as_float64(a), as_float64(b)
            return onnx_op(a, b)
        return translation

    sizes = {torch.sym_float: as_float64, operator.truediv: lambda a, b: op.Div(as_float64(a), as_float64(b)),
             operator.add: python_op(op.Add), operator.sub: python_op(op.Sub), operator.mul: python_op(op.Mul),
             torch.sym_min: python_op(op.Min), torch.sym_max: python_op(op.Max)}

    ops = torch.ops.maskrcnn
    return {ops.nms.default: nms, ops.batched_nms.default: batched_nms, ops.roi_align.default: roi_align, **sizes}


def export_onnx(model: MaskRCNN, path: str, example: Optional[Tensor] = None,
                program: Optional[torch.export.ExportedProgram] = None) -> None:
    """Writes DetectionProgram(model) as an ONNX file (opset ONNX_OPSET, dynamic image size; inputs "image",
    outputs OUTPUT_NAMES). model: a MaskRCNN in eval mode, float32, with bilinear pooling. program: what
    export_program(model) returned, when there is one already (it is what gets converted)."""
    check_exportable(model, "onnx")
    program = export_program(model, example=example) if program is None else program
    onnx_program = torch.onnx.export(program, dynamo=True, opset_version=ONNX_OPSET,
                                     custom_translation_table=onnx_translations(), input_names=["image"],
                                     output_names=list(OUTPUT_NAMES), optimize=True, verbose=False)
    image = onnx_program.model.graph.inputs[0].shape  # symbols named by the tracer (s62, s73, ...)
    onnx_program.rename_axes({image[1]: "height", image[2]: "width"})
    model_proto = onnx_program.model_proto  # under 2 GB for every backbone here: one file, no external data
    utils.atomic_write(path, lambda f: f.write(model_proto.SerializeToString()))


def run_onnx(path_or_session, image: np.ndarray) -> tuple:
    """Runs an exported ONNX file (or an onnxruntime InferenceSession) on the CPU on one image [3, H, W]
    float32 in [0, 1]; returns numpy boxes, labels, scores, masks."""
    import onnxruntime

    session = path_or_session
    if isinstance(path_or_session, (str, os.PathLike)):
        session = onnxruntime.InferenceSession(str(path_or_session), providers=["CPUExecutionProvider"])
    return tuple(session.run(list(OUTPUT_NAMES), {"image": np.ascontiguousarray(image, dtype=np.float32)}))


############################################################
#  Checking an export against the eager model
############################################################


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[D] IoU of the bool masks a [D, H, W] and b [D, H, W], pair by pair (1 where both are empty)."""
    inter = np.logical_and(a, b).reshape(len(a), -1).sum(1)
    union = np.logical_or(a, b).reshape(len(a), -1).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def compare_detections(expected: tuple, got: tuple, mask_threshold: float = 0.5) -> dict:
    """How far the detections `got` are from `expected`, both (boxes, labels, scores, masks) as
    DetectionProgram returns them (tensors or numpy). Returns a dict: count_expected, count_got, labels_equal,
    box_error (pixels), score_error, min_mask_iou (masks thresholded at mask_threshold), and same (all within
    BOX_TOLERANCE, SCORE_TOLERANCE and MIN_MASK_IOU)."""
    expected = [np.asarray(v.detach().cpu() if torch.is_tensor(v) else v) for v in expected]
    got = [np.asarray(v.detach().cpu() if torch.is_tensor(v) else v) for v in got]
    report = {"count_expected": len(expected[0]), "count_got": len(got[0])}
    if report["count_expected"] != report["count_got"]:
        return {**report, "labels_equal": False, "box_error": math.inf, "score_error": math.inf,
                "min_mask_iou": 0.0, "same": False}
    boxes, labels, scores, masks = expected
    # Detections of nearly equal scores may come in either order (float rounding differs between runtimes):
    # each expected detection is paired with the nearest box of its label, one to one, else kept in order.
    distance = np.abs(boxes[:, None] - got[0][None]).max(-1, initial=0.0)  # (D, D)
    distance[labels[:, None] != got[1][None]] = np.inf
    pairs = distance.argmin(1) if len(boxes) else np.zeros(0, dtype=np.int64)
    if len(set(pairs.tolist())) == len(pairs):
        got = [value[pairs] for value in got]
    report["labels_equal"] = bool(np.array_equal(labels, got[1]))
    report["box_error"] = float(np.abs(boxes - got[0]).max(initial=0.0))
    report["score_error"] = float(np.abs(scores - got[2]).max(initial=0.0))
    ious = mask_iou(masks[:, 0] > mask_threshold, got[3][:, 0] > mask_threshold)
    report["min_mask_iou"] = float(ious.min(initial=1.0))
    report["same"] = bool(report["labels_equal"] and report["box_error"] <= BOX_TOLERANCE
                          and report["score_error"] <= SCORE_TOLERANCE and report["min_mask_iou"] >= MIN_MASK_IOU)
    return report


def eager_detections(model: MaskRCNN, image: Tensor) -> tuple:
    """What the exported program should give: DetectionProgram(model) run eagerly, without gradients."""
    with torch.no_grad():
        return DetectionProgram(model)(image)


def check_export(model: MaskRCNN, path: str, format: str, images: list[Tensor]) -> list[dict]:
    """compare_detections of the exported file at `path` against the eager model, one report per image
    ([3, H, W] float tensors in [0, 1]). The .pt2 is loaded in this process; test_export.py loads it in a fresh
    one too."""
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        run = lambda image: run_onnx(session, image.cpu().numpy())  # noqa: E731
    else:
        program = load_program(path)
        run = lambda image: program(image)  # noqa: E731
    reports = []
    for image in images:
        with torch.no_grad():
            got = run(image)
        reports.append(compare_detections(eager_detections(model, image), got, model.config.MASK_THRESHOLD))
    return reports


def photos() -> dict:
    """scikit-image's photos the check runs on by default, as {name: [3, H, W] float32 tensor in [0, 1]}."""
    import skimage.data

    return {name: torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float() / 255
            for name in ("astronaut", "coffee", "chelsea")}


############################################################
#  Command line
############################################################


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Export a Mask R-CNN to ONNX or torch.export and check it.")
    parser.add_argument("--weights", required=True, help="checkpoint path (train.py's, or a detectron2 .pkl), or "
                        "published weights: coco, coco_v2, d2_r50_fpn_3x, d2_r101_fpn_3x")
    parser.add_argument("--format", required=True, choices=FORMATS, help="onnx (.onnx) or torch (.pt2)")
    parser.add_argument("--out", required=True, help="the file to write")
    parser.add_argument("--config", default="coco", help="preset for weights without a config (coco, shapes, custom, "
                        "d2_r50_fpn_3x, d2_r101_fpn_3x)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the check against the eager model on scikit-image's photos")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from config import named_config

    model = MaskRCNN.from_checkpoint(args.weights, args.set, "cpu", config=named_config(args.config)).eval()
    try:
        (export_onnx if args.format == "onnx" else export_program)(model, args.out)
    except ValueError as error:
        raise SystemExit(f"export.py: {error}") from error
    logger.info("wrote %s (%.1f MB)", args.out, os.path.getsize(args.out) / 2**20)
    if args.no_check:
        return
    named = photos()
    failed = []
    for name, report in zip(named, check_export(model, args.out, args.format, list(named.values()))):
        logger.info("%-10s %s", name, " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in report.items()))
        if not report["same"]:
            failed.append(name)
    if failed:
        raise SystemExit(f"export.py: the exported model's detections differ from the eager model's on "
                         f"{', '.join(failed)} (tolerances: boxes {BOX_TOLERANCE} px, scores {SCORE_TOLERANCE}, "
                         f"mask IoU {MIN_MASK_IOU})")
    logger.info("same detections as the eager model on %s", ", ".join(named))


if __name__ == "__main__":
    main()
