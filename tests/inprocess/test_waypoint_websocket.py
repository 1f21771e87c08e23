"""WebSocket through the waypoint: the upgrade goes upstream, the 101 comes back, then raw bytes both ways."""
from __future__ import annotations

import asyncio
import base64
import hashlib

from tests.inprocess.test_waypoint_fault_mirror import VIP, flags_counts, web
from tests.inprocess.test_waypoint_l7 import run
from tests.inprocess.waypoint_harness import WS_GUID, read_head

KEY = base64.b64encode(b"0123456789abcdef").decode()


def upgrade(c, path="/chat"):
    c.writer.write(f"GET {path} HTTP/1.1\r\nhost: web\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                   f"sec-websocket-key: {KEY}\r\nsec-websocket-version: 13\r\n\r\n".encode())


def test_websocket_upgrade_then_raw_bytes_both_ways():
    async def go(mesh):
        a, _ = await web(mesh, shadow=False)
        c = await mesh.client(f"{VIP}:80")
        upgrade(c)
        line, hs = await asyncio.wait_for(read_head(c.reader), 10)
        h = dict(hs)
        assert line.startswith("HTTP/1.1 101")
        assert (h["upgrade"], h["connection"], h["x-backend"]) == ("websocket", "upgrade", "web-1")
        assert h["sec-websocket-accept"] == base64.b64encode(hashlib.sha1((KEY + WS_GUID).encode()).digest()).decode()
        c.writer.write(b"\x81\x05hello")
        assert await asyncio.wait_for(c.reader.readexactly(7), 10) == b"\x81\x05hello"
        big = bytes(range(256)) * 8192                      # 2 MiB: flow control both ways
        c.writer.write(big)
        assert await asyncio.wait_for(c.reader.readexactly(len(big)), 30) == big
        c.writer.write_eof()                               # close handshake: the app closes after us
        assert await asyncio.wait_for(c.reader.read(), 10) == b""
        assert flags_counts(mesh) == {("101", "-"): 1}
        fam = mesh.metrics.exposition().decode().splitlines()
        for name in ("istio_request_bytes_sum", "istio_response_bytes_sum"):   # both directions counted
            (sample,) = [ln for ln in fam if ln.startswith(name)]
            assert float(sample.rsplit(" ", 1)[1]) == 7 + len(big), sample
        c.close()
    run(go)


def test_refused_upgrade_is_answered_and_the_connection_closes():
    async def go(mesh):
        await web(mesh, shadow=False)
        c = await mesh.client(f"{VIP}:80")
        upgrade(c, "/refuse")
        r = await c.response()
        assert r.status == 200 and r.header("connection") == "close"
        assert await asyncio.wait_for(c.reader.read(), 10) == b""
        c.close()
    run(go)
