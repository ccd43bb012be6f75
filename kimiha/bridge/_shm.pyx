# cython: language_level=3, embedsignature=True, boundscheck=False, wraparound=False, cdivision=True
"""A broadcast ring of frames in shared memory: one writer process, many reader processes.

The hot half of :mod:`kimiha.bridge.shm` (which owns the files, locks, wake-ups and tasks). This module only
reads and writes a mapped segment laid out as::

    header    4096 bytes   geometry, writer identity, head (frames written), data head (bytes reserved), flags
    readers   max_readers x 128 bytes: state, pid, cursor (next frame to read), waiting flag, name
    slots     capacity x 32 bytes: seq + 1 of the frame it holds (0: empty, ~0: being written), ts, offset, length
              (length with its top bit set: a hole -- the writer dropped a frame of the low bits' size, no data)
    data      data_size bytes: the frames' bytes, each contiguous (a frame that would wrap starts over at 0)

Ordering is C11 acquire/release (GCC/Clang ``__atomic`` builtins). A reader copies a frame between two reads
of its slot's sequence and a read of the data head (a seqlock): if the writer overwrote the slot or reserved
past the frame's bytes meanwhile, the copy is thrown away and the frame counted as lagged -- so a LAG ring's
lag is exact, and a torn frame is never delivered. A BLOCK writer never overwrites what the slowest attached
reader has not passed (``min_cursor``). The waiting flags are read and written sequentially consistent (the
writer's head store and a reader's "I am going to sleep" store cannot both miss each other).

A frame the writer cannot carry (larger than ``max_frame``) still takes its place in the sequence as a *hole*
(:meth:`Ring.write_hole`), so every reader sees and counts it. A ring built with a file descriptor checks the
file's size (one ``fstat``) before each batch it reads or writes: a file truncated under the mapping raises
``RingTruncated`` (an ``InvalidStateError``) instead of killing the process with SIGBUS at the first touch of
a page past its end (a truncation between that check and the batch's accesses still faults: the check
narrows the window to one batch). The busy-poll spin (:meth:`Ring.spin_until`), which reads the head for up to
its whole bound, runs under a SIGBUS guard instead: a fault there jumps out of the spin (pure C, no Python
object in hand) and raises ``RingTruncated``; every other SIGBUS goes to the handler installed before.

:meth:`Ring.pump` is the readers' batch import: it does what ``Channel.publish_raw`` does (closed and room
checks, decode-to-validate, write, restamp with the writer's publish time) through the C methods
``kimiha/_core.pxd`` declares, with no Python call per frame. Those are internal declarations of the core,
built from the same tree; a public ``Channel.publish_raw_c(frame, publish_ns)`` there would let this module
stop repeating the checks.
"""

from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy, memset
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from posix.stat cimport fstat, struct_stat
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from kimiha._core cimport Channel, LatencyHistogram

from kimiha.error import ChannelClosed, ChannelFull, InvalidStateError


class RingTruncated(InvalidStateError):
    """The ring's file is shorter than its mapping (another process shrank or recreated it)."""

