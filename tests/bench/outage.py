#!/usr/bin/env python3
"""The real control-plane outage drill (not in CI; tests/netns/test_outage.py is its scaled twin).

Builds a 2-node cluster with `--cert-ttl` (default 15m: renewal at 7.5 min falls inside the
default 10-minute outage, expiry after it), waits for a fresh certificate on both ztunnels,
opens one long echo connection c1 -> s1 across the nodes, stops the control plane for
`--outage` seconds, and meanwhile every `--probe` seconds opens a new connection and checks
that certificates are the ones held before; half-way it creates pod c2 and checks it is held
Pending with reason control_plane_unavailable. Then it starts the control plane and measures
how long renewal and c2's start take. Prints a table and writes JSON; exits 1 on any failure.

    sudo .venv/bin/python tests/bench/outage.py                     # the full 10 minutes
    sudo .venv/bin/python tests/bench/outage.py --outage 60 --cert-ttl 90s
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from tests.netns.cluster_helper import LocalCluster, pod_yaml, wait_for  # noqa: E402
from tests.netns.test_outage import CLUSTER  # noqa: E402


def certs(c):
    return {f"{n} {r['identity'].rsplit('/ns/', 1)[-1]}": r for n in ("n1", "n2") for r in c.admin(n)["certificates"]}


def pod(c, name):
    return next((p for p in c.status()["pods"] if p["name"] == name), None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--outage", type=float, default=600.0, help="seconds the control plane is down (600)")
    p.add_argument("--cert-ttl", default="15m", help="workload certificate TTL for `ambient up` (15m)")
    p.add_argument("--probe", type=float, default=10.0, help="seconds between new-connection probes (10)")
    p.add_argument("--cluster", default=f"od{os.getpid() % 100000}")
    p.add_argument("--out", default=".", help="directory for outage-<time>.json")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="outage-"))
    c = LocalCluster(a.cluster, work)
    failures: list[str] = []
    res: dict = {"outage_s": a.outage, "cert_ttl": a.cert_ttl}
    long = None
    try:
        c.ambient("down", check=False)
        c.ambient("up", "--cert-ttl", a.cert_ttl, c.write("cluster.yaml", CLUSTER))
        wait_for(lambda: c.enrolled("n1") == ["mesh/c1"] and c.enrolled("n2") == ["mesh/s1"], timeout=30)
        held = certs(c)
        s1 = c.ip("s1")
        long = c.longconn("mesh", "c1", s1, duration=a.outage + 30)
        if not long.stdout.readline().startswith("hello"):
            raise SystemExit("long connection did not start")
        c.ambient("control-plane", "stop")
        t0 = time.monotonic()
        probes = probe_failures = 0
        c2_checked = False
        extra = c.write("c2.yaml", pod_yaml("c2", "mesh", "n1", "client", "client"))
        try:
            while (elapsed := time.monotonic() - t0) < a.outage:
                probes += 1
                if c.echo("mesh", "c1", s1, check=False).returncode != 0:
                    probe_failures += 1
                now = certs(c)
                for k, h in held.items():
                    if (now[k]["not_before"], now[k]["not_after"]) != (h["not_before"], h["not_after"]):
                        failures.append(f"{k}: certificate changed during the outage at {elapsed:.0f}s")
                if not c2_checked and elapsed >= a.outage / 2:
                    c.ambient("apply", "--no-wait", extra)
                    time.sleep(1)
                    q = pod(c, "c2")
                    res["c2_during"] = {"phase": q["phase"], "reason": q["reason"]}
                    if (q["phase"], q["reason"]) != ("Pending", "control_plane_unavailable"):
                        failures.append(f"c2 during the outage: {q['phase']} {q['reason']}")
                    c2_checked = True
                time.sleep(max(0.0, min(a.probe, a.outage - (time.monotonic() - t0))))
            res["states_at_end"] = {k: r["state"] for k, r in certs(c).items()}
            res["fetch_attempts_during"] = {k: r["fetches"] - held[k]["fetches"] for k, r in certs(c).items()}
        finally:
            c.ambient("control-plane", "start")
        back = time.monotonic()
        res["outage_real_s"] = round(back - t0, 1)
        res["probes"], res["probe_failures"] = probes, probe_failures
        if probe_failures and all(s == "valid" for s in res["states_at_end"].values()):
            failures.append(f"{probe_failures} of {probes} new connections failed with valid certificates")
        try:
            wait_for(lambda: all(r["state"] == "valid" and r["not_before"] > held[k]["not_before"]
                                 for k, r in certs(c).items()), timeout=30, step=0.05)
            res["renewed_after_return_s"] = round(time.monotonic() - back, 2)
        except AssertionError:
            failures.append("certificates not renewed within 30 s of the return")
        try:
            wait_for(lambda: (q := pod(c, "c2")) and q["phase"] == "Running", timeout=30, step=0.05)
            res["c2_running_after_return_s"] = round(time.monotonic() - back, 2)
            if c.echo("mesh", "c2", s1, check=False).returncode != 0:
                failures.append("c2 cannot reach s1 after the return")
        except AssertionError:
            failures.append("c2 not running within 30 s of the return")
        out, _ = long.communicate(timeout=a.outage + 120)
        res["long_connection"] = out.strip().splitlines()[-1] if out.strip() else ""
        if long.returncode != 0:
            failures.append(f"long connection broke: {res['long_connection']}")
    finally:
        if long is not None and long.poll() is None:
            long.kill()
        c.destroy()
        shutil.rmtree(work, ignore_errors=True)
    res["failures"] = failures
    for k, v in res.items():
        print(f"{k:28} {v}")
    path = os.path.join(a.out, f"outage-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
