"""Circuit breaking: connectionPool limits with Istio's defaults -> admit / connect / queue / overflow."""
from __future__ import annotations

import pytest

from mesh.model.route import ConnectionPool, HTTPSettings, TCPSettings
from waypoint.resilience.circuit import (OVERFLOW_BODY, OVERFLOW_FLAG, OVERFLOW_HEADERS, OVERFLOW_STATUS,
                                         UNLIMITED, CircuitLimits, ConnectionAction, OverflowReason,
                                         PoolCounters, admit_request, connection_reusable, idle_expired,
                                         plan_connection)


@pytest.mark.parametrize("pool, want", [
    (None, CircuitLimits()),
    (ConnectionPool(), CircuitLimits()),
    (ConnectionPool(tcp=TCPSettings(max_connections=1, connect_timeout=0.5, idle_timeout=60.0)),
     CircuitLimits(max_connections=1, connect_timeout=0.5, idle_timeout=60.0)),
    (ConnectionPool(http=HTTPSettings(http1_max_pending_requests=2, http2_max_requests=3,
                                      max_requests_per_connection=1, max_retries=4, idle_timeout=5.0)),
     CircuitLimits(max_pending_requests=2, max_requests=3, max_requests_per_connection=1, max_retries=4,
                   idle_timeout=5.0)),
    (ConnectionPool(tcp=TCPSettings(max_connections=0), http=HTTPSettings(http2_max_requests=0)),
     CircuitLimits()),  # Istio: zero means unset, never "block everything"
    (ConnectionPool(tcp=TCPSettings(idle_timeout=60.0), http=HTTPSettings(idle_timeout=5.0)),
     CircuitLimits(idle_timeout=5.0)),
])
def test_limits_from_connection_pool(pool, want):
    assert CircuitLimits.from_model(pool) == want


def test_defaults_are_istios():
    d = CircuitLimits()
    assert (d.max_connections, d.max_pending_requests, d.max_requests, d.max_retries) == (UNLIMITED,) * 4
    assert (d.max_requests_per_connection, d.connect_timeout, d.idle_timeout) == (0, 10.0, 3600.0)


@pytest.mark.parametrize("active, pending, admitted", [(0, 0, True), (2, 0, True), (2, 5, True), (3, 0, False)])
def test_admit_request_caps_active_requests(active, pending, admitted):
    a = admit_request(CircuitLimits(max_requests=3), PoolCounters(active_requests=active, pending_requests=pending))
    assert a.admitted is admitted
    assert a.overflow is (None if admitted else OverflowReason.MAX_REQUESTS)


L = CircuitLimits(max_connections=1, max_pending_requests=1)


@pytest.mark.parametrize("counters, free, endpoint_conns, action, beyond", [
    (PoolCounters(open_connections=1), True, 1, ConnectionAction.USE, False),
    (PoolCounters(open_connections=0), False, 0, ConnectionAction.CONNECT, False),
    (PoolCounters(open_connections=1), False, 1, ConnectionAction.QUEUE, False),
    (PoolCounters(open_connections=1, pending_requests=1), False, 1, ConnectionAction.OVERFLOW, False),
    (PoolCounters(open_connections=1, pending_requests=1), False, 0, ConnectionAction.CONNECT, True),
])
def test_plan_connection(counters, free, endpoint_conns, action, beyond):
    p = plan_connection(L, counters, free_connection=free, endpoint_connections=endpoint_conns)
    assert (p.action, p.beyond_max_connections) == (action, beyond)
    assert p.overflow is (OverflowReason.MAX_PENDING_REQUESTS if action is ConnectionAction.OVERFLOW else None)


def test_istio_circuit_breaking_task_shape():
    """maxConnections 1, http1MaxPendingRequests 1: of three concurrent requests to one endpoint
    with one busy connection, one waits and the third overflows (the task's 503s)."""
    counters = PoolCounters(open_connections=1, active_requests=1)
    plans = []
    for _ in range(2):
        p = plan_connection(L, counters, free_connection=False, endpoint_connections=1)
        plans.append(p.action)
        if p.action is ConnectionAction.QUEUE:
            counters = PoolCounters(open_connections=1, active_requests=1, pending_requests=counters.pending_requests + 1)
    assert plans == [ConnectionAction.QUEUE, ConnectionAction.OVERFLOW]


@pytest.mark.parametrize("limit, served, reusable", [(0, 10**6, True), (1, 0, True), (1, 1, False), (3, 2, True),
                                                      (3, 3, False)])
def test_max_requests_per_connection(limit, served, reusable):
    assert connection_reusable(CircuitLimits(max_requests_per_connection=limit), served) is reusable


@pytest.mark.parametrize("idle_since, now, expired", [(0.0, 59.9, False), (0.0, 60.0, True), (10.0, 69.0, False)])
def test_idle_timeout(idle_since, now, expired):
    assert idle_expired(CircuitLimits(idle_timeout=60.0), idle_since, now) is expired


def test_overflow_response_is_envoys():
    assert (OVERFLOW_STATUS, OVERFLOW_FLAG, OVERFLOW_HEADERS) == (503, "UO", (("x-envoy-overloaded", "true"),))
    assert OVERFLOW_BODY.endswith(b"reset reason: overflow")
