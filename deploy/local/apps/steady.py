#!/usr/bin/env python3
"""Test app: steady short connections to an echo.py server until told to stop; a JSON tally.

    steady.py HOST PORT [--interval S] [--timeout S] [--duration S] [--stop-file F] [--log]

Each round opens a new connection, reads the greeting, echoes 64 bytes and closes. It runs
for `--duration` seconds or until `--stop-file` exists, then prints {"ok", "failed",
"failures": [[t, error], ...] (t in seconds since start, the first 50 kept), "max_ms"}.
A line `failed t error` is printed (flushed) as each failure happens; with `--log`, also a
line `round ok|failed T` per round, T its start on the host's CLOCK_MONOTONIC (pods share
it), so a test can line rounds up with what it did meanwhile.
"""
import argparse
import json
import os
import socket
import sys
import time


def once(host, port, timeout):
    payload = os.urandom(64)
    with socket.create_connection((host, port), timeout=timeout) as s:
        f = s.makefile("rb")
        if not f.readline().startswith(b"hello from"):
            raise OSError("no greeting")
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = f.read()
    if got != payload:
        raise OSError(f"echo mismatch: {len(got)}/{len(payload)} bytes")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--stop-file", default=None)
    p.add_argument("--log", action="store_true", help="print `round ok|failed T` for every round")
    a = p.parse_args()
    t0 = time.monotonic()
    ok, failures, worst = 0, [], 0.0
    failed = 0
    while time.monotonic() - t0 < a.duration and not (a.stop_file and os.path.exists(a.stop_file)):
        t = time.monotonic()
        try:
            once(a.host, a.port, a.timeout)
            ok += 1
            if a.log:
                print(f"round ok {t:.3f}", flush=True)
        except OSError as e:
            failed += 1
            if a.log:
                print(f"round failed {t:.3f}", flush=True)
            err = f"{type(e).__name__}: {e}"
            print(f"failed {t - t0:.2f} {err}", flush=True)
            if len(failures) < 50:
                failures.append([round(t - t0, 2), err])
        worst = max(worst, time.monotonic() - t)
        time.sleep(a.interval)
    print(json.dumps({"ok": ok, "failed": failed, "failures": failures, "max_ms": round(worst * 1000, 1)}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
