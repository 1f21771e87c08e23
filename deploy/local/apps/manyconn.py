#!/usr/bin/env python3
"""Test app: hold N concurrent connections to an echo.py server, check every byte, then close.

Opens `--n` connections (at most `--concurrency` connecting at once), reads each greeting,
sends each a distinct `--bytes`-long payload and checks the echo byte for byte, then prints
one JSON line (`{"phase": "open", ...}`) and keeps them all open and idle until a line arrives
on stdin (or `--hold` seconds pass). Then it closes them all and prints `{"phase": "closed"}`.
Raises its soft RLIMIT_NOFILE to the hard limit first (one fd per connection).
"""
import argparse
import asyncio
import json
import random
import resource
import sys
import time


async def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--bytes", type=int, default=1024)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--hold", type=float, default=600.0)
    p.add_argument("--timeout", type=float, default=60.0, help="per connect/echo (s)")
    a = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    gate = asyncio.Semaphore(a.concurrency)
    errors: list[str] = []

    async def one(i: int):
        async with gate:
            r, w = await asyncio.wait_for(asyncio.open_connection(a.host, a.port), a.timeout)
            await asyncio.wait_for(r.readline(), a.timeout)  # the greeting
        payload = random.Random(i).randbytes(a.bytes)
        w.write(payload)
        got = await asyncio.wait_for(r.readexactly(a.bytes), a.timeout)
        if got != payload:
            errors.append(f"connection {i}: echo differs")
        return r, w

    t0 = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(a.n)), return_exceptions=True)
    conns = [x for x in results if not isinstance(x, BaseException)]
    failed = [x for x in results if isinstance(x, BaseException)]
    errors += sorted({f"{type(e).__name__}: {e}" for e in failed})[:5]
    print(json.dumps({"phase": "open", "n": a.n, "open": len(conns), "failed": len(failed),
                      "echo_mismatch": sum("differs" in e for e in errors), "bytes_each": a.bytes,
                      "secs": round(time.monotonic() - t0, 2), "fd_limit": hard, "errors": errors[:5]}),
          flush=True)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), a.hold)
    except asyncio.TimeoutError:
        pass
    # Every connection still intact after the idle hold: the server has sent nothing more.
    broken = sum(1 for r, _ in conns if r.at_eof())
    for _, w in conns:
        w.close()
    await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)
    print(json.dumps({"phase": "closed", "closed": len(conns), "broken_while_idle": broken}), flush=True)
    return 0 if not errors and not broken else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
