// Schemas of the RoIAlign ops and the Python module that loads them. The implementations register
// themselves per device: roi_align_cpu.cpp (CPU) and roi_align_cuda.cu (CUDA, when built).
// Autograd and fake (meta) implementations are registered in roialign/__init__.py. Both ops return
// contiguous (NCHW) tensors on every device and path. `interpolation` is 0 for bilinear (the default, as
// torchvision) and 1 for bicubic (enum Interpolation in roi_align.h); it comes last, with a default, so
// that calls written before it existed keep their meaning.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(maskrcnn, m) {
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, int pooled_height, int pooled_width, "
      "int sampling_ratio, bool aligned, int interpolation=0) -> Tensor");
  m.def(
      "roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, int pooled_height, int pooled_width, "
      "int batch_size, int channels, int height, int width, int sampling_ratio, bool aligned, "
      "bool deterministic, int interpolation=0) -> Tensor");
}

// An empty Python module: importing it loads this library, whose static initialisers above register
// the ops. Plain CPython rather than pybind11 (torch/extension.h), which tripled the build time.
static PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, C10_STRINGIZE(TORCH_EXTENSION_NAME),
    "Registers torch.ops.maskrcnn.roi_align and torch.ops.maskrcnn.roi_align_backward.", -1, nullptr};
PyMODINIT_FUNC C10_CONCATENATE(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module_definition); }
