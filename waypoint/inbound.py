"""The waypoint's HBONE handler: terminate each CONNECT, find what was dialled, sniff, then L7 or L4.

For every CONNECT (`HboneServer` 2-argument handler) the `:authority` names the logical
destination (plan.resolve: a Service VIP:port or a pod ip:port); one the state does not know
is refused (400 `unknown_destination`). The stream is accepted in process and the client's
SPIFFE identity from the mTLS handshake is the request source for policy and telemetry.

Protocol: a Service port declared TCP (name `tcp`/`tcp-*`) is relayed at L4 straight away.
Otherwise the first bytes are sniffed: an HTTP/1.x request line (an upper-case method token,
then a space) goes to the L7 path (`DownstreamConn` + `Pipeline`, keep-alive and pipelined
requests in order); the HTTP/2 prior-knowledge preface (gRPC) goes to the L7 path as
HTTP/2 (waypoint/http2/downstream.py: each stream is one `Pipeline.handle`, concurrently);
anything else (TLS, or a client silent for meshConfig.protocolDetectionTimeout where one is
set: Istio's default, 0, waits for the client's first bytes) is relayed at L4 to an endpoint
over its own CONNECT.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from mesh.clock import Clock
from mesh.hbone import ConnectRequest, HbonePool, HboneStream, PendingStream, TunnelError
from mesh.identity import SpiffeId
from mesh.model.base import ResourceKey
from mesh.proxy.sockets import SocketFactory
from mesh.state import ProxyState

from .http import ConnectionClosed, HttpError, Limits, RequestHead, ServerConnection
from .http2.base import PREFACE
from .pipeline import ConnInfo, DownstreamConn, Pipeline, local_reply_bytes
from .plan import Destination, Forward, resolve
from .telemetry import WaypointMetrics
from .tracing import Tracing
from .resilience import AttemptOutcome, OutcomeKind
from .upstream import Upstreams

__all__ = ["Inbound", "InboundContext", "sniff_http1", "sniff", "Sniffed"]

log = logging.getLogger("ambient.waypoint")

_MAX_METHOD = 20
_CONNECT_FAILURE = AttemptOutcome(kind=OutcomeKind.CONNECT_FAILURE, request_sent=False)
_HTTP2_PREFACE = b"PRI * HTTP/2.0"


class Sniffed(enum.Enum):
    HTTP1 = "http1"
    HTTP2 = "http2"
    TCP = "tcp"


def sniff_http1(buf: bytes) -> bool | None:
    """True: an HTTP/1.x request line starts here; False: it cannot; None: need more bytes."""
    for i, c in enumerate(buf[:_MAX_METHOD + 1]):
        if c == 0x20:
            return i > 0 and not _HTTP2_PREFACE.startswith(buf[:len(_HTTP2_PREFACE)])
        if not 0x41 <= c <= 0x5A:       # method tokens in use are upper-case letters (and '-')
            if c != 0x2D:
                return False
    return False if len(buf) > _MAX_METHOD else None


def sniff(buf: bytes) -> Sniffed | None:
    """What the stream's first bytes say it carries; None: need more bytes."""
    n = min(len(buf), len(PREFACE))
    if buf[:n] == PREFACE[:n]:
        return Sniffed.HTTP2 if n == len(PREFACE) else None
    v = sniff_http1(buf)
    return None if v is None else Sniffed.HTTP1 if v else Sniffed.TCP


@dataclass(frozen=True, slots=True, kw_only=True)
class InboundContext:
    identity: SpiffeId
    waypoint_namespace: str
    waypoint_name: str
    trust_domain: str
    state: ProxyState
    pool: HbonePool
    sockets: SocketFactory
    client_tls: Callable[[], ssl.SSLContext]
    clock: Clock
    rng: random.Random
    metrics: WaypointMetrics
    limits: Limits | None = None
    access_log: Callable[[str], None] | None = None
    """Writes one access-log line (the process's batched writer, waypoint/accesslog.py); None:
    through the `ambient.access` logger."""


