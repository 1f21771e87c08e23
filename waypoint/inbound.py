"""The waypoint's HBONE handler: each CONNECT the waypoint terminates, to its L7 or L4 path."""
from __future__ import annotations

import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from mesh.clock import Clock
from mesh.hbone import ConnectRequest, HbonePool, PendingStream
from mesh.identity import SpiffeId
from mesh.proxy.sockets import SocketFactory
from mesh.state import ProxyState

from .telemetry import WaypointMetrics

__all__ = ["Inbound", "InboundContext"]


@dataclass(frozen=True, slots=True, kw_only=True)
class InboundContext:
    identity: SpiffeId
    waypoint_namespace: str
    waypoint_name: str
    trust_domain: str
    state: ProxyState
    pool: HbonePool
    sockets: SocketFactory
    client_tls: Callable[[], ssl.SSLContext]
    clock: Clock
    rng: random.Random
    metrics: WaypointMetrics


class Inbound:
    def __init__(self, ctx: InboundContext) -> None:
        self.ctx = ctx

    async def handle(self, req: ConnectRequest, pending: PendingStream) -> None:
        pending.reject(503, "no_data_path")

    def stats(self) -> dict:
        return {}

    async def close(self) -> None:
        pass
