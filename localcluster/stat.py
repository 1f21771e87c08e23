"""`ambient stat` and `ambient edges`: golden signals and who-talks-to-whom, from the cluster's Prometheus (like linkerd viz).

Every number is one PromQL instant query at one evaluation time over one window (`-t`), so
`-o json` (which prints the queries and the time) can be checked against Prometheus itself:

    RPS         sum by (K) (rate(istio_requests_total{reporter="waypoint",F}[w]))
    SUCCESS     the same with response_code!~"5.." divided by RPS (Istio's dashboards' rule)
    P50/95/99   histogram_quantile(q, sum by (le, K) (rate(istio_request_duration_milliseconds_bucket{..}[w])))
    TCP_CONN    sum by (K) (rate(istio_tcp_connections_opened_total{reporter=R,F}[w])): connections
                per second as ztunnel counts them (when they close); R is "source" for svc (only
                the client's ztunnel knows the Service), "destination" for pod

K is what the rows are (svc: destination_service; pod: destination_workload(+namespace); route:
the waypoint's route label, `<ns>.<HTTPRoute>.<rule index>` or `default`; waypoint: the scrape
target's gateway label), F the filters of
`-n`, NAME and `--from`. HTTP numbers come from waypoints (the only L7 reporter of an ambient
mesh); without a waypoint a service has TCP numbers only. The decisions (queries, rows, tables)
are pure functions; `main`s only fetch and print.

Exit status: 0 rows printed, 1 error (no runner, no Prometheus, bad query), 2 bad usage,
3 nothing matched (no traffic in the window).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

from localcluster.api import ApiError, call
from localcluster.paths import ClusterPaths
from localcluster.prometheus import PrometheusError, query

__all__ = ["StatQuery", "stat_queries", "edge_query", "rows", "sort_rows", "SORTS", "edges", "table", "edge_table",
           "register", "NO_DATA"]

NO_DATA = 3
_KINDS = {"svc": "svc", "service": "svc", "services": "svc", "pod": "pod", "po": "pod", "pods": "pod",
          "route": "route", "routes": "route", "rt": "route", "waypoint": "waypoint", "waypoints": "waypoint",
          "wp": "waypoint"}
_KEYS = {"svc": ("destination_service",), "pod": ("destination_workload_namespace", "destination_workload"),
         "route": ("destination_service_namespace", "route"), "waypoint": ("gateway",)}
_QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))


def _re(v: str) -> str:
    """A literal inside a PromQL regex (RE2) inside a double-quoted string."""
    out = "".join("\\\\" + c if c in r".^$*+?()[]{}|\-" else c for c in v)
    return out.replace('"', '\\"')


def _lit(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"')


@dataclass(frozen=True, slots=True, kw_only=True)
class StatQuery:
    kind: str
    keys: tuple[str, ...]
    window: str
    rps: str
    ok: str
    latency: tuple[tuple[str, str], ...]
    tcp: str | None


def _filters(kind: str, namespace: str | None, name: str | None, src: tuple[str, str] | None,
             *, tcp: bool) -> str:
    f: list[str] = []
    if kind == "svc":
        if tcp:  # ztunnel's TCP series have only the FQDN
            if name or namespace:
                f.append(f'destination_service=~"{_re(name or "") + (".+" if not name else "")}'
                         f'\\\\.{_re(namespace) if namespace else "[^.]+"}\\\\.svc\\\\..+"')
            else:  # connections to a pod's address (not a Service) are "unknown": not a service row
                f.append('destination_service!="unknown"')
        else:
            if namespace:
                f.append(f'destination_service_namespace="{_lit(namespace)}"')
            if name:
                f.append(f'destination_service_name="{_lit(name)}"')
    elif kind == "pod":
        if namespace:
            f.append(f'destination_workload_namespace="{_lit(namespace)}"')
        if name:
            f.append(f'destination_workload="{_lit(name)}"')
    elif kind == "route":
        if namespace:
            f.append(f'destination_service_namespace="{_lit(namespace)}"')
        if name and "." in name:  # a rule, as the waypoint names it: <ns>.<route>.<rule index>
            f.append(f'route="{_lit(name)}"')
        elif name:  # every rule of route NAME (or a route called just NAME: VirtualService's "default")
            f.append(f'route=~"[^.]+\\\\.{_re(name)}\\\\.[0-9]+|{_re(name)}"')
    elif kind == "waypoint":
        if namespace and name:
            f.append(f'gateway="{_lit(namespace)}/{_lit(name)}"')
        elif namespace:
            f.append(f'namespace="{_lit(namespace)}"')
        elif name:
            f.append(f'gateway=~".+/{_re(name)}"')
    if src is not None:
        f += [f'source_workload_namespace="{_lit(src[0])}"', f'source_workload="{_lit(src[1])}"']
    return ",".join(f)


def stat_queries(kind: str, *, namespace: str | None, name: str | None, src: tuple[str, str] | None,
                 window: str) -> StatQuery:
    """The PromQL for one `ambient stat` (pure: table-tested)."""
    kind = _KINDS[kind]
    keys = _KEYS[kind]
    by = ", ".join(keys)
    f = _filters(kind, namespace, name, src, tcp=False)
    sel = 'reporter="waypoint"' + (f",{f}" if f else "")
    rps = f"sum by ({by}) (rate(istio_requests_total{{{sel}}}[{window}]))"
    ok = f'sum by ({by}) (rate(istio_requests_total{{{sel},response_code!~"5.."}}[{window}]))'
    lat = tuple((p, f"histogram_quantile({q}, sum by (le, {by}) "
                    f"(rate(istio_request_duration_milliseconds_bucket{{{sel}}}[{window}])))")
                for p, q in _QUANTILES)
    tcp = None
    if kind in ("svc", "pod"):
        ft = _filters(kind, namespace, name, src, tcp=True)
        # Only the client's ztunnel knows the Service (it resolved the VIP); the server's knows the pod.
        tsel = f'reporter="{"source" if kind == "svc" else "destination"}"' + (f",{ft}" if ft else "")
        tby = "destination_service" if kind == "svc" else by
        tcp = f"sum by ({tby}) (rate(istio_tcp_connections_opened_total{{{tsel}}}[{window}]))"
    return StatQuery(kind=kind, keys=keys, window=window, rps=rps, ok=ok, latency=lat, tcp=tcp)


def _num(v: str) -> float | None:
    x = float(v)
    return None if math.isnan(x) or math.isinf(x) else x


def _by_key(result: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[tuple[str, ...], float | None]:
    return {tuple(r["metric"].get(k, "") for k in keys): _num(r["value"][1]) for r in result}


def rows(q: StatQuery, results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows from the query results (`results` keyed rps, ok, p50, p95, p99, tcp)."""
    rps, ok = _by_key(results["rps"], q.keys), _by_key(results["ok"], q.keys)
    lat = {p: _by_key(results[p], q.keys) for p, _ in q.latency}
    tcp: dict[tuple[str, ...], float | None] = {}
    if q.tcp is not None:
        tk = ("destination_service",) if q.kind == "svc" else q.keys
        tcp = _by_key(results["tcp"], tk)
    out = []
    for key in sorted(set(rps) | set(tcp)):
        r = rps.get(key)
        good = ok.get(key, 0.0 if r is not None else None)
        out.append({
            "name": "/".join(k for k in key if k), **dict(zip(q.keys, key)),
            "rps": r, "success": (good / r) if r else None,
            **{f"latency_ms_{p}": lat[p].get(key) for p, _ in q.latency},
            "tcp_connections_per_second": tcp.get(key) if q.tcp is not None else None,
        })
    return out


