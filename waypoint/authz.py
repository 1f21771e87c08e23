"""L7 authorization at the waypoint (pure): may this HTTP request reach its service? Istio's semantics.

Which policies apply (istiod `ShouldAttachPolicy`, "waypoints never use selector"): only those
with `targetRefs` naming
  * the waypoint: `kind: Gateway`, group `gateway.networking.k8s.io`, same namespace and name;
  * the addressed Service: `kind: Service`, group `""`, the Service's namespace and name;
  * every waypoint: `kind: GatewayClass`, name `istio-waypoint`, from the root namespace.
Selector and namespace-wide policies belong to the destination ztunnel and are ignored here.

Order (AuthorizationPolicy API): 1. a matching CUSTOM policy would ask its external provider;
the mesh has none, so the request is denied (fail closed, 403 `UAEX`, reason
`custom_unsupported`); 2. any matching DENY denies; 3. if any ALLOW policy applies, one must
match; 4. otherwise allow. AUDIT policies never decide: their matches are reported.

Rule matching: at least one `from`, one `to` and every `when` must match (empty = any); inside
one source/operation every set field must match, any value of a field may. Strings are exact,
`prefix*`, `*suffix` or `*` (non-empty); hosts compare case-insensitively without the port;
paths also take `{*}` (one segment) and `{**}` (one or more, last) templates. Attributes the
mesh cannot evaluate (JWT: `requestPrincipals`, `request.auth.*`; `connection.sni`,
`experimental.*`, unknown keys) fail closed: they never match in an ALLOW rule and always
match in a DENY, AUDIT or CUSTOM rule; `Decision.failed_closed` names them.

A deny is Envoy's RBAC local reply: 403, body `RBAC: access denied`, response flag `-`,
details `rbac_access_denied_matched_policy[...]` (istio-l7-defaults.md, table D).
"""
from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

from mesh.identity import SpiffeId
from mesh.model.base import ResourceKey
from mesh.model.policy import (ROOT_NAMESPACE, Action, AuthorizationPolicy, Condition, Operation,
                               Rule, Source, StringMatch, TargetRef, ip_block)

__all__ = ["GATEWAY_GROUP", "WAYPOINT_CLASS", "RBAC_DENIED_BODY", "Reason", "Request", "LocalReply",
           "Decision", "applies", "evaluate"]

GATEWAY_GROUP = "gateway.networking.k8s.io"
WAYPOINT_CLASS = "istio-waypoint"
RBAC_DENIED_BODY = b"RBAC: access denied"
"""Envoy's RBAC filter body, exactly (19 bytes)."""


