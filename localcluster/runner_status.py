"""Readiness and status of a local cluster: what `ambient status`, `apply`'s wait and `exec` read.

A mixin of `Runner` (localcluster/runner.py), which owns the state it reads: the store, the
system workloads, the pods' runtime records and the control plane.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from controlplane.route_status import route_status_dict
from controlplane.translate import enrolled
from localcluster import waypoints
from localcluster.api import ApiError
from mesh.admin_http import get_unix
from mesh.identity import SpiffeId
from mesh.model import Namespace, Pod, PolicyObject, ResourceKey, Service

__all__ = ["RunnerStatus", "READY_TIMEOUT"]

READY_TIMEOUT = 30.0


class RunnerStatus:
    """Status, readiness and pod lookups over a Runner's state (see the module docstring)."""


    async def _dump(self, admin_socket: str | None) -> dict[str, Any] | None:
        if admin_socket is None:
            return None
        try:
            status, body = await get_unix(admin_socket, "/config_dump", timeout=2)
        except (OSError, asyncio.TimeoutError):
            return None
        return json.loads(body) if status == 200 else None

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until every system workload (ztunnels, waypoints) has the current state and every
        container is running."""
        deadline = time.monotonic() + timeout
        while True:
            pending = []
            for replicas in list(self._system.values()):
                for p in (p for p in replicas if p.admin_socket):  # Prometheus has none: not waited for
                    d = await self._dump(p.admin_socket)
                    if d is None or d.get("version", 0) < self.cp.version:
                        pending.append(p.label)
            for rt in self._pods.values():
                if rt.gate is not None:
                    pending.append(f"pod {rt.uid} ({rt.gate.reason.label}: {rt.gate.message})")
                    continue
                for name, c in rt.containers.items():
                    if not c.running:
                        pending.append(f"pod {rt.uid} container {name}")
            if not pending:
                return
            if time.monotonic() > deadline:
                raise ApiError("applied, but not ready after "
                               f"{timeout:.0f}s: {', '.join(pending)} (see {self.paths.logs_dir})", "not_ready")
            await asyncio.sleep(0.05)

    async def status(self) -> dict[str, Any]:
        nss = {n.name: n for n in self.store.of(Namespace)}
        nodes = []
        for na in self.addr.nodes:
            replicas = self._system.get(("ztunnel", na.name), [])
            z = replicas[0] if replicas else None
            dump = await self._dump(z.admin_socket if z else None)
            nodes.append({
                "name": na.name, "ip": str(na.ip), "pod_cidr": str(na.pod_cidr),
                "netns": self.net.node_netns(na.name),
                "ztunnel": {"running": bool(z and z.running), "restarts": z.restarts if z else 0,
                            "pid": z.popen.pid if z and z.popen else None,
                            "workers": len(replicas),
                            "ready": bool(dump and dump.get("synced")),
                            "connected": bool(dump and dump.get("connected")),
                            "version": dump.get("version") if dump else None,
                            "certificates": dump.get("certificates", []) if dump else []},
            })
        pods = []
        for p in self.store.of(Pod):
            uid = f"{p.namespace}/{p.name}"
            rt = self._pods.get(uid)
            cs = rt.containers if rt else {}
            phase = ("Pending" if rt is None or rt.gate is not None
                     else "Running" if not cs or all(c.running for c in cs.values()) else "Failed")
            pods.append({
                "namespace": p.namespace, "name": p.name, "node": p.node_name, "ip": str(p.pod_ip),
                "phase": phase, "restarts": sum(c.restarts for c in cs.values()),
                "reason": rt.gate.reason.label if rt and rt.gate else None,
                "message": rt.gate.message if rt and rt.gate else None,
                "service_account": p.service_account,
                "ambient": enrolled(p, nss.get(p.namespace)),
                "owner": str(owner) if (owner := waypoints.owner_of(p)) is not None else None,
                "netns": rt.net.netns if rt else None, "cgroup": rt.net.cgroup if rt else None,
                "containers": {n: {"running": c.running, "pid": c.popen.pid if c.popen else None,
                                   "restarts": c.restarts, "last_exit": c.last_exit, "log": c.log_path}
                               for n, c in cs.items()},
            })
        waypoint_list, missing = await self._waypoint_status()
        services = [{"namespace": s.namespace, "name": s.name, "cluster_ip": str(s.cluster_ip),
                     "ports": [p.port for p in s.ports]} for s in self.store.of(Service)]
        return {
            "cluster": self.paths.name, "trust_domain": self.settings.trust_domain,
            "control_plane": {"running": self.cp.running, "version": self.cp.version,
                              "socket": self.paths.control_plane_socket, **self.cp.stats},
            "namespaces": [{"name": n.name, "ambient": n.ambient, "labels": n.labels.thaw()}
                           for n in nss.values()],
            "nodes": nodes, "pods": pods, "services": services, "waypoints": waypoint_list,
            "missing_waypoints": missing, "observability": self.obs.status(),
            # Gateway API conditions per HTTPRoute parentRef; VirtualService host resolution.
            "routes": route_status_dict(self.store.objects.values(), trust_domain=self.settings.trust_domain),
            "policies": [str(k) for k in self.store.objects if k.kind not in
                         ("Namespace", "Node", "Pod", "Service", "ServiceAccount")],
            "warnings": {str(k): w for k, w in sorted(self._warnings.items(), key=lambda kv: str(kv[0]))
                         if w and k in self.store.objects},
        }

    async def _waypoint_status(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Each waypoint (placement, process, readiness, who binds to it), and the bindings that
        name a waypoint that does not exist (their traffic is refused)."""
        bound, missing = waypoints.users_of(self.cp.snapshot().resources)
        out = []
        for g in self.store.of(PolicyObject):
            if not waypoints.is_waypoint_gateway(g):
                continue
            target = f"{g.namespace}/{g.name}"
            replicas = self._system.get(("waypoint", target), [])
            proc = replicas[0] if replicas else None
            pod = self.store.get(ResourceKey("Pod", g.namespace, waypoints.pod_name(g.name)))
            dump = await self._dump(proc.admin_socket if proc else None)
            version = dump.get("version") if dump else None
            out.append({
                "namespace": g.namespace, "name": g.name, "pod": waypoints.pod_name(g.name),
                "node": pod.node_name if isinstance(pod, Pod) else None,
                "ip": str(pod.pod_ip) if isinstance(pod, Pod) and pod.pod_ip else None,
                "identity": str(SpiffeId(trust_domain=self.settings.trust_domain, namespace=g.namespace,
                                         service_account=g.name)),
                "running": bool(proc and proc.running), "restarts": proc.restarts if proc else 0,
                "pid": proc.pid if proc and proc.running else None, "last_exit": proc.last_exit if proc else None,
                "ready": bool(dump and dump.get("synced") and (version or 0) >= self.cp.version),
                "connected": bool(dump and dump.get("connected")), "version": version,
                "log": proc.log_path if proc else None,
                "used_by": bound.get(target, waypoints.WaypointUsers()).as_dict(),
            })
        return out, [{"waypoint": uid, "used_by": u.as_dict()} for uid, u in missing.items()]

    def pod_info(self, namespace: str, name: str) -> dict[str, Any]:
        rt = self._pods.get(f"{namespace}/{name}")
        if rt is None:
            raise ApiError(f"no pod {namespace}/{name} (see `ambient status`)", "not_found")
        pod = self.store.get(ResourceKey("Pod", namespace, name))
        workdir = pod.source_dir if isinstance(pod, Pod) else None
        # `kubectl exec` runs in the (first) container's security context.
        contain = self._containment(pod, pod.containers[0] if pod.containers else None) \
            if isinstance(pod, Pod) else None
        return {"netns": rt.net.netns, "netns_path": rt.net.netns_path, "cgroup": rt.net.cgroup,
                "ip": str(rt.ip), "node": rt.node, "workdir": workdir,
                "contain": None if contain is None else
                {"uid": contain.uid, "gid": contain.gid, "hide": list(contain.hide)}}
