#!/usr/bin/env python3
"""L4 scaling: req/s and per-worker load as ztunnel workers (and Envoy --concurrency) grow, optionally CPU-pinned."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # bench_l4 and its helpers live next to this script

import bench_l4 as bl  # noqa: E402
from bench_l4 import NAMESPACE, SetupError, Target  # noqa: E402
from localcluster.network import ClusterNetwork  # noqa: E402
from rate_client import grid  # noqa: E402

SETUPS = ("ambient", "envoy")
HBONE_PORTS = (15008, bl.ENVOY_HBONE_PORT)  # ztunnel's, and the Envoy pair's


def cpu_list(spec: str) -> set[int]:
    """taskset-style CPU list ("0", "0-3", "0,2-3") as a set."""
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def _stat(path: str) -> tuple[str, int]:
    """(comm, utime + stime ticks) of /proc/.../stat; ("", 0) once the task is gone."""
    try:
        with open(path) as f:
            raw = f.read()
    except OSError:
        return "", 0
    comm, rest = raw[raw.index("(") + 1:raw.rindex(")")], raw.rsplit(")", 1)[1].split()
    return comm, int(rest[11]) + int(rest[12])


def cgroup_pids(cgroup: str) -> list[int]:
    pids: list[int] = []
    for d, _, _ in os.walk(cgroup):
        with contextlib.suppress(OSError), open(os.path.join(d, "cgroup.procs")) as f:
            pids += [int(x) for x in f.read().split()]
    return pids


class Pinning:
    """Pins every thread of the given processes to a CPU set; restores what each had on exit."""

    def __init__(self) -> None:
        self._saved: dict[int, set[int]] = {}

    def pin(self, pids: list[int], cpus: set[int]) -> None:
        for pid in pids:
            for tid in _threads(pid):  # sched_setaffinity is per thread: a pid alone pins only the main thread
                with contextlib.suppress(ProcessLookupError):
                    self._saved.setdefault(tid, os.sched_getaffinity(tid))
                    os.sched_setaffinity(tid, cpus)

    def restore(self) -> None:
        for tid, cpus in self._saved.items():
            with contextlib.suppress(ProcessLookupError, OSError):
                os.sched_setaffinity(tid, cpus)
        self._saved.clear()


def worker_labels(t: Target) -> dict[str, int]:
    """One label per proxy process: "n1 w0" for ztunnel workers (from --worker), else the setup's label."""
    out = {}
    for label, pids in t.pids().items():
        for pid in pids:
            try:
                argv = open(f"/proc/{pid}/cmdline").read().split("\0")
            except OSError:
                continue
            if label.startswith("ztunnel@"):
                if "ztunnel" not in argv:
                    continue  # not a ztunnel worker (python -m ztunnel ...)
                w = argv[argv.index("--worker") + 1] if "--worker" in argv else "0"
                out[f"{label.removeprefix('ztunnel@')} w{w}"] = pid
            else:
                out[label] = pid
    return dict(sorted(out.items()))


