"""The trading orchestrator: Connectors -> Aggregator -> Strategies -> Executors over one event bus.

:class:`TradingOrchestratorBuilder` collects components and registers nothing until :meth:`build`, which
checks the whole wiring and reports every problem in one :class:`BuildError`. The resulting
:class:`TradingOrchestrator` starts consumers before producers (executors, strategies, aggregator,
connectors) and shuts down in the order data flows: connectors stop first, then the aggregator, strategies and
executors each drain what reached them, stage after stage; background tasks that read channels (a connector
declaring ``consumes()``, a bridge exporter registered on the orchestrator) keep reading while the stages
drain and stop after them -- all within one deadline (see :meth:`kimiha.Scheduler.stop_plan`).

A process may hold only part of the pipeline (``partial=True``, e.g. connector + aggregator here, strategies
and executors in other processes) with a bridge (:meth:`TradingOrchestratorBuilder.with_bridge`: NATS or shared
memory) carrying the channels in between. ``build()`` then checks what the process holds and what it imports
and exports: every imported channel is read by a component here (or exported again), a process without a
connector imports something to work on, and exports and imports are channels of the bus.
"""

from __future__ import annotations

import inspect
import signal
from collections.abc import Iterable
from typing import Any

from kimiha.clock import Clock
from kimiha.error import InvalidConfigurationError, InvalidStateError, MissingComponentError
from kimiha.event_bus import EventBus
from kimiha.scheduler import Scheduler, Supervision, TaskRegistry
from kimiha.types import Aggregator, Connector, Executor, Strategy

__all__ = ["BuildError", "TradingOrchestratorBuilder", "TradingOrchestrator"]

_ROLES: dict[str, type] = {
    "connector": Connector,
    "aggregator": Aggregator,
    "strategy": Strategy,
    "executor": Executor,
}


class BuildError(MissingComponentError, InvalidConfigurationError):
    """``build()`` found wiring problems; ``problems`` lists every one of them."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"cannot build the trading orchestrator, {len(self.problems)} problem(s):\n{lines}")


def _name(component: Any) -> str:
    name = getattr(component, "name", None)
    return name if isinstance(name, str) and name else type(component).__name__


def _role_problem(component: Any, role: str) -> str | None:
    """Say why ``component`` cannot play ``role``, or return None if it can."""
    for other_role, cls in _ROLES.items():
        if other_role != role and isinstance(component, cls) and not isinstance(component, _ROLES[role]):
            return f"{_name(component)!r} is a {cls.__name__}, passed to with_{role}()"
    if role == "connector":
        execute = getattr(component, "execute", None)
        if not callable(execute) or not inspect.iscoroutinefunction(execute):
            return f"connector {_name(component)!r} has no `async def execute()`"
        return None
    missing = [m for m in ("subscribed_event", "handle_event") if not callable(getattr(component, m, None))]
    if missing:
        return f"{role} {_name(component)!r} lacks {', '.join(missing)}()"
    return None


def _channels_of(component: Any, role: str) -> tuple[Any, ...]:
    """The channels ``component`` reads: ``subscribed_event()``, or a connector's optional ``consumes()``."""
    if role == "connector":
        consumes = getattr(component, "consumes", None)
        value = consumes() if callable(consumes) else ()
    else:
        value = component.subscribed_event()
    return tuple(value) if isinstance(value, (tuple, list, set, frozenset)) else (value,)


