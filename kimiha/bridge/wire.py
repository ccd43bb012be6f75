"""What a bridged event looks like on NATS: the frame as the ring holds it, plus one header.

Payload: the msgpack frame of the event, byte for byte as the sender's ring holds it (never re-encoded).

Header ``Kimiha: <seq>;<ts>;<sender>;<schema>;<lost>;<type>`` (one header: nats-py's cost is per header
line, and five separate headers halved the receiving side's throughput -- measured in benchmarks/README.md):

``seq``      the sender's sequence: 1, 2, 3, ... over every event it sent on this subject
``ts``       publish timestamp: ``CLOCK_MONOTONIC`` nanoseconds when the event entered the sender's ring
``sender``   the sender's identity, ``<clock domain>.<pid>.<nonce>``: sequences are per sender
``schema``   schema version of the payload type (an int the sender and receiver agree on)
``lost``     events the sender lost before sending them (its local ring lagged, or its outgoing buffer
             dropped the oldest while the broker was away), cumulative; usually 0
``type``     the event type: the sending channel's name (``MarketData``); last, so it may hold ``;``

``Nats-Msg-Id: <sender>:<seq>`` is added for JetStream, so the stream drops a resend it already stored.

**Batches.** When several frames are ready at once, the exporter sends them as one message (see
:func:`encode_batch`): header ``Kimiha-Batch: <first seq>;<count>;<sender>;<schema>;<lost>;<type>`` (the
frames take sequences ``first .. first + count - 1``), payload a msgpack array of ``[ts, frame]`` pairs (each
frame a msgpack ``bin``, byte for byte as the ring holds it). A batch is published, acknowledged and
deduplicated as one unit (``Nats-Msg-Id: <sender>:<first seq>``; a resend is the same batch). A single
ready frame still travels alone, in the format above, and messages without either header (a foreign
publisher) are one frame each.

Monotonic clocks are comparable between processes of one machine (one boot), not across machines; the clock
domain in the sender id (from the kernel's boot id) tells a receiver whether ``ts`` is on its clock.
"""

from __future__ import annotations

import enum
import hashlib
import os
import re
import secrets
import socket

import msgspec

__all__ = [
    "HDR_BATCH",
    "HDR_META",
    "MAX_BATCH_FRAMES",
    "HDR_MSG_ID",
    "BufferPolicy",
    "Delivery",
    "check_subject",
    "decode_batch",
    "encode_batch",
    "clock_domain",
    "format_meta",
    "new_sender_id",
    "parse_meta",
    "stream_name_for",
]

HDR_META = "Kimiha"
HDR_MSG_ID = "Nats-Msg-Id"
HDR_BATCH = "Kimiha-Batch"
#: The most frames one batch may claim (a header beyond it is malformed, whatever its payload).
MAX_BATCH_FRAMES = 65536

_batch_encoder = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(list[tuple[int, bytes]])


def encode_batch(items: list[tuple[int, bytes]]) -> bytes:
    """Return the payload of a batch message: ``items`` are ``(publish_ns, frame)`` pairs, in order."""
    return _batch_encoder.encode(items)


def decode_batch(payload: bytes) -> list[tuple[int, bytes]]:
    """Return the ``(publish_ns, frame)`` pairs of a batch payload; raise ``msgspec.DecodeError`` (a
    ``ValueError``) if it is not one."""
    return _batch_decoder.decode(payload)


def format_meta(seq: int, ts: int, sender: str, schema: int, lost: int, event_type: str) -> str:
    """Return the ``Kimiha`` header value of one event."""
    return f"{seq};{ts};{sender};{schema};{lost};{event_type}"


def parse_meta(value: str) -> tuple[int, int, str, str, int, str]:
    """Return ``(seq, ts, sender, schema, lost, type)`` from a ``Kimiha`` header value.

    Raise ``ValueError`` if it is malformed.
    """
    seq, ts, sender, schema, lost, event_type = value.split(";", 5)
    return int(seq), int(ts), sender, schema, int(lost), event_type


class Delivery(enum.Enum):
    """How a bridged channel travels over NATS."""

    #: Core NATS publish/subscribe: lowest latency, at most once. A loss shows as a gap in the sender's
    #: sequence; the importer counts it (``missing``) and logs it.
    CORE = "core"
    #: JetStream: the sender keeps each event until the stream acknowledges it (resending after a fault), the
    #: receiver acknowledges after publishing locally, duplicates are dropped by sequence. No loss, replayable.
    JETSTREAM = "jetstream"


class BufferPolicy(enum.Enum):
    """What an exporter does when its outgoing buffer is full while the broker is unreachable."""

    #: Stop reading the local channel: a ``BLOCK`` channel then holds its publishers back (nothing is lost);
    #: on a ``LAG`` channel the exporter lags and the skipped events are counted as lost.
    BLOCK = "block"
    #: Keep reading; drop the oldest buffered event for each new one (counted in ``dropped``).
    DROP_OLDEST = "drop_oldest"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:  # not Linux: the host name is the best stand-in (monotonic clocks are per boot)
        return socket.gethostname()


_CLOCK_DOMAIN = hashlib.blake2s(_boot_id().encode(), digest_size=4).hexdigest()


def clock_domain() -> str:
    """Return a short id of this machine's monotonic clock (the same for every process until reboot)."""
    return _CLOCK_DOMAIN


def new_sender_id() -> str:
    """Return a fresh sender identity: ``<clock domain>.<pid>.<nonce>``."""
    return f"{_CLOCK_DOMAIN}.{os.getpid()}.{secrets.token_hex(3)}"


_TOKEN = re.compile(r"[^\s.*>]+")


def check_subject(subject: object, *, wildcards: bool, what: str) -> str:
    """Return ``subject`` if it is a valid NATS subject, else raise ``ValueError`` naming ``what``."""
    if not isinstance(subject, str) or not subject:
        raise ValueError(f"{what}: expected a NATS subject (dot-separated tokens), got {subject!r}")
    tokens = subject.split(".")
    for i, token in enumerate(tokens):
        if token in ("*", ">"):
            if not wildcards:
                raise ValueError(f"{what}: a wildcard is not allowed in subject {subject!r}")
            if token == ">" and i != len(tokens) - 1:
                raise ValueError(f"{what}: '>' must be the last token of subject {subject!r}")
            continue
        if not _TOKEN.fullmatch(token):
            raise ValueError(f"{what}: invalid token {token!r} in subject {subject!r} (empty, blank or a "
                             f"wildcard inside a token)")
    return subject


def stream_name_for(subject: str) -> str:
    """Return the default JetStream stream name of ``subject``: ``KIMIHA_`` + the subject, upper-cased,
    with every character a stream name may not hold replaced by ``_``."""
    return "KIMIHA_" + re.sub(r"[^A-Za-z0-9_-]", "_", subject).upper()
