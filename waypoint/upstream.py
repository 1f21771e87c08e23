"""Upstream endpoints and connections: choose a pod (balancer, outlier detection), admit (circuit breakers), connect, pool.

`choose(fwd, request=, avoid=)` finds the request's cluster (waypoint/endpoints.py: one balancer,
outlier detector and set of circuit counters per `outbound|<port>|<subset>|<fqdn>`) and picks an
endpoint, or None (-> 503 `no healthy upstream`, UH). Every chosen target is `report`ed exactly
once with the attempt's outcome and RTT (`UpstreamConn.rtt`: first response byte after the
request went out).

`acquire(target, src_ip)` applies the cluster's DestinationRule connectionPool limits in Envoy's
order (resilience/circuit.py decides, this module counts and waits): a free keep-alive connection
to the endpoint -> use it; else a new connection while fewer than `maxConnections` are open (or
the endpoint has none at all) -- it must be up within `connectTimeout`, else `ConnectTimeout`;
else wait in the endpoint's queue while fewer than `http1MaxPendingRequests` wait (a released
connection goes straight to the oldest waiter; a closed one lets a waiter connect), else
`Overflow`. With a connection in hand, `http2MaxRequests` requests already in flight -> `Overflow`
(the connection stays for the next request). The data path answers
`Overflow` with 503 UO (`x-envoy-overloaded: true`) and `ConnectTimeout` like any connect
failure (503 UF, `connection timeout`).

`release(conn, reusable)` returns the connection: kept (newest first, at most
MAX_IDLE_PER_ENDPOINT per endpoint) unless it is not reusable, has served
`maxRequestsPerConnection` requests, or its pool is full; idle ones are closed after
`idleTimeout`. One CONNECT is one upstream HTTP/1.1 connection: HBONE to the endpoint pod's
ztunnel (`<pod ip>:15008`, `:authority <pod ip>:<target port>`, pooled per PoolKey by HbonePool so
streams share one mTLS connection); pods outside the mesh (tunnel protocol NONE) get plain TCP.

HTTP/2 upstream: when the cluster's Service port declares HTTP/2 (appProtocol `grpc`, `http2`,
`kubernetes.io/h2c`, or a `grpc-`/`http2-` name: waypoint/protocols.py) one CONNECT carries
one h2c connection (waypoint/http2/upstream.py) and `acquire` returns a stream on it: the
endpoint's open connection with stream capacity is shared by concurrent requests (one
connect at a time per endpoint, the others wait for it), another is opened when the
backend's MAX_CONCURRENT_STREAMS is reached or it sent GOAWAY. The request limits
(`http2MaxRequests`) apply per stream; `maxRequestsPerConnection` and `idleTimeout` per
connection.

A background task (started with the first cluster) runs each cluster's outlier sweep every
`interval` and closes idle connections past `idleTimeout`.
"""
from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from mesh.clock import Clock
from mesh.hbone import HbonePool, PoolKey
from mesh.identity import SpiffeId
from mesh.model import TunnelProtocol
from mesh.proxy.sockets import SocketFactory
from mesh.state import ProxyState

from .channel import HttpChannel
from .endpoints import (NO_REQUEST, Cluster, ClusterConfig, Clusters, EndpointTarget, HashRequest, cluster_exposition,
                        endpoint_targets)
from .http import ClientConnection, Limits
from .plan import Forward
from .tracing import CONNECT_TRACEPARENT
from .protocols import PortProtocol, port_protocol
from .resilience import (AttemptOutcome, ConnectionAction, OverflowReason, PoolCounters, admit_request,
                         connection_reusable, idle_expired, plan_connection)

if TYPE_CHECKING:                    # loaded on first use: h2 is ~1 MB of RSS (http2/__init__)
    from .http2.upstream import ClientStream, H2Upstream

