"""The waypoint's settings: which Gateway it is, trust domain, control plane, files and ports."""
from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["WaypointConfig", "HBONE_PORT"]

HBONE_PORT = 15008


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointConfig:
    namespace: str
    """Namespace of the istio-waypoint Gateway this process serves."""
    name: str
    """Name of that Gateway (and of its service account: the identity is
    `spiffe://<td>/ns/<namespace>/sa/<name>`)."""
    trust_domain: str = "cluster.local"
    run_dir: str
    """`<cluster run dir>/waypoints/<ns>/<name>`: `bootstrap/` credentials and `admin.sock`."""
    control_plane: str
    """Unix socket of the control plane, or HOST:PORT (Kubernetes: istiod.istio-system.svc:15012)."""
    ca_token: str = ""
    """Projected ServiceAccount token file (audience istio-ca): the credential towards the
    control plane in a cluster, instead of `bootstrap/` (its identity is the token's)."""
    ca_root: str = ""
    """With `ca_token`: the mesh root certificate file that verifies the control plane."""
    hbone_host: str = "0.0.0.0"
    """Where HBONE is served: all addresses of the waypoint pod's netns (tests: a loopback address)."""
    hbone_port: int = HBONE_PORT
    metrics_host: str = ""
    """Where Prometheus `/metrics` and `/stats/prometheus` are served on TCP, with `metrics_port`
    (Istio's 15020); "" = only on the admin socket. Local mode: 127.0.0.1 of the pod's netns."""
    metrics_port: int = 15020
    status_host: str = ""
    """Where `GET /healthz/ready` is served on TCP, with `status_port` (Istio's 15021: the
    kubelet's readiness probe); "" = only on the admin socket."""
    status_port: int = 15021
    handshake_timeout: float = 10.0
    """Seconds for an HBONE client's TLS handshake, then again for its HTTP/2 preface."""

    @property
    def control_plane_address(self) -> tuple[str, int] | None:
        """(host, port) when `control_plane` is HOST:PORT; None for a Unix socket path."""
        if self.control_plane.startswith(("/", ".")):
            return None
        host, sep, port = self.control_plane.rpartition(":")
        if not sep or not port.isdigit():
            return None
        return host.strip("[]"), int(port)

    @property
    def gateway(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def admin_socket(self) -> str:
        return os.path.join(self.run_dir, "admin.sock")

    @property
    def bootstrap_dir(self) -> str:
        return os.path.join(self.run_dir, "bootstrap")
