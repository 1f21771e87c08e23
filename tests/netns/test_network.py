"""Root tests of the simulated cluster network: real namespaces, veths, cgroups and processes.

Every test uses its own prefix (``amb-t<pid>-<n>``) and a fixture whose finalizer tears the
cluster down and checks that nothing is left (netns, cgroup, links, processes), also when
the test fails.  Traffic only ever flows between the test's own namespaces.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvloop

from mesh.linux import cgroup, netns
from localcluster import network as network_mod
from localcluster import procs
from localcluster.addressing import ClusterAddressing
from localcluster.network import ClusterNetwork, NetworkError, PodNet, uid_hash

pytestmark = pytest.mark.root

ECHO = str(Path(__file__).with_name("echo_server.py"))
PORT = 8080
SIM_RANGES = ("10.244.", "172.30.", "10.96.")
_seq = itertools.count()


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True,
                          timeout=10).stdout


def _host_links() -> set[str]:
    return {line.split(":")[1].strip().split("@")[0] for line in _ip("-o", "link").splitlines()}


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait_for(pred, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def assert_nothing_left(prefix: str, pids: list[int]) -> None:
    assert netns.list_netns(prefix + "-") == []
    assert prefix not in _ip("netns", "list")
    assert not os.path.exists(os.path.join(cgroup.cgroup2_root(), prefix))
    assert not [name for name in _host_links() if prefix in name]
    _wait_for(lambda: all(_gone(p) for p in pids), what=f"processes {pids} to exit")


@dataclass
class Cluster:
    prefix: str
    logdir: Path
    net: ClusterNetwork
    addr: ClusterAddressing = field(default_factory=ClusterAddressing)
    pods: dict[str, PodNet] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def build(self) -> None:
        """2 nodes, 2 pods on each."""
        nodes = self.addr.add_nodes([("node-a", None), ("node-b", None)])
        for n in nodes:
            self.net.add_node(n.name, n.ip, n.pod_cidr, self.addr.routes_for(n.name))
        for node in ("node-a", "node-b"):
            for i in (1, 2):
                uid = f"uid-{node}-{i}-{self.prefix}"
                ip = self.addr.allocate_pod(uid, node)
                self.pods[f"{node[-1]}{i}"] = self.net.add_pod(node, uid, ip,
                                                               self.addr.node(node).pod_cidr)

    def spawn(self, argv: list[str], *, netns_name: str | None, cg: str | None,
              log: str) -> subprocess.Popen:
        p = procs.spawn(argv, netns=netns_name, cgroup=cg, env={"PATH": os.defpath},
                        cwd=str(self.logdir), log_path=str(self.logdir / log))
        self.procs.append(p)
        return p

    def start_echo(self, pod: str) -> subprocess.Popen:
        pn = self.pods[pod]
        log = f"echo-{pod}.log"
        p = self.spawn([sys.executable, ECHO, pod, str(PORT), "60"], netns_name=pn.netns,
                       cg=pn.cgroup, log=log)
        _wait_for(lambda: "listening" in (self.logdir / log).read_text() or p.poll() is not None,
                  what=f"echo server in {pod}")
        assert p.poll() is None, (self.logdir / log).read_text()
        return p


@pytest.fixture
def cluster(tmp_path):
    prefix = f"amb-t{os.getpid()}-{next(_seq)}"
    links_before = _host_links()
    c = Cluster(prefix=prefix, logdir=tmp_path, net=ClusterNetwork(prefix))
    yield c
    try:
        ClusterNetwork(prefix).teardown()
    finally:
        for p in c.procs:
            procs.stop(p, timeout=1)
    assert_nothing_left(prefix, [p.pid for p in c.procs])
    assert _host_links() - links_before == set()


def echo(pod: PodNet, ip, port: int = PORT, msg: bytes = b"hi") -> str:
    """Connect from inside `pod`'s netns (socket_in_netns) and return the server's reply."""
    with netns.socket_in_netns(pod.netns) as s:
        s.settimeout(5)
        s.connect((str(ip), port))
        s.sendall(msg)
        return s.recv(4096).decode()


# ---- topology and host isolation --------------------------------------------------------------

def test_topology_and_host_isolation(cluster):
    links_before = _host_links()
    cluster.build()
    p = cluster.prefix
    names = netns.list_netns(p + "-")
    assert names == sorted([f"{p}-fabric", f"{p}-n-node-a", f"{p}-n-node-b"]
                           + [pn.netns for pn in cluster.pods.values()])
    listed = _ip("netns", "list")
    assert all(n in listed for n in names)

    a, b = cluster.addr.node("node-a"), cluster.addr.node("node-b")
    for node, other in ((a, b), (a, b)[::-1]):
        ns = f"{p}-n-{node.name}"
        routes = _ip("-n", ns, "-4", "route", "show")
        assert "default" not in routes
        assert f"{other.pod_cidr} via {other.ip} dev eth0 proto static" in routes
        assert f"{node.pod_cidr} dev cni0" in routes
        with netns.in_netns(ns):
            assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
        assert f"inet {node.ip}/24" in _ip("-n", ns, "-4", "addr", "show", "dev", "eth0")
        assert f"inet {node.gateway}/24" in _ip("-n", ns, "-4", "addr", "show", "dev", "cni0")
    with netns.in_netns(f"{p}-fabric"):
        assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "0"
    assert "inet " not in _ip("-n", f"{p}-fabric", "-4", "addr", "show", "dev", "br0")

    pod = cluster.pods["a1"]
    assert _ip("-n", pod.netns, "-4", "route", "show", "default").startswith(
        f"default via {a.gateway} dev eth0")
    assert f"inet {pod.pod_ip}/24" in _ip("-n", pod.netns, "-4", "addr", "show", "dev", "eth0")
    assert "master cni0" in _ip("-n", f"{p}-n-node-a", "-o", "link", "show", pod.host_ifname)
    assert len(pod.host_ifname) <= 15 and pod.netns == f"{p}-p-{uid_hash(pod.uid)}"

    # the host netns got nothing: no link, no address, no route for the simulated ranges
    new_links = _host_links() - links_before
    assert new_links == set()
    host_routes = _ip("-4", "route", "show", "table", "all")
    assert not [r for r in host_routes.splitlines() if any(x in r for x in SIM_RANGES)]
    assert not any(x in _ip("-4", "addr", "show") for x in SIM_RANGES)
    # `ip route get` only consults the table; it sends nothing
    for target in (pod.pod_ip, a.ip, "10.96.0.10"):
        got = _ip("-4", "route", "get", str(target))
        dev = got.split(" dev ")[1].split()[0] if " dev " in got else ""
        assert dev in links_before, got
        assert dev not in ("cni0", "br0") and not dev.startswith(("vp", "vn")), got


def test_pod_to_pod_tcp_same_and_cross_node(cluster):
    cluster.build()
    for pod in cluster.pods:
        cluster.start_echo(pod)
    a1, a2, b1, b2 = (cluster.pods[k] for k in ("a1", "a2", "b1", "b2"))

    same = echo(a1, a2.pod_ip, msg=b"same-node")
    assert same.startswith(f"a2 local={a2.pod_ip}:{PORT} peer={a1.pod_ip}:")
    assert same.endswith("same-node")

    cross = echo(a1, b1.pod_ip, msg=b"cross-node")
    assert cross.startswith(f"b1 local={b1.pod_ip}:{PORT} peer={a1.pod_ip}:")
    back = echo(b2, a1.pod_ip)
    assert f"peer={b2.pod_ip}:" in back

    # a client started like a pod's process (procs.spawn: cgroup + netns) from b2 to a2
    code = textwrap.dedent(f"""
        import socket
        s = socket.create_connection(("{a2.pod_ip}", {PORT}), timeout=5)
        s.sendall(b"from-spawn"); print(s.recv(4096).decode(), flush=True)
    """)
    client = cluster.spawn([sys.executable, "-c", code], netns_name=b2.netns, cg=b2.cgroup,
                           log="client.log")
    assert client.wait(timeout=10) == 0, (cluster.logdir / "client.log").read_text()
    out = (cluster.logdir / "client.log").read_text()
    assert f"a2 local={a2.pod_ip}:{PORT} peer={b2.pod_ip}:" in out and "from-spawn" in out

    # nodes have no default route: anything outside the cluster ranges is unreachable there
    with netns.socket_in_netns(a1.netns) as s:
        s.settimeout(2)
        with pytest.raises(OSError):
            s.connect(("172.31.255.254", 9))  # TEST-only private address, never routed


def test_processes_land_in_their_cgroup_and_netns(cluster):
    cluster.build()
    server = cluster.start_echo("b2")
    pod = cluster.pods["b2"]
    assert cgroup.cgroup_of(server.pid) == cluster.net.pod_cgroup_rel(pod.uid)
    assert cgroup.pids(cluster.net.pod_cgroup_rel(pod.uid)) == [server.pid]
    assert os.stat(f"/proc/{server.pid}/ns/net").st_ino == os.stat(pod.netns_path).st_ino

    ztunnel_cg = cluster.net.ztunnel_cgroup("node-b")
    assert ztunnel_cg == os.path.join(cgroup.cgroup2_root(), cluster.prefix, "ztunnel", "node-b")
    assert cluster.net.pod_cgroup(pod.uid) == pod.cgroup
    zt = cluster.spawn(["sleep", "30"], netns_name=f"{cluster.prefix}-n-node-b", cg=ztunnel_cg,
                       log="zt.log")
    _wait_for(lambda: cgroup.cgroup_of(zt.pid) == f"{cluster.prefix}/ztunnel/node-b",
              what="ztunnel stand-in in its cgroup")
    # an exec'd program keeps the wrapper's PID: the Popen pid *is* the program; once it runs,
    # nsenter has switched the netns (the shell joins the cgroup before exec'ing nsenter)
    _wait_for(lambda: Path(f"/proc/{zt.pid}/comm").read_text().strip() == "sleep",
              what="the wrapper exec'd the program")
    assert os.stat(f"/proc/{zt.pid}/ns/net").st_ino == \
        os.stat(netns.netns_path(f"{cluster.prefix}-n-node-b")).st_ino
    assert procs.stop(zt, timeout=2) == -signal.SIGTERM


def test_remove_pod_node_and_update_routes(cluster):
    cluster.build()
    server = cluster.start_echo("a2")
    pod = cluster.pods["a2"]
    cluster.net.remove_pod(pod.uid)
    cluster.addr.release_pod(pod.uid)
    assert not netns.exists(pod.netns)
    assert not os.path.exists(pod.cgroup)
    assert server.wait(timeout=5) == -signal.SIGKILL
    assert pod.host_ifname not in _ip("-n", f"{cluster.prefix}-n-node-a", "-o", "link")
    cluster.net.remove_pod(pod.uid)  # idempotent

    node_a = f"{cluster.prefix}-n-node-a"
    b = cluster.addr.node("node-b")
    cluster.net.update_routes("node-a", {})
    assert "via" not in _ip("-n", node_a, "-4", "route", "show")
    cluster.net.update_routes("node-a", {b.pod_cidr: b.ip})
    assert f"{b.pod_cidr} via {b.ip}" in _ip("-n", node_a, "-4", "route", "show")
    with pytest.raises(NetworkError, match="default route"):
        cluster.net.update_routes("node-a", {"0.0.0.0/0": b.ip})
    with pytest.raises(NetworkError, match="not on the node network"):
        cluster.net.update_routes("node-a", {b.pod_cidr: "172.29.77.1"})

    b1 = cluster.pods["b1"]
    cluster.start_echo("b1")
    cluster.net.remove_node("node-b")
    for name in (f"{cluster.prefix}-n-node-b", b1.netns, cluster.pods["b2"].netns):
        assert not netns.exists(name)
    assert not os.path.exists(cgroup.abspath(cluster.net.node_cgroup_rel("node-b")))
    assert not os.path.exists(b1.cgroup)
    fabric_ports = _ip("-n", f"{cluster.prefix}-fabric", "-o", "link")
    assert fabric_ports.count("master br0") == 1  # only node-a's port is left
    cluster.net.remove_node("node-b")  # idempotent


def test_add_rolls_back_on_failure(cluster, monkeypatch):
    cluster.build()
    n = cluster.addr.node("node-a")
    with pytest.raises(NetworkError, match="outside"):
        cluster.net.add_pod("node-a", "bad", "10.99.0.5", n.pod_cidr)
    with pytest.raises(NetworkError, match="already exists"):
        cluster.net.add_pod("node-a", cluster.pods["a1"].uid, "10.244.0.9", n.pod_cidr)
    with pytest.raises(NetworkError, match="does not exist"):
        cluster.net.add_pod("node-z", "uid-z", "10.244.0.9", n.pod_cidr)

    def boom(_rel):
        raise OSError("injected failure")
    monkeypatch.setattr(network_mod.cgroup, "create", boom)
    with pytest.raises(OSError, match="injected"):
        cluster.net.add_pod("node-a", "uid-late-failure", "10.244.0.9", n.pod_cidr)
    assert not netns.exists(cluster.net.pod_netns("uid-late-failure"))
    assert "vp" + uid_hash("uid-late-failure") not in _ip(
        "-n", f"{cluster.prefix}-n-node-a", "-o", "link")
    with pytest.raises(OSError, match="injected"):
        cluster.net.add_node("node-c", "172.30.0.9", "10.244.9.0/24")
    assert not netns.exists(f"{cluster.prefix}-n-node-c")
    assert _ip("-n", f"{cluster.prefix}-fabric", "-o", "link").count("master br0") == 2


def test_teardown_kills_everything_and_is_idempotent(cluster):
    cluster.build()
    servers = [cluster.start_echo(p) for p in cluster.pods]
    # a stray process inside a pod netns but in no cluster cgroup: found by its netns
    stray = cluster.spawn(["sleep", "30"], netns_name=cluster.pods["a1"].netns, cg=None,
                          log="stray.log")
    ClusterNetwork(cluster.prefix).teardown()
    assert_nothing_left(cluster.prefix, [p.pid for p in servers + [stray]])
    ClusterNetwork(cluster.prefix).teardown()


def test_runner_style_calls_from_worker_threads_under_uvloop(cluster):
    """The runner installs uvloop and calls this module via asyncio.to_thread (or directly)."""
    async def main():
        await asyncio.to_thread(cluster.build)
        await asyncio.to_thread(cluster.net.remove_node, "node-b")
        # a plain (blocking) call from the loop's own thread works as well
        cluster.net.update_routes("node-a", {})
        cluster.net.ensure_fabric()

    old = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        asyncio.run(main())
    finally:
        asyncio.set_event_loop_policy(old)
    assert netns.list_netns(cluster.prefix + "-") == sorted(
        [f"{cluster.prefix}-fabric", f"{cluster.prefix}-n-node-a",
         cluster.pods["a1"].netns, cluster.pods["a2"].netns])


def test_teardown_when_nothing_exists():
    prefix = f"amb-t{os.getpid()}-{next(_seq)}"
    ClusterNetwork(prefix).teardown()
    ClusterNetwork(prefix).teardown()
    assert_nothing_left(prefix, [])


def test_crash_recovery_from_a_killed_builder(cluster):
    """Another process builds the cluster, starts a pod process, then dies by SIGKILL:
    a fresh ClusterNetwork with the same prefix removes everything."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parents[2])!r})
        from localcluster.addressing import ClusterAddressing
        from localcluster.network import ClusterNetwork
        from localcluster import procs
        addr, net = ClusterAddressing(), ClusterNetwork({cluster.prefix!r})
        for n in addr.add_nodes([("x", None), ("y", None)]):
            net.add_node(n.name, n.ip, n.pod_cidr, addr.routes_for(n.name))
        pod = net.add_pod("y", "uid-crash", addr.allocate_pod("uid-crash", "y"),
                          addr.node("y").pod_cidr)
        p = procs.spawn(["sleep", "60"], netns=pod.netns, cgroup=pod.cgroup,
                        env={{"PATH": os.defpath}}, cwd=None, log_path={str(cluster.logdir / "c.log")!r})
        print(p.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == -signal.SIGKILL, res.stderr
    orphan = int(res.stdout.split()[0])
    assert not _gone(orphan)
    assert len(netns.list_netns(cluster.prefix + "-")) == 4
    ClusterNetwork(cluster.prefix).teardown()
    assert_nothing_left(cluster.prefix, [orphan])


def test_crash_recovery_after_dropping_the_object(cluster):
    cluster.build()
    server = cluster.start_echo("b1")
    del cluster.net
    ClusterNetwork(cluster.prefix).teardown()
    assert_nothing_left(cluster.prefix, [server.pid])


def test_prefixes_do_not_claim_each_other():
    net = ClusterNetwork("amb-demo")
    assert net.owns("amb-demo-fabric") and net.owns("amb-demo-n-x") and net.owns("amb-demo-p-ab")
    assert not net.owns("amb-demo-2-fabric") and not net.owns("amb-demo-2-n-x")
    assert not ClusterNetwork("amb").owns("amb-demo-fabric")
    for bad in ("amb-n", "amb-demo-p", "Amb", "amb--x", "amb_x", "", "a" * 33, "amb-fabric"):
        with pytest.raises(NetworkError):
            ClusterNetwork(bad)
    long_name = "node-" + "x" * 80
    assert net.node_netns(long_name) == f"amb-demo-n-{uid_hash(long_name)}"
    assert net.node_netns("Weird_Name") == f"amb-demo-n-{uid_hash('Weird_Name')}"


# ---- mesh.linux.netns / mesh.linux.cgroup helpers ----------------------------------------------------------

@pytest.fixture
def scratch_netns():
    name = f"amb-t{os.getpid()}-{next(_seq)}-p-scratch"
    netns.create(name)
    yield name
    netns.remove(name)
    assert not netns.exists(name)


def test_in_netns_switches_only_the_thread_and_always_back(scratch_netns):
    home = os.stat("/proc/thread-self/ns/net").st_ino
    with pytest.raises(RuntimeError, match="inside"):
        with netns.in_netns(scratch_netns):
            assert os.stat("/proc/thread-self/ns/net").st_ino == os.stat(
                netns.netns_path(scratch_netns)).st_ino
            raise RuntimeError("inside")
    assert os.stat("/proc/thread-self/ns/net").st_ino == home
    with pytest.raises(netns.NetnsError):
        with netns.in_netns(scratch_netns + "-missing"):
            pass
    assert os.stat("/proc/thread-self/ns/net").st_ino == home
    with pytest.raises(netns.NetnsError):
        netns.create(scratch_netns)
    with pytest.raises(netns.NetnsError):
        netns.netns_path("../etc")


def test_socket_in_netns_listens_inside(scratch_netns):
    with netns.in_netns(scratch_netns):
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)
    with netns.socket_in_netns(scratch_netns) as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        # from the host netns the port is not there ...
        with socket.socket() as c, pytest.raises(ConnectionRefusedError):
            c.settimeout(2)
            c.connect(("127.0.0.1", port))
        # ... but it is inside the namespace
        with netns.socket_in_netns(scratch_netns) as c:
            c.settimeout(2)
            c.connect(("127.0.0.1", port))
    assert scratch_netns in netns.list_netns(f"amb-t{os.getpid()}-")


def test_cgroup_helpers(tmp_path):
    rel = f"amb-t{os.getpid()}-{next(_seq)}/pods/x"
    top = rel.split("/")[0]
    try:
        path = cgroup.create(rel)
        assert path.startswith(cgroup.cgroup2_root()) and os.path.isdir(path)
        p = subprocess.Popen(["sleep", "30"])
        cgroup.join(p.pid, rel)
        assert cgroup.pids(rel) == [p.pid]
        assert cgroup.pids(top, recursive=True) == [p.pid] and cgroup.pids(top) == []
        assert cgroup.cgroup_of(p.pid) == rel
        assert cgroup.remove_tree(top) is True
        assert p.wait(timeout=5) == -signal.SIGKILL
        assert not os.path.exists(os.path.join(cgroup.cgroup2_root(), top))
        assert cgroup.remove_tree(top) is False
        for bad in ("", "/abs", "a/../b", "."):
            with pytest.raises(cgroup.CgroupError):
                cgroup.abspath(bad)
        with pytest.raises(cgroup.CgroupError):
            cgroup.join(os.getpid(), top + "/missing")
    finally:
        cgroup.remove_tree(top)
