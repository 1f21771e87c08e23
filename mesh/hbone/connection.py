"""Sans-IO HTTP/2 connection state for HBONE clients and servers: streams, flow control, CONNECT rules.

Theory of operation
-------------------
`H2Connection` is fed the bytes read from TLS (`receive_data` -> events) and is told what the
application wants (`send_connect`, `send_response`, `send_data`, `end_stream`,
`reset_stream`, `acknowledge_received_data`); everything to write goes into one output list
taken with `data_to_send()`, so the I/O layer writes once per loop iteration.

Streams. A stream is one tunnelled TCP connection. Its state is the RFC 9113 §5.1 subset a
CONNECT tunnel can be in (`StreamState`, transitions in `_TRANSITIONS`): OPEN, then one side
ends (END_STREAM = TCP half-close, §8.5), then CLOSED; RST_STREAM closes from any state.
Closed streams leave the table at once; frames that race with the close are tolerated
(their flow-control cost is credited back) while frames for streams never opened ("idle")
are connection errors.

Flow control (§6.9). Receive: windows are large (4 MiB per stream and 16 MiB per connection
by default, ztunnel's values) and credit is returned *only* when the consumer calls
`acknowledge_received_data` -- the I/O layer does that after the bytes were written to the
TCP side and that socket is below its high-water mark, so a slow reader stops the sender
(ack-on-consume). A WINDOW_UPDATE is sent once half a window has been consumed. Send:
`send_data` frames what the connection and stream windows and the peer's MAX_FRAME_SIZE
allow, keeps the rest on the stream (by reference, no copy) and returns False: the caller
stops reading its TCP socket until a `SendUnblocked` event says the window reopened.

CONNECT validation (server, §8.5): exactly `:method CONNECT` and `:authority host:port`;
`:scheme`/`:path`/others, connection-specific or malformed headers -> 400 with a reason,
the stream is closed, the connection lives on. Regular headers (baggage, forwarded,
traceparent...) are exposed as decoded strings.

Abuse by a peer that breaks no framing rule (rapid reset, stream, PING, SETTINGS, empty-frame
and WINDOW_UPDATE floods) is bounded by `ConnectionConfig.abuse` (abuse.py): the clock the
connection is given drives its token buckets; past a bound it is a connection error with
ENHANCE_YOUR_CALM. The I/O layer calls `control_frames_written()` once what it took from
`data_to_send()` has left its buffers, which is what bounds the answers we owe a peer that
does not read.

Connection errors raise `ProtocolError`; a GOAWAY with its code is queued first, so the
caller flushes `data_to_send()` and closes the transport. Stream errors reset the stream and
surface as `StreamReset(remote=False)`.
"""
from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import frames as f
from .abuse import AbuseGuard, AbuseLimits
from .connect_rules import regular_headers, validate_connect
from .events import (GoAway, HandshakeCompleted, RequestReceived, RequestRejected, ResponseReceived,
                     SendUnblocked, StreamEnded, StreamReset)
from .frames import ErrorCode, ProtocolError, Setting

__all__ = [
    "Role", "StreamState", "ConnectionConfig", "H2Connection", "LocalProtocolError",
    "RequestReceived", "RequestRejected", "ResponseReceived", "StreamEnded", "StreamReset",
    "SendUnblocked", "GoAway", "HandshakeCompleted", "DataReceived", "ProtocolError", "ErrorCode",
    "AbuseLimits",
]

DataReceived = f.DataReceived
_DEFAULT_WINDOW = 65_535
MIB = 1024 * 1024
TLS_RECORD = 16 * 1024   # TLS's largest plaintext record (RFC 8446 §5.1)
# DATA payloads up to this size are queued joined to their frame header (one copy, which
# chunks_to_send would make anyway); larger ones stay separate items, passed by reference.
_JOIN_DATA = TLS_RECORD
_pack_header = f.FRAME_HEADER.pack       # (length >> 16, length & 0xFFFF, type, flags, stream id)


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class StreamState(enum.Enum):
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half_closed_local"    # we sent END_STREAM
    HALF_CLOSED_REMOTE = "half_closed_remote"  # the peer sent END_STREAM
    CLOSED = "closed"


