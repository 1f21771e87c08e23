"""WeightedEndpoint load balancing: peak-EWMA P2C by default, round robin, least request, random, ring hash.

Theory of operation
-------------------
`BalancerConfig.from_model` reads a DestinationRule's `trafficPolicy.loadBalancer`:

* unset / `UNSPECIFIED` (and `PASSTHROUGH`, which has no meaning behind a waypoint): PEAK_EWMA,
  Linkerd's balancer. Istio would pick LEAST_REQUEST here; this mesh chooses latency-aware
  balancing as its default because it steers away from a slow endpoint without configuration.
* `ROUND_ROBIN`, `LEAST_REQUEST` (Envoy's power-of-two-choices least request), `RANDOM`.
* `consistentHash` (httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName): RING_HASH.
* `warmup` (`warmupDurationSecs`): Envoy's slow start for endpoints added after the balancer
  was built.

Peak EWMA (tower::load::PeakEwma as linkerd2-proxy configures it: default RTT 30 ms, decay
10 s): each endpoint keeps an RTT estimate, starting at the default RTT (a penalty for a new
endpoint against established fast ones, a head start against slow ones). Reading the load
decays the estimate towards 0 with weight exp(-elapsed / decay); an observed RTT above the
estimate replaces it at once (the "peak": react to a slowdown immediately), a lower one is
averaged in with the same weight. Cost = estimate x (pending + 1). A pick draws two distinct
candidates at random and takes the cheaper (P2C), so the worst endpoint is never picked while
there is another and the balancer needs no global ordering.

LEAST_REQUEST: P2C on (active requests + 1) / weight. ROUND_ROBIN: smooth weighted round robin
(equal weights rotate in endpoint order). RANDOM: weighted random. Weights include slow start:
a new endpoint's weight is `weight x max(minimumPercent, (age / duration) ^ (1 / aggression))`
until `duration` has passed (Envoy defaults: minimum 10 %, aggression 1); PEAK_EWMA divides the
cost by that factor.

RING_HASH (Ketama): each endpoint owns points on a 64-bit ring at the hashes of
"address_i" (BLAKE2b, deterministic across processes); a request's hash key goes to the first
point clockwise. The number of points per unit of weight is fixed when the balancer is built
(minimumRingSize, default 1024, spread over the initial endpoints), so when an endpoint leaves,
only the keys it owned move and every other key stays put. A request without its hash key
(header or cookie missing) is spread at random, as Envoy does.

Every pick is over candidates: the endpoints outlier detection leaves usable (`usable`, from
OutlierDetector.usable), minus those a retry should avoid (`avoid`, from retry.hosts_to_avoid)
unless that leaves none (then a previously tried endpoint is better than no endpoint, as
Envoy's previous_hosts predicate falls back after its attempts). No candidates -> None: the
data path answers 503 `no healthy upstream` (UH).

Time (`now`, monotonic seconds) and randomness (`rng`) are injected into every call.
"""
from __future__ import annotations

import bisect
import enum
import hashlib
import math
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from mesh.model.route import ConsistentHash, LoadBalancer, TrafficPolicy

__all__ = ["Algorithm", "SlowStart", "BalancerConfig", "WeightedEndpoint", "hash_key", "slow_start_factor",
           "Balancer", "EWMA_DEFAULT_RTT", "EWMA_DECAY", "DEFAULT_RING_SIZE"]

EWMA_DEFAULT_RTT = 0.030
"""linkerd2-proxy's EWMA_DEFAULT_RTT (30 ms)."""
EWMA_DECAY = 10.0
"""linkerd2-proxy's EWMA_DECAY (10 s)."""
DEFAULT_RING_SIZE = 1024
"""Envoy's ring_hash minimum_ring_size default."""


class Algorithm(enum.Enum):
    PEAK_EWMA = "peak_ewma"
    ROUND_ROBIN = "round_robin"
    LEAST_REQUEST = "least_request"
    RANDOM = "random"
    RING_HASH = "ring_hash"


@dataclass(frozen=True, slots=True, kw_only=True)
class SlowStart:
    duration: float
    minimum_fraction: float = 0.1
    aggression: float = 1.0


_SIMPLE = {LoadBalancer.ROUND_ROBIN: Algorithm.ROUND_ROBIN, LoadBalancer.LEAST_REQUEST: Algorithm.LEAST_REQUEST,
           LoadBalancer.RANDOM: Algorithm.RANDOM}


