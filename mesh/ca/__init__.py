"""Certificates as the proxies hold them: workload certs, CSRs and the client-side secret manager.

The signing CA is the control plane's (controlplane/ca.py)."""
from .certs import CertError, WorkloadCert, identity_from_cert, identity_from_der
from .csr import build_csr, generate_key, key_to_pem
from .manager import SecretError, SecretManager

__all__ = [
    "CertError", "WorkloadCert", "identity_from_cert", "identity_from_der", "build_csr", "generate_key",
    "key_to_pem", "SecretError", "SecretManager",
]
