/* kimiha's handler calls, shared by the compiled core (kimiha/_core.pyx) and the benchmark's bounds
   (kimiha/bench/_bounds.pyx), so that a bound calls a handler exactly as the dispatch loop does. */
#ifndef KIMIHA_CALL_H
#define KIMIHA_CALL_H
#include <Python.h>

/* One positional argument through vectorcall, with the spare slot before it that lets a bound method put its
   `self` in front without copying the arguments (PY_VECTORCALL_ARGUMENTS_OFFSET). */
static inline PyObject *kimiha_call1(PyObject *callable, PyObject *arg) {
    PyObject *args[2] = {NULL, arg};
    return PyObject_Vectorcall(callable, args + 1, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

/* A handler that is a Python function, or a method bound to one, is called through the function's own
   vectorcall entry with its `self` put in front here: no bound-method hop and no generic call checks. */
static inline PyObject *kimiha_call_func(PyObject *func, PyObject *self, PyObject *arg) {
    vectorcallfunc call = PyVectorcall_Function(func);
    if (self == NULL) {
        PyObject *args[2] = {NULL, arg};
        return call(func, args + 1, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    } else {
        PyObject *args[3] = {NULL, self, arg};
        return call(func, args + 1, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    }
}

#endif
