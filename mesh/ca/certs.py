"""Issued certificates as values: WorkloadCert (key + chain + validity) and identity extraction."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..identity import IdentityError, NodeId, SpiffeId, parse_identity

__all__ = ["WorkloadCert", "CertError", "identity_from_der", "identity_from_cert", "split_pem"]


class CertError(ValueError):
    """A key/chain pair that cannot be used as a workload certificate."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def identity_from_cert(cert: x509.Certificate) -> SpiffeId | NodeId:
    """The identity in a certificate's single URI SAN (X.509-SVIDs carry exactly one)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError("certificate has no subjectAltName extension") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise IdentityError(f"certificate has {len(uris)} URI SANs, an SVID must have exactly one")
    return parse_identity(uris[0])


def identity_from_der(der: bytes) -> SpiffeId | NodeId:
    """The identity of a DER certificate (as `getpeercert(binary_form=True)` returns it)."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as e:
        raise IdentityError(f"unparsable certificate: {e}") from None
    return identity_from_cert(cert)


def split_pem(pem: bytes) -> tuple[bytes, ...]:
    """Split a PEM bundle into one normalized PEM blob per certificate, in order."""
    certs = x509.load_pem_x509_certificates(pem)
    return tuple(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadCert:
    """A private key with its certificate chain (leaf first, root last) and validity."""

    identity: SpiffeId | NodeId
    key_pem: bytes = field(repr=False)  # keep the key out of logs and reprs
    chain_pem: tuple[bytes, ...] = field(repr=False)
    not_before: float
    not_after: float
    issued_at: float | None = None
    """When it was issued, as near as its holder knows: the CA's issue time for one it signed
    itself, the time the request was sent for a fetched one; None (loaded from files): unknown."""

    @property
    def cert_pem(self) -> bytes:
        return self.chain_pem[0]

    @property
    def full_chain_pem(self) -> bytes:
        return b"".join(self.chain_pem)

    @property
    def refresh_at(self) -> float:
        """Half-life, when Istio/ztunnel rotate: leaves the second half for retries.

        Counted from the issue time when known, as istio-agent does (from its CreatedTime),
        rather than from not_before as ztunnel does: CAs backdate not_before for clock skew
        (controlplane/ca.py by 2 min, as Istio's), which would move renewal earlier by half the
        backdate, and for a TTL under the backdate into the past: renewing without pause."""
        start = self.not_before if self.issued_at is None else self.issued_at
        return start + (self.not_after - start) / 2

    def expired(self, now: float) -> bool:
        return now >= self.not_after

    def valid(self, now: float) -> bool:
        return self.not_before <= now < self.not_after

    @classmethod
    def from_pem(cls, key_pem: bytes, chain_pem: bytes | Sequence[bytes], *,
                 issued_at: float | None = None) -> WorkloadCert:
        """Parse a key and chain (one bundle or one blob per cert); raise CertError or
        IdentityError when they are unusable."""
        bundle = chain_pem if isinstance(chain_pem, bytes) else b"".join(chain_pem)
        try:
            certs = x509.load_pem_x509_certificates(bundle)
        except ValueError as e:
            raise CertError("bad_cert", f"unparsable certificate chain: {e}") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as e:
            raise CertError("bad_key", f"unparsable private key: {e}") from None
        leaf = certs[0]
        if key.public_key() != leaf.public_key():
            raise CertError("key_mismatch", "private key does not match the leaf certificate")
        return cls(
            identity=identity_from_cert(leaf),
            key_pem=key_pem,
            chain_pem=tuple(c.public_bytes(serialization.Encoding.PEM) for c in certs),
            not_before=leaf.not_valid_before_utc.timestamp(),
            not_after=leaf.not_valid_after_utc.timestamp(),
            issued_at=issued_at,
        )
