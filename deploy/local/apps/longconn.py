#!/usr/bin/env python3
"""Test app: keep ONE connection to an echo.py server and echo a line every interval.

Prints the greeting, then `ok N` at the end; exits 1 on the first missing or wrong echo.
Used to show that enrolling or releasing a pod does not break its open connections.
`--send-line WORD --send-after S` sends the line WORD once after S seconds (echo.py's
`--reset-on-line WORD` then resets the connection: a backend failing mid-stream).
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
    p.add_argument("--timeout", type=float, default=5.0, help="socket timeout (s)")
    p.add_argument("--send-line", default=None)
    p.add_argument("--send-after", type=float, default=0.0)
    a = p.parse_args()
    with socket.create_connection((a.host, a.port), timeout=a.timeout) as s:
        f = s.makefile("rb")
        print(f.readline().decode().strip(), flush=True)
        n, end = 0, time.monotonic() + a.duration
        send_at = time.monotonic() + a.send_after if a.send_line else None
        while time.monotonic() < end:
            if send_at is not None and time.monotonic() >= send_at:
                line = f"{a.send_line}\n".encode()
                send_at = None
            else:
                line = f"ping {n}\n".encode()
            try:
                s.sendall(line)
                got = f.readline()
            except OSError as e:
                got = f"{type(e).__name__}".encode()
            if got != line:
                print(f"broken after {n} echoes: {got[:40]!r}", flush=True)
                return 1
            n += 1
            time.sleep(a.interval)
    print(f"ok {n}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
