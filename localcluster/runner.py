"""The local cluster runner: API server, scheduler, CNI and kubelet of a one-host cluster.

One daemon per cluster. It keeps the resource store, validates and plans every change before
anything is applied (a bad batch changes nothing), then reconciles the host to the store:

    Node      -> a network namespace on the fabric, bootstrap credentials, one ztunnel process
    Pod       -> a network namespace + cgroup wired to its node, one process per container
    Service   -> a cluster VIP (used by the mesh; local mode has no kube-proxy)
    Gateway (istio-waypoint) -> a synthesized ServiceAccount + Pod (localcluster/waypoints.py)
                 and the waypoint process in that pod's netns, with bootstrap credentials
    policies  -> kept in the store and distributed by the control plane

The control plane runs inside this process and watches the store, as istiod watches the
Kubernetes API. Processes that exit are restarted with a capped backoff (kubelet's
restartPolicy: Always), ztunnels included.
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import ipaddress
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from controlplane.ca import CertificateAuthority
from mesh.clock import Clock
from mesh.config import (ConfigError, ConfigErrors, Loaded, last_wins, parse_text, validate_batch,
                         validate_deletion)
from controlplane.server import ControlPlane
from controlplane.translate import enrolled
from mesh.identity import NodeId
from mesh.linux.netns import NETNS_DIR
from mesh.model import Container, Namespace, Node, Pod, Resource, ResourceKey, Service
from mesh.sandbox import Sandbox, SandboxDir
from localcluster.api import ApiError
from localcluster.addressing import AddressError, AddressPlan, ClusterAddressing
from localcluster.network import ClusterNetwork
from localcluster.observe import Observability, ObserveSettings
from localcluster.paths import ClusterPaths
from localcluster.procs import Containment
from controlplane.store import ResourceStore
from localcluster.system import RESTART_BACKOFF_MAX, Proc, ProcSpec, SystemWorkload
from localcluster import waypoints
from localcluster.meshgate import GateDecision, GateReason, decide as gate_decide
from localcluster.handover import hand_over
from localcluster.runner_status import RunnerStatus
from mesh.identity import SpiffeId
from mesh.model import PolicyObject

__all__ = ["ClusterSettings", "Runner"]

log = logging.getLogger("ambient.runner")
_BOOTSTRAP_TTL = 30 * 24 * 3600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterSettings:
    trust_domain: str = "cluster.local"
    cert_ttl: float = 24 * 3600.0
    """Workload certificate lifetime in seconds (Istio's default: 24 h)."""
    ca_dir: str | None = None
    """Load the CA from here (root-cert.pem, root-key.pem[, cert-chain.pem]); default: the
    cluster's state directory, where one is generated on first start."""
    plan: AddressPlan = field(default_factory=AddressPlan)
    fail_open: bool = False
    """Captured pods' traffic passes uncaptured while their ztunnel is down (default: refused)."""
    ztunnel_workers: int = 1
    """ztunnel processes per node, sharing the in-pod ports with SO_REUSEPORT (one per core)."""
    observe: ObserveSettings = field(default_factory=ObserveSettings)
    """The scrape endpoint and the optional Prometheus (localcluster/observe.py)."""


@dataclass(slots=True)
class _PodRt:
    uid: str
    node: str
    ip: ipaddress.IPv4Address
    net: Any
    containers: dict[str, Proc]
    gate: GateDecision | None = None
    """Why the containers have not started yet (localcluster/meshgate.py); None once started."""


class Runner(RunnerStatus):
    """Owns everything one local cluster made on this host."""

    def __init__(self, paths: ClusterPaths, settings: ClusterSettings, *, clock: Clock) -> None:
        self.paths = paths
        self.settings = settings
        self.clock = clock
        self.store = ResourceStore()
        self.addr = ClusterAddressing(settings.plan)
        self.net = ClusterNetwork(paths.prefix)
        ca_dir = settings.ca_dir or paths.ca_dir
        self.ca = CertificateAuthority.load_or_create(ca_dir, settings.trust_domain, clock=clock)
        self.cp = ControlPlane(ca=self.ca, socket_path=paths.control_plane_socket, clock=clock,
                               cert_ttl=settings.cert_ttl)
        self.store.watch(self.cp.resources_changed)
        self._system: dict[tuple[str, str], list[Proc]] = {}
        """Running system workloads by (kind, target): ztunnel per node (replica 0 attaches
        capture and has the node's admin ports; all are SO_REUSEPORT workers, each in its
        own capture slot, so any live one serves every pod)."""
        self._pods: dict[str, _PodRt] = {}
        self.obs = Observability(paths, settings.observe, cp=self.cp, system=self._system, pods=self._pods,
                                 clock=clock)
        self._warnings: dict[ResourceKey, list[str]] = {}
        """Config warnings of each object as last applied (ambient status shows them)."""
        self._lock = asyncio.Lock()
        self._supervisor: asyncio.Task[None] | None = None
        self._gate_task: asyncio.Task[None] | None = None
        self.committed_at: float | None = None

    # -- lifecycle --

    async def start(self) -> None:
        os.makedirs(self.paths.logs_dir, exist_ok=True)
        await asyncio.to_thread(self.net.ensure_fabric)
        await self.cp.start()
        await self.obs.start()
        if (prom := self.obs.prometheus_workload()) is not None:
            self._start_system(prom)
        self._supervisor = asyncio.ensure_future(self._supervise())
        self._gate_task = asyncio.ensure_future(self._gate_loop())

    async def shutdown(self) -> None:
        """Stop every process and remove every namespace, cgroup and pin of this cluster."""
        if self._gate_task is not None:
            self._gate_task.cancel()
        if self._supervisor is not None:
            self._supervisor.cancel()
        await self.cp.stop()
        for rt in self._pods.values():
            for c in rt.containers.values():
                c.stop()
        for replicas in self._system.values():
            for z in replicas:
                z.stop(now=True)
        self._system.clear()
        self._pods.clear()
        await self.obs.close()
        await asyncio.to_thread(self.net.teardown)
        remove_pins(self.paths.bpf_pin_dir)

    # -- API: apply / delete --

    async def apply(self, sources: Sequence[dict[str, str]], wait: bool = True) -> dict[str, Any]:
        """Parse, validate, plan and commit `sources` ({name, text, base_dir}) as one batch."""
        async with self._lock:
            loaded = [dataclasses.replace(x, resource=self._keep_defaults(x.resource))
                      for x in self._parse(sources)]
            self._guard_owned(loaded)
            validate_batch(loaded, self.store.objects)
            batch, orphans, addr = self._plan(loaded)
            changed = [r for r in batch if self.store.get(r.key) != r]
            self.addr = addr
            self.store.commit(changed, deletes=orphans)
            self.committed_at = self.clock.now()
            # Accepted-but-not-enforced fields etc.: shown by apply now and by status later.
            for x in loaded:
                self._warnings[x.resource.key] = [str(w) for w in x.warnings]
            await self._reconcile()
        if wait:
            await self.wait_ready()
        return {"applied": [str(r.key) for r in changed], **({"deleted": [str(k) for k in orphans]} if orphans else {}),
                "warnings": [str(w) for x in loaded for w in x.warnings],
                "unchanged": len(batch) - len(changed), "committed_at": self.committed_at,
                "version": self.cp.version}

    async def delete(self, sources: Sequence[dict[str, str]]) -> dict[str, Any]:
        async with self._lock:
            keys = [x.resource.key for x in self._parse(sources)]
            present = [k for k in keys if self.store.get(k) is not None]
            present += [k for k in self._owned_by(present) if k not in present]  # a Gateway's pod and SA go with it
            self._refuse_owned(present)
            validate_deletion(present, self.store.objects)
            addr = copy.deepcopy(self.addr)
            for k in present:
                if k.kind == "Pod":
                    addr.release_pod(k)
                elif k.kind == "Service":
                    addr.release_service(k)
            self.store.commit(deletes=present)
            for k in present:
                self._warnings.pop(k, None)
            self.committed_at = self.clock.now()
            await self._reconcile()
            # Node addresses go last: their pods were released above and reconciled away.
            for k in present:
                if k.kind == "Node":
                    addr.remove_node(k.name)
            self.addr = addr
        return {"deleted": [str(k) for k in present],
                "not_found": [str(k) for k in keys if k not in present]}

    def _owned_by(self, owners: Sequence[ResourceKey]) -> list[ResourceKey]:
        """Keys of the synthesized objects that `owners` (Gateways) own."""
        wanted = set(owners)
        return [k for k, o in self.store.objects.items() if waypoints.owner_of(o) in wanted]

    def _guard_owned(self, loaded: Sequence[Loaded]) -> None:
        """A user's Pod must not take the key of a waypoint pod a Gateway made (or is making now)."""
        making = {ResourceKey("Pod", x.resource.namespace, waypoints.pod_name(x.resource.name)): x.resource.key
                  for x in loaded if waypoints.is_waypoint_gateway(x.resource)}
        errors = []
        for x in loaded:
            k = x.resource.key
            old = self.store.get(k)
            owner = making.get(k) or (waypoints.owner_of(old) if old is not None else None)
            if owner is not None and isinstance(x.resource, Pod):
                o = x.origin
                errors.append(ConfigError(f"this pod is made by {owner} for its waypoint; name yours otherwise",
                                          reason="conflict", source=o.source, key=k, document=o.document,
                                          item=o.item, line=o.line))
        if errors:
            raise ConfigErrors(errors)

    def _refuse_owned(self, deleting: Sequence[ResourceKey]) -> None:
        gone = set(deleting)
        errors = []
        for k in deleting:
            o = self.store.get(k)
            owner = waypoints.owner_of(o) if o is not None else None
            if owner is not None and owner not in gone:
                errors.append(ConfigError(f"made by {owner} for its waypoint; delete the Gateway instead",
                                          reason="forbidden", source="<delete>", key=k))
        if errors:
            raise ConfigErrors(errors)

    def _parse(self, sources: Sequence[dict[str, str]]) -> list[Loaded]:
        batch: list[Loaded] = []
        errors: list[ConfigError] = []
        for s in sources:
            try:
                batch += parse_text(s["text"], s["name"], base_dir=s.get("base_dir"))
            except ConfigError as e:
                errors.append(e)
        if errors:
            raise ConfigErrors(errors)
        return last_wins(batch)  # the same object in two sources: the last one, as kubectl

    def _keep_defaults(self, r: Resource) -> Resource:
        # Fields the cluster filled in (node, pod IP, VIP, pod CIDR) stay when a re-applied
        # object leaves them out, as Kubernetes keeps spec.nodeName and spec.clusterIP.
        old = self.store.get(r.key)
        if isinstance(r, Pod) and isinstance(old, Pod):
            return dataclasses.replace(r, node_name=r.node_name or old.node_name,
                                       pod_ip=r.pod_ip or old.pod_ip)
        if isinstance(r, Service) and isinstance(old, Service):
            return dataclasses.replace(r, cluster_ip=r.cluster_ip or old.cluster_ip)
        if isinstance(r, Node) and isinstance(old, Node):
            return dataclasses.replace(r, pod_cidr=r.pod_cidr or old.pod_cidr)
        return r

    def _plan(self, loaded: list[Loaded]) -> tuple[list[Resource], list[ResourceKey], ClusterAddressing]:
        """Schedule pods, allocate addresses and synthesize waypoint objects on a copy of the
        allocator: all or nothing. Returns (objects to store, owned objects to delete, addresses)."""
        addr = copy.deepcopy(self.addr)
        out: list[Resource] = []

        def refuse(x: Loaded, field: str | None, message: str, reason: str = "bad_value") -> ConfigError:
            o = x.origin
            return ConfigErrors([ConfigError(message, reason=reason, source=o.source, key=x.resource.key,
                                             field=field, document=o.document, item=o.item, line=o.line)])

        nodes = [x for x in loaded if isinstance(x.resource, Node)]
        for x in nodes:
            try:  # one at a time, so an error names the node it is about
                na = addr.add_node(x.resource.name, x.resource.pod_cidr)
            except AddressError as e:
                raise refuse(x, "spec.podCIDR", str(e)) from None
            out.append(dataclasses.replace(x.resource, pod_cidr=na.pod_cidr))
        existing = {p.key for p in self.store.of(Pod)}
        load = {n.name: 0 for n in addr.nodes}
        for p in self.store.of(Pod):
            if p.node_name in load:
                load[p.node_name] += 1

        def place(x: Loaded, r: Pod, what: str = "") -> Pod:
            node = r.node_name
            if node is None:  # the scheduler: the node with the fewest pods
                if not load:
                    raise refuse(x, "spec.nodeName", f"no node to schedule {what or 'the pod'} on; add a Node",
                                 "unschedulable")
                node = min(load, key=lambda n: (load[n], n))
            if r.key not in existing:
                load[node] = load.get(node, 0) + 1
            try:
                ip = addr.allocate_pod(r.key, node, r.pod_ip)
            except AddressError as e:
                raise refuse(x, "status.podIP", f"{what}: {e}" if what else str(e)) from None
            return dataclasses.replace(r, node_name=node, pod_ip=ip)

        final = {**self.store.objects, **{x.resource.key: x.resource for x in loaded}}
        synthesized: list[tuple[Loaded, Resource]] = []
        orphans: list[ResourceKey] = []
        for x in loaded:
            r = x.resource
            if r.key.kind != "Gateway":
                continue
            if waypoints.is_waypoint_gateway(r):
                problem = waypoints.gateway_problem(r)
                if problem is not None:
                    raise refuse(x, *problem)
                synthesized += [(x, o) for o in waypoints.synthesize(r, final)]
            else:  # no longer a waypoint: what it made goes
                orphans += self._owned_by([r.key])
        for x in loaded:
            r = x.resource
            if isinstance(r, Pod):
                out.append(place(x, r))
            elif isinstance(r, Service):
                try:
                    vip = addr.allocate_service(r.key, r.cluster_ip)
                except AddressError as e:
                    raise refuse(x, "spec.clusterIP", str(e)) from None
                out.append(dataclasses.replace(r, cluster_ip=vip))
            elif not isinstance(r, Node):
                out.append(r)
        for x, o in synthesized:
            out.append(place(x, o, f"waypoint pod {o.namespace}/{o.name}") if isinstance(o, Pod) else o)
        for k in orphans:
            if k.kind == "Pod":
                addr.release_pod(k)
        return out, orphans, addr

    # -- reconciliation --

    async def _reconcile(self) -> None:
        nodes = {n.name: n for n in self.store.of(Node)}
        pods = {f"{p.namespace}/{p.name}": p for p in self.store.of(Pod)}
        gateways = {f"{g.namespace}/{g.name}": g for g in self.store.of(PolicyObject)
                    if waypoints.is_waypoint_gateway(g)}
        for target in [t for kind, t in self._system if kind == "waypoint" and t not in gateways]:
            self._remove_waypoint(target)  # before its pod's netns goes
        for uid in [u for u in self._pods if u not in pods]:
            await self._remove_pod(uid)
        for name in [n for n in self._nodes() if n not in nodes]:
            await self._remove_node(name)
        added = [n for n in nodes if n not in self._nodes()]
        for name in added:
            await self._add_node(name)
        if added:
            for name in self._nodes():
                await asyncio.to_thread(self.net.update_routes, name, self._routes(name))
        for uid, p in pods.items():
            if uid not in self._pods:
                await self._add_pod(uid, p)
        for target, gw in gateways.items():
            if ("waypoint", target) not in self._system and f"{gw.namespace}/{waypoints.pod_name(gw.name)}" in self._pods:
                self._add_waypoint(gw)

    def _routes(self, node: str) -> dict[Any, Any]:
        return self.addr.routes_for(node)

    async def _repair_routes(self) -> None:
        for name in self._nodes():
            try:
                n = await asyncio.to_thread(self.net.update_routes, name, self._routes(name))
            except Exception as e:  # noqa: BLE001 - e.g. the link is still down: next second
                log.debug("node %s: routes not repaired yet: %s", name, e)
                continue
            if n:
                log.warning("node %s: restored %d route(s) to other nodes (its link went down and up?)", name, n)

    async def _add_node(self, name: str) -> None:
        na = self.addr.node(name)
        await asyncio.to_thread(self.net.add_node, name, na.ip, na.pod_cidr, self._routes(name))
        ndir = self.paths.node_dir(name)
        self._write_bootstrap(NodeId(trust_domain=self.settings.trust_domain, node=name),
                              os.path.join(ndir, "bootstrap"))
        self._start_system(self._ztunnel_workload(name))
        log.info("node %s up: ip %s pods %s", name, na.ip, na.pod_cidr)

    def _nodes(self) -> list[str]:
        return [target for kind, target in self._system if kind == "ztunnel"]

    def _ztunnel_workload(self, node: str) -> SystemWorkload:
        """A node's ztunnel (the DaemonSet pod): `ztunnel_workers` replicas in the node netns."""
        ndir = self.paths.node_dir(node)
        argv = (sys.executable, "-m", "ztunnel", "--node", node, "--run-dir", ndir,
                "--control-plane", self.paths.control_plane_socket, "--trust-domain", self.settings.trust_domain)
        env = tuple(sorted((base_env() | _prefixed_env("ZTUNNEL_")).items()))
        replicas = []
        for i in range(self.settings.ztunnel_workers):
            # Every worker gets the pins: each puts its listeners in its own capture slot.
            extra = ("--pin-dir", os.path.join(self.paths.bpf_pin_dir, node),
                     *(("--fail-open",) if self.settings.fail_open else ()),
                     *(("--worker", str(i)) if i else ()))
            replicas.append(ProcSpec(
                argv=argv + extra, netns=self.net.node_netns(node), cgroup=self.net.ztunnel_cgroup(node),
                env=env, log_path=self.paths.ztunnel_log(node, i),
                admin_socket=os.path.join(ndir, "admin.sock" if i == 0 else f"admin-{i}.sock"),
                label=f"ztunnel on {node}" + (f" (worker {i})" if i else "")))
        return SystemWorkload(kind="ztunnel", target=node, replicas=tuple(replicas))

    def _start_system(self, sw: SystemWorkload) -> None:
        started = []
        try:
            for spec in sw.replicas:
                p = Proc.of(spec)
                p.start()
                started.append(p)
        except BaseException:
            for p in started:
                p.stop(now=True)
            raise
        self._system[sw.key] = started

    def _stop_system(self, kind: str, target: str) -> None:
        for p in self._system.pop((kind, target), []):
            p.stop(now=True)

    # -- graceful ztunnel restart --

    async def restart_ztunnel(self, node: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        """Restart each ztunnel (of `node`, or of every node) without dropping traffic: start
        the new process next to the old, wait until it serves every local pod, then SIGTERM
        the old one, which drains (ztunnel/app.py) and exits. One replica at a time."""
        async with self._lock:
            nodes = self._nodes()
            if node is not None and node not in nodes:
                raise ApiError(f"no node {node!r} (nodes: {', '.join(nodes) or 'none'})", "not_found")
            done = []
            for name in [node] if node is not None else nodes:
                replicas = self._system[("ztunnel", name)]
                for i, spec in enumerate(self._ztunnel_workload(name).replicas):
                    # The supervisor watches the new one from the moment it serves.
                    res = await hand_over(replicas[i], spec, lambda: self._dump(spec.admin_socket),
                                          lambda: self.cp.version, timeout=timeout,
                                          on_serving=lambda new, i=i: replicas.__setitem__(i, new))
                    done.append({"node": name, "worker": i, **res})
            return {"restarted": done}

    def _add_waypoint(self, gw: PolicyObject) -> None:
        wdir = self.paths.waypoint_dir(gw.namespace, gw.name)
        ident = SpiffeId(trust_domain=self.settings.trust_domain, namespace=gw.namespace, service_account=gw.name)
        self._write_bootstrap(ident, os.path.join(wdir, "bootstrap"))
        self._start_system(self._waypoint_workload(gw))
        rt = self._pods[f"{gw.namespace}/{waypoints.pod_name(gw.name)}"]
        log.info("waypoint %s/%s up on %s at %s", gw.namespace, gw.name, rt.node, rt.ip)

    def _waypoint_workload(self, gw: PolicyObject) -> SystemWorkload:
        """A Gateway's waypoint (the Deployment istiod would make): one process in the synthesized
        pod's netns and cgroup -- a mesh component like ztunnel, not a contained user container."""
        target = f"{gw.namespace}/{gw.name}"
        wdir = self.paths.waypoint_dir(gw.namespace, gw.name)
        rt = self._pods[f"{gw.namespace}/{waypoints.pod_name(gw.name)}"]
        env = base_env() | _prefixed_env("WAYPOINT_") | {
            "POD_NAME": waypoints.pod_name(gw.name), "POD_NAMESPACE": gw.namespace, "POD_IP": str(rt.ip),
            "NODE_NAME": rt.node, "SERVICE_ACCOUNT": gw.name}
        spec = ProcSpec(
            argv=(sys.executable, "-m", "waypoint", "--gateway", target, "--run-dir", wdir,
                  "--control-plane", self.paths.control_plane_socket, "--trust-domain", self.settings.trust_domain,
                  "--metrics-address", "127.0.0.1:15020"),
            netns=rt.net.netns, cgroup=rt.net.cgroup, env=tuple(sorted(env.items())),
            log_path=self.paths.waypoint_log(gw.namespace, gw.name),
            admin_socket=os.path.join(wdir, "admin.sock"), label=f"waypoint {target}")
        return SystemWorkload(kind="waypoint", target=target, replicas=(spec,))

    def _remove_waypoint(self, target: str) -> None:
        self._stop_system("waypoint", target)
        ns, name = target.split("/", 1)
        shutil.rmtree(self.paths.waypoint_dir(ns, name), ignore_errors=True)
        log.info("waypoint %s removed", target)

    def _write_bootstrap(self, identity: NodeId | SpiffeId, directory: str) -> None:
        """Credentials a system workload starts with (then renews by CSR): key, chain, roots."""
        os.makedirs(directory, mode=0o700, exist_ok=True)
        issued = self.ca.issue(identity, _BOOTSTRAP_TTL)
        files = {"key.pem": issued.key_pem, "cert-chain.pem": b"".join(issued.chain_pem),
                 "root-cert.pem": self.ca.roots_pem}
        for fname, data in files.items():
            path = os.path.join(directory, fname)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)

    async def _remove_node(self, name: str) -> None:
        self._stop_system("ztunnel", name)
        await asyncio.to_thread(self.net.remove_node, name)
        remove_pins(os.path.join(self.paths.bpf_pin_dir, name))
        shutil.rmtree(self.paths.node_dir(name), ignore_errors=True)
        log.info("node %s removed", name)

    async def _add_pod(self, uid: str, pod: Pod) -> None:
        na = self.addr.node(pod.node_name)
        podnet = await asyncio.to_thread(self.net.add_pod, pod.node_name, uid, pod.pod_ip, na.pod_cidr)
        env = base_env() | {"POD_NAME": pod.name, "POD_NAMESPACE": pod.namespace,
                             "POD_IP": str(pod.pod_ip), "NODE_NAME": pod.node_name,
                             "SERVICE_ACCOUNT": pod.service_account}
        containers = {}
        for c in pod.containers:
            if not c.argv:
                continue  # no command: the image's entrypoint, which local mode has not got
            containers[c.name] = Proc(argv=list(c.argv), netns=podnet.netns, cgroup=podnet.cgroup,
                                      env=env | dict(c.env), cwd=c.working_dir or pod.source_dir or None,
                                      log_path=self.paths.container_log(pod.namespace, pod.name, c.name),
                                      contain=self._containment(pod, c))
        meshed = enrolled(pod, next((n for n in self.store.of(Namespace) if n.name == pod.namespace), None))
        rt = self._pods[uid] = _PodRt(uid=uid, node=pod.node_name, ip=pod.pod_ip, net=podnet,
                                      containers=containers)
        # The CNI's hand-over to the node proxy: where this pod's netns and cgroup are.
        self._sandboxes(pod.node_name).write(Sandbox(uid=uid, netns=podnet.netns_path, cgroup=podnet.cgroup))
        if meshed and containers:  # held until ztunnel has enrolled it (meshgate.py)
            rt.gate = GateDecision(start=False, reason=GateReason.WAITING_FOR_ENROLLMENT,
                                   message=f"waiting for ztunnel on node {pod.node_name} to enroll it")
        else:
            self._start_containers(rt)
        log.info("pod %s up on %s at %s%s", uid, pod.node_name, pod.pod_ip,
                 " (containers wait for enrollment)" if rt.gate else "")

    def _start_containers(self, rt: _PodRt) -> None:
        rt.gate = None
        for name, proc in rt.containers.items():
            try:
                proc.start()
            except OSError as e:
                log.warning("pod %s container %s failed to start: %s", rt.uid, name, e)
                proc.last_exit, proc.next_start = -1, time.monotonic() + 1

    async def _gate_loop(self) -> None:
        """Start held pods' containers once their node's ztunnel has enrolled them."""
        while True:
            held = [rt for rt in self._pods.values() if rt.gate is not None]
            await asyncio.sleep(0.05 if held else 0.2)
            if not held:
                continue
            try:
                await self._gate_pass(held)
            except Exception:  # never let a bad answer stop every held pod for good
                log.exception("pod start gate")

    async def _gate_pass(self, held: list[_PodRt]) -> None:
        nss = {n.name: n for n in self.store.of(Namespace)}
        dumps: dict[str, dict[str, Any] | None] = {}
        for rt in held:
            if rt.node not in dumps:
                replicas = self._system.get(("ztunnel", rt.node), [])
                dumps[rt.node] = await self._dump(replicas[0].admin_socket if replicas else None)
            pod = self.store.get(ResourceKey("Pod", *rt.uid.split("/", 1)))
            if self._pods.get(rt.uid) is not rt or not isinstance(pod, Pod):
                continue  # deleted meanwhile
            d = gate_decide(uid=rt.uid, node=rt.node, meshed=enrolled(pod, nss.get(pod.namespace)),
                            control_plane_running=self.cp.running, dump=dumps[rt.node])
            if d.start:
                log.info("pod %s: %s; starting its containers", rt.uid, d.message)
                self._start_containers(rt)
            else:
                if rt.gate is None or rt.gate.reason is not d.reason:
                    log.warning("pod %s held: %s: %s", rt.uid, d.reason.label, d.message)
                rt.gate = d

    def _containment(self, pod: Pod, c: Container | None) -> Containment:
        """A container's sandbox: its securityContext's user and group (root without
        capabilities by default), and the mesh's state hidden from it."""
        uid, gid = run_as(pod, c)
        hide = (self.paths.run_root, self.paths.state_root, NETNS_DIR, "/sys/fs/bpf",
                *((self.settings.ca_dir,) if self.settings.ca_dir else ()))
        return Containment(uid=uid, gid=gid, hide=hide)

    async def _remove_pod(self, uid: str) -> None:
        rt = self._pods.pop(uid)
        self._sandboxes(rt.node).remove(uid)
        for c in rt.containers.values():
            c.stop()
        await asyncio.to_thread(self.net.remove_pod, uid)
        log.info("pod %s removed", uid)

    def _sandboxes(self, node: str) -> SandboxDir:
        return SandboxDir(os.path.join(self.paths.node_dir(node), "pods"))

    async def _supervise(self) -> None:
        """Restart exited containers and system workloads (ztunnels, waypoints) with capped
        backoff; every 2 s, put back node routes a link down/up removed (about 15 ms per node)."""
        tick = 0
        while True:
            await asyncio.sleep(0.5)
            tick += 1
            if tick % 4 == 0 and not self._lock.locked():
                async with self._lock:  # not while apply/delete changes nodes
                    await self._repair_routes()
            now = time.monotonic()
            procs_ = [*(p for replicas in self._system.values() for p in replicas),
                      *(c for rt in self._pods.values() for c in rt.containers.values())]
            for p in procs_:
                if p.popen is not None and p.popen.poll() is not None and p.next_start == 0.0:
                    p.last_exit = p.popen.returncode
                    p.next_start = now + p.backoff(now)
                    log.warning("%s exited with %s; restarting in %.0fs", p.argv[:3], p.last_exit,
                                p.next_start - now)
                elif p.next_start and now >= p.next_start:
                    p.next_start = 0.0
                    p.restarts += 1
                    try:
                        p.start()
                    except OSError as e:
                        log.warning("restart of %s failed: %s", p.argv[:3], e)
                        p.next_start = now + RESTART_BACKOFF_MAX


def run_as(pod: Pod, c: Container | None) -> tuple[int, int]:
    """(uid, gid) of a container: its securityContext, else the pod's, else root (0, 0), as
    Kubernetes resolves runAsUser/runAsGroup (with runAsGroup unset the primary group is 0)."""
    def pick(attr: str) -> int:
        for v in (getattr(c, attr, None), getattr(pod, attr)):
            if v is not None:
                return v
        return 0
    return pick("run_as_user"), pick("run_as_group")


def remove_pins(pin_root: str) -> None:
    """Detach and unpin a cluster's (or one node's) eBPF capture: `<pin_root>/<node>/...`."""
    from ebpf.capture import teardown_pins
    if not os.path.isdir(pin_root):
        return
    nodes = [os.path.join(pin_root, d) for d in os.listdir(pin_root)]
    for d in nodes if not os.path.isdir(os.path.join(pin_root, "maps")) else [pin_root]:
        try:
            teardown_pins(d)
        except OSError as e:
            log.warning("pin cleanup of %s: %s", d, e)
    shutil.rmtree(pin_root, ignore_errors=True)


def _prefixed_env(prefix: str) -> dict[str, str]:
    """`prefix`* settings (e.g. ZTUNNEL_HANDSHAKE_TIMEOUT) from `ambient up`'s environment."""
    return {k: v for k, v in os.environ.items() if k.startswith(prefix)}


def base_env() -> dict[str, str]:
    # `python3` in a pod is the project's interpreter, so demo apps can use its packages.
    path = os.path.dirname(sys.executable) + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return {"PATH": path, "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1"}

