"""Inbound checks on an HBONE CONNECT (pure): the authority must be this pod's IP and a port."""
from __future__ import annotations

import ipaddress

__all__ = ["BadAuthority", "target_of"]


class BadAuthority(Exception):
    """A CONNECT this pod must not serve: answered 400, `reason` is the metric label."""

    status = 400

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def target_of(authority: str, pod_ip: str) -> tuple[str, int]:
    """(ip, port) the tunnel is for, when `authority` is `<pod_ip>:<port>`; else BadAuthority.

    Only the pod's own IP is accepted (ztunnel's rule): a tunnel must not reach another
    address through this pod, and a hostname would need DNS ztunnel does not do inbound.
    """
    host, sep, port_s = authority.rpartition(":")
    if not sep or not host:
        raise BadAuthority("authority_without_port", f"authority {authority!r} is not ip:port")
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        raise BadAuthority("authority_not_ip", f"authority {authority!r} is not an IPv4 address") from None
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise BadAuthority("authority_bad_port", f"authority {authority!r} has no valid port")
    if str(ip) != pod_ip:
        raise BadAuthority("authority_not_local", f"authority {authority!r} is not this pod ({pod_ip})")
    return str(ip), int(port_s)
