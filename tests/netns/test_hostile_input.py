"""End to end (root): hostile input on ztunnel's in-pod ports 15008 (HBONE) and 15006 (plaintext).

One cluster for the module (`hi<pid>`): ambient namespace `mesh` with m1 (client, n1), m2
(server, n1), m3 (server, n2); plain namespace with a1 (n1), the attacker. Attacks use sockets
the test process creates in a1's network namespace: they are not in a pod cgroup, so capture
leaves them alone and they hit m3's 15008/15006 directly, across the fabric.

Every test asserts how the connection was refused, that the n2 ztunnel logged the stable
reason (one WARNING access-log line) and counted it (ztunnel_inbound_rejected_total or
istio_tcp_connections_failed), and -- in the autouse `healthy` fixture -- that no ztunnel
restarted and a meshed m1 -> m3 echo still works afterwards. The cluster runs with
ZTUNNEL_HANDSHAKE_TIMEOUT=1 so the timeout cases take a second.
"""
import os
import re
import shutil
import socket
import ssl
import textwrap
import threading
import time

import hpack
import pytest

from mesh.linux.netns import socket_in_netns
from mesh import tls
from controlplane.ca import CertificateAuthority
from mesh.ca import build_csr, generate_key
from mesh.clock import SystemClock
from mesh.distribution.client import CertificateRefused, ControlPlaneClient
from mesh.distribution.protocol import ALPN
from mesh.state import ProxyState
from mesh.proxy.bootstrap import load_bootstrap
from mesh.hbone import frames as f
from mesh.identity import SpiffeId
from tests.netns.cluster_helper import LocalCluster, pod_yaml, wait_for

NAME = f"hi{os.getpid() % 100000}"
TIMEOUT = 1.0          # ZTUNNEL_HANDSHAKE_TIMEOUT for this cluster
FLOOD = 2000
C: LocalCluster = None  # type: ignore[assignment]


def cluster_yaml():
    return textwrap.dedent("""
        apiVersion: v1
        kind: Node
        metadata: {name: n1}
        ---
        apiVersion: v1
        kind: Node
        metadata: {name: n2}
        ---
        apiVersion: v1
        kind: Namespace
        metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
        ---
        apiVersion: v1
        kind: Namespace
        metadata: {name: plain}
        ---
        apiVersion: v1
        kind: ServiceAccount
        metadata: {name: client, namespace: mesh}
        ---
        apiVersion: v1
        kind: ServiceAccount
        metadata: {name: server, namespace: mesh}
        ---
        apiVersion: v1
        kind: ServiceAccount
        metadata: {name: backend, namespace: mesh}
        """) + "".join([
        pod_yaml("m1", "mesh", "n1", "client", "client"),
        pod_yaml("m2", "mesh", "n1", "echo2", "server"),
        pod_yaml("m3", "mesh", "n2", "echo3", "backend"),
        pod_yaml("a1", "plain", "n1", "attacker"),
    ])