cdef extern from *:
    """
    #include <stdint.h>
    static inline uint64_t kh_load_acq(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline uint64_t kh_load_rlx(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline uint64_t kh_load_sc(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline void kh_store_rel(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline void kh_store_rlx(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
    static inline void kh_store_sc(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    static inline uint64_t kh_xchg(uint64_t *p, uint64_t v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
    static inline void kh_fence_acq(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
    static inline void kh_fence_rel(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
    static inline void kh_fence_sc(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    #include <setjmp.h>
    #include <signal.h>
    #include <string.h>
    #include <time.h>
    #if defined(__x86_64__) || defined(__i386__)
    static inline void kh_relax(void) { __builtin_ia32_pause(); }
    #elif defined(__aarch64__)
    static inline void kh_relax(void) { __asm__ __volatile__("yield"); }
    #else
    static inline void kh_relax(void) { }
    #endif

    /* The busy-poll spin reads the ring's head word for up to tens of microseconds, with no Python object in
       hand. A file truncated under the mapping meanwhile makes that read fault (SIGBUS): the handler below
       jumps back out of the spin (and only out of the spin: kh_spin_jmp is set only while it runs in this
       thread), which then reports the fault; any other SIGBUS goes to the handler that was there before. */
    static __thread sigjmp_buf *kh_spin_jmp = NULL;
    static struct sigaction kh_prev_bus;
    static int kh_bus_installed = 0;

    static void kh_on_sigbus(int sig, siginfo_t *info, void *ctx) {
        sigjmp_buf *jmp = kh_spin_jmp;
        if (jmp != NULL) {
            kh_spin_jmp = NULL;
            siglongjmp(*jmp, 1);
        }
        if (kh_prev_bus.sa_flags & SA_SIGINFO) {
            if (kh_prev_bus.sa_sigaction != NULL) { kh_prev_bus.sa_sigaction(sig, info, ctx); return; }
        } else if (kh_prev_bus.sa_handler != SIG_DFL && kh_prev_bus.sa_handler != SIG_IGN) {
            kh_prev_bus.sa_handler(sig);
            return;
        }
        signal(SIGBUS, SIG_DFL);  /* returning re-runs the faulting access: the default action then */
    }

    static unsigned int kh_bus_calls = 0;

    static int kh_install_bus_guard(void) {
        /* Installed once; looked at again every 4096 spins (a system call: not on every spin) in case another
           handler was installed since, e.g. faulthandler.enable(): ours then goes first again and hands it
           every SIGBUS that is not a spin's. (Meanwhile a spin's fault still reaches ours through it.) */
        struct sigaction sa, cur;
        if (kh_bus_installed && (++kh_bus_calls & 4095) != 0) return 0;
        if (kh_bus_installed && sigaction(SIGBUS, NULL, &cur) == 0 && (cur.sa_flags & SA_SIGINFO)
                && cur.sa_sigaction == kh_on_sigbus) return 0;
        memset(&sa, 0, sizeof(sa));
        sa.sa_sigaction = kh_on_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGBUS, &sa, &kh_prev_bus) != 0) return -1;
        kh_bus_installed = 1;
        return 0;
    }

    /* 1: frames after cursor, 0: none within the deadline (or the stream closed), -1: the mapping faulted */
    static int kh_spin(uint64_t *head, uint64_t *closed, uint64_t cursor, int64_t max_ns) {
        sigjmp_buf jmp;
        volatile int result = 0;
        struct timespec now;
        int64_t deadline;
        int i;
        if (sigsetjmp(jmp, 0) != 0) {
            return -1;
        }
        kh_spin_jmp = &jmp;
        clock_gettime(CLOCK_MONOTONIC, &now);
        deadline = (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
        deadline = max_ns > INT64_MAX - deadline ? INT64_MAX : deadline + max_ns;  /* no overflow */
        for (;;) {
            for (i = 0; i < 64; i++) {
                if (__atomic_load_n(head, __ATOMIC_ACQUIRE) > cursor) { result = 1; break; }
                kh_relax();
            }
            if (result || __atomic_load_n(closed, __ATOMIC_ACQUIRE)) break;
            clock_gettime(CLOCK_MONOTONIC, &now);
            if ((int64_t)now.tv_sec * 1000000000 + now.tv_nsec >= deadline) break;
        }
        kh_spin_jmp = NULL;
        return result;
    }
    """
    uint64_t kh_load_acq(uint64_t *p) nogil
    uint64_t kh_load_rlx(uint64_t *p) nogil
    uint64_t kh_load_sc(uint64_t *p) nogil
    void kh_store_rel(uint64_t *p, uint64_t v) nogil
    void kh_store_rlx(uint64_t *p, uint64_t v) nogil
    void kh_store_sc(uint64_t *p, uint64_t v) nogil
    uint64_t kh_xchg(uint64_t *p, uint64_t v) nogil
    void kh_fence_acq() nogil
    void kh_fence_rel() nogil
    void kh_fence_sc() nogil
    void kh_relax() nogil
    int kh_install_bus_guard() nogil
    int kh_spin(uint64_t *head, uint64_t *closed, uint64_t cursor, int64_t max_ns) nogil

#: "KIMIHASH" little-endian, then the layout version.
cdef uint64_t C_MAGIC = 0x485341484D494B4B
cdef enum:
    C_VERSION = 2
    C_HEADER_SIZE = 4096
    C_READER_SIZE = 128
    C_SLOT_SIZE = 32
    C_NAME_SIZE = 64
    C_SENDER_SIZE = 128

MAGIC = C_MAGIC
VERSION = C_VERSION
HEADER_SIZE = C_HEADER_SIZE
READER_SIZE = C_READER_SIZE
SLOT_SIZE = C_SLOT_SIZE

