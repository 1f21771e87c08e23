"""Trace context on the wire: W3C `traceparent`/`tracestate` and B3 (multi-header and single), read and written (pure).

What Envoy's tracers do with them in Istio, reduced to data:
  * `extract(headers)`: the caller's context, if any. A valid `traceparent` wins, then `b3`,
    then `x-b3-traceid` + `x-b3-spanid`; an invalid header counts as absent (W3C: the
    receiver restarts the trace). B3 may carry a sampling decision with no ids (`b3: 0`,
    `x-b3-sampled: 1`, `x-b3-flags: 1` = debug): that decision is kept without a parent.
  * `decide(incoming, percentage, rng)`: the new span. A parent's trace id and sampled flag
    are honoured (Envoy follows the caller's decision); with no decision (no context, or B3
    ids without a sampling flag, which defer it) it is drawn: sampled with probability
    `percentage` / 100 (Telemetry's randomSamplingPercentage).
  * `propagate(headers, decision, formats)`: the request's trace headers replaced by the new
    span's: `traceparent` always, and the B3 forms the request came with, so an app that
    propagates B3 keeps working; `tracestate` is passed on untouched (no vendor entry added).

ztunnel reads and writes only `traceparent` on HBONE CONNECT (`parse_traceparent`,
`format_traceparent`): it never parses HTTP.
"""
from __future__ import annotations

import enum
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["SpanContext", "Format", "Incoming", "TraceDecision", "TRACE_HEADERS", "parse_traceparent",
           "format_traceparent", "parse_b3_single", "extract", "decide", "propagate", "new_root", "unsampled"]

TRACE_HEADERS = frozenset({b"traceparent", b"b3", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid",
                           b"x-b3-sampled", b"x-b3-flags"})
"""The headers `propagate` replaces (`tracestate` is kept as it came)."""

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_HEX16_32 = re.compile(r"[0-9a-f]{16}(?:[0-9a-f]{16})?")
_MAX_TRACESTATE = 512
"""W3C: a receiver may drop a longer `tracestate` (it must keep at least 512 characters)."""


@dataclass(frozen=True, slots=True)
class SpanContext:
    """One span's identity: a 128-bit trace id, a 64-bit span id (both non-zero), and whether
    the trace is sampled (recorded and exported)."""

    trace_id: int
    span_id: int
    sampled: bool


class Format(enum.Enum):
    """A propagation format the request carried (and that is written back upstream)."""

    W3C = "w3c"
    B3 = "b3"
    """`x-b3-traceid`, `x-b3-spanid`, `x-b3-parentspanid`, `x-b3-sampled`, `x-b3-flags`."""
    B3_SINGLE = "b3-single"
    """`b3: {traceid}-{spanid}[-{sampling}[-{parentspanid}]]`, or `b3: {sampling}` alone."""


@dataclass(frozen=True, slots=True)
class Incoming:
    """The trace context a request came with."""

    context: SpanContext | None = None
    """The caller's span (the parent of ours), None when the request has no valid one."""
    sampled: bool | None = None
    """The caller's sampling decision, None when it made none (then our percentage decides)."""
    formats: frozenset[Format] = frozenset()
    """The formats present (valid or not): the B3 ones are written back."""
    tracestate: str = ""
    """`tracestate`, kept with a valid `traceparent` only (W3C), joined if it came as several fields."""


@dataclass(frozen=True, slots=True)
class TraceDecision:
    """The span the waypoint makes for one request."""

    context: SpanContext
    """Ours: forwarded upstream as the parent of whatever comes next."""
    parent_span_id: int = 0
    """The caller's span id; 0 for a trace that starts here."""
    tracestate: str = ""

    @property
    def sampled(self) -> bool:
        return self.context.sampled


def parse_traceparent(value: str) -> SpanContext | None:
    """A W3C `traceparent`, or None if it is not a valid one (version `ff`, all-zero ids,
    uppercase hex, a version-00 value with extra fields). A later version's extra fields are
    ignored, as the spec asks."""
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    version, trace, span, flags = m.groups()
    if version == "ff" or (version == "00" and len(value) != 55) or (len(value) > 55 and value[55] != "-"):
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, bool(int(flags, 16) & 1))


def format_traceparent(ctx: SpanContext) -> str:
    """`00-{trace:032x}-{span:016x}-{flags:02x}` (version 00, only the sampled flag)."""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{'01' if ctx.sampled else '00'}"


def _b3_sampling(value: str) -> bool | None:
    """A B3 sampling field: `1`/`d` sample (d = debug), `0` do not; `true`/`false` are the
    legacy spellings of x-b3-sampled. None for anything else."""
    return {"1": True, "d": True, "true": True, "0": False, "false": False}.get(value)


def parse_b3_single(value: str) -> tuple[SpanContext | None, bool | None] | None:
    """`b3` as (context, sampling decision), or None if it is malformed. A 64-bit trace id
    is widened to 128 bits (high bits zero), as Envoy does."""
    parts = value.split("-")
    if len(parts) == 1:                       # a sampling decision alone
        s = _b3_sampling(value) if value in ("0", "1", "d") else None
        return None if s is None else (None, s)
    if len(parts) > 4 or not _HEX16_32.fullmatch(parts[0]) or not _HEX16.fullmatch(parts[1]):
        return None
    sampled: bool | None = None
    if len(parts) >= 3:
        if parts[2] not in ("0", "1", "d"):
            return None
        sampled = _b3_sampling(parts[2])
    if len(parts) == 4 and not _HEX16.fullmatch(parts[3]):
        return None
    trace_id, span_id = int(parts[0], 16), int(parts[1], 16)
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, bool(sampled)), sampled


