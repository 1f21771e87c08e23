"""CA: chains verify with openssl, SVID fields, TTLs, key file mode, load errors, CSR checks."""
from __future__ import annotations

import asyncio
import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane.ca import CLOCK_SKEW_GRACE, DEFAULT_TTL, CAError, CertificateAuthority
from mesh.ca import WorkloadCert, build_csr, generate_key, identity_from_der, key_to_pem
from mesh.identity import IdentityError, NodeId, SpiffeId
from tests.fakes import FakeClock, make_intermediate, pem_of

TD = "cluster.local"
ALICE = SpiffeId(trust_domain=TD, namespace="default", service_account="alice")
BOB = SpiffeId(trust_domain=TD, namespace="default", service_account="bob")
NODE = NodeId(trust_domain=TD, node="node-1")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ca(clock: FakeClock) -> CertificateAuthority:
    return CertificateAuthority.generate(TD, clock=clock)


def _leaf(chain: tuple[bytes, ...]) -> x509.Certificate:
    return x509.load_pem_x509_certificate(chain[0])


def _openssl_verify(tmp_path: Path, chain: tuple[bytes, ...], roots_pem: bytes, at: float,
                    *, ok: bool = True) -> None:
    """Verify leaf -> intermediates -> root with the openssl CLI, at virtual time `at`."""
    (tmp_path / "root.pem").write_bytes(roots_pem)
    (tmp_path / "leaf.pem").write_bytes(chain[0])
    # Intermediates are everything between the leaf and the root.
    (tmp_path / "untrusted.pem").write_bytes(b"".join(chain[1:-1]) or chain[-1])
    out = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-purpose", "sslclient", "-attime", str(int(at) + 1),
         "-CAfile", str(tmp_path / "root.pem"), "-untrusted", str(tmp_path / "untrusted.pem"),
         str(tmp_path / "leaf.pem")],
        capture_output=True, text=True, check=False)
    if ok:
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.strip().endswith(": OK")
    else:
        assert out.returncode != 0, out.stdout


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def two_level_files(tmp_path: Path, clock: FakeClock) -> dict[str, Path]:
    """root -> mid -> issuing CA on disk, as an operator would plug in; the root is not ours."""
    root_ca = CertificateAuthority.generate("corp", clock=clock)
    root_ca.save(tmp_path / "root")
    root_cert = x509.load_pem_x509_certificate((tmp_path / "root" / "root-cert.pem").read_bytes())
    root_key = serialization.load_pem_private_key((tmp_path / "root" / "root-key.pem").read_bytes(), None)
    mid, mid_key = make_intermediate(root_cert, root_key, "mid CA", clock.now())
    issuing, issuing_key = make_intermediate(mid, mid_key, "issuing CA", clock.now())
    d = tmp_path / "plugged"
    d.mkdir()
    files = {"cert": d / "ca-cert.pem", "key": d / "ca-key.pem", "chain": d / "cert-chain.pem",
             "root": d / "root.pem"}
    files["cert"].write_bytes(_pem(issuing))
    files["key"].write_bytes(pem_of(issuing_key))
    files["chain"].write_bytes(_pem(root_cert) + _pem(mid))  # deliberately root first
    files["root"].write_bytes(_pem(root_cert))
    return files


# -- chains ---------------------------------------------------------------------------------

def test_generated_root_chain_verifies_with_openssl(ca, clock, tmp_path):
    chain = ca.sign_csr(build_csr(ALICE, generate_key()), ALICE, DEFAULT_TTL)
    assert len(chain) == 2
    assert chain[-1] == ca.roots_pem
    _openssl_verify(tmp_path, chain, ca.roots_pem, clock.now())
    # The same check fails against another root, and once the leaf has expired.
    other = CertificateAuthority.generate(TD, clock=clock)
    _openssl_verify(tmp_path, chain, other.roots_pem, clock.now(), ok=False)
    _openssl_verify(tmp_path, chain, ca.roots_pem, clock.now() + DEFAULT_TTL, ok=False)


def test_root_certificate_fields(ca):
    root = x509.load_pem_x509_certificate(ca.roots_pem)
    assert root.subject == root.issuer
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == TD
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ambient root CA"
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert ca.trust_domain == TD


def test_loaded_intermediate_chain_verifies_with_openssl(two_level_files, clock, tmp_path):
    f = two_level_files
    ca = CertificateAuthority.load(f["cert"], f["key"], chain_path=f["chain"], clock=clock,
                                   trust_domain=TD)
    assert ca.trust_domain == TD
    assert ca.roots_pem == f["root"].read_bytes()
    chain = ca.sign_csr(build_csr(ALICE, generate_key()), ALICE, 3600)
    assert len(chain) == 4  # leaf, issuing, mid, root
    names = [x509.load_pem_x509_certificate(p).subject.rfc4514_string() for p in chain[1:]]
    assert names == ["CN=issuing CA,O=Example Corp", "CN=mid CA,O=Example Corp",
                     f"CN=ambient root CA,O=corp"]
    leaf = _leaf(chain)
    assert leaf.issuer == x509.load_pem_x509_certificate(chain[1]).subject
    _openssl_verify(tmp_path, chain, ca.roots_pem, clock.now())


