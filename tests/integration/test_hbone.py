"""HbonePool <-> HboneServer over real loopback mTLS: echo, half-close, rejections, identities, pooling, backpressure."""
from __future__ import annotations

import asyncio
import os

import pytest
import uvloop

from mesh.hbone import HbonePool, HboneServer, PoolKey, Reject, TunnelError, TunnelResult
from mesh.identity import SpiffeId
from tests.fakes import FakeClock
from tests.hbone_support import (CLIENT_ID, SERVER_ID, TD, Outbound, Pki, dial_authority, echo_roundtrip,
                                 listening_socket, start_echo, unclosed_transports)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.create()


def run(coro, timeout: float = 60):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return uvloop.run(bounded())


class Env:
    """Echo backend + HboneServer + pool + outbound listener, torn down in `close`."""

    async def start(self, pki: Pki, *, handler=None, pool: HbonePool | None = None, server_ctx=None,
                    client_ctx=None, key: PoolKey | None = None, backend=None, server_td: str = TD):
        if backend is None:
            self.echo, self.backend = await start_echo()
        else:
            self.echo, self.backend = backend
        self.results: list[TunnelResult] = []
        self.server = await HboneServer.start(
            listening_socket(), server_ctx or pki.server_context(),
            handler or (lambda req: dial_authority(req.authority)), trust_domain=server_td,
            on_result=lambda req, res: self.results.append(res))
        self.server_addr = self.server.sockets[0].getsockname()[:2]
        self.pool = pool or HbonePool()
        self.out = Outbound(self.pool, self.server_addr, client_ctx or pki.client_context(),
                            f"{self.backend[0]}:{self.backend[1]}")
        if key is not None:
            self.out.key = key
        await self.out.start()
        return self

    async def close(self):
        await self.out.close()
        await self.pool.close()
        self.server.close()
        self.echo.close()


def test_echo_10mb_both_directions_byte_exact(pki):
    async def main():
        env = await Env().start(pki)
        payload = os.urandom(12 * 1024 * 1024)
        got = await echo_roundtrip(env.out.addr, payload)
        assert got == payload
        (res,) = await asyncio.gather(*env.out.tasks)
        assert res == TunnelResult(bytes_sent=len(payload), bytes_received=len(payload), status=200,
                                   duration=res.duration, error=None)
        await asyncio.sleep(0.05)
        assert env.results[0].bytes_sent == env.results[0].bytes_received == len(payload)
        await env.close()
    run(main())


def test_half_close_client_shuts_write_and_still_receives(pki):
    async def reply_after_eof(reader, writer):
        data = await reader.read()                 # until the client's FIN arrives through the tunnel
        await asyncio.sleep(0.05)
        writer.write(b"got %d bytes" % len(data))
        await writer.drain()
        writer.close()

    async def main():
        backend = await asyncio.start_server(reply_after_eof, sock=listening_socket())
        env = await Env().start(pki, backend=(backend, backend.sockets[0].getsockname()[:2]))
        reader, writer = await asyncio.open_connection(*env.out.addr)
        writer.write(b"x" * 1000)
        writer.write_eof()
        assert await reader.read() == b"got 1000 bytes"
        writer.close()
        (res,) = await asyncio.gather(*env.out.tasks)
        assert (res.bytes_sent, res.bytes_received, res.error) == (1000, 14, None)
        await env.close()
    run(main())


def test_200_only_after_upstream_connected(pki):
    async def main():
        gate = asyncio.Event()
        seen = []

        async def handler(req):
            seen.append(req)
            await gate.wait()
            return await dial_authority(req.authority)

        env = await Env().start(pki, handler=handler)
        reader, writer = await asyncio.open_connection(*env.out.addr)
        writer.write(b"early")
        while not seen:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        (session,) = env.pool._conns[env.out.key]
        (tun,) = session.tunnels.values()
        assert not tun.response.done()                 # no status while the upstream is not connected
        assert seen[0].authority == env.out.authority and seen[0].peer_identity == CLIENT_ID
        gate.set()
        assert await reader.readexactly(5) == b"early"
        writer.close()
        await asyncio.gather(*env.out.tasks)
        await env.close()
    run(main())


