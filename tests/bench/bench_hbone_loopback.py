"""In-process loopback measurement of HbonePool.tunnel: one-stream throughput and small-message round-trip rate.

Not a test (nothing is asserted): run it by hand before and after a change to the HBONE data
path and compare medians (the machine is shared, so look at several runs):

    .venv/bin/python -m tests.bench.bench_hbone_loopback --runs 3

Topology (one uvloop, one process, real mTLS on 127.0.0.1):

    app client --TCP--> outbound listener --pool.tunnel--> HboneServer --TCP--> sink / echo

* throughput: one tunnel, the client writes `--mib` MiB and half-closes; the sink counts the
  bytes and answers with the count once it sees EOF. Reported in MiB/s (wall time), and
  per CPU-second of this process (everything runs in it: less sensitive to a busy machine).
* rate: two tunnels on one pooled HTTP/2 connection, each a 100-byte ping-pong against an
  echo, `--rounds` round trips each, concurrently. Reported in round trips/s (both together).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import uvloop

from mesh.hbone import HbonePool, HboneServer
from tests.hbone_support import EchoProtocol, Outbound, Pki, dial_authority, listening_socket


class _Sink(asyncio.Protocol):
    def connection_made(self, transport):
        self.t = transport
        self.n = 0

    def data_received(self, data):
        self.n += len(data)

    def eof_received(self):
        self.t.write(b"%d\n" % self.n)
        self.t.close()
        return True


async def _setup(pki: Pki, backend_factory):
    loop = asyncio.get_running_loop()
    backend = await loop.create_server(backend_factory, sock=listening_socket())
    baddr = backend.sockets[0].getsockname()[:2]
    server = await HboneServer.start(listening_socket(), pki.server_context(),
                                     lambda req: dial_authority(req.authority), trust_domain="cluster.local")
    pool = HbonePool()
    out = await Outbound(pool, server.sockets[0].getsockname()[:2], pki.client_context(),
                         f"{baddr[0]}:{baddr[1]}").start()
    return backend, server, pool, out


async def _teardown(backend, server, pool, out):
    await out.close()
    await pool.close()
    server.close()
    backend.close()


async def throughput(pki: Pki, mib: int) -> float:
    env = await _setup(pki, _Sink)
    out = env[3]
    reader, writer = await asyncio.open_connection(*out.addr)
    chunk = bytes(256 * 1024)
    total = mib * 1024 * 1024
    t0 = time.perf_counter()
    c0 = time.process_time()
    for _ in range(total // len(chunk)):
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    line = await reader.readline()
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    writer.close()
    assert int(line) == total, (line, total)
    await _teardown(*env)
    return mib / dt, mib / cpu


async def rate(pki: Pki, rounds: int, tunnels: int = 2) -> float:
    env = await _setup(pki, EchoProtocol)
    out = env[3]
    msg = b"x" * 100

    async def one():
        reader, writer = await asyncio.open_connection(*out.addr)
        writer.write(msg)                               # warm-up: tunnel opened
        await reader.readexactly(100)
        t0 = time.perf_counter()
        for _ in range(rounds):
            writer.write(msg)
            await reader.readexactly(100)
        dt = time.perf_counter() - t0
        writer.close()
        return dt

    c0 = time.process_time()
    dts = await asyncio.gather(*(one() for _ in range(tunnels)))
    cpu = time.process_time() - c0
    await _teardown(*env)
    assert env[2].connections_opened == 1
    return tunnels * rounds / max(dts), tunnels * rounds / cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5000)
    args = ap.parse_args()
    pki = Pki.create()
    tps, rps, tcpu, rcpu = [], [], [], []
    for i in range(args.runs):
        wall, cpu = uvloop.run(throughput(pki, args.mib))
        tps.append(wall)
        tcpu.append(cpu)
        wall, cpu = uvloop.run(rate(pki, args.rounds))
        rps.append(wall)
        rcpu.append(cpu)
        print(f"run {i + 1}: throughput {tps[-1]:.0f} MiB/s ({tcpu[-1]:.0f} per CPU-s), "
              f"ping-pong {rps[-1]:.0f} round trips/s ({rcpu[-1]:.0f} per CPU-s)", flush=True)
    print(f"median: throughput {statistics.median(tps):.0f} MiB/s ({statistics.median(tcpu):.0f} per CPU-s), "
          f"ping-pong {statistics.median(rps):.0f} round trips/s ({statistics.median(rcpu):.0f} per CPU-s)")


if __name__ == "__main__":
    main()
