"""EventType: the enum protocol users rely on, with members stored as plain class attributes."""

from __future__ import annotations

import copy
import enum
import pickle

import pytest

from kimiha import ChannelConfig, EventBus, EventType


class Ev(EventType):
    MARKET_DATA = "MarketData"
    ORDERS = "Orders"
    ALIAS = "MarketData"

    def describe(self) -> str:
        return f"channel {self.value}"


def test_members_have_name_value_and_are_instances():
    assert Ev.MARKET_DATA.name == "MARKET_DATA" and Ev.MARKET_DATA.value == "MarketData"
    assert isinstance(Ev.MARKET_DATA, Ev) and isinstance(Ev.ORDERS, EventType)
    assert Ev.MARKET_DATA._name_ == "MARKET_DATA" and Ev.MARKET_DATA._value_ == "MarketData"
    assert Ev.ORDERS.describe() == "channel Orders"  # methods in the class body are not members


def test_iteration_len_contains_lookup_and_aliases():
    assert list(Ev) == [Ev.MARKET_DATA, Ev.ORDERS]
    assert list(reversed(Ev)) == [Ev.ORDERS, Ev.MARKET_DATA]
    assert len(Ev) == 2 and Ev.MARKET_DATA in Ev and "MarketData" not in Ev
    assert Ev.ALIAS is Ev.MARKET_DATA  # a repeated value is an alias, as in enum.Enum
    assert list(Ev.__members__) == ["MARKET_DATA", "ORDERS", "ALIAS"]
    assert Ev("Orders") is Ev.ORDERS and Ev(Ev.ORDERS) is Ev.ORDERS and Ev["ORDERS"] is Ev.ORDERS
    with pytest.raises(ValueError, match=r"'Nope' is not a valid Ev; expected one of: 'MarketData', 'Orders'"):
        Ev("Nope")
    with pytest.raises(KeyError, match="Ev has no member 'NOPE'; its members: MARKET_DATA, ORDERS"):
        Ev["NOPE"]


def test_repr_str_pickle_copy_and_identity_hash():
    assert repr(Ev.ORDERS) == "<Ev.ORDERS: 'Orders'>" and str(Ev.ORDERS) == "Ev.ORDERS"
    assert f"{Ev.ORDERS}" == "Ev.ORDERS"
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert pickle.loads(pickle.dumps(Ev.ORDERS, protocol)) is Ev.ORDERS
    assert copy.copy(Ev.ORDERS) is Ev.ORDERS and copy.deepcopy([Ev.ORDERS])[0] is Ev.ORDERS
    assert hash(Ev.ORDERS) == object.__hash__(Ev.ORDERS)
    assert Ev.ORDERS != "Orders" and Ev.ORDERS == Ev.ORDERS
    assert {Ev.ORDERS: 1}[Ev("Orders")] == 1


def test_members_are_plain_class_attributes_and_the_metaclass_has_no_lookup_hook():
    # What makes `Ev.X` cheap: the member sits in the class dict and no __getattr__ runs Python code on access.
    assert vars(Ev)["ORDERS"] is Ev.ORDERS
    meta = type(Ev)
    assert "__getattr__" not in vars(meta) and meta.__getattribute__ is type.__getattribute__
    assert not hasattr(Ev.ORDERS, "__dict__")  # two slots per member


def test_members_are_read_only_and_a_class_with_members_is_final():
    with pytest.raises(AttributeError, match="cannot reassign member Ev.ORDERS"):
        Ev.ORDERS = "x"  # type: ignore[misc]
    with pytest.raises(AttributeError, match="cannot delete member Ev.ORDERS"):
        del Ev.ORDERS
    with pytest.raises(AttributeError, match="read-only"):
        Ev.ORDERS.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError, match="cannot extend Ev, which has members"):
        class More(Ev):  # type: ignore[misc]
            EXTRA = "Extra"
    with pytest.raises(TypeError, match="expected a hashable value"):
        class Bad(EventType):
            X = ["unhashable"]


def test_an_abstract_base_without_members_can_be_extended():
    class Base(EventType):
        def shout(self) -> str:
            return self.name.upper()

    class Venue(Base):
        binance = "Binance"

    assert list(Base) == [] and Venue.binance.shout() == "BINANCE" and isinstance(Venue.binance, Base)


