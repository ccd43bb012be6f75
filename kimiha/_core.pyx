# cython: language_level=3, embedsignature=True, binding=False, boundscheck=False, wraparound=False, cdivision=True
"""kimiha's compiled hot path: broadcast rings, subscriber cursors, the dispatch loop, counters, histograms.

One :class:`Channel` per event type holds a preallocated ring of ``capacity`` slots and a 64-bit sequence
(``tail``). Every subscriber owns a cursor into it. A slot keeps the decoded payload and, while the channel has
frames subscribers, the payload's msgpack frame, made at publish so a payload that cannot be encoded is refused
there (or the frame it arrived as, for raw publishes): each form is made at most once per slot. Publishing never allocates per event beyond what the caller passed in; waking readers is
coalesced to one loop callback (handlers) or one future (pulling readers) per batch, never per event.
"""

cimport cython
from cpython.object cimport PyObject, PyTypeObject, Py_TYPE
from cpython.ref cimport Py_INCREF, Py_XDECREF
from cpython.pythread cimport PyThread_get_thread_ident
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

import asyncio
import collections
import collections.abc
import functools
import inspect
import logging
import operator
import threading
import types
import weakref

import msgspec

from kimiha import logs as _logs
from kimiha.channel_config import ChannelConfig
from kimiha.types import _msgspec_dec_hook, _msgspec_enc_hook
from kimiha.error import (
    ChannelClosed,
    InvalidConfigurationError,
    ChannelFull,
    InvalidChannelError,
    InvalidStateError,
    Lagged,
    PayloadTypeError,
    SerializationError,
)

cdef extern from *:
    int __builtin_clzll(unsigned long long) nogil

# The handler calls (kimiha/_call.h): one argument through vectorcall, and a Python function (or a method bound
# to one) through the function's own vectorcall entry with its ``self`` put in front.
cdef extern from "_call.h":
    PyObject* kimiha_call1(PyObject* callable, PyObject* arg)
    PyObject* kimiha_call_func(PyObject* func, PyObject* self, PyObject* arg)

# A ready event is handed to ``await`` through the am_send slot (CPython >= 3.10): no coroutine object and
# no StopIteration per event. Cython does not generate am_send, so a few lines of C install it.
cdef extern from *:
    """
    #if PY_VERSION_HEX >= 0x030A0000
    static PyObject *(*kimiha_ready_take)(PyObject *) = NULL;
    static PySendResult kimiha_ready_am_send(PyObject *self, PyObject *arg, PyObject **presult) {
        PyObject *value = kimiha_ready_take(self);
        *presult = value;
        return value == NULL ? PYGEN_ERROR : PYGEN_RETURN;
    }
    static int kimiha_install_am_send(PyTypeObject *tp, PyObject *(*take)(PyObject *)) {
        if (tp->tp_as_async == NULL) {
            PyErr_SetString(PyExc_RuntimeError, "kimiha: ready type has no async slots");
            return -1;
        }
        kimiha_ready_take = take;
        tp->tp_as_async->am_send = kimiha_ready_am_send;
        PyType_Modified(tp);
        return 0;
    }
    #else
    static int kimiha_install_am_send(PyTypeObject *tp, PyObject *(*take)(PyObject *)) { return 0; }
    #endif

    /* CPython 3.12+ no longer sends through am_send: its SEND calls tp_iternext, and a ready value comes back
       as a StopIteration. Raising a new one per event (allocation, args tuple, and from Cython a traceback
       entry) cost about 280 ns here; this raises the same instance again, its value replaced, whenever no one
       else holds it: SEND takes it at once (no traceback is attached), reads the value and lets it go. */
    static PyObject *kimiha_raise_stop(PyObject **pstop, PyObject *value) {
        PyObject *exc = *pstop;
        if (exc == NULL || Py_REFCNT(exc) != 1) {
            *pstop = NULL;
            Py_XDECREF(exc);   /* whoever else holds it keeps it as it is */
            exc = PyObject_CallNoArgs(PyExc_StopIteration);
            if (exc == NULL) return NULL;
            *pstop = exc;
        }
        Py_INCREF(value);
        Py_XSETREF(((PyStopIterationObject *)exc)->value, value);
        Py_INCREF(exc);
    #if PY_VERSION_HEX >= 0x030C0000
        PyErr_SetRaisedException(exc);
    #else
        PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, NULL);
    #endif
        return NULL;
    }
    static void kimiha_install_iternext(PyTypeObject *tp, iternextfunc next) {
        tp->tp_iternext = next;
        PyType_Modified(tp);
    }
    """
    ctypedef PyObject* (*take_fn)(PyObject*)
    ctypedef PyObject* (*iternext_fn)(PyObject*) noexcept
    int kimiha_install_am_send(PyTypeObject* tp, take_fn take) except -1
    PyObject* kimiha_raise_stop(PyObject** pstop, PyObject* value)
    void kimiha_install_iternext(PyTypeObject* tp, iternext_fn next)

logger = logging.getLogger("kimiha.bus")

@cython.final
cdef class Empty:
    """Type of :data:`EMPTY`, the marker ``Subscription.try_recv_c()`` returns when no event is ready."""

    def __init__(self):
        raise TypeError("Empty has one instance: kimiha._core.EMPTY")

    def __repr__(self):
        return "kimiha._core.EMPTY"

    def __reduce__(self):
        return "EMPTY"


#: The "nothing ready" marker of the C API (payloads are never None, but None is the Python API's answer).
EMPTY = Empty.__new__(Empty)
cdef object _EMPTY = EMPTY
cdef object _get_running_loop = asyncio.get_running_loop
cdef object _running_loop_or_none = asyncio._get_running_loop  # C-level; None when no loop runs here
cdef object _sleep = asyncio.sleep
cdef object _get_ident = threading.get_ident
cdef object _CancelledError = asyncio.CancelledError
cdef object _current_task = asyncio.current_task
cdef object _Coroutine = collections.abc.Coroutine
cdef object _log_traceback = _logs.log_traceback
cdef object _log_fields = _logs.fields
cdef object _safe_repr = _logs.safe_repr
cdef object _ERROR = logging.ERROR
cdef object _MethodType = types.MethodType
#: What a sync handler may return only by mistake: a body that did not run (it runs when awaited or iterated).
cdef tuple _Unrun = (collections.abc.Coroutine, types.GeneratorType, types.AsyncGeneratorType)
cdef object _FunctionType = types.FunctionType
cdef object _index = operator.index
cdef object _partial = functools.partial
cdef object _iscoroutinefunction = inspect.iscoroutinefunction
cdef object _isgeneratorfunction = inspect.isgeneratorfunction
cdef object _isasyncgenfunction = inspect.isasyncgenfunction

DEFAULT_BUDGET = 1024

#: How deep INLINE deliveries may nest (a handler publishing to another inline channel, whose handler publishes
#: on, ...). A publish past it writes the event and leaves its delivery to the loop, in order; never a recursion
#: without bound.
cdef enum:
    INLINE_DEPTH_C = 16
INLINE_DEPTH = INLINE_DEPTH_C
cdef int _inline_depth = 0


cdef int _raise_pending() except -1:
    """Raise the exception a raw C-API call left set (its caller saw NULL): for an ``except`` clause."""
    return -1


cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


@cython.binding(True)  # a real signature for inspect and stubtest on every CPython (3.13 saw `(self, /)`)
def monotonic_ns():
    """Return the clock the bus stamps events with (CLOCK_MONOTONIC, ns); same as ``time.monotonic_ns``."""
    return now_ns()


# ---------------------------------------------------------------------------------------------------------------
# HDR-style histogram: exact below 128 ns, then 64 linear sub-buckets per power of two (<= 1.6 % error),
# up to 2**42 ns (~73 min); larger values land in the last bucket and still set ``max`` exactly.

cdef enum:
    H_LINEAR = 128
    H_SUB = 64
    H_TOP_BIT = 42
    H_BUCKETS = H_LINEAR + (H_TOP_BIT - 7) * H_SUB


cdef inline Py_ssize_t bucket_of(int64_t v) noexcept nogil:
    cdef int msb
    cdef int shift
    if v < H_LINEAR:
        return v if v > 0 else 0
    msb = 63 - __builtin_clzll(<unsigned long long>v)
    if msb >= H_TOP_BIT:
        return H_BUCKETS - 1
    shift = msb - 6
    return H_LINEAR + (msb - 7) * H_SUB + ((v >> shift) - H_SUB)


cdef inline int64_t bucket_high(Py_ssize_t i) noexcept nogil:
    """Highest value that falls in bucket ``i``."""
    cdef Py_ssize_t k
    cdef int msb
    cdef int shift
    if i < H_LINEAR:
        return i
    k = i - H_LINEAR
    msb = <int>(k // H_SUB) + 7
    shift = msb - 6
    return ((<int64_t>(H_SUB + k % H_SUB)) << shift) + ((<int64_t>1) << shift) - 1


cdef class LatencyHistogram:
    """Log-bucket latency histogram in nanoseconds (HDR-style, about 1.6 % relative precision).

    ``record`` is O(1) and allocation-free; ``percentile`` walks the buckets.
    """

    def __cinit__(self):
        self.counts = <uint64_t*>calloc(H_BUCKETS, sizeof(uint64_t))
        if self.counts is NULL:
            raise MemoryError()
        self.min = 0
        self.max = 0

    def __dealloc__(self):
        free(self.counts)

    cdef inline void record_c(self, int64_t value) noexcept nogil:
        if value < 0:
            value = 0
        self.counts[bucket_of(value)] += 1
        if self.count == 0 or value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.count += 1
        self.total += value

    def record(self, int64_t value):
        """Record one value (ns); negative values count as 0."""
        self.record_c(value)

    def reset(self):
        """Forget every recorded value."""
        memset(self.counts, 0, H_BUCKETS * sizeof(uint64_t))
        self.count = 0
        self.min = 0
        self.max = 0
        self.total = 0

    def merge(self, LatencyHistogram other not None):
        """Add every value recorded in ``other`` to this histogram."""
        cdef Py_ssize_t i
        if other.count == 0:
            return
        for i in range(H_BUCKETS):
            self.counts[i] += other.counts[i]
        if self.count == 0 or other.min < self.min:
            self.min = other.min
        if other.max > self.max:
            self.max = other.max
        self.count += other.count
        self.total += other.total

    def percentile(self, double q):
        """Return the value (ns) below or at which ``q`` percent of the records fall (0 if empty).

        The answer is the top of the bucket holding that rank, capped at the exact maximum.
        """
        cdef uint64_t rank
        cdef uint64_t seen = 0
        cdef Py_ssize_t i
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"percentile: expected q between 0 and 100, got {q}")
        if self.count == 0:
            return 0
        if q >= 100.0:
            return self.max
        rank = <uint64_t>(q / 100.0 * self.count + 0.5)
        if rank < 1:
            rank = 1
        for i in range(H_BUCKETS):
            seen += self.counts[i]
            if seen >= rank:
                return min(bucket_high(i), self.max)
        return self.max

    @property
    def mean(self):
        """Mean of the recorded values (ns), 0.0 if empty."""
        return self.total / self.count if self.count else 0.0

    def summary(self):
        """Return ``{count, min, mean, p50, p90, p99, p99_9, max}`` in ns."""
        return {
            "count": self.count,
            "min": self.min,
            "mean": round(self.mean, 1),
            "p50": self.percentile(50.0),
            "p90": self.percentile(90.0),
            "p99": self.percentile(99.0),
            "p99_9": self.percentile(99.9),
            "max": self.max,
        }

    def buckets(self):
        """Return ``[(bucket_high_ns, count), ...]`` for the non-empty buckets."""
        cdef Py_ssize_t i
        return [(bucket_high(i), self.counts[i]) for i in range(H_BUCKETS) if self.counts[i]]

    def __repr__(self):
        s = self.summary()
        return (f"LatencyHistogram(count={s['count']}, p50={s['p50']}ns, p99={s['p99']}ns, "
                f"p99.9={s['p99_9']}ns, max={s['max']}ns)")


