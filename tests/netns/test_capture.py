"""Root tests of the eBPF capture (ebpf.capture) on a real simulated node: 1 node, 3 pods.

A stand-in ztunnel (capture_roles.py, spawned into the node's ztunnel cgroup and netns) owns
the Capture object and in-pod listeners and proxies what lands on them; pod apps and clients
run inside their pod's cgroup and netns.  pods 1 and 2 get enrolled, pod 3 never is.  Each
test uses its own pin dir; finalizers remove pins, processes, namespaces and cgroups, also on
failure, and the module ends by checking that nothing of it is left (bpftool, bpffs, netns).
"""
from __future__ import annotations

import itertools
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mesh.linux import cgroup, netns
from ebpf import loader
from ebpf.capture import Capture, CaptureError, teardown_pins
from localcluster import procs
from localcluster.addressing import ClusterAddressing
from localcluster.network import ClusterNetwork, PodNet

pytestmark = pytest.mark.root

ROLES = str(Path(__file__).with_name("capture_roles.py"))
APP_PORT = 8080
POD_HOOKS = ["cgroup_inet4_connect", "cgroup_inet6_connect", "cgroup_sock_ops"]
ZTUNNEL_HOOKS = ["cgroup_getsockopt", "cgroup_sock_ops"]
_seq = itertools.count()


def bpftool(*args: str):
    out = subprocess.run(["bpftool", "-j", *args], check=True, capture_output=True, text=True,
                         timeout=10).stdout
    return json.loads(out.strip() or "[]")


class Proc:
    """A role process with JSON lines on stdin/stdout (see capture_roles.py)."""

    def __init__(self, argv: list[str], *, netns_name: str, cg: str, log: Path):
        self.log = log
        self.popen = subprocess.Popen(procs.pod_argv(argv, netns=netns_name, cgroup=cg),
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=open(log, "ab"), text=True, start_new_session=True)
        self.replies: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            msg = json.loads(line)
            if "event" in msg:
                self.events.append(msg)
            else:
                self.replies.put(msg)

    def call(self, op: str, timeout: float = 30, **kw) -> dict:
        self.popen.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.popen.stdin.flush()
        try:
            reply = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no reply to {op} in {timeout}s; stderr: "
                                 f"{self.log.read_text()[-2000:]}") from None
        assert reply["reply"] == op, reply
        return reply

    def ok(self, op: str, **kw) -> dict:
        reply = self.call(op, **kw)
        assert reply["ok"], (reply, self.log.read_text()[-2000:])
        return reply

    def wait_events(self, n: int, timeout: float = 5.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.events) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.events)

    def kill(self) -> None:
        procs.stop(self.popen.pid, timeout=0.5)
        try:
            self.popen.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class Env:
    prefix: str
    tmp: Path
    net: ClusterNetwork
    node_netns: str = ""
    ztunnel_cg: str = ""
    pods: dict[str, PodNet] = field(default_factory=dict)
    clients: dict[str, Proc] = field(default_factory=dict)
    procs: list = field(default_factory=list)

    def ztunnel(self, pin_dir: str, fail_open: bool = False, worker: int = 0,
                preserve_source: bool = False) -> Proc:
        argv = [sys.executable, ROLES, "ztunnel", pin_dir, self.ztunnel_cg, "--worker", str(worker)]
        argv += (["--fail-open"] if fail_open else []) + (["--preserve-source"] if preserve_source else [])
        z = Proc(argv, netns_name=self.node_netns,
                 cg=self.ztunnel_cg, log=self.tmp / f"ztunnel-{next(_seq)}.log")
        self.procs.append(z)
        return z

    def enroll(self, z: Proc, name: str) -> None:
        p = self.pods[name]
        z.ok("enroll", uid=p.uid, netns=p.netns, netns_path=p.netns_path, cgroup=p.cgroup,
             ip=str(p.pod_ip))

    def request(self, src: str, dst_ip: str, port: int = APP_PORT, *, mark: bool = False,
                data: str = "hi", family: int = 4) -> dict:
        """One connection from pod `src`'s client process: connect, send, read, close."""
        c = self.clients[src]
        cid = f"r{next(_seq)}"
        r = c.ok("connect", id=cid, ip=dst_ip, port=port, mark=mark, family=family)
        if not r["connected"]:
            return r
        r["data"] = c.ok("send", id=cid, data=data)["data"]
        c.ok("close", id=cid)
        return r

    def ip(self, name: str) -> str:
        return str(self.pods[name].pod_ip)


