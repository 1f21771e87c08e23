"""The simulated cluster network: one netns per node and per pod, joined by veths and bridges.

Topology (defaults from :mod:`localcluster.addressing`; ``P`` is the cluster prefix, e.g.
``amb-demo``)::

      netns P-fabric                      (L2 only: no address, no route, no forwarding)
     +-----------------------------------------------------------+
     |                        bridge br0                         |
     |        vn<h(node1)> ---'      '--- vn<h(node2)>           |
     +-------------|-----------------------------|---------------+
                   | veth                        | veth
     netns P-n-node1                     netns P-n-node2
     +-------------|--------------------+ +------|-----------------------------+
     | eth0 172.30.0.2/24               | | eth0 172.30.0.3/24                 |
     | ip_forward=1                     | | ip_forward=1                       |
     | 10.244.1.0/24 via 172.30.0.3     | | 10.244.0.0/24 via 172.30.0.2       |
     | cni0 10.244.0.1/24 (bridge)      | | cni0 10.244.1.1/24 (bridge)        |
     |   vp<h(uid)> ...  vp<h(uid)>     | |   vp<h(uid)> ...                   |
     +-----|-----------------|----------+ +-----|------------------------------+
           | veth            | veth             | veth
     netns P-p-<h(uid)>   P-p-<h(uid)>     P-p-<h(uid)>
     eth0 10.244.0.2/24   eth0 10.244.0.3  eth0 10.244.1.2/24
     default via 10.244.0.1 (cni0)         default via 10.244.1.1

Naming (everything carries the prefix, so :meth:`ClusterNetwork.teardown` finds leftovers
after a crash without any saved state):

* netns ``P-fabric``, ``P-n-<node>`` (``P-n-<hash>`` when the node name is long or unusual),
  ``P-p-<hash(pod uid)>``; ``<hash>`` is 12 hex digits of SHA-256.
* interfaces live only inside those namespaces: ``eth0`` (node and pod side), ``br0``
  (fabric), ``cni0`` (node), ``vn<hash>`` (a node's port on br0), ``vp<hash>`` (a pod's port
  on cni0); all at most 15 characters.
* cgroups ``<cgroup2>/P/ztunnel/<node>`` and ``<cgroup2>/P/pods/<hash(pod uid)>``.

A name belongs to prefix ``P`` when it is ``P-fabric``, ``P-n-...`` or ``P-p-...``.  Prefixes
are lower-case ``[a-z0-9]`` words joined by single dashes, none of the words ``n``, ``p`` or
``fabric``: so ``amb-demo`` never claims ``amb-demo-2``'s objects, nor the reverse.

Safety (why nothing can leak to the real network):

* The host netns gets no interface, address or route: every veth is created directly inside
  its target namespaces (never in the host netns and then moved).
* The fabric has no address and no route; it only bridges node ``eth0`` ports.
* Nodes have no default route: only the node /24 (on-link), their own pod CIDR (cni0) and
  the other nodes' pod CIDRs via their node IPs.  A packet to any other address is dropped
  with "network unreachable" in the node.
* Pods' default route points to their node's cni0 gateway, so it ends in the node as well.
* Routes given to :meth:`ClusterNetwork.add_node`/``update_routes`` must be specific (never
  0.0.0.0/0) and use a gateway on the node network.

Teardown order matters: processes are killed first (the prefix's cgroup tree, then any
process still inside one of the namespaces), then the veths are deleted explicitly (a netns
held open by a leftover socket or fd would otherwise keep its veth alive), then the netns
bind mounts are removed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import asyncio
import errno
import functools
import hashlib
import ipaddress
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import TypeVar


from mesh.linux import cgroup, netns
from mesh.proxy.sockets import FWMARK_ACCEPT_SYSCTL, INBOUND_MARK, INBOUND_MARK_MASK, INBOUND_TABLE

if TYPE_CHECKING:
    from pyroute2 import IPRoute

from localcluster.addressing import bridge_mac, check_pod_ip, gateway_of

_T = TypeVar("_T")

__all__ = ["NetworkError", "NodeNet", "PodNet", "ClusterNetwork", "uid_hash"]

RTPROT_STATIC = 4
"""Protocol tag of the inter-node routes this module manages (``ip route ... proto static``)."""
FABRIC_BRIDGE = "br0"
NODE_BRIDGE = "cni0"
POD_IFNAME = "eth0"
_PREFIX_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_RESERVED_WORDS = frozenset({"n", "p", "fabric"})
_NODE_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")
_MAX_NETNS_NAME = 63


class NetworkError(RuntimeError):
    """A cluster network operation failed (bad argument, object exists or is missing)."""


def uid_hash(text: str, length: int = 12) -> str:
    """A short stable hex hash (SHA-256) used in names derived from pod UIDs and node names."""
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass(frozen=True, slots=True)
class NodeNet:
    """A node's network: its netns, fabric address, pod CIDR and ztunnel cgroup."""

    name: str
    netns: str
    netns_path: str
    node_ip: IPv4Address
    node_prefixlen: int
    pod_cidr: IPv4Network
    gateway: IPv4Address
    cgroup: str
    """Absolute path of ``<cgroup2>/<prefix>/ztunnel/<node>``."""