@dataclass(frozen=True, slots=True, kw_only=True)
class BalancerConfig:
    algorithm: Algorithm = Algorithm.PEAK_EWMA
    hash: ConsistentHash | None = None
    """The hash key of RING_HASH."""
    ring_size: int = DEFAULT_RING_SIZE
    slow_start: SlowStart | None = None
    default_rtt: float = EWMA_DEFAULT_RTT
    decay: float = EWMA_DECAY

    @classmethod
    def from_model(cls, tp: TrafficPolicy | None) -> BalancerConfig:
        if tp is None:
            return cls()
        slow = None
        if tp.warmup is not None and tp.warmup.duration > 0:
            w = tp.warmup
            slow = SlowStart(duration=w.duration,
                             minimum_fraction=0.1 if w.minimum_percent is None else w.minimum_percent / 100.0,
                             aggression=1.0 if w.aggression is None else w.aggression)
        if tp.consistent_hash is not None:
            ch = tp.consistent_hash
            return cls(algorithm=Algorithm.RING_HASH, hash=ch, slow_start=slow,
                       ring_size=ch.minimum_ring_size or ch.maglev_table_size or DEFAULT_RING_SIZE)
        algo = _SIMPLE.get(tp.load_balancer, Algorithm.PEAK_EWMA) if tp.load_balancer else Algorithm.PEAK_EWMA
        return cls(algorithm=algo, slow_start=slow)


@dataclass(frozen=True, slots=True, kw_only=True)
class WeightedEndpoint:
    """One endpoint as the balancer sees it (not mesh.model's Endpoint: just a key and a weight)."""

    address: str
    """The endpoint's key, e.g. "10.244.1.7:8080"."""
    weight: int = 1


_NONE: Mapping[str, str] = MappingProxyType({})


def hash_key(policy: ConsistentHash, *, headers: Mapping[str, str], cookies: Mapping[str, str] = _NONE,
             query: Mapping[str, str] = _NONE, source_ip: str | None = None) -> bytes | None:
    """The request's consistent-hash key, or None when the request lacks it. `headers` keys
    are lowercase."""
    if policy.http_header_name is not None:
        v = headers.get(policy.http_header_name)
    elif policy.http_cookie is not None:
        v = cookies.get(policy.http_cookie.name)
    elif policy.http_query_parameter_name is not None:
        v = query.get(policy.http_query_parameter_name)
    elif policy.use_source_ip:
        v = source_ip
    else:
        v = None
    return None if v is None else v.encode()


def slow_start_factor(slow: SlowStart | None, added_at: float, now: float) -> float:
    """The share (0..1] of its weight an endpoint added at `added_at` gets now (Envoy slow start)."""
    if slow is None:
        return 1.0
    age = now - added_at
    if age >= slow.duration:
        return 1.0
    time_factor = max(age, 0.001) / slow.duration
    return max(slow.minimum_fraction, time_factor ** (1.0 / slow.aggression))


def _h64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class _State:
    __slots__ = ("ep", "added_at", "rtt", "stamp", "pending", "current")

    def __init__(self, ep: WeightedEndpoint, added_at: float, default_rtt: float) -> None:
        self.ep = ep
        self.added_at = added_at
        self.rtt = default_rtt
        self.stamp = added_at
        self.pending = 0
        self.current = 0.0  # smooth weighted round robin


