"""End to end (root): several ztunnel workers per node share the in-pod ports (SO_REUSEPORT)."""
import os

import pytest

from .cluster_helper import LocalCluster, namespace_yaml, nodes_yaml, pod_yaml, wait_for

NAME = f"wk{os.getpid() % 100000}"
CLUSTER = (nodes_yaml("n1", "n2") + namespace_yaml("mesh", ambient=True) + namespace_yaml("plain")
           + "".join([pod_yaml("m1", "mesh", "n1", "a"), pod_yaml("m3", "mesh", "n2", "b"),
                      pod_yaml("p1", "plain", "n1", "c"), pod_yaml("p2", "plain", "n2", "d")]))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(NAME, tmp_path_factory.mktemp("workers"))
    c.ambient("down", check=False)
    c.ambient("up", "--ztunnel-workers", "2", c.write("cluster.yaml", CLUSTER))
    yield c
    c.destroy()


def worker_dump(c, node, worker):
    return c.admin(node, worker=worker)


@pytest.mark.root
def test_workers_share_the_ports_and_the_load(cluster):
    st = cluster.status()
    assert all(n["ztunnel"]["workers"] == 2 for n in st["nodes"])
    for node in ("n1", "n2"):  # every worker enrolled its pods; only worker 0 attached capture
        wait_for(lambda: all(worker_dump(cluster, node, w)["enrolled"] for w in (0, 1)), timeout=10)
        assert worker_dump(cluster, node, 0)["capture"] is not None
        assert worker_dump(cluster, node, 1)["capture"] is None
    m3, p2 = cluster.ip("m3"), cluster.ip("p2")
    for _ in range(16):
        assert "echo ok" in cluster.echo("plain", "p1", m3).stdout   # inbound plaintext (15006) on n2
        assert "echo ok" in cluster.echo("mesh", "m1", p2).stdout    # outbound passthrough (15001) on n1
    assert "echo ok" in cluster.echo("mesh", "m1", m3, nbytes=5_000_000).stdout  # HBONE across workers
    n2 = [worker_dump(cluster, "n2", w)["connections_total"] for w in (0, 1)]
    n1 = [worker_dump(cluster, "n1", w)["connections_total"] for w in (0, 1)]
    print(f"connections per worker: n1 {n1}, n2 {n2}")
    assert all(x > 0 for x in n1 + n2)  # the kernel spread them over both workers
