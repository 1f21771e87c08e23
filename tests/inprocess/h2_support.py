"""Real HTTP/2 peers for the in-process waypoint tests: an h2 client over an HBONE stream, and an h2c backend.

Both use the `h2` library directly (not the waypoint's code): the client speaks prior-knowledge
HTTP/2 inside the HBONE stream a source ztunnel would open; the backend is a pod's h2c app
that echoes each request as JSON (with its trailers), answers `/stream/N` with N DATA frames
and `grpc-status` trailers, and `/trailers-only` with one HEADERS+END_STREAM.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events

from mesh import tls
from mesh.hbone import PoolKey
from mesh.identity import SpiffeId
from mesh.proxy.sockets import LoopbackSockets

from .mesh_objects import TD


@dataclass
class H2Response:
    status: int = 0
    headers: list = field(default_factory=list)
    body: bytes = b""
    trailers: list = field(default_factory=list)
    reset: int | None = None
    data_frames: int = 0
    parts: list = field(default_factory=list)
    received: int = 0

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def json(self):
        return json.loads(self.body)


class _Peer(asyncio.Protocol):
    """What the h2 client and server share: windows, writes, per-stream waiters."""

    client_side = True

    def __init__(self) -> None:
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=self.client_side, header_encoding="utf-8"))
        self.transport = None
        self.window_open = asyncio.Event()
        self.lost = asyncio.get_running_loop().create_future()
        self.auto_ack = True

    def flush(self) -> None:
        d = self.conn.data_to_send()
        if d and self.transport is not None and not self.transport.is_closing():
            self.transport.write(d)

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.conn.initiate_connection()
        self.flush()

    def connection_lost(self, exc) -> None:
        self.window_open.set()
        if not self.lost.done():
            self.lost.set_result(exc)

    def data_received(self, data) -> None:
        for ev in self.conn.receive_data(data):
            if isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                self.window_open.set()
            self.on_event(ev)
        self.flush()

    def on_event(self, ev) -> None:
        raise NotImplementedError

    async def send_body(self, sid: int, body: bytes, end: bool = True) -> None:
        view = memoryview(body)
        while view:
            w = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if w <= 0:
                self.window_open.clear()
                await self.window_open.wait()
                continue
            self.conn.send_data(sid, view[:w].tobytes())
            view = view[w:]
            self.flush()
        if end:
            self.conn.end_stream(sid)
            self.flush()


class H2Client(_Peer):
    client_side = True

    def __init__(self) -> None:
        super().__init__()
        self.responses: dict[int, H2Response] = {}
        self.done: dict[int, asyncio.Future] = {}
        self.unacked: dict[int, int] = {}

    def on_event(self, ev) -> None:
        sid = getattr(ev, "stream_id", 0)
        r = self.responses.get(sid)
        if isinstance(ev, h2.events.ResponseReceived):
            r.status = int(dict(ev.headers)[":status"])
            r.headers = [(k, v) for k, v in ev.headers if not k.startswith(":")]
        elif isinstance(ev, h2.events.DataReceived):
            r.parts.append(ev.data)
            r.received += len(ev.data)
            r.data_frames += 1
            if self.auto_ack:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
            else:
                self.unacked[sid] = self.unacked.get(sid, 0) + ev.flow_controlled_length
        elif isinstance(ev, h2.events.TrailersReceived):
            r.trailers = list(ev.headers)
        elif isinstance(ev, h2.events.StreamEnded):
            self._finish(sid)
        elif isinstance(ev, h2.events.StreamReset) and r is not None:
            r.reset = int(ev.error_code)
            self._finish(sid)

    def ack_all(self) -> None:
        for sid, n in self.unacked.items():
            try:
                self.conn.acknowledge_received_data(n, sid)
            except Exception:
                pass
        self.unacked.clear()
        self.flush()

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        for sid in list(self.done):
            self._finish(sid)

    def _finish(self, sid: int) -> None:
        f = self.done.get(sid)
        if f is not None and not f.done():
            r = self.responses[sid]
            r.body, r.parts = b"".join(r.parts), []
            f.set_result(r)

    def start(self, method: str = "GET", path: str = "/", headers=(), *, authority: str = "svc",
              end: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.responses[sid] = H2Response()
        self.done[sid] = asyncio.get_running_loop().create_future()
        self.conn.send_headers(sid, [(":method", method), (":scheme", "http"), (":authority", authority),
                                     (":path", path), *headers], end_stream=end)
        self.flush()
        return sid

    async def request(self, method: str = "GET", path: str = "/", headers=(), body: bytes = b"", *,
                      authority: str = "svc", trailers=None, timeout: float = 20) -> H2Response:
        sid = self.start(method, path, headers, authority=authority, end=not body and not trailers)
        if body or trailers:
            await self.send_body(sid, body, end=not trailers)
            if trailers:
                self.conn.send_headers(sid, list(trailers), end_stream=True)
                self.flush()
        return await asyncio.wait_for(self.done[sid], timeout)

    def reset(self, sid: int) -> None:
        self.conn.reset_stream(sid)
        self.flush()


async def h2_client(mesh, authority: str, *, ns: str = "shop", sa: str = "client") -> H2Client:
    """An HBONE stream from a client workload to the waypoint carrying prior-knowledge HTTP/2."""
    ip = mesh.ip()
    ident = SpiffeId(trust_domain=TD, namespace=ns, service_account=sa)
    ctx = tls.client_context(mesh.ca.issue(ident), mesh.ca.roots_pem)
    key = PoolKey(src_identity=ident, dst_identity=mesh.wp_identity, src_ip=ip, dst_ip=mesh.wp_ip)
    stream = await mesh.client_pool.open_stream(
        key, connect=lambda: LoopbackSockets(ip).connect((mesh.wp_ip, 15008)), ssl_context=lambda: ctx,
        authority=authority, trust_domain=TD)
    c = H2Client()
    stream.set_protocol(c)
    return c


class H2Backend(_Peer):
    """One h2c connection of a pod's HTTP/2 app (see the module docstring)."""

    client_side = False

    def __init__(self, app: H2App) -> None:
        super().__init__()
        self.app = app
        self.reqs: dict[int, dict] = {}

    def on_event(self, ev) -> None:
        sid = getattr(ev, "stream_id", 0)
        if isinstance(ev, h2.events.RequestReceived):
            self.app.requests += 1
            self.reqs[sid] = {"headers": list(ev.headers), "body": [], "trailers": []}
        elif isinstance(ev, h2.events.DataReceived):
            self.reqs[sid]["body"].append(ev.data)
            self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
        elif isinstance(ev, h2.events.TrailersReceived):
            self.reqs[sid]["trailers"] = list(ev.headers)
        elif isinstance(ev, h2.events.StreamEnded):
            req = self.reqs.pop(sid)
            req["body"] = b"".join(req["body"])
            asyncio.ensure_future(self.respond(sid, req))
        elif isinstance(ev, h2.events.StreamReset):
            self.app.resets += 1
            self.reqs.pop(sid, None)

    async def respond(self, sid: int, req: dict) -> None:
        hs = dict(req["headers"])
        path = hs[":path"]
        self.app.seen.append((hs[":method"], path, req["headers"], len(req["body"])))
        try:
            if path == "/trailers-only":
                self.conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc"),
                                             ("grpc-status", "5"), ("grpc-message", "not found")], end_stream=True)
            elif path.startswith("/stream/"):
                n = int(path.rsplit("/", 1)[1])
                self.conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
                for i in range(n):
                    await self.send_body(sid, b"msg-%d;" % i, end=False)
                    await asyncio.sleep(0)
                self.conn.send_headers(sid, [("grpc-status", "0"), ("grpc-message", "done")], end_stream=True)
            elif path.startswith("/download/"):
                n = int(path.rsplit("/", 1)[1])
                self.conn.send_headers(sid, [(":status", "200"), ("content-length", str(n))])
                await self.send_body(sid, b"y" * n)
            else:
                body = json.dumps({"name": self.app.name, "protocol": "h2", "method": hs[":method"], "path": path,
                                   "authority": hs.get(":authority"), "headers": req["headers"],
                                   "body_bytes": len(req["body"]), "trailers": req["trailers"]}).encode()
                self.conn.send_headers(sid, [(":status", "200"), ("content-type", "application/json"),
                                             ("x-backend", self.app.name)])
                await self.send_body(sid, body, end=False)
                self.conn.send_headers(sid, [("x-trailer", "t1")], end_stream=True)
            self.flush()
        except Exception:     # the stream was reset meanwhile
            pass