@dataclass(frozen=True, slots=True)
class PodNet:
    """A pod's network: its netns, interface, address, gateway and cgroup."""

    uid: str
    node: str
    netns: str
    netns_path: str
    ifname: str
    pod_ip: IPv4Address
    prefixlen: int
    gateway: IPv4Address
    host_ifname: str
    """The node-side end of the pod's veth (a port of the node's cni0)."""
    cgroup: str
    """Absolute path of ``<cgroup2>/<prefix>/pods/<hash(uid)>``."""


def _source_return_path(ipr: "IPRoute") -> None:
    """In a pod netns: route replies to ztunnel's source-preserving dials back to it (Istio's
    in-pod rule, without conntrack).  ztunnel dials the app from the client's IP with
    IP_TRANSPARENT and SO_MARK INBOUND_MARK; tcp_fwmark_accept (set after this) gives the
    app's accepted socket that mark, and this rule delivers what it sends locally (lo, to
    ztunnel's socket) instead of out of eth0 to the real client."""
    lo = _index(ipr, "lo")
    ipr.route("add", dst="0.0.0.0/0", type="local", oif=lo, table=INBOUND_TABLE, scope=254)  # host
    ipr.rule("add", fwmark=INBOUND_MARK, fwmask=INBOUND_MARK_MASK, table=INBOUND_TABLE,
             priority=32764)


@contextmanager
def _rtnl(ns: str | None) -> Iterator["IPRoute"]:
    """A netlink handle inside netns `ns` (None: the host netns) for one block.

    * ``flags=0``: never create a missing netns as a side effect (pyroute2's default is
      O_CREAT).
    * A private stdlib event loop: pyroute2 0.9 runs its sync API on asyncio and would build
      its loop from the global policy, but the runner installs uvloop, which refuses
      AF_NETLINK datagram endpoints ("invalid family 16").  A fresh loop per handle also makes
      the calls safe from any worker thread (e.g. ``asyncio.to_thread``).
    """
    if ns is not None and not netns.exists(ns):
        raise NetworkError(f"netns {ns!r} does not exist")
    loop = asyncio.SelectorEventLoop()
    try:
        kw = {"netns": ns, "flags": 0} if ns is not None else {}
        from pyroute2 import IPRoute  # here: ztunnel imports this module for names only
        with IPRoute(use_event_loop=loop, **kw) as ipr:
            yield ipr
    finally:
        loop.close()


