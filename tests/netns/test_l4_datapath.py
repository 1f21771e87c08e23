"""End to end (root): eBPF capture + ztunnel HBONE between two nodes, against plain traffic.

One cluster for the module: namespace `mesh` (ambient) and `plain`, pods on both nodes, a
Service. Tests run in file order; the last one releases the namespace and takes it all down.
"""
import collections
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from localcluster.paths import ClusterPaths

from .cluster_helper import ROOT, LocalCluster, Tcpdump, pod_yaml, wait_for

NAME = f"l4{os.getpid() % 100000}"
PATHS = ClusterPaths(NAME)
MB10 = 10 * 1024 * 1024


def cluster_yaml(ambient=True):
    label = "{istio.io/dataplane-mode: ambient}" if ambient else "{}"
    return textwrap.dedent(f"""
        apiVersion: v1
        kind: Node
        metadata: {{name: n1}}
        ---
        apiVersion: v1
        kind: Node
        metadata: {{name: n2}}
        ---
        apiVersion: v1
        kind: Namespace
        metadata: {{name: mesh, labels: {label}}}
        ---
        apiVersion: v1
        kind: Namespace
        metadata: {{name: plain}}
        ---
        apiVersion: v1
        kind: ServiceAccount
        metadata: {{name: client, namespace: mesh}}
        ---
        apiVersion: v1
        kind: ServiceAccount
        metadata: {{name: server, namespace: mesh}}
        ---
        apiVersion: v1
        kind: Service
        metadata: {{name: echo, namespace: mesh}}
        spec:
          selector: {{app: echo}}
          ports: [{{port: 80, targetPort: 8080}}]
        """) + "".join([
        pod_yaml("m1", "mesh", "n1", "client", "client"),
        pod_yaml("m2", "mesh", "n1", "echo", "server"),
        pod_yaml("m3", "mesh", "n2", "echo", "server"),
        pod_yaml("p1", "plain", "n1", "plain"),
        pod_yaml("p2", "plain", "n2", "plain"),
    ])


C: LocalCluster = None  # set by the module fixture


def ambient(*args, check=True):
    return C.ambient(*args, check=check)


def status():
    return C.status()


def ip(name):
    return C.ip(name)


def echo(src_ns, src, dst_ip, port=8080, nbytes=100_000, check=True):
    ns = {"m": "mesh", "p": "plain"}[src[0]] if src_ns is None else src_ns
    return C.echo(ns, src, dst_ip, port, nbytes, check)


def admin(node, path):
    return C.admin(node, path)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    global C
    d = tmp_path_factory.mktemp("l4")
    C = LocalCluster(NAME, d)
    (d / "cluster.yaml").write_text(cluster_yaml())
    (d / "plain-ns.yaml").write_text(cluster_yaml(ambient=False))
    ambient("down", check=False)
    ambient("up", str(d / "cluster.yaml"))
    wait_for(lambda: all(len(admin(n, "/config_dump")["enrolled"]) == want
                         for n, want in (("n1", 2), ("n2", 1))), timeout=10)
    yield d
    C.destroy()


@pytest.mark.root
@pytest.mark.parametrize("src, dst", [("m1", "m3"), ("m1", "m2"), ("m3", "m2")],
                         ids=["cross-node", "same-node", "reverse"])
def test_meshed_pod_to_pod_is_byte_exact_and_keeps_original_destination(cluster, src, dst):
    out = echo(None, src, ip(dst), nbytes=MB10).stdout
    assert f"echo ok: {MB10}/{MB10} bytes" in out
    assert f"hello from {dst} (mesh) local={ip(dst)}:8080 " in out


@pytest.mark.root
def test_service_vip_reaches_an_endpoint(cluster):
    vip = next(s["cluster_ip"] for s in status()["services"] if s["name"] == "echo")
    seen = set()
    for _ in range(8):
        out = echo(None, "m1", vip, port=80, nbytes=MB10 if not seen else 1000).stdout
        assert "echo ok" in out
        m = re.search(r"hello from (\w+) \(mesh\) local=([\d.]+):8080", out)
        assert m and m.group(2) == ip(m.group(1))
        seen.add(m.group(1))
    assert seen <= {"m2", "m3"} and seen


