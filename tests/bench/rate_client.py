#!/usr/bin/env python3
"""Constant-rate (open-loop, wrk2-style) HTTP/1.1 GET client: latency from the intended send time, JSON out."""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import sys
import time

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)


class Conn(asyncio.Protocol):
    """One keep-alive connection, one request in flight at a time (no pipelining, as wrk)."""

    def __init__(self, gen: Generator) -> None:
        self.gen, self.buf, self.start, self.transport = gen, b"", 0.0, None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.lost(self, exc)

    def send(self, start: float) -> None:
        self.start = start
        self.transport.write(self.gen.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            m = _CONTENT_LENGTH.search(self.buf, 0, end + 2)
            total = end + 4 + (int(m.group(1)) if m else 0)
            if len(self.buf) < total:
                return
            ok = self.buf.startswith(b"HTTP/1.1 200 ")
            self.buf = self.buf[total:]
            self.gen.done(self, ok)


class Generator:
    """Requests due at t0 + i/rate, handed to idle connections; late ones queue (open loop).

    Coordinated omission: a request that waited for a busy connection is timed from its
    intended send time, so a slow response counts against every request scheduled behind it.
    A request sent on an idle connection is timed from its actual send: the event loop's timer
    wakes up to ~1 ms late, and that is the client's lateness, not the path's.
    """

    def __init__(self, rate: float, secs: float, host: str) -> None:
        self.rate, self.secs = rate, secs
        self.request = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        self.idle: collections.deque[Conn] = collections.deque()
        self.pending: collections.deque[float] = collections.deque()  # intended times, waiting for a conn
        self.lat: list[float] = []
        self.late: list[float] = []
        self.errors = self.lost_conns = self.sent = 0
        self.max_backlog = 0

    def done(self, c: Conn, ok: bool) -> None:
        now = time.perf_counter()
        self.lat.append(now - c.start)
        self.errors += not ok
        if self.pending:  # queued behind a busy connection: timed from the intended send
            c.send(self.pending.popleft())
        else:
            self.idle.append(c)

    def lost(self, c: Conn, exc: Exception | None) -> None:
        self.lost_conns += 1
        if c in self.idle:
            self.idle.remove(c)

    async def run(self, conns: list[Conn]) -> None:
        t0 = time.perf_counter()
        n = int(self.rate * self.secs)
        i = 0
        while i < n:
            now = time.perf_counter()
            self.late.append(max(0.0, now - (t0 + i / self.rate)))  # the client's own wake-up lateness
            while i < n and t0 + i / self.rate <= now:
                intended = t0 + i / self.rate
                i += 1
                self.sent += 1
                if self.idle and not self.pending:
                    self.idle.popleft().send(time.perf_counter())  # timer lateness excluded
                else:
                    self.pending.append(intended)
            self.max_backlog = max(self.max_backlog, len(self.pending))
            if i < n:
                await asyncio.sleep(max(0.0, t0 + i / self.rate - time.perf_counter()))
        deadline = time.perf_counter() + 5.0  # drain: every request answered or 5 s
        while len(self.lat) < self.sent and time.perf_counter() < deadline and self.lost_conns < len(conns):
            await asyncio.sleep(0.005)
        self.elapsed = time.perf_counter() - t0


def percentile(sorted_vals: list[float], q: float) -> float:
    return sorted_vals[min(len(sorted_vals) - 1, int(q / 100 * len(sorted_vals)))]


async def main_async(a: argparse.Namespace) -> dict:
    loop = asyncio.get_running_loop()
    gen = Generator(a.rate, a.secs, a.host)
    host, port = a.host.rsplit(":", 1)
    conns = []
    for _ in range(a.conns):
        _, c = await loop.create_connection(lambda: Conn(gen), host, int(port))
        conns.append(c)
    for c in conns:  # one warm request each (proxies' upstream connections): not the figure
        c.send(time.perf_counter())
    deadline = time.perf_counter() + 5.0
    while len(gen.idle) < len(conns) and time.perf_counter() < deadline:
        await asyncio.sleep(0.005)
    if len(gen.idle) < len(conns):
        raise SystemExit(f"rate_client: {len(conns) - len(gen.idle)} of {len(conns)} warm-up requests unanswered")
    gen.lat.clear()
    gen.errors = 0
    await gen.run(conns)
    for c in conns:
        c.transport.close()
    lat = sorted(gen.lat)
    res = {"rate": a.rate, "conns": a.conns, "secs": a.secs, "sent": gen.sent, "completed": len(lat),
           "achieved_rps": len(lat) / gen.elapsed, "errors": gen.errors, "lost_conns": gen.lost_conns,
           "max_backlog": gen.max_backlog}
    if lat:
        res |= {f"p{q}_ms": percentile(lat, q) * 1e3 for q in (10, 25, 50, 75, 90, 99)} | {"max_ms": lat[-1] * 1e3}
    late = sorted(gen.late)
    res |= {"client_late_p99_ms": percentile(late, 99) * 1e3, "client_late_max_ms": late[-1] * 1e3}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rate", type=float, required=True, help="requests per second")
    ap.add_argument("--secs", type=float, default=3.0)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("host", help="host:port")
    a = ap.parse_args(argv)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    res = asyncio.run(main_async(a))
    json.dump(res, sys.stdout)
    print()
    return 0 if res["completed"] and not res["errors"] else 1


# ---- the benchmark's report of these runs (bench_l4.py) ------------------------------------

def add_rate_deltas(med: dict[str, dict]) -> None:
    """Per setup and rate: added p50/p99 over direct at the same rate, and that as a multiple of Envoy's."""
    for m in med.values():
        for k, v in m.get("rates", {}).items():
            base = med.get("direct", {}).get("rates", {}).get(k)
            env = med.get("envoy", {}).get("rates", {}).get(k)
            for q in ("p50_ms", "p99_ms"):
                v[f"added_{q}"] = v[q] - base[q] if base else None
                e = env[q] - base[q] if env and base else None
                v[f"added_{q}_x_env"] = v[f"added_{q}"] / e if e and e > 0 and v[f"added_{q}"] is not None else None


RATE_COLUMNS = [("setup", None, ""), ("req/s asked", None, ""), ("req/s got", "achieved_rps", ".0f"),
                ("p50 ms", "p50_ms", ".3f"), ("p99 ms", "p99_ms", ".3f"),
                ("added p50 ms", "added_p50_ms", ".3f"), ("added p99 ms", "added_p99_ms", ".3f"),
                ("added p50 x envoy", "added_p50_ms_x_env", ".2f"), ("added p99 x envoy", "added_p99_ms_x_env", ".2f"),
                ("client late max ms", "client_late_max_ms", ".1f")]


def rate_table(med: dict[str, dict], setups: tuple[str, ...]) -> str:
    """One row per setup and rate ("" when there were no constant-rate runs)."""
    rows = [[c[0] for c in RATE_COLUMNS]]
    for name in setups:
        for rate, v in med.get(name, {}).get("rates", {}).items():
            rows.append([name, rate] + ["-" if v.get(k) is None else format(v[k], f) for _, k, f in RATE_COLUMNS[2:]])
    return grid(rows) if len(rows) > 1 else ""


def grid(rows: list[list[str]]) -> str:
    """A Markdown table, columns padded."""
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in rows[1:]])


if __name__ == "__main__":
    sys.exit(main())
