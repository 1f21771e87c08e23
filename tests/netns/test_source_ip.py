"""End to end (root): the destination app sees the client's pod IP, and dual-stack sockets are captured.

ztunnel dials the app from the client's address (IP_TRANSPARENT, as Istio's ztunnel does), so
`getpeername()` in the app, the access log and `source.ip`/`ipBlocks` policies all name the
same address; the eBPF capture passes exactly those dials (no loop) and an AF_INET6 socket
connecting to a v4-mapped address (grpcio does) is captured like any IPv4 connect.

foo/web (node n2) serves; callers: foo/sleep (meshed, n1: HBONE across nodes), foo/near
(meshed, n2: HBONE on the same node) and legacy/old (not meshed, n1: plaintext into 15006).
"""
import os
import textwrap

import pytest

from .cluster_helper import LocalCluster, Tcpdump, namespace_yaml, nodes_yaml, pod_yaml, service_accounts_yaml, wait_for

NAME = f"si{os.getpid() % 100000}"
CLUSTER = (nodes_yaml("n1", "n2") + namespace_yaml("foo", ambient=True) + namespace_yaml("legacy")
           + service_accounts_yaml(("foo", "web"), ("foo", "sleep"))
           + "".join([pod_yaml("web", "foo", "n2", "web", "web"), pod_yaml("sleep", "foo", "n1", "sleep", "sleep"),
                      pod_yaml("near", "foo", "n2", "near"), pod_yaml("old", "legacy", "n1", "old")]))
CALLERS = [("foo", "sleep"), ("foo", "near"), ("legacy", "old")]

# An AF_INET6 (dual-stack) client, as grpcio and many runtimes open them.
DUAL_STACK = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect((sys.argv[1], int(sys.argv[2])))
    except OSError as e:
        print("error", type(e).__name__)
        raise SystemExit(0)
    print(s.makefile("rb").readline().decode().strip())
    """)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(NAME, tmp_path_factory.mktemp("srcip"))
    c.ambient("down", check=False)
    c.ambient("up", c.write("cluster.yaml", CLUSTER))
    wait_for(lambda: sorted(c.enrolled("n2")) == ["foo/near", "foo/web"] and c.enrolled("n1") == ["foo/sleep"],
             timeout=15)
    st = c.status()
    c.ips = {p["name"]: p["ip"] for p in st["pods"]}
    c.write("dual.py", DUAL_STACK)
    yield c
    c.destroy()


def greeting(c, ns, src, dst_ip, port=8080):
    p = c.echo(ns, src, dst_ip, port=port, check=False)
    return p.stdout if p.returncode == 0 and "echo ok" in p.stdout else None


def capture_stats(c, node):
    return c.admin(node)["capture"]["counters"]


def allow_block(c, name, action, blocks, key=None):
    rule = (f"  - when:\n    - key: {key}\n      values: {blocks}\n" if key
            else f"  - from:\n    - source:\n        ipBlocks: {blocks}\n")
    return (f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n"
            f"  namespace: foo\nspec:\n  selector:\n    matchLabels:\n      app: web\n  action: {action}\n"
            f"  rules:\n{rule}")


@pytest.mark.root
def test_app_sees_the_client_pod_ip(cluster):
    c, web = cluster, cluster.ips["web"]
    before = capture_stats(c, "n2")
    total = c.admin("n2")["connections_total"]
    for ns, src in CALLERS:
        out = greeting(c, ns, src, web)
        assert out is not None, (ns, src)
        # echo.py: "hello from web (foo) local=<ip>:8080 peer=<ip>:<port>"
        assert f"local={web}:8080 peer={c.ips[src]}:" in out, (src, out)
    after = capture_stats(c, "n2")
    # each inbound dial was ztunnel's own, passed by sk_lookup (not steered back: no loop)
    assert after["sklookup_ztunnel_dial"] - before["sklookup_ztunnel_dial"] == 3
    assert after["ztunnel_dial_recorded"] - before["ztunnel_dial_recorded"] == 3
    # n2 records one inbound connection per request, plus near's outbound one: a loop would
    # add one more per re-capture
    wait_for(lambda: c.admin("n2")["connections_total"] == total + 4, timeout=5)
    logged = [e for e in c.admin("n2", "/connections")[-4:] if e.get("direction") == "inbound"]
    assert sorted(e["src.addr"].split(":")[0] for e in logged) == sorted(c.ips[s] for _, s in CALLERS)


@pytest.mark.root
@pytest.mark.parametrize("policy, expected", [
    (("allow-sleep-ip", "ALLOW", "[{sleep}]", None), {"sleep": True, "near": False, "old": False}),
    (("deny-near-ip", "DENY", "[{near}/32]", None), {"sleep": True, "near": False, "old": True}),
    (("allow-n1-pods", "ALLOW", "[10.244.0.0/24]", None), {"sleep": True, "near": False, "old": True}),
    (("deny-old-source-ip", "DENY", "[{old}]", "source.ip"), {"sleep": True, "near": True, "old": False}),
], ids=["allow-ipblock", "deny-ipblock", "allow-cidr", "deny-when-source-ip"])
def test_source_ip_policies_match_what_the_app_sees(cluster, policy, expected):
    c = cluster
    name, action, blocks, key = policy
    text = allow_block(c, name, action, blocks.format(**c.ips), key)
    c.apply(text, "policy.yaml")
    try:
        got = {}
        for ns, src in CALLERS:
            out = greeting(c, ns, src, c.ips["web"])
            got[src] = out is not None
            if out is not None:   # allowed: the app saw the address the policy matched
                assert f"peer={c.ips[src]}:" in out, out
        assert got == expected
    finally:
        c.delete(text, "policy.yaml")
    assert greeting(c, "legacy", "old", c.ips["web"]) is not None


@pytest.mark.root
def test_dual_stack_socket_is_captured_into_mtls(cluster, tmp_path):
    c, web = cluster, cluster.ips["web"]
    before = capture_stats(c, "n1")
    total = c.admin("n2")["connections_total"]
    dump = Tcpdump.fabric(tmp_path / "dual.pcap", c.paths)
    try:
        out = c.ambient("exec", "-n", "foo", "sleep", "--", "python3", "dual.py", f"::ffff:{web}", "8080").stdout
    finally:
        raw, ports = dump.stop(), dump.ports()
    assert f"local={web}:8080 peer={c.ips['sleep']}:" in out, out
    # on the wire between the nodes: HBONE only, the app's bytes never in the clear
    assert 15008 in ports and 8080 not in ports, ports
    assert b"hello from web" not in raw
    after = capture_stats(c, "n1")
    assert after["connect6_mapped"] == before["connect6_mapped"] + 1
    # it went through the mesh: n1's outbound record says mTLS, n2 saw sleep's identity
    wait_for(lambda: c.admin("n2")["connections_total"] > total, timeout=5)
    out_rec = [e for e in c.admin("n1", "/connections") if e.get("direction") == "outbound"][-1]
    assert out_rec["security"] == "mutual_tls" and out_rec["dst.addr"] == f"{web}:8080", out_rec
    in_rec = [e for e in c.admin("n2", "/connections") if e.get("direction") == "inbound"][-1]
    assert in_rec["src.identity"] == "spiffe://cluster.local/ns/foo/sa/sleep", in_rec
    # pure IPv6 cannot be carried by the IPv4 mesh: refused in the meshed pod
    out = c.ambient("exec", "-n", "foo", "sleep", "--", "python3", "dual.py", "fd00::1", "8080").stdout
    assert out.strip() == "error PermissionError", out
    assert capture_stats(c, "n1")["connect6_refused"] == after["connect6_refused"] + 1
