"""The waypoint controller (Kubernetes mode): deploys each istio-waypoint Gateway and writes Gateway/HTTPRoute status.

Theory of operation: it keeps the raw API objects it decides from — Gateways, HTTPRoutes,
Services and ServiceAccounts as the KubeSource's watches deliver them (its `listeners`), and
the Deployments it made through a watch of its own (labelSelector gateway.istio.io/managed) —
and after every burst of events, once all of them are listed, reconciles everything (the
first pass also applies the istio-waypoint GatewayClass and marks it Accepted, as istiod does):
  * `waypoint_objects.plan` per Gateway says what to write: a missing object is created (a
    409 means the cache lagged: never a takeover of someone else's object), an owned one that
    drifted is server-side applied (field manager `ambient-controlplane`, the resourceVersion
    it was judged on as a precondition); a user's edit of a field it manages, or a deleted Deployment, is put back
    by the next pass. Deletion is the garbage collector's: every object carries an
    ownerReference to its Gateway, so deleting the Gateway deletes them.
  * `gateway_status` / `route_status` give the status; a status that differs from the object's
    is written through the status subresource (merge patch with the resourceVersion it was
    computed from: a 409 means a newer object is on its way, which triggers the next pass).
A pass that failed (for one Gateway or altogether) is retried with backoff
(passes.run_passes, reflector.backoff_delay) on a timer, while new events still get their pass at once.
"""
from __future__ import annotations

import asyncio
import datetime
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any

from mesh.model import ResourceKey
from mesh.model.workload import WAYPOINT_CLASS

from .api import ApiError, KubeApi
from .gateway_status import Reason, ServiceFacts, condition, gateway_status, route_info, route_status
from .kinds import WAYPOINT_DEPLOYMENTS
from .passes import run_passes
from .reflector import Delete, Event, Reflector, Relisted, Upsert
from .source import KubeSource
from .waypoint_objects import (MANAGED_LABEL, MANAGED_VALUE, GatewayInfo, WaypointOptions, gateway_class, gateway_info,
                               plan)

__all__ = ["WaypointController", "DEPLOYMENTS", "FIELD_MANAGER"]

log = logging.getLogger("ambient.kube.waypoints")
FIELD_MANAGER = "ambient-controlplane"
DEPLOYMENTS = WAYPOINT_DEPLOYMENTS
assert DEPLOYMENTS.label_selector == f"{MANAGED_LABEL}={MANAGED_VALUE}"  # the label the objects carry
_FROM_SOURCE = ("Gateway", "HTTPRoute", "Service", "ServiceAccount")
_PATHS = {"ServiceAccount": ("/api/v1", "serviceaccounts"), "Service": ("/api/v1", "services"),
          "Deployment": ("/apis/apps/v1", "deployments"),
          "Gateway": ("/apis/gateway.networking.k8s.io/v1", "gateways"),
          "HTTPRoute": ("/apis/gateway.networking.k8s.io/v1", "httproutes")}


def object_path(kind: str, namespace: str, name: str) -> str:
    base, plural = _PATHS[kind]
    return f"{base}/namespaces/{namespace}/{plural}/{name}"


def _service_facts(obj: Mapping[str, Any]) -> ServiceFacts:
    spec = obj.get("spec") or {}
    ip = spec.get("clusterIP")
    return ServiceFacts(cluster_ip=ip if ip not in (None, "", "None") else None,
                        ports=frozenset(p["port"] for p in spec.get("ports") or () if isinstance(p.get("port"), int)))