def _link_targets(env: Env) -> tuple[set[int], set[int]]:
    cgs = {os.stat(p.cgroup).st_ino for p in env.pods.values()} | {os.stat(env.ztunnel_cg).st_ino}
    nss = {os.stat(p.netns_path).st_ino for p in env.pods.values()}
    return cgs, nss


def our_links(env: Env) -> list[dict]:
    cgs, nss = _link_targets(env)
    return [lk for lk in bpftool("link", "list")
            if lk.get("cgroup_id") in cgs or lk.get("netns_ino") in nss]


def cgroup_progs(path: str) -> list[str]:
    return sorted(p["attach_type"] for p in bpftool("cgroup", "show", path))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    prefix = f"amb-cap{os.getpid()}"
    net = ClusterNetwork(prefix)
    e = Env(prefix=prefix, tmp=tmp_path_factory.mktemp("capture"), net=net)
    try:
        addr = ClusterAddressing()
        node = addr.add_nodes([("node-a", None)])[0]
        nn = net.add_node(node.name, node.ip, node.pod_cidr, addr.routes_for(node.name))
        e.node_netns, e.ztunnel_cg = nn.netns, nn.cgroup
        for name in ("p1", "p2", "p3"):
            uid = f"uid-{name}-{prefix}"
            e.pods[name] = net.add_pod("node-a", uid, addr.allocate_pod(uid, "node-a"),
                                       node.pod_cidr)
        for name, p in e.pods.items():
            log = e.tmp / f"app-{name}.log"
            e.procs.append(procs.spawn([sys.executable, ROLES, "app", name, str(APP_PORT), "600"],
                                       netns=p.netns, cgroup=p.cgroup, env={"PATH": os.defpath},
                                       cwd=str(e.tmp), log_path=str(log)))
            deadline = time.monotonic() + 10
            while "listening" not in (log.read_text() if log.exists() else ""):
                assert time.monotonic() < deadline, f"app {name} did not start"
                time.sleep(0.05)
            e.clients[name] = Proc([sys.executable, ROLES, "client", "600"], netns_name=p.netns,
                                   cg=p.cgroup, log=e.tmp / f"client-{name}.log")
            e.procs.append(e.clients[name])
        yield e
        # (g) module end: nothing of ours attached anywhere
        assert our_links(e) == []
        for p in [*e.pods.values()]:
            assert cgroup_progs(p.cgroup) == []
        assert cgroup_progs(e.ztunnel_cg) == []
    finally:
        for p in e.procs:
            if isinstance(p, Proc):
                p.kill()
            else:
                procs.stop(p, timeout=0.5)
        net.teardown()
        assert netns.list_netns(prefix + "-") == []
        assert not os.path.exists(os.path.join(cgroup.cgroup2_root(), prefix))


@pytest.fixture
def pin_dir(env):
    path = f"/sys/fs/bpf/{env.prefix}-{next(_seq)}"
    yield path
    for p in env.procs:                   # stand-in ztunnels of this test
        if isinstance(p, Proc) and p not in env.clients.values():
            p.kill()
    teardown_pins(path)
    assert not os.path.exists(path)
    assert our_links(env) == []


def assert_direct(env: Env, src: str, dst: str) -> None:
    r = env.request(src, env.ip(dst))
    assert r["connected"], r
    assert r["peer"] == [env.ip(dst), APP_PORT]
    assert r["data"].startswith(f"{dst} local={env.ip(dst)}:{APP_PORT} peer={env.ip(src)}:")


# ---- tests -----------------------------------------------------------------------------------

