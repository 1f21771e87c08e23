"""Smoke test (root): bench_l4.py --quick on its own cluster gives positive numbers and leaves nothing behind."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from localcluster.paths import ClusterPaths

HERE = os.path.dirname(os.path.abspath(__file__))
SETUPS = ("direct", "ambient", "envoy")
CLUSTER = f"bs{os.getpid() % 100000}"
STATE_DIR = ClusterPaths(CLUSTER).state_dir  # /var/lib/ambient/CLUSTER: its CA


@pytest.mark.root
def test_quick_bench_has_numbers_and_cleans_up(tmp_path):
    try:
        p = subprocess.run([sys.executable, os.path.join(HERE, "bench_l4.py"), "--quick", "--secs", "2",
                            "--rate", "500",
                            "--cluster", CLUSTER, "--setups", ",".join(SETUPS), "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=180)
    finally:  # the script must remove its throwaway cluster's CA (ambient down keeps CAs, as it should for users)
        ca_left = os.path.exists(STATE_DIR)
        shutil.rmtree(STATE_DIR, ignore_errors=True)  # never leave it, even when the script failed to
    assert p.returncode == 0, p.stdout + p.stderr
    assert not ca_left, f"{STATE_DIR} left behind"
    [result] = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    with open(tmp_path / result) as f:
        res = json.load(f)
    assert res["failed"] == {}
    for name in SETUPS:
        row = res["summary"][name]
        for key in ("rps", "p50_ms", "p99_ms", "gbps"):
            assert row[key] > 0, (name, key, row)
        [(rate, at)] = row["rates"].items()  # the constant-rate run: latency from the intended send
        assert rate == "500" and at["achieved_rps"] > 0 and 0 < at["p50_ms"] <= at["p99_ms"], (name, at)
        assert at["added_p99_ms"] is not None, (name, at)
        if name != "direct":  # a proxy setup: its processes were measured
            assert row["rss_mb"] > 0 and row["cpu_http_pct"] > 0, (name, row)
    assert "| envoy " in p.stdout and "added p99 ms" in p.stdout and "loadavg before" in p.stdout
    assert not os.path.exists(f"/run/ambient/{CLUSTER}")
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"amb-{CLUSTER}-" not in netns
