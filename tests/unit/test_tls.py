"""Real TLS 1.3 handshakes between server_context and client_context, and peer identity checks."""
from __future__ import annotations

import os
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh import tls
from controlplane.ca import CertificateAuthority
from mesh.ca import WorkloadCert, key_to_pem
from mesh.clock import SystemClock
from mesh.identity import NodeId, SpiffeId
from tests.fakes import make_intermediate

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
    (tmp_path / "mid-key.pem").write_bytes(key_to_pem(mid_key))
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

class _Peer:
    def __init__(self, der: bytes | None) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        assert binary_form
        return self.der


def _der(cert: WorkloadCert) -> bytes:
    return x509.load_pem_x509_certificate(cert.cert_pem).public_bytes(serialization.Encoding.DER)


def test_check_peer_reasons(ca):
    alice = _Peer(_der(ca.issue(ALICE, 60)))
    assert tls.peer_identity(alice) == ALICE
    assert tls.check_peer(alice, trust_domain=TD, expected={ALICE, BOB}) == ALICE
    cases = [
        (alice, dict(trust_domain="other.example"), "wrong_trust_domain"),
        (alice, dict(trust_domain=TD, expected=[BOB]), "unexpected_identity"),
        (alice, dict(trust_domain=TD, expected=[]), "unexpected_identity"),
        (_Peer(None), dict(trust_domain=TD), "no_peer_cert"),
        (_Peer(x509.load_pem_x509_certificate(ca.roots_pem).public_bytes(serialization.Encoding.DER)),
         dict(trust_domain=TD), "bad_peer_identity"),
    ]
    for peer, kw, reason in cases:
        with pytest.raises(tls.PeerIdentityError) as e:
            tls.check_peer(peer, **kw)
        assert e.value.reason == reason
