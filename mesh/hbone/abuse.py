"""Sans-IO HTTP/2 abuse accounting for one connection: limits, token buckets and the flood checks.

Theory of operation
-------------------
A peer holding a valid mesh certificate (a compromised node) can still make a connection cost
far more than it should, without breaking any framing rule. The checks here bound that cost;
each one is O(1) per frame and is touched only by the frames it is about (never by DATA with
a payload, the hot path). `AbuseGuard` keeps one connection's counters and buckets on the
connection's injected clock. Past a bound `H2Connection` raises
`ProtocolError(ENHANCE_YOUR_CALM, reason)`: GOAWAY goes out and the connection closes, and the
server reports the reason as a Rejection at stage "h2".

* Rapid reset (CVE-2023-44487; Envoy's premature-reset accounting, the h2 crate's
  `max_pending_accept_reset_streams`). A stream the peer resets before we answered it cost us
  work (a handler, an upstream connect) and freed its MAX_CONCURRENT_STREAMS slot at once, so
  the concurrency limit does not bound it. Counted per connection: `rapid_reset` when the
  premature resets outrun `premature_reset_rate` by more than `max_premature_resets` (a token
  bucket), or when there are `max_premature_resets` of them and they are at least half of the
  connection's streams (Envoy's rule, which catches a slow attack and never closes a
  long-lived pooled connection that saw the odd cancelled connect).
* New streams (`new_stream_rate` per second, bursts of `new_stream_burst`). Beyond it a new
  stream is refused with RST_STREAM(REFUSED_STREAM) (reason `stream_rate_limited`); the bucket
  keeps going negative while the peer keeps pushing, and a deficit of a whole burst (an
  excess sustained for burst/rate seconds) closes the connection (`stream_rate_exceeded`).
* Control frames we must answer. Every PING needs a PING ACK and every SETTINGS a SETTINGS
  ACK: rate-limited (`ping_flood`, `settings_flood`), and every control frame we queue in
  reply to the peer (ACKs, RST_STREAM, refusals) counts against `max_pending_control_frames`
  until the I/O layer says it was written (Envoy's `max_outbound_control_frames`: a peer that
  does not read cannot make us buffer answers; `control_frame_flood`).
* Frames that carry nothing (empty DATA without END_STREAM): at most
  `max_consecutive_empty_frames` in a row (Envoy's
  `max_consecutive_inbound_frames_with_empty_payload`; `empty_frame_flood`; counted by the
  frame parser, which drops such frames).
* WINDOW_UPDATE: each may wake every blocked stream, so their number is bounded by what we
  send (Envoy's rule: at most 1 + 2 * (streams + `max_window_updates_per_data_frame` * DATA
  frames sent); `window_update_flood`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .frames import ErrorCode, ProtocolError

__all__ = ["AbuseLimits", "AbuseGuard", "TokenBucket"]


@dataclass(frozen=True, slots=True, kw_only=True)
class AbuseLimits:
    """Per-connection bounds on what a peer may make us do (see the module docstring)."""

    max_premature_resets: int = 100
    """Streams the peer may reset before we answered them: the burst of the rate below, and
    the count past which a connection whose streams are mostly premature resets is closed."""
    premature_reset_rate: float = 20.0
    """Sustained premature resets per second a connection may have (refill of the burst)."""
    new_stream_rate: float = 10_000.0
    """New streams per second per connection, sustained. Our own pool opens one stream per
    downstream TCP connection; under connection-per-request load on loopback (16-256 clients)
    one pooled connection peaked at about 2,600 streams/s (tests/bench/bench_hbone_stream_rate.py),
    so this is about four times that."""
    new_stream_burst: int = 10_000
    """New streams a connection may open at once before the rate applies."""
    ping_rate: float = 50.0
    """PINGs per second (each needs an ACK), sustained."""
    ping_burst: int = 500
    settings_rate: float = 10.0
    """SETTINGS frames per second (each needs an ACK), sustained."""
    settings_burst: int = 100
    max_pending_control_frames: int = 1000
    """Control frames we queued in reply to the peer and could not write yet."""
    max_consecutive_empty_frames: int = 100
    """Frames in a row with an empty payload and no END_STREAM."""
    max_window_updates_per_data_frame: int = 10

    def __post_init__(self) -> None:
        for name in ("max_premature_resets", "new_stream_burst", "ping_burst", "settings_burst",
                     "max_pending_control_frames", "max_consecutive_empty_frames",
                     "max_window_updates_per_data_frame"):
            if getattr(self, name) < 1:
                raise ValueError(f"AbuseLimits.{name} must be >= 1, not {getattr(self, name)}")
        for name in ("premature_reset_rate", "new_stream_rate", "ping_rate", "settings_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"AbuseLimits.{name} must be > 0, not {getattr(self, name)}")


class TokenBucket:
    """`burst` tokens, refilled at `rate` per second; `take(now)` spends one and returns what is
    left, which goes below zero while the caller keeps taking from an empty bucket (the
    deficit is how far beyond the rate the peer went)."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> float:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.stamp = now
            tokens = self.tokens + elapsed * self.rate
            self.tokens = tokens if tokens < self.burst else float(self.burst)
        self.tokens -= 1.0
        return self.tokens


