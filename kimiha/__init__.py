"""kimiha: low-latency event-driven orchestration for trading systems.

A compiled broadcast event bus (``kimiha._core``), a supervised scheduler and a trading pipeline builder
(Connectors -> Aggregator -> Strategies -> Executors), on uvloop.
"""

from kimiha._core import LatencyHistogram, monotonic_ns
from kimiha.channel_config import ChannelConfig, Overflow
from kimiha.error import (
    ChannelClosed,
    ChannelFull,
    EventReceiveError,
    EventSendError,
    InvalidChannelError,
    InvalidConfigurationError,
    InvalidStateError,
    Lagged,
    MissingComponentError,
    OrchestratorError,
    PayloadTypeError,
    SerializationError,
    TaskExecutionError,
    TaskInitializationError,
    TaskNotFoundError,
    TaskShutdownError,
)
from kimiha.event_bus import Channel, EventBus, Subscription
from kimiha.orchestrator import BuildError, TradingOrchestrator, TradingOrchestratorBuilder
from kimiha.runtime import run
from kimiha.scheduler import OnError, Scheduler, SchedulerState, Supervision, TaskRegistry, TaskState
from kimiha.types import (
    Aggregator,
    BackgroundTask,
    Connector,
    Event,
    EventTask,
    EventType,
    Executable,
    Executor,
    Strategy,
)

__version__ = "0.1.0"

__all__ = [
    "Aggregator",
    "BackgroundTask",
    "BuildError",
    "Channel",
    "ChannelClosed",
    "ChannelConfig",
    "ChannelFull",
    "Connector",
    "Event",
    "EventBus",
    "EventReceiveError",
    "EventSendError",
    "EventTask",
    "EventType",
    "Executable",
    "Executor",
    "InvalidChannelError",
    "InvalidConfigurationError",
    "InvalidStateError",
    "LatencyHistogram",
    "Lagged",
    "MissingComponentError",
    "OnError",
    "OrchestratorError",
    "Overflow",
    "PayloadTypeError",
    "Scheduler",
    "SchedulerState",
    "SerializationError",
    "Strategy",
    "Subscription",
    "Supervision",
    "TaskExecutionError",
    "TaskInitializationError",
    "TaskNotFoundError",
    "TaskRegistry",
    "TaskShutdownError",
    "TaskState",
    "TradingOrchestrator",
    "TradingOrchestratorBuilder",
    "monotonic_ns",
    "run",
]
