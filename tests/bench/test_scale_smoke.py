"""Smoke test (root): scale_l4.py with 2 ztunnel workers per node measures each worker, sees the
SO_REUSEPORT spread (one HBONE connection per client worker) and leaves nothing behind."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from localcluster.paths import ClusterPaths

HERE = os.path.dirname(os.path.abspath(__file__))
CLUSTER = f"sc{os.getpid() % 100000}"
STATE_DIR = ClusterPaths(CLUSTER).state_dir  # /var/lib/ambient/CLUSTER: its CA


@pytest.mark.root
def test_two_workers_spread_and_clean_up(tmp_path):
    cpus = sorted(os.sched_getaffinity(0))
    pin = ["--pin", f"{cpus[0]}:{cpus[-1]}"] if len(cpus) > 1 else []  # pinning needs two CPUs
    try:
        p = subprocess.run([sys.executable, os.path.join(HERE, "scale_l4.py"), "--workers", "2", "--setups", "ambient",
                            "--secs", "1", *pin, "--cluster", CLUSTER, "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=120)
    finally:  # the script must remove its throwaway cluster's CA (ambient down keeps CAs, as it should for users)
        ca_left = os.path.exists(STATE_DIR)
        shutil.rmtree(STATE_DIR, ignore_errors=True)  # never leave it, even when the script failed to
    assert p.returncode == 0, p.stdout + p.stderr
    assert not ca_left, f"{STATE_DIR} left behind"
    [result] = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    with open(tmp_path / result) as f:
        rows = json.load(f)["rows"]
    assert [r["mode"] for r in rows] == ["unpinned"] + ([f"pinned {pin[1]}"] if pin else [])
    for r in rows:
        assert r["rps"] > 0 and r["workers"] == 2, r
        assert sorted(r["cpu_pct"]) == ["n1 w0", "n1 w1", "n2 w0", "n2 w1"], r["cpu_pct"]
        assert sum(r["cpu_pct"].values()) > 0 and set(r["us_per_req"]) == {"n1", "n2"}, r
        conns = r["conns"]
        client = [conns.get(f"n1 w{i}", {}) for i in (0, 1)]
        assert sum(c.get("pod-in", 0) for c in client) == 32, conns  # every wrk connection, on some worker
        for c in client:  # 32 streams fit one HBONE connection: one per client worker that has pod connections
            assert c.get("hbone-out", 0) == (1 if c.get("pod-in") else 0), conns
        hbone_in = sum(conns.get(f"n2 w{i}", {}).get("hbone-in", 0) for i in (0, 1))
        assert hbone_in == sum(c["hbone-out"] for c in client), conns
        assert sum(conns.get(f"n2 w{i}", {}).get("app-out", 0) for i in (0, 1)) == 32, conns
        assert set(r["busiest"]) == {"n1", "n2"}, r  # both nodes' workers did work
    assert "busiest share" in p.stdout and "loadavg before" in p.stdout
    assert not os.path.exists(f"/run/ambient/{CLUSTER}")
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"amb-{CLUSTER}-" not in netns
