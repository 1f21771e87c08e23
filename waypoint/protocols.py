"""Istio's protocol selection for a Service port (appProtocol, else the port name's prefix), decided purely.

Istio reads `appProtocol` first, then the port name `<protocol>[-<suffix>]`, case-insensitively
(pkg/config/protocol; Kubernetes' `kubernetes.io/h2c` means HTTP/2 cleartext). What the
waypoint does with each:

* TCP (tcp, tls, https, mongo, mysql, redis; server-first or encrypted protocols) -> relayed
  at L4, no sniffing;
* HTTP2 (http2, grpc, kubernetes.io/h2c) -> HTTP/2 to the backend, whatever the client spoke;
* HTTP (http, http-*, grpc-web, kubernetes.io/ws) and anything unnamed -> HTTP/1.1 to the
  backend (an unnamed port is sniffed downstream: HTTP/1.1, HTTP/2 prior knowledge, or TCP).
"""
from __future__ import annotations

import enum

from mesh.model.resources import ServicePort

__all__ = ["PortProtocol", "port_protocol"]


class PortProtocol(enum.Enum):
    UNSPECIFIED = "unspecified"
    TCP = "tcp"
    HTTP = "http"
    HTTP2 = "http2"


_BY_NAME = {
    "tcp": PortProtocol.TCP, "tls": PortProtocol.TCP, "https": PortProtocol.TCP, "mongo": PortProtocol.TCP,
    "mysql": PortProtocol.TCP, "redis": PortProtocol.TCP,
    "http": PortProtocol.HTTP, "grpc-web": PortProtocol.HTTP, "kubernetes.io/ws": PortProtocol.HTTP,
    "http2": PortProtocol.HTTP2, "grpc": PortProtocol.HTTP2, "kubernetes.io/h2c": PortProtocol.HTTP2,
    "kubernetes.io/wss": PortProtocol.TCP,
}


def port_protocol(sp: ServicePort | None) -> PortProtocol:
    """The protocol the Service port declares (UNSPECIFIED: sniff, HTTP/1.1 upstream)."""
    if sp is None:
        return PortProtocol.UNSPECIFIED
    if sp.app_protocol:
        p = _BY_NAME.get(sp.app_protocol.lower())
        if p is not None:
            return p
    name = sp.name.lower()
    if name.startswith("grpc-web"):
        return PortProtocol.HTTP
    return _BY_NAME.get(name.partition("-")[0], PortProtocol.UNSPECIFIED)
