"""ztunnel's settings: node, trust domain, control plane, files and ports."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from mesh.hbone.abuse import AbuseLimits

__all__ = ["ZtunnelConfig", "InboundLimits"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ZtunnelConfig:
    node: str
    """Name of the node this ztunnel serves."""
    trust_domain: str = "cluster.local"
    run_dir: str
    """Per-node directory: bootstrap credentials in `bootstrap/`, `admin.sock`, logs."""
    control_plane: str
    """Unix socket of the control plane (local mode), or HOST:PORT (a cluster's istiod Service)."""
    ca_token: str = ""
    """File of this pod's projected ServiceAccount token (audience istio-ca): the credential
    towards the control plane instead of a bootstrap certificate; re-read for each request,
    since the kubelet rotates it. "" = bootstrap certificate in `bootstrap/`."""
    ca_root: str = ""
    """With `ca_token`: the mesh's root certificate (ConfigMap istio-ca-root-cert, mounted)."""
    admin_port: int = 15000
    """Admin (config dump) on 127.0.0.1 of the node's network namespace."""
    metrics_port: int = 15020
    """Prometheus `/metrics` (and `/stats/prometheus`) on 127.0.0.1 of the node's netns."""
    readiness_port: int = 15021
    """`GET /healthz/ready` on 127.0.0.1 of the node's network namespace."""
    status_address: str = "127.0.0.1"
    """Where the readiness and metrics ports listen (admin stays on 127.0.0.1): 0.0.0.0 when
    ztunnel has a pod netns of its own (Kubernetes), so the kubelet's probe and Prometheus reach them."""
    listen_tcp: bool = True
    """Open the node-local TCP admin/readiness ports (off in tests run outside a node netns)."""
    sandbox_dir: str = ""
    """Where the node agent writes each pod's netns and cgroup (mesh/sandbox.py); default
    `<run_dir>/pods` (Istio's CNI agent hands the netns over a socket instead)."""
    pin_dir: str = ""
    """bpffs directory for this node's pinned eBPF maps and links ("" = no eBPF capture)."""
    fail_open: bool = False
    """Let a captured pod's traffic through uncaptured while ztunnel is down (default: refuse)."""
    drain_timeout: float = 5.0
    """On SIGTERM (a restart), how long open connections may still finish before they are cut
    (Istio's default termination drain is 5 s); `--drain-timeout`, `ZTUNNEL_DRAIN_TIMEOUT`."""
    pool_unused_release_timeout: float = 300.0
    """Seconds a pooled outbound HBONE connection with no stream stays open (Istio's
    `POOL_UNUSED_RELEASE_TIMEOUT`, default 5 min); `ZTUNNEL_POOL_UNUSED_RELEASE_TIMEOUT`."""
    connect_traceparent: bool = False
    """Send a new `traceparent` on each outbound HBONE CONNECT (Istio's ztunnel always does;
    here `ZTUNNEL_CONNECT_TRACEPARENT=true`). ztunnel never reads HTTP, so it cannot continue
    an app's trace: the context names the connection."""
    worker: int = 0
    """This process's index among the node's ztunnel workers. Every worker opens the in-pod
    listeners with SO_REUSEPORT, so the kernel spreads connections over them, and puts them in
    its own slot of the capture maps, so any live worker serves every pod; worker 0 alone
    builds, attaches and releases the eBPF capture and has the node-local TCP admin ports."""

    @property
    def admin_socket(self) -> str:
        name = "admin.sock" if self.worker == 0 else f"admin-{self.worker}.sock"
        return os.path.join(self.run_dir, name)

    def __post_init__(self) -> None:
        if bool(self.ca_token) != bool(self.ca_root):
            raise ValueError("--ca-token and --ca-root go together (the token, and the root to verify the control plane)")
        if not self.sandbox_dir:
            object.__setattr__(self, "sandbox_dir", os.path.join(self.run_dir, "pods"))

    @property
    def bootstrap_dir(self) -> str:
        return os.path.join(self.run_dir, "bootstrap")

    @property
    def control_plane_address(self) -> tuple[str, int] | None:
        """(host, port) when `control_plane` is HOST:PORT; None for a Unix socket path."""
        if self.control_plane.startswith(("/", ".")):
            return None
        host, sep, port = self.control_plane.rpartition(":")
        if not sep or not port.isdigit():
            return None
        return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True, kw_only=True)
class InboundLimits:
    """Bounds on what a peer may cost an in-pod HBONE listener, before and after it is authenticated.

    Istio's ztunnel is configured by environment variables; so are these (the local runner
    passes `ZTUNNEL_*` variables from `ambient up`'s environment to every ztunnel):
    `ZTUNNEL_HANDSHAKE_TIMEOUT` (seconds), `ZTUNNEL_MAX_PENDING_HANDSHAKES`, and one variable
    per HTTP/2 abuse bound (`h2`, mesh/hbone/abuse.py), named after its field:
    `ZTUNNEL_MAX_PREMATURE_RESETS`, `ZTUNNEL_PREMATURE_RESET_RATE`, `ZTUNNEL_NEW_STREAM_RATE`,
    `ZTUNNEL_NEW_STREAM_BURST`, `ZTUNNEL_PING_RATE`, `ZTUNNEL_PING_BURST`,
    `ZTUNNEL_SETTINGS_RATE`, `ZTUNNEL_SETTINGS_BURST`, `ZTUNNEL_MAX_PENDING_CONTROL_FRAMES`,
    `ZTUNNEL_MAX_CONSECUTIVE_EMPTY_FRAMES`, `ZTUNNEL_MAX_WINDOW_UPDATES_PER_DATA_FRAME`.
    """

    handshake_timeout: float = 10.0
    """Seconds for the TLS handshake, then again for the HTTP/2 preface + SETTINGS, and the
    longest a header block (HEADERS + CONTINUATION) may stay unfinished."""
    max_pending_handshakes: int = 256
    """Connections per listener between accept and a complete handshake; beyond this the
    oldest pending one is closed (reason too_many_pending_handshakes)."""
    h2: AbuseLimits = AbuseLimits()
    """Per-connection HTTP/2 abuse bounds against a peer with a valid certificate: rapid reset,
    stream rate, PING/SETTINGS/control-frame/empty-frame/WINDOW_UPDATE floods."""

    @classmethod
    def from_env(cls, env: "os._Environ[str] | dict[str, str] | None" = None) -> "InboundLimits":
        env = os.environ if env is None else env
        d = cls()
        timeout = float(env.get("ZTUNNEL_HANDSHAKE_TIMEOUT", d.handshake_timeout))
        pending = int(env.get("ZTUNNEL_MAX_PENDING_HANDSHAKES", d.max_pending_handshakes))
        if not 0 < timeout <= 3600 or pending < 1:
            raise ValueError(f"bad ztunnel limits: handshake timeout {timeout}s, max pending {pending}")
        h2 = {}
        for f in dataclasses.fields(AbuseLimits):
            name = "ZTUNNEL_" + f.name.upper()
            if name in env:
                default = getattr(d.h2, f.name)
                try:
                    h2[f.name] = type(default)(env[name])
                except ValueError:
                    raise ValueError(f"bad ztunnel limit {name}={env[name]!r}: not a number") from None
        try:
            limits = AbuseLimits(**h2)
        except ValueError as e:
            raise ValueError(f"bad ztunnel limits: {e}") from None
        return cls(handshake_timeout=timeout, max_pending_handshakes=pending, h2=limits)
