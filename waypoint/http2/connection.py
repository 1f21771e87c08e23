"""Sans-IO HTTP/2 for the waypoint: ServerConnection (downstream) and ClientConnection (upstream) over the h2 library.

Theory of operation
-------------------
Each object is one HTTP/2 connection (carried in one HBONE stream) and does no I/O:

    bytes in  -> conn.receive_data(data) -> [(stream_id, event), ...]
    calls     -> conn.send_head / send_body / send_end / reset  (queued)
    bytes out -> conn.data_to_send()

Events are the HTTP/1.1 codec's (waypoint/http/events.py: RequestHead, ResponseHead,
InformationalResponse, Body, EndOfMessage with trailers), converted by convert.py, plus the
stream-level events below: `StreamReset` (the peer or we reset it), `Writable` (queued
output of a stream has all been framed) and `ConnectionEnded` (GOAWAY, protocol error).
A request the waypoint refuses (no :path, CONNECT, bad content-length) is answered here
(its status with an empty body) and comes out as `(stream_id, HttpError)`.

Flow control (RFC 9113 5.2), receive: credit is returned only by `ack(stream_id, n)`, which
the I/O layer calls when the pipeline has taken a Body (ack-on-consume), so a slow upstream
stops the client after one stream window (`Settings.stream_window`). Padding is credited at
once. Send: `send_body` keeps what the peer's windows do not allow yet on the stream
(by reference) and frames it when WINDOW_UPDATEs arrive; `pending(stream_id)` is what a
writer waits on. END_STREAM and trailers queue behind the data.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events as e
import h2.exceptions
import h2.settings

from waypoint.http import Body, EndOfMessage, HttpError, InformationalResponse, LocalProtocolError, ResponseHead

from .base import PREFACE
from .convert import request_from_h2, response_from_h2, response_to_h2, trailers_from_h2

__all__ = ["Settings", "ServerConnection", "ClientConnection", "StreamReset", "Writable", "ConnectionEnded",
           "ProtocolError", "PREFACE", "ErrorCode"]

ProtocolError = h2.exceptions.ProtocolError
ErrorCode = h2.errors.ErrorCodes


@dataclass(frozen=True, slots=True)
class Settings:
    """What this side advertises and enforces."""

    stream_window: int = 1 << 20
    """Receive window per stream (bytes): what one slow stream may hold."""
    connection_window: int = 16 << 20
    max_concurrent_streams: int = 1000
    max_header_list_size: int = 64 * 1024
    """Decoded header bytes per block (the HTTP/1.1 codec's max_head_size): beyond -> connection error."""


@dataclass(frozen=True, slots=True)
class StreamReset:
    code: int
    remote: bool


@dataclass(frozen=True, slots=True)
class Writable:
    """All data queued on the stream has been framed (a paused writer may go on)."""


@dataclass(frozen=True, slots=True)
class ConnectionEnded:
    """No more streams: GOAWAY from the peer (code, last stream id) or our protocol error."""

    code: int
    last_stream_id: int = 0
    reason: str = ""


class _Out:
    __slots__ = ("chunks", "size", "end", "trailers")

    def __init__(self) -> None:
        self.chunks: deque[memoryview] = deque()
        self.size = 0
        self.end = False
        self.trailers: list | None = None


class _Connection:
    """State shared by both sides: h2 itself, output queues, receive accounting."""

    client_side = False

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = s = settings or Settings()
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=self.client_side, header_encoding=None, validate_inbound_headers=True,
            normalize_inbound_headers=True, validate_outbound_headers=False, normalize_outbound_headers=False))
        self.h2.local_settings = h2.settings.Settings(client=self.client_side, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: s.stream_window,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: s.max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
            h2.settings.SettingCodes.ENABLE_PUSH: 0})
        self._out: dict[int, _Out] = {}
        self._trailered: set[int] = set()
        self.ended: ConnectionEnded | None = None

    def initiate(self) -> None:
        """Preface + SETTINGS, and the connection receive window opened to its size."""
        self.h2.initiate_connection()
        extra = self.settings.connection_window - 65_535
        if extra > 0:
            self.h2.increment_flow_control_window(extra)

    def data_to_send(self) -> bytes:
        return self.h2.data_to_send()

    # -- receiving ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[tuple[int, object]]:
        """Events for `data`. A connection error queues GOAWAY (flush data_to_send, then close)
        and comes out as `(0, ConnectionEnded)`."""
        if self.ended is not None:
            return []
        try:
            evs = self.h2.receive_data(data)
        except ProtocolError as exc:
            self.ended = ConnectionEnded(code=int(getattr(exc, "error_code", ErrorCode.PROTOCOL_ERROR)),
                                         reason=type(exc).__name__)
            return [(0, self.ended)]
        out: list[tuple[int, object]] = []
        for ev in evs:
            self._event(ev, out)
        return out

    def _event(self, ev, out: list) -> None:
        t = type(ev)
        if t is e.DataReceived:
            pad = ev.flow_controlled_length - len(ev.data)
            if pad:
                self.h2.acknowledge_received_data(pad, ev.stream_id)
            if ev.data:
                out.append((ev.stream_id, Body(ev.data)))
        elif t is e.StreamEnded:
            if ev.stream_id in self._trailered:
                self._trailered.discard(ev.stream_id)      # the trailers were the EndOfMessage
            else:
                out.append((ev.stream_id, EndOfMessage()))
        elif t is e.TrailersReceived:
            self._trailered.add(ev.stream_id)              # StreamEnded follows in this batch
            try:
                out.append((ev.stream_id, EndOfMessage(trailers_from_h2(ev.headers))))
            except HttpError as err:
                self._refuse(ev.stream_id, err, out)
        elif t is e.StreamReset:
            self._out.pop(ev.stream_id, None)
            out.append((ev.stream_id, StreamReset(code=int(ev.error_code), remote=ev.remote_reset)))
        elif t is e.WindowUpdated:
            if ev.stream_id == 0:
                for sid in list(self._out):
                    self._flush(sid, out)
            elif ev.stream_id in self._out:
                self._flush(ev.stream_id, out)
        elif t is e.RemoteSettingsChanged:
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
                for sid in list(self._out):
                    self._flush(sid, out)
        elif t is e.ConnectionTerminated:
            self.ended = ConnectionEnded(code=int(ev.error_code), last_stream_id=ev.last_stream_id or 0,
                                         reason="goaway")
            out.append((0, self.ended))
        else:
            self._other(ev, out)

    def _other(self, ev, out: list) -> None:
        pass

    def _refuse(self, sid: int, err: HttpError, out: list) -> None:
        out.append((sid, err))
        self.reset(sid, ErrorCode.PROTOCOL_ERROR)

    def ack(self, stream_id: int, n: int) -> None:
        """The consumer took `n` body bytes of `stream_id`: return their credit."""
        if n and self.ended is None:
            self.h2.acknowledge_received_data(n, stream_id)

    # -- sending -----------------------------------------------------------------------------

    def _headers(self, sid: int, headers, end: bool) -> None:
        try:
            self.h2.send_headers(sid, headers, end_stream=end)
        except h2.exceptions.StreamClosedError as exc:
            raise LocalProtocolError("stream_closed", str(exc)) from exc
        if not end:
            self._out.setdefault(sid, _Out())

    def send_body(self, sid: int, data: bytes | memoryview) -> None:
        o = self._out.get(sid)
        if o is None or o.end:
            raise LocalProtocolError("bad_event_order", f"stream {sid}: body after the end or before the head")
        if data:
            o.chunks.append(memoryview(data))
            o.size += len(data)
            self._flush(sid, None)

    def send_end(self, sid: int, trailers=()) -> None:
        """END_STREAM (with trailers as a final HEADERS when given) after the queued data."""
        o = self._out.get(sid)
        if o is None or o.end:
            raise LocalProtocolError("bad_event_order", f"stream {sid}: end without a head, or twice")
        o.end = True
        o.trailers = list(trailers) or None
        self._flush(sid, None)

    def pending(self, sid: int) -> int:
        o = self._out.get(sid)
        return o.size if o is not None else 0

    def reset(self, sid: int, code: int = ErrorCode.CANCEL) -> None:
        self._out.pop(sid, None)
        if self.ended is not None:
            return
        try:
            self.h2.reset_stream(sid, error_code=code)
        except (h2.exceptions.StreamClosedError, ProtocolError):
            pass          # already closed both ways: nothing to reset

    def close(self, code: int = ErrorCode.NO_ERROR) -> None:
        if self.ended is None:
            self.h2.close_connection(error_code=code)
            self.ended = ConnectionEnded(code=int(code), reason="local_close")

    def open_streams(self) -> int:
        return self.h2.open_outbound_streams + self.h2.open_inbound_streams

    def _flush(self, sid: int, out: list | None) -> None:
        o = self._out.get(sid)
        if o is None:
            return
        h = self.h2
        had = o.size
        try:
            while o.chunks:
                window = h.local_flow_control_window(sid)
                if window <= 0:
                    break
                c = o.chunks[0]
                n = min(window, h.max_outbound_frame_size, len(c))
                h.send_data(sid, c[:n])
                o.size -= n
                if n == len(c):
                    o.chunks.popleft()
                else:
                    o.chunks[0] = c[n:]
            if not o.chunks and o.end:
                del self._out[sid]
                if o.trailers:
                    h.send_headers(sid, o.trailers, end_stream=True)
                else:
                    h.end_stream(sid)
        except h2.exceptions.StreamClosedError:
            self._out.pop(sid, None)
            o.size = 0
        if had and not o.size and out is not None:
            out.append((sid, Writable()))


