"""Smoke test (no root): bench_state.py at a small scale prints every row, with positive numbers."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_state_bench_runs_and_reports_every_lookup():
    p = subprocess.run([sys.executable, os.path.join(HERE, "bench_state.py"), "--json", "--workloads", "600",
                        "--namespaces", "12", "--services", "120", "--policies", "80", "--peer-auths", "20",
                        "--iterations", "200", "--deltas", "3", "--runs", "1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr  # includes: indexed and full-scan decisions agree
    rows = json.loads(p.stdout)
    for name in ("outbound plan, VIP", "outbound plan, pod IP", "inbound authz, all policies (mTLS)",
                 "inbound authz, indexed (mTLS)", "inbound authz, indexed (plain)", "apply_delta, 1 workload",
                 "apply_delta, 1 policy", "first policies_for after a policy delta", "workloads_on_node"):
        assert rows[name] > 0, (name, rows)
