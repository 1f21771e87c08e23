"""Outlier detection: Istio's defaults, Envoy's counting, ejection time, max-ejection and panic."""
from __future__ import annotations

import pytest

from mesh.model.route import OutlierDetection
from waypoint.resilience.outlier import EjectionCause, OutlierConfig, OutlierDetector, ResultKind

HOSTS = [f"10.0.0.{i}:80" for i in range(10)]
RESP = ResultKind.RESPONSE


@pytest.mark.parametrize("od, want", [
    (None, None),
    (OutlierDetection(), OutlierConfig()),
    (OutlierDetection(consecutive_5xx_errors=0), OutlierConfig(consecutive_5xx=None)),
    (OutlierDetection(consecutive_5xx_errors=3, consecutive_gateway_errors=2, interval=1.0,
                      base_ejection_time=5.0, max_ejection_percent=50, min_health_percent=25),
     OutlierConfig(consecutive_5xx=3, consecutive_gateway=2, interval=1.0, base_ejection_time=5.0,
                   max_ejection_percent=50, min_health_percent=25)),
    (OutlierDetection(consecutive_gateway_errors=0), OutlierConfig()),
])
def test_config_defaults_are_istios(od, want):
    assert OutlierConfig.from_model(od) == want


def test_defaults_values():
    c = OutlierConfig()
    assert (c.consecutive_5xx, c.consecutive_gateway, c.interval, c.base_ejection_time,
            c.max_ejection_percent, c.min_health_percent, c.max_ejection_time) == (5, None, 10.0, 30.0, 10, 0, 300.0)


def feed(d: OutlierDetector, host: str, statuses, now=0.0):
    out = None
    for s in statuses:
        out = d.record(host, RESP, now, s) or out
    return out


@pytest.mark.parametrize("statuses, ejected", [
    ([500] * 5, True), ([500] * 4, False), ([503, 502, 500, 504, 599], True),
    ([500] * 4 + [200] + [500] * 4, False), ([500] * 4 + [404] + [500], False),
    ([200] * 20, False),
])
def test_consecutive_5xx(statuses, ejected):
    d = OutlierDetector(OutlierConfig(), HOSTS)
    feed(d, HOSTS[0], statuses)
    assert d.is_ejected(HOSTS[0]) is ejected


@pytest.mark.parametrize("statuses, ejected", [
    ([502, 503, 504], True), ([502, 500, 503, 504], False), ([503, 503, 200, 503], False),
])
def test_consecutive_gateway_errors_reset_on_other_5xx(statuses, ejected):
    d = OutlierDetector(OutlierConfig(consecutive_5xx=None, consecutive_gateway=3), HOSTS)
    e = feed(d, HOSTS[0], statuses)
    assert d.is_ejected(HOSTS[0]) is ejected
    if ejected:
        assert e.cause is EjectionCause.CONSECUTIVE_GATEWAY_ERRORS


@pytest.mark.parametrize("kind", [ResultKind.CONNECT_FAILURE, ResultKind.RESET, ResultKind.TIMEOUT])
def test_local_origin_errors_count_as_gateway_5xx(kind):
    d = OutlierDetector(OutlierConfig(consecutive_gateway=5, consecutive_5xx=None), HOSTS)
    for _ in range(5):
        d.record(HOSTS[1], kind, 0.0)
    assert d.is_ejected(HOSTS[1])


def test_disabled_5xx_never_ejects():
    d = OutlierDetector(OutlierConfig(consecutive_5xx=None), HOSTS)
    feed(d, HOSTS[0], [500] * 100)
    assert d.ejected_count == 0


def test_max_ejection_percent_holds_but_one_is_always_ejected():
    d = OutlierDetector(OutlierConfig(), HOSTS)  # 10 %: one of ten
    feed(d, HOSTS[0], [500] * 5)
    feed(d, HOSTS[1], [500] * 5)
    assert (d.is_ejected(HOSTS[0]), d.is_ejected(HOSTS[1])) == (True, False)
    solo = OutlierDetector(OutlierConfig(max_ejection_percent=0), ["a"])
    feed(solo, "a", [500] * 5)
    assert solo.is_ejected("a") and solo.usable(["a"]) == ()  # -> 503 no healthy upstream


