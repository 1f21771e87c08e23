"""One enrolled pod: ztunnel's three listeners, opened through the pod's socket factory.

    127.0.0.1:15001  outbound  connect4 redirects the pod's connects here (outbound/proxy.py)
    0.0.0.0:15006    inbound   plaintext to the pod, steered by sk_lookup (inbound/passthrough.py)
    0.0.0.0:15008    HBONE     mTLS + HTTP/2 CONNECT with this pod's certificate (inbound/hbone.py)

The sockets come from the SocketFactory in the PodContext: in the pod's netns in production
(dials marked SO_MARK 0x539; dials to the app from the client's IP, 0x111), on the pod's own
loopback address in in-process tests. Live inbound
connections and their re-authorization are the ConnectionManager's.
"""
from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Any

from mesh.hbone import ConnectionConfig, HbonePool, HboneServer, HoldingProtocol
from mesh.model import Workload
from mesh.proxy.reason import Reason

from .config import InboundLimits
from .connection_manager import ConnectionManager
from .inbound.hbone import InboundHbone
from .inbound.passthrough import InboundPassthrough
from .outbound.proxy import OutboundProxy
from .pod_context import PodContext, Ports

__all__ = ["PodProxy", "Ports"]


class _Accept(HoldingProtocol):
    """Accepts a connection and hands its transport to a coroutine; bytes that arrive before
    the hand-off are held (uvloop reads right after connection_made) and replayed after it."""

    def __init__(self, handle: Callable[[asyncio.Transport], Any]) -> None:
        super().__init__()
        self._handle = handle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.ensure_future(self._handle(transport))


class PodProxy:
    """ztunnel's listeners for one pod, and the connections they carry."""

    def __init__(self, ctx: PodContext, *, pool: HbonePool, client_tls: Callable[[], ssl.SSLContext],
                 server_tls: ssl.SSLContext, limits: InboundLimits | None = None) -> None:
        self.ctx = ctx
        self.server_tls = server_tls
        self.limits = limits or InboundLimits.from_env()
        self.connections = ConnectionManager(ctx)
        self.outbound = OutboundProxy(ctx, pool, client_tls)
        self.passthrough = InboundPassthrough(ctx, self.connections)
        self.hbone = InboundHbone(ctx, self.connections)
        self.sockets: dict[str, socket.socket] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._hbone: HboneServer | None = None

    @property
    def workload(self) -> Workload:
        return self.ctx.workload

    @workload.setter
    def workload(self, w: Workload) -> None:
        self.ctx.workload = w

    @property
    def ip(self) -> str:
        return self.ctx.ip

    async def start(self) -> None:
        """Open the three listeners (before capture sends anything to them)."""
        loop = asyncio.get_running_loop()
        ports, mk = self.ctx.ports, self.ctx.sockets.listener
        try:
            out = self.sockets["outbound"] = mk(("127.0.0.1", ports.outbound))
            inb = self.sockets["inbound"] = mk(("0.0.0.0", ports.inbound))
            hb = self.sockets["hbone"] = mk(("0.0.0.0", ports.hbone))
            self._servers.append(await loop.create_server(lambda: _Accept(self.outbound.handle), sock=out))
            self._servers.append(await loop.create_server(lambda: _Accept(self.passthrough.handle), sock=inb))
            self._hbone = await HboneServer.start(hb, self.server_tls, self.hbone.handle,
                                                  trust_domain=self.ctx.trust_domain, on_result=self.hbone.on_result,
                                                  handshake_timeout=self.limits.handshake_timeout,
                                                  max_pending_handshakes=self.limits.max_pending_handshakes,
                                                  config=ConnectionConfig(abuse=self.limits.h2),
                                                  on_reject=self.hbone.on_reject)
        except BaseException:
            await self.close()
            raise

    def live(self) -> dict[str, int]:
        """What this pod's proxy still holds open (admin /debug/live; zero once drained)."""
        hb = self._hbone
        return {"outbound": len(self.outbound.open), "inbound": len(self.connections),
                "hbone_connections": hb.connection_count if hb is not None else 0,
                "hbone_handshakes": hb.pending_handshakes if hb is not None else 0}

    @property
    def drained(self) -> bool:
        return not any(self.live().values())

    def reauthorize(self) -> int:
        """Close open inbound connections the current policies no longer allow; how many were."""
        return self.connections.reauthorize()

    async def abort(self, reason: Reason) -> None:
        """The pod is gone: stop listening and cut every connection it had now (its netns
        cannot carry them on), each recorded with `reason`."""
        await self.close()
        self.connections.cut_all(reason)
        self.outbound.cut_all(reason)
        if self._hbone is not None:
            self._hbone.abort(reason.label)

    async def close(self) -> None:
        """Stop listening; connections already relayed carry on until they end."""
        for s in self._servers:
            s.close()
        if self._hbone is not None:
            self._hbone.close()
        for s in self.sockets.values():
            s.close()
        self._servers.clear()
        self.hbone.on_reject.close()
