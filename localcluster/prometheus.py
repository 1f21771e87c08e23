"""Local mode's Prometheus: its config (the scrape endpoint's HTTP SD, 127.0.0.1 only), golden-signal rules, process, queries.

`ambient up --prometheus` runs Debian's `prometheus` (installed by scripts/install.sh, its own
service never started) as a system workload of the runner, like istio-system's Prometheus
addon: `--web.listen-address 127.0.0.1:<port>`, config and TSDB under
`<run dir>/prometheus/` (removed with the cluster). It discovers every proxy from the runner's
scrape endpoint (`http_sd_configs` on `/targets`, refreshed every few seconds, so nodes and
waypoints that come and go are picked up) and keeps only 127.0.0.1 targets: a Prometheus of the
mesh never sends a packet off the host. The recording rules give the golden signals (traffic,
errors, latency, saturation) per service, workload and proxy.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import yaml

from localcluster.system import ProcSpec, SystemWorkload

__all__ = ["PROMETHEUS", "PrometheusError", "config", "recording_rules", "write_files", "workload",
           "wait_ready", "query", "check_port", "DEFAULT_PORT"]

PROMETHEUS = "/usr/bin/prometheus"
DEFAULT_PORT = 9090
_SD_REFRESH = "2s"
_WINDOW = "1m"


class PrometheusError(Exception):
    """Prometheus is missing, not answering, or refused a query; `reason` is stable."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _interval(seconds: float) -> str:
    return f"{int(seconds * 1000)}ms"


def config(sd_url: str, *, scrape_interval: float, rules_file: str) -> dict[str, Any]:
    """prometheus.yml: one job over HTTP SD; targets that are not on 127.0.0.1 are dropped."""
    iv = _interval(scrape_interval)
    return {
        "global": {"scrape_interval": iv, "evaluation_interval": iv,
                   "scrape_timeout": _interval(min(scrape_interval, 10.0))},
        "rule_files": [rules_file],
        "scrape_configs": [{
            "job_name": "ambient",
            "http_sd_configs": [{"url": sd_url, "refresh_interval": _SD_REFRESH}],
            "relabel_configs": [{"source_labels": ["__address__"], "regex": r"127\.0\.0\.1:[0-9]+",
                                 "action": "keep"}],
        }],
    }


def _q(expr: str, record: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"record": record, "expr": expr, **({"labels": labels} if labels else {})}


def recording_rules(window: str = _WINDOW) -> dict[str, Any]:
    """The golden signals, `level:metric:operations` as Prometheus' naming guide has it."""
    w = window
    by_svc = "reporter, destination_service"
    by_wl = "reporter, destination_workload, destination_workload_namespace"
    edge = ("reporter, source_workload, source_workload_namespace, destination_workload, "
            "destination_workload_namespace, destination_service, connection_security_policy")
    rules = [
        # traffic and errors
        _q(f"sum by ({edge}, response_code) (rate(istio_requests_total[{w}]))", f"edge:istio_requests:rate{w}"),
        _q(f"sum by ({by_svc}) (rate(istio_requests_total[{w}]))", f"service:istio_requests:rate{w}"),
        _q(f'sum by ({by_svc}) (rate(istio_requests_total{{response_code=~"5.."}}[{w}]))',
           f"service:istio_requests_5xx:rate{w}"),
        _q(f'sum by ({by_svc}) (rate(istio_requests_total{{response_code!~"5.."}}[{w}])) / '
           f"sum by ({by_svc}) (rate(istio_requests_total[{w}]))", f"service:istio_requests:success_ratio{w}"),
        _q(f"sum by ({by_wl}) (rate(istio_requests_total[{w}]))", f"workload:istio_requests:rate{w}"),
        _q(f'sum by ({by_wl}) (rate(istio_requests_total{{response_code!~"5.."}}[{w}])) / '
           f"sum by ({by_wl}) (rate(istio_requests_total[{w}]))", f"workload:istio_requests:success_ratio{w}"),
        # TCP traffic
        _q(f"sum by ({edge}) (rate(istio_tcp_connections_opened_total[{w}]))",
           f"edge:istio_tcp_connections_opened:rate{w}"),
        _q(f"sum by ({edge}) (rate(istio_tcp_sent_bytes_total[{w}]))", f"edge:istio_tcp_sent_bytes:rate{w}"),
        _q(f"sum by ({edge}) (rate(istio_tcp_received_bytes_total[{w}]))", f"edge:istio_tcp_received_bytes:rate{w}"),
        # saturation of the proxies themselves
        _q(f"sum by (pod, app) (rate(process_cpu_seconds_total[{w}]))", f"proxy:process_cpu_seconds:rate{w}"),
        _q("sum by (pod, app) (process_resident_memory_bytes)", "proxy:process_resident_memory_bytes:sum"),
        # errors by reason, from every source that has a reason label
        _q(f"sum by (reason) (rate(ztunnel_inbound_rejected_total[{w}]))", f"mesh:errors_by_reason:rate{w}",
           {"source": "ztunnel_inbound"}),
        _q(f"sum by (reason) (rate(ztunnel_outbound_refused_total[{w}]))", f"mesh:errors_by_reason:rate{w}",
           {"source": "ztunnel_outbound"}),
        _q(f"sum by (reason) (rate(ambient_mesh_errors_total[{w}]))", f"mesh:errors_by_reason:rate{w}",
           {"source": "mesh"}),
    ]
    for q in ("0.5", "0.95", "0.99"):
        p = f"p{int(float(q) * 100)}"
        rules.append(_q(f"histogram_quantile({q}, sum by (le, {by_svc}) "
                        f"(rate(istio_request_duration_milliseconds_bucket[{w}])))",
                        f"service:istio_request_duration_milliseconds:{p}_{w}"))
        rules.append(_q(f"histogram_quantile({q}, sum by (le, {by_wl}) "
                        f"(rate(istio_request_duration_milliseconds_bucket[{w}])))",
                        f"workload:istio_request_duration_milliseconds:{p}_{w}"))
    return {"groups": [{"name": "ambient-golden-signals", "rules": rules}]}


