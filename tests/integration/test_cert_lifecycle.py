"""Certificate lifecycle on the HBONE data path, in process over loopback mTLS.

Peer certificates that are expired, not yet valid, from an untrusted CA or from another trust
domain are refused by the server (reported through `on_reject` with a stable reason) and by
the client (TunnelError); the client insists on the server identity it expects; rotating the
server's certificate in place (`tls.load_cert`, what ztunnel does at half-life) leaves open
tunnels alone and new connections present the new certificate.
"""
from __future__ import annotations

import asyncio
import time

import pytest
import uvloop
from cryptography import x509

from mesh import tls
from controlplane.ca import CertificateAuthority
from mesh.hbone import HbonePool, HboneServer, PoolKey, Rejection, TunnelError
from mesh.hbone.client import establish
from mesh.hbone.connection import ConnectionConfig
from mesh.identity import SpiffeId
from tests.fakes import FakeClock
from tests.hbone_support import (CLIENT_ID, SERVER_ID, TD, Outbound, connect_socket, dial_authority,
                                 listening_socket, start_echo)

HOUR = 3600.0


def run(coro, timeout: float = 30):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return uvloop.run(bounded())


class Pki:
    """A CA whose clock the test moves, to issue certificates valid in the past or future."""

    def __init__(self, trust_domain: str = TD) -> None:
        self.clock = FakeClock(start=time.time() - 10 * 24 * HOUR)    # CA valid from 10 days ago
        self.ca = CertificateAuthority.generate(trust_domain, clock=self.clock)
        self.clock.jump(10 * 24 * HOUR)                                 # back to now

    def issue(self, identity: SpiffeId, *, offset: float = 0.0, ttl: float = HOUR):
        """A certificate valid from now+offset for `ttl` seconds."""
        self.clock.jump(offset)
        try:
            return self.ca.issue(identity, ttl)
        finally:
            self.clock.jump(-offset)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


def expired(pki, identity):
    return pki.issue(identity, offset=-3 * HOUR, ttl=HOUR)


def not_yet_valid(pki, identity):
    return pki.issue(identity, offset=2 * HOUR, ttl=HOUR)


def untrusted(_pki, identity):
    return Pki().issue(identity)


BAD_CERTS = [(expired, "cert_expired", "expired"), (not_yet_valid, "cert_not_yet_valid", "not yet valid"),
             (untrusted, "untrusted_cert", "unable to get local issuer")]


async def start_server(pki, cert=None, roots=None, **kw):
    rejections: list[Rejection] = []
    ctx = tls.server_context(cert or pki.issue(SERVER_ID), roots or pki.ca.roots_pem)
    server = await HboneServer.start(listening_socket(), ctx, lambda req: dial_authority(req.authority),
                                     trust_domain=TD, on_reject=rejections.append, handshake_timeout=2.0, **kw)
    return server, ctx, rejections


async def dial(server, client_ctx, expected=SERVER_ID):
    sock = await connect_socket(server.sockets[0].getsockname()[:2])
    return await establish(sock, client_ctx, expected=expected, trust_domain=TD, timeout=2.0,
                           config=ConnectionConfig())


async def wait_rejection(rejections, timeout=2.0):
    for _ in range(int(timeout / 0.01)):
        if rejections:
            return rejections[0]
        await asyncio.sleep(0.01)
    raise AssertionError("no rejection reported")


def peer_serial(session) -> int:
    der = session.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def serial(cert) -> int:
    return x509.load_pem_x509_certificate(cert.chain_pem[0]).serial_number


# -- the server refuses bad client certificates ---------------------------------------------

@pytest.mark.parametrize("make, reason, _msg", BAD_CERTS, ids=[r for _, r, _ in BAD_CERTS])
def test_server_refuses_bad_client_certificate(pki, make, reason, _msg):
    async def main():
        server, _, rejections = await start_server(pki)
        try:
            with pytest.raises(TunnelError) as e:
                await dial(server, tls.client_context(make(pki, CLIENT_ID), pki.ca.roots_pem))
            # TLS 1.3: the client finished first; it learns of the refusal as the connection closes.
            assert e.value.reason in ("tls_failed", "h2_handshake_failed")
            r = await wait_rejection(rejections)
            assert (r.reason, r.stage) == (reason, "tls"), r
            assert server.connection_count == 0
            # A good client is still served.
            ok = await dial(server, tls.client_context(pki.issue(CLIENT_ID), pki.ca.roots_pem))
            ok.abort("done")
        finally:
            server.close()
    run(main())


def test_server_refuses_client_from_another_trust_domain_it_trusts(pki):
    async def main():
        other = Pki("other.example")
        roots = pki.ca.roots_pem + other.ca.roots_pem          # both roots trusted at the TLS level
        server, _, rejections = await start_server(pki, roots=roots)
        try:
            foreign = other.issue(SpiffeId(trust_domain="other.example", namespace="default",
                                           service_account="client"))
            with pytest.raises(TunnelError):
                await dial(server, tls.client_context(foreign, roots))
            r = await wait_rejection(rejections)
            assert (r.reason, r.stage) == ("wrong_trust_domain", "tls"), r
        finally:
            server.close()
    run(main())


