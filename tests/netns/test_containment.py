"""End to end (root): pods are contained as a container runtime contains them.

From inside a meshed pod and a plain pod (`ambient exec`, which runs in the container's
containment) every known way out of a pod is tried and must be refused with the errno stated
per escape; the containers' own processes are checked from the host (capabilities, no_new_privs,
namespaces); runAsUser/runAsGroup are honoured; and meshed traffic still flows.
"""
import errno
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from localcluster import procs
from localcluster.runner import run_as
from mesh.linux import cgroup
from mesh.model import Container, ObjectMeta, Pod

from .cluster_helper import ROOT, LocalCluster, namespace_yaml, nodes_yaml, pod_yaml, wait_for

NAME = f"ct{os.getpid() % 100000}"
SEC_POD = textwrap.dedent("""
    ---
    apiVersion: v1
    kind: Pod
    metadata: {name: sec, namespace: plain}
    spec:
      nodeName: n1
      securityContext: {runAsUser: 1000, runAsGroup: 3000}
      containers:
      - name: inherits
        command: [sh, -c, "echo $(id -u) $(id -g) $(id -G); touch made-by-inherits; exec sleep 600"]
      - name: overrides
        command: [sh, -c, "echo $(id -u) $(id -g) $(id -G); exec sleep 600"]
        securityContext: {runAsUser: 2000}
    """)
CLUSTER = (nodes_yaml("n1", "n2") + namespace_yaml("mesh", ambient=True) + namespace_yaml("plain")
           + pod_yaml("m1", "mesh", "n1", "client") + pod_yaml("m2", "mesh", "n2", "server")
           + pod_yaml("p1", "plain", "n1", "plain") + SEC_POD)

# Tried from inside a pod; each prints the errno name it got, or "ALLOWED".
ESCAPE = r'''
import ctypes, errno, json, os, socket, sys
a = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
def attempt(fn):
    try:
        fn()
    except OSError as e:
        return errno.errorcode[e.errno]
    return "ALLOWED"
def check(rc):
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
def so_mark():
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, 36, 0x539)  # SO_MARK: ztunnel's bypass mark
def cgroup_move(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
def bpf():  # BPF_MAP_CREATE of a 1-entry array: __NR_bpf is 321 on x86_64
    attr = (ctypes.c_uint32 * 30)(2, 4, 4, 1)
    check(libc.syscall(321, 0, ctypes.byref(attr), ctypes.sizeof(attr)))
def setns(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        check(libc.setns(fd, 0x40000000))
    finally:
        os.close(fd)
def mount():
    check(libc.mount(b"tmpfs", b"/mnt", b"tmpfs", 0, None))
def connect(path):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
def append(path):
    open(path, "a").close()
out = {
    "read_ca_key": attempt(lambda: open(a["ca_key"], "rb").close()),
    "read_bootstrap_key": attempt(lambda: open(a["bootstrap_key"], "rb").close()),
    "connect_control_plane": attempt(lambda: connect(a["cp_sock"])),
    "so_mark": attempt(so_mark),
    "leave_cgroup_v2": attempt(lambda: cgroup_move(a["cgroup_root"] + "/cgroup.procs")),
    "join_ztunnel_cgroup": attempt(lambda: cgroup_move(a["ztunnel_cgroup"] + "/cgroup.procs")),
    "bpf": attempt(bpf),
    "setns_node_netns": attempt(lambda: setns("/var/run/netns/" + a["node_netns"])),
    "setns_pid1_netns": attempt(lambda: setns("/proc/1/ns/net")),
    "signal_ztunnel": attempt(lambda: os.kill(a["ztunnel_pid"], 0)),
    "mount": attempt(mount),
    "write_host_file": attempt(lambda: append(a["host_file"])),
    "write_host_binary_dir": attempt(lambda: append(os.path.dirname(sys.executable) + "/.pod-was-here")),
    "read_block_device": attempt(lambda: open(a["block_device"], "rb").close()),
    "read_host_tmp": attempt(lambda: open(a["host_tmp_file"], "rb").close()),
}
open("/tmp/pod-tmp-is-writable", "w").close()
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
out["caps"] = {k: status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
out["no_new_privs"] = status["NoNewPrivs"].strip()
out["pid1"] = open("/proc/1/cmdline", "rb").read().split(b"\0")[:4]
out["pid1"] = [x.decode() for x in out["pid1"]]
out["dev"] = sorted(os.listdir("/dev"))
out["hidden_dirs"] = {d: os.listdir(d) for d in a["hidden_dirs"]}
with open("written-by-pod", "w") as f:  # the app's own directory stays writable
    f.write(str(os.getuid()))
print(json.dumps(out))
'''

