// The Python module bissl._C. Importing it runs the static TORCH_LIBRARY_IMPL(bissl, CPU, ...)
// registrations of the other files in this folder; the module itself only carries build facts
// that bissl.ops.backend_report() prints.
#include <Python.h>

#ifdef _OPENMP
#include <omp.h>
static constexpr long kOpenMP = _OPENMP;
#else
static constexpr long kOpenMP = 0;
#endif

static struct PyModuleDef bissl_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "bissl CPU kernels (registered with the torch dispatcher as bissl::<op>, CPU key).",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&bissl_c_module);
  if (m == nullptr) return nullptr;
  // _OPENMP is the spec date (e.g. 201511); 0 means the kernels were built without OpenMP.
  if (PyModule_AddIntConstant(m, "openmp", kOpenMP) < 0 ||
      PyModule_AddStringConstant(m, "compiler", __VERSION__) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
