#!/usr/bin/env python3
"""Crash recovery bench (not in CI; tests/netns/test_l4_datapath.py checks the same functionally).

Builds a 2-node cluster (c1 on n1 -> s1 on n2, meshed), keeps tests/netns/crash_probe.py
sending from c1 to s1, and `--cycles` times SIGKILLs a node's ztunnel (n1 and n2 in turn:
the source side, then the destination side). For each: how long the node was without
ztunnel (kill -> the runner's restart, its backoff included), that every attempt meanwhile
was refused (fail closed), and the recovery: first successful request after the new process
started (its /proc start time) -- the target is < 1 s. Prints a table, writes JSON, exits 1
if a recovery took `--bound` (1 s) or more or an attempt got through while ztunnel was dead.

    sudo flock /tmp/netns.lock .venv/bin/python tests/bench/crash_recovery.py [--cycles 6]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from tests.netns.cluster_helper import LocalCluster, wait_for  # noqa: E402
from tests.netns.test_outage import CLUSTER  # noqa: E402


def boot_start(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")


def ztunnel(c: LocalCluster, node: str) -> dict:
    return next(n for n in c.status()["nodes"] if n["name"] == node)["ztunnel"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=6)
    p.add_argument("--bound", type=float, default=1.0, help="recovery target in seconds (1.0)")
    p.add_argument("--cluster", default=f"cr{os.getpid() % 100000}")
    p.add_argument("--out", default=".", help="directory for crash-recovery-<time>.json")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="crash-"))
    c = LocalCluster(a.cluster, work)
    rows: list[dict] = []
    lines: list[str] = []
    probe = None
    try:
        c.ambient("down", check=False)
        c.ambient("up", c.write("cluster.yaml", CLUSTER))
        wait_for(lambda: c.enrolled("n1") == ["mesh/c1"] and c.enrolled("n2") == ["mesh/s1"], timeout=30)
        target = f"{c.ip('s1')}:8080"
        stop = work / "stop"
        probe = subprocess.Popen([sys.executable, "-m", "localcluster.cli", "-c", c.name, "exec", "-n", "mesh", "c1",
                                  "--", "python3", os.path.join(ROOT, "tests", "netns", "crash_probe.py"),
                                  "--nonce", "bench", "--target", target, "--interval", "0.01",
                                  "--duration", str(60 + 40 * a.cycles), "--stop-file", str(stop)],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=lambda: lines.extend(iter(probe.stdout.readline, "")), daemon=True).start()

        def attempts():
            return [(w[3], float(w[4])) for w in (ln.split() for ln in list(lines)) if w[:1] == ["attempt"]]
        wait_for(lambda: any(r == "ok" for r, _ in attempts()), timeout=20, step=0.1)
        for i in range(a.cycles):
            node = ("n1", "n2")[i % 2]
            time.sleep(2.0)   # steady state between crashes
            old = ztunnel(c, node)
            kill = time.clock_gettime(time.CLOCK_BOOTTIME)
            os.kill(old["pid"], signal.SIGKILL)
            wait_for(lambda: ztunnel(c, node)["pid"] not in (None, old["pid"]), timeout=60, step=0.05)
            spawn = boot_start(ztunnel(c, node)["pid"])
            wait_for(lambda: any(r == "ok" and t > spawn for r, t in attempts()), timeout=20, step=0.02)
            tries = attempts()
            down = [r for r, t in tries if kill + 0.05 < t < spawn]
            first = min(t for r, t in tries if r == "ok" and t > spawn)
            rows.append({"cycle": i + 1, "node": node, "down_s": round(spawn - kill, 3),
                         "attempts_while_down": len(down), "got_through_while_down": down.count("ok"),
                         "recovery_s": round(first - spawn, 3)})
            print(f"cycle {i + 1}: {node} down {spawn - kill:.2f}s ({len(down)} attempts, {down.count('ok')} through), "
                  f"recovered {first - spawn:.3f}s after the new ztunnel started", flush=True)
        stop.touch()
        probe.wait(timeout=15)
    finally:
        if probe is not None and probe.poll() is None:
            probe.kill()
            probe.wait()
        c.destroy()
        shutil.rmtree(work, ignore_errors=True)
    rec = sorted(r["recovery_s"] for r in rows)
    print("| cycle | node | without ztunnel (s) | attempts meanwhile | got through | recovery (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cycle']} | {r['node']} | {r['down_s']} | {r['attempts_while_down']} | "
              f"{r['got_through_while_down']} | {r['recovery_s']} |")
    print(f"recovery p50 {rec[len(rec) // 2]:.3f}s, max {rec[-1]:.3f}s (bound {a.bound:g}s)")
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"crash-recovery-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump({"rows": rows, "bound_s": a.bound}, f, indent=1)
    bad = [r for r in rows if r["recovery_s"] >= a.bound or r["got_through_while_down"]]
    if bad or len(rows) != a.cycles:
        print(f"FAILED: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
