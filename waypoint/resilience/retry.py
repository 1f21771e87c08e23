"""Retry policy and the per-attempt retry decision (Envoy's retry state, decided, not done).

Theory of operation
-------------------
One typed `RetryPolicy` comes from either API, converted once per route:

* VirtualService `retries` (`policy_from_virtual_service`): Istio copies its default policy and
  overrides what is set (istio `route/retry/retry.go`): `attempts` -> number of retries (0 = no
  retries at all), a non-empty `retryOn` replaces the default conditions, integers in `retryOn`
  become retriable status codes (and imply `retriable-status-codes`), `perTryTimeout`,
  `retryIgnorePreviousHosts` (default true), `retryRemoteLocalities`, `backoff` (the base
  interval). No `retries` -> Istio's default policy (`DEFAULT_RETRY_POLICY`): 2 retries on
  connect-failure, refused-stream, unavailable, cancelled, retriable-status-codes with NO codes
  (503 was dropped from the default in Istio 1.24), previous hosts avoided.
* HTTPRoute `retry` (GEP-1731, `policy_from_http_route`): `attempts` counts RETRIES, not tries
  (so at most 1 + attempts requests); `codes` are the retriable statuses; connection errors
  (connect failure, reset, refused stream) are always retried, as GEP-1731 requires; `backoff`
  is the base interval. No `retry` stanza -> the default policy, as Istio does for HTTPRoutes.

The data path reports each finished attempt as an `AttemptOutcome` and asks `should_retry`,
which returns a `RetryDecision`: retry after `backoff` seconds, or give up with a closed
`GiveUpReason`. The checks run in Envoy's order of precedence: is the outcome retriable under
`retry_on` (an overflow never is), are retries left, is the body replayable, does the backoff
fit before the request's deadline, does the retry budget (budget.py) allow it. Only the last
reason costs budget bookkeeping, so the budget is asked last.

What `retry_on` matches (Envoy `retry_state_impl.cc`, the x-envoy-retry-on documentation):
`5xx` any status >= 500 and every reset or connect failure or per-try timeout;
`gateway-error` 502/503/504 and the same failures; `reset` any reset or connect failure;
`reset-before-request` a reset before any request byte was sent; `connect-failure`;
`refused-stream` (HTTP/2 REFUSED_STREAM); `retriable-4xx` 409; `retriable-status-codes` the
policy's codes; `retriable-headers` a response carrying one of the policy's header names;
`envoy-ratelimited` a response with `x-envoy-ratelimited`; the gRPC ones match `grpc-status`
1 cancelled, 4 deadline-exceeded, 8 resource-exhausted, 13 internal, 14 unavailable. A per-try
timeout is retried only under `5xx` or `gateway-error` (Envoy: "non-hedged per try timeouts are
only retried if ... RETRY_ON_5XX or RETRY_ON_GATEWAY_ERROR"); a circuit-breaker overflow never
is. `http3-post-connect-failure` is accepted and never matches (no HTTP/3 here).

Backoff is Envoy's JitteredExponentialBackOffStrategy: before retry n (1-based) the wait is
uniform in [0, (2^n - 1) x base) and capped at max, base 25 ms and max 10 x base unless set
("The default is 10 times the base_interval", Envoy backoff.proto). Randomness is injected.

Previous-host avoidance: `hosts_to_avoid` gives the balancer the endpoints already tried (when
the policy avoids them); the balancer picks another one when there is one (Envoy's
previous_hosts predicate with 5 re-pick attempts falls back to a tried host the same way).
Each attempt carries `x-envoy-attempt-count: N` (`attempt_count_header`), as Istio enables.
"""
from __future__ import annotations

import enum
import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass, replace
from http import HTTPStatus

from mesh.fastinit import fast_init
from mesh.model.route import ENVOY_RETRY_ON, HTTPRouteRetry, VSRetries

