"""A proxy's view of the mesh: workloads, services, namespaces and policies, with indexes.

Filled only by the control-plane client (snapshot, then deltas); read by proxies through the
lookups below. Pure data, no I/O: the client owns the connection, this owns the state.

Theory of operation: every change goes through `_put`/`_drop`, which keep each index current for
that one object, so a delta costs O(objects in it) index work (plus a memmove of a sorted list),
never a rebuild. Lookups read the indexes and never sort:

  - each kind is kept in its listing order (`_Sorted`); the list methods copy it;
  - workloads by IP / node, services by VIP, each address also by its text (an address claimed
    twice resolves to the greatest uid, as the full rebuild this replaces did);
  - AuthorizationPolicies and PeerAuthentications by namespace, then by one label of their
    selector (`_SelectorIndex`), so the policies that apply to a workload are found from its
    namespace, the root namespace and its own labels; `policies_for` memoises the answer per
    (namespace, labels) until a policy of that namespace (or of the root namespace) changes.

The applicability rules mirror ztunnel.authz (`applies`, `effective_mtls`); the property tests in
tests/unit/test_state_index.py hold the two together.
"""
from __future__ import annotations

import ipaddress
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Generic, TypeVar

from .distribution.protocol import Delta, Snapshot, resource_ref
from .model import FrozenMap, Namespace, PolicyObject, ServiceInfo, Workload
from .model.policy import ROOT_NAMESPACE, AuthorizationPolicy, PeerAuthentication
from .model.route import DestinationRule, HTTPRoute, VirtualService
from .model.telemetry import MESH_CONFIG_NAME, MeshConfig, Telemetry
from .model.workload import Waypoint

__all__ = ["ProxyState", "StateVersionError", "WorkloadPolicies"]

T = TypeVar("T")
IP = ipaddress.IPv4Address


class StateVersionError(Exception):
    """A delta that does not follow the state's version (the client must resync)."""

    reason = "state_version_gap"


@dataclass(frozen=True, slots=True)
class WorkloadPolicies:
    """The security policies that apply to one workload, each sorted by (namespace, name).

    Exactly the members of `authorization_policies()` / `peer_authentications()` that
    ztunnel.authz would keep for this workload, in the same order, so `evaluate` over these
    decides (and names the deciding policy) as it does over all of them.
    """

    authorization: tuple[AuthorizationPolicy, ...]
    """Mesh-wide (root namespace), namespace-wide and selecting policies; none with targetRefs."""
    peer_authentications: tuple[PeerAuthentication, ...]
    """Selecting and namespace-wide ones of the workload's namespace; root ones without selector."""


class _Sorted(Generic[T]):
    """Objects of one kind by uid, also kept in listing order (sorted on insert, not on read)."""

    __slots__ = ("by_uid", "_keys", "_items", "_key")

    def __init__(self, key: Callable[[T], Any], by_uid: dict[str, T] | None = None,
                 ordered: bool = False) -> None:
        """`by_uid` (taken over, not copied) is sorted once (unless already `ordered`): how a
        snapshot loads."""
        self.by_uid: dict[str, T] = by_uid if by_uid is not None else {}
        items = list(self.by_uid.values())
        if not ordered:
            items.sort(key=key)  # stable: equal keys (not expected) keep arrival order
        self._items: list[T] = items
        self._keys: list[Any] = [key(o) for o in items]
        self._key = key

    def put(self, uid: str, obj: T) -> None:
        self.pop(uid)
        self.by_uid[uid] = obj
        k = self._key(obj)
        i = bisect_right(self._keys, k)  # after equal keys, as a stable sort would place it
        self._keys.insert(i, k)
        self._items.insert(i, obj)

    def pop(self, uid: str) -> T | None:
        obj = self.by_uid.pop(uid, None)
        if obj is not None:
            i = bisect_left(self._keys, self._key(obj))
            while self._items[i] is not obj:  # past other objects with an equal key
                i += 1
            del self._keys[i], self._items[i]
        return obj

    def items(self) -> list[T]:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)


_uid = attrgetter("uid")


def _by_name(o: Any) -> tuple[str, str]:
    return (o.namespace, o.name)


_KINDS: dict[str, Callable[[Any], Any]] = {
    "Workload": attrgetter("uid"),
    "Service": attrgetter("uid"),
    "Namespace": attrgetter("name"),
    "Policy": lambda p: (p.key.kind, p.namespace, p.name),
    "AuthorizationPolicy": _by_name,
    "PeerAuthentication": _by_name,
    "HTTPRoute": _by_name,
    "VirtualService": _by_name,
    "DestinationRule": _by_name,
    "Waypoint": _by_name,
    "Telemetry": _by_name,
    "MeshConfig": _by_name,
}


