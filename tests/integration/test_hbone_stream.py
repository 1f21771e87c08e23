"""HBONE at stream level over real loopback mTLS: open streams from the pool, CONNECTs terminated in process,
half-close, flow control, resets, pool reservations, handler shapes."""
from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct

import pytest
import uvloop

from mesh.hbone import HbonePool, HboneServer, Reject, TunnelError, splice
from mesh.hbone.connection import ConnectionConfig
from tests.hbone_stream_support import AUTHORITY, KEY, Collect, Echo, Terminating, open_stream
from tests.hbone_support import (CLIENT_ID, SERVER_ID, TD, Outbound, Pki, dial_authority, echo_roundtrip,
                                 listening_socket, start_echo)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.create()


def run(coro, timeout: float = 60):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return uvloop.run(bounded())


def test_terminated_connect_echoes_tcp_client_byte_exact(pki):
    """ztunnel-style client (pool.tunnel from a TCP socket) -> server accepting in process."""
    async def main():
        srv = await Terminating(Echo).start(pki)
        pool = HbonePool()
        out = await Outbound(pool, srv.addr, pki.client_context(), AUTHORITY).start()
        payload = os.urandom(3 * 1024 * 1024 + 17)
        assert await echo_roundtrip(out.addr, payload) == payload
        (client_res,) = await asyncio.gather(*out.tasks)
        (server_res,) = await srv.wait_results(1)
        assert client_res.error is None and server_res.error is None
        assert client_res.bytes_sent == server_res.bytes_received == len(payload)
        assert server_res.bytes_sent == client_res.bytes_received == len(payload)
        assert server_res.status == client_res.status == 200
        (stream,) = srv.streams
        assert stream.get_extra_info("peer_identity") == CLIENT_ID
        assert stream.get_extra_info("authority") == AUTHORITY
        assert stream.get_extra_info("peername")[0] == "127.0.0.1"
        await out.close()
        await pool.close()
        srv.close()
    run(main())


class MiniHttpServer(Collect):
    """Answers each `GET <path>` request head with a Content-Length body, keep-alive."""

    def data_received(self, data) -> None:
        super().data_received(data)
        while b"\r\n\r\n" in self.data:
            head, _, rest = bytes(self.data).partition(b"\r\n\r\n")
            self.data = bytearray(rest)
            method, path, _ = head.split(b"\r\n")[0].split(b" ")
            body = b"you asked for " + path
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)

    def eof_received(self):
        super().eof_received()
        self.transport.close()
        return True


async def http_get(stream, path: bytes, proto: Collect) -> bytes:
    start = len(proto.data)
    stream.write(b"GET " + path + b" HTTP/1.1\r\nhost: svc\r\n\r\n")
    data = await proto.wait_data(start + 1)
    while True:
        head, sep, body = bytes(proto.data[start:]).partition(b"\r\n\r\n")
        if sep:
            n = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
            if len(body) >= n:
                return body[:n]
        data = await proto.wait_data(len(data) + 1)


def test_http_requests_over_pooled_client_streams(pki):
    async def main():
        srv = await Terminating(MiniHttpServer).start(pki)
        pool = HbonePool()
        bodies = []
        for i in range(3):                                  # 3 streams, 2 requests each, one connection
            stream = await open_stream(pool, pki, srv.addr, headers=(("baggage", f"k=v{i}"),))
            proto = Collect()
            stream.set_protocol(proto)
            bodies.append(await http_get(stream, b"/a%d" % i, proto))
            bodies.append(await http_get(stream, b"/b%d" % i, proto))
            stream.write_eof()
            await asyncio.wait_for(proto.lost, 5)
            res = await stream.done
            assert res.error is None and res.status == 200
        assert bodies == [b"you asked for /%s%d" % (c, i) for i in range(3) for c in (b"a", b"b")]
        assert pool.connections_opened == 1
        assert [s.get_extra_info("headers") for s in srv.streams] == [(("baggage", f"k=v{i}"),) for i in range(3)]
        assert all(r.error is None for r in await srv.wait_results(3))
        await pool.close()
        srv.close()
    run(main())


class WriteAfterEof(Collect):
    """Server that, on the client's END_STREAM, answers with what it read, then ends."""

    def eof_received(self):
        super().eof_received()
        self.transport.write(b"got:" + bytes(self.data))
        self.transport.write_eof()
        return True