def _b3_multi(h: dict[bytes, str]) -> tuple[SpanContext | None, bool | None]:
    sampled = True if h.get(b"x-b3-flags") == "1" else _b3_sampling(h.get(b"x-b3-sampled", "").lower())
    trace, span = h.get(b"x-b3-traceid", ""), h.get(b"x-b3-spanid", "")
    if not (_HEX16_32.fullmatch(trace) and _HEX16.fullmatch(span)):
        return None, sampled
    trace_id, span_id = int(trace, 16), int(span, 16)
    if not trace_id or not span_id:
        return None, sampled
    return SpanContext(trace_id, span_id, bool(sampled)), sampled


def extract(headers: Iterable[tuple[bytes, bytes]]) -> Incoming:
    """The trace context of a request's headers (lowercase names, as the codecs give them)."""
    h: dict[bytes, str] = {}
    states: list[str] = []
    for n, v in headers:
        if n == b"tracestate":
            states.append(v.decode("latin-1").strip())
        elif n in TRACE_HEADERS and n not in h:   # a repeated field: the first counts
            h[n] = v.decode("latin-1").strip()
    if not h:
        return Incoming()
    formats = set()
    if b"traceparent" in h:
        formats.add(Format.W3C)
    if b"b3" in h:
        formats.add(Format.B3_SINGLE)
    if h.keys() & {b"x-b3-traceid", b"x-b3-spanid", b"x-b3-sampled", b"x-b3-flags", b"x-b3-parentspanid"}:
        formats.add(Format.B3)
    fs = frozenset(formats)
    if Format.W3C in fs:
        ctx = parse_traceparent(h[b"traceparent"])
        if ctx is not None:
            state = ",".join(s for s in states if s)
            return Incoming(ctx, ctx.sampled, fs, state if len(state) <= _MAX_TRACESTATE else "")
    if Format.B3_SINGLE in fs:
        single = parse_b3_single(h[b"b3"])
        if single is not None:
            return Incoming(single[0], single[1], fs)
    if Format.B3 in fs:
        ctx, sampled = _b3_multi(h)
        return Incoming(ctx, sampled, fs)
    return Incoming(formats=fs)


def _nonzero(rng: random.Random, bits: int) -> int:
    while True:
        v = rng.getrandbits(bits)
        if v:
            return v


def new_root(rng: random.Random, sampled: bool) -> SpanContext:
    """A new trace's first span (ztunnel's per-connection traceparent, a waypoint's root span)."""
    return SpanContext(_nonzero(rng, 128), _nonzero(rng, 64), sampled)


def decide(incoming: Incoming, percentage: float, rng: random.Random) -> TraceDecision:
    """The waypoint's span for a request: a child of the caller's span in the caller's trace
    and with its sampling decision, else a new trace sampled at `percentage` (0..100)."""
    sampled = incoming.sampled
    if sampled is None:   # draw only when no one decided (B3 ids without a flag defer to us)
        sampled = percentage >= 100.0 or (percentage > 0.0 and rng.random() * 100.0 < percentage)
    parent = incoming.context
    if parent is not None:
        return TraceDecision(SpanContext(parent.trace_id, _nonzero(rng, 64), sampled),
                             parent.span_id, incoming.tracestate)
    return TraceDecision(new_root(rng, sampled))


def propagate(headers: Iterable[tuple[bytes, bytes]], decision: TraceDecision,
              formats: frozenset[Format]) -> list[tuple[bytes, bytes]]:
    """`headers` with their trace headers replaced by `decision`'s span: `traceparent`
    always, the B3 forms in `formats` too. `tracestate` stays as it came."""
    out = [(n, v) for n, v in headers if n not in TRACE_HEADERS]
    ctx = decision.context
    out.append((b"traceparent", format_traceparent(ctx).encode()))
    trace, span, flag = f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", "1" if ctx.sampled else "0"
    parent = f"{decision.parent_span_id:016x}" if decision.parent_span_id else ""
    if Format.B3 in formats:
        out += [(b"x-b3-traceid", trace.encode()), (b"x-b3-spanid", span.encode()),
                (b"x-b3-sampled", flag.encode())]
        if parent:
            out.append((b"x-b3-parentspanid", parent.encode()))
    if Format.B3_SINGLE in formats:
        out.append((b"b3", f"{trace}-{span}-{flag}{'-' + parent if parent else ''}".encode()))
    return out


def unsampled(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`headers` with their trace context kept and its sampling decision turned to "no": what
    Istio's mirror policy (`trace_sampled: false`) makes of a mirrored copy's headers."""
    out = []
    for n, v in headers:
        if n == b"traceparent" and (ctx := parse_traceparent(v.decode("latin-1"))) is not None:
            v = format_traceparent(SpanContext(ctx.trace_id, ctx.span_id, False)).encode()
        elif n == b"x-b3-sampled":
            v = b"0"
        elif n == b"x-b3-flags":
            continue
        elif n == b"b3":
            parts = v.split(b"-")
            if len(parts) == 1:
                v = b"0"
            elif len(parts) >= 3:
                v = b"-".join([*parts[:2], b"0", *parts[3:]])
            else:
                v = v + b"-0"
        out.append((n, v))
    return out
