"""Table tests of the pure address planning in localcluster.addressing."""
from __future__ import annotations

from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N

import pytest

from localcluster.addressing import (AddressError, AddressInUse, AddressPlan, AddressPool,
                                     ClusterAddressing, PoolExhausted, bridge_mac, check_pod_ip, gateway_of,
                                     pod_ip_bounds)


@pytest.mark.parametrize("index, ip", [(0, "172.30.0.2"), (1, "172.30.0.3"), (252, "172.30.0.254")])
def test_node_ip(index, ip):
    assert AddressPlan().node_ip(index) == A(ip)


@pytest.mark.parametrize("index", [-1, 253])
def test_node_ip_out_of_range(index):
    with pytest.raises(AddressError):
        AddressPlan().node_ip(index)


@pytest.mark.parametrize("slot, cidr", [(0, "10.244.0.0/24"), (1, "10.244.1.0/24"),
                                        (255, "10.244.255.0/24")])
def test_pod_subnet(slot, cidr):
    assert AddressPlan().pod_subnet(slot) == N(cidr)


@pytest.mark.parametrize("cidr, gw, first, last", [
    ("10.244.0.0/24", "10.244.0.1", "10.244.0.2", "10.244.0.254"),
    ("10.244.8.0/22", "10.244.8.1", "10.244.8.2", "10.244.11.254"),
    ("10.244.0.4/30", "10.244.0.5", "10.244.0.6", "10.244.0.6"),
])
def test_gateway_and_bounds(cidr, gw, first, last):
    assert gateway_of(N(cidr)) == A(gw)
    assert pod_ip_bounds(N(cidr)) == (A(first), A(last))


@pytest.mark.parametrize("ip, ok", [
    ("10.244.0.2", True), ("10.244.0.254", True),
    ("10.244.0.0", False), ("10.244.0.1", False), ("10.244.0.255", False), ("10.244.1.5", False),
])
def test_check_pod_ip(ip, ok):
    if ok:
        assert check_pod_ip(ip, N("10.244.0.0/24")) == A(ip)
    else:
        with pytest.raises(AddressError):
            check_pod_ip(ip, N("10.244.0.0/24"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(pod_network="172.30.0.0/16"), "overlaps"),
    (dict(service_network="10.244.128.0/17"), "overlaps"),
    (dict(node_pod_prefixlen=15), "between"),
    (dict(node_pod_prefixlen=31), "between"),
    (dict(pod_network="8.8.0.0/16"), "private"),
    (dict(node_network="172.30.0.0/31"), "too small"),
    (dict(service_reserved=0), "leaves no VIPs"),
])
def test_bad_plans(kwargs, match):
    with pytest.raises(AddressError, match=match):
        AddressPlan(**kwargs)


def test_plan_accepts_strings():
    plan = AddressPlan(node_network="172.29.50.0/24", pod_network="10.8.0.0/16",
                       node_pod_prefixlen=26, service_network="10.9.0.0/24")
    assert plan.node_network == N("172.29.50.0/24")
    assert plan.pod_subnet(1) == N("10.8.0.64/26") and plan.pod_subnet_count == 1024


# ---- nodes ------------------------------------------------------------------------------------

def test_nodes_in_order():
    c = ClusterAddressing()
    got = [(n.index, str(n.ip), str(n.pod_cidr), str(n.gateway))
           for n in c.add_nodes([("a", None), ("b", None), ("c", None)])]
    assert got == [(0, "172.30.0.2", "10.244.0.0/24", "10.244.0.1"),
                   (1, "172.30.0.3", "10.244.1.0/24", "10.244.1.1"),
                   (2, "172.30.0.4", "10.244.2.0/24", "10.244.2.1")]
    assert c.routes_for("b") == {N("10.244.0.0/24"): A("172.30.0.2"),
                                 N("10.244.2.0/24"): A("172.30.0.4")}


def test_pinned_node_cidr_is_claimed_first():
    c = ClusterAddressing()
    a, b = c.add_nodes([("a", None), ("b", "10.244.0.0/24")])
    assert (a.pod_cidr, b.pod_cidr) == (N("10.244.1.0/24"), N("10.244.0.0/24"))
    assert b.pinned_cidr and not a.pinned_cidr
    assert (a.index, b.index) == (0, 1)


