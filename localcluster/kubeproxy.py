"""A simulated node's kube-proxy and cluster-DNS stand-in: every Service ClusterIP answered
in the node's netns and relayed to a ready endpoint, and a hosts file of Service names.

Why a relay: the simulated network has no iptables/IPVS rules for ClusterIPs, so the node
agent puts each Service's ClusterIP as a /32 on the node netns' `lo` and listens on its TCP
ports; pods route everything off-link to their node (cni0), so a pod that is not in the mesh
(and the ztunnel pod, which reaches the control plane at istiod.istio-system.svc) lands on the
node's listener, which connects to one ready endpoint (Pods matching the selector, Ready, with
an IP; the target port by number or container port name) and pipes bytes, as kube-proxy's old
userspace mode did. The `kubernetes` Service (no selector: the API server) is relayed to the
API server on the host's loopback: the only path out of the simulated network, and only to it.
A pod in the mesh never reaches these listeners for a Service: its connect() to a ClusterIP is
captured and ztunnel resolves the VIP through the control plane's model, as in local mode.

DNS: `hosts_text` maps `<svc>.<ns>.svc[.cluster.local]` to the ClusterIP; the node agent
binds it over every pod's /etc/hosts (as a kubelet manages each pod's), rewritten in place on changes so the
bind keeps the inode. The decisions (`endpoints`, `hosts_text`) are pure.
"""
from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mesh.linux.netns import socket_in_netns
from mesh.model import ResourceKey

from controlplane.kube.reflector import Delete, Event, Relisted, Upsert

__all__ = ["ServiceProxy", "Backend", "endpoints", "hosts_text", "apply_event"]

log = logging.getLogger("ambient.kubeproxy")


@dataclass(frozen=True, slots=True)
class Backend:
    """Where a (ClusterIP, port) goes: endpoint addresses, or the API server (`api`)."""

    addrs: tuple[tuple[str, int], ...]
    api: bool = False


def apply_event(store: dict[ResourceKey, Mapping[str, Any]], ev: Event) -> None:
    """Keep `store` equal to the watched collection."""
    if isinstance(ev, Relisted):
        for d in ev.deletes:
            store.pop(d.key, None)
        for u in ev.upserts:
            store[u.key] = u.obj
    elif isinstance(ev, Upsert):
        store[ev.key] = ev.obj
    elif isinstance(ev, Delete):
        store.pop(ev.key, None)


def _ready(pod: Mapping[str, Any]) -> bool:
    st = pod.get("status") or {}
    conds = {c.get("type"): c.get("status") for c in st.get("conditions") or ()}
    return bool(st.get("podIP")) and conds.get("Ready") == "True" and not (pod.get("metadata") or {}).get(
        "deletionTimestamp")


def _target_port(pod: Mapping[str, Any], target: Any, port: int) -> int | None:
    if target is None:
        return port
    if isinstance(target, int):
        return target
    for c in (pod.get("spec") or {}).get("containers") or ():
        for p in c.get("ports") or ():
            if p.get("name") == target and isinstance(p.get("containerPort"), int):
                return int(p["containerPort"])
    return int(target) if str(target).isdigit() else None