# ---------------------------------------------------------------------------------------------------------------
# Handler: the base class of handlers written in Cython (the C API).

cdef class Handler:
    """Base class of event handlers written in Cython, called through the C vtable.

    Subclass it in a ``.pyx`` (``from kimiha._core cimport Handler``), override ``cdef int on_event(self,
    object event) except -1`` and subscribe an instance: ``bus.subscribe(Ev.X, MyHandler())``. The dispatch
    loop and INLINE publishes call ``on_event`` with no Python call; an exception it raises is counted and
    reported like any handler's. Calling the instance from Python (``handler(event)``) runs ``on_event`` too.
    """

    cdef int on_event(self, object event) except -1:
        raise NotImplementedError(f"{type(self).__name__} must override cdef int on_event(self, object event)")

    def __call__(self, event):
        self.on_event(event)


# ---------------------------------------------------------------------------------------------------------------
# Channel: the ring and everything that moves events through it.

cdef Py_ssize_t _batch_limit(object max_events, str method, Channel ch) except -2:
    """``max_events`` of drain / recv_batch / batches as a C limit: -1 for ``None`` (every ready event)."""
    cdef object n
    if max_events is None:
        return -1
    n = None
    if not isinstance(max_events, bool):
        try:
            n = _index(max_events)
        except TypeError:
            pass
    if n is None:
        raise TypeError(
            f"Subscription.{method}(max_events=...) on channel {ch.label()}: expected a positive int, or None "
            f"for every ready event; got {type(max_events).__name__} {_safe_repr(max_events, 100)}")
    if n < 1:
        raise ValueError(
            f"Subscription.{method}(max_events=...) on channel {ch.label()}: expected a positive int, or None "
            f"for every ready event; got {n}")
    if n > 0x7fffffffffffffff:
        return -1                      # more than can ever be ready: every ready event
    return <Py_ssize_t>n


cdef str _type_name(object classes):
    if isinstance(classes, tuple):
        return " | ".join([c.__name__ for c in classes])
    return classes.__name__


cdef bint _is_async_callable(object fn):
    """Whether calling ``fn`` returns a coroutine: an ``async def``, a bound one, an object whose ``__call__``
    is one, or a ``functools.partial`` of any of these."""
    while isinstance(fn, _partial):
        fn = fn.func
    if _iscoroutinefunction(fn):
        return True
    return _iscoroutinefunction(getattr(type(fn), "__call__", None))


cdef bint _is_generator_callable(object fn):
    """Whether calling ``fn`` returns a (sync or async) generator: a function with ``yield``, bound, behind an
    object's ``__call__`` or a ``functools.partial``."""
    while isinstance(fn, _partial):
        fn = fn.func
    for f in (fn, getattr(type(fn), "__call__", None)):
        if _isgeneratorfunction(f) or _isasyncgenfunction(f):
            return True
    return False


cdef inline object _not_awaited_advice():
    return ("the dispatch loop calls it without awaiting, so its body would never run; for async handlers use "
            "an EventTask run by the Scheduler, or the pull API (async for event in bus.subscribe(key)), where "
            "your code awaits each event")


