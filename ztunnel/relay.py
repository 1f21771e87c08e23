"""Plain TCP relay between two transports, with backpressure and half-close (passthrough, 15006).

Each side is an asyncio.Protocol whose data goes straight to the other side's transport. When
the other side's write buffer passes its high-water mark, asyncio calls `pause_writing` on that
side, and we stop reading from this one until `resume_writing`: memory per connection stays
bounded by the two write buffers. EOF from one side becomes `write_eof` on the other (TCP
half-close); the relay ends when both directions ended or either side fails.
"""
from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from mesh.hbone.tunnel import retire

__all__ = ["RelayResult", "relay", "HIGH_WATER", "LOW_WATER"]

HIGH_WATER = 512 * 1024
LOW_WATER = 128 * 1024


@dataclass(frozen=True, slots=True)
class RelayResult:
    bytes_sent: int
    """Bytes from the downstream (first) side to the upstream side."""
    bytes_received: int
    """Bytes from upstream back to downstream."""
    error: str | None = None


class _Side(asyncio.Protocol):
    __slots__ = ("transport", "peer", "count", "eof", "done", "error", "pending", "pending_eof")

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.count = 0
        self.eof = False
        self.done = done
        self.error: str | None = None
        self.pending: list[bytes] = []
        """Bytes for this side that arrived before its transport existed (set up in order)."""
        self.pending_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)  # type: ignore[attr-defined]
        if self.pending:
            transport.write(b"".join(self.pending))  # type: ignore[attr-defined]
            self.pending.clear()
            peer = self.peer.transport  # type: ignore[union-attr]
            if peer is not None and not peer.is_closing():
                peer.resume_reading()
        if self.pending_eof and transport.can_write_eof():  # type: ignore[attr-defined]
            transport.write_eof()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.count += len(data)
        peer = self.peer  # type: ignore[union-attr]
        if peer.transport is None:  # the other side is still being set up: hold, stop reading
            peer.pending.append(data)
            self.transport.pause_reading()  # type: ignore[union-attr]
            return
        peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer.transport  # type: ignore[union-attr]
        if peer is None:
            self.peer.pending_eof = True  # type: ignore[union-attr]
        elif peer.can_write_eof() and not peer.is_closing():
            peer.write_eof()
        if self.peer.eof:  # type: ignore[union-attr]
            self._finish(None)
        return True  # keep our write side open: the other direction may still flow

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        if not self.peer.transport.is_closing():  # type: ignore[union-attr]
            self.peer.transport.resume_reading()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.error = "connection_reset"
        self._finish(self.error)

    def _finish(self, error: str | None) -> None:
        for side in (self, self.peer):
            t = side.transport  # type: ignore[union-attr]
            if t is None:
                continue
            if not t.is_closing():
                if error:
                    t.abort()
                else:
                    t.close()
            retire(t)
        if not self.done.done():
            self.done.set_result(None)


async def relay(downstream: asyncio.Transport, upstream: socket.socket) -> RelayResult:
    """Take over `downstream` (reading paused by the caller) and relay it with `upstream`
    (a connected non-blocking socket) until both directions end."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    down, up = _Side(done), _Side(done)
    down.peer, up.peer = up, down
    try:
        await loop.create_connection(lambda: up, sock=upstream)
    except OSError:
        downstream.abort()
        raise
    held = downstream.get_protocol()
    downstream.set_protocol(down)
    down.connection_made(downstream)
    # Bytes (or EOF) that arrived before the hand-off were kept by a HoldingProtocol: replay.
    for chunk in getattr(held, "held", ()):
        down.data_received(chunk)
    if getattr(held, "lost", False):
        down.connection_lost(None)
    elif getattr(held, "eof", False):
        down.eof_received()
    else:
        downstream.resume_reading()
    try:
        await done
    finally:
        for s in (down, up):
            if s.transport is not None and not s.transport.is_closing():
                s.transport.abort()
    error = down.error or up.error
    return RelayResult(bytes_sent=down.count, bytes_received=up.count, error=error)
