"""Session's TLS read buffer: sized to what the TLS layer holds, reused only when no memoryview of it is alive."""
from __future__ import annotations

import asyncio

from mesh.hbone.connection import ConnectionConfig, Role
from mesh.hbone.session import MIN_READ_BUFFER, READ_BUFFER, Session


def session_run(fn):
    async def go():
        fn(Session(Role.CLIENT, ConnectionConfig()))
    asyncio.run(go())


def test_read_buffer_is_reused_only_when_nothing_refers_to_it():
    def check(s):
        first = s.get_buffer(10_000)
        first[:5] = b"hello"
        kept = first[:5]                      # what a DATA event hands a TCP transport that buffers it
        del first
        second = s.get_buffer(10_000)
        assert second.obj is not kept.obj     # a fresh buffer: the kept view stays intact
        second[:5] = b"XXXXX"
        assert bytes(kept) == b"hello"
        del kept
        oid = id(second.obj)                  # (an id: a reference would keep it busy)
        del second
        third = s.get_buffer(10_000)
        assert id(third.obj) == oid           # nothing refers to it any more: reused
    session_run(check)


def test_read_buffer_follows_the_size_hint_within_bounds():
    def check(s):
        assert len(s.get_buffer(100)) == MIN_READ_BUFFER
        assert len(s.get_buffer(1 << 20)) == READ_BUFFER        # bulk: one large buffer
        assert len(s.get_buffer(200_000)) == READ_BUFFER        # close enough: reused
        assert len(s.get_buffer(2_000)) == MIN_READ_BUFFER      # small reads again: the large one is given back
    session_run(check)
