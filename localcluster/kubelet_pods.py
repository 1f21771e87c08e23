"""The node agent's decisions about Pods (pure): what to run for a Pod object, and the status
to write back, as a kubelet would. Wire dicts from the API server are converted once here.

This node runs commands, not images: a container runs its `command` + `args` (the image is
ignored), contained as local mode contains pods (localcluster.procs). Environment: literal
values and the downward API fields a kubelet resolves (metadata.name/namespace/uid,
spec.nodeName, spec.serviceAccountName, status.podIP, status.hostIP); volumes as kubelet_volumes plans them
(hostPath, configMap, projected tokens and ConfigMaps; the API token's is the node agent's
own); anything else (Secrets, envFrom, other volume kinds) is refused with a reason, shown as
the container's waiting state, rather than run half-configured.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .kubelet_volumes import Mount, Volume, plan_mounts, plan_volumes

__all__ = ["ContainerPlan", "PodPlan", "Probe", "ContainerFacts", "plan_pod", "pod_status", "resolve_env", "UNSUPPORTED",
           "SA_TOKEN_DIR", "TOKEN_SECONDS", "token_refresh_due"]

UNSUPPORTED = "CreateContainerConfigError"
"""The waiting reason of a container this node cannot run as specified (Kubernetes' own)."""
SA_TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
"""Admission adds this mount to every pod that automounts its API token: the node agent
provides it (token, ca.crt, namespace), as a kubelet's projected volume does."""
_POD_MOUNT_ROOTS = ("/run", "/var/run", "/tmp")
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
    readiness: "Probe | None" = None
    mounts: tuple[Mount, ...] = ()
    """Volumes other than the API token's (kubelet_volumes), at their mount paths."""
    privileged: bool = False
    """securityContext.privileged: every capability, the host's devices, no masked paths."""


@dataclass(frozen=True, slots=True)
class Probe:
    """A readiness probe the node runs against the pod's IP: HTTP GET (2xx/3xx) or a TCP connect."""

    port: int
    path: str | None  # None: tcpSocket
    period: float = 10.0
    timeout: float = 1.0
    initial_delay: float = 0.0
    failure_threshold: int = 3


def _probe(spec: Mapping[str, Any] | None, ports: Mapping[str, int]) -> Probe | None:
    """A readiness probe, or None (none given, or a kind this node does not run: exec)."""
    if not spec:
        return None
    action = spec.get("httpGet") or spec.get("tcpSocket")
    if not action:
        return None
    port = action.get("port")
    port = ports.get(port) if isinstance(port, str) else _int(port)
    if port is None:
        return None
    return Probe(port=port, path=str(action.get("path") or "/") if "httpGet" in spec else None,
                 period=float(_int(spec.get("periodSeconds")) or 10), timeout=float(_int(spec.get("timeoutSeconds")) or 1),
                 initial_delay=float(_int(spec.get("initialDelaySeconds")) or 0),
                 failure_threshold=_int(spec.get("failureThreshold")) or 3)


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
    host_pid: bool
    volumes: Mapping[str, Volume]
    pinned_ip: str | None
    """status.podIP already recorded (this agent restarted): the pod keeps its address."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _container(c: Mapping[str, Any], pod_sc: Mapping[str, Any], volumes: Mapping[str, Volume],
               bad_volumes: Mapping[str, str]) -> ContainerPlan:
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
    if c.get("envFrom"):
        problem = problem or "envFrom is not supported on this node"
    mounts, why = plan_mounts(c.get("volumeMounts") or (), volumes, bad_volumes, skip=SA_TOKEN_DIR)
    privileged = sc.get("privileged") is True
    outside = [m.path for m in mounts if not any(m.path == r or m.path.startswith(r + "/") for r in _POD_MOUNT_ROOTS)]
    if outside and not privileged and why is None:
        why = (f"volumeMounts {', '.join(outside)}: an unprivileged container's volumes must be under "
               f"{', '.join(_POD_MOUNT_ROOTS)} on this node (its root is the host's, read-only)")
    problem = problem or why
    ports = {str(p.get("name")): int(p["containerPort"]) for p in c.get("ports") or ()
             if p.get("name") and _int(p.get("containerPort")) is not None}
    return ContainerPlan(
        readiness=_probe(c.get("readinessProbe"), ports),
        api_token=any(m.get("mountPath") == SA_TOKEN_DIR for m in c.get("volumeMounts") or ()),
        mounts=mounts, privileged=privileged,
        name=name, argv=argv, env=tuple(env), field_env=tuple(field_env), working_dir=c.get("workingDir") or None,
        run_as_user=uid if uid is not None else (_int(pod_sc.get("runAsUser")) or 0),
        run_as_group=gid if gid is not None else (_int(pod_sc.get("runAsGroup")) or 0),
        problem=problem)


def plan_pod(obj: Mapping[str, Any]) -> PodPlan:
    """A Pod object as what this node does with it."""
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    pod_sc = spec.get("securityContext") or {}
    volumes, bad_volumes = plan_volumes(spec.get("volumes") or ())
    grace = _int(meta.get("deletionGracePeriodSeconds"))
    if grace is None:
        grace = _int(spec.get("terminationGracePeriodSeconds"))
    return PodPlan(
        namespace=str(meta.get("namespace") or ""), name=str(meta.get("name") or ""), uid=str(meta.get("uid") or ""),
        node=str(spec.get("nodeName") or ""), service_account=str(spec.get("serviceAccountName") or "default"),
        containers=tuple(_container(c, pod_sc, volumes, bad_volumes) for c in spec.get("containers") or ()),
        restart_policy=str(spec.get("restartPolicy") or "Always"),
        terminating=meta.get("deletionTimestamp") is not None,
        grace_seconds=30 if grace is None else grace, host_network=bool(spec.get("hostNetwork")),
        host_pid=bool(spec.get("hostPID")), volumes=volumes,
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
    ready: bool | None = None
    """The readiness probe's verdict; None: no probe (ready once running)."""
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
    def is_ready(f: ContainerFacts) -> bool:
        return f.running and f.ready is not False
    ready = bool(containers) and all(is_ready(f) for f in containers)
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
        st: dict[str, Any] = {"name": f.name, "ready": is_ready(f), "started": f.running, "restartCount": f.restarts,
                              "image": "none", "imageID": "", "state": _state(f)}
        if f.last_exit is not None and f.finished_at:
            st["lastState"] = {"terminated": {"exitCode": f.last_exit, "finishedAt": f.finished_at,
                                              "reason": "Completed" if f.last_exit == 0 else "Error"}}
        statuses.append(st)
    return {"phase": phase, "podIP": pod_ip, "podIPs": [{"ip": pod_ip}], "hostIP": host_ip, "startTime": start_time,
            "conditions": [cond("Initialized", True), cond("Ready", ready), cond("ContainersReady", ready),
                           cond("PodScheduled", True)],
            "containerStatuses": statuses}


TOKEN_SECONDS = 3607
"""The API token's requested lifetime (a kubelet's default for the ServiceAccount volume)."""


def token_refresh_due(issued_at: float, lifetime: float, now: float) -> bool:
    """A projected token is rewritten once 80% of its lifetime has passed, as a kubelet does."""
    return now >= issued_at + 0.8 * lifetime
