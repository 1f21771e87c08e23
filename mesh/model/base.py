"""Building blocks of the model: an immutable mapping, object metadata and resource keys."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FrozenMap", "ObjectMeta", "ResourceKey", "freeze"]


class FrozenMap(Mapping[str, Any]):
    """A hashable, immutable str-keyed mapping (labels, selectors, opaque policy specs)."""

    __slots__ = ("_d", "_h")

    def __init__(self, items: Mapping[str, Any] | None = None, /) -> None:
        self._d: dict[str, Any] = dict(items or {})
        self._h: int | None = None

    def __getitem__(self, key: str) -> Any:
        return self._d[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self) -> int:
        if self._h is None:
            self._h = hash(frozenset(self._d.items()))
        return self._h

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._d == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({self._d!r})"

    def thaw(self) -> dict[str, Any]:
        """A deep plain-dict copy (for JSON output)."""
        return {k: _thaw(v) for k, v in self._d.items()}


def _thaw(v: Any) -> Any:
    if isinstance(v, FrozenMap):
        return v.thaw()
    if isinstance(v, tuple):
        return [_thaw(x) for x in v]
    return v


def freeze(v: Any) -> Any:
    """Deep-freeze JSON-like data: dicts become FrozenMap, lists become tuples."""
    if isinstance(v, Mapping):
        return FrozenMap({str(k): freeze(x) for k, x in v.items()})
    if isinstance(v, (list, tuple)):
        return tuple(freeze(x) for x in v)
    return v


@dataclass(frozen=True, slots=True, order=True)
class ResourceKey:
    """Identifies an object: kind, namespace ("" when cluster-scoped) and name."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ObjectMeta:
    """The part of Kubernetes' metadata the mesh uses."""

    name: str
    namespace: str = ""
    """Empty for cluster-scoped kinds (Namespace, Node)."""
    labels: FrozenMap = field(default_factory=FrozenMap)
    annotations: FrozenMap = field(default_factory=FrozenMap)
