"""Policy problems a valid object can still have, reported as Kubernetes Events on it (`kubectl describe`, `kubectl get events`).

The config edge rejects what is malformed (KubeSource reports that, reason InvalidConfig);
these are objects that are well-formed but do not take effect as written (`problems`, pure):
  * TargetNotFound: an AuthorizationPolicy's targetRef names a Service or Gateway that does
    not exist;
  * TargetNotWaypoint: it targets a Gateway that is not an istio-waypoint one;
  * NoWaypoint: it targets a Service that no waypoint serves, so nothing enforces it (a
    targetRefs policy is enforced by the waypoint, never by ztunnel);
  * WaypointNotFound: a Namespace, Service or Pod labelled istio.io/use-waypoint names a
    waypoint that does not exist (the data path refuses that traffic until it does).
`PolicyEvents` recomputes them after every store commit (once every kind is listed: before,
a missing target may only not be listed yet) and posts one Warning Event per new problem;
a problem that goes away and comes back is reported again.
"""
from __future__ import annotations

import asyncio
import datetime
import enum
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from mesh.model import WAYPOINT_LABEL, Namespace, PolicyObject, Pod, Resource, ResourceKey, Service
from mesh.model.policy import AuthorizationPolicy
from mesh.model.workload import BindingSource, WaypointStatus

from ..store import ResourceStore
from ..translate import waypoint_binding, waypoints_of
from .api import ApiError, KubeApi
from .kinds import WATCHED
from .reflector import Delete, Event, Relisted, Upsert
from .source import KubeSource

__all__ = ["ProblemReason", "Problem", "problems", "PolicyEvents"]

log = logging.getLogger("ambient.kube.policy")
_COMPONENT = "ambient-controlplane"
_GW_GROUP = "gateway.networking.k8s.io"


class ProblemReason(enum.Enum):
    TARGET_NOT_FOUND = "TargetNotFound"
    TARGET_NOT_WAYPOINT = "TargetNotWaypoint"
    NO_WAYPOINT = "NoWaypoint"
    WAYPOINT_NOT_FOUND = "WaypointNotFound"


@dataclass(frozen=True, slots=True)
class Problem:
    reason: ProblemReason
    message: str


def problems(resources: Iterable[Resource], *, trust_domain: str = "cluster.local") -> dict[ResourceKey, Problem]:
    objs = list(resources)
    namespaces = {o.name: o for o in objs if isinstance(o, Namespace)}
    services = {(o.namespace, o.name): o for o in objs if isinstance(o, Service)}
    gateways = {(o.namespace, o.name): o for o in objs if isinstance(o, PolicyObject) and o.policy_kind == "Gateway"}
    waypoints = waypoints_of(objs, trust_domain=trust_domain)
    out: dict[ResourceKey, Problem] = {}

    def service_binding(s: Service) -> Any:
        return waypoint_binding(s.labels, s.namespace, namespaces.get(s.namespace), source=BindingSource.SERVICE,
                                waypoints=waypoints)

    for o in objs:
        if isinstance(o, AuthorizationPolicy):
            for t in o.target_refs:
                where = f"targetRef {t.kind} {o.namespace}/{t.name}"
                if t.kind == "Gateway" and t.group in ("", _GW_GROUP):
                    if (o.namespace, t.name) not in gateways:
                        out[o.key] = Problem(ProblemReason.TARGET_NOT_FOUND, f"{where} does not exist")
                    elif (o.namespace, t.name) not in waypoints:
                        out[o.key] = Problem(ProblemReason.TARGET_NOT_WAYPOINT,
                                             f"{where} is not an istio-waypoint Gateway: nothing enforces this policy")
                elif t.kind == "Service":
                    svc = services.get((o.namespace, t.name))
                    if svc is None:
                        out[o.key] = Problem(ProblemReason.TARGET_NOT_FOUND, f"{where} does not exist")
                    elif (b := service_binding(svc)) is None or b.status is not WaypointStatus.BOUND:
                        out[o.key] = Problem(ProblemReason.NO_WAYPOINT,
                                             f"{where} has no waypoint ({WAYPOINT_LABEL} on it or its namespace): "
                                             "a targetRefs policy is enforced only by a waypoint")
                if o.key in out:
                    break
        elif isinstance(o, (Namespace, Service, Pod)) and o.labels.get(WAYPOINT_LABEL) not in (None, "", "none"):
            ns = o.name if isinstance(o, Namespace) else o.namespace
            name = o.labels[WAYPOINT_LABEL]
            wp_ns = o.labels.get("istio.io/use-waypoint-namespace") or ns
            if (wp_ns, name) not in waypoints:
                out[o.key] = Problem(ProblemReason.WAYPOINT_NOT_FOUND,
                                     f"{WAYPOINT_LABEL}={name} names waypoint {wp_ns}/{name}, which does not exist: "
                                     "traffic bound to it is refused until it does")
    return out