def test_pinned_wider_cidr_is_skipped_by_automatic_allocation():
    c = ClusterAddressing()
    c.add_node("big", "10.244.0.0/23")
    assert c.add_node("next").pod_cidr == N("10.244.2.0/24")


@pytest.mark.parametrize("pinned, exc, match", [
    ("10.245.0.0/24", AddressError, "outside the cluster pod network"),
    ("10.244.0.0/31", AddressError, "too small"),
    ("10.244.0.128/25", AddressInUse, "overlaps"),
    ("10.244.0.1/24", AddressError, "host bits"),
    ("not-a-cidr", AddressError, "bad network"),
])
def test_bad_pinned_node_cidrs(pinned, exc, match):
    c = ClusterAddressing()
    c.add_node("a")  # takes 10.244.0.0/24
    with pytest.raises(exc, match=match):
        c.add_node("b", pinned)
    assert [n.name for n in c.nodes] == ["a"]


def test_add_nodes_is_all_or_nothing():
    c = ClusterAddressing()
    with pytest.raises(AddressInUse):
        c.add_nodes([("a", None), ("b", "10.244.4.0/23"), ("c", "10.244.5.0/24")])
    assert c.nodes == ()
    with pytest.raises(AddressError):
        c.add_nodes([("a", None), ("b", "10.99.0.0/24")])
    assert c.nodes == ()


def test_node_add_is_idempotent_and_index_reused_after_remove():
    c = ClusterAddressing()
    a = c.add_node("a")
    assert c.add_node("a") is a and c.add_node("a", "10.244.0.0/24") is a
    with pytest.raises(AddressInUse):
        c.add_node("a", "10.244.7.0/24")
    c.add_node("b")
    c.remove_node("a")
    again = c.add_node("c")
    assert (again.index, again.ip, again.pod_cidr) == (0, A("172.30.0.2"), N("10.244.0.0/24"))
    with pytest.raises(AddressError, match="unknown node"):
        c.remove_node("a")


def test_node_network_exhaustion():
    c = ClusterAddressing(AddressPlan(node_network="172.30.0.0/29"))  # .2-.6: 5 nodes
    for i in range(5):
        c.add_node(f"n{i}")
    with pytest.raises(PoolExhausted):
        c.add_node("one-too-many")


def test_pod_network_exhaustion():
    c = ClusterAddressing(AddressPlan(pod_network="10.244.0.0/23"))
    c.add_node("a"), c.add_node("b")
    with pytest.raises(PoolExhausted):
        c.add_node("c")


# ---- pods -------------------------------------------------------------------------------------

def test_pod_ips_skip_reserved_and_are_not_reused_at_once():
    c = ClusterAddressing()
    c.add_node("a")
    assert [str(c.allocate_pod(k, "a")) for k in ("p1", "p2", "p3")] == [
        "10.244.0.2", "10.244.0.3", "10.244.0.4"]
    assert c.allocate_pod("p1", "a") == A("10.244.0.2")  # idempotent
    assert c.release_pod("p2") == A("10.244.0.3")
    assert c.allocate_pod("p4", "a") == A("10.244.0.5")  # next-fit: .3 is not reused yet
    assert c.pod_ip("p2") is None and c.release_pod("p2") is None


def test_pod_pool_wraps_around_and_exhausts():
    c = ClusterAddressing(AddressPlan(node_pod_prefixlen=29))  # .2-.6: 5 pods
    c.add_node("a")
    ips = [c.allocate_pod(f"p{i}", "a") for i in range(5)]
    assert ips[0] == A("10.244.0.2") and ips[-1] == A("10.244.0.6")
    with pytest.raises(PoolExhausted):
        c.allocate_pod("p5", "a")
    c.release_pod("p1")
    assert c.allocate_pod("p5", "a") == A("10.244.0.3")  # wraps around to the freed one


