"""Compile and load the capture programs with bcc; attach, pin and detach them through libbpf.

bcc compiles and loads; it has no attach call for BPF links and none at all for sk_lookup, so
links are made with libbpf's ``bpf_link_create``, reached through the libbcc shared object
(dlsym also searches its libbpf dependency).  A private ``CDLL`` handle declares the libbpf
prototypes used here, leaving bcc's own ``libbcc.lib`` declarations untouched.  libbpf >= 1.0
returns ``-errno`` from these calls.

Every program is its own bcc module (one ``.c`` per attach point).  They share their maps
because ``maps.h`` declares each one pinned under ``MAPS_PIN_DIR``: the first module creates
and pins it, the others (and later processes) reopen the pin.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BPF_DIR", "CaptureError", "ProgSpec", "PROGRAMS", "Programs", "cflags_for", "is_bpffs",
    "check_pin_path", "obj_pin", "obj_get", "link_create", "link_detach", "close_fd",
    "map_update", "map_delete", "map_lookup", "map_keys",
]

BPF_DIR = Path(__file__).with_name("bpf")

# Kernel UAPI numbers bcc 0.26 lacks or names differently (include/uapi/linux/bpf.h).
PROG_TYPE_CGROUP_SOCK_ADDR = 18
PROG_TYPE_SOCK_OPS = 13
PROG_TYPE_CGROUP_SOCKOPT = 25
PROG_TYPE_SK_LOOKUP = 30
ATTACH_CGROUP_SOCK_OPS = 3
ATTACH_CGROUP_INET4_CONNECT = 10
ATTACH_CGROUP_GETSOCKOPT = 21
ATTACH_SK_LOOKUP = 36
BPF_ANY = 0
BPF_FS_MAGIC = 0xCAFE4A11
_PIN_PATH_RE = re.compile(r"^/[A-Za-z0-9_/-]+$")  # embedded in a -D string; bpffs forbids "."


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
    "sockops": ProgSpec("capture_sockops.c", "capture_sockops", PROG_TYPE_SOCK_OPS,
                        ATTACH_CGROUP_SOCK_OPS),
    "getsockopt": ProgSpec("capture_getsockopt.c", "capture_getsockopt",
                           PROG_TYPE_CGROUP_SOCKOPT, ATTACH_CGROUP_GETSOCKOPT),
    "sk_lookup": ProgSpec("capture_sklookup.c", "capture_sk_lookup", PROG_TYPE_SK_LOOKUP,
                          ATTACH_SK_LOOKUP),
}


# ---- libbpf through libbcc ---------------------------------------------------------------------

def _load_lib() -> ctypes.CDLL:
    lib = ctypes.CDLL("libbcc.so.0", use_errno=True)
    c_int, c_char_p, c_void_p = ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p
    for name, res, args in (
        ("bpf_obj_pin", c_int, [c_int, c_char_p]),
        ("bpf_obj_get", c_int, [c_char_p]),
        ("bpf_link_create", c_int, [c_int, c_int, c_int, c_void_p]),
        ("bpf_link_detach", c_int, [c_int]),
        ("bpf_map_update_elem", c_int, [c_int, c_void_p, c_void_p, ctypes.c_uint64]),
        ("bpf_map_delete_elem", c_int, [c_int, c_void_p]),
        ("bpf_map_lookup_elem", c_int, [c_int, c_void_p, c_void_p]),
        ("bpf_map_get_next_key", c_int, [c_int, c_void_p, c_void_p]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


_lib = _load_lib()


def _err(rc: int) -> int:
    return -rc if rc < 0 else (ctypes.get_errno() or errno.EIO)


def obj_pin(fd: int, path: str) -> None:
    """Pin a map, program or link fd at `path` on bpffs."""
    rc = _lib.bpf_obj_pin(fd, os.fsencode(path))
    if rc < 0:
        e = _err(rc)
        raise CaptureError("pin_failed", f"bpf_obj_pin({path}): {os.strerror(e)}", e)


def obj_get(path: str) -> int:
    """Open a pinned object; returns a new fd (the caller closes it)."""
    fd = _lib.bpf_obj_get(os.fsencode(path))
    if fd < 0:
        e = _err(fd)
        raise CaptureError("pin_open_failed", f"bpf_obj_get({path}): {os.strerror(e)}", e)
    return fd


def link_create(prog_fd: int, target_fd: int, attach_type: int, what: str) -> int:
    """BPF_LINK_CREATE: a cgroup fd (cgroup hooks) or a netns fd (sk_lookup) as target."""
    fd = _lib.bpf_link_create(prog_fd, target_fd, attach_type, None)
    if fd < 0:
        e = _err(fd)
        raise CaptureError("attach_failed", f"bpf_link_create({what}): {os.strerror(e)}", e)
    return fd


def link_detach(fd: int) -> None:
    """Detach a link now, whoever else still holds it (pins, other processes)."""
    rc = _lib.bpf_link_detach(fd)
    if rc < 0 and _err(rc) not in (errno.ENOLINK, errno.ENOENT):  # already defunct
        e = _err(rc)
        raise CaptureError("detach_failed", f"bpf_link_detach: {os.strerror(e)}", e)


def close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def map_update(fd: int, key: ctypes._CData, value: ctypes._CData, what: str) -> None:
    rc = _lib.bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), BPF_ANY)
    if rc < 0:
        e = _err(rc)
        raise CaptureError("map_update_failed", f"update {what}: {os.strerror(e)}", e)


def map_delete(fd: int, key: ctypes._CData) -> bool:
    """Delete `key`; False if it was not there."""
    rc = _lib.bpf_map_delete_elem(fd, ctypes.byref(key))
    if rc < 0:
        e = _err(rc)
        if e == errno.ENOENT:
            return False
        raise CaptureError("map_delete_failed", f"map delete: {os.strerror(e)}", e)
    return True


def map_lookup(fd: int, key: ctypes._CData, value: ctypes._CData) -> bool:
    """Fill `value` for `key`; False if absent."""
    return _lib.bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value)) == 0


def map_keys(fd: int, key_type: type, limit: int) -> list:
    """All keys of a hash map, at most `limit` (a bound, not an expected size)."""
    keys: list = []
    prev = None
    while len(keys) < limit:
        nxt = key_type()
        rc = _lib.bpf_map_get_next_key(fd, ctypes.byref(prev) if prev is not None else None,
                                       ctypes.byref(nxt))
        if rc < 0:
            break
        keys.append(nxt)
        prev = nxt
    return keys


# ---- bpffs ---------------------------------------------------------------------------------------

class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]


_libc = ctypes.CDLL(None, use_errno=True)


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
               fail_open: bool) -> list[str]:
    """The -D knobs of include/config.h, plus the include path."""
    outbound, inbound, hbone = ports
    for p in ports:
        if not 0 < int(p) < 65536:
            raise CaptureError("bad_config", f"port {p!r} out of range", errno.EINVAL)
    if not 0 <= int(mark) < 2**32:
        raise CaptureError("bad_config", f"mark {mark!r} out of range", errno.EINVAL)
    check_pin_path(maps_pin_dir)
    return [f"-I{BPF_DIR}", f'-DMAPS_PIN_DIR="{maps_pin_dir}"',
            f"-DOUTBOUND_PORT={int(outbound)}", f"-DINBOUND_PORT={int(inbound)}",
            f"-DHBONE_PORT={int(hbone)}", f"-DZTUNNEL_MARK={int(mark):#x}",
            f"-DFAIL_OPEN={1 if fail_open else 0}"]


class Programs:
    """Owns the bcc modules of the capture programs and every fd handed to it.

    ``with Programs(cflags) as p: fd = p.prog_fd("connect4")``.  :meth:`close` closes all
    program, map and link fds it owns; it detaches nothing by itself, so pinned links stay
    attached (unpinned ones go away with their last fd, as the kernel does for links).
    """

    def __init__(self, cflags: Sequence[str]):
        self._cflags = list(cflags)
        self._modules: dict[str, object] = {}   # source file -> bcc.BPF
        self._progs: dict[str, int] = {}
        self._fds: set[int] = set()

    def __enter__(self) -> "Programs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _module(self, source: str):
        mod = self._modules.get(source)
        if mod is None:
            from bcc import BPF  # local import: the rest of ebpf/ works without bcc
            try:
                mod = BPF(src_file=str(BPF_DIR / source).encode(), cflags=self._cflags)
            except Exception as e:  # bcc raises bare Exception, details on stderr
                raise CaptureError("compile_failed", f"bcc could not compile {source}: {e} "
                                  "(compiler output above)") from e
            self._modules[source] = mod
        return mod

    def load_all(self) -> None:
        for name in PROGRAMS:
            self.prog_fd(name)

    def prog_fd(self, name: str) -> int:
        """Load (once) and return the fd of program `name` (a key of PROGRAMS)."""
        fd = self._progs.get(name)
        if fd is None:
            spec = PROGRAMS[name]
            try:
                fn = self._module(spec.source).load_func(spec.function.encode(), spec.prog_type,
                                                         attach_type=spec.attach_type)
            except CaptureError:
                raise
            except Exception as e:
                raise CaptureError("load_failed", f"the kernel refused {spec.function}: {e} "
                                  "(verifier log above)") from e
            fd = self._progs[name] = fn.fd
        return fd

    def _any_module(self):
        if not self._modules:
            self.prog_fd("connect4")
        return next(iter(self._modules.values()))

    def table(self, name: str):
        """bcc's table object for a map bcc has a class for (hash, lru_hash, array)."""
        return self._any_module()[name.encode()]

    def table_fd(self, name: str) -> int:
        from bcc import libbcc
        fd = libbcc.lib.bpf_table_fd(self._any_module().module, name.encode())
        if fd < 0:
            raise CaptureError("no_such_map", f"no map {name!r} in the capture programs")
        return fd

    def key_type(self, name: str) -> type:
        """The ctypes key type of map `name` from bcc's metadata of the compiled object (also
        for SOCKHASH, which bcc 0.26 has no table class for)."""
        from bcc import BPF, libbcc
        desc = libbcc.lib.bpf_table_key_desc(self._any_module().module, name.encode())
        return BPF._decode_table_type(json.loads(desc))

    def leaf_type(self, name: str) -> type:
        from bcc import BPF, libbcc
        desc = libbcc.lib.bpf_table_leaf_desc(self._any_module().module, name.encode())
        return BPF._decode_table_type(json.loads(desc))

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
        """Close every owned fd and the bcc modules (programs and map fds). Idempotent."""
        for fd in list(self._fds):
            close_fd(fd)
        self._fds.clear()
        for mod in self._modules.values():
            try:
                mod.cleanup()
            except Exception:  # noqa: BLE001 - closing: nothing useful to do with it
                pass
        self._modules.clear()
        self._progs.clear()
