"""The same strategy as ``strategy.pyx`` in plain Python: the yardstick of the example's test and benchmark."""

from __future__ import annotations

from kimiha import Channel

from strategy_events import Order, Tick


class PyBandStrategy:
    """Buy below ``mean - band``, sell above ``mean + band`` (the arithmetic of ``BandStrategy``, in Python)."""

    def __init__(self, orders: Channel[Order], alpha: float = 0.05, band: float = 0.5) -> None:
        self.orders = orders
        self.alpha = alpha
        self.band = band
        self.mean = 0.0
        self.side = 0
        self.seen = 0
        self.sent = 0

    def __call__(self, event: Tick) -> None:
        price = event.price
        self.seen += 1
        if self.seen == 1:
            self.mean = price
            return
        want = 0
        if price < self.mean - self.band:
            want = 1
        elif price > self.mean + self.band:
            want = -1
        self.mean += self.alpha * (price - self.mean)
        if want != 0 and want != self.side:
            self.side = want
            self.orders.publish(Order(want, price, event.seq))
            self.sent += 1


def make_ticks(n: int, seed: int = 7) -> list[Tick]:
    """Return ``n`` ticks of a seeded random walk around 100."""
    import random

    rng = random.Random(seed)
    price = 100.0
    ticks = []
    for i in range(n):
        price += rng.gauss(0.0, 0.3)
        ticks.append(Tick(round(price, 4), i))
    return ticks
