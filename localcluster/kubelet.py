"""A node agent for a real API server: the kubelet (and CNI) of one simulated node.

`python -m localcluster.kubelet --kubeconfig F --node NAME --node-index I [--prefix P]`

It registers a Node (spec.podCIDR from the address plan, status Ready with allocatable
resources and its InternalIP, the not-ready taint lifted, since no node lifecycle controller
heartbeats simulated nodes), builds the node's network namespace on the shared fabric
(localcluster.network, the same as local mode's), keeps routes to every other Node's pod CIDR
(from their spec.podCIDR and InternalIP, as a flannel-style CNI does), answers every Service
ClusterIP inside the node (localcluster.kubeproxy: relayed to a ready endpoint, the API
server's to the host's loopback) and writes the hosts file of Service names, and list+watches the
Pods bound to it (fieldSelector spec.nodeName). For each Pod: an IP from the node's CIDR, a
pod netns + cgroup wired to the node, one contained process per container
(localcluster.procs, as local mode runs pods) with the `kubernetes` Service's variables and,
when mounted, the ServiceAccount token volume (a TokenRequest bound to the pod), the volumes
kubelet_volumes plans (hostPath mapped per node, projected tokens for an audience, ConfigMaps;
the pod waits Pending while one cannot be provided yet), privileged/hostPID containment
(contain.py --privileged), the pod's sandbox record for ztunnel, and the
status a kubelet writes (phase, podIP,
Ready, containerStatuses with restart counts). Containers that exit are restarted with backoff
(restartPolicy Always/OnFailure). A Pod being deleted gets SIGTERM, its grace period, then
SIGKILL; its netns and cgroup go, and the agent completes the deletion (grace 0, uid
precondition), as a kubelet does. Readiness probes (httpGet, tcpSocket) run from the node
against the pod IP and gate the Ready condition. So Deployments, ReplicaSets and the scheduler are
Kubernetes' own; what runs is decided in localcluster.kubelet_pods (pure).

On SIGTERM it stops every container and removes the node's netns, cgroups and pods' (the Node
object stays, as a kubelet's does; `--deregister` deletes it too).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import errno
import ipaddress
import logging
import os
import shutil
import socket
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from mesh.linux.netns import socket_in_netns

from controlplane.kube.api import ApiError, KubeApi
from controlplane.kube.kinds import WatchedKind
from controlplane.kube.reflector import Delete, Event, Reflector, Relisted, Upsert
from mesh.linux.netns import NETNS_DIR, NetnsError

from .addressing import AddressPlan, ClusterAddressing
from mesh.sandbox import Sandbox, SandboxDir

from .kubelet_pods import (SA_TOKEN_DIR, TOKEN_SECONDS, ContainerFacts, PodPlan, plan_pod, pod_status, resolve_env,
                           token_refresh_due)
from .kubelet_volumes import (BPFFS, SANDBOX_HOST_DIR, EmptyDirVolume, FilesVolume, HostPathVolume, expand_argv,
                              node_host_path)
from .kubeproxy import ServiceProxy, apply_event, endpoints, hosts_text
from .network import ClusterNetwork
from .procs import Containment
from .runner import base_env
from .signals import set_on_signals
from .system import Proc, restart_delay

__all__ = ["NodeAgent"]

log = logging.getLogger("ambient.kubelet")
_NODES = WatchedKind("Node", "", "v1", "nodes", False)
_SERVICES = WatchedKind("Service", "", "v1", "services", True)
_ALL_PODS = WatchedKind("Pod", "", "v1", "pods", True)
FILES_REFRESH = 60.0
"""Seconds between rewrites of a pod's ConfigMap files (a kubelet's sync period is about a minute)."""
_CAPACITY = {"cpu": "8", "memory": "16Gi", "pods": "110"}


class _NotReady(Exception):
    """A volume cannot be provided yet (retried): the reason is logged."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Container:
    plan: Any
    proc: Proc | None
    started_at: str | None = None
    finished_at: str | None = None
    problem: str | None = None
    ready: bool | None = None
    """The readiness probe's verdict (False until it first passes); None: no probe."""
    next_probe: float = 0.0
    failures: int = 0


