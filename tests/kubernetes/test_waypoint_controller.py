"""The waypoint controller against the real API server and controller-manager: an istio-waypoint
Gateway made with kubectl gets its ServiceAccount, Deployment and Service (owned by it, put back
when changed or deleted, garbage-collected with it by the cluster's own collector), and the
status users read with kubectl: Gateway Accepted/Programmed and its address, HTTPRoute
parents with Accepted/ResolvedRefs."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from controlplane.kube.api import KubeApi
from controlplane.kube.source import KubeSource
from controlplane.kube.waypoint_controller import WaypointController
from controlplane.kube.waypoint_objects import WaypointOptions
from controlplane.store import ResourceStore

from .cluster import KubeCluster
from .support import until as _until

GATEWAY = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: %(name)s, namespace: %(ns)s, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"""


@asynccontextmanager
async def _controller(kube: KubeCluster) -> AsyncIterator[WaypointController]:
    api = await KubeApi.from_kubeconfig(kube.kubeconfig)
    source = KubeSource(api, ResourceStore())
    ctl = WaypointController(api, source, options=WaypointOptions(image="ambient-mesh:test"))
    await source.start()
    await ctl.start()
    try:
        await source.wait_synced(20)
        yield ctl
    finally:
        await ctl.stop()
        await source.stop()
        await api.close()


def _get(kube: KubeCluster, *args: str) -> dict[str, Any] | None:
    p = kube.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(p.stdout) if p.returncode == 0 else None


def _failed(ctl: WaypointController, ns: str) -> list[str]:
    """This test's Gateways whose objects the last pass could not write (other tests' namespaces
    may be terminating meanwhile, where nothing can be created)."""
    return [k.name for k in ctl.failed if k.namespace == ns]


def _conditions(obj: dict[str, Any] | None) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in ((obj or {}).get("status") or {}).get("conditions") or ()}