def test_intermediate_trust_domain_defaults_to_subject_org(two_level_files, clock):
    f = two_level_files
    ca = CertificateAuthority.load(f["cert"], f["key"], chain_path=f["chain"], clock=clock)
    assert ca.trust_domain == "Example Corp"


def test_intermediate_round_trips_through_save(two_level_files, clock, tmp_path):
    f = two_level_files
    ca = CertificateAuthority.load(f["cert"], f["key"], chain_path=f["chain"], clock=clock,
                                   trust_domain=TD)
    ca.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "cert-chain.pem").exists()
    again = CertificateAuthority.load_or_create(tmp_path / "saved", TD, clock=clock)
    assert again.roots_pem == ca.roots_pem
    chain = again.sign_csr(build_csr(BOB, generate_key()), BOB, 60)
    _openssl_verify(tmp_path, chain, again.roots_pem, clock.now())


# -- the SVID --------------------------------------------------------------------------------

def test_svid_fields(ca, clock):
    key = generate_key()
    chain = ca.sign_csr(build_csr(ALICE, key), ALICE, DEFAULT_TTL)
    leaf = _leaf(chain)
    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(ALICE.uri)]
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.key_agreement
    assert not ku.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    root = x509.load_pem_x509_certificate(ca.roots_pem)
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == root_ski
    public_key = serialization.load_pem_private_key(key_to_pem(key), None).public_key()
    ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(public_key)
    assert leaf.public_key() == public_key
    assert identity_from_der(leaf.public_bytes(serialization.Encoding.DER)) == ALICE


def test_serials_are_random_and_large(ca):
    serials = {_leaf(ca.sign_csr(build_csr(ALICE, generate_key()), ALICE)).serial_number
               for _ in range(5)}
    assert len(serials) == 5
    assert all(0 < s < 2**128 for s in serials)
    assert max(serials) > 2**64


def test_ttl_default_is_24h_and_exact(ca, clock):
    leaf = _leaf(ca.sign_csr(build_csr(ALICE, generate_key()), ALICE))
    assert leaf.not_valid_before_utc.timestamp() == clock.now() - CLOCK_SKEW_GRACE
    assert leaf.not_valid_after_utc.timestamp() == clock.now() + 24 * 3600  # from issuance, not not_before


def test_ttl_follows_the_clock_and_request(ca, clock):
    asyncio.run(clock.advance(1234))
    cert = ca.issue(NODE, ttl_seconds=600)
    assert cert.issued_at == clock.now() == 1_800_000_000 + 1234
    assert cert.not_before == clock.now() - CLOCK_SKEW_GRACE
    assert cert.not_after == clock.now() + 600
    assert cert.identity == NODE


def test_ttl_out_of_range(clock):
    ca = CertificateAuthority.generate(TD, clock=clock, max_ttl=7200)
    csr = build_csr(ALICE, generate_key())
    assert ca.sign_csr(csr, ALICE, 7200)
    for ttl in (7201, 0, -5):
        with pytest.raises(CAError) as e:
            ca.sign_csr(csr, ALICE, ttl)
        assert e.value.reason == "ttl_out_of_range"


def test_issue_returns_usable_workload_cert(ca, clock):
    cert = ca.issue(ALICE, 3600)
    assert isinstance(cert, WorkloadCert)
    assert cert.chain_pem[-1] == ca.roots_pem
    key = serialization.load_pem_private_key(cert.key_pem, None)
    assert key.public_key() == _leaf(cert.chain_pem).public_key()
    assert b"PRIVATE KEY" not in repr(cert).encode()


# -- validity window: backdated start, lifetime from issuance --------------------------------

def test_not_before_is_backdated_below_the_issue_time(ca, clock):
    # The CA's clock is fractional; the issue time is its second, X.509's resolution.
    asyncio.run(clock.advance(0.75))
    issued = int(clock.now())
    leaf = _leaf(ca.sign_csr(build_csr(ALICE, generate_key()), ALICE, 600))
    root = x509.load_pem_x509_certificate(ca.roots_pem)
    assert leaf.not_valid_before_utc.timestamp() < issued
    assert leaf.not_valid_before_utc.timestamp() == issued - CLOCK_SKEW_GRACE
    assert CLOCK_SKEW_GRACE >= 1  # at least the coarse clock's lag
    # The root of a CA generated just now is used at once as well.
    assert root.not_valid_before_utc.timestamp() == 1_800_000_000 - CLOCK_SKEW_GRACE  # the fixture CA


