"""The recorder: each ConnectionResult becomes one access-log line, the metrics, and a recent-history entry."""
from __future__ import annotations

import collections
import json
import logging
from collections.abc import Callable
from typing import Any

from .result import ConnectionResult

__all__ = ["Recorder"]

access = logging.getLogger("ambient.access")


class Recorder:
    """Where every connection's result goes, exactly once: `record(result)`. The log line is
    `connection complete {json}` on the `ambient.access` logger, WARNING when it failed."""

    def __init__(self, metrics: Callable[[ConnectionResult], None] | None = None, size: int = 1000) -> None:
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)
        self.results: collections.deque[ConnectionResult] = collections.deque(maxlen=size)
        self.total = 0
        self._metrics = metrics

    def record(self, result: ConnectionResult) -> None:
        self.total += 1
        if self._metrics is not None:
            self._metrics(result)
        entry = result.log_fields()
        self.recent.append(entry)
        self.results.append(result)
        if access.isEnabledFor(logging.INFO):
            level = logging.WARNING if result.reason is not None else logging.INFO
            access.log(level, "connection complete %s", json.dumps(entry, separators=(",", ":")))
