// Schemas of the NMS ops and the Python module that loads them. The implementations register
// themselves per device: nms_cpu.cpp (CPU) and nms_cuda.cu (CUDA, when built).
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(maskrcnn, m) {
  m.def("nms(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor");
  m.def("batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "Registers torch.ops.maskrcnn.nms and torch.ops.maskrcnn.batched_nms.";
}
