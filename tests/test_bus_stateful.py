"""Hypothesis stateful test: publish / subscribe / receive / drain / close interleavings against a model.

The model is a plain-Python broadcast ring: a list of every published event, one cursor per subscriber, and
the two overflow rules written the simplest way (LAG: a cursor older than ``tail - capacity`` jumps there and
reports the jump; BLOCK: a publish that would overwrite an unread event is refused).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, rule

from kimiha import (
    ChannelClosed,
    ChannelConfig,
    ChannelFull,
    Event,
    EventBus,
    EventType,
    Lagged,
    Overflow,
)


class Ev(EventType):
    MD = "MarketData"


class Tick(Event):
    seq: int


class ModelSub:
    def __init__(self, cursor: int) -> None:
        self.cursor = cursor
        self.closed = False
        self.delivered = 0
        self.lagged = 0


class BusMachine(RuleBasedStateMachine):
    subs = Bundle("subs")

    @initialize(capacity=st.integers(1, 6), block=st.booleans())
    def setup(self, capacity: int, block: bool) -> None:
        self.capacity = capacity
        self.block = block
        overflow = Overflow.BLOCK if block else Overflow.LAG
        self.bus = EventBus([(Ev.MD, ChannelConfig(capacity, overflow=overflow, payload_type=Tick))])
        self.published: list[int] = []
        self.model: dict[int, ModelSub] = {}
        self.real: dict[int, object] = {}
        self.closed = False
        self.next_id = 0
        self.unread_on_close = 0  # events the closed subscriptions never received (the model's count)

    # -- model helpers ----------------------------------------------------------------------------------------

    def model_full(self) -> bool:
        live = [m for m in self.model.values() if not m.closed]
        tail = len(self.published)
        return self.block and any(tail - m.cursor >= self.capacity for m in live)

    def model_next(self, m: ModelSub):
        """Return ("event", seq) | ("lagged", n) | ("none",) | ("closed",) like try_recv would."""
        tail = len(self.published)
        if m.closed:
            return ("closed",)
        if m.cursor == tail:
            return ("closed",) if self.closed else ("none",)
        oldest = tail - self.capacity
        if m.cursor < oldest:
            n = oldest - m.cursor
            m.cursor = oldest
            m.lagged += n
            return ("lagged", n)
        seq = self.published[m.cursor]
        m.cursor += 1
        m.delivered += 1
        return ("event", seq)

    # -- rules ------------------------------------------------------------------------------------------------

    @rule(data=st.data())
    def publish(self, data) -> None:
        seq = len(self.published)
        if self.closed:
            try:
                self.bus.publish(Ev.MD, Tick(seq))
            except ChannelClosed:
                return
            raise AssertionError("publish after close must raise ChannelClosed")
        if self.model_full():
            try:
                self.bus.publish(Ev.MD, Tick(seq))
            except ChannelFull:
                return
            raise AssertionError("BLOCK channel accepted an event that would overwrite an unread one")
        reached = self.bus.publish(Ev.MD, Tick(seq))
        assert reached == sum(1 for m in self.model.values() if not m.closed)
        self.published.append(seq)

    @rule(target=subs)
    def subscribe(self):
        sid = self.next_id
        self.next_id += 1
        if self.closed:
            try:
                self.bus.subscribe(Ev.MD)
            except ChannelClosed:
                return sid
            raise AssertionError("subscribe after close must raise ChannelClosed")
        self.real[sid] = self.bus.subscribe(Ev.MD)
        self.model[sid] = ModelSub(len(self.published))
        return sid

    @rule(sid=subs)
    def try_recv(self, sid: int) -> None:
        if sid not in self.model:
            return
        m, sub = self.model[sid], self.real[sid]
        expected = self.model_next(m)
        try:
            got = sub.try_recv()
        except Lagged as lag:
            assert expected == ("lagged", lag.skipped)
            return
        except ChannelClosed:
            assert expected == ("closed",)
            return
        if got is None:
            assert expected == ("none",)
        else:
            assert expected == ("event", got.seq)

    @rule(sid=subs, limit=st.one_of(st.none(), st.integers(1, 8)))
    def drain(self, sid: int, limit: int | None) -> None:
        if sid not in self.model:
            return
        m, sub = self.model[sid], self.real[sid]
        try:
            got = [e.seq for e in sub.drain(limit)]
        except Lagged as lag:
            assert self.model_next(m) == ("lagged", lag.skipped)
            return
        except ChannelClosed:
            assert self.model_next(m) == ("closed",)
            return
        expected = []
        while limit is None or len(expected) < limit:
            if m.cursor == len(self.published):
                break
            kind = self.model_next(m)
            assert kind[0] == "event", kind  # drain never crosses a lag without reporting it first
            expected.append(kind[1])
        assert got == expected

    @rule(sid=consumes(subs))
    def close_subscription(self, sid: int) -> None:
        if sid not in self.model:
            return
        self.real[sid].close()
        self.real[sid].close()  # idempotent
        self.model[sid].closed = True
        # what it never received, counted once: still in the ring, or overwritten and not yet reported as lagged
        unread = len(self.published) - self.model[sid].cursor
        assert self.real[sid].unread_on_close == unread
        self.unread_on_close += unread
        try:
            self.real[sid].try_recv()
        except ChannelClosed:
            pass
        else:
            raise AssertionError("a closed subscription must raise ChannelClosed")

    @rule()
    def close_bus(self) -> None:
        self.bus.close()
        self.closed = True

    # -- invariants -------------------------------------------------------------------------------------------

    @invariant()
    def counters_match_model(self) -> None:
        if not hasattr(self, "bus"):
            return
        stats = self.bus.stats(Ev.MD)
        assert stats["published"] == len(self.published)
        assert stats["delivered"] == sum(m.delivered for m in self.model.values())
        assert stats["lagged"] == sum(m.lagged for m in self.model.values())
        assert stats["subscribers"] == sum(1 for m in self.model.values() if not m.closed)
        assert stats["unread_on_close"] == self.unread_on_close
        for sid, m in self.model.items():
            if m.closed:
                continue
            sub = self.real[sid]
            assert sub.delivered == m.delivered and sub.lagged == m.lagged
            # conservation: what a subscriber got + what it was told it missed + what it has not read yet
            unread = len(self.published) - m.cursor
            assert m.delivered + m.lagged + unread == len(self.published) - sub.subscribed_at
            if self.block:
                assert m.lagged == 0 and unread <= self.capacity


TestBusStateful = BusMachine.TestCase
TestBusStateful.settings = settings(
    max_examples=int(os.environ.get("KIMIHA_HYPOTHESIS_EXAMPLES", "500")),
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