cdef class Channel:
    """One broadcast channel: a preallocated ring, its subscribers' cursors and its counters.

    Created by :class:`EventBus`; users reach it through ``bus.channel(event_type)`` for a lookup-free publish.
    """

    # Generic in _core.pyi (Channel[Tick]); this makes the subscript legal at runtime too.
    __class_getitem__ = classmethod(types.GenericAlias)

    def __cinit__(self, key, str name, config, Py_ssize_t budget):
        cdef Py_ssize_t cap = config.capacity
        self.key = key
        self.name = name
        self.description = config.description
        self.capacity = cap
        self.mask = <uint64_t>(cap - 1) if cap > 1 and (cap & (cap - 1)) == 0 else 0
        self.block = config.overflow.value == "block"
        self.track_latency = config.track_latency
        dispatch = getattr(config, "dispatch", None)
        self.inline = dispatch is not None and dispatch.value == "inline"
        sample = getattr(config, "latency_sample", 1)
        self.latency_sample = sample
        self.sample_pow2 = (sample & (sample - 1)) == 0
        self.sample_mask = <uint64_t>(sample - 1)
        self.payload_type = config.payload_type
        classes = config.payload_classes
        if not classes:
            self.payload_classes = None
        elif len(classes) == 1:
            self.payload_classes = classes[0]
        else:
            self.payload_classes = tuple(classes)
        # isinstance(True, int) holds, but a frame of True does not decode as an int (msgspec is strict): refuse a
        # bool at publish where the declared types take it only as an int, as publish_raw of its frame would.
        self.refuse_bool = bool(classes) and bool not in classes and object not in classes and any(
            issubclass(bool, c) for c in classes)
        # The hooks keep EventType members in payloads as they were with enum.Enum: encoded as their value,
        # decoded back to the member where the payload type names the class. Called only for such objects.
        if config.payload_type is None:
            self.decoder = msgspec.msgpack.Decoder()
        else:
            self.decoder = msgspec.msgpack.Decoder(config.payload_type, dec_hook=_msgspec_dec_hook)
        self.encoder = msgspec.msgpack.Encoder(enc_hook=_msgspec_enc_hook)
        self.objs = [None] * cap
        self.frames = [None] * cap
        self.stamps = <int64_t*>calloc(cap, sizeof(int64_t))
        if self.stamps is NULL:
            raise MemoryError(f"channel {name!r}: cannot allocate {cap} slots")
        self.push_subs = []
        self.pull_refs = []
        self.pub_waiters = collections.deque()
        self.granted = []
        self.pending = collections.deque()
        self.budget = budget
        self.latency = LatencyHistogram()
        self.dispatch_cb = self._dispatch
        self.flush_cb = self._flush
        self.thread_cond = threading.Condition()

    def __dealloc__(self):
        free(self.stamps)

    def __repr__(self):
        return (f"<Channel {self.name!r} capacity={self.capacity} "
                f"overflow={'BLOCK' if self.block else 'LAG'} dispatch={'INLINE' if self.inline else 'LOOP'} "
                f"published={self.tail} subscribers={self.n_subscribers()}>")

    # -- binding ------------------------------------------------------------------------------------------------

    def _bind(self, loop, thread_id):
        cdef Subscription sub
        if loop is self.loop:
            self.loop_thread = thread_id
            self.loop_tid = thread_id
            return
        self.loop = loop
        self.loop_thread = thread_id
        self.loop_tid = thread_id
        # Callbacks and futures of the previous loop died with it. A flag left set for a callback that will
        # never run would keep every handler of this channel from being called again: reset it, forget the
        # futures of the old loop, and let the new loop carry on where the old one stopped.
        self.dispatch_scheduled = False
        self.ts_scheduled = False
        for fut in [f for f in self.pub_waiters if f.get_loop() is not loop]:
            self.pub_waiters.remove(fut)
        # A waiter woken on the old loop never runs again: the slot it held is free for the living.
        self.granted = [f for f in self.granted if f.get_loop() is loop]
        self.n_granted = len(self.granted)
        for ref in self.pull_refs:
            obj = ref()
            if obj is not None:
                sub = <Subscription>obj
                if sub.waiter is not None and sub.waiter.get_loop() is not loop:
                    sub.waiter = None
                    self.n_waiting -= 1
        if self.pending:
            self.ts_scheduled = True
            loop.call_soon(self.flush_cb)
        for obj in self.push_subs:
            sub = <Subscription>obj
            if not sub.paused and sub.cursor != self.tail:
                self.schedule_dispatch()
                break

    cdef int follow_running_loop(self) except -1:
        """The bound loop is closed: move the bus to the loop running here, or raise (nothing was written)."""
        loop = _running_loop_or_none()
        if loop is None:
            raise InvalidStateError(
                f"channel {self.name!r}: expected a running event loop for its handlers, but the loop the bus "
                f"was bound to is closed and no loop runs in this thread; nothing was written (publish inside "
                f"kimiha.run(...), where the bus rebinds by itself, or call bus.bind_loop(loop) first)")
        bus = self.bus() if self.bus is not None else None
        if bus is not None:
            bus.bind_loop(loop)         # every channel of the bus moves together
        if self.loop is not loop:
            self._bind(loop, _get_ident())
        return 0

    # -- checks and room ----------------------------------------------------------------------------------------

    cdef int check_payload(self, object payload) except -1:
        if <PyObject*>Py_TYPE(payload) is <PyObject*>self.payload_classes:
            return 0                  # the common case: exactly the channel's one payload class
        if self.payload_classes is None:
            if payload is None:
                raise PayloadTypeError(
                    f"channel {self.label()}: expected a payload, got None; nothing was written")
        elif not isinstance(payload, self.payload_classes) or (self.refuse_bool and type(payload) is bool):
            raise PayloadTypeError(
                f"channel {self.label()}: expected payload of type {_type_name(self.payload_classes)}, "
                f"got {type(payload).__name__}: {_safe_repr(payload, 200)}; nothing was written")
        return 0

    cdef str label(self):
        """The channel's name, and its description when it has one, for messages."""
        if self.description:
            return f'{self.name!r} ("{self.description}")'
        return repr(self.name)

    cdef Py_ssize_t n_subscribers(self):
        return len(self.push_subs) + len(self.pull_refs)

    cdef uint64_t slowest_cursor(self):
        cdef uint64_t low = self.tail
        cdef Subscription sub
        for obj in self.push_subs:
            sub = <Subscription>obj
            if sub.cursor < low:
                low = sub.cursor
        for ref in self.pull_refs:
            obj = ref()
            if obj is not None:
                sub = <Subscription>obj
                if sub.cursor < low:
                    low = sub.cursor
        return low

    cdef bint has_room(self):
        """Whether a write keeps every live subscriber's unread events (always true on LAG channels).

        A slot a woken ``publish_async`` waiter was granted counts as taken until that waiter writes: no
        other publisher (sync, raw, thread-published or newly arrived) can take it in between.
        """
        if not self.block:
            return True
        if self.tail - self.min_cursor + self.n_granted < <uint64_t>self.capacity:
            return True
        self.min_cursor = self.slowest_cursor()
        return self.tail - self.min_cursor + self.n_granted < <uint64_t>self.capacity

    cdef inline void note_backlog(self, uint64_t backlog) noexcept:
        # ``backlog`` is a subscriber's backlog_c(): never above the capacity (a lagged cursor can be
        # further behind, but only ``capacity`` of those events still exist).
        if backlog > self.high_water_mark:
            self.high_water_mark = backlog

    cdef inline Py_ssize_t slot(self, uint64_t seq) noexcept:
        if self.mask:
            return <Py_ssize_t>(seq & self.mask)  # power-of-two ring: no division on the hot path
        return <Py_ssize_t>(seq % <uint64_t>self.capacity)

    # -- writing ------------------------------------------------------------------------------------------------

    cdef int check_thread(self) except -1:
        """A publish from a thread other than the loop's, on a channel whose handlers or waiting readers the loop
        serves: refused (``call_soon`` does not wake a loop from another thread, and an INLINE handler would
        run beside the loop's). A loop that has closed is left to the rebinding that follows."""
        if self.loop is None or self.loop.is_closed():
            return 0
        raise InvalidStateError(
            f"channel {self.name!r}: publish called from thread {PyThread_get_thread_ident()}, but the bus's event "
            f"loop runs in thread {self.loop_tid} and this channel has handlers or waiting readers there; "
            f"nothing was written. From another thread use bus.publish_threadsafe(key, payload), which hands the "
            f"event to the loop's thread in call order")

    cdef Py_ssize_t write(self, object payload, object frame) except -1:
        cdef Py_ssize_t idx
        if (self.push_subs or self.n_waiting) and PyThread_get_thread_ident() != self.loop_tid:
            self.check_thread()
        if self.n_frame_subs and frame is None:
            # A frames subscriber (exporter, journal) reads every slot as msgpack: make the frame now, so a
            # payload that cannot be encoded is refused before anything is written instead of failing a
            # reader later. The frame is made once either way; channels without frames readers skip this.
            return self.write(payload, self.encode_c(payload))
        if not self.inline and not self.dispatch_scheduled and self.push_subs:
            self.schedule_dispatch()  # before the write: when the loop is gone this raises with nothing written
        idx = self.slot(self.tail)
        self.objs[idx] = payload
        if frame is not None:
            self.frames[idx] = frame
            self.framed = True
        elif self.framed and self.frames[idx] is not None:
            self.frames[idx] = None       # an older event's frame: not this event's
        # Frames readers (bridge, journal) carry every event's publish time on, so they get every stamp.
        if self.track_latency and (self.n_frame_subs or self.sampled(self.tail)):
            self.stamps[idx] = now_ns()
        self.tail += 1
        if self.n_waiting:
            self.wake_readers()
        n = len(self.push_subs) + len(self.pull_refs)
        if self.inline and self.push_subs:
            if self.delivering or _inline_depth >= INLINE_DEPTH_C:
                self.deliver_inline()
            elif len(self.push_subs) == 1:
                self.deliver_one(<Subscription>self.push_subs[0], payload)
            else:
                self.deliver_each(self.push_subs, payload)
        return n

    cdef inline bint sampled(self, uint64_t seq) noexcept:
        """Whether the event of sequence ``seq`` is one the latency histogram records (every Nth)."""
        if self.sample_pow2:
            return (seq & self.sample_mask) == 0
        return seq % self.latency_sample == 0

    cdef int deliver_one(self, Subscription sub, object event) except -1:
        """Dispatch.INLINE, the common case: one handler, which has had every event before this one.

        The handler is called straight from C (no budget loop, no exception frame around the call); anything
        else -- a sampled event when the channel tracks latency or the subscription times its handler (the
        Scheduler's do), a paused or closed subscriber, a Handler subclass, a backlog, a frames reader -- takes
        :meth:`deliver_inline`, as does whatever the handler published to this channel.
        """
        global _inline_depth
        cdef uint64_t seq = self.tail - 1
        cdef uint64_t version = self.subs_version
        cdef PyObject* result
        if (sub.cursor != seq or sub.paused or sub.closed or sub.frames or sub.c_handler is not None
                or ((self.track_latency or sub.handler_time is not None) and self.sampled(seq))):
            return self.deliver_inline()
        if self.high_water_mark == 0:
            self.high_water_mark = 1
        sub.cursor = self.tail
        sub.delivered += 1
        self.delivered += 1
        self.inline_direct += 1
        self.delivering = True
        _inline_depth += 1
        if sub.func is not None:
            result = kimiha_call_func(<PyObject*>sub.func, <PyObject*>sub.func_self if sub.func_self is not None
                                      else NULL, <PyObject*>event)
        else:
            result = kimiha_call1(<PyObject*>sub.handler, <PyObject*>event)
        if result is <PyObject*>None:
            Py_XDECREF(result)
        else:
            # A failure or a returned object is handled while the delivery still holds the channel, as the
            # general delivery does: whatever on_error publishes here is only written (it is delivered below,
            # in order), and it counts towards INLINE_DEPTH.
            try:
                if result is NULL:
                    sub.call_failed(event)
                else:
                    sub.check_result(result, event)
            except BaseException:
                # KeyboardInterrupt / SystemExit: what the handler published waits for the loop, and the
                # exception goes on to the publisher.
                self.delivering = False
                _inline_depth -= 1
                if self.tail != sub.cursor or self.subs_version != version:
                    self.defer_inline()
                raise
        self.delivering = False
        _inline_depth -= 1
        if self.tail != sub.cursor or self.subs_version != version:
            # The handler published to this channel, or subscribed or closed a handler: the general delivery
            # gives every subscriber what it has not had, in order.
            self.deliver_inline()
        elif self.block and (self.pub_waiters or self.pending):
            self.reader_advanced()
        return 0

    cdef int deliver_each(self, list subs, object event) except -1:
        """Dispatch.INLINE with several handlers that have all had every event before this one.

        Each is called straight from C in subscription order, as :meth:`deliver_one` calls one (no budget loop,
        no exception frame, no second pass over the subscribers). Anything else, before or after the calls,
        takes :meth:`deliver_inline`: a sampled event that is timed (latency, or a subscriber's handler time), a
        paused, closed, frames or ``Handler`` subscriber, one with a backlog; a handler that published to this
        channel, or subscribed or closed a handler (the list changed: the calls stop there and the general
        delivery, which goes by each cursor, gives everyone what they have not had).
        """
        global _inline_depth
        cdef uint64_t seq = self.tail - 1
        cdef uint64_t version = self.subs_version
        cdef Py_ssize_t n = len(subs)
        cdef Py_ssize_t i
        cdef Subscription sub
        cdef PyObject* result
        cdef bint sampled = self.sampled(seq)
        if sampled and self.track_latency:
            return self.deliver_inline()
        for i in range(n):
            sub = <Subscription>subs[i]
            if (sub.cursor != seq or sub.paused or sub.closed or sub.frames or sub.c_handler is not None
                    or (sampled and sub.handler_time is not None)):
                return self.deliver_inline()
        if self.high_water_mark == 0:
            self.high_water_mark = 1
        i = 0
        self.delivering = True
        _inline_depth += 1
        # The list is the channel's own: a handler that subscribes or closes one changes it (a close and a
        # subscribe leave its length as it was but shift it), and the version says so.
        while i < n and self.subs_version == version:
            sub = <Subscription>subs[i]
            i += 1
            if sub.cursor != seq or sub.paused or sub.closed:
                continue           # an earlier handler paused or closed it: it is not owed this event now
            # The call below is deliver_one's, written out again on purpose: one shared cdef method (inline
            # or not) cost deliver_one 2-3 ns an event (77-80 against 75-77 ns, 3 interleaved pairs).
            sub.cursor = seq + 1
            sub.delivered += 1
            self.delivered += 1
            self.inline_direct += 1
            if sub.func is not None:
                result = kimiha_call_func(<PyObject*>sub.func, <PyObject*>sub.func_self if sub.func_self is not None
                                          else NULL, <PyObject*>event)
            else:
                result = kimiha_call1(<PyObject*>sub.handler, <PyObject*>event)
            if result is <PyObject*>None:
                Py_XDECREF(result)
            else:
                # Handled while the delivery holds the channel, as in deliver_one.
                try:
                    if result is NULL:
                        sub.call_failed(event)
                    else:
                        sub.check_result(result, event)
                except BaseException:
                    # KeyboardInterrupt / SystemExit: the handlers after this one and what was published
                    # meanwhile wait for the loop, and the exception goes on to the publisher.
                    self.delivering = False
                    _inline_depth -= 1
                    if i < n or self.subs_version != version or self.tail != seq + 1:
                        self.defer_inline()
                    raise
        self.delivering = False
        _inline_depth -= 1
        if i < n or self.subs_version != version or self.tail != seq + 1:
            self.deliver_inline()
        elif self.block and (self.pub_waiters or self.pending):
            self.reader_advanced()
        return 0

    cdef int deliver_inline(self) except -1:
        """Dispatch.INLINE: call the handlers now, on the publisher's stack, for every event they have not had.

        Re-entrant publishes to this channel (a handler publishing to its own channel) only write: the delivery
        running below them picks the event up, behind the current one. Publishing to another inline channel
        delivers depth-first, up to ``INLINE_DEPTH`` nested channels; deeper, and past one dispatch budget of
        events, delivery goes to the loop (``inline_deferred``) -- in order either way.
        """
        global _inline_depth
        cdef Subscription sub
        cdef bint more = False
        cdef bint again
        cdef bint done = False
        cdef bint single
        cdef Py_ssize_t rounds = 0
        cdef Py_ssize_t i
        cdef list subs
        if self.delivering:
            return 0
        if _inline_depth >= INLINE_DEPTH_C:
            return self.defer_inline()
        self.delivering = True
        _inline_depth += 1
        subs = self.push_subs
        try:
            single = len(subs) == 1
            if single:
                sub = <Subscription>subs[0]
                more = sub.deliver_push(self.budget)
                # Its handler may have subscribed another handler and then published to this channel: the
                # newcomer has not had that event, and no loop callback is coming for it (an inline write
                # schedules none). The rounds below then run, as for several subscribers.
                single = len(subs) == 1 and subs[0] is sub
            if not single and not more:
                while True:
                    # By index, not over a copy (no allocation per event): a subscription closed by a handler
                    # shifts the list, and whoever it skipped still has a backlog, which the check below sees.
                    i = 0
                    while i < len(subs):
                        if (<Subscription>subs[i]).deliver_push(self.budget):
                            more = True
                        i += 1
                    if more:
                        break
                    # A handler published to this channel while the round ran: the subscribers before it
                    # have not had that event yet.
                    again = False
                    for obj in subs:
                        sub = <Subscription>obj
                        if sub.cursor != self.tail and not sub.paused and not sub.closed:
                            again = True
                            break
                    if not again:
                        break
                    rounds += 1
                    if rounds >= self.budget:
                        more = True
                        break
            done = True
        finally:
            self.delivering = False
            _inline_depth -= 1
            if not done:
                # KeyboardInterrupt / SystemExit from a handler: the events are written, the loop delivers
                # the rest, and the exception goes on to the publisher.
                try:
                    self.defer_inline()
                except Exception:
                    pass
        if more:
            self.defer_inline()
        if self.block and (self.pub_waiters or self.pending):
            self.reader_advanced()
        return 0

    cdef int defer_inline(self) except -1:
        """Leave the rest of an inline delivery to the loop (or, with no loop, to the next publish)."""
        self.inline_deferred += 1
        if self.loop is not None and not self.loop.is_closed():
            self.schedule_dispatch()
        elif _running_loop_or_none() is not None:
            self.follow_running_loop()    # rebinding schedules the delivery of what waits
        return 0

    cdef object encode_c(self, object payload):
        try:
            return self.encoder.encode(payload)
        except Exception as exc:   # TypeError, OverflowError, RecursionError, a failing property...
            self.encode_errors += 1
            raise SerializationError(
                f"channel {self.name!r}: expected a payload msgpack can encode (the channel has "
                f"{self.n_frame_subs} frames subscriber(s), which read every event as a frame), got "
                f"{type(payload).__name__} {_safe_repr(payload, 200)} that cannot be encoded: "
                f"{type(exc).__name__}: {exc}; nothing was written") from None

    cdef Py_ssize_t publish_c(self, object payload) except -1:
        if self.closed:
            raise ChannelClosed(f"channel {self.name!r} is closed; nothing was written")
        self.check_payload(payload)
        if self.block and (self.pub_waiters or not self.has_room()):
            self.full += 1
            raise ChannelFull(
                f"channel {self.name!r} is full: capacity {self.capacity}, the slowest subscriber is "
                f"{self.tail - self.min_cursor} events behind and "
                f"{len(self.pub_waiters) + self.n_granted} publish_async call(s) wait for room ahead of "
                f"this one (first come, first served); nothing was written (publish_async waits for room)")
        return self.write(payload, None)

    def publish(self, payload, /):
        """Write ``payload`` into the ring and return the number of subscribers it reaches.

        Never waits: on a full ``BLOCK`` channel, or while ``publish_async`` calls wait for room there (first
        come, first served), raise ``ChannelFull`` and write nothing. While the channel has frames
        subscribers, a payload that cannot be encoded raises ``SerializationError`` (nothing written).
        """
        return self.publish_c(payload)

    async def publish_async(self, payload, /):
        """Publish ``payload``, waiting for room on a full ``BLOCK`` channel (first come, first served).

        Waiting publishers are served in arrival order, also against ``publish``/``publish_raw``: while one
        waits, those raise ``ChannelFull``, and a slot freed for a waiter stays its own until it writes.
        """
        cdef object frame = None
        if self.closed:
            raise ChannelClosed(f"channel {self.name!r} is closed; nothing was written")
        self.check_payload(payload)
        if not self.block or (not self.pub_waiters and self.has_room()):
            return self.write(payload, None)
        if self.n_frame_subs:
            frame = self.encode_c(payload)      # refuse an unencodable payload before it waits, not after
        await self._wait_turn()
        try:
            return self.write(payload, frame)
        except BaseException:
            if self.pub_waiters:
                self.reader_advanced()           # the slot we waited for is unused: pass it on
            raise

    async def _wait_turn(self):
        """Queue behind the publishers already waiting; return when this one may write (BLOCK channels)."""
        cdef bint woken = False
        self.blocked += 1
        loop = _get_running_loop()
        while True:
            fut = loop.create_future()
            if woken:
                self.pub_waiters.appendleft(fut)  # woken but the room was gone: keep the place in line
            else:
                self.pub_waiters.append(fut)
            try:
                await fut
            except BaseException:
                if fut in self.pub_waiters:
                    self.pub_waiters.remove(fut)
                elif self.release(fut) and not self.closed:
                    self.reader_advanced()       # woken for a slot we will not use: pass it on
                raise
            self.release(fut)
            if self.closed:
                raise ChannelClosed(f"channel {self.name!r} was closed while a publisher waited for room")
            if self.has_room():
                return
            woken = True

    cdef bint release(self, object fut):
        """Give back the slot ``fut``'s waiter was granted; return whether it held one."""
        cdef Py_ssize_t i
        granted = self.granted
        for i in range(len(granted)):
            if granted[i] is fut:
                del granted[i]
                self.n_granted -= 1
                return True
        return False

    cdef int64_t stamp_of(self, object publish_ns) except? -1:
        """Return ``publish_ns`` as a stamp, or raise (counting a bad frame): a header is part of the frame."""
        cdef int64_t ns
        try:
            ns = publish_ns
        except OverflowError:
            self.bad_frames += 1
            raise SerializationError(
                f"channel {self.name!r}: bad frame header: publish_ns expected an int from -2**63 to "
                f"2**63 - 1 (CLOCK_MONOTONIC ns; <= 0 for none), got {publish_ns}; nothing was written") from None
        except TypeError:
            self.bad_frames += 1
            raise PayloadTypeError(
                f"channel {self.name!r}: publish_raw expected publish_ns as an int (CLOCK_MONOTONIC ns), got "
                f"{type(publish_ns).__name__} {publish_ns!r:.100}; nothing was written") from None
        return ns

    cdef object decode_frame(self, object frame):
        """Return ``(payload, frame as bytes)`` for a raw frame, or raise (counting it in ``bad_frames``)."""
        if not isinstance(frame, bytes):
            if isinstance(frame, (bytearray, memoryview)):
                try:
                    frame = bytes(frame)
                except Exception as exc:         # a released memoryview, an unreadable buffer
                    self.bad_frames += 1
                    raise SerializationError(
                        f"channel {self.name!r}: bad frame: expected a readable buffer, got "
                        f"{type(frame).__name__} that cannot be read ({exc}); nothing was written") from None
            else:
                self.bad_frames += 1
                raise PayloadTypeError(
                    f"channel {self.name!r}: publish_raw expected bytes, got {type(frame).__name__}; "
                    f"nothing was written")
        try:
            obj = self.decoder.decode(frame)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            self.bad_frames += 1
            raise SerializationError(
                f"channel {self.name!r}: bad frame of {len(frame)} bytes, expected "
                f"{self._payload_name()}: {exc}; nothing was written") from None
        except Exception as exc:
            # Whatever else decoding bytes from outside raises is a bad frame too: RecursionError for a
            # deeply nested one, or an exception out of a payload's __post_init__.
            self.bad_frames += 1
            raise SerializationError(
                f"channel {self.name!r}: bad frame of {len(frame)} bytes, expected "
                f"{self._payload_name()}: {type(exc).__name__}: {exc}; nothing was written") from None
        if obj is None:
            self.bad_frames += 1
            raise SerializationError(
                f"channel {self.name!r}: frame decodes to nil, expected {self._payload_name()}; "
                f"nothing was written")
        return obj, frame

    cdef void restamp(self, int64_t publish_ns):
        # The event's origin time on this machine's monotonic clock (a bridge passes the sender's): the
        # channel's latency then counts from the original publish, across processes.
        if publish_ns > 0 and self.track_latency:
            self.stamps[self.slot(self.tail - 1)] = publish_ns

    def publish_raw(self, frame, /, publish_ns=0):
        """Validate ``frame`` (a msgpack frame from a bridge or journal) by decoding it, then publish it.

        The frame is kept in the slot, so exporters forward it without re-encoding. ``publish_ns``
        (optional, > 0) is the event's original publish time on this machine's ``CLOCK_MONOTONIC``; the slot
        is stamped with it (0 or less: stamped now).

        Any bytes and any int ``publish_ns`` either publish or are a bad frame: counted in ``bad_frames``,
        ``SerializationError`` raised (undecodable, not the payload type, nil, nested too deep, or
        ``publish_ns`` outside the int64 range), nothing written, and the channel keeps flowing. A frame
        that is not bytes-like, or a ``publish_ns`` that is not an int, is counted too and raises
        ``PayloadTypeError``.
        """
        cdef int64_t ns
        if self.closed:
            raise ChannelClosed(f"channel {self.name!r} is closed; nothing was written")
        ns = self.stamp_of(publish_ns)
        obj, frame = self.decode_frame(frame)
        if self.block and (self.pub_waiters or not self.has_room()):
            self.full += 1
            raise ChannelFull(
                f"channel {self.name!r} is full (capacity {self.capacity}, "
                f"{len(self.pub_waiters) + self.n_granted} publish_async call(s) wait ahead); "
                f"nothing was written")
        n = self.write(obj, frame)
        self.restamp(ns)
        return n

    async def publish_raw_async(self, frame, /, publish_ns=0):
        """Like :meth:`publish_raw`, but wait for room on a full ``BLOCK`` channel instead of raising."""
        cdef int64_t ns
        if self.closed:
            raise ChannelClosed(f"channel {self.name!r} is closed; nothing was written")
        ns = self.stamp_of(publish_ns)
        obj, frame = self.decode_frame(frame)
        if self.block and (self.pub_waiters or not self.has_room()):
            await self._wait_turn()
            try:
                n = self.write(obj, frame)
            except BaseException:
                if self.pub_waiters:
                    self.reader_advanced()
                raise
        else:
            n = self.write(obj, frame)
        self.restamp(ns)
        return n

    def _payload_name(self):
        return "any payload" if self.payload_classes is None else _type_name(self.payload_classes)

    # -- thread-safe publishing ---------------------------------------------------------------------------------

    def publish_threadsafe(self, payload, /):
        """Publish ``payload`` from any thread; it enters the ring on the loop's thread, in call order.

        On a ``BLOCK`` channel whose queue of such payloads is full (``capacity`` waiting), the calling thread
        waits for room; on the loop's own thread that raises ``ChannelFull`` instead. A thread waiting there
        gets ``ChannelClosed`` when the channel closes and ``InvalidStateError`` when the loop closes (nothing
        would make room for it again; what was queued before stays queued for the next loop). A payload the channel's
        frames subscribers cannot encode is dropped when it reaches the ring, counted in ``encode_errors`` and
        logged (the calling thread cannot be told then; on the loop's thread it may raise at once).
        """
        if self.closed:
            raise ChannelClosed(f"channel {self.name!r} is closed; nothing was written")
        self.check_payload(payload)
        loop = self.loop
        if loop is None:
            raise InvalidStateError(
                f"channel {self.name!r}: publish_threadsafe needs the bus bound to a running event loop "
                f"(subscribe inside the loop or call bus.bind_loop() first)")
        on_loop = _get_ident() == self.loop_thread
        if on_loop and not self.pending and self.has_room():
            self.write(payload, None)  # a closed loop is handled there: rebind to the running one, or raise
            return
        if loop.is_closed():
            # Only the thread that ran the closed loop may move the bus to the loop it runs now: a feed
            # thread with a loop of its own must not pull the handlers over to it.
            if not on_loop or _running_loop_or_none() is None:
                raise InvalidStateError(
                    f"channel {self.name!r}: publish_threadsafe expected the bus's event loop to be running, "
                    f"but it is closed; nothing was written (call bus.bind_loop() on the new loop first)")
            self.follow_running_loop()
            loop = self.loop
        if self.block and len(self.pending) >= self.capacity and on_loop:
            self.full += 1
            raise ChannelFull(f"channel {self.name!r} is full (capacity {self.capacity}); nothing was written")
        # Under the lock that close() takes to set `closed` and count what is pending: an event is either
        # queued before that (then published or counted in dropped_on_close) or refused, never queued after it.
        with self.thread_cond:
            if self.block and len(self.pending) >= self.capacity:
                self.blocked += 1
                self.thread_waiters += 1
                try:
                    while len(self.pending) >= self.capacity and not self.closed:
                        # woken by each flush and by close(); the bound only notices a loop that closed
                        # meanwhile (nothing would flush for this publisher again)
                        self.thread_cond.wait(0.1)
                        if len(self.pending) >= self.capacity and not self.closed and loop.is_closed():
                            raise InvalidStateError(
                                f"channel {self.name!r}: the bus's event loop closed while publish_threadsafe "
                                f"waited for room (BLOCK, capacity {self.capacity}, {len(self.pending)} queued); "
                                f"nothing was written")
                finally:
                    self.thread_waiters -= 1
            if self.closed:
                raise ChannelClosed(f"channel {self.name!r} was closed while a publisher waited for room; "
                                    f"nothing was written")
            self.pending.append(payload)
        if not self.ts_scheduled:
            self.ts_scheduled = True
            try:
                loop.call_soon_threadsafe(self.flush_cb)
            except RuntimeError as exc:
                self.ts_scheduled = False
                self.unqueue(payload)
                raise InvalidStateError(
                    f"channel {self.name!r}: publish_threadsafe expected the bus's event loop to be running, "
                    f"but it is closed ({exc}); nothing was written") from None

    cdef int unqueue(self, object payload) except -1:
        # Take back the payload this call queued (the newest one that is this very object).
        cdef Py_ssize_t i
        pending = self.pending
        for i in range(len(pending) - 1, -1, -1):
            if pending[i] is payload:
                del pending[i]
                break
        return 0

    def _flush(self):
        self.ts_scheduled = False
        self.flush_pending()

    cdef int flush_pending(self) except -1:
        pending = self.pending
        while pending:
            if self.block and not self.has_room():
                break
            payload = pending.popleft()
            try:
                self.write(payload, None)
            except SerializationError as exc:
                # Refused for the frames subscribers (counted in encode_errors); the thread that published it
                # cannot be told, so say it here. Its neighbours go on.
                if self.encode_errors <= 10 or self.encode_errors % 1000 == 0:
                    logger.error("publish_threadsafe on channel %r: payload dropped (encode error %d): %s",
                                 self.name, self.encode_errors, exc)
        if self.thread_waiters:
            with self.thread_cond:
                self.thread_cond.notify_all()
        return 0

    # -- waking -------------------------------------------------------------------------------------------------

    cdef int schedule_dispatch(self) except -1:
        if self.dispatch_scheduled:
            return 0
        loop = self.loop
        try:
            loop.call_soon(self.dispatch_cb)
        except RuntimeError:
            if not loop.is_closed():
                raise
            self.follow_running_loop()  # rebinding schedules the dispatch itself when events wait
            if self.dispatch_scheduled:
                return 0
            self.loop.call_soon(self.dispatch_cb)
        self.dispatch_scheduled = True  # only once the callback is really scheduled
        return 0

    cdef void wake_readers(self):
        cdef Subscription sub
        for ref in self.pull_refs:
            obj = ref()
            if obj is None:
                continue
            sub = <Subscription>obj
            if sub.waiter is not None:
                fut = sub.waiter
                sub.waiter = None
                self.n_waiting -= 1
                if not fut.done():
                    try:
                        fut.set_result(None)
                    except RuntimeError:
                        pass  # a reader parked on a loop that has closed since: nobody is left to wake

    cdef int reader_advanced(self) except -1:
        """A cursor moved on a BLOCK channel that has payloads or publishers waiting for room."""
        cdef Py_ssize_t room
        if self.pending:
            self.flush_pending()
        if not self.pub_waiters:
            return 0
        self.min_cursor = self.slowest_cursor()
        room = self.capacity - <Py_ssize_t>(self.tail - self.min_cursor + self.n_granted)
        while room > 0 and self.pub_waiters:
            fut = self.pub_waiters.popleft()
            if not fut.done():
                try:
                    fut.set_result(None)
                except RuntimeError:
                    continue  # a publisher of a loop that has closed since: it will not write
                self.granted.append(fut)  # the slot is that waiter's until it writes or gives up
                self.n_granted += 1
                room -= 1
        return 0

    def _dispatch(self):
        """Loop callback: deliver every ready event to every handler, at most ``budget`` each per call."""
        cdef bint more = False
        cdef Subscription sub
        cdef bint mark = self.inline and not self.delivering
        self.dispatch_scheduled = False
        subs = self.push_subs
        if mark:
            self.delivering = True    # an inline publish from a handler now queues behind this delivery
        try:
            if len(subs) == 1:
                more = (<Subscription>subs[0]).deliver_push(self.budget)
            else:
                for obj in list(subs):
                    if (<Subscription>obj).deliver_push(self.budget):
                        more = True
        except BaseException:
            if mark:
                self.delivering = False
            self.schedule_dispatch()  # KeyboardInterrupt / SystemExit pass through; the rest is still delivered
            raise
        if mark:
            self.delivering = False
            for obj in subs:          # published by a handler during this delivery, after its subscriber ran
                sub = <Subscription>obj
                if sub.cursor != self.tail and not sub.paused and not sub.closed:
                    more = True
        if more:
            self.schedule_dispatch()
        if self.block and (self.pub_waiters or self.pending):
            self.reader_advanced()

    # -- frames -------------------------------------------------------------------------------------------------

    cdef object frame_at(self, Py_ssize_t idx):
        # A frames subscriber only reads slots written after it subscribed, and write() frames every slot
        # while one lives: the encode below is a fallback, not a path that can drop a reader's events.
        frame = self.frames[idx]
        if frame is None:
            try:
                frame = self.encoder.encode(self.objs[idx])
            except (TypeError, msgspec.EncodeError) as exc:
                raise SerializationError(
                    f"channel {self.name!r}: payload {self.objs[idx]!r:.200} cannot be encoded: {exc}") from None
            self.frames[idx] = frame
            self.framed = True
        return frame

    # -- subscribing --------------------------------------------------------------------------------------------

    def subscribe(self, handler=None, *, on_lag=None, on_error=None, bint frames=False, bint paused=False,
                  bint measure=False):
        """Return a :class:`Subscription` that sees every event published from now on.

        With ``handler``, the dispatch loop calls ``handler(event)`` for each event (no coroutine per event);
        without it, pull events with ``recv``/``try_recv``/``async for``/``drain``. A ``paused`` handler
        subscription keeps its place (events wait in the ring) until ``resume()``; ``measure`` records the
        duration of the handler calls on the channel's latency sample (every ``latency_sample``-th event, as the
        latency histogram) in ``handler_time``.

        ``handler``, ``on_lag`` and ``on_error`` are called, never awaited: a coroutine function (``async
        def``, an object with an async ``__call__``, a ``functools.partial`` of one) raises ``TypeError``.
        While a ``frames`` subscription lives, publishing a payload that cannot be encoded raises
        ``SerializationError`` (see :attr:`encode_errors`).
        """
        if self.closed:
            raise ChannelClosed(f"channel {self.name!r} is closed; cannot subscribe")
        for what, fn in (("handler", handler), ("on_lag", on_lag), ("on_error", on_error)):
            if fn is None:
                continue
            if not callable(fn):
                raise TypeError(f"channel {self.name!r}: subscribe {what} must be callable, got {fn!r}")
            if _is_generator_callable(fn):
                raise TypeError(
                    f"channel {self.name!r}: subscribe expected a plain function as {what}, got the generator "
                    f"function {fn!r:.200}: calling it returns a generator and runs none of its body (it has "
                    f"`yield`); make it a plain function (return, not yield)")
            if _is_async_callable(fn):
                if self.inline and what == "handler":
                    raise TypeError(
                        f"channel {self.name!r} is a Dispatch.INLINE channel: publish calls its handlers before "
                        f"it returns, so they must be plain (synchronous) functions; got the coroutine function "
                        f"{fn!r:.200}. Pull from the channel instead (an async EventTask run by the Scheduler, "
                        f"or async for event in bus.subscribe(key)), or make the channel Dispatch.LOOP")
                raise TypeError(
                    f"channel {self.name!r}: subscribe expected a plain (synchronous) {what}, got the coroutine "
                    f"function {fn!r:.200}: {_not_awaited_advice()}")
        if isinstance(handler, Handler):
            for klass in type(handler).__mro__:
                if klass is Handler:
                    break
                if "on_event" in klass.__dict__:
                    raise TypeError(
                        f"channel {self.name!r}: handler {handler!r:.200} is a Handler whose class "
                        f"{klass.__qualname__} defines on_event in Python; the dispatch loop calls the C method "
                        f"(cdef int on_event(self, object event) except -1, overridden in a .pyx), never a Python "
                        f"def, so every event would fail. Override it in Cython, or subscribe a plain callable")
        if handler is not None and (self.loop is None or self.loop.is_closed()):
            raise InvalidStateError(
                f"channel {self.name!r}: a handler subscription needs a running event loop, and the bus is "
                f"{'not bound to one' if self.loop is None else 'bound to a loop that is closed'} "
                f"(subscribe inside kimiha.run(...) or call bus.bind_loop() first)")
        cdef Subscription sub = Subscription.__new__(Subscription)
        sub.channel = self
        sub.cursor = self.tail
        sub.subscribed_at = self.tail
        sub.handler = handler
        if isinstance(handler, Handler):
            sub.c_handler = <Handler>handler
        elif type(handler) is _MethodType and type(handler.__func__) is _FunctionType:
            sub.func = handler.__func__
            sub.func_self = handler.__self__
        elif type(handler) is _FunctionType:
            sub.func = handler
        sub.on_lag = on_lag
        sub.on_error = on_error
        sub.frames = frames
        sub.drain_target = -1
        sub.paused = paused and handler is not None
        if measure and handler is not None:
            sub.handler_time = LatencyHistogram()
        if handler is not None:
            self.push_subs.append(sub)
            self.subs_version += 1
        else:
            self.pull_refs.append(weakref.ref(sub, self._forget_frames if frames else self._forget))
        if frames:
            self.n_frame_subs += 1
        return sub

    def _forget(self, ref):
        self.forget(ref, False)

    def _forget_frames(self, ref):
        self.forget(ref, True)

    cdef int forget(self, object ref, bint frames) except -1:
        # A pull subscription was garbage-collected without close(): drop its cursor so it stalls nobody.
        try:
            self.pull_refs.remove(ref)
        except ValueError:
            return 0                 # closed before: detach() already forgot it
        if frames:
            self.n_frame_subs -= 1
        if self.block and self.loop is not None and (self.pub_waiters or self.pending):
            try:
                self.loop.call_soon_threadsafe(self._reader_advanced_cb)
            except RuntimeError:
                pass
        return 0

    def _reader_advanced_cb(self):
        if self.block:
            self.reader_advanced()

    cdef int detach(self, Subscription sub) except -1:
        cdef Py_ssize_t i
        cdef bint found = False
        if sub.handler is not None:
            try:
                self.push_subs.remove(sub)
                self.subs_version += 1
                found = True
            except ValueError:
                pass
        else:
            for i in range(len(self.pull_refs)):
                if self.pull_refs[i]() is sub:
                    del self.pull_refs[i]
                    found = True
                    break
        if found:
            self.note_backlog(sub.backlog_c())   # its unread events count in the mark even though it leaves
            if sub.frames:
                self.n_frame_subs -= 1
        if self.block and (self.pub_waiters or self.pending):
            self.reader_advanced()
        return 0

    # -- closing and stats --------------------------------------------------------------------------------------

    def close(self):
        """Close the channel: publishing stops; subscribers receive what is left, then ``ChannelClosed``."""
        if self.closed:
            return
        self.flush_pending()
        with self.thread_cond:  # a publish_threadsafe queues under this lock: after it, none can
            self.closed = True
            dropped = len(self.pending)
            self.pending.clear()
            self.thread_cond.notify_all()
        if dropped:
            self.dropped_on_close += dropped
            logger.warning("channel %r closed with %d thread-published event(s) that found no room; dropped",
                           self.name, dropped)
        while self.pub_waiters:
            fut = self.pub_waiters.popleft()
            if not fut.done():
                try:
                    fut.set_result(None)     # the waiter sees `closed` and raises ChannelClosed
                except RuntimeError:
                    pass                     # its loop has closed: nobody is waiting any more
        if self.n_waiting:
            self.wake_readers()

    @property
    def published(self):
        """Number of events published on this channel (the next sequence number)."""
        return self.tail

    @property
    def subscribers(self):
        """Number of live subscriptions."""
        return self.n_subscribers()

    @property
    def pending_threadsafe(self):
        """Payloads from ``publish_threadsafe`` not yet written into the ring."""
        return len(self.pending)

    def subscriptions(self):
        """Return the live subscriptions (handlers first)."""
        out = list(self.push_subs)
        for ref in self.pull_refs:
            obj = ref()
            if obj is not None:
                out.append(obj)
        return out

    def stats(self):
        """Return the channel's counters and latency summary as a dict (a snapshot).

        ``backlog`` is the largest backlog of a live subscriber now; ``high_water_mark`` the largest ever seen
        (when a subscriber received, left, or stats were taken). Both count events still in the ring, so
        neither exceeds ``capacity``: a lagged subscriber's skipped events are in ``lagged``.
        ``encode_errors`` counts payloads refused because the frames subscribers could not encode them.
        """
        cdef uint64_t backlog = 0
        cdef uint64_t b
        subs = self.subscriptions()
        for s in subs:
            b = (<Subscription>s).backlog_c()
            if b > backlog:
                backlog = b
        self.note_backlog(backlog)
        return {
            "channel": self.name,
            "description": self.description,
            "capacity": self.capacity,
            "overflow": "BLOCK" if self.block else "LAG",
            "closed": self.closed,
            "subscribers": len(subs),
            "published": self.tail,
            "delivered": self.delivered,
            "lagged": self.lagged,
            "blocked": self.blocked,
            "full": self.full,
            "high_water_mark": self.high_water_mark,
            "backlog": backlog,
            "bad_frames": self.bad_frames,
            "encode_errors": self.encode_errors,
            "handler_errors": self.handler_errors,
            "pending_threadsafe": len(self.pending),
            "dropped_on_close": self.dropped_on_close,
            "unread_on_close": self.unread_on_close,
            "dispatch": "INLINE" if self.inline else "LOOP",
            "inline_deferred": self.inline_deferred,
            "latency_sample": self.latency_sample,
            "latency_ns": self.latency.summary(),
            "per_subscriber": [(<Subscription>s).stats() for s in subs],
        }