def test_a_waypoint_gateway_gets_owned_objects_status_and_garbage_collection(mesh_crds: KubeCluster,
                                                                             namespace: str) -> None:
    kube, ns = mesh_crds, namespace

    async def main() -> None:
        async with _controller(kube) as ctl:
            await asyncio.to_thread(kube.apply, GATEWAY % {"name": "waypoint", "ns": ns})
            gw = await _until(lambda: (g := _get(kube, "gateway", "waypoint", "-n", ns))
                              and _conditions(g).get("Programmed", ("",))[0] == "True" and g, 10,
                              "Gateway Programmed")
            uid = gw["metadata"]["uid"]
            # The class, as istiod makes it: ours, and Accepted.
            gc = _get(kube, "gatewayclass", "istio-waypoint")
            assert gc["spec"]["controllerName"] == "istio.io/mesh-controller"
            assert _conditions(gc) == {"Accepted": ("True", "Accepted")}
            assert _conditions(gw) == {"Accepted": ("True", "Accepted"), "Programmed": ("True", "Programmed")}
            assert all(c["observedGeneration"] == gw["metadata"]["generation"] for c in gw["status"]["conditions"])
            svc = _get(kube, "service", "waypoint", "-n", ns)
            assert gw["status"]["addresses"] == [{"type": "IPAddress", "value": svc["spec"]["clusterIP"]}]
            [listener] = gw["status"]["listeners"]
            # What `kubectl get gateway` prints (the CRD's columns, as upstream's and Istio's docs show).
            table = kube.kubectl("get", "gateway", "waypoint", "-n", ns).stdout.split("\n")
            assert table[0].split() == ["NAME", "CLASS", "ADDRESS", "PROGRAMMED", "AGE"]
            assert table[1].split()[:4] == ["waypoint", "istio-waypoint", svc["spec"]["clusterIP"], "True"]
            assert (listener["name"], listener["attachedRoutes"]) == ("mesh", 0)
            # Each object is the Gateway's: named after it, labelled, owned.
            for kind in ("serviceaccount", "deployment", "service"):
                obj = _get(kube, kind, "waypoint", "-n", ns)
                assert obj is not None, kind
                assert [(r["kind"], r["name"], r["uid"]) for r in obj["metadata"]["ownerReferences"]] == \
                    [("Gateway", "waypoint", uid)], kind
                labels = obj["metadata"]["labels"]
                assert labels["gateway.networking.k8s.io/gateway-name"] == labels["istio.io/gateway-name"] == "waypoint"
            assert {(p["name"], p["port"], p.get("appProtocol")) for p in svc["spec"]["ports"]} == \
                {("status-port", 15021, "tcp"), ("mesh", 15008, "hbone")}
            assert svc["spec"]["selector"] == {"gateway.networking.k8s.io/gateway-name": "waypoint"}
            dep = _get(kube, "deployment", "waypoint", "-n", ns)
            tmpl = dep["spec"]["template"]
            assert tmpl["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"
            assert tmpl["spec"]["serviceAccountName"] == "waypoint"
            [c] = tmpl["spec"]["containers"]
            assert c["image"] == "ambient-mesh:test"
            assert {p["containerPort"] for p in c["ports"]} == {15008, 15020, 15021}
            # The cluster's own controllers act on it: a ReplicaSet and a pod with the label the
            # Service selects.
            pods = await _until(lambda: (_get(kube, "pods", "-n", ns, "-l",
                                              "gateway.networking.k8s.io/gateway-name=waypoint") or {}).get("items"),
                                20, "waypoint pod created")
            assert pods[0]["spec"]["serviceAccountName"] == "waypoint"

            # Settled: no pass applies or writes anything again (no loop through our own watch).
            await asyncio.sleep(1.0)
            applies, writes = ctl.stats["applies"], ctl.stats["status_writes"]
            await asyncio.to_thread(kube.kubectl, "label", "namespace", ns, "unrelated=change")
            await asyncio.sleep(1.0)
            assert (ctl.stats["applies"], ctl.stats["status_writes"]) == (applies, writes)

            # A field it manages changed by hand, or its Deployment deleted: put back.
            await asyncio.to_thread(kube.kubectl, "set", "image", "deployment/waypoint", "-n", ns,
                                    "istio-proxy=someone/else:1")
            await _until(lambda: _get(kube, "deployment", "waypoint", "-n", ns)["spec"]["template"]["spec"]
                         ["containers"][0]["image"] == "ambient-mesh:test", 5, "image put back")
            await asyncio.to_thread(kube.kubectl, "delete", "deployment", "waypoint", "-n", ns, "--wait=false")
            await _until(lambda: (d := _get(kube, "deployment", "waypoint", "-n", ns))
                         and d["metadata"]["uid"] != dep["metadata"]["uid"], 10, "Deployment re-created")

            # Deleting the Gateway: the garbage collector (kube-controller-manager) deletes what it owned.
            await asyncio.to_thread(kube.kubectl, "delete", "gateway", "waypoint", "-n", ns)
            await _until(lambda: all(kube.kubectl("get", kind, "waypoint", "-n", ns, check=False).returncode != 0
                                     for kind in ("serviceaccount", "deployment", "service")), 30,
                         "owned objects garbage-collected")
            assert _failed(ctl, ns) == []

    asyncio.run(main())


def test_a_gateway_without_the_hbone_listener_or_with_a_taken_name_reports_why(mesh_crds: KubeCluster,
                                                                               namespace: str) -> None:
    kube, ns = mesh_crds, namespace

    async def main() -> None:
        async with _controller(kube) as ctl:
            await asyncio.to_thread(kube.apply, GATEWAY.replace("port: 15008, protocol: HBONE", "port: 80, protocol: HTTP")
                                    % {"name": "bad", "ns": ns})
            gw = await _until(lambda: (g := _get(kube, "gateway", "bad", "-n", ns)) and _conditions(g) and g, 10,
                              "status on the bad Gateway")
            assert _conditions(gw) == {"Accepted": ("False", "ListenersNotValid"), "Programmed": ("False", "Invalid")}
            assert "15008" in gw["status"]["conditions"][0]["message"]
            assert kube.kubectl("get", "deployment", "bad", "-n", ns, check=False).returncode != 0
            # The user's own Service and ServiceAccount of that name: not overwritten, not owned;
            # the SA is used as it is, the Service is a conflict the status names.
            await asyncio.to_thread(kube.kubectl, "create", "serviceaccount", "mine", "-n", ns)
            await asyncio.to_thread(kube.kubectl, "create", "service", "clusterip", "mine", "-n", ns, "--tcp=80:8080")
            await asyncio.to_thread(kube.apply, GATEWAY % {"name": "mine", "ns": ns})
            gw = await _until(lambda: (g := _get(kube, "gateway", "mine", "-n", ns)) and _conditions(g) and g, 10,
                              "status on the Gateway")
            assert _conditions(gw)["Programmed"] == ("False", "Invalid")
            assert f"Service/{ns}/mine" in gw["status"]["conditions"][1]["message"]
            for kind in ("serviceaccount", "service"):
                assert "ownerReferences" not in _get(kube, kind, "mine", "-n", ns)["metadata"], kind
            dep = await _until(lambda: _get(kube, "deployment", "mine", "-n", ns), 10, "its Deployment")
            assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "mine"
            assert _failed(ctl, ns) == []
            # A name the API server refuses for a Service (over 63 characters): that Gateway says so,
            # and the others are deployed all the same.
            long = "w" * 70
            await asyncio.to_thread(kube.apply, GATEWAY % {"name": long, "ns": ns} + "---" + GATEWAY % {"name": "ok", "ns": ns})
            gw = await _until(lambda: (g := _get(kube, "gateway", long, "-n", ns)) and _conditions(g) and g, 10,
                              "status on the long-named Gateway")
            assert _conditions(gw)["Programmed"] == ("False", "Invalid")
            assert "refused" in gw["status"]["conditions"][1]["message"]
            await _until(lambda: _conditions(_get(kube, "gateway", "ok", "-n", ns)).get("Programmed") == ("True", "Programmed"),
                         10, "the other Gateway Programmed")
            assert _failed(ctl, ns) == [long]
            await asyncio.to_thread(kube.kubectl, "delete", "gateway", long, "-n", ns)

    asyncio.run(main())


ROUTE = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: %(name)s, namespace: %(ns)s}
spec:
  parentRefs: [%(parent)s]
  rules: [{%(match)sbackendRefs: [{name: %(backend)s, port: 80}]}]
