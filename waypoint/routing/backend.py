"""Weighted backend choice (Gateway API backendRefs, VirtualService destinations): pure, with an
injected `random.Random` so tests are deterministic."""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, TypeVar

from mesh.model.route import MAX_WEIGHT, BackendRef, VSRouteDestination

__all__ = ["pick_backend", "pick_vs_destination", "pick_weighted"]

T = TypeVar("T")


def _valid_weight(w: Any) -> bool:
    return isinstance(w, int) and not isinstance(w, bool) and 0 < w <= MAX_WEIGHT


def pick_weighted(items: Sequence[T], weights: Sequence[int], rng: random.Random) -> T | None:
    """One of `items` with probability weight / sum(weights); weights of 0 (or invalid, e.g.
    negative) never win. None when nothing can win."""
    live = [(x, w) for x, w in zip(items, weights) if _valid_weight(w)]
    if not live:
        return None
    if len(live) == 1:
        return live[0][0]
    total = sum(w for _, w in live)
    r = rng.randrange(total)  # integer arithmetic: exact shares, no float edge cases
    for x, w in live:
        if r < w:
            return x
        r -= w
    raise AssertionError("unreachable")  # pragma: no cover


def pick_backend(backend_refs: Sequence[BackendRef], rng: random.Random) -> BackendRef | None:
    """The backendRef a request goes to. None means no backend can take it: the waypoint
    answers 500 (Gateway API: all backends invalid, or a rule without backendRefs)."""
    return pick_weighted(backend_refs, [b.weight for b in backend_refs], rng)


def pick_vs_destination(route: Sequence[VSRouteDestination],
                        rng: random.Random) -> VSRouteDestination | None:
    """A VirtualService `http[].route[]` destination, by relative weight; None -> 500."""
    return pick_weighted(route, [d.weight for d in route], rng)
