"""The mesh CA: a self-signed or plugged-in (intermediate) CA that signs X.509-SVIDs from CSRs."""
from __future__ import annotations

import datetime as dt
import os
import secrets
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.clock import Clock
from mesh.identity import NodeId, SpiffeId
from mesh.ca.certs import WorkloadCert
from mesh.ca.csr import build_csr, generate_key, key_to_pem

__all__ = ["CAError", "CertificateAuthority", "CLOCK_SKEW_GRACE", "DEFAULT_TTL", "DEFAULT_MAX_TTL",
           "ROOT_CERT_FILE", "ROOT_KEY_FILE", "CHAIN_FILE"]

DEFAULT_TTL = 24 * 3600
CLOCK_SKEW_GRACE = 120.0
"""Seconds notBefore is backdated from the issue time (Istio's ClockSkewGracePeriod, 2 min;
Kubernetes' signer backdates 5 min). A certificate is used the moment it is issued: OpenSSL
checks notBefore against time(NULL), the kernel's coarse clock, which was measured behind
floor(time.time()) in 0.6 % of samples, and a verifier on another node may be seconds or
minutes behind; unbackdated, such a certificate is "not yet valid". notAfter still counts
from the issue time (the TTL asked for), and so does renewal (WorkloadCert.issued_at): the
backdate neither pulls renewal earlier nor, for a TTL shorter than it, into the past."""
DEFAULT_MAX_TTL = 90 * 24 * 3600  # Istio's default max workload cert TTL
ROOT_CERT_FILE = "root-cert.pem"
ROOT_KEY_FILE = "root-key.pem"
CHAIN_FILE = "cert-chain.pem"

_SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CAError(Exception):
    """A CA operation failed; `reason` is a stable label (bad_csr, san_mismatch, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: _SigningKey) -> bytes:
    """The CA's own key (EC or RSA, a `cryptography` object) as unencrypted PKCS#8 PEM."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Atomically replace `path`; the temp file is 0600 from creation (mkstemp), so a key
    is never readable by others, even briefly, whatever the umask or an old file's mode."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # exact mode, independent of the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class CertificateAuthority:
    """Signs workload and node certificates for one trust domain.

    Holds the signing cert and key plus the issuers above it (empty for a self-signed root).
    A certificate's issue time is clock.now() floored to the second, since X.509 times have
    one-second resolution; it is valid from CLOCK_SKEW_GRACE before that to the TTL after it.
    """

    def __init__(self, *, trust_domain: str, cert: x509.Certificate, key: _SigningKey,
                 chain: tuple[x509.Certificate, ...] = (), clock: Clock,
                 max_ttl: float = DEFAULT_MAX_TTL) -> None:
        self.trust_domain = trust_domain
        self.max_ttl = max_ttl
        self._cert = cert
        self._key = key
        self._chain = chain  # issuers of `cert`, nearest first, root last
        self._clock = clock
        self._issuer_chain_pem = (_pem(cert),) + tuple(_pem(c) for c in chain)
        try:
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:  # plugged-in CAs may lack an SKI
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())

    # -- construction -------------------------------------------------------------------

    @classmethod
    def generate(cls, trust_domain: str, *, clock: Clock, validity_days: int = 3650,
                 max_ttl: float = DEFAULT_MAX_TTL) -> CertificateAuthority:
        """A new self-signed ECDSA P-256 root for `trust_domain`."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, "ambient root CA"),
        ])
        issued = float(int(clock.now()))
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(_serial())
            .not_valid_before(_utc(issued - CLOCK_SKEW_GRACE))  # a new root is used at once too
            .not_valid_after(_utc(issued + validity_days * 86400))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(trust_domain=trust_domain, cert=cert, key=key, clock=clock, max_ttl=max_ttl)

    @classmethod
    def load(cls, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str], *,
             chain_path: str | os.PathLike[str] | None = None, clock: Clock,
             trust_domain: str | None = None, max_ttl: float = DEFAULT_MAX_TTL,
             ) -> CertificateAuthority:
        """Load a root CA, or an intermediate whose issuers up to the root are in `chain_path`.

        The trust domain is `trust_domain` if given, else the signing cert's SPIFFE URI SAN,
        else its subject O (as `generate` writes it).
        """
        cert_path, key_path = Path(cert_path), Path(key_path)
        chain = (str(chain_path), _read(Path(chain_path))) if chain_path is not None else None
        return cls.from_pem((str(cert_path), _read(cert_path)), (str(key_path), _read(key_path)),
                            chain=chain, clock=clock, trust_domain=trust_domain, max_ttl=max_ttl)

    @classmethod
    def from_pem(cls, cert: tuple[str, bytes], key: tuple[str, bytes], *,
                 chain: tuple[str, bytes] | None = None, clock: Clock,
                 trust_domain: str | None = None, max_ttl: float = DEFAULT_MAX_TTL,
                 ) -> CertificateAuthority:
        """As `load`, from (name, PEM) pairs: a file's or a Secret key's contents, named in errors."""
        (cert_name, cert_pem), (key_name, key_pem) = cert, key
        signing = _load_certs(cert_name, cert_pem)[0]
        signing_key = _load_key(key_name, key_pem)
        if signing_key.public_key() != signing.public_key():
            raise CAError("ca_load_failed", f"{key_name}: key does not match the certificate in {cert_name}")
        if not _is_ca(signing):
            raise CAError("ca_load_failed", f"{cert_name}: not a CA certificate (BasicConstraints CA=false)")
        if clock.now() >= signing.not_valid_after_utc.timestamp():
            raise CAError("ca_load_failed", f"{cert_name}: CA certificate expired at {signing.not_valid_after_utc}")
        issuers: tuple[x509.Certificate, ...] = ()
        if not _self_signed(signing):
            if chain is None:
                raise CAError("ca_load_failed",
                              f"{cert_name}: not self-signed (an intermediate), and no chain file given")
            issuers = _order_chain(signing, _load_certs(*chain), chain[0])
        td = _trust_domain_of(signing, cert_name, trust_domain)
        return cls(trust_domain=td, cert=signing, key=signing_key, chain=issuers, clock=clock, max_ttl=max_ttl)

    @classmethod
    def load_or_create(cls, directory: str | os.PathLike[str], trust_domain: str, *, clock: Clock,
                       max_ttl: float = DEFAULT_MAX_TTL) -> CertificateAuthority:
        """Load the CA saved in `directory`, or generate and save a new root there."""
        d = Path(directory)
        cert_path, key_path, chain_path = d / ROOT_CERT_FILE, d / ROOT_KEY_FILE, d / CHAIN_FILE
        if cert_path.exists() or key_path.exists():
            return cls.load(cert_path, key_path, chain_path=chain_path if chain_path.exists() else None,
                            clock=clock, trust_domain=trust_domain, max_ttl=max_ttl)
        ca = cls.generate(trust_domain, clock=clock, max_ttl=max_ttl)
        ca.save(d)
        return ca

    def to_pem(self) -> tuple[bytes, bytes, bytes]:
        """(signing cert, its key, its issuers up to the root or b"" for a root), as PEM."""
        return _pem(self._cert), _key_pem(self._key), b"".join(_pem(c) for c in self._chain)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the signing cert (root-cert.pem, 0644), its key (root-key.pem, 0600) and, for
        an intermediate, its issuers (cert-chain.pem, 0644)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _write_file(d / ROOT_KEY_FILE, _key_pem(self._key), 0o600)
        _write_file(d / ROOT_CERT_FILE, _pem(self._cert), 0o644)
        if self._chain:
            _write_file(d / CHAIN_FILE, b"".join(_pem(c) for c in self._chain), 0o644)

    # -- accessors ----------------------------------------------------------------------

    @property
    def roots_pem(self) -> bytes:
        """The trust anchor workloads verify peers against: the root at the top of the chain."""
        return _pem(self._chain[-1] if self._chain else self._cert)

    @property
    def not_after(self) -> float:
        """When the signing certificate expires."""
        return self._cert.not_valid_after_utc.timestamp()

    # -- signing ------------------------------------------------------------------------

    def sign_csr(self, csr_pem: bytes, identity: SpiffeId | NodeId,
                 ttl_seconds: float = DEFAULT_TTL) -> tuple[bytes, ...]:
        """Issue an X.509-SVID for `identity` to the key in `csr_pem`.

        The caller has authenticated `identity`; the CSR only proves key possession, and its
        URI SANs, if any, must agree. Returns PEM blobs: leaf, intermediates, root.
        """
        return self._sign_csr(csr_pem, identity, ttl_seconds, self._issue_time())

    def issue(self, identity: SpiffeId | NodeId, ttl_seconds: float = DEFAULT_TTL) -> WorkloadCert:
        """Generate a key and sign it directly (the control plane's own and bootstrap certs),
        with the proxies' own key and CSR code (mesh.ca.csr), so every such cert exercises it."""
        key = generate_key()
        issued = self._issue_time()
        chain = self._sign_csr(build_csr(identity, key), identity, ttl_seconds, issued)
        return WorkloadCert.from_pem(key_to_pem(key), chain, issued_at=issued)

    def _issue_time(self) -> float:
        return float(int(self._clock.now()))

    def _sign_csr(self, csr_pem: bytes, identity: SpiffeId | NodeId, ttl_seconds: float,
                  issued: float) -> tuple[bytes, ...]:
        if not 1 <= ttl_seconds <= self.max_ttl:
            raise CAError("ttl_out_of_range", f"TTL {ttl_seconds}s outside [1, {self.max_ttl}]s")
        if identity.trust_domain != self.trust_domain:
            raise CAError("trust_domain_mismatch",
                          f"{identity.uri} is not in trust domain {self.trust_domain!r}")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
            signature_ok = csr.is_signature_valid
        except ValueError as e:
            raise CAError("bad_csr", f"unparsable CSR: {e}") from None
        if not signature_ok:
            raise CAError("bad_csr", "CSR signature does not verify")
        public_key = csr.public_key()
        if not (isinstance(public_key, ec.EllipticCurvePublicKey)
                and isinstance(public_key.curve, ec.SECP256R1)):
            raise CAError("bad_key_type", "CSR key must be ECDSA P-256")
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        except ValueError as e:
            raise CAError("bad_csr", f"malformed CSR extensions: {e}") from None
        if any(uri != identity.uri for uri in uris):
            raise CAError("san_mismatch", f"CSR asks for {uris}, caller is {identity.uri}")

        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(_serial())
            .not_valid_before(_utc(issued - CLOCK_SKEW_GRACE))
            .not_valid_after(_utc(issued + ttl_seconds))
            # SPIFFE X.509-SVID: with an empty subject the SAN must be critical (RFC 5280 4.2.1.6).
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
                           critical=True)
            .add_extension(_key_usage(digital_signature=True, key_agreement=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(self._aki, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return (_pem(leaf),) + self._issuer_chain_pem


def _serial() -> int:
    # 128 random bits (CA/B forum asks for >= 64); never zero.
    return secrets.randbits(128) or 1


def _key_usage(*, digital_signature: bool = False, key_agreement: bool = False,
               key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=key_agreement, key_cert_sign=key_cert_sign,
        crl_sign=crl_sign, encipher_only=False, decipher_only=False,
    )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CAError("ca_load_failed", f"{path}: cannot read: {e.strerror}") from None


def _load_certs(name: str, pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise CAError("ca_load_failed", f"{name}: no PEM certificate: {e}") from None


def _load_key(name: str, pem: bytes) -> _SigningKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:  # TypeError: the key is encrypted
        raise CAError("ca_load_failed", f"{name}: unusable private key: {e}") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise CAError("ca_load_failed", f"{name}: CA key must be EC or RSA")
    return key


def _order_chain(cert: x509.Certificate, pool: list[x509.Certificate],
                 path: str) -> tuple[x509.Certificate, ...]:
    """Follow issuers from `cert` through `pool` (any order) up to a self-signed root."""
    chain: list[x509.Certificate] = []
    current = cert
    while not _self_signed(current):
        issuer = next((c for c in pool if c.subject == current.issuer and _issued_by(current, c)), None)
        if issuer is None:
            raise CAError("ca_load_failed", f"{path}: no issuer for {current.subject.rfc4514_string()!r}")
        if issuer in chain or len(chain) > len(pool):
            raise CAError("ca_load_failed", f"{path}: issuer loop")
        if not _is_ca(issuer):
            raise CAError("ca_load_failed", f"{path}: {issuer.subject.rfc4514_string()!r} is not a CA")
        chain.append(issuer)
        current = issuer
    return tuple(chain)


def _trust_domain_of(cert: x509.Certificate, path: str, explicit: str | None) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)
                if u.startswith("spiffe://")]
    except x509.ExtensionNotFound:
        uris = []
    from_san = uris[0].removeprefix("spiffe://").partition("/")[0] if uris else None
    if explicit is not None:
        if from_san is not None and from_san != explicit:
            raise CAError("ca_load_failed", f"{path}: CA is for trust domain {from_san!r}, not {explicit!r}")
        return explicit
    if from_san:
        return from_san
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if orgs:
        return str(orgs[0].value)
    raise CAError("ca_load_failed", f"{path}: cannot tell the trust domain (no SPIFFE SAN, no O=)")
