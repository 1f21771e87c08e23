"""`ambient install | kubectl apply -f -` on a cluster of two node agents (root: run under
`flock /tmp/netns.lock`), everything through kubectl: the control plane pod and one ztunnel
DaemonSet pod per node come up (privileged, hostPath and projected volumes, the token for
audience istio-ca) and `ambient check` passes; labelling a namespace enrolls its running pods
within 2 s and their traffic between the nodes is HBONE (a raw AF_PACKET capture on the
fabric shows port 15008 and never the app's payload); an AuthorizationPolicy applied with
kubectl is enforced within 2 s; removing the label releases them (plaintext again, no 15008); `ambient waypoint apply` yields
a Ready waypoint pod (its run dir an emptyDir, its root the ConfigMap the control plane published
in the new namespace) and the seed's 95/5 canary VirtualService splits
a Service's requests through it; deleting the control plane's pod interrupts no meshed exchange
and its replacement manages the mesh again. One cluster, two nodes and one install for the module."""
from __future__ import annotations

import asyncio
import glob
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from ebpf.capture import pod_links
from localcluster.procs import pod_argv
from mesh.admin_http import get_unix
from mesh.linux import cgroup
from mesh.linux.netns import list_netns, socket_in_netns

from .cluster import KubeCluster
from .nodes import PREFIX, Nodes
from .support import poll

BIN = os.path.dirname(sys.executable)
NS = f"app{os.getpid() % 100000}"
NSW = f"{NS}w"  # the waypoint test's namespace
NSR = f"{NS}r"  # the control-plane restart test's
ECHO = ("import socketserver\n"  # threads: a long-lived connection does not hold up the next ones
        "class H(socketserver.StreamRequestHandler):\n"
        "    timeout = 30\n"
        "    def handle(self):\n"
        "        while (line := self.rfile.readline(1000)):\n"
        "            self.wfile.write(b'echo ' + line); self.wfile.flush()\n"
        "class S(socketserver.ThreadingTCPServer):\n"
        "    allow_reuse_address = daemon_threads = True\n"
        "    request_queue_size = 128\n"
        "S(('0.0.0.0', 8080), H).serve_forever()\n")
CLIENT = ("import socket, sys\n"
          "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n"
          "s.sendall(sys.argv[3].encode()); s.shutdown(socket.SHUT_WR)\n"
          "out = b''\n"
          "while (d := s.recv(1000)):\n"
          "    out += d\n"
          "print(out.decode())\n")


def _ambient(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.path.join(BIN, "ambient"), *args], capture_output=True, text=True, timeout=120)


def _ready(p: dict) -> bool:
    return {c["type"]: c["status"] for c in p["status"].get("conditions", ())}.get("Ready") == "True"


def _pods(kube: KubeCluster, ns: str, selector: str) -> list[dict]:
    return json.loads(kube.kubectl("get", "pods", "-n", ns, "-l", selector, "-o", "json").stdout)["items"]


@dataclass
class Mesh:
    kube: KubeCluster
    nodes: Nodes
    a: str
    b: str

    def admin(self, node: str, path: str = "/config_dump") -> dict:
        """The node's ztunnel admin endpoint (its Unix socket in the hostPath /var/run/ambient
        of that node); {} while it does not answer."""
        sock = os.path.join(self.nodes.state_dir, node, "host", "var", "run", "ambient", "admin.sock")
        try:
            status, body = asyncio.run(get_unix(sock, path))
        except (OSError, asyncio.TimeoutError):
            return {}
        return json.loads(body) if status == 200 else {}


