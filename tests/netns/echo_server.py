"""Test helper: a tiny TCP echo server run inside a pod's netns by the netns tests.

Usage: echo_server.py NAME PORT [LIFETIME_S]
Each connection gets one line back: ``NAME local=IP:PORT peer=IP:PORT | <first chunk>``.
Prints ``listening`` once bound; exits by itself after LIFETIME_S (default 120) seconds.
"""
import socket
import sys
import time

name, port = sys.argv[1], int(sys.argv[2])
lifetime = float(sys.argv[3]) if len(sys.argv) > 3 else 120.0
deadline = time.monotonic() + lifetime
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port))
srv.listen(16)
srv.settimeout(0.5)
print("listening", flush=True)
while time.monotonic() < deadline:
    try:
        conn, _ = srv.accept()
    except socket.timeout:
        continue
    with conn:
        conn.settimeout(5)
        try:
            data = conn.recv(4096)
            lip, lport = conn.getsockname()
            pip, pport = conn.getpeername()
            conn.sendall(f"{name} local={lip}:{lport} peer={pip}:{pport} | ".encode() + data)
        except OSError as e:
            print("connection error:", e, flush=True)