class Balancer:
    """Picks endpoints of one destination (service or subset). Single-threaded, loop-owned."""

    __slots__ = ("config", "_order", "_states", "_ring", "_ring_keys", "_points_per_weight")

    def __init__(self, config: BalancerConfig, endpoints: Sequence[WeightedEndpoint] = (), *, now: float = 0.0) -> None:
        self.config = config
        self._states: dict[str, _State] = {}
        self._order: list[str] = []
        self._ring: list[tuple[int, str]] = []
        self._ring_keys: list[int] = []
        # Fixed once: so endpoint churn only moves the keys of the endpoints that change.
        total = sum(max(e.weight, 1) for e in endpoints) or 1
        self._points_per_weight = max(1, math.ceil(config.ring_size / total))
        # The initial endpoints are established: slow start is for endpoints added later.
        self._set(endpoints, now, established=True)

    # --- membership -----------------------------------------------------------------------

    def set_endpoints(self, endpoints: Sequence[WeightedEndpoint], now: float) -> None:
        """The destination's endpoints changed: new ones start (in slow start, if configured),
        removed ones are dropped, kept ones keep their load state."""
        self._set(endpoints, now, established=False)

    def _set(self, endpoints: Sequence[WeightedEndpoint], now: float, *, established: bool) -> None:
        states: dict[str, _State] = {}
        for ep in endpoints:
            old = self._states.get(ep.address)
            if old is not None:
                old.ep = ep
                states[ep.address] = old
            else:
                added = -math.inf if established else now
                st = _State(ep, added, self.config.default_rtt)
                st.stamp = now
                states[ep.address] = st
        self._states = states
        self._order = [ep.address for ep in endpoints if ep.address in states]
        if self.config.algorithm is Algorithm.RING_HASH:
            ring = []
            for ep in endpoints:
                for i in range(self._points_per_weight * max(ep.weight, 1)):
                    ring.append((_h64(f"{ep.address}_{i}".encode()), ep.address))
            ring.sort()
            self._ring = ring
            self._ring_keys = [h for h, _ in ring]

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(self._order)

    # --- feedback from the data path -------------------------------------------------------

    def on_start(self, address: str) -> None:
        """A request was sent to `address`."""
        st = self._states.get(address)
        if st is not None:
            st.pending += 1

    def on_end(self, address: str, now: float, rtt: float | None = None) -> None:
        """The request to `address` finished; `rtt`: seconds until its response (None when it
        failed without one -- the pending count still drops)."""
        st = self._states.get(address)
        if st is None:
            return
        st.pending = max(0, st.pending - 1)
        if rtt is not None:
            self._observe(st, now, rtt)

    def _observe(self, st: _State, now: float, rtt: float) -> None:
        if st.rtt < rtt:
            st.rtt = rtt  # the peak: a slowdown counts at once
        else:
            w = math.exp(-max(now - st.stamp, 0.0) / self.config.decay)
            st.rtt = st.rtt * w + rtt * (1.0 - w)
        st.stamp = now

    def ewma_cost(self, address: str, now: float) -> float:
        """The endpoint's current peak-EWMA cost (decays its estimate, as reading does in tower)."""
        st = self._states[address]
        return self._cost(st, now)

    def _cost(self, st: _State, now: float) -> float:
        elapsed = now - st.stamp
        if elapsed > 0:
            st.rtt *= math.exp(-elapsed / self.config.decay)
            st.stamp = now
        return st.rtt * (st.pending + 1) / self._factor(st, now)

    def _factor(self, st: _State, now: float) -> float:
        return max(st.ep.weight, 1) * slow_start_factor(self.config.slow_start, st.added_at, now)

    # --- picking ---------------------------------------------------------------------------

    def _candidates(self, usable: Collection[str] | None, avoid: Collection[str]) -> list[_State]:
        base = [self._states[a] for a in self._order if usable is None or a in usable]
        if avoid:
            fresh = [s for s in base if s.ep.address not in avoid]
            if fresh:
                return fresh
        return base

    def pick(self, now: float, rng: random.Random, *, usable: Collection[str] | None = None,
             avoid: Collection[str] = (), key: bytes | None = None) -> WeightedEndpoint | None:
        """Choose the endpoint for one attempt. `usable`: the endpoints outlier detection
        allows (None: all); `avoid`: the ones already tried by this request; `key`: the
        request's consistent-hash key (RING_HASH)."""
        algo = self.config.algorithm
        if usable is not None and not isinstance(usable, (set, frozenset)):
            usable = frozenset(usable)  # tested once per endpoint below
        if algo is Algorithm.RING_HASH and key is not None:
            return self._ring_pick(key, usable, avoid)
        cands = self._candidates(usable, avoid)
        if not cands:
            return None
        if len(cands) == 1:
            return cands[0].ep
        if algo is Algorithm.PEAK_EWMA:
            a, b = self._two(cands, rng)
            return (a if self._cost(a, now) <= self._cost(b, now) else b).ep
        if algo is Algorithm.LEAST_REQUEST:
            a, b = self._two(cands, rng)
            return (a if (a.pending + 1) / self._factor(a, now) <= (b.pending + 1) / self._factor(b, now)
                    else b).ep
        if algo is Algorithm.ROUND_ROBIN:
            return self._smooth_rr(cands, now).ep
        return self._weighted_random(cands, now, rng).ep  # RANDOM, and RING_HASH without a key

    @staticmethod
    def _two(cands: list[_State], rng: random.Random) -> tuple[_State, _State]:
        n = len(cands)
        i = rng.randrange(n)
        j = rng.randrange(n - 1)
        return cands[i], cands[j + 1 if j >= i else j]

    def _smooth_rr(self, cands: list[_State], now: float) -> _State:
        total = 0.0
        best = None
        for s in cands:
            w = self._factor(s, now)
            s.current += w
            total += w
            if best is None or s.current > best.current:
                best = s
        assert best is not None
        best.current -= total
        return best

    def _weighted_random(self, cands: list[_State], now: float, rng: random.Random) -> _State:
        weights = [self._factor(s, now) for s in cands]
        x = rng.random() * sum(weights)
        for s, w in zip(cands, weights):
            x -= w
            if x < 0:
                return s
        return cands[-1]

    def _ring_pick(self, key: bytes, usable: Collection[str] | None, avoid: Collection[str]) -> WeightedEndpoint | None:
        ring = self._ring
        if not ring:
            return None
        start = bisect.bisect_left(self._ring_keys, _h64(key)) % len(ring)
        fallback = None
        seen: set[str] = set()
        # Walk clockwise to the first allowed endpoint; each endpoint is judged once.
        for k in range(len(ring)):
            addr = ring[(start + k) % len(ring)][1]
            if addr in seen:
                continue
            seen.add(addr)
            if usable is None or addr in usable:
                if addr not in avoid:
                    return self._states[addr].ep
                if fallback is None:
                    fallback = addr
            if len(seen) == len(self._states):
                break
        return self._states[fallback].ep if fallback is not None else None
