"""L4 authorization (pure): may this connection reach this workload? Istio's semantics.

Order, as ztunnel's RBAC and istiod's PeerAuthentication conversion give it:
  1. PeerAuthentication STRICT (effective for the workload and port) refuses plaintext.
  2. Any matching DENY policy denies.
  3. If any ALLOW policy applies to the workload, one of them must match.
  4. Otherwise allow.
A policy applies mesh-wide from the root namespace, namespace-wide without a selector, or to
the workloads its `selector.matchLabels` selects. A policy with targetRefs belongs to a
waypoint and is ignored here. Rules with L7-only fields fail closed (see mesh.model.policy).

`evaluate` takes any policies and keeps those that apply; per connection, ztunnel passes
`mesh.state.ProxyState.policies_for(workload)` (the same ones, already in order) to
`evaluate_applicable` instead.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mesh.identity import SpiffeId
from mesh.model import Workload
from mesh.model.policy import (ROOT_NAMESPACE, Action, AuthorizationPolicy, Condition, MtlsMode,
                               Operation, PeerAuthentication, Rule, Source, StringMatch, ip_block)
from mesh.state import WorkloadPolicies

__all__ = ["Connection", "Decision", "applies", "effective_mtls", "evaluate", "evaluate_applicable"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Connection:
    """What ztunnel knows of an inbound connection when it decides."""

    src_identity: SpiffeId | None
    """The mTLS peer identity; None for plaintext (15006)."""
    src_ip: ipaddress.IPv4Address
    dst_ip: ipaddress.IPv4Address
    dst_port: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    allowed: bool
    reason: str
    """Stable word: allowed, mtls_required, denied_by_policy, no_allow_match."""
    policy: str | None = None
    """`namespace/name` of the deciding policy, if one decided."""
    failed_closed: tuple[str, ...] = ()
    """`namespace/name: field` of L7-only rule fields that ztunnel could not evaluate."""
    dry_run: tuple[str, ...] = ()
    """Dry-run policies that would have decided otherwise (logged, not enforced)."""


def _selected(selector, workload: Workload) -> bool:
    return selector is None or all(workload.labels.get(k) == v for k, v in selector.items())


def applies(policy: AuthorizationPolicy, workload: Workload) -> bool:
    if policy.target_refs:
        return False
    if policy.namespace != ROOT_NAMESPACE and policy.namespace != workload.namespace:
        return False
    return _selected(policy.selector, workload)


def effective_mtls(peer_auths: Iterable[PeerAuthentication], workload: Workload, port: int) -> MtlsMode:
    """Workload-level beats namespace-level beats mesh-level; UNSET inherits; default PERMISSIVE.

    DISABLE is treated as PERMISSIVE: ambient cannot turn mTLS off, it can only accept plaintext.
    """
    levels: list[list[PeerAuthentication]] = [[], [], []]
    for pa in sorted(peer_auths, key=lambda p: (p.namespace, p.name)):  # oldest-wins stand-in: name
        if pa.namespace == workload.namespace and pa.selector is not None and _selected(pa.selector, workload):
            levels[0].append(pa)
        elif pa.namespace == workload.namespace and pa.selector is None:
            levels[1].append(pa)
        elif pa.namespace == ROOT_NAMESPACE and pa.selector is None:
            levels[2].append(pa)
    for level in levels:
        if not level:
            continue
        pa = level[0]
        mode = dict(pa.port_modes).get(port, MtlsMode.UNSET)
        if mode is MtlsMode.UNSET:
            mode = pa.mode
        if mode is not MtlsMode.UNSET:
            return MtlsMode.PERMISSIVE if mode is MtlsMode.DISABLE else mode
    return MtlsMode.PERMISSIVE


# The matchers run for every applicable rule of every connection: plain loops, not any() over
# generators, which cost a frame each in CPython.

def _any(matches: Sequence[StringMatch], value: str | None) -> bool:
    for m in matches:
        if m.matches(value):
            return True
    return False


def _in(nets: Sequence[ipaddress.IPv4Network], ip: ipaddress.IPv4Address) -> bool:
    for n in nets:
        if ip in n:
            return True
    return False


@dataclass(frozen=True, slots=True)
class _Peer:
    """The connection with its source identity's strings derived once, not once per rule."""

    conn: Connection
    principal: str | None
    namespace: str | None

    @classmethod
    def of(cls, c: Connection) -> _Peer:
        ident = c.src_identity
        return cls(c, ident.principal if ident else None, ident.namespace if ident else None)


