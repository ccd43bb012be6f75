"""The error hierarchy of kimiha.

Every error the library raises on purpose derives from :class:`OrchestratorError`. The variants mirror the
original framework's error enum (task initialization / execution / shutdown, invalid channel, event send /
receive, task not found, missing component, invalid configuration, serialization) and add the channel
conditions of a broadcast ring: :class:`Lagged`, :class:`ChannelFull` and :class:`ChannelClosed`.

Where a standard exception type is the natural thing to catch (``ValueError`` for a bad parameter,
``TypeError`` for a payload of the wrong type, ``LookupError`` for an unknown key) the kimiha error derives
from it too, so ``except ValueError`` keeps working.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "OrchestratorError",
    "TaskInitializationError",
    "TaskExecutionError",
    "TaskShutdownError",
    "InvalidChannelError",
    "EventSendError",
    "EventReceiveError",
    "TaskNotFoundError",
    "MissingComponentError",
    "InvalidConfigurationError",
    "SerializationError",
    "PayloadTypeError",
    "Lagged",
    "ChannelFull",
    "ChannelClosed",
    "InvalidStateError",
]


class OrchestratorError(Exception):
    """Base class of every error kimiha raises on purpose."""


class TaskInitializationError(OrchestratorError):
    """A task's ``initialize()`` failed; the message names the task."""


class TaskExecutionError(OrchestratorError):
    """A task's ``execute()`` or ``handle_event()`` failed; the message names the task."""


class TaskShutdownError(OrchestratorError):
    """One or more ``shutdown()`` hooks failed; ``errors`` holds every failure."""

    def __init__(self, message: str, errors: list[BaseException] | None = None) -> None:
        super().__init__(message)
        self.errors: list[BaseException] = list(errors or [])


class InvalidChannelError(OrchestratorError, LookupError):
    """A channel key is unknown, or already exists where a new one was expected."""

    def __str__(self) -> str:  # LookupError would otherwise be shown quoted like a KeyError
        return str(self.args[0]) if self.args else ""


class EventSendError(OrchestratorError):
    """An event could not be published."""


class EventReceiveError(OrchestratorError):
    """An event could not be received."""


class TaskNotFoundError(OrchestratorError, LookupError):
    """No task is registered under the given id or name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MissingComponentError(OrchestratorError):
    """The orchestrator builder lacks a required component."""


class InvalidConfigurationError(OrchestratorError, ValueError):
    """A configuration value is out of range or of the wrong kind; the message names the parameter."""


class SerializationError(OrchestratorError, ValueError):
    """A frame could not be decoded, or a payload could not be encoded; nothing was written.

    A bad raw frame (undecodable, not the channel's payload type, nested too deep, or a ``publish_ns`` header
    outside the int64 range) is counted in the channel's ``bad_frames``; a payload the channel's frames
    subscribers cannot encode, in its ``encode_errors``. The message names the channel and what was expected.
    """


class PayloadTypeError(EventSendError, TypeError):
    """A payload does not match the type the channel declared; nothing was written."""


class InvalidStateError(OrchestratorError):
    """An operation is not allowed in the object's current state; the message names that state."""


class Lagged(EventReceiveError):
    """The subscriber fell behind and ``skipped`` events were overwritten before it read them.

    Reception continues with the oldest event still retained (Tokio's ``RecvError::Lagged(n)``).
    """

    def __init__(self, skipped: int, channel: str = "?", capacity: int | None = None) -> None:
        self.skipped = skipped
        self.channel = channel
        cap = f" (capacity {capacity})" if capacity is not None else ""
        super().__init__(
            f"subscriber of channel {channel!r} lagged: {skipped} event(s) were overwritten before it "
            f"received them{cap}; reception resumes at the oldest retained event"
        )

    def __reduce__(self) -> tuple[type[Lagged], tuple[int, Any]]:  # keep it picklable despite the custom signature
        return (type(self), (self.skipped, self.channel))


class ChannelFull(EventSendError):
    """A ``BLOCK`` channel has no room: the slowest subscriber has not read the oldest slot yet.

    Nothing was written. Use ``publish_async`` to wait for room instead.
    """


class ChannelClosed(OrchestratorError):
    """The channel (or the subscription) is closed: nothing more can be published or received."""
