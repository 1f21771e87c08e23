"""The root publisher (Kubernetes mode): ConfigMap istio-ca-root-cert, the mesh's root, in every namespace.

Theory of operation: as istiod's namespace controller does, it keeps the ConfigMap
`istio-ca-root-cert` (key `root-cert.pem`) in each namespace, so that waypoint Deployments
and workloads can mount the root that verifies the control plane. It decides from two caches:
the Namespaces the KubeSource watches (its `listeners`), and the root ConfigMaps through a
watch of its own, cluster-wide with fieldSelector metadata.name=istio-ca-root-cert (RBAC
grants that list and watch by resourceName, so the control plane reads no other ConfigMap).
After every burst of events, once both are listed, `plan` (pure) says which namespaces need
a write: a missing ConfigMap is created, one whose root-cert.pem differs (a user's edit, an
older root) is replaced, with the resourceVersion it was judged on (ca_secret.publish_root:
a 409 reads it fresh). A deleted or edited ConfigMap is so put back by the pass its watch
event triggers.

Skipped: a namespace being deleted (phase Terminating or a deletionTimestamp: a create there
is refused with 403, and the namespace controller is removing its content), and the
cluster's own kube-system, kube-public and kube-node-lease, where no mesh workload runs
(istiod writes every namespace its discovery selectors admit; this mesh has no discovery
selectors). A pass whose writes failed is retried with backoff (passes.run_passes, reflector.backoff_delay) on
a timer; new events still get their pass at once, and a pass that raises never ends the loop.
"""
from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mesh.model import ResourceKey

from .api import ApiError, KubeApi
from .ca_secret import ROOT_CONFIGMAP, CaSecretError, holds_root, publish_root
from .kinds import ROOT_CONFIGMAPS
from .passes import run_passes
from .reflector import Delete, Event, Reflector, Relisted, Upsert
from .source import KubeSource

__all__ = ["RootPublisher", "Write", "plan", "skip_reason", "SYSTEM_NAMESPACES", "CONFIGMAPS"]

log = logging.getLogger("ambient.kube.roots")
CONFIGMAPS = ROOT_CONFIGMAPS
assert CONFIGMAPS.only_name == ROOT_CONFIGMAP  # the watch selects exactly the object it writes
SYSTEM_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease"})


@dataclass(frozen=True, slots=True)
class Write:
    """One namespace's ConfigMap to write, and what the cache holds there (None: absent)."""

    namespace: str
    current: Mapping[str, Any] | None

    @property
    def action(self) -> str:
        return "create" if self.current is None else "update"


def skip_reason(namespace: Mapping[str, Any]) -> str | None:
    """Why a Namespace object gets no root ConfigMap, or None (pure)."""
    meta = namespace.get("metadata") or {}
    if meta.get("name") in SYSTEM_NAMESPACES:
        return "system"
    if meta.get("deletionTimestamp") or (namespace.get("status") or {}).get("phase") == "Terminating":
        return "terminating"
    return None


def plan(namespaces: Mapping[str, Mapping[str, Any]], configmaps: Mapping[str, Mapping[str, Any]],
         roots_pem: bytes) -> tuple[Write, ...]:
    """The writes that make every namespace's root ConfigMap hold `roots_pem` (pure), given the
    Namespace objects and the root ConfigMaps by namespace, sorted by namespace."""
    writes = []
    for name, ns in sorted(namespaces.items()):
        if skip_reason(ns) is not None:
            continue
        current = configmaps.get(name)
        if current is None or not holds_root(current, roots_pem):
            writes.append(Write(name, current))
    return tuple(writes)


class RootPublisher:
    def __init__(self, api: KubeApi, source: KubeSource, *, roots_pem: bytes,
                 jitter: Callable[[], float] = random.random, watch_timeout: int = 290) -> None:
        self.api = api
        self.roots_pem = roots_pem
        self.jitter = jitter
        ns_reflectors = [r for r in source.reflectors if r.kind.kind == "Namespace"]
        if not ns_reflectors:
            raise ValueError("the root publisher needs Namespace events: the KubeSource does not watch Namespaces")
        self.namespaces: dict[str, Mapping[str, Any]] = {}
        self.configmaps: dict[str, Mapping[str, Any]] = {}
        self.reflector = Reflector(api, CONFIGMAPS, self._on_event, jitter=jitter, watch_timeout=watch_timeout)
        self._synced = [ns_reflectors[0].synced, self.reflector.synced]
        self.stats = {"passes": 0, "writes": 0, "errors": 0}
        self.failed: dict[str, str] = {}
        """Namespaces whose ConfigMap the last pass could not write, with why."""
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        source.listeners.append(self._on_event)

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self.reflector.run(), name="kube-watch-root-ConfigMap"),
                       asyncio.create_task(self._loop(), name="root-publisher")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def _on_event(self, ev: Event) -> None:
        if ev.kind == CONFIGMAPS:
            cache = self.configmaps  # by namespace: one object per namespace by its name
            name: Callable[[ResourceKey], str] = lambda k: k.namespace  # noqa: E731
        elif ev.kind.kind == "Namespace":
            cache, name = self.namespaces, lambda k: k.name
        else:
            return  # the source's other kinds (and its ConfigMap `istio`)
        if isinstance(ev, Relisted):
            for d in ev.deletes:
                cache.pop(name(d.key), None)
            for u in ev.upserts:
                cache[name(u.key)] = u.obj
        elif isinstance(ev, Upsert):
            cache[name(ev.key)] = ev.obj
        elif isinstance(ev, Delete):
            cache.pop(name(ev.key), None)
        self._dirty.set()

    async def _loop(self) -> None:
        await run_passes(synced=self._synced, dirty=self._dirty, reconcile=self.reconcile, ok=lambda: not self.failed,
                         on_failure=self._count_failure, jitter=self.jitter, what="root publisher pass", log=log)

    def _count_failure(self) -> None:
        self.stats["errors"] += 1

    async def reconcile(self) -> None:
        """One pass: write what `plan` says, each namespace on its own (one refused write does
        not hold back the others)."""
        self.stats["passes"] += 1
        failed: dict[str, str] = {}
        for w in plan(self.namespaces, self.configmaps, self.roots_pem):
            try:
                out = await publish_root(self.api, namespace=w.namespace, roots_pem=self.roots_pem, current=w.current)
            except (ApiError, CaSecretError) as e:
                failed[w.namespace] = str(e)
                if self.failed.get(w.namespace) != str(e):
                    log.warning("ConfigMap %s/%s: %s failed: %s; retrying", w.namespace, ROOT_CONFIGMAP, w.action, e)
                continue
            if out is not None:
                self.stats["writes"] += 1
                # What the server holds now, so a pass before the watch event does not write it again.
                self.configmaps[w.namespace] = out
                log.info("%s ConfigMap %s/%s", "created" if w.current is None else "updated", w.namespace,
                         ROOT_CONFIGMAP)
        self.failed = failed
