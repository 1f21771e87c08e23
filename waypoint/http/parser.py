"""llhttp (httptools) callbacks turned into codec events, with a proxy's validation and limits.

httptools drives callbacks while `feed_data` runs; each parser below appends events to a list
that `feed` returns. Validation that llhttp already does (CL+TE together, duplicate or invalid
Content-Length, bad chunk sizes, obs-fold, bad tokens) is mapped from its error text to a
stable reason; validation it does not do (HTTP version, Host, Expect, request-target form,
transfer codings other than chunked, sizes) happens in `on_headers_complete`. Exceptions
raised in a callback stop llhttp and come back wrapped in HttpParserCallbackError: an
HttpError is unwrapped, `_Stop` means "halt on purpose" (HEAD response, connection closing).

Memory bound: fields are counted as they arrive (never more than `max_headers` held) and
their sizes summed once per head, or after any read that left a head incomplete (so one
transport read of slack); httptools buffers a header line until it is complete, so a *stall*
counter adds up the bytes of consecutive feeds that completed nothing; past `max_head_size`
that is a 431 (one transport read of slack)."""
from __future__ import annotations

import httptools

from .errors import HttpError
from .events import Body, ConnectionClosed, EndOfMessage, InformationalResponse, RequestHead, ResponseHead
from .framing import Limits, filter_trailers, split_fields

__all__ = ["RequestParser", "ResponseParser"]


_END = EndOfMessage()
"""The end of a message without trailers (events are immutable: one is shared)."""


class _Stop(Exception):
    """Raised inside a callback to halt llhttp deliberately."""


# llhttp error text -> stable reason (first match wins); anything else is "malformed".
_LLHTTP_REASONS = (
    ("can't be present with", "content_length_with_transfer_encoding"),
    ("Duplicate Content-Length", "duplicate_content_length"),
    ("Content-Length", "bad_content_length"),
    ("Transfer-Encoding", "bad_transfer_encoding"),
    ("chunk", "bad_chunk"),
    ("Chunk", "bad_chunk"),
    ("whitespace after header value", "obs_fold"),
    ("header", "bad_header"),
    ("HTTP version", "bad_version"),
    ("Expected HTTP/", "bad_request_line"),
    ("Expected CRLF", "bad_request_line"),
    ("Expected LF", "bad_request_line"),
    ("Data after `Connection: close`", "data_after_close"),
)


def _classify(exc: httptools.HttpParserError) -> str:
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        return "bad_method"
    if isinstance(exc, httptools.HttpParserInvalidURLError):
        return "bad_target"
    if isinstance(exc, httptools.HttpParserInvalidStatusError):
        return "bad_status"
    text = str(exc)
    for needle, reason in _LLHTTP_REASONS:
        if needle in text:
            return reason
    return "malformed"


