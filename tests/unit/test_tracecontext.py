"""Trace headers read and written: W3C traceparent/tracestate, B3 multi and single, the sampling decision (tables)."""
from __future__ import annotations

import random

import pytest

from mesh.tracecontext import (Format, Incoming, SpanContext, TraceDecision, decide, extract, format_traceparent,
                               parse_b3_single, parse_traceparent, propagate)

T = "4bf92f3577b34da6a3ce929d0e0e4736"
S = "00f067aa0ba902b7"
TI, SI = int(T, 16), int(S, 16)


@pytest.mark.parametrize("value, expected", [
    (f"00-{T}-{S}-01", SpanContext(TI, SI, True)),
    (f"00-{T}-{S}-00", SpanContext(TI, SI, False)),
    (f"00-{T}-{S}-03", SpanContext(TI, SI, True)),            # other flag bits: sampled is bit 0
    (f"00-{T}-{S}-02", SpanContext(TI, SI, False)),
    (f"01-{T}-{S}-01-future", SpanContext(TI, SI, True)),     # a later version's extra field is ignored
    (f"00-{T}-{S}-01-extra", None),                            # version 00 has exactly four fields
    (f"ff-{T}-{S}-01", None),                                  # version ff is invalid
    (f"00-{'0' * 32}-{S}-01", None),                           # all-zero trace id
    (f"00-{T}-{'0' * 16}-01", None),                           # all-zero span id
    (f"00-{T.upper()}-{S}-01", None),                          # uppercase hex
    (f"00-{T[:-1]}-{S}-01", None),                             # short trace id
    (f"00-{T}-{S}", None),
    ("", None),
    ("garbage", None),
])
def test_parse_traceparent(value, expected):
    assert parse_traceparent(value) == expected


def test_format_traceparent_round_trips():
    for ctx in (SpanContext(TI, SI, True), SpanContext(1, 2, False)):
        assert parse_traceparent(format_traceparent(ctx)) == ctx
    assert format_traceparent(SpanContext(1, 2, False)) == f"00-{'0' * 31}1-{'0' * 15}2-00"


@pytest.mark.parametrize("value, expected", [
    (f"{T}-{S}-1", (SpanContext(TI, SI, True), True)),
    (f"{T}-{S}-0", (SpanContext(TI, SI, False), False)),
    (f"{T}-{S}-d", (SpanContext(TI, SI, True), True)),         # debug: sampled
    (f"{T}-{S}", (SpanContext(TI, SI, False), None)),          # no decision: ours decides
    (f"{T}-{S}-1-{'a' * 16}", (SpanContext(TI, SI, True), True)),
    (f"{'1' * 16}-{S}-1", (SpanContext(int("1" * 16, 16), SI, True), True)),  # 64-bit trace id
    ("0", (None, False)), ("1", (None, True)), ("d", (None, True)),              # a decision alone
    ("true", None), (f"{T}-{S}-2", None), (f"{T}-{S}-1-short", None), (f"{T}", None),
    (f"{T}-{S}-1-{'a' * 16}-x", None), (f"{'0' * 32}-{S}-1", None),
])
def test_parse_b3_single(value, expected):
    assert parse_b3_single(value) == expected


def H(**kw):
    return [(k.replace("_", "-").encode(), v.encode()) for k, v in kw.items()]


TP = f"00-{T}-{S}-01"


@pytest.mark.parametrize("headers, expected", [
    ([], Incoming()),
    (H(traceparent=TP), Incoming(SpanContext(TI, SI, True), True, frozenset({Format.W3C}))),
    (H(traceparent=TP, tracestate="a=1") + [(b"tracestate", b"b=2")],
     Incoming(SpanContext(TI, SI, True), True, frozenset({Format.W3C}), "a=1,b=2")),
    # An invalid traceparent: the B3 context beside it is used, tracestate is dropped.
    (H(traceparent="00-bad", tracestate="a=1", x_b3_traceid=T, x_b3_spanid=S, x_b3_sampled="1"),
     Incoming(SpanContext(TI, SI, True), True, frozenset({Format.W3C, Format.B3}))),
    # W3C wins over B3 when both are valid.
    (H(traceparent=TP, b3=f"{'1' * 32}-{'2' * 16}-0"),
     Incoming(SpanContext(TI, SI, True), True, frozenset({Format.W3C, Format.B3_SINGLE}))),
    (H(b3=f"{T}-{S}-0"), Incoming(SpanContext(TI, SI, False), False, frozenset({Format.B3_SINGLE}))),
    (H(b3="1"), Incoming(None, True, frozenset({Format.B3_SINGLE}))),
    (H(x_b3_traceid=T, x_b3_spanid=S), Incoming(SpanContext(TI, SI, False), None, frozenset({Format.B3}))),
    (H(x_b3_traceid=T, x_b3_spanid=S, x_b3_flags="1"), Incoming(SpanContext(TI, SI, True), True,
                                                                frozenset({Format.B3}))),
    (H(x_b3_sampled="0"), Incoming(None, False, frozenset({Format.B3}))),
    (H(x_b3_sampled="true", x_b3_traceid="zz", x_b3_spanid=S), Incoming(None, True, frozenset({Format.B3}))),
    (H(b3="nonsense"), Incoming(formats=frozenset({Format.B3_SINGLE}))),
    (H(host="svc", user_agent="x"), Incoming()),
])
def test_extract(headers, expected):
    assert extract(headers) == expected


