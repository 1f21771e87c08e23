"""Graceful restart of one system-workload replica: the new process first, then the old one drains."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from localcluster import procs
from localcluster.api import ApiError
from localcluster.system import Proc, ProcSpec

__all__ = ["hand_over", "drain_timeout"]

log = logging.getLogger("ambient.runner")


def drain_timeout(env: dict[str, str]) -> float:
    """The drain deadline of a ztunnel started with `env` (ZTUNNEL_DRAIN_TIMEOUT; default 5 s)."""
    try:
        return max(0.0, float(env.get("ZTUNNEL_DRAIN_TIMEOUT", 5.0)))
    except ValueError:
        return 5.0


def _keep(old: Proc) -> None:
    """The new process failed: it may have pointed capture at its listeners, gone with it;
    SIGHUP makes the old one point capture at its own again."""
    if old.running and old.pid is not None:
        try:
            os.kill(old.pid, signal.SIGHUP)
        except ProcessLookupError:
            pass


async def hand_over(old: Proc, spec: ProcSpec, dump: Callable[[], Awaitable[dict[str, Any] | None]],
                    version: Callable[[], int], *, timeout: float,
                    on_serving: Callable[[Proc], None]) -> dict[str, Any]:
    """Start `spec` next to `old`; once its admin socket says it is the new process, `serving`
    every local pod with the control plane's current `version`, call `on_serving(new)` and
    SIGTERM `old` (it drains, then exits; SIGKILL after its drain deadline + 5 s). If the
    new one dies or is not serving within `timeout`, it is stopped and `old` keeps running."""
    new = Proc.of(spec)
    new.restarts, new.streak = old.restarts, old.streak
    t0 = time.monotonic()
    new.start()
    while True:
        if not new.running:
            _keep(old)
            raise ApiError(f"the new {spec.label} exited ({new.popen.returncode}) before it served its pods; "
                           f"the old one keeps running (see {spec.log_path})", "restart_failed")
        d = await dump()
        if d and d.get("pid") == new.pid and d.get("serving") and d.get("version", 0) >= version():
            break
        if time.monotonic() - t0 > timeout:
            await asyncio.to_thread(new.stop, now=True)
            _keep(old)
            raise ApiError(f"the new {spec.label} was not serving its pods after {timeout:g}s; "
                           f"the old one keeps running (see {spec.log_path})", "restart_failed")
        await asyncio.sleep(0.05)
    serving = time.monotonic() - t0
    on_serving(new)
    t1 = time.monotonic()
    code = None
    if old.popen is not None:
        code = await asyncio.to_thread(procs.stop, old.popen, drain_timeout(dict(spec.env)) + 5.0)
    drained = time.monotonic() - t1
    log.info("%s restarted: pid %s -> %s (serving after %.2fs, old one gone after %.2fs)", spec.label,
             old.pid, new.pid, serving, drained)
    return {"old_pid": old.pid, "new_pid": new.pid, "serving_s": round(serving, 3),
            "drain_s": round(drained, 3), "old_exit": code}
