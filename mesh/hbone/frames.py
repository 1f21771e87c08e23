"""Sans-IO HTTP/2 framing for HBONE: frame encoders, a cut-through frame parser, fixed HPACK.

Theory of operation
-------------------
HBONE uses a tiny slice of HTTP/2 (RFC 9113): one CONNECT request per stream, then opaque
DATA both ways. The hot path is DATA, so the parser is built around it:

* DATA payloads are delivered *cut-through*: as soon as a (non-padded) DATA frame header is
  parsed, every byte of its payload that is already in the input is emitted as a
  `DataReceived` whose `data` is a memoryview slice of the caller's (immutable) bytes, even
  when the rest of the frame has not arrived yet. No copy, no per-frame buffering.
  Padded DATA frames are rare and take the slow path (buffered whole, padding stripped).
* Every other frame is buffered until complete (bounded by the advertised MAX_FRAME_SIZE)
  and parsed into one small frozen event.
* HEADERS + CONTINUATION are reassembled (bounded) and decoded with `hpack.Decoder`, which
  keeps the peer's dynamic table. Our own header blocks are hand-encoded as HPACK literals
  *without indexing* (static-table names only), so we never ask the peer to grow a table
  and need no encoder state.

The parser enforces framing rules only (sizes, stream-id zero/non-zero, CONTINUATION
sequencing, padding, HPACK). Stream states and flow control live in `connection.py`.
Violations raise `ProtocolError(error_code, reason)`; `reason` is a stable label.

No asyncio/socket/ssl here: bytes in, events and bytes out.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Union

import hpack

from ..fastinit import fast_init

__all__ = [
    "PREFACE", "ErrorCode", "ProtocolError", "Setting", "DEFAULT_MAX_FRAME_SIZE",
    "DataReceived", "HeadersReceived", "SettingsReceived", "WindowUpdateReceived",
    "RstStreamReceived", "PingReceived", "GoAwayReceived", "PriorityReceived", "FrameEvent",
    "FrameParser", "frame", "data_frame_header", "settings_frame", "settings_ack_frame",
    "window_update_frame", "rst_stream_frame", "goaway_frame", "ping_frame", "headers_frames",
    "encode_connect_block", "encode_status_block", "FRAME_HEADER",
]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 §6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
# Flags.
FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20

DEFAULT_MAX_FRAME_SIZE = 16_384          # RFC 9113 §6.5.2 initial value
MAX_ALLOWED_FRAME_SIZE = (1 << 24) - 1
MAX_WINDOW = (1 << 31) - 1

_HDR = struct.Struct(">BHBBL")           # 24-bit length as (hi8, lo16), type, flags, stream id
FRAME_HEADER = _HDR
"""The 9-byte frame header layout, for callers that pack DATA headers inline on their hot path."""
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
_GOAWAY = struct.Struct(">LL")


class ErrorCode:
    """HTTP/2 error codes (RFC 9113 §7)."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class Setting:
    """SETTINGS identifiers (RFC 9113 §6.5.2)."""

    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6
    ENABLE_CONNECT_PROTOCOL = 0x8


class ProtocolError(Exception):
    """The peer violated HTTP/2: a connection error carrying the h2 `error_code` to send in
    GOAWAY and a stable `reason` label (metrics, logs)."""

    def __init__(self, error_code: int, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.error_code = error_code
        self.reason = reason


# -- events -------------------------------------------------------------------------------

@fast_init
@dataclass(frozen=True, slots=True)
class DataReceived:
    """DATA payload bytes (possibly a part of a frame). `data` may be a memoryview into the
    input buffer: consume or copy it before the next feed. `flow_controlled_length` is what
    this chunk costs in flow-control window (payload plus padding for padded frames)."""

    stream_id: int
    data: bytes | memoryview
    end_stream: bool
    flow_controlled_length: int


@dataclass(frozen=True, slots=True)
class HeadersReceived:
    """A complete, decoded header block (HEADERS plus any CONTINUATION)."""

    stream_id: int
    headers: list[tuple[bytes, bytes]]
    end_stream: bool


@dataclass(frozen=True, slots=True)
class SettingsReceived:
    settings: tuple[tuple[int, int], ...]
    ack: bool


@dataclass(frozen=True, slots=True)
class WindowUpdateReceived:
    stream_id: int
    increment: int


@dataclass(frozen=True, slots=True)
class RstStreamReceived:
    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class PingReceived:
    opaque: bytes
    ack: bool


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    last_stream_id: int
    error_code: int
    debug_data: bytes


@dataclass(frozen=True, slots=True)
class PriorityReceived:
    """Parsed for validation only: HBONE ignores priorities (RFC 9113 deprecates them)."""

    stream_id: int


FrameEvent = Union[DataReceived, HeadersReceived, SettingsReceived, WindowUpdateReceived,
                   RstStreamReceived, PingReceived, GoAwayReceived, PriorityReceived]


# -- encoders -----------------------------------------------------------------------------

def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _HDR.pack(n >> 16, n & 0xFFFF, ftype, flags, stream_id) + payload


def data_frame_header(stream_id: int, length: int, end_stream: bool = False) -> bytes:
    """The 9-byte header of a DATA frame; the payload is written after it without copying."""
    return _HDR.pack(length >> 16, length & 0xFFFF, DATA, FLAG_END_STREAM if end_stream else 0, stream_id)


def settings_frame(settings: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in settings.items()))


