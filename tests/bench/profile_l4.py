#!/usr/bin/env python3
"""Where the microseconds go on the L4 path: syscalls, context switches and py-spy frames per request under wrk."""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_l4 as b  # noqa: E402
from rate_client import grid  # noqa: E402  (this directory)

_STRACE_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")
_WRK_REQS = re.compile(r"^\s*(\d+) requests in", re.M)


def tids(pids: list[int]) -> list[int]:
    out = []
    for p in pids:
        with contextlib.suppress(OSError):
            out += [int(t) for t in os.listdir(f"/proc/{p}/task")]
    return out


def ctx_switches(pids: list[int]) -> int:
    """Voluntary + involuntary context switches over all threads: a wake-up count."""
    n = 0
    for t in tids(pids):
        with contextlib.suppress(OSError), open(f"/proc/{t}/status") as f:
            for line in f:
                if "ctxt_switches:" in line:
                    n += int(line.split()[1])
    return n


def cpu_ticks(pids: list[int]) -> tuple[int, int]:
    """(utime, stime) in clock ticks, all threads of `pids`."""
    u = k = 0
    for p in pids:
        with contextlib.suppress(OSError, IndexError), open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            u, k = u + int(fields[11]), k + int(fields[12])
    return u, k


def wrk_requests(cluster: b.Cluster, t: b.Target, conns: int, secs: int) -> int:
    p = cluster.run(t.client, ["wrk", "-t2", f"-c{conns}", f"-d{secs}s", f"http://{t.http}/"], timeout=secs + 15)
    m = _WRK_REQS.search(p.stdout)
    if p.returncode != 0 or m is None:
        raise b.SetupError(f"{t.name}: wrk failed: {p.stdout}{p.stderr}")
    return int(m.group(1))


def under_load(cluster: b.Cluster, t: b.Target, conns: int, secs: int, tool: list[str]) -> tuple[int, str]:
    """Start `tool` (a tracer that stops on SIGINT), run wrk, stop it: (requests done, tool output)."""
    tr = subprocess.Popen(tool, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.0)  # attached before the load starts
        n = wrk_requests(cluster, t, conns, secs)
    finally:
        tr.send_signal(signal.SIGINT)
        out, _ = tr.communicate(timeout=60)
    return n, out


def strace_counts(cluster: b.Cluster, t: b.Target, pids: list[int], conns: int, secs: int) -> tuple[int, dict]:
    argv = ["strace", "-c", "-f", "-U", "calls,name"] if _strace_has_U() else ["strace", "-c", "-f"]
    for tid in tids(pids):
        argv += ["-p", str(tid)]
    n, out = under_load(cluster, t, conns, secs, argv)
    calls = {}
    for line in out.splitlines():
        m = re.match(r"^\s*(\d+)\s+(\w+)\s*$", line) or _STRACE_ROW.match(line)
        if m and m.group(2) != "total":
            calls[m.group(2)] = int(m.group(1))
    return n, calls


def _strace_has_U() -> bool:
    p = subprocess.run(["strace", "-c", "-U", "calls,name", "true"], capture_output=True, text=True)
    return p.returncode == 0


def pyspy_frames(cluster: b.Cluster, t: b.Target, pid: int, conns: int, secs: int, raw: str) -> tuple[int, list, list]:
    """py-spy's collapsed stacks of one process under load: (samples, top self frames, top inclusive)."""
    pyspy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or "py-spy"
    argv = [pyspy, "record", "--nonblocking", "--format", "raw", "-r", "200", "-o", raw, "-p", str(pid)]
    under_load(cluster, t, conns, secs, argv)
    own, incl, total = collections.Counter(), collections.Counter(), 0
    with open(raw) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            frames = [re.sub(r" \(/.*?([^/]+/[^/]+\.py):\d+\)", r" (\1)", fr) for fr in stack.split(";")]
            k = int(n)
            total += k
            own[frames[-1]] += k
            for fr in set(frames):
                incl[fr] += k
    return total, own.most_common(15), incl.most_common(25)


