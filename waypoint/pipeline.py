"""One request through the waypoint, in Istio's filter order: authz -> route -> endpoint -> upstream exchange.

`Pipeline.handle(head, down)` runs a request that arrived on a downstream connection to its
end and records exactly one `RequestResult` (metrics + one access-log line on `ambient.access`):

1. `x-request-id` is kept, or generated (uuid4 from the injected rng) and sent upstream;
2. L7 AuthorizationPolicy (waypoint/authz.py): a deny is its LocalReply (403 `RBAC: access denied`);
3. routing (waypoint/plan.py): a Reply (404 NR, redirect, 500/503 NC) or a Forward, which
   carries the route's retry policy and timeouts; then its fault (waypoint/fault.py: delay,
   then abort as a local reply, flags DI/FI) and its mirrors (waypoint/mirror.py: the body is
   teed, copies go fire-and-forget once it has ended);
4. `Attempts.forward` (waypoint/attempts.py): for each attempt an endpoint from
   `Upstreams.choose` (the cluster's balancer over the endpoints outlier detection leaves,
   previous hosts avoided), a connection from `Upstreams.acquire` within the cluster's circuit
   limits, the exchange, `release` and `report` (exactly once per chosen endpoint), all under
   the route's retry policy, the destination's retry budget and the route and per-try
   timeouts; the response, or Envoy's local reply (503 UH / UO / UF / UC, 504 UT, ...), goes
   downstream.

Bodies stream both ways with backpressure (HttpChannel water marks, `drain()`); a request
body's first 64 KiB are kept for a retry (a mirrored request's body is also copied, up to a
bound, for its copies).
"""
from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from mesh.clock import Clock
from mesh.identity import SpiffeId
from mesh.model import Workload
from mesh.model.base import ResourceKey
from mesh.state import ProxyState

from . import authz, fault
from .attempts import Attempts
from .channel import HttpChannel
from .headers import apply_modifiers
from .mirror import Mirrors
from .http import Body, EndOfMessage, HttpError, RequestHead, ResponseHead, ServerConnection
from .plan import Bindings, Destination, Forward, Reply, bindings, plan_bound, refresh, service_fqdn
from .routing import RequestInfo
from .http2.base import current_stream
from .telemetry import RequestLabels, RequestResult, WaypointMetrics, access_log_line, grpc_response_status
from .tracing import Tracing
from .upstream import EndpointTarget, HashRequest, Upstreams

__all__ = ["Pipeline", "ConnInfo", "DownstreamConn", "local_reply_bytes"]


access = logging.getLogger("ambient.access")
log = logging.getLogger("ambient.waypoint")

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
_PROTOCOLS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0", "2": "HTTP/2"}
_LABEL_CACHE_SIZE = 4096


def request_id(bits: int) -> bytes:
    """`str(uuid.UUID(int=bits, version=4))` as bytes, without the UUID object (a request
    without x-request-id gets one; the object's checks were ~3% of a request)."""
    h = b"%032x" % ((bits & _UUID_KEEP) | _UUID_SET)
    return b"%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


