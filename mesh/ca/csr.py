"""Workload-side key and CSR generation: ECDSA P-256 keys, CSRs carrying the SPIFFE URI SAN."""
from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..identity import NodeId, SpiffeId

__all__ = ["generate_key", "build_csr", "key_to_pem"]


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key (the only key type the CA signs, as in Istio's default)."""
    return ec.generate_private_key(ec.SECP256R1())


def build_csr(identity: SpiffeId | NodeId, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A PEM CSR with an empty subject and the identity's URI as its only SAN."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (kept in memory; see mesh.tls for loading without disk)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
