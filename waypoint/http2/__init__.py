"""The waypoint's HTTP/2 (prior knowledge, so gRPC): sans-IO connections over h2 and the per-stream pipeline adapters.

The names below load on first use (PEP 562): h2 costs the waypoint ~1 MB of RSS, and a waypoint
whose clients and backends all speak HTTP/1.1 never needs it (the HTTP/1.1 path imports
`.base` only)."""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["PREFACE", "ClientConnection", "ServerConnection", "H2Settings", "H2Downstream", "ServerStream"]

_WHERE = {"PREFACE": ("base", "PREFACE"), "ClientConnection": ("connection", "ClientConnection"),
          "ServerConnection": ("connection", "ServerConnection"), "H2Settings": ("connection", "Settings"),
          "H2Downstream": ("downstream", "H2Downstream"), "ServerStream": ("downstream", "ServerStream")}


def __getattr__(name: str) -> Any:
    try:
        module, attr = _WHERE[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = globals()[name] = getattr(importlib.import_module(f"{__name__}.{module}"), attr)   # once per name
    return value