@pytest.mark.parametrize("status,reason", [(401, "policy_denied"), (503, "no_upstream")])
def test_reject_status_reaches_client(pki, status, reason):
    async def handler(req):
        raise Reject(status, reason)

    async def main():
        env = await Env().start(pki, handler=handler)
        reader, writer = await asyncio.open_connection(*env.out.addr)
        assert await reader.read() == b""             # downstream closed
        (err,) = await asyncio.gather(*env.out.tasks)
        assert isinstance(err, TunnelError) and (err.reason, err.status) == ("connect_rejected", status)
        await asyncio.sleep(0.05)
        assert env.results[0].status == status and env.results[0].error == reason
        # The connection survives a rejected stream and is reused.
        assert env.pool.connection_count() == 1
        writer.close()
        await env.close()
    run(main())


def test_identity_mismatch_refused_and_not_pooled(pki):
    async def main():
        key = PoolKey(src_identity=CLIENT_ID, dst_identity=SpiffeId(trust_domain=TD, namespace="default",
                                                                    service_account="someone-else"),
                      src_ip="127.0.0.1", dst_ip="127.0.0.1")
        env = await Env().start(pki, key=key)
        reader, writer = await asyncio.open_connection(*env.out.addr)
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await reader.readexactly(1)
        (err,) = await asyncio.gather(*env.out.tasks)
        assert isinstance(err, TunnelError) and err.reason == "identity_mismatch"
        assert env.pool.connection_count() == 0 and env.pool.connections_opened == 0
        writer.close()
        await env.close()
    run(main())


def test_untrusted_server_ca_refused(pki):
    async def main():
        other = Pki.create()
        env = await Env().start(pki, server_ctx=other.server_context())
        reader, writer = await asyncio.open_connection(*env.out.addr)
        (err,) = await asyncio.gather(*env.out.tasks)
        assert isinstance(err, TunnelError) and err.reason == "tls_failed"
        writer.close()
        await env.close()
    run(main())


def test_untrusted_client_ca_refused_by_server(pki):
    async def main():
        other = Pki.create()
        env = await Env().start(pki, client_ctx=other.client_context())
        env.out.ssl_context.load_verify_locations(cadata=pki.ca.roots_pem.decode())  # client trusts the server
        reader, writer = await asyncio.open_connection(*env.out.addr)
        (err,) = await asyncio.gather(*env.out.tasks)
        assert isinstance(err, TunnelError) and err.reason in ("tls_failed", "h2_handshake_failed")
        writer.close()
        await env.close()
    run(main())


def test_client_outside_server_trust_domain_refused(pki):
    async def main():
        env = await Env().start(pki, server_td="other.local")
        reader, writer = await asyncio.open_connection(*env.out.addr)
        (err,) = await asyncio.gather(*env.out.tasks)
        assert isinstance(err, TunnelError)
        assert env.results == []
        writer.close()
        await env.close()
    run(main())


async def hold_tunnels(addr, n):
    """Open n app connections through the tunnel and prove each works; keep them open."""
    conns = await asyncio.gather(*(asyncio.open_connection(*addr) for _ in range(n)))
    for i, (r, w) in enumerate(conns):
        w.write(b"%05d" % i)
    for i, (r, w) in enumerate(conns):
        assert await r.readexactly(5) == b"%05d" % i
    return conns


def test_many_concurrent_tunnels_share_one_connection(pki):
    async def main():
        env = await Env().start(pki)
        conns = await hold_tunnels(env.out.addr, 100)
        assert env.out.connects == 1 and env.pool.connections_opened == 1
        assert env.server.connection_count == 1
        for r, w in conns:
            w.close()
        results = await asyncio.gather(*env.out.tasks)
        assert all(isinstance(r, TunnelResult) for r in results)
        await env.close()
    run(main())


def test_second_connection_beyond_max_streams_per_conn(pki):
    async def main():
        env = await Env().start(pki, pool=HbonePool(max_streams_per_conn=10))
        conns = await hold_tunnels(env.out.addr, 25)
        assert env.out.connects == 3 and env.pool.connection_count(env.out.key) == 3
        for r, w in conns:
            w.close()
        await asyncio.gather(*env.out.tasks)
        # Freed capacity is reused: no new connection for the next tunnel.
        assert await echo_roundtrip(env.out.addr, b"again") == b"again"
        assert env.out.connects == 3
        await env.close()
    run(main())


