"""Per-destination endpoint state: one balancer, outlier detector and circuit counters per Envoy cluster.

Theory of operation
-------------------
A cluster is what Envoy would call one: the endpoints of one Service port, optionally narrowed
to one DestinationRule subset, keyed `outbound|<port>|<subset>|<service fqdn>` (a pod-addressed
request: `outbound|<port>||<pod ip>`, one endpoint, no DestinationRule). `Clusters.cluster_for`
finds or builds it. Its configuration comes from the DestinationRule naming the Service
(`traffic_policy`: the top-level trafficPolicy with the subset's merged over it field by field,
as Istio's MergeTrafficPolicy does) converted once into a `ClusterConfig`: a `BalancerConfig`
(resilience/balancer.py), an `OutlierConfig` or none (resilience/outlier.py) and
`CircuitLimits` (resilience/circuit.py).

Freshness: the cluster remembers the ProxyState version and the Service object it was built
from; on a request after either changed it re-reads the Service's current endpoints (so a
request on a long-lived downstream connection never uses the endpoint list of the moment that
connection opened) and its DestinationRule, and updates in place: endpoints that stay keep their
EWMA, request counts, outlier counters and ejections; new ones start fresh (in slow start when
warmup is set). Nothing is rebuilt while the state does not change.

Feedback: every endpoint `choose` returns must be `report`ed exactly once with the attempt's
`AttemptOutcome` (resilience/retry.py; None when the attempt ended without a verdict on the
endpoint, e.g. the client went away) and its RTT (seconds to the first response byte, or None).
The report drives the balancer (pending count, EWMA) and outlier detection; an OVERFLOW outcome
is not reported to outlier detection (Envoy ignores overflow resets). `sweep` is the outlier
detector's periodic pass, which the data path runs every cluster's `interval`.

This module decides and counts; connections, queues and timers live in upstream.py.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from http.cookies import SimpleCookie

from mesh.model import ServiceInfo, Workload
from mesh.model.route import ConsistentHash, DestinationRule, TrafficPolicy
from mesh.state import ProxyState

from .plan import Forward, destination_rule_for, service_fqdn
from .resilience import (AttemptOutcome, Balancer, BalancerConfig, CircuitLimits, Ejection, OutcomeKind,
                         OutlierConfig, OutlierDetector, ResultKind, WeightedEndpoint)

__all__ = ["HashRequest", "EndpointTarget", "ClusterConfig", "ClusterStats", "Cluster", "Clusters", "cluster_key",
           "traffic_policy", "endpoint_targets", "request_hash_key"]


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointTarget:
    """One pod port a request can go to, in the cluster that chose it."""

    workload: Workload
    port: int
    cluster: str = ""
    """The cluster key (`outbound|<port>|<subset>|<fqdn>`) whose state the attempt reports to."""
    address: str = field(init=False, compare=False, repr=False)
    """`ip:port`, made once: it is read several times per request (formatting, or even hashing
    an IPv4Address for a cache, each time was ~2% of a request)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", f"{self.workload.ip}:{self.port}")


@dataclass(frozen=True)
class HashRequest:
    """What consistent hashing may read from a request: its headers (lowercase names), query and
    source IP. Cookies and query parameters are parsed only when a hash policy asks for them."""

    headers: tuple[tuple[bytes, bytes], ...] = ()
    query: bytes = b""
    """The raw query string (after `?`)."""
    source_ip: str | None = None

    def header(self, name: str) -> str | None:
        n = name.lower().encode("latin-1")
        return next((v.decode("latin-1") for k, v in self.headers if k == n), None)

    @cached_property
    def cookies(self) -> Mapping[str, str]:
        out: dict[str, str] = {}
        for k, v in self.headers:
            if k == b"cookie":
                c = SimpleCookie()
                try:
                    c.load(v.decode("latin-1"))
                except Exception:   # a malformed cookie header has no usable hash key
                    continue
                for name, morsel in c.items():
                    out.setdefault(name, morsel.value)
        return out

    @cached_property
    def query_params(self) -> Mapping[str, str]:
        from urllib.parse import parse_qsl
        out: dict[str, str] = {}
        for k, v in parse_qsl(self.query.decode("latin-1"), keep_blank_values=True):
            out.setdefault(k, v)
        return out


NO_REQUEST = HashRequest()