__all__ = ["BudgetVerdict", "RetryOn", "RETRY_ON_TOKENS", "RetryPolicy", "DEFAULT_RETRY_POLICY", "NO_RETRY",
           "DEFAULT_BASE_INTERVAL", "policy_from_virtual_service", "policy_from_http_route",
           "parse_retry_on", "OutcomeKind", "AttemptOutcome", "GiveUpReason", "RetryDecision",
           "is_retriable", "should_retry", "backoff_delay", "hosts_to_avoid",
           "attempt_count_header", "ATTEMPT_COUNT_HEADER"]


class BudgetVerdict(enum.Enum):
    """What the destination's retry budget (budget.py) says about one more retry now."""

    ALLOWED = "allowed"
    EXHAUSTED = "exhausted"
    """More retries than the budget's ratio and floor allow in its window."""
    OVERFLOW = "overflow"
    """connectionPool.http.maxRetries retries already in flight."""


class RetryOn(enum.Flag):
    """Envoy's retry conditions (x-envoy-retry-on / x-envoy-retry-grpc-on)."""

    NONE = 0
    FIVE_XX = enum.auto()
    GATEWAY_ERROR = enum.auto()
    RESET = enum.auto()
    RESET_BEFORE_REQUEST = enum.auto()
    CONNECT_FAILURE = enum.auto()
    ENVOY_RATELIMITED = enum.auto()
    RETRIABLE_4XX = enum.auto()
    REFUSED_STREAM = enum.auto()
    RETRIABLE_STATUS_CODES = enum.auto()
    RETRIABLE_HEADERS = enum.auto()
    HTTP3_POST_CONNECT_FAILURE = enum.auto()
    CANCELLED = enum.auto()
    DEADLINE_EXCEEDED = enum.auto()
    INTERNAL = enum.auto()
    RESOURCE_EXHAUSTED = enum.auto()
    UNAVAILABLE = enum.auto()


RETRY_ON_TOKENS: dict[str, RetryOn] = {
    "5xx": RetryOn.FIVE_XX, "gateway-error": RetryOn.GATEWAY_ERROR, "reset": RetryOn.RESET,
    "reset-before-request": RetryOn.RESET_BEFORE_REQUEST, "connect-failure": RetryOn.CONNECT_FAILURE,
    "envoy-ratelimited": RetryOn.ENVOY_RATELIMITED, "retriable-4xx": RetryOn.RETRIABLE_4XX,
    "refused-stream": RetryOn.REFUSED_STREAM, "retriable-status-codes": RetryOn.RETRIABLE_STATUS_CODES,
    "retriable-headers": RetryOn.RETRIABLE_HEADERS,
    "http3-post-connect-failure": RetryOn.HTTP3_POST_CONNECT_FAILURE,
    "cancelled": RetryOn.CANCELLED, "deadline-exceeded": RetryOn.DEADLINE_EXCEEDED,
    "internal": RetryOn.INTERNAL, "resource-exhausted": RetryOn.RESOURCE_EXHAUSTED,
    "unavailable": RetryOn.UNAVAILABLE,
}
assert set(RETRY_ON_TOKENS) == set(ENVOY_RETRY_ON), "the config edge and the decision disagree"

_GRPC_CODES = {1: RetryOn.CANCELLED, 4: RetryOn.DEADLINE_EXCEEDED, 8: RetryOn.RESOURCE_EXHAUSTED,
               13: RetryOn.INTERNAL, 14: RetryOn.UNAVAILABLE}
_FAILURE_CONDITIONS = RetryOn.FIVE_XX | RetryOn.GATEWAY_ERROR | RetryOn.RESET
_FIVE_XX, _GATEWAY_ERROR, _RETRIABLE_4XX = RetryOn.FIVE_XX.value, RetryOn.GATEWAY_ERROR.value, RetryOn.RETRIABLE_4XX.value
_RETRIABLE_STATUS_CODES, _ENVOY_RATELIMITED = RetryOn.RETRIABLE_STATUS_CODES.value, RetryOn.ENVOY_RATELIMITED.value
_RETRIABLE_HEADERS = RetryOn.RETRIABLE_HEADERS.value

