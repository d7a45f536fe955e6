// Shared by the CPU and CUDA implementations of maskrcnn::nms and maskrcnn::batched_nms.
//
// Both ops reduce to one device-specific step, `keep_sorted`: given boxes sorted so that each group
// (class, pyramid level, ...) is contiguous and, within a group, ordered by decreasing score, decide
// greedily which boxes survive. Everything around it (sorting, mapping back to the caller's indices)
// is written once here with ATen ops that run on either device.
#pragma once

// Only the headers used (not ATen/ATen.h, every op's declaration): they set the build time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>

#include <cmath>
#include <limits>

namespace maskrcnn {

// The largest float t with (x > t) == (x > threshold) for every float x: comparing in float then
// gives exactly torchvision's comparison of a float IoU with a double threshold.
inline float float_threshold(double threshold) {
  float t = static_cast<float>(threshold);
  if (static_cast<double>(t) > threshold) {
    t = std::nextafter(t, -std::numeric_limits<float>::infinity());
  }
  return t;
}

inline void check_nms_inputs(const at::Tensor& dets, const at::Tensor& scores, const at::Tensor* idxs) {
  TORCH_CHECK(dets.dim() == 2 && dets.size(1) == 4,
              "nms: boxes must be [N, 4] (x1, y1, x2, y2); got shape ", dets.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == dets.size(0),
              "nms: scores must be [N] with N = ", dets.size(0), " (the number of boxes); got shape ",
              scores.sizes());
  TORCH_CHECK(at::isFloatingType(dets.scalar_type()),
              "nms: boxes must be a floating-point tensor; got ", dets.scalar_type());
  TORCH_CHECK(dets.scalar_type() == scores.scalar_type(), "nms: boxes and scores must have the same dtype; got ",
              dets.scalar_type(), " and ", scores.scalar_type());
  TORCH_CHECK(dets.device() == scores.device(), "nms: boxes and scores must be on the same device; got ",
              dets.device(), " and ", scores.device());
  if (idxs != nullptr) {
    TORCH_CHECK(idxs->dim() == 1 && idxs->size(0) == dets.size(0),
                "batched_nms: idxs must be [N] with N = ", dets.size(0), "; got shape ", idxs->sizes());
    TORCH_CHECK(!at::isFloatingType(idxs->scalar_type()) && idxs->scalar_type() != at::kBool,
                "batched_nms: idxs must be an integer tensor; got ", idxs->scalar_type());
    TORCH_CHECK(idxs->device() == dets.device(), "batched_nms: idxs must be on the device of boxes (",
                dets.device(), "); got ", idxs->device());
  }
}

// KeepSorted: (boxes [N, 4] contiguous, sorted; group keys [N] int64 or an undefined tensor when there is
// a single group; threshold) -> keep flags [N] bool, in the same sorted order.
template <typename KeepSorted>
at::Tensor nms_driver(const at::Tensor& dets, const at::Tensor& scores, const at::Tensor* idxs,
                      double iou_threshold, KeepSorted keep_sorted) {
  check_nms_inputs(dets, scores, idxs);
  const auto long_options = dets.options().dtype(at::kLong);
  if (dets.size(0) == 0) {
    return at::empty({0}, long_options);
  }
  // rank -> caller's index, by decreasing score; stable, so equal scores keep the caller's order.
  const at::Tensor by_score = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  if (idxs == nullptr) {
    const at::Tensor keep = keep_sorted(dets.index_select(0, by_score).contiguous(), at::Tensor(), iou_threshold);
    return by_score.masked_select(keep);
  }
  // Group the ranked boxes by key with a stable sort, so each group stays in score order.
  const at::Tensor keys_by_score = idxs->to(at::kLong).index_select(0, by_score);
  at::Tensor grouped_keys, group_to_rank;
  std::tie(grouped_keys, group_to_rank) = keys_by_score.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor grouped_boxes = dets.index_select(0, by_score.index_select(0, group_to_rank)).contiguous();
  const at::Tensor keep_grouped = keep_sorted(grouped_boxes, grouped_keys.contiguous(), iou_threshold);
  // Back to score order: flags indexed by rank, then the kept ranks (ascending = by score).
  const at::Tensor keep_by_rank = at::zeros_like(keep_grouped).index_put_({group_to_rank}, keep_grouped);
  return by_score.masked_select(keep_by_rank);
}

}  // namespace maskrcnn
