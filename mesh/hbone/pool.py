"""HbonePool: pooled HBONE client connections per WorkloadKey and the client-side tunnel lifecycle.

Theory of operation
-------------------
Connections are pooled per `PoolKey` (ztunnel's WorkloadKey: source and destination identity
and IP), 1..n HTTP/2 connections per key. A tunnel takes a *reservation* on a connection
(`ClientSession.reserved`) before its CONNECT is sent and gives it back when the tunnel
ends, so concurrent callers share a connection that is still being established instead of
racing to open one each (single flight). A connection accepts reservations while
reserved < min(max_streams_per_conn, the peer's MAX_CONCURRENT_STREAMS); beyond that the
pool opens another connection for the same key.

Invariants:
* A connection is in the pool only while it may carry new streams: it leaves on GOAWAY
  (sent or received), on close, on stream-id exhaustion, or on a failed handshake/identity
  check (a mismatching server is never pooled).
* A connection with no reservation since `idle_timeout` is closed by a reaper task that
  runs on the injected clock.
* A CONNECT unanswered after `response_timeout` fails with connect_timeout, and its
  connection leaves the pool (GOAWAY; its other tunnels carry on): a connection whose peer
  went silent (a link down, a peer node gone without a reset) must not take every new
  tunnel for the key with it until TCP gives up, which can take many minutes.
* The pool never creates sockets: `connect()` is the caller's (pod netns, SO_MARK).

Two ways to use a stream. `open_stream()` returns the CONNECT stream after the 200 as a
transport for an in-process consumer (stream.HboneStream: a waypoint speaking HTTP over
it); its reservation is released when the stream's `done` resolves. `tunnel()` is
open_stream + `tunnel.splice` onto a downstream TCP transport (ztunnel): on any failure
before the 200 the downstream transport is aborted (the app sees a reset, as with
ztunnel; a non-200 answer closes it) and TunnelError says why.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence

from mesh.clock import Clock, SystemClock

from .api import PoolKey, TunnelError, TunnelResult
from .client import ClientSession, establish
from .connection import ConnectionConfig
from .stream import HboneStream
from .tunnel import Tunnel

__all__ = ["HbonePool"]

log = logging.getLogger(__name__)

_MAX_ACQUIRE_ATTEMPTS = 8
_REFUSED_RETRIES = 2
_NEVER_PROCESSED = frozenset({"goaway", "refused_stream"})


class HbonePool:
    """Client side of HBONE for one ztunnel (see the module docstring)."""

    def __init__(self, *, max_streams_per_conn: int = 100, idle_timeout: float = 300.0,
                 connect_timeout: float = 5.0, response_timeout: float = 10.0, clock: Clock | None = None,
                 config: ConnectionConfig | None = None) -> None:
        if max_streams_per_conn < 1:
            raise ValueError("max_streams_per_conn must be >= 1")
        self.max_streams_per_conn = max_streams_per_conn
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.response_timeout = response_timeout
        """Longest wait for the answer to a CONNECT; above the server's own upstream connect
        timeout (5 s), since it answers 200 only once the application is connected."""
        self._clock = clock or SystemClock()
        self._config = config or ConnectionConfig()
        self._conns: dict[PoolKey, list[ClientSession]] = {}
        self._pending: dict[ClientSession, asyncio.Task] = {}
        self._open: dict[ClientSession, PoolKey] = {}  # established, not closed: pooled or draining
        self._reaper: asyncio.Task | None = None
        self._closed = False
        self.connections_opened = 0
        """How many HTTP/2 connections this pool has established (tests, metrics)."""

    # -- public API -----------------------------------------------------------------------

    async def open_stream(self, key: PoolKey, *, connect: Callable[[], Awaitable[socket.socket]],
                          ssl_context: Callable[[], ssl.SSLContext], authority: str,
                          headers: Sequence[tuple[str, str]] = (), trust_domain: str) -> HboneStream:
        """Open a CONNECT to `authority` on a pooled connection for `key` and return the
        stream once the server answered 200 (see stream.HboneStream). The pool reservation
        is held until the stream's `done` resolves. Raises TunnelError (stable `reason`;
        `connect_rejected` with `status` for a non-200 answer).

        A CONNECT the server never processed -- refused (REFUSED_STREAM) or above the
        last stream id of a GOAWAY that crossed it (a peer ztunnel restarting) -- is sent
        again on another connection, up to twice (RFC 9113 §8.7: safe to retry)."""
        for attempt in range(_REFUSED_RETRIES + 1):
            try:
                return await self._open_once(key, connect=connect, ssl_context=ssl_context, authority=authority,
                                             headers=headers, trust_domain=trust_domain)
            except TunnelError as e:
                if e.reason not in _NEVER_PROCESSED or attempt == _REFUSED_RETRIES:
                    raise
                log.debug("hbone pool: CONNECT %s not processed by the server (%s); retrying", authority, e.reason)
        raise AssertionError("unreachable")

    async def _open_once(self, key: PoolKey, *, connect: Callable[[], Awaitable[socket.socket]],
                          ssl_context: Callable[[], ssl.SSLContext], authority: str,
                          headers: Sequence[tuple[str, str]] = (), trust_domain: str) -> HboneStream:
        """One attempt of open_stream."""
        session = await self._acquire(key, connect, ssl_context, trust_domain)
        stream: HboneStream | None = None
        try:
            stream = session.open_stream(authority, headers)
            session.flush()
            try:
                status = await asyncio.wait_for(asyncio.shield(stream.response), self.response_timeout)
            except TunnelError as e:
                if e.reason == "refused_stream":  # the retry must go to another connection
                    self._unpool(session)
                    session.goaway()
                raise TunnelError(e.reason, str(e)) from None
            except (asyncio.TimeoutError, TimeoutError):
                stream.abort("connect_timeout")
                # Suspect: out of the pool, so new tunnels get a new connection; it closes
                # once its other tunnels (if any) ended.
                self._unpool(session)
                session.goaway()
                raise TunnelError("connect_timeout", f"no answer to CONNECT {authority} within "
                                  f"{self.response_timeout:g}s") from None
            if status != 200:
                stream.discard = True
                stream.abort("connect_rejected")
                raise TunnelError("connect_rejected", f"HBONE server answered CONNECT {authority} with {status}",
                                  status=status)
        except asyncio.CancelledError:
            if stream is not None:
                stream.abort("cancelled")
            self._release(session)
            raise
        except TunnelError:
            self._release(session)
            raise
        except BaseException:
            if stream is not None:
                stream.abort("internal_error")
            self._release(session)
            raise
        stream.done.add_done_callback(lambda _f: self._release(session))
        return stream

    async def tunnel(self, key: PoolKey, *, downstream: asyncio.Transport,
                     connect: Callable[[], Awaitable[socket.socket]],
                     ssl_context: Callable[[], ssl.SSLContext], authority: str,
                     headers: Sequence[tuple[str, str]] = (), trust_domain: str) -> TunnelResult:
        """Relay `downstream` through a CONNECT to `authority` on a pooled connection for
        `key`; returns when both directions ended: `open_stream` + `splice`."""
        # uvloop starts reading an accepted transport right after connection_made, so a
        # pause there does not stick: pause again (idempotent). Bytes read before this are
        # replayed if the caller accepted with HoldingProtocol.
        if downstream.is_reading():
            downstream.pause_reading()
        try:
            stream = await self.open_stream(key, connect=connect, ssl_context=ssl_context, authority=authority,
                                            headers=headers, trust_domain=trust_domain)
        except TunnelError as e:
            if e.reason == "connect_rejected" and e.status is not None:
                downstream.close()
            else:
                downstream.abort()
            raise
        except BaseException:
            downstream.abort()
            raise
        tun: Tunnel | None = None
        try:
            tun = Tunnel.take_over(stream)
            tun.attach(downstream)
            return await asyncio.shield(tun.done)
        except asyncio.CancelledError:
            if tun is not None:
                tun.abort("cancelled")
            else:
                stream.abort("cancelled")
            downstream.abort()
            raise
        except BaseException:
            if tun is not None:
                tun.abort("internal_error")
            else:
                stream.abort("internal_error")
            downstream.abort()
            raise

    async def close(self) -> None:
        """Close every pooled connection (tunnels on them are reset)."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for task in list(self._pending.values()):
            task.cancel()
        sessions = [s for conns in self._conns.values() for s in conns]
        self._conns.clear()
        for s in sessions:
            for tun in list(s.tunnels.values()):
                tun.abort("pool_closed")
            s.abort("pool_closed")
        await asyncio.sleep(0)

    def drain(self) -> None:
        """A restart: every pooled connection leaves the pool with GOAWAY and closes once its
        tunnels ended; a later tunnel (rare: its connection was accepted just before the
        listeners closed) opens a new one."""
        for key, conns in list(self._conns.items()):
            for s in conns:
                if isinstance(s, ClientSession):
                    s.goaway()
            conns[:] = [s for s in conns if isinstance(s, _Placeholder)]
            if not conns:
                del self._conns[key]

    def evict(self, gone: Callable[[PoolKey], bool], reason: str) -> int:
        """Drop at once every connection (pooled or draining) whose key `gone` says is dead --
        a pod at one end was deleted: its tunnels end with `reason`, nothing waits for a
        peer that cannot answer. How many were dropped."""
        dead = [s for s, k in self._open.items() if gone(k)]
        for key, conns in list(self._conns.items()):
            if gone(key):
                for s in conns:
                    if isinstance(s, _Placeholder):  # still connecting: it fails on its own
                        continue
                    if s not in dead:
                        dead.append(s)
                conns[:] = [s for s in conns if isinstance(s, _Placeholder)]
                if not conns:
                    del self._conns[key]
        for s in dead:
            s.abort(reason, hard=True)
        return len(dead)

    @property
    def open_connections(self) -> int:
        """Established connections not closed yet, in the pool or draining out of it."""
        return len(self._open)

    def connection_count(self, key: PoolKey | None = None) -> int:
        """Pooled (usable or connecting) connections, for one key or all."""
        if key is not None:
            return len(self._conns.get(key, ()))
        return sum(len(v) for v in self._conns.values())

    # -- acquisition ----------------------------------------------------------------------

    def _limit(self, s: ClientSession) -> int:
        return min(self.max_streams_per_conn, s.conn.peer_max_concurrent_streams)

    async def _acquire(self, key: PoolKey, connect, ssl_context, trust_domain: str) -> ClientSession:
        if self._closed:
            raise TunnelError("pool_closed", "the HBONE pool is closed")
        for _ in range(_MAX_ACQUIRE_ATTEMPTS):
            conns = self._conns.setdefault(key, [])
            session = None
            for s in conns:
                if s.usable and s.reserved < self._limit(s):
                    session = s
                    break
            if session is None:
                session = self._start_connection(key, connect, ssl_context, trust_domain)
            session.reserved += 1
            session.idle_since = None
            if isinstance(session, _Placeholder):
                ph = session
                try:
                    await asyncio.shield(ph.ready)
                except TunnelError as e:
                    raise e.copy() from None
                except BaseException:
                    if ph.session is not None:
                        self._release(ph.session)
                    raise
                session = ph.session
            if session.conn.can_open_stream():
                return session
            self._release(session)                 # the peer's limits were lower: look again
        raise TunnelError("stream_unavailable", "no HBONE connection could take another stream")

    def _start_connection(self, key: PoolKey, connect, ssl_context, trust_domain: str) -> ClientSession:
        """Add a placeholder session to the pool now (so concurrent callers join it) and
        establish it in a task; its `ready` future carries the outcome."""
        loop = asyncio.get_running_loop()
        placeholder = _Placeholder(loop)
        self._conns[key].append(placeholder)  # type: ignore[arg-type]
        task = loop.create_task(self._connect(key, placeholder, connect, ssl_context, trust_domain))
        self._pending[placeholder] = task  # type: ignore[index]
        return placeholder  # type: ignore[return-value]

    async def _connect(self, key: PoolKey, ph: _Placeholder, connect, ssl_context, trust_domain: str) -> None:
        conns = self._conns.get(key, [])
        try:
            try:
                sock = await asyncio.wait_for(connect(), self.connect_timeout)
            except (asyncio.TimeoutError, TimeoutError):
                raise TunnelError("connect_failed", f"TCP connect to the HBONE server timed out "
                                  f"after {self.connect_timeout}s") from None
            except OSError as e:
                raise TunnelError("connect_failed", f"TCP connect to the HBONE server failed: {e} "
                                  "(maybe a NetworkPolicy blocks port 15008)") from None
            try:
                ctx = ssl_context()
            except Exception:
                sock.close()
                raise
            session = await establish(sock, ctx, expected=key.dst_identity, trust_domain=trust_domain,
                                      timeout=self.connect_timeout, config=self._config,
                                      on_closed=lambda s: self._forget(key, s))
        except BaseException as e:
            if ph in conns:
                conns.remove(ph)  # type: ignore[arg-type]
            err = e if isinstance(e, TunnelError) else TunnelError("connect_failed", f"HBONE connect failed: {e!r}")
            ph.ready.set_exception(err)
            ph.ready.exception()
            if not isinstance(e, (TunnelError, Exception)):
                raise
            return
        finally:
            self._pending.pop(ph, None)  # type: ignore[call-overload]
        self.connections_opened += 1
        if not session.closed:
            self._open[session] = key
        session.reserved = ph.reserved
        if self._closed:
            session.abort("pool_closed")
        elif ph in conns:
            conns[conns.index(ph)] = session  # type: ignore[arg-type]
        ph.session = session
        ph.ready.set_result(None)
        self._ensure_reaper()

    def _release(self, session: ClientSession) -> None:
        session.reserved -= 1
        if session.reserved <= 0:
            session.reserved = 0
            session.idle_since = self._clock.now()
        if not session.usable or session.conn.stream_ids_exhausted:
            self._drop(session)

    def _unpool(self, session: ClientSession) -> None:
        for conns in self._conns.values():
            if session in conns:
                conns.remove(session)

    def _drop(self, session: ClientSession) -> None:
        self._unpool(session)
        if session.reserved == 0 and not session.tunnels:
            session.goaway()

    def _forget(self, key: PoolKey, session: ClientSession) -> None:
        if session.closed:
            self._open.pop(session, None)
        conns = self._conns.get(key)
        if conns and session in conns:
            conns.remove(session)
            if not conns:
                del self._conns[key]

    # -- idle reaping -----------------------------------------------------------------------

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        period = max(self.idle_timeout / 4, 0.01)
        while not self._closed:
            await self._clock.sleep(period)
            now = self._clock.now()
            for key, conns in list(self._conns.items()):
                for s in list(conns):
                    if (isinstance(s, ClientSession) and s.reserved == 0 and not s.tunnels
                            and s.idle_since is not None and now - s.idle_since >= self.idle_timeout):
                        conns.remove(s)
                        log.debug("hbone pool: closing idle connection for %s", key)
                        s.goaway()
                        if s.transport is not None:
                            s.transport.close()
                if not conns:
                    self._conns.pop(key, None)


class _Placeholder:
    """Stands in the pool for a connection being established; callers reserve on it and
    the reservations move to the real session once it is ready."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.ready: asyncio.Future[None] = loop.create_future()
        self.reserved = 0
        self.idle_since = None
        self.session: ClientSession | None = None
        self.usable = True
        self.tunnels: dict = {}
        self.conn = _NoConn


class _NoConn:
    peer_max_concurrent_streams = 2**31 - 1