def settings_ack_frame() -> bytes:
    return frame(SETTINGS, FLAG_ACK, 0)


def window_update_frame(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))


def rst_stream_frame(stream_id: int, error_code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, _U32.pack(error_code))


def goaway_frame(last_stream_id: int, error_code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, _GOAWAY.pack(last_stream_id, error_code) + debug)


def ping_frame(opaque: bytes, ack: bool = False) -> bytes:
    return frame(PING, FLAG_ACK if ack else 0, 0, opaque)


def headers_frames(stream_id: int, block: bytes, *, end_stream: bool, max_frame_size: int) -> bytes:
    """HEADERS (+ CONTINUATION when `block` exceeds the peer's MAX_FRAME_SIZE)."""
    flags = FLAG_END_STREAM if end_stream else 0
    if len(block) <= max_frame_size:
        return frame(HEADERS, flags | FLAG_END_HEADERS, stream_id, block)
    parts = [block[i:i + max_frame_size] for i in range(0, len(block), max_frame_size)]
    out = [frame(HEADERS, flags, stream_id, parts[0])]
    for i, part in enumerate(parts[1:], 2):
        out.append(frame(CONTINUATION, FLAG_END_HEADERS if i == len(parts) else 0, stream_id, part))
    return b"".join(out)


# HPACK (RFC 7541) static-table indices of the names we send.
_IDX_AUTHORITY, _IDX_METHOD, _IDX_STATUS = 1, 2, 8
_STATUS_200_INDEXED = b"\x88"              # static entry 8 is exactly ":status: 200"


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal_indexed_name(index: int, value: bytes) -> bytes:
    """Literal header field without indexing, name from the static table (§6.2.2)."""
    return _hpack_int(index, 4) + _hpack_int(len(value), 7) + value


def _literal_new_name(name: bytes, value: bytes) -> bytes:
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


_BAD_VALUE_BYTES = (b"\r", b"\n", b"\x00")


def _encode_regular(headers) -> bytes:
    out = []
    for name, value in headers:
        n = name.encode("ascii") if isinstance(name, str) else name
        v = value.encode("latin-1") if isinstance(value, str) else value
        if not n or n.startswith(b":") or n != n.lower() or any(c in n for c in b" \t\r\n\x00:"):
            raise ValueError(f"invalid header name {name!r}")
        if any(b in v for b in _BAD_VALUE_BYTES):
            raise ValueError(f"invalid header value for {name!r}")
        out.append(_literal_new_name(n, v))
    return b"".join(out)


def encode_connect_block(authority: str, headers=()) -> bytes:
    """Header block of an HBONE request: exactly :method CONNECT and :authority (RFC 9113
    §8.5: no :scheme, no :path), then regular headers (baggage, forwarded, traceparent...)."""
    auth = authority.encode("ascii")
    if not auth or any(b in auth for b in _BAD_VALUE_BYTES + (b" ",)):
        raise ValueError(f"invalid authority {authority!r}")
    return (_literal_indexed_name(_IDX_METHOD, b"CONNECT") + _literal_indexed_name(_IDX_AUTHORITY, auth)
            + _encode_regular(headers))


def encode_status_block(status: int, headers=()) -> bytes:
    if not 100 <= status <= 999:
        raise ValueError(f"invalid status {status}")
    head = _STATUS_200_INDEXED if status == 200 else _literal_indexed_name(_IDX_STATUS, b"%d" % status)
    return head + _encode_regular(headers)


# -- parser -------------------------------------------------------------------------------

MAX_CONTINUATIONS = 64
"""CONTINUATION frames allowed in one header block: zero-length ones cost nothing towards the
size bound, so without a count a peer could send them forever (the "CONTINUATION flood")."""

_STREAM_REQUIRED = frozenset((DATA, HEADERS, PRIORITY, RST_STREAM, CONTINUATION, PUSH_PROMISE))
_STREAM_FORBIDDEN = frozenset((SETTINGS, PING, GOAWAY))


