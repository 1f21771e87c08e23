"""The mesh dashboard: one self-contained page on the runner's 127.0.0.1 endpoint, refreshed from a JSON document.

`GET /dashboard` is static HTML with inline script and style (nothing fetched from anywhere
else); it polls `GET /dashboard/data.json` every two seconds and renders, with textContent only
(no markup from data), four panels:

    control plane  version, subscribed proxies, pushes, mean convergence time, certificates
    proxies        each ztunnel / waypoint: up, connected, config version, soonest cert expiry
    services       `ambient stat svc` rows (success, RPS, p50/p95/p99, TCP conn/s) from Prometheus
    edges          `ambient edges` rows: who talks to whom, identities, mTLS

`data(...)` builds the document from one mesh sample and, when the cluster runs Prometheus, the
same PromQL `ambient stat` uses (so page, CLI and Prometheus agree).
"""
from __future__ import annotations

import asyncio
from typing import Any

from localcluster import prometheus, stat
from localcluster.meshmetrics import Convergence, MeshSample

__all__ = ["PAGE", "data"]


def _proxy_rows(s: MeshSample) -> list[dict[str, Any]]:
    out = []
    for p in s.proxies:
        expiries = [c.not_after - s.now for c in p.certificates if c.not_after is not None]
        out.append({"proxy": p.proxy, "kind": p.kind, "node": p.node, "up": p.up, "connected": p.connected,
                    "version": p.version, "cert_expiry_seconds": min(expiries) if expiries else None,
                    "ebpf_links": len(p.ebpf)})
    return out


def _query_all(url: str, window: str, at: float) -> dict[str, Any]:
    q = stat.stat_queries("svc", namespace=None, name=None, src=None, window=window)
    qs = {"rps": q.rps, "ok": q.ok, **dict(q.latency), **({"tcp": q.tcp} if q.tcp else {})}
    services = stat.rows(q, {k: prometheus.query(url, v, at=at) for k, v in qs.items()})
    tq, hq = stat.edge_query(namespace=None, window="5m")
    return {"services": services, "edges": stat.edges(prometheus.query(url, tq, at=at),
                                                      prometheus.query(url, hq, at=at))}


async def data(cluster: str, sample: MeshSample, convergence: Convergence, prometheus_url: str | None,
               *, window: str = "1m") -> dict[str, Any]:
    cp = sample.control_plane
    doc: dict[str, Any] = {
        "cluster": cluster, "time": sample.now, "window": window, "prometheus": prometheus_url,
        "control_plane": {"running": cp.running, "version": cp.version, "subscribed": cp.subscribed,
                          "pushes": cp.pushes, "certificates": cp.certificates,
                          "convergence_mean_seconds": convergence.sum / convergence.count if convergence.count else None},
        "proxies": _proxy_rows(sample), "services": [], "edges": [], "error": None}
    if prometheus_url is not None:
        try:  # blocking HTTP to 127.0.0.1: off the runner's loop
            doc.update(await asyncio.to_thread(_query_all, prometheus_url, window, sample.now))
        except prometheus.PrometheusError as e:
            doc["error"] = str(e)
    return doc


PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ambient mesh</title>
<style>
 body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
 h1{font-size:1.3em} h2{font-size:1.05em;margin-top:1.4em}
 table{border-collapse:collapse;min-width:40em} th,td{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:left}
 th{background:#f3f3f3} .bad{color:#b00020;font-weight:600} .ok{color:#0a7d32} #error{color:#b00020}
</style></head>
<body>
<h1>ambient mesh <span id="cluster"></span></h1>
<div id="updated">loading...</div><div id="error"></div>
<h2>Control plane</h2><table id="cp"><tbody></tbody></table>
<h2>Proxies</h2>
<table id="proxies"><thead><tr><th>PROXY</th><th>KIND</th><th>NODE</th><th>UP</th><th>CONNECTED</th>
<th>VERSION</th><th>CERT EXPIRES IN</th><th>EBPF LINKS</th></tr></thead><tbody></tbody></table>
<h2>Services <small id="window"></small></h2>
<table id="services"><thead><tr><th>SERVICE</th><th>SUCCESS</th><th>RPS</th><th>P50</th><th>P95</th><th>P99</th>
<th>TCP CONN/S</th></tr></thead><tbody></tbody></table>
<h2>Edges (5m)</h2>
<table id="edges"><thead><tr><th>SRC</th><th>DST</th><th>SRC IDENTITY</th><th>DST IDENTITY</th><th>SECURED</th>
<th>CONNECTIONS</th><th>REQUESTS</th></tr></thead><tbody></tbody></table>
<script>
"use strict";
function num(v, d, suffix) { return v === null || v === undefined ? "-" : v.toFixed(d) + (suffix || ""); }
function ms(v) { return v === null || v === undefined ? "-" : (v < 10 ? v.toFixed(1) : v.toFixed(0)) + "ms"; }
function dur(s) {
  if (s === null || s === undefined) return "-";
  if (s < 0) return "EXPIRED";
  return s >= 3600 ? (s / 3600).toFixed(1) + "h" : s >= 60 ? (s / 60).toFixed(0) + "m" : s.toFixed(0) + "s";
}
function fill(id, rows, key) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement("tr");
    if (key !== undefined) tr.dataset.name = key(r);
    for (const c of r.cells) {
      const td = document.createElement("td");
      td.textContent = c[0];
      if (c[1]) td.className = c[1];
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
}
function render(d) {
  document.getElementById("cluster").textContent = d.cluster;
  document.getElementById("window").textContent = "(" + d.window + ")";
  document.getElementById("updated").textContent = "updated " + new Date(d.time * 1000).toISOString() +
    (d.prometheus ? "" : " - no Prometheus: start the cluster with ambient up --prometheus");
  document.getElementById("error").textContent = d.error || "";
  const cp = d.control_plane;
  fill("cp", [["running", cp.running ? "yes" : "NO"], ["config version", String(cp.version)],
              ["subscribed proxies", String(cp.subscribed)], ["pushes", String(cp.pushes)],
              ["mean convergence", cp.convergence_mean_seconds === null ? "-" : (cp.convergence_mean_seconds * 1000).toFixed(1) + "ms"],
              ["certificates signed", String(cp.certificates)]].map(x => ({cells: [[x[0]], [x[1]]], name: x[0]})),
       r => r.name);
  fill("proxies", d.proxies.map(p => ({name: p.proxy, cells: [[p.proxy], [p.kind], [p.node],
       [p.up ? "up" : "DOWN", p.up ? "ok" : "bad"], [p.connected ? "yes" : "no", p.connected ? "ok" : "bad"],
       [p.version === null ? "-" : "v" + p.version, p.version === cp.version ? "ok" : "bad"],
       [dur(p.cert_expiry_seconds)], [String(p.ebpf_links)]]})), r => r.name);
  fill("services", d.services.map(s => ({name: s.name, cells: [[s.name],
       [s.success === null ? "-" : (s.success * 100).toFixed(2) + "%", s.success !== null && s.success < 0.95 ? "bad" : ""],
       [num(s.rps, 2)], [ms(s.latency_ms_p50)], [ms(s.latency_ms_p95)], [ms(s.latency_ms_p99)],
       [num(s.tcp_connections_per_second, 2)]]})), r => r.name);
  fill("edges", d.edges.map(e => ({name: e.src + " -> " + e.dst, cells: [[e.src], [e.dst],
       [e.source_principal.replace("spiffe://", "")], [e.destination_principal.replace("spiffe://", "")],
       [e.mtls ? "mTLS" : "plaintext", e.mtls ? "ok" : "bad"], [e.connections.toFixed(0)], [e.requests.toFixed(0)]]})),
       r => r.name);
}
async function refresh() {
  try {
    const r = await fetch("/dashboard/data.json", {cache: "no-store"});
    if (!r.ok) throw new Error("data.json: " + r.status);
    render(await r.json());
  } catch (e) {
    document.getElementById("error").textContent = String(e);
  }
  setTimeout(refresh, 2000);
}
refresh();
</script>
</body></html>
"""
