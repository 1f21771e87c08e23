"""End to end (root): faults mid-stream surface as a reason and leave nothing behind.

A meshed client c1 on n1 holds one long connection to s1 or s2 on n2 (echo servers that reset
a connection on the line RESET) while: the backend resets it, the destination pod is deleted,
the destination node's ztunnel is SIGKILLed. Each time both ztunnels' access logs
(`/connections`) and `istio_tcp_connections_failed` name a reason, and afterwards nothing the
connection used is left: ztunnel's file descriptors (from /proc) are back to what the
remaining pods and pooled connections account for, and `/debug/live` shows no open
connection, handshake, draining pod or extra task.
"""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from .cluster_helper import ROOT, LocalCluster, namespace_yaml, nodes_yaml, pod_yaml, service_accounts_yaml, wait_for

NAME = f"fl{os.getpid() % 100000}"


def server_yaml(name, node):
    return textwrap.dedent(f"""
        ---
        apiVersion: v1
        kind: Pod
        metadata: {{name: {name}, namespace: mesh, labels: {{app: echo}}}}
        spec:
          nodeName: {node}
          serviceAccountName: server
          containers:
          - name: echo
            command: [python3, echo.py, --port, "8080", --reset-on-line, RESET]
        """)


CLUSTER = (nodes_yaml("n1", "n2") + namespace_yaml("mesh", ambient=True)
           + service_accounts_yaml(("mesh", "client"), ("mesh", "server"))
           + pod_yaml("c1", "mesh", "n1", "client", "client") + server_yaml("s1", "n2") + server_yaml("s2", "n2"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(NAME, tmp_path_factory.mktemp("faults"))
    c.ambient("down", check=False)
    try:
        c.ambient("up", c.write("cluster.yaml", CLUSTER))
        wait_for(lambda: len(c.enrolled("n1")) == 1 and len(c.enrolled("n2")) == 2, timeout=20)
        yield c
    finally:
        c.destroy()


def ztunnel_pid(c, node):
    return next(n for n in c.status()["nodes"] if n["name"] == node)["ztunnel"]["pid"]


class Node:
    """One node's ztunnel as the test sees it: /proc fds and the admin endpoints."""

    def __init__(self, c, name):
        self.c, self.name = c, name

    def fds(self):
        return len(os.listdir(f"/proc/{ztunnel_pid(self.c, self.name)}/fd"))

    def live(self):
        return self.c.admin(self.name, "/debug/live")

    def last(self):
        return self.c.admin(self.name, "/connections")[-1]

    def total(self):
        return self.c.admin(self.name, "/config_dump")["connections_total"]

    def failed(self):
        text = self.c.admin(self.name, "/metrics")
        return sum(float(m.group(1)) for m in re.finditer(r"^istio_tcp_connections_failed_total\{[^}]*\} (\S+)$",
                                                          text, re.M))

    def snapshot(self):
        live = self.live()
        return {"fds": self.fds(), "tasks": live["tasks"], "pool": live["pool_connections"],
                "links": live["capture_links"],
                "pods": len(live["pods"]), "hbone": sum(p["hbone_connections"] for p in live["pods"].values())}


def quiet(live):
    """Nothing open: no relay, no handshake, no draining pod."""
    return not live["draining"] and all(p["outbound"] == 0 and p["inbound"] == 0 and p["hbone_handshakes"] == 0
                                        for p in live["pods"].values())


def settled(*pairs, timeout=10.0):
    """Wait until each (node, baseline) is accounted for: fds back to the baseline, less what
    legitimately went away (3 listeners per removed pod, its eBPF link fds, one socket per pooled
    or served HBONE connection that closed), nothing open, no more tasks than before."""
    def state():
        out = []
        for node, base in pairs:
            now, live = node.snapshot(), node.live()
            want = (base["fds"] - 3 * (base["pods"] - now["pods"]) - (base["links"] - now["links"])
                    - (base["pool"] - now["pool"]) - (base["hbone"] - now["hbone"]))
            out.append((quiet(live) and now["fds"] == want and now["tasks"] <= base["tasks"],
                        f"{node.name}: base {base} now {now} want fds {want} live {live}"))
        return out
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(ok for ok, _ in state()):
            return
        time.sleep(0.2)
    raise AssertionError("not settled: " + "; ".join(why for ok, why in state() if not ok))


def warm(c):
    for s in ("s1", "s2"):
        assert "echo ok" in c.echo("mesh", "c1", c.ip(s)).stdout


def run_fault(c, dst, fault, *extra):
    """Hold a long connection c1 -> dst, do `fault` after 1 s; the client's output."""
    p = subprocess.Popen([sys.executable, "-m", "localcluster.cli", "-c", c.name, "exec", "-n", "mesh", "c1", "--",
                          "python3", "longconn.py", c.ip(dst), "8080", "--duration", "10", *extra],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    fault()
    out, _ = p.communicate(timeout=30)
    assert p.returncode != 0 and "broken after" in out, out  # the fault really hit the connection
    return out


def test_backend_reset_is_tcp_reset_and_peer_reset(cluster):
    c = cluster
    warm(c)
    n1, n2 = Node(c, "n1"), Node(c, "n2")
    b1, b2 = n1.snapshot(), n2.snapshot()
    f1, f2, t1, t2 = n1.failed(), n2.failed(), n1.total(), n2.total()
    run_fault(c, "s2", lambda: None, "--send-line", "RESET", "--send-after", "1")
    wait_for(lambda: n1.total() > t1 and n2.total() > t2, timeout=10)
    assert n2.last()["error"] == "tcp_reset" and n2.last()["dst.workload"] == "s2", n2.last()
    assert n1.last()["error"] == "peer_reset" and n1.last()["dst.workload"] == "s2", n1.last()
    assert n1.failed() == f1 + 1 and n2.failed() == f2 + 1
    settled((n1, b1), (n2, b2))
    assert n1.snapshot()["pool"] == b1["pool"]  # the pooled connection survives a reset stream


def test_pod_deleted_mid_stream_is_pod_deleted_and_drops_its_connections(cluster):
    c = cluster
    warm(c)
    n1, n2 = Node(c, "n1"), Node(c, "n2")
    b1, b2 = n1.snapshot(), n2.snapshot()
    t1, t2 = n1.total(), n2.total()
    run_fault(c, "s1", lambda: c.delete(server_yaml("s1", "n2"), name="s1.yaml"))
    wait_for(lambda: n1.total() > t1 and n2.total() > t2, timeout=10)
    # Whichever ztunnel learns of the deletion first cuts the connection with pod_deleted; the
    # other may see the HBONE connection go first (connection_lost).
    assert n2.last()["dst.workload"] == "s1" and n2.last()["error"] in ("pod_deleted", "connection_lost"), n2.last()
    assert n1.last()["dst.workload"] == "s1" and n1.last()["error"] in ("pod_deleted", "connection_lost",
                                                                        "peer_reset"), n1.last()
    assert "pod_deleted" in (n1.last()["error"], n2.last()["error"])
    settled((n1, b1), (n2, b2))
    # The pooled connection to the deleted pod is gone (not left for a new pod at its IP),
    # and so is every socket in its netns.
    assert n1.snapshot()["pool"] == b1["pool"] - 1
    assert n2.snapshot()["pods"] == b2["pods"] - 1 and not n2.live()["draining"]


def test_peer_ztunnel_killed_is_connection_lost_and_recovers(cluster):
    c = cluster
    assert "echo ok" in c.echo("mesh", "c1", c.ip("s2")).stdout
    n1, n2 = Node(c, "n1"), Node(c, "n2")
    b1 = n1.snapshot()
    t1, f1 = n1.total(), n1.failed()
    run_fault(c, "s2", lambda: os.kill(ztunnel_pid(c, "n2"), signal.SIGKILL))
    wait_for(lambda: n1.total() > t1, timeout=10)
    assert n1.last()["dst.workload"] == "s2" and n1.last()["error"] == "connection_lost", n1.last()
    assert n1.failed() == f1 + 1
    settled((n1, b1))
    assert n1.snapshot()["pool"] == b1["pool"] - 1  # the dead peer's connection left the pool
    # The runner restarts n2's ztunnel; traffic flows again.
    wait_for(lambda: (lambda z: z["ready"] and z["restarts"] >= 1)(
        next(n for n in c.status()["nodes"] if n["name"] == "n2")["ztunnel"]), timeout=15, step=0.2)
    wait_for(lambda: len(c.enrolled("n2")) == 1, timeout=10)
    assert "echo ok" in c.echo("mesh", "c1", c.ip("s2")).stdout
    assert quiet(n2.live())


def test_node_link_down_and_up(cluster):
    """n2's eth0 goes down and up (`ip link set`): a long connection across a 2 s outage
    survives byte-exact (TCP retransmits; the runner puts back the routes the kernel dropped
    with the link within 2 s). A new connection during a longer outage, offered to the
    pooled HBONE connection that went silent, fails at the CONNECT deadline (10 s) with
    connect_timeout, and that connection leaves the pool; with the link up again, traffic
    flows on a new connection and nothing is left behind."""
    c = cluster
    link = ["ip", "-n", f"{c.paths.prefix}-n-n2", "link", "set", "eth0"]
    warm_s2 = c.echo("mesh", "c1", c.ip("s2"))
    assert "echo ok" in warm_s2.stdout
    n1 = Node(c, "n1")
    b1 = n1.snapshot()
    t1, f1 = n1.total(), n1.failed()
    long = subprocess.Popen([sys.executable, "-m", "localcluster.cli", "-c", c.name, "exec", "-n", "mesh", "c1", "--",
                             "python3", "longconn.py", c.ip("s2"), "8080", "--duration", "8", "--timeout", "20"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    subprocess.run([*link, "down"], check=True)
    try:
        time.sleep(2.0)
        subprocess.run([*link, "up"], check=True)  # a short outage first: the long one survives
        out, _ = long.communicate(timeout=30)
        assert out.strip().splitlines()[-1].startswith("ok"), out
        wait_for(lambda: n1.total() > t1, timeout=10)
        assert n1.last().get("error") is None, n1.last()
        t1 = n1.total()
        subprocess.run([*link, "down"], check=True)
        t0 = time.monotonic()
        p = subprocess.Popen(
            [sys.executable, "-m", "localcluster.cli", "-c", c.name, "exec", "-n", "mesh", "c1", "--", "python3",
             "client.py", c.ip("s2"), "8080", "--timeout", "30"], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        out, _ = p.communicate(timeout=40)
        failed_after = time.monotonic() - t0
    finally:
        subprocess.run([*link, "up"], check=True)
    assert p.returncode != 0 and "echo ok" not in out, out
    assert 8 < failed_after < 20, failed_after  # at the CONNECT deadline, not the app's 30 s
    wait_for(lambda: n1.total() > t1, timeout=10)
    assert n1.last()["error"] == "connect_timeout" and n1.last()["dst.workload"] == "s2", n1.last()
    assert n1.failed() == f1 + 1
    # The link is back: a new HBONE connection carries new traffic; the silent one is gone.
    wait_for(lambda: "echo ok" in c.echo("mesh", "c1", c.ip("s2"), check=False).stdout, timeout=20, step=0.5)
    settled((n1, b1), timeout=40)  # the suspect connection closes once its TLS shutdown ends