class FrameParser:
    """Turns the inbound byte stream into frame events (see the module docstring).

    `max_frame_size` is the MAX_FRAME_SIZE we advertised; `max_header_list_size` bounds the
    decoded header list (and, doubled, the raw header block being reassembled). DATA frames
    that carry nothing (no payload, no END_STREAM) are dropped, at most
    `max_consecutive_empty_frames` in a row (until DATA with a payload or HEADERS).
    """

    def __init__(self, *, expect_preface: bool, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 max_header_list_size: int = 65_536, max_consecutive_empty_frames: int = 100) -> None:
        self.max_frame_size = max_frame_size
        self.max_consecutive_empty_frames = max_consecutive_empty_frames
        self._empty = 0
        self._max_block = 2 * max_header_list_size
        self._decoder = hpack.Decoder(max_header_list_size=max_header_list_size)
        self._preface_left = len(PREFACE) if expect_preface else 0
        self._buf = b""
        # Cut-through state of the DATA frame whose payload is being delivered.
        self._data_left = 0
        self._data_sid = 0
        self._data_end = False
        # Header block being reassembled: stream id (0 = none), END_STREAM, fragments.
        self._block_sid = 0
        self._block_end_stream = False
        self._block_frags: list[bytes] = []
        self._block_size = 0
        self.frames_seen = 0

    @property
    def header_block_open(self) -> bool:
        """A HEADERS frame arrived and its block is not complete yet (END_HEADERS pending)."""
        return self._block_sid != 0

    @property
    def buffered(self) -> int:
        """Bytes held back waiting for the rest of a frame (bounded by max_frame_size + 9)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[FrameEvent]:
        n = len(data)
        # A read that is exactly one whole unpadded DATA frame, with no state carried over (a
        # request or response of its own at low load): its event without the general loop.
        # Anything else, including every malformed case, takes the loop below.
        if (n > 9 and not self._buf and not self._data_left and not self._preface_left and not self._block_sid
                and data[3] == DATA and not data[4] & FLAG_PADDED):
            hi, lo, _, flags, sid = _HDR.unpack_from(data, 0)
            length = (hi << 16) | lo
            sid &= 0x7FFFFFFF
            if length == n - 9 and sid and length <= self.max_frame_size:
                self.frames_seen += 1
                self._empty = 0
                return [DataReceived(sid, memoryview(data)[9:], bool(flags & FLAG_END_STREAM), length)]
        if self._buf:
            data = self._buf + data
            self._buf = b""
        n = len(data)
        off = 0
        events: list[FrameEvent] = []
        if self._preface_left:
            k = min(self._preface_left, n)
            start = len(PREFACE) - self._preface_left
            if data[:k] != PREFACE[start:start + k]:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "bad_preface",
                                    "client connection preface missing (not an HTTP/2 client?)")
            self._preface_left -= k
            off = k
        mv = memoryview(data)
        append = events.append
        unpack = _HDR.unpack_from
        while off < n:
            if self._data_left:                       # cut-through of a DATA payload
                k = n - off
                left = self._data_left
                if k >= left:
                    k = left
                    append(DataReceived(self._data_sid, mv[off:off + k], self._data_end, k))
                else:
                    append(DataReceived(self._data_sid, mv[off:off + k], False, k))
                self._data_left = left - k
                off += k
                continue
            if n - off < 9:
                break
            hi, lo, ftype, flags, sid = unpack(data, off)
            length = (hi << 16) | lo
            sid &= 0x7FFFFFFF                         # reserved bit is ignored (§4.1)
            if length > self.max_frame_size:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "frame_too_large",
                                    f"frame of {length} bytes exceeds MAX_FRAME_SIZE {self.max_frame_size}")
            if self._block_sid and (ftype != CONTINUATION or sid != self._block_sid):
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "expected_continuation",
                                    "header block interrupted by another frame")
            if ftype == DATA and not flags & FLAG_PADDED:
                if sid == 0:
                    raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "frame_on_stream_zero", "DATA on stream 0")
                off += 9
                self.frames_seen += 1
                if length:
                    self._empty = 0
                    if n - off >= length:             # the whole payload is here: no cut-through state
                        append(DataReceived(sid, mv[off:off + length], bool(flags & FLAG_END_STREAM), length))
                        off += length
                        continue
                    self._data_left, self._data_sid = length, sid
                    self._data_end = bool(flags & FLAG_END_STREAM)
                elif flags & FLAG_END_STREAM:
                    append(DataReceived(sid, b"", True, 0))
                else:
                    self._empty += 1
                    if self._empty > self.max_consecutive_empty_frames:
                        raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "empty_frame_flood",
                                            f"more than {self.max_consecutive_empty_frames} empty DATA "
                                            "frames in a row")
                continue
            if n - off < 9 + length:
                break
            # A read buffer is reused once nothing refers to it: what outlives this call
            # (a header block's fragments, a PING to echo) must be bytes.
            payload = data[off + 9:off + 9 + length] if type(data) is bytes else bytes(mv[off + 9:off + 9 + length])
            off += 9 + length
            self.frames_seen += 1
            ev = self._control(ftype, flags, sid, payload)
            if ev is not None:
                append(ev)
        if off < n:
            self._buf = data[off:] if type(data) is bytes else bytes(mv[off:])
        return events

    # Every non-cut-through frame, complete. Returns an event or None (ignored/partial).
    def _control(self, ftype: int, flags: int, sid: int, p: bytes) -> FrameEvent | None:
        if sid == 0 and ftype in _STREAM_REQUIRED:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "frame_on_stream_zero",
                                f"frame type {ftype} on stream 0")
        if sid != 0 and ftype in _STREAM_FORBIDDEN:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "frame_on_stream",
                                f"frame type {ftype} must be on stream 0")
        if ftype == DATA:                             # padded DATA: the slow path
            body = _strip_padding(p)
            return DataReceived(sid, body, bool(flags & FLAG_END_STREAM), len(p))
        if ftype == HEADERS:
            self._empty = 0
            if flags & FLAG_PADDED:
                p = _strip_padding(p)
            if flags & FLAG_PRIORITY:
                if len(p) < 5:
                    raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "bad_frame_size", "HEADERS priority truncated")
                p = p[5:]
            self._block_sid = sid
            self._block_end_stream = bool(flags & FLAG_END_STREAM)
            self._block_frags = [p]
            self._block_size = len(p)
            return self._maybe_end_block(flags)
        if ftype == CONTINUATION:
            if not self._block_sid:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "unexpected_continuation",
                                    "CONTINUATION without a preceding HEADERS")
            self._block_frags.append(p)
            self._block_size += len(p)
            if len(self._block_frags) > MAX_CONTINUATIONS + 1:
                raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "too_many_continuations",
                                    f"header block spread over more than {MAX_CONTINUATIONS} CONTINUATION frames")
            return self._maybe_end_block(flags)
        if ftype == SETTINGS:
            if flags & FLAG_ACK:
                if p:
                    raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "bad_frame_size", "SETTINGS ACK with payload")
                return SettingsReceived((), True)
            if len(p) % 6:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "bad_frame_size", "SETTINGS length not a multiple of 6")
            return SettingsReceived(tuple(_SETTING.iter_unpack(p)), False)
        if ftype == WINDOW_UPDATE:
            if len(p) != 4:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "bad_frame_size", "WINDOW_UPDATE length != 4")
            return WindowUpdateReceived(sid, _U32.unpack(p)[0] & 0x7FFFFFFF)
        if ftype == RST_STREAM:
            if len(p) != 4:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "bad_frame_size", "RST_STREAM length != 4")
            return RstStreamReceived(sid, _U32.unpack(p)[0])
        if ftype == PING:
            if len(p) != 8:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "bad_frame_size", "PING length != 8")
            return PingReceived(p, bool(flags & FLAG_ACK))
        if ftype == GOAWAY:
            if len(p) < 8:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "bad_frame_size", "GOAWAY shorter than 8 bytes")
            last, code = _GOAWAY.unpack_from(p)
            return GoAwayReceived(last & 0x7FFFFFFF, code, p[8:])
        if ftype == PRIORITY:
            if len(p) != 5:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "bad_frame_size", "PRIORITY length != 5")
            return PriorityReceived(sid)
        if ftype == PUSH_PROMISE:
            # We advertise ENABLE_PUSH=0 and servers never receive pushes (§8.4).
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "push_promise", "PUSH_PROMISE is not allowed")
        return None                                   # unknown frame types are ignored (§4.1)

    def _maybe_end_block(self, flags: int) -> HeadersReceived | None:
        if self._block_size > self._max_block:
            raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "header_list_too_large",
                                f"header block over {self._max_block} bytes")
        if not flags & FLAG_END_HEADERS:
            return None
        sid, frags = self._block_sid, self._block_frags
        self._block_sid, self._block_frags, self._block_size = 0, [], 0
        try:
            headers = self._decoder.decode(b"".join(frags) if len(frags) > 1 else frags[0], raw=True)
        except hpack.OversizedHeaderListError:
            raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "header_list_too_large",
                                "decoded header list exceeds MAX_HEADER_LIST_SIZE") from None
        except (hpack.HPACKError, ValueError, IndexError, UnicodeError) as e:
            raise ProtocolError(ErrorCode.COMPRESSION_ERROR, "hpack_error", f"HPACK decoding failed: {e}") from None
        return HeadersReceived(sid, headers, self._block_end_stream)


def _strip_padding(p: bytes) -> bytes:
    if not p or p[0] >= len(p):
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "bad_padding", "padding longer than the frame payload")
    return p[1:len(p) - p[0]]