class AbuseGuard:
    """One connection's accounting against `AbuseLimits`: each method is called by the
    connection for the frame it is about and raises `ProtocolError(ENHANCE_YOUR_CALM, reason)`
    past a bound. `clock` is the connection's (seconds, monotonic)."""

    __slots__ = ("limits", "clock", "streams", "resets", "pings", "settings", "streams_accepted",
                 "premature_resets", "control_pending", "window_updates")

    def __init__(self, limits: AbuseLimits, clock: Callable[[], float]) -> None:
        now = clock()
        self.limits = limits
        self.clock = clock
        self.streams = TokenBucket(limits.new_stream_rate, limits.new_stream_burst, now)
        self.resets = TokenBucket(limits.premature_reset_rate, limits.max_premature_resets, now)
        self.pings = TokenBucket(limits.ping_rate, limits.ping_burst, now)
        self.settings = TokenBucket(limits.settings_rate, limits.settings_burst, now)
        self.streams_accepted = 0       # server: streams the peer opened that we took
        self.premature_resets = 0       # ... that it reset before our response
        self.control_pending = 0        # answers queued, not yet written by the I/O layer
        self.window_updates = 0

    def new_stream(self) -> bool:
        """Server: the peer opens a stream. False: refuse it (above the rate)."""
        tokens = self.streams.take(self.clock())
        if tokens >= 0:
            return True
        lim = self.limits
        if tokens <= -lim.new_stream_burst:
            raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "stream_rate_exceeded",
                                f"new streams above {lim.new_stream_rate:g}/s for too long "
                                f"({lim.new_stream_burst} refused)")
        return False

    def premature_reset(self) -> None:
        """Server: the peer reset a stream before we answered it."""
        self.premature_resets += 1
        n, lim = self.premature_resets, self.limits
        if self.resets.take(self.clock()) < 0 or (n >= lim.max_premature_resets and 2 * n >= self.streams_accepted):
            raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "rapid_reset",
                                f"{n} of {self.streams_accepted} streams reset by the peer before they were "
                                f"answered (limit {lim.max_premature_resets}, {lim.premature_reset_rate:g}/s)")

    def ping(self) -> None:
        if self.pings.take(self.clock()) < 0:
            raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "ping_flood",
                                f"more than {self.limits.ping_burst} PINGs at over {self.limits.ping_rate:g}/s")
        self.owe_control()

    def settings_frame(self) -> None:
        if self.settings.take(self.clock()) < 0:
            raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "settings_flood",
                                f"more than {self.limits.settings_burst} SETTINGS at over "
                                f"{self.limits.settings_rate:g}/s")
        self.owe_control()

    def owe_control(self) -> None:
        """We queue a frame in answer to the peer (an ACK, a reset, a refusal)."""
        self.control_pending += 1
        if self.control_pending > self.limits.max_pending_control_frames:
            raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "control_frame_flood",
                                f"more than {self.limits.max_pending_control_frames} control frames owed "
                                "to a peer that does not read them")

    def window_update(self, streams: int, data_frames_sent: int) -> None:
        """A WINDOW_UPDATE arrived; `streams` ever opened (both sides), DATA frames we sent."""
        self.window_updates += 1
        if self.window_updates > 1 + 2 * (streams + self.limits.max_window_updates_per_data_frame
                                          * data_frames_sent):
            raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "window_update_flood",
                                f"{self.window_updates} WINDOW_UPDATEs for {data_frames_sent} DATA frames sent")
