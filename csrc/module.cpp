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
  // Where the fake (meta) implementations live, so FakeTensor tracing can import them on demand.
  m.set_python_module("maml_fast.ops.fast_weight_update");
  m.def("fast_weight_update(Tensor[] params, Tensor[] grads, Tensor[] lrs) -> Tensor[]");
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
