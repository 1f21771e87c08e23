"""Istio's protocol selection for Service ports (appProtocol first, then the name's prefix)."""
from __future__ import annotations

import pytest

from mesh.model.resources import ServicePort
from waypoint.plan import _is_tcp
from waypoint.protocols import PortProtocol, port_protocol


@pytest.mark.parametrize("name,app,want", [
    ("", "", PortProtocol.UNSPECIFIED), ("web", "", PortProtocol.UNSPECIFIED),
    ("http", "", PortProtocol.HTTP), ("http-api", "", PortProtocol.HTTP), ("HTTP2", "", PortProtocol.HTTP2),
    ("grpc", "", PortProtocol.HTTP2), ("grpc-greeter", "", PortProtocol.HTTP2), ("grpc-web", "", PortProtocol.HTTP),
    ("http2-x", "", PortProtocol.HTTP2), ("tcp", "", PortProtocol.TCP), ("tcp-db", "", PortProtocol.TCP),
    ("mysql", "", PortProtocol.TCP), ("tls-x", "", PortProtocol.TCP),
    ("http", "tcp", PortProtocol.TCP),                    # appProtocol wins over the name
    ("tcp", "grpc", PortProtocol.HTTP2), ("web", "kubernetes.io/h2c", PortProtocol.HTTP2),
    ("web", "HTTP2", PortProtocol.HTTP2), ("grpc", "weird", PortProtocol.HTTP2),   # unknown appProtocol: the name
])
def test_port_protocol(name, app, want):
    sp = ServicePort(port=80, target_port=80, name=name, app_protocol=app)
    assert port_protocol(sp) is want
    assert _is_tcp(sp) is (want is PortProtocol.TCP)