class HalfCloseFirst(Collect):
    """Server that says hello and half-closes at once, then keeps reading."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        transport.write(b"hello")
        transport.write_eof()


def test_half_close_client_first_server_keeps_writing(pki):
    async def main():
        srv = await Terminating(WriteAfterEof).start(pki)
        pool = HbonePool()
        stream = await open_stream(pool, pki, srv.addr)
        proto = Collect()
        stream.set_protocol(proto)
        stream.write(b"ping")
        stream.write_eof()
        assert await asyncio.wait_for(proto.eof, 5) == b"got:ping"
        assert (await stream.done).error is None
        assert await asyncio.wait_for(proto.lost, 5) is None
        (res,) = await srv.wait_results(1)
        assert res.error is None and res.bytes_received == 4 and res.bytes_sent == 8
        await pool.close()
        srv.close()
    run(main())


def test_half_close_server_first_client_keeps_writing(pki):
    async def main():
        srv = await Terminating(HalfCloseFirst).start(pki)
        pool = HbonePool()
        stream = await open_stream(pool, pki, srv.addr)
        proto = Collect()
        stream.set_protocol(proto)
        assert await asyncio.wait_for(proto.eof, 5) == b"hello"
        assert not stream.done.done()                       # our direction is still open
        stream.write(b"after your eof")
        stream.write_eof()
        assert (await stream.done).error is None
        (sproto,) = srv.protocols
        assert await asyncio.wait_for(sproto.eof, 5) == b"after your eof"
        (res,) = await srv.wait_results(1)
        assert res.error is None
        await pool.close()
        srv.close()
    run(main())


class SlowReader(Collect):
    """Server that does not read until told to (pause_reading from connection_made)."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        transport.pause_reading()

    def eof_received(self):
        super().eof_received()
        self.transport.write(hashlib.sha256(self.data).hexdigest().encode())
        self.transport.write_eof()
        return True


def test_paused_reader_bounds_buffering_and_resume_completes_byte_exact(pki):
    async def main():
        window = 1024 * 1024
        config = ConnectionConfig(initial_window_size=window)
        srv = await Terminating(SlowReader).start(pki, config=config)
        pool = HbonePool(config=config)
        stream = await open_stream(pool, pki, srv.addr)
        proto = Collect()
        stream.set_protocol(proto)
        payload = os.urandom(8 * 1024 * 1024)
        chunk = 64 * 1024

        async def send():
            for i in range(0, len(payload), chunk):
                await proto.writable.wait()
                stream.write(payload[i:i + chunk])
            stream.write_eof()

        sender = asyncio.create_task(send())

        async def blocked():
            while proto.writable.is_set():
                await asyncio.sleep(0.005)
        await asyncio.wait_for(blocked(), 10)            # the sender ran into the window...
        await asyncio.sleep(0.2)                           # ...and what was in flight has landed
        (sstream,) = srv.streams
        held = sum(len(c) for c in sstream.early or ())
        assert 0 < held <= window                          # the peer's window bounds what we hold
        assert len(srv.protocols[0].data) == 0              # nothing delivered while paused
        assert not proto.writable.is_set() and proto.pauses >= 1     # the sender is blocked by the window
        assert stream.get_write_buffer_size() <= chunk
        before = held
        await asyncio.sleep(0.2)
        assert sum(len(c) for c in sstream.early or ()) == before    # and stays blocked
        sstream.resume_reading()
        digest = await asyncio.wait_for(proto.eof, 30)
        await sender
        assert digest == hashlib.sha256(payload).hexdigest().encode()
        assert proto.resumes >= 1
        res = await stream.done
        assert res.error is None and res.bytes_sent == len(payload)
        (sres,) = await srv.wait_results(1)
        assert sres.bytes_received == len(payload)
        await pool.close()
        srv.close()
    run(main())


