"""The attempt loop: one request's upstream attempts under its route's retry policy, retry budget and timeouts.

Theory of operation
-------------------
`Attempts.forward` carries out a `Forward` plan (waypoint/plan.py, which resolved the route's
`RetryPolicy` and timeout once per route). The decisions are pure (resilience/retry.py
`should_retry`, resilience/budget.py); this module only does what they say:

1. Endpoint: `choose(fwd, avoid=...)`; the hosts already tried are avoided when the policy
   says so and another endpoint exists (Envoy's previous_hosts predicate). None -> 503 UH.
2. Attempt N: a connection (`acquire`), the request head with `x-envoy-attempt-count: N`, the
   body (`RequestBody`: kept while it fits `REPLAY_LIMIT` as it streams up, replayed from that
   buffer by a retry; a body that outgrew it cannot be sent again, so it is not retried), then
   the response HEAD is awaited. Nothing goes downstream before the decision: a retriable
   response is never streamed; the attempt is reset (as Envoy resets the upstream request).
3. Decide: the outcome (status, grpc-status and header names of the response, or connect
   failure, reset, per-try timeout) and the destination's budget verdict -> `should_retry`.
   A retry waits the jittered backoff and starts again at 1. Otherwise the response streams
   downstream as it arrives, or a local reply says what happened (Envoy's bodies and flags).
4. Timeouts (asyncio timeouts): the route timeout bounds the whole loop, backoffs included,
   from the first attempt (Envoy starts it at the end of the downstream request; here an
   upload counts against it); the per-try timeout bounds each attempt up to the end of its
   response. Either firing before a response head went downstream -> 504 `upstream request
   timeout`, flag UT (a per-try timeout is retried under 5xx / gateway-error); after it -> the
   downstream stream is reset, flag UT.
5. Flags: URX (after UF/UT/UC) when a retriable outcome was not retried because attempts ran
   out or the retry budget said no -- the latter is also counted in
   `ambient_waypoint_retry_budget_exhausted_total{destination_service}`; UO when
   connectionPool.http.maxRetries retries are already in flight (Envoy's retry overflow).
"""
from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mesh.clock import Clock
from mesh.hbone import TunnelError
from mesh.model import ServiceInfo
from mesh.model.route import HeaderModifier
from mesh.state import ProxyState

from .channel import HttpChannel
from .headers import apply_modifiers
from .http import Body, EndOfMessage, HttpError, InformationalResponse, LocalProtocolError, RequestHead, ResponseHead
from .plan import Forward, destination_rule_for, service_fqdn
from .resilience.budget import RetryBudget, RetryBudgetConfig, RetryBudgets, budget_config
from .resilience.retry import (ATTEMPT_COUNT_HEADER, AttemptOutcome, BudgetVerdict, GiveUpReason, OutcomeKind,
                               RetryDecision, RetryOn, RetryPolicy, hosts_to_avoid, is_retriable, should_retry)
from .resilience.outcome import TIMEOUT_BODY, failure_reply, give_up_flag
from .resilience.timeout import (DEADLINE_EXCEEDED, grpc_local_reply_headers, grpc_status_for, is_grpc,
                                 request_timeout)
from .telemetry import WaypointMetrics
from .upgrade import relay
from .upstream import ConnectTimeout, EndpointTarget, HashRequest, Overflow, UpstreamConn, Upstreams, Withdrawn

if TYPE_CHECKING:
    from .pipeline import DownstreamConn

__all__ = ["Attempts", "ForwardResult", "RequestBody", "REPLAY_LIMIT", "BudgetBook"]


REPLAY_LIMIT = 64 * 1024
"""Request body bytes kept for a retry (Envoy's per_request_buffer_limit_bytes plays this role)."""
COALESCE_LIMIT = 16 * 1024
"""Response bytes already received that are joined with the head into one downstream write
(joining copies them; past a frame's worth, HBONE sends a body by reference anyway)."""

