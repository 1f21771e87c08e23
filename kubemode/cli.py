"""The Kubernetes-mode subcommands of `ambient`: install, uninstall, check [--pre], waypoint.

`ambient install | kubectl apply -f -` installs; `ambient uninstall | kubectl delete -f -`
removes what install made, except the CRDs (and so every user's policies and routes) unless
`--purge`. `ambient check` asks the cluster through the user's kubectl; none needs root.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from . import health, waypoint_cli
from .check import gather, judge
from .manifests import InstallOptions, manifests

__all__ = ["register"]


def _dump(objs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objs, sort_keys=False, explicit_start=True)


def _options(a: argparse.Namespace) -> InstallOptions:
    return InstallOptions(image=a.image, trust_domain=a.trust_domain,
                          gateway_api_crds=not a.skip_gateway_api_crds, ca_from_secret=a.ca_from_secret)


def cmd_install(_paths: object, a: argparse.Namespace) -> int:
    sys.stdout.write(_dump(manifests(_options(a))))
    return 0


def cmd_uninstall(_paths: object, a: argparse.Namespace) -> int:
    objs = [o for o in manifests(_options(a)) if a.purge or o["kind"] != "CustomResourceDefinition"]
    sys.stdout.write(_dump(objs[::-1]))  # dependents first, the namespace (and CRDs) last
    return 0


def cmd_check(_paths: object, a: argparse.Namespace) -> int:
    """0: every check passed; 1: one failed (each line says which and what to do)."""
    if a.pre:
        results: list[Any] = judge(gather())
    else:
        results = health.judge(health.gather(health.kubectl_runner(a.kubeconfig)))
    for r in results:
        mark = "√" if r.ok else ("-" if r.reason == health.Reason.SKIPPED else "×")
        print(f"{mark} {r.name}: {r.detail}")
    failed = [r for r in results if not r.ok]
    print("Status check results are √" if not failed else f"{len(failed)} check(s) failed")
    return 0 if not failed else 1


def _install_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", default=InstallOptions().image, help="the mesh's container image (%(default)s)")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--skip-gateway-api-crds", action="store_true",
                   help="the cluster already has the Gateway API CRDs: do not print ours")
    p.add_argument("--ca-from-secret", metavar="NAME",
                   help="use the CA in Secret istio-system/NAME (cert-manager's tls or Istio's cacerts "
                        "layout) instead of generating a root into istio-ca-secret")


def register(sub: Any) -> None:
    """Add the subcommands to `ambient`'s subparsers; they need no root (needs_root=False)."""
    ins = sub.add_parser("install", help="print the Kubernetes manifests: ambient install | kubectl apply -f -")
    _install_flags(ins)
    ins.set_defaults(fn=cmd_install, needs_root=False)
    un = sub.add_parser("uninstall", help="print what install made: ambient uninstall | kubectl delete -f -")
    _install_flags(un)
    un.add_argument("--purge", action="store_true", help="also the CRDs, with every policy and route")
    un.set_defaults(fn=cmd_uninstall, needs_root=False)
    ch = sub.add_parser("check", help="check the mesh's health in the cluster (kubectl), or with --pre "
                                      "this node's prerequisites; exit 1 when a check fails")
    ch.add_argument("--pre", action="store_true", help="kernel features: cgroup v2, bpffs, BTF, sk_lookup")
    ch.add_argument("--kubeconfig", help="kubeconfig for the mesh checks (default: kubectl's own)")
    ch.set_defaults(fn=cmd_check, needs_root=False)
    waypoint_cli.register(sub)
