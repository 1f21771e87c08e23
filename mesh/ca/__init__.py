"""Certificates as the proxies hold them: workload certs, CSRs and the client-side secret manager.

The signing CA is the control plane's (controlplane/ca.py)."""
from .certs import CertError, WorkloadCert, identity_from_der, identity_from_uri_sans
from .csr import PrivateKey, build_csr, generate_key, key_to_pem
from .manager import SecretError, SecretManager

__all__ = [
    "CertError", "WorkloadCert", "identity_from_der", "identity_from_uri_sans", "PrivateKey", "build_csr",
    "generate_key", "key_to_pem", "SecretError", "SecretManager",
]