@pytest.fixture(scope="module")
def mesh(mesh_crds: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    kube = mesh_crds
    kube.kubectl("delete", "namespace", "istio-system", "--ignore-not-found", "--wait=false")
    poll(lambda: kube.kubectl("get", "namespace", "istio-system", check=False).returncode != 0, 120,
         "istio-system gone", interval=0.5)
    nodes = Nodes(kube, str(tmp_path_factory.mktemp("mesh-nodes")))
    tag = f"m{os.getpid() % 100000}"
    try:
        nodes.start(f"{tag}-a", f"{tag}-b")
        kube.kubectl("apply", "-f", "-", input=_ambient("install").stdout)
        try:
            yield Mesh(kube, nodes, f"{tag}-a", f"{tag}-b")
        finally:
            for ns in (NS, NSW, NSR):
                kube.kubectl("delete", "namespace", ns, "--wait=false", check=False)
            kube.kubectl("delete", "-f", "-", "--wait=false", input=_ambient("uninstall").stdout, check=False)
            kube.kubectl("delete", "secret", "istio-ca-secret", "-n", "istio-system", "--ignore-not-found",
                         check=False)
            # Let the agents finish the pods' deletions (as kubelets do) before they go away.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and any(
                    _pods(kube, n, sel)  # every pod here carries one of these labels
                    for n in (NS, NSW, "istio-system") for sel in ("app", "gateway.networking.k8s.io/gateway-name")):
                time.sleep(0.5)
    finally:
        nodes.stop()
    assert [x for x in list_netns() if x.startswith(PREFIX + "-")] == []
    assert nodes.bpffs_leftovers == []  # each agent removed its node's bpffs directory and pins


def test_install_brings_up_the_control_plane_and_ztunnel_on_every_node(mesh: Mesh) -> None:
    kube, nodes = mesh.kube, mesh.nodes
    pod = poll(lambda: next((p for p in _pods(kube, "istio-system", "app=istiod") if _ready(p)), None), 90,
               "istiod pod Ready (its /ready probe passes)")
    log = os.path.join(nodes.state_dir, pod["spec"]["nodeName"], "logs",
                       f"istio-system_{pod['metadata']['name']}_discovery.log")
    assert "mesh CA: created (istio-ca-secret)" in open(log).read()

    def ztunnels() -> dict[str, dict] | None:
        ready = {p["spec"]["nodeName"]: p for p in _pods(kube, "istio-system", "app=ztunnel") if _ready(p)}
        return ready if set(ready) == {mesh.a, mesh.b} else None
    zt = poll(ztunnels, 90, f"a Ready ztunnel pod on each node\n{nodes.log(mesh.a)}\n{nodes.log(mesh.b)}")
    for node, p in zt.items():
        dump = mesh.admin(node)
        assert dump.get("connected") is True, dump  # to istiod.istio-system.svc:15012, through the node's proxy
        assert p["status"]["containerStatuses"][0]["restartCount"] == 0, p["status"]
    p = poll(lambda: (r := _ambient("check", f"--kubeconfig={kube.kubeconfig}")).returncode == 0 and r, 60,
             "ambient check passes")
    assert "√ ztunnel: ready on 2/2 nodes" in p.stdout, p.stdout


class Capture:
    """Every IPv4/TCP frame crossing the fabric (all nodes' links), from a raw AF_PACKET socket
    in the fabric's netns, while `with` lasts."""

    def __init__(self, netns: str) -> None:
        self.sock = socket_in_netns(netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.settimeout(0.1)
        self.frames: list[tuple[int, int, bytes]] = []  # (sport, dport, payload)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                f = self.sock.recv(65535)
            except socket.timeout:
                continue
            if len(f) < 34 or f[12:14] != b"\x08\x00" or f[23] != 6:
                continue
            ihl = (f[14] & 0x0F) * 4
            tcp = f[14 + ihl:]
            sport, dport = struct.unpack("!HH", tcp[:4])
            self.frames.append((sport, dport, tcp[(tcp[12] >> 4) * 4:]))

    def __enter__(self) -> "Capture":
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)  # the last frames
        self._stop.set()
        self._t.join(5)
        self.sock.close()

    def ports(self) -> set[int]:
        return {p for s, d, _ in self.frames for p in (s, d)}

    def saw(self, data: bytes) -> bool:
        return any(data in payload for _, _, payload in self.frames)


