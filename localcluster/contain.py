"""A pod's mount namespace, set up as a container runtime sets up a container's (run as a script).

Theory of operation.  :mod:`localcluster.procs` runs this file as
``python3 -I -S contain.py [--hide DIR]... [--keep DIR]... [--volume SRC:DST[:rw]]... [--writable DIR] -- NEXT...`` as the first program
in a fresh mount and PID namespace (``unshare --mount --pid --fork --mount-proc``), still root
with every capability.  It changes only this private mount namespace (propagation is private,
so nothing reaches the host's), in this order, and then execs ``NEXT`` (``setpriv``, which
drops the user, the groups and every capability):

1. The mesh's state is taken away: every mount at or below each ``--hide`` directory is
   detached (the netns bind mounts under /var/run/netns and the bpffs at /sys/fs/bpf stop
   existing here, rather than merely being covered) and an empty read-only tmpfs covers the
   directory, so the CA key, node bootstrap keys, sockets and netns names read as ENOENT.
2. Every other mount becomes read-only (its nosuid/nodev/noexec/atime flags kept): a
   capability-less root still owns the host's root-owned files, so without this it could
   rewrite /usr/bin or /etc, or move itself to another cgroup through /sys/fs/cgroup.
3. /dev is a fresh tmpfs holding only null, zero, full, random, urandom, tty, a private devpts
   and /dev/shm (the host's block devices are owner-writable by uid 0), and the parts of /proc
   and /sys that runc makes read-only or masks are made so.
4. /tmp is a fresh tmpfs (the pod's own, as a container's), and ``--writable`` (the pod's
   working directory, carried into the new /tmp if it lies under /tmp) is bind-mounted
   read-write over itself and becomes the cwd, so the app's own files stay writable.
5. Volumes (``--volume SRC:DST``, the node agent's ServiceAccount token directory) are bound
   read-only (``:rw`` writable) at DST, under a fresh /run when DST is there (see ``volumes``),
   and ``--hosts FILE`` read-only over /etc/hosts (a kubelet manages every pod's /etc/hosts).

A privileged container (``--privileged [--hosts FILE]``, the node agent's for
securityContext.privileged, ztunnel's DaemonSet pod) keeps its capabilities, the host's /dev
and unmasked /proc and /sys, as runc gives one; its mounts follow the host's (rslave: netns
created later under /var/run/netns appear, as hostPath mountPropagation HostToContainer). It
gets its own root (a tmpfs of bind mounts of the host's top-level directories, entered with
chroot) so that hostPath mount points such as /host/proc can be made without touching the
host; then steps 1, 2 (but /dev), a fresh /tmp and /run, the volumes (hostPaths, recursively
and writable unless readOnly) and FILE bound over /etc/hosts (the node's Service names).

Stdlib only and no ``site`` (``-I -S``): it starts in ~15 ms and nothing from the host's
Python path runs while it is still privileged.  Any failure exits 126 with the step and errno
on stderr (the container log), before the workload's program has run: fail closed.
"""
import ctypes
import errno
from dataclasses import dataclass, field
import os
import stat
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 0x20, 0x400, 0x800, 0x1000
MS_REC, MS_PRIVATE, MS_SLAVE, MS_RELATIME, MS_STRICTATIME = 0x4000, 0x40000, 0x80000, 0x200000, 0x1000000
MNT_DETACH = 0x2
_KEEP = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
         "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
# runc's defaults (readonlyPaths / maskedPaths of a non-privileged container).
READONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
MASKED = ("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
          "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
          "/sys/firmware", "/sys/devices/virtual/powercap")
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9),
           ("tty", 5, 0))
_libc = ctypes.CDLL(None, use_errno=True)


class StepFailed(Exception):
    pass


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise StepFailed(f"{what}: {os.strerror(e)} (errno {e})")


