"""The Kubernetes resource source: watches the API server and keeps the control plane's
ResourceStore current, through the same config edge (`mesh.config`) as local mode's files.

Theory of operation: one Reflector per watched kind (kinds.WATCHED) delivers list results and
watch events. Each object is projected onto the fields the mesh reads (kinds.project) and
converted once (mesh.config.convert_located); the result is staged as an upsert or delete, and
every event that arrives in one event-loop turn is committed to the store in one batch, so the
store (and the control plane's translation) moves once per burst, not once per object, and
never relists. A relist (410 Gone) passes on only what changed.

A bad object (one the config edge rejects) is reported — a log line, the
`ambient_kube_rejected_objects_total{kind,reason}` counter, a Warning Event on the object,
and `rejected` — and skipped: the store keeps the object's last good version if it had one
(an invalid edit of an AuthorizationPolicy does not remove the policy), and the watch goes on.
"""
from __future__ import annotations

import asyncio
import datetime
import logging
import random
from collections.abc import Callable, Iterable
from typing import Any

from mesh.config import ConfigError, Origin
from mesh.config.convert import convert_located
from mesh.metrics import Registry
from mesh.model import Resource, ResourceKey

from ..store import ResourceStore
from .api import ApiError, KubeApi
from .kinds import WATCHED, WatchedKind, project
from .reflector import Delete, Event, Reflector, Relisted, Upsert

__all__ = ["KubeSource", "EVENT_REASON"]

log = logging.getLogger("ambient.kube")
EVENT_REASON = "InvalidConfig"
_COMPONENT = "ambient-controlplane"
_NO_FILE = Origin("")


class KubeSource:
    def __init__(self, api: KubeApi, store: ResourceStore, *, kinds: Iterable[WatchedKind] = WATCHED,
                 events: bool = True, jitter: Callable[[], float] = random.random,
                 now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.timezone.utc),
                 watch_timeout: int = 290) -> None:
        self.api = api
        self.store = store
        self.events = events
        self.now = now
        self.reflectors = [Reflector(api, k, self._on_event, jitter=jitter, watch_timeout=watch_timeout)
                           for k in kinds]
        self.metrics = Registry()
        self._rejected_total = self.metrics.counter(
            "ambient_kube_rejected_objects", "Objects from the API server the config edge rejected",
            ("kind", "reason"))
        self._events_total = self.metrics.counter(
            "ambient_kube_watch_events", "Watch events and relists applied", ("kind", "type"))
        self.rejected: dict[ResourceKey, tuple[ConfigError, ...]] = {}
        """Objects currently skipped as bad, with why (cleared when fixed or deleted)."""
        self.commits = 0
        self._upserts: dict[ResourceKey, Resource] = {}
        self._deletes: set[ResourceKey] = set()
        self._flush_scheduled = False
        self._tasks: list[asyncio.Task[None]] = []
        self._side: set[asyncio.Task[None]] = set()
        self._reported: dict[ResourceKey, str] = {}  # the version last reported, so one Event per version
        self.listeners: list[Callable[[Event], None]] = []
        """Called with every raw event after the store's staging (the waypoint controller's cache)."""

    # -- lifecycle --

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(r.run(), name=f"kube-watch-{r.kind.kind}") for r in self.reflectors]

    async def wait_synced(self, timeout: float) -> None:
        """Until every kind has been listed once (and committed), or TimeoutError."""
        await asyncio.wait_for(asyncio.gather(*(r.synced.wait() for r in self.reflectors)), timeout)
        self._flush()

    async def stop(self) -> None:
        for t in (*self._tasks, *self._side):
            t.cancel()
        await asyncio.gather(*self._tasks, *self._side, return_exceptions=True)
        self._tasks = []

    # -- events --

    def _on_event(self, ev: Event) -> None:
        if isinstance(ev, Relisted):
            self._events_total.labels(ev.kind.kind, f"relist_{ev.cause}").inc()
            for d in ev.deletes:
                self._delete(d)
            for u in ev.upserts:
                self._upsert(u)
        elif isinstance(ev, Upsert):
            self._events_total.labels(ev.kind.kind, "upsert").inc()
            self._upsert(ev)
        else:
            self._events_total.labels(ev.kind.kind, "delete").inc()
            self._delete(ev)
        for listener in self.listeners:
            listener(ev)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _upsert(self, ev: Upsert) -> None:
        projected = project(ev.kind, ev.obj)
        if projected is None:  # not the mesh's concern (a UDP-only Service): as if absent
            self._delete(Delete(ev.kind, ev.key))
            return
        loaded, errors = convert_located(projected, _NO_FILE)
        if loaded is None:
            self._reject(ev, errors)
            return
        if self.rejected.pop(ev.key, None) is not None:
            self._reported.pop(ev.key, None)
            log.info("%s is valid again", ev.key)
        self._deletes.discard(ev.key)
        self._upserts[ev.key] = loaded.resource

    def _delete(self, ev: Delete) -> None:
        self.rejected.pop(ev.key, None)
        self._reported.pop(ev.key, None)
        self._upserts.pop(ev.key, None)
        self._deletes.add(ev.key)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._upserts and not self._deletes:
            return
        upserts, deletes = list(self._upserts.values()), [k for k in self._deletes if self.store.get(k) is not None]
        self._upserts, self._deletes = {}, set()
        if not upserts and not deletes:
            return
        self.commits += 1
        self.store.commit(upserts, deletes)

    # -- reporting --

    def _reject(self, ev: Upsert, errors: list[ConfigError]) -> None:
        self.rejected[ev.key] = tuple(errors)
        for e in errors:
            self._rejected_total.labels(ev.kind.kind, e.reason).inc()
        message = "; ".join(str(e) for e in errors)
        kept = " (its last valid version stays in effect)" if self.store.get(ev.key) is not None else ""
        log.warning("rejected %s: %s%s", ev.key, message, kept)
        meta = ev.obj.get("metadata") or {}
        rv = str(meta.get("resourceVersion") or "")
        if self.events and self._reported.get(ev.key) != rv:
            self._reported[ev.key] = rv
            task = asyncio.get_running_loop().create_task(self._post_event(ev, message + kept))
            self._side.add(task)
            task.add_done_callback(self._side.discard)

    async def _post_event(self, ev: Upsert, message: str) -> None:
        meta = ev.obj.get("metadata") or {}
        ns = ev.key.namespace or "default"  # events about cluster-scoped objects live in default
        stamp = self.now().strftime("%Y-%m-%dT%H:%M:%SZ")
        body: dict[str, Any] = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{ev.key.name}.", "namespace": ns},
            "involvedObject": {"apiVersion": ev.obj.get("apiVersion") or ev.kind.api_version,
                               "kind": ev.kind.kind, "name": ev.key.name,
                               "namespace": ev.key.namespace or None, "uid": meta.get("uid"),
                               "resourceVersion": meta.get("resourceVersion")},
            "reason": EVENT_REASON, "message": message[:1024], "type": "Warning",
            "source": {"component": _COMPONENT}, "reportingComponent": _COMPONENT,
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        }
        try:
            await self.api.create_event(ns, body)
        except ApiError as e:  # reporting must never take the watch down
            log.info("could not record an Event for %s: %s", ev.key, e)
