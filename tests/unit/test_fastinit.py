"""fast_init gives a frozen slots dataclass the same constructor and semantics, or refuses the class."""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field

import pytest

from mesh.fastinit import fast_init
from mesh.hbone.frames import DataReceived
from waypoint.http import Body, EndOfMessage, RequestHead, ResponseHead
from waypoint.resilience.retry import AttemptOutcome, OutcomeKind
from waypoint.telemetry import RequestLabels, RequestResult


def _pair():
    def make():
        @dataclass(frozen=True, slots=True)
        class P:
            a: int
            b: bytes = b"x"
            c: tuple = field(default=(), kw_only=True)
            d: str = field(kw_only=True)
        return P
    return make(), fast_init(make())


def test_same_signature_values_and_semantics():
    plain, fast = _pair()
    assert inspect.signature(fast.__init__) == inspect.signature(plain.__init__)
    for args, kw in [((1,), {"d": "z"}), ((1, b"y"), {"c": (1,), "d": ""}), ((), {"a": 2, "d": "q"})]:
        p, f = plain(*args, **kw), fast(*args, **kw)
        assert dataclasses.astuple(p) == dataclasses.astuple(f)
        assert repr(f) == repr(p).replace(plain.__qualname__, fast.__qualname__)
        assert f == fast(*args, **kw) and hash(f) == hash(fast(*args, **kw))
    f = fast(1, d="z")
    assert dataclasses.replace(f, b=b"n").b == b"n"
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.a = 2  # type: ignore[misc]
    for bad in [lambda: fast(d="z"), lambda: fast(1, b"y", (), "d"), lambda: fast(1, d="z", e=0)]:
        with pytest.raises(TypeError):
            bad()


def test_the_per_request_classes_still_build_as_before():
    h = RequestHead(method=b"GET", target=b"/a?b", path=b"/a", query=b"b", headers=((b"host", b"h"),))
    assert (h.method, h.target, h.path, h.query, h.http_version, h.keep_alive, h.content_length) == \
        (b"GET", b"/a?b", b"/a", b"b", "1.1", True, None)
    assert ResponseHead(status=200).status == 200 and Body(b"x").data == b"x" and EndOfMessage().trailers == ()
    assert DataReceived(1, b"d", False, 1) == DataReceived(stream_id=1, data=b"d", end_stream=False,
                                                           flow_controlled_length=1)
    assert AttemptOutcome(kind=OutcomeKind.RESPONSE, status=200).status == 200
    assert RequestLabels().reporter == "waypoint"
    with pytest.raises(TypeError):
        RequestResult(labels=RequestLabels(), start_time=0.0, no_such_field=1)  # type: ignore[call-arg]


def test_refuses_what_it_cannot_reproduce():
    @dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclass(slots=True)
    class NotFrozen:
        a: int

    @dataclass(frozen=True, slots=True)
    class Factory:
        a: list = field(default_factory=list)

    @dataclass(frozen=True, slots=True)
    class Post:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclass(frozen=True, slots=True)
    class NoInit:
        a: int = field(default=0, init=False)

    for cls in (NoSlots, NotFrozen, Factory, Post, NoInit, int):
        with pytest.raises(TypeError, match="fast_init"):
            fast_init(cls)
