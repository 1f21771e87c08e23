"""The mesh's certificate authority: CA signing, workload certs, CSRs and the client secret manager."""
from .authority import DEFAULT_MAX_TTL, DEFAULT_TTL, CAError, CertificateAuthority
from .certs import CertError, WorkloadCert, identity_from_cert, identity_from_der
from .csr import build_csr, generate_key, key_to_pem
from .manager import SecretError, SecretManager

__all__ = [
    "CAError", "CertificateAuthority", "DEFAULT_TTL", "DEFAULT_MAX_TTL", "CertError", "WorkloadCert",
    "identity_from_cert", "identity_from_der", "build_csr", "generate_key", "key_to_pem",
    "SecretError", "SecretManager",
]