"""
WEB = """{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "%s", "namespace": "%s"},
 "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}"""


def _parents(kube: KubeCluster, ns: str, name: str) -> dict[str, dict[str, tuple[str, str]]] | None:
    r = _get(kube, "httproute", name, "-n", ns)
    parents = ((r or {}).get("status") or {}).get("parents") or ()
    return {p["controllerName"]: {c["type"]: (c["status"], c["reason"]) for c in p["conditions"]}
            for p in parents} or None


def test_httproute_parents_report_accepted_and_resolved_refs_per_gateway_api(mesh_crds: KubeCluster,
                                                                             namespace: str) -> None:
    kube, ns = mesh_crds, namespace
    svc = '{group: "", kind: Service, name: web, port: %d}'
    mine = "istio.io/mesh-controller"

    def route(name: str, parent: str = svc % 80, backend: str = "web", match: str = "") -> str:
        return ROUTE % {"name": name, "ns": ns, "parent": parent, "backend": backend, "match": match}

    async def main() -> None:
        async with _controller(kube) as ctl:
            await asyncio.to_thread(kube.apply, WEB % ("web", ns))
            await asyncio.to_thread(kube.apply, GATEWAY % {"name": "waypoint", "ns": ns})
            await asyncio.to_thread(kube.apply, "---".join([
                route("ok"), route("nobackend", backend="ghost"), route("noparent", parent=svc % 81),
                route("bad", match="matches: [{path: {type: Bogus, value: /}}], "),
                route("gw", parent="{name: waypoint}"), route("elsewhere", parent="{name: not-a-waypoint}")]))
            want = {
                "ok": {"Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs")},
                "nobackend": {"Accepted": ("True", "Accepted"), "ResolvedRefs": ("False", "BackendNotFound")},
                "noparent": {"Accepted": ("False", "NoMatchingParent"), "ResolvedRefs": ("True", "ResolvedRefs")},
                "bad": {"Accepted": ("False", "UnsupportedValue"), "ResolvedRefs": ("True", "ResolvedRefs")},
                "gw": {"Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs")},
            }
            for name, conds in want.items():
                got = await _until(lambda: _parents(kube, ns, name), 10, f"status of route {name}")
                assert got == {mine: conds}, name
            bad = _get(kube, "httproute", "bad", "-n", ns)["status"]["parents"][0]
            assert "Bogus" in bad["conditions"][0]["message"]
            assert bad["parentRef"] == {"group": "", "kind": "Service", "name": "web", "port": 80}
            # A parent that is not ours (a Gateway of no class we serve): no entry from us.
            assert _parents(kube, ns, "elsewhere") is None
            # The waypoint's listener counts the route attached to it.
            gw = await _until(lambda: (g := _get(kube, "gateway", "waypoint", "-n", ns))
                              and g["status"]["listeners"][0]["attachedRoutes"] == 1 and g, 10, "attachedRoutes 1")
            assert _conditions(gw)["Programmed"] == ("True", "Programmed")

            # Another controller's entry stays beside ours; fixing the backend flips ResolvedRefs.
            other = {"parentRef": {"name": "elsewhere"}, "controllerName": "example.com/other", "conditions": []}
            ours = _get(kube, "httproute", "nobackend", "-n", ns)["status"]["parents"]
            await asyncio.to_thread(kube.kubectl, "patch", "httproute", "nobackend", "-n", ns, "--subresource=status",
                                    "--type=merge", "-p", json.dumps({"status": {"parents": [*ours, other]}}))
            await asyncio.to_thread(kube.apply, WEB % ("ghost", ns))
            got = await _until(lambda: (p := _parents(kube, ns, "nobackend"))
                               and p[mine]["ResolvedRefs"][0] == "True" and p, 10, "ResolvedRefs True")
            assert set(got) == {mine, "example.com/other"}
            assert _failed(ctl, ns) == []

    asyncio.run(main())


