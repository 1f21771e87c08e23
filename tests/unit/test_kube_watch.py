"""Kubernetes mode's pure parts: the projection of API objects onto what the config edge reads,
what a relist passes on, and the watch backoff."""
from __future__ import annotations

import asyncio

import pytest

from controlplane.kube.api import ApiError, Gone, _error
from controlplane.kube.kinds import WATCHED, project
from controlplane.kube.reflector import (BACKOFF_MAX, Delete, Reflector, Relisted, Upsert, backoff_delay,
                                         relist_changes)
from mesh.config import convert
from mesh.model import ResourceKey

KIND = {k.kind: k for k in WATCHED}


def _sa(name: str, rv: str) -> dict:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv}}


@pytest.mark.parametrize("known, listed, upserted, deleted", [
    ({}, [("a", "1"), ("b", "2")], ["a", "b"], []),                  # first list: everything
    ({"a": "1", "b": "2"}, [("a", "1"), ("b", "2")], [], []),        # nothing changed: nothing passed on
    ({"a": "1", "b": "2"}, [("a", "5")], ["a"], ["b"]),              # a changed, b gone
    ({"a": "1"}, [("a", "1"), ("c", "9")], ["c"], []),               # c new
    ({"a": "1", "b": "2"}, [], [], ["a", "b"]),                      # all gone (CRD removed)
])
def test_relist_passes_on_only_what_changed(known, listed, upserted, deleted):
    kind = KIND["ServiceAccount"]
    ups, dels = relist_changes(kind, {ResourceKey("ServiceAccount", "ns", k): v for k, v in known.items()},
                               [_sa(n, rv) for n, rv in listed])
    assert [u.key.name for u in ups] == upserted
    assert [d.key.name for d in dels] == deleted


@pytest.mark.parametrize("failures, jitter, expected", [
    (1, 0.0, 0.1), (1, 0.999999, 0.2), (2, 0.0, 0.2), (4, 0.0, 0.8),
    (30, 0.0, BACKOFF_MAX / 2), (30, 0.999999, BACKOFF_MAX),
])
def test_backoff_doubles_with_jitter_up_to_a_cap(failures, jitter, expected):
    assert backoff_delay(failures, jitter) == pytest.approx(expected, rel=1e-5)


def _pod(**status) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}, "uid": "u",
                         "resourceVersion": "7", "managedFields": [{"manager": "kubectl"}],
                         "ownerReferences": [{"kind": "ReplicaSet", "name": "web"}]},
            "spec": {"nodeName": "n1", "serviceAccountName": "web", "restartPolicy": "Always",
                     "containers": [{"name": "app", "image": "nginx",
                                     "env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                                     "ports": [{"containerPort": 53, "protocol": "UDP"}]}]},
            "status": status}


@pytest.mark.parametrize("status, ip", [
    ({"phase": "Running", "podIP": "10.244.0.5"}, "10.244.0.5"),
    ({"phase": "Pending"}, None),
    ({"phase": "Succeeded", "podIP": "10.244.0.5"}, None),  # terminated: its IP may be reused
    ({"phase": "Failed", "podIP": "10.244.0.5"}, None),
])
def test_a_real_pod_converts_with_ip_and_node_from_status(status, ip):
    pod = convert(project(KIND["Pod"], _pod(**status)))  # valueFrom and UDP ports are not the mesh's
    assert (pod.node_name, pod.service_account, pod.labels["app"]) == ("n1", "web", "web")
    assert (str(pod.pod_ip) if pod.pod_ip else None) == ip


def _svc(ports, cluster_ip="10.96.0.10") -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dns", "namespace": "kube-system"},
            "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "selector": {"k8s-app": "dns"},
                     "sessionAffinity": "None", "ports": ports}}


def test_service_keeps_tcp_ports_and_a_headless_one_has_no_vip():
    tcp = {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}
    udp = {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53}
    svc = convert(project(KIND["Service"], _svc([udp, tcp])))
    assert [(p.name, p.port) for p in svc.ports] == [("dns-tcp", 53)] and str(svc.cluster_ip) == "10.96.0.10"
    assert convert(project(KIND["Service"], _svc([tcp], cluster_ip="None"))).cluster_ip is None
    assert project(KIND["Service"], _svc([udp])) is None  # UDP only: not a mesh Service


def test_a_node_keeps_only_its_pod_cidr():
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
            "spec": {"podCIDR": "10.244.1.0/24", "taints": [{"key": "k", "effect": "NoSchedule"}]},
            "status": {"addresses": [{"type": "InternalIP", "address": "172.30.0.2"}]}}
    assert str(convert(project(KIND["Node"], node)).pod_cidr) == "10.244.1.0/24"


