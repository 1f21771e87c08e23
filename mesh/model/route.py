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
    "VSRetries", "VSMirror", "VSFaultDelay", "VSFaultAbort", "VSFault", "VSHeaders", "VSRewrite",
    "VSRedirect", "VSDirectResponse", "VSHTTPRoute", "VirtualService", "TCPSettings", "HTTPSettings", "ConnectionPool",
    "OutlierDetection", "LoadBalancer", "TrafficPolicy", "Subset", "DestinationRule", "MESH_GATEWAY",
    "TCPKeepalive", "H2UpgradePolicy", "TLSMode", "ClientTLS",
    "ENVOY_RETRY_ON", "HTTPCookie", "ConsistentHash", "Warmup",
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

    @property
    def is_service(self) -> bool:
        """A core Service: the only kind a waypoint routes to (others get 500)."""
        return self.group == "" and self.kind == "Service"


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
    PRESENT = "present"
    """The header (or query parameter) is present, with any value, even empty (value is "").
    Istio's `{}` and `regex: "*"` ("* is NOT a RE2 style regex, it's a metacharacter")."""


MESH_GATEWAY = "mesh"
"""The gateway name a waypoint evaluates a match's `gateways` against, as Istio's does."""


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
    without_headers: tuple[tuple[str, IstioStringMatch], ...] = ()
    """(lowercase name, match) that must NOT hold; a missing header counts as the empty string,
    except for a PRESENT match, which then holds (Istio: invert_match, treat_missing_as_empty)."""
    scheme: IstioStringMatch | None = None
    source_labels: FrozenMap = FrozenMap()
    source_namespace: str | None = None
    gateways: tuple[str, ...] = ()

    @property
    def applies_at_waypoint(self) -> bool:
        """False for blocks Istio drops at a waypoint: any `sourceLabels` ("not supported in
        ambient mode"), a `sourceNamespace`, or `gateways` that do not include "mesh"."""
        return (not self.source_labels and self.source_namespace is None
                and (not self.gateways or MESH_GATEWAY in self.gateways))


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


ENVOY_RETRY_ON = ("5xx", "gateway-error", "reset", "reset-before-request", "connect-failure",
                  "envoy-ratelimited", "retriable-4xx", "refused-stream", "retriable-status-codes",
                  "retriable-headers", "http3-post-connect-failure", "cancelled", "deadline-exceeded",
                  "internal", "resource-exhausted", "unavailable")
"""The `retryOn` conditions Istio's validation accepts (besides HTTP status codes), as Envoy names
them (istio pkg/config/validation/agent/validation.go)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class VSRetries:
    attempts: int = 0
    per_try_timeout: float | None = None
    retry_on: tuple[str, ...] = ()
    """Envoy retry conditions (`5xx`, `gateway-error`, `connect-failure`, ...) and status codes."""
    retry_remote_localities: bool | None = None
    retry_ignore_previous_hosts: bool | None = None
    """None: Istio's default (true: a retry goes to another host)."""
    backoff: float | None = None
    """Base interval between retries (seconds); None: Envoy's 25 ms."""


@dataclass(frozen=True, slots=True, kw_only=True)
class VSMirror:
    """One entry of `http[].mirrors`."""

    destination: VSDestination
    percentage: float | None = None
    """0..100; None means 100."""


@dataclass(frozen=True, slots=True, kw_only=True)
class VSFaultDelay:
    fixed_delay: float
    """Seconds."""
    percentage: float = 0.0
    """0..100 (a double); unset in the YAML is 0: Istio delays no request then."""


@dataclass(frozen=True, slots=True, kw_only=True)
class VSFaultAbort:
    http_status: int
    """200 when `grpc_status` is set (Envoy answers a gRPC abort with HTTP 200)."""
    percentage: float = 0.0
    """0..100 (a double); unset in the YAML is 0: Istio aborts no request then."""
    grpc_status: str | None = None
    """A gRPC status code name (e.g. UNAVAILABLE), sent as grpc-status."""


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
class VSRedirect:
    """`http[].redirect`: answer with a redirect instead of routing."""

    uri: str | None = None
    """Replaces the whole path (a `?` in it replaces the query too)."""
    authority: str | None = None
    port: int | None = None
    """`redirectPort`; None: `derivePort` decides."""
    derive_port: str = "FROM_PROTOCOL_DEFAULT"
    """FROM_PROTOCOL_DEFAULT (no port unless the Host has one) or FROM_REQUEST_PORT (the port dialled)."""
    scheme: str | None = None
    redirect_code: int = 301


