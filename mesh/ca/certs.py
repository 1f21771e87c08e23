"""Issued certificates as values: WorkloadCert (key + chain + validity) and identity extraction."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..identity import IdentityError, NodeId, SpiffeId, parse_identity
from . import libcrypto, pem
from .csr import key_der

__all__ = ["WorkloadCert", "CertError", "identity_from_der", "identity_from_uri_sans", "split_pem",
           "chain_ders"]


class CertError(ValueError):
    """A key/chain pair that cannot be used as a workload certificate."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def identity_from_uri_sans(uris: Sequence[str] | None) -> SpiffeId | NodeId:
    """The identity in a certificate's single URI SAN (X.509-SVIDs carry exactly one);
    `uris` None: the certificate has no subjectAltName extension."""
    if uris is None:
        raise IdentityError("certificate has no subjectAltName extension")
    if len(uris) != 1:
        raise IdentityError(f"certificate has {len(uris)} URI SANs, an SVID must have exactly one")
    return parse_identity(uris[0])


def identity_from_der(der: bytes) -> SpiffeId | NodeId:
    """The identity of a DER certificate (as `getpeercert(binary_form=True)` returns it)."""
    try:
        fields = libcrypto.cert_fields(der)
    except libcrypto.LibcryptoError as e:
        raise IdentityError(f"unparsable certificate: {e}") from None
    return identity_from_uri_sans(fields.uri_sans)


def chain_ders(bundle: bytes) -> list[bytes]:
    """The DER of every certificate in a PEM bundle, in order; pem.PemError if none."""
    return [der for _, der in pem.decode_blocks(bundle, ("CERTIFICATE",))]


def split_pem(bundle: bytes) -> tuple[bytes, ...]:
    """Split a PEM bundle into one normalized PEM blob per certificate, in order."""
    return tuple(pem.encode("CERTIFICATE", der) for der in chain_ders(bundle))


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
            ders = chain_ders(bundle)
            for der in ders[1:]:
                libcrypto.check_cert(der)  # every certificate must parse, not only the leaf
        except ValueError as e:  # pem.PemError, libcrypto.LibcryptoError
            raise CertError("bad_cert", f"unparsable certificate chain: {e}") from None
        try:
            key = key_der(key_pem)
        except pem.PemError as e:
            raise CertError("bad_key", f"unparsable private key: {e}") from None
        try:
            leaf, matches = libcrypto.leaf_fields(ders[0], key)
        except libcrypto.LibcryptoError as e:
            if e.what == "private key":
                raise CertError("bad_key", f"unparsable private key: {e}") from None
            raise CertError("bad_cert", f"unparsable certificate chain: {e}") from None
        if not matches:
            raise CertError("key_mismatch", "private key does not match the leaf certificate")
        return cls(
            identity=identity_from_uri_sans(leaf.uri_sans),
            key_pem=key_pem,
            chain_pem=tuple(pem.encode("CERTIFICATE", der) for der in ders),
            not_before=leaf.not_before,
            not_after=leaf.not_after,
            issued_at=issued_at,
        )
