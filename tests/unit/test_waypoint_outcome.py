"""The client's view when attempts end: Envoy's local replies for a failed last attempt and the retry flags (table)."""
from __future__ import annotations

import pytest

from waypoint.resilience.outcome import failure_reply, give_up_flag, with_flag
from waypoint.resilience.retry import GiveUpReason as G, OutcomeKind as K

RESET = b"upstream connect error or disconnect/reset before headers. "


@pytest.mark.parametrize("reason, flag", [
    (None, ""), (G.NOT_RETRIABLE, ""), (G.BODY_NOT_REPLAYABLE, ""), (G.DEADLINE, ""),
    (G.ATTEMPTS_EXHAUSTED, "URX"), (G.BUDGET_EXHAUSTED, "URX"), (G.RETRY_OVERFLOW, "UO"),
])
def test_give_up_flag(reason, flag):
    assert give_up_flag(reason) == flag


@pytest.mark.parametrize("kind, failure, reason, attempts, status, flags, details, body", [
    (K.CONNECT_FAILURE, "tunnel_connect_failed", G.NOT_RETRIABLE, 1, 503, "UF",
     "upstream_reset_before_response_started{remote_connection_failure}",
     RESET + b"reset reason: remote connection failure, transport failure reason: refused"),
    (K.CONNECT_FAILURE, "tunnel_connect_failed", G.ATTEMPTS_EXHAUSTED, 3, 503, "UF,URX",
     "upstream_reset_before_response_started{remote_connection_failure}",
     RESET + b"retried and the latest reset reason: remote connection failure, transport failure reason: refused"),
    (K.RESET, "connection_termination", G.NOT_RETRIABLE, 1, 503, "UC",
     "upstream_reset_before_response_started{connection_termination}", RESET + b"reset reason: connection termination"),
    (K.RESET, "connection_termination", G.BUDGET_EXHAUSTED, 2, 503, "UC,URX",
     "upstream_reset_before_response_started{connection_termination}",
     RESET + b"retried and the latest reset reason: connection termination"),
    (K.RESET, "connection_termination", G.RETRY_OVERFLOW, 1, 503, "UC,UO",
     "upstream_reset_before_response_started{connection_termination}", RESET + b"reset reason: connection termination"),
    (K.RESET, "protocol_error:bad_status_line", G.NOT_RETRIABLE, 1, 502, "UPE",
     "upstream_protocol_error{bad_status_line}", b"upstream sent an invalid HTTP response"),
    (K.PER_TRY_TIMEOUT, "per_try_timeout", G.NOT_RETRIABLE, 1, 504, "UT", "upstream_per_try_timeout",
     b"upstream request timeout"),
    (K.PER_TRY_TIMEOUT, "per_try_timeout", G.ATTEMPTS_EXHAUSTED, 2, 504, "UT,URX", "upstream_per_try_timeout",
     b"upstream request timeout"),
])
def test_failure_reply(kind, failure, reason, attempts, status, flags, details, body):
    r = failure_reply(kind, failure=failure, failure_text="refused", reason=reason, attempts=attempts)
    assert (r.status, r.flags, r.details, r.body) == (status, flags, details, body)
    assert r.timeout is (kind is K.PER_TRY_TIMEOUT)


def test_overflow_and_connect_timeout_replies():
    r = failure_reply(K.OVERFLOW, failure="overflow", failure_text="", reason=G.NOT_RETRIABLE, attempts=1)
    assert (r.status, r.flags, r.body, r.headers) == (503, "UO", RESET + b"reset reason: overflow",
                                                      ((b"x-envoy-overloaded", b"true"),))
    r = failure_reply(K.CONNECT_FAILURE, failure="connect_timeout", failure_text="", reason=G.ATTEMPTS_EXHAUSTED,
                      attempts=3, connect_timeout=True)
    assert (r.status, r.flags, r.details, r.body) == (
        503, "UF,URX", "upstream_reset_before_response_started{connection_timeout}",
        RESET + b"retried and the latest reset reason: connection timeout")


def test_with_flag():
    assert (with_flag("-", "URX"), with_flag("UF", ""), with_flag("UF", "URX")) == ("URX", "UF", "UF,URX")
