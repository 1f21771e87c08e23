"""The control plane: distributes state to proxies and signs their certificates, over mTLS.

It listens on a Unix socket (local mode: reachable from every node network namespace, never
from a network) and/or TCP (a cluster's ztunnels reach it through its Service). A proxy is
authenticated by one of two credentials, which yield the same two requesters (a node or a
workload identity): its client certificate (a node's bootstrap cert, a workload cert), or,
when `authenticate_token` is given (Kubernetes mode), a projected ServiceAccount token sent in
Subscribe and in each CertificateRequest (controlplane.kube.tokens). Per connection:
  - Subscribe  -> the full Snapshot at the current version, then every Delta as it happens;
  - CertificateRequest -> authorize (csr_authz: a node only for its pods' service accounts,
    whichever the credential), sign, reply.
State changes arrive through `resources_changed`, called by the resource source (the local
runner's store, later the Kubernetes API). Each change is translated and diffed once, encoded
once, and written to every subscriber; a subscriber that stops reading is disconnected (it
reconnects and resyncs) instead of buffering without bound.
"""
from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from mesh import tls
from controlplane.ca import CAError, CertificateAuthority
from mesh.ca import WorkloadCert
from mesh.clock import Clock
from mesh.identity import CONTROL_PLANE_ID, NodeId, SpiffeId
from mesh.model import Pod, Resource
from controlplane.csr_authz import CsrDenied, authorize_csr
from mesh.distribution.protocol import (ALPN, CertificateRequest, CertificateResponse, Delta, FrameDecoder, ProtocolError,
                       Snapshot, Subscribe, decode, encode)
from controlplane.translate import diff, translate

__all__ = ["ControlPlane", "ALPN"]

log = logging.getLogger("ambient.control")
_SLOW_SUBSCRIBER_BYTES = 64 * 1024 * 1024
_VERSION_TIMES = 256


Requester = NodeId | SpiffeId
TokenAuth = Callable[[str], Awaitable[Requester]]
"""Token -> requester, raising an exception with a `reason` when it is refused."""


class _Peer:
    __slots__ = ("identity", "writer", "subscribed", "name")

    def __init__(self, identity: Requester | None, writer: asyncio.StreamWriter) -> None:
        self.identity = identity
        """From the client certificate; None: a token peer, whose every request carries a token."""
        self.writer = writer
        self.subscribed = False
        self.name: Requester | str = identity if identity is not None else "token client"


