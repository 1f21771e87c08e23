"""Starting and stopping the local cluster's processes (pod containers, ztunnels).

:func:`spawn` starts a program inside a cgroup and a network namespace.  Both are entered
*before* the program runs, so it, and everything it forks, is accounted to the right cgroup
from its first instruction (eBPF programs attached to the cgroup see its first connect()).

How: ``/bin/sh`` writes its own PID (``$$``, which the program keeps across ``exec``) into
``<cgroup>/cgroup.procs``, then ``exec nsenter --net=<netns path> -- argv...``, which calls
setns(2) and execs the program.  Why not the alternatives:

* ``ip netns exec`` remounts /sys for the child, and cgroupfs then appears empty inside it.
* A ``preexec_fn`` doing ctypes ``setns`` runs Python between fork and exec.  In a
  multi-threaded parent (the runner has threads) that can deadlock on locks held by other
  threads at fork time, and CPython documents preexec_fn as unsafe with threads.  The shell
  wrapper does its work in a fresh process image, and its failures land in the log file.
* Moving the PID into the cgroup from the parent after fork races with the program's start.

Pods are contained (``contain=`` a :class:`Containment`), as a container runtime contains a
container: after the cgroup and the netns, the argv chain is ::

    unshare --mount --pid --fork --kill-child --mount-proc --
      python3 -I -S localcluster/contain.py --hide DIR... [--writable CWD] --
        setpriv --reuid=U --regid=G --clear-groups --inh-caps=-all --ambient-caps=-all
                --bounding-set=-all --no-new-privs --
          /bin/sh -c INIT mesh-init argv...

``unshare`` gives the pod a private mount namespace and its own PID namespace (it cannot see,
signal or ptrace the runner, the ztunnels or other pods); ``contain.py`` hides the mesh's state
and makes the host read-only there (see its docstring); ``setpriv`` drops to the pod's
user/group with no capability in any set and no_new_privs, so setns(2), bpf(2), SO_MARK and
mounts are refused.  INIT is a few lines of shell, PID 1 of the pod, because PID 1 ignores
signals it has no handler for: it forwards SIGTERM/SIGINT/SIGHUP to the program and exits with
its status.  Each step either succeeds or exits non-zero before the program runs (fail closed).

The process gets a new session (``start_new_session=True``): it is not killed with the
terminal or the CLI that started the runner, and :func:`stop` can signal its whole process
group.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["SpawnError", "Containment", "spawn", "stop", "pod_argv"]

_WRAPPER = (
    'cg=$1 ns=$2 nsenter=$3; shift 3; '
    'if [ -n "$cg" ]; then echo $$ > "$cg/cgroup.procs" || '
    '{ echo "spawn: cannot join cgroup $cg" >&2; exit 126; }; fi; '
    'if [ -n "$ns" ]; then exec "$nsenter" --net="$ns" -- "$@"; fi; '
    'exec "$@"'
)

# PID 1 of a pod: it traps the signals (PID 1 drops those it has no handler for), the
# program gets the caller's stdin (an asynchronous list would get /dev/null), and `wait`
# returns early when a trapped signal arrives, so it loops until the program is gone.
_INIT = (
    'c=; for s in TERM INT HUP; do trap "[ -n \\"\\$c\\" ] && kill -$s \\$c" $s; done; '
    'exec 3<&0; "$@" <&3 3<&- & c=$!; exec 3<&-; '
    'while :; do wait "$c"; r=$?; kill -0 "$c" 2>/dev/null || exit $r; done'
)
_CONTAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "contain.py")


@dataclass(frozen=True, slots=True, kw_only=True)
class Containment:
    """How a pod's processes are contained: who they run as, and what they must not see."""

    uid: int = 0
    gid: int = 0
    hide: tuple[str, ...] = ()
    """Directories covered by an empty tmpfs (the mesh's state, /var/run/netns, /sys/fs/bpf)."""
    volumes: tuple[tuple[str, str], ...] = ()
    """(host directory, path in the pod) bound read-only (the ServiceAccount token's)."""
    writable_volumes: tuple[tuple[str, str], ...] = ()
    """(host directory, path in the pod) bound read-write (hostPath volumes not readOnly)."""
    privileged: bool = False
    """securityContext.privileged: capabilities kept, the host's /dev, its own root (contain.py)."""
    host_pid: bool = False
    """spec.hostPID: the node's PID namespace (no PID namespace of its own)."""
    hosts_file: str | None = None
    """Bound read-only over /etc/hosts: the node's Service names (the cluster-DNS stand-in)."""


class SpawnError(OSError):
    """The process could not be started (program, cgroup or netns missing)."""


def _resolve(prog: str, env: Mapping[str, str], cwd: str | None) -> str:
    if "/" in prog:
        path = prog if os.path.isabs(prog) else os.path.join(cwd or os.getcwd(), prog)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise SpawnError(f"program {prog!r} not found or not executable")
        return path
    found = shutil.which(prog, path=env.get("PATH", os.defpath))
    if found is None:
        raise SpawnError(f"program {prog!r} not found on PATH {env.get('PATH', os.defpath)!r}")
    return os.path.abspath(found)


def _tool(name: str) -> str:
    path = shutil.which(name, path=os.defpath + ":/usr/sbin:/sbin")
    if path is None:
        raise SpawnError(f"{name} (util-linux) is required to contain a pod")
    return path


# The project and its interpreter stay visible (read-only) if they live under /tmp, which the
# pod gets a private one of.
_KEEP = tuple(a for d in sorted({os.path.dirname(os.path.dirname(_CONTAIN)), sys.prefix,
                                 os.path.dirname(os.path.realpath(sys.executable))})
              for a in ("--keep", d))


