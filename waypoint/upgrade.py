"""WebSocket passthrough: after a 101 the waypoint relays raw bytes both ways between the two HTTP/1.1 connections.

The codecs have switched both connections to TUNNEL (waypoint/http/codec.py): every read
comes out as a Body of raw bytes and every Body sent goes out as is, so the relay is two
copy loops with the channels' flow control (a slow reader pauses the other side's reads, as
for bodies). A peer's end of stream half-closes the other side (write_eof: an HBONE stream
sends END_STREAM), so a close handshake in either direction finishes; the relay is over when
both directions have ended, or at once when either connection is gone entirely. The request
is recorded once, at the end, with status 101 and the bytes of both directions.
"""
from __future__ import annotations

import asyncio

from .channel import HttpChannel
from .http import Body, EndOfMessage

__all__ = ["relay"]


async def _copy(src: HttpChannel, dst: HttpChannel, counts: list[int], i: int) -> None:
    """src -> dst until src ends; then half-close dst. Bytes copied go to counts[i]."""
    codec = dst.codec  # type: ignore[attr-defined]
    while True:
        ev = await src.next()
        if ev is None:
            t = dst.transport
            if t is not None and not dst.lost:
                if t.can_write_eof():    # type: ignore[attr-defined]
                    t.write_eof()        # type: ignore[attr-defined]
                else:
                    t.close()
            return
        if type(ev) is Body:
            counts[i] += len(ev.data)
            dst.write(codec.send(ev))
            if dst.writing_paused:
                await dst.drain()
            if dst.lost:
                return


async def relay(down: HttpChannel, up: HttpChannel) -> tuple[int, int]:
    """Relay until both directions end (or one connection is gone): (bytes up, bytes down)."""
    counts = [0, 0]
    to_up = asyncio.ensure_future(_copy(down, up, counts, 0))
    to_down = asyncio.ensure_future(_copy(up, down, counts, 1))
    try:
        pending = {to_up, to_down}
        while pending:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if pending and (down.lost or up.lost):
                break                    # one side is gone entirely: nothing more can flow
    finally:
        for t in (to_up, to_down):
            if not t.done():
                t.cancel()
        await asyncio.gather(to_up, to_down, return_exceptions=True)
    if not down.lost:
        down.write(down.codec.send(EndOfMessage()))   # type: ignore[attr-defined]  # TUNNEL -> CLOSED
    return counts[0], counts[1]
