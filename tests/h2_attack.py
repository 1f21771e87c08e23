"""Raw HTTP/2 frames of the abuse patterns a compromised mesh peer can send (rapid reset, floods), and a GOAWAY reader."""
from __future__ import annotations

import struct

from mesh.hbone import frames as f

AUTHORITY = "127.0.0.1:80"


def preface() -> bytes:
    """Client magic + an empty SETTINGS (what every attack starts with)."""
    return f.PREFACE + f.settings_frame({})


def connect(sid: int, authority: str = AUTHORITY, *, end_stream: bool = False) -> bytes:
    return f.headers_frames(sid, f.encode_connect_block(authority), end_stream=end_stream,
                            max_frame_size=f.DEFAULT_MAX_FRAME_SIZE)


def rst(sid: int, code: int = f.ErrorCode.CANCEL) -> bytes:
    return f.rst_stream_frame(sid, code)


def ping(i: int) -> bytes:
    return f.ping_frame(struct.pack(">Q", i))


def settings() -> bytes:
    return f.settings_frame({f.Setting.MAX_FRAME_SIZE: f.DEFAULT_MAX_FRAME_SIZE})


def empty_data(sid: int) -> bytes:
    return f.frame(f.DATA, 0, sid)


def window_update(sid: int = 0, inc: int = 1) -> bytes:
    return f.window_update_frame(sid, inc)


def rapid_reset(first_sid: int, n: int) -> list[bytes]:
    """n CONNECT + RST_STREAM(CANCEL) pairs, one pair per element."""
    return [connect(s) + rst(s) for s in range(first_sid, first_sid + 2 * n, 2)]


class FrameReader:
    """Splits what a server sent into (type, flags, stream id, payload); finds its GOAWAY."""

    def __init__(self) -> None:
        self.buf = b""
        self.frames: list[tuple[int, int, int, bytes]] = []

    def feed(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 9:
            n = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + n:
                break
            t, fl, sid = self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            self.frames.append((t, fl, sid, self.buf[9:9 + n]))
            self.buf = self.buf[9 + n:]

    def goaway(self) -> tuple[int, int, bytes] | None:
        """(last stream id, error code, debug data) of the first GOAWAY, if any."""
        for t, _, _, p in self.frames:
            if t == f.GOAWAY:
                last, code = struct.unpack(">LL", p[:8])
                return last & 0x7FFFFFFF, code, p[8:]
        return None

    def count(self, ftype: int, flags: int | None = None) -> int:
        return sum(1 for t, fl, _, _ in self.frames if t == ftype and (flags is None or fl & flags == flags))
