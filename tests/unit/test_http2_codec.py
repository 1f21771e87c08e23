"""The waypoint's HTTP/2 conversion and sans-IO connections, as tables of headers and events (real h2 peers)."""
from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest

from waypoint.http import Body, EndOfMessage, HttpError, RequestHead, ResponseHead
from waypoint.http2.connection import ClientConnection, ServerConnection, Settings, StreamReset, Writable
from waypoint.http2.convert import (grpc_status_of, is_grpc, request_from_h2, request_to_h2, response_from_h2,
                                    response_to_h2)
from waypoint.inbound import Sniffed, sniff

BASE = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"svc:80"), (b":path", b"/a/b?x=1")]


@pytest.mark.parametrize("extra,end,want", [
    ([], True, dict(content_length=None, chunked=False)),
    ([], False, dict(content_length=None, chunked=True)),
    ([(b"content-length", b"5")], False, dict(content_length=5, chunked=False)),
    ([(b"content-length", b"0")], True, dict(content_length=0, chunked=False)),
])
def test_request_framing(extra, end, want):
    h = request_from_h2(BASE + extra, end)
    assert (h.content_length, h.chunked) == (want["content_length"], want["chunked"])
    assert h.method == b"POST" and h.target == b"/a/b?x=1" and h.path == b"/a/b" and h.query == b"x=1"
    assert h.http_version == "2" and h.headers[0] == (b"host", b"svc:80")
    assert all(n != b"content-length" for n, _ in h.headers)


@pytest.mark.parametrize("headers,status,reason", [
    ([(b":scheme", b"http"), (b":path", b"/")], 400, "missing_method"),
    ([(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a")], 400, "missing_path"),
    ([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")], 400, "missing_authority"),
    ([(b":method", b"CONNECT"), (b":authority", b"a:1")], 501, "connect_not_supported"),
    (BASE + [(b"content-length", b"x")], 400, "bad_content_length"),
    (BASE + [(b"expect", b"magic")], 417, "unsupported_expectation"),
])
def test_request_refused(headers, status, reason):
    with pytest.raises(HttpError) as ei:
        request_from_h2(headers, False)
    assert (ei.value.status, ei.value.reason) == (status, reason)


def test_request_host_cookies_and_connection_specific_fields():
    h = request_from_h2([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"host", b"h:1"),
                         (b"cookie", b"a=1"), (b"te", b"trailers"), (b"cookie", b"b=2")], True)
    assert h.headers == ((b"host", b"h:1"), (b"cookie", b"a=1; b=2"))


@pytest.mark.parametrize("head,want", [
    (RequestHead(method=b"GET", target=b"/p?q", headers=((b"host", b"svc"), (b"x", b"1"))),
     [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"svc"), (b":path", b"/p?q"),
      (b"te", b"trailers"), (b"x", b"1")]),
    (RequestHead(method=b"POST", target=b"http://h:8/z", headers=(), content_length=3),
     [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"h:8"), (b":path", b"/z"),
      (b"content-length", b"3"), (b"te", b"trailers")]),
])
def test_request_to_h2(head, want):
    assert request_to_h2(head) == want


def test_response_conversions():
    r = response_from_h2([(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"5")], True)
    assert r.status == 200 and r.content_length == 0 and grpc_status_of(r.headers) == "5"
    r = response_from_h2([(b":status", b"404"), (b"content-length", b"7"), (b"connection", b"x")], False)
    assert r.content_length == 7 and r.headers == ()
    with pytest.raises(HttpError) as ei:
        response_from_h2([(b"x", b"1")], False)
    assert ei.value.status == 502
    assert response_to_h2(ResponseHead(status=200, headers=((b"keep-alive", b"1"), (b"a", b"b")), content_length=2),
                          bodyless=False) == [(b":status", b"200"), (b"content-length", b"2"), (b"a", b"b")]
    assert is_grpc([(b"content-type", b"application/grpc+proto")]) and not is_grpc([(b"content-type", b"text/x")])


@pytest.mark.parametrize("buf,want", [
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Sniffed.HTTP2), (b"PRI * HT", None), (b"PRI", None),
    (b"GET / HTTP/1.1\r\n", Sniffed.HTTP1), (b"\x16\x03\x01", Sniffed.TCP), (b"POS", None),
    (b"PRI * HTTP/1.1\r\n", Sniffed.HTTP1),        # not the preface: the HTTP/1.1 codec judges it
])
def test_sniff(buf, want):
    assert sniff(buf) is want


# -- the sans-IO connections against the h2 library as the peer ------------------------------

def _peer(client: bool) -> h2.connection.H2Connection:
    p = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client, header_encoding=None))
    p.initiate_connection()
    return p


