"""Invariants the HBONE hot-path shortcuts rely on: stream-state flags, output chunking."""
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mesh.hbone import frames as f
from mesh.hbone.connection import (_TRANSITIONS, ConnectionConfig, DataReceived, H2Connection, ProtocolError, Role,
                                   StreamState, _Stream)
from mesh.hbone.frames import ErrorCode


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


def _reference_receive(conn: H2Connection, data: bytes) -> list:
    """receive_data as it was before its inline DATA path: every DATA frame through _on_data."""
    if conn.closed:
        return []
    try:
        events: list = []
        for ev in conn._parser.feed(data):
            if type(ev) is DataReceived:
                conn._on_data(ev, events)
            else:
                conn._on_frame(ev, events)
        return events
    except ProtocolError as e:
        conn._out.append(f.goaway_frame(conn._highest_peer_sid, e.error_code, e.reason.encode()))
        conn.closed = True
        raise


def _established(role: Role) -> H2Connection:
    """A connection of `role` after the handshake with small receive windows (100 per stream,
    150 for the connection: less than the streams' sum), streams 1 and 3 open; the client got
    the response on stream 1 only."""
    cfg = ConnectionConfig(initial_window_size=100, connection_window_size=150)
    client, server = H2Connection(Role.CLIENT, cfg), H2Connection(Role.SERVER, cfg)
    client.initiate()
    server.initiate()
    for _ in range(2):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    client.send_connect("10.0.0.2:80")
    client.send_connect("10.0.0.2:80")
    server.receive_data(client.data_to_send())
    server.send_response(1, 200)
    client.receive_data(server.data_to_send())
    return client if role is Role.CLIENT else server


def _snapshot(conn: H2Connection, events) -> tuple:
    evs = tuple((type(e).__name__, *(bytes(v) if isinstance(v, memoryview) else v for v in
                                     (getattr(e, a) for a in e.__slots__))) for e in events)
    streams = tuple((sid, s.state, s.recv_window, s.unacked) for sid, s in sorted(conn._streams.items()))
    return evs, streams, conn._recv_window, conn._conn_unacked, conn.closed, conn.data_to_send()


_ops = st.lists(st.one_of(
    st.tuples(st.just("data"), st.sampled_from([1, 3, 5, 2]),
              st.sampled_from([0, 1, 49, 50, 51, 99, 100, 101, 149, 150, 151]) | st.integers(0, 160),
              st.booleans(), st.booleans()),
    st.tuples(st.just("rst"), st.sampled_from([1, 3]), st.just(0), st.just(False), st.just(False)),
    st.tuples(st.just("ack"), st.sampled_from([1, 3]), st.integers(1, 120), st.just(False), st.just(False)),
), max_size=12)


def _data(sid, n, end=False, padded=False):
    return ("data", sid, n, end, padded)


@settings(max_examples=400)
@given(st.sampled_from([Role.CLIENT, Role.SERVER]), _ops, st.integers(1, 3))
@example(Role.SERVER, [_data(1, 100), _data(3, 60)], 1)           # beyond the connection window
@example(Role.SERVER, [_data(1, 101)], 1)                         # beyond the stream window
@example(Role.CLIENT, [_data(3, 2)], 1)                           # before the response
@example(Role.SERVER, [_data(1, 2, end=True), _data(1, 2)], 2)    # after END_STREAM, same read
@example(Role.SERVER, [_data(1, 2, padded=True), _data(5, 1)], 1)  # padded; idle stream
@example(Role.SERVER, [_data(1, 60), ("ack", 1, 60, False, False), _data(1, 90)], 1)  # credit returned
def test_inline_data_path_matches_on_data(role, ops, batch):
    """receive_data's inline DATA path leaves events, errors, windows, states and output exactly
    as _on_data does: DATA on open, half-closed, closed and idle streams, before the response,
    beyond either window, padded, with END_STREAM, several frames per read."""
    new, ref = _established(role), _established(role)
    wire = []
    for kind, sid, n, end, padded in ops + [("flush", 0, 0, False, False)]:
        if kind == "rst":
            wire.append(f.rst_stream_frame(sid, ErrorCode.CANCEL))
        elif kind == "data":
            flags = (f.FLAG_END_STREAM if end else 0) | (f.FLAG_PADDED if padded else 0)
            wire.append(f.frame(f.DATA, flags, sid, (b"\x02" + b"d" * n + b"\0\0") if padded else b"d" * n))
        if kind in ("data", "rst") and len(wire) < batch:
            continue                                  # several frames in one read
        results = []
        for conn, receive in ((new, H2Connection.receive_data), (ref, _reference_receive)):
            try:
                events = receive(conn, b"".join(wire)) if wire else []
                if kind == "ack":
                    conn.acknowledge_received_data(sid, n)
                results.append((None, _snapshot(conn, events)))
            except ProtocolError as e:
                results.append((e.reason, _snapshot(conn, [])))
        assert results[0] == results[1]
        wire = []
