"""Inbound HBONE (15008): CONNECT -> validate authority -> authorize -> connect the app; one result per CONNECT.

The HboneServer (this pod's certificate) calls `handle` for each valid CONNECT; it returns a
socket connected to the app, or raises Reject (400 bad authority or ztunnel's own port, 401
denied, 503 no upstream). The server answers 200 only once the app is connected, relays, and
reports the end through `on_result` -- for refused CONNECTs too -- which records the one
result. Refusals before any request (TLS, HTTP/2, limits) come through `on_reject`, rate
limited per reason.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket

from mesh.hbone import ConnectRequest, Reject, Rejection, TunnelResult
from mesh.proxy.reason import Direction, Reason
from mesh.proxy.result import Listener, ResultBuilder, SecurityPolicy, Stage
from mesh.tracecontext import parse_traceparent

from ..authz import Connection
from ..connection_manager import ConnectionManager
from ..pod_context import PodContext, addr_str
from .rejections import RejectionLimiter
from .validate import BadAuthority, target_of

__all__ = ["InboundHbone"]


class InboundHbone:
    """Handler and result callbacks of one pod's HboneServer."""

    def __init__(self, ctx: PodContext, connections: ConnectionManager) -> None:
        self.ctx = ctx
        self.connections = connections
        self._pending: dict[int, ResultBuilder] = {}
        self.on_reject = RejectionLimiter(ctx.clock.now, self._record_rejection)

    def _builder(self, req: ConnectRequest) -> ResultBuilder:
        ctx = self.ctx
        b = ResultBuilder(Direction.INBOUND, Listener.HBONE, ctx.clock.now(), security=SecurityPolicy.MUTUAL_TLS)
        b.dst_uid, b.dst_identity = ctx.workload.uid, str(ctx.workload.identity)
        b.dst_addr = req.authority
        b.src_addr = addr_str(req.peer_addr)
        b.src_uid = ctx.workload_at(req.peer_addr[0])
        b.src_identity = str(req.peer_identity)
        for n, v in req.headers:   # a few headers at most; the value is validated, never trusted
            if n == "traceparent":
                if parse_traceparent(v) is not None:
                    b.traceparent = v
                break
        return b

    async def handle(self, req: ConnectRequest) -> socket.socket:
        ctx = self.ctx
        b = self._pending[id(req)] = self._builder(req)
        try:
            target = target_of(req.authority, ctx.ip)
        except BadAuthority as e:
            raise self._reject(b, e) from None
        if target[1] in ctx.ports.own:
            raise self._reject(b, Reason.ZTUNNEL_PORT, f"{req.authority} is a ztunnel port, not the application's")
        conn = Connection(src_identity=req.peer_identity, src_ip=ipaddress.IPv4Address(req.peer_addr[0]),
                          dst_ip=ctx.workload.ip, dst_port=target[1])
        d = self.connections.authorize(conn)
        if not d.allowed:
            b.policy = d.policy
            raise self._reject(b, d.reason, f"denied by {d.policy or 'policy'}")
        try:
            # From the client's pod IP, as the policy saw it (Istio's original source).
            sock = await ctx.sockets.connect(target, source=str(conn.src_ip))
        except (OSError, asyncio.TimeoutError) as e:
            b.fail(Reason.UPSTREAM_CONNECT_FAILED, f"cannot connect to {req.authority}: {e!r}")
            raise Reject(503, Reason.UPSTREAM_CONNECT_FAILED.label, f"cannot connect to {req.authority}") from None
        self.connections.register(id(req), conn, lambda: _shutdown(sock))
        return sock

    @staticmethod
    def _reject(b: ResultBuilder, error: Exception | str | Reason, message: str = "") -> Reject:
        r = b.fail(error, message)
        b.status = r.status or 400
        return Reject(b.status, r.label, message or str(error))

    def on_result(self, req: ConnectRequest, res: TunnelResult) -> None:
        b = self._pending.pop(id(req), None) or self._builder(req)
        tracked = self.connections.release(id(req))
        b.tunnel_bytes(res.bytes_sent, res.bytes_received, server_side=True)
        if b.status is None and res.status:
            b.status = res.status
        if tracked is not None and tracked.revoked_by is not None:
            b.fail(Reason.POLICY_REVOKED)
            b.policy = tracked.revoked_by.policy
        elif tracked is not None and tracked.closed_for is not None:
            b.fail(tracked.closed_for)
        elif res.error:
            b.fail(res.error)
        self.ctx.record(b)

    def _record_rejection(self, r: Rejection, count: int) -> None:
        ctx = self.ctx
        b = ResultBuilder(Direction.INBOUND, Listener.HBONE, ctx.clock.now(), security=SecurityPolicy.MUTUAL_TLS)
        b.stage = Stage(r.stage)
        b.count = count
        b.dst_uid, b.dst_identity = ctx.workload.uid, str(ctx.workload.identity)
        b.dst_addr = addr_str(r.local_addr)
        if r.peer_addr[0]:
            b.src_addr = addr_str(r.peer_addr)
            b.src_uid = ctx.workload_at(r.peer_addr[0])
        b.src_identity = str(r.peer_identity) if r.peer_identity else None
        b.fail(r.reason, r.detail)
        b.status = r.status
        ctx.record(b)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
