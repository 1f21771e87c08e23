"""HTTP/2 framing: encoders round-trip through the parser, cut-through DATA, hostile frames -> ProtocolError."""
from __future__ import annotations

import struct

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.hbone import frames as f
from mesh.hbone.frames import ErrorCode, FrameParser, ProtocolError


def parser(**kw) -> FrameParser:
    return FrameParser(expect_preface=False, **kw)


def test_settings_roundtrip():
    p = parser()
    (ev,) = p.feed(f.settings_frame({f.Setting.INITIAL_WINDOW_SIZE: 1 << 20, f.Setting.MAX_FRAME_SIZE: 32768}))
    assert ev == f.SettingsReceived(((4, 1 << 20), (5, 32768)), False)
    assert p.feed(f.settings_ack_frame()) == [f.SettingsReceived((), True)]


def test_control_frames_roundtrip():
    p = parser()
    data = (f.window_update_frame(3, 1000) + f.rst_stream_frame(5, ErrorCode.CANCEL)
            + f.ping_frame(b"12345678") + f.goaway_frame(7, ErrorCode.NO_ERROR, b"bye"))
    assert p.feed(data) == [f.WindowUpdateReceived(3, 1000), f.RstStreamReceived(5, ErrorCode.CANCEL),
                            f.PingReceived(b"12345678", False), f.GoAwayReceived(7, 0, b"bye")]


def test_connect_headers_decode_with_hpack():
    block = f.encode_connect_block("10.0.0.1:8080", [("baggage", "k=v"), ("traceparent", "00-ab-cd-01")])
    assert hpack.Decoder().decode(block) == [(":method", "CONNECT"), (":authority", "10.0.0.1:8080"),
                                             ("baggage", "k=v"), ("traceparent", "00-ab-cd-01")]
    assert hpack.Decoder().decode(f.encode_status_block(200)) == [(":status", "200")]
    assert hpack.Decoder().decode(f.encode_status_block(503, [("x", "y" * 300)])) == [(":status", "503"), ("x", "y" * 300)]


@pytest.mark.parametrize("name", ["Upper", ":path", "sp ace", ""])
def test_encoder_refuses_bad_header_names(name):
    with pytest.raises(ValueError):
        f.encode_connect_block("1.2.3.4:80", [(name, "v")])


def test_encoder_refuses_crlf_values():
    with pytest.raises(ValueError):
        f.encode_connect_block("1.2.3.4:80", [("a", "x\r\ny")])


def test_headers_split_into_continuation_and_reassembled():
    block = f.encode_connect_block("1.2.3.4:80", [("baggage", "v" * 40000)])
    wire = f.headers_frames(1, block, end_stream=False, max_frame_size=16384)
    assert wire[3] == f.HEADERS and wire.count(bytes([f.CONTINUATION])) >= 1
    (ev,) = parser().feed(wire)
    assert ev.stream_id == 1 and not ev.end_stream
    assert (b"baggage", b"v" * 40000) in ev.headers


def test_data_cut_through_delivers_partial_frames_as_memoryviews():
    p = parser(max_frame_size=1 << 20)
    payload = bytes(range(256)) * 100
    wire = f.data_frame_header(1, len(payload), end_stream=True) + payload
    events = p.feed(wire[:9 + 1000]) + p.feed(wire[9 + 1000:9 + 5000]) + p.feed(wire[9 + 5000:])
    assert [type(e.data) for e in events] == [memoryview] * 3
    assert b"".join(bytes(e.data) for e in events) == payload
    assert [e.end_stream for e in events] == [False, False, True]
    assert sum(e.flow_controlled_length for e in events) == len(payload)
    assert p.buffered == 0


def test_reused_read_buffer_never_changes_what_the_parser_kept():
    """The session decrypts into one buffer and reuses it once nothing refers to it: what the
    parser keeps past a feed (a PING payload, a half-received frame, a header block's first
    fragment) must be its own bytes, not a view into that buffer."""
    block = f.encode_connect_block("1.2.3.4:80", [("baggage", "v" * 40000)])
    headers = f.headers_frames(1, block, end_stream=False, max_frame_size=16384)
    wire = f.ping_frame(b"12345678") + headers
    cut = len(f.ping_frame(b"12345678")) + 16384 + 9 + 100   # inside the first CONTINUATION
    p = parser()
    buf = bytearray(wire[:cut])
    events = p.feed(memoryview(buf))
    buf[:] = b"\xff" * len(buf)                                # the buffer is reused
    events += p.feed(memoryview(bytearray(wire[cut:])))
    assert events[0] == f.PingReceived(b"12345678", False) and type(events[0].opaque) is bytes
    assert (b"baggage", b"v" * 40000) in events[1].headers


def test_empty_data_end_stream_and_padded_data():
    p = parser()
    assert p.feed(f.data_frame_header(1, 0, end_stream=True)) == [f.DataReceived(1, b"", True, 0)]
    padded = bytes([3]) + b"abc" + b"\0\0\0"
    (ev,) = p.feed(f.frame(f.DATA, f.FLAG_PADDED, 3, padded))
    assert ev == f.DataReceived(3, b"abc", False, len(padded))


