"""`fast_init`: a quicker `__init__` for the frozen slots dataclasses built once or more per request."""
from __future__ import annotations

import dataclasses
from typing import TypeVar

__all__ = ["fast_init"]

T = TypeVar("T", bound=type)


def fast_init(cls: T) -> T:
    """Replace a frozen slots dataclass's generated `__init__` with one of the same signature
    that stores each field through its slot descriptor, bound once per class.

    Why: the dataclass's frozen `__init__` runs `object.__setattr__(self, "name", value)` per
    field (a global, an attribute and a by-name descriptor lookup each); calling the bound
    descriptor setter directly is about twice as fast, and the HTTP heads, events and request
    records are built several times per proxied request. Semantics are unchanged (frozen,
    eq, hash, repr, `dataclasses.replace`); classes this cannot reproduce exactly (a
    `__post_init__`, `default_factory`, `init=False`, InitVar or ClassVar fields) are refused."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"fast_init: {cls.__qualname__} is not a frozen dataclass with slots")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"fast_init: {cls.__qualname__} has a __post_init__")
    fields = dataclasses.fields(cls)
    if len(fields) != len(cls.__dataclass_fields__):
        raise TypeError(f"fast_init: {cls.__qualname__} has InitVar or ClassVar pseudo-fields")
    ns: dict[str, object] = {}
    positional, keyword, body = [], [], []
    for f in fields:
        if not f.init or f.default_factory is not dataclasses.MISSING:
            raise TypeError(f"fast_init: field {cls.__qualname__}.{f.name} has init=False or a default_factory")
        ns[f"_set_{f.name}"] = cls.__dict__[f.name].__set__
        param = f.name
        if f.default is not dataclasses.MISSING:
            ns[f"_dflt_{f.name}"] = f.default
            param += f"=_dflt_{f.name}"
        (keyword if f.kw_only else positional).append(param)
        body.append(f"    _set_{f.name}(self, {f.name})\n")
    params_src = ", ".join(["self", *positional, *(["*", *keyword] if keyword else [])])
    body_src = "".join(body) or "    pass\n"
    exec(f"def __init__({params_src}):\n{body_src}", ns)
    init = ns["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"       # type: ignore[attr-defined]
    init.__module__ = cls.__module__                        # type: ignore[attr-defined]
    init.__annotations__ = dict(cls.__init__.__annotations__)  # the signature reads as before
    cls.__init__ = init                                     # type: ignore[misc]
    return cls