def test_outbound_inbound_and_exclusions(env, pin_dir):
    z = env.ztunnel(pin_dir)
    assert z.ok("start")["restarted"] is False
    for name in ("p1", "p2"):
        env.enroll(z, name)
    assert z.ok("enrolled")["enrolled"] == sorted(env.pods[n].uid for n in ("p1", "p2"))
    ip1, ip2, ip3 = env.ip("p1"), env.ip("p2"), env.ip("p3")

    # (a) outbound: p1 -> p2:8080 lands on 127.0.0.1:15001 in p1's netns, original dst known;
    # ztunnel's dial to p2 is steered into p2's 15006; its hop to p2's app is not re-captured
    r = env.request("p1", ip2, data="via-mesh")
    assert r["peer"] == ["127.0.0.1", 15001]          # what the app's getpeername() shows
    assert r["data"].startswith(f"p2 local={ip2}:{APP_PORT} peer={ip2}:")
    assert r["data"].endswith("| via-mesh")
    ev = z.wait_events(2)
    out = [e for e in ev if e["event"] == "outbound"]
    inb = [e for e in ev if e["event"] == "inbound"]
    assert len(out) == 1 and len(inb) == 1, ev
    assert out[0]["uid"] == env.pods["p1"].uid and out[0]["orig"] == [ip2, APP_PORT]
    assert out[0]["local"] == ["127.0.0.1", 15001] and out[0]["peer"] == r["local"]
    assert inb[0]["uid"] == env.pods["p2"].uid and inb[0]["local"] == [ip2, APP_PORT]
    assert inb[0]["peer"][0] == ip1

    # p1 -> p3:8080: p3 is not enrolled, but p1's outbound is captured all the same
    r = env.request("p1", ip3, data="to-p3")
    assert r["peer"] == ["127.0.0.1", 15001]
    assert r["data"].startswith(f"p3 local={ip3}:{APP_PORT} peer={ip1}:")
    ev = z.wait_events(3)
    assert ev[-1]["event"] == "outbound" and ev[-1]["orig"] == [ip3, APP_PORT]

    # not captured: 127.0.0.1 inside the pod, and a socket carrying ztunnel's mark
    n = len(z.events)
    r = env.request("p1", "127.0.0.1")
    assert r["peer"] == ["127.0.0.1", APP_PORT] and r["data"].startswith("p1 local=127.0.0.1:8080")
    r = env.request("p1", ip3, mark=True)
    assert r["peer"] == [ip3, APP_PORT] and f"peer={ip1}:" in r["data"]
    time.sleep(0.2)
    assert len(z.events) == n

    # (b) inbound from outside the mesh (pod 3's netns, not enrolled): :8080 lands on 15006
    # with getsockname() == (pod ip, 8080); :15008 lands on the HBONE listener
    with netns.socket_in_netns(env.pods["p3"].netns) as s:
        s.settimeout(5)
        s.connect((ip2, APP_PORT))
        s.sendall(b"inbound")
        assert s.recv(4096).decode().startswith(f"p2 local={ip2}:{APP_PORT} peer={ip2}:")
    with netns.socket_in_netns(env.pods["p3"].netns) as s:
        s.settimeout(5)
        s.connect((ip2, 15008))
        s.sendall(f"CONNECT {ip2}:{APP_PORT}\nhbone-data".encode())
        assert s.recv(4096).decode().startswith(f"p2 local={ip2}:{APP_PORT} peer={ip2}:")
    ev = z.wait_events(n + 2)[n:]
    assert ev[0]["event"] == "inbound" and ev[0]["local"] == [ip2, APP_PORT]
    assert ev[0]["peer"][0] == ip3
    assert ev[1]["event"] == "hbone" and ev[1]["local"] == [ip2, 15008]
    assert ev[1]["target"] == [ip2, APP_PORT]
    assert not [e for e in z.events if e["event"].endswith("_error")], z.events

    # (c) pod 3 is untouched: its outbound is direct, nothing attached to it
    r = env.request("p3", ip2)
    assert r["peer"] == [ip2, APP_PORT]                 # no outbound capture in p3
    assert cgroup_progs(env.pods["p3"].cgroup) == []
    p3_ns = os.stat(env.pods["p3"].netns_path).st_ino
    assert not [lk for lk in bpftool("link", "list") if lk.get("netns_ino") == p3_ns]

    stats = z.ok("stats")["stats"]
    assert stats["connect_redirected"] == 2 and stats["sockops_rekeyed"] == 2
    assert stats["getsockopt_answered"] == 2 and stats["connect_skip_mark"] == 1
    assert stats["connect_skip_local"] >= 1
    assert stats["sklookup_inbound"] == 3 and stats["sklookup_hbone"] == 1
    assert stats["sklookup_skip_local"] >= 4           # ztunnel's hops to the apps
    assert stats["sklookup_no_listener"] == 0

    # original_dst on a socket that was never captured: stable reason
    assert z.ok("original_dst_of_unrelated")["reason"] == "no_original_dst"
    z.ok("teardown")