def test_max_ejection_percent_fifty():
    d = OutlierDetector(OutlierConfig(max_ejection_percent=50), HOSTS[:4])
    for h in HOSTS[:4]:
        feed(d, h, [500] * 5)
    assert d.ejected_count == 2


def test_ejection_time_grows_with_ejections_and_unejects_at_a_sweep():
    d = OutlierDetector(OutlierConfig(), HOSTS)
    e1 = feed(d, HOSTS[0], [500] * 5, now=0.0)
    assert (e1.until, e1.ejection_count) == (30.0, 1)
    assert d.sweep(29.0) == () and d.is_ejected(HOSTS[0])
    assert d.sweep(30.0) == (HOSTS[0],) and not d.is_ejected(HOSTS[0])
    e2 = feed(d, HOSTS[0], [500] * 5, now=31.0)  # failed again soon after: twice as long
    assert (e2.until, e2.ejection_count) == (91.0, 2)
    assert d.next_unejection() == 91.0


def test_ejection_time_is_capped_at_max_ejection_time():
    d = OutlierDetector(OutlierConfig(base_ejection_time=100.0), HOSTS)
    now, durations = 0.0, []
    for _ in range(4):  # fails again the moment it is back
        e = feed(d, HOSTS[0], [500] * 5, now=now)
        durations.append((e.ejection_count, e.until - now))
        now = e.until
        assert d.sweep(now) == (HOSTS[0],)
    assert durations == [(1, 100.0), (2, 200.0), (3, 300.0), (4, 300.0)]


def test_a_healthy_interval_lowers_the_ejection_count():
    d = OutlierDetector(OutlierConfig(), HOSTS)
    feed(d, HOSTS[0], [500] * 5, now=0.0)
    d.sweep(30.0)
    d.sweep(40.0)  # a whole interval in: count 1 -> 0
    e = feed(d, HOSTS[0], [500] * 5, now=41.0)
    assert e.ejection_count == 1 and e.until == 71.0


def test_usable_excludes_ejected_and_panics_below_min_health():
    d = OutlierDetector(OutlierConfig(max_ejection_percent=100, min_health_percent=50), HOSTS[:4])
    feed(d, HOSTS[0], [500] * 5)
    assert d.usable(HOSTS[:4]) == tuple(HOSTS[1:4]) and not d.in_panic(HOSTS[:4])
    feed(d, HOSTS[1], [500] * 5)
    assert d.usable(HOSTS[:4]) == tuple(HOSTS[2:4])  # 50 % healthy: not below
    feed(d, HOSTS[2], [500] * 5)
    assert d.in_panic(HOSTS[:4]) and d.usable(HOSTS[:4]) == tuple(HOSTS[:4])


def test_endpoint_changes_keep_state_of_kept_endpoints():
    d = OutlierDetector(OutlierConfig(), HOSTS)
    feed(d, HOSTS[0], [500] * 5)
    feed(d, HOSTS[1], [500] * 4)
    d.set_endpoints(HOSTS[:2] + ["new:80"])
    assert d.is_ejected(HOSTS[0]) and d.ejected_count == 1
    d.record(HOSTS[1], RESP, 0.0, 500)  # the fifth in a row still counts...
    assert not d.is_ejected(HOSTS[1])  # ...but 2/3 ejected exceeds 10 %
    d.set_endpoints(HOSTS[1:2])
    assert d.ejected_count == 0
    assert d.record("gone:80", RESP, 0.0, 500) is None


def test_response_needs_status():
    d = OutlierDetector(OutlierConfig(), HOSTS)
    with pytest.raises(ValueError):
        d.record(HOSTS[0], RESP, 0.0)
