"""Typed façades over the capture maps, through raw bpf(2) (no bcc in this process).

Key and value types are ctypes mirrors of ``bpf/include/types.h``: a hand-written copy, which
design rule 14 allows only with a check against the compiled object.  That check is
tests/ebpf/test_layout.py (bcc's own decoding of the compiled maps, reported by the build
child, must match these field by field, and the C compiler asserts every size and offset);
at run time :class:`CaptureMaps` also refuses pinned maps whose key/value sizes differ.
Enum values and ``POD_UID_MAX`` are read from types.h itself.
"""
from __future__ import annotations

import ctypes
import functools
import ipaddress
import re
import socket
from dataclasses import dataclass

from .loader import (BPF_DIR, CaptureError, Programs, map_delete, map_info, map_keys, map_lookup,
                     map_update)

__all__ = ["header_enum", "header_define", "counter_names", "listener_kinds", "ip_to_be32",
           "be32_to_ip", "PodRecord", "CaptureMaps", "OrigDst", "ConnKey", "ListenerKey",
           "OutboundKey", "PodInfo", "DialKey", "MAP_TYPES", "max_workers"]

TYPES_H = BPF_DIR / "include" / "types.h"
_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)


@functools.lru_cache(maxsize=None)
def header_enum(enum_name: str) -> dict[str, int]:
    """The members of `enum <enum_name>` in types.h with their values (C rules: explicit
    ``= N`` or previous + 1).  types.h stays the single source of truth for the numbers."""
    text = _COMMENT.sub("", TYPES_H.read_text())
    m = re.search(r"\benum\s+" + re.escape(enum_name) + r"\s*\{(.*?)\}", text, re.S)
    if m is None:
        raise CaptureError("bad_layout", f"enum {enum_name} not found in {TYPES_H}")
    out: dict[str, int] = {}
    value = -1
    for item in (x.strip() for x in m.group(1).split(",")):
        if not item:
            continue
        name, _, expr = (p.strip() for p in item.partition("="))
        value = int(expr, 0) if expr else value + 1
        out[name] = value
    return out


@functools.lru_cache(maxsize=None)
def header_define(name: str) -> int:
    """The integer value of ``#define <name> N`` in types.h."""
    text = _COMMENT.sub("", TYPES_H.read_text())
    m = re.search(r"^\s*#\s*define\s+" + re.escape(name) + r"\s+(\w+)\s*$", text, re.M)
    if m is None:
        raise CaptureError("bad_layout", f"#define {name} not found in {TYPES_H}")
    return int(m.group(1), 0)


# ---- ctypes mirrors of types.h (checked against the compiled object: see module doc) ----------

class OrigDst(ctypes.Structure):        # struct orig_dst
    _fields_ = [("ip", ctypes.c_uint32), ("port", ctypes.c_uint16), ("_pad", ctypes.c_uint16)]


class ConnKey(ctypes.Structure):        # struct conn_key
    _fields_ = [("netns_cookie", ctypes.c_uint64), ("ip", ctypes.c_uint32),
                ("port", ctypes.c_uint32)]


class DialKey(ctypes.Structure):        # struct dial_key
    _fields_ = [("app_ip", ctypes.c_uint32), ("client_ip", ctypes.c_uint32),
                ("app_port", ctypes.c_uint16), ("client_port", ctypes.c_uint16)]


class ListenerKey(ctypes.Structure):    # struct listener_key
    _fields_ = [("pod_ip", ctypes.c_uint32), ("kind", ctypes.c_uint32),
                ("worker", ctypes.c_uint32)]


class OutboundKey(ctypes.Structure):    # struct outbound_key
    _fields_ = [("netns_cookie", ctypes.c_uint64), ("worker", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32)]


