"""Outlier detection: eject endpoints after consecutive errors, as Envoy does for Istio's DestinationRule.

Theory of operation
-------------------
Configuration (`OutlierConfig.from_model`): nothing is detected unless the DestinationRule has an
`outlierDetection` block (Istio configures none otherwise). Within the block, unset fields take
Istio's / Envoy's defaults (istio cluster_traffic_policy.go applyOutlierDetection, Envoy
outlier_detection.proto): `consecutive5xxErrors` 5 (0 turns it off), `consecutiveGatewayErrors`
off unless set (> 0), `interval` 10 s, `baseEjectionTime` 30 s, `maxEjectionPercent` 10,
`minHealthPercent` 0 (panic mode off), Envoy's `max_ejection_time` 300 s.

Counting (Envoy DetectorHostMonitorImpl::putHttpResponseCode): each attempt's result is reported
per endpoint. A 5xx increments the consecutive-5xx counter; a 502/503/504 also increments the
consecutive-gateway counter, any other 5xx resets it; a non-5xx resets both. Local-origin errors
count as 5xx (Istio does not split them by default): a connect failure or a reset as 503, a
per-try timeout as 504. Circuit-breaker overflows are not reported (Envoy ignores them). When a
counter reaches its threshold the host is considered for ejection and the counter restarts.

Ejecting (Envoy ejectHost): allowed while the ejected share, counting this host, stays within
`maxEjectionPercent` of all endpoints, and always when none is ejected ("will eject at least one
host regardless of the value"). The host's ejection count grows by one; it stays out for
`baseEjectionTime x ejection count`, capped at max(`max_ejection_time`, base).

Sweeping (Envoy onIntervalTimer, every `interval`): ejected hosts whose time is up return; a host
that stayed in for a whole interval has its ejection count lowered by one (so a host that keeps
failing is ejected for longer and longer, a recovered one works its way back down). The data
path calls `sweep(now)` every `interval`; un-ejection happens only there, as in Envoy.

Choosing (`usable`): the endpoints not ejected; but when their share of all endpoints is below
`minHealthPercent`, outlier detection is set aside and every endpoint is used (Envoy's panic
threshold). With the default 0 % a service whose every endpoint is ejected has none usable: the
data path answers 503 `no healthy upstream` (UH).

Time is the injected monotonic `now` (seconds) passed to every call.
"""
from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mesh.model.route import OutlierDetection

__all__ = ["OutlierConfig", "ResultKind", "EjectionCause", "Ejection", "OutlierDetector"]


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierConfig:
    consecutive_5xx: int | None = 5
    """None: not enforced."""
    consecutive_gateway: int | None = None
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 10
    min_health_percent: int = 0

    @classmethod
    def from_model(cls, od: OutlierDetection | None) -> OutlierConfig | None:
        """None: the DestinationRule asks for no outlier detection."""
        if od is None:
            return None
        d = cls()
        c5 = d.consecutive_5xx if od.consecutive_5xx_errors is None else od.consecutive_5xx_errors
        return cls(consecutive_5xx=c5 or None,
                   consecutive_gateway=od.consecutive_gateway_errors or None,
                   interval=od.interval or d.interval,
                   base_ejection_time=od.base_ejection_time or d.base_ejection_time,
                   max_ejection_percent=(d.max_ejection_percent if od.max_ejection_percent is None
                                         else od.max_ejection_percent),
                   min_health_percent=(d.min_health_percent if od.min_health_percent is None
                                       else od.min_health_percent))


class ResultKind(enum.Enum):
    """One attempt's result against one endpoint, as outlier detection counts it."""

    RESPONSE = "response"
    CONNECT_FAILURE = "connect_failure"
    RESET = "reset"
    TIMEOUT = "timeout"


_LOCAL_ORIGIN_STATUS = {ResultKind.CONNECT_FAILURE: 503, ResultKind.RESET: 503, ResultKind.TIMEOUT: 504}


class EjectionCause(enum.Enum):
    CONSECUTIVE_5XX = "consecutive_5xx"
    CONSECUTIVE_GATEWAY_ERRORS = "consecutive_gateway_errors"


@dataclass(frozen=True, slots=True, kw_only=True)
class Ejection:
    """An endpoint was ejected (for the data path's log and metric)."""

    endpoint: str
    cause: EjectionCause
    until: float
    ejection_count: int


class _Host:
    __slots__ = ("c5xx", "cgw", "ejections", "ejected_at", "ejected_until", "last_ejected")

    def __init__(self) -> None:
        self.c5xx = 0
        self.cgw = 0
        self.ejections = 0
        self.ejected_at: float | None = None
        self.ejected_until = 0.0
        self.last_ejected: float | None = None