# ---------------------------------------------------------------------------------------------------------------
# An already-resolved awaitable: what recv() / __anext__ return when an event is ready.

@cython.final
@cython.freelist(16)
@cython.no_gc      # holds one event for an instant, never a cycle: not worth the collector's passes
cdef class _Ready:
    cdef object value
    cdef PyObject* stop    # the StopIteration raised again by _ready_iternext (owned reference or NULL)

    def __dealloc__(self):
        Py_XDECREF(self.stop)
        self.stop = NULL

    def __await__(self):
        return self

    def __iter__(self):
        return self

    def __next__(self):  # fallback when am_send is not used (a tracer is active, or CPython < 3.10)
        value = self.value
        self.value = None
        raise StopIteration(value)

    def send(self, arg):
        return self.__next__()

    def throw(self, typ, val=None, tb=None):
        self.value = None
        if val is None:
            raise typ
        raise val

    def close(self):
        self.value = None


cdef PyObject* _take_ready(PyObject* obj) noexcept:
    cdef _Ready ready = <_Ready>obj
    value = ready.value
    ready.value = None
    Py_INCREF(value)
    return <PyObject*>value


cdef PyObject* _ready_iternext(PyObject* obj) noexcept:
    """``tp_iternext``: what ``await`` calls on CPython >= 3.12 (and on 3.11 under a tracer): the value as the
    StopIteration that ends the await, one instance reused (see kimiha_raise_stop)."""
    cdef _Ready ready = <_Ready>obj
    value = ready.value
    ready.value = None
    return kimiha_raise_stop(&ready.stop, <PyObject*>value)