def _source(s: Source, peer: _Peer) -> bool:
    principal, namespace, c = peer.principal, peer.namespace, peer.conn
    return ((s.principals is None or _any(s.principals, principal))
            and (s.not_principals is None or not _any(s.not_principals, principal))
            and (s.namespaces is None or _any(s.namespaces, namespace))
            and (s.not_namespaces is None or not _any(s.not_namespaces, namespace))
            and (s.ip_blocks is None or _in(s.ip_blocks, c.src_ip))
            and (s.not_ip_blocks is None or not _in(s.not_ip_blocks, c.src_ip)))


def _operation(o: Operation, c: Connection) -> bool:
    return ((o.ports is None or c.dst_port in o.ports)
            and (o.not_ports is None or c.dst_port not in o.not_ports))


def _condition_value_matches(key: str, value: str, peer: _Peer) -> bool:
    c = peer.conn
    if key == "source.ip":
        return c.src_ip in ip_block(value)
    if key == "destination.ip":
        return c.dst_ip in ip_block(value)
    if key == "destination.port":
        return str(c.dst_port) == value
    if key == "source.namespace":
        return StringMatch.parse(value).matches(peer.namespace)
    if key == "source.principal":
        return StringMatch.parse(value).matches(peer.principal)
    return False


def _condition(cond: Condition, peer: _Peer) -> bool:
    hit = lambda vs: any(_condition_value_matches(cond.key, v, peer) for v in vs)  # noqa: E731
    return ((cond.values is None or hit(cond.values))
            and (cond.not_values is None or not hit(cond.not_values)))


def _rule(rule: Rule, action: Action, peer: _Peer) -> bool:
    if rule.l7_fields and action is Action.ALLOW:
        return False  # fail closed: an ALLOW that needs L7 attributes allows nothing here
    if rule.sources:
        for s in rule.sources:
            if _source(s, peer):
                break
        else:
            return False
    if rule.operations:
        for o in rule.operations:
            if _operation(o, peer.conn):
                break
        else:
            return False
    for x in rule.conditions:
        if not _condition(x, peer):
            return False
    return True


def _matches(policy: AuthorizationPolicy, peer: _Peer) -> bool:
    action = policy.action
    for r in policy.rules:
        if _rule(r, action, peer):
            return True
    return False


def evaluate(policies: Iterable[AuthorizationPolicy], peer_auths: Iterable[PeerAuthentication],
             workload: Workload, conn: Connection) -> Decision:
    """The decision for `conn` to `workload` under the given policies (any: those that do not
    apply to `workload` are skipped)."""
    if conn.src_identity is None and effective_mtls(peer_auths, workload, conn.dst_port) is MtlsMode.STRICT:
        return Decision(allowed=False, reason="mtls_required")
    return _evaluate([p for p in policies if applies(p, workload)], conn)


def evaluate_applicable(policies: WorkloadPolicies, workload: Workload, conn: Connection) -> Decision:
    """`evaluate` over `ProxyState.policies_for(workload)`: the same decision, without looking
    at policies that do not apply. `policies` must be that lookup's answer for `workload`."""
    if (conn.src_identity is None
            and effective_mtls(policies.peer_authentications, workload, conn.dst_port) is MtlsMode.STRICT):
        return Decision(allowed=False, reason="mtls_required")
    return _evaluate(policies.authorization, conn)


def _evaluate(relevant: Sequence[AuthorizationPolicy], conn: Connection) -> Decision:
    failed = tuple(f"{p.namespace}/{p.name}: {f}" for p in relevant for r in p.rules for f in r.l7_fields)
    enforced = [p for p in relevant if not p.dry_run]
    dry = [p for p in relevant if p.dry_run]
    peer = _Peer.of(conn)
    decision = _decide(enforced, peer, failed)
    if dry:
        would = _decide(enforced + [_live(p) for p in dry], peer, failed)
        if would.allowed != decision.allowed:
            decision = Decision(allowed=decision.allowed, reason=decision.reason, policy=decision.policy,
                                failed_closed=failed, dry_run=tuple(f"{p.namespace}/{p.name}" for p in dry))
    return decision


def _live(p: AuthorizationPolicy) -> AuthorizationPolicy:
    from dataclasses import replace
    return replace(p, dry_run=False)


def _decide(policies: Sequence[AuthorizationPolicy], peer: _Peer, failed: tuple[str, ...]) -> Decision:
    for p in policies:
        if p.action is Action.DENY and _matches(p, peer):
            return Decision(allowed=False, reason="denied_by_policy", policy=f"{p.namespace}/{p.name}",
                            failed_closed=failed)
    allows = [p for p in policies if p.action is Action.ALLOW]
    if allows:
        for p in allows:
            if _matches(p, peer):
                return Decision(allowed=True, reason="allowed", policy=f"{p.namespace}/{p.name}",
                                failed_closed=failed)
        return Decision(allowed=False, reason="no_allow_match", failed_closed=failed)
    return Decision(allowed=True, reason="allowed", failed_closed=failed)