class Draws(random.Random):
    """A random source whose `random()` answers are given (ids still random but seeded)."""

    def __init__(self, *values: float) -> None:
        super().__init__(1)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


@pytest.mark.parametrize("incoming, percentage, draw, sampled, parent", [
    (Incoming(SpanContext(TI, SI, True), True), 0.0, None, True, SI),       # the caller's decision wins
    (Incoming(SpanContext(TI, SI, False), False), 100.0, None, False, SI),
    (Incoming(SpanContext(TI, SI, False), None), 100.0, None, True, SI),    # B3 ids without a flag: ours
    (Incoming(SpanContext(TI, SI, False), None), 0.0, None, False, SI),
    (Incoming(None, True), 0.0, None, True, 0),                             # `b3: 1`: a root, sampled
    (Incoming(None, False), 100.0, None, False, 0),
    (Incoming(), 0.0, None, False, 0),                                      # 0 %: never (no draw)
    (Incoming(), 100.0, None, True, 0),                                     # 100 %: always (no draw)
    (Incoming(), 25.0, 0.24, True, 0),                                      # draw * 100 < 25
    (Incoming(), 25.0, 0.25, False, 0),
])
def test_decide(incoming, percentage, draw, sampled, parent):
    rng = Draws(*([] if draw is None else [draw]))
    d = decide(incoming, percentage, rng)
    assert d.sampled is sampled and d.parent_span_id == parent and rng.values == []
    assert d.context.span_id not in (0, SI)
    if incoming.context is not None:
        assert d.context.trace_id == TI
    else:
        assert d.context.trace_id != 0


def test_sampling_percentage_is_honoured_over_many_draws():
    rng = random.Random(5)
    hits = sum(decide(Incoming(), 10.0, rng).sampled for _ in range(10000))
    assert 900 <= hits <= 1100


NEW = 0x1111222233334444


@pytest.mark.parametrize("formats, parent, expected", [
    (frozenset(), 0, [(b"traceparent", f"00-{T}-{NEW:016x}-01")]),
    (frozenset({Format.W3C}), SI, [(b"traceparent", f"00-{T}-{NEW:016x}-01")]),
    (frozenset({Format.B3}), SI, [(b"traceparent", f"00-{T}-{NEW:016x}-01"), (b"x-b3-traceid", T),
                                  (b"x-b3-spanid", f"{NEW:016x}"), (b"x-b3-sampled", "1"),
                                  (b"x-b3-parentspanid", S)]),
    (frozenset({Format.B3}), 0, [(b"traceparent", f"00-{T}-{NEW:016x}-01"), (b"x-b3-traceid", T),
                                 (b"x-b3-spanid", f"{NEW:016x}"), (b"x-b3-sampled", "1")]),
    (frozenset({Format.B3_SINGLE}), SI, [(b"traceparent", f"00-{T}-{NEW:016x}-01"),
                                         (b"b3", f"{T}-{NEW:016x}-1-{S}")]),
    (frozenset({Format.B3_SINGLE}), 0, [(b"traceparent", f"00-{T}-{NEW:016x}-01"), (b"b3", f"{T}-{NEW:016x}-1")]),
])
def test_propagate_replaces_every_trace_header_and_keeps_the_rest(formats, parent, expected):
    headers = H(host="svc", traceparent=TP, b3="1", x_b3_traceid="x", x_b3_spanid="y", x_b3_parentspanid="z",
                x_b3_sampled="0", x_b3_flags="1", tracestate="a=1", x_request_id="r")
    out = propagate(headers, TraceDecision(SpanContext(TI, NEW, True), parent), formats)
    assert out[:3] == H(host="svc", tracestate="a=1", x_request_id="r")
    assert out[3:] == [(n, v.encode()) for n, v in expected]


def test_propagate_unsampled_writes_zero_flags():
    out = dict(propagate([], TraceDecision(SpanContext(TI, NEW, False), SI), frozenset({Format.B3, Format.B3_SINGLE})))
    assert out[b"traceparent"].endswith(b"-00") and out[b"x-b3-sampled"] == b"0"
    assert out[b"b3"] == f"{T}-{NEW:016x}-0-{S}".encode()


@pytest.mark.parametrize("headers, expected", [
    (H(traceparent=TP, host="a"), H(traceparent=f"00-{T}-{S}-00", host="a")),
    (H(traceparent="garbage"), H(traceparent="garbage")),
    (H(x_b3_traceid=T, x_b3_spanid=S, x_b3_sampled="1", x_b3_flags="1"),
     H(x_b3_traceid=T, x_b3_spanid=S, x_b3_sampled="0")),
    (H(b3=f"{T}-{S}-1-{'a' * 16}"), H(b3=f"{T}-{S}-0-{'a' * 16}")),
    (H(b3=f"{T}-{S}"), H(b3=f"{T}-{S}-0")),
    (H(b3="d"), H(b3="0")),
    (H(host="a"), H(host="a")),
])
def test_unsampled_keeps_the_context_and_drops_the_decision(headers, expected):
    from mesh.tracecontext import unsampled
    assert unsampled(headers) == expected