_BUDGET_BODY = b"retry budget exhausted"
_TIMED_OUT = AttemptOutcome(kind=OutcomeKind.PER_TRY_TIMEOUT)
"""What the route timeout cutting an attempt short says about its endpoint (a timeout)."""
"""Ours: Envoy has no such local reply (its retry budget only stops its own retries)."""
_ATTEMPT = ATTEMPT_COUNT_HEADER.encode()
_NOT_RETRIABLE = RetryDecision(retry=False, reason=GiveUpReason.NOT_RETRIABLE)


@dataclass(slots=True, kw_only=True)
class ForwardResult:
    """How the request's attempts went, as recorded once (telemetry)."""

    status: int = 0
    """Status sent downstream (0: none was)."""
    request_bytes: int = 0
    response_bytes: int = 0
    flags: str = "-"
    details: str = "via_upstream"
    started: bool = False
    """A response head went downstream (nothing can be retried or replaced any more)."""
    failure: str = ""
    """Upstream transport failure reason, if any."""
    client_error: HttpError | None = None
    """The client's request body was malformed (its status goes downstream)."""
    target: EndpointTarget | None = None
    """The endpoint of the last attempt."""
    attempts: int = 0
    reusable: bool = False
    grpc: bool = False
    """The request is gRPC (content-type application/grpc*): local replies in gRPC form."""
    unreported: _Attempt | None = None
    """An attempt whose outcome is not reported yet (internal)."""
    body_complete: bool = False
    """The request body was read to its end (else what is left must be consumed or the
    connection closed)."""


class _Unbounded:
    """What `asyncio.timeout(None)` does (never expires) without its per-use cost: a Timeout
    object, current_task() and a reschedule on enter and exit, on every request with no route
    or per-try timeout (Istio's default). Stateless, so one instance serves all."""

    __slots__ = ()

    async def __aenter__(self) -> _Unbounded:
        return self

    async def __aexit__(self, *exc) -> None:
        return None

    def expired(self) -> bool:
        return False


_UNBOUNDED = _Unbounded()


class RequestBody:
    """The downstream request body as the attempts consume it: every piece is kept while the
    total fits `limit`, so a retry can send it again; past the limit nothing is kept."""

    __slots__ = ("down", "limit", "chunks", "size", "complete", "overflowed", "trailers", "client_error",
                 "gone")

    def __init__(self, down: DownstreamConn, limit: int = REPLAY_LIMIT) -> None:
        self.down = down
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        """Body bytes received from the client so far."""
        self.complete = False
        self.overflowed = False
        self.trailers: tuple = ()
        self.client_error: HttpError | None = None
        self.gone = False
        """The client went away before its body ended."""

    @property
    def replayable(self) -> bool:
        return not self.overflowed and self.client_error is None and not self.gone

    def send_if_complete(self, up: UpstreamConn) -> bool:
        """The fast path of `send` for a request whose body is already complete, as a GET's is
        when its head is read (nothing kept, its end queued): send the end now, with no task
        to pump it. True when sent; False changed nothing (`send` does the work)."""
        down = self.down
        if self.chunks or not isinstance(down, HttpChannel):   # a mirror's _Tee must see the end itself
            return False
        if not self.complete:
            ev = down.pop_if(EndOfMessage)
            if ev is None:
                return False
            self.complete = True
            self.trailers = ev.trailers
        else:
            ev = EndOfMessage(self.trailers)
        up.write(up.codec.send(ev))       # (events are immutable: the client's own end goes on)
        return True

    async def send(self, up: UpstreamConn) -> bool:
        """The whole body to `up`: the kept part, then the rest as it arrives. False when the
        client went away or its body was malformed (the attempt is aborted: it would wait
        for the rest forever)."""
        codec = up.codec
        for c in self.chunks:
            up.write(codec.send(Body(c)))
            if up.writing_paused:
                await up.drain()
        down = self.down
        while not self.complete:
            try:
                ev = await down.next()
            except HttpError as e:
                self.client_error = e
                up.abort()
                return False
            if ev is None:
                self.gone = True
                up.abort()
                return False
            t = type(ev)
            if t is Body:
                data = ev.data
                n = len(data)
                if not self.overflowed:
                    if self.size + n <= self.limit:
                        self.chunks.append(bytes(data))     # before the write: a cancelled send still keeps it
                    else:
                        self.overflowed = True
                        self.chunks.clear()
                self.size += n
                up.write(codec.send(ev))
                if up.writing_paused:
                    await up.drain()
            elif t is EndOfMessage:
                self.complete = True
                self.trailers = ev.trailers
        up.write(codec.send(EndOfMessage(self.trailers)))
        return True


