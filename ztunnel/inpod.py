"""In-pod listeners: ztunnel's three ports opened inside one enrolled pod's network namespace.

    127.0.0.1:15001  outbound  connect4 redirects the pod's connects here; SO_ORIGINAL_DST
                               (answered by eBPF) gives the real destination
    0.0.0.0:15006    inbound   plaintext to the pod (sk_lookup steers it here); the original
                               destination is the socket's own address
    0.0.0.0:15008    HBONE     mTLS + HTTP/2 CONNECT, with this pod's certificate

Every socket ztunnel makes for the pod (listeners and its connections to other pods or to the
app) lives in the pod's netns, so the network sees the pod's own IP, and carries SO_MARK 0x539
so capture never takes ztunnel's own traffic. The decisions (where to send, what to accept)
are pure functions in outbound/plan.py and inbound/validate.py; this module carries them out.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mesh.linux.netns import socket_in_netns
from mesh.hbone import (ConnectRequest, HbonePool, HboneServer, HoldingProtocol, PoolKey, Reject, Rejection,
                        TunnelError, TunnelResult)
from mesh.model import Workload
from mesh.state import ProxyState

from .authz import Connection, Decision, evaluate
from .config import InboundLimits
from .inbound.validate import BadAuthority, target_of
from .outbound.plan import PlanError, Route, plan_outbound
from .relay import RelayResult, relay

__all__ = ["PodProxy", "Ports", "ZTUNNEL_MARK", "ConnectionLog"]

log = logging.getLogger("ambient.ztunnel")
access = logging.getLogger("ambient.access")

ZTUNNEL_MARK = 0x539
"""SO_MARK on every ztunnel socket (Istio's 1337): capture lets these through."""
_CONNECT_TIMEOUT = 5.0
_REJECT_LOG_WINDOW = 1.0
"""Connection-level rejections are logged at most once per reason and pod per window; the
ones in between are summed into the next entry's `count` (metrics count every one)."""


@dataclass(frozen=True, slots=True)
class Ports:
    outbound: int = 15001
    inbound: int = 15006
    hbone: int = 15008


class OriginalDst(Protocol):
    def original_dst(self, sock: socket.socket) -> tuple[str, int]: ...


class ConnectionLog(Protocol):
    def record(self, entry: dict[str, Any]) -> None: ...


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

    def __init__(self, workload: Workload, *, netns: str, state: ProxyState, pool: HbonePool,
                 client_tls: Callable[[], ssl.SSLContext], server_tls: ssl.SSLContext,
                 capture: OriginalDst, trust_domain: str, conn_log: ConnectionLog,
                 rng: random.Random, ports: Ports = Ports(), limits: InboundLimits | None = None) -> None:
        self.workload = workload
        self.netns = netns
        self.state = state
        self.pool = pool
        self.client_tls = client_tls
        self.server_tls = server_tls
        self.capture = capture
        self.trust_domain = trust_domain
        self.conn_log = conn_log
        self.rng = rng
        self.ports = ports
        self.limits = limits or InboundLimits.from_env()
        self._reject_windows: dict[str, list[Any]] = {}
        self.sockets: dict[str, socket.socket] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._hbone: HboneServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._warned: set[tuple[str, ...]] = set()
        self.active: dict[int, tuple[Connection, Callable[[], None]]] = {}
        """Open inbound connections: what they were authorized as, and how to cut them."""

    @property
    def ip(self) -> str:
        return str(self.workload.ip)

    # -- sockets in the pod --

    def _socket(self) -> socket.socket:
        s = socket_in_netns(self.netns)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, ZTUNNEL_MARK)
        s.setblocking(False)
        return s

    def _listener(self, addr: tuple[str, int]) -> socket.socket:
        s = self._socket()
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

    async def _connect(self, addr: tuple[str, int]) -> socket.socket:
        """A TCP connection from the pod's netns (source address: the pod IP)."""
        s = self._socket()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, addr), _CONNECT_TIMEOUT)
        except BaseException:
            s.close()
            raise
        return s

    # -- lifecycle --

    async def start(self) -> None:
        """Open the three listeners (before capture sends anything to them)."""
        loop = asyncio.get_running_loop()
        try:
            out = self.sockets["outbound"] = self._listener(("127.0.0.1", self.ports.outbound))
            inb = self.sockets["inbound"] = self._listener(("0.0.0.0", self.ports.inbound))
            hb = self.sockets["hbone"] = self._listener(("0.0.0.0", self.ports.hbone))
            self._servers.append(await loop.create_server(lambda: _Accept(self._outbound), sock=out))
            self._servers.append(await loop.create_server(lambda: _Accept(self._inbound_plain), sock=inb))
            self._hbone = await HboneServer.start(hb, self.server_tls, self._inbound_hbone,
                                                  trust_domain=self.trust_domain, on_result=self._hbone_done,
                                                  handshake_timeout=self.limits.handshake_timeout,
                                                  max_pending_handshakes=self.limits.max_pending_handshakes,
                                                  on_reject=self._hbone_rejected)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop listening; connections already relayed carry on until they end."""
        for s in self._servers:
            s.close()
        if self._hbone is not None:
            self._hbone.close()
        for s in self.sockets.values():
            s.close()
        self._servers.clear()

    def _spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # -- outbound (15001) --

    async def _outbound(self, down: asyncio.Transport) -> None:
        t0 = time.monotonic()
        sock = down.get_extra_info("socket")
        peer = down.get_extra_info("peername")
        entry: dict[str, Any] = {"direction": "outbound", "src.workload": self.workload.uid,
                                 "src.identity": str(self.workload.identity), "src.addr": _addr(peer)}
        try:
            dst = self.capture.original_dst(sock)
            entry["dst.addr"] = _addr(dst)
            plan = plan_outbound(self.state, self.workload, dst[0], dst[1], self.rng)
            if plan.dst_workload is not None:
                entry["dst.workload"] = plan.dst_workload.uid
            if plan.service is not None:
                entry["dst.service"] = f"{plan.service.name}.{plan.service.namespace}.svc.cluster.local"
            if plan.route is Route.HBONE:
                entry["dst.hbone_addr"] = _addr(plan.connect)
                entry["dst.identity"] = str(plan.dst_identity)
                key = PoolKey(src_identity=self.workload.identity, dst_identity=plan.dst_identity,
                              src_ip=self.ip, dst_ip=plan.connect[0])
                res: Any = await self.pool.tunnel(
                    key, downstream=down, connect=lambda: self._connect(plan.connect),
                    ssl_context=self.client_tls, authority=plan.authority, trust_domain=self.trust_domain)
            else:
                upstream = await self._connect(plan.connect)
                res = await relay(down, upstream)
            entry.update(_result(res))
        except (PlanError, TunnelError) as e:
            entry["error"] = e.reason
            down.abort()
        except (OSError, asyncio.TimeoutError) as e:
            # A capture error (no original destination) carries its own reason.
            entry["error"] = ("connect_timeout" if isinstance(e, asyncio.TimeoutError)
                              else getattr(e, "reason", None) or "connect_failed")
            down.abort()
        except Exception as e:  # an unexpected failure must not kill the listener
            log.exception("outbound connection failed")
            entry["error"] = f"internal: {type(e).__name__}"
            down.abort()
        entry["duration_ms"] = round((time.monotonic() - t0) * 1000, 1)
        self.conn_log.record(entry)

    def _workload_at(self, ip: str) -> str | None:
        w = self.state.workload_by_ip(_ip(ip))
        return w.uid if w is not None else None

    # -- authorization --

    def authorize(self, conn: Connection) -> Decision:
        d = evaluate(self.state.authorization_policies(), self.state.peer_authentications(),
                     self.workload, conn)
        if d.failed_closed and d.failed_closed not in self._warned:
            # Once per distinct set of rules, not per connection.
            self._warned.add(d.failed_closed)
            log.warning("l7_policy_failed_closed: %s: ztunnel cannot evaluate %s", self.workload.uid,
                        "; ".join(d.failed_closed))
        if d.dry_run:
            log.info("dry_run: %s would be %s by %s", conn, "allowed" if not d.allowed else "denied",
                     ", ".join(d.dry_run))
        return d

    def reauthorize(self) -> int:
        """Close open inbound connections the current policies no longer allow (Istio re-asserts
        RBAC on live connections when policy changes); returns how many were closed."""
        closed = 0
        for key, (conn, cut) in list(self.active.items()):
            d = self.authorize(conn)
            if not d.allowed:
                log.info("policy_revoked: closing %s -> %s (%s %s)", conn.src_identity or conn.src_ip,
                         self.workload.uid, d.reason, d.policy or "")
                self.active.pop(key, None)
                cut()
                closed += 1
        return closed

    # -- inbound plaintext (15006) --

    async def _inbound_plain(self, down: asyncio.Transport) -> None:
        t0 = time.monotonic()
        local = down.get_extra_info("sockname")
        entry: dict[str, Any] = {"direction": "inbound", "dst.workload": self.workload.uid,
                                 "dst.addr": _addr(local), "src.addr": _addr(down.get_extra_info("peername")),
                                 "src.workload": self._workload_at(down.get_extra_info("peername")[0]),
                                 "src.identity": None, "security": "plaintext"}
        peer = down.get_extra_info("peername")
        conn = Connection(src_identity=None, src_ip=_ip(peer[0]), dst_ip=self.workload.ip, dst_port=local[1])
        d = self.authorize(conn) if local[1] not in self._own_ports else None
        if d is None:  # addressed to 15006/15008 itself: relaying would connect to our own listener
            entry["error"] = "ztunnel_port"
            _reset(down)
            entry["duration_ms"] = round((time.monotonic() - t0) * 1000, 1)
            self.conn_log.record(entry)
            return
        if not d.allowed:
            entry["error"], entry["policy"] = d.reason, d.policy
            _reset(down)  # denied plaintext: a TCP reset, as ztunnel does
            entry["duration_ms"] = round((time.monotonic() - t0) * 1000, 1)
            self.conn_log.record(entry)
            return
        key = id(down)
        try:
            upstream = await self._connect((self.ip, local[1]))
            self.active[key] = (conn, lambda: _reset(down))
            entry.update(_result(await relay(down, upstream)))
        except (OSError, asyncio.TimeoutError):
            entry["error"] = "connect_failed"
            down.abort()
        finally:
            self.active.pop(key, None)
        entry["duration_ms"] = round((time.monotonic() - t0) * 1000, 1)
        self.conn_log.record(entry)

    # -- inbound HBONE (15008) --

    async def _inbound_hbone(self, req: ConnectRequest) -> socket.socket:
        try:
            target = target_of(req.authority, self.ip)
        except BadAuthority as e:
            raise Reject(400, e.reason, str(e)) from None
        if target[1] in self._own_ports:
            raise Reject(400, "ztunnel_port", f"{req.authority} is a ztunnel port, not the application's")
        conn = Connection(src_identity=req.peer_identity, src_ip=_ip(req.peer_addr[0]),
                          dst_ip=self.workload.ip, dst_port=target[1])
        d = self.authorize(conn)
        if not d.allowed:
            raise Reject(401, d.reason, f"denied by {d.policy or 'policy'}")
        try:
            sock = await self._connect(target)
        except (OSError, asyncio.TimeoutError):
            raise Reject(503, "upstream_connect_failed", f"cannot connect to {req.authority}") from None
        self.active[id(req)] = (conn, lambda: _shutdown(sock))
        return sock

    @property
    def _own_ports(self) -> tuple[int, ...]:
        return (self.ports.outbound, self.ports.inbound, self.ports.hbone)

    def _hbone_rejected(self, r: Rejection) -> None:
        """A connection or CONNECT the HBONE server refused before any handler: one access-log
        entry (WARNING, `error` = the stable reason) per reason and window, metrics for all."""
        now = time.monotonic()
        win = self._reject_windows.get(r.reason)
        if win is not None and now - win[0] < _REJECT_LOG_WINDOW:
            win[1] += 1
            win[2] = r
            if win[3] is None:
                win[3] = asyncio.get_running_loop().call_later(
                    win[0] + _REJECT_LOG_WINDOW - now, self._flush_rejections, r.reason)
            return
        self._reject_windows[r.reason] = [now, 0, None, None]
        self._record_rejection(r, 1)

    def _flush_rejections(self, reason: str) -> None:
        win = self._reject_windows.pop(reason, None)
        if win is not None and win[1]:
            self._reject_windows[reason] = [time.monotonic(), 0, None, None]
            self._record_rejection(win[2], win[1])

    def _record_rejection(self, r: Rejection, count: int) -> None:
        self.conn_log.record({
            "direction": "inbound", "event": "rejected", "listener": "hbone", "stage": r.stage,
            "dst.workload": self.workload.uid, "dst.identity": str(self.workload.identity),
            "dst.addr": _addr(r.local_addr), "src.addr": _addr(r.peer_addr) if r.peer_addr[0] else None,
            "src.workload": self._workload_at(r.peer_addr[0]) if r.peer_addr[0] else None,
            "src.identity": str(r.peer_identity) if r.peer_identity else None,
            "error": r.reason, "status": r.status, "detail": r.detail[:200], "count": count})

    def _hbone_done(self, req: ConnectRequest, res: TunnelResult) -> None:
        self.active.pop(id(req), None)
        entry = {"direction": "inbound", "dst.workload": self.workload.uid,
                 "dst.identity": str(self.workload.identity), "dst.addr": req.authority,
                 "src.addr": _addr(req.peer_addr), "src.workload": self._workload_at(req.peer_addr[0]),
                 "src.identity": str(req.peer_identity), "security": "mutual_tls", **_result(res, client_side=False)}
        self.conn_log.record(entry)


def _ip(s: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(s)


def _reset(t: asyncio.Transport) -> None:
    """Close with RST (SO_LINGER 0) rather than FIN: the peer learns it was refused."""
    sock = t.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
    t.abort()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _addr(a: Any) -> str | None:
    return f"{a[0]}:{a[1]}" if a else None


def _result(res: RelayResult | TunnelResult, *, client_side: bool = True) -> dict[str, Any]:
    """Access-log fields of a finished relay or tunnel. `bytes_sent` always counts source ->
    destination: a result owned by the server side of a tunnel counts the other way round."""
    sent, recv = res.bytes_sent, res.bytes_received
    if not client_side:
        sent, recv = recv, sent
    out: dict[str, Any] = {"bytes_sent": sent, "bytes_recv": recv, "duration_ms": round(res.duration * 1000, 1)}
    if res.error:
        out["error"] = res.error
    return out
