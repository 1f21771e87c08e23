"""Retry budget: Linkerd's ratio and floor (the larger of the two) over a bucketed window, repeated request ids, maxRetries concurrency, annotations."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, strategies as st

from mesh.model import RetryBudgetSpec
from mesh.model.route import ConnectionPool, HTTPSettings
from waypoint.resilience.budget import (DEFAULT_BUDGET, RetryBudget, RetryBudgetConfig, RetryBudgets,
                                        budget_config)
from waypoint.resilience.retry import (AttemptOutcome, BudgetVerdict, GiveUpReason, OutcomeKind,
                                       RetryDecision, RetryOn, RetryPolicy, should_retry)

RETRY = RetryDecision(retry=True, backoff=0.0, next_attempt=2)


def test_defaults_are_linkerds():
    assert (DEFAULT_BUDGET.enabled, DEFAULT_BUDGET.retry_ratio, DEFAULT_BUDGET.min_retries_per_second,
            DEFAULT_BUDGET.window) == (True, 0.2, 10.0, 10.0)


def take(b: RetryBudget, now: float) -> BudgetVerdict:
    v = b.check(now)
    if v is BudgetVerdict.ALLOWED:
        b.settle(RETRY, now)
        b.retry_finished()
    return v


def test_floor_allows_min_retries_per_second_without_traffic_spread_per_second():
    b = RetryBudget()
    assert [take(b, 1.0) for _ in range(10)] == [BudgetVerdict.ALLOWED] * 10
    assert b.check(1.0) is BudgetVerdict.EXHAUSTED and b.check(1.99) is BudgetVerdict.EXHAUSTED
    assert b.check(2.0) is BudgetVerdict.ALLOWED             # the next second: 10 more, not a burst of 100
    sent = sum(take(b, 2.0 + t / 10) is BudgetVerdict.ALLOWED for t in range(100) for _ in range(5))
    assert sent == 100                                       # 10 per second over the 10 s


@pytest.mark.parametrize("requests, allowed", [(0, 10), (10, 10), (50, 10), (55, 11), (500, 100),
                                               (1000, 200), (5000, 1000)])
def test_ratio_share_of_requests_or_the_floor_whichever_is_larger(requests, allowed):
    b = RetryBudget()
    for _ in range(requests):
        b.record_request(0.5)
    n = 0
    while take(b, 0.5) is BudgetVerdict.ALLOWED:
        n += 1
    assert n == allowed


def test_window_forgets_old_retries_and_requests():
    b = RetryBudget(RetryBudgetConfig(min_retries_per_second=1.0, retry_ratio=0.0, window=10.0))
    while take(b, 0.0) is BudgetVerdict.ALLOWED:
        pass
    assert b.retries_in_window(0.0) == 1              # the floor: 1 per second
    assert b.check(0.99) is BudgetVerdict.EXHAUSTED   # still inside that second
    assert b.check(1.0) is BudgetVerdict.ALLOWED      # the next bucket
    assert b.retries_in_window(9.99) == 1 and b.retries_in_window(10.0) == 0   # bucket [0, 1) expired


def test_a_long_idle_gap_clears_everything():
    b = RetryBudget()
    for _ in range(50):
        b.record_request(3.0)
    take(b, 3.0)
    assert (b.requests_in_window(1e9), b.retries_in_window(1e9)) == (0, 0)


def test_max_retries_caps_retries_in_flight():
    b = RetryBudget(RetryBudgetConfig(max_concurrent_retries=2))
    for _ in range(2):
        assert b.check(0.0) is BudgetVerdict.ALLOWED
        b.settle(RETRY, 0.0)
    assert b.check(0.0) is BudgetVerdict.OVERFLOW
    b.retry_finished()
    assert b.check(0.0) is BudgetVerdict.ALLOWED
    with pytest.raises(RuntimeError):
        b.retry_finished(), b.retry_finished(), b.retry_finished()


def test_disabled_budget_keeps_the_concurrency_cap():
    b = RetryBudget(RetryBudgetConfig(enabled=False, max_concurrent_retries=1))
    assert all(take(b, 0.0) is BudgetVerdict.ALLOWED for _ in range(1000))
    b.settle(RETRY, 0.0)
    assert b.check(0.0) is BudgetVerdict.OVERFLOW


def test_settle_counts_denials_by_reason():
    b = RetryBudget()
    b.settle(RetryDecision(retry=False, reason=GiveUpReason.BUDGET_EXHAUSTED), 0.0)
    b.settle(RetryDecision(retry=False, reason=GiveUpReason.BUDGET_EXHAUSTED), 0.0)
    b.settle(RetryDecision(retry=False, reason=GiveUpReason.RETRY_OVERFLOW), 0.0)
    b.settle(RetryDecision(retry=False, reason=GiveUpReason.NOT_RETRIABLE), 0.0)
    assert (b.denials(GiveUpReason.BUDGET_EXHAUSTED), b.denials(GiveUpReason.RETRY_OVERFLOW),
            b.denials(GiveUpReason.NOT_RETRIABLE)) == (2, 1, 0)
    assert b.retries_in_window(0.0) == 0


def test_budget_stops_a_retry_cascade():
    """A destination answering 503 to everything, retried on 5xx twice: without a budget the
    waypoint triples its load; with the default budget it adds at most 20 % (above the floor)."""
    policy = RetryPolicy(num_retries=2, retry_on=RetryOn.FIVE_XX)
    rng = random.Random(1)

    refused = []

    def run(budget: RetryBudget) -> int:
        sent = 0
        for i in range(1000):  # 100 requests per second for 10 s
            now = i * 0.01
            budget.record_request(now)
            attempt = 1
            sent += 1
            while True:
                d = should_retry(policy, AttemptOutcome(kind=OutcomeKind.RESPONSE, status=503),
                                 attempt_no=attempt, budget=budget.check(now), body_replayable=True,
                                 rng=rng, now=now)
                budget.settle(d, now)
                if not d.retry:
                    refused.append(d.reason)
                    break
                sent += 1
                attempt += 1
                budget.retry_finished()
        return sent

    assert run(RetryBudget(RetryBudgetConfig(enabled=False))) == 3000
    assert set(refused) == {GiveUpReason.ATTEMPTS_EXHAUSTED}
    refused.clear()
    b = RetryBudget()
    sent = run(b)
    assert sent <= 1000 + 200
    assert sent >= 1000 + 190  # the budget is used, not just refused
    assert b.denials(GiveUpReason.BUDGET_EXHAUSTED) == refused.count(GiveUpReason.BUDGET_EXHAUSTED) > 0


@given(events=st.lists(st.tuples(st.sampled_from(["req", "retry", "check"]), st.floats(0, 3.0)),
                       max_size=200))
def test_bucketed_window_matches_a_brute_force_count(events):
    cfg = RetryBudgetConfig(min_retries_per_second=2.0, retry_ratio=0.5, window=4.0, buckets=4)
    b = RetryBudget(cfg)
    log: list[tuple[str, int]] = []
    now = 0.0
    for kind, dt in events:
        now += dt
        epoch = int(now // 1.0)
        if kind == "req":
            b.record_request(now)
            log.append(("req", epoch))
        elif kind == "retry":
            if b.check(now) is BudgetVerdict.ALLOWED:
                b.settle(RETRY, now)
                b.retry_finished()
                log.append(("retry", epoch))
        live = [k for k, e in log if e > epoch - 4]
        assert b.requests_in_window(now) == live.count("req")
        assert b.retries_in_window(now) == live.count("retry")
        this_second = sum(1 for k, e in log if k == "retry" and e == epoch)
        share = 0.5 * live.count("req")
        want = (BudgetVerdict.ALLOWED if (live.count("retry") + 1 <= share
                                          or (share < 8.0 and this_second + 1 <= 2.0)) else BudgetVerdict.EXHAUSTED)
        assert b.check(now) is want


@pytest.mark.parametrize("spec, pool, want", [
    (None, None, DEFAULT_BUDGET),
    (RetryBudgetSpec(percent=50.0), None, RetryBudgetConfig(retry_ratio=0.5)),
    (RetryBudgetSpec(min_retries_per_second=2.5), None, RetryBudgetConfig(min_retries_per_second=2.5)),
    (RetryBudgetSpec(window=30.0), None, RetryBudgetConfig(window=30.0)),
    (RetryBudgetSpec(enabled=False), None, RetryBudgetConfig(enabled=False)),
    (RetryBudgetSpec(), None, DEFAULT_BUDGET),
    (None, ConnectionPool(http=HTTPSettings(max_retries=3)), RetryBudgetConfig(max_concurrent_retries=3)),
    (None, ConnectionPool(http=HTTPSettings(max_retries=0)), DEFAULT_BUDGET),  # Istio: 0 = unset
    (RetryBudgetSpec(enabled=False), ConnectionPool(http=HTTPSettings(max_retries=3)),
     RetryBudgetConfig(enabled=False, max_concurrent_retries=3)),
])
def test_budget_config_from_service_spec_and_destination_rule(spec, pool, want):
    assert budget_config(spec, pool) == want


def test_budgets_per_service_are_independent_and_reconfigurable():
    budgets = RetryBudgets()
    a, b = budgets.for_service("demo/a"), budgets.for_service("demo/b")
    while take(a, 0.0) is BudgetVerdict.ALLOWED:
        pass
    assert a.check(0.0) is BudgetVerdict.EXHAUSTED and b.check(0.0) is BudgetVerdict.ALLOWED
    assert budgets.for_service("demo/a") is a
    budgets.update("demo/a", RetryBudgetConfig(enabled=False))
    assert budgets.for_service("demo/a").check(0.0) is BudgetVerdict.ALLOWED
    budgets.forget("demo/a")
    assert budgets.for_service("demo/a").config == DEFAULT_BUDGET


def test_invalid_config_is_refused():
    with pytest.raises(ValueError):
        RetryBudgetConfig(window=0.0)


def test_a_request_seen_again_counts_as_a_retry_and_is_refused_without_room():
    """A retry further up the chain re-sends the same x-request-id: it uses this hop's budget."""
    b = RetryBudget(RetryBudgetConfig(min_retries_per_second=1.0, window=10.0))   # floor: 1 retry a second
    A = BudgetVerdict.ALLOWED
    assert (b.admit(0.0, "a"), b.admit(0.0, "b")) == (A, A)
    assert b.admit(1.0, "a") is A
    assert (b.requests_in_window(1.0), b.retries_in_window(1.0)) == (2, 1)
    assert b.admit(1.5, "b") is BudgetVerdict.EXHAUSTED           # no room: refused, counted
    assert b.denials(GiveUpReason.BUDGET_EXHAUSTED) == 1 and b.retries_in_window(1.5) == 1
    assert b.admit(12.5, "a") is A                                # last seen at 1.0: forgotten
    assert b.requests_in_window(12.5) == 1
    assert b.admit(12.5, None) is A and b.requests_in_window(12.5) == 2
    off = RetryBudget(RetryBudgetConfig(enabled=False))
    assert all(off.admit(0.0, "x") is A for _ in range(500))        # counted, never refused


