"""Waypoint telemetry: Istio's standard HTTP metrics (reporter="waypoint") and Envoy's access-log line.

One typed `RequestResult` per request is the only input: `WaypointMetrics.record(result)`
updates the four standard families, `access_log_line(result)` formats the log line; nothing
else reads request state, so metrics and log cannot disagree.

Families (Istio's standard metrics, docs/reference/config/metrics):
  istio_requests_total                  counter
  istio_request_duration_milliseconds   histogram, Envoy's default buckets (DURATION_BUCKETS_MS)
  istio_request_bytes / istio_response_bytes  histograms (BYTES_BUCKETS)
all with the same label set, `RequestLabels`, plus `route`: the name of the route that matched
(`RequestResult.route_name`, "unknown" when none did), which Istio keeps out of its metrics but
`ambient stat route/NAME` groups by. The dashboards' queries (istio-dashboards.md) filter on
these names and labels.

Memory is bounded: at most `max_series` distinct label sets (default 16,384, about 1.5 KB
each: ~25 MB worst case). A request whose label set would be one more is counted in a single
overflow series whose labels are all `overflow` (reporter kept), and
`waypoint_metric_series_overflow_total` counts such requests, so totals stay right and the
cap is visible. Exposition renders each series' label text once, when it is created.
"""
from __future__ import annotations

import dataclasses
import time
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate
from functools import lru_cache

from mesh.fastinit import fast_init

from .resilience.timeout import grpc_status_for

__all__ = ["grpc_response_status", "DURATION_BUCKETS_MS", "BYTES_BUCKETS", "DEFAULT_MAX_SERIES", "RequestLabels", "RequestResult",
           "WaypointMetrics", "access_log_line", "ACCESS_LOG_FORMAT"]

DURATION_BUCKETS_MS: tuple[float, ...] = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000,
                                          30000, 60000, 300000, 600000, 1800000, 3600000)
"""Istio's request-duration buckets (Envoy's default histogram buckets), milliseconds."""
BYTES_BUCKETS: tuple[float, ...] = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000)
"""Request/response size buckets, bytes: Istio's decades (1 B .. 100 MB)."""
DEFAULT_MAX_SERIES = 16384


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class RequestLabels:
    """Istio's standard request-metric labels; "unknown" where the peer is not known."""

    reporter: str = "waypoint"
    source_workload: str = "unknown"
    source_workload_namespace: str = "unknown"
    source_principal: str = "unknown"
    """`spiffe://<td>/ns/<ns>/sa/<sa>`."""
    source_app: str = "unknown"
    source_version: str = "unknown"
    source_canonical_service: str = "unknown"
    source_canonical_revision: str = "unknown"
    destination_workload: str = "unknown"
    destination_workload_namespace: str = "unknown"
    destination_principal: str = "unknown"
    destination_app: str = "unknown"
    destination_version: str = "unknown"
    destination_service: str = "unknown"
    """The Service FQDN: `<name>.<ns>.svc.<domain>`."""
    destination_service_name: str = "unknown"
    destination_service_namespace: str = "unknown"
    destination_canonical_service: str = "unknown"
    destination_canonical_revision: str = "unknown"
    request_protocol: str = "http"
    """`http` or `grpc`."""
    response_code: str = "0"
    """HTTP status as sent; `0` when no response was sent (client went away)."""
    grpc_response_status: str = ""
    """gRPC status code for gRPC, empty otherwise (as Istio)."""
    response_flags: str = "-"
    """Envoy `%RESPONSE_FLAGS%` (`-`, `NR`, `UH`, `UF`, `UT`, `UO`, `DI`, `FI`, `UAEX`, ...)."""
    connection_security_policy: str = "mutual_tls"
    """Traffic reaches a waypoint over HBONE, so mTLS; `unknown` otherwise."""
    destination_cluster: str = "unknown"
    source_cluster: str = "unknown"


