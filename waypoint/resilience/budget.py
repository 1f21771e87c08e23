"""Retry budget per destination service: retries capped at a share of recent requests, ON by default.

Theory of operation
-------------------
Retries multiply load exactly when a service is least able to take it: three callers that each
retry twice turn one failing backend's trouble into a cascade (the seed article's incident).
Envoy's per-request `num_retries` does not bound that; Linkerd's retry budget does, and this
module is that budget, on by default for every destination service:

* A retry is allowed while `retries in the window + 1 <= retry_ratio x requests in the
  window`; for a quiet service (that share below `min_retries_per_second x window`) also while
  `retries in the current bucket + 1 <= min_retries_per_second x bucket width`: the ratio caps
  retries as a share of original requests, the floor lets a quiet service still retry. Defaults are Linkerd's: ratio 0.2, floor 10 retries per second, window
  (ttl) 10 s. In steady state that is max(ratio x request rate, floor) retries per second.
  **Deliberate deviations** from Linkerd's ServiceProfile `retryBudget` (tower's TpsBudget),
  which allows the floor PLUS the ratio, the floor as a reserve of a whole window: with the
  sum a service that fails everything gets 1 + 0.2 + 100/N attempts per request over N
  requests in a window (1.3x at 1,000), and a reserve lets a burst of 100 retries through at
  once (1.25x measured over 800 requests at 50/s); so the mesh takes the larger of the two and
  spreads the floor per bucket: at most 1.2x once the traffic is above floor / ratio
  (50 requests/s), and the floor still governs quiet services.
* Hops compound: A retries B, whose app calls C again for each retry, so C sees the same
  request twice without any retry at C's hop. An original request whose `x-request-id`
  (with its method and path) the destination already saw in the window therefore counts as
  a retry against its budget, and is refused like one when the budget has no room
  (`admit(now, key)`), so attempts reaching C stay within 1.2x of the DISTINCT requests, not
  1.2^hops (counting without refusing still gave 1.28x in a three-hop simulation: repeats
  arrive after the budget let retries in). A key is kept from its arrival for one window (at
  most `max_ids` keys), unless the data path `forget`s it: it does when the request ended with
  a response below 400 relayed whole (not gRPC, whose failures come in trailers). No proxy
  retries such a response, so a repeat of it is a new request (a client reusing its id for a
  fresh call, or a hop above whose own failure was elsewhere; that hop's budget bounds those
  repeats). In a failure cascade every hop answers with a failure, so its keys stay. This
  keeps the store to the requests in flight and those that failed: remembering every key of
  a window cost ~180 bytes each (12 MB of the waypoint's RSS at 8,000 req/s) and ~20 % of its
  req/s in the benchmark (tests/bench/NOTES-l7.md).
* Independently, at most `max_concurrent_retries` retries may be in flight: DestinationRule
  `trafficPolicy.connectionPool.http.maxRetries`, Envoy's `max_retries` circuit breaker
  (Istio's default 2^32-1, i.e. off; overflow is Envoy's upstream_rq_retry_overflow).

The window is `buckets` time buckets over an injected monotonic `now` (seconds): each event
adds to the current bucket and to running sums; moving forward clears at most `buckets`
expired buckets, so every operation is O(1) (bounded by the constant bucket count) and the
window is exact to one bucket width (1 s by default).

Usage by the data path, per destination service (`RetryBudgets.for_service`):
`admit(now, key)` for each original request (or `record_request(now)` without a key), and
`forget(key)` when it ended well; `check(now)` -> a `BudgetVerdict` passed to
`retry.should_retry`; then `settle(decision, now)`, which counts an allowed retry (and holds a
concurrency slot until `retry_finished()`), or counts a denial by reason (`denials`), which the
data path turns into a metric and a response flag.

Tuning (Service annotations, converted at the config edge into ServiceInfo.retry_budget,
mesh/config/annotations.py; `budget_config` applies them):

* `retry.ambient.dev/budget`: `off` disables the budget for the service (not the maxRetries cap);
* `retry.ambient.dev/budget-percent`: the ratio as a percentage, 0..1000 (default `20`);
* `retry.ambient.dev/budget-min-retries-per-second`: the floor (default `10`);
* `retry.ambient.dev/budget-window`: the window, a Go duration such as `10s` (1 s .. 10 min).

Annotations on the Service suit Istio users (the annotation idiom istio.io/* uses for per-service
knobs) and keep the budget next to the service it protects; Istio's DestinationRule has no field
for it. A bad annotation is a warning at `ambient apply` (reason `bad_annotation`) and the
default is kept: a typo must not switch the protection off.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

from mesh.model import RetryBudgetSpec
from mesh.model.route import ConnectionPool

from .retry import BudgetVerdict, GiveUpReason, RetryDecision

__all__ = ["RetryBudgetConfig", "DEFAULT_BUDGET", "UNLIMITED", "budget_config", "RetryBudget", "RetryBudgets"]

UNLIMITED = 2 ** 32 - 1
"""Istio's circuit-breaker thresholds when unset (cluster_traffic_policy.go)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryBudgetConfig:
    enabled: bool = True
    retry_ratio: float = 0.2
    """Retries allowed per original request in the window (Linkerd: retryRatio 0.2)."""
    min_retries_per_second: float = 10.0
    """Retries always allowed, per second of window (Linkerd: minRetriesPerSecond 10)."""
    window: float = 10.0
    """Seconds of history considered (Linkerd: ttl 10s)."""
    buckets: int = 10
    max_concurrent_retries: int = UNLIMITED
    """DestinationRule connectionPool.http.maxRetries."""
    max_ids: int = 65536
    """Request ids remembered per service (the oldest are forgotten first)."""

    def __post_init__(self) -> None:
        if self.window <= 0 or self.buckets < 1 or self.retry_ratio < 0 or self.min_retries_per_second < 0:
            raise ValueError(f"invalid retry budget {self!r}")


