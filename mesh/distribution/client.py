"""A proxy's control-plane client: subscribe, keep ProxyState current, request certificates.

It reconnects with capped exponential backoff and jitter and, while disconnected, leaves the
last state untouched so the proxy keeps serving from it. Each (re)connection subscribes again
and the snapshot replaces the state wholesale, so nothing missed while away can linger.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
import ssl
from collections.abc import Callable, Sequence
from typing import Any

from mesh import tls
from mesh.clock import Clock
from mesh.identity import CONTROL_PLANE_ID, SpiffeId
from mesh.state import ProxyState, StateVersionError
from mesh.distribution.protocol import (CertificateRequest, CertificateResponse, Delta, FrameDecoder, ProtocolError,
                       Snapshot, Subscribe, decode, encode)

__all__ = ["ControlPlaneClient", "CertificateRefused", "NotConnected"]

log = logging.getLogger("ambient.control.client")


class CertificateRefused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class NotConnected(ConnectionError):
    reason = "control_plane_unavailable"


class ControlPlaneClient:
    """Keeps `state` in sync with the control plane at `socket_path` (or TCP `address`).

    `token`, when given, returns the current projected ServiceAccount token (re-read each time:
    the kubelet rotates it); it goes into Subscribe and every CertificateRequest, for a
    proxy whose `ssl_context` carries no client certificate.
    """

    def __init__(self, *, socket_path: str | None = None, address: tuple[str, int] | None = None,
                 ssl_context: Callable[[], ssl.SSLContext],
                 trust_domain: str, state: ProxyState, clock: Clock, rng: random.Random,
                 on_update: Callable[[ProxyState], None] | None = None,
                 token: Callable[[], str] | None = None,
                 on_connected: Callable[[], None] | None = None,
                 backoff_initial: float = 0.05, backoff_max: float = 1.0) -> None:
        if (socket_path is None) == (address is None):
            raise ValueError("give the control plane's socket_path or its TCP address, not both")
        self.socket_path = socket_path
        self.address = address
        self._token = token
        self._ssl_context = ssl_context
        self.trust_domain = trust_domain
        self.state = state
        self.clock = clock
        self.rng = rng
        self.on_update = on_update
        self.on_connected = on_connected
        """Called on every (re)connection: the proxy retries what failed while away (certificates)."""
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.connected = asyncio.Event()
        self.last_update_at: float | None = None
        self.stats = {"connects": 0, "connect_failures": 0, "snapshots": 0, "deltas": 0}
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[CertificateResponse]] = {}
        self._ids = itertools.count(1)

    async def run(self) -> None:
        """Connect, sync and reconnect forever (until cancelled)."""
        delay = self.backoff_initial
        while True:
            try:
                await self._session()
                delay = self.backoff_initial  # a session that got going resets the backoff
            except (OSError, ssl.SSLError, ProtocolError, StateVersionError, tls.PeerIdentityError) as e:
                self.stats["connect_failures"] += 1
                log.info("control plane unavailable (%s); retrying in %.2fs", e, delay)
            finally:
                self._disconnected()
            await self.clock.sleep(delay * (0.5 + self.rng.random() / 2))
            delay = min(delay * 2, self.backoff_max)

    async def _session(self) -> None:
        if self.address is not None:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                *self.address, ssl=self._ssl_context(), server_hostname="control-plane"), 10)
        else:
            assert self.socket_path is not None
            reader, writer = await asyncio.open_unix_connection(
                self.socket_path, ssl=self._ssl_context(), server_hostname="control-plane")
        try:
            tls.check_peer(writer.get_extra_info("ssl_object"), trust_domain=self.trust_domain,
                           expected=[CONTROL_PLANE_ID(self.trust_domain)])
            self._writer = writer
            writer.write(encode(Subscribe(last_version=self.state.version, token=self._current_token())))
            self.stats["connects"] += 1
            self.connected.set()
            if self.on_connected is not None:
                self.on_connected()
            decoder = FrameDecoder()
            while True:
                data = await reader.read(1024 * 1024)
                if not data:
                    raise ConnectionResetError("control plane closed the connection")
                for obj in decoder.feed(data):
                    self._handle(decode(obj))
        finally:
            writer.close()

    def _current_token(self) -> str | None:
        return self._token() if self._token is not None else None

    def _handle(self, msg: Any) -> None:
        if isinstance(msg, Snapshot):
            self.state.apply_snapshot(msg)
            self.stats["snapshots"] += 1
        elif isinstance(msg, Delta):
            self.state.apply_delta(msg)
            self.stats["deltas"] += 1
        elif isinstance(msg, CertificateResponse):
            fut = self._pending.pop(msg.id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            return
        else:
            raise ProtocolError(f"unexpected {msg.type} from the control plane")
        self.last_update_at = self.clock.now()
        if self.on_update is not None:
            self.on_update(self.state)

    def _disconnected(self) -> None:
        self._writer = None
        self.connected.clear()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(NotConnected("control plane connection lost"))
        self._pending.clear()

    async def request_certificate(self, identity: SpiffeId, csr_pem: bytes,
                                  ttl_seconds: float | None = None, *, timeout: float = 5.0
                                  ) -> Sequence[bytes]:
        """Ask the control plane to sign `csr_pem` for `identity`; the chain, leaf first."""
        try:
            await asyncio.wait_for(self.connected.wait(), timeout)
        except asyncio.TimeoutError:
            raise NotConnected("not connected to the control plane") from None
        writer = self._writer
        if writer is None:
            raise NotConnected("not connected to the control plane")
        rid = next(self._ids)
        fut: asyncio.Future[CertificateResponse] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        writer.write(encode(CertificateRequest(id=rid, identity=identity, csr_pem=csr_pem.decode(),
                                               ttl_seconds=ttl_seconds, token=self._current_token())))
        try:
            resp = await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)
        if resp.error is not None:
            raise CertificateRefused(resp.reason or "refused", resp.error)
        return tuple(c.encode() for c in resp.chain_pem)
