"""Real TLS 1.3 handshakes between server_context and client_context, and peer identity checks."""
from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh import tls
from controlplane.ca import CertificateAuthority
from mesh.ca import WorkloadCert, identity_from_der
from mesh.clock import SystemClock
from mesh.identity import IdentityError, NodeId, SpiffeId
from tests.ca_reference import identity_from_cert
from tests.fakes import make_intermediate, make_svid_like, pem_of

TD = "cluster.local"
ALICE = SpiffeId(trust_domain=TD, namespace="default", service_account="alice")
BOB = SpiffeId(trust_domain=TD, namespace="default", service_account="bob")
NODE = NodeId(trust_domain=TD, node="node-1")


# OpenSSL checks validity against the real clock, so these certs are issued on it.
@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate(TD, clock=SystemClock())


@dataclass
class Outcome:
    client_error: BaseException | None = None
    server_error: BaseException | None = None
    client_peer: SpiffeId | NodeId | None = None
    server_peer: SpiffeId | NodeId | None = None
    version: str | None = None
    alpn: str | None = None


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> Outcome:
    """Handshake over a socketpair, server in a thread; then one byte each way, since a TLS 1.3
    server rejects the client's certificate after the client's handshake has returned."""
    out = Outcome()
    s_sock, c_sock = socket.socketpair()
    s_sock.settimeout(5)
    c_sock.settimeout(5)

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(s_sock, server_side=True) as ss:
                out.server_peer = tls.check_peer(ss, trust_domain=TD)
                assert ss.recv(1) == b"?"
                ss.sendall(b"!")
        except BaseException as e:  # reported to the test, not lost in the thread
            out.server_error = e
        finally:
            s_sock.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_ctx.wrap_socket(c_sock, server_hostname=None) as cs:
            out.version, out.alpn = cs.version(), cs.selected_alpn_protocol()
            out.client_peer = tls.check_peer(cs, trust_domain=TD)
            cs.sendall(b"?")
            if cs.recv(1) != b"!":
                raise ConnectionError("server closed the connection")
    except BaseException as e:
        out.client_error = e
    finally:
        c_sock.close()
        t.join(5)
    return out


def test_mutual_tls13_handshake_with_alpn_and_identities(ca):
    server, client = ca.issue(ALICE, 3600), ca.issue(NODE, 3600)
    out = handshake(tls.server_context(server, ca.roots_pem), tls.client_context(client, ca.roots_pem))
    assert out.client_error is None and out.server_error is None, out
    assert out.version == "TLSv1.3"
    assert out.alpn == "h2"
    assert out.client_peer == ALICE  # the client saw the server's identity
    assert out.server_peer == NODE


def test_custom_alpn(ca):
    cert = ca.issue(ALICE, 3600)
    out = handshake(tls.server_context(cert, ca.roots_pem, alpn=("ambient-cp/1",)),
                    tls.client_context(cert, ca.roots_pem, alpn=("ambient-cp/1",)))
    assert out.client_error is None and out.alpn == "ambient-cp/1"


def test_intermediate_ca_chain_is_presented(tmp_path: Path):
    # Peers trust only the root; the handshake works only if the intermediate is sent.
    clock = SystemClock()
    root = CertificateAuthority.generate("corp", clock=clock)
    root.save(tmp_path)
    root_cert = x509.load_pem_x509_certificate((tmp_path / "root-cert.pem").read_bytes())
    root_key = serialization.load_pem_private_key((tmp_path / "root-key.pem").read_bytes(), None)
    mid, mid_key = make_intermediate(root_cert, root_key, "issuing CA", clock.now())
    (tmp_path / "mid.pem").write_bytes(mid.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "mid-key.pem").write_bytes(pem_of(mid_key))
    ca = CertificateAuthority.load(tmp_path / "mid.pem", tmp_path / "mid-key.pem",
                                   chain_path=tmp_path / "root-cert.pem", clock=clock, trust_domain=TD)
    server, client = ca.issue(ALICE, 3600), ca.issue(BOB, 3600)
    assert len(server.chain_pem) == 3
    out = handshake(tls.server_context(server, ca.roots_pem), tls.client_context(client, ca.roots_pem))
    assert out.client_error is None and out.server_error is None, out
    assert (out.client_peer, out.server_peer) == (ALICE, BOB)


def test_client_cert_from_another_ca_is_refused(ca):
    other = CertificateAuthority.generate(TD, clock=SystemClock())
    out = handshake(tls.server_context(ca.issue(ALICE, 3600), ca.roots_pem),
                    tls.client_context(other.issue(BOB, 3600), ca.roots_pem))
    assert isinstance(out.server_error, ssl.SSLError)
    assert out.server_error.reason == "CERTIFICATE_VERIFY_FAILED"
    assert out.server_peer is None and out.client_error is not None