def _app(kube: KubeCluster, a: str, b: str, ns: str = NS) -> str:
    kube.kubectl("create", "namespace", ns)
    poll(lambda: kube.kubectl("get", "sa", "default", "-n", ns, check=False).returncode == 0, 30, "default SA")
    objs = [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "echo", "namespace": ns},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "echo"}},
                  "template": {"metadata": {"labels": {"app": "echo"}}, "spec": {
                      "nodeSelector": {"kubernetes.io/hostname": a}, "terminationGracePeriodSeconds": 1,
                      "containers": [{"name": "echo", "image": "none", "command": ["python3", "-c", ECHO],
                                      "ports": [{"name": "http", "containerPort": 8080}],
                                      "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": ns},
         "spec": {"selector": {"app": "echo"}, "ports": [{"name": "tcp", "port": 80, "targetPort": 8080}]}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client", "namespace": ns, "labels": {"app": "client"}},
         "spec": {"nodeName": b, "terminationGracePeriodSeconds": 1,
                  "containers": [{"name": "c", "image": "none",
                                  "command": ["python3", "-c", "import time; time.sleep(100000)"]}]}},
    ]
    kube.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(o) for o in objs))
    poll(lambda: len([p for p in _pods(kube, ns, "app in (echo, client)") if _ready(p)]) == 2, 60, "app pods Ready")
    return json.loads(kube.kubectl("get", "svc", "echo", "-n", ns, "-o", "json").stdout)["spec"]["clusterIP"]