def test_a_verifier_whose_clock_lags_accepts_a_certificate_issued_just_now(ca, clock, tmp_path):
    # OpenSSL, a minute behind the CA (-attime is the second after `at`): the time(NULL) lag
    # after a second boundary, or another node's clock. Unbackdated, leaf and root are "not yet valid".
    chain = ca.sign_csr(build_csr(ALICE, generate_key()), ALICE, 600)
    _openssl_verify(tmp_path, chain, ca.roots_pem, clock.now() - 61)
    _openssl_verify(tmp_path, chain, ca.roots_pem, clock.now() - CLOCK_SKEW_GRACE - 2, ok=False)


def test_not_after_minus_issue_time_is_the_ttl(ca, clock):
    asyncio.run(clock.advance(0.5))
    issued = int(clock.now())
    for ttl in (1, 2, 600, DEFAULT_TTL):
        leaf = _leaf(ca.sign_csr(build_csr(ALICE, generate_key()), ALICE, ttl))
        assert leaf.not_valid_after_utc.timestamp() - issued == ttl
        cert = ca.issue(ALICE, ttl)
        assert cert.issued_at == issued and cert.not_after - cert.issued_at == ttl


def test_renewal_counts_from_issuance_not_from_the_backdated_start(ca, clock):
    cert = ca.issue(ALICE, 1000)
    assert cert.refresh_at == clock.now() + 500
    # A TTL shorter than the backdate still renews at its half-life, not at once.
    short = ca.issue(ALICE, 2)
    assert short.refresh_at == clock.now() + 1
    # Without the issue time (a credential read from files) the lifetime is not_before's.
    loaded = WorkloadCert.from_pem(cert.key_pem, cert.full_chain_pem)
    assert loaded.issued_at is None
    assert loaded.refresh_at == cert.not_before + (1000 + CLOCK_SKEW_GRACE) / 2


# -- CSR validation --------------------------------------------------------------------------

def test_rsa_csr_refused(ca):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CAError) as e:
        ca.sign_csr(csr, ALICE, 3600)
    assert e.value.reason == "bad_key_type"


def test_p384_csr_refused(ca):
    key = ec.generate_private_key(ec.SECP384R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ALICE.uri)]),
                          critical=False)
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CAError) as e:
        ca.sign_csr(csr, ALICE, 3600)
    assert e.value.reason == "bad_key_type"


def test_tampered_csr_refused(ca):
    # Swap the SAN in a signed CSR (same length, so the DER stays well-formed): signature breaks.
    csr = x509.load_pem_x509_csr(build_csr(ALICE, generate_key()))
    der = csr.public_bytes(serialization.Encoding.DER)
    tampered = der.replace(b"sa/alice", b"sa/alicf")
    assert tampered != der
    pem = x509.load_der_x509_csr(tampered).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CAError) as e:
        ca.sign_csr(pem, SpiffeId(trust_domain=TD, namespace="default", service_account="alicf"), 60)
    assert e.value.reason == "bad_csr"


def test_garbage_csr_refused(ca):
    with pytest.raises(CAError) as e:
        ca.sign_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                    ALICE, 60)
    assert e.value.reason == "bad_csr"


def test_san_mismatch_refused(ca):
    with pytest.raises(CAError) as e:
        ca.sign_csr(build_csr(BOB, generate_key()), ALICE, 3600)
    assert e.value.reason == "san_mismatch"


def test_csr_without_san_gets_the_callers_identity(ca):
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    leaf = _leaf(ca.sign_csr(csr, BOB, 60))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [BOB.uri]


def test_other_trust_domain_refused(ca):
    other = SpiffeId(trust_domain="evil.example", namespace="default", service_account="alice")
    with pytest.raises(CAError) as e:
        ca.sign_csr(build_csr(other, generate_key()), other, 3600)
    assert e.value.reason == "trust_domain_mismatch"


# -- persistence -----------------------------------------------------------------------------

