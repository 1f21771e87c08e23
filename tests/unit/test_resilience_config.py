"""The config edge for the resilience decisions: retryOn conditions refused when unknown,
attempts: 0 with other retry fields refused (as Istio), consistentHash and warmup typed."""
from __future__ import annotations

import textwrap

import pytest

from mesh.config import WARNING_REASONS, ConfigErrors, parse_text
from mesh.model.route import ENVOY_RETRY_ON, ConsistentHash, HTTPCookie, LoadBalancer, Warmup

SRC = "resilience.yaml"
VS = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs, namespace: demo}\n"
DR = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: dr, namespace: demo}\n"


def retries(body: str) -> str:
    return (VS + "spec:\n  hosts: [reviews]\n  http:\n  - route: [{destination: {host: reviews}}]\n"
            + "    retries: " + body + "\n")


def lb(body: str) -> str:
    b = textwrap.indent(textwrap.dedent(body).strip("\n"), "      ")
    return DR + "spec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer:\n" + b + "\n"


def load(text: str):
    [loaded] = parse_text(text, SRC)
    assert all(w.reason in WARNING_REASONS for w in loaded.warnings)
    return loaded.resource, [(w.field, w.message) for w in loaded.warnings]


def errors(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigErrors) as info:
        parse_text(text, SRC)
    return [(e.field, str(e)) for e in info.value.errors]


@pytest.mark.parametrize("token", ENVOY_RETRY_ON)
def test_every_envoy_retry_condition_is_accepted(token):
    vs, _ = load(retries(f"{{attempts: 2, retryOn: \"{token}\"}}"))
    assert vs.http[0].retries.retry_on == (token,)


@pytest.mark.parametrize("value, kept", [
    ("503", ("503",)),
    ("503,reset", ("503", "reset")),
    ("gateway-error,connect-failure,refused-stream", ("gateway-error", "connect-failure", "refused-stream")),
    ("5xx,,reset", ("5xx", "reset")),
])
def test_status_codes_and_conditions_kept_in_order(value, kept):
    vs, _ = load(retries(f"{{attempts: 2, retryOn: \"{value}\"}}"))
    assert vs.http[0].retries.retry_on == kept


@pytest.mark.parametrize("value, bad", [
    ("5xxx", "5xxx"), ("connect_failure", "connect_failure"), ("503,retry-later", "retry-later"),
    ("999", "999"), ("UNAVAILABLE", "UNAVAILABLE"),
])
def test_unknown_retry_conditions_are_refused_by_name(value, bad):
    [(field, msg)] = errors(retries(f"{{attempts: 2, retryOn: \"{value}\"}}"))
    assert field == "spec.http[0].retries.retryOn"
    assert f'"{bad}"' in msg


def test_spaces_around_conditions_warn_as_istio_rejects_them():
    vs, warnings = load(retries('{attempts: 2, retryOn: "5xx, reset"}'))
    assert vs.http[0].retries.retry_on == ("5xx", "reset")
    assert any(f == "spec.http[0].retries.retryOn" and "spaces" in m for f, m in warnings)


@pytest.mark.parametrize("extra", ["perTryTimeout: 1s", "retryOn: 5xx", "retryRemoteLocalities: true"])
def test_attempts_zero_with_other_fields_is_refused(extra):
    [(field, msg)] = errors(retries("{attempts: 0, " + extra + "}"))
    assert field == "spec.http[0].retries." + extra.split(":")[0]
    assert "attempts: 0" in msg


def test_attempts_zero_alone_disables():
    vs, _ = load(retries("{attempts: 0}"))
    assert vs.http[0].retries.attempts == 0


@pytest.mark.parametrize("body, want", [
    ("consistentHash: {httpHeaderName: X-User}", ConsistentHash(http_header_name="x-user")),
    ("consistentHash: {useSourceIp: true}", ConsistentHash(use_source_ip=True)),
    ("consistentHash: {httpQueryParameterName: user}", ConsistentHash(http_query_parameter_name="user")),
    ("consistentHash: {httpCookie: {name: sid, path: /, ttl: 60s}}",
     ConsistentHash(http_cookie=HTTPCookie(name="sid", path="/", ttl=60.0))),
    ("consistentHash: {httpHeaderName: x-user, ringHash: {minimumRingSize: 4096}}",
     ConsistentHash(http_header_name="x-user", minimum_ring_size=4096)),
    ("consistentHash: {httpHeaderName: x-user, minimumRingSize: 2048}",
     ConsistentHash(http_header_name="x-user", minimum_ring_size=2048)),
    ("consistentHash: {httpHeaderName: x-user, maglev: {tableSize: 65537}}",
     ConsistentHash(http_header_name="x-user", maglev_table_size=65537)),
])
def test_consistent_hash_is_typed(body, want):
    dr, _ = load(lb(body))
    assert dr.traffic_policy.consistent_hash == want
    assert dr.traffic_policy.load_balancer is None


@pytest.mark.parametrize("body, fragment", [
    ("consistentHash: {}", "exactly one of"),
    ("consistentHash: {httpHeaderName: a, useSourceIp: true}", "exactly one of"),
    ("consistentHash: {httpHeaderName: 'bad header'}", "not a valid HTTP header name"),
    ("simple: RANDOM\nconsistentHash: {useSourceIp: true}", "mutually exclusive"),
    ("consistentHash: {useSourceIp: true, ringHash: {minimumRingSize: 8}, maglev: {tableSize: 7}}",
     "mutually exclusive"),
    ("warmup: {minimumPercent: 5}", "is required"),
    ("warmup: {duration: 10s, aggression: 0.5}", "between 1"),
    ("warmup: {duration: 10s, minimumPercent: 150}", "between 0 and 100"),
])
def test_bad_load_balancer_settings_are_refused(body, fragment):
    errs = errors(lb(body))
    assert errs and any(fragment in m for _, m in errs), errs


@pytest.mark.parametrize("body, want", [
    ("warmup: {duration: 30s}", Warmup(duration=30.0)),
    ("warmup: {duration: 1m, minimumPercent: 20, aggression: 2}", Warmup(duration=60.0, minimum_percent=20.0,
                                                                        aggression=2.0)),
    ("warmupDurationSecs: 15s", Warmup(duration=15.0)),
])
def test_warmup_is_typed(body, want):
    dr, _ = load(lb(body + "\nsimple: ROUND_ROBIN"))
    assert dr.traffic_policy.warmup == want
    assert dr.traffic_policy.load_balancer is LoadBalancer.ROUND_ROBIN
