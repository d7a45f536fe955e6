// CPU NMS: greedy and exact, with the IoUs computed 64 boxes at a time into bitmasks (a loop the
// compiler vectorises) by both cores, and only for boxes not already suppressed by an earlier band of
// boxes (see keep_group). Independent groups (classes, levels) of batched_nms run in parallel instead.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "nms.h"

namespace maskrcnn {
namespace {

constexpr int kBlock = 64;

// One group of boxes in structure-of-arrays form, padded to whole blocks.
template <typename T>
struct BlockedBoxes {
  std::vector<T> x1, y1, x2, y2, area;
  int64_t count, blocks;

  BlockedBoxes(const T* boxes, int64_t n) : count(n), blocks((n + kBlock - 1) / kBlock) {
    const int64_t padded = blocks * kBlock;
    // Padding boxes are empty; their bits are never read.
    x1.assign(padded, T(0)), y1.assign(padded, T(0)), x2.assign(padded, T(0)), y2.assign(padded, T(0));
    area.assign(padded, T(0));
    for (int64_t i = 0; i < n; ++i) {
      x1[i] = boxes[4 * i + 0], y1[i] = boxes[4 * i + 1], x2[i] = boxes[4 * i + 2], y2[i] = boxes[4 * i + 3];
      area[i] = (x2[i] - x1[i]) * (y2[i] - y1[i]);  // as torchvision: no +1
    }
  }

  // Bit j is set when IoU(box i, box 64 * block + j) > threshold. Same arithmetic, in the same order,
  // as torchvision's CPU kernel, so the decisions agree exactly.
  uint64_t overlaps(int64_t i, int64_t block, T threshold) const {
    const int64_t base = block * kBlock;
    const T ix1 = x1[i], iy1 = y1[i], ix2 = x2[i], iy2 = y2[i], iarea = area[i];
    const T *bx1 = &x1[base], *by1 = &y1[base], *bx2 = &x2[base], *by2 = &y2[base], *barea = &area[base];
    alignas(64) uint8_t over[kBlock];
    for (int j = 0; j < kBlock; ++j) {
      const T w = std::max(T(0), std::min(ix2, bx2[j]) - std::max(ix1, bx1[j]));
      const T h = std::max(T(0), std::min(iy2, by2[j]) - std::max(iy1, by1[j]));
      const T inter = w * h;
      over[j] = inter / (iarea + barea[j] - inter) > threshold;
    }
    // Pack 8 flags (bytes of 0 or 1) into 8 bits with one multiplication each.
    uint64_t bits = 0;
    for (int q = 0; q < kBlock / 8; ++q) {
      uint64_t eight;
      std::memcpy(&eight, over + 8 * q, 8);
      bits |= ((eight * 0x0102040810204080ULL) >> 56) << (8 * q);
    }
    return bits;
  }
};

// Greedy NMS of one group already in score order; writes keep[0..n).
//
// Rows are handled in bands of kBandBlocks * 64 boxes. For a band, the IoU bits of every row that is
// still alive against all later boxes are computed in one parallel region; then one thread walks the
// band's rows in order, keeping a row unless it is removed, and folding a kept row's bits into
// `removed`. Rows removed by earlier bands are never computed, and there is one parallel region per
// band rather than per block: waking threads is expensive when the cores are shared.
template <typename T>
void keep_group(const T* boxes, int64_t n, T threshold, bool* keep) {
  constexpr int64_t kBandBlocks = 32;
  const BlockedBoxes<T> group(boxes, n);
  const int64_t blocks = group.blocks;
  std::vector<uint64_t> removed(blocks, 0);
  std::vector<uint64_t> band_bits(kBandBlocks * kBlock * blocks);
  for (int64_t band = 0; band < blocks; band += kBandBlocks) {
    const int64_t band_end = std::min(band + kBandBlocks, blocks);
    const int64_t first_row = band * kBlock, rows = std::min(band_end * kBlock, n) - first_row;
    // At least ~1M IoUs per thread, or the band runs on this thread alone.
    const int64_t grain = std::max<int64_t>(1, (1 << 20) / (kBlock * (blocks - band)));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t index = begin; index < end; ++index) {
        // Later rows cost less, so rows are taken alternately from both ends: each thread's
        // contiguous share of the index range then has about the same work.
        const int64_t r = index % 2 == 0 ? index / 2 : rows - 1 - index / 2;
        const int64_t i = first_row + r;
        if ((removed[i / kBlock] >> (i % kBlock)) & 1) {
          continue;  // removed by an earlier band: never read
        }
        uint64_t* bits = &band_bits[r * blocks];
        for (int64_t block = i / kBlock; block < blocks; ++block) {
          bits[block] = group.overlaps(i, block, threshold);
        }
      }
    });
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = first_row + r;
      keep[i] = !((removed[i / kBlock] >> (i % kBlock)) & 1);
      if (!keep[i]) {
        continue;
      }
      const uint64_t* bits = &band_bits[r * blocks];
      const uint64_t later_in_block = (i % kBlock == kBlock - 1) ? 0 : (~0ULL << (i % kBlock + 1));
      removed[i / kBlock] |= bits[i / kBlock] & later_in_block;
      for (int64_t block = i / kBlock + 1; block < blocks; ++block) {
        removed[block] |= bits[block];
      }
    }
  }
}

template <typename T>
void keep_sorted_typed(const at::Tensor& boxes, const at::Tensor& keys, T threshold, bool* keep) {
  const T* data = boxes.data_ptr<T>();
  const int64_t n = boxes.size(0);
  if (!keys.defined()) {
    keep_group<T>(data, n, threshold, keep);
    return;
  }
  std::vector<int64_t> starts;  // start of each group, then n
  const int64_t* key = keys.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    if (i == 0 || key[i] != key[i - 1]) {
      starts.push_back(i);
    }
  }
  starts.push_back(n);
  const int64_t groups = static_cast<int64_t>(starts.size()) - 1;
  if (groups == 1) {
    keep_group<T>(data, n, threshold, keep);
    return;
  }
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      keep_group<T>(data + 4 * starts[g], starts[g + 1] - starts[g], threshold, keep + starts[g]);
    }
  });
}

at::Tensor keep_sorted_cpu(const at::Tensor& boxes, const at::Tensor& keys, double iou_threshold) {
  at::Tensor keep = at::empty({boxes.size(0)}, boxes.options().dtype(at::kBool));
  bool* flags = keep.data_ptr<bool>();
  if (boxes.scalar_type() == at::kDouble) {
    keep_sorted_typed<double>(boxes, keys, iou_threshold, flags);
  } else {
    // float32 as is; float16 and bfloat16 are compared in float32 (exact for their values).
    keep_sorted_typed<float>(boxes.to(at::kFloat), keys, float_threshold(iou_threshold), flags);
  }
  return keep;
}

at::Tensor nms_cpu(const at::Tensor& dets, const at::Tensor& scores, double iou_threshold) {
  return nms_driver(dets, scores, nullptr, iou_threshold, keep_sorted_cpu);
}

at::Tensor batched_nms_cpu(const at::Tensor& dets, const at::Tensor& scores, const at::Tensor& idxs,
                           double iou_threshold) {
  return nms_driver(dets, scores, &idxs, iou_threshold, keep_sorted_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(maskrcnn, CPU, m) {
  m.impl("nms", nms_cpu);
  m.impl("batched_nms", batched_nms_cpu);
}

}  // namespace maskrcnn