# header offsets (bytes)
cdef enum:
    H_MAGIC = 0
    H_VERSION = 8
    H_CAPACITY = 16
    H_DATA_SIZE = 24
    H_MAX_READERS = 32
    H_BLOCK = 40
    H_GENERATION = 48
    H_WRITER_PID = 56
    H_CLOSED = 64
    H_LOST = 72
    H_SENDER = 128
    H_HEAD = 512
    H_DATA_HEAD = 576
    H_WRITER_WAITING = 640
    H_WRITES = 704
    # reader slot offsets
    R_STATE = 0
    R_PID = 8
    R_CURSOR = 16
    R_WAITING = 24
    R_LAGGED = 32
    R_NAME = 64

cdef uint64_t BUSY = <uint64_t>0xFFFFFFFFFFFFFFFF
#: A slot's length with this bit set is a hole (see the module doc).
cdef uint64_t HOLE = <uint64_t>1 << 63
cdef enum:
    PEEK_FRAME = 0
    PEEK_GONE = 1
    PEEK_HOLE = 2

ctypedef struct Slot:
    uint64_t seq
    int64_t ts
    uint64_t off
    uint64_t length


def segment_size(uint64_t capacity, uint64_t data_size, uint64_t max_readers):
    """Return the bytes a segment of this geometry takes."""
    return C_HEADER_SIZE + max_readers * C_READER_SIZE + capacity * C_SLOT_SIZE + data_size


cdef inline bint _pow2(uint64_t v):
    return v != 0 and (v & (v - 1)) == 0


def init_segment(buffer, uint64_t capacity, uint64_t data_size, uint64_t max_readers, bint block):
    """Lay out an empty segment in ``buffer`` (zeroed, then the geometry; the magic last)."""
    cdef unsigned char[::1] view = buffer
    if not _pow2(capacity) or not _pow2(data_size) or max_readers < 1:
        raise ValueError(f"shm ring: capacity and data_size must be powers of two and max_readers >= 1, got "
                         f"{capacity}, {data_size}, {max_readers}")
    if <uint64_t>view.shape[0] < segment_size(capacity, data_size, max_readers):
        raise ValueError(f"shm ring: a buffer of {view.shape[0]} bytes is too small for this geometry")
    cdef unsigned char *base = &view[0]
    memset(base, 0, C_HEADER_SIZE + max_readers * C_READER_SIZE + capacity * C_SLOT_SIZE)
    (<uint64_t *>(base + H_VERSION))[0] = C_VERSION
    (<uint64_t *>(base + H_CAPACITY))[0] = capacity
    (<uint64_t *>(base + H_DATA_SIZE))[0] = data_size
    (<uint64_t *>(base + H_MAX_READERS))[0] = max_readers
    (<uint64_t *>(base + H_BLOCK))[0] = 1 if block else 0
    kh_store_rel(<uint64_t *>(base + H_MAGIC), C_MAGIC)