class _MessageParser:
    """Shared callback plumbing; subclasses build heads. Not thread-safe, one per connection.

    Field limits: `on_header` only appends and counts down `_room` (a field past
    `max_headers` is caught as it arrives, so at most that many are ever held); byte sizes are
    summed by `_over_limit`, which yields the 431 the first field past a limit earns. It runs
    when a head completes (skipped when the bytes fed since the message began cannot reach
    `max_head_size`), when trailers end, after a feed that left a head incomplete, and before
    an llhttp error is reported (a limit crossed earlier in the read is what the peer hears)."""

    _error_status = 400

    def __init__(self, limits: Limits) -> None:
        self._max_head = limits.max_head_size
        self._max_headers = limits.max_headers
        # A field's accounted size (name + value + 4) exceeds its bytes on the wire by at most
        # 2 (no OWS, bare LF): below this many bytes fed, a head cannot be over the size limit.
        self._head_slack = limits.max_head_size - 2 * (limits.max_headers + 1)
        self._events: list = []
        self._error: HttpError | None = None
        self._stopped = False
        self._raw: list[tuple[bytes, bytes]] = []
        self._room = self._max_headers
        self._counted = 0
        self._head_size = 0
        self._headers_done = False
        self._in_message = False
        self._stall = 0
        self._progress = False
        self._last = 0
        """Length of the read being fed."""
        self._fed = 0
        """Bytes fed from the read in which the current message began up to now."""
        self._parser = self._new_parser()
        self.tunnel = False
        """Switched protocols (WebSocket): every later byte is raw Body, never parsed."""

    def _new_parser(self):  # pragma: no cover - overridden
        raise NotImplementedError

    # -- feeding ----------------------------------------------------------------------------

    def feed(self, data: bytes) -> list:
        if self.tunnel:
            return [Body(data)] if data else []
        if self._error is not None:
            raise self._error
        if self._stopped or not data:
            return []
        events = self._events = []
        self._progress = False
        n = self._last = len(data)
        self._fed += n
        upgrade_at = -1
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            ctx = e.__context__
            if isinstance(ctx, HttpError):
                self._fail(ctx)
            if not isinstance(ctx, _Stop):
                raise ctx if ctx is not None else e
            self._on_stop(data)
        except httptools.HttpParserUpgrade as e:
            upgrade_at = int(e.args[0]) if e.args else n
        except httptools.HttpParserError as e:
            if self._raw and self._in_message:
                self._check_fields()
            self._fail(HttpError(self._error_status, _classify(e), str(e)))
        if upgrade_at >= 0:
            # Not inside the except clause: _on_upgrade may feed the rest of the read, and an
            # exception raised while one is being handled gets that one as its __context__,
            # replacing the callback's error httptools puts there (an HttpError or _Stop of
            # the next request would then escape as a bare HttpParserUpgrade).
            self._on_upgrade(data, upgrade_at)
        if self._progress:
            self._stall = 0
        else:
            self._stall += n
            if self._stall > self._max_head:
                self._fail(HttpError(431, "head_too_large", "a header line exceeds the head size limit"))
        if self._raw and self._in_message:     # a head or trailer section still incomplete
            self._check_fields()
        return events

    def _fail(self, err: HttpError) -> None:
        self._error = err
        raise err

    def _over_limit(self) -> HttpError | None:
        """The 431 for the fields not yet accounted, as a check per field would have raised it
        at the first one past a limit (size before count); None within the limits."""
        raw = self._raw
        i = self._counted
        size = self._head_size
        max_head = self._max_head
        max_headers = self._max_headers
        for name, value in raw[i:] if i else raw:
            i += 1
            size += len(name) + len(value) + 4
            if size > max_head:
                return HttpError(431, "head_too_large" if not self._headers_done else "trailers_too_large")
            if i > max_headers:
                return HttpError(431, "too_many_headers" if not self._headers_done else "too_many_trailers")
        self._counted = i
        self._head_size = size
        return None

    def _check_fields(self) -> None:
        """`_over_limit` outside a callback: the error fails the connection."""
        err = self._over_limit()
        if err is not None:
            self._fail(err)

    def _on_stop(self, data: bytes) -> None:
        self._stopped = True

    def _on_upgrade(self, data: bytes, offset: int) -> None:
        self._fail(HttpError(self._error_status, "unexpected_upgrade"))

    # -- callbacks shared by both directions ------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._progress = True
        self._raw.append((name.lower(), value))
        self._room -= 1
        if self._room < 0:
            raise self._over_limit()

    def _end(self) -> None:
        self._progress = True
        self._in_message = False
        raw = self._raw
        if raw:
            err = self._over_limit()
            if err is not None:
                raise err
            self._events.append(EndOfMessage(filter_trailers(raw)))
        else:
            self._events.append(_END)

    def _check_chunked(self, cl: bytes | None, te: bytes, version: str) -> None:
        """The checks llhttp leaves to us for a message with Transfer-Encoding."""
        st = self._error_status
        if cl is not None:
            raise HttpError(st, "content_length_with_transfer_encoding")
        if version == "1.0" and st == 400:
            raise HttpError(400, "transfer_encoding_in_http10")
        if te.strip().lower() != b"chunked":
            raise HttpError(501 if st == 400 else st, "unsupported_transfer_coding")


def _split_target(method: bytes, target: bytes) -> tuple[bytes, bytes]:
    """(path, query) of an origin-form, absolute-form or asterisk-form request-target (the
    parser inlines the origin-form case)."""
    if target[:1] == b"/":
        path, sep, query = target.partition(b"?")
        return path, query
    if target == b"*" and method == b"OPTIONS":
        return b"*", b""
    low = target[:8].lower()
    if low.startswith(b"http://") or low.startswith(b"https://"):
        try:
            url = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:
            raise HttpError(400, "bad_target") from None
        return url.path or b"/", url.query or b""
    raise HttpError(400, "bad_target", "request-target is not origin-, absolute- or asterisk-form")