DEFAULT_BUDGET = RetryBudgetConfig()


def budget_config(spec: RetryBudgetSpec | None, pool: ConnectionPool | None = None) -> RetryBudgetConfig:
    """The budget for a destination service from its annotations (already converted and
    checked at the config edge, mesh/config/annotations.py) and its DestinationRule's pool."""
    cfg = DEFAULT_BUDGET
    if spec is not None:
        if not spec.enabled:
            cfg = replace(cfg, enabled=False)
        if spec.percent is not None:
            cfg = replace(cfg, retry_ratio=spec.percent / 100.0)
        if spec.min_retries_per_second is not None:
            cfg = replace(cfg, min_retries_per_second=spec.min_retries_per_second)
        if spec.window is not None:
            cfg = replace(cfg, window=spec.window)
    max_retries = pool.http.max_retries if pool is not None and pool.http is not None else None
    if max_retries:  # Istio: zero means unset
        cfg = replace(cfg, max_concurrent_retries=max_retries)
    return cfg


class RetryBudget:
    """One destination service's window of requests and retries (single-threaded, loop-owned)."""

    __slots__ = ("config", "_width", "_epoch", "_requests", "_retries", "_req_sum", "_ret_sum",
                 "in_flight", "_denials", "_ids")

    def __init__(self, config: RetryBudgetConfig = DEFAULT_BUDGET) -> None:
        self.config = config
        self._width = config.window / config.buckets
        self._epoch: int | None = None
        """Index (now // width) of the newest bucket."""
        self._requests = [0] * config.buckets
        self._retries = [0] * config.buckets
        self._req_sum = 0
        self._ret_sum = 0
        self.in_flight = 0
        self._denials: dict[GiveUpReason, int] = {}
        self._ids: OrderedDict[str | bytes, float] = OrderedDict()
        """Request id -> when last seen, oldest first. An OrderedDict: a plain dict emptied from
        the front makes `next(iter(...))` skip every deleted slot (O(n) per request under load)."""

    def _advance(self, now: float) -> int:
        epoch = int(now // self._width)
        if self._epoch is None:
            self._epoch = epoch
        elif epoch > self._epoch:
            n = self.config.buckets
            for e in range(self._epoch + 1, self._epoch + 1 + min(epoch - self._epoch, n)):
                i = e % n
                self._req_sum -= self._requests[i]
                self._ret_sum -= self._retries[i]
                self._requests[i] = self._retries[i] = 0
            self._epoch = epoch
        # A clock that steps back (it should not: monotonic) counts into the newest bucket.
        return self._epoch % self.config.buckets

    def record_request(self, now: float) -> None:
        """An original request (not a retry) was sent to this service."""
        i = self._advance(now)
        self._requests[i] += 1
        self._req_sum += 1

    def admit(self, now: float, key: str | bytes | None) -> BudgetVerdict:
        """An original request at this hop, `key` naming it across hops (its x-request-id,
        method and path). A key not seen in the window counts as a request. A key seen again
        is a retry made further up the chain: it counts as a retry, and when the budget has
        no room it is refused (EXHAUSTED, counted as a denial: the data path does not send it)."""
        if key is None:
            self.record_request(now)
            return BudgetVerdict.ALLOWED
        i = self._advance(now)
        ids = self._ids
        horizon = now - self.config.window
        while ids:                                   # forget keys older than the window
            oldest = next(iter(ids))
            if ids[oldest] > horizon and len(ids) < self.config.max_ids:
                break
            del ids[oldest]
        seen = ids.pop(key, None) is not None
        ids[key] = now
        if not seen:
            self._requests[i] += 1
            self._req_sum += 1
            return BudgetVerdict.ALLOWED
        if self.config.enabled and not self._has_room(now):
            r = GiveUpReason.BUDGET_EXHAUSTED
            self._denials[r] = self._denials.get(r, 0) + 1
            return BudgetVerdict.EXHAUSTED
        self._retries[i] += 1
        self._ret_sum += 1
        return BudgetVerdict.ALLOWED

    def forget(self, key: str | bytes) -> None:
        """The request `key` named ended well (see the module's docstring): a repeat of it
        is a new request, and its key need not be kept."""
        self._ids.pop(key, None)

    def requests_in_window(self, now: float) -> int:
        self._advance(now)
        return self._req_sum

    def retries_in_window(self, now: float) -> int:
        self._advance(now)
        return self._ret_sum

    def allowance(self, now: float) -> float:
        """Retries the ratio allows in the window right now."""
        self._advance(now)
        return self.config.retry_ratio * self._req_sum

    def _has_room(self, now: float) -> bool:
        """One more retry fits the ratio's share of the window; or, for a quiet service (the
        ratio's share below the floor's), the floor's share of the current bucket (the floor is
        a rate, spread per bucket: never a burst of a window's worth, never added to a busy
        service's ratio)."""
        i = self._advance(now)
        c = self.config
        share = c.retry_ratio * self._req_sum
        if self._ret_sum + 1 <= share:
            return True
        return share < c.min_retries_per_second * c.window and self._retries[i] + 1 <= c.min_retries_per_second * self._width

    def check(self, now: float) -> BudgetVerdict:
        """May one more retry start now? (Counts nothing: `settle` does.)"""
        if self.in_flight >= self.config.max_concurrent_retries:
            return BudgetVerdict.OVERFLOW
        if self.config.enabled and not self._has_room(now):
            return BudgetVerdict.EXHAUSTED
        return BudgetVerdict.ALLOWED

    def settle(self, decision: RetryDecision, now: float) -> None:
        """Record what `should_retry` decided: an allowed retry takes budget and a concurrency
        slot (give it back with `retry_finished`); a budget or overflow refusal is counted."""
        if decision.retry:
            i = self._advance(now)
            self._retries[i] += 1
            self._ret_sum += 1
            self.in_flight += 1
        elif decision.reason in (GiveUpReason.BUDGET_EXHAUSTED, GiveUpReason.RETRY_OVERFLOW):
            self._denials[decision.reason] = self._denials.get(decision.reason, 0) + 1

    def retry_finished(self) -> None:
        """A retry attempt started by `settle` ended (any outcome)."""
        if self.in_flight <= 0:
            raise RuntimeError("retry_finished without a retry in flight")
        self.in_flight -= 1

    def denials(self, reason: GiveUpReason) -> int:
        return self._denials.get(reason, 0)

    def reconfigure(self, config: RetryBudgetConfig) -> RetryBudget:
        """The same service with new settings: the counts restart (window sizes may differ),
        the retries in flight are kept."""
        if config == self.config:
            return self
        fresh = RetryBudget(config)
        fresh.in_flight = self.in_flight
        fresh._denials = dict(self._denials)
        fresh._ids = self._ids
        return fresh


class RetryBudgets:
    """The budgets of all destination services, created on first use."""

    __slots__ = ("_config_for", "_budgets")

    def __init__(self, config_for: Callable[[str], RetryBudgetConfig] = lambda _key: DEFAULT_BUDGET) -> None:
        self._config_for = config_for
        self._budgets: dict[str, RetryBudget] = {}

    def for_service(self, key: str) -> RetryBudget:
        """`key`: the destination service (e.g. "ns/name" or its hostname)."""
        b = self._budgets.get(key)
        if b is None:
            b = self._budgets[key] = RetryBudget(self._config_for(key))
        return b

    def update(self, key: str, config: RetryBudgetConfig) -> None:
        """The service's annotations or DestinationRule changed."""
        b = self._budgets.get(key)
        self._budgets[key] = b.reconfigure(config) if b is not None else RetryBudget(config)

    def forget(self, key: str) -> None:
        """The service is gone."""
        self._budgets.pop(key, None)
