"""The node agent's decisions about Pods (pure): what to run for a Pod object, and the status
to write back, as a kubelet would. Wire dicts from the API server are converted once here.

This node runs commands, not images: a container runs its `command` + `args` (the image is
ignored), contained as local mode contains pods (localcluster.procs). Environment: literal
values and the downward API fields a kubelet resolves (metadata.name/namespace/uid,
spec.nodeName, spec.serviceAccountName, status.podIP, status.hostIP); anything else
(Secrets, ConfigMaps, volumes other than the API token's, which the node agent provides)
is refused with a reason, shown as the container's waiting
state, rather than run half-configured.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ContainerPlan", "PodPlan", "ContainerFacts", "plan_pod", "pod_status", "resolve_env", "UNSUPPORTED",
           "SA_TOKEN_DIR"]

UNSUPPORTED = "CreateContainerConfigError"
"""The waiting reason of a container this node cannot run as specified (Kubernetes' own)."""
SA_TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
"""Admission adds this mount to every pod that automounts its API token: the node agent
provides it (token, ca.crt, namespace), as a kubelet's projected volume does."""
_FIELDS = ("metadata.name", "metadata.namespace", "metadata.uid", "spec.nodeName",
           "spec.serviceAccountName", "status.podIP", "status.hostIP")


@dataclass(frozen=True, slots=True)
class ContainerPlan:
    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    """Literal values; `$(FIELD)` placeholders of the downward API are resolved at start."""
    field_env: tuple[tuple[str, str], ...]
    """(variable, field path) pairs resolved when the pod's IP is known."""
    working_dir: str | None
    run_as_user: int
    run_as_group: int
    problem: str | None = None
    """Why it cannot run (then it waits with reason UNSUPPORTED and this message)."""
    api_token: bool = False
    """Mounts the ServiceAccount's API token at SA_TOKEN_DIR."""


@dataclass(frozen=True, slots=True)
class PodPlan:
    namespace: str
    name: str
    uid: str
    node: str
    service_account: str
    containers: tuple[ContainerPlan, ...]
    restart_policy: str
    terminating: bool
    grace_seconds: int
    host_network: bool
    pinned_ip: str | None
    """status.podIP already recorded (this agent restarted): the pod keeps its address."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _container(c: Mapping[str, Any], pod_sc: Mapping[str, Any]) -> ContainerPlan:
    name = str(c.get("name") or "")
    sc = c.get("securityContext") or {}
    uid = _int(sc.get("runAsUser"))
    gid = _int(sc.get("runAsGroup"))
    argv = tuple(str(x) for x in (c.get("command") or ())) + tuple(str(x) for x in (c.get("args") or ()))
    env: list[tuple[str, str]] = []
    field_env: list[tuple[str, str]] = []
    problem = None if argv else "no command: this node runs commands, not images"
    for e in c.get("env") or ():
        var = str(e.get("name") or "")
        if "value" in e or not e.get("valueFrom"):
            env.append((var, str(e.get("value") or "")))
            continue
        ref = (e["valueFrom"] or {}).get("fieldRef") or {}
        path = ref.get("fieldPath")
        if path in _FIELDS:
            field_env.append((var, path))
        else:
            problem = problem or f"env {var}: only literal values and fieldRef {', '.join(_FIELDS)} are supported"
    mounts = [m.get("mountPath") for m in c.get("volumeMounts") or () if m.get("mountPath") != SA_TOKEN_DIR]
    if c.get("envFrom") or mounts:
        problem = problem or f"envFrom and volumeMounts ({', '.join(map(str, mounts))}) are not supported on this node"
    return ContainerPlan(
        api_token=any(m.get("mountPath") == SA_TOKEN_DIR for m in c.get("volumeMounts") or ()),
        name=name, argv=argv, env=tuple(env), field_env=tuple(field_env), working_dir=c.get("workingDir") or None,
        run_as_user=uid if uid is not None else (_int(pod_sc.get("runAsUser")) or 0),
        run_as_group=gid if gid is not None else (_int(pod_sc.get("runAsGroup")) or 0),
        problem=problem)


def plan_pod(obj: Mapping[str, Any]) -> PodPlan:
    """A Pod object as what this node does with it."""
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    pod_sc = spec.get("securityContext") or {}
    grace = _int(meta.get("deletionGracePeriodSeconds"))
    if grace is None:
        grace = _int(spec.get("terminationGracePeriodSeconds"))
    return PodPlan(
        namespace=str(meta.get("namespace") or ""), name=str(meta.get("name") or ""), uid=str(meta.get("uid") or ""),
        node=str(spec.get("nodeName") or ""), service_account=str(spec.get("serviceAccountName") or "default"),
        containers=tuple(_container(c, pod_sc) for c in spec.get("containers") or ()),
        restart_policy=str(spec.get("restartPolicy") or "Always"),
        terminating=meta.get("deletionTimestamp") is not None,
        grace_seconds=30 if grace is None else grace, host_network=bool(spec.get("hostNetwork")),
        pinned_ip=status.get("podIP") or None)


def resolve_env(c: ContainerPlan, p: PodPlan, *, pod_ip: str, host_ip: str) -> dict[str, str]:
    fields = {"metadata.name": p.name, "metadata.namespace": p.namespace, "metadata.uid": p.uid,
              "spec.nodeName": p.node, "spec.serviceAccountName": p.service_account,
              "status.podIP": pod_ip, "status.hostIP": host_ip}
    return {**dict(c.env), **{var: fields[path] for var, path in c.field_env}}


@dataclass(frozen=True, slots=True)
class ContainerFacts:
    """What the node knows about one container right now."""

    name: str
    running: bool
    restarts: int
    started_at: str | None
    """RFC 3339 time of the current (or last) start."""
    last_exit: int | None = None
    finished_at: str | None = None
    problem: str | None = None


def _state(f: ContainerFacts) -> dict[str, Any]:
    if f.problem is not None:
        return {"waiting": {"reason": UNSUPPORTED, "message": f.problem}}
    if f.running:
        return {"running": {"startedAt": f.started_at}}
    if f.last_exit is not None:
        return {"waiting": {"reason": "CrashLoopBackOff", "message": f"exited with {f.last_exit}; restarting"}}
    return {"waiting": {"reason": "ContainerCreating"}}


def pod_status(p: PodPlan, containers: Sequence[ContainerFacts], *, pod_ip: str, host_ip: str,
               start_time: str, now: str) -> dict[str, Any]:
    """The status a kubelet would write: phase, IPs, conditions, one status per container."""
    ready = bool(containers) and all(f.running for f in containers)
    if any(f.problem for f in containers):
        phase = "Pending"
    elif containers and all(not f.running and f.last_exit is not None for f in containers) and p.restart_policy == "Never":
        phase = "Succeeded" if all(f.last_exit == 0 for f in containers) else "Failed"
    else:
        phase = "Running" if any(f.running or f.last_exit is not None for f in containers) else "Pending"

    def cond(kind: str, ok: bool) -> dict[str, Any]:
        return {"type": kind, "status": "True" if ok else "False", "lastProbeTime": None, "lastTransitionTime": now}
    statuses = []
    for f in containers:
        st: dict[str, Any] = {"name": f.name, "ready": f.running, "started": f.running, "restartCount": f.restarts,
                              "image": "none", "imageID": "", "state": _state(f)}
        if f.last_exit is not None and f.finished_at:
            st["lastState"] = {"terminated": {"exitCode": f.last_exit, "finishedAt": f.finished_at,
                                              "reason": "Completed" if f.last_exit == 0 else "Error"}}
        statuses.append(st)
    return {"phase": phase, "podIP": pod_ip, "podIPs": [{"ip": pod_ip}], "hostIP": host_ip, "startTime": start_time,
            "conditions": [cond("Initialized", True), cond("Ready", ready), cond("ContainersReady", ready),
                           cond("PodScheduled", True)],
            "containerStatuses": statuses}
