"""Workload-side key and CSR generation: ECDSA P-256 keys, CSRs carrying the SPIFFE URI SAN."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..identity import NodeId, SpiffeId
from . import libcrypto, pem

__all__ = ["PrivateKey", "generate_key", "build_csr", "key_to_pem", "key_der"]

KEY_LABELS = ("PRIVATE KEY", "EC PRIVATE KEY")
"""PKCS#8 (what generate_key writes) and SEC 1, the unencrypted forms a loaded key may have."""


@dataclass(frozen=True, slots=True)
class PrivateKey:
    """A workload's private key, as unencrypted PKCS#8 PEM, in memory only."""

    pem: bytes = field(repr=False)  # keep the key out of logs and reprs


def generate_key() -> PrivateKey:
    """A fresh ECDSA P-256 key (the only key type the CA signs, as in Istio's default)."""
    return PrivateKey(libcrypto.generate_p256_key())


def key_der(key_pem: bytes) -> bytes:
    """The DER of the one private key in `key_pem`; pem.PemError if there is none."""
    blocks = pem.decode_blocks(key_pem, KEY_LABELS)
    if len(blocks) != 1:
        raise pem.PemError(f"{len(blocks)} private keys in one PEM")
    return blocks[0][1]


def build_csr(identity: SpiffeId | NodeId, key: PrivateKey) -> bytes:
    """A PEM CSR with an empty subject and the identity's URI as its only SAN."""
    return libcrypto.build_csr(key_der(key.pem), identity.uri)


def key_to_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (kept in memory; see mesh.tls for loading without disk)."""
    return key.pem