class RequestParser(_MessageParser):
    """Downstream side: bytes from the client -> RequestHead, Body*, EndOfMessage, ..."""

    _error_status = 400

    def __init__(self, limits: Limits) -> None:
        self._url = b""
        self._upgrade_pending = False
        self._max_body = limits.max_body_size
        self._body_size = 0
        super().__init__(limits)

    def _new_parser(self):
        return httptools.HttpRequestParser(self)

    def on_message_begin(self) -> None:
        self._raw = []                  # the per-message reset, inlined in each direction
        self._room = self._max_headers
        self._counted = 0
        self._head_size = 0
        self._headers_done = False
        self._body_size = 0
        self._in_message = True
        self._progress = True
        self._fed = self._last
        self._url = b""
        self._upgrade_pending = False

    def on_url(self, url: bytes) -> None:
        self._progress = True
        self._url += url
        if self._fed > self._max_head and len(self._url) > self._max_head:   # (the URL is in what was fed)
            raise HttpError(431, "head_too_large")

    def on_body(self, body: bytes) -> None:
        self._progress = True
        self._events.append(Body(body))
        limit = self._max_body
        if limit is not None:
            self._body_size += len(body)
            if self._body_size > limit:
                raise HttpError(413, "body_too_large")

    def on_headers_complete(self) -> None:
        if self._fed > self._head_slack:
            err = self._over_limit()
            if err is not None:
                raise err
        p = self._parser
        version = p.get_http_version()
        if version != "1.1" and version != "1.0":
            raise HttpError(400, "bad_version", f"HTTP/{version} is not HTTP/1.x")
        method = p.get_method()
        if method == b"CONNECT":
            raise HttpError(501, "connect_unsupported")
        headers, cl, te, expect_field, host_count, upgrade = split_fields(self._raw)
        target = self._url
        if target[:1] == b"/":
            path, _, query = target.partition(b"?")
        else:
            path, query = _split_target(method, target)
        chunked = te is not None
        if chunked:
            self._check_chunked(cl, te, version)
        elif cl is not None:
            cl = cl.strip()
            if not cl.isdigit():
                raise HttpError(400, "bad_content_length")
            cl = int(cl)
        if host_count != 1:
            if host_count > 1:
                raise HttpError(400, "duplicate_host")
            if version == "1.1":
                raise HttpError(400, "missing_host")
        expect = False
        if expect_field is not None and version == "1.1":
            if expect_field.strip().lower() != b"100-continue":
                raise HttpError(417, "unsupported_expectation")
            expect = True
        limit = self._max_body
        if limit is not None and cl is not None and cl > limit:
            raise HttpError(413, "body_too_large")
        ws = False
        if p.should_upgrade():
            if chunked or cl:
                raise HttpError(501, "upgrade_with_body")
            # Only WebSocket is passed through (Istio configures Envoy's `upgrade_configs` with
            # websocket only); any other Upgrade is stripped and the request served as a plain one.
            ws = upgrade is not None and upgrade.strip().lower() == b"websocket" and version == "1.1"
            self._upgrade_pending = ws
        self._events.append(RequestHead(
            method=method, target=target, path=path, query=query, headers=headers,
            http_version=version, keep_alive=p.should_keep_alive(), content_length=cl,
            chunked=chunked, expect_continue=expect, upgrade=b"websocket" if ws else None))
        self._headers_done = True        # what follows is the trailer section (if any)
        self._raw = []
        self._room = self._max_headers
        self._counted = 0
        self._head_size = 0

    def on_message_complete(self) -> None:
        if self._raw:
            self._end()
        else:                           # _end() inlined for the common case, no trailers
            self._progress = True
            self._in_message = False
            self._events.append(_END)
        if not self._parser.should_keep_alive():
            raise _Stop  # the client will send nothing we may answer after this request

    def _on_upgrade(self, data: bytes, offset: int) -> None:
        rest = data[offset:]
        if self._upgrade_pending:
            # A WebSocket upgrade: what follows the request is not HTTP any more (if the
            # upstream refuses, the connection closes after its answer).
            self.tunnel = True
            if rest:
                self._events.append(Body(rest))
            return
        # Another Upgrade is hop-by-hop and stripped: the request was an ordinary one. llhttp
        # stops at its end, so continue with a fresh parser on the rest of this read.
        events = self._events
        self._parser = self._new_parser()
        if rest:
            events.extend(self.feed(rest))
            self._events = events

    @property
    def in_message(self) -> bool:
        return self._in_message

    def feed_eof(self) -> list:
        if self.tunnel:
            return []
        if self._error is not None:
            raise self._error
        if self._in_message and not self._stopped:
            self._fail(HttpError(400, "truncated_request", "client closed in the middle of a request"))
        self._stopped = True
        return [ConnectionClosed()]


