"""One request through the waypoint, in Istio's filter order: authz -> route -> endpoint -> upstream exchange.

`Pipeline.handle(head, down)` runs a request that arrived on a downstream connection to its
end and records exactly one `RequestResult` (metrics + one access-log line on `ambient.access`):

1. `x-request-id` is kept, or generated (uuid4 from the injected rng) and sent upstream;
2. L7 AuthorizationPolicy (waypoint/authz.py): a deny is its LocalReply (403 `RBAC: access denied`);
3. routing (waypoint/plan.py): a Reply (404 NR, redirect, 500/503 NC) or a Forward;
   then its fault (waypoint/fault.py: delay, then abort as a local reply, flags DI/FI) and its
   mirrors (waypoint/mirror.py: the body is teed, copies go fire-and-forget once it has ended);
4. endpoint: `Upstreams.choose` (the cluster's balancer over the endpoints outlier detection
   leaves, waypoint/endpoints.py); none -> 503 `no healthy upstream` (UH);
5. `Upstreams.acquire` within the cluster's circuit limits: overflow -> 503 UO
   (`x-envoy-overloaded: true`); a connect failure or connectTimeout -> 503 UF with Envoy's body;
6. `exchange()` over the kept-alive or new upstream connection, then `release` and `report`
   (exactly once per chosen endpoint: the outcome feeds outlier detection and the balancer).
   `exchange` is the seam the resilience layer (retries, timeouts) wraps:
   it takes one attempt's upstream connection and streams the request body up and the
   response down, returning a typed `ExchangeResult`.

Bodies stream both ways with backpressure (HttpChannel water marks, `drain()`), never buffered
(a mirrored request's body is also copied, up to a bound, for its copies).
"""
from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import random
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from mesh.clock import Clock
from mesh.hbone import TunnelError
from mesh.identity import SpiffeId
from mesh.model import Workload
from mesh.model.base import ResourceKey
from mesh.model.route import HeaderModifier
from mesh.state import ProxyState

from . import authz, fault
from .channel import HttpChannel
from .headers import apply_modifiers
from .mirror import Mirrors
from .upgrade import relay
from .http import (Body, EndOfMessage, HttpError, InformationalResponse, LocalProtocolError, RequestHead,
                   ResponseHead, ServerConnection)
from .plan import Destination, Forward, Reply, plan_request, refresh, service_fqdn
from .routing import RequestInfo
from .telemetry import RequestLabels, RequestResult, WaypointMetrics, access_log_line
from .resilience import AttemptOutcome, OutcomeKind
from .resilience.circuit import OVERFLOW_BODY, OVERFLOW_HEADERS
from .upstream import ConnectTimeout, EndpointTarget, HashRequest, Overflow, UpstreamConn, Upstreams, Withdrawn

__all__ = ["Pipeline", "ConnInfo", "DownstreamConn", "ExchangeResult", "exchange", "attempt_outcome",
           "local_reply_bytes"]

access = logging.getLogger("ambient.access")
log = logging.getLogger("ambient.waypoint")

_NO_HEALTHY = Reply(status=503, body=b"no healthy upstream", flags="UH", details="no_healthy_upstream")
_UPSTREAM_RESET = b"upstream connect error or disconnect/reset before headers. reset reason: "
_OVERFLOW = Reply(status=503, body=OVERFLOW_BODY, flags="UO", details="upstream_reset_before_response_started{overflow}",
                  headers=tuple((n.encode(), v.encode()) for n, v in OVERFLOW_HEADERS))
_OVERFLOW_OUTCOME = AttemptOutcome(kind=OutcomeKind.OVERFLOW, request_sent=False)
_CONNECT_FAILURE = AttemptOutcome(kind=OutcomeKind.CONNECT_FAILURE, request_sent=False)


