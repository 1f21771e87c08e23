"""Smoke test (root): bench_l7.py --quick on its own cluster prints its table with sane numbers and leaves nothing behind."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from localcluster.paths import ClusterPaths

HERE = os.path.dirname(os.path.abspath(__file__))
SETUPS = ("ztunnel", "waypoint", "envoy")
CLUSTER = f"b7s{os.getpid() % 100000}"
STATE_DIR = ClusterPaths(CLUSTER).state_dir  # /var/lib/ambient/CLUSTER: its CA
RATE = 500


@pytest.mark.root
def test_quick_l7_bench_has_sane_numbers_and_cleans_up(tmp_path):
    try:
        p = subprocess.run([sys.executable, os.path.join(HERE, "bench_l7.py"), "--quick", "--secs", "1",
                            "--rate", str(RATE), "--cluster", CLUSTER, "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=120)
    finally:  # the script must remove its throwaway cluster's CA (ambient down keeps CAs, as it should for users)
        ca_left = os.path.exists(STATE_DIR)
        shutil.rmtree(STATE_DIR, ignore_errors=True)  # never leave it, even when the script failed to
    assert p.returncode == 0, p.stdout + p.stderr
    assert not ca_left, f"{STATE_DIR} left behind"
    [result] = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    with open(tmp_path / result) as f:
        res = json.load(f)
    assert res["failed"] == {} and res["setups"] == list(SETUPS)
    for name in SETUPS:
        row = res["summary"][name]
        assert 0 < row["rps"] < 1e6, (name, row)
        assert 0 < row["p50_ms"] <= row["p99_ms"] < 10_000, (name, row)
        assert 0 < row["paced_rps"] < RATE * 1.5, (name, row)  # paced: not the closed-loop rate
        assert 0 < row["path_cpu_us"] < 100_000, (name, row)
        if name == "ztunnel":
            assert row["wp_rss_mb"] is None and row["rps_x_env"] > 0, row
            continue
        # A waypoint: its own process was measured, and ours is compared with Envoy's.
        assert 1 < row["wp_rss_mb"] < 2_000 and 0 < row["wp_cpu_us"] < row["path_cpu_us"], (name, row)
        for k in ("rps", "p50_ms", "p99_ms", "wp_rss_mb", "wp_cpu_us"):
            assert row[f"{k}_x_env"] > 0, (name, k, row)
    assert res["summary"]["envoy"]["rps_x_env"] == 1.0
    table = p.stdout[p.stdout.index("| setup"):]
    for name in SETUPS:
        assert f"| {name} " in table
    assert "loadavg before" in p.stdout and "waypoint RSS idle" in p.stdout
    assert not os.path.exists(f"/run/ambient/{CLUSTER}")
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"amb-{CLUSTER}-" not in netns
