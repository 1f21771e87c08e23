"""A proxy's bootstrap: logging, the process's run-until-signalled loop, the node/gateway credential it authenticates with, and TLS contexts per workload identity."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable

from mesh import tls
from mesh.ca import SecretManager, WorkloadCert
from mesh.identity import SpiffeId

__all__ = ["setup_logging", "run_until_signalled", "load_bootstrap", "TlsContexts"]


def setup_logging(level: str) -> None:
    """stderr, one line per record: the runner collects each proxy's stderr into its log file."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


def run_until_signalled(main: Callable[[], Awaitable[None]]) -> None:
    """Run a proxy's `main()` on uvloop until it returns or SIGTERM/SIGINT cancels it."""
    import uvloop
    uvloop.install()

    async def run() -> None:
        task = asyncio.ensure_future(main())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass
    asyncio.run(run())


def load_bootstrap(directory: str) -> tuple[WorkloadCert, bytes]:
    """The bootstrap credential (key.pem, cert-chain.pem) and trust roots (root-cert.pem)."""
    def read(name: str) -> bytes:
        with open(os.path.join(directory, name), "rb") as f:
            return f.read()
    cert = WorkloadCert.from_pem(read("key.pem"), read("cert-chain.pem"))
    return cert, read("root-cert.pem")


class TlsContexts:
    """HBONE TLS contexts per workload identity, rebuilt or reloaded when the certificate rotates."""

    def __init__(self, secrets: SecretManager, roots: bytes, alpn: tuple[str, ...] = ("h2",)) -> None:
        self.secrets = secrets
        self.roots = roots
        self.alpn = alpn
        self._client: dict[SpiffeId, tuple[WorkloadCert, ssl.SSLContext]] = {}
        self._server: dict[SpiffeId, tuple[WorkloadCert, ssl.SSLContext]] = {}

    async def server(self, ident: SpiffeId) -> ssl.SSLContext:
        cert = await self.secrets.get(ident)
        have = self._server.get(ident)
        if have is None:
            ctx = tls.server_context(cert, self.roots, alpn=self.alpn)
        else:
            ctx = have[1]
            if have[0] is not cert:
                tls.load_cert(ctx, cert)  # listeners keep the context: load into it
        self._server[ident] = (cert, ctx)
        return ctx

    async def refresh(self, ident: SpiffeId) -> None:
        cert = await self.secrets.get(ident)
        if ident in self._server:
            await self.server(ident)
        have = self._client.get(ident)
        if have is None or have[0] is not cert:
            self._client[ident] = (cert, tls.client_context(cert, self.roots, alpn=self.alpn))

    def client(self, ident: SpiffeId) -> ssl.SSLContext:
        return self._client[ident][1]

    def forget(self, ident: SpiffeId) -> None:
        self._client.pop(ident, None)
        self._server.pop(ident, None)
