"""Config errors that name the file, document, object and field, with a stable `reason`."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from ..model import ResourceKey

__all__ = ["REASONS", "WARNING_REASONS", "Origin", "ConfigError", "ConfigErrors", "ConfigWarning"]

REASONS: frozenset[str] = frozenset({
    "yaml_syntax",       # the text is not YAML (or uses a tag we cannot construct)
    "unreadable",        # a file is missing, unreadable or not UTF-8
    "unknown_kind",      # kind is not one we support
    "bad_api_version",   # apiVersion not accepted for the kind
    "missing_field",     # a required field is absent or empty
    "bad_value",         # a field has the wrong type or an invalid value
    "unknown_field",     # a field the kind does not define (policy and route kinds only)
    "unsupported",       # valid Kubernetes, but not supported by this mesh (UDP, valueFrom, ...)
    "duplicate",         # same key twice: YAML mapping key, container/port name, object in a batch
    "unknown_reference",  # names a namespace, service account or node that does not exist
    "conflict",          # a clusterIP or pod IP already used by another object
    "immutable_field",   # an update changes a field that cannot change
    "not_found",         # deleting an object that does not exist
    "in_use",            # deleting an object others still depend on
    "forbidden",         # deleting a namespace that always exists
})
"""Every `reason` this package raises; callers and tests may match on them."""

WARNING_REASONS: frozenset[str] = frozenset({
    "not_enforced",  # valid (Istio accepts it) and kept, but the mesh does not act on it yet
    "deprecated",    # a deprecated form, mapped as Istio maps it (or ignored, as Istio ignores it)
    "superseded",    # the same object is defined again later in the batch; the last one is used
    "unset_percentage",  # a fault without percentage: valid, but Istio then injects nothing (0 %)
    "bad_annotation",  # a mesh annotation with a value it cannot use: ignored, the default kept
})
"""Every `reason` a ConfigWarning carries."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where something came from: a file (or "<stdin>"), 1-based document, List item and line."""

    source: str
    document: int | None = None
    item: int | None = None
    """1-based index in the `items` of a `kind: List` document."""
    line: int | None = None

    def at(self, line: int | None) -> Origin:
        return replace(self, line=line) if line is not None else self

    def __str__(self) -> str:
        # `path:line` first: editors and terminals make it clickable.
        text = self.source if self.line is None else f"{self.source}:{self.line}"
        where = [f"document {self.document}"] if self.document is not None else []
        if self.item is not None:
            where.append(f"item {self.item}")
        return f"{text} ({', '.join(where)})" if where else text


class ConfigError(Exception):
    """One problem in user configuration, printed as `origin: object: field: message`."""

    def __init__(self, message: str, *, reason: str, source: str = "<stdin>",
                 key: ResourceKey | None = None, field: str | None = None,
                 document: int | None = None, item: int | None = None, line: int | None = None,
                 kind: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.source = source
        self.key = key
        self.field = field
        self.document = document
        self.item = item
        self.line = line
        self.kind = kind if kind is not None else (key.kind if key else None)
        """The object's kind when known even though its key is not (e.g. a missing name)."""

    @property
    def origin(self) -> Origin:
        return Origin(self.source, self.document, self.item, self.line)

    def _state(self) -> dict[str, Any]:
        return {"message": self.message, "reason": self.reason, "source": self.source,
                "key": self.key, "field": self.field, "document": self.document,
                "item": self.item, "line": self.line, "kind": self.kind}

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only __init__ breaks Exception's default pickling (multiprocessing, logging).
        return (_rebuild, (type(self), self._state()))

    def __str__(self) -> str:
        return _format(self.origin, self.key, self.kind, self.field, self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r}, reason={self.reason!r})"


def _format(origin: Origin, key: ResourceKey | None, kind: str | None, field: str | None,
            message: str) -> str:
    """`file:line (document N): Kind ns/name: field: message`; parts that are unknown are left out
    (an object from a Kubernetes watch has no file)."""
    parts = [str(origin)] if origin.source else []
    if key is not None:
        parts.append(str(key))
    elif kind:
        parts.append(f"{kind} (unnamed)")
    if field:
        parts.append(field)
    parts.append(message)
    return ": ".join(parts)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigWarning:
    """Accepted configuration the operator should know about (printed like a ConfigError)."""

    message: str
    reason: str
    """One of WARNING_REASONS."""
    key: ResourceKey | None = None
    field: str | None = None
    origin: Origin = Origin("")

    def __str__(self) -> str:
        return _format(self.origin, self.key, self.key.kind if self.key else None, self.field,
                       "warning: " + self.message)


def _rebuild(cls: type[ConfigError], state: dict[str, Any]) -> ConfigError:
    if cls is ConfigErrors:
        return ConfigErrors(state["errors"])
    message = state.pop("message")
    return cls(message, **state)


class ConfigErrors(ConfigError):
    """Several problems found in one batch; `str()` gives one per line.

    Its own `reason` is the errors' common reason, or "multiple" when they differ; match on
    `reasons` (or iterate) to look at each one.
    """

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        flat: list[ConfigError] = []
        for e in errors:
            flat.extend(e.errors if isinstance(e, ConfigErrors) else (e,))
        if not flat:
            raise ValueError("ConfigErrors needs at least one error")
        first = flat[0]
        reasons = {e.reason for e in flat}
        sources = {e.source for e in flat}
        one = len(flat) == 1
        super().__init__(
            first.message if one else f"{len(flat)} configuration errors",
            reason=first.reason if len(reasons) == 1 else "multiple",
            source=first.source if len(sources) == 1 else "",
            key=first.key if one else None, field=first.field if one else None,
            document=first.document if one else None, item=first.item if one else None,
            line=first.line if one else None, kind=first.kind if one else None)
        self.errors: tuple[ConfigError, ...] = tuple(flat)

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(e.reason for e in self.errors)

    def _state(self) -> dict[str, Any]:
        return {"errors": self.errors}

    def __iter__(self) -> Iterator[ConfigError]:
        return iter(self.errors)

    def __len__(self) -> int:
        return len(self.errors)

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)