@pytest.mark.root
@pytest.mark.parametrize("src, dst", [("p1", "m3"), ("m1", "p2"), ("p1", "p2")],
                         ids=["plain-to-mesh", "mesh-to-plain", "plain-to-plain"])
def test_mixed_traffic_still_flows(cluster, src, dst):
    out = echo(None, src, ip(dst), nbytes=MB10).stdout
    assert f"echo ok: {MB10}/{MB10} bytes" in out
    assert f"local={ip(dst)}:8080" in out


@pytest.mark.root
def test_destination_ztunnel_records_the_client_identity(cluster):
    before = admin("n2", "/config_dump")["connections_total"]
    echo(None, "m1", ip("m3"))
    wait_for(lambda: admin("n2", "/config_dump")["connections_total"] > before)
    conns = [c for c in admin("n2", "/connections") if c.get("direction") == "inbound"
             and c.get("dst.workload") == "m3" and c.get("dst.namespace") == "mesh"]
    last = conns[-1]
    assert last["src.identity"] == "spiffe://cluster.local/ns/mesh/sa/client"
    assert last["dst.identity"] == "spiffe://cluster.local/ns/mesh/sa/server"
    assert last["security"] == "mutual_tls"
    assert last["src.addr"].startswith(ip("m1") + ":")
    assert (last["src.workload"], last["src.namespace"]) == ("m1", "mesh")
    # bytes_sent counts source -> destination: the client's 100 000 bytes; back: echo + greeting
    assert last["bytes_sent"] == 100_000 and last["bytes_recv"] > 100_000 and "duration_ms" in last


@pytest.mark.root
def test_meshed_payload_never_crosses_nodes_in_plaintext(cluster, tmp_path):
    marker = "Z" * 64  # the echo client sends random bytes; look for its greeting instead
    cap = Tcpdump.fabric(tmp_path / "mesh.pcap", PATHS)
    try:
        out = echo(None, "m1", ip("m3"), nbytes=2_000_000).stdout
    finally:
        raw = cap.stop()
    assert "echo ok" in out
    assert b"hello from m3" not in raw           # the app's bytes are inside TLS
    assert 15008 in cap.ports()                 # ...to ztunnel's HBONE port
    assert 8080 not in cap.ports()
    cap = Tcpdump.fabric(tmp_path / "plain.pcap", PATHS)
    try:
        out = echo(None, "p1", ip("p2")).stdout
    finally:
        raw = cap.stop()
    assert b"hello from p2 (plain)" in raw       # plain namespace: readable on the wire
    assert 8080 in cap.ports() and 15008 not in cap.ports()
    del marker