def test_the_install_rbac_is_enough_for_the_controller(no_mesh_namespace: KubeCluster, namespace: str,
                                                       tmp_path) -> None:
    """Least privilege that works: the controller runs as istiod's ServiceAccount with only the
    install's RBAC, and deploys a waypoint and writes its status."""
    import yaml

    from kubemode.manifests import manifests

    from .support import request_token
    kube, ns = no_mesh_namespace, namespace
    rbac = [o for o in manifests() if o["kind"] in ("Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding")
            and o["metadata"]["name"] in ("istio-system", "istiod", "ambient-istiod")]
    kube.apply(yaml.safe_dump_all(rbac))
    kubeconfig = str(tmp_path / "istiod.kubeconfig")

    async def main() -> None:
        admin = await KubeApi.from_kubeconfig(kube.kubeconfig)
        try:
            token = await request_token(admin, "istio-system", "istiod",
                                        audience="https://kubernetes.default.svc.cluster.local")
        finally:
            await admin.close()
        kube._write_kubeconfig(kubeconfig, token)
        api = await KubeApi.from_kubeconfig(kubeconfig)
        source = KubeSource(api, ResourceStore(), events=False)
        ctl = WaypointController(api, source)
        await source.start()
        await ctl.start()
        try:
            await source.wait_synced(20)
            await asyncio.to_thread(kube.apply, GATEWAY % {"name": "waypoint", "ns": ns})
            gw = await _until(lambda: (g := _get(kube, "gateway", "waypoint", "-n", ns))
                              and _conditions(g).get("Programmed", ("",))[0] == "True" and g, 15,
                              "Gateway Programmed by istiod's identity")
            assert gw["status"]["addresses"]
            assert _get(kube, "deployment", "waypoint", "-n", ns) is not None
            assert _failed(ctl, ns) == []
        finally:
            await ctl.stop()
            await source.stop()
            await api.close()
    try:
        asyncio.run(main())
    finally:
        kube.kubectl("delete", "clusterrolebinding,clusterrole", "ambient-istiod", "--ignore-not-found")
        kube.kubectl("delete", "namespace", "istio-system", "--wait=false")


