"""The proxies' certificate code as it was with `cryptography`: the oracle the libcrypto code is checked against."""
from __future__ import annotations

from cryptography import x509

from mesh.identity import IdentityError, NodeId, SpiffeId, parse_identity


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
