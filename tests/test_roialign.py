"""Tests of roialign.roi_align / RoIAlign (torch.ops.maskrcnn.roi_align and roi_align_backward).

The specification is torchvision.ops.roi_align. Expected values come from torchvision, from a plain
PyTorch float64 reference of the RoIAlign formula written here, or from hand computation; never from
the code under test (except where a test checks that two ways of calling it agree). Bicubic RoIAlign
(interpolation="bicubic"; torchvision has none) is checked against a float64 reference built on
torch.nn.functional.grid_sample(mode="bicubic", padding_mode="border", align_corners=True) at the same
sample points, and against hand-computed cubic-convolution weights.
"""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.testing import assert_close

import roialign

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")

SAMPLING_RATIOS = [-1, 0, 1, 2, 4]
SPATIAL_SCALES = [1.0, 0.5, 0.25, 1 / 32]
OUTPUT_SIZES = [(7, 7), (14, 14), (3, 5)]
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}
# CUDA gradients are summed with atomic adds (or, deterministic, in another order than on CPU).
GRAD_TOLERANCE_CUDA = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-10)}
# CUDA forward against the CPU op: sample coordinates of up to 50 px carry float32 rounding of about 4e-6 px,
# and nvcc contracts multiply-adds into FMAs where the CPU build may not, so a sample moves by that much;
# on randn maps (slopes of a few units per pixel) outputs then differ by about 1e-5 (1.2e-5 on an H200).
FORWARD_TOLERANCE_CUDA = {torch.float32: dict(atol=5e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


# ----------------------------------------------------------------------------------------------------
# Helpers


def random_rois(k, batch, height, width, spatial_scale, dtype=torch.float32):
    """[k, 5] RoIs (batch index, x1, y1, x2, y2) in image coordinates (the map is height x width at
    `spatial_scale`), with random non-integer corners. The first rows are one of each kind, in order:
    inside the map, partly outside, fully outside, zero width, zero height, a point, inverted
    (x2 < x1 and y2 < y1); the other rows get a random kind. Uses the global RNG."""
    size = torch.tensor([width, height], dtype=torch.float64) / spatial_scale  # image (w, h)
    low = torch.rand(k, 2, dtype=torch.float64) * size * 0.9
    extent = (0.05 + 0.6 * torch.rand(k, 2, dtype=torch.float64)) * size
    kind = torch.randint(0, 7, (k,))
    kind[: min(k, 7)] = torch.arange(min(k, 7))
    # Partly outside: corners from 40% of the image before it to its far side.
    partly = kind == 1
    low[partly] = (torch.rand(int(partly.sum()), 2, dtype=torch.float64) * 1.4 - 0.4) * size
    # Fully outside: starting beyond the bottom-right corner, or ending before the top-left one.
    outside = kind == 2
    margin = (0.05 + 0.5 * torch.rand(int(outside.sum()), 2, dtype=torch.float64)) * size
    beyond, before = size + margin, -margin - extent[outside]
    low[outside] = torch.where(torch.rand(int(outside.sum()), 1) < 0.5, beyond, before)
    high = low + extent
    high[kind == 3, 0] = low[kind == 3, 0]  # zero width
    high[kind == 4, 1] = low[kind == 4, 1]  # zero height
    high[kind == 5] = low[kind == 5]  # a point
    inverted = kind == 6
    low[inverted], high[inverted] = high[inverted], low[inverted].clone()
    index = torch.randint(0, batch, (k, 1)).to(torch.float64)
    return torch.cat([index, low, high], dim=1).to(dtype)


def bilinear(image, y, x):
    """torchvision's bilinear sample of image [C, H, W] at (y, x): 0 outside [-1, H] x [-1, W],
    negatives clamped to 0, the last row/column clamped."""
    _, height, width = image.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return image.new_zeros(image.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (
        hy * hx * image[:, y_low, x_low]
        + hy * lx * image[:, y_low, x_high]
        + ly * hx * image[:, y_high, x_low]
        + ly * lx * image[:, y_high, x_high]
    )


def reference_sample_points(roi, output_size, spatial_scale, sampling_ratio, aligned):
    """RoIAlign's sample coordinates for one roi (batch index, x1, y1, x2, y2), in float64 on the map:
    ys [PH][grid_h] and xs [PW][grid_w] (empty lists when the adaptive grid is < 1 sample), and the
    count that every bin's sum is divided by."""
    pooled_h, pooled_w = output_size
    offset = 0.5 if aligned else 0.0
    start_x, start_y = roi[1] * spatial_scale - offset, roi[2] * spatial_scale - offset
    width = roi[3] * spatial_scale - offset - start_x
    height = roi[4] * spatial_scale - offset - start_y
    if not aligned:  # the original RoIAlign: at least 1x1
        width, height = max(width, 1.0), max(height, 1.0)
    bin_h, bin_w = height / pooled_h, width / pooled_w
    grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(height / pooled_h)
    grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(width / pooled_w)
    count = max(grid_h * grid_w, 1)
    # range() is empty when the grid is <= 0.
    ys = [[start_y + ph * bin_h + (iy + 0.5) * bin_h / grid_h for iy in range(grid_h)] for ph in range(pooled_h)]
    xs = [[start_x + pw * bin_w + (ix + 0.5) * bin_w / grid_w for ix in range(grid_w)] for pw in range(pooled_w)]
    return ys, xs, count


def reference_roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """RoIAlign written out in float64 with Python loops (differentiable with respect to input)."""
    pooled_h, pooled_w = output_size
    channels = input.shape[1]
    input = input.double()
    outputs = []
    for roi in rois.double().tolist():
        image = input[int(roi[0])]
        ys, xs, count = reference_sample_points(roi, output_size, spatial_scale, sampling_ratio, aligned)
        bins = []
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                total = input.new_zeros(channels)
                for y in ys[ph]:
                    for x in xs[pw]:
                        total = total + bilinear(image, y, x)
                bins.append(total / count)
        outputs.append(torch.stack(bins, dim=1).reshape(channels, pooled_h, pooled_w))
    if not outputs:
        return input.new_zeros(0, channels, pooled_h, pooled_w)
    return torch.stack(outputs)


def reference_bicubic_roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """Bicubic RoIAlign in float64 on torch.nn.functional.grid_sample(mode="bicubic",
    padding_mode="border", align_corners=True), differentiable with respect to input.

    The sample points are reference_sample_points'. The bilinear path's out-of-map rule: a sample more
    than one pixel outside the map contributes 0; the others are clamped onto [0, H - 1] x [0, W - 1]
    before sampling, and grid_sample's "border" padding then clamps each of the 4x4 taps onto the map.
    With align_corners=True the normalised coordinates -1 and 1 are the centres of the first and last
    pixels, so pixel coordinate x is 2 x / (W - 1) - 1 (the map must be at least 2x2).
    """
    pooled_h, pooled_w = output_size
    _, channels, height, width = input.shape
    input = input.double()
    outputs = []
    for roi in rois.double().tolist():
        ys, xs, count = reference_sample_points(roi, output_size, spatial_scale, sampling_ratio, aligned)
        ys = torch.tensor(ys, dtype=torch.float64).reshape(pooled_h, -1)  # (PH, grid_h)
        xs = torch.tensor(xs, dtype=torch.float64).reshape(pooled_w, -1)  # (PW, grid_w)
        grid_h, grid_w = ys.shape[1], xs.shape[1]
        if grid_h * grid_w == 0:
            outputs.append(input.new_zeros(channels, pooled_h, pooled_w))
            continue
        inside = ((ys >= -1) & (ys <= height)).reshape(-1, 1) & ((xs >= -1) & (xs <= width)).reshape(1, -1)
        grid_y = ys.clamp(0, height - 1).reshape(-1, 1) * 2 / (height - 1) - 1
        grid_x = xs.clamp(0, width - 1).reshape(1, -1) * 2 / (width - 1) - 1
        grid = torch.stack(torch.broadcast_tensors(grid_x, grid_y), dim=-1)  # (PH * grid_h, PW * grid_w, 2): (x, y)
        image = input[int(roi[0])][None]
        values = F.grid_sample(image, grid[None], mode="bicubic", padding_mode="border", align_corners=True)[0]
        values = values * inside  # (C, PH * grid_h, PW * grid_w)
        bins = values.reshape(channels, pooled_h, grid_h, pooled_w, grid_w).sum(dim=(2, 4))
        outputs.append(bins / count)
    if not outputs:
        return input.new_zeros(0, channels, pooled_h, pooled_w)
    return torch.stack(outputs)


def forward_backward(fn, x, grad=None, seed=0):
    """fn(x) and d(sum(fn(x) * grad))/dx for a fresh leaf copy of x; grad is random when not given."""
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    if grad is None:
        generator = torch.Generator().manual_seed(seed)
        grad = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.dtype).to(out.device)
    out.backward(grad)
    return out.detach(), x.grad


class deterministic_algorithms:
    """Context manager: torch.use_deterministic_algorithms(mode), restored on exit."""

    def __init__(self, mode=True):
        self.mode = mode

    def __enter__(self):
        self.previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(self.mode)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.previous)


# ----------------------------------------------------------------------------------------------------
# Against torchvision


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spatial_scale", SPATIAL_SCALES)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", SAMPLING_RATIOS)
def test_matches_torchvision(sampling_ratio, aligned, spatial_scale, dtype):
    torch.manual_seed(1000 + 100 * sampling_ratio + 10 * aligned + int(1 / spatial_scale))
    x = torch.randn(2, 8, 40, 50, dtype=dtype)
    for k in (0, 1, 7, 100):
        rois = random_rois(k, 2, 40, 50, spatial_scale, dtype)
        for output_size in OUTPUT_SIZES:
            case = f"k={k}, output_size={output_size}"
            args = (output_size, spatial_scale, sampling_ratio, aligned)
            out, grad = forward_backward(lambda t, r=rois, a=args: roialign.roi_align(t, r, *a), x)
            expected, expected_grad = forward_backward(
                lambda t, r=rois, a=args: torchvision.ops.roi_align(t, r, *a), x
            )
            assert out.shape == (k, 8, *output_size) and out.dtype == dtype
            assert_close(out, expected, **TOLERANCE[dtype], msg=lambda m, c=case: f"forward, {c}: {m}")
            assert_close(grad, expected_grad, **TOLERANCE[dtype], msg=lambda m, c=case: f"backward, {c}: {m}")


