// CPU RoIAlign, forward and backward, on a channels-last view of the feature map.
//
// With channels last, each tap (4 per sample for bilinear, 16 for bicubic) reads (or, backward,
// updates) C contiguous values, so the inner loop over channels is vectorised and the sample geometry
// and tap weights are computed once per sample rather than once per channel. Forward splits the bins between threads; backward splits the channels, so no
// two threads ever add into the same value and the result does not depend on the number of threads
// (this backward is deterministic).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "roi_align.h"

namespace maskrcnn {
namespace {

void check_batch_indices(const at::Tensor& rois, int64_t batch_size, const char* op) {
  if (rois.size(0) == 0) {
    return;
  }
  const at::Tensor index = rois.select(1, 0);
  const double low = index.min().item<double>(), high = index.max().item<double>();
  TORCH_CHECK(low >= 0 && high < static_cast<double>(batch_size), op,
              ": rois[:, 0] (batch index) must be in [0, ", batch_size, "); got values from ", low, " to ", high);
}

// dst[b][j][i] = src[b][i][j] for `batch` matrices of rows x cols: NCHW <-> NHWC with rows, cols =
// (C, H * W) or (H * W, C). Tiled so both sides are read and written in cache-sized pieces, and
// parallel; several times faster here than a strided at::Tensor::contiguous().
template <typename A>
void transpose_matrices(const A* src, A* dst, int64_t batch, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 64;
  const int64_t row_tiles = (rows + kTile - 1) / kTile, col_tiles = (cols + kTile - 1) / kTile;
  at::parallel_for(0, batch * row_tiles * col_tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t b = tile / (row_tiles * col_tiles);
      const int64_t i0 = (tile / col_tiles) % row_tiles * kTile, j0 = tile % col_tiles * kTile;
      const int64_t i1 = std::min(i0 + kTile, rows), j1 = std::min(j0 + kTile, cols);
      const A* from = src + b * rows * cols;
      A* to = dst + b * rows * cols;
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t i = i0; i < i1; ++i) {
          to[j * rows + i] = from[i * cols + j];
        }
      }
    }
  });
}

// acc[c] += sum of the taps' weighted values, four taps (one row of a bicubic neighbourhood) per pass
// over the channels; for bilinear this is exactly torchvision's expression.
template <typename A, int kTaps>
inline void add_taps(const A* image, int64_t channels, const Taps<A, kTaps>& t, A* __restrict__ acc) {
  for (int q = 0; q < kTaps; q += 4) {
    const A* __restrict__ v1 = image + t.offset[q] * channels;
    const A* __restrict__ v2 = image + t.offset[q + 1] * channels;
    const A* __restrict__ v3 = image + t.offset[q + 2] * channels;
    const A* __restrict__ v4 = image + t.offset[q + 3] * channels;
    const A w1 = t.weight[q], w2 = t.weight[q + 1], w3 = t.weight[q + 2], w4 = t.weight[q + 3];
    for (int64_t c = 0; c < channels; ++c) {
      acc[c] += w1 * v1[c] + w2 * v2[c] + w3 * v3[c] + w4 * v4[c];
    }
  }
}

template <typename A, int kTaps>
void forward_typed(const A* input, const A* rois, int64_t rois_count, int64_t channels, int64_t height,
                   int64_t width, A spatial_scale, int pooled_h, int pooled_w, int sampling_ratio, bool aligned,
                   A* output) {
  const int64_t plane = height * width;
  const int64_t bin_stride = static_cast<int64_t>(pooled_h) * pooled_w;  // output is [K, C, PH, PW]
  // One work item is one row of bins of one RoI.
  at::parallel_for(0, rois_count * pooled_h, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> sum(channels);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item / pooled_h;
      const int ph = static_cast<int>(item % pooled_h);
      const RoiGeometry<A> g =
          roi_geometry<A>(rois + 5 * k, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned);
      const A* image = input + g.batch * plane * channels;
      for (int pw = 0; pw < pooled_w; ++pw) {
        std::fill(sum.begin(), sum.end(), A(0));
        A* __restrict__ acc = sum.data();
        for_each_sample<kTaps>(g, ph, pw, height, width,
                               [&](const Taps<A, kTaps>& t) { add_taps(image, channels, t, acc); });
        A* out = output + (k * channels * pooled_h + ph) * pooled_w + pw;
        for (int64_t c = 0; c < channels; ++c) {
          out[c * bin_stride] = acc[c] / g.count;
        }
      }
    }
  });
}

