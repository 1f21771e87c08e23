"""Health, pure parts: the control plane's /ready checks, and `ambient check`'s mesh checks
(ordered; after the first failure the rest are skipped)."""
from __future__ import annotations

import pytest

from controlplane.health import HealthFacts, judge as judge_cp
from kubemode.crds import crds
from kubemode.health import MeshFacts, Reason, ca_secret_of, judge

DAY = 86400.0
READY = HealthFacts(listening=True, synced_kinds=11, watched_kinds=11, now=0.0, ca_not_after=3650 * DAY, cert_ttl=DAY)


@pytest.mark.parametrize("change, failed", [
    ({}, {}),
    ({"listening": False}, {"listening": "not_listening"}),
    ({"synced_kinds": 10}, {"synced": "not_synced"}),
    ({"synced_kinds": 0, "watched_kinds": 0}, {}),  # file mode: nothing to list
    ({"ca_not_after": 0.5 * DAY}, {"ca": "ca_expiring"}),
    ({"ca_not_after": -1.0}, {"ca": "ca_expired"}),
])
def test_control_plane_readiness(change, failed):
    from dataclasses import replace
    checks = judge_cp(replace(READY, **change))
    assert {c.name: c.reason for c in checks if not c.ok} == failed


ALL_CRDS = {c["metadata"]["name"]: True for c in crds(gateway_api=True)}
DEPLOY = {"spec": {"replicas": 1, "template": {"spec": {"containers": [{"command": ["python3", "-m", "controlplane"]}]}}},
          "status": {"availableReplicas": 1}}
DS = {"status": {"desiredNumberScheduled": 3, "numberReady": 3}}
HEALTHY = MeshFacts(crds=ALL_CRDS, namespace=True, secrets=frozenset({"istio-ca-secret"}), root_published=True,
                    deployment=DEPLOY, daemonset=DS)


def _with(**kw):
    return MeshFacts(**{**{f: getattr(HEALTHY, f) for f in HEALTHY.__dataclass_fields__}, **kw})


@pytest.mark.parametrize("facts, first_failure", [
    (HEALTHY, None),
    (_with(api_error="connection refused"), ("API server", Reason.API_UNREACHABLE)),
    (_with(crds={**ALL_CRDS, "httproutes.gateway.networking.k8s.io": False}), ("CRDs", Reason.CRD_MISSING)),
    (_with(crds={}), ("CRDs", Reason.CRD_MISSING)),
    (_with(namespace=False), ("mesh namespace", Reason.NAMESPACE_MISSING)),
    (_with(secrets=frozenset()), ("CA Secret", Reason.CA_SECRET_MISSING)),
    # The Deployment names the user's Secret: istio-ca-secret does not count then.
    (_with(deployment={**DEPLOY, "spec": {"replicas": 1, "template": {"spec": {"containers": [
        {"command": ["python3", "--ca-from-secret", "mesh-ca"]}]}}}}), ("CA Secret", Reason.CA_SECRET_MISSING)),
    (_with(root_published=False), ("root certificate published", Reason.ROOT_NOT_PUBLISHED)),
    (_with(deployment=None, secrets=frozenset({"istio-ca-secret"})), ("control plane", Reason.CONTROL_PLANE_MISSING)),
    (_with(deployment={**DEPLOY, "status": {}}), ("control plane", Reason.CONTROL_PLANE_UNAVAILABLE)),
    (_with(daemonset=None), ("ztunnel", Reason.ZTUNNEL_MISSING)),
    (_with(daemonset={"status": {"desiredNumberScheduled": 3, "numberReady": 2}}), ("ztunnel", Reason.ZTUNNEL_NOT_READY)),
])
def test_mesh_checks_stop_at_the_first_failure(facts, first_failure):
    results = judge(facts)
    failed = [r for r in results if not r.ok]
    if first_failure is None:
        assert not failed and len(results) == 9  # control plane and ztunnel: exists, then available
        return
    first = failed[0]
    assert (first.name, first.reason) == first_failure
    assert all(r.reason is Reason.SKIPPED for r in failed[1:])
    assert {r.name for r in results} >= {"API server", "CRDs", "ztunnel"}


def test_the_ca_secret_is_the_one_the_deployment_names():
    assert ca_secret_of(None) == "istio-ca-secret"
    assert ca_secret_of(DEPLOY) == "istio-ca-secret"
    d = {"spec": {"template": {"spec": {"containers": [{"command": ["x", "--ca-from-secret", "mesh-ca"]}]}}}}
    assert ca_secret_of(d) == "mesh-ca"
