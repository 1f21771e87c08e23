"""Injected time: a Clock protocol (wall-clock seconds, async sleep) and the system clock."""
from __future__ import annotations

import asyncio
import time
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    """Wall-clock time and sleeping, injected so tests can run on virtual time."""

    def now(self) -> float:
        """Seconds since the epoch (certificate validity is wall-clock time)."""
        ...

    async def sleep(self, seconds: float) -> None:
        ...


class SystemClock:
    """The real clock: time.time and asyncio.sleep."""

    __slots__ = ()

    # time.time itself, not a method calling it: the waypoint reads the clock ~10 times per
    # request, and each Python-level call was a frame (a staticmethod keeps `clock.now()`).
    now = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
