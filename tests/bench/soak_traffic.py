"""Pod app for the soak: mixed traffic to one echo.py server, cumulative counters as JSON lines.

    soak_traffic.py HOST PORT [--duration S] [--every S] [--stop-file F]
        [--short-interval S] [--streams N] [--stream-life S] [--bulk-bytes N] [--bulk-interval S]

Three kinds, each on its own threads, every byte checked:
  short   a new connection per round: greeting, 64 bytes echoed, close (every --short-interval)
  stream  --streams connections, each held --stream-life seconds (shorter than ztunnel's 5 s
          drain deadline, so a graceful restart must not cut one), 1 KiB echoed every 0.25 s,
          then replaced by a new one
  bulk    one connection per round moving --bulk-bytes both ways (every --bulk-interval)
Every --every seconds (and at the end) prints one line
``{"t": <monotonic>, "ok": {kind: n}, "failed": {kind: n}, "open": n, "errors": [[t, kind, error], ...]}``
(errors: the last 20). Standard library only; runs until --duration or --stop-file.
"""
import argparse
import json
import os
import socket
import threading
import time

LOCK = threading.Lock()
OK = {"short": 0, "stream": 0, "bulk": 0}
FAILED = {"short": 0, "stream": 0, "bulk": 0}
ERRORS: list = []
OPEN = [0]


def count(kind, err=None):
    with LOCK:
        if err is None:
            OK[kind] += 1
        else:
            FAILED[kind] += 1
            ERRORS.append([round(time.monotonic(), 3), kind, err])
            del ERRORS[:-20]


def connect(host, port, timeout):
    s = socket.create_connection((host, port), timeout=timeout)
    f = s.makefile("rb")
    if not f.readline().startswith(b"hello from"):
        s.close()
        raise OSError("no greeting")
    return s, f


def echo(s, payload):
    s.sendall(payload)
    got = bytearray()
    while len(got) < len(payload):
        chunk = s.recv(min(1 << 20, len(payload) - len(got)))
        if not chunk:
            raise OSError(f"cut after {len(got)}/{len(payload)} bytes")
        got += chunk
    if got != payload:
        raise OSError("echo mismatch")


def loop(kind, a, stop, body, interval):
    while not stop.is_set():
        try:
            body()
            count(kind)
        except OSError as e:
            count(kind, f"{type(e).__name__}: {e}")
        stop.wait(interval)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--duration", type=float, default=1800.0)
    p.add_argument("--every", type=float, default=5.0)
    p.add_argument("--stop-file", default=None)
    p.add_argument("--short-interval", type=float, default=0.05)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--stream-life", type=float, default=3.0)
    p.add_argument("--bulk-bytes", type=int, default=2 << 20)
    p.add_argument("--bulk-interval", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=10.0)
    a = p.parse_args()
    stop = threading.Event()

    def short():
        s, _ = connect(a.host, a.port, a.timeout)
        with s:
            echo(s, os.urandom(64))

    def stream():
        s, _ = connect(a.host, a.port, a.timeout)
        with LOCK:
            OPEN[0] += 1
        try:
            with s:
                end = time.monotonic() + a.stream_life
                while time.monotonic() < end and not stop.is_set():
                    echo(s, os.urandom(1024))
                    time.sleep(0.25)
        finally:
            with LOCK:
                OPEN[0] -= 1

    def bulk():
        s, _ = connect(a.host, a.port, a.timeout)
        with s:
            data = os.urandom(a.bulk_bytes)
            got = bytearray()

            def read():
                while len(got) < len(data):
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        return
                    got.extend(chunk)
            r = threading.Thread(target=read, daemon=True)
            r.start()
            s.sendall(data)
            r.join(a.timeout)
            if bytes(got) != data:
                raise OSError(f"bulk echo {len(got)}/{len(data)} bytes")

    threads = [threading.Thread(target=loop, args=("short", a, stop, short, a.short_interval), daemon=True),
               threading.Thread(target=loop, args=("bulk", a, stop, bulk, a.bulk_interval), daemon=True)]
    threads += [threading.Thread(target=loop, args=("stream", a, stop, stream, 0.0), daemon=True)
                for _ in range(a.streams)]
    for t in threads:
        t.start()
    t0 = time.monotonic()

    def report():
        with LOCK:
            print(json.dumps({"t": round(time.monotonic(), 3), "ok": dict(OK), "failed": dict(FAILED),
                              "open": OPEN[0], "errors": list(ERRORS)}), flush=True)

    while time.monotonic() - t0 < a.duration and not (a.stop_file and os.path.exists(a.stop_file)):
        time.sleep(min(a.every, max(0.0, a.duration - (time.monotonic() - t0))) or 0.01)
        report()
    stop.set()
    for t in threads:
        t.join(a.timeout + 5)
    report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
