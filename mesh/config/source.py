"""YAML text to documents with per-field line numbers, and typed field access that reports
errors at the right file, document, object, field and line."""
from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import yaml

from ..model import ResourceKey
from .errors import ConfigError, ConfigWarning, Origin

Path = tuple[str | int, ...]
"""A field path: ("spec", "containers", 0, "command")."""
T = TypeVar("T")

__all__ = ["Path", "Document", "read_documents", "format_path", "Invalid", "Ctx", "describe",
           "quote_hint", "get_map", "get_list", "get_str", "get_str_list", "get_port", "get_ipv4",
           "get_ipv4_net"]

_MAX_LINE_ENTRIES = 200_000  # aliases can expand exponentially ("billion laughs"): stop mapping

# --- YAML ---------------------------------------------------------------------------------

_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """Safe loader that keeps timestamps as strings, as Kubernetes (JSON) would see them."""


_Loader.add_constructor("tag:yaml.org,2002:timestamp",
                        lambda loader, node: loader.construct_scalar(node))


def _node_lines(node: yaml.Node, path: Path, lines: dict[Path, int],
                dups: list[tuple[Path, int, int]], stack: set[int]) -> None:
    """Map each field path to its 1-based line, and note duplicate mapping keys on the way."""
    if id(node) in stack or len(lines) > _MAX_LINE_ENTRIES:  # recursive or exploding aliases
        return
    lines.setdefault(path, node.start_mark.line + 1)
    stack.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode) or k.value == "<<":
                continue  # complex keys and merge keys carry no field name of their own
            line = k.start_mark.line + 1
            if k.value in seen:
                dups.append((path + (k.value,), line, seen[k.value]))
            else:
                seen[k.value] = line
            # The key's line, not the value's: a block mapping value starts on the next line.
            lines[path + (k.value,)] = line
            _node_lines(v, path + (k.value,), lines, dups, stack)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _node_lines(item, path + (i,), lines, dups, stack)
    stack.discard(id(node))


@dataclass(slots=True)
class Document:
    index: int
    data: Any
    lines: dict[Path, int]
    dups: list[tuple[Path, int, int]]


def read_documents(text: str, source: str, errors: list[ConfigError]) -> Iterator[Document]:
    """Yield each YAML document with its line map; a syntax error ends the stream."""
    loader = _Loader(text)
    index = 0
    try:
        while True:
            index += 1
            if not loader.check_node():
                return
            node = loader.get_node()
            lines: dict[Path, int] = {}
            dups: list[tuple[Path, int, int]] = []
            _node_lines(node, (), lines, dups, set())
            try:
                data = loader.construct_document(node)
            except yaml.YAMLError as e:
                errors.append(_yaml_error(e, source, index))
                loader.constructed_objects, loader.recursive_objects = {}, {}
                continue
            yield Document(index, data, lines, dups)
    except yaml.YAMLError as e:
        errors.append(_yaml_error(e, source, index))
    except RecursionError:
        errors.append(ConfigError("the YAML nests too deeply (a recursive alias?)",
                                  reason="yaml_syntax", source=source, document=index))
    finally:
        loader.dispose()


def _yaml_error(e: yaml.YAMLError, source: str, index: int) -> ConfigError:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    message = f"invalid YAML: {problem}" + (f" ({context})" if context else "")
    return ConfigError(message, reason="yaml_syntax", source=source, document=index,
                       line=mark.line + 1 if mark is not None else None)


# --- error context ------------------------------------------------------------------------

_PLAIN_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def format_path(path: Path) -> str | None:
    """`("spec", "containers", 0, "command")` -> `spec.containers[0].command`."""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        elif _PLAIN_FIELD.fullmatch(p):
            out += f".{p}" if out else p
        else:  # label keys like istio.io/dataplane-mode
            out += f"[{json.dumps(p)}]"
    return out or None


class Invalid(Exception):
    """Internal: aborts one section of an object; the error is already recorded."""