class PodInfo(ctypes.Structure):        # struct pod_info
    _fields_ = [("netns_cookie", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
                ("cgroup_id", ctypes.c_uint64),
                ("uid", ctypes.c_char * header_define("POD_UID_MAX"))]


# map -> (key type, value type), as declared in maps.h.  SOCKHASH values are socket fds on
# update (the kernel stores a socket; a lookup from user space is refused for 4-byte values).
MAP_TYPES: dict[str, tuple[type, type]] = {
    "pending": (ctypes.c_uint64, OrigDst),
    "orig_dst": (ConnKey, OrigDst),
    "inbound_listeners": (ListenerKey, ctypes.c_int),
    "outbound_listeners": (OutboundKey, ctypes.c_int),
    "pods": (ctypes.c_uint32, PodInfo),
    "ztunnel_dials": (DialKey, ctypes.c_uint32),
    "counters": (ctypes.c_uint32, ctypes.c_uint64),
}


def counter_names() -> list[str]:
    """Counter names by index: ``CNT_CONNECT_REDIRECTED`` -> ``connect_redirected``."""
    enum = header_enum("capture_counter")
    names = [""] * enum["CNT__MAX"]
    for name, idx in enum.items():
        if name != "CNT__MAX":
            names[idx] = name.removeprefix("CNT_").lower()
    return names


def max_workers() -> int:
    """Listener slots per pod (``MAX_WORKERS`` in types.h): the most ztunnel workers a node
    may run with capture."""
    return header_define("MAX_WORKERS")


def listener_kinds() -> dict[str, int]:
    """``{"inbound": 0, "hbone": 1}`` from ``enum listener_kind``."""
    return {k.removeprefix("LISTENER_").lower(): v
            for k, v in header_enum("listener_kind").items()}


def ip_to_be32(ip: str) -> int:
    """An IPv4 address as the u32 the kernel stores (network order), read natively."""
    return int.from_bytes(ipaddress.IPv4Address(ip).packed, "little")


def be32_to_ip(value: int) -> str:
    return str(ipaddress.IPv4Address(int(value).to_bytes(4, "little")))


@dataclass(frozen=True, slots=True)
class PodRecord:
    """An entry of the ``pods`` map (struct pod_info) plus its key."""

    uid: str
    pod_ip: str
    netns_cookie: int
    netns_ino: int
    cgroup_id: int


class CaptureMaps:
    """The maps Python writes or reads, opened from their pins (``<pin_dir>/maps/<name>``).

    Key and value types are the ctypes mirrors above; every map opened here is checked to
    have the key and value sizes they say (a stale pin from another layout is refused).
    """

    ListenerKey = ListenerKey
    OutboundKey = OutboundKey
    PodKey = ctypes.c_uint32
    PodInfo = PodInfo

    def __init__(self, progs: Programs, *, max_pods: int = 1024):
        self._max_pods = max_pods
        self._kinds = listener_kinds()
        self._inbound_fd = self._open(progs, "inbound_listeners")
        self._outbound_fd = self._open(progs, "outbound_listeners")
        self._pods_fd = self._open(progs, "pods")
        self._counters_fd = self._open(progs, "counters")
        self._uid_field = PodInfo.uid           # ctypes field descriptor of char uid[]
        self.uid_max = self._uid_field.size

    @staticmethod
    def _open(progs: Programs, name: str) -> int:
        fd = progs.map_fd(name)
        key, value = MAP_TYPES[name]
        info = map_info(fd)
        if (info.key_size, info.value_size) != (ctypes.sizeof(key), ctypes.sizeof(value)):
            raise CaptureError("bad_layout", f"pinned map {name!r} has key/value sizes "
                               f"{info.key_size}/{info.value_size}, this ztunnel expects "
                               f"{ctypes.sizeof(key)}/{ctypes.sizeof(value)} (teardown the "
                               "pins of an incompatible version first)")
        return fd

    # -- listeners (SOCKHASH), one slot per worker --
    def _listener_key(self, pod_ip: str, kind: str, worker: int):
        return self.ListenerKey(ip_to_be32(pod_ip), self._kinds[kind], worker)

    def put_listener(self, pod_ip: str, kind: str, sock: socket.socket, worker: int = 0) -> None:
        map_update(self._inbound_fd, self._listener_key(pod_ip, kind, worker),
                   ctypes.c_int(sock.fileno()), f"inbound_listeners[{pod_ip}, {kind}, {worker}]")

    def del_listener(self, pod_ip: str, kind: str, worker: int = 0) -> bool:
        return map_delete(self._inbound_fd, self._listener_key(pod_ip, kind, worker))

    def put_outbound(self, netns_cookie: int, sock: socket.socket, worker: int = 0) -> None:
        map_update(self._outbound_fd, self.OutboundKey(netns_cookie, worker),
                   ctypes.c_int(sock.fileno()), f"outbound_listeners[{netns_cookie}, {worker}]")

    def del_outbound(self, netns_cookie: int, worker: int = 0) -> bool:
        return map_delete(self._outbound_fd, self.OutboundKey(netns_cookie, worker))

    def listener_slots(self) -> dict[str, list[int]]:
        """Pod IP -> the workers whose inbound (15006) listener is in the map: which processes
        sk_lookup can steer that pod's connections to (a SOCKHASH lookup from user space is
        refused for 4-byte values, so this walks the keys)."""
        out: dict[str, list[int]] = {}
        inbound = self._kinds["inbound"]
        limit = 2 * self._max_pods * max_workers()
        for k in map_keys(self._inbound_fd, self.ListenerKey, limit):
            if k.kind == inbound:
                out.setdefault(be32_to_ip(k.pod_ip), []).append(int(k.worker))
        return {ip: sorted(ws) for ip, ws in sorted(out.items())}

    # -- pods (hash) --
    def put_pod(self, rec: PodRecord) -> None:
        raw = rec.uid.encode()
        if len(raw) > self.uid_max:
            raise CaptureError("bad_uid", f"pod uid {rec.uid!r} is longer than {self.uid_max} "
                              "bytes (POD_UID_MAX in types.h)")
        info = self.PodInfo()
        info.netns_cookie, info.netns_ino, info.cgroup_id = (rec.netns_cookie, rec.netns_ino,
                                                             rec.cgroup_id)
        ctypes.memmove(ctypes.addressof(info) + self._uid_field.offset, raw, len(raw))
        map_update(self._pods_fd, self.PodKey(ip_to_be32(rec.pod_ip)), info,
                   f"pods[{rec.pod_ip}]")

    def del_pod(self, pod_ip: str) -> bool:
        return map_delete(self._pods_fd, self.PodKey(ip_to_be32(pod_ip)))

    def pods(self) -> dict[str, PodRecord]:
        """Every enrolled pod by uid (bounded by MAX_PODS)."""
        out: dict[str, PodRecord] = {}
        for key in map_keys(self._pods_fd, self.PodKey, self._max_pods):
            info = self.PodInfo()
            if not map_lookup(self._pods_fd, key, info):
                continue  # removed meanwhile
            raw = ctypes.string_at(ctypes.addressof(info) + self._uid_field.offset,
                                   self.uid_max)
            uid = raw.rstrip(b"\0").decode(errors="replace")
            out[uid] = PodRecord(uid=uid, pod_ip=be32_to_ip(key.value),
                                 netns_cookie=info.netns_cookie, netns_ino=info.netns_ino,
                                 cgroup_id=info.cgroup_id)
        return out

    # -- counters (array) --
    def counters(self) -> dict[str, int]:
        out = {}
        for i, name in enumerate(counter_names()):
            v = ctypes.c_uint64()
            map_lookup(self._counters_fd, ctypes.c_uint32(i), v)
            out[name] = int(v.value)
        return out
