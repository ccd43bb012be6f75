"""The venue-neutral trading domain, built on the framework and used by every venue adapter.

* ``model``    -- market and order events (Trade, Quote, DepthDiff, DepthSnapshot, BookUpdate, Signal, Order,
  Fill) as frozen msgspec Structs.
* ``book``     -- the L2 order book (snapshot + diff rules, gap detection) and the book check.
* ``paper``    -- the paper executor: fills against the book, position, PnL and fees.
* ``strategy`` -- the order-book-imbalance strategy's logic, free of any bus.
* ``tasks``    -- the pipeline's channels and the strategy and paper-executor tasks.

It imports the framework (``kimiha.types``, ``kimiha.error`` ...) and nothing from ``kimiha.venues``,
``kimiha.apps`` or ``kimiha.bench``.
"""