# The precise refusal per escape, and why.
EXPECTED = {
    "read_ca_key": "ENOENT",            # /var/lib/ambient is an empty tmpfs in the pod
    "read_bootstrap_key": "ENOENT",     # /run/ambient likewise
    "connect_control_plane": "ENOENT",  # cp.sock is under /run/ambient
    "so_mark": "EPERM",                 # needs CAP_NET_ADMIN (or CAP_NET_RAW)
    "leave_cgroup_v2": "EROFS",         # /sys (and /sys/fs/cgroup) is read-only in the pod
    "join_ztunnel_cgroup": "EROFS",
    "bpf": "EPERM",                     # needs CAP_BPF / CAP_SYS_ADMIN
    "setns_node_netns": "ENOENT",       # /var/run/netns is an empty tmpfs in the pod
    "setns_pid1_netns": "EPERM",        # PID 1 is the pod's own init; setns needs CAP_SYS_ADMIN
    "signal_ztunnel": "ESRCH",          # the pod has its own PID namespace
    "mount": "EPERM",                   # needs CAP_SYS_ADMIN
    "write_host_file": "EROFS",         # the host's files are read-only in the pod
    "write_host_binary_dir": "EROFS",
    "read_block_device": "ENOENT",      # /dev is a private tmpfs with the basic devices only
    "read_host_tmp": "ENOENT",          # /tmp is the pod's own tmpfs
}
DEVICES = ["fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty",
           "urandom", "zero"]
NO_CAPS = dict.fromkeys(("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"), "0000000000000000")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("contain")
    # Usable by the runAsUser containers (its parents are not, but it is their cwd): group 3000
    # may write it, as a Kubernetes volume with fsGroup: 3000 would be.
    os.chown(work, 0, 3000)
    work.chmod(0o775)
    c = LocalCluster(NAME, work)
    (work / "escape.py").write_text(ESCAPE)
    c.ambient("down", check=False)
    t0 = time.monotonic()
    c.ambient("up", c.write("cluster.yaml", CLUSTER))
    print(f"ambient up (2 nodes, 4 pods, contained) took {time.monotonic() - t0:.2f}s")
    yield c
    c.destroy()


def _pod(c, name):
    return next(p for p in c.status()["pods"] if p["name"] == name)


def _escape_args(c, tmp_path):
    st = c.status()
    n1 = next(n for n in st["nodes"] if n["name"] == "n1")
    (tmp_path / "host-file").write_text("root's\n")
    block = next((os.path.join("/dev", d) for d in sorted(os.listdir("/dev"))
                  if d.startswith(("loop", "sd", "vd", "nvme", "xvd")) and
                  os.path.exists(os.path.join("/dev", d))), "/dev/loop0")
    args = {"ca_key": os.path.join(c.paths.ca_dir, "root-key.pem"),
            "bootstrap_key": os.path.join(c.paths.node_dir("n1"), "bootstrap", "key.pem"),
            "cp_sock": c.paths.control_plane_socket, "cgroup_root": cgroup.cgroup2_root(),
            "ztunnel_cgroup": os.path.join(cgroup.cgroup2_root(), cgroup.cgroup_of(n1["ztunnel"]["pid"])),
            "node_netns": n1["netns"], "ztunnel_pid": n1["ztunnel"]["pid"],
            "host_file": os.path.join(ROOT, "pyproject.toml"),
            "host_tmp_file": str(tmp_path / "host-file"),
            "block_device": block,
            "hidden_dirs": [c.paths.run_root, c.paths.state_root, "/var/run/netns", "/sys/fs/bpf"]}
    # Each target exists on the host: a refusal inside the pod is the containment's doing.
    for k in ("ca_key", "bootstrap_key", "cp_sock", "host_file", "host_tmp_file", "block_device"):
        assert os.path.exists(args[k]), args[k]
    assert os.path.exists(os.path.join("/var/run/netns", args["node_netns"]))
    return args