class _Sniffer:
    """Holds the first bytes of a stream until the protocol is known."""

    def __init__(self) -> None:
        self.buf = b""
        self.eof = False
        self.decided: asyncio.Future[Sniffed | None] = asyncio.get_running_loop().create_future()
        self.transport: HboneStream | None = None

    def _decide(self, v: Sniffed | None) -> None:
        if not self.decided.done():
            self.transport.pause_reading()   # later bytes wait in the stream (unacknowledged)
            self.decided.set_result(v)

    def connection_made(self, t) -> None:
        self.transport = t

    def data_received(self, data) -> None:
        self.buf += data
        v = sniff(self.buf)
        if v is not None:
            self._decide(v)

    def eof_received(self) -> None:
        self.eof = True
        self._decide(Sniffed.TCP)

    def connection_lost(self, exc) -> None:
        if not self.decided.done():
            self.decided.set_result(None)

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


class _Half:
    """One side of an in-process L4 relay between two transports (both HBONE, or HBONE and TCP)."""

    def __init__(self, done: asyncio.Future[None] | None = None) -> None:
        self.peer: _Half | None = None
        self.transport = None
        self.gone = False
        self.done = done

    def connection_made(self, t) -> None:
        self.transport = t

    def data_received(self, data) -> None:
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        p = self.peer.transport
        if p.can_write_eof():
            p.write_eof()
        return True

    def connection_lost(self, exc) -> None:
        self.gone = True
        peer = self.peer
        if peer is not None and not peer.gone and peer.transport is not None:
            peer.transport.abort() if exc is not None else peer.transport.close()
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()