__all__ = ["EndpointTarget", "HashRequest", "Upstreams", "UpstreamConn", "Overflow", "ConnectTimeout", "Withdrawn",
           "HBONE_PORT", "MAX_IDLE_PER_ENDPOINT", "endpoints", "pick"]

log = logging.getLogger("ambient.waypoint")

HBONE_PORT = 15008
MAX_IDLE_PER_ENDPOINT = 1024
"""Envoy keeps every released HTTP/1.1 connection (idleTimeout closes them); a small cap churned
connections whenever more clients than the cap were concurrent (16 for 32 clients: a new
upstream CONNECT every ~4 requests). Only a bound on a pathological burst."""
SWEEP_TICK = 1.0
"""Seconds between background passes at most (outlier sweeps run at their own interval)."""


class Overflow(Exception):
    """A circuit breaker refused the attempt (503 UO, never retried)."""

    def __init__(self, reason: OverflowReason, cluster: str) -> None:
        super().__init__(f"{cluster}: {reason.value} circuit breaker overflowed")
        self.reason = reason


class Withdrawn(Exception):
    """The client left while its request waited for a connection (Envoy cancels such a pending
    request: upstream_rq_cancelled); nothing was sent upstream."""


class ConnectTimeout(TimeoutError):
    """The upstream connection was not up within the cluster's connectTimeout (503 UF)."""

    reason = "connection_timeout"


class UpstreamConn(HttpChannel):
    """One upstream HTTP/1.1 connection (an HBONE stream or TCP) with its client codec."""

    __slots__ = ("codec", "target", "served", "idle_since", "started_at", "first_byte_at", "counted", "_clock",
                 "_on_lost")

    def __init__(self, target: EndpointTarget, limits: Limits | None = None, *, clock: Clock | None = None,
                 on_lost: Callable[[UpstreamConn], None] | None = None) -> None:
        self.codec = ClientConnection(limits)
        super().__init__(self.codec.receive_data)
        self.target = target
        self.served = 0
        """Requests this connection has carried (maxRequestsPerConnection)."""
        self.idle_since = 0.0
        self.started_at = 0.0
        """When the current attempt got this connection."""
        self.first_byte_at: float | None = None
        self.counted = False
        """Counted in its cluster's open connections (uncounted once, when it goes)."""
        self._clock = clock
        self._on_lost = on_lost

    @property
    def usable(self) -> bool:
        return not self.lost and not self.ended and self.codec.reusable

    @property
    def rtt(self) -> float | None:
        """Seconds from the attempt taking this connection to the first response byte; None
        before any byte came."""
        if self.first_byte_at is None:
            return None
        return max(0.0, self.first_byte_at - self.started_at)

    def data_received(self, data) -> None:
        if self.first_byte_at is None and self._clock is not None:
            self.first_byte_at = self._clock.now()
        super().data_received(data)

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        if self._on_lost is not None:
            self._on_lost(self)


def endpoints(state: ProxyState, fwd: Forward) -> list[EndpointTarget]:
    """The endpoints of `fwd`, unbalanced and unfiltered by outlier detection, for code not yet
    on `Upstreams.choose`: they belong to no cluster (`cluster` ""), so `acquire` applies no
    circuit limits to them and nothing reports to a balancer."""
    svc = (state.service(fwd.service.uid) or fwd.service) if fwd.service is not None else None
    return endpoint_targets(state, svc, fwd, "")


def pick(targets: list[EndpointTarget], rng: random.Random) -> EndpointTarget | None:
    """Uniform choice (the stand-in balancer before `Upstreams.choose`)."""
    return targets[rng.randrange(len(targets))] if targets else None


def _counters(c: Cluster) -> PoolCounters:
    return PoolCounters(open_connections=c.open_connections, pending_requests=c.pending_requests,
                        active_requests=c.active_requests)