def test_headers_with_padding_and_priority():
    block = f.encode_status_block(200)
    payload = bytes([2]) + b"\0\0\0\x01\x10" + block + b"\0\0"
    (ev,) = parser().feed(f.frame(f.HEADERS, f.FLAG_PADDED | f.FLAG_PRIORITY | f.FLAG_END_HEADERS, 1, payload))
    assert ev.headers == [(b":status", b"200")]


def test_unknown_frame_types_and_priority_are_ignored():
    p = parser()
    evs = p.feed(f.frame(0xFA, 0, 0, b"whatever") + f.frame(f.PRIORITY, 0, 1, b"\0\0\0\0\x10")
                 + f.ping_frame(b"abcdefgh"))
    assert evs == [f.PriorityReceived(1), f.PingReceived(b"abcdefgh", False)]


def test_preface_checked_across_reads():
    p = FrameParser(expect_preface=True)
    assert p.feed(f.PREFACE[:5]) == []
    assert p.feed(f.PREFACE[5:] + f.settings_frame({})) == [f.SettingsReceived((), False)]


def hdr(length, ftype, flags, sid):
    return struct.pack(">BHBBL", length >> 16, length & 0xFFFF, ftype, flags, sid)


HOSTILE = [
    ("bad preface", True, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ErrorCode.PROTOCOL_ERROR, "bad_preface"),
    ("oversized frame", False, hdr(1 << 20, f.DATA, 0, 1), ErrorCode.FRAME_SIZE_ERROR, "frame_too_large"),
    ("oversized control frame", False, hdr(20000, f.SETTINGS, 0, 0), ErrorCode.FRAME_SIZE_ERROR, "frame_too_large"),
    ("continuation without headers", False, f.frame(f.CONTINUATION, f.FLAG_END_HEADERS, 1, b"\x88"),
     ErrorCode.PROTOCOL_ERROR, "unexpected_continuation"),
    ("headers interrupted", False, f.frame(f.HEADERS, 0, 1, b"\x88") + f.ping_frame(b"12345678"),
     ErrorCode.PROTOCOL_ERROR, "expected_continuation"),
    ("data interrupts header block", False, f.frame(f.HEADERS, 0, 1, b"\x88") + f.data_frame_header(1, 0),
     ErrorCode.PROTOCOL_ERROR, "expected_continuation"),
    ("data on stream 0", False, f.data_frame_header(0, 0), ErrorCode.PROTOCOL_ERROR, "frame_on_stream_zero"),
    ("headers on stream 0", False, f.frame(f.HEADERS, f.FLAG_END_HEADERS, 0, b"\x88"),
     ErrorCode.PROTOCOL_ERROR, "frame_on_stream_zero"),
    ("settings on a stream", False, f.frame(f.SETTINGS, 0, 1, b""), ErrorCode.PROTOCOL_ERROR, "frame_on_stream"),
    ("settings bad length", False, f.frame(f.SETTINGS, 0, 0, b"\0" * 5), ErrorCode.FRAME_SIZE_ERROR, "bad_frame_size"),
    ("settings ack with payload", False, f.frame(f.SETTINGS, f.FLAG_ACK, 0, b"\0" * 6),
     ErrorCode.FRAME_SIZE_ERROR, "bad_frame_size"),
    ("ping bad length", False, f.frame(f.PING, 0, 0, b"1234"), ErrorCode.FRAME_SIZE_ERROR, "bad_frame_size"),
    ("window update bad length", False, f.frame(f.WINDOW_UPDATE, 0, 0, b"123"), ErrorCode.FRAME_SIZE_ERROR,
     "bad_frame_size"),
    ("rst bad length", False, f.frame(f.RST_STREAM, 0, 1, b"12345"), ErrorCode.FRAME_SIZE_ERROR, "bad_frame_size"),
    ("goaway too short", False, f.frame(f.GOAWAY, 0, 0, b"1234"), ErrorCode.FRAME_SIZE_ERROR, "bad_frame_size"),
    ("padding too long", False, f.frame(f.DATA, f.FLAG_PADDED, 1, bytes([9]) + b"abc"),
     ErrorCode.PROTOCOL_ERROR, "bad_padding"),
    ("push promise", False, f.frame(f.PUSH_PROMISE, f.FLAG_END_HEADERS, 1, b"\0\0\0\x02\x88"),
     ErrorCode.PROTOCOL_ERROR, "push_promise"),
    ("hpack garbage", False, f.frame(f.HEADERS, f.FLAG_END_HEADERS, 1, b"\xff\xff\xff\xff\xff"),
     ErrorCode.COMPRESSION_ERROR, "hpack_error"),
    ("header list too large", False,
     f.headers_frames(1, f.encode_connect_block("1.2.3.4:80", [("big", "x" * 70000)]), end_stream=False,
                      max_frame_size=16384),
     ErrorCode.ENHANCE_YOUR_CALM, "header_list_too_large"),
]


