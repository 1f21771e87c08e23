"""Weighted backend choice: distribution with a seeded rng, zero weights, nothing to pick."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from mesh.model.route import BackendRef, VSDestination, VSRouteDestination
from waypoint.routing import pick_backend, pick_vs_destination
from waypoint.routing.backend import pick_weighted


def b(name: str, weight: int) -> BackendRef:
    return BackendRef(name=name, namespace="demo", port=80, weight=weight)


def shares(backends, n=20_000, seed=7):
    rng = random.Random(seed)
    counts = Counter()
    for _ in range(n):
        got = pick_backend(backends, rng)
        counts[None if got is None else got.name] += 1
    return {k: v / n for k, v in counts.items()}


@pytest.mark.parametrize("weights, expected", [
    ({"a": 1}, {"a": 1.0}),
    ({"a": 1, "b": 1}, {"a": 0.5, "b": 0.5}),
    ({"a": 90, "b": 10}, {"a": 0.9, "b": 0.1}),
    ({"a": 3, "b": 1}, {"a": 0.75, "b": 0.25}),          # not a percentage: weight / sum
    ({"a": 1, "b": 0}, {"a": 1.0}),                      # weight 0 never
    ({"a": 0, "b": 500_000, "c": 1_000_000}, {"b": 1 / 3, "c": 2 / 3}),
    ({"a": 1, "b": 1, "c": 1, "d": 1}, {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}),
])
def test_weight_distribution(weights, expected):
    got = shares([b(k, w) for k, w in weights.items()])
    assert set(got) == set(expected)
    for k, share in expected.items():
        assert got[k] == pytest.approx(share, abs=0.015), (k, got)


@pytest.mark.parametrize("backends", [
    [],
    [b("a", 0)],
    [b("a", 0), b("b", 0)],
    [b("a", -1)],                    # invalid weights never win (the loader refuses them anyway)
    [b("a", 1_000_001)],
])
def test_nothing_to_pick_is_none_meaning_500(backends):
    assert pick_backend(backends, random.Random(1)) is None


def test_seeded_rng_is_deterministic():
    backends = [b("a", 5), b("b", 3), b("c", 2)]
    one = [pick_backend(backends, random.Random(42)).name for _ in range(1)]
    r1, r2 = random.Random(42), random.Random(42)
    seq1 = [pick_backend(backends, r1).name for _ in range(50)]
    seq2 = [pick_backend(backends, r2).name for _ in range(50)]
    assert seq1 == seq2 and one == seq1[:1]
    assert set(seq1) == {"a", "b", "c"}


def test_single_live_backend_uses_no_randomness():
    class NoRandom(random.Random):
        def randrange(self, *a, **k):  # pragma: no cover - must not be called
            raise AssertionError("rng used")
    assert pick_backend([b("a", 0), b("b", 7)], NoRandom()).name == "b"


def test_pick_weighted_is_exact_at_the_boundaries():
    class Fixed(random.Random):
        def __init__(self, r):
            super().__init__()
            self.r = r

        def randrange(self, n):
            assert n == 10
            return self.r
    items = ["a", "b"]
    assert [pick_weighted(items, [7, 3], Fixed(r)) for r in range(10)] == ["a"] * 7 + ["b"] * 3


def test_vs_destinations_by_weight():
    route = (VSRouteDestination(destination=VSDestination(host="echo", subset="v1"), weight=80),
             VSRouteDestination(destination=VSDestination(host="echo", subset="v2"), weight=20),
             VSRouteDestination(destination=VSDestination(host="echo", subset="v3"), weight=0))
    rng = random.Random(3)
    counts = Counter(pick_vs_destination(route, rng).destination.subset for _ in range(10_000))
    assert set(counts) == {"v1", "v2"}
    assert counts["v1"] / 10_000 == pytest.approx(0.8, abs=0.02)
    assert pick_vs_destination((), rng) is None
