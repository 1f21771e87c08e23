"""What every in-pod listener of one pod shares: the workload, state, sockets, clock and recorder."""
from __future__ import annotations

import random
import socket
from dataclasses import dataclass
from typing import Protocol

from mesh.clock import Clock
from mesh.model import Workload
from mesh.proxy.result import ConnectionResult, ResultBuilder
from mesh.proxy.sockets import SocketFactory
from mesh.state import ProxyState

__all__ = ["Ports", "OriginalDst", "SocketOriginalDst", "ResultSink", "PodContext", "addr_str"]


@dataclass(frozen=True, slots=True)
class Ports:
    outbound: int = 15001
    inbound: int = 15006
    hbone: int = 15008

    @property
    def own(self) -> tuple[int, int, int]:
        return (self.outbound, self.inbound, self.hbone)


class OriginalDst(Protocol):
    """Where an accepted connection was really going (eBPF answers in production)."""

    def outbound(self, sock: socket.socket) -> tuple[str, int]:
        """A connection captured into 15001: the address the app connected to."""
        ...

    def inbound(self, sock: socket.socket) -> tuple[str, int]:
        """A plaintext connection steered into 15006: the pod address it was for."""
        ...


class SocketOriginalDst:
    """Production: SO_ORIGINAL_DST (answered by the eBPF getsockopt program) outbound; inbound,
    sk_lookup hands the socket over unchanged, so its own address is the destination."""

    def __init__(self, original_dst) -> None:
        self._original_dst = original_dst

    def outbound(self, sock: socket.socket) -> tuple[str, int]:
        return self._original_dst(sock)

    def inbound(self, sock: socket.socket) -> tuple[str, int]:
        return sock.getsockname()[:2]


class ResultSink(Protocol):
    def record(self, result: ConnectionResult) -> None: ...


@dataclass(kw_only=True)
class PodContext:
    """Shared by the pod's listeners; `workload` is replaced when the state updates it."""

    workload: Workload
    state: ProxyState
    sockets: SocketFactory
    original_dst: OriginalDst
    clock: Clock
    rng: random.Random
    sink: ResultSink
    trust_domain: str
    ports: Ports = Ports()
    connect_traceparent: bool = False
    """Originate a `traceparent` (a new, unsampled trace per connection) on outbound HBONE
    CONNECTs, as Istio's ztunnel does; off by default (then the hot path does not draw ids)."""

    @property
    def ip(self) -> str:
        return str(self.workload.ip)

    def workload_at(self, ip: str) -> str | None:
        """uid of the workload at `ip`, if the state knows one."""
        w = self.state.workload_at(ip)  # indexed by address text; None for malformed text too
        return w.uid if w is not None else None

    def record(self, b: ResultBuilder) -> None:
        """The one place a pod's connection results leave: built with the clock, recorded once."""
        self.sink.record(b.build(self.clock.now()))


def addr_str(a) -> str | None:
    return f"{a[0]}:{a[1]}" if a else None