class Inbound:
    """The waypoint's CONNECT handler (see the module docstring)."""

    def __init__(self, ctx: InboundContext) -> None:
        self.ctx = ctx
        self.upstreams = Upstreams(identity=ctx.identity, pool=ctx.pool, sockets=ctx.sockets,
                                   client_tls=ctx.client_tls, trust_domain=ctx.trust_domain, state=ctx.state,
                                   clock=ctx.clock, rng=ctx.rng, limits=ctx.limits)
        self.pipeline = Pipeline(state=ctx.state, upstreams=self.upstreams, metrics=ctx.metrics, clock=ctx.clock,
                                 rng=ctx.rng, waypoint=ResourceKey("Gateway", ctx.waypoint_namespace,
                                                                   ctx.waypoint_name),
                                 waypoint_namespace=ctx.waypoint_namespace,
                                 tracing=Tracing(state=ctx.state, namespace=ctx.waypoint_namespace,
                                                 name=ctx.waypoint_name, clock=ctx.clock, rng=ctx.rng,
                                                 trust_domain=ctx.trust_domain),
                                 access_log=ctx.access_log)
        self.counts = {"connects": 0, "unknown_destination": 0, "l7_streams": 0, "l4_streams": 0,
                       "l4_connect_failures": 0, "codec_errors": 0, "h2_connections": 0, "h2_streams": 0}
        self._tasks: set[asyncio.Task] = set()

    def stats(self) -> dict:
        return {**self.counts, "requests": self.pipeline.requests, "upstream_opened": self.upstreams.opened,
                "upstream_reused": self.upstreams.reused, "upstream_idle": self.upstreams.idle_count(),
                "mirrors_in_flight": self.pipeline.mirrors.in_flight}

    async def close(self) -> None:
        if self.pipeline.tracing is not None:
            self.pipeline.tracing.close()
        await self.pipeline.mirrors.close()
        await self.upstreams.aclose()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _detect_timeout(self) -> float:
        """meshConfig.protocolDetectionTimeout; 0 (Istio's default): wait for the client's first bytes."""
        # Not 0.1 s, as this once was: a client that opens its connection before it has a
        # request (a pre-warmed pool) or a loaded node lost L7 routing and policy silently.
        mesh = self.ctx.state.mesh_config()
        return mesh.protocol_detection_timeout if mesh is not None else 0.0

    def _conn_info(self, req: ConnectRequest, dst: Destination) -> ConnInfo:
        peer_ip = req.peer_addr[0]
        src = self.ctx.state.workload_at(peer_ip)
        if src is None or src.identity != req.peer_identity:
            src = next((w for w in self.ctx.state.workloads() if w.identity == req.peer_identity), None)
        return ConnInfo(peer_identity=req.peer_identity, peer_ip=peer_ip, peer_addr=f"{peer_ip}:{req.peer_addr[1]}",
                        local_addr=f"{req.local_addr[0]}:{req.local_addr[1]}", src_ip=req.local_addr[0],
                        destination=dst, source=src)

    async def handle(self, req: ConnectRequest, pending: PendingStream) -> None:
        self.counts["connects"] += 1
        dst = resolve(self.ctx.state, req.authority)
        if dst is None:
            self.counts["unknown_destination"] += 1
            pending.reject(400, "unknown_destination")
            return
        stream = pending.accept()
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            info = self._conn_info(req, dst)
            if dst.tcp:
                await self._l4(stream, info, b"", False)
                return
            sniffer = _Sniffer()
            stream.set_protocol(sniffer)
            timeout = self._detect_timeout()
            if not timeout:
                proto = await sniffer.decided
            else:
                try:
                    proto = await asyncio.wait_for(asyncio.shield(sniffer.decided), timeout)
                except asyncio.TimeoutError:
                    stream.pause_reading()
                    proto = Sniffed.TCP
            if proto is None:
                return                                   # gone before saying anything
            if proto is Sniffed.HTTP1:
                await self._l7(stream, info, sniffer.buf, sniffer.eof)
            elif proto is Sniffed.HTTP2:
                await self._h2(stream, info, sniffer.buf, sniffer.eof)
            else:
                await self._l4(stream, info, sniffer.buf, sniffer.eof)
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _l7(self, stream: HboneStream, info: ConnInfo, first: bytes, eof: bool) -> None:
        self.counts["l7_streams"] += 1
        down = DownstreamConn(ServerConnection(self.ctx.limits))
        stream.set_protocol(down)
        down.data_received(first)
        if eof:
            down.eof_received()
        stream.resume_reading()
        try:
            while True:
                try:
                    ev = await down.next()
                except HttpError as e:
                    self.counts["codec_errors"] += 1
                    down.write(local_reply_bytes(e.status, b""))
                    self.pipeline.record_codec_error(info, e)
                    break
                if ev is None or type(ev) is ConnectionClosed:
                    break
                if type(ev) is RequestHead:
                    await self.pipeline.handle(ev, down, info)
                    if down.codec.should_close or down.lost:
                        break
        finally:
            down.close()

    async def _h2(self, stream: HboneStream, info: ConnInfo, first: bytes, eof: bool) -> None:
        from .http2 import H2Downstream, H2Settings   # h2 loads with the first HTTP/2 client (http2/__init__)
        self.counts["h2_connections"] += 1
        pipeline = self.pipeline

        def refused(e: HttpError) -> None:      # a request stream the HTTP/2 codec answered itself
            self.counts["codec_errors"] += 1
            pipeline.record_codec_error(info, e)

        limits = self.ctx.limits or Limits()
        down = H2Downstream(lambda head, s: pipeline.handle(head, s, info), refused=refused,
                            settings=H2Settings(max_header_list_size=limits.max_head_size))
        stream.set_protocol(down)
        if first:
            down.data_received(first)
        if eof:
            down.eof_received()
        stream.resume_reading()
        try:
            await down.closed
        finally:
            down.close()
            self.counts["h2_streams"] += down.requests

    async def _l4(self, stream: HboneStream, info: ConnInfo, first: bytes, eof: bool) -> None:
        self.counts["l4_streams"] += 1
        dst = info.destination
        if dst.service is not None:
            sp = dst.service_port
            tp = sp.target_port if sp is not None and isinstance(sp.target_port, int) else dst.port
            fwd = Forward(service=dst.service, port=dst.port, target_port=tp)
        else:
            fwd = Forward(service=None, port=dst.port, target_port=dst.port, workload=dst.workload)
        # Balanced and outlier-filtered like L7 (connect failures count); the circuit limits
        # are for HTTP connections and requests and do not apply to this relay.
        target = self.upstreams.choose(fwd)
        if target is None:
            stream.abort("no_healthy_upstream")
            return
        loop = asyncio.get_running_loop()
        done_down, done_up = loop.create_future(), loop.create_future()
        down, up = _Half(done_down), _Half(done_up)
        down.peer, up.peer = up, down
        try:
            await self.upstreams.open_transport(target, info.src_ip, up)
        except (TunnelError, OSError) as e:
            self.upstreams.report(target, _CONNECT_FAILURE)
            self.counts["l4_connect_failures"] += 1
            log.info("waypoint L4 %s -> %s: upstream connect failed: %s", info.peer_identity, target.address, e)
            stream.abort("upstream_connect_failed")
            return
        except BaseException:
            self.upstreams.report(target, None)
            raise
        self.upstreams.report(target, None)   # connected: no verdict on the endpoint beyond that
        stream.set_protocol(down)
        if first:
            up.transport.write(first)
        if eof:
            down.eof_received()
        stream.resume_reading()
        await asyncio.gather(done_down, done_up)
