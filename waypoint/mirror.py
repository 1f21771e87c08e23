"""Traffic mirroring: fire-and-forget copies of a request to the mirror targets the plan drew, never touching the primary.

Theory of operation
-------------------
The plan (waypoint/plan.py) has already drawn each configured mirror against its percentage
(VirtualService `mirror` + `mirrorPercentage` and `mirrors[]`, HTTPRoute `RequestMirror`) and
resolved it to a Service port. `Mirrors.tee(plan, ...)` is called right after planning; when
the Forward has mirrors it returns a stand-in for the downstream connection that copies the
request body as the primary reads it (the primary is never held up: the copy is a list
append). When the body has ended, each copy is sent as Envoy sends a shadow (router
`maybeDoShadowing` after the request is complete): same method, target and headers as the
primary's upstream request (route header operations and rewrites included), the Host as
current Istio sends it -- unchanged, since Istio 1.28 sets `disable_shadow_host_suffix_append`
(earlier versions appended `-shadow`) -- to one endpoint of the mirror Service, through the
same upstream machinery (waypoint/upstream.py `Upstreams.acquire/release`, so keep-alive
streams are reused). The response is read to its end and discarded.

Bounds, each counted in `waypoint_mirror_requests_total{result}` (a closed set, MirrorResult):
* a copy's body is buffered up to `max_body` bytes (Envoy's shadow/retry buffer limit, 1 MiB):
  past it the copy is abandoned (`body_too_large`), as Envoy's `retry_or_shadow_abandoned`;
* at most `max_in_flight` copies per mirror Service port are outstanding, `max_in_flight_total`
  in all, holding at most `max_buffered` body bytes: one more is dropped (`overflow`), never
  queued (so one slow mirror cannot starve another's copies);
* a copy that has not completed within `timeout` seconds is abandoned (`timeout`).
Failures (`no_cluster`, `no_healthy_upstream`, `connect_failure`, `reset`) end the copy only.
A copy is counted once, when it ends; a request whose body never ends sends and counts none.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import random

from mesh.hbone import TunnelError
from mesh.state import ProxyState
from mesh.tracecontext import unsampled

from .headers import apply_modifiers
from .http import Body, EndOfMessage, HttpError, LocalProtocolError, RequestHead
from .plan import Forward, MirrorTarget
from .telemetry import WaypointMetrics
from .upstream import EndpointTarget, Overflow, Upstreams

__all__ = ["MirrorResult", "Mirrors", "mirror_head", "MAX_BODY", "MAX_IN_FLIGHT", "MAX_IN_FLIGHT_TOTAL",
           "MAX_BUFFERED", "TIMEOUT"]

log = logging.getLogger("ambient.waypoint")

MAX_BODY = 1 << 20
"""Bytes of request body a copy may buffer (Envoy's default per-connection buffer limit)."""
MAX_IN_FLIGHT = 64
"""Copies outstanding at once to one mirror Service port."""
MAX_IN_FLIGHT_TOTAL = 256
"""Copies outstanding at once, per waypoint process."""
MAX_BUFFERED = 32 << 20
"""Body bytes held by outstanding copies, per waypoint process."""
TIMEOUT = 10.0
"""Seconds a copy may take from the end of the request to the end of its response."""


class MirrorResult(enum.Enum):
    """How one mirrored copy ended (the metric's `result` label)."""

    COMPLETED = "completed"
    """The mirror answered (any status); the answer was discarded."""
    OVERFLOW = "overflow"
    BODY_TOO_LARGE = "body_too_large"
    NO_CLUSTER = "no_cluster"
    """The mirror names no Service (or an undefined subset, or a port it does not have)."""
    NO_HEALTHY_UPSTREAM = "no_healthy_upstream"
    CONNECT_FAILURE = "connect_failure"
    RESET = "reset"
    """The connection ended or broke HTTP before a complete response."""
    TIMEOUT = "timeout"


def mirror_head(head: RequestHead, headers: list[tuple[bytes, bytes]], plan: Forward, body_len: int) -> RequestHead:
    """The copy's request: what the primary sends upstream, framed by Content-Length (the body
    is buffered whole). The Host is the primary's (no `-shadow` suffix, Istio >= 1.28); its trace
    context says "not sampled" (Istio's mirror policy: `trace_sampled: false`)."""
    hs = apply_modifiers(list(headers), plan.request_headers) if plan.request_headers else list(headers)
    hs = unsampled(hs)
    if plan.authority is not None:
        hs = [(n, v) for n, v in hs if n != b"host"] + [(b"host", plan.authority)]
    return RequestHead(method=head.method, target=plan.target or head.target, path=head.path, query=head.query,
                       headers=tuple(hs), content_length=body_len if head.has_body or body_len else None)


class _Tee:
    """The downstream connection as the pipeline sees it, copying the request body on the way.

    Everything but `next()` is the real connection's (delegated), so the primary's exchange,
    local replies and flow control are unchanged."""

    __slots__ = ("_down", "_mirrors", "_plan", "_head", "_headers", "_src_ip", "_parts", "_size", "_done")

    def __init__(self, down, mirrors: Mirrors, plan: Forward, head: RequestHead,
                 headers: list[tuple[bytes, bytes]], src_ip: str) -> None:
        self._down = down
        self._mirrors = mirrors
        self._plan = plan
        self._head = head
        self._headers = headers
        self._src_ip = src_ip
        self._parts: list[bytes] | None = []
        self._size = 0
        self._done = False

    def __getattr__(self, name: str):
        return getattr(self._down, name)

    async def next(self):
        ev = await self._down.next()
        t = type(ev)
        if t is Body and self._parts is not None:
            n = len(ev.data)
            if self._size + n > self._mirrors.max_body:
                self._parts = None           # too large to copy: the primary goes on alone
            else:
                self._parts.append(bytes(ev.data))
                self._size += n
        elif t is EndOfMessage and not self._done:
            self._done = True
            self._mirrors._fire(self._plan, self._head, self._headers, self._parts, self._size, self._src_ip)
            self._parts = None
        return ev


class Mirrors:
    """Sends the copies of one waypoint (see the module docstring)."""

    def __init__(self, *, state: ProxyState, upstreams: Upstreams, metrics: WaypointMetrics, rng: random.Random,
                 max_body: int = MAX_BODY, max_in_flight: int = MAX_IN_FLIGHT,
                 max_in_flight_total: int = MAX_IN_FLIGHT_TOTAL, max_buffered: int = MAX_BUFFERED,
                 timeout: float = TIMEOUT) -> None:
        self.state = state
        self.upstreams = upstreams
        self.metrics = metrics
        self.rng = rng
        self.max_body = max_body
        self.max_in_flight = max_in_flight
        self.max_in_flight_total = max_in_flight_total
        self.max_buffered = max_buffered
        self.timeout = timeout
        self.in_flight = 0
        """Copies outstanding (all targets)."""
        self.buffered = 0
        """Body bytes held by outstanding copies."""
        self._per_target: dict[tuple[str, int], int] = {}
        self._tasks: set[asyncio.Task] = set()

    def tee(self, plan: Forward, head: RequestHead, headers: list[tuple[bytes, bytes]], down, src_ip: str):
        """`down` itself when the plan mirrors nothing, else a stand-in that copies the body."""
        if not plan.mirrors or head.upgrade is not None:   # a WebSocket is never mirrored
            return down
        return _Tee(down, self, plan, head, headers, src_ip)

    def _count(self, result: MirrorResult) -> None:
        self.metrics.count_mirror(result.value)

    def _fire(self, plan: Forward, head: RequestHead, headers: list[tuple[bytes, bytes]], parts: list[bytes] | None,
              size: int, src_ip: str) -> None:
        body = b"".join(parts) if parts else b""
        for m in plan.mirrors:
            if parts is None:
                self._count(MirrorResult.BODY_TOO_LARGE)
                continue
            target = self._endpoint(m)
            if isinstance(target, MirrorResult):
                self._count(target)
                continue
            assert m.service is not None
            key = (m.service.uid, m.port)
            n = self._per_target.get(key, 0)
            if (n >= self.max_in_flight or self.in_flight >= self.max_in_flight_total
                    or self.buffered + size > self.max_buffered):
                self._count(MirrorResult.OVERFLOW)
                continue
            self._per_target[key] = n + 1
            self.in_flight += 1
            self.buffered += size
            t = asyncio.ensure_future(self._run(key, target, mirror_head(head, headers, plan, size), body, src_ip))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    def _endpoint(self, m: MirrorTarget) -> EndpointTarget | MirrorResult:
        if m.service is None:
            return MirrorResult.NO_CLUSTER
        # The mirror Service's own cluster chooses (balancer, outlier ejections), as Envoy's
        # shadow policy sends to a cluster; an unlabelled subset name keeps the key distinct.
        sub = "mirror" if m.subset_labels else ""
        target = self.upstreams.choose(Forward(service=m.service, port=m.port, target_port=m.target_port,
                                               subset=sub, subset_labels=m.subset_labels))
        if target is None:
            return MirrorResult.NO_HEALTHY_UPSTREAM
        return target

    async def _run(self, key: tuple[str, int], target: EndpointTarget, head: RequestHead, body: bytes,
                   src_ip: str) -> None:
        result = MirrorResult.RESET
        try:
            result = await asyncio.wait_for(self._send(target, head, body, src_ip), self.timeout)
        except asyncio.TimeoutError:
            result = MirrorResult.TIMEOUT
        except asyncio.CancelledError:
            raise
        except Exception:   # a copy's failure must never reach the primary or the loop
            log.exception("mirror to %s failed", target.address)
        finally:
            self.upstreams.report(target, None)   # a copy's result says nothing the primary needs
            self.in_flight -= 1
            self.buffered -= len(body)
            n = self._per_target[key] - 1
            if n:
                self._per_target[key] = n
            else:
                del self._per_target[key]
            self._count(result)

    async def _send(self, target: EndpointTarget, head: RequestHead, body: bytes, src_ip: str) -> MirrorResult:
        try:
            up = await self.upstreams.acquire(target, src_ip)
        except Overflow:
            return MirrorResult.OVERFLOW
        except (TunnelError, OSError):
            return MirrorResult.CONNECT_FAILURE
        complete = False
        try:
            c = up.codec
            up.write(c.send(head) + (c.send(Body(body)) if body else b"") + c.send(EndOfMessage()))
            while True:
                ev = await up.next()
                if ev is None:
                    return MirrorResult.RESET
                if type(ev) is EndOfMessage:
                    complete = True
                    return MirrorResult.COMPLETED
        except (HttpError, LocalProtocolError):
            return MirrorResult.RESET
        finally:
            self.upstreams.release(up, complete)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
