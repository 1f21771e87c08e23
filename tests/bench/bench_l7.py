#!/usr/bin/env python3
"""L7 benchmark on a 2-node local cluster: client -> ztunnel -> waypoint -> ztunnel -> server, our waypoint vs Envoy as the waypoint."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # bench_l4's cluster driver, samplers and Envoy pieces

from bench_l4 import (HTTP_PORT, NOBODY, TOOLS, Cluster, Sampler, SetupError, _addr,  # noqa: E402
                      _cpu_ticks, _git_rev, _H2_WINDOWS, _loadavg, _median, _T, _tail, _tls_context, check_cluster_name,
                      check_proxied, envoy_binary, keep_logs, nginx_conf, parse_wrk, probe, rss_mb)
from localcluster import api, procs  # noqa: E402
from waypoint.telemetry import ACCESS_LOG_FORMAT  # noqa: E402

SETUPS = ("ztunnel", "waypoint", "envoy")
NS = "bench-l7"
SVC_PORT = 80
WAYPOINT, ENVOY_GW = "wp", "envoy-wp"
# The Envoy waypoint's pod: labelled as envoy-wp's Gateway pod and named before the one the
# runner synthesizes (`envoy-wp-waypoint`), so the control plane addresses the Gateway by it
# (controlplane/translate.py waypoints_of: the first pod by name wins). The runner's own waypoint
# process for envoy-wp stays up, idle: it keeps the Gateway ready and gives Envoy its bootstrap SVID.
ENVOY_POD = "envoy-wp-envoy"
HBONE_PORT = 15008
ENVOY_ADMIN = "127.0.0.1:15000"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# wrk paced: per wrk thread, each response schedules its connection's next request on the
# thread's next free slot (slots `interval` ms apart), so the offered rate does not depend on
# the latency being measured. wrk measures latency from the write, not from the slot.
PACE_LUA = """\
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } l7_timespec;
int clock_gettime(int clk, l7_timespec *tp);
]]
local ts = ffi.new("l7_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
local interval = %(interval_ms).6f
local nxt = 0
function delay()
  local t = now_ms()
  if nxt < t then nxt = t end
  nxt = nxt + interval
  return math.floor(nxt - t + 0.5)
end
"""
WRK_THREADS = 2
PACED_CONNS = 8  # 4 per wrk thread: a slot is only missed when all 4 wait longer than 4 slots


@dataclass(frozen=True)
class Durations:
    warm: int
    tput: int
    lat: int
    pause: float


@dataclass
class Target:
    """One way from the client pod to the server pod, and the processes to measure on it."""

    name: str
    client: dict[str, Any]
    http: str  # host:port wrk connects to
    waypoint_pids: Any = dict  # () -> {label: [pid]}: the L7 proxy alone
    path_pids: Any = dict  # () -> {label: [pid]}: every proxy on the path (ztunnels + waypoint)
    note: str = ""
    envoy_pod: dict[str, Any] | None = None  # pod_info of Envoy's pod (its admin port is there)

    def pids(self) -> dict[str, list[int]]:  # what bench_l4's check_proxied samples
        return self.path_pids()


# ---- the cluster ----------------------------------------------------------------------------

def cluster_yaml(workdir: str) -> str:
    """n1 (client), n2 (server: nginx); the Service `via-wp` uses our waypoint, `via-envoy` the
    Envoy one, both select the same server pod; pod-addressed traffic has no waypoint."""
    prefix = os.path.join(workdir, "nginx")
    os.makedirs(prefix, exist_ok=True)
    os.chmod(workdir, 0o755)
    os.chown(prefix, NOBODY, NOBODY)  # the server pod runs nginx as nobody (see bench_l4)
    conf = os.path.join(workdir, "nginx.conf")
    with open(conf, "w") as f:
        f.write(nginx_conf(prefix))
    nginx = ["nginx", "-c", conf, "-p", prefix, "-e", "stderr"]
    gateway = "{name: %s, namespace: %s}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners:\n" \
              "  - {name: mesh, port: 15008, protocol: HBONE}\n"
    docs = ["apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n",
            "apiVersion: v1\nkind: Node\nmetadata: {name: n2}\n",
            f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}, labels: {{istio.io/dataplane-mode: ambient}}}}\n"]
    docs += [f"apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: {NS}}}\n"
             for sa in ("client", "server")]
    docs += [f"apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: " + gateway % (gw, NS)
             for gw in (WAYPOINT, ENVOY_GW)]
    docs += [textwrap.dedent(f"""\
        apiVersion: v1
        kind: Service
        metadata: {{name: {svc}, namespace: {NS}, labels: {{istio.io/use-waypoint: {gw}}}}}
        spec:
          selector: {{app: server}}
          ports: [{{name: http, port: {SVC_PORT}, targetPort: {HTTP_PORT}}}]
        """) for svc, gw in (("via-wp", WAYPOINT), ("via-envoy", ENVOY_GW))]
    docs.append(textwrap.dedent(f"""\
        apiVersion: v1
        kind: Pod
        metadata: {{name: client, namespace: {NS}}}
        spec:
          nodeName: n1
          serviceAccountName: client
          containers:
          - {{name: sleep, command: [sleep, infinity]}}
        """))
    docs.append(textwrap.dedent(f"""\
        apiVersion: v1
        kind: Pod
        metadata: {{name: server, namespace: {NS}, labels: {{app: server}}}}
        spec:
          nodeName: n2
          serviceAccountName: server
          securityContext: {{runAsUser: {NOBODY}, runAsGroup: {NOBODY}}}
          containers:
          - {{name: nginx, command: {json.dumps(nginx)}}}
        """))
    return "---\n".join(docs)


def envoy_pod_yaml(node: str) -> str:
    """Envoy's waypoint pod, on the node of our waypoint; out of capture like the synthesized one."""
    return textwrap.dedent(f"""\
        apiVersion: v1
        kind: Pod
        metadata:
          name: {ENVOY_POD}
          namespace: {NS}
          labels: {{gateway.networking.k8s.io/gateway-name: {ENVOY_GW}, istio.io/dataplane-mode: none}}
        spec:
          nodeName: {node}
          serviceAccountName: {ENVOY_GW}
          containers:
          - {{name: sleep, command: [sleep, infinity]}}
        """)


def cgroup_pids(cgroup: str) -> list[int]:
    out: list[int] = []
    for d, _, _ in os.walk(cgroup):
        with contextlib.suppress(OSError), open(os.path.join(d, "cgroup.procs")) as f:
            out += [int(x) for x in f.read().split()]
    return out


def service_vip(cluster: Cluster, name: str) -> str:
    st = api.call(cluster.paths.runner_socket, "status")
    return next(s["cluster_ip"] for s in st["services"] if s["name"] == name and s["namespace"] == NS)


# ---- Envoy as the waypoint ------------------------------------------------------------------

def _hcm(stat_prefix: str, codec: str, route_config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": _T + "filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix, "codec_type": codec, "route_config": route_config,
        "http_filters": [{"name": "envoy.filters.http.router",
                          "typed_config": {"@type": _T + "filters.http.router.v3.Router"}}], **extra}}


