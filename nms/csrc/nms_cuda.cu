// CUDA NMS: the 64-bit IoU bitmask of the classic GPU kernel, then a greedy reduction that stays
// on the GPU (no copy of the mask to the host). batched_nms runs every group in the same two launches:
// the boxes arrive grouped, mask words between different groups are zero, and column blocks past a
// row block's last group are neither computed nor read.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "nms.h"

namespace maskrcnn {
namespace {

constexpr int kBlock = 64;  // boxes per mask word

template <typename T>
struct Accumulate {
  using type = float;  // half and bfloat16 boxes: IoU in float
};
template <>
struct Accumulate<double> {
  using type = double;
};

template <typename T, typename A>
__device__ __forceinline__ bool overlaps(const T* a, const T* b, A threshold) {
  const A ax1 = a[0], ay1 = a[1], ax2 = a[2], ay2 = a[3];
  const A bx1 = b[0], by1 = b[1], bx2 = b[2], by2 = b[3];
  const A w = max(min(ax2, bx2) - max(ax1, bx1), A(0));
  const A h = max(min(ay2, by2) - max(ay1, by1), A(0));
  const A inter = w * h;
  const A area_a = (ax2 - ax1) * (ay2 - ay1);
  const A area_b = (bx2 - bx1) * (by2 - by1);
  return inter / (area_a + area_b - inter) > threshold;
}

// last_col[r]: one past the last column block that row block r may overlap (its last group's end).
// mask[i * col_blocks + c], bit j: box i suppresses box 64 * c + j (same group, later, IoU > threshold).
template <typename T, typename A>
__global__ void mask_kernel(int64_t n, int64_t col_blocks, const T* __restrict__ boxes,
                            const int64_t* __restrict__ keys, const int64_t* __restrict__ last_col,
                            A threshold, uint64_t* __restrict__ mask) {
  const int64_t row_block = blockIdx.y, col_block = blockIdx.x;
  if (col_block < row_block || col_block >= last_col[row_block]) {
    return;
  }
  __shared__ T col_boxes[kBlock * 4];
  __shared__ int64_t col_keys[kBlock];
  const int64_t col_start = col_block * kBlock;
  const int col_size = static_cast<int>(n - col_start < kBlock ? n - col_start : kBlock);
  if (threadIdx.x < col_size) {
    for (int d = 0; d < 4; ++d) {
      col_boxes[threadIdx.x * 4 + d] = boxes[(col_start + threadIdx.x) * 4 + d];
    }
    col_keys[threadIdx.x] = keys ? keys[col_start + threadIdx.x] : 0;
  }
  __syncthreads();
  const int64_t row = row_block * kBlock + threadIdx.x;
  if (row >= n) {
    return;
  }
  const T* box = boxes + row * 4;
  const int64_t key = keys ? keys[row] : 0;
  const int first = row_block == col_block ? threadIdx.x + 1 : 0;
  uint64_t bits = 0;
  for (int j = first; j < col_size; ++j) {
    if (col_keys[j] == key && overlaps<T, A>(box, col_boxes + j * 4, threshold)) {
      bits |= 1ULL << j;
    }
  }
  mask[row * col_blocks + col_block] = bits;
}

// One thread block walks the row blocks in order. For each, the 64 diagonal words are loaded in
// parallel, one thread resolves which rows survive, and all threads fold the survivors' rows of the
// mask into `removed` for the later column blocks.
__global__ void reduce_kernel(int64_t n, int64_t col_blocks, const uint64_t* __restrict__ mask,
                              const int64_t* __restrict__ last_col, uint64_t* __restrict__ removed,
                              bool* __restrict__ keep) {
  __shared__ uint64_t diagonal[kBlock];
  __shared__ uint64_t kept_bits;
  for (int64_t row_block = 0; row_block < col_blocks; ++row_block) {
    const int64_t row_start = row_block * kBlock;
    const int rows = static_cast<int>(n - row_start < kBlock ? n - row_start : kBlock);
    if (threadIdx.x < rows) {
      diagonal[threadIdx.x] = mask[(row_start + threadIdx.x) * col_blocks + row_block];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      uint64_t dead = removed[row_block], kept = 0;
      for (int k = 0; k < rows; ++k) {
        if (!((dead >> k) & 1)) {
          kept |= 1ULL << k;
          dead |= diagonal[k];
        }
      }
      kept_bits = kept;
    }
    __syncthreads();
    const uint64_t kept = kept_bits;
    if (threadIdx.x < rows) {
      keep[row_start + threadIdx.x] = (kept >> threadIdx.x) & 1;
    }
    for (int64_t col = row_block + 1 + threadIdx.x; col < last_col[row_block]; col += blockDim.x) {
      uint64_t hit = 0;
      for (uint64_t rest = kept; rest; rest &= rest - 1) {
        hit |= mask[(row_start + __ffsll(static_cast<long long>(rest)) - 1) * col_blocks + col];
      }
      removed[col] |= hit;
    }
    __syncthreads();
  }
}

at::Tensor keep_sorted_cuda(const at::Tensor& boxes, const at::Tensor& keys, double iou_threshold) {
  const int64_t n = boxes.size(0);
  const int64_t col_blocks = (n + kBlock - 1) / kBlock;
  TORCH_CHECK(col_blocks <= 65535, "nms: at most ", 65535 * kBlock, " boxes on CUDA (one grid dimension per ",
              kBlock, " boxes); got ", n);
  const auto long_options = boxes.options().dtype(at::kLong);
  // last_col per row block: the end of the group of the block's last row (all of it for one group).
  at::Tensor last_col;
  if (keys.defined()) {
    const at::Tensor last_rows = at::arange(kBlock - 1, col_blocks * kBlock, kBlock, long_options).clamp_max_(n - 1);
    const at::Tensor group_end = at::searchsorted(keys, keys.index_select(0, last_rows), /*out_int32=*/false,
                                                  /*right=*/true);
    last_col = (group_end + (kBlock - 1)).div_(kBlock, "floor");
  } else {
    last_col = at::full({col_blocks}, col_blocks, long_options);
  }
  at::Tensor mask = at::empty({n * col_blocks}, long_options);
  at::Tensor removed = at::zeros({col_blocks}, long_options);
  at::Tensor keep = at::empty({n}, boxes.options().dtype(at::kBool));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(col_blocks, col_blocks);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "maskrcnn_nms_cuda", [&] {
    using A = typename Accumulate<scalar_t>::type;
    const A threshold = std::is_same<A, double>::value ? static_cast<A>(iou_threshold)
                                                       : static_cast<A>(float_threshold(iou_threshold));
    mask_kernel<scalar_t, A><<<grid, kBlock, 0, stream>>>(
        n, col_blocks, boxes.data_ptr<scalar_t>(), keys.defined() ? keys.data_ptr<int64_t>() : nullptr,
        last_col.data_ptr<int64_t>(), threshold, reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  reduce_kernel<<<1, 512, 0, stream>>>(n, col_blocks, reinterpret_cast<const uint64_t*>(mask.data_ptr<int64_t>()),
                                       last_col.data_ptr<int64_t>(),
                                       reinterpret_cast<uint64_t*>(removed.data_ptr<int64_t>()),
                                       keep.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return keep;
}

at::Tensor nms_cuda(const at::Tensor& dets, const at::Tensor& scores, double iou_threshold) {
  const c10::cuda::CUDAGuard guard(dets.device());
  return nms_driver(dets, scores, nullptr, iou_threshold, keep_sorted_cuda);
}

at::Tensor batched_nms_cuda(const at::Tensor& dets, const at::Tensor& scores, const at::Tensor& idxs,
                            double iou_threshold) {
  const c10::cuda::CUDAGuard guard(dets.device());
  return nms_driver(dets, scores, &idxs, iou_threshold, keep_sorted_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(maskrcnn, CUDA, m) {
  m.impl("nms", nms_cuda);
  m.impl("batched_nms", batched_nms_cuda);
}

}  // namespace maskrcnn