@pytest.mark.parametrize("who", ["client", "server"])
def test_abort_resets_the_peer(pki, who):
    async def main():
        srv = await Terminating(Collect).start(pki)
        pool = HbonePool()
        stream = await open_stream(pool, pki, srv.addr)
        proto = Collect()
        stream.set_protocol(proto)
        stream.write(b"x")
        while not srv.streams:
            await asyncio.sleep(0.005)
        (sstream,) = srv.streams
        (sproto,) = srv.protocols
        await sproto.wait_data(1)
        aborter, aborted, aborter_proto, aborted_proto = (
            (stream, sstream, proto, sproto) if who == "client" else (sstream, stream, sproto, proto))
        aborter.abort("test_abort")
        assert aborter.is_closing()
        lost = await asyncio.wait_for(aborted_proto.lost, 5)
        assert isinstance(lost, TunnelError) and lost.reason == "peer_reset"
        assert (await aborted.done).error == "peer_reset"
        assert (await aborter.done).error == "test_abort"
        assert (await asyncio.wait_for(aborter_proto.lost, 5)).reason == "test_abort"
        (sres,) = await srv.wait_results(1)
        assert sres.error == ("peer_reset" if who == "client" else "test_abort")
        await pool.close()
        srv.close()
    run(main())


def test_tcp_reset_on_client_side_resets_in_process_server_stream(pki):
    async def main():
        srv = await Terminating(Collect).start(pki)
        pool = HbonePool()
        out = await Outbound(pool, srv.addr, pki.client_context(), AUTHORITY).start()
        reader, writer = await asyncio.open_connection(*out.addr)
        writer.write(b"abc")
        while not srv.protocols:
            await asyncio.sleep(0.005)
        await srv.protocols[0].wait_data(3)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()                            # RST from the app (linger 0)
        (cres,) = await asyncio.gather(*out.tasks)
        assert cres.error == "tcp_reset"
        lost = await asyncio.wait_for(srv.protocols[0].lost, 5)
        assert isinstance(lost, TunnelError) and lost.reason == "peer_reset"
        await pool.close()
        srv.close()
    run(main())


def test_pool_reservation_follows_the_stream(pki):
    async def main():
        srv = await Terminating(Echo).start(pki)
        pool = HbonePool(max_streams_per_conn=1)
        first = await open_stream(pool, pki, srv.addr)
        (session,) = pool._conns[KEY]
        assert session.reserved == 1 and session.idle_since is None
        second = await open_stream(pool, pki, srv.addr)      # the first connection is full
        assert pool.connections_opened == 2 and pool.connection_count(KEY) == 2
        first.set_protocol(Collect())
        first.write_eof()
        assert (await first.done).error is None
        await asyncio.sleep(0)
        assert session.reserved == 0 and session.idle_since is not None
        third = await open_stream(pool, pki, srv.addr)       # reuses the released connection
        assert pool.connections_opened == 2 and session.reserved == 1
        for s in (second, third):
            s.abort()
            assert (await s.done).error == "aborted"
        await asyncio.sleep(0)
        assert [c.reserved for c in pool._conns[KEY]] == [0, 0]
        await pool.close()
        srv.close()
    run(main())


def test_rejected_open_stream_raises_and_releases(pki):
    async def handler(req, pending):
        raise Reject(403, "denied_here")

    async def main():
        srv = await Terminating().start(pki, handler=handler)
        pool = HbonePool()
        with pytest.raises(TunnelError) as ei:
            await open_stream(pool, pki, srv.addr)
        assert ei.value.reason == "connect_rejected" and ei.value.status == 403
        (session,) = pool._conns[KEY]
        assert session.reserved == 0 and not session.tunnels
        (res,) = await srv.wait_results(1)
        assert res.error == "denied_here" and res.status == 403
        await pool.close()
        srv.close()
    run(main())


def test_bytes_before_set_protocol_are_held_both_sides(pki):
    async def main():
        gate = asyncio.Event()
        srv = Terminating(Collect)

        async def handler(req, pending):
            stream = pending.accept()
            stream.write(b"server-first")                    # before the client sets a protocol
            await gate.wait()                                # client bytes arrive meanwhile
            proto = Collect()
            srv.streams.append(stream)
            srv.protocols.append(proto)
            stream.set_protocol(proto)

        await srv.start(pki, handler=handler)
        pool = HbonePool()
        stream = await open_stream(pool, pki, srv.addr)
        stream.write(b"client-first")
        stream.write_eof()
        await asyncio.sleep(0.2)
        proto = Collect()
        stream.set_protocol(proto)
        assert await proto.wait_data(12) == b"server-first"
        gate.set()
        while not srv.protocols:
            await asyncio.sleep(0.005)
        assert await asyncio.wait_for(srv.protocols[0].eof, 5) == b"client-first"
        srv.streams[0].write_eof()
        assert (await stream.done).error is None
        await pool.close()
        srv.close()
    run(main())


