// RoIAlign geometry shared by the CPU and CUDA kernels, so that both sample exactly the same points
// with exactly torchvision's arithmetic (same operations in the same order).
#pragma once

// Only the headers used (not ATen/ATen.h, every op's declaration): they set the build time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <type_traits>

#ifdef __CUDACC__
#define MASKRCNN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MASKRCNN_HOST_DEVICE inline
#endif

namespace maskrcnn {

// One RoI mapped onto the feature map: where its bins start, their size, and the sample grid per bin.
template <typename A>
struct RoiGeometry {
  int64_t batch;  // image index, from the first column of rois
  A start_y, start_x, bin_h, bin_w;
  int grid_h, grid_w;  // samples per bin along y and x
  A count;             // samples averaged per bin
};

// roi: (batch index, x1, y1, x2, y2) in image coordinates.
template <typename A>
MASKRCNN_HOST_DEVICE RoiGeometry<A> roi_geometry(const A* roi, A spatial_scale, int pooled_h, int pooled_w,
                                                 int sampling_ratio, bool aligned) {
  RoiGeometry<A> g;
  g.batch = static_cast<int64_t>(roi[0]);
  // aligned=True shifts by half a pixel so that a pixel's centre is at integer + 0.5 (RoIAlignV2).
  const A offset = aligned ? A(0.5) : A(0);
  g.start_x = roi[1] * spatial_scale - offset;
  g.start_y = roi[2] * spatial_scale - offset;
  A width = roi[3] * spatial_scale - offset - g.start_x;
  A height = roi[4] * spatial_scale - offset - g.start_y;
  if (!aligned) {  // the original RoIAlign forces RoIs to be at least 1x1
    width = width > A(1) ? width : A(1);
    height = height > A(1) ? height : A(1);
  }
  g.bin_h = height / static_cast<A>(pooled_h);
  g.bin_w = width / static_cast<A>(pooled_w);
  // sampling_ratio <= 0: adaptive, ceil(roi size / output size) samples per bin.
  const A adaptive_h = ceil(height / static_cast<A>(pooled_h));
  const A adaptive_w = ceil(width / static_cast<A>(pooled_w));
  g.grid_h = sampling_ratio > 0 ? sampling_ratio : (adaptive_h > A(0) ? static_cast<int>(adaptive_h) : 0);
  g.grid_w = sampling_ratio > 0 ? sampling_ratio : (adaptive_w > A(0) ? static_cast<int>(adaptive_w) : 0);
  const int samples = g.grid_h * g.grid_w;
  g.count = static_cast<A>(samples > 1 ? samples : 1);
  return g;
}

// Sample (iy, ix) of bin (ph, pw).
template <typename A>
MASKRCNN_HOST_DEVICE A sample_y(const RoiGeometry<A>& g, int ph, int iy) {
  return g.start_y + static_cast<A>(ph) * g.bin_h + static_cast<A>(iy + .5f) * g.bin_h / static_cast<A>(g.grid_h);
}
template <typename A>
MASKRCNN_HOST_DEVICE A sample_x(const RoiGeometry<A>& g, int pw, int ix) {
  return g.start_x + static_cast<A>(pw) * g.bin_w + static_cast<A>(ix + .5f) * g.bin_w / static_cast<A>(g.grid_w);
}

// How a sample point reads the map: the op's `interpolation` argument (roialign.INTERPOLATIONS in Python).
enum Interpolation : int64_t { kBilinear = 0, kBicubic = 1 };

// The pixels a sample reads (offsets y * width + x in one plane) and their weights: 4 for bilinear, 16
// (4 rows of 4) for bicubic.
template <typename A, int kTaps>
struct Taps {
  int64_t offset[kTaps];
  A weight[kTaps];
};
template <typename A>
using BilinearTaps = Taps<A, 4>;
template <typename A>
using BicubicTaps = Taps<A, 16>;

// The out-of-map rule of both interpolations (torchvision's): false when the sample lies more than one
// pixel outside the map (or is not finite), and it contributes 0; otherwise the sample is clamped into
// [0, height - 1] x [0, width - 1], so that between -1 and 0 (or the last pixel and one beyond) it reads
// the border.
template <typename A>
MASKRCNN_HOST_DEVICE bool inside_map(A y, A x, int64_t height, int64_t width) {
  return y >= A(-1) && y <= static_cast<A>(height) && x >= A(-1) && x <= static_cast<A>(width);
}

template <typename A>
MASKRCNN_HOST_DEVICE bool bilinear_taps(A y, A x, int64_t height, int64_t width, BilinearTaps<A>* taps) {
  if (!inside_map(y, x, height, width)) {
    return false;
  }
  y = y <= A(0) ? A(0) : y;
  x = x <= A(0) ? A(0) : x;
  int64_t y_low = static_cast<int64_t>(y), x_low = static_cast<int64_t>(x), y_high, x_high;
  if (y_low >= height - 1) {
    y_high = y_low = height - 1;
    y = static_cast<A>(y_low);
  } else {
    y_high = y_low + 1;
  }
  if (x_low >= width - 1) {
    x_high = x_low = width - 1;
    x = static_cast<A>(x_low);
  } else {
    x_high = x_low + 1;
  }
  const A ly = y - static_cast<A>(y_low), lx = x - static_cast<A>(x_low);
  const A hy = A(1) - ly, hx = A(1) - lx;
  taps->offset[0] = y_low * width + x_low;
  taps->offset[1] = y_low * width + x_high;
  taps->offset[2] = y_high * width + x_low;
  taps->offset[3] = y_high * width + x_high;
  taps->weight[0] = hy * hx;
  taps->weight[1] = hy * lx;
  taps->weight[2] = ly * hx;
  taps->weight[3] = ly * lx;
  return true;
}

// Cubic convolution (Keys, 1981) with a = -0.75, the kernel of PyTorch's interpolate and grid_sample
// (bicubic): the weights of the 4 pixels at i - 1, i, i + 1, i + 2 for a point at i + t, 0 <= t < 1.
//   |d| <= 1:     (a + 2)|d|^3 - (a + 3)|d|^2 + 1
//   1 < |d| < 2:  a|d|^3 - 5a|d|^2 + 8a|d| - 4a
template <typename A>
MASKRCNN_HOST_DEVICE void cubic_weights(A t, A* weight) {
  const A a = A(-0.75);
  const A far_before = t + A(1), near_after = A(1) - t, far_after = A(2) - t;
  weight[0] = ((a * far_before - A(5) * a) * far_before + A(8) * a) * far_before - A(4) * a;
  weight[1] = ((a + A(2)) * t - (a + A(3))) * t * t + A(1);
  weight[2] = ((a + A(2)) * near_after - (a + A(3))) * near_after * near_after + A(1);
  weight[3] = ((a * far_after - A(5) * a) * far_after + A(8) * a) * far_after - A(4) * a;
}

// The 4x4 neighbourhood of a clamped sample; taps beyond the map read the border pixel (as grid_sample's
// bicubic with padding_mode="border", and interpolate), so a constant map stays constant up to its edges.
template <typename A>
MASKRCNN_HOST_DEVICE bool bicubic_taps(A y, A x, int64_t height, int64_t width, BicubicTaps<A>* taps) {
  if (!inside_map(y, x, height, width)) {
    return false;
  }
  const A last_y = static_cast<A>(height - 1), last_x = static_cast<A>(width - 1);
  y = y <= A(0) ? A(0) : (y >= last_y ? last_y : y);
  x = x <= A(0) ? A(0) : (x >= last_x ? last_x : x);
  const int64_t y0 = static_cast<int64_t>(y), x0 = static_cast<int64_t>(x);  // floor: y, x >= 0
  A weight_y[4], weight_x[4];
  cubic_weights(y - static_cast<A>(y0), weight_y);
  cubic_weights(x - static_cast<A>(x0), weight_x);
  int64_t row[4], column[4];
  for (int i = 0; i < 4; ++i) {
    const int64_t r = y0 - 1 + i, c = x0 - 1 + i;
    row[i] = (r < 0 ? 0 : (r > height - 1 ? height - 1 : r)) * width;
    column[i] = c < 0 ? 0 : (c > width - 1 ? width - 1 : c);
  }
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 4; ++j) {
      taps->offset[4 * i + j] = row[i] + column[j];
      taps->weight[4 * i + j] = weight_y[i] * weight_x[j];
    }
  }
  return true;
}

