"""HTTP/2 abuse from a client with a valid mesh certificate, over real loopback mTLS: rapid reset, PING and SETTINGS
floods end in GOAWAY ENHANCE_YOUR_CALM within a bound, the app sees at most that many connections, a reset stream's
pending upstream connect is cancelled, and a legitimate client gets through right after."""
from __future__ import annotations

import asyncio
import socket
import ssl
import time

import pytest
import uvloop

from mesh.hbone import HbonePool, HboneServer, Rejection
from mesh.hbone import frames as f
from mesh.hbone.abuse import AbuseLimits
from tests import h2_attack as atk
from tests.h2_attack import FrameReader
from tests.hbone_support import CLIENT_ID, TD, EchoProtocol, Outbound, Pki, dial_authority, echo_roundtrip, \
    listening_socket, unclosed_transports

LIMITS = AbuseLimits()


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.create()


def run(coro, timeout: float = 60):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return uvloop.run(bounded())


class App:
    """The destination application: an echo that counts the connections it was given."""

    async def start(self) -> App:
        self.connections = 0
        outer = self

        class Counting(EchoProtocol):
            def connection_made(self, transport):
                outer.connections += 1
                super().connection_made(transport)

        self.server = await asyncio.get_running_loop().create_server(Counting, sock=listening_socket())
        self.addr = self.server.sockets[0].getsockname()[:2]
        return self


class Env:
    async def start(self, pki: Pki, handler=None) -> Env:
        self.app = await App().start()
        self.rejections: list[Rejection] = []
        self.results = []
        self.server = await HboneServer.start(listening_socket(), pki.server_context(),
                                              handler or (lambda req: dial_authority(req.authority)),
                                              trust_domain=TD, on_reject=self.rejections.append,
                                              on_result=lambda req, res: self.results.append(res))
        self.addr = self.server.sockets[0].getsockname()[:2]
        self.authority = f"{self.app.addr[0]}:{self.app.addr[1]}"
        self.pool = HbonePool()
        self.out = await Outbound(self.pool, self.addr, pki.client_context(), self.authority).start()
        return self

    async def legit_roundtrip(self) -> float:
        """Seconds a meshed client takes to reach the app through a fresh pooled connection."""
        t0 = time.monotonic()
        assert await asyncio.wait_for(echo_roundtrip(self.out.addr, b"hello app"), 5) == b"hello app"
        return time.monotonic() - t0

    async def close(self) -> None:
        await self.out.close()
        await self.pool.close()
        self.server.close()
        self.app.server.close()


class Attacker:
    """A raw HTTP/2 client on one mTLS connection (valid certificate), reading concurrently."""

    async def open(self, pki: Pki, addr) -> Attacker:
        self.reader, self.writer = await asyncio.open_connection(*addr, ssl=pki.client_context(), server_hostname="")
        self.frames = FrameReader()
        self.writer.write(atk.preface())
        self.reading = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    return
                self.frames.feed(data)
        except (ConnectionError, ssl.SSLError):
            return

    async def flood(self, chunks, pause: bool = False) -> int:
        """Write chunks until the server sent GOAWAY or closed (`pause`: let the loop run
        between writes, so the server handles each chunk on its own); how many were written."""
        sent = 0
        try:
            for c in chunks:
                if self.frames.goaway() is not None or self.reading.done():
                    break
                self.writer.write(c)
                sent += 1
                await self.writer.drain()
                if pause:
                    await asyncio.sleep(0)
        except (ConnectionError, ssl.SSLError):
            pass
        await asyncio.wait_for(asyncio.shield(self.reading), 5)     # the server closes after GOAWAY
        self.writer.close()
        return sent


def batches(frames: list[bytes], per: int) -> list[bytes]:
    return [b"".join(frames[i:i + per]) for i in range(0, len(frames), per)]


def _check_goaway(env: Env, a: Attacker, reason: str) -> tuple[int, int, bytes]:
    g = a.frames.goaway()
    assert g is not None, "no GOAWAY"
    assert g[1:] == (f.ErrorCode.ENHANCE_YOUR_CALM, reason.encode())
    (r,) = [r for r in env.rejections if r.reason == reason]
    assert r.stage == "h2" and r.peer_identity == CLIENT_ID
    assert env.server.rejections.get(reason) == 1
    return g


def _split_pairs(n):
    out = []
    for sid in range(1, 2 * n, 2):
        out += [atk.connect(sid), atk.rst(sid)]
    return out


