#!/usr/bin/env python3
"""Demo/test app: one service of a call chain (the cascade demo), plain HTTP/1.1, no mesh awareness.

    chain.py --port 8080 [--call HOST:PORT ...] [--call-soft HOST:PORT ...] [--fail RATE] [--delay-ms N]

`GET /` (any path but the two below) calls each `--call` service in turn with `GET /`,
forwarding `x-request-id` and the trace headers (`traceparent`, `tracestate`, B3) as Istio
asks applications to; it answers 200 when every call
answered 2xx, else 503 (a failure below turns into a failure here, as in the article's
payment flow). A `--call-soft` service is called too, but its failure only degrades the
answer (still 200, as a page shows "ratings unavailable"). With `--fail RATE` it answers 503 to that share of requests itself, before
calling anything (the misbehaving catalog). `POST /fail?rate=R` changes the rate at run
time; `GET /stats` answers the counters as JSON ({"requests": N, "status": {...}}) and
`POST /stats/reset` zeroes them. Counters include every request that reached the pod, so
for the leaf service they count every attempt the mesh sent it, retries included.
"""
import argparse
import http.client
import http.server
import json
import os
import random
import threading
import time
import urllib.parse

LOCK = threading.Lock()
STATS = {"requests": 0, "status": {}}
STATE = {"fail": 0.0}
POD = os.environ.get("POD_NAME", "?")
_local = threading.local()


def count(status: int) -> None:
    with LOCK:
        STATS["requests"] += 1
        STATS["status"][str(status)] = STATS["status"].get(str(status), 0) + 1


# What Istio asks an application to copy from its request to the requests it makes, so the
# mesh's spans join into one trace.
PROPAGATE = ("x-request-id", "traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid",
             "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags")


def call(target: str, fwd: dict[str, str]) -> int:
    """GET / on `target` over this thread's kept-alive connection; its status (599: no answer)."""
    conns = getattr(_local, "conns", None)
    if conns is None:
        conns = _local.conns = {}
    headers = {"host": target.partition(":")[0], **fwd}
    for _ in range(2):  # one reconnect: a kept-alive connection may have been closed meanwhile
        conn = conns.get(target)
        if conn is None:
            host, _, port = target.partition(":")
            conn = conns[target] = http.client.HTTPConnection(host, int(port or 80), timeout=10)
        try:
            conn.request("GET", "/", headers=headers)
            r = conn.getresponse()
            r.read()
            if r.getheader("connection", "").lower() == "close":
                conn.close()
                conns.pop(target, None)
            return r.status
        except (OSError, http.client.HTTPException):
            conn.close()
            conns.pop(target, None)
    return 599


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16  # head and body in one write (else Nagle + delayed ACK: 40 ms a response)
    calls: list[str] = []
    soft: list[str] = []
    delay = 0.0

    def reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "text/plain" if not body.startswith(b"{") else "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/stats":
            with LOCK:
                body = json.dumps(STATS).encode()
            return self.reply(200, body)
        if self.delay:
            time.sleep(self.delay)
        status = 200
        if STATE["fail"] and random.random() < STATE["fail"]:
            status = 503
        else:
            fwd = {h: v for h in PROPAGATE if (v := self.headers.get(h)) is not None}
            for target in self.calls:
                if not 200 <= call(target, fwd) < 300:
                    status = 503
                    break
            if status == 200:
                for target in self.soft:
                    call(target, rid)
        count(status)
        self.reply(status, f"{POD} {status}\n".encode())

    def do_POST(self):
        n = int(self.headers.get("content-length") or 0)
        if n:
            self.rfile.read(n)
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/fail":
            rate = float(urllib.parse.parse_qs(url.query).get("rate", ["0"])[0])
            if not 0.0 <= rate <= 1.0:
                return self.reply(400, b"rate must be within 0..1\n")
            STATE["fail"] = rate
            return self.reply(200, f"{POD} fail rate {rate}\n".encode())
        if url.path == "/stats/reset":
            with LOCK:
                STATS["requests"], STATS["status"] = 0, {}
            return self.reply(200, b"reset\n")
        self.reply(404, b"not found\n")

    def log_message(self, *a):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--call", action="append", default=[], metavar="HOST:PORT")
    ap.add_argument("--call-soft", action="append", default=[], metavar="HOST:PORT")
    ap.add_argument("--fail", type=float, default=0.0, metavar="RATE")
    ap.add_argument("--delay-ms", type=float, default=0.0)
    a = ap.parse_args()
    Handler.calls, Handler.soft, Handler.delay = a.call, a.call_soft, a.delay_ms / 1000.0
    STATE["fail"] = a.fail
    srv = http.server.ThreadingHTTPServer(("0.0.0.0", a.port), Handler)
    srv.daemon_threads = True
    srv.serve_forever()


if __name__ == "__main__":
    main()
