// Schemas of the NMS ops and the Python module that loads them. The implementations register
// themselves per device: nms_cpu.cpp (CPU) and nms_cuda.cu (CUDA, when built).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(maskrcnn, m) {
  m.def("nms(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor");
  m.def("batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold) -> Tensor");
}

// An empty Python module: importing it loads this library, whose static initialisers above register
// the ops. Plain CPython rather than pybind11 (torch/extension.h), which tripled the build time.
static PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, C10_STRINGIZE(TORCH_EXTENSION_NAME),
    "Registers torch.ops.maskrcnn.nms and torch.ops.maskrcnn.batched_nms.", -1, nullptr};
PyMODINIT_FUNC C10_CONCATENATE(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module_definition); }