// One name for both, chosen by the number of taps, so that the kernels are written once for kTaps.
template <typename A>
MASKRCNN_HOST_DEVICE bool interpolation_taps(A y, A x, int64_t height, int64_t width, BilinearTaps<A>* taps) {
  return bilinear_taps(y, x, height, width, taps);
}
template <typename A>
MASKRCNN_HOST_DEVICE bool interpolation_taps(A y, A x, int64_t height, int64_t width, BicubicTaps<A>* taps) {
  return bicubic_taps(y, x, height, width, taps);
}

// Calls visit(taps) for every sample of bin (ph, pw) that lies on the map (the others contribute 0).
template <int kTaps, typename A, typename Visit>
MASKRCNN_HOST_DEVICE void for_each_sample(const RoiGeometry<A>& g, int ph, int pw, int64_t height, int64_t width,
                                          Visit visit) {
  for (int iy = 0; iy < g.grid_h; ++iy) {
    const A y = sample_y(g, ph, iy);
    for (int ix = 0; ix < g.grid_w; ++ix) {
      Taps<A, kTaps> taps;
      if (interpolation_taps(y, sample_x(g, pw, ix), height, width, &taps)) {
        visit(taps);
      }
    }
  }
}

// Calls run(std::integral_constant<int, kTaps>()) with the tap count of `interpolation` (checked before).
template <typename Run>
void with_taps(int64_t interpolation, Run run) {
  if (interpolation == kBicubic) {
    run(std::integral_constant<int, 16>());
  } else {
    run(std::integral_constant<int, 4>());
  }
}

