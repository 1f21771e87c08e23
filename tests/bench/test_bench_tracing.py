"""Smoke test: bench_tracing.py runs and its counts add up (small sizes)."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_tracing_bench_reports_numbers():
    p = subprocess.run([sys.executable, os.path.join(HERE, "bench_tracing.py"), "-n", "300"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    off, unsampled, sampled = json.loads(p.stdout)["cases"]
    assert (off["percentage"], unsampled["percentage"], sampled["percentage"]) == (None, 0, 100)
    assert off["exported"] == unsampled["exported"] == 0
    assert sampled["exported"] + sampled["dropped"] == 300 and sampled["flushed"]
    assert all(c["per_request_us"] > 0 for c in (off, unsampled, sampled))