def _exec(mesh: Mesh, pod: dict, code: str, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run Python `code` inside the pod, as `kubectl exec` does: its cgroup (so the pod's
    capture programs see the connect()), its netns, its mount namespace (its /etc/hosts) and its
    root directory (`--root`: without it nsenter takes the namespace's root mount, which is not
    the pod's root where the node itself runs chrooted, e.g. a debootstrap root)."""
    return subprocess.run(_exec_argv(mesh, pod, code, *args), capture_output=True, text=True, timeout=timeout)


def _exec_argv(mesh: Mesh, pod: dict, code: str, *args: str) -> list[str]:
    uid = pod["metadata"]["uid"]
    net = mesh.nodes.net
    pid = cgroup.pids(net.pod_cgroup_rel(uid), recursive=True)[0]
    return pod_argv(["nsenter", f"--target={pid}", "--mount", "--root", "--", sys.executable, "-c", code, *args],
                    netns=net.pod_netns(uid), cgroup=net.pod_cgroup(uid))


def _call(mesh: Mesh, client: dict, dest: str, payload: str) -> subprocess.CompletedProcess[str]:
    return _exec(mesh, client, CLIENT, dest, "80", payload)


def test_a_labelled_namespace_is_enrolled_with_mtls_between_nodes_and_policy_applies(mesh: Mesh) -> None:
    kube = mesh.kube
    poll(lambda: all(mesh.admin(n).get("connected") for n in (mesh.a, mesh.b)), 90, "ztunnels connected")
    vip = _app(kube, mesh.a, mesh.b)
    [client] = _pods(kube, NS, "app=client")
    [echo] = _pods(kube, NS, "app=echo")
    fabric = mesh.nodes.net.fabric_netns
    secret = f"payload-{os.getpid()}-plain"

    # Not in the mesh: the ClusterIP is answered by node b's proxy, plaintext on the fabric.
    with Capture(fabric) as cap:  # (node b's proxy learns the endpoint's readiness from its watch)
        out = poll(lambda: (r := _call(mesh, client, vip, secret)).stdout.strip() == f"echo {secret}" and r, 5,
                   "echo answers through the ClusterIP")
    # The payload crossed in plaintext straight to the app's port, not through a tunnel.
    carried = [(s, d) for s, d, payload in cap.frames if secret.encode() in payload]
    assert carried and all(8080 in sd and 15008 not in sd for sd in carried), (carried, sorted(cap.ports()))

    # Labelled: both running pods enrolled by their node's ztunnel within 2 s.
    t0 = time.monotonic()
    kube.kubectl("label", "namespace", NS, "istio.io/dataplane-mode=ambient")
    want = {mesh.a: f"{NS}/{echo['metadata']['name']}", mesh.b: f"{NS}/client"}
    poll(lambda: all(uid in mesh.admin(n).get("enrolled", ()) for n, uid in want.items()), 2.0, "both pods enrolled")
    enrolled_in = time.monotonic() - t0
    # Captured: the node's ztunnel pinned its programs' links for the pod on that node's bpffs.
    pins = {n: f"/sys/fs/bpf/{PREFIX}/{n}/ambient" for n in want}
    assert all(pod_links(pins[n], uid) for n, uid in want.items())
    secret = f"payload-{os.getpid()}-meshed"
    with Capture(fabric) as cap:
        out = _call(mesh, client, f"echo.{NS}.svc.cluster.local", secret)
    assert out.stdout.strip() == f"echo {secret}", (out.stderr, mesh.nodes.log(mesh.b))
    assert 15008 in cap.ports() and not cap.saw(secret.encode()), sorted(cap.ports())
    assert any(payload[:1] == b"\x17" for s, d, payload in cap.frames if 15008 in (s, d))  # TLS application data

    # An AuthorizationPolicy made with kubectl: only another ServiceAccount may call echo.
    t0 = time.monotonic()
    kube.apply(json.dumps({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "only-other", "namespace": NS},
        "spec": {"selector": {"matchLabels": {"app": "echo"}}, "action": "ALLOW",
                 "rules": [{"from": [{"source": {"principals": [f"cluster.local/ns/{NS}/sa/other"]}}]}]}}))
    poll(lambda: _call(mesh, client, vip, "denied?").stdout.strip() != "echo denied?", 2.0, "policy enforced")
    denied_in = time.monotonic() - t0
    kube.kubectl("delete", "authorizationpolicy", "only-other", "-n", NS)
    poll(lambda: _call(mesh, client, vip, "again").stdout.strip() == "echo again", 5, "allowed again")

    # Label removed: released, plaintext again and nothing on 15008.
    kube.kubectl("label", "namespace", NS, "istio.io/dataplane-mode-")
    poll(lambda: all((d := mesh.admin(n)) and uid not in d["enrolled"] for n, uid in want.items()), 2.0,
         "both pods released")
    assert not any(pod_links(pins[n], uid) for n, uid in want.items())  # capture detached
    secret = f"payload-{os.getpid()}-released"
    with Capture(fabric) as cap:  # by name this time: the node's hosts file has the Service
        out = _call(mesh, client, f"echo.{NS}.svc", secret)
    assert out.returncode == 0 and out.stdout.strip() == f"echo {secret}", out.stderr
    # The payload crossed in plaintext straight to the app's port, not through a tunnel (a pooled
    # HBONE connection from before may still say goodbye on 15008 meanwhile).
    carried = [(s, d) for s, d, payload in cap.frames if secret.encode() in payload]
    assert carried and all(8080 in sd and 15008 not in sd for sd in carried), (carried, sorted(cap.ports()))
    print(f"enrolled in {enrolled_in:.2f} s, policy enforced in {denied_in:.2f} s")


WEB = ("import http.server, os\n"
       "class H(http.server.BaseHTTPRequestHandler):\n"
       "    def do_GET(self):\n"
       "        b = os.environ['VERSION'].encode(); self.send_response(200)\n"
       "        self.send_header('content-length', str(len(b))); self.end_headers(); self.wfile.write(b)\n"
       "    def log_message(self, *a): pass\n"
       "http.server.HTTPServer(('0.0.0.0', 8080), H).serve_forever()\n")
REQUESTS = ("import collections, http.client, sys\n"
            "seen = collections.Counter()\n"
            "for _ in range(int(sys.argv[2])):\n"
            "    c = http.client.HTTPConnection(sys.argv[1], 80, timeout=5); c.request('GET', '/')\n"
            "    r = c.getresponse(); seen[f'{r.status} {r.read().decode()}'] += 1; c.close()\n"
            "print(dict(seen))\n")


def test_a_waypoint_gateway_runs_and_the_seed_canary_splits_through_it(mesh: Mesh) -> None:
    kube = mesh.kube
    poll(lambda: all(mesh.admin(n).get("connected") for n in (mesh.a, mesh.b)), 90, "ztunnels connected")
    kube.kubectl("create", "namespace", NSW)
    kube.kubectl("label", "namespace", NSW, "istio.io/dataplane-mode=ambient")
    poll(lambda: kube.kubectl("get", "sa", "default", "-n", NSW, check=False).returncode == 0, 30, "default SA")
    # The control plane publishes its root in every namespace, as istiod's namespace controller
    # does: the waypoint pod mounts the namespace's own copy, the same root as istio-system's.
    root = json.loads(kube.kubectl("get", "configmap", "istio-ca-root-cert", "-n", "istio-system", "-o", "json").stdout)
    copy = poll(lambda: (p := kube.kubectl("get", "configmap", "istio-ca-root-cert", "-n", NSW, "-o", "json",
                                           check=False)).returncode == 0 and json.loads(p.stdout), 15,
                "the root ConfigMap published in the new namespace")
    assert copy["data"] == root["data"]
    out = _ambient("waypoint", "apply", "-n", NSW, f"--kubeconfig={kube.kubeconfig}")
    assert out.returncode == 0, out.stderr
    try:
        wp = poll(lambda: next((p for p in _pods(kube, NSW, "gateway.networking.k8s.io/gateway-name=waypoint")
                                if _ready(p)), None), 90, "waypoint pod Ready")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{_state(mesh, NSW)}") from None
    objs = [{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": f"web-{v}", "namespace": NSW},
             "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web", "version": v}},
                      "template": {"metadata": {"labels": {"app": "web", "version": v}}, "spec": {
                          "nodeSelector": {"kubernetes.io/hostname": mesh.a}, "terminationGracePeriodSeconds": 1,
                          "containers": [{"name": "web", "image": "none", "command": ["python3", "-c", WEB],
                                          "env": [{"name": "VERSION", "value": v}],
                                          "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}}}
            for v in ("v1", "v2")]
    objs += [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": NSW,
                                                             "labels": {"istio.io/use-waypoint": "waypoint"}},
         "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client", "namespace": NSW, "labels": {"app": "client"}},
         "spec": {"nodeName": mesh.b, "terminationGracePeriodSeconds": 1,
                  "containers": [{"name": "c", "image": "none",
                                  "command": ["python3", "-c", "import time; time.sleep(100000)"]}]}},
        # The seed article's canary, as deploy/local/shop.yaml has it.
        {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "web", "namespace": NSW},
         "spec": {"hosts": ["web"], "http": [{"route": [
             {"destination": {"host": "web", "subset": "v1"}, "weight": 95},
             {"destination": {"host": "web", "subset": "v2"}, "weight": 5}]}]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "web", "namespace": NSW},
         "spec": {"host": "web", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                             {"name": "v2", "labels": {"version": "v2"}}]}},
    ]
    kube.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(o) for o in objs))
    poll(lambda: len([p for p in _pods(kube, NSW, "app in (web, client)") if _ready(p)]) == 3, 60, "app pods Ready")
    [client] = _pods(kube, NSW, "app=client")
    # Through the waypoint once the routes reached it: a v2 answer only comes from the split.
    dest = f"web.{NSW}.svc.cluster.local"
    poll(lambda: "200 v2" in _exec(mesh, client, REQUESTS, dest, "40").stdout, 30, "the canary answers")
    before = _requests_total(mesh, wp)
    n = 200
    r = _exec(mesh, client, REQUESTS, dest, str(n), timeout=120)
    seen = json.loads(r.stdout.replace("'", '"')) if r.returncode == 0 else {}
    assert sum(seen.values()) == n and set(seen) <= {"200 v1", "200 v2"}, (r.stdout, r.stderr)
    share = seen.get("200 v2", 0) / n
    assert 0.01 <= share <= 0.09, seen  # 5 % +- 4 %
    assert _requests_total(mesh, wp) - before >= n  # the waypoint's own counter: the requests went through it
    print(f"canary share {share:.1%} of {n}")