def _boot_start(pid):
    """A process's start on CLOCK_BOOTTIME (/proc/<pid>/stat starttime, in clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")


@pytest.mark.root
def test_ztunnel_crash_fails_closed_no_plaintext_escapes_and_recovers(cluster, tmp_path):
    """SIGKILL n1's ztunnel while m1 keeps sending a known payload to a meshed pod on each node
    and to a plain pod: until the runner's restart every attempt is refused inside m1 and
    nothing of m1's (no SYN, no byte) reaches the node; the restarted ztunnel re-opens the
    pins (nothing attached twice) and meshed requests succeed again."""
    nonce = os.urandom(6).hex()
    targets = [f"{ip('m3')}:8080", f"{ip('m2')}:8080", f"{ip('p2')}:8080"]
    stop = cluster / f"stop-probe-{nonce}"
    probe = subprocess.Popen([sys.executable, "-m", "localcluster.cli", "-c", NAME, "exec", "-n", "mesh", "m1", "--",
                              "python3", os.path.join(ROOT, "tests", "netns", "crash_probe.py"), "--nonce", nonce,
                              "--duration", "40", "--stop-file", str(stop), *(a for t in targets for a in ("--target", t))],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(probe.stdout.readline, "")), daemon=True)
    reader.start()

    def attempts():
        return [(w[2], w[3], float(w[4]), float(w[5]), int(w[1]), w[6])
                for w in (ln.split() for ln in list(lines)) if w[:1] == ["attempt"]]

    cap = None
    try:
        wait_for(lambda: {a[0] for a in attempts() if a[1] == "ok"} == set(targets), timeout=15, step=0.1)
        old = next(n for n in status()["nodes"] if n["name"] == "n1")["ztunnel"]
        cap = Tcpdump.node(tmp_path / "crash.pcap", next(n["netns"] for n in status()["nodes"] if n["name"] == "n1"))
        kill_boot, kill_wall = time.clock_gettime(time.CLOCK_BOOTTIME), time.time()
        os.kill(old["pid"], signal.SIGKILL)
        # The runner restarts ztunnel (>= 1 s backoff); it re-opens the pinned maps and links.
        wait_for(lambda: (lambda z: z["pid"] not in (None, old["pid"]) and z["restarts"] == old["restarts"] + 1)(
            next(n for n in status()["nodes"] if n["name"] == "n1")["ztunnel"]), timeout=15, step=0.05)
        new_pid = next(n for n in status()["nodes"] if n["name"] == "n1")["ztunnel"]["pid"]
        spawn_boot = _boot_start(new_pid)
        spawn_wall = kill_wall + (spawn_boot - kill_boot)
        wait_for(lambda: {a[0] for a in attempts() if a[1] == "ok" and a[2] > spawn_boot} >= set(targets),
                 timeout=15, step=0.05)
        raw = cap.stop()
        stop.touch()
        probe.wait(timeout=15)
    finally:
        if cap is not None and cap.p.poll() is None:
            cap.p.kill()
        if probe.poll() is None:
            probe.kill()
            probe.wait()
    reader.join(timeout=5)
    tries = attempts()
    down = [a for a in tries if kill_boot + 0.05 < a[2] < spawn_boot]
    print(f"{len(down)} attempts while n1's ztunnel was down ({spawn_boot - kill_boot:.2f}s): "
          f"{collections.Counter((a[0], a[1], a[5]) for a in down)}")
    assert len(down) >= 3 * len(targets), down
    assert all(a[1] == "fail" and a[5] == "ECONNREFUSED" for a in down), [a for a in down if a[5] != "ECONNREFUSED"]
    # Nothing of m1 on the node while ztunnel was down: no SYN, no payload byte, from m1's IP.
    m1 = ip("m1")
    escaped = [pk for pk in cap.packets() if pk[1] == m1 and kill_wall + 0.05 < pk[0] < spawn_wall
               and (pk[3] or (pk[4] > 0 and pk[2] != 15008))]   # (a dying HBONE socket's TLS may still flush)
    assert escaped == [], escaped
    for a in down:
        assert f"PROBE-{nonce}-{a[4]}.".encode() not in raw
    # ...while the capture does see it when it is legitimately plaintext: m1 -> p2 (not meshed)
    # after the restart, and the meshed m1 -> m3 payload is inside TLS on 15008.
    after = [a for a in tries if a[2] > spawn_boot and a[1] == "ok"]
    assert any(f"PROBE-{nonce}-{a[4]}.".encode() in raw for a in after if a[0] == targets[2])
    assert not any(f"PROBE-{nonce}-{a[4]}.".encode() in raw for a in after if a[0] == targets[0])
    first = {t: min(a[2] for a in after if a[0] == t) - spawn_boot for t in targets[:2]}
    print(f"recovery after the new ztunnel started: cross-node {first[targets[0]]:.3f}s, "
          f"same-node {first[targets[1]]:.3f}s (spawned {spawn_boot - kill_boot:.2f}s after the kill)")
    wait_for(lambda: len(admin("n1", "/config_dump")["enrolled"]) == 2, timeout=5)
    m1p = next(p for p in status()["pods"] if p["name"] == "m1")
    progs = subprocess.run(["bpftool", "cgroup", "show", m1p["cgroup"]], capture_output=True, text=True).stdout
    assert progs.count("capture_connect4") == 1 and progs.count("capture_sockops") == 1, progs


@pytest.mark.root
def test_releasing_the_namespace_restores_direct_traffic(cluster, tmp_path):
    t0 = time.monotonic()
    ambient("apply", str(cluster / "plain-ns.yaml"))
    wait_for(lambda: admin("n1", "/config_dump")["enrolled"] == [] and admin("n2", "/config_dump")["enrolled"] == [],
             timeout=3)
    assert time.monotonic() - t0 < 3
    cap = Tcpdump.fabric(tmp_path / "released.pcap", PATHS)
    try:
        out = echo(None, "m1", ip("m3")).stdout
    finally:
        raw = cap.stop()
    assert f"hello from m3 (mesh) local={ip('m3')}:8080 peer={ip('m1')}:" in out
    assert b"hello from m3" in raw and 15008 not in cap.ports()


def longconn(src, dst_ip, duration):
    return C.longconn("mesh", src, dst_ip, duration)


@pytest.mark.root
def test_enrolling_is_fast_and_keeps_open_connections(cluster):
    # The namespace is released (previous test); a connection opened now is direct.
    direct = longconn("m1", ip("m3"), duration=3)
    time.sleep(0.5)
    t0 = time.monotonic()
    ambient("apply", "--no-wait", str(cluster / "cluster.yaml"))
    wait_for(lambda: len(admin("n1", "/config_dump")["enrolled"]) == 2
             and len(admin("n2", "/config_dump")["enrolled"]) == 1, timeout=3, step=0.01)
    enroll_s = time.monotonic() - t0
    print(f"enrolled 3 pods on 2 nodes in {enroll_s * 1000:.0f} ms")
    assert enroll_s < 1.0
    before = admin("n2", "/config_dump")["connections_total"]
    out = echo(None, "m1", ip("m3")).stdout  # a new connection is meshed
    assert "echo ok" in out
    wait_for(lambda: admin("n2", "/config_dump")["connections_total"] > before)
    through = admin("n2", "/config_dump")["connections_total"]
    meshed = longconn("m1", ip("m3"), duration=3)  # open through the mesh...
    time.sleep(0.5)
    ambient("apply", "--no-wait", str(cluster / "plain-ns.yaml"))  # ...then released
    out_direct, _ = direct.communicate(timeout=15)
    out_meshed, _ = meshed.communicate(timeout=15)
    assert direct.returncode == 0 and out_direct.strip().splitlines()[-1].startswith("ok"), out_direct
    assert f"peer={ip('m1')}:" in out_direct  # it really was the direct connection
    assert meshed.returncode == 0 and out_meshed.strip().splitlines()[-1].startswith("ok"), out_meshed
    assert f"peer={ip('m1')}:" in out_meshed  # ztunnel delivered it, keeping the client's IP...
    # ...and recorded it when it ended (the released pod's listeners were drained, not cut)
    wait_for(lambda: admin("n2", "/config_dump")["connections_total"] > through, timeout=5)


def our_bpf():
    """IDs of this cluster's maps (from its pins) and of the programs and links using them."""
    maps = set()
    for root, _, files in os.walk(PATHS.bpf_pin_dir):
        if os.path.basename(root) == "maps":
            for f in files:
                out = subprocess.run(["bpftool", "-j", "map", "show", "pinned", os.path.join(root, f)],
                                     capture_output=True, text=True).stdout
                maps.add(json.loads(out)["id"])
    progs = {p["id"] for p in json.loads(subprocess.run(["bpftool", "-j", "prog", "list"], capture_output=True,
                                                         text=True).stdout)
             if maps & set(p.get("map_ids", []))}
    return maps, progs