_UUID_KEEP = ~((0xc000 << 48) | (0xf000 << 64)) & ((1 << 128) - 1)
_UUID_SET = (0x8000 << 48) | (4 << 76)
"""RFC 4122 variant (10xx) and version 4, as uuid.UUID(version=4) sets them."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Scope:
    """Pipeline._scope: what applies to a destination from a client namespace, at one state version."""

    version: int
    service: object
    """The ServiceInfo it was made for (None: pod-addressed); identity-checked."""
    service_key: ResourceKey | None
    policies: tuple
    """The AuthorizationPolicies this waypoint enforces for the service (none: allowed)."""
    bound: Bindings


class Pipeline:
    """Runs requests for one waypoint (see the module docstring)."""

    def __init__(self, *, state: ProxyState, upstreams: Upstreams, metrics: WaypointMetrics, clock: Clock,
                 rng: random.Random, waypoint: ResourceKey, waypoint_namespace: str,
                 tracing: Tracing | None = None, access_log: Callable[[str], None] | None = None) -> None:
        self.state = state
        self.access_log = access_log
        """Writes an access-log line (the process's batched writer); None: `access.info`."""
        self.upstreams = upstreams
        self.metrics = metrics
        self.clock = clock
        self.rng = rng
        self.waypoint = waypoint
        self.waypoint_namespace = waypoint_namespace
        self.requests = 0
        self._label_cache: dict[tuple, tuple] = {}
        self._scopes: dict[tuple, _Scope] = {}
        self.tracing = tracing
        """Trace context and spans (waypoint/tracing.py); off unless configured."""
        self.attempts = Attempts(state=state, upstreams=upstreams, metrics=metrics, clock=clock, rng=rng)
        """The upstream side of a routed request (waypoint/attempts.py)."""
        self.mirrors = Mirrors(state=state, upstreams=upstreams, metrics=metrics, rng=rng)
        """Fire-and-forget copies of requests whose route mirrors (waypoint/mirror.py)."""

    # -- labels and results -----------------------------------------------------------------

    def _labels(self, info: ConnInfo, fwd: Forward | None, target: EndpointTarget | None, status: int,
                flags: str) -> RequestLabels:
        svc = (fwd.service if fwd is not None else None) or info.destination.service
        dw = target.workload if target is not None else info.destination.workload
        # The labels depend on nothing else, and repeat for every request of a connection:
        # building (and later hashing) the 25-field object per request cost ~5% of a request.
        # Keyed by identity (the objects are frozen); the entry keeps them alive, so an id is
        # not reused while its entry exists.
        key = (id(info), id(svc), id(dw), status, flags)
        hit = self._label_cache.get(key)
        if hit is not None and hit[0] is info and hit[1] is svc and hit[2] is dw:
            return hit[3]
        labels = self._new_labels(info, svc, dw, status, flags)
        if len(self._label_cache) >= _LABEL_CACHE_SIZE:
            self._label_cache.clear()
        self._label_cache[key] = (info, svc, dw, labels)
        return labels

    def _new_labels(self, info: ConnInfo, svc, dw: Workload | None, status: int, flags: str) -> RequestLabels:
        src = info.source
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
        xff = ua = authority = b""
        ct = None
        if head is not None:       # one pass (the last value wins, as a dict of them had it)
            for n, v in head.headers:
                if n == b"host":
                    authority = v
                elif n == b"user-agent":
                    ua = v
                elif n == b"x-forwarded-for":
                    xff = v
                elif n == b"content-type" and ct is None:    # the first, as is_grpc reads it
                    ct = v
        grpc = ct is not None and ct.lower().startswith(b"application/grpc")
        svc = (fwd.service if fwd is not None else None) or info.destination.service
        if target is not None:
            cluster = target.cluster
        else:
            cluster = (f"outbound|{fwd.port}|{fwd.subset}|{service_fqdn(svc)}" if fwd is not None and svc is not None
                       else "")
        labels = self._labels(info, fwd, target, status, flags)
        if grpc:   # gRPC: Istio's request_protocol and status labels
            stream = current_stream.get()
            labels = replace(labels, request_protocol="grpc", grpc_response_status=grpc_response_status(
                status, stream.grpc_status if stream is not None else None))
        r = RequestResult(
            labels=labels, start_time=start,
            duration_ms=(self.clock.now() - t0) * 1000.0, request_bytes=req_bytes, response_bytes=resp_bytes,
            method=head.method.decode("latin-1") if head is not None else "",
            path=head.target.decode("latin-1") if head is not None else "",
            protocol=(_PROTOCOLS.get(head.http_version) or f"HTTP/{head.http_version}") if head is not None
            else "HTTP/1.1",
            response_code_details=details, upstream_transport_failure_reason=failure,
            x_forwarded_for=xff.decode("latin-1"), user_agent=ua.decode("latin-1"), request_id=rid,
            authority=authority.decode("latin-1"),
            upstream_host=target.address if target is not None else "", upstream_cluster=cluster,
            downstream_local_address=info.local_addr, downstream_remote_address=info.peer_addr, route_name=route)
        self.metrics.record(r)
        if self.tracing is not None:
            self.tracing.end(r)
        if access.isEnabledFor(logging.INFO):
            if self.access_log is not None:
                self.access_log(access_log_line(r))
            else:
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

    def _scope(self, dst: Destination, client_ns: str) -> _Scope:
        """What applies to requests for `dst` from `client_ns` now: kept per state version (the
        routes and policies of every request of a connection are the same until the config
        changes, and scanning them was a tenth of a request)."""
        svc = dst.service
        key = (id(svc), dst.port, client_ns)
        st = self.state
        hit = self._scopes.get(key)
        if hit is not None and hit.version == st.version and hit.service is svc:
            return hit
        svc_key = ResourceKey("Service", svc.namespace, svc.name) if svc is not None else None
        scope = _Scope(
            version=st.version, service=svc, service_key=svc_key,
            policies=tuple(p for p in st.authorization_policies() if authz.applies(p, self.waypoint, svc_key)),
            bound=bindings(st, dst, client_namespace=client_ns, waypoint_namespace=self.waypoint_namespace))
        if len(self._scopes) >= _LABEL_CACHE_SIZE:
            self._scopes.clear()
        self._scopes[key] = scope
        return scope

    async def handle(self, head: RequestHead, down: DownstreamConn, info: ConnInfo) -> None:
        start = t0 = self.clock.now()
        headers = list(head.headers)
        rid_b = next((v for n, v in headers if n == b"x-request-id"), None)
        if rid_b is None:
            rid_b = request_id(self.rng.getrandbits(128))
            headers.append((b"x-request-id", rid_b))
        rid = rid_b.decode("latin-1")
        if self.tracing is not None:
            headers = self.tracing.begin(headers, start)
        dst = refresh(self.state, info.destination)   # the Service now, not when the connection opened
        client_ns = info.source.namespace if info.source is not None else info.peer_identity.namespace
        scope = self._scope(dst, client_ns)
        req = None
        # Only policies that apply here can decide, and only bound routes look at the request:
        # with neither (the common case) its headers are not decoded at all.
        if scope.policies or scope.bound.routed:
            str_headers = tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in headers)
            host = next((v for n, v in str_headers if n == "host"), "")
            method = head.method.decode("latin-1")
            path = head.path.decode("latin-1") or "/"
            if scope.policies:
                decision = authz.evaluate(scope.policies, authz.Request(
                    method=method, path=path, host=host, headers=str_headers, source_identity=info.peer_identity,
                    source_ip=ipaddress.IPv4Address(info.peer_ip), destination_ip=ipaddress.IPv4Address(dst.ip),
                    destination_port=dst.port, service=scope.service_key), waypoint=self.waypoint)
                if not decision.allowed:
                    rep = decision.reply
                    assert rep is not None
                    self._reply(down, rep)
                    self._record(info, head, start, t0, status=rep.status, flags=rep.response_flags,
                                 details=rep.details, resp_bytes=len(rep.body), rid=rid)
                    await self._finish_request_body(down, head)
                    return
            if scope.bound.routed:
                # The head keeps the query apart (head.query); route matches need it (queryParams).
                target = path + "?" + head.query.decode("latin-1") if head.query else path
                req = RequestInfo.from_target(method, target, str_headers, host=host.rpartition(":")[0] or host,
                                              port=dst.port)
        plan = plan_bound(self.state, dst, scope.bound, req, head.query, self.rng)
        if isinstance(plan, Reply):
            self._reply(down, plan)
            self._record(info, head, start, t0, status=plan.status, flags=plan.flags, details=plan.details,
                         resp_bytes=len(plan.body), rid=rid, route=plan.route_name)
            await self._finish_request_body(down, head)
            return
        if plan.fault is not None and await self._inject_fault(plan, head, headers, down, info, start, t0, rid):
            return
        down = self.mirrors.tee(plan, head, headers, down, info.src_ip)
        if plan.request_headers:
            headers = _apply(headers, plan.request_headers)
        if plan.authority is not None:
            headers = [(n, v) for n, v in headers if n != b"host"] + [(b"host", plan.authority)]
        res = await self.attempts.forward(plan, head, plan.target or head.target, headers, down, info.src_ip, rid,
                                          HashRequest(headers=head.headers, query=head.query, source_ip=info.peer_ip))
        if res.client_error is not None and not res.started and not down.lost:
            down.codec.close_after_response()
            self._reply(down, Reply(status=res.client_error.status))
            res.status = res.client_error.status
        self._record(info, head, start, t0, status=res.status, flags=res.flags, details=res.details,
                     req_bytes=res.request_bytes, resp_bytes=res.response_bytes, rid=rid, fwd=plan,
                     target=res.target, route=plan.route_name, failure=res.failure)
        if not res.body_complete and res.client_error is None and not down.lost and res.status != 101:
            await self._finish_request_body(down, head)    # a local reply came before the body's end

    def record_codec_error(self, info: ConnInfo, e: HttpError) -> None:
        """A request the codec refused (its stable status went back, the connection closes)."""
        now = self.clock.now()
        self._record(info, None, self.clock.now(), now, status=e.status, flags="DPE",
                     details=f"http1.codec_error{{{e.reason}}}")