class ControlPlane:
    """Serves proxies on `socket_path` and/or `listen`; `resources_changed` feeds it the cluster state."""

    def __init__(self, *, ca: CertificateAuthority, socket_path: str | None, clock: Clock,
                 cert_ttl: float, resources: Iterable[Resource] = (),
                 listen: tuple[str, int] | None = None, authenticate_token: TokenAuth | None = None) -> None:
        if socket_path is None and listen is None:
            raise ValueError("a control plane needs a Unix socket or a TCP address to listen on")
        self.ca = ca
        self.trust_domain = ca.trust_domain
        self.socket_path = socket_path
        self.listen = listen
        self.authenticate_token = authenticate_token
        self.clock = clock
        self.cert_ttl = cert_ttl
        self.version = 1
        self._resources: list[Resource] = list(resources)
        self._state = translate(self._resources, trust_domain=self.trust_domain)
        self._server: asyncio.AbstractServer | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._peers: set[_Peer] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ctx: ssl.SSLContext | None = None
        self._serving_cert: WorkloadCert | None = None
        self._renewer: asyncio.Task[None] | None = None
        self.stats = {"snapshots": 0, "deltas": 0, "certificates": 0, "csr_denied": 0, "auth_denied": 0,
                      "pushes": 0}
        """`deltas` counts changes (one frame each), `pushes` the frames written to subscribers."""
        self.csr_denied_by_reason: dict[str, int] = {}
        self.issued_by_identity: dict[str, int] = {}
        """Certificates signed per workload identity (SPIFFE URI)."""
        self.version_times: dict[int, float] = {1: clock.now()}
        """When each recent version was made (clock time), to measure how long proxies take
        to have it (pilot_proxy_convergence_time); the newest _VERSION_TIMES are kept."""

    @property
    def running(self) -> bool:
        return self._server is not None or self._tcp is not None

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """The bound TCP address (the port is the kernel's when `listen` asked for 0)."""
        if self._tcp is None or not self._tcp.sockets:
            return None
        host, port = self._tcp.sockets[0].getsockname()[:2]
        return host, port

    # -- lifecycle --

    async def start(self) -> None:
        if self.running:
            return
        self._refresh_serving_cert()
        if self.listen is not None:
            self._tcp = await asyncio.start_server(self._serve, self.listen[0], self.listen[1], ssl=self._ctx)
            log.info("control plane listening on %s:%d", *(self.tcp_address or self.listen))
        if self.socket_path is not None:
            if os.path.exists(self.socket_path):
                os.unlink(self.socket_path)
            self._server = await asyncio.start_unix_server(self._serve, path=self.socket_path, ssl=self._ctx)
            os.chmod(self.socket_path, 0o600)
            log.info("control plane listening on %s (version %d)", self.socket_path, self.version)
        self._renewer = asyncio.ensure_future(self._renew_serving_cert())

    async def stop(self) -> None:
        """Stop listening and drop every proxy connection (they keep their last state)."""
        servers = [s for s in (self._server, self._tcp) if s is not None]
        self._server = self._tcp = None
        if self._renewer is not None:
            self._renewer.cancel()
            self._renewer = None
        if not servers:
            return
        for server in servers:
            server.close()
        for p in list(self._peers):
            p.writer.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 2)
            except asyncio.TimeoutError:
                pass
        if self.socket_path is not None and os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        log.info("control plane stopped")

    async def _renew_serving_cert(self) -> None:
        """Re-issue the serving cert at every half-life, connections or not: a handshake
        presents the cert loaded before it, so renewing only when a proxy connects would show
        an expired cert to the first proxy after a quiet spell longer than the TTL (proxies
        reconnecting after an outage) and that handshake would fail again and again."""
        while True:
            cert = self._serving_cert
            await self.clock.sleep(max(0.05, cert.refresh_at - self.clock.now()) if cert else 0.05)
            self._refresh_serving_cert()

    def _refresh_serving_cert(self) -> None:
        # The serving cert is re-issued at half-life; new handshakes use the reloaded context.
        cert = self._serving_cert
        if cert is None or self.clock.now() >= cert.refresh_at:
            cert = self.ca.issue(CONTROL_PLANE_ID(self.trust_domain), self.cert_ttl)
            self._serving_cert = cert
            if self._ctx is None:
                self._ctx = tls.server_context(cert, self.ca.roots_pem, alpn=(ALPN,))
                if self.authenticate_token is not None:
                    # A proxy without a certificate may connect; it must then present a token.
                    self._ctx.verify_mode = ssl.CERT_OPTIONAL
            else:  # the listener keeps its context: load the new cert into it
                tls.load_cert(self._ctx, cert)

    # -- state --

    def resources_changed(self, resources: Iterable[Resource]) -> None:
        """The new full resource set: translate, diff, and push one delta if anything changed."""
        self._resources = list(resources)
        new = translate(self._resources, trust_domain=self.trust_domain)
        upserts, removals = diff(self._state, new)
        self._state = new
        if not upserts and not removals:
            return
        self.version += 1
        frame = encode(Delta(version=self.version, upserts=tuple(upserts), removals=tuple(removals)))
        self.stats["deltas"] += 1
        self.version_times[self.version] = self.clock.now()
        if len(self.version_times) > _VERSION_TIMES:
            del self.version_times[min(self.version_times)]
        for p in list(self._peers):
            if p.subscribed:
                self.stats["pushes"] += 1
                self._send(p, frame)

    def peers(self) -> list[tuple[str, bool]]:
        """(identity, subscribed) of every connected proxy."""
        return sorted((str(p.identity), p.subscribed) for p in self._peers)

    def snapshot(self) -> Snapshot:
        return Snapshot(version=self.version, resources=tuple(self._state.values()))

    def _send(self, peer: _Peer, frame: bytes) -> None:
        if peer.writer.transport.get_write_buffer_size() > _SLOW_SUBSCRIBER_BYTES:
            log.warning("slow_subscriber: dropping %s (it will resync on reconnect)", peer.name)
            peer.writer.close()
            return
        peer.writer.write(frame)

    # -- connections --

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = None
        try:
            self._refresh_serving_cert()
            sslobj = writer.get_extra_info("ssl_object")
            identity: Requester | None = None
            if self.authenticate_token is None or sslobj.getpeercert(binary_form=True) is not None:
                try:
                    identity = tls.check_peer(sslobj, trust_domain=self.trust_domain)
                except tls.PeerIdentityError as e:
                    log.warning("%s: refusing control-plane client: %s", e.reason, e)
                    return
            peer = _Peer(identity, writer)  # None: authenticated by the token in each message
            self._peers.add(peer)
            decoder = FrameDecoder()
            while True:
                data = await reader.read(256 * 1024)
                if not data:
                    return
                for obj in decoder.feed(data):
                    if not await self._handle(peer, decode(obj)):
                        return
        except ProtocolError as e:
            log.warning("%s: closing %s: %s", e.reason, peer.name if peer else "client", e)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError) as e:
            log.info("client %s disconnected: %s", peer.name if peer else "?", e)
        finally:
            if peer is not None:
                self._peers.discard(peer)
            writer.close()
            self._tasks.discard(task)

    async def _requester(self, peer: _Peer, token: str | None) -> Requester:
        """The credential's requester: the connection's certificate, else the message's token."""
        if peer.identity is not None:
            return peer.identity
        if not token:
            raise CsrDenied("no_credential", "no client certificate and no ServiceAccount token")
        assert self.authenticate_token is not None
        return await self.authenticate_token(token)

    async def _handle(self, peer: _Peer, msg: Any) -> bool:
        """Act on one message; False: close the connection."""
        if isinstance(msg, Subscribe):
            if peer.identity is None:
                try:
                    peer.name = await self._requester(peer, msg.token)
                except Exception as e:  # noqa: BLE001 - every refusal carries its reason
                    self.stats["auth_denied"] += 1
                    log.warning("%s: refusing a subscription: %s", getattr(e, "reason", "auth_failed"), e)
                    return False
            peer.subscribed = True
            self.stats["snapshots"] += 1
            self.stats["pushes"] += 1
            self._send(peer, encode(self.snapshot()))
            log.info("subscribed %s at version %d (had %d)", peer.name, self.version, msg.last_version)
        elif isinstance(msg, CertificateRequest):
            if peer.identity is None:
                # Token checks wait on the API server: other messages go on meanwhile.
                task = asyncio.get_running_loop().create_task(self._sign_with_token(peer, msg))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                self._send(peer, encode(self._sign(peer.identity, msg)))
        else:
            raise ProtocolError(f"unexpected {msg.type} from a client")
        return True

    async def _sign_with_token(self, peer: _Peer, req: CertificateRequest) -> None:
        try:
            requester = await self._requester(peer, req.token)
        except Exception as e:  # noqa: BLE001 - a TokenDenied or CsrDenied, with its reason
            reason = getattr(e, "reason", "auth_failed")
            self.stats["csr_denied"] += 1
            self.csr_denied_by_reason[reason] = self.csr_denied_by_reason.get(reason, 0) + 1
            log.warning("%s: certificate for %s refused: %s", reason, req.identity, e)
            self._send(peer, encode(CertificateResponse(id=req.id, error=str(e), reason=reason)))
            return
        self._send(peer, encode(self._sign(requester, req)))

    def _sign(self, requester: Requester, req: CertificateRequest) -> CertificateResponse:
        pods = (r for r in self._resources if isinstance(r, Pod))
        try:
            authorize_csr(requester, req.identity, trust_domain=self.trust_domain, pods=pods)
            ttl = self.cert_ttl if req.ttl_seconds is None else min(req.ttl_seconds, self.cert_ttl)
            chain = self.ca.sign_csr(req.csr_pem.encode(), req.identity, ttl)
        except (CsrDenied, CAError) as e:
            self.stats["csr_denied"] += 1
            self.csr_denied_by_reason[e.reason] = self.csr_denied_by_reason.get(e.reason, 0) + 1
            log.warning("%s: certificate for %s refused to %s: %s", e.reason, req.identity, requester, e)
            return CertificateResponse(id=req.id, error=str(e), reason=e.reason)
        self.stats["certificates"] += 1
        self.issued_by_identity[req.identity.uri] = self.issued_by_identity.get(req.identity.uri, 0) + 1
        log.info("signed %s for %s", req.identity, requester)
        return CertificateResponse(id=req.id, chain_pem=tuple(c.decode() for c in chain))
