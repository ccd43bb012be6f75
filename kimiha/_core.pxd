# cython: language_level=3
# C-level declarations of kimiha's compiled core. Bodies live in _core.pyx.
#
# Public C API (for user Cython: ``from kimiha._core cimport Channel, Subscription, Handler, Empty``). These
# names and signatures are a promise kept across minor versions; every other declaration in this file is an
# internal detail the wheel ships only because Cython needs it to lay the classes out, and may change.
#
#   Channel.publish_c(payload) -> Py_ssize_t      publish one payload (the same checks as Channel.publish),
#                                                 return the subscribers reached; raises like publish.
#   Subscription.try_recv_c() -> object           the next event of a pull subscription, or the EMPTY marker
#                                                 when none is ready; raises Lagged / ChannelClosed.
#   Empty                                         the marker's type: ``isinstance(ev, Empty)`` is a C type
#                                                 check (``ev is kimiha._core.EMPTY`` from Python).
#   Handler.on_event(event) -> int except -1      subclass Handler in Cython and override on_event; subscribe
#                                                 an instance (bus.subscribe(key, handler)) and the dispatch
#                                                 loop (and an INLINE publish) calls on_event through the C
#                                                 vtable, with no Python call. Exceptions it raises are
#                                                 isolated and counted like any handler's.
# See examples/cython_strategy/ for a strategy built on them.

cimport cython
from cpython.object cimport PyObject
from libc.stdint cimport int64_t, uint64_t


cdef class Handler:
    cdef int on_event(self, object event) except -1


@cython.final
cdef class Empty:
    pass


@cython.final
cdef class LatencyHistogram:
    cdef uint64_t* counts
    cdef readonly uint64_t count
    cdef readonly int64_t min
    cdef readonly int64_t max
    cdef double total

    cdef inline void record_c(self, int64_t value) noexcept nogil


cdef class Subscription


@cython.final
cdef class Channel:
    cdef readonly object key
    cdef readonly str name
    cdef readonly str description
    cdef readonly Py_ssize_t capacity
    cdef uint64_t mask                 # capacity - 1 when capacity is a power of two, else 0
    cdef readonly bint block
    cdef readonly bint track_latency
    cdef readonly bint inline          # Dispatch.INLINE: publish calls the handlers before it returns
    cdef bint delivering               # an inline delivery of this channel runs (re-entrant publish queues)
    cdef readonly uint64_t latency_sample   # stamp and record every Nth event (1: every event)
    cdef uint64_t sample_mask          # latency_sample - 1 when it is a power of two
    cdef bint sample_pow2
    cdef readonly uint64_t inline_deferred  # hand-overs of an inline delivery to the loop (depth or budget reached)
    cdef readonly bint closed
    cdef readonly object payload_type
    cdef object payload_classes        # tuple of classes, or None for any payload
    cdef object decoder
    cdef object encoder
    cdef list objs                     # decoded payload per slot
    cdef list frames                   # encoded frame per slot, or None until somebody asks
    cdef bint framed                   # some slot has held a frame (else every frames[i] is None)
    cdef int64_t* stamps               # publish time per slot (monotonic ns)
    cdef uint64_t tail                 # sequence of the next event; == published count
    cdef uint64_t min_cursor           # lower bound of the slowest live cursor (BLOCK room check)
    cdef list push_subs                # subscriptions with a handler, held strongly
    cdef list pull_refs                # weak references to pull subscriptions
    cdef Py_ssize_t n_waiting          # pull subscriptions parked on a waiter future
    cdef Py_ssize_t n_frame_subs       # live frames=True subscriptions: while > 0, every write makes its frame
    cdef object pub_waiters            # deque of futures of publish_async calls waiting for room
    cdef list granted                  # futures of waiters woken for room, not written yet: each holds a slot
    cdef uint64_t n_granted            # len(granted), for the room check
    cdef object pending                # deque of payloads from publish_threadsafe, not yet in the ring
    cdef object thread_cond            # threads wait here when a BLOCK channel's pending queue is full
    cdef Py_ssize_t thread_waiters
    cdef bint ts_scheduled
    cdef bint dispatch_scheduled
    cdef object loop
    cdef object loop_thread
    cdef unsigned long loop_tid       # loop_thread as a C value (the thread check of write())
    cdef object bus                    # weak reference to the EventBusCore that owns it (rebinds them all)
    cdef object dispatch_cb
    cdef object flush_cb
    cdef Py_ssize_t budget
    cdef readonly LatencyHistogram latency
    # counters
    cdef readonly uint64_t delivered
    cdef readonly uint64_t lagged
    cdef readonly uint64_t blocked
    cdef readonly uint64_t full
    cdef readonly uint64_t high_water_mark
    cdef readonly uint64_t bad_frames
    cdef readonly uint64_t encode_errors
    cdef readonly uint64_t handler_errors
    cdef readonly uint64_t dropped_on_close
    cdef readonly uint64_t unread_on_close   # events subscriptions left unread when they were closed
    cdef bint refuse_bool              # the payload types take an int but not a bool (msgspec would not decode it)
    cdef readonly uint64_t inline_direct  # handler calls made straight by deliver_one / deliver_each (diagnostic)
    cdef uint64_t subs_version         # bumped by every change to push_subs (the fast paths' list check)

    cdef int check_payload(self, object payload) except -1
    cdef bint has_room(self)
    cdef inline void note_backlog(self, uint64_t backlog) noexcept
    cdef uint64_t slowest_cursor(self)
    cdef Py_ssize_t n_subscribers(self)
    cdef str label(self)
    cdef int check_thread(self) except -1
    cdef Py_ssize_t write(self, object payload, object frame) except -1
    cdef object encode_c(self, object payload)
    cdef int64_t stamp_of(self, object publish_ns) except? -1
    cdef object decode_frame(self, object frame)
    cdef bint release(self, object fut)
    cdef void restamp(self, int64_t publish_ns)
    cdef Py_ssize_t publish_c(self, object payload) except -1
    cdef inline bint sampled(self, uint64_t seq) noexcept
    cdef int deliver_one(self, Subscription sub, object event) except -1
    cdef int deliver_each(self, list subs, object event) except -1
    cdef int deliver_inline(self) except -1
    cdef int defer_inline(self) except -1
    cdef int schedule_dispatch(self) except -1
    cdef int follow_running_loop(self) except -1
    cdef void wake_readers(self)
    cdef int reader_advanced(self) except -1
    cdef int flush_pending(self) except -1
    cdef int unqueue(self, object payload) except -1
    cdef int detach(self, Subscription sub) except -1
    cdef int forget(self, object ref, bint frames) except -1
    cdef inline Py_ssize_t slot(self, uint64_t seq) noexcept
    cdef object frame_at(self, Py_ssize_t idx)


