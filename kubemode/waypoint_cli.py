"""`ambient waypoint apply|delete|list`: istio-waypoint Gateways through the API server, as `istioctl waypoint` does.

Through the user's kubectl (its kubeconfig and credentials), as `ambient check`: kubemode runs
no API client of its own. `apply -n NS [--name waypoint] [--for service|workload|all|none]
[--enroll-namespace]` writes the Gateway (`kubectl apply --server-side`, field manager
`ambient-waypoint`; a Gateway of that name someone else wrote is a conflict unless
`--overwrite`); the control plane deploys it
(controlplane.kube.waypoint_controller). `--enroll-namespace` labels the namespace
`istio.io/use-waypoint=NAME`; `--wait` waits until the Gateway is Programmed. `delete` removes
Gateways (the garbage collector takes their Deployments); `list` shows them with their
traffic type, Programmed condition and address.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from mesh.model import WAYPOINT_LABEL
from mesh.model.workload import WAYPOINT_CLASS, WAYPOINT_FOR_LABEL, WaypointFor

__all__ = ["register", "waypoint_gateway", "list_rows", "cmd_apply", "cmd_delete", "cmd_list"]

FIELD_MANAGER = "ambient-waypoint"


def waypoint_gateway(namespace: str, name: str, waypoint_for: str) -> dict[str, Any]:
    """The Gateway `istioctl waypoint apply` writes (pure)."""
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": name, "namespace": namespace, "labels": {WAYPOINT_FOR_LABEL: waypoint_for}},
            "spec": {"gatewayClassName": WAYPOINT_CLASS,
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}


def _programmed(gw: Mapping[str, Any]) -> str:
    for c in (gw.get("status") or {}).get("conditions") or ():
        if c.get("type") == "Programmed":
            return str(c.get("status"))
    return "Unknown"


def list_rows(gateways: list[Mapping[str, Any]], all_namespaces: bool) -> list[list[str]]:
    """Table rows (header first) for the waypoint Gateways among `gateways` (pure)."""
    rows = [(["NAMESPACE"] if all_namespaces else []) + ["NAME", "TRAFFIC-TYPE", "PROGRAMMED", "ADDRESS"]]
    for gw in sorted(gateways, key=lambda g: (g["metadata"].get("namespace", ""), g["metadata"]["name"])):
        if (gw.get("spec") or {}).get("gatewayClassName") != WAYPOINT_CLASS:
            continue
        meta = gw["metadata"]
        addrs = ",".join(a.get("value", "") for a in (gw.get("status") or {}).get("addresses") or ()) or "-"
        rows.append(([meta.get("namespace", "")] if all_namespaces else [])
                    + [meta["name"], (meta.get("labels") or {}).get(WAYPOINT_FOR_LABEL, "service"),
                       _programmed(gw), addrs])
    return rows


def _kubectl(kubeconfig: str | None) -> Callable[..., tuple[int, str]]:
    """kubectl (as `ambient check` finds it), with stdin: (exit code, stdout or the error)."""
    exe = shutil.which("kubectl") or os.path.join(os.path.dirname(sys.executable), "kubectl")
    pre = [exe] + ([f"--kubeconfig={kubeconfig}"] if kubeconfig else [])

    def run(*args: str, input: str | None = None) -> tuple[int, str]:
        try:
            p = subprocess.run([*pre, *args, "--request-timeout=20s"], input=input, capture_output=True,
                               text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            return 1, str(e)
        return p.returncode, p.stdout if p.returncode == 0 else (p.stderr.strip() or p.stdout)
    return run


def _fail(message: str) -> int:
    print(f"ambient waypoint: {message}", file=sys.stderr)
    return 1


def _get_gateway(kubectl: Callable[..., tuple[int, str]], ns: str, name: str) -> dict[str, Any] | None:
    code, out = kubectl("get", "gateways.gateway.networking.k8s.io", name, "-n", ns, "-o", "json")
    return json.loads(out) if code == 0 else None


def cmd_apply(_paths: object, a: argparse.Namespace) -> int:
    kubectl = _kubectl(a.kubeconfig)
    ns, name = a.namespace, a.name
    force = ["--force-conflicts"] if a.overwrite else []
    code, out = kubectl("apply", "--server-side", f"--field-manager={FIELD_MANAGER}", *force, "-f", "-",
                        input=json.dumps(waypoint_gateway(ns, name, a.waypoint_for)))
    if code != 0:
        if "conflict" in out.lower():
            return _fail(f"Gateway {ns}/{name} exists with fields someone else set; --overwrite replaces them\n{out}")
        return _fail(out)
    print(f"waypoint {ns}/{name} applied")
    if a.enroll_namespace:
        code, out = kubectl("label", "namespace", ns, f"{WAYPOINT_LABEL}={name}", "--overwrite")
        if code != 0:
            return _fail(out)
        print(f'namespace {ns} labeled with "{WAYPOINT_LABEL}: {name}"')
    if a.wait:
        deadline = time.monotonic() + a.timeout
        while True:
            gw = _get_gateway(kubectl, ns, name)
            if gw is not None and _programmed(gw) == "True":
                addrs = ",".join(x.get("value", "") for x in gw["status"].get("addresses") or ())
                print(f"waypoint {ns}/{name} is programmed at {addrs}")
                break
            if time.monotonic() > deadline:
                return _fail(f"{ns}/{name} not Programmed within {a.timeout:.0f} s")
            time.sleep(0.5)
    return 0


def cmd_delete(_paths: object, a: argparse.Namespace) -> int:
    kubectl = _kubectl(a.kubeconfig)
    ns = a.namespace
    if a.all:
        code, out = kubectl("get", "gateways.gateway.networking.k8s.io", "-n", ns, "-o", "json")
        if code != 0:
            return _fail(out)
        names = [g["metadata"]["name"] for g in json.loads(out).get("items") or ()
                 if (g.get("spec") or {}).get("gatewayClassName") == WAYPOINT_CLASS]
    else:
        names = a.names or ["waypoint"]
    rc = 0
    for name in names:
        code, out = kubectl("delete", "gateways.gateway.networking.k8s.io", name, "-n", ns, "--wait=false")
        if code == 0:
            print(f"waypoint {ns}/{name} deleted")
        else:
            rc = _fail(f"{ns}/{name} not found" if "NotFound" in out else out)
    return rc


def cmd_list(_paths: object, a: argparse.Namespace) -> int:
    kubectl = _kubectl(a.kubeconfig)
    where = ["--all-namespaces"] if a.all_namespaces else ["-n", a.namespace]
    code, out = kubectl("get", "gateways.gateway.networking.k8s.io", *where, "-o", "json")
    if code != 0:
        return _fail(out)
    rows = list_rows(json.loads(out).get("items") or [], a.all_namespaces)
    if len(rows) == 1:
        print("No waypoints found." if a.all_namespaces else f"No waypoints found in namespace {a.namespace}.")
        return 0
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def register(sub: Any) -> None:
    wp = sub.add_parser("waypoint", help="apply, delete or list waypoints (istio-waypoint Gateways) in a "
                                         "Kubernetes cluster, as istioctl waypoint")
    wsub = wp.add_subparsers(dest="waypoint_cmd", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("-n", "--namespace", default="default")
        p.add_argument("--kubeconfig", help="default: kubectl's ($KUBECONFIG, else ~/.kube/config)")
    ap = wsub.add_parser("apply", help="write a waypoint Gateway (the control plane deploys it)")
    common(ap)
    ap.add_argument("--name", default="waypoint")
    ap.add_argument("--for", dest="waypoint_for", default="service", choices=[w.value for w in WaypointFor],
                    help="which traffic it takes: the istio.io/waypoint-for label (%(default)s)")
    ap.add_argument("--enroll-namespace", action="store_true",
                    help=f"label the namespace {WAYPOINT_LABEL}=NAME: its traffic goes through the waypoint")
    ap.add_argument("--overwrite", action="store_true", help="take over a Gateway of that name someone else wrote")
    ap.add_argument("--wait", action="store_true", help="wait until the Gateway is Programmed")
    ap.add_argument("--timeout", type=float, default=60.0, help="with --wait: seconds (%(default)s)")
    ap.set_defaults(fn=cmd_apply, needs_root=False)
    de = wsub.add_parser("delete", help="delete waypoint Gateways (their Deployments go with them)")
    common(de)
    de.add_argument("names", nargs="*", metavar="NAME", help="default: waypoint")
    de.add_argument("--all", action="store_true", help="every waypoint in the namespace")
    de.set_defaults(fn=cmd_delete, needs_root=False)
    ls = wsub.add_parser("list", help="the waypoints, their traffic type, Programmed condition and address")
    common(ls)
    ls.add_argument("-A", "--all-namespaces", action="store_true")
    ls.set_defaults(fn=cmd_list, needs_root=False)
