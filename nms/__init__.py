"""Non-maximum suppression with torchvision's semantics, on our own CPU and CUDA kernels.

Boxes are `[N, (x1, y1, x2, y2)]` in absolute coordinates, with no "+1" in widths and heights
(`w = x2 - x1`). Going through the boxes by decreasing score, a box is kept unless it overlaps an
already kept box with IoU strictly greater than `iou_threshold`. Equal scores keep the input order
(the sort is stable). The result is the indices of the kept boxes, sorted by decreasing score, exactly
as `torchvision.ops.nms` returns them.

The ops are registered as `torch.ops.maskrcnn.nms` and `torch.ops.maskrcnn.batched_nms`, with fake
(meta) implementations so that `torch.compile` can trace a model that calls them.
"""

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false

from extensions import load_or_build

load_or_build("nms")

__all__ = ["nms", "batched_nms"]


def _check_boxes_and_scores(boxes: torch.Tensor, scores: torch.Tensor, op: str) -> None:
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
        shape = list(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise ValueError(f"{op}: boxes must be a [N, 4] tensor (x1, y1, x2, y2); got {shape}")
    if not boxes.is_floating_point():
        raise ValueError(f"{op}: boxes must be floating point; got {boxes.dtype}")
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        shape = list(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"{op}: scores must be a [N] tensor with N = {boxes.shape[0]} (one per box); got {shape}")
    if scores.dtype != boxes.dtype:
        raise ValueError(f"{op}: scores must have the dtype of boxes ({boxes.dtype}); got {scores.dtype}")
    if scores.device != boxes.device:
        raise ValueError(f"{op}: scores must be on the device of boxes ({boxes.device}); got {scores.device}")


def _no_boxes(boxes) -> bool:
    # As torchvision's ops: no boxes at all (any empty tensor) keep nothing, whatever the other arguments.
    # While torch.export traces, the number of boxes may be unknown (guard_or_false: then not empty), and
    # the op itself is recorded; it keeps nothing of no boxes too.
    return isinstance(boxes, torch.Tensor) and guard_or_false(boxes.numel() == 0)


def _empty_keep(boxes: torch.Tensor) -> torch.Tensor:
    return torch.empty((0,), dtype=torch.int64, device=boxes.device)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression.

    Args:
        boxes: [N, 4] (x1, y1, x2, y2), float16/bfloat16 (CUDA), float32 or float64.
        scores: [N], same dtype and device as `boxes`.
        iou_threshold: a box is dropped when its IoU with a kept, higher-scoring box is > this.

    Returns:
        keep: [K] int64 indices into `boxes`, by decreasing score (ties in input order); empty, with no
        further checks, when `boxes` is an empty tensor (as torchvision's).
    """
    if _no_boxes(boxes):
        return _empty_keep(boxes)
    _check_boxes_and_scores(boxes, scores, "nms")
    return torch.ops.maskrcnn.nms(boxes, scores, float(iou_threshold))


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Non-maximum suppression within each group (class, pyramid level, image, ...) independently.

    Boxes with different `idxs` never suppress each other. All groups are handled in one call
    (no loop over classes, no coordinate-offset trick whose rounding could change an IoU).

    Args:
        boxes: [N, 4] (x1, y1, x2, y2).
        scores: [N], same dtype and device as `boxes`.
        idxs: [N] integer group of each box.
        iou_threshold: as in `nms`.

    Returns:
        keep: [K] int64 indices into `boxes`, by decreasing score over all groups (ties in input order);
        empty, with no further checks, when `boxes` is an empty tensor (as torchvision's).
    """
    if _no_boxes(boxes):
        return _empty_keep(boxes)
    _check_boxes_and_scores(boxes, scores, "batched_nms")
    if not isinstance(idxs, torch.Tensor) or idxs.dim() != 1 or idxs.shape[0] != boxes.shape[0]:
        shape = list(idxs.shape) if isinstance(idxs, torch.Tensor) else type(idxs).__name__
        raise ValueError(f"batched_nms: idxs must be a [N] tensor with N = {boxes.shape[0]}; got {shape}")
    if idxs.is_floating_point() or idxs.is_complex() or idxs.dtype == torch.bool:
        raise ValueError(f"batched_nms: idxs must be an integer tensor; got {idxs.dtype}")
    if idxs.device != boxes.device:
        raise ValueError(f"batched_nms: idxs must be on the device of boxes ({boxes.device}); got {idxs.device}")
    return torch.ops.maskrcnn.batched_nms(boxes, scores, idxs, float(iou_threshold))


def _fake_keep(boxes: torch.Tensor) -> torch.Tensor:
    # The number kept depends on the data: an unbacked size for the tracer.
    count = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((count,), dtype=torch.int64)


@torch.library.register_fake("maskrcnn::nms")
def _(boxes, scores, iou_threshold):
    torch._check(boxes.dim() == 2 and boxes.shape[1] == 4, lambda: "nms: boxes must be [N, 4]")
    torch._check(scores.shape == boxes.shape[:1], lambda: "nms: scores must be [N]")
    return _fake_keep(boxes)


@torch.library.register_fake("maskrcnn::batched_nms")
def _(boxes, scores, idxs, iou_threshold):
    torch._check(boxes.dim() == 2 and boxes.shape[1] == 4, lambda: "batched_nms: boxes must be [N, 4]")
    torch._check(scores.shape == boxes.shape[:1], lambda: "batched_nms: scores must be [N]")
    torch._check(idxs.shape == boxes.shape[:1], lambda: "batched_nms: idxs must be [N]")
    return _fake_keep(boxes)
