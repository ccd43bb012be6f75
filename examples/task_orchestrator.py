"""The original framework's "task orchestrator" example, in kimiha: a background task publishes market data,
an event task handles it, the scheduler starts and shuts both down cleanly."""

import asyncio

import kimiha
from kimiha import (BackgroundTask, ChannelConfig, Event, EventBus, EventTask, EventType, Scheduler,
                    Supervision)


class Ev(EventType):
    MARKET_DATA = "MarketData"


class Price(Event):
    symbol: str
    price: float


class MarketDataFeed(BackgroundTask):
    """Publishes one price per execute(); the scheduler calls it in a loop, paced by `interval`."""

    def __init__(self, bus: EventBus) -> None:
        self.bus, self.n = bus, 0

    async def execute(self) -> None:
        self.n += 1
        self.bus.publish(Ev.MARKET_DATA, Price("BTCUSDT", 60_000.0 + self.n))


class PricePrinter(EventTask):
    def __init__(self) -> None:
        self.count = 0

    def subscribed_event(self) -> Ev:
        return Ev.MARKET_DATA

    def handle_event(self, event: Price) -> None:   # plain function: called from the compiled dispatch loop
        self.count += 1

    async def shutdown(self) -> None:
        print(f"printer saw {self.count} prices")


async def main() -> None:
    bus = EventBus([(Ev.MARKET_DATA, ChannelConfig(1024, "prices", payload_type=Price))])
    async with Scheduler(bus) as scheduler:
        printer = PricePrinter()
        scheduler.register_event_task(printer)
        scheduler.register_background_task(MarketDataFeed(bus), interval=0.001,
                                           supervision=Supervision(max_restarts=3))
        await scheduler.start()
        while printer.count < 50:
            await asyncio.sleep(0.01)
        print(scheduler.registry)
    # leaving the block: feed cancelled first, printer drained, hooks run in reverse order


if __name__ == "__main__":
    kimiha.run(main())