def test_dual_stack_connects_are_captured_and_pure_ipv6_refused(env, pin_dir):
    """An AF_INET6 socket connecting to a v4-mapped address (grpcio does) runs connect6, not
    connect4: captured exactly like IPv4. The mesh is IPv4-only: other IPv6 is refused."""
    z = env.ztunnel(pin_dir)
    z.ok("start")
    env.enroll(z, "p1")
    env.enroll(z, "p2")
    ip1, ip2 = env.ip("p1"), env.ip("p2")
    r = env.request("p1", f"::ffff:{ip2}", family=6, data="dual-stack")
    assert r["peer"][:2] == ["::ffff:127.0.0.1", 15001], r   # redirected like connect4
    assert r["data"].startswith(f"p2 local={ip2}:{APP_PORT} peer={ip2}:") and r["data"].endswith("| dual-stack")
    ev = z.wait_events(2)
    out = [e for e in ev if e["event"] == "outbound"]
    assert len(out) == 1 and out[0]["orig"] == [ip2, APP_PORT], ev
    assert out[0]["peer"] == ["127.0.0.1", r["local"][1]]   # IPv4 on the wire
    # pod-local stays pod-local over IPv6 too (nothing listens on [::1]:8080: refused by the
    # kernel, not by the hook); a v4-mapped 127.0.0.1 is the app itself
    assert env.request("p1", "::1", family=6)["errno"] == "ECONNREFUSED"
    r = env.request("p1", "::ffff:127.0.0.1", family=6)
    assert r["peer"][:2] == ["::ffff:127.0.0.1", APP_PORT] and r["data"].startswith("p1 local=127.0.0.1")
    # pure IPv6 off the pod: EPERM from the hook, whatever the address
    for dst in ("fd00::1", "fe80::1%eth0", "2001:db8::5"):
        assert env.request("p1", dst, family=6)["errno"] == "EPERM", dst
    # an AF_INET6 client in a pod that is not enrolled is untouched (nothing attached)
    r = env.request("p3", f"::ffff:{ip1}", family=6)
    assert r["peer"][:2] == [f"::ffff:{ip1}", APP_PORT], r
    stats = z.ok("stats")["stats"]
    assert stats["connect6_mapped"] == 1 and stats["connect6_refused"] == 3
    assert stats["connect_redirected"] == 1 and stats["sockops_rekeyed"] == 1
    assert stats["getsockopt_answered"] == 1
    z.ok("teardown")


