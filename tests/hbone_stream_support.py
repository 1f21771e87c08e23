"""Fixtures for HBONE stream-level tests: an in-process terminating HboneServer and consumer protocols."""
from __future__ import annotations

import asyncio

from mesh.hbone import HbonePool, HboneServer, HboneStream, PendingStream, PoolKey, TunnelResult
from tests.hbone_support import CLIENT_ID, SERVER_ID, TD, Pki, connect_socket, listening_socket

KEY = PoolKey(src_identity=CLIENT_ID, dst_identity=SERVER_ID, src_ip="127.0.0.1", dst_ip="127.0.0.1")
AUTHORITY = "127.0.0.1:8080"           # never dialled: the server terminates in process


class Collect(asyncio.Protocol):
    """Consumer that keeps everything it is given and records the callbacks it saw."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport: HboneStream | None = None
        self.data = bytearray()
        self.eof = loop.create_future()
        self.lost = loop.create_future()
        self.pauses = 0
        self.resumes = 0
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data) -> None:
        self.data += data

    def eof_received(self):
        if not self.eof.done():
            self.eof.set_result(bytes(self.data))
        return True

    def connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.pauses += 1
        self.writable.clear()

    def resume_writing(self) -> None:
        self.resumes += 1
        self.writable.set()

    async def wait_data(self, n: int, timeout: float = 10) -> bytes:
        async def until():
            while len(self.data) < n:
                await asyncio.sleep(0.005)
        await asyncio.wait_for(until(), timeout)
        return bytes(self.data)


class Echo(Collect):
    """Consumer that echoes what it reads and answers END_STREAM with END_STREAM."""

    def data_received(self, data) -> None:
        super().data_received(data)
        self.transport.write(bytes(data))

    def eof_received(self):
        super().eof_received()
        self.transport.write_eof()
        return True


class Terminating:
    """HboneServer whose handler accepts every CONNECT in process with `factory()` as the
    consumer; `streams` and `results` record what it served."""

    def __init__(self, factory=Echo) -> None:
        self.factory = factory
        self.streams: list[HboneStream] = []
        self.protocols: list[Collect] = []
        self.results: list[TunnelResult] = []
        self.server: HboneServer | None = None
        self.addr: tuple[str, int] = ("", 0)

    async def handler(self, req, pending: PendingStream) -> None:
        stream = pending.accept()
        proto = self.factory()
        self.streams.append(stream)
        self.protocols.append(proto)
        stream.set_protocol(proto)

    async def start(self, pki: Pki, handler=None, **kw) -> Terminating:
        self.server = await HboneServer.start(listening_socket(), pki.server_context(), handler or self.handler,
                                              trust_domain=TD, on_result=lambda req, res: self.results.append(res),
                                              **kw)
        self.addr = self.server.sockets[0].getsockname()[:2]
        return self

    async def wait_results(self, n: int, timeout: float = 10) -> list[TunnelResult]:
        async def until():
            while len(self.results) < n:
                await asyncio.sleep(0.005)
        await asyncio.wait_for(until(), timeout)
        return self.results

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def open_stream(pool: HbonePool, pki: Pki, addr: tuple[str, int], *, ctx=None, headers=()) -> HboneStream:
    ctx = ctx or pki.client_context()
    return await pool.open_stream(KEY, connect=lambda: connect_socket(addr), ssl_context=lambda: ctx,
                                  authority=AUTHORITY, headers=headers, trust_domain=TD)
