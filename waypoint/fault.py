"""Fault injection (VirtualService `http[].fault`), decided purely: the route's fault config + an rng -> FaultDecision.

Istio's semantics, as Envoy's fault filter carries them out (istio-l7-defaults.md A8, D):

* delay and abort are independent: each is its own draw against its own percentage; the delay
  is served first and the abort (if drawn) answered when it has elapsed;
* a percentage is a double on a 0-100 scale, translated by Istio to parts per million with
  truncation (`uint32(value * 10000)`); an unset percentage means 0 % (no fault);
* an abort is a local reply before any upstream contact (no retry, no mirror): `httpStatus`
  with body `fault filter abort`, flag FI, details `fault_filter_abort`; with `grpcStatus` the
  HTTP status is 200 and a gRPC request gets a trailers-only answer (`content-type:
  application/grpc`, `grpc-status: <code>`, `grpc-message: fault filter abort`), any other
  request the 200 with the plain-text body (Envoy's sendLocalReply);
* a delay adds flag DI to whatever the request's result is (`DI,FI` when both fire).

The decision is taken at plan time (waypoint/plan.py) and carried on the Forward; the pipeline
sleeps on the injected clock and sends the reply.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from mesh.model.route import VSFault

__all__ = ["PER_MILLION", "per_million", "drawn", "FaultAbort", "FaultDecision", "decide", "abort_reply",
           "GRPC_CODES", "join_flags", "ABORT_BODY", "ABORT_DETAILS"]

PER_MILLION = 1_000_000
ABORT_BODY = b"fault filter abort"
ABORT_DETAILS = "fault_filter_abort"

GRPC_CODES: dict[str, int] = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9,
    "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14,
    "DATA_LOSS": 15, "UNAUTHENTICATED": 16}
"""gRPC status code names (what `grpcStatus` takes) and their numbers (grpc/doc/statuscodes.md)."""

# Envoy prints %RESPONSE_FLAGS% in the order of its CoreResponseFlag enum, joined with ",".
_FLAG_ORDER = ("LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
               "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR")
_RANK = {f: i for i, f in enumerate(_FLAG_ORDER)}


def join_flags(*flags: str) -> str:
    """Several %RESPONSE_FLAGS% values (each `-`, empty, or `A,B`) as one, in Envoy's order."""
    seen = {f for fs in flags for f in fs.split(",") if f and f != "-"}
    return ",".join(sorted(seen, key=lambda f: (_RANK.get(f, len(_RANK)), f))) or "-"


def per_million(percentage: float | None) -> int:
    """Istio's translation of a 0-100 `Percent` to Envoy's FractionalPercent (per million,
    truncated: 0.00015 -> 1); None (unset) is 0."""
    if percentage is None or percentage <= 0:
        return 0
    return min(PER_MILLION, int(percentage * 10000))


def drawn(ppm: int, rng: random.Random) -> bool:
    """One Envoy runtime draw: true for `ppm` in a million requests. 0 and 100 % draw nothing."""
    if ppm <= 0:
        return False
    if ppm >= PER_MILLION:
        return True
    return rng.randrange(PER_MILLION) < ppm


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultAbort:
    """An abort to answer instead of forwarding."""

    http_status: int
    """200 for a gRPC abort (Envoy's rule)."""
    grpc_status: int | None = None
    """The numeric gRPC status, when `grpcStatus` was configured."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultDecision:
    """What the fault filter does to one request (None when it does nothing)."""

    delay: float = 0.0
    """Seconds to hold the request before routing it (0: no delay)."""
    abort: FaultAbort | None = None

    @property
    def flags(self) -> str:
        """The flags this decision alone contributes (DI, FI, DI,FI)."""
        return join_flags("DI" if self.delay > 0 else "", "FI" if self.abort is not None else "")


def decide(fault: VSFault | None, rng: random.Random) -> FaultDecision | None:
    """The fault for one request of a route with `fault` config: delay drawn first, abort after."""
    if fault is None:
        return None
    delay = 0.0
    if fault.delay is not None and fault.delay.fixed_delay > 0 and drawn(per_million(fault.delay.percentage), rng):
        delay = fault.delay.fixed_delay
    abort = None
    a = fault.abort
    if a is not None and drawn(per_million(a.percentage), rng):
        grpc = GRPC_CODES.get(a.grpc_status) if a.grpc_status is not None else None
        abort = FaultAbort(http_status=200 if grpc is not None else a.http_status, grpc_status=grpc)
    if delay == 0.0 and abort is None:
        return None
    return FaultDecision(delay=delay, abort=abort)


def _is_grpc(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    # Envoy's Grpc::Common::isGrpcRequestHeaders: content-type application/grpc[+proto|;...].
    ct = next((v for n, v in headers if n == b"content-type"), b"").lower()
    return ct == b"application/grpc" or ct.startswith((b"application/grpc+", b"application/grpc;"))


def abort_reply(abort: FaultAbort, request_headers: Sequence[tuple[bytes, bytes]]
                ) -> tuple[int, tuple[tuple[bytes, bytes], ...], bytes]:
    """(status, headers, body) of the local reply for `abort` to a request with these headers."""
    if abort.grpc_status is not None and _is_grpc(request_headers):
        # A trailers-only gRPC answer: HTTP 200, the status in the headers, no body (Envoy puts
        # the local reply's text in grpc-message; the gRPC percent-encoding leaves it as is).
        return 200, ((b"content-type", b"application/grpc"), (b"grpc-status", str(abort.grpc_status).encode()),
                     (b"grpc-message", ABORT_BODY)), b""
    return abort.http_status, (), ABORT_BODY
