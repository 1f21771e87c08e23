"""TLS 1.3 mTLS contexts for HBONE from in-memory certs, and SPIFFE peer identity checks."""
from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Collection, Iterator, Sequence

from .ca import libcrypto
from .ca.certs import WorkloadCert, chain_ders, identity_from_uri_sans
from .identity import IdentityError, NodeId, SpiffeId

__all__ = ["server_context", "client_context", "server_only_client_context", "load_cert", "peer_identity", "check_peer", "PeerIdentityError"]


class PeerIdentityError(Exception):
    """The TLS peer's identity is missing or not acceptable; `reason` is a stable label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def server_context(cert: WorkloadCert, roots_pem: bytes, *,
                   alpn: Sequence[str] = ("h2",)) -> ssl.SSLContext:
    """TLS 1.3 server context requiring a client certificate issued under `roots_pem`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _configure(ctx, cert, roots_pem, alpn)
    return ctx


def client_context(cert: WorkloadCert, roots_pem: bytes, *,
                   alpn: Sequence[str] = ("h2",)) -> ssl.SSLContext:
    """TLS 1.3 client context presenting `cert` and verifying the server's chain.

    Hostname checking is off: HBONE sends no SNI and peers are named by SPIFFE URIs, which
    the caller checks with `check_peer` after the handshake.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    _configure(ctx, cert, roots_pem, alpn)
    return ctx


def server_only_client_context(roots_pem: bytes, *, alpn: Sequence[str] = ("h2",)) -> ssl.SSLContext:
    """As `client_context`, presenting no certificate: a proxy that authenticates otherwise
    (a ServiceAccount token) still verifies the server's chain."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cadata=roots_pem.decode("ascii"))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def _configure(ctx: ssl.SSLContext, cert: WorkloadCert, roots_pem: bytes,
               alpn: Sequence[str]) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cadata=roots_pem.decode("ascii"))
    load_cert(ctx, cert)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))


def load_cert(ctx: ssl.SSLContext, cert: WorkloadCert) -> None:
    """Install `cert` as the context's own certificate, replacing any previous one; a
    listening server rotates its cert this way, for handshakes that start afterwards."""
    with _memfile(b"".join(_presented_chain(cert))) as cert_path, _memfile(cert.key_pem) as key_path:
        ctx.load_cert_chain(cert_path, key_path)


def _presented_chain(cert: WorkloadCert) -> tuple[bytes, ...]:
    """Leaf and intermediates: the peer has the root already, so it is not sent."""
    if len(cert.chain_pem) > 1:
        if libcrypto.cert_fields(chain_ders(cert.chain_pem[-1])[0]).self_issued:
            return cert.chain_pem[:-1]
    return cert.chain_pem


@contextlib.contextmanager
def _memfile(data: bytes) -> Iterator[str]:
    """A path to `data` in an anonymous memory file, so private keys never touch disk;
    the file vanishes when the descriptor is closed on exit."""
    fd = os.memfd_create("mesh-tls", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        yield f"/proc/self/fd/{fd}"  # reopening via /proc starts at offset 0
    finally:
        os.close(fd)


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> SpiffeId | NodeId:
    """The SPIFFE identity in the (already verified) peer certificate.

    Read from `getpeercert()`'s dict, which OpenSSL decoded during the handshake's
    verification: no DER parsing of ours per connection. It is empty when the context does
    not verify peers; every context here requires and verifies them, so empty is refused."""
    try:
        cert = ssl_object.getpeercert()
    except ValueError as e:  # e.g. a URI SAN that is not UTF-8
        raise PeerIdentityError("bad_peer_identity", f"peer certificate: undecodable: {e}") from None
    if cert is None:
        raise PeerIdentityError("no_peer_cert", "peer presented no certificate")
    if not cert:
        raise PeerIdentityError("bad_peer_identity", "peer certificate was not verified (CERT_NONE context)")
    sans = cert.get("subjectAltName")
    uris = None if sans is None else [value for kind, value in sans if kind == "URI"]
    try:
        return identity_from_uri_sans(uris)
    except IdentityError as e:
        raise PeerIdentityError("bad_peer_identity", f"peer certificate: {e}") from None


def check_peer(ssl_object: ssl.SSLObject | ssl.SSLSocket, *, trust_domain: str,
               expected: Collection[SpiffeId | NodeId] | None = None) -> SpiffeId | NodeId:
    """The peer's identity, if it is in `trust_domain` and (when given) one of `expected`."""
    identity = peer_identity(ssl_object)
    if identity.trust_domain != trust_domain:
        raise PeerIdentityError("wrong_trust_domain",
                                f"peer {identity.uri} is not in trust domain {trust_domain!r}")
    if expected is not None and identity not in expected:
        raise PeerIdentityError("unexpected_identity", f"peer {identity.uri} is not an expected identity")
    return identity
