"""Test doubles and helpers shared across test modules: a virtual-time FakeClock, CA helpers."""
from __future__ import annotations

import asyncio
import datetime as dt
import heapq
import itertools

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["FakeClock", "make_intermediate"]

# Yields per settle: enough for a woken task to run a few awaits (fetch, parse, reschedule)
# before virtual time moves on.
_SETTLE_YIELDS = 20


class FakeClock:
    """Virtual time for asyncio tests: `sleep` parks until `advance` moves time past it."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = float(start)
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()  # FIFO among equal deadlines

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        await fut  # a cancelled sleeper leaves a done future that advance() skips

    @property
    def pending_sleepers(self) -> list[float]:
        """Deadlines of tasks currently sleeping, earliest first."""
        return sorted(d for d, _, f in self._sleepers if not f.done())

    async def settle(self) -> None:
        """Let ready tasks run without moving time."""
        for _ in range(_SETTLE_YIELDS):
            await asyncio.sleep(0)

    def jump(self, seconds: float) -> None:
        """Step wall time without waking sleepers, like a suspend or NTP step that
        monotonic-clock sleeps do not see."""
        self._now += seconds

    async def advance(self, seconds: float) -> None:
        """Move time forward by `seconds`, waking sleepers one by one in deadline order.

        Time stops at each deadline and woken tasks run before the next step, so a task
        that sleeps again within the window is woken in this same call.
        """
        if seconds < 0:
            raise ValueError("time only moves forward")
        target = self._now + seconds
        await self.settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._sleepers)
            if fut.done():
                continue
            self._now = max(self._now, deadline)
            fut.set_result(None)
            await self.settle()
        self._now = target
        await self.settle()


def make_intermediate(issuer_cert: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey,
                      name: str, now: float) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """An intermediate CA cert and key under `issuer`, as an operator's PKI would hand over."""
    key = ec.generate_private_key(ec.SECP256R1())
    utc = dt.timezone.utc
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Corp"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.fromtimestamp(now - 3600, utc))
        .not_valid_after(dt.datetime.fromtimestamp(now + 365 * 86400, utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key()),
                       critical=False)
        .sign(issuer_key, hashes.SHA256())
    )
    return cert, key


def pem_of(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A `cryptography` key (a test CA's, an operator's) as unencrypted PKCS#8 PEM."""
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_svid_like(ca_cert_pem: bytes, ca_key_pem: bytes, uris: list[str] | None, *, now: float,
                   dns: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
    """(leaf PEM, key PEM) signed by the CA, with the given URI SANs (None: no SAN extension):
    well-formed and verifiable X.509, but not necessarily a valid SVID."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, None)
    key = ec.generate_private_key(ec.SECP256R1())
    utc = dt.timezone.utc
    builder = (
        x509.CertificateBuilder()
        # OpenSSL's strict mode wants a subject when there is no (critical) SAN.
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crafted")] if uris is None else []))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.fromtimestamp(now - 3600, utc))
        .not_valid_after(dt.datetime.fromtimestamp(now + 3600, utc))
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
                       critical=False)
    )
    if uris is not None:
        names = [x509.UniformResourceIdentifier(u) for u in uris] + [x509.DNSName(d) for d in dns]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), pem_of(key)
