"""The proxies' libcrypto-based keys, CSRs and cert parsing, checked against `cryptography` and the CA."""
from __future__ import annotations

import ctypes
import random
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from controlplane.ca import CertificateAuthority
from mesh.ca import CertError, WorkloadCert, build_csr, generate_key, identity_from_der, key_to_pem, libcrypto
from mesh.ca.certs import split_pem
from mesh.identity import IdentityError, NodeId, SpiffeId
from tests.ca_reference import identity_from_cert
from tests.fakes import FakeClock, make_svid_like, pem_of

TD = "cluster.local"
ALICE = SpiffeId(trust_domain=TD, namespace="default", service_account="alice")


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate(TD, clock=FakeClock())


def _identities(n: int) -> list[SpiffeId | NodeId]:
    rng = random.Random(7)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"

    def name() -> str:
        inner = "".join(rng.choice(alphabet + "-.") for _ in range(rng.randint(0, 40)))
        return rng.choice(alphabet) + (inner + rng.choice(alphabet) if inner else "")
    out: list[SpiffeId | NodeId] = [NodeId(trust_domain=TD, node=name()) for _ in range(n // 5)]
    out += [SpiffeId(trust_domain=TD, namespace=name(), service_account=name()) for _ in range(n - len(out))]
    return out


def _error_queue_empty() -> bool:
    f = libcrypto._lib.ERR_peek_error
    f.restype = ctypes.c_ulong
    return f() == 0


def test_csrs_for_many_identities_are_what_the_ca_signs(ca):
    keys = set()
    for identity in _identities(60):
        key = generate_key()
        key_pem = key_to_pem(key)
        keys.add(key_pem)
        ref_key = serialization.load_pem_private_key(key_pem, None)  # PKCS#8, unencrypted
        assert isinstance(ref_key, ec.EllipticCurvePrivateKey) and isinstance(ref_key.curve, ec.SECP256R1)
        assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
        csr = x509.load_pem_x509_csr(build_csr(identity, key))
        assert csr.is_signature_valid
        assert csr.subject == x509.Name([])
        assert csr.public_key() == ref_key.public_key()
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert not san.critical and list(san.value) == [x509.UniformResourceIdentifier(identity.uri)]
        assert len(csr.extensions) == 1
        chain = ca.sign_csr(build_csr(identity, key), identity, 600)
        leaf = x509.load_pem_x509_certificate(chain[0])
        assert leaf.public_key() == ref_key.public_key()
        assert identity_from_cert(leaf) == identity == identity_from_der(leaf.public_bytes(serialization.Encoding.DER))
        cert = WorkloadCert.from_pem(key_pem, chain)
        assert cert.identity == identity
        assert cert.not_before == leaf.not_valid_before_utc.timestamp()
        assert cert.not_after == leaf.not_valid_after_utc.timestamp()
        assert cert.chain_pem == tuple(c.public_bytes(serialization.Encoding.PEM)
                                       for c in x509.load_pem_x509_certificates(b"".join(chain)))
    assert len(keys) == 60
    assert _error_queue_empty()


def test_split_pem_normalizes_as_cryptography_does(ca):
    chain = ca.sign_csr(build_csr(ALICE, generate_key()), ALICE, 60)
    messy = b"# leaf\n" + chain[0].replace(b"\n", b"\r\n") + b"\nsome text\n" + chain[1]
    assert split_pem(messy) == tuple(c.public_bytes(serialization.Encoding.PEM)
                                     for c in x509.load_pem_x509_certificates(messy))
    assert split_pem(messy) == chain


def test_identity_from_der_refuses_what_the_reference_refuses(ca):
    ca_cert_pem, ca_key_pem, _ = ca.to_pem()
    for uris in (None, [], [ALICE.uri, ALICE.uri], ["http://x/ns/a/sa/b"], ["spiffe://cluster.local/x"],
                 [ALICE.uri]):
        leaf_pem, _ = make_svid_like(ca_cert_pem, ca_key_pem, uris, now=FakeClock().now(),
                                     dns=("a.example",) if uris == [] else ())
        leaf = x509.load_pem_x509_certificate(leaf_pem)
        der = leaf.public_bytes(serialization.Encoding.DER)
        try:
            want: object = identity_from_cert(leaf)
        except IdentityError as e:
            want = str(e)
        try:
            got: object = identity_from_der(der)
        except IdentityError as e:
            got = str(e)
        assert got == want, uris
    for junk in (b"", b"\x30\x03junk", b"\x30\x00", der + b"\x00"):
        with pytest.raises(IdentityError, match="unparsable"):
            identity_from_der(junk)
    assert _error_queue_empty()


def test_from_pem_refusals_keep_their_reasons(ca):
    good = ca.issue(ALICE, 60)
    other = ca.issue(ALICE, 60)
    ec_key = serialization.load_pem_private_key(good.key_pem, None)
    sec1 = ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    assert WorkloadCert.from_pem(sec1, good.full_chain_pem).identity == ALICE  # "EC PRIVATE KEY" too
    encrypted = ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.BestAvailableEncryption(b"pw"))
    rsa_pem = pem_of(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    broken_leaf = good.cert_pem.replace(good.cert_pem[100:104], b"AAAA")
    cases = [
        (good.key_pem, b"", "bad_cert"),
        (good.key_pem, b"not pem at all", "bad_cert"),
        (good.key_pem, b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "bad_cert"),
        (good.key_pem, broken_leaf + good.chain_pem[1], "bad_cert"),
        (good.key_pem, good.cert_pem + b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n", "bad_cert"),
        (b"", good.full_chain_pem, "bad_key"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", good.full_chain_pem, "bad_key"),
        (encrypted, good.full_chain_pem, "bad_key"),
        (good.key_pem + other.key_pem, good.full_chain_pem, "bad_key"),
        (other.key_pem, good.full_chain_pem, "key_mismatch"),
        (rsa_pem, good.full_chain_pem, "key_mismatch"),
    ]
    for key_pem, chain_pem, reason in cases:
        with pytest.raises(CertError) as e:
            WorkloadCert.from_pem(key_pem, chain_pem)
        assert e.value.reason == reason, (reason, e.value)
    assert _error_queue_empty()


def test_the_proxies_never_import_cryptography():
    # ~10 MB of RSS per proxy process (its Rust extension and Python modules).
    code = ("import sys, waypoint.__main__, ztunnel.__main__, waypoint.app, ztunnel.app, mesh.ca, mesh.tls\n"
            "from mesh.ca import generate_key, build_csr\n"
            "from mesh.identity import SpiffeId\n"
            "build_csr(SpiffeId(trust_domain='td', namespace='a', service_account='b'), generate_key())\n"
            "bad = sorted(m for m in sys.modules if m == 'cryptography' or m.startswith('cryptography.'))\n"
            "assert not bad, bad\n"
            "print('ok')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stdout + p.stderr
