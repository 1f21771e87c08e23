"""Outbound (15001): a pod's captured connection -> plan -> HBONE tunnel or plain passthrough; one result.

connect4 redirects the pod's connects to this listener; the injected OriginalDst (eBPF's
SO_ORIGINAL_DST in production) says where they were going. `plan_outbound` decides, this
carries it out: a pooled HBONE tunnel to the destination pod's 15008, or to its waypoint's
(the pool owns the relay), or a plain relay to a destination outside the mesh. Whatever happens, exactly one
ConnectionResult is recorded, when the connection ends.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

from mesh.hbone import HbonePool, PoolKey
from mesh.model import ServiceInfo, Workload
from mesh.proxy.reason import Direction, Reason
from mesh.proxy.result import Listener, ResultBuilder, SecurityPolicy
from mesh.tracecontext import format_traceparent, new_root

from ..pod_context import PodContext, addr_str
from ..relay import relay
from .plan import PlanError, Route, plan_outbound

__all__ = ["OutboundProxy"]

log = logging.getLogger("ambient.ztunnel")


def _describe(b: ResultBuilder, dst: Workload | None, svc: ServiceInfo | None) -> None:
    if dst is not None:
        b.dst_uid = dst.uid
    if svc is not None:
        b.dst_service = f"{svc.name}.{svc.namespace}.svc.cluster.local"


class OutboundProxy:
    """Serves one pod's 15001."""

    def __init__(self, ctx: PodContext, pool: HbonePool, client_tls: Callable[[], ssl.SSLContext]) -> None:
        self.ctx = ctx
        self.pool = pool
        self.client_tls = client_tls
        self.open: set[asyncio.Transport] = set()
        """Accepted connections not yet recorded (admin /debug/live, `cut_all`)."""
        self.closed_for: Reason | None = None

    def cut_all(self, reason: Reason) -> int:
        """Reset every open connection of the pod (it was deleted); results say `reason`."""
        self.closed_for = reason
        live = list(self.open)
        for t in live:
            t.abort()
        return len(live)

    async def handle(self, down: asyncio.Transport) -> None:
        self.open.add(down)
        try:
            await self._handle(down)
        finally:
            self.open.discard(down)

    async def _handle(self, down: asyncio.Transport) -> None:
        ctx = self.ctx
        w = ctx.workload
        b = ResultBuilder(Direction.OUTBOUND, Listener.OUTBOUND, ctx.clock.now())
        b.src_uid, b.src_identity = w.uid, str(w.identity)
        b.src_addr = addr_str(down.get_extra_info("peername"))
        try:
            dst = ctx.original_dst.outbound(down.get_extra_info("socket"))
            b.dst_addr = addr_str(dst)
            try:
                plan = plan_outbound(ctx.state, w, dst[0], dst[1], ctx.rng)
            except PlanError as e:  # refused: say what it was addressed to
                _describe(b, e.workload, e.service)
                raise
            _describe(b, plan.dst_workload, plan.service)
            if plan.dst_workload is None and plan.waypoint is not None:
                b.dst_uid = ctx.workload_at(plan.connect[0])  # service traffic: the waypoint is the peer
            if plan.route is Route.HBONE:
                b.security = SecurityPolicy.MUTUAL_TLS
                b.dst_hbone_addr = addr_str(plan.connect)
                b.dst_identity = str(plan.dst_identity)
                key = PoolKey(src_identity=w.identity, dst_identity=plan.dst_identity, src_ip=ctx.ip,
                              dst_ip=plan.connect[0])
                headers: tuple[tuple[str, str], ...] = ()
                if ctx.connect_traceparent:
                    b.traceparent = format_traceparent(new_root(ctx.rng, False))
                    headers = (("traceparent", b.traceparent),)
                res = await self.pool.tunnel(
                    key, downstream=down, connect=lambda: ctx.sockets.connect(plan.connect),
                    ssl_context=self.client_tls, authority=plan.authority, headers=headers,
                    trust_domain=ctx.trust_domain)
                b.status = res.status
            else:
                res = await relay(down, await ctx.sockets.connect(plan.connect))
            b.tunnel_bytes(res.bytes_sent, res.bytes_received, server_side=False)
            if self.closed_for is not None:
                b.fail(self.closed_for)
            elif res.error:
                b.fail(res.error)
        except asyncio.CancelledError:
            b.fail(Reason.CANCELLED)
            down.abort()
            raise
        except Exception as e:  # an unexpected failure must not kill the listener
            if self.closed_for is not None:
                b.fail(self.closed_for)
            elif b.fail(e) is Reason.UNEXPECTED:
                log.exception("outbound connection failed")
            down.abort()
        finally:
            ctx.record(b)