inline void check_roi_align_args(const at::Tensor& rois, double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                                 int64_t interpolation, const char* op) {
  TORCH_CHECK(interpolation == kBilinear || interpolation == kBicubic, op, ": interpolation must be ", kBilinear,
              " (bilinear) or ", kBicubic, " (bicubic); got ", interpolation);
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op,
              ": rois must be [K, 5] (batch index, x1, y1, x2, y2); got shape ", rois.sizes());
  TORCH_CHECK(at::isFloatingType(rois.scalar_type()), op, ": rois must be floating point; got ",
              rois.scalar_type());
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, op, ": output_size must be positive; got (", pooled_h, ", ",
              pooled_w, ")");
  TORCH_CHECK(spatial_scale > 0 && std::isfinite(spatial_scale), op,
              ": spatial_scale must be a positive finite number; got ", spatial_scale);
}

inline void check_roi_align_inputs(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                   int64_t pooled_h, int64_t pooled_w, int64_t interpolation) {
  TORCH_CHECK(input.dim() == 4, "roi_align: input must be [N, C, H, W]; got shape ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "roi_align: input must be floating point; got ",
              input.scalar_type());
  TORCH_CHECK(input.device() == rois.device(), "roi_align: rois must be on the device of input (", input.device(),
              "); got ", rois.device());
  check_roi_align_args(rois, spatial_scale, pooled_h, pooled_w, interpolation, "roi_align");
}

// Coordinates and weights are computed in float for float16/bfloat16/float32, in double for float64.
template <typename T>
struct Accumulate {
  using type = float;
};
template <>
struct Accumulate<double> {
  using type = double;
};

}  // namespace maskrcnn