@dataclass
class _PodRt:
    plan: PodPlan
    ip: str
    netns: str
    cgroup: str
    start_time: str
    containers: list[_Container] = field(default_factory=list)
    last_status: Any = None
    token_issued_at: float | None = None
    """When the ServiceAccount token volume was last written (wall clock); None: no volume."""
    started: bool = False
    """Volumes provided and containers started (until then the pod is Pending, retried)."""
    next_try: float = 0.0
    files_due: float = float("inf")
    """When the pod's files volumes (tokens, ConfigMaps) are rewritten next (wall clock)."""
    volume_dirs: dict[str, str] = field(default_factory=dict)
    waiting_for: str = ""


class NodeAgent:
    def __init__(self, api: KubeApi, *, node: str, index: int, prefix: str, state_dir: str,
                 plan: AddressPlan = AddressPlan(), deregister: bool = False) -> None:
        self.api = api
        self.node = node
        self.plan = plan
        self.node_ip = plan.node_ip(index)
        self.pod_cidr = plan.pod_subnet(index)
        self.net = ClusterNetwork(prefix)
        self.state_dir = state_dir
        self.deregister = deregister
        self.host_root = os.path.join(state_dir, "host")
        """The node's own filesystem: hostPaths that are not the kernel's land here (kubelet_volumes)."""
        self.bpf_root = f"{BPFFS}/{prefix}/{node}"
        """The node's bpffs: the real bpffs's directory its pods see as /sys/fs/bpf."""
        self.sandboxes = SandboxDir(self.host_path(SANDBOX_HOST_DIR))
        self.services: dict[Any, Any] = {}
        self.all_pods: dict[Any, Any] = {}
        self._proxy_dirty = True
        self.proxy: ServiceProxy | None = None
        self.addr = ClusterAddressing(plan)
        self.addr.add_node(node, self.pod_cidr)
        self.pods: dict[str, _PodRt] = {}  # by pod uid
        self._desired: dict[str, dict[str, Any]] = {}  # uid -> latest object
        self._routes: dict[str, tuple[ipaddress.IPv4Network, ipaddress.IPv4Address]] = {}
        self._kick = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.api_vip: tuple[str, int] | None = None
        self.pod_reflector = Reflector(api, WatchedKind("Pod", "", "v1", "pods", True,
                                                        field_selector=f"spec.nodeName={node}"), self._on_pod)
        self.node_reflector = Reflector(api, _NODES, self._on_node)
        self.service_reflector = Reflector(api, _SERVICES, lambda ev: self._on_proxied(self.services, ev))
        self.all_pods_reflector = Reflector(api, _ALL_PODS, lambda ev: self._on_proxied(self.all_pods, ev))

    def host_path(self, path: str) -> str:
        """Where this node's host path `path` is on the real host."""
        return node_host_path(path, node_root=self.host_root, bpf_root=self.bpf_root)

    def _on_proxied(self, store: dict[Any, Any], ev: Event) -> None:
        apply_event(store, ev)
        self._proxy_dirty = True
        self._kick.set()

    # -- lifecycle --

    async def start(self) -> None:
        await self._register()
        try:  # agents of one cluster starting together race to create the shared fabric
            await asyncio.to_thread(self.net.ensure_fabric)
        except NetnsError as e:
            if e.errno != errno.EEXIST:
                raise
        await asyncio.to_thread(self.net.add_node, self.node, self.node_ip, self.pod_cidr, {})
        os.makedirs(self.bpf_root, exist_ok=True)
        await self._forward_api()
        self._tasks = [asyncio.create_task(self.node_reflector.run(), name="kubelet-nodes"),
                       asyncio.create_task(self.service_reflector.run(), name="kubelet-services"),
                       asyncio.create_task(self.all_pods_reflector.run(), name="kubelet-endpoints"),
                       asyncio.create_task(self.pod_reflector.run(), name="kubelet-pods"),
                       asyncio.create_task(self._loop(), name="kubelet-sync")]
        log.info("node %s up: %s, pods %s", self.node, self.node_ip, self.pod_cidr)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.proxy is not None:
            await self.proxy.close()
        for uid in list(self.pods):
            await self._remove(uid, grace=2)
        await asyncio.to_thread(self.net.remove_node, self.node)
        await asyncio.to_thread(self._remove_bpf_root)
        if self.deregister:
            try:
                await self.api.request_json("DELETE", f"/api/v1/nodes/{self.node}")
            except ApiError as e:
                log.info("could not delete Node %s: %s", self.node, e)

    async def _forward_api(self) -> None:
        """Start the node's Service proxy (localcluster.kubeproxy) with the `kubernetes`
        Service, so pods use in-cluster config unchanged (the server's certificate names that
        IP); every other Service follows from the watch."""
        svc = await self.api.request_json("GET", "/api/v1/namespaces/default/services/kubernetes")
        vip, port = svc["spec"]["clusterIP"], int(svc["spec"]["ports"][0]["port"])
        url = urllib.parse.urlsplit(self.api.server)
        os.makedirs(self.state_dir, exist_ok=True)
        self.proxy = ServiceProxy(netns=self.net.node_netns(self.node), api_upstream=(url.hostname or "127.0.0.1",
                                                                                      url.port or 443),
                                  add_address=lambda ip: self.net.add_local_address(self.node, ip),
                                  hosts_path=os.path.join(self.state_dir, "hosts"))
        await self.proxy.update(endpoints([svc], ()), hosts_text([svc]))
        self.api_vip = (vip, port)

    def _remove_bpf_root(self) -> None:
        """The node's bpffs directory: every pin a ztunnel of this node left (its processes are
        gone by now), then the directories."""
        from ebpf.capture import teardown_pins
        if not os.path.isdir(self.bpf_root):
            return
        for name in os.listdir(self.bpf_root):
            try:
                teardown_pins(os.path.join(self.bpf_root, name))
            except Exception as e:  # noqa: BLE001 - remove what can be removed
                log.warning("bpffs %s/%s not removed: %s", self.bpf_root, name, e)
        for d in (self.bpf_root, os.path.dirname(self.bpf_root)):
            try:
                os.rmdir(d)
            except OSError:
                pass  # the other nodes' are still there

    async def _register(self) -> None:
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.node, "labels": {"kubernetes.io/hostname": self.node,
                                                           "kubernetes.io/os": "linux"}},
                "spec": {"podCIDR": str(self.pod_cidr), "podCIDRs": [str(self.pod_cidr)]}}
        try:
            await self.api.request_json("POST", "/api/v1/nodes", body=body)
        except ApiError as e:
            if e.status != 409:
                raise
            # An earlier run of this node: the podCIDR cannot change, so it must agree.
            have = await self.api.request_json("GET", f"/api/v1/nodes/{self.node}")
            if (have.get("spec") or {}).get("podCIDR") not in (None, str(self.pod_cidr)):
                raise RuntimeError(f"Node {self.node} exists with podCIDR {have['spec']['podCIDR']}, "
                                   f"not {self.pod_cidr}") from None
        now = _now()
        await self.api.merge_patch(f"/api/v1/nodes/{self.node}/status", {"status": {
            "capacity": _CAPACITY, "allocatable": _CAPACITY,
            "addresses": [{"type": "InternalIP", "address": str(self.node_ip)},
                          {"type": "Hostname", "address": self.node}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "ambient node agent is posting ready status",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "nodeInfo": {"kubeletVersion": "v1.20.2-ambient", "operatingSystem": "linux", "architecture": "amd64",
                         "containerRuntimeVersion": "ambient://0", "kernelVersion": os.uname().release,
                         "osImage": "simulated", "kubeProxyVersion": "", "machineID": "", "systemUUID": "",
                         "bootID": ""}}})
        # The NodeRestriction-style not-ready taint admission adds; no lifecycle controller lifts it.
        await self.api.merge_patch(f"/api/v1/nodes/{self.node}", {"spec": {"taints": None}})

    # -- watch handlers --

    def _on_node(self, ev: Event) -> None:
        def upsert(obj: dict[str, Any]) -> None:
            name = (obj.get("metadata") or {}).get("name") or ""
            cidr = (obj.get("spec") or {}).get("podCIDR")
            ip = next((a.get("address") for a in (obj.get("status") or {}).get("addresses") or ()
                       if a.get("type") == "InternalIP"), None)
            if name == self.node or not cidr or not ip:
                self._routes.pop(name, None)
                return
            try:
                self._routes[name] = (ipaddress.IPv4Network(cidr), ipaddress.IPv4Address(ip))
            except ValueError:
                log.warning("node %s: unusable podCIDR %r / InternalIP %r", name, cidr, ip)
        if isinstance(ev, Relisted):
            for d in ev.deletes:
                self._routes.pop(d.key.name, None)
            for u in ev.upserts:
                upsert(u.obj)
        elif isinstance(ev, Upsert):
            upsert(ev.obj)
        else:
            self._routes.pop(ev.key.name, None)
        self._kick.set()

    def _on_pod(self, ev: Event) -> None:
        def uid_of(key: Any) -> str | None:
            return next((u for u, o in self._desired.items()
                         if (o.get("metadata") or {}).get("namespace") == key.namespace
                         and (o.get("metadata") or {}).get("name") == key.name), None)
        if isinstance(ev, Relisted):
            for d in ev.deletes:
                if (u := uid_of(d.key)) is not None:
                    self._desired.pop(u)
            for up in ev.upserts:
                self._desired[(up.obj.get("metadata") or {}).get("uid") or ""] = up.obj
        elif isinstance(ev, Upsert):
            self._desired[(ev.obj.get("metadata") or {}).get("uid") or ""] = ev.obj
        elif isinstance(ev, Delete):
            if (u := uid_of(ev.key)) is not None:
                self._desired.pop(u)
        self._kick.set()

    # -- reconciliation --

    async def _loop(self) -> None:
        applied_routes: dict[Any, Any] | None = None
        while True:
            try:
                await asyncio.wait_for(self._kick.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
            self._kick.clear()
            routes = {cidr: ip for cidr, ip in self._routes.values()}
            if routes != applied_routes:
                await asyncio.to_thread(self.net.update_routes, self.node, routes)
                applied_routes = routes
            if self._proxy_dirty and self.proxy is not None and self.service_reflector.synced.is_set():
                self._proxy_dirty = False
                svcs = list(self.services.values())
                await self.proxy.update(endpoints(svcs, self.all_pods.values()), hosts_text(svcs))
            try:
                await self._probe_due()
                await self._sync()
            except Exception:  # noqa: BLE001 - one bad pod must not stop the node
                log.exception("sync failed; retrying")
                await asyncio.sleep(1)

    async def _sync(self) -> None:
        for uid in [u for u in self.pods if u not in self._desired]:
            await self._remove(uid, grace=0)  # force-deleted: nothing to wait for
        for uid, obj in list(self._desired.items()):
            p = plan_pod(obj)
            rt = self.pods.get(uid)
            if p.terminating:
                if rt is not None:
                    await self._remove(uid, grace=p.grace_seconds)
                await self._finish_delete(p)
                self._desired.pop(uid, None)
                continue
            if rt is None:
                rt = await self._add(p)
            if not rt.started and time.monotonic() >= rt.next_try:
                await self._start_containers(rt)
            now = time.time()
            if rt.token_issued_at is not None and token_refresh_due(rt.token_issued_at, TOKEN_SECONDS, now):
                try:  # the directory is bind-mounted: files replaced in it are what the pod reads
                    await self._token_volume(p)
                    rt.token_issued_at = time.time()
                except (ApiError, OSError) as e:
                    log.warning("pod %s: token refresh failed (retrying): %s", p.key, e)
            if rt.started and now >= rt.files_due:
                try:
                    await self._files_volumes(rt)
                except (ApiError, OSError, _NotReady) as e:
                    rt.files_due = now + 5
                    log.warning("pod %s: volume refresh failed (retrying): %s", p.key, e)
            self._supervise(rt)
            await self._write_status(rt)

    async def _add(self, p: PodPlan) -> _PodRt:
        """The pod's sandbox (the CNI step): IP, netns + cgroup, and the record ztunnel reads."""
        key = p.uid
        ip = self.addr.allocate_pod(key, self.node, p.pinned_ip if p.pinned_ip and
                                    ipaddress.IPv4Address(p.pinned_ip) in self.pod_cidr else None)
        podnet = await asyncio.to_thread(self.net.add_pod, self.node, p.uid, ip, self.pod_cidr)
        rt = _PodRt(plan=p, ip=str(ip), netns=podnet.netns, cgroup=podnet.cgroup, start_time=_now())
        self.pods[p.uid] = rt
        await asyncio.to_thread(self.sandboxes.write, Sandbox(uid=p.key, netns=podnet.netns_path, cgroup=podnet.cgroup))
        log.info("pod %s (%s) up at %s", p.key, p.uid, ip)
        return rt

    async def _files_volumes(self, rt: _PodRt) -> None:
        """Write (or rewrite) the pod's projected and ConfigMap volumes into its pod directory:
        tokens bound to the pod for their audience, ConfigMap keys; each file replaced
        atomically. Raises _NotReady while a ConfigMap that is not optional is missing."""
        p = rt.plan
        soonest = time.time() + FILES_REFRESH
        for name, v in p.volumes.items():
            if not isinstance(v, FilesVolume):
                continue
            files: dict[str, bytes] = {}
            for t in v.tokens:
                spec: dict[str, Any] = {"expirationSeconds": t.seconds,
                                        "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": p.name,
                                                           "uid": p.uid}}
                if t.audience:
                    spec["audiences"] = [t.audience]
                out = await self.api.request_json(
                    "POST", f"/api/v1/namespaces/{p.namespace}/serviceaccounts/{p.service_account}/token",
                    body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
                files[t.path] = out["status"]["token"].encode()
                soonest = min(soonest, time.time() + 0.8 * t.seconds)
            for cm in v.config_maps:
                try:
                    obj = await self.api.request_json("GET", f"/api/v1/namespaces/{p.namespace}/configmaps/{cm.name}")
                except ApiError as e:
                    if e.status == 404 and cm.optional:
                        continue
                    if e.status == 404:
                        raise _NotReady(f"configmap {cm.name!r} not found (volume {name})") from None
                    raise
                data = obj.get("data") or {}
                for key, path in cm.items or tuple((k, k) for k in sorted(data)):
                    if key not in data:
                        raise _NotReady(f"configmap {cm.name!r} has no key {key!r} (volume {name})")
                    files[path] = str(data[key]).encode()
            d = rt.volume_dirs.setdefault(name, os.path.join(self._pod_dir(p.uid), "volumes", name))
            os.makedirs(d, mode=0o755, exist_ok=True)
            for rel, data in files.items():
                final = os.path.join(d, rel)
                os.makedirs(os.path.dirname(final), exist_ok=True)
                tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp")
                with open(tmp, "wb") as f:
                    f.write(data)
                os.chmod(tmp, 0o644)
                os.replace(tmp, final)
        rt.files_due = soonest

    def _empty_dir_volume(self, rt: _PodRt, v: EmptyDirVolume) -> str:
        """The pod's emptyDir: under its pod directory (so removed with the pod), mode 0777 as a
        kubelet makes it, for containers of any user; medium Memory is the same directory."""
        d = rt.volume_dirs.get(v.name) or os.path.join(self._pod_dir(rt.plan.uid), "empty", v.name)
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o777)  # not via makedirs' mode: the umask would take bits away
        return d

    def _host_path_volume(self, v: HostPathVolume) -> str:
        path = self.host_path(v.path)
        if v.type == "Directory" and not os.path.isdir(path):
            raise _NotReady(f"hostPath {v.path} (volume {v.name}) is not a directory on node {self.node}")
        own = any(path == r or path.startswith(r + "/") for r in (self.host_root, self.bpf_root))
        if not own and not os.path.isdir(path):  # the host's, shared by every node: never made here
            raise _NotReady(f"hostPath {v.path} (volume {v.name}) does not exist on the host")
        os.makedirs(path, exist_ok=True)  # DirectoryOrCreate, or no type: made as docker would
        return path

    async def _start_containers(self, rt: _PodRt) -> None:
        """Provide the pod's volumes, then start its containers; while a volume cannot be
        provided yet (a ConfigMap not created yet) the pod stays Pending and this is retried."""
        p = rt.plan
        try:
            for name, v in p.volumes.items():
                if isinstance(v, HostPathVolume):
                    rt.volume_dirs[name] = await asyncio.to_thread(self._host_path_volume, v)
                elif isinstance(v, EmptyDirVolume):
                    rt.volume_dirs[name] = await asyncio.to_thread(self._empty_dir_volume, rt, v)
            await self._files_volumes(rt)
        except (_NotReady, ApiError, OSError) as e:
            if str(e) != rt.waiting_for:  # once per reason, not once per retry
                log.info("pod %s: volumes not ready (retrying every second): %s", p.key, e)
                rt.waiting_for = str(e)
            rt.next_try = time.monotonic() + 1
            return
        rt.started = True
        logs = os.path.join(self.state_dir, "logs")
        for c in p.containers:
            if c.problem is not None:
                log.warning("pod %s container %s: %s", p.key, c.name, c.problem)
                rt.containers.append(_Container(plan=c, proc=None, problem=c.problem))
                continue
            env = base_env() | self._service_env() | \
                {"POD_NAME": p.name, "POD_NAMESPACE": p.namespace, "NODE_NAME": self.node} | \
                resolve_env(c, p, pod_ip=rt.ip, host_ip=str(self.node_ip))
            ro: list[tuple[str, str]] = []
            rw: list[tuple[str, str]] = []
            if c.api_token:
                try:
                    ro.append((await self._token_volume(p), SA_TOKEN_DIR))
                    rt.token_issued_at = time.time()
                except (ApiError, OSError) as e:
                    log.warning("pod %s: no API token volume: %s", p.key, e)
                    rt.containers.append(_Container(plan=c, proc=None, problem=f"API token volume: {e}"))
                    continue
            for m in c.mounts:
                writable = isinstance(p.volumes[m.volume], HostPathVolume | EmptyDirVolume) and not m.read_only
                (rw if writable else ro).append((rt.volume_dirs[m.volume], m.path))
            contain = Containment(uid=c.run_as_user, gid=c.run_as_group, hide=(self.state_dir, NETNS_DIR, BPFFS),
                                  volumes=tuple(ro), writable_volumes=tuple(rw), privileged=c.privileged,
                                  host_pid=p.host_pid, hosts_file=self.proxy.hosts_path if self.proxy else None)
            proc = Proc(argv=expand_argv(c.argv, env), netns=rt.netns, cgroup=rt.cgroup, env=env,
                        cwd=c.working_dir, log_path=os.path.join(logs, f"{p.namespace}_{p.name}_{c.name}.log"),
                        contain=contain)
            cont = _Container(plan=c, proc=proc, ready=None if c.readiness is None else False,
                              next_probe=time.monotonic() + (c.readiness.initial_delay if c.readiness else 0))
            try:
                proc.start()
                cont.started_at = _now()
            except OSError as e:
                log.warning("pod %s container %s failed to start: %s", p.key, c.name, e)
                proc.last_exit, proc.next_start = -1, time.monotonic() + 1
            rt.containers.append(cont)
        log.info("pod %s containers started", p.key)

    async def _probe_due(self) -> None:
        """Run the readiness probes that are due, from the node (as a kubelet probes the pod IP)."""
        now = time.monotonic()
        jobs = []
        for rt in self.pods.values():
            for c in rt.containers:
                pr = c.plan.readiness
                if pr is None or c.proc is None:
                    continue
                if not c.proc.running:
                    c.ready, c.failures = False, 0
                    continue
                if now >= c.next_probe:
                    c.next_probe = now + pr.period
                    jobs.append(self._probe_one(rt, c))
        await asyncio.gather(*jobs)

    async def _probe_one(self, rt: _PodRt, c: _Container) -> None:
        pr = c.plan.readiness
        ok = await asyncio.to_thread(self._probe_blocking, rt.ip, pr)
        if ok:
            c.ready, c.failures = True, 0
        else:
            c.failures += 1
            if not c.ready or c.failures >= pr.failure_threshold:
                c.ready = False

    def _probe_blocking(self, ip: str, pr: Any) -> bool:
        try:
            s = socket_in_netns(self.net.node_netns(self.node))
        except OSError:
            return False
        try:
            s.settimeout(pr.timeout)
            s.connect((ip, pr.port))
            if pr.path is None:
                return True
            s.sendall(f"GET {pr.path} HTTP/1.0\r\nHost: {ip}:{pr.port}\r\nUser-Agent: kube-probe/1.20\r\n\r\n".encode())
            head = s.recv(64).split(b" ", 2)
            return len(head) >= 2 and head[1].isdigit() and 200 <= int(head[1]) < 400
        except OSError:
            return False
        finally:
            s.close()

    def _service_env(self) -> dict[str, str]:
        """The variables a kubelet sets for the `kubernetes` Service (in-cluster config reads them)."""
        if self.api_vip is None:
            return {}
        vip, port = self.api_vip
        return {"KUBERNETES_SERVICE_HOST": vip, "KUBERNETES_SERVICE_PORT": str(port),
                "KUBERNETES_SERVICE_PORT_HTTPS": str(port), "KUBERNETES_PORT": f"tcp://{vip}:{port}",
                f"KUBERNETES_PORT_{port}_TCP": f"tcp://{vip}:{port}", f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp",
                f"KUBERNETES_PORT_{port}_TCP_PORT": str(port), f"KUBERNETES_PORT_{port}_TCP_ADDR": vip}

    def _pod_dir(self, uid: str) -> str:
        return os.path.join(self.state_dir, "pods", uid)

    async def _token_volume(self, p: PodPlan) -> str:
        """The ServiceAccount volume a kubelet projects: a token bound to this pod (the API
        server's audience, ~1 h, rewritten at 80% of its lifetime), ca.crt and namespace."""
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"expirationSeconds": TOKEN_SECONDS,
                         "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": p.name, "uid": p.uid}}}
        out = await self.api.request_json(
            "POST", f"/api/v1/namespaces/{p.namespace}/serviceaccounts/{p.service_account}/token", body=body)
        d = os.path.join(self._pod_dir(p.uid), "serviceaccount")
        os.makedirs(d, mode=0o755, exist_ok=True)
        files = {"token": out["status"]["token"].encode(), "namespace": p.namespace.encode()}
        if self.api.ca_file:
            with open(self.api.ca_file, "rb") as f:
                files["ca.crt"] = f.read()
        for name, data in files.items():
            tmp = os.path.join(d, f".{name}")
            with open(tmp, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)  # the container's user reads it, as a projected volume's default mode
            os.replace(tmp, os.path.join(d, name))
        return d

    def _supervise(self, rt: _PodRt) -> None:
        now = time.monotonic()
        for c in rt.containers:
            proc = c.proc
            if proc is None:
                continue
            if proc.popen is not None and proc.popen.poll() is not None and proc.next_start == 0.0:
                proc.last_exit = proc.popen.returncode
                c.finished_at = _now()
                policy = rt.plan.restart_policy
                if policy == "Never" or (policy == "OnFailure" and proc.last_exit == 0):
                    proc.next_start = float("inf")
                else:
                    proc.next_start = now + proc.backoff(now)
                log.info("pod %s container %s exited with %s", rt.plan.key, c.plan.name, proc.last_exit)
            elif proc.next_start and now >= proc.next_start:
                proc.next_start = 0.0
                proc.restarts += 1
                try:
                    proc.start()
                    c.started_at = _now()
                except OSError as e:
                    log.warning("restart of %s/%s failed: %s", rt.plan.key, c.plan.name, e)
                    proc.next_start = now + restart_delay(proc.restarts)

    async def _write_status(self, rt: _PodRt) -> None:
        facts = [ContainerFacts(name=c.plan.name, running=bool(c.proc and c.proc.running), ready=c.ready,
                                restarts=c.proc.restarts if c.proc else 0, started_at=c.started_at,
                                last_exit=c.proc.last_exit if c.proc else None, finished_at=c.finished_at,
                                problem=c.problem) for c in rt.containers]
        if not rt.started:  # volumes not provided yet: every container is still being created
            facts = [ContainerFacts(name=c.name, running=False, restarts=0, started_at=None) for c in rt.plan.containers]
        key = tuple(facts)
        if key == rt.last_status:
            return  # only changes are written
        status = pod_status(rt.plan, facts, pod_ip=rt.ip, host_ip=str(self.node_ip),
                            start_time=rt.start_time, now=_now())
        p = rt.plan
        try:
            await self.api.merge_patch(f"/api/v1/namespaces/{p.namespace}/pods/{p.name}/status", {"status": status})
            rt.last_status = key
        except ApiError as e:
            log.info("status of %s not written (%s); retrying", p.key, e)

    async def _remove(self, uid: str, *, grace: int) -> None:
        rt = self.pods.pop(uid, None)
        if rt is None:
            return
        procs_ = [c.proc for c in rt.containers if c.proc is not None and c.proc.running]
        if procs_:
            # SIGTERM to every container at once, then the grace period (capped: a test node).
            from .procs import stop
            await asyncio.gather(*(asyncio.to_thread(stop, pr.popen, max(0.1, min(grace, 30))) for pr in procs_))
        await asyncio.to_thread(self.sandboxes.remove, rt.plan.key)
        await asyncio.to_thread(self.net.remove_pod, uid)
        shutil.rmtree(self._pod_dir(uid), ignore_errors=True)
        self.addr.release_pod(uid)
        log.info("pod %s (%s) removed", rt.plan.key, uid)

    async def _finish_delete(self, p: PodPlan) -> None:
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                "preconditions": {"uid": p.uid}}
        try:
            await self.api.request_json("DELETE", f"/api/v1/namespaces/{p.namespace}/pods/{p.name}", body=body)
        except ApiError as e:
            if e.status not in (404, 409):
                log.info("final delete of %s: %s", p.key, e)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="localcluster.kubelet", description="simulated node for a real API server")
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--node", required=True)
    ap.add_argument("--node-index", type=int, required=True, help="slot in the address plan: node IP and pod CIDR")
    ap.add_argument("--prefix", default="amb-kube", help="netns/cgroup name prefix shared by the cluster's nodes")
    ap.add_argument("--state-dir", required=True, help="container logs (hidden from the pods)")
    ap.add_argument("--deregister", action="store_true", help="delete the Node object on exit")
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    os.makedirs(a.state_dir, exist_ok=True)

    async def run() -> None:
        api = await KubeApi.from_kubeconfig(a.kubeconfig)
        agent = NodeAgent(api, node=a.node, index=a.node_index, prefix=a.prefix, state_dir=a.state_dir,
                          deregister=a.deregister)
        stop = asyncio.Event()
        set_on_signals(stop)
        try:
            await agent.start()
            await stop.wait()
        finally:
            await agent.stop()
            await api.close()
    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
