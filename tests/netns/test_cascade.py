"""The seed article's retry cascade through real pods (root): scripts/cascade.py on deploy/local/cascade.yaml.

Three services upstream of catalog each retry 5xx twice, all through one namespace waypoint;
catalog answers 503 to 30 % of its requests. Without budgets the attempts reaching catalog
multiply; with the mesh's default budget they stay within 1.2x of the requests entering the
chain (counted by the catalog pods themselves); with one replica failing everything, outlier
detection ejects it and the client hardly notices.
"""
import json
import os
import subprocess
import sys

from .cluster_helper import ROOT, LocalCluster

NAME = f"cas{os.getpid() % 100000}"


def test_cascade_amplification_with_and_without_budgets(tmp_path):
    cluster = LocalCluster(NAME, tmp_path)
    try:
        p = subprocess.run([sys.executable, "scripts/cascade.py", "--cluster", NAME, "-n", "800", "-c", "8",
                            "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        phases = {ph["phase"]: ph for ph in json.loads(p.stdout.strip().splitlines()[-1])["phases"]}
    finally:
        cluster.destroy()
    off, on, outlier = phases["no budget"], phases["budget"], phases["outlier"]
    print(json.dumps({k: {f: v[f] for f in ("requests", "catalog_attempts", "amplification", "client_success",
                                            "rps", "client_status", "catalog_per_pod")} for k, v in phases.items()}))
    assert off["requests"] == on["requests"] == 800
    # Each layer retries on its own: 1 + 0.3 + 0.09 at catalog alone, a little more from above.
    assert off["amplification"] > 1.3 and off["client_success"] > 0.97, off
    # The default budget: retries at most max(20 % of the requests, the floor of 10 retries/s over
    # the phase); above 50 requests/s that is the 20 %. (A loaded box ran the phase at 30/s, where
    # the floor governs.) + 8: with -c 8, that many retry decisions can be taken before any of
    # them is counted.
    allowed = max(0.2 * on["requests"], 10 * on["requests"] / on["rps"])
    assert on["catalog_attempts"] <= on["requests"] + allowed + 8, (allowed, on)
    assert on["catalog_attempts"] >= 1.1 * on["requests"], on      # the budget is used, not just refusing
    # One catalog replica fails everything, the other nothing, outlierDetection on catalog: the bad
    # one is ejected after consecutive5xxErrors (5) and the retries go to the healthy one.
    bad, good = list(outlier["catalog_per_pod"].values())
    assert bad <= 10 and good >= 0.99 * outlier["requests"], outlier
    assert outlier["client_success"] >= 0.99, outlier
