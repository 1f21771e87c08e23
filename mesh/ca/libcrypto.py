"""The few libcrypto calls the proxies need (P-256 keys, CSRs, certificate fields), through ctypes.

Why not the `cryptography` package: it costs each proxy process ~10 MB of RSS (its Rust
extension plus its Python modules), and the libcrypto the `ssl` module is linked against is
already mapped into every proxy: binding it costs a few hundred kB (ctypes). The calls are
OpenSSL 3's stable public API; every object is freed before the function returns, and the
thread's OpenSSL error queue is emptied after each call, so a failure here never shows up as
a stale error in a later `ssl` operation. Private keys never leave memory: they come in and go
out as PEM/DER bytes, as they did with `cryptography`.
"""
from __future__ import annotations

import calendar
import ctypes
import ssl  # noqa: F401 - loads _ssl and with it the libcrypto bound below
from collections.abc import Callable
from ctypes import POINTER, byref, c_char_p, c_int, c_long, c_void_p
from dataclasses import dataclass

__all__ = ["LibcryptoError", "CertFields", "generate_p256_key", "build_csr", "cert_fields", "check_cert",
           "leaf_fields"]

_NID_SUBJECT_ALT_NAME = 85
_GEN_URI = 6
_BIO_CTRL_INFO = 3
_EVP_PKEY_EC = 408


class LibcryptoError(ValueError):
    """A libcrypto operation failed (unparsable input, or OpenSSL refused); `what` names the
    input that did not parse ("certificate", "private key"), else it is None."""

    def __init__(self, message: str, what: str | None = None) -> None:
        super().__init__(message)
        self.what = what


def _load() -> ctypes.CDLL:
    # The exact libcrypto `_ssl` uses (one copy in the process, no second OpenSSL mapped).
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.rsplit(None, 1)[-1]
            if "/libcrypto.so" in path:
                return ctypes.CDLL(path)
    return ctypes.CDLL("libcrypto.so.3")


_lib = _load()