def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    _check(_libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {fstype or src} on {target}")


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and len(s[i + 1:i + 4]) == 3 and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mounts() -> list[tuple[str, int]]:
    """(mount point, flags to keep on a remount) of this namespace, outermost first."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            flags = 0
            for opt in fields[5].split(","):
                flags |= _KEEP.get(opt, 0)
            out.append((_unescape(fields[4]), flags))
    return out


def under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def hide(root: str) -> None:
    for mp, _ in sorted(mounts(), key=lambda m: m[0].count("/"), reverse=True):
        if under(mp, root) and _libc.umount2(mp.encode(), MNT_DETACH) != 0:
            if ctypes.get_errno() != errno.EINVAL:  # EINVAL: gone with a detached parent
                _check(-1, f"detach {mp}")
    mount("tmpfs", root, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=4k")


def readonly_all(skip: tuple[str, ...] = ()) -> None:
    done = set()
    for mp, keep in mounts():
        if under(mp, "/proc") or mp in done or any(under(mp, s) for s in skip):
            continue  # /proc is this PID namespace's own; its sensitive parts follow below
        done.add(mp)
        mount(None, mp, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)


def private_dev() -> None:
    mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
    for name, major, minor in DEVICES:
        path = "/dev/" + name
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(path, 0o666)  # mknod's mode is masked by the umask
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                         ("ptmx", "pts/ptmx")):
        os.symlink(target, "/dev/" + name)
    os.mkdir("/dev/pts")
    mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
    os.mkdir("/dev/shm")
    os.chmod("/dev/shm", 0o1777)
    mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=64m")


def proc_and_sys() -> None:
    for path in READONLY:
        if os.path.exists(path):
            mount(path, path, None, MS_BIND | MS_REC)
            mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for path in MASKED:
        if os.path.isdir(path):
            mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=0")
        elif os.path.exists(path):
            mount("/dev/null", path, None, MS_BIND)


def private_tmp(work: str | None, keep_ro: list[str]) -> None:
    """A fresh /tmp, as a container's own. Carried over from the host's /tmp: the working
    directory, and read-only the `--keep` directories (the project and its interpreter, when a
    checkout lives under /tmp, as CI's clone may)."""
    carry = [(d, True) for d in keep_ro if under(d, "/tmp") and os.path.isdir(d)]
    if work and under(work, "/tmp"):
        carry.append((work, False))
    fds = [(os.open(d, os.O_PATH | os.O_DIRECTORY), d, ro) for d, ro in carry]
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for fd, d, ro in fds:
        os.makedirs(d, mode=0o755, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", d, None, MS_BIND)
        os.close(fd)
        if ro:
            mount(None, d, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def volumes(fds: list[tuple[int, str, bool]]) -> None:
    """The pod's volumes (``--volume SRC:DST``), read-only at DST: a fresh /run first when a
    DST lies under it (the pod's own, as a container's), so DST can be made without touching
    the host's. SRC was opened before the mesh's state was hidden (it lives there)."""
    if any(under(dst, "/run") for _, dst, _ in fds):
        mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for fd, dst, rw in fds:
        if not (under(dst, "/run") or under(dst, "/tmp")):
            raise StepFailed(f"volume {dst}: only under /run, /var/run or /tmp")
        os.makedirs(dst, mode=0o755, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", dst, None, MS_BIND)
        os.close(fd)
        mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | MS_NOEXEC | (0 if rw else MS_RDONLY))


def writable(path: str) -> None:
    mount(path, path, None, MS_BIND)
    mount(None, path, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
    os.chdir(path)  # the old cwd is the read-only mount's directory underneath


@dataclass
class Args:
    hidden: list[str] = field(default_factory=list)
    work: str | None = None
    keep: list[str] = field(default_factory=list)
    vols: list[tuple[str, str, bool]] = field(default_factory=list)
    """(source, destination, writable)."""
    hosts: str | None = None
    privileged: bool = False
    nxt: list[str] = field(default_factory=list)


def parse(argv: list[str]) -> Args:
    a, i = Args(), 0
    while i < len(argv) and argv[i] != "--":
        if argv[i] == "--privileged":
            a.privileged = True
            i += 1
            continue
        if argv[i] == "--hide":
            a.hidden.append(argv[i + 1])
        elif argv[i] == "--volume":
            parts = argv[i + 1].split(":")
            rw = len(parts) == 3 and parts[2] == "rw"
            if len(parts) == 3 and parts[2] in ("rw", "ro"):
                parts = parts[:2]
            if len(parts) != 2 or not all(os.path.isabs(x) for x in parts):
                raise StepFailed(f"--volume {argv[i + 1]!r}: expected /SRC:/DST[:rw|ro]")
            a.vols.append((parts[0], parts[1], rw))
        elif argv[i] == "--hosts":
            a.hosts = argv[i + 1]
        elif argv[i] == "--keep":
            a.keep.append(os.path.realpath(argv[i + 1]))
        elif argv[i] == "--writable":
            a.work = argv[i + 1]
        else:
            raise StepFailed(f"unknown option {argv[i]!r}")
        i += 2
    if i + 1 >= len(argv):
        raise StepFailed("no program after --")
    a.nxt = argv[i + 1:]
    return a


def bind(fd: int, dst: str, writable: bool, recursive: bool = False) -> None:
    mount(f"/proc/self/fd/{fd}", dst, None, MS_BIND | (MS_REC if recursive else 0))
    os.close(fd)
    if not writable:
        mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def privileged(a: Args) -> str:
    """A privileged container's mounts (see the module doc); returns the last step's name."""
    step = "making / a slave of the host's mounts"
    mount(None, "/", None, MS_REC | MS_SLAVE)  # hostPath mountPropagation HostToContainer
    step = "opening volumes"
    vols = [(os.open(src, os.O_PATH | (os.O_DIRECTORY if os.path.isdir(src) else 0)), os.path.realpath(dst), rw)
            for src, dst, rw in a.vols]
    hosts = os.open(a.hosts, os.O_PATH) if a.hosts else None
    carry = [(os.open(d, os.O_PATH | os.O_DIRECTORY), d) for d in a.keep if under(d, "/tmp") and os.path.isdir(d)]
    work = os.path.realpath(a.work) if a.work is not None else None
    if work and under(work, "/tmp"):
        raise StepFailed("a privileged container's working directory cannot be under /tmp")
    step = "building the container's root"
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")  # staging, unreachable later
    root = "/tmp/root"
    os.mkdir(root)
    for name in sorted(os.listdir("/")):
        src, dst = "/" + name, f"{root}/{name}"
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            os.mkdir(dst)
            if name not in ("tmp", "run"):  # the container's own, below
                mount(src, dst, None, MS_BIND | MS_REC)
    for _, dst, _ in vols:  # a mount point under a new top-level directory (/host/proc) is made now
        top = "/" + dst.strip("/").split("/")[0]
        if not os.path.lexists(top):
            os.makedirs(root + dst, exist_ok=True)
    step = "entering the container's root"
    os.chroot(root)
    os.chdir("/")
    for d in a.hidden:
        step = f"hiding {d}"
        d = os.path.realpath(d)
        if os.path.isdir(d):
            hide(d)
    step = "making the host read-only"
    readonly_all(skip=("/dev",))
    step = "a private /tmp and /run"
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for fd, d in carry:
        os.makedirs(d, mode=0o755, exist_ok=True)
        bind(fd, d, writable=False)
    for fd, dst, rw in vols:
        step = f"volume {dst}"
        if not os.path.exists(dst):
            if not (under(dst, "/run") or under(dst, "/tmp")):
                raise StepFailed(f"{dst} does not exist on this node (a new mount point can be made only "
                                 "under /run, /var/run, /tmp or a new top-level directory)")
            os.makedirs(dst, mode=0o755, exist_ok=True)
        bind(fd, dst, rw, recursive=True)  # recursive: the netns bind mounts below /var/run/netns
    if hosts is not None:
        step = "/etc/hosts"
        bind(hosts, "/etc/hosts", writable=False)
    if work is not None:
        step = f"a writable working directory {work}"
        writable(work)
    return step


def main(argv: list[str]) -> None:
    step = "arguments"
    try:
        a = parse(argv)
        if a.privileged:
            step = privileged(a)
        else:
            hidden, work, keep = a.hidden, a.work, a.keep
            step = "making / private"
            mount(None, "/", None, MS_REC | MS_PRIVATE)
            step = "opening volumes"
            vol_fds = [(os.open(src, os.O_PATH | os.O_DIRECTORY), os.path.realpath(dst), rw) for src, dst, rw in a.vols]
            hosts = os.open(a.hosts, os.O_PATH) if a.hosts else None
            for d in hidden:
                step = f"hiding {d}"
                d = os.path.realpath(d)
                if os.path.isdir(d):
                    hide(d)
            step = "making the host read-only"
            readonly_all()
            step = "a private /dev"
            private_dev()
            step = "masking /proc and /sys"
            proc_and_sys()
            work = os.path.realpath(work) if work is not None else None
            step = "a private /tmp"
            private_tmp(work, keep)
            if vol_fds:
                step = "volumes"
                volumes(vol_fds)
            if hosts is not None:
                step = "/etc/hosts"
                bind(hosts, "/etc/hosts", writable=False)
            if work is not None:
                step = f"a writable working directory {work}"
                writable(work)
        step = f"exec {a.nxt[0]}"
        os.execv(a.nxt[0], a.nxt)
    except (OSError, StepFailed, IndexError) as e:
        sys.stderr.write(f"contain: {step} failed, the container does not start: {e}\n")
        sys.stderr.flush()
        os._exit(126)


if __name__ == "__main__":
    main(sys.argv[1:])
