"""Talk to the kernel's bpf(2) for the capture programs, without bcc in this process.

ztunnel is long-running; bcc (libbcc, libLLVM, libclang: ~100 MB mapped plus LLVM's heap)
must not live in it.  So the work is split:

* :mod:`ebpf.build` is a short-lived child (``python -m ebpf.build``) that compiles and loads
  the capture programs with bcc, pins each one at ``<pin_dir>/progs/<name>`` (the maps pin
  themselves at ``<pin_dir>/maps/*``, declared in ``maps.h``), records the knobs it was built
  with, and exits.
* This module is what the ztunnel process uses: raw ``bpf(2)`` syscalls through ctypes
  (``BPF_OBJ_GET``/``BPF_OBJ_PIN``, ``BPF_LINK_CREATE``/``UPDATE``/``DETACH``, the map element
  commands, ``BPF_OBJ_GET_INFO_BY_FD``), with ``union bpf_attr`` members mirrored from the
  kernel UAPI (``include/uapi/linux/bpf.h``; tests/ebpf/test_layout.py has the compiler check
  every offset and command number).  :class:`Programs` opens the pinned programs, running the
  build child first only if they are missing or were built with other knobs.

Knobs record.  bpffs holds no regular files, so the knobs are the *target* of a symlink,
``<pin_dir>/progs/knobs -> {"cflags": [...], "sources": "<sha256 of ebpf/bpf/**>"}``, written
last by the build child (a build that died half-way leaves none, so the next start rebuilds).
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BPF_DIR", "CaptureError", "ProgSpec", "PROGRAMS", "Programs", "cflags_for", "is_bpffs",
    "check_pin_path", "obj_pin", "obj_get", "link_create", "link_update", "link_detach",
    "close_fd", "map_update", "map_delete", "map_lookup", "map_keys", "map_info", "link_prog_id",
    "prog_id", "knobs_for", "read_knobs", "KNOBS_LINK", "PROGS_DIR",
]

BPF_DIR = Path(__file__).with_name("bpf")
PROGS_DIR = "progs"        # <pin_dir>/progs/<name>: the pinned programs
KNOBS_LINK = "knobs"       # <pin_dir>/progs/knobs: symlink whose target is the knobs JSON
BUILD_TIMEOUT_S = 120.0

# Kernel UAPI numbers (include/uapi/linux/bpf.h); checked by tests/ebpf/test_layout.py.
PROG_TYPE_CGROUP_SOCK_ADDR = 18
PROG_TYPE_SOCK_OPS = 13
PROG_TYPE_CGROUP_SOCKOPT = 25
PROG_TYPE_SK_LOOKUP = 30
ATTACH_CGROUP_SOCK_OPS = 3
ATTACH_CGROUP_INET4_CONNECT = 10
ATTACH_CGROUP_INET6_CONNECT = 11
ATTACH_CGROUP_GETSOCKOPT = 21
ATTACH_SK_LOOKUP = 36
BPF_ANY = 0
BPF_FS_MAGIC = 0xCAFE4A11
_PIN_PATH_RE = re.compile(r"^/[A-Za-z0-9_/-]+$")  # embedded in a -D string; bpffs forbids "."

# enum bpf_cmd
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_DETACH = 34

# __NR_bpf per architecture (arch/*/entry/syscalls, include/uapi/asm-generic/unistd.h)
_NR_BPF = {"x86_64": 321, "aarch64": 280, "arm64": 280, "riscv64": 280, "ppc64le": 361,
           "s390x": 351, "i686": 357, "i386": 357}


class CaptureError(OSError):
    """Capture could not be set up or used; `reason` is a stable label (metrics, logs, tests)."""

    def __init__(self, reason: str, message: str, err: int = 0):
        super().__init__(err or errno.EIO, message)
        self.reason = reason

    def __str__(self) -> str:
        return f"[{self.reason}] {self.strerror}"


@dataclass(frozen=True, slots=True)
class ProgSpec:
    """Where a program lives and how it is loaded and attached."""

    source: str          # file under ebpf/bpf/
    function: str        # entry function in that file
    prog_type: int
    attach_type: int


PROGRAMS: Mapping[str, ProgSpec] = {
    "connect4": ProgSpec("capture_connect.c", "capture_connect4", PROG_TYPE_CGROUP_SOCK_ADDR,
                         ATTACH_CGROUP_INET4_CONNECT),
    "connect6": ProgSpec("capture_connect.c", "capture_connect6", PROG_TYPE_CGROUP_SOCK_ADDR,
                         ATTACH_CGROUP_INET6_CONNECT),
    "sockops": ProgSpec("capture_sockops.c", "capture_sockops", PROG_TYPE_SOCK_OPS,
                        ATTACH_CGROUP_SOCK_OPS),
    "ztunnel_sockops": ProgSpec("capture_ztunnel_sockops.c", "capture_ztunnel_sockops",
                                PROG_TYPE_SOCK_OPS, ATTACH_CGROUP_SOCK_OPS),
    "getsockopt": ProgSpec("capture_getsockopt.c", "capture_getsockopt",
                           PROG_TYPE_CGROUP_SOCKOPT, ATTACH_CGROUP_GETSOCKOPT),
    "sk_lookup": ProgSpec("capture_sklookup.c", "capture_sk_lookup", PROG_TYPE_SK_LOOKUP,
                          ATTACH_SK_LOOKUP),
}


# ---- bpf(2) ------------------------------------------------------------------------------------
# Members of union bpf_attr, one ctypes struct per command group; fields not declared here are
# passed as zero (the kernel requires that of everything past what it reads).

class AttrMapElem(ctypes.Structure):      # BPF_MAP_*_ELEM, BPF_MAP_GET_NEXT_KEY
    _fields_ = [("map_fd", ctypes.c_uint32), ("_pad0", ctypes.c_uint32),
                ("key", ctypes.c_uint64), ("value", ctypes.c_uint64),  # value / next_key
                ("flags", ctypes.c_uint64)]


class AttrObj(ctypes.Structure):          # BPF_OBJ_PIN, BPF_OBJ_GET
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32),
                ("file_flags", ctypes.c_uint32)]


class AttrInfo(ctypes.Structure):         # BPF_OBJ_GET_INFO_BY_FD
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


class AttrLinkCreate(ctypes.Structure):   # BPF_LINK_CREATE (cgroup and netns targets)
    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class AttrLinkUpdate(ctypes.Structure):   # BPF_LINK_UPDATE
    _fields_ = [("link_fd", ctypes.c_uint32), ("new_prog_fd", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("old_prog_fd", ctypes.c_uint32)]


class AttrLinkDetach(ctypes.Structure):   # BPF_LINK_DETACH
    _fields_ = [("link_fd", ctypes.c_uint32)]


class MapInfo(ctypes.Structure):          # struct bpf_map_info (leading part)
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32)]


class LinkInfo(ctypes.Structure):         # struct bpf_link_info (leading part)
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32)]


class ProgInfo(ctypes.Structure):         # struct bpf_prog_info (leading part)
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _nr_bpf() -> int:
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise CaptureError("unsupported_arch", f"no bpf(2) syscall number known for "
                          f"{platform.machine()!r}", errno.ENOSYS)
    return nr


def _bpf(cmd: int, attr: ctypes.Structure) -> tuple[int, int]:
    """bpf(cmd, &attr, sizeof attr) -> (result, errno); result < 0 on failure."""
    rc = _libc.syscall(ctypes.c_long(_nr_bpf()), ctypes.c_int(cmd), ctypes.byref(attr),
                       ctypes.c_uint(ctypes.sizeof(attr)))
    return (rc, 0) if rc >= 0 else (-1, ctypes.get_errno() or errno.EIO)


def _addr(obj) -> int:
    return ctypes.addressof(obj) if obj is not None else 0


def obj_pin(fd: int, path: str) -> None:
    """Pin a map, program or link fd at `path` on bpffs."""
    raw = ctypes.create_string_buffer(os.fsencode(path))
    rc, e = _bpf(BPF_OBJ_PIN, AttrObj(pathname=ctypes.addressof(raw), bpf_fd=fd))
    if rc < 0:
        raise CaptureError("pin_failed", f"BPF_OBJ_PIN({path}): {os.strerror(e)}", e)


def obj_get(path: str) -> int:
    """Open a pinned object; returns a new fd (the caller closes it)."""
    raw = ctypes.create_string_buffer(os.fsencode(path))
    fd, e = _bpf(BPF_OBJ_GET, AttrObj(pathname=ctypes.addressof(raw)))
    if fd < 0:
        raise CaptureError("pin_open_failed", f"BPF_OBJ_GET({path}): {os.strerror(e)}", e)
    return fd


def link_create(prog_fd: int, target_fd: int, attach_type: int, what: str) -> int:
    """BPF_LINK_CREATE: a cgroup fd (cgroup hooks) or a netns fd (sk_lookup) as target."""
    fd, e = _bpf(BPF_LINK_CREATE, AttrLinkCreate(prog_fd=prog_fd, target_fd=target_fd,
                                                 attach_type=attach_type))
    if fd < 0:
        raise CaptureError("attach_failed", f"BPF_LINK_CREATE({what}): {os.strerror(e)}", e)
    return fd


def link_update(link_fd: int, prog_fd: int, what: str) -> bool:
    """BPF_LINK_UPDATE: atomically swap the link's program (no window without one).  False if
    the link is defunct (its cgroup or netns is gone): nothing to update."""
    rc, e = _bpf(BPF_LINK_UPDATE, AttrLinkUpdate(link_fd=link_fd, new_prog_fd=prog_fd))
    if rc < 0:
        if e in (errno.ENOLINK, errno.ENOENT):
            return False
        raise CaptureError("attach_failed", f"BPF_LINK_UPDATE({what}): {os.strerror(e)}", e)
    return True


def link_detach(fd: int) -> None:
    """Detach a link now, whoever else still holds it (pins, other processes)."""
    rc, e = _bpf(BPF_LINK_DETACH, AttrLinkDetach(link_fd=fd))
    if rc < 0 and e not in (errno.ENOLINK, errno.ENOENT):  # already defunct
        raise CaptureError("detach_failed", f"BPF_LINK_DETACH: {os.strerror(e)}", e)


def _info(fd: int, info: ctypes.Structure, what: str) -> None:
    rc, e = _bpf(BPF_OBJ_GET_INFO_BY_FD, AttrInfo(bpf_fd=fd, info_len=ctypes.sizeof(info),
                                                  info=ctypes.addressof(info)))
    if rc < 0:
        raise CaptureError("bad_object", f"BPF_OBJ_GET_INFO_BY_FD({what}): {os.strerror(e)}", e)


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    _info(fd, info, "map")
    return info


def link_prog_id(fd: int) -> int:
    """The id of the program a link runs (0 if it is not a link)."""
    info = LinkInfo()
    _info(fd, info, "link")
    return info.prog_id


def prog_id(fd: int) -> int:
    info = ProgInfo()
    _info(fd, info, "program")
    return info.id


def close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def map_update(fd: int, key: ctypes._CData, value: ctypes._CData, what: str) -> None:
    rc, e = _bpf(BPF_MAP_UPDATE_ELEM, AttrMapElem(map_fd=fd, key=_addr(key), value=_addr(value),
                                                  flags=BPF_ANY))
    if rc < 0:
        raise CaptureError("map_update_failed", f"update {what}: {os.strerror(e)}", e)


def map_delete(fd: int, key: ctypes._CData) -> bool:
    """Delete `key`; False if it was not there."""
    rc, e = _bpf(BPF_MAP_DELETE_ELEM, AttrMapElem(map_fd=fd, key=_addr(key)))
    if rc < 0:
        if e == errno.ENOENT:
            return False
        raise CaptureError("map_delete_failed", f"map delete: {os.strerror(e)}", e)
    return True


def map_lookup(fd: int, key: ctypes._CData, value: ctypes._CData) -> bool:
    """Fill `value` for `key`; False if absent."""
    return _bpf(BPF_MAP_LOOKUP_ELEM, AttrMapElem(map_fd=fd, key=_addr(key),
                                                 value=_addr(value)))[0] == 0


def map_keys(fd: int, key_type: type, limit: int) -> list:
    """All keys of a hash map, at most `limit` (a bound, not an expected size)."""
    keys: list = []
    prev = None
    while len(keys) < limit:
        nxt = key_type()
        if _bpf(BPF_MAP_GET_NEXT_KEY, AttrMapElem(map_fd=fd, key=_addr(prev),
                                                  value=_addr(nxt)))[0] < 0:
            break
        keys.append(nxt)
        prev = nxt
    return keys


# ---- bpffs ---------------------------------------------------------------------------------------

class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]


def is_bpffs(path: str) -> bool:
    """Whether `path` (which must exist) is on a bpf filesystem."""
    st = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(st)) != 0:
        return False
    return (st.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC


def check_pin_path(path: str) -> str:
    """Validate a pin directory: absolute, plain characters (no dots, bpffs refuses them),
    and below an existing bpffs mount."""
    if not _PIN_PATH_RE.match(path or "") or "//" in path:
        raise CaptureError("bad_pin_dir", f"pin dir {path!r} must be an absolute path of "
                          "[A-Za-z0-9_-] components (bpffs refuses dots)", errno.EINVAL)
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not is_bpffs(probe):
        raise CaptureError("pin_dir_not_bpffs", f"{path!r} is not on a bpf filesystem: mount one "
                          "(mount -t bpf bpf /sys/fs/bpf; scripts/install.sh does)", errno.EINVAL)
    return path


# ---- programs ------------------------------------------------------------------------------------

def cflags_for(*, maps_pin_dir: str, ports: tuple[int, int, int], mark: int,
               fail_open: bool, inbound_mark: int = 0x111) -> list[str]:
    """The -D knobs of include/config.h, plus the include path."""
    outbound, inbound, hbone = ports
    for p in ports:
        if not 0 < int(p) < 65536:
            raise CaptureError("bad_config", f"port {p!r} out of range", errno.EINVAL)
    for m in (mark, inbound_mark):
        if not 0 <= int(m) < 2**32:
            raise CaptureError("bad_config", f"mark {m!r} out of range", errno.EINVAL)
    if int(mark) == int(inbound_mark):
        raise CaptureError("bad_config", f"mark and inbound_mark must differ (both {mark:#x})",
                           errno.EINVAL)
    check_pin_path(maps_pin_dir)
    return [f"-I{BPF_DIR}", f'-DMAPS_PIN_DIR="{maps_pin_dir}"',
            f"-DOUTBOUND_PORT={int(outbound)}", f"-DINBOUND_PORT={int(inbound)}",
            f"-DHBONE_PORT={int(hbone)}", f"-DZTUNNEL_MARK={int(mark):#x}",
            f"-DINBOUND_MARK={int(inbound_mark):#x}",
            f"-DFAIL_OPEN={1 if fail_open else 0}"]


def knobs_for(cflags: Sequence[str]) -> dict:
    """What pinned programs must have been built with to be reused: the exact cflags and a
    digest of every source under ebpf/bpf/ (an upgraded ztunnel rebuilds changed programs)."""
    h = hashlib.sha256()
    for f in sorted(p for p in BPF_DIR.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(BPF_DIR)).encode() + b"\0" + f.read_bytes() + b"\0")
    return {"cflags": list(cflags), "sources": h.hexdigest()}


def read_knobs(pin_dir: str) -> dict | None:
    """The knobs the pinned programs were built with; None if not recorded (or unreadable)."""
    try:
        return json.loads(os.readlink(f"{pin_dir}/{PROGS_DIR}/{KNOBS_LINK}"))
    except (OSError, ValueError):
        return None


def run_build(pin_dir: str, cflags: Sequence[str]) -> dict:
    """Run the build child (:mod:`ebpf.build`) with this interpreter; returns its report.
    Its stderr (compiler and verifier output) goes to ours."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    argv = [sys.executable, "-m", "ebpf.build", "--pin-dir", pin_dir,
            "--cflags", json.dumps(list(cflags))]
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env,
                           cwd=root, timeout=BUILD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise CaptureError("build_failed", f"ebpf.build did not finish in {BUILD_TIMEOUT_S:.0f}s",
                           errno.ETIMEDOUT) from None
    except OSError as e:
        raise CaptureError("build_failed", f"cannot run ebpf.build: {e}", e.errno or 0) from None
    try:
        report = json.loads(p.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        report = {}
    if p.returncode != 0 or not report.get("ok"):
        raise CaptureError(report.get("reason", "build_failed"),
                           report.get("error", f"ebpf.build exited with {p.returncode}"),
                           int(report.get("errno", 0)))
    return report


class Programs:
    """The pinned capture programs opened in this process, and every fd handed to it.

    :meth:`load_all` builds them first (in the :mod:`ebpf.build` child) when the pins are
    missing or the recorded knobs differ, then opens them.  :meth:`close` closes all program,
    map and link fds it owns; it detaches nothing by itself, so pinned links stay attached
    (unpinned ones go away with their last fd, as the kernel does for links).
    """

    def __init__(self, pin_dir: str, cflags: Sequence[str]):
        self.pin_dir = pin_dir
        self._cflags = list(cflags)
        self._progs: dict[str, int] = {}
        self._prog_ids: dict[str, int] = {}
        self._fds: set[int] = set()
        self.built = False
        """True if :meth:`load_all` ran the build child (no reusable pinned programs)."""

    def __enter__(self) -> "Programs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def prog_pin(self, name: str) -> str:
        return f"{self.pin_dir}/{PROGS_DIR}/{name}"

    def load_all(self) -> None:
        if self._progs:
            return
        if (read_knobs(self.pin_dir) != knobs_for(self._cflags)
                or not all(os.path.exists(self.prog_pin(n)) for n in PROGRAMS)):
            run_build(self.pin_dir, self._cflags)
            self.built = True
        for name, spec in PROGRAMS.items():
            fd = obj_get(self.prog_pin(name))
            self._progs[name] = fd
            info = ProgInfo()
            _info(fd, info, self.prog_pin(name))
            if info.type != spec.prog_type:
                raise CaptureError("bad_object", f"{self.prog_pin(name)} is not a program of type "
                                   f"{spec.prog_type} (got {info.type})", errno.EINVAL)
            self._prog_ids[name] = info.id

    def prog_fd(self, name: str) -> int:
        """The fd of program `name` (a key of PROGRAMS); :meth:`load_all` first."""
        fd = self._progs.get(name)
        if fd is None:
            raise CaptureError("not_loaded", f"program {name!r} is not loaded")
        return fd

    def map_fd(self, name: str) -> int:
        """An owned fd of the pinned map ``<pin_dir>/maps/<name>``."""
        try:
            return self.adopt(obj_get(f"{self.pin_dir}/maps/{name}"))
        except CaptureError as e:
            raise CaptureError("no_such_map", f"no pinned map {name!r}: {e.strerror}",
                               e.errno) from None

    def sync_link(self, link_fd: int, name: str, what: str) -> bool:
        """Make a (reopened) link run the current program `name`: a link made by an earlier
        build keeps its program until updated.  True if it was updated."""
        if link_prog_id(link_fd) == self._prog_ids[name]:
            return False
        return link_update(link_fd, self.prog_fd(name), what)

    # -- fds owned on the caller's behalf --
    def adopt(self, fd: int) -> int:
        self._fds.add(fd)
        return fd

    def release_fd(self, fd: int) -> None:
        """Close an owned fd (links: the link lives on only if pinned)."""
        if fd in self._fds:
            self._fds.discard(fd)
            close_fd(fd)

    def attach_cgroup(self, name: str, cgroup_path: str) -> int:
        """A BPF link of program `name` on the cgroup directory; returns the owned link fd."""
        spec = PROGRAMS[name]
        prog = self.prog_fd(name)
        try:
            cg = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise CaptureError("bad_cgroup", f"cannot open cgroup {cgroup_path!r}: {e}",
                              e.errno or 0) from None
        try:
            return self.adopt(link_create(prog, cg, spec.attach_type, f"{name} on {cgroup_path}"))
        finally:
            os.close(cg)

    def attach_netns(self, name: str, netns_path: str) -> int:
        """A BPF link of program `name` on the network namespace; returns the owned link fd."""
        spec = PROGRAMS[name]
        prog = self.prog_fd(name)
        try:
            ns = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise CaptureError("bad_netns", f"cannot open netns {netns_path!r}: {e}",
                              e.errno or 0) from None
        try:
            return self.adopt(link_create(prog, ns, spec.attach_type, f"{name} on {netns_path}"))
        finally:
            os.close(ns)

    def close(self) -> None:
        """Close every owned fd and the program fds (pins keep them alive). Idempotent."""
        for fd in [*self._fds, *self._progs.values()]:
            close_fd(fd)
        self._fds.clear()
        self._progs.clear()
        self._prog_ids.clear()
