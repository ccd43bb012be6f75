"""The NATS connection of a bridge, run as a scheduler task: connect, reconnect with backoff, report state.

nats-py replays subscriptions after a reconnect; this task adds what a bridge needs on top: an exponential
backoff with jitter between attempts (nats-py's own wait is fixed), an ``up`` state that is only set again once
JetStream answers for every stream the bridge uses (publishing into a stream that is still recovering would
be refused, out of order), an ``epoch`` that exporters compare to know a reconnect happened, and counters.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from kimiha.types import BackgroundTask

__all__ = ["Backoff", "LinkState", "NatsLink", "connect_within"]

logger = logging.getLogger("kimiha.bridge")


async def connect_within(timeout: float, servers: str | list[str], *, client: Any = None, **options: Any) -> Any:
    """Return ``await nats.connect(servers, **options)``, or raise TimeoutError after ``timeout`` seconds.

    With ``client`` (a ``nats.aio.client.Client`` made by the caller, so that a failed attempt can be closed),
    connect that one and return it.

    Unlike ``asyncio.timeout`` around the call, the deadline holds even when nats-py swallows the
    cancellation (its retry loop of a refused first connection does, now and then, on Python 3.11): the
    attempt is cancelled again until it ends. A connection made just as the deadline passes is closed.
    """
    import nats

    connecting = nats.connect(servers, **options) if client is None else client.connect(servers, **options)
    attempt = asyncio.ensure_future(connecting)
    try:
        done, _ = await asyncio.wait({attempt}, timeout=timeout)
    except BaseException:  # cancelled ourselves: take the attempt along
        await _cancel_until_done(attempt)
        raise
    if done:
        result = attempt.result()
        return client if client is not None else result
    await _cancel_until_done(attempt)
    raise TimeoutError(f"no connection within {timeout:g} s")


async def _cancel_until_done(task: asyncio.Future[Any]) -> None:
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled() and task.exception() is None:
        try:
            await task.result().close()
        except Exception:  # pragma: no cover - best effort
            pass


@dataclass(frozen=True)
class Backoff:
    """Delays between connection attempts: ``initial * factor**attempt``, capped at ``max``, +/- ``jitter``.

    Parameters
    ----------
    initial : float
        Seconds before the first reconnection attempt.
    max : float
        Longest delay, in seconds.
    factor : float
        Growth per failed attempt (>= 1).
    jitter : float
        Relative randomization in [0, 1), so that many clients do not reconnect in lockstep.
    """

    initial: float = 0.02
    max: float = 2.0
    factor: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if not (isinstance(self.initial, (int, float)) and self.initial >= 0):
            raise ValueError(f"Backoff.initial: expected seconds >= 0, got {self.initial!r}")
        if not (isinstance(self.max, (int, float)) and self.max >= self.initial):
            raise ValueError(f"Backoff.max: expected seconds >= initial ({self.initial}), got {self.max!r}")
        if not (isinstance(self.factor, (int, float)) and self.factor >= 1):
            raise ValueError(f"Backoff.factor: expected a number >= 1, got {self.factor!r}")
        if not (isinstance(self.jitter, (int, float)) and 0 <= self.jitter < 1):
            raise ValueError(f"Backoff.jitter: expected a fraction in [0, 1), got {self.jitter!r}")

    def delay(self, attempt: int) -> float:
        """Return the delay before attempt number ``attempt`` (0-based) of a series of failures."""
        base = min(self.max, self.initial * self.factor ** min(attempt, 64))
        return base * (1 + self.jitter * (2 * random.random() - 1))


async def _discard(nc: Any) -> None:
    """Close a client whose first connection failed or was cut short (best effort, bounded)."""
    try:
        async with asyncio.timeout(2.0):
            await nc.close()
    except Exception:  # nothing to report: the attempt already failed
        pass
    # A cancellation that landed inside nats-py's own close marks the client closed with its socket open:
    # close that too (nats-py keeps it in a private attribute).
    transport = getattr(nc, "_transport", None)
    if transport is not None:
        try:
            transport.close()
        except Exception:
            pass


class AuthorizationRefused(ConnectionError):
    """The server refused the connection's credentials (retrying the same ones cannot help)."""


