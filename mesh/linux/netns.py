"""Named network namespaces: create, remove, enter, and open sockets inside them.

A named netns is a bind mount of an nsfs inode at ``/var/run/netns/<name>`` (the iproute2
convention, so ``ip netns list`` shows ours).  Creation and removal go through pyroute2.

Entering a netns is per *thread*: ``setns(2)`` with ``CLONE_NEWNET`` only moves the calling
thread, so :func:`in_netns` is safe in a threaded program as long as the block does not hand
work to other threads.  It saves ``/proc/thread-self/ns/net`` first and always switches back,
also when the block raises.  A socket created inside keeps its netns for its whole life, which
is how :func:`socket_in_netns` opens listeners inside pods from a process that stays outside.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager


__all__ = [
    "NETNS_DIR", "NetnsError", "netns_path", "exists", "create", "remove", "list_netns",
    "in_netns", "socket_in_netns", "pids_in", "kill_pids_in",
]

NETNS_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _pr_netns():
    """pyroute2's netns module, imported on first use: only the cluster runner creates and
    removes namespaces, and ztunnel (which imports this module for socket_in_netns) should not
    carry pyroute2 (~20 MB RSS) for it."""
    from pyroute2 import netns
    return netns


class NetnsError(OSError):
    """A network namespace operation failed (bad name, missing netns, setns failure)."""


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise NetnsError(errno.EINVAL, f"invalid netns name {name!r} "
                         "(1-63 chars of [A-Za-z0-9_.-], not starting with a dot or dash)")
    return name


def netns_path(name: str) -> str:
    """The bind-mount path of the named netns (it need not exist). An absolute path (a CNI
    netns path such as /var/run/netns/cni-..., or /proc/<pid>/ns/net) is returned as is."""
    if isinstance(name, str) and name.startswith("/"):
        return name
    return os.path.join(NETNS_DIR, _check_name(name))


def exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def create(name: str) -> str:
    """Create the named netns and return its path; NetnsError(EEXIST) if it already exists."""
    path = netns_path(name)
    if os.path.exists(path):
        raise NetnsError(errno.EEXIST, f"netns {name!r} already exists", path)
    _pr_netns().create(name)
    if not os.path.exists(path):  # pyroute2 reports child failures loosely; check the outcome
        raise NetnsError(errno.EIO, f"netns {name!r} was not created", path)
    return path


def remove(name: str) -> bool:
    """Unmount and delete the named netns; True if it existed.

    The namespace itself disappears once no process, socket or fd refers to it; kill the
    processes inside first (:func:`kill_pids_in`) if it must be gone for good.
    """
    path = netns_path(name)
    if not os.path.exists(path):
        return False
    try:
        _pr_netns().remove(name)
    except FileNotFoundError:  # raced with another remover
        return False
    return True


def list_netns(prefix: str = "") -> list[str]:
    """Sorted names of the named netns starting with `prefix`."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns: {os.strerror(err)}")


@contextmanager
def in_netns(name: str) -> Iterator[str]:
    """Run the block with the calling thread inside the named netns (or the netns at an
    absolute path); yields its path.

    The thread's original netns is restored on exit, even if the block raises.  Only this
    thread moves; other threads of the process are unaffected.
    """
    path = netns_path(name)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(errno.ENOENT, f"netns {name!r} does not exist", path) from None
    try:
        orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        os.close(target)
        raise
    try:
        _setns(target)
        os.close(target)
        target = -1
        try:
            yield path
        finally:
            _setns(orig)  # if this ever fails the thread is in an unknown netns: let it raise
    finally:
        if target >= 0:
            os.close(target)
        os.close(orig)


def socket_in_netns(name: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM,
                    proto: int = 0) -> socket.socket:
    """A new socket living in the named netns, or the one at an absolute path (it stays
    there after this returns)."""
    with in_netns(name):
        return socket.socket(family, type, proto)


def _ns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def pids_in(name: str, *, max_procs: int = 100_000) -> list[int]:
    """PIDs of processes whose (main thread's) netns is the named one (scans /proc, bounded)."""
    target = _ns_id(netns_path(name))
    if target is None:
        return []
    found = []
    me = os.getpid()
    for i, entry in enumerate(os.scandir("/proc")):
        if i >= max_procs:
            break
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        if _ns_id(f"/proc/{entry.name}/ns/net") == target:
            found.append(int(entry.name))
    return sorted(found)


def kill_pids_in(name: str) -> list[int]:
    """SIGKILL every process inside the named netns; returns the PIDs signalled.

    For crash recovery: processes that were started in a namespace but not in one of the
    cluster's cgroups would otherwise keep the namespace (and its veths) alive.
    """
    killed = []
    for pid in pids_in(name):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed
