"""What the client sees when a request's attempts end: Envoy's local reply for a failed last attempt, and the retry flags.

`give_up_flag` says which flag the retry decision adds (Envoy router: URX when a retriable
outcome was not retried because the retry limit -- here also the retry budget -- was hit, UO
when the maxRetries circuit breaker overflowed). `failure_reply` is the local reply for an
attempt that ended without a response head (istio-l7-defaults table D): circuit-breaker
overflow 503 UO, connect failure (or connect timeout) 503 UF, a close or reset before the
response 503 UC, a protocol error 502 UPE, a per-try timeout 504 UT; "retried and the latest " goes into the reset text when there was more than one
attempt. Flags join with "," in Envoy's order (UT/UF/UC/UPE before URX and UO is after UF).
"""
from __future__ import annotations

from dataclasses import dataclass

from .circuit import OVERFLOW_BODY, OVERFLOW_HEADERS
from .retry import GiveUpReason, OutcomeKind

__all__ = ["FailureReply", "give_up_flag", "failure_reply", "UPSTREAM_RESET", "TIMEOUT_BODY", "with_flag"]

UPSTREAM_RESET = b"upstream connect error or disconnect/reset before headers. "
TIMEOUT_BODY = b"upstream request timeout"


@dataclass(frozen=True, slots=True, kw_only=True)
class FailureReply:
    status: int
    body: bytes
    flags: str
    details: str
    failure: str = ""
    """%UPSTREAM_TRANSPORT_FAILURE_REASON%."""
    timeout: bool = False
    """A timeout (gRPC: DEADLINE_EXCEEDED)."""
    headers: tuple[tuple[bytes, bytes], ...] = ()


def give_up_flag(reason: GiveUpReason | None) -> str:
    if reason in (GiveUpReason.ATTEMPTS_EXHAUSTED, GiveUpReason.BUDGET_EXHAUSTED):
        return "URX"
    if reason is GiveUpReason.RETRY_OVERFLOW:
        return "UO"
    return ""


def with_flag(flags: str, extra: str) -> str:
    if not extra:
        return flags
    return extra if flags in ("", "-") else f"{flags},{extra}"


def failure_reply(kind: OutcomeKind, *, failure: str, failure_text: str, reason: GiveUpReason | None,
                  attempts: int, connect_timeout: bool = False) -> FailureReply:
    """The local reply after the last attempt ended with `kind` (not RESPONSE). `failure` is the
    attempt's failure code ("connection_termination", "protocol_error:<reason>", a tunnel
    error's reason), `failure_text` its message (for a connect failure's body); `connect_timeout`:
    the connect failure was the cluster's connectTimeout."""
    extra = give_up_flag(reason)
    retried = b"retried and the latest " if attempts > 1 else b""
    if kind is OutcomeKind.PER_TRY_TIMEOUT:
        return FailureReply(status=504, body=TIMEOUT_BODY, flags=with_flag("UT", extra),
                            details="upstream_per_try_timeout", timeout=True)
    if kind is OutcomeKind.OVERFLOW:     # a circuit breaker: never retried, no retry flag
        return FailureReply(status=503, body=OVERFLOW_BODY, flags="UO", failure="overflow",
                            details="upstream_reset_before_response_started{overflow}",
                            headers=tuple((n.encode(), v.encode()) for n, v in OVERFLOW_HEADERS))
    if kind is OutcomeKind.CONNECT_FAILURE and connect_timeout:
        return FailureReply(status=503, flags=with_flag("UF", extra), failure=failure,
                            details="upstream_reset_before_response_started{connection_timeout}",
                            body=UPSTREAM_RESET + retried + b"reset reason: connection timeout")
    if kind is OutcomeKind.CONNECT_FAILURE:
        return FailureReply(
            status=503, flags=with_flag("UF", extra), failure=failure,
            details="upstream_reset_before_response_started{remote_connection_failure}",
            body=(UPSTREAM_RESET + retried + b"reset reason: remote connection failure, transport failure reason: "
                  + failure_text.encode("latin-1", "replace")))
    if failure.startswith("protocol_error:"):
        why = failure.partition(":")[2]
        return FailureReply(status=502, body=b"upstream sent an invalid HTTP response", flags=with_flag("UPE", extra),
                            details=f"upstream_protocol_error{{{why}}}", failure=why)
    return FailureReply(status=503, body=UPSTREAM_RESET + retried + b"reset reason: connection termination",
                        flags=with_flag("UC", extra),
                        details="upstream_reset_before_response_started{connection_termination}")
