# cython: language_level=3, boundscheck=False, wraparound=False
"""A mean-reversion strategy written against kimiha's C API (see ``kimiha/_core.pxd``, "Public C API").

``BandStrategy`` is a :class:`kimiha._core.Handler`: the dispatch loop (or an INLINE publish) calls its
``cdef on_event`` through the C vtable, with no Python call. It keeps an exponential moving average of the
tick price in a C double and publishes an ``Order`` with ``Channel.publish_c`` when the price leaves a band
around it. ``drain_orders`` reads a pull subscription with ``Subscription.try_recv_c`` and the ``Empty``
marker; ``publish_ticks`` is a producer loop that publishes from C.
"""

from kimiha._core cimport Channel, Empty, Handler, Subscription

from strategy_events import Order


cdef class BandStrategy(Handler):
    """Buy below ``mean - band``, sell above ``mean + band``; at most one open side at a time."""

    cdef Channel orders
    cdef double alpha
    cdef double band
    cdef double mean
    cdef int side
    cdef readonly long seen
    cdef readonly long sent

    def __init__(self, Channel orders not None, double alpha=0.05, double band=0.5):
        self.orders = orders
        self.alpha = alpha
        self.band = band
        self.mean = 0.0
        self.side = 0
        self.seen = 0
        self.sent = 0

    cdef int on_event(self, object event) except -1:
        cdef double price = event.price
        cdef int want = 0
        self.seen += 1
        if self.seen == 1:
            self.mean = price
            return 0
        if price < self.mean - self.band:
            want = 1
        elif price > self.mean + self.band:
            want = -1
        self.mean += self.alpha * (price - self.mean)
        if want != 0 and want != self.side:
            self.side = want
            self.orders.publish_c(Order(want, price, event.seq))
            self.sent += 1
        return 0


def publish_ticks(Channel ticks not None, list events):
    """Publish every event of ``events`` on ``ticks`` from C; return how many subscribers the last reached."""
    cdef Py_ssize_t reached = 0
    for e in events:
        reached = ticks.publish_c(e)
    return reached


def drain_orders(Subscription sub not None):
    """Return every order ready on the pull subscription ``sub`` (``try_recv_c`` until the ``EMPTY`` marker)."""
    cdef list out = []
    cdef object ev
    while True:
        ev = sub.try_recv_c()
        if isinstance(ev, Empty):
            return out
        out.append(ev)