kimiha_install_am_send(<PyTypeObject*>_Ready, _take_ready)
kimiha_install_iternext(<PyTypeObject*>_Ready, _ready_iternext)


cdef inline _Ready _ready(object value):
    cdef _Ready ready = _Ready.__new__(_Ready)
    ready.value = value
    return ready


# ---------------------------------------------------------------------------------------------------------------
# Subscription: one cursor.

cdef class Subscription:
    """A cursor into one channel's ring; sees every event published after it was created.

    Pull events with ``await recv()``, ``try_recv()``, ``async for event in sub``, ``drain()`` or
    ``await recv_batch()``; or let the dispatch loop call a handler (``bus.subscribe(key, handler)``).
    ``Lagged`` is raised once when events were overwritten before this cursor read them (unless an
    ``on_lag`` callback takes the report); ``ChannelClosed`` once everything published before
    ``close()`` was received.
    """

    # Generic in _core.pyi (Subscription[Tick]); this makes the subscript legal at runtime too.
    __class_getitem__ = classmethod(types.GenericAlias)

    def __init__(self):
        raise TypeError("Subscription objects are made by EventBus.subscribe()")

    def __repr__(self):
        kind = "handler" if self.handler is not None else ("frames" if self.frames else "pull")
        state = "closed" if self.closed else f"backlog={self.backlog_c()}"
        return f"<Subscription {kind} of {self.channel.name!r} delivered={self.delivered} {state}>"

    # -- the hot path -------------------------------------------------------------------------------------------

    cdef inline uint64_t backlog_c(self) noexcept:
        """Events published and still in the ring that this cursor has not received (<= capacity)."""
        cdef uint64_t b = self.channel.tail - self.cursor
        cdef uint64_t cap = <uint64_t>self.channel.capacity
        return b if b < cap else cap

    cdef int report_lag(self) except -1:
        cdef Channel ch = self.channel
        cdef uint64_t oldest = ch.tail - <uint64_t>ch.capacity
        cdef uint64_t skipped = oldest - self.cursor
        self.cursor = oldest
        self.lagged += skipped
        ch.lagged += skipped
        if self.on_lag is not None:
            try:
                self.on_lag(skipped)
            except Exception:
                logger.exception("on_lag callback of a subscription to channel %r failed", ch.name)
            return 0
        if self.handler is not None:
            logger.warning("handler %r on channel %s lagged: %d event(s) skipped (overwritten in the ring of %d "
                           "before it ran; a larger capacity or Overflow.BLOCK keeps them)", self.handler,
                           ch.label(), skipped, ch.capacity)
            return 0
        raise Lagged(skipped, ch.name, ch.capacity)

    cdef object next_c(self):
        """Return the next event, ``_EMPTY`` if none is ready; raise ``Lagged`` / ``ChannelClosed``."""
        cdef Channel ch = self.channel
        cdef uint64_t backlog = ch.tail - self.cursor
        cdef Py_ssize_t idx
        cdef object event
        if self.closed:
            raise ChannelClosed(f"subscription to channel {ch.name!r} is closed")
        if backlog == 0:
            if ch.closed:
                raise ChannelClosed(f"channel {ch.name!r} is closed and every event was received")
            return _EMPTY
        if backlog > <uint64_t>ch.capacity:
            self.report_lag()
            backlog = ch.capacity
        ch.note_backlog(backlog)
        idx = ch.slot(self.cursor)
        if ch.track_latency and ch.sampled(self.cursor):
            ch.latency.record_c(now_ns() - ch.stamps[idx])
        self.cursor += 1
        self.delivered += 1
        ch.delivered += 1
        if self.frames:
            event = (self.cursor - 1, ch.stamps[idx], ch.frame_at(idx))
        else:
            event = ch.objs[idx]
        # Only now may the freed slot be refilled by a waiting publisher.
        if ch.block and (ch.pub_waiters or ch.pending):
            ch.reader_advanced()
        return event

    cdef object try_recv_c(self):
        """C API: the next event of a pull subscription, or ``EMPTY``; raise ``Lagged`` / ``ChannelClosed``."""
        if self.handler is not None:
            self.check_pull()
        return self.next_c()

    cdef bint deliver_push(self, Py_ssize_t budget):
        """Call the handler for up to ``budget`` ready events; return whether more are ready.

        Latency and handler time are taken on the channel's sample of events (every ``latency_sample``-th
        sequence number): two clock reads for a sampled event, none for the others.
        """
        cdef Channel ch = self.channel
        cdef Py_ssize_t idx
        cdef Py_ssize_t n = 0
        cdef uint64_t seq
        cdef object handler = self.handler
        cdef object func = self.func
        cdef PyObject* self_ptr = <PyObject*>self.func_self if self.func_self is not None else NULL
        cdef Handler c_handler = self.c_handler
        cdef object event
        cdef PyObject* result
        cdef LatencyHistogram timing = self.handler_time
        cdef int64_t t0 = 0
        cdef bint sample
        cdef bint clocked = ch.track_latency or timing is not None
        if self.paused:
            return False                  # resume() schedules the dispatch again
        ch.note_backlog(self.backlog_c())
        while self.cursor < ch.tail:
            if n >= budget or self.closed:
                return not self.closed
            if ch.tail - self.cursor > <uint64_t>ch.capacity:
                self.report_lag()
            seq = self.cursor
            idx = ch.slot(seq)
            self.cursor = seq + 1
            self.delivered += 1
            ch.delivered += 1
            n += 1
            sample = clocked and ch.sampled(seq)
            if sample:
                t0 = now_ns()
                if ch.track_latency:
                    ch.latency.record_c(t0 - ch.stamps[idx])
            if self.frames or c_handler is not None:
                self.call_guarded(seq, idx)
            else:
                # A plain callable: called straight through vectorcall, with no exception frame set up per
                # event; a failure (NULL) takes the guarded path's handling.
                event = ch.objs[idx]
                if func is not None:
                    result = kimiha_call_func(<PyObject*>func, self_ptr, <PyObject*>event)
                else:
                    result = kimiha_call1(<PyObject*>handler, <PyObject*>event)
                if result is NULL:
                    self.call_failed(event)
                elif result is not <PyObject*>None:
                    self.check_result(result, event)
                else:
                    Py_XDECREF(result)
            if sample and timing is not None:
                timing.record_c(now_ns() - t0)
            if self.paused:
                return False
        return False

    cdef int call_guarded(self, uint64_t seq, Py_ssize_t idx) except -1:
        """Deliver one event to a frames subscriber or a :class:`Handler` (whose ``on_event`` is a C call)."""
        cdef Channel ch = self.channel
        try:
            if self.frames:
                event = (seq, ch.stamps[idx], ch.frame_at(idx))
            else:
                event = ch.objs[idx]
            if self.c_handler is not None:
                self.c_handler.on_event(event)
            else:
                result = self.handler(event)
                if result is not None and isinstance(result, _Unrun):
                    self.handler_returned_coroutine(result, ch.objs[idx])
        except (Exception, _CancelledError) as exc:  # no task cancels a plain call: its own failure
            self.handler_failed(exc, ch.objs[idx])
        return 0

    cdef int call_failed(self, object event) except -1:
        """The handler raised (a raw call returned NULL): isolate an ``Exception``; let the rest go on up."""
        try:
            _raise_pending()
        except (Exception, _CancelledError) as exc:  # no task cancels a plain call: its own failure
            self.handler_failed(exc, event)
        return 0

    cdef int check_result(self, PyObject* result, object event) except -1:
        """A handler returned something (steals ``result``): a coroutine or a generator means a body that never
        ran (an async or generator function slipped past subscribe())."""
        ret = <object>result
        Py_XDECREF(result)
        try:
            unrun = isinstance(ret, _Unrun)
        except Exception as exc:   # a returned object whose class check raises: still the handler's failure
            return self.handler_failed(exc, event)
        if unrun:
            self.handler_returned_coroutine(ret, event)
        return 0

    cdef int handler_failed(self, object exc, object event) except -1:
        self.errors += 1
        self.channel.handler_errors += 1
        if self.on_error is not None:
            try:
                self.on_error(exc, event)
                return 0
            except Exception:
                logger.exception("on_error callback of handler %r on channel %r failed",
                                 self.handler, self.channel.name)
                return 0
        # Text only and rate-limited: a record holding the exception keeps the failing frames alive.
        if self.errors <= 10:
            # The traceback goes in the record's exception text (a JSON line's ``exception`` field), not in
            # the message.
            _log_traceback(logger, _ERROR, exc, "handler %s on channel %r raised on %s (error %d)",
                           _safe_repr(self.handler, 200), self.channel.name, _safe_repr(event, 200), self.errors,
                           extra=_log_fields(channel=self.channel.name))
        elif self.errors % 1000 == 0:
            logger.error("handler %r on channel %r: %r (%d errors so far)", self.handler, self.channel.name,
                         exc, self.errors, extra=_log_fields(channel=self.channel.name))
        return 0

    cdef int handler_returned_coroutine(self, object coro, object event) except -1:
        """The handler returned a coroutine or a generator: its body never ran. Closed and counted."""
        cdef bint generator = isinstance(coro, (types.GeneratorType, types.AsyncGeneratorType))
        if not isinstance(coro, types.AsyncGeneratorType):
            try:
                coro.close()              # never awaited: close it, so it does not warn at collection
            except Exception:
                pass
        name = getattr(coro, '__qualname__', type(coro).__name__)
        if generator:
            exc = TypeError(
                f"handler {self.handler!r:.200} on channel {self.channel.name!r} returned a generator ({name}) "
                f"instead of handling the event: a function with `yield` runs its body only when iterated, so "
                f"none of it ran; make it a plain function (return, not yield)")
        else:
            exc = TypeError(
                f"handler {self.handler!r:.200} on channel {self.channel.name!r} returned a coroutine ({name}) "
                f"instead of handling the event: {_not_awaited_advice()}")
        return self.handler_failed(exc, event)

    cdef object park(self):
        old = self.waiter
        if old is not None:
            if not old.done() and not old.get_loop().is_closed():
                # One waiter slot per cursor: a second reader parking here would leave the first waiting forever
                # (not woken by events, nor by close()).
                raise InvalidStateError(
                    f"subscription to channel {self.channel.name!r} already has a reader waiting (another task "
                    f"awaits recv(), async for or batches() on it); a subscription is one cursor for one reader: "
                    f"subscribe once per reader (each then sees every event)")
            self.waiter = None           # a cancelled reader that has not resumed yet, or one of a closed loop
            self.channel.n_waiting -= 1
        fut = _get_running_loop().create_future()
        self.waiter = fut
        self.channel.n_waiting += 1
        return fut

    cdef void unpark(self, object fut):
        if self.waiter is fut:
            self.waiter = None
            self.channel.n_waiting -= 1

    cdef int check_pull(self) except -1:
        if self.handler is not None:
            raise InvalidStateError(
                f"subscription to channel {self.channel.name!r} delivers to handler {self.handler!r}; "
                f"it cannot be received from")
        return 0

    # -- public receiving ---------------------------------------------------------------------------------------

    def try_recv(self):
        """Return the next event, or ``None`` if none is ready. Raise ``Lagged`` once after a lag."""
        self.check_pull()
        event = self.next_c()
        return None if event is _EMPTY else event

    def recv(self):
        """Return an awaitable of the next event: ``event = await sub.recv()``.

        When an event is ready it is taken now and handed over without a coroutine; otherwise the awaitable
        waits for one. ``Lagged`` / ``ChannelClosed`` may be raised by the call itself.
        """
        cdef object event
        self.check_pull()
        if self.streak < self.channel.budget:
            event = self.next_c()
            if event is not _EMPTY:
                self.streak += 1
                return _ready(event)
        return self._recv(False)

    def __aiter__(self):
        self.check_pull()
        return self

    def __anext__(self):
        cdef object event
        cdef Channel ch = self.channel
        cdef _Ready ready
        if self.streak < ch.budget and self.handler is None:
            if self.closed or (ch.closed and ch.tail == self.cursor):
                raise StopAsyncIteration       # what next_c's ChannelClosed means here, without a try per event
            event = self.next_c()
            if event is not _EMPTY:
                self.streak += 1
                # `async for` awaits each awaitable before it asks for the next: reuse the last one once it
                # was taken (its value is cleared then); otherwise (a caller holding several) make another.
                if self.ready is not None:
                    ready = <_Ready>self.ready
                    if ready.value is None:
                        ready.value = event
                        return ready
                ready = _ready(event)
                self.ready = ready
                return ready
        self.check_pull()      # anext(sub) on a handler subscription: refused, not an event taken from its handler
        return self._recv(True)

    async def _recv(self, bint iterating):
        cdef object event
        if self.streak >= self.channel.budget:
            # A long ready burst still lets timers and I/O run: after ``budget`` events, yield before taking the
            # next one, never while holding one (a cancellation at this await would lose it).
            self.streak = 0
            await _sleep(0)
        while True:
            try:
                event = self.next_c()
            except ChannelClosed:
                if iterating:
                    raise StopAsyncIteration from None
                raise
            if event is not _EMPTY:
                self.streak += 1
                return event
            self.streak = 0
            fut = self.park()
            try:
                await fut
            except BaseException:
                self.unpark(fut)
                raise

    def drain(self, max_events=None):
        """Return every ready event (at most ``max_events``, a positive int, if given) as a list, without waiting.

        Raise ``Lagged`` (once) before returning events that follow a lag, and ``ChannelClosed`` only when
        no event is left.
        """
        self.check_pull()     # a handler subscription is refused first, whatever the limit (as batches() does)
        return self.drain_c(_batch_limit(max_events, "drain", self.channel))

    cdef list drain_c(self, Py_ssize_t max_events):
        """:meth:`drain` with a C limit (-1: every ready event)."""
        self.check_pull()
        cdef Channel ch = self.channel
        event = self.next_c()
        if event is _EMPTY:
            return []
        out = [event]
        while self.cursor < ch.tail and (max_events <= 0 or len(out) < max_events):
            out.append(self.next_c())
        return out

    def batches(self, max_events=None):
        """Return an async iterator of batches: ``async for batch in sub.batches(): ...``.

        Each batch is a non-empty list of every event ready at that moment (at most ``max_events``, a positive
        int, if given),
        handed over without a coroutine when events are ready; iteration ends when the channel is closed and
        everything was received. ``Lagged`` is raised (once) as from :meth:`drain`.
        """
        self.check_pull()
        cdef _Batches it = _Batches.__new__(_Batches)
        it.sub = self
        it.max_events = _batch_limit(max_events, "batches", self.channel)
        return it

    async def recv_batch(self, max_events=None):
        """Wait until at least one event is ready, then return every ready event (at most ``max_events``, a
        positive int, if given)."""
        self.check_pull()
        cdef Py_ssize_t limit = _batch_limit(max_events, "recv_batch", self.channel)
        while True:
            batch = self.drain_c(limit)
            if batch:
                return batch
            fut = self.park()
            try:
                await fut
            except BaseException:
                self.unpark(fut)
                raise

    # -- lifecycle and introspection ----------------------------------------------------------------------------

    async def run_handler(self, handler, on_error, LatencyHistogram timing=None):
        """Await ``handler(event)`` for every event, one at a time, in order, until the subscription closes.

        The compiled pump behind coroutine event handlers: it receives in batches, keeps ``in_hand`` (events
        received but not finished) and ``handled`` up to date, records the duration of the calls on the
        channel's latency sample (every ``latency_sample``-th sequence number, as for sync handlers) in ``timing``,
        and on an exception (or a ``CancelledError`` that is not the pump's own cancellation) calls
        ``on_error(exc, event)``, which may return a delay (seconds) to wait before the next event. It returns once ``cursor`` reaches ``drain_target`` (when set, i.e. >= 0) with nothing
        in hand.
        """
        self.check_pull()
        cdef int64_t t0 = 0
        cdef list batch
        cdef uint64_t seq
        cdef bint sample
        cdef Channel ch = self.channel
        while True:
            try:
                batch = await self.recv_batch()
            except ChannelClosed:
                return
            self.in_hand = len(batch)
            seq = self.cursor - <uint64_t>len(batch)   # the batch is the events just before the cursor
            for event in batch:
                if self.closed:
                    self.in_hand = 0
                    return
                sample = timing is not None and ch.sampled(seq)
                seq += 1
                if sample:
                    t0 = now_ns()
                try:
                    await handler(event)
                except (Exception, _CancelledError) as exc:
                    if isinstance(exc, _CancelledError) and _current_task().cancelling():
                        raise                    # the pump's own cancellation; any other is the handler's failure
                    self.errors += 1
                    delay = on_error(exc, event)
                    if delay:
                        await _sleep(delay)
                else:
                    self.handled += 1
                    if sample:
                        timing.record_c(now_ns() - t0)
                finally:
                    self.in_hand -= 1
            if 0 <= self.drain_target <= <int64_t>self.cursor:
                return

    def pause(self):
        """Stop calling the handler; events keep their place in the ring (and may lag on a LAG channel)."""
        self.paused = True

    def resume(self):
        """Call the handler again, starting with the events that arrived while paused."""
        if self.paused and not self.closed:
            self.paused = False
            if self.handler is not None and self.cursor != self.channel.tail:
                self.channel.schedule_dispatch()

    def close(self):
        """Detach from the channel; a pending ``recv`` raises ``ChannelClosed``. Idempotent.

        Events published after this subscription's cursor that it never received are counted in its
        ``unread_on_close`` and the channel's (still in the ring or already overwritten alike).
        """
        if self.closed:
            return
        self.closed = True
        self.count_unread()
        fut = self.waiter
        if fut is not None:
            self.unpark(fut)
            if not fut.done():
                fut.set_result(None)
        self.channel.detach(self)

    cdef void count_unread(self) noexcept:
        self.unread_on_close = self.channel.tail - self.cursor
        self.channel.unread_on_close += self.unread_on_close

    def __dealloc__(self):
        # A pull subscription dropped without close() (the channel holds it weakly): its unread events count
        # as a close's would. (In a cycle the collector may have cleared `channel` first: nothing to count.)
        if not self.closed and self.channel is not None:
            self.count_unread()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        self.close()

    @property
    def backlog(self):
        """Events published but not yet received by this subscription (capped at the capacity)."""
        return self.backlog_c()

    @property
    def published_since_subscribed(self):
        """Events published on the channel since this subscription was made."""
        return self.channel.tail - self.subscribed_at

    def stats(self):
        """Return this subscription's counters as a dict."""
        return {
            "kind": "handler" if self.handler is not None else ("frames" if self.frames else "pull"),
            "subscribed_at": self.subscribed_at,
            "cursor": self.cursor,
            "delivered": self.delivered,
            "lagged": self.lagged,
            "errors": self.errors,
            "handled": self.handled,
            "backlog": self.backlog,
            "closed": self.closed,
            "unread_on_close": self.unread_on_close,
            "paused": self.paused,
        }