def test_server_cert_from_another_ca_is_refused(ca):
    other = CertificateAuthority.generate(TD, clock=SystemClock())
    out = handshake(tls.server_context(other.issue(ALICE, 3600), ca.roots_pem),
                    tls.client_context(ca.issue(BOB, 3600), ca.roots_pem))
    assert isinstance(out.client_error, ssl.SSLCertVerificationError)
    assert out.client_peer is None


def _write_cert(tmp_path: Path, cert: WorkloadCert) -> tuple[str, str]:
    (tmp_path / "c.pem").write_bytes(cert.full_chain_pem)
    (tmp_path / "k.pem").write_bytes(cert.key_pem)
    return str(tmp_path / "c.pem"), str(tmp_path / "k.pem")


def test_tls12_only_client_is_refused(ca, tmp_path):
    legacy = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    legacy.check_hostname = False
    legacy.load_verify_locations(cadata=ca.roots_pem.decode())
    legacy.maximum_version = ssl.TLSVersion.TLSv1_2
    legacy.load_cert_chain(*_write_cert(tmp_path, ca.issue(BOB, 3600)))
    out = handshake(tls.server_context(ca.issue(ALICE, 3600), ca.roots_pem), legacy)
    assert isinstance(out.server_error, ssl.SSLError)
    assert out.server_error.reason == "UNSUPPORTED_PROTOCOL"
    assert getattr(out.client_error, "reason", None) == "TLSV1_ALERT_PROTOCOL_VERSION"


def test_client_without_certificate_is_refused(ca):
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cadata=ca.roots_pem.decode())
    out = handshake(tls.server_context(ca.issue(ALICE, 3600), ca.roots_pem), anonymous)
    assert isinstance(out.server_error, ssl.SSLError)
    assert out.server_error.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert out.server_peer is None
    assert out.client_error is not None  # the client learns on its first read


def test_contexts_are_tls13_only(ca):
    cert = ca.issue(ALICE, 3600)
    for ctx in (tls.server_context(cert, ca.roots_pem), tls.client_context(cert, ca.roots_pem)):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert not ctx.check_hostname


