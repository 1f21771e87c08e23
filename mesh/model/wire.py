"""JSON wire form of model dataclasses, derived from their type hints (the distribution edge)."""
from __future__ import annotations

import base64
import dataclasses
import enum
import ipaddress
import types
import typing
from functools import cache
from typing import Any, Union

from .base import FrozenMap, freeze

__all__ = ["WireError", "to_wire", "from_wire"]

_IP_TYPES = (ipaddress.IPv4Address, ipaddress.IPv4Network, ipaddress.IPv6Address, ipaddress.IPv6Network)


class WireError(ValueError):
    """A wire message does not fit the model type it claims to be."""

    reason = "bad_wire_message"


def to_wire(obj: Any) -> Any:
    """Convert a model value into JSON-compatible data."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, bytes):
        return base64.b64encode(obj).decode("ascii")
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, _IP_TYPES):
        return str(obj)
    if isinstance(obj, FrozenMap):
        return obj.thaw()
    if isinstance(obj, (tuple, list)):
        return [to_wire(x) for x in obj]
    if dataclasses.is_dataclass(obj):
        return {f.name: to_wire(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    raise WireError(f"cannot encode {type(obj).__name__}")


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_wire(tp: Any, data: Any, *, path: str = "") -> Any:
    """Build a value of type `tp` from JSON data; raise WireError naming the bad path."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if data is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return from_wire(arg, data, path=path)
            except WireError as e:
                errors.append(str(e))
        raise WireError(f"{path or '<root>'}: no variant of {tp} fits ({'; '.join(errors)})")
    if origin is tuple:
        if not isinstance(data, list):
            raise WireError(f"{path or '<root>'}: expected a list")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]
            return tuple(from_wire(args[0], x, path=f"{path}[{i}]") for i, x in enumerate(data))
        if len(args) != len(data):
            raise WireError(f"{path or '<root>'}: expected {len(args)} items, got {len(data)}")
        return tuple(from_wire(a, x, path=f"{path}[{i}]") for i, (a, x) in enumerate(zip(args, data)))
    if tp is FrozenMap:
        if not isinstance(data, dict):
            raise WireError(f"{path or '<root>'}: expected an object")
        return freeze(data)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(data)
        except ValueError as e:
            raise WireError(f"{path or '<root>'}: {e}") from None
    if tp in _IP_TYPES:
        try:
            return tp(data)
        except (ValueError, TypeError) as e:
            raise WireError(f"{path or '<root>'}: {e}") from None
    if tp is bytes:
        try:
            return base64.b64decode(data, validate=True)
        except (TypeError, ValueError) as e:
            raise WireError(f"{path or '<root>'}: expected base64 bytes ({e})") from None
    if tp in (str, int, float, bool):
        # bool is an int in Python; keep the two apart on the wire.
        if type(data) is not tp and not (tp is float and type(data) is int):
            raise WireError(f"{path or '<root>'}: expected {tp.__name__}, got {type(data).__name__}")
        return data
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise WireError(f"{path or '<root>'}: expected an object for {tp.__name__}")
        hints = _hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in data:
                kwargs[f.name] = from_wire(hints[f.name], data[f.name], path=f"{path}.{f.name}".lstrip("."))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise WireError(f"{path or '<root>'}: missing field {f.name!r} of {tp.__name__}")
        try:
            return tp(**kwargs)
        except (TypeError, ValueError) as e:
            raise WireError(f"{path or '<root>'}: {e}") from None
    raise WireError(f"{path or '<root>'}: unsupported type {tp!r}")