class DownstreamConn(HttpChannel):
    """The client side of one HBONE stream carrying HTTP/1.1, with its server codec."""

    __slots__ = ("codec", "_gone")

    def __init__(self, codec: ServerConnection) -> None:
        self.codec = codec
        self._gone: asyncio.Future[None] | None = None
        super().__init__(codec.receive_data)

    def gone(self) -> asyncio.Future[None]:
        """Resolves when the client closes or resets its side (made on first use: only a request
        waiting for an upstream connection asks)."""
        if self._gone is None:
            self._gone = asyncio.get_running_loop().create_future()
            if self.ended or self.lost:
                self._gone.set_result(None)
        return self._gone

    def _left(self) -> None:
        g = self._gone
        if g is not None and not g.done():
            g.set_result(None)

    def eof_received(self) -> bool:
        keep = super().eof_received()
        self._left()
        return keep

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        self._left()


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnInfo:
    """What the waypoint knows about one downstream HBONE stream."""

    peer_identity: SpiffeId
    peer_ip: str
    peer_addr: str
    local_addr: str
    """`ip:port` of the waypoint's end (its pod IP): the source IP of its upstream tunnels."""
    src_ip: str
    destination: Destination
    source: Workload | None
    """The client workload, when the state knows one with the peer's identity and IP."""


@dataclass(slots=True, kw_only=True)
class ExchangeResult:
    """How one upstream attempt went."""

    status: int = 0
    """Status sent downstream (0: none was)."""
    request_bytes: int = 0
    response_bytes: int = 0
    flags: str = "-"
    details: str = "via_upstream"
    reusable: bool = False
    """The upstream connection may carry another request."""
    started: bool = False
    """A response head went downstream (nothing can be retried or replaced any more)."""
    failure: str = ""
    """Upstream transport failure reason, if any."""
    client_error: HttpError | None = None
    """The client's request body was malformed (the codec's error: its status goes downstream)."""


def local_reply_bytes(status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = (), *,
                      close: bool = True) -> bytes:
    """A complete local reply outside any codec state (for requests the codec refused)."""
    from .http.framing import serialize_head, status_line
    extra = [b"content-length: %d" % len(body)]
    if close:
        extra.append(b"connection: close")
    hs = tuple(headers) + ((b"content-type", b"text/plain"),) if body else tuple(headers)
    return serialize_head(status_line(status, b""), hs, extra) + body


_apply = apply_modifiers


async def _pump_request_body(down: DownstreamConn, up: UpstreamConn, res: ExchangeResult) -> bool:
    """Copy the request body up to its EndOfMessage. If the client goes away or its body is
    malformed, the upstream attempt is aborted (it would wait for the rest forever)."""
    while True:
        try:
            ev = await down.next()
        except HttpError as e:
            res.client_error = e
            up.abort()
            return False
        if ev is None:
            up.abort()
            return False
        t = type(ev)
        if t is Body:
            res.request_bytes += len(ev.data)
            up.write(up.codec.send(ev))
            if up.writing_paused:
                await up.drain()
        elif t is EndOfMessage:
            up.write(up.codec.send(ev))
            return True