def _blocking(fn: Callable[..., _T]) -> Callable[..., _T]:
    """Make a blocking method callable from an event-loop thread too.

    pyroute2 drives its own event loop, which cannot run while another loop is running in
    the same thread.  Called from such a thread, the method runs on a short-lived helper
    thread and the caller blocks until it is done, as with any synchronous call (from async
    code, prefer ``await asyncio.to_thread(...)``, which does not stall the loop).
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return fn(*args, **kwargs)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cluster-net") as ex:
            return ex.submit(fn, *args, **kwargs).result()
    return wrapper


def _netlink_error() -> type[Exception]:
    from pyroute2.netlink.exceptions import NetlinkError
    return NetlinkError


def _index(ipr: "IPRoute", ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetworkError(f"no interface {ifname!r}")
    return found[0]


def _links(ipr: "IPRoute") -> list[tuple[int, str, str | None]]:
    """(index, ifname, kind) of every link in the namespace."""
    out = []
    for msg in ipr.get_links():
        info = msg.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        out.append((msg["index"], msg.get_attr("IFLA_IFNAME"), kind))
    return out


class ClusterNetwork:
    """Builds and removes the namespaces, links, routes and cgroups of one local cluster.

    The object keeps no essential state: every name derives from the prefix, the node name
    or the pod UID, so a fresh instance can remove what a crashed one created.  Methods are
    serialized by a lock and blocking (each is a few netlink round trips, plus process kills
    on removal); they work from any thread, including one running an event loop (see
    :func:`_blocking`), but async code should call them through ``asyncio.to_thread``.
    """

    def __init__(self, prefix: str):
        if not _PREFIX_RE.fullmatch(prefix or "") or len(prefix) > 32:
            raise NetworkError(f"invalid prefix {prefix!r}: use [a-z0-9] words joined by single "
                               "dashes, at most 32 characters")
        if _RESERVED_WORDS & set(prefix.split("-")):
            raise NetworkError(f"invalid prefix {prefix!r}: the words {sorted(_RESERVED_WORDS)} "
                               "are reserved for object names")
        self.prefix = prefix
        self._lock = threading.RLock()
        self._owned = re.compile(rf"^{re.escape(prefix)}-(fabric|n-.+|p-.+)$")

    # ---- names -------------------------------------------------------------------------------
    @property
    def fabric_netns(self) -> str:
        return f"{self.prefix}-fabric"

    def _node_key(self, name: str) -> str:
        if not name:
            raise NetworkError("node name must not be empty")
        full = f"{self.prefix}-n-{name}"
        if _NODE_NAME_RE.fullmatch(name) and len(full) <= _MAX_NETNS_NAME:
            return name
        return uid_hash(name)

    def node_netns(self, name: str) -> str:
        return f"{self.prefix}-n-{self._node_key(name)}"

    def pod_netns(self, pod_uid: str) -> str:
        return f"{self.prefix}-p-{uid_hash(pod_uid)}"

    def node_cgroup_rel(self, name: str) -> str:
        return f"{self.prefix}/ztunnel/{self._node_key(name)}"

    def pod_cgroup_rel(self, pod_uid: str) -> str:
        return f"{self.prefix}/pods/{uid_hash(pod_uid)}"

    def ztunnel_cgroup(self, name: str) -> str:
        """Absolute path of node `name`'s ztunnel cgroup (created by add_node)."""
        return cgroup.abspath(self.node_cgroup_rel(name))

    def pod_cgroup(self, pod_uid: str) -> str:
        """Absolute path of the pod's cgroup (created by add_pod)."""
        return cgroup.abspath(self.pod_cgroup_rel(pod_uid))

    def owns(self, name: str) -> bool:
        """Whether a netns or link name belongs to this prefix."""
        return bool(self._owned.fullmatch(name))

    def list_netns(self) -> list[str]:
        """The existing namespaces of this prefix."""
        return [n for n in netns.list_netns(self.prefix + "-") if self.owns(n)]

    # ---- fabric ------------------------------------------------------------------------------
    @_blocking
    def ensure_fabric(self) -> str:
        """Create the fabric netns and its bridge if missing; returns the netns name."""
        with self._lock:
            ns = self.fabric_netns
            if not netns.exists(ns):
                netns.create(ns)
            with _rtnl(ns) as ipr:
                ipr.link("set", index=_index(ipr, "lo"), state="up")
                if not ipr.link_lookup(ifname=FABRIC_BRIDGE):
                    # Pinned MAC, as for cni0 (see bridge_mac): the fabric has no address, so
                    # derive it from 0.0.0.0, which no node bridge can have.
                    ipr.link("add", ifname=FABRIC_BRIDGE, kind="bridge", address=bridge_mac("0.0.0.0"))
                ipr.link("set", index=_index(ipr, FABRIC_BRIDGE), state="up")
            return ns

    # ---- nodes -------------------------------------------------------------------------------
    @_blocking
    def add_node(self, name: str, node_ip: IPv4Address | IPv4Interface | str,
                 pod_cidr: IPv4Network | str,
                 routes_to: Mapping[IPv4Network | str, IPv4Address | str] | None = None, *,
                 node_prefixlen: int = 24) -> NodeNet:
        """Create node `name`: netns, eth0 on the fabric, cni0 gateway, routes, ztunnel cgroup.

        `node_ip` may carry its prefix (``"172.30.0.2/24"``); otherwise `node_prefixlen` is
        used.  `routes_to` maps other nodes' pod CIDRs to their node IPs.  Fails if the node's
        netns already exists; on failure everything created for the node is removed again.
        """
        iface = ipaddress.ip_interface(node_ip if "/" in str(node_ip)
                                       else f"{node_ip}/{node_prefixlen}")
        cidr = ipaddress.ip_network(pod_cidr)
        if iface.version != 4 or cidr.version != 4 or cidr.prefixlen > 30:
            raise NetworkError(f"need an IPv4 node address and an IPv4 pod CIDR of /30 or larger, "
                               f"got {node_ip} and {pod_cidr}")
        if iface.network.overlaps(cidr):
            raise NetworkError(f"pod CIDR {cidr} overlaps the node network {iface.network}")
        routes = self._check_routes(iface.network, cidr, routes_to or {})
        with self._lock:
            ns = self.node_netns(name)
            if netns.exists(ns):
                raise NetworkError(f"node {name!r} already exists (netns {ns})")
            self.ensure_fabric()
            try:
                return self._build_node(name, ns, iface, cidr, routes)
            except BaseException:
                self.remove_node(name)
                raise

    def _build_node(self, name: str, ns: str, iface: IPv4Interface, cidr: IPv4Network,
                    routes: dict[IPv4Network, IPv4Address]) -> NodeNet:
        netns.create(ns)
        port = "vn" + uid_hash(ns, 10)
        with _rtnl(self.fabric_netns) as fab:
            fab.link("add", ifname=port, kind="veth",
                     peer={"ifname": "eth0", "net_ns_fd": ns})
            fab.link("set", index=_index(fab, port), master=_index(fab, FABRIC_BRIDGE), state="up")
        gw = gateway_of(cidr)
        with _rtnl(ns) as ipr:
            ipr.link("set", index=_index(ipr, "lo"), state="up")
            eth0 = _index(ipr, "eth0")
            ipr.addr("add", index=eth0, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            ipr.link("set", index=eth0, state="up")
            # An explicit MAC: otherwise the bridge takes its lowest port's, which changes as
            # pods come and go, and every pod's ARP entry for its gateway goes stale.
            ipr.link("add", ifname=NODE_BRIDGE, kind="bridge", address=bridge_mac(gw))
            br = _index(ipr, NODE_BRIDGE)
            ipr.addr("add", index=br, address=str(gw), prefixlen=cidr.prefixlen)
            ipr.link("set", index=br, state="up")
            self._sync_routes(ipr, routes)
        with netns.in_netns(ns):  # /proc/sys/net resolves to the opening thread's netns
            with open("/proc/sys/net/ipv4/ip_forward", "w", encoding="ascii") as f:
                f.write("1")
        cg = cgroup.create(self.node_cgroup_rel(name))
        return NodeNet(name=name, netns=ns, netns_path=netns.netns_path(ns), node_ip=iface.ip,
                       node_prefixlen=iface.network.prefixlen, pod_cidr=cidr, gateway=gw, cgroup=cg)

    @staticmethod
    def _check_routes(node_net: IPv4Network, own_cidr: IPv4Network,
                      routes_to: Mapping) -> dict[IPv4Network, IPv4Address]:
        out: dict[IPv4Network, IPv4Address] = {}
        for dst, via in routes_to.items():
            dst, via = ipaddress.ip_network(dst), ipaddress.ip_address(via)
            if dst.version != 4 or via.version != 4:
                raise NetworkError(f"route {dst} via {via}: IPv4 only")
            if dst.prefixlen == 0:
                raise NetworkError("a default route is never installed in a node (safety)")
            if via not in node_net:
                raise NetworkError(f"route {dst} via {via}: gateway is not on the node network "
                                   f"{node_net}")
            if dst.overlaps(own_cidr) or dst.overlaps(node_net):
                raise NetworkError(f"route {dst} overlaps the node's own pod CIDR or node network")
            out[dst] = via
        return out

    @staticmethod
    def _sync_routes(ipr: "IPRoute", want: dict[IPv4Network, IPv4Address]) -> int:
        have: dict[IPv4Network, IPv4Address | None] = {}
        for r in ipr.get_routes(family=2, table=254, proto=RTPROT_STATIC):
            if r["proto"] != RTPROT_STATIC:
                continue
            gw = r.get_attr("RTA_GATEWAY")
            have[IPv4Network((r.get_attr("RTA_DST") or "0.0.0.0", r["dst_len"]))] = (
                IPv4Address(gw) if gw else None)
        changed = 0
        for dst, gw in have.items():
            if want.get(dst) != gw:
                ipr.route("del", dst=str(dst), proto=RTPROT_STATIC)
                changed += 1
        for dst, gw in want.items():
            if have.get(dst) != gw:
                ipr.route("replace", dst=str(dst), gateway=str(gw), proto=RTPROT_STATIC)
                changed += 1
        return changed

    @_blocking
    def update_routes(self, name: str, routes: Mapping[IPv4Network | str, IPv4Address | str]) -> int:
        """Make node `name`'s inter-node routes exactly `routes` (pod CIDR -> node IP); how
        many it had to change. The kernel deletes routes through a link that goes down and
        does not bring them back with it, so the runner calls this again every 2 s."""
        with self._lock, _rtnl(self.node_netns(name)) as ipr:
            eth0 = _index(ipr, "eth0")
            node_net = own = None
            for a in ipr.get_addr(family=2):
                addr = IPv4Interface((a.get_attr("IFA_ADDRESS"), a["prefixlen"]))
                if a["index"] == eth0:
                    node_net = addr.network
                elif a["index"] == _index(ipr, NODE_BRIDGE):
                    own = addr.network
            if node_net is None or own is None:
                raise NetworkError(f"node {name!r} has no eth0/cni0 address")
            return self._sync_routes(ipr, self._check_routes(node_net, own, routes))

    @_blocking
    def add_local_address(self, name: str, ip: IPv4Address | str) -> None:
        """Give node `name` the host address `ip` (/32 on lo), so its pods reach a service the
        node itself answers at that address (the API server's ClusterIP). Idempotent."""
        with self._lock, _rtnl(self.node_netns(name)) as ipr:
            lo = _index(ipr, "lo")
            have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=2, index=lo)}
            if str(ip) not in have:
                ipr.addr("add", index=lo, address=str(ip), prefixlen=32)

    @_blocking
    def remove_node(self, name: str) -> None:
        """Remove node `name`, its pods, its ztunnel cgroup and its fabric port. Idempotent."""
        with self._lock:
            ns = self.node_netns(name)
            if netns.exists(ns):
                with _rtnl(ns) as ipr:
                    pod_hashes = [n[2:] for _, n, kind in _links(ipr)
                                  if kind == "veth" and n.startswith("vp")]
                for h in pod_hashes:
                    self._remove_pod_hashed(h)
            cgroup.remove_tree(self.node_cgroup_rel(name))
            self._remove_netns(ns)
            if netns.exists(self.fabric_netns):
                with _rtnl(self.fabric_netns) as fab:
                    for idx in fab.link_lookup(ifname="vn" + uid_hash(ns, 10)):
                        self._del_link(fab, idx)

    # ---- pods --------------------------------------------------------------------------------
    @_blocking
    def add_pod(self, node: str, pod_uid: str, pod_ip: IPv4Address | str,
                cidr: IPv4Network | str) -> PodNet:
        """Create the pod's netns on `node`: eth0 with `pod_ip`/prefix of `cidr`, default route
        via the CIDR's gateway (the node's cni0), lo up, plus its cgroup.  Fails if the pod
        exists; on failure everything created for the pod is removed again."""
        if not pod_uid:
            raise NetworkError("pod uid must not be empty")
        cidr = ipaddress.ip_network(cidr)
        try:
            ip = check_pod_ip(pod_ip, cidr)
        except ValueError as e:
            raise NetworkError(str(e)) from None
        with self._lock:
            node_ns = self.node_netns(node)
            if not netns.exists(node_ns):
                raise NetworkError(f"node {node!r} does not exist (netns {node_ns})")
            ns = self.pod_netns(pod_uid)
            if netns.exists(ns):
                raise NetworkError(f"pod {pod_uid!r} already exists (netns {ns})")
            h = uid_hash(pod_uid)
            host_if = "vp" + h
            try:
                netns.create(ns)
                with _rtnl(node_ns) as nodr:
                    nodr.link("add", ifname=host_if, kind="veth",
                              peer={"ifname": POD_IFNAME, "net_ns_fd": ns})
                    nodr.link("set", index=_index(nodr, host_if),
                              master=_index(nodr, NODE_BRIDGE), state="up")
                gw = gateway_of(cidr)
                with _rtnl(ns) as ipr:
                    ipr.link("set", index=_index(ipr, "lo"), state="up")
                    eth0 = _index(ipr, POD_IFNAME)
                    ipr.addr("add", index=eth0, address=str(ip), prefixlen=cidr.prefixlen)
                    ipr.link("set", index=eth0, state="up")
                    ipr.route("add", dst="0.0.0.0/0", gateway=str(gw))
                    _source_return_path(ipr)
                # A restarted ztunnel binds the in-pod ports next to the old one (SO_REUSEPORT);
                # when the old closes its listeners, connections they had not accepted yet move
                # to the new one's instead of being reset (Linux 5.14+).
                with netns.in_netns(ns):
                    with open("/proc/sys/net/ipv4/tcp_migrate_req", "w", encoding="ascii") as f:
                        f.write("1")
                    # The kernel's own replies (a RST when the app does not listen) take the
                    # mark of the packet they answer: a refused source-preserving dial comes
                    # back to ztunnel as a refusal, not as a stray RST to the real client.
                    with open("/proc/sys/net/ipv4/fwmark_reflect", "w", encoding="ascii") as f:
                        f.write("1")
                    # Last: ztunnel reads it as "this pod has the return path" (sockets.py).
                    with open(FWMARK_ACCEPT_SYSCTL, "w", encoding="ascii") as f:
                        f.write("1")
                cg = cgroup.create(self.pod_cgroup_rel(pod_uid))
            except BaseException:
                self._remove_pod_hashed(h, node_ns=node_ns)
                raise
            return PodNet(uid=pod_uid, node=node, netns=ns, netns_path=netns.netns_path(ns),
                          ifname=POD_IFNAME, pod_ip=ip, prefixlen=cidr.prefixlen, gateway=gw,
                          host_ifname=host_if, cgroup=cg)

    @_blocking
    def remove_pod(self, pod_uid: str) -> None:
        """Kill the pod's processes, remove its cgroup, veth and netns. Idempotent."""
        with self._lock:
            self._remove_pod_hashed(uid_hash(pod_uid))

    def _remove_pod_hashed(self, h: str, node_ns: str | None = None) -> None:
        cgroup.remove_tree(f"{self.prefix}/pods/{h}")
        self._remove_netns(f"{self.prefix}-p-{h}")
        if node_ns is not None and netns.exists(node_ns):  # only needed if the pod netns was
            with _rtnl(node_ns) as ipr:                     # never created (rollback case)
                for idx in ipr.link_lookup(ifname="vp" + h):
                    self._del_link(ipr, idx)

    # ---- teardown ----------------------------------------------------------------------------
    @_blocking
    def teardown(self) -> None:
        """Remove everything carrying the prefix: processes, cgroups, netns, stray host links.

        Idempotent, needs no state from the instance that built the cluster, and succeeds
        when nothing exists.
        """
        with self._lock:
            errors: list[str] = []

            def attempt(what: str, fn, *args) -> None:  # keep going: remove as much as possible
                try:
                    fn(*args)
                except Exception as e:  # noqa: BLE001 - reported together below
                    errors.append(f"{what}: {type(e).__name__}: {e}")

            attempt(f"cgroup {self.prefix}", cgroup.remove_tree, self.prefix)
            # pods first, then nodes, then the fabric: each step deletes its veths explicitly
            order = {"p": 0, "n": 1, "f": 2}
            for ns in sorted(self.list_netns(), key=lambda n: order[n[len(self.prefix) + 1]]):
                attempt(f"netns {ns}", self._remove_netns, ns)
            attempt("host links", self._remove_host_links)
            if errors:
                raise NetworkError(f"teardown of {self.prefix!r} incomplete: " + "; ".join(errors))

    def _remove_host_links(self) -> None:
        """Delete links in the host netns named with the prefix (none are ever created there;
        this only cleans up after bugs or foreign tools)."""
        with _rtnl(None) as host:
            for idx, ifname, _ in _links(host):
                if ifname and self.owns(ifname):
                    self._del_link(host, idx)

    # ---- helpers -----------------------------------------------------------------------------
    def _remove_netns(self, ns: str) -> None:
        """Kill stray processes inside `ns`, delete its non-loopback links, remove it."""
        if not netns.exists(ns):
            return
        netns.kill_pids_in(ns)
        try:
            with _rtnl(ns) as ipr:
                for idx, ifname, _ in _links(ipr):
                    if ifname != "lo":
                        self._del_link(ipr, idx)
        finally:
            netns.remove(ns)  # even if the links could not be listed: never leave the name

    @staticmethod
    def _del_link(ipr: "IPRoute", index: int) -> None:
        try:
            ipr.link("del", index=index)
        except _netlink_error() as e:
            if e.code != errno.ENODEV:  # already gone with its veth peer
                raise