def contain_argv(argv: Sequence[str], c: Containment, cwd: str | None) -> list[str]:
    """The part of the chain after the netns: namespaces, hidden state, user, capabilities."""
    hide = [a for d in c.hide for a in ("--hide", d)] + [a for src, dst in c.volumes for a in ("--volume", f"{src}:{dst}")]
    hide += [a for src, dst in c.writable_volumes for a in ("--volume", f"{src}:{dst}:rw")]
    init = ["/bin/sh", "-c", _INIT, "mesh-init", *argv]
    if c.privileged:
        # Mounts stay slaves of the host's (contain.py makes / rslave), so no private propagation.
        pid = () if c.host_pid else ("--pid", "--fork", "--kill-child", "--mount-proc")
        user = () if (c.uid, c.gid) == (0, 0) else (
            _tool("setpriv"), f"--reuid={c.uid}", f"--regid={c.gid}", "--clear-groups", "--")
        return [_tool("unshare"), "--mount", "--propagation", "unchanged", *pid, "--",
                sys.executable, "-I", "-S", _CONTAIN, "--privileged", *hide, *_KEEP,
                *(("--hosts", c.hosts_file) if c.hosts_file else ()), *(("--writable", cwd) if cwd else ()), "--",
                *user, *init]
    return [_tool("unshare"), "--mount", *(() if c.host_pid else ("--pid", "--fork", "--kill-child", "--mount-proc")),
            "--", sys.executable, "-I", "-S", _CONTAIN, *hide, *_KEEP, *(("--hosts", c.hosts_file) if c.hosts_file else ()),
            *(("--writable", cwd) if cwd else ()), "--",
            _tool("setpriv"), f"--reuid={c.uid}", f"--regid={c.gid}", "--clear-groups",
            "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
            *init]


def pod_argv(argv: Sequence[str], *, netns: str | None, cgroup: str | None,
             contain: Containment | None = None, cwd: str | None = None) -> list[str]:
    """The command line that runs `argv` inside `cgroup` and `netns` (what :func:`spawn` runs),
    for callers that exec it themselves, such as `ambient exec`.  With `contain`, `argv` runs
    contained and `cwd` (the caller's working directory for it) stays writable."""
    ns_path = ""
    if netns is not None:
        from mesh.linux.netns import netns_path
        ns_path = netns_path(netns)
    if contain is not None:
        argv = contain_argv(argv, contain, cwd)
    return ["/bin/sh", "-c", _WRAPPER, "mesh-spawn", cgroup or "", ns_path,
            shutil.which("nsenter") or "nsenter", *argv]


def spawn(argv: Sequence[str], *, netns: str | None, cgroup: str | None,
          env: Mapping[str, str], cwd: str | None, log_path: str,
          contain: Containment | None = None) -> subprocess.Popen:
    """Start `argv` inside `cgroup` (absolute path) and the named `netns`, in a new session,
    contained as a pod when `contain` is given (else with the caller's privileges).

    `env` is the complete environment of the program.  stdout and stderr are appended to
    `log_path`.  Either of `netns`/`cgroup` may be None to stay in the caller's.
    """
    if not argv:
        raise SpawnError("empty argv")
    prog = _resolve(argv[0], env, cwd)
    if cwd is not None and not os.path.isdir(cwd):
        raise SpawnError(f"working directory {cwd!r} does not exist")
    ns_path = ""
    if netns is not None:
        from mesh.linux.netns import netns_path  # local import: procs is usable without pyroute2
        ns_path = netns_path(netns)
        if not os.path.exists(ns_path):
            raise SpawnError(f"netns {netns!r} does not exist")
    if cgroup is not None and not os.path.isfile(os.path.join(cgroup, "cgroup.procs")):
        raise SpawnError(f"{cgroup!r} is not a cgroup directory")
    nsenter = shutil.which("nsenter")
    if netns is not None and nsenter is None:
        raise SpawnError("nsenter (util-linux) is required to enter a netns")
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    cmd = pod_argv([prog, *argv[1:]], netns=netns, cgroup=cgroup, contain=contain,
                   cwd=os.path.abspath(cwd) if cwd is not None else None)
    with open(log_path, "ab", buffering=0) as log:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(env), cwd=cwd, start_new_session=True, close_fds=True)


def _exited(pid: int) -> bool:
    """True once `pid` has exited.  Our own child is left as a zombie (WNOWAIT), which keeps
    its PID, and so its process-group ID, from being reused until it is reaped."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        pass  # not our child: look at /proc
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


def _signal(pid: int, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def stop(proc: subprocess.Popen | int, timeout: float = 3.0, sig: int = signal.SIGTERM) -> int | None:
    """SIGTERM (or `sig`) the process (its whole process group if it leads one), SIGKILL after `timeout`.

    Once the leader has exited, members of its group still running get SIGKILL too.  Returns
    the exit code when `proc` is a Popen, else None.  Bounded: waits at most `timeout`
    seconds, plus one second after SIGKILL.
    """
    popen = proc if isinstance(proc, subprocess.Popen) else None
    pid = popen.pid if popen is not None else int(proc)
    if popen is not None and popen.returncode is not None:
        return popen.returncode
    if not _exited(pid):
        group = _leads_group(pid)
        for s, limit in ((sig, timeout), (signal.SIGKILL, 1.0)):
            _signal(pid, s, group)
            deadline = time.monotonic() + limit
            while not _exited(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _exited(pid):
                break
        else:
            return None  # still alive after SIGKILL (uninterruptible sleep); caller may retry
        if group:  # the unreaped leader still reserves the PID, so this hits only its group
            _signal(pid, signal.SIGKILL, True)
    if popen is not None:
        return popen.wait(timeout=1.0)
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
    except ChildProcessError:
        pass
    return None
