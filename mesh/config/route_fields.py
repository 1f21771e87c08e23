"""Field readers shared by the route kinds' converters (durations, header modifiers, ...).

Internal to mesh.config: the underscore names are imported by route.py and istio_route.py only.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from ..model.route import HeaderModifier
from .source import Ctx, Invalid, Path, describe, get_list, get_map, get_str


T = TypeVar("T")

# --- shared helpers ------------------------------------------------------------------------


def _known(ctx: Ctx, m: Mapping[Any, Any], path: Path, allowed: set[str],
           unsupported: Mapping[str, str] | None = None) -> None:
    for k in m:
        if unsupported and k in unsupported:
            ctx.error(path + (str(k),), f"is not supported: {unsupported[k]}", "unsupported")
        elif k not in allowed:
            ctx.error(path + (str(k),), f"unknown field; expected one of {', '.join(sorted(allowed))}",
                      "unknown_field")


def _mapping(ctx: Ctx, v: Any, path: Path, what: str = "a mapping") -> Mapping[Any, Any]:
    if not isinstance(v, Mapping):
        ctx.fail(path, f"must be {what}, got {describe(v)}")
    return v


def _int(ctx: Ctx, m: Mapping[Any, Any], path: Path, lo: int, hi: int | None = None) -> int | None:
    v = m.get(path[-1])
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        ctx.fail(path, f"must be an integer, got {describe(v)}")
    if v < lo or (hi is not None and v > hi):
        ctx.fail(path, f"must be between {lo} and {hi}, got {v}" if hi is not None
                 else f"must be at least {lo}, got {v}")
    return v


def _number(ctx: Ctx, m: Mapping[Any, Any], path: Path, lo: float, hi: float) -> float | None:
    v = m.get(path[-1])
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        ctx.fail(path, f"must be a number, got {describe(v)}")
    if not lo <= v <= hi:
        ctx.fail(path, f"must be between {lo:g} and {hi:g}, got {v}")
    return float(v)


def _items(ctx: Ctx, m: Mapping[Any, Any], path: Path, limit: int | None = None,
           required: bool = False) -> list[Any]:
    items = get_list(ctx, m, path, required=required)
    if limit is not None and len(items) > limit:
        ctx.fail(path, f"must have at most {limit} items, got {len(items)}")
    return items


def _each(ctx: Ctx, items: list[Any], path: Path, fn: Callable[[Any, Path], T]) -> tuple[T, ...]:
    """Convert every item, collecting errors of all of them; Invalid if any failed."""
    out: list[T] = []
    failed = False
    for i, x in enumerate(items):
        r = ctx.collect(lambda: fn(x, path + (i,)))
        if r is None:
            failed = True
        else:
            out.append(r)
    if failed:
        raise Invalid
    return tuple(out)


def _regex(ctx: Ctx, value: str, path: Path) -> None:
    try:
        re.compile(value)
    except re.error as e:
        ctx.fail(path, f"{json.dumps(value)} is not a valid regular expression: {e}")


_GEP2257 = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_GEP_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_GO_DURATION = re.compile(r"^(\d+(\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")
_GO_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_gep2257(s: str) -> float | None:
    """Gateway API duration (GEP-2257: `10s`, `500ms`, `1h30m`) in seconds, or None if invalid."""
    if not _GEP2257.fullmatch(s):
        return None
    units = re.findall(r"([0-9]+)(ms|h|m|s)", s)
    if len({u for _, u in units}) != len(units):
        return None  # each unit at most once
    return sum(int(n) * _GEP_UNIT[u] for n, u in units)


def parse_go_duration(s: str) -> float | None:
    """Istio duration (Go/protobuf style: `10s`, `0.5s`, `1m30s`, `250ms`) in seconds, or None."""
    total, rest = 0.0, s
    if not rest:
        return None
    while rest:
        m = _GO_DURATION.match(rest)
        if m is None:
            return None
        total += float(m.group(1)) * _GO_UNIT[m.group(3)]
        rest = rest[m.end():]
    return total


def _duration(ctx: Ctx, m: Mapping[Any, Any], path: Path, *, gep: bool) -> float | None:
    s = get_str(ctx, m, path)
    if s is None:
        return None
    d = parse_gep2257(s) if gep else parse_go_duration(s)
    if d is None:
        ctx.fail(path, f"{json.dumps(s)} is not a valid duration; write e.g. " +
                 ('"10s", "500ms" or "1h30m" (GEP-2257)' if gep else '"10s", "0.5s" or "1m30s"'))
    return d


_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")


def _header_name(ctx: Ctx, m: Mapping[Any, Any], path: Path) -> str:
    name = get_str(ctx, m, path, required=True) or ""
    if not _HEADER_NAME.fullmatch(name):
        ctx.fail(path, f"{json.dumps(name)} is not a valid HTTP header name")
    return name


def _str_value(ctx: Ctx, m: Mapping[Any, Any], path: Path) -> str:
    # Header and query values may legitimately be empty; only a missing key is an error.
    if path[-1] not in m or m[path[-1]] is None:
        ctx.fail(path, "is required", "missing_field")
    v = m[path[-1]]
    if not isinstance(v, str):
        ctx.fail(path, f"must be a string, got {describe(v)}; quote it in YAML to keep it a string")
    return v


def _no_dup_names(ctx: Ctx, names: list[str], path: Path, what: str) -> None:
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            ctx.fail(path + (i, "name"), f"duplicate {what} {json.dumps(n)} (also {seen[n]})",
                     "duplicate")
        seen[n] = i


def _header_modifier(ctx: Ctx, v: Any, path: Path, *, istio: bool = False) -> HeaderModifier:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"set", "add", "remove"})

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        p = path + (key,)
        if istio:  # Istio: a map of name -> value
            mm = get_map(ctx, m, p)
            out = []
            for k, val in mm.items():
                if not isinstance(k, str) or not _HEADER_NAME.fullmatch(k):
                    ctx.fail(p + (str(k),), f"{json.dumps(str(k))} is not a valid HTTP header name")
                if not isinstance(val, str):
                    ctx.fail(p + (k,), f"must be a string, got {describe(val)}")
                out.append((k.lower(), val))
            return tuple(out)
        raw = _items(ctx, m, p, 16)

        def one(x: Any, ip: Path) -> tuple[str, str]:
            x = _mapping(ctx, x, ip, "a mapping with name and value")
            _known(ctx, x, ip, {"name", "value"})
            return _header_name(ctx, x, ip + ("name",)).lower(), _str_value(ctx, x, ip + ("value",))
        out_t = _each(ctx, raw, p, one)
        _no_dup_names(ctx, [n for n, _ in out_t], p, "header")
        return out_t

    def remove() -> tuple[str, ...]:
        p = path + ("remove",)
        raw = _items(ctx, m, p, None if istio else 16)
        out = []
        for i, x in enumerate(raw):
            if not isinstance(x, str) or not _HEADER_NAME.fullmatch(x):
                ctx.fail(p + (i,), f"must be an HTTP header name, got {describe(x)}")
            out.append(x.lower())
        if len(set(out)) != len(out):
            ctx.fail(p, "must not repeat a header name", "duplicate")
        return tuple(out)

    s = ctx.collect(lambda: pairs("set"))
    a = ctx.collect(lambda: pairs("add"))
    r = ctx.collect(remove)
    if s is None or a is None or r is None:
        raise Invalid
    return HeaderModifier(set=s, add=a, remove=r)


def _shape(ctx: Ctx, v: Any, path: Path, schema: Any) -> None:
    """Check only the field names (typo protection) of a subtree the mesh does not act on; values
    are left to Istio's own validation. `schema`: a dict of field -> sub-schema, a 1-tuple
    (sub-schema,) for a list, or None for any value."""
    if schema is None or v is None:
        return
    if isinstance(schema, tuple):
        for i, x in enumerate(_items(ctx, {path[-1]: v}, path)):
            ctx.collect(lambda: _shape(ctx, x, path + (i,), schema[0]))
        return
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, set(schema))
    for k, sub in schema.items():
        if k in m:
            ctx.collect(lambda: _shape(ctx, m[k], path + (k,), sub))


def _bool(ctx: Ctx, m: Mapping[Any, Any], path: Path) -> bool | None:
    v = m.get(path[-1])
    if v is not None and not isinstance(v, bool):
        ctx.fail(path, f"must be true or false, got {describe(v)}")
    return v