@pytest.mark.root
@pytest.mark.parametrize("ns, pod", [("mesh", "m1"), ("plain", "p1")], ids=["meshed", "plain"])
def test_every_escape_is_refused_from_inside_a_pod(cluster, tmp_path, ns, pod):
    args = _escape_args(cluster, tmp_path)
    zt_cg = cgroup.cgroup_of(args["ztunnel_pid"])
    out = cluster.ambient("exec", "-n", ns, pod, "--", "python3", "escape.py", json.dumps(args)).stdout
    got = json.loads(out)
    assert {k: got[k] for k in EXPECTED} == EXPECTED
    assert got["caps"] == NO_CAPS and got["no_new_privs"] == "1"
    assert got["pid1"][:3] == ["/bin/sh", "-c", procs._INIT]  # the pod's init, not the host's
    assert got["dev"] == DEVICES
    assert got["hidden_dirs"] == dict.fromkeys(args["hidden_dirs"], [])
    # Nothing changed on the host; the app's own directory was writable.
    assert not os.path.exists("/tmp/pod-tmp-is-writable")
    assert cgroup.cgroup_of(args["ztunnel_pid"]) == zt_cg and "/ztunnel/" in zt_cg
    assert (cluster.dir / "written-by-pod").read_text() == "0"
    assert not os.path.exists(os.path.join(os.path.dirname(sys.executable), ".pod-was-here"))


def _app_pids(c, pod):
    """The pod's processes as the host sees them (its cgroup), by command line."""
    out = {}
    for pid in cgroup.pids(os.path.relpath(_pod(c, pod)["cgroup"], cgroup.cgroup2_root())):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out[pid] = f.read().split(b"\0")
        except FileNotFoundError:
            pass
    return out


def _status(pid):
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, v in (l.split(":", 1) for l in f if ":" in l)}


