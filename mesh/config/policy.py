"""YAML -> AuthorizationPolicy / PeerAuthentication (security.istio.io), with Istio's rules.

Unknown fields are errors here (unlike core kinds): a typo in a security policy must not
silently widen or narrow what it allows.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from ..model import FrozenMap, ObjectMeta
from ..model.policy import (L4_CONDITION_KEYS, Action, AuthorizationPolicy, Condition, MtlsMode,
                            Operation, PeerAuthentication, Rule, Source, StringMatch, TargetRef, ip_block)
from .source import Ctx, Path, describe, get_list, get_map, get_str, get_str_list

__all__ = ["authorization_policy", "peer_authentication"]

_SOURCE_L4 = {"principals", "notPrincipals", "namespaces", "notNamespaces", "ipBlocks", "notIpBlocks"}
_SOURCE_L7 = {"requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks"}
_OP_L4 = {"ports", "notPorts"}
_OP_L7 = {"hosts", "notHosts", "methods", "notMethods", "paths", "notPaths"}
_SNAKE = {"hosts": "hosts", "notHosts": "not_hosts", "methods": "methods", "notMethods": "not_methods",
          "paths": "paths", "notPaths": "not_paths"}


def _known(ctx: Ctx, m: Mapping[Any, Any], path: Path, allowed: set[str]) -> None:
    for k in m:
        if k not in allowed:
            ctx.error(path + (str(k),), f"unknown field; expected one of {', '.join(sorted(allowed))}",
                      "unknown_field")


def _matches(ctx: Ctx, m: Mapping[Any, Any], path: Path) -> tuple[StringMatch, ...] | None:
    v = get_str_list(ctx, m, path)
    if path[-1] not in m:
        return None
    if not v:
        ctx.fail(path, "must not be empty (leave the field out to match anything)")
    return tuple(StringMatch.parse(s) for s in v)


def _strs(ctx: Ctx, m: Mapping[Any, Any], path: Path) -> tuple[str, ...]:
    v = get_str_list(ctx, m, path)
    if not v:
        ctx.fail(path, "must not be empty (leave the field out to match anything)")
    return tuple(v)


def _blocks(ctx: Ctx, m: Mapping[Any, Any], path: Path) -> tuple[ipaddress.IPv4Network, ...] | None:
    if path[-1] not in m:
        return None
    out = []
    for i, s in enumerate(get_str_list(ctx, m, path)):
        try:
            out.append(ip_block(s))
        except ValueError:
            ctx.fail(path + (i,), f"must be an IPv4 address or CIDR, got {describe(s)}")
    if not out:
        ctx.fail(path, "must not be empty (leave the field out to match anything)")
    return tuple(out)


def _ports(ctx: Ctx, m: Mapping[Any, Any], path: Path) -> tuple[int, ...] | None:
    if path[-1] not in m:
        return None
    out = []
    for i, s in enumerate(get_list(ctx, m, path, required=True)):
        # Istio's ports are strings ("8080"); accept numbers too, as YAML users write them.
        n = s if isinstance(s, int) and not isinstance(s, bool) else int(s) if isinstance(s, str) and s.isdigit() else None
        if n is None or not 1 <= n <= 65535:
            ctx.fail(path + (i,), f"must be a port number (1-65535), got {describe(s)}")
        out.append(n)
    return tuple(out)


def _rule(ctx: Ctx, r: Any, path: Path) -> Rule:
    if not isinstance(r, Mapping):
        ctx.fail(path, f"must be a mapping, got {describe(r)}")
    _known(ctx, r, path, {"from", "to", "when"})
    l7: list[str] = []
    sources = []
    for i, f in enumerate(get_list(ctx, r, path + ("from",))):
        fp = path + ("from", i)
        if not isinstance(f, Mapping):
            ctx.fail(fp, f"must be a mapping, got {describe(f)}")
        _known(ctx, f, fp, {"source"})
        src = get_map(ctx, f, fp + ("source",), required=True)
        sp = fp + ("source",)
        _known(ctx, src, sp, _SOURCE_L4 | _SOURCE_L7)
        l7 += [f"from[{i}].source.{k}" for k in src if k in _SOURCE_L7]
        sources.append(Source(
            principals=_matches(ctx, src, sp + ("principals",)),
            not_principals=_matches(ctx, src, sp + ("notPrincipals",)),
            namespaces=_matches(ctx, src, sp + ("namespaces",)),
            not_namespaces=_matches(ctx, src, sp + ("notNamespaces",)),
            ip_blocks=_blocks(ctx, src, sp + ("ipBlocks",)),
            not_ip_blocks=_blocks(ctx, src, sp + ("notIpBlocks",)),
            request_principals=_matches(ctx, src, sp + ("requestPrincipals",)),
            not_request_principals=_matches(ctx, src, sp + ("notRequestPrincipals",)),
            remote_ip_blocks=_blocks(ctx, src, sp + ("remoteIpBlocks",)),
            not_remote_ip_blocks=_blocks(ctx, src, sp + ("notRemoteIpBlocks",))))
    operations = []
    for i, t in enumerate(get_list(ctx, r, path + ("to",))):
        tp = path + ("to", i)
        if not isinstance(t, Mapping):
            ctx.fail(tp, f"must be a mapping, got {describe(t)}")
        _known(ctx, t, tp, {"operation"})
        op = get_map(ctx, t, tp + ("operation",), required=True)
        opp = tp + ("operation",)
        _known(ctx, op, opp, _OP_L4 | _OP_L7)
        l7 += [f"to[{i}].operation.{k}" for k in op if k in _OP_L7]
        operations.append(Operation(ports=_ports(ctx, op, opp + ("ports",)),
                                    not_ports=_ports(ctx, op, opp + ("notPorts",)),
                                    **{_SNAKE[k]: _strs(ctx, op, opp + (k,)) for k in _OP_L7 if k in op}))
    conditions = []
    l7_conditions: list[Condition] = []
    for i, w in enumerate(get_list(ctx, r, path + ("when",))):
        wp = path + ("when", i)
        if not isinstance(w, Mapping):
            ctx.fail(wp, f"must be a mapping, got {describe(w)}")
        _known(ctx, w, wp, {"key", "values", "notValues"})
        key = get_str(ctx, w, wp + ("key",), required=True)
        values = get_str_list(ctx, w, wp + ("values",)) if "values" in w else None
        not_values = get_str_list(ctx, w, wp + ("notValues",)) if "notValues" in w else None
        if not values and not not_values:
            ctx.fail(wp, "needs values or notValues")
        if key not in L4_CONDITION_KEYS:
            l7.append(f"when[{i}].{key}")
            l7_conditions.append(Condition(key=key, values=tuple(values) if values else None,
                                           not_values=tuple(not_values) if not_values else None))
            continue
        if key in ("source.ip", "destination.ip"):
            for v in (values or ()) + (not_values or ()):
                try:
                    ip_block(v)
                except ValueError:
                    ctx.fail(wp, f"{key} values must be IPv4 addresses or CIDRs, got {describe(v)}")
        if key == "destination.port":
            for j, v in enumerate((values or ()) + (not_values or ())):
                if not v.isdigit() or not 1 <= int(v) <= 65535:
                    ctx.fail(wp, f"destination.port values must be port numbers, got {describe(v)}")
        conditions.append(Condition(key=key, values=tuple(values) if values else None,
                                    not_values=tuple(not_values) if not_values else None))
    return Rule(sources=tuple(sources), operations=tuple(operations), conditions=tuple(conditions),
                l7_fields=tuple(l7), l7_conditions=tuple(l7_conditions))


def _selector(ctx: Ctx, spec: Mapping[Any, Any]) -> FrozenMap | None:
    if "selector" not in spec:
        return None
    sel = get_map(ctx, spec, ("spec", "selector"))
    _known(ctx, sel, ("spec", "selector"), {"matchLabels"})
    labels = get_map(ctx, sel, ("spec", "selector", "matchLabels"))
    for k, v in labels.items():
        if not isinstance(v, str):
            ctx.fail(("spec", "selector", "matchLabels", str(k)), f"must be a string, got {describe(v)}")
    return FrozenMap({str(k): v for k, v in labels.items()})


def authorization_policy(ctx: Ctx, obj: Mapping[Any, Any], meta: ObjectMeta) -> AuthorizationPolicy:
    spec = get_map(ctx, obj, ("spec",))
    _known(ctx, spec, ("spec",), {"selector", "targetRef", "targetRefs", "action", "rules", "provider"})
    action_s = get_str(ctx, spec, ("spec", "action")) or "ALLOW"
    waypoint_bound = "targetRef" in spec or "targetRefs" in spec
    if action_s in ("CUSTOM", "AUDIT") and not waypoint_bound:
        # ztunnel enforces selector policies and has no use for either; a waypoint (targetRefs)
        # reports AUDIT matches and fails CUSTOM closed.
        ctx.fail(("spec", "action"), f"{action_s} is not supported (ALLOW or DENY; {action_s} only "
                 "with targetRefs, at a waypoint)", "unsupported")
    if action_s not in ("ALLOW", "DENY", "AUDIT", "CUSTOM"):
        ctx.fail(("spec", "action"), f"must be ALLOW or DENY, got {describe(action_s)}")
    refs = []
    raw_refs = ([spec["targetRef"]] if "targetRef" in spec else []) + get_list(ctx, spec, ("spec", "targetRefs"))
    for i, ref in enumerate(raw_refs):
        rp = ("spec", "targetRefs", i)
        if not isinstance(ref, Mapping):
            ctx.fail(rp, f"must be a mapping, got {describe(ref)}")
        refs.append(TargetRef(group=get_str(ctx, ref, rp + ("group",)) or "",
                              kind=get_str(ctx, ref, rp + ("kind",), required=True) or "",
                              name=get_str(ctx, ref, rp + ("name",), required=True) or ""))
    selector = _selector(ctx, spec)
    if selector is not None and refs:
        ctx.fail(("spec", "selector"), "selector and targetRefs are mutually exclusive")
    rules = tuple(_rule(ctx, r, ("spec", "rules", i)) for i, r in enumerate(get_list(ctx, spec, ("spec", "rules"))))
    dry = meta.annotations.get("istio.io/dry-run", "false")
    provider = get_map(ctx, spec, ("spec", "provider"))
    _known(ctx, provider, ("spec", "provider"), {"name"})
    return AuthorizationPolicy(meta=meta, action=Action(action_s), selector=selector, target_refs=tuple(refs),
                               rules=rules, dry_run=dry == "true",
                               provider=get_str(ctx, provider, ("spec", "provider", "name")) or None)


def _mode(ctx: Ctx, m: Mapping[Any, Any], path: Path) -> MtlsMode:
    s = get_str(ctx, m, path) or "UNSET"
    try:
        return MtlsMode(s)
    except ValueError:
        ctx.fail(path, f"must be one of UNSET, DISABLE, PERMISSIVE, STRICT; got {describe(s)}")


def peer_authentication(ctx: Ctx, obj: Mapping[Any, Any], meta: ObjectMeta) -> PeerAuthentication:
    spec = get_map(ctx, obj, ("spec",))
    _known(ctx, spec, ("spec",), {"selector", "mtls", "portLevelMtls"})
    mtls = get_map(ctx, spec, ("spec", "mtls"))
    _known(ctx, mtls, ("spec", "mtls"), {"mode"})
    mode = _mode(ctx, mtls, ("spec", "mtls", "mode"))
    selector = _selector(ctx, spec)
    ports = []
    plm = get_map(ctx, spec, ("spec", "portLevelMtls"))
    if plm and selector is None:
        ctx.fail(("spec", "portLevelMtls"), "needs a selector (Istio applies port-level mTLS per workload)")
    for k, v in plm.items():
        pp = ("spec", "portLevelMtls", str(k))
        port = int(k) if isinstance(k, int) or (isinstance(k, str) and k.isdigit()) else 0
        if not 1 <= port <= 65535:
            ctx.fail(pp, f"must be keyed by port number, got {describe(k)}")
        if not isinstance(v, Mapping):
            ctx.fail(pp, f"must be a mapping with a mode, got {describe(v)}")
        ports.append((port, _mode(ctx, v, pp + ("mode",))))
    return PeerAuthentication(meta=meta, selector=selector, mode=mode, port_modes=tuple(sorted(ports)))
