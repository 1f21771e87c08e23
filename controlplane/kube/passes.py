"""The reconcile loop the Kubernetes controllers share: one pass per burst of events, failed passes retried with backoff."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from .api import ApiError
from .reflector import backoff_delay

__all__ = ["run_passes"]


async def run_passes(*, synced: Iterable[asyncio.Event], dirty: asyncio.Event, reconcile: Callable[[], Awaitable[None]],
                     ok: Callable[[], bool], on_failure: Callable[[], None], jitter: Callable[[], float],
                     what: str, log: logging.Logger) -> None:
    """Once everything in `synced` is listed, run `reconcile` after every `dirty.set()`; a pass
    that raises or leaves `ok()` false is retried with backoff on a timer, not by sleeping: what
    keeps failing must not delay the next event's pass for everything else."""
    await asyncio.gather(*(e.wait() for e in synced))
    failures = 0
    retry: asyncio.TimerHandle | None = None
    while True:
        await dirty.wait()
        dirty.clear()
        await asyncio.sleep(0)  # let the rest of this burst's events land first
        try:
            await reconcile()
            good = ok()
        except ApiError as e:
            log.warning("%s failed: %s; retrying", what, e)
            good = False
        except Exception:  # a bug in one pass must not end the controller: log it, retry
            log.exception("%s raised; retrying", what)
            good = False
        if retry is not None:
            retry.cancel()
            retry = None
        if good:
            failures = 0
            continue
        failures += 1
        on_failure()
        retry = asyncio.get_running_loop().call_later(backoff_delay(failures, jitter()), dirty.set)