def _state(mesh: Mesh, ns: str) -> str:
    """What a failed wait shows: the namespace's objects, the nodes' logs, istiod's log's tail."""
    objs = mesh.kube.kubectl("get", "gateway,deploy,rs,pods,svc", "-n", ns, "-o", "wide", check=False)
    cp = [open(f).read()[-3000:] for n in (mesh.a, mesh.b) for f in glob.glob(
        os.path.join(mesh.nodes.state_dir, n, "logs", "istio-system_istiod-*_discovery.log"))]
    return "\n".join([objs.stdout + objs.stderr, mesh.nodes.log(mesh.a), mesh.nodes.log(mesh.b), *cp])


METRICS = ("import asyncio, sys\n"
           "from mesh.admin_http import get_unix\n"
           "status, body = asyncio.run(get_unix('/var/run/ambient/admin.sock', '/metrics'))\n"
           "sys.stdout.write(body.decode() if status == 200 else f'status {status}')\n")


def _requests_total(mesh: Mesh, waypoint: dict) -> float:
    """The sum of the waypoint's istio_requests_total series, from its admin socket in its
    emptyDir run dir, read inside the waypoint pod (the host's path is too long for AF_UNIX)."""
    r = _exec(mesh, waypoint, METRICS)
    assert r.returncode == 0 and "istio_requests_total" in r.stdout, (r.stdout[-2000:], r.stderr)
    return sum(float(line.rsplit(" ", 1)[1]) for line in r.stdout.splitlines()
               if line.startswith("istio_requests_total{"))