LABEL_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RequestLabels))
_OVERFLOW_VALUE = "overflow"


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class RequestResult:
    """Everything recorded about one request, built as it goes and recorded once at its end."""

    labels: RequestLabels
    start_time: float
    """Unix time (s) the request started, from the injected clock."""
    duration_ms: float
    """First request byte to last response byte (Envoy %DURATION%)."""
    request_bytes: int = 0
    """Request body bytes received from the client (%BYTES_RECEIVED%)."""
    response_bytes: int = 0
    """Response body bytes sent to the client (%BYTES_SENT%)."""
    method: str = ""
    path: str = ""
    """The path as the client sent it, query included (before any rewrite)."""
    protocol: str = "HTTP/1.1"
    response_code_details: str = ""
    connection_termination_details: str = ""
    upstream_transport_failure_reason: str = ""
    upstream_service_time_ms: int | None = None
    x_forwarded_for: str = ""
    user_agent: str = ""
    request_id: str = ""
    authority: str = ""
    upstream_host: str = ""
    """`ip:port` of the endpoint that answered."""
    upstream_cluster: str = ""
    """Envoy-style cluster name, e.g. `inbound-vip|8000|http|httpbin.foo.svc.cluster.local`."""
    upstream_local_address: str = ""
    downstream_local_address: str = ""
    downstream_remote_address: str = ""
    requested_server_name: str = ""
    route_name: str = ""


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_bound(b: float) -> str:
    return str(int(b)) if float(b).is_integer() else repr(float(b))