_S = StreamState
_TRANSITIONS: dict[tuple[StreamState, str], StreamState] = {
    (_S.OPEN, "send_end"): _S.HALF_CLOSED_LOCAL,
    (_S.OPEN, "recv_end"): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_LOCAL, "recv_end"): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, "send_end"): _S.CLOSED,
    (_S.OPEN, "reset"): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, "reset"): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, "reset"): _S.CLOSED,
}


class LocalProtocolError(Exception):
    """Our own caller asked for something HTTP/2 or the peer forbids now (e.g. a new stream
    after GOAWAY or beyond MAX_CONCURRENT_STREAMS); `reason` is a stable label."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionConfig:
    """What we advertise and accept; defaults follow ztunnel (windows, 1 MiB frames)."""

    initial_window_size: int = 4 * MIB
    """Per-stream receive window (bytes) advertised in SETTINGS_INITIAL_WINDOW_SIZE (ztunnel's
    4 MiB: enough for a loopback/datacenter bandwidth-delay product, bounded memory per stream)."""
    connection_window_size: int = 16 * MIB
    """Connection receive window (bytes), opened by a WINDOW_UPDATE right after SETTINGS."""
    max_frame_size: int = 1 * MIB
    """Largest frame we accept (SETTINGS_MAX_FRAME_SIZE) and the cap on frames we send."""
    max_concurrent_streams: int = 1000
    """Server only: streams the peer may have open at once; more are refused."""
    max_header_list_size: int = 64 * 1024
    """Decoded header list bound (SETTINGS_MAX_HEADER_LIST_SIZE)."""
    abuse: AbuseLimits = AbuseLimits()
    """Flood and rapid-reset bounds (abuse.py); stream limits apply to the server role only."""


# (remote_closed, local_closed) of each state: kept in slots next to `state` because every
# DATA frame sent or received tests them (a property was 3 Python calls per DATA frame).
_CLOSED_FLAGS: dict[StreamState, tuple[bool, bool]] = {
    _S.OPEN: (False, False),
    _S.HALF_CLOSED_LOCAL: (False, True),
    _S.HALF_CLOSED_REMOTE: (True, False),
    _S.CLOSED: (True, True),
}


class _Stream:
    __slots__ = ("sid", "state", "remote_closed", "local_closed", "send_window", "recv_window", "pending",
                 "end_pending", "unacked", "response_seen")
    # response_seen -- client: the final :status arrived; server: we sent our response.
    # remote_closed/local_closed -- derived from `state` (_CLOSED_FLAGS); only
    # H2Connection._transition changes either.

    def __init__(self, sid: int, send_window: int, recv_window: int) -> None:
        self.sid = sid
        self.state = StreamState.OPEN
        self.remote_closed = False                    # the peer sent END_STREAM (or the stream is closed)
        self.local_closed = False                     # we sent END_STREAM (or the stream is closed)
        self.send_window = send_window
        self.recv_window = recv_window
        self.pending: list[bytes | memoryview] = []   # framed once the window allows
        self.end_pending = False                      # END_STREAM queued behind `pending`
        self.unacked = 0                              # consumed, not yet WINDOW_UPDATEd
        self.response_seen = False


class H2Connection:
    """One HTTP/2 connection's state, client or server role (see the module docstring)."""

    def __init__(self, role: Role, config: ConnectionConfig = ConnectionConfig(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.role = role
        self.config = config
        self._client = role is Role.CLIENT
        abuse = config.abuse
        self._parser = f.FrameParser(expect_preface=not self._client, max_frame_size=config.max_frame_size,
                                     max_header_list_size=config.max_header_list_size,
                                     max_consecutive_empty_frames=abuse.max_consecutive_empty_frames)
        self._out: list[bytes | memoryview] = []
        self.output = self._out
        """The queued output itself (never replaced: taking it clears it in place). The I/O
        layer tests it for emptiness on every read and flush, cheaper than `has_data_to_send`;
        it takes the contents with `data_to_send`/`chunks_to_send` only."""
        self._streams: dict[int, _Stream] = {}
        self._blocked: dict[int, _Stream] = {}
        self._next_sid = 1                      # client: next stream id we open
        self._highest_peer_sid = 0              # server: highest stream id the peer opened
        # Send side: the peer's limits.
        self._send_window = _DEFAULT_WINDOW
        self._peer_initial_window = _DEFAULT_WINDOW
        self._peer_max_frame = f.DEFAULT_MAX_FRAME_SIZE
        self.peer_max_concurrent_streams = 2**31 - 1
        # Receive side: our limits.
        self._recv_window = config.connection_window_size
        self._conn_unacked = 0
        self._conn_threshold = config.connection_window_size // 2
        self._stream_threshold = config.initial_window_size // 2
        self.handshake_complete = False
        self.goaway_received: GoAway | None = None
        self.goaway_sent = False
        self.closed = False
        self.abuse = AbuseGuard(abuse, clock)
        """Rapid-reset and flood accounting (abuse.py)."""
        self._data_frames_sent = 0

    # -- output -------------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue our preface: (client magic,) SETTINGS and the connection window increase."""
        cfg = self.config
        settings = {Setting.MAX_FRAME_SIZE: cfg.max_frame_size,
                    Setting.INITIAL_WINDOW_SIZE: cfg.initial_window_size,
                    Setting.MAX_HEADER_LIST_SIZE: cfg.max_header_list_size}
        if self._client:
            settings[Setting.ENABLE_PUSH] = 0
        else:
            settings[Setting.MAX_CONCURRENT_STREAMS] = cfg.max_concurrent_streams
        if self._client:
            self._out.append(f.PREFACE)
        self._out.append(f.settings_frame(settings))
        if cfg.connection_window_size > _DEFAULT_WINDOW:
            self._out.append(f.window_update_frame(0, cfg.connection_window_size - _DEFAULT_WINDOW))

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = b"".join(out)
        out.clear()
        return data

    def chunks_to_send(self, limit: int = 64 * 1024) -> list[bytes | memoryview]:
        """What data_to_send() gives, as pieces of about `limit` bytes: small frames are
        coalesced, large payloads pass through uncopied. Joining megabytes of DATA into one
        buffer (and encrypting it in one go) costs fresh mmapped memory and page faults.
        Small frames before a large payload (its 9-byte DATA header, a WINDOW_UPDATE) are
        topped up with the payload's first bytes to one full TLS record: on their own they
        would be a record of their own (a 31-byte TLS write, a segment on the wire, and one
        more decryption at the peer) for every 256 KiB read."""
        out = self._out
        # The usual flush (a few small frames): what the loop below returns for it, without
        # the per-item bookkeeping. One item is passed as is, whatever its size (so does the loop).
        count = len(out)
        if count == 1:
            chunks = [out[0]]
            out.clear()
            return chunks
        if count and sum(map(len, out)) < limit:  # every item is small, and so is their sum
            chunks = [b"".join(out)]
            out.clear()
            return chunks
        chunks = []
        cur: list[bytes | memoryview] = []
        size = 0
        for b in out:
            n = len(b)
            if n >= limit:
                if cur:
                    if size < TLS_RECORD:
                        b = memoryview(b)
                        cur.append(b[:TLS_RECORD - size])
                        b = b[TLS_RECORD - size:]
                    chunks.append(b"".join(cur) if len(cur) > 1 else cur[0])
                    cur, size = [], 0
                chunks.append(b)
                continue
            cur.append(b)
            size += n
            if size >= limit:
                chunks.append(b"".join(cur))
                cur, size = [], 0
        if cur:
            chunks.append(b"".join(cur) if len(cur) > 1 else cur[0])
        out.clear()
        return chunks

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._out)

    def control_frames_written(self) -> None:
        """The I/O layer wrote out what it took (its own buffers are below their high-water
        mark): the control frames we owed the peer no longer count against
        `max_pending_control_frames`."""
        self.abuse.control_pending = 0

    # -- queries ------------------------------------------------------------------------

    @property
    def header_block_open(self) -> bool:
        """The peer started a header block (HEADERS without END_HEADERS) not finished yet."""
        # FrameParser.header_block_open's test, read here directly: the server asks after every read.
        return self._parser._block_sid != 0

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def can_open_stream(self) -> bool:
        """Client: whether `send_connect` would succeed now."""
        return (not self.closed and self.goaway_received is None and not self.goaway_sent
                and self._next_sid <= 2**31 - 1 and len(self._streams) < self.peer_max_concurrent_streams)

    @property
    def stream_ids_exhausted(self) -> bool:
        return self._next_sid > 2**31 - 1

    def stream_state(self, stream_id: int) -> StreamState:
        s = self._streams.get(stream_id)
        return StreamState.CLOSED if s is None else s.state

    def send_windows(self, stream_id: int) -> tuple[int, int]:
        """(connection, stream) send windows, for tests and diagnostics."""
        s = self._streams.get(stream_id)
        return self._send_window, (s.send_window if s is not None else 0)

    def pending_bytes(self, stream_id: int) -> int:
        s = self._streams.get(stream_id)
        return 0 if s is None else sum(len(p) for p in s.pending)

    # -- application actions --------------------------------------------------------------

    def send_connect(self, authority: str, headers=()) -> int:
        """Client: open a stream with a CONNECT request; returns its id."""
        if not self.can_open_stream():
            reason = ("connection_closed" if self.closed else "goaway" if self.goaway_received or self.goaway_sent
                      else "stream_ids_exhausted" if self._next_sid > 2**31 - 1 else "max_concurrent_streams")
            raise LocalProtocolError(reason, f"cannot open a stream: {reason}")
        block = f.encode_connect_block(authority, headers)
        sid = self._next_sid
        self._next_sid += 2
        self._streams[sid] = _Stream(sid, self._peer_initial_window, self.config.initial_window_size)
        self._out.append(f.headers_frames(sid, block, end_stream=False, max_frame_size=self._peer_max_frame))
        return sid

    def send_response(self, stream_id: int, status: int, headers=(), *, end_stream: bool = False) -> None:
        """Server: answer the CONNECT on `stream_id` (200 opens the tunnel)."""
        s = self._streams.get(stream_id)
        if s is None:
            raise LocalProtocolError("stream_closed", f"stream {stream_id} is not open")
        block = f.encode_status_block(status, headers)
        self._out.append(f.headers_frames(stream_id, block, end_stream=end_stream, max_frame_size=self._peer_max_frame))
        s.response_seen = True
        if end_stream:
            self._transition(s, "send_end")

    def send_data(self, stream_id: int, data: bytes | memoryview) -> bool:
        """Frame `data` for the stream within the send windows. Returns False when some of
        it is held back (stop reading the source until `SendUnblocked`). Data for a stream
        that is gone is dropped (the peer reset it; the caller learns from the event)."""
        s = self._streams.get(stream_id)
        if s is None or s.local_closed or s.end_pending:
            return True
        if s.pending:
            s.pending.append(data)
            return False
        n = len(data)
        win = self._send_window if self._send_window < s.send_window else s.send_window
        if n <= win and n <= self._peer_max_frame:            # fast path: one frame
            header = _pack_header(n >> 16, n & 0xFFFF, f.DATA, 0, stream_id)
            if n <= _JOIN_DATA:
                # chunks_to_send would join header and payload into one buffer anyway: do it
                # now, one list item (and one copy) instead of two.
                self._out.append(header + data)
            else:
                self._out.append(header)
                self._out.append(data)                         # by reference, uncopied
            self._send_window -= n
            s.send_window -= n
            self._data_frames_sent += 1
            return True
        return self._send_slow(s, data)

    def _send_slow(self, s: _Stream, data: bytes | memoryview) -> bool:
        mv = memoryview(data)
        n = len(mv)
        off = 0
        out = self._out
        fs = self._peer_max_frame
        while off < n:
            win = self._send_window if self._send_window < s.send_window else s.send_window
            if win <= 0:
                break
            k = min(n - off, win, fs)
            out.append(f.data_frame_header(s.sid, k))
            out.append(mv[off:off + k])
            self._data_frames_sent += 1
            off += k
            self._send_window -= k
            s.send_window -= k
        if off < n:
            s.pending.append(mv[off:])                 # a view of immutable bytes: no copy
            self._blocked[s.sid] = s
            return False
        return True

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side (TCP FIN from the local socket): END_STREAM after any held data."""
        s = self._streams.get(stream_id)
        if s is None or s.local_closed or s.end_pending:
            return
        if s.pending:
            s.end_pending = True
            return
        self._out.append(f.data_frame_header(stream_id, 0, end_stream=True))
        self._data_frames_sent += 1
        self._transition(s, "send_end")

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None:
        s = self._streams.get(stream_id)
        if s is None:
            return
        self._out.append(f.rst_stream_frame(stream_id, error_code))
        self._transition(s, "reset")

    def acknowledge_received_data(self, stream_id: int, n: int) -> None:
        """The consumer has taken `n` flow-controlled bytes: return the credit (batched)."""
        self._conn_unacked += n
        if self._conn_unacked >= self._conn_threshold:
            self._out.append(f.window_update_frame(0, self._conn_unacked))
            self._recv_window += self._conn_unacked
            self._conn_unacked = 0
        s = self._streams.get(stream_id)
        if s is not None and not s.remote_closed:
            s.unacked += n
            if s.unacked >= self._stream_threshold:
                self._out.append(f.window_update_frame(stream_id, s.unacked))
                s.recv_window += s.unacked
                s.unacked = 0

    def ping(self, opaque: bytes = b"\0" * 8) -> None:
        self._out.append(f.ping_frame(opaque))

    def close(self, error_code: int = ErrorCode.NO_ERROR, debug: bytes = b"") -> None:
        """Send GOAWAY: no new streams; existing ones may finish (graceful when NO_ERROR)."""
        if self.closed:
            return
        self._out.append(f.goaway_frame(self._highest_peer_sid, error_code, debug))
        self.goaway_sent = True

    # -- input ----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list:
        """Parse and apply inbound bytes; returns connection events. Raises ProtocolError on a
        connection error (GOAWAY already queued)."""
        if self.closed:
            return []
        try:
            frames = self._parser.feed(data)
            if not self.handshake_complete and frames and not self._first_frame_ok(frames[0]):
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "settings_expected",
                                    "the first frame from the peer must be SETTINGS")
            events: list = []
            streams = self._streams
            for ev in frames:
                if type(ev) is f.DataReceived:
                    # The common DATA frame (open stream, within both windows, no END_STREAM)
                    # inline: exactly what _on_data does for it. Anything else goes to _on_data,
                    # which starts from scratch (nothing is changed here before that test).
                    n = ev.flow_controlled_length
                    s = streams.get(ev.stream_id)
                    if (s is not None and not s.remote_closed and not ev.end_stream and n <= self._recv_window
                            and n <= s.recv_window and (s.response_seen or not self._client)):
                        self._recv_window -= n
                        s.recv_window -= n
                        events.append(ev)
                    else:
                        self._on_data(ev, events)
                else:
                    self._on_frame(ev, events)
            return events
        except ProtocolError as e:
            self._out.append(f.goaway_frame(self._highest_peer_sid, e.error_code, e.reason.encode()))
            self.closed = True
            raise

    def _first_frame_ok(self, ev) -> bool:
        return type(ev) is f.SettingsReceived and not ev.ack

    def _is_idle(self, sid: int) -> bool:
        """A stream id that was never opened (frames on it are connection errors)."""
        if self._client:
            return sid % 2 == 0 or sid >= self._next_sid
        return sid % 2 == 0 or sid > self._highest_peer_sid

    def _on_data(self, ev: f.DataReceived, events: list) -> None:
        n = ev.flow_controlled_length
        if n:
            if n > self._recv_window:
                raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "flow_control_violation",
                                    "peer sent more than the connection window")
            self._recv_window -= n
        s = self._streams.get(ev.stream_id)
        if s is None:
            if self._is_idle(ev.stream_id):
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "data_on_idle_stream",
                                    f"DATA on stream {ev.stream_id}, which was never opened")
            if n:
                self.acknowledge_received_data(ev.stream_id, n)  # raced with our close
            return
        if s.remote_closed:
            self._stream_error(s, ErrorCode.STREAM_CLOSED, "data_after_end_stream", events, n)
            return
        if self._client and not s.response_seen:
            self._stream_error(s, ErrorCode.PROTOCOL_ERROR, "data_before_response", events, n)
            return
        if n:
            if n > s.recv_window:
                self._stream_error(s, ErrorCode.FLOW_CONTROL_ERROR, "flow_control_violation", events, n)
                return
            s.recv_window -= n
        if ev.end_stream:
            self._transition(s, "recv_end")
        events.append(ev)

    def _stream_error(self, s: _Stream, code: int, reason: str, events: list, credit: int = 0) -> None:
        self.abuse.owe_control()
        self.reset_stream(s.sid, code)
        if credit:
            self.acknowledge_received_data(s.sid, credit)
        events.append(StreamReset(s.sid, code, False, reason))

    def _on_frame(self, ev, events: list) -> None:
        t = type(ev)
        if t is f.HeadersReceived:
            if self._client:
                self._on_response_headers(ev, events)
            else:
                self._on_request_headers(ev, events)
        elif t is f.WindowUpdateReceived:
            self._on_window_update(ev, events)
        elif t is f.SettingsReceived:
            self._on_settings(ev, events)
        elif t is f.RstStreamReceived:
            s = self._streams.get(ev.stream_id)
            if s is None:
                if self._is_idle(ev.stream_id):
                    raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "rst_on_idle_stream",
                                        f"RST_STREAM on stream {ev.stream_id}, which was never opened")
                return
            self._transition(s, "reset")
            if not s.response_seen and not self._client:
                self.abuse.premature_reset()
            # REFUSED_STREAM: the peer did not process the stream at all (a client may retry).
            events.append(StreamReset(ev.stream_id, ev.error_code, True,
                                      "refused_stream" if ev.error_code == ErrorCode.REFUSED_STREAM else "peer_reset"))
        elif t is f.PingReceived:
            if not ev.ack:
                self.abuse.ping()
                self._out.append(f.ping_frame(ev.opaque, ack=True))
        elif t is f.GoAwayReceived:
            self._on_goaway(ev, events)
        # PriorityReceived: nothing to do.

    def _on_settings(self, ev: f.SettingsReceived, events: list) -> None:
        if ev.ack:
            return
        self.abuse.settings_frame()
        window = None
        for key, value in ev.settings:
            if key == Setting.INITIAL_WINDOW_SIZE:
                if value > f.MAX_WINDOW:
                    raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "bad_initial_window_size",
                                        f"SETTINGS_INITIAL_WINDOW_SIZE {value} > 2^31-1")
                window = value       # applied once below: a frame repeating it costs one pass
            elif key == Setting.MAX_FRAME_SIZE:
                if not f.DEFAULT_MAX_FRAME_SIZE <= value <= f.MAX_ALLOWED_FRAME_SIZE:
                    raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "bad_max_frame_size",
                                        f"SETTINGS_MAX_FRAME_SIZE {value} out of range")
                # Never send bigger frames than we accept ourselves: big frames delay other streams.
                self._peer_max_frame = min(value, self.config.max_frame_size)
            elif key == Setting.MAX_CONCURRENT_STREAMS:
                self.peer_max_concurrent_streams = value
            elif key == Setting.ENABLE_PUSH:
                if value > 1:
                    raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "bad_enable_push", "SETTINGS_ENABLE_PUSH not 0/1")
            # HEADER_TABLE_SIZE: our encoder never indexes, nothing to resize. Unknown: ignored.
        if window is not None and window != self._peer_initial_window:
            delta = window - self._peer_initial_window
            self._peer_initial_window = window
            for s in self._streams.values():         # §6.9.2: applies to open streams too
                s.send_window += delta
                if s.send_window > f.MAX_WINDOW:
                    raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "window_overflow",
                                        "SETTINGS_INITIAL_WINDOW_SIZE overflows a stream window")
        self._out.append(f.settings_ack_frame())
        if not self.handshake_complete:
            self.handshake_complete = True
            events.append(HandshakeCompleted())
        if self._blocked:
            self._unblock(events)

    def _on_window_update(self, ev: f.WindowUpdateReceived, events: list) -> None:
        sid, inc = ev.stream_id, ev.increment
        self.abuse.window_update(self.abuse.streams_accepted + (self._next_sid >> 1), self._data_frames_sent)
        if sid == 0:
            if inc == 0:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "zero_window_increment",
                                    "WINDOW_UPDATE with increment 0 on the connection")
            self._send_window += inc
            if self._send_window > f.MAX_WINDOW:
                raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "window_overflow",
                                    "connection send window above 2^31-1")
        else:
            s = self._streams.get(sid)
            if s is None:
                if self._is_idle(sid):
                    raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "window_update_on_idle_stream",
                                        f"WINDOW_UPDATE on stream {sid}, which was never opened")
                return
            if inc == 0:
                self._stream_error(s, ErrorCode.PROTOCOL_ERROR, "zero_window_increment", events)
                return
            s.send_window += inc
            if s.send_window > f.MAX_WINDOW:
                self._stream_error(s, ErrorCode.FLOW_CONTROL_ERROR, "window_overflow", events)
                return
        if self._blocked:
            self._unblock(events)

    def _unblock(self, events: list) -> None:
        for sid, s in list(self._blocked.items()):
            if s.state is StreamState.CLOSED:
                del self._blocked[sid]
                continue
            queue, s.pending = s.pending, []
            del self._blocked[sid]
            for i, chunk in enumerate(queue):
                if not self._send_slow(s, chunk):
                    s.pending.extend(queue[i + 1:])
                    break
            if not s.pending:
                if s.end_pending:
                    s.end_pending = False
                    self.end_stream(sid)
                events.append(SendUnblocked(sid))

    def _on_goaway(self, ev: f.GoAwayReceived, events: list) -> None:
        self.goaway_received = GoAway(ev.last_stream_id, ev.error_code, ev.debug_data)
        if self._client:
            for sid, s in list(self._streams.items()):
                if sid > ev.last_stream_id:          # never processed by the peer: safe to retry
                    self._transition(s, "reset")
                    events.append(StreamReset(sid, ErrorCode.REFUSED_STREAM, True, "goaway"))
        events.append(self.goaway_received)

    def _on_response_headers(self, ev: f.HeadersReceived, events: list) -> None:
        s = self._streams.get(ev.stream_id)
        if s is None:
            if self._is_idle(ev.stream_id):
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "headers_on_idle_stream",
                                    f"HEADERS on stream {ev.stream_id}, which we never opened")
            return
        if s.remote_closed:
            self._stream_error(s, ErrorCode.STREAM_CLOSED, "headers_after_end_stream", events)
            return
        if s.response_seen:                           # trailers
            if not ev.end_stream:
                self._stream_error(s, ErrorCode.PROTOCOL_ERROR, "trailers_without_end_stream", events)
                return
            self._transition(s, "recv_end")
            events.append(StreamEnded(ev.stream_id))
            return
        headers = ev.headers
        status = None
        if headers and headers[0][0] == b":status":
            raw = headers[0][1]
            if len(raw) == 3 and raw.isdigit():
                status = int(raw)
        regular, bad = regular_headers(headers, 1)
        if status is None or bad:
            self._stream_error(s, ErrorCode.PROTOCOL_ERROR, bad or "bad_status", events)
            return
        if status < 200:                              # informational: wait for the final one
            if ev.end_stream:
                self._stream_error(s, ErrorCode.PROTOCOL_ERROR, "bad_status", events)
            return
        s.response_seen = True
        if ev.end_stream:
            self._transition(s, "recv_end")
        events.append(ResponseReceived(ev.stream_id, status, regular, ev.end_stream))

    def _on_request_headers(self, ev: f.HeadersReceived, events: list) -> None:
        sid = ev.stream_id
        s = self._streams.get(sid)
        if s is not None:                             # trailers on an open tunnel
            if s.remote_closed:
                self._stream_error(s, ErrorCode.STREAM_CLOSED, "headers_after_end_stream", events)
            elif not ev.end_stream:
                self._stream_error(s, ErrorCode.PROTOCOL_ERROR, "trailers_without_end_stream", events)
            else:
                self._transition(s, "recv_end")
                events.append(StreamEnded(sid))
            return
        if sid % 2 == 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "bad_stream_id", f"client opened even stream {sid}")
        if sid <= self._highest_peer_sid:
            raise ProtocolError(ErrorCode.STREAM_CLOSED, "headers_on_closed_stream",
                                f"HEADERS on closed or non-increasing stream {sid}")
        self._highest_peer_sid = sid
        if not self.abuse.new_stream():
            self.abuse.owe_control()
            self._out.append(f.rst_stream_frame(sid, ErrorCode.REFUSED_STREAM))
            events.append(RequestRejected(sid, 0, "stream_rate_limited"))
            return
        if self.goaway_sent or len(self._streams) >= self.config.max_concurrent_streams:
            self.abuse.owe_control()
            self._out.append(f.rst_stream_frame(sid, ErrorCode.REFUSED_STREAM))
            events.append(RequestRejected(sid, 0, "goaway" if self.goaway_sent else "max_concurrent_streams"))
            return
        result = validate_connect(ev.headers)
        if isinstance(result, str):
            self.abuse.owe_control()
            # Malformed request (§8.1.1): answer 400 and close the stream; RST_STREAM(NO_ERROR)
            # tells the client to stop sending without discarding the response (§8.1).
            self._out.append(f.headers_frames(sid, f.encode_status_block(400), end_stream=True,
                                              max_frame_size=self._peer_max_frame))
            if not ev.end_stream:
                self._out.append(f.rst_stream_frame(sid, ErrorCode.NO_ERROR))
            events.append(RequestRejected(sid, 400, result))
            return
        authority, regular = result
        s = _Stream(sid, self._peer_initial_window, self.config.initial_window_size)
        self._streams[sid] = s
        self.abuse.streams_accepted += 1
        if ev.end_stream:
            self._transition(s, "recv_end")
        events.append(RequestReceived(sid, authority, regular, ev.end_stream))

    def _transition(self, s: _Stream, action: str) -> None:
        new = _TRANSITIONS.get((s.state, action))
        if new is None:
            raise LocalProtocolError("bad_transition", f"stream {s.sid}: {action} in state {s.state.value}")
        s.state = new
        s.remote_closed, s.local_closed = _CLOSED_FLAGS[new]
        if new is StreamState.CLOSED:
            self._streams.pop(s.sid, None)
            self._blocked.pop(s.sid, None)
            if s.unacked:                             # nothing will consume it any more
                s.unacked = 0
