"""The channels and events of the Cython strategy example (plain Python: the .pyx imports them)."""

from kimiha import Event, EventType


class Ev(EventType):
    TICKS = "Ticks"
    ORDERS = "Orders"


class Tick(Event, gc=False):
    price: float
    seq: int


class Order(Event, gc=False):
    side: int      # +1 buy, -1 sell
    price: float
    seq: int       # the tick that triggered it