def _fmt_value(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(v)


class _Series:
    __slots__ = ("text", "requests", "dur", "dur_sum", "req", "req_sum", "resp", "resp_sum")

    def __init__(self, text: bytes, n_dur: int, n_bytes: int) -> None:
        self.text = text
        """The rendered `k="v",...` label text."""
        self.requests = 0
        self.dur = [0] * n_dur
        self.dur_sum = 0.0
        self.req = [0] * n_bytes
        self.req_sum = 0
        self.resp = [0] * n_bytes
        self.resp_sum = 0


_BY_ID_SIZE = 4096
"""Label objects the identity index keeps alive (the pipeline's label cache holds as many)."""


def _label_text(labels: RequestLabels, route: str) -> bytes:
    return (",".join(f'{k}="{_escape(getattr(labels, k))}"' for k in LABEL_NAMES)
            + f',route="{_escape(route)}"').encode()


class WaypointMetrics:
    """The waypoint's standard request metrics: `record` per request, `exposition` per scrape."""

    def __init__(self, *, max_series: int = DEFAULT_MAX_SERIES,
                 duration_buckets: tuple[float, ...] = DURATION_BUCKETS_MS,
                 bytes_buckets: tuple[float, ...] = BYTES_BUCKETS) -> None:
        if max_series < 1:
            raise ValueError("max_series must be at least 1")
        for name, b in (("duration_buckets", duration_buckets), ("bytes_buckets", bytes_buckets)):
            if not b or list(b) != sorted(set(b)):
                raise ValueError(f"{name} must be non-empty and strictly increasing, got {b!r}")
        self.max_series = max_series
        self._dur_bounds = tuple(float(b) for b in duration_buckets)
        self._bytes_bounds = tuple(float(b) for b in bytes_buckets)
        self._series: dict[tuple[RequestLabels, str], _Series] = {}
        """By (labels, route name): the route is a label of its own (see module doc)."""
        self._overflow: dict[str, _Series] = {}
        self._by_id: dict[tuple[int, str], tuple[RequestLabels, _Series]] = {}
        self.overflowed = 0
        """Requests counted in an overflow series because the cap was reached."""
        self.budget_exhausted: dict[str, int] = {}
        """Retries not sent because the destination service's retry budget was exhausted."""
        self.mirrors: dict[str, int] = {}
        """Mirrored copies by result (waypoint/mirror.py MirrorResult labels, a closed set)."""

    def __len__(self) -> int:
        """Distinct label sets held (overflow series included)."""
        return len(self._series) + len(self._overflow)

    def _new_series(self, labels: RequestLabels, route: str) -> _Series:
        return _Series(_label_text(labels, route), len(self._dur_bounds) + 1, len(self._bytes_bounds) + 1)

    def _series_for(self, labels: RequestLabels, route: str) -> _Series:
        # By identity first: the pipeline hands the same labels object to every request of a
        # connection (its label cache), and hashing the 25-field object was a Python call.
        hit = self._by_id.get((id(labels), route))
        if hit is not None and hit[0] is labels:
            return hit[1]
        key = (labels, route)
        s = self._series.get(key)
        if s is None:
            if len(self._series) >= self.max_series:
                return self._overflow_series(labels)     # never indexed: each request counts
            s = self._series[key] = self._new_series(labels, route or "unknown")
        if len(self._by_id) >= _BY_ID_SIZE:
            self._by_id.clear()
        self._by_id[(id(labels), route)] = (labels, s)   # the entry keeps `labels` alive: its id stays its own
        return s

    def _overflow_series(self, labels: RequestLabels) -> _Series:
        self.overflowed += 1
        s = self._overflow.get(labels.reporter)
        if s is None:
            folded = RequestLabels(**{k: _OVERFLOW_VALUE for k in LABEL_NAMES if k != "reporter"},
                                   reporter=labels.reporter)
            s = self._overflow[labels.reporter] = self._new_series(folded, _OVERFLOW_VALUE)
        return s

    def count_mirror(self, result: str) -> None:
        """Count one mirrored copy that ended with `result`."""
        self.mirrors[result] = self.mirrors.get(result, 0) + 1

    def record(self, result: RequestResult) -> None:
        """Count one finished request."""
        s = self._series_for(result.labels, result.route_name)
        s.requests += 1
        d = max(0.0, result.duration_ms)
        s.dur[bisect_left(self._dur_bounds, d)] += 1
        s.dur_sum += d
        rq, rs = max(0, result.request_bytes), max(0, result.response_bytes)
        s.req[bisect_left(self._bytes_bounds, rq)] += 1
        s.req_sum += rq
        s.resp[bisect_left(self._bytes_bounds, rs)] += 1
        s.resp_sum += rs

    def retry_budget_exhausted(self, destination_service: str) -> None:
        """A retry the destination's budget refused (bounded: one series per service)."""
        self.budget_exhausted[destination_service] = self.budget_exhausted.get(destination_service, 0) + 1

    def _histogram(self, name: str, doc: str, bounds: tuple[float, ...], series: list[_Series],
                   counts_attr: str, sum_attr: str) -> Iterator[bytes]:
        yield f"# HELP {name} {doc}\n# TYPE {name} histogram\n".encode()
        les = [f',le="{_fmt_bound(b)}"}} '.encode() for b in bounds] + [b',le="+Inf"} ']
        bucket, total, count = f"{name}_bucket{{".encode(), f"{name}_sum{{".encode(), f"{name}_count{{".encode()
        for s in series:
            text = s.text
            head = bucket + text
            lines = [b"%s%s%d\n" % (head, le, c) for le, c in zip(les, accumulate(getattr(s, counts_attr)))]
            lines.append(b"%s%s} %s\n%s%s} %d\n" % (total, text, _fmt_value(getattr(s, sum_attr)).encode(),
                                                     count, text, s.requests))
            yield b"".join(lines)

    def exposition_chunks(self) -> Iterator[bytes]:
        """The exposition in pieces (one per family header and per series): a server can write
        them as they come instead of building one large body (10k series is ~400 MB of text)."""
        series = [*self._series.values(), *self._overflow.values()]
        yield (b"# HELP istio_requests_total Requests handled by the waypoint.\n"
               b"# TYPE istio_requests_total counter\n")
        yield b"".join([b"istio_requests_total{%s} %d\n" % (s.text, s.requests) for s in series])
        yield from self._histogram("istio_request_duration_milliseconds", "Request duration (ms).",
                                   self._dur_bounds, series, "dur", "dur_sum")
        yield from self._histogram("istio_request_bytes", "Request body size (bytes).",
                                   self._bytes_bounds, series, "req", "req_sum")
        yield from self._histogram("istio_response_bytes", "Response body size (bytes).",
                                   self._bytes_bounds, series, "resp", "resp_sum")
        yield (b"# HELP waypoint_metric_series_overflow_total Requests counted in the overflow series "
               b"because the label-set cap was reached.\n# TYPE waypoint_metric_series_overflow_total counter\n"
               b"waypoint_metric_series_overflow_total %d\n" % self.overflowed)
        yield (b"# HELP ambient_waypoint_retry_budget_exhausted_total Retries not sent because the destination "
               b"service's retry budget was exhausted.\n"
               b"# TYPE ambient_waypoint_retry_budget_exhausted_total counter\n")
        yield "".join(f'ambient_waypoint_retry_budget_exhausted_total{{destination_service="{_escape(k)}"}} {v}\n'
                      for k, v in sorted(self.budget_exhausted.items())).encode()
        yield (b"# HELP waypoint_mirror_requests_total Mirrored request copies by how they ended.\n"
               b"# TYPE waypoint_mirror_requests_total counter\n" +
               b"".join(b'waypoint_mirror_requests_total{result="%s"} %d\n' % (k.encode(), v)
                        for k, v in sorted(self.mirrors.items())))

    def exposition(self) -> bytes:
        """All families in the Prometheus text format (version 0.0.4)."""
        return b"".join(self.exposition_chunks())


# -- access log --------------------------------------------------------------------------------

ACCESS_LOG_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE% '
    '%RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% '
    '"%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER% '
    '%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% '
    '%REQUESTED_SERVER_NAME% %ROUTE_NAME%')
