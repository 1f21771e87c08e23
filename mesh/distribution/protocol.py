"""Control-plane wire protocol: length-prefixed JSON frames and typed messages (sans-IO).

One mutually authenticated TLS connection per proxy carries everything:

    proxy -> CP   Subscribe(last_version[, token])  once, after the handshake
    CP -> proxy   Snapshot(version, resources)      the full state
    CP -> proxy   Delta(version, upserts, removals) every later change, versions increasing
    proxy -> CP   CertificateRequest(id, identity, csr[, token])
    CP -> proxy   CertificateResponse(id, chain | error)

A proxy authenticates with its client certificate (local mode: a node's bootstrap cert) or,
in a cluster, with a projected ServiceAccount token carried in Subscribe and each
CertificateRequest (a server that checks tokens accepts connections without a certificate).

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON, an object
with a "type" member. Resources travel as {"type": <kind>, "uid": <ns/name>, "data": <wire>}
where <wire> is `mesh.model.wire.to_wire` of the model object.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

from mesh.identity import SpiffeId
from mesh.model import Namespace, PolicyObject, ServiceInfo, Workload
from mesh.model.policy import AuthorizationPolicy, PeerAuthentication
from mesh.model.route import DestinationRule, HTTPRoute, VirtualService
from mesh.model.telemetry import MeshConfig, Telemetry
from mesh.model.workload import Waypoint
from mesh.model.wire import WireError, from_wire, to_wire

__all__ = [
    "ALPN", "ProtocolError", "FrameDecoder", "encode_frame", "MAX_FRAME", "RESOURCE_TYPES", "resource_ref",
    "Subscribe", "Snapshot", "Delta", "CertificateRequest", "CertificateResponse", "Message",
    "encode", "decode",
]

ALPN = "ambient-cp/1"
"""TLS ALPN of the control-plane connection (both ends)."""
MAX_FRAME = 16 * 1024 * 1024
"""Largest frame accepted; a snapshot of a few thousand workloads is well below it."""
_LEN = struct.Struct("!I")

# The kinds a proxy receives, by wire name.
RESOURCE_TYPES: dict[str, type] = {
    "Workload": Workload,
    "Service": ServiceInfo,
    "Namespace": Namespace,
    "Policy": PolicyObject,
    "AuthorizationPolicy": AuthorizationPolicy,
    "PeerAuthentication": PeerAuthentication,
    "HTTPRoute": HTTPRoute,
    "VirtualService": VirtualService,
    "DestinationRule": DestinationRule,
    "Waypoint": Waypoint,
    "Telemetry": Telemetry,
    "MeshConfig": MeshConfig,
}


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow."""

    reason = "control_protocol_error"


def encode_frame(payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    """Accumulates bytes and yields complete JSON objects."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf)
            if n > MAX_FRAME:
                raise ProtocolError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
            if len(self._buf) < 4 + n:
                break
            body = bytes(self._buf[4:4 + n])
            del self._buf[:4 + n]
            try:
                obj = json.loads(body)
            except ValueError as e:
                raise ProtocolError(f"frame is not JSON: {e}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
                raise ProtocolError("frame is not an object with a 'type'")
            out.append(obj)
        return out


def resource_ref(obj: Any) -> tuple[str, str]:
    """(wire type, uid) of a distributed object: its key in every store."""
    if isinstance(obj, Workload):
        return ("Workload", obj.uid)
    if isinstance(obj, ServiceInfo):
        return ("Service", obj.uid)
    if isinstance(obj, Namespace):
        return ("Namespace", obj.name)
    if isinstance(obj, Waypoint):
        return ("Waypoint", obj.uid)
    if isinstance(obj, (AuthorizationPolicy, PeerAuthentication, HTTPRoute, VirtualService,
                        DestinationRule, Telemetry, MeshConfig)):
        return (type(obj).kind, f"{obj.namespace}/{obj.name}")
    if isinstance(obj, PolicyObject):
        return ("Policy", f"{obj.key.kind}/{obj.namespace}/{obj.name}")
    raise TypeError(f"{type(obj).__name__} is not distributed")


def _encode_resource(obj: Any) -> dict[str, Any]:
    kind, uid = resource_ref(obj)
    return {"type": kind, "uid": uid, "data": to_wire(obj)}


def _decode_resource(d: Any) -> Any:
    if not isinstance(d, dict) or d.get("type") not in RESOURCE_TYPES:
        raise ProtocolError(f"unknown resource {str(d)[:80]!r}")
    try:
        return from_wire(RESOURCE_TYPES[d["type"]], d.get("data"))
    except WireError as e:
        raise ProtocolError(f"bad {d['type']} {d.get('uid')!r}: {e}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribe:
    type: ClassVar[str] = "subscribe"
    last_version: int = 0
    token: str | None = None
    """A projected ServiceAccount token, from a proxy without a client certificate."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    type: ClassVar[str] = "snapshot"
    version: int
    resources: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Delta:
    type: ClassVar[str] = "delta"
    version: int
    upserts: tuple[Any, ...] = ()
    removals: tuple[tuple[str, str], ...] = ()
    """(wire type, uid) pairs."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CertificateRequest:
    type: ClassVar[str] = "csr"
    id: int
    identity: SpiffeId
    csr_pem: str
    ttl_seconds: float | None = None
    token: str | None = None
    """As Subscribe's: checked per request, since the kubelet rotates the token."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CertificateResponse:
    type: ClassVar[str] = "csr_response"
    id: int
    chain_pem: tuple[str, ...] = ()
    error: str | None = None
    reason: str | None = None


Message = Subscribe | Snapshot | Delta | CertificateRequest | CertificateResponse
_BY_TYPE = {m.type: m for m in (Subscribe, Snapshot, Delta, CertificateRequest, CertificateResponse)}


def encode(msg: Message) -> bytes:
    """A message as one frame."""
    if isinstance(msg, Snapshot):
        body = {"version": msg.version, "resources": [_encode_resource(r) for r in msg.resources]}
    elif isinstance(msg, Delta):
        body = {"version": msg.version, "upserts": [_encode_resource(r) for r in msg.upserts],
                "removals": [list(r) for r in msg.removals]}
    else:
        body = to_wire(msg)
    return encode_frame({"type": msg.type, **body})


def decode(obj: dict[str, Any]) -> Message:
    """A decoded frame as a typed message; ProtocolError when it does not fit."""
    cls = _BY_TYPE.get(obj.get("type", ""))
    if cls is None:
        raise ProtocolError(f"unknown message type {obj.get('type')!r}")
    body = {k: v for k, v in obj.items() if k != "type"}
    try:
        if cls is Snapshot:
            return Snapshot(version=_int(body, "version"),
                            resources=tuple(_decode_resource(r) for r in _list(body, "resources")))
        if cls is Delta:
            removals = []
            for r in _list(body, "removals"):
                if not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, str) for x in r)):
                    raise ProtocolError(f"bad removal {r!r}")
                removals.append((r[0], r[1]))
            return Delta(version=_int(body, "version"),
                         upserts=tuple(_decode_resource(r) for r in _list(body, "upserts")),
                         removals=tuple(removals))
        return from_wire(cls, body)
    except WireError as e:
        raise ProtocolError(f"bad {cls.type} message: {e}") from None


def _int(body: dict[str, Any], name: str) -> int:
    v = body.get(name)
    if type(v) is not int:
        raise ProtocolError(f"{name} must be an integer")
    return v


def _list(body: dict[str, Any], name: str) -> list[Any]:
    v = body.get(name, [])
    if not isinstance(v, list):
        raise ProtocolError(f"{name} must be a list")
    return v
