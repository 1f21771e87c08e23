#!/usr/bin/env python3
"""Demo/test app: a small HTTP load generator; prints a JSON tally.

    load.py HOST:PORT -n REQUESTS [-c CONCURRENCY] [--rate R] [--path /] [--timeout S] [--max-seconds S]

Each of `-c` threads keeps one HTTP/1.1 connection (reconnecting when one closes or fails) and
sends GETs until `-n` requests have been sent in total (`-n 0`: until `--max-seconds`), as fast
as they are answered or, with `--rate`, paced to R requests per second in all (steady traffic). Output: {"requests", "status": {code:
count}, "errors", "seconds", "rps", "p50_ms", "p99_ms"}; status 599 counts a request that got
no answer (the errors list says why, the first 20 kept).
"""
import argparse
import http.client
import json
import threading
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", metavar="HOST:PORT")
    ap.add_argument("-n", type=int, default=100)
    ap.add_argument("-c", type=int, default=4)
    ap.add_argument("--rate", type=float, default=0.0, help="requests per second in all (default: unpaced)")
    ap.add_argument("--path", default="/")
    ap.add_argument("--host", default=None, help="Host header (default: the target host)")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--max-seconds", type=float, default=300.0)
    a = ap.parse_args()
    host, _, port = a.target.partition(":")
    lock = threading.Lock()
    left = [a.n if a.n > 0 else float("inf")]
    sent = [0]
    status: dict[str, int] = {}
    errors: list[str] = []
    lat: list[float] = []
    deadline = time.monotonic() + a.max_seconds

    def worker():
        conn = None
        while time.monotonic() < deadline:
            with lock:
                if left[0] <= 0:
                    break
                left[0] -= 1
                slot = sent[0]
                sent[0] += 1
            if a.rate > 0:  # request k goes out at start + k/rate, whichever thread sends it
                wait = start + slot / a.rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            t0 = time.monotonic()
            code = 599
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, int(port or 80), timeout=a.timeout)
                conn.request("GET", a.path, headers={"host": a.host or host})
                r = conn.getresponse()
                r.read()
                code = r.status
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                if conn is not None:
                    conn.close()
                conn = None
                with lock:
                    if len(errors) < 20:
                        errors.append(f"{type(e).__name__}: {e}")
            dt = time.monotonic() - t0
            with lock:
                status[str(code)] = status.get(str(code), 0) + 1
                lat.append(dt)
        if conn is not None:
            conn.close()

    t0 = start = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(a.c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.monotonic() - t0
    lat.sort()
    q = (lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000.0, 2)) if lat else (lambda p: None)
    print(json.dumps({"requests": len(lat), "status": status, "errors": errors, "seconds": round(secs, 2),
                      "rps": round(len(lat) / secs, 1) if secs else 0.0, "p50_ms": q(0.5), "p99_ms": q(0.99)}))


if __name__ == "__main__":
    main()