class Upstreams:
    """Chooses endpoints and opens, keeps and reuses upstream connections (module docstring)."""

    def __init__(self, *, identity: SpiffeId, pool: HbonePool, sockets: SocketFactory,
                 client_tls: Callable[[], ssl.SSLContext], trust_domain: str, state: ProxyState, clock: Clock,
                 rng: random.Random, limits: Limits | None = None) -> None:
        self.identity = identity
        self.pool = pool
        self.sockets = sockets
        self.client_tls = client_tls
        self.trust_domain = trust_domain
        self.clock = clock
        self.rng = rng
        self.limits = limits
        self.clusters = Clusters(state)
        self._loose = Cluster("", Forward(service=None, port=0, target_port=0), ClusterConfig(), None, [], now=0.0,
                              version=-1, service=None)
        """Where targets that no cluster chose (cluster "", from `endpoints()`) are counted: no limits."""
        self._idle: dict[tuple[str, str], list[UpstreamConn]] = {}
        self._h2: dict[tuple[str, str], list[H2Upstream]] = {}
        self._h2_connecting: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._waiters: dict[tuple[str, str], deque[asyncio.Future[UpstreamConn | None]]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self.opened = 0
        self.reused = 0

    # -- choosing ------------------------------------------------------------------------------

    def choose(self, fwd: Forward, *, request: HashRequest = NO_REQUEST,
               avoid: frozenset[str] = frozenset()) -> EndpointTarget | None:
        """The endpoint for one attempt of `fwd`, or None when the cluster has none usable.
        `avoid`: endpoint addresses (`ip:port`) already tried, skipped when another is usable."""
        now = self.clock.now()
        c = self.clusters.cluster_for(fwd, now)
        if self._sweeper is None and not self._closed:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())
        return c.choose(now, self.rng, request, avoid)

    def report(self, target: EndpointTarget, outcome: AttemptOutcome | None, rtt: float | None = None) -> None:
        """How the attempt `choose` sent to `target` ended (exactly once per chosen target);
        None: it ended without a verdict on the endpoint (the client went away)."""
        c = self.clusters.get(target.cluster)
        if c is None:
            return
        ej = c.report(target, outcome, rtt, self.clock.now())
        if ej is not None:
            log.info("waypoint cluster %s: %s ejected (%s, ejection %d, until +%.1fs)", c.key, ej.endpoint,
                     ej.cause.value, ej.ejection_count, ej.until - self.clock.now())

    def count(self, target: EndpointTarget, stat: str) -> None:
        """One more of the cluster statistic `stat` (a ClusterStats field) for `target`'s cluster."""
        c = self.clusters.get(target.cluster)
        if c is not None:
            setattr(c.stats, stat, getattr(c.stats, stat) + 1)

    # -- connections ---------------------------------------------------------------------------

    async def open_transport(self, target: EndpointTarget, src_ip: str, protocol) -> None:
        """Connect `protocol` to `target`: a CONNECT on a pooled HBONE connection, or TCP for
        a pod outside the mesh. Raises TunnelError / OSError."""
        w = target.workload
        if w.protocol is TunnelProtocol.HBONE:
            ip = str(w.ip)
            key = PoolKey(src_identity=self.identity, dst_identity=w.identity, src_ip=src_ip, dst_ip=ip)
            tp = CONNECT_TRACEPARENT.get()   # the span that caused this connection, when tracing is on
            stream = await self.pool.open_stream(
                key, connect=lambda: self.sockets.connect((ip, HBONE_PORT)), ssl_context=self.client_tls,
                authority=target.address, trust_domain=self.trust_domain,
                headers=(("traceparent", tp),) if tp is not None else ())
            stream.set_protocol(protocol)
        else:
            sock = await self.sockets.connect((str(w.ip), target.port))
            await asyncio.get_running_loop().create_connection(lambda: protocol, sock=sock)
        self.opened += 1

    def take_idle(self, target: EndpointTarget) -> UpstreamConn | None:
        """`acquire`'s answer when it needs no wait: an idle HTTP/1.1 connection to `target`
        that the circuit limits admit a request on, counted as `acquire` counts it. None
        (nothing changed) when `acquire` must run: none idle, HTTP/2, or not admitted. For the
        common request, without a coroutine."""
        c = self._cluster_of(target.cluster)
        if c is None:
            return None
        key = (c.key, target.address)
        if not self._idle.get(key) or wants_http2(c) or not admit_request(c.limits, _counters(c)).admitted:
            return None
        conn = self._pop_idle(key, c)
        if conn is None:
            return None
        self.reused += 1
        c.active_requests += 1
        conn.started_at = self.clock.now()
        conn.first_byte_at = None
        return conn

    async def acquire(self, target: EndpointTarget, src_ip: str, *,
                      gone: Callable[[], asyncio.Future[None]] | None = None) -> UpstreamConn:
        """A connection to `target` for one attempt, within the cluster's circuit limits.
        Raises Overflow, ConnectTimeout, TunnelError or OSError; Withdrawn when `gone()` (the
        client's departure) resolves while the request waits in the pending queue."""
        c = self._cluster_of(target.cluster)
        if c is None:
            raise LookupError(f"acquire for {target.address} of cluster {target.cluster!r}, which choose() "
                              f"did not return")
        key = (c.key, target.address)
        if wants_http2(c):
            return await self._acquire_h2(c, key, target, src_ip)
        queued = False
        while True:
            conn = self._pop_idle(key, c)
            if conn is not None:
                self.reused += 1
                break
            plan = plan_connection(c.limits, _counters(c), free_connection=False,
                                   endpoint_connections=c.endpoint_connections.get(target.address, 0))
            if plan.action is ConnectionAction.CONNECT:
                if plan.beyond_max_connections:
                    c.stats.upstream_cx_overflow += 1
                conn = await self._connect(c, target, src_ip, count_pending=not queued)
                break
            if plan.action is ConnectionAction.OVERFLOW:
                c.stats.upstream_rq_pending_overflow += 1
                raise Overflow(plan.overflow or OverflowReason.MAX_PENDING_REQUESTS, c.key)
            if not queued:   # QUEUE: Envoy counts the connection breaker's overflow, then waits
                queued = True
                c.stats.upstream_cx_overflow += 1
                c.stats.upstream_rq_pending_total += 1
            conn = await self._wait(key, c, gone)
            if conn is not None and conn.usable:
                break
            # None: a connection to the endpoint went away; plan again (room to connect now)
        # http2MaxRequests is checked as the request is put on its connection, as Envoy's pool
        # does (attachStreamToClient): requests waiting for one do not count.
        adm = admit_request(c.limits, _counters(c))
        if not adm.admitted:
            self._offer(conn)
            c.stats.upstream_rq_pending_overflow += 1
            raise Overflow(adm.overflow or OverflowReason.MAX_REQUESTS, c.key)
        c.active_requests += 1
        conn.started_at = self.clock.now()
        conn.first_byte_at = None
        return conn

    async def _acquire_h2(self, c: Cluster, key: tuple[str, str], target: EndpointTarget,
                          src_ip: str) -> ClientStream:
        while True:
            mux = next((m for m in self._h2.get(key, ()) if m.has_capacity), None)
            if mux is not None:
                self.reused += 1
                break
            pending = self._h2_connecting.get(key)
            if pending is not None:                 # another request is connecting: share it
                await asyncio.shield(pending)
                continue
            fut = self._h2_connecting[key] = asyncio.get_running_loop().create_future()
            try:
                mux = await self._connect_h2(c, target, src_ip)
            finally:
                del self._h2_connecting[key]
                fut.set_result(None)
            break
        adm = admit_request(c.limits, _counters(c))       # http2MaxRequests, per stream
        if not adm.admitted:
            c.stats.upstream_rq_pending_overflow += 1
            raise Overflow(adm.overflow or OverflowReason.MAX_REQUESTS, c.key)
        c.active_requests += 1
        s = mux.new_stream()
        s.started_at = self.clock.now()
        return s

    async def _connect_h2(self, c: Cluster, target: EndpointTarget, src_ip: str) -> H2Upstream:
        from .http2.upstream import H2Upstream   # h2 loads with the first HTTP/2 cluster (http2/__init__)
        mux = H2Upstream(target, clock=self.clock, on_lost=self._forget_h2)
        mux.counted = True
        c.open_connections += 1
        c.endpoint_connections[target.address] = c.endpoint_connections.get(target.address, 0) + 1
        c.pending_requests += 1
        c.stats.upstream_cx_total += 1
        c.stats.upstream_rq_pending_total += 1
        timeout = c.limits.connect_timeout
        try:
            await asyncio.wait_for(self.open_transport(target, src_ip, mux), timeout)
        except TimeoutError as e:
            c.stats.upstream_cx_connect_fail += 1
            c.stats.upstream_cx_connect_timeout += 1
            mux.abort()
            self._forget_h2(mux)
            raise ConnectTimeout(f"connection timeout: {target.address} not connected within {timeout:g}s") from e
        except BaseException as e:
            if not isinstance(e, asyncio.CancelledError):
                c.stats.upstream_cx_connect_fail += 1
            mux.abort()
            self._forget_h2(mux)
            raise
        finally:
            c.pending_requests -= 1
        if mux.gone:
            self._forget_h2(mux)
            raise ConnectionResetError(f"{target.address}: the HTTP/2 connection closed at once")
        self._h2.setdefault((c.key, target.address), []).append(mux)
        return mux

    def _forget_h2(self, mux: H2Upstream) -> None:
        if not mux.counted:
            return
        mux.counted = False
        t = mux.target
        key = (t.cluster, t.address)
        conns = self._h2.get(key)
        if conns is not None:
            if mux in conns:
                conns.remove(mux)
            if not conns:
                del self._h2[key]
        self._uncount(t)

    def _uncount(self, t: EndpointTarget) -> None:
        """One upstream connection to `t` fewer in its cluster's circuit counters."""
        c = self._cluster_of(t.cluster)
        if c is None:
            return
        c.open_connections -= 1
        n = c.endpoint_connections.get(t.address, 0) - 1
        if n > 0:
            c.endpoint_connections[t.address] = n
        else:
            c.endpoint_connections.pop(t.address, None)

    def _release_h2(self, s: ClientStream, reusable: bool) -> None:
        mux = s.mux
        c = self._cluster_of(s.target.cluster)
        mux.release(s)
        if c is not None:
            c.active_requests = max(0, c.active_requests - 1)
            if not connection_reusable(c.limits, mux.served) and not mux.going_away:
                c.stats.upstream_cx_max_requests += 1
                mux.going_away = True        # no new streams; closed once its streams are done
        if mux.active == 0:
            mux.idle_since = self.clock.now()
            if mux.going_away or self._closed:
                mux.close()
                self._forget_h2(mux)

    async def _wait(self, key: tuple[str, str], c: Cluster,
                    gone: Callable[[], asyncio.Future[None]] | None) -> UpstreamConn | None:
        fut: asyncio.Future[UpstreamConn | None] = asyncio.get_running_loop().create_future()
        q = self._waiters.setdefault(key, deque())
        q.append(fut)
        c.pending_requests += 1
        try:
            if gone is not None:
                g = gone()
                await asyncio.wait((fut, g), return_when=asyncio.FIRST_COMPLETED)
                if g.done():
                    if fut.done() and not fut.cancelled() and fut.exception() is None and fut.result() is not None:
                        self._offer(fut.result())    # handed over just as the client left: pass it on
                    fut.cancel()
                    c.stats.upstream_rq_cancelled += 1
                    raise Withdrawn(f"the client left while its request to {key[1]} waited for a connection")
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.result() is not None:
                self._offer(fut.result())   # handed over as we were cancelled: pass it on
            raise
        finally:
            c.pending_requests -= 1
            if fut in q:
                q.remove(fut)
            if not q:
                self._waiters.pop(key, None)

    async def _connect(self, c: Cluster, target: EndpointTarget, src_ip: str, *, count_pending: bool) -> UpstreamConn:
        conn = UpstreamConn(target, self.limits, clock=self.clock, on_lost=self._forget)
        conn.counted = True
        c.open_connections += 1
        c.endpoint_connections[target.address] = c.endpoint_connections.get(target.address, 0) + 1
        c.pending_requests += 1
        c.stats.upstream_cx_total += 1
        if count_pending:
            c.stats.upstream_rq_pending_total += 1
        timeout = c.limits.connect_timeout
        try:
            await asyncio.wait_for(self.open_transport(target, src_ip, conn), timeout)
        except TimeoutError as e:
            c.stats.upstream_cx_connect_fail += 1
            c.stats.upstream_cx_connect_timeout += 1
            conn.abort()
            self._forget(conn)
            raise ConnectTimeout(f"connection timeout: {target.address} not connected within {timeout:g}s") from e
        except BaseException as e:
            if not isinstance(e, asyncio.CancelledError):
                c.stats.upstream_cx_connect_fail += 1
            conn.abort()
            self._forget(conn)
            raise
        finally:
            c.pending_requests -= 1
        return conn

    def _cluster_of(self, key: str) -> Cluster | None:
        return self.clusters.get(key) if key else self._loose

    def _pop_idle(self, key: tuple[str, str], c: Cluster) -> UpstreamConn | None:
        idle = self._idle.get(key)
        now = self.clock.now()
        while idle:
            conn = idle.pop()
            if conn.usable and not idle_expired(c.limits, conn.idle_since, now):
                return conn
            if conn.usable:
                c.stats.upstream_cx_idle_timeout += 1
            conn.close()
            self._forget(conn)
        return None

    def _forget(self, conn: UpstreamConn) -> None:
        """`conn` is closing or gone: uncount it once; a waiter for its endpoint may connect."""
        if not conn.counted:
            return
        conn.counted = False
        t = conn.target
        key = (t.cluster, t.address)
        idle = self._idle.get(key)
        if idle is not None:
            if conn in idle:
                idle.remove(conn)
            if not idle:
                del self._idle[key]
        self._uncount(t)
        self._wake(key, None)

    def _wake(self, key: tuple[str, str], conn: UpstreamConn | None) -> bool:
        q = self._waiters.get(key)
        while q:
            fut = q.popleft()
            if not fut.done():
                fut.set_result(conn)
                return True
        return False

    def _offer(self, conn: UpstreamConn) -> None:
        """A free, reusable connection: to the oldest waiter for its endpoint, else the idle pool."""
        t = conn.target
        key = (t.cluster, t.address)
        if self._wake(key, conn):
            return
        conn.idle_since = self.clock.now()
        idle = self._idle.setdefault(key, [])
        idle.append(conn)
        if len(idle) > MAX_IDLE_PER_ENDPOINT:
            old = idle.pop(0)
            old.close()
            self._forget(old)

    def release(self, conn: UpstreamConn, reusable: bool) -> None:
        """Done with `conn` (once per acquire): keep it for the next request to its endpoint,
        or close it."""
        if type(conn) is not UpstreamConn:            # an HTTP/2 ClientStream
            self._release_h2(conn, reusable)
            return
        c = self._cluster_of(conn.target.cluster)
        conn.served += 1
        limits_ok = True
        if c is not None:
            c.active_requests = max(0, c.active_requests - 1)
            limits_ok = connection_reusable(c.limits, conn.served)
            if not limits_ok and reusable:
                c.stats.upstream_cx_max_requests += 1
        if not (reusable and limits_ok and conn.usable) or self._closed:
            conn.abort() if not conn.codec.reusable else conn.close()
            self._forget(conn)
            return
        self._offer(conn)

    # -- background ----------------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        clock = self.clock
        while True:
            nxt = self.clusters.next_sweep()
            now = clock.now()
            await clock.sleep(SWEEP_TICK if nxt is None else min(SWEEP_TICK, max(0.01, nxt - now)))
            try:
                self.sweep(clock.now())
            except Exception:   # a bug here must not end the sweeps (ejections would never end)
                log.exception("waypoint upstream sweep failed")

    def sweep(self, now: float) -> None:
        """Due outlier sweeps; idle connections past idleTimeout, or to endpoints that left
        their cluster, closed."""
        for c, back in self.clusters.sweep(now):
            log.info("waypoint cluster %s: %s back from outlier ejection", c.key, ", ".join(back))
        for (cluster, _), muxes in list(self._h2.items()):
            c = self.clusters.get(cluster)
            for mux in list(muxes):
                if mux.active == 0 and (c is None or idle_expired(c.limits, mux.idle_since, now)):
                    if c is not None:
                        c.stats.upstream_cx_idle_timeout += 1
                    mux.close()
                    self._forget_h2(mux)
        for (cluster, address), conns in list(self._idle.items()):
            c = self._cluster_of(cluster)
            gone = c is None or (c is not self._loose and address not in c.targets)
            for conn in list(conns):
                if gone or idle_expired(c.limits, conn.idle_since, now):
                    if not gone:
                        c.stats.upstream_cx_idle_timeout += 1
                    conn.close()
                    self._forget(conn)

    def snapshot(self) -> list[dict]:
        """The clusters for the admin config dump."""
        out = []
        for c in sorted(self.clusters, key=lambda x: x.key):
            od = c.outlier
            out.append({
                "name": c.key, "lb": c.config.balancer.algorithm.value, "outlier_detection": od is not None,
                "endpoints": [{"address": a, "ejected": bool(od and od.is_ejected(a))} for a in c.addresses],
                "open_connections": c.open_connections, "pending_requests": c.pending_requests,
                "active_requests": c.active_requests, "inflight": c.inflight,
                "idle_connections": sum(len(self._idle.get((c.key, a), ())) for a in c.addresses),
                "http2": wants_http2(c),
                "http2_connections": [{"endpoint": a, "streams": m.active, "served": m.served}
                                      for a in c.addresses for m in self._h2.get((c.key, a), ())]})
        return out

    def exposition(self) -> bytes:
        """The clusters' Envoy statistics in the Prometheus text format."""
        return cluster_exposition(self.clusters)

    def idle_count(self) -> int:
        return (sum(1 for conns in self._idle.values() for c in conns if c.usable) +
                sum(1 for muxes in self._h2.values() for m in muxes if m.usable and m.active == 0))

    def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conns in list(self._idle.values()):
            for c in list(conns):
                c.close()
                self._forget(c)
        self._idle.clear()
        for muxes in list(self._h2.values()):
            for m in list(muxes):
                m.close()
                self._forget_h2(m)
        for q in self._waiters.values():
            for fut in q:
                if not fut.done():
                    fut.set_exception(ConnectionAbortedError("the waypoint's upstreams are closing"))

    async def aclose(self) -> None:
        self.close()
        if self._sweeper is not None:
            await asyncio.gather(self._sweeper, return_exceptions=True)


def wants_http2(c: Cluster) -> bool:
    """The cluster's Service port declares HTTP/2 (gRPC, h2c): requests go upstream as HTTP/2."""
    if c.http2 is None:
        svc = c.service
        sp = next((p for p in svc.ports if p.port == c.port), None) if svc is not None else None
        c.http2 = svc is not None and port_protocol(sp) is PortProtocol.HTTP2
    return c.http2