def test_save_modes_and_load_or_create(tmp_path, clock):
    d = tmp_path / "ca"
    old_umask = os.umask(0o000)  # a permissive umask must not widen the key's mode
    try:
        ca = CertificateAuthority.load_or_create(d, TD, clock=clock)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((d / "root-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "root-cert.pem").stat().st_mode) == 0o644
    assert not (d / "cert-chain.pem").exists()
    assert sorted(p.name for p in d.iterdir()) == ["root-cert.pem", "root-key.pem"]  # no temp files
    again = CertificateAuthority.load_or_create(d, TD, clock=clock)
    assert again.roots_pem == ca.roots_pem
    assert again.trust_domain == TD
    # The reloaded CA signs with the same key: its leaves chain to the original root.
    chain = again.sign_csr(build_csr(ALICE, generate_key()), ALICE, 60)
    _leaf(chain).verify_directly_issued_by(x509.load_pem_x509_certificate(ca.roots_pem))


def test_save_tightens_an_existing_world_readable_key(tmp_path, ca):
    (tmp_path / "root-key.pem").write_bytes(b"old")
    os.chmod(tmp_path / "root-key.pem", 0o644)
    ca.save(tmp_path)
    assert stat.S_IMODE((tmp_path / "root-key.pem").stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in (tmp_path / "root-key.pem").read_bytes()


def test_load_missing_file_names_it(tmp_path, clock):
    with pytest.raises(CAError) as e:
        CertificateAuthority.load(tmp_path / "nope.pem", tmp_path / "key.pem", clock=clock)
    assert e.value.reason == "ca_load_failed"
    assert "nope.pem" in str(e.value)


def test_load_garbage_names_the_file(tmp_path, ca, clock):
    ca.save(tmp_path)
    (tmp_path / "bad-key.pem").write_text("not a key")
    with pytest.raises(CAError) as e:
        CertificateAuthority.load(tmp_path / "root-cert.pem", tmp_path / "bad-key.pem", clock=clock)
    assert e.value.reason == "ca_load_failed"
    assert "bad-key.pem" in str(e.value)
    (tmp_path / "bad-cert.pem").write_text("not a cert")
    with pytest.raises(CAError) as e:
        CertificateAuthority.load(tmp_path / "bad-cert.pem", tmp_path / "root-key.pem", clock=clock)
    assert "bad-cert.pem" in str(e.value)


def test_load_key_mismatch(tmp_path, ca, clock):
    ca.save(tmp_path)
    (tmp_path / "other-key.pem").write_bytes(key_to_pem(generate_key()))
    with pytest.raises(CAError, match="other-key.pem.*does not match") as e:
        CertificateAuthority.load(tmp_path / "root-cert.pem", tmp_path / "other-key.pem", clock=clock)
    assert e.value.reason == "ca_load_failed"


def test_load_intermediate_without_chain_fails(two_level_files, clock):
    f = two_level_files
    with pytest.raises(CAError, match="ca-cert.pem.*no chain file") as e:
        CertificateAuthority.load(f["cert"], f["key"], clock=clock)
    assert e.value.reason == "ca_load_failed"


def test_load_intermediate_with_broken_chain_names_chain_file(two_level_files, clock):
    f = two_level_files
    f["chain"].write_bytes(f["root"].read_bytes())  # the mid CA is missing
    with pytest.raises(CAError, match="cert-chain.pem.*no issuer") as e:
        CertificateAuthority.load(f["cert"], f["key"], chain_path=f["chain"], clock=clock)
    assert e.value.reason == "ca_load_failed"


def test_load_leaf_as_ca_refused(tmp_path, ca, clock):
    cert = ca.issue(ALICE, 60)
    (tmp_path / "leaf.pem").write_bytes(cert.cert_pem)
    (tmp_path / "leaf-key.pem").write_bytes(cert.key_pem)
    with pytest.raises(CAError, match="leaf.pem.*not a CA"):
        CertificateAuthority.load(tmp_path / "leaf.pem", tmp_path / "leaf-key.pem", clock=clock)


def test_load_expired_ca_refused(tmp_path, clock):
    ca = CertificateAuthority.generate(TD, clock=clock, validity_days=1)
    ca.save(tmp_path)
    later = FakeClock(start=clock.now() + 2 * 86400)
    with pytest.raises(CAError, match="root-cert.pem.*expired"):
        CertificateAuthority.load_or_create(tmp_path, TD, clock=later)


# -- WorkloadCert -----------------------------------------------------------------------------

def test_workload_cert_from_pem_and_validity(ca, clock):
    issued = ca.issue(ALICE, 1000)
    cert = WorkloadCert.from_pem(issued.key_pem, issued.full_chain_pem, issued_at=issued.issued_at)
    assert cert == issued
    assert cert.refresh_at == clock.now() + 500
    assert cert.valid(clock.now()) and not cert.expired(clock.now())
    assert cert.valid(clock.now() + 999.9)
    assert cert.expired(clock.now() + 1000) and not cert.valid(clock.now() + 1000)
    assert cert.valid(clock.now() - CLOCK_SKEW_GRACE)  # backdated
    assert not cert.valid(clock.now() - CLOCK_SKEW_GRACE - 1)


def test_identity_from_der_rejects_non_svids(ca):
    root_der = x509.load_pem_x509_certificate(ca.roots_pem).public_bytes(serialization.Encoding.DER)
    with pytest.raises(IdentityError, match="no subjectAltName"):
        identity_from_der(root_der)
    with pytest.raises(IdentityError, match="unparsable"):
        identity_from_der(b"\x30\x03junk")
