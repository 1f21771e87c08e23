"""Invariants the HBONE hot-path shortcuts rely on: stream-state flags, output chunking."""
from hypothesis import given
from hypothesis import strategies as st

from mesh.hbone.connection import _TRANSITIONS, H2Connection, Role, StreamState, _Stream


def test_closed_flags_follow_every_transition():
    closed_remote = {StreamState.HALF_CLOSED_REMOTE, StreamState.CLOSED}
    closed_local = {StreamState.HALF_CLOSED_LOCAL, StreamState.CLOSED}
    # Walk every path from OPEN through the table, so each flag value is reached the way the
    # connection reaches it (no state set by hand).
    paths = [[]]
    for _ in range(3):
        paths = [p + [a] for p in paths for a in ("send_end", "recv_end", "reset")] + paths
    seen = set()
    for path in paths:
        conn = H2Connection(Role.CLIENT)
        s = _Stream(1, 0, 0)
        conn._streams[1] = s
        for action in path:
            if (s.state, action) not in _TRANSITIONS:
                break
            conn._transition(s, action)
            seen.add((s.state, action))
            assert s.remote_closed == (s.state in closed_remote), (path, s.state)
            assert s.local_closed == (s.state in closed_local), (path, s.state)
    assert {new for (_, _), new in _TRANSITIONS.items()} == {st for st, _ in seen}


_items = st.lists(st.one_of(st.binary(max_size=40).map(bytes),
                            st.integers(0, 100_000).map(lambda n: bytes(n)),
                            st.integers(0, 100_000).map(lambda n: memoryview(b"m" * n))), max_size=6)


@given(_items, st.sampled_from([17 * 1024, 20_000, 64 * 1024]))
def test_chunks_to_send_keeps_bytes_order_and_bounds(items, limit):
    conn = H2Connection(Role.CLIENT)
    conn._out.extend(items)
    chunks = conn.chunks_to_send(limit)
    assert not conn.has_data_to_send
    assert b"".join(bytes(c) for c in chunks) == b"".join(bytes(i) for i in items)
    if not items:
        assert chunks == []
    elif len(items) == 1:
        assert chunks[0] is items[0]                  # passed as is, never copied
    elif sum(len(i) for i in items) < limit:
        assert len(chunks) == 1                       # a small flush is one write
    # joined small items stay below 2 x limit; a big payload is never copied (it is a chunk
    # itself or a memoryview slice of it)
    assert all(len(c) < 2 * limit or type(c) is memoryview or any(c is i for i in items) for c in chunks)
