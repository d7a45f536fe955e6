// CPU NMS: greedy, exact, and O(kept * N) rather than O(N^2) scalar work.
//
// Boxes are processed in blocks of 64 in score order. The boxes of a block that survive are found
// with a short sequential scan; their IoU with every later block is then computed 64 boxes at a time
// (a loop the compiler vectorises) and folded into a "removed" bitmask, the later blocks being split
// between threads. Independent groups (classes, levels) of batched_nms run in parallel instead.
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
template <typename T>
void keep_group(const T* boxes, int64_t n, T threshold, bool* keep) {
  const BlockedBoxes<T> group(boxes, n);
  std::vector<uint64_t> removed(group.blocks, 0);
  for (int64_t block = 0; block < group.blocks; ++block) {
    const int in_block = static_cast<int>(std::min<int64_t>(kBlock, n - block * kBlock));
    uint64_t dead = removed[block];
    std::vector<int64_t> kept;
    for (int k = 0; k < in_block; ++k) {
      const int64_t i = block * kBlock + k;
      keep[i] = !((dead >> k) & 1);
      if (keep[i]) {
        kept.push_back(i);
        dead |= group.overlaps(i, block, threshold);
      }
    }
    if (kept.empty() || block + 1 == group.blocks) {
      continue;
    }
    // Each later block is updated by exactly one thread, so no two threads write the same word.
    // Threads are woken only for at least ~64k IoUs each: fewer parallel regions, which matters
    // when the cores are shared with other work and waking a thread can cost a scheduler tick.
    const int64_t grain = std::max<int64_t>(1, (1 << 16) / (static_cast<int64_t>(kept.size()) * kBlock));
    at::parallel_for(block + 1, group.blocks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t later = begin; later < end; ++later) {
        if (removed[later] == ~0ULL) {
          continue;
        }
        uint64_t hit = 0;
        for (const int64_t i : kept) {
          hit |= group.overlaps(i, later, threshold);
        }
        removed[later] |= hit;
      }
    });
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
