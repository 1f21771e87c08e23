"""End to end (root): a large upload and a large download pass through the real waypoint byte-exact
(SHA-256 on both ends) while the waypoint's RSS, sampled from /proc during the transfer, stays
within a bound that only streaming meets; over HTTP/1.1 (content-length and chunked) and from an
HTTP/2 (prior knowledge) client to the same HTTP/1.1 backend.

The size is 1 GiB unless AMBIENT_BIG_BYTES says otherwise (a bounded manual run can raise it)."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from .cluster_helper import (ROOT, app_pod_yaml, cluster_fixture, idle_pod_yaml, namespace_yaml, nodes_yaml,
                             service_yaml, waypoint_yaml)

NAME = f"wb{os.getpid() % 100000}"
SIZE = int(os.environ.get("AMBIENT_BIG_BYTES", str(1 << 30)))
RSS_BOUND = 64 << 20          # growth over the pre-transfer baseline; buffering 1 GiB would blow it 16x

# The body: 64 KiB blocks, each starting with its index, so loss, duplication and reordering of
# blocks all change the hash (a repeated constant block would hide a reorder).
PATTERN = '''
import hashlib
BLOCK = 1 << 16
BASE = bytes(range(256)) * (BLOCK // 256)
def blocks(n):
    i = 0
    while n > 0:
        b = i.to_bytes(8, "big") + BASE[8:]
        yield b[:n]
        n -= len(b)
        i += 1
def digest(n):
    h = hashlib.sha256()
    for b in blocks(n):
        h.update(b)
    return h.hexdigest()
'''

# HTTP/1.1 backend: PUT hashes what arrives (content-length or chunked), GET /download/N streams
# N pattern bytes. One thread per connection, keep-alive.
BIGD = PATTERN + '''
import json, socket, sys, threading
def reply(f, status, body):
    f.write(b"HTTP/1.1 %d OK\\r\\ncontent-type: application/json\\r\\ncontent-length: %d\\r\\n\\r\\n%s"
            % (status, len(body), body))
    f.flush()
def serve(c):
    r, w = c.makefile("rb", buffering=1 << 20), c.makefile("wb", buffering=1 << 20)
    try:
        while True:
            line = r.readline()
            if not line:
                return
            method, path, _ = line.decode().split(" ", 2)
            hs = {}
            while (h := r.readline()) not in (b"\\r\\n", b"\\n", b""):
                k, v = h.decode().split(":", 1)
                hs[k.strip().lower()] = v.strip()
            if method == "PUT":
                h, n = hashlib.sha256(), 0
                if "content-length" in hs:
                    left = int(hs["content-length"])
                    while left:
                        d = r.read(min(left, 1 << 20))
                        if not d:
                            return
                        h.update(d); n += len(d); left -= len(d)
                else:
                    while (size := int(r.readline().split(b";")[0], 16)):
                        d = r.read(size)
                        h.update(d); n += len(d)
                        r.readline()
                    while r.readline() not in (b"\\r\\n", b""):
                        pass
                reply(w, 200, json.dumps({"bytes": n, "sha256": h.hexdigest(),
                                          "framing": "content-length" if "content-length" in hs else "chunked"}).encode())
            else:
                n = int(path.rsplit("/", 1)[1])
                w.write(b"HTTP/1.1 200 OK\\r\\ncontent-type: application/octet-stream\\r\\ncontent-length: %d\\r\\n\\r\\n" % n)
                for b in blocks(n):
                    w.write(b)
                w.flush()
    except (OSError, ValueError):
        pass
    finally:
        c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''

# HTTP/1.1 client: one connection; PUT with content-length, PUT chunked, GET; hashes and seconds.
BIG1 = PATTERN + '''
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port), timeout=30)
r = s.makefile("rb", buffering=1 << 20)
def head():
    status = int(r.readline().split()[1])
    hs = {}
    while (h := r.readline()) not in (b"\\r\\n", b""):
        k, v = h.decode().split(":", 1)
        hs[k.strip().lower()] = v.strip()
    return status, hs
out = {"expect": digest(n)}
for framing in ("content-length", "chunked"):
    t0 = time.monotonic()
    fh = "content-length: %d" % n if framing == "content-length" else "transfer-encoding: chunked"
    s.sendall(b"PUT /upload HTTP/1.1\\r\\nhost: big\\r\\n%s\\r\\n\\r\\n" % fh.encode())
    for b in blocks(n):
        s.sendall(b if framing == "content-length" else b"%x\\r\\n%s\\r\\n" % (len(b), b))
    if framing == "chunked":
        s.sendall(b"0\\r\\n\\r\\n")
    status, hs = head()
    out[framing] = {"status": status, **json.loads(r.read(int(hs["content-length"]))),
                    "seconds": round(time.monotonic() - t0, 2)}
t0 = time.monotonic()
s.sendall(b"GET /download/%d HTTP/1.1\\r\\nhost: big\\r\\n\\r\\n" % n)
status, hs = head()
h, got, left = hashlib.sha256(), 0, int(hs["content-length"])
while left:
    d = r.read(min(left, 1 << 20))
    if not d:
        break
    h.update(d); got += len(d); left -= len(d)
out["download"] = {"status": status, "bytes": got, "sha256": h.hexdigest(), "seconds": round(time.monotonic() - t0, 2)}
print(json.dumps(out))
'''

# HTTP/2 client (prior knowledge, the h2 library): one PUT stream without content-length (the
# waypoint sends it on chunked), then one GET stream; honours both flow-control windows.
BIG2 = PATTERN + '''
import json, socket, sys, time
import h2.connection, h2.config, h2.events, h2.settings
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port), timeout=30)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
c.initiate_connection()
c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
c.increment_flow_control_window(1 << 24)
s.sendall(c.data_to_send())
out = {"expect": digest(n)}
def pump(sid, sink):
    """Read until stream `sid` ends; returns (status, headers)."""
    status, done = None, False
    while not done:
        data = s.recv(1 << 20)
        if not data:
            raise SystemExit(json.dumps({**out, "error": "eof"}))
        for ev in c.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                status = int(dict(ev.headers)[":status"])
            elif isinstance(ev, h2.events.DataReceived):
                sink(ev.data)
                c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                done = True
            elif isinstance(ev, h2.events.StreamReset):
                raise SystemExit(json.dumps({**out, "error": f"reset {ev.error_code}"}))
        s.sendall(c.data_to_send())
    return status
t0 = time.monotonic()
sid = c.get_next_available_stream_id()
c.send_headers(sid, [(":method", "PUT"), (":scheme", "http"), (":authority", "big"), (":path", "/upload")])
s.sendall(c.data_to_send())
pending = b""
for b in blocks(n):
    pending = b if not pending else pending + b
    while pending:
        room = min(c.local_flow_control_window(sid), c.max_outbound_frame_size)
        if room <= 0:
            for ev in c.receive_data(s.recv(1 << 20) or b""):
                if isinstance(ev, h2.events.StreamReset):
                    raise SystemExit(json.dumps({**out, "error": f"reset {ev.error_code}"}))
            s.sendall(c.data_to_send())
            continue
        c.send_data(sid, pending[:room])
        pending = pending[room:]
        s.sendall(c.data_to_send())
c.end_stream(sid)
s.sendall(c.data_to_send())
body = bytearray()
status = pump(sid, body.extend)
out["upload"] = {"status": status, **json.loads(bytes(body)), "seconds": round(time.monotonic() - t0, 2)}
t0 = time.monotonic()
sid = c.get_next_available_stream_id()
c.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", "big"), (":path", f"/download/{n}")],
               end_stream=True)
s.sendall(c.data_to_send())
h, got = hashlib.sha256(), [0]
def sink(d):
    h.update(d)
    got[0] += len(d)
status = pump(sid, sink)
out["download"] = {"status": status, "bytes": got[0], "sha256": h.hexdigest(), "seconds": round(time.monotonic() - t0, 2)}
print(json.dumps(out))
'''

CLUSTER = (nodes_yaml("n1", "n2") + namespace_yaml("shop", ambient=True)
           + app_pod_yaml("big", "shop", "n2", ["python3", "bigd.py", "8080"], container="bigd")
           + idle_pod_yaml("client", "shop", "n1")
           + service_yaml("big", "shop", {"app": "big"}, waypoint="wp") + waypoint_yaml())

cluster = cluster_fixture(NAME, "wpbig", CLUSTER, {"bigd.py": BIGD, "big1.py": BIG1, "big2.py": BIG2})


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))


def transfer(cluster, script):
    """Run `script` in the client pod against the Service VIP while sampling the waypoint's RSS;
    returns (the client's JSON, baseline RSS, peak RSS)."""
    st = cluster.status()
    wp = next(w for w in st["waypoints"] if w["name"] == "wp")
    assert wp["ready"] and wp["pid"], wp
    vip = next(s["cluster_ip"] for s in st["services"] if s["name"] == "big")
    warm = cluster.ambient("exec", "-n", "shop", "client", "--", "python3", script, vip, "80", "4096", timeout=60)
    assert json.loads(warm.stdout)["download"]["bytes"] == 4096, warm.stdout
    base = peak = rss(wp["pid"])
    p = subprocess.Popen([sys.executable, "-m", "localcluster.cli", "-c", cluster.name, "exec", "-n", "shop", "client",
                          "--", "python3", script, vip, "80", str(SIZE)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    reader = threading.Thread(target=lambda: out.update(zip(("stdout", "stderr"), p.communicate())), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while p.poll() is None and time.monotonic() < deadline:
        peak = max(peak, rss(wp["pid"]))
        time.sleep(0.05)
    if p.poll() is None:
        p.kill()
    reader.join(10)
    if p.returncode != 0:
        with open(os.path.join(cluster.paths.logs_dir, "waypoint-shop-wp.log"), errors="replace") as f:
            wp_log = f.read()[-3000:]
        raise AssertionError(f"{script} exited {p.returncode}:\n{out.get('stderr', '')[-1500:]}\n"
                             f"{out.get('stdout', '')[-500:]}\nwaypoint log tail:\n{wp_log}")
    assert rss(wp["pid"]) and cluster.status()["waypoints"][0]["pid"] == wp["pid"]  # the same process throughout
    return json.loads(out["stdout"].strip().splitlines()[-1]), base, peak


def mib_s(seconds):
    return f"{SIZE / (1 << 20) / max(seconds, 1e-3):.0f} MiB/s"


@pytest.mark.root
def test_http1_upload_and_download_are_byte_exact_with_bounded_waypoint_memory(cluster):
    got, base, peak = transfer(cluster, "big1.py")
    print(f"\nHTTP/1.1 {SIZE >> 20} MiB: upload cl {got['content-length']['seconds']}s "
          f"({mib_s(got['content-length']['seconds'])}), chunked {got['chunked']['seconds']}s, "
          f"download {got['download']['seconds']}s ({mib_s(got['download']['seconds'])}); "
          f"waypoint RSS {base >> 20} -> peak {peak >> 20} MiB")
    for framing in ("content-length", "chunked"):
        up = got[framing]
        assert (up["status"], up["bytes"], up["sha256"], up["framing"]) == (200, SIZE, got["expect"], framing), up
    down = got["download"]
    assert (down["status"], down["bytes"], down["sha256"]) == (200, SIZE, got["expect"]), down
    assert peak - base < RSS_BOUND, f"waypoint RSS grew by {(peak - base) >> 20} MiB (bound {RSS_BOUND >> 20})"


@pytest.mark.root
def test_http2_client_upload_and_download_to_http1_backend_are_byte_exact_with_bounded_memory(cluster):
    got, base, peak = transfer(cluster, "big2.py")
    print(f"\nHTTP/2 -> HTTP/1.1 {SIZE >> 20} MiB: upload {got['upload']['seconds']}s "
          f"({mib_s(got['upload']['seconds'])}), download {got['download']['seconds']}s "
          f"({mib_s(got['download']['seconds'])}); waypoint RSS {base >> 20} -> peak {peak >> 20} MiB")
    up = got["upload"]
    # No content-length from the client: the waypoint framed it chunked towards the HTTP/1.1 backend.
    assert (up["status"], up["bytes"], up["sha256"], up["framing"]) == (200, SIZE, got["expect"], "chunked"), up
    down = got["download"]
    assert (down["status"], down["bytes"], down["sha256"]) == (200, SIZE, got["expect"]), down
    assert peak - base < RSS_BOUND, f"waypoint RSS grew by {(peak - base) >> 20} MiB (bound {RSS_BOUND >> 20})"