def cpu_ticks() -> dict[str, tuple[int, int]]:
    """Per CPU ("cpu0", ...): (total, idle + iowait) ticks from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *v = line.split()
            if name.startswith("cpu") and name != "cpu":
                t = [int(x) for x in v[:8]]
                out[name] = (sum(t), t[3] + t[4])
    return out


class ThreadCpu:
    """CPU% per labelled process, and per Envoy worker thread (comm "wrk:worker_N"), over a with-block."""

    def __init__(self, procs: dict[str, int]) -> None:
        self.procs = procs

    def _ticks(self) -> dict[str, int]:
        out = {k: _stat(f"/proc/{pid}/stat")[1] for k, pid in self.procs.items()}
        for k, pid in self.procs.items():
            for tid in _threads(pid):
                comm, ticks = _stat(f"/proc/{pid}/task/{tid}/stat")
                if comm.startswith("wrk:worker"):
                    out[f"{k} {comm.removeprefix('wrk:')}"] = ticks
        return out

    def __enter__(self) -> ThreadCpu:
        self._t0, self._c0, self._box0 = time.monotonic(), self._ticks(), cpu_ticks()
        return self

    def __exit__(self, *exc: object) -> None:
        dt, c1 = time.monotonic() - self._t0, self._ticks()
        self.pct = {k: 100.0 * (c1[k] - self._c0.get(k, 0)) / bl.CLK_TCK / dt for k in c1}
        self.busy = {}  # whole box per CPU: is the load generator's CPU, or the proxies', the one that is full?
        for name, (total, idle) in cpu_ticks().items():
            t0, i0 = self._box0.get(name, (total, idle))
            self.busy[name] = 100.0 * (total - t0 - (idle - i0)) / max(total - t0, 1)


def connections(cluster: bl.Cluster, netns_pods: list[dict[str, Any]], procs: dict[str, int]) -> dict[str, Counter]:
    """Established TCP sockets of each proxy process, by kind: hbone-out (to :15008/:15009),
    hbone-in (accepted there), app-out (to the server's :8080/:5201), pod-in (accepted from a pod)."""
    by_pid = {pid: label for label, pid in procs.items()}
    out: dict[str, Counter] = {label: Counter() for label in procs}
    seen: set[str] = set()
    for pod in netns_pods:
        if pod["netns"] in seen:
            continue
        seen.add(pod["netns"])
        p = cluster.run(pod, ["ss", "-tnpH", "state", "established"], timeout=10)
        for line in p.stdout.splitlines():
            f = line.split()
            if len(f) < 5 or "pid=" not in line:
                continue
            local, peer = int(f[2].rsplit(":", 1)[1]), int(f[3].rsplit(":", 1)[1])
            kind = ("hbone-out" if peer in HBONE_PORTS else "hbone-in" if local in HBONE_PORTS
                    else "app-out" if peer in (bl.HTTP_PORT, bl.IPERF_PORT) else "pod-in")
            for pid in {int(x.split(",")[0]) for x in line.split("pid=")[1:]}:
                if pid in by_pid:
                    out[by_pid[pid]][kind] += 1
    return out


def _net_pods(cluster: bl.Cluster, t: Target, server: dict[str, Any]) -> list[dict[str, Any]]:
    """Where the proxies' sockets are: both pods' netns and both nodes' netns (no cgroup: ss only)."""
    net = ClusterNetwork(cluster.paths.prefix)
    return [t.client, server] + [{"netns": net.node_netns(n), "cgroup": None} for n in ("n1", "n2")]


def measure(cluster: bl.Cluster, t: Target, server: dict[str, Any], secs: int,
            pin: tuple[set[int], set[int]] | None) -> dict[str, Any]:
    """wrk -t2 -c32 for `secs` (after 1 s warm-up): req/s, CPU% per worker, a mid-run socket census."""
    procs = worker_labels(t)
    pinning = Pinning()
    prefix: list[str] = []
    if pin is not None:
        load, proxy = pin
        pinning.pin(cgroup_pids(server["cgroup"]), load)  # nginx (and iperf3 -s)
        pinning.pin(list(procs.values()), proxy)
        prefix = ["taskset", "-c", ",".join(map(str, sorted(load)))]
    try:
        def wrk(d: int) -> list[str]:
            return prefix + ["wrk", "-t2", "-c32", f"-d{d}s", f"http://{t.http}/"]
        cluster.run(t.client, wrk(1), timeout=20)  # warm-up: pools and TLS up
        census: dict[str, Counter] = {}
        timer = threading.Timer(secs / 2, lambda: census.update(connections(cluster, _net_pods(cluster, t, server),
                                                                            procs)))
        with ThreadCpu(procs) as cpu:
            timer.start()
            p = cluster.run(t.client, wrk(secs), timeout=secs + 20)
            timer.join()
    finally:
        pinning.restore()
    if p.returncode != 0:
        raise SetupError(f"{t.name}: wrk failed ({p.returncode}): {p.stdout}{p.stderr}")
    res = bl.parse_wrk(p.stdout)
    node_cpu = {}
    for label, pct in cpu.pct.items():
        if " worker_" not in label:  # a process, not one of its threads
            node = label.split()[0]
            node_cpu[node] = node_cpu.get(node, 0.0) + pct
    return {"rps": res["rps"], "errors": res["errors"], "cpu_pct": cpu.pct, "busiest": busiest(cpu.pct),
            "cpu_busy_pct": cpu.busy,
            "us_per_req": {k: v / 100 * 1e6 / res["rps"] for k, v in node_cpu.items()} if res["rps"] else {},
            "conns": {k: dict(v) for k, v in census.items()}}


def busiest(pct: dict[str, float]) -> dict[str, float]:
    """Per node (or Envoy), the busiest worker's share of its CPU: 1/workers if even, 1.0 if one does all."""
    threads = {k: v for k, v in pct.items() if " worker_" in k}  # Envoy: its worker threads
    by_node: dict[str, list[float]] = {}
    for k, v in (threads or pct).items():
        by_node.setdefault(k.split()[0], []).append(v)
    return {n: max(vs) / sum(vs) for n, vs in by_node.items() if sum(vs) > 0}


def bring_up(a: argparse.Namespace, cluster: bl.Cluster, workdir: str, workers: int) -> None:
    yaml_path = os.path.join(workdir, "cluster.yaml")
    with open(yaml_path, "w") as f:
        f.write(bl.cluster_yaml(workdir, sorted({NAMESPACE[s] for s in a.setups}), NAMESPACE["ambient"]))
    print(f"# ambient -c {cluster.name} up --ztunnel-workers {workers}", flush=True)
    cluster.cli("up", "--ztunnel-workers", str(workers), yaml_path)


def _show(r: dict[str, Any]) -> str:
    cpu = ", ".join(f"{k} {v:.0f}%" for k, v in r["cpu_pct"].items())
    conns = "; ".join(f"{k}: " + " ".join(f"{kind}={n}" for kind, n in sorted(c.items()))
                      for k, c in r["conns"].items() if c)
    return f"{r['rps']:.0f} req/s | CPU {cpu} | sockets {conns}"


def run(a: argparse.Namespace, stack: contextlib.ExitStack) -> list[dict[str, Any]]:
    cluster = bl.Cluster(a.cluster)
    bl.preflight(cluster)
    workdir = tempfile.mkdtemp(prefix=f"scale-l4-{a.cluster}-")
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    # On the outer stack, so it runs after every worker count's `down` (each on its own inner
    # stack): down keeps a cluster's CA, as it should for users; this cluster is a throwaway one.
    stack.callback(shutil.rmtree, cluster.paths.state_dir, ignore_errors=True)
    modes = [None] + ([a.pin] if a.pin else [])
    rows: list[dict[str, Any]] = []
    for n in a.workers:
        with contextlib.ExitStack() as per_n:
            per_n.callback(cluster.cli, "down", check=False)
            bring_up(a, cluster, workdir, n if "ambient" in a.setups else 1)
            b = bl.Bench(cluster, workdir, per_n, envoy_concurrency=n)
            for setup in a.setups:
                t = bl.SETUP_FNS[setup](b)
                bl.probe(cluster, t)
                bl.check_proxied(cluster, t)
                server = b.pods(setup)[1]
                for rnd in range(a.rounds):
                    for pin in modes:
                        r = measure(cluster, t, server, a.secs, pin)
                        mode = "unpinned" if pin is None else f"pinned {a.pin_spec}"
                        rows.append({"setup": setup, "workers": n, "mode": mode, "round": rnd + 1, **r})
                        print(f"# {setup} x{n} {mode} round {rnd + 1}: {_show(r)}", flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = [["setup", "workers", "mode", "req/s", "CPU us/req per node", "CPU% per worker", "busiest share", "busy% per CPU", "sockets per worker"]]
    for r in rows:
        procs = {k: v for k, v in r["cpu_pct"].items() if " worker_" not in k}
        threads = {k: v for k, v in r["cpu_pct"].items() if " worker_" in k}
        out.append([r["setup"], str(r["workers"]), r["mode"], f"{r['rps']:.0f}",
                    " ".join(f"{k} {v:.0f}" for k, v in r["us_per_req"].items()),
                    " ".join(f"{k} {v:.0f}" for k, v in (threads or procs).items()),
                    " ".join(f"{k} {v:.0%}" for k, v in r["busiest"].items()),
                    " ".join(f"{k.removeprefix('cpu')}:{v:.0f}" for k, v in r["cpu_busy_pct"].items()),
                    "; ".join(f"{k} " + ",".join(f"{kind}={n}" for kind, n in sorted(c.items()))
                              for k, c in r["conns"].items() if c)])
    return grid(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workers", default="1,2", help="comma-separated ztunnel workers per node (and Envoy "
                    "--concurrency) to compare; default %(default)s")
    ap.add_argument("--pin", default="", metavar="LOAD:PROXY", help="also measure pinned: wrk and nginx on CPU "
                    "list LOAD, every ztunnel/Envoy thread on PROXY (e.g. 0:1 on 2 cores, 0-3:4-15 on 16)")
    ap.add_argument("--setups", default=",".join(SETUPS), help="comma-separated subset of %(default)s")
    ap.add_argument("--secs", type=int, default=5, help="seconds per wrk -c32 run (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cluster", default="scale", help="local cluster name (created and removed per worker count)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args(argv)
    try:
        a.workers = [int(x) for x in a.workers.split(",") if x]
    except ValueError:
        ap.error("--workers: comma-separated integers")
    if not a.workers or min(a.workers) < 1:
        ap.error("--workers: each at least 1")
    a.setups = [s for s in SETUPS if s in a.setups.split(",")]
    if not a.setups:
        ap.error(f"--setups: a subset of {','.join(SETUPS)}")
    a.pin_spec = a.pin
    if a.pin:
        try:
            load, proxy = (cpu_list(x) for x in a.pin.split(":"))
        except ValueError:
            ap.error("--pin: LOAD:PROXY CPU lists, e.g. 0:1")
        have = os.sched_getaffinity(0)
        if not (load | proxy) <= have or load & proxy:
            ap.error(f"--pin: two disjoint CPU lists within {sorted(have)}")
        a.pin = (load, proxy)
    bl.check_cluster_name(a.cluster)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    load_before, started = bl._loadavg(), time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        with contextlib.ExitStack() as stack:
            rows = run(a, stack)
    except (SetupError, bl.api.ApiError, OSError, subprocess.TimeoutExpired) as e:
        print(f"scale_l4: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("scale_l4: interrupted", file=sys.stderr)
        return 130
    cond = (f"{started}, commit {bl._git_rev()}, {os.cpu_count()} cores; wrk -t2 -c32 -d{a.secs}s after 1 s "
            f"warm-up, client pod n1 -> server pod n2 (nginx 1 worker); workers = ztunnel processes per node "
            f"(SO_REUSEPORT) or Envoy --concurrency; pinned LOAD:PROXY = wrk+nginx on LOAD, all proxy threads on "
            f"PROXY; CPU% = utime+stime in % of one core; sockets = established TCP per worker mid-run. "
            f"loadavg before {load_before}, after {bl._loadavg()}.")
    text = cond + "\n\n" + table(rows)
    print("\n" + text)
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, "scale-l4-" + time.strftime("%Y%m%d-%H%M%S"))
    with open(stem + ".json", "w") as f:
        json.dump({"conditions": cond, "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    print(f"\nwrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