def _text(ip: IP) -> str:
    """str(ip), three times faster (a snapshot formats every address)."""
    return "%d.%d.%d.%d" % tuple(ip.packed)


class _Claims(Generic[T]):
    """Address -> object, by IPv4Address and by its text. Two objects may claim one address for a
    while (a pod replaced by one that reuses its IP, in separate deltas): the greatest uid wins,
    as in a full rebuild, and the other claims are kept (in `_contested`, only for such
    addresses) to take over on removal."""

    __slots__ = ("winner", "by_text", "_contested", "_uid")

    def __init__(self, uid: Callable[[T], str], ordered: list[T] | None = None,
                 addr: Callable[[T], IP] | None = None) -> None:
        """`ordered` (by uid) with `addr` loads a snapshot in one pass."""
        self._uid = uid
        self.winner: dict[IP, T] = {}
        self.by_text: dict[str, T] = {}
        """The same, keyed by str(address): what capture hands over, looked up without parsing."""
        self._contested: dict[IP, dict[str, T]] = {}
        if ordered and addr is not None:
            self.winner = {addr(o): o for o in ordered}
            self.by_text = {"%d.%d.%d.%d" % tuple(ip.packed): o for ip, o in self.winner.items()}
            if len(self.winner) < len(ordered):
                for o in ordered:
                    if self.winner[addr(o)] is not o:
                        self._contested.setdefault(addr(o), {})[uid(o)] = o
                for ip, claims in self._contested.items():
                    claims[uid(self.winner[ip])] = self.winner[ip]

    def _set(self, ip: IP, obj: T) -> None:
        self.winner[ip] = obj
        self.by_text[_text(ip)] = obj

    def add(self, ip: IP, uid: str, obj: T) -> None:
        claims = self._contested.get(ip)
        if claims is None:
            cur = self.winner.get(ip)
            if cur is None or self._uid(cur) == uid:
                self._set(ip, obj)
                return
            claims = self._contested[ip] = {self._uid(cur): cur}
        claims[uid] = obj
        self._set(ip, claims[max(claims)])

    def remove(self, ip: IP, uid: str) -> None:
        claims = self._contested.get(ip)
        if claims is None:
            cur = self.winner.get(ip)
            if cur is not None and self._uid(cur) == uid:
                del self.winner[ip], self.by_text[_text(ip)]
            return
        if claims.pop(uid, None) is None:
            return
        self._set(ip, claims[max(claims)])
        if len(claims) == 1:
            del self._contested[ip]


class _SelectorIndex(Generic[T]):
    """Policies of one kind by namespace: without selector, with an empty one, and by one
    (key, value) of their selector, so a workload's candidates come from its own labels."""

    __slots__ = ("unselected", "select_all", "by_label")

    def __init__(self) -> None:
        self.unselected: dict[str, dict[str, T]] = {}
        self.select_all: dict[str, dict[str, T]] = {}
        self.by_label: dict[str, dict[tuple[str, Any], dict[str, T]]] = {}

    def _bucket(self, ns: str, selector: FrozenMap | None, create: bool) -> dict[str, T] | None:
        if selector is None:
            top: Any = self.unselected
        elif not selector:
            top = self.select_all
        else:
            by = self.by_label.get(ns) if not create else self.by_label.setdefault(ns, {})
            if by is None:
                return None
            k = min(selector.items())
            return by.setdefault(k, {}) if create else by.get(k)
        return top.setdefault(ns, {}) if create else top.get(ns)

    def add(self, p: Any) -> None:
        self._bucket(p.namespace, p.selector, True)[p.name] = p  # type: ignore[index]

    def remove(self, p: Any) -> None:
        bucket = self._bucket(p.namespace, p.selector, False)
        if bucket is not None:
            bucket.pop(p.name, None)

    def unselected_in(self, ns: str) -> Iterator[T]:
        yield from self.unselected.get(ns, {}).values()

    def selecting(self, ns: str, labels: FrozenMap) -> Iterator[T]:
        """Every policy of `ns` whose selector (None, empty or matchLabels) selects `labels`."""
        yield from self.unselected.get(ns, {}).values()
        yield from self.select_all.get(ns, {}).values()
        by = self.by_label.get(ns)
        if by:
            for item in labels.items():
                for p in by.get(item, {}).values():
                    if all(labels.get(k) == v for k, v in p.selector.items()):  # type: ignore[attr-defined]
                        yield p