SORTS = {"name": None, "success": "success", "rps": "rps", "p50": "latency_ms_p50", "p95": "latency_ms_p95",
         "p99": "latency_ms_p99", "tcp": "tcp_connections_per_second"}
"""`--sort`: name ascending; success worst first; the others highest first. Rows without the number last."""


def sort_rows(rs: list[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    """`rows` ordered for `--sort` (ties by name, so the order is stable across refreshes)."""
    field = SORTS[by]
    if field is None:
        return sorted(rs, key=lambda r: r["name"])
    sign = 1 if by == "success" else -1
    return sorted(rs, key=lambda r: (r[field] is None, sign * (r[field] or 0.0), r["name"]))


EDGE_KEYS = ("source_workload_namespace", "source_workload", "source_principal", "destination_workload_namespace",
             "destination_workload", "destination_principal", "connection_security_policy")


def edge_query(*, namespace: str | None, window: str) -> tuple[str, str]:
    """(TCP, HTTP) PromQL of `ambient edges`: connections and requests per edge in the window.
    Both ztunnels report a connection (the client's alone when it goes to a waypoint, which
    has no ztunnel in front): `max by` over the reporters counts each edge once."""
    by = ", ".join(EDGE_KEYS)
    ns = f'{{destination_workload_namespace="{_lit(namespace)}"}}' if namespace else ""
    nsw = f',destination_workload_namespace="{_lit(namespace)}"' if namespace else ""
    return (f'max by ({by}) (sum by ({by}, reporter) (increase(istio_tcp_connections_opened_total{ns}[{window}]))) > 0',
            f'sum by ({by}) (increase(istio_requests_total{{reporter="waypoint"{nsw}}}[{window}])) > 0')


def edges(tcp: list[dict[str, Any]], http: list[dict[str, Any]]) -> list[dict[str, Any]]:
    got: dict[tuple[str, ...], dict[str, Any]] = {}
    for proto, res in (("tcp", tcp), ("http", http)):
        for r in res:
            key = tuple(r["metric"].get(k, "unknown") for k in EDGE_KEYS)
            e = got.setdefault(key, {**dict(zip(EDGE_KEYS, key)), "connections": 0.0, "requests": 0.0})
            e["connections" if proto == "tcp" else "requests"] += float(r["value"][1])
    out = []
    for e in got.values():
        e["src"] = f"{e['source_workload_namespace']}/{e['source_workload']}"
        e["dst"] = f"{e['destination_workload_namespace']}/{e['destination_workload']}"
        e["mtls"] = e["connection_security_policy"] == "mutual_tls"
        out.append(e)
    return sorted(out, key=lambda e: (e["src"], e["dst"], e["connection_security_policy"]))


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def _ms(v: float | None) -> str:
    # Local hops take well under a millisecond: keep a decimal below 10 ms.
    return "-" if v is None else f"{v:.1f}ms" if v < 10 else f"{v:.0f}ms"


def table(kind: str, rs: list[dict[str, Any]], *, wide: bool = False) -> list[list[str]]:
    head = ["NAME", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99", "TCP_CONN/S"]
    out = [head + (list(_KEYS[kind]) if wide else [])]
    for r in rs:
        out.append([r["name"], _fmt(None if r["success"] is None else r["success"] * 100, ".2f", "%"),
                    _fmt(r["rps"], ".2f"), _ms(r["latency_ms_p50"]), _ms(r["latency_ms_p95"]), _ms(r["latency_ms_p99"]),
                    _fmt(r["tcp_connections_per_second"], ".2f")]
                   + ([r.get(k, "") for k in _KEYS[kind]] if wide else []))
    return out


def edge_table(es: list[dict[str, Any]], *, wide: bool = False) -> list[list[str]]:
    head = ["SRC", "DST", "SRC_IDENTITY", "DST_IDENTITY", "SECURED", "CONNECTIONS", "REQUESTS"]
    return [head] + [[e["src"], e["dst"], e["source_principal"].removeprefix("spiffe://"),
                      e["destination_principal"].removeprefix("spiffe://"), "√ mTLS" if e["mtls"] else "plaintext",
                      f"{e['connections']:.0f}", f"{e['requests']:.0f}"] for e in es]


# -- CLI ----------------------------------------------------------------------------------------

def _print_table(t: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in t) for i in range(len(t[0]))]
    for r in t:
        print("  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip())


def _emit(doc: dict[str, Any], out: str, tab: list[list[str]]) -> None:
    if out == "json":
        print(json.dumps(doc, indent=2))
    elif out == "yaml":
        import yaml
        print(yaml.safe_dump(doc, sort_keys=False), end="")
    else:
        _print_table(tab)


def _prometheus_url(paths: ClusterPaths, a: argparse.Namespace) -> str:
    if a.prometheus_url:
        return a.prometheus_url
    st = call(paths.runner_socket, "status")
    prom = (st.get("observability") or {}).get("prometheus")
    if not prom:
        raise ApiError(f"cluster {paths.name!r} runs no Prometheus: start it with `ambient up --prometheus`",
                       "prometheus_unavailable")
    return prom["url"]


def _src(a: argparse.Namespace) -> tuple[str, str] | None:
    if not a.source:
        return None
    kind, _, name = a.source.rpartition("/")
    if kind not in ("", "pod", "po", "deploy", "workload"):
        raise ApiError(f"--from wants [pod/]NAME, got {a.source!r}", "bad_request")
    return (a.from_namespace or a.namespace or "default", name)


def _once(paths: ClusterPaths, a: argparse.Namespace, url: str) -> int:
    at = a.at if a.at is not None else time.time()
    if a.cmd == "edges":
        tq, hq = edge_query(namespace=a.namespace, window=a.window)
        es = edges(query(url, tq, at=at), query(url, hq, at=at))
        _emit({"time": at, "window": a.window, "queries": {"tcp": tq, "http": hq}, "edges": es}, a.output,
              edge_table(es))
        return 0 if es else NO_DATA
    kind_name = a.resource.split("/", 1)
    if kind_name[0] not in _KINDS:
        raise ApiError(f"unknown resource {kind_name[0]!r}: one of svc, pod, route, waypoint", "bad_request")
    name = kind_name[1] if len(kind_name) > 1 and kind_name[1] else None
    q = stat_queries(kind_name[0], namespace=a.namespace, name=name, src=_src(a), window=a.window)
    qs = {"rps": q.rps, "ok": q.ok, **dict(q.latency), **({"tcp": q.tcp} if q.tcp else {})}
    results = {k: query(url, v, at=at) for k, v in qs.items()}
    rs = sort_rows(rows(q, results), a.sort)
    _emit({"time": at, "window": a.window, "kind": q.kind, "queries": qs, "rows": rs}, a.output,
          table(q.kind, rs, wide=a.output == "wide"))
    return 0 if rs else NO_DATA


def cmd(paths: ClusterPaths, a: argparse.Namespace) -> int:
    try:
        url = _prometheus_url(paths, a)
        if not a.watch:
            rc = _once(paths, a, url)
            if rc == NO_DATA and a.output in ("table", "wide"):
                print(f"no traffic found in the last {a.window}", file=sys.stderr)
            return rc
        while True:  # until interrupted or the reader goes away (`| head`)
            if sys.stdout.isatty():
                sys.stdout.write("\x1b[H\x1b[2J")
            _once(paths, a, url)
            sys.stdout.flush()
            time.sleep(a.interval)
    except PrometheusError as e:
        raise ApiError(str(e), e.reason) from None
    except KeyboardInterrupt:
        return 0


def register(sub: Any) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("-n", "--namespace", default=None, help="only this namespace (default: all)")
        p.add_argument("-t", "--time-window", dest="window", default="1m", help="PromQL range, e.g. 30s, 1m, 10m")
        p.add_argument("-o", "--output", choices=["table", "wide", "json", "yaml"], default="table")
        p.add_argument("--at", type=float, default=None, metavar="UNIX_TIME",
                       help="evaluate at this time instead of now (the window ends there)")
        p.add_argument("-w", "--watch", action="store_true", help="print again every --interval seconds")
        p.add_argument("--interval", type=float, default=2.0)
        p.add_argument("--prometheus-url", default=None, help="default: the cluster's (`ambient up --prometheus`)")
        p.set_defaults(fn=cmd)

    st = sub.add_parser("stat", help="success rate, RPS, latency percentiles, TCP connections (from Prometheus)")
    st.add_argument("resource", help="svc|pod|route|waypoint[/NAME]")
    st.add_argument("--from", dest="source", default=None, metavar="[pod/]NAME", help="only traffic from this workload")
    st.add_argument("--from-namespace", default=None)
    st.add_argument("--sort", choices=list(SORTS), default="name",
                    help="row order: name; success (worst first); rps, p50, p95, p99, tcp (highest first)")
    common(st)
    ed = sub.add_parser("edges", help="who talks to whom: workloads, identities, mTLS (from Prometheus)")
    common(ed)