async def exchange(up: UpstreamConn, head: RequestHead, down: DownstreamConn,
                   response_mods: tuple[HeaderModifier, ...]) -> ExchangeResult:
    """One attempt: send `head` and the body from `down` to `up`, stream the response back."""
    res = ExchangeResult()
    try:
        up.write(up.codec.send(head))
    except LocalProtocolError:
        return ExchangeResult(flags="UC", details="upstream_reset_before_response_started{connection_termination}")
    if head.expect_continue:
        down.write(down.codec.send(InformationalResponse(status=100)))
    pump = asyncio.ensure_future(_pump_request_body(down, up, res))
    body_done = False
    try:
        while True:
            try:
                ev = await up.next()
            except HttpError as e:
                res.flags, res.details, res.failure = "UPE", f"upstream_protocol_error{{{e.reason}}}", e.reason
                if res.started:
                    down.abort()
                else:
                    res.status = 502
                return res
            if ev is None:
                if res.client_error is not None:
                    res.flags, res.details = "DPE", f"http1.codec_error{{{res.client_error.reason}}}"
                    if res.started:
                        down.abort()
                    return res
                if not res.started:
                    res.flags = "UC"
                    res.details = "upstream_reset_before_response_started{connection_termination}"
                else:
                    res.flags = "UPE"
                    res.details = "upstream_reset_after_response_started{connection_termination}"
                    down.abort()
                return res
            t = type(ev)
            if t is Body:
                res.response_bytes += len(ev.data)
                down.write(down.codec.send(ev))
                if down.writing_paused:
                    await down.drain()
                if down.lost:                      # the client went away: stop reading upstream
                    res.flags, res.details = "DC", "downstream_remote_disconnect"
                    return res
            elif t is ResponseHead:
                if ev.status == 101 and head.upgrade is not None:   # WebSocket: raw bytes both ways now
                    down.write(down.codec.send(ev))
                    res.status, res.started = 101, True
                    up_n, down_n = await relay(down, up)
                    res.request_bytes += up_n
                    res.response_bytes += down_n
                    return res
                if response_mods:
                    ev = ResponseHead(status=ev.status, reason=ev.reason, content_length=ev.content_length,
                                      headers=tuple(_apply(list(ev.headers), response_mods)))
                down.write(down.codec.send(ev))
                res.status, res.started = ev.status, True
            elif t is EndOfMessage:
                down.write(down.codec.send(ev))
                break
            elif t is InformationalResponse:
                if ev.status != 100 or not head.expect_continue:
                    down.write(down.codec.send(ev))
            # ConnectionClosed comes after the response's end or as None: nothing to do
        if not pump.done() and not down.codec.should_close:
            await pump            # the response is complete: the rest of the request body follows
        body_done = pump.done() and not pump.cancelled() and pump.exception() is None and pump.result()
        res.reusable = body_done and up.codec.reusable
        return res
    finally:
        if not pump.done():
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)


def attempt_outcome(res: ExchangeResult, down: DownstreamConn) -> AttemptOutcome | None:
    """What one exchange says about its endpoint (for outlier detection, the balancer and
    retries); None when it ended for the client's sake (gone, or a malformed body)."""
    if res.started:
        return AttemptOutcome(kind=OutcomeKind.RESPONSE, status=res.status)
    if res.client_error is not None or down.lost or res.flags in ("DC", "DPE"):
        return None
    return AttemptOutcome(kind=OutcomeKind.RESET)


