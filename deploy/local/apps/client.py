#!/usr/bin/env python3
"""Demo/test client for echo.py: connect, print the greeting, send N bytes, check the echo."""
import argparse
import hashlib
import os
import socket
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--bytes", type=int, default=64, help="payload size to echo (default 64)")
    p.add_argument("--timeout", type=float, default=10.0)
    a = p.parse_args()
    payload = os.urandom(a.bytes)
    t0 = time.monotonic()
    with socket.create_connection((a.host, a.port), timeout=a.timeout) as s:
        f = s.makefile("rb")
        greeting = f.readline().decode().strip()
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = f.read()
    ok = got == payload
    dt = time.monotonic() - t0
    print(f"{greeting}")
    print(f"echo {'ok' if ok else 'MISMATCH'}: {len(got)}/{len(payload)} bytes "
          f"sha256={hashlib.sha256(got).hexdigest()[:16]} in {dt * 1000:.1f} ms")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
