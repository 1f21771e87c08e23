"""In-process loopback measurement: how many new streams per second one pooled HBONE connection carries.

Not a test: the basis for AbuseLimits.new_stream_rate's default (mesh/hbone/abuse.py). A load
process opens a TCP connection per request (connect, 100 bytes, echo, close: the worst case for
stream churn, what the L4 benchmark's clients do without keep-alive) against an outbound
listener driving `HbonePool.tunnel`; the HboneServer's connection counts the streams. The
stream-rate bound is lifted for the measurement.

    .venv/bin/python -m tests.bench.bench_hbone_stream_rate --secs 5
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time

import uvloop

from mesh.hbone import HbonePool, HboneServer
from mesh.hbone.abuse import AbuseLimits
from mesh.hbone.connection import ConnectionConfig
from tests.hbone_support import EchoProtocol, Outbound, Pki, dial_authority, listening_socket


def _load(addr, conc: int, secs: float, q) -> None:
    async def main():
        n = 0
        end = time.monotonic() + secs

        async def one():
            nonlocal n
            while time.monotonic() < end:
                try:
                    r, w = await asyncio.open_connection(*addr)
                    w.write(b"x" * 100)
                    await r.readexactly(100)
                    w.close()
                    n += 1
                except OSError:
                    pass
        await asyncio.gather(*(one() for _ in range(conc)))
        q.put(n)
    uvloop.run(main())


async def measure(pki: Pki, conc: int, secs: float) -> tuple[float, float, int]:
    loop = asyncio.get_running_loop()
    backend = await loop.create_server(EchoProtocol, sock=listening_socket())
    baddr = backend.sockets[0].getsockname()[:2]
    unbounded = ConnectionConfig(abuse=AbuseLimits(new_stream_rate=1e9, new_stream_burst=10**9))
    server = await HboneServer.start(listening_socket(), pki.server_context(), lambda req: dial_authority(req.authority),
                                     trust_domain="cluster.local", config=unbounded)
    pool = HbonePool(max_streams_per_conn=100_000)
    out = await Outbound(pool, server.sockets[0].getsockname()[:2], pki.client_context(),
                         f"{baddr[0]}:{baddr[1]}").start()
    q = multiprocessing.Queue()
    p = multiprocessing.Process(target=_load, args=(out.addr, conc, secs, q))
    p.start()
    peak, last, t = 0.0, 0, time.monotonic()
    while p.is_alive():
        await asyncio.sleep(0.5)
        total = sum(s.conn.abuse.streams_accepted for s in server._sessions)
        now = time.monotonic()
        peak = max(peak, (total - last) / (now - t))
        last, t = total, now
    n = q.get()
    conns = pool.connections_opened
    await out.close()
    await pool.close()
    server.close()
    backend.close()
    return n / secs, peak, conns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--secs", type=float, default=5.0)
    ap.add_argument("--concurrency", default="16,64,256")
    args = ap.parse_args()
    pki = Pki.create()
    for conc in (int(c) for c in args.concurrency.split(",")):
        rate, peak, conns = uvloop.run(measure(pki, conc, args.secs))
        print(f"{conc} clients: {rate:.0f} streams/s average, peak {peak:.0f}/s over 0.5 s, "
              f"{conns} HTTP/2 connection(s)", flush=True)


if __name__ == "__main__":
    main()