def live_bpf(maps, progs):
    now_progs = {p["id"] for p in json.loads(subprocess.run(["bpftool", "-j", "prog", "list"], capture_output=True,
                                                             text=True).stdout)}
    now_maps = {m["id"] for m in json.loads(subprocess.run(["bpftool", "-j", "map", "list"], capture_output=True,
                                                            text=True).stdout)}
    links = json.loads(subprocess.run(["bpftool", "-j", "link", "list"], capture_output=True, text=True).stdout)
    return (maps & now_maps, progs & now_progs, [l["id"] for l in links if l.get("prog_id") in progs])


@pytest.mark.root
def test_down_leaves_no_bpf_program_link_or_pin(cluster):
    ambient("apply", str(cluster / "cluster.yaml"))  # enrolled again, capture attached
    wait_for(lambda: len(admin("n1", "/config_dump")["enrolled"]) == 2, timeout=5)
    maps, progs = our_bpf()
    assert len(maps) >= 10 and len(progs) >= 8  # two nodes' worth, found through our pins
    assert live_bpf(maps, progs)[2]  # links attached (cgroups, netns) use our programs
    ambient("down")
    assert not os.path.exists(PATHS.bpf_pin_dir)
    wait_for(lambda: live_bpf(maps, progs) == (set(), set(), []), timeout=5)