# -- the client refuses bad server certificates ---------------------------------------------

@pytest.mark.parametrize("make, _reason, msg", BAD_CERTS, ids=[r for _, r, _ in BAD_CERTS])
def test_client_refuses_bad_server_certificate(pki, make, _reason, msg):
    async def main():
        server, _, _ = await start_server(pki, cert=make(pki, SERVER_ID))
        try:
            with pytest.raises(TunnelError) as e:
                await dial(server, tls.client_context(pki.issue(CLIENT_ID), pki.ca.roots_pem))
            assert e.value.reason == "tls_failed" and msg in str(e.value), e.value
        finally:
            server.close()
    run(main())


@pytest.mark.parametrize("server_id", [
    SpiffeId(trust_domain=TD, namespace="default", service_account="impostor"),
    SpiffeId(trust_domain=TD, namespace="other", service_account="server"),
], ids=["other-service-account", "other-namespace"])
def test_client_refuses_server_that_is_not_the_expected_identity(pki, server_id):
    async def main():
        server, _, _ = await start_server(pki, cert=pki.issue(server_id))
        try:
            with pytest.raises(TunnelError) as e:
                await dial(server, tls.client_context(pki.issue(CLIENT_ID), pki.ca.roots_pem), expected=SERVER_ID)
            assert e.value.reason == "identity_mismatch" and server_id.uri in str(e.value)
            ok = await dial(server, tls.client_context(pki.issue(CLIENT_ID), pki.ca.roots_pem), expected=server_id)
            ok.abort("done")
        finally:
            server.close()
    run(main())


def test_client_refuses_server_from_another_trust_domain(pki):
    async def main():
        other = Pki("other.example")
        roots = pki.ca.roots_pem + other.ca.roots_pem
        foreign = other.issue(SpiffeId(trust_domain="other.example", namespace="default", service_account="server"))
        server, _, _ = await start_server(pki, cert=foreign, roots=roots)
        try:
            with pytest.raises(TunnelError) as e:
                await dial(server, tls.client_context(pki.issue(CLIENT_ID), roots))
            assert e.value.reason == "identity_mismatch" and "trust domain" in str(e.value)
        finally:
            server.close()
    run(main())


# -- rotation ---------------------------------------------------------------------------

def test_server_rotation_keeps_open_tunnels_and_new_connections_see_the_new_cert(pki):
    async def main():
        echo, backend = await start_echo()
        first, second = pki.issue(SERVER_ID), pki.issue(SERVER_ID)
        assert serial(first) != serial(second)
        server, server_ctx, rejections = await start_server(pki, cert=first)
        pool = HbonePool()
        client_ctx = tls.client_context(pki.issue(CLIENT_ID), pki.ca.roots_pem)
        out = await Outbound(pool, server.sockets[0].getsockname()[:2], client_ctx,
                             f"{backend[0]}:{backend[1]}").start()
        try:
            reader, writer = await asyncio.open_connection(*out.addr)
            writer.write(b"before")
            assert await reader.readexactly(6) == b"before"
            key = PoolKey(src_identity=CLIENT_ID, dst_identity=SERVER_ID, src_ip="127.0.0.1", dst_ip="127.0.0.1")
            (old_conn,) = pool._conns[key]
            assert peer_serial(old_conn) == serial(first)

            tls.load_cert(server_ctx, second)             # rotation at half-life, listener untouched

            for i in range(20):                           # the open tunnel keeps flowing
                msg = b"after-%02d" % i
                writer.write(msg)
                assert await reader.readexactly(len(msg)) == msg
            new_conn = await dial(server, client_ctx)     # a new connection: the new certificate
            assert peer_serial(new_conn) == serial(second)
            new_conn.abort("done")
            # A new tunnel on the pooled (old) connection also still works.
            r2, w2 = await asyncio.open_connection(*out.addr)
            w2.write(b"again")
            assert await r2.readexactly(5) == b"again"
            w2.close()
            writer.write_eof()
            await reader.read()
            writer.close()
            results = await asyncio.gather(*out.tasks)
            assert all(not isinstance(r, TunnelError) and r.error is None for r in results), results
            assert rejections == []
        finally:
            await out.close()
            await pool.close()
            server.close()
            echo.close()
    run(main())


def test_client_rotation_new_connections_present_the_new_cert(pki):
    async def main():
        seen: list[SpiffeId] = []
        server, _, _ = await start_server(pki)
        try:
            first, second = pki.issue(CLIENT_ID), pki.issue(CLIENT_ID)
            ctx = tls.client_context(first, pki.ca.roots_pem)
            a = await dial(server, ctx)
            tls.load_cert(ctx, second)
            b = await dial(server, ctx)
            for s in list(server._sessions):
                der = s.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
                seen.append(x509.load_der_x509_certificate(der).serial_number)
            assert sorted(seen) == sorted([serial(first), serial(second)])
            assert not a.closed and not b.closed
            a.abort("done")
            b.abort("done")
        finally:
            server.close()
    run(main())
