"""Coverage-guided fuzzing of the raw-frame publish path with atheris.

    python tests/fuzz/fuzz_publish_raw.py -runs=200000

Every input goes through ``publish_raw`` on a typed channel: it must either be rejected with a kimiha
error (and counted in ``bad_frames``) or decode to the channel's type and reach the subscriber intact.
Any other exception, or counters that stop adding up, is a crash the fuzzer reports.

Limitation: the decoders are C (msgspec, kimiha._core) built without sanitizer coverage, so libFuzzer gets no
coverage feedback here and mutates blindly; the structured hypothesis strategies in test_reliability.py are
the stronger of the two fuzzers for this path.
"""

import sys

import atheris

with atheris.instrument_imports():
    import msgspec

    import kimiha  # noqa: F401  (imported under instrument_imports so atheris instruments it)
    from kimiha import ChannelConfig, Event, EventBus, EventType, PayloadTypeError, SerializationError


class Ev(EventType):
    TICKS = "Ticks"


class Level(Event):
    price: float
    qty: float


class Tick(Event, tag=True):
    seq: int
    levels: tuple[Level, ...] = ()
    note: str = ""


class Quote(Event, tag=True):
    bid: float
    ask: float


BUS = EventBus([(Ev.TICKS, ChannelConfig(8, payload_type=Tick | Quote))])
SUB = BUS.subscribe(Ev.TICKS)
CALLS = {"n": 0, "rejected": 0}


def test_one_input(data: bytes) -> None:
    CALLS["n"] += 1
    try:
        BUS.publish_raw(Ev.TICKS, data)
    except (SerializationError, PayloadTypeError):
        CALLS["rejected"] += 1
    else:
        event = SUB.try_recv()
        if not isinstance(event, (Tick, Quote)):
            raise AssertionError(f"accepted frame decoded to {type(event).__name__}")
        if msgspec.msgpack.encode(event) != msgspec.msgpack.encode(msgspec.msgpack.decode(data, type=Tick | Quote)):
            raise AssertionError("the subscriber got something else than the frame said")
    stats = BUS.stats(Ev.TICKS)
    if stats["bad_frames"] != CALLS["rejected"] or stats["published"] + stats["bad_frames"] != CALLS["n"]:
        raise AssertionError(f"counters do not add up: {stats['published']=} {stats['bad_frames']=} {CALLS=}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
