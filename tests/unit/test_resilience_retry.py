"""Retry policy from VirtualService / HTTPRoute, and the per-attempt retry decision (Envoy's rules)."""
from __future__ import annotations

import dataclasses

import random

import pytest
from hypothesis import given, strategies as st

from mesh.model.route import HTTPRouteRetry, VSRetries
from waypoint.resilience.retry import (DEFAULT_RETRY_POLICY, NO_RETRY, RETRY_ON_TOKENS, AttemptOutcome,
                                       BudgetVerdict, GiveUpReason, OutcomeKind, RetryOn, RetryPolicy,
                                       attempt_count_header, backoff_delay, hosts_to_avoid, is_retriable,
                                       parse_retry_on, policy_from_http_route, policy_from_virtual_service,
                                       should_retry)

R = RetryOn


def resp(status, grpc=None, headers=()):
    return AttemptOutcome(kind=OutcomeKind.RESPONSE, status=status, grpc_status=grpc,
                          header_names=frozenset(headers))


def fail(kind, sent=True):
    return AttemptOutcome(kind=kind, request_sent=sent)


# --- policy from the APIs ----------------------------------------------------------------

def test_default_policy_is_istios():
    p = DEFAULT_RETRY_POLICY
    assert p.num_retries == 2
    assert p.retry_on == R.CONNECT_FAILURE | R.REFUSED_STREAM | R.UNAVAILABLE | R.CANCELLED | R.RETRIABLE_STATUS_CODES
    assert p.retriable_status_codes == frozenset()  # 503 left the default in Istio 1.24
    assert p.per_try_timeout is None and p.avoid_previous_hosts
    assert p.base_interval == 0.025 and p.backoff_cap == pytest.approx(0.25)


@pytest.mark.parametrize("retries, want", [
    (None, DEFAULT_RETRY_POLICY),
    (VSRetries(attempts=0), NO_RETRY),
    (VSRetries(attempts=5), RetryPolicy(num_retries=5, retry_on=DEFAULT_RETRY_POLICY.retry_on)),
    (VSRetries(attempts=3, retry_on=("503",)),
     RetryPolicy(num_retries=3, retry_on=R.RETRIABLE_STATUS_CODES, retriable_status_codes=frozenset({503}))),
    (VSRetries(attempts=3, retry_on=("5xx", "reset", "409"), per_try_timeout=2.0),
     RetryPolicy(num_retries=3, retry_on=R.FIVE_XX | R.RESET | R.RETRIABLE_STATUS_CODES,
                 retriable_status_codes=frozenset({409}), per_try_timeout=2.0)),
    (VSRetries(attempts=1, retry_on=("gateway-error",), retry_ignore_previous_hosts=False, backoff=0.1,
               retry_remote_localities=True),
     RetryPolicy(num_retries=1, retry_on=R.GATEWAY_ERROR, avoid_previous_hosts=False, base_interval=0.1,
                 retry_remote_localities=True)),
])
def test_policy_from_virtual_service(retries, want):
    assert policy_from_virtual_service(retries) == want


@pytest.mark.parametrize("retry, timeout, want", [
    (None, None, DEFAULT_RETRY_POLICY),
    (None, 2.0, dataclasses.replace(DEFAULT_RETRY_POLICY, per_try_timeout=2.0)),   # backendRequest alone
    (HTTPRouteRetry(attempts=3), None,
     RetryPolicy(num_retries=3, retry_on=R.CONNECT_FAILURE | R.RESET | R.REFUSED_STREAM)),
    (HTTPRouteRetry(codes=(500, 502), attempts=1, backoff=0.2), 1.5,
     RetryPolicy(num_retries=1, retry_on=R.CONNECT_FAILURE | R.RESET | R.REFUSED_STREAM | R.RETRIABLE_STATUS_CODES,
                 retriable_status_codes=frozenset({500, 502}), base_interval=0.2, per_try_timeout=1.5)),
    (HTTPRouteRetry(codes=(503,)), None,
     RetryPolicy(num_retries=2, retry_on=R.CONNECT_FAILURE | R.RESET | R.REFUSED_STREAM | R.RETRIABLE_STATUS_CODES,
                 retriable_status_codes=frozenset({503}))),
])
def test_policy_from_http_route_counts_retries_not_tries(retry, timeout, want):
    assert policy_from_http_route(retry, backend_request_timeout=timeout) == want


def test_http_route_attempts_are_retries():
    """GEP-1731: attempts: 1 -> the original request plus one retry."""
    p = policy_from_http_route(HTTPRouteRetry(codes=(503,), attempts=1))
    kw = dict(budget=BudgetVerdict.ALLOWED, body_replayable=True, rng=random.Random(1), now=0.0)
    assert should_retry(p, resp(503), attempt_no=1, **kw).retry
    assert should_retry(p, resp(503), attempt_no=2, **kw).reason is GiveUpReason.ATTEMPTS_EXHAUSTED


def test_parse_retry_on_refuses_unknown():
    with pytest.raises(ValueError, match="'bogus'"):
        parse_retry_on(["5xx", "bogus"])
    assert parse_retry_on(["429", "unavailable"]) == (R.RETRIABLE_STATUS_CODES | R.UNAVAILABLE, frozenset({429}))