def write_files(directory: str, sd_url: str, *, scrape_interval: float) -> str:
    """Write prometheus.yml and rules.yml into `directory`; returns the config path."""
    os.makedirs(os.path.join(directory, "data"), mode=0o700, exist_ok=True)
    rules = os.path.join(directory, "rules.yml")
    with open(rules, "w") as f:
        yaml.safe_dump(recording_rules(), f, sort_keys=False)
    path = os.path.join(directory, "prometheus.yml")
    with open(path, "w") as f:
        yaml.safe_dump(config(sd_url, scrape_interval=scrape_interval, rules_file=rules), f, sort_keys=False)
    return path


def check_port(port: int) -> None:
    """Fail now, with a reason, rather than restart a Prometheus that cannot bind forever."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise PrometheusError(f"cannot run Prometheus on 127.0.0.1:{port}: {e.strerror}; "
                                  "pick another --prometheus-port", "port_in_use") from None


def workload(directory: str, sd_url: str, *, port: int, scrape_interval: float, log_path: str,
             cgroup: str | None = None, binary: str = PROMETHEUS) -> SystemWorkload:
    """The Prometheus system workload (`istio-system/prometheus`): host netns, 127.0.0.1:`port`."""
    if shutil.which(binary) is None:
        raise PrometheusError(f"{binary} not found: run scripts/install.sh (apt package prometheus)",
                              "prometheus_missing")
    check_port(port)
    cfg = write_files(directory, sd_url, scrape_interval=scrape_interval)
    argv = (binary, f"--config.file={cfg}", f"--storage.tsdb.path={os.path.join(directory, 'data')}",
            f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=6h",
            "--log.level=warn")
    spec = ProcSpec(argv=argv, netns=None, cgroup=cgroup, log_path=log_path, label="prometheus",
                    env=(("PATH", "/usr/bin:/bin"), ("HOME", directory)))
    return SystemWorkload(kind="prometheus", target="istio-system/prometheus", replicas=(spec,))


def _check_local(url: str) -> None:
    host = urllib.parse.urlsplit(url).hostname
    if host != "127.0.0.1":
        raise PrometheusError(f"refusing to query {url}: only 127.0.0.1", "not_local")


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""No proxy from the environment: a query goes to 127.0.0.1 and nowhere else."""


def _get(url: str, timeout: float) -> bytes:
    _check_local(url)
    with _OPENER.open(url, timeout=timeout) as r:
        return r.read()


def wait_ready(url: str, timeout: float = 60.0) -> None:
    """Until Prometheus answers /-/ready (it replays its WAL first) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            _get(url.rstrip("/") + "/-/ready", 2.0)
            return
        except OSError as e:
            last = e
        time.sleep(0.2)
    raise PrometheusError(f"Prometheus at {url} not ready after {timeout:.0f}s: {last}", "prometheus_not_ready")


def query(url: str, promql: str, *, at: float | None = None, timeout: float = 10.0) -> list[dict[str, Any]]:
    """An instant query: the `result` list of /api/v1/query (vector samples)."""
    params = {"query": promql, **({"time": f"{at:.3f}"} if at is not None else {})}
    try:
        body = _get(url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode(params), timeout)
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        raise PrometheusError(f"Prometheus refused {promql!r}: {detail}", "bad_query") from None
    except OSError as e:
        raise PrometheusError(f"Prometheus at {url} not reachable: {e}", "prometheus_unavailable") from None
    doc = json.loads(body)
    if doc.get("status") != "success":
        raise PrometheusError(f"Prometheus: {doc.get('error')}", "bad_query")
    return doc["data"]["result"]


if __name__ == "__main__":  # print the files, e.g. for promtool: python -m localcluster.prometheus DIR
    print(write_files(sys.argv[1], "http://127.0.0.1:1/targets", scrape_interval=15.0))