@dataclass(frozen=True, slots=True, kw_only=True)
class VSDirectResponse:
    """`http[].directResponse`: answer with this status and body instead of routing."""

    status: int
    body: bytes = b""
    """`body.string` (UTF-8) or `body.bytes` (base64 in the YAML), decoded."""


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
    """0..100; None with a mirror means 100 (deprecated `mirrorPercent` is mapped here)."""
    headers: VSHeaders | None = None
    rewrite: VSRewrite | None = None
    mirrors: tuple[VSMirror, ...] = ()
    redirect: VSRedirect | None = None
    """With `redirect` or `direct_response`, `route` is empty."""
    direct_response: VSDirectResponse | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class VirtualService(Resource):
    kind: ClassVar[str] = "VirtualService"
    hosts: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    http: tuple[VSHTTPRoute, ...] = ()
    """In order: the first route that matches wins."""
    export_to: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TCPKeepalive:
    probes: int | None = None
    time: float | None = None
    interval: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TCPSettings:
    max_connections: int | None = None
    connect_timeout: float | None = None
    tcp_keepalive: TCPKeepalive | None = None
    max_connection_duration: float | None = None
    idle_timeout: float | None = None


class H2UpgradePolicy(enum.Enum):
    DEFAULT = "DEFAULT"
    DO_NOT_UPGRADE = "DO_NOT_UPGRADE"
    UPGRADE = "UPGRADE"


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPSettings:
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout: float | None = None
    h2_upgrade_policy: H2UpgradePolicy | None = None
    use_client_protocol: bool | None = None
    max_concurrent_streams: int | None = None


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
    split_external_local_origin_errors: bool | None = None
    consecutive_local_origin_failures: int | None = None


class LoadBalancer(enum.Enum):
    UNSPECIFIED = "UNSPECIFIED"
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"
    RANDOM = "RANDOM"
    PASSTHROUGH = "PASSTHROUGH"


class TLSMode(enum.Enum):
    DISABLE = "DISABLE"
    SIMPLE = "SIMPLE"
    MUTUAL = "MUTUAL"
    ISTIO_MUTUAL = "ISTIO_MUTUAL"
    """What ambient always does between meshed workloads (HBONE is mutual TLS)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientTLS:
    """`trafficPolicy.tls`: how the proxy talks TLS to the destination."""

    mode: TLSMode = TLSMode.DISABLE
    sni: str | None = None
    subject_alt_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPCookie:
    name: str
    path: str | None = None
    ttl: float | None = None
    """Seconds; when set, Envoy generates the cookie for requests that lack it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsistentHash:
    """`loadBalancer.consistentHash`: exactly one hash key is set."""

    http_header_name: str | None = None
    """Lowercase."""
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool = False
    http_query_parameter_name: str | None = None
    minimum_ring_size: int | None = None
    """`ringHash.minimumRingSize` (or the deprecated top-level `minimumRingSize`); None: 1024."""
    maglev_table_size: int | None = None
    """`maglev.tableSize` when Maglev was asked for (served by the same ring here)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Warmup:
    """`loadBalancer.warmup` (or deprecated `warmupDurationSecs`): Envoy's slow start."""

    duration: float
    """Seconds over which a new endpoint's weight ramps up."""
    minimum_percent: float | None = None
    """0..100, the weight a brand-new endpoint starts with; None: Envoy's 10 %."""
    aggression: float | None = None
    """>= 1; 1 = linear ramp; None: 1."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TrafficPolicy:
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    load_balancer: LoadBalancer | None = None
    """`loadBalancer.simple` (deprecated LEAST_CONN is mapped to LEAST_REQUEST)."""
    tls: ClientTLS | None = None
    consistent_hash: ConsistentHash | None = None
    """`loadBalancer.consistentHash` (exclusive with `simple`)."""
    warmup: Warmup | None = None


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