_KINDS = {k.kind: k for k in WATCHED}
_REPORTED = {"AuthorizationPolicy", "Namespace", "Service", "Pod"}


class PolicyEvents:
    def __init__(self, api: KubeApi, source: KubeSource, store: ResourceStore, *, trust_domain: str = "cluster.local",
                 now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.timezone.utc)) -> None:
        self.api = api
        self.source = source
        self.store = store
        self.trust_domain = trust_domain
        self.now = now
        self.current: dict[ResourceKey, Problem] = {}
        self.posted = 0
        self._scheduled = False
        self._side: set[asyncio.Task[None]] = set()
        self._unwatch: Callable[[], None] | None = None
        self._uids: dict[ResourceKey, tuple[str, str]] = {}
        """(uid, resourceVersion) of the objects an Event may be about, from the watches: the
        uid makes `kubectl describe` show the Event with its object."""
        source.listeners.append(self._on_event)

    def _on_event(self, ev: Event) -> None:
        if ev.kind.kind not in _REPORTED:
            return
        if isinstance(ev, Relisted):
            for d in ev.deletes:
                self._uids.pop(d.key, None)
            for u in ev.upserts:
                self._remember(u)
        elif isinstance(ev, Upsert):
            self._remember(ev)
        elif isinstance(ev, Delete):
            self._uids.pop(ev.key, None)

    def _remember(self, ev: Upsert) -> None:
        meta = ev.obj.get("metadata") or {}
        self._uids[ev.key] = (str(meta.get("uid") or ""), str(meta.get("resourceVersion") or ""))

    def start(self) -> None:
        self._unwatch = self.store.watch(lambda _objs: self._schedule())

    async def stop(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
        for t in self._side:
            t.cancel()
        await asyncio.gather(*self._side, return_exceptions=True)

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._check)

    def _check(self) -> None:
        self._scheduled = False
        if not all(r.synced.is_set() for r in self.source.reflectors):
            return
        found = problems(self.store.objects.values(), trust_domain=self.trust_domain)
        for key, p in found.items():
            if self.current.get(key) != p:
                log.warning("%s: %s: %s", key, p.reason.value, p.message)
                task = asyncio.get_running_loop().create_task(self._post(key, p))
                self._side.add(task)
                task.add_done_callback(self._side.discard)
        self.current = found

    async def _post(self, key: ResourceKey, p: Problem) -> None:
        kind = _KINDS[key.kind]
        ns = key.namespace or "default"  # events about cluster-scoped objects live in default
        stamp = self.now().strftime("%Y-%m-%dT%H:%M:%SZ")
        uid, rv = self._uids.get(key, ("", ""))
        try:
            await self.api.create_event(ns, {
                "apiVersion": "v1", "kind": "Event", "metadata": {"generateName": f"{key.name}.", "namespace": ns},
                "involvedObject": {"apiVersion": kind.api_version, "kind": key.kind, "name": key.name,
                                   "namespace": key.namespace or None, "uid": uid or None,
                                   "resourceVersion": rv or None},
                "reason": p.reason.value, "message": p.message[:1024], "type": "Warning",
                "source": {"component": _COMPONENT}, "reportingComponent": _COMPONENT,
                "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1})
            self.posted += 1
        except ApiError as e:  # reporting must never take the control plane down
            log.info("could not record an Event for %s: %s", key, e)
