"""The `ambient` command: bring a local meshed cluster up, change it, look inside, take it down."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from localcluster.api import ApiError, call
from localcluster.paths import DEFAULT_CLUSTER, ClusterPaths, check_cluster_name
from mesh.config import ConfigError, load_text
from kubemode import cli as kube_cli
from localcluster import accesslog, stat as stat_cli
from localcluster.prometheus import PrometheusError

_START_TIMEOUT = 30.0


def _sources(files: list[str]) -> list[dict[str, str]]:
    """Read and syntax-check files here, so a typo fails before any process starts."""
    out = []
    for f in files:
        if f == "-":
            text, name, base = sys.stdin.read(), "<stdin>", os.getcwd()
        else:
            try:
                with open(f, encoding="utf-8") as fh:
                    text = fh.read()
            except OSError as e:
                raise ConfigError(e.strerror or str(e), reason="unreadable", source=f) from None
            name, base = f, os.path.dirname(os.path.abspath(f))
        load_text(text, name, base_dir=base)
        out.append({"name": name, "text": text, "base_dir": base})
    return out


def _running(paths: ClusterPaths) -> bool:
    try:
        call(paths.runner_socket, "ping", timeout=3)
        return True
    except (ApiError, OSError):
        return False


def _start_runner(paths: ClusterPaths, a: argparse.Namespace) -> None:
    if a.prometheus:
        from localcluster import prometheus
        prometheus.check_port(a.prometheus_port)
    os.makedirs(paths.run_dir, mode=0o700, exist_ok=True)
    argv = [sys.executable, "-m", "localcluster.daemon", "--cluster", paths.name,
            "--trust-domain", a.trust_domain, "--cert-ttl", str(a.cert_ttl)]
    if a.ca_dir:
        argv += ["--ca-dir", os.path.abspath(a.ca_dir)]
    if a.fail_open:
        argv += ["--fail-open"]
    argv += ["--ztunnel-workers", str(a.ztunnel_workers), "--metrics-port", str(a.metrics_port),
             "--scrape-interval", str(a.scrape_interval)]
    if a.prometheus:
        argv += ["--prometheus", "--prometheus-port", str(a.prometheus_port)]
    with open(paths.runner_log, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ApiError(f"the cluster runner exited with {proc.returncode}:\n{_tail(paths.runner_log)}",
                           "runner_failed")
        if _running(paths):
            return
        time.sleep(0.1)
    raise ApiError(f"the cluster runner did not start in {_START_TIMEOUT:.0f}s; see {paths.runner_log}",
                   "runner_failed")


def _tail(path: str, n: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def _print_applied(res: dict[str, Any]) -> None:
    for k in res["applied"]:
        print(f"{k} applied")
    for k in res.get("deleted", []):
        print(f"{k} deleted")  # what a Gateway that is no longer a waypoint had made
    if res["unchanged"]:
        print(f"{res['unchanged']} unchanged")
    for w in res.get("warnings", []):
        print(w, file=sys.stderr)


def cmd_up(paths: ClusterPaths, a: argparse.Namespace) -> int:
    sources = _sources(a.files)
    started = False
    if not _running(paths):
        _start_runner(paths, a)
        started = True
    try:
        res = call(paths.runner_socket, "apply", sources=sources)
    except (ApiError, ConfigError):
        if started:
            _down(paths, quiet=True)
        raise
    _print_applied(res)
    if started and a.prometheus:
        from localcluster import prometheus
        url = f"http://127.0.0.1:{a.prometheus_port}"
        prometheus.wait_ready(url)
        print(f"prometheus at {url} (`ambient stat`, `ambient edges` query it)")
    print(f"cluster {paths.name!r} is up; `ambient status` shows it, `ambient down` removes it")
    return 0


def cmd_apply(paths: ClusterPaths, a: argparse.Namespace) -> int:
    res = call(paths.runner_socket, "apply", sources=_sources(a.files), wait=not a.no_wait)
    _print_applied(res)
    return 0


def cmd_delete(paths: ClusterPaths, a: argparse.Namespace) -> int:
    res = call(paths.runner_socket, "delete", sources=_sources(a.files))
    for k in res["deleted"]:
        print(f"{k} deleted")
    for k in res["not_found"]:
        print(f"{k} not found")
    return 0


def cmd_exec(paths: ClusterPaths, a: argparse.Namespace) -> int:
    if not a.command:
        raise ApiError("no command given: ambient exec [-n NS] POD -- CMD...", "bad_request")
    info = call(paths.runner_socket, "pod_info", namespace=a.namespace, name=a.pod)
    from localcluster.procs import Containment, pod_argv
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + ":" + os.environ.get("PATH", ""))
    workdir = info.get("workdir") if info.get("workdir") and os.path.isdir(info["workdir"]) else None
    if workdir is not None:
        os.chdir(workdir)  # the pod's working directory, as `kubectl exec` uses the image's
    c = info.get("contain")  # the container's containment: never run a command uncontained
    if c is None:
        raise ApiError(f"pod {a.namespace}/{a.pod} has no containment to run in", "not_found")
    argv = pod_argv(a.command, netns=info["netns"], cgroup=info["cgroup"],
                    contain=Containment(uid=c["uid"], gid=c["gid"], hide=tuple(c["hide"])),
                    cwd=workdir)
    os.execvpe(argv[0], argv, env)
    return 127  # not reached


def cmd_logs(paths: ClusterPaths, a: argparse.Namespace) -> int:
    if a.access:
        if a.pod or a.container:
            raise ApiError("--access reads the proxies' logs: give no pod (filter with -n, --svc, --status)",
                           "bad_request")
        return accesslog.cmd(paths, a)
    extra = [o for o, v in (("--svc", a.svc), ("--status", a.status), ("--since", a.since), ("--proxy", a.proxy),
                            ("--follow", a.follow), ("-o", a.output != "text")) if v]
    if extra:
        raise ApiError(f"{', '.join(extra)} need --access", "bad_request")
    if not a.pod:
        raise ApiError("which pod? ambient logs [-n NS] POD, or ambient logs --access", "bad_request")
    ns = a.namespace or "default"
    st = call(paths.runner_socket, "status")
    for p in st["pods"]:
        if p["namespace"] == ns and p["name"] == a.pod:
            for name, c in p["containers"].items():
                if a.container in (None, name):
                    sys.stdout.write(_tail(c["log"], 200 if a.tail is None else a.tail))
            return 0
    raise ApiError(f"no pod {ns}/{a.pod}", "not_found")


def cmd_status(paths: ClusterPaths, a: argparse.Namespace) -> int:
    if not a.watch:
        return _status_once(paths, a)
    try:
        while True:  # until interrupted or the reader goes away (`| head`)
            if sys.stdout.isatty():
                sys.stdout.write("\x1b[H\x1b[2J")
            _status_once(paths, a)
            sys.stdout.flush()
            time.sleep(a.interval)
    except KeyboardInterrupt:
        return 0


def _status_once(paths: ClusterPaths, a: argparse.Namespace) -> int:
    st = call(paths.runner_socket, "status")
    out = "json" if a.json else a.output
    if out == "json":
        print(json.dumps(st, indent=2))
        return 0
    if out == "yaml":
        import yaml
        print(yaml.safe_dump(st, sort_keys=False), end="")
        return 0
    wide = out == "wide"
    cp = st["control_plane"]
    print(f"cluster {st['cluster']}  trust domain {st['trust_domain']}  control plane "
          f"{'running' if cp['running'] else 'STOPPED'} (version {cp['version']}, "
          f"{cp['certificates']} certificates signed)")
    print("\nNODES")
    _table(["NAME", "IP", "POD CIDR", "ZTUNNEL", "STATE", "CERTIFICATES"], [
        [n["name"], n["ip"], n["pod_cidr"],
         ("ready" if n["ztunnel"]["ready"] else "not ready") + ("" if n["ztunnel"]["connected"] else ", disconnected"),
         f"v{n['ztunnel']['version']}",
         ", ".join(f"{c['identity'].rsplit('/ns/', 1)[-1]} ({_cert_state(c)})"
                   for c in n["ztunnel"]["certificates"]) or "-"]
        for n in st["nodes"]])
    print("\nPODS")
    _table(["NAMESPACE", "NAME", "NODE", "IP", "PHASE", "RESTARTS", "AMBIENT", "SERVICE ACCOUNT"]
           + (["NETNS", "CGROUP"] if wide else []), [
        [p["namespace"], p["name"], p["node"], p["ip"], p["phase"], str(p["restarts"]),
         "yes" if p["ambient"] else "no", p["service_account"]]
        + ([p["netns"] or "-", p["cgroup"] or "-"] if wide else []) for p in st["pods"]])
    for p in st["pods"]:
        if p.get("reason"):  # held before start (localcluster/meshgate.py)
            print(f"  {p['namespace']}/{p['name']}: {p['phase']}, {p['reason']}: {p['message']}")
    if st["services"]:
        print("\nSERVICES")
        _table(["NAMESPACE", "NAME", "CLUSTER IP", "PORTS"], [
            [s["namespace"], s["name"], s["cluster_ip"], ",".join(map(str, s["ports"]))] for s in st["services"]])
    if st.get("waypoints") or st.get("missing_waypoints"):
        print("\nWAYPOINTS")
        _table(["NAMESPACE", "NAME", "NODE", "IP", "STATE", "RESTARTS", "USED BY"], [
            [w["namespace"], w["name"], w["node"] or "-", w["ip"] or "-",
             ("ready" if w["ready"] else "running, not ready" if w["running"] else "not running")
             + ("" if w["connected"] or not w["running"] else ", disconnected"),
             str(w["restarts"]), _users(w["used_by"])] for w in st.get("waypoints", [])]
            + [[*m["waypoint"].split("/", 1), "-", "-", "MISSING (traffic refused)", "-", _users(m["used_by"])]
               for m in st.get("missing_waypoints", [])])
    obs = st.get("observability")
    if obs:
        prom = obs.get("prometheus")
        print(f"\nOBSERVABILITY\n  scrape endpoint {obs['scrape_endpoint']}/targets ({obs['targets']} proxies)")
        if prom:
            print(f"  prometheus {prom['url']} ({'running' if prom['running'] else 'NOT RUNNING'}, "
                  f"restarts {prom['restarts']}); `ambient stat`, `ambient edges` query it")
    _print_routes(st.get("routes") or {})
    if st["policies"]:
        print("\nPOLICIES")
        for p in st["policies"]:
            print(f"  {p}")
    if st.get("warnings"):
        print("\nWARNINGS (accepted, see each)")
        for key, ws in st["warnings"].items():
            for w in ws:
                print(f"  {w}")
    return 0


def _print_routes(routes: dict) -> None:
    """HTTPRoute conditions per parentRef (Gateway API's Accepted / ResolvedRefs) and whether
    each VirtualService's hosts and destinations name Services (controlplane/route_status.py)."""
    rows = []
    for r in routes.get("http_routes", []):
        for p in r["parents"] or [{"parent": "(no parentRefs)", "conditions": []}]:
            conds = {c["type"]: c for c in p["conditions"]}
            acc, res = conds.get("Accepted"), conds.get("ResolvedRefs")
            bad = [c["message"] for c in (acc, res) if c and c["status"] != "True"]
            rows.append([f"HTTPRoute {r['route']}", p["parent"],
                         f"{acc['status']} {acc['reason']}" if acc else "-",
                         f"{res['status']} {res['reason']}" if res else "-", "; ".join(bad) or "-"])
    for v in routes.get("virtual_services", []):
        lost = [h for part in ("hosts", "destinations") for h, svcs in v[part].items() if not svcs]
        rows.append([f"VirtualService {v['virtual_service']}", "hosts " + ",".join(v["hosts"]), "-",
                     "True Resolved" if v["resolved"] else "False Unresolved",
                     f"names no Service: {', '.join(lost)}" if lost else "-"])
    if rows:
        print("\nROUTES")
        _table(["ROUTE", "PARENT", "ACCEPTED", "RESOLVED REFS", "MESSAGE"], rows)


def _cert_state(c: dict) -> str:
    """`valid`, `expired`, `pending`, plus how long renewal has been failing (an outage)."""
    since = c.get("failing_since")
    return c["state"] if since is None else f"{c['state']}, renewal failing for {max(0, time.time() - since):.0f}s"


def _users(u: dict[str, list[str]]) -> str:
    parts = [f"namespace {n}" for n in u["namespaces"]] + [f"svc {x}" for x in u["services"]] + [
        f"pod {x}" for x in u["pods"]]
    return ", ".join(parts) or "-"


def _table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for r in [head, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())


def _down(paths: ClusterPaths, quiet: bool = False) -> None:
    try:
        call(paths.runner_socket, "shutdown", timeout=60)
    except (ApiError, OSError):
        pass
    # Whatever the runner could not remove (it may have crashed): by pid, prefix and path.
    try:
        with open(paths.runner_pid_file) as f:
            os.kill(int(f.read().strip()), signal.SIGKILL)
    except (OSError, ValueError):
        pass
    from localcluster.network import ClusterNetwork
    ClusterNetwork(paths.prefix).teardown()
    import shutil
    from localcluster.runner import remove_pins
    remove_pins(paths.bpf_pin_dir)
    shutil.rmtree(paths.run_dir, ignore_errors=True)
    if not quiet:
        print(f"cluster {paths.name!r} removed")


def cmd_down(paths: ClusterPaths, a: argparse.Namespace) -> int:
    _down(paths)
    return 0


def cmd_control_plane(paths: ClusterPaths, a: argparse.Namespace) -> int:
    res = call(paths.runner_socket, "control_plane", action=a.action)
    print(f"control plane {'running' if res['running'] else 'stopped'} (version {res['version']})")
    return 0


def cmd_restart(paths: ClusterPaths, a: argparse.Namespace) -> int:
    res = call(paths.runner_socket, "restart", kind=a.kind, node=a.node, serving_timeout=a.timeout,
               timeout=a.timeout * 2 + 120)
    for r in res["restarted"]:
        print(f"ztunnel on {r['node']}" + (f" (worker {r['worker']})" if r["worker"] else "") +
              f": pid {r['old_pid']} -> {r['new_pid']}, serving after {r['serving_s']:.2f}s, "
              f"old one drained and gone after {r['drain_s']:.2f}s")
    return 0


def _duration(v: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(v[:-1]) * units[v[-1]] if v and v[-1] in units else float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad duration {v!r} (e.g. 24h, 90m, 3600)") from None


def _workers(v: str) -> int:
    from ebpf.maps import max_workers  # a capture slot per worker in the listener maps
    try:
        n = int(v)
    except ValueError:
        n = 0
    if not 1 <= n <= max_workers():
        raise argparse.ArgumentTypeError(f"--ztunnel-workers must be 1..{max_workers()} (got {v!r})")
    return n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ambient", description=__doc__)
    p.add_argument("-c", "--cluster", type=check_cluster_name,
                   default=os.environ.get("AMBIENT_CLUSTER", DEFAULT_CLUSTER),
                   help="local cluster name (env AMBIENT_CLUSTER; default %(default)s)")
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="start a local cluster (or add to it) from YAML files")
    up.add_argument("files", nargs="+")
    up.add_argument("--trust-domain", default="cluster.local")
    up.add_argument("--cert-ttl", type=_duration, default=24 * 3600.0, help="workload cert TTL (24h)")
    up.add_argument("--ca-dir", help="load the root CA from DIR (root-cert.pem, root-key.pem)")
    up.add_argument("--fail-open", action="store_true",
                    help="while a node's ztunnel is down, its captured pods connect directly (default: refused)")
    up.add_argument("--ztunnel-workers", type=_workers, default=1, metavar="N",
                    help="ztunnel processes per node sharing the ports with SO_REUSEPORT (default 1)")
    up.add_argument("--metrics-port", type=int, default=0, metavar="PORT",
                    help="serve every proxy's /metrics on 127.0.0.1:PORT (default: a free port; see status)")
    up.add_argument("--prometheus", action="store_true",
                    help="run Prometheus (127.0.0.1 only) scraping every proxy, with golden-signal rules")
    up.add_argument("--prometheus-port", type=int, default=9090, metavar="PORT")
    up.add_argument("--scrape-interval", type=_duration, default=15.0, metavar="DURATION",
                    help="Prometheus scrape and rule interval (default 15s)")
    up.set_defaults(fn=cmd_up)

    ap = sub.add_parser("apply", help="create or update objects from YAML files")
    ap.add_argument("files", nargs="*")
    ap.add_argument("-f", "--filename", action="append", default=[], dest="more")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for readiness")
    ap.set_defaults(fn=cmd_apply)

    de = sub.add_parser("delete", help="delete the objects named in YAML files")
    de.add_argument("files", nargs="*")
    de.add_argument("-f", "--filename", action="append", default=[], dest="more")
    de.set_defaults(fn=cmd_delete)

    ex = sub.add_parser("exec", help="run a command inside a pod (its netns and cgroup)")
    ex.add_argument("-n", "--namespace", default="default")
    ex.add_argument("pod")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    ex.set_defaults(fn=cmd_exec)

    lg = sub.add_parser("logs", help="print a pod's container logs, or (--access) the proxies' access logs")
    lg.add_argument("-n", "--namespace", default=None, help="the pod's (default: default); with --access: "
                    "traffic from or to it (default: all)")
    lg.add_argument("pod", nargs="?")
    lg.add_argument("-c", "--container")
    lg.add_argument("--tail", type=int, default=None, help="the last N lines (default: 200; --access: all)")
    accesslog.add_arguments(lg)
    lg.set_defaults(fn=cmd_logs)

    st = sub.add_parser("status", help="nodes, pods, IPs, enrollment and certificates")
    st.add_argument("-o", "--output", choices=["table", "wide", "json", "yaml"], default="table")
    st.add_argument("--json", action="store_true", help="same as -o json")
    st.add_argument("-w", "--watch", action="store_true", help="print again every --interval seconds")
    st.add_argument("--interval", type=float, default=2.0)
    st.set_defaults(fn=cmd_status)

    dn = sub.add_parser("down", help="remove every process, netns, cgroup and pin of the cluster")
    dn.set_defaults(fn=cmd_down)

    cp = sub.add_parser("control-plane", help="stop or start the control plane (failure drills)")
    cp.add_argument("action", choices=["start", "stop"])
    cp.set_defaults(fn=cmd_control_plane)
    rs = sub.add_parser("restart", help="restart ztunnels without dropping traffic (new process first, old drains)")
    rs.add_argument("kind", choices=["ztunnel"])
    rs.add_argument("--node", default=None, help="only this node's ztunnel (default: every node, one at a time)")
    rs.add_argument("--timeout", type=float, default=30.0,
                    help="seconds the new process may take to serve its pods, else it is stopped (default 30)")
    rs.set_defaults(fn=cmd_restart)
    kube_cli.register(sub)  # install, uninstall, check, waypoint: Kubernetes mode
    stat_cli.register(sub)  # stat, edges: golden signals from Prometheus
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if hasattr(a, "more"):
        a.files = a.files + a.more
        if not a.files:
            print("ambient: no files given", file=sys.stderr)
            return 2
    if getattr(a, "command", None) and a.command[:1] == ["--"]:
        a.command = a.command[1:]
    if os.geteuid() != 0 and getattr(a, "needs_root", True):
        print("ambient: must run as root (network namespaces, cgroups, eBPF)", file=sys.stderr)
        return 1
    paths = ClusterPaths(a.cluster)
    try:
        rc = a.fn(paths, a)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at exit
        return rc
    except BrokenPipeError:
        # `ambient status | head`: the reader left; exit quietly, as other CLI tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        print("nothing was applied", file=sys.stderr)
        return 1
    except PrometheusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ApiError as e:
        # Config errors found by the runner come back as ApiErrors with the config reason.
        print(f"error: {e}", file=sys.stderr)
        if e.reason not in ("runner_unavailable", "runner_failed", "not_found", "not_ready", "bad_request",
                            "prometheus_unavailable", "prometheus_not_ready", "bad_query", "not_local",
                            "restart_failed"):
            print("nothing was applied", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