def request_hash_key(policy: ConsistentHash, req: HashRequest) -> bytes | None:
    """The request's consistent-hash key (balancer.hash_key's rules), or None when it lacks it."""
    if policy.http_header_name is not None:
        v = req.header(policy.http_header_name)
    elif policy.http_cookie is not None:
        v = req.cookies.get(policy.http_cookie.name)
    elif policy.http_query_parameter_name is not None:
        v = req.query_params.get(policy.http_query_parameter_name)
    elif policy.use_source_ip:
        v = req.source_ip
    else:
        v = None
    return None if v is None else v.encode("latin-1", "replace")


_KEYS: dict[int, tuple[Forward, str]] = {}


def cluster_key(fwd: Forward) -> str:
    """`outbound|<port>|<subset>|<fqdn>` (a pod: its IP for the host). Memoized by the plan's
    identity, as plan._default_forward memoizes the plan itself (the entry keeps `fwd` alive,
    so its id is not reused): the same key for every request of an unrouted service."""
    hit = _KEYS.get(id(fwd))
    if hit is not None and hit[0] is fwd:
        return hit[1]
    key = _cluster_key(fwd)
    if len(_KEYS) >= 4096:
        _KEYS.clear()
    _KEYS[id(fwd)] = (fwd, key)
    return key


def _cluster_key(fwd: Forward) -> str:
    if fwd.workload is not None:
        return f"outbound|{fwd.port}||{fwd.workload.ip}"
    assert fwd.service is not None
    return f"outbound|{fwd.port}|{fwd.subset}|{service_fqdn(fwd.service)}"


def traffic_policy(drs: Sequence[DestinationRule], svc: ServiceInfo, subset: str) -> TrafficPolicy | None:
    """The traffic policy of `svc` (subset `subset`, "" for none): the DestinationRule's, with the
    subset's fields replacing the top-level ones they set (Istio MergeTrafficPolicy)."""
    dr = destination_rule_for(drs, svc)
    if dr is None:
        return None
    top = dr.traffic_policy
    sub = next((s.traffic_policy for s in dr.subsets if s.name == subset), None) if subset else None
    if sub is None:
        return top
    if top is None:
        return sub
    lb_set = sub.load_balancer is not None or sub.consistent_hash is not None or sub.warmup is not None
    return TrafficPolicy(
        connection_pool=sub.connection_pool if sub.connection_pool is not None else top.connection_pool,
        outlier_detection=sub.outlier_detection if sub.outlier_detection is not None else top.outlier_detection,
        load_balancer=sub.load_balancer if lb_set else top.load_balancer,
        consistent_hash=sub.consistent_hash if lb_set else top.consistent_hash,
        warmup=sub.warmup if lb_set else top.warmup,
        tls=sub.tls if sub.tls is not None else top.tls)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterConfig:
    balancer: BalancerConfig = BalancerConfig()
    outlier: OutlierConfig | None = None
    limits: CircuitLimits = CircuitLimits()

    @classmethod
    def from_policy(cls, tp: TrafficPolicy | None) -> ClusterConfig:
        if tp is None:
            return _DEFAULT_CONFIG
        return cls(balancer=BalancerConfig.from_model(tp), outlier=OutlierConfig.from_model(tp.outlier_detection),
                   limits=CircuitLimits.from_model(tp.connection_pool))


_DEFAULT_CONFIG = ClusterConfig()


def endpoint_targets(state: ProxyState, svc: ServiceInfo | None, fwd: Forward, cluster: str) -> list[EndpointTarget]:
    """The endpoints of `fwd` (the pod it dialled, or `svc`'s endpoints carrying the subset's labels)."""
    if fwd.workload is not None:
        return [EndpointTarget(workload=fwd.workload, port=fwd.target_port, cluster=cluster)]
    assert svc is not None
    out = []
    want = fwd.subset_labels
    for ep in svc.endpoints:
        w = state.workload(ep.workload_uid)
        if w is None:
            continue
        if want and any(w.labels.get(k) != v for k, v in want.items()):
            continue
        out.append(EndpointTarget(workload=w, port=fwd.target_port, cluster=cluster))
    return out