@pytest.mark.root
@pytest.mark.parametrize("pod", ["m1", "p1"])
def test_container_processes_have_no_capabilities_and_private_namespaces(cluster, pod):
    procs_ = _app_pids(cluster, pod)
    apps = [pid for pid, cmd in procs_.items() if cmd[1:2] == [b"echo.py"]]
    inits = [pid for pid, cmd in procs_.items() if cmd[3:4] == [b"mesh-init"]]
    assert len(apps) == 1 and len(inits) == 1, procs_
    [pid], [init] = apps, inits
    assert {k: _status(init)[k] for k in NO_CAPS} == NO_CAPS and _status(init)["NSpid"].split()[-1] == "1"
    st = _status(pid)
    assert {k: st[k] for k in NO_CAPS} == NO_CAPS
    assert st["NoNewPrivs"] == "1" and st["Uid"].split() == ["0"] * 4
    assert st["NSpid"].split()[-1] == "2"  # PID 2 in its own PID namespace, under the init
    for ns in ("mnt", "pid"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    # Its netns is the pod's: same inode as the pod's bind mount.
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(
        os.path.join("/var/run/netns", _pod(cluster, pod)["netns"])).st_ino


@pytest.mark.root
def test_run_as_user_and_group_container_wins_over_pod(cluster):
    logs = {name: c["log"] for name, c in _pod(cluster, "sec")["containers"].items()}
    wait_for(lambda: all(os.path.exists(p) and open(p).read() for p in logs.values()), 10)
    # `id -u`, `id -g`, `id -G`: no supplementary groups beyond the primary one
    assert open(logs["inherits"]).read().splitlines()[0] == "1000 3000 3000"
    assert open(logs["overrides"]).read().splitlines()[0] == "2000 3000 3000"
    # The working directory stays the app's: the container wrote there as its user.
    made = cluster.dir / "made-by-inherits"
    wait_for(made.exists, 5)
    assert (made.stat().st_uid, made.stat().st_gid) == (1000, 3000)
    # `ambient exec` runs in the first container's security context, as kubectl exec does.
    out = cluster.ambient("exec", "-n", "plain", "sec", "--", "sh", "-c",
                          "echo $(id -u) $(id -g) $(id -G); grep -E '^(CapEff|NoNewPrivs)' /proc/self/status").stdout
    assert out.splitlines() == ["1000 3000 3000", "CapEff:\t0000000000000000",
                                "NoNewPrivs:\t1"]


@pytest.mark.root
def test_meshed_traffic_still_flows_between_contained_pods(cluster):
    before = cluster.admin("n2", "/config_dump")["connections_total"]
    m1, m2 = cluster.ip("m1"), cluster.ip("m2")
    out = cluster.echo("mesh", "m1", m2, nbytes=100_000).stdout
    assert "echo ok: 100000/100000 bytes" in out and f"local={m2}:8080" in out
    wait_for(lambda: cluster.admin("n2", "/config_dump")["connections_total"] > before)
    last = [c for c in cluster.admin("n2", "/connections") if c.get("direction") == "inbound"
            and c.get("dst.workload") == "m2"][-1]
    assert last["security"] == "mutual_tls" and last["src.addr"].startswith(m1 + ":")
    assert last["src.identity"] == "spiffe://cluster.local/ns/mesh/sa/default"


@pytest.mark.root
def test_exec_keeps_stdin_and_exit_status_and_pod_stop_is_prompt(cluster):
    p = subprocess.run([sys.executable, "-m", "localcluster.cli", "-c", NAME, "exec", "-n", "plain", "p1",
                        "--", "sh", "-c", "read x; echo got $x; exit 5"], input="line\n", text=True,
                       capture_output=True, cwd=ROOT, timeout=60)
    assert (p.returncode, p.stdout) == (5, "got line\n"), p.stderr
    t0 = time.monotonic()
    cluster.delete(pod_yaml("p1", "plain", "n1", "plain"))
    took = time.monotonic() - t0
    assert took < 2.5, f"deleting a contained pod took {took:.2f}s (SIGTERM not delivered?)"


def test_run_as_resolution_container_then_pod_then_root():
    meta = ObjectMeta(name="p", namespace="d")
    table = [  # (pod user, pod group, container user, container group) -> (uid, gid)
        ((None, None, None, None), (0, 0)),
        ((1000, None, None, None), (1000, 0)),
        ((1000, 3000, None, None), (1000, 3000)),
        ((1000, 3000, 2000, None), (2000, 3000)),
        ((1000, 3000, None, 4000), (1000, 4000)),
        ((None, None, 0, 5), (0, 5)),
        ((7, 7, 0, 0), (0, 0)),
    ]
    for (pu, pg, cu, cg), want in table:
        c = Container(name="c", run_as_user=cu, run_as_group=cg)
        pod = Pod(meta=meta, containers=(c,), run_as_user=pu, run_as_group=pg)
        assert run_as(pod, c) == want, (pu, pg, cu, cg)
    assert run_as(Pod(meta=meta, run_as_user=9), None) == (9, 0)


def test_contained_argv_chain_drops_everything_and_is_fail_closed():
    argv = procs.pod_argv(["python3", "app.py"], netns="/var/run/netns/x", cgroup="/cg",
                          contain=procs.Containment(uid=5, gid=6, hide=("/a", "/b")), cwd="/w")
    chain = argv[7:]  # after: sh -c WRAPPER mesh-spawn CGROUP NETNS NSENTER
    assert argv[4:6] == ["/cg", "/var/run/netns/x"] and chain[0].endswith("/unshare")
    assert chain[1:7] == ["--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "--"]
    i = chain.index("--writable")
    assert chain[i:i + 3] == ["--writable", "/w", "--"]
    h = chain.index("--hide")
    assert chain[h:h + 4] == ["--hide", "/a", "--hide", "/b"]
    # The project (and its venv) are kept visible read-only in the pod's private /tmp.
    kept = [chain[k + 1] for k in range(h, i) if chain[k] == "--keep"]
    assert os.path.dirname(os.path.dirname(os.path.abspath(procs.__file__))) in kept and sys.prefix in kept
    j = chain.index("--reuid=5")
    assert chain[j:j + 8] == ["--reuid=5", "--regid=6", "--clear-groups", "--inh-caps=-all",
                              "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    assert chain[-2:] == ["python3", "app.py"]
    # Without containment (system workloads: ztunnel) the chain is the plain one.
    assert "--no-new-privs" not in procs.pod_argv(["x"], netns=None, cgroup=None)


MISSING = "/nonexistent/ambient-containment-test"


@pytest.mark.root
def test_a_failed_containment_step_does_not_run_the_program(tmp_path):
    marker = tmp_path / "ran"
    argv = procs.pod_argv(["sh", "-c", f"touch {marker}"], netns=None, cgroup=None,
                          contain=procs.Containment(), cwd=MISSING)
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert p.returncode == 126
    assert not os.path.exists(MISSING)
    assert p.stderr.startswith(f"contain: a writable working directory {MISSING} failed, "
                               "the container does not start: mount ")
    assert "No such file or directory (errno 2)" in p.stderr
    assert not marker.exists()
