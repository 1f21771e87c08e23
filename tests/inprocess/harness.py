"""A loopback mesh: real ztunnel pod proxies in this process, one 127.x.y.n address per simulated pod.

Certificates come from a real CertificateAuthority; the state is fed into ProxyState directly;
original destinations come from a table the test fills as it dials (eBPF does it in production).
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import random
import socket
from dataclasses import dataclass

from mesh import tls
from mesh.clock import SystemClock
from mesh.hbone import ConnectRequest, HbonePool, HboneServer, PendingStream
from mesh.identity import SpiffeId
from mesh.model import Endpoint, ServiceInfo, TunnelProtocol, Workload
from mesh.model.workload import BindingSource, Waypoint, WaypointBinding, WaypointStatus
from mesh.model.resources import ServicePort
from mesh.proxy.access_log import Recorder
from mesh.proxy.result import ConnectionResult
from mesh.proxy.sockets import LoopbackSockets
from ztunnel.config import InboundLimits
from ztunnel.inpod import PodProxy
from ztunnel.metrics import TcpMetrics
from ztunnel.pod_context import PodContext

from .mesh_objects import TD, MeshObjects

APP_PORT = 8080


class NoOriginalDst(OSError):
    """Like ebpf's CaptureError: the table has no entry for this connection."""

    def __init__(self, peer) -> None:
        super().__init__(errno.ENOENT, f"no original destination for {peer}")
        self.reason = "no_original_dst"


class Redirects:
    """The test's stand-in for capture: client address -> where it was going."""

    def __init__(self) -> None:
        self.out: dict[tuple[str, int], tuple[str, int]] = {}
        self.into: dict[tuple[str, int], tuple[str, int]] = {}

    def outbound(self, sock: socket.socket) -> tuple[str, int]:
        peer = sock.getpeername()[:2]
        try:
            return self.out[peer]
        except KeyError:
            raise NoOriginalDst(peer) from None

    def inbound(self, sock: socket.socket) -> tuple[str, int]:
        return self.into.get(sock.getpeername()[:2], sock.getsockname()[:2])


class App(asyncio.Protocol):
    """The pod's application: a greeting line, then an echo; closes after the client's EOF
    (as deploy/local/apps/echo.py does)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def connection_made(self, transport):
        self.t = transport
        transport.write(f"hello from {self.name}\n".encode())

    def data_received(self, data):
        self.t.write(data)

    def eof_received(self):
        # Flush, then FIN. Not write_eof(): a transport kept open after EOF is no longer read,
        # so it would be left to the GC (tests.hbone_support.EchoProtocol says why not).
        self.t.close()
        return True


class WaypointStandIn:
    """An HboneServer at the waypoint's address with the waypoint's certificate: records each
    CONNECT (authority, peer identity) and answers in process with `waypoint <authority>\n`,
    then echoes. It tests ztunnel's side of ztunnel -> waypoint, not a waypoint."""

    def __init__(self, waypoint: Waypoint) -> None:
        self.waypoint = waypoint
        self.requests: list[ConnectRequest] = []
        self.server: HboneServer | None = None

    async def handler(self, req: ConnectRequest, pending: PendingStream) -> None:
        self.requests.append(req)
        stream = pending.accept()
        stream.set_protocol(_Greeter(f"waypoint {req.authority}\n".encode()))

    def greeting(self, authority: str) -> bytes:
        return f"waypoint {authority}\n".encode()


class _Greeter(asyncio.Protocol):
    def __init__(self, first: bytes) -> None:
        self.first = first

    def connection_made(self, transport):
        self.t = transport
        transport.write(self.first)

    def data_received(self, data):
        self.t.write(bytes(data))

    def eof_received(self):
        self.t.write_eof()
        return True


@dataclass
class Pod:
    workload: Workload
    app: asyncio.AbstractServer
    proxy: PodProxy | None

    @property
    def ip(self) -> str:
        return str(self.workload.ip)

    def greeting(self) -> bytes:
        return f"hello from {self.workload.name}\n".encode()