@dataclass(slots=True)
class ClusterStats:
    """Envoy's cluster statistics that this data path keeps (names as Envoy's, see `STAT_HELP`)."""

    upstream_rq_total: int = 0
    upstream_rq_pending_total: int = 0
    upstream_rq_pending_overflow: int = 0
    upstream_rq_timeout: int = 0
    upstream_rq_cancelled: int = 0
    upstream_cx_total: int = 0
    upstream_cx_connect_fail: int = 0
    upstream_cx_connect_timeout: int = 0
    upstream_cx_overflow: int = 0
    upstream_cx_max_requests: int = 0
    upstream_cx_idle_timeout: int = 0
    outlier_detection_ejections_enforced_total: int = 0
    outlier_detection_ejections_enforced_consecutive_5xx: int = 0
    outlier_detection_ejections_enforced_consecutive_gateway_failure: int = 0
    lb_healthy_panic: int = 0
    upstream_rq_retry: int = 0
    upstream_rq_retry_success: int = 0
    upstream_rq_retry_overflow: int = 0
    upstream_rq_retry_limit_exceeded: int = 0
    upstream_rq_by_class: dict[str, int] = field(default_factory=dict)
    """`2xx`..`5xx`: upstream_rq_2xx etc."""


_CAUSE_STAT = {"consecutive_5xx": "outlier_detection_ejections_enforced_consecutive_5xx",
               "consecutive_gateway_errors": "outlier_detection_ejections_enforced_consecutive_gateway_failure"}

_RESULT_KIND = {OutcomeKind.CONNECT_FAILURE: ResultKind.CONNECT_FAILURE, OutcomeKind.RESET: ResultKind.RESET,
                OutcomeKind.REFUSED_STREAM: ResultKind.RESET, OutcomeKind.PER_TRY_TIMEOUT: ResultKind.TIMEOUT}


class Cluster:
    """One cluster's loop-owned state (see the module docstring): decisions and counters, no I/O."""

    def __init__(self, key: str, fwd: Forward, config: ClusterConfig, policy: TrafficPolicy | None,
                 targets: list[EndpointTarget], *, now: float, version: int, service: ServiceInfo | None) -> None:
        self.key = key
        self.service_uid = fwd.service.uid if fwd.service is not None else None
        self.port = fwd.port
        """The Service port the cluster is for (part of its key): its declared protocol picks HTTP/2."""
        self.config = config
        self.policy = policy
        self.version = version
        self.service = service
        self.http2: bool | None = None
        """Whether the service port declares HTTP/2 (upstream.wants_http2's answer, kept: the
        service is fixed for the cluster's life)."""
        self.targets = {t.address: t for t in targets}
        self.addresses: tuple[str, ...] = tuple(self.targets)
        self.balancer = Balancer(config.balancer, [WeightedEndpoint(address=a) for a in self.addresses], now=now)
        self.outlier = OutlierDetector(config.outlier, self.addresses) if config.outlier is not None else None
        self.next_sweep = now + config.outlier.interval if config.outlier is not None else None
        self.stats = ClusterStats()
        self.inflight = 0
        """Chosen and not yet reported."""
        # Circuit counters (kept by upstream.py): the PoolCounters snapshot's parts.
        self.open_connections = 0
        self.pending_requests = 0
        self.active_requests = 0
        self.endpoint_connections: dict[str, int] = {}

    @property
    def limits(self) -> CircuitLimits:
        return self.config.limits

    def update(self, fwd: Forward, config: ClusterConfig, policy: TrafficPolicy | None,
               targets: list[EndpointTarget], *, now: float, version: int, service: ServiceInfo | None) -> None:
        """The state changed: take the current endpoints and configuration, keeping what stays."""
        self.version, self.service, self.policy = version, service, policy
        new = {t.address: t for t in targets}
        addresses = tuple(new)
        if config.balancer != self.config.balancer:
            self.balancer = Balancer(config.balancer, [WeightedEndpoint(address=a) for a in addresses], now=now)
        elif addresses != self.addresses:
            self.balancer.set_endpoints([WeightedEndpoint(address=a) for a in addresses], now)
        if config.outlier is None:
            self.outlier, self.next_sweep = None, None
        elif self.outlier is None:
            self.outlier = OutlierDetector(config.outlier, addresses)
            self.next_sweep = now + config.outlier.interval
        else:
            if config.outlier != self.outlier.config:
                self.outlier.config = config.outlier   # ejections in force stay
                self.next_sweep = min(self.next_sweep or now, now + config.outlier.interval)
            if addresses != self.addresses:
                self.outlier.set_endpoints(addresses)
        self.config = config
        self.targets, self.addresses = new, addresses

    # -- choosing and feedback ----------------------------------------------------------------

    def usable(self) -> Sequence[str] | None:
        """The endpoints outlier detection leaves (None: all)."""
        od = self.outlier
        if od is None or od.ejected_count == 0:
            return None
        if od.in_panic(self.addresses):
            self.stats.lb_healthy_panic += 1
        return od.usable(self.addresses)

    def choose(self, now: float, rng: random.Random, request: HashRequest,
               avoid: frozenset[str]) -> EndpointTarget | None:
        if not self.addresses:
            return None
        key = None
        bc = self.config.balancer
        if bc.hash is not None:
            key = request_hash_key(bc.hash, request)
        usable = self.usable()
        if usable is not None and not usable:
            return None
        ep = self.balancer.pick(now, rng, usable=usable, avoid=avoid, key=key)
        if ep is None:
            return None
        self.balancer.on_start(ep.address)
        self.inflight += 1
        return self.targets[ep.address]

    def report(self, target: EndpointTarget, outcome: AttemptOutcome | None, rtt: float | None,
               now: float) -> Ejection | None:
        """Count one attempt's end; returns the ejection it caused, if any."""
        self.inflight = max(0, self.inflight - 1)
        addr = target.address
        self.balancer.on_end(addr, now, rtt if outcome is not None and outcome.kind is OutcomeKind.RESPONSE else None)
        if outcome is None or outcome.kind is OutcomeKind.OVERFLOW:
            return None
        self.stats.upstream_rq_total += 1
        if outcome.kind is OutcomeKind.RESPONSE and outcome.status is not None:
            cls = f"{outcome.status // 100}xx"
            self.stats.upstream_rq_by_class[cls] = self.stats.upstream_rq_by_class.get(cls, 0) + 1
        elif outcome.kind is OutcomeKind.PER_TRY_TIMEOUT:
            self.stats.upstream_rq_timeout += 1
        od = self.outlier
        if od is None:
            return None
        if outcome.kind is OutcomeKind.RESPONSE:
            ej = od.record(addr, ResultKind.RESPONSE, now, outcome.status or 0)
        else:
            ej = od.record(addr, _RESULT_KIND[outcome.kind], now)
        if ej is not None:
            self.stats.outlier_detection_ejections_enforced_total += 1
            name = _CAUSE_STAT[ej.cause.value]
            setattr(self.stats, name, getattr(self.stats, name) + 1)
        return ej

    def sweep(self, now: float) -> tuple[str, ...]:
        """Outlier detection's periodic pass, if due: the endpoints brought back."""
        od = self.outlier
        if od is None or self.next_sweep is None or now < self.next_sweep:
            return ()
        nxt = self.next_sweep + od.config.interval   # on the interval's grid, as a periodic timer
        self.next_sweep = nxt if nxt > now else now + od.config.interval
        return od.sweep(now)

    @property
    def ejected(self) -> int:
        return self.outlier.ejected_count if self.outlier is not None else 0


