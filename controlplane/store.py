"""The local cluster's object store (the local stand-in for the Kubernetes API server).

All-or-nothing: `commit` swaps in a complete new object set and then tells watchers, so a
watcher never sees half of a batch. Validation happens before, in the runner.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from mesh.model import Resource, ResourceKey

__all__ = ["ResourceStore"]

R = TypeVar("R", bound=Resource)
Watcher = Callable[[list[Resource]], None]


class ResourceStore:
    def __init__(self) -> None:
        self._objs: dict[ResourceKey, Resource] = {}
        self._watchers: list[Watcher] = []
        self.revision = 0

    @property
    def objects(self) -> Mapping[ResourceKey, Resource]:
        return self._objs

    def get(self, key: ResourceKey) -> Resource | None:
        return self._objs.get(key)

    def of(self, cls: type[R]) -> list[R]:
        return sorted((o for o in self._objs.values() if isinstance(o, cls)), key=lambda o: o.key)

    def commit(self, upserts: Iterable[Resource] = (), deletes: Iterable[ResourceKey] = ()) -> None:
        new = dict(self._objs)
        for k in deletes:
            new.pop(k, None)
        for r in upserts:
            new[r.key] = r
        self._objs = new
        self.revision += 1
        for w in list(self._watchers):
            w(list(new.values()))

    def watch(self, watcher: Watcher) -> Callable[[], None]:
        """Call `watcher(all objects)` after every commit; returns an unsubscribe function."""
        self._watchers.append(watcher)
        return lambda: self._watchers.remove(watcher) if watcher in self._watchers else None