# --- what is retriable -------------------------------------------------------------------

CASES = [
    # (retryOn tokens, outcome, retriable)
    (("5xx",), resp(500), True), (("5xx",), resp(503), True), (("5xx",), resp(404), False),
    (("5xx",), fail(OutcomeKind.RESET), True), (("5xx",), fail(OutcomeKind.CONNECT_FAILURE), True),
    (("5xx",), fail(OutcomeKind.PER_TRY_TIMEOUT), True), (("5xx",), fail(OutcomeKind.REFUSED_STREAM), True),
    (("5xx",), fail(OutcomeKind.OVERFLOW), False),
    (("gateway-error",), resp(502), True), (("gateway-error",), resp(504), True),
    (("gateway-error",), resp(500), False), (("gateway-error",), fail(OutcomeKind.PER_TRY_TIMEOUT), True),
    (("reset",), fail(OutcomeKind.RESET), True), (("reset",), fail(OutcomeKind.CONNECT_FAILURE), True),
    (("reset",), fail(OutcomeKind.PER_TRY_TIMEOUT), False), (("reset",), resp(503), False),
    (("reset-before-request",), fail(OutcomeKind.RESET, sent=False), True),
    (("reset-before-request",), fail(OutcomeKind.RESET, sent=True), False),
    (("reset-before-request",), fail(OutcomeKind.CONNECT_FAILURE), True),
    (("connect-failure",), fail(OutcomeKind.CONNECT_FAILURE), True),
    (("connect-failure",), fail(OutcomeKind.RESET), False), (("connect-failure",), resp(503), False),
    (("refused-stream",), fail(OutcomeKind.REFUSED_STREAM), True),
    (("refused-stream",), fail(OutcomeKind.RESET), False),
    (("retriable-4xx",), resp(409), True), (("retriable-4xx",), resp(429), False),
    (("503",), resp(503), True), (("503",), resp(502), False), (("503",), fail(OutcomeKind.RESET), False),
    (("envoy-ratelimited",), resp(429, headers={"x-envoy-ratelimited"}), True),
    (("envoy-ratelimited",), resp(429), False),
    (("retriable-headers",), resp(500, headers={"x-retry-me"}), False),  # no header names configured
    (("cancelled",), resp(200, grpc=1), True), (("deadline-exceeded",), resp(200, grpc=4), True),
    (("resource-exhausted",), resp(200, grpc=8), True), (("internal",), resp(200, grpc=13), True),
    (("unavailable",), resp(200, grpc=14), True), (("unavailable",), resp(200, grpc=13), False),
    (("unavailable",), resp(200, grpc=0), False),
    (("http3-post-connect-failure",), fail(OutcomeKind.CONNECT_FAILURE), False),
]


@pytest.mark.parametrize("tokens, outcome, want", CASES)
def test_is_retriable(tokens, outcome, want):
    on, codes = parse_retry_on(tokens)
    assert is_retriable(RetryPolicy(num_retries=2, retry_on=on, retriable_status_codes=codes), outcome) is want


def test_retriable_headers_match_configured_names():
    p = RetryPolicy(num_retries=1, retry_on=R.RETRIABLE_HEADERS, retriable_headers=("x-retry-me",))
    assert is_retriable(p, resp(500, headers={"x-retry-me"}))
    assert not is_retriable(p, resp(500, headers={"x-other"}))


@pytest.mark.parametrize("outcome, want", [
    (fail(OutcomeKind.CONNECT_FAILURE), True), (fail(OutcomeKind.REFUSED_STREAM), True),
    (resp(200, grpc=14), True), (resp(200, grpc=1), True),
    (resp(503), False), (resp(500), False), (fail(OutcomeKind.RESET), False),
    (fail(OutcomeKind.PER_TRY_TIMEOUT), False), (fail(OutcomeKind.OVERFLOW), False),
])
def test_default_policy_never_retries_a_503_response_or_a_timeout(outcome, want):
    assert is_retriable(DEFAULT_RETRY_POLICY, outcome) is want


def test_every_token_has_a_flag():
    flags = list(RETRY_ON_TOKENS.values())
    assert len(set(flags)) == len(flags) == len(RetryOn)  # every single-bit condition (NONE is not one)


# --- should_retry ------------------------------------------------------------------------

P = RetryPolicy(num_retries=2, retry_on=R.FIVE_XX)