class Clusters:
    """Every cluster the waypoint has sent requests to, keyed by cluster name. Loop-owned."""

    def __init__(self, state: ProxyState) -> None:
        self.state = state
        self._clusters: dict[str, Cluster] = {}

    def get(self, key: str) -> Cluster | None:
        return self._clusters.get(key)

    def __iter__(self) -> Iterator[Cluster]:
        return iter(list(self._clusters.values()))

    def __len__(self) -> int:
        return len(self._clusters)

    def _current_service(self, fwd: Forward) -> ServiceInfo | None:
        if fwd.service is None:
            return None
        # The plan may hold the Service as it was when its downstream connection opened.
        return self.state.service(fwd.service.uid) or fwd.service

    def cluster_for(self, fwd: Forward, now: float) -> Cluster:
        key = cluster_key(fwd)
        c = self._clusters.get(key)
        st = self.state
        svc = self._current_service(fwd)
        if c is not None and c.version == st.version and c.service is svc:
            return c
        policy = traffic_policy(st.destination_rules(), svc, fwd.subset) if svc is not None else None
        config = c.config if c is not None and c.policy == policy else ClusterConfig.from_policy(policy)
        targets = endpoint_targets(st, svc, fwd, key)
        if c is None:
            c = self._clusters[key] = Cluster(key, fwd, config, policy, targets, now=now, version=st.version,
                                              service=svc)
        else:
            c.update(fwd, config, policy, targets, now=now, version=st.version, service=svc)
        return c

    def sweep(self, now: float) -> list[tuple[Cluster, tuple[str, ...]]]:
        """Run due outlier sweeps; forget clusters whose Service is gone and that hold nothing."""
        out = []
        for key, c in list(self._clusters.items()):
            back = c.sweep(now)
            if back:
                out.append((c, back))
            gone = c.service_uid is not None and self.state.service(c.service_uid) is None
            if gone and c.inflight == 0 and c.open_connections == 0 and c.pending_requests == 0:
                del self._clusters[key]
        return out

    def next_sweep(self) -> float | None:
        times = [c.next_sweep for c in self._clusters.values() if c.next_sweep is not None]
        return min(times) if times else None