class Ctx:
    """Error reporting for one object: its origin, its key once known, and a line map."""

    def __init__(self, origin: Origin, lines: Mapping[Path, int] | None = None,
                 prefix: Path = ()) -> None:
        self.origin = origin
        self.lines = lines or {}
        self.prefix = prefix  # path of this object inside its document (List items)
        self.kind: str | None = None
        self.key: ResourceKey | None = None
        self.errors: list[ConfigError] = []
        self.warnings: list[ConfigWarning] = []

    def line(self, path: Path) -> int | None:
        full = self.prefix + path
        for n in range(len(full), -1, -1):  # a missing field points at its parent
            if full[:n] in self.lines:
                return self.lines[full[:n]]
        return None

    def error(self, path: Path, message: str, reason: str) -> None:
        o = self.origin
        self.errors.append(ConfigError(
            message, reason=reason, source=o.source, key=self.key, kind=self.kind,
            field=format_path(path), document=o.document, item=o.item, line=self.line(path)))

    def warn(self, path: Path, message: str, reason: str = "not_enforced") -> None:
        """Record accepted-but-noteworthy input; the key is filled in once the object is known."""
        self.warnings.append(ConfigWarning(message=message, reason=reason, key=self.key,
                                           field=format_path(path),
                                           origin=self.origin.at(self.line(path))))

    def fail(self, path: Path, message: str, reason: str = "bad_value") -> NoReturn:
        self.error(path, message, reason)
        raise Invalid

    def collect(self, fn: Callable[[], T]) -> T | None:
        """Run one independent section so that its error does not hide the others'."""
        try:
            return fn()
        except Invalid:
            return None


def describe(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"the boolean {str(v).lower()}"
    if isinstance(v, (int, float)):
        return f"the number {v}"
    if isinstance(v, str):
        return f"the string {json.dumps(v)}"
    if isinstance(v, Mapping):
        return "a mapping"
    if isinstance(v, (list, tuple)):
        return "a list"
    return type(v).__name__


def quote_hint(v: Any) -> str:
    # YAML turns unquoted 8080, true, yes, on into numbers and booleans.
    if isinstance(v, (bool, int, float)):
        return "; quote it in YAML to keep it a string"
    return ""


# --- typed field access -------------------------------------------------------------------

def get_map(ctx: Ctx, parent: Mapping[Any, Any], path: Path, *,
            required: bool = False) -> Mapping[Any, Any]:
    v = parent.get(path[-1])
    if v is None:
        if required:
            ctx.fail(path, "is required", "missing_field")
        return {}
    if not isinstance(v, Mapping):
        ctx.fail(path, f"must be a mapping, got {describe(v)}")
    return v


def get_list(ctx: Ctx, parent: Mapping[Any, Any], path: Path, *,
             required: bool = False) -> list[Any]:
    v = parent.get(path[-1])
    if v is None or v == []:
        if required:
            ctx.fail(path, "is required and must not be empty", "missing_field")
        return []
    if not isinstance(v, list):
        ctx.fail(path, f"must be a list, got {describe(v)}")
    return v


def get_str(ctx: Ctx, parent: Mapping[Any, Any], path: Path, *,
            required: bool = False) -> str | None:
    """A string field; absent, null and "" all mean unset (Go's omitempty)."""
    v = parent.get(path[-1])
    if v is None or v == "":
        if required:
            ctx.fail(path, "is required", "missing_field")
        return None
    if not isinstance(v, str):
        ctx.fail(path, f"must be a string, got {describe(v)}{quote_hint(v)}")
    return v


def get_str_list(ctx: Ctx, parent: Mapping[Any, Any], path: Path) -> tuple[str, ...]:
    v = parent.get(path[-1])
    if v is None:
        return ()
    if not isinstance(v, list):
        hint = ' (write it as a list, e.g. ["sh", "-c", "..."])' if isinstance(v, str) else ""
        ctx.fail(path, f"must be a list of strings, got {describe(v)}{hint}")
    for i, x in enumerate(v):
        if not isinstance(x, str):
            ctx.fail(path + (i,), f"must be a list of strings, got {describe(x)}{quote_hint(x)}")
    return tuple(v)


def get_port(ctx: Ctx, v: Any, path: Path) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        ctx.fail(path, f"must be a port number (1-65535), got {describe(v)}")
    if not 1 <= v <= 65535:
        ctx.fail(path, f"must be between 1 and 65535, got {v}")
    return v


def get_ipv4(ctx: Ctx, v: Any, path: Path) -> ipaddress.IPv4Address:
    try:
        if isinstance(v, str):
            return ipaddress.IPv4Address(v)
    except ValueError:
        pass
    ctx.fail(path, f"must be an IPv4 address like 10.244.1.5, got {describe(v)}")


def get_ipv4_net(ctx: Ctx, v: Any, path: Path) -> ipaddress.IPv4Network:
    if not isinstance(v, str) or "/" not in v:
        ctx.fail(path, f"must be an IPv4 CIDR like 10.244.1.0/24, got {describe(v)}")
    try:
        return ipaddress.IPv4Network(v)
    except ValueError:
        pass
    try:
        network = ipaddress.IPv4Network(v, strict=False)
    except ValueError:
        ctx.fail(path, f"must be an IPv4 CIDR like 10.244.1.0/24, got {describe(v)}")
    ctx.fail(path, f"{v} has host bits set; did you mean {network}?")