DEFAULT_BASE_INTERVAL = 0.025
"""Envoy's default retry back-off base interval (Istio API: "default minimum duration of 25ms")."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    num_retries: int
    """Retries after the first attempt; 0 = never retry. At most 1 + num_retries attempts."""
    retry_on: RetryOn
    retriable_status_codes: frozenset[int] = frozenset()
    retriable_headers: tuple[str, ...] = ()
    """Lowercase response header names for `retriable-headers` (presence)."""
    per_try_timeout: float | None = None
    """Seconds per attempt; None: only the route timeout applies."""
    base_interval: float = DEFAULT_BASE_INTERVAL
    max_interval: float | None = None
    """None: 10 x base_interval (Envoy)."""
    avoid_previous_hosts: bool = True
    host_selection_max_attempts: int = 5
    retry_remote_localities: bool = False
    """Kept for completeness: the mesh has no localities, so it changes nothing."""

    @property
    def backoff_cap(self) -> float:
        return self.max_interval if self.max_interval is not None else 10 * self.base_interval


DEFAULT_RETRY_POLICY = RetryPolicy(
    num_retries=2,
    retry_on=(RetryOn.CONNECT_FAILURE | RetryOn.REFUSED_STREAM | RetryOn.UNAVAILABLE
              | RetryOn.CANCELLED | RetryOn.RETRIABLE_STATUS_CODES))
"""Istio's default (route/retry/retry.go): attempts 2, no status codes, previous hosts avoided."""

NO_RETRY = RetryPolicy(num_retries=0, retry_on=RetryOn.NONE)


def parse_retry_on(tokens: Iterable[str]) -> tuple[RetryOn, frozenset[int]]:
    """Conditions and status codes from already-validated `retryOn` tokens (Istio parseRetryOn:
    integers become codes and imply retriable-status-codes). Raises ValueError naming a bad token."""
    flags, codes = RetryOn.NONE, set()
    for tok in tokens:
        if tok.isdigit():
            codes.add(HTTPStatus(int(tok)).value)
        elif tok in RETRY_ON_TOKENS:
            flags |= RETRY_ON_TOKENS[tok]
        else:
            raise ValueError(f"{tok!r} is not a retry condition")
    if codes:
        flags |= RetryOn.RETRIABLE_STATUS_CODES
    return flags, frozenset(codes)


def policy_from_virtual_service(retries: VSRetries | None,
                                default: RetryPolicy = DEFAULT_RETRY_POLICY) -> RetryPolicy:
    """`http[].retries` -> policy; None -> `default` (Istio's, or meshConfig.defaultHttpRetryPolicy)."""
    if retries is None:
        return default
    if retries.attempts <= 0:
        return NO_RETRY
    retry_on, codes = default.retry_on, default.retriable_status_codes
    if retries.retry_on:
        retry_on, codes = parse_retry_on(retries.retry_on)
    return RetryPolicy(
        num_retries=retries.attempts, retry_on=retry_on, retriable_status_codes=codes,
        per_try_timeout=retries.per_try_timeout or None,
        base_interval=retries.backoff if retries.backoff else default.base_interval,
        avoid_previous_hosts=(default.avoid_previous_hosts if retries.retry_ignore_previous_hosts is None
                              else retries.retry_ignore_previous_hosts),
        host_selection_max_attempts=default.host_selection_max_attempts,
        retry_remote_localities=bool(retries.retry_remote_localities))


_GEP_CONNECTION_ERRORS = RetryOn.CONNECT_FAILURE | RetryOn.RESET | RetryOn.REFUSED_STREAM