def endpoints(services: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int], Backend]:
    """(ClusterIP, port) -> its backend, for every TCP port of every Service with a ClusterIP."""
    pods = list(pods)
    out: dict[tuple[str, int], Backend] = {}
    for svc in services:
        meta, spec = svc.get("metadata") or {}, svc.get("spec") or {}
        vip = spec.get("clusterIP")
        if not vip or vip == "None":
            continue
        api = meta.get("namespace") == "default" and meta.get("name") == "kubernetes"
        sel = spec.get("selector") or {}
        members = [] if api or not sel else [
            p for p in pods if (p.get("metadata") or {}).get("namespace") == meta.get("namespace")
            and all(((p.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in sel.items()) and _ready(p)]
        for sp in spec.get("ports") or ():
            if (sp.get("protocol") or "TCP") != "TCP" or not isinstance(sp.get("port"), int):
                continue
            addrs = []
            for p in members:
                tp = _target_port(p, sp.get("targetPort"), sp["port"])
                if tp is not None:
                    addrs.append((str(p["status"]["podIP"]), tp))
            out[(str(vip), int(sp["port"]))] = Backend(tuple(sorted(addrs)), api=api)
    return out


def hosts_text(services: Iterable[Mapping[str, Any]], domain: str = "cluster.local") -> str:
    lines = ["127.0.0.1\tlocalhost"]
    for svc in sorted(services, key=lambda s: ((s.get("metadata") or {}).get("namespace") or "",
                                               (s.get("metadata") or {}).get("name") or "")):
        meta, vip = svc.get("metadata") or {}, (svc.get("spec") or {}).get("clusterIP")
        if vip and vip != "None":
            n = f"{meta.get('name')}.{meta.get('namespace')}.svc"
            lines.append(f"{vip}\t{n} {n}.{domain}")
    return "\n".join(lines) + "\n"


@dataclass
class ServiceProxy:
    """The I/O side: listeners in `netns` for `endpoints`' keys, relays, the hosts file."""

    netns: str
    api_upstream: tuple[str, int]
    add_address: Callable[[str], Any]
    """Puts a ClusterIP on the node's lo (blocking; run in a thread)."""
    hosts_path: str
    rng: random.Random = field(default_factory=random.Random)
    backends: dict[tuple[str, int], Backend] = field(default_factory=dict)
    _servers: dict[tuple[str, int], asyncio.AbstractServer] = field(default_factory=dict)
    _pipes: set[asyncio.Task[None]] = field(default_factory=set)
    _hosts: str = ""

    async def update(self, backends: dict[tuple[str, int], Backend], hosts: str) -> None:
        self.backends = backends
        for key in [k for k in self._servers if k not in backends]:
            self._servers.pop(key).close()  # the /32 stays on lo: harmless, nothing answers it
        for key in backends:
            if key not in self._servers:
                try:
                    await asyncio.to_thread(self.add_address, key[0])
                    sock = await asyncio.to_thread(self._listener, key)
                    self._servers[key] = await asyncio.start_server(
                        lambda r, w, k=key: self._relay(k, r, w), sock=sock)
                except OSError as e:
                    log.warning("ClusterIP %s:%d not answered: %s", key[0], key[1], e)
        if hosts != self._hosts:
            with open(self.hosts_path, "a+") as f:  # in place: a bind mount of it keeps the inode
                f.seek(0)
                f.truncate()
                f.write(hosts)
            self._hosts = hosts

    def _listener(self, key: tuple[str, int]) -> socket.socket:
        sock = socket_in_netns(self.netns)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(key)
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    async def _relay(self, key: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        b = self.backends.get(key)
        target = self.api_upstream if b is not None and b.api else (
            self.rng.choice(b.addrs) if b is not None and b.addrs else None)
        if target is None:  # no ready endpoint: refuse, as kube-proxy's REJECT rule does
            writer.transport.abort()
            return
        try:
            if b is not None and b.api:
                up_r, up_w = await asyncio.wait_for(asyncio.open_connection(*target), 10)
            else:  # from the node's netns: the endpoint is on the simulated network
                s = await asyncio.to_thread(socket_in_netns, self.netns)
                s.setblocking(False)
                try:
                    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, target), 10)
                except BaseException:
                    s.close()
                    raise
                up_r, up_w = await asyncio.open_connection(sock=s)
        except (OSError, asyncio.TimeoutError):
            writer.transport.abort()
            return

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
                if w.can_write_eof():
                    w.write_eof()
            except (ConnectionError, asyncio.CancelledError):
                w.transport.abort()
        tasks = [asyncio.ensure_future(pipe(reader, up_w)), asyncio.ensure_future(pipe(up_r, writer))]
        self._pipes.update(tasks)
        try:
            await asyncio.gather(*tasks)
        finally:
            self._pipes.difference_update(tasks)
            for w in (writer, up_w):
                w.close()

    async def close(self) -> None:
        for s in self._servers.values():
            s.close()
        self._servers.clear()
        for t in list(self._pipes):
            t.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