template <typename A, int kTaps>
void backward_typed(const A* grad, const A* rois, int64_t rois_count, int64_t channels, int64_t height,
                    int64_t width, A spatial_scale, int pooled_h, int pooled_w, int sampling_ratio, bool aligned,
                    A* grad_input) {
  const int64_t plane = height * width;
  // grad is [K, PH, PW, C] (channels last), grad_input is [N, H, W, C].
  at::parallel_for(0, channels, 16, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t k = 0; k < rois_count; ++k) {
      const RoiGeometry<A> g =
          roi_geometry<A>(rois + 5 * k, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned);
      A* image = grad_input + g.batch * plane * channels;
      for (int ph = 0; ph < pooled_h; ++ph) {
        for (int pw = 0; pw < pooled_w; ++pw) {
          const A* __restrict__ g_bin = grad + ((k * pooled_h + ph) * pooled_w + pw) * channels;
          for_each_sample<kTaps>(g, ph, pw, height, width, [&](const Taps<A, kTaps>& t) {
            for (int tap = 0; tap < kTaps; ++tap) {
              A* __restrict__ target = image + t.offset[tap] * channels;
              const A w = t.weight[tap];
              for (int64_t c = c_begin; c < c_end; ++c) {
                target[c] += g_bin[c] * w / g.count;  // torchvision's order: (grad * w) / count
              }
            }
          });
        }
      }
    }
  });
}

// float16 and bfloat16 are computed in float32.
at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor roi_align_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                         int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                         int64_t interpolation) {
  check_roi_align_inputs(input, rois, spatial_scale, pooled_h, pooled_w, interpolation);
  check_batch_indices(rois, input.size(0), "roi_align");
  const int64_t K = rois.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const at::ScalarType type = compute_type(input);
  at::Tensor output = at::empty({K, C, pooled_h, pooled_w}, input.options().dtype(type));
  if (K == 0 || C == 0 || H == 0 || W == 0) {
    return output.to(input.scalar_type());
  }
  const at::Tensor typed = input.to(type);
  const bool channels_last = typed.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor source = channels_last ? typed : typed.contiguous();
  // The kernel reads [N, H, W, C]: a channels-last input as it is, an NCHW one transposed.
  const at::Tensor nhwc = channels_last ? source : at::empty({input.size(0), H, W, C}, source.options());
  const at::Tensor boxes = rois.to(type).contiguous();
  AT_DISPATCH_FLOATING_TYPES(type, "maskrcnn_roi_align_cpu", [&] {
    if (!channels_last) {
      transpose_matrices(source.data_ptr<scalar_t>(), nhwc.data_ptr<scalar_t>(), input.size(0), C, H * W);
    }
    with_taps(interpolation, [&](auto taps) {
      forward_typed<scalar_t, decltype(taps)::value>(nhwc.data_ptr<scalar_t>(), boxes.data_ptr<scalar_t>(), K, C, H,
                                                     W, static_cast<scalar_t>(spatial_scale), pooled_h, pooled_w,
                                                     sampling_ratio, aligned, output.data_ptr<scalar_t>());
    });
  });
  return output.to(input.scalar_type());
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_h, int64_t pooled_w, int64_t batch_size, int64_t channels,
                                  int64_t height, int64_t width, int64_t sampling_ratio, bool aligned,
                                  bool /*deterministic: always*/, int64_t interpolation) {
  check_roi_align_args(rois, spatial_scale, pooled_h, pooled_w, interpolation, "roi_align_backward");
  const int64_t K = rois.size(0);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == K && grad.size(1) == channels && grad.size(2) == pooled_h &&
                  grad.size(3) == pooled_w,
              "roi_align_backward: grad must be [K, C, PH, PW] = [", K, ", ", channels, ", ", pooled_h, ", ",
              pooled_w, "]; got ", grad.sizes());
  check_batch_indices(rois, batch_size, "roi_align_backward");
  const at::ScalarType type = compute_type(grad);
  if (K == 0 || channels == 0 || height == 0 || width == 0) {
    return at::zeros({batch_size, channels, height, width}, grad.options());
  }
  // Accumulated as [N, H, W, C], returned as [N, C, H, W].
  const at::Tensor grad_nhwc_input = at::zeros({batch_size, height, width, channels}, grad.options().dtype(type));
  at::Tensor grad_input = at::empty({batch_size, channels, height, width}, grad.options().dtype(type));
  const at::Tensor grad_nhwc = grad.to(type).permute({0, 2, 3, 1}).contiguous();
  const at::Tensor boxes = rois.to(type).contiguous();
  AT_DISPATCH_FLOATING_TYPES(type, "maskrcnn_roi_align_backward_cpu", [&] {
    with_taps(interpolation, [&](auto taps) {
      backward_typed<scalar_t, decltype(taps)::value>(grad_nhwc.data_ptr<scalar_t>(), boxes.data_ptr<scalar_t>(), K,
                                                      channels, height, width, static_cast<scalar_t>(spatial_scale),
                                                      pooled_h, pooled_w, sampling_ratio, aligned,
                                                      grad_nhwc_input.data_ptr<scalar_t>());
    });
    transpose_matrices(grad_nhwc_input.data_ptr<scalar_t>(), grad_input.data_ptr<scalar_t>(), batch_size,
                       height * width, channels);
  });
  return grad_input.to(grad.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(maskrcnn, CPU, m) {
  m.impl("roi_align", roi_align_cpu);
  m.impl("roi_align_backward", roi_align_backward_cpu);
}

}  // namespace maskrcnn