cdef class Ring:
    """A view of a mapped segment: the writer's and the readers' operations (see the module doc)."""

    cdef object _buffer
    cdef unsigned char[::1] _view
    cdef unsigned char *base
    cdef unsigned char *readers
    cdef Slot *slots
    cdef unsigned char *data
    cdef readonly uint64_t capacity
    cdef readonly uint64_t data_size
    cdef readonly uint64_t max_readers
    cdef readonly bint block
    #: The largest frame the ring takes (a quarter of its data area).
    cdef readonly uint64_t max_frame
    cdef uint64_t mask
    cdef uint64_t dmask
    #: The file the buffer maps (-1: none, no size check) and the bytes mapped.
    cdef readonly int fd
    cdef readonly uint64_t length
    #: Whether a reader said it sleeps, as seen right after the last write published the head (the flags are
    #: read after that store, so a reader going to sleep either is seen here or sees the new frames itself):
    #: only then does the writer need :meth:`take_waiting` and its wake-ups.
    cdef readonly bint sleepers
    #: Whether the last ``pump(..., commit=True)`` found the writer waiting for room (it needs a wake-up).
    cdef readonly bint writer_waits

    def __cinit__(self, buffer, int fd=-1):
        self.fd = -1
        self._view = buffer
        self._buffer = buffer
        cdef unsigned char *base = &self._view[0]
        self.base = base
        if self._view.shape[0] < C_HEADER_SIZE or kh_load_acq(<uint64_t *>(base + H_MAGIC)) != C_MAGIC:
            raise ValueError("shm ring: not a kimiha segment (bad magic)")
        version = (<uint64_t *>(base + H_VERSION))[0]
        if version != C_VERSION:
            raise ValueError(f"shm ring: layout version {version}, expected {C_VERSION}")
        self.capacity = (<uint64_t *>(base + H_CAPACITY))[0]
        self.data_size = (<uint64_t *>(base + H_DATA_SIZE))[0]
        self.max_readers = (<uint64_t *>(base + H_MAX_READERS))[0]
        self.block = (<uint64_t *>(base + H_BLOCK))[0] != 0
        cdef uint64_t length = <uint64_t>self._view.shape[0]
        # each term bounded by the buffer first: a corrupt header must not overflow the size check
        if not _pow2(self.capacity) or not _pow2(self.data_size) or not 1 <= self.max_readers <= 4096 or \
                self.capacity > length // C_SLOT_SIZE or self.data_size > length or \
                length < segment_size(self.capacity, self.data_size, self.max_readers):
            raise ValueError(f"shm ring: corrupt geometry in the header (capacity {self.capacity}, data_size "
                             f"{self.data_size}, max_readers {self.max_readers}) for a segment of {length} bytes")
        self.mask = self.capacity - 1
        self.dmask = self.data_size - 1
        self.max_frame = self.data_size // 4
        self.readers = base + C_HEADER_SIZE
        self.slots = <Slot *>(self.readers + self.max_readers * C_READER_SIZE)
        self.data = <unsigned char *>self.slots + self.capacity * C_SLOT_SIZE
        self.length = length
        self.fd = fd
        self._check_file()

    cdef int _check_file(self) except -1:
        """Raise (instead of touching the mapping) if the ring's file is shorter than what is mapped."""
        cdef struct_stat st
        if self.base == NULL:
            raise ValueError("shm ring: released")
        if self.fd < 0:
            return 0
        if fstat(self.fd, &st) != 0:
            raise OSError(f"shm ring: fstat of its file failed")
        if <uint64_t>st.st_size < self.length:
            raise RingTruncated(
                f"shm ring: its file was truncated to {st.st_size} bytes under the mapping, expected "
                f"{self.length} (another process shrank or recreated it); the ring is unusable, nothing more "
                f"is read or written through it")
        return 0

    def check_file(self):
        """Raise ``InvalidStateError`` if the mapped file shrank (see the module doc); else return None."""
        self._check_file()

    def release(self):
        """Drop the buffer (so that its mmap can be closed); the ring is unusable afterwards. The file
        descriptor given at construction stays the caller's to close."""
        self._view = None
        self._buffer = None
        self.base = NULL
        self.fd = -1

    cdef inline uint64_t *_h(self, int off) except NULL:
        if self.base == NULL:
            raise ValueError("shm ring: released")
        return <uint64_t *>(self.base + off)

    cdef inline uint64_t *_r(self, Py_ssize_t idx, int off):
        return <uint64_t *>(self.readers + idx * C_READER_SIZE + off)

    cdef int _check_reader(self, Py_ssize_t idx) except -1:
        if self.base == NULL:
            raise ValueError("shm ring: released")
        if idx < 0 or <uint64_t>idx >= self.max_readers:
            raise IndexError(f"shm ring: reader slot {idx} out of range [0, {self.max_readers})")
        return 0

    # -- header ---------------------------------------------------------------------------------------------

    @property
    def head(self):
        """Frames written so far (the next frame's sequence, 0-based)."""
        self._check_file()
        return kh_load_acq(self._h(H_HEAD))

    @property
    def generation(self):
        self._check_file()
        return kh_load_acq(self._h(H_GENERATION))

    @property
    def writer_pid(self):
        self._check_file()
        return kh_load_acq(self._h(H_WRITER_PID))

    @property
    def closed(self):
        """Whether the writer ended the stream (its last frames stay readable)."""
        self._check_file()
        return kh_load_acq(self._h(H_CLOSED)) != 0

    @property
    def lost(self):
        """Frames the writer lost before writing them (its own ring lagged), cumulative."""
        self._check_file()
        return kh_load_acq(self._h(H_LOST))

    @property
    def sender(self):
        self._check_file()
        self._h(0)
        cdef bytes raw = PyBytes_FromStringAndSize(<char *>(self.base + H_SENDER), C_SENDER_SIZE)
        return raw.rstrip(b"\0").decode("utf-8", "replace")

    def set_writer(self, uint64_t pid, uint64_t generation, str sender):
        """Record a new writer incarnation (its pid, a generation nonce and its sender id); reopen the stream."""
        self._check_file()
        self._h(0)
        cdef bytes raw = sender.encode()[:C_SENDER_SIZE - 1]
        memset(self.base + H_SENDER, 0, C_SENDER_SIZE)
        memcpy(self.base + H_SENDER, PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))
        kh_store_rel(self._h(H_WRITER_PID), pid)
        kh_store_rel(self._h(H_CLOSED), 0)
        kh_store_sc(self._h(H_GENERATION), generation)

    def set_closed(self, bint closed=True):
        self._check_file()
        kh_store_sc(self._h(H_CLOSED), 1 if closed else 0)

    def set_lost(self, uint64_t lost):
        self._check_file()
        kh_store_rel(self._h(H_LOST), lost)

    # -- writer ---------------------------------------------------------------------------------------------

    def min_cursor(self):
        """The cursor of the slowest attached reader (``head`` when none is attached)."""
        self._check_file()
        return self._min_cursor(kh_load_rlx(self._h(H_HEAD)))

    cdef uint64_t _min_cursor(self, uint64_t h):
        cdef uint64_t m = h, c
        cdef Py_ssize_t i
        for i in range(<Py_ssize_t>self.max_readers):
            if kh_load_acq(self._r(i, R_STATE)) == 1:
                c = kh_load_acq(self._r(i, R_CURSOR))
                if c < m:
                    m = c
        return m

    def write(self, list items, Py_ssize_t start=0):
        """Write ``items[start:]`` (``(ring seq, publish_ns, frame bytes)`` tuples) in order, as many as fit.

        Return how many were written. A BLOCK ring stops where it would overwrite what an attached reader has
        not read; a frame over ``max_frame`` bytes stops it too (the caller writes a hole for it,
        :meth:`write_hole`). A ``publish_ns`` of 0 or less is stamped with the time of this call (one clock
        read per batch).
        """
        self._check_file()
        cdef timespec now
        cdef int64_t now_ns = 0
        cdef uint64_t h = kh_load_rlx(self._h(H_HEAD))
        cdef uint64_t dh = kh_load_rlx(self._h(H_DATA_HEAD))
        cdef uint64_t cap = self.capacity, dsize = self.data_size
        cdef uint64_t minc = h, tail, p, ln
        cdef bint block = self.block
        cdef Py_ssize_t i, n = len(items), written = 0
        cdef tuple item
        cdef bytes frame
        cdef int64_t ts
        cdef Slot *slot
        if block:
            minc = self._min_cursor(h)
        try:
            for i in range(start, n):
                item = <tuple?>items[i]
                frame = <bytes?>item[2]  # checked: anything else raises before the ring is touched
                ts = <int64_t>item[1]
                if ts <= 0:
                    if now_ns == 0:
                        clock_gettime(CLOCK_MONOTONIC, &now)
                        now_ns = <int64_t>now.tv_sec * 1000000000 + now.tv_nsec
                    ts = now_ns
                ln = <uint64_t>PyBytes_GET_SIZE(frame)
                if ln > self.max_frame:
                    break
                p = dh
                if (p & self.dmask) + ln > dsize:
                    p += dsize - (p & self.dmask)
                if block:
                    if h - minc >= cap:
                        minc = self._min_cursor(h)  # readers may have moved on since
                        if h - minc >= cap:
                            break
                    tail = self.slots[minc & self.mask].off if minc < h else dh
                    if p + ln - tail > dsize:
                        minc = self._min_cursor(h)
                        tail = self.slots[minc & self.mask].off if minc < h else dh
                        if p + ln - tail > dsize:
                            break
                slot = &self.slots[h & self.mask]
                kh_store_rlx(&slot.seq, BUSY)
                kh_store_rlx(self._h(H_DATA_HEAD), p + ln)  # reserved before the bytes change (the readers' check)
                kh_fence_rel()
                memcpy(self.data + (p & self.dmask), PyBytes_AS_STRING(frame), ln)
                slot.ts = ts
                slot.off = p
                slot.length = ln
                kh_store_rel(&slot.seq, h + 1)
                h += 1
                dh = p + ln
                written += 1
        finally:  # a bad item (TypeError, OverflowError) ends the batch: what was written is published
            if written:
                kh_store_sc(self._h(H_HEAD), h)  # also orders the head before reading the waiting flags
                kh_store_rlx(self._h(H_WRITES), kh_load_rlx(self._h(H_WRITES)) + 1)
                self.sleepers = self._any_sleeper()
        return written

    cdef bint _any_sleeper(self) noexcept:
        cdef Py_ssize_t i
        kh_fence_sc()
        for i in range(<Py_ssize_t>self.max_readers):
            if kh_load_rlx(self._r(i, R_WAITING)):
                return True
        return False

    def write_hole(self, int64_t ts, uint64_t length):
        """Put a hole where a frame of ``length`` bytes the ring cannot carry would go (see the module doc).

        Return False if a BLOCK ring has no free slot now (wait for room, then call again); True once the
        hole is in the sequence -- readers count it as a frame the writer dropped.
        """
        self._check_file()
        cdef uint64_t h = kh_load_rlx(self._h(H_HEAD))
        cdef Slot *slot
        if self.block and h - self._min_cursor(h) >= self.capacity:
            return False
        slot = &self.slots[h & self.mask]
        kh_store_rlx(&slot.seq, BUSY)
        kh_fence_rel()
        slot.ts = ts
        slot.off = kh_load_rlx(self._h(H_DATA_HEAD))  # no bytes reserved: the data head does not move
        slot.length = HOLE | (length & ~HOLE)
        kh_store_rel(&slot.seq, h + 1)
        kh_store_sc(self._h(H_HEAD), h + 1)
        kh_store_rlx(self._h(H_WRITES), kh_load_rlx(self._h(H_WRITES)) + 1)
        self.sleepers = self._any_sleeper()
        return True

    def take_waiting(self):
        """Return the reader slots that said they sleep (clearing their flags): they need a wake-up."""
        self._check_file()
        cdef list out = []
        cdef Py_ssize_t i
        self._h(0)
        kh_fence_sc()
        for i in range(<Py_ssize_t>self.max_readers):
            if kh_load_rlx(self._r(i, R_WAITING)) and kh_xchg(self._r(i, R_WAITING), 0):
                out.append(i)
        self.sleepers = False
        return out

    def set_writer_waiting(self):
        """Say the writer sleeps until a reader moves (readers then wake it); see :meth:`commit`."""
        self._check_file()
        kh_store_sc(self._h(H_WRITER_WAITING), 1)

    def clear_writer_waiting(self):
        self._check_file()
        kh_store_sc(self._h(H_WRITER_WAITING), 0)

    # -- readers --------------------------------------------------------------------------------------------

    def reader(self, Py_ssize_t idx):
        """Return ``(state, pid, cursor, lagged, name)`` of reader slot ``idx``."""
        self._check_file()
        self._check_reader(idx)
        cdef bytes raw = PyBytes_FromStringAndSize(<char *>self._r(idx, R_NAME), C_NAME_SIZE)
        return (kh_load_acq(self._r(idx, R_STATE)), kh_load_acq(self._r(idx, R_PID)),
                kh_load_acq(self._r(idx, R_CURSOR)), kh_load_acq(self._r(idx, R_LAGGED)),
                raw.rstrip(b"\0").decode("utf-8", "replace"))

    def attach(self, Py_ssize_t idx, uint64_t pid, uint64_t cursor, str name):
        """Make slot ``idx`` an attached reader at ``cursor`` (the caller holds the slot's lock)."""
        self._check_file()
        self._check_reader(idx)
        cdef bytes raw = name.encode()[:C_NAME_SIZE - 1]
        memset(self._r(idx, R_NAME), 0, C_NAME_SIZE)
        memcpy(self._r(idx, R_NAME), PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))
        kh_store_rel(self._r(idx, R_PID), pid)
        kh_store_rel(self._r(idx, R_CURSOR), cursor)
        kh_store_rel(self._r(idx, R_WAITING), 0)
        kh_store_sc(self._r(idx, R_STATE), 1)

    def detach(self, Py_ssize_t idx):
        """Take slot ``idx`` out of the writer's accounting (its cursor and name stay, for a resume)."""
        self._check_file()
        self._check_reader(idx)
        kh_store_sc(self._r(idx, R_STATE), 0)
        kh_store_rel(self._r(idx, R_WAITING), 0)

    cdef int _peek(self, uint64_t c, int64_t *ts, uint64_t *off, uint64_t *ln) noexcept:
        """Look at ring position ``c``: PEEK_FRAME (its timestamp, offset and length in ``ts``, ``off``, ``ln``:
        copy it with :meth:`_take`), PEEK_HOLE (the dropped frame's size in ``ln``), or PEEK_GONE if the writer
        overwrote it or is overwriting it (the seqlock check of the module doc)."""
        cdef Slot *slot = &self.slots[c & self.mask]
        cdef uint64_t s1 = kh_load_acq(&slot.seq)
        if s1 != c + 1:  # overwritten (or being overwritten) by a writer that lapped us
            return PEEK_GONE
        ts[0] = slot.ts
        off[0] = slot.off
        ln[0] = slot.length
        if ln[0] & HOLE:
            kh_fence_acq()
            if kh_load_rlx(&slot.seq) != s1:
                return PEEK_GONE
            ln[0] &= ~HOLE
            return PEEK_HOLE
        if ln[0] > self.max_frame or (off[0] & self.dmask) + ln[0] > self.data_size:
            return PEEK_GONE  # torn (the writer is rewriting the slot) or corrupt: never copy past the data area
        return PEEK_FRAME

    cdef object _take(self, uint64_t c, uint64_t off, uint64_t ln):
        """The frame :meth:`_peek` found at ``c`` copied out, or None if the writer overwrote its slot or its
        bytes while it was copied."""
        frame = PyBytes_FromStringAndSize(<char *>(self.data + (off & self.dmask)), ln)
        kh_fence_acq()
        if kh_load_rlx(&self.slots[c & self.mask].seq) != c + 1 or \
                kh_load_rlx(self._h(H_DATA_HEAD)) - off > self.data_size:
            return None
        return frame

    def read(self, Py_ssize_t idx, uint64_t cursor, Py_ssize_t max_frames):
        """Read from ``cursor``: return ``(frames, next cursor, lagged, holes)``, frames a list of
        ``(publish_ns, bytes)``. ``lagged`` counts frames overwritten before they could be read (a LAG ring),
        skipped; they come before the frames returned, which are consecutive (the last is at ``next cursor -
        1``) but for the holes among them: ``holes`` lists ``(position, publish_ns, bytes dropped)`` of the
        frames the writer dropped (:meth:`write_hole`).

        The cursor in shared memory does not move: :meth:`commit` it once the frames are delivered.
        """
        self._check_reader(idx)
        self._check_file()
        cdef uint64_t h = kh_load_acq(self._h(H_HEAD))
        cdef uint64_t c = cursor, lagged = 0, off = 0, ln = 0
        cdef int64_t ts = 0
        cdef list out = [], holes = []
        cdef object frame = None
        cdef int what
        if h > c + self.capacity:
            lagged = h - self.capacity - c
            c = h - self.capacity
        while c < h and <Py_ssize_t>len(out) + <Py_ssize_t>len(holes) < max_frames:
            what = self._peek(c, &ts, &off, &ln)
            if what == PEEK_FRAME:
                frame = self._take(c, off, ln)
                if frame is None:
                    what = PEEK_GONE
            if what == PEEK_GONE:
                if out or holes:
                    break  # the frames returned stay contiguous: the next read counts this one
                lagged += 1
            elif what == PEEK_HOLE:
                holes.append((c, ts, ln))
            else:
                out.append((ts, frame))
            c += 1
        return out, c, lagged, holes

    def pump(self, Py_ssize_t idx, uint64_t cursor, Py_ssize_t max_frames, Channel channel,
             LatencyHistogram latency=None, bint commit=False):
        """Publish the frames from ``cursor`` on into ``channel``, all in C: the compiled batch import.

        Each frame is copied out, validated by the channel's decoder (a bad one is counted in the channel's
        ``bad_frames``, like ``publish_raw``) and written into the channel with its original publish time; if
        ``latency`` is given, ``now - publish_ns`` is recorded for each stamped frame.

        Return ``(next cursor, lagged, delivered, holes, failed)``. ``lagged`` and ``holes`` are as in
        :meth:`read` (``holes`` None when there are none). ``failed`` is None, or ``(exception, publish_ns,
        frame)`` of the frame at ``next cursor`` that could not be published (the channel is full --
        ``ChannelFull`` --, closed, or refused the frame); the round stops there and the caller decides (wait
        for room, or count it as bad and go on).

        With ``commit``, the reader's progress (``next cursor``, and ``lagged``) is also published, as
        :meth:`commit` does, when it moved: one call (one check of the file) per round instead of two.
        :attr:`writer_waits` then says whether the writer waits for room (wake it).
        """
        self._check_reader(idx)
        self._check_file()
        self.writer_waits = False
        cdef tuple out = self._pump(idx, cursor, max_frames, channel, latency)
        if commit and (<uint64_t>out[0] != cursor or <uint64_t>out[1]):
            self._commit_c(idx, <uint64_t>out[0], <uint64_t>out[1])
        return out

    cdef tuple _pump(self, Py_ssize_t idx, uint64_t cursor, Py_ssize_t max_frames, Channel channel,
                     LatencyHistogram latency):
        cdef uint64_t h = kh_load_acq(self._h(H_HEAD))
        cdef uint64_t c = cursor, lagged = 0, off = 0, ln = 0
        cdef int64_t ts = 0
        cdef object frame = None, decoded
        cdef list holes = None
        cdef Py_ssize_t n = 0, seen = 0
        cdef timespec now
        cdef int what
        if h > c + self.capacity:
            lagged = h - self.capacity - c
            c = h - self.capacity
        while c < h and seen < max_frames:
            # peek + take written out here and in read(): a shared cdef helper returning the frame measured
            # 1.25x slower on this loop (benchmarks/README.md, the reader's path alone)
            what = self._peek(c, &ts, &off, &ln)
            if what == PEEK_FRAME:
                frame = self._take(c, off, ln)
                if frame is None:
                    what = PEEK_GONE
            if what == PEEK_GONE:
                if seen:
                    break
                lagged += 1
                c += 1
                continue
            seen += 1
            if what == PEEK_HOLE:
                if holes is None:
                    holes = []
                holes.append((c, ts, ln))
                c += 1
                continue
            # what Channel.publish_raw does, through the core's C methods (see the module doc of shm.py)
            if channel.closed:
                return c, lagged, n, holes, (ChannelClosed(f"channel {channel.name!r} is closed; nothing was "
                                                           f"written"), ts, frame)
            if channel.block and (channel.pub_waiters or not channel.has_room()):
                channel.full += 1
                return c, lagged, n, holes, (ChannelFull(f"channel {channel.name!r} is full (capacity "
                                                         f"{channel.capacity})"), ts, frame)
            try:
                decoded = channel.decode_frame(frame)
                channel.write((<tuple>decoded)[0], (<tuple>decoded)[1])
            except Exception as exc:
                return c, lagged, n, holes, (exc, ts, frame)
            channel.restamp(ts)
            n += 1
            c += 1
            if ts > 0 and latency is not None:
                clock_gettime(CLOCK_MONOTONIC, &now)
                latency.record_c(<int64_t>now.tv_sec * 1000000000 + now.tv_nsec - ts)
        return c, lagged, n, holes, None

    def commit(self, Py_ssize_t idx, uint64_t cursor, uint64_t lagged=0):
        """Publish reader ``idx``'s progress; return True if the writer sleeps waiting for room (wake it)."""
        self._check_file()
        self._check_reader(idx)
        return self._commit_c(idx, cursor, lagged)

    cdef bint _commit_c(self, Py_ssize_t idx, uint64_t cursor, uint64_t lagged) noexcept:
        if lagged:
            kh_store_rel(self._r(idx, R_LAGGED), kh_load_rlx(self._r(idx, R_LAGGED)) + lagged)
        kh_store_sc(self._r(idx, R_CURSOR), cursor)
        self.writer_waits = kh_load_sc(self._h(H_WRITER_WAITING)) != 0 and kh_xchg(self._h(H_WRITER_WAITING), 0) != 0
        return self.writer_waits

    def spin_until(self, uint64_t cursor, int64_t max_ns):
        """Spin (a CPU pause between checks, the GIL released) until frames after ``cursor`` are written, the
        stream closes, or ``max_ns`` pass; return whether frames are there. The busy-poll reader's wait: no
        system call and no pass of the event loop between a write and its discovery. A file truncated under
        the mapping during the spin raises ``RingTruncated`` (the fault is caught: the spin holds no Python
        object, nothing is left half done), as every other call does."""
        if self.base == NULL:
            raise ValueError("shm ring: released")
        cdef uint64_t *head = self._h(H_HEAD)
        cdef uint64_t *closed = self._h(H_CLOSED)
        cdef int got
        if max_ns < 0:
            max_ns = 0
        if self.fd >= 0 and kh_install_bus_guard() != 0:
            raise OSError("shm ring: could not install the SIGBUS guard of the busy-poll spin")
        with nogil:
            got = kh_spin(head, closed, cursor, max_ns)
        if got < 0:
            self._check_file()        # raises RingTruncated
            raise RingTruncated("shm ring: its mapping faulted during the busy-poll spin (the file shrank); the "
                                "ring is unusable, nothing more is read or written through it")
        return got == 1

    def sleep_if_idle(self, Py_ssize_t idx, uint64_t cursor):
        """Set reader ``idx``'s waiting flag unless frames after ``cursor`` are there; return whether it is set
        (then wait for the wake-up). Checked after the flag is set, so a frame written meanwhile is seen."""
        self._check_reader(idx)
        self._check_file()
        kh_store_sc(self._r(idx, R_WAITING), 1)
        if kh_load_sc(self._h(H_HEAD)) > cursor or kh_load_sc(self._h(H_CLOSED)):
            kh_store_sc(self._r(idx, R_WAITING), 0)
            return False
        return True

    def clear_waiting(self, Py_ssize_t idx):
        self._check_file()
        self._check_reader(idx)
        kh_store_sc(self._r(idx, R_WAITING), 0)