class TradingOrchestratorBuilder:
    """Collect trading components, then :meth:`build` a :class:`TradingOrchestrator`.

    Nothing is registered or started before ``build()``; a builder used twice is an error.

    Parameters
    ----------
    bus : EventBus
        The bus every component publishes to and subscribes on.
    shutdown_timeout : float
        Deadline (seconds) for the whole staged shutdown.
    clock : Clock, optional
        The scheduler's clock (``Scheduler(bus, clock=...)``): live by default, a ``SimClock`` for a replay.
    partial : bool
        Build a process that holds only some of the roles (any of them may be missing, but not all); its
        inputs and outputs come through :meth:`with_bridge`.
    name : str
        The scheduler's name (logs, registry).
    """

    def __init__(self, bus: EventBus, *, shutdown_timeout: float = 10.0, clock: Clock | None = None,
                 partial: bool = False, name: str = "trading-orchestrator") -> None:
        if not isinstance(bus, EventBus):
            raise InvalidConfigurationError(
                f"TradingOrchestratorBuilder(bus): expected an EventBus, got {type(bus).__name__}"
            )
        self._bus = bus
        self._shutdown_timeout = shutdown_timeout
        self._clock = clock
        self._connectors: list[tuple[Any, Supervision | None]] = []
        self._aggregators: list[tuple[Any, Supervision | None]] = []
        self._strategies: list[tuple[Any, Supervision | None]] = []
        self._executors: list[tuple[Any, Supervision | None]] = []
        self._bridges: list[Any] = []
        self._partial = bool(partial)
        self._name = name
        self._built = False

    def with_connector(self, connector: Connector, *, supervision: Supervision | None = None
                       ) -> TradingOrchestratorBuilder:
        """Add a connector (a background task that brings market data in)."""
        self._connectors.append((connector, supervision))
        return self

    def with_aggregator(self, aggregator: Aggregator, *, supervision: Supervision | None = None
                        ) -> TradingOrchestratorBuilder:
        """Set the aggregator (exactly one; a second call is reported by ``build()``)."""
        self._aggregators.append((aggregator, supervision))
        return self

    def with_strategy(self, strategy: Strategy, *, supervision: Supervision | None = None
                      ) -> TradingOrchestratorBuilder:
        """Add a strategy."""
        self._strategies.append((strategy, supervision))
        return self

    def with_executor(self, executor: Executor, *, supervision: Supervision | None = None
                      ) -> TradingOrchestratorBuilder:
        """Add an executor."""
        self._executors.append((executor, supervision))
        return self

    def with_bridge(self, bridge: Any) -> TradingOrchestratorBuilder:
        """Add a bridge (:class:`~kimiha.bridge.NatsBridge` or :class:`~kimiha.bridge.ShmBridge`), configured
        with its exports and imports: ``build()`` checks them against the components and registers its tasks
        (they keep reading while the stages drain, and stop after them)."""
        self._bridges.append(bridge)
        return self

    def _bridge_channels(self, problems: list[str]) -> tuple[list[Any], list[Any]]:
        imports: list[Any] = []
        exports: list[Any] = []
        for bridge in self._bridges:
            if not (hasattr(bridge, "importers") and hasattr(bridge, "exporters") and callable(
                    getattr(bridge, "register", None))):
                problems.append(f"with_bridge() takes a NatsBridge or ShmBridge, got {type(bridge).__name__}")
                continue
            if getattr(bridge, "bus", self._bus) is not self._bus:
                problems.append(f"bridge {getattr(bridge, 'name', '?')!r} serves another bus than this builder's")
            imports += [i.event_type for i in bridge.importers]
            exports += [e.event_type for e in bridge.exporters]
        return imports, exports

    def problems(self) -> list[str]:
        """Return every wiring problem ``build()`` would report (empty when it would succeed)."""
        problems: list[str] = []
        imports, exports = self._bridge_channels(problems)
        held = self._connectors or self._aggregators or self._strategies or self._executors
        if self._partial:
            if not held:
                problems.append("a partial pipeline holds nothing: add at least one component")
            elif not self._bridges:
                problems.append("a partial pipeline needs a bridge for what it does not hold: add with_bridge()")
            elif not self._connectors and not imports:
                problems.append("no connector and no imported channel: nothing would feed this process "
                                "(import its input with the bridge's import_channel())")
        if not self._connectors and not self._partial:
            problems.append("no connector: add one with with_connector()")
        if not self._aggregators and not self._partial:
            problems.append("no aggregator: add exactly one with with_aggregator()")
        elif len(self._aggregators) > 1:
            names = ", ".join(repr(_name(a)) for a, _ in self._aggregators)
            problems.append(f"exactly one aggregator is allowed, got {len(self._aggregators)}: {names}")
        if not self._strategies and not self._partial:
            problems.append("no strategy: add at least one with with_strategy()")
        if not self._executors and not self._partial:
            problems.append("no executor: add at least one with with_executor()")
        read: set[Any] = set()
        seen: dict[int, str] = {}
        for role, entries in self._by_role():
            for component, supervision in entries:
                if id(component) in seen:
                    problems.append(f"{_name(component)!r} is added twice (as {seen[id(component)]} and {role})")
                    continue
                seen[id(component)] = role
                problem = _role_problem(component, role)
                if problem:
                    problems.append(problem)
                    continue
                if supervision is not None and not isinstance(supervision, Supervision):
                    problems.append(f"{role} {_name(component)!r}: supervision must be a Supervision")
                method = "consumes()" if role == "connector" else "subscribed_event()"
                try:
                    channels = _channels_of(component, role)
                except Exception as exc:  # a broken subscribed_event / consumes is a wiring problem too
                    problems.append(f"{role} {_name(component)!r}: {method} raised {exc!r}")
                    continue
                read.update(channels)
                for channel in channels:
                    if not self._bus.has_channel(channel):
                        known = ", ".join(str(c) for c in self._bus.channels) or "none"
                        verb = "subscribes to" if role != "connector" else "consumes"
                        problems.append(
                            f"{role} {_name(component)!r} {verb} {channel!r}, which the bus does not "
                            f"have (known: {known})"
                        )
        for channel in dict.fromkeys(imports):
            if channel not in read and channel not in exports:
                name = getattr(self._bus.channel(channel), "name", channel) if self._bus.has_channel(channel) \
                    else channel
                problems.append(f"channel {name!r} is imported, but no component here reads it (and it is not "
                                f"exported again): subscribe a component to it, or do not import it")
        return problems

    def _by_role(self) -> list[tuple[str, list[tuple[Any, Supervision | None]]]]:
        # start order: consumers before producers
        return [
            ("executor", self._executors),
            ("strategy", self._strategies),
            ("aggregator", self._aggregators),
            ("connector", self._connectors),
        ]

    def build(self) -> TradingOrchestrator:
        """Check the wiring and return the orchestrator; raise :class:`BuildError` listing every problem."""
        if self._built:
            raise InvalidStateError("TradingOrchestratorBuilder.build() was already called; use a new builder")
        problems = self.problems()
        if problems:
            raise BuildError(problems)
        self._built = True
        scheduler = Scheduler(self._bus, shutdown_timeout=self._shutdown_timeout, name=self._name,
                              clock=self._clock)
        stages: dict[str, list[int]] = {}
        for role, entries in self._by_role():
            for component, supervision in entries:
                if role == "connector":
                    task_id = scheduler.register_background_task(component, supervision=supervision)
                else:
                    task_id = scheduler.register_event_task(component, supervision=supervision)
                stages.setdefault(role, []).append(task_id)
        for bridge in self._bridges:  # as the distributed demo always did: after the components
            bridge.register(scheduler)
        # The stop follows the data flow: connectors (producers) first; each stage then drains what the one
        # before it published; background readers (a connector declaring consumes(), a bridge exporter) last.
        scheduler.drain_stages = [stages[role] for role in ("aggregator", "strategy", "executor") if role in stages]
        return TradingOrchestrator(
            self._bus,
            scheduler,
            connectors=[c for c, _ in self._connectors],
            aggregator=self._aggregators[0][0] if self._aggregators else None,
            strategies=[s for s, _ in self._strategies],
            executors=[e for e, _ in self._executors],
            bridges=list(self._bridges),
        )