class Reason(enum.Enum):
    """Why the waypoint decided as it did: a closed set, used as a log field and metric label."""

    ALLOWED = "allowed"
    """An ALLOW policy matched, or none applies and nothing denied."""
    DENIED_BY_POLICY = "denied_by_policy"
    NO_ALLOW_MATCH = "no_allow_match"
    CUSTOM_UNSUPPORTED = "custom_unsupported"
    """A matching CUSTOM policy needs an external authorizer the mesh does not have."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """What the waypoint knows of a request when it authorizes it."""

    method: str
    path: str
    """Without the query string (normalised by the HTTP codec)."""
    host: str
    """:authority / Host as sent (a `:port` suffix is ignored when matching hosts)."""
    headers: tuple[tuple[str, str], ...] = ()
    """(lowercase name, value) pairs; repeated names allowed."""
    source_identity: SpiffeId | None
    """The client's identity, from the HBONE mTLS peer; None if unknown."""
    source_ip: ipaddress.IPv4Address
    remote_ip: ipaddress.IPv4Address | None = None
    """The originating client (remoteIpBlocks, remote.ip); None = `source_ip` (no trusted hop)."""
    destination_ip: ipaddress.IPv4Address
    """The address the client dialled (a Service VIP or a pod IP)."""
    destination_port: int
    """The port the client dialled (operation.ports, destination.port)."""
    service: ResourceKey | None = None
    """The Service the client addressed (`Service`, namespace, name); None if pod-addressed."""

    def header(self, name: str) -> str | None:
        """All values of a header joined with "," (as Envoy matches them); None if absent."""
        values = [v for k, v in self.headers if k == name]
        return ",".join(values) if values else None


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalReply:
    """The response the waypoint sends itself instead of forwarding."""

    status: int
    body: bytes
    response_flags: str
    """Envoy `%RESPONSE_FLAGS%`: `-` for an RBAC deny, `UAEX` for an external-authz failure."""
    details: str
    """Envoy `%RESPONSE_CODE_DETAILS%`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    allowed: bool
    reason: Reason
    policy: str | None = None
    """`namespace/name` of the deciding policy, if one decided."""
    rule: int | None = None
    """Index of the deciding rule in that policy."""
    reply: LocalReply | None = None
    """What to answer when denied; None when allowed."""
    message: str = ""
    """For operators (access log, debug): why, in words."""
    audited: tuple[str, ...] = ()
    """AUDIT policies that matched (`namespace/name`)."""
    failed_closed: tuple[str, ...] = ()
    """`namespace/name: field` of attributes that could not be evaluated (see module doc)."""
    dry_run: tuple[str, ...] = ()
    """Dry-run policies that would have decided otherwise (logged, not enforced)."""


def _attaches(ref: TargetRef, policy_ns: str, waypoint: ResourceKey, service: ResourceKey | None) -> bool:
    if ref.kind == "Gateway" and ref.group == GATEWAY_GROUP:
        return policy_ns == waypoint.namespace and ref.name == waypoint.name
    if ref.kind == "Service" and ref.group in ("", "core"):
        return service is not None and policy_ns == service.namespace and ref.name == service.name
    if ref.kind == "GatewayClass" and ref.group == GATEWAY_GROUP:
        return policy_ns == ROOT_NAMESPACE and ref.name == WAYPOINT_CLASS
    return False


def applies(policy: AuthorizationPolicy, waypoint: ResourceKey, service: ResourceKey | None) -> bool:
    """Whether the waypoint `waypoint` (`Gateway`, ns, name) enforces `policy` for `service`."""
    return any(_attaches(r, policy.namespace, waypoint, service) for r in policy.target_refs)


# -- matching ------------------------------------------------------------------------------

_HEADER_KEY = re.compile(r"^request\.headers\[(.+)\]$")


def _strip_port(host: str) -> str:
    if host.startswith("["):  # [v6]:port
        end = host.find("]")
        return host[:end + 1] if end != -1 else host
    h, sep, port = host.rpartition(":")
    return h if sep and port.isdigit() and ":" not in h else host


def _host_matches(pattern: str, host: str) -> bool:
    host = _strip_port(host).lower()
    return StringMatch.parse(pattern.lower()).matches(host)


@lru_cache(maxsize=1024)
def _template(pattern: str) -> re.Pattern[str]:
    parts = []
    for seg in pattern.split("/"):
        if seg == "{*}":
            parts.append("[^/]+")
        elif seg == "{**}":
            parts.append("[^/]+(?:/[^/]+)*")
        else:
            parts.append(re.escape(seg))
    return re.compile("/".join(parts))


def _path_matches(pattern: str, path: str) -> bool:
    if "{*" in pattern:
        return _template(pattern).fullmatch(path) is not None
    return StringMatch.parse(pattern).matches(path)


def _any_str(matches: Sequence[StringMatch], value: str | None) -> bool:
    return any(m.matches(value) for m in matches)


def _in(nets: Sequence[ipaddress.IPv4Network], ip: ipaddress.IPv4Address) -> bool:
    return any(ip in n for n in nets)


class _Eval:
    """One rule evaluation: `assume` is what an unevaluable attribute counts as."""

    __slots__ = ("req", "assume", "principal", "namespace", "remote_ip")

    def __init__(self, req: Request, assume: bool) -> None:
        self.req = req
        self.assume = assume
        ident = req.source_identity
        self.principal = ident.principal if ident else None
        self.namespace = ident.namespace if ident else None
        self.remote_ip = req.remote_ip or req.source_ip

    def source(self, s: Source) -> bool:
        r = self.req
        return ((s.principals is None or _any_str(s.principals, self.principal))
                and (s.not_principals is None or not _any_str(s.not_principals, self.principal))
                and (s.namespaces is None or _any_str(s.namespaces, self.namespace))
                and (s.not_namespaces is None or not _any_str(s.not_namespaces, self.namespace))
                and (s.ip_blocks is None or _in(s.ip_blocks, r.source_ip))
                and (s.not_ip_blocks is None or not _in(s.not_ip_blocks, r.source_ip))
                and (s.remote_ip_blocks is None or _in(s.remote_ip_blocks, self.remote_ip))
                and (s.not_remote_ip_blocks is None or not _in(s.not_remote_ip_blocks, self.remote_ip))
                and (s.request_principals is None and s.not_request_principals is None or self.assume))

    def operation(self, o: Operation) -> bool:
        r = self.req
        return ((o.ports is None or r.destination_port in o.ports)
                and (o.not_ports is None or r.destination_port not in o.not_ports)
                and (o.methods is None or any(StringMatch.parse(m).matches(r.method) for m in o.methods))
                and (o.not_methods is None or not any(StringMatch.parse(m).matches(r.method) for m in o.not_methods))
                and (o.paths is None or any(_path_matches(p, r.path) for p in o.paths))
                and (o.not_paths is None or not any(_path_matches(p, r.path) for p in o.not_paths))
                and (o.hosts is None or any(_host_matches(h, r.host) for h in o.hosts))
                and (o.not_hosts is None or not any(_host_matches(h, r.host) for h in o.not_hosts)))

    def _value(self, key: str, value: str) -> bool:
        """Does `key` (an `evaluable` one) have `value`? ValueError for a malformed address."""
        r = self.req
        m = _HEADER_KEY.fullmatch(key)
        if m:
            return StringMatch.parse(value).matches(r.header(m.group(1).lower()))
        if key == "source.ip":
            return r.source_ip in ip_block(value)
        if key == "remote.ip":
            return self.remote_ip in ip_block(value)
        if key == "destination.ip":
            return r.destination_ip in ip_block(value)
        if key == "destination.port":
            return str(r.destination_port) == value
        if key == "source.namespace":
            return StringMatch.parse(value).matches(self.namespace)
        if key == "source.principal":
            return StringMatch.parse(value).matches(self.principal)
        raise AssertionError(f"not evaluable: {key}")

    def condition(self, c: Condition) -> bool:
        if not evaluable(c.key):
            return self.assume
        hit = lambda vs: any(self._value(c.key, v) for v in vs)  # noqa: E731
        try:
            return ((c.values is None or hit(c.values))
                    and (c.not_values is None or not hit(c.not_values)))
        except ValueError:
            return self.assume  # the config edge validates L4 keys only: a bad remote.ip fails closed

    def rule(self, rule: Rule) -> bool:
        return ((not rule.sources or any(self.source(s) for s in rule.sources))
                and (not rule.operations or any(self.operation(o) for o in rule.operations))
                and all(self.condition(c) for c in rule.conditions)
                and all(self.condition(c) for c in rule.l7_conditions))


def evaluable(key: str) -> bool:
    """Whether the waypoint can evaluate a `when` key (JWT and SNI keys it cannot)."""
    return key in ("source.ip", "remote.ip", "destination.ip", "destination.port", "source.namespace",
                   "source.principal") or _HEADER_KEY.fullmatch(key) is not None


def _unevaluable(p: AuthorizationPolicy) -> tuple[str, ...]:
    out = []
    for i, rule in enumerate(p.rules):
        for j, s in enumerate(rule.sources):
            for name, v in (("requestPrincipals", s.request_principals),
                            ("notRequestPrincipals", s.not_request_principals)):
                if v is not None:
                    out.append(f"{p.namespace}/{p.name}: rules[{i}].from[{j}].source.{name}")
        for c in (*rule.conditions, *rule.l7_conditions):
            if not evaluable(c.key):
                out.append(f"{p.namespace}/{p.name}: rules[{i}].when {c.key}")
    return tuple(out)


def _matching_rule(p: AuthorizationPolicy, req: Request) -> int | None:
    ev = _Eval(req, assume=p.action is not Action.ALLOW)
    for i, rule in enumerate(p.rules):
        if ev.rule(rule):
            return i
    return None


def _name(p: AuthorizationPolicy) -> str:
    return f"{p.namespace}/{p.name}"


def _rbac_denied(details_id: str) -> LocalReply:
    return LocalReply(status=403, body=RBAC_DENIED_BODY, response_flags="-",
                      details=f"rbac_access_denied_matched_policy[{details_id}]")


_EXT_AUTHZ_FAILED = LocalReply(status=403, body=b"", response_flags="UAEX", details="ext_authz_error")


def _decide(policies: Sequence[AuthorizationPolicy], req: Request, failed: tuple[str, ...]) -> Decision:
    for p in policies:
        if p.action is Action.CUSTOM and (i := _matching_rule(p, req)) is not None:
            provider = p.provider or "(none named)"
            return Decision(allowed=False, reason=Reason.CUSTOM_UNSUPPORTED, policy=_name(p), rule=i,
                            reply=_EXT_AUTHZ_FAILED, failed_closed=failed,
                            message=f"CUSTOM policy {_name(p)} matched: external authorization (provider "
                                    f"{provider}) is not supported by this mesh, so the request is denied")
    audited = tuple(_name(p) for p in policies
                    if p.action is Action.AUDIT and _matching_rule(p, req) is not None)
    for p in policies:
        if p.action is Action.DENY and (i := _matching_rule(p, req)) is not None:
            return Decision(allowed=False, reason=Reason.DENIED_BY_POLICY, policy=_name(p), rule=i,
                            reply=_rbac_denied(f"ns[{p.namespace}]-policy[{p.name}]-rule[{i}]"),
                            audited=audited, failed_closed=failed,
                            message=f"denied by DENY policy {_name(p)} rule {i}")
    allows = [p for p in policies if p.action is Action.ALLOW]
    for p in allows:
        if (i := _matching_rule(p, req)) is not None:
            return Decision(allowed=True, reason=Reason.ALLOWED, policy=_name(p), rule=i, audited=audited,
                            failed_closed=failed, message=f"allowed by ALLOW policy {_name(p)} rule {i}")
    if allows:
        return Decision(allowed=False, reason=Reason.NO_ALLOW_MATCH, reply=_rbac_denied("none"),
                        audited=audited, failed_closed=failed,
                        message=f"no rule of the ALLOW policies {', '.join(_name(p) for p in allows)} matched")
    return Decision(allowed=True, reason=Reason.ALLOWED, audited=audited, failed_closed=failed,
                    message="no ALLOW policy applies and nothing denied")


def evaluate(policies: Iterable[AuthorizationPolicy], req: Request, *, waypoint: ResourceKey) -> Decision:
    """The decision for `req` at `waypoint` (`ResourceKey("Gateway", ns, name)`)."""
    relevant = sorted((p for p in policies if applies(p, waypoint, req.service)),
                      key=lambda p: (p.namespace, p.name))
    failed = tuple(f for p in relevant for f in _unevaluable(p))
    enforced = [p for p in relevant if not p.dry_run]
    dry = [p for p in relevant if p.dry_run]
    decision = _decide(enforced, req, failed)
    if dry:
        would = _decide(enforced + [replace(p, dry_run=False) for p in dry], req, failed)
        if would.allowed != decision.allowed:
            decision = replace(decision, dry_run=tuple(_name(p) for p in dry))
    return decision