# -- exposition -------------------------------------------------------------------------------

STAT_HELP: dict[str, tuple[str, str]] = {
    "upstream_rq_total": ("counter", "Requests sent upstream (attempts that reached an endpoint)."),
    "upstream_rq_active": ("gauge", "Requests in flight upstream."),
    "upstream_rq_pending_total": ("counter", "Requests that waited for a connection."),
    "upstream_rq_pending_active": ("gauge", "Requests waiting for a connection."),
    "upstream_rq_pending_overflow": ("counter", "Requests refused by the connection pool or requests circuit "
                                                "breaker (503 UO)."),
    "upstream_rq_timeout": ("counter", "Attempts that timed out waiting for a response."),
    "upstream_rq_cancelled": ("counter", "Requests withdrawn before they got a connection (the client left)."),
    "upstream_cx_total": ("counter", "Upstream connections opened."),
    "upstream_cx_active": ("gauge", "Upstream connections open or opening."),
    "upstream_cx_connect_fail": ("counter", "Upstream connection attempts that failed."),
    "upstream_cx_connect_timeout": ("counter", "Upstream connection attempts that timed out (connectTimeout)."),
    "upstream_cx_overflow": ("counter", "Times the maxConnections circuit breaker overflowed."),
    "upstream_cx_max_requests": ("counter", "Connections closed after maxRequestsPerConnection requests."),
    "upstream_cx_idle_timeout": ("counter", "Connections closed after idleTimeout."),
    "outlier_detection_ejections_active": ("gauge", "Endpoints ejected now."),
    "outlier_detection_ejections_enforced_total": ("counter", "Ejections enforced."),
    "outlier_detection_ejections_enforced_consecutive_5xx": ("counter", "Ejections for consecutive 5xx."),
    "outlier_detection_ejections_enforced_consecutive_gateway_failure": (
        "counter", "Ejections for consecutive gateway errors."),
    "lb_healthy_panic": ("counter", "Picks made in panic (healthy share below minHealthPercent)."),
    "upstream_rq_retry": ("counter", "Retries sent (waypoint/attempts.py)."),
    "upstream_rq_retry_success": ("counter", "Retried requests whose last attempt needed no further retry."),
    "upstream_rq_retry_overflow": ("counter", "Retries not sent: the retry budget or maxRetries said no."),
    "upstream_rq_retry_limit_exceeded": ("counter", "Retriable outcomes not retried: attempts ran out."),
    "membership_total": ("gauge", "Endpoints of the cluster."),
    "membership_healthy": ("gauge", "Endpoints not ejected."),
}


def _value(c: Cluster, name: str) -> int:
    if name == "upstream_rq_active":
        return c.active_requests
    if name == "upstream_rq_pending_active":
        return c.pending_requests
    if name == "upstream_cx_active":
        return c.open_connections
    if name == "outlier_detection_ejections_active":
        return c.ejected
    if name == "membership_total":
        return len(c.addresses)
    if name == "membership_healthy":
        return len(c.addresses) - c.ejected
    return getattr(c.stats, name)


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def cluster_exposition(clusters: Iterable[Cluster]) -> bytes:
    """Envoy's cluster stats as Istio's Prometheus endpoint names them
    (`envoy_cluster_<stat>{cluster_name="..."}`), plus upstream_rq_<class>xx."""
    cs = sorted(clusters, key=lambda c: c.key)
    out = []
    for name, (kind, doc) in STAT_HELP.items():
        full = f"envoy_cluster_{name}"
        out.append(f"# HELP {full} {doc}\n# TYPE {full} {kind}\n")
        out.extend(f'{full}{{cluster_name="{_label(c.key)}"}} {_value(c, name)}\n' for c in cs)
    classes = sorted({k for c in cs for k in c.stats.upstream_rq_by_class})
    for k in classes:
        full = f"envoy_cluster_upstream_rq_{k}"
        out.append(f"# HELP {full} Upstream responses with a {k} status.\n# TYPE {full} counter\n")
        out.extend(f'{full}{{cluster_name="{_label(c.key)}"}} {c.stats.upstream_rq_by_class.get(k, 0)}\n'
                   for c in cs)
    return "".join(out).encode()
