// Stand-in for kernel-builder's generated registration.h, used only by the
// just-in-time build in torch-ext/hydra/_ops.py. A kernel-builder build
// generates its own copy of this header, which is why this one lives in jit/
// (an include directory only the JIT build adds).
#pragma once

#include <Python.h>
#include <torch/library.h>

#define _CONCAT(A, B) A##B
#define CONCAT(A, B) _CONCAT(A, B)

#define _STRINGIFY(A) #A
#define STRINGIFY(A) _STRINGIFY(A)

// TORCH_LIBRARY / TORCH_LIBRARY_IMPL that expand NAME first, so that NAME can
// be a macro such as TORCH_EXTENSION_NAME (set by the build to the module name).
#define TORCH_LIBRARY_EXPAND(NAME, MODULE) TORCH_LIBRARY(NAME, MODULE)
#define TORCH_LIBRARY_IMPL_EXPAND(NAME, DEVICE, MODULE) \
  TORCH_LIBRARY_IMPL(NAME, DEVICE, MODULE)

// An importable, empty Python module named NAME. Importing it runs the static
// initialisers above, which register the ops under torch.ops.NAME.
#define REGISTER_EXTENSION(NAME)                                              \
  PyMODINIT_FUNC CONCAT(PyInit_, NAME)() {                                    \
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT,                \
                                        STRINGIFY(NAME), nullptr, 0, nullptr}; \
    return PyModule_Create(&module);                                          \
  }