def test_idle_connections_closed_after_idle_timeout(pki):
    async def main():
        clock = FakeClock()
        env = await Env().start(pki, pool=HbonePool(idle_timeout=30, clock=clock))
        assert await echo_roundtrip(env.out.addr, b"hi") == b"hi"
        await asyncio.gather(*env.out.tasks)
        assert env.pool.connection_count() == 1
        await clock.advance(10)
        assert env.pool.connection_count() == 1
        await clock.advance(40)
        assert env.pool.connection_count() == 0
        for _ in range(50):
            if env.server.connection_count == 0:
                break
            await asyncio.sleep(0.02)
        assert env.server.connection_count == 0
        await env.close()
    run(main())


def test_server_close_drains_existing_tunnels_and_goaway_stops_reuse(pki):
    async def main():
        env = await Env().start(pki)
        (r, w), = await hold_tunnels(env.out.addr, 1)
        env.server.close()
        await asyncio.sleep(0.1)
        assert env.pool.connection_count() == 0       # GOAWAY'd: not reused
        w.write(b"still works")
        assert await r.readexactly(11) == b"still works"
        w.write_eof()
        assert await r.read() == b""
        await asyncio.wait_for(env.server.wait_closed(), 5)
        (res,) = await asyncio.gather(*env.out.tasks)
        assert res.error is None and res.bytes_sent == 16
        await env.close()
    run(main())


def test_slow_reader_backpressure_bounds_buffering(pki):
    """The backend does not read: the client's writes must stall after roughly the windows
    plus socket buffers, not buffer without bound in either proxy."""
    async def main():
        backend_conns = []

        async def lazy(reader, writer):
            backend_conns.append((reader, writer))

        backend = await asyncio.start_server(lazy, sock=listening_socket())
        env = await Env().start(pki, backend=(backend, backend.sockets[0].getsockname()[:2]))
        reader, writer = await asyncio.open_connection(*env.out.addr)
        chunk = b"\xab" * (1 << 20)
        sent = 0
        while sent < 200 * (1 << 20):
            writer.write(chunk)
            try:
                await asyncio.wait_for(writer.drain(), 1.0)
            except asyncio.TimeoutError:
                break
            sent += len(chunk)
        # 16 MiB stream window + 1 MiB TCP high-water + kernel socket buffers on 3 hops.
        assert sent < 64 * (1 << 20), f"sent {sent} bytes into a non-reading backend"
        (ssession,) = env.server._sessions
        (stun,) = ssession.tunnels.values()
        assert stun.transport.get_write_buffer_size() <= 16 * (1 << 20) + (1 << 20)
        # Now read everything: flow resumes and bytes are intact.
        (br, bw), = backend_conns
        total = 0
        while total < sent:
            data = await br.read(1 << 20)
            assert data and data.count(0xAB) == len(data)
            total += len(data)
        assert total >= sent
        writer.close()
        bw.close()
        await env.close()
    run(main(), timeout=90)


def test_connect_failure_resets_downstream(pki):
    async def main():
        pool = HbonePool(connect_timeout=2)
        dead = listening_socket()
        addr = dead.getsockname()[:2]
        dead.close()                                  # nothing listens there any more
        out = await Outbound(pool, addr, pki.client_context(), "127.0.0.1:1").start()
        reader, writer = await asyncio.open_connection(*out.addr)
        (err,) = await asyncio.gather(*out.tasks)
        assert isinstance(err, TunnelError) and err.reason == "connect_failed"
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await reader.readexactly(1)
        writer.close()
        await out.close()
        await pool.close()
    run(main())


def test_baggage_and_forwarded_headers_reach_handler(pki):
    async def main():
        seen = []

        async def handler(req):
            seen.append(req)
            return await dial_authority(req.authority)

        env = await Env().start(pki, handler=handler)
        env.out.headers = (("baggage", "k8s.namespace.name=default"), ("forwarded", 'for="127.0.0.1:5000"'),
                           ("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-01"))
        assert await echo_roundtrip(env.out.addr, b"x") == b"x"
        assert seen[0].headers == env.out.headers
        assert seen[0].peer_addr[0] == "127.0.0.1" and seen[0].local_addr == env.server_addr
        await env.close()
    run(main())


