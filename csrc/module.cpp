// The Python module maml_fast._C and the schemas of the maml_fast::* operators.
//
// Importing the module loads this library; its static initialisers register the schemas below and
// the CPU (and, when built with nvcc, CUDA) kernels with the dispatcher, so Python reaches them as
// torch.ops.maml_fast.<name>. The module object itself only reports how it was built.
#include <Python.h>

#include <torch/library.h>

// Compute capabilities of the compiled CUDA kernels, e.g. "8.0 9.0+PTX"; empty in a CPU-only build.
#ifndef MAML_FAST_CUDA_ARCHS
#define MAML_FAST_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(maml_fast, m) {
  // Where the fake (meta) implementations live, so FakeTensor tracing can import them on demand;
  // set_python_module applies to the operators defined after it.
  m.set_python_module("maml_fast.ops.fast_weight_update");
  m.def("fast_weight_update(Tensor[] params, Tensor[] grads, Tensor[] lrs) -> Tensor[]");

  // Every gradient summed over its leading task dimension, with its pair (pairs[k] joins grads[paired[k]])
  // in the same sum, one pass for all.
  m.set_python_module("maml_fast.ops.task_broadcast");
  m.def("sum_over_tasks(Tensor[] grads, Tensor[] pairs, int[] paired) -> Tensor[]");

  // Per-task BatchNorm (batch statistics) + ReLU (LeakyReLU with negative_slope > 0) on the
  // [rows, channels] view, and its closed-form backward and double backward (formulas in
  // batch_norm_relu.h). mean and rstd are float32 for float32/float16/bfloat16 x, float64 for float64 x.
  m.set_python_module("maml_fast.ops.batch_norm_relu");
  m.def(
      "batch_norm_relu(Tensor x, Tensor weight, Tensor bias, float eps, float negative_slope=0.0) "
      "-> (Tensor y, Tensor mean, Tensor rstd)");
  m.def(
      "batch_norm_relu_backward(Tensor grad_y, Tensor x, Tensor y, Tensor weight, Tensor mean, "
      "Tensor rstd, float negative_slope=0.0) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "batch_norm_relu_double_backward(Tensor? grad_grad_x, Tensor? grad_grad_weight, "
      "Tensor? grad_grad_bias, Tensor grad_y, Tensor x, Tensor y, Tensor weight, Tensor mean, "
      "Tensor rstd, float negative_slope=0.0) -> (Tensor grad_grad_y, Tensor grad_x, Tensor grad_weight)");
}

namespace {

PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Compiled maml_fast operators, registered as torch.ops.maml_fast.*",
    -1,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C() {
  PyObject* module = PyModule_Create(&module_definition);
  if (module == nullptr) {
    return nullptr;
  }
  if (PyModule_AddStringConstant(module, "cuda_archs", MAML_FAST_CUDA_ARCHS) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