def _stamp(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


class WaypointController:
    def __init__(self, api: KubeApi, source: KubeSource, *, options: WaypointOptions = WaypointOptions(),
                 now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.timezone.utc),
                 jitter: Callable[[], float] = random.random, watch_timeout: int = 290) -> None:
        self.api = api
        self.source = source
        self.options = options
        self.now = now
        self.jitter = jitter
        self.raw: dict[str, dict[ResourceKey, Mapping[str, Any]]] = {k: {} for k in (*_FROM_SOURCE, "Deployment")}
        self.deployments = Reflector(api, DEPLOYMENTS, self._on_event, jitter=jitter, watch_timeout=watch_timeout)
        self._synced = [r.synced for r in source.reflectors if r.kind.kind in _FROM_SOURCE] + [self.deployments.synced]
        self.stats = {"passes": 0, "applies": 0, "status_writes": 0, "conflicts": 0, "errors": 0}
        self.conflicts: dict[ResourceKey, tuple[str, ...]] = {}
        """Gateways whose objects' names are taken by someone else's objects."""
        self.failed: dict[ResourceKey, str] = {}
        """Gateways whose objects the API server refused in the last pass, with why."""
        self._dirty = asyncio.Event()
        self._class_done = False
        self._tasks: list[asyncio.Task[None]] = []
        source.listeners.append(self._on_event)

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self.deployments.run(), name="kube-watch-Deployment"),
                       asyncio.create_task(self._loop(), name="waypoint-controller")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def _on_event(self, ev: Event) -> None:
        cache = self.raw.get(ev.kind.kind)
        if cache is None:
            return
        if isinstance(ev, Relisted):
            for d in ev.deletes:
                cache.pop(d.key, None)
            for u in ev.upserts:
                cache[u.key] = u.obj
        elif isinstance(ev, Upsert):
            cache[ev.key] = ev.obj
        elif isinstance(ev, Delete):
            cache.pop(ev.key, None)
        self._dirty.set()

    async def _loop(self) -> None:
        await run_passes(synced=self._synced, dirty=self._dirty, reconcile=self.reconcile, ok=lambda: not self.failed,
                         on_failure=self._count_failure, jitter=self.jitter, what="waypoint reconcile", log=log)

    def _count_failure(self) -> None:
        self.stats["errors"] += 1

    # -- one pass --

    async def _ensure_class(self, now: str) -> None:
        """Apply the istio-waypoint GatewayClass and mark it Accepted, once per start."""
        path = f"{_PATHS['Gateway'][0]}/gatewayclasses/{WAYPOINT_CLASS}"
        try:
            out = await self.api.apply(path, gateway_class(), field_manager=FIELD_MANAGER)
            meta = out.get("metadata") or {}
            prev = (out.get("status") or {}).get("conditions") or ()
            st = {"conditions": [condition("Accepted", True, Reason.ACCEPTED, "Handled by the ambient control plane",
                                           int(meta.get("generation") or 0), now, prev)]}
            if (out.get("status") or {}).get("conditions") != st["conditions"]:
                await self.api.merge_patch(path + "/status", {"status": st})
        except ApiError as e:
            if e.status != 404:
                raise
            log.info("GatewayClass is not served (Gateway API CRDs not installed?): not created")
        self._class_done = True

    async def reconcile(self) -> None:
        self.stats["passes"] += 1
        now = _stamp(self.now())
        if not self._class_done:
            await self._ensure_class(now)
        gateways = {(k.namespace, k.name): gateway_info(o) for k, o in self.raw["Gateway"].items()}
        services = {(k.namespace, k.name): _service_facts(o) for k, o in self.raw["Service"].items()}
        conflicts: dict[ResourceKey, tuple[str, ...]] = {}
        failed: dict[ResourceKey, str] = {}
        for (ns, name), gw in sorted(gateways.items()):
            existing = {kind: self.raw[kind].get(ResourceKey(kind, ns, name))
                        for kind in ("ServiceAccount", "Deployment", "Service")}
            p = plan(gw, existing, self.options)
            if p.conflicts:
                conflicts[ResourceKey("Gateway", ns, name)] = p.conflicts
            try:
                for obj in p.apply:
                    await self._apply(obj, existing[obj["kind"]])
            except ApiError as e:  # one Gateway's failure must not hold back the others' or any status
                log.warning("Gateway %s/%s: applying its objects failed: %s", ns, name, e)
                failed[ResourceKey("Gateway", ns, name)] = str(e)
        for k, c in conflicts.items():
            if self.conflicts.get(k) != c:
                log.warning("Gateway %s/%s: %s not owned by it; not touched", k.namespace, k.name, ", ".join(c))
        self.conflicts = conflicts
        self.failed = failed
        attached: dict[tuple[str, str], dict[str, int]] = {}
        for key, obj in list(self.raw["HTTPRoute"].items()):
            await self._route(key, obj, services, gateways, attached, now)
        for key, obj in list(self.raw["Gateway"].items()):
            gw = gateways[(key.namespace, key.name)]
            if gw.is_waypoint and not gw.deleting:
                st = gateway_status(gw, services.get((gw.namespace, gw.name)), conflicts=conflicts.get(key, ()),
                                    apply_error=failed.get(key),
                                    attached_routes=attached.get((gw.namespace, gw.name), {}),
                                    previous=obj.get("status"), now=now)
                await self._write_status(key, obj, st)

    async def _route(self, key: ResourceKey, obj: Mapping[str, Any], services: Mapping[tuple[str, str], ServiceFacts],
                     gateways: Mapping[tuple[str, str], GatewayInfo], attached: dict[tuple[str, str], dict[str, int]],
                     now: str) -> None:
        r = route_info(obj)
        errors = self.source.rejected.get(key)
        rejected = "; ".join(str(e) for e in errors) if errors else None
        st = route_status(r, rejected=rejected, services=services, gateways=gateways, previous=obj.get("status"),
                          now=now)
        for parent in r.parents:
            gw = gateways.get((parent.namespace, parent.name))
            if parent.kind != "Gateway" or gw is None or not gw.is_waypoint or rejected:
                continue
            counts = attached.setdefault((gw.namespace, gw.name), {})
            for x in gw.listeners:
                if parent.section_name in (None, x.name) and parent.port in (None, x.port):
                    counts[x.name] = counts.get(x.name, 0) + 1
        await self._write_status(key, obj, st)

    async def _apply(self, obj: Mapping[str, Any], existing: Mapping[str, Any] | None) -> None:
        """Create what the cache says is missing (409: it is not, the cache lags: the watch
        brings it and the next pass decides, so a user's object of that name is never taken
        over); update what is ours by server-side apply, with the resourceVersion it was judged
        on as a precondition (a 409 if it changed or was replaced meanwhile)."""
        meta = obj["metadata"]
        path = object_path(obj["kind"], meta["namespace"], meta["name"])
        try:
            if existing is None:
                out = await self.api.request_json("POST", path.rsplit("/", 1)[0], body=dict(obj))
            else:
                rv = (existing.get("metadata") or {}).get("resourceVersion")
                out = await self.api.apply(path, {**obj, "metadata": {**meta, "resourceVersion": rv}},
                                           field_manager=FIELD_MANAGER)
        except ApiError as e:
            if e.status != 409:
                raise
            log.info("%s %s/%s changed under us (%s): decided again on the next event", obj["kind"],
                     meta["namespace"], meta["name"], e.reason)
            return
        self.stats["applies"] += 1
        log.info("%s %s %s/%s for its Gateway", "created" if existing is None else "applied", obj["kind"],
                 meta["namespace"], meta["name"])
        # What the server holds now, so a pass before the watch event does not apply it again.
        self.raw[obj["kind"]][ResourceKey(obj["kind"], meta["namespace"], meta["name"])] = out

    async def _write_status(self, key: ResourceKey, obj: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        prev = obj.get("status") or {}
        if all(prev.get(k) == v for k, v in status.items()):
            return
        meta = obj.get("metadata") or {}
        try:
            out = await self.api.merge_patch(
                object_path(key.kind, key.namespace, key.name) + "/status",
                {"metadata": {"resourceVersion": meta.get("resourceVersion")}, "status": dict(status)})
        except ApiError as e:
            if e.status in (404, 409):  # deleted, or changed since: the watch brings the news, and a pass
                self.stats["conflicts"] += 1
                return
            raise
        self.stats["status_writes"] += 1
        self.raw[key.kind][key] = out