def test_loading_keys_leaves_no_files_or_descriptors(ca, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cert = ca.issue(ALICE, 3600)
    fds = set(os.listdir("/proc/self/fd"))
    tls.server_context(cert, ca.roots_pem)
    tls.client_context(cert, ca.roots_pem)
    assert set(os.listdir("/proc/self/fd")) == fds
    assert list(tmp_path.iterdir()) == []


def test_load_cert_rotates_a_live_context(ca):
    ctx = tls.server_context(ca.issue(ALICE, 3600), ca.roots_pem)
    tls.load_cert(ctx, ca.issue(BOB, 3600))
    out = handshake(ctx, tls.client_context(ca.issue(NODE, 3600), ca.roots_pem))
    assert out.client_error is None and out.client_peer == BOB


# -- check_peer ------------------------------------------------------------------------------
# Identities are read from real handshakes: getpeercert() as OpenSSL decoded the verified cert.

# URI SANs (None: no SAN extension) of certificates that verify but are not valid SVIDs, and
# ones that are; the reference (the former cryptography-based parser) must agree on each.
CRAFTED = [
    ([ALICE.uri], ()),
    ([NODE.uri], ()),
    ([ALICE.uri], ("alice.example",)),  # other SAN types beside the one URI are ignored
    (None, ()),
    ([], ("alice.example",)),  # a SAN, but no URI in it
    ([ALICE.uri, BOB.uri], ()),
    ([ALICE.uri, ALICE.uri], ()),
    (["https://cluster.local/ns/default/sa/alice"], ()),
    (["spiffe://cluster.local/ns/default"], ()),
    (["spiffe://cluster.local/ns/Default/sa/alice"], ()),
    (["spiffe://cluster.local/ns/default/sa/alice/extra"], ()),
    (["spiffe:///ns/default/sa/alice"], ()),
]


def _server_with(chain_pem: bytes, key_pem: bytes, roots_pem: bytes, tmp_path: Path, *,
                 verify: ssl.VerifyMode = ssl.CERT_REQUIRED) -> ssl.SSLContext:
    """A plain TLS 1.3 server context presenting any (test) cert, WorkloadCert or not."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = verify
    ctx.load_verify_locations(cadata=roots_pem.decode())
    (tmp_path / "srv.pem").write_bytes(chain_pem)
    (tmp_path / "srv-key.pem").write_bytes(key_pem)
    ctx.load_cert_chain(tmp_path / "srv.pem", tmp_path / "srv-key.pem")
    return ctx


def _client_check(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
                  check: Callable[[ssl.SSLSocket], object]) -> tuple[object, object]:
    """(what `check` returned or raised on the client's socket, the same on the server's)."""
    results: list[object] = [None, None]
    s_sock, c_sock = socket.socketpair()
    s_sock.settimeout(5)
    c_sock.settimeout(5)

    def run(i: int, sock: ssl.SSLSocket) -> None:
        try:
            results[i] = check(sock)
        except Exception as e:  # the outcome under test
            results[i] = e

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(s_sock, server_side=True) as ss:
                run(1, ss)
                ss.recv(1)
        except (OSError, ssl.SSLError) as e:
            results[1] = e
        finally:
            s_sock.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_ctx.wrap_socket(c_sock, server_hostname=None) as cs:
            run(0, cs)
            cs.sendall(b"?")
    finally:
        c_sock.close()
        t.join(5)
    return results[0], results[1]


def _verdict(outcome: object) -> object:
    return outcome if not isinstance(outcome, Exception) else getattr(outcome, "reason", type(outcome).__name__)


def test_peer_identity_from_handshakes_matches_the_reference_parser(ca, tmp_path):
    ca_cert_pem, ca_key_pem, _ = ca.to_pem()
    client = tls.client_context(ca.issue(BOB, 3600), ca.roots_pem)
    for uris, dns in CRAFTED:
        leaf_pem, key_pem = make_svid_like(ca_cert_pem, ca_key_pem, uris, now=time.time(), dns=dns)
        try:
            expected: object = identity_from_cert(x509.load_pem_x509_certificate(leaf_pem))
        except IdentityError:
            expected = "bad_peer_identity"
        server = _server_with(leaf_pem, key_pem, ca.roots_pem, tmp_path)
        at_client, at_server = _client_check(server, client, tls.peer_identity)
        assert _verdict(at_client) == expected, (uris, dns, at_client)
        assert at_server == BOB  # and the server read the (valid) client identity the same way
        # The DER path (identity_from_der, libcrypto) agrees too.
        der = x509.load_pem_x509_certificate(leaf_pem).public_bytes(serialization.Encoding.DER)
        try:
            assert identity_from_der(der) == expected
        except IdentityError:
            assert expected == "bad_peer_identity"
    valid = [u for u, _ in CRAFTED if u is not None and len(u) == 1 and u[0] in (ALICE.uri, NODE.uri)]
    assert len(valid) == 3  # the table has both kinds, so neither branch is vacuous


def test_check_peer_reasons(ca, tmp_path):
    alice = ca.issue(ALICE, 60)
    server = tls.server_context(alice, ca.roots_pem)
    client = tls.client_context(ca.issue(BOB, 60), ca.roots_pem)
    cases = [
        (dict(trust_domain=TD), ALICE),
        (dict(trust_domain=TD, expected={ALICE, BOB}), ALICE),
        (dict(trust_domain="other.example"), "wrong_trust_domain"),
        (dict(trust_domain=TD, expected=[BOB]), "unexpected_identity"),
        (dict(trust_domain=TD, expected=[]), "unexpected_identity"),
    ]
    for kw, verdict in cases:
        at_client, _ = _client_check(server, client, lambda s: tls.check_peer(s, **kw))
        assert _verdict(at_client) == verdict, (kw, at_client)
    # A peer in another trust domain, under the same root (a federated CA's leaf, say).
    ca_cert_pem, ca_key_pem, _ = ca.to_pem()
    other = "spiffe://other.example/ns/default/sa/alice"
    leaf_pem, key_pem = make_svid_like(ca_cert_pem, ca_key_pem, [other], now=time.time())
    foreign = _server_with(leaf_pem, key_pem, ca.roots_pem, tmp_path)
    at_client, _ = _client_check(foreign, client, lambda s: tls.check_peer(s, trust_domain=TD))
    assert _verdict(at_client) == "wrong_trust_domain"
    # No client certificate (a server that lets that through): no_peer_cert.
    optional = _server_with(alice.full_chain_pem, alice.key_pem, ca.roots_pem, tmp_path,
                            verify=ssl.CERT_OPTIONAL)
    anonymous = tls.server_only_client_context(ca.roots_pem)
    _, at_server = _client_check(optional, anonymous, lambda s: tls.check_peer(s, trust_domain=TD))
    assert _verdict(at_server) == "no_peer_cert"
    # A context that does not verify peers gets no decoded cert: refused, not trusted blindly.
    blind = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    blind.check_hostname = False
    blind.verify_mode = ssl.CERT_NONE
    at_client, _ = _client_check(server, blind, lambda s: tls.check_peer(s, trust_domain=TD))
    assert _verdict(at_client) == "bad_peer_identity"
