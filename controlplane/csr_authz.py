"""Who may obtain which certificate: a node only for service accounts of its own pods."""
from __future__ import annotations

from collections.abc import Iterable

from mesh.identity import NodeId, SpiffeId
from mesh.model import Pod

__all__ = ["CsrDenied", "authorize_csr"]


class CsrDenied(Exception):
    """A certificate request the requester is not entitled to; `reason` is the metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def authorize_csr(requester: NodeId | SpiffeId, requested: SpiffeId, *, trust_domain: str,
                  pods: Iterable[Pod]) -> None:
    """Raise CsrDenied unless `requester` may get a certificate for `requested`.

    A node (ztunnel) impersonates workloads, as Istio's ImpersonatedIdentity allows, but only
    those with a pod scheduled on that node; a workload (a waypoint later) only renews itself.
    """
    if requested.trust_domain != trust_domain:
        raise CsrDenied("wrong_trust_domain",
                        f"{requested} is not in trust domain {trust_domain!r}")
    if isinstance(requester, SpiffeId):
        if requester != requested:
            raise CsrDenied("identity_mismatch", f"{requester} may only renew its own identity, not {requested}")
        return
    for p in pods:
        if (p.node_name == requester.node and p.namespace == requested.namespace
                and p.service_account == requested.service_account):
            return
    raise CsrDenied("identity_not_on_node",
                    f"node {requester.node!r} runs no pod with service account "
                    f"{requested.namespace}/{requested.service_account}; refusing {requested}")
