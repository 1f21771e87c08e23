"""The mesh CA in Kubernetes: its root key in a Secret, created once, or a user's CA Secret.

Self-signed (the default), as istiod does: the Secret `istio-ca-secret` in the mesh namespace
holds the root (`ca-cert.pem`, `ca-key.pem`). Every control-plane replica GETs it; if it is
absent, one generates a root and CREATEs the Secret. Replicas starting together race on the
create: the API server accepts exactly one, the others get 409 AlreadyExists and load the
winner's, so the mesh never has two roots.

User-provided (`--ca-from-secret NAME`): a Secret in the mesh namespace the control plane
only reads, in either layout users have:
  * Istio's plug-in CA (`cacerts`): ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem;
  * cert-manager's `kubernetes.io/tls` (a Certificate with isCA: true): tls.crt (the CA cert,
    possibly followed by its issuers), tls.key, ca.crt (the root).
Either may be an intermediate: its issuers up to the root come from the chain keys.

The root certificate (never the key) is published in the ConfigMap `istio-ca-root-cert`
(`root-cert.pem`), which ztunnel mounts to verify the control plane, as Istio's proxies do:
`publish_root` writes one namespace's; the root publisher (root_publisher) keeps every
namespace's.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from mesh.clock import Clock

from ..ca import CAError, CertificateAuthority
from .api import ApiError, KubeApi

__all__ = ["CaOrigin", "CaSecretError", "CaMaterial", "SELF_SIGNED_SECRET", "ROOT_CONFIGMAP",
           "parse_ca_secret", "self_signed_secret", "load_or_create_ca", "root_configmap", "holds_root",
           "publish_root"]

log = logging.getLogger("ambient.kube.ca")

SELF_SIGNED_SECRET = "istio-ca-secret"
"""Istio's name for the self-signed root's Secret."""
ROOT_CONFIGMAP = "istio-ca-root-cert"
ROOT_KEY = "root-cert.pem"
_LABELS = {"app.kubernetes.io/part-of": "ambient"}
_ATTEMPTS = 6  # transport errors at start: then the Deployment's restart backoff takes over


class CaOrigin(str, Enum):
    CREATED = "created"      # this replica generated the root and created the Secret
    LOADED = "loaded"        # the self-signed root's Secret existed
    LOST_RACE = "lost_race"  # another replica created it between our GET and CREATE
    USER = "user"            # --ca-from-secret


class CaSecretError(Exception):
    """The CA Secret is missing, incomplete or unusable; `reason` is a stable label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CaMaterial:
    """(name, PEM) of the signing cert, its key, and the pool of its issuers (None: a root)."""

    cert: tuple[str, bytes]
    key: tuple[str, bytes]
    chain: tuple[str, bytes] | None


# Layouts: (cert key, key key, chain keys in pool order).
_LAYOUTS = (
    ("ca-cert.pem", "ca-key.pem", ("cert-chain.pem", "root-cert.pem")),  # istio cacerts / istio-ca-secret
    ("tls.crt", "tls.key", ("tls.crt", "ca.crt")),  # cert-manager; tls.crt may carry the issuers too
)


def parse_ca_secret(secret: Mapping[str, Any]) -> CaMaterial:
    """The CA material in a Secret object (pure): which layout, decoded, named for errors."""
    meta = secret.get("metadata") or {}
    where = f"Secret {meta.get('namespace', '?')}/{meta.get('name', '?')}"
    data = secret.get("data") or {}
    if not isinstance(data, Mapping):
        raise CaSecretError("ca_secret_invalid", f"{where}: data is not a map")

    def get(k: str) -> bytes:
        try:
            return base64.b64decode(str(data[k]), validate=True)
        except (binascii.Error, ValueError):
            raise CaSecretError("ca_secret_invalid", f"{where}: key {k} is not base64") from None

    for cert_k, key_k, chain_ks in _LAYOUTS:
        if cert_k in data and key_k in data:
            pool = b"".join(get(k) + b"\n" for k in chain_ks if k in data and str(data[k]))
            chain = (f"{where} keys {'+'.join(k for k in chain_ks if k in data)}", pool) if pool.strip() else None
            return CaMaterial((f"{where} key {cert_k}", get(cert_k)), (f"{where} key {key_k}", get(key_k)), chain)
    raise CaSecretError("ca_secret_invalid",
                        f"{where}: no CA in it: expected ca-cert.pem + ca-key.pem (Istio's cacerts) or "
                        f"tls.crt + tls.key (cert-manager), found keys {sorted(data)}")


def self_signed_secret(ca: CertificateAuthority, namespace: str) -> dict[str, Any]:
    """The Secret holding a generated root, in Istio's istio-ca-secret layout (pure)."""
    cert, key, _chain = ca.to_pem()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return {"apiVersion": "v1", "kind": "Secret", "type": "istio.io/ca-root",
            "metadata": {"name": SELF_SIGNED_SECRET, "namespace": namespace, "labels": dict(_LABELS)},
            "data": {"ca-cert.pem": b64(cert), "ca-key.pem": b64(key), "root-cert.pem": b64(cert),
                     "cert-chain.pem": ""}}


def _from_secret(secret: Mapping[str, Any], *, clock: Clock, trust_domain: str) -> CertificateAuthority:
    m = parse_ca_secret(secret)
    try:
        return CertificateAuthority.from_pem(m.cert, m.key, chain=m.chain, clock=clock, trust_domain=trust_domain)
    except CAError as e:
        raise CaSecretError(e.reason, str(e)) from None


