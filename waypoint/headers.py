"""Request/response header rewriting shared by the primary request and its mirrors (pure)."""
from __future__ import annotations

from collections.abc import Iterable

from mesh.model.route import HeaderModifier

__all__ = ["apply_modifiers"]


def apply_modifiers(headers: list[tuple[bytes, bytes]], mods: Iterable[HeaderModifier]) -> list[tuple[bytes, bytes]]:
    """`headers` after each modifier in order: remove, then set (replacing), then add."""
    for m in mods:
        if m.remove:
            drop = {n.lower().encode() for n in m.remove}
            headers = [h for h in headers if h[0] not in drop]
        for n, v in m.set:
            name = n.lower().encode()
            headers = [h for h in headers if h[0] != name]
            headers.append((name, v.encode()))
        for n, v in m.add:
            headers.append((n.lower().encode(), v.encode()))
    return headers
