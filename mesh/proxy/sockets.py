"""Socket factories (ztunnel's SocketFactory): a proxy never creates sockets itself.

A pod proxy asks its factory for listeners and outgoing connections. In production they live
in the pod's network namespace and carry SO_MARK 0x539, so the network sees the pod's IP and
capture lets ztunnel's own traffic through (`NetnsSockets`); in tests every simulated pod gets
its own loopback address and the same proxy code runs unprivileged in one process
(`LoopbackSockets`). Every socket handed out is non-blocking.
"""
from __future__ import annotations

import asyncio
import socket
from typing import Protocol

from mesh.linux.netns import socket_in_netns

__all__ = ["SocketFactory", "NetnsSockets", "LoopbackSockets", "HostSockets", "ZTUNNEL_MARK", "CONNECT_TIMEOUT"]

ZTUNNEL_MARK = 0x539
"""SO_MARK on every ztunnel socket (Istio's 1337): capture lets these through."""
CONNECT_TIMEOUT = 5.0


class SocketFactory(Protocol):
    """Where a proxy's sockets come from."""

    def listener(self, addr: tuple[str, int]) -> socket.socket:
        """A bound, listening socket (SO_REUSEPORT: a node's workers share each port)."""
        ...

    async def connect(self, addr: tuple[str, int], timeout: float = CONNECT_TIMEOUT) -> socket.socket:
        """A connected TCP socket from the pod to `addr` (TCP_NODELAY)."""
        ...


class _Base:
    def _new(self) -> socket.socket:
        raise NotImplementedError

    def _bind_source(self, s: socket.socket) -> None:
        pass

    def listener(self, addr: tuple[str, int]) -> socket.socket:
        s = self._new()
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Workers of a node share each port: the kernel spreads connections over them
            # (sk_lookup's bpf_sk_assign also honours the reuseport group).
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(addr)
            s.listen(4096)
        except OSError:
            s.close()
            raise
        return s

    async def connect(self, addr: tuple[str, int], timeout: float = CONNECT_TIMEOUT) -> socket.socket:
        s = self._new()
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._bind_source(s)
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, addr), timeout)
        except BaseException:
            s.close()
            raise
        return s


class NetnsSockets(_Base):
    """Sockets in the network namespace at `netns` (a path or a name), marked ZTUNNEL_MARK."""

    def __init__(self, netns: str, mark: int = ZTUNNEL_MARK) -> None:
        self.netns = netns
        self.mark = mark

    def _new(self) -> socket.socket:
        s = socket_in_netns(self.netns)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
        except OSError:
            s.close()
            raise
        s.setblocking(False)
        return s


class LoopbackSockets(_Base):
    """Sockets in this process's own namespace for a pod simulated at loopback address `ip`:
    listeners on `ip` whatever address they are asked for, connections from `ip`."""

    def __init__(self, ip: str) -> None:
        if not ip.startswith("127."):
            raise ValueError(f"a loopback pod needs a 127.0.0.0/8 address, not {ip}")
        self.ip = ip

    def _new(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        return s

    def _bind_source(self, s: socket.socket) -> None:
        s.bind((self.ip, 0))

    def listener(self, addr: tuple[str, int]) -> socket.socket:
        return super().listener((self.ip, addr[1]))


class HostSockets(_Base):
    """Unmarked sockets in this process's own network namespace (a waypoint, started inside its
    pod's netns by the runner, whose pod is not captured)."""

    def _new(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        return s