@pytest.mark.parametrize("name,preface,wire,code,reason", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input(name, preface, wire, code, reason):
    p = FrameParser(expect_preface=preface, max_header_list_size=65536)
    with pytest.raises(ProtocolError) as e:
        p.feed(wire)
    assert (e.value.error_code, e.value.reason) == (code, reason)


def test_header_block_bounded_before_decoding():
    p = FrameParser(expect_preface=False, max_header_list_size=1000)
    with pytest.raises(ProtocolError) as e:
        p.feed(f.frame(f.HEADERS, 0, 1, b"\0" * 1500) + f.frame(f.CONTINUATION, 0, 1, b"\0" * 1500))
    assert e.value.reason == "header_list_too_large"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_fuzz_parser_only_raises_protocol_error(chunks):
    p = FrameParser(expect_preface=False, max_frame_size=16384, max_header_list_size=4096)
    try:
        for c in chunks:
            p.feed(c)
    except ProtocolError:
        return
    assert p.buffered <= 16384 + 9



# A read that is one whole DATA frame takes feed's short path; the same frame followed by one
# more byte takes the general loop. Both must give the same event (or the same error) and
# leave the parser in the same state.
_LONE = [
    (f.frame(f.DATA, 0, 1, b"GET / HTTP/1.1\r\n\r\n"), 16384),
    (f.frame(f.DATA, f.FLAG_END_STREAM, 3, b"x" * 280), 16384),
    (struct.pack(">BHBBL", 0, 5, f.DATA, 0, 0x80000005) + b"hello", 16384),  # reserved bit: ignored
    (f.frame(f.DATA, f.FLAG_PADDED, 1, b"\x02ab\0\0"), 16384),               # padded: general path
    (f.frame(f.DATA, 0, 0, b"abc"), 16384),                                  # stream 0: error
    (f.frame(f.DATA, 0, 1, b"y" * 100), 64),                                 # over MAX_FRAME_SIZE: error
    (f.frame(f.DATA, 0x20, 7, b"z"), 16384),                                 # unknown flag bits
]


@pytest.mark.parametrize("frame, max_frame", _LONE)
def test_lone_data_frame_short_path_matches_general_loop(frame, max_frame):
    def run(data):
        p = parser(max_frame_size=max_frame)
        try:
            evs = p.feed(data)
        except ProtocolError as e:
            return ("error", e.reason), p
        return [(type(ev), ev.stream_id, bytes(ev.data), ev.end_stream, ev.flow_controlled_length)
                for ev in evs], p

    short, ps = run(frame)
    general, pg = run(frame + b"\0")
    assert short == general
    if not isinstance(short, tuple):
        assert (ps.frames_seen, ps._empty, ps.buffered, pg.buffered) == (pg.frames_seen, pg._empty, 0, 1)


def test_lone_data_frame_short_path_not_taken_inside_a_payload():
    """Bytes that look like a whole DATA frame but arrive while another frame's payload is
    being cut through are that payload."""
    inner = f.frame(f.DATA, f.FLAG_END_STREAM, 9, b"abcdef")
    p = parser()
    outer = f.frame(f.DATA, 0, 1, b"12" + inner)
    (first,) = p.feed(outer[:11])
    assert (first.stream_id, bytes(first.data), first.end_stream) == (1, b"12", False)
    (rest,) = p.feed(inner)
    assert (rest.stream_id, bytes(rest.data), rest.end_stream, rest.flow_controlled_length) == (1, inner, False, len(inner))


def test_lone_data_frame_short_path_not_taken_in_an_open_header_block():
    p = parser()
    p.feed(f.frame(f.HEADERS, 0, 1, b"\x82"))                               # no END_HEADERS
    with pytest.raises(ProtocolError) as e:
        p.feed(f.frame(f.DATA, 0, 1, b"abc"))
    assert e.value.reason == "expected_continuation"


def test_lone_data_frame_short_path_not_taken_before_the_preface():
    p = FrameParser(expect_preface=True)
    with pytest.raises(ProtocolError) as e:
        p.feed(f.frame(f.DATA, 0, 1, b"x" * 40))
    assert e.value.reason == "bad_preface"


def test_lone_data_frame_short_path_not_taken_after_a_held_partial_header():
    """The rest of a frame whose header was split across reads can itself look like a whole
    DATA frame (here: stream 1280's id and payload read as a 5-byte frame on stream 1)."""
    payload = b"\x00\x00\x00\x00\x01hello"
    frame = f.frame(f.DATA, 0, 1280, payload)
    p = parser()
    assert p.feed(frame[:5]) == []
    (ev,) = p.feed(frame[5:])
    assert (ev.stream_id, bytes(ev.data), ev.flow_controlled_length) == (1280, payload, len(payload))