class BudgetBook:
    """Each destination service's retry budget, configured from the Service's retry-budget
    annotations and its DestinationRule's connectionPool once per config version."""

    def __init__(self, state: ProxyState) -> None:
        self.state = state
        self.budgets = RetryBudgets()
        self._version = -1
        self._configs: dict[str, RetryBudgetConfig] = {}

    def for_service(self, svc: ServiceInfo) -> RetryBudget:
        if self.state.version != self._version:
            self._version = self.state.version
            self._configs.clear()
        cfg = self._configs.get(svc.uid)
        if cfg is None:
            dr = destination_rule_for(self.state.destination_rules(), svc)
            tp = dr.traffic_policy if dr is not None else None
            cfg = budget_config(svc.retry_budget, tp.connection_pool if tp is not None else None)
            self._configs[svc.uid] = cfg
            self.budgets.update(svc.uid, cfg)
        return self.budgets.for_service(svc.uid)


_BY_HEADER = (RetryOn.RETRIABLE_HEADERS | RetryOn.ENVOY_RATELIMITED).value
"""As an int: a Flag `&` per response is ~0.5 µs of Python."""


def _outcome_of(head: ResponseHead, policy: RetryPolicy) -> AttemptOutcome:
    grpc = next((v for n, v in head.headers if n == b"grpc-status"), None)
    names = (frozenset(n.decode("latin-1") for n, _ in head.headers) if policy.retry_on._value_ & _BY_HEADER
             else frozenset())          # only the header conditions look at names
    return AttemptOutcome(kind=OutcomeKind.RESPONSE, status=head.status,
                          grpc_status=int(grpc) if grpc is not None and grpc.isdigit() else None,
                          header_names=names)


class _Attempt:
    """One upstream attempt's connection, body pump and response head."""

    __slots__ = ("target", "up", "conn", "pump", "sent", "head", "failure", "failure_text", "connect_timeout",
                 "started_at", "upgrade")

    def __init__(self, target: EndpointTarget) -> None:
        self.target = target
        self.up: UpstreamConn | None = None
        """The connection while this attempt owns it."""
        self.conn: UpstreamConn | None = None
        """The connection it had (for its RTT)."""
        self.connect_timeout = False
        self.upgrade = False
        """The request asked for a protocol upgrade (WebSocket): a 101 turns into a relay."""
        self.pump: asyncio.Future | None = None
        """The task sending the rest of the request body (None: none runs)."""
        self.sent = False
        """The whole body was sent when the head was (no pump was needed)."""
        self.head: ResponseHead | None = None
        self.failure = ""
        self.failure_text = ""
        self.started_at = 0.0

    async def stop_pump(self) -> None:
        p = self.pump
        if p is not None and not p.done():
            p.cancel()
            await asyncio.gather(p, return_exceptions=True)

    def body_sent(self) -> bool:
        if self.sent:
            return True
        p = self.pump
        return p is not None and p.done() and not p.cancelled() and p.exception() is None and p.result()