def test_paths_of_core_and_custom_kinds():
    assert KIND["Pod"].path == "/api/v1/pods"
    assert KIND["AuthorizationPolicy"].path == "/apis/security.istio.io/v1/authorizationpolicies"
    assert KIND["Namespace"].namespaced is False and KIND["Gateway"].namespaced is True


# --- the watch loop, against a scripted API ---------------------------------------------


class _Stop(Exception):
    pass


class ScriptedApi:
    """Answers list/watch calls from a script; each entry is a result or an exception."""

    def __init__(self, lists, watches):
        self.lists, self.watches, self.watched_from = list(lists), list(watches), []

    async def list(self, kind):
        r = self.lists.pop(0)
        if isinstance(r, Exception):
            raise r
        return r

    async def watch(self, kind, rv, *, timeout_seconds):
        self.watched_from.append(rv)
        if not self.watches:
            raise _Stop
        script = self.watches.pop(0)
        if isinstance(script, Exception):
            raise script
        for item in script:
            if isinstance(item, Exception):
                raise item
            yield item


def _run(api, max_sleeps=10):
    events, sleeps = [], []

    async def sleep(d):
        sleeps.append(d)
        if len(sleeps) >= max_sleeps:
            raise _Stop

    r = Reflector(api, KIND["ServiceAccount"], events.append, sleep=sleep, jitter=lambda: 0.0)

    async def main():
        try:
            await r.run()
        except _Stop:
            pass
    asyncio.run(main())
    return r, events, sleeps


def test_a_watch_that_ends_resumes_from_its_last_version_without_relisting():
    api = ScriptedApi(lists=[([_sa("a", "10")], "10")],
                      watches=[[("ADDED", _sa("b", "11")), ("BOOKMARK", {"metadata": {"resourceVersion": "15"}})],
                               [("DELETED", _sa("a", "16"))]])
    r, events, sleeps = _run(api)
    assert api.watched_from == ["10", "15", "16"]  # the bookmark moved it on; no second list
    assert r.stats["lists"] == 1 and sleeps == []
    assert [type(e).__name__ for e in events] == ["Relisted", "Upsert", "Delete"]
    assert isinstance(events[1], Upsert) and events[1].key.name == "b"
    assert isinstance(events[2], Delete) and events[2].key.name == "a"
    assert r.known == {ResourceKey("ServiceAccount", "ns", "b"): "11"}


def test_gone_relists_and_errors_back_off_then_resume_from_the_same_version():
    api = ScriptedApi(lists=[([_sa("a", "10")], "10"), ([_sa("a", "10"), _sa("c", "30")], "30")],
                      watches=[Gone(410, "Expired", "too old"),
                               ApiError(0, "ClientOSError", "reset"), ApiError(500, "InternalError", "x"),
                               [("ADDED", _sa("d", "31"))]])
    r, events, sleeps = _run(api)
    relists = [e for e in events if isinstance(e, Relisted)]
    assert [e.cause for e in relists] == ["initial", "gone"]
    assert [u.key.name for u in relists[1].upserts] == ["c"]  # a did not change
    assert api.watched_from == ["10", "30", "30", "30", "31"]  # errors do not relist
    assert sleeps == [pytest.approx(0.1), pytest.approx(0.2)]  # backoff 0.2 s doubling, jitter 0 halves it
    assert r.stats == {"lists": 2, "relists_gone": 1, "errors": 2, "events": 1, "watches": 5}


def test_a_kind_that_is_not_served_is_empty_and_retried_with_backoff():
    api = ScriptedApi(lists=[ApiError(404, "NotFound", "no CRD")] * 3 + [([_sa("a", "5")], "5")], watches=[])
    r, events, sleeps = _run(api)
    assert [e.cause for e in events] == ["not_served"] * 3 + ["retry"]
    assert [u.key.name for u in events[-1].upserts] == ["a"]
    assert r.synced.is_set()
    assert sleeps == [pytest.approx(0.1), pytest.approx(0.2), pytest.approx(0.4)]


def test_gone_again_right_after_a_relist_backs_off_instead_of_spinning():
    api = ScriptedApi(lists=[([], "1"), ([], "2"), ([], "3")],
                      watches=[Gone(410, "Expired", "x"), Gone(410, "Expired", "x"), [("ADDED", _sa("a", "4"))]])
    r, events, sleeps = _run(api)
    assert r.stats["relists_gone"] == 2 and sleeps == [pytest.approx(0.1)]


def test_an_error_event_in_the_stream_is_a_relist_when_it_says_410():
    assert isinstance(_error(410, {"reason": "Expired", "message": "too old", "code": 410}), Gone)
    e = _error(403, b'{"reason": "Forbidden", "message": "no"}')
    assert type(e) is ApiError and (e.status, e.reason) == (403, "Forbidden")
