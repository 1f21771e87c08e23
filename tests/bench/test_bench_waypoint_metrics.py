"""Smoke test: bench_waypoint_metrics.py runs and reports a consistent exposition (small sizes)."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _empty_exposition_lines() -> int:
    from waypoint.telemetry import WaypointMetrics
    out = WaypointMetrics().exposition()
    text = out if isinstance(out, (str, bytes)) else b"".join(out)
    return (text.encode() if isinstance(text, str) else text).count(b"\n")


def test_metrics_bench_reports_numbers():
    p = subprocess.run([sys.executable, os.path.join(HERE, "bench_waypoint_metrics.py"), "--services", "20",
                        "--per-service", "3", "--runs", "2"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["series"] == 60
    # per series: 1 counter line + 3 histograms x (buckets + +Inf + sum + count); plus what an
    # empty registry already prints (family headers, the series-overflow counter, ...)
    assert res["lines"] == 60 * (1 + (19 + 3) + 2 * (9 + 3)) + _empty_exposition_lines()
    assert res["streamed_s_min"] > 0 and res["joined_s_min"] > 0
