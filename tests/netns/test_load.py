"""End to end (root): N concurrent long-lived connections through a ztunnel pair, byte-exact.

A client pod on n1 opens N connections (`AMBIENT_LOAD_N`, default 10,000, about 20 s;
tests/bench/load.py N runs other sizes) to an echo server pod on n2: every one goes client app ->
ztunnel n1 (outbound, HBONE pooled up to 100 streams per connection) -> ztunnel n2 (inbound)
-> app. Each echoes a distinct 1 KiB payload exactly, then all sit idle. Measured from /proc
for both ztunnels: RSS and fd count before, with N idle streams open, and after close. Bounds:
RSS growth per connection at most 25 KiB on either side, and at N >= 10,000 at most 200 MB
per ztunnel; after close every fd is back to the baseline within 30 s (the pool releases
unused HBONE connections after `ZTUNNEL_POOL_UNUSED_RELEASE_TIMEOUT`, 2 s here) and
/debug/live shows no open relay or pooled connection. Numbers are printed (`-s`).
"""
import json
import os
import queue
import subprocess
import sys
import threading
import time

import pytest

from .cluster_helper import APPS, ROOT, LocalCluster, namespace_yaml, nodes_yaml, pod_yaml, service_accounts_yaml, wait_for

NAME = f"ld{os.getpid() % 100000}"
N = int(os.environ.get("AMBIENT_LOAD_N", "10000"))
PAYLOAD = 1024
PER_CONN_KIB = 25
RSS_CAP_MB_AT_10K = 200

CLUSTER = (nodes_yaml("n1", "n2") + namespace_yaml("mesh", ambient=True)
           + service_accounts_yaml(("mesh", "client"), ("mesh", "server"))
           + pod_yaml("c1", "mesh", "n1", "client", "client") + pod_yaml("s1", "mesh", "n2", "server", "server"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(NAME, tmp_path_factory.mktemp("load"))
    os.symlink(os.path.join(APPS, "manyconn.py"), c.dir / "manyconn.py")
    c.ambient("down", check=False)
    os.environ["ZTUNNEL_POOL_UNUSED_RELEASE_TIMEOUT"] = "2"  # `ambient up` passes ZTUNNEL_* on
    try:
        c.ambient("up", c.write("cluster.yaml", CLUSTER))
        wait_for(lambda: c.enrolled("n1") == ["mesh/c1"] and c.enrolled("n2") == ["mesh/s1"], timeout=20)
        yield c
    finally:
        os.environ.pop("ZTUNNEL_POOL_UNUSED_RELEASE_TIMEOUT", None)
        c.destroy()


def proc_sample(pid):
    with open(f"/proc/{pid}/status") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return {"rss_kib": rss_kib, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


class Lines:
    """manyconn's stdout, read by a thread so waiting for a line has a deadline."""

    def __init__(self, p):
        self.q = queue.Queue()
        self.seen = []
        threading.Thread(target=lambda: [self.q.put(x) for x in p.stdout] + [self.q.put(None)], daemon=True).start()

    def json(self, timeout):
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.q.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if line.startswith("{"):
                return json.loads(line)
        raise AssertionError(f"no result line from manyconn in {timeout:.0f}s: {''.join(self.seen)[-2000:]}")


def open_relays(live):
    return {k: sum(pp[k] for pp in live["pods"].values()) for k in ("outbound", "inbound", "hbone_connections")}


def run_load(c, n):
    """Hold `n` connections c1 -> s1, measure both ztunnels; the numbers as a dict."""
    pids = {nd["name"]: nd["ztunnel"]["pid"] for nd in c.status()["nodes"]}
    live0 = {nd: c.admin(nd, "/debug/live") for nd in pids}
    assert all(l["fd_limit"] >= n + 500 for l in live0.values()), \
        f"ztunnel fd limit too low for {n} connections: {[l['fd_limit'] for l in live0.values()]}"
    base = {nd: proc_sample(pid) for nd, pid in pids.items()}
    p = subprocess.Popen([sys.executable, "-m", "localcluster.cli", "-c", c.name, "exec", "-n", "mesh", "c1", "--",
                          "python3", "manyconn.py", c.ip("s1"), "8080", "--n", str(n), "--bytes", str(PAYLOAD)],
                         cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = Lines(p)
    try:
        opened = lines.json(timeout=60 + n / 20)
        assert (opened["open"], opened["failed"], opened["echo_mismatch"]) == (n, 0, 0), opened
        time.sleep(1)  # idle: nothing in flight
        peak = {nd: proc_sample(pid) for nd, pid in pids.items()}
        relays = {nd: open_relays(c.admin(nd, "/debug/live")) for nd in pids}
        assert relays["n1"]["outbound"] == n and relays["n2"]["inbound"] == n, relays
        p.stdin.write("close\n")
        p.stdin.flush()
        closed = lines.json(timeout=60)
        assert closed == {"phase": "closed", "closed": n, "broken_while_idle": 0}, closed
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
    t0 = time.monotonic()
    wait_for(lambda: all(proc_sample(pid)["fds"] <= base[nd]["fds"] for nd, pid in pids.items()), timeout=30,
             step=0.2)
    fds_back_s = time.monotonic() - t0
    after = {nd: proc_sample(pid) for nd, pid in pids.items()}
    live = {nd: c.admin(nd, "/debug/live") for nd in pids}
    for nd, l in live.items():
        assert open_relays(l) == {"outbound": 0, "inbound": 0, "hbone_connections": 0}, (nd, l)
        assert l["pool_connections"] == 0 and l["tasks"] <= live0[nd]["tasks"] + 2, (nd, l, live0[nd])
    res = {"n": n, "payload_bytes": PAYLOAD, "open_secs": opened["secs"], "fds_back_secs": round(fds_back_s, 2)}
    for nd in pids:
        grow = peak[nd]["rss_kib"] - base[nd]["rss_kib"]
        res[nd] = {"rss_base_mib": round(base[nd]["rss_kib"] / 1024, 1),
                   "rss_open_mib": round(peak[nd]["rss_kib"] / 1024, 1),
                   "rss_after_mib": round(after[nd]["rss_kib"] / 1024, 1),
                   "kib_per_conn": round(grow / n, 2),
                   "fds_base": base[nd]["fds"], "fds_open": peak[nd]["fds"], "fds_after": after[nd]["fds"]}
    return res


@pytest.mark.root
def test_many_long_lived_connections_are_byte_exact_and_leave_nothing(cluster):
    res = run_load(cluster, N)
    print("load: " + json.dumps(res))
    for nd in ("n1", "n2"):
        r = res[nd]
        assert r["kib_per_conn"] <= PER_CONN_KIB, (nd, r)
        assert r["fds_open"] >= r["fds_base"] + N, (nd, r)  # the connections really went through it
        if N >= 10_000:
            assert r["rss_open_mib"] <= RSS_CAP_MB_AT_10K, (nd, r)
