"""Pod app for the crash tests: keep trying to send a known payload to each target; one line per attempt.

    crash_probe.py --target IP:PORT [--target ...] --nonce N [--interval S] [--duration S] [--stop-file F]

Every attempt connects (0.5 s timeout), reads the echo server's greeting, sends
``PROBE-<nonce>-<seq>.`` (the dot ends the number: seq 31 is not a prefix of 310) and reads it back, then prints (flushed)
``attempt <seq> <target> ok|fail <boottime> <realtime> <detail>``: CLOCK_BOOTTIME (what
/proc/<pid>/stat's start time counts) and the wall clock (what tcpdump stamps packets with).
Stops after `--duration` seconds or once `--stop-file` exists. Standard library only.
"""
import argparse
import errno
import os
import socket
import time


def attempt(target, payload):
    host, port = target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=0.5) as s:
        s.settimeout(1.0)
        f = s.makefile("rb")
        if not f.readline().startswith(b"hello from"):
            raise OSError("no greeting")
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(len(payload) - len(got))
            if not chunk:
                raise OSError(f"echo cut after {len(got)} bytes")
            got += chunk
    if got != payload:
        raise OSError("echo mismatch")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--target", action="append", required=True)
    p.add_argument("--nonce", required=True)
    p.add_argument("--interval", type=float, default=0.02)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--stop-file", default=None)
    a = p.parse_args()
    t0 = time.monotonic()
    seq = 0
    while time.monotonic() - t0 < a.duration and not (a.stop_file and os.path.exists(a.stop_file)):
        for target in a.target:
            seq += 1
            boot, wall = time.clock_gettime(time.CLOCK_BOOTTIME), time.time()
            try:
                attempt(target, f"PROBE-{a.nonce}-{seq}.".encode())
                result, detail = "ok", "-"
            except OSError as e:
                result = "fail"
                detail = errno.errorcode.get(e.errno, "") if e.errno else type(e).__name__
                detail = detail or type(e).__name__
            print(f"attempt {seq} {target} {result} {boot:.4f} {wall:.4f} {detail}", flush=True)
        time.sleep(a.interval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
