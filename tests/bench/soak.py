#!/usr/bin/env python3
"""Soak (not in CI; test_soak_smoke.py runs it for ~20 s): mixed traffic, ztunnel restarts, a control-plane outage.

Builds a 2-node cluster (c1 on n1 -> s1 on n2, meshed), runs tests/bench/soak_traffic.py in
c1 (short requests, long-lived streams, bulk transfers; every byte checked) for `--minutes`,
restarts every ztunnel gracefully (`ambient restart ztunnel`) every `--restart-every` seconds
and stops the control plane for `--outage` seconds half-way. Every `--sample` seconds it
records, per proxy process (each node's ztunnel, whatever its current pid, and the runner,
which hosts the control plane): RSS, open fds, asyncio tasks, open connections (ztunnel's
/debug/live) and failed connections (ztunnel's istio_tcp_connections_failed_total, summed
over the pids a node had); and the traffic app's ok/failed counts per kind. Writes
soak-<time>.png (pngplot.py, no matplotlib needed), soak-<time>.md (the table) and
soak-<time>.json, and flags every series still growing over the second half (least-squares
slope x that half's length above max(floor, 10 % of its median)). Exit 1 if anything grew,
any traffic failed, or a restart or the outage step failed.

    sudo .venv/bin/python tests/bench/soak.py                 # 30 minutes (scripts/soak.sh)
    sudo .venv/bin/python tests/bench/soak.py --minutes 3 --restart-every 40 --outage 30
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from tests.bench.pngplot import Panel, write_png  # noqa: E402
from tests.netns.cluster_helper import LocalCluster, wait_for  # noqa: E402
from tests.netns.test_outage import CLUSTER  # noqa: E402

NODES = ("n1", "n2")
# What "still growing" must exceed over the second half, per metric (and 10 % of the median).
FLOORS = {"rss_mb": 8.0, "fds": 16.0, "tasks": 32.0, "conns": 16.0}


def proc_stats(pid: int) -> tuple[float, int]:
    """(RSS in MB, open fds) of a process from /proc."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def failed_total(metrics: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("istio_tcp_connections_failed_total"))


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (y per minute) of (minute, y) points."""
    n = len(points)
    if n < 3:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


class Sampler:
    def __init__(self, c: LocalCluster):
        self.c = c
        self.rows: list[dict] = []
        self.failed_by_pid: dict[str, dict[int, float]] = {n: {} for n in NODES}

    def sample(self, minute: float, traffic: dict | None) -> dict:
        row: dict = {"min": round(minute, 3)}
        for node in NODES:
            try:
                dump = self.c.admin(node)
                live = self.c.admin(node, "/debug/live")
                pid = dump["pid"]
                rss, fds = proc_stats(pid)
                self.failed_by_pid[node][pid] = failed_total(self.c.admin(node, "/metrics"))
            except (OSError, AssertionError, KeyError, StopIteration, ValueError):
                continue   # mid-restart: skip this sample for the node
            pods = live["pods"].values()
            row[f"ztunnel {node}"] = {
                "pid": pid, "rss_mb": round(rss, 2), "fds": fds, "tasks": live["tasks"],
                "conns": sum(p["outbound"] + p["inbound"] for p in pods) + live["pool_connections"],
                "errors": sum(self.failed_by_pid[node].values())}
        try:
            with open(self.c.paths.runner_pid_file) as f:
                rpid = int(f.read())
            rss, fds = proc_stats(rpid)
            row["runner"] = {"pid": rpid, "rss_mb": round(rss, 2), "fds": fds}
        except (OSError, ValueError, StopIteration):
            pass
        if traffic:
            row["traffic"] = {"ok": sum(traffic["ok"].values()), "failed": sum(traffic["failed"].values()),
                              "open": traffic["open"], "by_kind": traffic["ok"], "failed_by_kind": traffic["failed"]}
        self.rows.append(row)
        return row


def series(rows: list[dict]) -> dict[tuple[str, str], list[tuple[float, float]]]:
    out: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in rows:
        for proc, v in r.items():
            if proc in ("min", "traffic") or not isinstance(v, dict):
                continue
            for metric in ("rss_mb", "fds", "tasks", "conns", "errors"):
                if metric in v:
                    out.setdefault((proc, metric), []).append((r["min"], float(v[metric])))
    return out


def verdicts(ser: dict[tuple[str, str], list[tuple[float, float]]]) -> list[dict]:
    table = []
    for (proc, metric), pts in sorted(ser.items()):
        ys = [y for _, y in pts]
        half = pts[len(pts) // 2:]
        span = (half[-1][0] - half[0][0]) if len(half) > 1 else 0.0
        slope = slope_per_min(half)
        med = sorted(ys)[len(ys) // 2]
        if metric == "errors":
            growing = ys[-1] > ys[0]          # any failed connection counts
            limit = 0.0
        else:
            limit = max(FLOORS[metric], 0.10 * med)
            growing = slope * span > limit
        table.append({"proc": proc, "metric": metric, "first": ys[0], "last": ys[-1], "min": min(ys),
                      "max": max(ys), "median": med, "slope_per_min": round(slope, 4),
                      "growth_2nd_half": round(slope * span, 3), "limit": round(limit, 3),
                      "flag": "GROWING" if growing else "flat"})
    return table


def markdown(table: list[dict], traffic: dict | None, events: list[dict]) -> str:
    lines = ["| process | metric | first | last | min | max | slope/min (2nd half) | growth (2nd half) | limit | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['proc']} | {t['metric']} | {t['first']:g} | {t['last']:g} | {t['min']:g} | {t['max']:g} "
                     f"| {t['slope_per_min']:g} | {t['growth_2nd_half']:g} | {t['limit']:g} | {t['flag']} |")
    if traffic:
        lines += ["", f"traffic ok {traffic['ok']} failed {traffic['failed']}; last errors: {traffic['errors'][-5:]}"]
    lines += ["", "events: " + "; ".join(f"{e['min']:.2f} min {e['what']} {'ok' if e['ok'] else 'FAILED'}"
                                         f" ({e.get('took_s', 0):.1f}s)" for e in events)]
    return "\n".join(lines) + "\n"


def plot(path: str, rows: list[dict], ser) -> None:
    panels = []
    for metric, title in (("rss_mb", "RSS (MB)"), ("fds", "open fds"), ("conns", "open connections"),
                          ("tasks", "asyncio tasks"), ("errors", "failed connections (proxy, cumulative)")):
        panels.append(Panel(title, {proc: pts for (proc, m), pts in ser.items() if m == metric}))
    tr = [(r["min"], r["traffic"]) for r in rows if "traffic" in r]
    rate = [(m, (t["ok"] - p["ok"]) / max(1e-9, (m - pm) * 60)) for (pm, p), (m, t) in zip(tr, tr[1:])]
    panels.append(Panel("traffic: requests/s ok, failed (cumulative)",
                        {"ok/s": rate, "failed": [(m, float(t["failed"])) for m, t in tr]}))
    write_png(path, panels, xlabel="min")


def schedule(duration: float, restart_every: float, outage: float) -> list[tuple[float, str]]:
    """(seconds from start, action): restarts every `restart_every` s except around the outage
    (a restart needs the control plane), and the outage half-way."""
    ev: list[tuple[float, str]] = []
    o0 = duration / 2 - outage / 2 if outage > 0 else None
    if o0 is not None:
        ev += [(o0, "outage-start"), (o0 + outage, "outage-end")]
    t = restart_every
    while restart_every > 0 and t < duration - 2:
        if o0 is None or not (o0 - 3 < t < o0 + outage + 3):   # a restart needs the CP ~1 s
            ev.append((t, "restart"))
        t += restart_every
    return sorted(ev)


def run_events(c: LocalCluster, plan: list[tuple[float, str]], t0: float, done: list[dict], stop: threading.Event) -> None:
    for at, what in plan:
        if stop.wait(max(0.0, t0 + at - time.monotonic())):
            return
        ts = time.monotonic()
        if what == "restart":
            p = c.ambient("restart", "ztunnel", check=False)
        else:
            p = c.ambient("control-plane", "stop" if what == "outage-start" else "start", check=False)
        done.append({"min": (ts - t0) / 60, "what": what, "ok": p.returncode == 0,
                     "took_s": time.monotonic() - ts, "out": (p.stdout + p.stderr)[-300:]})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--sample", type=float, default=5.0, help="seconds between samples (5)")
    p.add_argument("--restart-every", type=float, default=120.0, help="seconds between ztunnel restarts (120; 0: none)")
    p.add_argument("--outage", type=float, default=120.0, help="seconds the control plane is down half-way (120; 0: none)")
    p.add_argument("--cluster", default=f"sk{os.getpid() % 100000}")
    p.add_argument("--out", default=".", help="directory for soak-<time>.{png,md,json}")
    a = p.parse_args()
    duration = a.minutes * 60
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    c = LocalCluster(a.cluster, work)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(a.out, f"soak-{stamp}")
    os.makedirs(a.out, exist_ok=True)
    events: list[dict] = []
    lines: list[str] = []
    traffic = None
    stop = threading.Event()
    try:
        c.ambient("down", check=False)
        c.ambient("up", c.write("cluster.yaml", CLUSTER))
        wait_for(lambda: c.enrolled("n1") == ["mesh/c1"] and c.enrolled("n2") == ["mesh/s1"], timeout=30)
        s1 = c.ip("s1")
        stop_file = work / "stop-traffic"
        traffic = subprocess.Popen(
            [sys.executable, "-m", "localcluster.cli", "-c", c.name, "exec", "-n", "mesh", "c1", "--", "python3",
             os.path.join(ROOT, "tests", "bench", "soak_traffic.py"), s1, "8080", "--duration", str(duration + 60),
             "--every", str(a.sample), "--stop-file", str(stop_file)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=lambda: lines.extend(iter(traffic.stdout.readline, "")), daemon=True).start()
        sampler = Sampler(c)
        t0 = time.monotonic()
        plan = schedule(duration, a.restart_every, a.outage)
        ev = threading.Thread(target=run_events, args=(c, plan, t0, events, stop), daemon=True)
        ev.start()
        n = 0
        while (elapsed := time.monotonic() - t0) < duration:
            last = next((json.loads(x) for x in reversed(list(lines)) if x.startswith("{")), None)
            row = sampler.sample(elapsed / 60, last)
            n += 1
            if n % max(1, int(60 / a.sample)) == 0 or a.minutes < 1:
                z = {k: (v["rss_mb"], v["fds"]) for k, v in row.items() if k.startswith("ztunnel")}
                print(f"{elapsed / 60:5.1f} min  {z}  traffic {row.get('traffic', {}).get('ok')} ok "
                      f"{row.get('traffic', {}).get('failed')} failed", flush=True)
            time.sleep(max(0.0, t0 + n * a.sample - time.monotonic()))
        stop.set()
        ev.join(timeout=60)
        stop_file.touch()
        traffic.wait(timeout=60)
        time.sleep(0.2)
        final = next((json.loads(x) for x in reversed(list(lines)) if x.startswith("{")), None)
    finally:
        stop.set()
        if traffic is not None and traffic.poll() is None:
            traffic.kill()
            traffic.wait()
        c.ambient("control-plane", "start", check=False)
        c.destroy()
        shutil.rmtree(work, ignore_errors=True)
    ser = series(sampler.rows)
    table = verdicts(ser)
    text = markdown(table, final, events)
    plot(base + ".png", sampler.rows, ser)
    with open(base + ".md", "w") as f:
        f.write(text)
    with open(base + ".json", "w") as f:
        json.dump({"args": vars(a), "samples": sampler.rows, "table": table, "traffic": final, "events": events}, f)
    print(text)
    print(f"wrote {base}.png, {base}.md, {base}.json")
    problems = [f"{t['proc']} {t['metric']} growing ({t['growth_2nd_half']:g} > {t['limit']:g})"
                for t in table if t["flag"] != "flat"]
    if not final:
        problems.append("no report from the traffic app")
    elif sum(final["failed"].values()):
        problems.append(f"traffic failed {final['failed']}")
    problems += [f"{e['what']} at {e['min']:.1f} min failed: {e['out']}" for e in events if not e["ok"]]
    if len(events) != len(plan):
        problems.append(f"only {len(events)} of {len(plan)} restarts/outage steps ran")
    if problems:
        print("SOAK FAILED: " + "; ".join(problems))
        return 1
    print("soak ok: nothing grew, no traffic failed")
    return 0

if __name__ == "__main__":
    sys.exit(main())