async def _retrying(call: Callable[[], Any], what: str, sleep: Callable[[float], Any]) -> Any:
    delay = 0.2
    for attempt in range(_ATTEMPTS):
        try:
            return await call()
        except ApiError as e:
            if e.status not in (0, 429, 500, 502, 503, 504) or attempt == _ATTEMPTS - 1:
                raise
            log.info("%s: %s; retrying in %.1f s", what, e, delay)
            await sleep(delay)
            delay = min(delay * 2, 3.0)
    raise AssertionError("unreachable")


async def _get(api: KubeApi, path: str, sleep: Callable[[float], Any]) -> dict[str, Any] | None:
    try:
        return await _retrying(lambda: api.request_json("GET", path), f"GET {path}", sleep)
    except ApiError as e:
        if e.status == 404:
            return None
        raise


async def load_or_create_ca(api: KubeApi, *, namespace: str, trust_domain: str, clock: Clock,
                            from_secret: str | None = None,
                            generate: Callable[[], CertificateAuthority] | None = None,
                            sleep: Callable[[float], Any] = asyncio.sleep,
                            ) -> tuple[CertificateAuthority, CaOrigin]:
    """The mesh's CA from the cluster: the user's Secret `from_secret`, or the self-signed
    root's Secret, creating it (once, cluster-wide) when absent."""
    base = f"/api/v1/namespaces/{namespace}/secrets"
    if from_secret is not None:
        secret = await _get(api, f"{base}/{from_secret}", sleep)
        if secret is None:
            raise CaSecretError("ca_secret_missing",
                                f"Secret {namespace}/{from_secret} (--ca-from-secret) does not exist: create it "
                                f"first (Istio's cacerts layout, or a cert-manager Certificate with isCA: true)")
        return _from_secret(secret, clock=clock, trust_domain=trust_domain), CaOrigin.USER
    path = f"{base}/{SELF_SIGNED_SECRET}"
    secret = await _get(api, path, sleep)
    if secret is not None:
        return _from_secret(secret, clock=clock, trust_domain=trust_domain), CaOrigin.LOADED
    ca = generate() if generate is not None else CertificateAuthority.generate(trust_domain, clock=clock)
    try:
        await _retrying(lambda: api.request_json("POST", base, body=self_signed_secret(ca, namespace)),
                        f"POST {base}", sleep)
    except ApiError as e:
        if e.status != 409:
            raise
        # Another replica created it first: theirs is the mesh's root, ours is thrown away.
        secret = await _get(api, path, sleep)
        if secret is None:
            raise CaSecretError("ca_secret_race", f"Secret {namespace}/{SELF_SIGNED_SECRET} was created "
                                "and deleted again while starting: restart") from None
        log.info("another control plane created %s/%s first: using its root", namespace, SELF_SIGNED_SECRET)
        return _from_secret(secret, clock=clock, trust_domain=trust_domain), CaOrigin.LOST_RACE
    log.info("generated the mesh root CA into Secret %s/%s", namespace, SELF_SIGNED_SECRET)
    return ca, CaOrigin.CREATED


def root_configmap(namespace: str, roots_pem: bytes, current: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ConfigMap `istio-ca-root-cert` holding `roots_pem` (pure): new, or `current` with its
    root-cert.pem replaced: a read-modify-write keeping its other keys, labels and annotations,
    and its resourceVersion as the update's precondition."""
    if current is None:
        return {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": ROOT_CONFIGMAP, "namespace": namespace, "labels": dict(_LABELS)},
                "data": {ROOT_KEY: roots_pem.decode()}}
    meta = dict(current.get("metadata") or {})
    meta["labels"] = {**(meta.get("labels") or {}), **_LABELS}
    return {**current, "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
            "data": {**(current.get("data") or {}), ROOT_KEY: roots_pem.decode()}}


def holds_root(configmap: Mapping[str, Any], roots_pem: bytes) -> bool:
    """Whether a ConfigMap already carries `roots_pem` under root-cert.pem (pure; its other keys
    and its labels are not the mesh's business)."""
    return (configmap.get("data") or {}).get(ROOT_KEY) == roots_pem.decode()


_UNREAD: Any = object()


async def publish_root(api: KubeApi, *, namespace: str, roots_pem: bytes, current: Any = _UNREAD,
                       sleep: Callable[[float], Any] = asyncio.sleep) -> dict[str, Any] | None:
    """Make ConfigMap `istio-ca-root-cert` in `namespace` hold `roots_pem`: the object as
    written, or None when it already did. `current` is the ConfigMap as a watch cache has it
    (None: absent), which saves the first GET; a conflict (the cache lagged, or another writer
    got there first) reads it fresh and decides again."""
    base = f"/api/v1/namespaces/{namespace}/configmaps"
    path = f"{base}/{ROOT_CONFIGMAP}"
    for attempt in range(3):  # a concurrent writer can make one create or update conflict
        if attempt or current is _UNREAD:
            current = await _get(api, path, sleep)
        if current is not None and holds_root(current, roots_pem):
            return None
        # An update carries the version it was judged on: an edit since then is a 409, judged again.
        body = root_configmap(namespace, roots_pem, current)
        try:
            if current is None:
                return await api.request_json("POST", base, body=body)
            return await api.request_json("PUT", path, body=body)
        except ApiError as e:
            if e.status == 404 and current is not None:
                continue  # deleted since the cache saw it: create it
            if e.status != 409:
                raise
    raise CaSecretError("ca_root_publish_conflict", f"ConfigMap {namespace}/{ROOT_CONFIGMAP}: conflicting writers")
