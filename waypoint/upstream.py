"""Endpoints and upstream connections: which pod a request goes to, and HTTP/1.1 over a pooled HBONE stream to it.

`endpoints()` is pure: the endpoints of a Forward plan (the Service's, filtered by subset
labels, or the dialled pod). `pick()` is the stand-in load balancer (uniform, injected rng)
until waypoint/resilience brings real ones.

`Upstreams` opens one CONNECT per upstream HTTP/1.1 connection: HBONE to the endpoint pod's
ztunnel (`<pod ip>:15008`, `:authority <pod ip>:<target port>`, the pod's identity expected,
the waypoint's presented), pooled per PoolKey by HbonePool, so many streams share one mTLS
connection. A stream whose exchange ended cleanly and whose codec says it is reusable goes
back to a small idle list per endpoint (keep-alive), newest first; it is dropped when its
stream ends. Pods outside the mesh (tunnel protocol NONE) get plain TCP instead.
"""
from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from mesh.hbone import HbonePool, PoolKey
from mesh.identity import SpiffeId
from mesh.model import TunnelProtocol, Workload
from mesh.proxy.sockets import SocketFactory
from mesh.state import ProxyState

from .channel import HttpChannel
from .http import ClientConnection, Limits
from .plan import Forward

__all__ = ["EndpointTarget", "endpoints", "pick", "Upstreams", "UpstreamConn", "HBONE_PORT"]

HBONE_PORT = 15008
MAX_IDLE_PER_ENDPOINT = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointTarget:
    """One pod port a request can go to."""

    workload: Workload
    port: int

    @property
    def address(self) -> str:
        return f"{self.workload.ip}:{self.port}"


def endpoints(state: ProxyState, fwd: Forward) -> list[EndpointTarget]:
    if fwd.workload is not None:
        return [EndpointTarget(workload=fwd.workload, port=fwd.target_port)]
    assert fwd.service is not None
    out = []
    want = fwd.subset_labels
    for ep in fwd.service.endpoints:
        w = state.workload(ep.workload_uid)
        if w is None:
            continue
        if want and any(w.labels.get(k) != v for k, v in want.items()):
            continue
        out.append(EndpointTarget(workload=w, port=fwd.target_port))
    return out


def pick(targets: list[EndpointTarget], rng: random.Random) -> EndpointTarget | None:
    return targets[rng.randrange(len(targets))] if targets else None


class UpstreamConn(HttpChannel):
    """One upstream HTTP/1.1 connection (an HBONE stream or TCP) with its client codec."""

    __slots__ = ("codec", "target")

    def __init__(self, target: EndpointTarget, limits: Limits | None = None) -> None:
        self.codec = ClientConnection(limits)
        super().__init__(self.codec.receive_data)
        self.target = target

    @property
    def usable(self) -> bool:
        return not self.lost and not self.ended and self.codec.reusable


class Upstreams:
    """Opens, keeps and reuses upstream connections (see the module docstring)."""

    def __init__(self, *, identity: SpiffeId, pool: HbonePool, sockets: SocketFactory,
                 client_tls: Callable[[], ssl.SSLContext], trust_domain: str, limits: Limits | None = None) -> None:
        self.identity = identity
        self.pool = pool
        self.sockets = sockets
        self.client_tls = client_tls
        self.trust_domain = trust_domain
        self.limits = limits
        self._idle: dict[tuple[str, int], list[UpstreamConn]] = {}
        self.opened = 0
        self.reused = 0

    async def open_transport(self, target: EndpointTarget, src_ip: str, protocol) -> None:
        """Connect `protocol` to `target`: a CONNECT on a pooled HBONE connection, or TCP for
        a pod outside the mesh. Raises TunnelError / OSError."""
        w = target.workload
        if w.protocol is TunnelProtocol.HBONE:
            ip = str(w.ip)
            key = PoolKey(src_identity=self.identity, dst_identity=w.identity, src_ip=src_ip, dst_ip=ip)
            stream = await self.pool.open_stream(
                key, connect=lambda: self.sockets.connect((ip, HBONE_PORT)), ssl_context=self.client_tls,
                authority=target.address, trust_domain=self.trust_domain)
            stream.set_protocol(protocol)
        else:
            sock = await self.sockets.connect((str(w.ip), target.port))
            await asyncio.get_running_loop().create_connection(lambda: protocol, sock=sock)
        self.opened += 1

    async def acquire(self, target: EndpointTarget, src_ip: str) -> UpstreamConn:
        """An idle keep-alive connection to `target`, else a new one."""
        idle = self._idle.get((str(target.workload.ip), target.port))
        while idle:
            conn = idle.pop()
            if conn.usable:
                self.reused += 1
                return conn
            conn.close()
        conn = UpstreamConn(target, self.limits)
        await self.open_transport(target, src_ip, conn)
        return conn

    def release(self, conn: UpstreamConn, reusable: bool) -> None:
        """Done with `conn`: keep it for the next request to its endpoint, or close it."""
        if not (reusable and conn.usable):
            conn.abort() if not conn.codec.reusable else conn.close()
            return
        key = (str(conn.target.workload.ip), conn.target.port)
        idle = self._idle.setdefault(key, [])
        idle.append(conn)
        if len(idle) > MAX_IDLE_PER_ENDPOINT:
            idle.pop(0).close()

    def idle_count(self) -> int:
        return sum(1 for conns in self._idle.values() for c in conns if c.usable)

    def close(self) -> None:
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()