def test_list_rois_equal_tensor_rois():
    torch.manual_seed(7)
    x = torch.randn(3, 4, 20, 24)
    per_image = [random_rois(k, 1, 20, 24, 0.5)[:, 1:] for k in (5, 0, 9)]  # image 1 has no RoI
    rois = torch.cat(
        [torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(per_image)]
    )
    assert torch.equal(roialign.boxes_to_rois(per_image), rois)
    for aligned in (False, True):
        from_list = roialign.roi_align(x, per_image, (5, 6), 0.5, 2, aligned)
        from_tensor = roialign.roi_align(x, rois, (5, 6), 0.5, 2, aligned)
        assert from_list.shape == (14, 4, 5, 6)
        assert torch.equal(from_list, from_tensor)
        assert_close(
            from_list, torchvision.ops.roi_align(x, per_image, (5, 6), 0.5, 2, aligned), **TOLERANCE[x.dtype]
        )


def test_module_matches_function():
    torch.manual_seed(9)
    x = torch.randn(2, 3, 16, 16)
    rois = random_rois(12, 2, 16, 16, 0.25)
    module = roialign.RoIAlign((4, 3), spatial_scale=0.25, sampling_ratio=2, aligned=True)
    assert torch.equal(module(x, rois), roialign.roi_align(x, rois, (4, 3), 0.25, 2, True))
    assert_close(
        module(x, rois), torchvision.ops.roi_align(x, rois, (4, 3), 0.25, 2, True), **TOLERANCE[x.dtype]
    )
    assert "output_size=(4, 3)" in repr(module) and "aligned=True" in repr(module)
    square = roialign.RoIAlign(5, 0.25)
    assert square.output_size == (5, 5)
    assert torch.equal(square(x, rois), roialign.roi_align(x, rois, (5, 5), 0.25, -1, False))


# ----------------------------------------------------------------------------------------------------
# Against the float64 reference


