# cython: language_level=3, binding=False, boundscheck=False, wraparound=False
"""Lower bounds for ``kimiha bench compare``: the least any compiled bus can cost, reached the README's way.

Both classes are published to as the README teaches, ``bus.publish(Ev.MD, e)``, and call the handlers as the
dispatch loop does (``kimiha/_call.h``: the function's own vectorcall entry, its ``self`` put in front). They
do nothing else: no channel lookup (the key is not read), no ring, no sequence, no counters, no latency, no
wake-up, no fault isolation (a failing handler's exception propagates). What a real bus costs beyond them is
its work; what they cost is the price of a Python call into C plus a call from C back into Python, which no
compiled dispatcher of Python handlers can avoid.

* :class:`InlineBound` calls every handler inside ``publish`` (the shape of ``Dispatch.INLINE``, pyee and
  NautilusTrader's ``MessageBus``).
* :class:`LoopBound` stores the payload in ``publish``; ``flush()`` then calls every handler over the stored
  payloads, one handler after the other (the shape of ``Dispatch.LOOP``'s batch, less the loop callback).

Benchmark instruments only: not part of kimiha's API.
"""

cimport cython
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF

import inspect
import types

cdef extern from "../_call.h":
    PyObject* kimiha_call1(PyObject* callable, PyObject* arg)
    PyObject* kimiha_call_func(PyObject* func, PyObject* self, PyObject* arg)


cdef inline int call(PyObject* func, PyObject* self_, bint plain, object event) except -1:
    cdef PyObject* result
    if plain:
        result = kimiha_call_func(func, self_, <PyObject*>event)
    else:
        result = kimiha_call1(func, <PyObject*>event)
    if result == NULL:
        return -1
    Py_DECREF(<object>result)
    return 0


cdef class _Calls:
    """The handlers, each split as the dispatch loop splits it: a Python function and its ``self`` (NULL for a
    plain function), called through the function's vectorcall entry; any other callable called as it is.
    ``keep`` holds the references; the C arrays are what a call reads."""
    cdef list keep
    cdef PyObject** funcs
    cdef PyObject** selves
    cdef bint* plain
    cdef Py_ssize_t n

    def __init__(self, handlers):
        handlers = list(handlers)
        if not handlers:
            raise ValueError("expected at least one handler, got none")
        for h in handlers:
            if not callable(h):
                raise TypeError(f"expected callable handlers, got {type(h).__name__} {h!r:.100}")
            if inspect.iscoroutinefunction(h) or inspect.isgeneratorfunction(h) or inspect.isasyncgenfunction(h):
                raise TypeError(f"expected plain (sync) handlers, got {h!r:.100}, whose calls would not run it")
        if self.funcs != NULL:
            raise RuntimeError("already initialised")
        self.n = len(handlers)
        self.funcs = <PyObject**>PyMem_Malloc(self.n * sizeof(PyObject*))
        self.selves = <PyObject**>PyMem_Malloc(self.n * sizeof(PyObject*))
        self.plain = <bint*>PyMem_Malloc(self.n * sizeof(bint))
        if self.funcs == NULL or self.selves == NULL or self.plain == NULL:
            raise MemoryError()
        self.keep = []
        for i, h in enumerate(handlers):
            if type(h) is types.MethodType and type(h.__func__) is types.FunctionType:
                func, self_ = h.__func__, h.__self__
            else:
                func, self_ = h, None
            self.keep += [func, self_]
            self.funcs[i] = <PyObject*>func
            self.selves[i] = <PyObject*>self_ if self_ is not None else NULL
            self.plain[i] = type(func) is types.FunctionType

    def __dealloc__(self):
        PyMem_Free(self.funcs)
        PyMem_Free(self.selves)
        PyMem_Free(self.plain)


@cython.final
cdef class InlineBound(_Calls):
    """``publish(key, payload)`` calls every handler with ``payload``, in order, and nothing else."""

    def publish(self, key, payload, /):
        cdef Py_ssize_t i
        if self.n == 1:
            call(self.funcs[0], self.selves[0], self.plain[0], payload)
        else:
            for i in range(self.n):
                call(self.funcs[i], self.selves[i], self.plain[i], payload)


@cython.final
cdef class LoopBound(_Calls):
    """``publish(key, payload)`` stores ``payload`` (up to ``capacity``); ``flush()`` calls every handler over
    the stored payloads, one handler after the other, and empties the store."""
    cdef list slots
    cdef Py_ssize_t capacity
    cdef Py_ssize_t count
    cdef bint flushing

    def __init__(self, handlers, Py_ssize_t capacity):
        super().__init__(handlers)
        if capacity < 1:
            raise ValueError(f"LoopBound: expected capacity >= 1, got {capacity}")
        self.capacity = capacity
        self.slots = [None] * capacity
        self.count = 0

    def publish(self, key, payload, /):
        if self.flushing:
            raise RuntimeError("LoopBound: publish while flush() calls the handlers (it would overwrite the "
                               "payloads being flushed)")
        if self.count >= self.capacity:
            raise OverflowError(f"LoopBound: {self.capacity} payloads stored and not flushed")
        self.slots[self.count] = payload
        self.count += 1

    def flush(self):
        """Call every handler over the stored payloads; return how many payloads there were."""
        cdef Py_ssize_t i, j
        cdef Py_ssize_t n = self.count
        cdef list slots = self.slots
        if self.flushing:
            raise RuntimeError("LoopBound: flush() while flush() calls the handlers")
        self.flushing = True
        try:
            for i in range(self.n):
                for j in range(n):
                    call(self.funcs[i], self.selves[i], self.plain[i], slots[j])
        finally:
            self.flushing = False
            self.count = 0
        return n