def test_source_preserving_dial_reaches_the_app_and_is_not_recaptured(env, pin_dir):
    """ztunnel dials the app from the client's IP (IP_TRANSPARENT, mark 0x111): sk_lookup
    passes exactly that dial (ztunnel_dials, written by ztunnel's sock_ops) and the pod
    netns routes the app's replies back over lo; a connection from the network with the
    same addresses is still steered to ztunnel."""
    z = env.ztunnel(pin_dir, preserve_source=True)
    z.ok("start")
    env.enroll(z, "p2")
    ip2, ip3 = env.ip("p2"), env.ip("p3")
    with netns.socket_in_netns(env.pods["p3"].netns) as s:
        s.settimeout(5)
        s.connect((ip2, APP_PORT))
        s.sendall(b"keep-source")
        got = s.recv(4096).decode()
    assert got.startswith(f"p2 local={ip2}:{APP_PORT} peer={ip3}:"), got   # the client's IP
    time.sleep(0.2)
    assert [e["event"] for e in z.events] == ["inbound"], z.events         # no loop
    # a dial to a port nobody serves fails cleanly and leaves no entry behind
    with netns.socket_in_netns(env.pods["p3"].netns) as s:
        s.settimeout(5)
        s.connect((ip2, 9999))
        s.settimeout(2)
        assert s.recv(100) == b""
    ev = z.wait_events(3)
    assert ev[-1]["event"] == "dial_error" and ev[-1]["errno"] == "ECONNREFUSED", ev
    stats = z.ok("stats")["stats"]
    assert stats["ztunnel_dial_recorded"] == 2 and stats["sklookup_ztunnel_dial"] == 2, stats
    assert stats["sklookup_inbound"] == 2
    assert bpftool("map", "dump", "pinned", f"{pin_dir}/maps/ztunnel_dials") == []
    z.ok("teardown")


def test_pod_netns_reflects_the_dial_mark_for_ztunnels_loop_guard(env):
    """What ztunnel's loop guard (mesh.proxy.sockets.is_own_dial) relies on: in a pod netns an
    unmarked listener's accepted socket shows its SYN's mark (tcp_fwmark_accept), so one of
    ztunnel's own 0x111 dials steered back to its 15006 is recognised, a pod's is not."""
    from mesh.proxy.sockets import INBOUND_MARK, is_own_dial
    with netns.socket_in_netns(env.pods["p2"].netns) as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(4)
        seen = []
        for mark in (INBOUND_MARK, 0):
            with netns.socket_in_netns(env.pods["p2"].netns) as c:
                if mark:
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
                c.settimeout(5)
                c.connect(ls.getsockname())
                a, _ = ls.accept()
                with a:
                    seen.append(is_own_dial(a))
    assert seen == [True, False]


def test_release_and_established_connections(env, pin_dir):
    ip1, ip2 = env.ip("p1"), env.ip("p2")
    c = env.clients["p1"]
    # a direct connection made before enrollment survives it
    assert c.ok("connect", id="before", ip=ip2, port=APP_PORT)["peer"] == [ip2, APP_PORT]
    z = env.ztunnel(pin_dir)
    z.ok("start")
    env.enroll(z, "p1")
    env.enroll(z, "p2")
    env.enroll(z, "p1")                                   # idempotent
    reply = c.ok("send", id="before", data="x")["data"]
    assert reply.startswith(f"p2 local={ip2}:8080 peer={ip1}:")
    # a captured connection made before release survives it
    r = c.ok("connect", id="captured", ip=ip2, port=APP_PORT)
    assert r["peer"] == ["127.0.0.1", 15001]
    reply = c.ok("send", id="captured", data="1")["data"]
    assert reply.startswith(f"p2 local={ip2}:8080 peer={ip2}:")
    assert len(cgroup_progs(env.pods["p1"].cgroup)) == 3

    z.ok("release", uid=env.pods["p1"].uid)
    z.ok("release", uid=env.pods["p2"].uid)
    z.ok("release", uid=env.pods["p2"].uid)               # idempotent
    assert z.ok("enrolled")["enrolled"] == []
    assert cgroup_progs(env.pods["p1"].cgroup) == [] == cgroup_progs(env.pods["p2"].cgroup)
    assert sorted(lk["attach_type"] for lk in our_links(env)) == ZTUNNEL_HOOKS
    assert not os.listdir(f"{pin_dir}/pods")

    assert c.ok("send", id="captured", data="2")["data"].endswith("| 2")
    assert c.ok("send", id="before", data="3")["data"].endswith("| 3")
    c.ok("close", id="captured")
    c.ok("close", id="before")
    n = len(z.events)
    assert_direct(env, "p1", "p2")                        # traffic direct again
    time.sleep(0.2)
    assert len(z.events) == n
    z.ok("teardown")


