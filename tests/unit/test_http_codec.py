"""waypoint.http codec: pure bytes <-> events, proxy re-framing, smuggling defences, limits, fuzz."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waypoint.http import (Body, ClientConnection, ConnectionClosed, EndOfMessage, HttpError, InformationalResponse,
                           Limits, LocalProtocolError, RequestHead, ResponseHead, ServerConnection)


def split(events):
    """(heads, body bytes, trailers) of a list of events for one message."""
    heads = [e for e in events if isinstance(e, (RequestHead, ResponseHead))]
    body = b"".join(bytes(e.data) for e in events if isinstance(e, Body))
    eoms = [e for e in events if isinstance(e, EndOfMessage)]
    return heads, body, eoms


def proxy_request(raw: bytes, limits: Limits | None = None) -> tuple[list, bytes]:
    """Downstream bytes -> events -> upstream bytes (what the waypoint would forward)."""
    server, client = ServerConnection(limits), ClientConnection()
    events = server.receive_data(raw)
    return events, b"".join(client.send(e) for e in events)


def proxy_response(method: bytes, raw: bytes, version: str = "1.1", eof: bool = False):
    """Upstream response bytes -> events -> downstream bytes for a request `method`."""
    server, client = ServerConnection(), ClientConnection()
    host = b"Host: a\r\n" if version == "1.1" else b""
    req = server.receive_data(b"%s / HTTP/%s\r\n%s\r\n" % (method, version.encode(), host))
    client.send(req[0]), client.send(req[-1])
    events = client.receive_data(raw) + (client.receive_data(b"") if eof else [])
    out = b"".join(server.send(e) for e in events
                   if not isinstance(e, ConnectionClosed))
    return events, out, server, client


# -- the prototype's correctness cases, as bytes ------------------------------------------

def test_chunked_response_is_rechunked_for_http11_and_close_delimited_for_http10():
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7\r\n world!\r\n0\r\n\r\n"
    ev, out, server, client = proxy_response(b"GET", raw)
    assert out == b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n7\r\n world!\r\n0\r\n\r\n"
    assert client.reusable and not server.should_close
    ev, out, server, _ = proxy_response(b"GET", raw, version="1.0")
    assert out == b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nhello world!" and server.should_close


def test_chunked_request_body_stays_chunked_upstream():
    ev, up = proxy_request(b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\n\r\n")
    assert up == b"POST /echo HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
    assert split(ev)[1] == b"abcdefg"


def test_100kb_content_length_body_streams_in_pieces():
    body = b"x" * 100_000
    raw = b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + body
    server, client = ServerConnection(), ClientConnection()
    events = []
    for i in range(0, len(raw), 8192):
        events += server.receive_data(raw[i:i + 8192])
    up = b"".join(client.send(e) for e in events)
    assert up == b"POST /echo HTTP/1.1\r\nhost: a\r\ncontent-length: 100000\r\n\r\n" + body
    assert sum(isinstance(e, Body) for e in events) > 1 and events[0].content_length == 100_000


def test_head_response_has_no_body_but_keeps_content_length():
    ev, out, server, client = proxy_response(b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    assert [type(e) for e in ev] == [ResponseHead, EndOfMessage]
    assert out == b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" and client.reusable


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_are_bodyless(status):
    ev, out, _, client = proxy_response(b"GET", b"HTTP/1.1 %d X\r\n\r\n" % status)
    assert [type(e) for e in ev] == [ResponseHead, EndOfMessage] and client.reusable
    assert out == b"HTTP/1.1 %d X\r\n\r\n" % status


def test_close_delimited_upstream_body_ends_at_eof_and_is_rechunked():
    ev, out, _, client = proxy_response(b"GET", b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nclose-delimited body",
                                        eof=True)
    assert split(ev)[1] == b"close-delimited body" and not client.reusable
    assert out == b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n14\r\nclose-delimited body\r\n0\r\n\r\n"


def test_1xx_is_an_informational_event_then_the_final_response():
    ev, out, _, _ = proxy_response(b"GET", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert [type(e) for e in ev] == [InformationalResponse, ResponseHead, Body, EndOfMessage]
    assert out == b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    _, out10, _, _ = proxy_response(b"GET", b"HTTP/1.1 103 Early\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                                    version="1.0")
    assert out10 == b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def test_hop_by_hop_and_connection_listed_fields_are_stripped_both_ways():
    ev, up = proxy_request(b"GET /hdrs HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n"
                           b"TE: trailers\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: b\r\nUpgrade: h2c\r\n"
                           b"Trailer: x\r\nX-Keep: 2\r\n\r\n")
    assert ev[0].headers == ((b"host", b"a"), (b"x-keep", b"2"))
    assert up == b"GET /hdrs HTTP/1.1\r\nhost: a\r\nx-keep: 2\r\n\r\n"
    _, out, _, _ = proxy_response(b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nKeep-Alive: timeout=5\r\n"
                                          b"Connection: x-a\r\nX-A: 1\r\nProxy-Authenticate: y\r\n\r\n")
    assert out == b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


def test_pipelined_requests_come_out_in_order_and_http10_closes():
    server = ServerConnection()
    ev = server.receive_data(b"GET /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nA"
                             b"GET /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nB"
                             b"GET /echo HTTP/1.0\r\nHost: a\r\nContent-Length: 1\r\n\r\nC"
                             b"GET /never HTTP/1.1\r\nHost: a\r\n\r\n")
    assert [bytes(e.data) for e in ev if isinstance(e, Body)] == [b"A", b"B", b"C"]
    assert [e.http_version for e in ev if isinstance(e, RequestHead)] == ["1.1", "1.1", "1.0"]
    out = b""
    for body in (b"A", b"B", b"C"):
        out += server.send(ResponseHead(status=200, content_length=1)) + server.send(Body(body))
        out += server.send(EndOfMessage())
    assert out.count(b"200 OK") == 3 and out.endswith(b"connection: close\r\n\r\nC") and server.should_close
    with pytest.raises(LocalProtocolError):
        server.send(ResponseHead(status=200))


def test_http10_keep_alive_is_honoured_with_known_length():
    server = ServerConnection()
    ev = server.receive_data(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert ev[0].keep_alive
    assert server.send(ResponseHead(status=200, content_length=0)) == (
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: keep-alive\r\n\r\n")


def test_expect_continue_is_consumed_and_an_early_final_response_closes():
    server = ServerConnection()
    ev = server.receive_data(b"PUT /u HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert ev[0].expect_continue and ev[0].headers == ((b"host", b"a"),)
    assert server.send(InformationalResponse(status=100)) == b"HTTP/1.1 100 Continue\r\n\r\n"
    ev = server.receive_data(b"abc")
    assert split(ev)[1] == b"abc"
    assert b"connection: close" not in server.send(ResponseHead(status=201, content_length=0))
    rejecting = ServerConnection()
    rejecting.receive_data(b"PUT /u HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert b"connection: close" in rejecting.send(ResponseHead(status=403, content_length=0))
    rejecting.send(EndOfMessage())
    assert rejecting.should_close


def test_upgrade_is_ignored_and_the_next_request_parses():
    ev = ServerConnection().receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
                                         b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert [e.target for e in ev if isinstance(e, RequestHead)] == [b"/", b"/2"]
    assert ev[0].headers == ((b"host", b"a"),)


def test_trailers_pass_to_chunked_peers_minus_forbidden_fields():
    ev, up = proxy_request(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"1\r\nz\r\n0\r\nX-Sum: 9\r\nAuthorization: x\r\n\r\n")
    assert ev[-1].trailers == ((b"x-sum", b"9"),)
    assert up.endswith(b"1\r\nz\r\n0\r\nx-sum: 9\r\n\r\n")


@pytest.mark.parametrize("target,path,query", [
    (b"/a/b?x=1&y", b"/a/b", b"x=1&y"), (b"/", b"/", b""), (b"http://h:8/p?q", b"/p", b"q"),
])
def test_target_forms(target, path, query):
    head = ServerConnection().receive_data(b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % target)[0]
    assert (head.target, head.path, head.query) == (target, path, query)


# -- hostile input: exact status and reason ---------------------------------------------

H = b"Host: a\r\n"
HOSTILE = [
    ("cl_and_te", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     400, "content_length_with_transfer_encoding"),
    ("te_and_cl", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
     400, "content_length_with_transfer_encoding"),
    ("differing_cl", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
     400, "duplicate_content_length"),
    ("cl_list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 4\r\n\r\nabcd", 400, "bad_content_length"),
    ("negative_cl", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400, "bad_content_length"),
    ("huge_cl", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999999\r\n\r\n",
     400, "bad_content_length"),
    ("bad_chunk_size", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n", 400, "bad_chunk"),
    ("chunk_overflow", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\n",
     400, "bad_chunk"),
    ("te_gzip_chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
     501, "unsupported_transfer_coding"),
    ("te_gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\nabc", 501,
     "unsupported_transfer_coding"),
    ("te_http10", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "transfer_encoding_in_http10"),
    ("obs_fold", b"GET / HTTP/1.1\r\n" + H + b"X: a\r\n b\r\n\r\n", 400, "obs_fold"),
    ("space_before_colon", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400, "bad_header"),
    ("nul_in_value", b"GET / HTTP/1.1\r\n" + H + b"X: a\x00b\r\n\r\n", 400, "bad_header"),
    ("bad_method", b"G@T / HTTP/1.1\r\n" + H + b"\r\n", 400, "bad_method"),
    ("bad_version", b"GET / HTTP/1.2\r\n" + H + b"\r\n", 400, "bad_version"),
    ("http2_version", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 400, "bad_version"),
    ("bare_lf", b"GET / HTTP/1.1\nHost: a\n\n", 400, "bad_request_line"),
    ("space_in_target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400, "bad_request_line"),
    ("relative_target", b"GET a/b HTTP/1.1\r\n" + H + b"\r\n", 400, "bad_target"),
    ("missing_host", b"GET / HTTP/1.1\r\n\r\n", 400, "missing_host"),
    ("duplicate_host", b"GET / HTTP/1.1\r\n" + H + H + b"\r\n", 400, "duplicate_host"),
    ("connect", b"CONNECT a:443 HTTP/1.1\r\n" + H + b"\r\n", 501, "connect_unsupported"),
    ("expect_other", b"GET / HTTP/1.1\r\n" + H + b"Expect: teapot\r\n\r\n", 417, "unsupported_expectation"),
    ("too_many_headers", b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(100)) + b"\r\n",
     431, "too_many_headers"),
    ("head_too_large", b"GET / HTTP/1.1\r\n" + H + b"X: " + b"v" * 70_000 + b"\r\n\r\n", 431, "head_too_large"),
    ("target_too_large", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n" + H + b"\r\n", 431, "head_too_large"),
    ("upgrade_with_body", b"POST / HTTP/1.1\r\n" + H + b"Upgrade: x\r\nConnection: upgrade\r\nContent-Length: 1\r\n\r\nA",
     501, "upgrade_with_body"),
]


@pytest.mark.parametrize("name,raw,status,reason", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_requests_are_rejected_with_a_stable_reason(name, raw, status, reason):
    server = ServerConnection()
    with pytest.raises(HttpError) as e:
        server.receive_data(raw)
    assert (e.value.status, e.value.reason) == (status, reason)
    with pytest.raises(HttpError):          # the connection stays failed
        server.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")


def test_body_limit_declared_and_streamed():
    lim = Limits(max_body_size=10)
    with pytest.raises(HttpError) as e:
        ServerConnection(lim).receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n")
    assert (e.value.status, e.value.reason) == (413, "body_too_large")
    s = ServerConnection(lim)
    s.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n")
    with pytest.raises(HttpError) as e:
        s.receive_data(b"8\r\n12345678\r\n")
    assert (e.value.status, e.value.reason) == (413, "body_too_large")


def test_configurable_header_limits_and_slow_header_line_is_bounded():
    with pytest.raises(HttpError) as e:
        ServerConnection(Limits(max_headers=2)).receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\n\r\n")
    assert (e.value.status, e.value.reason) == (431, "too_many_headers")
    s = ServerConnection(Limits(max_head_size=1024))
    s.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nX: ")
    with pytest.raises(HttpError) as e:
        for _ in range(10):
            s.receive_data(b"v" * 200)     # one header line never completes
    assert (e.value.status, e.value.reason) == (431, "head_too_large")


def test_truncated_request_and_clean_close():
    s = ServerConnection()
    assert s.receive_data(b"") == [ConnectionClosed()]
    s = ServerConnection()
    s.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab")
    with pytest.raises(HttpError) as e:
        s.receive_data(b"")
    assert e.value.reason == "truncated_request"


UPSTREAM_BAD = [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n", "content_length_with_transfer_encoding"),
    (b"HTTP/1.1 abc OK\r\n\r\n", "bad_status"),
    (b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n", "unexpected_upgrade"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad_chunk"),
]


@pytest.mark.parametrize("raw,reason", UPSTREAM_BAD)
def test_bad_upstream_responses_are_502(raw, reason):
    client = ClientConnection()
    client.send(RequestHead(method=b"GET", target=b"/", headers=((b"host", b"a"),)))
    client.send(EndOfMessage())
    with pytest.raises(HttpError) as e:
        client.receive_data(raw)
    assert (e.value.status, e.value.reason) == (502, reason) and not client.reusable


def test_upstream_eof_before_or_during_response_and_unsolicited_bytes():
    for raw, reason in [(b"", "upstream_closed"), (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", "upstream_truncated")]:
        client = ClientConnection()
        client.send(RequestHead(method=b"GET", target=b"/", headers=((b"host", b"a"),)))
        client.send(EndOfMessage())
        if raw:
            client.receive_data(raw)
        with pytest.raises(HttpError) as e:
            client.receive_data(b"")
        assert e.value.reason == reason
    with pytest.raises(HttpError) as e:
        ClientConnection().receive_data(b"HTTP/1.1 200 OK\r\n\r\n")
    assert e.value.reason == "unsolicited_response"


# -- local misuse -----------------------------------------------------------------------

def test_local_misuse_is_a_local_protocol_error():
    c = ClientConnection()
    with pytest.raises(LocalProtocolError, match="bad_event_order"):
        c.send(Body(b"x"))
    c.send(RequestHead(method=b"POST", target=b"/", headers=((b"host", b"a"),), content_length=2))
    with pytest.raises(LocalProtocolError, match="body_exceeds_content_length"):
        c.send(Body(b"xyz"))
    with pytest.raises(LocalProtocolError, match="header_injection"):
        ClientConnection().send(RequestHead(method=b"GET", target=b"/", headers=((b"x", b"a\r\nevil: 1"),)))
    c = ClientConnection()
    c.send(RequestHead(method=b"GET", target=b"/", headers=((b"host", b"a"),)))
    c.send(EndOfMessage())
    with pytest.raises(LocalProtocolError, match="bad_event_order"):   # no upstream pipelining
        c.send(RequestHead(method=b"GET", target=b"/", headers=((b"host", b"a"),)))


# -- round trips ------------------------------------------------------------------------

ROUND_TRIP = [
    b"GET /a?b=c HTTP/1.1\r\nHost: h\r\nAccept: */*\r\nX-Multi: 1\r\nX-Multi: 2\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
    b"PUT /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n3\r\nyou\r\n0\r\nX-T: 1\r\n\r\n",
    b"DELETE /x HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
]


def _request_view(events):
    heads, body, eoms = split(events)
    return heads[0].method, heads[0].target, heads[0].headers, heads[0].content_length, heads[0].chunked, body, eoms


@pytest.mark.parametrize("raw", ROUND_TRIP)
def test_request_round_trip(raw):
    first, up = proxy_request(raw)
    second, up2 = proxy_request(up)
    assert _request_view(first) == _request_view(second) and up == up2


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nnope\r\n0\r\n\r\n",
    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nSet-Cookie: a=b\r\n\r\n",
])
def test_response_round_trip(raw):
    first, out, _, _ = proxy_response(b"GET", raw)
    second, out2, _, _ = proxy_response(b"GET", out)
    assert split(first)[0][0].headers == split(second)[0][0].headers and split(first)[1] == split(second)[1]
    assert out == out2


# -- fuzz -------------------------------------------------------------------------------

_PIECES = [b"GET ", b"POST ", b"/", b"?q", b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", b"Host: a\r\n", b"\r\n",
           b"Content-Length: 3\r\n", b"Content-Length: 1\r\n", b"Transfer-Encoding: chunked\r\n",
           b"Connection: close\r\n", b"Connection: upgrade\r\nUpgrade: x\r\n", b"Expect: 100-continue\r\n",
           b"3\r\nabc\r\n", b"0\r\n\r\n", b"abc", b" ", b"\t", b"\n", b"\x00", b"zz\r\n", b"X: y\r\n"]

fuzz_bytes = st.one_of(st.binary(max_size=300),
                       st.lists(st.sampled_from(_PIECES), max_size=25).map(b"".join))


@settings(max_examples=400, deadline=None)
@given(data=fuzz_bytes, cut=st.integers(min_value=1, max_value=64))
def test_fuzz_server_only_raises_http_error(data, cut):
    server = ServerConnection(Limits(max_head_size=512, max_headers=10, max_body_size=100))
    try:
        for i in range(0, len(data), cut):
            server.receive_data(data[i:i + cut])
        server.receive_data(b"")
    except HttpError as e:
        assert e.status in (400, 413, 417, 431, 501) and e.reason


_RPIECES = [b"HTTP/1.1 200 OK\r\n", b"HTTP/1.0 204 No\r\n", b"HTTP/1.1 100 C\r\n", b"Content-Length: 3\r\n",
            b"Transfer-Encoding: chunked\r\n", b"\r\n", b"3\r\nabc\r\n", b"0\r\n\r\n", b"abc", b"\n", b" "]


@settings(max_examples=400, deadline=None)
@given(data=st.one_of(st.binary(max_size=300), st.lists(st.sampled_from(_RPIECES), max_size=20).map(b"".join)),
       method=st.sampled_from([b"GET", b"HEAD"]), cut=st.integers(min_value=1, max_value=64))
def test_fuzz_client_only_raises_http_error(data, method, cut):
    client = ClientConnection(Limits(max_head_size=512, max_headers=10))
    client.send(RequestHead(method=method, target=b"/", headers=((b"host", b"a"),)))
    client.send(EndOfMessage())
    try:
        for i in range(0, len(data), cut):
            client.receive_data(data[i:i + cut])
        client.receive_data(b"")
    except HttpError as e:
        assert e.status in (431, 502) and e.reason