# Exchanges until stdin closes: one line at a time on one long-lived connection, and a new
# connection for every round; prints the times of the successes and the failures, as JSON.
LOOP = ("import json, socket, sys, threading, time\n"
        "dest, port = sys.argv[1], int(sys.argv[2])\n"
        "stop = threading.Event()\n"
        "threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()\n"
        "def exchange(s, msg):\n"
        "    s.sendall(msg + b'\\n'); want = b'echo ' + msg + b'\\n'; got = b''\n"
        "    while len(got) < len(want) and (d := s.recv(1000)):\n"
        "        got += d\n"
        "    if got != want:\n"
        "        raise ValueError(f'got {got!r}')\n"
        "out = {'long': [], 'new': [], 'failures': []}\n"
        "long = None\n"
        "i = 0\n"
        "while not stop.is_set():\n"
        "    i += 1\n"
        "    for kind in ('long', 'new'):\n"
        "        try:\n"
        "            if kind == 'new' or long is None:\n"
        "                s = socket.create_connection((dest, port), timeout=10)\n"
        "                if kind == 'long':\n"
        "                    long = s\n"
        "            else:\n"
        "                s = long\n"
        "            exchange(s, f'{kind}-{i}'.encode())\n"
        "            if kind == 'new':\n"
        "                s.close()\n"
        "            out[kind].append(time.time())\n"
        "        except (OSError, ValueError) as e:\n"
        "            out['failures'].append([time.time(), kind, repr(e)])\n"
        "            if kind == 'long':\n"
        "                long = None\n"
        "    time.sleep(0.05)\n"
        "print(json.dumps(out))\n")


