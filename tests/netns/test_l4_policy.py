"""End to end (root): Istio's standard L4 security examples, unchanged, through two nodes.

foo/web (node n2) is the protected workload; callers: foo/sleep and bar/client (meshed, node
n1) and legacy/old (not meshed: plaintext into web's 15006).
"""
import asyncio
import os
import time

import pytest

from localcluster import api

from .cluster_helper import (LocalCluster, namespace_yaml, nodes_yaml, pod_yaml, service_accounts_yaml,
                           wait_for)

NAME = f"po{os.getpid() % 100000}"

CLUSTER = (nodes_yaml("n1", "n2") + namespace_yaml("foo", ambient=True) + namespace_yaml("bar", ambient=True)
           + namespace_yaml("legacy") + service_accounts_yaml(("foo", "web"), ("foo", "sleep"), ("bar", "client"))
           + "".join([pod_yaml("web", "foo", "n2", "web", "web"), pod_yaml("sleep", "foo", "n1", "sleep", "sleep"),
                      pod_yaml("client", "bar", "n1", "client", "client"), pod_yaml("old", "legacy", "n1", "old")]))

# The Istio documentation's examples, as users have them.
DENY_ALL = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing
  namespace: foo
spec:
  {}
"""
ALLOW_FROM_SA = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-sleep
  namespace: foo
spec:
  selector:
    matchLabels:
      app: web
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/foo/sa/sleep"]
"""
ALLOW_FROM_NS = """
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: allow-bar
  namespace: foo
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        namespaces: ["bar"]
"""
DENY_IPBLOCK = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-node-1-pods
  namespace: foo
spec:
  selector:
    matchLabels:
      app: web
  action: DENY
  rules:
  - from:
    - source:
        ipBlocks: ["10.244.0.0/24"]
    to:
    - operation:
        ports: ["8080"]
"""
STRICT_MESH = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
"""

CALLERS = [("foo", "sleep"), ("bar", "client"), ("legacy", "old")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(NAME, tmp_path_factory.mktemp("policy"))
    c.ambient("down", check=False)
    c.ambient("up", c.write("cluster.yaml", CLUSTER))
    wait_for(lambda: c.enrolled("n2") == ["foo/web"], timeout=10)
    c.web = c.ip("web")
    yield c
    c.destroy()


def reachable(c, ns, src):
    p = c.echo(ns, src, c.web, check=False)
    return p.returncode == 0 and "echo ok" in p.stdout


@pytest.mark.root
@pytest.mark.parametrize("policy, expected", [
    (None, {"sleep": True, "client": True, "old": True}),
    (DENY_ALL, {"sleep": False, "client": False, "old": False}),
    (ALLOW_FROM_SA, {"sleep": True, "client": False, "old": False}),
    (ALLOW_FROM_NS, {"sleep": False, "client": True, "old": False}),
    (DENY_IPBLOCK, {"sleep": False, "client": False, "old": False}),  # all callers run on n1
    (STRICT_MESH, {"sleep": True, "client": True, "old": False}),
], ids=["no-policy", "deny-all", "allow-from-service-account", "allow-from-namespace", "deny-ipblock",
        "strict-mesh-wide"])
def test_istio_examples(cluster, policy, expected):
    if policy:
        cluster.apply(policy, "policy.yaml")
    try:
        got = {src: reachable(cluster, ns, src) for ns, src in CALLERS}
        assert got == expected
    finally:
        if policy:
            cluster.delete(policy, "policy.yaml")
    assert reachable(cluster, "foo", "sleep")  # deleting the policy restores access


@pytest.mark.root
def test_denials_are_recorded_with_reason_and_metric(cluster):
    cluster.apply(ALLOW_FROM_SA, "policy.yaml")
    try:
        assert not reachable(cluster, "bar", "client")
        assert not reachable(cluster, "legacy", "old")
    finally:
        cluster.delete(ALLOW_FROM_SA, "policy.yaml")
    conns = cluster.admin("n2", "/connections")
    denied = [c for c in conns if c.get("error") == "no_allow_match"]
    assert {c.get("src.identity") for c in denied} >= {"spiffe://cluster.local/ns/bar/sa/client", None}
    metrics = cluster.admin("n2", "/metrics")
    assert 'istio_tcp_connections_failed_total{' in metrics and 'response_flags="DENY"' in metrics


@pytest.mark.root
@pytest.mark.parametrize("policy, ns, src", [
    (DENY_ALL, "bar", "client"),        # HBONE tunnel cut
    (STRICT_MESH, "legacy", "old"),     # plaintext connection reset
], ids=["mtls-connection", "plaintext-connection"])
def test_policy_change_closes_open_connections_within_1s(cluster, policy, ns, src):
    conn = cluster.longconn(ns, src, cluster.web, duration=8)
    time.sleep(1.0)
    assert conn.poll() is None  # open and echoing

    async def apply():
        await api.call_async(cluster.paths.runner_socket, "apply", wait=False,
                             sources=[{"name": "policy.yaml", "text": policy, "base_dir": str(cluster.dir)}])
    t0 = time.monotonic()
    asyncio.run(apply())
    try:
        wait_for(lambda: conn.poll() is not None, timeout=3, step=0.01)
        took = time.monotonic() - t0
        out = conn.communicate(timeout=5)[0]
        print(f"{ns}/{src}: closed {took * 1000:.0f} ms after the policy was applied")
        assert conn.returncode != 0 and not out.splitlines()[-1].startswith("ok"), out
        assert took < 1.0
    finally:
        cluster.delete(policy, "policy.yaml")
        if conn.poll() is None:
            conn.kill()
    assert reachable(cluster, ns, src)