class ResponseParser(_MessageParser):
    """Upstream side: bytes from the server -> InformationalResponse*, ResponseHead, Body*, EndOfMessage.

    The codec sets `request_method` before the response may arrive (HEAD has no body)."""

    _error_status = 502

    def __init__(self, limits: Limits) -> None:
        super().__init__(limits)
        self.request_method: bytes | None = None
        self.request_upgrade: bytes | None = None
        """The Upgrade the request in flight asked for: only then is a 101 welcome."""
        self._reason = b""
        self._switched = False
        self._interim = False
        self._close_delimited = False
        self.tainted = False
        """Bytes of unknown meaning followed a response: do not reuse the connection."""

    def _new_parser(self):
        return httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        if self.request_method is None:
            raise HttpError(502, "unsolicited_response", "upstream sent bytes with no request in flight")
        self._raw = []                  # the per-message reset, inlined in each direction
        self._room = self._max_headers
        self._counted = 0
        self._head_size = 0
        self._headers_done = False
        self._in_message = True
        self._progress = True
        self._fed = self._last
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        self._progress = True
        self._reason += reason
        if self._fed > self._max_head and len(self._reason) > self._max_head:   # (it is in what was fed)
            raise HttpError(431, "head_too_large")

    def on_body(self, body: bytes) -> None:
        self._progress = True
        self._events.append(Body(body))

    def on_headers_complete(self) -> None:
        if self._fed > self._head_slack:
            err = self._over_limit()
            if err is not None:
                raise err
        p = self._parser
        status = p.get_status_code()
        version = p.get_http_version()
        if version != "1.1" and version != "1.0":
            raise HttpError(502, "bad_version")
        headers, cl, te, _, _, _ = split_fields(self._raw)
        if status < 200:
            if status == 101:
                if self.request_upgrade is None:
                    raise HttpError(502, "unexpected_upgrade", "upstream switched protocols unasked")
                self._switched = True
                self._events.append(ResponseHead(status=101, reason=self._reason, headers=headers,
                                                 http_version=version, keep_alive=False))
                return
            self._interim = True
            self._events.append(InformationalResponse(status=status, reason=self._reason, headers=headers))
            return
        method = self.request_method
        chunked = te is not None
        if chunked:
            self._check_chunked(cl, te, version)
        elif cl is not None:
            cl = cl.strip()
            if not cl.isdigit():
                raise HttpError(502, "bad_content_length")
            cl = int(cl)
        bodyless = method == b"HEAD" or status == 204 or status == 304
        if bodyless:
            chunked = False
        self._close_delimited = not bodyless and not chunked and cl is None
        self._events.append(ResponseHead(
            status=status, reason=self._reason, headers=headers, http_version=version,
            keep_alive=p.should_keep_alive() and not self._close_delimited,
            content_length=None if status == 204 else cl, chunked=chunked))
        self._headers_done = True        # what follows is the trailer section (if any)
        self._raw = []
        self._room = self._max_headers
        self._counted = 0
        self._head_size = 0
        if method == b"HEAD":
            self._end()
            raise _Stop  # llhttp cannot be told the request was HEAD: halt and start over

    def on_message_complete(self) -> None:
        if self._switched:          # the 101 has no end: raw bytes follow (_on_upgrade)
            self._in_message = False
            return
        if self._interim:
            self._interim = False
            self._in_message = False
            return
        if self._raw:
            self._end()
        else:                           # _end() inlined for the common case, no trailers
            self._progress = True
            self._in_message = False
            self._events.append(_END)
        self.request_method = None
        self._close_delimited = False

    def _on_upgrade(self, data: bytes, offset: int) -> None:
        if not self._switched:
            self._fail(HttpError(502, "unexpected_upgrade"))
        self.tunnel = True
        self.request_method = None
        rest = data[offset:]
        if rest:
            self._events.append(Body(rest))

    def _on_stop(self, data: bytes) -> None:
        # After a HEAD response only more responses may follow, and none is due: bytes after
        # the head (we cannot see where llhttp stopped) make the connection unsafe to reuse.
        self.request_method = None
        if not data.endswith(b"\r\n\r\n"):
            self.tainted = True
        self._parser = self._new_parser()

    @property
    def in_message(self) -> bool:
        return self._in_message or self.request_method is not None

    def feed_eof(self) -> list:
        if self.tunnel:
            return []
        if self._error is not None:
            raise self._error
        if self._close_delimited and self._in_message:
            self._events = []
            self._end()
            self._close_delimited = False
            self.request_method = None
            self._stopped = True
            return [self._events[-1], ConnectionClosed()]
        if self._in_message:
            self._fail(HttpError(502, "upstream_truncated", "upstream closed in the middle of a response"))
        if self.request_method is not None:
            self._fail(HttpError(502, "upstream_closed", "upstream closed before responding"))
        self._stopped = True
        return [ConnectionClosed()]