def test_control_plane_pod_deleted_traffic_flows_and_the_new_one_manages_the_mesh(mesh: Mesh) -> None:
    """The control plane's pod is deleted (its Deployment makes a new one) while a meshed
    client on node b talks to a server on node a, over one long-lived connection and a new
    connection each round: no exchange fails while the ztunnels are without a control plane
    (they keep their state and certificates), the new pod becomes Ready, every ztunnel
    reconnects and holds the same state, and a policy made afterwards is enforced.

    On reconnect the ztunnel subscribes again and receives a full snapshot: the protocol has no
    resume from a version (Subscribe carries last_version, the server sends its whole state), and
    a new control-plane process counts versions from its own start. So what is compared is the
    state's contents, not its version; the watch resume and the 410 relist are the control
    plane's, against the API server (test_kube_source.py)."""
    kube = mesh.kube
    nodes = (mesh.a, mesh.b)
    poll(lambda: all(mesh.admin(n).get("connected") for n in nodes), 90, "ztunnels connected")
    vip = _app(kube, mesh.a, mesh.b, NSR)
    kube.kubectl("label", "namespace", NSR, "istio.io/dataplane-mode=ambient")
    [client] = _pods(kube, NSR, "app=client")
    [echo] = _pods(kube, NSR, "app=echo")
    want = {mesh.a: f"{NSR}/{echo['metadata']['name']}", mesh.b: f"{NSR}/client"}
    poll(lambda: all(uid in mesh.admin(n).get("enrolled", ()) for n, uid in want.items()), 10, "both pods enrolled")
    poll(lambda: _call(mesh, client, vip, "hello").stdout.strip() == "echo hello", 10, "echo answers in the mesh")
    [old] = [p for p in _pods(kube, "istio-system", "app=istiod") if _ready(p)]
    # The comparison below needs a state nothing else is changing: an earlier test's namespace
    # still terminating (teardown does not wait) loses its pods while the control plane is
    # away, and that is not what is tested (CI: its two workloads were in `before` only).
    poll(lambda: _no_namespace_terminating(kube), 120, "earlier tests' namespaces gone")
    poll(lambda: all(_only_live_namespaces(kube, mesh.admin(n)) for n in nodes), 30,
         "the ztunnels' state without those namespaces")
    before = {n: mesh.admin(n) for n in nodes}
    assert all(d.get("connected") for d in before.values()), before

    loop = subprocess.Popen(_exec_argv(mesh, client, LOOP, vip, "80"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1)  # a few rounds before
        t_delete = time.time()
        kube.kubectl("delete", "pod", "-n", "istio-system", old["metadata"]["name"], "--wait=false")
        down: dict[str, float] = {}  # node -> when its ztunnel was first seen without a control plane

        def reconnected() -> bool:
            dumps = {n: mesh.admin(n) for n in nodes}
            for n, d in dumps.items():
                if d and not d["connected"]:
                    down.setdefault(n, time.time())
            return all(d and d["connected"] and d["client"]["connects"] > before[n]["client"]["connects"]
                       for n, d in dumps.items())
        try:
            poll(reconnected, 120, "every ztunnel connected to a new control plane", interval=0.1)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{_state(mesh, 'istio-system')}") from None
        t_back = time.time()
        new = poll(lambda: next((p for p in _pods(kube, "istio-system", "app=istiod")
                                 if _ready(p) and p["metadata"]["uid"] != old["metadata"]["uid"]), None), 30,
                   "the new control-plane pod Ready")
        time.sleep(1)  # a few rounds after
    finally:
        out, err = loop.communicate("", timeout=60)
    assert loop.returncode == 0, err[-3000:]
    seen = json.loads(out)
    # Nothing failed, and both kinds of exchange went on while the control plane was away.
    assert seen["failures"] == [], (seen["failures"][:10], mesh.nodes.log(mesh.a), mesh.nodes.log(mesh.b))
    during = {k: sum(t_delete < t < t_back for t in seen[k]) for k in ("long", "new")}
    assert all(during.values()), (during, t_delete, t_back, len(seen["long"]), len(seen["new"]))
    assert new["metadata"]["name"] != old["metadata"]["name"]

    # The same state as before (the control plane's own pod aside), from a fresh snapshot.
    after = {n: mesh.admin(n) for n in nodes}
    for n in nodes:
        assert after[n]["client"]["snapshots"] > before[n]["client"]["snapshots"], after[n]["client"]
        assert _contents(after[n]) == _contents(before[n]), n
        assert want[n] in after[n]["enrolled"], after[n]["enrolled"]
    for p in _pods(kube, "istio-system", "app=ztunnel"):
        assert p["status"]["containerStatuses"][0]["restartCount"] == 0, p["status"]

    # Managed again: a DENY made now is enforced, and its removal too.
    kube.apply(json.dumps({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-client", "namespace": NSR},
        "spec": {"selector": {"matchLabels": {"app": "echo"}}, "action": "DENY",
                 "rules": [{"from": [{"source": {"principals": [f"cluster.local/ns/{NSR}/sa/default"]}}]}]}}))
    poll(lambda: _call(mesh, client, vip, "denied?").stdout.strip() != "echo denied?", 5.0, "DENY enforced")
    kube.kubectl("delete", "authorizationpolicy", "deny-client", "-n", NSR)
    poll(lambda: _call(mesh, client, vip, "again").stdout.strip() == "echo again", 5.0, "allowed again")
    gaps = {n: round(t_back - t, 2) for n, t in down.items()}
    print(f"control plane away {t_back - t_delete:.1f} s (ztunnels seen disconnected for up to {gaps} s); "
          f"exchanges meanwhile: {during}")


def _no_namespace_terminating(kube: KubeCluster) -> bool:
    items = json.loads(kube.kubectl("get", "namespaces", "-o", "json").stdout)["items"]
    return not any(ns.get("status", {}).get("phase") == "Terminating" for ns in items)


def _only_live_namespaces(kube: KubeCluster, dump: dict) -> bool:
    """No workload or service in the ztunnel's state belongs to a namespace the API server
    no longer has."""
    live = {ns["metadata"]["name"] for ns in json.loads(kube.kubectl("get", "namespaces", "-o", "json").stdout)["items"]}
    return bool(dump) and all(o["namespace"] in live for kind in ("workloads", "services") for o in dump[kind])


def _contents(dump: dict) -> list[str]:
    """A ztunnel's state as comparable text, without what the control plane's restart changes
    (its own pod, and its Service's endpoints)."""
    return sorted(json.dumps(o, sort_keys=True) for kind in ("workloads", "services", "namespaces", "policies")
                  for o in dump[kind] if not (kind in ("workloads", "services") and o["namespace"] == "istio-system"))
