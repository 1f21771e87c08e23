"""`ambient check --pre`: does this node's kernel have what the mesh's data path needs?

Facts are gathered once from /sys and /proc (`gather`), then judged by a pure function
(`judge`) into typed results with a closed set of reasons, so the rules are tested with tables.
What is checked and why:
  * a cgroup v2 hierarchy (unified, or hybrid's /sys/fs/cgroup/unified): the capture programs
    attach to pod cgroups there (connect4, getsockopt, sock_ops); v1 has no attach points.
  * bpffs mounted at /sys/fs/bpf: programs and maps are pinned there so they outlive the
    process that loaded them (a ztunnel restart keeps capture in place).
  * BTF (/sys/kernel/btf/vmlinux): the kernel describes its own types, which CO-RE programs need.
  * sk_lookup (kernel >= 5.9): steers inbound connections to ztunnel's in-pod listeners.
  * cgroup getsockopt hooks (kernel >= 5.3): answers SO_ORIGINAL_DST for redirected sockets.
"""
from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from enum import Enum

__all__ = ["Facts", "Result", "Reason", "gather", "judge"]


class Reason(str, Enum):
    OK = "ok"
    NO_CGROUP2 = "no_cgroup2"
    NO_BPFFS = "no_bpffs"
    NO_BTF = "no_btf"
    KERNEL_TOO_OLD = "kernel_too_old"
    UNKNOWN_KERNEL = "unknown_kernel"


@dataclass(frozen=True, slots=True)
class Facts:
    kernel: str  # uname release, e.g. "6.1.0-18-amd64"
    cgroup2_mount: str | None  # where a cgroup2 filesystem is mounted, if anywhere
    bpffs_mounted: bool
    btf: bool


@dataclass(frozen=True, slots=True)
class Result:
    name: str
    ok: bool
    reason: Reason
    detail: str


def _mounts() -> list[tuple[str, str]]:
    try:
        with open("/proc/self/mounts") as f:
            return [(p[1], p[2]) for p in (line.split() for line in f) if len(p) >= 3]
    except OSError:
        return []


def gather() -> Facts:
    mounts = _mounts()
    return Facts(
        kernel=platform.release(),
        cgroup2_mount=next((m for m, t in mounts if t == "cgroup2"), None),
        bpffs_mounted=any(m == "/sys/fs/bpf" and t == "bpf" for m, t in mounts),
        btf=os.path.exists("/sys/kernel/btf/vmlinux"),
    )


def _version(release: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else None


def judge(f: Facts) -> list[Result]:
    out = [
        Result("cgroup v2", f.cgroup2_mount is not None, Reason.OK if f.cgroup2_mount else Reason.NO_CGROUP2,
               f"cgroup2 at {f.cgroup2_mount}" + (" (hybrid)" if f.cgroup2_mount != "/sys/fs/cgroup" else "")
               if f.cgroup2_mount else "no cgroup2 filesystem is mounted (boot with systemd.unified_cgroup_hierarchy=1)"),
        Result("bpffs", f.bpffs_mounted, Reason.OK if f.bpffs_mounted else Reason.NO_BPFFS,
               "/sys/fs/bpf is mounted" if f.bpffs_mounted else
               "/sys/fs/bpf is not a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)"),
        Result("BTF", f.btf, Reason.OK if f.btf else Reason.NO_BTF,
               "/sys/kernel/btf/vmlinux exists" if f.btf else
               "/sys/kernel/btf/vmlinux is missing (a kernel built with CONFIG_DEBUG_INFO_BTF=y)"),
    ]
    v = _version(f.kernel)
    for name, need in (("cgroup getsockopt", (5, 3)), ("sk_lookup", (5, 9))):
        if v is None:
            out.append(Result(name, False, Reason.UNKNOWN_KERNEL, f"cannot read a version from {f.kernel!r}"))
        else:
            ok = v >= need
            out.append(Result(name, ok, Reason.OK if ok else Reason.KERNEL_TOO_OLD,
                              f"kernel {f.kernel} {'>=' if ok else '<'} {need[0]}.{need[1]}"))
    return out
