"""Token credentials, pure part: who a TokenReview result speaks for, and then the one CSR
decision (csr_authz) for both credential sources (client certificate, token)."""
from __future__ import annotations

import base64
import json

import pytest

from controlplane.csr_authz import CsrDenied, authorize_csr
from controlplane.kube.tokens import (PodBinding, Review, TokenDenied, requester_from_review,
                                      review_from_wire, token_expiry)
from mesh.identity import NodeId, SpiffeId
from mesh.model import ObjectMeta, Pod

TD = "cluster.local"
ZT = "system:serviceaccount:istio-system:ztunnel"
AUD = ("istio-ca",)
BOUND = {"authentication.kubernetes.io/pod-name": ("ztunnel-a",), "authentication.kubernetes.io/pod-uid": ("u1",)}
ZT_POD_A = PodBinding("istio-system", "ztunnel-a", "u1", "node-a", "ztunnel")


def _ok(**kw) -> Review:
    return Review(**{"authenticated": True, "username": ZT, "audiences": AUD, "extra": BOUND, **kw})


@pytest.mark.parametrize("review, pod, expect", [
    (_ok(), ZT_POD_A, NodeId(trust_domain=TD, node="node-a")),
    (_ok(), PodBinding("istio-system", "ztunnel-a", "u1", "node-b", "ztunnel"), NodeId(trust_domain=TD, node="node-b")),
    # A workload's token: itself only (the SA, wherever its pod runs).
    (_ok(username="system:serviceaccount:shop:web", extra={}), None,
     SpiffeId(trust_domain=TD, namespace="shop", service_account="web")),
    (Review(False, error="token has expired"), ZT_POD_A, "token_unauthenticated"),
    (_ok(audiences=("https://kubernetes.default.svc",)), ZT_POD_A, "wrong_audience"),
    (_ok(username="admin"), ZT_POD_A, "not_a_service_account"),
    (_ok(username="system:serviceaccount:broken"), ZT_POD_A, "not_a_service_account"),
    (_ok(extra={}), ZT_POD_A, "token_not_pod_bound"),  # a legacy Secret token names no node
    (_ok(), None, "bound_pod_gone"),
    (_ok(), PodBinding("istio-system", "ztunnel-a", "u2", "node-a", "ztunnel"), "bound_pod_gone"),  # replaced
    (_ok(), PodBinding("istio-system", "ztunnel-a", "u1", "node-a", "default"), "pod_service_account_mismatch"),
    (_ok(), PodBinding("istio-system", "ztunnel-a", "u1", None, "ztunnel"), "bound_pod_unscheduled"),
    (_ok(), PodBinding("istio-system", "other", "u1", "node-a", "ztunnel"), "bound_pod_gone"),
])
def test_requester_from_review(review, pod, expect):
    kw = dict(audience="istio-ca", trust_domain=TD, node_agent=("istio-system", "ztunnel"))
    if isinstance(expect, str):
        with pytest.raises(TokenDenied) as e:
            requester_from_review(review, pod, **kw)
        assert e.value.reason == expect
    else:
        assert requester_from_review(review, pod, **kw) == expect


def _pod(name: str, ns: str, sa: str, node: str) -> Pod:
    return Pod(meta=ObjectMeta(name=name, namespace=ns), node_name=node, service_account=sa)


PODS = [_pod("web-1", "shop", "web", "node-a"), _pod("db-1", "shop", "db", "node-b")]
WEB = SpiffeId(trust_domain=TD, namespace="shop", service_account="web")
DB = SpiffeId(trust_domain=TD, namespace="shop", service_account="db")


@pytest.mark.parametrize("credential", ["client certificate", "token"])
@pytest.mark.parametrize("node, requested, reason", [
    ("node-a", WEB, None),
    ("node-a", DB, "identity_not_on_node"),  # db runs on node-b only
    ("node-b", DB, None),
    ("node-a", SpiffeId(trust_domain="other.td", namespace="shop", service_account="web"), "wrong_trust_domain"),
])
def test_one_decision_for_both_credentials(credential, node, requested, reason):
    if credential == "token":
        requester = requester_from_review(
            _ok(), PodBinding("istio-system", "ztunnel-a", "u1", node, "ztunnel"),
            audience="istio-ca", trust_domain=TD, node_agent=("istio-system", "ztunnel"))
    else:
        requester = NodeId(trust_domain=TD, node=node)  # what tls.check_peer yields for a node cert
    if reason is None:
        authorize_csr(requester, requested, trust_domain=TD, pods=PODS)
    else:
        with pytest.raises(CsrDenied) as e:
            authorize_csr(requester, requested, trust_domain=TD, pods=PODS)
        assert e.value.reason == reason


def test_review_from_wire_and_token_expiry():
    r = review_from_wire({"status": {"authenticated": True, "audiences": ["istio-ca"], "user": {
        "username": ZT, "extra": {"authentication.kubernetes.io/pod-name": ["ztunnel-a"]}}}})
    assert r == Review(True, ZT, AUD, {"authentication.kubernetes.io/pod-name": ("ztunnel-a",)})
    assert review_from_wire({}) == Review(False)
    claims = base64.urlsafe_b64encode(json.dumps({"exp": 1700000000}).encode()).rstrip(b"=").decode()
    assert token_expiry(f"h.{claims}.s") == 1700000000
    assert token_expiry("garbage") is None and token_expiry("a.%%%.b") is None
