"""ztunnel wiring: control-plane subscription, per-node certificates, admin and readiness.

The L4 data path (capture, HBONE, authorization) plugs in here in later issues; this module
only creates components and connects them, it makes no decisions of its own.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random

from mesh import tls
from mesh.admin_http import AdminServer, Response
from mesh.ca import SecretManager, WorkloadCert
from mesh.clock import Clock
from mesh.control.client import ControlPlaneClient
from mesh.control.server import ALPN
from mesh.identity import SpiffeId
from mesh.model import TunnelProtocol
from mesh.model.wire import to_wire
from mesh.state import ProxyState

from .config import ZtunnelConfig

__all__ = ["Ztunnel", "load_bootstrap"]

log = logging.getLogger("ambient.ztunnel")


def load_bootstrap(directory: str) -> tuple[WorkloadCert, bytes]:
    """The node's bootstrap credential (key.pem, cert-chain.pem) and trust roots (root-cert.pem)."""
    def read(name: str) -> bytes:
        with open(os.path.join(directory, name), "rb") as f:
            return f.read()
    cert = WorkloadCert.from_pem(read("key.pem"), read("cert-chain.pem"))
    return cert, read("root-cert.pem")


class Ztunnel:
    """One node's ztunnel."""

    def __init__(self, cfg: ZtunnelConfig, *, clock: Clock, rng: random.Random) -> None:
        self.cfg = cfg
        self.clock = clock
        self.state = ProxyState()
        self._bootstrap, self._roots = load_bootstrap(cfg.bootstrap_dir)
        self.client = ControlPlaneClient(
            socket_path=cfg.control_plane, ssl_context=self._cp_context,
            trust_domain=cfg.trust_domain, state=self.state, clock=clock, rng=rng,
            on_update=self._on_update)
        self.secrets = SecretManager(self._fetch_cert, clock=clock, rng=rng)
        self.admin = AdminServer({
            "/healthz/ready": self._ready,
            "/config_dump": self._config_dump,
            "/": lambda _: Response(200, "ztunnel admin: /config_dump /healthz/ready\n"),
        })
        self._wanted: set[SpiffeId] = set()

    def _cp_context(self):
        return tls.client_context(self._bootstrap, self._roots, alpn=(ALPN,))

    async def _fetch_cert(self, identity, csr_pem):
        return await self.client.request_certificate(identity, csr_pem)

    def _on_update(self, state: ProxyState) -> None:
        # Hold a certificate for every enrolled service account on this node (Istio prefetches
        # them too), and let go of identities no longer scheduled here.
        wanted = {w.identity for w in state.workloads_on_node(self.cfg.node)
                  if w.protocol is TunnelProtocol.HBONE}
        for ident in wanted - self._wanted:
            self.secrets.prefetch(ident)
        for ident in self._wanted - wanted:
            self.secrets.forget(ident)
        self._wanted = wanted
        log.debug("state version %d: %d workloads", state.version, len(state.workloads()))

    # -- admin --

    def _ready(self, _path: str) -> Response:
        if self.state.synced:
            return Response(200, "ready\n")
        return Response(503, "not ready: no state from the control plane yet\n")

    def _config_dump(self, _path: str) -> Response:
        st = self.state
        return Response(200, {
            "node": self.cfg.node,
            "version": st.version,
            "synced": st.synced,
            "connected": self.client.connected.is_set(),
            "last_update_at": self.client.last_update_at,
            "client": self.client.stats,
            "workloads": [to_wire(w) for w in st.workloads()],
            "services": [to_wire(s) for s in st.services()],
            "namespaces": [to_wire(n) for n in st.namespaces()],
            "policies": [to_wire(p) for p in st.policies()],
            "certificates": self.secrets.snapshot(self.clock.now()),
        })

    # -- lifecycle --

    async def run(self) -> None:
        await self.admin.listen_unix(self.cfg.admin_socket)
        if self.cfg.listen_tcp:
            await self.admin.listen_tcp("127.0.0.1", self.cfg.admin_port)
            await self.admin.listen_tcp("127.0.0.1", self.cfg.readiness_port)
        log.info("ztunnel for node %s started; control plane %s", self.cfg.node, self.cfg.control_plane)
        try:
            await self.client.run()
        finally:
            await self.secrets.close()
            await self.admin.close()
