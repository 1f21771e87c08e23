"""ztunnel's settings: node, trust domain, control plane, files and ports."""
from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["ZtunnelConfig"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ZtunnelConfig:
    node: str
    """Name of the node this ztunnel serves."""
    trust_domain: str = "cluster.local"
    run_dir: str
    """Per-node directory: bootstrap credentials in `bootstrap/`, `admin.sock`, logs."""
    control_plane: str
    """Unix socket of the control plane."""
    admin_port: int = 15000
    """Admin (config dump) on 127.0.0.1 of the node's network namespace."""
    metrics_port: int = 15020
    """Prometheus `/metrics` (and `/stats/prometheus`) on 127.0.0.1 of the node's netns."""
    readiness_port: int = 15021
    """`GET /healthz/ready` on 127.0.0.1 of the node's network namespace."""
    listen_tcp: bool = True
    """Open the node-local TCP admin/readiness ports (off in tests run outside a node netns)."""
    cluster_prefix: str = ""
    """Prefix of the local cluster's namespaces and cgroups: how ztunnel finds a pod's netns
    and cgroup (Istio's CNI agent hands over the netns instead; local mode derives it)."""
    pin_dir: str = ""
    """bpffs directory for this node's pinned eBPF maps and links ("" = no eBPF capture)."""
    fail_open: bool = False
    """Let a captured pod's traffic through uncaptured while ztunnel is down (default: refuse)."""

    @property
    def admin_socket(self) -> str:
        return os.path.join(self.run_dir, "admin.sock")

    @property
    def bootstrap_dir(self) -> str:
        return os.path.join(self.run_dir, "bootstrap")