@pytest.mark.parametrize("pinned, exc, match", [
    ("10.244.0.7", None, None),
    ("10.244.0.1", AddressError, "reserved"),
    ("10.244.0.255", AddressError, "reserved"),
    ("10.244.1.7", AddressError, "outside its node"),
    ("10.244.0.2", AddressInUse, "in use"),
])
def test_pinned_pod_ip(pinned, exc, match):
    c = ClusterAddressing()
    c.add_nodes([("a", None), ("b", None)])
    c.allocate_pod("first", "a")  # 10.244.0.2
    if exc is None:
        assert c.allocate_pod("pinned", "a", pinned) == A(pinned)
        assert c.allocate_pod("auto", "a") == A("10.244.0.3")
    else:
        with pytest.raises(exc, match=match):
            c.allocate_pod("pinned", "a", pinned)
        assert c.pod_ip("pinned") is None


def test_pod_key_cannot_move_or_repin():
    c = ClusterAddressing()
    c.add_nodes([("a", None), ("b", None)])
    c.allocate_pod("p", "a")
    with pytest.raises(AddressInUse, match="on node 'a'"):
        c.allocate_pod("p", "b")
    with pytest.raises(AddressInUse, match="already holds"):
        c.allocate_pod("p", "a", "10.244.0.9")
    with pytest.raises(AddressError, match="unknown node"):
        c.allocate_pod("q", "zzz")


def test_node_with_pods_cannot_be_removed():
    c = ClusterAddressing()
    c.add_node("a")
    c.allocate_pod("p", "a")
    with pytest.raises(AddressError, match="still has 1 pod"):
        c.remove_node("a")
    c.release_pod("p")
    c.remove_node("a")


# ---- services ---------------------------------------------------------------------------------

@pytest.mark.parametrize("pinned, result, exc", [
    (None, "10.96.0.10", None),
    ("10.96.0.1", "10.96.0.1", None),        # pins may use the kept-back low range
    ("10.96.200.7", "10.96.200.7", None),
    ("10.96.0.0", None, AddressError),
    ("10.96.255.255", None, AddressError),
    ("10.97.0.1", None, AddressError),
])
def test_service_vips(pinned, result, exc):
    c = ClusterAddressing()
    if exc:
        with pytest.raises(exc):
            c.allocate_service("svc", pinned)
    else:
        assert c.allocate_service("svc", pinned) == A(result)
        assert c.service_ip("svc") == A(result)


def test_service_vips_sequence_and_conflicts():
    c = ClusterAddressing()
    assert [str(c.allocate_service(k)) for k in "abc"] == ["10.96.0.10", "10.96.0.11", "10.96.0.12"]
    with pytest.raises(AddressInUse):
        c.allocate_service("d", "10.96.0.11")
    assert c.release_service("b") == A("10.96.0.11")
    assert c.allocate_service("d", "10.96.0.11") == A("10.96.0.11")


# ---- the generic pool -------------------------------------------------------------------------

def test_pool_lowest_free_mode_and_owner_lookup():
    pool = AddressPool(N("172.29.9.0/29"), 2, 6, next_fit=False)
    assert pool.size == 5
    assert [str(pool.allocate(k)) for k in "xyz"] == ["172.29.9.2", "172.29.9.3", "172.29.9.4"]
    pool.release("x")
    assert pool.allocate("w") == A("172.29.9.2")
    assert pool.owner_of("172.29.9.3") == "y" and "y" in pool and len(pool) == 3
    with pytest.raises(AddressError, match="outside"):
        pool.allocate("v", "172.29.9.7")


@pytest.mark.parametrize("first, last", [(5, 2), (-1, 3), (0, 8)])
def test_pool_bad_bounds(first, last):
    with pytest.raises(AddressError):
        AddressPool(N("172.29.9.0/29"), first, last)


@pytest.mark.parametrize("ip,mac", [
    ("10.244.0.1", "0a:58:0a:f4:00:01"),
    ("10.244.17.1", "0a:58:0a:f4:11:01"),
    ("0.0.0.0", "0a:58:00:00:00:00"),
])
def test_bridge_mac_is_fixed_locally_administered_unicast_from_the_address(ip, mac):
    got = bridge_mac(ip)
    assert got == mac
    first = int(got.split(":")[0], 16)
    assert first & 0b10 and not first & 0b01  # locally administered, unicast


def test_bridge_mac_rejects_what_is_not_an_ipv4_address():
    with pytest.raises(AddressError):
        bridge_mac("fe80::1")
