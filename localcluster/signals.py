"""SIGTERM/SIGINT -> an asyncio.Event, safely in a process whose helpers fork (pyroute2)."""
from __future__ import annotations

import asyncio
import os
import signal

__all__ = ["set_on_signals"]


def set_on_signals(done: asyncio.Event) -> None:
    """Set `done` (in the running loop) when this process gets SIGTERM or SIGINT.

    Not loop.add_signal_handler: pyroute2 forks helpers that inherit the loop's signal wakeup
    fd, and a signal sent to such a child would stop this process. A plain handler runs in
    the process that got the signal; a child just dies as it would by default.
    """
    loop = asyncio.get_running_loop()
    me = os.getpid()

    def on_signal(sig: int, _frame: object) -> None:
        if os.getpid() != me:
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
            return
        loop.call_soon_threadsafe(done.set)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