class TradingOrchestrator:
    """A built trading pipeline: start it, watch its registry, shut it down (or ``async with`` it)."""

    def __init__(self, bus: EventBus, scheduler: Scheduler, *, connectors: list[Any], aggregator: Any,
                 strategies: list[Any], executors: list[Any], bridges: list[Any] | None = None) -> None:
        self.bus = bus
        self.scheduler = scheduler
        self.connectors = connectors
        self.aggregator = aggregator
        self.strategies = strategies
        self.executors = executors
        #: The bridges given to the builder (:meth:`TradingOrchestratorBuilder.with_bridge`).
        self.bridges = bridges or []

    @property
    def registry(self) -> TaskRegistry:
        """The task registry: state, counters and latency of every component."""
        return self.scheduler.registry

    @property
    def state(self) -> Any:
        return self.scheduler.state

    async def start(self) -> None:
        """Start executors, strategies, the aggregator, then connectors (consumers before producers)."""
        await self.scheduler.start()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop connectors, drain the aggregator, strategies and executors in turn, then stop background
        readers (see :meth:`kimiha.Scheduler.stop_plan`); run every hook. One deadline bounds it all."""
        await self.scheduler.shutdown(timeout)

    async def run_until_signal(self, signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM),
                               *, timeout: float | None = None) -> None:
        """Start, run until SIGINT/SIGTERM (or an escalated failure), then shut down."""
        await self.scheduler.run_until_signal(signals, timeout=timeout)

    async def __aenter__(self) -> TradingOrchestrator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    def __repr__(self) -> str:
        return (f"<TradingOrchestrator state={self.scheduler.state.value} connectors={len(self.connectors)} "
                f"strategies={len(self.strategies)} executors={len(self.executors)}>")
