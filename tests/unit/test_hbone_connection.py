"""Sans-IO HTTP/2 connection: client<->server pairs over byte passing, CONNECT rules, flow control, hostile peers."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.hbone import frames as f
from mesh.hbone.connection import (ConnectionConfig, DataReceived, GoAway, H2Connection, HandshakeCompleted,
                                   LocalProtocolError, RequestReceived, RequestRejected, ResponseReceived, Role,
                                   SendUnblocked, StreamReset, StreamState)
from mesh.hbone.frames import ErrorCode, ProtocolError


class Pair:
    """Client and server connections joined by explicit byte passing."""

    def __init__(self, client_cfg=ConnectionConfig(), server_cfg=ConnectionConfig()) -> None:
        self.client = H2Connection(Role.CLIENT, client_cfg)
        self.server = H2Connection(Role.SERVER, server_cfg)
        self.client.initiate()
        self.server.initiate()

    def to_server(self) -> list:
        return self.server.receive_data(self.client.data_to_send())

    def to_client(self) -> list:
        return self.client.receive_data(self.server.data_to_send())

    def handshake(self) -> None:
        assert HandshakeCompleted() in self.to_server()
        assert HandshakeCompleted() in self.to_client()
        self.to_server()                       # SETTINGS ACK

    def open(self, authority="10.0.0.2:8080", headers=()) -> int:
        sid = self.client.send_connect(authority, headers)
        (req,) = [e for e in self.to_server() if isinstance(e, RequestReceived)]
        self.server.send_response(sid, 200)
        (resp,) = [e for e in self.to_client() if isinstance(e, ResponseReceived)]
        assert resp.status == 200
        return sid


def data_of(events, sid=None) -> bytes:
    return b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived) and (sid is None or e.stream_id == sid))


def test_connect_roundtrip_exposes_authority_and_headers():
    p = Pair()
    p.handshake()
    sid = p.client.send_connect("10.0.0.2:8080", [("baggage", "k8s.namespace.name=demo"), ("forwarded", 'for="1.2.3.4"')])
    (req,) = p.to_server()
    assert req == RequestReceived(sid, "10.0.0.2:8080",
                                  (("baggage", "k8s.namespace.name=demo"), ("forwarded", 'for="1.2.3.4"')), False)
    p.server.send_response(sid, 200)
    (resp,) = p.to_client()
    assert (resp.status, resp.end_stream) == (200, False)


def test_data_both_ways_and_half_close_state_machine():
    p = Pair()
    p.handshake()
    sid = p.open()
    assert p.client.send_data(sid, b"ping")
    p.client.end_stream(sid)
    evs = p.to_server()
    assert data_of(evs) == b"ping" and evs[-1].end_stream
    assert p.server.stream_state(sid) is StreamState.HALF_CLOSED_REMOTE
    assert p.client.stream_state(sid) is StreamState.HALF_CLOSED_LOCAL
    assert p.server.send_data(sid, b"pong")        # still open towards the client
    p.server.end_stream(sid)
    evs = p.to_client()
    assert data_of(evs) == b"pong" and evs[-1].end_stream
    assert p.client.stream_state(sid) is StreamState.CLOSED and p.server.stream_state(sid) is StreamState.CLOSED
    assert p.client.open_streams == p.server.open_streams == 0


def test_send_respects_peer_max_frame_size():
    p = Pair(server_cfg=ConnectionConfig(max_frame_size=16384))
    p.handshake()
    sid = p.open()
    p.client.send_data(sid, b"x" * 50000)
    wire = p.client.data_to_send()
    sizes = []
    off = 0
    while off < len(wire):
        n = int.from_bytes(wire[off:off + 3], "big")
        sizes.append(n)
        off += 9 + n
    assert max(sizes) == 16384 and sum(sizes) == 50000


def test_sender_stops_at_window_and_resumes_on_window_update():
    small = ConnectionConfig(initial_window_size=1000, connection_window_size=65535)
    p = Pair(server_cfg=small)
    p.handshake()
    sid = p.open()
    assert p.client.send_data(sid, b"a" * 3000) is False      # only 1000 fit the stream window
    assert p.client.pending_bytes(sid) == 2000
    assert p.client.send_data(sid, b"b" * 10) is False         # queued behind, order kept
    evs = p.to_server()
    assert data_of(evs) == b"a" * 1000
    # Nothing is returned until the consumer acknowledges (ack-on-consume).
    assert p.server.data_to_send() == b""
    p.server.acknowledge_received_data(sid, 1000)
    evs = p.to_client()
    assert not any(isinstance(e, SendUnblocked) for e in evs)  # 1000 more fit, 1010 pending
    assert data_of(p.to_server()) == b"a" * 1000
    p.server.acknowledge_received_data(sid, 1000)
    assert SendUnblocked(sid) not in p.to_client()              # 10 bytes still held
    assert data_of(p.to_server()) == b"a" * 1000
    p.server.acknowledge_received_data(sid, 1000)
    assert SendUnblocked(sid) in p.to_client()
    assert data_of(p.to_server()) == b"b" * 10


def test_end_stream_waits_behind_held_data():
    p = Pair(server_cfg=ConnectionConfig(initial_window_size=100, connection_window_size=65535))
    p.handshake()
    sid = p.open()
    p.client.send_data(sid, b"z" * 150)
    p.client.end_stream(sid)
    evs = p.to_server()
    assert data_of(evs) == b"z" * 100 and not evs[-1].end_stream
    p.server.acknowledge_received_data(sid, 100)
    p.to_client()
    evs = p.to_server()
    assert data_of(evs) == b"z" * 50 and evs[-1].end_stream


def test_connection_window_update_sent_after_half_window_consumed():
    p = Pair(server_cfg=ConnectionConfig(initial_window_size=1 << 20, connection_window_size=1 << 20))
    p.handshake()
    sid = p.open()
    p.client.send_data(sid, b"q" * 600_000)
    p.to_server()
    p.server.acknowledge_received_data(sid, 600_000)
    evs = p.client.receive_data(p.server.data_to_send())
    assert evs == []
    conn_win, stream_win = p.client.send_windows(sid)
    assert conn_win == (1 << 20) and stream_win == (1 << 20)   # both credits returned


def test_initial_window_change_applies_to_open_streams():
    p = Pair()
    p.handshake()
    sid = p.open()
    before = p.client.send_windows(sid)[1]
    p.server._out.append(f.settings_frame({f.Setting.INITIAL_WINDOW_SIZE: 1000}))
    p.to_client()
    assert p.client.send_windows(sid)[1] == before - (ConnectionConfig().initial_window_size - 1000)


def test_rst_stream_both_ways():
    p = Pair()
    p.handshake()
    sid = p.open()
    p.client.reset_stream(sid, ErrorCode.CONNECT_ERROR)
    assert p.to_server() == [StreamReset(sid, ErrorCode.CONNECT_ERROR, True, "peer_reset")]
    sid2 = p.open()
    p.server.reset_stream(sid2, ErrorCode.CANCEL)
    assert p.to_client() == [StreamReset(sid2, ErrorCode.CANCEL, True, "peer_reset")]
    assert p.client.open_streams == p.server.open_streams == 0


def test_data_racing_with_our_reset_is_credited_not_fatal():
    p = Pair()
    p.handshake()
    sid = p.open()
    p.client.send_data(sid, b"late" * 100)
    p.server.reset_stream(sid, ErrorCode.CANCEL)
    assert p.to_server() == []                                  # tolerated after our RST


def test_ping_is_acked():
    p = Pair()
    p.handshake()
    p.client.ping(b"abcdefgh")
    p.to_server()
    assert f.ping_frame(b"abcdefgh", ack=True) in p.server.data_to_send()


def test_goaway_stops_new_streams_and_refuses_unprocessed():
    p = Pair()
    p.handshake()
    s1 = p.open()
    s3 = p.client.send_connect("10.0.0.2:80")                  # not yet seen by the server
    p.server.close()
    evs = p.to_client()
    assert StreamReset(s3, ErrorCode.REFUSED_STREAM, True, "goaway") in evs
    assert any(isinstance(e, GoAway) and e.last_stream_id == s1 for e in evs)
    assert not p.client.can_open_stream()
    with pytest.raises(LocalProtocolError) as e:
        p.client.send_connect("10.0.0.2:80")
    assert e.value.reason == "goaway"
    assert p.client.send_data(s1, b"still flows")              # drain: existing stream continues
    assert data_of(p.to_server()) == b"still flows"


def test_server_refuses_streams_beyond_max_concurrent():
    p = Pair(server_cfg=ConnectionConfig(max_concurrent_streams=1))
    p.handshake()
    assert p.client.peer_max_concurrent_streams == 1
    p.open()
    assert not p.client.can_open_stream()
    p.client.peer_max_concurrent_streams = 10                 # a client ignoring the limit
    sid = p.client.send_connect("10.0.0.2:80")
    assert p.to_server() == [RequestRejected(sid, 0, "max_concurrent_streams")]
    assert p.to_client() == [StreamReset(sid, ErrorCode.REFUSED_STREAM, True, "refused_stream")]


def raw_request(headers) -> bytes:
    import hpack
    return f.frame(f.HEADERS, f.FLAG_END_HEADERS, 1, hpack.Encoder().encode(headers))


BAD_CONNECTS = [
    ("with :path", [(":method", "CONNECT"), (":authority", "1.2.3.4:80"), (":path", "/")], "scheme_or_path_present"),
    ("with :scheme", [(":method", "CONNECT"), (":scheme", "https"), (":authority", "1.2.3.4:80")],
     "scheme_or_path_present"),
    ("missing authority", [(":method", "CONNECT")], "missing_authority"),
    ("GET", [(":method", "GET"), (":authority", "1.2.3.4:80")], "not_connect"),
    ("no method", [(":authority", "1.2.3.4:80")], "missing_method"),
    ("authority without port", [(":method", "CONNECT"), (":authority", "1.2.3.4")], "bad_authority"),
    ("port out of range", [(":method", "CONNECT"), (":authority", "1.2.3.4:70000")], "bad_authority"),
    ("extended connect", [(":method", "CONNECT"), (":protocol", "websocket"), (":authority", "a:1")],
     "unknown_pseudo_header"),
    ("duplicate authority", [(":method", "CONNECT"), (":authority", "a:1"), (":authority", "b:2")],
     "duplicate_pseudo_header"),
    ("pseudo after regular", [(":method", "CONNECT"), ("baggage", "x"), (":authority", "a:1")],
     "pseudo_header_after_regular"),
    ("uppercase name", [(":method", "CONNECT"), (":authority", "a:1"), ("Baggage", "x")], "invalid_header_name"),
    ("connection header", [(":method", "CONNECT"), (":authority", "a:1"), ("connection", "close")],
     "connection_specific_header"),
]


@pytest.mark.parametrize("name,headers,reason", BAD_CONNECTS, ids=[b[0] for b in BAD_CONNECTS])
def test_malformed_connect_gets_400_and_connection_survives(name, headers, reason):
    p = Pair()
    p.handshake()
    evs = p.server.receive_data(raw_request(headers))
    assert evs == [RequestRejected(1, 400, reason)]
    out = f.FrameParser(expect_preface=False).feed(p.server.data_to_send())
    assert f.HeadersReceived(1, [(b":status", b"400")], True) in out
    assert p.server.open_streams == 0 and not p.server.closed


def test_client_sees_400_status_from_server():
    p = Pair()
    p.handshake()
    sid = p.client.send_connect("no-port")
    p.to_server()
    evs = p.to_client()
    assert ResponseReceived(sid, 400, (), True) in evs


def server_after_preface() -> H2Connection:
    s = H2Connection(Role.SERVER)
    s.initiate()
    s.receive_data(f.PREFACE + f.settings_frame({}))
    return s


HOSTILE = [
    ("first frame not settings", f.PREFACE + f.ping_frame(b"12345678"), ErrorCode.PROTOCOL_ERROR, "settings_expected"),
    ("data on unknown stream", f.data_frame_header(1, 3) + b"abc", ErrorCode.PROTOCOL_ERROR, "data_on_idle_stream"),
    ("window overflow", f.window_update_frame(0, 2**31 - 1), ErrorCode.FLOW_CONTROL_ERROR, "window_overflow"),
    ("zero window increment", f.window_update_frame(0, 0), ErrorCode.PROTOCOL_ERROR, "zero_window_increment"),
    ("window update idle stream", f.window_update_frame(5, 10), ErrorCode.PROTOCOL_ERROR,
     "window_update_on_idle_stream"),
    ("rst idle stream", f.rst_stream_frame(7, 0), ErrorCode.PROTOCOL_ERROR, "rst_on_idle_stream"),
    ("even stream id", raw_request([(":method", "CONNECT"), (":authority", "a:1")]).replace(
        b"\x00\x00\x00\x01", b"\x00\x00\x00\x02", 1), ErrorCode.PROTOCOL_ERROR, "bad_stream_id"),
    ("bad initial window", f.settings_frame({f.Setting.INITIAL_WINDOW_SIZE: 2**31}), ErrorCode.FLOW_CONTROL_ERROR,
     "bad_initial_window_size"),
    ("bad max frame size", f.settings_frame({f.Setting.MAX_FRAME_SIZE: 100}), ErrorCode.PROTOCOL_ERROR,
     "bad_max_frame_size"),
]


@pytest.mark.parametrize("name,wire,code,reason", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_peer_connection_errors_send_goaway(name, wire, code, reason):
    s = H2Connection(Role.SERVER) if wire.startswith(f.PREFACE) else server_after_preface()
    if wire.startswith(f.PREFACE):
        s.initiate()
    s.data_to_send()
    with pytest.raises(ProtocolError) as e:
        s.receive_data(wire)
    assert (e.value.error_code, e.value.reason) == (code, reason)
    out = s.data_to_send()
    assert out[3] == f.GOAWAY and int.from_bytes(out[13:17], "big") == code
    assert s.closed and s.receive_data(b"more") == []


def test_headers_on_closed_stream_is_connection_error():
    p = Pair()
    p.handshake()
    sid = p.open()
    p.client.reset_stream(sid)
    p.to_server()
    with pytest.raises(ProtocolError) as e:
        p.server.receive_data(raw_request([(":method", "CONNECT"), (":authority", "a:1")]))
    assert e.value.reason == "headers_on_closed_stream"


def test_stream_flow_control_violation_resets_stream():
    p = Pair(server_cfg=ConnectionConfig(initial_window_size=100))
    p.handshake()
    sid = p.open()
    evs = p.server.receive_data(f.data_frame_header(sid, 200) + b"x" * 200)
    assert StreamReset(sid, ErrorCode.FLOW_CONTROL_ERROR, False, "flow_control_violation") in evs


def test_connection_flow_control_violation():
    # A stream window larger than the connection's, so the connection window is what overflows.
    s = H2Connection(Role.SERVER, ConnectionConfig(initial_window_size=64 << 20))
    s.initiate()
    s.receive_data(f.PREFACE + f.settings_frame({}))
    s.receive_data(raw_request([(":method", "CONNECT"), (":authority", "a:1")]))
    with pytest.raises(ProtocolError) as e:
        for _ in range(20):                                      # 20 MiB > 16 MiB window
            s.receive_data(f.data_frame_header(1, 1 << 20) + b"\0" * (1 << 20))
    assert e.value.reason == "flow_control_violation"


def test_data_after_end_stream_resets():
    p = Pair()
    p.handshake()
    sid = p.open()
    p.client.end_stream(sid)
    p.to_server()
    evs = p.server.receive_data(f.data_frame_header(sid, 1) + b"!")
    assert StreamReset(sid, ErrorCode.STREAM_CLOSED, False, "data_after_end_stream") in evs


def test_client_rejects_data_before_response():
    p = Pair()
    p.handshake()
    sid = p.client.send_connect("a:1")
    p.to_server()
    evs = p.client.receive_data(f.data_frame_header(sid, 1) + b"!")
    assert StreamReset(sid, ErrorCode.PROTOCOL_ERROR, False, "data_before_response") in evs


def test_stream_ids_exhaustion_is_local_error():
    p = Pair()
    p.handshake()
    p.client._next_sid = 2**31 + 1
    assert p.client.stream_ids_exhausted and not p.client.can_open_stream()
    with pytest.raises(LocalProtocolError) as e:
        p.client.send_connect("a:1")
    assert e.value.reason == "stream_ids_exhausted"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_fuzz_server_after_valid_preface(chunks):
    s = server_after_preface()
    try:
        for c in chunks:
            s.receive_data(c)
    except ProtocolError:
        return
    assert s._parser.buffered <= s.config.max_frame_size + 9
    assert s.open_streams <= s.config.max_concurrent_streams


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([f.DATA, f.HEADERS, f.PRIORITY, f.RST_STREAM, f.SETTINGS, f.PING,
                                           f.GOAWAY, f.WINDOW_UPDATE, f.CONTINUATION, 0xF]),
                          st.integers(0, 255), st.integers(0, 7), st.binary(max_size=40)), max_size=10))
def test_fuzz_server_with_well_framed_random_frames(frames_):
    s = server_after_preface()
    try:
        for ftype, flags, sid, payload in frames_:
            s.receive_data(f.frame(ftype, flags, sid, payload))
    except ProtocolError:
        return


def test_chunks_to_send_bounds_copies_and_keeps_bytes():
    p = Pair()
    p.handshake()
    sid = p.open()
    payloads = [b"a" * 10, b"b" * 300_000, b"c" * 20, b"d" * 5]
    for d in payloads:
        p.client.send_data(sid, d)
    conn = p.client
    frames_whole = b"".join(conn._out)
    chunks = conn.chunks_to_send(limit=64 * 1024)
    assert b"".join(bytes(c) for c in chunks) == frames_whole and not conn.has_data_to_send
    # small frames are coalesced; nothing joined beyond the limit unless it is one big payload
    assert all(len(c) < 64 * 1024 + 16 * 1024 or isinstance(c, memoryview) for c in chunks)
    assert len(chunks) < 2 * len(payloads) + 2
    # the frames before the big payload (the 10-byte DATA and the big DATA's header) are topped
    # up from the payload to one full TLS record: no record holding a lone 9-byte header
    assert len(chunks[0]) == 16 * 1024 and bytes(chunks[0]).endswith(b"b" * 1000)
    assert isinstance(chunks[1], memoryview) and bytes(chunks[1]) == b"b" * (300_000 - (16 * 1024 - 19 - 9))


def test_chunks_to_send_tops_up_only_what_precedes_a_big_payload():
    p = Pair()
    p.handshake()
    sid = p.open()
    conn = p.client
    conn.send_data(sid, b"x" * 20_000)             # below the limit: coalesced, not split
    whole = b"".join(conn._out)
    chunks = conn.chunks_to_send(limit=64 * 1024)
    assert len(chunks) == 1 and bytes(chunks[0]) == whole