class Pipeline:
    """Runs requests for one waypoint (see the module docstring)."""

    def __init__(self, *, state: ProxyState, upstreams: Upstreams, metrics: WaypointMetrics, clock: Clock,
                 rng: random.Random, waypoint: ResourceKey, waypoint_namespace: str) -> None:
        self.state = state
        self.upstreams = upstreams
        self.metrics = metrics
        self.clock = clock
        self.rng = rng
        self.waypoint = waypoint
        self.waypoint_namespace = waypoint_namespace
        self.requests = 0
        self.exchange = exchange
        """One upstream attempt (`exchange`'s signature): the seam retries/timeouts/faults wrap."""
        self.mirrors = Mirrors(state=state, upstreams=upstreams, metrics=metrics, rng=rng)
        """Fire-and-forget copies of requests whose route mirrors (waypoint/mirror.py)."""

    # -- labels and results -----------------------------------------------------------------

    def _labels(self, info: ConnInfo, fwd: Forward | None, target: EndpointTarget | None, status: int,
                flags: str) -> RequestLabels:
        src = info.source
        svc = (fwd.service if fwd is not None else None) or info.destination.service
        dw = target.workload if target is not None else info.destination.workload
        kw = {}
        if src is not None:
            kw.update(source_workload=src.name, source_workload_namespace=src.namespace,
                      source_app=src.labels.get("app", src.name), source_version=src.labels.get("version", "unknown"),
                      source_canonical_service=src.labels.get("service.istio.io/canonical-name",
                                                              src.labels.get("app", src.name)),
                      source_canonical_revision=src.labels.get("version", "latest"))
        else:
            kw.update(source_workload_namespace=info.peer_identity.namespace)
        if dw is not None:
            kw.update(destination_workload=dw.name, destination_workload_namespace=dw.namespace,
                      destination_principal=dw.identity.uri, destination_app=dw.labels.get("app", dw.name),
                      destination_version=dw.labels.get("version", "unknown"),
                      destination_canonical_service=dw.labels.get("service.istio.io/canonical-name",
                                                                  dw.labels.get("app", dw.name)),
                      destination_canonical_revision=dw.labels.get("version", "latest"))
        if svc is not None:
            kw.update(destination_service=service_fqdn(svc), destination_service_name=svc.name,
                      destination_service_namespace=svc.namespace)
        return RequestLabels(source_principal=info.peer_identity.uri, response_code=str(status),
                             response_flags=flags or "-", **kw)

    def _record(self, info: ConnInfo, head: RequestHead | None, start: float, t0: float, *, status: int,
                flags: str, details: str, req_bytes: int = 0, resp_bytes: int = 0, rid: str = "",
                fwd: Forward | None = None, target: EndpointTarget | None = None, route: str = "",
                failure: str = "") -> None:
        self.requests += 1
        if fwd is not None and fwd.fault is not None:   # an injected delay marks the result, whatever it is
            flags = fault.join_flags(flags, fwd.fault.flags)
        hdr = dict(head.headers) if head is not None else {}
        svc = (fwd.service if fwd is not None else None) or info.destination.service
        if target is not None:
            cluster = target.cluster
        else:
            cluster = (f"outbound|{fwd.port}|{fwd.subset}|{service_fqdn(svc)}" if fwd is not None and svc is not None
                       else "")
        r = RequestResult(
            labels=self._labels(info, fwd, target, status, flags), start_time=start,
            duration_ms=(self.clock.now() - t0) * 1000.0, request_bytes=req_bytes, response_bytes=resp_bytes,
            method=head.method.decode("latin-1") if head is not None else "",
            path=head.target.decode("latin-1") if head is not None else "",
            protocol=f"HTTP/{head.http_version}" if head is not None else "HTTP/1.1",
            response_code_details=details, upstream_transport_failure_reason=failure,
            x_forwarded_for=hdr.get(b"x-forwarded-for", b"").decode("latin-1"),
            user_agent=hdr.get(b"user-agent", b"").decode("latin-1"), request_id=rid,
            authority=hdr.get(b"host", b"").decode("latin-1"),
            upstream_host=target.address if target is not None else "", upstream_cluster=cluster,
            downstream_local_address=info.local_addr, downstream_remote_address=info.peer_addr, route_name=route)
        self.metrics.record(r)
        if access.isEnabledFor(logging.INFO):
            access.info("%s", access_log_line(r))

    # -- the request ------------------------------------------------------------------------

    def _reply(self, down: DownstreamConn, rep: Reply | authz.LocalReply) -> None:
        body = rep.body
        hs: tuple[tuple[bytes, bytes], ...] = getattr(rep, "headers", ())
        if body:
            hs = hs + ((b"content-type", b"text/plain"),)
        c = down.codec
        down.write(c.send(ResponseHead(status=rep.status, headers=hs, content_length=len(body))) +
                   (c.send(Body(body)) if body else b"") + c.send(EndOfMessage()))

    async def _finish_request_body(self, down: DownstreamConn, head: RequestHead) -> None:
        """After a local reply: consume a body that is already here (keep-alive), else the
        codec closes the connection after the reply."""
        if down.codec.should_close:
            return
        while True:
            ev = await down.next()
            if ev is None or type(ev) is EndOfMessage:
                return

    async def _inject_fault(self, plan: Forward, head: RequestHead, headers: list[tuple[bytes, bytes]],
                            down: DownstreamConn, info: ConnInfo, start: float, t0: float, rid: str) -> bool:
        """Carry out the plan's fault (waypoint/fault.py) before any upstream contact: hold the
        request for the delay, then answer the abort. True when the request is over."""
        f = plan.fault
        assert f is not None
        if f.delay > 0:
            await self.clock.sleep(f.delay)
            if down.lost:       # the client gave up during the delay: an abort drawn never happened
                self._record(info, head, start, t0, status=0, flags="DC", details="downstream_remote_disconnect",
                             rid=rid, fwd=dataclasses.replace(plan, fault=fault.FaultDecision(delay=f.delay)),
                             route=plan.route_name)
                return True
        if f.abort is None:
            return False
        status, hs, body = fault.abort_reply(f.abort, headers)
        self._reply(down, Reply(status=status, headers=hs, body=body))
        self._record(info, head, start, t0, status=status, flags="FI", details=fault.ABORT_DETAILS,
                     resp_bytes=len(body), rid=rid, fwd=plan, route=plan.route_name)
        await self._finish_request_body(down, head)
        return True

    async def handle(self, head: RequestHead, down: DownstreamConn, info: ConnInfo) -> None:
        start, t0 = self.clock.now(), self.clock.now()
        headers = list(head.headers)
        rid_b = next((v for n, v in headers if n == b"x-request-id"), None)
        if rid_b is None:
            rid_b = str(uuid.UUID(int=self.rng.getrandbits(128), version=4)).encode()
            headers.append((b"x-request-id", rid_b))
        rid = rid_b.decode("latin-1")
        str_headers = tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in headers)
        host = next((v for n, v in str_headers if n == "host"), "")
        dst = refresh(self.state, info.destination)   # the Service now, not when the connection opened
        method = head.method.decode("latin-1")
        path = head.path.decode("latin-1") or "/"
        svc_key = ResourceKey("Service", dst.service.namespace, dst.service.name) if dst.service else None
        decision = authz.evaluate(self.state.authorization_policies(), authz.Request(
            method=method, path=path, host=host, headers=str_headers, source_identity=info.peer_identity,
            source_ip=ipaddress.IPv4Address(info.peer_ip), destination_ip=ipaddress.IPv4Address(dst.ip),
            destination_port=dst.port, service=svc_key), waypoint=self.waypoint)
        if not decision.allowed:
            rep = decision.reply
            assert rep is not None
            self._reply(down, rep)
            self._record(info, head, start, t0, status=rep.status, flags=rep.response_flags, details=rep.details,
                         resp_bytes=len(rep.body), rid=rid)
            await self._finish_request_body(down, head)
            return
        req = RequestInfo.from_target(method, path, str_headers, host=host.rpartition(":")[0] or host,
                                      port=dst.port)
        client_ns = info.source.namespace if info.source is not None else info.peer_identity.namespace
        plan = plan_request(self.state, dst, req, head.query, client_namespace=client_ns,
                            waypoint_namespace=self.waypoint_namespace, rng=self.rng)
        if isinstance(plan, Reply):
            self._reply(down, plan)
            self._record(info, head, start, t0, status=plan.status, flags=plan.flags, details=plan.details,
                         resp_bytes=len(plan.body), rid=rid, route=plan.route_name)
            await self._finish_request_body(down, head)
            return
        if plan.fault is not None and await self._inject_fault(plan, head, headers, down, info, start, t0, rid):
            return
        down = self.mirrors.tee(plan, head, headers, down, info.src_ip)
        target = self.upstreams.choose(plan, request=HashRequest(headers=head.headers, query=head.query,
                                                                 source_ip=info.peer_ip))
        if target is None:
            self._reply(down, _NO_HEALTHY)
            self._record(info, head, start, t0, status=503, flags="UH", details=_NO_HEALTHY.details,
                         resp_bytes=len(_NO_HEALTHY.body), rid=rid, fwd=plan, route=plan.route_name)
            await self._finish_request_body(down, head)
            return
        if plan.request_headers:
            headers = _apply(headers, plan.request_headers)
        if plan.authority is not None:
            headers = [(n, v) for n, v in headers if n != b"host"] + [(b"host", plan.authority)]
        up_head = RequestHead(method=head.method, target=plan.target or head.target, headers=tuple(headers),
                              content_length=head.content_length, chunked=head.chunked, upgrade=head.upgrade)
        reported = False
        try:
            try:
                up = await self.upstreams.acquire(target, info.src_ip, gone=down.gone)
            except Withdrawn:         # the client left while the request waited for a connection
                self.upstreams.report(target, None)
                reported = True
                self._record(info, head, start, t0, status=0, flags="DC", details="downstream_remote_disconnect",
                             rid=rid, fwd=plan, target=target, route=plan.route_name)
                return
            except Overflow:
                self.upstreams.report(target, _OVERFLOW_OUTCOME)
                reported = True
                self._reply(down, _OVERFLOW)
                self._record(info, head, start, t0, status=503, flags="UO", details=_OVERFLOW.details,
                             resp_bytes=len(_OVERFLOW.body), rid=rid, fwd=plan, target=target,
                             route=plan.route_name, failure="overflow")
                await self._finish_request_body(down, head)
                return
            except (TunnelError, OSError) as e:
                self.upstreams.report(target, _CONNECT_FAILURE)
                reported = True
                reason = getattr(e, "reason", None) or type(e).__name__
                if isinstance(e, ConnectTimeout):
                    body, details = _UPSTREAM_RESET + b"connection timeout", "connection_timeout"
                else:
                    body = (_UPSTREAM_RESET + b"remote connection failure, transport failure reason: " +
                            str(e).encode("latin-1", "replace"))
                    details = "remote_connection_failure"
                self._reply(down, Reply(status=503, body=body))
                self._record(info, head, start, t0, status=503, flags="UF",
                             details=f"upstream_reset_before_response_started{{{details}}}", resp_bytes=len(body),
                             rid=rid, fwd=plan, target=target, route=plan.route_name, failure=reason)
                await self._finish_request_body(down, head)
                return
            try:
                res = await self.exchange(up, up_head, down, plan.response_headers)
            except BaseException:
                self.upstreams.release(up, False)
                raise
            self.upstreams.release(up, res.reusable)
            self.upstreams.report(target, attempt_outcome(res, down), up.rtt)
            reported = True
        finally:
            if not reported:       # cancelled or failed before an outcome: still reported once
                self.upstreams.report(target, None)
        if res.client_error is not None:
            if not res.started and not down.lost:
                down.codec.close_after_response()
                self._reply(down, Reply(status=res.client_error.status))
                res.status = res.client_error.status
        elif not res.started and res.status == 0 and not down.lost:
            body = _UPSTREAM_RESET + b"connection termination"
            self._reply(down, Reply(status=503, body=body))
            res.status, res.response_bytes = 503, len(body)
        elif not res.started and res.status == 502 and not down.lost:
            self._reply(down, Reply(status=502, body=b"upstream sent an invalid HTTP response"))
        self._record(info, head, start, t0, status=res.status, flags=res.flags, details=res.details,
                     req_bytes=res.request_bytes, resp_bytes=res.response_bytes, rid=rid, fwd=plan, target=target,
                     route=plan.route_name, failure=res.failure)

    def record_codec_error(self, info: ConnInfo, e: HttpError) -> None:
        """A request the codec refused (its stable status went back, the connection closes)."""
        now = self.clock.now()
        self._record(info, None, self.clock.now(), now, status=e.status, flags="DPE",
                     details=f"http1.codec_error{{{e.reason}}}")
