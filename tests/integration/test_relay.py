"""ztunnel's plain TCP relay on loopback under uvloop: early bytes, greetings, half-close, resets."""
import asyncio
import os
import socket

import pytest
import uvloop

from mesh.hbone import HoldingProtocol
from ztunnel.relay import relay


class _Accept(HoldingProtocol):
    def __init__(self, handle):
        super().__init__()
        self.handle = handle

    def connection_made(self, transport):
        super().connection_made(transport)
        asyncio.ensure_future(self.handle(transport))


async def _app(greeting: bytes):
    """An app that greets first (like a server banner), then echoes until EOF."""
    async def serve(r, w):
        w.write(greeting)
        while data := await r.read(65536):
            w.write(data)
        w.close()
    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def _proxy(app_port, results):
    async def handle(down):
        up = socket.socket()
        up.setblocking(False)
        await asyncio.get_running_loop().sock_connect(up, ("127.0.0.1", app_port))
        results.append(await relay(down, up))
    return await asyncio.get_running_loop().create_server(lambda: _Accept(handle), "127.0.0.1", 0)


@pytest.mark.parametrize("size", [0, 1, 70_000, 3_000_000])
def test_relay_greeting_early_bytes_and_half_close(size):
    async def main():
        app = await _app(b"hello\n")
        results = []
        proxy = await _proxy(app.sockets[0].getsockname()[1], results)
        port = proxy.sockets[0].getsockname()[1]
        for _ in range(20):  # races show up as lost or misplaced bytes
            payload = os.urandom(size)
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(payload)  # sent before the proxy has even connected upstream
            w.write_eof()
            got = await asyncio.wait_for(r.read(), 10)
            assert got == b"hello\n" + payload
            w.close()
        await asyncio.sleep(0.05)
        assert len(results) == 20
        assert all(x.bytes_sent == size and x.bytes_received == size + 6 and x.error is None for x in results)
        proxy.close()
        app.close()
    uvloop.run(main())


def test_relay_reports_a_reset_upstream():
    async def main():
        async def serve(r, w):
            await r.read(1)
            s = w.get_extra_info("socket")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            w.transport.abort()
        app = await asyncio.start_server(serve, "127.0.0.1", 0)
        results = []
        proxy = await _proxy(app.sockets[0].getsockname()[1], results)
        r, w = await asyncio.open_connection("127.0.0.1", proxy.sockets[0].getsockname()[1])
        w.write(b"x")
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            data = await asyncio.wait_for(r.read(), 5)
            if not data:
                raise ConnectionResetError  # closed without data is fine too, as long as it ends
        await asyncio.sleep(0.05)
        assert results and results[0].error == "connection_reset"
        proxy.close()
        app.close()
    uvloop.run(main())