def policy_from_http_route(retry: HTTPRouteRetry | None, *,
                           backend_request_timeout: float | None = None) -> RetryPolicy:
    """A rule's `retry` (GEP-1731) -> policy; `backend_request_timeout` (the rule's
    `timeouts.backendRequest`) becomes the per-try timeout. None -> the default policy."""
    if retry is None:
        return (replace(DEFAULT_RETRY_POLICY, per_try_timeout=backend_request_timeout)
                if backend_request_timeout else DEFAULT_RETRY_POLICY)
    attempts = DEFAULT_RETRY_POLICY.num_retries if retry.attempts is None else retry.attempts
    if attempts <= 0:
        return NO_RETRY
    flags = _GEP_CONNECTION_ERRORS | (RetryOn.RETRIABLE_STATUS_CODES if retry.codes else RetryOn.NONE)
    return RetryPolicy(num_retries=attempts, retry_on=flags,
                       retriable_status_codes=frozenset(retry.codes),
                       per_try_timeout=backend_request_timeout or None,
                       base_interval=retry.backoff if retry.backoff else DEFAULT_BASE_INTERVAL)


class OutcomeKind(enum.Enum):
    """How one upstream attempt ended, as the data path saw it."""

    RESPONSE = "response"
    """Response headers arrived (status, maybe grpc-status)."""
    CONNECT_FAILURE = "connect_failure"
    """No connection (refused, unreachable, connect timeout): nothing was sent."""
    RESET = "reset"
    """The stream or connection was reset or closed before response headers."""
    REFUSED_STREAM = "refused_stream"
    """HTTP/2 RST_STREAM(REFUSED_STREAM): the peer did not process the request."""
    PER_TRY_TIMEOUT = "per_try_timeout"
    OVERFLOW = "overflow"
    """A circuit breaker refused the attempt (flag UO): never retried."""


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptOutcome:
    kind: OutcomeKind
    status: int | None = None
    """The HTTP status of a RESPONSE."""
    grpc_status: int | None = None
    """`grpc-status` of a trailers-only gRPC RESPONSE, when present."""
    header_names: frozenset[str] = frozenset()
    """Lowercase names of the response headers (for retriable-headers, x-envoy-ratelimited)."""
    request_sent: bool = True
    """False when no request byte reached the upstream (for reset-before-request)."""


class GiveUpReason(enum.Enum):
    """Why the request will not be retried (closed set; the value is the metric label)."""

    NOT_RETRIABLE = "not_retriable"
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    BODY_NOT_REPLAYABLE = "body_not_replayable"
    DEADLINE = "deadline"
    """The backoff would end at or after the request's deadline (the route timeout)."""
    BUDGET_EXHAUSTED = "budget_exhausted"
    """The destination's retry budget has no room (the data path flags the response)."""
    RETRY_OVERFLOW = "retry_overflow"
    """DestinationRule connectionPool.http.maxRetries concurrent retries reached (Envoy's
    upstream_rq_retry_overflow)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryDecision:
    retry: bool
    reason: GiveUpReason | None = None
    """Set exactly when retry is False."""
    backoff: float = 0.0
    """Seconds to wait before the next attempt."""
    next_attempt: int | None = None
    """The number of the next attempt (its x-envoy-attempt-count), when retrying."""


def is_retriable(policy: RetryPolicy, outcome: AttemptOutcome) -> bool:
    """Does `outcome` match the policy's conditions (ignoring counts, budgets and deadlines)?"""
    on, kind = policy.retry_on, outcome.kind
    if kind is OutcomeKind.OVERFLOW:
        return False  # Envoy: "we never retry if the reset reason is overflow"
    if kind is OutcomeKind.PER_TRY_TIMEOUT:
        return bool(on & (RetryOn.FIVE_XX | RetryOn.GATEWAY_ERROR))
    if kind is OutcomeKind.CONNECT_FAILURE:
        return bool(on & (_FAILURE_CONDITIONS | RetryOn.CONNECT_FAILURE | RetryOn.RESET_BEFORE_REQUEST))
    if kind is OutcomeKind.REFUSED_STREAM:
        return bool(on & (_FAILURE_CONDITIONS | RetryOn.REFUSED_STREAM)) or bool(
            on & RetryOn.RESET_BEFORE_REQUEST and not outcome.request_sent)
    if kind is OutcomeKind.RESET:
        return bool(on & _FAILURE_CONDITIONS) or bool(
            on & RetryOn.RESET_BEFORE_REQUEST and not outcome.request_sent)
    # A response: the conditions tested as int masks (each enum.Flag `&` is ~0.5 µs of Python,
    # and every proxied response is tested against six of them).
    v, status = on._value_, outcome.status or 0
    if v & _FIVE_XX and status >= 500:
        return True
    if v & _GATEWAY_ERROR and status in (502, 503, 504):
        return True
    if v & _RETRIABLE_4XX and status == 409:
        return True
    if v & _RETRIABLE_STATUS_CODES and status in policy.retriable_status_codes:
        return True
    if v & _ENVOY_RATELIMITED and "x-envoy-ratelimited" in outcome.header_names:
        return True
    if v & _RETRIABLE_HEADERS and any(h in outcome.header_names for h in policy.retriable_headers):
        return True
    grpc = _GRPC_CODES.get(outcome.grpc_status) if outcome.grpc_status is not None else None
    return grpc is not None and bool(on & grpc)


