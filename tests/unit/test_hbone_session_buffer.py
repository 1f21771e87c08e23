"""Session's TLS read buffer: reused only when no memoryview of it is alive."""
from __future__ import annotations

import asyncio

from mesh.hbone.connection import ConnectionConfig, Role
from mesh.hbone.session import READ_BUFFER, Session


def test_read_buffer_is_reused_only_when_nothing_refers_to_it():
    async def go():
        s = Session(Role.CLIENT, ConnectionConfig())
        first = s.get_buffer(100)
        assert len(first) == READ_BUFFER
        first[:5] = b"hello"
        kept = first[:5]                      # what a DATA event hands a TCP transport that buffers it
        del first
        second = s.get_buffer(100)
        assert second.obj is not kept.obj     # a fresh buffer: the kept view stays intact
        second[:5] = b"XXXXX"
        assert bytes(kept) == b"hello"
        del kept
        oid = id(second.obj)                  # (an id: a reference would keep it busy)
        del second
        third = s.get_buffer(100)
        assert id(third.obj) == oid               # nothing refers to it any more: reused

    asyncio.run(go())