def test_a_forgotten_request_seen_again_is_a_new_request():
    """The data path forgets a key whose request ended well: its repeat is not a retry."""
    b = RetryBudget(RetryBudgetConfig(min_retries_per_second=1.0, window=10.0))
    assert b.admit(0.0, "a") is BudgetVerdict.ALLOWED
    b.forget("a")
    b.forget("never-seen")                                       # harmless
    assert b.admit(0.5, "a") is BudgetVerdict.ALLOWED
    assert (b.requests_in_window(0.5), b.retries_in_window(0.5)) == (2, 0)
    assert b.admit(0.7, "a") is BudgetVerdict.ALLOWED           # not forgotten this time: a retry
    assert (b.requests_in_window(0.7), b.retries_in_window(0.7)) == (2, 1)


def test_request_keys_are_bounded():
    b = RetryBudget(RetryBudgetConfig(max_ids=3))
    for rid in "abcd":
        b.admit(0.0, rid)
    assert b.admit(0.0, "a") is BudgetVerdict.ALLOWED and b.retries_in_window(0.0) == 0   # forgotten
    assert b.admit(0.0, "d") is BudgetVerdict.ALLOWED and b.retries_in_window(0.0) == 1


def _chain(mode: str, n: int = 6000) -> tuple[float, float]:
    """Three hops (cart -> pricing -> catalog), each retrying its callee's 5xx twice; catalog
    fails 30 %; 200 requests/s. (catalog attempts per request, client success)."""
    rng = random.Random(3)
    policy = RetryPolicy(num_retries=2, retry_on=RetryOn.FIVE_XX)
    budgets = [RetryBudget(RetryBudgetConfig(enabled=mode != "off")) for _ in range(3)]
    leaf = [0]

    def call(hop: int, rid: str, now: float) -> int:
        b = budgets[hop]
        if b.admit(now, rid if mode == "keys" else None) is BudgetVerdict.EXHAUSTED:
            return 503
        attempt = 1
        while True:
            if hop == 2:
                leaf[0] += 1
                status = 503 if rng.random() < 0.3 else 200
            else:
                status = call(hop + 1, rid, now)
            d = should_retry(policy, AttemptOutcome(kind=OutcomeKind.RESPONSE, status=status),
                             attempt_no=attempt, budget=b.check(now), body_replayable=True, rng=rng, now=now)
            b.settle(d, now)
            if not d.retry:
                return status
            attempt += 1
            b.retry_finished()
    ok = sum(call(0, f"r{i}", i * 0.005) == 200 for i in range(n))
    return leaf[0] / n, ok / n


def test_chain_of_three_retrying_hops_stays_within_1_2x_distinct_requests():
    """The cascade, simulated: per-hop budgets alone do not stop the compounding (each hop's
    20 % is of ITS requests, which include the retries above it); keyed requests do."""
    off, off_ok = _chain("off")
    plain, _ = _chain("plain")
    keyed, keyed_ok = _chain("keys")
    assert off > 1.4 and off_ok > 0.99
    assert plain > 1.35                   # the budget per hop barely helps
    assert keyed <= 1.2 and keyed_ok > 0.75
