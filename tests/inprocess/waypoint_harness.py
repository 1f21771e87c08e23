"""A loopback waypoint: client HBONE -> the real waypoint handler -> HBONE to in-process "destination ztunnels" -> HTTP backends.

Every simulated pod has its own 127.x.y.n address; certificates come from a real
CertificateAuthority; the state is fed into ProxyState directly. Each destination ztunnel is
an HboneServer on `<pod ip>:15008` with the pod's certificate whose handler splices to the
pod's backend on `<pod ip>:8080` and counts CONNECTs. The backend echoes the request as JSON
(method, path, headers, its own name and version label) and streams large bodies on demand.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import random
import socket
from http import HTTPStatus

from mesh import tls
from mesh.clock import SystemClock
from mesh.hbone import HbonePool, HboneServer, PoolKey
from mesh.identity import SpiffeId
from mesh.model import Endpoint, RetryBudgetSpec, ServiceInfo, TunnelProtocol, Workload
from mesh.model.base import FrozenMap
from mesh.model.resources import ServicePort
from mesh.proxy.sockets import LoopbackSockets
from waypoint.inbound import Inbound, InboundContext
from waypoint.telemetry import WaypointMetrics

from .mesh_objects import TD, MeshObjects

APP_PORT = 8080
CHUNK = b"x" * 65536


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], sink=None) -> int:
    """Read a message body (content-length or chunked); count it, hand pieces to `sink`."""
    n = 0
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass
                return n
            left = size
            while left:
                d = await reader.read(min(left, 1 << 20))
                if not d:
                    raise ConnectionError("eof in chunk")
                left -= len(d)
                n += len(d)
                if sink is not None:
                    sink(d)
            await reader.readexactly(2)
    left = int(headers.get("content-length", "0"))
    while left:
        d = await reader.read(min(left, 1 << 20))
        if not d:
            raise ConnectionError("eof in body")
        left -= len(d)
        n += len(d)
        if sink is not None:
            sink(d)
    return n


async def read_head(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    return lines[0], [(k.strip().lower(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)]


class Backend:
    """A pod's HTTP/1.1 app: echoes requests as JSON; `/download/N` streams N bytes; keep-alive.

    `script` is what the next requests get, one entry each (then the echo): `"503"` (or any
    status), `"reset"` (the connection is dropped without a response), `"delay:S"` (the echo
    after S seconds), `"grpc:N"` (a trailers-only gRPC answer with grpc-status N); `always` (same
    form) applies to every request once the script is used up. Each request's
    `x-envoy-attempt-count` is kept in `attempt_counts`. `delay` and `status` apply to every
    unscripted request (a slow or failing replica); `seen` records each request.
    """

    def __init__(self, name: str, version: str) -> None:
        self.name, self.version = name, version
        self.connections = 0
        self.requests = 0
        self.script: list[str] = []
        self.always: str | None = None
        self.attempt_counts: list[str | None] = []
        self.bodies: list[int] = []
        self.delay = 0.0
        """Seconds to wait before answering (a slow replica)."""
        self.status = 200
        """The status of echo responses (a failing replica)."""
        self.active = 0
        """Echo requests being answered now."""
        self.seen: list[tuple[str, str, list[tuple[str, str]], int]] = []
        """(method, target, headers, body bytes) of each request, in arrival order."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    line, hs = await read_head(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests += 1
                method, target, _ = line.split(" ", 2)
                h = dict(hs)
                if h.get("upgrade", "").lower() == "websocket" and not target.startswith("/refuse"):
                    await self._websocket(reader, writer, h)
                    return
                got = await _read_body(reader, h)
                self.seen.append((method, target, hs, got))
                self.attempt_counts.append(h.get("x-envoy-attempt-count"))
                self.bodies.append(got)
                action = self.script.pop(0) if self.script else self.always
                if action == "reset":
                    writer.transport.abort()
                    return
                if action is not None and action.startswith("delay:"):
                    await asyncio.sleep(float(action[6:]))
                elif action is not None and action.startswith("grpc:"):      # a trailers-only gRPC status
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ngrpc-status: %s\r\n"
                                 b"content-length: 0\r\n\r\n" % action[5:].encode())
                    await writer.drain()
                    continue
                elif action is not None:
                    writer.write(b"HTTP/1.1 %s Scripted\r\ncontent-length: 6\r\nx-backend: %s\r\n\r\nfailed"
                                 % (action.encode(), self.name.encode()))
                    await writer.drain()
                    continue
                if self.delay:
                    await asyncio.sleep(self.delay)
                if target.startswith("/download/"):
                    n = int(target.rsplit("/", 1)[1])
                    writer.write(f"HTTP/1.1 200 OK\r\ncontent-length: {n}\r\nx-backend: {self.name}\r\n\r\n".encode())
                    while n:
                        k = min(n, len(CHUNK))
                        writer.write(CHUNK[:k])
                        n -= k
                        await writer.drain()
                    continue
                body = json.dumps({"name": self.name, "version": self.version, "method": method, "path": target,
                                   "headers": hs, "body_bytes": got}).encode()
                self.active += 1
                try:
                    writer.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nx-backend: %s\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (self.status, HTTPStatus(self.status).phrase.encode(),
                                                                    self.name.encode(), len(body), body))
                    await writer.drain()
                finally:
                    self.active -= 1
        finally:
            writer.close()


    async def _websocket(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, h: dict) -> None:
        """RFC 6455 handshake, then echo raw bytes until the client half-closes (then close)."""
        accept = base64.b64encode(hashlib.sha1((h["sec-websocket-key"] + WS_GUID).encode()).digest()).decode()
        writer.write(f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Accept: {accept}\r\nx-backend: {self.name}\r\n\r\n".encode())
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()


WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Pod:
    def __init__(self, workload: Workload, backend: Backend | None) -> None:
        self.workload = workload
        self.backend = backend
        self.connects = 0
        """CONNECTs its destination ztunnel accepted."""
        self.connect_headers: list[dict[str, str]] = []
        """The regular headers of each of those CONNECTs (traceparent...)."""

    @property
    def ip(self) -> str:
        return str(self.workload.ip)


class Response:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def json(self):
        return json.loads(self.body)


class Client:
    """An HTTP/1.1 client over one HBONE stream to the waypoint (what a source ztunnel sends)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stream) -> None:
        self.reader, self.writer, self.stream = reader, writer, stream

    async def request(self, method: str = "GET", path: str = "/", headers: dict[str, str] | None = None,
                      body: bytes = b"", host: str = "svc") -> Response:
        self.send(method, path, headers, body, host)
        return await self.response(method)

    def send(self, method: str = "GET", path: str = "/", headers: dict[str, str] | None = None,
             body: bytes = b"", host: str = "svc") -> None:
        hs = {"host": host, **(headers or {})}
        if body or method in ("POST", "PUT"):
            hs["content-length"] = str(len(body))
        self.writer.write(f"{method} {path} HTTP/1.1\r\n".encode() +
                          "".join(f"{k}: {v}\r\n" for k, v in hs.items()).encode() + b"\r\n" + body)

    async def response(self, method: str = "GET", sink=None) -> Response:
        line, hs = await asyncio.wait_for(read_head(self.reader), 10)
        status = int(line.split(" ")[1])
        parts: list[bytes] = []
        if method != "HEAD" and status not in (204, 304):
            await asyncio.wait_for(_read_body(self.reader, dict(hs), sink or parts.append), 60)
        return Response(status, hs, b"".join(parts))

    def close(self) -> None:
        self.writer.close()


class WaypointMesh(MeshObjects):
    def __init__(self, *, rng: random.Random | None = None) -> None:
        super().__init__()
        self.pods: dict[str, Pod] = {}
        self.metrics = WaypointMetrics()
        self.client_pool = HbonePool()
        self.wp_pool = HbonePool()
        self._servers: list = []
        self.rng = rng or random.Random(7)
        self.wp_ip = self.ip()
        self.wp_identity = SpiffeId(trust_domain=TD, namespace="shop", service_account="waypoint")
        self.inbound: Inbound | None = None
        self.server: HboneServer | None = None

    async def start(self) -> None:
        cert = self.ca.issue(self.wp_identity)
        client_ctx = tls.client_context(cert, self.ca.roots_pem)
        self.inbound = Inbound(InboundContext(
            identity=self.wp_identity, waypoint_namespace="shop", waypoint_name="waypoint", trust_domain=TD,
            state=self.state, pool=self.wp_pool, sockets=LoopbackSockets(self.wp_ip),
            client_tls=lambda: client_ctx, clock=SystemClock(), rng=self.rng, metrics=self.metrics))
        sock = LoopbackSockets(self.wp_ip).listener((self.wp_ip, 15008))
        self.server = await HboneServer.start(sock, tls.server_context(cert, self.ca.roots_pem), self.inbound.handle,
                                              trust_domain=TD)
        self._servers.append(self.server)

    async def pod(self, name: str, ns: str = "shop", sa: str | None = None, *, labels: dict | None = None,
                  backend: bool = True) -> Pod:
        ip = self.ip()
        sa = sa or name
        ident = SpiffeId(trust_domain=TD, namespace=ns, service_account=sa)
        w = Workload(uid=f"{ns}/{name}", name=name, namespace=ns, node="n1", ip=ipaddress.IPv4Address(ip),
                     service_account=sa, identity=ident, protocol=TunnelProtocol.HBONE,
                     labels=FrozenMap(labels or {}))
        self.objects.append(w)
        self.publish()
        pod = self.pods[name] = Pod(w, Backend(name, (labels or {}).get("version", "unknown")) if backend else None)
        if backend:
            loop = asyncio.get_running_loop()
            self._servers.append(await asyncio.start_server(pod.backend.serve, ip, APP_PORT, reuse_address=True))
            cert = self.ca.issue(ident)

            async def ztunnel(req):                  # the destination ztunnel's inbound: splice to the app
                pod.connects += 1
                pod.connect_headers.append(dict(req.headers))
                host, _, port = req.authority.rpartition(":")
                s = socket.socket()
                s.setblocking(False)
                await loop.sock_connect(s, (host, int(port)))
                return s
            sock = LoopbackSockets(ip).listener((ip, 15008))
            self._servers.append(await HboneServer.start(sock, tls.server_context(cert, self.ca.roots_pem), ztunnel,
                                                         trust_domain=TD))
        return pod

    def service(self, name: str, vip: str, pods: list[Pod], *, port: int = 80, ns: str = "shop",
                port_name: str = "http", retry_budget: RetryBudgetSpec | None = None) -> ServiceInfo:
        svc = ServiceInfo(name=name, namespace=ns, vip=ipaddress.IPv4Address(vip), retry_budget=retry_budget,
                          ports=(ServicePort(port=port, target_port=APP_PORT, name=port_name),),
                          endpoints=tuple(Endpoint(workload_uid=p.workload.uid, ip=p.workload.ip) for p in pods))
        self.objects.append(svc)
        self.publish()
        return svc

    async def client(self, authority: str, *, ns: str = "shop", sa: str = "client", ip: str | None = None) -> Client:
        """An HBONE stream from a client workload to the waypoint, `:authority` = `authority`."""
        ip = ip or self.ip()
        ident = SpiffeId(trust_domain=TD, namespace=ns, service_account=sa)
        cert = self.ca.issue(ident)
        ctx = tls.client_context(cert, self.ca.roots_pem)
        key = PoolKey(src_identity=ident, dst_identity=self.wp_identity, src_ip=ip, dst_ip=self.wp_ip)
        stream = await self.client_pool.open_stream(
            key, connect=lambda: LoopbackSockets(ip).connect((self.wp_ip, 15008)), ssl_context=lambda: ctx,
            authority=authority, trust_domain=TD)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        proto = asyncio.StreamReaderProtocol(reader)
        stream.set_protocol(proto)
        writer = asyncio.StreamWriter(stream, proto, reader, loop)
        return Client(reader, writer, stream)

    async def close(self) -> None:
        if self.inbound is not None:
            await self.inbound.close()
        for s in self._servers:
            s.close()
        await self.client_pool.close()
        await self.wp_pool.close()
