"""Circuit breaking: DestinationRule connectionPool limits -> admit / queue / overflow decisions.

Theory of operation
-------------------
`CircuitLimits.from_model` resolves `trafficPolicy.connectionPool` with Istio's defaults
(cluster_traffic_policy.go): every threshold 2^32-1 when unset (so Envoy's own 1024 / 3 never
show), zero meaning unset for the integer fields ("`maxConnections: 0` does not block
traffic"), `connectTimeout` 10 s (meshConfig), `idleTimeout` 1 h, `maxRequestsPerConnection`
0 = unlimited (1 disables keep-alive).

The data path keeps the counters of one destination (all its endpoints, as Envoy's are per
cluster) and asks before acting, with a `PoolCounters` snapshot:

* `admit_request`: a new request (or retry) may go upstream unless `http2MaxRequests`
  (Envoy `max_requests`, HTTP/1.1 and HTTP/2 alike) requests are active upstream (pending ones
  are bounded by the pending limit instead).
* `plan_connection`: where the admitted request goes. A free (idle, or HTTP/2 with stream
  room) connection to the chosen endpoint -> USE. Otherwise a new connection if fewer than
  `maxConnections` are open -- or if the endpoint has none at all (Envoy: "will ensure that a
  host selected by cluster load balancing has at least one connection allocated") -> CONNECT,
  the request pending until it is up. Otherwise it waits for a connection (QUEUE) while fewer
  than `http1MaxPendingRequests` are pending (Envoy `max_pending_requests`, both protocols).
  Otherwise OVERFLOW.
* `connection_reusable`: a connection that served `maxRequestsPerConnection` requests is closed
  after its response; `idle_expired`: an idle connection is closed after `idleTimeout`.

Every overflow is answered by the data path the same way (Envoy router onUpstreamReset): 503,
body `upstream connect error or disconnect/reset before headers. reset reason: overflow`,
`x-envoy-overloaded: true`, flag UO -- never retried, never reported to outlier detection.
The `OverflowReason` says which limit (its value is the metric label).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from mesh.model.route import ConnectionPool

__all__ = ["UNLIMITED", "CircuitLimits", "PoolCounters", "OverflowReason", "Admission",
           "ConnectionAction", "ConnectionPlan", "admit_request", "plan_connection",
           "connection_reusable", "idle_expired", "OVERFLOW_STATUS", "OVERFLOW_BODY", "OVERFLOW_FLAG",
           "OVERFLOW_HEADERS"]

UNLIMITED = 2 ** 32 - 1
OVERFLOW_STATUS = 503
OVERFLOW_BODY = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"
OVERFLOW_FLAG = "UO"
OVERFLOW_HEADERS = (("x-envoy-overloaded", "true"),)


@dataclass(frozen=True, slots=True, kw_only=True)
class CircuitLimits:
    max_connections: int = UNLIMITED
    max_pending_requests: int = UNLIMITED
    max_requests: int = UNLIMITED
    max_retries: int = UNLIMITED
    """Concurrent retries (enforced by budget.RetryBudget)."""
    max_requests_per_connection: int = 0
    """0: unlimited."""
    connect_timeout: float = 10.0
    idle_timeout: float = 3600.0

    @classmethod
    def from_model(cls, pool: ConnectionPool | None) -> CircuitLimits:
        d = cls()
        tcp, http = (pool.tcp, pool.http) if pool is not None else (None, None)

        def n(v: int | None, default: int) -> int:
            return v if v else default  # Istio: zero means unset
        return cls(
            max_connections=n(tcp.max_connections if tcp else None, d.max_connections),
            max_pending_requests=n(http.http1_max_pending_requests if http else None, d.max_pending_requests),
            max_requests=n(http.http2_max_requests if http else None, d.max_requests),
            max_retries=n(http.max_retries if http else None, d.max_retries),
            max_requests_per_connection=(http.max_requests_per_connection or 0) if http else 0,
            connect_timeout=(tcp.connect_timeout if tcp and tcp.connect_timeout else d.connect_timeout),
            # http.idleTimeout wins over tcp.idleTimeout for HTTP connections (Istio sets both on
            # common_http_protocol_options, http last).
            idle_timeout=(http.idle_timeout if http and http.idle_timeout else
                          tcp.idle_timeout if tcp and tcp.idle_timeout else d.idle_timeout))


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolCounters:
    """What the data path counts for one destination, at the moment of the decision."""

    open_connections: int = 0
    """Connections open or opening, all endpoints."""
    pending_requests: int = 0
    """Admitted requests waiting for a connection."""
    active_requests: int = 0
    """Requests in flight upstream (pending ones excluded)."""


class OverflowReason(enum.Enum):
    MAX_REQUESTS = "max_requests"
    MAX_PENDING_REQUESTS = "max_pending_requests"


@dataclass(frozen=True, slots=True, kw_only=True)
class Admission:
    admitted: bool
    overflow: OverflowReason | None = None


_ADMIT = Admission(admitted=True)


def admit_request(limits: CircuitLimits, counters: PoolCounters) -> Admission:
    """May one more request (an original or a retry) go to this destination?"""
    if counters.active_requests >= limits.max_requests:
        return Admission(admitted=False, overflow=OverflowReason.MAX_REQUESTS)
    return _ADMIT


class ConnectionAction(enum.Enum):
    USE = "use"
    """Send on an existing connection with room."""
    CONNECT = "connect"
    """Open a new connection; the request is pending until it is up."""
    QUEUE = "queue"
    """Wait (pending) for a connection to free up."""
    OVERFLOW = "overflow"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionPlan:
    action: ConnectionAction
    overflow: OverflowReason | None = None
    beyond_max_connections: bool = False
    """CONNECT past maxConnections because the endpoint had none (Envoy's upstream_cx_overflow
    is still counted)."""


def plan_connection(limits: CircuitLimits, counters: PoolCounters, *, free_connection: bool,
                    endpoint_connections: int) -> ConnectionPlan:
    """Where an admitted request for the chosen endpoint goes. `free_connection`: the endpoint
    has an open connection that can take the request now; `endpoint_connections`: connections
    open or opening to that endpoint."""
    if free_connection:
        return ConnectionPlan(action=ConnectionAction.USE)
    if counters.open_connections < limits.max_connections:
        return ConnectionPlan(action=ConnectionAction.CONNECT)
    if endpoint_connections == 0:
        return ConnectionPlan(action=ConnectionAction.CONNECT, beyond_max_connections=True)
    if counters.pending_requests < limits.max_pending_requests:
        return ConnectionPlan(action=ConnectionAction.QUEUE)
    return ConnectionPlan(action=ConnectionAction.OVERFLOW, overflow=OverflowReason.MAX_PENDING_REQUESTS)


def connection_reusable(limits: CircuitLimits, requests_served: int) -> bool:
    """May a connection that has carried `requests_served` requests take another?"""
    return limits.max_requests_per_connection == 0 or requests_served < limits.max_requests_per_connection


def idle_expired(limits: CircuitLimits, idle_since: float, now: float) -> bool:
    """Should a connection idle since `idle_since` (monotonic seconds) be closed now?"""
    return now - idle_since >= limits.idle_timeout
