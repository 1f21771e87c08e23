"""Inbound passthrough (15006): plaintext to the pod, authorized with no identity, relayed to the app.

sk_lookup steers plaintext connections for the pod here; the injected OriginalDst says which
pod port they were for. Denied ones are reset (as ztunnel does); ones addressed to ztunnel's
own ports are reset too, since relaying them would connect to our own listener.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

from mesh.proxy.reason import Direction, Reason
from mesh.proxy.result import Listener, ResultBuilder, SecurityPolicy

from mesh.proxy.sockets import is_own_dial

from ..authz import Connection
from ..connection_manager import ConnectionManager
from ..pod_context import PodContext, addr_str
from ..relay import relay

__all__ = ["InboundPassthrough", "reset"]

log = logging.getLogger("ambient.ztunnel")


class InboundPassthrough:
    """Serves one pod's 15006."""

    def __init__(self, ctx: PodContext, connections: ConnectionManager) -> None:
        self.ctx = ctx
        self.connections = connections

    async def handle(self, down: asyncio.Transport) -> None:
        ctx = self.ctx
        b = ResultBuilder(Direction.INBOUND, Listener.INBOUND, ctx.clock.now(), security=SecurityPolicy.PLAINTEXT)
        b.dst_uid = ctx.workload.uid
        peer = down.get_extra_info("peername")
        b.src_addr = addr_str(peer)
        b.src_uid = ctx.workload_at(peer[0])
        tracked = None
        try:
            local = ctx.original_dst.inbound(down.get_extra_info("socket"))
            b.dst_addr = addr_str(local)
            if local[1] in ctx.ports.own or is_own_dial(down.get_extra_info("socket")):
                # ztunnel's own port, or its own dial to the app steered back here (the
                # capture hooks that tell those apart are missing): relaying would loop.
                b.fail(Reason.ZTUNNEL_PORT)
                reset(down)
                return
            conn = Connection(src_identity=None, src_ip=ipaddress.IPv4Address(peer[0]),
                              dst_ip=ctx.workload.ip, dst_port=local[1])
            d = self.connections.authorize(conn)
            if not d.allowed:
                b.fail(d.reason)
                b.policy = d.policy
                reset(down)  # denied plaintext: a TCP reset, as ztunnel does
                return
            upstream = await ctx.sockets.connect((ctx.ip, local[1]), source=peer[0])
            tracked = self.connections.register(down, conn, lambda: reset(down))
            res = await relay(down, upstream)
            b.tunnel_bytes(res.bytes_sent, res.bytes_received, server_side=False)
            if tracked.revoked_by is not None:
                b.fail(Reason.POLICY_REVOKED)
                b.policy = tracked.revoked_by.policy
            elif tracked.closed_for is not None:
                b.fail(tracked.closed_for)
            elif res.error:
                b.fail(res.error)
        except asyncio.CancelledError:
            b.fail(Reason.CANCELLED)
            down.abort()
            raise
        except Exception as e:
            if b.fail(e) is Reason.UNEXPECTED:
                log.exception("inbound connection failed")
            down.abort()
        finally:
            if tracked is not None:
                self.connections.release(down)
            ctx.record(b)


def reset(t: asyncio.Transport) -> None:
    """Close with RST (SO_LINGER 0) rather than FIN: the peer learns it was refused."""
    sock = t.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
    t.abort()
