"""Proxies' second credential: a projected ServiceAccount token, verified with TokenReview.

In a cluster, ztunnel has no bootstrap certificate: it presents its pod's projected token
(audience: the mesh CA's, `istio-ca`), as Istio's ztunnel does. The API server checks the
signature, expiry, audience and that the pod it is bound to still exists (TokenReview); the
control plane then reads which pod the token is bound to (`authentication.kubernetes.io/
pod-name`/`pod-uid` in the review's extra) and GETs that pod: its spec.nodeName is the node
the token speaks for. So the requester is

  * NodeId(node) for a token of the node agent's ServiceAccount (istio-system/ztunnel)
    bound to a pod scheduled on that node, and
  * SpiffeId(ns, sa) for any other ServiceAccount's token (a workload: itself only),

the same two requesters a client certificate yields in local mode, and the same decision
(controlplane.csr_authz.authorize_csr) applies to both. `requester_from_review` is that
mapping, pure and table-tested; `TokenAuthenticator` does the two API calls.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mesh.clock import Clock
from mesh.identity import IdentityError, NodeId, SpiffeId

from .api import ApiError, KubeApi

__all__ = ["TokenDenied", "Review", "PodBinding", "review_from_wire", "requester_from_review",
           "TokenAuthenticator", "token_expiry", "POD_NAME", "POD_UID"]

log = logging.getLogger("ambient.kube.tokens")

POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
_SA_PREFIX = "system:serviceaccount:"


class TokenDenied(Exception):
    """A token that does not authenticate a proxy; `reason` is the metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Review:
    """What the API server said about a token (TokenReview status)."""

    authenticated: bool
    username: str = ""
    audiences: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True, slots=True)
class PodBinding:
    """The pod a token is bound to, as the API server has it now."""

    namespace: str
    name: str
    uid: str
    node_name: str | None
    service_account: str


def review_from_wire(obj: Mapping[str, Any]) -> Review:
    """A TokenReview response object -> Review (the one wire edge)."""
    st = obj.get("status") or {}
    user = st.get("user") or {}
    extra = {str(k): tuple(str(x) for x in (v or ())) for k, v in (user.get("extra") or {}).items()}
    return Review(authenticated=bool(st.get("authenticated")), username=str(user.get("username") or ""),
                  audiences=tuple(str(a) for a in st.get("audiences") or ()), extra=extra,
                  error=str(st.get("error") or ""))


def pod_from_wire(obj: Mapping[str, Any]) -> PodBinding:
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    return PodBinding(namespace=str(meta.get("namespace") or ""), name=str(meta.get("name") or ""),
                      uid=str(meta.get("uid") or ""), node_name=spec.get("nodeName") or None,
                      service_account=str(spec.get("serviceAccountName") or "default"))


def service_account_of(review: Review) -> tuple[str, str]:
    """(namespace, name) of an authenticated ServiceAccount token, else TokenDenied."""
    if not review.username.startswith(_SA_PREFIX):
        raise TokenDenied("not_a_service_account", f"{review.username!r} is not a ServiceAccount")
    ns, _, sa = review.username.removeprefix(_SA_PREFIX).partition(":")
    if not ns or not sa:
        raise TokenDenied("not_a_service_account", f"malformed ServiceAccount user {review.username!r}")
    return ns, sa