class ServerConnection(_Connection):
    """The downstream side: requests in, responses out."""

    client_side = False

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__(settings)
        self._bodyless: set[int] = set()
        self._held: dict[int, ResponseHead] = {}

    def _other(self, ev, out: list) -> None:
        if type(ev) is e.RequestReceived:
            sid = ev.stream_id
            end = ev.stream_ended is not None
            try:
                head = request_from_h2(ev.headers, end)
            except HttpError as err:
                self._headers(sid, [(b":status", b"%d" % err.status), (b"content-length", b"0")], True)
                out.append((sid, err))
                if end:
                    self._trailered.add(sid)        # its StreamEnded is no request's end
                else:
                    self.reset(sid, ErrorCode.NO_ERROR)   # answered: the body is not wanted
                return
            if head.method == b"HEAD":
                self._bodyless.add(sid)
            out.append((sid, head))
            # StreamEnded follows in the same batch and becomes the EndOfMessage

    def send_informational(self, sid: int, ev: InformationalResponse) -> None:
        self.h2.send_headers(sid, [(b":status", b"%d" % ev.status), *ev.headers])

    def send_head(self, sid: int, head: ResponseHead) -> None:
        """A response head. One declaring content-length 0 is held until its end, so a
        bodyless response (gRPC trailers-only) leaves as one HEADERS with END_STREAM."""
        if head.content_length == 0 or sid in self._bodyless or head.status in (204, 304):
            self._held[sid] = head
            self._out.setdefault(sid, _Out())
            return
        self._headers(sid, response_to_h2(head, bodyless=False), False)

    def send_body(self, sid: int, data: bytes | memoryview) -> None:
        if sid in self._held:
            if not data:
                return
            if sid in self._bodyless or self._held[sid].status in (204, 304):
                return          # HEAD/204/304 carry no body (as the HTTP/1.1 codec)
            self._release(sid, False)
        super().send_body(sid, data)

    def send_end(self, sid: int, trailers=()) -> None:
        head = self._held.get(sid)
        if head is not None:
            if not trailers:
                self._out.pop(sid, None)
                self._release(sid, True)
                self._bodyless.discard(sid)
                return
            self._release(sid, False)
        self._bodyless.discard(sid)
        super().send_end(sid, trailers)

    def _release(self, sid: int, end: bool) -> None:
        head = self._held.pop(sid)
        self._out.pop(sid, None)
        self._headers(sid, response_to_h2(head, bodyless=sid in self._bodyless), end)

    def reset(self, sid: int, code: int = ErrorCode.CANCEL) -> None:
        self._held.pop(sid, None)
        self._bodyless.discard(sid)
        super().reset(sid, code)


class ClientConnection(_Connection):
    """The upstream side: requests out, responses in (many streams on one connection)."""

    client_side = True

    def _other(self, ev, out: list) -> None:
        t = type(ev)
        if t is e.ResponseReceived:
            try:
                out.append((ev.stream_id, response_from_h2(ev.headers, ev.stream_ended is not None)))
            except HttpError as err:
                self._refuse(ev.stream_id, err, out)
        elif t is e.InformationalResponseReceived:
            status = next((int(v) for n, v in ev.headers if n == b":status"), 100)
            if status != 101:
                out.append((ev.stream_id, InformationalResponse(
                    status=status, headers=tuple((n, v) for n, v in ev.headers if n[:1] != b":"))))

    def new_stream_id(self) -> int:
        return self.h2.get_next_available_stream_id()

    @property
    def capacity(self) -> int:
        """Streams that may still be opened now (the peer's MAX_CONCURRENT_STREAMS)."""
        return self.h2.remote_settings.max_concurrent_streams - self.h2.open_outbound_streams

    def send_request(self, sid: int, headers, end: bool) -> None:
        self._headers(sid, headers, end)

