// CUDA RoIAlign: forward, backward with atomic adds, and a deterministic backward without them.
//
// Forward gives each thread one output value. For a channels-last input the channel index varies
// fastest between threads, so a warp shares one bin's geometry and its taps read consecutive addresses;
// for NCHW input the bin index varies fastest, as in torchvision. Every kernel is written once for
// kTaps taps per sample: 4 (bilinear) or 16 (bicubic).
//
// The deterministic backward turns every tap into an entry (input pixel, weight, output bin),
// sorts the entries by pixel with a stable sort, and lets one thread per (pixel, channel) add up its
// entries in that fixed order. Memory grows with the number of samples, not with the feature map, and
// RoIs are taken in chunks so that it stays bounded.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "roi_align.h"

namespace maskrcnn {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;           // grid-stride loops beyond this
constexpr int64_t kMaxEntriesPerChunk = 1 << 23;  // deterministic backward: about 250 MB of entries

int64_t blocks_for(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

#define GRID_STRIDE_LOOP(index, total)                                                        \
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < (total); \
       index += static_cast<int64_t>(blockDim.x) * gridDim.x)

struct Shape {
  int64_t batch, channels, height, width;
  int pooled_h, pooled_w, sampling_ratio;
  bool aligned;
};

template <typename T, typename A, bool kChannelsLast, int kTaps>
__global__ void forward_kernel(int64_t total, const T* __restrict__ input, const A* __restrict__ rois, Shape s,
                               A spatial_scale, T* __restrict__ output) {
  const int64_t plane = s.height * s.width;
  GRID_STRIDE_LOOP(index, total) {
    int64_t k, c;
    int ph, pw;
    if (kChannelsLast) {
      c = index % s.channels;
      const int64_t bin = index / s.channels;
      pw = static_cast<int>(bin % s.pooled_w);
      ph = static_cast<int>((bin / s.pooled_w) % s.pooled_h);
      k = bin / s.pooled_w / s.pooled_h;
    } else {
      pw = static_cast<int>(index % s.pooled_w);
      ph = static_cast<int>((index / s.pooled_w) % s.pooled_h);
      c = (index / s.pooled_w / s.pooled_h) % s.channels;
      k = index / s.pooled_w / s.pooled_h / s.channels;
    }
    const RoiGeometry<A> g =
        roi_geometry<A>(rois + 5 * k, spatial_scale, s.pooled_h, s.pooled_w, s.sampling_ratio, s.aligned);
    A sum = 0;
    if (g.batch >= 0 && g.batch < s.batch) {  // out-of-range indices are rejected on the host; never read
      const T* image = input + g.batch * s.channels * plane;
      for_each_sample<kTaps>(g, ph, pw, s.height, s.width, [&](const Taps<A, kTaps>& t) {
        A v[kTaps];
        for (int tap = 0; tap < kTaps; ++tap) {
          v[tap] = static_cast<A>(kChannelsLast ? image[t.offset[tap] * s.channels + c]
                                                : image[c * plane + t.offset[tap]]);
        }
        for (int q = 0; q < kTaps; q += 4) {  // for bilinear, torchvision's expression
          sum += t.weight[q] * v[q] + t.weight[q + 1] * v[q + 1] + t.weight[q + 2] * v[q + 2] +
                 t.weight[q + 3] * v[q + 3];
        }
      });
    }
    output[((k * s.channels + c) * s.pooled_h + ph) * s.pooled_w + pw] = static_cast<T>(sum / g.count);
  }
}

// grad: [K, C, PH, PW]; grad_input: [N, C, H, W] in the accumulation type.
template <typename T, typename A, int kTaps>
__global__ void backward_atomic_kernel(int64_t total, const T* __restrict__ grad, const A* __restrict__ rois,
                                       Shape s, A spatial_scale, A* __restrict__ grad_input) {
  const int64_t plane = s.height * s.width;
  GRID_STRIDE_LOOP(index, total) {
    const int pw = static_cast<int>(index % s.pooled_w);
    const int ph = static_cast<int>((index / s.pooled_w) % s.pooled_h);
    const int64_t c = (index / s.pooled_w / s.pooled_h) % s.channels;
    const int64_t k = index / s.pooled_w / s.pooled_h / s.channels;
    const RoiGeometry<A> g =
        roi_geometry<A>(rois + 5 * k, spatial_scale, s.pooled_h, s.pooled_w, s.sampling_ratio, s.aligned);
    if (g.batch < 0 || g.batch >= s.batch) {
      continue;
    }
    const A grad_bin = static_cast<A>(grad[index]);
    A* image = grad_input + (g.batch * s.channels + c) * plane;
    for_each_sample<kTaps>(g, ph, pw, s.height, s.width, [&](const Taps<A, kTaps>& t) {
      for (int tap = 0; tap < kTaps; ++tap) {
        atomicAdd(image + t.offset[tap], grad_bin * t.weight[tap] / g.count);
      }
    });
  }
}

// Entries per RoI: kTaps per sample, 0 for an RoI of an image out of range.
template <typename A, int kTaps>
__global__ void count_entries_kernel(int64_t rois_count, const A* __restrict__ rois, Shape s, A spatial_scale,
                                     int64_t* __restrict__ counts) {
  GRID_STRIDE_LOOP(k, rois_count) {
    const RoiGeometry<A> g =
        roi_geometry<A>(rois + 5 * k, spatial_scale, s.pooled_h, s.pooled_w, s.sampling_ratio, s.aligned);
    const bool valid = g.batch >= 0 && g.batch < s.batch;
    counts[k] = valid ? kTaps * static_cast<int64_t>(s.pooled_h) * s.pooled_w * g.grid_h * g.grid_w : 0;
  }
}

// One thread per bin of the RoIs [k_begin, k_end) writes that bin's entries at first[k - k_begin] on.
// Samples outside the map get the key `none` (sorted last, never summed).
template <typename A, int kTaps>
__global__ void make_entries_kernel(int64_t k_begin, int64_t k_end, const A* __restrict__ rois, Shape s,
                                    A spatial_scale, const int64_t* __restrict__ first, int64_t none,
                                    int64_t* __restrict__ keys, int64_t* __restrict__ bins,
                                    A* __restrict__ weights) {
  const int64_t bins_per_roi = static_cast<int64_t>(s.pooled_h) * s.pooled_w;
  GRID_STRIDE_LOOP(index, (k_end - k_begin) * bins_per_roi) {
    const int64_t k = k_begin + index / bins_per_roi;
    const int64_t bin = index % bins_per_roi;
    const int ph = static_cast<int>(bin / s.pooled_w), pw = static_cast<int>(bin % s.pooled_w);
    const RoiGeometry<A> g =
        roi_geometry<A>(rois + 5 * k, spatial_scale, s.pooled_h, s.pooled_w, s.sampling_ratio, s.aligned);
    if (g.batch < 0 || g.batch >= s.batch) {
      continue;  // no entries were counted for it
    }
    const int per_bin = g.grid_h * g.grid_w;
    int64_t e = first[k - k_begin] + bin * per_bin * kTaps;
    for (int iy = 0; iy < g.grid_h; ++iy) {
      const A y = sample_y(g, ph, iy);
      for (int ix = 0; ix < g.grid_w; ++ix, e += kTaps) {
        Taps<A, kTaps> t;
        const bool inside = interpolation_taps(y, sample_x(g, pw, ix), s.height, s.width, &t);
        for (int tap = 0; tap < kTaps; ++tap) {
          keys[e + tap] = inside ? g.batch * s.height * s.width + t.offset[tap] : none;
          bins[e + tap] = k * bins_per_roi + bin;
          weights[e + tap] = inside ? t.weight[tap] / g.count : A(0);
        }
      }
    }
  }
}

// grad_bins: [K * PH * PW, C]; grad_input: [N * H * W, C]. One thread per (segment of equal keys,
// channel) sums the segment's entries in sorted order.
template <typename A>
__global__ void gather_entries_kernel(int64_t segments, int64_t channels, const int64_t* __restrict__ starts,
                                      const int64_t* __restrict__ lengths, const int64_t* __restrict__ sorted_keys,
                                      const int64_t* __restrict__ order, const int64_t* __restrict__ bins,
                                      const A* __restrict__ weights, const A* __restrict__ grad_bins, int64_t none,
                                      A* __restrict__ grad_input) {
  GRID_STRIDE_LOOP(index, segments * channels) {
    const int64_t segment = index / channels, c = index % channels;
    const int64_t start = starts[segment];
    const int64_t key = sorted_keys[start];
    if (key == none) {
      continue;
    }
    A sum = 0;
    for (int64_t e = start; e < start + lengths[segment]; ++e) {
      const int64_t entry = order[e];
      sum += grad_bins[bins[entry] * channels + c] * weights[entry];
    }
    grad_input[key * channels + c] += sum;
  }
}

at::ScalarType accumulate_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

Shape make_shape(int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t pooled_h,
                 int64_t pooled_w, int64_t sampling_ratio, bool aligned) {
  return Shape{batch, channels, height, width, static_cast<int>(pooled_h), static_cast<int>(pooled_w),
               static_cast<int>(sampling_ratio), aligned};
}

at::Tensor roi_align_cuda(const at::Tensor& input, const at::Tensor& rois, double spatial_scale, int64_t pooled_h,
                          int64_t pooled_w, int64_t sampling_ratio, bool aligned, int64_t interpolation) {
  check_roi_align_inputs(input, rois, spatial_scale, pooled_h, pooled_w, interpolation);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t K = rois.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  at::Tensor output = at::empty({K, C, pooled_h, pooled_w}, input.options());
  const int64_t total = output.numel();
  if (total == 0) {
    return output;
  }
  if (H == 0 || W == 0) {
    return output.zero_();
  }
  const Shape s = make_shape(input.size(0), C, H, W, pooled_h, pooled_w, sampling_ratio, aligned);
  const bool channels_last = input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous();
  const at::Tensor data = channels_last ? input : input.contiguous();
  const at::Tensor boxes = rois.to(accumulate_type(input)).contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "maskrcnn_roi_align_cuda", [&] {
    using A = typename Accumulate<scalar_t>::type;
    with_taps(interpolation, [&](auto taps) {
      constexpr int kTaps = decltype(taps)::value;
      const auto kernel =
          channels_last ? forward_kernel<scalar_t, A, true, kTaps> : forward_kernel<scalar_t, A, false, kTaps>;
      kernel<<<blocks_for(total), kThreads, 0, stream>>>(total, data.data_ptr<scalar_t>(), boxes.data_ptr<A>(), s,
                                                         static_cast<A>(spatial_scale), output.data_ptr<scalar_t>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return output;
}

template <typename A, int kTaps>
at::Tensor backward_deterministic(const at::Tensor& grad, const at::Tensor& boxes, const Shape& s, A spatial_scale,
                                  cudaStream_t stream) {
  const int64_t K = boxes.size(0);
  const auto long_options = grad.options().dtype(at::kLong);
  const int64_t none = s.batch * s.height * s.width;  // key of entries that contribute nothing
  at::Tensor counts = at::empty({K}, long_options);
  count_entries_kernel<A, kTaps><<<blocks_for(K), kThreads, 0, stream>>>(K, boxes.data_ptr<A>(), s, spatial_scale,
                                                                  counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor host_counts = counts.cpu();  // one synchronisation, to size the buffers
  const int64_t* count = host_counts.data_ptr<int64_t>();
  // grad_input accumulates in [N * H * W, C]; grad by bin is [K * PH * PW, C].
  at::Tensor grad_input = at::zeros({s.batch, s.height, s.width, s.channels}, grad.options().dtype(boxes.dtype()));
  const at::Tensor grad_bins = grad.to(boxes.scalar_type()).permute({0, 2, 3, 1}).contiguous();
  for (int64_t k_begin = 0; k_begin < K;) {
    // The largest chunk of RoIs within the entry budget (at least one RoI).
    int64_t k_end = k_begin, entries = 0;
    std::vector<int64_t> first;
    while (k_end < K && (k_end == k_begin || entries + count[k_end] <= kMaxEntriesPerChunk)) {
      first.push_back(entries);
      entries += count[k_end++];
    }
    if (entries > 0) {
      const at::Tensor first_device = at::tensor(first, long_options.device(at::kCPU)).to(grad.device());
      at::Tensor keys = at::empty({entries}, long_options), bins = at::empty({entries}, long_options);
      at::Tensor weights = at::empty({entries}, grad.options().dtype(boxes.dtype()));
      const int64_t bin_threads = (k_end - k_begin) * s.pooled_h * s.pooled_w;
      make_entries_kernel<A, kTaps><<<blocks_for(bin_threads), kThreads, 0, stream>>>(
          k_begin, k_end, boxes.data_ptr<A>(), s, spatial_scale, first_device.data_ptr<int64_t>(), none,
          keys.data_ptr<int64_t>(), bins.data_ptr<int64_t>(), weights.data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor sorted_keys, order;
      std::tie(sorted_keys, order) = keys.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
      const auto unique = at::unique_consecutive(sorted_keys, /*return_inverse=*/false, /*return_counts=*/true);
      const at::Tensor lengths = std::get<2>(unique);
      const at::Tensor starts = lengths.cumsum(0).sub_(lengths);
      const int64_t segments = lengths.size(0);
      gather_entries_kernel<A><<<blocks_for(segments * s.channels), kThreads, 0, stream>>>(
          segments, s.channels, starts.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(),
          sorted_keys.data_ptr<int64_t>(), order.data_ptr<int64_t>(), bins.data_ptr<int64_t>(),
          weights.data_ptr<A>(), grad_bins.data_ptr<A>(), none, grad_input.data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    k_begin = k_end;
  }
  return grad_input.permute({0, 3, 1, 2});  // [N, C, H, W] with channels-last strides
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                   int64_t pooled_h, int64_t pooled_w, int64_t batch_size, int64_t channels,
                                   int64_t height, int64_t width, int64_t sampling_ratio, bool aligned,
                                   bool deterministic, int64_t interpolation) {
  check_roi_align_args(rois, spatial_scale, pooled_h, pooled_w, interpolation, "roi_align_backward");
  TORCH_CHECK(grad.device() == rois.device(), "roi_align_backward: rois must be on the device of grad (",
              grad.device(), "); got ", rois.device());
  const int64_t K = rois.size(0);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == K && grad.size(1) == channels && grad.size(2) == pooled_h &&
                  grad.size(3) == pooled_w,
              "roi_align_backward: grad must be [K, C, PH, PW] = [", K, ", ", channels, ", ", pooled_h, ", ",
              pooled_w, "]; got ", grad.sizes());
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::ScalarType acc = accumulate_type(grad);
  const Shape s = make_shape(batch_size, channels, height, width, pooled_h, pooled_w, sampling_ratio, aligned);
  if (grad.numel() == 0 || height == 0 || width == 0) {
    return at::zeros({batch_size, channels, height, width}, grad.options());
  }
  const at::Tensor boxes = rois.to(acc).contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor grad_input;
  if (deterministic) {
    AT_DISPATCH_FLOATING_TYPES(acc, "maskrcnn_roi_align_backward_deterministic", [&] {
      with_taps(interpolation, [&](auto taps) {
        grad_input = backward_deterministic<scalar_t, decltype(taps)::value>(
            grad, boxes, s, static_cast<scalar_t>(spatial_scale), stream);
      });
    });
  } else {
    grad_input = at::zeros({batch_size, channels, height, width}, grad.options().dtype(acc));
    const at::Tensor grad_c = grad.contiguous();
    const int64_t total = grad_c.numel();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "maskrcnn_roi_align_backward", [&] {
      using A = typename Accumulate<scalar_t>::type;
      with_taps(interpolation, [&](auto taps) {
        backward_atomic_kernel<scalar_t, A, decltype(taps)::value><<<blocks_for(total), kThreads, 0, stream>>>(
            total, grad_c.data_ptr<scalar_t>(), boxes.data_ptr<A>(), s, static_cast<A>(spatial_scale),
            grad_input.data_ptr<A>());
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return grad_input.to(grad.scalar_type()).contiguous();  // the same layout on every path
}

}  // namespace

TORCH_LIBRARY_IMPL(maskrcnn, CUDA, m) {
  m.impl("roi_align", roi_align_cuda);
  m.impl("roi_align_backward", roi_align_backward_cuda);
}

}  // namespace maskrcnn
