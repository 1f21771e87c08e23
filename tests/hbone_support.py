"""Shared HBONE test fixtures: certificates, echo backends, a raw-pool driver (the real ztunnel is in tests/inprocess)."""
from __future__ import annotations

import asyncio
import gc
import socket
import warnings
from dataclasses import dataclass, field

from mesh import tls
from controlplane.ca import CertificateAuthority
from mesh.clock import SystemClock
from mesh.hbone.tunnel import retire
from mesh.hbone import HbonePool, HoldingProtocol, PoolKey, TunnelError, TunnelResult
from mesh.identity import SpiffeId

TD = "cluster.local"
CLIENT_ID = SpiffeId(trust_domain=TD, namespace="default", service_account="client")
SERVER_ID = SpiffeId(trust_domain=TD, namespace="default", service_account="server")


@dataclass
class Pki:
    ca: CertificateAuthority
    client_ctx_count: int = 0

    @classmethod
    def create(cls, trust_domain: str = TD) -> Pki:
        # OpenSSL checks validity against the real (coarse) clock: the CA backdates notBefore for it.
        return cls(CertificateAuthority.generate(trust_domain, clock=SystemClock()))

    def server_context(self, identity: SpiffeId = SERVER_ID):
        return tls.server_context(self.ca.issue(identity), self.ca.roots_pem)

    def client_context(self, identity: SpiffeId = CLIENT_ID):
        return tls.client_context(self.ca.issue(identity), self.ca.roots_pem)


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    sock.setblocking(False)
    return sock


async def connect_socket(addr: tuple[str, int]) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, addr)
    except BaseException:
        sock.close()
        raise
    return sock


async def dial_authority(authority: str) -> socket.socket:
    host, _, port = authority.rpartition(":")
    return await connect_socket((host, int(port)))


class EchoProtocol(asyncio.Protocol):
    """Echoes bytes back and closes after the peer's EOF (once what it echoed is flushed),
    pausing reads while its writes are paused."""

    def connection_made(self, transport):
        self.t = transport

    def data_received(self, data):
        self.t.write(data)

    def eof_received(self):
        # Everything received is echoed (or buffered): close, which flushes, then FINs. Not
        # write_eof() + keep open: the loop stops reading after EOF, so the peer's close would
        # never be seen, and the transport, open and referenced only by this protocol, would
        # be left to the GC -- which crashes uvloop 0.23 when it frees a stream whose shutdown
        # is still pending (tests/bench/repro_uvloop_shutdown_crash.py; the Envoy interop
        # crash, core dumps: an accepted echo transport, _eof=1, not reading, not closing).
        self.t.close()
        return True

    def connection_lost(self, exc):
        retire(self.t)  # see mesh.hbone.tunnel.retire

    def pause_writing(self):
        self.t.pause_reading()

    def resume_writing(self):
        self.t.resume_reading()


def unclosed_transports() -> list[str]:
    """Transports the GC finds still open (uvloop warns "unclosed resource" as it frees them).
    Each is a bug: uvloop 0.23 crashes freeing an open stream whose write_eof() shutdown is
    pending (tests/bench/repro_uvloop_shutdown_crash.py), so owners must close or abort them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    return [str(w.message) for w in caught if "unclosed" in str(w.message)]


async def start_echo() -> tuple[asyncio.AbstractServer, tuple[str, int]]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, sock=listening_socket())
    return server, server.sockets[0].getsockname()[:2]


@dataclass
class Outbound:
    """Drives `HbonePool.tunnel` directly, for tests about the pool itself: every accepted TCP
    connection is handed to the pool towards one HBONE server and its TunnelResult/TunnelError
    kept in `tasks`. Not ztunnel: tests of ztunnel's outbound use the real OutboundProxy
    (tests/inprocess/harness.py)."""

    pool: HbonePool
    server_addr: tuple[str, int]
    ssl_context: object
    authority: str
    key: PoolKey = field(default_factory=lambda: PoolKey(src_identity=CLIENT_ID, dst_identity=SERVER_ID,
                                                         src_ip="127.0.0.1", dst_ip="127.0.0.1"))
    headers: tuple = ()
    tasks: list = field(default_factory=list)
    server: asyncio.AbstractServer | None = None
    addr: tuple[str, int] = ("", 0)
    connects: int = 0

    async def start(self) -> Outbound:
        loop = asyncio.get_running_loop()
        outer = self

        class Accept(HoldingProtocol):
            def connection_made(self, transport):
                super().connection_made(transport)
                outer.tasks.append(loop.create_task(outer._run(transport)))

        self.server = await loop.create_server(Accept, sock=listening_socket())
        self.addr = self.server.sockets[0].getsockname()[:2]
        return self

    async def _connect(self) -> socket.socket:
        self.connects += 1
        return await connect_socket(self.server_addr)

    async def _run(self, transport) -> TunnelResult | TunnelError:
        try:
            return await self.pool.tunnel(self.key, downstream=transport, connect=self._connect,
                                          ssl_context=lambda: self.ssl_context, authority=self.authority,
                                          headers=self.headers, trust_domain=TD)
        except TunnelError as e:
            return e

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def echo_roundtrip(addr: tuple[str, int], payload: bytes, *, chunk: int = 256 * 1024) -> bytes:
    """Send `payload`, half-close, read everything back until EOF (concurrently)."""
    reader, writer = await asyncio.open_connection(*addr)

    async def send():
        for i in range(0, len(payload), chunk):
            writer.write(payload[i:i + chunk])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    received = bytearray()
    while True:
        data = await reader.read(1 << 20)
        if not data:
            break
        received += data
    await sender
    writer.close()
    # Drop the transport only once uvloop is done with it: uvloop 0.23 frees a half-closed
    # stream inside libuv's close callback otherwise (SIGSEGV/SIGABRT in UVStream dealloc from
    # __uv_stream_on_shutdown, seen in the Envoy interop test about 4 runs in 10).
    await writer.wait_closed()
    return bytes(received)
