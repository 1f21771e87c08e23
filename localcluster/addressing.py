"""Address planning for the local cluster: pure bookkeeping, no I/O.

Default plan (:class:`AddressPlan`)::

    node network   172.30.0.0/24   the fabric bridge's L2 segment; node i (0-based index) is
                                   172.30.0.(i+2); .0, .1 (kept back, nothing owns it) and
                                   .255 are never handed out -> at most 253 nodes
    pod network    10.244.0.0/16   one /24 per node, the lowest free /24 in node order
                                   (node 0 -> 10.244.0.0/24, node 1 -> 10.244.1.0/24, ...),
                                   unless the Node pins spec.podCIDR (any prefix /16../30 that
                                   lies inside the pod network and overlaps no other node)
    node pod CIDR  x.y.z.0/24      .1 is the node's cni0 gateway; pods get .2 .. .254; network
                                   and broadcast are never used; a pinned status.podIP must lie
                                   in that usable range of its node's CIDR
    services       10.96.0.0/16    cluster VIPs from 10.96.0.10 upwards (.0-.9 are kept back,
                                   like Kubernetes' reserved low addresses); a pinned
                                   spec.clusterIP may be any host address of the range

Allocation is explicit: :class:`ClusterAddressing` hands addresses to *owners* (node names,
pod keys, service keys) and takes them back with ``release_*``.  An address is never given to
a second owner while the first still holds it.  Asking again for an owner that already holds
an address returns the same address (so re-reconciling is harmless).  Pods and services use
next-fit (the search resumes after the last allocation), so a freed IP is not reused at once:
a recycled pod IP would otherwise meet stale connections and peer caches.
Nodes use lowest-free, so node i keeps getting the same IP and CIDR across rebuilds.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

__all__ = [
    "AddressError", "PoolExhausted", "AddressInUse", "AddressPlan", "NodeAddress",
    "AddressPool", "ClusterAddressing", "gateway_of", "pod_ip_bounds", "check_pod_ip", "bridge_mac",
]


class AddressError(ValueError):
    """An address request cannot be satisfied (out of range, conflicting pin, bad plan)."""


class PoolExhausted(AddressError):
    """No free address or subnet is left."""


class AddressInUse(AddressError):
    """The requested (pinned) address or subnet belongs to another owner."""


def _net(v: IPv4Network | str) -> IPv4Network:
    try:
        n = ipaddress.ip_network(v, strict=True) if isinstance(v, str) else v
    except ValueError as e:
        raise AddressError(f"bad network {v!r}: {e}") from None
    if not isinstance(n, IPv4Network):
        raise AddressError(f"not an IPv4 network: {v!r}")
    return n


def _addr(v: IPv4Address | str) -> IPv4Address:
    try:
        a = ipaddress.ip_address(v) if isinstance(v, str) else v
    except ValueError as e:
        raise AddressError(f"bad address {v!r}: {e}") from None
    if not isinstance(a, IPv4Address):
        raise AddressError(f"not an IPv4 address: {v!r}")
    return a


def gateway_of(cidr: IPv4Network) -> IPv4Address:
    """The gateway of a node pod CIDR: its first host address (.1 of a /24)."""
    return cidr.network_address + 1


def bridge_mac(ip: IPv4Address | str) -> str:
    """The fixed MAC of a bridge whose address is `ip`: 0a:58 then the four address bytes (the
    CNI bridge plugin's scheme; 0x0a is locally administered, unicast).

    A Linux bridge whose MAC was never set adopts the lowest MAC of its ports, so creating or
    deleting a pod whose veth has the lowest MAC changes the gateway's MAC under every other
    pod, whose ARP entry for the gateway then points nowhere for 30 s or more (containernetworking/cni#285).
    Setting it explicitly pins it."""
    return "0a:58:" + ":".join(f"{b:02x}" for b in _addr(ip).packed)


def pod_ip_bounds(cidr: IPv4Network) -> tuple[IPv4Address, IPv4Address]:
    """First and last address a pod may get in `cidr` (skips network, gateway, broadcast)."""
    if cidr.prefixlen > 30:
        raise AddressError(f"{cidr} is too small for pods (needs /30 or larger)")
    return cidr.network_address + 2, cidr.broadcast_address - 1


def check_pod_ip(ip: IPv4Address | str, cidr: IPv4Network) -> IPv4Address:
    """Validate a pinned pod IP against its node's CIDR; returns it as IPv4Address."""
    ip = _addr(ip)
    first, last = pod_ip_bounds(cidr)
    if ip not in cidr:
        raise AddressError(f"pod IP {ip} is outside its node's pod CIDR {cidr}")
    if not first <= ip <= last:
        raise AddressError(f"pod IP {ip} is reserved in {cidr} (network, gateway {gateway_of(cidr)}"
                           " or broadcast)")
    return ip


def _check_sim_range(what: str, net: IPv4Network) -> None:
    if not net.is_private or net.is_loopback or net.is_link_local or net.is_multicast:
        raise AddressError(f"{what} {net} must be a private (RFC 1918-style) range")


@dataclass(frozen=True, slots=True)
class AddressPlan:
    """The cluster's address ranges (see the module docstring for the defaults)."""

    node_network: IPv4Network = IPv4Network("172.30.0.0/24")
    pod_network: IPv4Network = IPv4Network("10.244.0.0/16")
    node_pod_prefixlen: int = 24
    service_network: IPv4Network = IPv4Network("10.96.0.0/16")
    service_reserved: int = 10
    """How many low addresses of the service range (network address included) are kept back."""

    def __post_init__(self) -> None:
        for name in ("node_network", "pod_network", "service_network"):
            object.__setattr__(self, name, _net(getattr(self, name)))
            _check_sim_range(name.replace("_", " "), getattr(self, name))
        nets = {"node": self.node_network, "pod": self.pod_network, "service": self.service_network}
        items = list(nets.items())
        for i, (a, na) in enumerate(items):
            for b, nb in items[i + 1:]:
                if na.overlaps(nb):
                    raise AddressError(f"{a} network {na} overlaps {b} network {nb}")
        if self.node_network.prefixlen > 30:
            raise AddressError(f"node network {self.node_network} is too small")
        if not self.pod_network.prefixlen <= self.node_pod_prefixlen <= 30:
            raise AddressError(f"node pod prefix /{self.node_pod_prefixlen} must be between "
                               f"/{self.pod_network.prefixlen} and /30")
        if not 1 <= self.service_reserved < self.service_network.num_addresses - 1:
            raise AddressError(f"service_reserved={self.service_reserved} leaves no VIPs")

    @property
    def max_nodes(self) -> int:
        return self.node_network.num_addresses - 3  # network, .1, broadcast

    def node_ip(self, index: int) -> IPv4Address:
        """The fabric address of node `index` (0-based): .(index+2) of the node network."""
        if not 0 <= index < self.max_nodes:
            raise AddressError(f"node index {index} out of range 0..{self.max_nodes - 1}")
        return self.node_network.network_address + index + 2

    def pod_subnet(self, slot: int) -> IPv4Network:
        """The `slot`-th per-node subnet of the pod network (0-based)."""
        size = 1 << (32 - self.node_pod_prefixlen)
        count = self.pod_network.num_addresses // size
        if not 0 <= slot < count:
            raise AddressError(f"pod subnet slot {slot} out of range 0..{count - 1}")
        return IPv4Network((int(self.pod_network.network_address) + slot * size,
                            self.node_pod_prefixlen))

    @property
    def pod_subnet_count(self) -> int:
        return self.pod_network.num_addresses >> (32 - self.node_pod_prefixlen)

    def check_node_cidr(self, cidr: IPv4Network | str) -> IPv4Network:
        """Validate a pinned spec.podCIDR: inside the pod network, /30 or larger."""
        cidr = _net(cidr)
        if not cidr.subnet_of(self.pod_network):
            raise AddressError(f"node pod CIDR {cidr} is outside the cluster pod network "
                               f"{self.pod_network}")
        if cidr.prefixlen > 30:
            raise AddressError(f"node pod CIDR {cidr} is too small (needs /30 or larger)")
        return cidr


class AddressPool:
    """Host addresses ``network[first] .. network[last]`` handed out to owners.

    `next_fit` resumes the search after the previous allocation (wrapping around) instead of
    always taking the lowest free address.  Pinned addresses may come from the wider range
    ``network[pin_first] .. network[pin_last]`` (default: the same bounds).
    """

    def __init__(self, network: IPv4Network, first: int, last: int, *, next_fit: bool = True,
                 pin_first: int | None = None, pin_last: int | None = None):
        pin_first = first if pin_first is None else pin_first
        pin_last = last if pin_last is None else pin_last
        if not (0 <= first <= last < network.num_addresses
                and 0 <= pin_first <= first and last <= pin_last < network.num_addresses):
            raise AddressError(f"bad pool bounds {first}..{last} (pins {pin_first}..{pin_last}) "
                               f"for {network}")
        self.network = network
        self._base = int(network.network_address)
        self._first, self._last = first, last
        self._pin_first, self._pin_last = pin_first, pin_last
        self._next_fit = next_fit
        self._cursor = first
        self._by_owner: dict[Hashable, IPv4Address] = {}
        self._by_addr: dict[IPv4Address, Hashable] = {}

    @property
    def size(self) -> int:
        return self._last - self._first + 1

    def __len__(self) -> int:
        return len(self._by_owner)

    def __contains__(self, owner: object) -> bool:
        return owner in self._by_owner

    def get(self, owner: Hashable) -> IPv4Address | None:
        return self._by_owner.get(owner)

    def owner_of(self, addr: IPv4Address | str) -> Hashable | None:
        return self._by_addr.get(_addr(addr))

    def items(self) -> list[tuple[Hashable, IPv4Address]]:
        return sorted(self._by_owner.items(), key=lambda kv: kv[1])

    def _pinnable(self, addr: IPv4Address) -> bool:
        return self._pin_first <= int(addr) - self._base <= self._pin_last

    def allocate(self, owner: Hashable, pinned: IPv4Address | str | None = None) -> IPv4Address:
        """The owner's address: its current one, `pinned` if given and free, else a free one."""
        if pinned is not None:
            pinned = _addr(pinned)
            if not self._pinnable(pinned):
                raise AddressError(f"{pinned} is outside the allocatable range "
                                   f"{self.network[self._pin_first]}-{self.network[self._pin_last]}")
        held = self._by_owner.get(owner)
        if held is not None:
            if pinned is not None and pinned != held:
                raise AddressInUse(f"{owner!r} already holds {held}, cannot switch to {pinned}")
            return held
        if pinned is not None:
            other = self._by_addr.get(pinned)
            if other is not None:
                raise AddressInUse(f"{pinned} is already in use by {other!r}")
            return self._take(owner, pinned)
        start = self._cursor if self._next_fit else self._first
        span = self.size
        for step in range(span):  # bounded: one pass over the pool
            off = self._first + (start - self._first + step) % span
            addr = IPv4Address(self._base + off)
            if addr not in self._by_addr:
                if self._next_fit:
                    self._cursor = self._first + (off - self._first + 1) % span
                return self._take(owner, addr)
        raise PoolExhausted(f"no free address left in {self.network} ({span} in use)")

    def _take(self, owner: Hashable, addr: IPv4Address) -> IPv4Address:
        self._by_owner[owner] = addr
        self._by_addr[addr] = owner
        return addr

    def release(self, owner: Hashable) -> IPv4Address | None:
        """Free the owner's address; returns it (None if the owner held nothing)."""
        addr = self._by_owner.pop(owner, None)
        if addr is not None:
            del self._by_addr[addr]
        return addr


@dataclass(frozen=True, slots=True)
class NodeAddress:
    """Where a node sits: its index, fabric IP, pod CIDR and the CIDR's gateway (cni0)."""

    name: str
    index: int
    ip: IPv4Address
    pod_cidr: IPv4Network
    gateway: IPv4Address
    pinned_cidr: bool = False


class ClusterAddressing:
    """The cluster's allocation state: node slots, node pod CIDRs, pod IPs and service VIPs."""

    def __init__(self, plan: AddressPlan | None = None):
        self.plan = plan or AddressPlan()
        self._nodes: dict[str, NodeAddress] = {}
        self._pods: dict[str, AddressPool] = {}          # node name -> its pod pool
        self._pod_node: dict[Hashable, str] = {}         # pod key -> node name
        self._reserved: dict[str, IPv4Network] = {}      # pinned CIDRs during add_nodes()
        sn = self.plan.service_network
        # pins may use the kept-back low addresses too (only network and broadcast are refused)
        self._services = AddressPool(sn, self.plan.service_reserved, sn.num_addresses - 2,
                                     pin_first=1)

    # ---- nodes -------------------------------------------------------------------------------
    @property
    def nodes(self) -> tuple[NodeAddress, ...]:
        return tuple(sorted(self._nodes.values(), key=lambda n: n.index))

    def node(self, name: str) -> NodeAddress:
        try:
            return self._nodes[name]
        except KeyError:
            raise AddressError(f"unknown node {name!r}") from None

    def add_node(self, name: str, pod_cidr: IPv4Network | str | None = None) -> NodeAddress:
        """Give the node an index/IP and a pod CIDR (the pinned one if given). Idempotent."""
        if not name:
            raise AddressError("node name must not be empty")
        pinned = self.plan.check_node_cidr(pod_cidr) if pod_cidr is not None else None
        have = self._nodes.get(name)
        if have is not None:
            if pinned is not None and pinned != have.pod_cidr:
                raise AddressInUse(f"node {name!r} already has pod CIDR {have.pod_cidr}, "
                                   f"cannot switch to {pinned}")
            return have
        used = {n.index for n in self._nodes.values()}
        index = next((i for i in range(self.plan.max_nodes) if i not in used), None)
        if index is None:
            raise PoolExhausted(f"the node network {self.plan.node_network} is full "
                                f"({self.plan.max_nodes} nodes)")
        cidr = pinned if pinned is not None else self._free_subnet()
        for other in self._nodes.values():
            if other.pod_cidr.overlaps(cidr):
                raise AddressInUse(f"pod CIDR {cidr} of node {name!r} overlaps {other.pod_cidr} "
                                   f"of node {other.name!r}")
        first, last = pod_ip_bounds(cidr)
        node = NodeAddress(name=name, index=index, ip=self.plan.node_ip(index), pod_cidr=cidr,
                           gateway=gateway_of(cidr), pinned_cidr=pinned is not None)
        self._nodes[name] = node
        self._pods[name] = AddressPool(cidr, int(first) - int(cidr.network_address),
                                       int(last) - int(cidr.network_address))
        return node

    def add_nodes(self, nodes: Iterable[tuple[str, IPv4Network | str | None]]) -> list[NodeAddress]:
        """Add several nodes: pinned CIDRs are claimed first so automatic ones never take them;
        node indices still follow the given order."""
        nodes = list(nodes)
        pins = [(n, c) for n, c in nodes if c is not None]
        reserved = {n: self.plan.check_node_cidr(c) for n, c in pins}
        for i, (a, ca) in enumerate(pins):
            for b, cb in pins[i + 1:]:
                if a != b and reserved[a].overlaps(reserved[b]):
                    raise AddressInUse(f"pinned pod CIDRs of nodes {a!r} and {b!r} overlap")
        before = set(self._nodes)
        self._reserved = reserved
        try:
            return [self.add_node(n, c) for n, c in nodes]
        except AddressError:
            for n in set(self._nodes) - before:  # all or nothing
                del self._nodes[n], self._pods[n]
            raise
        finally:
            self._reserved = {}

    def _free_subnet(self) -> IPv4Network:
        taken = [n.pod_cidr for n in self._nodes.values()] + list(self._reserved.values())
        for slot in range(self.plan.pod_subnet_count):  # bounded by the number of subnets
            cand = self.plan.pod_subnet(slot)
            if not any(cand.overlaps(t) for t in taken):
                return cand
        raise PoolExhausted(f"no free /{self.plan.node_pod_prefixlen} left in the pod network "
                            f"{self.plan.pod_network}")

    def remove_node(self, name: str) -> NodeAddress:
        """Free the node's IP and CIDR; refused while pods on it still hold addresses."""
        node = self.node(name)
        if len(self._pods[name]):
            raise AddressError(f"node {name!r} still has {len(self._pods[name])} pod address(es); "
                               "release them first")
        del self._nodes[name], self._pods[name]
        return node

    def routes_for(self, name: str) -> dict[IPv4Network, IPv4Address]:
        """The routes node `name` needs: every other node's pod CIDR via that node's IP."""
        self.node(name)
        return {n.pod_cidr: n.ip for n in self.nodes if n.name != name}

    # ---- pods --------------------------------------------------------------------------------
    def allocate_pod(self, key: Hashable, node: str,
                     pinned: IPv4Address | str | None = None) -> IPv4Address:
        """The pod's IP in its node's CIDR (the pinned status.podIP if given). Idempotent."""
        nd = self.node(node)
        if pinned is not None:
            pinned = check_pod_ip(pinned, nd.pod_cidr)
        on = self._pod_node.get(key)
        if on is not None and on != node:
            raise AddressInUse(f"pod {key!r} already has an address on node {on!r}")
        ip = self._pods[node].allocate(key, pinned)
        self._pod_node[key] = node
        return ip

    def release_pod(self, key: Hashable) -> IPv4Address | None:
        node = self._pod_node.pop(key, None)
        return self._pods[node].release(key) if node is not None else None

    def pod_ip(self, key: Hashable) -> IPv4Address | None:
        node = self._pod_node.get(key)
        return self._pods[node].get(key) if node is not None else None

    # ---- services ----------------------------------------------------------------------------
    def allocate_service(self, key: Hashable, pinned: IPv4Address | str | None = None) -> IPv4Address:
        """The service's cluster VIP (the pinned spec.clusterIP if given). Idempotent."""
        if pinned is not None and _addr(pinned) not in self.plan.service_network:
            raise AddressError(f"cluster IP {pinned} is outside the service network "
                               f"{self.plan.service_network}")
        return self._services.allocate(key, pinned)

    def release_service(self, key: Hashable) -> IPv4Address | None:
        return self._services.release(key)

    def service_ip(self, key: Hashable) -> IPv4Address | None:
        return self._services.get(key)
