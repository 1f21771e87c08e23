"""Processes for the capture tests: a stand-in ztunnel, a pod app and a pod client (JSON lines).

Usage (each is spawned inside a cgroup and netns by the test):
  capture_roles.py ztunnel PIN_DIR CGROUP [--fail-open] [--worker N]   # node netns, ztunnel cgroup
  capture_roles.py app NAME PORT LIFETIME_S               # pod netns, pod cgroup
  capture_roles.py client LIFETIME_S                      # pod netns, pod cgroup

ztunnel and client read one JSON command per stdin line and answer one JSON line on stdout
(``{"reply": op, "ok": ...}``); ztunnel also prints ``{"event": ...}`` lines for every
connection its listeners accept.  Every role exits by itself after its lifetime or on stdin
EOF, so a failed test cannot leave it running for long.
"""
from __future__ import annotations

import errno
import json
import socket
import sys
import threading
import time

MARK = 0x539
INBOUND_MARK = 0x111
_out_lock = threading.Lock()


def emit(**msg) -> None:
    with _out_lock:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()


def pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def relay(a: socket.socket, b: socket.socket) -> None:
    t = threading.Thread(target=pipe, args=(b, a), daemon=True)
    t.start()
    pipe(a, b)
    t.join(timeout=30)
    a.close()
    b.close()


# ---- stand-in ztunnel ----------------------------------------------------------------------------

class Ztunnel:
    def __init__(self, pin_dir: str, cgroup: str, fail_open: bool, worker: int = 0,
                 preserve_source: bool = False):
        from ebpf.capture import Capture
        self.cap = Capture(pin_dir, ztunnel_cgroup=cgroup, fail_open=fail_open, worker=worker)
        self.worker = worker
        self.pods: dict[str, dict] = {}
        self.preserve_source = preserve_source

    def upstream(self, pod: dict, bind_pod_ip: bool, source: str | None = None) -> socket.socket:
        from mesh.linux.netns import socket_in_netns
        s = socket_in_netns(pod["netns"])     # ztunnel dials from inside the pod netns
        s.settimeout(5)
        if source is not None:                # as ztunnel's NetnsSockets does (mesh/proxy/sockets.py)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, INBOUND_MARK)
            s.setsockopt(socket.SOL_IP, 19, 1)    # IP_TRANSPARENT
            s.bind((source, 0))
            return s
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
        if bind_pod_ip:
            s.bind((pod["ip"], 0))
        return s

    def on_outbound(self, conn: socket.socket, pod: dict) -> None:
        from ebpf.capture import CaptureError
        try:
            orig = self.cap.original_dst(conn)
        except CaptureError as e:
            emit(event="outbound_error", uid=pod["uid"], reason=e.reason, error=str(e))
            conn.close()
            return
        emit(event="outbound", uid=pod["uid"], orig=list(orig), peer=list(conn.getpeername()),
             local=list(conn.getsockname()))
        self.dial(conn, pod, orig, bind_pod_ip=False)

    def on_inbound(self, conn: socket.socket, pod: dict) -> None:
        local = conn.getsockname()
        peer = conn.getpeername()
        emit(event="inbound", uid=pod["uid"], local=list(local), peer=list(peer))
        self.dial(conn, pod, local, bind_pod_ip=True,
                  source=peer[0] if self.preserve_source else None)

    def on_hbone(self, conn: socket.socket, pod: dict) -> None:
        conn.settimeout(5)
        head = b""
        while not head.endswith(b"\n") and len(head) < 256:   # "CONNECT ip:port\n"
            c = conn.recv(1)
            if not c:
                conn.close()
                return
            head += c
        ip, port = head.split()[1].decode().rsplit(":", 1)
        emit(event="hbone", uid=pod["uid"], target=[ip, int(port)],
             local=list(conn.getsockname()))
        conn.settimeout(None)
        self.dial(conn, pod, (ip, int(port)), bind_pod_ip=True)

    def dial(self, conn: socket.socket, pod: dict, dst, bind_pod_ip: bool,
             source: str | None = None) -> None:
        up = self.upstream(pod, bind_pod_ip, source)
        try:
            up.connect(tuple(dst))
        except OSError as e:
            emit(event="dial_error", uid=pod["uid"], dst=list(dst),
                 errno=errno.errorcode.get(e.errno))
            conn.close()
            up.close()
            return
        up.settimeout(None)
        relay(conn, up)

    def serve(self, ls: socket.socket, handler, pod: dict) -> None:
        while True:
            try:
                conn, _ = ls.accept()
            except OSError:
                return   # listener closed
            threading.Thread(target=handler, args=(conn, pod), daemon=True).start()

    def enroll(self, uid: str, netns: str, netns_path: str, cgroup: str, ip: str) -> dict:
        from mesh.linux.netns import socket_in_netns
        if uid in self.pods:   # enroll again with the same listeners (idempotency check)
            out, inb, hb = self.pods[uid]["listeners"]
            self.cap.enroll(uid, cgroup=cgroup, netns_path=netns_path, pod_ip=ip, outbound=out,
                            inbound=inb, hbone=hb)
            return {}
        pod = {"uid": uid, "netns": netns, "ip": ip, "listeners": []}
        for addr, handler in ((("127.0.0.1", 15001), self.on_outbound),
                              (("0.0.0.0", 15006), self.on_inbound),
                              (("0.0.0.0", 15008), self.on_hbone)):
            ls = socket_in_netns(netns)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)   # workers share the ports
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
            ls.bind(addr)
            ls.listen(128)
            pod["listeners"].append(ls)
            threading.Thread(target=self.serve, args=(ls, handler, pod), daemon=True).start()
        out, inb, hb = pod["listeners"]
        self.cap.enroll(uid, cgroup=cgroup, netns_path=netns_path, pod_ip=ip, outbound=out,
                        inbound=inb, hbone=hb)
        self.pods[uid] = pod
        return {}

    def close_listeners(self, uid: str) -> dict:
        for ls in self.pods.pop(uid)["listeners"]:
            try:
                ls.shutdown(socket.SHUT_RDWR)   # wakes the accept() thread
            except OSError:
                pass
            ls.close()
        return {}

    def handle(self, cmd: dict) -> dict:
        op = cmd["op"]
        if op == "start":
            self.cap.start()
            return {"restarted": self.cap.restarted, "enrolled": self.cap.enrolled()}
        if op == "enroll":
            return self.enroll(cmd["uid"], cmd["netns"], cmd["netns_path"], cmd["cgroup"],
                               cmd["ip"])
        if op == "release":
            self.cap.release(cmd["uid"])
            return {}
        if op == "close_listeners":
            return self.close_listeners(cmd["uid"])
        if op == "enrolled":
            return {"enrolled": self.cap.enrolled()}
        if op == "stats":
            return {"stats": self.cap.stats()}
        if op == "slots":
            return {"slots": self.cap.listener_slots()}
        if op == "original_dst_of_unrelated":   # error path: a socket that was never captured
            ls = socket.create_server(("127.0.0.1", 0))   # ztunnel's netns: not captured
            a = socket.create_connection(ls.getsockname())
            b, _ = ls.accept()
            ls.close()
            try:
                self.cap.original_dst(b)
            except Exception as e:  # noqa: BLE001 - reported to the test
                return {"reason": getattr(e, "reason", None), "error": str(e)}
            finally:
                a.close()
                b.close()
            return {"reason": None}
        if op == "close":
            self.cap.close()
            return {}
        if op == "teardown":
            self.cap.teardown()
            return {}
        raise ValueError(f"unknown op {op!r}")


