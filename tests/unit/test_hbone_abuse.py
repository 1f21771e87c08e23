"""HTTP/2 abuse bounds of the sans-IO connection: frames in -> GOAWAY ENHANCE_YOUR_CALM out at the bound, not before;
legitimate patterns never trip them."""
from __future__ import annotations

import dataclasses

import pytest

from mesh.hbone import frames as f
from mesh.hbone.abuse import AbuseLimits, TokenBucket
from mesh.hbone.connection import (ConnectionConfig, H2Connection, RequestReceived, RequestRejected, Role,
                                   StreamReset)
from mesh.hbone.frames import ErrorCode, ProtocolError
from tests import h2_attack as atk
from tests.h2_attack import FrameReader


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def server(clock: Clock, **limits) -> H2Connection:
    conn = H2Connection(Role.SERVER, ConnectionConfig(abuse=AbuseLimits(**limits)), clock=clock)
    conn.initiate()
    conn.receive_data(atk.preface())
    conn.data_to_send()
    return conn


def feed_until_goaway(conn: H2Connection, frames, clock: Clock | None = None, step: float = 0.0,
                      written: bool = False) -> tuple[int | None, list]:
    """Feed frames one by one; the 1-based index of the one that closed the connection (None if
    none did) and every event returned before."""
    events: list = []
    for i, data in enumerate(frames, 1):
        if clock is not None:
            clock.now += step
        try:
            events += conn.receive_data(data)
        except ProtocolError:
            return i, events
        if written:
            conn.data_to_send()
            conn.control_frames_written()
    return None, events


def goaway_of(conn: H2Connection) -> tuple[int, int, bytes]:
    r = FrameReader()
    r.feed(conn.data_to_send())
    g = r.goaway()
    assert g is not None, "no GOAWAY queued"
    return g


# -- the bounds ------------------------------------------------------------------------------

def _pings(n):
    return [atk.ping(i) for i in range(n)]


def _settings(n):
    return [atk.settings() for _ in range(n)]


def _open_then_empty(n):
    return [atk.connect(1)] + [atk.empty_data(1) for _ in range(n)]


@pytest.mark.parametrize("limits, frames, bound, reason", [
    ({}, atk.rapid_reset(1, 20_000), 100, "rapid_reset"),
    ({"max_premature_resets": 10}, atk.rapid_reset(1, 1000), 10, "rapid_reset"),
    ({}, _pings(200_000), 501, "ping_flood"),
    ({"ping_burst": 20}, _pings(1000), 21, "ping_flood"),
    ({"ping_burst": 10_000, "max_pending_control_frames": 50}, _pings(1000), 50, "control_frame_flood"),
    # The handshake's SETTINGS took one token already.
    ({}, _settings(10_000), 100, "settings_flood"),
    ({"settings_burst": 5}, _settings(100), 5, "settings_flood"),
    # frame 1 opens the stream; 100 empty ones pass, the 101st closes.
    ({}, _open_then_empty(1000), 102, "empty_frame_flood"),
    ({"max_consecutive_empty_frames": 3}, _open_then_empty(10), 5, "empty_frame_flood"),
    # Nothing sent yet: 1 + 2 * 0 WINDOW_UPDATEs allowed.
    ({}, [atk.window_update() for _ in range(100)], 2, "window_update_flood"),
])
def test_flood_closes_with_enhance_your_calm_exactly_at_the_bound(limits, frames, bound, reason):
    clock = Clock()
    conn = server(clock, **limits)
    closed_at, _ = feed_until_goaway(conn, frames)
    assert closed_at == bound
    last, code, debug = goaway_of(conn)
    assert (code, debug) == (ErrorCode.ENHANCE_YOUR_CALM, reason.encode())
    assert conn.closed and conn.receive_data(frames[0]) == []


def test_rapid_reset_events_before_the_bound_are_requests_and_peer_resets():
    clock = Clock()
    conn = server(clock, max_premature_resets=5)
    closed_at, events = feed_until_goaway(conn, atk.rapid_reset(1, 100))
    assert closed_at == 5
    assert [type(e) for e in events] == [RequestReceived, StreamReset] * 4
    assert conn.abuse.premature_resets == 5 and conn.abuse.streams_accepted == 5


