"""cgroup v2 directories for the mesh's processes: find the mount, create, join, list, remove.

Paths are given relative to the cgroup2 mount (``amb-demo/pods/1a2b3c4d5e``); the mount point
is read from /proc/mounts (``/sys/fs/cgroup`` on unified hosts, ``/sys/fs/cgroup/unified`` in
the hybrid layout).  No controllers are enabled: the mesh uses cgroups to *identify* a pod's or
a ztunnel's processes (eBPF programs attach per cgroup), not to limit them.

:func:`remove_tree` is the only destructive call: it SIGKILLs every process left in the subtree
(one write to ``cgroup.kill`` on kernels >= 5.14, otherwise per PID), waits a bounded time for
the cgroups to empty, then removes the directories bottom-up.
"""
from __future__ import annotations

import errno
import functools
import os
import re
import signal
import time

__all__ = ["CgroupError", "cgroup2_root", "abspath", "create", "remove_tree", "pids", "join",
           "cgroup_of"]


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


class CgroupError(OSError):
    """A cgroup operation failed (no cgroup2 mount, bad path, cgroup would not empty)."""


@functools.lru_cache(maxsize=1)
def cgroup2_root() -> str:
    """The cgroup2 mount point, from /proc/mounts (the first cgroup2 entry)."""
    with open("/proc/mounts", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "cgroup2":
                # /proc/mounts escapes space, tab, newline and backslash as octal (\040 ...)
                return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[1])
    raise CgroupError(errno.ENOENT, "no cgroup2 filesystem in /proc/mounts")


def abspath(path_rel: str) -> str:
    """The absolute path of a cgroup given relative to the cgroup2 root (validated)."""
    if not isinstance(path_rel, str) or not path_rel or path_rel.startswith("/"):
        raise CgroupError(errno.EINVAL, f"cgroup path must be relative and non-empty: {path_rel!r}")
    parts = path_rel.strip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise CgroupError(errno.EINVAL, f"bad cgroup path {path_rel!r}")
    return os.path.join(cgroup2_root(), *parts)


def create(path_rel: str) -> str:
    """Create the cgroup (and missing parents); returns its absolute path. Idempotent."""
    path = abspath(path_rel)
    os.makedirs(path, exist_ok=True)
    return path


def _procs(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs"), encoding="ascii") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def _subtree(path: str) -> list[str]:
    """The cgroup and its descendants, deepest first (ready for rmdir)."""
    out = [d for d, _, _ in os.walk(path)]
    out.sort(key=lambda p: p.count("/"), reverse=True)
    return out


def pids(path_rel: str, *, recursive: bool = False) -> list[int]:
    """PIDs in the cgroup (and its descendants if `recursive`); [] if it does not exist."""
    path = abspath(path_rel)
    dirs = _subtree(path) if recursive else [path]
    return sorted({pid for d in dirs for pid in _procs(d)})


def join(pid: int, path_rel: str) -> None:
    """Move process `pid` (0 = the caller) into the cgroup, which must exist."""
    path = abspath(path_rel)
    try:
        with open(os.path.join(path, "cgroup.procs"), "w", encoding="ascii") as f:
            f.write(str(pid))
    except FileNotFoundError:
        raise CgroupError(errno.ENOENT, f"cgroup {path_rel!r} does not exist", path) from None


def cgroup_of(pid: int) -> str | None:
    """The cgroup2 path of `pid` relative to the root ("" for the root), None if it is gone."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip().lstrip("/")
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def _kill_all(dirs: list[str]) -> None:
    top = dirs[-1]
    kill_file = os.path.join(top, "cgroup.kill")
    if os.path.exists(kill_file):
        try:
            with open(kill_file, "w", encoding="ascii") as f:
                f.write("1")
            return
        except OSError:
            pass  # fall back to per-PID kills
    for d in dirs:
        for pid in _procs(d):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def remove_tree(path_rel: str, *, timeout: float = 5.0) -> bool:
    """Kill every process in the cgroup subtree, then rmdir it bottom-up; True if it existed.

    Raises CgroupError if the subtree is still busy after `timeout` seconds (a process in
    uninterruptible sleep, or a cgroup re-populated concurrently).
    """
    path = abspath(path_rel)
    if not os.path.isdir(path):
        return False
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        attempt += 1
        dirs = _subtree(path)
        if not dirs:
            return True
        if any(_procs(d) for d in dirs):
            _kill_all(dirs)
        busy = []
        for d in dirs:
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    raise
                busy.append(d)
        if not busy:
            return True
        if time.monotonic() >= deadline or attempt >= 1000:
            left = {d: _procs(d) for d in busy}
            raise CgroupError(errno.EBUSY, f"cgroup subtree {path_rel!r} still busy after "
                              f"{timeout}s: {left}")
        time.sleep(min(0.01 * attempt, 0.1))