@cython.final
cdef class _Batches:
    """The async iterator of :meth:`Subscription.batches`."""

    cdef Subscription sub
    cdef Py_ssize_t max_events

    def __aiter__(self):
        return self

    cdef list take(self):
        """Every ready event (an empty list: none); ``StopAsyncIteration`` once the channel is done."""
        cdef list batch
        try:
            batch = self.sub.drain_c(self.max_events)
        except ChannelClosed:
            raise StopAsyncIteration from None
        self.sub.streak += len(batch)
        return batch

    def __anext__(self):
        cdef list batch
        if self.sub.streak < self.sub.channel.budget:
            batch = self.take()
            if batch:
                return _ready(batch)
        return self._wait()

    async def _wait(self):
        cdef Subscription sub = self.sub
        cdef list batch
        if sub.streak >= sub.channel.budget:
            sub.streak = 0
            await _sleep(0)          # a long ready stream still lets timers and I/O run
        while True:
            batch = self.take()
            if batch:
                return batch
            sub.streak = 0
            fut = sub.park()
            try:
                await fut
            except BaseException:
                sub.unpark(fut)
                raise


# ---------------------------------------------------------------------------------------------------------------
# The bus: a dict of channels and the lookup-then-delegate entry points.

cdef str _channel_name(object key):
    value = getattr(key, "value", None)
    return value if isinstance(value, str) else str(key)


cdef enum:
    KEY_CACHE = 16      # direct-mapped cache of recent key -> channel lookups (a power of two)


cdef class EventBus:
    """Broadcast channels keyed by :class:`~kimiha.EventType` members.

    Parameters
    ----------
    channels : iterable of (event_type, ChannelConfig)
        The channels to create; a duplicate key is an error.
    dispatch_budget : int
        Most events one handler receives per loop callback before the loop runs timers and I/O again.

    Examples
    --------
    >>> bus = EventBus([(Ev.MARKET_DATA, ChannelConfig(1024))])
    >>> bus.publish(Ev.MARKET_DATA, Tick(price=1.0))
    0

    The class is compiled (not a Python subclass of a compiled base) because CPython specializes a method call
    only when the instance's type is the very type that defines the method: ``bus.publish(Ev.X, e)`` from
    Python then costs one specialized call, and a small identity cache in front of the channel dict makes the
    lookup a pointer compare.
    """

    cdef dict _channels
    cdef object _loop
    cdef object _loop_thread
    cdef Py_ssize_t _budget
    cdef readonly bint closed
    # Borrowed pointers: the dict holds every key and channel for the bus's lifetime (channels are never
    # removed), so an entry is valid while the bus lives.
    cdef PyObject* _cache_keys[KEY_CACHE]
    cdef PyObject* _cache_channels[KEY_CACHE]
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        self._channels = {}
        self._budget = DEFAULT_BUDGET

    def __init__(self, channels=(), *, dispatch_budget=DEFAULT_BUDGET):
        if isinstance(dispatch_budget, bool) or not isinstance(dispatch_budget, int) or dispatch_budget < 1:
            raise InvalidConfigurationError(
                f"EventBus.dispatch_budget: expected an int >= 1, got {dispatch_budget!r}")
        self._budget = dispatch_budget
        if isinstance(channels, dict):
            channels = channels.items()
        for item in channels:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise InvalidConfigurationError(
                    f"EventBus channels: expected (event_type, ChannelConfig) pairs, got {item!r}")
            self.add_channel(*item)

    cdef Channel lookup(self, object key):
        cdef size_t h = (<size_t><PyObject*>key >> 4) & (KEY_CACHE - 1)
        if self._cache_keys[h] == <PyObject*>key:
            return <Channel>self._cache_channels[h]
        return self.lookup_slow(key, h)

    cdef Channel lookup_slow(self, object key, size_t h):
        cdef Channel ch
        try:
            ch = <Channel>self._channels[key]
        except KeyError:
            pass
        except TypeError:
            raise InvalidChannelError(
                f"channel key must be hashable (an EventType member), got {type(key).__name__} {key!r}") from None
        else:
            if ch.key is key:          # only the dict's own key object: it lives as long as the bus
                self._cache_keys[h] = <PyObject*>key
                self._cache_channels[h] = <PyObject*>ch
            return ch
        known = ", ".join([str(k) for k in self._channels]) or "none"
        try:
            hint = self.near_miss(key)
        except Exception:            # a key whose attributes or == raise: the plain message then
            hint = ""
        raise InvalidChannelError(f"unknown channel {key!r}; known channels: {known}{hint}")

    cdef str near_miss(self, object key):
        """Why ``key`` looks like a known key but is not one (the error's hint), or ``""``."""
        for ch in self._channels.values():
            known = (<Channel>ch).key
            if isinstance(key, str) and key == (<Channel>ch).name:
                return (f" ({key!r} is the name of channel {known}: a channel's key is the EventType member "
                        f"itself, not its value)")
            if type(key) is not type(known) and getattr(key, "name", None) == getattr(known, "name", 0) and \
                    type(key).__qualname__ == type(known).__qualname__:
                return (f" ({key!r} is a member of {type(key).__module__}.{type(key).__qualname__}, the channel's "
                        f"key of {type(known).__module__}.{type(known).__qualname__}: the class was defined twice "
                        f"-- a script run as __main__ and also imported, or a reloaded module -- and keys compare "
                        f"by identity; import it from one module)")
            if type(key) is not type(known) and getattr(key, "value", None) == (<Channel>ch).name:
                return (f" ({key!r} has the value that names channel {known}, but is a member of another class; "
                        f"keys compare by identity)")
        return ""

    def _set_budget(self, Py_ssize_t budget):
        self._budget = budget

    def add_channel(self, event_type, config):
        """Create the channel of ``event_type``.

        Raise ``InvalidChannelError`` if the key already has a channel, or if another key's channel has the
        same name (the member's value: two ``EventType`` classes with a ``"MarketData"`` member collide).
        """
        if not isinstance(config, ChannelConfig):
            raise InvalidConfigurationError(
                f"add_channel({event_type!r}): expected a ChannelConfig, got {type(config).__name__} {config!r}")
        try:
            hash(event_type)
        except TypeError:
            raise InvalidChannelError(
                f"channel key must be hashable (an EventType member), got {type(event_type).__name__}") from None
        if event_type is None:
            raise InvalidChannelError("channel key must not be None")
        if self.has_channel(event_type):
            raise InvalidChannelError(
                f"channel {event_type!r} already exists ({self.channel(event_type).capacity} slots); "
                f"a channel is never replaced")
        name = _channel_name(event_type)
        for ch in self._channels.values():
            if (<Channel>ch).name == name:
                raise InvalidChannelError(
                    f"channel {event_type!r} cannot be added: its name {name!r} is already the name of channel "
                    f"{(<Channel>ch).key!r}; channel names must be unique (stats, bridges and journals key "
                    f"channels by name), so give one of the two keys another value")
        return self._add_channel_c(event_type, name, config)

    def _add_channel_c(self, key, str name, config):
        cdef Channel ch
        if self.closed:
            raise ChannelClosed("the bus is closed; cannot add a channel")
        ch = Channel(key, name, config, self._budget)
        ch.bus = weakref.ref(self)     # weak: a dropped bus frees its rings at once, without the cycle collector
        if self._loop is not None:
            ch._bind(self._loop, self._loop_thread)
        self._channels[key] = ch
        return ch

    def has_channel(self, event_type):
        """Whether ``event_type`` has a channel on this bus."""
        try:
            self.lookup(event_type)
        except InvalidChannelError:
            return False
        return True

    @property
    def channels(self):
        """The channel keys, in creation order."""
        return [(<Channel>ch).key for ch in self._channels.values()]

    def _all_channels(self):
        return list(self._channels.values())

    def stats(self, event_type=None):
        """Return one channel's stats dict, or ``{channel name: stats}`` for every channel."""
        if event_type is not None:
            return self.lookup(event_type).stats()
        return {(<Channel>ch).name: (<Channel>ch).stats() for ch in self._channels.values()}

    def format_stats(self):
        """Return the channels' counters and latency as a readable table."""
        header = (
            f"{'channel':<20} {'subs':>4} {'published':>11} {'delivered':>11} {'lagged':>8} "
            f"{'blocked':>7} {'hwm':>6} {'p50 us':>8} {'p99 us':>8} {'max us':>9}")
        lines = [header, "-" * len(header)]
        for ch in self._channels.values():
            st = (<Channel>ch).stats()
            lat = st["latency_ns"]
            lines.append(
                f"{st['channel'][:20]:<20} {st['subscribers']:>4} {st['published']:>11} {st['delivered']:>11} "
                f"{st['lagged']:>8} {st['blocked']:>7} {st['high_water_mark']:>6} {lat['p50'] / 1e3:>8.2f} "
                f"{lat['p99'] / 1e3:>8.2f} {lat['max'] / 1e3:>9.2f}")
        return "\n".join(lines)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        names = ", ".join([(<Channel>ch).name for ch in self._channels.values()])
        return f"<{type(self).__name__} channels=[{names}]{' closed' if self.closed else ''}>"

    def bind_loop(self, loop=None):
        """Attach the bus to ``loop`` (default: the running loop).

        Done implicitly on first use inside a running loop, and again when the loop the bus was bound to has
        closed: handlers then run on the new loop, starting with any event the old loop never delivered.
        """
        if loop is None:
            loop = _get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None and not self._loop.is_closed():
            raise InvalidStateError("the bus is bound to another event loop that is still open")
        self._loop = loop
        self._loop_thread = _get_ident()
        for ch in self._channels.values():
            (<Channel>ch)._bind(loop, self._loop_thread)

    cdef int ensure_loop(self) except -1:
        if self._loop is None:
            try:
                self.bind_loop()
            except RuntimeError:
                pass
        return 0

    cdef int ensure_live_loop(self) except -1:
        """Bind to the running loop when the bus has none yet or the one it had is closed."""
        if self._loop is None or self._loop.is_closed():
            loop = _running_loop_or_none()
            if loop is not None:
                self.bind_loop(loop)
        return 0

    def _channels_list(self):
        return list(self._channels.values())

    def channel(self, event_type, /):
        """Return the :class:`Channel` of ``event_type`` (for a lookup-free ``publish`` in hot loops)."""
        return self.lookup(event_type)

    def publish(self, event_type, payload, /):
        """Publish ``payload`` on ``event_type``'s channel; return the number of subscribers reached.

        Never waits. Raise ``InvalidChannelError`` for an unknown channel, ``PayloadTypeError`` for a payload
        of the wrong type, ``ChannelFull`` on a full ``BLOCK`` channel (or one where ``publish_async`` calls
        wait), ``SerializationError`` for a payload the channel's frames subscribers cannot encode; in each
        case nothing is written.
        """
        return self.lookup(event_type).publish_c(payload)

    def publish_async(self, event_type, payload, /):
        """Publish, waiting for room on a full ``BLOCK`` channel (a coroutine)."""
        cdef Channel ch = self.lookup(event_type)
        self.ensure_loop()
        return ch.publish_async(payload)

    def publish_threadsafe(self, event_type, payload, /):
        """Publish from any thread; the payload enters the ring on the loop's thread, in call order."""
        self.lookup(event_type).publish_threadsafe(payload)

    def publish_raw(self, event_type, frame, /, publish_ns=0):
        """Decode and validate a msgpack ``frame`` against the channel's payload type, then publish it."""
        return self.lookup(event_type).publish_raw(frame, publish_ns)

    def publish_raw_async(self, event_type, frame, /, publish_ns=0):
        """Like :meth:`publish_raw`, waiting for room on a full ``BLOCK`` channel (returns an awaitable)."""
        return self.lookup(event_type).publish_raw_async(frame, publish_ns)

    def subscribe(self, event_type, handler=None, /, *, on_lag=None, on_error=None, bint frames=False,
                  bint paused=False, bint measure=False):
        """Return a :class:`Subscription` to ``event_type`` that sees events published from now on.

        Each call makes a new, independent subscription with its own cursor: the same handler subscribed
        twice is called twice per event (close one subscription to stop that).

        Parameters
        ----------
        handler : callable, optional
            Called by the dispatch loop as ``handler(event)`` for each event, never awaited: a coroutine
            function raises ``TypeError`` here (use an ``EventTask`` run by the Scheduler, or pull with
            ``async for``). Exceptions are counted and passed to ``on_error(exc, event)`` (or logged);
            delivery continues.
        on_lag : callable, optional
            Called as ``on_lag(skipped)`` instead of raising ``Lagged``.
        frames : bool
            Deliver ``(sequence, publish_ns, msgpack_frame)`` tuples instead of decoded payloads. While such
            a subscription lives, every publish makes the frame, so a payload that cannot be encoded is
            refused at publish (``SerializationError``, counted in the channel's ``encode_errors``).
        paused : bool
            Subscribe now (events are kept from this point) but call the handler only after ``resume()``.
        measure : bool
            Record handler call durations (ns) in ``subscription.handler_time``: those of the channel's latency
            sample (every ``ChannelConfig.latency_sample``-th event; 1 = every call).
        """
        cdef Channel ch = self.lookup(event_type)
        self.ensure_live_loop()
        return ch.subscribe(handler, on_lag=on_lag, on_error=on_error, frames=frames, paused=paused,
                            measure=measure)

    def close(self):
        """Close every channel. Subscribers receive what was published before, then ``ChannelClosed``."""
        self.closed = True
        for ch in self._channels.values():
            (<Channel>ch).close()


#: The compiled base of earlier versions, kept as a name for code that imported it.
EventBusCore = EventBus
