// Makes the operator library importable as `scop_ext._C`: importing it runs the static
// TORCH_LIBRARY registrations. Only setup.py compiles this file; the CMake build does not.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
