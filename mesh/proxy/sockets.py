"""Socket factories (ztunnel's SocketFactory): a proxy never creates sockets itself.

A pod proxy asks its factory for listeners and outgoing connections. In production they live
in the pod's network namespace and its dials carry SO_MARK 0x539, so the network sees the pod's
IP and capture lets ztunnel's own traffic through; dials to the pod's app keep the client's IP
(`NetnsSockets`, mark 0x111); in tests every simulated pod gets
its own loopback address and the same proxy code runs unprivileged in one process
(`LoopbackSockets`). Every socket handed out is non-blocking.
"""
from __future__ import annotations

import asyncio
import socket
from typing import Protocol

from mesh.linux.netns import socket_in_netns

__all__ = ["SocketFactory", "NetnsSockets", "LoopbackSockets", "HostSockets", "ZTUNNEL_MARK", "CONNECT_TIMEOUT",
           "INBOUND_MARK", "INBOUND_MARK_MASK", "INBOUND_TABLE", "FWMARK_ACCEPT_SYSCTL", "has_return_path",
           "is_own_dial"]

ZTUNNEL_MARK = 0x539
"""SO_MARK on every ztunnel socket (Istio's 1337): capture lets these through."""
INBOUND_MARK = 0x111
"""SO_MARK on ztunnel's dials to a pod's app from the client's address (Istio's 0x111): the eBPF
capture lets exactly those through to the app, and the pod netns routes the app's replies to
them back over lo (ip rule fwmark INBOUND_MARK/INBOUND_MARK_MASK lookup INBOUND_TABLE)."""
INBOUND_MARK_MASK = 0xFFF
INBOUND_TABLE = 133
FWMARK_ACCEPT_SYSCTL = "/proc/sys/net/ipv4/tcp_fwmark_accept"
"""1 in a pod netns: accepted sockets take the SYN's mark, so the app's replies to a
source-preserving dial carry INBOUND_MARK. The node agent sets it after the rule and route,
so ztunnel reads it as "this pod has the return path"."""
CONNECT_TIMEOUT = 5.0
IP_TRANSPARENT = 19            # linux/in.h
IP_BIND_ADDRESS_NO_PORT = 24   # linux/in.h


class SocketFactory(Protocol):
    """Where a proxy's sockets come from."""

    def listener(self, addr: tuple[str, int]) -> socket.socket:
        """A bound, listening socket (SO_REUSEPORT: a node's workers share each port)."""
        ...

    async def connect(self, addr: tuple[str, int], timeout: float = CONNECT_TIMEOUT,
                      source: str | None = None) -> socket.socket:
        """A connected TCP socket from the pod to `addr` (TCP_NODELAY). `source`: the client's
        address, kept as the source where the factory can (the app then sees the client's
        IP, as with Istio's ztunnel); otherwise the pod's own."""
        ...


class _Base:
    def _new(self) -> socket.socket:
        raise NotImplementedError

    def _bind_source(self, s: socket.socket, source: str | None) -> None:
        pass

    def listener(self, addr: tuple[str, int]) -> socket.socket:
        s = self._new()
        try:
            _listen(s, addr)
        except OSError:
            s.close()
            raise
        return s

    async def connect(self, addr: tuple[str, int], timeout: float = CONNECT_TIMEOUT,
                      source: str | None = None) -> socket.socket:
        s = self._new()
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._bind_source(s, source)
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, addr), timeout)
        except BaseException:
            s.close()
            raise
        return s


class NetnsSockets(_Base):
    """Sockets in the network namespace at `netns` (a path or a name), marked ZTUNNEL_MARK.

    With `preserve_source` (the pod netns has the return path: :func:`has_return_path`), a
    connect given a `source` other than the pod's own dials from it: IP_TRANSPARENT, bound to
    the client's address (port chosen at connect), marked INBOUND_MARK instead, which the eBPF
    capture recognises as ztunnel's own dial to the app (ebpf/bpf/capture_ztunnel_sockops.c).
    Listeners carry no mark: with tcp_fwmark_accept their accepted sockets then show the SYN's
    mark, which is how the inbound listener recognises one of these dials steered back to it
    (a loop, if the capture hooks were missing)."""

    def __init__(self, netns: str, mark: int = ZTUNNEL_MARK, *, preserve_source: bool = False,
                 own_ip: str | None = None) -> None:
        self.netns = netns
        self.mark = mark
        self.preserve_source = preserve_source
        self.own_ip = own_ip

    def _socket(self, mark: int) -> socket.socket:
        s = socket_in_netns(self.netns)
        try:
            if mark:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        except OSError:
            s.close()
            raise
        s.setblocking(False)
        return s

    def _new(self) -> socket.socket:
        return self._socket(self.mark)

    def listener(self, addr: tuple[str, int]) -> socket.socket:
        s = self._socket(0)
        try:
            _listen(s, addr)
        except OSError:
            s.close()
            raise
        return s

    async def connect(self, addr: tuple[str, int], timeout: float = CONNECT_TIMEOUT,
                      source: str | None = None) -> socket.socket:
        if not self.preserve_source or source is None or source == self.own_ip:
            return await super().connect(addr, timeout)
        s = self._socket(INBOUND_MARK)
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            # The port is picked at connect(), unique per 4-tuple: many dials from one client
            # address do not exhaust ports the way bind-time allocation would.
            s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((source, 0))
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, addr), timeout)
        except BaseException:
            s.close()
            raise
        return s


def has_return_path(netns: str) -> bool:
    """Whether the pod netns routes replies to source-preserving dials back to ztunnel (the
    node agent sets FWMARK_ACCEPT_SYSCTL last, after the rule and route). A pod whose netns
    was set up without them (an older node agent) gets dials from its own IP instead."""
    from mesh.linux.netns import in_netns
    try:
        with in_netns(netns):
            with open(FWMARK_ACCEPT_SYSCTL, encoding="ascii") as f:
                return f.read().strip() == "1"
    except OSError:
        return False


def is_own_dial(sock: socket.socket) -> bool:
    """An accepted connection whose SYN came from one of ztunnel's source-preserving dials
    (its mark, through tcp_fwmark_accept): steered back to ztunnel, it would loop."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == INBOUND_MARK
    except OSError:
        return False


def _listen(s: socket.socket, addr: tuple[str, int]) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Workers of a node share each port: the kernel spreads connections over them
    # (sk_lookup's bpf_sk_assign also honours the reuseport group).
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(addr)
    s.listen(4096)


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

    def _bind_source(self, s: socket.socket, source: str | None) -> None:
        s.bind((self.ip, 0))   # in-process tests: the source is always the pod's own address

    def listener(self, addr: tuple[str, int]) -> socket.socket:
        return super().listener((self.ip, addr[1]))


class HostSockets(_Base):
    """Unmarked sockets in this process's own network namespace (a waypoint, started inside its
    pod's netns by the runner, whose pod is not captured)."""

    def _new(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        return s
