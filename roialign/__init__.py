"""RoIAlign (He et al., 2017) with torchvision's semantics, on our own CPU and CUDA kernels.

Each RoI is split into `output_size` bins; each bin averages `sampling_ratio x sampling_ratio`
samples of the feature map (`ceil(roi size / output size)` per axis when `sampling_ratio <= 0`).
Boxes are in image coordinates and are multiplied by `spatial_scale` to reach the feature map.
`aligned=False` is the original RoIAlign (torchvision's default, used by its Mask R-CNN): RoIs are at
least 1x1 and pixel centres sit at integer coordinates. `aligned=True` shifts the box by -0.5 so that
pixel centres sit at integer + 0.5 (detectron2's ROIAlignV2).

A sample reads the map with bilinear interpolation (4 pixels; torchvision's, the default) or bicubic
(`interpolation="bicubic"`: 16 pixels, cubic convolution with a = -0.75, the kernel of PyTorch's
`interpolate` and `grid_sample`). Both share torchvision's out-of-map rule: a sample more than one
pixel outside the map contributes 0, and one within that pixel is clamped onto the border. Bicubic taps
that fall beyond the map read the border pixel (as `grid_sample(..., padding_mode="border")`), so a
constant map pools that constant everywhere.

The ops are `torch.ops.maskrcnn.roi_align` and `torch.ops.maskrcnn.roi_align_backward`, with autograd
and fake (meta) implementations registered here. When `torch.use_deterministic_algorithms(True)` is
on, the CUDA backward uses a sort-based kernel with no atomic adds, so gradients are bitwise
reproducible; the CPU backward is always deterministic.
"""

import math
from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor, nn

from extensions import load_or_build

load_or_build("roialign")

__all__ = ["roi_align", "RoIAlign", "boxes_to_rois", "INTERPOLATIONS", "interpolation_code"]

# The op's `interpolation` argument for each name (enum Interpolation in csrc/roi_align.h).
INTERPOLATIONS = {"bilinear": 0, "bicubic": 1}

RoIs = Union[Tensor, Sequence[Tensor]]


def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """Per-image boxes [[Ki, 4] (x1, y1, x2, y2)] -> rois [sum Ki, 5] (batch index, x1, y1, x2, y2)."""
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
            shape = list(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"rois[{i}] must be a [K, 4] tensor (x1, y1, x2, y2); got {shape}")
    if len(boxes) == 0:
        raise ValueError("rois must be a [K, 5] tensor or a non-empty list of [Ki, 4] tensors; got an empty list")
    index = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)])
    return torch.cat([index, torch.cat(list(boxes))], dim=1)


def _pair(output_size: Union[int, tuple[int, int]]) -> tuple[int, int]:
    size = (output_size, output_size) if isinstance(output_size, int) else output_size
    if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise ValueError(f"output_size must be a positive int or a pair (height, width) of them; got {output_size!r}")
    return size


