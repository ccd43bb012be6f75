"""Trading quick start: replay the shipped Binance BTCUSDT tape through
connector -> aggregator -> strategy -> paper executor, then print what happened.

A replay runs on a SimClock: the strategy's cooldown timers follow the tape's time."""

import kimiha
from kimiha import EventBus, TradingOrchestratorBuilder
from kimiha.clock import SimClock
from kimiha.trading.tasks import ImbalanceStrategyTask, PaperExecutorTask, trading_channels
from kimiha.venues.binance import BinanceAggregator, BinanceConnector, recorded_tape, replay_lines


async def main() -> None:
    bus = EventBus(trading_channels())
    connector = BinanceConnector(bus, replay_lines(recorded_tape()))
    aggregator = BinanceAggregator(bus)
    executor = PaperExecutorTask(bus)
    engine = (TradingOrchestratorBuilder(bus, clock=SimClock())  # live data: the default LiveClock
              .with_connector(connector)
              .with_aggregator(aggregator)
              .with_strategy(ImbalanceStrategyTask(bus, max_position=0.005))
              .with_executor(executor)
              .build())
    async with engine:                       # starts executors, strategies, aggregator, then connectors
        await connector.finished.wait()      # the whole tape was published
    # shutdown drained every stage: each line reached the book, each order its fill
    check = aggregator.check
    print(f"book check {check.matched}/{check.compared}, fills {executor.paper.fills}, "
          f"position {executor.paper.position:+.5f} BTC")


if __name__ == "__main__":
    kimiha.run(main())