def run_commands(handle, lifetime: float, exit_ops: tuple[str, ...]) -> None:
    deadline = time.monotonic() + lifetime
    for line in sys.stdin:
        if time.monotonic() > deadline:
            break
        cmd = json.loads(line)
        try:
            emit(reply=cmd["op"], ok=True, **handle(cmd))
        except Exception as e:  # noqa: BLE001 - reported to the test
            emit(reply=cmd["op"], ok=False, error=f"{type(e).__name__}: {e}",
                 reason=getattr(e, "reason", None))
        if cmd["op"] in exit_ops:
            break


# ---- pod app and client --------------------------------------------------------------------------

def app(name: str, port: int, lifetime: float) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(64)
    srv.settimeout(0.5)
    print("listening", flush=True)

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            lip, lport = conn.getsockname()
            pip, pport = conn.getpeername()
            try:
                while data := conn.recv(4096):
                    conn.sendall(f"{name} local={lip}:{lport} peer={pip}:{pport} | ".encode()
                                 + data)
            except OSError:
                pass

    deadline = time.monotonic() + lifetime
    while time.monotonic() < deadline:
        try:
            conn, _ = srv.accept()
        except socket.timeout:
            continue
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


class Client:
    def __init__(self):
        self.conns: dict[str, socket.socket] = {}

    def handle(self, cmd: dict) -> dict:
        op = cmd["op"]
        if op == "connect":
            s = socket.socket(socket.AF_INET6 if cmd.get("family") == 6 else socket.AF_INET)
            if cmd.get("mark"):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
            s.settimeout(5)
            try:
                s.connect((cmd["ip"], cmd["port"]))
            except OSError as e:
                s.close()
                return {"connected": False, "errno": errno.errorcode.get(e.errno, str(e))}
            self.conns[cmd["id"]] = s
            return {"connected": True, "local": list(s.getsockname()),
                    "peer": list(s.getpeername())}
        if op == "send":
            s = self.conns[cmd["id"]]
            s.sendall(cmd["data"].encode())
            return {"data": s.recv(4096).decode()}
        if op == "close":
            self.conns.pop(cmd["id"]).close()
            return {}
        if op == "exit":
            return {}
        raise ValueError(f"unknown op {op!r}")


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "ztunnel":
        rest = sys.argv[4:]
        worker = int(rest[rest.index("--worker") + 1]) if "--worker" in rest else 0
        z = Ztunnel(sys.argv[2], sys.argv[3], "--fail-open" in rest, worker, "--preserve-source" in rest)
        run_commands(z.handle, 300, ("close", "teardown"))
    elif role == "app":
        app(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    elif role == "client":
        run_commands(Client().handle, float(sys.argv[2]), ("exit",))
    else:
        sys.exit(f"unknown role {role!r}")