def interpolation_code(interpolation: str, name: str = "interpolation") -> int:
    """The op's integer for "bilinear" or "bicubic"; `name` is the setting named in the error."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, INTERPOLATIONS))}; got {interpolation!r}")
    return INTERPOLATIONS[interpolation]


def _check(input: Tensor, rois: Tensor, spatial_scale: float) -> None:
    if not isinstance(input, Tensor) or input.dim() != 4:
        shape = list(input.shape) if isinstance(input, Tensor) else type(input).__name__
        raise ValueError(f"roi_align: input must be a [N, C, H, W] tensor; got {shape}")
    if not input.is_floating_point():
        raise ValueError(f"roi_align: input must be floating point; got {input.dtype}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"roi_align: rois must be [K, 5] (batch index, x1, y1, x2, y2); got {list(rois.shape)}")
    if not rois.is_floating_point():
        raise ValueError(f"roi_align: rois must be floating point; got {rois.dtype}")
    if rois.device != input.device:
        raise ValueError(f"roi_align: rois must be on the device of input ({input.device}); got {rois.device}")
    if not (isinstance(spatial_scale, (int, float)) and 0 < spatial_scale < math.inf):
        raise ValueError(f"roi_align: spatial_scale must be a positive finite number; got {spatial_scale}")
    if rois.shape[0] > 0 and not torch.compiler.is_compiling():
        # One host synchronisation on CUDA; the model calls the op directly on rois it built itself.
        # (Under torch.compile the kernels still never read outside the input: the CPU kernel raises,
        # the CUDA kernel gives zeros for such RoIs.)
        low, high = torch.aminmax(rois[:, 0])
        if not (low >= 0 and high < input.shape[0]):  # written so that NaN fails too
            raise ValueError(
                f"roi_align: rois[:, 0] (batch index) must be in [0, {input.shape[0]}) for an input of "
                f"{input.shape[0]} images; got values from {low.item():g} to {high.item():g}"
            )


# A leaf for torch.fx: symbolic tracing (feature extraction, quantization tooling) records the call
# instead of tracing into the argument checks, which read tensor values.
@torch.fx.wrap
def roi_align(
    input: Tensor,
    rois: RoIs,
    output_size: Union[int, tuple[int, int]],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    interpolation: str = "bilinear",
) -> Tensor:
    """Pools a fixed-size feature for every RoI.

    Args:
        input: [N, C, H, W] feature map; float32/float64 on CPU and CUDA, float16/bfloat16 too (CPU
            computes those in float32). Channels-last input is used as is on CUDA.
        rois: [K, 5] (batch index, x1, y1, x2, y2) in image coordinates, or a list of N tensors
            [Ki, 4] (x1, y1, x2, y2), one per image.
        output_size: (PH, PW) or an int for both.
        spatial_scale: feature-map size / image size (e.g. 1/4 for FPN level P2).
        sampling_ratio: samples per bin along each axis; <= 0 for ceil(roi size / output size).
        aligned: shift boxes by -0.5 pixel (see the module docstring).
        interpolation: "bilinear" (4 pixels per sample) or "bicubic" (16; see the module docstring).

    Returns:
        [K, C, PH, PW] tensor of the input's dtype.
    """
    if not isinstance(rois, Tensor):
        rois = boxes_to_rois(rois)
    pooled_h, pooled_w = _pair(output_size)
    code = interpolation_code(interpolation, "roi_align: interpolation")
    _check(input, rois, spatial_scale)
    return torch.ops.maskrcnn.roi_align(
        input, rois, float(spatial_scale), pooled_h, pooled_w, int(sampling_ratio), bool(aligned), code
    )


class RoIAlign(nn.Module):
    """`roi_align` as a module; see `roi_align` for the arguments."""

    def __init__(
        self,
        output_size: Union[int, tuple[int, int]],
        spatial_scale: float = 1.0,
        sampling_ratio: int = -1,
        aligned: bool = False,
        interpolation: str = "bilinear",
    ):
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        interpolation_code(interpolation)
        self.interpolation = interpolation

    def forward(self, input: Tensor, rois: Union[Tensor, list[Tensor]]) -> Tensor:
        return roi_align(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned, self.interpolation
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, interpolation={self.interpolation!r}"
        )


# Autograd: the gradient flows to the feature map only (none to the boxes, as in torchvision).
def _setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned, interpolation = inputs
    ctx.save_for_backward(rois)
    ctx.arguments = (spatial_scale, pooled_h, pooled_w, *input.shape, sampling_ratio, aligned)
    ctx.interpolation = interpolation
    # The backward op returns NCHW; a channels-last input gets a channels-last gradient back.
    channels_last = input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()
    ctx.memory_format = torch.channels_last if channels_last else torch.contiguous_format


def _backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    deterministic = torch.are_deterministic_algorithms_enabled()
    grad_input = torch.ops.maskrcnn.roi_align_backward(grad, rois, *ctx.arguments, deterministic, ctx.interpolation)
    return grad_input.contiguous(memory_format=ctx.memory_format), None, None, None, None, None, None, None


torch.library.register_autograd("maskrcnn::roi_align", _backward, setup_context=_setup_context)


@torch.library.register_fake("maskrcnn::roi_align")
def _(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, interpolation=0):
    torch._check(input.dim() == 4, lambda: "roi_align: input must be [N, C, H, W]")
    torch._check(rois.dim() == 2 and rois.shape[1] == 5, lambda: "roi_align: rois must be [K, 5]")
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


@torch.library.register_fake("maskrcnn::roi_align_backward")
def _(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width,
      sampling_ratio, aligned, deterministic, interpolation=0):
    return grad.new_empty((batch_size, channels, height, width))