def test_members_key_bus_channels_and_name_them_by_value():
    bus = EventBus([(Ev.MARKET_DATA, ChannelConfig(8)), (Ev.ORDERS, ChannelConfig(8))])
    assert bus.channel(Ev.ORDERS).name == "Orders" and bus.channels == [Ev.MARKET_DATA, Ev.ORDERS]
    sub = bus.subscribe(Ev.ALIAS)
    assert bus.publish(Ev.MARKET_DATA, 1) == 1 and sub.try_recv() == 1
    bus.close()


def test_a_missing_hook_is_consulted_as_by_enum():
    class Venue(EventType):
        BINANCE = "Binance"

        @classmethod
        def _missing_(cls, value: object) -> Venue | None:
            return cls.BINANCE if str(value).lower() == "binance" else None

    assert Venue("BINANCE") is Venue.BINANCE and Venue("Binance") is Venue.BINANCE
    with pytest.raises(ValueError, match="'Kraken' is not a valid"):
        Venue("Kraken")

    class Broken(EventType):
        X = "x"

        @classmethod
        def _missing_(cls, value: object) -> object:
            return "x"

    with pytest.raises(TypeError, match=r"Broken._missing_\('y'\) returned 'x'; expected a member of .*Broken or"):
        Broken("y")


def test_format_specs_pad_the_str_as_enum_members_do():
    assert f"{Ev.ORDERS:<12}|" == "Ev.ORDERS   |" and f"{Ev.ORDERS!r:.4}" == "<Ev."


def test_class_bodies_enum_accepted_but_event_type_cannot_are_refused_with_a_reason():
    with pytest.raises(TypeError, match=r"class F: a member cannot be called 'name'.*NAME = 'n'"):
        class F(EventType):
            name = "n"
    with pytest.raises(TypeError, match=r"class G: a member cannot be called 'value'"):
        class G(EventType):
            value = "v"
    with pytest.raises(TypeError, match=r"member X = enum.auto\(\) is not supported.*X = 'X'"):
        class A(EventType):
            X = enum.auto()
    with pytest.raises(TypeError, match=r"class S: cannot combine EventType with str .*member.value"):
        class S(str, EventType):  # type: ignore[misc]
            X = "x"


def test_an_unknown_key_that_looks_like_a_known_one_is_explained():
    from kimiha import InvalidChannelError

    bus = EventBus([(Ev.MARKET_DATA, ChannelConfig(8))])
    with pytest.raises(InvalidChannelError, match=r"'MarketData' is the name of channel Ev.MARKET_DATA: a "
                                                  r"channel's key is the EventType member itself"):
        bus.publish("MarketData", 1)
    twin = type(Ev)("Ev", (EventType,), {"MARKET_DATA": "MarketData", "__qualname__": Ev.__qualname__})
    with pytest.raises(InvalidChannelError, match=r"known channels: Ev.MARKET_DATA \(.* the class was defined "
                                                  r"twice .* keys compare by identity"):
        bus.publish(twin.MARKET_DATA, 1)

    class Other(EventType):
        MD = "MarketData"

    with pytest.raises(InvalidChannelError, match=r"has the value that names channel Ev.MARKET_DATA, but is a "
                                                  r"member of another class"):
        bus.subscribe(Other.MD)
    assert not bus.has_channel(Other.MD)
    bus.close()


def test_a_member_inside_a_payload_travels_as_its_value_as_an_enum_member_did(run):
    from kimiha import Event, SerializationError

    class Routed(Event):
        route: Ev
        qty: int

    async def main():
        bus = EventBus([(Ev.ORDERS, ChannelConfig(8, payload_type=Routed))])
        frames = bus.subscribe(Ev.ORDERS, frames=True)  # a journal or bridge: every event is encoded at publish
        bus.publish(Ev.ORDERS, Routed(Ev.MARKET_DATA, 1))
        ((_, _, frame),) = frames.drain()
        pull = bus.subscribe(Ev.ORDERS)
        bus.publish_raw(Ev.ORDERS, frame)            # what a bridge or a journal replay does with it
        (back,) = pull.drain()
        assert back.route is Ev.MARKET_DATA and back.qty == 1
        wrong = frame.replace(b"MarketData", b"MarketDatb")
        with pytest.raises(SerializationError, match=r"'MarketDatb' is not a valid Ev.*route"):
            bus.publish_raw(Ev.ORDERS, wrong)
        bus.close()

    run(main())


def test_the_functional_form_is_refused_with_the_class_form_named():
    """A new-user trial: EventType("Ev", {...}) gave a bare TypeError about __call__'s arguments."""
    with pytest.raises(TypeError, match="no functional form .* class Ev\\(EventType\\)"):
        EventType("Ev", {"A": "a"})