class LinkState:
    CREATED = "created"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"  # nats-py is reconnecting
    RECOVERING = "recovering"      # reconnected, waiting for JetStream to answer for our streams
    CLOSED = "closed"


class _Waiters:
    """Wake every coroutine waiting for "something changed"; a no-op when nobody waits (hot path)."""

    __slots__ = ("_futures",)

    def __init__(self) -> None:
        self._futures: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        if self._futures:
            futures, self._futures = self._futures, []
            for fut in futures:
                if not fut.done():
                    fut.set_result(None)

    def arm(self) -> asyncio.Future[None]:
        """Return a future resolved by the next ``notify``, registered now (no wake-up can be missed).

        Pass it to :meth:`disarm` when giving up on it.
        """
        fut = asyncio.get_running_loop().create_future()
        self._futures.append(fut)
        return fut

    def disarm(self, fut: asyncio.Future[None]) -> None:
        if not fut.done():
            fut.cancel()
            try:
                self._futures.remove(fut)
            except ValueError:
                pass

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait for the next ``notify``; return False on timeout."""
        fut = self.arm()
        try:
            if timeout is None:
                await fut
            else:
                async with asyncio.timeout(max(timeout, 0)):
                    await fut
        except TimeoutError:
            return False
        finally:
            self.disarm(fut)
        return True


async def wait_until(predicate: Any, waiters: _Waiters, timeout: float | None) -> bool:
    """Wait until ``predicate()`` is true, re-checking at each notification; False if ``timeout`` ran out."""
    if predicate():
        return True
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        remaining = None if deadline is None else deadline - loop.time()
        if remaining is not None and remaining <= 0:
            return bool(predicate())
        await waiters.wait(remaining)
        if predicate():
            return True


class NatsLink(BackgroundTask):
    """The bridge's connection to NATS, as a background task (role ``bridge``).

    ``initialize`` connects (retrying with backoff until ``connect_timeout``); ``execute`` waits for state
    changes and logs them; ``shutdown`` closes the connection, after the exporters flushed (register it first
    so that its hook runs last). Not usually created directly: :class:`~kimiha.bridge.NatsBridge` makes one.
    """

    role = "bridge"

    def __init__(self, servers: str | list[str], *, name: str = "nats-link", client_name: str | None = None,
                 connect_timeout: float = 10.0, backoff: Backoff | None = None,
                 ping_interval: int = 5, pending_size: int = 8 * 1024 * 1024, token: str | None = None,
                 user: str | None = None, password: str | None = None) -> None:
        self.name = name
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        self.client_name = client_name or name
        self.connect_timeout = float(connect_timeout)
        self.backoff = backoff or Backoff()
        self.ping_interval = ping_interval
        self.pending_size = pending_size
        # credentials: passed to nats-py only, never shown in stats, reprs or logs
        self._auth: dict[str, Any] = {k: v for k, v in (("token", token), ("user", user), ("password", password))
                                      if v is not None}
        self.state = LinkState.CREATED
        self.nc: Any = None
        self.js: Any = None
        #: Incremented each time the link comes up (initial connection included).
        self.epoch = 0
        self.connects = 0
        self.reconnects = 0
        self.disconnects = 0
        self.slow_consumers = 0
        self.async_errors = 0
        self.last_error: str | None = None
        self.down_since: float | None = None
        self.down_seconds = 0.0
        self._up = False
        self._closing = False
        self.changed = _Waiters()
        self._streams: dict[str, list[str]] = {}
        self._recover_task: asyncio.Task[None] | None = None
        self._connecting = False
        self._log_budget = 20

    # -- state ----------------------------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        """Connected, and (after a reconnect) JetStream answers for every stream in use."""
        return self._up

    async def wait_up(self, timeout: float | None = None) -> bool:
        """Wait until the link is up; return False if ``timeout`` seconds passed first."""
        return await wait_until(lambda: self._up or self._closing, self.changed, timeout) and self._up

    def _set(self, state: str, up: bool) -> None:
        self.state = state
        if up and not self._up:
            self.epoch += 1
            if self.down_since is not None:
                self.down_seconds += time.monotonic() - self.down_since
                self.down_since = None
        elif not up and self._up:
            self.down_since = time.monotonic()
        self._up = up
        self.changed.notify()

    # -- streams --------------------------------------------------------------------------------------------

    def use_stream(self, stream: str, subjects: list[str]) -> None:
        """Record that the bridge needs JetStream stream ``stream`` (checked again after each reconnect)."""
        known = self._streams.setdefault(stream, [])
        for subject in subjects:
            if subject not in known:
                known.append(subject)

    async def ensure_stream(self, stream: str, subjects: list[str]) -> None:
        """Create ``stream`` (file storage) capturing ``subjects``, or extend an existing one to them."""
        from nats.js import api
        from nats.js.errors import NotFoundError

        self.use_stream(stream, subjects)
        wanted = self._streams[stream]
        try:
            info = await self.js.stream_info(stream)
        except NotFoundError:
            try:
                await self.js.add_stream(name=stream, subjects=list(wanted), storage=api.StorageType.FILE)
                return
            except Exception:  # created meanwhile by another process: fall through and check it
                info = await self.js.stream_info(stream)
        have = list(info.config.subjects or [])
        missing = [s for s in wanted if s not in have]
        if missing:
            await self.js.update_stream(config=info.config.evolve(subjects=have + missing))

    async def _jetstream_ready(self, deadline: float | None) -> None:
        """Retry (with backoff) until JetStream answers for every stream in use, recreating a missing one."""
        attempt = 0
        while True:
            try:
                for stream, subjects in list(self._streams.items()):
                    await self.ensure_stream(stream, subjects)
                return
            except Exception as exc:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                self.last_error = f"JetStream not ready: {exc!r}"
                await asyncio.sleep(self.backoff.delay(attempt))
                attempt += 1

    # -- nats-py callbacks ----------------------------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        from nats.errors import SlowConsumerError, StaleConnectionError, UnexpectedEOF

        if isinstance(exc, SlowConsumerError):
            self.slow_consumers += 1
            if self.slow_consumers in (1, 10, 100, 1000) or self.slow_consumers % 10000 == 0:
                logger.error("%s: slow consumer on %s: NATS messages dropped (%d so far); the importer's "
                             "sequence check counts them", self.name, exc.subject, self.slow_consumers)
            return
        self.async_errors += 1
        self.last_error = repr(exc)
        if self._connecting and "authorization" in str(exc).lower():
            # First connection: nats-py would retry the same credentials until the deadline. Raised from
            # here, this leaves nats.connect at once (initialize closes the client) and says why.
            what = "the credentials given" if self._auth else "a client without credentials"
            raise AuthorizationRefused(f"{self.name}: NATS at {', '.join(self.servers)} refused {what} ({exc}); "
                                       f"expected a token or user/password it accepts (NatsBridge(..., token=...))")
        if isinstance(exc, (OSError, TimeoutError, UnexpectedEOF, StaleConnectionError)) or not self._up:
            # the connection itself failed: the disconnected / reconnected warnings say it once
            logger.debug("%s: NATS connection error: %r", self.name, exc)
            return
        if self._log_budget > 0 and not self._closing:
            self._log_budget -= 1
            logger.warning("%s: NATS error: %r", self.name, exc)

    async def _on_disconnected(self) -> None:
        if self._closing or self.nc is None:  # (None: a failed first attempt being closed)
            return
        self.disconnects += 1
        logger.warning("%s: disconnected from NATS; reconnecting with backoff", self.name)
        self._set(LinkState.DISCONNECTED, False)

    async def _on_reconnected(self) -> None:
        self.reconnects += 1
        self._set(LinkState.RECOVERING, False)
        if self._recover_task is None or self._recover_task.done():
            self._recover_task = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        await self._jetstream_ready(None)
        if self.nc is not None and self.nc.is_connected and not self._closing:
            logger.warning("%s: reconnected to NATS (%s)", self.name, self.nc.connected_url.netloc)
            self._set(LinkState.CONNECTED, True)

    async def _on_closed(self) -> None:
        if self.nc is not None:  # not a failed first attempt being closed
            self._set(LinkState.CLOSED, False)

    def _pick_server(self, servers: list[Any], _info: dict[str, Any]) -> tuple[Any, float]:
        # nats-py asks before every reconnection attempt: choose the server tried least, wait the backoff.
        server = min(servers, key=lambda s: s.reconnects)
        return server, self.backoff.delay(server.reconnects)

    # -- task -----------------------------------------------------------------------------------------------

    async def initialize(self) -> None:
        """Connect, retrying with backoff for up to ``connect_timeout`` seconds, and check the streams."""
        from nats.aio.client import Client

        self._set(LinkState.CONNECTING, False)
        deadline = time.monotonic() + self.connect_timeout
        attempt = 0
        while True:
            nc = Client()  # made here (not by nats.connect) so that a failed attempt can be closed
            try:
                self._connecting = True
                await connect_within(
                    max(0.1, deadline - time.monotonic()),
                    self.servers,
                    client=nc,
                    name=self.client_name,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_to_server_handler=self._pick_server,
                    # only paces nats-py's own retries of this first connection (reconnections use
                    # _pick_server's backoff); the deadline above bounds them
                    reconnect_time_wait=max(self.backoff.initial, 0.01),
                    connect_timeout=max(1, min(2, int(self.connect_timeout))),
                    ping_interval=self.ping_interval,
                    pending_size=self.pending_size,
                    **self._auth,
                )
                break
            except BaseException as exc:
                self._connecting = False
                await _discard(nc)  # a connection cut short may hold a socket and reader tasks
                if isinstance(exc, AuthorizationRefused) or not isinstance(exc, Exception):
                    raise
                if time.monotonic() >= deadline:
                    raise ConnectionError(
                        f"{self.name}: cannot connect to NATS at {', '.join(self.servers)} within "
                        f"{self.connect_timeout} s: {exc!r}"
                    ) from exc
                await asyncio.sleep(min(self.backoff.delay(attempt), max(0.0, deadline - time.monotonic())))
                attempt += 1
            finally:
                self._connecting = False
        self.nc = nc
        self.js = nc.jetstream()
        self.connects += 1
        if self._streams:
            await self._jetstream_ready(deadline)
        self._set(LinkState.CONNECTED, True)

    async def execute(self) -> None:
        await self.changed.wait()

    async def shutdown(self) -> None:
        self._closing = True
        if self._recover_task is not None:
            self._recover_task.cancel()
        nc = self.nc
        if nc is not None and not nc.is_closed:
            try:
                await nc.close()  # writes what is still buffered before closing
            except Exception as exc:  # pragma: no cover - best effort at shutdown
                logger.debug("%s: close: %r", self.name, exc)
        self._set(LinkState.CLOSED, False)

    def stats(self) -> dict[str, Any]:
        """Return the connection's state and counters."""
        down = self.down_seconds + (time.monotonic() - self.down_since if self.down_since is not None else 0.0)
        nc = self.nc
        return {
            "state": self.state,
            "up": self._up,
            "servers": self.servers,
            "connected_url": nc.connected_url.geturl() if nc is not None and nc.connected_url else None,
            "connects": self.connects,
            "reconnects": self.reconnects,
            "disconnects": self.disconnects,
            "seconds_down": round(down, 3),
            "slow_consumers": self.slow_consumers,
            "async_errors": self.async_errors,
            "last_error": self.last_error,
            "out_msgs": nc.stats["out_msgs"] if nc is not None else 0,
            "in_msgs": nc.stats["in_msgs"] if nc is not None else 0,
        }