@pytest.mark.parametrize("fail_open", [False, True])
def test_ztunnel_crash_fail_closed_or_open(env, pin_dir, fail_open):
    ip2 = env.ip("p2")
    z = env.ztunnel(pin_dir, fail_open=fail_open)
    z.ok("start")
    env.enroll(z, "p1")
    env.enroll(z, "p2")
    assert env.request("p1", ip2)["peer"] == ["127.0.0.1", 15001]
    os.kill(z.popen.pid, signal.SIGKILL)                  # ztunnel dies, pins stay
    z.popen.wait(timeout=5)
    assert os.listdir(f"{pin_dir}/pods") and len(our_links(env)) == 10

    out = env.request("p1", ip2)
    with netns.socket_in_netns(env.pods["p3"].netns) as s:
        s.settimeout(5)
        try:
            s.connect((ip2, APP_PORT))
            inbound = "connected"
        except OSError as e:
            inbound = type(e).__name__
    if fail_open:
        assert out["connected"] and out["peer"] == [ip2, APP_PORT], out
        assert inbound == "connected"
    else:
        assert out == {"reply": "connect", "ok": True, "connected": False,
                       "errno": "ECONNREFUSED"}, out
        assert inbound == "ConnectionRefusedError"
    # crash cleanup without a loaded Capture
    teardown_pins(pin_dir)
    assert not os.path.exists(pin_dir) and our_links(env) == []
    assert_direct(env, "p1", "p2")


@pytest.mark.parametrize("fail_open", [False, True])
def test_any_live_worker_serves_every_pod_when_another_dies(env, pin_dir, fail_open):
    """Two workers share the in-pod ports; each is in its own slot of the listener maps, so
    killing either one (worker 0 too) leaves the other serving both directions, and only
    with both dead does capture fail closed (or, with fail_open, let traffic go direct)."""
    ip1, ip2 = env.ip("p1"), env.ip("p2")
    z0 = env.ztunnel(pin_dir, fail_open=fail_open, worker=0)
    z1 = env.ztunnel(pin_dir, fail_open=fail_open, worker=1)
    assert z1.call("enroll", uid=env.pods["p1"].uid, netns=env.pods["p1"].netns,
                   netns_path=env.pods["p1"].netns_path, cgroup=env.pods["p1"].cgroup,
                   ip=ip1)["reason"] == "no_such_map"    # before worker 0 pinned anything
    z0.ok("start")
    for z in (z0, z1):
        env.enroll(z, "p1")
        env.enroll(z, "p2")
    assert z0.ok("slots")["slots"] == {ip1: [0, 1], ip2: [0, 1]}
    assert len(our_links(env)) == 10                      # worker 1 attached nothing

    def served_by(z: Proc, n: int) -> None:
        before = len(z.events)
        for i in range(n):   # outbound from p1 (15001) and inbound to p2 (15006), both captured
            r = env.request("p1", ip2, data=f"w{i}")
            assert r.get("peer") == ["127.0.0.1", 15001], r
            assert r["data"].startswith(f"p2 local={ip2}:{APP_PORT} peer={ip2}:"), r
        assert len(z.wait_events(before + 2 * n)) >= before + 2 * n

    def kill(z: Proc) -> None:
        os.kill(z.popen.pid, signal.SIGKILL)              # the worker dies; its slots go
        z.popen.wait(timeout=5)

    kill(z1)
    assert z0.ok("slots")["slots"] == {ip1: [0], ip2: [0]}
    served_by(z0, 4)
    z1 = env.ztunnel(pin_dir, fail_open=fail_open, worker=1)   # worker 1 restarted
    env.enroll(z1, "p1")
    env.enroll(z1, "p2")
    kill(z0)                                              # worker 0, which attached the links
    assert z1.ok("slots")["slots"] == {ip1: [1], ip2: [1]}
    served_by(z1, 4)
    with netns.socket_in_netns(env.pods["p3"].netns) as s:   # inbound from outside the mesh
        s.settimeout(5)
        s.connect((ip2, APP_PORT))
        s.sendall(b"from-p3")
        assert s.recv(4096).decode().startswith(f"p2 local={ip2}:{APP_PORT} peer={ip2}:")
    kill(z1)                                              # now no worker is left
    r = env.request("p1", ip2)
    if fail_open:
        assert r["connected"] and r["peer"] == [ip2, APP_PORT], r
    else:
        assert r == {"reply": "connect", "ok": True, "connected": False,
                     "errno": "ECONNREFUSED"}, r
    teardown_pins(pin_dir)


