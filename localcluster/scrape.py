"""Host-side scrape endpoint: every proxy's /metrics, with its target labels, on one 127.0.0.1 port.

The proxies serve Prometheus text where the host cannot route: ztunnel on 127.0.0.1:15020 of
its node's netns, a waypoint on 127.0.0.1:15020 of its pod's netns (Istio's port). Both serve
the same registry on their admin Unix socket, which the host reaches. This server, run by the
runner on 127.0.0.1 only, answers

    GET /metrics/ztunnel/<node>/<worker>       one ztunnel process's /metrics (over its admin
    GET /metrics/waypoint/<ns>/<gateway>/0     socket) plus process_* of that process (/proc)
    GET /metrics/mesh                          the mesh's own health (meshmetrics.py)
    GET /targets                               Prometheus HTTP service discovery: one group per
                                               path above, labelled as Kubernetes SD would label
                                               the pod (pod, namespace, app, node)

so a Prometheus on the host scrapes only 127.0.0.1 and sees every proxy, including ones added a
second ago (it refreshes /targets). A proxy that does not answer gets a 503: Prometheus records
`up == 0` for it.
"""
from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mesh.admin_http import AdminServer, Handler, Response, get_unix
from mesh.metrics import family

__all__ = ["ScrapeTarget", "ScrapeServer", "http_sd", "process_metrics", "MESH_PATH"]

MESH_PATH = "/metrics/mesh"
_TEXT = "text/plain; version=0.0.4"
_FETCH_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ScrapeTarget:
    """One proxy process to scrape, and the labels its samples get (Kubernetes SD's names)."""

    kind: str
    """`ztunnel` or `waypoint`."""
    target: str
    """The node (ztunnel) or the Gateway's `namespace/name` (waypoint)."""
    replica: int = 0
    admin_socket: str
    pid: int | None = None
    pod: str
    """The pod Kubernetes would run it in: `ztunnel-<node>`, `<gateway>-waypoint`."""
    namespace: str
    node: str

    @property
    def path(self) -> str:
        return f"/metrics/{self.kind}/{self.target}/{self.replica}"

    def labels(self) -> dict[str, str]:
        out = {"pod": self.pod, "namespace": self.namespace, "app": self.kind, "node": self.node}
        if self.kind == "ztunnel":
            out["worker"] = str(self.replica)
        else:
            out["gateway"] = self.target
        return out


MESH_LABELS = {"pod": "istiod-local", "namespace": "istio-system", "app": "istiod"}
"""Target labels of the mesh-health endpoint (the control plane runs in the runner)."""


def http_sd(targets: list[ScrapeTarget], address: str) -> list[dict[str, object]]:
    """The `/targets` document (Prometheus http_sd_config format): `address` is this server's
    `127.0.0.1:port`, each group's `__metrics_path__` picks the proxy."""
    groups: list[dict[str, object]] = [
        {"targets": [address], "labels": {"__metrics_path__": t.path, **t.labels()}} for t in targets]
    groups.append({"targets": [address], "labels": {"__metrics_path__": MESH_PATH, **MESH_LABELS}})
    return groups


def process_metrics(stat: str, open_fds: int, *, clk_tck: int, page_size: int, boot_time: float) -> bytes:
    """prometheus_client's process_* families for one process, from its /proc/<pid>/stat line."""
    # Fields after the parenthesised command name (which may contain spaces): state is field 3.
    rest = stat.rsplit(")", 1)[1].split()
    utime, stime, start = int(rest[11]), int(rest[12]), int(rest[19])
    vsize, rss = int(rest[20]), int(rest[21])
    fams = [
        ("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.",
         (utime + stime) / clk_tck),
        ("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", rss * page_size),
        ("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", vsize),
        ("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.",
         boot_time + start / clk_tck),
        ("process_open_fds", "gauge", "Number of open file descriptors.", open_fds),
    ]
    return "".join(family(n, k, d, [({}, v)]) for n, k, d, v in fams).encode()


def _boot_time() -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


def read_process(pid: int) -> bytes:
    """process_* of `pid`, or b"" if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return b""
    return process_metrics(stat, fds, clk_tck=os.sysconf("SC_CLK_TCK"), page_size=os.sysconf("SC_PAGE_SIZE"),
                           boot_time=_boot_time())


class ScrapeServer:
    """The endpoint above. `targets()` lists the proxies now; `mesh()` renders mesh health."""

    def __init__(self, targets: Callable[[], list[ScrapeTarget]], mesh: Callable[[], Awaitable[bytes]],
                 extra: dict[str, Handler] | None = None) -> None:
        self._targets = targets
        self._mesh = mesh
        self._admin = AdminServer({"/targets": self._sd, MESH_PATH: self._mesh_metrics,
                                   "/": self._index, **(extra or {})}, fallback=self._proxy)
        self.port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        """Listen on 127.0.0.1:`port` (0: any free port, see `self.port`)."""
        self.port = await self._admin.listen_tcp("127.0.0.1", port)

    async def close(self) -> None:
        await self._admin.close()

    def _index(self, _path: str) -> Response:
        return Response(200, "".join(f"{t.path}\n" for t in self._targets()) + f"{MESH_PATH}\n/targets\n/dashboard\n")

    def _sd(self, _path: str) -> Response:
        return Response(200, json.dumps(http_sd(self._targets(), self.address)).encode(), "application/json")

    async def _mesh_metrics(self, _path: str) -> Response:
        return Response(200, await self._mesh(), _TEXT)

    async def _proxy(self, path: str) -> Response:
        t = next((t for t in self._targets() if t.path == path), None)
        if t is None:
            return Response(404, f"no proxy at {path}; GET / lists them\n")
        try:
            status, body = await get_unix(t.admin_socket, "/metrics", timeout=_FETCH_TIMEOUT)
        except (OSError, asyncio.TimeoutError, ValueError, IndexError) as e:
            return Response(503, f"{t.kind} {t.target} did not answer on {t.admin_socket}: {e!r}\n")
        if status != 200:
            return Response(503, f"{t.kind} {t.target} answered {status}\n")
        return Response(200, body + (read_process(t.pid) if t.pid else b""), _TEXT)
