"""Service retry-budget annotations at the config edge: typed once, bad values warned about and defaulted."""
from __future__ import annotations

import pytest

from mesh.config import WARNING_REASONS, load_text, parse_text
from mesh.model import RetryBudgetSpec


def svc(annotations: str) -> str:
    return f"""apiVersion: v1
kind: Service
metadata:
  name: cart
  namespace: pay
  annotations: {{{annotations}}}
spec: {{ports: [{{port: 80}}]}}
"""


@pytest.mark.parametrize("annotations, want, warned", [
    ("", None, []),
    ("other.io/x: y", None, []),
    ('retry.ambient.dev/budget: "off"', RetryBudgetSpec(enabled=False), []),
    ('retry.ambient.dev/budget: "ON"', RetryBudgetSpec(), []),
    ('retry.ambient.dev/budget-percent: "50"', RetryBudgetSpec(percent=50.0), []),
    ('retry.ambient.dev/budget-min-retries-per-second: "2.5"', RetryBudgetSpec(min_retries_per_second=2.5), []),
    ('retry.ambient.dev/budget-window: "30s"', RetryBudgetSpec(window=30.0), []),
    ('retry.ambient.dev/budget: "maybe"', RetryBudgetSpec(), ["retry.ambient.dev/budget"]),
    ('retry.ambient.dev/budget-percent: "lots"', RetryBudgetSpec(), ["retry.ambient.dev/budget-percent"]),
    ('retry.ambient.dev/budget-percent: "-1"', RetryBudgetSpec(), ["retry.ambient.dev/budget-percent"]),
    ('retry.ambient.dev/budget-percent: "nan"', RetryBudgetSpec(), ["retry.ambient.dev/budget-percent"]),
    ('retry.ambient.dev/budget-window: "10"', RetryBudgetSpec(), ["retry.ambient.dev/budget-window"]),
    ('retry.ambient.dev/budget-window: "1h"', RetryBudgetSpec(), ["retry.ambient.dev/budget-window"]),
    ('retry.ambient.dev/budget-pct: "5"', RetryBudgetSpec(), ["retry.ambient.dev/budget-pct"]),
])
def test_retry_budget_annotations(annotations, want, warned):
    (loaded,) = parse_text(svc(annotations), "s.yaml")
    assert loaded.resource.retry_budget == want
    assert [w.field for w in loaded.warnings] == [f'metadata.annotations["{k}"]' for k in warned]
    assert all(w.reason == "bad_annotation" and w.reason in WARNING_REASONS for w in loaded.warnings)


def test_the_spec_reaches_the_proxies_on_service_info():
    from controlplane.translate import translate
    objs = load_text(svc('retry.ambient.dev/budget: "off"').replace("spec: {", "spec: {clusterIP: 10.96.9.9, ") + "---\napiVersion: v1\nkind: Namespace\n"
                     "metadata: {name: pay}\n", "s.yaml")
    out = translate(objs, trust_domain="cluster.local")
    info = out[("Service", "pay/cart")]
    assert info.retry_budget == RetryBudgetSpec(enabled=False)