@pytest.mark.parametrize("chunks, pause", [
    (lambda: batches(atk.rapid_reset(1, 20_000), 200), False),
    (lambda: _split_pairs(20_000), True),       # each CONNECT served (upstream dialled) before its RST
], ids=["batched", "split"])
def test_rapid_reset_of_20000_streams_is_cut_at_the_bound(pki, chunks, pause):
    async def main():
        unclosed_transports()   # earlier tests' garbage, collected now, is not this test's
        env = await Env().start(pki)
        a = await Attacker().open(pki, env.addr)
        t0 = time.monotonic()
        sent = await a.flood(chunks(), pause)
        attack_end = time.monotonic()
        last_sid, _, _ = _check_goaway(env, a, "rapid_reset")
        assert last_sid <= 2 * LIMITS.max_premature_resets - 1       # at most 100 streams were processed
        await asyncio.sleep(0.2)                                     # connects in flight land (or not)
        assert env.app.connections <= LIMITS.max_premature_resets
        took = await env.legit_roundtrip()
        assert time.monotonic() - attack_end < 1.0 and took < 1.0
        assert env.app.connections <= LIMITS.max_premature_resets + 1
        print(f"\nrapid reset: GOAWAY after stream {last_sid} ({sent} writes, "
              f"{attack_end - t0:.2f}s), app saw {env.app.connections} connections")
        await asyncio.sleep(0.1)
        assert unclosed_transports() == []      # reset tunnels closed theirs (uvloop: never the GC)
        await env.close()
    run(main())


@pytest.mark.parametrize("flood, reason, bound, ack_type", [
    (lambda: batches([atk.ping(i) for i in range(200_000)], 500), "ping_flood", LIMITS.ping_burst, f.PING),
    (lambda: batches([atk.settings() for _ in range(20_000)], 100), "settings_flood", LIMITS.settings_burst,
     f.SETTINGS),
], ids=["ping", "settings"])
def test_control_frame_flood_ends_in_goaway_within_the_bound(pki, flood, reason, bound, ack_type):
    async def main():
        env = await Env().start(pki)
        a = await Attacker().open(pki, env.addr)
        await a.flood(flood())
        attack_end = time.monotonic()
        _check_goaway(env, a, reason)
        acks = a.frames.count(ack_type, f.FLAG_ACK)
        assert 0 < acks <= bound                                     # answered up to the bound, no more
        took = await env.legit_roundtrip()
        assert time.monotonic() - attack_end < 1.0 and took < 1.0
        assert env.app.connections == 1
        await env.close()
    run(main())


def test_a_reset_stream_cancels_its_pending_upstream_connect(pki):
    async def main():
        loop = asyncio.get_running_loop()
        full = socket.socket()                 # an app whose accept queue is full: connects hang
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        filler = socket.create_connection(full.getsockname())
        socks: list[socket.socket] = []
        cancelled = asyncio.Event()

        async def handler(req):
            s = socket.socket()
            s.setblocking(False)
            socks.append(s)
            try:
                await loop.sock_connect(s, full.getsockname())
            except asyncio.CancelledError:
                s.close()
                cancelled.set()
                raise
            return s

        env = await Env().start(pki, handler=handler)
        a = await Attacker().open(pki, env.addr)
        a.writer.write(atk.connect(1))
        while not socks:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)                # the connect is pending
        assert socks[0].fileno() != -1 and not cancelled.is_set()
        a.writer.write(atk.rst(1))
        await asyncio.wait_for(cancelled.wait(), 1.0)
        assert socks[0].fileno() == -1
        while not env.results:
            await asyncio.sleep(0.01)
        assert (env.results[0].status, env.results[0].error) == (0, "peer_reset")
        a.writer.write(atk.ping(7))            # one reset is no abuse: the connection lives on
        while a.frames.count(f.PING, f.FLAG_ACK) == 0:
            await asyncio.sleep(0.01)
        assert a.frames.goaway() is None and env.rejections == []
        a.writer.close()
        filler.close()
        full.close()
        await env.close()
    run(main())


def test_rapid_reset_against_a_slow_app_leaves_no_connect_running(pki):
    async def main():
        unclosed_transports()   # earlier tests' garbage, collected now, is not this test's
        pending = started = 0

        async def slow_handler(req):
            nonlocal pending, started
            pending += 1
            started += 1
            try:
                await asyncio.sleep(5)          # an upstream connect that takes its time
            finally:
                pending -= 1
            return await dial_authority(req.authority)

        env = await Env().start(pki, handler=slow_handler)
        a = await Attacker().open(pki, env.addr)
        await a.flood(_split_pairs(20_000), pause=True)
        last_sid, _, _ = _check_goaway(env, a, "rapid_reset")
        assert last_sid <= 2 * LIMITS.max_premature_resets - 1
        await asyncio.sleep(0.1)
        assert started > 0 and pending == 0     # every handler that ran was cancelled, none waits on
        assert len(env.results) <= LIMITS.max_premature_resets
        assert all(r.error == "peer_reset" or r.error == "rapid_reset" for r in env.results)
        print(f"\nslow app: {started} handlers started, all cancelled; GOAWAY after stream {last_sid}")
        assert unclosed_transports() == []      # cancelled connects left nothing open
        await env.close()
    run(main())