class ProxyState:
    """Everything a proxy knows, keyed by (wire type, uid), plus lookup indexes."""

    def __init__(self) -> None:
        self.version = 0
        """Version of the last snapshot or delta applied; 0 = nothing received yet."""
        self.synced = False
        self._reset()

    def _reset(self, resources: tuple[Any, ...] = ()) -> None:
        # A snapshot loads kind by kind in whole-collection passes (one sort per list), not
        # through _put: the same indexes, built several times faster.
        by_kind: dict[str, dict[str, Any]] = {k: {} for k in _KINDS}
        for r in resources:  # a uid given twice: the later object wins, as a delta would
            kind, uid = resource_ref(r)
            by_kind[kind][uid] = r
        self._kinds: dict[str, _Sorted[Any]] = {k: _Sorted(_KINDS[k], d) for k, d in by_kind.items()}
        workloads: list[Workload] = self._kinds["Workload"].items()
        self._by_ip: _Claims[Workload] = _Claims(_uid, workloads, attrgetter("ip"))
        self._by_vip: _Claims[ServiceInfo] = _Claims(_uid, self._kinds["Service"].items(), attrgetter("vip"))
        nodes: dict[str, dict[str, Workload]] = {}
        for w in workloads:
            nodes.setdefault(w.node, {})[w.uid] = w
        self._by_node: dict[str, _Sorted[Workload]] = {
            n: _Sorted(_KINDS["Workload"], d, ordered=True) for n, d in nodes.items()}
        self._authz: _SelectorIndex[AuthorizationPolicy] = _SelectorIndex()
        for p in by_kind["AuthorizationPolicy"].values():
            if not p.target_refs:
                self._authz.add(p)
        self._peer: _SelectorIndex[PeerAuthentication] = _SelectorIndex()
        for p in by_kind["PeerAuthentication"].values():
            self._peer.add(p)
        self._for: dict[str, dict[FrozenMap, WorkloadPolicies]] = {}
        self._for_size = 0

    # -- updates (from the control-plane client) --

    def apply_snapshot(self, snap: Snapshot) -> None:
        self._reset(snap.resources)
        self.version = snap.version
        self.synced = True

    def apply_delta(self, delta: Delta) -> None:
        if not self.synced or delta.version <= self.version:
            raise StateVersionError(f"delta {delta.version} does not follow state {self.version}")
        for kind, uid in delta.removals:
            self._drop(kind, uid)
        for r in delta.upserts:
            self._put(r)
        self.version = delta.version

    def _put(self, obj: Any) -> None:
        kind, uid = resource_ref(obj)
        self._drop(kind, uid)
        self._kinds[kind].put(uid, obj)
        if kind == "Workload":
            self._by_ip.add(obj.ip, uid, obj)
            on = self._by_node.get(obj.node)
            if on is None:
                on = self._by_node[obj.node] = _Sorted(_KINDS["Workload"])
            on.put(uid, obj)
        elif kind == "Service":
            self._by_vip.add(obj.vip, uid, obj)
        elif kind == "AuthorizationPolicy":
            if not obj.target_refs:  # a waypoint's policy: never ztunnel's
                self._authz.add(obj)
            self._policies_changed(obj.namespace)
        elif kind == "PeerAuthentication":
            self._peer.add(obj)
            self._policies_changed(obj.namespace)

    def _drop(self, kind: str, uid: str) -> None:
        store = self._kinds.get(kind)
        old = store.pop(uid) if store is not None else None
        if old is None:
            return
        if kind == "Workload":
            self._by_ip.remove(old.ip, uid)
            node = self._by_node[old.node]
            node.pop(uid)
            if not node:
                del self._by_node[old.node]
        elif kind == "Service":
            self._by_vip.remove(old.vip, uid)
        elif kind == "AuthorizationPolicy":
            self._authz.remove(old)
            self._policies_changed(old.namespace)
        elif kind == "PeerAuthentication":
            self._peer.remove(old)
            self._policies_changed(old.namespace)

    def _policies_changed(self, ns: str) -> None:
        if ns == ROOT_NAMESPACE:
            self._for.clear()
            self._for_size = 0
        else:
            self._for_size -= len(self._for.pop(ns, ()))

    # -- lookups --

    def workloads(self) -> list[Workload]:
        return self._kinds["Workload"].items()

    def services(self) -> list[ServiceInfo]:
        return self._kinds["Service"].items()

    def namespaces(self) -> list[Namespace]:
        return self._kinds["Namespace"].items()

    def policies(self) -> list[PolicyObject]:
        return self._kinds["Policy"].items()

    def authorization_policies(self) -> list[AuthorizationPolicy]:
        return self._kinds["AuthorizationPolicy"].items()

    def peer_authentications(self) -> list[PeerAuthentication]:
        return self._kinds["PeerAuthentication"].items()

    def waypoints(self) -> list[Waypoint]:
        """The mesh's waypoints (istio-waypoint Gateways), sorted by namespace/name."""
        return self._kinds["Waypoint"].items()

    def waypoint(self, namespace: str, name: str) -> Waypoint | None:
        return self._kinds["Waypoint"].by_uid.get(f"{namespace}/{name}")

    def http_routes(self) -> list[HTTPRoute]:
        """Sorted by namespace/name: the tie-break Gateway API precedence falls back to."""
        return self._kinds["HTTPRoute"].items()

    def virtual_services(self) -> list[VirtualService]:
        return self._kinds["VirtualService"].items()

    def destination_rules(self) -> list[DestinationRule]:
        return self._kinds["DestinationRule"].items()

    def telemetries(self) -> list[Telemetry]:
        return self._kinds["Telemetry"].items()

    def mesh_config(self) -> MeshConfig | None:
        """The mesh config (ConfigMap istio-system/istio), None when there is none."""
        return self._kinds["MeshConfig"].by_uid.get(f"{ROOT_NAMESPACE}/{MESH_CONFIG_NAME}")

    def workload(self, uid: str) -> Workload | None:
        return self._kinds["Workload"].by_uid.get(uid)

    def workload_by_ip(self, ip: ipaddress.IPv4Address) -> Workload | None:
        return self._by_ip.winner.get(ip)

    def workload_at(self, ip: str) -> Workload | None:
        """`workload_by_ip` by the address' text (`str(IPv4Address)`, as capture and peername give
        it), without parsing it; any other spelling finds nothing."""
        return self._by_ip.by_text.get(ip)

    def service(self, uid: str) -> ServiceInfo | None:
        """By `<namespace>/<name>`."""
        return self._kinds["Service"].by_uid.get(uid)

    def service_by_vip(self, ip: ipaddress.IPv4Address) -> ServiceInfo | None:
        return self._by_vip.winner.get(ip)

    def service_at(self, ip: str) -> ServiceInfo | None:
        """`service_by_vip` by the address' text, like `workload_at`."""
        return self._by_vip.by_text.get(ip)

    def namespace(self, name: str) -> Namespace | None:
        return self._kinds["Namespace"].by_uid.get(name)

    def workloads_on_node(self, node: str) -> list[Workload]:
        """Sorted by uid."""
        on = self._by_node.get(node)
        return on.items() if on is not None else []

    def policies_for(self, workload: Workload) -> WorkloadPolicies:
        """The AuthorizationPolicies and PeerAuthentications that apply to `workload`.

        Costs a dict lookup once computed for the workload's (namespace, labels); the first
        lookup after a change of a policy in its namespace or the root namespace costs
        O(applicable + its labels), never O(all policies).
        """
        ns, labels = workload.namespace, workload.labels
        per_ns = self._for.get(ns)
        if per_ns is not None:
            hit = per_ns.get(labels)
            if hit is not None:
                return hit
        found = self._compute_policies_for(ns, labels)
        if self._for_size >= max(4096, 2 * len(self._kinds["Workload"])):
            # Label sets of pods long gone (each rollout brings a new pod-template-hash).
            self._for.clear()
            self._for_size = 0
        self._for.setdefault(ns, {})[labels] = found
        self._for_size += 1
        return found

    def _compute_policies_for(self, ns: str, labels: FrozenMap) -> WorkloadPolicies:
        # ztunnel.authz.applies: root-namespace and own-namespace policies whose selector selects.
        aps = list(self._authz.selecting(ns, labels))
        # ztunnel.authz.effective_mtls: own namespace, selecting or namespace-wide; root, only
        # without a selector (a root PeerAuthentication with one selects nothing elsewhere).
        pas = list(self._peer.selecting(ns, labels))
        if ns != ROOT_NAMESPACE:
            aps += self._authz.selecting(ROOT_NAMESPACE, labels)
            pas += self._peer.unselected_in(ROOT_NAMESPACE)
        aps.sort(key=_by_name)
        pas.sort(key=_by_name)
        return WorkloadPolicies(tuple(aps), tuple(pas))
