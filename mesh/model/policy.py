"""Security policy model: Istio's AuthorizationPolicy and PeerAuthentication, typed.

Converted from YAML once (mesh/config/policy.py); enforced by ztunnel (L4 fields) and by
waypoints (L4 and L7 fields, waypoint/authz.py). A rule keeps the names of its L7 fields in
`l7_fields`: ztunnel cannot evaluate them and fails closed for that rule, as Istio does (an
ALLOW rule with them never matches; a DENY rule with them matches on its L4 part alone). The
L7 values themselves are typed too (`Operation.methods/paths/hosts`, `Source.request_principals
/remote_ip_blocks`, `Rule.l7_conditions`) for the waypoint; ztunnel never reads them, which is
why L7 `when` conditions live apart from the L4 `conditions`.
"""
from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from typing import ClassVar

from .base import FrozenMap
from .resources import Resource

__all__ = [
    "ROOT_NAMESPACE", "Action", "MatchKind", "StringMatch", "Source", "Operation", "Condition",
    "Rule", "TargetRef", "ip_block", "AuthorizationPolicy", "MtlsMode", "PeerAuthentication", "L4_CONDITION_KEYS",
]

ROOT_NAMESPACE = "istio-system"
"""Policies here apply mesh-wide (Istio's default root namespace)."""

L4_CONDITION_KEYS = frozenset({"source.ip", "source.namespace", "source.principal",
                               "destination.ip", "destination.port"})


class Action(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    """Only with targetRefs (waypoint): a match is reported, never decides."""
    CUSTOM = "CUSTOM"
    """Only with targetRefs (waypoint): external authorization, not supported, fails closed."""


class MatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    """`abc*`"""
    SUFFIX = "suffix"
    """`*abc`"""
    PRESENCE = "presence"
    """`*`: any non-empty value."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StringMatch:
    """Istio's string match: exact, `prefix*`, `*suffix` or `*`."""

    kind: MatchKind
    value: str = ""

    @classmethod
    def parse(cls, s: str) -> StringMatch:
        if s == "*":
            return cls(kind=MatchKind.PRESENCE)
        if s.endswith("*"):
            return cls(kind=MatchKind.PREFIX, value=s[:-1])
        if s.startswith("*"):
            return cls(kind=MatchKind.SUFFIX, value=s[1:])
        return cls(kind=MatchKind.EXACT, value=s)

    def matches(self, s: str | None) -> bool:
        if not s:
            return False
        k = self.kind
        if k is MatchKind.EXACT:
            return s == self.value
        if k is MatchKind.PREFIX:
            return s.startswith(self.value)
        if k is MatchKind.SUFFIX:
            return s.endswith(self.value)
        return True


Networks = tuple[ipaddress.IPv4Network, ...]


def ip_block(s: str) -> ipaddress.IPv4Network:
    """An ipBlocks / source.ip value: an IPv4 address or CIDR (host bits allowed, as Istio's).
    Raises ValueError."""
    return ipaddress.IPv4Network(s if "/" in s else f"{s}/32", strict=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Source:
    """`rules[].from[].source`: every set field must match (None = not set)."""

    principals: tuple[StringMatch, ...] | None = None
    not_principals: tuple[StringMatch, ...] | None = None
    namespaces: tuple[StringMatch, ...] | None = None
    not_namespaces: tuple[StringMatch, ...] | None = None
    ip_blocks: Networks | None = None
    not_ip_blocks: Networks | None = None
    request_principals: tuple[StringMatch, ...] | None = None
    """L7 (JWT `iss/sub`): needs RequestAuthentication, which the mesh does not have."""
    not_request_principals: tuple[StringMatch, ...] | None = None
    remote_ip_blocks: Networks | None = None
    """L7: the originating client address (the direct peer unless a trusted hop says otherwise)."""
    not_remote_ip_blocks: Networks | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Operation:
    """`rules[].to[].operation`: every set field must match. Ports are L4; the rest are L7,
    kept as written (`*` forms, path templates) for the waypoint to compile."""

    ports: tuple[int, ...] | None = None
    not_ports: tuple[int, ...] | None = None
    hosts: tuple[str, ...] | None = None
    not_hosts: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None
    not_methods: tuple[str, ...] | None = None
    paths: tuple[str, ...] | None = None
    not_paths: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Condition:
    """`rules[].when[]`: `key` matches one of `values` and none of `not_values`."""

    key: str
    values: tuple[str, ...] | None = None
    not_values: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """Matches when any `sources`, any `operations` and all `conditions` match (empty = any)."""

    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()
    conditions: tuple[Condition, ...] = ()
    l7_fields: tuple[str, ...] = ()
    """Fields only an L7 proxy can evaluate (e.g. `to[0].operation.methods`)."""
    l7_conditions: tuple[Condition, ...] = ()
    """`when` entries whose key is not an L4 key (request.headers[...], request.auth.*, ...)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetRef:
    group: str = ""
    kind: str
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthorizationPolicy(Resource):
    kind: ClassVar[str] = "AuthorizationPolicy"
    action: Action = Action.ALLOW
    selector: FrozenMap | None = None
    """spec.selector.matchLabels; None = every workload of the namespace (or of the mesh)."""
    target_refs: tuple[TargetRef, ...] = ()
    """Attached to a Service or waypoint Gateway: enforced by the waypoint, not ztunnel."""
    rules: tuple[Rule, ...] = ()
    """No rules: the policy matches nothing (an ALLOW policy without rules denies all)."""
    dry_run: bool = False
    """annotation istio.io/dry-run: evaluated and logged, never enforced."""
    provider: str | None = None
    """spec.provider.name of a CUSTOM policy."""


class MtlsMode(enum.Enum):
    UNSET = "UNSET"
    DISABLE = "DISABLE"
    PERMISSIVE = "PERMISSIVE"
    STRICT = "STRICT"


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerAuthentication(Resource):
    kind: ClassVar[str] = "PeerAuthentication"
    selector: FrozenMap | None = None
    mode: MtlsMode = MtlsMode.UNSET
    port_modes: tuple[tuple[int, MtlsMode], ...] = field(default=())
    """spec.portLevelMtls (only with a selector), by workload port."""
