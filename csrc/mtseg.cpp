// Module init of mtseg_kernels._C and every operator schema of the mtseg namespace.
// Kernels register themselves per backend in csrc/cpu/*.cpp and csrc/cuda/*.cu;
// fake (meta) kernels and autograd live in Python (mtseg_kernels/ops/*.py).
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "mtseg/hog_host.h"

namespace {

std::vector<std::string> compiled_backends() {
  std::vector<std::string> b{"cpu"};
#ifdef MTSEG_WITH_CUDA
  b.emplace_back("cuda");
#endif
  return b;
}

PyObject* py_compiled_backends(PyObject*, PyObject*) {
  const auto b = compiled_backends();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(b.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < b.size(); ++i) PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), PyUnicode_FromString(b[i].c_str()));
  return list;
}

// (scalar, exact, fused_rows): HOG pixels whose bin left the CPU vector test, those of
// them that needed hog.h's exact integer test, and the cell rows of a fused pass
// (AVX-512 or AVX2), since the last call with reset=True.
PyObject* py_hog_fallback_counts(PyObject*, PyObject* args) {
  int reset = 0;
  if (!PyArg_ParseTuple(args, "|p", &reset)) return nullptr;
  const auto counts = mtseg::hog::cpu_fallback_counts(reset != 0);
  return Py_BuildValue("(LLL)", static_cast<long long>(counts[0]), static_cast<long long>(counts[1]),
                       static_cast<long long>(counts[2]));
}

PyObject* py_hog_cells_pass(PyObject*, PyObject*) { return PyUnicode_FromString(mtseg::hog::cpu_cells_pass()); }

PyMethodDef methods[] = {
    {"compiled_backends", py_compiled_backends, METH_NOARGS,
     "Backends this build of mtseg_kernels._C has kernels for, e.g. ['cpu', 'cuda']."},
    {"hog_fallback_counts", py_hog_fallback_counts, METH_VARARGS,
     "hog_fallback_counts(reset=False) -> (scalar, exact, fused_rows): CPU HOG pixels whose orientation bin the "
     "vector test left to the scalar rule, those that took the exact integer test, and the cell rows the fused "
     "pass (AVX-512 or AVX2) computed, since the last reset."},
    {"hog_cells_pass", py_hog_cells_pass, METH_NOARGS,
     "hog_cells_pass() -> 'avx512', 'avx2' or 'rows': the CPU cells pass that float32 and uint8 images without "
     "transform_sqrt take now, given this CPU and MTSEG_HOG_SIMD (0, avx2 or avx512; unset: the widest)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "Compiled kernels of mtseg_kernels (torch.ops.mtseg).", -1,
                          methods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }

TORCH_LIBRARY(mtseg, m) {
  // Histogram of Oriented Gradients (skimage.feature.hog semantics), images (B, C, H, W).
  // hog = hog_blocks(hog_cells(images)); the pieces are exposed for autograd and reuse.
  m.def(
      "hog(Tensor images, int orientations, int[2] pixels_per_cell, int[2] cells_per_block, str block_norm, "
      "bool transform_sqrt) -> Tensor");
  m.def("hog_cells(Tensor images, int orientations, int[2] pixels_per_cell, bool transform_sqrt) -> Tensor");
  m.def("hog_blocks(Tensor cells, int[2] cells_per_block, str block_norm) -> Tensor");
  m.def(
      "hog_cells_backward(Tensor grad_cells, Tensor images, int orientations, int[2] pixels_per_cell, "
      "bool transform_sqrt) -> Tensor");
  m.def("hog_blocks_backward(Tensor grad_blocks, Tensor cells, int[2] cells_per_block, str block_norm) -> Tensor");

  // Class presence (TDSNet, CMU-Net). Labels (B, *spatial) integer; logits or
  // probabilities (B, K, *spatial); presence (B, K). soft_presence, presence_from_labels
  // and sync_loss are compositions (csrc/presence.cpp); soft_presence_forward returns the
  // presence and the (B, K, 2) float64 statistics its backward needs (mtseg/presence.h).
  m.def("class_counts(Tensor labels, int num_classes, int ignore_index=-100) -> Tensor");
  m.def("presence_from_labels(Tensor labels, int num_classes, int ignore_index=-100, int min_count=1) -> Tensor");
  m.def(
      "soft_presence(Tensor input, str mode=\"max\", str activation=\"softmax\", float temperature=0.1, "
      "float threshold=0.5, Tensor? valid_mask=None) -> Tensor");
  m.def(
      "soft_presence_forward(Tensor input, str mode, str activation, float temperature, float threshold, "
      "Tensor? valid_mask) -> (Tensor, Tensor)");
  m.def(
      "soft_presence_backward(Tensor grad, Tensor input, Tensor stats, str mode, str activation, float temperature, "
      "Tensor? valid_mask) -> Tensor");
  m.def(
      "sync_loss(Tensor seg_logits, Tensor class_logits, str mode=\"hard\", str direction=\"seg_to_class\", "
      "str reduction=\"mean\", Tensor? weight=None, str activation=\"softmax\", float temperature=0.1, "
      "float threshold=0.5, Tensor? valid_mask=None) -> Tensor");

  // Exact distance transforms, connected components and level-set growth;
  // masks (B, H, W) or (B, D, H, W), non-zero = foreground. Not differentiable.
  // edt: distance from every non-zero voxel to the nearest zero voxel (scipy semantics;
  // +inf without any zero voxel); signed: -d(x, background) inside, +d(x, foreground) outside.
  m.def("edt(Tensor mask, float[]? spacing=None, bool squared=False, bool signed=False, ScalarType? dtype=None) -> Tensor");
  // Labels (int32, 1..n in raster order of first appearance, 0 = background) and n per image (int64).
  m.def("connected_components(Tensor mask, int connectivity) -> (Tensor, Tensor)");
  // {x : d(x, approx) - lam * d(x, complement(seg)) <= 0} as bool.
  m.def("levelset_grow(Tensor approx, Tensor seg, float lam, float[]? spacing=None) -> Tensor");
  // Multi-object growth from seed instance ids (int64 map, 0 = none); connectivity 0 = faces only.
  m.def("grow_instances(Tensor seeds, Tensor seg, float lam, float[]? spacing=None, int connectivity=0) -> Tensor");
}