def backoff_delay(policy: RetryPolicy, retry_no: int, rng: random.Random) -> float:
    """Seconds to wait before retry `retry_no` (1 = the first retry): Envoy's full jitter,
    uniform in [0, (2^n - 1) x base), capped at the max interval."""
    if retry_no < 1:
        raise ValueError(f"retry_no counts from 1, got {retry_no}")
    # Past ~60 doublings the cap always wins; avoid building huge floats.
    ceiling = (2 ** min(retry_no, 60) - 1) * policy.base_interval
    return min(rng.random() * ceiling, policy.backoff_cap)


def should_retry(policy: RetryPolicy, outcome: AttemptOutcome, *, attempt_no: int,
                 budget: BudgetVerdict, body_replayable: bool, rng: random.Random,
                 now: float, deadline: float | None = None) -> RetryDecision:
    """Decide after attempt `attempt_no` (1 = the original request) ended with `outcome`.

    `budget` is the destination's `RetryBudget.check(now)`; `body_replayable` says whether the
    data path still holds the whole request body (a body already streamed past its buffer cannot
    be sent again); `deadline` is the monotonic time the route timeout ends (None: no timeout).
    """
    if attempt_no < 1:
        raise ValueError(f"attempt_no counts from 1, got {attempt_no}")
    if not is_retriable(policy, outcome):
        return RetryDecision(retry=False, reason=GiveUpReason.NOT_RETRIABLE)
    if attempt_no > policy.num_retries:
        return RetryDecision(retry=False, reason=GiveUpReason.ATTEMPTS_EXHAUSTED)
    if not body_replayable:
        return RetryDecision(retry=False, reason=GiveUpReason.BODY_NOT_REPLAYABLE)
    wait = backoff_delay(policy, attempt_no, rng)
    if deadline is not None and now + wait >= deadline:
        return RetryDecision(retry=False, reason=GiveUpReason.DEADLINE)
    if budget is BudgetVerdict.EXHAUSTED:
        return RetryDecision(retry=False, reason=GiveUpReason.BUDGET_EXHAUSTED)
    if budget is BudgetVerdict.OVERFLOW:
        return RetryDecision(retry=False, reason=GiveUpReason.RETRY_OVERFLOW)
    return RetryDecision(retry=True, backoff=wait, next_attempt=attempt_no + 1)


def hosts_to_avoid(policy: RetryPolicy, tried: Collection[str]) -> frozenset[str]:
    """Endpoints the balancer should skip for the next attempt (the ones already tried)."""
    return frozenset(tried) if policy.avoid_previous_hosts else frozenset()


ATTEMPT_COUNT_HEADER = "x-envoy-attempt-count"


def attempt_count_header(attempt_no: int) -> tuple[str, str]:
    """The header every attempt carries: 1 for the original request, 2 for the first retry..."""
    if attempt_no < 1:
        raise ValueError(f"attempt_no counts from 1, got {attempt_no}")
    return ATTEMPT_COUNT_HEADER, str(attempt_no)