def _per_request(pids: dict[str, list[int]], before: tuple[tuple[int, int], int], n: int) -> tuple[float, float, float]:
    """(user us, system us, context switches) per request over all of `pids` since `before`."""
    allp = [p for ps in pids.values() for p in ps]
    (u0, k0), c0 = before
    u1, k1 = cpu_ticks(allp)
    f = 1e6 / b.CLK_TCK / max(n, 1)
    return (u1 - u0) * f, (k1 - k0) * f, (ctx_switches(allp) - c0) / max(n, 1)


def _snapshot(pids: dict[str, list[int]]) -> tuple[tuple[int, int], int]:
    allp = [p for ps in pids.values() for p in ps]
    return cpu_ticks(allp), ctx_switches(allp)


def latency_rounds(cluster: b.Cluster, targets: dict[str, b.Target], rounds: int, secs: int) -> list[str]:
    """Low-load latency, setups interleaved round by round (where the scheduler puts the five
    processes moves p50 by up to ~100 us from one run to the next, so one run per setup says
    little): wrk -t1 -c1 (one request in flight: p50 is the path's latency, not a throughput
    bound as at -c4 on 2 cores) and constant 1,000 req/s percentiles, each with the proxies'
    CPU and context switches per request (all proxy processes of the setup summed)."""
    rows = [["round", "setup", "c1 p50 us", "c1 p99 us", "c1 req/s", "c1 CPU us/req user+sys", "c1 cs/req",
             "1k p10/p25/p50/p75/p90/p99 us", "1k CPU us/req user+sys", "1k client late max ms"]]
    med: dict[str, dict[str, list[float]]] = {n: collections.defaultdict(list) for n in targets}
    for rnd in range(rounds):
        for name, t in targets.items():
            pids = t.pids()
            before = _snapshot(pids)
            w = b.wrk(cluster, t, 1, secs, latency=True, threads=1)
            n1 = int(w["rps"] * secs)
            u1, k1, cs1 = _per_request(pids, before, n1)
            before = _snapshot(pids)
            r = b.rate_run(cluster, t, 1000, secs)
            u2, k2, _ = _per_request(pids, before, r["completed"])
            qs = [r[f"p{q}_ms"] * 1e3 for q in (10, 25, 50, 75, 90, 99)]
            for k, v in (("c1", w["p50_ms"] * 1e3), ("c1cpu", u1 + k1), ("1k", qs[2]), ("1kcpu", u2 + k2)):
                med[name][k].append(v)
            rows.append([str(rnd + 1), name, f"{w['p50_ms'] * 1e3:.0f}", f"{w['p99_ms'] * 1e3:.0f}", f"{w['rps']:.0f}",
                         f"{u1:.1f}+{k1:.1f}", f"{cs1:.2f}", "/".join(f"{q:.0f}" for q in qs), f"{u2:.1f}+{k2:.1f}",
                         f"{r['client_late_max_ms']:.1f}"])
            print(" | ".join(rows[-1]), flush=True)
    out = [grid(rows), "", "medians over rounds:", ""]
    out.append(grid([["setup", "c1 p50 us", "c1 CPU us/req", "1k p50 us", "1k CPU us/req"]] + [
        [n, *(f"{statistics.median(m[k]):.0f}" for k in ("c1", "c1cpu", "1k", "1kcpu"))] for n, m in med.items()]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--setups", default="ambient,envoy")
    ap.add_argument("--cluster", default="bprof")
    ap.add_argument("--no-pyspy", action="store_true")
    ap.add_argument("--latency", type=int, default=0, metavar="ROUNDS",
                    help="instead of the profile: ROUNDS interleaved low-load latency rounds (wrk -c1 and "
                         "1,000 req/s, --secs each) with CPU per request; add direct to --setups for the baseline")
    a = ap.parse_args(argv)
    setups = [s for s in b.SETUPS if s in a.setups.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cluster = b.Cluster(a.cluster)
    b.preflight(cluster)
    load = (f"{a.latency} latency rounds, wrk -t1 -c1 -d{a.secs}s and 1,000 req/s for {a.secs}s ({b.RATE_CONNS} "
            "connections) per setup and round" if a.latency else f"wrk -t2 -c{a.conns} -d{a.secs}s per measurement")
    out: list[str] = [f"# profile_l4 {time.strftime('%Y-%m-%d %H:%M:%S')} commit {b._git_rev()}, {load}, "
                      f"loadavg {b._loadavg()}"]
    with contextlib.ExitStack() as stack:
        workdir = tempfile.mkdtemp(prefix=f"profile-l4-{a.cluster}-")
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        yaml_path = os.path.join(workdir, "cluster.yaml")
        with open(yaml_path, "w") as f:
            f.write(b.cluster_yaml(workdir, sorted({b.NAMESPACE[s] for s in setups}), b.NAMESPACE["ambient"]))
        stack.callback(cluster.cli, "down", check=False)
        stack.callback(shutil.rmtree, f"/var/lib/ambient/{a.cluster}", ignore_errors=True)
        cluster.cli("up", yaml_path)
        bench = b.Bench(cluster, workdir, stack)
        if a.latency:
            targets = {}
            for name in setups:
                targets[name] = b.SETUP_FNS[name](bench)
                b.probe(cluster, targets[name])
                wrk_requests(cluster, targets[name], 4, 1)  # warm-up
            out += latency_rounds(cluster, targets, a.latency, a.secs)
            out.append(f"\nloadavg after {b._loadavg()}")
            print("\n".join(out), flush=True)
            return 0
        for name in setups:
            t = b.SETUP_FNS[name](bench)
            b.probe(cluster, t)
            wrk_requests(cluster, t, a.conns, 1)  # warm-up
            for label, pids in sorted(t.pids().items()):
                c0, (u0, k0) = ctx_switches(pids), cpu_ticks(pids)
                n = wrk_requests(cluster, t, a.conns, a.secs)
                cs = (ctx_switches(pids) - c0) / n
                u1, k1 = cpu_ticks(pids)
                us = lambda ticks: 1e6 * ticks / b.CLK_TCK / n  # noqa: E731
                n_tr, calls = strace_counts(cluster, t, pids, a.conns, a.secs)
                total = sum(calls.values())
                out.append(f"\n## {name}: {label} (pids {pids})\n")
                out.append(f"without tracing: {n} requests, {n / a.secs:.0f} req/s, context switches/request "
                           f"{cs:.2f}, CPU/request {us(u1 - u0):.1f} us user + {us(k1 - k0):.1f} us system; under strace: {n_tr} requests, {total} syscalls = {total / n_tr:.2f}/request\n")
                out.append("| syscall | per request |\n|---|---|")
                out += [f"| {k} | {v / n_tr:.3f} |" for k, v in sorted(calls.items(), key=lambda kv: -kv[1])
                        if v / n_tr >= 0.005]
                if not a.no_pyspy and name == "ambient":
                    samples, own, incl = pyspy_frames(cluster, t, pids[0], a.conns, a.secs,
                                                      os.path.join(workdir, f"{label}.raw"))
                    out.append(f"\npy-spy (pid {pids[0]}, {samples} samples at 200 Hz, idle included): "
                               "top frames by own time\n")
                    out.append("| % own | frame |\n|---|---|")
                    out += [f"| {100 * k / samples:.1f} | `{fr}` |" for fr, k in own]
                    out.append("\ntop frames by inclusive time\n")
                    out.append("| % incl | frame |\n|---|---|")
                    out += [f"| {100 * k / samples:.1f} | `{fr}` |" for fr, k in incl]
                print("\n".join(out), flush=True)
                out = []
    return 0


if __name__ == "__main__":
    sys.exit(main())