def test_policy_problems_are_events_on_the_objects(mesh_crds: KubeCluster, namespace: str) -> None:
    from controlplane.kube.policy_events import PolicyEvents
    kube, ns = mesh_crds, namespace
    policy = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-delete, namespace: {ns}}}
spec:
  targetRefs: [{{kind: Service, group: "", name: web}}]
  action: DENY
  rules: [{{to: [{{operation: {{methods: [DELETE]}}}}]}}]
"""

    def events(name: str) -> list[tuple[str, str, str]]:
        out = json.loads(kube.kubectl("get", "events", "-n", ns, "-o", "json").stdout)["items"]
        return sorted((e["reason"], e["involvedObject"]["kind"], e["involvedObject"].get("uid") or "")
                      for e in out if e["involvedObject"]["name"] == name and e["type"] == "Warning")

    async def main() -> None:
        api = await KubeApi.from_kubeconfig(kube.kubeconfig)
        store = ResourceStore()
        source = KubeSource(api, store)
        reporter = PolicyEvents(api, source, store)
        reporter.start()
        await source.start()
        try:
            await source.wait_synced(20)
            await asyncio.to_thread(kube.apply, policy)
            [(reason, kind, uid)] = await _until(lambda: events("deny-delete"), 10, "TargetNotFound Event")
            assert (reason, kind) == ("TargetNotFound", "AuthorizationPolicy")
            assert uid == _get(kube, "authorizationpolicy", "deny-delete", "-n", ns)["metadata"]["uid"]
            # The Service appears, bound to a waypoint that does not exist: two new problems.
            await asyncio.to_thread(kube.apply, (WEB % ("web", ns)).replace(
                '"namespace"', '"labels": {"istio.io/use-waypoint": "waypoint"}, "namespace"', 1))
            await _until(lambda: [r for r, _, _ in events("web")] == ["WaypointNotFound"], 10, "WaypointNotFound")
            await _until(lambda: [r for r, _, _ in events("deny-delete")] == ["NoWaypoint", "TargetNotFound"], 10,
                         "NoWaypoint Event")
            # The waypoint made: no problem left, and nothing more is reported.
            await asyncio.to_thread(kube.apply, GATEWAY % {"name": "waypoint", "ns": ns})
            await _until(lambda: not reporter.current, 10, "problems resolved")
            posted = reporter.posted
            await asyncio.sleep(0.5)
            assert reporter.posted == posted == 3
        finally:
            await reporter.stop()
            await source.stop()
            await api.close()

    asyncio.run(main())


def test_a_cache_that_lags_never_takes_over_a_users_object(mesh_crds: KubeCluster, namespace: str) -> None:
    """The write decided from a stale view (the user's Service not yet seen): a create that gets
    409 and leaves the Service as the user made it; an update judged on another version (a
    replaced object) fails its resourceVersion precondition."""
    from controlplane.kube.waypoint_objects import desired_objects, gateway_info
    kube, ns = mesh_crds, namespace
    kube.kubectl("create", "service", "clusterip", "waypoint", "-n", ns, "--tcp=80:8080")
    user = _get(kube, "service", "waypoint", "-n", ns)

    async def main() -> None:
        async with _controller(kube) as ctl:
            gw = gateway_info({"metadata": {"name": "waypoint", "namespace": ns, "uid": "u-lag"},
                               "spec": {"gatewayClassName": "istio-waypoint",
                                        "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}})
            svc = next(o for o in desired_objects(gw, ctl.options) if o["kind"] == "Service")
            await ctl._apply(svc, None)  # "missing", as a lagging cache would say
            stale = {**user, "metadata": {**user["metadata"], "resourceVersion": "1"}}
            await ctl._apply(svc, stale)  # "ours", but it is another object now
            now = _get(kube, "service", "waypoint", "-n", ns)
            assert "ownerReferences" not in now["metadata"]
            assert [p["port"] for p in now["spec"]["ports"]] == [80]
            assert now["metadata"]["resourceVersion"] == user["metadata"]["resourceVersion"]

    asyncio.run(main())