class Attempts:
    """Runs the attempts of requests for one waypoint (see the module docstring)."""

    def __init__(self, *, state: ProxyState, upstreams: Upstreams, metrics: WaypointMetrics, clock: Clock,
                 rng: random.Random) -> None:
        self.state = state
        self.upstreams = upstreams
        self.metrics = metrics
        self.clock = clock
        self.rng = rng
        self.budgets = BudgetBook(state)

    # -- the loop ---------------------------------------------------------------------------

    async def forward(self, fwd: Forward, head: RequestHead, target: bytes, headers: list[tuple[bytes, bytes]],
                      down: DownstreamConn, src_ip: str, request_id: str, hash_request: HashRequest) -> ForwardResult:
        """All attempts of one request; the response (or a local reply) went downstream.
        `head` is the downstream request, `target` and `headers` what goes upstream (the
        plan's rewrites applied): each attempt's head is built from them once, not copied."""
        grpc = is_grpc(headers)
        res = ForwardResult(grpc=grpc)
        body = RequestBody(down)
        timeout = request_timeout(fwd.timeout, headers, grpc=grpc)
        whole = asyncio.timeout(timeout) if timeout is not None else _UNBOUNDED
        budget = self.budgets.for_service(fwd.service) if fwd.service is not None else None
        # The request's name across hops: a repeat of it within the budget's window, while it
        # is in flight or after it failed, is a retry made further up the chain (budget.py).
        key = b"%s %s %s" % (request_id.encode("latin-1", "replace"), head.method, target) \
            if budget is not None else None
        try:
            async with whole:
                await self._loop(fwd, head, target, headers, down, src_ip, hash_request, body, res,
                                 self.clock.now() + timeout if timeout else None, budget, key)
        except TimeoutError:
            if not whole.expired():
                raise
            self._timed_out(down, res, "response_timeout")
        finally:
            if res.unreported is not None:  # the attempt the route timeout (or a cancel) cut short
                self._report(res.unreported, _TIMED_OUT if whole.expired() else None, body, down)
                res.unreported = None
        res.request_bytes += body.size        # (a WebSocket's relayed bytes are in already)
        res.client_error = body.client_error
        res.body_complete = body.complete
        if key is not None and res.flags == "-" and 100 <= res.status < 400 and not grpc:
            budget.forget(key)                # ended well: no proxy retries it (budget.py)
        return res

    def _timed_out(self, down: DownstreamConn, res: ForwardResult, details: str) -> None:
        res.flags, res.details = "UT", details
        if res.started:
            down.abort()
        elif not down.lost:
            self._local_reply(down, res, 504, TIMEOUT_BODY, grpc_status=DEADLINE_EXCEEDED)

    def _local_reply(self, down: DownstreamConn, res: ForwardResult, status: int, body: bytes, *,
                     headers: tuple[tuple[bytes, bytes], ...] = (), grpc_status: int | None = None) -> None:
        """Envoy's local reply; to a gRPC request in gRPC form (timeout.py)."""
        hs = headers + ((b"content-type", b"text/plain"),) if body else headers
        if res.grpc:
            hs = grpc_local_reply_headers(grpc_status if grpc_status is not None else grpc_status_for(status), body)
            status, body = 200, b""
        c = down.codec
        down.write(c.send(ResponseHead(status=status, headers=hs, content_length=len(body))) +
                   (c.send(Body(body)) if body else b"") + c.send(EndOfMessage()))
        res.status, res.response_bytes, res.started = status, len(body), True

    async def _loop(self, fwd: Forward, head: RequestHead, up_target: bytes, headers: list[tuple[bytes, bytes]],
                    down: DownstreamConn, src_ip: str, hash_request: HashRequest, body: RequestBody,
                    res: ForwardResult, deadline: float | None, budget: RetryBudget | None,
                    key: bytes | None) -> None:
        policy = fwd.retry
        clock = self.clock
        if budget is not None and budget.admit(clock.now(), key) is BudgetVerdict.EXHAUSTED:
            # The same request again within the window: a retry further up the chain that
            # this destination's budget has no room for. Not sent (see budget.py).
            self.metrics.retry_budget_exhausted(service_fqdn(fwd.service))
            res.flags, res.details = "URX", "retry_budget_exhausted"
            if not down.lost:
                self._local_reply(down, res, 503, _BUDGET_BODY)
            return
        base_headers = tuple(h for h in headers if h[0] != _ATTEMPT)
        tried: list[str] = []
        attempt_no = 0
        retrying = False          # this attempt holds a budget retry slot
        continued = False         # 100 Continue went downstream
        while True:
            attempt_no += 1
            target = self.upstreams.choose(fwd, request=hash_request, avoid=hosts_to_avoid(policy, tried))
            if target is None:
                if retrying and budget is not None:
                    budget.retry_finished()
                res.flags, res.details = "UH", "no_healthy_upstream"
                if not down.lost:
                    self._local_reply(down, res, 503, b"no healthy upstream")
                return
            tried.append(target.address)
            res.target, res.attempts = target, attempt_no
            a = _Attempt(target)
            # Upstream always gets HTTP/1.1 framing: path/query/version/keep-alive stay defaults.
            a_head = RequestHead(method=head.method, target=up_target,
                                 headers=base_headers + ((_ATTEMPT, b"%d" % attempt_no),),
                                 content_length=head.content_length, chunked=head.chunked,
                                 expect_continue=head.expect_continue, upgrade=head.upgrade)
            outcome: AttemptOutcome | None = None
            try:
                try:
                    async with (asyncio.timeout(policy.per_try_timeout) if policy.per_try_timeout is not None
                                else _UNBOUNDED) as per_try:
                        outcome = await self._start(a, a_head, body, down, src_ip, not continued, policy)
                        continued = continued or head.expect_continue
                        if outcome.kind is OutcomeKind.RESPONSE and a.head is not None:
                            decision = self._decide(policy, outcome, attempt_no, body, deadline, budget, target)
                            if not decision.retry:
                                await self._respond(a, decision, down, fwd, res)
                                return
                except TimeoutError:
                    if not per_try.expired():
                        raise
                    if res.started:                           # the response was streaming: too late
                        self._timed_out(down, res, "upstream_per_try_timeout")
                        return
                    outcome = AttemptOutcome(kind=OutcomeKind.PER_TRY_TIMEOUT)
                    a.failure = "per_try_timeout"
                if outcome.kind is not OutcomeKind.RESPONSE:
                    if (down.lost or body.client_error is not None or (body.gone and not body.complete)
                            or a.failure == "withdrawn"):
                        res.flags, res.details = ("DPE", "http1.codec_error{%s}" % body.client_error.reason) \
                            if body.client_error is not None else ("DC", "downstream_remote_disconnect")
                        return
                    decision = self._decide(policy, outcome, attempt_no, body, deadline, budget, target)
                    if not decision.retry:
                        self._fail(a, outcome, decision, down, fwd, res, attempt_no)
                        return
            finally:
                if outcome is None and asyncio.current_task().cancelling():
                    res.unreported = a          # a timeout (or a cancel) unwinding: forward() reports it
                else:
                    self._report(a, outcome, body, down)
                if retrying and budget is not None:
                    budget.retry_finished()
                    retrying = False
                if a.pump is not None:
                    await a.stop_pump()
                if a.up is not None:
                    a.up.abort()                  # a discarded (retried) or failed attempt: reset it
                    self.upstreams.release(a.up, False)
            # Retrying: the decision took a budget slot, given back when the retry ends (or now,
            # if the route timeout ends the request during the backoff).
            retrying = budget is not None
            try:
                await clock.sleep(decision.backoff)
            except BaseException:
                if retrying:
                    budget.retry_finished()
                raise

    def _report(self, a: _Attempt, outcome: AttemptOutcome | None, body: RequestBody, down: DownstreamConn) -> None:
        """Tell the endpoint's cluster how the attempt went, exactly once per chosen endpoint;
        None when it ended for the client's sake (outlier detection must not count it)."""
        if outcome is not None and outcome.kind is not OutcomeKind.RESPONSE and (
                body.client_error is not None or body.gone or down.lost or a.failure == "withdrawn"):
            outcome = None
        rtt = a.conn.rtt if a.conn is not None else None
        self.upstreams.report(a.target, outcome, rtt)

    def _decide(self, policy, outcome: AttemptOutcome, attempt_no: int, body: RequestBody, deadline: float | None,
                budget: RetryBudget | None, target: EndpointTarget) -> RetryDecision:
        if not is_retriable(policy, outcome):
            # What should_retry says first, with nothing for the budget to check or settle
            # (settle counts nothing for it): the outcome of nearly every request.
            if attempt_no > 1:
                self._count(target, _NOT_RETRIABLE, attempt_no)
            return _NOT_RETRIABLE
        now = self.clock.now()
        verdict = budget.check(now) if budget is not None else BudgetVerdict.ALLOWED
        d = should_retry(policy, outcome, attempt_no=attempt_no, budget=verdict, body_replayable=body.replayable,
                         rng=self.rng, now=now, deadline=deadline)
        if budget is not None:
            budget.settle(d, now)
        self._count(target, d, attempt_no)
        return d

    def _count(self, target: EndpointTarget, decision: RetryDecision, attempt_no: int) -> None:
        """Envoy's retry statistics of the cluster (upstream_rq_retry*)."""
        if decision.retry:
            stat = "upstream_rq_retry"
        elif decision.reason in (GiveUpReason.BUDGET_EXHAUSTED, GiveUpReason.RETRY_OVERFLOW):
            stat = "upstream_rq_retry_overflow"
        elif decision.reason is GiveUpReason.ATTEMPTS_EXHAUSTED:
            stat = "upstream_rq_retry_limit_exceeded"
        elif attempt_no > 1 and decision.reason is GiveUpReason.NOT_RETRIABLE:
            stat = "upstream_rq_retry_success"
        else:
            return
        self.upstreams.count(target, stat)

    async def _start(self, a: _Attempt, head: RequestHead, body: RequestBody, down: DownstreamConn, src_ip: str,
                     may_continue: bool, policy: RetryPolicy) -> AttemptOutcome:
        """Connect, send the head, start the body, wait for the response head."""
        a.started_at = self.clock.now()
        a.upgrade = head.upgrade is not None
        try:
            up = self.upstreams.take_idle(a.target) or await self.upstreams.acquire(a.target, src_ip, gone=down.gone)
        except Withdrawn:                     # the client left while waiting for a connection
            a.failure = "withdrawn"
            return AttemptOutcome(kind=OutcomeKind.RESET, request_sent=False)
        except Overflow:
            a.failure = "overflow"
            return AttemptOutcome(kind=OutcomeKind.OVERFLOW, request_sent=False)
        except (TunnelError, OSError) as e:   # ConnectTimeout included
            a.failure = getattr(e, "reason", None) or type(e).__name__
            a.failure_text = str(e)
            a.connect_timeout = isinstance(e, ConnectTimeout)
            return AttemptOutcome(kind=OutcomeKind.CONNECT_FAILURE, request_sent=False)
        a.up = a.conn = up
        try:
            up.write(up.codec.send(head))
        except LocalProtocolError:
            a.failure = "connection_termination"
            return AttemptOutcome(kind=OutcomeKind.RESET, request_sent=False)
        if head.expect_continue and may_continue:
            down.write(down.codec.send(InformationalResponse(status=100)))
        if body.send_if_complete(up):
            a.sent = True                     # what `body.send` returns, without a task or future per request
        else:
            a.pump = asyncio.ensure_future(body.send(up))
        while True:
            try:
                ev = await up.next()
            except HttpError as e:
                # Closed before any response byte: Envoy's connection termination (503 UC);
                # anything else is a protocol error (502 UPE).
                a.failure = "connection_termination" if e.reason == "upstream_closed" else "protocol_error:" + e.reason
                return AttemptOutcome(kind=OutcomeKind.RESET)
            if ev is None:
                a.failure = "connection_termination"
                return AttemptOutcome(kind=OutcomeKind.RESET)
            t = type(ev)
            if t is ResponseHead:
                a.head = ev
                return _outcome_of(ev, policy)
            if t is InformationalResponse:
                if ev.status != 100 or not head.expect_continue:
                    down.write(down.codec.send(ev))

    def _fail(self, a: _Attempt, outcome: AttemptOutcome, decision: RetryDecision, down: DownstreamConn,
              fwd: Forward, res: ForwardResult, attempt_no: int) -> None:
        """The last attempt failed without a response: Envoy's local reply for it."""
        self._count_denial(decision, fwd, res)
        r = failure_reply(outcome.kind, failure=a.failure, failure_text=a.failure_text, reason=decision.reason,
                          attempts=attempt_no, connect_timeout=a.connect_timeout)
        res.flags, res.details, res.failure = r.flags, r.details, r.failure
        if not down.lost:
            self._local_reply(down, res, r.status, r.body, headers=r.headers,
                              grpc_status=DEADLINE_EXCEEDED if r.timeout else None)

    def _count_denial(self, decision: RetryDecision, fwd: Forward, res: ForwardResult) -> None:
        if decision.reason is GiveUpReason.BUDGET_EXHAUSTED and fwd.service is not None:
            self.metrics.retry_budget_exhausted(service_fqdn(fwd.service))

    async def _respond(self, a: _Attempt, decision: RetryDecision, down: DownstreamConn, fwd: Forward,
                       res: ForwardResult) -> None:
        """Stream the chosen attempt's response downstream (head, body, end)."""
        up, head = a.up, a.head
        assert up is not None and head is not None
        a.up = None                                   # released here, not by the loop
        self._count_denial(decision, fwd, res)
        res.flags = give_up_flag(decision.reason) or "-"
        if head.status == 101 and a.upgrade:     # WebSocket: raw bytes both ways now
            down.write(down.codec.send(head))
            res.status, res.started = 101, True
            try:
                up_n, down_n = await relay(down, up)
                res.request_bytes, res.response_bytes = up_n, down_n
            finally:
                await a.stop_pump()
                self.upstreams.release(up, False)
            return
        if fwd.response_headers:
            head = ResponseHead(status=head.status, reason=head.reason, content_length=head.content_length,
                                chunked=head.chunked,
                                headers=tuple(apply_modifiers(list(head.headers), fwd.response_headers)))
        dcodec = down.codec
        out = [dcodec.send(head)]
        res.status, res.started = head.status, True
        try:
            # What of the response is already here (a small one arrives with its head) goes in
            # the same write: one HBONE DATA frame instead of one per event.
            # (An HTTP/2 upstream stream has no queue to look into: it streams as it comes.)
            ended, size = False, len(out[0])
            pop_if = up.pop_if if isinstance(up, HttpChannel) else None
            while pop_if is not None and size < COALESCE_LIMIT:
                ev = pop_if(Body)
                if ev is not None:
                    res.response_bytes += len(ev.data)
                    size += len(ev.data)
                    out.append(dcodec.send(ev))
                    continue
                ev = pop_if(EndOfMessage)
                if ev is not None:
                    out.append(dcodec.send(ev))
                    ended = True
                break
            down.write(out[0] if len(out) == 1 else b"".join(out))
            if down.lost and len(out) > 1:   # as the streaming loop below says after a body write
                res.flags, res.details = "DC", "downstream_remote_disconnect"
                return
            if down.writing_paused and not ended:
                await down.drain()
            while not ended:
                try:
                    ev = await up.next()
                except HttpError as e:
                    res.flags, res.details, res.failure = "UPE", f"upstream_protocol_error{{{e.reason}}}", e.reason
                    down.abort()
                    return
                if ev is None:
                    res.flags = "UPE"
                    res.details = "upstream_reset_after_response_started{connection_termination}"
                    down.abort()
                    return
                t = type(ev)
                if t is Body:
                    res.response_bytes += len(ev.data)
                    down.write(down.codec.send(ev))
                    if down.writing_paused:
                        await down.drain()
                    if down.lost:                      # the client went away: stop reading upstream
                        res.flags, res.details = "DC", "downstream_remote_disconnect"
                        return
                elif t is EndOfMessage:
                    down.write(down.codec.send(ev))
                    break
            if a.pump is not None and not a.pump.done() and not down.codec.should_close:
                await a.pump          # the response is complete: the rest of the request body follows
            res.reusable = a.body_sent() and up.codec.reusable
        finally:
            if a.pump is not None:
                await a.stop_pump()
            self.upstreams.release(up, res.reusable)