def requester_from_review(review: Review, pod: PodBinding | None, *, audience: str, trust_domain: str,
                          node_agent: tuple[str, str]) -> NodeId | SpiffeId:
    """Who a reviewed token speaks for (pure): a node for the node agent's token bound to a
    pod scheduled there, a workload identity for any other ServiceAccount; else TokenDenied.

    `pod` is the pod named in the review's binding, looked up after the review (None: gone).
    """
    if not review.authenticated:
        # The API server's reason (expired, wrong audience, bound pod deleted) is in `error`.
        raise TokenDenied("token_unauthenticated", f"token refused by the API server: {review.error or 'invalid'}")
    if audience not in review.audiences:
        raise TokenDenied("wrong_audience", f"token is not for audience {audience!r} (it is for {list(review.audiences)})")
    ns, sa = service_account_of(review)
    if (ns, sa) != node_agent:
        try:
            return SpiffeId(trust_domain=trust_domain, namespace=ns, service_account=sa)
        except IdentityError as e:
            raise TokenDenied("not_a_service_account", str(e)) from None
    names, uids = review.extra.get(POD_NAME, ()), review.extra.get(POD_UID, ())
    if len(names) != 1 or len(uids) != 1:
        # A legacy Secret token, or a TokenRequest without a pod binding: it names no node.
        raise TokenDenied("token_not_pod_bound", f"{ns}/{sa} token is not bound to a pod, so it names no node")
    if pod is None or pod.namespace != ns or pod.name != names[0]:
        raise TokenDenied("bound_pod_gone", f"pod {ns}/{names[0]} the token is bound to does not exist")
    if pod.uid != uids[0]:
        raise TokenDenied("bound_pod_gone", f"pod {ns}/{names[0]} was replaced (uid {pod.uid}, token's {uids[0]})")
    if pod.service_account != sa:
        raise TokenDenied("pod_service_account_mismatch",
                          f"pod {ns}/{pod.name} runs as {pod.service_account}, the token is {sa}'s")
    if not pod.node_name:
        raise TokenDenied("bound_pod_unscheduled", f"pod {ns}/{pod.name} is not scheduled to a node")
    try:
        return NodeId(trust_domain=trust_domain, node=pod.node_name)
    except IdentityError as e:
        raise TokenDenied("bound_pod_unscheduled", str(e)) from None


def token_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, read without verifying (TokenReview verifies); None if unreadable."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp") if isinstance(claims, dict) else None
        return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None
    except (IndexError, ValueError, binascii.Error):
        return None


class TokenAuthenticator:
    """Token -> requester, with the API server: TokenReview, then the bound pod.

    Results (accepted or refused) are cached briefly by the token's hash: a ztunnel starting on
    a busy node asks for dozens of certificates with one token. The cache never outlives its
    TTL, so a deleted pod's token stops working within `cache_ttl`.
    """

    def __init__(self, api: KubeApi, *, audience: str, trust_domain: str, clock: Clock,
                 node_agent: tuple[str, str] = ("istio-system", "ztunnel"),
                 cache_ttl: float = 10.0, cache_size: int = 1024) -> None:
        self.api = api
        self.audience = audience
        self.trust_domain = trust_domain
        self.clock = clock
        self.node_agent = node_agent
        self.cache_ttl = cache_ttl
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, tuple[float, NodeId | SpiffeId | TokenDenied]] = OrderedDict()
        self.stats = {"reviews": 0, "cache_hits": 0}

    async def authenticate(self, token: str) -> NodeId | SpiffeId:
        key = hashlib.sha256(token.encode()).digest()
        hit = self._cache.get(key)
        now = self.clock.now()
        if hit is not None and now < hit[0]:
            self.stats["cache_hits"] += 1
            result = hit[1]
        else:
            result = await self._review(token)
            # Never past the token's own expiry: an expired token must be refused at once.
            exp = token_expiry(token)
            self._cache[key] = (min(now + self.cache_ttl, exp if exp is not None else now), result)
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        if isinstance(result, TokenDenied):
            raise result
        return result

    async def _review(self, token: str) -> NodeId | SpiffeId | TokenDenied:
        self.stats["reviews"] += 1
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": [self.audience]}}
        try:
            review = review_from_wire(await self.api.request_json(
                "POST", "/apis/authentication.k8s.io/v1/tokenreviews", body=body))
            pod = None
            names = review.extra.get(POD_NAME, ())
            if review.authenticated and len(names) == 1 and review.username.startswith(_SA_PREFIX):
                ns = service_account_of(review)[0]
                try:
                    pod = pod_from_wire(await self.api.request_json("GET", f"/api/v1/namespaces/{ns}/pods/{names[0]}"))
                except ApiError as e:
                    if e.status != 404:
                        raise
            return requester_from_review(review, pod, audience=self.audience, trust_domain=self.trust_domain,
                                         node_agent=self.node_agent)
        except TokenDenied as e:
            return e
        except ApiError as e:  # not cached: the next request asks again
            raise TokenDenied("token_review_failed", f"TokenReview failed: {e}") from None