def test_server_events_and_trailers_only_response():
    ours = ServerConnection(Settings(stream_window=1 << 16))
    ours.initiate()
    cli = _peer(True)
    cli.receive_data(ours.data_to_send())
    ours.receive_data(cli.data_to_send())
    cli.send_headers(1, BASE + [(b"content-type", b"application/grpc")])
    cli.send_data(1, b"hello")
    cli.send_headers(1, [(b"x-t", b"1")], end_stream=True)
    evs = ours.receive_data(cli.data_to_send())
    kinds = [(sid, type(e).__name__) for sid, e in evs]
    assert kinds == [(1, "RequestHead"), (1, "Body"), (1, "EndOfMessage")]
    assert evs[2][1].trailers == ((b"x-t", b"1"),)
    # a response with content-length 0 (trailers-only) leaves as ONE HEADERS with END_STREAM
    ours.send_head(1, ResponseHead(status=200, headers=((b"grpc-status", b"7"),), content_length=0))
    assert not any(isinstance(e, h2.events.ResponseReceived) for e in cli.receive_data(ours.data_to_send()))
    ours.send_end(1)
    got = cli.receive_data(ours.data_to_send())
    rr = [e for e in got if isinstance(e, h2.events.ResponseReceived)]
    assert len(rr) == 1 and rr[0].stream_ended is not None
    assert (b"grpc-status", b"7") in rr[0].headers


def test_server_send_is_flow_controlled_and_writable_when_window_reopens():
    ours = ServerConnection()
    ours.initiate()
    cli = _peer(True)
    cli.receive_data(ours.data_to_send())
    ours.receive_data(cli.data_to_send())
    cli.send_headers(1, BASE[:2] + [(b":authority", b"a"), (b":path", b"/")], end_stream=True)
    ours.receive_data(cli.data_to_send())
    ours.send_head(1, ResponseHead(status=200))
    ours.send_body(1, b"z" * 100_000)
    assert ours.pending(1) == 100_000 - 65_535      # the peer's default window
    ours.send_end(1, ((b"grpc-status", b"0"),))
    evs = cli.receive_data(ours.data_to_send())
    n = sum(len(e.data) for e in evs if isinstance(e, h2.events.DataReceived))
    assert n == 65_535
    cli.acknowledge_received_data(n, 1)
    evs = ours.receive_data(cli.data_to_send())
    assert (1, Writable()) in evs and ours.pending(1) == 0
    evs = cli.receive_data(ours.data_to_send())
    assert any(isinstance(e, h2.events.TrailersReceived) for e in evs)
    assert any(isinstance(e, h2.events.StreamEnded) for e in evs)


def test_server_credit_returns_only_on_ack_and_reset_is_reported():
    ours = ServerConnection(Settings(stream_window=1000, connection_window=1 << 20))
    ours.initiate()
    cli = _peer(True)
    cli.receive_data(ours.data_to_send())
    ours.receive_data(cli.data_to_send())
    cli.receive_data(ours.data_to_send())
    cli.send_headers(1, BASE)
    cli.send_data(1, b"a" * 1000)
    ours.receive_data(cli.data_to_send())
    assert cli.local_flow_control_window(1) == 0           # nothing credited before the consumer took it
    ours.ack(1, 1000)
    cli.receive_data(ours.data_to_send())
    assert cli.local_flow_control_window(1) == 1000
    cli.reset_stream(1, error_code=8)
    evs = ours.receive_data(cli.data_to_send())
    assert evs == [(1, StreamReset(code=8, remote=True))]


def test_server_refuses_a_bad_request_with_its_status():
    ours = ServerConnection()
    ours.initiate()
    cli = _peer(True)
    ours.receive_data(cli.data_to_send())
    cli.send_headers(1, [(b":method", b"CONNECT"), (b":authority", b"x:1")], end_stream=True)
    evs = ours.receive_data(cli.data_to_send())
    assert len(evs) == 1 and isinstance(evs[0][1], HttpError) and evs[0][1].status == 501
    got = cli.receive_data(ours.data_to_send())
    rr = [e for e in got if isinstance(e, h2.events.ResponseReceived)]
    assert dict(rr[0].headers)[b":status"] == b"501"


def test_client_response_events():
    ours = ClientConnection()
    ours.initiate()
    srv = _peer(False)
    srv.receive_data(ours.data_to_send())
    ours.receive_data(srv.data_to_send())
    sid = ours.new_stream_id()
    ours.send_request(sid, request_to_h2(RequestHead(method=b"GET", target=b"/", headers=((b"host", b"s"),))), True)
    evs = srv.receive_data(ours.data_to_send())
    req = next(e for e in evs if isinstance(e, h2.events.RequestReceived))
    assert (b"te", b"trailers") in req.headers and (b":authority", b"s") in req.headers
    srv.send_headers(sid, [(b":status", b"200")])
    srv.send_data(sid, b"ok")
    srv.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
    evs = ours.receive_data(srv.data_to_send())
    assert [type(e) for _, e in evs] == [ResponseHead, Body, EndOfMessage]
    assert evs[2][1].trailers == ((b"grpc-status", b"0"),)
