"""A tiny pure-Python line plotter writing PNG (zlib + struct; no matplotlib needed offline).

    write_png(path, [Panel("RSS (MB)", {"ztunnel n1": [(x, y), ...], ...}), ...], xlabel="minutes")

One panel per metric, stacked; each with a title, its y range as labels, a grid, one
coloured line per series and a legend. Text uses a built-in 3x5 pixel font (upper case,
digits, a few signs), drawn at 2x. Good enough to see at a glance whether a line is flat.
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field

__all__ = ["Panel", "write_png", "render"]

_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", "A": "010101111101101", "B": "110101110101110",
    "C": "011100100100011", "D": "110101101101110", "E": "111100110100111", "F": "111100110100100",
    "G": "011100101101011", "H": "101101111101101", "I": "111010010010111", "J": "001001001101010",
    "K": "101101110101101", "L": "100100100100111", "M": "101111111101101", "N": "110101101101101",
    "O": "010101101101010", "P": "110101110100100", "Q": "010101101110011", "R": "110101110101101",
    "S": "011100010001110", "T": "111010010010010", "U": "101101101101111", "V": "101101101101010",
    "W": "101101111111101", "X": "101101010101101", "Y": "101101010010010", "Z": "111001010100111",
    ".": "000000000000010", "-": "000000111000000", ":": "000010000010000", "/": "001001010100100",
    "(": "010100100100010", ")": "010001001001010", "%": "101001010100101", "_": "000000000000111",
    "=": "000111000111000", "+": "000010111010000", ",": "000000000010100", " ": "000000000000000",
}
_SCALE = 2
_PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (23, 190, 207), (188, 189, 34), (127, 127, 127)]


@dataclass
class Panel:
    title: str
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


class _Canvas:
    def __init__(self, w: int, h: int):
        self.w, self.h = w, h
        self.px = bytearray(b"\xff" * (w * h * 3))

    def dot(self, x: int, y: int, c: tuple[int, int, int]) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = (y * self.w + x) * 3
            self.px[i:i + 3] = bytes(c)

    def rect(self, x0: int, y0: int, x1: int, y1: int, c) -> None:
        for y in range(max(0, y0), min(self.h, y1)):
            i = (y * self.w + max(0, x0)) * 3
            n = max(0, min(self.w, x1) - max(0, x0))
            self.px[i:i + 3 * n] = bytes(c) * n

    def line(self, x0: int, y0: int, x1: int, y1: int, c, thick: int = 1) -> None:
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        for _ in range(dx - dy + 1):   # bounded: one step per pixel of the longer axis
            for t in range(thick):
                self.dot(x0, y0 + t, c)
            if x0 == x1 and y0 == y1:
                break
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, s: str, c=(0, 0, 0)) -> int:
        for ch in s.upper():
            g = _GLYPHS.get(ch, _GLYPHS["-"])
            for r in range(5):
                for col in range(3):
                    if g[r * 3 + col] == "1":
                        self.rect(x + col * _SCALE, y + r * _SCALE, x + (col + 1) * _SCALE,
                                  y + (r + 1) * _SCALE, c)
            x += 4 * _SCALE
        return x

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def render(panels: list[Panel], *, width: int = 1000, panel_height: int = 200, xlabel: str = "") -> bytes:
    """The PNG bytes of the stacked panels (x shared: the union of every series' range)."""
    left, right, top_pad, bottom_pad = 80, 20, 22, 22
    h = max(1, len(panels)) * (panel_height + top_pad + bottom_pad) + 10
    cv = _Canvas(width, h)
    xs = [x for p in panels for pts in p.series.values() for x, _ in pts]
    colour = {n: _PALETTE[i % len(_PALETTE)] for i, n in enumerate(sorted({n for p in panels for n in p.series}))}
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x1 <= x0:
        x1 = x0 + 1.0
    for i, p in enumerate(panels):
        top = 10 + i * (panel_height + top_pad + bottom_pad) + top_pad
        bot = top + panel_height
        cv.text(left, top - 16, p.title)
        ys = [y for pts in p.series.values() for _, y in pts if math.isfinite(y)]
        y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
        if y0 > 0 and y0 < 0.5 * y1:
            y0 = 0.0       # show growth against zero unless the range is narrow
        pad = (y1 - y0) * 0.05 or max(1.0, abs(y1) * 0.05)
        y0, y1 = (y0 - pad if y0 != 0 else 0.0), y1 + pad
        for g in range(5):   # grid and y labels
            yy = bot - round(g * panel_height / 4)
            cv.line(left, yy, width - right, yy, (225, 225, 225))
            cv.text(4, yy - 5, _fmt(y0 + (y1 - y0) * g / 4), (90, 90, 90))
        cv.line(left, top, left, bot, (0, 0, 0))
        cv.line(left, bot, width - right, bot, (0, 0, 0))
        for g in range(6):   # x labels
            xx = left + round(g * (width - left - right) / 5)
            cv.line(xx, bot, xx, bot + 4, (0, 0, 0))
            cv.text(xx - 8, bot + 7, _fmt(x0 + (x1 - x0) * g / 5), (90, 90, 90))
        if xlabel and i == len(panels) - 1:
            cv.text(4, bot + 9, xlabel, (90, 90, 90))   # under the y labels, left of the x ones
        lx = left + 8 * len(p.title) + 20
        for name, pts in sorted(p.series.items()):
            c = colour[name]   # one colour per series name across panels
            prev = None
            for x, y in pts:
                if not math.isfinite(y):
                    prev = None
                    continue
                px = left + round((x - x0) / (x1 - x0) * (width - left - right))
                py = bot - round((y - y0) / (y1 - y0) * panel_height)
                if prev is not None:
                    cv.line(prev[0], prev[1], px, py, c, thick=2)
                prev = (px, py)
            cv.rect(lx, top - 16, lx + 10, top - 6, c)
            lx = cv.text(lx + 14, top - 16, name) + 14
    return cv.png()


def write_png(path: str, panels: list[Panel], **kw) -> None:
    with open(path, "wb") as f:
        f.write(render(panels, **kw))
