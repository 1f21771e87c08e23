#!/usr/bin/env python3
"""Test app: keep ONE connection to an echo.py server and echo a line every interval.

Prints the greeting, then `ok N` at the end; exits 1 on the first missing or wrong echo.
Used to show that enrolling or releasing a pod does not break its open connections.
"""
import argparse
import socket
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--interval", type=float, default=0.1)
    p.add_argument("--duration", type=float, default=5.0)
    a = p.parse_args()
    with socket.create_connection((a.host, a.port), timeout=5) as s:
        f = s.makefile("rb")
        print(f.readline().decode().strip(), flush=True)
        n, end = 0, time.monotonic() + a.duration
        while time.monotonic() < end:
            line = f"ping {n}\n".encode()
            s.sendall(line)
            if f.readline() != line:
                print(f"broken after {n} echoes", flush=True)
                return 1
            n += 1
            time.sleep(a.interval)
    print(f"ok {n}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