def test_restart_reuses_pins_without_double_attachment(env, pin_dir):
    ip2 = env.ip("p2")
    a = env.ztunnel(pin_dir)
    a.ok("start")
    env.enroll(a, "p1")
    env.enroll(a, "p2")
    assert env.request("p1", ip2)["peer"] == ["127.0.0.1", 15001]
    a.ok("close")                                         # graceful exit: fds closed, pins kept
    a.popen.wait(timeout=5)
    assert env.request("p1", ip2)["errno"] == "ECONNREFUSED"   # fail-closed while down

    b = env.ztunnel(pin_dir)
    started = b.ok("start")
    assert started["restarted"] is True
    assert started["enrolled"] == sorted(env.pods[n].uid for n in ("p1", "p2"))
    env.enroll(b, "p1")
    env.enroll(b, "p2")
    r = env.request("p1", ip2, data="after-restart")
    assert r["peer"] == ["127.0.0.1", 15001]
    assert r["data"].startswith(f"p2 local={ip2}:8080 peer={ip2}:")
    ev = b.wait_events(2)
    assert [e["event"] for e in ev] == ["outbound", "inbound"] and ev[0]["orig"] == [ip2, 8080]
    assert not a.events[2:]                               # the old one saw nothing new

    for name in ("p1", "p2"):
        assert cgroup_progs(env.pods[name].cgroup) == POD_HOOKS
    assert cgroup_progs(env.ztunnel_cg) == ZTUNNEL_HOOKS
    links = our_links(env)
    assert sorted(lk["attach_type"] for lk in links) == sorted(ZTUNNEL_HOOKS + (POD_HOOKS + ["sk_lookup"]) * 2)
    nss = {os.stat(env.pods[n].netns_path).st_ino for n in ("p1", "p2")}
    assert {lk["netns_ino"] for lk in links if lk["attach_type"] == "sk_lookup"} == nss
    assert b.ok("stats")["stats"]["connect_redirected"] == 3   # counters survive restarts

    # (g) teardown removes every link, program attachment and pin
    b.ok("teardown")
    b.popen.wait(timeout=5)
    assert not os.path.exists(pin_dir)
    assert our_links(env) == []
    for p in env.pods.values():
        assert cgroup_progs(p.cgroup) == []
    assert cgroup_progs(env.ztunnel_cg) == []
    assert_direct(env, "p1", "p2")


def _pinned_prog_ids(pin_dir: str) -> dict[str, int]:
    return {name: bpftool("prog", "show", "pinned", f"{pin_dir}/progs/{name}")["id"]
            for name in loader.PROGRAMS}