def _internal(listener: str) -> dict[str, Any]:
    return {"address": {"envoy_internal_address": {"server_listener_name": listener}}}


def envoy_waypoint_config(ip: str, server_ip: str, server_id: str, svc_fqdn: str, sv: str,
                          access_log: str) -> dict[str, Any]:
    """Istio's waypoint shape: `connect_terminate` (mTLS HBONE on ip:15008, CONNECT terminated)
    -> internal listener `main_internal` (HTTP connection manager, route, access log) ->
    HTTP/1.1 pool to cluster `outbound|80||<fqdn>`, whose endpoint is internal listener
    `connect_originate` -> tcp_proxy tunnelling each upstream connection as a CONNECT on the
    pooled mTLS h2 connection to the server pod's ztunnel (server_ip:15008). `sv` = SVID dir."""
    ca, chain, key = (os.path.join(sv, f) for f in ("root-cert.pem", "cert-chain.pem", "key.pem"))

    def tls_ctx(san: dict[str, str]) -> dict[str, Any]:
        # bench_l4's TLS 1.3 + ALPN h2 context (it names <dir>/<role>.pem files), with the SVID's files
        ctx = _tls_context(sv, "unused", san)
        ctx["tls_certificates"] = [{"certificate_chain": {"filename": chain}, "private_key": {"filename": key}}]
        ctx["validation_context"]["trusted_ca"] = {"filename": ca}
        return ctx

    terminate_routes = {"virtual_hosts": [{"name": "connect", "domains": ["*"], "routes": [{
        "match": {"connect_matcher": {}},
        "route": {"cluster": "main_internal", "timeout": "0s",
                  "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]}}]}]}
    terminate = {"name": "connect_terminate", "address": _addr(ip, HBONE_PORT), "filter_chains": [{
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": _T + "transport_sockets.tls.v3.DownstreamTlsContext", "require_client_certificate": True,
            "common_tls_context": tls_ctx({"prefix": "spiffe://cluster.local/"})}},
        "filters": [_hcm("connect_terminate", "HTTP2", terminate_routes, stream_idle_timeout="0s",
                         http2_protocol_options={"allow_connect": True, **_H2_WINDOWS},
                         upgrade_configs=[{"upgrade_type": "CONNECT"}])]}]}
    cluster_name = f"outbound|{SVC_PORT}||{svc_fqdn}"
    log = {"name": "envoy.access_loggers.file", "typed_config": {
        "@type": _T + "access_loggers.file.v3.FileAccessLog", "path": access_log,
        "log_format": {"text_format_source": {"inline_string": ACCESS_LOG_FORMAT + "\n"}}}}
    main_routes = {"virtual_hosts": [{"name": svc_fqdn, "domains": ["*"], "routes": [{
        "name": "default", "match": {"prefix": "/"}, "route": {"cluster": cluster_name, "timeout": "0s"}}]}]}
    main = {"name": "main_internal", "internal_listener": {}, "filter_chains": [{
        "filters": [_hcm("inbound_0.0.0.0_80", "AUTO", main_routes, access_log=[log])]}]}
    originate = {"name": "connect_originate", "internal_listener": {}, "filter_chains": [{"filters": [{
        "name": "envoy.filters.network.tcp_proxy", "typed_config": {
            "@type": _T + "filters.network.tcp_proxy.v3.TcpProxy", "stat_prefix": "connect_originate",
            "cluster": "connect_originate", "tunneling_config": {"hostname": f"{server_ip}:{HTTP_PORT}"}}}]}]}

    def static(name: str, endpoint: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"name": name, "type": "STATIC", "connect_timeout": "2s", "load_assignment": {
            "cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}]}, **extra}

    clusters = [
        static("main_internal", _internal("main_internal")),
        static(cluster_name, _internal("connect_originate")),
        static("connect_originate", {"address": _addr(server_ip, HBONE_PORT)},
               typed_extension_protocol_options={"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                   "@type": _T + "upstreams.http.v3.HttpProtocolOptions",
                   "explicit_http_config": {"http2_protocol_options": _H2_WINDOWS}}},
               transport_socket={"name": "envoy.transport_sockets.tls", "typed_config": {
                   "@type": _T + "transport_sockets.tls.v3.UpstreamTlsContext",
                   "common_tls_context": tls_ctx({"exact": server_id})}})]
    admin_host, _, admin_port = ENVOY_ADMIN.rpartition(":")
    return {"admin": {"address": _addr(admin_host, int(admin_port))},
            "bootstrap_extensions": [{"name": "envoy.bootstrap.internal_listener", "typed_config": {
                "@type": _T + "bootstrap.internal_listener.v3.InternalListener"}}],
            "static_resources": {"listeners": [terminate, main, originate], "clusters": clusters}}


def envoy_stat(cluster: Cluster, pod: dict[str, Any], name: str) -> int | None:
    """One counter from Envoy's admin /stats (in its pod's netns)."""
    p = cluster.run(pod, ["curl", "-s", "-m", "3", f"http://{ENVOY_ADMIN}/stats?filter=^{name}$"], timeout=10)
    for line in p.stdout.splitlines():
        k, _, v = line.partition(": ")
        if k == name:
            return int(v)
    return None


# ---- the setups -----------------------------------------------------------------------------

@dataclass
class Bench:
    cluster: Cluster
    workdir: str
    stack: contextlib.ExitStack

    def ztunnels(self) -> dict[str, list[int]]:
        return self.cluster.ztunnel_pids()

    def waypoint_proc(self, pod: str, label: str):
        """() -> {label: the pids in `pod`'s cgroup} (the runner runs a waypoint there)."""
        info = self.cluster.pod(NS, pod)
        return lambda: {label: cgroup_pids(info["cgroup"])}


def setup_ztunnel(b: Bench) -> Target:
    """Pod-addressed traffic: L4 only (ztunnel n1 -> HBONE -> ztunnel n2), the floor under both waypoints."""
    server = b.cluster.pod(NS, "server")
    return Target("ztunnel", b.cluster.pod(NS, "client"), f"{server['ip']}:{HTTP_PORT}",
                  path_pids=b.ztunnels, note="no waypoint (pod IP): the ztunnel hops alone")


def setup_waypoint(b: Bench) -> Target:
    wp = b.waypoint_proc(f"{WAYPOINT}-waypoint", "waypoint")
    return Target("waypoint", b.cluster.pod(NS, "client"), f"{service_vip(b.cluster, 'via-wp')}:{SVC_PORT}",
                  waypoint_pids=wp, path_pids=lambda: b.ztunnels() | wp(),
                  note="our waypoint (python -m waypoint, one process), access log to its log file, metrics on")


def setup_envoy(b: Bench) -> Target:
    """Envoy in its own pod as Gateway envoy-wp's waypoint, with the SVID the runner issued for it."""
    node = b.cluster.pod(NS, f"{WAYPOINT}-waypoint")["node"]
    path = os.path.join(b.workdir, "envoy-pod.yaml")
    with open(path, "w") as f:
        f.write(envoy_pod_yaml(node))
    b.cluster.cli("apply", path)
    pod, server = b.cluster.pod(NS, ENVOY_POD), b.cluster.pod(NS, "server")
    sv = os.path.join(b.cluster.paths.waypoint_dir(NS, ENVOY_GW), "bootstrap")
    server_id = f"spiffe://cluster.local/ns/{NS}/sa/server"
    config = envoy_waypoint_config(pod["ip"], server["ip"], server_id, f"via-envoy.{NS}.svc.cluster.local", sv,
                                   os.path.join(b.workdir, "envoy-access.log"))
    cfg_path = os.path.join(b.workdir, "envoy-waypoint.json")
    with open(cfg_path, "w") as f:
        json.dump(config, f, indent=1)
    log = os.path.join(b.workdir, "envoy-waypoint.log")
    proc = b.cluster.spawn(pod, [envoy_binary(), "-c", cfg_path, "--concurrency", "1", "--disable-hot-restart",
                                 "-l", "warning"], log)
    b.stack.callback(procs.stop, proc)
    deadline = time.monotonic() + 15
    while envoy_stat(b.cluster, pod, "server.live") != 1:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SetupError(f"envoy waypoint did not come up (exit {proc.poll()}):\n{_tail(log)}")
        time.sleep(0.2)
    wp = lambda: {"envoy": [proc.pid]}  # noqa: E731
    return Target("envoy", b.cluster.pod(NS, "client"), f"{service_vip(b.cluster, 'via-envoy')}:{SVC_PORT}",
                  waypoint_pids=wp, path_pids=lambda: b.ztunnels() | wp(), envoy_pod=pod,
                  note="envoy --concurrency 1: connect_terminate -> main_internal (HCM, file access log) -> "
                       "connect_originate (HBONE to the server's ztunnel), Istio's waypoint listeners")


SETUP_FNS = {"ztunnel": setup_ztunnel, "waypoint": setup_waypoint, "envoy": setup_envoy}


def check_served(b: Bench, t: Target) -> None:
    """The L7 proxy itself answered: its access log / request counter grows with a probe."""
    if t.name == "envoy":
        assert t.envoy_pod is not None
        n = envoy_stat(b.cluster, t.envoy_pod, "http.inbound_0.0.0.0_80.downstream_rq_completed")
        if not n:
            raise SetupError(f"envoy waypoint: no completed request in its stats after the probe ({n})")
    elif t.name == "waypoint":
        log = os.path.join(b.cluster.paths.logs_dir, f"waypoint-{NS}-{WAYPOINT}.log")
        with open(log, errors="replace") as f:
            if "ambient.access" not in f.read():
                raise SetupError(f"waypoint: no access-log line in {log} after the probe")


# ---- measurement ----------------------------------------------------------------------------

def wrk(cluster: Cluster, t: Target, conns: int, secs: int, script: str | None = None) -> dict[str, Any]:
    argv = ["wrk", f"-t{WRK_THREADS}", f"-c{conns}", f"-d{secs}s", *(["--latency", "-s", script] if script else []),
            f"http://{t.http}/"]
    p = cluster.run(t.client, argv, timeout=secs + 15)
    if p.returncode != 0:
        raise SetupError(f"{t.name}: wrk failed ({p.returncode}): {p.stdout}{p.stderr}")
    out = parse_wrk(p.stdout)
    m = re.search(r"^\s*(\d+) requests in", p.stdout, re.M)
    out["requests"] = int(m.group(1)) if m else 0
    return out


def _cpu_s(pids: dict[str, list[int]]) -> float:
    return sum(_cpu_ticks(p) for ps in pids.values() for p in ps) / CLK_TCK


def measure_round(cluster: Cluster, t: Target, d: Durations, pace: str) -> dict[str, Any]:
    """Warm-up; -c32 req/s with the waypoint's and the path's CPU/RSS; paced p50/p99."""
    failures: list[str] = []
    try:
        wrk(cluster, t, 32, d.warm)
    except SetupError as e:
        failures.append(f"warm-up: {e}")
    wp_pids, path_pids = t.waypoint_pids(), t.path_pids()
    wp0, path0 = _cpu_s(wp_pids), _cpu_s(path_pids)
    with Sampler(wp_pids) as s_wp:
        try:
            tput = wrk(cluster, t, 32, d.tput)
        except SetupError as e:
            failures.append(f"wrk -c32: {e}")
            tput = {}
    wp_cpu, path_cpu = _cpu_s(wp_pids) - wp0, _cpu_s(path_pids) - path0
    n = tput.get("requests") or 0
    time.sleep(d.pause)
    try:
        lat = wrk(cluster, t, PACED_CONNS, d.lat, script=pace)
    except SetupError as e:
        failures.append(f"wrk paced: {e}")
        lat = {}
    time.sleep(d.pause)
    return {"rps": tput.get("rps"), "p50_ms": lat.get("p50_ms"), "p99_ms": lat.get("p99_ms"),
            "paced_rps": lat.get("rps"),
            "errors": "; ".join(x for x in (tput.get("errors"), lat.get("errors")) if x), "failures": failures,
            "wp_rss_mb": s_wp.max_rss_mb if wp_pids else None,
            "wp_cpu_us": wp_cpu / n * 1e6 if n and wp_pids else None,
            "path_cpu_us": path_cpu / n * 1e6 if n else None,
            "wp_cpu_pct": s_wp.cpu_pct if wp_pids else None, "box_busy_pct": s_wp.box_busy_pct}


# ---- report ---------------------------------------------------------------------------------

KEYS = ("rps", "p50_ms", "p99_ms", "paced_rps", "wp_cpu_us", "path_cpu_us", "wp_cpu_pct", "box_busy_pct")


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Medians per setup (RSS: the maximum), and each metric of ours over Envoy's from the same run."""
    med: dict[str, dict[str, Any]] = {}
    for n, rs in runs.items():
        if not rs:
            continue
        med[n] = {k: _median(rs, k) for k in KEYS}
        rss = [r["wp_rss_mb"] for r in rs if r.get("wp_rss_mb") is not None]
        med[n]["wp_rss_mb"] = max(rss) if rss else None
    env = med.get("envoy", {})
    for n, m in med.items():
        for k in ("rps", "p50_ms", "p99_ms", "wp_rss_mb", "wp_cpu_us"):
            m[f"{k}_x_env"] = m[k] / env[k] if env.get(k) and m.get(k) is not None else None
    return med


COLUMNS = [("setup", None, ""), ("req/s c32", "rps", ".0f"), ("x envoy", "rps_x_env", ".2f"),
           ("p50 ms", "p50_ms", ".3f"), ("x envoy", "p50_ms_x_env", ".2f"),
           ("p99 ms", "p99_ms", ".3f"), ("x envoy", "p99_ms_x_env", ".2f"), ("paced req/s", "paced_rps", ".0f"),
           ("waypoint RSS MB", "wp_rss_mb", ".1f"), ("x envoy", "wp_rss_mb_x_env", ".2f"),
           ("waypoint CPU us/req", "wp_cpu_us", ".1f"), ("x envoy", "wp_cpu_us_x_env", ".2f"),
           ("path CPU us/req", "path_cpu_us", ".1f"), ("waypoint CPU%", "wp_cpu_pct", ".0f"),
           ("box busy%", "box_busy_pct", ".0f")]


def table(med: dict[str, dict[str, Any]], failed: dict[str, str]) -> str:
    rows = [[c[0] for c in COLUMNS]]
    for name in SETUPS:
        if name in med:
            rows.append([name] + ["-" if med[name].get(k) is None else format(med[name][k], f)
                                  for _, k, f in COLUMNS[1:]])
        elif name in failed:
            rows.append([name] + ["FAILED"] + [""] * (len(COLUMNS) - 2))
    w = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    line = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in rows[1:]])


# ---- main -----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 s measurements, 1 round")
    ap.add_argument("--rounds", type=int, help="rounds (medians are reported); default 3, --quick 1")
    ap.add_argument("--secs", type=int, help="seconds per measurement; default 10, --quick 2")
    ap.add_argument("--rate", type=int, default=1000, help="offered req/s for p50/p99 (wrk -c8, paced)")
    ap.add_argument("--setups", default=",".join(SETUPS), help="comma-separated subset of %(default)s")
    ap.add_argument("--cluster", default="bench7", help="local cluster name (created and removed)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args(argv)
    requested = [s for s in a.setups.split(",") if s]
    if not requested or set(requested) - set(SETUPS):
        ap.error(f"--setups: a comma-separated subset of {','.join(SETUPS)}")
    if a.rate <= 0:
        ap.error("--rate must be positive")
    a.setups = [s for s in SETUPS if s in requested]
    a.rounds = a.rounds or (1 if a.quick else 3)
    secs = a.secs or (2 if a.quick else 10)
    a.durations = Durations(warm=1 if a.quick else 2, tput=secs, lat=secs, pause=0.3 if a.quick else 1.0)
    check_cluster_name(a.cluster)
    return a


def preflight(cluster: Cluster) -> None:
    if os.geteuid() != 0:
        sys.exit("bench_l7: must run as root (network namespaces, cgroups, eBPF)")
    missing = [t for t in TOOLS if t != "iperf3" and shutil.which(t) is None]
    if missing:
        sys.exit(f"bench_l7: missing {' '.join(missing)}: run `bash scripts/install.sh`")
    if cluster.running():
        sys.exit(f"bench_l7: cluster {cluster.name!r} is already running; "
                 f"`ambient -c {cluster.name} down` it first or pass --cluster")
    if os.path.exists(cluster.paths.run_dir):
        cluster.cli("down", check=False)  # leftovers of a run that was killed hard


_ERRORS = (SetupError, api.ApiError, OSError, subprocess.TimeoutExpired, StopIteration)


def run(a: argparse.Namespace, stack: contextlib.ExitStack) -> tuple[dict, dict, dict, dict]:
    """Bring the cluster and setups up, measure round-robin; returns runs, failed, idle RSS, notes."""
    cluster = Cluster(a.cluster)
    preflight(cluster)
    workdir = tempfile.mkdtemp(prefix=f"bench-l7-{a.cluster}-")
    stack.callback(print, f"# cleaned up: proxies stopped, cluster {a.cluster!r} down, its CA and {workdir} removed",
                   flush=True)
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    yaml_path = os.path.join(workdir, "cluster.yaml")
    with open(yaml_path, "w") as f:
        f.write(cluster_yaml(workdir))
    pace = os.path.join(workdir, "pace.lua")
    with open(pace, "w") as f:
        f.write(PACE_LUA % {"interval_ms": 1000.0 * WRK_THREADS / a.rate})
    os.chmod(pace, 0o644)
    # Registered before `down`, so it runs after it (LIFO): down keeps a cluster's CA, as it
    # should for users, and this cluster is a throwaway one.
    stack.callback(shutil.rmtree, cluster.paths.state_dir, ignore_errors=True)
    stack.callback(cluster.cli, "down", check=False)
    targets, failed, idle, notes = {}, {}, {}, {}
    runs: dict[str, list[dict[str, Any]]] = {}
    stack.callback(keep_logs, a.out, cluster, workdir, failed, runs)
    print(f"# ambient -c {a.cluster} up", flush=True)
    cluster.cli("up", yaml_path)
    b = Bench(cluster, workdir, stack)
    for name in a.setups:
        try:
            t = SETUP_FNS[name](b)
            probe(cluster, t)
            check_served(b, t)
            check_proxied(cluster, t)
        except _ERRORS as e:
            failed[name] = str(e)
            print(f"# {name}: FAILED to set up: {e}", flush=True)
            continue
        targets[name], notes[name] = t, t.note
        time.sleep(0.5)
        idle[name] = rss_mb(t.waypoint_pids())
        print(f"# {name}: ready via {t.http}, waypoint RSS idle {idle[name]:.1f} MB", flush=True)
    runs.update({n: [] for n in targets})
    for rnd in range(a.rounds):
        for name, t in targets.items():
            if name in failed:
                continue
            try:
                r = measure_round(cluster, t, a.durations, pace)
            except _ERRORS as e:
                failed[name] = f"round {rnd + 1}: {e}"
                print(f"# {name}: FAILED in round {rnd + 1}: {e}", flush=True)
                continue
            runs[name].append(r)
            shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
            print(f"# round {rnd + 1} {name}: {json.dumps(shown)}", flush=True)
    return {n: rs for n, rs in runs.items() if rs and n not in failed}, failed, idle, notes


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    load_before, started = _loadavg(), time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        with contextlib.ExitStack() as stack:
            runs, failed, idle, notes = run(a, stack)
    except SetupError as e:
        print(f"bench_l7: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench_l7: interrupted", file=sys.stderr)
        return 130
    med = summarize(runs)
    d = a.durations
    cond = (f"{started}, commit {_git_rev()}, {os.cpu_count()} cores; cluster {a.cluster!r}: client pod on n1, server "
            f"pod (nginx 1 worker, 100-byte body, keepalive) on n2, both waypoints on the same node, traffic crosses "
            f"the node links; rounds={a.rounds} (medians, interleaved); wrk -t{WRK_THREADS} -c32 -d{d.tput}s "
            f"(req/s, after {d.warm}s warm-up); wrk -t{WRK_THREADS} -c{PACED_CONNS} -d{d.lat}s --latency paced at {a.rate} req/s "
            f"(p50/p99; 'paced req/s' is what it achieved). Path: client -> ztunnel n1 -> HBONE -> waypoint -> HBONE "
            f"-> ztunnel n2 -> nginx; 'ztunnel' row = pod IP, no waypoint. waypoint RSS = max VmRSS of the waypoint "
            f"process under -c32; CPU us/req = its utime+stime over the -c32 requests ('path' adds both ztunnels); "
            f"box busy% = whole machine during -c32. Stats and access log on in both waypoints. "
            f"loadavg before {load_before}, after {_loadavg()}.")
    idle_line = ", ".join(f"{n} {v:.1f} MB" for n, v in idle.items() if v)
    out = [cond, "", table(med, failed), ""]
    if idle_line:
        out.append(f"waypoint RSS idle: {idle_line}")
    errs = {n: [r["errors"] for r in rs if r["errors"]] for n, rs in runs.items()}
    out += [f"wrk errors in {n}: {e}" for n, e in errs.items() if e]
    out += [f"FAILED {n}: {why}" for n, why in failed.items()]
    out += [f"measurement failed in {n} round {i + 1}: {f}" for n, rs in runs.items()
            for i, r in enumerate(rs) for f in r["failures"]]
    text = "\n".join(out)
    print("\n" + text)
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, "bench-l7-" + time.strftime("%Y%m%d-%H%M%S") + ("-quick" if a.quick else ""))
    with open(stem + ".json", "w") as f:
        json.dump({"conditions": cond, "setups": a.setups, "notes": notes, "idle_rss_mb": idle,
                   "summary": med, "runs": runs, "failed": failed}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    print(f"\nwrote {stem}.json and {stem}.md")
    return 1 if failed or any(r["failures"] for rs in runs.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