class LoopbackMesh(MeshObjects):
    def __init__(self) -> None:
        super().__init__()
        self.metrics = TcpMetrics()
        self.log = Recorder(self.metrics.record)
        self.pool = HbonePool()
        self.redirects = Redirects()
        self.pods: dict[str, Pod] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._hbone_servers: list[HboneServer] = []

    def published(self) -> None:
        """Re-check live connections against the policies (as ztunnel's on_update does)."""
        for p in self.pods.values():
            if p.proxy is not None:
                p.proxy.reauthorize()

    async def app(self, name: str, ip: str, port: int = APP_PORT) -> asyncio.AbstractServer:
        s = await asyncio.get_running_loop().create_server(lambda: App(name), ip, port, reuse_address=True)
        self._servers.append(s)
        return s

    async def pod(self, name: str, ns: str = "mesh", sa: str = "default", *, meshed: bool = True,
                  waypoint: WaypointBinding | None = None, connect_traceparent: bool = False) -> Pod:
        ip = self.ip()
        ident = SpiffeId(trust_domain=TD, namespace=ns, service_account=sa)
        w = Workload(uid=f"{ns}/{name}", name=name, namespace=ns, node="n1", ip=ipaddress.IPv4Address(ip),
                     service_account=sa, identity=ident,
                     protocol=TunnelProtocol.HBONE if meshed else TunnelProtocol.NONE, waypoint_binding=waypoint)
        self.objects.append(w)
        self.publish()
        app = await self.app(name, ip)
        proxy = None
        if meshed:
            cert = self.ca.issue(ident)
            client_ctx = tls.client_context(cert, self.ca.roots_pem)
            ctx = PodContext(workload=w, state=self.state, sockets=LoopbackSockets(ip), original_dst=self.redirects,
                             clock=SystemClock(), rng=random.Random(1), sink=self.log, trust_domain=TD,
                             connect_traceparent=connect_traceparent)
            proxy = PodProxy(ctx, pool=self.pool, client_tls=lambda: client_ctx,
                             server_tls=tls.server_context(cert, self.ca.roots_pem), limits=InboundLimits())
            await proxy.start()
        pod = self.pods[name] = Pod(w, app, proxy)
        return pod

    async def waypoint(self, name: str, ns: str = "mesh", *, addressed: bool = True) -> WaypointStandIn:
        """A waypoint `ns/name` (identity sa `name`), its pod (not captured) and a stand-in
        HBONE server on its address; `addressed=False`: published without an address."""
        ident = SpiffeId(trust_domain=TD, namespace=ns, service_account=name)
        ip = self.ip()
        wp = Waypoint(name=name, namespace=ns, identity=ident,
                      address=ipaddress.IPv4Address(ip) if addressed else None)
        stand_in = WaypointStandIn(wp)
        if addressed:
            self.objects.append(Workload(uid=f"{ns}/{name}-waypoint", name=f"{name}-waypoint", namespace=ns,
                                         node="n1", ip=ipaddress.IPv4Address(ip), service_account=name,
                                         identity=ident, protocol=TunnelProtocol.NONE))
            cert = self.ca.issue(ident)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((ip, 15008))
            sock.listen(64)
            stand_in.server = await HboneServer.start(sock, tls.server_context(cert, self.ca.roots_pem),
                                                      stand_in.handler, trust_domain=TD)
            self._hbone_servers.append(stand_in.server)
        self.objects.append(wp)
        self.publish()
        return stand_in

    def service(self, name: str, ns: str, vip: str, port: int, pods: list[Pod], *,
                waypoint: WaypointBinding | None = None) -> ServiceInfo:
        svc = ServiceInfo(name=name, namespace=ns, vip=ipaddress.IPv4Address(vip),
                          ports=(ServicePort(port=port, target_port=APP_PORT),),
                          endpoints=tuple(Endpoint(workload_uid=p.workload.uid, ip=p.workload.ip) for p in pods),
                          waypoint_binding=waypoint)
        self.objects.append(svc)
        self.publish()
        return svc

    # -- clients --

    async def _dial(self, src_ip: str, to: tuple[str, int], table: dict, dst: tuple[str, int]):
        loop = asyncio.get_running_loop()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.bind((src_ip, 0))
        table[s.getsockname()[:2]] = dst
        try:
            await loop.sock_connect(s, to)
        except BaseException:
            s.close()
            raise
        return await asyncio.open_connection(sock=s)

    async def dial_out(self, pod: Pod, dst: tuple[str, int]):
        """The pod's app connects to `dst`; capture sends it to the pod's 15001."""
        return await self._dial(pod.ip, (pod.ip, 15001), self.redirects.out, dst)

    async def dial_in(self, src_ip: str, pod: Pod, port: int = APP_PORT):
        """A plaintext client at `src_ip` connects to the pod; sk_lookup sends it to 15006."""
        return await self._dial(src_ip, (pod.ip, 15006), self.redirects.into, (pod.ip, port))

    async def result(self, pred, timeout: float = 5.0) -> ConnectionResult:
        """The first recorded result matching `pred` (they are recorded when connections end)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for r in self.log.results:
                if pred(r):
                    return r
            if loop.time() > deadline:
                raise AssertionError(f"no matching result in {[r.log_fields() for r in self.log.results]}")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        for p in self.pods.values():
            if p.proxy is not None:
                await p.proxy.close()
        for s in self._servers:
            s.close()
        for h in self._hbone_servers:
            h.close()
        await self.pool.close()


def binding(name: str, ns: str = "mesh", *, status: WaypointStatus = WaypointStatus.BOUND,
            source: BindingSource = BindingSource.SERVICE) -> WaypointBinding:
    """A waypoint binding as the control plane makes it (identity only when the waypoint exists)."""
    ident = (SpiffeId(trust_domain=TD, namespace=ns, service_account=name)
             if status is not WaypointStatus.MISSING else None)
    return WaypointBinding(namespace=ns, name=name, source=source, status=status, identity=ident)


async def roundtrip(reader, writer, payload: bytes, chunk: int = 64 * 1024) -> bytes:
    """Send `payload`, half-close, read all until EOF."""
    async def send():
        for i in range(0, len(payload), chunk):
            writer.write(payload[i:i + chunk])
            await writer.drain()
        writer.write_eof()
    sender = asyncio.ensure_future(send())
    got = bytearray()
    while True:
        d = await asyncio.wait_for(reader.read(1 << 20), 10)
        if not d:
            break
        got += d
    await sender
    writer.close()
    return bytes(got)
