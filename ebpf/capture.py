"""eBPF traffic capture for ztunnel's in-pod mode: the API ztunnel calls (start/enroll/release).

Theory of operation
===================

ztunnel (one process per node, in its own cgroup ``<cg2>/<prefix>/ztunnel/<node>``) opens
three listeners *inside* every enrolled pod's network namespace: ``127.0.0.1:15001``
(outbound), ``0.0.0.0:15006`` (inbound plaintext) and ``0.0.0.0:15008`` (inbound HBONE).
Six eBPF programs steer the pod's TCP traffic onto them; no iptables rule exists anywhere::

    pod A (netns + cgroup)                                 pod B (netns + cgroup)
    app: connect(B:8080)                                   app listening on :8080
      |  cgroup/connect4|6 (pod A's cgroup)                  ^
      |   rewrite to 127.0.0.1:15001,                        | ztunnel dials B:8080 from A's
      |   pending[socket cookie] = B:8080                    | IP (IP_TRANSPARENT, mark 0x111):
      |  sock_ops ACTIVE_ESTABLISHED (pod A's cgroup)        | its sock_ops puts the 4-tuple in
      |   orig_dst[{netns A, 127.0.0.1, eph}] = B:8080       | ztunnel_dials, sk_lookup passes it
      v                                                      |
    ztunnel 127.0.0.1:15001 in A's netns          ztunnel 0.0.0.0:15006 / :15008 in B's netns
      | accept(); getsockopt(SO_ORIGINAL_DST)            ^ getsockname() == (B, 8080)
      |  -> cgroup/getsockopt (ztunnel's cgroup)         | sk_lookup (B's netns): SYN to B:8080
      |     answers from orig_dst                        |  -> inbound_listeners[{B, inbound}]
      v                                                  |     (:15008 -> [{B, hbone}])
      +---- HBONE / TCP, SO_MARK 0x539 -------------------+

Loop guards: ztunnel is in none of the pod cgroups, so connect4/6 never see its connects; its
sockets also carry ``SO_MARK`` ``mark``, which they skip.  Connects to 127/8 are never
redirected.  sk_lookup passes connections whose remote is the pod IP itself or 127/8, and
ztunnel's source-preserving dials recorded in ``ztunnel_dials`` by the sock_ops program on
ztunnel's cgroup (it cannot use the ingress interface: see the sk_lookup program).

Lifetimes.  Every program, map and link is pinned on bpffs, so it survives ztunnel::

    <pin_dir>/progs/{connect4,connect6,sockops,ztunnel_sockops,getsockopt,sk_lookup} + knobs
    <pin_dir>/maps/{pending,orig_dst,inbound_listeners,outbound_listeners,pods,ztunnel_dials,
                    counters}
    <pin_dir>/ztunnel/{getsockopt,ztunnel_sockops}-<cgroup id>
    <pin_dir>/pods/<sha256(uid)[:16]>/{connect4,connect6,sockops}-<cgroup id>,
                                      sk_lookup-<netns inode>

When ztunnel dies its listeners close and the kernel drops them from the SOCKHASHes, but the
pinned programs stay: with ``fail_open=False`` (default) new connections are refused
(connect4 still redirects to the dead 127.0.0.1:15001; sk_lookup returns SK_DROP for an
enrolled pod IP without listener), with ``fail_open=True`` they go directly, unproxied.
Connections already established are never touched by attaching, detaching or restarting.

Workers.  A node may run several ztunnel processes sharing each in-pod port with
SO_REUSEPORT.  Worker 0 (``Capture(worker=0)``, the owner) builds, attaches and releases as
above; every other worker (``worker=i``) only opens the pinned maps and puts its own listeners
in its slot of the listener SOCKHASHes (key ``{pod, kind, worker}``).  sk_lookup (and connect4
with FAIL_OPEN) takes the first slot present, and the kernel's reuseport selection behind
``bpf_sk_assign`` spreads connections over every live worker, so when one worker dies (its
entries leave the maps with its sockets) the others keep serving its pods: only the
connections it held are lost.  Links stay pinned, so worker 0 dying loses no capture either.

A restarted ztunnel builds ``Capture`` on the same ``pin_dir``: :meth:`Capture.start` reuses
the pinned maps and links (nothing is attached twice) and :meth:`Capture.enroll` with the new
listeners only refreshes the SOCKHASH entries.  The pins' names carry the target's cgroup id or
netns inode, so a pod recreated under the same uid gets fresh links and the stale ones go.
bcc never runs in ztunnel: :meth:`Capture.start` reuses the pinned programs when they were
built with the same knobs (``-D`` flags and sources, recorded in ``progs/knobs``), and
otherwise runs the short-lived build child ``python -m ebpf.build`` (bcc + LLVM) to compile,
load and pin them; ztunnel itself only makes raw ``bpf(2)`` calls (:mod:`ebpf.loader`).
After a rebuild (say ``fail_open`` changed) every pinned link is moved to the new program
with ``BPF_LINK_UPDATE``, atomically: no window without capture, nothing attached twice.
``pods`` records what is enrolled (uid, IP, netns cookie), so a restarted ztunnel can list and
release pods it no longer knows about.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import ipaddress
import os
import socket
import struct
import threading

from . import loader
from .loader import CaptureError, Programs
from .maps import CaptureMaps, PodRecord, max_workers

__all__ = ["Capture", "CaptureError", "teardown_pins", "original_dst", "SO_ORIGINAL_DST", "INBOUND_MARK",
           "netns_cookie", "pod_links"]

SO_ORIGINAL_DST = 80      # linux/netfilter_ipv4.h
INBOUND_MARK = 0x111      # SO_MARK of ztunnel's source-preserving dials (include/config.h)
SO_NETNS_COOKIE = 71      # asm-generic/socket.h (Linux >= 5.14)
SIOCGSKNS = 0x894C        # linux/sockios.h: fd of a socket's network namespace
_LINK_DIRS = ("ztunnel", "pods")
_MAX_PIN_WALK = 100_000   # bound on entries visited by teardown_pins


def netns_cookie(sock: socket.socket) -> int:
    """The netns cookie of a socket's network namespace (what the programs key on)."""
    return struct.unpack("Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]


def _uid_dir(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:16]


def _sock_netns_ino(sock: socket.socket) -> int:
    fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def _ino(path: str, reason: str, what: str) -> int:
    try:
        return os.stat(path).st_ino
    except OSError as e:
        raise CaptureError(reason, f"{what} {path!r}: {e.strerror}", e.errno or 0) from None


def _check_listener(sock: socket.socket, *, port: int, loopback: bool, netns_ino: int,
                    what: str) -> None:
    """The socket must be ztunnel's listener of that kind, inside the pod's netns."""
    if sock.family != socket.AF_INET or sock.type != socket.SOCK_STREAM:
        raise CaptureError("bad_listener", f"{what} listener must be an IPv4 TCP socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise CaptureError("bad_listener", f"{what} socket is not listening (call listen())")
    ip, got = sock.getsockname()
    if got != port or (loopback and not ip.startswith("127.")):
        raise CaptureError("bad_listener", f"{what} listener is bound to {ip}:{got}, expected "
                           f"{'127.0.0.1' if loopback else '0.0.0.0'}:{port}")
    if _sock_netns_ino(sock) != netns_ino:
        raise CaptureError("listener_wrong_netns", f"{what} listener is not in the pod's network "
                           "namespace: create it with mesh.linux.netns.socket_in_netns(<pod netns>)")


class Capture:
    """Attach, pin and feed the capture programs for one node's ztunnel (see module doc).

    Thread-safe; every method is blocking (a few bpf() syscalls; :meth:`start` may also run
    the build child, a few seconds), so async callers use ``asyncio.to_thread``.
    """

    def __init__(self, pin_dir: str, *, ztunnel_cgroup: str, mark: int = 0x539,
                 inbound_mark: int = INBOUND_MARK, fail_open: bool = False,
                 ports: tuple[int, int, int] = (15001, 15006, 15008), worker: int = 0):
        if not os.path.isabs(ztunnel_cgroup):
            raise CaptureError("bad_cgroup", f"ztunnel_cgroup must be absolute: {ztunnel_cgroup!r}")
        if not 0 <= int(worker) < max_workers():
            raise CaptureError("bad_config", f"worker {worker!r} out of range: a node has at most "
                               f"{max_workers()} ztunnel workers with capture (MAX_WORKERS)")
        self.worker = int(worker)
        self.owner = self.worker == 0
        """Worker 0 builds, attaches and releases; the others only fill their listener slots."""
        self._slots: dict[str, tuple[str, int]] = {}   # uid -> (pod ip, netns cookie) we put
        self.pin_dir = loader.check_pin_path(pin_dir.rstrip("/"))
        self.ztunnel_cgroup = ztunnel_cgroup
        self.mark = int(mark)
        self.inbound_mark = int(inbound_mark)
        self.fail_open = bool(fail_open)
        self.ports = tuple(int(p) for p in ports)
        if len(self.ports) != 3:
            raise CaptureError("bad_config", "ports is (outbound, inbound, hbone)")
        self._cflags = loader.cflags_for(maps_pin_dir=f"{self.pin_dir}/maps", ports=self.ports,
                                         mark=self.mark, fail_open=self.fail_open,
                                         inbound_mark=self.inbound_mark)
        self._lock = threading.RLock()
        self._progs: Programs | None = None
        self._maps: CaptureMaps | None = None
        self._links: dict[str, int] = {}   # pin path -> link fd (owned by self._progs)
        self.restarted = False
        """True if start() found the pins of a previous ztunnel and reused them."""
        self.built = False
        """True if start() had to build the programs (none pinned, or other knobs)."""

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Open the pinned programs (building them in the child process first if they are
        missing or were built with other knobs), open the pinned maps, reopen pinned pod links
        (moving them to the current programs if needed), and attach getsockopt to ztunnel's
        cgroup unless a pinned link already is.  A worker > 0 only opens the pinned maps; if
        worker 0 has not pinned them yet it raises ``no_such_map`` (enroll retries the start)."""
        with self._lock:
            if self._progs is not None:
                return
            if not self.owner:
                progs = Programs(self.pin_dir, self._cflags)
                try:
                    self._maps, self._progs = CaptureMaps(progs), progs
                except BaseException:
                    progs.close()
                    raise
                self.restarted = True
                return
            cg_id = _ino(self.ztunnel_cgroup, "bad_cgroup", "ztunnel cgroup")
            for sub in ("maps", *_LINK_DIRS):
                os.makedirs(f"{self.pin_dir}/{sub}", exist_ok=True)
            self.restarted = os.path.exists(f"{self.pin_dir}/maps/pods")
            progs = Programs(self.pin_dir, self._cflags)
            try:
                progs.load_all()
                self.built = progs.built
                self._progs, self._maps = progs, CaptureMaps(progs)
                for d in self._pod_dirs():
                    for name in sorted(os.listdir(d)):
                        self._reopen(f"{d}/{name}")
                own = {f"{self.pin_dir}/ztunnel/{name}-{cg_id}": name
                       for name in ("getsockopt", "ztunnel_sockops")}
                for name in os.listdir(f"{self.pin_dir}/ztunnel"):  # ztunnel moved cgroups
                    if f"{self.pin_dir}/ztunnel/{name}" not in own:
                        self._drop_link(f"{self.pin_dir}/ztunnel/{name}")
                for path, name in own.items():
                    self._ensure_link(path, lambda n=name: progs.attach_cgroup(
                        n, self.ztunnel_cgroup))
            except BaseException:
                self._links.clear()
                self._progs = self._maps = None
                progs.close()
                raise

    def close(self) -> None:
        """Process exit: close every fd but keep the pins, so capture keeps failing closed (or
        open) while ztunnel is down and a restarted one can take over.  Idempotent."""
        with self._lock:
            if self._progs is not None:
                self._progs.close()
            self._progs = self._maps = None
            self._links.clear()

    def teardown(self) -> None:
        """Remove everything: detach every link, unpin links and maps, delete pin_dir.
        Pods go back to direct traffic; established connections are unaffected."""
        with self._lock:
            for fd in self._links.values():
                try:
                    loader.link_detach(fd)
                except CaptureError:
                    pass  # teardown_pins below detaches through the pin as well
            self.close()
            teardown_pins(self.pin_dir)

    def __enter__(self) -> "Capture":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- pods --------------------------------------------------------------------------------
    def enroll(self, uid: str, *, cgroup: str, netns_path: str, pod_ip: str,
               outbound: socket.socket, inbound: socket.socket, hbone: socket.socket) -> None:
        """Capture the pod's traffic onto ztunnel's in-pod listeners.  Idempotent: a repeated
        call (e.g. by a restarted ztunnel with new listeners) only refreshes the SOCKHASH
        entries; links are attached once per (pod cgroup, pod netns)."""
        if not uid:
            raise CaptureError("bad_uid", "pod uid must not be empty")
        try:
            ip = str(ipaddress.IPv4Address(pod_ip))
        except ValueError:
            raise CaptureError("bad_pod_ip", f"pod_ip {pod_ip!r} is not an IPv4 address") from None
        if not os.path.isabs(cgroup) or not os.path.isfile(os.path.join(cgroup, "cgroup.procs")):
            raise CaptureError("bad_cgroup", f"{cgroup!r} is not an absolute cgroup v2 directory")
        cg_id = _ino(cgroup, "bad_cgroup", "pod cgroup")
        ns_ino = _ino(netns_path, "bad_netns", "pod netns")
        out_port, in_port, hbone_port = self.ports
        _check_listener(outbound, port=out_port, loopback=True, netns_ino=ns_ino, what="outbound")
        _check_listener(inbound, port=in_port, loopback=False, netns_ino=ns_ino, what="inbound")
        _check_listener(hbone, port=hbone_port, loopback=False, netns_ino=ns_ino, what="hbone")
        rec = PodRecord(uid=uid, pod_ip=ip, netns_cookie=netns_cookie(outbound),
                        netns_ino=ns_ino, cgroup_id=cg_id)
        with self._lock:
            if not self.owner:
                self._enroll_slot(uid, ip, rec.netns_cookie, outbound, inbound, hbone)
                return
            maps, progs = self._started()
            known = maps.pods()
            owner = next((u for u, r in known.items() if r.pod_ip == ip and u != uid), None)
            if owner is not None:
                raise CaptureError("pod_ip_in_use", f"pod IP {ip} is enrolled for pod {owner!r}: "
                                   "release it first")
            old = known.get(uid)
            try:
                if old is not None and (old.pod_ip, old.netns_cookie) != (ip, rec.netns_cookie):
                    self._forget(old)
                # Listeners before links: once sk_lookup is attached an enrolled pod IP
                # without listener is refused, so there must be no such window.
                maps.put_listener(ip, "inbound", inbound, 0)
                maps.put_listener(ip, "hbone", hbone, 0)
                maps.put_outbound(rec.netns_cookie, outbound, 0)
                maps.put_pod(rec)
                d = f"{self.pin_dir}/pods/{_uid_dir(uid)}"
                os.makedirs(d, exist_ok=True)
                want = {f"{d}/connect4-{cg_id}": lambda: progs.attach_cgroup("connect4", cgroup),
                        f"{d}/connect6-{cg_id}": lambda: progs.attach_cgroup("connect6", cgroup),
                        f"{d}/sockops-{cg_id}": lambda: progs.attach_cgroup("sockops", cgroup),
                        f"{d}/sk_lookup-{ns_ino}": lambda: progs.attach_netns("sk_lookup",
                                                                               netns_path)}
                for name in os.listdir(d):  # a previous cgroup/netns of the same uid
                    if f"{d}/{name}" not in want:
                        self._drop_link(f"{d}/{name}")
                for path, make in want.items():
                    self._ensure_link(path, make)
            except BaseException:
                if old is None:  # do not leave a half-enrolled new pod behind
                    try:
                        self._release_locked(uid)
                    except CaptureError:
                        pass     # the original error is the one worth reporting
                raise

    def release(self, uid: str) -> None:
        """Stop capturing the pod: detach and unpin its links, then drop its map entries.
        Established connections (proxied or direct) are unaffected.  Idempotent."""
        with self._lock:
            if not self.owner:
                self._release_slot(uid)
                return
            self._started()
            self._release_locked(uid)

    @property
    def link_count(self) -> int:
        """Link fds this process holds (one per attached hook): leak checks."""
        return len(self._links)

    def enrolled(self) -> list[str]:
        """Uids of the enrolled pods, including those a previous ztunnel enrolled."""
        with self._lock:
            maps, _ = self._started()
            return sorted(maps.pods())

    def stats(self) -> dict[str, int]:
        """Per-hook event counters since the maps were created (names from types.h)."""
        with self._lock:
            maps, _ = self._started()
            return maps.counters()

    def listener_slots(self) -> dict[str, list[int]]:
        """Pod IP -> the workers whose listeners sk_lookup can steer it to (diagnostics)."""
        with self._lock:
            maps, _ = self._started()
            return maps.listener_slots()

    def original_dst(self, sock: socket.socket) -> tuple[str, int]:
        """The destination the app connected to (see :func:`original_dst`)."""
        return original_dst(sock, ztunnel_cgroup=self.ztunnel_cgroup)

    # ---- internals ---------------------------------------------------------------------------
    def _enroll_slot(self, uid: str, ip: str, cookie: int, outbound: socket.socket,
                     inbound: socket.socket, hbone: socket.socket) -> None:
        """A worker > 0: put its listeners in its slots (worker 0 attaches the links)."""
        self.start()   # maps pinned by worker 0 meanwhile
        maps, _ = self._started()
        old = self._slots.get(uid)
        if old is not None and old != (ip, cookie):
            self._release_slot(uid)
        maps.put_listener(ip, "inbound", inbound, self.worker)
        maps.put_listener(ip, "hbone", hbone, self.worker)
        maps.put_outbound(cookie, outbound, self.worker)
        self._slots[uid] = (ip, cookie)

    def _release_slot(self, uid: str) -> None:
        old = self._slots.pop(uid, None)
        if old is None or self._maps is None:
            return
        ip, cookie = old
        self._maps.del_listener(ip, "inbound", self.worker)
        self._maps.del_listener(ip, "hbone", self.worker)
        self._maps.del_outbound(cookie, self.worker)

    def _started(self) -> tuple[CaptureMaps, Programs]:
        if self._progs is None or self._maps is None:
            raise CaptureError("not_started", "Capture.start() has not been called (or close() "
                               "was)")
        return self._maps, self._progs

    def _pod_dirs(self) -> list[str]:
        base = f"{self.pin_dir}/pods"
        return sorted(f"{base}/{n}" for n in os.listdir(base) if os.path.isdir(f"{base}/{n}"))

    def _reopen(self, path: str) -> None:
        """Take over a pinned link; if an earlier build's program runs in it, swap in ours."""
        assert self._progs is not None
        fd = self._links[path] = self._progs.adopt(loader.obj_get(path))
        name = os.path.basename(path).rpartition("-")[0]   # "<program>-<cgroup id|netns ino>"
        if name in loader.PROGRAMS:
            self._progs.sync_link(fd, name, path)

    def _ensure_link(self, path: str, make) -> None:
        """Reuse the link pinned at `path`, or attach a new one and pin it there."""
        assert self._progs is not None
        if path in self._links:
            return
        if os.path.exists(path):
            self._reopen(path)
            return
        fd = make()
        try:
            loader.obj_pin(fd, path)
        except BaseException:
            loader.link_detach(fd)
            self._progs.release_fd(fd)
            raise
        self._links[path] = fd

    def _drop_link(self, path: str) -> None:
        """Detach the link pinned at `path` (even if another process holds it) and unpin it."""
        assert self._progs is not None
        fd = self._links.pop(path, None)
        if fd is None and os.path.exists(path):
            fd = self._progs.adopt(loader.obj_get(path))
        if fd is not None:
            try:
                loader.link_detach(fd)
            finally:
                self._progs.release_fd(fd)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _forget(self, rec: PodRecord) -> None:
        """Drop the pod's map entries, every worker's slots included (a worker that died
        keeps none, but one that lags behind must not leave a stale slot for a reused IP)."""
        assert self._maps is not None
        for w in range(max_workers()):
            self._maps.del_listener(rec.pod_ip, "inbound", w)
            self._maps.del_listener(rec.pod_ip, "hbone", w)
            self._maps.del_outbound(rec.netns_cookie, w)
        self._maps.del_pod(rec.pod_ip)

    def _release_locked(self, uid: str) -> None:
        assert self._maps is not None
        d = f"{self.pin_dir}/pods/{_uid_dir(uid)}"
        if os.path.isdir(d):
            for name in sorted(os.listdir(d)):   # links first: no refusal window (see enroll)
                self._drop_link(f"{d}/{name}")
            os.rmdir(d)
        rec = self._maps.pods().get(uid)
        if rec is not None:
            self._forget(rec)


def original_dst(sock: socket.socket, *, ztunnel_cgroup: str = "") -> tuple[str, int]:
    """The destination the app connected to, for a socket ztunnel accepted on a pod's outbound
    listener.  Answered by the getsockopt program, which runs only for callers in the ztunnel
    cgroup; needs no loaded Capture, so every ztunnel worker of the node can ask."""
    if sock.family != socket.AF_INET or sock.type != socket.SOCK_STREAM:
        raise CaptureError("no_original_dst", f"only IPv4 TCP sockets are captured, got "
                           f"{sock.family!r}/{sock.type!r}", errno.EAFNOSUPPORT)
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError as e:
        raise CaptureError(
            "no_original_dst",
            f"no original destination for {_peer(sock)}: {e.strerror}; the socket was not "
            "accepted on a pod's outbound listener, or this process is not in the ztunnel "
            f"cgroup {ztunnel_cgroup or '(not given)'!r} (it is in {_own_cgroup()!r})",
            e.errno or errno.ENOENT) from None
    # struct sockaddr_in: sin_family in host order, then port and address in network order
    family = struct.unpack("=H", raw[:2])[0] if len(raw) >= 8 else -1
    port, addr = struct.unpack("!H", raw[2:4])[0] if len(raw) >= 8 else 0, raw[4:8]
    if family != socket.AF_INET:
        raise CaptureError("no_original_dst", f"SO_ORIGINAL_DST for {_peer(sock)} returned "
                           f"family {family}, expected AF_INET")
    return socket.inet_ntoa(addr), port


def _peer(sock: socket.socket) -> str:
    try:
        return "%s:%d" % sock.getpeername()[:2]
    except OSError:
        return "an unconnected socket"


def _own_cgroup() -> str:
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return "?"


def teardown_pins(pin_dir: str) -> None:
    """Remove a Capture's pins without a loaded Capture (crash cleanup, ``ambient down``):
    detach every pinned link (also if a hung ztunnel still holds it), then unpin links and
    maps and remove the directories.  Only ever touches `pin_dir`, which must be on bpffs."""
    pin_dir = pin_dir.rstrip("/")
    if not os.path.exists(pin_dir):
        return
    loader.check_pin_path(pin_dir)
    for sub in _LINK_DIRS:
        for root, _, files in _bounded_walk(f"{pin_dir}/{sub}"):
            for name in files:
                path = f"{root}/{name}"
                try:
                    fd = loader.obj_get(path)
                except CaptureError:
                    continue
                try:
                    loader.link_detach(fd)
                except CaptureError:
                    pass  # not a link after all: unpinning below is all it needs
                finally:
                    loader.close_fd(fd)
    for root, dirs, files in _bounded_walk(pin_dir, topdown=False):
        for name in files:
            os.unlink(f"{root}/{name}")
        for name in dirs:        # (a symlink, e.g. progs/knobs, is never a directory here)
            path = f"{root}/{name}"
            os.unlink(path) if os.path.islink(path) else os.rmdir(path)
    os.rmdir(pin_dir)


def _bounded_walk(top: str, topdown: bool = True):
    for i, entry in enumerate(os.walk(top, topdown=topdown, followlinks=False)):
        if i >= _MAX_PIN_WALK:
            raise CaptureError("pin_dir_too_large", f"{top!r} has more than {_MAX_PIN_WALK} "
                               "directories; refusing to walk further")
        yield entry


def pod_links(pin_dir: str, uid: str) -> list[str]:
    """Names of the links pinned for pod `uid` under a node's `pin_dir` (one per attached
    program: `connect4-<cgroup id>`, `connect6-<cgroup id>`, `sockops-<cgroup id>`,
    `sk_lookup-<netns inode>`)."""
    try:
        return sorted(os.listdir(os.path.join(pin_dir, "pods", _uid_dir(uid))))
    except OSError:
        return []