def test_unanswered_connect_times_out_and_its_connection_leaves_the_pool(pki):
    """A server that went silent (link down, peer gone without a reset) must not hold every
    new tunnel for its key: the CONNECT fails with connect_timeout, the next tunnel gets a
    new connection."""
    async def main():
        hang = asyncio.Event()
        calls = []

        async def handler(req):
            calls.append(req)
            if len(calls) == 1:
                await hang.wait()                   # never answers the first CONNECT
            return await dial_authority(req.authority)

        env = await Env().start(pki, handler=handler, pool=HbonePool(response_timeout=0.3))
        reader, writer = await asyncio.open_connection(*env.out.addr)
        (err,) = await asyncio.gather(*env.out.tasks)
        assert isinstance(err, TunnelError) and err.reason == "connect_timeout", err
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await reader.readexactly(1)
        writer.close()
        assert env.pool.connection_count(env.out.key) == 0      # the suspect left the pool
        env.out.tasks.clear()
        payload = os.urandom(1000)
        assert await echo_roundtrip(env.out.addr, payload) == payload
        await asyncio.gather(*env.out.tasks)
        assert env.pool.connections_opened == 2
        hang.set()
        await env.close()
    run(main())


def test_connect_crossing_a_goaway_is_retried_on_a_new_connection(pki):
    """A peer ztunnel restarting sends GOAWAY while our CONNECT is in flight: the stream is
    above its last stream id (never processed), so the pool sends it again elsewhere."""
    async def main():
        env = await Env().start(pki)
        payload = os.urandom(1000)
        assert await echo_roundtrip(env.out.addr, payload) == payload
        await asyncio.gather(*env.out.tasks)
        env.out.tasks.clear()
        (server_session,) = env.server._sessions
        server_session.conn.close()      # GOAWAY queued, not flushed: it crosses our next CONNECT
        assert await echo_roundtrip(env.out.addr, payload) == payload
        (res,) = await asyncio.gather(*env.out.tasks)
        assert res.error is None and env.pool.connections_opened == 2
        await env.close()
    run(main())


def test_refused_stream_is_retried_on_another_connection(pki):
    async def main():
        env = await Env().start(pki)
        payload = os.urandom(1000)
        assert await echo_roundtrip(env.out.addr, payload) == payload
        await asyncio.gather(*env.out.tasks)
        env.out.tasks.clear()
        (server_session,) = env.server._sessions
        server_session.conn.goaway_sent = True   # refuses new streams with REFUSED_STREAM only
        assert await echo_roundtrip(env.out.addr, payload) == payload
        (res,) = await asyncio.gather(*env.out.tasks)
        assert res.error is None and env.pool.connections_opened == 2
        await env.close()
    run(main())


def test_no_tcp_transport_is_left_open_for_the_gc(pki):
    # uvloop 0.23 stops tracking a transport that is not reading; freed by the GC while still
    # open with a write_eof() shutdown pending, it is freed twice (SIGSEGV;
    # tests/bench/repro_uvloop_shutdown_crash.py). So after half-closed echoes through the
    # pool, the server's tunnels and the echo backend, every TCP transport that carried them
    # must be closed by its owner, not left open for the GC to find.
    async def main():
        unclosed_transports()   # earlier tests' garbage, collected now, is not this test's
        env = await Env().start(pki)
        payloads = [os.urandom(n) for n in (1, 300_000, 3 * 1024 * 1024)]
        got = await asyncio.gather(*(echo_roundtrip(env.out.addr, p) for p in payloads))
        assert got == payloads
        await asyncio.gather(*env.out.tasks)
        for _ in range(200):
            if len(env.results) == len(payloads):
                break
            await asyncio.sleep(0.01)
        assert [r.error for r in env.results] == [None] * len(payloads)
        await asyncio.sleep(0.1)                  # connection_lost callbacks of the closes
        assert unclosed_transports() == []
        await env.close()
    run(main())
