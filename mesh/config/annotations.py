"""Service annotations the mesh acts on, converted once here: the retry budget's `retry.ambient.dev/*` knobs.

A bad value is a warning (`bad_annotation`), not an error, and the default is kept for that
knob: a typo must neither refuse the Service nor switch the protection off. An unknown key
under the prefix is a warning too (a misspelt knob would otherwise do nothing, silently).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping

from ..model import RETRY_BUDGET_ANNOTATION_PREFIX as PREFIX
from ..model import RetryBudgetSpec
from .route_fields import parse_go_duration
from .source import Ctx

__all__ = ["retry_budget"]

_KNOBS = ("budget", "budget-percent", "budget-min-retries-per-second", "budget-window")


def _number(ctx: Ctx, key: str, raw: str, lo: float, hi: float) -> float | None:
    try:
        v = float(raw)
    except ValueError:
        v = math.nan
    if not lo <= v <= hi:    # NaN fails too
        ctx.warn(("metadata", "annotations", key), f"{json.dumps(raw)} is not a number between {lo:g} and "
                 f"{hi:g}; the default is used", "bad_annotation")
        return None
    return v


def retry_budget(ctx: Ctx, annotations: Mapping[str, str]) -> RetryBudgetSpec | None:
    """The Service's retry-budget tuning; None when it has no `retry.ambient.dev/` annotation."""
    mine = {k[len(PREFIX):]: str(v) for k, v in annotations.items() if k.startswith(PREFIX)}
    if not mine:
        return None
    for k in mine:
        if k not in _KNOBS:
            ctx.warn(("metadata", "annotations", PREFIX + k), f"unknown retry budget setting; known: "
                     + ", ".join(PREFIX + n for n in _KNOBS), "bad_annotation")
    enabled = True
    switch = mine.get("budget")
    if switch is not None:
        s = switch.strip().lower()
        if s in ("off", "false", "disabled"):
            enabled = False
        elif s not in ("on", "true", "enabled"):
            ctx.warn(("metadata", "annotations", PREFIX + "budget"), f"{json.dumps(switch)} is not on or off; "
                     "the budget stays on", "bad_annotation")
    pct = mine.get("budget-percent")
    floor = mine.get("budget-min-retries-per-second")
    window = None
    raw = mine.get("budget-window")
    if raw is not None:
        window = parse_go_duration(raw)
        if window is None or not 1.0 <= window <= 600.0:
            ctx.warn(("metadata", "annotations", PREFIX + "budget-window"), f"{json.dumps(raw)} is not a duration "
                     "between 1s and 10m; the default is used", "bad_annotation")
            window = None
    return RetryBudgetSpec(
        enabled=enabled,
        percent=_number(ctx, PREFIX + "budget-percent", pct, 0.0, 1000.0) if pct is not None else None,
        min_retries_per_second=(_number(ctx, PREFIX + "budget-min-retries-per-second", floor, 0.0, 1e6)
                                if floor is not None else None),
        window=window)
