"""L7 routing model: Gateway API HTTPRoute (as a GAMMA mesh route), Istio VirtualService and
DestinationRule, typed.

Converted from YAML once (mesh/config/route.py); used by waypoints through the pure decision
functions in waypoint/routing. Durations are seconds (float): None means "not set" (the
implementation's default applies) and 0.0 means "disabled", as Gateway API's `0s` does.
Header names are kept lowercase wherever HTTP compares them case-insensitively.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from .base import FrozenMap
from .resources import Resource

__all__ = [
    # Gateway API
    "MAX_WEIGHT", "PathMatchType", "ValueMatchType", "PathMatch", "HeaderMatch", "QueryParamMatch",
    "HTTPRouteMatch", "ParentRef", "BackendRef", "HeaderModifier", "RequestMirror",
    "PathModifierType", "PathModifier", "RequestRedirect", "URLRewrite", "HTTPFilters",
    "HTTPRouteTimeouts", "HTTPRouteRetry", "HTTPRouteRule", "HTTPRoute",
    # Istio
    "StringMatchType", "IstioStringMatch", "VSMatch", "VSDestination", "VSRouteDestination",
    "VSRetries", "VSFaultDelay", "VSFaultAbort", "VSFault", "VSHeaders", "VSRewrite",
    "VSHTTPRoute", "VirtualService", "TCPSettings", "HTTPSettings", "ConnectionPool",
    "OutlierDetection", "LoadBalancer", "TrafficPolicy", "Subset", "DestinationRule",
]

MAX_WEIGHT = 1_000_000
"""Largest backendRef weight Gateway API accepts."""

# --- Gateway API HTTPRoute (gateway.networking.k8s.io) --------------------------------------


class PathMatchType(enum.Enum):
    EXACT = "Exact"
    PREFIX = "PathPrefix"
    """Element-wise: `/foo` matches `/foo`, `/foo/` and `/foo/bar`, not `/foobar`."""
    REGEX = "RegularExpression"
    """Python `re`, matched against the whole path (as Envoy's safe_regex full match)."""


class ValueMatchType(enum.Enum):
    EXACT = "Exact"
    REGEX = "RegularExpression"


@dataclass(frozen=True, slots=True, kw_only=True)
class PathMatch:
    type: PathMatchType = PathMatchType.PREFIX
    value: str = "/"


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderMatch:
    name: str
    """Lowercase (header names compare case-insensitively)."""
    value: str
    type: ValueMatchType = ValueMatchType.EXACT


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryParamMatch:
    name: str
    """Case-sensitive, as Gateway API specifies."""
    value: str
    type: ValueMatchType = ValueMatchType.EXACT


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPRouteMatch:
    """All set conditions must hold (AND); a rule's matches are ORed."""

    path: PathMatch = PathMatch()
    headers: tuple[HeaderMatch, ...] = ()
    query_params: tuple[QueryParamMatch, ...] = ()
    method: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ParentRef:
    """What the route attaches to: a Service (group "", GAMMA) or a Gateway (the waypoint)."""

    group: str = "gateway.networking.k8s.io"
    kind: str = "Gateway"
    namespace: str
    """Defaulted to the route's namespace at load time."""
    name: str
    port: int | None = None
    section_name: str | None = None

    @property
    def is_service(self) -> bool:
        return self.group == "" and self.kind == "Service"


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderModifier:
    """RequestHeaderModifier / ResponseHeaderModifier (and Istio's `headers` operations)."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


class PathModifierType(enum.Enum):
    REPLACE_FULL_PATH = "ReplaceFullPath"
    REPLACE_PREFIX_MATCH = "ReplacePrefixMatch"


@dataclass(frozen=True, slots=True, kw_only=True)
class PathModifier:
    type: PathModifierType
    value: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestRedirect:
    scheme: str | None = None
    hostname: str | None = None
    path: PathModifier | None = None
    port: int | None = None
    status_code: int = 302


@dataclass(frozen=True, slots=True, kw_only=True)
class URLRewrite:
    hostname: str | None = None
    path: PathModifier | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestMirror:
    backend: BackendRef
    percent: float = 100.0
    """0..100; `fraction` is converted to a percentage at load time."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPFilters:
    """A rule's (or backendRef's) `filters`, by type: each at most once, mirrors repeatable."""

    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None
    mirrors: tuple[RequestMirror, ...] = ()
    redirect: RequestRedirect | None = None
    rewrite: URLRewrite | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendRef:
    group: str = ""
    kind: str = "Service"
    name: str
    namespace: str
    """Defaulted to the route's namespace at load time."""
    port: int | None = None
    weight: int = 1
    """0..MAX_WEIGHT; share = weight / sum of weights; 0 = no traffic."""
    filters: HTTPFilters = HTTPFilters()


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPRouteTimeouts:
    request: float | None = None
    """Whole client transaction, retries included (seconds; 0.0 = disabled)."""
    backend_request: float | None = None
    """Each upstream attempt (seconds; 0.0 = disabled); at most `request`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPRouteRetry:
    codes: tuple[int, ...] = ()
    """HTTP statuses (400-599) that trigger a retry."""
    attempts: int | None = None
    backoff: float | None = None
    """Minimum backoff between attempts (seconds)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPRouteRule:
    name: str | None = None
    matches: tuple[HTTPRouteMatch, ...] = (HTTPRouteMatch(),)
    """Never empty: no `matches` in YAML means one PathPrefix "/" match."""
    filters: HTTPFilters = HTTPFilters()
    backend_refs: tuple[BackendRef, ...] = ()
    timeouts: HTTPRouteTimeouts | None = None
    retry: HTTPRouteRetry | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPRoute(Resource):
    kind: ClassVar[str] = "HTTPRoute"
    parent_refs: tuple[ParentRef, ...] = ()
    hostnames: tuple[str, ...] = ()
    rules: tuple[HTTPRouteRule, ...] = (HTTPRouteRule(),)
    """Never empty: no `rules` means one rule matching PathPrefix "/" (Gateway API default)."""


# --- Istio VirtualService / DestinationRule (networking.istio.io) ------------------------


class StringMatchType(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    """Plain string prefix (not element-wise), as Istio's."""
    REGEX = "regex"
    """Python `re`, full match (Envoy RE2 semantics for the common subset)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class IstioStringMatch:
    type: StringMatchType
    value: str


@dataclass(frozen=True, slots=True, kw_only=True)
class VSMatch:
    """`http[].match[]`: every set field must hold; a route's matches are ORed."""

    name: str | None = None
    uri: IstioStringMatch | None = None
    headers: tuple[tuple[str, IstioStringMatch], ...] = ()
    """(lowercase name, match)."""
    query_params: tuple[tuple[str, IstioStringMatch], ...] = ()
    method: IstioStringMatch | None = None
    authority: IstioStringMatch | None = None
    port: int | None = None
    ignore_uri_case: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class VSDestination:
    host: str
    subset: str | None = None
    port: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class VSRouteDestination:
    destination: VSDestination
    weight: int = 100
    """Relative share, like a backendRef weight; 0 = no traffic (100 when there is only one)."""
    headers: VSHeaders | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class VSRetries:
    attempts: int = 0
    per_try_timeout: float | None = None
    retry_on: tuple[str, ...] = ()
    """Envoy retry conditions (`5xx`, `gateway-error`, `connect-failure`, ...) and status codes."""


@dataclass(frozen=True, slots=True, kw_only=True)
class VSFaultDelay:
    fixed_delay: float
    percentage: float = 100.0


@dataclass(frozen=True, slots=True, kw_only=True)
class VSFaultAbort:
    http_status: int
    percentage: float = 100.0


@dataclass(frozen=True, slots=True, kw_only=True)
class VSFault:
    delay: VSFaultDelay | None = None
    abort: VSFaultAbort | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class VSHeaders:
    request: HeaderModifier | None = None
    response: HeaderModifier | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class VSRewrite:
    uri: str | None = None
    authority: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class VSHTTPRoute:
    name: str | None = None
    match: tuple[VSMatch, ...] = ()
    """Empty: matches every request."""
    route: tuple[VSRouteDestination, ...] = ()
    timeout: float | None = None
    retries: VSRetries | None = None
    fault: VSFault | None = None
    mirror: VSDestination | None = None
    mirror_percentage: float | None = None
    """0..100; None with a mirror means 100."""
    headers: VSHeaders | None = None
    rewrite: VSRewrite | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class VirtualService(Resource):
    kind: ClassVar[str] = "VirtualService"
    hosts: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    http: tuple[VSHTTPRoute, ...] = ()
    """In order: the first route that matches wins."""
    export_to: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TCPSettings:
    max_connections: int | None = None
    connect_timeout: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPSettings:
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionPool:
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierDetection:
    consecutive_5xx_errors: int | None = None
    consecutive_gateway_errors: int | None = None
    interval: float | None = None
    base_ejection_time: float | None = None
    max_ejection_percent: int | None = None
    min_health_percent: int | None = None


class LoadBalancer(enum.Enum):
    UNSPECIFIED = "UNSPECIFIED"
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"
    RANDOM = "RANDOM"
    PASSTHROUGH = "PASSTHROUGH"


@dataclass(frozen=True, slots=True, kw_only=True)
class TrafficPolicy:
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    load_balancer: LoadBalancer | None = None
    """`loadBalancer.simple`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Subset:
    name: str
    labels: FrozenMap = FrozenMap()
    traffic_policy: TrafficPolicy | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DestinationRule(Resource):
    kind: ClassVar[str] = "DestinationRule"
    host: str
    subsets: tuple[Subset, ...] = ()
    traffic_policy: TrafficPolicy | None = None
    export_to: tuple[str, ...] = ()
