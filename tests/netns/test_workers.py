"""End to end (root): several ztunnel workers per node share the in-pod ports (SO_REUSEPORT),
and any live worker serves every pod of its node: one dying loses only its own connections."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .cluster_helper import APPS, ROOT, LocalCluster, namespace_yaml, nodes_yaml, pod_yaml, wait_for

NAME = f"wk{os.getpid() % 100000}"
CLUSTER = (nodes_yaml("n1", "n2") + namespace_yaml("mesh", ambient=True) + namespace_yaml("plain")
           + "".join([pod_yaml("m1", "mesh", "n1", "a"), pod_yaml("m3", "mesh", "n2", "b"),
                      pod_yaml("p1", "plain", "n1", "c"), pod_yaml("p2", "plain", "n2", "d")]))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("workers")
    c = LocalCluster(NAME, d)
    os.symlink(os.path.join(APPS, "steady.py"), d / "steady.py")
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
    for node in ("n1", "n2"):  # every worker enrolled its pods, each in its own capture slot
        wait_for(lambda: all(worker_dump(cluster, node, w)["enrolled"] for w in (0, 1)), timeout=10)
        caps = [worker_dump(cluster, node, w)["capture"] for w in (0, 1)]
        assert [(cp["worker"], cp["owner"]) for cp in caps] == [(0, True), (1, False)]
        meshed = [p["ip"] for p in st["pods"] if p["node"] == node and p["namespace"] == "mesh"]
        wait_for(lambda: all(worker_dump(cluster, node, 0)["capture"]["listener_slots"].get(ip) == [0, 1]
                             for ip in meshed), timeout=5)
    m3, p2, p1 = cluster.ip("m3"), cluster.ip("p2"), cluster.ip("p1")
    for _ in range(16):
        out = cluster.echo("plain", "p1", m3).stdout                 # inbound plaintext (15006) on n2
        assert "echo ok" in out and f"peer={p1}:" in out, out       # either worker keeps p1's IP
        assert "echo ok" in cluster.echo("mesh", "m1", p2).stdout    # outbound passthrough (15001) on n1
    assert "echo ok" in cluster.echo("mesh", "m1", m3, nbytes=5_000_000).stdout  # HBONE across workers
    n2 = [worker_dump(cluster, "n2", w)["connections_total"] for w in (0, 1)]
    n1 = [worker_dump(cluster, "n1", w)["connections_total"] for w in (0, 1)]
    print(f"connections per worker: n1 {n1}, n2 {n2}")
    assert all(x > 0 for x in n1 + n2)  # the kernel spread them over both workers


@pytest.mark.root
def test_a_dead_worker_loses_only_its_connections_the_others_serve_its_pods(cluster):
    """SIGKILL worker 0 of the destination node, then of the source node, then worker 1, under
    steady short connections m1 -> m3: while each is dead (the runner restarts it after >= 1 s
    of backoff) the other worker carries every round, and at most the rounds that were on the
    dead one at that moment fail."""
    c = cluster
    m3 = c.ip("m3")
    stop = c.dir / "stop-steady"
    steady = subprocess.Popen([sys.executable, "-m", "localcluster.cli", "-c", c.name, "exec", "-n", "mesh", "m1",
                               "--", "python3", "steady.py", m3, "8080", "--interval", "0.01", "--duration", "60",
                               "--stop-file", str(stop), "--log"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kills = []
    try:
        time.sleep(1.5)
        for node, worker in (("n2", 0), ("n1", 0), ("n2", 1)):
            old = worker_dump(c, node, worker)["pid"]
            kills.append((node, worker, time.monotonic()))
            os.kill(old, signal.SIGKILL)

            def back():
                try:
                    d = worker_dump(c, node, worker)
                except (OSError, AssertionError):
                    return False
                return d["pid"] != old and len(d["enrolled"]) == 1
            wait_for(back, timeout=20, step=0.1)
            time.sleep(0.5)
        stop.touch()
        out, _ = steady.communicate(timeout=30)
    finally:
        if steady.poll() is None:
            steady.kill()
            steady.wait()
    rounds = [(w[1], float(w[2])) for w in (line.split() for line in out.splitlines()) if w[:1] == ["round"]]
    tally = json.loads(out.strip().splitlines()[-1])
    print(f"steady: {tally['ok']} ok, {tally['failed']} failed {tally['failures']}")
    for node, worker, t in kills:
        # the worker is surely down for 1 s (the runner's first restart backoff)
        during = [r for r, ts in rounds if t + 0.2 <= ts <= t + 1.0]
        print(f"{node} worker {worker} dead: {len(during)} rounds in 0.8 s, {during.count('failed')} failed")
        assert len(during) >= 5 and "failed" not in during, (node, worker, during)
    # only connections in flight on the dead worker at the kill (<= 3 each) are lost
    assert tally["failed"] <= 3 * len(kills), tally
    for ts in (ts for r, ts in rounds if r == "failed"):
        assert any(0 <= ts - t + 0.05 <= 1.0 for _, _, t in kills), (ts, kills)
    assert tally["ok"] > 100