def test_premature_resets_below_the_rate_and_a_minority_never_trip():
    # A long-lived pooled connection: 1 stream in 4 reset before its answer, 2.5 per second.
    clock = Clock()
    conn = server(clock)
    for i in range(4000):
        clock.now += 0.1
        sid = 2 * i + 1
        conn.receive_data(atk.connect(sid))
        if i % 4 == 0:
            conn.receive_data(atk.rst(sid))
        else:
            conn.send_response(sid, 200)
            conn.receive_data(atk.rst(sid))         # reset after the answer: not premature
        conn.data_to_send()
        conn.control_frames_written()
    assert not conn.closed and conn.abuse.premature_resets == 1000 and conn.abuse.streams_accepted == 4000


def test_a_slow_rapid_reset_trips_on_the_majority_rule():
    clock = Clock()
    conn = server(clock)                            # 100 resets, 20/s
    closed_at, _ = feed_until_goaway(conn, atk.rapid_reset(1, 1000), clock, step=0.2, written=True)  # 5/s
    assert closed_at == 100
    assert goaway_of(conn)[1:] == (ErrorCode.ENHANCE_YOUR_CALM, b"rapid_reset")


def test_premature_resets_faster_than_the_rate_trip_the_bucket_even_as_a_minority():
    clock = Clock()
    conn = server(clock, max_premature_resets=10, premature_reset_rate=1.0)
    frames = []
    for i in range(200):                            # 1 in 3 premature; all in the same instant
        sid = 2 * i + 1
        frames.append(atk.connect(sid) + atk.rst(sid) if i % 3 == 0 else atk.connect(sid, end_stream=True))
    closed_at, _ = feed_until_goaway(conn, frames, written=True)
    assert closed_at == 3 * 10 + 1                 # the 11th premature reset
    assert goaway_of(conn)[1:] == (ErrorCode.ENHANCE_YOUR_CALM, b"rapid_reset")


def test_many_streams_opened_answered_and_closed_never_trip():
    clock = Clock()
    conn = server(clock)
    for i in range(5000):
        sid = 2 * i + 1
        (req,) = conn.receive_data(atk.connect(sid))
        assert isinstance(req, RequestReceived)
        conn.send_response(sid, 200)
        conn.send_data(sid, b"x" * 100)
        conn.end_stream(sid)
        conn.receive_data(f.data_frame_header(sid, 3) + b"abc" + f.data_frame_header(sid, 0, end_stream=True)
                          + atk.window_update(sid, 100))
        if i % 10 == 0:
            conn.receive_data(atk.ping(i) + atk.window_update(0, 1000))
        conn.data_to_send()
        conn.control_frames_written()
        clock.now += 0.01
    assert not conn.closed and conn.open_streams == 0 and conn.abuse.premature_resets == 0


def test_new_stream_rate_refuses_then_closes_on_a_sustained_excess():
    clock = Clock()
    conn = server(clock, new_stream_rate=10, new_stream_burst=20)
    frames = [atk.connect(s, end_stream=True) for s in range(1, 200, 2)]
    closed_at, events = feed_until_goaway(conn, frames, written=True)
    accepted = [e for e in events if isinstance(e, RequestReceived)]
    refused = [e for e in events if isinstance(e, RequestRejected)]
    assert len(accepted) == 20
    assert len(refused) == 19 and {e.reason for e in refused} == {"stream_rate_limited"} and refused[0].status == 0
    assert closed_at == 40
    assert goaway_of(conn)[1:] == (ErrorCode.ENHANCE_YOUR_CALM, b"stream_rate_exceeded")


def test_refused_streams_get_refused_stream_and_the_rate_refills():
    clock = Clock()
    conn = server(clock, new_stream_rate=10, new_stream_burst=5)
    for s in range(1, 13, 2):
        conn.receive_data(atk.connect(s, end_stream=True))
    r = FrameReader()
    r.feed(conn.data_to_send())
    resets = [(sid, p) for t, _, sid, p in r.frames if t == f.RST_STREAM]
    assert resets == [(11, (ErrorCode.REFUSED_STREAM).to_bytes(4, "big"))]
    clock.now += 0.25                               # 2.5 tokens back, one still owed: 1 stream
    evs = conn.receive_data(atk.connect(13, end_stream=True) + atk.connect(15, end_stream=True))
    assert [type(e) for e in evs] == [RequestReceived, RequestRejected]


