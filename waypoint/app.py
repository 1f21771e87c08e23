"""Waypoint wiring: control-plane subscription, its own certificate, the HBONE listener and the admin socket.

The waypoint is one identity (`spiffe://<td>/ns/<ns>/sa/<gateway>`): it subscribes with its
bootstrap certificate, keeps a certificate for that identity renewed by CSR through the same
control-plane connection, serves HBONE on :15008 with it (the listener keeps its SSLContext;
a renewed certificate is loaded into it) and dials destination ztunnels with it. The data
path (waypoint/inbound.py) reads the ProxyState this module keeps current.
"""
from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable
from typing import Any

from mesh import tls
from mesh.admin_http import AdminServer, Response
from mesh.ca import SecretManager
from mesh.metrics import build_info
from mesh.clock import Clock
from mesh.distribution.client import ControlPlaneClient
from mesh.distribution.protocol import ALPN
from mesh.hbone import HbonePool, HboneServer
from mesh.identity import SpiffeId
from mesh.model.wire import to_wire
from mesh.proxy.bootstrap import TlsContexts, load_bootstrap
from mesh.proxy.sockets import SocketFactory
from mesh.state import ProxyState

from .config import WaypointConfig
from .inbound import Inbound, InboundContext
from .telemetry import WaypointMetrics

__all__ = ["Waypoint"]

log = logging.getLogger("ambient.waypoint")
_BUILD = build_info("proxy")  # Istio's component name for its (waypoint) Envoy
_RENEW_CHECK = 5.0
"""Seconds between checks that the listener still holds the newest certificate."""


class Waypoint:
    """One waypoint process (one istio-waypoint Gateway)."""

    def __init__(self, cfg: WaypointConfig, *, clock: Clock, rng: random.Random, sockets: SocketFactory,
                 access_log: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.clock = clock
        self.rng = rng
        self.sockets = sockets
        self.identity = SpiffeId(trust_domain=cfg.trust_domain, namespace=cfg.namespace, service_account=cfg.name)
        self.state = ProxyState()
        self._bootstrap: Any = None
        token = None
        if cfg.ca_token:  # in a cluster: the projected token is the credential, as ztunnel's
            with open(cfg.ca_root, "rb") as f:
                self._roots = f.read()
            token = self._read_token
        else:
            self._bootstrap, self._roots = load_bootstrap(cfg.bootstrap_dir)
        address = cfg.control_plane_address
        self.client = ControlPlaneClient(
            socket_path=None if address else cfg.control_plane, address=address, ssl_context=self._cp_context,
            trust_domain=cfg.trust_domain, state=self.state, clock=clock, rng=rng, token=token,
            on_connected=lambda: self.secrets.retry_now())  # renew at once after an outage
        self.secrets = SecretManager(self._fetch_cert, clock=clock, rng=rng)
        self.tls = TlsContexts(self.secrets, self._roots)
        self.pool = HbonePool(clock=clock)
        self.metrics = WaypointMetrics()
        self.inbound = Inbound(InboundContext(
            identity=self.identity, waypoint_namespace=cfg.namespace, waypoint_name=cfg.name,
            trust_domain=cfg.trust_domain, state=self.state, pool=self.pool, sockets=sockets,
            client_tls=lambda: self.tls.client(self.identity), clock=clock, rng=rng, metrics=self.metrics,
            access_log=access_log))
        self.server: HboneServer | None = None
        self.admin = AdminServer({
            "/healthz/ready": self._ready,
            "/config_dump": self._config_dump,
            "/metrics": self._metrics,
            "/stats/prometheus": self._metrics,
            "/": lambda _: Response(200, "waypoint admin: /config_dump /healthz/ready /metrics\n"),
        })
        self.status = AdminServer({"/healthz/ready": self._ready})
        """Readiness on TCP for the kubelet's probe (Istio's 15021), nothing else."""

    def _cp_context(self) -> ssl.SSLContext:
        if self._bootstrap is None:
            return tls.server_only_client_context(self._roots, alpn=(ALPN,))
        return tls.client_context(self._bootstrap, self._roots, alpn=(ALPN,))

    def _read_token(self) -> str:
        with open(self.cfg.ca_token) as f:  # re-read each time: the kubelet rotates it
            return f.read().strip()

    async def _fetch_cert(self, identity, csr_pem):
        return await self.client.request_certificate(identity, csr_pem)

    # -- admin --

    def _ready(self, _path: str) -> Response:
        if not self.state.synced:
            return Response(503, "not ready: no state from the control plane yet\n")
        if self.server is None:
            return Response(503, "not ready: no certificate for the HBONE listener yet\n")
        return Response(200, "ready\n")

    def _metrics(self, _path: str) -> Response:
        tracing = self.inbound.pipeline.tracing
        body = (self.metrics.exposition() + self.inbound.upstreams.exposition()
                + (tracing.exposition().encode() if tracing is not None else b"") + _BUILD)
        return Response(200, body, "text/plain; version=0.0.4")

    def _config_dump(self, _path: str) -> Response:
        st = self.state
        me = st.waypoint(self.cfg.namespace, self.cfg.name)
        return Response(200, {
            "gateway": self.cfg.gateway,
            "identity": self.identity.uri,
            "version": st.version,
            "synced": st.synced,
            "connected": self.client.connected.is_set(),
            "listening": self.server is not None,
            "last_update_at": self.client.last_update_at,
            "client": self.client.stats,
            "waypoint": to_wire(me) if me is not None else None,
            "inbound": self.inbound.stats(),
            "clusters": self.inbound.upstreams.snapshot(),
            "hbone_rejections": dict(self.server.rejections) if self.server is not None else {},
            "tracing": self.inbound.pipeline.tracing.snapshot() if self.inbound.pipeline.tracing else None,
            "services": [to_wire(s) for s in st.services()],
            "certificates": self.secrets.snapshot(self.clock.now()),
        })

    # -- lifecycle --

    async def _listen(self) -> None:
        # The first certificate comes through the control-plane connection; until then the
        # waypoint is not ready (and answers nothing on 15008).
        ctx = await self.tls.server(self.identity)
        await self.tls.refresh(self.identity)
        sock = self.sockets.listener((self.cfg.hbone_host, self.cfg.hbone_port))
        self.server = await HboneServer.start(sock, ctx, self.inbound.handle, trust_domain=self.cfg.trust_domain,
                                              handshake_timeout=self.cfg.handshake_timeout)
        log.info("waypoint %s serving HBONE on %s:%d as %s", self.cfg.gateway, self.cfg.hbone_host,
                 self.cfg.hbone_port, self.identity)
        while True:  # renewed certificates: loaded into the listener's and the pool's contexts
            await self.clock.sleep(_RENEW_CHECK)
            await self.tls.refresh(self.identity)

    async def run(self) -> None:
        await self.admin.listen_unix(self.cfg.admin_socket)
        if self.cfg.metrics_host:
            await self.admin.listen_tcp(self.cfg.metrics_host, self.cfg.metrics_port)
        if self.cfg.status_host:  # readiness only: the pod IP must not serve /config_dump
            await self.status.listen_tcp(self.cfg.status_host, self.cfg.status_port)
        log.info("waypoint %s starting; control plane %s", self.cfg.gateway, self.cfg.control_plane)
        tasks: list[asyncio.Task[Any]] = [asyncio.ensure_future(self.client.run()),
                                          asyncio.ensure_future(self._listen())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.server is not None:
                self.server.close()
            await self.inbound.close()
            await self.pool.close()
            await self.secrets.close()
            await self.admin.close()
            await self.status.close()