def test_changed_knobs_rebuild_and_move_every_link(env, pin_dir):
    """A restart with another fail_open builds new programs (in the build child) and moves
    each pinned link to them with BPF_LINK_UPDATE: same links, new programs, none doubled."""
    ip2 = env.ip("p2")
    a = env.ztunnel(pin_dir)
    a.ok("start")
    env.enroll(a, "p1")
    env.enroll(a, "p2")
    old_ids = _pinned_prog_ids(pin_dir)
    links = {lk["id"]: lk for lk in our_links(env)}
    assert len(links) == 10 and {lk["prog_id"] for lk in links.values()} == set(old_ids.values())
    assert "-DFAIL_OPEN=0" in os.readlink(f"{pin_dir}/progs/knobs")
    a.ok("close")
    a.popen.wait(timeout=5)

    b = env.ztunnel(pin_dir, fail_open=True)
    assert b.ok("start")["restarted"] is True
    assert "-DFAIL_OPEN=1" in os.readlink(f"{pin_dir}/progs/knobs")
    new_ids = _pinned_prog_ids(pin_dir)
    assert not set(new_ids.values()) & set(old_ids.values())
    after = {lk["id"]: lk for lk in our_links(env)}
    assert set(after) == set(links)                       # the same links, updated in place
    for lk_id, lk in after.items():
        name = {v: k for k, v in old_ids.items()}[links[lk_id]["prog_id"]]
        assert lk["prog_id"] == new_ids[name], (lk, name)
    for name in ("p1", "p2"):
        assert cgroup_progs(env.pods[name].cgroup) == POD_HOOKS
    assert cgroup_progs(env.ztunnel_cg) == ZTUNNEL_HOOKS
    env.enroll(b, "p1")
    env.enroll(b, "p2")
    assert env.request("p1", ip2)["peer"] == ["127.0.0.1", 15001]
    os.kill(b.popen.pid, signal.SIGKILL)                  # the links now run FAIL_OPEN programs
    b.popen.wait(timeout=5)
    r = env.request("p1", ip2)
    assert r["connected"] and r["peer"] == [ip2, APP_PORT], r


def test_ztunnel_process_maps_no_bcc_or_llvm(env, pin_dir):
    """bcc/LLVM run only in the short-lived build child, never in the process using Capture."""
    z = env.ztunnel(pin_dir)
    z.ok("start")
    env.enroll(z, "p1")
    assert env.request("p1", env.ip("p2"))["peer"] == ["127.0.0.1", 15001]
    with open(f"/proc/{z.popen.pid}/maps") as f:
        libs = {line.split()[-1] for line in f if "/" in line}
    assert any("python" in lib for lib in libs), libs      # it is the python process
    assert not [lib for lib in libs
                if any(x in lib.lower() for x in ("libbcc", "libllvm", "libclang"))], libs
    z.ok("teardown")


def test_enroll_validation_and_errors(env, pin_dir):
    p1 = env.pods["p1"]
    cap = Capture(pin_dir, ztunnel_cgroup=env.ztunnel_cg)
    with pytest.raises(CaptureError) as ei:
        cap.enrolled()
    assert ei.value.reason == "not_started"
    cap.start()
    try:
        host_ls = [socket.socket() for _ in range(3)]      # listeners in the WRONG netns
        ports = (15001, 15006, 15008)
        with netns.in_netns(env.node_netns):
            for s, port in zip(host_ls, ports):
                s.bind(("127.0.0.1", port))
                s.listen(1)
        with pytest.raises(CaptureError) as ei:
            cap.enroll(p1.uid, cgroup=p1.cgroup, netns_path=p1.netns_path, pod_ip=str(p1.pod_ip),
                       outbound=host_ls[0], inbound=host_ls[1], hbone=host_ls[2])
        assert ei.value.reason == "listener_wrong_netns"
        with pytest.raises(CaptureError) as ei:
            cap.enroll(p1.uid, cgroup="/nonexistent", netns_path=p1.netns_path,
                       pod_ip=str(p1.pod_ip), outbound=host_ls[0], inbound=host_ls[1],
                       hbone=host_ls[2])
        assert ei.value.reason == "bad_cgroup"
        for s in host_ls:
            s.close()
        assert cap.enrolled() == []
        assert sorted(lk["attach_type"] for lk in our_links(env)) == ZTUNNEL_HOOKS
        with pytest.raises(CaptureError) as ei:
            Capture("/tmp/not-bpffs", ztunnel_cgroup=env.ztunnel_cg)
        assert ei.value.reason == "pin_dir_not_bpffs"
    finally:
        cap.teardown()
    assert not os.path.exists(pin_dir)