@cython.final
cdef class Subscription:
    cdef readonly Channel channel
    cdef readonly uint64_t cursor
    cdef readonly uint64_t delivered
    cdef readonly uint64_t lagged
    cdef readonly uint64_t errors
    cdef readonly uint64_t subscribed_at
    cdef readonly bint frames
    cdef readonly object handler
    cdef Handler c_handler             # handler when it is a Handler: on_event is called through the vtable
    cdef object func                   # handler's Python function (itself, or the function of a bound method)
    cdef object func_self              # the bound method's self, or None
    cdef object on_lag
    cdef object on_error
    cdef object waiter
    cdef readonly bint closed
    cdef readonly bint paused
    cdef readonly LatencyHistogram handler_time
    cdef public uint64_t handled          # events a handler pump finished without an exception
    cdef public Py_ssize_t in_hand        # events a pump received and has not finished yet
    cdef public int64_t drain_target      # a pump returns once its cursor reaches this (-1: never)
    cdef Py_ssize_t streak
    cdef object ready                  # the _Ready that __anext__ hands out again once it was taken
    cdef readonly uint64_t unread_on_close   # events after the cursor when it was closed (never received)
    cdef object __weakref__

    cdef inline uint64_t backlog_c(self) noexcept
    cdef object next_c(self)
    cdef object try_recv_c(self)
    cdef int report_lag(self) except -1
    cdef bint deliver_push(self, Py_ssize_t budget)
    cdef int call_guarded(self, uint64_t seq, Py_ssize_t idx) except -1
    cdef int call_failed(self, object event) except -1
    cdef int check_result(self, PyObject* result, object event) except -1
    cdef int handler_failed(self, object exc, object event) except -1
    cdef int handler_returned_coroutine(self, object coro, object event) except -1
    cdef int check_pull(self) except -1
    cdef object park(self)
    cdef list drain_c(self, Py_ssize_t max_events)
    cdef void count_unread(self) noexcept
    cdef void unpark(self, object fut)