class H2App:
    """A pod's h2c server app: counts connections and requests."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.connections = 0
        self.requests = 0
        self.resets = 0
        self.seen: list = []

    def protocol(self) -> H2Backend:
        self.connections += 1
        return H2Backend(self)


async def h2_pod(mesh, name: str, *, ns: str = "shop", labels: dict | None = None, app_port: int = 8080):
    """A pod whose app speaks h2c on `app_port`, behind its own destination ztunnel (as mesh.pod)."""
    import ipaddress
    import socket

    from mesh.hbone import HboneServer
    from mesh.model import TunnelProtocol, Workload
    from mesh.model.base import FrozenMap

    from .waypoint_harness import Pod
    ip = mesh.ip()
    ident = SpiffeId(trust_domain=TD, namespace=ns, service_account=name)
    w = Workload(uid=f"{ns}/{name}", name=name, namespace=ns, node="n1", ip=ipaddress.IPv4Address(ip),
                 service_account=name, identity=ident, protocol=TunnelProtocol.HBONE,
                 labels=FrozenMap(labels or {}))
    mesh.objects.append(w)
    mesh.publish()
    pod = mesh.pods[name] = Pod(w, None)
    pod.app = H2App(name)
    loop = asyncio.get_running_loop()
    mesh._servers.append(await loop.create_server(pod.app.protocol, ip, app_port, reuse_address=True))

    async def ztunnel(req):
        pod.connects += 1
        host, _, port = req.authority.rpartition(":")
        s = socket.socket()
        s.setblocking(False)
        await loop.sock_connect(s, (host, int(port)))
        return s
    sock = LoopbackSockets(ip).listener((ip, 15008))
    mesh._servers.append(await HboneServer.start(sock, tls.server_context(mesh.ca.issue(ident), mesh.ca.roots_pem),
                                                 ztunnel, trust_domain=TD))
    return pod