class OutlierDetector:
    """The outlier state of one destination (a service or subset): its endpoints' counters and
    ejections. Single-threaded (owned by the data path's loop)."""

    __slots__ = ("config", "_hosts", "_ejected")

    def __init__(self, config: OutlierConfig, endpoints: Iterable[str] = ()) -> None:
        self.config = config
        self._hosts: dict[str, _Host] = {}
        self._ejected = 0
        self.set_endpoints(endpoints)

    def set_endpoints(self, endpoints: Iterable[str]) -> None:
        """The destination's endpoints changed: new ones start clean, removed ones are forgotten,
        kept ones keep their state."""
        new = {e: self._hosts.get(e) or _Host() for e in endpoints}
        self._hosts = new
        self._ejected = sum(1 for h in new.values() if h.ejected_at is not None)

    @property
    def ejected_count(self) -> int:
        return self._ejected

    def is_ejected(self, endpoint: str) -> bool:
        h = self._hosts.get(endpoint)
        return h is not None and h.ejected_at is not None

    def record(self, endpoint: str, kind: ResultKind, now: float, status: int | None = None
               ) -> Ejection | None:
        """Count one attempt's result; returns the ejection it caused, if any."""
        h = self._hosts.get(endpoint)
        if h is None:
            return None  # an endpoint removed while the attempt was in flight
        code = status if kind is ResultKind.RESPONSE else _LOCAL_ORIGIN_STATUS[kind]
        if code is None:
            raise ValueError("a RESPONSE result needs its status")
        if code < 500:
            h.c5xx = h.cgw = 0
            return None
        c = self.config
        cause = None
        if code in (502, 503, 504):
            h.cgw += 1
            if c.consecutive_gateway is not None and h.cgw >= c.consecutive_gateway:
                h.cgw = 0
                cause = EjectionCause.CONSECUTIVE_GATEWAY_ERRORS
        else:
            h.cgw = 0
        h.c5xx += 1
        if c.consecutive_5xx is not None and h.c5xx >= c.consecutive_5xx:
            h.c5xx = 0
            cause = cause or EjectionCause.CONSECUTIVE_5XX
        if cause is None:
            return None
        return self._eject(endpoint, h, cause, now)

    def _eject(self, endpoint: str, h: _Host, cause: EjectionCause, now: float) -> Ejection | None:
        if h.ejected_at is not None:
            return None
        total = len(self._hosts)
        share = 100.0 * (self._ejected + 1) / total
        if share > self.config.max_ejection_percent and self._ejected > 0:
            return None
        c = self.config
        h.ejections += 1
        h.ejected_at = h.last_ejected = now
        h.ejected_until = now + min(c.base_ejection_time * h.ejections,
                                    max(c.max_ejection_time, c.base_ejection_time))
        self._ejected += 1
        return Ejection(endpoint=endpoint, cause=cause, until=h.ejected_until, ejection_count=h.ejections)

    def sweep(self, now: float) -> tuple[str, ...]:
        """The periodic pass (every `config.interval`): returns the endpoints brought back."""
        back = []
        for e, h in self._hosts.items():
            if h.ejected_at is not None:
                if now >= h.ejected_until:
                    h.ejected_at = None
                    h.c5xx = h.cgw = 0
                    self._ejected -= 1
                    back.append(e)
            elif h.ejections > 0 and (h.last_ejected is None
                                      or now - h.last_ejected >= self.config.interval):
                h.ejections -= 1
        return tuple(back)

    def next_unejection(self) -> float | None:
        """When the earliest ejection ends (the sweep that acts on it may come later)."""
        times = [h.ejected_until for h in self._hosts.values() if h.ejected_at is not None]
        return min(times) if times else None

    def usable(self, endpoints: Sequence[str]) -> tuple[str, ...]:
        """The endpoints the balancer may pick from: the healthy ones, or all of them in panic
        (healthy share below minHealthPercent)."""
        if not endpoints:
            return ()
        healthy = tuple(e for e in endpoints if not self.is_ejected(e))
        if 100.0 * len(healthy) / len(endpoints) < self.config.min_health_percent:
            return tuple(endpoints)
        return healthy

    def in_panic(self, endpoints: Sequence[str]) -> bool:
        if not endpoints:
            return False
        healthy = sum(1 for e in endpoints if not self.is_ejected(e))
        return 100.0 * healthy / len(endpoints) < self.config.min_health_percent