@pytest.mark.parametrize("spatial_scale", [1.0, 0.5])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 3])
def test_matches_reference(sampling_ratio, aligned, spatial_scale):
    torch.manual_seed(200 + 10 * sampling_ratio + 2 * aligned + int(spatial_scale * 2))
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    rois = random_rois(8, 2, 9, 11, spatial_scale, torch.float64)
    for output_size in ((3, 4), (2, 2)):
        args = (output_size, spatial_scale, sampling_ratio, aligned)
        expected, expected_grad = forward_backward(lambda t, a=args: reference_roi_align(t, rois, *a), x)
        out, grad = forward_backward(lambda t, a=args: roialign.roi_align(t, rois, *a), x)
        assert_close(out, expected, atol=1e-10, rtol=1e-10)
        assert_close(grad, expected_grad, atol=1e-10, rtol=1e-10)
        # float32 input and RoIs: the same up to float32 rounding.
        out32, grad32 = forward_backward(lambda t, a=args: roialign.roi_align(t, rois.float(), *a), x.float())
        assert out32.dtype == torch.float32
        assert_close(out32.double(), expected, atol=1e-4, rtol=1e-4)
        assert_close(grad32.double(), expected_grad, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# Hand-computed values
#
# On input[0, 0, y, x] = 5y + x (arange(25) as 5x5), bilinear interpolation of this affine function is
# exact, so a sample at (y, x) with 0 <= y, x <= 4 reads 5y + x, and a bin reads 5 * mean(y) + mean(x)
# over its samples.

ARANGE_5X5 = torch.arange(25, dtype=torch.float64).reshape(1, 1, 5, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hand_computed_detectron2_case(dtype):
    # Box [1, 1, 3, 3], 4x4 bins of 0.5, 2x2 samples per bin at +0.125 and +0.375 within the bin: the
    # sample mean of bin p along an axis is start + 0.5 p + 0.25.
    # aligned=False: start = 1    -> out[ph, pw] = 5 (1.25 + 0.5 ph) + (1.25 + 0.5 pw) = 7.5 + 2.5 ph + 0.5 pw
    # aligned=True:  start = 0.5  -> out[ph, pw] = 5 (0.75 + 0.5 ph) + (0.75 + 0.5 pw) = 4.5 + 2.5 ph + 0.5 pw
    # The first rows are detectron2's known values [7.5, 8, 8.5, 9] and [4.5, 5, 5.5, 6].
    x = ARANGE_5X5.to(dtype)
    rois = torch.tensor([[0, 1, 1, 3, 3]], dtype=dtype)
    not_aligned = [
        [7.5, 8.0, 8.5, 9.0],
        [10.0, 10.5, 11.0, 11.5],
        [12.5, 13.0, 13.5, 14.0],
        [15.0, 15.5, 16.0, 16.5],
    ]
    aligned = [[4.5, 5.0, 5.5, 6.0], [7.0, 7.5, 8.0, 8.5], [9.5, 10.0, 10.5, 11.0], [12.0, 12.5, 13.0, 13.5]]
    out = roialign.roi_align(x, rois, 4, spatial_scale=1.0, sampling_ratio=2, aligned=False)
    assert_close(out, torch.tensor([[not_aligned]], dtype=dtype), atol=1e-6, rtol=0)
    out = roialign.roi_align(x, rois, 4, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    assert_close(out, torch.tensor([[aligned]], dtype=dtype), atol=1e-6, rtol=0)
    # The same box in an image at twice the resolution (spatial_scale 0.5) pools the same values.
    out = roialign.roi_align(x, rois * torch.tensor([1, 2, 2, 2, 2], dtype=dtype), 4, 0.5, 2, False)
    assert_close(out, torch.tensor([[not_aligned]], dtype=dtype), atol=1e-6, rtol=0)
    # Every sample lies inside the map and a bin's weights sum to 1: d(sum out)/d input sums to 16.
    _, grad = forward_backward(
        lambda t: roialign.roi_align(t, rois, 4, 1.0, 2, False), x, torch.ones(1, 1, 4, 4)
    )
    assert grad.sum().item() == pytest.approx(16.0)


# (box, output size, sampling ratio, aligned, expected, derivation)
HAND_CASES = [
    # Last row/column: samples at 3.5 and 4.5 per axis; 4.5 <= H = 5 is kept but clamped to 4:
    # mean y = mean x = (3.5 + 4) / 2 = 3.75 -> 5 * 3.75 + 3.75 = 22.5.
    ([3, 3, 5, 5], 1, 2, False, [[22.5]]),
    # Left of the map: width 4, x samples at -2 (< -1: contributes 0, still counted) and 0;
    # y samples 0.25 and 0.75. (1.25 + 3.75 + 0 + 0) / 4 = 1.25.
    ([-3, 0, 1, 1], 1, 2, False, [[1.25]]),
    # x samples at -0.5 (in [-1, 0): clamped to 0) and 0.5; y at 0.25, 0.75:
    # (1.25 + 1.75 + 3.75 + 4.25) / 4 = 2.75.
    ([-1, 0, 1, 1], 1, 2, False, [[2.75]]),
    # Adaptive grid: bins of 2 -> ceil(4 / 2) = 2 samples per axis at 0.5, 1.5 (bin 0) and 2.5, 3.5
    # (bin 1): means 1 and 3 -> [[5 + 1, 5 + 3], [15 + 1, 15 + 3]].
    ([0, 0, 4, 4], 2, -1, False, [[6.0, 8.0], [16.0, 18.0]]),
    # A point, not aligned: the RoI is widened to 1x1 -> samples at 2.25, 2.75 -> 5 * 2.5 + 2.5 = 15.
    ([2, 2, 2, 2], 1, 2, False, [[15.0]]),
    # A point, aligned: zero-size bins, all 4 samples at (1.5, 1.5) -> 9.
    ([2, 2, 2, 2], 1, 2, True, [[9.0]]),
    # A point, aligned, adaptive: ceil(0) = 0 samples -> 0 (count 1).
    ([2, 2, 2, 2], 1, -1, True, [[0.0]]),
    # Inverted, aligned, adaptive: ceil(-2) < 1 sample -> 0.
    ([3, 3, 1, 1], 1, -1, True, [[0.0]]),
    # Inverted, not aligned: widened to 1x1 from (3, 3): samples 3.25, 3.75 -> 5 * 3.5 + 3.5 = 21.
    ([3, 3, 1, 1], 1, 2, False, [[21.0]]),
    # Entirely beyond the map (every sample > 5): 0.
    ([6.5, 6.5, 9, 9], 1, 2, True, [[0.0]]),
]


@pytest.mark.parametrize("box, output_size, sampling_ratio, aligned, expected", HAND_CASES)
def test_hand_computed_borders_and_degenerate(box, output_size, sampling_ratio, aligned, expected):
    rois = torch.tensor([[0.0, *box]], dtype=torch.float64)
    out = roialign.roi_align(ARANGE_5X5, rois, output_size, 1.0, sampling_ratio, aligned)
    assert_close(out, torch.tensor([[expected]], dtype=torch.float64), atol=1e-12, rtol=0)


def test_hand_computed_gradient_of_outside_samples():
    # Box [-3, 0, 1, 1] above: of its 4 samples (weight 1/4 each), the two at x = -2 are outside and
    # give no gradient; the two at (0.25, 0) and (0.75, 0) split 1/4 each between rows 0 and 1 of
    # column 0: row 0 gets 1/4 * (0.75 + 0.25) = 0.25, row 1 the same.
    rois = torch.tensor([[0.0, -3, 0, 1, 1]], dtype=torch.float64)
    _, grad = forward_backward(
        lambda t: roialign.roi_align(t, rois, 1, 1.0, 2, False),
        ARANGE_5X5,
        torch.ones(1, 1, 1, 1, dtype=torch.float64),
    )
    expected = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    expected[0, 0, 0, 0] = expected[0, 0, 1, 0] = 0.25
    assert_close(grad, expected, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------------
# gradcheck, determinism, layouts, low precision


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("sampling_ratio", [2, -1])
@pytest.mark.parametrize("aligned", [False, True])
def test_gradcheck(aligned, sampling_ratio, interpolation):
    torch.manual_seed(300 + aligned + sampling_ratio)
    x = torch.randn(2, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    # Random non-integer boxes on both images, some crossing the borders.
    rois = random_rois(6, 2, 6, 7, 0.5, torch.float64)
    rois[:, 0] = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    assert torch.autograd.gradcheck(
        lambda t: roialign.roi_align(t, rois, (2, 3), 0.5, sampling_ratio, aligned, interpolation), (x,),
        eps=1e-6, atol=1e-7,
    )


def _grad_for_determinism(x, rois):
    return forward_backward(lambda t: roialign.roi_align(t, rois, (7, 7), 0.25, -1, True), x, seed=1)[1]


def test_deterministic_backward_equals_normal():
    torch.manual_seed(400)
    x = torch.randn(2, 16, 30, 30)
    rois = random_rois(300, 2, 30, 30, 0.25)  # many overlapping RoIs add into the same pixels
    normal = _grad_for_determinism(x, rois)
    with deterministic_algorithms(True):
        first = _grad_for_determinism(x, rois)
        second = _grad_for_determinism(x, rois)
    assert not torch.are_deterministic_algorithms_enabled()
    # The CPU backward is always the deterministic one: bitwise equal.
    assert torch.equal(first, second)
    assert torch.equal(first, normal)
    # The op's flag, passed directly, changes nothing on CPU either.
    grad = torch.randn(300, 16, 7, 7)
    args = (rois, 0.25, 7, 7, 2, 16, 30, 30, -1, True)
    atomic = torch.ops.maskrcnn.roi_align_backward(grad, *args, False)
    assert torch.equal(torch.ops.maskrcnn.roi_align_backward(grad, *args, True), atomic)
    expected = forward_backward(lambda t: torchvision.ops.roi_align(t, rois, 7, 0.25, -1, True), x, grad)[1]
    assert_close(atomic, expected, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_cpu_result_independent_of_thread_count(interpolation):
    # Also under torch.use_deterministic_algorithms: the CPU backward is always the deterministic one.
    torch.manual_seed(401)
    x = torch.randn(2, 40, 20, 20)
    rois = random_rois(200, 2, 20, 20, 0.5)

    def fn(t):
        return roialign.roi_align(t, rois, 5, 0.5, 2, False, interpolation)

    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(forward_backward(fn, x, seed=2))
    finally:
        torch.set_num_threads(previous)
    with deterministic_algorithms(True):
        results.append(forward_backward(fn, x, seed=2))
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0])
        assert torch.equal(grad, results[0][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_last_and_non_contiguous_input(dtype):
    torch.manual_seed(402)
    x = torch.randn(2, 6, 18, 22, dtype=dtype)
    rois = random_rois(40, 2, 18, 22, 0.5, dtype)

    def fn(t):
        return roialign.roi_align(t, rois, (4, 5), 0.5, 2, True)

    expected, expected_grad = forward_backward(fn, x, seed=3)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert not channels_last.is_contiguous()
    out, grad = forward_backward(fn, channels_last, seed=3)
    assert_close(out, expected, **TOLERANCE[dtype])
    assert_close(grad, expected_grad, **TOLERANCE[dtype])
    # A strided view (every other channel of a wider map): the same values as its contiguous copy.
    wide = torch.randn(2, 12, 18, 22, dtype=dtype)
    view = wide[:, ::2]
    expected, expected_grad = forward_backward(fn, view.contiguous(), seed=4)
    out, grad = forward_backward(fn, view, seed=4)
    assert_close(out, expected, **TOLERANCE[dtype])
    assert_close(grad, expected_grad, **TOLERANCE[dtype])


LOW_PRECISION = {torch.float16: dict(atol=5e-3, rtol=5e-3), torch.bfloat16: dict(atol=4e-2, rtol=2e-2)}


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_low_precision(dtype, interpolation):
    torch.manual_seed(403)
    x = torch.randn(2, 4, 16, 20)
    rois = random_rois(30, 2, 16, 20, 0.5)
    grad = torch.randn(30, 4, 7, 7)

    def fn(boxes):
        return lambda t: roialign.roi_align(t, boxes, 7, 0.5, 2, False, interpolation)

    expected, expected_grad = forward_backward(fn(rois), x, grad)
    out, input_grad = forward_backward(fn(rois), x.to(dtype), grad.to(dtype))
    assert out.dtype == dtype and input_grad.dtype == dtype
    assert_close(out.float(), expected, **LOW_PRECISION[dtype])
    assert_close(input_grad.float(), expected_grad, **LOW_PRECISION[dtype])
    # RoIs in the low precision too: compared with float32 on the same (rounded) RoIs.
    rounded = rois.to(dtype)
    out = fn(rounded)(x.to(dtype))
    assert out.dtype == dtype
    assert_close(out.float(), fn(rounded.float())(x), **LOW_PRECISION[dtype])


# ----------------------------------------------------------------------------------------------------
# torch.compile and torch.library.opcheck


class _PoolTwice(torch.nn.Module):
    """A module using the RoIAlign module and the function, as feature-extraction tooling sees it."""

    def __init__(self):
        super().__init__()
        self.pool = roialign.RoIAlign((3, 3), 0.5, 2, True)

    def forward(self, features, rois):
        return self.pool(features, rois) + roialign.roi_align(features, rois, 3, 0.5, 2, True)


def test_fx_symbolic_trace_keeps_roi_align_a_leaf():
    # As torchvision's roi_align (fx-wrapped), ours is recorded as one call and not traced into: its
    # argument checks read tensor values, which a symbolic trace cannot.
    torch.manual_seed(504)
    module = _PoolTwice()
    traced = torch.fx.symbolic_trace(module)
    calls = [node.target for node in traced.graph.nodes if node.op == "call_function"]
    assert calls.count(roialign.roi_align) == 2
    x = torch.randn(2, 4, 10, 12)
    rois = random_rois(9, 2, 10, 12, 0.5)
    assert torch.equal(traced(x, rois), module(x, rois))
    from torchvision.models.feature_extraction import create_feature_extractor

    extractor = create_feature_extractor(module, return_nodes={"pool": "pooled"})
    assert torch.equal(extractor(x, rois)["pooled"], module.pool(x, rois))


def test_torch_compile_forward_matches_eager():
    torch.manual_seed(500)
    x = torch.randn(2, 4, 24, 24)
    rois = random_rois(20, 2, 24, 24, 0.25)

    def pool(features, boxes):
        return roialign.roi_align(features, boxes, (7, 7), 0.25, 2, True).relu()

    compiled = torch.compile(pool, fullgraph=True, dynamic=False)
    assert_close(compiled(x, rois), pool(x, rois), atol=1e-6, rtol=1e-6)
    assert_close(
        compiled(x, rois), torchvision.ops.roi_align(x, rois, 7, 0.25, 2, True).relu(), atol=1e-5, rtol=1e-5
    )


def test_torch_compile_backward_matches_eager():
    # Training through a compiled model: the backward graph calls roi_align_backward, whose fake
    # implementation must describe the real output (shape and strides) for inductor.
    torch.manual_seed(501)
    x = torch.randn(2, 4, 24, 24)
    rois = random_rois(20, 2, 24, 24, 0.25)

    def pool(features):
        return roialign.roi_align(features, rois, (7, 7), 0.25, 2, True)

    compiled = torch.compile(pool, fullgraph=True, dynamic=False)
    out, grad = forward_backward(compiled, x, seed=5)
    expected, expected_grad = forward_backward(pool, x, seed=5)
    assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert_close(grad, expected_grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("aligned", [False, True])
def test_opcheck_roi_align(aligned):
    # Schema, fake implementation and autograd registration of the forward op.
    torch.manual_seed(502)
    x = torch.randn(2, 3, 10, 12, dtype=torch.float64, requires_grad=True)
    rois = random_rois(5, 2, 10, 12, 0.5, torch.float64)
    torch.library.opcheck(torch.ops.maskrcnn.roi_align.default, (x, rois, 0.5, 3, 4, 2, aligned))
    x = x.detach().float().contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.maskrcnn.roi_align.default, (x, rois.float(), 0.5, 7, 7, -1, aligned))


@pytest.mark.parametrize("deterministic", [False, True])
def test_opcheck_roi_align_backward(deterministic):
    # The backward op on its own: its fake output must match the real one (including strides).
    torch.manual_seed(503)
    rois = random_rois(5, 2, 10, 12, 0.5, torch.float64)
    grad = torch.randn(5, 3, 3, 4, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.maskrcnn.roi_align_backward.default,
        (grad, rois, 0.5, 3, 4, 2, 3, 10, 12, 2, True, deterministic),
    )


# ----------------------------------------------------------------------------------------------------
# Bicubic interpolation (interpolation="bicubic"): against reference_bicubic_roi_align (grid_sample) and
# hand-computed values.
#
# Cubic convolution with a = -0.75 weighs the pixels at distance d from a sample by
#   (a + 2)|d|^3 - (a + 3)|d|^2 + 1 for |d| <= 1,  a|d|^3 - 5a|d|^2 + 8a|d| - 4a for 1 < |d| < 2:
# at t = 0 past a pixel: (0, 1, 0, 0); at t = 0.5: w(1.5) = 0.125 a = -0.09375 and
# w(0.5) = 1.25 / 8 - 2.25 / 4 + 1 = 0.59375, so (-0.09375, 0.59375, 0.59375, -0.09375);
# at t = 0.25: w(1.25) = a (1.953125 - 7.8125 + 10 - 4) = -0.10546875, w(0.25) = 0.87890625,
# w(0.75) = 0.26171875, w(1.75) = a (5.359375 - 15.3125 + 14 - 4) = -0.03515625.
# The weights always sum to 1 (a constant is reproduced); they are symmetric only at t = 0 and 0.5,
# so a linear ramp is reproduced exactly there, but not in between (that needs a = -0.5): at t = 0.25
# the ramp x reads -1 * w0 + 1 * w2 + 2 * w3 = 0.296875 past the pixel instead of 0.25.

RAMP_8X8 = (8 * torch.arange(8, dtype=torch.float64)[:, None] + torch.arange(8, dtype=torch.float64)).reshape(
    1, 1, 8, 8
)


def bicubic(t, *args, **kwargs):
    return roialign.roi_align(t, *args, **kwargs, interpolation="bicubic")


def point_roi(y, x):
    """A 1x1 RoI (aligned=False) whose one sample (output 1x1, sampling_ratio 1) is at (y, x)."""
    return torch.tensor([[0.0, x - 0.5, y - 0.5, x + 0.5, y + 0.5]], dtype=torch.float64)


@pytest.mark.parametrize("spatial_scale", [1.0, 0.5])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 3])
def test_bicubic_matches_reference(sampling_ratio, aligned, spatial_scale):
    torch.manual_seed(700 + 10 * sampling_ratio + 2 * aligned + int(spatial_scale * 2))
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    rois = random_rois(8, 2, 9, 11, spatial_scale, torch.float64)
    for output_size in ((3, 4), (2, 2)):
        args = (output_size, spatial_scale, sampling_ratio, aligned)
        expected, expected_grad = forward_backward(lambda t, a=args: reference_bicubic_roi_align(t, rois, *a), x)
        out, grad = forward_backward(lambda t, a=args: bicubic(t, rois, *a), x)
        assert_close(out, expected, atol=1e-10, rtol=1e-10)
        assert_close(grad, expected_grad, atol=1e-10, rtol=1e-10)
        out32, grad32 = forward_backward(lambda t, a=args: bicubic(t, rois.float(), *a), x.float())
        assert out32.dtype == torch.float32
        assert_close(out32.double(), expected, atol=1e-4, rtol=1e-4)
        assert_close(grad32.double(), expected_grad, atol=1e-4, rtol=1e-4)


def test_bicubic_differs_from_bilinear():
    # The reference comparison above would pass for a kernel that ignored the argument only if the two
    # interpolations agreed; on random data they do not.
    torch.manual_seed(701)
    x = torch.randn(2, 3, 12, 12)
    rois = random_rois(10, 2, 12, 12, 1.0)
    assert not torch.allclose(bicubic(x, rois, 3, 1.0, 2), roialign.roi_align(x, rois, 3, 1.0, 2), atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
def test_bicubic_constant_map_gives_the_constant(aligned, dtype):
    # The weights sum to 1 and taps beyond the map read the border: every sample on the map (or within
    # a pixel of it) reads the constant, up to the map's edges.
    x = torch.full((1, 2, 6, 7), 3.5, dtype=dtype)
    rois = torch.tensor([[0, 0.0, 0.0, 7.0, 6.0], [0, -0.4, -0.3, 7.4, 6.2], [0, 1.3, 0.2, 2.9, 5.7]], dtype=dtype)
    out = bicubic(x, rois, (3, 4), 1.0, -1, aligned)
    assert_close(out, torch.full_like(out, 3.5), **TOLERANCE[dtype])


@pytest.mark.parametrize("aligned", [False, True])
def test_bicubic_ramp_at_half_pixels_is_exact(aligned):
    # Map 8y + x. Box [2, 2, 4, 4] + 0.5 when aligned, 2x2 bins of 1 pixel, one sample per bin at its
    # centre: y, x in {2.5, 3.5}, where the weights are symmetric, so the ramp is exact:
    # [[8 * 2.5 + 2.5, 8 * 2.5 + 3.5], [8 * 3.5 + 2.5, 8 * 3.5 + 3.5]]. Taps 1..5 stay inside the map.
    shift = 0.5 if aligned else 0.0
    rois = torch.tensor([[0, 2 + shift, 2 + shift, 4 + shift, 4 + shift]], dtype=torch.float64)
    out = bicubic(RAMP_8X8, rois, 2, 1.0, 1, aligned)
    assert_close(out, torch.tensor([[[[22.5, 23.5], [30.5, 31.5]]]], dtype=torch.float64), atol=1e-12, rtol=0)


def test_bicubic_ramp_between_half_pixels_by_hand():
    # One sample at (3, 2.25): the row is exact (t = 0), the column reads 2 + 0.296875 (see above), so
    # 8 * 3 + 2.296875 = 26.296875, where bilinear reads 26.25.
    out = bicubic(RAMP_8X8, point_roi(3.0, 2.25), 1, 1.0, 1, False)
    assert out.item() == pytest.approx(26.296875, abs=1e-12)
    assert roialign.roi_align(RAMP_8X8, point_roi(3.0, 2.25), 1, 1.0, 1, False).item() == pytest.approx(26.25)


def test_bicubic_delta_by_hand_forward_and_gradient():
    # A single 1 at (2, 2) of a 6x6 map. A sample at (y, 2) reads the row weight of distance |y - 2|:
    # 0.59375 at 0.5 (from either side), -0.09375 at 1.5 (the negative lobe), 1 at 0, 0 at 2.
    delta = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    delta[0, 0, 2, 2] = 1.0
    for y, expected in [(2.5, 0.59375), (1.5, 0.59375), (3.5, -0.09375), (0.5, -0.09375), (2.0, 1.0), (4.0, 0.0)]:
        assert bicubic(delta, point_roi(y, 2.0), 1, 1.0, 1, False).item() == pytest.approx(expected, abs=1e-12), y
    # The gradient of one sample at (2.5, 2) is its 16 weights: column 2 (t = 0), rows 1..4 weighted
    # (-0.09375, 0.59375, 0.59375, -0.09375).
    _, grad = forward_backward(
        lambda t: bicubic(t, point_roi(2.5, 2.0), 1, 1.0, 1, False), delta, torch.ones(1, 1, 1, 1, dtype=torch.float64)
    )
    expected = torch.zeros_like(delta)
    expected[0, 0, 1:5, 2] = torch.tensor([-0.09375, 0.59375, 0.59375, -0.09375], dtype=torch.float64)
    assert_close(grad, expected, atol=1e-12, rtol=0)


def test_bicubic_taps_beyond_the_map_read_the_border_by_hand():
    # A 1 on the whole first row. A sample at (0.5, 3): rows -1, 0, 1, 2 with weights (-0.09375,
    # 0.59375, 0.59375, -0.09375); row -1 reads row 0 (border), so 0.59375 - 0.09375 = 0.5 (zero padding
    # would give 0.59375). At y = -0.5 (within a pixel of the map) the sample is clamped to y = 0 -> 1;
    # at y = -1.5 it is off the map -> 0.
    row = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    row[0, 0, 0] = 1.0
    for y, expected in [(0.5, 0.5), (-0.5, 1.0), (-1.5, 0.0)]:
        assert bicubic(row, point_roi(y, 3.0), 1, 1.0, 1, False).item() == pytest.approx(expected, abs=1e-12), y
    # Gradient of the sample at (0.5, 3): row 0 gets both its own weight and that of row -1.
    _, grad = forward_backward(
        lambda t: bicubic(t, point_roi(0.5, 3.0), 1, 1.0, 1, False), row, torch.ones(1, 1, 1, 1, dtype=torch.float64)
    )
    expected = torch.zeros_like(row)
    expected[0, 0, 0:3, 3] = torch.tensor([0.5, 0.59375, -0.09375], dtype=torch.float64)
    assert_close(grad, expected, atol=1e-12, rtol=0)






@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bicubic_channels_last_and_module(dtype):
    torch.manual_seed(704)
    x = torch.randn(2, 6, 18, 22, dtype=dtype)
    rois = random_rois(40, 2, 18, 22, 0.5, dtype)
    module = roialign.RoIAlign((4, 5), 0.5, 2, True, interpolation="bicubic")
    assert "interpolation='bicubic'" in repr(module)
    expected, expected_grad = forward_backward(lambda t: bicubic(t, rois, (4, 5), 0.5, 2, True), x, seed=3)
    out, grad = forward_backward(lambda t: module(t, rois), x.contiguous(memory_format=torch.channels_last), seed=3)
    assert_close(out, expected, **TOLERANCE[dtype])
    assert_close(grad, expected_grad, **TOLERANCE[dtype])




def test_bilinear_is_the_default_everywhere():
    # The name, the op's default argument and 0 all mean bilinear (calls written before the argument).
    torch.manual_seed(706)
    x = torch.randn(2, 3, 10, 12)
    rois = random_rois(9, 2, 10, 12, 0.5)
    default = roialign.roi_align(x, rois, 3, 0.5, 2, True)
    assert torch.equal(roialign.roi_align(x, rois, 3, 0.5, 2, True, "bilinear"), default)
    assert torch.equal(torch.ops.maskrcnn.roi_align(x, rois, 0.5, 3, 3, 2, True), default)
    assert torch.equal(torch.ops.maskrcnn.roi_align(x, rois, 0.5, 3, 3, 2, True, 0), default)
    assert torch.equal(torch.ops.maskrcnn.roi_align(x, rois, 0.5, 3, 3, 2, True, 1), bicubic(x, rois, 3, 0.5, 2, True))
    grad = torch.randn(9, 3, 3, 3)
    args = (grad, rois, 0.5, 3, 3, 2, 3, 10, 12, 2, True, False)
    assert torch.equal(torch.ops.maskrcnn.roi_align_backward(*args), torch.ops.maskrcnn.roi_align_backward(*args, 0))


def test_bicubic_torch_compile_forward_and_backward_match_eager():
    torch.manual_seed(707)
    x = torch.randn(2, 4, 24, 24)
    rois = random_rois(20, 2, 24, 24, 0.25)

    def pool(features):
        return bicubic(features, rois, (7, 7), 0.25, 2, True)

    compiled = torch.compile(pool, fullgraph=True, dynamic=False)
    out, grad = forward_backward(compiled, x, seed=5)
    expected, expected_grad = forward_backward(pool, x, seed=5)
    assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert_close(grad, expected_grad, atol=1e-6, rtol=1e-6)


def test_bicubic_opcheck():
    # Schema, fake implementations and autograd registration with the interpolation argument.
    torch.manual_seed(708)
    x = torch.randn(2, 3, 10, 12, dtype=torch.float64, requires_grad=True)
    rois = random_rois(5, 2, 10, 12, 0.5, torch.float64)
    torch.library.opcheck(torch.ops.maskrcnn.roi_align.default, (x, rois, 0.5, 3, 4, 2, True, 1))
    x = x.detach().float().contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.maskrcnn.roi_align.default, (x, rois.float(), 0.5, 7, 7, -1, False, 1))
    grad = torch.randn(5, 3, 3, 4, dtype=torch.float64)
    for deterministic in (False, True):
        torch.library.opcheck(
            torch.ops.maskrcnn.roi_align_backward.default,
            (grad, rois, 0.5, 3, 4, 2, 3, 10, 12, 2, True, deterministic, 1),
        )


def test_bad_interpolation_is_a_clear_error():
    with pytest.raises(ValueError, match=r"interpolation must be one of 'bilinear', 'bicubic'; got 'nearest'"):
        roialign.roi_align(_x(), _rois(), 2, interpolation="nearest")
    with pytest.raises(ValueError, match=r"^interpolation\b"):
        roialign.RoIAlign(2, interpolation="cubic")
    for code in (-1, 2):
        with pytest.raises(RuntimeError, match=r"\binterpolation\b"):
            torch.ops.maskrcnn.roi_align(_x(), _rois(), 1.0, 2, 2, -1, False, code)
        with pytest.raises(RuntimeError, match=r"\binterpolation\b"):
            torch.ops.maskrcnn.roi_align_backward(torch.randn(1, 3, 2, 2), _rois(), 1.0, 2, 2, 2, 3, 8, 8, -1, False,
                                                  False, code)


# ----------------------------------------------------------------------------------------------------
# Bad input


def _x():
    return torch.randn(2, 3, 8, 8)


def _rois(batch_index=0.0, dtype=torch.float32):
    return torch.tensor([[batch_index, 1.0, 1.0, 5.0, 6.0]], dtype=dtype)


BAD_INPUTS = [
    # (id, input, rois, output_size, spatial_scale, argument named in the message)
    ("input 3-D", lambda: torch.randn(3, 8, 8), _rois, 2, 1.0, "input"),
    ("input 5-D", lambda: torch.randn(1, 2, 3, 8, 8), _rois, 2, 1.0, "input"),
    ("input integer", lambda: torch.zeros(2, 3, 8, 8, dtype=torch.int64), _rois, 2, 1.0, "input"),
    ("input not a tensor", lambda: [[[[0.0]]]], _rois, 2, 1.0, "input"),
    ("rois [K, 4]", _x, lambda: torch.rand(3, 4), 2, 1.0, "rois"),
    ("rois [K, 6]", _x, lambda: torch.rand(3, 6), 2, 1.0, "rois"),
    ("rois 1-D", _x, lambda: torch.rand(5), 2, 1.0, "rois"),
    ("rois integer", _x, lambda: _rois().long(), 2, 1.0, "rois"),
    ("rois negative batch index", _x, lambda: _rois(-1.0), 2, 1.0, "rois"),
    ("rois batch index == N", _x, lambda: _rois(2.0), 2, 1.0, "rois"),
    ("rois batch index > N", _x, lambda: torch.cat([_rois(0.0), _rois(7.0)]), 2, 1.0, "rois"),
    ("rois list with a [K, 5]", _x, lambda: [torch.rand(2, 5), torch.rand(1, 4)], 2, 1.0, "rois"),
    ("rois list with a 1-D", _x, lambda: [torch.rand(2, 4), torch.rand(4)], 2, 1.0, "rois"),
    ("rois list with a non-tensor", _x, lambda: [torch.rand(2, 4), [[0.0, 0.0, 1.0, 1.0]]], 2, 1.0, "rois"),
    ("rois list with integers", _x, lambda: [torch.zeros(2, 4, dtype=torch.int64)], 2, 1.0, "rois"),
    ("rois empty list", _x, lambda: [], 2, 1.0, "rois"),
    ("output_size 0", _x, _rois, 0, 1.0, "output_size"),
    ("output_size negative", _x, _rois, -3, 1.0, "output_size"),
    ("output_size (0, 3)", _x, _rois, (0, 3), 1.0, "output_size"),
    ("output_size (3, -1)", _x, _rois, (3, -1), 1.0, "output_size"),
    ("output_size one value", _x, _rois, (3,), 1.0, "output_size"),
    ("output_size three values", _x, _rois, (3, 3, 3), 1.0, "output_size"),
    ("spatial_scale 0", _x, _rois, 2, 0.0, "spatial_scale"),
    ("spatial_scale negative", _x, _rois, 2, -0.25, "spatial_scale"),
    ("spatial_scale nan", _x, _rois, 2, float("nan"), "spatial_scale"),
]


@pytest.mark.parametrize(
    "make_input, make_rois, output_size, spatial_scale, name",
    [c[1:] for c in BAD_INPUTS],
    ids=[c[0] for c in BAD_INPUTS],
)
def test_bad_input_raises_value_error(make_input, make_rois, output_size, spatial_scale, name):
    with pytest.raises(ValueError, match=rf"(^|: ){name}\b"):
        roialign.roi_align(make_input(), make_rois(), output_size, spatial_scale)


def test_module_rejects_bad_output_size():
    with pytest.raises(ValueError, match=r"^output_size\b"):
        roialign.RoIAlign(0)
    with pytest.raises(ValueError, match=r"^output_size\b"):
        roialign.RoIAlign((2, 0))


def test_ops_check_their_inputs_in_cpp():
    # Called directly, without the Python checks: an error, never a crash or an out-of-bounds read.
    x, grad = _x(), torch.randn(1, 3, 2, 2)
    for index in (-1.0, 2.0, 1e9):
        with pytest.raises(RuntimeError, match=r"\brois\b"):
            torch.ops.maskrcnn.roi_align(x, _rois(index), 1.0, 2, 2, -1, False)
        with pytest.raises(RuntimeError, match=r"\brois\b"):
            torch.ops.maskrcnn.roi_align_backward(grad, _rois(index), 1.0, 2, 2, 2, 3, 8, 8, -1, False, False)
    with pytest.raises(RuntimeError, match=r"\brois\b"):
        torch.ops.maskrcnn.roi_align(x, torch.rand(1, 4), 1.0, 2, 2, -1, False)
    with pytest.raises(RuntimeError, match=r"\brois\b"):
        torch.ops.maskrcnn.roi_align(x, _rois().long(), 1.0, 2, 2, -1, False)
    with pytest.raises(RuntimeError, match=r"\binput\b"):
        torch.ops.maskrcnn.roi_align(torch.randn(3, 8, 8), _rois(), 1.0, 2, 2, -1, False)
    with pytest.raises(RuntimeError, match=r"\binput\b"):
        torch.ops.maskrcnn.roi_align(x.long(), _rois(), 1.0, 2, 2, -1, False)
    with pytest.raises(RuntimeError, match=r"\boutput_size\b"):
        torch.ops.maskrcnn.roi_align(x, _rois(), 1.0, 0, 2, -1, False)
    with pytest.raises(RuntimeError, match=r"\bspatial_scale\b"):
        torch.ops.maskrcnn.roi_align(x, _rois(), 0.0, 2, 2, -1, False)
    with pytest.raises(RuntimeError, match=r"\bgrad\b"):
        torch.ops.maskrcnn.roi_align_backward(grad, _rois(), 1.0, 3, 3, 2, 3, 8, 8, -1, False, False)


# ----------------------------------------------------------------------------------------------------
# CUDA


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
def test_cuda_matches_cpu_and_torchvision(sampling_ratio, aligned, dtype):
    torch.manual_seed(600 + sampling_ratio + 10 * aligned)
    x = torch.randn(2, 8, 40, 50, dtype=dtype)
    for spatial_scale in (1.0, 0.25):
        for k in (0, 1, 100):
            rois = random_rois(k, 2, 40, 50, spatial_scale, dtype)
            rois_gpu = rois.cuda()
            for output_size in ((7, 7), (3, 5)):
                case = f"k={k}, output_size={output_size}, spatial_scale={spatial_scale}"
                args = (output_size, spatial_scale, sampling_ratio, aligned)
                cpu, cpu_grad = forward_backward(lambda t, r=rois, a=args: roialign.roi_align(t, r, *a), x)
                gpu, gpu_grad = forward_backward(
                    lambda t, r=rois_gpu, a=args: roialign.roi_align(t, r, *a), x.cuda()
                )
                tv, tv_grad = forward_backward(
                    lambda t, r=rois_gpu, a=args: torchvision.ops.roi_align(t, r, *a), x.cuda()
                )
                assert gpu.device.type == "cuda" and gpu.dtype == dtype
                tol, grad_tol = TOLERANCE[dtype], GRAD_TOLERANCE_CUDA[dtype]
                assert_close(
                    gpu.cpu(), cpu, **FORWARD_TOLERANCE_CUDA[dtype], msg=lambda m, c=case: f"forward vs CPU, {c}: {m}"
                )
                assert_close(gpu, tv, **tol, msg=lambda m, c=case: f"forward vs torchvision, {c}: {m}")
                assert_close(
                    gpu_grad.cpu(), cpu_grad, **grad_tol, msg=lambda m, c=case: f"grad vs CPU, {c}: {m}"
                )
                assert_close(
                    gpu_grad, tv_grad, **grad_tol, msg=lambda m, c=case: f"grad vs torchvision, {c}: {m}"
                )


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision(dtype):
    torch.manual_seed(601)
    x = torch.randn(2, 8, 32, 32, device="cuda")
    rois = random_rois(60, 2, 32, 32, 0.25).cuda()
    grad = torch.randn(60, 8, 7, 7, device="cuda")

    def fn(t):
        return roialign.roi_align(t, rois, 7, 0.25, 2, True)

    expected, expected_grad = forward_backward(fn, x, grad)
    out, input_grad = forward_backward(fn, x.to(dtype), grad.to(dtype))
    assert out.dtype == dtype and input_grad.dtype == dtype
    assert_close(out.float(), expected, **LOW_PRECISION[dtype])
    assert_close(input_grad.float(), expected_grad, **LOW_PRECISION[dtype])
    # Channels-last low-precision input takes the other kernel layout: same values.
    out_cl, grad_cl = forward_backward(
        fn, x.to(dtype).contiguous(memory_format=torch.channels_last), grad.to(dtype)
    )
    assert_close(out_cl.float(), expected, **LOW_PRECISION[dtype])
    assert_close(grad_cl.float(), expected_grad, **LOW_PRECISION[dtype])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_channels_last(dtype):
    torch.manual_seed(602)
    x = torch.randn(2, 32, 24, 28, dtype=dtype, device="cuda")
    rois = random_rois(50, 2, 24, 28, 0.5, dtype).cuda()

    def fn(t):
        return roialign.roi_align(t, rois, (5, 4), 0.5, -1, False)

    expected, expected_grad = forward_backward(fn, x, seed=6)
    out, grad = forward_backward(fn, x.contiguous(memory_format=torch.channels_last), seed=6)
    assert_close(out, expected, **TOLERANCE[dtype])
    assert_close(grad, expected_grad, **GRAD_TOLERANCE_CUDA[dtype])
    assert_close(
        out.cpu(), roialign.roi_align(x.cpu(), rois.cpu(), (5, 4), 0.5, -1, False), **FORWARD_TOLERANCE_CUDA[dtype]
    )


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_deterministic_backward(dtype):
    torch.manual_seed(603)
    x = torch.randn(2, 16, 30, 30, dtype=dtype, device="cuda")
    rois = random_rois(400, 2, 30, 30, 0.25, dtype).cuda()  # many RoIs over the same pixels

    def grad_of(t):
        return _grad_for_determinism(t, rois)

    atomic = grad_of(x)
    with deterministic_algorithms(True):
        first = grad_of(x)
        second = grad_of(x)
        first_cl = grad_of(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(first, second)
    assert torch.equal(first, first_cl)
    assert_close(first, atomic, **GRAD_TOLERANCE_CUDA[dtype])
    assert_close(first.cpu(), _grad_for_determinism(x.cpu(), rois.cpu()), **GRAD_TOLERANCE_CUDA[dtype])
    # The op's flag directly, on an odd shape, against the CPU op.
    grad = torch.randn(400, 16, 3, 5, dtype=dtype, device="cuda")
    args = (0.25, 3, 5, 2, 16, 30, 30, 0, False)
    det = torch.ops.maskrcnn.roi_align_backward(grad, rois, *args, True)
    assert torch.equal(det, torch.ops.maskrcnn.roi_align_backward(grad, rois, *args, True))
    cpu = torch.ops.maskrcnn.roi_align_backward(grad.cpu(), rois.cpu(), *args, True)
    assert_close(det.cpu(), cpu, **GRAD_TOLERANCE_CUDA[dtype])
    assert_close(
        torch.ops.maskrcnn.roi_align_backward(grad, rois, *args, False).cpu(),
        cpu,
        **GRAD_TOLERANCE_CUDA[dtype],
    )


@requires_cuda
def test_cuda_rois_on_another_device_raise_value_error():
    with pytest.raises(ValueError, match=r"(^|: )rois\b"):
        roialign.roi_align(_x().cuda(), _rois(), 2)
    with pytest.raises(ValueError, match=r"(^|: )rois\b"):
        roialign.roi_align(_x(), _rois().cuda(), 2)
    with pytest.raises(ValueError, match=r"(^|: )rois\b"):
        roialign.roi_align(_x().cuda(), _rois(5.0).cuda(), 2)


@requires_cuda
def test_cuda_op_with_out_of_range_batch_index_gives_zeros():
    # Without the Python check (as under torch.compile), the CUDA kernels never read outside the
    # input: such RoIs pool zeros and get no gradient; the others are unaffected.
    x = torch.randn(2, 3, 8, 8, device="cuda")
    rois = torch.cat([_rois(0.0), _rois(5.0), _rois(-1.0), _rois(1.0)]).cuda()
    out = torch.ops.maskrcnn.roi_align(x, rois, 1.0, 2, 2, -1, False)
    assert torch.equal(out[1:3], torch.zeros_like(out[1:3]))
    valid = rois[[0, 3]]
    assert_close(out[[0, 3]], roialign.roi_align(x, valid, 2), **TOLERANCE[torch.float32])
    for deterministic in (False, True):
        grad = torch.ops.maskrcnn.roi_align_backward(
            torch.ones_like(out), rois, 1.0, 2, 2, 2, 3, 8, 8, -1, False, deterministic
        )
        expected = torch.ops.maskrcnn.roi_align_backward(
            torch.ones(2, 3, 2, 2, device="cuda"), valid, 1.0, 2, 2, 2, 3, 8, 8, -1, False, deterministic
        )
        assert_close(grad, expected, **TOLERANCE[torch.float32])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_cuda_bicubic_matches_cpu(sampling_ratio, aligned, dtype):
    torch.manual_seed(800 + sampling_ratio + 10 * aligned)
    x = torch.randn(2, 8, 40, 50, dtype=dtype)
    for spatial_scale in (1.0, 0.25):
        rois = random_rois(100, 2, 40, 50, spatial_scale, dtype)
        rois_gpu = rois.cuda()
        args = ((7, 7), spatial_scale, sampling_ratio, aligned)
        cpu, cpu_grad = forward_backward(lambda t, r=rois, a=args: bicubic(t, r, *a), x)
        for layout in (torch.contiguous_format, torch.channels_last):
            for deterministic in (False, True):
                case = f"spatial_scale={spatial_scale}, {layout}, deterministic={deterministic}"
                with deterministic_algorithms(deterministic):
                    gpu, gpu_grad = forward_backward(
                        lambda t, r=rois_gpu, a=args: bicubic(t, r, *a), x.cuda().contiguous(memory_format=layout)
                    )
                assert gpu.device.type == "cuda" and gpu.dtype == dtype
                assert_close(
                    gpu.cpu(), cpu, **FORWARD_TOLERANCE_CUDA[dtype], msg=lambda m, c=case: f"forward, {c}: {m}"
                )
                assert_close(
                    gpu_grad.cpu(), cpu_grad, **GRAD_TOLERANCE_CUDA[dtype], msg=lambda m, c=case: f"grad, {c}: {m}"
                )


@requires_cuda
def test_cuda_bicubic_deterministic_backward_is_bitwise_reproducible():
    torch.manual_seed(801)
    x = torch.randn(2, 16, 30, 30, device="cuda")
    rois = random_rois(400, 2, 30, 30, 0.25).cuda()
    grad = torch.randn(400, 16, 3, 5, device="cuda")
    args = (0.25, 3, 5, 2, 16, 30, 30, 0, False)
    first = torch.ops.maskrcnn.roi_align_backward(grad, rois, *args, True, 1)
    assert torch.equal(first, torch.ops.maskrcnn.roi_align_backward(grad, rois, *args, True, 1))
    cpu = torch.ops.maskrcnn.roi_align_backward(grad.cpu(), rois.cpu(), *args, True, 1)
    assert_close(first.cpu(), cpu, **GRAD_TOLERANCE_CUDA[torch.float32])
    assert_close(torch.ops.maskrcnn.roi_align_backward(grad, rois, *args, False, 1).cpu(), cpu,
                 **GRAD_TOLERANCE_CUDA[torch.float32])
    assert_close(first.cpu(), forward_backward(lambda t: bicubic(t, rois.cpu(), (3, 5), 0.25, 0, False), x.cpu(),
                                               grad.cpu())[1], **GRAD_TOLERANCE_CUDA[torch.float32])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_bicubic_low_precision(dtype):
    torch.manual_seed(802)
    x = torch.randn(2, 8, 32, 32, device="cuda")
    rois = random_rois(60, 2, 32, 32, 0.25).cuda()
    grad = torch.randn(60, 8, 7, 7, device="cuda")

    def fn(t):
        return bicubic(t, rois, 7, 0.25, 2, True)

    expected, expected_grad = forward_backward(fn, x, grad)
    for layout in (torch.contiguous_format, torch.channels_last):
        out, input_grad = forward_backward(fn, x.to(dtype).contiguous(memory_format=layout), grad.to(dtype))
        assert out.dtype == dtype and input_grad.dtype == dtype
        assert_close(out.float(), expected, **LOW_PRECISION[dtype])
        assert_close(input_grad.float(), expected_grad, **LOW_PRECISION[dtype])
