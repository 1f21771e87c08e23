"""List+watch of one kind, forever, as client-go's Reflector does.

Theory of operation: list (paged) to learn every object and the collection's resourceVersion,
then watch from that version; every event moves the version on (BOOKMARK events too, so a
quiet kind does not fall behind etcd's compaction). When a watch ends normally (the server's
timeout) the next one starts from the last version seen, with no relist. A 410 Gone (the
version was compacted away) relists: the listed set is diffed against the versions this
reflector already holds (`relist_changes`), so only objects that changed while it was away
are passed on, plus deletions for those no longer listed. Errors back off exponentially with
jitter (`backoff_delay`) up to BACKOFF_MAX, reset by the next successful list or event. A kind
whose API is not served (404: a CRD that is not installed) counts as empty and is retried.
The handler is called synchronously; it must not raise (the source reports bad objects).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mesh.model import ResourceKey

from .api import ApiError, Gone, KubeApi
from .kinds import WatchedKind, key_of

__all__ = ["Upsert", "Delete", "Relisted", "Reflector", "relist_changes", "backoff_delay",
           "BACKOFF_MAX"]

log = logging.getLogger("ambient.kube.watch")
BACKOFF_BASE = 0.2
BACKOFF_MAX = 10.0


@dataclass(frozen=True, slots=True)
class Upsert:
    kind: WatchedKind
    key: ResourceKey
    obj: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Delete:
    kind: WatchedKind
    key: ResourceKey


@dataclass(frozen=True, slots=True)
class Relisted:
    """A (re)list finished: `upserts` changed or new, `deletes` gone; the kind is in sync."""
    kind: WatchedKind
    upserts: tuple[Upsert, ...]
    deletes: tuple[Delete, ...]
    cause: str  # "initial"; "gone" (410); "retry" (after a failed list); "not_served" (404: empty)


Event = Upsert | Delete | Relisted


def _rv(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def relist_changes(kind: WatchedKind, known: Mapping[ResourceKey, str],
                   items: Sequence[Mapping[str, Any]]) -> tuple[list[Upsert], list[Delete]]:
    """What a relist changed relative to `known` (key -> resourceVersion): objects that are new
    or have another version, and keys that are no longer listed."""
    upserts, seen = [], set()
    for obj in items:
        key = key_of(kind, obj)
        seen.add(key)
        if known.get(key) != _rv(obj):
            upserts.append(Upsert(kind, key, obj))
    deletes = [Delete(kind, k) for k in sorted(known) if k not in seen]
    return upserts, deletes


def backoff_delay(failures: int, jitter: float) -> float:
    """Seconds to wait after `failures` consecutive failures (>= 1); jitter in [0, 1)."""
    delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (failures - 1))
    return delay * (0.5 + jitter / 2)


@dataclass
class Reflector:
    api: KubeApi
    kind: WatchedKind
    handler: Callable[[Event], None]
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    jitter: Callable[[], float] = lambda: 0.5
    watch_timeout: int = 290
    known: dict[ResourceKey, str] = field(default_factory=dict)
    resource_version: str = ""
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    stats: dict[str, int] = field(default_factory=lambda: {
        "lists": 0, "relists_gone": 0, "errors": 0, "events": 0, "watches": 0})

    async def run(self) -> None:
        failures, gone_streak, cause = 0, 0, "initial"
        while True:
            try:
                if gone_streak > 1:  # relisted, and gone again at once: do not spin on it
                    await self.sleep(backoff_delay(gone_streak - 1, self.jitter()))
                if not self.resource_version:
                    await self._list(cause)
                    failures = 0
                if await self._watch():
                    failures = gone_streak = 0
                else:  # a watch that ends with nothing in it must not become a busy loop
                    failures += 1
                    await self.sleep(backoff_delay(failures, self.jitter()))
            except Gone as e:
                log.info("%s: watch from %s is gone (%s): relisting", self.kind.kind, self.resource_version, e)
                self.stats["relists_gone"] += 1
                gone_streak += 1
                self.resource_version, cause = "", "gone"
            except ApiError as e:
                failures += 1
                self.stats["errors"] += 1
                if e.status == 404:  # the API (a CRD) is not installed: empty, retry later
                    self._relisted([], "", "not_served")
                    self.resource_version = ""
                    log.log(logging.INFO if failures == 1 else logging.DEBUG,
                            "%s: %s is not served (CRD not installed?); retrying", self.kind.kind, self.kind.path)
                else:
                    log.warning("%s: %s; retrying (failure %d)", self.kind.kind, e, failures)
                cause = "retry"
                await self.sleep(backoff_delay(failures, self.jitter()))

    async def _list(self, cause: str) -> None:
        items, rv = await self.api.list(self.kind)
        self.stats["lists"] += 1
        self._relisted(items, rv, cause)

    def _relisted(self, items: Sequence[Mapping[str, Any]], rv: str, cause: str) -> None:
        upserts, deletes = relist_changes(self.kind, self.known, items)
        self.known = {key_of(self.kind, o): _rv(o) for o in items}
        self.resource_version = rv
        self.handler(Relisted(self.kind, tuple(upserts), tuple(deletes), cause))
        self.synced.set()

    async def _watch(self) -> int:
        """Follow one watch to its end; the number of events (bookmarks included) it carried."""
        self.stats["watches"] += 1
        n = 0
        async for etype, obj in self.api.watch(self.kind, self.resource_version,
                                               timeout_seconds=self.watch_timeout):
            rv = _rv(obj)
            n += 1
            if etype == "BOOKMARK":
                self.resource_version = rv or self.resource_version
                continue
            key = key_of(self.kind, obj)
            self.stats["events"] += 1
            if etype in ("ADDED", "MODIFIED"):
                self.known[key] = rv
                self.handler(Upsert(self.kind, key, obj))
            elif etype == "DELETED":
                self.known.pop(key, None)
                self.handler(Delete(self.kind, key))
            self.resource_version = rv or self.resource_version
        return n
