"""ztunnel wiring: control-plane subscription, certificates, enrollment of pods, admin, drain.

The decisions live elsewhere (outbound/plan.py, inbound/validate.py, eBPF capture rules);
this module connects the parts and keeps the set of enrolled pods equal to what the state says:
every workload on this node with tunnel protocol HBONE gets in-pod listeners (PodProxy) and
eBPF capture; a workload that leaves the mesh is released (its open connections carry on).

Graceful restart (`ambient restart ztunnel`): the new process starts next to this one, opens
the same in-pod listeners (SO_REUSEPORT), re-opens the pinned eBPF (enrolling again only
re-points the SOCKHASH entries at its listeners; links exist once) and says `serving` in
/config_dump once every local pod is enrolled. Then this one gets SIGTERM and drains: it stops
enrolling and accepting (closing a listener hands its not-yet-accepted connections to the
new one's, with the pod netns' tcp_migrate_req), sends GOAWAY on its HBONE connections, lets
open connections finish for up to `drain_timeout` (Istio's 5 s), cuts the rest and exits,
leaving the pins in place. A second SIGTERM, or SIGINT, exits at once.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import resource
import signal
import ssl
from typing import Any

from ebpf import capture as ebpf_capture  # without capture: its original_dst() needs no Capture
from mesh.linux import cgroup as cgroups
from mesh import tls
from mesh.admin_http import AdminServer, Response
from mesh.ca import SecretManager, WorkloadCert
from mesh.clock import Clock
from mesh.distribution.client import ControlPlaneClient
from mesh.distribution.protocol import ALPN
from mesh.hbone import HbonePool
from mesh.proxy.access_log import Recorder
from mesh.proxy.bootstrap import TlsContexts, load_bootstrap
from mesh.proxy.reason import Reason
from mesh.proxy.sockets import NetnsSockets, has_return_path
from mesh.sandbox import SandboxDir
from mesh.identity import SpiffeId
from mesh.model import TunnelProtocol, Workload
from mesh.model.wire import to_wire
from mesh.state import ProxyState

from .config import ZtunnelConfig
from .inpod import PodProxy
from .pod_context import PodContext, SocketOriginalDst
from .metrics import TcpMetrics

__all__ = ["Ztunnel"]

log = logging.getLogger("ambient.ztunnel")
_SYNC_INTERVAL = 0.5


class Ztunnel:
    """One node's ztunnel."""

    def __init__(self, cfg: ZtunnelConfig, *, clock: Clock, rng: random.Random, capture: Any = None) -> None:
        self.cfg = cfg
        self.clock = clock
        self.rng = rng
        self.state = ProxyState()
        self._bootstrap: WorkloadCert | None = None
        token = None
        if cfg.ca_token:  # in a cluster: the projected token is the credential
            with open(cfg.ca_root, "rb") as f:
                self._roots = f.read()
            token = self._read_token
        else:
            self._bootstrap, self._roots = load_bootstrap(cfg.bootstrap_dir)
        address = cfg.control_plane_address
        self.client = ControlPlaneClient(
            socket_path=None if address else cfg.control_plane, address=address, ssl_context=self._cp_context,
            trust_domain=cfg.trust_domain, state=self.state, clock=clock, rng=rng,
            on_update=self._on_update, token=token, on_connected=self._on_connected)
        self.secrets = SecretManager(self._fetch_cert, clock=clock, rng=rng)
        self.tls = TlsContexts(self.secrets, self._roots)
        self.pool = HbonePool(clock=clock, idle_timeout=cfg.pool_unused_release_timeout)
        self.metrics = TcpMetrics()
        self.conn_log = Recorder(self.metrics.record)
        self.capture = capture
        self.sandboxes = SandboxDir(cfg.sandbox_dir)
        self.pods: dict[str, PodProxy] = {}
        self.draining: list[PodProxy] = []
        """Released pods whose connections are still open (dropped once drained)."""
        self.enroll_errors: dict[str, str] = {}
        self._wanted: set[SpiffeId] = set()
        self._ips: dict[str, str] = {}  # workload IP -> uid, to notice pods that went away
        self._kick = asyncio.Event()
        self._drain = asyncio.Event()
        self.serving = False
        """Every local pod enrolled at least once (a restarted ztunnel may take over now)."""
        self.drain_started: float | None = None
        self.admin = AdminServer({
            "/healthz/ready": self._ready,
            "/config_dump": self._config_dump,
            "/connections": lambda _: Response(200, list(self.conn_log.recent)),
            "/debug/live": self._live,
            "/metrics": lambda _: Response(200, self.metrics.exposition(), "text/plain; version=0.0.4"),
            "/stats/prometheus": lambda _: Response(200, self.metrics.exposition(), "text/plain; version=0.0.4"),
            "/": lambda _: Response(200, "ztunnel admin: /config_dump /connections /healthz/ready\n"),
        })

    def _cp_context(self) -> ssl.SSLContext:
        if self._bootstrap is None:
            return tls.server_only_client_context(self._roots, alpn=(ALPN,))
        return tls.client_context(self._bootstrap, self._roots, alpn=(ALPN,))

    def _read_token(self) -> str:
        with open(self.cfg.ca_token) as f:
            return f.read().strip()

    async def _fetch_cert(self, identity, csr_pem):
        return await self.client.request_certificate(identity, csr_pem)

    def _on_connected(self) -> None:
        # Back from an outage: renew what failed now rather than after the backoff (<= 30 s).
        n = self.secrets.retry_now()
        if n:
            log.info("control plane reachable: retrying %d certificate fetch(es) now", n)

    def _on_update(self, state: ProxyState) -> None:
        # Hold a certificate for every enrolled service account on this node (Istio prefetches
        # them too), and let go of identities no longer scheduled here.
        wanted = {w.identity for w in self._local(state)}
        for ident in wanted - self._wanted:
            self.secrets.prefetch(ident)
        for ident in self._wanted - wanted:
            self.secrets.forget(ident)
            self.tls.forget(ident)
        self._wanted = wanted
        # Pooled HBONE connections from or to a pod that was deleted (its IP is gone or now
        # someone else's) can never carry a tunnel again: their sockets would keep the dead
        # netns alive and a new pod reusing the IP would meet them. Drop them now.
        ips = {str(w.ip): w.uid for w in state.workloads() if w.ip is not None}
        gone = {ip for ip, uid in self._ips.items() if ips.get(ip) != uid}
        self._ips = ips
        if gone:
            n = self.pool.evict(lambda k: k.src_ip in gone or k.dst_ip in gone, Reason.POD_DELETED.label)
            if n:
                log.info("dropped %d pooled HBONE connection(s) of deleted pods %s", n, sorted(gone))
        for pp in self.pods.values():  # policies may have changed: re-check open connections
            w = state.workload(pp.workload.uid)
            if w is not None:
                pp.workload = w
            pp.reauthorize()
        self._kick.set()

    def _local(self, state: ProxyState) -> list[Workload]:
        return [w for w in state.workloads_on_node(self.cfg.node) if w.protocol is TunnelProtocol.HBONE]

    # -- enrollment --

    async def _sync_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._kick.wait(), _SYNC_INTERVAL)
            except asyncio.TimeoutError:
                pass
            self._kick.clear()
            if self.state.synced:
                await self._sync_pods()

    async def _sync_pods(self) -> None:
        want = {w.uid: w for w in self._local(self.state)}
        for uid, pp in list(self.pods.items()):
            w = want.get(uid)
            if w is None or w.ip != pp.workload.ip or w.identity != pp.workload.identity:
                # Deleted (or replaced: pods are immutable) rather than only leaving the mesh.
                now = self.state.workload(uid)
                gone = now is None or now.ip != pp.workload.ip or now.identity != pp.workload.identity
                await self._release(uid, deleted=gone)
            else:
                pp.workload = w
        for uid, w in want.items():
            if uid not in self.pods:
                try:
                    await self._enroll(w)
                    self.enroll_errors.pop(uid, None)
                except Exception as e:  # retried on the next pass
                    if self.enroll_errors.get(uid) != str(e):
                        log.warning("enroll_failed: %s: %s", uid, e)
                    self.enroll_errors[uid] = str(e)
        if not self.serving and all(uid in self.pods for uid in want):
            self.serving = True
            log.info("serving: %d local pod(s) enrolled", len(self.pods))
        if self.capture is not None and self.capture.owner:  # captured by an earlier ztunnel, gone now
            for uid in set(self.capture.enrolled()) - set(want):
                self.capture.release(uid)
        for ident in {pp.workload.identity for pp in self.pods.values()}:
            if self.secrets.current(ident) is not None:  # expired in an outage: do not block the sync
                await self.tls.refresh(ident)
        self.draining = [pp for pp in self.draining if not pp.drained]

    async def _enroll(self, w: Workload) -> None:
        sb = self.sandboxes.get(w.uid)
        if sb is None:
            raise RuntimeError(f"no sandbox record for pod {w.uid} yet (the node agent writes it)")
        if not os.path.exists(sb.netns):
            raise RuntimeError(f"pod netns {sb.netns} not there yet")
        server_ctx = await asyncio.wait_for(self.tls.server(w.identity), 10)
        await self.tls.refresh(w.identity)
        ident = w.identity
        # The app sees the client's IP when the pod netns routes the replies back to us.
        preserve = await asyncio.to_thread(has_return_path, sb.netns)
        if not preserve:
            log.warning("pod %s: its netns has no return route for source-preserving dials; "
                        "its app sees connections from its own IP", w.uid)
        sockets = NetnsSockets(sb.netns, preserve_source=preserve, own_ip=str(w.ip))
        ctx = PodContext(workload=w, state=self.state, sockets=sockets,
                         original_dst=SocketOriginalDst((self.capture or ebpf_capture).original_dst),
                         clock=self.clock, rng=self.rng, sink=self.conn_log, trust_domain=self.cfg.trust_domain,
                         connect_traceparent=self.cfg.connect_traceparent)
        pp = PodProxy(ctx, pool=self.pool, client_tls=lambda: self.tls.client(ident), server_tls=server_ctx)
        await pp.start()
        try:
            if self.capture is not None:
                self.capture.enroll(w.uid, cgroup=sb.cgroup, netns_path=sb.netns, pod_ip=str(w.ip),
                                    outbound=pp.sockets["outbound"], inbound=pp.sockets["inbound"],
                                    hbone=pp.sockets["hbone"])
        except BaseException:
            await pp.close()
            raise
        self.pods[w.uid] = pp
        log.info("enrolled %s (%s, %s)", w.uid, w.ip, w.identity)

    async def _release(self, uid: str, *, deleted: bool = False) -> None:
        """Stop serving the pod. Leaving the mesh keeps its open connections (they end on
        their own); a deleted pod's are cut now, since its netns cannot carry them on."""
        pp = self.pods.pop(uid)
        if self.capture is not None:
            self.capture.release(uid)
        if deleted:
            await pp.abort(Reason.POD_DELETED)
        else:
            await pp.close()
        if not pp.drained:
            self.draining.append(pp)
        log.info("released %s", uid)

    # -- admin --

    def _ready(self, _path: str) -> Response:
        if self.state.synced:
            return Response(200, "ready\n")
        return Response(503, "not ready: no state from the control plane yet\n")

    def _config_dump(self, _path: str) -> Response:
        st = self.state
        return Response(200, {
            "node": self.cfg.node,
            "pid": os.getpid(),
            "serving": self.serving,
            "draining": self.drain_started is not None,
            "version": st.version,
            "synced": st.synced,
            "connected": self.client.connected.is_set(),
            "last_update_at": self.client.last_update_at,
            "client": self.client.stats,
            "enrolled": sorted(self.pods),
            "enroll_errors": self.enroll_errors,
            "capture": self._capture_dump(),
            "connections_total": self.conn_log.total,
            "workloads": [to_wire(w) for w in st.workloads()],
            "services": [to_wire(s) for s in st.services()],
            "namespaces": [to_wire(n) for n in st.namespaces()],
            "policies": [to_wire(p) for p in st.policies()],
            "certificates": self.secrets.snapshot(self.clock.now()),
        })

    def _capture_dump(self) -> dict[str, Any] | None:
        if self.capture is None:
            return None
        try:
            return {"worker": self.capture.worker, "owner": self.capture.owner,
                    "counters": self.capture.stats(), "listener_slots": self.capture.listener_slots()}
        except ebpf_capture.CaptureError as e:  # a worker > 0 before worker 0 pinned the maps
            return {"worker": self.capture.worker, "owner": self.capture.owner, "error": str(e)}

    def _live(self, _path: str) -> Response:
        """What this process holds open now: leak checks (tests) and diagnostics."""
        try:
            fds = len(os.listdir("/proc/self/fd"))
        except OSError:
            fds = -1
        return Response(200, {
            "tasks": len(asyncio.all_tasks()),
            "fds": fds,
            "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "pool_connections": self.pool.open_connections,
            "capture_links": self.capture.link_count if self.capture is not None else 0,
            "pods": {uid: pp.live() for uid, pp in self.pods.items()},
            "draining": [dict(pp.live(), uid=pp.workload.uid) for pp in self.draining if not pp.drained],
        })

    # -- lifecycle --

    def _recapture(self) -> None:
        """SIGHUP: point capture at this process's listeners again. A restart whose new
        process enrolled pods and then failed left sk_lookup's socket map without them (a
        closed socket leaves the map); the runner sends this to the old one it keeps."""
        if self.capture is None or self.drain_started is not None:
            return
        n = 0
        for uid, pp in self.pods.items():
            sb = self.sandboxes.get(uid)
            if sb is None:
                continue
            try:
                self.capture.enroll(uid, cgroup=sb.cgroup, netns_path=sb.netns, pod_ip=str(pp.workload.ip),
                                    outbound=pp.sockets["outbound"], inbound=pp.sockets["inbound"],
                                    hbone=pp.sockets["hbone"])
                n += 1
            except Exception as e:  # noqa: BLE001 - the next pod may still work
                log.warning("recapture of %s failed: %s", uid, e)
        log.info("capture re-pointed at this process's listeners for %d pod(s)", n)

    async def _drain_out(self) -> None:
        """Stop accepting and enrolling; let open connections end until the deadline."""
        self.drain_started = self.clock.now()
        deadline = self.drain_started + self.cfg.drain_timeout
        log.info("draining: %d pod(s), up to %.1fs", len(self.pods), self.cfg.drain_timeout)
        await self.admin.close_tcp()  # the node-local ports are the new process's now
        for uid in list(self.pods):
            pp = self.pods.pop(uid)
            await pp.close()  # listeners closed; HBONE connections get GOAWAY
            self.draining.append(pp)
        self.pool.drain()
        while self.clock.now() < deadline:
            left = [pp for pp in self.draining if not pp.drained]
            if not left and self.pool.open_connections == 0:
                break
            await self.clock.sleep(0.05)
        left = sum(1 for pp in self.draining if not pp.drained)
        log.info("drained in %.2fs%s", self.clock.now() - self.drain_started,
                 f"; cutting {left} pod(s)' remaining connections" if left else "")
        for pp in self.draining:
            if not pp.drained:
                await pp.abort(Reason.DRAIN_TIMEOUT)


    async def run(self) -> None:
        await self.admin.listen_unix(self.cfg.admin_socket)
        if self.cfg.listen_tcp and self.cfg.worker == 0:
            await self.admin.listen_tcp("127.0.0.1", self.cfg.admin_port, reuse_port=True)
            await self.admin.listen_tcp(self.cfg.status_address, self.cfg.readiness_port, reuse_port=True)
            await self.admin.listen_tcp(self.cfg.status_address, self.cfg.metrics_port, reuse_port=True)
        log.info("ztunnel for node %s started (cgroup %s); control plane %s", self.cfg.node,
                 cgroups.cgroup_of(os.getpid()), self.cfg.control_plane)
        sync = asyncio.ensure_future(self._sync_loop())
        client = asyncio.ensure_future(self.client.run())
        main = asyncio.current_task()
        loop = asyncio.get_running_loop()
        # SIGTERM drains (first) or exits now (second); replaces the plain cancel handler.
        loop.add_signal_handler(signal.SIGTERM, lambda: main.cancel() if self._drain.is_set() else self._drain.set())
        loop.add_signal_handler(signal.SIGHUP, self._recapture)
        drain = asyncio.ensure_future(self._drain.wait())
        try:
            await asyncio.wait([client, drain], return_when=asyncio.FIRST_COMPLETED)
            if client.done():
                client.result()
            sync.cancel()
            await self._drain_out()
        finally:
            sync.cancel()
            client.cancel()
            drain.cancel()
            for uid in list(self.pods):
                await self.pods.pop(uid).close()
            for pp in self.draining:
                await pp.close()
            if self.capture is not None:
                self.capture.close()  # pins stay: fail-closed while down, re-opened on restart
            await self.pool.close()
            await self.secrets.close()
            await self.admin.close()
