"""kimiha.bench._bounds, the lower bounds of ``bench compare``: they call what they are given, in order, and
nothing is lost or swallowed (their cost is measured by the benchmark, not here)."""

from __future__ import annotations

import pytest

from kimiha.bench._bounds import InlineBound, LoopBound


class Sink:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def handle(self, event: object) -> None:
        self.log.append((self.name, event))


def handlers(log: list) -> list:
    # each kind the dispatch loop tells apart: a bound method, a plain function, a builtin, a callable object
    def plain(event: object) -> None:
        log.append(("plain", event))

    class Callable_:
        def __call__(self, event: object) -> None:
            log.append(("object", event))

    return [Sink("method", log).handle, plain, lambda e: log.append(("lambda", e)), Callable_()]


def test_inline_bound_calls_every_handler_in_order_before_publish_returns():
    log: list = []
    bound = InlineBound(handlers(log))
    for i in range(3):
        assert bound.publish("any key", i) is None
        assert [e for _, e in log[-4:]] == [i] * 4
    assert [name for name, _ in log[:4]] == ["method", "plain", "lambda", "object"]
    one: list = []
    InlineBound([one.append]).publish(None, "x")
    assert one == ["x"]


def test_loop_bound_stores_then_calls_each_handler_over_the_stored_events():
    log: list = []
    bound = LoopBound(handlers(log)[:2], 4)
    for i in range(3):
        bound.publish("key", i)
    assert log == []
    assert bound.flush() == 3
    assert log == [("method", 0), ("method", 1), ("method", 2), ("plain", 0), ("plain", 1), ("plain", 2)]
    assert bound.flush() == 0
    for i in range(4):
        bound.publish("key", i)
    with pytest.raises(OverflowError, match="4 payloads stored and not flushed"):
        bound.publish("key", 4)


def test_a_failing_handler_raises_out_of_the_bound():
    def boom(event: object) -> None:
        raise ValueError(f"bad {event}")

    with pytest.raises(ValueError, match="bad 1"):
        InlineBound([boom]).publish("k", 1)
    bound = LoopBound([boom], 2)
    bound.publish("k", 2)
    with pytest.raises(ValueError, match="bad 2"):
        bound.flush()


def test_bad_arguments_say_what_was_expected():
    with pytest.raises(ValueError, match="expected at least one handler, got none"):
        InlineBound([])
    with pytest.raises(TypeError, match="expected callable handlers, got int 3"):
        InlineBound([print, 3])
    with pytest.raises(ValueError, match="expected capacity >= 1, got 0"):
        LoopBound([print], 0)


def test_loop_bound_refuses_to_be_published_to_or_flushed_while_it_flushes():
    # A re-entrant publish overwrote the slots still being flushed (found by an adversarial trial).
    errors: list[str] = []

    def reenter(event: object) -> None:
        for call in (lambda: bound.publish("k", "again"), bound.flush):
            try:
                call()
            except RuntimeError as exc:
                errors.append(str(exc))

    seen: list = []
    bound = LoopBound([reenter, seen.append], 4)
    for i in range(3):
        bound.publish("k", i)
    assert bound.flush() == 3
    assert seen == [0, 1, 2]
    assert len(errors) == 6 and "publish while flush() calls the handlers" in errors[0]
    assert "flush() while flush() calls the handlers" in errors[1]
    bound.publish("k", 9)                 # usable again afterwards
    assert bound.flush() == 1 and seen[-1] == 9


def test_handlers_that_a_call_would_not_run_are_refused():
    async def coro(event: object) -> None: ...

    def gen(event: object):
        yield event

    for h in (coro, gen):
        with pytest.raises(TypeError, match="expected plain \\(sync\\) handlers"):
            InlineBound([h])
