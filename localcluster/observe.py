"""Local mode's observability wiring: the scrape endpoint, mesh-health sampling and the optional Prometheus.

The runner owns one `Observability`. It reads (never changes) the runner's system workloads
and pods to list what to scrape (`targets`), samples the mesh's health when Prometheus (or
anyone) GETs `/metrics/mesh`, and hands the runner a Prometheus system workload to supervise
when `ambient up --prometheus` asked for one.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controlplane.server import ControlPlane
from ebpf.capture import pod_links
from localcluster import dashboard, prometheus as prom, waypoints
from localcluster.meshmetrics import CertSample, ControlPlaneSample, Convergence, MeshSample, ProxySample, render
from localcluster.paths import ClusterPaths
from localcluster.scrape import ScrapeServer, ScrapeTarget
from localcluster.system import Proc, SystemWorkload
from mesh.admin_http import Response, get_unix
from mesh.clock import Clock
from mesh.linux import cgroup

__all__ = ["ObserveSettings", "Observability"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ObserveSettings:
    metrics_port: int = 0
    """The scrape endpoint's port on 127.0.0.1 (0: any free port; `ambient status` shows it)."""
    prometheus: bool = False
    """Run Prometheus as a system workload (`ambient up --prometheus`)."""
    prometheus_port: int = prom.DEFAULT_PORT
    scrape_interval: float = 15.0
    """Seconds between scrapes (and rule evaluations)."""


class Observability:
    def __init__(self, paths: ClusterPaths, settings: ObserveSettings, *, cp: ControlPlane,
                 system: Mapping[tuple[str, str], list[Proc]], pods: Mapping[str, Any], clock: Clock) -> None:
        self.paths = paths
        self.settings = settings
        self.cp = cp
        self._system = system
        self._pods = pods
        self.clock = clock
        self.server = ScrapeServer(self.targets, self.mesh_metrics, {
            "/dashboard": lambda _: Response(200, dashboard.PAGE, "text/html; charset=utf-8"),
            "/dashboard/data.json": self._dashboard_data})
        self.convergence = Convergence()
        self._lock = asyncio.Lock()

    @property
    def prometheus_dir(self) -> str:
        return os.path.join(self.paths.run_dir, "prometheus")

    @property
    def prometheus_url(self) -> str | None:
        return f"http://127.0.0.1:{self.settings.prometheus_port}" if self.settings.prometheus else None

    async def start(self) -> None:
        await self.server.start(self.settings.metrics_port)

    def prometheus_workload(self) -> SystemWorkload | None:
        if not self.settings.prometheus:
            return None
        shutil.rmtree(self.prometheus_dir, ignore_errors=True)  # a fresh TSDB per cluster start
        # In the cluster's cgroup tree: `ambient down` kills it even if the runner died.
        cg = cgroup.create(f"{self.paths.prefix}/prometheus")
        return prom.workload(self.prometheus_dir, f"http://{self.server.address}/targets",
                             port=self.settings.prometheus_port, scrape_interval=self.settings.scrape_interval,
                             log_path=os.path.join(self.paths.logs_dir, "prometheus.log"), cgroup=cg)

    async def close(self) -> None:
        """After the runner stopped its processes (Prometheus included): close, remove the TSDB."""
        await self.server.close()
        shutil.rmtree(self.prometheus_dir, ignore_errors=True)

    def status(self) -> dict[str, Any]:
        replicas = self._system.get(("prometheus", "istio-system/prometheus"), [])
        p = replicas[0] if replicas else None
        return {"scrape_endpoint": f"http://{self.server.address}", "targets": len(self.targets()),
                "prometheus": None if p is None else {
                    "url": self.prometheus_url, "running": p.running, "pid": p.pid if p.running else None,
                    "restarts": p.restarts, "log": p.log_path, "data_dir": self.prometheus_dir,
                    "scrape_interval": self.settings.scrape_interval}}

    # -- what to scrape --

    def targets(self) -> list[ScrapeTarget]:
        out = []
        for (kind, target), replicas in list(self._system.items()):
            if kind == "ztunnel":
                pod, ns, node = f"ztunnel-{target}", "istio-system", target
            elif kind == "waypoint":
                ns, gw = target.split("/", 1)
                pod = waypoints.pod_name(gw)
                rt = self._pods.get(f"{ns}/{pod}")
                node = rt.node if rt is not None else ""
            else:
                continue
            for i, p in enumerate(replicas):
                if p.admin_socket:
                    out.append(ScrapeTarget(kind=kind, target=target, replica=i, admin_socket=p.admin_socket,
                                            pid=p.pid if p.running else None, pod=pod, namespace=ns, node=node))
        return sorted(out, key=lambda t: t.path)

    # -- mesh health --

    async def mesh_metrics(self) -> bytes:
        return render(await self._observed(), self.convergence)

    async def _dashboard_data(self, _path: str) -> Response:
        doc = await dashboard.data(self.paths.name, await self._observed(), self.convergence, self.prometheus_url)
        return Response(200, doc)

    async def _observed(self) -> MeshSample:
        async with self._lock:  # one sample at a time: the convergence tracker is stateful
            sample = await self.sample()
            self.convergence.observe(sample)
            return sample

    async def sample(self) -> MeshSample:
        targets = self.targets()
        dumps = await asyncio.gather(*(_dump(t.admin_socket) for t in targets))
        cp = self.cp
        cps = ControlPlaneSample(
            running=cp.running, version=cp.version, subscribed=sum(1 for _, sub in cp.peers() if sub),
            snapshots=cp.stats["snapshots"], pushes=cp.stats["pushes"], certificates=cp.stats["certificates"],
            csr_denied_by_reason=dict(cp.csr_denied_by_reason), version_times=dict(cp.version_times))
        return MeshSample(now=self.clock.now(), control_plane=cps,
                          proxies=tuple(self._proxy_sample(t, d) for t, d in zip(targets, dumps)))

    def _proxy_sample(self, t: ScrapeTarget, d: dict[str, Any] | None) -> ProxySample:
        name = t.pod if t.replica == 0 else f"{t.pod}/{t.replica}"
        if d is None:
            return ProxySample(proxy=name, kind=t.kind, node=t.node, up=False)
        certs = tuple(CertSample(identity=c["identity"], not_after=c.get("not_after"),
                                 fetch_errors=c.get("fetch_errors", 0)) for c in d.get("certificates", []))
        ebpf: tuple[tuple[str, str], ...] = ()
        if t.kind == "ztunnel" and t.replica == 0:  # worker 0 owns capture
            pin_dir = os.path.join(self.paths.bpf_pin_dir, t.target)
            ebpf = tuple((uid, link.split("-", 1)[0]) for uid in d.get("enrolled", [])
                         for link in pod_links(pin_dir, uid))
        return ProxySample(proxy=name, kind=t.kind, node=t.node, up=True, version=d.get("version"),
                           connected=bool(d.get("connected")), last_update_at=d.get("last_update_at"),
                           connect_failures=d.get("client", {}).get("connect_failures", 0), certificates=certs,
                           enroll_failing=tuple(sorted(d.get("enroll_errors", {}))), ebpf=ebpf)


async def _dump(admin_socket: str) -> dict[str, Any] | None:
    try:
        status, body = await get_unix(admin_socket, "/config_dump", timeout=3)
    except (OSError, asyncio.TimeoutError, ValueError, IndexError):
        return None
    return json.loads(body) if status == 200 else None