class Info:
    ips: dict
    netns: dict
    pids: dict
    ca: CertificateAuthority


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    global C
    d = tmp_path_factory.mktemp("hi")
    C = LocalCluster(NAME, d)
    (d / "cluster.yaml").write_text(cluster_yaml())
    C.ambient("down", check=False)
    env = dict(os.environ, ZTUNNEL_HANDSHAKE_TIMEOUT=str(TIMEOUT))
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "localcluster.cli", "-c", NAME, "up", str(d / "cluster.yaml")],
                       capture_output=True, text=True, timeout=120, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        assert p.returncode == 0, p.stdout + p.stderr
        wait_for(lambda: len(C.enrolled("n1")) == 2 and len(C.enrolled("n2")) == 1, timeout=15)
        st = C.status()
        info = Info()
        info.ips = {p["name"]: p["ip"] for p in st["pods"]}
        info.netns = {p["name"]: p["netns"] for p in st["pods"]}
        info.pids = {n["name"]: n["ztunnel"]["pid"] for n in st["nodes"]}
        info.ca = CertificateAuthority.load_or_create(C.paths.ca_dir, "cluster.local", clock=SystemClock())
        yield info
    finally:
        C.ambient("down", check=False)
        shutil.rmtree(C.paths.state_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def healthy(cluster):
    """After every attack: same ztunnel processes, and a meshed pod-to-pod echo works."""
    yield
    st = C.status()
    for n in st["nodes"]:
        assert n["ztunnel"]["pid"] == cluster.pids[n["name"]], f"ztunnel on {n['name']} restarted"
        assert n["ztunnel"]["restarts"] == 0
    out = C.echo("mesh", "m1", cluster.ips["m3"], nbytes=10_000).stdout
    assert "echo ok: 10000/10000 bytes" in out and "hello from m3 (mesh)" in out


# -- helpers ----------------------------------------------------------------------------

def attacker_socket(cluster, timeout=5.0):
    s = socket_in_netns(cluster.netns["a1"])
    s.settimeout(timeout)
    return s


def connect(cluster, port, pod="m3", timeout=5.0):
    s = attacker_socket(cluster, timeout)
    s.connect((cluster.ips[pod], port))
    return s


def metrics(node="n2"):
    return C.admin(node, "/metrics")


def metric_value(text, name, **labels):
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        body = line[len(name) + 1:line.rindex("}")]
        got = dict(re.findall(r'(\w+)="([^"]*)"', body))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def rejected(reason, workload="m3", node="n2"):
    return metric_value(metrics(node), "ztunnel_inbound_rejected_total", reason=reason,
                        destination_workload=workload)


def log_lines(node="n2"):
    with open(os.path.join(C.paths.logs_dir, f"ztunnel-{node}.log"), errors="replace") as fh:
        return fh.readlines()


def warned(reason, after, node="n2"):
    """WARNING access-log lines naming `reason`, among those after line `after`."""
    needle = f'"error":"{reason}"'
    return [ln for ln in log_lines(node)[after:] if " WARNING " in ln and needle in ln]


class Expect:
    """Snapshot the counter/log for `reason`; `check()` waits until both moved."""

    def __init__(self, reason, workload="m3", node="n2", metric=None):
        self.reason, self.workload, self.node = reason, workload, node
        self.metric = metric or (lambda: rejected(reason, workload, node))
        self.before = self.metric()
        self.lines = len(log_lines(node))

    def check(self, at_least=1, timeout=5.0):
        wait_for(lambda: self.metric() - self.before >= at_least and warned(self.reason, self.lines, self.node),
                 timeout=timeout, step=0.1)
        entries = [e for e in C.admin(self.node, "/connections") if e.get("error") == self.reason]
        assert entries, f"no /connections entry with error {self.reason}"
        return entries[-1]


def read_until_closed(s, limit=1 << 20, timeout=5.0):
    """Everything the server sends until it closes; 'reset' if it reset the connection."""
    s.settimeout(timeout)
    buf = b""
    try:
        while len(buf) < limit:
            d = s.recv(65536)
            if not d:
                return buf, "eof"
            buf += d
    except ConnectionResetError:
        return buf, "reset"
    except ssl.SSLError as e:
        return buf, f"ssl:{e.reason}"
    raise AssertionError("server did not close")


def client_cert(cluster, ns="plain", sa="default"):
    return cluster.ca.issue(SpiffeId(trust_domain="cluster.local", namespace=ns, service_account=sa))


def mtls(cluster, port=15008, pod="m3"):
    """A TLS 1.3 connection to `pod`:15008 with a valid mesh certificate (a1's identity)."""
    ctx = tls.client_context(client_cert(cluster), cluster.ca.roots_pem, alpn=("h2",))
    raw = connect(cluster, port, pod)
    return ctx.wrap_socket(raw, server_hostname=None)


def h2(cluster, pod="m3"):
    s = mtls(cluster, pod=pod)
    s.sendall(f.PREFACE + f.settings_frame({}))
    return s


def read_frames(s, until, timeout=5.0):
    """Parse server frames until `until(events)` is true or the server closes."""
    parser = f.FrameParser(expect_preface=False, max_frame_size=f.MAX_ALLOWED_FRAME_SIZE)
    events = []
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            d = s.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            break
        if not d:
            break
        events += parser.feed(d)
        if until(events):
            break
    return events


def status_of(events, sid=1):
    for ev in events:
        if isinstance(ev, f.HeadersReceived) and ev.stream_id == sid:
            return int(dict(ev.headers)[b":status"])
    return None


def goaway(events):
    return next((ev for ev in events if isinstance(ev, f.GoAwayReceived)), None)


def request(cluster, headers, pod="m3"):
    """Send one request header block on stream 1; returns the server's frames."""
    s = h2(cluster, pod)
    try:
        block = hpack.Encoder().encode(headers)
        s.sendall(f.frame(f.HEADERS, f.FLAG_END_HEADERS, 1, block))
        return read_frames(s, lambda evs: status_of(evs) is not None or goaway(evs))
    finally:
        s.close()


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as fh:
        return int(re.search(r"VmRSS:\s+(\d+)", fh.read()).group(1))


# -- 15008: before TLS ------------------------------------------------------------------

@pytest.mark.root
def test_random_bytes_on_15008_closed_as_not_tls(cluster):
    exp = Expect("not_tls")
    s = connect(cluster, 15008)
    s.sendall(os.urandom(4096))
    _, how = read_until_closed(s)
    s.close()
    assert how in ("eof", "reset")
    e = exp.check()
    assert e["event"] == "rejected" and e["stage"] == "tls" and e["src.addr"].startswith(cluster.ips["a1"])


@pytest.mark.root
def test_plain_http1_request_on_15008_closed(cluster):
    exp = Expect("http1_request")
    s = connect(cluster, 15008)
    s.sendall(b"GET / HTTP/1.1\r\nHost: m3\r\n\r\n")
    data, how = read_until_closed(s)
    s.close()
    assert how in ("eof", "reset") and not data.startswith(b"HTTP/1.1 200")
    exp.check()


@pytest.mark.root
def test_http1_inside_mtls_gets_goaway(cluster):
    exp = Expect("bad_preface")
    s = mtls(cluster)
    s.sendall(b"GET / HTTP/1.1\r\nHost: m3\r\n\r\n")
    evs = read_frames(s, goaway)
    s.close()
    g = goaway(evs)
    assert g is not None and g.error_code == f.ErrorCode.PROTOCOL_ERROR and g.debug_data == b"bad_preface"
    exp.check()


@pytest.mark.root
def test_tls_without_client_certificate_refused(cluster):
    exp = Expect("no_client_cert")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=cluster.ca.roots_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    s = ctx.wrap_socket(connect(cluster, 15008), server_hostname=None)   # TLS 1.3: client done first
    s.sendall(f.PREFACE + f.settings_frame({}))
    data, how = read_until_closed(s)
    s.close()
    assert data == b"" and (how.startswith("ssl:") or how in ("eof", "reset"))
    exp.check()


@pytest.mark.root
def test_tls12_only_client_fails_handshake(cluster):
    exp = Expect("wrong_tls_version")
    ctx = tls.client_context(client_cert(cluster), cluster.ca.roots_pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    raw = connect(cluster, 15008)
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        ctx.wrap_socket(raw, server_hostname=None)
    raw.close()
    exp.check()


@pytest.mark.root
def test_client_cert_from_another_trust_domain_refused(cluster):
    exp = Expect("untrusted_cert")
    other = CertificateAuthority.generate("evil.example", clock=SystemClock())
    cert = other.issue(SpiffeId(trust_domain="evil.example", namespace="mesh", service_account="client"))
    ctx = tls.client_context(cert, cluster.ca.roots_pem)       # trusts the mesh, presents evil's cert
    s = ctx.wrap_socket(connect(cluster, 15008), server_hostname=None)
    s.sendall(f.PREFACE + f.settings_frame({}))
    data, how = read_until_closed(s)
    s.close()
    assert data == b"" and how != "open"
    exp.check()


# -- 15008: handshakes that never complete ------------------------------------------------

@pytest.mark.root
@pytest.mark.parametrize("send, reason", [(b"", "handshake_timeout"),
                                          (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "handshake_timeout")],
                         ids=["silent", "mid-clienthello"])
def test_handshake_that_never_completes_is_closed_after_timeout(cluster, send, reason):
    exp = Expect(reason)
    s = connect(cluster, 15008)
    t0 = time.monotonic()
    s.sendall(send)
    _, how = read_until_closed(s, timeout=TIMEOUT + 5)
    took = time.monotonic() - t0
    s.close()
    assert how in ("eof", "reset")
    assert TIMEOUT * 0.8 <= took < TIMEOUT + 3, took
    exp.check()


@pytest.mark.root
def test_tls_but_no_http2_preface_is_closed_after_timeout(cluster):
    exp = Expect("h2_handshake_timeout")
    s = mtls(cluster)
    t0 = time.monotonic()
    evs = read_frames(s, lambda evs: False, timeout=TIMEOUT + 5)
    took = time.monotonic() - t0
    s.close()
    assert TIMEOUT * 0.8 <= took < TIMEOUT + 3, took
    assert goaway(evs) is not None         # closed with a GOAWAY after the server's SETTINGS
    exp.check()


# -- 15008: HTTP/2 that is not a valid HBONE CONNECT ----------------------------------------

@pytest.mark.root
def test_http2_get_answered_400(cluster):
    exp = Expect("scheme_or_path_present")
    evs = request(cluster, [(":method", "GET"), (":scheme", "https"), (":path", "/"),
                            (":authority", f"{cluster.ips['m3']}:8080")])
    assert status_of(evs) == 400 and goaway(evs) is None
    e = exp.check()
    assert e["stage"] == "stream" and e["status"] == 400
    assert e["src.identity"] == "spiffe://cluster.local/ns/plain/sa/default"


@pytest.mark.root
def test_connect_with_hostname_authority_answered_400(cluster):
    exp = Expect("authority_not_ip")
    dpe = metric_value(metrics(), "istio_tcp_connections_failed_total", response_flags="DPE",
                       destination_workload="m3")
    evs = request(cluster, [(":method", "CONNECT"), (":authority", "echo.mesh.svc.cluster.local:8080")])
    assert status_of(evs) == 400
    exp.check()
    assert metric_value(metrics(), "istio_tcp_connections_failed_total", response_flags="DPE",
                        destination_workload="m3") > dpe


@pytest.mark.root
def test_connect_to_another_pods_ip_answered_400(cluster):
    exp = Expect("authority_not_local")
    evs = request(cluster, [(":method", "CONNECT"), (":authority", f"{cluster.ips['m2']}:8080")])
    assert status_of(evs) == 400
    e = exp.check()
    assert e["dst.addr"] == f"{cluster.ips['m2']}:8080"


@pytest.mark.root
@pytest.mark.parametrize("port", [15006, 15008])
def test_connect_to_ztunnels_own_port_answered_400(cluster, port):
    exp = Expect("ztunnel_port")
    evs = request(cluster, [(":method", "CONNECT"), (":authority", f"{cluster.ips['m3']}:{port}")])
    assert status_of(evs) == 400
    exp.check()


@pytest.mark.root
def test_oversized_header_list_gets_goaway(cluster):
    exp = Expect("header_list_too_large")
    s = h2(cluster)
    block = hpack.Encoder().encode([(":method", "CONNECT"), (":authority", f"{cluster.ips['m3']}:8080"),
                                    ("x-big", "a" * 200_000)])
    try:
        s.sendall(f.headers_frames(1, block, end_stream=False, max_frame_size=16_384))
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        pass                                # the server may close while we still send
    evs = read_frames(s, goaway)
    s.close()
    g = goaway(evs)
    assert g is not None and g.error_code == f.ErrorCode.ENHANCE_YOUR_CALM
    exp.check()


@pytest.mark.root
def test_continuation_flood_gets_goaway(cluster):
    exp = Expect("too_many_continuations")
    s = h2(cluster)
    block = hpack.Encoder().encode([(":method", "CONNECT"), (":authority", f"{cluster.ips['m3']}:8080")])
    try:
        s.sendall(f.frame(f.HEADERS, 0, 1, block))
        empty = f.frame(f.CONTINUATION, 0, 1, b"")
        for _ in range(20):                   # 20 x 500 empty CONTINUATIONs: never END_HEADERS
            s.sendall(empty * 500)
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        pass
    evs = read_frames(s, goaway)
    s.close()
    g = goaway(evs)
    assert g is not None and g.error_code == f.ErrorCode.ENHANCE_YOUR_CALM
    assert g.debug_data == b"too_many_continuations"
    exp.check()


@pytest.mark.root
def test_never_ending_header_block_closed_after_timeout(cluster):
    exp = Expect("header_block_timeout")
    s = h2(cluster)
    block = hpack.Encoder().encode([(":method", "CONNECT"), (":authority", f"{cluster.ips['m3']}:8080")])
    s.sendall(f.frame(f.HEADERS, 0, 1, block) + f.frame(f.CONTINUATION, 0, 1, b""))
    t0 = time.monotonic()
    evs = read_frames(s, goaway, timeout=TIMEOUT + 5)
    took = time.monotonic() - t0
    s.close()
    assert goaway(evs) is not None and TIMEOUT * 0.8 <= took < TIMEOUT + 3, took
    exp.check()


# -- floods: bounded memory, other tenants keep flowing --------------------------------------

class RssSampler(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self):
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, rss_kb(self.pid))


def flood(cluster, port, n=FLOOD):
    socks = []
    try:
        for _ in range(n):
            s = attacker_socket(cluster)
            s.setblocking(False)
            try:
                s.connect((cluster.ips["m3"], port))
            except BlockingIOError:
                pass
            socks.append(s)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def _flood_case(cluster, port, reasons):
    pid = cluster.pids["n2"]
    before = rss_kb(pid)
    exps = [Expect(r) for r in reasons]
    sampler = RssSampler(pid)
    sampler.start()
    socks = flood(cluster, port)
    try:
        time.sleep(0.3)
        # During the flood: the flooded pod and another tenant both still serve meshed clients.
        for dst in ("m3", "m2"):
            out = C.echo("mesh", "m1", cluster.ips[dst], nbytes=10_000).stdout
            assert "echo ok: 10000/10000 bytes" in out
        time.sleep(max(0.0, TIMEOUT + 0.5 - 0.3))
    finally:
        for s in socks:
            s.close()
        sampler.stop.set()
        sampler.join()
    for e in exps:
        e.check()
    print(f"\nflood on {port}: ztunnel n2 RSS before {before} kB, peak {sampler.peak} kB "
          f"(+{sampler.peak - before} kB), after {rss_kb(pid)} kB")
    return before, sampler.peak


@pytest.mark.root
def test_half_open_flood_on_15008_is_bounded(cluster):
    before, peak = _flood_case(cluster, 15008, ["too_many_pending_handshakes", "handshake_timeout"])
    assert peak - before < 64 * 1024, (before, peak)


# -- 15006 (plaintext inbound) -------------------------------------------------------------

@pytest.mark.root
def test_random_bytes_on_15006_reach_the_app(cluster):
    s = connect(cluster, 8080)      # from a plain pod: captured into m3's 15006
    payload = os.urandom(50_000)
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    data, how = read_until_closed(s)
    s.close()
    greeting, _, echoed = data.partition(b"\n")
    assert greeting.startswith(b"hello from m3 (mesh) local=" + cluster.ips["m3"].encode() + b":8080")
    assert echoed == payload


@pytest.mark.root
def test_plaintext_to_ztunnels_own_port_is_reset_not_looped(cluster):
    exp = Expect("ztunnel_port")
    s = attacker_socket(cluster)
    try:
        s.connect((cluster.ips["m3"], 15006))   # the reset may come before connect() returns
        s.sendall(b"x")
        _, how = read_until_closed(s)
    except ConnectionResetError:
        how = "reset"
    finally:
        s.close()
    assert how == "reset"
    e = exp.check()
    assert e["direction"] == "inbound" and e["security"] == "plaintext"
    assert C.admin("n2", "/config_dump")["connections_total"] < 10_000   # no self-connection loop


@pytest.mark.root
def test_half_open_flood_on_15006_is_bounded(cluster):
    before, peak = _flood_case(cluster, 8080, [])
    assert peak - before < 96 * 1024, (before, peak)
    # The flood's connections end (closed by the attacker) and are logged.
    wait_for(lambda: sum(1 for e in C.admin("n2", "/connections") if e.get("security") == "plaintext"
                         and (e.get("src.addr") or "").startswith(cluster.ips["a1"] + ":")) >= 500,
             timeout=15, step=0.2)


@pytest.mark.root
def test_deny_policy_resets_plaintext(cluster):
    a1 = cluster.ips["a1"]
    policy = f"""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: deny-a1, namespace: mesh}}
        spec:
          selector: {{matchLabels: {{app: echo3}}}}
          action: DENY
          rules:
          - from:
            - source: {{ipBlocks: ["{a1}/32"]}}
        """
    deny = lambda: metric_value(metrics(), "istio_tcp_connections_failed_total",  # noqa: E731
                                response_flags="DENY", destination_workload="m3")
    C.apply(policy, "deny.yaml")         # returns once every ztunnel has the new state
    try:
        exp = Expect("denied_by_policy", metric=deny)
        try:
            s = connect(cluster, 8080)
        except ConnectionResetError:  # the reset can win the race with connect() returning
            data, how = b"", "reset"
        else:
            try:
                s.sendall(b"hello")
            except ConnectionResetError:
                pass
            data, how = read_until_closed(s)
            s.close()
        assert how == "reset" and b"hello from" not in data
        e = exp.check()
        assert e["policy"] and e["src.addr"].startswith(a1 + ":")
    finally:
        C.delete(policy, "deny-del.yaml")


# -- certificates: a node cannot get another node's identities --------------------------------

@pytest.mark.root
def test_node_bootstrap_cannot_get_certificate_for_a_pod_on_another_node(cluster):
    import asyncio
    import random
    boot, roots = load_bootstrap(os.path.join(C.paths.node_dir("n1"), "bootstrap"))
    mesh_id = lambda sa: SpiffeId(trust_domain="cluster.local", namespace="mesh", service_account=sa)  # noqa: E731

    async def main():
        c = ControlPlaneClient(socket_path=C.paths.control_plane_socket, trust_domain="cluster.local",
                               state=ProxyState(), clock=SystemClock(), rng=random.Random(1),
                               ssl_context=lambda: tls.client_context(boot, roots, alpn=(ALPN,)))
        task = asyncio.ensure_future(c.run())
        try:
            own = mesh_id("client")                   # m1 runs on n1: allowed
            assert await c.request_certificate(own, build_csr(own, generate_key()))
            other = mesh_id("backend")                # only m3, on n2: refused
            with pytest.raises(CertificateRefused) as e:
                await c.request_certificate(other, build_csr(other, generate_key()))
            return e.value.reason
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    assert asyncio.run(asyncio.wait_for(main(), 20)) == "identity_not_on_node"


# -- 15008: HTTP/2 abuse from a peer with a valid certificate (a compromised node) -------------

ATTACKER_ID = "spiffe://cluster.local/ns/plain/sa/default"
MAX_PREMATURE_RESETS = 100     # AbuseLimits defaults (ztunnel runs with them here)
PING_BURST = 500
SETTINGS_BURST = 100


def flood_until_goaway(s, chunks, timeout=10.0, pace=0.0):
    """Write `chunks` on the mTLS socket, reading what comes back between writes, until the
    server sends GOAWAY or closes; returns the FrameReader of everything the server sent."""
    from tests.h2_attack import FrameReader
    r = FrameReader()
    closed = False

    def drain(wait):
        nonlocal closed
        s.settimeout(wait)
        try:
            while True:
                d = s.recv(65536)
                if not d:
                    closed = True
                    return
                r.feed(d)
                s.settimeout(0.0)
        except (socket.timeout, ssl.SSLWantReadError, BlockingIOError):
            return
        except (OSError, ssl.SSLError):
            closed = True

    for c in chunks:
        if closed or r.goaway() is not None:
            break
        try:
            s.settimeout(5.0)
            s.sendall(c)
        except (OSError, ssl.SSLError):
            break
        drain(pace)
    deadline = time.monotonic() + timeout
    while not closed and r.goaway() is None and time.monotonic() < deadline:
        drain(0.2)
    s.close()
    return r


def opened_by_attacker():
    return metric_value(metrics(), "istio_tcp_connections_opened_total", source_principal=ATTACKER_ID,
                        destination_workload="m3")


def _batches(frames, per):
    return [b"".join(frames[i:i + per]) for i in range(0, len(frames), per)]


def _abuse_case(cluster, chunks, reason, pace=0.0):
    from tests import h2_attack as atk
    exp = Expect(reason)
    opened = opened_by_attacker()
    s = mtls(cluster)
    s.sendall(atk.preface())
    r = flood_until_goaway(s, chunks, pace=pace)
    attack_end = time.monotonic()
    # A meshed client reaches the app right after the attack (same ztunnel, same pod).
    out = C.echo("mesh", "m1", cluster.ips["m3"], nbytes=1000).stdout
    meshed_took = time.monotonic() - attack_end
    assert "echo ok: 1000/1000 bytes" in out
    g = r.goaway()
    assert g is not None, "no GOAWAY seen by the attacker"
    assert g[1:] == (f.ErrorCode.ENHANCE_YOUR_CALM, reason.encode())
    e = exp.check()
    assert e["stage"] == "h2" and e["src.identity"] == ATTACKER_ID
    # Every app connection the attacker caused is one of its CONNECTs ztunnel recorded.
    app_conns = opened_by_attacker() - opened
    print(f"\n{reason}: GOAWAY last stream {g[0]}, {app_conns:.0f} CONNECTs reached the data path, "
          f"meshed echo done {meshed_took:.2f}s after the attack")
    return r, g, app_conns, meshed_took


@pytest.mark.root
@pytest.mark.parametrize("per_write, pace", [(200, 0.0), (1, 0.002)], ids=["batched", "paced"])
def test_rapid_reset_from_a_valid_peer_gets_goaway_and_spares_the_app(cluster, per_write, pace):
    from tests import h2_attack as atk
    authority = f"{cluster.ips['m3']}:8080"
    # The metric counts the attacker's CONNECTs that reached the data path: one answered normally first.
    opened = opened_by_attacker()
    assert status_of(request(cluster, [(":method", "CONNECT"), (":authority", authority)])) == 200
    wait_for(lambda: opened_by_attacker() == opened + 1, timeout=5, step=0.1)
    pairs = [atk.connect(sid, authority) + atk.rst(sid) for sid in range(1, 40_000, 2)]   # 20,000
    r, g, app_conns, meshed_took = _abuse_case(cluster, _batches(pairs, per_write), "rapid_reset", pace)
    assert g[0] <= 2 * MAX_PREMATURE_RESETS - 1          # at most 100 streams processed
    assert app_conns <= MAX_PREMATURE_RESETS
    assert meshed_took < 1.0                             # includes starting the client process


@pytest.mark.root
def test_ping_flood_from_a_valid_peer_gets_goaway(cluster):
    from tests import h2_attack as atk
    r, g, app_conns, meshed_took = _abuse_case(cluster, _batches([atk.ping(i) for i in range(200_000)], 500),
                                               "ping_flood")
    assert 0 < r.count(f.PING, f.FLAG_ACK) <= PING_BURST and app_conns == 0 and meshed_took < 1.0


@pytest.mark.root
def test_settings_flood_from_a_valid_peer_gets_goaway(cluster):
    from tests import h2_attack as atk
    r, g, app_conns, meshed_took = _abuse_case(cluster, _batches([atk.settings() for _ in range(20_000)], 100),
                                               "settings_flood")
    assert 0 < r.count(f.SETTINGS, f.FLAG_ACK) <= SETTINGS_BURST and app_conns == 0 and meshed_took < 1.0
