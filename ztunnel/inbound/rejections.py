"""Rate-limited records of what the HBONE listener refused before any request (one per reason and window).

A flood of refused connections must not become a flood of log lines: the first refusal of a
reason in a window is recorded at once; the ones after it in the same window are counted and
recorded as one result with that `count` when the window ends (metrics add `count`).
Time is the injected clock; the flush is scheduled on the event loop.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from mesh.hbone import Rejection

__all__ = ["RejectionLimiter", "WINDOW"]

WINDOW = 1.0
"""Seconds: at most one record per reason and pod per window."""


@dataclass(slots=True)
class _Window:
    opened: float
    suppressed: int = 0
    last: Rejection | None = None
    flush: asyncio.TimerHandle | None = None


class RejectionLimiter:
    def __init__(self, now: Callable[[], float], emit: Callable[[Rejection, int], None],
                 window: float = WINDOW) -> None:
        self._now = now
        self._emit = emit
        self._window = window
        self._open: dict[str, _Window] = {}

    def __call__(self, r: Rejection) -> None:
        now = self._now()
        win = self._open.get(r.reason)
        if win is not None and now - win.opened < self._window:
            win.suppressed += 1
            win.last = r
            if win.flush is None:
                win.flush = asyncio.get_running_loop().call_later(
                    win.opened + self._window - now, self._flush, r.reason)
            return
        self._open[r.reason] = _Window(opened=now)
        self._emit(r, 1)

    def _flush(self, reason: str) -> None:
        win = self._open.pop(reason, None)
        if win is not None and win.suppressed and win.last is not None:
            self._open[reason] = _Window(opened=self._now())
            self._emit(win.last, win.suppressed)

    def close(self) -> None:
        """Record what is still pending now (nothing suppressed is lost) and stop the timers."""
        for reason, win in list(self._open.items()):
            if win.flush is not None:
                win.flush.cancel()
            if win.suppressed and win.last is not None:
                self._emit(win.last, win.suppressed)
        self._open.clear()