@pytest.mark.parametrize("outcome, attempt, budget, replayable, now, deadline, reason", [
    (resp(200), 1, BudgetVerdict.ALLOWED, True, 0.0, None, GiveUpReason.NOT_RETRIABLE),
    (fail(OutcomeKind.OVERFLOW), 1, BudgetVerdict.ALLOWED, True, 0.0, None, GiveUpReason.NOT_RETRIABLE),
    (resp(503), 3, BudgetVerdict.ALLOWED, True, 0.0, None, GiveUpReason.ATTEMPTS_EXHAUSTED),
    (resp(503), 1, BudgetVerdict.ALLOWED, False, 0.0, None, GiveUpReason.BODY_NOT_REPLAYABLE),
    (resp(503), 1, BudgetVerdict.ALLOWED, True, 10.0, 10.0, GiveUpReason.DEADLINE),
    (resp(503), 1, BudgetVerdict.EXHAUSTED, True, 0.0, None, GiveUpReason.BUDGET_EXHAUSTED),
    (resp(503), 1, BudgetVerdict.OVERFLOW, True, 0.0, None, GiveUpReason.RETRY_OVERFLOW),
    # precedence: not retriable beats everything, exhausted beats the budget
    (resp(200), 9, BudgetVerdict.EXHAUSTED, False, 0.0, 0.0, GiveUpReason.NOT_RETRIABLE),
    (resp(503), 3, BudgetVerdict.EXHAUSTED, True, 0.0, None, GiveUpReason.ATTEMPTS_EXHAUSTED),
])
def test_give_up_reasons(outcome, attempt, budget, replayable, now, deadline, reason):
    d = should_retry(P, outcome, attempt_no=attempt, budget=budget, body_replayable=replayable,
                     rng=random.Random(7), now=now, deadline=deadline)
    assert (d.retry, d.reason, d.next_attempt) == (False, reason, None)


@pytest.mark.parametrize("attempt", [1, 2])
def test_retry_carries_backoff_and_next_attempt(attempt):
    d = should_retry(P, resp(502), attempt_no=attempt, budget=BudgetVerdict.ALLOWED, body_replayable=True,
                     rng=random.Random(3), now=0.0, deadline=100.0)
    assert d.retry and d.reason is None and d.next_attempt == attempt + 1
    assert d.backoff == backoff_delay(P, attempt, random.Random(3))


def test_no_retry_policy_never_retries():
    d = should_retry(NO_RETRY, resp(503), attempt_no=1, budget=BudgetVerdict.ALLOWED, body_replayable=True,
                     rng=random.Random(), now=0.0)
    assert d.reason is GiveUpReason.NOT_RETRIABLE


# --- backoff -----------------------------------------------------------------------------

class _Fixed(random.Random):
    def __init__(self, x: float) -> None:
        super().__init__(0)
        self.x = x

    def random(self) -> float:
        return self.x


@pytest.mark.parametrize("n, x, want", [
    (1, 0.5, 0.0125), (1, 0.999, 0.024975), (2, 0.5, 0.0375), (3, 0.5, 0.0875),
    (4, 0.5, 0.1875), (5, 0.5, 0.25), (1, 0.0, 0.0), (60, 0.001, 0.25), (1000, 0.5, 0.25),
])
def test_backoff_is_envoys_full_jitter(n, x, want):
    assert backoff_delay(P, n, _Fixed(x)) == pytest.approx(want)


def test_backoff_honours_a_configured_base_and_cap():
    p = RetryPolicy(num_retries=5, retry_on=R.FIVE_XX, base_interval=0.1, max_interval=0.3)
    assert backoff_delay(p, 1, _Fixed(0.5)) == pytest.approx(0.05)
    assert backoff_delay(p, 3, _Fixed(0.9)) == pytest.approx(0.3)


@given(seed=st.integers(0, 2**32), n=st.integers(1, 200), base=st.floats(0.001, 1.0))
def test_backoff_stays_in_envoys_range(seed, n, base):
    p = RetryPolicy(num_retries=1, retry_on=R.FIVE_XX, base_interval=base)
    d = backoff_delay(p, n, random.Random(seed))
    assert 0.0 <= d <= 10 * base
    assert d < (2 ** min(n, 60) - 1) * base or d == 10 * base


def test_backoff_rejects_retry_zero():
    with pytest.raises(ValueError, match="from 1"):
        backoff_delay(P, 0, random.Random())


def test_first_backoffs_average_half_the_base():
    rng = random.Random(11)
    mean = sum(backoff_delay(DEFAULT_RETRY_POLICY, 1, rng) for _ in range(4000)) / 4000
    assert 0.011 < mean < 0.014


# --- hosts and headers -------------------------------------------------------------------

def test_hosts_to_avoid():
    assert hosts_to_avoid(DEFAULT_RETRY_POLICY, ["a", "b"]) == frozenset({"a", "b"})
    assert hosts_to_avoid(RetryPolicy(num_retries=1, retry_on=R.FIVE_XX, avoid_previous_hosts=False),
                          ["a"]) == frozenset()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_attempt_count_header(n):
    assert attempt_count_header(n) == ("x-envoy-attempt-count", str(n))
    with pytest.raises(ValueError):
        attempt_count_header(0)


def test_deadline_compares_the_backoff_with_the_time_left():
    rng_wait = backoff_delay(P, 1, random.Random(5))
    kw = dict(attempt_no=1, budget=BudgetVerdict.ALLOWED, body_replayable=True, now=100.0)
    assert should_retry(P, resp(503), rng=random.Random(5), deadline=100.0 + rng_wait + 1e-6, **kw).retry
    d = should_retry(P, resp(503), rng=random.Random(5), deadline=100.0 + rng_wait, **kw)
    assert d.reason is GiveUpReason.DEADLINE