@pytest.mark.parametrize("shape", ["splice", "return_socket"])
def test_two_argument_handler_splices_a_socket_200_after_attach(pki, shape):
    async def main():
        echo, backend = await start_echo()
        seen = []

        async def handler(req, pending):
            seen.append(pending.done.done())
            sock = await dial_authority(req.authority)
            if shape == "return_socket":
                return sock
            await pending.splice(sock)
            return None

        srv = await HboneServer.start(listening_socket(), pki.server_context(), handler, trust_domain=TD)
        pool = HbonePool()
        out = await Outbound(pool, srv.sockets[0].getsockname()[:2], pki.client_context(),
                             f"{backend[0]}:{backend[1]}").start()
        payload = os.urandom(100_000)
        assert await echo_roundtrip(out.addr, payload) == payload
        (res,) = await asyncio.gather(*out.tasks)
        assert res.error is None and res.bytes_received == len(payload) and seen == [False]
        await out.close()
        await pool.close()
        srv.close()
        echo.close()
    run(main())


def test_undecided_handler_is_answered_503(pki):
    async def handler(req, pending):
        return None

    async def main():
        srv = await Terminating().start(pki, handler=handler)
        pool = HbonePool()
        with pytest.raises(TunnelError) as ei:
            await open_stream(pool, pki, srv.addr)
        assert ei.value.status == 503
        (res,) = await srv.wait_results(1)
        assert res.error == "handler_failed"
        await pool.close()
        srv.close()
    run(main())


def test_splice_an_open_client_stream_to_tcp(pki):
    """The waypoint's other half: open a stream, then splice it to a TCP transport itself."""
    async def main():
        srv = await Terminating(Echo).start(pki)
        pool = HbonePool()
        loop = asyncio.get_running_loop()
        accepted = loop.create_future()
        lsock = listening_socket()
        tcp_server = await loop.create_server(lambda: _Handoff(accepted), sock=lsock)
        reader, writer = await asyncio.open_connection(*lsock.getsockname()[:2])
        transport = await accepted
        stream = await open_stream(pool, pki, srv.addr)
        done = splice(stream, transport)
        with pytest.raises(RuntimeError):
            stream.write(b"no")                              # it belongs to the splice now
        writer.write(b"spliced")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"spliced"
        res = await asyncio.wait_for(done, 5)
        assert res.error is None and res.bytes_sent == res.bytes_received == 7
        assert done is stream.done
        writer.close()
        tcp_server.close()
        await pool.close()
        srv.close()
    run(main())


class _Handoff(asyncio.Protocol):
    def __init__(self, fut) -> None:
        self.fut = fut

    def connection_made(self, transport) -> None:
        transport.pause_reading()
        self.fut.set_result(transport)


def test_server_identity_is_exposed_on_client_streams(pki):
    async def main():
        srv = await Terminating(Echo).start(pki)
        pool = HbonePool()
        stream = await open_stream(pool, pki, srv.addr)
        assert stream.get_extra_info("peer_identity") == SERVER_ID
        assert stream.get_extra_info("stream_id") == 1 and stream.get_extra_info("status") == 200
        stream.abort()
        await stream.done
        await pool.close()
        srv.close()
    run(main())


def test_handler_failing_after_accept_resets_instead_of_answering_twice(pki):
    async def handler(req, pending):
        pending.accept()
        raise RuntimeError("boom after the 200")

    async def main():
        srv = await Terminating().start(pki, handler=handler)
        pool = HbonePool()
        stream = await open_stream(pool, pki, srv.addr)      # the 200 got through
        proto = Collect()
        stream.set_protocol(proto)
        lost = await asyncio.wait_for(proto.lost, 5)
        assert isinstance(lost, TunnelError) and lost.reason == "peer_reset"
        assert not proto.eof.done()                          # no second HEADERS read as an end
        (res,) = await srv.wait_results(1)
        assert res.error == "handler_failed" and res.status == 200
        await pool.close()
        srv.close()
    run(main())