def test_stream_rate_at_the_limit_is_never_refused():
    clock = Clock()
    conn = server(clock, new_stream_rate=100, new_stream_burst=10)
    # 900 streams (fewer than MAX_CONCURRENT_STREAMS: they stay half-open), one per 10 ms.
    closed_at, events = feed_until_goaway(conn, [atk.connect(s, end_stream=True) for s in range(1, 1800, 2)],
                                          clock, step=0.01, written=True)
    assert closed_at is None and not any(isinstance(e, RequestRejected) for e in events)


def test_pings_and_settings_at_a_modest_rate_never_trip():
    clock = Clock()
    conn = server(clock)
    mixed = [atk.ping(i) if i % 10 else atk.settings() for i in range(20_000)]
    closed_at, _ = feed_until_goaway(conn, mixed, clock, step=0.025, written=True)   # 36 PINGs/s, 4 SETTINGS/s
    assert closed_at is None


def test_control_frames_owed_reset_only_when_written():
    clock = Clock()
    conn = server(clock, ping_burst=10_000, max_pending_control_frames=30)
    assert feed_until_goaway(conn, _pings(300), written=True)[0] is None
    conn.control_frames_written()
    for i in range(29):                             # taken by the I/O layer but not written yet
        conn.receive_data(atk.ping(i))
        conn.data_to_send()
    with pytest.raises(ProtocolError) as e:
        conn.receive_data(atk.ping(30) + atk.ping(31))
    assert e.value.reason == "control_frame_flood"


def test_empty_frames_interleaved_with_payload_never_trip():
    clock = Clock()
    conn = server(clock, max_consecutive_empty_frames=2)
    frames = [atk.connect(1)]
    for _ in range(500):
        frames += [atk.empty_data(1), atk.empty_data(1), f.data_frame_header(1, 1) + b"x"]
    closed_at, _ = feed_until_goaway(conn, frames)
    assert closed_at is None


def test_window_updates_in_proportion_to_what_we_send_never_trip():
    clock = Clock()
    conn = server(clock)
    conn.receive_data(atk.connect(1))
    conn.send_response(1, 200)
    for _ in range(1000):
        conn.send_data(1, b"y" * 1000)
        conn.receive_data(atk.window_update(0, 1000) + atk.window_update(1, 1000))
    assert not conn.closed


def test_a_client_connection_is_bounded_against_a_flooding_server():
    clock = Clock()
    conn = H2Connection(Role.CLIENT, ConnectionConfig(abuse=AbuseLimits(ping_burst=3)), clock=clock)
    conn.initiate()
    conn.receive_data(f.settings_frame({}))
    closed_at, _ = feed_until_goaway(conn, _pings(10))
    assert closed_at == 4


def test_repeated_initial_window_size_in_one_settings_is_applied_once():
    clock = Clock()
    conn = server(clock)
    conn.receive_data(atk.connect(1))
    body = b"".join(f._SETTING.pack(f.Setting.INITIAL_WINDOW_SIZE, v) for v in [1, 2**31 - 1] * 5000 + [70_000])
    conn.receive_data(f.frame(f.SETTINGS, 0, 0, body))
    assert conn.send_windows(1)[1] == 70_000


@pytest.mark.parametrize("field", [fl.name for fl in dataclasses.fields(AbuseLimits)])
def test_limits_refuse_zero(field):
    with pytest.raises(ValueError, match=field):
        AbuseLimits(**{field: 0})


def test_token_bucket_refills_to_its_burst_and_goes_negative():
    b = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(5)] == [2.0, 1.0, 0.0, -1.0, -2.0]
    assert b.take(1.0) == -1.0                      # +2, -1
    assert b.take(100.0) == 2.0                     # capped at the burst
