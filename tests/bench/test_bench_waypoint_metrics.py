"""Smoke test: bench_waypoint_metrics.py runs and reports a consistent exposition (small sizes)."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_metrics_bench_reports_numbers():
    p = subprocess.run([sys.executable, os.path.join(HERE, "bench_waypoint_metrics.py"), "--services", "20",
                        "--per-service", "3", "--runs", "2"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["series"] == 60
    # per series: 1 counter line + 3 histograms x (buckets + +Inf + sum + count); plus headers
    # (4 families), the series-overflow counter (3 lines) and the empty mirror counter (2)
    assert res["lines"] == 60 * (1 + (19 + 3) + 2 * (9 + 3)) + 2 * 4 + 3 + 2
    assert res["streamed_s_min"] > 0 and res["joined_s_min"] > 0
