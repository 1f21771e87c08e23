"""SPIFFE identities: workload ids spiffe://<td>/ns/<ns>/sa/<sa> and node ids for ztunnels."""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SpiffeId", "NodeId", "IdentityError", "parse_identity", "CONTROL_PLANE_ID"]

# RFC 1123 labels, as Kubernetes names namespaces and service accounts (subdomains for SAs).
# Matched with fullmatch: `$` also matches before a trailing newline ("b\n" would pass).
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")


class IdentityError(ValueError):
    """A string or certificate does not carry a valid identity."""

    reason = "bad_identity"


def _check(kind: str, value: str, pattern: re.Pattern[str]) -> None:
    if not value or len(value) > 253 or not pattern.fullmatch(value):
        raise IdentityError(f"invalid {kind} {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class SpiffeId:
    """A workload identity: the SPIFFE ID of a Kubernetes service account."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        _check("trust domain", self.trust_domain, _TRUST_DOMAIN)
        _check("namespace", self.namespace, _NAME)
        _check("service account", self.service_account, _NAME)

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """The form Istio's AuthorizationPolicy uses: the URI without `spiffe://`."""
        return self.uri.removeprefix("spiffe://")

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeId:
    """A node's bootstrap identity (its ztunnel's credential towards the control plane).

    Kept apart from workload ids by path (`/ambient/node/<name>`), so a node credential can
    never be mistaken for a workload identity on the data path.
    """

    trust_domain: str
    node: str

    def __post_init__(self) -> None:
        _check("trust domain", self.trust_domain, _TRUST_DOMAIN)
        _check("node name", self.node, _NAME)

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ambient/node/{self.node}"

    def __str__(self) -> str:
        return self.uri


# The control plane's own identity (istiod's service account in Istio).
def CONTROL_PLANE_ID(trust_domain: str) -> SpiffeId:
    return SpiffeId(trust_domain=trust_domain, namespace="istio-system", service_account="istiod")


def parse_identity(uri: str) -> SpiffeId | NodeId:
    """Parse a SPIFFE URI into a workload or node identity; raise IdentityError otherwise."""
    if not uri.startswith("spiffe://"):
        raise IdentityError(f"not a SPIFFE ID: {uri!r}")
    td, _, path = uri.removeprefix("spiffe://").partition("/")
    parts = path.split("/")
    if len(parts) == 4 and parts[0] == "ns" and parts[2] == "sa":
        return SpiffeId(trust_domain=td, namespace=parts[1], service_account=parts[3])
    if len(parts) == 3 and parts[0] == "ambient" and parts[1] == "node":
        return NodeId(trust_domain=td, node=parts[2])
    raise IdentityError(f"unsupported SPIFFE ID path: {uri!r}")