"""Istio's default Envoy text format (meshConfig.accessLogFormat unset), which the line follows."""

_CONTROL = {c: f"\\x{c:02x}" for c in range(0x20)} | {0x7f: "\\x7f"}


def _f(v: str | int | None) -> str:
    """A field as Envoy prints it: `-` when empty; control characters escaped (one line per
    request, so a header value cannot forge a log line: Envoy writes them raw)."""
    if v is None or v == "":
        return "-"
    s = str(v)
    return s.translate(_CONTROL) if not s.isprintable() else s


@lru_cache(maxsize=8)
def _second(sec: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))   # once per second, not per request


def _start(t: float) -> str:
    ms = int(round(t * 1000))
    return f"{_second(ms // 1000)}.{ms % 1000:03d}Z"


def access_log_line(r: RequestResult) -> str:
    """One line in Istio's default access-log format (`ACCESS_LOG_FORMAT`), without newline."""
    lab = r.labels
    ust = r.upstream_service_time_ms
    # Every field as `_f` prints it, without a call per field: an empty one is `-`, and one
    # with a character to escape makes the whole line non-printable, which the slow path
    # (the same fields through `_f`) handles.
    line = (f'[{_start(r.start_time)}] "{r.method or "-"} {r.path or "-"} {r.protocol or "-"}" {lab.response_code} '
            f'{lab.response_flags or "-"} {r.response_code_details or "-"} {r.connection_termination_details or "-"} '
            f'"{r.upstream_transport_failure_reason or "-"}" {r.request_bytes} {r.response_bytes} '
            f'{int(r.duration_ms)} {"-" if ust is None else ust} "{r.x_forwarded_for or "-"}" '
            f'"{r.user_agent or "-"}" "{r.request_id or "-"}" "{r.authority or "-"}" "{r.upstream_host or "-"}" '
            f'{r.upstream_cluster or "-"} {r.upstream_local_address or "-"} {r.downstream_local_address or "-"} '
            f'{r.downstream_remote_address or "-"} {r.requested_server_name or "-"} {r.route_name or "-"}')
    return line if line.isprintable() else _escaped_line(r)


def _escaped_line(r: RequestResult) -> str:
    lab = r.labels
    return (f'[{_start(r.start_time)}] "{_f(r.method)} {_f(r.path)} {_f(r.protocol)}" {lab.response_code} '
            f'{_f(lab.response_flags)} {_f(r.response_code_details)} {_f(r.connection_termination_details)} '
            f'"{_f(r.upstream_transport_failure_reason)}" {r.request_bytes} {r.response_bytes} '
            f'{int(r.duration_ms)} {_f(r.upstream_service_time_ms)} "{_f(r.x_forwarded_for)}" '
            f'"{_f(r.user_agent)}" "{_f(r.request_id)}" "{_f(r.authority)}" "{_f(r.upstream_host)}" '
            f'{_f(r.upstream_cluster)} {_f(r.upstream_local_address)} {_f(r.downstream_local_address)} '
            f'{_f(r.downstream_remote_address)} {_f(r.requested_server_name)} {_f(r.route_name)}')


def grpc_response_status(http_status: int, sent: str | None) -> str:
    """`grpc_response_status` of a gRPC request: the grpc-status the response carried, else
    Envoy's mapping of the HTTP status (resilience/timeout.py: 503 -> 14 UNAVAILABLE, 404 -> 12,
    403 -> 7, ..., anything else 2 UNKNOWN); "" when nothing was sent."""
    if sent is not None:
        return sent
    if not http_status:
        return ""
    return str(grpc_status_for(http_status))