def _fn(name: str, restype: object, *argtypes: object) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    f = getattr(_lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


class _Tm(ctypes.Structure):
    # glibc's struct tm
    _fields_ = [("tm_sec", c_int), ("tm_min", c_int), ("tm_hour", c_int), ("tm_mday", c_int),
                ("tm_mon", c_int), ("tm_year", c_int), ("tm_wday", c_int), ("tm_yday", c_int),
                ("tm_isdst", c_int), ("tm_gmtoff", c_long), ("tm_zone", c_char_p)]


_ERR_clear_error = _fn("ERR_clear_error", None)
_BIO_s_mem = _fn("BIO_s_mem", c_void_p)
_BIO_new = _fn("BIO_new", c_void_p, c_void_p)
_BIO_free = _fn("BIO_free", c_int, c_void_p)
_BIO_ctrl = _fn("BIO_ctrl", c_long, c_void_p, c_int, c_long, c_void_p)
_EVP_PKEY_CTX_new_from_name = _fn("EVP_PKEY_CTX_new_from_name", c_void_p, c_void_p, c_char_p, c_char_p)
_EVP_PKEY_CTX_free = _fn("EVP_PKEY_CTX_free", None, c_void_p)
_EVP_PKEY_keygen_init = _fn("EVP_PKEY_keygen_init", c_int, c_void_p)
_EVP_PKEY_CTX_set_group_name = _fn("EVP_PKEY_CTX_set_group_name", c_int, c_void_p, c_char_p)
_EVP_PKEY_generate = _fn("EVP_PKEY_generate", c_int, c_void_p, POINTER(c_void_p))
_EVP_PKEY_free = _fn("EVP_PKEY_free", None, c_void_p)
_PEM_write_bio_PKCS8PrivateKey = _fn("PEM_write_bio_PKCS8PrivateKey", c_int, c_void_p, c_void_p, c_void_p,
                                     c_char_p, c_int, c_void_p, c_void_p)
_d2i_AutoPrivateKey = _fn("d2i_AutoPrivateKey", c_void_p, c_void_p, POINTER(c_void_p), c_long)
_d2i_PrivateKey = _fn("d2i_PrivateKey", c_void_p, c_int, c_void_p, POINTER(c_void_p), c_long)
_d2i_X509 = _fn("d2i_X509", c_void_p, c_void_p, POINTER(c_void_p), c_long)
_X509_free = _fn("X509_free", None, c_void_p)
_X509_get0_notBefore = _fn("X509_get0_notBefore", c_void_p, c_void_p)
_X509_get0_notAfter = _fn("X509_get0_notAfter", c_void_p, c_void_p)
_X509_get_subject_name = _fn("X509_get_subject_name", c_void_p, c_void_p)
_X509_get_issuer_name = _fn("X509_get_issuer_name", c_void_p, c_void_p)
_X509_NAME_cmp = _fn("X509_NAME_cmp", c_int, c_void_p, c_void_p)
_X509_get_ext_d2i = _fn("X509_get_ext_d2i", c_void_p, c_void_p, c_int, POINTER(c_int), POINTER(c_int))
_X509_check_private_key = _fn("X509_check_private_key", c_int, c_void_p, c_void_p)
_ASN1_TIME_to_tm = _fn("ASN1_TIME_to_tm", c_int, c_void_p, POINTER(_Tm))
_ASN1_STRING_get0_data = _fn("ASN1_STRING_get0_data", c_void_p, c_void_p)
_ASN1_STRING_length = _fn("ASN1_STRING_length", c_int, c_void_p)
_ASN1_STRING_set = _fn("ASN1_STRING_set", c_int, c_void_p, c_char_p, c_int)
_ASN1_IA5STRING_new = _fn("ASN1_IA5STRING_new", c_void_p)
_ASN1_IA5STRING_free = _fn("ASN1_IA5STRING_free", None, c_void_p)
_OPENSSL_sk_num = _fn("OPENSSL_sk_num", c_int, c_void_p)
_OPENSSL_sk_value = _fn("OPENSSL_sk_value", c_void_p, c_void_p, c_int)
_OPENSSL_sk_new_null = _fn("OPENSSL_sk_new_null", c_void_p)
_OPENSSL_sk_push = _fn("OPENSSL_sk_push", c_int, c_void_p, c_void_p)
_OPENSSL_sk_free = _fn("OPENSSL_sk_free", None, c_void_p)
_GENERAL_NAME_new = _fn("GENERAL_NAME_new", c_void_p)
_GENERAL_NAME_free = _fn("GENERAL_NAME_free", None, c_void_p)
_GENERAL_NAME_set0_value = _fn("GENERAL_NAME_set0_value", None, c_void_p, c_int, c_void_p)
_GENERAL_NAME_get0_value = _fn("GENERAL_NAME_get0_value", c_void_p, c_void_p, POINTER(c_int))
_GENERAL_NAMES_new = _fn("GENERAL_NAMES_new", c_void_p)
_GENERAL_NAMES_free = _fn("GENERAL_NAMES_free", None, c_void_p)
_X509V3_EXT_i2d = _fn("X509V3_EXT_i2d", c_void_p, c_int, c_int, c_void_p)
_X509_EXTENSION_free = _fn("X509_EXTENSION_free", None, c_void_p)
_X509_REQ_new = _fn("X509_REQ_new", c_void_p)
_X509_REQ_free = _fn("X509_REQ_free", None, c_void_p)
_X509_REQ_set_version = _fn("X509_REQ_set_version", c_int, c_void_p, c_long)
_X509_REQ_set_pubkey = _fn("X509_REQ_set_pubkey", c_int, c_void_p, c_void_p)
_X509_REQ_add_extensions = _fn("X509_REQ_add_extensions", c_int, c_void_p, c_void_p)
_X509_REQ_sign = _fn("X509_REQ_sign", c_int, c_void_p, c_void_p, c_void_p)
_EVP_sha256 = _fn("EVP_sha256", c_void_p)
_PEM_write_bio_X509_REQ = _fn("PEM_write_bio_X509_REQ", c_int, c_void_p, c_void_p)


@dataclass(frozen=True, slots=True)
class CertFields:
    """What the proxies read from a certificate."""

    not_before: float
    not_after: float
    uri_sans: tuple[str, ...] | None
    """The URI entries of the subjectAltName extension, in order; None: no such extension."""
    self_issued: bool
    """Subject equals issuer (a root, for the chain's top)."""


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise LibcryptoError(f"{what} failed")


def _bio_bytes(bio: int) -> bytes:
    data = c_void_p()
    n = _BIO_ctrl(bio, _BIO_CTRL_INFO, 0, byref(data))  # BIO_get_mem_data
    return ctypes.string_at(data.value, n) if n > 0 and data.value else b""


def _d2i(decode: Callable[[c_void_p], int], free: Callable[[int], None], der: bytes, what: str) -> int:
    """Decode all of `der` with `decode(pointer to the input pointer)`; trailing bytes are refused."""
    buf = ctypes.create_string_buffer(der, len(der))
    start = ctypes.addressof(buf)
    p = c_void_p(start)
    obj = decode(p)
    if not obj:
        raise LibcryptoError(f"unparsable {what}", what)
    if p.value - start != len(der):
        free(obj)
        raise LibcryptoError(f"trailing data after the {what}", what)
    return obj


def _x509(der: bytes) -> int:
    return _d2i(lambda p: _d2i_X509(None, byref(p), len(der)), _X509_free, der, "certificate")


def _pkey(der: bytes) -> int:
    """A private key, PKCS#8 or traditional. EC (what the mesh issues) is tried first: with
    OpenSSL 3.0's decoders a typed decode is ~1.5x faster than auto-detection."""
    def decode(p: c_void_p) -> int:
        start = p.value
        obj = _d2i_PrivateKey(_EVP_PKEY_EC, None, byref(p), len(der))
        if not obj:
            p.value = start
            obj = _d2i_AutoPrivateKey(None, byref(p), len(der))
        return obj  # type: ignore[no-any-return]
    return _d2i(decode, _EVP_PKEY_free, der, "private key")


def _generate_pkey() -> int:
    ctx = _EVP_PKEY_CTX_new_from_name(None, b"EC", None)
    _check(bool(ctx), "EVP_PKEY_CTX_new_from_name")
    try:
        _check(_EVP_PKEY_keygen_init(ctx) == 1, "EVP_PKEY_keygen_init")
        _check(_EVP_PKEY_CTX_set_group_name(ctx, b"P-256") == 1, "EVP_PKEY_CTX_set_group_name")
        pkey = c_void_p()
        _check(_EVP_PKEY_generate(ctx, byref(pkey)) == 1 and bool(pkey.value), "EVP_PKEY_generate")
        return pkey.value  # type: ignore[return-value]
    finally:
        _EVP_PKEY_CTX_free(ctx)


def generate_p256_key() -> bytes:
    """A fresh ECDSA P-256 private key as unencrypted PKCS#8 PEM."""
    try:
        pkey = _generate_pkey()
        bio = _BIO_new(_BIO_s_mem())
        try:
            _check(bool(bio), "BIO_new")
            _check(_PEM_write_bio_PKCS8PrivateKey(bio, pkey, None, None, 0, None, None) == 1,
                   "PEM_write_bio_PKCS8PrivateKey")
            return _bio_bytes(bio)
        finally:
            _BIO_free(bio)  # the memory BIO's buffer is cleansed when freed
            _EVP_PKEY_free(pkey)
    finally:
        _ERR_clear_error()


def _san_extension(uri: bytes) -> int:
    """A non-critical subjectAltName extension with `uri` as its only entry."""
    gens = _GENERAL_NAMES_new()
    _check(bool(gens), "GENERAL_NAMES_new")
    try:
        gen = _GENERAL_NAME_new()
        _check(bool(gen), "GENERAL_NAME_new")
        if _OPENSSL_sk_push(gens, gen) <= 0:
            _GENERAL_NAME_free(gen)
            raise LibcryptoError("sk_GENERAL_NAME_push failed")
        ia5 = _ASN1_IA5STRING_new()
        _check(bool(ia5), "ASN1_IA5STRING_new")
        if _ASN1_STRING_set(ia5, uri, len(uri)) != 1:
            _ASN1_IA5STRING_free(ia5)
            raise LibcryptoError("ASN1_STRING_set failed")
        _GENERAL_NAME_set0_value(gen, _GEN_URI, ia5)  # gen owns ia5, gens owns gen
        ext = _X509V3_EXT_i2d(_NID_SUBJECT_ALT_NAME, 0, gens)
        _check(bool(ext), "X509V3_EXT_i2d")
        return ext  # type: ignore[no-any-return]
    finally:
        _GENERAL_NAMES_free(gens)


def build_csr(key_der: bytes, uri: str) -> bytes:
    """A PEM CSR signed (ECDSA-SHA256) by the private key `key_der`, with an empty subject
    and `uri` as its only subjectAltName, requested non-critical as the CA expects."""
    try:
        pkey = _pkey(key_der)
        req = bio = ext = exts = None
        try:
            req = _X509_REQ_new()
            _check(bool(req), "X509_REQ_new")
            _check(_X509_REQ_set_version(req, 0) == 1, "X509_REQ_set_version")  # v1, the only one
            _check(_X509_REQ_set_pubkey(req, pkey) == 1, "X509_REQ_set_pubkey")
            ext = _san_extension(uri.encode("ascii"))
            exts = _OPENSSL_sk_new_null()
            _check(bool(exts) and _OPENSSL_sk_push(exts, ext) > 0, "sk_X509_EXTENSION_push")
            _check(_X509_REQ_add_extensions(req, exts) == 1, "X509_REQ_add_extensions")  # copies
            _check(_X509_REQ_sign(req, pkey, _EVP_sha256()) > 0, "X509_REQ_sign")
            bio = _BIO_new(_BIO_s_mem())
            _check(bool(bio) and _PEM_write_bio_X509_REQ(bio, req) == 1, "PEM_write_bio_X509_REQ")
            return _bio_bytes(bio)
        finally:
            if bio:
                _BIO_free(bio)
            if exts:
                _OPENSSL_sk_free(exts)  # the stack only: ext is freed next
            if ext:
                _X509_EXTENSION_free(ext)
            if req:
                _X509_REQ_free(req)
            _EVP_PKEY_free(pkey)
    finally:
        _ERR_clear_error()


def _time(asn1_time: int) -> float:
    tm = _Tm()
    _check(bool(asn1_time) and _ASN1_TIME_to_tm(asn1_time, byref(tm)) == 1, "ASN1_TIME_to_tm")
    return float(calendar.timegm((tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                                  tm.tm_hour, tm.tm_min, tm.tm_sec)))


def _uri_sans(x509: int) -> tuple[str, ...] | None:
    crit = c_int(0)
    gens = _X509_get_ext_d2i(x509, _NID_SUBJECT_ALT_NAME, byref(crit), None)
    if not gens:
        if crit.value == -1:
            return None
        if crit.value == -2:
            raise LibcryptoError("duplicate subjectAltName extensions")
        raise LibcryptoError("malformed subjectAltName extension")
    try:
        uris = []
        for i in range(_OPENSSL_sk_num(gens)):
            kind = c_int(0)
            value = _GENERAL_NAME_get0_value(_OPENSSL_sk_value(gens, i), byref(kind))
            if kind.value == _GEN_URI and value:
                raw = ctypes.string_at(_ASN1_STRING_get0_data(value), _ASN1_STRING_length(value))
                try:
                    uris.append(raw.decode("ascii"))
                except UnicodeDecodeError:
                    raise LibcryptoError("URI SAN is not ASCII (IA5String)") from None
        return tuple(uris)
    finally:
        _GENERAL_NAMES_free(gens)


def _fields(x509: int) -> CertFields:
    return CertFields(
        not_before=_time(_X509_get0_notBefore(x509)),
        not_after=_time(_X509_get0_notAfter(x509)),
        uri_sans=_uri_sans(x509),
        self_issued=_X509_NAME_cmp(_X509_get_subject_name(x509), _X509_get_issuer_name(x509)) == 0,
    )


def cert_fields(der: bytes) -> CertFields:
    """Validity, URI SANs and self-issuance of a DER certificate."""
    try:
        x509 = _x509(der)
        try:
            return _fields(x509)
        finally:
            _X509_free(x509)
    finally:
        _ERR_clear_error()


def check_cert(der: bytes) -> None:
    """LibcryptoError unless `der` is one whole, parsable certificate."""
    try:
        _X509_free(_x509(der))
    finally:
        _ERR_clear_error()


def leaf_fields(cert_der: bytes, key_der: bytes) -> tuple[CertFields, bool]:
    """The fields of the DER certificate `cert_der` and whether the DER private key `key_der`
    (PKCS#8 or traditional) is its key; one decode of each. LibcryptoError.what tells which
    did not parse (the certificate is decoded first)."""
    try:
        x509 = _x509(cert_der)
        try:
            fields = _fields(x509)
            pkey = _pkey(key_der)
            try:
                return fields, _X509_check_private_key(x509, pkey) == 1
            finally:
                _EVP_PKEY_free(pkey)
        finally:
            _X509_free(x509)
    finally:
        _ERR_clear_error()
