"""The waypoint process's access log: `ambient.access` records to stderr in the log format, written once per event-loop turn.

One line per request through logging's StreamHandler cost a `write` syscall and a strftime per
request (~5% of the waypoint's CPU per request under load). This handler formats the same line
("%(asctime)s %(levelname)s %(name)s %(message)s", as mesh.proxy.bootstrap.setup_logging) with
the date part cached per second, and collects the lines of one event-loop turn into one write
(Envoy buffers its access log too, flushing every second; here a line waits at most for the
current loop turn). Outside a running loop a line is written at once. `line()` writes the same
line without a LogRecord (the pipeline's per-request call). `install` is for the process entry
point only: in-process tests keep the logging records (caplog).
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import time
from typing import TextIO

__all__ = ["BatchedLineHandler", "install"]


class BatchedLineHandler(logging.Handler):
    """Formats records as the process log does and writes them batched per loop turn."""

    def __init__(self, stream: TextIO, name: str = "ambient.access") -> None:
        super().__init__()
        self.stream = stream
        self.name = name
        self._lines: list[str] = []
        self._scheduled = False
        self._sec = -1
        self._date = ""

    def _stamp(self, created: float) -> str:
        sec = int(created)
        if sec != self._sec:
            self._sec, self._date = sec, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec))
        return f"{self._date},{int((created - sec) * 1000):03d}"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(f"{self._stamp(record.created)} {record.levelname} {record.name} {record.getMessage()}\n")
        except Exception:
            self.handleError(record)
            return
        self._schedule()

    def line(self, message: str) -> None:
        """What `logger.info("%s", message)` would write, without building a LogRecord (the
        waypoint's per-request path calls this; the caller checks the logger's level)."""
        self._lines.append(f"{self._stamp(time.time())} INFO {self.name} {message}\n")
        self._schedule()

    def _schedule(self) -> None:
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        lines, self._lines = self._lines, []
        if not lines:
            return
        try:
            self.stream.write("".join(lines))
            self.stream.flush()
        except (OSError, ValueError):   # stderr gone (shutdown): the lines cannot be written anywhere
            pass

    def close(self) -> None:
        self.flush()
        super().close()


def install(stream: TextIO, name: str = "ambient.access") -> BatchedLineHandler:
    """Route logger `name` to a batched handler on `stream` (instead of the root handler)."""
    h = BatchedLineHandler(stream, name)
    logger = logging.getLogger(name)
    logger.addHandler(h)
    logger.propagate = False
    atexit.register(h.flush)
    return h
